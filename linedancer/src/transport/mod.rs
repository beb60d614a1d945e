//! What a connection runs over: any byte [`Stream`], the [`Address`] of each end, and
//! what turns an accepted socket into the stream a protocol sees: the PROXY protocol
//! header ([`proxy`]) and TLS ([`tls`]).
//!
//! The driver and raw [`Handler`](crate::Handler)s are generic over the stream, so a
//! protocol runs the same over TCP, a Unix socket, TLS or an in-memory
//! [`tokio::io::duplex`] pipe. [`ServerHandle::serve`](crate::ServerHandle::serve)
//! takes any stream its caller has, as it is.

pub(crate) mod proxy;
pub(crate) mod tls;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;

use crate::close::{CloseReason, ProxyError, TlsFailure};
use proxy::ProxyHeader;
use tls::{Tls, TlsInfo};

/// A connected byte stream a server can serve: anything that reads and writes
/// asynchronously, such as [`tokio::net::TcpStream`], [`tokio::net::UnixStream`], a TLS
/// stream or one end of [`tokio::io::duplex`]. Implemented for every such type.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Makes closing `stream` reset the connection (SO_LINGER 0) rather than end it
/// cleanly, when it is a TCP socket: for connections the server cuts off, so that their
/// peers can tell. Other streams close as they do.
pub(crate) fn reset_on_close<T: Stream>(stream: &T) {
    let stream = stream as &dyn std::any::Any;
    let tcp = (stream.downcast_ref::<TcpStream>()).or_else(|| {
        stream
            .downcast_ref::<TlsStream<TcpStream>>()
            .map(|tls| tls.get_ref().0)
    });
    if let Some(tcp) = tcp {
        // A socket that fails this is already gone.
        let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    }
}

/// What happens to an accepted TCP connection before its protocol sees it: the PROXY
/// header is read, then the TLS handshake is done, each when the server has it, both
/// within their timeouts and under a cap on how many are in progress at once.
pub(crate) struct Front {
    pub(crate) proxy: Option<ProxySettings>,
    pub(crate) tls: Option<TlsSettings>,
    /// Permits for connections between accept and the end of their opening; the
    /// acceptors take one for each connection they accept, and wait at the cap.
    pub(crate) handshakes: Arc<Semaphore>,
}

/// The PROXY protocol, as the server runs it.
pub(crate) struct ProxySettings {
    pub(crate) trusted: Vec<IpNet>,
    pub(crate) timeout: Duration,
}

/// TLS, as the server runs it.
pub(crate) struct TlsSettings {
    pub(crate) tls: Tls,
    pub(crate) timeout: Duration,
}

impl ProxySettings {
    /// Reads the PROXY header of a connection from `peer`: refused at once from an
    /// untrusted peer, and when not complete within the timeout.
    /// A peer on a Unix socket is local, and trusted: the socket file's permissions
    /// say who may connect.
    pub(crate) async fn read<S: Peek>(
        &self,
        stream: &mut S,
        peer: &Address,
    ) -> Result<ProxyHeader, CloseReason> {
        if let Address::Ip(peer) = peer {
            if !proxy::trusts(&self.trusted, peer) {
                return Err(CloseReason::ProxyHeader(ProxyError::Untrusted));
            }
        }
        match tokio::time::timeout(self.timeout, proxy::read_header(stream)).await {
            Ok(header) => header.map_err(CloseReason::ProxyHeader),
            Err(_) => Err(CloseReason::ProxyHeader(ProxyError::Timeout)),
        }
    }
}

impl TlsSettings {
    /// Does the TLS handshake, within the timeout.
    pub(crate) async fn handshake<S: Stream>(
        &self,
        stream: S,
    ) -> Result<(TlsStream<S>, TlsInfo), CloseReason> {
        let accept = self.tls.acceptor.accept(stream);
        match tokio::time::timeout(self.timeout, accept).await {
            Ok(Ok(stream)) => {
                let info = TlsInfo::of(stream.get_ref().1);
                Ok((stream, info))
            }
            Ok(Err(e)) => {
                let failure = tls::failure(&e);
                tracing::debug!(%failure, "tls handshake failed: {e}");
                Err(CloseReason::TlsHandshake(failure))
            }
            Err(_) => Err(CloseReason::TlsHandshake(TlsFailure::Timeout)),
        }
    }
}

/// What a connection's transport settled before its protocol saw it: the TLS
/// handshake's outcome and the PROXY header, when the server has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TransportInfo {
    pub(crate) tls: Option<TlsInfo>,
    pub(crate) proxy: Option<ProxyHeader>,
    /// The peer process, on a Unix socket.
    pub(crate) credentials: Option<PeerCredentials>,
}

/// The process at the other end of a Unix-socket connection, as the kernel saw it
/// when it connected (`SO_PEERCRED`): who it runs as, and which it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its process id, where the kernel tells it (Linux does).
    pub pid: Option<i32>,
}

impl From<tokio::net::unix::UCred> for PeerCredentials {
    fn from(cred: tokio::net::unix::UCred) -> Self {
        PeerCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        }
    }
}

/// A socket whose waiting input can be looked at without being taken, so that the
/// PROXY header is read without a byte past it.
pub(crate) trait Peek: Stream {
    /// Waits for input, and copies what has arrived into `buf`, leaving it in the
    /// socket; 0 when the peer has closed.
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

impl Peek for TcpStream {
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        TcpStream::peek(self, buf)
    }
}

impl Peek for UnixStream {
    async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.readable().await?;
            let peeked = self.try_io(Interest::READABLE, || {
                // SAFETY: `buf` is valid for writes of its length, and the kernel
                // writes at most that many bytes.
                let n = unsafe {
                    libc::recv(
                        self.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_PEEK,
                    )
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match peeked {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                peeked => return peeked,
            }
        }
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
