//! `tenuto.Cache`, `tenuto.Envelope`, `tenuto.Lookup`: thin bindings over the stores.
//!
//! Every operation is split the same way so sync and async share one code path: validate
//! and encode with the GIL, run the Redis I/O without it (blocking for sync calls, on the
//! runtime for async ones), then finish with the GIL (decode, fall back, count).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyString};

use super::memory::{Entry, MemoryStore};
use super::redis::{glob_escape, RedisConfig, RedisStore, StoreError, SCHEMES};
use super::{Counters, State, Times, TtlPolicy};
use crate::clock::py::PyClock;
use crate::codec::py::{from_json, to_json, PAYLOAD};
use crate::codec::{decode_envelope, encode_envelope};
use crate::error::py::{BackendError, BackendUnavailable};
use crate::graveyard::{release_pending, Deferred};
use crate::runtime::{self, py::spawn_for_asyncio, py::Ready};

/// One cached value with its times (integer epoch seconds, bounds inclusive).
#[pyclass(frozen, module = "tenuto._core", name = "Envelope")]
pub struct PyEnvelope {
    payload: Py<PyAny>,
    times: Times,
}

impl PyEnvelope {
    pub(crate) fn payload_ref(&self, py: Python<'_>) -> Py<PyAny> {
        self.payload.clone_ref(py)
    }
}

#[pymethods]
impl PyEnvelope {
    #[new]
    fn new(
        payload: Py<PyAny>,
        fetched_at: i64,
        fresh_until: i64,
        stale_until: i64,
    ) -> PyResult<Self> {
        if !(fetched_at <= fresh_until && fresh_until <= stale_until) {
            return Err(PyValueError::new_err(
                "envelope times must satisfy fetched_at <= fresh_until <= stale_until",
            ));
        }
        Ok(Self {
            payload,
            times: Times {
                fetched_at,
                fresh_until,
                stale_until,
            },
        })
    }

    #[getter]
    fn payload(&self, py: Python<'_>) -> Py<PyAny> {
        self.payload.clone_ref(py)
    }

    #[getter]
    fn fetched_at(&self) -> i64 {
        self.times.fetched_at
    }

    #[getter]
    fn fresh_until(&self) -> i64 {
        self.times.fresh_until
    }

    #[getter]
    fn stale_until(&self) -> i64 {
        self.times.stale_until
    }

    /// `"hit"`, `"stale"` or `"miss"` at epoch second `now`.
    fn state<'py>(&self, py: Python<'py>, now: i64) -> Bound<'py, PyString> {
        state_str(py, self.times.state(now))
    }

    /// The wire form's fields as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("payload", &self.payload)?;
        d.set_item("fetched_at", self.times.fetched_at)?;
        d.set_item("fresh_until", self.times.fresh_until)?;
        d.set_item("stale_until", self.times.stale_until)?;
        Ok(d)
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<PyEnvelope>() {
            Ok(other) => {
                let other = other.get();
                Ok(self.times == other.times && self.payload.bind(py).eq(&other.payload)?)
            }
            Err(_) => Ok(false),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Envelope(payload={}, fetched_at={}, fresh_until={}, stale_until={})",
            self.payload.bind(py).repr()?,
            self.times.fetched_at,
            self.times.fresh_until,
            self.times.stale_until
        ))
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.payload)
    }
}

fn state_str(py: Python<'_>, state: State) -> Bound<'_, PyString> {
    match state {
        State::Hit => intern!(py, "hit").clone(),
        State::Stale => intern!(py, "stale").clone(),
        State::Miss => intern!(py, "miss").clone(),
    }
}

/// The answer to a lookup: `state` is `"hit"`, `"stale"` or `"miss"`; `value` is the
/// payload (None on a miss); `envelope` the whole entry (None on a miss).
#[pyclass(frozen, module = "tenuto._core", name = "Lookup")]
pub struct PyLookup {
    pub(crate) state: State,
    pub(crate) envelope: Option<Py<PyEnvelope>>,
    pub(crate) stale_fallback: bool,
}

impl PyLookup {
    fn miss() -> Self {
        Self {
            state: State::Miss,
            envelope: None,
            stale_fallback: false,
        }
    }
}

#[pymethods]
impl PyLookup {
    /// A lookup result, e.g. for a value served by a decorator (`stale_fallback=True`
    /// when a stale value was served because the fetch failed).
    #[new]
    #[pyo3(signature = (state, envelope = None, stale_fallback = false))]
    fn new(state: &str, envelope: Option<Py<PyEnvelope>>, stale_fallback: bool) -> PyResult<Self> {
        let state = match state {
            "hit" => State::Hit,
            "stale" => State::Stale,
            "miss" => State::Miss,
            other => {
                return Err(PyValueError::new_err(format!(
                    "state must be \"hit\", \"stale\" or \"miss\", got {other:?}"
                )))
            }
        };
        Ok(Self {
            state,
            envelope,
            stale_fallback,
        })
    }

    #[getter]
    fn state<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        state_str(py, self.state)
    }

    #[getter]
    fn value(&self, py: Python<'_>) -> Py<PyAny> {
        match &self.envelope {
            Some(env) => env.get().payload.clone_ref(py),
            None => py.None(),
        }
    }

    #[getter]
    fn envelope(&self, py: Python<'_>) -> Option<Py<PyEnvelope>> {
        self.envelope.as_ref().map(|e| e.clone_ref(py))
    }

    /// True when a stale value was served because fetching a fresh one failed.
    #[getter]
    fn stale_fallback(&self) -> bool {
        self.stale_fallback
    }

    #[getter]
    fn hit(&self) -> bool {
        self.state == State::Hit
    }

    /// A value is there to serve (fresh or stale).
    fn __bool__(&self) -> bool {
        self.state != State::Miss
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Lookup(state={:?}, value={})",
            self.state.as_str(),
            self.value(py).bind(py).repr()?
        ))
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if let Some(env) = &self.envelope {
            visit.call(env)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Serializer {
    Json,
    Pickle,
}

pub(crate) type Stored = Deferred<PyEnvelope>;

pub struct CacheCore {
    namespace: String,
    url: String,
    policy: TtlPolicy,
    pub(crate) clock: PyClock,
    pub(crate) memory: MemoryStore<Stored>,
    pub(crate) redis: Option<Arc<RedisStore>>,
    serializer: Serializer,
    max_value_bytes: usize,
    fail_open: bool,
    pub(crate) counters: Counters,
}

/// Counts a hit served without a `Lookup` (the decorator's fast path).
pub(crate) fn count_hit(core: &CacheCore) {
    core.counters.count_state(State::Hit);
}

fn key_str<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    match key.cast::<PyString>() {
        Ok(s) => Ok(s.to_str()?),
        Err(_) => Err(PyTypeError::new_err(format!(
            "cache keys must be str, not {}",
            key.get_type().name()?
        ))),
    }
}

