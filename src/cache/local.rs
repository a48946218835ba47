//! The local tier: an in-process copy of entries in front of the remote, so hot keys are
//! served at memory speed. A copy is served for at most `ttl` seconds (bounded
//! staleness, whatever happens to the invalidation bus); the remote's invalidations
//! (another process wrote or deleted the key) drop it sooner. The whole tier is dropped
//! when the invalidation connection is (re)made, since messages may have been lost, and
//! in a forked child.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::memory::{Entry, MemoryStore};

/// What the remote says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// These remote keys were written or deleted by another client.
    Keys(Vec<Vec<u8>>),
    /// Anything may have changed (a flush, a lost or new connection).
    All,
}

/// Called by the remote with each invalidation, on its own threads.
pub type Listener = Arc<dyn Fn(Invalidation) + Send + Sync>;

/// How the tier learns of other processes' writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidated {
    /// Not connected yet.
    Pending,
    /// The server pushes invalidations (Redis client-side caching, broadcast mode).
    ByServer,
    /// The server cannot (a cluster, or no CLIENT TRACKING): copies live `ttl` only.
    ByTtlOnly,
}

pub struct LocalTier<V: Send + Sync + 'static> {
    store: MemoryStore<V>,
    ttl: i64,
    /// Remote keys are `{prefix}{key}`.
    prefix: String,
    /// Bumped by every invalidation: a read that raced one does not fill the tier with
    /// what it read before the change.
    invalidations: AtomicU64,
    fork_epoch: AtomicU64,
    mode: AtomicU8,
    pub hits: AtomicU64,
    pub dropped: AtomicU64,
    pub flushes: AtomicU64,
}

impl<V: Send + Sync + 'static> LocalTier<V> {
    pub fn new(max_entries: u64, ttl_secs: i64, prefix: String) -> Self {
        Self {
            store: MemoryStore::new(max_entries.max(1)),
            ttl: ttl_secs.max(1),
            prefix,
            invalidations: AtomicU64::new(0),
            fork_epoch: AtomicU64::new(crate::runtime::fork_epoch()),
            mode: AtomicU8::new(Invalidated::Pending as u8),
            hits: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// A forked child starts with an empty tier: the parent's copies may be stale and its
    /// invalidation connection does not exist here.
    fn check_fork(&self) {
        let epoch = crate::runtime::fork_epoch();
        if self.fork_epoch.swap(epoch, Ordering::AcqRel) != epoch {
            self.flush();
        }
    }

    /// A copy of `key` still servable at `now`.
    pub fn get(&self, key: &str, now: i64) -> Option<Arc<Entry<V>>> {
        self.check_fork();
        let found = self.store.get_until(key, now);
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Taken before reading the remote; `fill` then keeps the answer only if nothing was
    /// invalidated in between.
    pub fn mark(&self) -> u64 {
        self.invalidations.load(Ordering::Acquire)
    }

    /// Keeps what the remote answered for `key` (read at `mark`).
    pub fn fill(&self, key: &str, entry: &Arc<Entry<V>>, now: i64, mark: u64) {
        if self.mark() == mark {
            self.put(key, entry, now);
        }
    }

    /// Keeps what this process wrote (the server does not tell a writer of its own
    /// writes, so a newer write by another process still invalidates it).
    pub fn put(&self, key: &str, entry: &Arc<Entry<V>>, now: i64) {
        self.check_fork();
        let until = now.saturating_add(self.ttl);
        self.store
            .insert_until(Arc::from(key), Arc::clone(entry), until);
    }

    pub fn remove(&self, key: &str) {
        self.store.remove(key);
    }

    pub fn flush(&self) {
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.store.clear();
    }

    /// Applies what the remote pushed. Keys outside this tier's prefix are ignored.
    pub fn invalidate(&self, what: Invalidation) {
        match what {
            Invalidation::All => self.flush(),
            Invalidation::Keys(keys) => {
                self.invalidations.fetch_add(1, Ordering::AcqRel);
                for key in keys {
                    let Ok(key) = std::str::from_utf8(&key) else {
                        continue;
                    };
                    if let Some(own) = key.strip_prefix(self.prefix.as_str()) {
                        if self.store.remove(own) {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    pub fn set_mode(&self, mode: Invalidated) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    pub fn mode(&self) -> Invalidated {
        match self.mode.load(Ordering::Relaxed) {
            1 => Invalidated::ByServer,
            2 => Invalidated::ByTtlOnly,
            _ => Invalidated::Pending,
        }
    }

    pub fn len(&self) -> u64 {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Times;

    fn entry(v: u32) -> Arc<Entry<u32>> {
        let times = Times {
            fetched_at: 0,
            fresh_until: 1000,
            stale_until: 2000,
        };
        Entry::kept(v, times, 0, 3000)
    }

    #[test]
    fn copies_expire_after_the_local_ttl() {
        let tier = LocalTier::new(10, 5, "ns:".into());
        tier.put("k", &entry(1), 100);
        assert_eq!(tier.get("k", 104).map(|e| e.value), Some(1));
        assert!(tier.get("k", 105).is_none(), "served for local_ttl at most");
    }

    #[test]
    fn invalidations_drop_copies_and_block_racing_fills() {
        let tier = LocalTier::new(10, 60, "ns:".into());
        tier.put("a", &entry(1), 0);
        tier.put("b", &entry(2), 0);
        let mark = tier.mark();
        tier.invalidate(Invalidation::Keys(vec![
            b"ns:a".to_vec(),
            b"other:b".to_vec(),
        ]));
        assert!(tier.get("a", 1).is_none());
        assert!(
            tier.get("b", 1).is_some(),
            "another namespace's key is not ours"
        );
        tier.fill("c", &entry(3), 1, mark);
        assert!(
            tier.get("c", 1).is_none(),
            "read before the invalidation: not kept"
        );
        tier.fill("c", &entry(3), 1, tier.mark());
        assert!(tier.get("c", 1).is_some());
        tier.invalidate(Invalidation::All);
        assert!(tier.is_empty());
        assert_eq!(tier.dropped.load(Ordering::Relaxed), 1);
    }
}
