//! Starting a server ([`Builder`]) and controlling it once started ([`ServerHandle`]).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::cluster::{Cluster, ClusterLink, ClusterMessage};
use crate::connections::{
    ConnectionId, ConnectionInfo, Connections, Limits, Reservation, SendError,
};
use crate::driver::Driver;
use crate::error::Error;
use crate::handler::{Handler, Service};
use crate::listener::{self, Acceptor, Gate, Listening, SocketFile};
use crate::process::{self, Successor};
use crate::protocol::Protocol;
use crate::stats::Stats;
use crate::transport::proxy::{ProxyProtocol, DEFAULT_PROXY_HEADER_TIMEOUT};
use crate::transport::tls::{TlsConfig, DEFAULT_MAX_HANDSHAKES, DEFAULT_TLS_HANDSHAKE_TIMEOUT};
use crate::transport::{Address, Front, ProxySettings, Stream, TlsSettings};

/// The default port, the original's.
pub const DEFAULT_PORT: u16 = 7000;

/// The default limit on live connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default time a graceful shutdown waits for connections to finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The default time a peer may take none of a pending reply before its connection is
/// closed.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The default time a frame that has begun may take to complete.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// The default idle time after which TCP keepalive probes a silent peer.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(120);

/// The default limit on replies waiting to be written to one connection, in bytes.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// The default number of messages a connection's mailbox holds.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 1024;

/// The default length of the queue of connections the kernel completes before we
/// accept them.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// Which threads serve the connections.
///
/// The library's default is [`Shared`](Threading::Shared): a server embedded in a
/// program runs on that program's runtime and starts no threads of its own. The
/// `linedancer serve` command runs [`PerCore`](Threading::PerCore) by default (its
/// `--threading per-core`), because it owns the whole process: on the 2-core machine
/// the project is measured on, per-core spent 5% less CPU per request than tokio's
/// work-stealing runtime with 50 and 1,000 connections. Choose `PerCore` in your own
/// program when the server is what the process is for.
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
    /// it, with no cross-thread synchronization on its path. With a listener of your
    /// own ([`Builder::listener`]), the threads share that one socket instead.
    PerCore(usize),
}

