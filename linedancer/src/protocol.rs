//! The state-machine API: the [`Protocol`] trait a user implements, the [`Ctx`] its
//! callbacks act through, and the sans-IO session that both the socket driver and the
//! [`testing`](crate::testing) harness run it in.
//!
//! Callbacks are synchronous and return quickly, like `gen_fsm` callbacks in the Erlang
//! original: a protocol is a plain Rust value (usually an enum of states) that reacts to
//! events and queues replies. It never touches a socket or a clock, so the same code runs
//! under the driver and under the harness.
//!
//! The application's shared state (configuration, a pool, a registry) is the trait's
//! type parameter `S`: given once to the server ([`Builder::state`](crate::Builder::state)),
//! it reaches every callback by reference through [`Ctx::state`]. A protocol that needs
//! none implements `Protocol` and gets `()`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};

use crate::close::CloseReason;
use crate::connections::ConnectionId;
use crate::transport::proxy::ProxyHeader;
use crate::transport::tls::TlsInfo;
use crate::transport::{Address, PeerCredentials, TransportInfo};

/// A connection's protocol: a state machine fed with decoded frames.
///
/// One value of the implementing type lives per connection, created by
/// [`connect`](Protocol::connect) and dropped when the connection ends. Make it an enum
/// whose variants are the protocol's states, and report the current one from
/// [`state_name`](Protocol::state_name): it appears in every log line of the connection.
///
/// `S` is the application state shared by every connection of the server, read with
/// [`Ctx::state`]; `()` by default. A protocol with state implements `Protocol<S>` for
/// its own `S` and is served with [`Builder::state`](crate::Builder::state):
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
///
/// use linedancer::codec::Lines;
/// use linedancer::{Ctx, Next, Protocol, Server};
///
/// /// What every connection shares: a visitor count.
/// #[derive(Default)]
/// struct Visitors(AtomicU64);
///
/// /// Tells each client which visitor it is.
/// struct Door;
///
/// impl Protocol<Visitors> for Door {
///     type Codec = Lines;
///     type Reply = String;
///     type Message = ();
///
///     fn connect(ctx: &mut Ctx<'_, Self, Visitors>) -> Self {
///         let n = ctx.state().0.fetch_add(1, Ordering::Relaxed) + 1;
///         ctx.send(format!("you are visitor {n}"));
///         Door
///     }
///
///     fn frame(&mut self, _line: String, _ctx: &mut Ctx<'_, Self, Visitors>) -> Next {
///         Next::Close
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), linedancer::Error> {
/// let visitors = Arc::new(Visitors::default());
/// let server = Server::builder()
///     .port(0)
///     .state(Arc::clone(&visitors))
///     .protocol::<Door>()
///     .start()
///     .await?;
/// # server.shutdown().await;
/// # Ok(())
/// # }
/// ```
///
/// Without state (`S = ()`):
///
/// ```
/// use linedancer::codec::Lines;
/// use linedancer::{Ctx, Next, Protocol};
///
/// /// Answers every line with its length; `bye` ends the conversation.
/// enum Counter {
///     Counting,
/// }
///
/// impl Protocol for Counter {
///     type Codec = Lines;
///     type Reply = String;
///     type Message = ();
///
///     fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
///         ctx.send("hello".to_string());
///         Counter::Counting
///     }
///
///     fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
///         if line == "bye" {
///             return Next::Close;
///         }
///         ctx.send(line.len().to_string());
///         Next::Continue
///     }
/// }
/// ```
pub trait Protocol<S = ()>: Sized + Send + 'static {
    /// The framing: turns bytes into frames ([`Decoder`]) and replies into bytes
    /// ([`Encoder`]). See [`codec`](crate::codec) for the ready-made ones.
    type Codec: Decoder<Error: fmt::Display> + Encoder<Self::Reply, Error: fmt::Display> + Send;

    /// What the protocol sends back with [`Ctx::send`].
    type Reply: Send + 'static;

    /// What other connections, the server handle and spawned work send to this one's
    /// mailbox ([`Ctx::send_to`], [`Ctx::broadcast`], [`Ctx::spawn`],
    /// [`ServerHandle::send_to`](crate::ServerHandle::send_to)), handed to
    /// [`message`](Protocol::message). `()` for a protocol that takes none.
    type Message: Send + 'static;

    /// A peer connected: choose the initial state. May greet with [`Ctx::send`], arm a
    /// timeout, or [`close`](Ctx::close) at once (the greeting is still delivered).
    fn connect(ctx: &mut Ctx<'_, Self, S>) -> Self;

    /// A complete frame arrived. Called once per frame, in order; replies queued while
    /// handling all frames of one read go out in one write.
    fn frame(&mut self, frame: Frame<Self, S>, ctx: &mut Ctx<'_, Self, S>) -> Next;

    /// A message arrived in the connection's mailbox. Messages are delivered one at a
    /// time, in the order each sender sent them. By default they are ignored.
    fn message(&mut self, message: Self::Message, ctx: &mut Ctx<'_, Self, S>) -> Next {
        let _ = (message, ctx);
        Next::Continue
    }

    /// The timeout armed with [`Ctx::set_timeout`] expired. By default the connection is
    /// closed (reason [`CloseReason::StateTimeout`]).
    fn timeout(&mut self, ctx: &mut Ctx<'_, Self, S>) -> Next {
        let _ = ctx;
        Next::Close
    }

    /// The server is shutting down and asks connections to finish. By default the
    /// connection goes on being served until its peer closes or the drain timeout ends;
    /// a protocol may say goodbye and return [`Next::Close`] instead.
    fn shutdown(&mut self, ctx: &mut Ctx<'_, Self, S>) -> Next {
        let _ = ctx;
        Next::Continue
    }

    /// The connection has ended, for `reason`. Nothing more reaches the peer (replies
    /// sent now are dropped), but messages to other connections
    /// ([`Ctx::send_to`], [`Ctx::broadcast`]) still go out: a chat room can be told
    /// that this member left.
    fn closed(&mut self, reason: &CloseReason, ctx: &mut Ctx<'_, Self, S>) {
        let _ = (reason, ctx);
    }

    /// The name of the current state, for logs and tracing spans.
    fn state_name(&self) -> &'static str {
        "RUNNING"
    }
}

/// The frame type a protocol's codec decodes.
pub type Frame<P, S = ()> = <<P as Protocol<S>>::Codec as Decoder>::Item;

/// What a callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a callback's Next decides whether the connection goes on"]
pub enum Next {
    /// Keep the connection open and wait for the next event.
    Continue,
    /// Flush the queued replies, then close the connection.
    Close,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) id: ConnectionId,
    pub(crate) peer_addr: Address,
    pub(crate) local_addr: Address,
    /// The TLS handshake's outcome and the PROXY header, if the server has them.
    pub(crate) transport: Option<Arc<TransportInfo>>,
}

