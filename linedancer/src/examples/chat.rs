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
//!
//! On a [cluster](crate::cluster) ([`Rooms::clustered`]), rooms span the nodes: lines,
//! comings and goings reach the room's members on every node, `/who` lists them all,
//! and nicks are unique across the cluster. The members of a node that stops answering
//! leave with it: each of their rooms hears one line, `* ann, bob left (their server
//! went away)`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::close::CloseReason;
use crate::cluster::{Claim, Cluster, ClusterMessage, Names};
use crate::codec::Lines;
use crate::connections::ConnectionId;
use crate::protocol::{Ctx, Next, Protocol};

/// The room every client starts in.
pub const LOBBY: &str = "lobby";

/// The longest nick or room name, in characters.
pub const MAX_NAME_LENGTH: usize = 32;

/// The longest message, in characters (after control characters are removed); a
/// longer one is refused with an error line.
pub const MAX_MESSAGE_LENGTH: usize = 1000;

/// How many other members `/who` names at most; the rest are counted.
pub const WHO_LIMIT: usize = 50;

/// The most members a room may have for comings, goings and renames to be announced
/// in it. Beyond, they are not: announcing each of `n` members' arrival to all the
/// others is `n²` lines, which would bury the conversation (and fill the mailboxes)
/// in a large room; `/who` tells who is there.
pub const ANNOUNCE_LIMIT: usize = 100;

/// What chat connections send each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatMessage {
    /// A line for the client, as it is: someone spoke, came or went.
    Line(Arc<str>),
    /// The cluster's answer to a claim of a nick: whether it is the client's.
    Claimed {
        /// The nick claimed.
        nick: Arc<str>,
        /// Whether it was granted.
        granted: bool,
    },
}

impl ClusterMessage for ChatMessage {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            ChatMessage::Line(line) => {
                out.put_u8(0);
                out.put_slice(line.as_bytes());
            }
            ChatMessage::Claimed { nick, granted } => {
                out.put_u8(1 + u8::from(*granted));
                out.put_slice(nick.as_bytes());
            }
        }
    }

    fn decode(mut bytes: Bytes) -> Option<Self> {
        if bytes.is_empty() {
            return None;
        }
        let kind = bytes.get_u8();
        let text: Arc<str> = std::str::from_utf8(&bytes).ok()?.into();
        match kind {
            0 => Some(ChatMessage::Line(text)),
            1 | 2 => Some(ChatMessage::Claimed {
                nick: text,
                granted: kind == 2,
            }),
            _ => None,
        }
    }

    fn members_lost(_room: &str, nicks: &[Arc<str>]) -> Option<Self> {
        let names = names(nicks.iter().cloned())?;
        Some(ChatMessage::Line(
            format!("* {names} left (their server went away)").into(),
        ))
    }
}

/// Each room's members on this server, by connection id, with their nicks.
#[derive(Debug, Default)]
struct Members {
    rooms: HashMap<Arc<str>, BTreeMap<ConnectionId, Arc<str>>>,
}

/// The chat's shared state: who is in which room, under which nick, and which nicks are
/// taken (nicks are unique, whatever their case). Every connection keeps its own entry
/// up to date, and `/who` reads it, so the answer costs one lock and no message,
/// whatever the room's size. On a cluster, the other nodes' members come from the
/// cluster's member lists, and nicks from its [`Names`].
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: Mutex<Members>,
    /// Who holds each nick, by its lower-case form.
    nicks: Names,
    cluster: Option<Cluster>,
}

impl Rooms {
    /// Rooms that span the nodes of `cluster`; give the same cluster to
    /// [`Builder::cluster`](crate::Builder::cluster).
    pub fn clustered(cluster: Cluster) -> Rooms {
        Rooms {
            rooms: Mutex::default(),
            nicks: cluster.names(),
            cluster: Some(cluster),
        }
    }

    /// The members of `room` on this server, in connection order, with their nicks.
    pub fn members(&self, room: &str) -> Vec<(ConnectionId, Arc<str>)> {
        (self.lock().rooms.get(room).into_iter())
            .flat_map(|members| members.iter().map(|(id, nick)| (*id, Arc::clone(nick))))
            .collect()
    }

