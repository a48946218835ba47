//! Bindings behind `@cache.cached`: the key of a call and the fast path of a fresh memory
//! hit run here, in Rust. Everything else (stale, miss, single-flight, Redis) is the
//! Python subclass's `_slow`, where the upstream call dominates the time anyway.
//! Also the per-request state behind `tenuto.current_state()` and the X-Cache headers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{ffi, intern};

use std::time::Duration;

use pyo3::exceptions::PyException;

use super::{from_severity, severity};
use crate::cache::engine::{Backoff, Begin, CallPolicy, LockPolicy, Served, Ticket};
use crate::cache::memory::Entry;
use crate::cache::py::{
    parse_state, run_async, run_sync, seconds_arg, CacheBinding, PyCache, PyDecoder, PyEnvelope,
    PyLookup, PyObj,
};
use crate::cache::redis::RedisStore;
use crate::cache::{check_duration, State};
use crate::codec::py::{write_value, CANONICAL};
use crate::codec::write_json_str;
use crate::graveyard::release_pending;
use crate::key::key_from_json;
use crate::runtime::py::Ready;

type PyTicketInner = Ticket<PyObj, RedisStore>;

/// The worst state among the cached calls of one request: stale > miss > hit.
#[pyclass(frozen, module = "tenuto._core", name = "RequestState")]
#[derive(Default)]
pub struct PyRequestState {
    level: AtomicU8,
}

impl PyRequestState {
    fn record(&self, state: State) {
        self.level.fetch_max(severity(state), Ordering::Relaxed);
    }
}

#[pymethods]
impl PyRequestState {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Notes one cached call's state.
    #[pyo3(name = "record")]
    fn record_py(&self, state: &str) -> PyResult<()> {
        self.record(parse_state(state)?);
        Ok(())
    }

    /// "stale" if any call was stale, else "miss" if any missed, else "hit"; None when no
    /// cached call was made.
    #[getter]
    fn state(&self) -> Option<&'static str> {
        from_severity(self.level.load(Ordering::Relaxed)).map(State::as_str)
    }
}

/// The context variable holding the current request's `RequestState` (None outside one).
pub fn request_var(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static VAR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    VAR.get_or_try_init(py, || {
        let contextvars = py.import("contextvars")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("default", py.None())?;
        let var = contextvars
            .getattr("ContextVar")?
            .call(("tenuto_request_state",), Some(&kwargs))?;
        Ok::<_, PyErr>(var.unbind())
    })
    .map(|v| v.bind(py))
}

