//! Groups and messages across nodes: several servers on one message bus (NATS) act as
//! one for [`Ctx::broadcast`](crate::Ctx::broadcast), [`Ctx::send_to`](crate::Ctx::send_to)
//! and group membership.
//!
//! The model is Phoenix.PubSub's: each node subscribes to the bus once per group that
//! has members on it, a broadcast goes to its local members at once and to the bus
//! once, and each node that receives it fans it out to its own members. A message for
//! one connection ([`send_to`](crate::Ctx::send_to)) goes to its node's subject:
//! connection ids carry their node's tag in their top 16 bits, so they are unique
//! across the cluster. Messages from one sender arrive in the order it sent them, on
//! every node.
//!
//! Membership is tracked too: every node tells the others when a local connection
//! joins or leaves a group (with a label, such as a chat nick: [`Ctx::join_as`]), says
//! it is alive once a second, and sends everything it has to a node that missed a
//! change or has just arrived. A node that stops saying it is alive for
//! [`ClusterOptions::node_timeout`] is taken for gone, with its members; the local
//! members of each of their groups are sent one message,
//! [`ClusterMessage::members_lost`] (the chat's "* ann, bob left (their server went
//! away)"), unless this node is cut off from the bus itself. [`Names`] hands out names that are unique across the cluster,
//! such as nicks.
//!
//! When the bus goes away, local delivery goes on; messages for other nodes are
//! dropped and counted ([`ClusterStats::dropped`]) until it is back, the bus
//! reconnects and subscribes again on its own, and both are logged. Everything waiting
//! for the bus is bounded: [`ClusterOptions::outbound_messages`] and
//! [`ClusterOptions::outbound_bytes`].
//!
//! ```no_run
//! use linedancer::cluster::Cluster;
//! use linedancer::examples::Chat;
//! use linedancer::examples::Rooms;
//! use linedancer::Server;
//! use std::sync::Arc;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = Cluster::nats("nats://127.0.0.1:4222", "node-a").await?;
//! let server = Server::builder()
//!     .port(7000)
//!     .state(Arc::new(Rooms::clustered(cluster.clone())))
//!     .protocol::<Chat>()
//!     .cluster(cluster.clone())
//!     .start()
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Ctx::join_as`]: crate::Ctx::join_as

mod names;
mod nats;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

pub use names::{Claim, Names};
pub use nats::NatsBus;
pub use wire::ClusterMessage;

use crate::connections::{lock, ConnectionId, Connections, Remote};
use crate::error::Error;
use names::NameTable;
use wire::{put_str, subject_token, Reader};

/// How long a node may go without saying it is alive before the others take it for
/// gone, with its members: [`ClusterOptions::node_timeout`].
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a node says it is alive: [`ClusterOptions::heartbeat`].
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// How many messages may wait for the bus: [`ClusterOptions::outbound_messages`].
pub const DEFAULT_OUTBOUND_MESSAGES: usize = 65_536;

/// How many bytes may wait for the bus: [`ClusterOptions::outbound_bytes`].
pub const DEFAULT_OUTBOUND_BYTES: usize = 64 * 1024 * 1024;

/// How long a claim of a name waits for the other nodes' answers; a node that has not
/// answered by then does not hold it up.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);

/// A node's changes kept while its full membership is on its way, at most.
const MAX_HELD_CHANGES: usize = 100_000;

/// The members sent in one message of a full membership, at most (bytes).
const SNAPSHOT_PART_BYTES: usize = 256 * 1024;

/// How long after asking a node for its membership a node asks again.
const SYNC_RETRY: Duration = Duration::from_secs(2);

/// What carries a cluster's messages between nodes: NATS ([`NatsBus`]) here, another
/// message bus behind the same four calls.
///
/// A bus delivers what is published on a topic to every other node subscribed to it
/// (not back to the publisher), in the order each publisher published; a subscription
/// made before a publish is in place for what other nodes publish once they have
/// received that publish (NATS: one connection's commands are taken in order).
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` on `topic`.
    fn publish(&self, topic: String, payload: Bytes) -> BoxFuture<'_, Result<(), BusError>>;

    /// The payloads published on `topic` from now on, until the stream is dropped.
    fn subscribe(
        &self,
        topic: String,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Bytes>, BusError>>;

    /// Whether the bus is connected now: while it is not, messages for other nodes are
    /// dropped rather than queued.
    fn is_connected(&self) -> bool;

    /// Waits until what was published has reached the bus.
    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>>;

    /// How many times the bus has reconnected.
    fn reconnects(&self) -> u64 {
        0
    }

    /// How many times the bus dropped incoming messages (a subscription fell behind).
    fn dropped(&self) -> u64 {
        0
    }
}

/// A message bus failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BusError(pub String);

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The bus could not be reached.
    #[error("cluster bus: {0}")]
    Bus(#[from] BusError),
    /// A node name that cannot be used.
    #[error("invalid node name '{name}': {reason}")]
    Node {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// How a node takes part in its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// The first token of every subject the cluster uses; clusters with different
    /// prefixes share a bus without seeing each other. `linedancer` by default.
    pub prefix: String,
    /// How often the node says it is alive.
    pub heartbeat: Duration,
    /// How long a node may go without saying it is alive before it is taken for gone,
    /// with its members.
    pub node_timeout: Duration,
    /// How many messages may wait for the bus; more are dropped and counted.
    pub outbound_messages: usize,
    /// How many bytes may wait for the bus; more are dropped and counted.
    pub outbound_bytes: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            prefix: "linedancer".to_owned(),
            heartbeat: DEFAULT_HEARTBEAT,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            outbound_messages: DEFAULT_OUTBOUND_MESSAGES,
            outbound_bytes: DEFAULT_OUTBOUND_BYTES,
        }
    }
}

