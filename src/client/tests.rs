use std::sync::atomic::{AtomicI64, AtomicU32};
use std::sync::Arc;

use super::*;
use crate::clock::{Clock, ManualClock};

const T0: i64 = 1_700_000_000 * NANOS;

fn policy(retries: u32) -> Policy {
    Policy {
        retries,
        backoff_ns: NANOS / 5,
        max_backoff_ns: 30 * NANOS,
        max_retry_after_ns: 60 * NANOS,
    }
}

fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.as_bytes().to_vec(),
    }
}

/// An upstream answering from a script, on a manual clock; sleeping moves the clock.
struct Scripted {
    clock: Arc<ManualClock>,
    script: Mutex<VecDeque<Result<Reply, SendError>>>,
    sent: AtomicU32,
    sent_at: Mutex<Vec<i64>>,
    slept: Mutex<Vec<i64>>,
    feedback: Mutex<Vec<(u16, Option<i64>)>>,
    /// The limiter refuses until this time.
    paused_until: AtomicI64,
    breaker_open_for: AtomicI64,
    reports: Mutex<Vec<bool>>,
}

impl Scripted {
    fn new(script: Vec<Result<Reply, SendError>>) -> Self {
        Self {
            clock: ManualClock::new(T0),
            script: Mutex::new(script.into()),
            sent: AtomicU32::new(0),
            sent_at: Mutex::new(Vec::new()),
            slept: Mutex::new(Vec::new()),
            feedback: Mutex::new(Vec::new()),
            paused_until: AtomicI64::new(0),
            breaker_open_for: AtomicI64::new(0),
            reports: Mutex::new(Vec::new()),
        }
    }
}

impl Upstream for Scripted {
    fn now(&self) -> i64 {
        self.clock.now_nanos()
    }
    fn sleep(&self, nanos: i64) -> BoxFuture<'_, ()> {
        lock(&self.slept).push(nanos);
        self.clock.advance_nanos(nanos);
        Box::pin(async {})
    }
    fn try_admit(&self) -> BoxFuture<'_, Result<(), i64>> {
        let until = self.paused_until.load(Ordering::SeqCst);
        let now = self.now();
        Box::pin(async move {
            if now < until {
                Err(until - now)
            } else {
                Ok(())
            }
        })
    }
    fn slot(&self) -> BoxFuture<'_, Option<Box<dyn Send>>> {
        Box::pin(async { None })
    }
    fn feedback(&self, status: u16, retry_after_ns: Option<i64>) -> BoxFuture<'_, ()> {
        lock(&self.feedback).push((status, retry_after_ns));
        if let Some(after) = retry_after_ns {
            self.paused_until
                .store(self.now() + after, Ordering::SeqCst);
        }
        Box::pin(async {})
    }
    fn permit(&self) -> BoxFuture<'_, Result<bool, i64>> {
        let open = self.breaker_open_for.load(Ordering::SeqCst);
        Box::pin(async move {
            if open > 0 {
                Err(open)
            } else {
                Ok(false)
            }
        })
    }
    fn report(&self, _probe: bool, healthy: bool) -> BoxFuture<'_, ()> {
        lock(&self.reports).push(healthy);
        Box::pin(async {})
    }
    fn send<'a>(&'a self, _request: &'a Request) -> BoxFuture<'a, Result<Reply, SendError>> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        lock(&self.sent_at).push(self.now());
        let next = lock(&self.script)
            .pop_front()
            .unwrap_or(Ok(reply(200, &[], "{}")));
        Box::pin(async move { next })
    }
}

fn shared(retries: u32) -> Shared {
    Shared {
        policy: policy(retries),
        budget: RetryBudget::new(0.2).unwrap(),
        stats: ClientStats::default(),
        redactor: Redactor::new([]),
        timeout: Duration::from_secs(10),
    }
}

fn request(url: &str) -> Request {
    Request {
        method: reqwest::Method::GET,
        url: reqwest::Url::parse(url).unwrap(),
        headers: Default::default(),
        body: None,
        timeout: None,
    }
}

