//! Servers on one real NATS server (`nats-server`, installed by `.ci/run`) acting as
//! one, through the public API over sockets on 127.0.0.1: chat rooms, `send_to` and
//! `kv` publish/subscribe across nodes, membership lists as members and nodes come and
//! go (a node that leaves, a node that falls silent), the bus going away and coming
//! back, and names unique across nodes.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{bounded, free_port};
use linedancer::cluster::{Claim, Cluster, ClusterOptions, Member, NatsBus};
use linedancer::codec::Lines;
use linedancer::examples::kv::{Db, Published};
use linedancer::examples::{Chat, ChatMessage, Kv, Rooms, LOBBY};
use linedancer::{Address, ConnectionId, Ctx, Next, Protocol, SendError, Server, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout, Instant};

/// How long a line or a reply that is due may take to arrive.
const PATIENCE: Duration = Duration::from_secs(5);

/// How often a condition that can only be polled is looked at.
const POLL: Duration = Duration::from_millis(20);

/// Polls `condition` until it holds, for `within` at most, and returns how long it
/// took; `what` names it in the failure.
async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        sleep(POLL).await;
    }
}

/// A NATS server of the test's own, on 127.0.0.1; killed when dropped.
struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    /// Starts one on a free port.
    async fn start() -> Nats {
        Nats::on_port(free_port()).await
    }

    /// Starts one on `port`, and waits until it takes connections.
    async fn on_port(port: u16) -> Nats {
        let spawn = |program: &str| {
            Command::new(program)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
        };
        let missing = |e: std::io::Error| -> Child {
            panic!("nats-server must be installed (.ci/run installs it): {e}")
        };
        // Debian puts it in /usr/sbin, which a non-root PATH may lack.
        let mut child = match spawn("nats-server") {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                spawn("/usr/sbin/nats-server").unwrap_or_else(missing)
            }
            Err(e) => missing(e),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        while TcpStream::connect(addr).await.is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nats-server exited with {status} before listening on {addr}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {addr}"
            );
            sleep(POLL).await;
        }
        Nats { child, port }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill nats-server");
    }
}

/// A TCP relay to a NATS server, for one node's bus: cutting it silences the node as a
/// crash would (no goodbye), and the relay can take connections again on the same
/// address.
struct Relay {
    addr: SocketAddr,
    to: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Relay {
            addr,
            to,
            task: Some(tokio::spawn(relay(listener, to))),
        }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Closes every connection through the relay, and its listener.
    fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again, on the same address.
    async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(tokio::spawn(relay(listener, self.to)));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Relays each connection `listener` accepts to `to`; the connections end with the
/// task (their pipes are in its `JoinSet`).
async fn relay(listener: TcpListener, to: SocketAddr) {
    let mut pipes = JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        pipes.spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// The options of a node that says it is alive every 100 ms and takes another for gone
/// after 500 ms of silence.
fn quick_options() -> ClusterOptions {
    let mut options = ClusterOptions::default();
    options.heartbeat = Duration::from_millis(100);
    options.node_timeout = Duration::from_millis(500);
    options
}

/// Node `name` on the NATS server at `url`, with `options`.
async fn node_on(url: &str, name: &str, options: ClusterOptions) -> Cluster {
    let bus = NatsBus::connect(url, name).await.expect("connect to NATS");
    (Cluster::join(Arc::new(bus), name, options).await).expect("join the cluster")
}

/// Waits until `a` and `b` know each other.
async fn meet(a: &Cluster, b: &Cluster) {
    let knows = |x: &Cluster, y: &Cluster| x.nodes().iter().any(|n| &*n.name == y.node());
    eventually("the nodes know each other", PATIENCE, || {
        knows(a, b) && knows(b, a)
    })
    .await;
}

/// A node's tag, as its connection ids carry it.
fn tag(cluster: &Cluster) -> u16 {
    (cluster.first_id() >> 48) as u16
}

/// A client of a line protocol whose lines are read by a task of their own, so that
/// waiting for one with a time limit loses nothing.
struct Client {
    lines: mpsc::UnboundedReceiver<String>,
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        let (send, lines) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(reader).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Client {
            lines,
            writer,
            reader,
        }
    }

    async fn send(&mut self, line: &str) {
        let line = format!("{line}\n");
        self.writer.write_all(line.as_bytes()).await.expect("write");
    }

    /// The next line, which must come within [`PATIENCE`].
    async fn next(&mut self) -> String {
        match timeout(PATIENCE, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the server closed the connection"),
            Err(_) => panic!("no line within {PATIENCE:?}"),
        }
    }

    /// The next line if it comes within `wait`.
    async fn within(&mut self, wait: Duration) -> Option<String> {
        timeout(wait, self.lines.recv()).await.ok().flatten()
    }

    /// Reads up to `line`, and returns the lines before it.
    async fn until(&mut self, line: &str) -> Vec<String> {
        let mut before = Vec::new();
        loop {
            let got = self.next().await;
            if got == line {
                return before;
            }
            before.push(got);
            assert!(before.len() < 1000, "never heard {line:?}: {before:?}");
        }
    }

    /// Its connection's id on `server`.
    fn id_on<M: Send + 'static>(&self, server: &ServerHandle<M>) -> ConnectionId {
        let local = Address::Ip(self.writer.local_addr().unwrap());
        (server.connections_info().into_iter())
            .find(|info| info.peer_addr == local)
            .expect("the client is listed")
            .id
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Both halves go: the connection is closed, not half-closed.
        self.reader.abort();
    }
}

