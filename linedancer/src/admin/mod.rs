//! Seeing inside a running server, and acting on it: the admin endpoint (Prometheus
//! metrics, the connection list, closing one connection, health, drain, and a live
//! view in the browser), and alarms on the server's counters.
//!
//! [`Admin`] serves one server's admin endpoint over HTTP/1.1 (hyper), on a listener
//! of its own or inside your own HTTP server through [`Admin::handle`]. Everything it
//! shows is read when asked, from the counters the server keeps anyway: serving pays
//! nothing for it.
//!
//! ```
//! use linedancer::admin::Admin;
//! use linedancer::examples::Echo;
//! use linedancer::Server;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder().port(0).protocol::<Echo>().start().await?;
//! let admin = Admin::new(&server);
//! assert!(admin.metrics().contains("linedancer_connections_accepted_total 0"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(admin.serve(listener)?);
//! // GET http://{addr}/metrics, /connections, /health; POST /drain ...
//! # let _ = addr;
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod alarms;
mod metrics;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Body;
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use alarms::{AlarmEvent, AlarmSettings, Alarms};

use crate::connections::{ConnectionId, ConnectionInfo};
use crate::error::Error;
use crate::server::ServerHandle;
use crate::stats::Stats;
use crate::transport::Address;

/// The live view: one page, its script inline, served from the binary.
const LIVE_VIEW: &str = include_str!("live.html");

/// The most connections listed in one answer of `/connections`.
pub const MAX_PAGE: usize = 1000;
/// Connections listed by `/connections` when no `limit` is given.
pub const DEFAULT_PAGE: usize = 100;
/// The largest request body taken (the endpoint reads none): longer ones get 413.
const MAX_BODY: u64 = 64 * 1024;
/// The largest request head (request line and headers): longer ones get 431.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client has to send a request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The most admin connections served at once; more wait in the listener's backlog.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// A running server, as the admin endpoint sees it, whatever its message type.
trait Target: Send + Sync + 'static {
    fn stats(&self) -> Stats;
    fn states(&self) -> Vec<(&'static str, usize)>;
    fn listeners(&self) -> Vec<(Address, usize)>;
    fn max_connections(&self) -> usize;
    fn accepting(&self) -> Health;
    fn connections(&self) -> Vec<ConnectionInfo>;
    fn close(&self, id: ConnectionId) -> bool;
    fn drain(&self);
}

impl<M: Send + 'static> Target for ServerHandle<M> {
    fn stats(&self) -> Stats {
        ServerHandle::stats(self)
    }
    fn states(&self) -> Vec<(&'static str, usize)> {
        self.connections_by_state()
    }
    fn listeners(&self) -> Vec<(Address, usize)> {
        self.connections_by_listener()
    }
    fn max_connections(&self) -> usize {
        ServerHandle::max_connections(self)
    }
    fn accepting(&self) -> Health {
        if self.is_shutting_down() {
            Health::Draining
        } else if self.is_suspended() {
            Health::Suspended
        } else {
            Health::Accepting
        }
    }
    fn connections(&self) -> Vec<ConnectionInfo> {
        self.connections_info()
    }
    fn close(&self, id: ConnectionId) -> bool {
        self.close_connection(id)
    }
    fn drain(&self) {
        let server = self.clone();
        tokio::spawn(async move { server.shutdown().await });
    }
}

/// Whether the server accepts connections, as `/health` tells a load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Accepting,
    Suspended,
    Draining,
}

impl Health {
    fn name(self) -> &'static str {
        match self {
            Health::Accepting => "accepting",
            Health::Suspended => "suspended",
            Health::Draining => "draining",
        }
    }
}

