//! The live set of connections: ids, the connection limit, the count, and graceful
//! shutdown of every connection task.
//!
//! A slot is a semaphore permit, taken by the acceptor for the connection it has just
//! accepted (at the limit, that one connection waits for a slot and the acceptor
//! accepts no other: new peers wait in the kernel's backlog) or by a stream handed to
//! the server. Only a connection in hand takes one: an acceptor holding a slot while it
//! waited for a connection could keep the last one from a client queued at another of
//! the per-core sockets. The permit moves into the connection task with a [`Slot`]
//! guard whose drop frees it and lowers the count, however the task ends.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::poll_fn;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use futures_util::future::CatchUnwind;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use pin_project_lite::pin_project;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn};

use crate::close::CloseReason;
use crate::stats::{AcceptError, Counters, Stats, Traffic, TrafficCounts};
use crate::transport::proxy::ProxyHeader;
use crate::transport::tls::TlsInfo;
use crate::transport::{Address, PeerCredentials, TransportInfo};

/// A connection's id: unique within one server, in accept order, starting at 1. On a
/// [cluster](crate::cluster), the top 16 bits are the node's tag, and ids are unique
/// across the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// The tag of the cluster node the connection is on (its top 16 bits); 0 for a
    /// server outside a cluster.
    pub fn node_tag(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// The connection's number on its node (its low 48 bits): 1 for the first.
    pub fn number(self) -> u64 {
        self.0 & ((1 << 48) - 1)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a connection task knows about its connection, and how the server tells it to
/// finish. Handed to [`Handler::handle`](crate::Handler::handle).
///
/// `M` is the type of message its mailbox takes: a protocol's
/// [`Message`](crate::Protocol::Message) for the protocol driver, and [`Infallible`]
/// (no mailbox) for a raw handler.
pub struct Connection<M = Infallible> {
    id: ConnectionId,
    local_addr: Address,
    /// The TLS handshake's outcome and the PROXY header, if the server has them.
    transport: Option<Arc<TransportInfo>>,
    shared: Arc<Shared<M>>,
    connections: Arc<Connections<M>>,
}

impl<M> fmt::Debug for Connection<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("peer_addr", self.shared.peer())
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl<M> Connection<M> {
    /// The connection's id, unique within the server.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// The peer's address: with the PROXY protocol
    /// ([`Builder::proxy_protocol`](crate::Builder::proxy_protocol)), the client's
    /// address from the header (the load balancer's for a `LOCAL` header or one that
    /// gives none).
    pub fn peer_addr(&self) -> &Address {
        self.shared.peer()
    }

    /// What the TLS handshake settled (SNI name, ALPN protocol), on a server with TLS
    /// ([`Builder::tls`](crate::Builder::tls)).
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.transport.as_ref()?.tls.as_ref()
    }

    /// The connection's PROXY protocol header, on a server that takes one
    /// ([`Builder::proxy_protocol`](crate::Builder::proxy_protocol)).
    pub fn proxy_header(&self) -> Option<&ProxyHeader> {
        self.transport.as_ref()?.proxy.as_ref()
    }

    /// The process at the other end, on a Unix socket: its user, group and process id.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.transport.as_ref()?.credentials
    }

    /// The TLS handshake's outcome and the PROXY header, for the protocol driver.
    pub(crate) fn transport(&self) -> Option<&Arc<TransportInfo>> {
        self.transport.as_ref()
    }

    /// Takes the peer's address from its PROXY header (unless the header gives none),
    /// for the connection's listing and its span.
    pub(crate) fn set_peer_from(&self, header: &ProxyHeader) {
        let peer = match header.source() {
            Address::None => self.shared.peer_addr.clone(),
            source => source.clone(),
        };
        tracing::Span::current().record("peer", tracing::field::display(&peer));
        let _ = self.shared.proxied_peer.set(peer);
    }

    /// Records what the connection's transport settled, before it is served.
    pub(crate) fn set_transport(&mut self, transport: TransportInfo) {
        self.transport = Some(Arc::new(transport));
    }

    /// The local address the peer connected to.
    pub fn local_addr(&self) -> &Address {
        &self.local_addr
    }

    /// The server's per-connection limits, which the protocol driver enforces and a raw
    /// handler may apply as it sees fit.
    pub fn limits(&self) -> Limits {
        self.connections.limits
    }

    /// Records the bytes read from and written to the peer so far (totals, not
    /// increments), for [`Stats`] and connection listings. The protocol driver does
    /// this itself; a raw handler that wants its bytes counted calls it.
    pub fn record_bytes(&self, bytes_in: u64, bytes_out: u64) {
        self.shared.bytes.set_bytes(bytes_in, bytes_out);
    }

    /// Records the traffic so far (totals), and the bytes of replies waiting to be
    /// written: the protocol driver's counts.
    pub(crate) fn record_traffic(&self, traffic: Traffic, queued: usize) {
        self.shared.bytes.set(traffic);
        self.shared.bytes.set_queued(queued);
    }

    /// Records why the connection is ending, for the log and [`Stats`]; the protocol
    /// driver knows better than its `Ok(())`.
    pub(crate) fn record_close(&self, reason: CloseReason) {
        *lock(&self.shared.reason) = Some(reason);
    }

    /// Completes when the server starts a graceful shutdown: finish the conversation and
    /// return. A handler still running a second after the drain timeout ends is
    /// dropped, which closes its socket.
    pub async fn shutdown_requested(&self) {
        poll_fn(|cx| self.shared.signal.poll(cx, DRAIN)).await;
    }

    /// Whether the server has started a graceful shutdown.
    pub fn is_shutdown_requested(&self) -> bool {
        self.shared.signal.is_raised(DRAIN)
    }

    /// Watches for the end of the drain timeout, apart from the connection.
    pub(crate) fn abort_watch(&self) -> AbortWatch<M> {
        AbortWatch(Arc::clone(&self.shared))
    }

    /// Polls for the end of the drain timeout.
    pub(crate) fn poll_abort(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.signal.poll(cx, ABORT).map(drop)
    }

    /// Polls for what the server and other connections ask of this one: one poll for
    /// all, as the driver waits for all. With `drain`, the start of a graceful shutdown
    /// is among them. `registered` is kept by the caller from one poll to the next; see
    /// [`Signal::poll_registered`].
    pub(crate) fn poll_event(
        &self,
        cx: &mut Context<'_>,
        drain: bool,
        registered: &mut Option<Waker>,
    ) -> Poll<Event> {
        let mask = if drain {
            DRAIN | ABORT | MAIL | OVERFLOW | KICK
        } else {
            ABORT | MAIL | OVERFLOW | KICK
        };
        let signal = &self.shared.signal;
        signal.poll_registered(cx, mask, registered).map(|raised| {
            if raised & ABORT != 0 {
                Event::Abort
            } else if raised & KICK != 0 {
                Event::Kick
            } else if raised & OVERFLOW != 0 {
                Event::Overflow
            } else if raised & DRAIN != 0 {
                Event::Drain
            } else {
                Event::Mail
            }
        })
    }

    /// Takes the messages waiting in the mailbox, oldest first.
    pub(crate) fn take_mail(&self) -> VecDeque<M> {
        // Lowered first: a message sent meanwhile raises it again.
        self.shared.signal.lower(MAIL);
        std::mem::take(&mut *lock(&self.shared.mailbox))
    }

    /// Records the protocol's state, for connection listings.
    pub(crate) fn record_state(&self, state: &'static str) {
        *lock(&self.shared.state) = state;
    }

    /// The connection set, to message and group other connections.
    pub(crate) fn connections(&self) -> &Connections<M> {
        &self.connections
    }
}

