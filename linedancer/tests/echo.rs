//! The echo server over real sockets: binary safety, concurrency, resets, shutdown.

mod common;

use std::time::Duration;

use common::{bounded, exchange, round_trip, serve};
use linedancer::examples::Echo;
use linedancer::{
    Connection, Error, Handler, Server, ServerHandle, ShutdownReport, Stream, Threading,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Ensure one MiB of random bytes, written in random-sized chunks while the replies are
/// read, comes back intact and in order, and that the server closes after our FIN.
#[tokio::test]
async fn echoes_a_mebibyte_of_random_bytes_intact() {
    bounded(async {
        let server = serve::<Echo>().await;
        let stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|_| fastrand::u8(..)).collect();
        let echoed = round_trip(stream, &data).await;
        assert_eq!(echoed.len(), data.len());
        assert!(echoed == data, "the echoed bytes differ from those sent");
        server.wait_connections(|n| n == 0).await;
    })
    .await;
}

/// Ensure 250 clients connected at once are all served, each its own bytes, and that
/// the live count follows them up and down.
#[tokio::test]
async fn serves_250_concurrent_clients() {
    bounded(async {
        let server = serve::<Echo>().await;
        let mut clients = Vec::new();
        for _ in 0..250 {
            clients.push(TcpStream::connect(server.local_addr()).await.unwrap());
        }
        assert_eq!(server.wait_connections(|n| n == 250).await, 250);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, mut client) in clients.into_iter().enumerate() {
            tasks.spawn(async move {
                for round in 0..10 {
                    let message = format!("client {i} round {round}\n");
                    assert_eq!(
                        exchange(&mut client, message.as_bytes()).await,
                        message.as_bytes()
                    );
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a client failed");
        }
        assert_eq!(server.wait_connections(|n| n == 0).await, 0);
    })
    .await;
}

/// Ensure a client that resets its connection in the middle of a transfer ends only its
/// own connection: another client goes on being served and the count returns to one.
#[tokio::test]
async fn a_reset_mid_transfer_ends_only_that_connection() {
    bounded(async {
        let server = serve::<Echo>().await;
        let mut survivor = TcpStream::connect(server.local_addr()).await.unwrap();
        assert_eq!(exchange(&mut survivor, b"before").await, b"before");

        let socket = TcpSocket::new_v4().unwrap();
        let mut resetter = socket.connect(server.local_addr()).await.unwrap();
        resetter.set_zero_linger().unwrap();
        server.wait_connections(|n| n == 2).await;
        // Enough that the server is still echoing when the reset arrives, and little
        // enough that the socket buffers take it all while nobody reads the echo.
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..2 {
            resetter.write_all(&chunk).await.unwrap();
        }
        drop(resetter); // zero linger: the kernel sends RST, not FIN

        assert_eq!(server.wait_connections(|n| n == 1).await, 1);
        assert_eq!(exchange(&mut survivor, b"after").await, b"after");
    })
    .await;
}

/// Ensure a graceful shutdown keeps serving a connected echo client until it leaves,
/// reports it as drained, and refuses new connections afterwards.
#[tokio::test]
async fn shutdown_drains_connected_clients() {
    bounded(async {
        let server = serve::<Echo>().await;
        let addr = server.local_addr();
        let mut client = TcpStream::connect(addr).await.unwrap();
        assert_eq!(exchange(&mut client, b"one").await, b"one");
        server.wait_connections(|n| n == 1).await;

        let stopping = tokio::spawn({
            let server = server.clone();
            async move { server.shutdown_with_timeout(Duration::from_secs(20)).await }
        });
        assert_eq!(exchange(&mut client, b"two").await, b"two");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();

        let report = stopping.await.unwrap();
        assert_eq!(
            report,
            ShutdownReport {
                drained: 1,
                force_closed: 0
            }
        );
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "connect after shutdown"
        );
    })
    .await;
}

/// Connects a client that stays idle, shuts down with a short drain timeout, and checks
/// that the connection was cut off with a reset, and counted as force-closed.
async fn force_closes_an_idle_client<M: Send + 'static>(server: ServerHandle<M>) {
    let mut idle = TcpStream::connect(server.local_addr()).await.unwrap();
    server.wait_connections(|n| n == 1).await;
    let report = server
        .shutdown_with_timeout(Duration::from_millis(50))
        .await;
    assert_eq!(
        report,
        ShutdownReport {
            drained: 0,
            force_closed: 1
        }
    );
    let mut rest = Vec::new();
    let error = idle.read_to_end(&mut rest).await.expect_err("a reset");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(server.connections(), 0);
}

/// Ensure connections still open when the drain timeout ends are reset, so that their
/// peers can tell they were cut off, and counted.
#[tokio::test]
async fn shutdown_force_closes_after_the_drain_timeout() {
    bounded(async {
        force_closes_an_idle_client(serve::<Echo>().await).await;
    })
    .await;
}

/// Ensure a port in use and a zero limit are refused at start, naming the value.
#[tokio::test]
async fn bad_configuration_fails_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let in_use = Server::builder()
        .port(port)
        .protocol::<Echo>()
        .start()
        .await
        .unwrap_err();
    assert!(matches!(in_use, Error::Bind { .. }));
    let message = in_use.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("in use"), "{message}");

    let zero = Server::builder()
        .port(0)
        .max_connections(0)
        .protocol::<Echo>()
        .start()
        .await
        .unwrap_err();
    assert_eq!(
        zero.to_string(),
        "invalid max_connections 0: must be at least 1"
    );
}

/// Ensure a thread-per-core server serves clients on its threads and stops cleanly,
/// and that zero threads is refused.
#[tokio::test]
async fn per_core_threads_serve_and_stop() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            .threading(Threading::PerCore(2))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let mut clients = Vec::new();
        for i in 0..50 {
            let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
            let message = format!("client {i}");
            assert_eq!(
                exchange(&mut client, message.as_bytes()).await,
                message.as_bytes()
            );
            clients.push(client);
        }
        assert_eq!(server.wait_connections(|n| n == 50).await, 50);
        drop(clients);
        server.wait_connections(|n| n == 0).await;
        let report = server.shutdown().await;
        assert_eq!(
            report,
            ShutdownReport {
                drained: 0,
                force_closed: 0
            }
        );
        assert!(TcpStream::connect(server.local_addr()).await.is_err());

        let zero = Server::builder()
            .port(0)
            .threading(Threading::PerCore(0))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap_err();
        assert_eq!(
            zero.to_string(),
            "invalid threading PerCore(0): needs at least 1 thread"
        );
    })
    .await;
}

/// A raw handler that reads until the end of the stream and ignores shutdown.
struct Stubborn;

impl Handler for Stubborn {
    async fn handle<T: Stream>(&self, mut stream: T, _conn: Connection) -> std::io::Result<()> {
        let mut sink = Vec::new();
        stream.read_to_end(&mut sink).await.map(drop)
    }
}

/// Ensure a raw handler that ignores the shutdown is ended after the drain timeout, and
/// its connection closed and counted.
#[tokio::test]
async fn shutdown_ends_handlers_that_ignore_it() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            .handler(Stubborn)
            .start()
            .await
            .unwrap();
        force_closes_an_idle_client(server).await;
    })
    .await;
}
