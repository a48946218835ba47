//! The engine on a mock remote and a manual clock: every state, outages and fail-open,
//! stale-if-error, negative backoff, single-flight in and across processes, cancellation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Mutex;

use super::*;
use crate::cache::local::Invalidation;
use crate::clock::{Clock, ManualClock};
use crate::codec::encode_envelope;
use crate::runtime::block_on;

const T0: i64 = 1_700_000_000;

/// A remote store in a hash map, with the same answers as the Redis scripts, an outage
/// switch, a switch that makes it refuse writes, and a count of commands.
#[derive(Default)]
struct MockRemote {
    values: Mutex<HashMap<String, Vec<u8>>>,
    locks: Mutex<HashMap<String, String>>,
    waiters: Mutex<HashMap<String, usize>>,
    woken: tokio::sync::Notify,
    down: AtomicBool,
    refuse_writes: AtomicBool,
    refuse_locks: AtomicBool,
    commands: AtomicUsize,
    listener: Mutex<Option<Listener>>,
}

impl MockRemote {
    fn push(&self, what: Invalidation) {
        let listener = self.listener.lock().unwrap().clone();
        (listener.expect("the engine watches its remote"))(what);
    }

    fn command(&self) -> Result<(), StoreError> {
        self.commands.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("mock is down".into()));
        }
        Ok(())
    }

    fn commands(&self) -> usize {
        self.commands.load(Ordering::SeqCst)
    }

    fn set(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        if self.refuse_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Command("OOM command not allowed".into()));
        }
        self.values.lock().unwrap().insert(key.to_owned(), value);
        Ok(())
    }
}

impl Remote for MockRemote {
    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn down_reason(&self) -> String {
        "mock is down".into()
    }

    fn outages(&self) -> u64 {
        0
    }

    fn watch(&self, listener: Listener) {
        *self.listener.lock().unwrap() = Some(listener);
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        self.command()?;
        Ok(self.values.lock().unwrap().get(&key).cloned())
    }

    async fn mget(&self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.command()?;
        let values = self.values.lock().unwrap();
        Ok(keys.iter().map(|k| values.get(k).cloned()).collect())
    }

    async fn write_many(
        &self,
        sets: Vec<(String, Vec<u8>, u64)>,
        deletes: Vec<String>,
    ) -> Result<(), StoreError> {
        self.command()?;
        for (k, v, _) in sets {
            self.set(&k, v)?;
        }
        for k in deletes {
            self.values.lock().unwrap().remove(&k);
        }
        Ok(())
    }

    async fn delete(&self, keys: Vec<String>) -> Result<u64, StoreError> {
        self.command()?;
        let mut values = self.values.lock().unwrap();
        Ok(keys.iter().filter(|k| values.remove(*k).is_some()).count() as u64)
    }

    async fn delete_prefixed(&self, prefix: String) -> Result<u64, StoreError> {
        self.command()?;
        let mut values = self.values.lock().unwrap();
        let before = values.len();
        values.retain(|k, _| !k.starts_with(&prefix));
        Ok((before - values.len()) as u64)
    }

    async fn read_or_lock(
        &self,
        keys: &FlightKeys,
        token: &str,
        _lock_ttl: Duration,
        now: i64,
    ) -> Result<(Option<Vec<u8>>, LockReply), StoreError> {
        self.command()?;
        if self.refuse_locks.load(Ordering::SeqCst) {
            return Err(StoreError::Command(
                "READONLY You can't write against a read only replica".into(),
            ));
        }
        let value = self.values.lock().unwrap().get(&keys.value).cloned();
        let servable = value.as_ref().map(|v| {
            let wire = decode_envelope(v).unwrap();
            (now <= wire.fresh_until, now <= wire.stale_until)
        });
        if let Some((true, _)) = servable {
            return Ok((value, LockReply::NotNeeded));
        }
        let mut locks = self.locks.lock().unwrap();
        if !locks.contains_key(&keys.lock) {
            locks.insert(keys.lock.clone(), token.to_owned());
            return Ok((value, LockReply::Taken));
        }
        if !matches!(servable, Some((_, true))) {
            *self
                .waiters
                .lock()
                .unwrap()
                .entry(keys.lock.clone())
                .or_default() += 1;
        }
        Ok((value, LockReply::HeldElsewhere))
    }

