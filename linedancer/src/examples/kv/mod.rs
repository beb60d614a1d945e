//! A Redis-compatible key-value server: RESP2 requests (or inline commands, for netcat),
//! one store shared by every connection, expiry, and publish/subscribe on the server's
//! groups and mailboxes.
//!
//! ```text
//! $ redis-cli -p 7000 set greeting "g'day" EX 60
//! OK
//! $ redis-cli -p 7000 get greeting
//! "g'day"
//! $ redis-cli -p 7000 ttl greeting
//! (integer) 60
//! ```
//!
//! On a [cluster](crate::cluster) (`serve kv --cluster ... --node ...`), `PUBLISH`
//! reaches the channel's subscribers on every node, in each publisher's order. The keys
//! stay each node's own, as on a shard without replicas: a key set through one node is
//! not seen through another. `PUBLISH` answers with the subscribers on its own node,
//! as Redis Cluster does.

mod resp;
mod store;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use crate::close::CloseReason;
use crate::cluster::ClusterMessage;
use crate::protocol::{Ctx, Next, Protocol};

pub use resp::{Reply, Request, Resp, MAX_ARGS, MAX_BULK, MAX_INLINE};
pub use store::{Condition, Db, IncrError, Ttl, Value};

use resp::parse_int;

/// What `kv` connections send each other: a message published on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel, binary-safe.
    pub channel: Bytes,
    /// The message.
    pub payload: Bytes,
}

impl ClusterMessage for Published {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.channel.len() as u32);
        out.put_slice(&self.channel);
        out.put_slice(&self.payload);
    }

    fn decode(mut bytes: Bytes) -> Option<Self> {
        if bytes.len() < 4 {
            return None;
        }
        let length = bytes.get_u32() as usize;
        if bytes.len() < length {
            return None;
        }
        let channel = bytes.split_to(length);
        Some(Published {
            channel,
            payload: bytes,
        })
    }
}

/// One client of the key-value server.
///
/// Commands, with Redis 7's replies: `PING [message]`, `ECHO message`, `GET key`,
/// `SET key value [EX seconds | PX milliseconds] [NX | XX]`, `DEL key...`,
/// `EXISTS key...`, `INCR key`, `DECR key`, `INCRBY key increment`, `MGET key...`,
/// `MSET key value...`, `EXPIRE key seconds`, `TTL key`, `DBSIZE`, `FLUSHDB`,
/// `SUBSCRIBE channel...`, `UNSUBSCRIBE [channel...]`, `PUBLISH channel message`,
/// `CONFIG GET parameter` (what `redis-benchmark` asks at start) and `QUIT`. An unknown
/// command, a wrong number of arguments or a value that is not an integer gets an
/// `-ERR` reply, and the connection goes on; bytes that are not RESP get `-ERR Protocol
/// error: ...` and the connection is closed, as Redis does.
///
/// The store ([`Db`]) is the server's shared state. A subscribed client
/// (`SUBSCRIBE`) joins a group per channel; `PUBLISH` broadcasts to the group, and each
/// subscriber's mailbox delivers the message. A subscriber that cannot keep up is
/// closed when its mailbox or its output overflows.
#[derive(Debug, Default)]
pub struct Kv {
    /// The channels this client subscribes to.
    channels: Vec<Bytes>,
}

impl Kv {
    /// The channels this client subscribes to.
    pub fn channels(&self) -> &[Bytes] {
        &self.channels
    }

    /// Runs one command.
    fn command(&mut self, args: Vec<Bytes>, ctx: &mut Ctx<'_, Self, Db>) -> Next {
        let Some(name) = args.first() else {
            return Next::Continue; // an empty line or `*0`: nothing, as in Redis
        };
        let found = (COMMANDS.iter()).find(|c| c.name.as_bytes().eq_ignore_ascii_case(name));
        let Some(command) = found else {
            ctx.send(unknown(&args));
            return Next::Continue;
        };
        let arity_ok = match command.arity {
            Arity::Exactly(n) => args.len() == n,
            Arity::AtLeast(n) => args.len() >= n,
            Arity::Between(low, high) => (low..=high).contains(&args.len()),
        };
        if !arity_ok {
            let text = format!("wrong number of arguments for '{}' command", command.name);
            ctx.send(Reply::error(text));
            return Next::Continue;
        }
        if !self.channels.is_empty() && !command.subscribed {
            ctx.send(Reply::error(format!(
                "Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT \
                 / RESET are allowed in this context",
                command.name
            )));
            return Next::Continue;
        }
        (command.run)(self, &args, ctx)
    }

