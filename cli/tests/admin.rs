//! `linedancer serve --admin` and `linedancer top`: the endpoint's address, its guard,
//! a drain asked over HTTP, and the terminal view.

mod common;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{fails, http, linedancer, serve, Serving, TEST_TIMEOUT};

/// Starts `serve echo ARGS --admin 127.0.0.1:0` and returns it with the endpoint's
/// address, from its `admin on` line.
async fn with_admin(args: &[&str]) -> (Serving, String) {
    let mut all = vec!["serve", "echo", "--port", "0", "--admin", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut server = serve(&all).await;
    let line = server.log.wait_for("admin on http://").await;
    let addr = line.rsplit_once("http://").unwrap().1.to_owned();
    (server, addr)
}

/// Ensure `POST /drain` on the endpoint drains the server, which exits 0, and that
/// `/health` said so meanwhile.
#[tokio::test]
async fn a_drain_asked_over_http() {
    let (mut server, admin) = with_admin(&["--drain-timeout", "10s"]).await;
    assert_eq!(
        http(&admin, "GET", "/health", None).await,
        (200, "accepting\n".into())
    );
    let mut client = TcpStream::connect(&server.addr).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut echo = [0; 4];
    client.read_exact(&mut echo).await.unwrap();
    assert_eq!(http(&admin, "POST", "/drain", None).await.0, 202);
    assert_eq!(
        http(&admin, "GET", "/health", None).await,
        (503, "draining\n".into())
    );
    drop(client);
    let status = tokio::time::timeout(TEST_TIMEOUT, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Ensure the endpoint refuses to start on an address other than loopback without a
/// token, and a token file that is empty or missing fails at start.
#[tokio::test]
async fn the_endpoint_is_guarded() {
    let (code, stderr) = fails(&["serve", "echo", "--port", "0", "--admin", "0.0.0.0:0"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot serve the admin endpoint on 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(stderr.contains("needs --admin-token-file"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.to_str().unwrap();
    let (code, stderr) = fails(&[
        "serve",
        "echo",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        empty,
    ])
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("the file is empty"), "{stderr}");

    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let (server, admin) = with_admin(&["--admin-token-file", token.to_str().unwrap()]).await;
    assert_eq!(http(&admin, "GET", "/stats", None).await.0, 401);
    assert_eq!(http(&admin, "GET", "/stats", Some("t0ken")).await.0, 200);
    server.signal(libc::SIGTERM);
}

/// Ensure `top --once` shows the server's totals, states and slowest readers.
#[tokio::test]
async fn top_shows_a_running_server() {
    let (server, admin) = with_admin(&[]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = TcpStream::connect(&server.addr).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut echo = [0; 5];
        client.read_exact(&mut echo).await.unwrap();
        clients.push(client);
    }
    let output = tokio::time::timeout(
        TEST_TIMEOUT,
        linedancer(&["top", "--admin", &admin, "--once", "--interval", "100ms"])
            .stdout(std::process::Stdio::piped())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let view = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        view.contains(&format!("linedancer at {admin}: accepting")),
        "{view}"
    );
    assert!(view.contains("open 3 of 10000 (peak 3)"), "{view}");
    assert!(view.contains("frames in 3 "), "{view}");
    assert!(view.contains("states: RECV 3"), "{view}");
    assert!(view.contains("slowest readers"), "{view}");
    let (code, stderr) = fails(&["top", "--admin", "127.0.0.1:1", "--once"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("admin endpoint 127.0.0.1:1"), "{stderr}");
    drop(clients);
    server.signal(libc::SIGTERM);
}