/// Entry point: `Server::builder()`.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder with every setting at its default: `127.0.0.1`, port 7000, no
    /// application state, and no protocol yet (choose one with [`Builder::protocol`] or
    /// [`Builder::handler`]).
    pub fn builder() -> Builder<()> {
        Builder {
            settings: Settings {
                backlog: DEFAULT_BACKLOG,
                tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
                max_connections: DEFAULT_MAX_CONNECTIONS,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                threading: Threading::Shared,
                tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
                max_handshakes: DEFAULT_MAX_HANDSHAKES,
                proxy_header_timeout: DEFAULT_PROXY_HEADER_TIMEOUT,
                limits: Limits {
                    idle_timeout: None,
                    frame_timeout: DEFAULT_FRAME_TIMEOUT,
                    send_timeout: DEFAULT_SEND_TIMEOUT,
                    max_output: DEFAULT_MAX_OUTPUT,
                    mailbox_capacity: DEFAULT_MAILBOX_CAPACITY,
                },
            },
            listen: Places::default(),
            transport: TransportConfig::default(),
            handler: (),
            state: Arc::new(()),
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
pub struct Builder<H, S = ()> {
    settings: Settings,
    listen: Places,
    transport: TransportConfig,
    handler: H,
    /// The application state, handed to the protocol chosen next.
    state: Arc<S>,
}

/// Where the server listens, and how it gets its listening sockets.
#[derive(Debug, Default)]
struct Places {
    /// The TCP address; without one, 127.0.0.1:7000 unless there are Unix sockets.
    tcp: Option<Listen>,
    /// [`Builder::unix`].
    unix: Vec<PathBuf>,
    /// [`Builder::unix_mode`].
    unix_mode: Option<u32>,
    /// [`Builder::socket_activation`].
    activation: bool,
    /// [`Builder::upgrade_socket`].
    upgrade_socket: Option<PathBuf>,
    /// [`Builder::upgrade_from`].
    upgrade_from: Option<PathBuf>,
    /// [`Builder::sd_notify`].
    sd_notify: bool,
}

/// Where the server listens on TCP.
#[derive(Debug)]
enum Listen {
    /// [`Builder::bind`] and [`Builder::port`].
    Ip { ip: IpAddr, port: u16 },
    /// [`Builder::address`]: `host:port` text, resolved at start.
    Text(String),
    /// [`Builder::listener`]: a socket already bound.
    Listener(std::net::TcpListener),
}

/// TLS and the PROXY protocol, as the builder was told.
#[derive(Debug, Default)]
struct TransportConfig {
    tls: Option<TlsConfig>,
    proxy: Option<ProxyProtocol>,
}

impl TransportConfig {
    /// What the listeners put in front of every connection; `None` without TLS or the
    /// PROXY protocol. Loads the certificates: bad files fail here, before binding.
    fn front(self, settings: &Settings) -> Result<Option<Arc<Front>>, Error> {
        if self.tls.is_none() && self.proxy.is_none() {
            return Ok(None);
        }
        let proxy = match self.proxy {
            Some(proxy) => Some(ProxySettings {
                trusted: proxy.networks()?,
                timeout: settings.proxy_header_timeout,
            }),
            None => None,
        };
        let tls = match self.tls {
            Some(tls) => Some(TlsSettings {
                tls: tls.load()?,
                timeout: settings.tls_handshake_timeout,
            }),
            None => None,
        };
        Ok(Some(Arc::new(Front {
            proxy,
            tls,
            handshakes: Arc::new(Semaphore::new(settings.max_handshakes)),
        })))
    }
}

/// The builder's settings, apart from where it listens and what serves.
#[derive(Debug, Clone, Copy)]
struct Settings {
    backlog: u32,
    tcp_keepalive: Option<Duration>,
    max_connections: usize,
    drain_timeout: Duration,
    threading: Threading,
    tls_handshake_timeout: Duration,
    max_handshakes: usize,
    proxy_header_timeout: Duration,
    limits: Limits,
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
        if self.limits.frame_timeout.is_zero() {
            return Err(refuse("frame_timeout", "0s".into(), "must be above zero"));
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
        if self.tcp_keepalive == Some(Duration::ZERO) {
            return Err(refuse(
                "tcp_keepalive",
                "0s".into(),
                "must be above zero, or off",
            ));
        }
        if self.tls_handshake_timeout.is_zero() {
            return Err(refuse(
                "tls_handshake_timeout",
                "0s".into(),
                "must be above zero",
            ));
        }
        if self.max_handshakes == 0 {
            return Err(refuse("max_handshakes", "0".into(), "must be at least 1"));
        }
        if self.proxy_header_timeout.is_zero() {
            return Err(refuse(
                "proxy_header_timeout",
                "0s".into(),
                "must be above zero",
            ));
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

impl<H, S> Builder<H, S> {
    /// The IP address to listen on. Default `127.0.0.1`; `0.0.0.0` listens on every
    /// IPv4 interface, `::` on every IPv6 one.
    pub fn bind(mut self, ip: impl Into<IpAddr>) -> Self {
        let port = match self.listen.tcp {
            Some(Listen::Ip { port, .. }) => port,
            _ => DEFAULT_PORT,
        };
        self.listen.tcp = Some(Listen::Ip {
            ip: ip.into(),
            port,
        });
        self
    }

    /// The port to listen on. Default 7000; 0 picks a free port, which
    /// [`ServerHandle::local_addr`] reports.
    pub fn port(mut self, port: u16) -> Self {
        let ip = match self.listen.tcp {
            Some(Listen::Ip { ip, .. }) => ip,
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        self.listen.tcp = Some(Listen::Ip { ip, port });
        self
    }

    /// The address to listen on, as text: `127.0.0.1:7000`, `[::1]:7000`,
    /// `localhost:7000` (a name is resolved when the server starts, and its first
    /// address is used). Replaces [`bind`](Builder::bind) and [`port`](Builder::port).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), linedancer::Error> {
    /// let server = linedancer::Server::builder()
    ///     .address("127.0.0.1:0")
    ///     .protocol::<linedancer::examples::Echo>()
    ///     .start()
    ///     .await?;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.listen.tcp = Some(Listen::Text(address.into()));
        self
    }

    /// Listens on a socket you have bound yourself (with your own options, or handed
    /// over by a supervisor), instead of binding one. The server makes it non-blocking
    /// and closes it on shutdown; with [`Threading::PerCore`], every thread accepts
    /// from it. Replaces [`bind`](Builder::bind), [`port`](Builder::port) and
    /// [`address`](Builder::address).
    pub fn listener(mut self, listener: std::net::TcpListener) -> Self {
        self.listen.tcp = Some(Listen::Listener(listener));
        self
    }

    /// Listens on a Unix-domain socket at `path` too; repeat it for several. Given
    /// without a TCP address ([`bind`](Builder::bind), [`port`](Builder::port),
    /// [`address`](Builder::address), [`listener`](Builder::listener)), the server
    /// listens on its Unix sockets only. A socket file left by a server that is gone is
    /// replaced; one a server listens on fails at start ([`Error::Unix`], "in use"), as
    /// does any other file in the way. The file is removed when the server stops (not
    /// when it hands over to a successor). Peers are
    /// [`Address::Unix`]`(None)`, shown as `unix`; their credentials are
    /// [`Ctx::peer_credentials`](crate::Ctx::peer_credentials).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = std::env::temp_dir().join(format!("linedancer-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let server = linedancer::Server::builder()
    ///     .unix(dir.join("echo.sock"))
    ///     .protocol::<linedancer::examples::Echo>()
    ///     .start()
    ///     .await?;
    /// let mut client = tokio::net::UnixStream::connect(dir.join("echo.sock")).await?;
    /// # drop(client);
    /// server.shutdown().await;
    /// assert!(!dir.join("echo.sock").exists());
    /// # Ok(())
    /// # }
    /// ```
    pub fn unix(mut self, path: impl Into<PathBuf>) -> Self {
        self.listen.unix.push(path.into());
        self
    }

    /// The permissions of the Unix socket files the server makes, such as `0o660` to
    /// let a proxy of the same group connect (connecting takes write permission). Set
    /// before the socket listens. Default: as the process's umask leaves them (`0o755`
    /// with the usual umask 022: only the owner can connect).
    pub fn unix_mode(mut self, mode: u32) -> Self {
        self.listen.unix_mode = Some(mode);
        self
    }

    /// Adopts the listening sockets a supervisor passed to the process (systemd's socket
    /// activation: `LISTEN_FDS` descriptors from 3 on, when `LISTEN_PID` is this
    /// process), instead of binding any TCP or Unix address of the builder. Each must be
    /// a listening TCP or Unix stream socket, or [`start`](Builder::start) fails naming
    /// it ([`Error::Activation`]). Without the variables, the builder's addresses are
    /// bound as usual. The sockets are adopted once per process.
    pub fn socket_activation(mut self) -> Self {
        self.listen.activation = true;
        self
    }

    /// Listens on a Unix socket at `path` (mode 0600) for a successor: a new server
    /// started with [`upgrade_from`](Builder::upgrade_from) the same path receives
    /// every listening socket of this one, and starts accepting on them; then this one
    /// stops accepting and drains, as in [`ServerHandle::shutdown`], and
    /// [`ServerHandle::handed_over`] completes. Until the successor says it is ready,
    /// this server accepts as before, and goes on if the successor fails. Only a peer
    /// of the same user (or root) is answered.
    pub fn upgrade_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.listen.upgrade_socket = Some(path.into());
        self
    }

    /// Takes over from the running server whose [`upgrade_socket`](Builder::upgrade_socket)
    /// is `path`: its listening sockets are adopted instead of binding the same
    /// addresses (an address of this builder that it does not have is bound; a socket
    /// it has that this builder does not name is closed). No connection is refused
    /// during the swap: both servers hold the same sockets until the old one stops
    /// accepting, once this one accepts.
    ///
    /// # Errors
    ///
    /// [`start`](Builder::start) fails with [`Error::Upgrade`] when no server answers
    /// at `path`, or what it sends is not a linedancer server's sockets; the old server
    /// goes on serving.
    pub fn upgrade_from(mut self, path: impl Into<PathBuf>) -> Self {
        self.listen.upgrade_from = Some(path.into());
        self
    }

    /// Tells a supervisor that listens on `NOTIFY_SOCKET` (systemd, for a
    /// `Type=notify` service) `READY=1` and `MAINPID` once the server accepts, and
    /// `STOPPING=1` when it begins to drain (not when it hands over to a successor,
    /// which says `READY=1` with its own `MAINPID`). Nothing without `NOTIFY_SOCKET`.
    pub fn sd_notify(mut self) -> Self {
        self.listen.sd_notify = true;
        self
    }

    /// The application state that every connection's protocol reads with
    /// [`Ctx::state`](crate::Ctx::state): configuration, a pool, a registry behind a
    /// lock. Its type is the protocol's `S` in [`Protocol<S>`](Protocol), checked when
    /// the program is compiled. Set it before [`protocol`](Builder::protocol); keep a
    /// clone of the `Arc` to reach the same state from outside the server.
    ///
    /// A [`Handler`] needs none of this: its own fields are its state.
    pub fn state<S2>(self, state: Arc<S2>) -> Builder<H, S2> {
        Builder {
            settings: self.settings,
            listen: self.listen,
            transport: self.transport,
            handler: self.handler,
            state,
        }
    }

    /// The listen backlog: connections the kernel completes before we accept them.
    /// Default [`DEFAULT_BACKLOG`]; the kernel may cap it (`net.core.somaxconn`).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.settings.backlog = backlog;
        self
    }

    /// TCP keepalive on the accepted connections: after `time` without a packet from the
    /// peer, the kernel probes it, and a peer that vanished without a FIN (a NAT that
    /// forgot the connection, a pulled cable) is found and its connection closed within
    /// about twice `time`, even with no idle timeout. `None` turns it off. Default
    /// `Some(`[`DEFAULT_TCP_KEEPALIVE`]`)`. Set on the listening sockets (your own
    /// too), whose options accepted sockets inherit: it costs the accept path nothing.
    pub fn tcp_keepalive(mut self, time: Option<Duration>) -> Self {
        self.settings.tcp_keepalive = time;
        self
    }

    /// The most connections served at once; at the limit the server stops accepting
    /// until one closes: the client each listening socket has just accepted waits,
    /// unanswered, for that slot, and new peers wait in the backlog. Default
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

    /// Closes a connection when a frame it has begun (part of a line, a request's header
    /// without all its body) is not complete after `timeout`
    /// ([`CloseReason::FrameTimeout`](crate::CloseReason::FrameTimeout)): a peer that
    /// drips bytes is never idle, and this is what stops it. Default
    /// [`DEFAULT_FRAME_TIMEOUT`]; must be above zero.
    pub fn frame_timeout(mut self, timeout: Duration) -> Self {
        self.settings.limits.frame_timeout = timeout;
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

    /// Speaks TLS on every accepted connection: the handshake is done before the
    /// protocol or handler sees the connection, which then reads and writes plain
    /// bytes; [`Ctx::tls`](crate::Ctx::tls) tells what the handshake settled. A failed
    /// handshake closes the connection
    /// ([`CloseReason::TlsHandshake`](crate::CloseReason::TlsHandshake)), is logged at
    /// debug and counted by reason ([`Stats::tls_handshake_failures`]). Certificate
    /// files are read at [`start`](Builder::start), which fails naming a file that
    /// cannot be used ([`Error::Certificate`]). Streams handed to
    /// [`ServerHandle::serve`] are served as they are.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.transport.tls = Some(tls);
        self
    }

    /// How long a TLS handshake may take before its connection is closed
    /// ([`TlsFailure::Timeout`](crate::TlsFailure::Timeout)). Default
    /// [`DEFAULT_TLS_HANDSHAKE_TIMEOUT`]; must be above zero.
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.settings.tls_handshake_timeout = timeout;
        self
    }

    /// The most connections opening at once (reading their PROXY header, doing their
    /// TLS handshake). At the cap, the connection each listening socket has just
    /// accepted waits for one to finish, and new peers wait in the backlog: a flood of
    /// clients that never finish their handshake holds up new connections, not the
    /// ones already served. Default [`DEFAULT_MAX_HANDSHAKES`]; must be at least 1.
    pub fn max_handshakes(mut self, max: usize) -> Self {
        self.settings.max_handshakes = max;
        self
    }

    /// Takes the PROXY protocol (v1 or v2, told apart by their signatures): every
    /// accepted connection must start with a header, whose client address becomes the
    /// connection's peer ([`Ctx::peer_addr`](crate::Ctx::peer_addr), its log span, the
    /// connection list); the header itself is [`Ctx::proxy_header`](crate::Ctx::proxy_header).
    /// Bytes after the header, even in the same packet, are the protocol's. A
    /// connection without a valid header within the
    /// [`proxy_header_timeout`](Builder::proxy_header_timeout), or from a peer not
    /// [trusted](ProxyProtocol::trust), is closed
    /// ([`CloseReason::ProxyHeader`](crate::CloseReason::ProxyHeader)). With TLS too,
    /// the header comes first and the TLS handshake after it, as HAProxy's
    /// `send-proxy-v2` does.
    pub fn proxy_protocol(mut self, proxy: ProxyProtocol) -> Self {
        self.transport.proxy = Some(proxy);
        self
    }

    /// How long a PROXY header may take to arrive in full before its connection is
    /// closed ([`ProxyError::Timeout`](crate::ProxyError::Timeout)). Default
    /// [`DEFAULT_PROXY_HEADER_TIMEOUT`]; must be above zero.
    pub fn proxy_header_timeout(mut self, timeout: Duration) -> Self {
        self.settings.proxy_header_timeout = timeout;
        self
    }

    /// Which threads serve the connections. Default [`Threading::Shared`]; with
    /// [`Threading::PerCore`], `n` must be at least 1.
    pub fn threading(mut self, threading: Threading) -> Self {
        self.settings.threading = threading;
        self
    }

    /// Serves every connection with the protocol `P`, framed by `P::Codec::default()`,
    /// its callbacks seeing the [`state`](Builder::state) (if any).
    pub fn protocol<P>(self) -> Builder<Driver<P, S>>
    where
        P: Protocol<S>,
        P::Codec: Default + Clone + Sync,
    {
        self.protocol_with_codec::<P>(P::Codec::default())
    }

    /// Serves every connection with the protocol `P`, framed by a clone of `codec` (for
    /// a codec with settings, such as [`Lines::with_max_length`](crate::codec::Lines)).
    pub fn protocol_with_codec<P>(self, codec: P::Codec) -> Builder<Driver<P, S>>
    where
        P: Protocol<S>,
        P::Codec: Clone + Sync,
    {
        Builder {
            settings: self.settings,
            listen: self.listen,
            transport: self.transport,
            handler: Driver::new(codec, self.state),
            state: Arc::new(()),
        }
    }

    /// Serves every connection with a [`Handler`] that gets the raw stream, instead of
    /// a protocol state machine.
    pub fn handler<H2: Handler>(self, handler: H2) -> Builder<H2> {
        Builder {
            settings: self.settings,
            listen: self.listen,
            transport: self.transport,
            handler,
            state: Arc::new(()),
        }
    }
}

impl<P, S> Builder<Driver<P, S>>
where
    P: Protocol<S>,
    P::Message: ClusterMessage,
{
    /// Puts the server on `cluster`: [`Ctx::broadcast`](crate::Ctx::broadcast) reaches
    /// the group's members on every node, [`Ctx::send_to`](crate::Ctx::send_to) and
    /// [`ServerHandle::send_to`] reach connections on other nodes, connection ids carry
    /// the node's tag, and group membership is shared (see [`cluster`](crate::cluster)).
    /// A cluster serves one server.
    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.handler.set_cluster(ClusterLink::new(cluster));
        self
    }
}

impl<H: Service> Builder<H> {
    /// Binds the listening sockets (or adopts them: socket activation, an upgrade) and
    /// starts accepting, in tasks on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a setting out of range, [`Error::Certificate`] for a TLS
    /// file that cannot be used, [`Error::Address`] for an
    /// [`address`](Builder::address) that is not `host:port` or does not resolve,
    /// [`Error::Bind`] when the address cannot be listened on (in use, not local,
    /// privileged port), [`Error::Unix`] for a Unix socket, [`Error::Activation`] for
    /// sockets passed by a supervisor that are not listening sockets,
    /// [`Error::Upgrade`] when the server to take over from does not answer.
    pub async fn start(self) -> Result<ServerHandle<H::Message>, Error> {
        let settings = self.settings;
        settings.check()?;
        let front = self.transport.front(&settings)?;
        let sd_notify = self.listen.sd_notify;
        let opened = self.listen.open(&settings).await?;
        let cluster = self.handler.cluster();
        let first_id = cluster.map_or(1, |link| link.cluster().first_id());
        let connections = Connections::new(settings.max_connections, settings.limits, first_id);
        if let Some(link) = cluster {
            link.attach(&connections)?;
        }
        let service = Arc::new(self.handler);
        let gate = Arc::new(Gate::default());
        let acceptors = TaskTracker::new();
        let addresses: Vec<Address> = opened
            .groups
            .iter()
            .map(|group| group[0].1.clone())
            .collect();
        let started = match settings.threading {
            Threading::Shared => {
                (opened.groups.iter().flatten()).try_for_each(|(socket, address)| {
                    let acceptor = (socket.try_clone())
                        .and_then(Listening::into_acceptor)
                        .map_err(|e| listen_error(address, e))?;
                    acceptors.spawn(listener::accept_loop(
                        acceptor,
                        Arc::clone(&connections),
                        Arc::clone(&service),
                        front.clone(),
                        Arc::clone(&gate),
                    ));
                    Ok(())
                })
            }
            Threading::PerCore(threads) => {
                let per_thread = spread(&opened.groups, threads)?;
                start_per_core(
                    per_thread,
                    &connections,
                    &service,
                    &front,
                    &gate,
                    &acceptors,
                )
                .await
            }
        };
        if let Err(e) = started {
            // Accept loops already running see this and end.
            gate.stop();
            return Err(e);
        }
        for address in &addresses {
            info!(%address, "listening");
        }
        // One handle on each listening socket, to hand to a successor.
        let handover = match &opened.upgrade {
            None => Vec::new(),
            Some(_) => opened
                .groups
                .into_iter()
                .flatten()
                .map(|(socket, _)| socket)
                .collect(),
        };
        let handover = Arc::new(Mutex::new(handover));
        let (handed_over, _) = watch::channel(false);
        if let Some((upgrade, address)) = opened.upgrade {
            let listener = match upgrade.try_clone().and_then(Listening::into_acceptor) {
                Ok(Acceptor::Unix(listener)) => listener,
                Ok(Acceptor::Tcp(_)) => unreachable!("the upgrade socket is a Unix socket"),
                Err(e) => {
                    gate.stop();
                    return Err(listen_error(&address, e));
                }
            };
            handover.lock().expect("never poisoned").push(upgrade);
            let (handover, gate, handed_over) = (
                Arc::clone(&handover),
                Arc::clone(&gate),
                handed_over.clone(),
            );
            tokio::spawn(async move {
                if process::serve_successors(listener, &handover, &gate).await {
                    handed_over.send_replace(true);
                }
            });
        }
        if let Some(successor) = opened.successor {
            successor.ready().await;
        }
        if sd_notify {
            process::notify_ready();
        }
        let spawn: Box<Spawn<H::Message>> = {
            let connections = Arc::clone(&connections);
            Box::new(move |reservation, stream, peer| {
                let service = Arc::clone(&service);
                connections.spawn(
                    reservation,
                    peer,
                    Address::None,
                    false,
                    move |conn| async move { service.serve(stream, conn).await },
                )
            })
        };
        Ok(ServerHandle {
            inner: Arc::new(Inner {
                local_addr: addresses.iter().find_map(Address::ip),
                addresses,
                connections,
                gate,
                acceptors,
                drain_timeout: settings.drain_timeout,
                front,
                open_at_shutdown: OnceLock::new(),
                spawn,
                files: opened.files,
                handover,
                handed_over,
                sd_notify,
            }),
        })
    }
}

/// The error of a listening socket at `address` that cannot be used.
fn listen_error(address: &Address, source: io::Error) -> Error {
    match address {
        Address::Ip(addr) => Error::Bind {
            addr: *addr,
            source,
        },
        Address::Unix(path) => Error::Unix {
            path: path.as_deref().map(Path::to_owned).unwrap_or_default(),
            source,
        },
        Address::None => Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        },
    }
}

