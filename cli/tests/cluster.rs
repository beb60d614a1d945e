//! Scale-out: three `linedancer serve chat` nodes on one real NATS server
//! (`nats-server`), behind a real HAProxy (`balance leastconn`, `send-proxy-v2`), both
//! installed by `.ci/run`. Three hundred clients in three rooms each get every line of
//! their room once, in each sender's order; each client's address reaches its node;
//! a node killed with SIGKILL leaves the others serving with nothing lost, and its
//! members leave the rooms' lists; a restarted NATS server brings delivery back.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

use common::{http, linedancer, serve_command, Serving};

/// Clients, rooms, and lines each client says per round.
const CLIENTS: usize = 300;
const ROOMS: usize = 3;
const LINES: usize = 5;

/// The whole test's bound.
const BOUND: Duration = Duration::from_secs(150);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `addr` takes connections, or `child` exits (a failure).
async fn until_listening(child: &mut Child, addr: SocketAddr, what: &str) {
    for _ in 0..400 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}");
        }
        sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not listen on {addr}");
}

async fn nats_server(port: u16) -> Child {
    let mut child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server must be installed (.ci/run installs it)");
    until_listening(&mut child, ([127, 0, 0, 1], port).into(), "nats-server").await;
    child
}

/// A chat client: its nick, its address, the lines it has heard, and its writer.
struct Client {
    nick: String,
    local: SocketAddr,
    lines: mpsc::UnboundedReceiver<String>,
    writer: OwnedWriteHalf,
    /// Lines of others heard so far: `(sender, round, k)`.
    heard: Vec<(String, usize, usize)>,
    /// Anything else heard (announcements, replies), for `/who`.
    other: Vec<String>,
    closed: bool,
}

impl Client {
    async fn connect(front: SocketAddr) -> Client {
        let stream = TcpStream::connect(front).await.unwrap();
        let local = stream.local_addr().unwrap();
        let (reader, writer) = stream.into_split();
        let (send, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        let mut client = Client {
            nick: String::new(),
            local,
            lines,
            writer,
            heard: Vec::new(),
            other: Vec::new(),
            closed: false,
        };
        let welcome = client.next_other().await.expect("a welcome");
        let nick = welcome
            .strip_prefix("* welcome, ")
            .and_then(|rest| rest.split_once(':'))
            .unwrap_or_else(|| panic!("not a welcome: {welcome}"))
            .0;
        client.nick = nick.to_owned();
        client
    }

    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
    }

    /// Sorts `line` into what was said and the rest.
    fn take(&mut self, line: String) -> Option<String> {
        if let Some((sender, said)) = line.strip_prefix('<').and_then(|l| l.split_once("> ")) {
            let mut words = said.split(' ');
            if let (Some("m"), Some(round), Some(k)) = (words.next(), words.next(), words.next()) {
                let (round, k) = (round.parse().unwrap(), k.parse().unwrap());
                self.heard.push((sender.to_owned(), round, k));
                return None;
            }
        }
        Some(line)
    }

    /// The next line that is not a line said in the room; `None` once closed.
    async fn next_other(&mut self) -> Option<String> {
        loop {
            let line = self.lines.recv().await?;
            if let Some(line) = self.take(line) {
                return Some(line);
            }
        }
    }

