//! The live set of connections: ids, the connection limit, the count, and graceful
//! shutdown of every connection task.
//!
//! A slot is a semaphore permit taken *before* `accept()`, so at the limit the acceptor
//! simply stops accepting (new peers wait in the kernel's backlog). The permit moves into
//! the connection task with a [`Slot`] guard whose drop frees it and lowers the count,
//! however the task ends.

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
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
    signal: Arc<Signal>,
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
    /// return. A handler still running a second after the drain timeout ends is
    /// dropped, which closes its socket.
    pub async fn shutdown_requested(&self) {
        poll_fn(|cx| self.signal.poll(cx, DRAIN)).await;
    }

    /// Whether the server has started a graceful shutdown.
    pub fn is_shutdown_requested(&self) -> bool {
        self.signal.is_raised(DRAIN)
    }

    /// Polls for the end of the drain timeout and, with `drain`, for the start of a
    /// graceful shutdown: one poll for both, as the driver waits for both.
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>, drain: bool) -> Poll<Shutdown> {
        let mask = if drain { DRAIN | ABORT } else { ABORT };
        self.signal.poll(cx, mask).map(|raised| {
            if raised & ABORT != 0 {
                Shutdown::Abort
            } else {
                Shutdown::Drain
            }
        })
    }
}

/// What the server asks of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shutdown {
    /// Finish: a graceful shutdown has begun.
    Drain,
    /// Close now: the drain timeout has ended.
    Abort,
}

/// How long a connection has to close after the drain timeout before its task is ended.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// [`Signal`] bit: the server is draining.
const DRAIN: u8 = 1;
/// [`Signal`] bit: the drain timeout has ended.
const ABORT: u8 = 2;

/// How the server tells one connection to drain or to close. Its task polls it on
/// every wake-up, so it costs an atomic load, not a lock: a cancellation token's
/// future takes a mutex on each poll, which showed as a fifth of the server's
/// instructions per echoed request.
#[derive(Debug, Default)]
struct Signal {
    raised: AtomicU8,
    /// The connection's task: the driver and the task's wrapper share one waker.
    waker: AtomicWaker,
}