fn seconds_arg(name: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if value.cast::<PyBool>().is_ok() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a number of seconds, not bool"
        )));
    }
    let seconds = value.extract::<f64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a number of seconds, not {}",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(super::check_ttl(name, seconds)?)
}

fn pickle_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static PICKLE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    PICKLE
        .get_or_try_init(py, || Ok::<_, PyErr>(py.import("pickle")?.unbind()))
        .map(|m| m.bind(py))
}

/// What a write sends to Redis: the key, the wire bytes, and the key's TTL.
type WireItem = (String, Vec<u8>, u64);

impl CacheCore {
    pub(crate) fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.namespace.len() + 1 + key.len());
        k.push_str(&self.namespace);
        k.push(':');
        k.push_str(key);
        k
    }

    /// The Redis store to use now, or None to use memory. A store marked down is skipped
    /// without waiting (or raises, when the cache does not fail open).
    pub(crate) fn route(&self) -> PyResult<Option<Arc<RedisStore>>> {
        match &self.redis {
            None => Ok(None),
            Some(redis) if redis.is_down() => {
                Counters::bump(&self.counters.backend_errors);
                if self.fail_open {
                    Ok(None)
                } else {
                    Err(BackendUnavailable::new_err(format!(
                        "Redis at {} is unavailable: {}",
                        redis.display_url,
                        redis.last_error()
                    )))
                }
            }
            Some(redis) => Ok(Some(Arc::clone(redis))),
        }
    }

    /// Counts a failed Redis call; raises unless the cache fails open.
    pub(crate) fn absorb(&self, err: StoreError) -> PyResult<()> {
        Counters::bump(&self.counters.backend_errors);
        if self.fail_open {
            if let StoreError::Command(msg) = &err {
                log::warn!(target: "tenuto::cache", "Redis command failed: {msg}; serving from memory");
            }
            return Ok(());
        }
        Err(match err {
            StoreError::Unavailable(msg) => BackendUnavailable::new_err(msg),
            StoreError::Command(msg) => BackendError::new_err(msg),
        })
    }

    fn lookup_of(
        &self,
        py: Python<'_>,
        envelope: Py<PyEnvelope>,
        times: Times,
        count: bool,
    ) -> PyResult<PyLookup> {
        let state = times.state(self.clock.now_secs(py)?);
        if count {
            self.counters.count_state(state);
        }
        Ok(if state == State::Miss {
            PyLookup::miss()
        } else {
            PyLookup {
                state,
                envelope: Some(envelope),
                stale_fallback: false,
            }
        })
    }

    fn memory_lookup(&self, py: Python<'_>, key: &str, count: bool) -> PyResult<PyLookup> {
        let found = self.memory.get(key);
        let lookup = match found {
            Some(entry) => self.lookup_of(py, entry.value.get().clone_ref(py), entry.times, count),
            None => {
                if count {
                    self.counters.count_state(State::Miss);
                }
                Ok(PyLookup::miss())
            }
        };
        release_pending(py);
        lookup
    }

    fn decode(&self, py: Python<'_>, bytes: &[u8]) -> Result<Py<PyEnvelope>, String> {
        let wire = decode_envelope(bytes)?;
        let times = wire.times();
        let payload = match wire.codec.as_deref() {
            None => from_json(py, wire.payload.get())?,
            Some("pickle") if self.serializer == Serializer::Pickle => {
                let text: String =
                    serde_json::from_str(wire.payload.get()).map_err(|e| e.to_string())?;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| e.to_string())?;
                pickle_module(py)
                    .and_then(|m| m.call_method1("loads", (raw.as_slice(),)))
                    .map_err(|e| format!("unpickling failed: {e}"))?
            }
            Some(other) => {
                return Err(format!(
                    "payload codec {other:?} is not enabled on this cache"
                ))
            }
        };
        Py::new(
            py,
            PyEnvelope {
                payload: payload.unbind(),
                times,
            },
        )
        .map_err(|e| e.to_string())
    }

    fn redis_lookup(
        &self,
        py: Python<'_>,
        key: &str,
        bytes: Option<Vec<u8>>,
        count: bool,
    ) -> PyResult<PyLookup> {
        let Some(bytes) = bytes else {
            if count {
                self.counters.count_state(State::Miss);
            }
            return Ok(PyLookup::miss());
        };
        match self.decode(py, &bytes) {
            Ok(envelope) => {
                let times = envelope.get().times;
                self.lookup_of(py, envelope, times, count)
            }
            Err(reason) => {
                let n = self.counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(100) {
                    log::warn!(target: "tenuto::cache", "unreadable value under {:?} read as a miss: {reason}", self.redis_key(key));
                }
                if count {
                    self.counters.count_state(State::Miss);
                }
                Ok(PyLookup::miss())
            }
        }
    }

    fn finish_get(
        &self,
        py: Python<'_>,
        key: &str,
        result: Result<Option<Vec<u8>>, StoreError>,
        count: bool,
    ) -> PyResult<PyLookup> {
        match result {
            Ok(bytes) => self.redis_lookup(py, key, bytes, count),
            Err(err) => {
                self.absorb(err)?;
                self.memory_lookup(py, key, count)
            }
        }
    }

    fn stamp(
        &self,
        py: Python<'_>,
        ttl: &Bound<'_, PyAny>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(i64, Times)> {
        let ttl = seconds_arg("ttl", ttl)?;
        let stale_ttl = match stale_ttl {
            Some(s) if !s.is_none() => Some(seconds_arg("stale_ttl", s)?),
            _ => None,
        };
        let now = self.clock.now_secs(py)?;
        Ok((now, self.policy.stamp(now, ttl, stale_ttl, fastrand::f64)?))
    }

    fn encode_payload(&self, value: &Bound<'_, PyAny>) -> PyResult<(String, Option<&'static str>)> {
        let (text, codec) = match self.serializer {
            Serializer::Json => (to_json(value, PAYLOAD)?, None),
            Serializer::Pickle => {
                let raw = pickle_module(value.py())?.call_method1("dumps", (value, 5))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(raw.extract::<&[u8]>()?);
                (format!("\"{b64}\""), Some("pickle"))
            }
        };
        if text.len() > self.max_value_bytes {
            return Err(PyValueError::new_err(format!(
                "value is {} bytes encoded, over max_value_bytes={}",
                text.len(),
                self.max_value_bytes
            )));
        }
        Ok((text, codec))
    }

    /// Validates, stamps and (for Redis) encodes one write before anything is written, so a
    /// bad value leaves the old one intact.
    fn prepare_set(
        &self,
        py: Python<'_>,
        key: &str,
        value: &Bound<'_, PyAny>,
        now: i64,
        times: Times,
        for_redis: bool,
    ) -> PyResult<(Py<PyEnvelope>, Option<WireItem>)> {
        let envelope = Py::new(
            py,
            PyEnvelope {
                payload: value.clone().unbind(),
                times,
            },
        )?;
        let wire = if for_redis {
            let (payload, codec) = self.encode_payload(value)?;
            Some((
                self.redis_key(key),
                encode_envelope(&payload, times, codec),
                times.keep_for(now),
            ))
        } else {
            None
        };
        Ok((envelope, wire))
    }

    fn store_in_memory(&self, py: Python<'_>, key: &str, envelope: &Py<PyEnvelope>, now: i64) {
        let times = envelope.get().times;
        self.memory.insert(
            key.to_owned(),
            Entry::new(Deferred::new(envelope.clone_ref(py)), times, now),
        );
    }

    /// After the Redis write: on failure (fail-open) keep the values in memory instead.
    fn finish_set(
        &self,
        py: Python<'_>,
        written: &[(String, Py<PyEnvelope>)],
        now: i64,
        result: Option<Result<(), StoreError>>,
    ) -> PyResult<()> {
        let in_memory = match result {
            Some(Ok(())) => false,
            Some(Err(err)) => {
                self.absorb(err)?;
                true
            }
            None => true,
        };
        if in_memory {
            for (key, envelope) in written {
                self.store_in_memory(py, key, envelope, now);
            }
        }
        self.counters
            .sets
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        release_pending(py);
        Ok(())
    }

    fn finish_delete(
        &self,
        py: Python<'_>,
        keys: &[String],
        result: Option<Result<u64, StoreError>>,
    ) -> PyResult<u64> {
        let mut removed = 0;
        for key in keys {
            removed += self.memory.remove(key) as u64;
        }
        release_pending(py);
        match result {
            Some(Ok(n)) => removed = n,
            Some(Err(err)) => self.absorb(err)?,
            None => {}
        }
        self.counters
            .deletes
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        Ok(removed)
    }
}

