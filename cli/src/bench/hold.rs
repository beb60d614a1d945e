//! `bench hold`: opens `--conns` connections, leaves them idle for `--duration`, then
//! checks that each still answers one echo exchange.
//!
//! With `--pid`, the end of the hold waits (for at most [`SETTLE_LIMIT`]) until the
//! server has accepted every connection the run opened before reading its memory: a
//! connect completes in the kernel, and with many connections some wait in its queues
//! for seconds before the server takes them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use tracing::debug;

use super::net::{within, Exchange};
use super::progress::Progress;
use super::report::{Measured, Memory};
use super::sys::{Descriptors, Server};
use super::tally::Tally;
use super::Config;

/// Connects (and checks) in flight at once.
const PARALLEL: usize = 256;

/// The longest the end of the hold waits for the server to accept the connections the
/// run opened (when its descriptors can be read): long enough for a server that is
/// merely behind on 10,000 connects, short enough that one which never accepts them
/// (or whose other connections came or went) is reported without a long stall. The
/// `--json` field list (in `mod.rs`) and the README give it as 10 s.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// How often the server's sockets are counted while waiting for it to accept.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// Opens, holds and checks the connections; with `--pid`, reads the server's memory
/// and sockets before the first connect and at the end of the hold, with every
/// connection open and (see [`settle`]) accepted, and its CPU time over the check.
pub async fn run(config: &Arc<Config>) -> Measured {
    let (connected, checked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let progress = Progress::start("open", &connected);
    let server = config.server.as_ref();
    let mut tally = Tally::new();

    let mut memory = server.map(|s| Memory {
        fds_before: s.descriptors(),
        rss_before: s.rss(),
        ..Memory::default()
    });
    let connects = (0..config.conns).map(|index| {
        let config = Arc::clone(config);
        async move { (index, within(config.target.connect(index)).await) }
    });
    let mut streams = Vec::with_capacity(config.conns);
    let mut open_failures = 0;
    for (index, result) in limited(connects, &connected).await {
        match result {
            Ok(stream) => {
                tally.opened += 1;
                streams.push((index, stream));
            }
            Err(failure) => {
                open_failures += 1;
                tally.failed(failure);
            }
        }
    }

    progress.phase("hold");
    sleep(config.duration).await;
    // Read only once the server has accepted every connection the kernel completed
    // for it; its sockets first, so that the memory read after them has every
    // connection they count.
    if let (Some(memory), Some(server)) = (memory.as_mut(), server) {
        memory.fds_after = match memory.fds_before {
            Some(before) => settle(server, before.sockets, tally.opened, &progress).await,
            None => server.descriptors(),
        };
        memory.rss_after = server.rss();
        memory.open_failures = open_failures;
    }

    progress.count("check", &checked);
    let (size, lines) = (config.size, config.lines);
    let checks = streams.into_iter().map(|(index, mut stream)| async move {
        let mut exchange = Exchange::new(index, size, 1, lines);
        let start = Instant::now();
        within(exchange.run(&mut stream))
            .await
            .map(|()| exchange.done()[0] - start)
    });
    let cpu_before = server.and_then(|s| s.cpu_time());
    let started = Instant::now();
    for result in limited(checks, &checked).await {
        match result {
            Ok(latency) => tally.request(latency),
            Err(failure) => tally.failed(failure),
        }
    }
    let window = started.elapsed();
    let cpu_after = server.and_then(|s| s.cpu_time());
    progress.finish();
    Measured {
        tally,
        warmup: Tally::new(),
        window,
        cpu_before,
        cpu_after,
        memory,
    }
}

/// Waits until `server`, which had `before` open sockets before the run, has as many
/// more as the run `opened` connections (or more still), counting them every
/// [`SETTLE_POLL`] for at most [`SETTLE_LIMIT`]; its descriptors then, or when the
/// time is up, or `None` as soon as they cannot be read. The progress line shows the
/// phase `settle` with the connections accepted so far, if there is a wait.
async fn settle(
    server: &Server,
    before: u64,
    opened: u64,
    progress: &Progress,
) -> Option<Descriptors> {
    let expected = before + opened;
    let mut fds = server.descriptors()?;
    if fds.sockets >= expected {
        return Some(fds);
    }
    debug!(
        sockets = fds.sockets,
        expected,
        limit = %humantime::format_duration(SETTLE_LIMIT),
        "waiting for the server to accept the run's connections"
    );
    let accepted = Arc::new(AtomicU64::new(fds.sockets.saturating_sub(before)));
    progress.count("settle", &accepted);
    let started = Instant::now();
    while fds.sockets < expected && started.elapsed() < SETTLE_LIMIT {
        sleep(SETTLE_POLL).await;
        fds = server.descriptors()?;
        accepted.store(fds.sockets.saturating_sub(before), Ordering::Relaxed);
    }
    debug!(
        sockets = fds.sockets,
        expected,
        waited = ?started.elapsed(),
        "done waiting for the server to accept"
    );
    Some(fds)
}

/// Runs `tasks`, at most [`PARALLEL`] at a time, counting each as it ends; their
/// outputs in the order they ended.
async fn limited<T, F>(tasks: impl Iterator<Item = F>, counter: &Arc<AtomicU64>) -> Vec<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(PARALLEL));
    let mut set = JoinSet::new();
    for task in tasks {
        let (limit, counter) = (Arc::clone(&limit), Arc::clone(counter));
        set.spawn(async move {
            // The semaphore is never closed, so this always holds a permit.
            let _permit = limit.acquire_owned().await;
            let output = task.await;
            counter.fetch_add(1, Ordering::Relaxed);
            output
        });
    }
    set.join_all().await
}
