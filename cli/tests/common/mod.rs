//! Running the built `linedancer` binary from tests: starting `serve`, following its
//! log, signalling it, and running it to completion.
// Each test file compiles this module on its own and uses only some of it.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The most any one test may take.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `linedancer ARGS`, logging to a piped stderr at the level its flags say (RUST_LOG
/// unset), killed when dropped.
pub fn linedancer(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_linedancer"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running `linedancer serve`.
pub struct Serving {
    /// The process; killed when dropped.
    pub child: Child,
    /// The address it listens on, from its `listening on` line.
    pub addr: String,
    /// Its stderr after the `listening on` line.
    pub log: Log,
}

impl Serving {
    /// The process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id().expect("still running")).unwrap()
    }

    /// Sends the process `signal`.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with a valid signal number has no memory effects.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }
}

/// The lines of a child's stderr, read as they come by a task of their own, so the
/// child never blocks on a full pipe.
pub struct Log {
    lines: mpsc::UnboundedReceiver<String>,
    /// The lines taken from `lines` so far.
    seen: String,
}

impl Log {
    /// Waits for the next line containing `needle`, and returns it; panics if stderr
    /// ends first.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self.next().await.unwrap_or_else(|| {
                panic!("stderr ended before a line with {needle:?}:\n{}", self.seen)
            });
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The number of lines containing `needle` that arrive in the next `window`.
    pub async fn count_for(&mut self, needle: &str, window: Duration) -> usize {
        let end = tokio::time::Instant::now() + window;
        let mut count = 0;
        while let Ok(Some(line)) = tokio::time::timeout_at(end, self.next()).await {
            count += usize::from(line.contains(needle));
        }
        count
    }

    /// Everything the child wrote to stderr after `listening on`, once it has closed
    /// stderr (usually by exiting).
    pub async fn rest(mut self) -> String {
        while self.next().await.is_some() {}
        self.seen
    }

    async fn next(&mut self) -> Option<String> {
        let line = self.lines.recv().await?;
        self.seen.push_str(&line);
        self.seen.push('\n');
        Some(line)
    }
}

/// Starts `linedancer ARGS` (a `serve`) and waits for its `listening on` line.
pub async fn serve(args: &[&str]) -> Serving {
    serve_command(linedancer(args)).await
}

/// Starts `command` (a `serve`, with a piped stderr) and waits for its `listening on`
/// line.
pub async fn serve_command(mut command: Command) -> Serving {
    let mut child = command.spawn().expect("run linedancer");
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
    let (send, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            // When nobody follows the log any more, go on draining the pipe.
            let _ = send.send(line);
        }
    });
    Serving {
        child,
        addr,
        log: Log {
            lines,
            seen: String::new(),
        },
    }
}

/// Runs `linedancer ARGS` to completion, within [`TEST_TIMEOUT`]; returns its exit code
/// and stderr.
pub async fn fails(args: &[&str]) -> (i32, String) {
    let output = tokio::time::timeout(TEST_TIMEOUT, linedancer(args).output())
        .await
        .expect("linedancer ran too long")
        .expect("run linedancer");
    let stderr = String::from_utf8(output.stderr).unwrap();
    (
        output.status.code().expect("an exit code, not a signal"),
        stderr,
    )
}

/// The number of file descriptors process `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    fd_numbers(pid).len()
}

/// The file descriptors process `pid` has open.
pub fn fd_numbers(pid: i32) -> Vec<usize> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    (entries.map(|entry| {
        entry
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }))
    .collect()
}

/// The CPU time process `pid` has used, user and system, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state, ppid, ... utime (14th), stime (15th).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The resident memory of process `pid`, in bytes (VmRSS).
pub fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Sends an HTTP/1.1 request and returns the status and body.
pub async fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |token| {
        format!("authorization: Bearer {token}\r\n")
    });
    let request = format!("{method} {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (answer[9..12].parse().unwrap(), body.to_owned())
}
