//! A run's report: one JSON object for `--json`, or a few lines for people.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::tally::{ErrorCounts, Tally};
use super::{Config, Mode};

/// What a mode measured.
#[derive(Debug)]
pub struct Measured {
    /// Requests in the window, connections and errors.
    pub tally: Tally,
    /// The window in which requests were counted.
    pub window: Duration,
    /// The server's CPU time when the window opened, with `--pid`.
    pub cpu_before: Option<Duration>,
    /// The server's CPU time when the window closed, with `--pid`.
    pub cpu_after: Option<Duration>,
    /// The server's resident memory before the first connect (hold, with `--pid`).
    pub rss_before: Option<u64>,
    /// The server's resident memory at the end of the hold, with every connection open
    /// (hold, with `--pid`).
    pub rss_after: Option<u64>,
}

/// The numbers of a run, under the field names `--json` documents.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The mode.
    mode: Mode,
    /// The server's address.
    addr: SocketAddr,
    /// `--conns`.
    conns: usize,
    /// `--size`.
    size: usize,
    /// `--pipeline`.
    pipeline: usize,
    /// `--threads`.
    threads: usize,
    /// The warmup, in seconds (0 in hold mode, which has none).
    warmup_secs: f64,
    /// The window in which requests were counted, in seconds.
    window_secs: f64,
    /// Messages echoed and checked in the window.
    requests: u64,
    /// Requests per second of the window.
    requests_per_sec: f64,
    /// Bytes echoed and checked in the window; as many were sent.
    echoed_bytes: u64,
    /// Echoed bytes per second of the window, one direction.
    echoed_bytes_per_sec: f64,
    /// Median latency, in microseconds.
    latency_p50_us: u64,
    /// 99th percentile latency, in microseconds.
    latency_p99_us: u64,
    /// 99.9th percentile latency, in microseconds.
    latency_p999_us: u64,
    /// Largest latency, in microseconds.
    latency_max_us: u64,
    /// Errors over the whole run, by kind.
    errors: ErrorCounts,
    /// All errors.
    errors_total: u64,
    /// Connections established over the whole run.
    connections_opened: u64,
    /// The server's CPU time in the window per request, in microseconds.
    server_cpu_us_per_request: Option<f64>,
    /// The server's resident memory before the first connect, in bytes (hold).
    server_rss_before_bytes: Option<u64>,
    /// The server's resident memory with every connection open, in bytes (hold).
    server_rss_after_bytes: Option<u64>,
    /// The server's resident memory per open connection, in bytes (hold).
    server_rss_per_conn_bytes: Option<f64>,
}

impl Report {
    /// The report of `measured`, a run of `config`.
    pub fn new(config: &Config, measured: &Measured) -> Self {
        let tally = &measured.tally;
        let latency = &tally.latency;
        let window_secs = measured.window.as_secs_f64();
        let per_sec = |count: u64| {
            if window_secs > 0.0 {
                count as f64 / window_secs
            } else {
                0.0
            }
        };
        let requests = tally.requests();
        let echoed_bytes = requests * config.size as u64;
        let server_cpu = measured
            .cpu_after
            .zip(measured.cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        let rss = measured.rss_before.zip(measured.rss_after);
        Report {
            mode: config.mode,
            addr: config.target.addr(),
            conns: config.conns,
            size: config.size,
            pipeline: config.pipeline,
            threads: config.threads,
            warmup_secs: if config.mode == Mode::Hold {
                0.0
            } else {
                config.warmup.as_secs_f64()
            },
            window_secs,
            requests,
            requests_per_sec: per_sec(requests),
            echoed_bytes,
            echoed_bytes_per_sec: per_sec(echoed_bytes),
            latency_p50_us: latency.value_at_quantile(0.5),
            latency_p99_us: latency.value_at_quantile(0.99),
            latency_p999_us: latency.value_at_quantile(0.999),
            latency_max_us: latency.max(),
            errors: tally.errors,
            errors_total: tally.errors.total(),
            connections_opened: tally.opened,
            server_cpu_us_per_request: server_cpu
                .filter(|_| requests > 0)
                .map(|cpu| cpu.as_secs_f64() * 1e6 / requests as f64),
            server_rss_before_bytes: measured.rss_before,
            server_rss_after_bytes: measured.rss_after,
            server_rss_per_conn_bytes: rss
                .filter(|_| tally.opened > 0)
                .map(|(before, after)| (after as f64 - before as f64) / tally.opened as f64),
        }
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string(self).expect("a report has only plain fields");
        json.push('\n');
        json
    }

    /// The report as a few lines for people.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(text, "{label:<14}{value}");
        };
        let threads = if self.threads == 1 {
            "1 thread".to_string()
        } else {
            format!("{} threads", self.threads)
        };
        line(
            &format!("{:?}", self.mode).to_lowercase(),
            format!(
                "{}, {} connections, {}-byte messages, pipeline {}, {threads}",
                self.addr, self.conns, self.size, self.pipeline
            ),
        );
        let window = humantime::format_duration(Duration::from_millis(
            (self.window_secs * 1e3).round() as u64,
        ));
        line(
            "window",
            match self.mode {
                Mode::Hold => format!("{window}: one exchange on each connection, after the hold"),
                _ => format!(
                    "{window}, after {} warmup",
                    humantime::format_duration(Duration::from_secs_f64(self.warmup_secs))
                ),
            },
        );
        line(
            "requests",
            format!("{} ({:.0}/s)", self.requests, self.requests_per_sec),
        );
        line(
            "echoed bytes",
            format!(
                "{} ({}/s each way)",
                bytes(self.echoed_bytes as f64),
                bytes(self.echoed_bytes_per_sec)
            ),
        );
        line(
            "latency (µs)",
            format!(
                "p50 {}, p99 {}, p99.9 {}, max {}",
                self.latency_p50_us, self.latency_p99_us, self.latency_p999_us, self.latency_max_us
            ),
        );
        let errors: Vec<String> = self
            .errors
            .named()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        line(
            "errors",
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors.join(", ")
            },
        );
        line("connections", format!("{} opened", self.connections_opened));
        if let Some(cpu) = self.server_cpu_us_per_request {
            line("server CPU", format!("{cpu:.2} µs per request"));
        }
        if let (Some(before), Some(after)) =
            (self.server_rss_before_bytes, self.server_rss_after_bytes)
        {
            let per_conn = self
                .server_rss_per_conn_bytes
                .map_or("-".to_string(), bytes);
            line(
                "server memory",
                format!(
                    "{} before, {} after: {per_conn} per connection",
                    bytes(before as f64),
                    bytes(after as f64)
                ),
            );
        }
        text
    }
}

