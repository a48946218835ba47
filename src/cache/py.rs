//! `tenuto.Cache`, `tenuto.Envelope`, `tenuto.Lookup`: thin bindings over the stores.
//!
//! Every operation is split the same way so sync and async share one code path: validate
//! and encode with the GIL, run the Redis I/O without it (blocking for sync calls, on the
//! runtime for async ones), then finish with the GIL (decode, fall back, count).

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::Engine as _;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyList, PyString};

use super::engine::{Config, Decode, Engine, Found, Prepared, Write};
use super::local::Invalidated;
use super::memory::Entry;
use super::redis::{RedisConfig, RedisStore, StoreError, SCHEMES};
use super::{State, Times};
use crate::clock::py::PyClock;
use crate::clock::{Clock, ClockRef, SystemClock};
use crate::codec::py::{from_json, to_json, to_json_checked, PAYLOAD};
use crate::error::py::Count;
use crate::graveyard::{release_pending, Deferred};
use crate::runtime::{self, py::spawn_for_asyncio, py::Ready};

/// One cached value with its times (integer epoch seconds, bounds inclusive).
#[pyclass(frozen, module = "tenuto._core", name = "Envelope")]
pub struct PyEnvelope {
    payload: Py<PyAny>,
    times: Times,
}

impl PyEnvelope {
    /// The envelope of an engine entry.
    pub(crate) fn of(py: Python<'_>, entry: &Entry<PyObj>) -> PyResult<Py<PyEnvelope>> {
        Py::new(
            py,
            PyEnvelope {
                payload: entry.value.get().clone_ref(py),
                times: entry.times,
            },
        )
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

/// `"hit"`, `"stale"` or `"miss"` as a `State` (a `ValueError` otherwise).
pub(crate) fn parse_state(state: &str) -> PyResult<State> {
    match state {
        "hit" => Ok(State::Hit),
        "stale" => Ok(State::Stale),
        "miss" => Ok(State::Miss),
        other => Err(PyValueError::new_err(format!(
            "state must be \"hit\", \"stale\" or \"miss\", got {other:?}"
        ))),
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

#[pymethods]
impl PyLookup {
    /// A lookup result, e.g. for a value served by a decorator (`stale_fallback=True`
    /// when a stale value was served because the fetch failed).
    #[new]
    #[pyo3(signature = (state, envelope = None, stale_fallback = false))]
    fn new(state: &str, envelope: Option<Py<PyEnvelope>>, stale_fallback: bool) -> PyResult<Self> {
        let state = parse_state(state)?;
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
    pub(crate) fn value(&self, py: Python<'_>) -> Py<PyAny> {
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

/// A Python value held by the engine (its reference is released at a safe point).
pub type PyObj = Deferred<PyAny>;

/// The engine as the bindings use it: Python values, Redis as the remote.
pub type PyEngine = Engine<PyObj, RedisStore>;

/// How values become stored payloads and back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Serializer {
    /// JSON rules on every backend (the default).
    Json,
    /// Pickle, opted into (a remote-code-execution risk when Redis is shared).
    Pickle,
    /// Memory only: values kept as they are, for objects that have no wire form.
    Object,
}

impl Serializer {
    fn parse(name: &str) -> PyResult<Self> {
        match name {
            "json" => Ok(Serializer::Json),
            "pickle" => Ok(Serializer::Pickle),
            "object" => Ok(Serializer::Object),
            other => Err(PyValueError::new_err(format!(
                "serializer must be \"json\", \"pickle\" or \"object\", got {other:?}"
            ))),
        }
    }
}

fn pickle_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static PICKLE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    PICKLE
        .get_or_try_init(py, || Ok::<_, PyErr>(py.import("pickle")?.unbind()))
        .map(|m| m.bind(py))
}

/// Stored payloads to Python values: JSON (or opted-in pickle), then, for a typed cached
/// function, validated by its pydantic `TypeAdapter`.
pub struct PyDecoder {
    serializer: Serializer,
    adapter: Option<Py<PyAny>>,
}

impl PyDecoder {
    pub fn new(serializer: Serializer, adapter: Option<Py<PyAny>>) -> Self {
        Self {
            serializer,
            adapter,
        }
    }

    fn decode_in(
        &self,
        py: Python<'_>,
        payload: &str,
        codec: Option<&str>,
    ) -> Result<PyObj, String> {
        let value = match codec {
            None => from_json(py, payload)?,
            Some("pickle") if self.serializer == Serializer::Pickle => {
                let text: String = serde_json::from_str(payload).map_err(|e| e.to_string())?;
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
        let value = match &self.adapter {
            Some(adapter) => adapter
                .bind(py)
                .call_method1(intern!(py, "validate_python"), (value,))
                .map_err(|e| format!("stored value does not validate: {e}"))?,
            None => value,
        };
        Ok(Deferred::new(value.unbind()))
    }

    /// The value kept for `value`: what a round trip through the wire format returns, so
    /// memory and Redis answer alike. Returns it with its payload text.
    pub fn prepare(&self, value: &Bound<'_, PyAny>) -> PyResult<Prepared<PyObj>> {
        let py = value.py();
        match self.serializer {
            Serializer::Object => Ok(Prepared {
                value: Deferred::new(value.clone().unbind()),
                payload: String::new(),
                codec: None,
            }),
            Serializer::Pickle => {
                let raw = pickle_module(py)?.call_method1("dumps", (value, 5))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(raw.extract::<&[u8]>()?);
                Ok(Prepared {
                    value: Deferred::new(value.clone().unbind()),
                    payload: format!("\"{b64}\""),
                    codec: Some("pickle"),
                })
            }
            Serializer::Json => match &self.adapter {
                Some(adapter) => {
                    let adapter = adapter.bind(py);
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("mode", "json")?;
                    let plain =
                        adapter.call_method(intern!(py, "dump_python"), (value,), Some(&kwargs))?;
                    let payload = to_json(&plain, PAYLOAD)?;
                    let normal = from_json(py, &payload).map_err(PyValueError::new_err)?;
                    let kept = adapter.call_method1(intern!(py, "validate_python"), (normal,))?;
                    Ok(Prepared {
                        value: Deferred::new(kept.unbind()),
                        payload,
                        codec: None,
                    })
                }
                None => {
                    let (payload, plain) = to_json_checked(value)?;
                    let kept = if plain {
                        value.clone()
                    } else {
                        from_json(py, &payload).map_err(PyValueError::new_err)?
                    };
                    Ok(Prepared {
                        value: Deferred::new(kept.unbind()),
                        payload,
                        codec: None,
                    })
                }
            },
        }
    }
}

impl Decode<PyObj> for PyDecoder {
    fn decode(&self, payload: &str, codec: Option<&str>) -> Result<PyObj, String> {
        Python::attach(|py| self.decode_in(py, payload, codec))
    }
}

/// A clock given as a Python callable, read by the engine (attaching to Python per read).
struct CallableClock(Py<PyAny>);

impl Clock for CallableClock {
    fn now_nanos(&self) -> i64 {
        Python::attach(
            |py| match self.0.bind(py).call0().and_then(|v| v.extract::<f64>()) {
                Ok(seconds) if seconds.is_finite() => (seconds * 1e9) as i64,
                _ => SystemClock.now_nanos(),
            },
        )
    }
}

fn clock_ref(clock: &PyClock, py: Python<'_>) -> ClockRef {
    match clock {
        PyClock::Native(clock) => Arc::clone(clock),
        PyClock::Callable(f) => Arc::new(CallableClock(f.clone_ref(py))),
    }
}

/// Runs an engine operation from a Python thread: inline when it stays in memory (it
/// completes on its first poll), else on the runtime with the GIL released.
pub(crate) fn run_sync<F>(py: Python<'_>, remote: bool, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let mut future = std::pin::pin!(future);
    if !remote {
        let mut context = Context::from_waker(Waker::noop());
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            release_pending(py);
            return output;
        }
    }
    let output = py.detach(|| runtime::block_on(future));
    release_pending(py);
    output
}

/// The awaitable of an engine operation: already complete when it stays in memory, else
/// run on the runtime when awaited (cancellable).
pub(crate) fn run_async<'py, F, C>(
    py: Python<'py>,
    remote: bool,
    future: F,
    finish: C,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
    C: for<'a> FnOnce(Python<'a>, F::Output) -> PyResult<Py<PyAny>> + Send + 'static,
{
    if !remote {
        let mut future = Box::pin(future);
        let mut context = Context::from_waker(Waker::noop());
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            let value = finish(py, output)?;
            release_pending(py);
            return Ok(Bound::new(py, Ready::new(value))?.into_any());
        }
        return spawn_for_asyncio(py, future, finish);
    }
    spawn_for_asyncio(py, future, finish)
}

/// What the bindings keep per cache: the engine, and what converts values for it.
pub struct CacheBinding {
    pub(crate) engine: Arc<PyEngine>,
    url: String,
    /// The TTL of a `set` or a bare `@cache.cached` that names none.
    pub(crate) default_ttl: Option<f64>,
    pub(crate) serializer: Serializer,
    pub(crate) decoder: Arc<PyDecoder>,
    pub(crate) clock: PyClock,
}

impl CacheBinding {
    pub(crate) fn redis_key(&self, key: &str) -> String {
        self.engine.remote_key(key)
    }

    /// The Redis store to use now, or None for memory (the engine's routing).
    pub(crate) fn route(&self) -> PyResult<Option<Arc<RedisStore>>> {
        Ok(self.engine.route_remote()?)
    }

    /// `ttl` in seconds, or the cache's `default_ttl` when it is None.
    pub(crate) fn ttl_or_default(&self, ttl: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
        match ttl {
            Some(ttl) if !ttl.is_none() => seconds_arg("ttl", ttl),
            _ => self.default_ttl.ok_or_else(|| {
                PyTypeError::new_err(
                    "ttl= is needed (seconds, a timedelta or \"5m\"), or give the cache a \
                     default: Cache(..., default_ttl=...)",
                )
            }),
        }
    }

    /// Counts a failed Redis call; raises unless the cache fails open.
    pub(crate) fn absorb(&self, err: StoreError) -> PyResult<()> {
        Ok(self.engine.absorb(err)?)
    }

    pub(crate) fn uses_remote(&self) -> bool {
        self.engine.uses_remote()
    }

    /// `Cache.stats()`: counters and state as a plain dict.
    pub(crate) fn stats_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let engine = Arc::clone(&self.engine);
        let s = py.detach(move || engine.stats());
        release_pending(py);
        let lookups = s.hits + s.stale_hits + s.misses;
        let rate = |n: u64| {
            if lookups == 0 {
                0.0
            } else {
                n as f64 / lookups as f64
            }
        };
        let d = PyDict::new(py);
        d.set_item(
            "backend",
            if self.engine.remote().is_some() {
                "redis"
            } else {
                "memory"
            },
        )?;
        d.set_item("url", &self.url)?;
        d.set_item("namespace", self.engine.namespace())?;
        d.set_item("degraded", s.degraded)?;
        d.set_item("degraded_writes", s.degraded_writes)?;
        let policy = self.engine.remote().and_then(|r| r.eviction_policy());
        d.set_item(
            "evicts_tenuto_state",
            policy.as_deref().is_some_and(|p| p.starts_with("allkeys-")),
        )?;
        d.set_item("maxmemory_policy", policy)?;
        d.set_item("refused_writes", s.refused_writes)?;
        d.set_item("hits", s.hits)?;
        d.set_item("stale_hits", s.stale_hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("sets", s.sets)?;
        d.set_item("deletes", s.deletes)?;
        d.set_item("errors", s.decode_errors + s.backend_errors)?;
        d.set_item("decode_errors", s.decode_errors)?;
        d.set_item("backend_errors", s.backend_errors)?;
        d.set_item("outages", s.outages)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("size", s.size)?;
        d.set_item("coalesced", s.coalesced)?;
        d.set_item("loads", s.loads)?;
        d.set_item("hit_rate", rate(s.hits))?;
        d.set_item("stale_rate", rate(s.stale_hits))?;
        if let Some(local) = &s.local {
            d.set_item("local_hits", local.hits)?;
            d.set_item("local_size", local.size)?;
            d.set_item("local_invalidated", local.invalidated)?;
            d.set_item("local_flushes", local.flushes)?;
            d.set_item(
                "local_invalidation",
                match local.by {
                    Invalidated::Pending => "pending",
                    Invalidated::ByServer => "server",
                    Invalidated::ByTtlOnly => "ttl",
                },
            )?;
        }
        if let Some(store) = self.engine.remote().filter(|r| r.is_cluster()) {
            let store = Arc::clone(store);
            let health =
                py.detach(move || runtime::block_on(async move { store.node_health().await }));
            let nodes = PyList::empty(py);
            for (node, reachable) in health {
                let n = PyDict::new(py);
                n.set_item("address", format!("{}:{}", node.host, node.port))?;
                n.set_item("slots", node.slots)?;
                n.set_item("reachable", reachable)?;
                nodes.append(n)?;
            }
            d.set_item("nodes", nodes)?;
        }
        Ok(d)
    }

    fn lookup(&self, py: Python<'_>, found: Found<PyObj>) -> PyResult<PyLookup> {
        Ok(PyLookup {
            state: found.state,
            envelope: found.entry.map(|e| PyEnvelope::of(py, &e)).transpose()?,
            stale_fallback: false,
        })
    }

    fn plan(
        &self,
        py: Python<'_>,
        key: String,
        value: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Write<PyObj>> {
        let ttl = self.ttl_or_default(ttl)?;
        let stale_ttl = match stale_ttl {
            Some(s) if !s.is_none() => Some(seconds_arg("stale_ttl", s)?),
            _ => None,
        };
        let prepared = self.decoder.prepare(value)?;
        let write = self.engine.plan_write(key, prepared, ttl, stale_ttl);
        release_pending(py);
        Ok(write?)
    }
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

/// Checks a duration argument the way every tenuto duration is checked (a positive number
/// of seconds, at most `MAX_SECONDS`; bool refused) and returns it as a float.
#[pyfunction]
#[pyo3(name = "_seconds")]
pub fn seconds_py(name: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    seconds_arg(name, value)
}

/// A TTL argument: a positive number of seconds (bool refused).
pub(crate) fn seconds_arg(name: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if value.cast::<PyBool>().is_ok() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a number of seconds, not bool"
        )));
    }
    if let Ok(seconds) = value.extract::<f64>() {
        return Ok(super::check_ttl(name, seconds)?);
    }
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(super::parse_duration(name, text.to_str()?)?);
    }
    // datetime.timedelta (duck-typed: the limited C API has no timedelta type).
    let py = value.py();
    let timedelta = py
        .import(intern!(py, "datetime"))?
        .getattr(intern!(py, "timedelta"))?;
    if value.is_instance(&timedelta)? {
        let seconds: f64 = value
            .call_method0(intern!(py, "total_seconds"))?
            .extract()?;
        return Ok(super::check_ttl(name, seconds)?);
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a number of seconds, a datetime.timedelta or a string like \"90s\" / \"15m\" / \"90d\", not {}",
        value
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default()
    )))
}

