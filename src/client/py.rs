//! `ClientCore` (`tenuto.Client`'s native base) and `Response`: argument conversion, and
//! the `Upstream` the core's `call` runs over: reqwest, the limiter, the breaker, and the
//! clock. Every decision is in `client` (mod.rs). A sync call waits with the GIL released;
//! an async one runs on tenuto's runtime, and cancelling its task drops the request.

use std::sync::Arc;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use pyo3::IntoPyObjectExt;
use reqwest::header::{HeaderMap, IF_MODIFIED_SINCE, IF_NONE_MATCH};

use super::http::{header, Http, HttpConfig};
use super::{
    call, seconds_arg, status_error, BoxFuture, ClientError, ClientStats, Policy, Redactor, Reply,
    Request, RetryBudget, SendError, Shared, Upstream, EXCERPT_CHARS, NANOS,
};
use crate::cached::py::PyCachedCall;
use crate::clock::py::PyFakeClock;
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::codec::py::{from_json, to_json, PAYLOAD};
use crate::error::py::{Count, TenutoError};
use crate::limit::py::{CircuitOpen, PyCircuitBreaker, PyRateLimiter, RateLimited};
use crate::runtime::py::spawn_for_asyncio;

create_exception!(
    tenuto._core,
    UpstreamError,
    TenutoError,
    "The upstream failed: `status` (None when it could not be reached), `url` (credentials redacted), `body` (an excerpt)."
);
create_exception!(
    tenuto._core,
    UpstreamTimeout,
    UpstreamError,
    "The upstream did not answer in time (after retries)."
);
create_exception!(
    tenuto._core,
    InvalidJSON,
    UpstreamError,
    "The upstream's body is not JSON."
);

/// A `ClientError` as the Python exception, with its attributes (`status`, `url`, `body`
/// for upstream answers; `retry_after` in seconds for refusals).
fn to_py_err(py: Python<'_>, err: ClientError) -> PyErr {
    let message = err.to_string();
    let any = |value: PyResult<Py<PyAny>>| value.unwrap_or_else(|_| py.None());
    let answer = |status: Option<u16>, url: String, body: String| {
        vec![
            ("status", any(status.into_py_any(py))),
            ("url", any(url.into_py_any(py))),
            ("body", any(body.into_py_any(py))),
        ]
    };
    let wait = |ns: i64| {
        vec![(
            "retry_after",
            any((ns as f64 / NANOS as f64).into_py_any(py)),
        )]
    };
    let (exc, attrs) = match err {
        ClientError::Unreachable { url, .. } => (
            UpstreamError::new_err(message),
            answer(None, url, String::new()),
        ),
        ClientError::Status {
            status,
            url,
            excerpt,
        } => (
            UpstreamError::new_err(message),
            answer(Some(status), url, excerpt),
        ),
        ClientError::Timeout { url, .. } => (
            UpstreamTimeout::new_err(message),
            answer(None, url, String::new()),
        ),
        ClientError::InvalidJson {
            status,
            url,
            excerpt,
            ..
        } => (
            InvalidJSON::new_err(message),
            answer(Some(status), url, excerpt),
        ),
        ClientError::RateLimited { retry_after_ns, .. } => {
            (RateLimited::new_err(message), wait(retry_after_ns))
        }
        ClientError::CircuitOpen { retry_after_ns, .. } => {
            (CircuitOpen::new_err(message), wait(retry_after_ns))
        }
        ClientError::Invalid(err) => return err.into(),
    };
    let value = exc.value(py);
    for (name, attr) in attrs {
        let _ = value.setattr(name, attr);
    }
    exc
}

/// Where a call's waits happen: real time, or a `FakeClock` that sleeping moves on.
enum ClientClock {
    System,
    Manual(Arc<ManualClock>),
}

