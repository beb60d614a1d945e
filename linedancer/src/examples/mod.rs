//! The example protocols of the original, as documentation to read and as servers to
//! run: `linedancer serve echo` and `linedancer serve handshake`.
//!
//! - [`Echo`] writes back every byte it receives.
//! - [`Handshake`] is a line protocol with a login step: a two-state machine.

mod echo;
mod handshake;

pub use echo::Echo;
pub use handshake::{Handshake, MAX_FAILED_LOGINS, WELCOME};
