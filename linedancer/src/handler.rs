//! The replaceable client handler: the low-level alternative to [`Protocol`] for users
//! who want the raw stream (a proxy, a protocol with its own I/O loop), like the
//! original's `{client_handler, M}` option; and [`Service`], what a server runs on each
//! connection: a raw handler or a protocol's driver.
//!
//! [`Protocol`]: crate::Protocol

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::cluster::ClusterLink;
use crate::connections::{AbortWatch, Connection};
use crate::transport::{self, Stream};

/// Serves one connection, given its stream.
///
/// The server calls [`handle`](Handler::handle) in a task of its own for every
/// connection, inside a tracing span with the connection's id and peer. The connection
/// ends when the future completes; an error is logged as the close reason. The stream
/// is whatever the connection runs over: a TCP socket from the server's listener, or
/// any [`Stream`] handed to [`ServerHandle::serve`](crate::ServerHandle::serve).
///
/// A handler's own fields are its state, shared by every connection (the server holds
/// it in an `Arc`).
///
/// ```
/// use linedancer::{Connection, Handler, Stream};
/// use tokio::io::AsyncWriteExt;
///
/// /// Tells the peer its connection id, then hangs up.
/// struct Ticket;
///
/// impl Handler for Ticket {
///     async fn handle<T: Stream>(&self, mut stream: T, conn: Connection) -> std::io::Result<()> {
///         stream.write_all(format!("you are #{}\n", conn.id()).as_bytes()).await?;
///         stream.shutdown().await
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Serves the connection until it ends. Watch [`Connection::shutdown_requested`] to
    /// finish early when the server drains.
    fn handle<T: Stream>(
        &self,
        stream: T,
        conn: Connection,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

/// What a server runs on each of its connections: a raw [`Handler`], or the
/// [`Driver`](crate::Driver) of a [`Protocol`](crate::Protocol). Implemented by
/// linedancer only; `Message` is the type the connections' mailboxes take, and so the
/// type of the server's [`ServerHandle`](crate::ServerHandle).
pub trait Service: sealed::Sealed + Send + Sync + 'static {
    /// What the connections' mailboxes take: the protocol's
    /// [`Message`](crate::Protocol::Message), or [`Infallible`] for a raw handler,
    /// whose connections take none.
    type Message: Send + 'static;

    /// Serves one connection until it ends.
    fn serve<T: Stream>(
        &self,
        stream: T,
        conn: Connection<Self::Message>,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// The cluster the server is on ([`Builder::cluster`](crate::Builder::cluster)).
    fn cluster(&self) -> Option<&ClusterLink<Self::Message>> {
        None
    }
}

impl<H: Handler> sealed::Sealed for H {}

impl<H: Handler> Service for H {
    type Message = Infallible;

    fn serve<T: Stream>(
        &self,
        stream: T,
        conn: Connection,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let stream = ResetOnAbort {
            watch: conn.abort_watch(),
            inner: stream,
        };
        self.handle(stream, conn)
    }
}

/// A raw handler's stream: itself, but dropped after the drain timeout has ended (the
/// handler ignored the shutdown, and its task is ended), a TCP connection is reset, so
/// that the peer can tell it was cut off, as the protocol driver does.
struct ResetOnAbort<T: Stream> {
    inner: T,
    watch: AbortWatch<Infallible>,
}

impl<T: Stream> Drop for ResetOnAbort<T> {
    fn drop(&mut self) {
        if self.watch.aborted() {
            transport::reset_on_close(&self.inner);
        }
    }
}

impl<T: Stream> AsyncRead for ResetOnAbort<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Stream> AsyncWrite for ResetOnAbort<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps [`Service`] linedancer's own.
pub(crate) mod sealed {
    /// Implemented by the types that may be a [`Service`](super::Service).
    pub trait Sealed {}
}
