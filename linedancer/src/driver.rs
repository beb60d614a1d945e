//! The default client handler: runs a [`Protocol`] over a stream.
//!
//! One task per connection reads into a reused buffer, lets the session decode every
//! complete frame and call the protocol for each, then writes all the replies of that
//! read in one write. The loop also watches the protocol's timer and the server's
//! shutdown signals. Everything protocol-specific lives in the sans-IO
//! [`Session`](crate::protocol::Session); this module only moves bytes and time.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use pin_project_lite::pin_project;
use tokio::io::AsyncWrite;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tokio_util::io::poll_read_buf;
use tracing::field::display;
use tracing::Span;

use crate::close::CloseReason;
use crate::cluster::ClusterLink;
use crate::connections::{Connection, Event, Limits};
use crate::handler::{sealed, Service};
use crate::protocol::{Effect, Peer, Protocol, Session, Timer};
use crate::stats::Traffic;
use crate::transport::{self, Stream};

/// Bytes reserved in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;

/// After the protocol closes a connection, how long unread input is drained so that
/// closing does not reset the connection (and destroy the replies in flight).
const LINGER_TIME: Duration = Duration::from_secs(2);

/// How much unread input is drained at most after the protocol closes: enough for a
/// client that pipelined a megabyte past its `QUIT` still to get its replies.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// The [`Service`] that serves a [`Protocol`] with the application state `S`: what
/// [`Builder::protocol`](crate::Builder::protocol) installs.
pub struct Driver<P: Protocol<S>, S = ()> {
    /// Cloned for every connection, so that each gets a fresh codec.
    codec: P::Codec,
    state: Arc<S>,
    cluster: Option<ClusterLink<P::Message>>,
    _protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol<S>, S> Driver<P, S> {
    /// A driver whose connections frame their bytes with clones of `codec`, and whose
    /// callbacks see `state`.
    pub fn new(codec: P::Codec, state: Arc<S>) -> Self {
        Driver {
            codec,
            state,
            cluster: None,
            _protocol: PhantomData,
        }
    }

    /// Puts the server on `cluster`.
    pub(crate) fn set_cluster(&mut self, cluster: ClusterLink<P::Message>) {
        self.cluster = Some(cluster);
    }
}

impl<P: Protocol<S>, S> std::fmt::Debug for Driver<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("protocol", &std::any::type_name::<P>())
            .finish_non_exhaustive()
    }
}

impl<P: Protocol<S>, S> sealed::Sealed for Driver<P, S> {}

impl<P, S> Service for Driver<P, S>
where
    P: Protocol<S>,
    P::Codec: Clone + Sync,
    S: Send + Sync + 'static,
{
    type Message = P::Message;

    fn serve<T: Stream>(
        &self,
        stream: T,
        conn: Connection<P::Message>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        Drive::<P, S, T>::connect(stream, self.codec.clone(), Arc::clone(&self.state), conn)
    }

    fn cluster(&self) -> Option<&ClusterLink<P::Message>> {
        self.cluster.as_ref()
    }
}

pin_project! {
    /// One connection served by a protocol, from connect to close: a future written by
    /// hand rather than an `async fn`, so that what every request touches lies together
    /// at its start (`repr(C)` keeps the order written, here and in [`Serving`]). With a
    /// thousand connections a request finds its connection out of the cache, and each
    /// cache line its state spans costs a miss.
    #[repr(C)]
    struct Drive<P: Protocol<S>, S, T> {
        served: Serving<P, S, T>,
        // Set once the protocol has closed and unread input is being drained.
        // Boxed: most connections never linger, and an idle one should be small.
        linger: Option<Box<Linger>>,
    }
}

