//! `RateLimiterCore` and `CircuitBreakerCore`: bindings over `Limiter` and `Circuit`,
//! which take every decision. These convert, read the object's clock, and wait for Redis:
//! blocking paths with the GIL released, async twins (`_a…`) on tenuto's runtime, never on
//! the event loop. `tenuto.RateLimiter` / `tenuto.CircuitBreaker` (Python) add the context
//! managers and decorators.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};

use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::IntoPyObjectExt;

use super::breaker::{Breaker, BreakerState, Circuit, FailureRate, Permit, Reply, Step};
use super::{Lease, Limiter, Mode, Rate};
use crate::cache::redis::{RedisConfig, RedisStore, SharedDecision, StoreError, SCHEMES};
use crate::clock::py::PyClock;
use crate::error::py::{Count, TenutoError};
use crate::runtime::py::{spawn_for_asyncio, LoopFuture, Ready};

create_exception!(
    tenuto._core,
    RateLimited,
    TenutoError,
    "A rate limit refused the call; `retry_after` says when to try again (seconds)."
);
create_exception!(
    tenuto._core,
    CircuitOpen,
    TenutoError,
    "The circuit breaker is open; `retry_after` says when it will let a probe through (seconds)."
);

const NANOS: f64 = 1e9;

use crate::sync::lock;

fn with_retry_after(py: Python<'_>, err: PyErr, seconds: f64) -> PyErr {
    let _ = err.value(py).setattr("retry_after", seconds);
    err
}

/// An HTTP status code argument (100-599), as a `ValueError` naming it otherwise.
fn http_status(status: Count) -> PyResult<u16> {
    match u16::try_from(status.0) {
        Ok(code) if (100..=599).contains(&code) => Ok(code),
        _ => Err(PyValueError::new_err(format!(
            "status must be an HTTP status code (100-599), got {}",
            status.0
        ))),
    }
}

fn seconds_to_nanos(name: &str, seconds: f64) -> PyResult<i64> {
    let max = super::MAX_PERIOD_SECS as f64;
    if !seconds.is_finite() || !(0.0..=max).contains(&seconds) {
        return Err(PyValueError::new_err(format!(
            "{name} must be a non-negative number of seconds up to {max:e}, got {seconds}"
        )));
    }
    Ok((seconds * NANOS).round() as i64)
}

/// Waits for Redis on tenuto's runtime with the GIL released: the blocking paths.
fn wait<F>(py: Python<'_>, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    py.detach(move || crate::runtime::block_on(future))
}

/// An awaitable that is already complete: no event-loop round trip.
fn ready<'py, T: IntoPyObject<'py>>(py: Python<'py>, value: T) -> PyResult<Bound<'py, PyAny>> {
    Ok(Bound::new(py, Ready::new(value.into_py_any(py)?))?.into_any())
}

/// The awaitable of a step whose Rust work must finish even if the awaiting task is
/// cancelled (giving a lease back, reporting an outcome): it starts on the runtime at
/// once, and the awaitable only waits for it (a cancelled wait leaves it running).
fn detached<'py, F>(py: Python<'py>, work: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = ()> + Send + 'static,
{
    let task = crate::runtime::handle().spawn(work);
    spawn_for_asyncio(
        py,
        async move {
            let _ = task.await;
        },
        |py, ()| Ok(py.None()),
    )
}

/// Redis to wait for; None without one, or while it is marked down (it would answer
/// `Unavailable` at once, so an async twin decides without a loop round trip).
fn reachable(shared: &Option<Arc<RedisStore>>) -> Option<Arc<RedisStore>> {
    shared.as_ref().filter(|r| !r.is_down()).cloned()
}

fn down(redis: &RedisStore) -> StoreError {
    StoreError::Unavailable(redis.last_error())
}

/// `(admitted, retry_after_seconds)`.
fn admission(outcome: Result<(), i64>) -> (bool, f64) {
    match outcome {
        Ok(()) => (true, 0.0),
        Err(wait) => (false, wait as f64 / NANOS),
    }
}

/// A lease token for Python: the token, None when every lease is in use, "" for nothing
/// to give back.
fn lease_token(lease: Lease) -> Option<String> {
    match lease {
        Lease::Taken(token) => Some(token),
        Lease::Busy => None,
        Lease::Unchecked => Some(String::new()),
    }
}

/// Gives a lease back unless disarmed: an async lease request whose awaiting task was
/// cancelled may still have taken it on the server.
struct LeaseGuard {
    armed: Option<(Arc<RedisStore>, String, String)>,
}

impl LeaseGuard {
    /// The answer arrived: whoever awaits it owns the lease now.
    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some((redis, key, token)) = self.armed.take() {
            crate::runtime::handle().spawn(async move {
                let _ = redis.unlease(key, token).await;
            });
        }
    }
}

