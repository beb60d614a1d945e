//! `linedancer serve`: runs an example protocol until a signal asks it to stop.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use linedancer::admin::{Admin, AlarmSettings, Alarms};
use linedancer::cluster::{Cluster, ClusterError, ClusterMessage, ClusterOptions, NatsBus};
use linedancer::examples::kv::Db;
use linedancer::examples::{
    Balance, Chat, Echo, Gateway, GatewayStats, Handshake, Kv, LineEcho, LoginTimeout, Rooms,
};
use linedancer::{
    Driver, Protocol, ProxyProtocol, Server, ServerHandle, Service, Threading, TlsConfig,
};
use tracing::{info, warn};

/// The protocols `serve` knows, by the name given on the command line.
const PROTOCOLS: &[&str] = &["echo", "handshake", "line-echo", "chat", "gateway", "kv"];

/// Flags of `linedancer serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The protocol to serve: echo, handshake, line-echo, chat, gateway (which relays
    /// every connection to the --upstream servers in turn), or kv (a Redis-compatible
    /// key-value server).
    protocol: String,
    /// For the gateway: a server to relay connections to, as HOST:PORT; repeat it for
    /// several, which clients are sent to in turn.
    #[arg(long = "upstream", value_name = "HOST:PORT")]
    upstreams: Vec<String>,
    /// For the gateway: how each client's upstream is picked.
    #[arg(long, value_enum, default_value_t = BalanceArg::RoundRobin)]
    balance: BalanceArg,
    /// For the gateway: how long a connect to an upstream may take before the next
    /// upstream is tried.
    #[arg(long, default_value_t = linedancer::examples::CONNECT_TIMEOUT.into(), value_name = "D")]
    connect_timeout: humantime::Duration,
    /// For the gateway: how often each upstream is checked (a TCP connect, its name
    /// resolved again); one that fails is taken out until it answers; `off` for none.
    #[arg(long, default_value = "5s", value_name = "D|off", value_parser = keepalive)]
    health_interval: Keepalive,
    /// For the gateway: the most clients relayed to one upstream at once.
    #[arg(long, value_name = "N")]
    max_per_upstream: Option<usize>,
    /// For the gateway: send each upstream a PROXY protocol v2 header with the
    /// client's address first, as HAProxy's send-proxy-v2 does.
    #[arg(long)]
    send_proxy_v2: bool,
    /// The address to listen on: an IP address (127.0.0.1, ::1 or [::1]), localhost,
    /// or HOST:PORT such as [::1]:7000 (then without --port). Default 127.0.0.1,
    /// unless --unix is given alone.
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// The port to listen on (default 7000); 0 picks a free one.
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Listen on a Unix socket at this path too (alone, without --bind or --port, it is
    /// the only listener); repeat it for several. A stale socket file is replaced, one
    /// a server listens on fails ("in use"); the file is removed on exit.
    #[arg(long = "unix", value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// The permissions of the --unix socket files, in octal, such as 660 to let a
    /// proxy of the same group connect. Default: as the umask leaves them.
    #[arg(long, value_name = "MODE", value_parser = file_mode)]
    unix_mode: Option<u32>,
    /// Listen on this Unix socket (mode 0600) for a successor: `serve` started with the
    /// same options plus --upgrade takes over every listening socket, and this server
    /// then stops accepting, drains its connections and exits 0.
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
    /// Take over the listening sockets of the server running with the same
    /// --upgrade-socket, instead of binding them: no connection is refused meanwhile.
    #[arg(long, requires = "upgrade_socket")]
    upgrade: bool,
    /// Serve the admin endpoint on this address (HOST:PORT): Prometheus /metrics, the
    /// live view at /, /connections, /health, POST /drain. Off by default; an address
    /// other than loopback needs --admin-token-file.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// A file holding the token every admin request must carry
    /// (`Authorization: Bearer TOKEN`).
    #[arg(long, value_name = "FILE", requires = "admin")]
    admin_token_file: Option<PathBuf>,
    /// Alarm when open connections reach this fraction of --max-connections (0.9: 90%)
    /// for --alarm-hold.
    #[arg(long, value_name = "FRACTION")]
    alarm_connections: Option<f64>,
    /// Alarm when failed accepts reach this many per second for --alarm-hold.
    #[arg(long, value_name = "PER_SECOND")]
    alarm_accept_errors: Option<f64>,
    /// Alarm when connections closed for a full mailbox reach this many per second for
    /// --alarm-hold.
    #[arg(long, value_name = "PER_SECOND")]
    alarm_mailbox_overflows: Option<f64>,
    /// Join the cluster on this NATS server (nats://HOST:PORT), for chat and kv: rooms
    /// and channels span every node on it. Needs --node.
    #[arg(long, value_name = "URL", requires = "node")]
    cluster: Option<String>,
    /// This node's name in the --cluster, unique among its nodes.
    #[arg(long, value_name = "NAME", requires = "cluster")]
    node: Option<String>,
    /// How long a node of the --cluster may stay silent before the others take it
    /// for gone, with its members.
    #[arg(long, default_value = "3s", value_name = "D", requires = "cluster")]
    node_timeout: humantime::Duration,
    /// How long a threshold must hold before its alarm fires.
    #[arg(long, default_value = "30s", value_name = "D")]
    alarm_hold: humantime::Duration,
    /// How connections are spread over threads. The command runs per-core by default,
    /// as it owns the process; the library's default is to run on the caller's runtime
    /// (work-stealing here).
    #[arg(long, value_enum, default_value_t = Model::PerCore)]
    threading: Model,
    /// Threads serving connections; default: one per core this process may use.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// The most connections served at once; further peers wait in the listen backlog
    /// until one closes.
    #[arg(long, default_value_t = linedancer::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    max_connections: usize,
    /// Close a connection when no bytes arrive from its peer for this long, such as
    /// 30s or 5m; default: never.
    #[arg(long, value_name = "D")]
    idle_timeout: Option<humantime::Duration>,
    /// Close a connection when a frame it has begun (part of a line, of a request) is
    /// not complete after this long: a peer dripping bytes is never idle.
    #[arg(long, default_value_t = linedancer::DEFAULT_FRAME_TIMEOUT.into(), value_name = "D")]
    frame_timeout: humantime::Duration,
    /// For the handshake: how long a client has to log in (default 30s).
    #[arg(long, value_name = "D")]
    login_timeout: Option<humantime::Duration>,
    /// TCP keepalive on the accepted connections: after this long without a packet the
    /// peer is probed, so one that vanished without closing is found (within about
    /// twice this); `off` turns it off.
    #[arg(long, default_value = "2m", value_name = "D|off", value_parser = keepalive)]
    tcp_keepalive: Keepalive,
    /// On SIGTERM or Ctrl-C, how long to wait for connections to finish before
    /// closing them, such as 500ms or 10s.
    #[arg(long, default_value_t = linedancer::DEFAULT_DRAIN_TIMEOUT.into(), value_name = "D")]
    drain_timeout: humantime::Duration,
    /// Close a connection whose peer takes none of a pending reply for this long.
    #[arg(long, default_value_t = linedancer::DEFAULT_SEND_TIMEOUT.into(), value_name = "D")]
    send_timeout: humantime::Duration,
    /// Close a connection when more than this many bytes of replies wait to be
    /// written to it.
    #[arg(long, default_value_t = linedancer::DEFAULT_MAX_OUTPUT, value_name = "BYTES")]
    max_output: usize,
    /// Close a connection when more than this many messages wait in its mailbox
    /// (chat).
    #[arg(long, default_value_t = linedancer::DEFAULT_MAILBOX_CAPACITY, value_name = "N")]
    mailbox_capacity: usize,
    /// Serve over TLS with this certificate chain (PEM), and the --tls-key given in the
    /// same position. Repeat the pair for several certificates: a client's SNI name
    /// picks the one for it, and the first is for clients that send no name or one no
    /// certificate has. SIGHUP reloads the files; if one is bad, the old certificates
    /// stay, and the log says why.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_certs: Vec<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of the --tls-cert in the same
    /// position.
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_keys: Vec<PathBuf>,
    /// An ALPN protocol to offer over TLS; repeat it for several, most preferred first.
    #[arg(long = "tls-alpn", value_name = "NAME")]
    tls_alpn: Vec<String>,
    /// Close a connection whose TLS handshake is not done after this long.
    #[arg(long, default_value_t = linedancer::DEFAULT_TLS_HANDSHAKE_TIMEOUT.into(), value_name = "D")]
    tls_handshake_timeout: humantime::Duration,
    /// The most connections opening at once (TLS handshake, PROXY header); at the cap,
    /// new connections wait in the listen backlog.
    #[arg(long, default_value_t = linedancer::DEFAULT_MAX_HANDSHAKES, value_name = "N")]
    max_handshakes: usize,
    /// Every connection starts with a PROXY protocol header (v1 or v2, as HAProxy's
    /// send-proxy and send-proxy-v2 send), whose client address is the peer's.
    #[arg(long)]
    proxy_protocol: bool,
    /// With --proxy-protocol: a network (10.0.0.0/8) or address allowed to connect;
    /// repeat it for several. Connections from anywhere else are closed at once.
    /// Default: any peer, which must still send a header.
    #[arg(long = "proxy-from", value_name = "CIDR")]
    proxy_from: Vec<String>,
    /// With --proxy-protocol: close a connection whose header is not complete after
    /// this long.
    #[arg(long, default_value_t = linedancer::DEFAULT_PROXY_HEADER_TIMEOUT.into(), value_name = "D")]
    proxy_header_timeout: humantime::Duration,
}

