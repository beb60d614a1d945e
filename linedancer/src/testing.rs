//! A harness that drives any [`Protocol`] with no socket and no clock: connect, feed
//! bytes in whatever splits you like, let virtual time pass, and read what it wrote.
//!
//! It runs the protocol in the same session code as the server, so what passes here
//! behaves the same over TCP. A protocol with application state gets it here as it
//! would from [`Builder::state`](crate::Builder::state); several harness connections
//! given the same `Arc` share it, as a server's connections do.
//!
//! ```
//! use linedancer::examples::Echo;
//! use linedancer::testing::Harness;
//!
//! let mut conn = Harness::<Echo>::connect();
//! conn.feed("G`day");
//! assert_eq!(conn.take_output(), "G`day");
//! conn.feed_eof();
//! assert!(conn.is_closed());
//! ```

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::close::CloseReason;
use crate::connections::ConnectionId;
use crate::protocol::{Effect, Peer, Protocol, Session, Timer};
use crate::transport::Address;

/// The peer address a harness connection reports.
pub const PEER_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

/// The local address a harness connection reports.
pub const LOCAL_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7000);

/// One simulated connection running the protocol `P`, with the application state `S`.
pub struct Harness<P: Protocol<S>, S = ()> {
    /// The live session; `None` once the connection has closed.
    session: Option<Session<P, S>>,
    /// Output written before the close, kept for [`take_output`](Harness::take_output).
    output: Vec<u8>,
    closed: Option<CloseReason>,
    /// Virtual time since connect.
    now: Duration,
    /// The instant virtual time starts from, for [`Ctx::now`](crate::Ctx::now).
    start: Instant,
    /// When the protocol's timeout fires, in virtual time.
    deadline: Option<Duration>,
    /// Messages and group changes the protocol asked for, not yet taken.
    outgoing: Vec<Outgoing<P::Message>>,
    /// Work the protocol spawned, not yet run.
    spawned: Vec<Pin<Box<dyn Future<Output = P::Message> + Send>>>,
}

/// What a protocol under the [`Harness`] asked to be done away from its connection,
/// in the order it asked: the sans-IO view of [`Ctx::send_to`](crate::Ctx::send_to),
/// [`Ctx::broadcast`](crate::Ctx::broadcast), [`Ctx::join`](crate::Ctx::join) and
/// [`Ctx::leave`](crate::Ctx::leave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing<M> {
    /// A message for connection `.0`.
    SendTo(ConnectionId, M),
    /// A message for the other members of `group`.
    Broadcast {
        /// The group.
        group: String,
        /// The message each member gets a copy of.
        message: M,
    },
    /// Joined a group.
    Join(String),
    /// Left a group.
    Leave(String),
}

impl<P: Protocol> Harness<P> {
    /// Connects with the default codec, as connection 1: calls [`Protocol::connect`].
    pub fn connect() -> Self
    where
        P::Codec: Default,
    {
        Self::connect_with_codec(P::Codec::default())
    }

    /// Connects with the given codec, as connection 1: calls [`Protocol::connect`].
    pub fn connect_with_codec(codec: P::Codec) -> Self {
        Self::connect_with(codec, Arc::new(()), ConnectionId(1))
    }
}

impl<P: Protocol<S>, S> Harness<P, S> {
    /// Connects with the default codec and the application state `state`, as
    /// connection 1: calls [`Protocol::connect`].
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use linedancer::examples::{Chat, Rooms};
    /// use linedancer::testing::Harness;
    /// use linedancer::ConnectionId;
    ///
    /// let rooms = Arc::new(Rooms::default());
    /// let mut ann = Harness::<Chat, Rooms>::connect_with_state(Arc::clone(&rooms));
    /// ann.feed("/nick ann\n");
    /// let codec = Default::default();
    /// let mut bob = Harness::<Chat, Rooms>::connect_with(codec, rooms, ConnectionId(2));
    /// bob.take_text();
    /// bob.feed("/who\n");
    /// assert_eq!(bob.take_text(), "* in lobby: guest2 (you), ann\n");
    /// ```
    pub fn connect_with_state(state: Arc<S>) -> Self
    where
        P::Codec: Default,
    {
        Self::connect_with(P::Codec::default(), state, ConnectionId(1))
    }

    /// Connects with the given codec and application state, as connection `id`: calls
    /// [`Protocol::connect`]. Give each of several connections that share a state an
    /// id of its own, as a server would.
    pub fn connect_with(codec: P::Codec, state: Arc<S>, id: ConnectionId) -> Self {
        let peer = Peer {
            id,
            peer_addr: Address::Ip(PEER_ADDR),
            local_addr: Address::Ip(LOCAL_ADDR),
            transport: None,
        };
        let start = Instant::now();
        let mut harness = Harness {
            session: Some(Session::connect(
                codec,
                peer,
                state,
                crate::DEFAULT_MAX_OUTPUT,
                Some(start),
            )),
            output: Vec::new(),
            closed: None,
            now: Duration::ZERO,
            start,
            deadline: None,
            outgoing: Vec::new(),
            spawned: Vec::new(),
        };
        harness.settle();
        harness
    }

    /// The peer sends `bytes`: every complete frame is decoded and handed to the
    /// protocol. Ignored once the connection is closed.
    pub fn feed(&mut self, bytes: impl AsRef<[u8]>) {
        if let Some(session) = &mut self.session {
            session.input.extend_from_slice(bytes.as_ref());
            session.decode(false);
            self.settle();
        }
    }

