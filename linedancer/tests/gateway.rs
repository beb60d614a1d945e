//! The gateway example over real sockets: linedancer echo servers (or a bare listener)
//! as upstreams, a gateway server in front of them, and clients through it.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use common::pki::{self, Pki};
use common::{bounded, exchange, round_trip, serve};
use std::time::Duration;

use linedancer::admin::Admin;
use linedancer::examples::{Balance, Echo, Gateway, GatewayStats};
use linedancer::{
    Connection, Error, Handler, ProxyProtocol, Server, ServerHandle, ShutdownReport, Stream,
    TlsConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn gateway(upstreams: Vec<SocketAddr>) -> ServerHandle<Infallible> {
    start(Gateway::new(upstreams).expect("a gateway")).await
}

async fn start(gateway: Gateway) -> ServerHandle<Infallible> {
    Server::builder()
        .port(0)
        .handler(gateway)
        .start()
        .await
        .expect("start the gateway")
}

/// An address nothing listens on: a port bound, then released.
fn down_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Ensure an empty list of upstreams is refused, naming the setting.
#[test]
fn no_upstreams_is_refused() {
    let error = Gateway::new(Vec::new()).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Config {
                setting: "upstreams",
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "invalid upstreams []: needs at least one upstream"
    );
}

/// Ensure 10 MiB of random bytes, written in random-sized chunks while the echo is
/// read, go through the gateway to the echo server and back intact and in order.
#[tokio::test]
async fn ten_mebibytes_are_relayed_intact_both_ways() {
    bounded(async {
        let echo = serve::<Echo>().await;
        let gateway = gateway(vec![echo.local_addr()]).await;
        let stream = TcpStream::connect(gateway.local_addr()).await.unwrap();
        let mut data = vec![0; 10 << 20];
        fastrand::fill(&mut data);
        let echoed = round_trip(stream, &data).await;
        assert_eq!(echoed.len(), data.len());
        assert!(echoed == data, "the relayed bytes differ from those sent");
        gateway.wait_connections(|n| n == 0).await;
        echo.wait_connections(|n| n == 0).await;
        let stats = echo.stats();
        assert_eq!(stats.bytes_in, data.len() as u64);
        assert_eq!(stats.bytes_out, data.len() as u64);
        // The gateway counts what it relayed, client to upstream and back.
        let relayed = gateway.stats();
        assert_eq!(
            (relayed.bytes_in, relayed.bytes_out),
            (stats.bytes_in, stats.bytes_out)
        );
        gateway.shutdown().await;
        echo.shutdown().await;
    })
    .await;
}

/// Ensure a client on a Unix socket, whose bytes cannot be spliced from a TCP socket,
/// is relayed intact too (copied through the relay's buffers instead).
#[tokio::test]
async fn a_unix_socket_client_is_relayed_intact() {
    bounded(async {
        let echo = serve::<Echo>().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.sock");
        let gateway = Server::builder()
            .unix(&path)
            .handler(Gateway::new(vec![echo.local_addr()]).unwrap())
            .start()
            .await
            .unwrap();
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut data = vec![0; 1 << 20];
        fastrand::fill(&mut data);
        let echoed = round_trip(stream, &data).await;
        assert!(echoed == data, "the relayed bytes differ from those sent");
        gateway.wait_connections(|n| n == 0).await;
        assert_eq!(gateway.stats().bytes_in, data.len() as u64);
        gateway.shutdown().await;
        echo.shutdown().await;
    })
    .await;
}

/// Ensure a gateway that takes TLS from its clients (TLS offload) relays the plain
/// bytes intact both ways, and ends the client's side with a TLS close_notify once the
/// upstream has closed: the client reads to a clean end of stream, not a truncation.
#[tokio::test]
async fn a_tls_client_is_relayed_intact_and_closed_cleanly() {
    bounded(async {
        let echo = serve::<Echo>().await;
        let pki = Pki::new();
        let cert = pki.server("gateway", &["localhost"], false);
        let gateway = Server::builder()
            .port(0)
            .tls(TlsConfig::pem_files(&cert.cert, &cert.key))
            .handler(Gateway::new(vec![echo.local_addr()]).unwrap())
            .start()
            .await
            .unwrap();
        let stream = pki::connect(pki.client(&[]), gateway.local_addr(), "localhost")
            .await
            .expect("handshake");
        let mut data = vec![0; 1 << 20];
        fastrand::fill(&mut data);
        // round_trip reads to the end of the stream, which fails on a TLS stream cut
        // without close_notify.
        let echoed = round_trip(stream, &data).await;
        assert!(echoed == data, "the relayed bytes differ from those sent");
        gateway.wait_connections(|n| n == 0).await;
        let stats = echo.stats();
        assert_eq!((stats.bytes_in, stats.bytes_out), (1 << 20, 1 << 20));
        assert_eq!(gateway.stats().bytes_in, 1 << 20);
        gateway.shutdown().await;
        echo.shutdown().await;
    })
    .await;
}

/// Ensure a client's half-close is passed on: after shutting its write side it still
/// receives the whole echo, then the end of the stream, and the gateway's connection
/// ends.
#[tokio::test]
async fn a_client_half_close_is_passed_on() {
    bounded(async {
        let echo = serve::<Echo>().await;
        let gateway = gateway(vec![echo.local_addr()]).await;
        let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
        let message = b"the last words before the FIN ".repeat(1000);
        client.write_all(&message).await.unwrap();
        client.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).await.unwrap();
        assert!(echoed == message, "the echo is not what was sent");
        gateway.wait_connections(|n| n == 0).await;
        // The echo server saw the FIN, not a reset: the gateway passed it on.
        echo.wait_connections(|n| n == 0).await;
        assert_eq!(echo.stats().closed.peer_closed, 1);
        gateway.shutdown().await;
        echo.shutdown().await;
    })
    .await;
}

