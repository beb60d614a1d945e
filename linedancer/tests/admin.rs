//! The admin endpoint over real sockets: the metrics after a scripted session, the
//! connection list and its paging, closing one connection, health during a drain, the
//! token, bad HTTP, alarms firing and clearing, and the live view in a real headless
//! browser (Debian's chromium, installed by `.ci/run`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{bounded, LineClient};
use linedancer::admin::{Admin, AlarmSettings, Alarms};
use linedancer::codec::Lines;
use linedancer::{Ctx, Next, Protocol, Server, ServerHandle};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Echoes lines; `waiting` until the first one, `talking` after.
struct Talk {
    talked: bool,
}

impl Protocol for Talk {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(_: &mut Ctx<'_, Self>) -> Self {
        Talk { talked: false }
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        self.talked = true;
        ctx.send(line);
        Next::Continue
    }

    fn state_name(&self) -> &'static str {
        if self.talked {
            "talking"
        } else {
            "waiting"
        }
    }
}

/// A `Talk` server on a free port, and its admin endpoint (with `token`) on another.
async fn served(token: Option<&str>) -> (ServerHandle, SocketAddr) {
    let server = Server::builder()
        .port(0)
        .protocol::<Talk>()
        .start()
        .await
        .unwrap();
    let admin_addr = admin(&server, token).await;
    (server, admin_addr)
}

/// Serves `server`'s admin endpoint on a free loopback port.
async fn admin(server: &ServerHandle, token: Option<&str>) -> SocketAddr {
    let mut admin = Admin::new(server);
    if let Some(token) = token {
        admin = admin.token(token);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin.serve(listener).unwrap());
    addr
}

/// Sends `request` (a whole HTTP/1.1 request) and returns the status and the body.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body.to_owned())
}

/// `METHOD path` with the given extra header lines.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let request =
        format!("{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n{headers}\r\n");
    raw(addr, request.as_bytes()).await
}

async fn json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of the sample `name` (labels included, as written) in metrics text.
fn sample(metrics: &str, name: &str) -> f64 {
    (metrics.lines())
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
}