/// A keyed envelope cache on memory or Redis/Valkey, with fail-open fallback to memory.
#[pyclass(frozen, module = "tenuto._core", name = "Cache")]
pub struct PyCache {
    pub(crate) core: Arc<CacheCore>,
}

fn parse_backend(url: Option<&str>) -> PyResult<Option<String>> {
    let Some(url) = url else { return Ok(None) };
    if url == "memory://" || url == "memory" {
        return Ok(None);
    }
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if SCHEMES.contains(&scheme) {
        return Ok(Some(url.to_string()));
    }
    Err(PyValueError::new_err(format!(
        "unsupported cache URL {:?}: expected memory://, redis://, rediss://, valkey:// or valkeys://",
        super::redis::redact(url)
    )))
}

fn timeout_arg(name: &str, seconds: f64) -> PyResult<Duration> {
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a positive number of seconds, got {seconds}"
        )));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[pymethods]
impl PyCache {
    #[new]
    #[pyo3(signature = (
        url = None, namespace = "app", max_entries = 10_000, jitter = 0.1, fail_open = true,
        *, serializer = "json", max_value_bytes = 16 * 1024 * 1024, connect_timeout = 0.25,
        command_timeout = 1.0, clock = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        url: Option<&str>,
        namespace: &str,
        max_entries: i64,
        jitter: f64,
        fail_open: bool,
        serializer: &str,
        max_value_bytes: i64,
        connect_timeout: f64,
        command_timeout: f64,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        if namespace.is_empty() {
            return Err(PyValueError::new_err("namespace must not be empty"));
        }
        if max_entries < 1 {
            return Err(PyValueError::new_err(format!(
                "max_entries must be at least 1, got {max_entries}"
            )));
        }
        if max_value_bytes < 1 {
            return Err(PyValueError::new_err(format!(
                "max_value_bytes must be at least 1, got {max_value_bytes}"
            )));
        }
        let serializer = match serializer {
            "json" => Serializer::Json,
            "pickle" => Serializer::Pickle,
            other => {
                return Err(PyValueError::new_err(format!(
                    "serializer must be \"json\" or \"pickle\", got {other:?}"
                )))
            }
        };
        let redis_url = parse_backend(url)?;
        let redis = match &redis_url {
            Some(url) => Some(RedisStore::new(RedisConfig {
                url: url.clone(),
                connect_timeout: timeout_arg("connect_timeout", connect_timeout)?,
                command_timeout: timeout_arg("command_timeout", command_timeout)?,
            })?),
            None => None,
        };
        let url = redis
            .as_ref()
            .map(|r| r.display_url.clone())
            .unwrap_or_else(|| "memory://".into());
        Ok(Self {
            core: Arc::new(CacheCore {
                namespace: namespace.to_string(),
                url,
                policy: TtlPolicy::new(jitter)?,
                clock: PyClock::from_arg(clock)?,
                memory: MemoryStore::new(max_entries as u64),
                redis,
                serializer,
                max_value_bytes: max_value_bytes as usize,
                fail_open,
                counters: Counters::default(),
            }),
        })
    }

    /// A cache on `TENUTO_URL`, else `REDIS_URL`, else memory; other options as for `Cache`.
    #[classmethod]
    #[pyo3(signature = (**kwargs))]
    fn from_env<'py>(
        cls: &Bound<'py, pyo3::types::PyType>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        let kwargs = match kwargs {
            Some(k) => k.copy()?,
            None => PyDict::new(py),
        };
        if kwargs.contains("url")? {
            return Err(PyTypeError::new_err(
                "from_env() takes the URL from the environment; pass url= to Cache() instead",
            ));
        }
        let environ = py.import("os")?.getattr("environ")?;
        let mut url: Option<String> = None;
        for var in ["TENUTO_URL", "REDIS_URL"] {
            let value: Option<String> = environ.call_method1("get", (var,))?.extract()?;
            if let Some(v) = value.filter(|v| !v.trim().is_empty()) {
                url = Some(v.trim().to_string());
                break;
            }
        }
        kwargs.set_item("url", url)?;
        cls.call((), Some(&kwargs))
    }

    #[getter]
    fn namespace(&self) -> &str {
        &self.core.namespace
    }

    #[getter]
    fn url(&self) -> &str {
        &self.core.url
    }

    #[getter]
    fn backend(&self) -> &'static str {
        if self.core.redis.is_some() {
            "redis"
        } else {
            "memory"
        }
    }

    /// Look `key` up: a `Lookup` whose state is "hit", "stale" or "miss".
    fn get(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<PyLookup> {
        self.lookup(py, key, true)
    }

    fn aget<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.alookup(py, key, true)
    }

    /// `get` without counting it in `stats()` (a second look by the same caller).
    fn _peek(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<PyLookup> {
        self.lookup(py, key, false)
    }

    fn _apeek<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.alookup(py, key, false)
    }

    /// Store `value` under `key`, fresh for `ttl` seconds and servable as stale until
    /// `stale_ttl` seconds (default: no stale window). Returns the stored `Envelope`.
    #[pyo3(signature = (key, value, ttl = None, stale_ttl = None))]
    fn set(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyEnvelope>> {
        let (envelope, plan) = self.plan_set(py, key, value, ttl, stale_ttl)?;
        let (written, wire, now, redis) = plan;
        let result = match (redis, wire) {
            (Some(redis), Some(wire)) => {
                Some(py.detach(|| runtime::block_on(redis.set_many(vec![wire]))))
            }
            _ => None,
        };
        self.core.finish_set(py, &written, now, result)?;
        Ok(envelope)
    }

    #[pyo3(signature = (key, value, ttl = None, stale_ttl = None))]
    fn aset<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
        ttl: Option<&Bound<'py, PyAny>>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (envelope, plan) = self.plan_set(py, key, value, ttl, stale_ttl)?;
        let (written, wire, now, redis) = plan;
        match (redis, wire) {
            (Some(redis), Some(wire)) => {
                let core = Arc::clone(&self.core);
                spawn_for_asyncio(
                    py,
                    async move { redis.set_many(vec![wire]).await },
                    move |py, result| {
                        core.finish_set(py, &written, now, Some(result))?;
                        Ok(envelope.into_any())
                    },
                )
            }
            _ => {
                self.core.finish_set(py, &written, now, None)?;
                Ok(Bound::new(py, Ready::new(envelope.into_any()))?.into_any())
            }
        }
    }

    /// Look up many keys; Redis answers them in one MGET. Returns `{key: Lookup}`.
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let keys = key_list(keys)?;
        match self.core.route()? {
            None => self.core.memory_many(py, &keys),
            Some(redis) => {
                let rkeys = keys.iter().map(|k| self.core.redis_key(k)).collect();
                let result = py.detach(|| runtime::block_on(redis.mget(rkeys)));
                self.core.finish_many(py, &keys, result)
            }
        }
    }

    fn aget_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys = key_list(keys)?;
        match self.core.route()? {
            None => {
                let found = self.core.memory_many(py, &keys)?;
                Ok(Bound::new(py, Ready::new(found.into_any().unbind()))?.into_any())
            }
            Some(redis) => {
                let core = Arc::clone(&self.core);
                let rkeys = keys.iter().map(|k| core.redis_key(k)).collect();
                spawn_for_asyncio(
                    py,
                    async move { redis.mget(rkeys).await },
                    move |py, result| Ok(core.finish_many(py, &keys, result)?.into_any().unbind()),
                )
            }
        }
    }

    /// Store every item of `mapping` with the same TTLs; Redis gets one pipeline.
    #[pyo3(signature = (mapping, ttl = None, stale_ttl = None))]
    fn set_many<'py>(
        &self,
        py: Python<'py>,
        mapping: &Bound<'py, PyAny>,
        ttl: Option<&Bound<'py, PyAny>>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (envelopes, written, wires, now, redis) =
            self.plan_set_many(py, mapping, ttl, stale_ttl)?;
        let result = redis.map(|redis| py.detach(|| runtime::block_on(redis.set_many(wires))));
        self.core.finish_set(py, &written, now, result)?;
        Ok(envelopes)
    }

    #[pyo3(signature = (mapping, ttl = None, stale_ttl = None))]
    fn aset_many<'py>(
        &self,
        py: Python<'py>,
        mapping: &Bound<'py, PyAny>,
        ttl: Option<&Bound<'py, PyAny>>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (envelopes, written, wires, now, redis) =
            self.plan_set_many(py, mapping, ttl, stale_ttl)?;
        match redis {
            Some(redis) => {
                let core = Arc::clone(&self.core);
                let envelopes = envelopes.unbind();
                spawn_for_asyncio(
                    py,
                    async move { redis.set_many(wires).await },
                    move |py, result| {
                        core.finish_set(py, &written, now, Some(result))?;
                        Ok(envelopes.into_any())
                    },
                )
            }
            None => {
                self.core.finish_set(py, &written, now, None)?;
                Ok(Bound::new(py, Ready::new(envelopes.into_any().unbind()))?.into_any())
            }
        }
    }

    /// Remove `key`; True if it was there.
    fn delete(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let keys = vec![key_str(key)?.to_owned()];
        let result = match self.core.route()? {
            Some(redis) => {
                let rkeys = vec![self.core.redis_key(&keys[0])];
                Some(py.detach(|| runtime::block_on(redis.delete(rkeys))))
            }
            None => None,
        };
        Ok(self.core.finish_delete(py, &keys, result)? > 0)
    }

    fn adelete<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys = vec![key_str(key)?.to_owned()];
        match self.core.route()? {
            Some(redis) => {
                let core = Arc::clone(&self.core);
                let rkeys = vec![core.redis_key(&keys[0])];
                spawn_for_asyncio(
                    py,
                    async move { redis.delete(rkeys).await },
                    move |py, result| {
                        let removed = core.finish_delete(py, &keys, Some(result))?;
                        Ok(PyBool::new(py, removed > 0).to_owned().into_any().unbind())
                    },
                )
            }
            None => {
                let removed = self.core.finish_delete(py, &keys, None)?;
                let value = PyBool::new(py, removed > 0).to_owned().into_any().unbind();
                Ok(Bound::new(py, Ready::new(value))?.into_any())
            }
        }
    }

    /// Remove every entry of this cache's namespace (Redis: SCAN + UNLINK, never KEYS).
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let result = self.core.route()?.map(|redis| {
            let pattern = format!("{}:*", glob_escape(&self.core.namespace));
            py.detach(|| runtime::block_on(redis.delete_matching(pattern)))
        });
        self.core.finish_clear(py, result)
    }

    fn aclear<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.core.route()? {
            Some(redis) => {
                let core = Arc::clone(&self.core);
                let pattern = format!("{}:*", glob_escape(&core.namespace));
                spawn_for_asyncio(
                    py,
                    async move { redis.delete_matching(pattern).await },
                    move |py, result| {
                        core.finish_clear(py, Some(result))?;
                        Ok(py.None())
                    },
                )
            }
            None => {
                self.core.finish_clear(py, None)?;
                Ok(Bound::new(py, Ready::new(py.None()))?.into_any())
            }
        }
    }

    /// Counters and backend health as a plain dict (no I/O).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let core = &self.core;
        let c = &core.counters;
        let d = PyDict::new(py);
        let hits = Counters::read(&c.hits);
        let stale = Counters::read(&c.stale_hits);
        let misses = Counters::read(&c.misses);
        let decode_errors = Counters::read(&c.decode_errors);
        let backend_errors = Counters::read(&c.backend_errors);
        let lookups = hits + stale + misses;
        let size = py.detach(|| core.memory.len());
        release_pending(py);
        d.set_item("backend", self.backend())?;
        d.set_item("url", &core.url)?;
        d.set_item("namespace", &core.namespace)?;
        d.set_item("degraded", core.redis.as_ref().is_some_and(|r| r.is_down()))?;
        d.set_item("hits", hits)?;
        d.set_item("stale_hits", stale)?;
        d.set_item("misses", misses)?;
        d.set_item("sets", Counters::read(&c.sets))?;
        d.set_item("deletes", Counters::read(&c.deletes))?;
        d.set_item("errors", decode_errors + backend_errors)?;
        d.set_item("decode_errors", decode_errors)?;
        d.set_item("backend_errors", backend_errors)?;
        d.set_item(
            "outages",
            core.redis
                .as_ref()
                .map_or(0, |r| r.outages.load(Ordering::Relaxed)),
        )?;
        d.set_item("evictions", core.memory.evictions())?;
        d.set_item("size", size)?;
        d.set_item(
            "hit_rate",
            if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
        )?;
        d.set_item(
            "stale_rate",
            if lookups == 0 {
                0.0
            } else {
                stale as f64 / lookups as f64
            },
        )?;
        Ok(d)
    }

    /// The full Redis key (namespace included) under which `key` is stored.
    fn backend_key(&self, key: &Bound<'_, PyAny>) -> PyResult<String> {
        Ok(self.core.redis_key(key_str(key)?))
    }

    /// Decorator caching a function's results in this cache, for sync and `async def`
    /// functions alike (see `tenuto.Cache.cached` in the README).
    #[pyo3(signature = (
        ttl, stale_ttl = None, name = None, key = None, negative = None, distributed = None,
        *, lock_ttl = 30.0, wait_timeout = 8.0, breaker = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn cached<'py>(
        slf: &Bound<'py, Self>,
        ttl: &Bound<'py, PyAny>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
        name: Option<&Bound<'py, PyAny>>,
        key: Option<&Bound<'py, PyAny>>,
        negative: Option<&Bound<'py, PyAny>>,
        distributed: Option<bool>,
        lock_ttl: f64,
        wait_timeout: f64,
        breaker: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let kwargs = PyDict::new(py);
        kwargs.set_item("ttl", ttl)?;
        kwargs.set_item("stale_ttl", stale_ttl)?;
        kwargs.set_item("name", name)?;
        kwargs.set_item("key", key)?;
        kwargs.set_item("negative", negative)?;
        kwargs.set_item("distributed", distributed)?;
        kwargs.set_item("lock_ttl", lock_ttl)?;
        kwargs.set_item("wait_timeout", wait_timeout)?;
        kwargs.set_item("breaker", breaker)?;
        py.import("tenuto._cached")?
            .getattr("decorator")?
            .call((slf,), Some(&kwargs))
    }

    /// The cache clock's time in whole epoch seconds.
    fn now(&self, py: Python<'_>) -> PyResult<i64> {
        self.core.clock.now_secs(py)
    }

    /// Distributed single-flight lock `{namespace}:lock:{key}` (Redis only). Returns the
    /// token when taken, None when another process holds it, and "" when Redis cannot be
    /// asked (fail open: proceed without the lock).
    fn _lock(&self, py: Python<'_>, key: &str, ttl: f64) -> PyResult<Option<String>> {
        let Some((redis, lock_key, token, ttl)) = self.core.lock_plan(key, ttl)? else {
            return Ok(Some(String::new()));
        };
        let attempt = token.clone();
        let taken = py.detach(|| runtime::block_on(redis.try_lock(lock_key, attempt, ttl)));
        Ok(self.core.finish_lock(taken, token))
    }

    fn _alock<'py>(&self, py: Python<'py>, key: &str, ttl: f64) -> PyResult<Bound<'py, PyAny>> {
        let Some((redis, lock_key, token, ttl)) = self.core.lock_plan(key, ttl)? else {
            let no_lock = PyString::new(py, "").into_any().unbind();
            return Ok(Bound::new(py, Ready::new(no_lock))?.into_any());
        };
        let core = Arc::clone(&self.core);
        let attempt = token.clone();
        let work = async move { redis.try_lock(lock_key, attempt, ttl).await };
        spawn_for_asyncio(py, work, move |py, taken| {
            let outcome = core.finish_lock(taken, token);
            Ok(outcome.into_pyobject(py)?.into_any().unbind())
        })
    }

    /// Releases the lock if `token` still holds it.
    fn _unlock(&self, py: Python<'_>, key: &str, token: &str) -> bool {
        let Some(redis) = self.core.redis.clone().filter(|_| !token.is_empty()) else {
            return false;
        };
        let (lock_key, token) = (self.core.lock_key(key), token.to_owned());
        let result = py.detach(|| runtime::block_on(redis.unlock(lock_key, token)));
        self.core.finish_unlock(result)
    }

    fn _aunlock<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        token: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(redis) = self.core.redis.clone().filter(|_| !token.is_empty()) else {
            let nothing = PyBool::new(py, false).to_owned().into_any().unbind();
            return Ok(Bound::new(py, Ready::new(nothing))?.into_any());
        };
        let core = Arc::clone(&self.core);
        let (lock_key, token) = (core.lock_key(key), token.to_owned());
        spawn_for_asyncio(
            py,
            async move { redis.unlock(lock_key, token).await },
            move |py, result| {
                let deleted = core.finish_unlock(result);
                Ok(PyBool::new(py, deleted).to_owned().into_any().unbind())
            },
        )
    }

    /// Waits up to `timeout` seconds for another process's write of `key` made at or after
    /// epoch second `since`: its Lookup, or None (timed out, or that process gave up).
    fn _wait_for_write(
        &self,
        py: Python<'_>,
        key: &str,
        since: i64,
        timeout: f64,
    ) -> PyResult<Option<PyLookup>> {
        let Some(redis) = self.core.redis.clone() else {
            return Ok(None);
        };
        let (rkey, lock_key) = (self.core.redis_key(key), self.core.lock_key(key));
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let result = py.detach(|| {
            runtime::block_on(redis.wait_for_write(rkey, lock_key, timeout, written_since(since)))
        });
        self.core.finish_wait(py, key, result)
    }

    fn _await_for_write<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        since: i64,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Some(redis) = self.core.redis.clone() else {
            return Ok(Bound::new(py, Ready::new(py.None()))?.into_any());
        };
        let core = Arc::clone(&self.core);
        let (rkey, lock_key, key) = (core.redis_key(key), core.lock_key(key), key.to_owned());
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let work = async move {
            redis
                .wait_for_write(rkey, lock_key, timeout, written_since(since))
                .await
        };
        spawn_for_asyncio(py, work, move |py, result| {
            Ok(core
                .finish_wait(py, &key, result)?
                .into_pyobject(py)?
                .into_any()
                .unbind())
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Cache(url={:?}, namespace={:?})",
            self.core.url, self.core.namespace
        )
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        self.core.clock.traverse(&visit)
    }
}

