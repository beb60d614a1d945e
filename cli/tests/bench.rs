//! The built `linedancer bench` against a tiny echo server that the test runs itself,
//! or against `linedancer serve` where the server's memory is read.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::time::timeout;

use common::{serve, TEST_TIMEOUT};

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

/// Starts an echo server on 127.0.0.1:0 on the test's runtime that drops the first
/// `drop_first` connections it accepts unread, and counts every byte it reads before
/// echoing it; its address and that count.
async fn counting_echo_server(drop_first: usize) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let echoed = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&echoed);
    let accepted = AtomicUsize::new(0);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            if accepted.fetch_add(1, Ordering::Relaxed) < drop_first {
                continue;
            }
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                while let Ok(n @ 1..) = socket.read(&mut buf).await {
                    // Counted before it goes back, so that the count is never behind
                    // what the client has received.
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    if socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, echoed)
}

/// Opens `n` connections to `addr` and has each echo once, so that the server has
/// accepted them all; the connections, to hold.
async fn connections_served(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"held\n").await.unwrap();
        let mut echo = [0; 5];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"held\n");
        held.push(stream);
    }
    held
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
        assert_eq!(report["warmup"]["errors_total"], 0, "{report}");
        let opened = report["connections_opened"].as_u64().unwrap()
            + report["warmup"]["connections_opened"].as_u64().unwrap();
        assert_eq!(opened, 4, "{report}");
        assert_eq!(report["window_secs"], 1.0, "{report}");
        assert!(report["latency_p50_us"].as_u64().unwrap() > 0, "{report}");
    })
    .await
    .expect("the test took too long");
}

/// Ensure that after a warmup in which every connection failed once and echoes were
/// counted, `bench echo` and `bench connect` report only what came after it: their
/// errors and connections apart under `warmup`, and requests that, with the warmup's,
/// add up to what the server echoed, not more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_leave_the_warmup_out() {
    timeout(TEST_TIMEOUT, async {
        const CONNS: u64 = 4;
        const SIZE: u64 = 32;
        for mode in ["echo", "connect"] {
            // The generator's first connections (one per worker, opened at once) are
            // dropped: each worker fails at its first exchange, within the warmup,
            // backs off 100 ms and connects again.
            let (addr, echoed) = counting_echo_server(CONNS as usize).await;
            let report = bench_json(&[
                mode,
                "--addr",
                &addr,
                "--conns",
                &CONNS.to_string(),
                "--size",
                &SIZE.to_string(),
                "--warmup",
                "1s",
                "--duration",
                "1s",
            ])
            .await;
            let field = |name: &str| report[name].as_u64().unwrap();
            let warmup = |name: &str| report["warmup"][name].as_u64().unwrap();
            assert_eq!(field("errors_total"), 0, "{mode}: {report}");
            assert_eq!(warmup("errors_total"), CONNS, "{mode}: {report}");
            assert!(field("requests") > 0, "{mode}: {report}");
            assert!(warmup("requests") > 0, "{mode}: {report}");
            assert_eq!(
                field("echoed_bytes"),
                field("requests") * SIZE,
                "{mode}: {report}"
            );
            if mode == "echo" {
                assert_eq!(field("connections_opened"), 0, "{report}");
                assert_eq!(warmup("connections_opened"), 2 * CONNS, "{report}");
            } else {
                // A request is a connection, opened in its phase but for at most one
                // per worker that the end of the warmup fell in.
                assert!(
                    field("connections_opened") + CONNS >= field("requests"),
                    "{report}"
                );
                assert!(
                    warmup("connections_opened") >= warmup("requests"),
                    "{report}"
                );
            }
            // Every message counted was echoed by the server, in one phase or the
            // other; the server also echoed at most one message per connection that
            // the end of the run cut off.
            let counted = (field("requests") + warmup("requests")) * SIZE;
            let served = echoed.load(Ordering::Relaxed);
            assert!(
                counted <= served && served <= counted + CONNS * SIZE,
                "{mode}: the server echoed {served} bytes, the report counts {counted}: {report}"
            );
        }
    })
    .await
    .expect("the test took too long");
}

/// Checks the memory fields of a `bench hold --pid` report of `conns` connections: a
/// number, if any, is the growth of the server's memory over the connections added,
/// and a null comes with its reason. Whether it is a number.
fn memory_per_conn_is_the_growth(report: &Value, conns: u64) -> bool {
    let before = report["server_rss_before_bytes"].as_u64().expect("read");
    let after = report["server_rss_after_bytes"].as_u64().expect("read");
    match (
        report["server_rss_per_conn_bytes"].as_f64(),
        report["server_rss_per_conn_unmeasured"].as_str(),
    ) {
        (Some(per_conn), None) => {
            let growth = after as f64 - before as f64;
            assert!(growth > 0.0, "{report}");
            assert!(
                (per_conn - growth / conns as f64).abs() < 1e-6,
                "not the growth over the run's connections: {report}"
            );
            assert!(per_conn < 64.0 * 1024.0, "{report}");
            let sockets_before = report["server_sockets_before"].as_u64().unwrap();
            let sockets_after = report["server_sockets_after"].as_u64().unwrap();
            assert_eq!(sockets_after - sockets_before, conns, "{report}");
            true
        }
        (None, Some(why)) => {
            assert!(!why.is_empty(), "{report}");
            false
        }
        _ => panic!("a number, or null with a reason: {report}"),
    }
}