/// Tells whether the drain timeout has ended for a connection: what a raw handler's
/// stream checks as it is dropped.
pub(crate) struct AbortWatch<M>(Arc<Shared<M>>);

impl<M> AbortWatch<M> {
    /// Whether the drain timeout has ended with the connection still open.
    pub(crate) fn aborted(&self) -> bool {
        self.0.signal.is_raised(ABORT)
    }
}

/// What the server or other connections ask of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Close now: the drain timeout has ended.
    Abort,
    /// Close: more messages were sent than the mailbox holds.
    Overflow,
    /// Close: asked from outside ([`Connections::kick`]).
    Kick,
    /// Finish: a graceful shutdown has begun.
    Drain,
    /// Messages wait in the mailbox.
    Mail,
}

/// A live connection, as [`ServerHandle::connections_info`](crate::ServerHandle::connections_info)
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The connection's id.
    pub id: ConnectionId,
    /// The peer's address.
    pub peer_addr: Address,
    /// The protocol's state name ([`Protocol::state_name`](crate::Protocol::state_name));
    /// empty for a raw handler.
    pub state: &'static str,
    /// When the connection was accepted.
    pub since: SystemTime,
    /// Bytes read from the peer so far (by the protocol driver).
    pub bytes_in: u64,
    /// Bytes written to the peer so far (by the protocol driver).
    pub bytes_out: u64,
    /// Frames decoded so far (by the protocol driver), as of its last write or its
    /// close.
    pub frames_in: u64,
    /// Replies encoded so far (by the protocol driver), likewise.
    pub replies_out: u64,
    /// Bytes of replies waiting to be written: a peer that reads slowly has many.
    pub output_queued: u64,
    /// Messages waiting in its mailbox.
    pub mailbox: usize,
    /// The address it connected to: which of the server's listeners.
    pub local_addr: Address,
}