fn key_list(keys: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if keys.cast::<PyString>().is_ok() {
        return Err(PyTypeError::new_err(
            "keys must be an iterable of str, not a single str",
        ));
    }
    keys.try_iter()?
        .map(|k| Ok(key_str(&k?)?.to_owned()))
        .collect()
}

type SetManyPlan<'py> = (
    Bound<'py, PyDict>,
    Vec<(String, Py<PyEnvelope>)>,
    Vec<WireItem>,
    i64,
    Option<Arc<RedisStore>>,
);

type SetPlan = (
    Vec<(String, Py<PyEnvelope>)>,
    Option<WireItem>,
    i64,
    Option<Arc<RedisStore>>,
);

impl PyCache {
    fn lookup(&self, py: Python<'_>, key: &Bound<'_, PyAny>, count: bool) -> PyResult<PyLookup> {
        let core = &self.core;
        let key = key_str(key)?;
        match core.route()? {
            None => core.memory_lookup(py, key, count),
            Some(redis) => {
                let rkey = core.redis_key(key);
                let result = py.detach(|| runtime::block_on(redis.get(rkey)));
                core.finish_get(py, key, result, count)
            }
        }
    }

    fn alookup<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        count: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let key_text = key_str(key)?.to_owned();
        match self.core.route()? {
            None => {
                let lookup = self.core.memory_lookup(py, &key_text, count)?;
                Ok(Bound::new(py, Ready::new(Py::new(py, lookup)?.into_any()))?.into_any())
            }
            Some(redis) => {
                let core = Arc::clone(&self.core);
                let rkey = core.redis_key(&key_text);
                spawn_for_asyncio(
                    py,
                    async move { redis.get(rkey).await },
                    move |py, result| {
                        Ok(Py::new(py, core.finish_get(py, &key_text, result, count)?)?.into_any())
                    },
                )
            }
        }
    }

    fn plan_set(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Py<PyEnvelope>, SetPlan)> {
        let key = key_str(key)?;
        let ttl = ttl.ok_or_else(|| {
            PyTypeError::new_err("set() needs ttl= (seconds the value stays fresh)")
        })?;
        let (now, times) = self.core.stamp(py, ttl, stale_ttl)?;
        let for_redis = self.core.redis.is_some();
        let (envelope, wire) = self
            .core
            .prepare_set(py, key, value, now, times, for_redis)?;
        let redis = if for_redis { self.core.route()? } else { None };
        let written = vec![(key.to_owned(), envelope.clone_ref(py))];
        Ok((envelope, (written, wire, now, redis)))
    }

    fn plan_set_many<'py>(
        &self,
        py: Python<'py>,
        mapping: &Bound<'py, PyAny>,
        ttl: Option<&Bound<'py, PyAny>>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<SetManyPlan<'py>> {
        let ttl = ttl.ok_or_else(|| {
            PyTypeError::new_err("set_many() needs ttl= (seconds the values stay fresh)")
        })?;
        let items = mapping.call_method0("items").map_err(|_| {
            PyTypeError::new_err("set_many() takes a mapping of str keys to values")
        })?;
        let for_redis = self.core.redis.is_some();
        let envelopes = PyDict::new(py);
        let mut written = Vec::new();
        let mut wires = Vec::new();
        let mut now = 0;
        for item in items.try_iter()? {
            let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item?.extract()?;
            let key_text = key_str(&key)?;
            let (t, times) = self.core.stamp(py, ttl, stale_ttl)?;
            now = t;
            let (envelope, wire) = self
                .core
                .prepare_set(py, key_text, &value, t, times, for_redis)?;
            envelopes.set_item(&key, &envelope)?;
            written.push((key_text.to_owned(), envelope));
            wires.extend(wire);
        }
        let redis = if for_redis { self.core.route()? } else { None };
        Ok((envelopes, written, wires, now, redis))
    }
}

