//! The built `linedancer` binary: serving, signals, and errors a user can make.

mod common;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::{fails, serve, TEST_TIMEOUT};

/// Ensure `serve echo --port 0` reports its real port, echoes, logs its start and stop
/// but not the connection (at the default level), and exits 0 on SIGTERM.
#[tokio::test]
async fn serve_talk_and_stop_with_sigterm() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut server = serve(&["serve", "echo", "--port", "0"]).await;
        let addr = server.addr.clone();
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "{addr}"
        );

        let mut client = TcpStream::connect(&addr).await.unwrap();
        client.write_all(b"G`day\n").await.unwrap();
        let mut reply = [0; 6];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"G`day\n");
        drop(client);

        server.signal(libc::SIGTERM);
        let status = server.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(0));
        let log = server.log.rest().await;
        assert!(!log.contains("connection accepted"), "{log}");
        assert!(!log.contains("connection closed"), "{log}");
        assert!(log.contains("server stopped"), "{log}");
        assert!(log.contains("final stats"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    })
    .await
    .expect("bounded");
}

/// Ensure `-v` logs each connection's opening and closing, with its id, peer and
/// reason.
#[tokio::test]
async fn verbose_logs_each_connection() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut server = serve(&["-v", "serve", "echo", "--port", "0"]).await;
        let client = TcpStream::connect(&server.addr).await.unwrap();
        let peer = client.local_addr().unwrap().to_string();
        let accepted = server.log.wait_for("connection accepted").await;
        assert!(accepted.contains(&format!("peer={peer}")), "{accepted}");
        drop(client);
        let closed = server.log.wait_for("connection closed").await;
        assert!(closed.contains("reason=peer closed"), "{closed}");
        server.signal(libc::SIGTERM);
        assert_eq!(server.child.wait().await.unwrap().code(), Some(0));
    })
    .await
    .expect("bounded");
}

/// Ensure `serve --bind` takes IPv6 as an address, in brackets, or as HOST:PORT, and
/// that a port given twice is refused.
#[tokio::test]
async fn serve_listens_on_ipv6() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        for args in [
            &["serve", "echo", "--bind", "::1", "--port", "0"][..],
            &["serve", "echo", "--bind", "[::1]", "--port", "0"],
            &["serve", "echo", "--bind", "[::1]:0"],
        ] {
            let server = serve(args).await;
            assert!(
                server.addr.starts_with("[::1]:"),
                "{args:?}: {}",
                server.addr
            );
            let mut client = TcpStream::connect(&server.addr).await.unwrap();
            client.write_all(b"over IPv6").await.unwrap();
            let mut reply = [0; 9];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply, b"over IPv6");
        }
        let (code, stderr) = fails(&["serve", "echo", "--bind", "[::1]:0", "--port", "1"]).await;
        assert_eq!(code, 1);
        assert_eq!(
            stderr,
            "error: --bind [::1]:0 names a port already; drop --port\n"
        );
    })
    .await
    .expect("bounded");
}

/// Ensure `serve chat` lets two clients talk.
#[tokio::test]
async fn serve_chat_relays_a_line_between_clients() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut server = serve(&["serve", "chat", "--port", "0"]).await;
        let mut ann = BufReader::new(TcpStream::connect(&server.addr).await.unwrap());
        let mut line = String::new();
        ann.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("* welcome, guest1"), "{line}");
        let mut bob = BufReader::new(TcpStream::connect(&server.addr).await.unwrap());
        line.clear();
        bob.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("* welcome, guest2"), "{line}");
        bob.get_mut().write_all(b"hello ann\n").await.unwrap();
        loop {
            line.clear();
            ann.read_line(&mut line).await.unwrap();
            if line == "<guest2> hello ann\n" {
                break;
            }
            assert!(line.starts_with('*'), "{line}");
        }
        server.signal(libc::SIGTERM);
        assert_eq!(server.child.wait().await.unwrap().code(), Some(0));
    })
    .await
    .expect("bounded");
}