impl Signal {
    fn raise(&self, bits: u8) {
        self.raised.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    fn is_raised(&self, bits: u8) -> bool {
        self.raised.load(Ordering::Acquire) & bits != 0
    }

    /// Ready with the raised bits of `mask` once any is raised.
    fn poll(&self, cx: &mut Context<'_>, mask: u8) -> Poll<u8> {
        let raised = self.raised.load(Ordering::Acquire) & mask;
        if raised != 0 {
            return Poll::Ready(raised);
        }
        self.waker.register(cx.waker());
        // Raised between the check and the registration: its wake found no waker.
        match self.raised.load(Ordering::Acquire) & mask {
            0 => Poll::Pending,
            raised => Poll::Ready(raised),
        }
    }
}

/// The connection set shared by the acceptor, the connection tasks and the handle.
#[derive(Debug)]
pub(crate) struct Connections {
    next_id: AtomicU64,
    /// Free slots: one permit per connection that may still be accepted.
    slots: Arc<Semaphore>,
    /// The live count.
    count: Count,
    /// The live connections, to drain or close them all.
    live: Mutex<HashMap<ConnectionId, Live, BuildHasherDefault<IdHasher>>>,
    /// The [`Signal`] bits raised for every connection so far, so that a connection
    /// that registers late still gets them.
    raised: AtomicU8,
    tasks: TaskTracker,
}

/// The live count: read with an atomic load, changed with an atomic add, and awaited
/// without polling. Waiters are counted so that a change wakes only when someone
/// waits: a watch channel's notification on every connect and close was the largest
/// cost of a short connection.
#[derive(Debug, Default)]
struct Count {
    value: AtomicUsize,
    waiters: AtomicUsize,
    changed: Notify,
}

impl Count {
    fn add(&self, delta: isize) {
        // Sequentially consistent with `wait_for`: either the waiter is counted here,
        // or it reads the new value after registering.
        // Wrapping addition: `-1 as usize` subtracts one.
        self.value.fetch_add(delta as usize, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    async fn wait_for(&self, mut ready: impl FnMut(usize) -> bool) -> usize {
        /// Uncounts the waiter however the wait ends.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiters);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let value = self.value.load(Ordering::SeqCst);
            if ready(value) {
                return value;
            }
            changed.await;
        }
    }
}

/// Hashes connection ids, distinct sequence numbers, with one multiplication (whose
/// high bits the map uses) instead of SipHash, which no peer can attack here.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What the set keeps of a live connection.
#[derive(Debug)]
struct Live {
    signal: Arc<Signal>,
    /// Its task, to end a handler that ignores the signal; set just after the spawn.
    task: Option<AbortHandle>,
}

/// A connection's claim on a slot; dropping it frees the slot and lowers the count.
#[derive(Debug)]
pub(crate) struct Slot {
    id: ConnectionId,
    connections: Arc<Connections>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.live().remove(&self.id);
        self.connections.count.add(-1);
    }
}

impl Connections {
    pub(crate) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Connections {
            next_id: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(max_connections)),
            count: Count::default(),
            live: Mutex::new(HashMap::default()),
            raised: AtomicU8::new(0),
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
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let signal = Arc::new(Signal::default());
        let live = Live {
            signal: Arc::clone(&signal),
            task: None,
        };
        self.live().insert(id, live);
        let raised = self.raised.load(Ordering::Acquire);
        if raised != 0 {
            signal.raise(raised);
        }
        self.count.add(1);
        let slot = Slot {
            id,
            connections: Arc::clone(self),
            _permit: permit,
        };
        let connection = Connection {
            id,
            peer_addr,
            local_addr,
            signal: Arc::clone(&signal),
        };
        let span = info_span!(
            "conn",
            id = id.0,
            peer = %peer_addr,
            state = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        let task = async move {
            info!("connection accepted");
            if let Err(e) = handler.handle(stream, connection).await {
                tracing::Span::current().record("reason", tracing::field::display(&e));
            }
            info!("connection closed");
            drop(slot);
        };
        let task = self.tasks.spawn(task.instrument(span)).abort_handle();
        // A task that has already ended has left the map, and needs no handle.
        if let Some(live) = self.live().get_mut(&id) {
            live.task = Some(task);
        }
    }

    /// The number of live connections.
    pub(crate) fn count(&self) -> usize {
        self.count.value.load(Ordering::SeqCst)
    }

    /// Waits until `ready` holds for the live count, and returns that count.
    pub(crate) async fn wait_count(&self, ready: impl FnMut(usize) -> bool) -> usize {
        self.count.wait_for(ready).await
    }

    /// Tells every connection that a graceful shutdown has begun.
    pub(crate) fn drain_all(&self) {
        self.raise_all(DRAIN);
    }

    /// Closes every connection now, and returns once all have ended. The driver
    /// closes at the signal, recording why; a raw handler that ignores it has its task
    /// ended after [`ABORT_GRACE`]. Ending tasks this way, rather than racing every
    /// handler against the signal, keeps the signal off the per-read path of handlers
    /// that watch it anyway.
    pub(crate) async fn abort_all(&self) {
        self.raise_all(ABORT);
        if tokio::time::timeout(ABORT_GRACE, self.wait_all())
            .await
            .is_ok()
        {
            return;
        }
        // Taken out first: an aborted task's slot takes the same lock when it drops.
        let stubborn: Vec<_> = (self.live().iter())
            .filter_map(|(id, live)| Some((*id, live.task.clone()?)))
            .collect();
        for (id, task) in stubborn {
            info!(
                id = id.0,
                "connection closed: server shutdown, its handler ignored it"
            );
            task.abort();
        }
        self.wait_all().await;
    }

    fn raise_all(&self, bit: u8) {
        self.raised.fetch_or(bit, Ordering::AcqRel);
        for live in self.live().values() {
            live.signal.raise(bit);
        }
    }

    /// The live connections' signals. A panic elsewhere cannot leave the map half
    /// changed, so a poisoned lock is used as it is.
    fn live(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Live, BuildHasherDefault<IdHasher>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every connection task has ended. Only meaningful once no more
    /// connections can be spawned.
    pub(crate) async fn wait_all(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}
