//! `linedancer bench`: a load generator for any TCP echo-style server.
//!
//! The flags are checked into a [`Config`] before anything runs, so that a bad value
//! fails at once with its name. The load itself runs on a runtime of its own, sized by
//! `--threads`, so that the generator's threads are the ones the user asked for.
//!
//! The modes (`echo`, `connect`, `hold`) share the connection and checked-exchange
//! helpers of [`net`]; what they count goes into a [`tally::Tally`] and comes out as a
//! [`report::Report`].

mod connect;
mod echo;
mod hold;
mod net;
mod progress;
mod report;
mod sys;
mod tally;
mod timed;

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use self::net::Target;
use self::report::{Measured, Report};
use self::sys::Server;

/// The largest batch a connection may have in flight: `--size` × `--pipeline` bytes.
const MAX_BATCH_BYTES: usize = 16 << 20;

/// Flags of `linedancer bench`.
///
/// With `--json` the run prints exactly one JSON object on stdout; its fields are listed
/// in the doc of the `json` flag below (and in `linedancer bench --help`).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: echo (ping-pong on long-lived connections), connect (a new
    /// connection per exchange) or hold (many idle connections); default echo.
    #[arg(value_enum, value_name = "MODE")]
    mode: Option<Mode>,
    /// The mode, as a flag rather than a positional argument.
    #[arg(
        long = "mode",
        value_enum,
        value_name = "MODE",
        conflicts_with = "mode",
        hide_possible_values = true
    )]
    mode_flag: Option<Mode>,
    /// The server to load: IP:PORT, or localhost:PORT.
    #[arg(long, default_value = "127.0.0.1:7000", value_name = "HOST:PORT")]
    addr: String,
    /// Concurrent connections (echo, hold) or concurrent connecting workers (connect).
    #[arg(long, default_value_t = 50, value_name = "N")]
    conns: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 32, value_name = "BYTES")]
    size: usize,
    /// How long to measure, after the warmup (echo, connect), or to hold the
    /// connections idle (hold); such as 500ms or 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "D")]
    duration: Duration,
    /// How long to load the server before measuring (echo, connect; hold ignores it).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "D")]
    warmup: Duration,
    /// Messages in flight per connection (echo only).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pipeline: usize,
    /// Worker threads of the load generator's own runtime.
    #[arg(long, default_value_t = 1, value_name = "N")]
    threads: usize,
    /// Send lines, for line-framed echo servers: each message is `size - 1` printable
    /// bytes and a `\n`.
    #[arg(long)]
    lines: bool,
    /// The server's process id: report its CPU time per request and, in hold mode, the
    /// memory each connection of the run added to it, from /proc.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Speak TLS, trusting the certificates in this PEM file (a CA, or the server's
    /// own self-signed one). Every connection makes a full handshake (no session
    /// resumption); in connect mode it is part of each request.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the server name to ask for (SNI) and verify.
    #[arg(long, default_value = "localhost", value_name = "NAME")]
    tls_name: String,
    /// Print one JSON object on stdout instead of the report.
    ///
    /// Its fields, whose names are stable:
    ///   mode                        "echo", "connect" or "hold"
    ///   addr                        the server's address
    ///   conns, size, pipeline, threads
    ///                               the flags' values
    ///   warmup_secs                 the warmup (0 in hold mode)
    ///   window_secs                 the window in which requests were counted: the
    ///                               duration after the warmup (echo, connect), or
    ///                               the final check of every connection (hold)
    ///   requests                    messages echoed and checked in the window; in
    ///                               connect mode, each is a whole connection
    ///   requests_per_sec            requests / window_secs
    ///   echoed_bytes                bytes echoed back and checked in the window
    ///                               (requests × size; as many went out)
    ///   echoed_bytes_per_sec        echoed_bytes / window_secs, one direction
    ///   latency_p50_us, latency_p99_us, latency_p999_us, latency_max_us
    ///                               per request, in microseconds: from sending
    ///                               the batch to the message's last byte back
    ///                               (connect: from the connect on)
    ///   errors                      {refused, reset, timeout, mismatch, eof,
    ///                               other}: counts after the warmup (hold: over
    ///                               the whole run); RUST_LOG=debug shows each
    ///   errors_total                their sum
    ///   connections_opened          connections established after the warmup
    ///                               (hold: over the whole run)
    ///   warmup                      {requests, errors, errors_total,
    ///                               connections_opened}: what the warmup
    ///                               counted, none of it in the fields above
    ///                               (all 0 in hold mode, or with --warmup 0s)
    ///   server_cpu_us_per_request   with --pid: the server's CPU time (user +
    ///                               system) in the window / requests; else null
    ///   server_rss_before_bytes, server_rss_after_bytes
    ///                               hold with --pid: the server's VmRSS before
    ///                               opening, and at the end of the hold with all
    ///                               open; when /proc/PID/fd can be read, once its
    ///                               sockets have grown by connections_opened
    ///                               (waiting up to 10s more for it to accept
    ///                               them); else null
    ///   server_sockets_before, server_sockets_after
    ///                               hold with --pid: the server's open sockets
    ///                               at the same two times, from /proc/PID/fd;
    ///                               null where that cannot be read
    ///   server_rss_per_conn_bytes   hold with --pid: the memory each connection
    ///                               of this run added to the server: (its VmRSS
    ///                               after - before) / connections_opened, so
    ///                               connections it held before the run cancel
    ///                               out. Null when that says nothing: some
    ///                               connection failed to open; its VmRSS did not
    ///                               grow; or, checked when /proc/PID/fd can be
    ///                               read, its sockets did not grow by
    ///                               connections_opened. A caveat: a server that
    ///                               has closed connections before may hand
    ///                               their freed memory to new ones, which then
    ///                               seem to cost less; the figure is best taken
    ///                               on a freshly started server
    ///   server_rss_per_conn_unmeasured
    ///                               why server_rss_per_conn_bytes is null, as a
    ///                               sentence; null when it is a number
    #[arg(long, verbatim_doc_comment)]
    json: bool,
}

