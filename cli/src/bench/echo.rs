//! `bench echo`: ping-pong on long-lived connections, `--pipeline` messages at a time.

use tokio::time::Instant;

use super::net::Exchange;
use super::timed::Worker;

/// Keeps one connection busy until the run ends: sends `--pipeline` messages, reads
/// them back and checks them, and again; after an error, it connects anew.
pub async fn worker(worker: Worker) {
    let mut exchange = Exchange::new(
        worker.index,
        worker.config.size,
        worker.config.pipeline,
        worker.config.lines,
    );
    while worker.running() {
        let Some(mut stream) = worker.connect().await else {
            continue;
        };
        while worker
            .exchange(Instant::now(), &mut stream, &mut exchange)
            .await
        {}
    }
}