fn current_request(py: Python<'_>) -> PyResult<Option<Bound<'_, PyRequestState>>> {
    let var = request_var(py)?;
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: `var` is a ContextVar; PyContextVar_Get returns a new reference (its default,
    // None, when unset) or -1 with an exception set.
    let value = unsafe {
        if ffi::PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &mut value) < 0 {
            return Err(PyErr::fetch(py));
        }
        Bound::from_owned_ptr_or_opt(py, value)
    };
    Ok(value.and_then(|v| v.cast_into::<PyRequestState>().ok()))
}

pub fn record_state(py: Python<'_>, state: State) -> PyResult<()> {
    if let Some(request) = current_request(py)? {
        request.get().record(state);
    }
    Ok(())
}

/// Notes a cached call's state in the current request, if there is one.
#[pyfunction]
#[pyo3(name = "_record_state")]
pub fn record_state_py(py: Python<'_>, state: &str) -> PyResult<()> {
    record_state(py, parse_state(state)?)
}

/// The state of the cached calls made in the current request context: "stale" if any was
/// stale, else "miss" if any missed, else "hit"; None outside a request scope or before
/// any cached call.
#[pyfunction]
pub fn current_state(py: Python<'_>) -> PyResult<Option<&'static str>> {
    Ok(current_request(py)?.and_then(|r| r.get().state()))
}

/// The ContextVar behind `current_state()`; request middleware sets a fresh
/// `RequestState` in it per request.
#[pyfunction]
#[pyo3(name = "_request_var")]
pub fn request_var_py(py: Python<'_>) -> PyResult<Py<PyAny>> {
    Ok(request_var(py)?.clone().unbind())
}

struct Param {
    name: String,
    positional: bool,
    keyword: bool,
    default: Option<Py<PyAny>>,
}

enum Keyer {
    /// Arguments bound to these parameters in Rust; `sorted` lists them by name, the
    /// order of the canonical JSON object.
    Params {
        params: Vec<Param>,
        sorted: Vec<usize>,
    },
    /// `key=`: the user's function of the call's arguments.
    Custom(Py<PyAny>),
    /// Signatures with *args/**kwargs: a Python function binds them to a dict.
    Bind(Py<PyAny>),
}

/// What identifies a call before hashing: the key itself (a `key=` function returned a
/// str), or the canonical JSON of the arguments, whose sha256 makes the key.
enum Identity {
    Key(String),
    Json(String),
}

impl Identity {
    fn text(&self) -> &str {
        match self {
            Identity::Key(k) | Identity::Json(k) => k,
        }
    }
}

/// One remembered call: its key (saves the sha256) and, on a memory cache, the entry it
/// found with the store generation it was found at (saves the store lookup while valid).
struct Remembered {
    key: Arc<str>,
    /// Weak: the store alone keeps values alive, so what it evicts or drops is freed.
    entry: Option<Weak<Entry<PyObj>>>,
    generation: u64,
}

/// Calls remembered per function; emptied when it reaches this size.
const FRONT_LIMIT: usize = 4096;

type Front = HashMap<String, Remembered, foldhash::fast::RandomState>;

/// The native base of a cached function: key derivation and the fresh-hit fast path.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "CachedCall")]
pub struct PyCachedCall {
    cache: Arc<CacheBinding>,
    name: String,
    keyer: Keyer,
    is_async: bool,
    front: Mutex<Front>,
    policy: Arc<CallPolicy>,
    /// Payloads to values (with the function's `TypeAdapter` when it is typed).
    decoder: Arc<PyDecoder>,
    function: Py<PyAny>,
    /// `Backoff.when`: which results are negative answers.
    negative_when: Option<Py<PyAny>>,
    breaker: Option<Py<PyAny>>,
    /// Each hit returns a copy instead of the stored object.
    isolated: bool,
}

fn unkeyable(function: &str, what: &str, err: PyErr, py: Python<'_>) -> PyErr {
    PyTypeError::new_err(format!(
        "{what} of {function}() cannot be part of a cache key ({}); pass key= to choose \
         what identifies a call",
        err.value(py)
    ))
}

impl PyCachedCall {
    /// A fresh hit answered here, with the GIL held: no thread hop, no Python frame.
    fn serve_hit(&self, py: Python<'_>, entry: &Arc<Entry<PyObj>>) -> PyResult<Py<PyAny>> {
        self.cache.engine.count_hit();
        record_state(py, State::Hit)?;
        let mut value = entry.value.get().clone_ref(py);
        release_pending(py);
        if self.isolated {
            value = deepcopy(value.bind(py))?.unbind();
        }
        if self.is_async {
            Ok(Bound::new(py, Ready::new(value))?.into_any().unbind())
        } else {
            Ok(value)
        }
    }

    fn canonical_of(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        what: &str,
    ) -> PyResult<Identity> {
        let mut json = String::with_capacity(64);
        write_value(&mut json, data, CANONICAL, 0)
            .map_err(|e| unkeyable(&self.name, what, e, py))?;
        Ok(Identity::Json(json))
    }

    fn identity(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Identity> {
        match &self.keyer {
            Keyer::Custom(f) => {
                let chosen = f.bind(py).call(args, kwargs)?;
                match chosen.cast::<PyString>() {
                    Ok(s) => Ok(Identity::Key(s.to_str()?.to_owned())),
                    Err(_) => self.canonical_of(py, &chosen, "the value returned by key="),
                }
            }
            Keyer::Bind(f) => {
                let kwargs = match kwargs {
                    Some(k) => k.clone(),
                    None => PyDict::new(py),
                };
                let bound = f.bind(py).call1((args, kwargs))?;
                self.canonical_of(py, &bound, "an argument")
            }
            Keyer::Params { params, sorted } => self.bind_params(py, params, sorted, args, kwargs),
        }
    }

    fn key_of_identity(&self, identity: &Identity) -> Arc<str> {
        match identity {
            Identity::Key(k) => Arc::from(k.as_str()),
            Identity::Json(json) => Arc::from(key_from_json(&self.name, json)),
        }
    }

    /// The key of the call, and the entry remembered for it if still current.
    fn remembered(
        &self,
        identity: &Identity,
        generation: u64,
    ) -> (Option<Arc<str>>, Option<Arc<Entry<PyObj>>>) {
        let front = crate::sync::lock(&self.front);
        match front.get(identity.text()) {
            Some(r) => (
                Some(Arc::clone(&r.key)),
                r.entry
                    .as_ref()
                    .filter(|_| r.generation == generation)
                    .and_then(Weak::upgrade),
            ),
            None => (None, None),
        }
    }

    fn remember(
        &self,
        identity: Identity,
        key: Arc<str>,
        entry: Option<Arc<Entry<PyObj>>>,
        generation: u64,
    ) {
        let mut front = crate::sync::lock(&self.front);
        if front.len() >= FRONT_LIMIT {
            front.clear();
        }
        let text = match identity {
            Identity::Key(k) | Identity::Json(k) => k,
        };
        front.insert(
            text,
            Remembered {
                key,
                entry: entry.as_ref().map(Arc::downgrade),
                generation,
            },
        );
    }

    fn key_of(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let identity = self.identity(py, args, kwargs)?;
        Ok(match self.remembered(&identity, 0).0 {
            Some(key) => key.to_string(),
            None => self.key_of_identity(&identity).to_string(),
        })
    }

    fn bind_params(
        &self,
        py: Python<'_>,
        params: &[Param],
        sorted: &[usize],
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Identity> {
        let name = &self.name;
        let mut slots: Vec<Option<Bound<'_, PyAny>>> = vec![None; params.len()];
        let positional = params.iter().take_while(|p| p.positional).count();
        if args.len() > positional {
            return Err(PyTypeError::new_err(format!(
                "{name}() takes {positional} positional arguments but {} were given",
                args.len()
            )));
        }
        for (slot, arg) in slots.iter_mut().zip(args.iter()) {
            *slot = Some(arg);
        }
        if let Some(kwargs) = kwargs {
            for (k, v) in kwargs.iter() {
                let k_str = k.cast::<PyString>()?.to_str()?;
                let Some(i) = params.iter().position(|p| p.keyword && p.name == k_str) else {
                    return Err(PyTypeError::new_err(format!(
                        "{name}() got an unexpected keyword argument {k_str:?}"
                    )));
                };
                if slots[i].is_some() {
                    return Err(PyTypeError::new_err(format!(
                        "{name}() got multiple values for argument {k_str:?}"
                    )));
                }
                slots[i] = Some(v);
            }
        }
        let mut json = String::with_capacity(16 + 16 * params.len());
        json.push('{');
        for (n, &i) in sorted.iter().enumerate() {
            let param = &params[i];
            let value = match (&slots[i], &param.default) {
                (Some(v), _) => v.clone(),
                (None, Some(default)) => default.bind(py).clone(),
                (None, None) => {
                    return Err(PyTypeError::new_err(format!(
                        "{name}() missing required argument {:?}",
                        param.name
                    )))
                }
            };
            if n > 0 {
                json.push(',');
            }
            write_json_str(&mut json, &param.name, true);
            json.push(':');
            write_value(&mut json, &value, CANONICAL, 1)
                .map_err(|e| unkeyable(name, &format!("argument {:?}", param.name), e, py))?;
        }
        json.push('}');
        Ok(Identity::Json(json))
    }
}

/// A served value as a `Lookup`.
fn lookup_of(py: Python<'_>, served: &Served<PyObj>) -> PyResult<PyLookup> {
    Ok(PyLookup {
        state: served.state,
        envelope: Some(PyEnvelope::of(py, &served.entry)?),
        stale_fallback: served.stale_fallback,
    })
}

fn deepcopy<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    static DEEPCOPY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let py = value.py();
    DEEPCOPY
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("copy")?.getattr("deepcopy")?.unbind())
        })?
        .bind(py)
        .call1((value,))
}