/// A keyed envelope cache on memory or Redis/Valkey, with fail-open fallback to memory.
#[pyclass(frozen, module = "tenuto._core", name = "Cache")]
pub struct PyCache {
    pub(crate) binding: Arc<CacheBinding>,
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
        "unsupported cache URL {:?}: expected memory://, redis://, rediss://, valkey://, valkeys:// or one of them with +cluster",
        super::redis::redact(url)
    )))
}

fn timeout_arg(name: &str, seconds: f64) -> PyResult<Duration> {
    Ok(super::check_duration(name, seconds)?)
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

fn lookups_dict<'py>(
    py: Python<'py>,
    binding: &CacheBinding,
    keys: &[String],
    found: Vec<Found<PyObj>>,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (key, found) in keys.iter().zip(found) {
        out.set_item(key, binding.lookup(py, found)?)?;
    }
    Ok(out)
}

fn envelopes_dict<'py>(
    py: Python<'py>,
    keys: &[Py<PyAny>],
    entries: Vec<Arc<Entry<PyObj>>>,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (key, entry) in keys.iter().zip(entries) {
        out.set_item(key, PyEnvelope::of(py, &entry)?)?;
    }
    Ok(out)
}

/// The keys of a `set_many` (as given) and their planned writes.
type PlannedMany = (Vec<Py<PyAny>>, Vec<Write<PyObj>>);