/// What serving a connection keeps from one poll to the next, what every request
/// touches first.
#[repr(C)]
struct Serving<P: Protocol<S>, S, T> {
    // What every request touches.
    // The waker registered for events, so that it is not registered on every
    // wake-up.
    registered: Option<Waker>,
    bytes: Traffic,
    // The state name last recorded.
    state: &'static str,
    // Replies wait to be written, or were written and are not yet flushed (TLS).
    unflushed: bool,
    draining: bool,
    // The protocol's timer runs.
    armed: bool,
    // The send timer runs.
    sending: bool,
    // A frame has begun and its timer runs.
    framing: bool,
    stream: T,
    session: Session<P, S>,
    conn: Connection<P::Message>,
    // What only some requests touch.
    // The protocol's timer.
    timer: Option<Pin<Box<Sleep>>>,
    // Runs while replies wait for a peer that is slow to take them; pushed back
    // whenever it takes some.
    send_timer: Option<Pin<Box<Sleep>>>,
    // Runs while a frame has begun and is not complete: from when it began, or
    // from the last frame completed, when frames keep coming.
    frame_timer: Option<Pin<Box<Sleep>>>,
    // The frames decoded when the frame timer was last armed.
    frames_seen: u64,
    // The idle timer and the time of the last input. It is pushed back lazily: a
    // read only notes the time, and the timer, when it fires early, sleeps again
    // until the real deadline.
    idle: Option<(Pin<Box<Sleep>>, Instant)>,
    // Work started with `Ctx::spawn`, made on first use; dropped, and so
    // cancelled, with the connection.
    spawned: Option<JoinSet<P::Message>>,
    limits: Limits,
    span: Span,
}

/// After the protocol has closed: our side is shut, and what the peer still sends is
/// read and discarded until it closes, for a bounded time and amount, so that the
/// kernel sends a FIN after our last reply rather than a reset that could destroy it.
struct Linger {
    shut: bool,
    discarded: usize,
    deadline: Pin<Box<Sleep>>,
    /// Why the connection was cut short, if it was.
    cut: Option<CloseReason>,
}

/// Whether a connection cut short for `reason` still closes gently, lingering: when one
/// of the server's limits ended it, and the peer, alive, may still be sending.
fn closes_gently(reason: &CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::IdleTimeout
            | CloseReason::FrameTimeout
            | CloseReason::SendTimeout
            | CloseReason::OutputOverflow
            | CloseReason::MailboxOverflow
    )
}

impl<P, S, T> Drive<P, S, T>
where
    P: Protocol<S>,
    T: Stream,
{
    /// Starts serving: calls [`Protocol::connect`].
    fn connect(stream: T, codec: P::Codec, state: Arc<S>, conn: Connection<P::Message>) -> Self {
        let span = Span::current();
        let limits = conn.limits();
        let peer = Peer {
            id: conn.id(),
            peer_addr: conn.peer_addr().clone(),
            local_addr: conn.local_addr().clone(),
            transport: conn.transport().cloned(),
        };
        let session = Session::<P, S>::connect(codec, peer, state, limits.max_output, None);
        let state = session.state_name();
        span.record("state", display(state));
        conn.record_state(state);
        let idle = limits
            .idle_timeout
            .map(|after| (Box::pin(sleep(after)), Instant::now()));
        let served = Serving {
            registered: None,
            bytes: Traffic::default(),
            state,
            unflushed: false,
            draining: false,
            armed: false,
            sending: false,
            framing: false,
            stream,
            session,
            conn,
            timer: None,
            send_timer: None,
            frame_timer: None,
            frames_seen: 0,
            idle,
            spawned: None,
            limits,
            span,
        };
        Drive {
            served,
            linger: None,
        }
    }
}