/// How many live connections are in each protocol state (`""` for raw handlers), and
/// on each listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Census {
    pub(crate) states: HashMap<&'static str, usize>,
    pub(crate) listeners: Vec<(Address, usize)>,
}

/// Why a message could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No such connection is open: it has ended, or never existed.
    #[error("connection {0} is not open")]
    NotOpen(ConnectionId),
    /// The connection's mailbox was full: the message is dropped, and the connection
    /// is closed ([`CloseReason::MailboxOverflow`]).
    #[error("the mailbox of connection {0} is full; it is being closed")]
    MailboxFull(ConnectionId),
}

/// The limits every connection of a server runs under; see the [`Builder`] methods of
/// the same names.
///
/// [`Builder`]: crate::Builder
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Close a connection when no bytes arrive for this long; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Close a connection when a frame it has begun is not complete after this long.
    pub frame_timeout: Duration,
    /// Close a connection whose peer takes none of a pending reply for this long.
    pub send_timeout: Duration,
    /// Close a connection with more than this many bytes of replies waiting to be
    /// written.
    pub max_output: usize,
    /// Close a connection with more than this many messages waiting in its mailbox.
    pub mailbox_capacity: usize,
}

/// What a connection's task shares with the connection set.
///
/// The task reads `signal` and writes `bytes` on every wake-up: they come first
/// (`repr(C)`), together. (Aligning them to a cache line of their own made every
/// connection's allocation an aligned one, which cost glibc's allocator more than the
/// line saved.)
#[repr(C)]
struct Shared<M> {
    signal: Signal,
    bytes: TrafficCounts,
    /// The listener's address.
    local_addr: Address,
    /// Set by the protocol driver as the connection ends.
    reason: Mutex<Option<CloseReason>>,
    /// Messages not yet taken by the connection's task; no allocation while empty.
    mailbox: Mutex<VecDeque<M>>,
    /// The socket's peer.
    peer_addr: Address,
    /// The client's address from the PROXY header, once read.
    proxied_peer: OnceLock<Address>,
    since: SystemTime,
    /// The protocol's state name, for listings.
    state: Mutex<&'static str>,
}

impl<M> Shared<M> {
    /// Puts `message` in the mailbox, unless it already holds `capacity`: then the
    /// connection is told to close instead.
    fn post(&self, message: M, capacity: usize) -> bool {
        let mut mailbox = lock(&self.mailbox);
        if mailbox.len() >= capacity {
            drop(mailbox);
            self.signal.raise(OVERFLOW);
            return false;
        }
        mailbox.push_back(message);
        drop(mailbox);
        self.signal.raise(MAIL);
        true
    }

    /// The peer's address: the client's from the PROXY header, once read.
    fn peer(&self) -> &Address {
        self.proxied_peer.get().unwrap_or(&self.peer_addr)
    }

    fn info(&self, id: ConnectionId) -> ConnectionInfo {
        let traffic = self.bytes.get();
        ConnectionInfo {
            id,
            peer_addr: self.peer().clone(),
            state: *lock(&self.state),
            since: self.since,
            bytes_in: traffic.read,
            bytes_out: traffic.written,
            frames_in: traffic.frames,
            replies_out: traffic.replies,
            output_queued: self.bytes.queued(),
            mailbox: lock(&self.mailbox).len(),
            local_addr: self.local_addr.clone(),
        }
    }
}

