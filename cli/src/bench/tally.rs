//! What a run counts: requests and their latencies, connections, and errors by kind.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::net::Failure;

/// The longest latency the histogram tells apart, in microseconds (a minute: longer
/// than any bounded connect plus exchange).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Errors of a run, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// The server refused a connection.
    pub refused: u64,
    /// A connection was reset or aborted.
    pub reset: u64,
    /// A connect or an exchange took longer than 5 s.
    pub timeout: u64,
    /// An echoed byte differed from the byte sent.
    pub mismatch: u64,
    /// The server closed a connection before echoing everything.
    pub eof: u64,
    /// Any other error.
    pub other: u64,
}

impl ErrorCounts {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.mismatch + self.eof + self.other
    }

    /// The nonzero counts, with their names.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("refused", self.refused),
            ("reset", self.reset),
            ("timeout", self.timeout),
            ("mismatch", self.mismatch),
            ("eof", self.eof),
            ("other", self.other),
        ]
        .into_iter()
        .filter(|&(_, count)| count > 0)
    }

    fn add(&mut self, failure: Failure) {
        let count = match failure {
            Failure::Refused => &mut self.refused,
            Failure::Reset => &mut self.reset,
            Failure::Timeout => &mut self.timeout,
            Failure::Mismatch => &mut self.mismatch,
            Failure::Eof => &mut self.eof,
            Failure::Other => &mut self.other,
        };
        *count += 1;
    }

    fn merge(&mut self, other: &ErrorCounts) {
        self.refused += other.refused;
        self.reset += other.reset;
        self.timeout += other.timeout;
        self.mismatch += other.mismatch;
        self.eof += other.eof;
        self.other += other.other;
    }
}

/// Requests with their latencies, connections opened and errors.
#[derive(Debug)]
pub struct Tally {
    /// Latency of each request, in microseconds.
    pub latency: Histogram<u64>,
    /// Connections established.
    pub opened: u64,
    /// Errors by kind.
    pub errors: ErrorCounts,
}

impl Tally {
    /// Nothing counted yet.
    pub fn new() -> Self {
        Tally {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("valid histogram bounds"),
            opened: 0,
            errors: ErrorCounts::default(),
        }
    }

    /// Requests counted.
    pub fn requests(&self) -> u64 {
        self.latency.len()
    }

    /// Counts a request that took `latency`.
    pub fn request(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
    }

    /// Counts an error.
    pub fn failed(&mut self, failure: Failure) {
        self.errors.add(failure);
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Tally) {
        self.latency
            .add(&other.latency)
            .expect("tallies share their histogram bounds");
        self.opened += other.opened;
        self.errors.merge(&other.errors);
    }
}

/// Tallies shared by many connections, in a few shards so that threads seldom wait
/// on each other (a histogram per connection would cost too much memory).
#[derive(Debug)]
pub struct Tallies(Box<[Mutex<Tally>]>);

impl Tallies {
    /// `shards` empty tallies.
    pub fn new(shards: usize) -> Self {
        Tallies(
            (0..shards.max(1))
                .map(|_| Mutex::new(Tally::new()))
                .collect(),
        )
    }

    /// The shard of the `index`th connection.
    pub fn lock(&self, index: usize) -> MutexGuard<'_, Tally> {
        self.0[index % self.0.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// All the shards, merged.
    pub fn total(&self) -> Tally {
        let mut total = Tally::new();
        for index in 0..self.0.len() {
            total.merge(&self.lock(index));
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up() {
        let tallies = Tallies::new(3);
        for index in 0..10 {
            let mut tally = tallies.lock(index);
            tally.request(Duration::from_micros(100 * (index as u64 + 1)));
            tally.opened += 1;
        }
        tallies.lock(4).failed(Failure::Mismatch);
        tallies.lock(5).failed(Failure::Refused);
        let total = tallies.total();
        assert_eq!(total.requests(), 10);
        assert_eq!(total.opened, 10);
        assert_eq!(total.latency.max(), 1000);
        assert_eq!(total.errors.total(), 2);
        assert_eq!(
            total.errors.named().collect::<Vec<_>>(),
            [("refused", 1), ("mismatch", 1)]
        );
    }
}
