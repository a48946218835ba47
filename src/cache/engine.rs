//! The cache engine: every decision of a read, a write and a cached call.
//!
//! Generic over the value `V` (a Python object in the bindings, a plain value in the tests)
//! and the remote store `R` (Redis, or the tests' mock). It decides: the state of an entry,
//! memory vs remote routing, fail-open, stamping and jitter, negative backoff,
//! stale-while-revalidate, stale-if-error, single-flight in the process (threads and tasks
//! share one flight per key) and across processes (a lock taken in the same round trip as
//! the read), key and lock naming, and the counters. The bindings convert arguments and
//! values, run the user's function, and hand its outcome back to a `Ticket`.
//!
//! Operations are async: on memory they complete on their first poll (the bindings run them
//! inline), on a remote they run on tenuto's runtime.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::local::{Invalidated, Invalidation, Listener, LocalTier};
use super::memory::{Entry, MemoryStore};
use super::redis::StoreError;
use super::topology::companion_key;
use super::{check_ttl, Counters, State, Times, TtlPolicy};
use crate::clock::ClockRef;
use crate::codec::{decode_envelope, encode_envelope};
use crate::error::{CoreError, CoreResult};
use crate::flight::{Flight, Joined, LeaderGuard, Outcome, SingleFlight};
use crate::metrics::UpstreamStats;
use crate::sync::lock;

/// The condition a server error reports: its error code (`OOM`, `READONLY`, `NOPERM`...)
/// wherever it appears in the message (scripts and pipelines wrap it), else the message.
fn condition(message: &str) -> &str {
    const CODES: [&str; 11] = [
        "OOM",
        "READONLY",
        "NOPERM",
        "WRONGTYPE",
        "NOSCRIPT",
        "CROSSSLOT",
        "MISCONF",
        "BUSY",
        "LOADING",
        "NOAUTH",
        "MASTERDOWN",
    ];
    CODES
        .into_iter()
        .find(|code| message.contains(code))
        .unwrap_or(message)
}

/// The keys one cached call uses on the remote. The lock, waiter count and wake-up list
/// sit under prefixes of their own, so no user key names them.
#[derive(Debug, Clone)]
pub struct FlightKeys {
    pub value: String,
    pub lock: String,
    pub waiters: String,
    pub done: String,
}

/// What the read-and-lock step says of the distributed lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockReply {
    /// The value looked fresh: no lock was asked for.
    NotNeeded,
    /// This caller now holds the lock.
    Taken,
    /// Another process holds it (and, when nothing was found, counts us as waiting).
    HeldElsewhere,
}

