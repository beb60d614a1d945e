//! `bench hold`: opens `--conns` connections, leaves them idle for `--duration`, then
//! checks that each still answers one echo exchange.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};

use super::net::{within, Exchange};
use super::progress::Progress;
use super::report::{Measured, Memory};
use super::tally::Tally;
use super::Config;

/// Connects (and checks) in flight at once.
const PARALLEL: usize = 256;

/// Opens, holds and checks the connections; with `--pid`, reads the server's memory
/// and sockets before the first connect and at the end of the hold, with every
/// connection open, and its CPU time over the check.
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
    // Read only now, so that the server has had the hold to accept every connection
    // the kernel completed for it; its sockets first, so that the memory read after
    // them has every connection they count.
    if let (Some(memory), Some(server)) = (memory.as_mut(), server) {
        memory.fds_after = server.descriptors();
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