/// Joins the cluster on `url` as `node` and starts a chat server on it.
async fn chat_node(url: &str, node: &str) -> (Cluster, ServerHandle<ChatMessage>) {
    let cluster = Cluster::nats(url, node).await.expect("join the cluster");
    let server = chat_server(&cluster).await;
    (cluster, server)
}

/// A chat server on `cluster`.
async fn chat_server(cluster: &Cluster) -> ServerHandle<ChatMessage> {
    Server::builder()
        .port(0)
        .state(Arc::new(Rooms::clustered(cluster.clone())))
        .protocol::<Chat>()
        .cluster(cluster.clone())
        .start()
        .await
        .expect("start a chat node")
}

/// A chat client on `server`, past its welcome, with its nick.
async fn chatter(server: &ServerHandle<ChatMessage>) -> (Client, String) {
    let mut client = Client::connect(server.local_addr()).await;
    let welcome = client.next().await;
    let nick = (welcome.strip_prefix("* welcome, "))
        .and_then(|rest| rest.split_once(':'))
        .unwrap_or_else(|| panic!("a welcome: {welcome:?}"))
        .0
        .to_owned();
    (client, nick)
}

/// Has chat client `from` (nick `nick`) say probe lines until `to`, in the same room
/// on another node, hears one, then a marker, and reads `to` up to it. `to`'s node
/// subscribes to the room on the bus when `to` joins, and nothing says when the NATS
/// server has taken the subscription: from then on, `from`'s lines reach `to`, and
/// nothing of the probing is left to read.
async fn open_path(from: &mut Client, nick: &str, to: &mut Client) {
    let probe = format!("<{nick}> probe ");
    let mut heard = false;
    for k in 0..100 {
        from.send(&format!("probe {k}")).await;
        let until = Instant::now() + Duration::from_millis(100);
        while let Some(line) = to
            .within(until.saturating_duration_since(Instant::now()))
            .await
        {
            if line.starts_with(&probe) {
                heard = true;
            }
        }
        if heard {
            break;
        }
    }
    assert!(heard, "{nick}'s lines never reached the other node");
    from.send("marker").await;
    to.until(&format!("<{nick}> marker")).await;
}

/// Has chat client `from` (nick `nick`) say 50 numbered lines and `end`, and checks
/// that `to` hears them all, in order, each once, and nothing else.
async fn fifty_lines(from: &mut Client, nick: &str, to: &mut Client) {
    for n in 0..50 {
        from.send(&format!("line {n}")).await;
    }
    from.send("end").await;
    for n in 0..50 {
        assert_eq!(to.next().await, format!("<{nick}> line {n}"));
    }
    assert_eq!(to.next().await, format!("<{nick}> end"));
}

/// Sends `/who` and returns the answer, past any announcements before it.
async fn who(client: &mut Client) -> String {
    client.send("/who").await;
    loop {
        let line = client.next().await;
        if line.starts_with("* in ") {
            return line;
        }
        assert!(line.starts_with("* "), "{line}");
    }
}

/// Shuts a server down and has its node leave.
async fn stop<M: Send + 'static>(server: ServerHandle<M>, cluster: &Cluster) {
    server.shutdown_with_timeout(Duration::from_secs(2)).await;
    cluster.leave().await;
}