/// How long a connection opened at `since` has lived.
fn lifetime(since: SystemTime) -> Duration {
    since.elapsed().unwrap_or_default()
}

/// How long a connection has to close after the drain timeout before its task is ended.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// [`Signal`] bit: the server is draining.
const DRAIN: u8 = 1;
/// [`Signal`] bit: the drain timeout has ended.
const ABORT: u8 = 2;
/// [`Signal`] bit: messages wait in the mailbox.
const MAIL: u8 = 4;
/// [`Signal`] bit: a message found the mailbox full.
const OVERFLOW: u8 = 8;
/// [`Signal`] bit: closed from outside ([`Connections::kick`]).
const KICK: u8 = 16;

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

    fn lower(&self, bits: u8) {
        self.raised.fetch_and(!bits, Ordering::AcqRel);
    }

    fn is_raised(&self, bits: u8) -> bool {
        self.raised.load(Ordering::Acquire) & bits != 0
    }

    /// Ready with the raised bits of `mask` once any is raised.
    fn poll(&self, cx: &mut Context<'_>, mask: u8) -> Poll<u8> {
        self.poll_registered(cx, mask, &mut None)
    }

    /// As [`poll`](Self::poll), for a poller that keeps `registered` across its polls
    /// and so registers its waker once rather than on every poll: the driver polls on
    /// every wake-up, and a registration is two read-modify-writes.
    ///
    /// `registered` holds the waker once it is registered with no bit raised. Every bit
    /// is raised before the waker is woken (and so taken out), and a bit is lowered
    /// only after a poll has seen it; so while no bit is raised, no wake has happened
    /// since, and the registration still stands. Seeing any bit forgets it.
    fn poll_registered(
        &self,
        cx: &mut Context<'_>,
        mask: u8,
        registered: &mut Option<Waker>,
    ) -> Poll<u8> {
        let raised = self.raised.load(Ordering::Acquire);
        if raised == 0 {
            if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
        } else {
            *registered = None;
            if raised & mask != 0 {
                return Poll::Ready(raised & mask);
            }
        }
        self.waker.register(cx.waker());
        // Raised between the check and the registration: its wake found no waker.
        match self.raised.load(Ordering::Acquire) {
            0 => {
                *registered = Some(cx.waker().clone());
                Poll::Pending
            }
            raised if raised & mask == 0 => Poll::Pending,
            raised => Poll::Ready(raised & mask),
        }
    }
}

/// The connection set shared by the acceptor, the connection tasks and the handle;
/// `M` is the type of message the mailboxes take.
pub(crate) struct Connections<M> {
    next_id: AtomicU64,
    /// The first id: 1, or on a cluster the node's first.
    first_id: u64,
    /// Free slots: one permit per connection that may still be accepted.
    slots: Arc<Semaphore>,
    /// The connection limit, changed under this lock.
    max: Mutex<usize>,
    /// Permits to take out of use as they come back, after the limit was lowered below
    /// the connections then open.
    excess: AtomicUsize,
    /// The live count.
    count: Count,
    /// The live connections, to drain or close them all.
    live: Mutex<HashMap<ConnectionId, Live<M>, BuildHasherDefault<IdHasher>>>,
    /// The [`Signal`] bits raised for every connection so far, so that a connection
    /// that registers late still gets them.
    raised: AtomicU8,
    limits: Limits,
    /// The members of each group. Whoever needs both locks takes `live`'s first.
    groups: Mutex<HashMap<Arc<str>, HashSet<ConnectionId>>>,
    /// The cluster, if the server is on one: broadcasts, messages and membership
    /// changes go to it as well.
    remote: OnceLock<Arc<dyn Remote<M>>>,
    counters: Counters,
    tasks: TaskTracker,
}

/// The live count: read with an atomic load, changed with an atomic add, and awaited
/// without polling. Waiters are counted so that a change wakes only when someone
/// waits: a watch channel's notification on every connect and close was the largest
/// cost of a short connection.
#[derive(Debug, Default)]
struct Count {
    value: AtomicUsize,
    /// The highest value so far.
    peak: AtomicUsize,
    waiters: AtomicUsize,
    changed: Notify,
}