    /// The rooms with anyone in them on this server, in no particular order.
    pub fn rooms(&self) -> Vec<Arc<str>> {
        self.lock().rooms.keys().cloned().collect()
    }

    /// How many members `room` has, on every node.
    pub fn size(&self, room: &str) -> usize {
        let here = self.lock().rooms.get(room).map_or(0, BTreeMap::len);
        here + self.cluster.as_ref().map_or(0, |c| c.remote_size(room))
    }

    /// Who on this server holds `nick`, whatever its case.
    pub fn holder(&self, nick: &str) -> Option<ConnectionId> {
        self.nicks.holder(&nick.to_lowercase())
    }

    /// Claims `nick` (in any case) for `id`.
    fn claim(&self, nick: &str, id: ConnectionId) -> Claim {
        self.nicks.claim(&nick.to_lowercase(), id)
    }

    /// Claims `nick` for `id` on this server only, at once.
    fn claim_here(&self, nick: &str, id: ConnectionId) -> bool {
        self.nicks.try_claim(&nick.to_lowercase(), id)
    }

    /// Gives up `nick`, if `id` holds it.
    fn release(&self, nick: &str, id: ConnectionId) {
        self.nicks.release(&nick.to_lowercase(), id);
    }

    /// Puts `id` in `room` as `nick`, or renames it there.
    fn enter(&self, room: &Arc<str>, id: ConnectionId, nick: &Arc<str>) {
        let mut members = self.lock();
        let room = members.rooms.entry(Arc::clone(room)).or_default();
        room.insert(id, Arc::clone(nick));
    }

