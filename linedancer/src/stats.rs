//! What a server has done so far: connections accepted and closed (by reason), accept
//! errors, bytes, frames and replies, how long connections lived. Read with
//! [`ServerHandle::stats`](crate::ServerHandle::stats).
//!
//! The hot path pays little for them: a connection's traffic counts are plain stores
//! into its own counters, folded into the server's totals when it closes, and the other
//! counters change once per connection or per accept error.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::close::{CloseReason, TlsFailure};

/// A snapshot of a server's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections accepted since the server started.
    pub accepted: u64,
    /// Connections open now.
    pub active: usize,
    /// The most connections that were open at once.
    pub peak_active: usize,
    /// Failed `accept()` calls, of every kind.
    pub accept_errors: u64,
    /// Bytes read from peers, by the protocol driver (a raw [`Handler`](crate::Handler)
    /// owns its socket, and its bytes are not counted).
    pub bytes_in: u64,
    /// Bytes written to peers, by the protocol driver.
    pub bytes_out: u64,
    /// Frames decoded, by the protocol driver.
    pub frames_in: u64,
    /// Replies encoded, by the protocol driver.
    pub replies_out: u64,
    /// Connections accepted that had to wait for a slot, the server being at its
    /// connection limit.
    pub limit_waits: u64,
    /// Failed `accept()` calls by kind; their sum is
    /// [`accept_errors`](Stats::accept_errors).
    pub accept_errors_by_class: AcceptErrorCounts,
    /// How long the closed connections lived.
    pub lifetimes: Lifetimes,
    /// Connections closed, by reason.
    pub closed: ClosedCounts,
    /// Failed TLS handshakes (all of them also in
    /// [`closed.tls_handshake`](ClosedCounts::tls_handshake)), by why they failed.
    pub tls_handshake_failures: TlsFailureCounts,
}

/// Failed `accept()` calls by what they say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptErrorCounts {
    /// The process or the system ran out of something (`EMFILE`, `ENFILE`,
    /// `ENOBUFS`, `ENOMEM`): the acceptor paused.
    pub resource: u64,
    /// One connection failed before it was taken (reset, aborted): skipped.
    pub connection: u64,
    /// Anything else: the acceptor paused.
    pub other: u64,
}

impl AcceptErrorCounts {
    /// Each class's name (`resource`, `connection`, `other`) and count.
    pub fn by_class(&self) -> [(&'static str, u64); 3] {
        [
            ("resource", self.resource),
            ("connection", self.connection),
            ("other", self.other),
        ]
    }
}

/// The kinds of failed `accept()`, in the order of [`AcceptErrorCounts::by_class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptError {
    Resource,
    Connection,
    Other,
}

/// The upper bounds, in seconds, of the buckets of [`Lifetimes`].
pub const LIFETIME_BUCKETS: [f64; 8] = [0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0];

/// How long closed connections lived: a histogram with the [`LIFETIME_BUCKETS`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lifetimes {
    /// Connections that lived at most each bucket's bound (cumulative, as Prometheus
    /// has them); those that lived longer than the last count only in
    /// [`count`](Lifetimes::count).
    pub buckets: [u64; LIFETIME_BUCKETS.len()],
    /// Every closed connection.
    pub count: u64,
    /// Their lifetimes added up, in seconds.
    pub sum_seconds: f64,
}

impl Eq for Lifetimes {}

/// Failed TLS handshakes by [`TlsFailure`]: each kind's count, in the order of
/// [`TlsFailure`]'s variants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsFailureCounts([u64; TLS_FAILURES]);

impl TlsFailureCounts {
    /// How many handshakes failed this way.
    pub fn get(&self, failure: TlsFailure) -> u64 {
        self.0[failure as usize]
    }

