//! `RateLimiterCore` and `CircuitBreakerCore`: in-process limits over the pure cores, on
//! the object's clock. `tenuto.RateLimiter` / `tenuto.CircuitBreaker` (Python) add the
//! context managers and decorators.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use std::sync::Arc;

use super::breaker::{Breaker, BreakerState, FailureRate, Permit};
use super::{Admission, Rate};
use crate::cache::redis::{RedisConfig, RedisStore, SharedDecision, StoreError, SCHEMES};
use crate::clock::py::PyClock;
use crate::error::py::TenutoError;
use crate::runtime::py::{get_running_loop, resolve_soon};

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn with_retry_after(py: Python<'_>, err: PyErr, seconds: f64) -> PyErr {
    let _ = err.value(py).setattr("retry_after", seconds);
    err
}

fn seconds_to_nanos(name: &str, seconds: f64) -> PyResult<i64> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a non-negative number of seconds, got {seconds}"
        )));
    }
    Ok((seconds * NANOS).round() as i64)
}

#[derive(Clone, Copy)]
enum Mode {
    Outbound { min_interval_ns: i64, burst: u32 },
    Inbound,
}

struct Limits {
    global: Admission,
    per_key: HashMap<String, (Admission, i64)>,
    /// Adaptive share of the configured rate (1.0 = all of it).
    factor: f64,
    /// Consecutive 429s, for the exponential pause when no Retry-After is given.
    throttled: u32,
}

/// In-flight slots shared by threads (condvar) and asyncio tasks (futures woken on release).
struct Slots {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
    waiters: Mutex<VecDeque<(Py<PyAny>, Py<PyAny>)>>,
}

/// Rate limit state and rules; see `tenuto.RateLimiter`.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "RateLimiterCore")]
pub struct PyRateLimiter {
    rate: Rate,
    mode: Mode,
    name: String,
    max_keys: usize,
    clock: PyClock,
    limits: Mutex<Limits>,
    paused_until: AtomicI64,
    slots: Option<Slots>,
    admitted: AtomicU64,
    refused: AtomicU64,
    throttle_events: AtomicU64,
    /// Shared through Redis: every process and host using the same `name` and URL.
    shared: Option<Arc<RedisStore>>,
    fail_open: bool,
    admitted_unchecked: AtomicU64,
    lease_ttl_ms: i64,
}

impl PyRateLimiter {
    fn shared_keys(&self, key: Option<&str>) -> [String; 3] {
        let base = match key {
            None => format!("tenuto:limit:{}", self.name),
            Some(k) => format!("tenuto:limit:{}:{k}", self.name),
        };
        [
            format!("{base}:log"),
            format!("{base}:tat"),
            format!("tenuto:limit:{}:pause", self.name),
        ]
    }

    /// One attempt against the shared (Redis) limit, GIL released. Redis down: admit when
    /// failing open (counted), else refuse for a second.
    fn attempt_shared(
        &self,
        py: Python<'_>,
        redis: &Arc<RedisStore>,
        key: Option<&str>,
    ) -> Result<(), i64> {
        self.attempt_shared_at(py, redis, key).0
    }

