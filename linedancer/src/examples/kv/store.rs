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
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::resp::{parse_int, Reply};

/// Shards of the store; a power of two.
const SHARDS: usize = 16;

/// Expired keys removed from the expiry queue, at most, by each operation on a shard.
const PURGE_PER_OPERATION: usize = 8;

/// The store.
#[derive(Debug)]
pub struct Db {
    shards: Box<[Mutex<Shard>]>,
    /// Subscribers of each channel that has any.
    channels: Mutex<HashMap<Bytes, usize>>,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            channels: Mutex::default(),
        }
    }
}

/// A stored value: bytes, or a counter kept as a number (`INCR`'s), as Redis keeps
/// them, so that counting needs no parsing and no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Bytes, as `SET` wrote them.
    Bytes(Bytes),
    /// A number, read as its decimal digits.
    Int(i64),
}

impl Value {
    /// `GET`'s reply: a bulk string.
    pub fn into_reply(self) -> Reply {
        match self {
            Value::Bytes(bytes) => Reply::Bulk(bytes),
            Value::Int(n) => Reply::BulkInt(n),
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
    value: Value,
    expires: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
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
    /// Whether `key` exists and has not expired; an expired one is removed.
    fn exists(&mut self, key: &[u8], now: Instant) -> bool {
        match self.map.get(key) {
            None => false,
            Some(entry) if !entry.expired(now) => true,
            Some(_) => {
                self.map.remove(key);
                false
            }
        }
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
        let mut shard = lock(&self.shards[shard_of(key)]);
        shard.purge(now, PURGE_PER_OPERATION);
        shard
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Value> {
        let mut shard = self.shard(key, now);
        match shard.map.get(key) {
            None => None,
            Some(entry) if !entry.expired(now) => Some(entry.value.clone()),
            Some(_) => {
                shard.map.remove(key);
                None
            }
        }
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
        if condition != Condition::Always {
            let exists = shard.exists(key, now);
            if exists != (condition == Condition::IfExists) {
                return false;
            }
        }
        // Copied: a slice of the request would keep its whole read buffer alive.
        let value = Value::Bytes(Bytes::copy_from_slice(value));
        match shard.map.get_mut(key) {
            Some(entry) => *entry = Entry { value, expires },
            None => {
                let entry = Entry { value, expires };
                shard.map.insert(Bytes::copy_from_slice(key), entry);
            }
        }
        if let Some(at) = expires {
            shard.expire_at(Bytes::copy_from_slice(key), at);
        }
        true
    }

    /// Removes `key`; returns whether it existed.
    pub fn del(&self, key: &[u8], now: Instant) -> bool {
        let mut shard = self.shard(key, now);
        shard
            .map
            .remove(key)
            .is_some_and(|entry| !entry.expired(now))
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &[u8], now: Instant) -> bool {
        self.shard(key, now).exists(key, now)
    }

    /// Adds `delta` to the integer in `key` (0 if it does not exist), keeping its
    /// expiry; returns the new value.
    pub fn incr_by(&self, key: &[u8], delta: i64, now: Instant) -> Result<i64, IncrError> {
        let mut shard = self.shard(key, now);
        if let Some(entry) = shard.map.get_mut(key).filter(|e| !e.expired(now)) {
            let old = match &entry.value {
                Value::Int(n) => *n,
                Value::Bytes(bytes) => parse_int(bytes).ok_or(IncrError::NotAnInteger)?,
            };
            let new = old.checked_add(delta).ok_or(IncrError::Overflow)?;
            entry.value = Value::Int(new);
            return Ok(new);
        }
        // Missing, or expired: a new counter.
        let entry = Entry {
            value: Value::Int(delta),
            expires: None,
        };
        shard.map.insert(Bytes::copy_from_slice(key), entry);
        Ok(delta)
    }

    /// Sets when `key` expires; one in the past removes it. Returns whether the key
    /// exists (existed).
    pub fn expire(&self, key: &[u8], at: Instant, now: Instant) -> bool {
        let mut shard = self.shard(key, now);
        if !shard.exists(key, now) {
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
        let mut shard = self.shard(key, now);
        if !shard.exists(key, now) {
            return Ttl::Missing;
        }
        match shard.map.get(key).and_then(|entry| entry.expires) {
            None => Ttl::Forever,
            Some(at) => Ttl::Left(at.saturating_duration_since(now)),
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

/// The shard of `key`: a cheap multiplicative hash. It need not resist a peer that
/// chooses its keys: that could only crowd one shard's lock, while each shard's map
/// keeps std's randomly seeded hash.
fn shard_of(key: &[u8]) -> usize {
    let mut hash: u64 = key.len() as u64;
    for chunk in key.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    (hash >> 60) as usize & (SHARDS - 1)
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