/// In-flight slots shared by threads (condvar) and asyncio tasks (futures woken on release).
struct Slots {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
    waiters: Mutex<VecDeque<LoopFuture>>,
}

/// Rate limit state and rules; see `tenuto.RateLimiter`.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "RateLimiterCore")]
pub struct PyRateLimiter {
    core: Arc<Limiter>,
    clock: PyClock,
    slots: Option<Slots>,
    /// Shared through Redis: every process and host using the same `name` and URL.
    shared: Option<Arc<RedisStore>>,
    lease_ttl_ms: i64,
}

impl PyRateLimiter {
    /// One attempt's question to the shared limit.
    fn ask_shared(
        &self,
        redis: Arc<RedisStore>,
        key: Option<&str>,
    ) -> impl Future<Output = Result<SharedDecision, StoreError>> + Send + 'static {
        let ask = self
            .core
            .shared_attempt(key, crate::runtime::unique_token());
        async move { redis.limit_attempt(ask.keys, ask.args, ask.member).await }
    }

    /// One blocking attempt against the shared limit: the decision, and what Redis said
    /// (None when it did not answer).
    fn attempt_shared(
        &self,
        py: Python<'_>,
        redis: &Arc<RedisStore>,
        key: Option<&str>,
    ) -> (Result<(), i64>, Option<SharedDecision>) {
        let reply = wait(py, self.ask_shared(Arc::clone(redis), key));
        (self.core.shared_outcome(&reply), reply.ok())
    }

    /// An attempt by the right rule set: shared when a URL was given, else in process.
    fn attempt_any(&self, py: Python<'_>, key: Option<&str>) -> PyResult<Result<(), i64>> {
        match &self.shared {
            Some(redis) => Ok(self.attempt_shared(py, redis, key).0),
            None => Ok(self.core.attempt(self.clock.now_nanos(py)?, key)),
        }
    }

    /// What a shared lease request needs: None when there is nothing to lease.
    fn lease_request(&self) -> Option<(Arc<RedisStore>, String, i64, String)> {
        let (redis, slots) = (self.shared.as_ref()?, self.slots.as_ref()?);
        Some((
            Arc::clone(redis),
            self.core.lease_key(),
            slots.max as i64,
            crate::runtime::unique_token(),
        ))
    }
}