    /// Every failed handshake.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Each kind's name (such as `timeout`) and count.
    pub fn by_reason(&self) -> [(&'static str, u64); TLS_FAILURES] {
        TlsFailure::ALL.map(|failure| (failure.name(), self.get(failure)))
    }
}

/// The number of kinds of TLS handshake failure.
const TLS_FAILURES: usize = TlsFailure::ALL.len();

/// Closed connections by [`CloseReason`]; see there for what each means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClosedCounts {
    /// [`CloseReason::PeerClosed`].
    pub peer_closed: u64,
    /// [`CloseReason::PeerReset`].
    pub peer_reset: u64,
    /// [`CloseReason::Closed`].
    pub closed: u64,
    /// [`CloseReason::IdleTimeout`].
    pub idle_timeout: u64,
    /// [`CloseReason::FrameTimeout`].
    pub frame_timeout: u64,
    /// [`CloseReason::StateTimeout`].
    pub state_timeout: u64,
    /// [`CloseReason::SendTimeout`].
    pub send_timeout: u64,
    /// [`CloseReason::OutputOverflow`].
    pub output_overflow: u64,
    /// [`CloseReason::MailboxOverflow`].
    pub mailbox_overflow: u64,
    /// [`CloseReason::BadFrame`].
    pub bad_frame: u64,
    /// [`CloseReason::BadReply`].
    pub bad_reply: u64,
    /// [`CloseReason::Panic`].
    pub panic: u64,
    /// [`CloseReason::Shutdown`].
    pub shutdown: u64,
    /// [`CloseReason::Io`].
    pub io: u64,
    /// [`CloseReason::TlsHandshake`].
    pub tls_handshake: u64,
    /// [`CloseReason::ProxyHeader`].
    pub proxy_header: u64,
    /// [`CloseReason::Kicked`].
    pub kicked: u64,
}

impl ClosedCounts {
    /// Every closed connection, whatever the reason.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, count)| count).sum()
    }

    /// Each reason's name (as in the log, such as `idle timeout`) and count.
    pub fn by_reason(&self) -> [(&'static str, u64); REASONS] {
        [
            ("peer closed", self.peer_closed),
            ("peer reset", self.peer_reset),
            ("closed by protocol", self.closed),
            ("idle timeout", self.idle_timeout),
            ("frame timeout", self.frame_timeout),
            ("state timeout", self.state_timeout),
            ("send timeout", self.send_timeout),
            ("output overflow", self.output_overflow),
            ("mailbox overflow", self.mailbox_overflow),
            ("bad frame", self.bad_frame),
            ("bad reply", self.bad_reply),
            ("panic", self.panic),
            ("server shutdown", self.shutdown),
            ("i/o error", self.io),
            ("tls handshake failed", self.tls_handshake),
            ("proxy header", self.proxy_header),
            ("closed by admin", self.kicked),
        ]
    }

    fn from_array(counts: [u64; REASONS]) -> Self {
        let [peer_closed, peer_reset, closed, idle_timeout, frame_timeout, state_timeout, send_timeout, output_overflow, mailbox_overflow, bad_frame, bad_reply, panic, shutdown, io, tls_handshake, proxy_header, kicked] =
            counts;
        ClosedCounts {
            peer_closed,
            peer_reset,
            closed,
            idle_timeout,
            frame_timeout,
            state_timeout,
            send_timeout,
            output_overflow,
            mailbox_overflow,
            bad_frame,
            bad_reply,
            panic,
            shutdown,
            io,
            tls_handshake,
            proxy_header,
            kicked,
        }
    }
}

