//! The live progress line on stderr, shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use indicatif::{HumanDuration, ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(250);

/// The shortest span a rate is taken over.
const MIN_SPAN: Duration = Duration::from_millis(100);

/// A spinner with the phase, the time elapsed, the phase's count and its current rate.
///
/// Each phase that counts something has a counter of its own, so that what one phase
/// counted (the warmup's requests, say) never shows in the next one's count or rate.
/// The phase and its count are drawn as one message, so that no frame shows one
/// phase's name with another's count.
#[derive(Debug)]
pub struct Progress {
    /// The line; hidden when stderr is not a terminal.
    bar: ProgressBar,
    /// The phase on the line, read by the ticker.
    shown: Arc<Mutex<Shown>>,
    /// The task that redraws it, if it is shown.
    ticker: Option<JoinHandle<()>>,
}

/// The phase on the line: its name, what it counts, and since when.
#[derive(Debug, Clone)]
struct Shown {
    /// The phase's name.
    name: &'static str,
    /// What the phase counts (requests, or connections).
    counter: Arc<AtomicU64>,
    /// When the counter came on the line.
    since: Instant,
}

impl Progress {
    /// Starts showing phase `name`, which counts `counter`, on the current runtime.
    pub fn start(name: &'static str, counter: &Arc<AtomicU64>) -> Self {
        let shown = Arc::new(Mutex::new(Shown {
            name,
            counter: Arc::clone(counter),
            since: Instant::now(),
        }));
        if !std::io::stderr().is_terminal() {
            return Progress {
                bar: ProgressBar::hidden(),
                shown,
                ticker: None,
            };
        }
        let style = ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::new_spinner().with_style(style);
        let ticker = tokio::spawn(redraw(bar.clone(), Arc::clone(&shown)));
        let progress = Progress {
            bar,
            shown,
            ticker: Some(ticker),
        };
        progress.draw_new_phase();
        progress
    }

    /// Names the phase the run is in; the count goes on.
    pub fn phase(&self, name: &'static str) {
        self.lock().name = name;
        self.draw_new_phase();
    }

    /// Starts phase `name`, which counts `counter`: the line shows that count, and its
    /// rate, from now on.
    pub fn count(&self, name: &'static str, counter: &Arc<AtomicU64>) {
        *self.lock() = Shown {
            name,
            counter: Arc::clone(counter),
            since: Instant::now(),
        };
        self.draw_new_phase();
    }

    /// Clears the line for the report.
    pub fn finish(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shown> {
        self.shown.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shows the phase at once, with its count and no rate until the next tick.
    fn draw_new_phase(&self) {
        let shown = self.lock().clone();
        let count = shown.counter.load(Ordering::Relaxed);
        self.bar.set_message(line(&self.bar, &shown, count, None));
    }
}

/// The line's message: the phase, the time elapsed, the count and its rate.
fn line(bar: &ProgressBar, shown: &Shown, count: u64, rate: Option<f64>) -> String {
    let elapsed = HumanDuration(bar.elapsed());
    match rate {
        Some(rate) => format!("{} {elapsed:#} {count} ({rate:.0}/s)", shown.name),
        None => format!("{} {elapsed:#} {count} (-/s)", shown.name),
    }
}

/// Redraws `bar` with the shown counter and its rate since the last tick, until
/// aborted.
async fn redraw(bar: ProgressBar, shown: Arc<Mutex<Shown>>) {
    let mut meter = Meter::default();
    let mut ticks = tokio::time::interval_at(Instant::now() + TICK, TICK);
    loop {
        ticks.tick().await;
        let now = shown.lock().unwrap_or_else(PoisonError::into_inner).clone();
        // Now, not the tick's deadline, which may come before the phase began.
        let (count, rate) = meter.read(&now, Instant::now());
        bar.set_message(line(&bar, &now, count, rate));
        bar.tick();
    }
}

/// The last reading of the shown counter, from which the next one's rate is taken.
#[derive(Debug, Default)]
struct Meter {
    /// The counter read, its count, and when.
    last: Option<(Arc<AtomicU64>, u64, Instant)>,
}

impl Meter {
    /// Reads `shown` at `at`: its count and its rate since the last reading, or since
    /// it came on the line if the last reading was of another counter. No rate over
    /// less than [`MIN_SPAN`]: the next reading takes it over a longer one.
    fn read(&mut self, shown: &Shown, at: Instant) -> (u64, Option<f64>) {
        let count = shown.counter.load(Ordering::Relaxed);
        let (last_count, last_at) = match &self.last {
            Some((counter, count, at)) if Arc::ptr_eq(counter, &shown.counter) => (*count, *at),
            _ => (0, shown.since),
        };
        let span = at.saturating_duration_since(last_at);
        if span < MIN_SPAN {
            self.last = Some((Arc::clone(&shown.counter), last_count, last_at));
            return (count, None);
        }
        let rate = count.saturating_sub(last_count) as f64 / span.as_secs_f64();
        self.last = Some((Arc::clone(&shown.counter), count, at));
        (count, Some(rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_phase_counts_and_rates_from_zero() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let warmup = Arc::new(AtomicU64::new(0));
        let mut shown = Shown {
            name: "warmup",
            counter: Arc::clone(&warmup),
            since: t0,
        };
        let mut meter = Meter::default();
        warmup.store(500, Ordering::Relaxed);
        assert_eq!(meter.read(&shown, t0 + second), (500, Some(500.0)));
        warmup.store(1500, Ordering::Relaxed);
        assert_eq!(meter.read(&shown, t0 + 2 * second), (1500, Some(1000.0)));

        // The measured phase starts half a second later, 200 requests in: none of the
        // warmup's 1500 shows in its count or its rate.
        let measured = Arc::new(AtomicU64::new(200));
        warmup.store(1700, Ordering::Relaxed);
        shown = Shown {
            name: "measure",
            counter: Arc::clone(&measured),
            since: t0 + 2 * second + second / 2,
        };
        assert_eq!(meter.read(&shown, t0 + 3 * second), (200, Some(400.0)));
        measured.store(1200, Ordering::Relaxed);
        assert_eq!(meter.read(&shown, t0 + 4 * second), (1200, Some(1000.0)));
    }

    #[test]
    fn no_rate_over_a_short_span() {
        let t0 = Instant::now();
        let counter = Arc::new(AtomicU64::new(3));
        let shown = Shown {
            name: "measure",
            counter: Arc::clone(&counter),
            since: t0,
        };
        let mut meter = Meter::default();
        assert_eq!(meter.read(&shown, t0 + Duration::from_millis(1)), (3, None));
        // The next reading takes the rate from the phase's start.
        counter.store(503, Ordering::Relaxed);
        assert_eq!(
            meter.read(&shown, t0 + Duration::from_millis(500)),
            (503, Some(1006.0))
        );
    }
}
