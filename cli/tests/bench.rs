//! The built `linedancer bench` against a tiny echo server that the test runs itself.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::timeout;

/// The most any one test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts an echo server on 127.0.0.1:0 on the test's runtime; its address.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    addr
}

/// Runs `linedancer bench` with `args`; its exit code, stdout and stderr.
async fn bench(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_linedancer"))
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run linedancer");
    (
        output.status.code().expect("an exit code, not a signal"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Runs `linedancer bench ARGS --json`, which must succeed; its one JSON object.
async fn bench_json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = bench(&[args, &["--json"]].concat()).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).expect("valid JSON")
}

/// Ensure `bench echo` for a second counts requests, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_for_a_second() {
    timeout(TEST_TIMEOUT, async {
        let addr = echo_server().await;
        let args = ["echo", "--addr", &addr, "--conns", "4", "--pipeline", "2"];
        let report =
            bench_json(&[&args[..], &["--duration", "1s", "--warmup", "100ms"]].concat()).await;
        assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["errors_total"], 0, "{report}");
        assert_eq!(report["connections_opened"], 4, "{report}");
        assert_eq!(report["window_secs"], 1.0, "{report}");
        assert!(report["latency_p50_us"].as_u64().unwrap() > 0, "{report}");
    })
    .await
    .expect("the test took too long");
}

/// Ensure `bench hold` opens every connection, finds each still answering after the hold,
/// and, given the server's pid (this test's), reports the server's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_fifty_connections() {
    timeout(TEST_TIMEOUT, async {
        let addr = echo_server().await;
        let pid = std::process::id().to_string();
        let args = [
            "hold",
            "--addr",
            &addr,
            "--conns",
            "50",
            "--duration",
            "200ms",
            "--pid",
            &pid,
        ];
        let report = bench_json(&args).await;
        assert_eq!(report["requests"], 50, "{report}");
        assert_eq!(report["errors_total"], 0, "{report}");
        assert_eq!(report["connections_opened"], 50, "{report}");
        assert!(
            report["server_rss_after_bytes"].as_u64().unwrap() > 0,
            "{report}"
        );
        assert!(report["server_rss_per_conn_bytes"].is_f64(), "{report}");
    })
    .await
    .expect("the test took too long");
}

/// Ensure a bad value fails at once, naming it in one line, with exit code 1.
#[tokio::test]
async fn bad_configuration_fails_at_start() {
    timeout(TEST_TIMEOUT, async {
        let (code, stdout, stderr) = bench(&["echo", "--pipeline", "0"]).await;
        assert_eq!(code, 1);
        assert_eq!(stdout, "");
        assert_eq!(
            stderr,
            "error: invalid --pipeline '0': must be at least 1\n"
        );
    })
    .await
    .expect("the test took too long");
}