/// Ensure `bench hold` opens every connection, finds each still answering after the
/// hold, and, given the server's pid, reports the memory the connections added to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_fifty_connections() {
    timeout(TEST_TIMEOUT, async {
        let server = serve(&["serve", "echo", "--port", "0"]).await;
        let pid = server.pid().to_string();
        let args = [
            "hold",
            "--addr",
            &server.addr,
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
        assert!(memory_per_conn_is_the_growth(&report, 50), "{report}");
    })
    .await
    .expect("the test took too long");
}

/// Ensure `bench hold --pid` against a server that already holds connections (300 the
/// test holds) divides only the server's growth by the connections the run added,
/// never its whole memory; and that once the server has closed connections (the 300
/// and the run's), the next run still measures, its sockets counted from what the
/// server holds then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_against_a_server_already_holding_connections() {
    timeout(TEST_TIMEOUT, async {
        const HELD: u64 = 300;
        // -v: the server logs each connection it closes.
        let mut server = serve(&["-v", "serve", "echo", "--port", "0"]).await;
        let held = connections_served(&server.addr, HELD as usize).await;
        let (addr, pid) = (server.addr.clone(), server.pid().to_string());
        let hold = |conns: u64| {
            let (addr, pid) = (addr.clone(), pid.clone());
            async move {
                let conns = conns.to_string();
                let args = [
                    "hold",
                    "--addr",
                    &addr,
                    "--conns",
                    &conns,
                    "--duration",
                    "200ms",
                    "--pid",
                    &pid,
                ];
                bench_json(&args).await
            }
        };

        let report = hold(300).await;
        assert_eq!(report["connections_opened"], 300, "{report}");
        assert_eq!(report["errors_total"], 0, "{report}");
        let sockets_held = report["server_sockets_before"].as_u64().unwrap();
        assert!(
            sockets_held >= HELD,
            "the server's sockets count the held connections: {report}"
        );
        assert!(memory_per_conn_is_the_growth(&report, 300), "{report}");
        let rss_after = report["server_rss_after_bytes"].as_f64().unwrap();
        let per_conn = report["server_rss_per_conn_bytes"].as_f64().unwrap();
        assert!(
            per_conn < rss_after / 300.0,
            "less than the server's whole memory over the run's connections: {report}"
        );

        // The test closes its connections (the run's closed when it ended), and waits
        // for the server to have closed all 600.
        drop(held);
        for _ in 0..2 * HELD {
            server.log.wait_for("connection closed").await;
        }
        // More connections than were closed, so that the server's memory grows, even
        // if the first 600 may reuse memory the closed ones freed (which the README
        // gives as a caveat): still a number, over the sockets the server holds now.
        let report = hold(900).await;
        assert_eq!(report["connections_opened"], 900, "{report}");
        assert_eq!(report["errors_total"], 0, "{report}");
        assert_eq!(
            report["server_sockets_before"].as_u64().unwrap(),
            sockets_held - HELD,
            "the server's sockets no longer count the closed ones: {report}"
        );
        assert!(
            memory_per_conn_is_the_growth(&report, 900),
            "a number after the server closed connections: {report}"
        );
    })
    .await
    .expect("the test took too long");
}

/// Ensure that at the end of the hold `bench hold --pid` waits for a server that has
/// not yet accepted the run's connections, and reads its sockets and memory only once
/// it has accepted them all. The server is stopped (SIGSTOP) while the run connects,
/// so that the connections wait in its listen backlog; it is let go (SIGCONT) once the
/// run says it is waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_waits_for_the_server_to_accept() {
    timeout(TEST_TIMEOUT, async {
        const CONNS: u64 = 200;
        let server = serve(&["serve", "echo", "--port", "0"]).await;
        let (conns, pid) = (CONNS.to_string(), server.pid().to_string());
        server.signal(libc::SIGSTOP);
        let mut bench = Command::new(env!("CARGO_BIN_EXE_linedancer"))
            .args([
                "-v",
                "bench",
                "hold",
                "--addr",
                &server.addr,
                "--conns",
                &conns,
            ])
            .args(["--duration", "100ms", "--pid", &pid, "--json"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run linedancer");
        let mut stderr = BufReader::new(bench.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        loop {
            let line = stderr.next_line().await.unwrap().unwrap_or_else(|| {
                panic!("bench ended without waiting for the server to accept:\n{seen}")
            });
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("waiting for the server to accept") {
                break;
            }
        }
        server.signal(libc::SIGCONT);
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                seen.push_str(&line);
                seen.push('\n');
            }
            seen
        });
        let output = bench.wait_with_output().await.expect("run linedancer");
        let stderr = drain.await.unwrap();
        assert!(output.status.success(), "{stderr}");
        let report: Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
        assert_eq!(report["connections_opened"], CONNS, "{report}");
        assert_eq!(report["requests"], CONNS, "{report}");
        assert_eq!(report["errors_total"], 0, "{report}");
        assert!(
            memory_per_conn_is_the_growth(&report, CONNS),
            "read once the server had accepted them all: {report}\n{stderr}"
        );
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
