//! The live progress line on stderr, shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(250);

/// A spinner with the phase, the time elapsed, a count and its current rate.
#[derive(Debug)]
pub struct Progress {
    /// The line; hidden when stderr is not a terminal.
    bar: ProgressBar,
    /// The task that redraws it, if it is shown.
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `counter` (requests, or connections), on the current runtime.
    pub fn start(counter: Arc<AtomicU64>) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        let style = ProgressStyle::with_template("{spinner} {prefix} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::new_spinner().with_style(style);
        let ticker = tokio::spawn(redraw(bar.clone(), counter));
        Progress {
            bar,
            ticker: Some(ticker),
        }
    }

    /// Names the phase the run is in.
    pub fn phase(&self, name: &'static str) {
        self.bar.set_prefix(name);
    }

    /// Clears the line for the report.
    pub fn finish(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

/// Redraws `bar` with `counter` and its rate since the last tick, until aborted.
async fn redraw(bar: ProgressBar, counter: Arc<AtomicU64>) {
    let (mut last_count, mut last_at) = (0, Instant::now());
    let mut ticks = tokio::time::interval_at(last_at + TICK, TICK);
    loop {
        let at = ticks.tick().await;
        let count = counter.load(Ordering::Relaxed);
        let rate = count.saturating_sub(last_count) as f64 / (at - last_at).as_secs_f64();
        bar.set_message(format!("{count} ({rate:.0}/s)"));
        bar.tick();
        (last_count, last_at) = (count, at);
    }
}