fn run<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn retries_5xx_connect_errors_and_timeouts_then_succeeds() {
    let up = Scripted::new(vec![
        Ok(reply(500, &[], "boom")),
        Err(SendError::Connect("reset".into())),
        Err(SendError::Timeout),
        Ok(reply(200, &[], "{\"ok\":1}")),
    ]);
    let shared = shared(3);
    let got = run(call(&up, &shared, &request("http://h/x"), None)).unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(up.sent.load(Ordering::SeqCst), 4);
    let s = shared.stats.snapshot();
    assert_eq!((s.calls, s.requests, s.retries), (1, 4, 3));
    assert_eq!((s.timeouts, s.connect_errors), (1, 1));
    assert_eq!(s.statuses.get(&500), Some(&1));
    // Full jitter: each wait below base × 2^retry.
    let slept = lock(&up.slept).clone();
    assert_eq!(slept.len(), 3);
    for (i, wait) in slept.iter().enumerate() {
        assert!(*wait >= 0 && *wait < (NANOS / 5) << i, "wait {i}: {wait}");
    }
    assert_eq!(*lock(&up.reports), vec![false, false, false, true]);
}

#[test]
fn never_retries_other_4xx() {
    for status in [400, 401, 403, 404, 409, 422] {
        let up = Scripted::new(vec![Ok(reply(status, &[], "no"))]);
        let got = run(call(&up, &shared(3), &request("http://h/x"), None)).unwrap();
        assert_eq!(got.status, status);
        assert_eq!(up.sent.load(Ordering::SeqCst), 1, "status {status}");
    }
}

#[test]
fn gives_up_after_retries_with_the_last_outcome() {
    let up = Scripted::new(vec![Ok(reply(503, &[], "")); 5]);
    let got = run(call(&up, &shared(2), &request("http://h/x"), None)).unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(up.sent.load(Ordering::SeqCst), 3);

    let up = Scripted::new(vec![Err(SendError::Timeout); 5]);
    let err = run(call(&up, &shared(1), &request("http://h/x"), None)).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    let up = Scripted::new(vec![Err(SendError::Connect("refused".into())); 5]);
    let err = run(call(&up, &shared(0), &request("http://h/x"), None)).unwrap_err();
    assert!(
        matches!(&err, ClientError::Unreachable { reason, .. } if reason == "refused"),
        "{err:?}"
    );
}

#[test]
fn retry_after_seconds_is_waited_and_fed_to_the_limiter() {
    let up = Scripted::new(vec![
        Ok(reply(429, &[("Retry-After", "7")], "")),
        Ok(reply(200, &[], "{}")),
    ]);
    let got = run(call(&up, &shared(3), &request("http://h/x"), None)).unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(lock(&up.feedback)[0], (429, Some(7 * NANOS)));
    let sent = lock(&up.sent_at).clone();
    assert!(
        sent[1] - sent[0] >= 7 * NANOS,
        "second attempt after the pause"
    );
}

#[test]
fn retry_after_longer_than_allowed_or_than_the_deadline_raises_at_once() {
    let up = Scripted::new(vec![Ok(reply(429, &[("Retry-After", "120")], ""))]);
    let err = run(call(&up, &shared(3), &request("http://h/x"), None)).unwrap_err();
    assert!(
        matches!(err, ClientError::RateLimited { retry_after_ns, .. } if retry_after_ns == 120 * NANOS)
    );
    assert_eq!(up.sent.load(Ordering::SeqCst), 1);
    assert!(lock(&up.slept).is_empty(), "nothing slept");

    let up = Scripted::new(vec![Ok(reply(503, &[("Retry-After", "5")], ""))]);
    let deadline = Some(T0 + 3 * NANOS);
    let err = run(call(&up, &shared(3), &request("http://h/x"), deadline)).unwrap_err();
    assert!(matches!(err, ClientError::RateLimited { .. }), "{err:?}");
    assert!(lock(&up.slept).is_empty());
}