/// Everything a call needs, shared by the client's calls and the tasks running them.
struct Inner {
    base: String,
    shown_base: String,
    http: Http,
    shared: Shared,
    limiter: Option<Py<PyRateLimiter>>,
    breaker: Option<Py<PyCircuitBreaker>>,
    clock: ClientClock,
    /// A call's default deadline (ns from its start).
    deadline_ns: Option<i64>,
}

/// A concurrency slot of the limiter (and its lease when shared through Redis), given
/// back when the attempt is over.
struct Slot {
    inner: Arc<Inner>,
    lease: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(limiter) = &self.inner.limiter {
            if let Some(token) = self.lease.take() {
                limiter.get().unlease_native(token);
            }
            limiter.get().release_slot();
        }
    }
}

/// `Inner` as the upstream of one call (a slot needs to own a reference to it).
struct ClientUpstream(Arc<Inner>);

impl Inner {
    fn now(&self) -> i64 {
        match &self.clock {
            ClientClock::System => SystemClock.now_nanos(),
            ClientClock::Manual(clock) => clock.now_nanos(),
        }
    }
}

impl Upstream for ClientUpstream {
    fn now(&self) -> i64 {
        self.0.now()
    }

    fn sleep(&self, nanos: i64) -> BoxFuture<'_, ()> {
        match &self.0.clock {
            ClientClock::System => Box::pin(tokio::time::sleep(Duration::from_nanos(
                nanos.max(0) as u64
            ))),
            ClientClock::Manual(clock) => {
                clock.advance_nanos(nanos.max(0));
                Box::pin(tokio::task::yield_now())
            }
        }
    }

    fn try_admit(&self) -> BoxFuture<'_, Result<(), i64>> {
        match &self.0.limiter {
            Some(limiter) => limiter.get().admit_native(),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn slot(&self) -> BoxFuture<'_, Option<Box<dyn Send>>> {
        let inner = Arc::clone(&self.0);
        Box::pin(async move {
            let limiter = inner.limiter.as_ref()?.get();
            if !limiter.has_slots() {
                return None;
            }
            limiter.wait_slot_native().await;
            let mut slot = Slot {
                inner: Arc::clone(&inner),
                lease: None,
            };
            // Taken after the local slot, as `with lim:` does; dropped while waiting, the
            // slot gives the local one back.
            slot.lease = limiter.lease_native().await;
            Some(Box::new(slot) as Box<dyn Send>)
        })
    }

    fn feedback(&self, status: u16, retry_after_ns: Option<i64>) -> BoxFuture<'_, ()> {
        match &self.0.limiter {
            Some(limiter) => limiter.get().feedback_native(status, retry_after_ns),
            None => Box::pin(async {}),
        }
    }

    fn permit(&self) -> BoxFuture<'_, Result<bool, i64>> {
        match &self.0.breaker {
            Some(breaker) => breaker.get().permit_native(),
            None => Box::pin(async { Ok(false) }),
        }
    }

    fn report(&self, probe: bool, healthy: bool) -> BoxFuture<'_, ()> {
        match &self.0.breaker {
            Some(breaker) => breaker.get().report_native(probe, healthy),
            None => Box::pin(async {}),
        }
    }

    fn send<'a>(&'a self, request: &'a Request) -> BoxFuture<'a, Result<Reply, SendError>> {
        Box::pin(self.0.http.send(request))
    }
}

/// One call's request and deadline, prepared with the GIL held.
struct Prepared {
    request: Request,
    deadline_ns: Option<i64>,
}

/// What a call hands back to Python, converted on a thread holding the GIL.
enum Want {
    /// A `Response` whatever the status.
    Response,
    /// The JSON body; an error status raises.
    Json,
    /// `(status, value or None on 304, etag, last_modified)`.
    Revalidate,
}