/// Ensure the metrics count a scripted session exactly: one client talks and leaves,
/// one talks and is closed through the endpoint, one stays silent.
#[tokio::test]
async fn metrics_after_a_scripted_session() {
    bounded(async {
        let (server, admin_addr) = served(None).await;
        let listener = server.local_addr().to_string();
        let mut ann = LineClient::connect(server.local_addr()).await;
        let mut bob = LineClient::connect(server.local_addr()).await;
        let silent = LineClient::connect(server.local_addr()).await;
        for client in [&mut ann, &mut bob] {
            client.send("hello").await;
            client.send("again").await;
            assert_eq!(client.expect_line().await, "hello");
            assert_eq!(client.expect_line().await, "again");
        }
        drop(ann);
        server.wait_connections(|n| n == 2).await;
        let bob_id = json(admin_addr, "/connections?state=talking").await["connections"][0]["id"]
            .as_u64()
            .unwrap();
        let (status, _) = http(admin_addr, "DELETE", &format!("/connections/{bob_id}"), "").await;
        assert_eq!(status, 204);
        assert_eq!(bob.line().await, None, "closed by the endpoint");
        server.wait_connections(|n| n == 1).await;
        let (status, _) = http(admin_addr, "DELETE", &format!("/connections/{bob_id}"), "").await;
        assert_eq!(status, 404);

        let (status, metrics) = http(admin_addr, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        assert_eq!(
            sample(&metrics, "linedancer_connections_accepted_total"),
            3.0
        );
        assert_eq!(
            sample(
                &metrics,
                &format!("linedancer_connections_open{{listener=\"{listener}\"}}")
            ),
            1.0
        );
        assert_eq!(
            sample(
                &metrics,
                "linedancer_connections_by_state{state=\"waiting\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &metrics,
                "linedancer_connections_closed_total{reason=\"peer closed\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &metrics,
                "linedancer_connections_closed_total{reason=\"closed by admin\"}"
            ),
            1.0
        );
        assert_eq!(sample(&metrics, "linedancer_frames_received_total"), 4.0);
        assert_eq!(sample(&metrics, "linedancer_replies_sent_total"), 4.0);
        assert_eq!(sample(&metrics, "linedancer_received_bytes_total"), 24.0);
        assert_eq!(sample(&metrics, "linedancer_sent_bytes_total"), 24.0);
        assert_eq!(
            sample(&metrics, "linedancer_connection_lifetime_seconds_count"),
            2.0
        );
        assert_eq!(
            sample(
                &metrics,
                "linedancer_connection_lifetime_seconds_bucket{le=\"+Inf\"}"
            ),
            2.0
        );
        assert_eq!(
            sample(
                &metrics,
                "linedancer_accept_errors_total{class=\"resource\"}"
            ),
            0.0
        );
        assert_eq!(
            sample(&metrics, "linedancer_timeouts_total{kind=\"idle\"}"),
            0.0
        );
        assert_eq!(sample(&metrics, "linedancer_accepting"), 1.0);
        assert!(metrics.ends_with("# EOF\n"));
        // The library's text is the endpoint's.
        assert_eq!(
            sample(
                &Admin::new(&server).metrics(),
                "linedancer_frames_received_total"
            ),
            4.0
        );
        drop(silent);
        server.shutdown().await;
    })
    .await;
}

/// Ensure `/connections` pages through 25 connections, filters by state, sorts, and
/// answers one connection by id; bad parameters get 400.
#[tokio::test]
async fn connections_as_json_with_paging() {
    bounded(async {
        let (server, admin_addr) = served(None).await;
        let mut clients = Vec::new();
        for n in 0..25 {
            let mut client = LineClient::connect(server.local_addr()).await;
            if n % 5 == 0 {
                client.send("hi").await;
                client.expect_line().await;
            }
            clients.push(client);
        }
        server.wait_connections(|n| n == 25).await;
        let page = json(admin_addr, "/connections?offset=20&limit=10").await;
        assert_eq!(
            (
                page["total"].as_u64(),
                page["offset"].as_u64(),
                page["limit"].as_u64()
            ),
            (Some(25), Some(20), Some(10))
        );
        let ids: Vec<u64> = (page["connections"].as_array().unwrap().iter())
            .map(|c| c["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [21, 22, 23, 24, 25]);
        let first = &page["connections"][0];
        for key in [
            "id",
            "peer",
            "listener",
            "state",
            "age_seconds",
            "bytes_in",
            "bytes_out",
            "frames_in",
            "replies_out",
            "mailbox",
            "output_queued",
        ] {
            assert!(first.get(key).is_some(), "{key} missing in {first}");
        }
        assert_eq!(first["listener"], server.local_addr().to_string());
        let talking = json(admin_addr, "/connections?state=talking").await;
        assert_eq!(talking["total"], 5);
        let ids: Vec<u64> = (talking["connections"].as_array().unwrap().iter())
            .map(|c| c["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [1, 6, 11, 16, 21]);
        let by_bytes = json(admin_addr, "/connections?sort=bytes_in&limit=1").await;
        assert_eq!(by_bytes["connections"][0]["bytes_in"], 3);
        let one = json(admin_addr, "/connections/6").await;
        assert_eq!(
            (
                one["id"].as_u64(),
                one["state"].as_str(),
                one["frames_in"].as_u64()
            ),
            (Some(6), Some("talking"), Some(1))
        );
        assert_eq!(http(admin_addr, "GET", "/connections/99", "").await.0, 404);
        assert_eq!(
            http(admin_addr, "GET", "/connections?limit=ten", "")
                .await
                .0,
            400
        );
        assert_eq!(http(admin_addr, "GET", "/connections/six", "").await.0, 400);
        drop(clients);
        server.shutdown().await;
    })
    .await;
}

/// Ensure `/health` says 200 while accepting and 503 while suspended and while
/// draining, and `POST /drain` begins the drain.
#[tokio::test]
async fn health_while_draining() {
    bounded(async {
        let (server, admin_addr) = served(None).await;
        assert_eq!(
            http(admin_addr, "GET", "/health", "").await,
            (200, "accepting\n".into())
        );
        server.suspend();
        assert_eq!(
            http(admin_addr, "GET", "/health", "").await,
            (503, "suspended\n".into())
        );
        server.resume();
        // A client that stays keeps the drain going while we look.
        let mut client = LineClient::connect(server.local_addr()).await;
        client.send("hi").await;
        client.expect_line().await;
        assert_eq!(http(admin_addr, "GET", "/drain", "").await.0, 405);
        assert_eq!(
            http(admin_addr, "POST", "/drain", "").await,
            (202, "draining\n".into())
        );
        assert_eq!(
            http(admin_addr, "GET", "/health", "").await,
            (503, "draining\n".into())
        );
        assert!(server.is_shutting_down());
        // Still served while it drains.
        client.send("still there").await;
        assert_eq!(client.expect_line().await, "still there");
        let stats = json(admin_addr, "/stats").await;
        assert_eq!(stats["health"], "draining");
        drop(client);
        let report = server.shutdown().await;
        assert_eq!((report.drained, report.force_closed), (1, 0));
    })
    .await;
}

/// Ensure a token is asked of every request but the page, wrong ones are refused and
/// counted, and the right one is let in.
#[tokio::test]
async fn the_token_guards_the_endpoint() {
    bounded(async {
        let (server, admin_addr) = served(Some("s3cret")).await;
        assert_eq!(http(admin_addr, "GET", "/metrics", "").await.0, 401);
        assert_eq!(
            http(
                admin_addr,
                "POST",
                "/drain",
                "authorization: Bearer wrong\r\n"
            )
            .await
            .0,
            401
        );
        assert_eq!(
            http(
                admin_addr,
                "GET",
                "/health",
                "authorization: Bearer s3cret-not\r\n"
            )
            .await
            .0,
            401
        );
        assert!(!server.is_shutting_down());
        let (status, metrics) = http(
            admin_addr,
            "GET",
            "/metrics",
            "authorization: Bearer s3cret\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(sample(&metrics, "linedancer_admin_unauthorized_total"), 3.0);
        let (status, page) = http(admin_addr, "GET", "/", "").await;
        assert_eq!(status, 200);
        assert!(page.contains("<title>linedancer</title>"));
        server.shutdown().await;
    })
    .await;
}

/// Ensure bad HTTP gets a 4xx and leaves the served connections alone.
#[tokio::test]
async fn bad_requests_get_4xx() {
    bounded(async {
        let (server, admin_addr) = served(None).await;
        let mut client = LineClient::connect(server.local_addr()).await;
        client.send("before").await;
        client.expect_line().await;
        let garbage = raw(admin_addr, b"NOT HTTP AT ALL\r\n\r\n").await.0;
        assert_eq!(garbage, 400);
        let huge_header = format!(
            "GET /metrics HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let status = raw(admin_addr, huge_header.as_bytes()).await.0;
        assert_eq!(status, 431);
        assert_eq!(
            http(admin_addr, "POST", "/drain", "content-length: 1000000\r\n")
                .await
                .0,
            413
        );
        assert_eq!(http(admin_addr, "GET", "/nothing", "").await.0, 404);
        assert_eq!(http(admin_addr, "DELETE", "/metrics", "").await.0, 405);
        assert!(!server.is_shutting_down());
        client.send("after").await;
        assert_eq!(client.expect_line().await, "after");
        assert_eq!(server.stats().closed.total(), 0);
        drop(client);
        server.shutdown().await;
    })
    .await;
}

/// Ensure the connections alarm fires once open connections hold over its threshold,
/// shows in the metrics, and clears when they fall; bad thresholds are refused.
#[tokio::test]
async fn alarms_fire_and_clear() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            .max_connections(4)
            .protocol::<Talk>()
            .start()
            .await
            .unwrap();
        let (events, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let settings = AlarmSettings::default()
            .connections(0.5)
            .hold(Duration::from_millis(50))
            .interval(Duration::from_millis(10));
        let alarms = Alarms::watch(&server, settings, move |event| {
            let _ = events.send(event.clone());
        })
        .unwrap();
        let admin = Admin::new(&server).alarms(&alarms);
        let clients: Vec<_> = futures_join(server.local_addr(), 3).await;
        server.wait_connections(|n| n == 3).await;
        let fired = heard.recv().await.unwrap();
        assert_eq!(
            (fired.alarm, fired.firing, fired.value),
            ("connections", true, 0.75)
        );
        let metrics = admin.metrics();
        assert_eq!(
            sample(&metrics, "linedancer_alarm_active{alarm=\"connections\"}"),
            1.0
        );
        assert_eq!(
            sample(
                &metrics,
                "linedancer_alarms_fired_total{alarm=\"connections\"}"
            ),
            1.0
        );
        drop(clients);
        let cleared = heard.recv().await.unwrap();
        assert_eq!((cleared.alarm, cleared.firing), ("connections", false));
        assert_eq!(
            sample(
                &admin.metrics(),
                "linedancer_alarm_active{alarm=\"connections\"}"
            ),
            0.0
        );
        let bad = Alarms::watch(&server, AlarmSettings::default().connections(1.5), |_| {});
        assert!(
            matches!(bad, Err(linedancer::Error::Config { .. })),
            "{bad:?}"
        );
        server.shutdown().await;
    })
    .await;
}

/// `count` line clients connected to `addr`.
async fn futures_join(addr: SocketAddr, count: usize) -> Vec<LineClient> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(LineClient::connect(addr).await);
    }
    clients
}

/// Ensure the live view loads in a real headless browser without a script error and
/// shows the numbers the metrics show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_in_a_browser() {
    bounded(async {
        let (server, admin_addr) = served(None).await;
        let mut clients = futures_join(server.local_addr(), 3).await;
        for client in &mut clients {
            client.send("hi").await;
            client.expect_line().await;
        }
        drop(clients.pop());
        server.wait_connections(|n| n == 2).await;
        let url = format!("http://{admin_addr}/");
        let output = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
            ])
            .args(["--virtual-time-budget=3000", "--dump-dom", &url])
            .output();
        let output = tokio::time::timeout(Duration::from_secs(25), output)
            .await
            .expect("chromium took too long")
            .expect("chromium must be installed (.ci/run installs it)");
        let dom = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metrics = Admin::new(&server).metrics();
        let shown = |id: &str| -> String {
            let start =
                (dom.find(&format!("id=\"{id}\""))).unwrap_or_else(|| panic!("no #{id} in {dom}"));
            let rest = &dom[start..];
            let rest = &rest[rest.find('>').unwrap() + 1..];
            rest[..rest.find('<').unwrap()].to_owned()
        };
        assert!(dom.contains("data-errors=\"0\""), "script errors: {dom}");
        assert!(!dom.contains("data-updates=\"0\""), "never updated: {dom}");
        assert_eq!(
            shown("accepted"),
            sample(&metrics, "linedancer_connections_accepted_total").to_string()
        );
        assert_eq!(shown("open"), "2");
        assert_eq!(
            shown("frames_in"),
            sample(&metrics, "linedancer_frames_received_total").to_string()
        );
        assert_eq!(shown("health"), "accepting");
        assert!(dom.contains("<td>talking</td><td>2</td>"), "{dom}");
        assert!(dom.contains("<td>peer closed</td><td>1</td>"), "{dom}");
        drop(clients);
        server.shutdown().await;
    })
    .await;
}
