//! Single-flight: concurrent callers of one key share one execution.
//!
//! The first caller of a key becomes the leader and gets a `LeaderGuard`; later callers
//! get the `Flight` and wait for its outcome, blocking (threads) or through a callback
//! (asyncio futures). The outcome, value or error, goes to every waiter; nothing is kept
//! after the flight lands (the key leaves the map when the leader finishes). A leader that
//! goes away without finishing (cancelled task, dropped guard) ends the flight as
//! `Abandoned`, and the waiters start over: one of them becomes the next leader.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[cfg(feature = "python")]
pub mod py;

#[derive(Debug)]
pub enum Outcome<V> {
    Value(V),
    Error(V),
    Abandoned,
}

type Callback<V> = Box<dyn FnOnce(Arc<Outcome<V>>) + Send>;

pub struct Flight<V> {
    state: Mutex<FlightState<V>>,
    landed: Condvar,
    /// How many callers joined this flight as followers (for stats and tests).
    followers: std::sync::atomic::AtomicUsize,
}

struct FlightState<V> {
    outcome: Option<Arc<Outcome<V>>>,
    callbacks: Vec<Callback<V>>,
    /// The thread the leader runs on, while known: a blocking wait there would wait for
    /// itself. Cleared when the leader hands the work to another thread.
    leader_thread: Option<std::thread::ThreadId>,
}

use crate::sync::lock;