/// Ensure two chat nodes are one chat: lines cross both ways in each sender's order,
/// once; `/who` lists both nodes' members; ids differ in their node's tag; a nick held
/// on the other node is refused whatever its case; comings and goings are announced on
/// both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rooms_span_two_nodes() {
    bounded(async {
        let nats = Nats::start().await;
        let (a, server_a) = chat_node(&nats.url(), "a").await;
        let (b, server_b) = chat_node(&nats.url(), "b").await;
        meet(&a, &b).await;

        let (mut ann, ann_guest) = chatter(&server_a).await;
        let (mut bob, bob_guest) = chatter(&server_b).await;
        let (ann_id, bob_id) = (ann.id_on(&server_a), bob.id_on(&server_b));
        assert_eq!(ann_id.node_tag(), tag(&a));
        assert_eq!(bob_id.node_tag(), tag(&b));
        assert_ne!(ann_id.node_tag(), bob_id.node_tag());
        assert_ne!(ann_id.node_tag(), 0);
        assert_eq!((ann_id.number(), bob_id.number()), (1, 1));
        assert_eq!(ann_guest, format!("guest{}-1", tag(&a)));
        assert_eq!(bob_guest, format!("guest{}-1", tag(&b)));
        assert_eq!(a.node_of(bob_id).as_deref(), Some("b"));
        assert_eq!(a.node_of(ann_id).as_deref(), Some("a"));

        open_path(&mut bob, &bob_guest, &mut ann).await;
        open_path(&mut ann, &ann_guest, &mut bob).await;

        // 50 lines each way, in order, each once.
        fifty_lines(&mut ann, &ann_guest, &mut bob).await;
        fifty_lines(&mut bob, &bob_guest, &mut ann).await;

        // `/who` on either node lists both.
        eventually("both nodes list both members", PATIENCE, || {
            a.members(LOBBY).len() == 2 && b.members(LOBBY).len() == 2
        })
        .await;
        ann.send("/who").await;
        let who = format!("* in {LOBBY}: {ann_guest} (you), {bob_guest}");
        assert_eq!(ann.next().await, who);
        bob.send("/who").await;
        let who = format!("* in {LOBBY}: {bob_guest} (you), {ann_guest}");
        assert_eq!(bob.next().await, who);

        // Nicks are the cluster's: one held on the other node is refused, in any case.
        ann.send("/nick Ann").await;
        assert_eq!(ann.next().await, "* you are now Ann");
        assert_eq!(bob.next().await, format!("* {ann_guest} is now Ann"));
        eventually("b has ann's new label", PATIENCE, || {
            b.members(LOBBY)
                .iter()
                .any(|m| m.id == ann_id && &*m.label == "Ann")
        })
        .await;
        for taken in ["ann", "ANN", "Ann", "aNn"] {
            bob.send(&format!("/nick {taken}")).await;
            assert_eq!(bob.next().await, format!("* the nick {taken} is taken"));
        }
        bob.send("/nick Bob").await;
        assert_eq!(bob.next().await, "* you are now Bob");
        assert_eq!(ann.next().await, format!("* {bob_guest} is now Bob"));
        ann.send("/nick BOB").await;
        assert_eq!(ann.next().await, "* the nick BOB is taken");
        bob.send("hi Ann").await;
        assert_eq!(ann.next().await, "<Bob> hi Ann");

        // Comings and goings on b are announced on a.
        let (mut cy, cy_guest) = chatter(&server_b).await;
        assert_eq!(cy_guest, format!("guest{}-2", tag(&b)));
        let joined = format!("* {cy_guest} joined {LOBBY}");
        assert_eq!(ann.next().await, joined);
        assert_eq!(bob.next().await, joined);
        cy.send("/quit").await;
        assert_eq!(cy.next().await, "* bye");
        assert_eq!(ann.next().await, format!("* {cy_guest} left"));
        assert_eq!(bob.next().await, format!("* {cy_guest} left"));
        bob.send("/join kitchen").await;
        assert_eq!(bob.next().await, "* you are in kitchen");
        assert_eq!(ann.next().await, "* Bob left for kitchen");
        let bob_in_kitchen = vec![Member {
            id: bob_id,
            node: "b".into(),
            label: "Bob".into(),
        }];
        eventually("a lists bob in the kitchen only", PATIENCE, || {
            a.members(LOBBY).len() == 1 && a.members("kitchen") == bob_in_kitchen
        })
        .await;
        ann.send("/who").await;
        assert_eq!(ann.next().await, format!("* in {LOBBY}: Ann (you)"));

        stop(server_a, &a).await;
        stop(server_b, &b).await;
    })
    .await;
}

/// Ensure a nick made for a guest on one node is not one that a client of another node
/// already holds: nicks are unique across the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_nick_is_unique_across_nodes() {
    bounded(async {
        let nats = Nats::start().await;
        let (a, server_a) = chat_node(&nats.url(), "a").await;
        let (b, server_b) = chat_node(&nats.url(), "b").await;
        meet(&a, &b).await;
        let (mut ann, _) = chatter(&server_a).await;
        let (_bob, _) = chatter(&server_b).await;
        // The nick b's next guest would get.
        let next_guest = format!("guest{}-2", tag(&b));
        ann.send(&format!("/nick {next_guest}")).await;
        // Bob's arrival may be announced first. Guests' nicks are the server's.
        ann.until(&format!(
            "* the nick {next_guest} is a guest's: guest<node>-<n> is the server's"
        ))
        .await;
        // So the guest, and only the guest, gets it.
        let (_cy, cy_nick) = chatter(&server_b).await;
        assert_eq!(cy_nick, next_guest);
        stop(server_a, &a).await;
        stop(server_b, &b).await;
    })
    .await;
}

/// Writes what its mailbox gets as a line; greets with `id N`; a line `N text` sends
/// `text` to connection `N`, on whichever node.
struct Mail;

impl Protocol for Mail {
    type Codec = Lines;
    type Reply = String;
    type Message = String;

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        ctx.send(format!("id {}", ctx.id().0));
        Mail
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        if let Some((to, text)) = line.split_once(' ') {
            if let Ok(to) = to.parse() {
                ctx.send_to(ConnectionId(to), text.to_owned());
            }
        }
        Next::Continue
    }

    fn message(&mut self, text: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(text);
        Next::Continue
    }
}