/// A query value as text (lists and tuples repeat the parameter; None leaves it out).
fn query_values(
    name: &str,
    value: &Bound<'_, PyAny>,
    out: &mut Vec<(String, String)>,
) -> PyResult<()> {
    if value.is_none() {
        return Ok(());
    }
    if let Ok(b) = value.cast::<pyo3::types::PyBool>() {
        out.push((
            name.to_owned(),
            if b.is_true() { "true" } else { "false" }.into(),
        ));
        return Ok(());
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        for item in value.try_iter()? {
            query_values(name, &item?, out)?;
        }
        return Ok(());
    }
    if value.is_instance_of::<PyString>()
        || value.is_instance_of::<pyo3::types::PyInt>()
        || value.is_instance_of::<pyo3::types::PyFloat>()
    {
        out.push((name.to_owned(), value.str()?.to_string()));
        return Ok(());
    }
    Err(PyTypeError::new_err(format!(
        "params: the value of {name:?} must be a str, int, float, bool, None or a list of them, not {}",
        value.get_type().name()?
    )))
}

/// `params`: a mapping or a sequence of (name, value) pairs.
fn query_pairs(params: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    let Some(params) = params.filter(|p| !p.is_none()) else {
        return Ok(out);
    };
    let items: Vec<Bound<'_, PyAny>> = if let Ok(dict) = params.cast::<PyDict>() {
        dict.items().iter().collect()
    } else if params.is_instance_of::<PyList>() || params.is_instance_of::<PyTuple>() {
        params.try_iter()?.collect::<PyResult<_>>()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "params must be a dict or a list of (name, value) pairs, not {}",
            params.get_type().name()?
        )));
    };
    for item in items {
        let (name, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item
            .extract()
            .map_err(|_| PyTypeError::new_err("params must hold (name, value) pairs"))?;
        let name: String = name
            .extract()
            .map_err(|_| PyTypeError::new_err("params: names must be str"))?;
        query_values(&name, &value, &mut out)?;
    }
    Ok(out)
}

fn header_map(headers: Option<&Bound<'_, PyAny>>) -> PyResult<HeaderMap> {
    let mut map = HeaderMap::new();
    let Some(headers) = headers.filter(|h| !h.is_none()) else {
        return Ok(map);
    };
    let dict = headers.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "headers must be a dict of str to str, not {}",
            headers
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    for (name, value) in dict.iter() {
        let not_str = |_| PyTypeError::new_err("headers must be a dict of str to str");
        let name: String = name.extract().map_err(not_str)?;
        let value: String = value.extract().map_err(not_str)?;
        let (name, value) = header(&name, &value)?;
        map.append(name, value);
    }
    Ok(map)
}

fn optional_seconds(name: &str, seconds: Option<f64>) -> PyResult<Option<i64>> {
    Ok(seconds.map(|s| seconds_arg(name, s, false)).transpose()?)
}

/// The response of `Client.request`.
#[pyclass(frozen, module = "tenuto._core", name = "Response")]
pub struct PyResponse {
    #[pyo3(get)]
    status: u16,
    /// Lower-case names; repeated headers joined with ", ".
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Redacted.
    #[pyo3(get)]
    url: String,
}

#[pymethods]
impl PyResponse {
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, value) in &self.headers {
            let joined = match d.get_item(name)? {
                Some(prior) => format!("{}, {value}", prior.extract::<String>()?),
                None => value.clone(),
            };
            d.set_item(name, joined)?;
        }
        Ok(d)
    }

    #[getter]
    fn content<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    #[getter]
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[getter]
    fn ok(&self) -> bool {
        self.status < 400
    }

    /// The body parsed as JSON (`InvalidJSON` if it is not).
    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        parse_json(py, self.status, &self.url, &self.body, &Vec::new)
    }

    /// `UpstreamError` (or `RateLimited` for a 429) when the status is an error.
    fn raise_for_status(&self, py: Python<'_>) -> PyResult<()> {
        let reply = Reply {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        };
        match status_error(&reply, self.url.clone(), SystemClock.now_nanos(), &[]) {
            Some(err) => Err(to_py_err(py, err)),
            None => Ok(()),
        }
    }

    fn __repr__(&self) -> String {
        format!("<Response [{}] {}>", self.status, self.url)
    }
}

