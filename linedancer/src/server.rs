//! Starting a server ([`Builder`]) and controlling it once started ([`ServerHandle`]).

use std::any::TypeId;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::info;

use crate::connections::{ConnectionId, ConnectionInfo, Connections, Limits, SendError};
use crate::driver::Driver;
use crate::error::Error;
use crate::handler::Handler;
use crate::listener::{self, Gate};
use crate::protocol::Protocol;
use crate::stats::Stats;

/// The default port, the original's.
pub const DEFAULT_PORT: u16 = 7000;

/// The default limit on live connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default time a graceful shutdown waits for connections to finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The default time a peer may take none of a pending reply before its connection is
/// closed.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The default limit on replies waiting to be written to one connection, in bytes.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// The default number of messages a connection's mailbox holds.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 1024;

/// The default length of the queue of connections the kernel completes before we
/// accept them.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// Which threads serve the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threading {
    /// The tokio runtime that calls [`Builder::start`] runs the acceptor and every
    /// connection: with a multi-thread runtime, idle workers steal connections from
    /// busy ones. The default.
    #[default]
    Shared,
    /// `n` threads of the server's own, each with a single-threaded runtime and its own
    /// listening socket on the same port (`SO_REUSEPORT`): the kernel spreads new
    /// connections over the sockets, and a connection stays on the thread that accepted
    /// it, with no cross-thread synchronization on its path.
    PerCore(usize),
}

/// Entry point: `Server::builder()`.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder with every setting at its default: `127.0.0.1`, port 7000, and no
    /// protocol yet (choose one with [`Builder::protocol`] or [`Builder::handler`]).
    pub fn builder() -> Builder<()> {
        Builder {
            settings: Settings {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: DEFAULT_PORT,
                backlog: DEFAULT_BACKLOG,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                threading: Threading::Shared,
                limits: Limits {
                    idle_timeout: None,
                    send_timeout: DEFAULT_SEND_TIMEOUT,
                    max_output: DEFAULT_MAX_OUTPUT,
                    mailbox_capacity: DEFAULT_MAILBOX_CAPACITY,
                },
                message_type: None,
            },
            handler: (),
        }
    }
}

/// Settings of a server, and what serves its connections (`H`).
///
/// ```
/// use linedancer::examples::Echo;
/// use linedancer::Server;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), linedancer::Error> {
/// let server = Server::builder()
///     .bind([127, 0, 0, 1])
///     .port(0) // any free port
///     .protocol::<Echo>()
///     .start()
///     .await?;
/// println!("listening on {}", server.local_addr());
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until started"]
pub struct Builder<H> {
    settings: Settings,
    handler: H,
}

/// The builder's settings, apart from the handler.
#[derive(Debug, Clone, Copy)]
struct Settings {
    ip: IpAddr,
    port: u16,
    backlog: u32,
    max_connections: usize,
    drain_timeout: Duration,
    threading: Threading,
    limits: Limits,
    /// The protocol's message type, with its name; `None` for a raw handler.
    message_type: Option<(TypeId, &'static str)>,
}

impl Settings {
    /// Refuses a setting the server cannot run with, naming it.
    fn check(&self) -> Result<(), Error> {
        let refuse = |setting, value: String, reason| Error::Config {
            setting,
            value,
            reason,
        };
        if self.max_connections == 0 {
            return Err(refuse("max_connections", "0".into(), "must be at least 1"));
        }
        if self.backlog == 0 {
            return Err(refuse("backlog", "0".into(), "must be at least 1"));
        }
        if self.limits.idle_timeout == Some(Duration::ZERO) {
            return Err(refuse("idle_timeout", "0s".into(), "must be above zero"));
        }
        if self.limits.send_timeout.is_zero() {
            return Err(refuse("send_timeout", "0s".into(), "must be above zero"));
        }
        if self.limits.max_output == 0 {
            return Err(refuse("max_output", "0".into(), "must be at least 1"));
        }
        if self.limits.mailbox_capacity == 0 {
            return Err(refuse("mailbox_capacity", "0".into(), "must be at least 1"));
        }
        if self.threading == Threading::PerCore(0) {
            return Err(refuse(
                "threading",
                "PerCore(0)".into(),
                "needs at least 1 thread",
            ));
        }
        Ok(())
    }
}

impl<H> Builder<H> {
    /// The address to listen on. Default `127.0.0.1`; `0.0.0.0` listens on every IPv4
    /// interface.
    pub fn bind(mut self, ip: impl Into<IpAddr>) -> Self {
        self.settings.ip = ip.into();
        self
    }

    /// The port to listen on. Default 7000; 0 picks a free port, which
    /// [`ServerHandle::local_addr`] reports.
    pub fn port(mut self, port: u16) -> Self {
        self.settings.port = port;
        self
    }