    async fn try_lock(
        &self,
        keys: &FlightKeys,
        token: &str,
        _: Duration,
    ) -> Result<bool, StoreError> {
        self.command()?;
        let mut locks = self.locks.lock().unwrap();
        if locks.contains_key(&keys.lock) {
            return Ok(false);
        }
        locks.insert(keys.lock.clone(), token.to_owned());
        Ok(true)
    }

    async fn finish(
        &self,
        keys: &FlightKeys,
        write: Option<(Vec<u8>, u64)>,
        token: &str,
    ) -> Result<(), StoreError> {
        self.command()?;
        if let Some((value, _)) = write {
            self.set(&keys.value, value)?;
        }
        let mut locks = self.locks.lock().unwrap();
        if locks.get(&keys.lock).map(String::as_str) == Some(token) {
            locks.remove(&keys.lock);
        }
        self.waiters.lock().unwrap().remove(&keys.lock);
        self.woken.notify_waiters();
        Ok(())
    }

    async fn wait_done(&self, _keys: &FlightKeys, timeout: Duration) -> Result<bool, StoreError> {
        self.command()?;
        Ok(tokio::time::timeout(timeout, self.woken.notified())
            .await
            .is_ok())
    }
}

struct Text;

impl Decode<String> for Text {
    fn decode(&self, payload: &str, _codec: Option<&str>) -> Result<String, String> {
        serde_json::from_str(payload).map_err(|e| e.to_string())
    }
}

/// What Redis would hold for `text`, fresh for an hour from T0.
fn envelope(text: &str) -> Vec<u8> {
    let times = Times {
        fetched_at: T0,
        fresh_until: T0 + 3600,
        stale_until: T0 + 7200,
    };
    encode_envelope(&serde_json::to_string(text).unwrap(), times, None, 0)
}

fn prepared(text: &str) -> Prepared<String> {
    Prepared {
        value: text.to_owned(),
        payload: serde_json::to_string(text).unwrap(),
        codec: None,
    }
}

type TestEngine = Arc<Engine<String, MockRemote>>;

fn engine(remote: Option<Arc<MockRemote>>, fail_open: bool) -> (TestEngine, Arc<ManualClock>) {
    let clock = ManualClock::new(T0 * 1_000_000_000);
    let config = Config {
        namespace: "ns".into(),
        jitter: 0.0,
        fail_open,
        max_entries: 1000,
        max_value_bytes: 1 << 20,
        local: None,
    };
    let engine = Engine::new(config, clock.clone(), remote).unwrap();
    (engine, clock)
}

/// An engine with a local tier of 100 entries served for `local_ttl` seconds; the
/// listener the mock remote was given, to push invalidations by hand.
fn engine_with_local(remote: Arc<MockRemote>, local_ttl: i64) -> (TestEngine, Arc<ManualClock>) {
    let clock = ManualClock::new(T0 * 1_000_000_000);
    let config = Config {
        namespace: "ns".into(),
        jitter: 0.0,
        fail_open: true,
        max_entries: 1000,
        max_value_bytes: 1 << 20,
        local: Some((100, local_ttl)),
    };
    let engine = Engine::new(config, clock.clone(), Some(remote)).unwrap();
    (engine, clock)
}

fn advance(clock: &ManualClock, seconds: i64) {
    clock.advance_nanos(seconds * 1_000_000_000);
}

fn policy(lock: bool) -> CallPolicy {
    let lock = lock.then_some(LockPolicy {
        ttl: Duration::from_secs(30),
        wait: Duration::from_secs(5),
    });
    CallPolicy::new(
        300.0,
        Some(3600.0),
        Some(Backoff::new(60.0, 2.0, 200.0).unwrap()),
        lock,
    )
    .unwrap()
}