fn parse_json<'py>(
    py: Python<'py>,
    status: u16,
    url: &str,
    body: &[u8],
    secrets: &dyn Fn() -> Vec<String>,
) -> PyResult<Bound<'py, PyAny>> {
    if body.is_empty() && (status == 204 || status == 205) {
        return Ok(py.None().into_bound(py));
    }
    let invalid = |reason: String| {
        to_py_err(
            py,
            ClientError::InvalidJson {
                status,
                url: url.to_owned(),
                reason,
                excerpt: Redactor::excerpt(body, EXCERPT_CHARS, &secrets()),
            },
        )
    };
    let text = std::str::from_utf8(body).map_err(|e| invalid(e.to_string()))?;
    from_json(py, text).map_err(invalid)
}

/// The native base of `tenuto.Client`; see there.
#[pyclass(subclass, frozen, module = "tenuto._core", name = "ClientCore")]
pub struct PyClient {
    inner: Arc<Inner>,
    /// The cached functions behind cached sync GETs, by `(ttl, stale_ttl)`; filled by
    /// `tenuto.Client`, read here so a hit needs no Python frame.
    sync_gets: Py<PyDict>,
    /// Calls through the cache (hits are those that caused no load).
    cached_calls: std::sync::atomic::AtomicU64,
    /// The last `(ttl, stale_ttl, cached function)` a GET used: a call site passing the
    /// same constants finds it by identity, without building and hashing a dict key.
    last_get: std::sync::Mutex<Option<[Py<PyAny>; 3]>>,
}

impl PyClient {
    /// The cached function of sync GETs with these TTLs, if `tenuto.Client` made one.
    fn sync_get<'py>(
        &self,
        py: Python<'py>,
        ttl: &Bound<'py, PyAny>,
        stale_ttl: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let remembered = crate::sync::lock(&self.last_get)
            .as_ref()
            .filter(|[t, s, _]| t.bind(py).is(ttl) && s.bind(py).is(stale_ttl))
            .map(|[_, _, loader]| loader.clone_ref(py));
        if let Some(loader) = remembered {
            return Ok(Some(loader.into_bound(py)));
        }
        let Some(loader) = self.sync_gets.bind(py).get_item((ttl, stale_ttl))? else {
            return Ok(None);
        };
        let entry = [
            ttl.clone().unbind(),
            stale_ttl.clone().unbind(),
            loader.clone().unbind(),
        ];
        // The replaced entry is dropped after the lock is released (a drop may run Python).
        let replaced = crate::sync::lock(&self.last_get).replace(entry);
        drop(replaced);
        Ok(Some(loader))
    }

    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        content: Option<&[u8]>,
        timeout: Option<f64>,
        deadline: Option<f64>,
    ) -> PyResult<Prepared> {
        let method =
            reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                PyValueError::new_err(format!("method: {method:?} is not an HTTP method"))
            })?;
        let joined = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else if path.is_empty() {
            self.inner.base.clone()
        } else {
            format!(
                "{}/{}",
                self.inner.base.trim_end_matches('/'),
                path.trim_start_matches('/')
            )
        };
        let mut url = reqwest::Url::parse(&joined).map_err(|e| {
            PyValueError::new_err(format!("path: {path:?} does not make a valid URL ({e})"))
        })?;
        let pairs = query_pairs(params)?;
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        let mut headers = header_map(headers)?;
        let body = match (json.filter(|j| !j.is_none()), content) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err("pass json or content, not both"));
            }
            (Some(value), None) => {
                headers.entry(reqwest::header::CONTENT_TYPE).or_insert(
                    reqwest::header::HeaderValue::from_static("application/json"),
                );
                Some(to_json(value, PAYLOAD)?.into_bytes())
            }
            (None, Some(bytes)) => Some(bytes.to_vec()),
            (None, None) => None,
        };
        let timeout = optional_seconds("timeout", timeout)?.map(|n| Duration::from_nanos(n as u64));
        let deadline_ns = optional_seconds("deadline", deadline)?
            .or(self.inner.deadline_ns)
            .map(|ns| self.inner.now().saturating_add(ns));
        Ok(Prepared {
            request: Request {
                method,
                url,
                headers,
                body,
                timeout,
            },
            deadline_ns,
        })
    }

    fn run_sync(&self, py: Python<'_>, prepared: &Prepared) -> Result<Reply, ClientError> {
        let upstream = ClientUpstream(Arc::clone(&self.inner));
        py.detach(|| {
            crate::runtime::block_on(call(
                &upstream,
                &self.inner.shared,
                &prepared.request,
                prepared.deadline_ns,
            ))
        })
    }

    fn run_async<'py>(
        &self,
        py: Python<'py>,
        prepared: Prepared,
        want: Want,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = Arc::clone(&self.inner);
        let work = async move {
            let upstream = ClientUpstream(inner);
            let result = call(
                &upstream,
                &upstream.0.shared,
                &prepared.request,
                prepared.deadline_ns,
            )
            .await;
            (upstream.0, prepared, result)
        };
        spawn_for_asyncio(py, work, move |py, (inner, prepared, result)| {
            convert(py, &inner, &prepared.request, result, want)
        })
    }
}

