//! `linedancer serve kv` judged by the real Redis tools: `redis-cli` for each command,
//! `redis-benchmark` for a short run. `.ci/run` installs them (Debian's `redis-tools`);
//! a machine without them fails these tests rather than skipping them.

mod common;

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use common::{serve, Serving, TEST_TIMEOUT};

/// Runs `redis-cli -h HOST -p PORT ARGS` with `stdin`, and returns its exit code and
/// output.
async fn redis_cli(server: &Serving, args: &[&[u8]], stdin: &[u8]) -> (i32, Vec<u8>) {
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let mut command = Command::new("redis-cli");
    command.args(["-h", host, "-p", port]);
    for arg in args {
        command.arg(std::ffi::OsStr::new(std::str::from_utf8(arg).unwrap()));
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli (from Debian's redis-tools) is installed");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    (output.status.code().unwrap(), output.stdout)
}

/// `redis-cli ARGS`, checked to exit 0, its output as text.
async fn cli(server: &Serving, args: &[&str]) -> String {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    let (code, out) = redis_cli(server, &args, b"").await;
    assert_eq!(code, 0, "redis-cli {args:?}");
    String::from_utf8(out).unwrap()
}

/// Ensure `redis-cli` gets Redis's answers to every command the server has, including
/// a value with newlines and binary bytes, and errors (which redis-cli follows with an
/// empty line).
#[tokio::test]
async fn redis_cli_runs_every_command() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = serve(&["serve", "kv", "--port", "0"]).await;
        assert_eq!(cli(&server, &["ping"]).await, "PONG\n");
        assert_eq!(cli(&server, &["echo", "hello"]).await, "hello\n");
        assert_eq!(cli(&server, &["set", "k", "v"]).await, "OK\n");
        assert_eq!(cli(&server, &["get", "k"]).await, "v\n");
        assert_eq!(cli(&server, &["get", "nope"]).await, "\n");
        assert_eq!(cli(&server, &["set", "k", "w", "NX"]).await, "\n");
        assert_eq!(
            cli(&server, &["set", "t", "v", "EX", "100", "XX"]).await,
            "\n"
        );
        assert_eq!(
            cli(&server, &["set", "t", "v", "PX", "100000"]).await,
            "OK\n"
        );
        assert_eq!(cli(&server, &["ttl", "t"]).await, "100\n");
        assert_eq!(cli(&server, &["expire", "k", "30"]).await, "1\n");
        assert_eq!(cli(&server, &["ttl", "k"]).await, "30\n");
        assert_eq!(cli(&server, &["incr", "n"]).await, "1\n");
        assert_eq!(cli(&server, &["incrby", "n", "10"]).await, "11\n");
        assert_eq!(cli(&server, &["decr", "n"]).await, "10\n");
        assert_eq!(
            cli(&server, &["incr", "k"]).await,
            "ERR value is not an integer or out of range\n\n"
        );
        assert_eq!(cli(&server, &["mset", "a", "1", "b", "2"]).await, "OK\n");
        assert_eq!(cli(&server, &["mget", "a", "nope", "b"]).await, "1\n\n2\n");
        assert_eq!(cli(&server, &["exists", "a", "b", "nope"]).await, "2\n");
        assert_eq!(cli(&server, &["del", "a", "nope"]).await, "1\n");
        assert_eq!(cli(&server, &["dbsize"]).await, "4\n"); // k, t, n and b
        assert_eq!(cli(&server, &["publish", "nobody", "hi"]).await, "0\n");
        assert_eq!(
            cli(&server, &["hset", "h", "f"]).await,
            "ERR unknown command 'hset', with args beginning with: 'h' 'f' \n\n"
        );
        assert_eq!(
            cli(&server, &["get"]).await,
            "ERR wrong number of arguments for 'get' command\n\n"
        );

        // Newlines and every byte value, through -x (the value from stdin).
        let value: Vec<u8> = b"line one\r\nline two\n"
            .iter()
            .copied()
            .chain(0..=255)
            .collect();
        let (code, out) = redis_cli(&server, &[b"-x", b"set", b"bin"], &value).await;
        assert_eq!((code, out.as_slice()), (0, &b"OK\n"[..]));
        let (code, out) = redis_cli(&server, &[b"get", b"bin"], b"").await;
        assert_eq!(code, 0);
        assert_eq!(
            out[..out.len() - 1],
            value[..],
            "the value, then redis-cli's newline"
        );

        assert_eq!(cli(&server, &["flushdb"]).await, "OK\n");
        assert_eq!(cli(&server, &["dbsize"]).await, "0\n");
        assert_eq!(cli(&server, &["quit"]).await, "OK\n");
    })
    .await
    .expect("bounded");
}

/// Ensure `redis-cli subscribe` receives what another `redis-cli publish` sends.
#[tokio::test]
async fn redis_cli_publishes_to_a_subscriber() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = serve(&["serve", "kv", "--port", "0"]).await;
        let (host, port) = server.addr.rsplit_once(':').unwrap();
        let mut subscriber = Command::new("redis-cli")
            .args(["-h", host, "-p", port, "subscribe", "news"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli (from Debian's redis-tools) is installed");
        let mut lines = BufReader::new(subscriber.stdout.take().unwrap()).lines();
        for expected in ["subscribe", "news", "1"] {
            assert_eq!(lines.next_line().await.unwrap().unwrap(), expected);
        }
        assert_eq!(
            cli(&server, &["publish", "news", "hello world"]).await,
            "1\n"
        );
        for expected in ["message", "news", "hello world"] {
            assert_eq!(lines.next_line().await.unwrap().unwrap(), expected);
        }
    })
    .await
    .expect("bounded");
}

/// Ensure a short `redis-benchmark` run of SET, GET and INCR, plain and pipelined,
/// finishes with a result for each test and nothing on stderr.
#[tokio::test]
async fn redis_benchmark_runs_clean() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = serve(&["serve", "kv", "--port", "0"]).await;
        let (host, port) = server.addr.rsplit_once(':').unwrap();
        for pipeline in ["1", "16"] {
            let output = Command::new("redis-benchmark")
                .args(["-h", host, "-p", port, "-t", "set,get,incr", "-n", "20000"])
                .args(["-c", "50", "-P", pipeline, "-q", "--csv"])
                .output()
                .await
                .expect("redis-benchmark (from Debian's redis-tools) is installed");
            let (stdout, stderr) = (
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
            assert!(output.status.success(), "{stdout}{stderr}");
            assert_eq!(stderr, "", "-P {pipeline}");
            for test in ["SET", "GET", "INCR"] {
                let row = stdout
                    .lines()
                    .find(|line| line.starts_with(&format!("\"{test}\",")))
                    .unwrap_or_else(|| panic!("no {test} result in {stdout}"));
                let rps: f64 = row
                    .split(',')
                    .nth(1)
                    .unwrap()
                    .trim_matches('"')
                    .parse()
                    .unwrap();
                assert!(rps > 0.0, "{row}");
            }
        }
        // SET and GET use `key:__rand_int__`, INCR `counter:__rand_int__`.
        assert_eq!(cli(&server, &["dbsize"]).await, "2\n");
    })
    .await
    .expect("bounded");
}