    /// The peer closes its side: what is left is decoded as the last frame, and the
    /// connection closes with [`CloseReason::PeerClosed`].
    pub fn feed_eof(&mut self) {
        if let Some(session) = &mut self.session {
            session.decode(true);
            self.settle();
        }
    }

    /// Lets `duration` of virtual time pass, firing the protocol's timeout if it falls
    /// due (and again, if the protocol re-arms it within the same span).
    /// [`Ctx::now`](crate::Ctx::now) moves with it.
    pub fn advance(&mut self, duration: Duration) {
        let until = self.now + duration;
        while let Some(deadline) = self.deadline.filter(|d| *d <= until) {
            self.now = deadline;
            self.deadline = None;
            match &mut self.session {
                Some(session) => {
                    session.set_clock(self.start + deadline);
                    session.timeout();
                }
                None => break,
            }
            self.settle();
        }
        self.now = until;
        if let Some(session) = &mut self.session {
            session.set_clock(self.start + until);
        }
    }

    /// A message arrives in the connection's mailbox: delivers it to
    /// [`Protocol::message`]. Ignored once the connection is closed.
    pub fn deliver(&mut self, message: P::Message) {
        if let Some(session) = &mut self.session {
            session.message(message);
            self.settle();
        }
    }

    /// Takes the messages and group changes the protocol has asked for since the last
    /// call, in order.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing<P::Message>> {
        std::mem::take(&mut self.outgoing)
    }

    /// Runs the work the protocol spawned with [`Ctx::spawn`](crate::Ctx::spawn) to
    /// completion, one after the other on a runtime of its own, delivering each
    /// result as a message; returns how many ran. Work spawned meanwhile waits for the
    /// next call. Call it outside any tokio runtime.
    ///
    /// # Panics
    ///
    /// If the runtime cannot be made, or inside a runtime.
    pub fn run_spawned(&mut self) -> usize {
        let work = std::mem::take(&mut self.spawned);
        if work.is_empty() {
            return 0;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the spawned work");
        let count = work.len();
        for future in work {
            let message = runtime.block_on(future);
            self.deliver(message);
        }
        count
    }

    /// The server shuts down: delivers the protocol's shutdown event.
    pub fn shutdown(&mut self) {
        if let Some(session) = &mut self.session {
            session.shutdown();
            self.settle();
        }
    }

    /// Takes every byte the protocol has written since the last call.
    pub fn take_output(&mut self) -> Bytes {
        if let Some(session) = &mut self.session {
            self.output.extend_from_slice(&session.output);
            session.output.clear();
        }
        Bytes::from(std::mem::take(&mut self.output))
    }

    /// Discards what the protocol has written since the last call, and says how many
    /// bytes that was: for tests and benchmarks that look only at state.
    pub fn clear_output(&mut self) -> usize {
        let mut cleared = self.output.len();
        self.output.clear();
        if let Some(session) = &mut self.session {
            cleared += session.output.len();
            session.output.clear();
        }
        cleared
    }

    /// Takes what the protocol has written since the last call as text, lossily
    /// decoded from UTF-8.
    pub fn take_text(&mut self) -> String {
        String::from_utf8_lossy(&self.take_output()).into_owned()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// The protocol's state, while the connection is open.
    pub fn protocol(&self) -> Option<&P> {
        self.session.as_ref().map(Session::protocol)
    }

    /// The protocol's state name, while the connection is open.
    pub fn state_name(&self) -> Option<&'static str> {
        self.session.as_ref().map(Session::state_name)
    }

    /// How long until the protocol's timeout fires, if one is armed.
    pub fn timeout_in(&self) -> Option<Duration> {
        self.deadline.map(|d| d - self.now)
    }

    /// Applies what the last callback asked for: its output goes to the peer, which
    /// takes it at once (so decoding paused for the output limit goes on), a timer
    /// changes, the connection closes (after which the output written so far stays
    /// readable).
    fn settle(&mut self) {
        let Some(session) = &mut self.session else {
            return;
        };
        // The peer takes what was written at once, so decoding paused for the output
        // limit goes on.
        while session.is_paused() {
            self.output.extend_from_slice(&session.output);
            session.output.clear();
            session.decode(false);
        }
        if session.has_effects() {
            let effects = session.take_effects();
            self.take_effects(effects);
        }
        let Some(session) = &mut self.session else {
            return;
        };
        match session.take_timer() {
            Some(Timer::Arm(after)) => self.deadline = Some(self.now + after),
            Some(Timer::Clear) => self.deadline = None,
            None => {}
        }
        if session.closing().is_some() {
            if let Some(mut session) = self.session.take() {
                self.output.extend_from_slice(&session.output);
                let (reason, effects) = session.finish(None);
                self.closed = Some(reason);
                self.take_effects(effects);
                self.deadline = None;
            }
        }
    }

    /// Keeps what the protocol asked to be done away from the connection: messages and
    /// group changes for [`take_outgoing`](Harness::take_outgoing), work for
    /// [`run_spawned`](Harness::run_spawned).
    fn take_effects(&mut self, effects: Vec<Effect<P::Message>>) {
        for effect in effects {
            match effect {
                Effect::SendTo(to, message) => self.outgoing.push(Outgoing::SendTo(to, message)),
                Effect::Broadcast { group, message, .. } => {
                    self.outgoing.push(Outgoing::Broadcast {
                        group: group.to_string(),
                        message: message(),
                    })
                }
                Effect::Join(group, _) => self.outgoing.push(Outgoing::Join(group.to_string())),
                Effect::Leave(group) => self.outgoing.push(Outgoing::Leave(group.to_string())),
                Effect::Spawn(work) => self.spawned.push(work),
            }
        }
    }
}
