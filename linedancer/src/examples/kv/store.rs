//! The key-value store every `kv` connection shares: binary keys and values, with
//! expiry, and the subscriber count of each publish/subscribe channel.
//!
//! It has no clock: every operation is given the time now (the protocol's
//! [`Ctx::now`](crate::Ctx::now)), so the harness tests expiry in virtual time. Keys are
//! spread over shards, each behind its own lock, so that per-core threads seldom wait
//! for each other. An expired key is removed when it is next touched, and each shard's
//! keys with a time to live are also kept in a queue by expiry, from which every
//! operation on the shard removes a few that are due: keys nobody reads again do not
//! stay for ever.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Shards of the store; a power of two.
const SHARDS: usize = 16;

/// Expired keys removed from the expiry queue, at most, by each operation on a shard.
const PURGE_PER_OPERATION: usize = 8;

/// The store.
#[derive(Debug)]
pub struct Db {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard; randomly seeded, so no peer can aim its keys at one.
    hasher: RandomState,
    /// Subscribers of each channel that has any.
    channels: Mutex<HashMap<Bytes, usize>>,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            channels: Mutex::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Bytes, Entry>,
    /// The keys of this shard with an expiry, soonest first. An entry whose key has
    /// since been given another expiry, or none, is stale, and skipped when due.
    expiries: BinaryHeap<Reverse<(Instant, Bytes)>>,
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    expires: Option<Instant>,
}

/// When `SET` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Always.
    Always,
    /// `NX`: only if the key does not exist.
    IfMissing,
    /// `XX`: only if it exists.
    IfExists,
}

/// Why `INCRBY` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncrError {
    /// The value is not a decimal integer in range.
    NotAnInteger,
    /// The result would not fit in 64 bits.
    Overflow,
}

/// A key's time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// No such key.
    Missing,
    /// The key does not expire.
    Forever,
    /// The key expires after this long.
    Left(Duration),
}

impl Shard {
    /// The live entry of `key`, after removing it if it has expired.
    fn live(&mut self, key: &[u8], now: Instant) -> Option<&mut Entry> {
        let expired = self
            .map
            .get(key)
            .is_some_and(|entry| entry.expires.is_some_and(|at| at <= now));
        if expired {
            self.map.remove(key);
        }
        self.map.get_mut(key)
    }

    /// Removes a few expired keys from the queue.
    fn purge(&mut self, now: Instant, mut budget: usize) {
        while budget > 0 {
            match self.expiries.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => return,
            }
            let Some(Reverse((at, key))) = self.expiries.pop() else {
                return;
            };
            if self.map.get(&key).is_some_and(|e| e.expires == Some(at)) {
                self.map.remove(&key);
            }
            budget -= 1;
        }
    }

    /// Queues `key` for removal at `at`; rebuilds the queue when stale entries have
    /// come to outnumber the keys that expire.
    fn expire_at(&mut self, key: Bytes, at: Instant) {
        self.expiries.push(Reverse((at, key)));
        if self.expiries.len() > 64 && self.expiries.len() > 2 * self.map.len() {
            let map = &self.map;
            self.expiries
                .retain(|Reverse((at, key))| map.get(key).is_some_and(|e| e.expires == Some(*at)));
        }
    }
}

impl Db {
    /// A new, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, key: &[u8], now: Instant) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize & (SHARDS - 1);
        let mut shard = lock(&self.shards[index]);
        shard.purge(now, PURGE_PER_OPERATION);
        shard
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Bytes> {
        let mut shard = self.shard(key, now);
        shard.live(key, now).map(|entry| entry.value.clone())
    }

