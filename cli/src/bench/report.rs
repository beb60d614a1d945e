//! A run's report: one JSON object for `--json`, or a few lines for people.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::hold::SETTLE_LIMIT;
use super::sys::Descriptors;
use super::tally::{ErrorCounts, Tally};
use super::{Config, Mode};

/// What a mode measured.
#[derive(Debug)]
pub struct Measured {
    /// Requests in the window, and the connections and errors that go with them: in
    /// the timed modes, those after the warmup; in hold mode, the whole run's.
    pub tally: Tally,
    /// What the warmup counted, kept apart from `tally` (empty in hold mode).
    pub warmup: Tally,
    /// The window in which requests were counted.
    pub window: Duration,
    /// The server's CPU time when the window opened, with `--pid`.
    pub cpu_before: Option<Duration>,
    /// The server's CPU time when the window closed, with `--pid`.
    pub cpu_after: Option<Duration>,
    /// The server's memory and sockets around the hold (hold, with `--pid`).
    pub memory: Option<Memory>,
}

/// What hold mode reads of the server with `--pid`: before its first connect, and at
/// the end of the hold with every connection of the run open, once the server has
/// accepted them all (or has had as long as hold mode waits for that). A reading is
/// `None` when `/proc` could not give it.
#[derive(Debug, Default)]
pub struct Memory {
    /// The server's resident memory before, in bytes.
    pub rss_before: Option<u64>,
    /// The server's resident memory after, in bytes.
    pub rss_after: Option<u64>,
    /// The server's descriptors before.
    pub fds_before: Option<Descriptors>,
    /// The server's descriptors after.
    pub fds_after: Option<Descriptors>,
    /// The run's connections that failed to open.
    pub open_failures: u64,
}

impl Memory {
    /// The server's memory per connection that this run added to it: the growth of
    /// its resident memory over the connections the run opened, or why that cannot be
    /// measured.
    ///
    /// The run opened `opened` connections. They are taken to be the ones the server
    /// added only if none failed to open and, when its descriptors could be read, its
    /// sockets grew by exactly that many: it had accepted them all, and no other
    /// connection came or went. Connections the server held before the run are then in
    /// both readings and cancel out. The growth says nothing of a connection's cost if
    /// the server's memory did not grow.
    ///
    /// A caveat that cannot be checked from outside: a server that has closed
    /// connections before the run may hand their freed memory to the new ones, which
    /// then seem to cost less than they do; the figure is best taken on a freshly
    /// started server.
    fn per_conn(&self, opened: u64) -> Result<f64, String> {
        let (Some(before), Some(after)) = (self.rss_before, self.rss_after) else {
            return Err("the server's memory could not be read".to_string());
        };
        if self.open_failures > 0 {
            return Err(format!(
                "{} of the run's connections failed to open, so how many the server added is not known",
                self.open_failures
            ));
        }
        if opened == 0 {
            return Err("the run opened no connection".to_string());
        }
        if let (Some(fds_before), Some(fds_after)) = (self.fds_before, self.fds_after) {
            let (sockets_before, sockets_after) = (fds_before.sockets, fds_after.sockets);
            if sockets_after.checked_sub(sockets_before) != Some(opened) {
                return Err(format!(
                    "the server's open sockets went from {sockets_before} to {sockets_after} \
                     while the run opened {opened} connections: it had not accepted them all \
                     {} after the hold, or other connections came or went",
                    humantime::format_duration(SETTLE_LIMIT)
                ));
            }
        }
        if after <= before {
            return Err(format!(
                "the server's memory did not grow ({} before, {} after): it reused memory it \
                 already had, or gave some back",
                bytes(before as f64),
                bytes(after as f64)
            ));
        }
        Ok((after - before) as f64 / opened as f64)
    }
}

