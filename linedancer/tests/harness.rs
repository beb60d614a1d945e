//! The sans-IO harness: the handshake state machine and the protocol timer, with no
//! socket and virtual time.

use std::sync::Arc;
use std::time::Duration;

use linedancer::codec::Lines;
use linedancer::examples::{Handshake, LoginTimeout, LOGIN_TIMEOUT, WELCOME};
use linedancer::testing::Harness;
use linedancer::{CloseReason, Ctx, Next, Protocol};

/// Connects and returns the harness with the first key, checking the greeting.
fn greeted() -> (Harness<Handshake>, u32) {
    let mut conn = Harness::<Handshake>::connect();
    let text = conn.take_text();
    let (greeting, challenge) = text.rsplit_once("auth-req:").expect("a challenge");
    assert_eq!(greeting, WELCOME.map(|l| format!("{l}\n")).concat());
    (conn, key_of(challenge))
}

fn key_of(challenge: &str) -> u32 {
    challenge.trim_end().parse().expect("a numeric key")
}

/// The key of the challenge at the end of `text`.
fn last_key(text: &str) -> u32 {
    key_of(text.rsplit_once("auth-req:").expect("a challenge").1)
}

/// Ensure the right key authenticates and that lines are then answered with it.
#[test]
fn login_then_lines() {
    let (mut conn, key) = greeted();
    assert_eq!(conn.state_name(), Some("AWAITING_LOGIN"));
    conn.feed(format!("login:{key}\n"));
    assert_eq!(conn.take_text(), format!("authenticated as {key}\n"));
    assert_eq!(conn.protocol(), Some(&Handshake::Authenticated { key }));
    assert_eq!(conn.state_name(), Some("AUTHENTICATED"));
    conn.feed("one\r\ntwo\n");
    assert_eq!(
        conn.take_text(),
        format!("client[{key}] -> one\nclient[{key}] -> two\n")
    );
}

/// Ensure a client that does not log in within the login timeout is told so and
/// closed, and that logging in disarms the timeout.
#[test]
fn login_timeout() {
    let (mut conn, _) = greeted();
    assert_eq!(conn.timeout_in(), Some(LOGIN_TIMEOUT));
    // Wrong answers do not buy more time.
    conn.advance(LOGIN_TIMEOUT / 2);
    conn.feed("login:0\n");
    conn.advance(LOGIN_TIMEOUT / 2 - Duration::from_millis(1));
    assert!(!conn.is_closed());
    conn.take_text();
    conn.advance(Duration::from_millis(1));
    assert_eq!(
        conn.take_text(),
        "login timed out, closing the connection\n"
    );
    assert_eq!(conn.close_reason(), Some(&CloseReason::StateTimeout));

    let (mut conn, key) = greeted();
    conn.feed(format!("login:{key}\n"));
    assert_eq!(conn.timeout_in(), None);
    conn.advance(LOGIN_TIMEOUT * 10);
    assert!(!conn.is_closed());
}

/// Ensure input split at every byte gives the same result as one piece.
#[test]
fn any_split_of_the_input() {
    let (mut conn, _) = greeted();
    // A stray line gets a new challenge, whose key logs in.
    for byte in "hello\n".bytes() {
        conn.feed([byte]);
    }
    let key = last_key(&conn.take_text());
    for byte in format!("login:{key}\nhi\n").bytes() {
        conn.feed([byte]);
    }
    assert_eq!(
        conn.take_text(),
        format!("authenticated as {key}\nclient[{key}] -> hi\n")
    );
}

/// Ensure a wrong key is answered with a failure and a new challenge, still
/// unauthenticated, and the third failure closes the connection.
#[test]
fn three_strikes() {
    let (mut conn, mut key) = greeted();
    for failures in 1..=2 {
        conn.feed(format!("login:{}\n", key % 1_000_000 + 1));
        let text = conn.take_text();
        assert!(
            text.starts_with("authentication failed, try again\nauth-req:"),
            "{text}"
        );
        key = last_key(&text);
        assert_eq!(
            conn.protocol(),
            Some(&Handshake::AwaitingLogin { key, failures })
        );
    }
    conn.feed("login:not-a-number\n");
    assert_eq!(
        conn.take_text(),
        "authentication failed 3 times, closing the connection\n"
    );
    assert_eq!(conn.close_reason(), Some(&CloseReason::Closed));
    conn.feed(format!("login:{key}\n"));
    assert_eq!(conn.take_text(), "", "nothing is read after the close");
}