/// What a callback can do: queue replies, close, arm a timeout, message other
/// connections, join groups, start work, read the application's shared state, and
/// learn about the connection.
pub struct Ctx<'a, P: Protocol<S>, S = ()> {
    codec: &'a mut P::Codec,
    output: &'a mut BytesMut,
    peer: &'a Peer,
    state: &'a S,
    asked: &'a mut Asked<P::Message>,
    /// The harness's virtual time; `None` under the driver, which reads the clock.
    clock: Option<Instant>,
}

/// What callbacks asked for beyond replies, for the driver (or harness) to carry out
/// once they return.
pub(crate) struct Asked<M> {
    pub(crate) timer: Option<Timer>,
    pub(crate) close: Option<CloseReason>,
    pub(crate) effects: Vec<Effect<M>>,
    /// Replies encoded so far, for the counters.
    pub(crate) replies: u64,
}

impl<M> Default for Asked<M> {
    fn default() -> Self {
        Asked {
            timer: None,
            close: None,
            effects: Vec::new(),
            replies: 0,
        }
    }
}

/// Work that is done away from the connection: carried out in order after the callback.
pub(crate) enum Effect<M> {
    /// A message for one connection's mailbox.
    SendTo(ConnectionId, M),
    /// A message for every member of a group but `except`.
    Broadcast {
        group: Arc<str>,
        message: Box<dyn Fn() -> M + Send>,
        except: Option<ConnectionId>,
    },
    /// Join a group, with a label for the cluster's member lists.
    Join(Arc<str>, Option<Arc<str>>),
    Leave(Arc<str>),
    /// Work whose result comes back as a message.
    Spawn(Pin<Box<dyn Future<Output = M> + Send>>),
}