/// Accepts a stored envelope fetched at or after epoch second `since`.
fn written_since(since: i64) -> impl Fn(&[u8]) -> bool + Send {
    move |bytes| decode_envelope(bytes).is_ok_and(|wire| wire.fetched_at >= since)
}

type LockPlan = (Arc<RedisStore>, String, String, Duration);

impl CacheCore {
    fn lock_key(&self, key: &str) -> String {
        format!("{}:lock:{key}", self.namespace)
    }

    /// None when there is no Redis to lock on (memory cache, or Redis marked down).
    fn lock_plan(&self, key: &str, ttl: f64) -> PyResult<Option<LockPlan>> {
        let ttl = timeout_arg("lock_ttl", ttl)?;
        let Some(redis) = self.redis.clone().filter(|r| !r.is_down()) else {
            return Ok(None);
        };
        let token = runtime::unique_token();
        Ok(Some((redis, self.lock_key(key), token, ttl)))
    }

    fn finish_lock(&self, taken: Result<bool, StoreError>, token: String) -> Option<String> {
        match taken {
            Ok(true) => Some(token),
            Ok(false) => None,
            // Lock errors fail open: proceed as if this process held the lock.
            Err(_) => {
                Counters::bump(&self.counters.backend_errors);
                Some(String::new())
            }
        }
    }