/// What `bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ping-pong on long-lived connections, `--pipeline` messages at a time.
    Echo,
    /// Connect, one exchange, close; again and again.
    Connect,
    /// Open many connections, leave them idle, then check that each still answers.
    Hold,
}

/// Why `bench` could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag's value is out of range.
    #[error("invalid --{flag} '{value}': {reason}")]
    Invalid {
        /// The flag, without its dashes.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What the value must be.
        reason: String,
    },
    /// `--addr` is not an address with a port.
    #[error("invalid --addr '{0}': expected IP:PORT such as 127.0.0.1:7000, or localhost:PORT")]
    BadAddress(String),
    /// The server's `/proc` entries cannot be read.
    #[error("cannot read the server's usage for --pid {pid}: {source}")]
    Pid {
        /// The pid given.
        pid: u32,
        /// Why /proc could not be read.
        source: io::Error,
    },
    /// The load generator's runtime did not start.
    #[error("cannot start the load generator's runtime: {0}")]
    Runtime(io::Error),
    /// The report could not be written to stdout.
    #[error("cannot write the report: {0}")]
    Output(io::Error),
}

/// A run's settings, checked.
#[derive(Debug)]
pub struct Config {
    /// What to measure.
    pub mode: Mode,
    /// Where to connect, and from which source addresses.
    pub target: Target,
    /// Connections, or connecting workers.
    pub conns: usize,
    /// Bytes per message.
    pub size: usize,
    /// Messages in flight per connection.
    pub pipeline: usize,
    /// The generator's worker threads.
    pub threads: usize,
    /// Whether messages are lines.
    pub lines: bool,
    /// Load before measuring.
    pub warmup: Duration,
    /// The measured window, or the idle time in hold mode.
    pub duration: Duration,
    /// The server process to read usage from.
    pub server: Option<Server>,
}

