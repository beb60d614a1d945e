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
/// `localhost:PORT`), relays a client whose turn falls on an upstream that is down to
/// the next one and logs the upstream going down (at the default level), and exits 0
/// on SIGTERM.
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
        // Its turn is on the upstream that is down: relayed to the next.
        assert_eq!(through(&gateway.addr, b"third").await, b"third");
        let warning = gateway.log.wait_for("upstream down").await;
        assert!(
            warning.contains("WARN") && warning.contains(&down),
            "{warning}"
        );
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

/// Ensure `--send-proxy-v2` sends the header an upstream started with
/// `--proxy-protocol` requires, with `--balance least-conn` and a cap.
#[tokio::test]
async fn serve_gateway_sends_the_proxy_header() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let echo = serve(&["serve", "echo", "--port", "0", "--proxy-protocol"]).await;
        let gateway = serve(&[
            "serve",
            "gateway",
            "--port",
            "0",
            "--upstream",
            &echo.addr,
            "--send-proxy-v2",
            "--balance",
            "least-conn",
            "--max-per-upstream",
            "10",
            "--health-interval",
            "off",
        ])
        .await;
        assert_eq!(
            through(&gateway.addr, b"behind a header").await,
            b"behind a header"
        );
        let plain = serve(&["serve", "gateway", "--port", "0", "--upstream", &echo.addr]).await;
        assert_eq!(
            through(&plain.addr, b"no header").await,
            b"",
            "refused by the upstream"
        );
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

    let (code, stderr) = fails(&["serve", "echo", "--send-proxy-v2"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: --send-proxy-v2 is for the gateway only, not for 'echo'\n"
    );

    for bad in ["127.0.0.1", "127.0.0.1:99999"] {
        let (code, stderr) = fails(&["serve", "gateway", "--port", "0", "--upstream", bad]).await;
        assert_eq!(code, 1, "{bad}: {stderr}");
        let error = format!("error: invalid upstream '{bad}': ");
        assert!(stderr.starts_with(&error), "{bad}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{bad}: {stderr}");
    }
}
