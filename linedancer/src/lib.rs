//! Non-blocking TCP servers in which every connection runs a protocol state machine
//! that you write.
//!
//! linedancer accepts connections, gives each its own task that owns the socket, frames
//! the bytes with a codec, and feeds the frames to your [`Protocol`]: a plain Rust value,
//! usually an enum of states, whose synchronous callbacks queue replies and pick the
//! next state. Limits, timeouts and graceful shutdown are the server's job, not yours.
//!
//! ```
//! use linedancer::codec::Lines;
//! use linedancer::{Ctx, Next, Protocol, Server};
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//!
//! /// Shouts every line back.
//! struct Shout;
//!
//! impl Protocol for Shout {
//!     type Codec = Lines;
//!     type Reply = String;
//!     type Message = ();
//!
//!     fn connect(_ctx: &mut Ctx<'_, Self>) -> Self {
//!         Shout
//!     }
//!
//!     fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
//!         ctx.send(line.to_uppercase());
//!         Next::Continue
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let server = Server::builder().port(0).protocol::<Shout>().start().await?;
//!
//!     let stream = tokio::net::TcpStream::connect(server.local_addr()).await?;
//!     let (reader, mut writer) = stream.into_split();
//!     writer.write_all(b"g`day\n").await?;
//!     let mut reply = String::new();
//!     BufReader::new(reader).read_line(&mut reply).await?;
//!     assert_eq!(reply, "G`DAY\n");
//!
//!     drop(writer);
//!     server.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # Shared state
//!
//! A value given once to the builder ([`Builder::state`]) is reachable from every
//! connection's callbacks with [`Ctx::state`], with its type checked by the compiler:
//! a protocol that uses it implements [`Protocol<S>`](Protocol) for its `S`; one that
//! needs none implements `Protocol` as above. Here every connection shares a counter:
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//!
//! use linedancer::codec::Lines;
//! use linedancer::{Ctx, Next, Protocol, Server};
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//!
//! /// Numbers every line said on the server, whoever said it.
//! struct Ticker;
//!
//! impl Protocol<AtomicUsize> for Ticker {
//!     type Codec = Lines;
//!     type Reply = String;
//!     type Message = ();
//!
//!     fn connect(_ctx: &mut Ctx<'_, Self, AtomicUsize>) -> Self {
//!         Ticker
//!     }
//!
//!     fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self, AtomicUsize>) -> Next {
//!         let n = ctx.state().fetch_add(1, Ordering::Relaxed) + 1;
//!         ctx.send(format!("{n}: {line}"));
//!         Next::Continue
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let lines = Arc::new(AtomicUsize::new(0));
//!     let server = Server::builder()
//!         .port(0)
//!         .state(Arc::clone(&lines))
//!         .protocol::<Ticker>()
//!         .start()
//!         .await?;
//!
//!     for said in ["one", "two"] {
//!         let stream = tokio::net::TcpStream::connect(server.local_addr()).await?;
//!         let mut stream = BufReader::new(stream);
//!         stream.get_mut().write_all(format!("{said}\n").as_bytes()).await?;
//!         let mut reply = String::new();
//!         stream.read_line(&mut reply).await?;
//!         println!("{reply}"); // "1: one", then "2: two" from the second connection
//!     }
//!     assert_eq!(lines.load(Ordering::Relaxed), 2);
//!     server.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # Any byte stream
//!
//! The server's listener hands its protocol TCP sockets, but the driver and
//! [`Handler`]s take any [`Stream`]: [`ServerHandle::serve`] serves a Unix socket, a TLS
//! stream or one end of [`tokio::io::duplex`] as one more connection of a running
//! server, with the peer's [`Address`] (an IP address, `unix`, or none).
//!
//! # TLS and the PROXY protocol
//!
//! [`Builder::tls`] puts TLS (rustls) in front of every connection, with certificates
//! from PEM files chosen by the client's SNI name ([`TlsConfig`]), reloaded by
//! [`ServerHandle::reload_tls`] or SIGHUP; [`Builder::proxy_protocol`] makes every
//! connection start with a PROXY header from a trusted load balancer
//! ([`ProxyProtocol`]), whose client address becomes the peer's. The protocol reads
//! plain bytes either way, and sees the handshake's outcome with [`Ctx::tls`] and the
//! header with [`Ctx::proxy_header`]. Both have timeouts and a cap on connections
//! opening at once; a connection that fails to open never reaches the protocol and is
//! counted ([`CloseReason::TlsHandshake`], [`CloseReason::ProxyHeader`]).
//!
//! # Logging
//!
//! The library logs through [`tracing`], and emits nothing unless the program installs
//! a subscriber. At `info` it says when a server listens and stops, and when its
//! connection limit or accepting changes; at `warn`, accept errors and connections
//! ended by a panic; at `debug`, every connection accepted and closed, with why. Each
//! connection's lines are in a span named `conn` with its `id`, `peer`, protocol
//! `state` and close `reason`. To see them, with `tracing-subscriber`:
//!
//! ```no_run
//! // RUST_LOG=linedancer=debug shows each connection; the default here is info.
//! tracing_subscriber::fmt()
//!     .with_env_filter(
//!         tracing_subscriber::EnvFilter::try_from_default_env()
//!             .unwrap_or_else(|_| "info".into()),
//!     )
//!     .init();
//! ```
//!
//! # Modules
//!
//! - [`Server`] and [`Builder`] start a server; [`ServerHandle`] controls a running one,
//!   and [`ServerHandle::run_until_signal`] serves until SIGTERM or Ctrl-C.
//! - [`Protocol`], [`Ctx`], [`Next`] and [`CloseReason`] are the state-machine API.
//! - [`codec`] has the framings: raw bytes, bounded lines, length-prefixed frames.
//! - [`Handler`] replaces the state-machine driver for users who want the raw stream;
//!   [`Stream`] and [`Address`] are what a connection runs over; [`TlsConfig`] and
//!   [`ProxyProtocol`] what comes in front of it.
//! - [`testing`] drives a protocol with no socket and virtual time.
//! - [`Stats`], [`ConnectionInfo`] and [`SendError`] come from a running server's
//!   [`ServerHandle`]: counters, the live connections, messages to them.
//! - [`examples`] holds the original's `echo` and `handshake` protocols, a `chat` server
//!   built on shared state, mailboxes and groups, and a `gateway` built on the raw
//!   [`Handler`].
#![deny(missing_docs)]

