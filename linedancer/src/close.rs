//! Why a connection ended: the [`CloseReason`] that the driver, the connection set and
//! the counters all speak of.

use std::fmt;
use std::io;

/// Why a connection ended. Every connection that ends gets one, logged with the
/// connection's id and state, and counted in [`Stats`](crate::Stats).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed its side (end of stream); pending replies were delivered.
    PeerClosed,
    /// The peer reset the connection or went away while we wrote to it.
    PeerReset,
    /// The protocol closed the connection (returned [`Next::Close`](crate::Next::Close) or called
    /// [`Ctx::close`](crate::Ctx::close)), or a raw [`Handler`](crate::Handler) returned `Ok`.
    Closed,
    /// No bytes arrived for the server's idle timeout
    /// ([`Builder::idle_timeout`](crate::Builder::idle_timeout)).
    IdleTimeout,
    /// A frame had begun but was not complete within the frame timeout
    /// ([`Builder::frame_timeout`](crate::Builder::frame_timeout)): a peer dripping
    /// bytes that never make a frame.
    FrameTimeout,
    /// The protocol's own timeout ([`Ctx::set_timeout`](crate::Ctx::set_timeout)) expired and its
    /// [`Protocol::timeout`](crate::Protocol::timeout) callback closed the connection.
    StateTimeout,
    /// The peer did not take our replies for the send timeout
    /// ([`Builder::send_timeout`](crate::Builder::send_timeout)): it stopped reading.
    SendTimeout,
    /// More replies were waiting to be written than the output limit
    /// ([`Builder::max_output`](crate::Builder::max_output)) allows: the peer sends
    /// requests faster than it reads the answers.
    OutputOverflow,
    /// More messages waited in the connection's mailbox than its capacity
    /// ([`Builder::mailbox_capacity`](crate::Builder::mailbox_capacity)): the connection
    /// could not keep up with what was sent to it.
    MailboxOverflow,
    /// The peer sent bytes the codec rejects, such as a frame over the codec's maximum
    /// length or invalid UTF-8 in a line protocol. The text is the codec's error.
    BadFrame(String),
    /// A reply could not be encoded. The text is the codec's error.
    BadReply(String),
    /// The protocol or handler panicked; the text is the panic's message. Only this
    /// connection ends.
    Panic(String),
    /// The server's drain timeout ended while the connection was still open. A TCP
    /// connection cut off this way is reset (SO_LINGER 0), a protocol's or a raw
    /// handler's, so that its peer sees `ECONNRESET` rather than a clean end.
    Shutdown,
    /// Another I/O error on the socket.
    Io(String),
    /// The TLS handshake did not complete ([`Builder::tls`](crate::Builder::tls)); the
    /// protocol never saw the connection.
    TlsHandshake(TlsFailure),
    /// The PROXY protocol header was missing, malformed, late or not allowed
    /// ([`Builder::proxy_protocol`](crate::Builder::proxy_protocol)); the protocol
    /// never saw the connection.
    ProxyHeader(ProxyError),
    /// Closed from outside, one connection
    /// ([`ServerHandle::close_connection`](crate::ServerHandle::close_connection), the
    /// admin endpoint's `DELETE /connections/{id}`).
    Kicked,
}

/// Why a TLS handshake failed, as counted in
/// [`Stats::tls_handshake_failures`](crate::Stats::tls_handshake_failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// Not complete within the handshake timeout
    /// ([`Builder::tls_handshake_timeout`](crate::Builder::tls_handshake_timeout)).
    Timeout,
    /// The peer closed or reset the connection before the handshake was done.
    PeerClosed,
    /// The peer sent something that is not a valid TLS handshake (plain text, say), or
    /// broke the protocol's rules.
    BadMessage,
    /// The peer refused our certificate (unknown CA, expired, wrong name): it sent a
    /// certificate alert.
    CertificateRejected,
    /// No protocol version, cipher suite or ALPN protocol in common with the peer.
    Incompatible,
    /// The peer ended the handshake with another alert.
    Alert,
    /// Any other error.
    Other,
}

impl TlsFailure {
    /// Every kind, in the order of their counts.
    pub(crate) const ALL: [TlsFailure; 7] = [
        TlsFailure::Timeout,
        TlsFailure::PeerClosed,
        TlsFailure::BadMessage,
        TlsFailure::CertificateRejected,
        TlsFailure::Incompatible,
        TlsFailure::Alert,
        TlsFailure::Other,
    ];

    /// Its short name, as in the log and the stats.
    pub fn name(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::PeerClosed => "peer closed",
            TlsFailure::BadMessage => "bad message",
            TlsFailure::CertificateRejected => "certificate rejected",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::Alert => "alert",
            TlsFailure::Other => "other",
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was wrong with a connection's PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The connection starts with neither the v1 signature (`PROXY `) nor the v2 one.
    #[error("no PROXY header: the connection starts with neither signature")]
    BadSignature,
    /// The header goes on past the most the protocol allows (107 bytes for v1) or
    /// linedancer accepts (for v2).
    #[error("v{version} header longer than {limit} bytes")]
    TooLong {
        /// 1 or 2.
        version: u8,
        /// The most allowed.
        limit: usize,
    },
    /// The header has the signature but is malformed; the text says how.
    #[error("malformed v{version} header: {reason}")]
    Malformed {
        /// 1 or 2.
        version: u8,
        /// What the parser found wrong.
        reason: String,
    },
    /// The header was not complete within the header timeout
    /// ([`Builder::proxy_header_timeout`](crate::Builder::proxy_header_timeout)).
    #[error("header not complete within the timeout")]
    Timeout,
    /// The peer is not among those allowed to send a header
    /// ([`ProxyProtocol::trust`](crate::ProxyProtocol::trust)).
    #[error("peer not allowed to send a PROXY header")]
    Untrusted,
    /// The peer closed the connection before the header was complete.
    #[error("peer closed before the header was complete")]
    PeerClosed,
    /// Reading the header failed.
    #[error("i/o error: {0}")]
    Io(String),
}

impl CloseReason {
    /// Sorts a socket error: a reset or broken pipe is the peer's doing, anything else is
    /// reported with its text.
    pub(crate) fn from_io(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => CloseReason::PeerReset,
            _ => CloseReason::Io(error.to_string()),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("peer closed"),
            CloseReason::PeerReset => f.write_str("peer reset"),
            CloseReason::Closed => f.write_str("closed by protocol"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::FrameTimeout => f.write_str("frame timeout"),
            CloseReason::StateTimeout => f.write_str("state timeout"),
            CloseReason::SendTimeout => f.write_str("send timeout: the peer stopped reading"),
            CloseReason::OutputOverflow => {
                f.write_str("output overflow: replies piled up past the limit")
            }
            CloseReason::MailboxOverflow => f.write_str("mailbox overflow"),
            CloseReason::BadFrame(e) => write!(f, "bad frame: {e}"),
            CloseReason::BadReply(e) => write!(f, "bad reply: {e}"),
            CloseReason::Panic(e) => write!(f, "panic: {e}"),
            CloseReason::Shutdown => f.write_str("server shutdown"),
            CloseReason::Io(e) => write!(f, "i/o error: {e}"),
            CloseReason::TlsHandshake(e) => write!(f, "tls handshake failed: {e}"),
            CloseReason::ProxyHeader(e) => write!(f, "proxy header: {e}"),
            CloseReason::Kicked => f.write_str("closed by admin"),
        }
    }
}
