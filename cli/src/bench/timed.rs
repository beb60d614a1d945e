//! The timed modes' driver (echo and connect): one worker per connection for the
//! warmup and the duration. What happens after the warmup (messages echoed,
//! connections opened, errors) is the report's; what happens in the warmup is counted
//! apart, for the progress line and the report's `warmup`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::net::{before, Conn, Exchange, Failure};
use super::progress::Progress;
use super::report::Measured;
use super::tally::Tallies;
use super::Config;

/// How long a worker waits after an error before it tries again.
const BACK_OFF: Duration = Duration::from_millis(100);

/// Tally shards per generator thread.
const SHARDS_PER_THREAD: usize = 4;

/// One connection's share of the run, handed to a mode's worker.
#[derive(Debug)]
pub struct Worker {
    /// The connection's index, which picks its source address and payloads.
    pub index: usize,
    /// The run's settings.
    pub config: Arc<Config>,
    /// The end of the warmup: what happens from here on counts in the report...
    start: Instant,
    /// ...until here, where the worker stops.
    end: Instant,
    /// The counts of the warmup.
    warmup: Counts,
    /// The counts from `start` on, the report's numbers.
    measured: Counts,
}

/// Where one phase of the run counts: its tallies, and its count of messages echoed
/// for the progress line.
#[derive(Debug, Clone)]
struct Counts {
    /// Requests, connections opened and errors.
    tallies: Arc<Tallies>,
    /// Messages echoed, for the progress line.
    progress: Arc<AtomicU64>,
}

impl Counts {
    fn new(shards: usize) -> Self {
        Counts {
            tallies: Arc::new(Tallies::new(shards)),
            progress: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Worker {
    /// Whether the run is still on.
    pub fn running(&self) -> bool {
        Instant::now() < self.end
    }

    /// The counts of the phase that `at` falls in.
    fn counts(&self, at: Instant) -> &Counts {
        if at < self.start {
            &self.warmup
        } else {
            &self.measured
        }
    }

    /// Connects, or counts the error and backs off: `None` then, or when the run ends.
    pub async fn connect(&self) -> Option<Conn> {
        match before(self.end, self.config.target.connect(self.index)).await? {
            Ok(stream) => {
                let counts = self.counts(Instant::now());
                counts.tallies.lock(self.index).opened += 1;
                Some(stream)
            }
            Err(failure) => {
                self.failed(failure).await;
                None
            }
        }
    }

    /// Runs the next exchange on `stream` and counts the messages echoed, each with its
    /// latency from `start`, in the phase it was echoed in. Whether the connection can
    /// go on: not after an error (counted, then backed off from) or once the run is
    /// over.
    pub async fn exchange(
        &self,
        start: Instant,
        stream: &mut Conn,
        exchange: &mut Exchange,
    ) -> bool {
        let result = before(self.end, exchange.run(stream)).await;
        // In the order they were echoed: those of the warmup first.
        let done = exchange.done();
        let (in_warmup, measured) = done.split_at(done.partition_point(|&at| at < self.start));
        for (counts, done) in [(&self.warmup, in_warmup), (&self.measured, measured)] {
            if done.is_empty() {
                continue;
            }
            counts
                .progress
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            let mut tally = counts.tallies.lock(self.index);
            for &at in done {
                tally.request(at - start);
            }
        }
        match result {
            Some(Ok(())) => true,
            Some(Err(failure)) => {
                self.failed(failure).await;
                false
            }
            None => false,
        }
    }

    /// Counts an error in the phase it happened in, then waits a little (not past the
    /// end) before going on.
    async fn failed(&self, failure: Failure) {
        let now = Instant::now();
        self.counts(now).tallies.lock(self.index).failed(failure);
        sleep_until((now + BACK_OFF).min(self.end)).await;
    }
}

/// Runs `worker` for each of the `--conns` connections through the warmup and the
/// duration, and gathers what they counted in the window after the warmup, with the
/// server's CPU time over that window; the warmup's counts come apart.
pub async fn run<F, Fut>(config: &Arc<Config>, worker: F) -> Measured
where
    F: Fn(Worker) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shards = config.threads * SHARDS_PER_THREAD;
    let (warmup, measured) = (Counts::new(shards), Counts::new(shards));
    let progress = if config.warmup.is_zero() {
        Progress::start("measure", &measured.progress)
    } else {
        Progress::start("warmup", &warmup.progress)
    };
    let start = Instant::now() + config.warmup;
    let end = start + config.duration;
    let mut workers = JoinSet::new();
    for index in 0..config.conns {
        workers.spawn(worker(Worker {
            index,
            config: Arc::clone(config),
            start,
            end,
            warmup: warmup.clone(),
            measured: measured.clone(),
        }));
    }
    let server = config.server.as_ref();
    sleep_until(start).await;
    let cpu_before = server.and_then(|s| s.cpu_time());
    progress.count("measure", &measured.progress);
    sleep_until(end).await;
    let cpu_after = server.and_then(|s| s.cpu_time());
    workers.join_all().await;
    progress.finish();
    Measured {
        tally: measured.tallies.total(),
        warmup: warmup.tallies.total(),
        window: config.duration,
        cpu_before,
        cpu_after,
        memory: None,
    }
}
