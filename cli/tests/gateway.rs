//! `linedancer serve gateway`: relaying through the built binary, and its argument
//! errors.

mod common;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{fails, serve, TEST_TIMEOUT};

/// Sends `message` through a new connection to `addr`, half-closes, and returns
/// everything that comes back until the end of the stream.
async fn through(addr: &str, message: &[u8]) -> Vec<u8> {
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(message).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    // A reset counts as nothing relayed.
    let _ = client.read_to_end(&mut reply).await;
    reply
}

/// Ensure `serve gateway` relays to its upstreams in turn (one given as
/// `localhost:PORT`), closes a client whose upstream is down and logs why, naming the
/// upstream (at the default level) and why the client's connection ended (with `-v`),
/// and exits 0 on SIGTERM.
#[tokio::test]
async fn serve_gateway_relays_to_its_upstreams_in_turn() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let echo = serve(&["serve", "echo", "--port", "0"]).await;
        let port = echo.addr.rsplit(':').next().unwrap();
        let by_name = format!("localhost:{port}");
        let down = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut gateway = serve(&[
            "-v",
            "serve",
            "gateway",
            "--port",
            "0",
            "--upstream",
            &echo.addr,
            "--upstream",
            &by_name,
            "--upstream",
            &down,
        ])
        .await;

        assert_eq!(through(&gateway.addr, b"first").await, b"first");
        assert_eq!(through(&gateway.addr, b"second").await, b"second");
        assert_eq!(through(&gateway.addr, b"third").await, b"");
        let warning = gateway.log.wait_for("upstream unreachable").await;
        assert!(
            warning.contains("WARN") && warning.contains(&down),
            "{warning}"
        );
        // The earlier clients' "connection closed" lines may come later still.
        let reason = format!("reason=i/o error: upstream {down} unreachable");
        let closed = gateway.log.wait_for(&reason).await;
        assert!(closed.contains("connection closed"), "{closed}");
        assert_eq!(through(&gateway.addr, b"fourth").await, b"fourth");

        gateway.signal(libc::SIGTERM);
        let status = gateway.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(0));
        let log = gateway.log.rest().await;
        assert!(log.contains("server stopped"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    })
    .await
    .expect("bounded");
}

/// Ensure a gateway without upstreams, an upstream for another protocol, and an
/// upstream that is no address each exit 1 with one line naming the problem.
#[tokio::test]
async fn gateway_argument_errors_exit_1() {
    let (code, stderr) = fails(&["serve", "gateway", "--port", "0"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: serve gateway needs at least one --upstream HOST:PORT\n"
    );

    let (code, stderr) = fails(&["serve", "echo", "--upstream", "127.0.0.1:7001"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: --upstream 127.0.0.1:7001 is for the gateway only, not for 'echo'\n"
    );

    for bad in ["127.0.0.1", "127.0.0.1:99999"] {
        let (code, stderr) = fails(&["serve", "gateway", "--port", "0", "--upstream", bad]).await;
        assert_eq!(code, 1, "{bad}: {stderr}");
        let error = format!("error: invalid upstream '{bad}': ");
        assert!(stderr.starts_with(&error), "{bad}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{bad}: {stderr}");
    }
}