/// A member of a group, on any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its connection.
    pub id: ConnectionId,
    /// Its node's name.
    pub node: Arc<str>,
    /// The label it joined with ([`Ctx::join_as`](crate::Ctx::join_as)); empty if none.
    pub label: Arc<str>,
}

/// Another node, as this one sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its name.
    pub name: Arc<str>,
    /// Its members, over all groups.
    pub memberships: usize,
    /// Since it last said it was alive.
    pub last_seen: Duration,
}

/// A node's cluster counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Whether the bus is connected.
    pub connected: bool,
    /// The other nodes alive.
    pub nodes: usize,
    /// Messages published to the bus.
    pub published: u64,
    /// Messages for other nodes dropped: the bus was away, or too much waited for it.
    pub dropped: u64,
    /// Messages received from other nodes.
    pub received: u64,
    /// Messages received that could not be read, and were dropped.
    pub malformed: u64,
    /// Times the bus reconnected.
    pub reconnects: u64,
    /// Times the bus dropped incoming messages (a subscription fell behind).
    pub bus_dropped: u64,
    /// Nodes taken for gone after they stopped saying they were alive.
    pub nodes_lost: u64,
    /// Messages waiting for the bus now.
    pub queued: usize,
}

/// One node's membership in a cluster: its name, its bus, what it knows of the
/// others. Cheap to clone; give it to [`Builder::cluster`](crate::Builder::cluster)
/// and keep a clone to list members across nodes, or to [`leave`](Cluster::leave).
#[derive(Clone)]
pub struct Cluster {
    core: Arc<Core>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.core.node)
            .field("tag", &self.core.tag)
            .finish_non_exhaustive()
    }
}

/// The kinds of the cluster's own messages, their first byte.
mod kind {
    /// On the presence subject: a node is alive.
    pub const HEARTBEAT: u8 = 1;
    /// On the presence subject: a member joined, relabelled or left.
    pub const CHANGE: u8 = 2;
    /// On the presence subject: a node is leaving.
    pub const BYE: u8 = 3;
    /// On a node's subject: a message for one of its connections.
    pub const DIRECT: u8 = 10;
    /// On a node's subject: send me your membership.
    pub const SYNC: u8 = 11;
    /// On a node's subject: part of a node's membership.
    pub const SNAPSHOT: u8 = 12;
    /// On a node's subject: the answer to a claim.
    pub const CLAIMED: u8 = 13;
    /// On the names subject: may I have this name?
    pub const CLAIM: u8 = 20;
}

/// What waits for the bus.
enum Outbound {
    /// A message for a topic.
    Publish(String, Bytes),
    /// A subscription to a topic, asked for in turn with the messages: the stream, or
    /// why the bus refused.
    Subscribe(String, oneshot::Sender<Subscribed>),
    /// Say when everything before has reached the bus.
    Flush(oneshot::Sender<()>),
}

/// What the bus answers a subscription with.
type Subscribed = Result<BoxStream<'static, Bytes>, BusError>;

/// What a group's members on a node are: connection → label.
type Group = HashMap<ConnectionId, Arc<str>>;

struct Core {
    node: Arc<str>,
    tag: u16,
    /// Tells this run of the node from an earlier one of the same name.
    incarnation: u64,
    options: ClusterOptions,
    bus: Arc<dyn Bus>,
    outbound: mpsc::Sender<Outbound>,
    outbound_bytes: AtomicUsize,
    state: Mutex<State>,
    names: Arc<Mutex<NameTable>>,
    /// The server's connections, once attached.
    deliver: OnceLock<Arc<dyn Deliver>>,
    counters: Counters,
    next_claim: AtomicU64,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
    received: AtomicU64,
    malformed: AtomicU64,
    nodes_lost: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The local members of each group, and the group's subscription.
    local: HashMap<Arc<str>, LocalGroup>,
    /// Changes to the local membership so far: the others' check that they missed none.
    seq: u64,
    nodes: HashMap<u16, NodeView>,
    claims: HashMap<u64, ClaimWait>,
    /// Set by [`Cluster::leave`]: no more heartbeats.
    leaving: bool,
}

struct LocalGroup {
    members: Group,
    subscription: AbortHandle,
}

/// Another node, as this one knows it.
struct NodeView {
    name: Arc<str>,
    incarnation: u64,
    /// The last change applied.
    seq: u64,
    last_seen: Instant,
    groups: HashMap<Arc<str>, Group>,
    /// Set while its full membership is asked for: when, and the changes that came
    /// meanwhile.
    syncing: Option<(Instant, Vec<Change>)>,
    /// The parts of a full membership received so far: its seq, the next part, the
    /// members.
    assembling: Option<(u64, u32, HashMap<Arc<str>, Group>)>,
}

/// A member joined (with a label) or left.
struct Change {
    seq: u64,
    group: Arc<str>,
    id: ConnectionId,
    /// `None`: left.
    label: Option<Arc<str>>,
}