    fn finish_unlock(&self, result: Result<bool, StoreError>) -> bool {
        result.unwrap_or_else(|_| {
            Counters::bump(&self.counters.backend_errors);
            false
        })
    }

    fn finish_wait(
        &self,
        py: Python<'_>,
        key: &str,
        result: Result<Option<Vec<u8>>, StoreError>,
    ) -> PyResult<Option<PyLookup>> {
        match result {
            Ok(Some(bytes)) => Ok(Some(self.redis_lookup(py, key, Some(bytes), true)?)),
            Ok(None) => Ok(None),
            Err(_) => {
                Counters::bump(&self.counters.backend_errors);
                Ok(None)
            }
        }
    }

    fn memory_many<'py>(&self, py: Python<'py>, keys: &[String]) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for key in keys {
            out.set_item(key, self.memory_lookup(py, key, true)?)?;
        }
        Ok(out)
    }

    fn finish_many<'py>(
        &self,
        py: Python<'py>,
        keys: &[String],
        result: Result<Vec<Option<Vec<u8>>>, StoreError>,
    ) -> PyResult<Bound<'py, PyDict>> {
        match result {
            Ok(values) => {
                let out = PyDict::new(py);
                for (key, bytes) in keys.iter().zip(values) {
                    out.set_item(key, self.redis_lookup(py, key, bytes, true)?)?;
                }
                Ok(out)
            }
            Err(err) => {
                self.absorb(err)?;
                self.memory_many(py, keys)
            }
        }
    }

    fn finish_clear(
        &self,
        py: Python<'_>,
        result: Option<Result<u64, StoreError>>,
    ) -> PyResult<()> {
        py.detach(|| self.memory.clear());
        release_pending(py);
        if let Some(Err(err)) = result {
            self.absorb(err)?;
        }
        Ok(())
    }
}
