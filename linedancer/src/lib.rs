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
//! # Modules
//!
//! - [`Server`] and [`Builder`] start a server; [`ServerHandle`] controls a running one.
//! - [`Protocol`], [`Ctx`], [`Next`] and [`CloseReason`] are the state-machine API.
//! - [`codec`] has the framings: raw bytes, bounded lines, length-prefixed frames.
//! - [`Handler`] replaces the state-machine driver for users who want the raw stream.
//! - [`testing`] drives a protocol with no socket and virtual time.
//! - [`Stats`], [`ConnectionInfo`] and [`SendError`] come from a running server's
//!   [`ServerHandle`]: counters, the live connections, messages to them.
//! - [`examples`] holds the original's `echo` and `handshake` protocols, a `chat` server
//!   built on mailboxes and groups, and a `gateway` built on the raw [`Handler`].
#![deny(missing_docs)]

mod close;
pub mod codec;
mod connections;
mod driver;
mod error;
pub mod examples;
mod handler;
mod listener;
mod protocol;
mod server;
mod stats;
pub mod testing;
mod transport;

pub use close::CloseReason;
pub use connections::{Connection, ConnectionId, ConnectionInfo, Limits, SendError};
pub use driver::Driver;
pub use error::Error;
pub use handler::{Handler, Service};
pub use protocol::{Ctx, Frame, Next, Protocol};
pub use server::{
    Builder, Server, ServerHandle, ShutdownReport, Threading, DEFAULT_BACKLOG,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAILBOX_CAPACITY, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_OUTPUT,
    DEFAULT_PORT, DEFAULT_SEND_TIMEOUT,
};
pub use stats::{ClosedCounts, Stats};
pub use transport::{Address, Stream};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