impl Count {
    fn add(&self, delta: isize) {
        // Sequentially consistent with `wait_for`: either the waiter is counted here,
        // or it reads the new value after registering.
        // Wrapping addition: `-1 as usize` subtracts one.
        let value =
            (self.value.fetch_add(delta as usize, Ordering::SeqCst)).wrapping_add(delta as usize);
        // A load first: the read-modify-write only happens at a new peak.
        if delta > 0 && value > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(value, Ordering::Relaxed);
        }
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
struct Live<M> {
    shared: Arc<Shared<M>>,
    /// Its task, to end a handler that ignores the signal; set just after the spawn.
    task: Option<AbortHandle>,
    /// The groups it has joined.
    groups: Vec<Arc<str>>,
}

/// A free slot, taken for a connection about to be spawned; dropping it gives the slot back.
pub(crate) struct Reservation<'a, M> {
    connections: &'a Connections<M>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<M> Drop for Reservation<'_, M> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.connections.release(permit);
        }
    }
}

/// A connection's claim on a slot. Dropping it frees the slot, lowers the count and
/// counts the close, for the reason set in `reason` or, if none was (the task was
/// ended), [`CloseReason::Shutdown`].
struct Slot<M> {
    id: ConnectionId,
    connections: Arc<Connections<M>>,
    shared: Arc<Shared<M>>,
    permit: Option<OwnedSemaphorePermit>,
    reason: Option<CloseReason>,
}

impl<M> Drop for Slot<M> {
    fn drop(&mut self) {
        let connections = &self.connections;
        let live = connections.live().remove(&self.id);
        if let Some(live) = live.filter(|live| !live.groups.is_empty()) {
            let mut groups = lock(&connections.groups);
            for group in &live.groups {
                Connections::<M>::left(&mut groups, group, self.id);
            }
            drop(groups);
            if let Some(remote) = connections.remote.get() {
                for group in &live.groups {
                    remote.left(group, self.id);
                }
            }
        }
        let reason = self.reason.take().unwrap_or(CloseReason::Shutdown);
        connections.counters.closed(
            &reason,
            self.shared.bytes.get(),
            lifetime(self.shared.since),
        );
        connections.count.add(-1);
        if let Some(permit) = self.permit.take() {
            connections.release(permit);
        }
    }
}

impl<M> Slot<M> {
    /// The connection's handler has returned, or panicked: logs why the connection
    /// ended, in its span, for the drop to count.
    fn end(&mut self, served: Result<io::Result<()>, Box<dyn Any + Send>>) {
        let reason = match served {
            Ok(Ok(())) => lock(&self.shared.reason)
                .take()
                .unwrap_or(CloseReason::Closed),
            Ok(Err(e)) => CloseReason::from_io(&e),
            Err(panic) => CloseReason::Panic(panic_message(&*panic)),
        };
        tracing::Span::current().record("reason", tracing::field::display(&reason));
        if let CloseReason::Panic(_) = reason {
            warn!("connection closed");
        } else {
            debug!("connection closed");
        }
        self.reason = Some(reason);
    }
}

pin_project! {
    /// A connection's task: its handler's future, with panics caught, run in the
    /// connection's span, and its slot, which the task drops however it ends. A named
    /// future rather than an `async` block, so that the task holds the handler's future
    /// once; `repr(C)`, so that the span, which every poll reads, lies next to the
    /// start of the handler's future rather than past its end.
    #[repr(C)]
    struct ConnectionTask<F, M> {
        span: tracing::Span,
        #[pin]
        served: CatchUnwind<AssertUnwindSafe<F>>,
        slot: Slot<M>,
    }
}

impl<F: Future<Output = io::Result<()>>, M> Future for ConnectionTask<F, M> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let _in_span = this.span.enter();
        let served = ready!(this.served.poll(cx));
        this.slot.end(served);
        Poll::Ready(())
    }
}

