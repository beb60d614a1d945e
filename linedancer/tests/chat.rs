//! Mailboxes, groups, spawned work and connection listings, and the chat server built
//! on them: over real sockets, and in the harness.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, serve, LineClient};
use linedancer::cluster::ClusterMessage;
use linedancer::codec::Lines;
use linedancer::examples::{
    Chat, ChatMessage, Rooms, ANNOUNCE_LIMIT, LOBBY, MAX_MESSAGE_LENGTH, WHO_LIMIT,
};
use linedancer::testing::{Harness, Outgoing};
use linedancer::{ConnectionId, Ctx, Next, Protocol, SendError, Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

/// Writes every message it gets as a line; greets with `ready` so that a client knows
/// it has been accepted, and says `bye` when the server shuts down.
struct Inbox;

impl Protocol for Inbox {
    type Codec = Lines;
    type Reply = String;
    type Message = u32;

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        ctx.send("ready".into());
        Inbox
    }

    fn frame(&mut self, _: String, _: &mut Ctx<'_, Self>) -> Next {
        Next::Continue
    }

    fn message(&mut self, n: u32, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(n.to_string());
        Next::Continue
    }

    fn shutdown(&mut self, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send("bye".into());
        Next::Close
    }
}

/// Starts a chat server on a free port, with rooms of its own, and `limits` applied.
async fn chat_server(
    limits: impl FnOnce(linedancer::Builder<()>) -> linedancer::Builder<()>,
) -> (ServerHandle<ChatMessage>, Arc<Rooms>) {
    let rooms = Arc::new(Rooms::default());
    let server = limits(Server::builder().port(0))
        .state(Arc::clone(&rooms))
        .protocol::<Chat>()
        .start()
        .await
        .expect("start the chat server");
    (server, rooms)
}

/// Connects a client and waits for its greeting; returns it with its connection id.
async fn accepted(server: &ServerHandle<u32>) -> (LineClient, ConnectionId) {
    let client = LineClient::connect(server.local_addr()).await;
    let mut client = client;
    client.expect_line().await;
    let local = client.writer.local_addr().unwrap();
    let id = (server.connections_info().into_iter())
        .find(|info| info.peer_addr == local)
        .expect("listed")
        .id;
    (client, id)
}

/// Ensure messages sent to a connection arrive in the order they were sent, and that
/// sending to a closed connection fails with a clear error. (A message of the wrong
/// type does not compile: see `ServerHandle::send_to`.)
#[tokio::test]
async fn a_mailbox_delivers_in_send_order() {
    bounded(async {
        let server = serve::<Inbox>().await;
        let (mut client, id) = accepted(&server).await;
        for n in 0..1000u32 {
            server.send_to(id, n).unwrap();
            if n % 100 == 0 {
                tokio::task::yield_now().await; // let some be delivered meanwhile
            }
        }
        for n in 0..1000u32 {
            assert_eq!(client.expect_line().await, n.to_string());
        }
        assert_eq!(
            server.send_to(ConnectionId(999), 1u32),
            Err(SendError::NotOpen(ConnectionId(999)))
        );
        drop(client);
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.send_to(id, 1u32), Err(SendError::NotOpen(id)));
        server.shutdown().await;
    })
    .await;
}

/// Ensure every wake-up reaches a connection that has gone idle, however many came
/// before: messages one at a time, each answered before the next is sent, then the
/// shutdown, which must find the connection still listening and drain it.
#[tokio::test]
async fn an_idle_connection_hears_every_wake_up() {
    bounded(async {
        let server = serve::<Inbox>().await;
        let (mut client, id) = accepted(&server).await;
        for n in 0..200u32 {
            server.send_to(id, n).unwrap();
            assert_eq!(client.expect_line().await, n.to_string());
        }
        let report = server.shutdown_with_timeout(Duration::from_secs(30)).await;
        assert_eq!(client.expect_line().await, "bye");
        assert_eq!((report.drained, report.force_closed), (1, 0));
    })
    .await;
}

/// Ensure a mailbox that fills up never blocks the sender nor grows: the message that
/// finds it full is refused, and the receiver is closed with its own reason.
#[tokio::test]
async fn a_full_mailbox_closes_the_receiver() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            .mailbox_capacity(8)
            .protocol::<Inbox>()
            .start()
            .await
            .unwrap();
        let (mut client, id) = accepted(&server).await;
        // This test's runtime has one thread: the connection cannot take any message
        // before this loop ends.
        let sent: Vec<_> = (0..20u32).map(|n| server.send_to(id, n)).collect();
        assert!(sent[..8].iter().all(Result::is_ok), "{sent:?}");
        assert!(
            sent[8..]
                .iter()
                .all(|r| *r == Err(SendError::MailboxFull(id))),
            "{sent:?}"
        );
        assert_eq!(client.line().await, None, "closed");
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.mailbox_overflow, 1);
        server.shutdown().await;
    })
    .await;
}