/// Everything the metrics and the live view show, read at once.
struct Snapshot {
    stats: Stats,
    states: Vec<(&'static str, usize)>,
    listeners: Vec<(Address, usize)>,
    max_connections: usize,
    accepting: bool,
    alarms: Vec<alarms::AlarmStatus>,
    unauthorized: u64,
}

/// One server's admin endpoint. Cheap to clone: clones serve the same server.
#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

struct Inner {
    target: Arc<dyn Target>,
    /// The bearer token every request must carry, if any.
    token: Option<Vec<u8>>,
    /// Requests refused for a missing or wrong token.
    unauthorized: AtomicU64,
    alarms: Option<Alarms>,
    /// Metrics of the user's own, after the server's.
    collectors: Vec<Arc<dyn Collector>>,
    started: Instant,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.inner.token.as_ref().map(|_| "..."))
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// The admin endpoint of `server`, without a token and without alarms.
    pub fn new<M: Send + 'static>(server: &ServerHandle<M>) -> Self {
        Admin {
            inner: Arc::new(Inner {
                target: Arc::new(server.clone()),
                token: None,
                unauthorized: AtomicU64::new(0),
                alarms: None,
                collectors: Vec::new(),
                started: Instant::now(),
            }),
        }
    }

    /// Requires `Authorization: Bearer <token>` on every request (compared in constant
    /// time); others get 401, and are counted. Required to serve on an address other
    /// than loopback.
    pub fn token(self, token: impl Into<String>) -> Self {
        self.rebuild(|inner| inner.token = Some(token.into().into_bytes()))
    }

    /// Shows `alarms` (which fire, how often they fired) in the metrics and the live
    /// view.
    pub fn alarms(self, alarms: &Alarms) -> Self {
        self.rebuild(|inner| inner.alarms = Some(alarms.clone()))
    }

    /// Adds metrics of your own (a `prometheus-client` collector), read at each scrape
    /// after the server's, with the same `linedancer_` prefix: such as a gateway's
    /// per-upstream counters ([`GatewayStats`](crate::examples::GatewayStats)).
    pub fn collector(self, collector: impl Collector) -> Self {
        self.rebuild(|inner| inner.collectors.push(Arc::new(collector)))
    }

    fn rebuild(self, change: impl FnOnce(&mut Inner)) -> Self {
        let shared = &self.inner;
        let mut inner = Inner {
            target: Arc::clone(&shared.target),
            token: shared.token.clone(),
            unauthorized: AtomicU64::new(shared.unauthorized.load(Ordering::Relaxed)),
            alarms: shared.alarms.clone(),
            collectors: shared.collectors.clone(),
            started: shared.started,
        };
        change(&mut inner);
        Admin {
            inner: Arc::new(inner),
        }
    }

    /// The server's metrics now, in the Prometheus (OpenMetrics) text format: what
    /// `GET /metrics` answers.
    pub fn metrics(&self) -> String {
        metrics::encode(self.inner.snapshot(), &self.inner.collectors)
    }

    /// Serves the admin endpoint on `listener`, in the returned future, until it is
    /// dropped: spawn it. Each request is answered by [`handle`](Admin::handle); a
    /// client gets 10 s to send its request's head (at most 16 KiB), and at most 64
    /// clients are served at once.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if `listener` is not on a loopback address and no
    /// [`token`](Admin::token) is set: the endpoint can close connections and drain
    /// the server.
    pub fn serve(
        self,
        listener: TcpListener,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Error> {
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        if !addr.ip().is_loopback() && self.inner.token.is_none() {
            return Err(Error::Config {
                setting: "admin",
                value: addr.to_string(),
                reason: "is not a loopback address: the admin endpoint needs a token there",
            });
        }
        Ok(async move {
            info!(%addr, "admin endpoint listening");
            let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
            loop {
                let slot = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .expect("never closed");
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!("admin endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let admin = self.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(admin.handle(request).await) }
                    });
                    let served = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        debug!("admin connection: {e}");
                    }
                    drop(slot);
                });
            }
        })
    }

    /// Answers one request of the admin endpoint:
    ///
    /// - `GET /`: the live view, a page that updates itself every second;
    /// - `GET /metrics`: [`metrics`](Admin::metrics);
    /// - `GET /stats`: the totals, states, close reasons and alarms, as JSON;
    /// - `GET /connections?state=S&sort=id|age|queued|bytes_in|bytes_out&offset=N&limit=N`:
    ///   a page of the live connections as JSON (at most [`MAX_PAGE`]; [`DEFAULT_PAGE`]
    ///   without `limit`), with the total that match;
    /// - `GET /connections/{id}`, `DELETE /connections/{id}` (closes it: 204);
    /// - `GET /health`: 200 while accepting, 503 while suspended or draining;
    /// - `POST /drain`: begins a graceful shutdown (202).
    ///
    /// Other paths get 404, other methods 405, a body over 64 KiB 413, a request
    /// without the token (when one is set) 401.
    pub async fn handle<B: Body>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        self.inner.answer(&request)
    }
}

impl Inner {
    fn snapshot(&self) -> Snapshot {
        let stats = self.target.stats();
        let alarms = (self.alarms.as_ref()).map_or_else(Vec::new, Alarms::status);
        Snapshot {
            stats,
            states: self.target.states(),
            listeners: self.target.listeners(),
            max_connections: self.target.max_connections(),
            accepting: self.target.accepting() == Health::Accepting,
            alarms,
            unauthorized: self.unauthorized.load(Ordering::Relaxed),
        }
    }