/// A claim of a name, waiting for the other nodes' answers.
struct ClaimWait {
    waiting: HashSet<u16>,
    done: Option<oneshot::Sender<bool>>,
}

impl Cluster {
    /// Joins the cluster on the NATS server at `url` as node `node`, with the default
    /// [`ClusterOptions`].
    ///
    /// # Errors
    ///
    /// As [`join`](Cluster::join), and when the NATS server cannot be reached.
    pub async fn nats(url: &str, node: &str) -> Result<Cluster, ClusterError> {
        let bus = NatsBus::connect(url, node).await?;
        Cluster::join(Arc::new(bus), node, ClusterOptions::default()).await
    }

    /// Joins the cluster on `bus` as node `node`: subscribes to the cluster's subjects,
    /// says hello and starts saying it is alive, in tasks on the current tokio runtime.
    /// Names are 1 to 64 characters, unique in the cluster: a node's connection ids
    /// are derived from its name.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Node`] for a name out of bounds, or one whose id tag another
    /// node alive already has; [`ClusterError::Bus`] when the bus fails.
    pub async fn join(
        bus: Arc<dyn Bus>,
        node: &str,
        options: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        let refuse = |reason: &str| ClusterError::Node {
            name: node.to_owned(),
            reason: reason.to_owned(),
        };
        if node.is_empty() || node.chars().count() > 64 {
            return Err(refuse("node names are 1 to 64 characters"));
        }
        if options.prefix.is_empty() || options.prefix.contains([' ', '*', '>']) {
            return Err(refuse("the subject prefix must be a plain subject"));
        }
        let (outbound, queue) = mpsc::channel(options.outbound_messages.max(1));
        let core = Arc::new(Core {
            node: node.into(),
            tag: tag_of_name(node),
            incarnation: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
            options,
            bus,
            outbound,
            outbound_bytes: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            names: Arc::default(),
            deliver: OnceLock::new(),
            counters: Counters::default(),
            next_claim: AtomicU64::new(1),
            runtime: tokio::runtime::Handle::current(),
            tasks: Mutex::new(Vec::new()),
        });
        let cluster = Cluster { core };
        let core = &cluster.core;
        let topics = [
            (core.presence_topic(), Core::on_presence as Handler),
            (core.node_topic(core.tag), Core::on_node),
            (core.names_topic(), Core::on_names),
        ];
        for (topic, handler) in topics {
            let stream = core.bus.subscribe(topic).await?;
            let task = core.listen(stream, handler);
            lock(&core.tasks).push(task);
        }
        let publisher = core.runtime.spawn(publish(Arc::downgrade(core), queue));
        let ticker = core.runtime.spawn(tick(Arc::downgrade(core)));
        lock(&core.tasks).extend([publisher.abort_handle(), ticker.abort_handle()]);
        core.heartbeat(true);
        core.bus.flush().await?;
        // The others answer a hello with a heartbeat at once: one that shares this
        // node's tag under another name would make their ids collide.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let clash = (lock(&core.state).nodes.values())
            .find(|other| other.name != core.node && tag_of_name(&other.name) == core.tag)
            .map(|other| other.name.clone());
        if let Some(other) = clash {
            cluster.core.stop();
            return Err(refuse(&format!(
                "its id tag is that of node '{other}', alive in the cluster: choose another name"
            )));
        }
        info!(node = %core.node, tag = core.tag, "joined the cluster");
        Ok(cluster)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.core.node
    }

    /// The first connection id of this node: its tag in the top 16 bits, then 1.
    pub fn first_id(&self) -> u64 {
        (u64::from(self.core.tag) << 48) | 1
    }

    /// The name of the node connection `id` is on, if it is alive (this one
    /// included).
    pub fn node_of(&self, id: ConnectionId) -> Option<Arc<str>> {
        let tag = id.node_tag();
        if tag == self.core.tag {
            return Some(Arc::clone(&self.core.node));
        }
        lock(&self.core.state)
            .nodes
            .get(&tag)
            .map(|n| n.name.clone())
    }

    /// The members of `group` on every node, this one's first, each in id order.
    pub fn members(&self, group: &str) -> Vec<Member> {
        let state = lock(&self.core.state);
        let mut members = Vec::new();
        let mut add = |node: &Arc<str>, group: Option<&Group>| {
            let at = members.len();
            members.extend(group.into_iter().flatten().map(|(id, label)| Member {
                id: *id,
                node: Arc::clone(node),
                label: Arc::clone(label),
            }));
            members[at..].sort_unstable_by_key(|m| m.id);
        };
        add(&self.core.node, state.local.get(group).map(|g| &g.members));
        let nodes: BTreeMap<_, _> = state.nodes.iter().collect();
        for node in nodes.values() {
            add(&node.name, node.groups.get(group));
        }
        members
    }

    /// How many members `group` has on the other nodes.
    pub fn remote_size(&self, group: &str) -> usize {
        (lock(&self.core.state).nodes.values())
            .filter_map(|node| node.groups.get(group))
            .map(HashMap::len)
            .sum()
    }

    /// The other nodes alive, by name.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut nodes: Vec<_> = (lock(&self.core.state).nodes.values())
            .map(|node| NodeInfo {
                name: node.name.clone(),
                memberships: node.groups.values().map(HashMap::len).sum(),
                last_seen: node.last_seen.elapsed(),
            })
            .collect();
        nodes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// The cluster's unique names: a name claimed through it is held by one
    /// connection of the whole cluster at a time.
    pub fn names(&self) -> Names {
        Names::clustered(Arc::clone(&self.core.names), Arc::downgrade(&self.core))
    }

