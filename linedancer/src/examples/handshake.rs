//! A line protocol with a login step, the original's "stateful authentication example".
//!
//! ```text
//! Welcome to the stateful authentication example.
//!
//! You can login by writing 'login:<key>' where <key>
//! is the number presented below
//!
//! auth-req:417022
//! login:417022
//! authenticated as 417022
//! hello
//! client[417022] -> hello
//! ```

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use crate::codec::Lines;
use crate::protocol::{Ctx, Next, Protocol};

/// The greeting sent on connect, line by line, before the first `auth-req:<key>`.
pub const WELCOME: [&str; 5] = [
    "Welcome to the stateful authentication example.",
    "",
    "You can login by writing 'login:<key>' where <key>",
    "is the number presented below",
    "",
];

/// Failed logins after which the server says so and closes the connection.
pub const MAX_FAILED_LOGINS: u32 = 3;

/// How long a client has, from connecting, to log in before the server closes the
/// connection, by default: a client that goes silent or trickles bytes cannot hold a
/// connection in the login state for ever.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handshake reads from the server's state: how long a client has to log in.
/// Served with no state (`()`), it has [`LOGIN_TIMEOUT`]; with a [`LoginTimeout`],
/// that one.
pub trait HandshakeSettings: Send + Sync + 'static {
    /// How long a client has, from connecting, to log in.
    fn login_timeout(&self) -> Duration;
}

impl HandshakeSettings for () {
    fn login_timeout(&self) -> Duration {
        LOGIN_TIMEOUT
    }
}

/// A login timeout of the server's choosing, given as the handshake's state
/// (`serve handshake --login-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginTimeout(pub Duration);

impl HandshakeSettings for LoginTimeout {
    fn login_timeout(&self) -> Duration {
        self.0
    }
}

/// The handshake protocol's states.
///
/// On connect the server greets with [`WELCOME`] and a challenge, `auth-req:<key>`, with
/// a random key from 1 to 1,000,000. The client answers `login:<key>`:
///
/// - exactly `login:` and the key of the last challenge, as sent: `authenticated as
///   <key>`, and from then on every line is answered `client[<key>] -> <line>`;
/// - any other line, a wrong key, a near miss (`login:+KEY`, `login:0KEY`, a space) or
///   an empty line: `authentication failed, try again` and a new challenge; after
///   [`MAX_FAILED_LOGINS`] failures the server says so and closes;
/// - no successful login within the login timeout ([`LOGIN_TIMEOUT`], or the
///   [`LoginTimeout`] given as the server's state): the server says so and closes.
///
/// On server shutdown it says goodbye and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Waiting for `login:<key>` with the key of the last challenge.
    AwaitingLogin {
        /// The key of the last challenge.
        key: u32,
        /// Failed logins so far.
        failures: u32,
    },
    /// Logged in: lines are answered with the key as the client's name.
    Authenticated {
        /// The key the client logged in with.
        key: u32,
    },
}

impl Handshake {
    /// Sends a new challenge and waits for its answer.
    fn challenge<S: HandshakeSettings>(failures: u32, ctx: &mut Ctx<'_, Self, S>) -> Self {
        let key = new_key();
        ctx.send(format!("auth-req:{key}"));
        Handshake::AwaitingLogin { key, failures }
    }
}

impl<S: HandshakeSettings> Protocol<S> for Handshake {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self, S>) -> Self {
        for line in WELCOME {
            ctx.send(line.to_owned());
        }
        ctx.set_timeout(ctx.state().login_timeout());
        Handshake::challenge(0, ctx)
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self, S>) -> Next {
        match *self {
            Handshake::AwaitingLogin { key, failures } => {
                // Exactly the key sent, in its own digits: no sign, no leading zeros, no
                // spaces.
                if line.strip_prefix("login:") == Some(key.to_string().as_str()) {
                    ctx.send(format!("authenticated as {key}"));
                    ctx.clear_timeout();
                    *self = Handshake::Authenticated { key };
                } else if failures + 1 >= MAX_FAILED_LOGINS {
                    ctx.send(format!(
                        "authentication failed {MAX_FAILED_LOGINS} times, closing the connection"
                    ));
                    return Next::Close;
                } else {
                    ctx.send("authentication failed, try again".to_owned());
                    *self = Handshake::challenge(failures + 1, ctx);
                }
            }
            Handshake::Authenticated { key } => ctx.send(format!("client[{key}] -> {line}")),
        }
        Next::Continue
    }

    fn timeout(&mut self, ctx: &mut Ctx<'_, Self, S>) -> Next {
        ctx.send("login timed out, closing the connection".to_owned());
        Next::Close
    }

    fn shutdown(&mut self, ctx: &mut Ctx<'_, Self, S>) -> Next {
        ctx.send("server shutting down, goodbye".to_owned());
        Next::Close
    }

    fn state_name(&self) -> &'static str {
        match self {
            Handshake::AwaitingLogin { .. } => "AWAITING_LOGIN",
            Handshake::Authenticated { .. } => "AUTHENTICATED",
        }
    }
}

/// A random key from 1 to 1,000,000. Guessing it is a game, not security, so std's
/// randomly seeded hasher is random enough and spares a dependency.
fn new_key() -> u32 {
    let random = RandomState::new().hash_one(std::time::Instant::now());
    u32::try_from(random % 1_000_000).expect("below 1,000,000") + 1
}
