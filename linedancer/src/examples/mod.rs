//! The example protocols of the original, as documentation to read and as servers to
//! run: `linedancer serve echo`, `linedancer serve handshake`, `linedancer serve line-echo`,
//! `linedancer serve gateway`.
//!
//! - [`Echo`] writes back every byte it receives.
//! - [`Handshake`] is a line protocol with a login step: a two-state machine.
//! - [`LineEcho`] writes back every line: echo with line framing.
//! - [`Gateway`] relays every connection to an upstream server: a raw [`Handler`].
//!
//! [`Handler`]: crate::Handler

mod echo;
mod gateway;
mod handshake;
mod line_echo;

pub use echo::Echo;
pub use gateway::{Gateway, CONNECT_TIMEOUT};
pub use handshake::{Handshake, LOGIN_TIMEOUT, MAX_FAILED_LOGINS, WELCOME};
pub use line_echo::LineEcho;