/// A call's outcome as the Python value `want` asks for.
fn convert(
    py: Python<'_>,
    inner: &Inner,
    request: &Request,
    result: Result<Reply, ClientError>,
    want: Want,
) -> PyResult<Py<PyAny>> {
    let reply = result.map_err(|err| to_py_err(py, err))?;
    let url = || inner.shared.redactor.url(&request.url);
    if let Want::Response = want {
        let headers = reply
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        return PyResponse {
            status: reply.status,
            headers,
            body: reply.body,
            url: url(),
        }
        .into_py_any(py);
    }
    let now = inner.now();
    if reply.status == 304 {
        if let Want::Revalidate = want {
            let etag = reply.header("etag").map(str::to_owned);
            let modified = reply.header("last-modified").map(str::to_owned);
            return (304u16, py.None(), etag, modified).into_py_any(py);
        }
    }
    if reply.status >= 300 {
        let secrets = inner
            .shared
            .redactor
            .secrets(request, inner.http.default_headers());
        let err = status_error(&reply, url(), now, &secrets).unwrap_or(ClientError::Status {
            status: reply.status,
            url: url(),
            excerpt: Redactor::excerpt(&reply.body, EXCERPT_CHARS, &secrets),
        });
        return Err(to_py_err(py, err));
    }
    let value = parse_json(py, reply.status, &url(), &reply.body, &|| {
        inner
            .shared
            .redactor
            .secrets(request, inner.http.default_headers())
    })?;
    match want {
        Want::Json => Ok(value.unbind()),
        _ => {
            let etag = reply.header("etag").map(str::to_owned);
            let modified = reply.header("last-modified").map(str::to_owned);
            (reply.status, value, etag, modified).into_py_any(py)
        }
    }
}