/// A server's listening sockets, once bound or adopted.
#[derive(Default)]
struct Opened {
    /// The sockets of each address, with the address: several per-core sockets share a
    /// TCP port.
    groups: Vec<Vec<(Listening, Address)>>,
    /// The socket files to remove when the server stops.
    files: Vec<SocketFile>,
    /// The socket a successor connects to.
    upgrade: Option<(Listening, Address)>,
    /// The server this one takes over from, to tell once this one accepts.
    successor: Option<Successor>,
}

impl Places {
    /// Binds the listening sockets, or adopts those of socket activation or of the
    /// server this one takes over from.
    async fn open(self, settings: &Settings) -> Result<Opened, Error> {
        let mut opened = Opened::default();
        let mut inherited = Vec::new();
        let mut activated = false;
        if let Some(path) = &self.upgrade_from {
            let (successor, sockets) = process::take_over(path).await?;
            opened.successor = Some(successor);
            for socket in sockets {
                let address = socket.address().map_err(|e| Error::Upgrade {
                    path: path.clone(),
                    reason: format!("cannot read a socket's address: {e}"),
                })?;
                inherited.push((socket, address));
            }
        } else if self.activation {
            let sockets = process::activated()?;
            activated = !sockets.is_empty();
            for socket in sockets {
                let address = socket.address().map_err(|e| Error::Activation {
                    reason: format!("cannot read a passed socket's address: {e}"),
                })?;
                opened.groups.push(vec![(socket, address)]);
            }
        }
        let tcp = match self.tcp {
            _ if activated => None,
            None if !self.unix.is_empty() => None,
            None => Some(Listen::Ip {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: DEFAULT_PORT,
            }),
            given => given,
        };
        if let Some(listen) = tcp {
            let sockets = match listen {
                Listen::Ip { ip, port } => Sockets::Bind(SocketAddr::new(ip, port)),
                Listen::Text(text) => Sockets::Bind(resolve(text).await?),
                Listen::Listener(listener) => Sockets::Given(listener),
            };
            let taken = match &sockets {
                Sockets::Bind(addr) => take(&mut inherited, &Address::Ip(*addr)),
                Sockets::Given(_) => Vec::new(),
            };
            let group = if taken.is_empty() {
                sockets.open(settings)?
            } else {
                taken
            };
            opened.groups.push(group);
        }
        let unix_paths = if activated { Vec::new() } else { self.unix };
        for path in unix_paths {
            let (socket, file) =
                unix_socket(&path, &mut inherited, settings.backlog, self.unix_mode)?;
            opened.files.push(file);
            opened.groups.push(vec![socket]);
        }
        if let Some(path) = self.upgrade_socket {
            let (socket, file) = unix_socket(&path, &mut inherited, 16, Some(0o600))?;
            opened.files.push(file);
            opened.upgrade = Some(socket);
        }
        for (_, address) in inherited {
            warn!(%address, "the old server's socket is not in this one's configuration: closed");
        }
        // Bound, given or adopted alike.
        for (socket, address) in opened.groups.iter().flatten() {
            if let Listening::Tcp(socket) = socket {
                listener::set_keepalive(socket, settings.tcp_keepalive)
                    .map_err(|e| listen_error(address, e))?;
            }
        }
        Ok(opened)
    }
}