impl<P: Protocol<S>, S> Ctx<'_, P, S> {
    /// Queues a reply. Replies are encoded at once and written after the callback, in
    /// the order they were sent; those of one read batch go out in one write.
    ///
    /// A reply the codec cannot encode closes the connection
    /// ([`CloseReason::BadReply`]); later sends are then ignored.
    pub fn send(&mut self, reply: P::Reply) {
        if matches!(self.asked.close, Some(CloseReason::BadReply(_))) {
            return;
        }
        match self.codec.encode(reply, self.output) {
            Ok(()) => self.asked.replies += 1,
            Err(e) => self.asked.close = Some(CloseReason::BadReply(e.to_string())),
        }
    }

    /// Closes the connection once the callback returns and the queued replies are
    /// written, as if the callback had returned [`Next::Close`].
    pub fn close(&mut self) {
        self.asked.close.get_or_insert(CloseReason::Closed);
    }

    /// Sends `message` to the mailbox of connection `to` of this server, delivered to
    /// its [`Protocol::message`] after this callback returns. Never blocks: a
    /// connection that has ended is skipped, and one whose mailbox is full is closed
    /// ([`CloseReason::MailboxOverflow`]) instead of holding up the sender.
    pub fn send_to(&mut self, to: ConnectionId, message: P::Message) {
        self.asked.effects.push(Effect::SendTo(to, message));
    }

    /// Sends a copy of `message` to every other member of `group` (not to this
    /// connection), as [`send_to`](Ctx::send_to) does to one.
    pub fn broadcast(&mut self, group: &str, message: P::Message)
    where
        P::Message: Clone,
    {
        self.asked.effects.push(Effect::Broadcast {
            group: group.into(),
            message: Box::new(move || message.clone()),
            except: Some(self.peer.id),
        });
    }

    /// Joins `group` (made on first use): [`broadcast`](Ctx::broadcast)s to it reach
    /// this connection from then on. Membership ends with the connection.
    pub fn join(&mut self, group: &str) {
        self.asked.effects.push(Effect::Join(group.into(), None));
    }

    /// Joins `group` as [`join`](Ctx::join) does, under `label`: on a
    /// [cluster](crate::cluster), what [`Cluster::members`](crate::cluster::Cluster::members)
    /// shows for this connection on every node (a chat's nick, say). Joining a group
    /// again changes the label.
    pub fn join_as(&mut self, group: &str, label: &str) {
        (self.asked.effects).push(Effect::Join(group.into(), Some(label.into())));
    }

    /// Leaves `group`.
    pub fn leave(&mut self, group: &str) {
        self.asked.effects.push(Effect::Leave(group.into()));
    }

    /// Runs `work` in a task of its own, and delivers its output to this connection's
    /// [`Protocol::message`] when it is done: the way to wait for something (a lookup,
    /// an upstream) without blocking the callbacks. Work still running when the
    /// connection ends is cancelled; work that panics closes the connection
    /// ([`CloseReason::Panic`]).
    pub fn spawn(&mut self, work: impl Future<Output = P::Message> + Send + 'static) {
        self.asked.effects.push(Effect::Spawn(Box::pin(work)));
    }

    /// Arms the timeout: [`Protocol::timeout`] is called once `after` has passed, unless
    /// the timeout is armed again or [cleared](Ctx::clear_timeout) first. Frames do not
    /// restart it; arm it again from [`Protocol::frame`] for an inactivity timeout.
    pub fn set_timeout(&mut self, after: Duration) {
        self.asked.timer = Some(Timer::Arm(after));
    }

    /// Disarms the timeout.
    pub fn clear_timeout(&mut self) {
        self.asked.timer = Some(Timer::Clear);
    }

    /// The connection's id, unique within the server.
    pub fn id(&self) -> ConnectionId {
        self.peer.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &Address {
        &self.peer.peer_addr
    }

    /// The local address the peer connected to.
    pub fn local_addr(&self) -> &Address {
        &self.peer.local_addr
    }

    /// What the TLS handshake settled (the SNI name the client asked for, the ALPN
    /// protocol agreed on), on a server with TLS ([`Builder::tls`](crate::Builder::tls)).
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.peer.transport.as_ref()?.tls.as_ref()
    }

    /// The process at the other end, on a Unix socket: its user, group and process id.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.peer.transport.as_ref()?.credentials
    }

    /// The connection's PROXY protocol header (v2 TLVs included), on a server that
    /// takes one ([`Builder::proxy_protocol`](crate::Builder::proxy_protocol)); the
    /// client's address from it is already [`peer_addr`](Ctx::peer_addr).
    pub fn proxy_header(&self) -> Option<&ProxyHeader> {
        self.peer.transport.as_ref()?.proxy.as_ref()
    }

    /// The application state shared by every connection of the server, as given to
    /// [`Builder::state`](crate::Builder::state) (or to the
    /// [`Harness`](crate::testing::Harness)).
    pub fn state(&self) -> &S {
        self.state
    }

    /// The time now: tokio's clock under a server (so `tokio::time::pause` governs
    /// it in tests), the virtual time under the [`Harness`](crate::testing::Harness).
    /// Read it instead of the clock for anything time-dependent in a protocol (an
    /// expiry, a rate), so that the harness can test it.
    pub fn now(&self) -> Instant {
        self.clock.unwrap_or_else(Instant::now)
    }
}