/// Ensure an upstream's half-close is passed on too: the client reads the upstream's
/// bytes and its end of stream, and can still send, which the upstream receives.
#[tokio::test]
async fn an_upstream_half_close_is_passed_on() {
    bounded(async {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = gateway(vec![upstream.local_addr().unwrap()]).await;
        let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
        let (mut server, _) = upstream.accept().await.unwrap();
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();

        let mut banner = Vec::new();
        client.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner");
        client.write_all(b"late reply").await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        server.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"late reply");
        gateway.wait_connections(|n| n == 0).await;
        gateway.shutdown().await;
    })
    .await;
}

/// Ensure clients go to the upstreams in turn: ten clients, one after another, five to
/// each of two upstreams, alternating from the first.
#[tokio::test]
async fn clients_go_to_the_upstreams_in_turn() {
    const CLIENTS: u64 = 10;
    bounded(async {
        let first = serve::<Echo>().await;
        let second = serve::<Echo>().await;
        let gateway = gateway(vec![first.local_addr(), second.local_addr()]).await;
        for i in 0..CLIENTS {
            let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
            let message = format!("client {i}");
            assert_eq!(
                exchange(&mut client, message.as_bytes()).await,
                message.as_bytes()
            );
            // Client i has been echoed, so its upstream has accepted it: of the i + 1
            // clients so far, the first upstream has had half, rounded up, and the
            // second the rest.
            let served = i + 1;
            assert_eq!(first.stats().accepted, served.div_ceil(2), "client {i}");
            assert_eq!(second.stats().accepted, served / 2, "client {i}");
        }
        assert_eq!(first.stats().accepted, CLIENTS / 2);
        assert_eq!(second.stats().accepted, CLIENTS / 2);
        gateway.shutdown().await;
        first.shutdown().await;
        second.shutdown().await;
    })
    .await;
}

/// Ensure a client whose turn falls on an upstream that is down is relayed to the next
/// one without noticing, the down one is taken out of service (no client tries it
/// again), and the failure is counted.
#[tokio::test]
async fn a_down_upstream_is_skipped_and_taken_out() {
    bounded(async {
        let up = serve::<Echo>().await;
        let balancer = Gateway::new(vec![down_address(), up.local_addr()]).unwrap();
        let stats = balancer.stats();
        let gateway = start(balancer).await;
        for round in 1..=4 {
            let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
            assert_eq!(
                exchange(&mut client, b"anyone home?").await,
                b"anyone home?"
            );
            assert_eq!(up.stats().accepted, round);
        }
        let upstreams = stats.upstreams();
        assert_eq!(
            (
                upstreams[0].up,
                upstreams[0].failures,
                upstreams[0].connections
            ),
            (false, 1, 0)
        );
        assert_eq!(
            (
                upstreams[1].up,
                upstreams[1].failures,
                upstreams[1].connections
            ),
            (true, 0, 4)
        );
        assert_eq!(gateway.stats().closed.io, 0);
        gateway.shutdown().await;
        up.shutdown().await;
    })
    .await;
}