    fn answer<B: Body>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        // The page holds no data: it asks for the token, and sends it with each fetch.
        let page = request.uri().path() == "/";
        if let Some(token) = self.token.as_ref().filter(|_| !page) {
            let given = (request.headers().get(AUTHORIZATION))
                .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
            if !given.is_some_and(|given| same(given, token)) {
                self.unauthorized.fetch_add(1, Ordering::Relaxed);
                let mut response = text(StatusCode::UNAUTHORIZED, "a bearer token is needed\n");
                (response.headers_mut())
                    .insert("www-authenticate", "Bearer".parse().expect("valid"));
                return response;
            }
        }
        let length = (request.headers().get(CONTENT_LENGTH))
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let body_size = request.body().size_hint().upper().or(length).unwrap_or(0);
        if body_size > MAX_BODY || length.is_some_and(|length| length > MAX_BODY) {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request bodies are not taken\n",
            );
        }
        let path = request.uri().path();
        let query = request.uri().query().unwrap_or("");
        let method = request.method();
        match path {
            "/" => only(method, &Method::GET).unwrap_or_else(|| {
                let mut page = Response::new(Full::new(Bytes::from_static(LIVE_VIEW.as_bytes())));
                (page.headers_mut()).insert(
                    CONTENT_TYPE,
                    "text/html; charset=utf-8".parse().expect("valid"),
                );
                page
            }),
            "/metrics" => only(method, &Method::GET).unwrap_or_else(|| {
                let body = metrics::encode(self.snapshot(), &self.collectors);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, kind.parse().expect("valid"));
                response
            }),
            "/stats" => only(method, &Method::GET)
                .unwrap_or_else(|| json_response(StatusCode::OK, &self.stats_json())),
            "/health" => only(method, &Method::GET).unwrap_or_else(|| {
                let health = self.target.accepting();
                let status = match health {
                    Health::Accepting => StatusCode::OK,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                text(status, &format!("{}\n", health.name()))
            }),
            "/drain" => only(method, &Method::POST).unwrap_or_else(|| {
                info!("admin endpoint: drain asked");
                self.target.drain();
                text(StatusCode::ACCEPTED, "draining\n")
            }),
            "/connections" => {
                only(method, &Method::GET).unwrap_or_else(|| match Page::parse(query) {
                    Ok(page) => json_response(StatusCode::OK, &page.of(self.target.connections())),
                    Err(reason) => text(StatusCode::BAD_REQUEST, &format!("{reason}\n")),
                })
            }
            _ => match path.strip_prefix("/connections/").map(str::parse::<u64>) {
                Some(Ok(id)) => self.one_connection(method, ConnectionId(id)),
                Some(Err(_)) => text(StatusCode::BAD_REQUEST, "a connection id is a number\n"),
                None => text(StatusCode::NOT_FOUND, "no such page\n"),
            },
        }
    }

    fn one_connection(&self, method: &Method, id: ConnectionId) -> Response<Full<Bytes>> {
        match *method {
            Method::GET => match self.target.connections().iter().find(|info| info.id == id) {
                Some(info) => {
                    json_response(StatusCode::OK, &connection_json(info, SystemTime::now()))
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    &format!("connection {id} is not open\n"),
                ),
            },
            Method::DELETE => {
                if self.target.close(id) {
                    info!(connection = %id, "admin endpoint: connection closed");
                    Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::new(Bytes::new()))
                        .expect("a valid response")
                } else {
                    text(
                        StatusCode::NOT_FOUND,
                        &format!("connection {id} is not open\n"),
                    )
                }
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or DELETE\n"),
        }
    }

    fn stats_json(&self) -> Value {
        let now = self.snapshot();
        let stats = &now.stats;
        let closed: serde_json::Map<String, Value> = (stats.closed.by_reason().iter())
            .map(|(reason, count)| ((*reason).to_owned(), json!(count)))
            .collect();
        let states: serde_json::Map<String, Value> = (now.states.iter())
            .map(|(state, count)| ((*state).to_owned(), json!(count)))
            .collect();
        let listeners: Vec<Value> = (now.listeners.iter())
            .map(|(address, count)| json!({"address": address.to_string(), "open": count}))
            .collect();
        let alarms: Vec<Value> = (now.alarms.iter())
            .map(|alarm| json!({"alarm": alarm.name, "firing": alarm.firing, "fired": alarm.fired, "value": alarm.value, "threshold": alarm.threshold}))
            .collect();
        json!({
            "health": self.target.accepting().name(),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "open": stats.active,
            "peak": stats.peak_active,
            "max_connections": now.max_connections,
            "accepted": stats.accepted,
            "closed_total": stats.closed.total(),
            "closed": closed,
            "accept_errors": stats.accept_errors,
            "limit_waits": stats.limit_waits,
            "bytes_in": stats.bytes_in,
            "bytes_out": stats.bytes_out,
            "frames_in": stats.frames_in,
            "replies_out": stats.replies_out,
            "states": states,
            "listeners": listeners,
            "alarms": alarms,
        })
    }
}