#[pymethods]
impl PyRateLimiter {
    #[new]
    #[pyo3(signature = (
        rate, min_interval = None, max_concurrency = None, burst = None, url = None,
        name = "default", fail_open = true, *, mode = "outbound", max_keys = Count(100_000),
        clock = None, lease_ttl = 300.0
    ),
    text_signature = "(rate, min_interval=None, max_concurrency=None, burst=None, url=None, name='default', fail_open=True, *, mode='outbound', max_keys=100000, clock=None, lease_ttl=300.0)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        rate: &Bound<'_, PyAny>,
        min_interval: Option<f64>,
        max_concurrency: Option<Count>,
        burst: Option<Count>,
        url: Option<&str>,
        name: &str,
        fail_open: bool,
        mode: &str,
        max_keys: Count,
        clock: Option<&Bound<'_, PyAny>>,
        lease_ttl: f64,
    ) -> PyResult<Self> {
        let (max_concurrency, burst, max_keys) =
            (max_concurrency.map(|c| c.0), burst.map(|b| b.0), max_keys.0);
        let shared = shared_store(url, "limiter")?;
        let rate_text: &str = rate
            .extract()
            .map_err(|_| PyTypeError::new_err("rate must be a str such as \"80/minute\""))?;
        let rate = Rate::parse(rate_text)?;
        let burst = match burst {
            None => 1,
            Some(b) if b >= 1 && b <= i64::from(rate.count) => b as u32,
            Some(b) => {
                return Err(PyValueError::new_err(format!(
                    "burst must be between 1 and {} (the rate's count), got {b}",
                    rate.count
                )))
            }
        };
        let mode = match mode {
            "outbound" => Mode::Outbound {
                min_interval_ns: seconds_to_nanos("min_interval", min_interval.unwrap_or(0.0))?,
                burst,
            },
            "inbound" => Mode::Inbound,
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode must be \"outbound\" or \"inbound\", got {other:?}"
                )))
            }
        };
        let slots = match max_concurrency {
            None => None,
            Some(n) if n >= 1 => Some(Slots {
                max: n as usize,
                used: Mutex::new(0),
                freed: Condvar::new(),
                waiters: Mutex::new(VecDeque::new()),
            }),
            Some(n) => {
                return Err(PyValueError::new_err(format!(
                    "max_concurrency must be at least 1, got {n}"
                )))
            }
        };
        if max_keys < 1 {
            return Err(PyValueError::new_err("max_keys must be at least 1"));
        }
        Ok(Self {
            core: Arc::new(Limiter::new(rate, mode, name, max_keys as usize, fail_open)),
            clock: PyClock::from_arg(clock)?,
            slots,
            shared,
            lease_ttl_ms: (seconds_to_nanos("lease_ttl", lease_ttl)? / 1_000_000).max(1),
        })
    }

    /// `(admitted, retry_after_seconds)`, never waiting. `key` limits per client.
    #[pyo3(signature = (key = None))]
    fn try_acquire(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(bool, f64)> {
        Ok(admission(self.attempt_any(py, key)?))
    }

    /// `try_acquire` as an awaitable: Redis is waited for on tenuto's runtime (cancelling
    /// the awaiting task stops the wait); in process it is already complete.
    #[pyo3(signature = (key = None))]
    fn _atry_acquire<'py>(
        &self,
        py: Python<'py>,
        key: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(shared) = &self.shared else {
            return ready(
                py,
                admission(self.core.attempt(self.clock.now_nanos(py)?, key)),
            );
        };
        let Some(redis) = reachable(&self.shared) else {
            return ready(py, admission(self.core.shared_outcome(&Err(down(shared)))));
        };
        let core = Arc::clone(&self.core);
        spawn_for_asyncio(py, self.ask_shared(redis, key), move |py, reply| {
            let value = admission(core.shared_outcome(&reply));
            value.into_py_any(py)
        })
    }

    /// `try_acquire` plus the decision time in epoch seconds (the Redis server's clock for
    /// a shared limit): for measuring accuracy without client-side skew.
    #[pyo3(signature = (key = None))]
    fn _try_acquire_at(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(bool, f64, f64)> {
        let (outcome, at) = match &self.shared {
            Some(redis) => {
                let (outcome, decision) = self.attempt_shared(py, redis, key);
                (
                    outcome,
                    decision.map_or(0, |d| d.now_us.saturating_mul(1000)),
                )
            }
            None => {
                let now = self.clock.now_nanos(py)?;
                (self.core.attempt(now, key), now)
            }
        };
        let (ok, retry_after) = admission(outcome);
        Ok((ok, retry_after, at as f64 / NANOS))
    }

    /// One attempt with what RateLimit-* headers need, from the same decision:
    /// `(admitted, retry_after, limit, remaining, reset_seconds)`.
    #[pyo3(signature = (key = None))]
    fn decide(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(bool, f64, u32, u32, f64)> {
        let limit = self.core.rate().count;
        let (outcome, remaining, reset_ns) = match &self.shared {
            Some(redis) => {
                let (outcome, decision) = self.attempt_shared(py, redis, key);
                let (remaining, reset) = decision.map_or((0, 0), |d| {
                    (limit.saturating_sub(d.used), d.reset_us * 1000)
                });
                (outcome, remaining, reset)
            }
            None => {
                let now = self.clock.now_nanos(py)?;
                let outcome = self.core.attempt(now, key);
                let (_, remaining, reset) = self.core.window(now, key);
                (outcome, remaining, reset)
            }
        };
        let (ok, retry_after) = admission(outcome);
        Ok((ok, retry_after, limit, remaining, reset_ns as f64 / NANOS))
    }

    /// Waits (GIL released) until admitted; raises `RateLimited` when that would take
    /// longer than `timeout` seconds.
    #[pyo3(signature = (timeout = None, key = None))]
    fn acquire(&self, py: Python<'_>, timeout: Option<f64>, key: Option<&str>) -> PyResult<()> {
        let start = self.clock.now_nanos(py)?;
        let deadline = match timeout {
            Some(t) => Some(start + seconds_to_nanos("timeout", t)?),
            None => None,
        };
        loop {
            let now = self.clock.now_nanos(py)?;
            let wait = match self.attempt_any(py, key)? {
                Ok(()) => return Ok(()),
                Err(wait) => wait,
            };
            if let Some(deadline) = deadline {
                if now + wait > deadline {
                    let err = RateLimited::new_err(format!(
                        "rate limit {:?} ({}): retry in {:.3} s",
                        self.core.name(),
                        self.core.describe(),
                        wait as f64 / NANOS
                    ));
                    return Err(with_retry_after(py, err, wait as f64 / NANOS));
                }
            }
            self.clock.sleep(py, wait);
        }
    }

    /// Takes an in-flight slot if one is free (always true without `max_concurrency`).
    fn _try_slot(&self) -> bool {
        let Some(slots) = &self.slots else {
            return true;
        };
        let mut used = lock(&slots.used);
        if *used < slots.max {
            *used += 1;
            true
        } else {
            false
        }
    }

    /// Waits (GIL released) for an in-flight slot; False on timeout.
    #[pyo3(signature = (timeout = None))]
    fn _wait_slot(&self, py: Python<'_>, timeout: Option<f64>) -> bool {
        let Some(slots) = &self.slots else {
            return true;
        };
        py.detach(|| {
            let mut used = lock(&slots.used);
            let deadline = timeout.map(|t| {
                std::time::Instant::now() + std::time::Duration::from_secs_f64(t.max(0.0))
            });
            while *used >= slots.max {
                match deadline {
                    None => used = slots.freed.wait(used).unwrap_or_else(|p| p.into_inner()),
                    Some(d) => {
                        let left = d.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            return false;
                        }
                        used = slots
                            .freed
                            .wait_timeout(used, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
            *used += 1;
            true
        })
    }

    /// An asyncio future completed when a slot is released (then try `_try_slot` again).
    fn _slot_freed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pending = LoopFuture::new(py)?;
        let future = pending.future(py).clone();
        if let Some(slots) = &self.slots {
            lock(&slots.waiters).push_back(pending);
        }
        Ok(future)
    }

    /// A concurrency lease shared by every process using this limiter's name (with `url`
    /// and `max_concurrency`): its token, None when all are taken; "" when there is
    /// nothing to lease, or Redis cannot be asked and the limiter fails open.
    fn _lease(&self, py: Python<'_>) -> Option<String> {
        let Some((redis, key, max, token)) = self.lease_request() else {
            return Some(String::new());
        };
        let (ttl, asked) = (self.lease_ttl_ms, token.clone());
        let reply = wait(py, async move { redis.lease(key, max, ttl, asked).await });
        lease_token(self.core.lease_outcome(reply, token))
    }

    /// `_lease` as an awaitable. A cancelled wait gives back the lease the server may
    /// still take.
    fn _alease<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let Some((redis, key, max, token)) = self.lease_request() else {
            return ready(py, "");
        };
        let core = Arc::clone(&self.core);
        if redis.is_down() {
            return ready(
                py,
                lease_token(core.lease_outcome(Err(down(&redis)), token)),
            );
        }
        let ttl = self.lease_ttl_ms;
        let mut guard = LeaseGuard {
            armed: Some((Arc::clone(&redis), key.clone(), token.clone())),
        };
        let work = async move {
            let reply = redis.lease(key, max, ttl, token.clone()).await;
            guard.disarm();
            (reply, token)
        };
        spawn_for_asyncio(py, work, move |py, (reply, token)| {
            let value = lease_token(core.lease_outcome(reply, token));
            value.into_py_any(py)
        })
    }

    /// Gives back a shared lease ("" is no lease).
    fn _unlease(&self, py: Python<'_>, token: &str) {
        let Some(redis) = self.shared.clone().filter(|_| !token.is_empty()) else {
            return;
        };
        let (key, token) = (self.core.lease_key(), token.to_owned());
        // A lost release only keeps the lease until its TTL runs out.
        let _ = wait(py, async move { redis.unlease(key, token).await });
    }

    /// `_unlease` as an awaitable; the release goes through even if the wait is cancelled.
    fn _aunlease<'py>(&self, py: Python<'py>, token: &str) -> PyResult<Bound<'py, PyAny>> {
        let Some(redis) = reachable(&self.shared).filter(|_| !token.is_empty()) else {
            return ready(py, py.None());
        };
        let (key, token) = (self.core.lease_key(), token.to_owned());
        detached(py, async move {
            let _ = redis.unlease(key, token).await;
        })
    }

    /// Gives back an in-flight slot.
    fn release(&self, _py: Python<'_>) {
        let Some(slots) = &self.slots else { return };
        {
            let mut used = lock(&slots.used);
            *used = used.saturating_sub(1);
        }
        slots.freed.notify_one();
        // Wake every waiting task: they race for the slot and the losers wait again, so a
        // cancelled waiter can never swallow the wake-up.
        let waiters = std::mem::take(&mut *lock(&slots.waiters));
        for waiter in waiters {
            waiter.complete(|py| Ok(py.None()));
        }
    }

    /// Adaptive limits: a 429 (or 503) pauses everyone until `retry_after` seconds from
    /// now (else an exponential pause) and halves the rate; other statuses restore it by
    /// a tenth of the configured rate at a time.
    #[pyo3(signature = (status, retry_after = None))]
    fn feedback(&self, py: Python<'_>, status: Count, retry_after: Option<f64>) -> PyResult<()> {
        let status = http_status(status)?;
        if let Some((redis, key, ms)) = self.pause(py, status, retry_after)? {
            // Everyone sharing the limit pauses; a lost pause only costs a 429 more.
            let _ = wait(py, async move { redis.limit_pause(key, ms).await });
        }
        Ok(())
    }

    /// `feedback` as an awaitable; the shared pause goes through even if the wait is
    /// cancelled.
    #[pyo3(signature = (status, retry_after = None))]
    fn _afeedback<'py>(
        &self,
        py: Python<'py>,
        status: Count,
        retry_after: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let status = http_status(status)?;
        match self.pause(py, status, retry_after)? {
            Some((redis, key, ms)) if !redis.is_down() => detached(py, async move {
                let _ = redis.limit_pause(key, ms).await;
            }),
            _ => ready(py, py.None()),
        }
    }

    /// `(limit, remaining, reset_seconds)` of the window now, for RateLimit-* headers.
    #[pyo3(signature = (key = None))]
    fn window(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(u32, u32, f64)> {
        let (limit, remaining, reset) = self.core.window(self.clock.now_nanos(py)?, key);
        Ok((limit, remaining, reset as f64 / NANOS))
    }

    #[getter]
    fn name(&self) -> &str {
        self.core.name()
    }

    #[getter]
    fn rate(&self) -> String {
        self.core.describe()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let now = self.clock.now_nanos(py)?;
        let counts = self.core.counts();
        d.set_item("name", self.core.name())?;
        d.set_item("rate", self.core.describe())?;
        d.set_item("admitted", counts.admitted)?;
        d.set_item("refused", counts.refused)?;
        d.set_item("throttle_events", counts.throttle_events)?;
        d.set_item("rate_factor", counts.rate_factor)?;
        d.set_item("paused_for", self.core.paused_for(now) as f64 / NANOS)?;
        d.set_item("keys", counts.keys)?;
        d.set_item("in_flight", self.slots.as_ref().map(|s| *lock(&s.used)))?;
        d.set_item(
            "shared",
            self.shared.as_ref().map(|r| r.display_url.clone()),
        )?;
        d.set_item(
            "degraded",
            self.shared.as_ref().is_some_and(|r| r.is_down()),
        )?;
        d.set_item("admitted_unchecked", counts.admitted_unchecked)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "RateLimiter({:?}, name={:?})",
            self.core.describe(),
            self.core.name()
        )
    }
}