fn begin(e: &TestEngine, p: &CallPolicy) -> Begin<String, MockRemote> {
    block_on(e.begin("k", p, &Text, false, true, None)).unwrap()
}

/// Runs one cached call to its end: the value served, and whether the function ran.
fn call(
    e: &TestEngine,
    p: &CallPolicy,
    fetch: Result<&str, &str>,
) -> (Result<String, String>, bool) {
    match begin(e, p) {
        Begin::Serve(s) => (Ok(s.entry.value.clone()), false),
        Begin::Refresh(s, ticket) => {
            finish(ticket, p, fetch, false).ok();
            (Ok(s.entry.value.clone()), true)
        }
        Begin::Load(ticket) => (finish(ticket, p, fetch, false), true),
        Begin::Failed(f) => (Err(f.error().clone()), false),
    }
}

fn finish(
    ticket: Ticket<String, MockRemote>,
    p: &CallPolicy,
    fetch: Result<&str, &str>,
    negative: bool,
) -> Result<String, String> {
    match fetch {
        Ok(v) => {
            let write = ticket.plan(prepared(v), negative, p).unwrap();
            Ok(block_on(ticket.store(write)).unwrap().entry.value.clone())
        }
        Err(e) => match ticket.fail(e.to_owned()) {
            Ok(served) => {
                assert!(served.stale_fallback);
                Ok(served.entry.value.clone())
            }
            Err(f) => Err(f.error().clone()),
        },
    }
}

fn state(e: &TestEngine) -> State {
    block_on(e.get("k", &Text, false)).unwrap().state
}

#[test]
fn the_local_tier_serves_without_the_remote_until_told_or_expired() {
    let remote = Arc::new(MockRemote::default());
    let (e, clock) = engine_with_local(Arc::clone(&remote), 5);
    let write = e
        .plan_write("k".into(), prepared("v1"), 300.0, None)
        .unwrap();
    block_on(e.commit(vec![write])).unwrap();
    let before = remote.commands();
    let found = block_on(e.get("k", &Text, true)).unwrap();
    assert_eq!(found.entry.unwrap().value, "v1");
    assert_eq!(remote.commands(), before, "its own write is served locally");
    // Another process writes: the push drops the copy, the next read goes remote.
    remote.set("ns:k", envelope("v2")).unwrap();
    remote.push(Invalidation::Keys(vec![b"ns:k".to_vec()]));
    assert_eq!(
        block_on(e.get("k", &Text, true))
            .unwrap()
            .entry
            .unwrap()
            .value,
        "v2"
    );
    assert_eq!(remote.commands(), before + 1);
    // A lost push: the copy stands for local_ttl at most.
    remote.set("ns:k", envelope("v3")).unwrap();
    advance(&clock, 4);
    assert_eq!(
        block_on(e.get("k", &Text, true))
            .unwrap()
            .entry
            .unwrap()
            .value,
        "v2"
    );
    advance(&clock, 1);
    assert_eq!(
        block_on(e.get("k", &Text, true))
            .unwrap()
            .entry
            .unwrap()
            .value,
        "v3"
    );
    // A new connection may have missed pushes: everything goes.
    remote.set("ns:k", envelope("v4")).unwrap();
    remote.push(Invalidation::All);
    assert_eq!(
        block_on(e.get("k", &Text, true))
            .unwrap()
            .entry
            .unwrap()
            .value,
        "v4"
    );
    assert_eq!(e.stats().local.unwrap().hits, 2);
}

#[test]
fn a_local_tier_needs_a_remote() {
    let clock = ManualClock::new(0);
    let config = Config {
        namespace: "ns".into(),
        jitter: 0.0,
        fail_open: true,
        max_entries: 10,
        max_value_bytes: 1 << 20,
        local: Some((10, 5)),
    };
    assert!(Engine::<String, MockRemote>::new(config, clock, None).is_err());
}