/// Whether `given` is `expected`, taking as long whatever their first difference.
fn same(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// 405 unless the method is `allowed`.
fn only(method: &Method, allowed: &Method) -> Option<Response<Full<Bytes>>> {
    (method != allowed).then(|| text(StatusCode::METHOD_NOT_ALLOWED, &format!("{allowed} only\n")))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a valid response")
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("a valid response")
}

fn connection_json(info: &ConnectionInfo, now: SystemTime) -> Value {
    json!({
        "id": info.id.0,
        "peer": info.peer_addr.to_string(),
        "listener": info.local_addr.to_string(),
        "state": info.state,
        "age_seconds": now.duration_since(info.since).unwrap_or_default().as_secs_f64(),
        "bytes_in": info.bytes_in,
        "bytes_out": info.bytes_out,
        "frames_in": info.frames_in,
        "replies_out": info.replies_out,
        "mailbox": info.mailbox,
        "output_queued": info.output_queued,
    })
}

/// What `/connections` was asked for.
#[derive(Debug, PartialEq, Eq)]
struct Page {
    state: Option<String>,
    sort: Sort,
    offset: usize,
    limit: usize,
}

/// The order of `/connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    /// Oldest first.
    Id,
    /// Oldest first, as `id`.
    Age,
    /// Most output queued first: the slowest readers.
    Queued,
    BytesIn,
    BytesOut,
}

impl Page {
    fn parse(query: &str) -> Result<Page, String> {
        let mut page = Page {
            state: None,
            sort: Sort::Id,
            offset: 0,
            limit: DEFAULT_PAGE,
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value).ok_or_else(|| format!("bad escape in {key}"))?;
            let number = |value: &str| {
                value
                    .parse::<usize>()
                    .map_err(|_| format!("{key} must be a number, not '{value}'"))
            };
            match key {
                "state" => page.state = Some(value),
                "offset" => page.offset = number(&value)?,
                "limit" => page.limit = number(&value)?.min(MAX_PAGE),
                "sort" => {
                    page.sort = match value.as_str() {
                        "id" => Sort::Id,
                        "age" => Sort::Age,
                        "queued" => Sort::Queued,
                        "bytes_in" => Sort::BytesIn,
                        "bytes_out" => Sort::BytesOut,
                        other => {
                            return Err(format!(
                                "cannot sort by '{other}' (id, age, queued, bytes_in, bytes_out)"
                            ))
                        }
                    }
                }
                other => return Err(format!("unknown parameter '{other}'")),
            }
        }
        Ok(page)
    }

    fn of(&self, mut connections: Vec<ConnectionInfo>) -> Value {
        if let Some(state) = &self.state {
            connections.retain(|info| info.state == state);
        }
        match self.sort {
            Sort::Id | Sort::Age => {}
            Sort::Queued => connections.sort_by_key(|info| std::cmp::Reverse(info.output_queued)),
            Sort::BytesIn => connections.sort_by_key(|info| std::cmp::Reverse(info.bytes_in)),
            Sort::BytesOut => connections.sort_by_key(|info| std::cmp::Reverse(info.bytes_out)),
        }
        let now = SystemTime::now();
        let listed: Vec<Value> = (connections.iter().skip(self.offset).take(self.limit))
            .map(|info| connection_json(info, now))
            .collect();
        json!({
            "total": connections.len(),
            "offset": self.offset,
            "limit": self.limit,
            "connections": listed,
        })
    }
}

/// Decodes `%XX` escapes and `+`; `None` for a bad escape or bytes that are not UTF-8.
fn decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'%' => {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            }
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_parsed_and_bounded() {
        assert_eq!(
            Page::parse("state=logged%20in&sort=queued&offset=20&limit=5000").unwrap(),
            Page {
                state: Some("logged in".into()),
                sort: Sort::Queued,
                offset: 20,
                limit: MAX_PAGE,
            }
        );
        assert_eq!(Page::parse("").unwrap().limit, DEFAULT_PAGE);
        assert!(Page::parse("limit=ten").is_err());
        assert!(Page::parse("sort=colour").is_err());
        assert!(Page::parse("state=%zz").is_err());
        assert!(Page::parse("colour=red").is_err());
    }

    #[test]
    fn tokens_are_compared_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secreT", b"secret"));
        assert!(!same(b"secret-and-more", b"secret"));
        assert!(!same(b"", b"secret"));
    }
}
