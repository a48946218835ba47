//! The in-process store: a bounded map of envelopes, sharded behind plain mutexes, with
//! sampled-LRU eviction (as Redis does it) and lazy reclaim of entries past their
//! `stale_until`. Generic over the value so the core stays free of pyo3.
//!
//! Why not moka (named by the design, and used by the first version): at capacity every
//! insert paid moka's housekeeping (a per-key lock map for the eviction listener, cht
//! rehashes, LRU queue upkeep), which made a cached function's miss+store 3x moka-py's
//! (`python benches/bench_engine.py`). Here an insert is one hash, one short lock and,
//! when the shard is full, five sampled slots. State (hit/stale/miss) is decided on read
//! against the cache's own injectable clock; the real monotonic clock only reclaims memory.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// foldhash: keys are hashes or app-chosen names, and lookups are the hot path.
type Hasher = foldhash::fast::RandomState;

/// Slots looked at to choose a victim when a shard is full.
const SAMPLES: usize = 5;

struct Slot<V> {
    key: Arc<str>,
    entry: Arc<Entry<V>>,
    /// The shard's use counter at the last read or write (higher: used more recently).
    used: u64,
    reclaim_at: Instant,
    /// On the caller's clock (seconds): a local-tier copy is not served from then on.
    until: i64,
}

struct Shard<V> {
    index: HashMap<Arc<str>, usize, Hasher>,
    slots: Vec<Slot<V>>,
    capacity: usize,
    uses: u64,
    /// xorshift state for sampling victims.
    seed: u64,
}

impl<V> Shard<V> {
    fn remove_at(&mut self, i: usize) -> Slot<V> {
        let slot = self.slots.swap_remove(i);
        self.index.remove(&slot.key);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(Arc::clone(&moved.key), i);
        }
        slot
    }

    fn random(&mut self) -> usize {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed % self.slots.len() as u64) as usize
    }

    /// The slot to evict: a sampled one already past reclaim, else the least recently
    /// used of the sample.
    fn victim(&mut self, now: Instant) -> usize {
        let mut best = self.random();
        for _ in 1..SAMPLES.min(self.slots.len()) {
            if self.slots[best].reclaim_at <= now {
                break;
            }
            let candidate = self.random();
            if self.slots[candidate].used < self.slots[best].used {
                best = candidate;
            }
        }
        best
    }
}

pub struct MemoryStore<V: Send + Sync + 'static> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: Hasher,
    capacity: u64,
    evictions: AtomicU64,
    /// Bumped after every change of the store's contents (insert, remove, clear, eviction,
    /// reclaim). An entry read while the generation was g is still the current one for its
    /// key as long as the generation is still g: front caches validate with one load.
    generation: AtomicU64,
}

use crate::sync::lock;

impl<V: Send + Sync + 'static> MemoryStore<V> {
    pub fn new(max_entries: u64) -> Self {
        // Small stores keep one shard, so the bound is exact; larger ones spread the lock.
        let shards = if max_entries < 256 { 1 } else { 16 };
        let base = (max_entries / shards) as usize;
        let extra = (max_entries % shards) as usize;
        let shards: Vec<Mutex<Shard<V>>> = (0..shards as usize)
            .map(|i| {
                Mutex::new(Shard {
                    index: HashMap::with_hasher(Hasher::default()),
                    slots: Vec::new(),
                    capacity: (base + usize::from(i < extra)).max(1),
                    uses: 0,
                    seed: 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                })
            })
            .collect();
        Self {
            shards: shards.into_boxed_slice(),
            hasher: Hasher::default(),
            capacity: max_entries,
            evictions: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard<V>> {
        let n = self.shards.len();
        if n == 1 {
            return &self.shards[0];
        }
        &self.shards[(self.hasher.hash_one(key) as usize) % n]
    }

    /// Read this before reading entries (see `generation`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry<V>>> {
        self.get_until(key, i64::MIN)
    }

    /// The entry of `key` unless it was inserted to be served only before `now` (see
    /// `insert_until`).
    pub fn get_until(&self, key: &str, now: i64) -> Option<Arc<Entry<V>>> {
        let mut shard = lock(self.shard(key));
        let i = *shard.index.get(key)?;
        if shard.slots[i].reclaim_at <= Instant::now() || shard.slots[i].until <= now {
            let gone = shard.remove_at(i);
            drop(shard);
            drop(gone);
            self.changed();
            return None;
        }
        shard.uses += 1;
        let uses = shard.uses;
        let slot = &mut shard.slots[i];
        slot.used = uses;
        Some(Arc::clone(&slot.entry))
    }

    pub fn insert(&self, key: Arc<str>, entry: Arc<Entry<V>>) {
        self.insert_until(key, entry, i64::MAX);
    }

    /// Inserts an entry that `get_until(key, now)` serves only while `now < until`.
    pub fn insert_until(&self, key: Arc<str>, entry: Arc<Entry<V>>, until: i64) {
        let now = Instant::now();
        let reclaim_at = now + entry.keep_for;
        let mut shard = lock(self.shard(&key));
        shard.uses += 1;
        let used = shard.uses;
        // Values leave outside the lock (their drop may be arbitrary work for V).
        let replaced = if let Some(&i) = shard.index.get(&*key) {
            let slot = &mut shard.slots[i];
            slot.used = used;
            slot.reclaim_at = reclaim_at;
            slot.until = until;
            Some(std::mem::replace(&mut slot.entry, entry))
        } else {
            let evicted = if shard.slots.len() >= shard.capacity {
                let victim = shard.victim(now);
                let gone = shard.remove_at(victim);
                if gone.reclaim_at > now {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                Some(gone)
            } else {
                None
            };
            let at = shard.slots.len();
            shard.slots.push(Slot {
                key: Arc::clone(&key),
                entry,
                used,
                reclaim_at,
                until,
            });
            shard.index.insert(key, at);
            evicted.map(|slot| slot.entry)
        };
        drop(shard);
        drop(replaced);
        self.changed();
    }

    pub fn remove(&self, key: &str) -> bool {
        let mut shard = lock(self.shard(key));
        let removed = shard.index.get(key).copied().map(|i| shard.remove_at(i));
        drop(shard);
        let found = removed.is_some();
        drop(removed);
        if found {
            self.changed();
        }
        found
    }

    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let slots = std::mem::take(&mut shard.slots);
            shard.index.clear();
            drop(shard);
            drop(slots);
        }
        self.changed();
    }

    /// Entries held now (including ones past reclaim that nobody has touched since).
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).slots.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Entries pushed out by capacity while they could still be served.
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
            store.insert(format!("k{i}").into(), Entry::new(i, times(100), 0));
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
            store.insert(format!("k{i}").into(), Entry::new(i, times(100), 0));
        }
        store.len();
        assert!(moved(&store));
        store.clear();
        assert!(moved(&store), "clear");
    }

    #[test]
    fn entries_in_use_outlive_cold_ones() {
        let store = MemoryStore::new(100);
        for i in 0..100 {
            store.insert(format!("k{i}").into(), Entry::new(i, times(100), 0));
        }
        for i in 100..300 {
            for hot in 0..10 {
                assert!(
                    store.get(&format!("k{hot}")).is_some(),
                    "hot k{hot} evicted at {i}"
                );
            }
            store.insert(format!("k{i}").into(), Entry::new(i, times(100), 0));
        }
        assert_eq!(store.len(), 100);
        assert!(store.get("k299").is_some(), "the newest entry is kept");
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