#[test]
fn hit_stale_miss_on_memory() {
    let (e, clock) = engine(None, true);
    let p = policy(false);
    assert_eq!(
        call(&e, &p, Ok("v1")),
        (Ok("v1".into()), true),
        "cold miss loads"
    );
    assert_eq!(
        call(&e, &p, Ok("v2")),
        (Ok("v1".into()), false),
        "fresh hit"
    );
    advance(&clock, 301);
    assert_eq!(state(&e), State::Stale);
    let Begin::Refresh(served, ticket) = begin(&e, &p) else {
        panic!("a stale value is served with a refresh duty")
    };
    assert_eq!(served.entry.value, "v1");
    assert!(
        matches!(begin(&e, &p), Begin::Serve(s) if s.state == State::Stale),
        "one refresh at a time; others get the stale value"
    );
    finish(ticket, &p, Ok("v2"), false).unwrap();
    assert_eq!(call(&e, &p, Ok("v3")), (Ok("v2".into()), false));
    advance(&clock, 3601);
    assert_eq!(state(&e), State::Miss);
    assert_eq!(call(&e, &p, Ok("v4")), (Ok("v4".into()), true));
    let stats = e.stats();
    assert_eq!((stats.hits, stats.stale_hits), (2, 2));
    let upstream = p.upstream.seconds.snapshot();
    assert_eq!(
        upstream.count, 3,
        "two loads and one refresh called the upstream"
    );
    assert_eq!(p.upstream.ok.load(Ordering::Relaxed), 3);
}

#[test]
fn stale_if_error_and_errors_not_cached() {
    let (e, clock) = engine(None, true);
    let p = policy(false);
    assert_eq!(call(&e, &p, Err("down")), (Err("down".into()), true));
    assert_eq!(
        call(&e, &p, Ok("v1")),
        (Ok("v1".into()), true),
        "a failure is not cached"
    );
    advance(&clock, 301);
    let Begin::Refresh(_, ticket) = begin(&e, &p) else {
        panic!()
    };
    assert_eq!(finish(ticket, &p, Err("down"), false), Ok("v1".into()));
    assert_eq!(
        state(&e),
        State::Stale,
        "a failed refresh overwrites nothing"
    );
    let Begin::Refresh(_, ticket) = begin(&e, &p) else {
        panic!()
    };
    drop(ticket);
    assert!(
        matches!(begin(&e, &p), Begin::Refresh(..)),
        "a dropped refresh frees the duty"
    );
}

#[test]
fn negative_answers_back_off_and_a_positive_resets() {
    for remote in [None, Some(Arc::new(MockRemote::default()))] {
        let (e, clock) = engine(remote, true);
        let p = policy(true);
        let mut kept = Vec::new();
        for _ in 0..4 {
            let Begin::Load(ticket) = begin(&e, &p) else {
                panic!("expired negative entry loads")
            };
            let write = ticket.plan(prepared("none"), true, &p).unwrap();
            let entry = block_on(ticket.store(write)).unwrap().entry;
            kept.push(entry.times.fresh_until - entry.times.fetched_at);
            assert_eq!(
                entry.times.stale_until, entry.times.fresh_until,
                "never served stale"
            );
            advance(&clock, kept[kept.len() - 1] + 1);
        }
        assert_eq!(kept, [60, 120, 200, 200]);
        let Begin::Load(ticket) = begin(&e, &p) else {
            panic!()
        };
        finish(ticket, &p, Ok("found"), false).unwrap();
        advance(&clock, 3601 + 1);
        let Begin::Load(ticket) = begin(&e, &p) else {
            panic!()
        };
        let write = ticket.plan(prepared("none"), true, &p).unwrap();
        let entry = block_on(ticket.store(write)).unwrap().entry;
        assert_eq!(entry.negative, 1, "a positive answer reset the streak");
    }
}