impl<V> Flight<V> {
    fn new() -> Self {
        Self {
            state: Mutex::new(FlightState {
                outcome: None,
                callbacks: Vec::new(),
                leader_thread: Some(std::thread::current().id()),
            }),
            landed: Condvar::new(),
            followers: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn followers(&self) -> usize {
        self.followers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The leader's work continues on another thread (a pool, a runtime).
    pub fn hand_off(&self) {
        lock(&self.state).leader_thread = None;
    }

    /// The leader's work runs on the current thread from now on (an async leader whose
    /// flight began on a runtime thread, handing its work to the event loop's thread).
    pub fn claim_for_current_thread(&self) {
        lock(&self.state).leader_thread = Some(std::thread::current().id());
    }

    /// Waits for the flight to land without blocking a thread (for async callers).
    pub async fn landed(&self) -> Arc<Outcome<V>>
    where
        V: Send + Sync + 'static,
    {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.on_landed(move |outcome| {
            let _ = sender.send(outcome);
        });
        // The sender lives in the flight until it lands, and landing sends before dropping.
        receiver
            .await
            .unwrap_or_else(|_| Arc::new(Outcome::Abandoned))
    }

    /// True if waiting for this flight on the current thread could never end.
    pub fn would_wait_for_itself(&self) -> bool {
        let state = lock(&self.state);
        state.outcome.is_none() && state.leader_thread == Some(std::thread::current().id())
    }

    /// Blocks until the flight lands.
    pub fn wait(&self) -> Arc<Outcome<V>> {
        let mut state = lock(&self.state);
        loop {
            if let Some(outcome) = &state.outcome {
                return Arc::clone(outcome);
            }
            state = self.landed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until the flight lands or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Arc<Outcome<V>>> {
        let state = lock(&self.state);
        let (state, _) = self
            .landed
            .wait_timeout_while(state, timeout, |s| s.outcome.is_none())
            .unwrap_or_else(|p| p.into_inner());
        state.outcome.clone()
    }

    /// Calls `callback` with the outcome when the flight lands (at once if it has). The
    /// callback runs outside every lock, on the thread that lands the flight.
    pub fn on_landed(&self, callback: impl FnOnce(Arc<Outcome<V>>) + Send + 'static) {
        let mut state = lock(&self.state);
        match &state.outcome {
            Some(outcome) => {
                let outcome = Arc::clone(outcome);
                drop(state);
                callback(outcome);
            }
            None => state.callbacks.push(Box::new(callback)),
        }
    }

    pub fn has_landed(&self) -> bool {
        lock(&self.state).outcome.is_some()
    }
}

type FlightMap<V> = HashMap<Arc<str>, Arc<Flight<V>>, foldhash::fast::RandomState>;

pub struct SingleFlight<V> {
    /// The flights in progress, and the fork epoch they belong to.
    flights: Mutex<(u64, FlightMap<V>)>,
}

pub enum Joined<V> {
    Leader(LeaderGuard<V>),
    Follower(Arc<Flight<V>>),
}

impl<V> Default for SingleFlight<V> {
    fn default() -> Self {
        Self {
            flights: Mutex::new((crate::runtime::fork_epoch(), HashMap::default())),
        }
    }
}

impl<V> SingleFlight<V> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The flights of this process. A forked child forgets its parent's: their leaders are
    /// threads that do not exist in the child, and waiting for them would never end.
    fn map(&self) -> MutexGuard<'_, (u64, FlightMap<V>)> {
        let mut flights = lock(&self.flights);
        let epoch = crate::runtime::fork_epoch();
        if flights.0 != epoch {
            *flights = (epoch, HashMap::default());
        }
        flights
    }

    /// Joins the flight of `key`, starting it (as leader) when there is none.
    pub fn join(self: &Arc<Self>, key: &str) -> Joined<V> {
        let mut guard = self.map();
        let flights = &mut guard.1;
        if let Some(flight) = flights.get(key) {
            flight
                .followers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Joined::Follower(Arc::clone(flight));
        }
        let flight = Arc::new(Flight::new());
        let key: Arc<str> = Arc::from(key);
        flights.insert(Arc::clone(&key), Arc::clone(&flight));
        Joined::Leader(LeaderGuard {
            group: Arc::clone(self),
            key,
            flight,
            landed: false,
        })
    }

    /// Followers of the flight of `key` so far (0 when none is in flight).
    pub fn followers(&self, key: &str) -> usize {
        self.map().1.get(key).map_or(0, |f| f.followers())
    }

    /// The flight of `key`, if one is in progress (without joining it).
    pub fn current(&self, key: &str) -> Option<Arc<Flight<V>>> {
        self.map().1.get(key).cloned()
    }

    pub fn is_in_flight(&self, key: &str) -> bool {
        self.map().1.contains_key(key)
    }

    /// Keys in flight now; 0 when idle (no per-key state is left behind).
    pub fn len(&self) -> usize {
        self.map().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct LeaderGuard<V> {
    group: Arc<SingleFlight<V>>,
    key: Arc<str>,
    flight: Arc<Flight<V>>,
    landed: bool,
}

impl<V> LeaderGuard<V> {
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn flight(&self) -> &Arc<Flight<V>> {
        &self.flight
    }

    /// Lands the flight: every waiter gets `outcome`.
    pub fn land(mut self, outcome: Outcome<V>) {
        self.land_with(Arc::new(outcome));
    }

    /// Lands with an outcome the leader keeps a handle on too.
    pub fn land_shared(mut self, outcome: Arc<Outcome<V>>) {
        self.land_with(outcome);
    }

    fn land_with(&mut self, outcome: Arc<Outcome<V>>) {
        if self.landed {
            return;
        }
        self.landed = true;
        // Leave the map first, so a caller arriving now starts a new flight rather than
        // joining one that has ended.
        let removed = {
            let mut guard = self.group.map();
            let flights = &mut guard.1;
            match flights.get(&*self.key) {
                Some(current) if Arc::ptr_eq(current, &self.flight) => flights.remove(&*self.key),
                _ => None,
            }
        };
        drop(removed);
        let callbacks = {
            let mut state = lock(&self.flight.state);
            state.outcome = Some(Arc::clone(&outcome));
            std::mem::take(&mut state.callbacks)
        };
        // A sync waiter joined as a follower first, so with none there is nobody to wake
        // (and notify_all is a syscall even then).
        if self.flight.followers() > 0 {
            self.flight.landed.notify_all();
        }
        for callback in callbacks {
            callback(Arc::clone(&outcome));
        }
    }
}

impl<V> Drop for LeaderGuard<V> {
    fn drop(&mut self) {
        self.land_with(Arc::new(Outcome::Abandoned));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;

    /// Runs `f` through the group the way a caller does: lead, or wait and retry when the
    /// leader abandons.
    fn run(
        group: &Arc<SingleFlight<u32>>,
        key: &str,
        f: impl Fn() -> Result<u32, u32>,
    ) -> Result<u32, u32> {
        loop {
            match group.join(key) {
                Joined::Leader(guard) => {
                    let result = f();
                    guard.land(match result {
                        Ok(v) => Outcome::Value(v),
                        Err(e) => Outcome::Error(e),
                    });
                    return result;
                }
                Joined::Follower(flight) => match &*flight.wait() {
                    Outcome::Value(v) => return Ok(*v),
                    Outcome::Error(e) => return Err(*e),
                    Outcome::Abandoned => continue,
                },
            }
        }
    }

    #[test]
    fn one_execution_for_many_threads() {
        let group: Arc<SingleFlight<u32>> = SingleFlight::new();
        let Joined::Leader(guard) = group.join("k") else {
            unreachable!()
        };
        let calls = Arc::new(AtomicUsize::new(1)); // the leader's execution
        let handles: Vec<_> = (0..31)
            .map(|_| {
                let (group, calls) = (group.clone(), calls.clone());
                thread::spawn(move || {
                    run(&group, "k", || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok(0)
                    })
                })
            })
            .collect();
        // Land only once all 31 threads hold the flight (map + guard + 31 followers).
        while Arc::strong_count(guard.flight()) < 33 {
            thread::yield_now();
        }
        guard.land(Outcome::Value(7));
        for h in handles {
            assert_eq!(h.join().unwrap(), Ok(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one execution");
        assert!(group.is_empty(), "no per-key state after the flight");
    }

    #[test]
    fn error_goes_to_every_waiter_and_is_not_kept() {
        let group: Arc<SingleFlight<u32>> = SingleFlight::new();
        let Joined::Leader(guard) = group.join("k") else {
            panic!("first is leader")
        };
        let Joined::Follower(flight) = group.join("k") else {
            panic!("second follows")
        };
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        flight.on_landed(move |o| *sink.lock().unwrap() = Some(matches!(*o, Outcome::Error(5))));
        guard.land(Outcome::Error(5));
        assert!(matches!(*flight.wait(), Outcome::Error(5)));
        assert_eq!(*seen.lock().unwrap(), Some(true));
        assert!(
            matches!(group.join("k"), Joined::Leader(_)),
            "a failure is not cached"
        );
    }

    #[test]
    fn dropped_leader_abandons_and_a_waiter_takes_over() {
        let group: Arc<SingleFlight<u32>> = SingleFlight::new();
        let guard = match group.join("k") {
            Joined::Leader(g) => g,
            Joined::Follower(_) => unreachable!(),
        };
        let g2 = group.clone();
        let waiter = thread::spawn(move || run(&g2, "k", || Ok(9)));
        // Wait until the waiter has joined (it holds a clone of the flight).
        while Arc::strong_count(guard.flight()) < 3 {
            thread::yield_now();
        }
        drop(guard);
        assert_eq!(
            waiter.join().unwrap(),
            Ok(9),
            "the waiter led the next flight"
        );
        assert!(group.is_empty());
    }

    #[test]
    fn late_callback_runs_at_once_and_timeout_wait_returns_none() {
        let group: Arc<SingleFlight<u32>> = SingleFlight::new();
        let Joined::Leader(guard) = group.join("k") else {
            unreachable!()
        };
        let flight = guard.flight().clone();
        assert!(flight.wait_timeout(Duration::from_millis(1)).is_none());
        guard.land(Outcome::Value(1));
        let hit = Arc::new(AtomicUsize::new(0));
        let h = hit.clone();
        flight.on_landed(move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hit.load(Ordering::SeqCst), 1);
        assert!(flight.has_landed());
    }

    #[test]
    fn many_distinct_keys_leave_nothing_behind() {
        let group: Arc<SingleFlight<u32>> = SingleFlight::new();
        for i in 0..100_000 {
            run(&group, &format!("k{i}"), || Ok(i)).unwrap();
        }
        assert!(group.is_empty());
    }
}