    /// The node's counters now.
    pub fn stats(&self) -> ClusterStats {
        let core = &self.core;
        let counters = &core.counters;
        ClusterStats {
            connected: core.bus.is_connected(),
            nodes: lock(&core.state).nodes.len(),
            published: counters.published.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
            received: counters.received.load(Ordering::Relaxed),
            malformed: counters.malformed.load(Ordering::Relaxed),
            reconnects: core.bus.reconnects(),
            bus_dropped: core.bus.dropped(),
            nodes_lost: counters.nodes_lost.load(Ordering::Relaxed),
            queued: core.options.outbound_messages - core.outbound.capacity(),
        }
    }

    /// Leaves the cluster: tells the other nodes, after everything already waiting for
    /// the bus, so that they drop this node's members at once; waits (a second at most)
    /// for that to reach the bus, and stops the node's tasks. Call it once the server
    /// has shut down.
    pub async fn leave(&self) {
        let core = &self.core;
        let mut bye = BytesMut::new();
        bye.put_u8(kind::BYE);
        bye.put_u16(core.tag);
        bye.put_u64(core.incarnation);
        {
            // Under the lock the heartbeats take: none follows the goodbye.
            let mut state = lock(&core.state);
            state.leaving = true;
            core.send(core.presence_topic(), bye.freeze());
        }
        let (done, flushed) = oneshot::channel();
        let queued = core.outbound.try_send(Outbound::Flush(done)).is_ok();
        if queued
            && tokio::time::timeout(Duration::from_secs(1), flushed)
                .await
                .is_err()
        {
            debug!("cluster: the goodbye did not reach the bus in time");
        }
        core.stop();
        info!(node = %core.node, "left the cluster");
    }

    /// Connects the cluster to a server's connections: what [`Builder::cluster`]
    /// arranges at start.
    ///
    /// [`Builder::cluster`]: crate::Builder::cluster
    pub(crate) fn attach<M: ClusterMessage>(
        &self,
        connections: &Arc<Connections<M>>,
    ) -> Result<(), Error> {
        let glue = Arc::new(Glue {
            core: Arc::clone(&self.core),
            connections: Arc::downgrade(connections),
        });
        if self.core.deliver.set(glue.clone()).is_err() {
            return Err(Error::Config {
                setting: "cluster",
                value: self.core.node.to_string(),
                reason: "this node already serves another server",
            });
        }
        connections.set_remote(glue);
        Ok(())
    }
}

/// A node's tag: 16 bits of its name's FNV-1a hash, never 0 (the tag of servers
/// outside a cluster).
fn tag_of_name(name: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    match ((hash >> 16) ^ hash) as u16 {
        0 => 1,
        tag => tag,
    }
}

/// Milliseconds since the epoch: the order of two claims of one name.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Handler = fn(&Arc<Core>, Bytes) -> Option<()>;

impl Core {
    fn presence_topic(&self) -> String {
        format!("{}.presence", self.options.prefix)
    }

    fn names_topic(&self) -> String {
        format!("{}.names", self.options.prefix)
    }

    fn node_topic(&self, tag: u16) -> String {
        format!("{}.node.{tag}", self.options.prefix)
    }

    fn group_topic(&self, group: &str) -> String {
        format!("{}.group.{}", self.options.prefix, subject_token(group))
    }

    /// Queues `payload` for `topic`, or drops and counts it: the bus is away, or too
    /// much waits for it already.
    fn send(&self, topic: String, payload: Bytes) {
        let size = topic.len() + payload.len();
        let limit = self.options.outbound_bytes;
        if self.bus.is_connected() {
            let queued = self.outbound_bytes.fetch_add(size, Ordering::AcqRel) + size;
            let message = Outbound::Publish(topic, payload);
            if queued <= limit && self.outbound.try_send(message).is_ok() {
                return;
            }
            self.outbound_bytes.fetch_sub(size, Ordering::AcqRel);
        }
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `handle` on every payload of `stream`, in a task that holds the node
    /// weakly: it ends with the node.
    fn listen(
        self: &Arc<Self>,
        stream: BoxStream<'static, Bytes>,
        handle: impl Fn(&Arc<Core>, Bytes) -> Option<()> + Send + 'static,
    ) -> AbortHandle {
        let task = self
            .runtime
            .spawn(pump(Arc::downgrade(self), stream, handle));
        task.abort_handle()
    }

    /// Subscribes to `group`'s subject, delivering what comes to the local members, in
    /// a task that the group's entry ends.
    fn subscribe_group(self: &Arc<Self>, group: Arc<str>) -> AbortHandle {
        let core = Arc::downgrade(self);
        let bus = Arc::clone(&self.bus);
        let topic = self.group_topic(&group);
        // Asked for through the publisher, before the change that tells the other nodes
        // of the group's first member here: once they list it, what they broadcast to
        // the group reaches this node. With the queue full, the bus is far behind and
        // the subscription is asked for at once.
        let (answer, subscribed) = oneshot::channel();
        let in_turn = (self.outbound)
            .try_send(Outbound::Subscribe(topic.clone(), answer))
            .is_ok();
        let task = self.runtime.spawn(async move {
            let subscribed = if in_turn {
                match subscribed.await {
                    Ok(subscribed) => subscribed,
                    // The publisher has ended: so has the node.
                    Err(_) => return,
                }
            } else {
                bus.subscribe(topic).await
            };
            let stream = match subscribed {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(%group, error = %e, "cluster: cannot subscribe to a group");
                    return;
                }
            };
            drop(bus);
            let handle = move |core: &Arc<Core>, payload: Bytes| {
                let mut reader = Reader(payload);
                let except = match reader.u64()? {
                    0 => None,
                    id => Some(ConnectionId(id)),
                };
                let deliver = core.deliver.get()?;
                deliver.group(&group, except, reader.rest())
            };
            pump(core, stream, handle).await;
        });
        task.abort_handle()
    }