/// The listening socket at `path`: the one `inherited` has for it, else bound.
fn unix_socket(
    path: &Path,
    inherited: &mut Vec<(Listening, Address)>,
    backlog: u32,
    mode: Option<u32>,
) -> Result<((Listening, Address), SocketFile), Error> {
    let unix_error = |source| Error::Unix {
        path: path.to_owned(),
        source,
    };
    // The address a socket reports is the path it was bound with: bound absolute, it
    // is found again by a successor started elsewhere.
    let path = std::path::absolute(path).map_err(unix_error)?;
    let address = Address::Unix(Some(Arc::from(path.as_path())));
    if let Some(socket) = take(inherited, &address).pop() {
        let file = SocketFile::of(&path).map_err(unix_error)?;
        return Ok((socket, file));
    }
    let (socket, file) = listener::bind_unix(&path, backlog, mode).map_err(unix_error)?;
    Ok(((Listening::Unix(socket), address), file))
}

/// Takes the sockets of `inherited` that listen on `address`.
fn take(inherited: &mut Vec<(Listening, Address)>, address: &Address) -> Vec<(Listening, Address)> {
    let (taken, others) = std::mem::take(inherited)
        .into_iter()
        .partition(|(_, at)| at == address);
    *inherited = others;
    taken
}

/// Gives every thread its listening sockets: a thread per socket where an address has
/// one per thread, every thread a handle on the socket where it has one, and round
/// the threads where the counts differ (sockets taken over from a server with another
/// number of threads), so that every socket is accepted from.
fn spread(
    groups: &[Vec<(Listening, Address)>],
    threads: usize,
) -> Result<Vec<Vec<Listening>>, Error> {
    let mut per_thread: Vec<Vec<Listening>> = (0..threads).map(|_| Vec::new()).collect();
    for group in groups {
        for turn in 0..threads.max(group.len()) {
            let (socket, address) = &group[turn % group.len()];
            let handle = socket.try_clone().map_err(|e| listen_error(address, e))?;
            per_thread[turn % threads].push(handle);
        }
    }
    Ok(per_thread)
}

