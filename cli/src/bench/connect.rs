//! `bench connect`: connection churn; every request is a connect, one checked exchange
//! of `--size` bytes, and a close.

use tokio::time::Instant;

use super::net::Exchange;
use super::timed::Worker;

/// Connects, exchanges one message, closes, and again, until the run ends; each
/// request's latency runs from the connect to the echo.
pub async fn worker(worker: Worker) {
    let mut exchange = Exchange::new(worker.index, worker.config.size, 1, worker.config.lines);
    while worker.running() {
        let start = Instant::now();
        let Some(mut stream) = worker.connect().await else {
            continue;
        };
        worker.exchange(start, &mut stream, &mut exchange).await;
    }
}