    fn subscribe(&mut self, channels: &[Bytes], ctx: &mut Ctx<'_, Self, Db>) {
        for channel in channels {
            if !self.channels.contains(channel) {
                ctx.join(&group(channel));
                ctx.state().subscribe(channel);
                self.channels.push(channel.clone());
            }
            ctx.send(Reply::Array(vec![
                bulk("subscribe"),
                Reply::Bulk(channel.clone()),
                Reply::Integer(self.channels.len() as i64),
            ]));
        }
    }

    fn unsubscribe(&mut self, channels: &[Bytes], ctx: &mut Ctx<'_, Self, Db>) {
        let channels = if channels.is_empty() {
            self.channels.clone()
        } else {
            channels.to_vec()
        };
        if channels.is_empty() {
            ctx.send(Reply::Array(vec![
                bulk("unsubscribe"),
                Reply::Null,
                Reply::Integer(0),
            ]));
        }
        for channel in channels {
            if let Some(at) = self.channels.iter().position(|c| *c == channel) {
                self.channels.swap_remove(at);
                ctx.leave(&group(&channel));
                ctx.state().unsubscribe(&channel);
            }
            ctx.send(Reply::Array(vec![
                bulk("unsubscribe"),
                Reply::Bulk(channel),
                Reply::Integer(self.channels.len() as i64),
            ]));
        }
    }
}

impl Protocol<Db> for Kv {
    type Codec = Resp;
    type Reply = Reply;
    type Message = Published;

    fn connect(_ctx: &mut Ctx<'_, Self, Db>) -> Self {
        Kv::default()
    }

    fn frame(&mut self, request: Request, ctx: &mut Ctx<'_, Self, Db>) -> Next {
        match request {
            Request::Command(args) => self.command(args, ctx),
            Request::Invalid(why) => {
                ctx.send(Reply::error(format_args!("Protocol error: {why}")));
                Next::Close
            }
        }
    }

    fn message(&mut self, message: Published, ctx: &mut Ctx<'_, Self, Db>) -> Next {
        // Channels that are not UTF-8 may share a group name: only their own count.
        if self.channels.contains(&message.channel) {
            ctx.send(Reply::Array(vec![
                bulk("message"),
                Reply::Bulk(message.channel),
                Reply::Bulk(message.payload),
            ]));
        }
        Next::Continue
    }

    fn closed(&mut self, _reason: &CloseReason, ctx: &mut Ctx<'_, Self, Db>) {
        for channel in &self.channels {
            ctx.state().unsubscribe(channel);
        }
    }

    fn state_name(&self) -> &'static str {
        if self.channels.is_empty() {
            "COMMANDS"
        } else {
            "SUBSCRIBED"
        }
    }
}

/// The group of a channel's subscribers. Groups are named by text: a channel that is
/// not UTF-8 is named lossily, and [`Kv::message`] checks the channel itself.
fn group(channel: &[u8]) -> String {
    format!("kv:{}", String::from_utf8_lossy(channel))
}

/// How many arguments a command takes, its name included.
#[derive(Debug, Clone, Copy)]
enum Arity {
    Exactly(usize),
    AtLeast(usize),
    Between(usize, usize),
}