impl<M> fmt::Debug for Connections<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connections")
            .field("open", &self.count())
            .field("max", &self.max())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<M> Connections<M> {
    /// A set whose ids start at `first_id`.
    pub(crate) fn new(max_connections: usize, limits: Limits, first_id: u64) -> Arc<Self> {
        Arc::new(Connections {
            next_id: AtomicU64::new(first_id),
            first_id,
            slots: Arc::new(Semaphore::new(max_connections)),
            max: Mutex::new(max_connections),
            excess: AtomicUsize::new(0),
            count: Count::default(),
            live: Mutex::new(HashMap::default()),
            raised: AtomicU8::new(0),
            limits,
            groups: Mutex::new(HashMap::new()),
            remote: OnceLock::new(),
            counters: Counters::default(),
            tasks: TaskTracker::new(),
        })
    }

    /// A free slot, if there is one now.
    pub(crate) fn try_reserve(&self) -> Option<Reservation<'_, M>> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(Reservation {
            connections: self,
            permit: Some(permit),
        })
    }

    /// Waits for a free slot. Slots go in the order they were asked for.
    pub(crate) async fn reserve(&self) -> Reservation<'_, M> {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        Reservation {
            connections: self,
            permit: Some(permit),
        }
    }

    /// Gives a slot back, or takes it out of use if the limit has been lowered.
    fn release(&self, permit: OwnedSemaphorePermit) {
        let owed = self.excess.load(Ordering::Relaxed) > 0
            && (self.excess)
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        if owed {
            permit.forget();
        }
    }

    /// The connection limit.
    pub(crate) fn max(&self) -> usize {
        *lock(&self.max)
    }

    /// Changes the connection limit. Raised, the acceptor goes on at once if it was
    /// waiting for a slot; lowered below the connections open, none is closed, and no
    /// more are accepted until enough have ended.
    pub(crate) fn set_max(&self, new: usize) {
        let mut max = lock(&self.max);
        if new > *max {
            let mut grow = new - *max;
            // Slots still owed from an earlier lowering are forgiven first.
            if let Ok(owed) = (self.excess).fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n - n.min(grow))
            }) {
                grow -= owed.min(grow);
            }
            self.slots.add_permits(grow);
        } else {
            let shrink = *max - new;
            let forgotten = self.slots.forget_permits(shrink);
            self.excess.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
        *max = new;
    }

    /// Runs `serve` on a new connection in a task of its own, inside a span that
    /// carries the connection id, peer address, state and close reason; returns the
    /// connection's id. With `proxied`, the connection starts with a PROXY header that
    /// will give the peer's address: until then, the span names `peer_addr` as `proxy`.
    pub(crate) fn spawn<F, S>(
        self: &Arc<Self>,
        mut reservation: Reservation<'_, M>,
        peer_addr: Address,
        local_addr: Address,
        proxied: bool,
        serve: F,
    ) -> ConnectionId
    where
        F: FnOnce(Connection<M>) -> S + Send + 'static,
        S: Future<Output = io::Result<()>> + Send + 'static,
        M: Send + 'static,
    {
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let shared = Arc::new(Shared {
            signal: Signal::default(),
            bytes: TrafficCounts::default(),
            local_addr: local_addr.clone(),
            reason: Mutex::new(None),
            mailbox: Mutex::new(VecDeque::new()),
            peer_addr: peer_addr.clone(),
            proxied_peer: OnceLock::new(),
            since: SystemTime::now(),
            state: Mutex::new(""),
        });
        let live = Live {
            shared: Arc::clone(&shared),
            task: None,
            groups: Vec::new(),
        };
        self.live().insert(id, live);
        let raised = self.raised.load(Ordering::Acquire);
        if raised != 0 {
            shared.signal.raise(raised);
        }
        self.count.add(1);
        let slot = Slot {
            id,
            connections: Arc::clone(self),
            shared: Arc::clone(&shared),
            permit: reservation.permit.take(),
            reason: None,
        };
        let connection = Connection {
            id,
            local_addr,
            transport: None,
            shared,
            connections: Arc::clone(self),
        };
        let span = info_span!(
            "conn",
            id = id.0,
            peer = tracing::field::Empty,
            proxy = tracing::field::Empty,
            state = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        // A proxied connection's peer is known once its header is read.
        let field = if proxied { "proxy" } else { "peer" };
        span.record(field, tracing::field::display(&peer_addr));
        span.in_scope(|| debug!("connection accepted"));
        // The handler is called in the task, so that a panic while making its future is
        // caught like one while polling it.
        let task = ConnectionTask {
            span,
            served: AssertUnwindSafe(async move { serve(connection).await }).catch_unwind(),
            slot,
        };
        let task = self.tasks.spawn(task).abort_handle();
        // A task that has already ended has left the map, and needs no handle.
        if let Some(live) = self.live().get_mut(&id) {
            live.task = Some(task);
        }
        id
    }

    /// The number of live connections.
    pub(crate) fn count(&self) -> usize {
        self.count.value.load(Ordering::SeqCst)
    }

    /// Waits until `ready` holds for the live count, and returns that count.
    pub(crate) async fn wait_count(&self, ready: impl FnMut(usize) -> bool) -> usize {
        self.count.wait_for(ready).await
    }

    /// Counts a failed `accept()`.
    pub(crate) fn accept_error(&self, class: AcceptError) {
        self.counters.accept_error(class);
    }

    /// Counts a connection accepted at the connection limit.
    pub(crate) fn limit_wait(&self) {
        self.counters.limit_wait();
    }

    /// The server's counters now.
    pub(crate) fn stats(&self) -> Stats {
        let mut live = Traffic::default();
        for connection in self.live().values() {
            live += connection.shared.bytes.get();
        }
        self.counters.snapshot(
            self.next_id.load(Ordering::Relaxed) - self.first_id,
            self.count(),
            self.count.peak.load(Ordering::Relaxed),
            live,
        )
    }

    /// Ties the set to a cluster; once, before the first connection.
    pub(crate) fn set_remote(&self, remote: Arc<dyn Remote<M>>) {
        // Set once, by the server's start.
        let _ = self.remote.set(remote);
    }

    /// Puts a message in the mailbox of connection `to`, which may be on another node
    /// of the cluster: then it goes to the bus, and `Ok` says no more than that.
    pub(crate) fn post(&self, to: ConnectionId, message: M) -> Result<(), SendError> {
        if let Some(remote) = self.remote.get().filter(|r| !r.is_local(to)) {
            remote.send_to(to, &message);
            return Ok(());
        }
        self.post_local(to, message)
    }

    /// Puts a message in the mailbox of connection `to` of this server.
    pub(crate) fn post_local(&self, to: ConnectionId, message: M) -> Result<(), SendError> {
        let shared = match self.live().get(&to) {
            Some(live) => Arc::clone(&live.shared),
            None => return Err(SendError::NotOpen(to)),
        };
        if shared.post(message, self.limits.mailbox_capacity) {
            Ok(())
        } else {
            Err(SendError::MailboxFull(to))
        }
    }

    /// Puts a message made by `make` in the mailbox of every member of `group` but
    /// `except`, and sends one to the cluster's other nodes; returns how many local
    /// members took one. Members whose mailbox is full are closed.
    pub(crate) fn broadcast(
        &self,
        group: &str,
        make: &dyn Fn() -> M,
        except: Option<ConnectionId>,
    ) -> usize {
        if let Some(remote) = self.remote.get() {
            remote.broadcast(group, &make(), except);
        }
        self.broadcast_local(group, make, except)
    }

    /// As [`broadcast`](Self::broadcast), to this server's members only.
    pub(crate) fn broadcast_local(
        &self,
        group: &str,
        make: &dyn Fn() -> M,
        except: Option<ConnectionId>,
    ) -> usize {
        // One lock at a time: `join` and `leave` take the live map's, then the
        // groups'.
        let ids: Vec<ConnectionId> = match lock(&self.groups).get(group) {
            Some(ids) => ids
                .iter()
                .copied()
                .filter(|id| Some(*id) != except)
                .collect(),
            None => return 0,
        };
        let members: Vec<Arc<Shared<M>>> = {
            let live = self.live();
            (ids.iter())
                .filter_map(|id| Some(Arc::clone(&live.get(id)?.shared)))
                .collect()
        };
        let capacity = self.limits.mailbox_capacity;
        members
            .iter()
            .filter(|member| member.post(make(), capacity))
            .count()
    }

    /// Adds connection `id` to `group`; on a cluster, under `label` (joining again
    /// changes the label).
    pub(crate) fn join(&self, id: ConnectionId, group: Arc<str>, label: Option<Arc<str>>) {
        let mut live = self.live();
        let Some(entry) = live.get_mut(&id) else {
            return;
        };
        if !entry.groups.contains(&group) {
            entry.groups.push(Arc::clone(&group));
            lock(&self.groups)
                .entry(Arc::clone(&group))
                .or_default()
                .insert(id);
        }
        drop(live);
        if let Some(remote) = self.remote.get() {
            remote.joined(&group, id, label.unwrap_or_else(|| "".into()));
        }
    }

    /// Takes connection `id` out of `group`.
    pub(crate) fn leave(&self, id: ConnectionId, group: &str) {
        let mut live = self.live();
        let Some(entry) = live.get_mut(&id) else {
            return;
        };
        let before = entry.groups.len();
        entry.groups.retain(|g| &**g != group);
        if entry.groups.len() == before {
            return;
        }
        Self::left(&mut lock(&self.groups), group, id);
        drop(live);
        if let Some(remote) = self.remote.get() {
            remote.left(group, id);
        }
    }

    /// Takes `id` out of `group` in `groups`, and forgets a group left empty.
    fn left(groups: &mut HashMap<Arc<str>, HashSet<ConnectionId>>, group: &str, id: ConnectionId) {
        if let Some(members) = groups.get_mut(group) {
            members.remove(&id);
            if members.is_empty() {
                groups.remove(group);
            }
        }
    }

    /// The members of `group`, in id order.
    pub(crate) fn members(&self, group: &str) -> Vec<ConnectionId> {
        let mut members: Vec<_> = lock(&self.groups)
            .get(group)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        members.sort_unstable();
        members
    }

    /// The live connections, in id order.
    pub(crate) fn list(&self) -> Vec<ConnectionInfo> {
        let mut list: Vec<_> = (self.snapshot().iter())
            .map(|(id, shared)| shared.info(*id))
            .collect();
        list.sort_unstable_by_key(|info| info.id);
        list
    }

    /// The live connections' shared parts, taken under the lock and read after it, so
    /// that a listing of thousands holds up no connection's opening or closing.
    fn snapshot(&self) -> Vec<(ConnectionId, Arc<Shared<M>>)> {
        (self.live().iter())
            .map(|(id, live)| (*id, Arc::clone(&live.shared)))
            .collect()
    }

    /// Closes connection `id` from outside: the protocol driver closes it at once
    /// (its protocol's `closed` is called); a raw handler that has not returned a
    /// second later has its task ended. Returns whether it was open.
    pub(crate) fn kick(self: &Arc<Self>, id: ConnectionId) -> bool
    where
        M: Send + 'static,
    {
        let live = self.live();
        let Some(connection) = live.get(&id) else {
            return false;
        };
        *lock(&connection.shared.reason) = Some(CloseReason::Kicked);
        connection.shared.signal.raise(KICK);
        if let Some(task) = connection.task.clone() {
            let connections = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(ABORT_GRACE).await;
                let open = connections
                    .upgrade()
                    .is_some_and(|c| c.live().contains_key(&id));
                if open {
                    task.abort();
                }
            });
        }
        true
    }

    /// How many live connections are in each protocol state, and on each listener.
    pub(crate) fn census(&self) -> Census {
        let mut census = Census::default();
        for (_, shared) in self.snapshot() {
            let state = *lock(&shared.state);
            *census.states.entry(state).or_default() += 1;
            let listener = &shared.local_addr;
            match census
                .listeners
                .iter_mut()
                .find(|(addr, _)| addr == listener)
            {
                Some((_, count)) => *count += 1,
                None => census.listeners.push((listener.clone(), 1)),
            }
        }
        census
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
            debug!(
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
            live.shared.signal.raise(bit);
        }
    }

    /// The live connections.
    fn live(&self) -> MutexGuard<'_, HashMap<ConnectionId, Live<M>, BuildHasherDefault<IdHasher>>> {
        lock(&self.live)
    }

    /// Waits until every connection task has ended. Only meaningful once no more
    /// connections can be spawned.
    pub(crate) async fn wait_all(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What carries broadcasts, messages and membership beyond this server: its cluster.
pub(crate) trait Remote<M>: Send + Sync {
    /// Whether connection `id` is on this node.
    fn is_local(&self, id: ConnectionId) -> bool;
    /// Sends a broadcast to `group` to the other nodes.
    fn broadcast(&self, group: &str, message: &M, except: Option<ConnectionId>);
    /// Sends a message to connection `to`, on another node.
    fn send_to(&self, to: ConnectionId, message: &M);
    /// A local connection joined `group` under `label`, or changed its label.
    fn joined(&self, group: &Arc<str>, id: ConnectionId, label: Arc<str>);
    /// A local connection left `group`.
    fn left(&self, group: &str, id: ConnectionId);
}

/// Locks `mutex`. No code panics while holding these locks with the data half changed,
/// so a poisoned lock is used as it is.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The message of a panic, when it has one (`panic!` with a string or a format).
fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}