/// Ensure only the exact login logs in: a sign, leading zeros or spaces around the key
/// are failures like any other line.
#[test]
fn near_misses_are_failures() {
    for near_miss in [
        "login:+{key}",
        "login:0{key}",
        "login: {key}",
        "login:{key} ",
        "Login:{key}",
    ] {
        let (mut conn, key) = greeted();
        conn.feed(format!(
            "{}\n",
            near_miss.replace("{key}", &key.to_string())
        ));
        let text = conn.take_text();
        assert!(
            text.starts_with("authentication failed, try again\nauth-req:"),
            "{near_miss}: {text}"
        );
        let key = last_key(&text);
        assert_eq!(
            conn.protocol(),
            Some(&Handshake::AwaitingLogin { key, failures: 1 }),
            "{near_miss}"
        );
    }
}

/// Ensure the login timeout comes from the server's state when it gives one.
#[test]
fn login_timeout_from_the_state() {
    let timeout = Arc::new(LoginTimeout(Duration::from_secs(5)));
    let mut conn = Harness::<Handshake, LoginTimeout>::connect_with_state(timeout);
    assert_eq!(conn.timeout_in(), Some(Duration::from_secs(5)));
    conn.take_text();
    conn.advance(Duration::from_secs(5));
    assert_eq!(
        conn.take_text(),
        "login timed out, closing the connection\n"
    );
    assert_eq!(conn.close_reason(), Some(&CloseReason::StateTimeout));
}

/// Ensure the shutdown event says goodbye and closes.
#[test]
fn shutdown_says_goodbye() {
    let (mut conn, _) = greeted();
    conn.shutdown();
    assert_eq!(conn.take_text(), "server shutting down, goodbye\n");
    assert!(conn.is_closed());
}

/// Ensure a line over the limit closes with a bad-frame reason, and a last line with no
/// ending is still handled when the peer closes.
#[test]
fn overlong_lines_and_unterminated_last_lines() {
    let mut conn = Harness::<Handshake>::connect_with_codec(Lines::with_max_length(16));
    conn.take_output();
    conn.feed("a line that is far too long\n");
    assert!(matches!(
        conn.close_reason(),
        Some(CloseReason::BadFrame(_))
    ));

    let (mut conn, key) = greeted();
    conn.feed(format!("login:{key}"));
    assert_eq!(conn.take_text(), "");
    conn.feed_eof();
    assert_eq!(conn.take_text(), format!("authenticated as {key}\n"));
    assert_eq!(conn.close_reason(), Some(&CloseReason::PeerClosed));
}

/// A protocol that asks for a name within 5 seconds, reminding once before giving up.
#[derive(Debug, PartialEq)]
enum Patient {
    Waiting { reminded: bool },
    Named,
}

impl Protocol for Patient {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        ctx.set_timeout(Duration::from_secs(5));
        Patient::Waiting { reminded: false }
    }

    fn frame(&mut self, name: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.clear_timeout();
        ctx.send(format!("hello {name}"));
        *self = Patient::Named;
        Next::Continue
    }

    fn timeout(&mut self, ctx: &mut Ctx<'_, Self>) -> Next {
        match self {
            Patient::Waiting { reminded: false } => {
                ctx.send("your name?".into());
                ctx.set_timeout(Duration::from_secs(5));
                *self = Patient::Waiting { reminded: true };
                Next::Continue
            }
            _ => Next::Close,
        }
    }
}

/// Ensure the protocol timer fires in virtual time, can be re-armed, and closes with a
/// timeout reason when the callback says so.
#[test]
fn timeouts_fire_in_virtual_time() {
    let mut conn = Harness::<Patient>::connect();
    assert_eq!(conn.timeout_in(), Some(Duration::from_secs(5)));
    conn.advance(Duration::from_millis(4999));
    assert_eq!(conn.take_text(), "");
    conn.advance(Duration::from_millis(1));
    assert_eq!(conn.take_text(), "your name?\n");
    conn.advance(Duration::from_secs(60));
    assert_eq!(conn.close_reason(), Some(&CloseReason::StateTimeout));

    let mut conn = Harness::<Patient>::connect();
    conn.advance(Duration::from_secs(3));
    conn.feed("ann\n");
    assert_eq!(conn.timeout_in(), None, "cleared by the frame");
    conn.advance(Duration::from_secs(3600));
    assert_eq!(conn.take_text(), "hello ann\n");
    assert!(!conn.is_closed());
}
