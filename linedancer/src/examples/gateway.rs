//! A gateway: a layer-4 load balancer that relays every client connection, byte for
//! byte, to one of a pool of upstream servers.
//!
//! Built on the raw [`Handler`] rather than a [`Protocol`](crate::Protocol): it has no
//! frames, only two sockets. For each client it picks an upstream ([`Balance`]: in turn,
//! or the one with the fewest connections), skipping those at their connection cap and
//! trying those marked down last; a connect that fails or takes longer than the connect
//! timeout marks that upstream down and the next one is tried, so the client never sees
//! the failed one. Health checks (a TCP connect every few seconds, the upstream's host
//! name resolved again each time) mark upstreams down and up again. Optionally the
//! upstream first gets a PROXY protocol v2 header with the client's address. Then the
//! relay moves bytes both ways and passes a half-close on, as tokio's
//! [`copy_bidirectional`](tokio::io::copy_bidirectional) does: when one side stops
//! sending, the other side's write half is shut down, and the relay ends once both
//! directions have. Each direction holds an 8 KiB buffer only while bytes read from one
//! side wait for the other to take them, taken from and given back to a pool of the
//! thread's: an idle relay holds none, and what waits for a slow side is bounded by
//! construction. The server's idle timeout (no byte moved either way) and send timeout
//! (a side that takes none of the bytes waiting for it) apply to both sides. When the
//! server shuts down, the relay stops and both sockets are closed. Per-upstream
//! counters are read through [`GatewayStats`].

mod relay;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::close::CloseReason;
use crate::connections::Connection;
use crate::error::Error;
use crate::handler::Handler;
use crate::transport::{Address, Stream};

/// How long connecting to an upstream may take, by default, before the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often upstreams are checked, by default.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How a gateway picks the upstream of each client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each in turn.
    #[default]
    RoundRobin,
    /// The one with the fewest open connections (in turn among equals).
    LeastConn,
}

/// Relays every connection to one of its upstreams, both directions, until both sides
/// have closed or the server shuts down.
///
/// ```
/// use linedancer::examples::{Echo, Gateway};
/// use linedancer::Server;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = Server::builder().port(0).protocol::<Echo>().start().await?;
/// let gateway = Gateway::new(vec![echo.local_addr()])?;
/// let gateway = Server::builder().port(0).handler(gateway).start().await?;
///
/// let mut client = tokio::net::TcpStream::connect(gateway.local_addr()).await?;
/// client.write_all(b"through the gateway").await?;
/// client.shutdown().await?; // passed on to the echo server, which closes in turn
/// let mut reply = String::new();
/// client.read_to_string(&mut reply).await?;
/// assert_eq!(reply, "through the gateway");
/// # gateway.shutdown().await;
/// # echo.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Gateway {
    pool: Arc<Pool>,
    balance: Balance,
    connect_timeout: Duration,
    /// `None`: no active health checks.
    health_interval: Option<Duration>,
    max_per_upstream: Option<usize>,
    send_proxy_v2: bool,
    /// Started with the first client, on its runtime.
    health_checks: OnceLock<()>,
}

/// The upstreams and their counters.
#[derive(Debug)]
struct Pool {
    upstreams: Vec<Upstream>,
    /// How many clients have been given an upstream: where the next turn starts.
    next: AtomicUsize,
}

/// One upstream server.
#[derive(Debug)]
struct Upstream {
    /// As given: `HOST:PORT`, resolved again by each health check.
    name: String,
    addr: Mutex<SocketAddr>,
    up: AtomicBool,
    open: AtomicUsize,
    connections: AtomicU64,
    failures: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// One upstream's counters, from [`GatewayStats::upstreams`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamStats {
    /// As given (`HOST:PORT`).
    pub name: String,
    /// The address it last resolved to.
    pub addr: SocketAddr,
    /// Whether it is in service (not marked down by a failed connect or health check).
    pub up: bool,
    /// Clients relayed to it now.
    pub open: usize,
    /// Clients relayed to it in all.
    pub connections: u64,
    /// Connects to it that failed or timed out (clients' and health checks').
    pub failures: u64,
    /// Bytes relayed to it, from clients whose relay has ended.
    pub bytes_up: u64,
    /// Bytes relayed from it, likewise.
    pub bytes_down: u64,
}

