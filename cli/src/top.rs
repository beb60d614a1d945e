//! `linedancer top`: a terminal view of a running server's admin endpoint, refreshed
//! every second, like `top`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Flags of `linedancer top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The admin endpoint of the server to watch (`serve --admin`), as HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:9100", value_name = "ADDR")]
    admin: String,
    /// A file holding the admin endpoint's token, if it has one.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// How often to refresh.
    #[arg(long, default_value = "1s", value_name = "D")]
    interval: humantime::Duration,
    /// Print one view (rates over one interval) and exit, instead of refreshing.
    #[arg(long)]
    once: bool,
    /// How many of the slowest readers to list.
    #[arg(long, default_value_t = 10, value_name = "N")]
    slowest: usize,
}

/// Why `top` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The token file cannot be read.
    #[error("invalid --admin-token-file {path}: {reason}", path = path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The admin endpoint cannot be reached, or answers with an error.
    #[error("admin endpoint {addr}: {reason}")]
    Endpoint {
        /// Its address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// `--interval 0s`.
    #[error("invalid --interval 0s: must be above zero")]
    NoInterval,
    /// The runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs `top` until interrupted (or once, with `--once`).
pub fn main(args: TopArgs) -> Result<(), TopError> {
    if args.interval.is_zero() {
        return Err(TopError::NoInterval);
    }
    let token = match &args.admin_token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| TopError::Token {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Some(text.trim().to_owned())
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TopError::Runtime)?;
    runtime.block_on(run(&args, token.as_deref()))
}

/// One reading of the endpoint.
struct Reading {
    stats: Value,
    slowest: Value,
    at: Instant,
}

async fn run(args: &TopArgs, token: Option<&str>) -> Result<(), TopError> {
    let client = Client {
        addr: &args.admin,
        token,
    };
    let read = || async {
        let stats = client.get("/stats").await?;
        let slowest = client
            .get(&format!("/connections?sort=queued&limit={}", args.slowest))
            .await?;
        Ok::<_, TopError>(Reading {
            stats,
            slowest,
            at: Instant::now(),
        })
    };
    let mut last = read().await?;
    loop {
        tokio::time::sleep(*args.interval).await;
        let now = read().await?;
        let view = render(&args.admin, &last, &now);
        if args.once {
            print!("{view}");
            return Ok(());
        }
        // Clear the screen, then draw from the top.
        print!("\x1b[2J\x1b[H{view}");
        last = now;
    }
}

/// The view of two readings: totals from the second, rates between them.
fn render(addr: &str, before: &Reading, now: &Reading) -> String {
    let (stats, slowest) = (&now.stats, &now.slowest);
    let seconds = (now.at - before.at).as_secs_f64().max(0.001);
    let count = |value: &Value, key: &str| value[key].as_u64().unwrap_or(0);
    let rate = |key: &str| {
        let delta = count(stats, key).saturating_sub(count(&before.stats, key));
        human(delta as f64 / seconds)
    };
    let mut view = String::new();
    let uptime = Duration::from_secs_f64(stats["uptime_seconds"].as_f64().unwrap_or(0.0));
    let uptime = humantime::format_duration(Duration::from_secs(uptime.as_secs()));
    let _ = writeln!(
        view,
        "linedancer at {addr}: {}, up {uptime}",
        stats["health"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        view,
        "open {} of {} (peak {})   accepted {} ({}/s)   closed {} ({}/s)",
        count(stats, "open"),
        count(stats, "max_connections"),
        count(stats, "peak"),
        count(stats, "accepted"),
        rate("accepted"),
        count(stats, "closed_total"),
        rate("closed_total"),
    );
    let _ = writeln!(
        view,
        "frames in {} ({}/s)   replies out {} ({}/s)   bytes in {} ({}/s)   out {} ({}/s)",
        count(stats, "frames_in"),
        rate("frames_in"),
        count(stats, "replies_out"),
        rate("replies_out"),
        count(stats, "bytes_in"),
        rate("bytes_in"),
        count(stats, "bytes_out"),
        rate("bytes_out"),
    );
    let _ = writeln!(
        view,
        "accept errors {}   limit waits {}",
        count(stats, "accept_errors"),
        count(stats, "limit_waits")
    );
    let pairs = |value: &Value| -> String {
        let mut pairs: Vec<(String, u64)> = (value.as_object().into_iter().flatten())
            .map(|(key, n)| (key.clone(), n.as_u64().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let text: Vec<String> = pairs.iter().map(|(key, n)| format!("{key} {n}")).collect();
        if text.is_empty() {
            "none".into()
        } else {
            text.join(", ")
        }
    };
    let _ = writeln!(view, "states: {}", pairs(&stats["states"]));
    let _ = writeln!(view, "closed: {}", pairs(&stats["closed"]));
    for alarm in stats["alarms"].as_array().into_iter().flatten() {
        let _ = writeln!(
            view,
            "alarm {}: {:.2} (threshold {}){}",
            alarm["alarm"].as_str().unwrap_or("?"),
            alarm["value"].as_f64().unwrap_or(0.0),
            alarm["threshold"],
            if alarm["firing"].as_bool() == Some(true) {
                "  FIRING"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(view, "\nslowest readers (most output queued):");
    let _ = writeln!(
        view,
        "{:>8}  {:<24} {:<14} {:>10} {:>8} {:>10}",
        "id", "peer", "state", "queued", "mailbox", "age"
    );
    for connection in slowest["connections"].as_array().into_iter().flatten() {
        let _ = writeln!(
            view,
            "{:>8}  {:<24} {:<14} {:>10} {:>8} {:>9.1}s",
            count(connection, "id"),
            connection["peer"].as_str().unwrap_or("?"),
            connection["state"].as_str().unwrap_or(""),
            count(connection, "output_queued"),
            count(connection, "mailbox"),
            connection["age_seconds"].as_f64().unwrap_or(0.0),
        );
    }
    view
}

/// A count per second, rounded: `12`, `3.4K`, `1.2M`.
fn human(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}K", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// Reads JSON from the admin endpoint.
struct Client<'a> {
    addr: &'a str,
    token: Option<&'a str>,
}

impl Client<'_> {
    async fn get(&self, path: &str) -> Result<Value, TopError> {
        let failed = |reason: String| TopError::Endpoint {
            addr: self.addr.to_owned(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(connection);
        let mut request = Request::get(path).header("host", self.addr);
        if let Some(token) = self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let body = (response.into_body().collect().await)
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(failed(format!("{status}: {}", text.trim())));
        }
        serde_json::from_slice(&body).map_err(|e| failed(format!("not JSON: {e}")))
    }
}