/// Ensure `--login-timeout` gives a handshake client that long to log in, and is
/// refused for other protocols and at zero.
#[tokio::test]
async fn serve_handshake_login_timeout() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = serve(&[
            "serve",
            "handshake",
            "--port",
            "0",
            "--login-timeout",
            "200ms",
        ])
        .await;
        let stream = TcpStream::connect(&server.addr).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let mut last = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            last = line;
        }
        assert_eq!(last, "login timed out, closing the connection");
    })
    .await
    .expect("bounded");
    let (code, stderr) = fails(&["serve", "echo", "--login-timeout", "5s"]).await;
    assert_eq!(
        (code, stderr.as_str()),
        (
            1,
            "error: --login-timeout is for the handshake only, not for 'echo'\n"
        )
    );
    let (code, stderr) = fails(&["serve", "handshake", "--login-timeout", "0s"]).await;
    assert_eq!(
        (code, stderr.as_str()),
        (1, "error: invalid --login-timeout 0s: must be above zero\n")
    );
}

/// Ensure the handshake server greets like the original.
#[tokio::test]
async fn serve_handshake_greets() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = serve(&["serve", "handshake", "--bind", "127.0.0.1", "--port", "0"]).await;
        let stream = TcpStream::connect(&server.addr).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert_eq!(first, "Welcome to the stateful authentication example.");
    })
    .await
    .expect("bounded");
}

/// Ensure a port in use exits 1 with one line naming the address and the reason,
/// whether a plain socket or another `linedancer serve` holds it (whose per-core
/// listeners share their port among themselves, and with nobody else).
#[tokio::test]
async fn port_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = serve(&["serve", "echo", "--port", "0"]).await;
    let other_port = other.addr.rsplit(':').next().unwrap().to_owned();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    for port in [taken_port, other_port] {
        let (code, stderr) = fails(&["serve", "echo", "--port", &port]).await;
        assert_eq!(code, 1);
        let error_line =
            format!("error: cannot listen on 127.0.0.1:{port}: Address already in use");
        assert!(
            stderr.lines().any(|l| l.starts_with(&error_line)),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // The server already there goes on serving.
    let mut client = TcpStream::connect(&other.addr).await.unwrap();
    client.write_all(b"still here\n").await.unwrap();
    let mut reply = [0; 11];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"still here\n");
}

/// Ensure an unknown protocol and a bad address exit 1 with one line naming the value.
#[tokio::test]
async fn bad_arguments_exit_1() {
    let (code, stderr) = fails(&["serve", "telnet"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: unknown protocol 'telnet' (expected one of: echo, handshake, line-echo, chat, gateway, kv)\n"
    );

    let (code, stderr) = fails(&["serve", "echo", "--bind", "300.0.0.1"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: invalid bind address '300.0.0.1': expected an IP address such as 127.0.0.1 \
         or ::1, or HOST:PORT such as [::1]:7000\n"
    );

    let (code, stderr) = fails(&["serve", "echo", "--bind", "no.such.host.invalid:7000"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: invalid address 'no.such.host.invalid:7000': "),
        "{stderr}"
    );
}

/// Ensure a bad value of a limit or timeout flag exits 1 at start, before listening,
/// with an error line naming the value.
#[tokio::test]
async fn bad_limit_flags_exit_1() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["--idle-timeout", "5 parsecs"],
            "error: invalid value '5 parsecs' for '--idle-timeout <D>': unknown time unit \"parsecs\"",
        ),
        (
            &["--drain-timeout", "abc"],
            "error: invalid value 'abc' for '--drain-timeout <D>'",
        ),
        (
            &["--max-connections", "0"],
            "error: invalid max_connections 0: must be at least 1",
        ),
        (
            &["--idle-timeout", "0s"],
            "error: invalid idle_timeout 0s: must be above zero",
        ),
        (
            &["--frame-timeout", "0s"],
            "error: invalid frame_timeout 0s: must be above zero",
        ),
        (
            &["--max-output", "0"],
            "error: invalid max_output 0: must be at least 1",
        ),
        (
            &["--tcp-keepalive", "soon"],
            "error: invalid value 'soon' for '--tcp-keepalive <D|off>'",
        ),
        (
            &["--tcp-keepalive", "0s"],
            "error: invalid tcp_keepalive 0s: must be above zero, or off",
        ),
    ];
    for (flags, error) in cases {
        let args = [&["serve", "echo", "--port", "0"], flags].concat();
        let (code, stderr) = fails(&args).await;
        assert_eq!(code, 1, "{flags:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with(error), "{flags:?}: {stderr}");
        assert!(!stderr.contains("listening"), "{flags:?}: {stderr}");
    }
}