    /// Also returns what Redis said (None when it did not answer).
    fn attempt_shared_at(
        &self,
        py: Python<'_>,
        redis: &Arc<RedisStore>,
        key: Option<&str>,
    ) -> (Result<(), i64>, Option<SharedDecision>) {
        let factor = lock(&self.limits).factor;
        let count = ((f64::from(self.rate.count) * factor).floor() as i64).max(1);
        let period_us = self.rate.period_ns / 1000;
        let (interval_us, tolerance_us) = match self.mode {
            Mode::Outbound {
                min_interval_ns,
                burst,
            } => {
                let interval =
                    (self.rate.interval_ns().max(min_interval_ns) as f64 / factor / 1000.0).round()
                        as i64;
                (interval.max(1), interval.max(1) * i64::from(burst - 1))
            }
            Mode::Inbound => (0, 0),
        };
        let keys = self.shared_keys(key);
        let member = crate::runtime::unique_token();
        let redis = Arc::clone(redis);
        let result = py.detach(move || {
            crate::runtime::block_on(redis.limit_attempt(
                keys,
                [count, period_us, interval_us, tolerance_us],
                member,
            ))
        });
        let decision = result.as_ref().ok().copied();
        let outcome = match result {
            Ok(d) if d.admitted => Ok(()),
            Ok(d) => Err(d.wait_us.max(1) * 1000),
            Err(StoreError::Unavailable(_)) | Err(StoreError::Command(_)) if self.fail_open => {
                self.admitted_unchecked.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => Err(1_000_000_000),
        };
        let counter = if outcome.is_ok() {
            &self.admitted
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (outcome, decision)
    }

    /// `(limit, remaining, ns until a slot frees)` of the in-process window.
    fn local_window(&self, now: i64, key: Option<&str>) -> (u32, u32, i64) {
        let limits = lock(&self.limits);
        match key {
            None => limits.global.window(now),
            Some(k) => limits
                .per_key
                .get(k)
                .map_or((self.rate.count, self.rate.count, 0), |(a, _)| {
                    a.window(now)
                }),
        }
    }

    /// An attempt by the right rule set: shared when a URL was given, else in process.
    fn attempt_any(&self, py: Python<'_>, key: Option<&str>) -> PyResult<Result<(), i64>> {
        match &self.shared {
            Some(redis) => Ok(self.attempt_shared(py, redis, key)),
            None => Ok(self.attempt(self.clock.now_nanos(py)?, key)),
        }
    }
    fn fresh(&self) -> Admission {
        match self.mode {
            Mode::Outbound {
                min_interval_ns,
                burst,
            } => Admission::outbound(self.rate, min_interval_ns, burst),
            Mode::Inbound => Admission::inbound(self.rate),
        }
    }

    fn min_interval(&self) -> i64 {
        match self.mode {
            Mode::Outbound {
                min_interval_ns, ..
            } => min_interval_ns,
            Mode::Inbound => 0,
        }
    }

    /// One admission attempt at `now`: Ok, or nanoseconds to wait.
    fn attempt(&self, now: i64, key: Option<&str>) -> Result<(), i64> {
        let paused = self.paused_until.load(Ordering::Acquire);
        if now < paused {
            return Err(paused - now);
        }
        let mut limits = lock(&self.limits);
        let factor = limits.factor;
        let result = match key {
            None => limits.global.try_admit(now),
            Some(key) => {
                if !limits.per_key.contains_key(key) && limits.per_key.len() >= self.max_keys {
                    // Bounded memory: forget keys idle for a whole period, else the oldest half.
                    let period = self.rate.period_ns;
                    limits.per_key.retain(|_, (_, last)| *last + period > now);
                    if limits.per_key.len() >= self.max_keys {
                        let mut ages: Vec<i64> =
                            limits.per_key.values().map(|(_, last)| *last).collect();
                        ages.sort_unstable();
                        let cutoff = ages[ages.len() / 2];
                        limits.per_key.retain(|_, (_, last)| *last > cutoff);
                    }
                }
                let fresh = || {
                    let mut a = self.fresh();
                    a.scale(self.rate, self.min_interval(), factor);
                    (a, now)
                };
                let entry = limits.per_key.entry(key.to_owned()).or_insert_with(fresh);
                entry.1 = now;
                entry.0.try_admit(now)
            }
        };
        drop(limits);
        let counter = if result.is_ok() {
            &self.admitted
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn rescale(&self, limits: &mut Limits, factor: f64) {
        limits.factor = factor;
        let (rate, min_interval) = (self.rate, self.min_interval());
        limits.global.scale(rate, min_interval, factor);
        for (admission, _) in limits.per_key.values_mut() {
            admission.scale(rate, min_interval, factor);
        }
    }
}

#[pymethods]
impl PyRateLimiter {
    #[new]
    #[pyo3(signature = (
        rate, min_interval = None, max_concurrency = None, burst = None, url = None,
        name = "default", fail_open = true, *, mode = "outbound", max_keys = 100_000, clock = None,
        lease_ttl = 300.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        rate: &Bound<'_, PyAny>,
        min_interval: Option<f64>,
        max_concurrency: Option<i64>,
        burst: Option<i64>,
        url: Option<&str>,
        name: &str,
        fail_open: bool,
        mode: &str,
        max_keys: i64,
        clock: Option<&Bound<'_, PyAny>>,
        lease_ttl: f64,
    ) -> PyResult<Self> {
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
        let mut limiter = Self {
            rate,
            mode,
            name: name.to_owned(),
            max_keys: max_keys as usize,
            clock: PyClock::from_arg(clock)?,
            limits: Mutex::new(Limits {
                global: Admission::inbound(rate),
                per_key: HashMap::new(),
                factor: 1.0,
                throttled: 0,
            }),
            paused_until: AtomicI64::new(i64::MIN),
            slots,
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            throttle_events: AtomicU64::new(0),
            shared,
            fail_open,
            admitted_unchecked: AtomicU64::new(0),
            lease_ttl_ms: (seconds_to_nanos("lease_ttl", lease_ttl)? / 1_000_000).max(1),
        };
        limiter
            .limits
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .global = limiter.fresh();
        Ok(limiter)
    }

    /// `(admitted, retry_after_seconds)`, never waiting. `key` limits per client.
    #[pyo3(signature = (key = None))]
    fn try_acquire(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(bool, f64)> {
        Ok(match self.attempt_any(py, key)? {
            Ok(()) => (true, 0.0),
            Err(wait) => (false, wait as f64 / NANOS),
        })
    }

    /// `try_acquire` plus the decision time in epoch seconds (the Redis server's clock for
    /// a shared limit): for measuring accuracy without client-side skew.
    #[pyo3(signature = (key = None))]
    fn _try_acquire_at(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(bool, f64, f64)> {
        let (outcome, at) = match &self.shared {
            Some(redis) => {
                let (outcome, decision) = self.attempt_shared_at(py, redis, key);
                (
                    outcome,
                    decision.map_or(0, |d| d.now_us.saturating_mul(1000)),
                )
            }
            None => {
                let now = self.clock.now_nanos(py)?;
                (self.attempt(now, key), now)
            }
        };
        Ok(match outcome {
            Ok(()) => (true, 0.0, at as f64 / NANOS),
            Err(wait) => (false, wait as f64 / NANOS, at as f64 / NANOS),
        })
    }

    /// One attempt with what RateLimit-* headers need, from the same decision:
    /// `(admitted, retry_after, limit, remaining, reset_seconds)`.
    #[pyo3(signature = (key = None))]
    fn decide(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(bool, f64, u32, u32, f64)> {
        let limit = self.rate.count;
        let (outcome, remaining, reset_ns) = match &self.shared {
            Some(redis) => {
                let (outcome, decision) = self.attempt_shared_at(py, redis, key);
                let (remaining, reset) = decision.map_or((0, 0), |d| {
                    (limit.saturating_sub(d.used), d.reset_us * 1000)
                });
                (outcome, remaining, reset)
            }
            None => {
                let now = self.clock.now_nanos(py)?;
                let outcome = self.attempt(now, key);
                let (_, remaining, reset) = self.local_window(now, key);
                (outcome, remaining, reset)
            }
        };
        let admitted = outcome.is_ok();
        let retry_after = outcome.err().map_or(0.0, |w| w as f64 / NANOS);
        Ok((
            admitted,
            retry_after,
            limit,
            remaining,
            reset_ns as f64 / NANOS,
        ))
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
                        self.name,
                        self.describe(),
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
        let event_loop = get_running_loop(py)?;
        let future = event_loop.call_method0("create_future")?;
        if let Some(slots) = &self.slots {
            lock(&slots.waiters).push_back((event_loop.unbind(), future.clone().unbind()));
        }
        Ok(future)
    }

    /// A concurrency lease shared by every process using this limiter's name (with `url`
    /// and `max_concurrency`): its token, None when all are taken; "" when there is
    /// nothing to lease, or Redis cannot be asked and the limiter fails open.
    fn _lease(&self, py: Python<'_>) -> Option<String> {
        let (Some(redis), Some(slots)) = (self.shared.clone(), &self.slots) else {
            return Some(String::new());
        };
        let key = format!("tenuto:limit:{}:leases", self.name);
        let token = crate::runtime::unique_token();
        let (max, ttl, lease_token) = (slots.max as i64, self.lease_ttl_ms, token.clone());
        match py.detach(move || crate::runtime::block_on(redis.lease(key, max, ttl, lease_token))) {
            Ok(true) => Some(token),
            Ok(false) => None,
            Err(_) if self.fail_open => Some(String::new()),
            Err(_) => None,
        }
    }

    /// Gives back a shared lease ("" is no lease).
    fn _unlease(&self, py: Python<'_>, token: &str) {
        let Some(redis) = self.shared.clone().filter(|_| !token.is_empty()) else {
            return;
        };
        let (key, token) = (
            format!("tenuto:limit:{}:leases", self.name),
            token.to_owned(),
        );
        // A lost release only keeps the lease until its TTL runs out.
        let _ = py.detach(move || crate::runtime::block_on(redis.unlease(key, token)));
    }

    /// Gives back an in-flight slot.
    fn release(&self, py: Python<'_>) {
        let Some(slots) = &self.slots else { return };
        {
            let mut used = lock(&slots.used);
            *used = used.saturating_sub(1);
        }
        slots.freed.notify_one();
        // Wake every waiting task: they race for the slot and the losers wait again, so a
        // cancelled waiter can never swallow the wake-up.
        let waiters = std::mem::take(&mut *lock(&slots.waiters));
        for (event_loop, future) in waiters {
            resolve_soon(
                event_loop.bind(py),
                future.bind(py),
                true,
                py.None().into_bound(py),
            );
        }
    }

    /// Adaptive limits: a 429 (or 503) pauses everyone until `retry_after` seconds from
    /// now (else an exponential pause) and halves the rate; other statuses restore it by
    /// a tenth of the configured rate at a time.
    #[pyo3(signature = (status, retry_after = None))]
    fn feedback(&self, py: Python<'_>, status: u16, retry_after: Option<f64>) -> PyResult<()> {
        let now = self.clock.now_nanos(py)?;
        let retry_after = retry_after
            .map(|s| seconds_to_nanos("retry_after", s))
            .transpose()?;
        let pause = {
            let mut limits = lock(&self.limits);
            if status == 429 || status == 503 {
                limits.throttled += 1;
                let backoff = self
                    .rate
                    .interval_ns()
                    .saturating_mul(1 << limits.throttled.min(16));
                let pause = retry_after.unwrap_or(backoff.min(self.rate.period_ns));
                let factor = (limits.factor * 0.5).max(0.05);
                self.rescale(&mut limits, factor);
                Some(pause)
            } else {
                if (200..400).contains(&status) {
                    limits.throttled = 0;
                    if limits.factor < 1.0 {
                        // Rounded to hundredths, so ten steps of 0.1 land on exactly 1.0.
                        let factor = (((limits.factor + 0.1) * 100.0).round() / 100.0).min(1.0);
                        self.rescale(&mut limits, factor);
                    }
                }
                None
            }
        };
        // The lock is released: waiting on Redis while holding it could deadlock with a
        // thread that holds the GIL and wants it.
        if let Some(pause) = pause {
            self.throttle_events.fetch_add(1, Ordering::Relaxed);
            self.paused_until.fetch_max(now + pause, Ordering::AcqRel);
            if let Some(redis) = self.shared.clone() {
                // Everyone sharing the limit pauses; a lost pause only costs a 429 more.
                let key = self.shared_keys(None)[2].clone();
                let ms = (pause / 1_000_000).max(1);
                let _ = py.detach(move || crate::runtime::block_on(redis.limit_pause(key, ms)));
            }
        }
        Ok(())
    }

    /// `(limit, remaining, reset_seconds)` of the window now, for RateLimit-* headers.
    #[pyo3(signature = (key = None))]
    fn window(&self, py: Python<'_>, key: Option<&str>) -> PyResult<(u32, u32, f64)> {
        let (limit, remaining, reset) = self.local_window(self.clock.now_nanos(py)?, key);
        Ok((limit, remaining, reset as f64 / NANOS))
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    #[getter]
    fn rate(&self) -> String {
        self.describe()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let now = self.clock.now_nanos(py)?;
        let limits = lock(&self.limits);
        d.set_item("name", &self.name)?;
        d.set_item("rate", self.describe())?;
        d.set_item("admitted", self.admitted.load(Ordering::Relaxed))?;
        d.set_item("refused", self.refused.load(Ordering::Relaxed))?;
        d.set_item(
            "throttle_events",
            self.throttle_events.load(Ordering::Relaxed),
        )?;
        d.set_item("rate_factor", limits.factor)?;
        d.set_item(
            "paused_for",
            ((self.paused_until.load(Ordering::Acquire) - now).max(0)) as f64 / NANOS,
        )?;
        d.set_item("keys", limits.per_key.len())?;
        d.set_item("in_flight", self.slots.as_ref().map(|s| *lock(&s.used)))?;
        d.set_item(
            "shared",
            self.shared.as_ref().map(|r| r.display_url.clone()),
        )?;
        d.set_item(
            "degraded",
            self.shared.as_ref().is_some_and(|r| r.is_down()),
        )?;
        d.set_item(
            "admitted_unchecked",
            self.admitted_unchecked.load(Ordering::Relaxed),
        )?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("RateLimiter({:?}, name={:?})", self.describe(), self.name)
    }
}

impl PyRateLimiter {
    fn describe(&self) -> String {
        format!(
            "{}/{}s",
            self.rate.count,
            self.rate.period_ns as f64 / NANOS
        )
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
    })?))
}

impl PyCircuitBreaker {
    /// One step of the shared state, GIL released; None without Redis or when it cannot
    /// be reached (the local state decides then).
    fn shared_step(&self, py: Python<'_>, op: &str, probe: bool) -> Option<(i64, i64)> {
        let redis = self.shared.clone().filter(|r| !r.is_down())?;
        let (failures, reset_ms, half_open_max) = self.settings;
        let key = format!("tenuto:breaker:{}", self.name);
        let args = [
            op.to_owned(),
            failures.to_string(),
            reset_ms.to_string(),
            half_open_max.to_string(),
            u8::from(probe).to_string(),
        ];
        py.detach(move || crate::runtime::block_on(redis.breaker_step(key, args)))
            .ok()
    }
}

/// Circuit breaker state; see `tenuto.CircuitBreaker`.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "CircuitBreakerCore")]
pub struct PyCircuitBreaker {
    name: String,
    clock: PyClock,
    core: Mutex<Breaker>,
    /// Shared through Redis (state on the server's clock); the local `core` decides
    /// while Redis cannot be reached.
    shared: Option<Arc<RedisStore>>,
    settings: (u32, i64, u32),
    calls: AtomicU64,
    failures: AtomicU64,
    refused: AtomicU64,
    opened: AtomicU64,
}

#[pymethods]
impl PyCircuitBreaker {
    #[new]
    #[pyo3(signature = (
        failures = 5, reset_after = 30.0, half_open_max = 1, name = None, *, failure_rate = None,
        window = 60.0, min_calls = 10, url = None, clock = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        failures: i64,
        reset_after: f64,
        half_open_max: i64,
        name: Option<&str>,
        failure_rate: Option<f64>,
        window: f64,
        min_calls: i64,
        url: Option<&str>,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let shared = shared_store(url, "breaker")?;
        if failures < 1 || half_open_max < 1 {
            return Err(PyValueError::new_err(
                "failures and half_open_max must be at least 1",
            ));
        }
        let reset_after_ns = seconds_to_nanos("reset_after", reset_after)?;
        let mut breaker = Breaker::new(failures as u32, reset_after_ns, half_open_max as u32);
        if let Some(rate) = failure_rate {
            if !(rate > 0.0 && rate <= 1.0) || min_calls < 1 {
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
            name: name.unwrap_or("default").to_owned(),
            clock: PyClock::from_arg(clock)?,
            core: Mutex::new(breaker),
            shared,
            settings: (
                failures as u32,
                reset_after_ns / 1_000_000,
                half_open_max as u32,
            ),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        })
    }

    /// Asks to make a call: returns whether it is a probe, or raises `CircuitOpen`.
    fn _permit(&self, py: Python<'_>) -> PyResult<bool> {
        let now = self.clock.now_nanos(py)?;
        let permit = match self.shared_step(py, "permit", false) {
            Some((0, wait_ms)) => Permit::Refused {
                retry_after_ns: wait_ms * 1_000_000,
            },
            Some((verdict, _)) => Permit::Allowed {
                probe: verdict == 2,
            },
            None => lock(&self.core).permit(now),
        };
        match permit {
            Permit::Allowed { probe } => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                Ok(probe)
            }
            Permit::Refused { retry_after_ns } => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let seconds = retry_after_ns as f64 / NANOS;
                let err = CircuitOpen::new_err(format!(
                    "circuit {:?} is open; retry in {seconds:.3} s",
                    self.name
                ));
                Err(with_retry_after(py, err, seconds))
            }
        }
    }

    fn _success(&self, py: Python<'_>, probe: bool) -> PyResult<()> {
        let now = self.clock.now_nanos(py)?;
        self.shared_step(py, "success", probe);
        lock(&self.core).record_success(now, probe);
        Ok(())
    }

    fn _failure(&self, py: Python<'_>, probe: bool) -> PyResult<()> {
        let now = self.clock.now_nanos(py)?;
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Some((open, _)) = self.shared_step(py, "failure", probe) {
            if open == 1 {
                self.opened.fetch_add(u64::from(!probe), Ordering::Relaxed);
            }
            return Ok(());
        }
        let mut core = lock(&self.core);
        let was_open = core.state(now) != BreakerState::Closed;
        core.record_failure(now, probe);
        if !was_open && core.state(now) == BreakerState::Open {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// "closed", "open" or "half_open".
    #[getter]
    fn state(&self, py: Python<'_>) -> PyResult<&'static str> {
        let now = self.clock.now_nanos(py)?;
        let state = match self.shared_step(py, "state", false) {
            Some((0, _)) => BreakerState::Closed,
            Some((1, _)) => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
            None => lock(&self.core).state(now),
        };
        Ok(match state {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("name", &self.name)?;
        d.set_item("state", self.state(py)?)?;
        d.set_item("calls", self.calls.load(Ordering::Relaxed))?;
        d.set_item("failures", self.failures.load(Ordering::Relaxed))?;
        d.set_item("refused", self.refused.load(Ordering::Relaxed))?;
        d.set_item("opened", self.opened.load(Ordering::Relaxed))?;
        Ok(d)
    }
}