#[test]
fn callers_of_one_key_share_one_load_or_its_error() {
    let (e, _clock) = engine(None, true);
    let p = Arc::new(policy(false));
    for outcome in [Ok("v"), Err("boom")] {
        e.memory.clear();
        let Begin::Load(ticket) = begin(&e, &p) else {
            panic!()
        };
        let followers: Vec<_> = (0..8)
            .map(|_| {
                let (e, p) = (e.clone(), p.clone());
                std::thread::spawn(move || match begin(&e, &p) {
                    Begin::Serve(s) => Ok(s.entry.value.clone()),
                    Begin::Failed(f) => Err(f.error().clone()),
                    _ => panic!("followers do not load"),
                })
            })
            .collect();
        while e.followers("k") < 8 {
            std::thread::yield_now();
        }
        ticket.hand_off();
        let led = finish(ticket, &p, outcome, false);
        for f in followers {
            assert_eq!(f.join().unwrap(), led);
        }
        assert_eq!(e.stats().coalesced % 8, 0);
    }
}

#[test]
fn an_abandoned_load_hands_over_to_a_waiter() {
    let (e, _clock) = engine(None, true);
    let p = Arc::new(policy(false));
    let Begin::Load(ticket) = begin(&e, &p) else {
        panic!()
    };
    let (e2, p2) = (e.clone(), p.clone());
    let waiter = std::thread::spawn(move || match begin(&e2, &p2) {
        Begin::Load(t) => finish(t, &p2, Ok("from the waiter"), false),
        _ => panic!("the waiter leads the next load"),
    });
    while e.followers("k") < 1 {
        std::thread::yield_now();
    }
    drop(ticket);
    assert_eq!(waiter.join().unwrap(), Ok("from the waiter".into()));
}

#[test]
fn a_thread_never_waits_for_its_own_load() {
    let (e, _clock) = engine(None, true);
    let p = policy(false);
    let Begin::Load(_ticket) = begin(&e, &p) else {
        panic!()
    };
    let err = block_on(e.begin("k", &p, &Text, false, true, None))
        .err()
        .unwrap();
    assert!(matches!(err, CoreError::WouldDeadlock(_)));
}

#[test]
fn remote_hit_is_one_command_and_cold_miss_two() {
    let remote = Arc::new(MockRemote::default());
    let (e, _clock) = engine(Some(remote.clone()), true);
    let p = policy(true);
    assert_eq!(call(&e, &p, Ok("v")), (Ok("v".into()), true));
    assert_eq!(remote.commands(), 2, "read+lock, then write+unlock");
    assert!(remote.locks.lock().unwrap().is_empty());
    assert_eq!(call(&e, &p, Ok("w")), (Ok("v".into()), false));
    assert_eq!(remote.commands(), 3, "a hit is one command");
    assert!(
        e.memory.is_empty(),
        "values live in the remote, not in memory"
    );
}

#[test]
fn outage_fails_open_to_memory_or_raises() {
    let remote = Arc::new(MockRemote::default());
    let (e, _clock) = engine(Some(remote.clone()), true);
    let p = policy(true);
    remote.down.store(true, Ordering::SeqCst);
    assert_eq!(call(&e, &p, Ok("v")), (Ok("v".into()), true));
    assert_eq!(
        call(&e, &p, Ok("w")),
        (Ok("v".into()), false),
        "served from memory"
    );
    assert_eq!(remote.commands(), 0, "a store marked down is not asked");
    let (strict, _clock) = engine(Some(remote.clone()), false);
    let err = block_on(strict.begin("k", &p, &Text, false, true, None))
        .err()
        .unwrap();
    assert!(matches!(err, CoreError::BackendUnavailable(_)));
}