    /// Says this node is alive, and with `hello` asks the others to say so at once.
    fn heartbeat(&self, hello: bool) {
        let state = lock(&self.state);
        if state.leaving {
            return;
        }
        let seq = state.seq;
        let mut out = BytesMut::new();
        out.put_u8(kind::HEARTBEAT);
        out.put_u16(self.tag);
        out.put_u64(self.incarnation);
        out.put_u64(seq);
        out.put_u8(u8::from(hello));
        put_str(&mut out, &self.node);
        self.send(self.presence_topic(), out.freeze());
        drop(state);
    }

    /// A local member joined `group` with `label`, or changed its label.
    fn joined(self: &Arc<Self>, group: &Arc<str>, id: ConnectionId, label: Arc<str>) {
        let mut state = lock(&self.state);
        let entry = state.local.entry(Arc::clone(group)).or_insert_with(|| {
            debug!(%group, "cluster: subscribing");
            LocalGroup {
                members: Group::new(),
                subscription: self.subscribe_group(Arc::clone(group)),
            }
        });
        if entry.members.get(&id) == Some(&label) {
            return;
        }
        entry.members.insert(id, Arc::clone(&label));
        state.seq += 1;
        let seq = state.seq;
        self.change(seq, group, id, Some(&label));
    }

    /// A local member left `group`.
    fn left(&self, group: &str, id: ConnectionId) {
        let mut state = lock(&self.state);
        let Some(entry) = state.local.get_mut(group) else {
            return;
        };
        if entry.members.remove(&id).is_none() {
            return;
        }
        if entry.members.is_empty() {
            if let Some(entry) = state.local.remove(group) {
                entry.subscription.abort();
                debug!(%group, "cluster: unsubscribed");
            }
        }
        state.seq += 1;
        let seq = state.seq;
        self.change(seq, group, id, None);
    }

    fn change(&self, seq: u64, group: &str, id: ConnectionId, label: Option<&str>) {
        let mut out = BytesMut::new();
        out.put_u8(kind::CHANGE);
        out.put_u16(self.tag);
        out.put_u64(self.incarnation);
        out.put_u64(seq);
        put_str(&mut out, group);
        out.put_u64(id.0);
        match label {
            Some(label) => {
                out.put_u8(1);
                put_str(&mut out, label);
            }
            None => out.put_u8(0),
        }
        self.send(self.presence_topic(), out.freeze());
    }

    fn on_presence(self: &Arc<Self>, payload: Bytes) -> Option<()> {
        let mut r = Reader(payload);
        let kind = r.u8()?;
        let tag = r.u16()?;
        let incarnation = r.u64()?;
        if tag == self.tag && kind != kind::HEARTBEAT {
            return Some(());
        }
        let mut state = lock(&self.state);
        match kind {
            kind::HEARTBEAT => {
                let seq = r.u64()?;
                let hello = r.u8()? != 0;
                let name = r.str()?;
                if tag == self.tag {
                    if name != self.node {
                        warn!(other = %name, "cluster: another node has this node's id tag");
                    }
                    return Some(());
                }
                let (node, earlier) = self.view(&mut state, tag, incarnation, &name);
                node.last_seen = Instant::now();
                if node.seq != seq && node.syncing.is_none() {
                    self.ask_sync(node, tag);
                }
                drop(state);
                self.members_lost(earlier);
                if hello {
                    self.heartbeat(false);
                }
            }
            kind::CHANGE => {
                let change = Change {
                    seq: r.u64()?,
                    group: r.str()?,
                    id: ConnectionId(r.u64()?),
                    label: match r.u8()? {
                        0 => None,
                        _ => Some(r.str()?),
                    },
                };
                let Some(node) = state.nodes.get_mut(&tag) else {
                    // Unknown yet: its next heartbeat brings it, and its membership.
                    return Some(());
                };
                if node.incarnation != incarnation {
                    return Some(());
                }
                node.last_seen = Instant::now();
                if let Some((_, held)) = &mut node.syncing {
                    if held.len() < MAX_HELD_CHANGES {
                        held.push(change);
                    }
                } else if change.seq == node.seq + 1 {
                    node.apply(change);
                } else if change.seq > node.seq + 1 {
                    self.ask_sync(node, tag);
                    if let Some((_, held)) = &mut node.syncing {
                        held.push(change);
                    }
                }
            }
            kind::BYE => {
                if state
                    .nodes
                    .get(&tag)
                    .is_some_and(|n| n.incarnation == incarnation)
                {
                    if let Some(node) = state.nodes.remove(&tag) {
                        info!(node = %node.name, "cluster: a node left");
                        drop(state);
                        self.members_lost(Some(node.groups));
                    }
                }
            }
            _ => return None,
        }
        Some(())
    }

