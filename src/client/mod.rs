//! The upstream client's decisions: which outcomes are retried, how long to wait (full
//! jitter, Retry-After), when retries would exceed their budget, when a Retry-After is
//! too long to wait for, what a message may show of a URL, and the numbers behind
//! `stats()`. `call` runs one whole call (limiter, breaker, attempts, waits) over an
//! `Upstream`, which the bindings implement with reqwest, the limiter and the breaker,
//! and the tests with a script and a manual clock.

pub mod http;
#[cfg(feature = "python")]
pub mod py;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{CoreError, CoreResult};
use crate::sync::lock;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub const NANOS: i64 = 1_000_000_000;

/// The longest wait or timeout accepted (seconds), as for limiter durations.
pub const MAX_SECONDS: f64 = 1e9;

/// Seconds as nanoseconds, or a `ValueError` naming the argument.
pub fn seconds_arg(name: &str, seconds: f64, allow_zero: bool) -> CoreResult<i64> {
    let ok = seconds.is_finite()
        && seconds <= MAX_SECONDS
        && (seconds > 0.0 || (allow_zero && seconds == 0.0));
    if !ok {
        let bound = if allow_zero {
            "non-negative"
        } else {
            "positive"
        };
        return Err(CoreError::invalid(format!(
            "{name} must be a {bound} number of seconds up to {MAX_SECONDS:e}, got {seconds}"
        )));
    }
    Ok((seconds * NANOS as f64).round() as i64)
}

/// One request, ready to send (any number of times).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: reqwest::Method,
    pub url: reqwest::Url,
    pub headers: reqwest::header::HeaderMap,
    pub body: Option<Vec<u8>>,
    /// Per attempt; None: the client's.
    pub timeout: Option<Duration>,
}

/// What an attempt brought back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why an attempt brought nothing back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// No connection (refused, reset, DNS, TLS) or it broke before the whole reply came.
    Connect(String),
    /// The attempt's timeout ran out.
    Timeout,
}

/// A call that did not produce a reply to hand back.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientError {
    /// Could not reach the upstream (after retries): `UpstreamError` with no status.
    Unreachable {
        url: String,
        reason: String,
    },
    /// The upstream answered with an error status: `UpstreamError`.
    Status {
        status: u16,
        url: String,
        excerpt: String,
    },
    /// Every attempt timed out: `UpstreamTimeout`.
    Timeout {
        url: String,
        after: Duration,
    },
    /// The body is not JSON: `InvalidJSON`.
    InvalidJson {
        status: u16,
        url: String,
        reason: String,
        excerpt: String,
    },
    /// A limiter or the upstream's Retry-After asks for a wait this call will not make.
    RateLimited {
        url: String,
        retry_after_ns: i64,
        why: String,
    },
    /// The breaker refused the call.
    CircuitOpen {
        url: String,
        retry_after_ns: i64,
    },
    Invalid(CoreError),
}

impl From<CoreError> for ClientError {
    fn from(err: CoreError) -> Self {
        ClientError::Invalid(err)
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable { url, reason } => {
                write!(f, "cannot reach {url}: {reason}")
            }
            ClientError::Status {
                status,
                url,
                excerpt,
            } => {
                write!(f, "{url} answered {status}")?;
                if !excerpt.is_empty() {
                    write!(f, ": {excerpt}")?;
                }
                Ok(())
            }
            ClientError::Timeout { url, after } => {
                write!(
                    f,
                    "{url} did not answer within {:.3} s",
                    after.as_secs_f64()
                )
            }
            ClientError::InvalidJson {
                status,
                url,
                reason,
                excerpt,
            } => write!(
                f,
                "{url} answered {status} with a body that is not JSON ({reason}): {excerpt}"
            ),
            ClientError::RateLimited {
                url,
                retry_after_ns,
                why,
            } => write!(
                f,
                "{url}: {why}; retry in {:.3} s",
                *retry_after_ns as f64 / NANOS as f64
            ),
            ClientError::CircuitOpen {
                url,
                retry_after_ns,
            } => write!(
                f,
                "circuit open for {url}; retry in {:.3} s",
                *retry_after_ns as f64 / NANOS as f64
            ),
            ClientError::Invalid(err) => write!(f, "{err}"),
        }
    }
}

/// Retries and waits.
#[derive(Debug, Clone)]
pub struct Policy {
    pub retries: u32,
    /// The first retry waits up to this long; each further one twice as long.
    pub backoff_ns: i64,
    /// No single backoff wait is longer.
    pub max_backoff_ns: i64,
    /// A longer Retry-After is not waited for: the call raises `RateLimited` at once.
    pub max_retry_after_ns: i64,
}