/// Reads a gateway's per-upstream counters, while the server runs it.
#[derive(Debug, Clone)]
pub struct GatewayStats {
    pool: Arc<Pool>,
}

/// A metric's name, help and value for one upstream.
type Family<T> = (&'static str, &'static str, fn(&UpstreamStats) -> T);

impl prometheus_client::collector::Collector for GatewayStats {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::registry::Unit;
        let upstreams = self.upstreams();
        let gauges: [Family<i64>; 2] = [
            (
                "gateway_upstream_up",
                "1 while the upstream is in service.",
                |u| i64::from(u.up),
            ),
            (
                "gateway_upstream_open",
                "Clients relayed to the upstream now.",
                |u| u.open as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for upstream in &upstreams {
                let labels = [("upstream", upstream.name.as_str())];
                ConstGauge::new(value(upstream)).encode(family.encode_family(&labels)?)?;
            }
        }
        let counters: [(Option<Unit>, Family<u64>); 4] = [
            (
                None,
                (
                    "gateway_upstream_connections",
                    "Clients relayed to the upstream.",
                    |u| u.connections,
                ),
            ),
            (
                None,
                (
                    "gateway_upstream_failures",
                    "Connects to the upstream that failed or timed out.",
                    |u| u.failures,
                ),
            ),
            (
                Some(Unit::Bytes),
                (
                    "gateway_upstream_sent",
                    "Bytes relayed to the upstream (relays ended).",
                    |u| u.bytes_up,
                ),
            ),
            (
                Some(Unit::Bytes),
                (
                    "gateway_upstream_received",
                    "Bytes relayed from the upstream (relays ended).",
                    |u| u.bytes_down,
                ),
            ),
        ];
        for (unit, (name, help, value)) in counters {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for upstream in &upstreams {
                let labels = [("upstream", upstream.name.as_str())];
                ConstCounter::new(value(upstream)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl GatewayStats {
    /// Each upstream's counters, in the order given.
    pub fn upstreams(&self) -> Vec<UpstreamStats> {
        (self.pool.upstreams.iter())
            .map(|upstream| UpstreamStats {
                name: upstream.name.clone(),
                addr: upstream.addr(),
                up: upstream.up.load(Ordering::Relaxed),
                open: upstream.open.load(Ordering::Relaxed),
                connections: upstream.connections.load(Ordering::Relaxed),
                failures: upstream.failures.load(Ordering::Relaxed),
                bytes_up: upstream.bytes_up.load(Ordering::Relaxed),
                bytes_down: upstream.bytes_down.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Gateway {
    /// A gateway to `upstreams`, used in turn in this order, with health checks every
    /// [`HEALTH_CHECK_INTERVAL`] and a [`CONNECT_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for the setting `upstreams` when the list is empty.
    pub fn new(upstreams: Vec<SocketAddr>) -> Result<Self, Error> {
        let named = upstreams.into_iter().map(|addr| (addr.to_string(), addr));
        Gateway::with_names(named.collect())
    }

    /// A gateway to upstreams given as `HOST:PORT`, resolved now (a name's first IPv4
    /// address, if it has one: `localhost` is then 127.0.0.1) and again by each health
    /// check.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the list is empty, [`Error::Address`] for a name that
    /// does not resolve.
    pub async fn resolve(upstreams: &[String]) -> Result<Self, Error> {
        let mut named = Vec::with_capacity(upstreams.len());
        for name in upstreams {
            let addr = resolve(name).await.map_err(|source| Error::Address {
                value: name.clone(),
                source,
            })?;
            named.push((name.clone(), addr));
        }
        Gateway::with_names(named)
    }

    fn with_names(upstreams: Vec<(String, SocketAddr)>) -> Result<Self, Error> {
        if upstreams.is_empty() {
            return Err(Error::Config {
                setting: "upstreams",
                value: "[]".into(),
                reason: "needs at least one upstream",
            });
        }
        let upstreams = (upstreams.into_iter())
            .map(|(name, addr)| Upstream {
                name,
                addr: Mutex::new(addr),
                up: AtomicBool::new(true),
                open: AtomicUsize::new(0),
                connections: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                bytes_up: AtomicU64::new(0),
                bytes_down: AtomicU64::new(0),
            })
            .collect();
        Ok(Gateway {
            pool: Arc::new(Pool {
                upstreams,
                next: AtomicUsize::new(0),
            }),
            balance: Balance::RoundRobin,
            connect_timeout: CONNECT_TIMEOUT,
            health_interval: Some(HEALTH_CHECK_INTERVAL),
            max_per_upstream: None,
            send_proxy_v2: false,
            health_checks: OnceLock::new(),
        })
    }

    /// How each client's upstream is picked. Default [`Balance::RoundRobin`].
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// How long a connect to an upstream may take before the next is tried. Default
    /// [`CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often every upstream is checked (a TCP connect, its name resolved again):
    /// one that fails is taken out of service, and put back when it answers; `None`
    /// for no checks (a failed client connect then takes no upstream out). Default
    /// `Some(`[`HEALTH_CHECK_INTERVAL`]`)`.
    pub fn health_checks(mut self, interval: Option<Duration>) -> Self {
        self.health_interval = interval;
        self
    }

    /// The most clients relayed to one upstream at once; a client arriving when every
    /// upstream is at its cap is closed. Default: no cap.
    pub fn max_per_upstream(mut self, max: usize) -> Self {
        self.max_per_upstream = Some(max);
        self
    }

    /// Sends each upstream a PROXY protocol v2 header first, with the client's address
    /// (from the gateway's own PROXY header, if it takes one) and the address it
    /// connected to, as HAProxy's `send-proxy-v2` does.
    pub fn send_proxy_v2(mut self, send: bool) -> Self {
        self.send_proxy_v2 = send;
        self
    }

    /// The upstreams, in the order they were given, as last resolved.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.pool.upstreams.iter().map(Upstream::addr).collect()
    }

    /// A handle on the per-upstream counters, to keep before the gateway is handed to
    /// the server.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            pool: Arc::clone(&self.pool),
        }
    }

    /// The upstreams to try for one client, best first: in service and under the cap,
    /// by the balance, then those out of service (a last resort), never one at its cap.
    fn candidates(&self) -> Vec<&Upstream> {
        let upstreams = &self.pool.upstreams;
        let start = self.pool.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<&Upstream> = (0..upstreams.len())
            .map(|i| &upstreams[(start + i) % upstreams.len()])
            .filter(|upstream| {
                self.max_per_upstream
                    .is_none_or(|max| upstream.open.load(Ordering::Relaxed) < max)
            })
            .collect();
        if self.balance == Balance::LeastConn {
            // Stable: equals stay in turn.
            order.sort_by_key(|upstream| upstream.open.load(Ordering::Relaxed));
        }
        order.sort_by_key(|upstream| !upstream.up.load(Ordering::Relaxed));
        order
    }

    /// Starts the health checks, once, on the runtime of the first client.
    fn start_health_checks(&self) {
        let Some(interval) = self.health_interval else {
            return;
        };
        self.health_checks.get_or_init(|| {
            let pool = Arc::downgrade(&self.pool);
            tokio::spawn(check_health(pool, interval, self.connect_timeout));
        });
    }
}

impl Upstream {
    fn addr(&self) -> SocketAddr {
        *self.addr.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a connect that failed; takes the upstream out of service if `mark`.
    fn failed(&self, mark: bool, why: &io::Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if mark && self.up.swap(false, Ordering::Relaxed) {
            warn!(upstream = %self.name, error = %why, "upstream down");
        }
    }

    /// Records a connect that succeeded (a health check's): back in service.
    fn answered(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(upstream = %self.name, "upstream up");
        }
    }
}

impl Handler for Gateway {
    async fn handle<T: Stream>(&self, mut client: T, conn: Connection) -> io::Result<()> {
        self.start_health_checks();
        tokio::select! {
            relayed = self.relay(&mut client, &conn) => relayed,
            // Returning drops both sockets, which closes them.
            () = conn.shutdown_requested() => Ok(()),
        }
    }
}

impl Gateway {
    /// Connects to the best upstream that answers, and relays between it and `client`
    /// until both directions have ended.
    async fn relay<T: Stream>(&self, client: &mut T, conn: &Connection) -> io::Result<()> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err(io::Error::other("every upstream is at its connection cap"));
        }
        let mut last_error = None;
        for upstream in candidates {
            let addr = upstream.addr();
            match connect(addr, self.connect_timeout).await {
                Ok(outbound) => return self.relay_to(upstream, outbound, client, conn).await,
                Err(e) => {
                    debug!(upstream = %upstream.name, error = %e, "connect failed; trying the next");
                    upstream.failed(self.health_interval.is_some(), &e);
                    last_error = Some(e);
                }
            }
        }
        let e = last_error.expect("at least one candidate");
        warn!(error = %e, "no upstream answered");
        Err(io::Error::new(
            e.kind(),
            format!("no upstream answered: {e}"),
        ))
    }

    async fn relay_to<T: Stream>(
        &self,
        upstream: &Upstream,
        mut outbound: TcpStream,
        client: &mut T,
        conn: &Connection,
    ) -> io::Result<()> {
        upstream.connections.fetch_add(1, Ordering::Relaxed);
        upstream.open.fetch_add(1, Ordering::Relaxed);
        let _open = Open(&upstream.open);
        if self.send_proxy_v2 {
            outbound.write_all(&proxy_header(conn)?).await?;
        }
        debug!(upstream = %upstream.name, "relaying");
        let limits = conn.limits();
        let activity = Activity::default();
        let mut from = Watched {
            inner: client,
            activity: &activity,
        };
        let mut to = Watched {
            inner: &mut outbound,
            activity: &activity,
        };
        let relayed = tokio::select! {
            relayed = relay::relay(&mut from, &mut to) => relayed,
            reason = activity.expired(limits.idle_timeout, limits.send_timeout) => {
                debug!(upstream = %upstream.name, %reason, "relay cut");
                conn.record_close(reason);
                return Ok(());
            }
        };
        let (up, down) = relayed?;
        upstream.bytes_up.fetch_add(up, Ordering::Relaxed);
        upstream.bytes_down.fetch_add(down, Ordering::Relaxed);
        conn.record_bytes(up, down);
        debug!(upstream = %upstream.name, bytes_up = up, bytes_down = down, "relay finished");
        Ok(())
    }
}

/// What a relay's two sockets have done, counted as it happens (no clock read on the
/// relay's path) and watched from beside it: whether bytes moved either way, whether
/// writes went through, and whether one waits now.
#[derive(Default)]
struct Activity {
    /// Reads and writes that moved bytes.
    moved: AtomicU64,
    /// Writes that went through.
    written: AtomicU64,
    /// A write waits for its side to take bytes.
    blocked: AtomicBool,
}

impl Activity {
    /// Completes when no byte has moved for `idle` (if set), or a write has waited for
    /// `send` with none going through, with the reason to close for. Looks every
    /// quarter of the shorter one, so it fires within a quarter past it.
    async fn expired(&self, idle: Option<Duration>, send: Duration) -> CloseReason {
        let every = (idle.map_or(send, |idle| idle.min(send)) / 4).max(Duration::from_millis(1));
        let (mut moved, mut written) = (0, 0);
        let (mut still_since, mut stuck_since) = (Instant::now(), None);
        loop {
            tokio::time::sleep(every).await;
            let now = Instant::now();
            let moved_now = self.moved.load(Ordering::Relaxed);
            if moved_now != moved {
                (moved, still_since) = (moved_now, now);
            }
            let written_now = self.written.load(Ordering::Relaxed);
            if written_now != written || !self.blocked.load(Ordering::Relaxed) {
                (written, stuck_since) = (written_now, None);
            } else {
                stuck_since.get_or_insert(now);
            }
            if idle.is_some_and(|idle| now - still_since >= idle) {
                return CloseReason::IdleTimeout;
            }
            if stuck_since.is_some_and(|since| now - since >= send) {
                return CloseReason::SendTimeout;
            }
        }
    }
}

pin_project! {
    /// A relay's socket, telling its [`Activity`] when bytes move and writes wait.
    struct Watched<'a, S> {
        #[pin]
        inner: S,
        activity: &'a Activity,
    }
}

impl<S: AsyncRead> AsyncRead for Watched<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.inner.poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.moved.fetch_add(1, Ordering::Relaxed);
        }
        read
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write(cx, data);
        let activity = this.activity;
        let blocked = written.is_pending();
        if activity.blocked.load(Ordering::Relaxed) != blocked {
            activity.blocked.store(blocked, Ordering::Relaxed);
        }
        if !blocked {
            activity.written.fetch_add(1, Ordering::Relaxed);
            activity.moved.fetch_add(1, Ordering::Relaxed);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Lowers an upstream's open count when a relay ends, however it ends.
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects to `addr` within `timeout`, with `TCP_NODELAY`.
async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(connected) => connected?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection to {addr} within {timeout:?}"),
            ))
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%addr, "cannot set TCP_NODELAY: {e}");
    }
    Ok(stream)
}