#[test]
fn a_paused_limiter_past_the_deadline_raises_rate_limited() {
    let up = Scripted::new(vec![]);
    up.paused_until.store(T0 + 30 * NANOS, Ordering::SeqCst);
    let err = run(call(
        &up,
        &shared(3),
        &request("http://h/x"),
        Some(T0 + NANOS),
    ))
    .unwrap_err();
    assert!(matches!(err, ClientError::RateLimited { .. }));
    assert_eq!(up.sent.load(Ordering::SeqCst), 0);
    // Without a deadline the call waits for a pause up to max_retry_after, then goes.
    let got = run(call(&up, &shared(3), &request("http://h/x"), None)).unwrap();
    assert_eq!(got.status, 200);
    assert!(lock(&up.sent_at)[0] >= T0 + 30 * NANOS);
    // A longer pause (a long Retry-After fed to a shared limiter) is not waited for.
    let before = up.now();
    up.paused_until.store(before + 61 * NANOS, Ordering::SeqCst);
    let err = run(call(&up, &shared(3), &request("http://h/x"), None)).unwrap_err();
    assert!(
        matches!(err, ClientError::RateLimited { retry_after_ns, .. } if retry_after_ns == 61 * NANOS)
    );
    assert_eq!(up.now(), before, "nothing waited");
    assert_eq!(up.sent.load(Ordering::SeqCst), 1);
}

#[test]
fn errors_count_calls_that_did_not_succeed() {
    let shared = shared(0);
    let up = Scripted::new(vec![
        Ok(reply(404, &[], "")),
        Ok(reply(200, &[], "{}")),
        Err(SendError::Timeout),
        Ok(reply(500, &[], "")),
    ]);
    for _ in 0..4 {
        let _ = run(call(&up, &shared, &request("http://h/x"), None));
    }
    let s = shared.stats.snapshot();
    assert_eq!((s.calls, s.errors), (4, 3));
}

#[test]
fn an_open_breaker_refuses_before_sending() {
    let up = Scripted::new(vec![]);
    up.breaker_open_for.store(4 * NANOS, Ordering::SeqCst);
    let err = run(call(&up, &shared(3), &request("http://h/x"), None)).unwrap_err();
    assert_eq!(
        err,
        ClientError::CircuitOpen {
            url: "http://h/x".into(),
            retry_after_ns: 4 * NANOS
        }
    );
    assert_eq!(up.sent.load(Ordering::SeqCst), 0);
}

#[test]
fn the_retry_budget_caps_retries_at_a_fifth_of_calls_plus_a_reserve() {
    let shared = shared(3);
    let up = Scripted::new(vec![Ok(reply(500, &[], "")); 10_000]);
    for _ in 0..100 {
        let got = run(call(&up, &shared, &request("http://h/x"), None)).unwrap();
        assert_eq!(got.status, 500);
    }
    let s = shared.stats.snapshot();
    // All 100 calls within one window (backoffs are under a second each).
    let allowed = 100 / 5 + RetryBudget::RESERVE;
    assert!(s.retries <= allowed, "{} retries", s.retries);
    assert!(
        s.retries >= allowed - 3,
        "the budget is used: {}",
        s.retries
    );
    assert!(s.retry_budget_exhausted > 0);
    assert_eq!(s.requests, 100 + s.retries);
}

#[test]
fn the_budget_window_slides() {
    let budget = RetryBudget::new(0.2).unwrap();
    for _ in 0..RetryBudget::RESERVE {
        assert!(budget.try_spend(T0));
    }
    assert!(!budget.try_spend(T0));
    for _ in 0..10 {
        budget.record_call(T0);
    }
    assert!(budget.try_spend(T0), "10 calls earn 2 retries");
    assert!(budget.try_spend(T0));
    assert!(!budget.try_spend(T0));
    assert!(
        budget.try_spend(T0 + RetryBudget::WINDOW_NS + NANOS),
        "a new window"
    );
    assert!(RetryBudget::new(-0.1).is_err());
    assert!(RetryBudget::new(f64::NAN).is_err());
}

#[test]
fn backoff_is_full_jitter_under_a_doubling_cap() {
    let p = policy(10);
    assert_eq!(p.backoff(0, 0.0), 0);
    assert_eq!(p.backoff(0, 0.5), NANOS / 10);
    let near_cap = p.backoff(3, 0.999_999_999);
    assert!(near_cap < 8 * NANOS / 5 && near_cap > 8 * NANOS / 5 - 10);
    assert_eq!(p.backoff(60, 1.0), 30 * NANOS, "capped");
    assert_eq!(p.backoff(u32::MAX, 1.0), 30 * NANOS);
    // The wait is the longer of the backoff and Retry-After.
    assert_eq!(
        p.next(0, Some(2 * NANOS), T0, None, true, 0.5),
        Next::Retry { wait_ns: 2 * NANOS }
    );
    assert_eq!(p.next(10, None, T0, None, true, 0.5), Next::GiveUp);
    assert_eq!(p.next(0, None, T0, None, false, 0.5), Next::GiveUp);
    assert_eq!(
        p.next(0, None, T0, Some(T0 + 1), true, 0.5),
        Next::GiveUp,
        "a backoff past the deadline is not slept"
    );
}

