//! The replaceable client handler: the low-level alternative to [`Protocol`] for users
//! who want the raw stream (a proxy, a protocol with its own I/O loop), like the
//! original's `{client_handler, M}` option.
//!
//! [`Protocol`]: crate::Protocol

use std::future::Future;
use std::io;

use tokio::net::TcpStream;

use crate::connections::Connection;

/// Serves one connection, given its socket.
///
/// The server calls [`handle`](Handler::handle) in a task of its own for every accepted
/// connection, inside a tracing span with the connection's id and peer. The connection
/// ends when the future completes; an error is logged as the close reason.
///
/// ```
/// use linedancer::{Connection, Handler};
/// use tokio::io::AsyncWriteExt;
/// use tokio::net::TcpStream;
///
/// /// Tells the peer its connection id, then hangs up.
/// struct Ticket;
///
/// impl Handler for Ticket {
///     async fn handle(&self, mut stream: TcpStream, conn: Connection) -> std::io::Result<()> {
///         stream.write_all(format!("you are #{}\n", conn.id()).as_bytes()).await?;
///         stream.shutdown().await
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Serves the connection until it ends. Watch [`Connection::shutdown_requested`] to
    /// finish early when the server drains.
    fn handle(
        &self,
        stream: TcpStream,
        conn: Connection,
    ) -> impl Future<Output = io::Result<()>> + Send;
}