/// The total, then the count of each reason that occurred: `100 (peer closed 98, idle
/// timeout 2)`.
impl fmt::Display for ClosedCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.total())?;
        let mut separator = " (";
        for (reason, count) in self.by_reason().into_iter().filter(|(_, n)| *n > 0) {
            write!(f, "{separator}{reason} {count}")?;
            separator = ", ";
        }
        if separator == ", " {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// The number of close reasons counted apart.
const REASONS: usize = 17;

/// Where a close reason is counted, in the order of [`ClosedCounts::by_reason`].
fn slot(reason: &CloseReason) -> usize {
    match reason {
        CloseReason::PeerClosed => 0,
        CloseReason::PeerReset => 1,
        CloseReason::Closed => 2,
        CloseReason::IdleTimeout => 3,
        CloseReason::FrameTimeout => 4,
        CloseReason::StateTimeout => 5,
        CloseReason::SendTimeout => 6,
        CloseReason::OutputOverflow => 7,
        CloseReason::MailboxOverflow => 8,
        CloseReason::BadFrame(_) => 9,
        CloseReason::BadReply(_) => 10,
        CloseReason::Panic(_) => 11,
        CloseReason::Shutdown => 12,
        CloseReason::Io(_) => 13,
        CloseReason::TlsHandshake(_) => 14,
        CloseReason::ProxyHeader(_) => 15,
        CloseReason::Kicked => 16,
    }
}

/// The server-wide counters behind [`Stats`]. The accepted and active counts live with
/// the connection set, which knows them anyway.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    accept_errors: AtomicU64,
    /// Bytes of connections that have closed; live ones are added when read.
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    frames_in: AtomicU64,
    replies_out: AtomicU64,
    limit_waits: AtomicU64,
    accept_errors_by_class: [AtomicU64; 3],
    closed: [AtomicU64; REASONS],
    tls_failures: [AtomicU64; TLS_FAILURES],
    /// Connections closed within each bucket's bound, not cumulative; the last counts
    /// those beyond every bound.
    lifetimes: [AtomicU64; LIFETIME_BUCKETS.len() + 1],
    lifetimes_micros: AtomicU64,
}