/// A change to the protocol's timer, for the driver (or harness) to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    Arm(Duration),
    Clear,
}

/// One connection's protocol, codec and buffers, with no socket and no clock: the
/// driver feeds it bytes and events and writes out what it queued.
///
/// Laid out in the order written (`repr(C)`), what every request touches first: with a
/// thousand connections, each request finds its connection's state out of the cache,
/// and every cache line it spans costs a miss.
#[repr(C)]
pub(crate) struct Session<P: Protocol<S>, S> {
    /// Bytes read from the peer and not yet decoded.
    pub(crate) input: BytesMut,
    /// Encoded replies not yet written.
    pub(crate) output: BytesMut,
    asked: Asked<P::Message>,
    /// Decoding stops while more than this many bytes of replies wait.
    max_output: usize,
    /// Decoding stopped with frames possibly left in `input`, because replies piled up.
    paused: bool,
    /// The peer has finished sending.
    eof: bool,
    /// Frames decoded so far.
    frames: u64,
    codec: P::Codec,
    protocol: P,
    peer: Peer,
    state: Arc<S>,
    /// The virtual time, under the harness.
    clock: Option<Instant>,
}

impl<P: Protocol<S>, S> Session<P, S> {
    /// Starts a session: calls [`Protocol::connect`]. Decoding pauses while more than
    /// `max_output` bytes of replies wait to be written.
    pub(crate) fn connect(
        mut codec: P::Codec,
        peer: Peer,
        state: Arc<S>,
        max_output: usize,
        clock: Option<Instant>,
    ) -> Self {
        let mut output = BytesMut::new();
        let mut asked = Asked::default();
        let protocol = P::connect(&mut Ctx {
            codec: &mut codec,
            output: &mut output,
            peer: &peer,
            state: &*state,
            asked: &mut asked,
            clock,
        });
        Session {
            protocol,
            codec,
            peer,
            state,
            clock,
            input: BytesMut::new(),
            output,
            asked,
            max_output,
            paused: false,
            eof: false,
            frames: 0,
        }
    }