/// What to make of one attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the reply back (success, or an error status retrying cannot fix).
    Done,
    /// Worth another attempt; the upstream may have said when.
    Retryable { retry_after_ns: Option<i64> },
}

/// What to do after a retryable outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Retry {
        wait_ns: i64,
    },
    /// No retry left (count, budget or deadline): the last outcome is the answer.
    GiveUp,
    /// The upstream asked for a wait longer than this call may make.
    TooLong {
        retry_after_ns: i64,
    },
}

impl Policy {
    /// Connect errors, timeouts, 5xx and 429 are retried; every other status is final.
    pub fn judge(&self, outcome: &Result<Reply, SendError>, now_ns: i64) -> Verdict {
        match outcome {
            Err(_) => Verdict::Retryable {
                retry_after_ns: None,
            },
            Ok(reply) if reply.status == 429 || reply.status >= 500 => Verdict::Retryable {
                retry_after_ns: reply
                    .header("retry-after")
                    .and_then(|v| parse_retry_after(v, now_ns)),
            },
            Ok(_) => Verdict::Done,
        }
    }

    /// Full jitter: a uniform wait in [0, min(cap, base × 2^retry)). `unit` in [0, 1).
    pub fn backoff(&self, retry: u32, unit: f64) -> i64 {
        let ceiling = (self.backoff_ns as f64 * 2f64.powi(retry.min(62) as i32))
            .min(self.max_backoff_ns as f64);
        (ceiling * unit.clamp(0.0, 1.0)) as i64
    }

    /// After retryable outcome number `retry` (0 for the first attempt): retry, give up,
    /// or refuse a wait that is too long. `budget_ok`: the retry budget has room.
    pub fn next(
        &self,
        retry: u32,
        retry_after_ns: Option<i64>,
        now_ns: i64,
        deadline_ns: Option<i64>,
        budget_ok: bool,
        unit: f64,
    ) -> Next {
        if let Some(after) = retry_after_ns {
            let past_deadline = deadline_ns.is_some_and(|d| now_ns.saturating_add(after) > d);
            if after > self.max_retry_after_ns || past_deadline {
                return Next::TooLong {
                    retry_after_ns: after,
                };
            }
        }
        if retry >= self.retries || !budget_ok {
            return Next::GiveUp;
        }
        let wait_ns = retry_after_ns.unwrap_or(0).max(self.backoff(retry, unit));
        if deadline_ns.is_some_and(|d| now_ns.saturating_add(wait_ns) > d) {
            return Next::GiveUp;
        }
        Next::Retry { wait_ns }
    }
}

/// `Retry-After` as a wait from `now_ns`: delay-seconds, or an HTTP date (a date in the
/// past is no wait). None when unreadable.
pub fn parse_retry_after(value: &str, now_ns: i64) -> Option<i64> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = value.parse().unwrap_or(u64::MAX);
        return Some((secs.min(MAX_SECONDS as u64) as i64) * NANOS);
    }
    // Not in RFC 9110, but some APIs send fractions of a second.
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| (secs.min(MAX_SECONDS) * NANOS as f64) as i64);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ns = match at.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => return Some(0),
    };
    Some(at_ns.saturating_sub(now_ns).max(0))
}

/// Retries may add at most `ratio` of the calls made over the last `window`, plus a small
/// reserve so a quiet client can still retry its first failures. Past that, a failing
/// upstream gets each call once, not `retries + 1` times (no retry storms).
pub struct RetryBudget {
    ratio: f64,
    reserve: u64,
    window_ns: i64,
    /// Per-second buckets: (second, calls, retries).
    buckets: Mutex<VecDeque<(i64, u64, u64)>>,
}

impl RetryBudget {
    pub const WINDOW_NS: i64 = 10 * NANOS;
    pub const RESERVE: u64 = 3;

    pub fn new(ratio: f64) -> CoreResult<Self> {
        if !(ratio.is_finite() && (0.0..=10.0).contains(&ratio)) {
            return Err(CoreError::invalid(format!(
                "retry_budget must be a ratio between 0 and 10, got {ratio}"
            )));
        }
        Ok(Self {
            ratio,
            reserve: Self::RESERVE,
            window_ns: Self::WINDOW_NS,
            buckets: Mutex::new(VecDeque::new()),
        })
    }

