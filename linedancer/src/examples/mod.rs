//! The example servers, as documentation to read and as servers to run with
//! `linedancer serve echo|handshake|line-echo|chat|gateway|kv`.
//!
//! - [`Echo`] writes back every byte it receives.
//! - [`Handshake`] is a line protocol with a login step: a two-state machine.
//! - [`LineEcho`] writes back every line: echo with line framing.
//! - [`Chat`] is a chat server: connections in rooms kept in shared state ([`Rooms`]),
//!   talking through their mailboxes.
//! - [`Gateway`], a layer-4 load balancer, relays every connection to one of a pool of
//!   upstream servers: a raw [`Handler`].
//! - [`kv`] is a Redis-compatible key-value server ([`Kv`]): its own binary-safe codec,
//!   a store in shared state with expiry, and publish/subscribe on groups.
//!
//! [`Handler`]: crate::Handler

mod chat;
mod echo;
mod gateway;
mod handshake;
pub mod kv;
mod line_echo;

pub use chat::{
    Chat, ChatMessage, Rooms, ANNOUNCE_LIMIT, LOBBY, MAX_MESSAGE_LENGTH, MAX_NAME_LENGTH, WHO_LIMIT,
};
pub use echo::Echo;
pub use gateway::{
    Balance, Gateway, GatewayStats, UpstreamStats, CONNECT_TIMEOUT, HEALTH_CHECK_INTERVAL,
};
pub use handshake::{
    Handshake, HandshakeSettings, LoginTimeout, LOGIN_TIMEOUT, MAX_FAILED_LOGINS, WELCOME,
};
pub use kv::Kv;
pub use line_echo::LineEcho;