/// `--balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BalanceArg {
    /// Each upstream in turn.
    RoundRobin,
    /// The upstream with the fewest open connections.
    LeastConn,
}

impl From<BalanceArg> for Balance {
    fn from(balance: BalanceArg) -> Self {
        match balance {
            BalanceArg::RoundRobin => Balance::RoundRobin,
            BalanceArg::LeastConn => Balance::LeastConn,
        }
    }
}

/// The threading models of `--threading`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Model {
    /// One listening socket per thread (SO_REUSEPORT), each thread with its own
    /// single-threaded runtime; a connection stays on the thread that accepted it.
    PerCore,
    /// One listening socket and tokio's multi-thread, work-stealing runtime.
    WorkStealing,
}

/// Why `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The protocol name is not one of [`PROTOCOLS`].
    #[error("unknown protocol '{0}' (expected one of: {list})", list = PROTOCOLS.join(", "))]
    UnknownProtocol(String),
    /// `--bind` is not an IP address, nor HOST:PORT.
    #[error(
        "invalid bind address '{0}': expected an IP address such as 127.0.0.1 or ::1, \
         or HOST:PORT such as [::1]:7000"
    )]
    BadAddress(String),
    /// `--bind HOST:PORT` and `--port` both.
    #[error("--bind {0} names a port already; drop --port")]
    PortTwice(String),
    /// The server did not start.
    #[error(transparent)]
    Start(#[from] linedancer::Error),
    /// `--threads 0`.
    #[error("invalid --threads 0: needs at least 1 thread")]
    NoThreads,
    /// `serve gateway` without `--upstream`.
    #[error("serve gateway needs at least one --upstream HOST:PORT")]
    NoUpstream,
    /// `--login-timeout` for a protocol other than the handshake.
    #[error("--login-timeout is for the handshake only, not for '{0}'")]
    LoginTimeoutNotHandshake(String),
    /// `--login-timeout 0s`.
    #[error("invalid --login-timeout 0s: must be above zero")]
    NoLoginTime,
    /// `--upstream` for a protocol other than the gateway.
    #[error("--upstream {upstream} is for the gateway only, not for '{protocol}'")]
    UpstreamNotGateway {
        /// The first `--upstream` given.
        upstream: String,
        /// The protocol asked for.
        protocol: String,
    },
    /// A gateway's flag for another protocol.
    #[error("{flag} is for the gateway only, not for '{protocol}'")]
    GatewayFlag {
        /// The flag.
        flag: &'static str,
        /// The protocol asked for.
        protocol: String,
    },
    /// An `--upstream` that does not resolve to an address.
    #[error("invalid upstream '{upstream}': {reason}")]
    BadUpstream {
        /// The value given.
        upstream: String,
        /// Why it does not resolve.
        reason: io::Error,
    },
    /// `--tls-cert` and `--tls-key` not given in pairs.
    #[error("--tls-cert and --tls-key go in pairs: got {certs} --tls-cert and {keys} --tls-key")]
    TlsPairs {
        /// How many `--tls-cert`.
        certs: usize,
        /// How many `--tls-key`.
        keys: usize,
    },
    /// `--tls-alpn` without TLS.
    #[error("--tls-alpn {0} needs --tls-cert and --tls-key")]
    AlpnWithoutTls(String),
    /// `--proxy-from` without `--proxy-protocol`.
    #[error("--proxy-from {0} needs --proxy-protocol")]
    ProxyFromWithoutProxy(String),
    /// `--admin` is not HOST:PORT, or cannot be listened on.
    #[error("cannot serve the admin endpoint on {addr}: {reason}")]
    Admin {
        /// The value given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The `--admin-token-file` cannot be read, or is empty.
    #[error("invalid --admin-token-file {path}: {reason}", path = path.display())]
    AdminToken {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `--cluster` with a protocol that sends no messages.
    #[error("--cluster: the {0} protocol has no groups or messages to share; use chat or kv")]
    ClusterProtocol(String),
    /// The cluster could not be joined.
    #[error("--cluster {url}: {source}")]
    Cluster {
        /// The URL given.
        url: String,
        /// Why.
        source: ClusterError,
    },
    /// The tokio runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
}

/// Runs `serve` on a runtime fit for the threading model.
pub fn main(args: ServeArgs) -> Result<(), ServeError> {
    let threads = match args.threads {
        Some(0) => return Err(ServeError::NoThreads),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let runtime = match args.threading {
        // The server's threads run the connections; this runtime only waits for signals.
        Model::PerCore => tokio::runtime::Builder::new_current_thread(),
        Model::WorkStealing => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
    }
    .enable_all()
    .build()
    .map_err(ServeError::Runtime)?;
    let threading = match args.threading {
        Model::PerCore => Threading::PerCore(threads),
        Model::WorkStealing => Threading::Shared,
    };
    runtime.block_on(run(args, threading))
}

/// Serves until Ctrl-C or SIGTERM, then shuts down gracefully (a second signal closes
/// the connections still open at once) and logs what the shutdown did and the final
/// counters.
async fn run(args: ServeArgs, threading: Threading) -> Result<(), ServeError> {
    if !PROTOCOLS.contains(&args.protocol.as_str()) {
        return Err(ServeError::UnknownProtocol(args.protocol));
    }
    let tcp = match (&args.bind, args.port) {
        (None, None) if !args.unix.is_empty() => None,
        (bind, port) => Some(listen_address(
            bind.as_deref().unwrap_or("127.0.0.1"),
            port,
        )?),
    };
    if args.protocol != "gateway" && !args.upstreams.is_empty() {
        return Err(ServeError::UpstreamNotGateway {
            upstream: args.upstreams[0].clone(),
            protocol: args.protocol,
        });
    }
    if args.protocol != "gateway" {
        let given = [
            ("--send-proxy-v2", args.send_proxy_v2),
            ("--max-per-upstream", args.max_per_upstream.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, given)| *given) {
            return Err(ServeError::GatewayFlag {
                flag,
                protocol: args.protocol,
            });
        }
    }
    let login_timeout = match args.login_timeout.map(Duration::from) {
        Some(_) if args.protocol != "handshake" => {
            return Err(ServeError::LoginTimeoutNotHandshake(args.protocol));
        }
        Some(Duration::ZERO) => return Err(ServeError::NoLoginTime),
        given => LoginTimeout(given.unwrap_or(linedancer::examples::LOGIN_TIMEOUT)),
    };
    let mut builder = Server::builder()
        .threading(threading)
        .max_connections(args.max_connections)
        .drain_timeout(*args.drain_timeout)
        .send_timeout(*args.send_timeout)
        .frame_timeout(*args.frame_timeout)
        .tcp_keepalive(args.tcp_keepalive.0)
        .max_output(args.max_output)
        .mailbox_capacity(args.mailbox_capacity);
    if let Some(address) = tcp {
        builder = builder.address(address);
    }
    for path in &args.unix {
        builder = builder.unix(path);
    }
    if let Some(mode) = args.unix_mode {
        builder = builder.unix_mode(mode);
    }
    // Sockets passed by systemd (LISTEN_FDS) replace every address above.
    builder = builder.socket_activation().sd_notify();
    if let Some(path) = &args.upgrade_socket {
        builder = builder.upgrade_socket(path);
        if args.upgrade {
            builder = builder.upgrade_from(path);
        }
    }
    if let Some(timeout) = args.idle_timeout {
        builder = builder.idle_timeout(*timeout);
    }
    if let Some(tls) = tls_config(&args)? {
        builder = builder
            .tls(tls)
            .tls_handshake_timeout(*args.tls_handshake_timeout);
    }
    builder = builder.max_handshakes(args.max_handshakes);
    if args.proxy_protocol {
        let proxy = (args.proxy_from.iter()).fold(ProxyProtocol::new(), |proxy, network| {
            proxy.trust(network.as_str())
        });
        builder = builder
            .proxy_protocol(proxy)
            .proxy_header_timeout(*args.proxy_header_timeout);
    } else if let Some(network) = args.proxy_from.first() {
        return Err(ServeError::ProxyFromWithoutProxy(network.clone()));
    }
    let mut watch = Watch::from_args(&args)?;
    let cluster = match (&args.cluster, &args.node) {
        (Some(url), Some(node)) => {
            if !["chat", "kv"].contains(&args.protocol.as_str()) {
                return Err(ServeError::ClusterProtocol(args.protocol));
            }
            let failed = |source| ServeError::Cluster {
                url: url.clone(),
                source,
            };
            let bus = (NatsBus::connect(url, node).await).map_err(|e| failed(e.into()))?;
            let mut options = ClusterOptions::default();
            options.node_timeout = *args.node_timeout;
            let cluster = (Cluster::join(Arc::new(bus), node, options).await).map_err(failed)?;
            watch.cluster = Some(cluster.clone());
            Some(cluster)
        }
        _ => None,
    };
    let served = serve(args, builder, watch, login_timeout, cluster.clone()).await;
    if let Some(cluster) = cluster {
        cluster.leave().await;
    }
    served
}

/// Serves `args.protocol` with `builder`, on `cluster` if given; a handshake with
/// `login_timeout`.
async fn serve(
    args: ServeArgs,
    builder: linedancer::Builder<()>,
    watch: Watch,
    login_timeout: LoginTimeout,
    cluster: Option<Cluster>,
) -> Result<(), ServeError> {
    match args.protocol.as_str() {
        "echo" => until_signal(builder.protocol::<Echo>(), watch).await,
        "handshake" => {
            let settings = Arc::new(login_timeout);
            until_signal(builder.state(settings).protocol::<Handshake>(), watch).await
        }
        "line-echo" => until_signal(builder.protocol::<LineEcho>(), watch).await,
        "chat" => {
            let rooms = cluster
                .clone()
                .map_or_else(Rooms::default, Rooms::clustered);
            let builder = builder.state(Arc::new(rooms)).protocol::<Chat>();
            until_signal(on_cluster(builder, cluster), watch).await
        }
        "gateway" => {
            let gateway = gateway(&args).await?;
            let watch = watch.collector(gateway.stats());
            until_signal(builder.handler(gateway), watch).await
        }
        "kv" => {
            let builder = builder.state(Arc::new(Db::new())).protocol::<Kv>();
            until_signal(on_cluster(builder, cluster), watch).await
        }
        _ => Err(ServeError::UnknownProtocol(args.protocol)),
    }
}

/// `builder`, on `cluster` if there is one.
fn on_cluster<P, S>(
    builder: linedancer::Builder<Driver<P, S>>,
    cluster: Option<Cluster>,
) -> linedancer::Builder<Driver<P, S>>
where
    P: Protocol<S>,
    P::Message: ClusterMessage,
{
    match cluster {
        Some(cluster) => builder.cluster(cluster),
        None => builder,
    }
}

/// TLS from `--tls-cert`, `--tls-key` and `--tls-alpn`; `None` without certificates.
fn tls_config(args: &ServeArgs) -> Result<Option<TlsConfig>, ServeError> {
    let (certs, keys) = (&args.tls_certs, &args.tls_keys);
    if certs.len() != keys.len() {
        return Err(ServeError::TlsPairs {
            certs: certs.len(),
            keys: keys.len(),
        });
    }
    let mut pairs = certs.iter().zip(keys);
    let Some((cert, key)) = pairs.next() else {
        return match args.tls_alpn.first() {
            Some(alpn) => Err(ServeError::AlpnWithoutTls(alpn.clone())),
            None => Ok(None),
        };
    };
    let tls = pairs.fold(TlsConfig::pem_files(cert, key), |tls, (cert, key)| {
        tls.add_pem_files(cert, key)
    });
    Ok(Some(tls.alpn(&args.tls_alpn)))
}

/// `--unix-mode`: permissions in octal (660, 0660 or 0o660).
fn file_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err("expected permissions in octal, from 0 to 777, such as 660".into()),
    }
}

/// `--tcp-keepalive`: a duration, or off.
#[derive(Debug, Clone, Copy)]
struct Keepalive(Option<Duration>);

fn keepalive(text: &str) -> Result<Keepalive, String> {
    if text == "off" {
        return Ok(Keepalive(None));
    }
    humantime::parse_duration(text)
        .map(|time| Keepalive(Some(time)))
        .map_err(|e| format!("{e} (a duration such as 2m, or off)"))
}

/// Where `--bind` and `--port` say to listen, as `HOST:PORT` text for the builder.
fn listen_address(bind: &str, port: Option<u16>) -> Result<String, ServeError> {
    let ip_text = (bind.strip_prefix('['))
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(bind);
    let ip = match ip_text {
        "localhost" => Some(IpAddr::from([127, 0, 0, 1])),
        other => other.parse::<IpAddr>().ok(),
    };
    if let Some(ip) = ip {
        let port = port.unwrap_or(linedancer::DEFAULT_PORT);
        return Ok(SocketAddr::new(ip, port).to_string());
    }
    match bind.rsplit_once(':') {
        Some((host, given)) if !host.is_empty() && given.parse::<u16>().is_ok() => {
            if port.is_some() {
                return Err(ServeError::PortTwice(bind.to_owned()));
            }
            Ok(bind.to_owned())
        }
        _ => Err(ServeError::BadAddress(bind.to_owned())),
    }
}

/// The admin endpoint and the alarms, as the flags ask for them.
struct Watch {
    /// The admin endpoint's address, and its token.
    admin: Option<(String, Option<String>)>,
    alarms: AlarmSettings,
    /// The gateway's per-upstream metrics.
    gateway: Option<GatewayStats>,
    /// The cluster's metrics.
    cluster: Option<Cluster>,
    /// Whether this server takes over from another (`--upgrade`), which may hold the
    /// endpoint's address for a moment.
    upgrading: bool,
}

impl Watch {
    fn from_args(args: &ServeArgs) -> Result<Watch, ServeError> {
        let token = match &args.admin_token_file {
            None => None,
            Some(path) => {
                let bad = |reason: String| ServeError::AdminToken {
                    path: path.clone(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(bad("the file is empty".into()));
                }
                Some(token.to_owned())
            }
        };
        let mut alarms = AlarmSettings::default().hold(*args.alarm_hold);
        alarms.connections = args.alarm_connections;
        alarms.accept_errors_per_second = args.alarm_accept_errors;
        alarms.mailbox_overflows_per_second = args.alarm_mailbox_overflows;
        Ok(Watch {
            admin: args.admin.clone().map(|addr| (addr, token)),
            alarms,
            gateway: None,
            cluster: None,
            upgrading: args.upgrade,
        })
    }

    /// Adds the gateway's per-upstream metrics to the endpoint.
    fn collector(mut self, gateway: GatewayStats) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// Starts the alarms and the admin endpoint for `server`; returns the endpoint's
    /// address.
    async fn start<M: Send + 'static>(
        self,
        server: &ServerHandle<M>,
    ) -> Result<Option<std::net::SocketAddr>, ServeError> {
        let any_alarm = self.alarms.connections.is_some()
            || self.alarms.accept_errors_per_second.is_some()
            || self.alarms.mailbox_overflows_per_second.is_some();
        // The alarms log when they fire and clear; nothing more to do here.
        let alarms = match any_alarm {
            true => Some(Alarms::watch(server, self.alarms, |_| {})?),
            false => None,
        };
        let Some((addr, token)) = self.admin else {
            return Ok(None);
        };
        let failed = |reason: String| ServeError::Admin {
            addr: addr.clone(),
            reason,
        };
        let resolved: Vec<std::net::SocketAddr> = (tokio::net::lookup_host(addr.as_str()).await)
            .map_err(|e| failed(format!("{e} (expected HOST:PORT)")))?
            .collect();
        // Checked before binding, so that the endpoint is never open without its token.
        if token.is_none() && resolved.iter().any(|at| !at.ip().is_loopback()) {
            return Err(failed(
                "not a loopback address: the endpoint can close connections and drain the \
                 server, so it needs --admin-token-file there"
                    .into(),
            ));
        }
        let mut admin = Admin::new(server);
        if let Some(token) = token {
            admin = admin.token(token);
        }
        if let Some(alarms) = &alarms {
            admin = admin.alarms(alarms);
        }
        if let Some(gateway) = self.gateway {
            admin = admin.collector(gateway);
        }
        if let Some(cluster) = self.cluster {
            admin = admin.collector(cluster);
        }
        let listener = match tokio::net::TcpListener::bind(&resolved[..]).await {
            Ok(listener) => listener,
            // The server this one takes over from holds the port until it has handed
            // over: wait for it, serving meanwhile.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && self.upgrading => {
                info!(%addr, "admin endpoint: waiting for the old server to release its address");
                let (server, first) = (server.clone(), resolved.first().copied());
                tokio::spawn(async move {
                    match bind_when_free(&resolved).await {
                        Ok(listener) => serve_admin(admin, listener, &server).await,
                        Err(e) => warn!(%addr, "admin endpoint: {e}"),
                    }
                });
                return Ok(first);
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        let local = listener.local_addr().map_err(|e| failed(e.to_string()))?;
        let server = server.clone();
        tokio::spawn(async move { serve_admin(admin, listener, &server).await });
        Ok(Some(local))
    }
}

/// Binds `addrs` once the old server has released them: tries every 50 ms, for at
/// most a minute.
async fn bind_when_free(addrs: &[std::net::SocketAddr]) -> io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..1200 {
        match tokio::net::TcpListener::bind(addrs).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.unwrap_or_else(|| io::Error::other("never free")))
}

/// Serves `admin` on `listener` until `server` hands over to a successor, which serves
/// the endpoint on the same address. (The address was checked to be loopback, or to
/// have a token, before binding.)
async fn serve_admin<M: Send + 'static>(
    admin: Admin,
    listener: tokio::net::TcpListener,
    server: &ServerHandle<M>,
) {
    match admin.serve(listener) {
        Ok(serving) => {
            tokio::select! {
                () = serving => {}
                () = server.handed_over() => {}
            }
        }
        Err(e) => warn!("admin endpoint: {e}"),
    }
}