    fn bucket(&self, now_ns: i64, calls: u64, retries: u64) {
        let second = now_ns.div_euclid(NANOS);
        let mut buckets = lock(&self.buckets);
        let oldest = second - self.window_ns / NANOS;
        while buckets.front().is_some_and(|(s, _, _)| *s <= oldest) {
            buckets.pop_front();
        }
        match buckets.back_mut() {
            Some((s, c, r)) if *s == second => {
                *c += calls;
                *r += retries;
            }
            _ => buckets.push_back((second, calls, retries)),
        }
    }

    /// A new call (its first attempt).
    pub fn record_call(&self, now_ns: i64) {
        self.bucket(now_ns, 1, 0);
    }

    /// Takes one retry from the budget if it has room.
    pub fn try_spend(&self, now_ns: i64) -> bool {
        self.bucket(now_ns, 0, 0);
        let mut buckets = lock(&self.buckets);
        let (calls, retries) = buckets
            .iter()
            .fold((0, 0), |(c, r), (_, bc, br)| (c + bc, r + br));
        let allowed = (calls as f64 * self.ratio).floor() as u64 + self.reserve;
        if retries >= allowed {
            return false;
        }
        if let Some(last) = buckets.back_mut() {
            last.2 += 1;
        }
        true
    }
}

/// Query parameters whose values never appear in messages or logs.
pub const SECRET_PARAMS: [&str; 10] = [
    "key",
    "api_key",
    "apikey",
    "token",
    "access_token",
    "password",
    "secret",
    "client_secret",
    "signature",
    "sig",
];

/// Headers whose values are secrets.
pub const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
];

pub const REDACTED: &str = "***";

/// What a message may show of a URL or a body: credentials replaced by `***`.
#[derive(Debug, Clone)]
pub struct Redactor {
    params: HashSet<String>,
}