    /// Takes every line that has arrived, without waiting.
    fn drain(&mut self) {
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    if let Some(line) = self.take(line) {
                        self.other.push(line);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// Waits for a line starting with `prefix`; the lines before it are kept in
    /// `other`.
    async fn wait_for(&mut self, prefix: &str) -> String {
        loop {
            let line = (self.next_other().await)
                .unwrap_or_else(|| panic!("{} closed before {prefix:?}", self.nick));
            if line.starts_with(prefix) {
                return line;
            }
            self.other.push(line);
        }
    }

    /// How many members `/who` counts in the client's room, itself included.
    async fn who(&mut self) -> usize {
        self.send("/who").await;
        let line = self.wait_for("* in ").await;
        let (_, list) = line.split_once(": ").unwrap();
        let (named, more) = match list.rsplit_once(" and ") {
            Some((named, more)) => (named, more.trim_end_matches(" more").parse().unwrap()),
            None => (list, 0),
        };
        named.split(", ").count() + more
    }
}

/// Says `LINES` lines of `round` from every client in `indices`, all at once, so that
/// the senders interleave.
async fn say_round(clients: &mut [Client], indices: &[usize], round: usize) {
    let indices: HashSet<usize> = indices.iter().copied().collect();
    let saying = (clients.iter_mut().enumerate())
        .filter(|(i, _)| indices.contains(i))
        .map(|(_, client)| async move {
            for k in 0..LINES {
                client.send(&format!("m {round} {k}")).await;
            }
        });
    futures_util::future::join_all(saying).await;
}

/// What one round delivered: to each speaker, the lines of the round from every other
/// speaker of its room.
struct Delivery {
    expected: usize,
    delivered: usize,
    duplicates: usize,
    out_of_order: usize,
    missing: usize,
}

/// Every client in `speakers` says `LINES` lines of `round`; then checks that each heard
/// every line of the others in its room once, in each sender's order, and prints the
/// figures as `what`.
async fn round(
    clients: &mut [Client],
    speakers: &[usize],
    room_of: &[usize],
    round: usize,
    what: &str,
) {
    let start = Instant::now();
    say_round(clients, speakers, round).await;
    let delivery = collect_round(clients, speakers, room_of, round).await;
    eprintln!("{what}: heard in {:?}", start.elapsed());
    check(&delivery, what);
}

/// What `round` delivered to `speakers`, waiting up to 30 s for all of it.
async fn collect_round(
    clients: &mut [Client],
    speakers: &[usize],
    room_of: &[usize],
    round: usize,
) -> Delivery {
    let expected_for = |clients: &[Client], l: usize| -> HashSet<String> {
        (speakers.iter())
            .filter(|&&s| s != l && room_of[s] == room_of[l])
            .map(|&s| clients[s].nick.clone())
            .collect()
    };
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut complete = true;
        for &l in speakers {
            clients[l].drain();
            let want = expected_for(clients, l).len() * LINES;
            let got = (clients[l].heard.iter()).filter(|h| h.1 == round).count();
            complete &= got >= want;
        }
        if complete || Instant::now() >= end {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let mut delivery = Delivery {
        expected: 0,
        delivered: 0,
        duplicates: 0,
        out_of_order: 0,
        missing: 0,
    };
    for &l in speakers {
        let from = expected_for(clients, l);
        delivery.expected += from.len() * LINES;
        let mut by_sender: HashMap<&str, Vec<usize>> = HashMap::new();
        for (sender, r, k) in &clients[l].heard {
            if *r == round {
                by_sender.entry(sender).or_default().push(*k);
            }
        }
        for sender in &from {
            let ks = by_sender.remove(sender.as_str()).unwrap_or_default();
            delivery.delivered += ks.len();
            let distinct: HashSet<_> = ks.iter().collect();
            delivery.duplicates += ks.len() - distinct.len();
            delivery.missing += LINES - distinct.len();
            delivery.out_of_order += ks.windows(2).filter(|w| w[0] >= w[1]).count();
        }
        // Lines from outside the room, or from itself: never.
        assert!(
            by_sender.is_empty(),
            "{} heard {by_sender:?}",
            clients[l].nick
        );
    }
    delivery
}

fn check(delivery: &Delivery, what: &str) {
    eprintln!(
        "{what}: expected {}, delivered {}, missing {}, duplicates {}, out of order {}",
        delivery.expected,
        delivery.delivered,
        delivery.missing,
        delivery.duplicates,
        delivery.out_of_order
    );
    assert_eq!(delivery.missing, 0, "{what}: lines lost");
    assert_eq!(delivery.duplicates, 0, "{what}: lines twice");
    assert_eq!(delivery.out_of_order, 0, "{what}: lines out of order");
    assert_eq!(delivery.delivered, delivery.expected, "{what}");
}

/// Waits until every client in `probes` counts `sizes[room]` members with `/who`.
async fn until_rooms(clients: &mut [Client], probes: &[usize], sizes: &[usize], room_of: &[usize]) {
    for &p in probes {
        let want = sizes[room_of[p]];
        let mut tries = 0;
        loop {
            let seen = clients[p].who().await;
            if seen == want {
                break;
            }
            tries += 1;
            assert!(
                tries < 200,
                "{} sees {seen} members, not {want}",
                clients[p].nick
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The peers of every connection a node lists on its admin endpoint.
async fn peers(admin: &str) -> HashSet<String> {
    let (status, body) = http(admin, "GET", "/connections?limit=1000", None).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    (json["connections"].as_array().unwrap().iter())
        .map(|c| c["peer"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_chat_nodes_behind_haproxy_on_nats() {
    timeout(BOUND, scale_out())
        .await
        .expect("the test ran too long");
}

async fn scale_out() {
    let nats_port = free_port();
    let mut nats = nats_server(nats_port).await;
    let url = format!("nats://127.0.0.1:{nats_port}");

    // Three nodes, each with an admin endpoint to list its connections' peers.
    let mut nodes: Vec<(Serving, String)> = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let mut command = linedancer(&[
            "serve",
            "chat",
            "--port",
            "0",
            "--threads",
            "1",
            "--proxy-protocol",
            "--proxy-from",
            "127.0.0.1",
            "--cluster",
            &url,
            "--node",
            name,
            "--admin",
            "127.0.0.1:0",
        ]);
        command.env("RUST_LOG", "warn");
        let mut node = serve_command(command).await;
        let line = node.log.wait_for("admin on http://").await;
        let admin = line.rsplit_once("http://").unwrap().1.to_owned();
        nodes.push((node, admin));
    }

    let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    let servers: String = (nodes.iter().enumerate())
        .map(|(i, (node, _))| format!("  server n{} {} send-proxy-v2\n", i + 1, node.addr))
        .collect();
    std::fs::write(
        &config,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  \
             timeout server 120s\n\
             frontend chat\n  bind {front}\n  default_backend nodes\n\
             backend nodes\n  balance leastconn\n{servers}"
        ),
    )
    .unwrap();
    let mut haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy must be installed (.ci/run installs it)");
    until_listening(&mut haproxy, front, "haproxy").await;

    // 300 clients, 100 in each of rooms r0, r1, r2; each three in a row in different
    // rooms, and each room's members spread over the nodes whatever order leastconn
    // takes them in.
    let started = Instant::now();
    let mut clients = Vec::with_capacity(CLIENTS);
    let room_of: Vec<usize> = (0..CLIENTS).map(|i| (i / ROOMS + i) % ROOMS).collect();
    for (i, room) in room_of.iter().enumerate() {
        let mut client = Client::connect(front).await;
        client.send(&format!("/join r{room}")).await;
        clients.push(client);
        if i % 50 == 49 {
            for client in &mut clients[i - 49..] {
                client.wait_for("* you are in r").await;
            }
        }
    }
    eprintln!(
        "{CLIENTS} clients connected and in their rooms in {:?}",
        started.elapsed()
    );

    // Which node each client is on, from the nodes' lists: every client's own address.
    let mut node_of = vec![usize::MAX; CLIENTS];
    for (n, (_, admin)) in nodes.iter().enumerate() {
        let peers = peers(admin).await;
        for (i, client) in clients.iter().enumerate() {
            if peers.contains(&client.local.to_string()) {
                assert_eq!(node_of[i], usize::MAX, "{} on two nodes", client.local);
                node_of[i] = n;
            }
        }
    }
    let unplaced = node_of.iter().filter(|n| **n == usize::MAX).count();
    assert_eq!(unplaced, 0, "clients whose address no node lists");
    let per_node: BTreeMap<usize, usize> = node_of.iter().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(*n).or_default() += 1;
        m
    });
    eprintln!("clients per node: {per_node:?}");
    for n in 0..nodes.len() {
        for room in 0..ROOMS {
            let here = (0..CLIENTS).any(|i| node_of[i] == n && room_of[i] == room);
            assert!(
                here,
                "no member of r{room} on node {n}: the rooms do not span the nodes"
            );
        }
    }

    // Every room's member list, seen from each node, holds all 100 members.
    let probe = |node: usize, room: usize, node_of: &[usize]| {
        (0..CLIENTS)
            .find(|&i| node_of[i] == node && room_of[i] == room)
            .unwrap()
    };
    let probes: Vec<usize> = (0..nodes.len())
        .flat_map(|n| (0..ROOMS).map(move |r| (n, r)))
        .map(|(n, r)| probe(n, r, &node_of))
        .collect();
    let sizes = vec![CLIENTS / ROOMS; ROOMS];
    until_rooms(&mut clients, &probes, &sizes, &room_of).await;

    // Round 1: everyone speaks.
    let everyone: Vec<usize> = (0..CLIENTS).collect();
    round(&mut clients, &everyone, &room_of, 1, "round 1, three nodes").await;

    // SIGKILL node 1: its clients are cut off; the others go on.
    let killed = 0;
    nodes[killed].0.signal(libc::SIGKILL);
    let kill_time = Instant::now();
    let survivors: Vec<usize> = (0..CLIENTS).filter(|&i| node_of[i] != killed).collect();
    let mut sizes = vec![0; ROOMS];
    for &i in &survivors {
        sizes[room_of[i]] += 1;
    }
    let probes: Vec<usize> = (1..nodes.len())
        .flat_map(|n| (0..ROOMS).map(move |r| (n, r)))
        .map(|(n, r)| probe(n, r, &node_of))
        .collect();
    until_rooms(&mut clients, &probes, &sizes, &room_of).await;
    let gone_after = kill_time.elapsed();
    eprintln!("the killed node's members left the lists {gone_after:?} after SIGKILL");
    round(
        &mut clients,
        &survivors,
        &room_of,
        2,
        "round 2, after a node was killed",
    )
    .await;
    // Each survivor was told, in one line, of the members of its room that went with
    // the node: every one of them, once.
    for &i in &survivors {
        let want: Vec<String> = (0..CLIENTS)
            .filter(|&k| node_of[k] == killed && room_of[k] == room_of[i])
            .map(|k| clients[k].nick.clone())
            .collect();
        let client = &mut clients[i];
        client.drain();
        let gone = " left (their server went away)";
        let mut told: Vec<String> = client
            .other
            .drain(..)
            .filter(|l| l.ends_with(gone))
            .collect();
        if told.is_empty() {
            let line = timeout(Duration::from_secs(10), async {
                loop {
                    let line = (client.next_other().await).expect("a survivor stays connected");
                    if line.ends_with(gone) {
                        return line;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{} was not told of the lost members", client.nick));
            told.push(line);
        }
        assert_eq!(told.len(), 1, "{}: {told:?}", client.nick);
        let named = told[0]
            .strip_prefix("* ")
            .and_then(|l| l.strip_suffix(gone))
            .unwrap_or_else(|| panic!("{}", told[0]));
        let mut named: Vec<&str> = named.split(", ").collect();
        let mut expected: Vec<&str> = want.iter().map(String::as_str).collect();
        named.sort_unstable();
        expected.sort_unstable();
        assert_eq!(named, expected, "{}", client.nick);
    }
    eprintln!(
        "{} survivors told, in one line each, of the members of their room gone with the \
         node",
        survivors.len()
    );
    for i in (0..CLIENTS).filter(|&i| node_of[i] == killed).take(5) {
        let client = &mut clients[i];
        let cut = timeout(Duration::from_secs(10), async {
            while client.lines.recv().await.is_some() {}
        })
        .await;
        assert!(cut.is_ok(), "a client of the killed node still connected");
    }

    // Restart NATS: delivery across nodes comes back.
    nats.kill().await.unwrap();
    let down = Instant::now();
    let _nats = nats_server(nats_port).await;
    // Both ways: each node's subscriptions are back once it hears the other.
    let a = probe(1, 0, &node_of);
    let b = probe(2, 0, &node_of);
    let mut probes_sent = 0;
    let mut heard = [false, false];
    let resumed = loop {
        for (side, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
            if !heard[side] {
                clients[from].send("probe").await;
            }
            let got = timeout(Duration::from_millis(50), clients[to].wait_for("<")).await;
            heard[side] |= got.is_ok_and(|line| line.ends_with("> probe"));
        }
        probes_sent += 1;
        assert!(probes_sent < 200, "delivery across nodes did not resume");
        if heard == [true, true] {
            break down.elapsed();
        }
    };
    eprintln!("delivery across nodes resumed {resumed:?} after NATS went down");
    round(
        &mut clients,
        &survivors,
        &room_of,
        3,
        "round 3, after NATS restarted",
    )
    .await;
    // Nobody was told of a loss again: not for the killed node, not for NATS's restart.
    for &i in &survivors {
        let told: Vec<&String> = (clients[i].other.iter())
            .filter(|l| l.ends_with(" left (their server went away)"))
            .collect();
        assert!(
            told.is_empty(),
            "{} was told again: {told:?}",
            clients[i].nick
        );
    }
    for (node, _) in &mut nodes[1..] {
        assert!(node.child.try_wait().unwrap().is_none(), "a node exited");
    }
}