    /// Runs one callback with a context over this session's parts.
    fn call(&mut self, f: impl FnOnce(&mut P, &mut Ctx<'_, P, S>) -> Next, on_close: CloseReason) {
        let mut ctx = Ctx {
            codec: &mut self.codec,
            output: &mut self.output,
            peer: &self.peer,
            state: &*self.state,
            asked: &mut self.asked,
            clock: self.clock,
        };
        if f(&mut self.protocol, &mut ctx) == Next::Close {
            self.asked.close.get_or_insert(on_close);
        }
    }

    /// Decodes every complete frame in `input` and hands each to the protocol, stopping
    /// early if the connection is closing. With `eof`, the peer has finished sending:
    /// what remains is decoded with [`Decoder::decode_eof`] and the session closes.
    ///
    /// Once more than the output limit waits to be written, decoding pauses (see
    /// [`is_paused`](Session::is_paused)): the rest is decoded by calling this again
    /// once the output has gone, so that a batch of requests cannot pile up replies
    /// without bound.
    pub(crate) fn decode(&mut self, eof: bool) {
        self.eof |= eof;
        self.paused = false;
        let (eof, max_output) = (self.eof, self.max_output);
        while self.asked.close.is_none() {
            if self.output.len() > max_output {
                self.paused = true;
                return;
            }
            let decoded = if eof {
                self.codec.decode_eof(&mut self.input)
            } else {
                self.codec.decode(&mut self.input)
            };
            match decoded {
                Ok(Some(frame)) => {
                    self.frames += 1;
                    self.call(|p, ctx| p.frame(frame, ctx), CloseReason::Closed);
                }
                Ok(None) => break,
                Err(e) => self.asked.close = Some(CloseReason::BadFrame(e.to_string())),
            }
        }
        if eof {
            self.asked.close.get_or_insert(CloseReason::PeerClosed);
        }
    }

    /// Whether replies the protocol queued on its own (from a timeout, the shutdown
    /// event, a message, spawned work) while `waiting` bytes of earlier ones still
    /// waited for the peer have piled up past the output limit. Replies to the peer's
    /// own requests never count: nothing is read while replies wait.
    pub(crate) fn overflowed(&self, waiting: usize) -> bool {
        waiting > 0 && self.output.len() > waiting && self.output.len() > self.max_output
    }

    /// Sets the virtual time the callbacks see as [`Ctx::now`].
    pub(crate) fn set_clock(&mut self, now: Instant) {
        self.clock = Some(now);
    }

    /// Replies encoded so far.
    pub(crate) fn replies(&self) -> u64 {
        self.asked.replies
    }

    /// The frames decoded so far.
    pub(crate) fn frames(&self) -> u64 {
        self.frames
    }

    /// Whether decoding paused for the output limit, with input left to decode.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    /// A message arrived: hands it to the protocol, unless the connection is closing.
    pub(crate) fn message(&mut self, message: P::Message) {
        if self.asked.close.is_none() {
            self.call(|p, ctx| p.message(message, ctx), CloseReason::Closed);
        }
    }

    /// What the callbacks asked to be done away from the connection, in order.
    pub(crate) fn take_effects(&mut self) -> Vec<Effect<P::Message>> {
        std::mem::take(&mut self.asked.effects)
    }

    /// Whether the callbacks asked for anything in [`take_effects`](Session::take_effects).
    pub(crate) fn has_effects(&self) -> bool {
        !self.asked.effects.is_empty()
    }

    /// The armed timeout expired.
    pub(crate) fn timeout(&mut self) {
        self.call(|p, ctx| p.timeout(ctx), CloseReason::StateTimeout);
    }

    /// The server asks the connection to finish.
    pub(crate) fn shutdown(&mut self) {
        self.call(|p, ctx| p.shutdown(ctx), CloseReason::Closed);
    }

    /// Ends the session: calls [`Protocol::closed`] and returns the reason, `cut` if
    /// the connection was cut short (an error, a timeout, the server), else the one it
    /// was closing for, with what `closed` asked to be done away from the connection.
    pub(crate) fn finish(
        &mut self,
        cut: Option<CloseReason>,
    ) -> (CloseReason, Vec<Effect<P::Message>>) {
        let reason = cut
            .or(self.asked.close.take())
            .unwrap_or(CloseReason::Closed);
        self.output.clear();
        self.call(
            |p, ctx| {
                p.closed(&reason, ctx);
                Next::Continue
            },
            CloseReason::Closed,
        );
        (reason, std::mem::take(&mut self.asked.effects))
    }

    /// Why the session is closing, once it is: queued output is still to be written.
    pub(crate) fn closing(&self) -> Option<&CloseReason> {
        self.asked.close.as_ref()
    }

    /// The timer change requested since the last call, if any.
    pub(crate) fn take_timer(&mut self) -> Option<Timer> {
        self.asked.timer.take()
    }

    /// The protocol's current state name.
    pub(crate) fn state_name(&self) -> &'static str {
        self.protocol.state_name()
    }

    /// The protocol itself.
    pub(crate) fn protocol(&self) -> &P {
        &self.protocol
    }
}