impl Counters {
    pub(crate) fn accept_error(&self, class: AcceptError) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
        self.accept_errors_by_class[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection accepted at the connection limit.
    pub(crate) fn limit_wait(&self) {
        self.limit_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that closed for `reason` after `lifetime` and the given
    /// traffic.
    pub(crate) fn closed(&self, reason: &CloseReason, traffic: Traffic, lifetime: Duration) {
        self.closed[slot(reason)].fetch_add(1, Ordering::Relaxed);
        if let CloseReason::TlsHandshake(failure) = reason {
            self.tls_failures[*failure as usize].fetch_add(1, Ordering::Relaxed);
        }
        for (total, count) in [
            (&self.bytes_in, traffic.read),
            (&self.bytes_out, traffic.written),
            (&self.frames_in, traffic.frames),
            (&self.replies_out, traffic.replies),
        ] {
            if count > 0 {
                total.fetch_add(count, Ordering::Relaxed);
            }
        }
        let seconds = lifetime.as_secs_f64();
        let bucket = (LIFETIME_BUCKETS.iter())
            .position(|bound| seconds <= *bound)
            .unwrap_or(LIFETIME_BUCKETS.len());
        self.lifetimes[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(lifetime.as_micros()).unwrap_or(u64::MAX);
        self.lifetimes_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The snapshot, given the counts kept elsewhere and the bytes of the live
    /// connections.
    pub(crate) fn snapshot(
        &self,
        accepted: u64,
        active: usize,
        peak_active: usize,
        live: Traffic,
    ) -> Stats {
        let load = |count: &AtomicU64| count.load(Ordering::Relaxed);
        let [resource, connection, other] = self.accept_errors_by_class.each_ref().map(load);
        let mut lifetimes = Lifetimes {
            sum_seconds: Duration::from_micros(load(&self.lifetimes_micros)).as_secs_f64(),
            ..Lifetimes::default()
        };
        for (bucket, count) in self.lifetimes.iter().enumerate() {
            let count = load(count);
            lifetimes.count += count;
            if let Some(cumulative) = lifetimes.buckets.get_mut(bucket) {
                *cumulative = lifetimes.count;
            }
        }
        Stats {
            accepted,
            active,
            peak_active,
            accept_errors: load(&self.accept_errors),
            bytes_in: load(&self.bytes_in) + live.read,
            bytes_out: load(&self.bytes_out) + live.written,
            frames_in: load(&self.frames_in) + live.frames,
            replies_out: load(&self.replies_out) + live.replies,
            limit_waits: load(&self.limit_waits),
            accept_errors_by_class: AcceptErrorCounts {
                resource,
                connection,
                other,
            },
            lifetimes,
            closed: ClosedCounts::from_array(
                self.closed
                    .each_ref()
                    .map(|count| count.load(Ordering::Relaxed)),
            ),
            tls_handshake_failures: TlsFailureCounts(
                (self.tls_failures)
                    .each_ref()
                    .map(|count| count.load(Ordering::Relaxed)),
            ),
        }
    }
}

/// Bytes read from and written to a peer, frames decoded and replies encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Traffic {
    pub(crate) read: u64,
    pub(crate) written: u64,
    pub(crate) frames: u64,
    pub(crate) replies: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        self.read += other.read;
        self.written += other.written;
        self.frames += other.frames;
        self.replies += other.replies;
    }
}

/// One connection's traffic counts and the bytes of replies it has waiting, written
/// only by its own task (plain stores, no read-modify-write) and read by whoever asks
/// for stats.
#[derive(Debug, Default)]
pub(crate) struct TrafficCounts {
    read: AtomicU64,
    written: AtomicU64,
    frames: AtomicU64,
    replies: AtomicU64,
    queued: AtomicU64,
}

impl TrafficCounts {
    pub(crate) fn set(&self, totals: Traffic) {
        self.read.store(totals.read, Ordering::Relaxed);
        self.written.store(totals.written, Ordering::Relaxed);
        self.frames.store(totals.frames, Ordering::Relaxed);
        self.replies.store(totals.replies, Ordering::Relaxed);
    }

    pub(crate) fn set_bytes(&self, read: u64, written: u64) {
        self.read.store(read, Ordering::Relaxed);
        self.written.store(written, Ordering::Relaxed);
    }

    pub(crate) fn set_queued(&self, queued: usize) {
        self.queued.store(queued as u64, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Traffic {
        Traffic {
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            replies: self.replies.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_count() {
        let reasons = [
            CloseReason::PeerClosed,
            CloseReason::PeerReset,
            CloseReason::Closed,
            CloseReason::IdleTimeout,
            CloseReason::FrameTimeout,
            CloseReason::StateTimeout,
            CloseReason::SendTimeout,
            CloseReason::OutputOverflow,
            CloseReason::MailboxOverflow,
            CloseReason::BadFrame(String::new()),
            CloseReason::BadReply(String::new()),
            CloseReason::Panic(String::new()),
            CloseReason::Shutdown,
            CloseReason::Io(String::new()),
            CloseReason::TlsHandshake(TlsFailure::Timeout),
            CloseReason::ProxyHeader(crate::close::ProxyError::Timeout),
            CloseReason::Kicked,
        ];
        let counters = Counters::default();
        for (i, reason) in reasons.iter().enumerate() {
            for _ in 0..=i {
                counters.closed(reason, Traffic::default(), Duration::from_millis(i as u64));
            }
        }
        let stats = counters.snapshot(0, 0, 0, Traffic::default());
        // Reason i closes i + 1 times after i ms: 0 to 10 ms in the first bucket, 11
        // to 16 ms in the second.
        assert_eq!(stats.lifetimes.count, 153);
        assert_eq!(stats.lifetimes.buckets[..3], [66, 153, 153]);
        let sum_ms: u64 = (0..17).map(|i| i * (i + 1)).sum();
        assert!((stats.lifetimes.sum_seconds - sum_ms as f64 / 1000.0).abs() < 1e-9);
        assert_eq!(stats.tls_handshake_failures.get(TlsFailure::Timeout), 15);
        assert_eq!(stats.tls_handshake_failures.total(), 15);
        assert_eq!(stats.closed.kicked, 17);
        let closed = stats.closed;
        let expected: Vec<u64> = (1..=REASONS as u64).collect();
        let counted: Vec<u64> = closed.by_reason().iter().map(|(_, n)| *n).collect();
        assert_eq!(counted, expected);
        assert_eq!(closed.total(), expected.iter().sum::<u64>());
        for (reason, (name, _)) in reasons.iter().zip(closed.by_reason()) {
            assert!(
                reason.to_string().starts_with(name),
                "{reason} named {name}"
            );
        }
    }
}
