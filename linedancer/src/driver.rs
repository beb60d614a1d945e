//! The default client handler: runs a [`Protocol`] over a stream.
//!
//! One task per connection reads into a reused buffer, lets the session decode every
//! complete frame and call the protocol for each, then writes all the replies of that
//! read in one write. The loop also watches the protocol's timer and the server's
//! shutdown signals. Everything protocol-specific lives in the sans-IO
//! [`Session`](crate::protocol::Session); this module only moves bytes and time.

use std::future::{poll_fn, Future};
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tokio_util::io::poll_read_buf;
use tracing::field::display;
use tracing::Span;

use crate::close::CloseReason;
use crate::connections::{Connection, Event};
use crate::handler::{sealed, Service};
use crate::protocol::{Effect, Peer, Protocol, Session, Timer};
use crate::stats::Bytes;
use crate::transport::Stream;

/// Bytes reserved in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;

/// After the protocol closes a connection, how long unread input is drained so that
/// closing does not reset the connection (and destroy the replies in flight).
const LINGER_TIME: Duration = Duration::from_secs(1);

/// How much unread input is drained at most after the protocol closes.
const LINGER_BYTES: usize = 256 * 1024;

/// The [`Service`] that serves a [`Protocol`] with the application state `S`: what
/// [`Builder::protocol`](crate::Builder::protocol) installs.
pub struct Driver<P: Protocol<S>, S = ()> {
    /// Cloned for every connection, so that each gets a fresh codec.
    codec: P::Codec,
    state: Arc<S>,
    _protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol<S>, S> Driver<P, S> {
    /// A driver whose connections frame their bytes with clones of `codec`, and whose
    /// callbacks see `state`.
    pub fn new(codec: P::Codec, state: Arc<S>) -> Self {
        Driver {
            codec,
            state,
            _protocol: PhantomData,
        }
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

    // Not an `async fn`: its future would hold the stream and the connection a second
    // time beside the driver's own.
    fn serve<T: Stream>(
        &self,
        stream: T,
        conn: Connection<P::Message>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        drive::<P, S, T>(stream, self.codec.clone(), Arc::clone(&self.state), conn)
    }
}

/// Serves one connection until it closes, and records why; the reason is the close's
/// whole story, so this never fails.
async fn drive<P, S, T>(
    mut stream: T,
    codec: P::Codec,
    state: Arc<S>,
    conn: Connection<P::Message>,
) -> io::Result<()>
where
    P: Protocol<S>,
    S: Send + Sync + 'static,
    T: Stream,
{
    let span = Span::current();
    let limits = conn.limits();
    let peer = Peer {
        id: conn.id(),
        peer_addr: conn.peer_addr().clone(),
        local_addr: conn.local_addr().clone(),
    };
    let mut session = Session::<P, S>::connect(codec, peer, state, limits.max_output);
    let mut state = session.state_name();
    span.record("state", display(state));
    conn.record_state(state);
    // Work started with `Ctx::spawn`, made on first use; dropped, and so cancelled,
    // with the connection.
    let mut spawned: Option<JoinSet<P::Message>> = None;

    let mut bytes = Bytes::default();
    // Replies wait to be written, or were written and are not yet flushed (TLS).
    let mut unflushed = false;
    let mut draining = false;
    // The waker registered for events, so that it is not registered on every wake-up.
    let mut registered = None;
    // The protocol's timer.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let mut armed = false;
    // Runs while replies wait for a peer that is slow to take them; pushed back
    // whenever it takes some.
    let mut send_timer: Option<Pin<Box<Sleep>>> = None;
    let mut sending = false;
    // The idle timer is pushed back lazily: a read only notes the time, and the timer,
    // when it fires early, sleeps again until the real deadline.
    let mut idle = limits
        .idle_timeout
        .map(|after| (Box::pin(sleep(after)), Instant::now()));

    // Why the connection was cut short; `None` when it closed as the session says.
    let cut = loop {
        if session.has_effects() {
            for effect in session.take_effects() {
                carry_out(effect, &conn, &mut spawned);
            }
        }
        if !session.output.is_empty() || unflushed {
            // Most replies fit in the socket buffer: write them at once, and wait for
            // the peer only when some are left. No waker is registered here; the
            // select below registers one if the stream cannot take them all.
            let (written, sent) = poll_send(
                &mut stream,
                &mut session.output,
                &mut Context::from_waker(Waker::noop()),
            );
            unflushed = match sent {
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(e)) => break Some(CloseReason::from_io(&e)),
                Poll::Pending => true,
            };
            if written > 0 {
                bytes.written += written as u64;
                conn.record_bytes(bytes.read, bytes.written);
            }
            if unflushed && (!sending || written > 0) {
                let deadline = Instant::now() + limits.send_timeout;
                match &mut send_timer {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => send_timer = Some(Box::pin(sleep_until(deadline))),
                }
                sending = true;
            }
        }
        // Replies still waiting for the peer, in bytes.
        let waiting = session.output.len();
        let pending = unflushed;
        if !pending {
            if sending {
                sending = false;
                if let Some((_, last_input)) = &mut idle {
                    // Waiting for the peer to read is not idleness.
                    *last_input = Instant::now();
                }
            }
            if session.is_paused() {
                // The replies that paused decoding have gone: decode the rest.
                session.decode(false);
                continue;
            }
        }
        if session.state_name() != state {
            state = session.state_name();
            span.record("state", display(state));
            conn.record_state(state);
        }
        if !pending && session.closing().is_some() {
            if session.closing() != Some(&CloseReason::PeerClosed) {
                linger(&mut stream, &mut session.input, &conn).await;
            }
            break None;
        }
        match session.take_timer() {
            Some(Timer::Arm(after)) => {
                let deadline = Instant::now() + after;
                match &mut timer {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => timer = Some(Box::pin(sleep_until(deadline))),
                }
                armed = true;
            }
            Some(Timer::Clear) => armed = false,
            None => {}
        }
        tokio::select! {
            biased;
            event = poll_fn(|cx| conn.poll_event(cx, !draining, &mut registered)) => match event {
                Event::Abort => break Some(CloseReason::Shutdown),
                Event::Overflow => break Some(CloseReason::MailboxOverflow),
                Event::Drain => {
                    draining = true;
                    session.shutdown();
                }
                Event::Mail => {
                    for message in conn.take_mail() {
                        session.message(message);
                    }
                }
            },
            // While replies wait, nothing more is read: a peer that sends without
            // reading is held back, and meets the send timeout if it never reads.
            io = poll_fn(|cx| {
                if pending {
                    // Ready once some replies went (the top of the loop counts them
                    // and writes the rest) or the stream failed.
                    return match poll_send(&mut stream, &mut session.output, cx) {
                        (0, Poll::Pending) => Poll::Pending,
                        (written, Poll::Pending) => Poll::Ready(Io::Sent(written, Ok(false))),
                        (written, Poll::Ready(done)) => {
                            Poll::Ready(Io::Sent(written, done.map(|()| true)))
                        }
                    };
                }
                // A waiting connection holds no read buffer: the one taken for a read
                // that would block goes back to the pool at once, and so does a large
                // output buffer.
                buffers::fill(&mut session.input);
                let read = poll_read_buf(Pin::new(&mut stream), cx, &mut session.input);
                if read.is_pending() {
                    buffers::recycle(&mut session.input, 0);
                    buffers::recycle(&mut session.output, buffers::KEEP_OUTPUT);
                }
                read.map(Io::Read)
            }) => match io {
                Io::Sent(written, done) => {
                    bytes.written += written as u64;
                    conn.record_bytes(bytes.read, bytes.written);
                    match done {
                        Ok(done) => unflushed = !done,
                        Err(e) => break Some(CloseReason::from_io(&e)),
                    }
                }
                Io::Read(Ok(n)) => {
                    if n > 0 {
                        bytes.read += n as u64;
                        conn.record_bytes(bytes.read, bytes.written);
                        if let Some((_, last_input)) = &mut idle {
                            *last_input = Instant::now();
                        }
                    }
                    session.decode(n == 0);
                }
                Io::Read(Err(e)) => break Some(CloseReason::from_io(&e)),
            },
            () = async { timer.as_mut().expect("armed implies a timer").await }, if armed => {
                armed = false;
                session.timeout();
            }
            Some(done) = async { spawned.as_mut().expect("checked").join_next().await },
                if spawned.as_ref().is_some_and(|work| !work.is_empty()) => match done {
                Ok(message) => {
                    session.message(message);
                }
                Err(e) if e.is_panic() => {
                    break Some(CloseReason::Panic(format!("in spawned work: {e}")));
                }
                Err(_) => {}
            },
            () = async { send_timer.as_mut().expect("sending implies a timer").await }, if sending => {
                break Some(CloseReason::SendTimeout);
            }
            () = async { idle.as_mut().expect("checked").0.as_mut().await }, if !pending && idle.is_some() => {
                let (sleep, last_input) = idle.as_mut().expect("checked");
                let deadline = *last_input + limits.idle_timeout.expect("idle implies a timeout");
                if deadline <= Instant::now() {
                    break Some(CloseReason::IdleTimeout);
                }
                sleep.as_mut().reset(deadline);
            }
        }
        if overflowed(waiting, &session.output, limits.max_output) {
            break Some(CloseReason::OutputOverflow);
        }
    };
    // What is left unread or unwritten is discarded with the connection; the buffers
    // go back to the pool, so that a new connection does not allocate its own.
    session.input.clear();
    session.output.clear();
    buffers::recycle(&mut session.input, 0);
    buffers::recycle(&mut session.output, 0);
    let (reason, effects) = session.finish(cut);
    // Work spawned now would outlive the connection: only messages go out.
    for effect in effects {
        if !matches!(effect, Effect::Spawn(_)) {
            carry_out(effect, &conn, &mut spawned);
        }
    }
    conn.record_close(reason);
    Ok(())
}

/// What happened on the stream: replies were written (all of them and flushed, with
/// `Ok(true)`), or none waited and it was read.
enum Io {
    Sent(usize, io::Result<bool>),
    Read(io::Result<usize>),
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

/// Carries out what a callback asked for away from its connection.
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
        Effect::Join(group) => connections.join(conn.id(), group),
        Effect::Leave(group) => connections.leave(conn.id(), &group),
        Effect::Spawn(work) => drop(spawned.get_or_insert_with(JoinSet::new).spawn(work)),
    }
}

/// Whether replies the protocol queued on its own (from a timeout, the shutdown event,
/// a message, spawned work) while `waiting` bytes of earlier ones still waited for the
/// peer have piled up past the output limit. Replies to the peer's own requests never
/// count: nothing is read while replies wait.
fn overflowed(waiting: usize, output: &BytesMut, max_output: usize) -> bool {
    waiting > 0 && output.len() > waiting && output.len() > max_output
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

/// Closes our side and reads what the peer still sends, for a bounded time and amount,
/// so that the kernel sends a FIN after our last reply rather than a reset that could
/// destroy it.
async fn linger<T: Stream, M>(stream: &mut T, scratch: &mut BytesMut, conn: &Connection<M>) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let discard = async {
        let mut total = 0;
        while total < LINGER_BYTES {
            scratch.clear();
            buffers::fill(scratch);
            match stream.read_buf(scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    tokio::select! {
        () = discard => {}
        () = tokio::time::sleep(LINGER_TIME) => {}
        () = poll_fn(|cx| conn.poll_abort(cx)) => {}
    }
}