impl PyRateLimiter {
    /// Applies feedback in process; the pause to share through Redis, if any.
    fn pause(
        &self,
        py: Python<'_>,
        status: u16,
        retry_after: Option<f64>,
    ) -> PyResult<Option<(Arc<RedisStore>, String, i64)>> {
        let now = self.clock.now_nanos(py)?;
        let retry_after = retry_after
            .map(|s| seconds_to_nanos("retry_after", s))
            .transpose()?;
        let pause_ms = self.core.feedback(now, status, retry_after);
        Ok(pause_ms
            .zip(self.shared.clone())
            .map(|(ms, redis)| (redis, self.core.pause_key(), ms)))
    }
}

/// A Redis store for `url`, or None for in-process state.
fn shared_store(url: Option<&str>, what: &str) -> PyResult<Option<Arc<RedisStore>>> {
    let Some(url) = url.filter(|u| *u != "memory://") else {
        return Ok(None);
    };
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if !SCHEMES.contains(&scheme) {
        return Err(PyValueError::new_err(format!(
            "unsupported {what} URL {:?}: expected redis://, rediss://, valkey:// or valkeys://",
            crate::cache::redis::redact(url)
        )));
    }
    Ok(Some(RedisStore::new(RedisConfig {
        url: url.to_owned(),
        connect_timeout: std::time::Duration::from_millis(250),
        command_timeout: std::time::Duration::from_secs(1),
        tracking_prefix: None,
    })?))
}

