//! A gateway: every client connection relayed, byte for byte, to an upstream server.
//!
//! Built on the raw [`Handler`] rather than a [`Protocol`](crate::Protocol): it has no
//! frames, only two sockets. For each client it connects to the next upstream in turn
//! (round robin) and hands both sockets to tokio's [`copy_bidirectional`], which moves
//! bytes both ways and passes a half-close on: when one side stops sending, the other
//! side's write half is shut down, and the relay ends once both directions have. An
//! upstream that cannot be reached closes that client, with the reason logged; the
//! next client goes to the next upstream. When the server shuts down, the relay stops
//! and both sockets are closed.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::connections::Connection;
use crate::error::Error;
use crate::handler::Handler;
use crate::transport::Stream;

/// How long connecting to an upstream may take before the client is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Relays every connection to one of its upstreams, taken in turn, both directions,
/// until both sides have closed or the server shuts down.
///
/// ```
/// use linedancer::examples::{Echo, Gateway};
/// use linedancer::Server;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = Server::builder().port(0).protocol::<Echo>().start().await?;
/// let gateway = Gateway::new(vec![echo.local_addr()])?;
/// let gateway = Server::builder().port(0).handler(gateway).start().await?;
///
/// let mut client = tokio::net::TcpStream::connect(gateway.local_addr()).await?;
/// client.write_all(b"through the gateway").await?;
/// client.shutdown().await?; // passed on to the echo server, which closes in turn
/// let mut reply = String::new();
/// client.read_to_string(&mut reply).await?;
/// assert_eq!(reply, "through the gateway");
/// # gateway.shutdown().await;
/// # echo.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Gateway {
    upstreams: Vec<SocketAddr>,
    /// How many clients have been given an upstream: the next one's index, modulo
    /// the number of upstreams.
    next: AtomicUsize,
}

impl Gateway {
    /// A gateway to `upstreams`, used in turn in this order.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for the setting `upstreams` when the list is empty.
    pub fn new(upstreams: Vec<SocketAddr>) -> Result<Self, Error> {
        if upstreams.is_empty() {
            return Err(Error::Config {
                setting: "upstreams",
                value: "[]".into(),
                reason: "needs at least one upstream",
            });
        }
        Ok(Gateway {
            upstreams,
            next: AtomicUsize::new(0),
        })
    }

    /// The upstreams, in the order they are used.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }
}

impl Handler for Gateway {
    async fn handle<T: Stream>(&self, mut client: T, conn: Connection) -> io::Result<()> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let upstream = self.upstreams[turn % self.upstreams.len()];
        tokio::select! {
            relayed = relay(&mut client, upstream, &conn) => relayed,
            // Returning drops both sockets, which closes them.
            () = conn.shutdown_requested() => Ok(()),
        }
    }
}

/// Connects to `upstream` and relays between it and `client` until both directions
/// have ended. A connect that fails is logged, and returned as an error that names
/// the upstream. The bytes relayed are counted once the relay ends.
async fn relay<T: Stream>(
    client: &mut T,
    upstream: SocketAddr,
    conn: &Connection,
) -> io::Result<()> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let connected = connect.await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {CONNECT_TIMEOUT:?}"),
        ))
    });
    let mut outbound = match connected {
        Ok(outbound) => outbound,
        Err(e) => {
            warn!(%upstream, error = %e, "upstream unreachable");
            return Err(io::Error::new(
                e.kind(),
                format!("upstream {upstream} unreachable: {e}"),
            ));
        }
    };
    if let Err(e) = outbound.set_nodelay(true) {
        debug!(%upstream, "cannot set TCP_NODELAY: {e}");
    }
    debug!(%upstream, "relaying");
    let (up, down) = copy_bidirectional(client, &mut outbound).await?;
    conn.record_bytes(up, down);
    debug!(%upstream, bytes_up = up, bytes_down = down, "relay finished");
    Ok(())
}
