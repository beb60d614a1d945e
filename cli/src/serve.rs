//! `linedancer serve`: runs an example protocol until a signal asks it to stop.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use clap::Args;
use linedancer::examples::{Echo, Handshake};
use linedancer::{Server, ServerHandle};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// The protocols `serve` knows, by the name given on the command line.
const PROTOCOLS: &[&str] = &["echo", "handshake"];

/// Flags of `linedancer serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The protocol to serve: echo or handshake.
    protocol: String,
    /// The IP address to listen on.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    bind: String,
    /// The port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = linedancer::DEFAULT_PORT, value_name = "N")]
    port: u16,
}

/// Why `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The protocol name is not one of [`PROTOCOLS`].
    #[error("unknown protocol '{0}' (expected one of: {list})", list = PROTOCOLS.join(", "))]
    UnknownProtocol(String),
    /// `--bind` is not an IP address.
    #[error("invalid bind address '{0}': expected an IP address such as 127.0.0.1 or ::1")]
    BadAddress(String),
    /// The server did not start.
    #[error(transparent)]
    Start(#[from] linedancer::Error),
    /// The signal handlers could not be installed.
    #[error("cannot install the signal handlers: {0}")]
    Signals(io::Error),
}

/// Serves until Ctrl-C or SIGTERM, then shuts down gracefully; a second signal closes
/// the connections still open at once.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let ip = match args.bind.as_str() {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        other => other
            .parse()
            .map_err(|_| ServeError::BadAddress(args.bind.clone()))?,
    };
    let mut signals = Signals::new().map_err(ServeError::Signals)?;
    let builder = Server::builder().bind(ip).port(args.port);
    let server = match args.protocol.as_str() {
        "echo" => builder.protocol::<Echo>().start().await?,
        "handshake" => builder.protocol::<Handshake>().start().await?,
        _ => return Err(ServeError::UnknownProtocol(args.protocol)),
    };
    eprintln!("listening on {}", server.local_addr());

    signals.next().await;
    info!("shutting down; a second signal closes every connection at once");
    stop(&server, &mut signals).await;
    Ok(())
}

/// Drains the server, cutting the drain short on another signal.
async fn stop(server: &ServerHandle, signals: &mut Signals) {
    tokio::select! {
        _report = server.shutdown() => {}
        () = signals.next() => {
            server.shutdown_with_timeout(Duration::ZERO).await;
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, installed before the server starts so that none is
/// missed.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next signal of either kind.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