/// Circuit breaker state; see `tenuto.CircuitBreaker`.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "CircuitBreakerCore")]
pub struct PyCircuitBreaker {
    circuit: Arc<Circuit>,
    clock: PyClock,
    /// Shared through Redis (state on the server's clock); the local state decides while
    /// Redis cannot be reached.
    shared: Option<Arc<RedisStore>>,
}

impl PyCircuitBreaker {
    /// Asking Redis for one step of the shared state; None without Redis or while it is
    /// down (the local state decides then, without waiting).
    fn ask(&self, step: Step, probe: bool) -> Option<impl Future<Output = Reply> + Send + 'static> {
        let redis = reachable(&self.shared)?;
        let (key, args) = self.circuit.shared_step(step, probe);
        Some(async move { redis.breaker_step(key, args).await.ok() })
    }

    /// One step, blocking (GIL released).
    fn reply(&self, py: Python<'_>, step: Step, probe: bool) -> Reply {
        self.ask(step, probe).and_then(|ask| wait(py, ask))
    }
}

/// Whether the call is a probe, or `CircuitOpen`.
fn permitted(py: Python<'_>, circuit: &Circuit, permit: Permit) -> PyResult<bool> {
    match permit {
        Permit::Allowed { probe } => Ok(probe),
        Permit::Refused { retry_after_ns } => {
            let seconds = retry_after_ns as f64 / NANOS;
            let err = CircuitOpen::new_err(format!(
                "circuit {:?} is open; retry in {seconds:.3} s",
                circuit.name()
            ));
            Err(with_retry_after(py, err, seconds))
        }
    }
}