/// The shared store behind the memory tier. Every call that fails with
/// `StoreError::Unavailable` is an outage; `Command` is an answer the server refused.
pub trait Remote: Send + Sync + 'static {
    /// True while the store is marked down (callers go to memory without waiting).
    fn is_down(&self) -> bool;
    /// Why it is down, for errors and stats.
    fn down_reason(&self) -> String;
    fn get(&self, key: String) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
    fn mget(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, StoreError>> + Send;
    /// SETs with TTLs (seconds) and DELs, applied in order in one round trip.
    fn write_many(
        &self,
        sets: Vec<(String, Vec<u8>, u64)>,
        deletes: Vec<String>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn delete(&self, keys: Vec<String>) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes every key under `prefix` (never KEYS or FLUSHDB).
    fn delete_prefixed(
        &self,
        prefix: String,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// One round trip: the value, and the lock taken unless the value is fresh at `now`.
    fn read_or_lock(
        &self,
        keys: &FlightKeys,
        token: &str,
        lock_ttl: Duration,
        now: i64,
    ) -> impl Future<Output = Result<(Option<Vec<u8>>, LockReply), StoreError>> + Send;
    /// `SET NX PX` of the lock alone (when the read guessed wrong about freshness).
    fn try_lock(
        &self,
        keys: &FlightKeys,
        token: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// One round trip: writes the value (if any), releases the lock if `token` still holds
    /// it, and wakes the processes waiting for this key.
    fn finish(
        &self,
        keys: &FlightKeys,
        write: Option<(Vec<u8>, u64)>,
        token: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Waits (without polling) until the lock holder finishes or `timeout` passes.
    fn wait_done(
        &self,
        keys: &FlightKeys,
        timeout: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Outages seen so far.
    fn outages(&self) -> u64;
    /// Asks the store to call `listener` when other clients change keys (and with
    /// `Invalidation::All` whenever it may have missed some). Stores that cannot leave
    /// the local tier to its TTL.
    fn watch(&self, _listener: Listener) {}
    /// How the local tier learns of other processes' writes through this store.
    fn invalidated_by(&self) -> Invalidated {
        Invalidated::ByTtlOnly
    }
}

/// A value on its way into the cache: as the memory tier keeps it, and as JSON text (or
/// base64 text for opt-in pickle, named by `codec`) for the remote.
pub struct Prepared<V> {
    pub value: V,
    pub payload: String,
    pub codec: Option<&'static str>,
}

/// Turns a stored payload back into a value (the bindings build Python objects).
pub trait Decode<V>: Send + Sync + 'static {
    fn decode(&self, payload: &str, codec: Option<&str>) -> Result<V, String>;
}

/// Negative caching: the n-th consecutive negative answer is kept base × factor^(n−1)
/// seconds, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: f64,
    pub factor: f64,
    pub max: f64,
}

impl Backoff {
    pub fn new(base: f64, factor: f64, max: f64) -> CoreResult<Self> {
        for (name, value) in [("base", base), ("factor", factor), ("max", max)] {
            if !value.is_finite() || value <= 0.0 {
                return Err(CoreError::invalid(format!(
                    "Backoff.{name} must be a positive number, got {value}"
                )));
            }
        }
        if factor < 1.0 {
            return Err(CoreError::invalid(format!(
                "Backoff.factor must be at least 1, got {factor}"
            )));
        }
        if max < base {
            return Err(CoreError::invalid(format!(
                "Backoff.max ({max}) must not be below base ({base})"
            )));
        }
        Ok(Self { base, factor, max })
    }

    pub fn seconds(&self, n: u32) -> f64 {
        let exponent = n.saturating_sub(1).min(1024) as i32;
        (self.base * self.factor.powi(exponent)).min(self.max)
    }
}

/// The distributed single-flight of a cached call: hold the lock this long at most, and
/// wait this long at most for another process's write.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    pub ttl: Duration,
    pub wait: Duration,
}

/// How a cached function's results are kept.
#[derive(Debug, Clone)]
pub struct CallPolicy {
    pub ttl: f64,
    pub stale_ttl: Option<f64>,
    pub negative: Option<Backoff>,
    /// None: no lock across processes (memory, or `distributed=False`).
    pub lock: Option<LockPolicy>,
    /// The function's upstream calls (its loads and refreshes), for metrics.
    pub upstream: Arc<UpstreamStats>,
}

impl CallPolicy {
    pub fn new(
        ttl: f64,
        stale_ttl: Option<f64>,
        negative: Option<Backoff>,
        lock: Option<LockPolicy>,
    ) -> CoreResult<Self> {
        check_ttl("ttl", ttl)?;
        if let Some(stale) = stale_ttl {
            check_ttl("stale_ttl", stale)?;
            if stale < ttl {
                return Err(CoreError::invalid(format!(
                    "stale_ttl ({stale}) must not be shorter than ttl ({ttl})"
                )));
            }
        }
        Ok(Self {
            ttl,
            stale_ttl,
            negative,
            lock,
            upstream: Arc::default(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub jitter: f64,
    pub fail_open: bool,
    pub max_entries: u64,
    pub max_value_bytes: usize,
    /// A local tier of this many entries, each served for at most this many seconds.
    pub local: Option<(u64, i64)>,
}

/// A value to serve, with the state it was found in.
pub struct Served<V> {
    pub entry: Arc<Entry<V>>,
    pub state: State,
    /// A stale value served because fetching a fresh one failed.
    pub stale_fallback: bool,
}

impl<V> Clone for Served<V> {
    fn clone(&self) -> Self {
        Self {
            entry: Arc::clone(&self.entry),
            state: self.state,
            stale_fallback: self.stale_fallback,
        }
    }
}

/// What a flight gives the callers that share it.
pub enum Landing<V> {
    Served(Served<V>),
    Failed(V),
}

/// A load that failed with no stale value to serve: its error, shared by every caller.
pub struct Failure<V>(Arc<Outcome<Landing<V>>>);

impl<V> Failure<V> {
    pub fn error(&self) -> &V {
        match &*self.0 {
            Outcome::Value(Landing::Failed(err)) => err,
            _ => unreachable!("a Failure holds a failed landing"),
        }
    }
}

/// What a cached call does next.
pub enum Begin<V: Send + Sync + 'static, R: Remote> {
    /// Serve this (fresh, stale while another caller refreshes it, or a shared result).
    Serve(Served<V>),
    /// Serve this stale value and refresh it in the background with the ticket.
    Refresh(Served<V>, Ticket<V, R>),
    /// Nothing to serve: run the function and give its outcome to the ticket.
    Load(Ticket<V, R>),
    /// The load this caller waited for failed.
    Failed(Failure<V>),
}

/// A lookup's answer: the state and, unless it is a miss, the entry.
pub struct Found<V> {
    pub state: State,
    pub entry: Option<Arc<Entry<V>>>,
}

/// A write checked, stamped and encoded before anything is written.
pub struct Write<V> {
    key: Arc<str>,
    entry: Arc<Entry<V>>,
    wire: Vec<u8>,
    keep_for: u64,
}

impl<V> Write<V> {
    pub fn entry(&self) -> &Arc<Entry<V>> {
        &self.entry
    }
}

/// Numbers behind `stats()`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub hits: u64,
    pub stale_hits: u64,
    pub misses: u64,
    pub sets: u64,
    pub deletes: u64,
    pub decode_errors: u64,
    pub backend_errors: u64,
    pub coalesced: u64,
    pub loads: u64,
    pub outages: u64,
    pub evictions: u64,
    pub size: u64,
    pub degraded: bool,
    /// Writes the server refused (kept in memory instead).
    pub refused_writes: u64,
    /// Some keys live in memory because the server refused their writes.
    pub degraded_writes: bool,
    /// The local tier: hits served by it, copies held, copies dropped by invalidations,
    /// whole-tier flushes, and how it learns of changes.
    pub local: Option<LocalStats>,
}

#[derive(Debug, Clone)]
pub struct LocalStats {
    pub hits: u64,
    pub size: u64,
    pub invalidated: u64,
    pub flushes: u64,
    pub by: Invalidated,
}

pub struct Engine<V: Send + Sync + 'static, R: Remote> {
    namespace: String,
    policy: TtlPolicy,
    clock: ClockRef,
    pub memory: MemoryStore<V>,
    /// Copies of remote entries served without a round trip (see `local`).
    local: Option<Arc<LocalTier<V>>>,
    remote: Option<Arc<R>>,
    fail_open: bool,
    max_value_bytes: usize,
    counters: Counters,
    /// Followers that shared another caller's flight instead of reading or loading.
    coalesced: AtomicU64,
    /// Loads run (the user function called to fill a miss or refresh a stale value).
    loads_started: AtomicU64,
    loads: Arc<SingleFlight<Landing<V>>>,
    refreshes: Arc<SingleFlight<()>>,
    /// Keys whose last write the remote refused (OOM, READONLY...): their value lives in
    /// memory and is read from there until a later write of the key succeeds.
    refused: Mutex<HashSet<Arc<str>>>,
    refused_writes: AtomicU64,
    /// Server error conditions logged since the last successful write: each is logged
    /// once, not once per call.
    logged: Mutex<HashSet<String>>,
}

enum Route<R> {
    Memory,
    Remote(Arc<R>),
}

impl<V: Send + Sync + 'static, R: Remote> Engine<V, R> {
    pub fn new(config: Config, clock: ClockRef, remote: Option<Arc<R>>) -> CoreResult<Arc<Self>> {
        if config.namespace.is_empty() {
            return Err(CoreError::invalid("namespace must not be empty"));
        }
        if config.namespace.contains('|') {
            return Err(CoreError::invalid(format!(
                "namespace must not contain '|' (it names tenuto's own keys), got {:?}",
                config.namespace
            )));
        }
        if config.max_entries < 1 {
            return Err(CoreError::invalid("max_entries must be at least 1"));
        }
        if config.max_value_bytes < 1 {
            return Err(CoreError::invalid("max_value_bytes must be at least 1"));
        }
        let local = match (config.local, &remote) {
            (None, _) => None,
            (Some(_), None) => return Err(CoreError::invalid(
                "local= puts an in-process tier in front of Redis; a memory cache is one already",
            )),
            (Some((max_entries, ttl)), Some(_)) => Some(Arc::new(LocalTier::new(
                max_entries,
                ttl,
                format!("{}:", config.namespace),
            ))),
        };
        let policy = TtlPolicy::new(config.jitter)?;
        let engine = Arc::new_cyclic(|me: &std::sync::Weak<Self>| {
            if let Some(remote) = &remote {
                let me = me.clone();
                remote.watch(Arc::new(move |what| {
                    if let Some(engine) = me.upgrade() {
                        engine.remote_changed(what);
                    }
                }));
            }
            Self {
                local,
                policy,
                namespace: config.namespace,
                clock,
                memory: MemoryStore::new(config.max_entries),
                remote,
                fail_open: config.fail_open,
                max_value_bytes: config.max_value_bytes,
                counters: Counters::default(),
                coalesced: AtomicU64::new(0),
                loads_started: AtomicU64::new(0),
                loads: SingleFlight::new(),
                refreshes: SingleFlight::new(),
                refused: Mutex::new(HashSet::new()),
                refused_writes: AtomicU64::new(0),
                logged: Mutex::new(HashSet::new()),
            }
        });
        Ok(engine)
    }

    /// What the remote says changed. `All` (it is back after an outage, or lost pushes):
    /// memory copies kept during the outage may be older than what other processes wrote
    /// since, and go, except those of writes the remote refused (they live nowhere else);
    /// the local tier goes too.
    fn remote_changed(&self, what: Invalidation) {
        if what == Invalidation::All {
            let refused: Vec<Arc<str>> = lock(&self.refused).iter().cloned().collect();
            let kept: Vec<(Arc<str>, Arc<Entry<V>>)> = refused
                .into_iter()
                .filter_map(|k| self.memory.get(&k).map(|e| (k, e)))
                .collect();
            self.memory.clear();
            for (key, entry) in kept {
                self.memory.insert(key, entry);
            }
        }
        if let Some(local) = &self.local {
            local.invalidate(what);
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn remote(&self) -> Option<&Arc<R>> {
        self.remote.as_ref()
    }

    pub fn now(&self) -> i64 {
        self.clock.now_secs()
    }

    /// True when operations may go to the remote (so they run on the runtime); false when
    /// they complete on memory at once. A remote marked down counts: it can come back
    /// between this answer and the operation, which must then be inside the runtime.
    pub fn uses_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The key under which `key` is stored remotely.
    pub fn remote_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.namespace.len() + 1 + key.len());
        k.push_str(&self.namespace);
        k.push(':');
        k.push_str(key);
        k
    }

    /// The value key and the cached call's own keys, in the value's cluster slot (see
    /// `topology::companion_key`). Those start `{tag}|` where user keys start
    /// `{namespace}:`, so no user key names them and `clear()` (which removes
    /// `{namespace}:*`) leaves them to expire on their own.
    pub fn flight_keys(&self, key: &str) -> FlightKeys {
        let value = self.remote_key(key);
        FlightKeys {
            lock: companion_key(&value, "lock"),
            waiters: companion_key(&value, "waiters"),
            done: companion_key(&value, "done"),
            value,
        }
    }

    /// Where an operation goes now. A store marked down is skipped without waiting, or
    /// raises when the cache does not fail open.
    fn route(&self) -> CoreResult<Route<R>> {
        match &self.remote {
            None => Ok(Route::Memory),
            Some(remote) if remote.is_down() => {
                Counters::bump(&self.counters.backend_errors);
                if self.fail_open {
                    Ok(Route::Memory)
                } else {
                    Err(CoreError::BackendUnavailable(format!(
                        "the cache backend is unavailable: {}",
                        remote.down_reason()
                    )))
                }
            }
            Some(remote) => Ok(Route::Remote(Arc::clone(remote))),
        }
    }

    /// The remote to use now, or None for memory (for callers outside the engine, such as
    /// the registry, that share its routing and fail-open rules).
    pub fn route_remote(&self) -> CoreResult<Option<Arc<R>>> {
        Ok(match self.route()? {
            Route::Memory => None,
            Route::Remote(r) => Some(r),
        })
    }

    /// Counts a failed remote call; an error unless the cache fails open.
    pub fn absorb(&self, err: StoreError) -> CoreResult<()> {
        Counters::bump(&self.counters.backend_errors);
        if self.fail_open {
            if let StoreError::Command(msg) = &err {
                let first = lock(&self.logged).insert(condition(msg).to_owned());
                if first {
                    log::warn!(target: "tenuto::cache", "Redis refused a command: {msg}; serving from memory (logged once per condition)");
                }
            }
            return Ok(());
        }
        Err(err.into())
    }

    /// After a remote write of `key`: on success the memory copy (from an outage or a
    /// refused write) goes; on failure the value is kept in memory, and a refused write
    /// is remembered so reads find it there while the remote has nothing.
    fn after_remote_write(
        &self,
        key: &Arc<str>,
        entry: &Arc<Entry<V>>,
        result: &Result<(), StoreError>,
    ) {
        let mut refused = lock(&self.refused);
        match result {
            Ok(()) => {
                refused.remove(key);
                let recovered = refused.is_empty();
                drop(refused);
                self.memory.remove(key);
                if let Some(local) = &self.local {
                    local.put(key, entry, self.now());
                }
                if recovered {
                    // Writes go through again: a condition that comes back is news.
                    let mut logged = lock(&self.logged);
                    if !logged.is_empty() {
                        logged.clear();
                    }
                }
            }
            Err(err) => {
                if matches!(err, StoreError::Command(_)) {
                    self.refused_writes.fetch_add(1, Ordering::Relaxed);
                    if refused.len() as u64 >= self.memory.capacity() {
                        refused.clear(); // bounded like memory; the oldest memory copies are gone anyway
                    }
                    refused.insert(Arc::clone(key));
                }
                drop(refused);
                self.memory.insert(Arc::clone(key), Arc::clone(entry));
                if let Some(local) = &self.local {
                    local.remove(key);
                }
            }
        }
    }

    /// A local copy of `key` to serve now, if there is one.
    fn local_copy(&self, key: &str) -> Option<Arc<Entry<V>>> {
        let local = self.local.as_ref()?;
        let now = self.now();
        local
            .get(key, now)
            .filter(|entry| entry.times.state(now) != State::Miss)
    }

    /// A fresh local copy of `key` (the bindings' fast path for a local tier).
    pub fn local_hit(&self, key: &str) -> Option<Arc<Entry<V>>> {
        self.local_copy(key)
            .filter(|entry| self.state_of(entry) == State::Hit)
    }

    pub fn has_local(&self) -> bool {
        self.local.is_some()
    }

    /// Keeps what the remote answered for `key` (read after `mark`) in the local tier.
    fn fill_local(&self, key: &str, entry: &Option<Arc<Entry<V>>>, mark: u64) {
        if let (Some(local), Some(entry)) = (&self.local, entry) {
            local.fill(key, entry, self.now(), mark);
        }
    }

    fn local_mark(&self) -> u64 {
        self.local.as_ref().map_or(0, |l| l.mark())
    }

    fn state_of(&self, entry: &Entry<V>) -> State {
        entry.times.state(self.now())
    }

    fn found(&self, entry: Option<Arc<Entry<V>>>, count: bool) -> Found<V> {
        let state = entry.as_ref().map_or(State::Miss, |e| self.state_of(e));
        if count {
            self.counters.count_state(state);
        }
        Found {
            state,
            entry: entry.filter(|_| state != State::Miss),
        }
    }

    /// An entry read from the remote; unreadable values are counted and read as nothing.
    fn decode(&self, key: &str, bytes: &[u8], decoder: &dyn Decode<V>) -> Option<Arc<Entry<V>>> {
        let decoded = decode_envelope(bytes).and_then(|wire| {
            let value = decoder.decode(wire.payload.get(), wire.codec.as_deref())?;
            Ok(Entry::kept(value, wire.times(), wire.negative, 1))
        });
        match decoded {
            Ok(entry) => Some(entry),
            Err(reason) => {
                let n = self.counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(100) {
                    log::warn!(target: "tenuto::cache", "unreadable value under {key:?} read as a miss: {reason}");
                }
                None
            }
        }
    }

    /// What the remote answered for `key`; when it has nothing, a memory copy (a write
    /// the remote refused, kept here until a later write succeeds).
    fn remote_or_memory(
        &self,
        key: &str,
        bytes: Option<Vec<u8>>,
        decoder: &dyn Decode<V>,
    ) -> Option<Arc<Entry<V>>> {
        match bytes.and_then(|b| self.decode(key, &b, decoder)) {
            Some(entry) => Some(entry),
            None if self.is_refused(key) => self.memory.get(key),
            None => None,
        }
    }

    fn is_refused(&self, key: &str) -> bool {
        let refused = lock(&self.refused);
        !refused.is_empty() && refused.contains(key)
    }

    /// Reads `key` from memory, or the remote with fail-open to memory.
    async fn read(&self, key: &str, decoder: &dyn Decode<V>) -> CoreResult<Option<Arc<Entry<V>>>> {
        match self.route()? {
            Route::Memory => Ok(self.memory.get(key)),
            Route::Remote(remote) => {
                if let Some(copy) = self.local_copy(key) {
                    return Ok(Some(copy));
                }
                let mark = self.local_mark();
                match remote.get(self.remote_key(key)).await {
                    Ok(bytes) => {
                        let entry = self.remote_or_memory(key, bytes, decoder);
                        self.fill_local(key, &entry, mark);
                        Ok(entry)
                    }
                    Err(err) => {
                        self.absorb(err)?;
                        Ok(self.memory.get(key))
                    }
                }
            }
        }
    }

    /// Looks `key` up. `count` false: a second look that `stats()` does not count.
    pub async fn get(
        &self,
        key: &str,
        decoder: &dyn Decode<V>,
        count: bool,
    ) -> CoreResult<Found<V>> {
        let entry = self.read(key, decoder).await?;
        Ok(self.found(entry, count))
    }

    pub async fn get_many(
        &self,
        keys: &[String],
        decoder: &dyn Decode<V>,
    ) -> CoreResult<Vec<Found<V>>> {
        let entries: Vec<Option<Arc<Entry<V>>>> = match self.route()? {
            Route::Memory => keys.iter().map(|k| self.memory.get(k)).collect(),
            Route::Remote(remote) => {
                let mut entries: Vec<Option<Arc<Entry<V>>>> =
                    keys.iter().map(|k| self.local_copy(k)).collect();
                let wanted: Vec<usize> =
                    (0..keys.len()).filter(|&i| entries[i].is_none()).collect();
                if !wanted.is_empty() {
                    let mark = self.local_mark();
                    let remote_keys = wanted.iter().map(|&i| self.remote_key(&keys[i])).collect();
                    match remote.mget(remote_keys).await {
                        Ok(values) => {
                            for (&i, bytes) in wanted.iter().zip(values) {
                                let entry = self.remote_or_memory(&keys[i], bytes, decoder);
                                self.fill_local(&keys[i], &entry, mark);
                                entries[i] = entry;
                            }
                        }
                        Err(err) => {
                            self.absorb(err)?;
                            for &i in &wanted {
                                entries[i] = self.memory.get(&keys[i]);
                            }
                        }
                    }
                }
                entries
            }
        };
        Ok(entries.into_iter().map(|e| self.found(e, true)).collect())
    }

    /// Checks, stamps and encodes a write (nothing is written yet): a bad TTL or an
    /// oversized value fails here and leaves the stored value intact.
    pub fn plan_write(
        &self,
        key: String,
        prepared: Prepared<V>,
        ttl: f64,
        stale_ttl: Option<f64>,
    ) -> CoreResult<Write<V>> {
        let now = self.now();
        let times = self.policy.stamp(now, ttl, stale_ttl, fastrand::f64)?;
        self.plan_stamped(Arc::from(key), prepared, times, 0, times.keep_for(now))
    }

    /// A write with stamps given (migrating entries another cache wrote): no jitter, and
    /// the stamps must be in order.
    pub fn plan_envelope(
        &self,
        key: String,
        prepared: Prepared<V>,
        times: Times,
    ) -> CoreResult<Write<V>> {
        if !(times.fetched_at <= times.fresh_until && times.fresh_until <= times.stale_until) {
            return Err(CoreError::invalid(format!(
                "envelope stamps must be in order: fetched_at ({}) <= fresh_until ({}) <= stale_until ({})",
                times.fetched_at, times.fresh_until, times.stale_until
            )));
        }
        let keep_for = times.keep_for(self.now());
        self.plan_stamped(Arc::from(key), prepared, times, 0, keep_for)
    }

    fn plan_stamped(
        &self,
        key: Arc<str>,
        prepared: Prepared<V>,
        times: Times,
        negative: u32,
        keep_for: u64,
    ) -> CoreResult<Write<V>> {
        if prepared.payload.len() > self.max_value_bytes {
            return Err(CoreError::invalid(format!(
                "value is {} bytes encoded, over max_value_bytes={}",
                prepared.payload.len(),
                self.max_value_bytes
            )));
        }
        let wire = if self.remote.is_some() {
            encode_envelope(&prepared.payload, times, prepared.codec, negative)
        } else {
            Vec::new()
        };
        Ok(Write {
            key,
            entry: Entry::kept(prepared.value, times, negative, keep_for),
            wire,
            keep_for,
        })
    }

    /// Writes planned writes: to the remote in one round trip, or to memory. When the
    /// remote fails (and the cache fails open) the values are kept in memory instead; when
    /// it succeeds, any memory copy of those keys from an earlier outage is dropped.
    pub async fn commit(&self, writes: Vec<Write<V>>) -> CoreResult<Vec<Arc<Entry<V>>>> {
        let result = match self.route()? {
            Route::Memory => None,
            Route::Remote(remote) => {
                let items = writes
                    .iter()
                    .map(|w| (self.remote_key(&w.key), w.wire.clone(), w.keep_for))
                    .collect();
                Some(remote.write_many(items, Vec::new()).await)
            }
        };
        self.counters
            .sets
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        for w in &writes {
            match &result {
                None => self.memory.insert(Arc::clone(&w.key), Arc::clone(&w.entry)),
                Some(outcome) => self.after_remote_write(&w.key, &w.entry, outcome),
            }
        }
        if let Some(Err(err)) = result {
            self.absorb(err)?;
        }
        Ok(writes.into_iter().map(|w| w.entry).collect())
    }

    /// Deletes keys everywhere; returns how many existed.
    pub async fn delete(&self, keys: Vec<String>) -> CoreResult<u64> {
        let mut removed = 0;
        for key in &keys {
            removed += u64::from(self.memory.remove(key));
            lock(&self.refused).remove(key.as_str());
            if let Some(local) = &self.local {
                local.remove(key);
            }
        }
        if let Route::Remote(remote) = self.route()? {
            let remote_keys = keys.iter().map(|k| self.remote_key(k)).collect();
            match remote.delete(remote_keys).await {
                Ok(n) => removed = removed.max(n),
                Err(err) => self.absorb(err)?,
            }
        }
        self.counters
            .deletes
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        Ok(removed)
    }

    /// Empties the memory tier and deletes the namespace's keys remotely.
    pub async fn clear(&self) -> CoreResult<()> {
        self.memory.clear();
        if let Some(local) = &self.local {
            local.flush();
        }
        lock(&self.refused).clear();
        if let Route::Remote(remote) = self.route()? {
            let prefix = format!("{}:", self.namespace);
            if let Err(err) = remote.delete_prefixed(prefix).await {
                self.absorb(err)?;
            }
        }
        Ok(())
    }

    /// Deletes the entries whose keys start with `prefix` (memory and remote; SCAN +
    /// UNLINK on Redis); returns how many were found.
    pub async fn clear_prefix(&self, prefix: &str) -> CoreResult<u64> {
        let mut removed = self.memory.remove_prefixed(prefix);
        lock(&self.refused).retain(|key| !key.starts_with(prefix));
        if let Route::Remote(remote) = self.route()? {
            match remote.delete_prefixed(self.remote_key(prefix)).await {
                Ok(n) => removed = removed.max(n),
                Err(err) => self.absorb(err)?,
            }
        }
        Ok(removed)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let size = self.memory.len();
        Stats {
            hits: Counters::read(&c.hits),
            stale_hits: Counters::read(&c.stale_hits),
            misses: Counters::read(&c.misses),
            sets: Counters::read(&c.sets),
            deletes: Counters::read(&c.deletes),
            decode_errors: Counters::read(&c.decode_errors),
            backend_errors: Counters::read(&c.backend_errors),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            loads: self.loads_started.load(Ordering::Relaxed),
            outages: self.remote.as_ref().map_or(0, |r| r.outages()),
            evictions: self.memory.evictions(),
            size,
            degraded: self.remote.as_ref().is_some_and(|r| r.is_down()),
            refused_writes: self.refused_writes.load(Ordering::Relaxed),
            degraded_writes: !lock(&self.refused).is_empty(),
            local: self.local.as_ref().map(|l| LocalStats {
                hits: l.hits.load(Ordering::Relaxed),
                size: l.len(),
                invalidated: l.dropped.load(Ordering::Relaxed),
                flushes: l.flushes.load(Ordering::Relaxed),
                by: match l.mode() {
                    Invalidated::Pending => self
                        .remote
                        .as_ref()
                        .map_or(Invalidated::Pending, |r| r.invalidated_by()),
                    mode => mode,
                },
            }),
        }
    }

    /// Counts a fresh memory hit served without a `begin` (the bindings' fast path).
    pub fn count_hit(&self) {
        self.counters.count_state(State::Hit);
    }

    /// Returns once no load or refresh of `key` runs in this process (tests and tools
    /// wait for a background refresh with it).
    pub async fn settled(&self, key: &str) {
        loop {
            if let Some(load) = self.loads.current(key) {
                load.landed().await;
            } else if let Some(refresh) = self.refreshes.current(key) {
                refresh.landed().await;
            } else {
                return;
            }
        }
    }

    /// Followers of the load of `key` in this process right now.
    pub fn followers(&self, key: &str) -> usize {
        self.loads.followers(key)
    }

    /// The start of a cached call: serve, refresh, or load (see `Begin`). `force` loads
    /// even when a fresh value is there (`refresh()`). `blocking`: the caller's thread
    /// waits (a sync call), so waiting for a load this thread leads is refused. `seen`:
    /// the memory generation a caller read first and what it found then; while the
    /// generation has not moved, that answer is still current and memory is not read again.
    pub async fn begin(
        self: &Arc<Self>,
        key: &str,
        policy: &CallPolicy,
        decoder: &dyn Decode<V>,
        force: bool,
        blocking: bool,
        seen: Option<(u64, Option<Arc<Entry<V>>>)>,
    ) -> CoreResult<Begin<V, R>> {
        let mut begin = self
            .begin_flight(key, policy, decoder, force, blocking, seen)
            .await?;
        if let Begin::Load(ticket) | Begin::Refresh(_, ticket) = &mut begin {
            // The caller calls the upstream now: `store` or `fail` counts how it went.
            ticket.upstream = Some((Arc::clone(&policy.upstream), std::time::Instant::now()));
        }
        Ok(begin)
    }

    async fn begin_flight(
        self: &Arc<Self>,
        key: &str,
        policy: &CallPolicy,
        decoder: &dyn Decode<V>,
        force: bool,
        blocking: bool,
        seen: Option<(u64, Option<Arc<Entry<V>>>)>,
    ) -> CoreResult<Begin<V, R>> {
        let mut seen = seen;
        loop {
            let guard = match self.loads.join(key) {
                Joined::Leader(guard) => guard,
                Joined::Follower(flight) => match self.follow(&flight, blocking).await? {
                    Some(begin) => return Ok(begin),
                    None => continue, // the leader gave up: start over
                },
            };
            return match self.route()? {
                Route::Memory => {
                    let prior = match seen.take() {
                        Some((generation, entry)) if self.memory.generation() == generation => {
                            entry
                        }
                        _ => self.memory.get(key),
                    };
                    Ok(self.decide(key, guard, prior, None, force))
                }
                Route::Remote(remote) => {
                    self.begin_remote(key, guard, remote, policy, decoder, force)
                        .await
                }
            };
        }
    }

    /// Waits for another caller's load of the same key. None: it was abandoned.
    async fn follow(
        &self,
        flight: &Arc<Flight<Landing<V>>>,
        blocking: bool,
    ) -> CoreResult<Option<Begin<V, R>>> {
        if blocking && flight.would_wait_for_itself() {
            return Err(CoreError::WouldDeadlock(
                "this thread leads the load it would wait for (a recursive call, or a sync \
                 call inside the event loop running the async leader); it would wait forever"
                    .into(),
            ));
        }
        self.coalesced.fetch_add(1, Ordering::Relaxed);
        let outcome = flight.landed().await;
        Ok(match &*outcome {
            Outcome::Value(Landing::Served(served)) => Some(Begin::Serve(served.clone())),
            Outcome::Value(Landing::Failed(_)) => Some(Begin::Failed(Failure(outcome))),
            Outcome::Error(_) | Outcome::Abandoned => None,
        })
    }

    fn begin_in_memory(
        self: &Arc<Self>,
        key: &str,
        guard: LeaderGuard<Landing<V>>,
        force: bool,
    ) -> Begin<V, R> {
        let prior = self.memory.get(key);
        self.decide(key, guard, prior, None, force)
    }

    /// The decision once the entry is known (and, on a remote, the lock's answer).
    fn decide(
        self: &Arc<Self>,
        key: &str,
        guard: LeaderGuard<Landing<V>>,
        prior: Option<Arc<Entry<V>>>,
        lock: Option<HeldLock<R>>,
        force: bool,
    ) -> Begin<V, R> {
        let state = prior.as_ref().map_or(State::Miss, |e| self.state_of(e));
        self.counters.count_state(state);
        match (state, prior) {
            (State::Hit, Some(entry)) if !force => {
                drop(lock); // taken on a wrong guess of the read step: give it back
                let served = Served {
                    entry,
                    state,
                    stale_fallback: false,
                };
                guard.land(Outcome::Value(Landing::Served(served.clone())));
                Begin::Serve(served)
            }
            (State::Stale, Some(entry)) if !force => {
                let served = Served {
                    entry: Arc::clone(&entry),
                    state,
                    stale_fallback: false,
                };
                // Callers waiting on this flight take the stale value too; the refresh
                // is deduplicated by its own flight (and, remotely, the lock).
                guard.land(Outcome::Value(Landing::Served(served.clone())));
                match self.refreshes.join(key) {
                    Joined::Leader(refresh) => {
                        self.loads_started.fetch_add(1, Ordering::Relaxed);
                        let ticket = Ticket {
                            engine: Arc::clone(self),
                            key: Arc::clone(refresh.key()),
                            flight: Some(TicketFlight::Refresh(refresh)),
                            prior: Some(entry),
                            lock,
                            upstream: None,
                        };
                        Begin::Refresh(served, ticket)
                    }
                    Joined::Follower(_) => Begin::Serve(served),
                }
            }
            (_, prior) => {
                self.loads_started.fetch_add(1, Ordering::Relaxed);
                Begin::Load(Ticket {
                    engine: Arc::clone(self),
                    key: Arc::clone(guard.key()),
                    flight: Some(TicketFlight::Load(guard)),
                    prior,
                    lock,
                    upstream: None,
                })
            }
        }
    }

    async fn begin_remote(
        self: &Arc<Self>,
        key: &str,
        guard: LeaderGuard<Landing<V>>,
        remote: Arc<R>,
        policy: &CallPolicy,
        decoder: &dyn Decode<V>,
        force: bool,
    ) -> CoreResult<Begin<V, R>> {
        if !force {
            if let Some(copy) = self.local_copy(key) {
                if self.state_of(&copy) == State::Hit {
                    return Ok(self.decide(key, guard, Some(copy), None, false));
                }
            }
        }
        let mark = self.local_mark();
        let Some(lock_policy) = policy.lock else {
            let prior = match remote.get(self.remote_key(key)).await {
                Ok(bytes) => self.remote_or_memory(key, bytes, decoder),
                Err(err) => {
                    self.absorb(err)?;
                    return Ok(self.begin_in_memory(key, guard, force));
                }
            };
            return Ok(self.decide(key, guard, prior, None, force));
        };
        let keys = self.flight_keys(key);
        let since = self.now();
        let deadline = tokio::time::Instant::now() + lock_policy.wait;
        loop {
            let token = crate::runtime::unique_token();
            let read = remote
                .read_or_lock(&keys, &token, lock_policy.ttl, self.now())
                .await;
            let (bytes, reply) = match read {
                Ok(answer) => answer,
                Err(StoreError::Command(msg)) => {
                    // The server answers but refuses the lock (full, read-only replica):
                    // read the value without it, so stale data is still served.
                    self.absorb(StoreError::Command(msg))?;
                    let prior = match remote.get(keys.value.clone()).await {
                        Ok(bytes) => self.remote_or_memory(key, bytes, decoder),
                        Err(err) => {
                            self.absorb(err)?;
                            self.memory.get(key)
                        }
                    };
                    return Ok(self.decide(key, guard, prior, None, force));
                }
                Err(err) => {
                    // Lock errors fail open: go on without the lock.
                    self.absorb(err)?;
                    return Ok(self.begin_in_memory(key, guard, force));
                }
            };
            let prior = self.remote_or_memory(key, bytes, decoder);
            self.fill_local(key, &prior, mark);
            let state = prior.as_ref().map_or(State::Miss, |e| self.state_of(e));
            let mut held = (reply == LockReply::Taken).then(|| HeldLock {
                remote: Arc::clone(&remote),
                keys: keys.clone(),
                token: token.clone(),
            });
            let wants_lock = force || state != State::Hit;
            if wants_lock && reply == LockReply::NotNeeded {
                // The read step judged freshness on its own clock and got it wrong.
                match remote.try_lock(&keys, &token, lock_policy.ttl).await {
                    Ok(true) => {
                        held = Some(HeldLock {
                            remote: Arc::clone(&remote),
                            keys: keys.clone(),
                            token: token.clone(),
                        })
                    }
                    Ok(false) => {}
                    Err(err) => {
                        self.absorb(err)?;
                        return Ok(self.decide(key, guard, prior, None, force));
                    }
                }
            }
            let elsewhere = wants_lock && held.is_none();
            if force && elsewhere {
                // `refresh()` asked for a fetch now: do not wait for another process's.
                return Ok(self.decide(key, guard, prior, None, true));
            }
            if !elsewhere || state == State::Stale {
                // Ours to load (or to refresh); or stale and another process refreshes
                // it, in which case the stale value is served as it is.
                let begin = self.decide(key, guard, prior, held, force);
                return Ok(match begin {
                    Begin::Refresh(served, ticket) if ticket.lock.is_none() => {
                        drop(ticket);
                        Begin::Serve(served)
                    }
                    other => other,
                });
            }
            // Another process is loading it: wait for its write, then read again.
            let now = tokio::time::Instant::now();
            if now >= deadline {
                // It took too long: load without the lock.
                return Ok(self.decide(key, guard, prior.filter(|_| false), None, true));
            }
            match remote.wait_done(&keys, deadline - now).await {
                Ok(_) => {}
                Err(err) => {
                    self.absorb(err)?;
                    return Ok(self.decide(key, guard, None, None, true));
                }
            }
            if let Ok(Some(bytes)) = remote.get(keys.value.clone()).await {
                if let Some(entry) = self.decode(key, &bytes, decoder) {
                    if entry.times.fetched_at >= since && self.state_of(&entry) != State::Miss {
                        let state = self.state_of(&entry);
                        self.counters.count_state(state);
                        let served = Served {
                            entry,
                            state,
                            stale_fallback: false,
                        };
                        guard.land(Outcome::Value(Landing::Served(served.clone())));
                        return Ok(Begin::Serve(served));
                    }
                }
            }
        }
    }

    /// Stamps a loaded value by the call's policy: the n-th consecutive negative answer is
    /// kept by the backoff (and remembered past its expiry, so the next answer sees n).
    fn plan_load(
        &self,
        key: &Arc<str>,
        prepared: Prepared<V>,
        negative: bool,
        prior: Option<&Arc<Entry<V>>>,
        policy: &CallPolicy,
    ) -> CoreResult<Write<V>> {
        let now = self.now();
        match policy.negative.filter(|_| negative) {
            Some(backoff) => {
                let streak = prior.map_or(0, |p| p.negative).saturating_add(1);
                let seconds = backoff.seconds(streak);
                let times = self.policy.stamp(now, seconds, None, fastrand::f64)?;
                let keep = (times.fresh_until - now).max(1) as u64 + backoff.max.ceil() as u64;
                self.plan_stamped(Arc::clone(key), prepared, times, streak, keep)
            }
            None => {
                let times = self
                    .policy
                    .stamp(now, policy.ttl, policy.stale_ttl, fastrand::f64)?;
                self.plan_stamped(Arc::clone(key), prepared, times, 0, times.keep_for(now))
            }
        }
    }
}

/// The distributed lock of a load, released (and waiters woken) when dropped unused.
pub struct HeldLock<R: Remote> {
    remote: Arc<R>,
    keys: FlightKeys,
    token: String,
}

impl<R: Remote> Drop for HeldLock<R> {
    fn drop(&mut self) {
        if self.token.is_empty() {
            return;
        }
        let (remote, keys, token) = (
            Arc::clone(&self.remote),
            self.keys.clone(),
            std::mem::take(&mut self.token),
        );
        // Released at once, also when the caller was cancelled: other processes must not
        // wait out the lock's TTL.
        crate::runtime::handle().spawn(async move {
            if let Err(err) = remote.finish(&keys, None, &token).await {
                log::debug!(target: "tenuto::cache", "releasing lock {}: {err:?}", keys.lock);
            }
        });
    }
}

enum TicketFlight<V> {
    Load(LeaderGuard<Landing<V>>),
    Refresh(LeaderGuard<()>),
}

/// The duty to load one key: give it the function's value (`store`) or error (`fail`).
/// Dropped unused (a cancelled task, an interrupted thread), it abandons the flight, so a
/// waiter takes over, and releases the lock.
pub struct Ticket<V: Send + Sync + 'static, R: Remote> {
    engine: Arc<Engine<V, R>>,
    key: Arc<str>,
    /// None once landed.
    flight: Option<TicketFlight<V>>,
    prior: Option<Arc<Entry<V>>>,
    lock: Option<HeldLock<R>>,
    /// Where the upstream call this ticket stands for is counted, and when it began.
    upstream: Option<(Arc<UpstreamStats>, std::time::Instant)>,
}

impl<V: Send + Sync + 'static, R: Remote> Ticket<V, R> {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn is_refresh(&self) -> bool {
        matches!(self.flight, Some(TicketFlight::Refresh(_)))
    }

    /// The work continues on the current thread (see `Flight::claim_for_current_thread`).
    pub fn claim_for_current_thread(&self) {
        if let Some(TicketFlight::Load(guard)) = &self.flight {
            guard.flight().claim_for_current_thread();
        }
    }

    /// The work continues on some other thread (a pool): waiting here is fine.
    pub fn hand_off(&self) {
        if let Some(TicketFlight::Load(guard)) = &self.flight {
            guard.flight().hand_off();
        }
    }

    /// True when `store` needs the runtime (a remote write).
    pub fn uses_remote(&self) -> bool {
        self.lock.is_some() || self.engine.uses_remote()
    }

    /// Checks and stamps the loaded value before anything is written or landed: an
    /// unencodable or oversized value fails here, and the ticket stays usable for `fail`.
    pub fn plan(
        &self,
        prepared: Prepared<V>,
        negative: bool,
        policy: &CallPolicy,
    ) -> CoreResult<Write<V>> {
        self.engine
            .plan_load(&self.key, prepared, negative, self.prior.as_ref(), policy)
    }

    /// Stores a planned value (write, unlock and wake waiters in one round trip) and shares
    /// it with every caller waiting for it.
    pub async fn store(mut self, write: Write<V>) -> CoreResult<Served<V>> {
        self.record_upstream(true);
        let engine = Arc::clone(&self.engine);
        let lock = self.lock.take();
        let result = match (engine.route(), lock) {
            (Ok(Route::Remote(remote)), lock) => {
                let keys = engine.flight_keys(&self.key);
                let token = lock
                    .map(|mut l| std::mem::take(&mut l.token))
                    .unwrap_or_default();
                let wire = Some((write.wire.clone(), write.keep_for));
                let outcome = remote.finish(&keys, wire, &token).await;
                engine.after_remote_write(&self.key, &write.entry, &outcome);
                outcome.or_else(|err| engine.absorb(err))
            }
            (Ok(Route::Memory), lock) => {
                drop(lock);
                engine
                    .memory
                    .insert(self.key.clone(), Arc::clone(&write.entry));
                Ok(())
            }
            (Err(err), lock) => {
                drop(lock);
                engine
                    .memory
                    .insert(self.key.clone(), Arc::clone(&write.entry));
                Err(err)
            }
        };
        Counters::bump(&engine.counters.sets);
        let served = Served {
            entry: Arc::clone(&write.entry),
            state: State::Miss,
            stale_fallback: false,
        };
        self.land(Landing::Served(served.clone()));
        result.map(|()| served)
    }

    /// The function failed: serve the prior value if it can still be served
    /// (stale-if-error; nothing is written), else share the error with every waiter.
    pub fn fail(mut self, error: V) -> Result<Served<V>, Failure<V>> {
        self.record_upstream(false);
        drop(self.lock.take());
        let servable = self
            .prior
            .clone()
            .filter(|p| self.engine.state_of(p) != State::Miss);
        match servable {
            Some(entry) => {
                let served = Served {
                    entry,
                    state: State::Stale,
                    stale_fallback: true,
                };
                self.land(Landing::Served(served.clone()));
                Ok(served)
            }
            None => {
                let outcome = Arc::new(Outcome::Value(Landing::Failed(error)));
                match self.flight.take() {
                    Some(TicketFlight::Load(guard)) => guard.land_shared(Arc::clone(&outcome)),
                    Some(TicketFlight::Refresh(guard)) => guard.land(Outcome::Value(())),
                    None => {}
                }
                Err(Failure(outcome))
            }
        }
    }

    fn record_upstream(&mut self, ok: bool) {
        if let Some((stats, began)) = self.upstream.take() {
            stats.record(ok, began.elapsed());
        }
    }

    fn land(&mut self, landing: Landing<V>) {
        match self.flight.take() {
            Some(TicketFlight::Load(guard)) => guard.land(Outcome::Value(landing)),
            Some(TicketFlight::Refresh(guard)) => guard.land(Outcome::Value(())),
            None => {}
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