/// Ensure a client is closed when no upstream answers, and counted as an i/o error.
#[tokio::test]
async fn no_upstream_answering_closes_the_client() {
    bounded(async {
        let gateway = gateway(vec![down_address(), down_address()]).await;
        let mut unlucky = TcpStream::connect(gateway.local_addr()).await.unwrap();
        let mut received = Vec::new();
        // The end of the stream, or a reset: either way, nothing relayed.
        let _ = unlucky.read_to_end(&mut received).await;
        assert!(received.is_empty(), "{received:?}");
        gateway.wait_connections(|n| n == 0).await;
        assert_eq!(gateway.stats().closed.io, 1);
        gateway.shutdown().await;
    })
    .await;
}

/// Ensure least-connections sends a client to the upstream with the fewest open
/// connections, and a per-upstream cap closes a client when every upstream is full.
#[tokio::test]
async fn least_connections_and_the_cap() {
    bounded(async {
        let (first, second) = (serve::<Echo>().await, serve::<Echo>().await);
        let balancer = Gateway::new(vec![first.local_addr(), second.local_addr()])
            .unwrap()
            .balance(Balance::LeastConn)
            .max_per_upstream(2);
        let stats = balancer.stats();
        let gateway = start(balancer).await;
        let open = |stats: &GatewayStats| -> Vec<usize> {
            stats
                .upstreams()
                .iter()
                .map(|upstream| upstream.open)
                .collect()
        };
        let mut a = TcpStream::connect(gateway.local_addr()).await.unwrap();
        exchange(&mut a, b"a").await;
        let mut b = TcpStream::connect(gateway.local_addr()).await.unwrap();
        exchange(&mut b, b"b").await;
        assert_eq!(open(&stats), [1, 1]);
        drop(a);
        first.wait_connections(|n| n == 0).await;
        gateway.wait_connections(|n| n == 1).await;
        // The first has none now: the next two go there, whoever's turn it is.
        let mut c = TcpStream::connect(gateway.local_addr()).await.unwrap();
        exchange(&mut c, b"c").await;
        let mut d = TcpStream::connect(gateway.local_addr()).await.unwrap();
        exchange(&mut d, b"d").await;
        let mut e = TcpStream::connect(gateway.local_addr()).await.unwrap();
        exchange(&mut e, b"e").await;
        assert_eq!(open(&stats), [2, 2]);
        // Both at the cap of 2: closed unserved.
        let mut f = TcpStream::connect(gateway.local_addr()).await.unwrap();
        let mut received = Vec::new();
        let _ = f.read_to_end(&mut received).await;
        assert!(received.is_empty());
        assert_eq!(gateway.stats().closed.io, 1);
        drop((b, c, d, e));
        gateway.shutdown().await;
        first.shutdown().await;
        second.shutdown().await;
    })
    .await;
}