/// The client's clock: none (real time) or a `FakeClock`, whose time waits move on.
fn client_clock(clock: Option<&Bound<'_, PyAny>>) -> PyResult<ClientClock> {
    match clock.filter(|c| !c.is_none()) {
        None => Ok(ClientClock::System),
        Some(obj) => match obj.cast::<PyFakeClock>() {
            Ok(fake) => Ok(ClientClock::Manual(fake.get().manual())),
            Err(_) => Err(PyTypeError::new_err(format!(
                "clock must be a tenuto.testing.FakeClock or None, not {}",
                obj.get_type().name()?
            ))),
        },
    }
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (
        base_url, *, headers = None, timeout = 10.0, connect_timeout = None, retries = Count(3),
        backoff = 0.2, max_retry_after = 60.0, limiter = None, breaker = None, cache = None,
        http2 = true, deadline = None, redact = None, retry_budget = 0.2, max_backoff = 30.0,
        clock = None
    ),
    text_signature = "(base_url, *, headers=None, timeout=10.0, connect_timeout=None, retries=3, backoff=0.2, max_retry_after=60.0, limiter=None, breaker=None, cache=None, http2=True, deadline=None, redact=None, retry_budget=0.2, max_backoff=30.0, clock=None)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        base_url: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyAny>>,
        timeout: f64,
        connect_timeout: Option<f64>,
        retries: Count,
        backoff: f64,
        max_retry_after: f64,
        limiter: Option<&Bound<'_, PyAny>>,
        breaker: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
        http2: bool,
        deadline: Option<f64>,
        redact: Option<Vec<String>>,
        retry_budget: f64,
        max_backoff: f64,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let base: String = base_url.extract().map_err(|_| {
            PyTypeError::new_err("base_url must be a str such as \"https://api.example.com/v1\"")
        })?;
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| PyValueError::new_err(format!("base_url: not a valid URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(PyValueError::new_err(format!(
                "base_url must be an http:// or https:// URL, got scheme {:?}",
                parsed.scheme()
            )));
        }
        if parsed.query().is_some() {
            return Err(PyValueError::new_err(
                "base_url must not have a query string: pass params (and headers) per call or \
                 in headers=",
            ));
        }
        if !(0..=100).contains(&retries.0) {
            return Err(PyValueError::new_err(format!(
                "retries must be between 0 and 100, got {}",
                retries.0
            )));
        }
        let timeout_ns = seconds_arg("timeout", timeout, false)?;
        let connect = optional_seconds("connect_timeout", connect_timeout)?;
        let backoff_ns = seconds_arg("backoff", backoff, true)?;
        let max_backoff_ns = seconds_arg("max_backoff", max_backoff, true)?;
        let max_retry_after_ns = seconds_arg("max_retry_after", max_retry_after, true)?;
        let deadline_ns = optional_seconds("deadline", deadline)?;
        let limiter = match limiter.filter(|l| !l.is_none()) {
            None => None,
            Some(obj) => Some(
                obj.cast::<PyRateLimiter>()
                    .map_err(|_| PyTypeError::new_err("limiter must be a tenuto.RateLimiter"))?
                    .clone()
                    .unbind(),
            ),
        };
        let breaker = match breaker.filter(|b| !b.is_none()) {
            None => None,
            Some(obj) => Some(
                obj.cast::<PyCircuitBreaker>()
                    .map_err(|_| PyTypeError::new_err("breaker must be a tenuto.CircuitBreaker"))?
                    .clone()
                    .unbind(),
            ),
        };
        if let Some(cache) = cache.filter(|c| !c.is_none()) {
            // Used by `tenuto.Client` (Python): the cached calls are `@cache.cached` loads.
            if cache.cast::<crate::cache::py::PyCache>().is_err() {
                return Err(PyTypeError::new_err("cache must be a tenuto.Cache"));
            }
        }
        let redact = redact.unwrap_or_default();
        let redactor = Redactor::new(redact.iter().map(String::as_str));
        let http = Http::new(HttpConfig {
            timeout: Duration::from_nanos(timeout_ns as u64),
            connect_timeout: connect.map(|n| Duration::from_nanos(n as u64)),
            http2,
            headers: header_map(headers)?,
        })?;
        let shown_base = redactor.url(&parsed);
        Ok(Self {
            sync_gets: PyDict::new(base_url.py()).unbind(),
            cached_calls: std::sync::atomic::AtomicU64::new(0),
            last_get: std::sync::Mutex::new(None),
            inner: Arc::new(Inner {
                base,
                shown_base,
                http,
                shared: Shared {
                    policy: Policy {
                        retries: retries.0 as u32,
                        backoff_ns,
                        max_backoff_ns,
                        max_retry_after_ns,
                    },
                    budget: RetryBudget::new(retry_budget)?,
                    stats: ClientStats::default(),
                    redactor,
                    timeout: Duration::from_nanos(timeout_ns as u64),
                },
                limiter,
                breaker,
                clock: client_clock(clock)?,
                deadline_ns,
            }),
        })
    }

    /// Any request; the `Response` whatever its status (after retries).
    #[pyo3(signature = (method, path = "", *, params = None, headers = None, json = None, content = None, timeout = None, deadline = None))]
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        py: Python<'_>,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        content: Option<Vec<u8>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let prepared = self.prepare(
            method,
            path,
            params,
            headers,
            json,
            content.as_deref(),
            timeout,
            deadline,
        )?;
        let result = self.run_sync(py, &prepared);
        convert(py, &self.inner, &prepared.request, result, Want::Response)
    }

    /// `request` as an awaitable.
    #[pyo3(signature = (method, path = "", *, params = None, headers = None, json = None, content = None, timeout = None, deadline = None))]
    #[allow(clippy::too_many_arguments)]
    fn arequest<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        content: Option<Vec<u8>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prepared = self.prepare(
            method,
            path,
            params,
            headers,
            json,
            content.as_deref(),
            timeout,
            deadline,
        )?;
        self.run_async(py, prepared, Want::Response)
    }

    /// GET `path` and return its JSON; with `ttl`, through the client's cache (see
    /// `tenuto.Client.get_json`).
    #[pyo3(signature = (path, params = None, headers = None, *, ttl = None, stale_ttl = None, timeout = None, deadline = None))]
    #[allow(clippy::too_many_arguments)]
    fn get_json(
        slf: &Bound<'_, Self>,
        path: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        stale_ttl: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let Some(ttl) = ttl.filter(|t| !t.is_none()) else {
            let path: String = path.extract()?;
            return this._json(py, "GET", &path, params, headers, None, timeout, deadline);
        };
        let none = py.None().into_bound(py);
        let params = params.unwrap_or(&none);
        let stale_ttl = stale_ttl.unwrap_or(&none);
        let plain_params =
            !(params.is_instance_of::<PyList>() || params.is_instance_of::<PyTuple>());
        let no_options =
            headers.is_none_or(|h| h.is_none()) && timeout.is_none() && deadline.is_none();
        if plain_params && no_options {
            if let Some(loader) = this.sync_get(py, ttl, stale_ttl)? {
                // NOTE: a hit is this call plus the cached function's native fast path,
                // called directly (no Python frame, no argument parsing).
                this.cached_calls
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let args = PyTuple::new(py, [path, params, &none])?;
                let found = match loader.cast::<PyCachedCall>() {
                    Ok(cached) => PyCachedCall::__call__(cached, &args, None)?.into_bound(py),
                    Err(_) => loader.call1(args)?,
                };
                return Ok(found.get_item(pyo3::intern!(py, "body"))?.unbind());
            }
        }
        let headers = headers.map_or_else(|| none.clone(), |h| h.clone());
        Ok(slf
            .call_method1(
                pyo3::intern!(py, "_cached"),
                (
                    "GET", path, params, &none, headers, ttl, stale_ttl, timeout, deadline,
                ),
            )?
            .unbind())
    }

    /// The dict of cached functions behind cached sync GETs (see `get_json`).
    #[getter]
    fn _sync_gets(&self, py: Python<'_>) -> Py<PyDict> {
        self.sync_gets.clone_ref(py)
    }

    /// Counts a call through the cache made by Python.
    fn _count_cached_call(&self) {
        self.cached_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The JSON body of a call; error statuses raise.
    #[pyo3(signature = (method, path, params = None, headers = None, json = None, timeout = None, deadline = None))]
    #[allow(clippy::too_many_arguments)]
    fn _json(
        &self,
        py: Python<'_>,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let prepared =
            self.prepare(method, path, params, headers, json, None, timeout, deadline)?;
        let result = self.run_sync(py, &prepared);
        convert(py, &self.inner, &prepared.request, result, Want::Json)
    }

    /// `_json` as an awaitable.
    #[pyo3(signature = (method, path, params = None, headers = None, json = None, timeout = None, deadline = None))]
    #[allow(clippy::too_many_arguments)]
    fn _ajson<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prepared =
            self.prepare(method, path, params, headers, json, None, timeout, deadline)?;
        self.run_async(py, prepared, Want::Json)
    }

    /// A conditional load for the cache: sends If-None-Match / If-Modified-Since when
    /// given; `(status, value or None on 304, etag, last_modified)`.
    #[pyo3(signature = (method, path, params, headers, json, timeout, deadline, etag, last_modified))]
    #[allow(clippy::too_many_arguments)]
    fn _revalidate(
        &self,
        py: Python<'_>,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
        etag: Option<&str>,
        last_modified: Option<&str>,
    ) -> PyResult<Py<PyAny>> {
        let mut prepared =
            self.prepare(method, path, params, headers, json, None, timeout, deadline)?;
        conditional(&mut prepared.request, etag, last_modified);
        let result = self.run_sync(py, &prepared);
        convert(py, &self.inner, &prepared.request, result, Want::Revalidate)
    }

    /// `_revalidate` as an awaitable.
    #[pyo3(signature = (method, path, params, headers, json, timeout, deadline, etag, last_modified))]
    #[allow(clippy::too_many_arguments)]
    fn _arevalidate<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        path: &str,
        params: Option<&Bound<'_, PyAny>>,
        headers: Option<&Bound<'_, PyAny>>,
        json: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
        deadline: Option<f64>,
        etag: Option<&str>,
        last_modified: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut prepared =
            self.prepare(method, path, params, headers, json, None, timeout, deadline)?;
        conditional(&mut prepared.request, etag, last_modified);
        self.run_async(py, prepared, Want::Revalidate)
    }

    /// The base URL, credentials redacted.
    #[getter]
    fn base_url(&self) -> &str {
        &self.inner.shown_base
    }

    /// Counters since the client was made: calls, requests (attempts), retries, statuses,
    /// errors, and attempt latency percentiles in seconds (of the last 4096 attempts).
    fn _stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.shared.stats.snapshot();
        let d = PyDict::new(py);
        d.set_item("base_url", &self.inner.shown_base)?;
        d.set_item("calls", s.calls)?;
        d.set_item("requests", s.requests)?;
        d.set_item("retries", s.retries)?;
        d.set_item("errors", s.errors)?;
        d.set_item("timeouts", s.timeouts)?;
        d.set_item("connect_errors", s.connect_errors)?;
        d.set_item("rate_limited", s.rate_limited)?;
        d.set_item("circuit_open", s.circuit_open)?;
        d.set_item("retry_budget_exhausted", s.retry_budget_exhausted)?;
        d.set_item(
            "cached_calls",
            self.cached_calls.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        let statuses = PyDict::new(py);
        for (status, n) in s.statuses {
            statuses.set_item(status, n)?;
        }
        d.set_item("statuses", statuses)?;
        let latency = PyDict::new(py);
        latency.set_item("p50", s.p50)?;
        latency.set_item("p95", s.p95)?;
        latency.set_item("p99", s.p99)?;
        d.set_item("latency", latency)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Client({:?})", self.inner.shown_base)
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.sync_gets)?;
        // try_lock: a collection never waits for a lock (its holder runs no Python).
        if let Ok(last) = self.last_get.try_lock() {
            for obj in last.iter().flatten() {
                visit.call(obj)?;
            }
        }
        if let Some(limiter) = &self.inner.limiter {
            visit.call(limiter)?;
        }
        if let Some(breaker) = &self.inner.breaker {
            visit.call(breaker)?;
        }
        Ok(())
    }
}

fn conditional(request: &mut Request, etag: Option<&str>, last_modified: Option<&str>) {
    if let Some(value) = etag.and_then(|e| reqwest::header::HeaderValue::from_str(e).ok()) {
        request.headers.insert(IF_NONE_MATCH, value);
    }
    if let Some(value) = last_modified.and_then(|m| reqwest::header::HeaderValue::from_str(m).ok())
    {
        request.headers.insert(IF_MODIFIED_SINCE, value);
    }
}