/// What the warmup counted, under the field names `--json` documents.
#[derive(Debug, Serialize)]
struct Warmup {
    /// Messages echoed and checked in the warmup.
    requests: u64,
    /// Errors in the warmup, by kind.
    errors: ErrorCounts,
    /// All of them.
    errors_total: u64,
    /// Connections established in the warmup.
    connections_opened: u64,
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
    /// Errors after the warmup (hold: over the whole run), by kind.
    errors: ErrorCounts,
    /// All errors after the warmup.
    errors_total: u64,
    /// Connections established after the warmup (hold: over the whole run).
    connections_opened: u64,
    /// What the warmup counted, apart from the numbers above.
    warmup: Warmup,
    /// The server's CPU time in the window per request, in microseconds.
    server_cpu_us_per_request: Option<f64>,
    /// The server's resident memory before the first connect, in bytes (hold).
    server_rss_before_bytes: Option<u64>,
    /// The server's resident memory with every connection open, in bytes (hold).
    server_rss_after_bytes: Option<u64>,
    /// The server's open sockets before the first connect (hold).
    server_sockets_before: Option<u64>,
    /// The server's open sockets with every connection open (hold).
    server_sockets_after: Option<u64>,
    /// The server's memory per connection the run added to it, in bytes (hold).
    server_rss_per_conn_bytes: Option<f64>,
    /// Why `server_rss_per_conn_bytes` is null; null when it is a number.
    server_rss_per_conn_unmeasured: Option<String>,
    /// Whether the server's memory was read (hold, with `--pid`), for the text.
    #[serde(skip)]
    memory_read: bool,
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
        let memory = measured.memory.as_ref();
        let per_conn = match (config.mode, memory) {
            (Mode::Hold, Some(memory)) => memory.per_conn(tally.opened),
            (Mode::Hold, None) => Err("no --pid".to_string()),
            _ => Err("only hold mode measures memory per connection".to_string()),
        };
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
            warmup: Warmup {
                requests: measured.warmup.requests(),
                errors: measured.warmup.errors,
                errors_total: measured.warmup.errors.total(),
                connections_opened: measured.warmup.opened,
            },
            server_cpu_us_per_request: server_cpu
                .filter(|_| requests > 0)
                .map(|cpu| cpu.as_secs_f64() * 1e6 / requests as f64),
            server_rss_before_bytes: memory.and_then(|m| m.rss_before),
            server_rss_after_bytes: memory.and_then(|m| m.rss_after),
            server_sockets_before: memory.and_then(|m| m.fds_before).map(|fds| fds.sockets),
            server_sockets_after: memory.and_then(|m| m.fds_after).map(|fds| fds.sockets),
            server_rss_per_conn_bytes: per_conn.as_ref().ok().copied(),
            server_rss_per_conn_unmeasured: per_conn.err(),
            memory_read: config.mode == Mode::Hold && memory.is_some(),
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
        line("errors", errors_text(&self.errors));
        let after_warmup = if self.warmup_secs > 0.0 {
            " after the warmup"
        } else {
            ""
        };
        line(
            "connections",
            format!("{} opened{after_warmup}", self.connections_opened),
        );
        if self.warmup_secs > 0.0 {
            line(
                "warmup",
                format!(
                    "{} requests, {} connections opened, errors {}; none counted above",
                    self.warmup.requests,
                    self.warmup.connections_opened,
                    errors_text(&self.warmup.errors)
                ),
            );
        }
        if let Some(cpu) = self.server_cpu_us_per_request {
            line("server CPU", format!("{cpu:.2} µs per request"));
        }
        if self.memory_read {
            let mut memory = String::new();
            if let (Some(before), Some(after)) =
                (self.server_rss_before_bytes, self.server_rss_after_bytes)
            {
                memory = format!(
                    "{} before, {} after",
                    bytes(before as f64),
                    bytes(after as f64)
                );
            }
            if let (Some(before), Some(after)) =
                (self.server_sockets_before, self.server_sockets_after)
            {
                let _ = write!(memory, ", sockets {before} before, {after} after");
            }
            if !memory.is_empty() {
                memory.push_str(": ");
            }
            match (
                self.server_rss_per_conn_bytes,
                &self.server_rss_per_conn_unmeasured,
            ) {
                (Some(per_conn), _) => {
                    let _ = write!(memory, "{} per connection added", bytes(per_conn));
                }
                (None, why) => {
                    let why = why.as_deref().unwrap_or("unknown");
                    let _ = write!(memory, "per connection not measurable: {why}");
                }
            }
            line("server memory", memory);
        }
        text
    }
}