impl<P, S, T> Future for Drive<P, S, T>
where
    P: Protocol<S>,
    T: Stream,
{
    type Output = io::Result<()>;

    /// Serves until the connection closes, and records why; the reason is the close's
    /// whole story, so this never fails. Never inlined into the task around it (which,
    /// with TLS, holds the handshake too), so that the code every request runs stays
    /// together.
    #[inline(never)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let drive = this.served;
        let cut = match this.linger {
            Some(linger) => {
                ready!(drive.poll_linger(linger, cx));
                linger.cut.take()
            }
            None => {
                let cut = ready!(drive.poll_serve(cx));
                // Closed by the protocol, its replies written, or cut off by one of the
                // server's limits: wait for the peer's FIN unless it has sent it, or
                // could not (a reset, an error, the end of the drain).
                let gently = match &cut {
                    None => drive.session.closing() != Some(&CloseReason::PeerClosed),
                    Some(reason) => closes_gently(reason),
                };
                if !gently {
                    cut
                } else {
                    let linger = this.linger.insert(Box::new(Linger {
                        shut: false,
                        discarded: 0,
                        deadline: Box::pin(sleep(LINGER_TIME)),
                        cut,
                    }));
                    ready!(drive.poll_linger(linger, cx));
                    linger.cut.take()
                }
            }
        };
        drive.finish(cut);
        Poll::Ready(Ok(()))
    }
}

