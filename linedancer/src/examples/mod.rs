//! The example protocols of the original, as documentation to read and as servers to
//! run: `linedancer serve echo`, `linedancer serve handshake`, `linedancer serve line-echo`.
//!
//! - [`Echo`] writes back every byte it receives.
//! - [`Handshake`] is a line protocol with a login step: a two-state machine.
//! - [`LineEcho`] writes back every line: echo with line framing.
//! - [`Chat`] is a chat server: connections in rooms, talking through their mailboxes.

mod chat;
mod echo;
mod handshake;
mod line_echo;

pub use chat::{Chat, ChatMessage, LOBBY, MAX_NAME_LENGTH};
pub use echo::Echo;
pub use handshake::{Handshake, LOGIN_TIMEOUT, MAX_FAILED_LOGINS, WELCOME};
pub use line_echo::LineEcho;