pub mod admin;
mod close;
pub mod cluster;
pub mod codec;
mod connections;
mod driver;
mod error;
pub mod examples;
mod handler;
mod listener;
mod process;
mod protocol;
mod server;
mod stats;
pub mod testing;
mod transport;

pub use close::{CloseReason, ProxyError, TlsFailure};
pub use connections::{Connection, ConnectionId, ConnectionInfo, Limits, SendError};
pub use driver::Driver;
pub use error::Error;
pub use handler::{Handler, Service};
pub use protocol::{Ctx, Frame, Next, Protocol};
/// The `rustls` crate, whose [`ServerConfig`](rustls::ServerConfig)
/// [`TlsConfig::server_config`] takes.
pub use rustls;
pub use server::{
    Builder, Server, ServerHandle, ShutdownReport, Threading, DEFAULT_BACKLOG,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_FRAME_TIMEOUT, DEFAULT_MAILBOX_CAPACITY,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_OUTPUT, DEFAULT_PORT, DEFAULT_SEND_TIMEOUT,
    DEFAULT_TCP_KEEPALIVE,
};
pub use stats::{
    AcceptErrorCounts, ClosedCounts, Lifetimes, Stats, TlsFailureCounts, LIFETIME_BUCKETS,
};
pub use transport::proxy::{
    ProxyHeader, ProxyProtocol, ProxySsl, DEFAULT_PROXY_HEADER_TIMEOUT, MAX_V1_HEADER,
    MAX_V2_HEADER,
};
pub use transport::tls::{
    TlsConfig, TlsInfo, DEFAULT_MAX_HANDSHAKES, DEFAULT_TLS_HANDSHAKE_TIMEOUT,
};
pub use transport::{Address, PeerCredentials, Stream};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
