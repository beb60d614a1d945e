//! A chat server: a line protocol whose connections talk to each other through their
//! mailboxes and groups.
//!
//! ```text
//! * welcome, guest1: you are in lobby. Commands: /nick NAME, /join ROOM, /who, /quit
//! /nick ann
//! * you are now ann
//! hello
//! <bob> hi ann
//! /join kitchen
//! * you are in kitchen
//! ```

use std::sync::Arc;

use crate::codec::Lines;
use crate::connections::ConnectionId;
use crate::protocol::{Ctx, Next, Protocol};

/// The room every client starts in.
pub const LOBBY: &str = "lobby";

/// The longest nick or room name, in characters.
pub const MAX_NAME_LENGTH: usize = 32;

/// What chat connections send each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatMessage {
    /// A line for the client, as it is: someone spoke, came or went.
    Line(Arc<str>),
    /// Connection `.0` asks who is in the room: answer with your nick.
    Who(ConnectionId),
    /// An answer to [`Who`](ChatMessage::Who).
    Here(Arc<str>),
}

/// One chat client: its nick and its room.
///
/// Every client starts as `guest<id>` in [`LOBBY`]. A line is sent to everyone else in
/// the room as `<nick> line`; lines starting with `/` are commands:
///
/// - `/nick NAME`: change your nick;
/// - `/join ROOM`: leave your room for another (made on first use);
/// - `/who`: list who is in your room;
/// - `/quit`: leave.
///
/// Lines from the server itself start with `*`. A member who stops reading does not
/// hold up the room: its replies pile up to the server's output limit, or its mailbox
/// fills, and it is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    nick: Arc<str>,
    room: Arc<str>,
}

impl Chat {
    /// The client's nick.
    pub fn nick(&self) -> &str {
        &self.nick
    }

    /// The client's room.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// Tells everyone else in the room.
    fn announce(&self, text: String, ctx: &mut Ctx<'_, Self>) {
        ctx.broadcast(&self.room, ChatMessage::Line(text.into()));
    }

    fn join(&mut self, room: &str, ctx: &mut Ctx<'_, Self>) {
        if room == &*self.room {
            ctx.send(format!("* you are already in {room}").into());
            return;
        }
        self.announce(format!("* {} left for {room}", self.nick), ctx);
        ctx.leave(&self.room);
        self.room = room.into();
        ctx.join(room);
        self.announce(format!("* {} joined {room}", self.nick), ctx);
        ctx.send(format!("* you are in {room}").into());
    }

    fn rename(&mut self, nick: &str, ctx: &mut Ctx<'_, Self>) {
        self.announce(format!("* {} is now {nick}", self.nick), ctx);
        self.nick = nick.into();
        ctx.send(format!("* you are now {nick}").into());
    }
}

/// Checks a nick or room name: 1 to [`MAX_NAME_LENGTH`] characters, no spaces.
fn valid_name(name: &str) -> Result<&str, String> {
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_LENGTH {
        Err(format!("names are 1 to {MAX_NAME_LENGTH} characters"))
    } else if name.contains(char::is_whitespace) {
        Err("names have no spaces".to_owned())
    } else {
        Ok(name)
    }
}

impl Protocol for Chat {
    type Codec = Lines;
    type Reply = Arc<str>;
    type Message = ChatMessage;

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        let chat = Chat {
            nick: format!("guest{}", ctx.id()).into(),
            room: LOBBY.into(),
        };
        ctx.join(LOBBY);
        chat.announce(format!("* {} joined {LOBBY}", chat.nick), ctx);
        ctx.send(
            format!(
                "* welcome, {}: you are in {LOBBY}. \
                 Commands: /nick NAME, /join ROOM, /who, /quit",
                chat.nick
            )
            .into(),
        );
        chat
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        let Some(command) = line.strip_prefix('/') else {
            if !line.is_empty() {
                let text = format!("<{}> {line}", self.nick);
                ctx.broadcast(&self.room, ChatMessage::Line(text.into()));
            }
            return Next::Continue;
        };
        let (command, argument) = command.split_once(' ').unwrap_or((command, ""));
        match (command, valid_name(argument.trim())) {
            ("nick", Ok(nick)) => self.rename(nick, ctx),
            ("join", Ok(room)) => self.join(room, ctx),
            ("nick" | "join", Err(why)) => ctx.send(format!("* {why}").into()),
            ("who", _) => {
                ctx.send(format!("* in {}: {} (you)", self.room, self.nick).into());
                ctx.broadcast(&self.room, ChatMessage::Who(ctx.id()));
            }
            ("quit", _) => {
                ctx.send("* bye".into());
                return Next::Close;
            }
            _ => ctx.send(
                format!("* unknown command /{command}: try /nick, /join, /who or /quit").into(),
            ),
        }
        Next::Continue
    }

    fn message(&mut self, message: ChatMessage, ctx: &mut Ctx<'_, Self>) -> Next {
        match message {
            ChatMessage::Line(text) => ctx.send(text),
            ChatMessage::Who(asker) => ctx.send_to(asker, ChatMessage::Here(self.nick.clone())),
            ChatMessage::Here(nick) => ctx.send(format!("* also here: {nick}").into()),
        }
        Next::Continue
    }

    fn shutdown(&mut self, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send("* server shutting down, goodbye".into());
        Next::Close
    }

    fn closed(&mut self, _: &crate::CloseReason, ctx: &mut Ctx<'_, Self>) {
        // However it ended: /quit, a disconnect, a reset, a timeout.
        self.announce(format!("* {} left", self.nick), ctx);
    }

    fn state_name(&self) -> &'static str {
        "CHATTING"
    }
}