/// Joins the cluster on `url` as `node` and starts a [`Mail`] server on it.
async fn mail_node(url: &str, node: &str) -> (Cluster, ServerHandle<String>) {
    let cluster = Cluster::nats(url, node).await.expect("join the cluster");
    let server = Server::builder()
        .port(0)
        .protocol::<Mail>()
        .cluster(cluster.clone())
        .start()
        .await
        .expect("start a mail node");
    (cluster, server)
}

/// A [`Mail`] client of `server`, with its connection's id.
async fn mailbox(server: &ServerHandle<String>) -> (Client, u64) {
    let mut client = Client::connect(server.local_addr()).await;
    let greeting = client.next().await;
    let id = (greeting.strip_prefix("id "))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a greeting: {greeting:?}"));
    (client, id)
}

/// Ensure `Ctx::send_to` and `ServerHandle::send_to` reach a connection on the other
/// node, in order, and that a message for a connection of the other node that is not
/// open is dropped there without harm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_reaches_a_connection_on_the_other_node() {
    bounded(async {
        let nats = Nats::start().await;
        let (a, server_a) = mail_node(&nats.url(), "a").await;
        let (b, server_b) = mail_node(&nats.url(), "b").await;
        meet(&a, &b).await;
        let (mut x, x_id) = mailbox(&server_a).await;
        let (mut y, y_id) = mailbox(&server_b).await;
        assert_eq!(ConnectionId(x_id).node_tag(), tag(&a));
        assert_eq!(ConnectionId(y_id).node_tag(), tag(&b));

        x.send(&format!("{y_id} hello from a")).await;
        assert_eq!(y.next().await, "hello from a");
        y.send(&format!("{x_id} hello from b")).await;
        assert_eq!(x.next().await, "hello from b");

        for n in 0..100 {
            server_a
                .send_to(ConnectionId(y_id), format!("n {n}"))
                .unwrap();
        }
        for n in 0..100 {
            assert_eq!(y.next().await, format!("n {n}"));
        }

        // Nobody has this id on b: `Ok` (it went to the bus), and nothing arrives.
        let nobody = ConnectionId(y_id + 1000);
        assert_eq!(server_a.send_to(nobody, "lost".into()), Ok(()));
        // An id of a's own that is not open is refused at once.
        let not_open = ConnectionId(x_id + 1000);
        assert_eq!(
            server_a.send_to(not_open, "lost".into()),
            Err(SendError::NotOpen(not_open))
        );
        server_a.send_to(ConnectionId(y_id), "last".into()).unwrap();
        assert_eq!(y.next().await, "last");
        assert_eq!(b.stats().malformed, 0);

        stop(server_a, &a).await;
        stop(server_b, &b).await;
    })
    .await;
}

/// A RESP value, as the `kv` server replies.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

fn bulk(bytes: &[u8]) -> Resp {
    Resp::Bulk(Some(bytes.to_vec()))
}

/// A published message as a subscriber gets it.
fn message(channel: &[u8], payload: &[u8]) -> Resp {
    Resp::Array(vec![bulk(b"message"), bulk(channel), bulk(payload)])
}

/// Reads one RESP value from the front of `buf`: it and its length, or `None` when
/// `buf` does not hold a whole one yet.
fn parse(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..end]).expect("a RESP header");
    let next = end + 2;
    match buf[0] {
        b'+' => Some((Resp::Simple(line.to_owned()), next)),
        b'-' => Some((Resp::Error(line.to_owned()), next)),
        b':' => Some((Resp::Integer(line.parse().unwrap()), next)),
        b'$' => {
            let Ok(length) = usize::try_from(line.parse::<i64>().unwrap()) else {
                return Some((Resp::Bulk(None), next));
            };
            let data = buf.get(next..next + length)?;
            buf.get(next + length..next + length + 2)?;
            Some((Resp::Bulk(Some(data.to_vec())), next + length + 2))
        }
        b'*' => {
            let count: usize = line.parse().unwrap();
            let mut items = Vec::with_capacity(count);
            let mut at = next;
            for _ in 0..count {
                let (item, used) = parse(&buf[at..])?;
                items.push(item);
                at += used;
            }
            Some((Resp::Array(items), at))
        }
        other => panic!("not RESP: {:?}", char::from(other)),
    }
}

/// A RESP client whose bytes are read by a task of their own.
struct RespClient {
    chunks: mpsc::UnboundedReceiver<Vec<u8>>,
    buf: Vec<u8>,
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
}