/// Ensure health checks take an upstream that stops answering out of service and put
/// it back once it answers again.
#[tokio::test]
async fn health_checks_take_out_and_put_back() {
    bounded(async {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = serve::<Echo>().await;
        let balancer = Gateway::new(vec![up.local_addr(), addr])
            .unwrap()
            .health_checks(Some(Duration::from_millis(20)));
        let stats = balancer.stats();
        let gateway = start(balancer).await;
        // The first client (its turn on the echo server) starts the checks.
        let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
        exchange(&mut client, b"hi").await;
        drop(listener);
        let is_up = |want: bool| {
            let stats = stats.clone();
            async move {
                // Bounded: 500 checks' worth.
                for _ in 0..500 {
                    if stats.upstreams()[1].up == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!(
                    "the upstream never became {}",
                    if want { "up" } else { "down" }
                );
            }
        };
        is_up(false).await;
        let back = Server::builder()
            .address(addr.to_string())
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        is_up(true).await;
        drop(client);
        gateway.shutdown().await;
        back.shutdown().await;
        up.shutdown().await;
    })
    .await;
}

/// Tells its peer the address it sees.
struct WhoAmI;

impl Handler for WhoAmI {
    async fn handle<T: Stream>(&self, mut stream: T, conn: Connection) -> std::io::Result<()> {
        stream
            .write_all(format!("{}\n", conn.peer_addr()).as_bytes())
            .await?;
        stream.shutdown().await
    }
}

/// Ensure `send_proxy_v2` passes each client's own address to an upstream that takes
/// the PROXY protocol, and the per-upstream counters reach the admin metrics.
#[tokio::test]
async fn the_clients_address_is_passed_on() {
    bounded(async {
        let upstream = Server::builder()
            .port(0)
            .proxy_protocol(ProxyProtocol::new())
            .handler(WhoAmI)
            .start()
            .await
            .unwrap();
        let balancer = Gateway::new(vec![upstream.local_addr()])
            .unwrap()
            .send_proxy_v2(true);
        let stats = balancer.stats();
        let gateway = start(balancer).await;
        let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
        let mut seen = String::new();
        client.read_to_string(&mut seen).await.unwrap();
        assert_eq!(seen, format!("{}\n", client.local_addr().unwrap()));
        let metrics = Admin::new(&gateway).collector(stats).metrics();
        let name = upstream.local_addr().to_string();
        let line =
            format!("linedancer_gateway_upstream_connections_total{{upstream=\"{name}\"}} 1");
        assert!(metrics.contains(&line), "{metrics}");
        gateway.shutdown().await;
        upstream.shutdown().await;
    })
    .await;
}

/// Ensure the server's idle timeout closes a relay where no byte moves either way, and
/// its send timeout one whose upstream takes none of what the client sends.
#[tokio::test]
async fn idle_and_send_timeouts_apply_to_both_sides() {
    bounded(async {
        let echo = serve::<Echo>().await;
        let idle = Server::builder()
            .port(0)
            .idle_timeout(Duration::from_millis(200))
            .handler(Gateway::new(vec![echo.local_addr()]).unwrap())
            .start()
            .await
            .unwrap();
        let mut client = TcpStream::connect(idle.local_addr()).await.unwrap();
        assert_eq!(
            exchange(&mut client, b"then silence").await,
            b"then silence"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        idle.wait_connections(|n| n == 0).await;
        assert_eq!(
            idle.stats().closed.idle_timeout,
            1,
            "{}",
            idle.stats().closed
        );
        echo.wait_connections(|n| n == 0).await;

        // An upstream that accepts nothing: its backlog holds the connection, and its
        // socket buffers fill, then nothing more is taken.
        let deaf = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let send = Server::builder()
            .port(0)
            .send_timeout(Duration::from_millis(300))
            .handler(
                Gateway::new(vec![deaf.local_addr().unwrap()])
                    .unwrap()
                    .health_checks(None),
            )
            .start()
            .await
            .unwrap();
        let client = TcpStream::connect(send.local_addr()).await.unwrap();
        let (mut reader, mut writer) = client.into_split();
        let writing = tokio::spawn(async move {
            let chunk = vec![7; 64 * 1024];
            // Bounded: far more than every buffer on the way holds.
            for _ in 0..2048 {
                if writer.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            panic!("128 MiB went to an upstream that reads nothing");
        });
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        send.wait_connections(|n| n == 0).await;
        assert_eq!(
            send.stats().closed.send_timeout,
            1,
            "{}",
            send.stats().closed
        );
        writing.await.unwrap();
        idle.shutdown().await;
        send.shutdown().await;
        echo.shutdown().await;
    })
    .await;
}

/// Ensure a gateway shutting down stops relaying at once: a connected client mid-
/// conversation is closed by the gateway's own handler, so it counts as drained (ended
/// by itself within the drain timeout), not force-closed, and its upstream connection
/// is closed too.
#[tokio::test]
async fn shutdown_drains_a_connected_client() {
    bounded(async {
        let echo = serve::<Echo>().await;
        let gateway = gateway(vec![echo.local_addr()]).await;
        let mut client = TcpStream::connect(gateway.local_addr()).await.unwrap();
        assert_eq!(
            exchange(&mut client, b"still talking").await,
            b"still talking"
        );

        let report = gateway.shutdown().await;
        assert_eq!(
            report,
            ShutdownReport {
                drained: 1,
                force_closed: 0
            }
        );
        let stats = gateway.stats();
        assert_eq!(stats.closed.closed, 1, "{}", stats.closed);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        echo.wait_connections(|n| n == 0).await;
        assert_eq!(echo.stats().closed.peer_closed, 1);
        echo.shutdown().await;
    })
    .await;
}