/// The nonzero counts of `errors`, or `none`.
fn errors_text(errors: &ErrorCounts) -> String {
    let named: Vec<String> = errors
        .named()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    if named.is_empty() {
        "none".to_string()
    } else {
        named.join(", ")
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
            target: Target::new(SocketAddr::from(([127, 0, 0, 1], 7000)), None),
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

    fn fds(sockets: u64) -> Option<Descriptors> {
        Some(Descriptors { sockets })
    }

    /// A server that held 10 sockets and 1 MiB, and grew by the run's 2 connections and
    /// 8 KiB.
    fn memory() -> Memory {
        Memory {
            rss_before: Some(1 << 20),
            rss_after: Some((1 << 20) + 8192),
            fds_before: fds(10),
            fds_after: fds(12),
            open_failures: 0,
        }
    }

    fn measured() -> Measured {
        let mut tally = Tally::new();
        for micros in 1..=1000 {
            tally.request(Duration::from_micros(micros));
        }
        tally.opened = 2;
        tally.failed(Failure::Reset);
        let mut warmup = Tally::new();
        for _ in 0..300 {
            warmup.request(Duration::from_micros(50));
        }
        warmup.opened = 3;
        warmup.failed(Failure::Eof);
        warmup.failed(Failure::Refused);
        Measured {
            tally,
            warmup,
            window: Duration::from_secs(2),
            cpu_before: Some(Duration::from_millis(10)),
            cpu_after: Some(Duration::from_millis(30)),
            memory: Some(memory()),
        }
    }

    fn report_json(mode: Mode, measured: &Measured) -> serde_json::Value {
        let report = Report::new(&config(mode), measured);
        serde_json::from_str(&report.to_json()).expect("valid JSON")
    }

    #[test]
    fn json_has_the_documented_fields() {
        let json = report_json(Mode::Hold, &measured());
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
            "warmup",
            "server_cpu_us_per_request",
            "server_rss_before_bytes",
            "server_rss_after_bytes",
            "server_sockets_before",
            "server_sockets_after",
            "server_rss_per_conn_bytes",
            "server_rss_per_conn_unmeasured",
        ];
        fields.sort_unstable();
        documented.sort_unstable();
        assert_eq!(fields, documented);
        let mut warmup_fields: Vec<&str> = json["warmup"]
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        warmup_fields.sort_unstable();
        assert_eq!(
            warmup_fields,
            ["connections_opened", "errors", "errors_total", "requests"]
        );
        assert_eq!(json["mode"], "hold");
        assert_eq!(json["addr"], "127.0.0.1:7000");
        assert_eq!(json["requests"], 1000);
        assert_eq!(json["requests_per_sec"], 500.0);
        assert_eq!(json["echoed_bytes"], 100_000);
        assert_eq!(json["latency_p50_us"], 500);
        assert_eq!(json["latency_max_us"], 1000);
        assert_eq!(json["errors"]["reset"], 1);
        assert_eq!(json["errors_total"], 1);
        assert_eq!(json["connections_opened"], 2);
        assert_eq!(json["server_cpu_us_per_request"], 20.0);
        assert_eq!(json["server_sockets_before"], 10);
        assert_eq!(json["server_sockets_after"], 12);
        assert_eq!(json["server_rss_per_conn_bytes"], 4096.0);
        assert_eq!(
            json["server_rss_per_conn_unmeasured"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn the_warmup_is_counted_apart() {
        let json = report_json(Mode::Echo, &measured());
        assert_eq!(json["requests"], 1000, "the window's only");
        assert_eq!(json["echoed_bytes"], 100_000);
        assert_eq!(json["errors_total"], 1);
        assert_eq!(json["connections_opened"], 2);
        assert_eq!(json["warmup"]["requests"], 300);
        assert_eq!(json["warmup"]["errors"]["eof"], 1);
        assert_eq!(json["warmup"]["errors"]["refused"], 1);
        assert_eq!(json["warmup"]["errors_total"], 2);
        assert_eq!(json["warmup"]["connections_opened"], 3);
    }

    #[test]
    fn memory_per_connection_is_the_growth_over_the_connections_added() {
        // The server held 10 sockets before: only the run's 2 share the 8 KiB.
        assert_eq!(memory().per_conn(2), Ok(4096.0));
        // Without its sockets, the run's connections are taken as the ones added.
        let uncounted = Memory {
            fds_before: None,
            fds_after: None,
            ..memory()
        };
        assert_eq!(uncounted.per_conn(2), Ok(4096.0));
    }

    #[test]
    fn memory_per_connection_is_unmeasured_when_the_delta_says_nothing() {
        let why = |memory: Memory, opened| memory.per_conn(opened).expect_err("unmeasured");
        assert!(why(memory(), 0).contains("no connection"));
        let failed = Memory {
            open_failures: 1,
            ..memory()
        };
        assert!(why(failed, 1).contains("1 of the run's connections failed to open"));
        let not_accepted = Memory {
            fds_after: fds(11),
            ..memory()
        };
        assert_eq!(
            why(not_accepted, 2),
            "the server's open sockets went from 10 to 11 while the run opened 2 \
             connections: it had not accepted them all 10s after the hold, or other \
             connections came or went"
        );
        let others_left = Memory {
            fds_after: fds(9),
            ..memory()
        };
        assert!(why(others_left, 2).contains("went from 10 to 9"));
        let shrank = Memory {
            rss_after: Some((1 << 20) - 4096),
            ..memory()
        };
        assert_eq!(
            why(shrank, 2),
            "the server's memory did not grow (1.0 MiB before, 1020.0 KiB after): it \
             reused memory it already had, or gave some back"
        );
        let same = Memory {
            rss_after: Some(1 << 20),
            ..memory()
        };
        assert!(why(same, 2).contains("did not grow"));
        let unread = Memory {
            rss_after: None,
            ..memory()
        };
        assert_eq!(why(unread, 2), "the server's memory could not be read");
    }

    #[test]
    fn memory_per_connection_is_null_with_its_reason_in_json_and_text() {
        let mut run = measured();
        run.memory = Some(Memory {
            rss_after: Some(1 << 19),
            ..memory()
        });
        let json = report_json(Mode::Hold, &run);
        assert_eq!(json["server_rss_per_conn_bytes"], serde_json::Value::Null);
        assert!(json["server_rss_per_conn_unmeasured"]
            .as_str()
            .expect("a reason")
            .starts_with("the server's memory did not grow"));
        let text = Report::new(&config(Mode::Hold), &run).to_text();
        assert!(
            text.contains(
                "server memory 1.0 MiB before, 512.0 KiB after, sockets 10 before, 12 after: \
                 per connection not measurable: the server's memory did not grow"
            ),
            "{text}"
        );
        // Other modes, and hold without --pid, say why in JSON and nothing in the text.
        run.memory = None;
        assert_eq!(
            report_json(Mode::Hold, &run)["server_rss_per_conn_unmeasured"],
            "no --pid"
        );
        assert_eq!(
            report_json(Mode::Echo, &run)["server_rss_per_conn_unmeasured"],
            "only hold mode measures memory per connection"
        );
        let text = Report::new(&config(Mode::Hold), &run).to_text();
        assert!(!text.contains("server memory"), "{text}");
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
            text.contains("connections   2 opened after the warmup\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "warmup        300 requests, 3 connections opened, errors refused 1, eof 1; \
                 none counted above\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("server CPU    20.00 µs per request\n"),
            "{text}"
        );
        assert!(!text.contains("server memory"), "{text}");
        let text = Report::new(&config(Mode::Hold), &measured()).to_text();
        assert!(text.contains("connections   2 opened\n"), "{text}");
        assert!(!text.contains("warmup "), "{text}");
        assert!(
            text.contains(
                "server memory 1.0 MiB before, 1.0 MiB after, sockets 10 before, 12 after: \
                 4.0 KiB per connection added\n"
            ),
            "{text}"
        );
    }
}