/// Answers every line after a pause, from work spawned off the callback.
struct Later;

impl Protocol for Later {
    type Codec = Lines;
    type Reply = String;
    type Message = String;

    fn connect(_: &mut Ctx<'_, Self>) -> Self {
        Later
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            line.to_uppercase()
        });
        Next::Continue
    }

    fn message(&mut self, answer: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(answer);
        Next::Continue
    }
}

/// Ensure work spawned from a callback delivers its result as a message.
#[tokio::test]
async fn spawned_work_answers_with_a_message() {
    bounded(async {
        let server = serve::<Later>().await;
        let mut client = LineClient::connect(server.local_addr()).await;
        for word in ["one", "two", "three"] {
            client.send(word).await;
            assert_eq!(client.expect_line().await, word.to_uppercase());
        }
        drop(client);
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure the harness runs spawned work and delivers its results.
#[test]
fn spawned_work_in_the_harness() {
    let mut conn = Harness::<Later>::connect();
    conn.feed("hello\nworld\n");
    assert_eq!(conn.take_text(), "", "nothing before the work is done");
    assert_eq!(conn.run_spawned(), 2);
    assert_eq!(conn.take_text(), "HELLO\nWORLD\n");
    assert_eq!(conn.run_spawned(), 0);
}

/// Ensure the handle lists live connections with their peer, state and bytes, and
/// that group membership ends with the connection.
#[tokio::test]
async fn live_connections_are_listed_and_leave_their_groups() {
    bounded(async {
        let (server, rooms) = chat_server(|b| b).await;
        let mut ann = LineClient::connect(server.local_addr()).await;
        ann.expect_line().await;
        let mut bob = LineClient::connect(server.local_addr()).await;
        bob.expect_line().await;
        bob.send("/join kitchen").await;
        assert_eq!(bob.expect_line().await, "* you are in kitchen");

        let list = server.connections_info();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].peer_addr, ann.writer.local_addr().unwrap());
        assert_eq!(list[1].peer_addr, bob.writer.local_addr().unwrap());
        assert!(list.iter().all(|info| info.state == "CHATTING"));
        assert_eq!(list[1].bytes_in, "/join kitchen\n".len() as u64);
        assert!(list[1].bytes_out > 0);
        assert!(list[0].since <= list[1].since);
        assert_eq!(server.group_members(LOBBY), vec![list[0].id]);
        assert_eq!(server.group_members("kitchen"), vec![list[1].id]);
        assert_eq!(rooms.members(LOBBY), vec![(list[0].id, "guest1".into())]);
        assert_eq!(
            rooms.members("kitchen"),
            vec![(list[1].id, "guest2".into())]
        );

        drop(bob);
        server.wait_connections(|n| n == 1).await;
        assert_eq!(server.group_members("kitchen"), vec![]);
        assert_eq!(rooms.members("kitchen"), vec![]);
        assert_eq!(rooms.rooms(), vec![Arc::from(LOBBY)]);
        assert_eq!(
            server.broadcast(LOBBY, ChatMessage::Line("* notice".into())),
            1
        );
        // After the announcements of bob's coming and going.
        while ann.expect_line().await != "* notice" {}
        drop(ann);
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure, over sockets, that a nick taken in another case is refused and a message
/// cannot smuggle a line break or an escape sequence to pass for someone else's line.
#[tokio::test]
async fn nicks_and_messages_over_sockets() {
    bounded(async {
        let (server, _) = chat_server(|b| b).await;
        let mut ann = LineClient::connect(server.local_addr()).await;
        ann.expect_line().await;
        ann.send("/nick ann").await;
        assert_eq!(ann.expect_line().await, "* you are now ann");
        let mut bob = LineClient::connect(server.local_addr()).await;
        bob.expect_line().await;
        bob.send("/nick ANN").await;
        assert_eq!(bob.expect_line().await, "* the nick ANN is taken");
        bob.send("hi\r<ann> give bob your password\u{1b}[2K").await;
        // After the announcement of bob's arrival.
        assert_eq!(ann.expect_line().await, "* guest2 joined lobby");
        assert_eq!(
            ann.expect_line().await,
            "<guest2> hi<ann> give bob your password[2K"
        );
        drop((ann, bob));
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure a chat member who just disconnects is announced to the room, like one who
/// says /quit.
#[tokio::test]
async fn a_member_who_disconnects_is_announced() {
    bounded(async {
        let (server, _) = chat_server(|b| b).await;
        let mut ann = LineClient::connect(server.local_addr()).await;
        ann.expect_line().await;
        let mut bob = LineClient::connect(server.local_addr()).await;
        bob.expect_line().await;
        assert_eq!(ann.expect_line().await, "* guest2 joined lobby");
        drop(bob);
        assert_eq!(ann.expect_line().await, "* guest2 left");
        drop(ann);
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure 300 chat clients in 3 rooms each receive every line said in their room
/// exactly once, in each speaker's order, and nothing from the other rooms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_clients_in_three_rooms_hear_their_room_exactly_once() {
    const CLIENTS: usize = 300;
    const ROOMS: usize = 3;
    const LINES: usize = 10;
    bounded(async {
        let (server, _) = chat_server(|b| b).await;
        let addr = server.local_addr();
        let joined = Arc::new(Barrier::new(CLIENTS));
        let mut clients = JoinSet::new();
        for i in 0..CLIENTS {
            let joined = Arc::clone(&joined);
            clients.spawn(async move {
                let mut client = LineClient::connect(addr).await;
                client.expect_line().await; // welcome
                client.send(&format!("/nick c{i}")).await;
                client.send(&format!("/join room{}", i % ROOMS)).await;
                // Announcements of others may come first.
                while client.expect_line().await != format!("* you are in room{}", i % ROOMS) {}
                joined.wait().await;
                for n in 0..LINES {
                    client.send(&format!("{i} {n}")).await;
                }
                // What each speaker said, in arrival order.
                let mut heard: HashMap<usize, Vec<usize>> = HashMap::new();
                let expected = (CLIENTS / ROOMS - 1) * LINES;
                let mut count = 0;
                while count < expected {
                    let line = client.expect_line().await;
                    let Some(said) = line.strip_prefix('<') else {
                        continue; // announcements
                    };
                    let (nick, text) = said.split_once("> ").expect("<nick> text");
                    let (speaker, n) = text.split_once(' ').unwrap();
                    let (speaker, n): (usize, usize) =
                        (speaker.parse().unwrap(), n.parse().unwrap());
                    assert_eq!(nick, format!("c{speaker}"));
                    assert_eq!(speaker % ROOMS, i % ROOMS, "heard from another room");
                    assert_ne!(speaker, i, "heard itself");
                    heard.entry(speaker).or_default().push(n);
                    count += 1;
                }
                assert_eq!(heard.len(), CLIENTS / ROOMS - 1);
                for (speaker, lines) in heard {
                    assert_eq!(lines, (0..LINES).collect::<Vec<_>>(), "from c{speaker}");
                }
                // Nothing more than expected: once everyone is done, quit and check
                // that only server lines remain.
                client.send("/quit").await;
                while let Some(line) = client.line().await {
                    assert!(line.starts_with('*'), "unexpected {line}");
                }
            });
        }
        while let Some(client) = clients.join_next().await {
            client.expect("every client heard its room");
        }
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.closed, CLIENTS as u64);
        server.shutdown().await;
    })
    .await;
}

/// Ensure a client that pipelines 2,000 commands, `/quit` and 1 MiB more, and only
/// starts reading a second later, gets every reply and `* bye`, then a clean end of
/// stream: the server half-closes and discards what follows instead of closing with
/// unread input (which would reset the connection and destroy the replies).
#[tokio::test]
async fn replies_before_quit_survive_a_client_that_keeps_sending() {
    bounded(async {
        let (server, _) = chat_server(|b| b).await;
        let mut stream = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        // Each answered with a line naming it: 2 MB of replies, more than the socket
        // buffers and the output limit hold, so most wait in the server meanwhile.
        let command = format!("/{}", "c".repeat(1000));
        let mut requests = format!("{command}\n").repeat(2000);
        requests.push_str("/quit\n");
        let junk = format!("{}\n", "x".repeat(999)).repeat(1024);
        let (mut reader, mut writer) = stream.split();
        let send = async {
            writer.write_all(requests.as_bytes()).await.unwrap();
            // The server may have finished discarding and closed before all went.
            let _ = writer.write_all(junk.as_bytes()).await;
        };
        let receive = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut received = Vec::new();
            reader
                .read_to_end(&mut received)
                .await
                .expect("a clean end, not a reset");
            received
        };
        let ((), received) = tokio::join!(send, receive);
        let text = String::from_utf8(received).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("* welcome"));
        assert_eq!(
            lines.len(),
            1 + 2000 + 1,
            "{:?}",
            &lines[lines.len().saturating_sub(3)..]
        );
        let unknown = format!("* unknown command {command}: try /nick, /join, /who or /quit");
        assert!(lines[1..2001].iter().all(|l| *l == unknown));
        assert_eq!(lines[2001], "* bye");
        drop(stream);
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure a member who never reads is dropped, with its reason, while the rest of the
/// room goes on hearing everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_never_reads_is_dropped_and_the_room_goes_on() {
    // Lines of nearly the longest message; at most 64 MiB in all, far more than the
    // socket buffers between the server and the deaf member hold.
    const MAX_LINES: usize = 64 * 1024;
    bounded(async {
        let (server, _) = chat_server(|b| b.max_output(64 * 1024)).await;
        let addr = server.local_addr();
        // Connected one after the other: guest1, guest2, guest3.
        let mut deaf = LineClient::connect(addr).await;
        deaf.expect_line().await;
        let mut listener = LineClient::connect(addr).await;
        listener.expect_line().await;
        let mut speaker = LineClient::connect(addr).await;
        speaker.expect_line().await;
        let text = "x".repeat(MAX_MESSAGE_LENGTH - 10);
        let dropped = |server: &ServerHandle<ChatMessage>| {
            let closed = server.stats().closed;
            closed.output_overflow + closed.mailbox_overflow
        };
        // Line by line, each heard before the next is said: the listener keeps up,
        // the deaf member falls further behind with every line.
        let mut said = 0;
        while dropped(&server) == 0 {
            assert!(said < MAX_LINES, "the deaf member was never dropped");
            speaker.send(&format!("{said} {text}")).await;
            loop {
                let line = listener.expect_line().await;
                if let Some(heard) = line.strip_prefix("<guest3> ") {
                    assert_eq!(heard, format!("{said} {text}"));
                    break;
                }
            }
            said += 1;
        }
        // The room goes on.
        for n in 0..10 {
            speaker.send(&format!("after {n}")).await;
            while listener.expect_line().await != format!("<guest3> after {n}") {}
        }
        assert_eq!(server.connections(), 2);
        drop((deaf, listener, speaker));
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure `/who` in a room of 2,000 answers from the shared rooms in one bounded line,
/// and closes nobody: not the asker, not the members (whose arrivals, in a room that
/// large, are not announced to everyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_in_a_room_of_two_thousand_is_one_bounded_line() {
    const MEMBERS: usize = 2000;
    const PARALLEL: usize = 100;
    bounded(async {
        let (server, rooms) = chat_server(|b| b).await;
        let addr = server.local_addr();
        let mut members = Vec::with_capacity(MEMBERS);
        let mut connecting = JoinSet::new();
        for i in 0..MEMBERS {
            if i >= PARALLEL {
                members.push(connecting.join_next().await.unwrap().unwrap());
            }
            connecting.spawn(async move {
                let mut client = LineClient::connect(addr).await;
                client.expect_line().await; // welcome: accepted and in the lobby
                client
            });
        }
        members.extend(connecting.join_all().await);
        assert_eq!(rooms.size(LOBBY), MEMBERS);

        let mut asker = LineClient::connect(addr).await;
        asker.expect_line().await;
        asker.send("/nick asker").await;
        assert_eq!(asker.expect_line().await, "* you are now asker");
        asker.send("/who").await;
        let who = asker.expect_line().await;
        let (head, more) = who.rsplit_once(" and ").expect("names, and how many more");
        let names: Vec<&str> = head
            .strip_prefix("* in lobby: asker (you), ")
            .expect("the asker first")
            .split(", ")
            .collect();
        assert_eq!(names.len(), WHO_LIMIT);
        assert_eq!(names[..3], ["guest1", "guest2", "guest3"]);
        assert_eq!(more, format!("{} more", MEMBERS - WHO_LIMIT));
        assert!(who.len() < 2048, "{} bytes", who.len());

        // Still there, and so is everyone.
        asker.send("/who").await;
        assert_eq!(asker.expect_line().await, who);
        assert_eq!(server.connections(), MEMBERS + 1);
        assert_eq!(server.stats().closed.total(), 0);
        drop((asker, members));
        server.wait_connections(|n| n == 0).await;
        assert_eq!(rooms.size(LOBBY), 0);
        server.shutdown().await;
    })
    .await;
}

/// Ensure comings and goings are announced in a room up to the announcement limit,
/// and not beyond: chat connections sharing one state, in the harness.
#[test]
fn announcements_stop_in_large_rooms() {
    let rooms = Arc::new(Rooms::default());
    let connect = |id: u64| {
        let codec = Default::default();
        Harness::<Chat, Rooms>::connect_with(codec, Arc::clone(&rooms), ConnectionId(id))
    };
    let mut conns: Vec<_> = (1..=ANNOUNCE_LIMIT as u64).map(connect).collect();
    let last = conns.last_mut().unwrap();
    assert_eq!(
        last.take_outgoing()[1],
        Outgoing::Broadcast {
            group: LOBBY.into(),
            message: ChatMessage::Line(format!("* guest{ANNOUNCE_LIMIT} joined lobby").into()),
        }
    );
    let mut one_more = connect(ANNOUNCE_LIMIT as u64 + 1);
    assert_eq!(one_more.take_outgoing(), vec![Outgoing::Join(LOBBY.into())]);
    assert_eq!(rooms.size(LOBBY), ANNOUNCE_LIMIT + 1);
    one_more.feed("hello\n");
    assert_eq!(
        one_more.take_outgoing(),
        vec![Outgoing::Broadcast {
            group: LOBBY.into(),
            message: ChatMessage::Line(format!("<guest{}> hello", ANNOUNCE_LIMIT + 1).into()),
        }],
        "lines are said whatever the room's size"
    );
    one_more.feed_eof();
    assert_eq!(rooms.size(LOBBY), ANNOUNCE_LIMIT);
    conns[0].take_outgoing();
    conns[0].feed_eof();
    assert_eq!(
        conns[0].take_outgoing(),
        vec![Outgoing::Broadcast {
            group: LOBBY.into(),
            message: ChatMessage::Line("* guest1 left".into()),
        }]
    );
}

/// Ensure nicks are unique whatever their case, made only of safe characters, and
/// given back when their holder leaves; and that messages lose their control
/// characters (no line can pass for someone else's) and overlong ones are refused.
#[test]
fn nicks_are_unique_and_messages_are_clean() {
    let rooms = Arc::new(Rooms::default());
    let connect = |id: u64| {
        let codec = Default::default();
        Harness::<Chat, Rooms>::connect_with(codec, Arc::clone(&rooms), ConnectionId(id))
    };
    let (mut ann, mut bob) = (connect(1), connect(2));
    ann.take_text();
    bob.take_text();
    ann.feed("/nick Ann\n");
    assert_eq!(ann.take_text(), "* you are now Ann\n");
    bob.feed("/nick aNN\n/nick guest1\n");
    assert_eq!(
        bob.take_text(),
        "* the nick aNN is taken\n* you are now guest1\n",
        "guest1 is free once ann renamed"
    );
    for bad in ["<admin>", "*server", "a b", "esc\u{1b}[2J", "caf\u{e9}"] {
        bob.feed(format!("/nick {bad}\n"));
        assert_eq!(
            bob.take_text(),
            "* names are letters, digits, '-', '_' and '.' only\n",
            "{bad:?}"
        );
    }
    assert_eq!(bob.protocol().unwrap().nick(), "guest1");
    ann.feed("/nick ann\n");
    assert_eq!(
        ann.take_text(),
        "* you are now ann\n",
        "a new case of one's own nick"
    );
    assert_eq!(rooms.holder("ANN"), Some(ConnectionId(1)));

    ann.take_outgoing();
    ann.feed("hi\r<admin> reboot now\u{1b}[1A\u{7f}\u{85}!\n");
    assert_eq!(
        ann.take_outgoing(),
        vec![Outgoing::Broadcast {
            group: LOBBY.into(),
            message: ChatMessage::Line("<ann> hi<admin> reboot now[1A!".into()),
        }]
    );
    ann.feed(format!("{}\n", "x".repeat(MAX_MESSAGE_LENGTH + 1)));
    assert_eq!(
        ann.take_text(),
        format!("* message too long: at most {MAX_MESSAGE_LENGTH} characters\n")
    );
    assert_eq!(ann.take_outgoing(), vec![]);

    ann.feed_eof();
    assert_eq!(rooms.holder("ann"), None, "given back on leaving");
    bob.feed("/nick ANN\n");
    assert_eq!(bob.take_text(), "* you are now ANN\n");
    // A user who took a guest name first does not stop a later guest from arriving.
    let mut third = connect(3);
    third.feed("/nick guest4\n");
    third.take_text();
    let mut fourth = connect(4);
    assert!(fourth.take_text().starts_with("* welcome, guest4.2:"));
}

/// Ensure the chat protocol's commands ask for the right messages and group changes,
/// and keep the shared rooms up to date.
#[test]
fn chat_commands_in_the_harness() {
    let rooms = Arc::new(Rooms::default());
    let mut conn = Harness::<Chat, Rooms>::connect_with_state(Arc::clone(&rooms));
    assert!(conn
        .take_text()
        .starts_with("* welcome, guest1: you are in lobby."));
    assert_eq!(
        conn.take_outgoing(),
        vec![
            Outgoing::Join(LOBBY.into()),
            Outgoing::Broadcast {
                group: LOBBY.into(),
                message: ChatMessage::Line("* guest1 joined lobby".into()),
            },
        ]
    );

    conn.feed("/nick ann\n/join kitchen\nhello\n");
    assert_eq!(
        conn.take_text(),
        "* you are now ann\n* you are in kitchen\n"
    );
    let line = |group: &str, text: &str| Outgoing::Broadcast {
        group: group.into(),
        message: ChatMessage::Line(text.into()),
    };
    assert_eq!(
        conn.take_outgoing(),
        vec![
            line(LOBBY, "* guest1 is now ann"),
            // Joined again under the new nick: the label a cluster's member lists show.
            Outgoing::Join(LOBBY.into()),
            line(LOBBY, "* ann left for kitchen"),
            Outgoing::Leave(LOBBY.into()),
            Outgoing::Join("kitchen".into()),
            line("kitchen", "* ann joined kitchen"),
            line("kitchen", "<ann> hello"),
        ]
    );

    conn.feed("/nick two words\n/join\n/dance\n");
    assert_eq!(
        conn.take_text(),
        "* names are letters, digits, '-', '_' and '.' only\n* names are 1 to 32 characters\n\
         * unknown command /dance: try /nick, /join, /who or /quit\n"
    );
    assert_eq!(conn.take_outgoing(), vec![]);

    conn.deliver(ChatMessage::Line("<bob> hi".into()));
    conn.feed("/who\n");
    assert_eq!(conn.take_text(), "<bob> hi\n* in kitchen: ann (you)\n");
    assert_eq!(
        rooms.members("kitchen"),
        vec![(ConnectionId(1), "ann".into())]
    );
    assert_eq!(rooms.size(LOBBY), 0);

    let codec = Default::default();
    let mut bob = Harness::<Chat, Rooms>::connect_with(codec, Arc::clone(&rooms), ConnectionId(7));
    bob.feed("/nick bob\n/join kitchen\n");
    conn.feed("/who\n");
    assert_eq!(conn.take_text(), "* in kitchen: ann (you), bob\n");
    assert_eq!(conn.take_outgoing(), vec![]);

    conn.feed("/quit\n");
    assert_eq!(conn.take_text(), "* bye\n");
    assert!(conn.is_closed());
    assert_eq!(conn.take_outgoing(), vec![line("kitchen", "* ann left")]);
    assert_eq!(
        rooms.members("kitchen"),
        vec![(ConnectionId(7), "bob".into())]
    );
}

/// Ensure the line for members lost with their node names them in one bounded line:
/// up to `WHO_LIMIT`, then how many more; and that there is none for nobody.
#[test]
fn members_lost_with_their_node_are_one_bounded_line() {
    let line = |nicks: &[Arc<str>]| match ChatMessage::members_lost(LOBBY, nicks) {
        Some(ChatMessage::Line(line)) => Some(line.to_string()),
        Some(other) => panic!("not a line: {other:?}"),
        None => None,
    };
    assert_eq!(line(&[]), None);
    assert_eq!(
        line(&["ann".into()]).as_deref(),
        Some("* ann left (their server went away)")
    );
    let many: Vec<Arc<str>> = (0..WHO_LIMIT + 10)
        .map(|n| format!("n{n}").into())
        .collect();
    let named: Vec<String> = (0..WHO_LIMIT).map(|n| format!("n{n}")).collect();
    assert_eq!(
        line(&many),
        Some(format!(
            "* {} and 10 more left (their server went away)",
            named.join(", ")
        ))
    );
}
