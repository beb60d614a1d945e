//! The live set of connections: ids, the connection limit, the count, and graceful
//! shutdown of every connection task.
//!
//! A slot is a semaphore permit taken *before* `accept()`, so at the limit the acceptor
//! simply stops accepting (new peers wait in the kernel's backlog). The permit moves into
//! the connection task with a [`Slot`] guard whose drop frees it and lowers the count,
//! however the task ends.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, Instrument};

use crate::handler::Handler;

/// A connection's id: unique within one server, in accept order, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a connection task knows about its connection, and how the server tells it to
/// finish. Handed to [`Handler::handle`].
#[derive(Debug)]
pub struct Connection {
    id: ConnectionId,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    drain: CancellationToken,
    abort: CancellationToken,
}

impl Connection {
    /// The connection's id, unique within the server.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The local address the peer connected to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Completes when the server starts a graceful shutdown: finish the conversation and
    /// return. A handler still running when the drain timeout ends is dropped, which
    /// closes its socket.
    pub async fn shutdown_requested(&self) {
        self.drain.cancelled().await;
    }

    /// Whether the server has started a graceful shutdown.
    pub fn is_shutdown_requested(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Completes when the drain timeout has ended and the connection must close now.
    pub(crate) fn aborted(&self) -> WaitForCancellationFuture<'_> {
        self.abort.cancelled()
    }
}

/// The connection set shared by the acceptor, the connection tasks and the handle.
#[derive(Debug)]
pub(crate) struct Connections {
    next_id: AtomicU64,
    /// Free slots: one permit per connection that may still be accepted.
    slots: Arc<Semaphore>,
    /// The live count, watchable so that callers can await a value instead of polling.
    count: watch::Sender<usize>,
    /// Cancelled when a graceful shutdown begins.
    drain: CancellationToken,
    /// Cancelled when the drain timeout ends: every connection still open is closed.
    abort: CancellationToken,
    tasks: TaskTracker,
}

/// A connection's claim on a slot; dropping it frees the slot and lowers the count.
#[derive(Debug)]
pub(crate) struct Slot {
    connections: Arc<Connections>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.count.send_modify(|n| *n -= 1);
    }
}

impl Connections {
    pub(crate) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Connections {
            next_id: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(max_connections)),
            count: watch::Sender::new(0),
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Waits for a free slot, to hold while accepting. Dropping the permit frees it.
    pub(crate) async fn reserve(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed")
    }

    /// Runs `handler` on an accepted socket in a task of its own, inside a span that
    /// carries the connection id, peer address, state and close reason.
    pub(crate) fn spawn<H: Handler>(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        stream: TcpStream,
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
        handler: Arc<H>,
    ) {
        self.count.send_modify(|n| *n += 1);
        let slot = Slot {
            connections: Arc::clone(self),
            _permit: permit,
        };
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let connection = Connection {
            id,
            peer_addr,
            local_addr,
            drain: self.drain.clone(),
            abort: self.abort.clone(),
        };
        let abort = self.abort.clone();
        let span = info_span!(
            "conn",
            id = id.0,
            peer = %peer_addr,
            state = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        let task = async move {
            info!("connection accepted");
            tokio::select! {
                // The handler first: the driver closes by itself on abort, and should
                // get to record why.
                biased;
                result = handler.handle(stream, connection) => {
                    if let Err(e) = result {
                        tracing::Span::current().record("reason", tracing::field::display(&e));
                    }
                }
                // A handler that ignores the drain is dropped here, closing its socket.
                () = abort.cancelled() => {
                    tracing::Span::current().record("reason", "server shutdown");
                }
            }
            info!("connection closed");
            drop(slot);
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// The number of live connections.
    pub(crate) fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until `ready` holds for the live count, and returns that count.
    pub(crate) async fn wait_count(&self, mut ready: impl FnMut(usize) -> bool) -> usize {
        let mut count = self.count.subscribe();
        let waited = count.wait_for(|n| ready(*n)).await.map(|n| *n);
        // `self` owns the sender, so the wait cannot fail; answer the count regardless.
        waited.unwrap_or_else(|_| self.count())
    }

    /// The token a connection watches for the start of a graceful shutdown.
    pub(crate) fn drain(&self) -> &CancellationToken {
        &self.drain
    }

    /// The token cancelled when the drain timeout ends.
    pub(crate) fn abort(&self) -> &CancellationToken {
        &self.abort
    }

    /// Waits until every connection task has ended. Only meaningful once no more
    /// connections can be spawned.
    pub(crate) async fn wait_all(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}