    /// The listen backlog: connections the kernel completes before we accept them.
    /// Default [`DEFAULT_BACKLOG`]; the kernel may cap it (`net.core.somaxconn`).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.settings.backlog = backlog;
        self
    }

    /// The most connections served at once; at the limit the server stops accepting
    /// until one closes, and new peers wait in the backlog. Default
    /// [`DEFAULT_MAX_CONNECTIONS`]; must be at least 1. Change it while running with
    /// [`ServerHandle::set_max_connections`].
    pub fn max_connections(mut self, max: usize) -> Self {
        self.settings.max_connections = max;
        self
    }

    /// How long [`ServerHandle::shutdown`] waits for connections to finish before it
    /// closes them. Default [`DEFAULT_DRAIN_TIMEOUT`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = timeout;
        self
    }

    /// Closes a connection when no bytes arrive from its peer for `timeout`
    /// ([`CloseReason::IdleTimeout`](crate::CloseReason::IdleTimeout)). Time spent
    /// waiting for the peer to take our replies does not count. Default: no idle
    /// timeout. Must be above zero.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.limits.idle_timeout = Some(timeout);
        self
    }

    /// Closes a connection when its peer takes none of a pending reply for `timeout`
    /// ([`CloseReason::SendTimeout`](crate::CloseReason::SendTimeout)): a peer that
    /// stops reading. Default [`DEFAULT_SEND_TIMEOUT`]; must be above zero.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.settings.limits.send_timeout = timeout;
        self
    }

    /// Closes a connection when more than `bytes` of replies wait to be written
    /// ([`CloseReason::OutputOverflow`](crate::CloseReason::OutputOverflow)). The
    /// driver reads no more requests while replies wait, so this bounds what the
    /// replies to one read (and, later, messages) may pile up; raise it for protocols
    /// with large replies. Default [`DEFAULT_MAX_OUTPUT`]; must be at least 1.
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.settings.limits.max_output = bytes;
        self
    }

    /// How many messages a connection's mailbox holds. A message sent to a full
    /// mailbox is dropped and the connection closed
    /// ([`CloseReason::MailboxOverflow`](crate::CloseReason::MailboxOverflow)): a slow
    /// receiver never blocks its senders nor grows without bound. Default
    /// [`DEFAULT_MAILBOX_CAPACITY`]; must be at least 1.
    pub fn mailbox_capacity(mut self, messages: usize) -> Self {
        self.settings.limits.mailbox_capacity = messages;
        self
    }

    /// Which threads serve the connections. Default [`Threading::Shared`]; with
    /// [`Threading::PerCore`], `n` must be at least 1.
    pub fn threading(mut self, threading: Threading) -> Self {
        self.settings.threading = threading;
        self
    }

    /// Serves every connection with the protocol `P`, framed by `P::Codec::default()`.
    pub fn protocol<P>(self) -> Builder<Driver<P>>
    where
        P: Protocol,
        P::Codec: Default + Clone + Sync,
    {
        self.protocol_with_codec::<P>(P::Codec::default())
    }

    /// Serves every connection with the protocol `P`, framed by a clone of `codec` (for
    /// a codec with settings, such as [`Lines::with_max_length`](crate::codec::Lines)).
    pub fn protocol_with_codec<P>(self, codec: P::Codec) -> Builder<Driver<P>>
    where
        P: Protocol,
        P::Codec: Clone + Sync,
    {
        let mut builder = self.handler(Driver::new(codec));
        builder.settings.message_type = Some((
            TypeId::of::<P::Message>(),
            std::any::type_name::<P::Message>(),
        ));
        builder
    }

    /// Serves every connection with a [`Handler`] that gets the raw stream, instead of
    /// a protocol state machine.
    pub fn handler<H2: Handler>(self, handler: H2) -> Builder<H2> {
        Builder {
            settings: Settings {
                message_type: None,
                ..self.settings
            },
            handler,
        }
    }
}

