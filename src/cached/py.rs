//! Bindings behind `@cache.cached`: the key of a call and the fast path of a fresh memory
//! hit run here, in Rust. Everything else (stale, miss, single-flight, Redis) is the
//! Python subclass's `_slow`, where the upstream call dominates the time anyway.
//! Also the per-request state behind `tenuto.current_state()` and the X-Cache headers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{ffi, intern};

use super::{from_severity, severity};
use crate::cache::memory::Entry;
use crate::cache::py::{count_hit, CacheCore, PyCache, Stored};
use crate::cache::State;
use crate::codec::py::{write_value, CANONICAL};
use crate::codec::write_json_str;
use crate::graveyard::release_pending;
use crate::key::key_from_json;
use crate::runtime::py::Ready;

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

fn parse_state(state: &str) -> PyResult<State> {
    match state {
        "hit" => Ok(State::Hit),
        "stale" => Ok(State::Stale),
        "miss" => Ok(State::Miss),
        other => Err(PyValueError::new_err(format!(
            "state must be \"hit\", \"stale\" or \"miss\", got {other:?}"
        ))),
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
/// found with the store generation it was found at (saves the moka lookup while valid).
struct Remembered {
    key: Arc<str>,
    entry: Option<Arc<Entry<Stored>>>,
    generation: u64,
}

/// Calls remembered per function; emptied when it reaches this size.
const FRONT_LIMIT: usize = 4096;

type Front = HashMap<String, Remembered, foldhash::fast::RandomState>;

/// The native base of a cached function: key derivation and the fresh-hit fast path.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "CachedCall")]
pub struct PyCachedCall {
    cache: Arc<CacheCore>,
    name: String,
    keyer: Keyer,
    is_async: bool,
    front: Mutex<Front>,
}

fn unkeyable(function: &str, what: &str, err: PyErr, py: Python<'_>) -> PyErr {
    PyTypeError::new_err(format!(
        "{what} of {function}() cannot be part of a cache key ({}); pass key= to choose \
         what identifies a call",
        err.value(py)
    ))
}

impl PyCachedCall {
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
    ) -> (Option<Arc<str>>, Option<Arc<Entry<Stored>>>) {
        let front = self.front.lock().unwrap_or_else(|p| p.into_inner());
        match front.get(identity.text()) {
            Some(r) => (
                Some(Arc::clone(&r.key)),
                r.entry
                    .as_ref()
                    .filter(|_| r.generation == generation)
                    .cloned(),
            ),
            None => (None, None),
        }
    }

    fn remember(
        &self,
        identity: Identity,
        key: Arc<str>,
        entry: Option<Arc<Entry<Stored>>>,
        generation: u64,
    ) {
        let mut front = self.front.lock().unwrap_or_else(|p| p.into_inner());
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
                entry,
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

#[pymethods]
impl PyCachedCall {
    /// `params`: (name, positional, keyword, has_default, default) per parameter, in
    /// signature order; `bind` replaces them for signatures with *args or **kwargs.
    #[new]
    #[pyo3(signature = (cache, name, params, *, key = None, bind = None, is_async = false))]
    fn new(
        cache: &Bound<'_, PyCache>,
        name: String,
        params: Vec<(String, bool, bool, bool, Py<PyAny>)>,
        key: Option<Py<PyAny>>,
        bind: Option<Py<PyAny>>,
        is_async: bool,
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
        Ok(Self {
            cache: Arc::clone(&cache.get().core),
            name,
            keyer,
            is_async,
            front: Mutex::new(Front::default()),
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
        let memory = &this.cache.memory;
        // Read the generation before any entry: see `MemoryStore::generation`.
        let generation = memory.generation();
        let (key, mut entry) = this.remembered(&identity, generation);
        let known = key.is_some() && entry.is_some();
        let key = key.unwrap_or_else(|| this.key_of_identity(&identity));
        // NOTE: a fresh memory hit stays here, with the GIL held: no thread hop, no Python
        // frame, and (when remembered) no sha256 and no moka lookup. Redis lookups and
        // everything else go to `_slow`.
        if this.cache.redis.is_none() {
            if entry.is_none() {
                entry = memory.get(&key);
            }
            if !known {
                this.remember(identity, Arc::clone(&key), entry.clone(), generation);
            }
            if let Some(entry) = entry {
                if entry.times.state(this.cache.clock.now_secs(py)?) == State::Hit {
                    count_hit(&this.cache);
                    record_state(py, State::Hit)?;
                    let value = entry.value.get().get().payload_ref(py);
                    drop(entry);
                    release_pending(py);
                    return if this.is_async {
                        Ok(Bound::new(py, Ready::new(value))?.into_any().unbind())
                    } else {
                        Ok(value)
                    };
                }
            }
        } else if !known {
            this.remember(identity, Arc::clone(&key), None, 0);
        }
        let kwargs = match kwargs {
            Some(k) => k.clone(),
            None => PyDict::new(py),
        };
        Ok(slf
            .call_method1(intern!(py, "_slow"), (&*key, args, kwargs))?
            .unbind())
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