impl PyCache {
    fn plan_many(
        &self,
        py: Python<'_>,
        mapping: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PlannedMany> {
        let items = mapping.call_method0("items").map_err(|_| {
            PyTypeError::new_err("set_many() takes a mapping of str keys to values")
        })?;
        let mut keys = Vec::new();
        let mut writes = Vec::new();
        for item in items.try_iter()? {
            let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            let text = key_str(&key)?.to_owned();
            writes.push(self.binding.plan(py, text, &value, ttl, stale_ttl)?);
            keys.push(key.unbind());
        }
        Ok((keys, writes))
    }

    fn plan_one(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Write<PyObj>> {
        let key = key_str(key)?.to_owned();
        self.binding.plan(py, key, value, ttl, stale_ttl)
    }
}

/// The TTL (seconds) a `cached()` call names, or the cache's default.
fn self_ttl(cache: &Bound<'_, PyCache>, ttl: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
    cache.get().binding.ttl_or_default(ttl).map_err(|err| {
        if ttl.is_none_or(|t| t.is_none()) {
            PyTypeError::new_err(
                "@cache.cached needs ttl= (seconds, a timedelta or \"5m\"), or a cache with \
                 a default: Cache(..., default_ttl=...)",
            )
        } else {
            err
        }
    })
}

/// Every cache alive in this process, for an exporter to read at scrape time.
static LIVE_CACHES: std::sync::Mutex<Vec<std::sync::Weak<CacheBinding>>> =
    std::sync::Mutex::new(Vec::new());

/// `stats()` of every live cache (metrics exporters read this at scrape time).
#[pyfunction]
pub fn all_cache_stats<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
    let live: Vec<Arc<CacheBinding>> = crate::sync::lock(&LIVE_CACHES)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let out = PyList::empty(py);
    for cache in live {
        out.append(cache.stats_dict(py)?)?;
    }
    Ok(out)
}

#[pymethods]
impl PyCache {
    #[new]
    #[pyo3(signature = (
        url = None, namespace = "app", max_entries = Count(10_000), jitter = 0.1, fail_open = true,
        *, serializer = "json", max_value_bytes = Count(16 * 1024 * 1024), connect_timeout = 0.25,
        command_timeout = 1.0, clock = None, local = None, local_ttl = None, default_ttl = None
    ),
    text_signature = "(url=None, namespace='app', max_entries=10000, jitter=0.1, fail_open=True, *, serializer='json', max_value_bytes=16777216, connect_timeout=0.25, command_timeout=1.0, clock=None, local=None, local_ttl=5.0, default_ttl=None)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: Option<&str>,
        namespace: &str,
        max_entries: Count,
        jitter: f64,
        fail_open: bool,
        serializer: &str,
        max_value_bytes: Count,
        connect_timeout: f64,
        command_timeout: f64,
        clock: Option<&Bound<'_, PyAny>>,
        local: Option<Count>,
        local_ttl: Option<&Bound<'_, PyAny>>,
        default_ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let default_ttl = match default_ttl {
            Some(ttl) if !ttl.is_none() => Some(seconds_arg("default_ttl", ttl)?),
            _ => None,
        };
        let local_ttl = match local_ttl {
            Some(ttl) if !ttl.is_none() => seconds_arg("local_ttl", ttl)?,
            _ => 5.0,
        };
        let (Count(max_entries), Count(max_value_bytes)) = (max_entries, max_value_bytes);
        let local = match local {
            None => None,
            Some(Count(n)) if n < 1 => {
                return Err(PyValueError::new_err(format!(
                    "local must be a number of entries of at least 1, got {n}"
                )))
            }
            Some(Count(n)) => {
                if !(local_ttl.is_finite() && (1.0..=86_400.0).contains(&local_ttl)) {
                    return Err(PyValueError::new_err(format!(
                        "local_ttl must be between 1 and 86400 seconds, got {local_ttl}"
                    )));
                }
                Some((n as u64, local_ttl.ceil() as i64))
            }
        };
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
        let serializer = Serializer::parse(serializer)?;
        let redis_url = parse_backend(url)?;
        if serializer == Serializer::Object && redis_url.is_some() {
            return Err(PyValueError::new_err(
                "serializer=\"object\" keeps values as Python objects, in memory only; a Redis \
                 URL needs \"json\" (or \"pickle\")",
            ));
        }
        let redis = match &redis_url {
            Some(url) => Some(RedisStore::new(RedisConfig {
                url: url.clone(),
                connect_timeout: timeout_arg("connect_timeout", connect_timeout)?,
                command_timeout: timeout_arg("command_timeout", command_timeout)?,
                tracking_prefix: local.map(|_| format!("{namespace}:")),
            })?),
            None => None,
        };
        let url = redis
            .as_ref()
            .map(|r| r.display_url.clone())
            .unwrap_or_else(|| "memory://".into());
        let clock = PyClock::from_arg(clock)?;
        let config = Config {
            namespace: namespace.to_string(),
            jitter,
            fail_open,
            max_entries: max_entries as u64,
            max_value_bytes: max_value_bytes as usize,
            local,
        };
        let engine = Engine::new(config, clock_ref(&clock, py), redis)?;
        let binding = Arc::new(CacheBinding {
            engine,
            url,
            default_ttl,
            serializer,
            decoder: Arc::new(PyDecoder::new(serializer, None)),
            clock,
        });
        let mut live = crate::sync::lock(&LIVE_CACHES);
        live.retain(|c| c.strong_count() > 0);
        live.push(Arc::downgrade(&binding));
        Ok(Self { binding })
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
        self.binding.engine.namespace()
    }

    #[getter]
    fn url(&self) -> &str {
        &self.binding.url
    }

    /// The Redis URL with its password, for tenuto objects that share this cache's Redis
    /// (inbound limits); None on memory. Not for display: `url` hides the password.
    #[getter]
    fn _connection_url(&self) -> Option<String> {
        self.binding
            .engine
            .remote()
            .map(|r| r.connection_url().to_owned())
    }

    #[getter]
    fn backend(&self) -> &'static str {
        if self.binding.engine.remote().is_some() {
            "redis"
        } else {
            "memory"
        }
    }

    /// Look `key` up: a `Lookup` whose state is "hit", "stale" or "miss".
    fn get(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<PyLookup> {
        let key = key_str(key)?;
        let b = &self.binding;
        let found = run_sync(py, b.uses_remote(), b.engine.get(key, &*b.decoder, true))?;
        b.lookup(py, found)
    }

    fn aget<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let key = key_str(key)?.to_owned();
        let b = Arc::clone(&self.binding);
        let work = {
            let b = Arc::clone(&b);
            async move { b.engine.get(&key, &*b.decoder, true).await }
        };
        run_async(py, b.uses_remote(), work, move |py, found| {
            Ok(Py::new(py, b.lookup(py, found?)?)?.into_any())
        })
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
        let write = self.plan_one(py, key, value, ttl, stale_ttl)?;
        let b = &self.binding;
        let entries = run_sync(py, b.uses_remote(), b.engine.commit(vec![write]))?;
        PyEnvelope::of(py, &entries[0])
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
        let write = self.plan_one(py, key, value, ttl, stale_ttl)?;
        let b = Arc::clone(&self.binding);
        let engine = Arc::clone(&b.engine);
        let work = async move { engine.commit(vec![write]).await };
        run_async(py, b.uses_remote(), work, move |py, entries| {
            Ok(PyEnvelope::of(py, &entries?[0])?.into_any())
        })
    }

    /// Look up many keys; Redis answers them in one MGET. Returns `{key: Lookup}`.
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let keys = key_list(keys)?;
        let b = &self.binding;
        let found = run_sync(py, b.uses_remote(), b.engine.get_many(&keys, &*b.decoder))?;
        lookups_dict(py, b, &keys, found)
    }

    fn aget_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys = Arc::new(key_list(keys)?);
        let b = Arc::clone(&self.binding);
        let work = {
            let (b, keys) = (Arc::clone(&b), Arc::clone(&keys));
            async move { b.engine.get_many(&keys, &*b.decoder).await }
        };
        run_async(py, b.uses_remote(), work, move |py, found| {
            Ok(lookups_dict(py, &b, &keys, found?)?.into_any().unbind())
        })
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
        let (keys, writes) = self.plan_many(py, mapping, ttl, stale_ttl)?;
        let b = &self.binding;
        let entries = run_sync(py, b.uses_remote(), b.engine.commit(writes))?;
        envelopes_dict(py, &keys, entries)
    }

    #[pyo3(signature = (mapping, ttl = None, stale_ttl = None))]
    fn aset_many<'py>(
        &self,
        py: Python<'py>,
        mapping: &Bound<'py, PyAny>,
        ttl: Option<&Bound<'py, PyAny>>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (keys, writes) = self.plan_many(py, mapping, ttl, stale_ttl)?;
        let b = Arc::clone(&self.binding);
        let engine = Arc::clone(&b.engine);
        let work = async move { engine.commit(writes).await };
        run_async(py, b.uses_remote(), work, move |py, entries| {
            Ok(envelopes_dict(py, &keys, entries?)?.into_any().unbind())
        })
    }

    /// Remove `key`; True if it was there.
    fn delete(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let keys = vec![key_str(key)?.to_owned()];
        let b = &self.binding;
        Ok(run_sync(py, b.uses_remote(), b.engine.delete(keys))? > 0)
    }

    fn adelete<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys = vec![key_str(key)?.to_owned()];
        let engine = Arc::clone(&self.binding.engine);
        let work = async move { engine.delete(keys).await };
        run_async(py, self.binding.uses_remote(), work, move |py, removed| {
            Ok(PyBool::new(py, removed? > 0).to_owned().into_any().unbind())
        })
    }

    /// Remove every entry of this cache's namespace (Redis: SCAN + UNLINK, never KEYS).
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let b = &self.binding;
        Ok(run_sync(py, b.uses_remote(), b.engine.clear())?)
    }

    fn aclear<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let engine = Arc::clone(&self.binding.engine);
        let work = async move { engine.clear().await };
        run_async(py, self.binding.uses_remote(), work, move |py, done| {
            done?;
            Ok(py.None())
        })
    }

    /// Counters and backend health as a plain dict (no I/O).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.binding.stats_dict(py)
    }

    /// The full Redis key (namespace included) under which `key` is stored.
    fn backend_key(&self, key: &Bound<'_, PyAny>) -> PyResult<String> {
        Ok(self.binding.redis_key(key_str(key)?))
    }

    /// Decorator caching a function's results in this cache, for sync and `async def`
    /// functions alike (see `tenuto.Cache.cached` in the README).
    #[pyo3(signature = (
        ttl = None, stale_ttl = None, name = None, key = None, negative = None, distributed = None,
        *, lock_ttl = None, wait_timeout = None, breaker = None, r#type = None, isolated = false,
        **others
    ))]
    #[allow(clippy::too_many_arguments)]
    fn cached<'py>(
        slf: &Bound<'py, Self>,
        ttl: Option<&Bound<'py, PyAny>>,
        stale_ttl: Option<&Bound<'py, PyAny>>,
        name: Option<&Bound<'py, PyAny>>,
        key: Option<&Bound<'py, PyAny>>,
        negative: Option<&Bound<'py, PyAny>>,
        distributed: Option<bool>,
        lock_ttl: Option<&Bound<'py, PyAny>>,
        wait_timeout: Option<&Bound<'py, PyAny>>,
        breaker: Option<&Bound<'py, PyAny>>,
        r#type: Option<&Bound<'py, PyAny>>,
        isolated: bool,
        others: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        if let Some((name, _)) = others.and_then(|o| o.iter().next()) {
            let name = name.to_string();
            let hint = if ["timeout", "expire", "expires", "expiry", "ttl_seconds"]
                .contains(&name.as_str())
            {
                " (other caches call it that; tenuto's is ttl=, in seconds, a timedelta or \"5m\")"
            } else {
                ""
            };
            return Err(PyTypeError::new_err(format!(
                "cached() got an unexpected keyword argument {name:?}{hint}"
            )));
        }
        // A bare `@cache.cached` receives the function itself: cache it with default_ttl.
        let bare = ttl
            .filter(|t| t.is_callable() && seconds_arg("ttl", t).is_err())
            .cloned();
        let ttl = match &bare {
            Some(_) => None,
            None => ttl,
        };
        let ttl = self_ttl(slf, ttl)?;
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
        kwargs.set_item("type", r#type)?;
        kwargs.set_item("isolated", isolated)?;
        let decorate = py
            .import("tenuto._cached")?
            .getattr("decorator")?
            .call((slf,), Some(&kwargs))?;
        match bare {
            Some(function) => decorate.call1((function,)),
            None => Ok(decorate),
        }
    }

    /// The cache clock's time in whole epoch seconds.
    fn now(&self) -> i64 {
        self.binding.engine.now()
    }

    fn __repr__(&self) -> String {
        format!(
            "Cache(url={:?}, namespace={:?})",
            self.binding.url,
            self.binding.engine.namespace()
        )
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        self.binding.clock.traverse(&visit)
    }
}
