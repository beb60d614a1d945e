//! The built `linedancer` binary: serving, signals, and errors a user can make.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The most any one test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

fn linedancer(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_linedancer"));
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Starts `linedancer serve` and waits for its `listening on` line; returns the child,
/// the address, and a task collecting the rest of its stderr.
async fn serve(args: &[&str]) -> (Child, String, tokio::task::JoinHandle<String>) {
    let mut child = linedancer(args).spawn().expect("run linedancer");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = stderr
            .next_line()
            .await
            .unwrap()
            .expect("linedancer ended before it was listening");
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_owned();
        }
    };
    let rest = tokio::spawn(async move {
        let mut text = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    (child, addr, rest)
}

/// Runs `linedancer` to completion; returns its exit code and stderr.
async fn fails(args: &[&str]) -> (i32, String) {
    let output = linedancer(args).output().await.expect("run linedancer");
    let stderr = String::from_utf8(output.stderr).unwrap();
    (
        output.status.code().expect("an exit code, not a signal"),
        stderr,
    )
}

/// Ensure `serve echo --port 0` reports its real port, echoes, logs the connection, and
/// exits 0 on SIGTERM.
#[tokio::test]
async fn serve_talk_and_stop_with_sigterm() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (mut child, addr, stderr) = serve(&["serve", "echo", "--port", "0"]).await;
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

        let pid = i32::try_from(child.id().unwrap()).unwrap();
        // SAFETY: kill(2) with a valid signal number has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(0));
        let log = stderr.await.unwrap();
        assert!(log.contains("connection accepted"), "{log}");
        assert!(log.contains("server stopped"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    })
    .await
    .expect("bounded");
}

/// Ensure the handshake server greets like the original.
#[tokio::test]
async fn serve_handshake_greets() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_child, addr, _) =
            serve(&["serve", "handshake", "--bind", "127.0.0.1", "--port", "0"]).await;
        let stream = TcpStream::connect(&addr).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert_eq!(first, "Welcome to the stateful authentication example.");
    })
    .await
    .expect("bounded");
}

/// Ensure a port in use exits 1 with one line naming the address and the reason.
#[tokio::test]
async fn port_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = fails(&["serve", "echo", "--port", &port]).await;
    assert_eq!(code, 1);
    let error_line = format!("error: cannot listen on 127.0.0.1:{port}: Address already in use");
    assert!(
        stderr.lines().any(|l| l.starts_with(&error_line)),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Ensure an unknown protocol and a bad address exit 1 with one line naming the value.
#[tokio::test]
async fn bad_arguments_exit_1() {
    let (code, stderr) = fails(&["serve", "telnet"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: unknown protocol 'telnet' (expected one of: echo, handshake, line-echo)\n"
    );

    let (code, stderr) = fails(&["serve", "echo", "--bind", "300.0.0.1"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "error: invalid bind address '300.0.0.1': expected an IP address such as 127.0.0.1 or ::1\n"
    );
}