/// Resolves [`Builder::address`] text to its first address.
async fn resolve(text: String) -> Result<SocketAddr, Error> {
    let resolved = match tokio::net::lookup_host(text.as_str()).await {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| io::Error::other("resolves to no address")),
        Err(e) => Err(e),
    };
    resolved.map_err(|source| Error::Address {
        value: text,
        source,
    })
}

/// The TCP listening sockets to make: bound here, or the one the user gave.
enum Sockets {
    Bind(SocketAddr),
    Given(std::net::TcpListener),
}

impl Sockets {
    /// Makes the listening sockets, each with the address it listens on: one per
    /// thread with [`Threading::PerCore`], sharing their port (`SO_REUSEPORT`), else
    /// one; a given socket is the only one, whose handles the threads share.
    fn open(self, settings: &Settings) -> Result<Vec<(Listening, Address)>, Error> {
        let backlog = settings.backlog;
        match self {
            Sockets::Bind(addr) => {
                let bind_error = |source| Error::Bind { addr, source };
                let count = match settings.threading {
                    Threading::PerCore(threads) => threads,
                    Threading::Shared => 1,
                };
                let reuse_port = count > 1;
                // With several, a free port is settled first (0 picks one); then every
                // socket joins it.
                let addr = if reuse_port {
                    listener::free_address(addr).map_err(bind_error)?
                } else {
                    addr
                };
                (0..count)
                    .map(|_| {
                        let socket = listener::bind(addr, backlog, reuse_port)?;
                        let local_addr = socket.local_addr()?;
                        Ok((Listening::Tcp(socket), Address::Ip(local_addr)))
                    })
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(bind_error)
            }
            Sockets::Given(socket) => {
                let local_addr = socket.local_addr().map_err(|source| Error::Bind {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })?;
                let given_error = |source| Error::Bind {
                    addr: local_addr,
                    source,
                };
                socket.set_nonblocking(true).map_err(given_error)?;
                Ok(vec![(Listening::Tcp(socket), Address::Ip(local_addr))])
            }
        }
    }
}