/// The exception a shared failure carries, raised again for this caller.
fn raise_shared(py: Python<'_>, error: &PyObj) -> PyErr {
    PyErr::from_value(error.get().bind(py).clone())
}

impl PyCachedCall {
    fn served_value(&self, py: Python<'_>, served: &Served<PyObj>) -> PyResult<Py<PyAny>> {
        let value = served.entry.value.get().clone_ref(py);
        if self.isolated {
            return Ok(deepcopy(value.bind(py))?.unbind());
        }
        Ok(value)
    }

    fn call_function<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match &self.breaker {
            None => self.function.bind(py).call(args, kwargs),
            Some(breaker) => {
                // An open breaker raises CircuitOpen: stale data is served instead.
                let mut all = vec![self.function.bind(py).clone()];
                all.extend(args.iter());
                let all = PyTuple::new(py, all)?;
                breaker
                    .bind(py)
                    .getattr(intern!(py, "call"))?
                    .call(all, kwargs)
            }
        }
    }

    fn is_negative(&self, value: &Bound<'_, PyAny>) -> PyResult<bool> {
        match &self.negative_when {
            Some(when) => when.bind(value.py()).call1((value,))?.is_truthy(),
            None => Ok(false),
        }
    }

    /// The value's write, checked before anything is stored.
    fn plan(
        &self,
        ticket: &PyTicketInner,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<crate::cache::engine::Write<PyObj>> {
        let negative = self.is_negative(value)?;
        let prepared = self.decoder.prepare(value)?;
        Ok(ticket.plan(prepared, negative, &self.policy)?)
    }

    /// Stores a loaded value (the caller's thread waits with the GIL released).
    fn store_sync(
        &self,
        py: Python<'_>,
        ticket: PyTicketInner,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<Served<PyObj>> {
        let write = match self.plan(&ticket, value) {
            Ok(write) => write,
            Err(err) => return self.fail_sync(py, ticket, err),
        };
        let remote = ticket.uses_remote();
        Ok(run_sync(py, remote, ticket.store(write))?)
    }

    fn fail_sync(
        &self,
        py: Python<'_>,
        ticket: PyTicketInner,
        err: PyErr,
    ) -> PyResult<Served<PyObj>> {
        let exc = err.value(py).clone().into_any().unbind();
        let outcome = ticket.fail(crate::graveyard::Deferred::new(exc));
        release_pending(py);
        match outcome {
            Ok(served) => {
                log::warn!(target: "tenuto::cached", "fetch for {} failed ({}); serving the stale value", self.name, err);
                Ok(served)
            }
            Err(_) => Err(err),
        }
    }

    /// Runs the function for a ticket and stores its outcome (sync functions).
    fn load_sync(
        &self,
        py: Python<'_>,
        ticket: PyTicketInner,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Served<PyObj>> {
        match self.call_function(py, args, kwargs) {
            Ok(value) => self.store_sync(py, ticket, &value),
            // Exceptions are the load's outcome; BaseExceptions (KeyboardInterrupt,
            // SystemExit) are this caller's own: the ticket is dropped, a waiter takes over.
            Err(err) if err.is_instance_of::<PyException>(py) => self.fail_sync(py, ticket, err),
            Err(err) => {
                drop(ticket);
                Err(err)
            }
        }
    }

    /// A sync call through the cache: serve, refresh in the background, or load. `seen`:
    /// the memory generation and entry the fast path read.
    fn resolve_sync(
        slf: &Bound<'_, Self>,
        key: &str,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        force: bool,
        seen: Option<(u64, Option<Arc<Entry<PyObj>>>)>,
    ) -> PyResult<Served<PyObj>> {
        let this = slf.get();
        let py = slf.py();
        let engine = &this.cache.engine;
        let remote = this.cache.uses_remote();
        let begin = run_sync(
            py,
            remote,
            engine.begin(key, &this.policy, &*this.decoder, force, true, seen),
        )?;
        let served = match begin {
            Begin::Serve(served) => served,
            Begin::Failed(failure) => return Err(raise_shared(py, failure.error())),
            Begin::Refresh(served, ticket) => {
                let ticket = Py::new(py, PyTicket::new(slf, ticket))?;
                let kwargs = kwargs.map_or_else(|| PyDict::new(py), |k| k.clone());
                py.import("tenuto._cached")?
                    .getattr("submit_refresh")?
                    .call1((ticket, args, kwargs))?;
                served
            }
            Begin::Load(ticket) => {
                ticket.claim_for_current_thread();
                this.load_sync(py, ticket, args, kwargs)?
            }
        };
        record_state(py, served.state)?;
        Ok(served)
    }
}

#[pymethods]
impl PyCachedCall {
    /// `params`: (name, positional, keyword, has_default, default) per parameter, in
    /// signature order; `bind` replaces them for signatures with *args or **kwargs.
    /// `negative`: a `tenuto.Backoff`; `lock_ttl` None: no lock across processes.
    #[new]
    #[pyo3(signature = (
        cache, name, params, function, ttl, *, stale_ttl = None, key = None, bind = None,
        is_async = false, negative = None, lock_ttl = None, wait_timeout = None,
        breaker = None, adapter = None, isolated = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        cache: &Bound<'_, PyCache>,
        name: String,
        params: Vec<(String, bool, bool, bool, Py<PyAny>)>,
        function: Py<PyAny>,
        ttl: &Bound<'_, PyAny>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
        key: Option<Py<PyAny>>,
        bind: Option<Py<PyAny>>,
        is_async: bool,
        negative: Option<&Bound<'_, PyAny>>,
        lock_ttl: Option<&Bound<'_, PyAny>>,
        wait_timeout: Option<&Bound<'_, PyAny>>,
        breaker: Option<Py<PyAny>>,
        adapter: Option<Py<PyAny>>,
        isolated: bool,
    ) -> PyResult<Self> {
        let keyer = match (key, bind) {
            (Some(f), _) => Keyer::Custom(f),
            (None, Some(f)) => Keyer::Bind(f),
            (None, None) => {
                let params: Vec<Param> = params
                    .into_iter()
                    .map(|(name, positional, keyword, has_default, default)| Param {
                        name,
                        positional,
                        keyword,
                        default: has_default.then_some(default),
                    })
                    .collect();
                let mut sorted: Vec<usize> = (0..params.len()).collect();
                sorted.sort_by(|&a, &b| params[a].name.cmp(&params[b].name));
                Keyer::Params { params, sorted }
            }
        };
        let ttl = seconds_arg("ttl", ttl)?;
        let stale_ttl = match stale_ttl {
            Some(s) if !s.is_none() => Some(seconds_arg("stale_ttl", s)?),
            _ => None,
        };
        let (backoff, negative_when) = match negative {
            Some(b) if !b.is_none() => (
                Some(Backoff::new(
                    b.getattr("base")?.extract()?,
                    b.getattr("factor")?.extract()?,
                    b.getattr("max")?.extract()?,
                )?),
                Some(b.getattr("when")?.unbind()),
            ),
            _ => (None, None),
        };
        let lock = match lock_ttl {
            Some(t) if !t.is_none() => Some(LockPolicy {
                ttl: check_duration("lock_ttl", seconds_arg("lock_ttl", t)?)?,
                wait: match wait_timeout {
                    Some(w) if !w.is_none() => {
                        check_duration("wait_timeout", seconds_arg("wait_timeout", w)?)?
                    }
                    _ => Duration::from_secs(8),
                },
            }),
            _ => None,
        };
        let binding = Arc::clone(&cache.get().binding);
        let decoder = Arc::new(PyDecoder::new(binding.serializer, adapter));
        Ok(Self {
            cache: binding,
            name,
            keyer,
            is_async,
            front: Mutex::new(Front::default()),
            policy: Arc::new(CallPolicy::new(ttl, stale_ttl, backoff, lock)?),
            decoder,
            function,
            negative_when,
            breaker,
            isolated,
        })
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__(
        slf: &Bound<'_, Self>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let this = slf.get();
        let py = slf.py();
        let identity = this.identity(py, args, kwargs)?;
        let engine = &this.cache.engine;
        let memory = &engine.memory;
        // Read the generation before any entry: see `MemoryStore::generation`.
        let generation = memory.generation();
        let (key, mut entry) = this.remembered(&identity, generation);
        let known = key.is_some() && entry.is_some();
        let key = key.unwrap_or_else(|| this.key_of_identity(&identity));
        // NOTE: a fresh memory hit stays here, with the GIL held: no thread hop, no Python
        // frame, and (when remembered) no sha256 and no store lookup. Everything else goes
        // through the engine's `begin`.
        if engine.remote().is_none() {
            if entry.is_none() {
                entry = memory.get(&key);
            }
            if !known {
                this.remember(identity, Arc::clone(&key), entry.clone(), generation);
            }
            if let Some(entry) = &entry {
                if entry.times.state(engine.now()) == State::Hit {
                    return this.serve_hit(py, entry);
                }
            }
        } else {
            if !known {
                this.remember(identity, Arc::clone(&key), None, 0);
            }
            // A local tier in front of Redis: a fresh copy is served here too.
            if let Some(copy) = engine.has_local().then(|| engine.local_hit(&key)).flatten() {
                return this.serve_hit(py, &copy);
            }
        }
        let entry_seen = entry;
        if this.is_async {
            let kwargs = kwargs.map_or_else(|| PyDict::new(py), |k| k.clone());
            return Ok(slf
                .call_method1(intern!(py, "_aslow"), (&*key, args, kwargs))?
                .unbind());
        }
        let seen = (engine.remote().is_none()).then_some((generation, entry_seen));
        let served = Self::resolve_sync(slf, &key, args, kwargs, false, seen)?;
        let value = this.served_value(py, &served);
        drop(served);
        release_pending(py);
        value
    }

    /// This function's upstream calls (loads and refreshes) for metrics: `ok`, `errors`,
    /// and their durations as cumulative `buckets` of (upper bound in seconds, count),
    /// `count` and `sum`.
    fn _upstream_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let upstream = &self.policy.upstream;
        let seconds = upstream.seconds.snapshot();
        let d = PyDict::new(py);
        d.set_item("name", &self.name)?;
        d.set_item("ok", upstream.ok.load(std::sync::atomic::Ordering::Relaxed))?;
        d.set_item(
            "errors",
            upstream.errors.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        d.set_item("buckets", seconds.cumulative)?;
        d.set_item("count", seconds.count)?;
        d.set_item("sum", seconds.sum_secs)?;
        Ok(d)
    }

    /// A sync call through the cache, answered as a `Lookup` (`force`: load even when a
    /// fresh value is there).
    #[pyo3(signature = (key, args, kwargs, force = false))]
    fn _resolve(
        slf: &Bound<'_, Self>,
        key: &str,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        force: bool,
    ) -> PyResult<PyLookup> {
        let served = Self::resolve_sync(slf, key, args, kwargs, force, None)?;
        lookup_of(slf.py(), &served)
    }

    /// The start of an async call: an awaitable of `(lookup, ticket)`: a `Lookup` to
    /// serve and no ticket; a stale `Lookup` and a ticket to refresh it in the background;
    /// or no `Lookup` and a ticket to load it. A shared failure is raised.
    #[pyo3(signature = (key, force = false))]
    fn _abegin<'py>(
        slf: &Bound<'py, Self>,
        key: String,
        force: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let engine = Arc::clone(&this.cache.engine);
        let policy = Arc::clone(&this.policy);
        let decoder = Arc::clone(&this.decoder);
        let owner = slf.clone().unbind();
        let work = async move {
            engine
                .begin(&key, &policy, &*decoder, force, false, None)
                .await
        };
        run_async(py, this.cache.uses_remote(), work, move |py, begin| {
            let owner = owner.bind(py);
            let pair = match begin? {
                Begin::Serve(served) => (Some(lookup_of(py, &served)?), None),
                Begin::Failed(failure) => return Err(raise_shared(py, failure.error())),
                Begin::Refresh(served, ticket) => (
                    Some(lookup_of(py, &served)?),
                    Some(PyTicket::new(owner, ticket)),
                ),
                Begin::Load(ticket) => (None, Some(PyTicket::new(owner, ticket))),
            };
            Ok(pair.into_pyobject(py)?.into_any().unbind())
        })
    }

    /// Followers waiting for the load of `key` in this process now.
    fn _followers(&self, key: &str) -> usize {
        self.cache.engine.followers(key)
    }

    /// Waits (GIL released) until no load or background refresh of `key` runs here.
    fn _settle(&self, py: Python<'_>, key: &str) {
        let engine = Arc::clone(&self.cache.engine);
        py.detach(|| crate::runtime::block_on(engine.settled(key)));
        release_pending(py);
    }

    /// `_settle` for async callers: an awaitable that never blocks the loop.
    fn _asettle<'py>(&self, py: Python<'py>, key: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = Arc::clone(&self.cache.engine);
        crate::runtime::py::spawn_for_asyncio(
            py,
            async move { engine.settled(&key).await },
            |py, ()| Ok(py.None()),
        )
    }

    /// Methods: bind the instance like a plain function would.
    fn __get__(
        slf: &Bound<'_, Self>,
        instance: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        match instance {
            Some(obj) if !obj.is_none() => {
                let method = py.import("types")?.getattr("MethodType")?;
                Ok(method.call1((slf, obj))?.unbind())
            }
            _ => Ok(slf.clone().into_any().unbind()),
        }
    }

    /// The cache key of a call with these arguments.
    #[pyo3(signature = (*args, **kwargs))]
    fn key(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        self.key_of(py, args, kwargs)
    }

    /// The name keys are derived from (`name=`, else module.qualname).
    #[getter]
    fn key_name(&self) -> &str {
        &self.name
    }

    #[getter]
    fn is_async(&self) -> bool {
        self.is_async
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.function)?;
        if let Some(f) = &self.negative_when {
            visit.call(f)?;
        }
        if let Some(b) = &self.breaker {
            visit.call(b)?;
        }
        match &self.keyer {
            Keyer::Custom(f) | Keyer::Bind(f) => visit.call(f)?,
            Keyer::Params { params, .. } => {
                for p in params {
                    if let Some(d) = &p.default {
                        visit.call(d)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The duty to load (or refresh) one key, handed to Python for an async function or a
/// background refresh. `store` / `fail` finish it; dropped unused, it abandons the load
/// and releases its lock.
#[pyclass(frozen, module = "tenuto._core", name = "Ticket")]
pub struct PyTicket {
    call: Py<PyCachedCall>,
    ticket: Mutex<Option<PyTicketInner>>,
}

impl PyTicket {
    fn new(call: &Bound<'_, PyCachedCall>, ticket: PyTicketInner) -> Self {
        Self {
            call: call.clone().unbind(),
            ticket: Mutex::new(Some(ticket)),
        }
    }

    fn take(&self) -> PyResult<PyTicketInner> {
        crate::sync::lock(&self.ticket).take().ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("this ticket was already used")
        })
    }
}

#[pymethods]
impl PyTicket {
    /// The work goes on on this thread (the event loop's): a sync call of the same key
    /// here would wait for itself, and raises instead.
    fn claim(&self) {
        if let Some(t) = &*crate::sync::lock(&self.ticket) {
            t.claim_for_current_thread();
        }
    }

    /// Stores the function's value: an awaitable of the `Lookup` served.
    fn store<'py>(
        &self,
        py: Python<'py>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ticket = self.take()?;
        let call = self.call.bind(py).get();
        let write = match call.plan(&ticket, value) {
            Ok(write) => write,
            Err(err) => {
                let lookup = lookup_of(py, &call.fail_sync(py, ticket, err)?)?;
                return Ok(Bound::new(py, Ready::new(Py::new(py, lookup)?.into_any()))?.into_any());
            }
        };
        let remote = ticket.uses_remote();
        run_async(
            py,
            remote,
            async move { ticket.store(write).await },
            |py, served| Ok(Py::new(py, lookup_of(py, &served?)?)?.into_any()),
        )
    }

    /// The function raised `error`: the stale `Lookup` (stale-if-error), or `error` again.
    fn fail(
        &self,
        py: Python<'_>,
        error: &Bound<'_, pyo3::exceptions::PyBaseException>,
    ) -> PyResult<PyLookup> {
        let ticket = self.take()?;
        let err = PyErr::from_value(error.clone().into_any());
        let served = self.call.bind(py).get().fail_sync(py, ticket, err)?;
        lookup_of(py, &served)
    }

    /// Gives the duty up (cancelled): a waiter takes over, the lock is released.
    fn abandon(&self, py: Python<'_>) {
        let ticket = crate::sync::lock(&self.ticket).take();
        drop(ticket);
        release_pending(py);
    }

    /// Runs a background refresh of a sync function on this (pool) thread; a failure is
    /// logged and keeps the stale value.
    fn run_refresh(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let ticket = self.take()?;
        let call = self.call.bind(py).get();
        let key = ticket.key().to_owned();
        match call.load_sync(py, ticket, args, Some(kwargs)) {
            Ok(_) => Ok(()),
            Err(err) if err.is_instance_of::<PyException>(py) => {
                log::warn!(target: "tenuto::cached", "background refresh of {key} failed: {err}");
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.call)
    }
}