impl<H: Handler> Builder<H> {
    /// Binds the listening socket and starts accepting, in tasks on the current tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a setting out of range, [`Error::Bind`] when the address
    /// cannot be listened on (in use, not local, privileged port).
    pub async fn start(self) -> Result<ServerHandle, Error> {
        let settings = self.settings;
        settings.check()?;
        let addr = SocketAddr::new(settings.ip, settings.port);
        let bind_error = |source| Error::Bind { addr, source };
        let connections = Connections::new(
            settings.max_connections,
            settings.limits,
            settings.message_type,
        );
        let handler = Arc::new(self.handler);
        let gate = Arc::new(Gate::default());
        let acceptors = TaskTracker::new();
        let local_addr = match settings.threading {
            Threading::Shared => {
                let tcp = listener::bind(addr, settings.backlog, false).map_err(bind_error)?;
                let local_addr = tcp.local_addr().map_err(bind_error)?;
                let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind_error)?;
                acceptors.spawn(listener::accept_loop(
                    tcp,
                    Arc::clone(&connections),
                    handler,
                    Arc::clone(&gate),
                ));
                local_addr
            }
            Threading::PerCore(threads) => {
                let started = start_per_core(
                    threads,
                    addr,
                    settings.backlog,
                    &connections,
                    &handler,
                    &gate,
                    &acceptors,
                )
                .await;
                if started.is_err() {
                    // Threads already running see this and end.
                    gate.stop();
                }
                started?
            }
        };
        info!(%local_addr, "listening");
        Ok(ServerHandle {
            inner: Arc::new(Inner {
                local_addr,
                connections,
                gate,
                acceptors,
                drain_timeout: settings.drain_timeout,
                open_at_shutdown: OnceLock::new(),
            }),
        })
    }
}

/// Starts `threads` threads, each with a single-threaded runtime running an accept loop
/// on its own `SO_REUSEPORT` socket, and returns the address they share once every one
/// is accepting.
async fn start_per_core<H: Handler>(
    threads: usize,
    addr: SocketAddr,
    backlog: u32,
    connections: &Arc<Connections>,
    handler: &Arc<H>,
    gate: &Arc<Gate>,
    acceptors: &TaskTracker,
) -> Result<SocketAddr, Error> {
    // A free port is settled first (0 picks one); then every socket joins it.
    let addr = listener::free_address(addr).map_err(|source| Error::Bind { addr, source })?;
    let bind_error = |source| Error::Bind { addr, source };
    let sockets = (0..threads)
        .map(|_| listener::bind(addr, backlog, true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bind_error)?;
    for (index, socket) in sockets.into_iter().enumerate() {
        let (ready, started) = tokio::sync::oneshot::channel();
        let (connections, handler) = (Arc::clone(connections), Arc::clone(handler));
        let (gate, acceptors) = (Arc::clone(gate), acceptors.clone());
        let thread = move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(listener::spin_before_sleep)
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready.send(Err(e))),
            };
            // Runs this thread's connections until the server has stopped and every
            // connection has ended.
            runtime.block_on(async {
                let tcp = match tokio::net::TcpListener::from_std(socket) {
                    Ok(tcp) => tcp,
                    Err(e) => return drop(ready.send(Err(e))),
                };
                acceptors.spawn(listener::accept_loop(
                    tcp,
                    Arc::clone(&connections),
                    handler,
                    Arc::clone(&gate),
                ));
                let _ = ready.send(Ok(()));
                gate.stopped().await;
                connections.wait_all().await;
            });
        };
        std::thread::Builder::new()
            .name(format!("linedancer-{index}"))
            .spawn(thread)
            .map_err(bind_error)?;
        match started.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(bind_error(e)),
            Err(_) => {
                return Err(bind_error(std::io::Error::other(
                    "server thread ended at start",
                )))
            }
        }
    }
    Ok(addr)
}

/// A running server. Clones control the same server; dropping every handle leaves it
/// running until the runtime ends.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    local_addr: SocketAddr,
    connections: Arc<Connections>,
    /// Suspends, resumes and stops the acceptors.
    gate: Arc<Gate>,
    /// The accept loops, awaited so that the listening sockets are closed before the
    /// connections are drained.
    acceptors: TaskTracker,
    drain_timeout: Duration,
    /// The connections open when the first shutdown call closed the listeners: every
    /// later call reports against them.
    open_at_shutdown: OnceLock<usize>,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections that finished by themselves within the drain timeout.
    pub drained: usize,
    /// Connections still open when the drain timeout ended, closed by the server.
    pub force_closed: usize,
}

