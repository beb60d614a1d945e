//! Names held by one connection at a time: on one server, or across a cluster.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::{now_ms, Core, CLAIM_TIMEOUT};
use crate::connections::{lock, ConnectionId};

/// A registry of names, each held by one connection at a time, such as a chat's
/// nicks: [`Names::new`] for one server, [`Cluster::names`](super::Cluster::names)
/// for a whole cluster. Names are compared as given: fold their case first for
/// case-insensitive names. Cheap to clone.
///
/// On a cluster, a claim asks every other node alive; a node that holds the name, or
/// claimed it earlier (by the claim's time, then by node), refuses it. A node that has
/// not answered within a second does not hold a claim up.
///
/// ```
/// use linedancer::cluster::{Claim, Names};
/// use linedancer::ConnectionId;
///
/// let names = Names::new();
/// assert!(matches!(names.claim("ann", ConnectionId(1)), Claim::Granted));
/// assert!(matches!(names.claim("ann", ConnectionId(2)), Claim::Taken));
/// names.release("ann", ConnectionId(1));
/// assert!(names.try_claim("ann", ConnectionId(2)));
/// assert_eq!(names.holder("ann"), Some(ConnectionId(2)));
/// ```
#[derive(Clone, Default)]
pub struct Names {
    table: Arc<Mutex<NameTable>>,
    /// The cluster to ask, if any.
    cluster: Option<Weak<Core>>,
}

impl fmt::Debug for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Names")
            .field("held", &lock(&self.table).held.len())
            .field("clustered", &self.cluster.is_some())
            .finish()
    }
}

/// The answer to [`Names::claim`].
#[must_use = "a claim may still have to be awaited"]
pub enum Claim {
    /// The name is the connection's.
    Granted,
    /// Another connection holds the name.
    Taken,
    /// The cluster's bus is away: the other nodes cannot be asked.
    Unavailable,
    /// The other nodes are being asked: true once the name is the connection's.
    /// Dropped unawaited, the name stays reserved until released.
    Asking(Pin<Box<dyn Future<Output = bool> + Send>>),
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Claim::Granted => "Granted",
            Claim::Taken => "Taken",
            Claim::Unavailable => "Unavailable",
            Claim::Asking(_) => "Asking",
        })
    }
}

/// Who holds each name on this node, and since when; and the names this node let
/// another node claim.
#[derive(Debug, Default)]
pub(super) struct NameTable {
    held: HashMap<Arc<str>, Hold>,
    /// Names another node's claim was told it may have: the claim's time, and until
    /// when it is remembered. A claim of one of them from this node meanwhile is timed
    /// after it, so that the other node, which may still be asking, refuses it: it
    /// could not tell otherwise that its own claim was answered first.
    promised: HashMap<Arc<str>, (u64, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    id: ConnectionId,
    /// When it was claimed (ms since the epoch), to settle two claims at once.
    at: u64,
    /// False while the other nodes are asked.
    settled: bool,
}

impl NameTable {
    /// Whether a claim of `name` by `id` from node `node` at `at` is to be refused
    /// here, on node `here`: the name is held, or claimed earlier. Not refused, it is
    /// promised to that claim for a while.
    pub(super) fn refuses(
        &mut self,
        name: &Arc<str>,
        id: ConnectionId,
        at: (u64, u16),
        here: u16,
    ) -> bool {
        let refused = match self.held.get(name) {
            None => false,
            Some(hold) if hold.id == id => false,
            Some(hold) => hold.settled || (hold.at, here) < at,
        };
        if !refused {
            let now = Instant::now();
            self.promised.retain(|_, (_, until)| *until > now);
            // Remembered past the other node's last moment to decide.
            let until = now + 2 * CLAIM_TIMEOUT;
            self.promised.insert(Arc::clone(name), (at.0, until));
        }
        refused
    }

    /// The time of a claim of `name` made now on this node: now, or just after a
    /// claim of another node this node answered lately.
    fn claim_time(&self, name: &str) -> u64 {
        let promised = (self.promised.get(name))
            .filter(|(_, until)| *until > Instant::now())
            .map_or(0, |(at, _)| at + 1);
        now_ms().max(promised)
    }
}

impl Names {
    /// A registry for one server.
    pub fn new() -> Names {
        Names::default()
    }

    pub(super) fn clustered(table: Arc<Mutex<NameTable>>, core: Weak<Core>) -> Names {
        Names {
            table,
            cluster: Some(core),
        }
    }

    /// Gives `name` to `id` if nobody on this node holds it, at once, without asking
    /// the other nodes: for names that cannot clash across nodes, such as ones made
    /// from a connection id.
    pub fn try_claim(&self, name: &str, id: ConnectionId) -> bool {
        let mut table = lock(&self.table);
        let hold = table.held.entry(name.into()).or_insert(Hold {
            id,
            at: now_ms(),
            settled: true,
        });
        hold.id == id
    }

    /// Claims `name` for `id`: granted or refused at once on one server; on a cluster,
    /// reserved here and then [`Asking`](Claim::Asking) the other nodes.
    pub fn claim(&self, name: &str, id: ConnectionId) -> Claim {
        let core = self.cluster.as_ref().and_then(Weak::upgrade);
        if core.as_ref().is_some_and(|core| !core.bus.is_connected()) {
            return Claim::Unavailable;
        }
        let name: Arc<str> = name.into();
        let at;
        {
            let mut table = lock(&self.table);
            at = table.claim_time(&name);
            let hold = table.held.entry(Arc::clone(&name)).or_insert(Hold {
                id,
                at,
                settled: core.is_none(),
            });
            if hold.id != id {
                return Claim::Taken;
            }
            if hold.settled {
                return Claim::Granted;
            }
        }
        let Some(core) = core else {
            return Claim::Granted;
        };
        let asking = core.claim(&name, id, at);
        let table = Arc::clone(&self.table);
        Claim::Asking(Box::pin(async move {
            let granted = asking.await;
            let mut table = lock(&table);
            match table.held.get_mut(&name) {
                Some(hold) if hold.id == id && granted => hold.settled = true,
                Some(hold) if hold.id == id => drop(table.held.remove(&name)),
                // Released while asking.
                _ => return false,
            }
            granted
        }))
    }

    /// Gives `name` up, if `id` holds it.
    pub fn release(&self, name: &str, id: ConnectionId) {
        let mut table = lock(&self.table);
        if table.held.get(name).is_some_and(|hold| hold.id == id) {
            table.held.remove(name);
        }
    }

    /// Who holds `name` on this node.
    pub fn holder(&self, name: &str) -> Option<ConnectionId> {
        lock(&self.table).held.get(name).map(|hold| hold.id)
    }
}