/// Starts one thread per entry of `per_thread`, each with a single-threaded runtime
/// running an accept loop on each of its sockets, and returns once every one is
/// accepting.
async fn start_per_core<H: Service>(
    per_thread: Vec<Vec<Listening>>,
    connections: &Arc<Connections<H::Message>>,
    handler: &Arc<H>,
    front: &Option<Arc<Front>>,
    gate: &Arc<Gate>,
    acceptors: &TaskTracker,
) -> Result<(), Error> {
    let thread_error = |source| Error::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    };
    for (index, sockets) in per_thread.into_iter().enumerate() {
        let (ready, started) = tokio::sync::oneshot::channel();
        let (connections, handler) = (Arc::clone(connections), Arc::clone(handler));
        let (gate, acceptors, front) = (Arc::clone(gate), acceptors.clone(), front.clone());
        let thread = move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(listener::spin_before_sleep)
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready.send(Err(thread_error(e)))),
            };
            // Runs this thread's connections until the server has stopped and every
            // connection has ended.
            runtime.block_on(async {
                for socket in sockets {
                    let address = socket.address();
                    let acceptor = match socket.into_acceptor() {
                        Ok(acceptor) => acceptor,
                        Err(e) => {
                            let address = address.unwrap_or(Address::None);
                            return drop(ready.send(Err(listen_error(&address, e))));
                        }
                    };
                    acceptors.spawn(listener::accept_loop(
                        acceptor,
                        Arc::clone(&connections),
                        Arc::clone(&handler),
                        front.clone(),
                        Arc::clone(&gate),
                    ));
                }
                let _ = ready.send(Ok(()));
                gate.stopped().await;
                connections.wait_all().await;
            });
        };
        std::thread::Builder::new()
            .name(format!("linedancer-{index}"))
            .spawn(thread)
            .map_err(thread_error)?;
        match started.await {
            Ok(started) => started?,
            Err(_) => {
                return Err(thread_error(io::Error::other(
                    "server thread ended at start",
                )))
            }
        }
    }
    Ok(())
}

