//! The in-process store: a bounded moka cache of envelopes, each entry expiring from
//! memory at its `stale_until`. Generic over the value so the core stays free of pyo3.
//!
//! moka's expiry runs on the real monotonic clock, so state is always decided against the
//! cache's own (injectable) clock on read; moka's expiry only reclaims memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::Expiry;

use super::Times;

/// A value with its envelope times: what the engine serves, whichever store it came from.
pub struct Entry<V> {
    pub value: V,
    pub times: Times,
    /// Consecutive negative answers this entry records (0 for a positive value).
    pub negative: u32,
    keep_for: Duration,
}

impl<V> Entry<V> {
    pub fn new(value: V, times: Times, now: i64) -> Arc<Self> {
        Self::kept(value, times, 0, times.keep_for(now))
    }

    /// An entry kept for `keep_secs` seconds, which a negative entry needs beyond its
    /// `stale_until` so the next answer still sees its streak.
    pub fn kept(value: V, times: Times, negative: u32, keep_secs: u64) -> Arc<Self> {
        Arc::new(Self {
            value,
            times,
            negative,
            keep_for: Duration::from_secs(keep_secs.max(1)),
        })
    }
}

struct ExpireAtStaleUntil;

impl<V> Expiry<String, Arc<Entry<V>>> for ExpireAtStaleUntil {
    fn expire_after_create(
        &self,
        _: &String,
        entry: &Arc<Entry<V>>,
        _: Instant,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Arc<Entry<V>>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }
}

/// foldhash instead of SipHash: keys are hashes or app-chosen names, and lookups are the
/// hot path (SipHash was ~6 % of a decorated hit in `perf`).
type Hasher = foldhash::fast::RandomState;

pub struct MemoryStore<V: Send + Sync + 'static> {
    entries: moka::sync::Cache<String, Arc<Entry<V>>, Hasher>,
    evictions: Arc<AtomicU64>,
    /// Bumped after every change of the store's contents (insert, remove, clear, eviction,
    /// expiry). An entry read while the generation was g is still the current one for its
    /// key as long as the generation is still g: front caches validate with one load.
    generation: Arc<AtomicU64>,
}

impl<V: Send + Sync + 'static> MemoryStore<V> {
    pub fn new(max_entries: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&evictions);
        let changed = Arc::clone(&generation);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_entries)
            // LRU, not TinyLFU: a value just set must be readable even when the cache is
            // full (TinyLFU may refuse to admit a new key).
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(ExpireAtStaleUntil)
            .eviction_listener(move |_key, _value, cause| {
                if cause == RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                changed.fetch_add(1, Ordering::AcqRel);
            })
            .build_with_hasher(Hasher::default());
        Self {
            entries,
            evictions,
            generation,
        }
    }

    /// Read this before reading entries (see `generation`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry<V>>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: String, entry: Arc<Entry<V>>) {
        self.entries.insert(key, entry);
        self.changed();
    }

    pub fn remove(&self, key: &str) -> bool {
        let removed = self.entries.remove(key).is_some();
        self.changed();
        removed
    }

    pub fn clear(&self) {
        self.entries.invalidate_all();
        self.changed();
        self.entries.run_pending_tasks();
    }

    /// Entry count after pending maintenance (evictions, expiries) has run.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> u64 {
        self.entries.policy().max_capacity().unwrap_or(u64::MAX)
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(stale_until: i64) -> Times {
        Times {
            fetched_at: 0,
            fresh_until: stale_until,
            stale_until,
        }
    }

    #[test]
    fn bounded_and_counts_evictions() {
        let store = MemoryStore::new(10);
        for i in 0..200 {
            store.insert(format!("k{i}"), Entry::new(i, times(100), 0));
        }
        assert!(store.len() <= 10, "len {}", store.len());
        assert_eq!(store.evictions(), 190, "evictions");
    }

    #[test]
    fn every_change_moves_the_generation() {
        let store = MemoryStore::new(2);
        let mut last = store.generation();
        let mut moved = |store: &MemoryStore<i32>| {
            let now = store.generation();
            let did = now > last;
            last = now;
            did
        };
        store.insert("a".into(), Entry::new(1, times(100), 0));
        assert!(moved(&store), "insert");
        assert!(store.get("a").is_some());
        assert!(!moved(&store), "a read changes nothing");
        assert!(store.remove("a"));
        assert!(moved(&store), "remove");
        for i in 0..5 {
            store.insert(format!("k{i}"), Entry::new(i, times(100), 0));
        }
        store.len();
        assert!(moved(&store));
        store.clear();
        assert!(moved(&store), "clear");
    }

    #[test]
    fn insert_get_remove_clear() {
        let store = MemoryStore::new(100);
        store.insert("a".into(), Entry::new("x", times(100), 0));
        assert_eq!(store.get("a").unwrap().value, "x");
        assert!(store.remove("a"));
        assert!(!store.remove("a"));
        store.insert("b".into(), Entry::new("y", times(100), 0));
        store.clear();
        assert!(store.get("b").is_none());
        assert!(store.is_empty());
    }
}