impl<P, S, T> Serving<P, S, T>
where
    P: Protocol<S>,
    T: Stream,
{
    /// Serves until the session closes (`None`, its replies written) or the
    /// connection is cut short (`Some` reason: an error, a timeout, the server).
    fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<Option<CloseReason>> {
        loop {
            if self.session.has_effects() {
                self.carry_out_effects();
            }
            if !self.session.output.is_empty() || self.unflushed {
                // Most replies fit in the socket buffer: write them at once, and wait
                // for the peer only when some are left. No waker is registered here;
                // one is below if the stream cannot take them all.
                let noop = &mut Context::from_waker(Waker::noop());
                let (written, sent) = poll_send(&mut self.stream, &mut self.session.output, noop);
                self.unflushed = match sent {
                    Poll::Ready(Ok(())) => false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(CloseReason::from_io(&e))),
                    Poll::Pending => true,
                };
                self.count_written(written);
                if self.unflushed && (!self.sending || written > 0) {
                    self.arm_send_timer();
                }
            }
            // Replies still waiting for the peer, in bytes.
            let waiting = self.session.output.len();
            let pending = self.unflushed;
            if !pending {
                if self.sending {
                    self.sent();
                }
                if self.session.is_paused() {
                    // The replies that paused decoding have gone: decode the rest.
                    self.session.decode(false);
                    continue;
                }
            }
            if self.session.state_name() != self.state {
                self.record_state();
            }
            if !pending && self.session.closing().is_some() {
                return Poll::Ready(None);
            }
            if let Some(timer) = self.session.take_timer() {
                self.set_timer(timer);
            }
            // A frame begun in the input, while we read: it has the frame timeout to
            // complete, counted again whenever another frame completes.
            let partial = !pending && !self.session.is_paused() && !self.session.input.is_empty();
            if partial && (!self.framing || self.session.frames() != self.frames_seen) {
                self.arm_frame_timer();
            }
            self.framing = partial;
            // The next event, in order of priority: the server's and other
            // connections', the stream, the protocol's timer, spawned work, the send
            // and idle timeouts.
            match self.poll_next(pending, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(cut)) => return Poll::Ready(Some(cut)),
                Poll::Pending => return Poll::Pending,
            }
            if self.session.overflowed(waiting) {
                return Poll::Ready(Some(CloseReason::OutputOverflow));
            }
        }
    }

    /// Waits for the next event and hands it to the session; `Err` when it cuts the
    /// connection short.
    fn poll_next(&mut self, pending: bool, cx: &mut Context<'_>) -> Poll<Result<(), CloseReason>> {
        let draining = self.draining;
        if let Poll::Ready(event) = self.conn.poll_event(cx, !draining, &mut self.registered) {
            return Poll::Ready(self.event(event));
        }
        if pending {
            // While replies wait, nothing more is read: a peer that sends without
            // reading is held back, and meets the send timeout if it never reads.
            // Ready once some replies went (the top of the loop writes the rest) or
            // the stream failed.
            match poll_send(&mut self.stream, &mut self.session.output, cx) {
                (0, Poll::Pending) => {}
                (written, sent) => {
                    self.count_written(written);
                    match sent {
                        Poll::Ready(Ok(())) => self.unflushed = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(CloseReason::from_io(&e))),
                        Poll::Pending => {}
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        } else {
            // A waiting connection holds no read buffer: the one taken for a read that
            // would block goes back to the pool at once, and so does a large output
            // buffer.
            let input = &mut self.session.input;
            buffers::fill(input);
            match poll_read_buf(Pin::new(&mut self.stream), cx, input) {
                Poll::Pending => {
                    buffers::recycle(input, 0);
                    buffers::recycle(&mut self.session.output, buffers::KEEP_OUTPUT);
                }
                Poll::Ready(Ok(n)) => {
                    if n > 0 {
                        self.bytes.read += n as u64;
                        // Two stores on the per-read path; frames and replies are
                        // recorded with the writes that answer them, and at the end.
                        self.conn.record_bytes(self.bytes.read, self.bytes.written);
                        if let Some((_, last_input)) = &mut self.idle {
                            *last_input = Instant::now();
                        }
                    }
                    self.session.decode(n == 0);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(CloseReason::from_io(&e))),
            }
        }
        let idle = !pending && self.idle.is_some();
        if self.armed || self.spawned.is_some() || self.framing || self.sending || idle {
            return self.poll_timers(pending, cx);
        }
        Poll::Pending
    }

    // What follows is what some requests need, out of line: the code every request
    // runs should fit the instruction cache beside the stream's own (TLS).

    /// Carries out what the callbacks asked for away from the connection.
    #[cold]
    fn carry_out_effects(&mut self) {
        for effect in self.session.take_effects() {
            carry_out(effect, &self.conn, &mut self.spawned);
        }
    }

    /// Replies wait for the peer: (re)starts the send timeout.
    #[cold]
    fn arm_send_timer(&mut self) {
        let deadline = Instant::now() + self.limits.send_timeout;
        match &mut self.send_timer {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.send_timer = Some(Box::pin(sleep_until(deadline))),
        }
        self.sending = true;
    }

    /// The replies that waited for the peer have gone.
    #[cold]
    fn sent(&mut self) {
        self.sending = false;
        if let Some((_, last_input)) = &mut self.idle {
            // Waiting for the peer to read is not idleness.
            *last_input = Instant::now();
        }
    }

    /// The protocol moved to another state: the span and the listing say so.
    #[cold]
    fn record_state(&mut self) {
        self.state = self.session.state_name();
        self.span.record("state", display(self.state));
        self.conn.record_state(self.state);
    }

    /// Arms or clears the protocol's timer, as a callback asked.
    #[cold]
    fn set_timer(&mut self, timer: Timer) {
        match timer {
            Timer::Arm(after) => {
                let deadline = Instant::now() + after;
                match &mut self.timer {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => self.timer = Some(Box::pin(sleep_until(deadline))),
                }
                self.armed = true;
            }
            Timer::Clear => self.armed = false,
        }
    }

    /// A frame has begun, or another has completed while one is begun: (re)starts the
    /// frame timeout.
    #[cold]
    fn arm_frame_timer(&mut self) {
        let deadline = Instant::now() + self.limits.frame_timeout;
        match &mut self.frame_timer {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.frame_timer = Some(Box::pin(sleep_until(deadline))),
        }
        self.frames_seen = self.session.frames();
    }

    /// Hands an event of the server's or of other connections' to the session; `Err`
    /// when it cuts the connection short.
    #[cold]
    fn event(&mut self, event: Event) -> Result<(), CloseReason> {
        match event {
            Event::Abort => return Err(CloseReason::Shutdown),
            Event::Overflow => return Err(CloseReason::MailboxOverflow),
            Event::Kick => return Err(CloseReason::Kicked),
            Event::Drain => {
                self.draining = true;
                self.session.shutdown();
            }
            Event::Mail => {
                for message in self.conn.take_mail() {
                    self.session.message(message);
                }
            }
        }
        Ok(())
    }

    /// Polls the protocol's timer, spawned work, and the frame, send and idle
    /// timeouts, those that run.
    #[cold]
    fn poll_timers(
        &mut self,
        pending: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), CloseReason>> {
        if self.armed {
            if let Some(timer) = &mut self.timer {
                if timer.as_mut().poll(cx).is_ready() {
                    self.armed = false;
                    self.session.timeout();
                    return Poll::Ready(Ok(()));
                }
            }
        }
        if let Some(work) = self.spawned.as_mut().filter(|work| !work.is_empty()) {
            if let Poll::Ready(Some(done)) = work.poll_join_next(cx) {
                match done {
                    Ok(message) => self.session.message(message),
                    Err(e) if e.is_panic() => {
                        let reason = format!("in spawned work: {e}");
                        return Poll::Ready(Err(CloseReason::Panic(reason)));
                    }
                    Err(_) => {}
                }
                return Poll::Ready(Ok(()));
            }
        }
        if self.framing {
            if let Some(timer) = &mut self.frame_timer {
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(CloseReason::FrameTimeout));
                }
            }
        }
        if self.sending {
            if let Some(timer) = &mut self.send_timer {
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(CloseReason::SendTimeout));
                }
            }
        }
        if !pending {
            if let Some((sleep, last_input)) = &mut self.idle {
                if sleep.as_mut().poll(cx).is_ready() {
                    let after = self.limits.idle_timeout.expect("idle implies a timeout");
                    let deadline = *last_input + after;
                    if deadline <= Instant::now() {
                        return Poll::Ready(Err(CloseReason::IdleTimeout));
                    }
                    sleep.as_mut().reset(deadline);
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Poll::Pending
    }

    fn count_written(&mut self, written: usize) {
        if written > 0 {
            self.bytes.written += written as u64;
            self.record_traffic();
        }
    }

    /// Records the traffic so far, and the replies still waiting, for the counters and
    /// the connection list: after each write, and at the end.
    fn record_traffic(&self) {
        let traffic = Traffic {
            frames: self.session.frames(),
            replies: self.session.replies(),
            ..self.bytes
        };
        self.conn.record_traffic(traffic, self.session.output.len());
    }

    /// Shuts our side, then discards what the peer still sends until it closes, the
    /// time or amount allowed runs out, or the server's drain ends.
    #[cold]
    fn poll_linger(&mut self, linger: &mut Linger, cx: &mut Context<'_>) -> Poll<()> {
        if linger.deadline.as_mut().poll(cx).is_ready() || self.conn.poll_abort(cx).is_ready() {
            return Poll::Ready(());
        }
        if !linger.shut {
            match Pin::new(&mut self.stream).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => linger.shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        let scratch = &mut self.session.input;
        while linger.discarded < LINGER_BYTES {
            scratch.clear();
            buffers::fill(scratch);
            match poll_read_buf(Pin::new(&mut self.stream), cx, scratch) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => linger.discarded += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    /// Ends the session for the reason it closed, or `cut`: what is left unread or
    /// unwritten is discarded, the buffers go back to the pool (so that a new
    /// connection does not allocate its own), [`Protocol::closed`] is called, and the
    /// messages it sends go out.
    #[cold]
    fn finish(&mut self, cut: Option<CloseReason>) {
        if cut == Some(CloseReason::Shutdown) {
            // Cut off by the end of the drain: the peer sees a reset, not a clean end.
            transport::reset_on_close(&self.stream);
        }
        self.session.input.clear();
        self.session.output.clear();
        self.record_traffic();
        buffers::recycle(&mut self.session.input, 0);
        buffers::recycle(&mut self.session.output, 0);
        let (reason, effects) = self.session.finish(cut);
        // Work spawned now would outlive the connection: only messages go out.
        for effect in effects {
            if !matches!(effect, Effect::Spawn(_)) {
                carry_out(effect, &self.conn, &mut self.spawned);
            }
        }
        self.conn.record_close(reason);
    }
}

/// Writes as much of `output` as the stream takes now, then flushes it once all is
/// written. Returns the bytes written, and `Ready(Ok(()))` once everything is written
/// and flushed.
fn poll_send<T: AsyncWrite + Unpin>(
    stream: &mut T,
    output: &mut BytesMut,
    cx: &mut Context<'_>,
) -> (usize, Poll<io::Result<()>>) {
    let mut written = 0;
    while !output.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, output) {
            Poll::Ready(Ok(0)) => {
                return (written, Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
            }
            Poll::Ready(Ok(n)) => {
                written += n;
                // Cleared, not advanced, when all went: the buffer keeps its full room.
                if n == output.len() {
                    output.clear();
                } else {
                    output.advance(n);
                }
            }
            Poll::Ready(Err(e)) => return (written, Poll::Ready(Err(e))),
            Poll::Pending => return (written, Poll::Pending),
        }
    }
    (written, Pin::new(stream).poll_flush(cx))
}

/// Carries out what a callback asked for away from its connection. Out of line, as
/// the other rare paths: what every request runs should fit the instruction cache
/// beside the stream's own code (TLS).
#[inline(never)]
fn carry_out<M: Send + 'static>(
    effect: Effect<M>,
    conn: &Connection<M>,
    spawned: &mut Option<JoinSet<M>>,
) {
    let connections = conn.connections();
    match effect {
        // A connection that has ended, or a full mailbox, is the receiver's business:
        // the sender goes on.
        Effect::SendTo(to, message) => drop(connections.post(to, message)),
        Effect::Broadcast {
            group,
            message,
            except,
        } => drop(connections.broadcast(&group, &*message, except)),
        Effect::Join(group, label) => connections.join(conn.id(), group, label),
        Effect::Leave(group) => connections.leave(conn.id(), &group),
        Effect::Spawn(work) => drop(spawned.get_or_insert_with(JoinSet::new).spawn(work)),
    }
}

/// A per-thread pool of read buffers. A connection takes a buffer when bytes arrive
/// and gives it back when it holds no partial frame, so that idle connections hold no
/// read buffer and busy ones allocate none in steady state. The output buffer stays
/// with its connection while it is small ([`KEEP_OUTPUT`](buffers::KEEP_OUTPUT)): the
/// replies of a request-response protocol then cost no trip to the pool.
mod buffers {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::READ_SIZE;

    /// Buffers kept per thread at most: enough for the connections one thread serves
    /// at the same instant, with a margin.
    const POOL_SIZE: usize = 64;

    /// The capacity up to which an empty output buffer stays with its connection.
    pub(super) const KEEP_OUTPUT: usize = 1024;

    thread_local! {
        static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// Makes sure `buf` has room for a read, taking an empty buffer from the pool if
    /// it has none.
    pub(super) fn fill(buf: &mut BytesMut) {
        if buf.capacity() - buf.len() >= READ_SIZE / 2 {
            return;
        }
        if buf.capacity() == 0 {
            if let Some(pooled) = POOL.with(|pool| pool.borrow_mut().pop()) {
                *buf = pooled;
            }
        }
        if buf.capacity() - buf.len() < READ_SIZE / 2 {
            buf.reserve(READ_SIZE);
        }
    }

    /// Gives `buf` back to the pool, leaving it without capacity, if it is empty and
    /// holds more than `keep` bytes of capacity.
    pub(super) fn recycle(buf: &mut BytesMut, keep: usize) {
        if !buf.is_empty() || buf.capacity() <= keep {
            return;
        }
        let mut spare = std::mem::take(buf);
        // A buffer with room left for a read is pooled as it is: reclaiming the part
        // that frames were split from costs more than the rest of a return, so `fill`
        // does it only once the room runs low. One without room is reclaimed now, or,
        // when a frame the protocol kept still shares it, let go; so is one grown
        // large by a big frame.
        let room = spare.capacity() >= READ_SIZE / 2 || spare.try_reclaim(READ_SIZE);
        if room && spare.capacity() <= 4 * READ_SIZE {
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_SIZE {
                    pool.push(spare);
                }
            });
        }
    }
}