#[test]
fn retry_after_reads_seconds_and_http_dates() {
    assert_eq!(parse_retry_after("120", T0), Some(120 * NANOS));
    assert_eq!(parse_retry_after(" 0 ", T0), Some(0));
    assert_eq!(parse_retry_after("1.5", T0), Some(3 * NANOS / 2));
    assert_eq!(
        parse_retry_after("99999999999999999999999", T0),
        Some(1_000_000_000 * NANOS),
        "saturates"
    );
    // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
    assert_eq!(
        parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", T0),
        Some(30 * NANOS)
    );
    assert_eq!(
        parse_retry_after("Tuesday, 14-Nov-23 22:13:50 GMT", T0),
        Some(30 * NANOS),
        "RFC 850"
    );
    assert_eq!(
        parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", T0),
        Some(0),
        "past"
    );
    assert_eq!(parse_retry_after("-5", T0), None);
    assert_eq!(parse_retry_after("soon", T0), None);
    assert_eq!(parse_retry_after("", T0), None);
    assert_eq!(parse_retry_after("inf", T0), None);
}

#[test]
fn urls_and_excerpts_never_show_credentials() {
    let r = Redactor::new(["session"]);
    let url = reqwest::Url::parse(
        "https://user:pw@api.example/v1/x?q=abc&api_key=SEKRIT1&Token=SEKRIT2&session=SEKRIT3#access_token=SEKRIT4",
    )
    .unwrap();
    let shown = r.url(&url);
    assert!(!shown.contains("SEKRIT"), "{shown}");
    assert!(!shown.contains("pw"), "{shown}");
    assert!(shown.contains("q=abc"), "{shown}");
    assert!(shown.contains("api_key=***"), "{shown}");

    let mut req = request(url.as_str());
    let (name, value) = http::header("Authorization", "Bearer TOKEN-XYZ").unwrap();
    req.headers.insert(name, value);
    let secrets = r.secrets(&req, &Default::default());
    let excerpt = Redactor::excerpt(
        b"bad token TOKEN-XYZ for key SEKRIT1\n and SEKRIT3",
        200,
        &secrets,
    );
    assert_eq!(excerpt, "bad token *** for key *** and ***");
    assert_eq!(
        Redactor::excerpt("é".repeat(300).as_bytes(), 5, &[]),
        "ééééé…"
    );
}

#[test]
fn status_errors() {
    let r = reply(429, &[("retry-after", "3")], "");
    assert!(matches!(
        status_error(&r, "u".into(), T0, &[]),
        Some(ClientError::RateLimited { retry_after_ns, .. }) if retry_after_ns == 3 * NANOS
    ));
    let r = reply(404, &[], "missing");
    assert_eq!(
        status_error(&r, "u".into(), T0, &[]).unwrap().to_string(),
        "u answered 404: missing"
    );
    assert!(status_error(&reply(200, &[], ""), "u".into(), T0, &[]).is_none());
    assert!(status_error(&reply(304, &[], ""), "u".into(), T0, &[]).is_none());
}

#[test]
fn percentiles_and_argument_checks() {
    let samples: Vec<u64> = (1..=100).collect();
    assert_eq!(percentile(&samples, 0.5), Some(50));
    assert_eq!(percentile(&samples, 0.99), Some(99));
    assert_eq!(percentile(&[], 0.5), None);
    assert!(seconds_arg("timeout", 0.0, false).is_err());
    assert!(seconds_arg("timeout", -1.0, true).is_err());
    assert!(seconds_arg("timeout", f64::INFINITY, true).is_err());
    assert_eq!(seconds_arg("backoff", 0.0, true).unwrap(), 0);
    let msg = seconds_arg("connect_timeout", f64::NAN, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("connect_timeout"), "{msg}");
}