impl RespClient {
    async fn connect(addr: SocketAddr) -> RespClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut reader, writer) = stream.into_split();
        let (send, chunks) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut chunk = vec![0; 16 * 1024];
            while let Ok(n @ 1..) = reader.read(&mut chunk).await {
                if send.send(chunk[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        RespClient {
            chunks,
            buf: Vec::new(),
            writer,
            reader,
        }
    }

    /// Sends a command, without waiting for its reply.
    async fn send(&mut self, words: &[&[u8]]) {
        let mut out = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
            out.extend_from_slice(word);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out).await.expect("write");
    }

    /// The next value if it comes within `wait`.
    async fn within(&mut self, wait: Duration) -> Option<Resp> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some((value, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(value);
            }
            let chunk = timeout(deadline.saturating_duration_since(Instant::now()), async {
                self.chunks.recv().await
            });
            self.buf.extend(chunk.await.ok().flatten()?);
        }
    }

    /// The next value, which must come within [`PATIENCE`].
    async fn next(&mut self) -> Resp {
        (self.within(PATIENCE).await).unwrap_or_else(|| panic!("no reply within {PATIENCE:?}"))
    }

    /// Sends a command and returns its reply.
    async fn call(&mut self, words: &[&[u8]]) -> Resp {
        self.send(words).await;
        self.next().await
    }
}

impl Drop for RespClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Joins the cluster on `url` as `node` and starts a `kv` server on it.
async fn kv_node(url: &str, node: &str) -> (Cluster, ServerHandle<Published>) {
    let cluster = Cluster::nats(url, node).await.expect("join the cluster");
    let server = Server::builder()
        .port(0)
        .state(Arc::new(Db::new()))
        .protocol::<Kv>()
        .cluster(cluster.clone())
        .start()
        .await
        .expect("start a kv node");
    (cluster, server)
}

/// Ensure a `PUBLISH` through one `kv` node reaches a subscriber on the other, in
/// order and byte for byte, while each node keeps its keys to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_publish_reaches_a_subscriber_on_the_other_node() {
    bounded(async {
        let nats = Nats::start().await;
        let (a, server_a) = kv_node(&nats.url(), "a").await;
        let (b, server_b) = kv_node(&nats.url(), "b").await;
        meet(&a, &b).await;

        let mut subscriber = RespClient::connect(server_b.local_addr()).await;
        assert_eq!(
            subscriber.call(&[b"SUBSCRIBE", b"news"]).await,
            Resp::Array(vec![bulk(b"subscribe"), bulk(b"news"), Resp::Integer(1)])
        );
        eventually("a lists b's subscriber", PATIENCE, || {
            a.remote_size("kv:news") == 1
        })
        .await;
        let mut publisher = RespClient::connect(server_a.local_addr()).await;
        // b's subscription reaches the NATS server in its own time: publish until the
        // subscriber hears, then a marker.
        let mut heard = false;
        for _ in 0..100 {
            // Subscribers on a's own node: none.
            let published = publisher.call(&[b"PUBLISH", b"news", b"probe"]).await;
            assert_eq!(published, Resp::Integer(0));
            if let Some(got) = subscriber.within(Duration::from_millis(100)).await {
                assert_eq!(got, message(b"news", b"probe"));
                heard = true;
                break;
            }
        }
        assert!(heard, "no PUBLISH through a reached b's subscriber");
        publisher.call(&[b"PUBLISH", b"news", b"marker"]).await;
        while subscriber.next().await != message(b"news", b"marker") {}

        for n in 0..20 {
            let story = format!("story {n}");
            let published = publisher
                .call(&[b"PUBLISH", b"news", story.as_bytes()])
                .await;
            assert_eq!(published, Resp::Integer(0));
        }
        let binary = b"a\r\nb\0\xff$3\r\n";
        publisher.call(&[b"PUBLISH", b"news", binary]).await;
        publisher.call(&[b"PUBLISH", b"sport", b"goal"]).await;
        for n in 0..20 {
            let story = format!("story {n}");
            assert_eq!(subscriber.next().await, message(b"news", story.as_bytes()));
        }
        assert_eq!(subscriber.next().await, message(b"news", binary));
        assert_eq!(subscriber.within(Duration::from_millis(200)).await, None);

        // Keys are each node's own.
        let mut on_b = RespClient::connect(server_b.local_addr()).await;
        let set = publisher.call(&[b"SET", b"greeting", b"hello"]).await;
        assert_eq!(set, Resp::Simple("OK".into()));
        assert_eq!(on_b.call(&[b"GET", b"greeting"]).await, Resp::Bulk(None));
        let got = publisher.call(&[b"GET", b"greeting"]).await;
        assert_eq!(got, bulk(b"hello"));
        assert_eq!(on_b.call(&[b"DBSIZE"]).await, Resp::Integer(0));
        assert!(!matches!(on_b.call(&[b"PING"]).await, Resp::Error(_)));

        drop((subscriber, publisher, on_b));
        stop(server_a, &a).await;
        stop(server_b, &b).await;
    })
    .await;
}