impl ServerHandle {
    /// The address the server listens on, with the real port when 0 was asked for.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The number of live connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.count()
    }

    /// Waits until the number of live connections satisfies `ready`, and returns it.
    ///
    /// ```
    /// # async fn f(server: linedancer::ServerHandle) {
    /// server.wait_connections(|n| n == 0).await;
    /// # }
    /// ```
    pub async fn wait_connections(&self, ready: impl FnMut(usize) -> bool) -> usize {
        self.inner.connections.wait_count(ready).await
    }

    /// The server's counters: connections accepted, open and closed by reason, accept
    /// errors, bytes in and out.
    pub fn stats(&self) -> Stats {
        self.inner.connections.stats()
    }

    /// The live connections, in id order: id, peer, protocol state, connected since,
    /// bytes in and out.
    pub fn connections_info(&self) -> Vec<ConnectionInfo> {
        self.inner.connections.list()
    }

    /// Sends `message` to the mailbox of connection `to`, for its protocol's
    /// [`message`](Protocol::message) callback. Never blocks.
    ///
    /// # Errors
    ///
    /// [`SendError`]: the connection is not open, its mailbox is full (it is then
    /// closed), or `M` is not the protocol's [`Message`](Protocol::Message) type.
    pub fn send_to<M: Send + 'static>(
        &self,
        to: ConnectionId,
        message: M,
    ) -> Result<(), SendError> {
        let connections = &self.inner.connections;
        connections.check_type::<M>()?;
        connections.post(to, Box::new(message))
    }

    /// Sends a copy of `message` to every member of `group`, and returns how many took
    /// one (a member whose mailbox is full is closed instead).
    ///
    /// # Errors
    ///
    /// [`SendError::WrongType`] if `M` is not the protocol's message type.
    pub fn broadcast<M: Clone + Send + 'static>(
        &self,
        group: &str,
        message: M,
    ) -> Result<usize, SendError> {
        let connections = &self.inner.connections;
        connections.check_type::<M>()?;
        Ok(connections.broadcast(group, &|| Box::new(message.clone()), None))
    }

    /// The members of `group`, in id order.
    pub fn group_members(&self, group: &str) -> Vec<ConnectionId> {
        self.inner.connections.members(group)
    }

    /// The connection limit.
    pub fn max_connections(&self) -> usize {
        self.inner.connections.max()
    }

    /// Changes the connection limit while running. Raised, accepting resumes at once
    /// if it was held at the old limit. Lowered below the connections open, none is
    /// closed: no more are accepted until enough have ended.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for 0, naming the value; the limit is unchanged.
    pub fn set_max_connections(&self, max: usize) -> Result<(), Error> {
        if max == 0 {
            return Err(Error::Config {
                setting: "max_connections",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        self.inner.connections.set_max(max);
        info!(max_connections = max, "connection limit changed");
        Ok(())
    }

    /// Stops accepting for now; established connections go on being served.
    ///
    /// The listening sockets stay open, so the port stays ours: a client that connects
    /// meanwhile completes the TCP handshake with the kernel and waits, unserved, in the
    /// backlog until [`resume`](ServerHandle::resume) (beyond the backlog, the kernel
    /// ignores its SYNs and the client retries until its own connect timeout).
    pub fn suspend(&self) {
        if self.inner.gate.suspend() {
            info!(local_addr = %self.inner.local_addr, "accepting suspended");
        }
    }

    /// Accepts again after [`suspend`](ServerHandle::suspend); the clients waiting in
    /// the backlog are served first.
    pub fn resume(&self) {
        if self.inner.gate.resume() {
            info!(local_addr = %self.inner.local_addr, "accepting resumed");
        }
    }

    /// Whether accepting is suspended.
    pub fn is_suspended(&self) -> bool {
        self.inner.gate.is_suspended()
    }

    /// Shuts down gracefully with the builder's drain timeout; see
    /// [`shutdown_with_timeout`](ServerHandle::shutdown_with_timeout).
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shutdown_with_timeout(self.inner.drain_timeout).await
    }

    /// Shuts down gracefully: closes the listening socket (new connects are refused at
    /// once), gives every connection's protocol its [`shutdown`](Protocol::shutdown)
    /// event, waits up to `timeout` for the connections to end, then closes those still
    /// open. Replies already queued are written before each close.
    ///
    /// Calling it again, or from a clone (say, with a zero timeout to cut a drain
    /// short), waits again; its report covers the whole shutdown, from the first call.
    pub async fn shutdown_with_timeout(&self, timeout: Duration) -> ShutdownReport {
        let inner = &self.inner;
        inner.gate.stop();
        inner.acceptors.close();
        inner.acceptors.wait().await;
        let open = *inner.open_at_shutdown.get_or_init(|| {
            let open = inner.connections.count();
            info!(
                local_addr = %inner.local_addr,
                connections = open,
                "listener closed, draining"
            );
            open
        });
        inner.connections.drain_all();
        let force_closed = match tokio::time::timeout(timeout, inner.connections.wait_all()).await {
            Ok(()) => 0,
            Err(_) => {
                let left = inner.connections.count();
                inner.connections.abort_all().await;
                left
            }
        };
        let report = ShutdownReport {
            drained: open.saturating_sub(force_closed),
            force_closed,
        };
        info!(
            local_addr = %inner.local_addr,
            drained = report.drained,
            force_closed = report.force_closed,
            "server stopped"
        );
        report
    }
}