#[pymethods]
impl PyCircuitBreaker {
    #[new]
    #[pyo3(signature = (
        failures = Count(5), reset_after = 30.0, half_open_max = Count(1), name = None, *,
        failure_rate = None, window = 60.0, min_calls = Count(10), url = None, clock = None
    ),
    text_signature = "(failures=5, reset_after=30.0, half_open_max=1, name=None, *, failure_rate=None, window=60.0, min_calls=10, url=None, clock=None)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        failures: Count,
        reset_after: f64,
        half_open_max: Count,
        name: Option<&str>,
        failure_rate: Option<f64>,
        window: f64,
        min_calls: Count,
        url: Option<&str>,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let shared = shared_store(url, "breaker")?;
        let (failures, half_open_max, min_calls) = (failures.0, half_open_max.0, min_calls.0);
        for (what, n) in [("failures", failures), ("half_open_max", half_open_max)] {
            if !(1..=i64::from(u32::MAX)).contains(&n) {
                return Err(PyValueError::new_err(format!(
                    "{what} must be between 1 and {}, got {n}",
                    u32::MAX
                )));
            }
        }
        let reset_after_ns = seconds_to_nanos("reset_after", reset_after)?;
        let mut breaker = Breaker::new(failures as u32, reset_after_ns, half_open_max as u32);
        if let Some(rate) = failure_rate {
            let calls_ok = (1..=i64::from(u32::MAX)).contains(&min_calls);
            if !(rate > 0.0 && rate <= 1.0 && calls_ok) {
                return Err(PyValueError::new_err(
                    "failure_rate must be in (0, 1] and min_calls at least 1",
                ));
            }
            let window_ns = seconds_to_nanos("window", window)?.max(1);
            let min_calls = min_calls as u32;
            breaker = breaker.with_failure_rate(FailureRate {
                rate,
                window_ns,
                min_calls,
            });
        }
        Ok(Self {
            circuit: Arc::new(Circuit::new(name.unwrap_or("default"), breaker)),
            clock: PyClock::from_arg(clock)?,
            shared,
        })
    }

    /// Asks to make a call: returns whether it is a probe, or raises `CircuitOpen`.
    fn _permit(&self, py: Python<'_>) -> PyResult<bool> {
        let now = self.clock.now_nanos(py)?;
        let reply = self.reply(py, Step::Permit, false);
        permitted(py, &self.circuit, self.circuit.permit(now, reply))
    }

    /// `_permit` as an awaitable (in process it raises at once).
    fn _apermit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let now = self.clock.now_nanos(py)?;
        let Some(ask) = self.ask(Step::Permit, false) else {
            return ready(
                py,
                permitted(py, &self.circuit, self.circuit.permit(now, None))?,
            );
        };
        let circuit = Arc::clone(&self.circuit);
        spawn_for_asyncio(py, ask, move |py, reply| {
            let probe = permitted(py, &circuit, circuit.permit(now, reply))?;
            probe.into_py_any(py)
        })
    }

    fn _success(&self, py: Python<'_>, probe: bool) -> PyResult<()> {
        let now = self.clock.now_nanos(py)?;
        self.reply(py, Step::Success, probe);
        self.circuit.success(now, probe);
        Ok(())
    }

    /// `_success` as an awaitable; the report goes through even if the wait is cancelled.
    fn _asuccess<'py>(&self, py: Python<'py>, probe: bool) -> PyResult<Bound<'py, PyAny>> {
        let now = self.clock.now_nanos(py)?;
        self.circuit.success(now, probe);
        match self.ask(Step::Success, probe) {
            Some(ask) => detached(py, async move {
                ask.await;
            }),
            None => ready(py, py.None()),
        }
    }

    fn _failure(&self, py: Python<'_>, probe: bool) -> PyResult<()> {
        let now = self.clock.now_nanos(py)?;
        let reply = self.reply(py, Step::Failure, probe);
        self.circuit.failure(now, probe, reply);
        Ok(())
    }

    /// `_failure` as an awaitable; the report goes through even if the wait is cancelled.
    fn _afailure<'py>(&self, py: Python<'py>, probe: bool) -> PyResult<Bound<'py, PyAny>> {
        let now = self.clock.now_nanos(py)?;
        let Some(ask) = self.ask(Step::Failure, probe) else {
            self.circuit.failure(now, probe, None);
            return ready(py, py.None());
        };
        let circuit = Arc::clone(&self.circuit);
        detached(py, async move {
            circuit.failure(now, probe, ask.await);
        })
    }

    /// "closed", "open" or "half_open".
    #[getter]
    fn state(&self, py: Python<'_>) -> PyResult<&'static str> {
        let now = self.clock.now_nanos(py)?;
        let reply = self.reply(py, Step::State, false);
        Ok(match self.circuit.state(now, reply) {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.circuit.name()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let counts = self.circuit.counts();
        d.set_item("name", self.circuit.name())?;
        d.set_item("state", self.state(py)?)?;
        d.set_item("calls", counts.calls)?;
        d.set_item("failures", counts.failures)?;
        d.set_item("refused", counts.refused)?;
        d.set_item("opened", counts.opened)?;
        Ok(d)
    }
}