/// Ensure each node lists the other's members with their node and label, drops one
/// that disconnects, and drops a node that leaves, with its members, at once (a member
/// that left first is announced once, not again with its node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_listed_across_nodes_until_they_or_their_node_leave() {
    bounded(async {
        let nats = Nats::start().await;
        let (a, server_a) = chat_node(&nats.url(), "a").await;
        let (b, server_b) = chat_node(&nats.url(), "b").await;
        meet(&a, &b).await;
        let (mut ann, ann_nick) = chatter(&server_a).await;
        let (bob, bob_nick) = chatter(&server_b).await;
        let ann_member = Member {
            id: ann.id_on(&server_a),
            node: "a".into(),
            label: ann_nick.as_str().into(),
        };
        let bob_member = Member {
            id: bob.id_on(&server_b),
            node: "b".into(),
            label: bob_nick.as_str().into(),
        };
        // Each node lists its own members first.
        let on_a = vec![ann_member.clone(), bob_member.clone()];
        let on_b = vec![bob_member.clone(), ann_member.clone()];
        eventually("both nodes list both members", PATIENCE, || {
            a.members(LOBBY) == on_a && b.members(LOBBY) == on_b
        })
        .await;
        let nodes = a.nodes();
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert_eq!((&*nodes[0].name, nodes[0].memberships), ("b", 1));
        assert!(nodes[0].last_seen < Duration::from_secs(3), "{nodes:?}");
        assert_eq!(a.remote_size(LOBBY), 1);
        assert_eq!(a.node_of(bob_member.id).as_deref(), Some("b"));
        assert!(a.members("kitchen").is_empty());
        let stats = a.stats();
        assert!(stats.connected && stats.nodes == 1, "{stats:?}");

        // Bob disconnects: he leaves a's list.
        drop(bob);
        server_b.wait_connections(|n| n == 0).await;
        eventually("bob leaves a's list", PATIENCE, || {
            a.members(LOBBY) == [ann_member.clone()]
        })
        .await;
        assert_eq!(a.remote_size(LOBBY), 0);
        assert_eq!(a.nodes()[0].memberships, 0);

        // Cy joins on b, then b shuts down and leaves: a forgets b and its members at
        // once, well before b would have timed out.
        let (_cy, cy_nick) = chatter(&server_b).await;
        eventually("a lists cy", PATIENCE, || a.members(LOBBY).len() == 2).await;
        server_b.shutdown_with_timeout(Duration::from_secs(2)).await;
        b.leave().await;
        let left = Instant::now();
        eventually("a forgets b", Duration::from_secs(1), || {
            a.nodes().is_empty() && a.members(LOBBY) == [ann_member.clone()]
        })
        .await;
        assert!(left.elapsed() < Duration::from_secs(1));
        assert_eq!(a.node_of(bob_member.id), None);
        let stats = a.stats();
        assert_eq!((stats.nodes, stats.nodes_lost), (0, 0), "{stats:?}");
        // Cy's connection ended before b left, and said so: ann is told once, and not
        // again as a member gone with its node.
        ann.until(&format!("* {cy_nick} left")).await;
        ann.send("/who").await;
        let before = ann.until(&format!("* in {LOBBY}: {ann_nick} (you)")).await;
        assert!(before.iter().all(|l| !l.contains(" left")), "{before:?}");

        drop(ann);
        stop(server_a, &a).await;
    })
    .await;
}

/// Two chat nodes that know each other, with ann on a and bob on b.
struct Pair {
    a: Cluster,
    b: Cluster,
    server_a: ServerHandle<ChatMessage>,
    server_b: ServerHandle<ChatMessage>,
    ann: Client,
    ann_nick: String,
    bob: Client,
    bob_nick: String,
    bob_id: ConnectionId,
}

/// Node a on the NATS server at `url_a` and node b at `url_b`, both with `options()`,
/// once a lists ann and bob.
async fn pair(url_a: &str, url_b: &str, options: impl Fn() -> ClusterOptions) -> Pair {
    let a = node_on(url_a, "a", options()).await;
    let b = node_on(url_b, "b", options()).await;
    let server_a = chat_server(&a).await;
    let server_b = chat_server(&b).await;
    meet(&a, &b).await;
    let (ann, ann_nick) = chatter(&server_a).await;
    let (bob, bob_nick) = chatter(&server_b).await;
    let bob_id = bob.id_on(&server_b);
    eventually("a lists bob", PATIENCE, || a.members(LOBBY).len() == 2).await;
    Pair {
        a,
        b,
        server_a,
        server_b,
        ann,
        ann_nick,
        bob,
        bob_nick,
        bob_id,
    }
}