/// A command: its name (lower case), its arity, whether a subscribed client may run
/// it, and what it does.
struct Command {
    name: &'static str,
    arity: Arity,
    subscribed: bool,
    run: fn(&mut Kv, &[Bytes], &mut Ctx<'_, Kv, Db>) -> Next,
}

/// Every command, the most used first.
const COMMANDS: &[Command] = &[
    Command {
        name: "get",
        arity: Arity::Exactly(2),
        subscribed: false,
        run: |_, args, ctx| {
            let value = ctx.state().get(&args[1], ctx.now());
            reply(ctx, value.map_or(Reply::Null, Value::into_reply))
        },
    },
    Command {
        name: "set",
        arity: Arity::AtLeast(3),
        subscribed: false,
        run: |_, args, ctx| {
            let now = ctx.now();
            let answer = match set_options(&args[3..], now) {
                Ok((expires, condition)) => {
                    if ctx.state().set(&args[1], &args[2], expires, condition, now) {
                        Reply::Simple("OK")
                    } else {
                        Reply::Null
                    }
                }
                Err(error) => error,
            };
            reply(ctx, answer)
        },
    },
    Command {
        name: "incr",
        arity: Arity::Exactly(2),
        subscribed: false,
        run: |_, args, ctx| incr(ctx, &args[1], 1),
    },
    Command {
        name: "decr",
        arity: Arity::Exactly(2),
        subscribed: false,
        run: |_, args, ctx| incr(ctx, &args[1], -1),
    },
    Command {
        name: "incrby",
        arity: Arity::Exactly(3),
        subscribed: false,
        run: |_, args, ctx| match parse_int(&args[2]) {
            Some(delta) => incr(ctx, &args[1], delta),
            None => reply(ctx, not_an_integer()),
        },
    },
    Command {
        name: "mget",
        arity: Arity::AtLeast(2),
        subscribed: false,
        run: |_, args, ctx| {
            let now = ctx.now();
            let values = (args[1..].iter())
                .map(|key| {
                    ctx.state()
                        .get(key, now)
                        .map_or(Reply::Null, Value::into_reply)
                })
                .collect();
            reply(ctx, Reply::Array(values))
        },
    },
    Command {
        name: "mset",
        arity: Arity::AtLeast(3),
        subscribed: false,
        run: |_, args, ctx| {
            if args.len() % 2 == 0 {
                return reply(
                    ctx,
                    Reply::error("wrong number of arguments for 'mset' command"),
                );
            }
            let now = ctx.now();
            for pair in args[1..].chunks(2) {
                ctx.state()
                    .set(&pair[0], &pair[1], None, Condition::Always, now);
            }
            reply(ctx, Reply::Simple("OK"))
        },
    },
    Command {
        name: "del",
        arity: Arity::AtLeast(2),
        subscribed: false,
        run: |_, args, ctx| {
            let now = ctx.now();
            let removed = args[1..].iter().filter(|k| ctx.state().del(k, now)).count();
            reply(ctx, Reply::Integer(removed as i64))
        },
    },
    Command {
        name: "exists",
        arity: Arity::AtLeast(2),
        subscribed: false,
        run: |_, args, ctx| {
            let now = ctx.now();
            let found = args[1..]
                .iter()
                .filter(|k| ctx.state().exists(k, now))
                .count();
            reply(ctx, Reply::Integer(found as i64))
        },
    },
    Command {
        name: "expire",
        arity: Arity::Exactly(3),
        subscribed: false,
        run: |_, args, ctx| {
            let now = ctx.now();
            let Some(seconds) = parse_int(&args[2]) else {
                return reply(ctx, not_an_integer());
            };
            let at = if seconds <= 0 {
                Some(now)
            } else {
                seconds.checked_mul(1000).and_then(|ms| deadline(now, ms))
            };
            let answer = match at {
                Some(at) => Reply::Integer(i64::from(ctx.state().expire(&args[1], at, now))),
                None => Reply::error("invalid expire time in 'expire' command"),
            };
            reply(ctx, answer)
        },
    },
    Command {
        name: "ttl",
        arity: Arity::Exactly(2),
        subscribed: false,
        run: |_, args, ctx| {
            let ttl = match ctx.state().ttl(&args[1], ctx.now()) {
                Ttl::Missing => -2,
                Ttl::Forever => -1,
                // Rounded to the nearest second, as Redis does.
                Ttl::Left(left) => ((left.as_millis() + 500) / 1000) as i64,
            };
            reply(ctx, Reply::Integer(ttl))
        },
    },
    Command {
        name: "ping",
        arity: Arity::Between(1, 2),
        subscribed: true,
        run: |kv, args, ctx| {
            let answer = match (kv.channels.is_empty(), args.get(1)) {
                (true, None) => Reply::Simple("PONG"),
                (true, Some(message)) => Reply::Bulk(message.clone()),
                (false, message) => Reply::Array(vec![
                    bulk("pong"),
                    Reply::Bulk(message.cloned().unwrap_or_default()),
                ]),
            };
            reply(ctx, answer)
        },
    },
    Command {
        name: "echo",
        arity: Arity::Exactly(2),
        subscribed: false,
        run: |_, args, ctx| reply(ctx, Reply::Bulk(args[1].clone())),
    },
    Command {
        name: "dbsize",
        arity: Arity::Exactly(1),
        subscribed: false,
        run: |_, _, ctx| {
            let keys = ctx.state().len(ctx.now());
            reply(ctx, Reply::Integer(keys as i64))
        },
    },
    Command {
        name: "flushdb",
        arity: Arity::Between(1, 2),
        subscribed: false,
        run: |_, args, ctx| {
            let mode = args.get(1).map(|m| m.to_ascii_lowercase());
            if !matches!(mode.as_deref(), None | Some(b"sync" | b"async")) {
                return reply(ctx, Reply::error("syntax error"));
            }
            ctx.state().flush();
            reply(ctx, Reply::Simple("OK"))
        },
    },
    Command {
        name: "publish",
        arity: Arity::Exactly(3),
        subscribed: false,
        run: |_, args, ctx| {
            let receivers = ctx.state().subscribers(&args[1]);
            let message = Published {
                channel: args[1].clone(),
                payload: args[2].clone(),
            };
            ctx.broadcast(&group(&args[1]), message);
            reply(ctx, Reply::Integer(receivers as i64))
        },
    },
    Command {
        name: "subscribe",
        arity: Arity::AtLeast(2),
        subscribed: true,
        run: |kv, args, ctx| {
            kv.subscribe(&args[1..], ctx);
            Next::Continue
        },
    },
    Command {
        name: "unsubscribe",
        arity: Arity::AtLeast(1),
        subscribed: true,
        run: |kv, args, ctx| {
            kv.unsubscribe(&args[1..], ctx);
            Next::Continue
        },
    },
    Command {
        name: "config",
        arity: Arity::AtLeast(2),
        subscribed: false,
        run: |_, args, ctx| {
            let answer = match (args[1].to_ascii_lowercase().as_slice(), args.get(2)) {
                (b"get", Some(parameter)) => {
                    let value = match parameter.to_ascii_lowercase().as_slice() {
                        b"save" => Some(""),
                        b"appendonly" => Some("no"),
                        _ => None,
                    };
                    Reply::Array(match value {
                        Some(value) => vec![Reply::Bulk(parameter.clone()), bulk(value)],
                        None => Vec::new(),
                    })
                }
                _ => Reply::error("CONFIG takes GET parameter here"),
            };
            reply(ctx, answer)
        },
    },
    Command {
        name: "quit",
        arity: Arity::AtLeast(1),
        subscribed: true,
        run: |_, _, ctx| {
            ctx.send(Reply::Simple("OK"));
            Next::Close
        },
    },
];

/// Sends `answer` and goes on.
fn reply(ctx: &mut Ctx<'_, Kv, Db>, answer: Reply) -> Next {
    ctx.send(answer);
    Next::Continue
}

/// A bulk string of static text.
fn bulk(text: &'static str) -> Reply {
    Reply::Bulk(Bytes::from_static(text.as_bytes()))
}

fn not_an_integer() -> Reply {
    Reply::error("value is not an integer or out of range")
}

/// `INCRBY key delta`.
fn incr(ctx: &mut Ctx<'_, Kv, Db>, key: &[u8], delta: i64) -> Next {
    let answer = match ctx.state().incr_by(key, delta, ctx.now()) {
        Ok(value) => Reply::Integer(value),
        Err(IncrError::NotAnInteger) => not_an_integer(),
        Err(IncrError::Overflow) => Reply::error("increment or decrement would overflow"),
    };
    reply(ctx, answer)
}

/// `SET`'s options: when the key expires, and when to write.
fn set_options(options: &[Bytes], now: Instant) -> Result<(Option<Instant>, Condition), Reply> {
    let (mut expires, mut condition) = (None, Condition::Always);
    let mut options = options.iter();
    while let Some(option) = options.next() {
        match option.to_ascii_lowercase().as_slice() {
            unit @ (b"ex" | b"px") if expires.is_none() => {
                let amount = options.next().ok_or_else(|| Reply::error("syntax error"))?;
                let amount = parse_int(amount).ok_or_else(not_an_integer)?;
                let invalid = || Reply::error("invalid expire time in 'set' command");
                if amount <= 0 {
                    return Err(invalid());
                }
                let millis = if unit == b"ex" {
                    amount.checked_mul(1000).ok_or_else(invalid)?
                } else {
                    amount
                };
                expires = Some(deadline(now, millis).ok_or_else(invalid)?);
            }
            b"nx" if condition == Condition::Always => condition = Condition::IfMissing,
            b"xx" if condition == Condition::Always => condition = Condition::IfExists,
            _ => return Err(Reply::error("syntax error")),
        }
    }
    Ok((expires, condition))
}

/// The instant `millis` (positive) after `now`, or `None` where Redis finds the time
/// invalid: when the Unix time in milliseconds it would be does not fit in 64 bits.
fn deadline(now: Instant, millis: i64) -> Option<Instant> {
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64);
    if millis > i64::MAX - unix_now {
        return None;
    }
    now.checked_add(Duration::from_millis(millis as u64))
}

/// Redis's reply to an unknown command, with its first arguments.
fn unknown(args: &[Bytes]) -> Reply {
    let shown = |bytes: &Bytes| {
        let text = String::from_utf8_lossy(bytes);
        text.chars().take(128).collect::<String>()
    };
    let mut text = format!(
        "unknown command '{}', with args beginning with: ",
        shown(&args[0])
    );
    for arg in args[1..].iter().take(16) {
        text.push_str(&format!("'{}' ", shown(arg)));
    }
    Reply::error(text)
}