    /// The view of node `tag`, made afresh if it is new or has restarted, with the
    /// members of its earlier run if it has.
    fn view<'s>(
        &self,
        state: &'s mut State,
        tag: u16,
        incarnation: u64,
        name: &Arc<str>,
    ) -> (&'s mut NodeView, Option<HashMap<Arc<str>, Group>>) {
        let node = state.nodes.entry(tag).or_insert_with(|| {
            info!(node = %name, "cluster: a node joined");
            NodeView::new(name, incarnation)
        });
        let mut earlier = None;
        if node.incarnation != incarnation {
            info!(node = %name, "cluster: a node restarted");
            earlier = Some(std::mem::replace(node, NodeView::new(name, incarnation)).groups);
        }
        (node, earlier)
    }

    /// Tells this node's members of the members that went with other nodes.
    fn members_lost(&self, gone: impl IntoIterator<Item = HashMap<Arc<str>, Group>>) {
        let Some(deliver) = self.deliver.get() else {
            return;
        };
        for groups in gone {
            for (group, members) in &groups {
                deliver.lost(group, members);
            }
        }
    }

    /// Asks node `tag` for its whole membership.
    fn ask_sync(&self, node: &mut NodeView, tag: u16) {
        if node
            .syncing
            .as_ref()
            .is_some_and(|(since, _)| since.elapsed() < SYNC_RETRY)
        {
            return;
        }
        node.syncing = Some((Instant::now(), Vec::new()));
        let mut out = BytesMut::new();
        out.put_u8(kind::SYNC);
        out.put_u16(self.tag);
        self.send(self.node_topic(tag), out.freeze());
    }

    fn on_node(self: &Arc<Self>, payload: Bytes) -> Option<()> {
        let mut r = Reader(payload);
        match r.u8()? {
            kind::DIRECT => {
                let to = ConnectionId(r.u64()?);
                self.deliver.get()?.direct(to, r.rest())
            }
            kind::SYNC => {
                let to = r.u16()?;
                self.send_snapshot(to);
                Some(())
            }
            kind::SNAPSHOT => self.on_snapshot(r),
            kind::CLAIMED => {
                let claim = r.u64()?;
                let from = r.u16()?;
                let taken = r.u8()? != 0;
                let mut state = lock(&self.state);
                let wait = state.claims.get_mut(&claim)?;
                wait.waiting.remove(&from);
                if taken || wait.waiting.is_empty() {
                    if let Some(done) = wait.done.take() {
                        let _ = done.send(!taken);
                    }
                    state.claims.remove(&claim);
                }
                Some(())
            }
            _ => None,
        }
    }

    /// Sends the local membership to node `to`, in parts.
    fn send_snapshot(&self, to: u16) {
        let state = lock(&self.state);
        let seq = state.seq;
        let entries: Vec<(Arc<str>, ConnectionId, Arc<str>)> = (state.local.iter())
            .flat_map(|(group, g)| {
                (g.members.iter()).map(|(id, label)| (group.clone(), *id, label.clone()))
            })
            .collect();
        drop(state);
        let header = |part: u32| {
            let mut out = BytesMut::new();
            out.put_u8(kind::SNAPSHOT);
            out.put_u16(self.tag);
            out.put_u64(self.incarnation);
            out.put_u64(seq);
            out.put_u32(part);
            out
        };
        let mut part = 0;
        let mut out = header(part);
        let mut body = BytesMut::new();
        for (group, id, label) in &entries {
            put_str(&mut body, group);
            body.put_u64(id.0);
            put_str(&mut body, label);
            if body.len() >= SNAPSHOT_PART_BYTES {
                out.put_u8(0);
                out.put_slice(&body);
                self.send(self.node_topic(to), out.freeze());
                body.clear();
                part += 1;
                out = header(part);
            }
        }
        out.put_u8(1);
        out.put_slice(&body);
        self.send(self.node_topic(to), out.freeze());
    }

    fn on_snapshot(&self, mut r: Reader) -> Option<()> {
        let tag = r.u16()?;
        let incarnation = r.u64()?;
        let seq = r.u64()?;
        let part = r.u32()?;
        let last = r.u8()? != 0;
        let mut entries = Vec::new();
        while !r.0.is_empty() {
            entries.push((r.str()?, ConnectionId(r.u64()?), r.str()?));
        }
        let mut state = lock(&self.state);
        let node = state.nodes.get_mut(&tag)?;
        if node.incarnation != incarnation {
            return Some(());
        }
        let assembling = match (part, node.assembling.take()) {
            (0, _) => (seq, 0, HashMap::new()),
            (part, Some(parts)) if parts.0 == seq && parts.1 == part => parts,
            // A part went missing: the next heartbeat asks again.
            _ => return Some(()),
        };
        let (seq, next, mut groups) = assembling;
        for (group, id, label) in entries {
            groups.entry(group).or_default().insert(id, label);
        }
        if !last {
            node.assembling = Some((seq, next + 1, groups));
            return Some(());
        }
        node.groups = groups;
        node.seq = seq;
        let (_, mut held) = node.syncing.take().unwrap_or((Instant::now(), Vec::new()));
        held.sort_unstable_by_key(|c| c.seq);
        for change in held {
            if change.seq == node.seq + 1 {
                node.apply(change);
            }
        }
        Some(())
    }

    fn on_names(self: &Arc<Self>, payload: Bytes) -> Option<()> {
        let mut r = Reader(payload);
        if r.u8()? != kind::CLAIM {
            return None;
        }
        let from = r.u16()?;
        let claim = r.u64()?;
        let at = r.u64()?;
        let id = ConnectionId(r.u64()?);
        let name = r.str()?;
        let taken = lock(&self.names).refuses(&name, id, (at, from), self.tag);
        let mut out = BytesMut::new();
        out.put_u8(kind::CLAIMED);
        out.put_u64(claim);
        out.put_u16(self.tag);
        out.put_u8(u8::from(taken));
        self.send(self.node_topic(from), out.freeze());
        Some(())
    }

    /// Asks every other node alive whether `name` may go to `id`, claimed at `at`:
    /// true unless one of them holds it, or claimed it first.
    fn claim(self: &Arc<Self>, name: &str, id: ConnectionId, at: u64) -> BoxFuture<'static, bool> {
        let claim = self.next_claim.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            let waiting: HashSet<u16> = state.nodes.keys().copied().collect();
            if waiting.is_empty() {
                return Box::pin(std::future::ready(true));
            }
            let done = Some(done);
            state.claims.insert(claim, ClaimWait { waiting, done });
        }
        let mut out = BytesMut::new();
        out.put_u8(kind::CLAIM);
        out.put_u16(self.tag);
        out.put_u64(claim);
        out.put_u64(at);
        out.put_u64(id.0);
        put_str(&mut out, name);
        self.send(self.names_topic(), out.freeze());
        let core = Arc::downgrade(self);
        Box::pin(async move {
            let granted = tokio::time::timeout(CLAIM_TIMEOUT, answer).await;
            if let Some(core) = core.upgrade() {
                lock(&core.state).claims.remove(&claim);
            }
            // No answer from a node by then: it is going, and does not hold it up.
            granted.map_or(true, |answer| answer.unwrap_or(true))
        })
    }

    /// Ends the node's tasks: its listeners, publisher, heartbeats and groups.
    fn stop(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        for group in lock(&self.state).local.values() {
            group.subscription.abort();
        }
    }

    /// Takes nodes that stopped saying they are alive for gone, and says this one is.
    fn tick(&self) {
        let timeout = self.options.node_timeout;
        let mut state = lock(&self.state);
        let mut gone = Vec::new();
        state.nodes.retain(|_, node| {
            let alive = node.last_seen.elapsed() <= timeout;
            if !alive {
                warn!(
                    node = %node.name,
                    members = node.groups.values().map(HashMap::len).sum::<usize>(),
                    "cluster: a node stopped answering; its members are gone"
                );
                self.counters.nodes_lost.fetch_add(1, Ordering::Relaxed);
                gone.push(std::mem::take(&mut node.groups));
            }
            alive
        });
        drop(state);
        // Cut off from the bus, this node cannot tell a node gone from one out of
        // reach: its members leave the lists, but nobody is told they left.
        if self.bus.is_connected() {
            self.members_lost(gone);
        }
        self.heartbeat(false);
    }
}