/// Ensure a node that falls silent without a goodbye (its bus connection cut, as in a
/// crash) is taken for gone after the node timeout, with its members, whose rooms are
/// told they left, and that it is taken back, with its members, once it is heard again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_dropped_after_its_timeout_and_taken_back() {
    bounded(async {
        let nats = Nats::start().await;
        let mut relay = Relay::start(nats.addr()).await;
        let Pair {
            a,
            b,
            server_a,
            server_b,
            mut ann,
            ann_nick,
            bob,
            bob_nick,
            bob_id,
        } = pair(&nats.url(), &relay.url(), quick_options).await;

        relay.cut();
        let cut = Instant::now();
        eventually("a drops the silent b", Duration::from_secs(3), || {
            a.nodes().is_empty() && a.members(LOBBY).len() == 1
        })
        .await;
        let took = cut.elapsed();
        // Its last heartbeat came at most 100 ms before the cut.
        assert!(took >= Duration::from_millis(350), "dropped after {took:?}");
        assert_eq!(a.stats().nodes_lost, 1);
        assert_eq!(a.node_of(bob_id), None);
        assert_eq!(a.remote_size(LOBBY), 0);
        // Bob did not leave; his node went: ann is told, once.
        let before = ann
            .until(&format!("* {bob_nick} left (their server went away)"))
            .await;
        assert!(before.iter().all(|l| !l.contains(" left")), "{before:?}");
        assert_eq!(
            who(&mut ann).await,
            format!("* in {LOBBY}: {ann_nick} (you)")
        );
        eventually("b sees its bus go", PATIENCE, || !b.stats().connected).await;

        // b is heard again: a takes it back with its membership.
        relay.resume().await;
        eventually("a takes b back, with bob", Duration::from_secs(10), || {
            (a.members(LOBBY).iter()).any(|m| m.id == bob_id && *m.label == *bob_nick)
        })
        .await;
        assert_eq!(a.node_of(bob_id).as_deref(), Some("b"));
        assert!(b.stats().reconnects >= 1, "{:?}", b.stats());
        let listed = format!("* in {LOBBY}: {ann_nick} (you), {bob_nick}");
        assert_eq!(who(&mut ann).await, listed);

        drop((ann, bob));
        stop(server_a, &a).await;
        stop(server_b, &b).await;
    })
    .await;
}

/// Ensure a node that comes back as a new run under the same name before the others
/// take it for gone (a crash and a quick restart) is taken as a new node: the members
/// of its earlier run leave at once, and their rooms are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_as_a_new_run_takes_its_earlier_members_away() {
    bounded(async {
        let nats = Nats::start().await;
        let mut relay = Relay::start(nats.addr()).await;
        // Nobody times out during the test: only the new run can take bob away.
        let patient = || {
            let mut options = quick_options();
            options.node_timeout = Duration::from_secs(60);
            options
        };
        let Pair {
            a,
            b,
            server_a,
            server_b,
            mut ann,
            bob,
            bob_nick,
            bob_id,
            ..
        } = pair(&nats.url(), &relay.url(), patient).await;

        // b's first run falls silent, and a second one joins under its name.
        relay.cut();
        let b_again = node_on(&nats.url(), "b", patient()).await;
        let before = ann
            .until(&format!("* {bob_nick} left (their server went away)"))
            .await;
        assert!(before.iter().all(|l| !l.contains(" left")), "{before:?}");
        assert_eq!(a.members(LOBBY).len(), 1);
        assert!(a.members(LOBBY).iter().all(|m| m.id != bob_id));
        let nodes = a.nodes();
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert_eq!((&*nodes[0].name, nodes[0].memberships), ("b", 0));
        assert_eq!(a.stats().nodes_lost, 0);

        drop((ann, bob));
        stop(server_a, &a).await;
        stop(server_b, &b).await;
        b_again.leave().await;
    })
    .await;
}

/// Ensure that while the NATS server is away, a broadcast still reaches the members on
/// its own node, messages for the other node are dropped and counted, and nicks cannot
/// be claimed; and that once it is back, both nodes reconnect and delivery across
/// them resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_goes_on_locally_while_the_bus_is_away_and_resumes() {
    bounded(async {
        let nats = Nats::start().await;
        let port = nats.port;
        let (a, server_a) = chat_node(&nats.url(), "a").await;
        let (b, server_b) = chat_node(&nats.url(), "b").await;
        meet(&a, &b).await;
        let (mut ann, ann_nick) = chatter(&server_a).await;
        let (mut al, _) = chatter(&server_a).await;
        let (mut bob, bob_nick) = chatter(&server_b).await;
        open_path(&mut ann, &ann_nick, &mut bob).await;
        al.until(&format!("<{ann_nick}> marker")).await;

        nats.kill().await;
        eventually("both nodes see the bus go", PATIENCE, || {
            !a.stats().connected && !b.stats().connected
        })
        .await;
        let dropped = a.stats().dropped;
        ann.send("while away").await;
        let said = format!("<{ann_nick}> while away");
        assert_eq!(al.next().await, said);
        let stats = a.stats();
        assert!(stats.dropped > dropped, "{stats:?}");
        ann.send("/nick Ann").await;
        let unreachable = "* nicks cannot be changed now: the cluster is unreachable";
        // Al's and bob's arrivals may be announced first.
        let before = ann.until(unreachable).await;
        assert!(
            before.iter().all(|l| l.ends_with(" joined lobby")),
            "{before:?}"
        );

        let nats = Nats::on_port(port).await;
        eventually("both nodes reconnect", Duration::from_secs(10), || {
            a.stats().connected && b.stats().connected
        })
        .await;
        // The nodes subscribe again on their own: say lines until bob hears one.
        let mut before = Vec::new();
        let started = Instant::now();
        'resumed: for k in 0.. {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "delivery across the nodes did not resume: {before:?}"
            );
            ann.send(&format!("back {k}")).await;
            while let Some(line) = bob.within(Duration::from_millis(100)).await {
                if line.starts_with(&format!("<{ann_nick}> back ")) {
                    break 'resumed;
                }
                before.push(line);
            }
        }
        assert!(!before.contains(&said), "{before:?}");
        for cluster in [&a, &b] {
            let stats = cluster.stats();
            assert!(stats.reconnects >= 1 && stats.connected, "{stats:?}");
        }
        // Whatever each node thought of the other meanwhile, the lists agree again.
        eventually("the membership lists agree again", PATIENCE, || {
            a.members(LOBBY).len() == 3 && b.members(LOBBY).len() == 3
        })
        .await;
        let listed = who(&mut bob).await;
        assert!(listed.starts_with(&format!("* in {LOBBY}: {bob_nick} (you), ")));
        assert!(listed.contains(&ann_nick), "{listed}");

        drop((ann, al, bob));
        stop(server_a, &a).await;
        stop(server_b, &b).await;
        drop(nats);
    })
    .await;
}