impl Redactor {
    /// `params`: names (case-insensitive) whose query values are secret, beyond
    /// `SECRET_PARAMS`.
    pub fn new<'a>(params: impl IntoIterator<Item = &'a str>) -> Self {
        let params = SECRET_PARAMS
            .into_iter()
            .chain(params)
            .map(str::to_ascii_lowercase)
            .collect();
        Self { params }
    }

    pub fn is_secret_param(&self, name: &str) -> bool {
        self.params.contains(&name.to_ascii_lowercase())
    }

    /// The URL with user info and secret query values replaced.
    pub fn url(&self, url: &reqwest::Url) -> String {
        let mut shown = url.clone();
        if !shown.username().is_empty() || shown.password().is_some() {
            let _ = shown.set_username(REDACTED);
            let _ = shown.set_password(None);
        }
        if shown.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if self.is_secret_param(&k) {
                        REDACTED.to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        // The fragment never goes on the wire; it may hold a token (OAuth implicit flow).
        shown.set_fragment(None);
        shown.to_string()
    }

    /// The secret values a request carries (secret header values, secret query values,
    /// user info), to scrub from anything the upstream echoes back. `defaults`: the
    /// client's own headers, sent with every request.
    pub fn secrets(&self, request: &Request, defaults: &reqwest::header::HeaderMap) -> Vec<String> {
        let mut found: Vec<String> = request
            .url
            .query_pairs()
            .filter(|(k, _)| self.is_secret_param(k))
            .map(|(_, v)| v.into_owned())
            .collect();
        found.extend(request.url.password().map(str::to_owned));
        for headers in [&request.headers, defaults] {
            for name in SECRET_HEADERS {
                for value in headers.get_all(name) {
                    if let Ok(text) = value.to_str() {
                        found.push(text.to_owned());
                        // "Bearer abc": the token alone may be echoed too.
                        if let Some((_, token)) = text.split_once(' ') {
                            found.push(token.trim().to_owned());
                        }
                    }
                }
            }
        }
        found.retain(|s| s.len() >= 4);
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        found
    }

    /// The start of a body for a message: at most `max` characters, secrets scrubbed.
    pub fn excerpt(body: &[u8], max: usize, secrets: &[String]) -> String {
        let text = String::from_utf8_lossy(body);
        let mut text: String = text.chars().collect();
        for secret in secrets {
            text = text.replace(secret.as_str(), REDACTED);
        }
        let mut out: String = text.chars().take(max).collect();
        if text.chars().count() > max {
            out.push('…');
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// The latencies of the last `CAPACITY` attempts, for percentiles.
struct Latencies {
    ring: Vec<u64>,
    next: usize,
}

impl Latencies {
    const CAPACITY: usize = 4096;
}

/// The numbers behind `stats()`.
pub struct ClientStats {
    pub calls: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub connect_errors: AtomicU64,
    pub rate_limited: AtomicU64,
    pub circuit_open: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    latencies: Mutex<Latencies>,
}

/// A snapshot of `ClientStats`.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub requests: u64,
    pub retries: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub connect_errors: u64,
    pub rate_limited: u64,
    pub circuit_open: u64,
    pub retry_budget_exhausted: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Seconds; None before the first attempt.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

impl Default for ClientStats {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            circuit_open: AtomicU64::new(0),
            retry_budget_exhausted: AtomicU64::new(0),
            statuses: Mutex::new(BTreeMap::new()),
            latencies: Mutex::new(Latencies {
                ring: Vec::new(),
                next: 0,
            }),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The value at quantile `q` of sorted samples (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl ClientStats {
    fn record_attempt(&self, outcome: &Result<Reply, SendError>, latency: Duration) {
        bump(&self.requests);
        match outcome {
            Ok(reply) => *lock(&self.statuses).entry(reply.status).or_insert(0) += 1,
            Err(SendError::Timeout) => bump(&self.timeouts),
            Err(SendError::Connect(_)) => bump(&self.connect_errors),
        }
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let mut latencies = lock(&self.latencies);
        if latencies.ring.len() < Latencies::CAPACITY {
            latencies.ring.push(nanos);
        } else {
            let at = latencies.next;
            latencies.ring[at] = nanos;
        }
        latencies.next = (latencies.next + 1) % Latencies::CAPACITY;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut sorted = lock(&self.latencies).ring.clone();
        sorted.sort_unstable();
        let secs = |q| percentile(&sorted, q).map(|n| n as f64 / NANOS as f64);
        StatsSnapshot {
            calls: read(&self.calls),
            requests: read(&self.requests),
            retries: read(&self.retries),
            errors: read(&self.errors),
            timeouts: read(&self.timeouts),
            connect_errors: read(&self.connect_errors),
            rate_limited: read(&self.rate_limited),
            circuit_open: read(&self.circuit_open),
            retry_budget_exhausted: read(&self.retry_budget_exhausted),
            statuses: lock(&self.statuses).clone(),
            p50: secs(0.50),
            p95: secs(0.95),
            p99: secs(0.99),
        }
    }
}

/// What a call goes through: the clock, waits, the limiter, the breaker and the wire.
pub trait Upstream: Send + Sync {
    fn now(&self) -> i64;
    fn sleep(&self, nanos: i64) -> BoxFuture<'_, ()>;
    /// One limiter attempt: admitted, or the wait before the next (Ok without a limiter).
    fn try_admit(&self) -> BoxFuture<'_, Result<(), i64>>;
    /// A concurrency slot held while the attempt is on the wire (dropped: released).
    fn slot(&self) -> BoxFuture<'_, Option<Box<dyn Send>>>;
    /// The upstream's answer, for the limiter (429 with Retry-After pauses it).
    fn feedback(&self, status: u16, retry_after_ns: Option<i64>) -> BoxFuture<'_, ()>;
    /// The breaker: a probe or not, or the wait until it lets one through.
    fn permit(&self) -> BoxFuture<'_, Result<bool, i64>>;
    fn report(&self, probe: bool, healthy: bool) -> BoxFuture<'_, ()>;
    fn send<'a>(&'a self, request: &'a Request) -> BoxFuture<'a, Result<Reply, SendError>>;
}

/// The client state a call shares with every other call of the same client.
pub struct Shared {
    pub policy: Policy,
    pub budget: RetryBudget,
    pub stats: ClientStats,
    pub redactor: Redactor,
    /// The per-attempt timeout, for messages.
    pub timeout: Duration,
}

/// One whole call: limiter, breaker, attempts and retries. `deadline_ns`: the caller's
/// deadline on the upstream's clock. Returns the last reply (any status the policy does
/// not retry, or a retryable one when no retry is left) or why there is none.
pub async fn call<U: Upstream>(
    upstream: &U,
    shared: &Shared,
    request: &Request,
    deadline_ns: Option<i64>,
) -> Result<Reply, ClientError> {
    bump(&shared.stats.calls);
    let outcome = attempts(upstream, shared, request, deadline_ns).await;
    if !matches!(&outcome, Ok(reply) if reply.status < 400) {
        bump(&shared.stats.errors);
    }
    outcome
}

async fn attempts<U: Upstream>(
    upstream: &U,
    shared: &Shared,
    request: &Request,
    deadline_ns: Option<i64>,
) -> Result<Reply, ClientError> {
    let stats = &shared.stats;
    shared.budget.record_call(upstream.now());
    let url = || shared.redactor.url(&request.url);
    let mut retry = 0u32;
    loop {
        admit(upstream, deadline_ns, shared.policy.max_retry_after_ns)
            .await
            .map_err(|retry_after_ns| {
                bump(&stats.rate_limited);
                ClientError::RateLimited {
                    url: url(),
                    retry_after_ns,
                    why: "the rate limiter's next slot is further away than this call may wait"
                        .into(),
                }
            })?;
        let probe = upstream.permit().await.map_err(|retry_after_ns| {
            bump(&stats.circuit_open);
            ClientError::CircuitOpen {
                url: url(),
                retry_after_ns,
            }
        })?;
        let slot = upstream.slot().await;
        let started = std::time::Instant::now();
        let outcome = upstream.send(request).await;
        drop(slot);
        stats.record_attempt(&outcome, started.elapsed());
        let now = upstream.now();
        let healthy = match &outcome {
            Ok(reply) => reply.status < 500,
            Err(_) => false,
        };
        upstream.report(probe, healthy).await;
        let verdict = shared.policy.judge(&outcome, now);
        if let Ok(reply) = &outcome {
            let retry_after = match verdict {
                Verdict::Retryable { retry_after_ns } => retry_after_ns,
                Verdict::Done => None,
            };
            upstream.feedback(reply.status, retry_after).await;
        }
        let retry_after_ns = match verdict {
            Verdict::Done => return Ok(outcome.expect("only replies are done")),
            Verdict::Retryable { retry_after_ns } => retry_after_ns,
        };
        let budget_ok = retry >= shared.policy.retries || shared.budget.try_spend(now);
        if !budget_ok {
            bump(&stats.retry_budget_exhausted);
        }
        match shared.policy.next(
            retry,
            retry_after_ns,
            now,
            deadline_ns,
            budget_ok,
            fastrand::f64(),
        ) {
            Next::Retry { wait_ns } => {
                bump(&stats.retries);
                retry += 1;
                upstream.sleep(wait_ns).await;
            }
            Next::TooLong { retry_after_ns } => {
                bump(&stats.rate_limited);
                return Err(ClientError::RateLimited {
                    url: url(),
                    retry_after_ns,
                    why: "the upstream asked to wait longer than this call may".into(),
                });
            }
            Next::GiveUp => {
                return match outcome {
                    Ok(reply) => Ok(reply),
                    Err(err) => Err(match err {
                        SendError::Timeout => ClientError::Timeout {
                            url: url(),
                            after: request.timeout.unwrap_or(shared.timeout),
                        },
                        SendError::Connect(reason) => {
                            ClientError::Unreachable { url: url(), reason }
                        }
                    }),
                };
            }
        }
    }
}

/// Waits for the limiter; Err(wait) when its next slot is past the deadline or further
/// away than `max_wait_ns` (a limiter paused by a long Retry-After holds no caller that
/// long: each raises at once, or is served stale by the cache).
async fn admit<U: Upstream>(
    upstream: &U,
    deadline_ns: Option<i64>,
    max_wait_ns: i64,
) -> Result<(), i64> {
    loop {
        match upstream.try_admit().await {
            Ok(()) => return Ok(()),
            Err(wait) => {
                let past_deadline =
                    deadline_ns.is_some_and(|d| upstream.now().saturating_add(wait) > d);
                if past_deadline || wait > max_wait_ns {
                    return Err(wait);
                }
                upstream.sleep(wait.max(1)).await;
            }
        }
    }
}

/// A reply's status as the error a JSON call raises: None for 2xx/3xx.
pub fn status_error(
    reply: &Reply,
    url: String,
    now_ns: i64,
    secrets: &[String],
) -> Option<ClientError> {
    match reply.status {
        429 => Some(ClientError::RateLimited {
            url,
            retry_after_ns: reply
                .header("retry-after")
                .and_then(|v| parse_retry_after(v, now_ns))
                .unwrap_or(0),
            why: "the upstream answered 429 Too Many Requests".into(),
        }),
        s if s >= 400 => Some(ClientError::Status {
            status: s,
            url,
            excerpt: Redactor::excerpt(&reply.body, EXCERPT_CHARS, secrets),
        }),
        _ => None,
    }
}

/// How much of a body an error message shows.
pub const EXCERPT_CHARS: usize = 200;