/// `n` bytes in B, KiB, MiB or GiB, whichever reads best.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[0])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::super::net::{Failure, Target};
    use super::*;

    fn config(mode: Mode) -> Config {
        Config {
            mode,
            target: Target::new(SocketAddr::from(([127, 0, 0, 1], 7000))),
            conns: 2,
            size: 100,
            pipeline: 1,
            threads: 1,
            lines: false,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            server: None,
        }
    }

    fn measured() -> Measured {
        let mut tally = Tally::new();
        for micros in 1..=1000 {
            tally.request(Duration::from_micros(micros));
        }
        tally.opened = 2;
        tally.failed(Failure::Reset);
        Measured {
            tally,
            window: Duration::from_secs(2),
            cpu_before: Some(Duration::from_millis(10)),
            cpu_after: Some(Duration::from_millis(30)),
            rss_before: Some(1 << 20),
            rss_after: Some((1 << 20) + 8192),
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let report = Report::new(&config(Mode::Hold), &measured());
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("valid JSON");
        let mut fields: Vec<&str> = json
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut documented = [
            "mode",
            "addr",
            "conns",
            "size",
            "pipeline",
            "threads",
            "warmup_secs",
            "window_secs",
            "requests",
            "requests_per_sec",
            "echoed_bytes",
            "echoed_bytes_per_sec",
            "latency_p50_us",
            "latency_p99_us",
            "latency_p999_us",
            "latency_max_us",
            "errors",
            "errors_total",
            "connections_opened",
            "server_cpu_us_per_request",
            "server_rss_before_bytes",
            "server_rss_after_bytes",
            "server_rss_per_conn_bytes",
        ];
        fields.sort_unstable();
        documented.sort_unstable();
        assert_eq!(fields, documented);
        assert_eq!(json["mode"], "hold");
        assert_eq!(json["addr"], "127.0.0.1:7000");
        assert_eq!(json["requests"], 1000);
        assert_eq!(json["requests_per_sec"], 500.0);
        assert_eq!(json["echoed_bytes"], 100_000);
        assert_eq!(json["latency_p50_us"], 500);
        assert_eq!(json["latency_max_us"], 1000);
        assert_eq!(json["errors"]["reset"], 1);
        assert_eq!(json["errors_total"], 1);
        assert_eq!(json["server_cpu_us_per_request"], 20.0);
        assert_eq!(json["server_rss_per_conn_bytes"], 4096.0);
    }

    #[test]
    fn text_names_the_numbers() {
        let text = Report::new(&config(Mode::Echo), &measured()).to_text();
        assert!(
            text.starts_with("echo          127.0.0.1:7000, 2 connections, 100-byte messages"),
            "{text}"
        );
        assert!(
            text.contains("window        2s, after 1s warmup\n"),
            "{text}"
        );
        assert!(text.contains("requests      1000 (500/s)\n"), "{text}");
        assert!(
            text.contains("echoed bytes  97.7 KiB (48.8 KiB/s each way)\n"),
            "{text}"
        );
        assert!(text.contains("errors        reset 1\n"), "{text}");
        assert!(
            text.contains("server CPU    20.00 µs per request\n"),
            "{text}"
        );
        assert!(
            text.contains("server memory 1.0 MiB before, 1.0 MiB after: 4.0 KiB per connection\n"),
            "{text}"
        );
    }
}