impl Config {
    /// Checks the flags, naming the first bad one.
    fn from_args(args: &BenchArgs) -> Result<Config, BenchError> {
        let invalid = |flag, value: &dyn ToString, reason: &str| BenchError::Invalid {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        for (flag, value) in [
            ("conns", args.conns),
            ("size", args.size),
            ("pipeline", args.pipeline),
            ("threads", args.threads),
        ] {
            if value == 0 {
                return Err(invalid(flag, &value, "must be at least 1"));
            }
        }
        if args.size.saturating_mul(args.pipeline) > MAX_BATCH_BYTES {
            let reason = format!("--size × --pipeline must be at most {MAX_BATCH_BYTES} bytes");
            let (flag, value) = if args.pipeline > 1 {
                ("pipeline", args.pipeline)
            } else {
                ("size", args.size)
            };
            return Err(invalid(flag, &value, &reason));
        }
        if args.duration.is_zero() {
            return Err(invalid(
                "duration",
                &humantime::format_duration(args.duration),
                "must be longer than zero",
            ));
        }
        let tls = match &args.tls_ca {
            Some(ca) => Some(
                net::tls_client(ca, &args.tls_name)
                    .map_err(|reason| invalid("tls-ca", &ca.display(), &reason))?,
            ),
            None => None,
        };
        let server = args
            .pid
            .map(|pid| Server::new(pid).map_err(|source| BenchError::Pid { pid, source }))
            .transpose()?;
        Ok(Config {
            mode: args.mode.or(args.mode_flag).unwrap_or(Mode::Echo),
            target: Target::new(parse_addr(&args.addr)?, tls),
            conns: args.conns,
            size: args.size,
            pipeline: args.pipeline,
            threads: args.threads,
            lines: args.lines,
            warmup: args.warmup,
            duration: args.duration,
            server,
        })
    }
}

/// `IP:PORT`, or `localhost:PORT` for 127.0.0.1.
fn parse_addr(addr: &str) -> Result<SocketAddr, BenchError> {
    let parsed = match addr.strip_prefix("localhost:") {
        Some(port) => port
            .parse()
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .ok(),
        None => addr.parse().ok(),
    };
    parsed.ok_or_else(|| BenchError::BadAddress(addr.to_string()))
}

/// Runs the benchmark the flags describe and prints its report on stdout.
pub fn main(args: BenchArgs) -> Result<(), BenchError> {
    let config = Arc::new(Config::from_args(&args)?);
    sys::raise_open_files_limit(config.conns as u64 + 64);
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
    }
    .map_err(BenchError::Runtime)?;
    let measured = runtime.block_on(measure(Arc::clone(&config)));
    let report = Report::new(&config, &measured);
    let text = if args.json {
        report.to_json()
    } else {
        report.to_text()
    };
    io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(BenchError::Output)
}

/// Runs the configured mode on the current (the generator's) runtime.
async fn measure(config: Arc<Config>) -> Measured {
    match config.mode {
        Mode::Echo => timed::run(&config, echo::worker).await,
        Mode::Connect => timed::run(&config, connect::worker).await,
        Mode::Hold => hold::run(&config).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `bench`'s flags as the command line gives them.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(line: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(line.iter().copied()))
            .expect("valid flags")
            .args
    }

    fn config_error(line: &[&str]) -> String {
        Config::from_args(&parse(line))
            .expect_err("bad configuration")
            .to_string()
    }

    #[test]
    fn durations_parse_in_human_units() {
        let args = parse(&["--duration", "500ms", "--warmup", "2s"]);
        assert_eq!(args.duration, Duration::from_millis(500));
        assert_eq!(args.warmup, Duration::from_secs(2));
        assert_eq!(
            parse(&["--duration", "1m 30s"]).duration,
            Duration::from_secs(90)
        );
        let cli = Cli::try_parse_from(["bench", "--duration", "ten"]);
        assert!(cli.is_err(), "a duration without a unit is refused");
    }

    #[test]
    fn mode_is_positional_or_a_flag_and_defaults_to_echo() {
        let mode = |line: &[&str]| Config::from_args(&parse(line)).expect("valid").mode;
        assert_eq!(mode(&[]), Mode::Echo);
        assert_eq!(mode(&["hold"]), Mode::Hold);
        assert_eq!(mode(&["--mode", "connect"]), Mode::Connect);
        assert!(Cli::try_parse_from(["bench", "hold", "--mode", "echo"]).is_err());
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            config_error(&["--conns", "0"]),
            "invalid --conns '0': must be at least 1"
        );
        assert_eq!(
            config_error(&["--size", "0"]),
            "invalid --size '0': must be at least 1"
        );
        assert_eq!(
            config_error(&["--pipeline", "0"]),
            "invalid --pipeline '0': must be at least 1"
        );
        assert_eq!(
            config_error(&["--duration", "0s"]),
            "invalid --duration '0s': must be longer than zero"
        );
        assert!(config_error(&["--pipeline", "100000", "--size", "1000"])
            .starts_with("invalid --pipeline '100000'"));
        assert_eq!(
            config_error(&["--addr", "127.0.0.1"]),
            "invalid --addr '127.0.0.1': expected IP:PORT such as 127.0.0.1:7000, or localhost:PORT"
        );
    }

    #[test]
    fn addresses_take_an_ip_or_localhost() {
        assert_eq!(
            parse_addr("localhost:7001").expect("valid"),
            SocketAddr::from(([127, 0, 0, 1], 7001))
        );
        assert_eq!(parse_addr("[::1]:80").expect("valid").port(), 80);
        assert!(parse_addr("example.org:80").is_err());
        assert!(parse_addr("localhost:http").is_err());
    }
}