    /// Sets `key` to `value` if `condition` holds, expiring at `expires` (or never);
    /// returns whether it did.
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        expires: Option<Instant>,
        condition: Condition,
        now: Instant,
    ) -> bool {
        let mut shard = self.shard(key, now);
        let exists = shard.live(key, now).is_some();
        match condition {
            Condition::IfMissing if exists => return false,
            Condition::IfExists if !exists => return false,
            _ => {}
        }
        // Copied: a slice of the request would keep its whole read buffer alive.
        let key = Bytes::copy_from_slice(key);
        let entry = Entry {
            value: Bytes::copy_from_slice(value),
            expires,
        };
        if let Some(at) = expires {
            shard.expire_at(key.clone(), at);
        }
        shard.map.insert(key, entry);
        true
    }

    /// Removes `key`; returns whether it existed.
    pub fn del(&self, key: &[u8], now: Instant) -> bool {
        let mut shard = self.shard(key, now);
        shard.live(key, now).is_some() && shard.map.remove(key).is_some()
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &[u8], now: Instant) -> bool {
        self.shard(key, now).live(key, now).is_some()
    }

    /// Adds `delta` to the integer in `key` (0 if it does not exist), keeping its
    /// expiry; returns the new value.
    pub fn incr_by(&self, key: &[u8], delta: i64, now: Instant) -> Result<i64, IncrError> {
        let mut shard = self.shard(key, now);
        let (old, expires) = match shard.live(key, now) {
            Some(entry) => (
                super::resp::parse_int(&entry.value).ok_or(IncrError::NotAnInteger)?,
                entry.expires,
            ),
            None => (0, None),
        };
        let new = old.checked_add(delta).ok_or(IncrError::Overflow)?;
        let value = super::resp::format_int(new);
        match shard.map.get_mut(key) {
            Some(entry) => entry.value = value,
            None => {
                let entry = Entry { value, expires };
                shard.map.insert(Bytes::copy_from_slice(key), entry);
            }
        }
        Ok(new)
    }

    /// Sets when `key` expires; one in the past removes it. Returns whether the key
    /// exists (existed).
    pub fn expire(&self, key: &[u8], at: Instant, now: Instant) -> bool {
        let mut shard = self.shard(key, now);
        if shard.live(key, now).is_none() {
            return false;
        }
        if at <= now {
            shard.map.remove(key);
            return true;
        }
        if let Some(entry) = shard.map.get_mut(key) {
            entry.expires = Some(at);
        }
        shard.expire_at(Bytes::copy_from_slice(key), at);
        true
    }

    /// The time to live of `key`.
    pub fn ttl(&self, key: &[u8], now: Instant) -> Ttl {
        match self.shard(key, now).live(key, now) {
            None => Ttl::Missing,
            Some(Entry { expires: None, .. }) => Ttl::Forever,
            Some(Entry {
                expires: Some(at), ..
            }) => Ttl::Left(at.saturating_duration_since(now)),
        }
    }

    /// The number of keys, expired ones removed first.
    pub fn len(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = lock(shard);
                shard.purge(now, usize::MAX);
                shard.map.len()
            })
            .sum()
    }

    /// Whether the store has no key.
    pub fn is_empty(&self, now: Instant) -> bool {
        self.len(now) == 0
    }

    /// Removes every key.
    pub fn flush(&self) {
        for shard in self.shards.iter() {
            *lock(shard) = Shard::default();
        }
    }

    /// Counts a new subscriber of `channel`.
    pub fn subscribe(&self, channel: &Bytes) {
        *lock(&self.channels).entry(channel.clone()).or_default() += 1;
    }

    /// Counts one subscriber of `channel` less.
    pub fn unsubscribe(&self, channel: &[u8]) {
        let mut channels = lock(&self.channels);
        if let Some(count) = channels.get_mut(channel) {
            *count -= 1;
            if *count == 0 {
                channels.remove(channel);
            }
        }
    }

    /// The subscribers of `channel`.
    pub fn subscribers(&self, channel: &[u8]) -> usize {
        lock(&self.channels).get(channel).copied().unwrap_or(0)
    }
}

/// Locks `mutex`. No code panics while holding these locks with the data half changed,
/// so a poisoned lock is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_when_touched_and_when_due() {
        let db = Db::new();
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        assert!(db.set(b"a", b"1", Some(later), Condition::Always, now));
        assert!(db.set(b"b", b"2", None, Condition::Always, now));
        assert_eq!(db.ttl(b"a", now), Ttl::Left(Duration::from_secs(10)));
        assert_eq!(db.ttl(b"b", now), Ttl::Forever);
        assert_eq!(db.len(now), 2);
        assert_eq!(db.get(b"a", later), None);
        assert_eq!(db.ttl(b"a", later), Ttl::Missing);
        assert_eq!(db.len(later), 1);
        // Many keys nobody reads again are removed all the same, by the operations
        // on other keys of their shards.
        for i in 0..1000u32 {
            db.set(&i.to_be_bytes(), b"x", Some(later), Condition::Always, now);
        }
        for i in 0..2000u32 {
            db.get(format!("other{i}").as_bytes(), later);
        }
        let left: usize = db.shards.iter().map(|s| lock(s).map.len()).sum();
        assert_eq!(left, 1);
    }

    #[test]
    fn set_conditions_and_counters() {
        let db = Db::new();
        let now = Instant::now();
        assert!(!db.set(b"k", b"v", None, Condition::IfExists, now));
        assert!(db.set(b"k", b"v", None, Condition::IfMissing, now));
        assert!(!db.set(b"k", b"w", None, Condition::IfMissing, now));
        assert_eq!(db.incr_by(b"k", 1, now), Err(IncrError::NotAnInteger));
        assert_eq!(db.incr_by(b"n", 5, now), Ok(5));
        assert_eq!(db.incr_by(b"n", -7, now), Ok(-2));
        assert!(db.set(b"m", b"9223372036854775807", None, Condition::Always, now));
        assert_eq!(db.incr_by(b"m", 1, now), Err(IncrError::Overflow));
        assert!(db.del(b"k", now));
        assert!(!db.del(b"k", now));
    }
}
