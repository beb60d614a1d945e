//! The timed modes' driver (echo and connect): one worker per connection for the
//! warmup and the duration, counting what completes after the warmup.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::net::{before, Exchange, Failure};
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
    /// Requests are counted from here on (the end of the warmup)...
    start: Instant,
    /// ...until here, where the worker stops.
    end: Instant,
    /// Where the counts go.
    tallies: Arc<Tallies>,
    /// Messages echoed so far, warmup included, for the progress line.
    progress: Arc<AtomicU64>,
}

impl Worker {
    /// Whether the run is still on.
    pub fn running(&self) -> bool {
        Instant::now() < self.end
    }

    /// Connects, or counts the error and backs off: `None` then, or when the run ends.
    pub async fn connect(&self) -> Option<TcpStream> {
        match before(self.end, self.config.target.connect(self.index)).await? {
            Ok(stream) => {
                self.tallies.lock(self.index).opened += 1;
                Some(stream)
            }
            Err(failure) => {
                self.failed(failure).await;
                None
            }
        }
    }

    /// Runs the next exchange on `stream` and counts the messages echoed after the
    /// warmup, each with its latency from `start`. Whether the connection can go on:
    /// not after an error (counted, then backed off from) or once the run is over.
    pub async fn exchange(
        &self,
        start: Instant,
        stream: &mut TcpStream,
        exchange: &mut Exchange,
    ) -> bool {
        let result = before(self.end, exchange.run(stream)).await;
        let done = exchange.done();
        self.progress
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        {
            let mut tally = self.tallies.lock(self.index);
            for &at in done.iter().filter(|&&at| at >= self.start) {
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

    /// Counts an error, then waits a little (not past the end) before going on.
    async fn failed(&self, failure: Failure) {
        self.tallies.lock(self.index).failed(failure);
        sleep_until((Instant::now() + BACK_OFF).min(self.end)).await;
    }
}

/// Runs `worker` for each of the `--conns` connections through the warmup and the
/// duration, and gathers what they counted in the window after the warmup, with the
/// server's CPU time over that window.
pub async fn run<F, Fut>(config: &Arc<Config>, worker: F) -> Measured
where
    F: Fn(Worker) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(Arc::clone(&counter));
    progress.phase(if config.warmup.is_zero() {
        "measure"
    } else {
        "warmup"
    });
    let tallies = Arc::new(Tallies::new(config.threads * SHARDS_PER_THREAD));
    let start = Instant::now() + config.warmup;
    let end = start + config.duration;
    let mut workers = JoinSet::new();
    for index in 0..config.conns {
        workers.spawn(worker(Worker {
            index,
            config: Arc::clone(config),
            start,
            end,
            tallies: Arc::clone(&tallies),
            progress: Arc::clone(&counter),
        }));
    }
    let server = config.server.as_ref();
    sleep_until(start).await;
    let cpu_before = server.and_then(|s| s.cpu_time());
    progress.phase("measure");
    sleep_until(end).await;
    let cpu_after = server.and_then(|s| s.cpu_time());
    workers.join_all().await;
    progress.finish();
    Measured {
        tally: tallies.total(),
        window: config.duration,
        cpu_before,
        cpu_after,
        rss_before: None,
        rss_after: None,
    }
}