#[test]
fn a_refused_write_is_kept_in_memory_and_a_later_write_drops_the_copy() {
    let remote = Arc::new(MockRemote::default());
    let (e, _clock) = engine(Some(remote.clone()), true);
    let p = policy(true);
    remote.refuse_writes.store(true, Ordering::SeqCst);
    assert_eq!(call(&e, &p, Ok("v1")), (Ok("v1".into()), true));
    let found = block_on(e.get("k", &Text, true)).unwrap();
    assert_eq!(found.entry.unwrap().value, "v1", "read back from memory");
    remote.refuse_writes.store(false, Ordering::SeqCst);
    let write = e
        .plan_write("k".into(), prepared("v2"), 300.0, None)
        .unwrap();
    block_on(e.commit(vec![write])).unwrap();
    assert!(
        e.memory.is_empty(),
        "the outage copy is gone once the remote has the value"
    );
    remote.down.store(true, Ordering::SeqCst);
    assert_eq!(
        state(&e),
        State::Miss,
        "a later outage does not resurrect v1"
    );
}

#[test]
fn processes_share_one_load_through_the_lock() {
    let remote = Arc::new(MockRemote::default());
    let (a, _) = engine(Some(remote.clone()), true);
    let (b, _) = engine(Some(remote.clone()), true);
    let p = Arc::new(policy(true));
    let Begin::Load(ticket) = begin(&a, &p) else {
        panic!()
    };
    let (b2, p2) = (b.clone(), p.clone());
    let follower = std::thread::spawn(move || match begin(&b2, &p2) {
        Begin::Serve(s) => s.entry.value.clone(),
        _ => panic!("the other process waits for the write"),
    });
    while remote.waiters.lock().unwrap().is_empty() {
        std::thread::yield_now();
    }
    finish(ticket, &p, Ok("shared"), false).unwrap();
    assert_eq!(follower.join().unwrap(), "shared");
}

#[test]
fn a_dropped_ticket_releases_the_lock_at_once() {
    let remote = Arc::new(MockRemote::default());
    let (e, _clock) = engine(Some(remote.clone()), true);
    let p = policy(true);
    let Begin::Load(ticket) = begin(&e, &p) else {
        panic!()
    };
    assert_eq!(remote.locks.lock().unwrap().len(), 1);
    drop(ticket);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !remote.locks.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "lock never released");
        std::thread::yield_now();
    }
}

#[test]
fn unreadable_remote_values_are_counted_misses() {
    let remote = Arc::new(MockRemote::default());
    let (e, clock) = engine(Some(remote.clone()), true);
    remote
        .values
        .lock()
        .unwrap()
        .insert("ns:k".into(), b"not json".to_vec());
    assert_eq!(state(&e), State::Miss);
    assert_eq!(e.stats().decode_errors, 1);
    let _ = clock.now_nanos();
}

#[test]
fn an_outage_copy_never_comes_back_after_recovery() {
    let remote = Arc::new(MockRemote::default());
    let (a, _) = engine(Some(remote.clone()), true);
    let (b, _) = engine(Some(remote.clone()), true);
    remote.down.store(true, Ordering::SeqCst);
    let write = a
        .plan_write("k".into(), prepared("old"), 300.0, None)
        .unwrap();
    block_on(a.commit(vec![write])).unwrap();
    remote.down.store(false, Ordering::SeqCst);
    let write = b
        .plan_write("k".into(), prepared("new"), 300.0, None)
        .unwrap();
    block_on(b.commit(vec![write])).unwrap();
    block_on(b.delete(vec!["k".into()])).unwrap();
    assert_eq!(
        state(&a),
        State::Miss,
        "the remote is the truth once it is back"
    );
}

#[test]
fn a_refused_lock_still_serves_the_stale_value() {
    let remote = Arc::new(MockRemote::default());
    let (e, clock) = engine(Some(remote.clone()), true);
    let p = policy(true);
    assert_eq!(call(&e, &p, Ok("v1")), (Ok("v1".into()), true));
    advance(&clock, 301);
    remote.refuse_locks.store(true, Ordering::SeqCst);
    let Begin::Refresh(served, ticket) = begin(&e, &p) else {
        panic!("a read-only replica still serves stale values")
    };
    assert_eq!(served.entry.value, "v1");
    drop(ticket);
    assert_eq!(e.stats().backend_errors, 1);
}