impl NodeView {
    fn new(name: &Arc<str>, incarnation: u64) -> Self {
        NodeView {
            name: Arc::clone(name),
            incarnation,
            seq: 0,
            last_seen: Instant::now(),
            groups: HashMap::new(),
            syncing: None,
            assembling: None,
        }
    }

    fn apply(&mut self, change: Change) {
        self.seq = change.seq;
        match change.label {
            Some(label) => {
                let group = self.groups.entry(change.group).or_default();
                group.insert(change.id, label);
            }
            None => {
                if let Some(group) = self.groups.get_mut(&change.group) {
                    group.remove(&change.id);
                    if group.is_empty() {
                        self.groups.remove(&change.group);
                    }
                }
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `handle` on every payload of `stream` while the node lives, counting what is
/// received and what cannot be read.
async fn pump(
    core: Weak<Core>,
    mut stream: BoxStream<'static, Bytes>,
    handle: impl Fn(&Arc<Core>, Bytes) -> Option<()>,
) {
    while let Some(payload) = stream.next().await {
        let Some(core) = core.upgrade() else { return };
        core.counters.received.fetch_add(1, Ordering::Relaxed);
        if handle(&core, payload).is_none() {
            core.counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Takes what waits for the bus to it, in order.
async fn publish(core: Weak<Core>, mut queue: mpsc::Receiver<Outbound>) {
    while let Some(message) = queue.recv().await {
        let Some(core) = core.upgrade() else { return };
        let (topic, payload) = match message {
            Outbound::Publish(topic, payload) => (topic, payload),
            Outbound::Subscribe(topic, answer) => {
                // A group left meanwhile drops the stream, and so the subscription.
                let _ = answer.send(core.bus.subscribe(topic).await);
                continue;
            }
            Outbound::Flush(done) => {
                if let Err(e) = core.bus.flush().await {
                    debug!(error = %e, "cluster: flush failed");
                }
                let _ = done.send(());
                continue;
            }
        };
        let size = topic.len() + payload.len();
        core.outbound_bytes.fetch_sub(size, Ordering::AcqRel);
        let counter = if !core.bus.is_connected() {
            &core.counters.dropped
        } else {
            match core.bus.publish(topic, payload).await {
                Ok(()) => &core.counters.published,
                Err(e) => {
                    debug!(error = %e, "cluster: publish failed");
                    &core.counters.dropped
                }
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Says the node is alive, and looks for nodes that are not, every heartbeat.
async fn tick(core: Weak<Core>) {
    let every = match core.upgrade() {
        Some(core) => core.options.heartbeat,
        None => return,
    };
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match core.upgrade() {
            Some(core) => core.tick(),
            None => return,
        }
    }
}

/// Hands what comes from other nodes to the server's connections.
trait Deliver: Send + Sync {
    /// A broadcast to `group`, for every local member but `except`.
    fn group(&self, group: &str, except: Option<ConnectionId>, message: Bytes) -> Option<()>;
    /// A message for connection `to`.
    fn direct(&self, to: ConnectionId, message: Bytes) -> Option<()>;
    /// Members of `group` on another node went with it: one message for them all.
    fn lost(&self, group: &str, members: &Group);
}

/// What ties a cluster to a server whose mailboxes take `M`.
struct Glue<M> {
    core: Arc<Core>,
    connections: Weak<Connections<M>>,
}

impl<M: ClusterMessage> Deliver for Glue<M> {
    fn group(&self, group: &str, except: Option<ConnectionId>, message: Bytes) -> Option<()> {
        let message = M::decode(message)?;
        let connections = self.connections.upgrade()?;
        connections.broadcast_local(group, &|| message.clone(), except);
        Some(())
    }

    fn direct(&self, to: ConnectionId, message: Bytes) -> Option<()> {
        let message = M::decode(message)?;
        let connections = self.connections.upgrade()?;
        // Ended, or a full mailbox: the receiver's business, as on one node.
        drop(connections.post_local(to, message));
        Some(())
    }

    fn lost(&self, group: &str, members: &Group) {
        let mut members: Vec<_> = members.iter().collect();
        members.sort_unstable_by_key(|(id, _)| **id);
        let labels: Vec<Arc<str>> = members.into_iter().map(|(_, l)| Arc::clone(l)).collect();
        if labels.is_empty() {
            return;
        }
        let (Some(message), Some(connections)) =
            (M::members_lost(group, &labels), self.connections.upgrade())
        else {
            return;
        };
        connections.broadcast_local(group, &|| message.clone(), None);
    }
}

impl<M: ClusterMessage> Remote<M> for Glue<M> {
    fn is_local(&self, id: ConnectionId) -> bool {
        id.node_tag() == self.core.tag
    }

    fn broadcast(&self, group: &str, message: &M, except: Option<ConnectionId>) {
        let mut out = BytesMut::new();
        out.put_u64(except.map_or(0, |id| id.0));
        message.encode(&mut out);
        self.core.send(self.core.group_topic(group), out.freeze());
    }

    fn send_to(&self, to: ConnectionId, message: &M) {
        let mut out = BytesMut::new();
        out.put_u8(kind::DIRECT);
        out.put_u64(to.0);
        message.encode(&mut out);
        self.core
            .send(self.core.node_topic(to.node_tag()), out.freeze());
    }

    fn joined(&self, group: &Arc<str>, id: ConnectionId, label: Arc<str>) {
        self.core.joined(group, id, label);
    }

    fn left(&self, group: &str, id: ConnectionId) {
        self.core.left(group, id);
    }
}

/// A cluster as a server's [`Service`](crate::Service) carries it from
/// [`Builder::cluster`](crate::Builder::cluster) to the server's start, with what ties
/// it to connections whose mailboxes take `M`.
pub struct ClusterLink<M> {
    cluster: Cluster,
    attach: fn(&Cluster, &Arc<Connections<M>>) -> Result<(), Error>,
}

impl<M: ClusterMessage> ClusterLink<M> {
    pub(crate) fn new(cluster: Cluster) -> Self {
        ClusterLink {
            cluster,
            attach: Cluster::attach::<M>,
        }
    }
}

impl<M> ClusterLink<M> {
    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub(crate) fn attach(&self, connections: &Arc<Connections<M>>) -> Result<(), Error> {
        (self.attach)(&self.cluster, connections)
    }
}

impl<M> fmt::Debug for ClusterLink<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cluster.fmt(f)
    }
}

impl prometheus_client::collector::Collector for Cluster {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let stats = self.stats();
        let gauges = [
            (
                "cluster_connected",
                "1 while the cluster's bus is connected.",
                i64::from(stats.connected),
            ),
            ("cluster_nodes", "Other nodes alive.", stats.nodes as i64),
            (
                "cluster_queued",
                "Messages waiting for the bus.",
                stats.queued as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(family)?;
        }
        let counters = [
            (
                "cluster_published",
                "Messages published to the bus.",
                stats.published,
            ),
            (
                "cluster_dropped",
                "Messages for other nodes dropped: the bus was away, or too much waited for it.",
                stats.dropped,
            ),
            (
                "cluster_received",
                "Messages received from other nodes.",
                stats.received,
            ),
            (
                "cluster_malformed",
                "Messages received that could not be read.",
                stats.malformed,
            ),
            (
                "cluster_reconnects",
                "Times the bus reconnected.",
                stats.reconnects,
            ),
            (
                "cluster_bus_dropped",
                "Times the bus dropped incoming messages (a subscription fell behind).",
                stats.bus_dropped,
            ),
            (
                "cluster_nodes_lost",
                "Nodes taken for gone after they stopped saying they were alive.",
                stats.nodes_lost,
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}