    /// Takes `id` out of `room`, and forgets the room once it is empty.
    fn leave(&self, room: &str, id: ConnectionId) {
        let rooms = &mut self.lock().rooms;
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// The answer to `/who` for `me` in `room`: one line, naming at most
    /// [`WHO_LIMIT`] others and counting the rest.
    fn who(&self, room: &str, me: ConnectionId, my_nick: &str) -> String {
        let local: Vec<Arc<str>> = (self.lock().rooms.get(room).into_iter())
            .flat_map(|members| members.iter())
            .filter(|(id, _)| **id != me)
            .map(|(_, nick)| Arc::clone(nick))
            .collect();
        let remote = self.cluster.iter().flat_map(|cluster| {
            let node = cluster.node();
            let members = cluster.members(room).into_iter();
            members
                .filter(move |member| &*member.node != node)
                .map(|member| member.label)
        });
        match names(local.into_iter().chain(remote)) {
            Some(others) => format!("* in {room}: {my_nick} (you), {others}"),
            None => format!("* in {room}: {my_nick} (you)"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Members> {
        // No code panics while holding it with a room half changed.
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `nicks` as a list for a line: at most [`WHO_LIMIT`] named, separated by commas,
/// and how many more; `None` for none.
fn names(nicks: impl IntoIterator<Item = Arc<str>>) -> Option<String> {
    let mut nicks = nicks.into_iter();
    let mut list = String::from(&*nicks.next()?);
    for nick in nicks.by_ref().take(WHO_LIMIT - 1) {
        list.push_str(", ");
        list.push_str(&nick);
    }
    let more = nicks.count();
    if more > 0 {
        // Writing to a String cannot fail.
        let _ = write!(list, " and {more} more");
    }
    Some(list)
}

/// One chat client: its nick and its room.
///
/// Every client starts as `guest<n>` in [`LOBBY`] (`guest<node tag>-<n>` on a cluster). A line is sent to everyone else in
/// the room as `<nick> line`; lines starting with `/` are commands:
///
/// - `/nick NAME`: change your nick, if nobody else has it (in any case) and it is not
///   a cluster guest's (`guest<node>-<n>`);
/// - `/join ROOM`: leave your room for another (made on first use);
/// - `/who`: list who is in your room, in one line: you, then up to [`WHO_LIMIT`]
///   others, then how many more there are;
/// - `/quit`: leave.
///
/// Nicks and room names are 1 to [`MAX_NAME_LENGTH`] ASCII letters, digits, `-`, `_`
/// and `.`; a message loses its control characters, and one over
/// [`MAX_MESSAGE_LENGTH`] characters is refused with an error line.
///
/// Lines from the server itself start with `*`; comings and goings are announced in
/// rooms of up to [`ANNOUNCE_LIMIT`] members. Who is where lives in the shared
/// [`Rooms`], the server's application state; lines travel through the rooms' groups
/// and the members' mailboxes. A member who stops reading does not hold up the room:
/// its replies pile up to the server's output limit, or its mailbox fills, and it is
/// closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    nick: Arc<str>,
    room: Arc<str>,
    /// A nick being claimed across the cluster.
    claiming: Option<Arc<str>>,
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

    /// Says `text` to everyone else in the room.
    fn say(&self, text: String, ctx: &mut Ctx<'_, Self, Rooms>) {
        ctx.broadcast(&self.room, ChatMessage::Line(text.into()));
    }

    /// Tells everyone else in the room of a coming, going or renaming, unless the room
    /// is too large for that ([`ANNOUNCE_LIMIT`]).
    fn announce(&self, text: String, ctx: &mut Ctx<'_, Self, Rooms>) {
        if ctx.state().size(&self.room) <= ANNOUNCE_LIMIT {
            self.say(text, ctx);
        }
    }

    fn join(&mut self, room: &str, ctx: &mut Ctx<'_, Self, Rooms>) {
        if room == &*self.room {
            ctx.send(format!("* you are already in {room}").into());
            return;
        }
        self.announce(format!("* {} left for {room}", self.nick), ctx);
        ctx.leave(&self.room);
        ctx.state().leave(&self.room, ctx.id());
        self.room = room.into();
        ctx.join_as(room, &self.nick);
        ctx.state().enter(&self.room, ctx.id(), &self.nick);
        self.announce(format!("* {} joined {room}", self.nick), ctx);
        ctx.send(format!("* you are in {room}").into());
    }

    fn rename(&mut self, nick: &str, ctx: &mut Ctx<'_, Self, Rooms>) {
        if nick == &*self.nick {
            ctx.send(format!("* you are already {nick}").into());
            return;
        }
        if self.claiming.is_some() {
            ctx.send("* wait: another nick is being claimed".into());
            return;
        }
        if is_cluster_guest(nick) {
            let refusal =
                format!("* the nick {nick} is a guest's: guest<node>-<n> is the server's");
            ctx.send(refusal.into());
            return;
        }
        match ctx.state().claim(nick, ctx.id()) {
            Claim::Granted => self.renamed(nick, ctx),
            Claim::Taken => ctx.send(format!("* the nick {nick} is taken").into()),
            Claim::Unavailable => {
                ctx.send("* nicks cannot be changed now: the cluster is unreachable".into());
            }
            Claim::Asking(asking) => {
                let nick: Arc<str> = nick.into();
                self.claiming = Some(Arc::clone(&nick));
                ctx.spawn(async move {
                    let granted = asking.await;
                    ChatMessage::Claimed { nick, granted }
                });
            }
        }
    }

    /// `nick` is the client's now.
    fn renamed(&mut self, nick: &str, ctx: &mut Ctx<'_, Self, Rooms>) {
        if !self.nick.eq_ignore_ascii_case(nick) {
            ctx.state().release(&self.nick, ctx.id());
        }
        self.announce(format!("* {} is now {nick}", self.nick), ctx);
        self.nick = nick.into();
        ctx.state().enter(&self.room, ctx.id(), &self.nick);
        ctx.join_as(&self.room, &self.nick);
        ctx.send(format!("* you are now {nick}").into());
    }
}

/// Whether `nick` has the form of a guest's nick on a cluster, `guest<node>-<n>` (in
/// any case, with any suffix): the server gives those out, checking its own node only,
/// so nobody may take one.
fn is_cluster_guest(nick: &str) -> bool {
    let Some(rest) = nick.get(..5).filter(|g| g.eq_ignore_ascii_case("guest")) else {
        return false;
    };
    let rest = &nick[rest.len()..];
    let Some((tag, number)) = rest.split_once('-') else {
        return false;
    };
    let digits = number.bytes().take_while(u8::is_ascii_digit).count();
    !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()) && digits > 0
}

/// Checks a nick or room name: 1 to [`MAX_NAME_LENGTH`] characters, each an ASCII
/// letter or digit, `-`, `_` or `.`: nothing that could pass for the server's `*`, a
/// speaker's `<nick>`, or move the cursor.
fn valid_name(name: &str) -> Result<&str, String> {
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_LENGTH {
        Err(format!("names are 1 to {MAX_NAME_LENGTH} characters"))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Err("names are letters, digits, '-', '_' and '.' only".to_owned())
    } else {
        Ok(name)
    }
}

/// A message without its control characters (C0, DEL, C1: `\r`, escape sequences and
/// the like), so that no one can print a line that seems to come from someone else.
fn clean(message: &str) -> String {
    message.chars().filter(|c| !c.is_control()).collect()
}

impl Protocol<Rooms> for Chat {
    type Codec = Lines;
    type Reply = Arc<str>;
    type Message = ChatMessage;

    fn connect(ctx: &mut Ctx<'_, Self, Rooms>) -> Self {
        // guest<n> (guest<node tag>-<n> on a cluster), unless someone has taken it as
        // a nick: then guest<n>.2, ...
        let id = ctx.id();
        let guest = match id.node_tag() {
            0 => format!("guest{}", id.number()),
            tag => format!("guest{tag}-{}", id.number()),
        };
        let mut nick = guest.clone();
        let mut suffix = 1;
        while !ctx.state().claim_here(&nick, id) {
            suffix += 1;
            nick = format!("{guest}.{suffix}");
        }
        let chat = Chat {
            nick: nick.into(),
            room: LOBBY.into(),
            claiming: None,
        };
        ctx.join_as(LOBBY, &chat.nick);
        ctx.state().enter(&chat.room, ctx.id(), &chat.nick);
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

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self, Rooms>) -> Next {
        let Some(command) = line.strip_prefix('/') else {
            let message = clean(&line);
            if message.chars().count() > MAX_MESSAGE_LENGTH {
                let refusal =
                    format!("* message too long: at most {MAX_MESSAGE_LENGTH} characters");
                ctx.send(refusal.into());
            } else if !message.is_empty() {
                self.say(format!("<{}> {message}", self.nick), ctx);
            }
            return Next::Continue;
        };
        let (command, argument) = command.split_once(' ').unwrap_or((command, ""));
        match (command, valid_name(argument.trim())) {
            ("nick", Ok(nick)) => self.rename(nick, ctx),
            ("join", Ok(room)) => self.join(room, ctx),
            ("nick" | "join", Err(why)) => ctx.send(format!("* {why}").into()),
            ("who", _) => {
                let who = ctx.state().who(&self.room, ctx.id(), &self.nick);
                ctx.send(who.into());
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

    fn message(&mut self, message: ChatMessage, ctx: &mut Ctx<'_, Self, Rooms>) -> Next {
        match message {
            ChatMessage::Line(text) => ctx.send(text),
            ChatMessage::Claimed { nick, granted } => {
                self.claiming = None;
                if granted {
                    self.renamed(&nick, ctx);
                } else {
                    ctx.send(format!("* the nick {nick} is taken").into());
                }
            }
        }
        Next::Continue
    }

    fn shutdown(&mut self, ctx: &mut Ctx<'_, Self, Rooms>) -> Next {
        ctx.send("* server shutting down, goodbye".into());
        Next::Close
    }

    fn closed(&mut self, _: &CloseReason, ctx: &mut Ctx<'_, Self, Rooms>) {
        // However it ended: /quit, a disconnect, a reset, a timeout.
        ctx.state().leave(&self.room, ctx.id());
        ctx.state().release(&self.nick, ctx.id());
        if let Some(nick) = &self.claiming {
            ctx.state().release(nick, ctx.id());
        }
        self.announce(format!("* {} left", self.nick), ctx);
    }

    fn state_name(&self) -> &'static str {
        "CHATTING"
    }
}