/// The PROXY v2 header for `conn`: `PROXY` with its client and the address it reached
/// when both are IP addresses, `LOCAL` otherwise.
fn proxy_header(conn: &Connection) -> io::Result<Vec<u8>> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let ends = match (conn.peer_addr(), conn.local_addr()) {
        (Address::Ip(client), Address::Ip(local)) => Some(same_family(*client, *local)),
        _ => None,
    };
    let header = match ends {
        Some(ends) => {
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, ends)
        }
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        ),
    };
    header.build()
}

/// Both addresses in one family: IPv4 ones mapped into IPv6 when the other is IPv6.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    if client.is_ipv4() == local.is_ipv4() {
        (client, local)
    } else {
        (v6(client), v6(local))
    }
}

/// Resolves `HOST:PORT` to its first IPv4 address, else its first.
async fn resolve(name: &str) -> io::Result<SocketAddr> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(name).await?.collect();
    (resolved.iter().find(|addr| addr.is_ipv4()))
        .or(resolved.first())
        .copied()
        .ok_or_else(|| io::Error::other("resolves to no address"))
}

/// Checks every upstream every `interval` until the gateway is dropped: resolves its
/// name again, connects, and puts it in or out of service.
async fn check_health(pool: Weak<Pool>, interval: Duration, timeout: Duration) {
    // The first check one interval after the first client, not at once.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        for upstream in &pool.upstreams {
            match resolve(&upstream.name).await {
                Ok(addr) => {
                    *upstream.addr.lock().unwrap_or_else(PoisonError::into_inner) = addr;
                }
                Err(e) => debug!(upstream = %upstream.name, "cannot resolve it again: {e}"),
            }
            match connect(upstream.addr(), timeout).await {
                Ok(_) => upstream.answered(),
                Err(e) => upstream.failed(true, &e),
            }
        }
    }
}