/// Spawns a connection task serving a stream handed to [`ServerHandle::serve`].
type Spawn<M> = dyn Fn(Reservation<'_, M>, Box<dyn Stream>, Address) -> ConnectionId + Send + Sync;

/// A running server. Clones control the same server; dropping every handle leaves it
/// running until the runtime ends.
///
/// `M` is the type of message its connections take: the protocol's
/// [`Message`](Protocol::Message) (`()` for most), or [`Infallible`](std::convert::Infallible)
/// for a raw [`Handler`], whose connections take none. Sending anything else does not
/// compile.
pub struct ServerHandle<M = ()> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for ServerHandle<M> {
    fn clone(&self) -> Self {
        ServerHandle {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M> std::fmt::Debug for ServerHandle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addresses", &self.inner.addresses)
            .field("connections", &self.inner.connections)
            .finish_non_exhaustive()
    }
}

struct Inner<M> {
    /// The first TCP address.
    local_addr: Option<SocketAddr>,
    /// Every address listened on.
    addresses: Vec<Address>,
    connections: Arc<Connections<M>>,
    /// Suspends, resumes and stops the acceptors.
    gate: Arc<Gate>,
    /// The accept loops, awaited so that the listening sockets are closed before the
    /// connections are drained.
    acceptors: TaskTracker,
    drain_timeout: Duration,
    /// TLS and the PROXY protocol, if the server has them.
    front: Option<Arc<Front>>,
    /// The connections open when the first shutdown call closed the listeners: every
    /// later call reports against them.
    open_at_shutdown: OnceLock<usize>,
    /// Serves the streams handed to [`ServerHandle::serve`].
    spawn: Box<Spawn<M>>,
    /// The Unix socket files made by the server, removed when it stops.
    files: Vec<SocketFile>,
    /// A handle on every listening socket, for a successor; closed on shutdown, so
    /// that the sockets close with the accept loops.
    handover: Arc<Mutex<Vec<Listening>>>,
    /// Whether a successor took the listening sockets over.
    handed_over: watch::Sender<bool>,
    /// [`Builder::sd_notify`].
    sd_notify: bool,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections that finished by themselves within the drain timeout.
    pub drained: usize,
    /// Connections still open when the drain timeout ended, closed by the server.
    pub force_closed: usize,
}

impl<M: Send + 'static> ServerHandle<M> {
    /// The TCP address the server listens on, with the real port when 0 was asked
    /// for (the first, when socket activation passed several).
    ///
    /// # Panics
    ///
    /// On a server that listens on no TCP address (Unix sockets only); see
    /// [`addresses`](ServerHandle::addresses).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .local_addr
            .expect("the server listens on no TCP address: see ServerHandle::addresses")
    }

    /// Every address the server listens on: TCP (`127.0.0.1:7000`) and Unix
    /// (`unix:/run/app.sock`), in the order they were opened.
    pub fn addresses(&self) -> &[Address] {
        &self.inner.addresses
    }

    /// Completes when a successor has taken over the listening sockets
    /// ([`Builder::upgrade_socket`]) and accepts on them: the server should then shut
    /// down, which [`run_until_signal`](ServerHandle::run_until_signal) does. Never
    /// completes on a server without an upgrade socket.
    pub async fn handed_over(&self) {
        let mut handed_over = self.inner.handed_over.subscribe();
        // The sender lives as long as `self`.
        let _ = handed_over.wait_for(|handed| *handed).await;
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
    /// The message's type is the protocol's: anything else is refused by the compiler,
    /// and so is any message to the connections of a raw handler.
    ///
    /// ```compile_fail
    /// # fn f(server: linedancer::ServerHandle<u32>, id: linedancer::ConnectionId) {
    /// server.send_to(id, "not a u32");
    /// # }
    /// ```
    ///
    /// ```compile_fail
    /// # fn f(server: linedancer::ServerHandle<std::convert::Infallible>) {
    /// server.send_to(linedancer::ConnectionId(1), ());
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SendError`]: the connection is not open, or its mailbox is full (it is then
    /// closed).
    pub fn send_to(&self, to: ConnectionId, message: M) -> Result<(), SendError> {
        self.inner.connections.post(to, message)
    }

    /// Sends a copy of `message` to every member of `group`, and returns how many took
    /// one (a member whose mailbox is full is closed instead).
    pub fn broadcast(&self, group: &str, message: M) -> usize
    where
        M: Clone,
    {
        (self.inner.connections).broadcast(group, &|| message.clone(), None)
    }

    /// Serves a stream that is already connected (one you accepted yourself, a Unix
    /// socket, a TLS stream, one end of [`tokio::io::duplex`]) as one more connection
    /// of this server: with its protocol or handler, its limits, its counters and its
    /// shutdown. `peer` is what [`Ctx::peer_addr`](crate::Ctx::peer_addr) and the
    /// logs show for it. Waits for a free slot at the connection limit, as the listener
    /// does. Call it from within a tokio runtime: the connection runs there.
    ///
    /// ```
    /// use linedancer::examples::Echo;
    /// use linedancer::{Address, Server};
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = Server::builder().port(0).protocol::<Echo>().start().await?;
    /// let (mut client, theirs) = tokio::io::duplex(1024);
    /// server.serve(theirs, Address::None).await?;
    /// client.write_all(b"no socket at all").await?;
    /// let mut echoed = [0; 16];
    /// client.read_exact(&mut echoed).await?;
    /// assert_eq!(&echoed, b"no socket at all");
    /// # drop(client);
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Stopped`] once the server is shutting down; the stream is dropped.
    pub async fn serve<T: Stream>(&self, stream: T, peer: Address) -> Result<ConnectionId, Error> {
        let inner = &self.inner;
        let reservation = tokio::select! {
            biased;
            () = inner.gate.stopped() => return Err(Error::Stopped),
            reservation = inner.connections.reserve() => reservation,
        };
        Ok((inner.spawn)(reservation, Box::new(stream), peer))
    }

    /// Reads the TLS certificate and key files again
    /// ([`TlsConfig::pem_files`]), and serves the new certificates to every handshake
    /// from now on; established connections are not touched. If any file cannot be
    /// used, the server keeps the certificates it has. Under
    /// [`run_until_signal`](ServerHandle::run_until_signal), SIGHUP does this.
    /// Returns how many certificates are now served: 0 on a server without TLS or
    /// with a [`TlsConfig::server_config`], which has nothing to reload.
    ///
    /// # Errors
    ///
    /// [`Error::Certificate`], naming the file and why; nothing has changed.
    pub fn reload_tls(&self) -> Result<usize, Error> {
        let tls = self
            .inner
            .front
            .as_ref()
            .and_then(|front| front.tls.as_ref());
        let Some(tls) = tls else { return Ok(0) };
        let count = tls.tls.reload()?.unwrap_or(0);
        Ok(count)
    }

    /// Closes connection `id` now ([`CloseReason::Kicked`](crate::CloseReason::Kicked)):
    /// a protocol's connection at once, with its `closed` callback; a raw handler's
    /// task is ended if it has not returned a second later. Returns whether it was
    /// open.
    pub fn close_connection(&self, id: ConnectionId) -> bool {
        self.inner.connections.kick(id)
    }

    /// How many live connections are in each protocol state
    /// ([`Protocol::state_name`](crate::Protocol::state_name); `""` for a raw handler),
    /// most first.
    pub fn connections_by_state(&self) -> Vec<(&'static str, usize)> {
        let mut states: Vec<_> = self.inner.connections.census().states.into_iter().collect();
        states.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        states
    }

    /// How many live connections each listener has, in the order of
    /// [`addresses`](ServerHandle::addresses) (streams handed to
    /// [`serve`](ServerHandle::serve) count under [`Address::None`]).
    pub fn connections_by_listener(&self) -> Vec<(Address, usize)> {
        let census = self.inner.connections.census().listeners;
        let mut listeners: Vec<(Address, usize)> = (self.inner.addresses.iter())
            .map(|address| (address.clone(), 0))
            .collect();
        for (address, count) in census {
            match listeners.iter_mut().find(|(at, _)| *at == address) {
                Some((_, total)) => *total += count,
                None => listeners.push((address, count)),
            }
        }
        listeners
    }

    /// Whether the server has begun to shut down (or handed over): it accepts no more.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.gate.is_stopped()
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
            info!("accepting suspended");
        }
    }

    /// Accepts again after [`suspend`](ServerHandle::suspend); the clients waiting in
    /// the backlog are served first.
    pub fn resume(&self) {
        if self.inner.gate.resume() {
            info!("accepting resumed");
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
            inner.handover.lock().expect("never poisoned").clear();
            // After a hand-over the files and the service are the successor's.
            if !*inner.handed_over.borrow() {
                for file in &inner.files {
                    file.remove();
                }
                if inner.sd_notify {
                    process::notify_stopping();
                }
            }
            let open = inner.connections.count();
            info!(connections = open, "listener closed, draining");
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
            drained = report.drained,
            force_closed = report.force_closed,
            "server stopped"
        );
        report
    }

    /// Serves until the process gets SIGTERM or SIGINT (Ctrl-C), then shuts down
    /// gracefully with the drain timeout; a second signal during the drain closes every
    /// connection at once. The returned future resolves to the shutdown's report.
    /// Meanwhile SIGHUP reloads the TLS certificates
    /// ([`reload_tls`](ServerHandle::reload_tls)), and logs the outcome.
    ///
    /// The signal handlers are installed by this call, before its future is first
    /// polled, so no signal is missed from here on: a program can say that it is ready
    /// between the call and the `await`.
    ///
    /// ```no_run
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), linedancer::Error> {
    /// let server = linedancer::Server::builder()
    ///     .protocol::<linedancer::examples::Echo>()
    ///     .start()
    ///     .await?;
    /// let report = server.run_until_signal()?.await;
    /// println!("{} drained, {} cut off", report.drained, report.force_closed);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Signals`] if the signal handlers cannot be installed.
    pub fn run_until_signal(
        &self,
    ) -> Result<impl Future<Output = ShutdownReport> + Send + 'static, Error> {
        let mut signals = Signals::new().map_err(Error::Signals)?;
        let server = self.clone();
        Ok(async move {
            loop {
                let got = tokio::select! {
                    got = signals.next() => got,
                    // Begun elsewhere: the admin endpoint's POST /drain, say.
                    () = server.inner.gate.stopped() => {
                        info!("shutdown begun, draining");
                        break;
                    }
                    () = server.handed_over() => {
                        info!("handed over to a successor, shutting down; a signal closes every connection at once");
                        break;
                    }
                };
                if got == Got::Stop {
                    info!(
                        "signal received, shutting down; a second signal closes every connection at once"
                    );
                    break;
                }
                match server.reload_tls() {
                    Ok(0) => info!("SIGHUP: no TLS certificate files to reload"),
                    Ok(count) => info!(certificates = count, "SIGHUP: TLS certificates reloaded"),
                    Err(e) => warn!("SIGHUP: {e}; keeping the certificates in use"),
                }
            }
            tokio::select! {
                report = server.shutdown() => report,
                _ = signals.stop() => {
                    info!("second signal: closing every connection now");
                    // Reports for the whole shutdown, the cut-short drain included.
                    server.shutdown_with_timeout(Duration::ZERO).await
                }
            }
        })
    }
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

/// Which kind of signal came.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    /// SIGINT or SIGTERM.
    Stop,
    /// SIGHUP.
    Hangup,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next signal.
    async fn next(&mut self) -> Got {
        tokio::select! {
            _ = self.interrupt.recv() => Got::Stop,
            _ = self.terminate.recv() => Got::Stop,
            _ = self.hangup.recv() => Got::Hangup,
        }
    }

    /// Waits for the next SIGINT or SIGTERM.
    async fn stop(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