/// Awaits a claim that has to ask the other node.
async fn asked(claim: Claim) -> bool {
    match claim {
        Claim::Asking(answer) => answer.await,
        other => panic!("a claim that asks the other node, not {other:?}"),
    }
}

/// Ensure a name held on one node is refused on the other, and that of two claims of
/// one name from both nodes at once, exactly one is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_across_nodes() {
    bounded(async {
        let nats = Nats::start().await;
        let a = Cluster::nats(&nats.url(), "a").await.unwrap();
        let b = Cluster::nats(&nats.url(), "b").await.unwrap();
        meet(&a, &b).await;
        let (names_a, names_b) = (a.names(), b.names());
        let (on_a, on_b) = (ConnectionId(a.first_id()), ConnectionId(b.first_id()));
        // The node with the lower tag claims first in the races below: should its
        // claim reach the other node before that one claims, the tie still goes to it.
        // The other order is `a_claim_answered_just_before_the_other_node_claims_wins_alone`.
        let low_first = tag(&a) < tag(&b);

        assert!(asked(names_a.claim("x", on_a)).await);
        assert_eq!(names_a.holder("x"), Some(on_a));
        assert!(!asked(names_b.claim("x", on_b)).await);
        assert_eq!(names_b.holder("x"), None);
        // Its holder claims it again: granted at once.
        assert!(matches!(names_a.claim("x", on_a), Claim::Granted));
        // Released, it can be had on the other node.
        names_a.release("x", on_a);
        assert!(asked(names_b.claim("x", on_b)).await);
        assert!(!asked(names_a.claim("x", on_a)).await);

        for round in 0..20 {
            let name = format!("race{round}");
            let (claim_a, claim_b) = if low_first {
                let claim_a = names_a.claim(&name, on_a);
                (claim_a, names_b.claim(&name, on_b))
            } else {
                let claim_b = names_b.claim(&name, on_b);
                (names_a.claim(&name, on_a), claim_b)
            };
            let (granted_a, granted_b) = tokio::join!(asked(claim_a), asked(claim_b));
            assert!(
                granted_a ^ granted_b,
                "{name}: granted on a {granted_a}, on b {granted_b}"
            );
            let holders = (names_a.holder(&name), names_b.holder(&name));
            let expected = match granted_a {
                true => (Some(on_a), None),
                false => (None, Some(on_b)),
            };
            assert_eq!(holders, expected, "{name}");
        }

        a.leave().await;
        b.leave().await;
    })
    .await;
}

/// Milliseconds since the epoch, as claims are timed.
fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Ensure a claim answered by the other node before that node claims the same name
/// itself, in the same millisecond, leaves one of the two granted. The node with the
/// higher tag claims first, so that the tie goes to the other by (time, node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answered_just_before_the_other_node_claims_wins_alone() {
    bounded(async {
        let nats = Nats::start().await;
        let a = Cluster::nats(&nats.url(), "a").await.unwrap();
        let b = Cluster::nats(&nats.url(), "b").await.unwrap();
        meet(&a, &b).await;
        let (first, second) = if tag(&a) > tag(&b) { (a, b) } else { (b, a) };
        let (names_1, names_2) = (first.names(), second.names());
        let (id_1, id_2) = (
            ConnectionId(first.first_id()),
            ConnectionId(second.first_id()),
        );
        let (mut tried, mut both) = (0, Vec::new());
        for round in 0..100 {
            let name = format!("n{round}");
            let heard = second.stats().received;
            let at = now_ms();
            let claim_1 = names_1.claim(&name, id_1);
            // Spin (microseconds) until the second node has heard the claim.
            let spun = Instant::now();
            while second.stats().received == heard && spun.elapsed() < Duration::from_millis(50) {
                tokio::task::yield_now().await;
            }
            tokio::task::yield_now().await;
            let claim_2 = names_2.claim(&name, id_2);
            tried += usize::from(now_ms() == at);
            let (granted_1, granted_2) = tokio::join!(asked(claim_1), asked(claim_2));
            if granted_1 && granted_2 {
                both.push(name);
            }
        }
        assert!(
            both.is_empty(),
            "both nodes granted {both:?} ({tried} of 100 rounds in one millisecond)"
        );
        first.leave().await;
        second.leave().await;
    })
    .await;
}