/// Starts the server, says where it listens, serves until a signal, and logs what the
/// shutdown did and the final counters.
async fn until_signal<H: Service>(
    builder: linedancer::Builder<H>,
    watch: Watch,
) -> Result<(), ServeError> {
    let server: ServerHandle<H::Message> = builder.start().await?;
    let stopped = server.run_until_signal()?;
    let admin = watch.start(&server).await?;
    for address in server.addresses() {
        eprintln!("listening on {address}");
    }
    if let Some(admin) = admin {
        eprintln!("admin on http://{admin}");
    }
    let report = stopped.await;
    info!(
        drained = report.drained,
        force_closed = report.force_closed,
        "shutdown finished"
    );
    let stats = server.stats();
    info!(
        accepted = stats.accepted,
        closed = %stats.closed,
        accept_errors = stats.accept_errors,
        bytes_in = stats.bytes_in,
        bytes_out = stats.bytes_out,
        "final stats"
    );
    let failures = stats.tls_handshake_failures;
    if failures.total() > 0 {
        let by_reason: Vec<String> = (failures.by_reason().iter())
            .filter(|(_, count)| *count > 0)
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        info!(failed = failures.total(), by_reason = %by_reason.join(", "), "tls handshakes");
    }
    Ok(())
}

/// A gateway to `upstreams`, each `HOST:PORT` resolved once, now. A name with several
/// addresses stands for its first IPv4 one, if it has one: `localhost` is then
/// 127.0.0.1, where `serve` listens by default, even where it also resolves to ::1.
async fn gateway(args: &ServeArgs) -> Result<Gateway, ServeError> {
    if args.upstreams.is_empty() {
        return Err(ServeError::NoUpstream);
    }
    let gateway = Gateway::resolve(&args.upstreams)
        .await
        .map_err(|e| match e {
            linedancer::Error::Address { value, source } => ServeError::BadUpstream {
                upstream: value,
                reason: source,
            },
            other => ServeError::Start(other),
        })?;
    let mut gateway = gateway
        .balance(args.balance.into())
        .connect_timeout(*args.connect_timeout)
        .health_checks(args.health_interval.0)
        .send_proxy_v2(args.send_proxy_v2);
    if let Some(max) = args.max_per_upstream {
        gateway = gateway.max_per_upstream(max);
    }
    Ok(gateway)
}
