//! What a connection runs over: any byte [`Stream`], and the [`Address`] of each end.
//!
//! The driver and raw [`Handler`](crate::Handler)s are generic over the stream, so a
//! protocol runs the same over TCP, a Unix socket, TLS or an in-memory
//! [`tokio::io::duplex`] pipe. This module is where what turns an accepted socket into
//! the stream a protocol sees belongs (TLS, the PROXY header); today the listener hands
//! over TCP sockets as they are, and [`ServerHandle::serve`](crate::ServerHandle::serve)
//! takes any stream its caller has.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connected byte stream a server can serve: anything that reads and writes
/// asynchronously, such as [`tokio::net::TcpStream`], [`tokio::net::UnixStream`], a TLS
/// stream or one end of [`tokio::io::duplex`]. Implemented for every such type.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Makes closing `stream` reset the connection (SO_LINGER 0) rather than end it
/// cleanly, when it is a TCP socket: for connections the server cuts off, so that their
/// peers can tell. Other streams close as they do.
pub(crate) fn reset_on_close<T: Stream>(stream: &T) {
    if let Some(tcp) = (stream as &dyn std::any::Any).downcast_ref::<tokio::net::TcpStream>() {
        // A socket that fails this is already gone.
        let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Where one end of a connection is: an IP address and port, a Unix socket, or nowhere
/// that can be named (an in-memory stream).
///
/// ```
/// use linedancer::Address;
///
/// let tcp = Address::from(std::net::SocketAddr::from(([127, 0, 0, 1], 7000)));
/// assert_eq!(tcp.to_string(), "127.0.0.1:7000");
/// assert_eq!(tcp.ip(), Some(([127, 0, 0, 1], 7000).into()));
/// assert_eq!(Address::Unix(None).to_string(), "unix");
/// assert_eq!(Address::None.to_string(), "none");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// An IP address and port (TCP).
    Ip(SocketAddr),
    /// A Unix-domain socket, with its path when it has one (a connecting client's
    /// socket usually has none).
    Unix(Option<Arc<Path>>),
    /// No address: an in-memory stream, or one whose origin is not known.
    None,
}

impl Address {
    /// The IP address and port, for a TCP connection.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(addr) => Some(*addr),
            _ => None,
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Address::Ip(addr)
    }
}

impl From<tokio::net::unix::SocketAddr> for Address {
    fn from(addr: tokio::net::unix::SocketAddr) -> Self {
        Address::Unix(addr.as_pathname().map(Arc::from))
    }
}

impl PartialEq<SocketAddr> for Address {
    fn eq(&self, other: &SocketAddr) -> bool {
        self.ip() == Some(*other)
    }
}

/// `127.0.0.1:7000`, `[::1]:7000`, `unix:/run/app.sock`, `unix` (unnamed) or `none`.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(addr) => addr.fmt(f),
            Address::Unix(Some(path)) => write!(f, "unix:{}", path.display()),
            Address::Unix(None) => f.write_str("unix"),
            Address::None => f.write_str("none"),
        }
    }
}
