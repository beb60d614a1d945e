//! What a server has done so far: connections accepted and closed (by reason), accept
//! errors, bytes in and out. Read with [`ServerHandle::stats`](crate::ServerHandle::stats).
//!
//! The hot path pays little for them: a connection's byte counts are plain stores into
//! its own counters, folded into the server's totals when it closes, and the other
//! counters change once per connection or per accept error.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Connections closed, by reason.
    pub closed: ClosedCounts,
    /// Failed TLS handshakes (all of them also in
    /// [`closed.tls_handshake`](ClosedCounts::tls_handshake)), by why they failed.
    pub tls_handshake_failures: TlsFailureCounts,
}

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
        ]
    }

    fn from_array(counts: [u64; REASONS]) -> Self {
        let [peer_closed, peer_reset, closed, idle_timeout, frame_timeout, state_timeout, send_timeout, output_overflow, mailbox_overflow, bad_frame, bad_reply, panic, shutdown, io, tls_handshake, proxy_header] =
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
const REASONS: usize = 16;

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
    closed: [AtomicU64; REASONS],
    tls_failures: [AtomicU64; TLS_FAILURES],
}

impl Counters {
    pub(crate) fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that closed for `reason` after moving the given bytes.
    pub(crate) fn closed(&self, reason: &CloseReason, bytes: Bytes) {
        self.closed[slot(reason)].fetch_add(1, Ordering::Relaxed);
        if let CloseReason::TlsHandshake(failure) = reason {
            self.tls_failures[*failure as usize].fetch_add(1, Ordering::Relaxed);
        }
        if bytes.read > 0 {
            self.bytes_in.fetch_add(bytes.read, Ordering::Relaxed);
        }
        if bytes.written > 0 {
            self.bytes_out.fetch_add(bytes.written, Ordering::Relaxed);
        }
    }

    /// The snapshot, given the counts kept elsewhere and the bytes of the live
    /// connections.
    pub(crate) fn snapshot(
        &self,
        accepted: u64,
        active: usize,
        peak_active: usize,
        live: Bytes,
    ) -> Stats {
        Stats {
            accepted,
            active,
            peak_active,
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed) + live.read,
            bytes_out: self.bytes_out.load(Ordering::Relaxed) + live.written,
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

/// Bytes read from and written to a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Bytes {
    pub(crate) read: u64,
    pub(crate) written: u64,
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, other: Bytes) {
        self.read += other.read;
        self.written += other.written;
    }
}

/// One connection's byte counts, written only by its own task (a plain store, no
/// read-modify-write) and read by whoever asks for stats.
#[derive(Debug, Default)]
pub(crate) struct ByteCounts {
    read: AtomicU64,
    written: AtomicU64,
}

impl ByteCounts {
    pub(crate) fn set(&self, totals: Bytes) {
        self.read.store(totals.read, Ordering::Relaxed);
        self.written.store(totals.written, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Bytes {
        Bytes {
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
        }
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
        ];
        let counters = Counters::default();
        for (i, reason) in reasons.iter().enumerate() {
            for _ in 0..=i {
                counters.closed(reason, Bytes::default());
            }
        }
        let stats = counters.snapshot(0, 0, 0, Bytes::default());
        assert_eq!(stats.tls_handshake_failures.get(TlsFailure::Timeout), 15);
        assert_eq!(stats.tls_handshake_failures.total(), 15);
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
