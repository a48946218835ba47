//! Rate limiting core (issue 5, first part): rate strings, and the two admission rules a
//! limiter combines, both on nanosecond timestamps from an injected clock.
//!
//! The promise of every limiter is "never more than N admissions in any sliding window of
//! the period". A GCRA or token bucket that starts with a full burst of N breaks it (it
//! admits close to 2N in some window), and a GCRA whose burst is shrunk until it keeps
//! the promise admits far less than N afterwards. So:
//! - `SlidingLog` keeps the promise exactly: the last N admission times; a new one is
//!   admitted when the oldest of them has left the window. N back to back are fine.
//! - `Spacing` (GCRA with a tolerance) spreads admissions: at least `interval` apart on
//!   average, at most `burst` back to back. Outbound limiters use both.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

pub mod breaker;
#[cfg(feature = "python")]
pub mod py;

use crate::cache::redis::{SharedDecision, StoreError};
use crate::cache::topology::tagged;
use crate::error::{CoreError, CoreResult};

const NANOS_PER_SEC: i64 = 1_000_000_000;

/// The shared limiter in Redis: the same two rules on the server's clock (microseconds),
/// so every process and host sharing the keys shares one limit.
/// KEYS: log (sorted set of admission times), tat (spacing), pause.
/// ARGV: count, period_us, interval_us (0: no spacing), tolerance_us, a unique member.
/// Returns {admitted (0/1), wait_us, now_us, used, reset_us}: the decision, the server
/// time it used, admissions now in the window, and when the oldest of them leaves it.
/// Numbers go back to Redis as integer strings: Lua's default formatting of a double
/// keeps 14 digits, which would round microsecond timestamps.
pub const REDIS_SCRIPT: &str = r"
local function int(x) return string.format('%.0f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local count, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local interval, tolerance = tonumber(ARGV[3]), tonumber(ARGV[4])
local wait = redis.call('PTTL', KEYS[3]) * 1000
if wait < 0 then wait = 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - period))
local used = redis.call('ZCARD', KEYS[1])
local function reset()
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] then return tonumber(oldest[2]) + period - now end
  return 0
end
if used >= count then wait = math.max(wait, reset()) end
local tat = now
if interval > 0 then
  local stored = redis.call('GET', KEYS[2])
  if stored then tat = math.max(tonumber(stored), now) end
  wait = math.max(wait, tat - tolerance - now)
end
if wait > 0 then return {0, int(wait), int(now), used, int(reset())} end
redis.call('ZADD', KEYS[1], int(now), ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000) + 1000)
if interval > 0 then
  redis.call('SET', KEYS[2], int(tat + interval), 'PX', math.ceil((tat + interval - now) / 1000) + 1000)
end
return {1, 0, int(now), used + 1, int(reset())}
";

/// Concurrency leases shared through Redis. KEYS: the lease set. ARGV: max, ttl_ms,
/// token. Returns 1 when the lease is taken (expired leases are dropped first).
pub const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
  return 1
end
return 0
";

/// A circuit breaker's state shared through Redis (one hash, on the server's clock).
/// KEYS: the hash. ARGV: op ("state", "permit", "success", "failure"), failures,
/// reset_ms, half_open_max, probe (0/1). Replies {verdict, wait_ms}: "state" 0 closed,
/// 1 open, 2 half open; "permit" 0 refused, 1 allowed, 2 allowed as a probe; "failure"
/// 1 when the breaker is (now) open.
pub const BREAKER_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, failures = ARGV[1], tonumber(ARGV[2])
local reset, half_open_max, probe = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened') or '')
if op == 'state' then
  if not opened then return {0, 0} end
  if now < opened + reset then return {1, opened + reset - now} end
  return {2, 0}
elseif op == 'permit' then
  if not opened then return {1, 0} end
  if now < opened + reset then return {0, opened + reset - now} end
  if redis.call('HINCRBY', KEYS[1], 'probes', 1) <= half_open_max then return {2, 0} end
  redis.call('HINCRBY', KEYS[1], 'probes', -1)
  return {0, 0}
elseif op == 'success' then
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
if probe then
  redis.call('HSET', KEYS[1], 'opened', string.format('%.0f', now), 'probes', 0)
else
  local consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
  if not opened and consecutive >= failures then
    redis.call('HSET', KEYS[1], 'opened', string.format('%.0f', now), 'probes', 0)
  end
end
redis.call('PEXPIRE', KEYS[1], reset + 86400000)
return {redis.call('HEXISTS', KEYS[1], 'opened'), 0}
";

/// The longest rate period and the longest duration a limiter or breaker accepts (about
/// 31 years): nanosecond timestamps plus such a span stay far below `i64::MAX`.
pub const MAX_PERIOD_SECS: i64 = 1_000_000_000;

/// `count` admissions per `period_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period_ns: i64,
}

impl Rate {
    /// Parses `"80/minute"`, `"80 per minute"`, `"10/second"`, `"5/2seconds"`,
    /// `"1000/hour"`, `"1000/day"` (units singular or plural, spaces optional).
    pub fn parse(text: &str) -> CoreResult<Rate> {
        let bad = || {
            CoreError::invalid(format!(
                "invalid rate {text:?}: expected e.g. \"80/minute\", \"80 per minute\", \"5/2seconds\" \
                 (units: second, minute, hour, day)"
            ))
        };
        let lower = text.trim().to_ascii_lowercase();
        let (count, per) = match lower.split_once('/') {
            Some(parts) => parts,
            None => lower.split_once(" per ").ok_or_else(bad)?,
        };
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        let per = per.trim();
        let digits = per.chars().take_while(|c| c.is_ascii_digit()).count();
        let multiple: i64 = if digits == 0 {
            1
        } else {
            per[..digits].parse().map_err(|_| bad())?
        };
        let unit_secs = match per[digits..].trim() {
            "s" | "sec" | "second" | "seconds" => 1,
            "m" | "min" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            _ => return Err(bad()),
        };
        if multiple == 0 {
            return Err(bad());
        }
        let period_ns = multiple
            .checked_mul(unit_secs)
            .filter(|&s| s <= MAX_PERIOD_SECS)
            .and_then(|s| s.checked_mul(NANOS_PER_SEC))
            .ok_or_else(bad)?;
        Ok(Rate { count, period_ns })
    }

    /// The even spacing of this rate: period / count.
    pub fn interval_ns(&self) -> i64 {
        (self.period_ns / i64::from(self.count)).max(1)
    }
}

/// Exact "at most N in any window of the period": the times of the last N admissions.
#[derive(Debug, Clone)]
pub struct SlidingLog {
    rate: Rate,
    admitted: VecDeque<i64>,
}

impl SlidingLog {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            // Grows with admissions (8 bytes each, up to N): a large N costs nothing idle.
            admitted: VecDeque::new(),
        }
    }

    /// Ok, or the nanoseconds until an admission would be allowed. Windows are half-open:
    /// an admission at t leaves the window at t + period.
    pub fn check(&self, now: i64) -> Result<(), i64> {
        if self.admitted.len() < self.rate.count as usize {
            return Ok(());
        }
        let oldest = self.admitted[0];
        let frees_at = oldest + self.rate.period_ns;
        if now >= frees_at {
            Ok(())
        } else {
            Err(frees_at - now)
        }
    }

    pub fn record(&mut self, now: i64) {
        while self.admitted.len() >= self.rate.count as usize {
            self.admitted.pop_front();
        }
        self.admitted.push_back(now);
    }

    /// Admissions in the window ending at `now`.
    pub fn used(&self, now: i64) -> usize {
        self.admitted
            .iter()
            .filter(|&&t| t + self.rate.period_ns > now)
            .count()
    }

    /// Nanoseconds until the oldest admission in the window leaves it (0 when empty).
    pub fn next_release(&self, now: i64) -> i64 {
        self.admitted
            .iter()
            .find(|&&t| t + self.rate.period_ns > now)
            .map_or(0, |&t| t + self.rate.period_ns - now)
    }

    /// Changes N (adaptive slow-down); the recorded times stay.
    pub fn set_count(&mut self, count: u32) {
        self.rate.count = count.max(1);
    }
}

/// GCRA: admissions `interval` apart on average, at most `burst` back to back.
#[derive(Debug, Clone)]
pub struct Spacing {
    interval_ns: i64,
    tolerance_ns: i64,
    /// Theoretical arrival time of the next admission.
    tat: i64,
}

impl Spacing {
    pub fn new(interval_ns: i64, burst: u32) -> Self {
        let interval_ns = interval_ns.max(1);
        Self {
            interval_ns,
            tolerance_ns: interval_ns * i64::from(burst.max(1) - 1),
            tat: i64::MIN,
        }
    }

    pub fn check(&self, now: i64) -> Result<(), i64> {
        let tat = self.tat.max(now);
        let earliest = tat - self.tolerance_ns;
        if now >= earliest {
            Ok(())
        } else {
            Err(earliest - now)
        }
    }

    pub fn record(&mut self, now: i64) {
        self.tat = self.tat.max(now) + self.interval_ns;
    }

    /// Changes the spacing (adaptive slow-down), keeping the burst size.
    pub fn set_interval(&mut self, interval_ns: i64) {
        let burst = self.tolerance_ns / self.interval_ns + 1;
        self.interval_ns = interval_ns.max(1);
        self.tolerance_ns = self.interval_ns * (burst - 1);
    }
}

/// A limiter's admission state: the sliding log, spacing, or both (an admission must
/// pass every rule; none is recorded unless all pass).
#[derive(Debug, Clone)]
pub struct Admission {
    log: Option<SlidingLog>,
    spacing: Option<Spacing>,
}

impl Admission {
    /// Outbound default: evenly spaced (`period / count`, or `min_interval_ns` when
    /// larger), `burst` back to back at most, and never more than `count` per window.
    pub fn outbound(rate: Rate, min_interval_ns: i64, burst: u32) -> Self {
        let interval = rate.interval_ns().max(min_interval_ns);
        Self {
            log: Some(SlidingLog::new(rate)),
            spacing: Some(Spacing::new(interval, burst)),
        }
    }

    /// Inbound default: up to `count` back to back, never more than `count` per window.
    pub fn inbound(rate: Rate) -> Self {
        Self {
            log: Some(SlidingLog::new(rate)),
            spacing: None,
        }
    }

    /// `(limit, remaining, ns until the oldest admission leaves the window)`, for
    /// RateLimit-* headers.
    pub fn window(&self, now: i64) -> (u32, u32, i64) {
        match &self.log {
            Some(log) => {
                let used = log.used(now) as u32;
                (
                    log.rate.count,
                    log.rate.count.saturating_sub(used),
                    log.next_release(now),
                )
            }
            None => (0, 0, 0),
        }
    }

    /// Scales the limit to `factor` (0 < factor ≤ 1) of `rate`: fewer per window,
    /// spaced further apart.
    pub fn scale(&mut self, rate: Rate, min_interval_ns: i64, factor: f64) {
        let factor = factor.clamp(0.01, 1.0);
        if let Some(log) = &mut self.log {
            log.set_count(((f64::from(rate.count) * factor).floor() as u32).max(1));
        }
        if let Some(spacing) = &mut self.spacing {
            let interval = rate.interval_ns().max(min_interval_ns);
            spacing.set_interval((interval as f64 / factor).round() as i64);
        }
    }

    /// Admits (and records) at `now`, or says how long to wait.
    pub fn try_admit(&mut self, now: i64) -> Result<(), i64> {
        let wait = [
            self.log.as_ref().map(|l| l.check(now)),
            self.spacing.as_ref().map(|s| s.check(now)),
        ]
        .into_iter()
        .flatten()
        .filter_map(Result::err)
        .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        if let Some(log) = &mut self.log {
            log.record(now);
        }
        if let Some(spacing) = &mut self.spacing {
            spacing.record(now);
        }
        Ok(())
    }
}

/// How a limiter admits: spread out (outbound), or up to N back to back (inbound).
#[derive(Debug, Clone, Copy)]
pub enum Mode {
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

/// What one attempt asks the shared limit (see `REDIS_SCRIPT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedAttempt {
    pub keys: [String; 3],
    /// count, period_us, interval_us, tolerance_us.
    pub args: [i64; 4],
    pub member: String,
}

/// A shared concurrency lease's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    Taken(String),
    /// Every lease is in use (or Redis is down and the limiter fails closed): try later.
    Busy,
    /// Nothing to give back: Redis was not asked, or could not answer and the limiter
    /// fails open.
    Unchecked,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterCounts {
    pub admitted: u64,
    pub refused: u64,
    pub throttle_events: u64,
    pub admitted_unchecked: u64,
    pub rate_factor: f64,
    pub keys: usize,
}

/// A rate limit's state and every decision it makes: in process on the times the caller
/// passes (its clock), or shared on what Redis answered. Waiting for Redis is the
/// caller's business (blocking or async), so both take the same decisions.
pub struct Limiter {
    rate: Rate,
    mode: Mode,
    name: String,
    max_keys: usize,
    fail_open: bool,
    limits: Mutex<Limits>,
    paused_until: AtomicI64,
    admitted: AtomicU64,
    refused: AtomicU64,
    throttle_events: AtomicU64,
    admitted_unchecked: AtomicU64,
}

use crate::sync::lock;

impl Limiter {
    pub fn new(rate: Rate, mode: Mode, name: &str, max_keys: usize, fail_open: bool) -> Self {
        let global = fresh_admission(rate, mode);
        Self {
            rate,
            mode,
            name: name.to_owned(),
            max_keys: max_keys.max(1),
            fail_open,
            limits: Mutex::new(Limits {
                global,
                per_key: HashMap::new(),
                factor: 1.0,
                throttled: 0,
            }),
            paused_until: AtomicI64::new(i64::MIN),
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            throttle_events: AtomicU64::new(0),
            admitted_unchecked: AtomicU64::new(0),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `"80/60s"`.
    pub fn describe(&self) -> String {
        format!(
            "{}/{}s",
            self.rate.count,
            self.rate.period_ns as f64 / NANOS_PER_SEC as f64
        )
    }

    fn min_interval(&self) -> i64 {
        match self.mode {
            Mode::Outbound {
                min_interval_ns, ..
            } => min_interval_ns,
            Mode::Inbound => 0,
        }
    }

    fn count(&self, admitted: bool) {
        let counter = if admitted {
            &self.admitted
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One in-process admission attempt at `now`: Ok, or nanoseconds to wait.
    pub fn attempt(&self, now: i64, key: Option<&str>) -> Result<(), i64> {
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
                    let mut a = fresh_admission(self.rate, self.mode);
                    a.scale(self.rate, self.min_interval(), factor);
                    (a, now)
                };
                let entry = limits.per_key.entry(key.to_owned()).or_insert_with(fresh);
                entry.1 = now;
                entry.0.try_admit(now)
            }
        };
        drop(limits);
        self.count(result.is_ok());
        result
    }

    /// `(limit, remaining, ns until a slot frees)` of the in-process window.
    pub fn window(&self, now: i64, key: Option<&str>) -> (u32, u32, i64) {
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

    fn shared_base(&self, key: Option<&str>) -> String {
        match key {
            None => format!("tenuto|limit|{}", tagged(&self.name)),
            Some(k) => format!("tenuto|limit|{}:{k}", tagged(&self.name)),
        }
    }

    /// The key of the pause everyone sharing the limit honours.
    pub fn pause_key(&self) -> String {
        format!("tenuto|limit|{}:pause", tagged(&self.name))
    }

    /// The key of the shared concurrency leases.
    pub fn lease_key(&self) -> String {
        format!("tenuto|limit|{}:leases", tagged(&self.name))
    }

    /// What one attempt asks the shared limit: this limiter's rule at its current factor.
    pub fn shared_attempt(&self, key: Option<&str>, member: String) -> SharedAttempt {
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
        let base = self.shared_base(key);
        SharedAttempt {
            keys: [
                format!("{base}:log"),
                format!("{base}:tat"),
                self.pause_key(),
            ],
            args: [count, period_us, interval_us, tolerance_us],
            member,
        }
    }

    /// The decision on the shared limit's answer: Ok or nanoseconds to wait. Redis did not
    /// answer: admit when failing open (counted apart), else refuse for a second.
    pub fn shared_outcome(&self, reply: &Result<SharedDecision, StoreError>) -> Result<(), i64> {
        let outcome = match reply {
            Ok(d) if d.admitted => Ok(()),
            Ok(d) => Err(d.wait_us.max(1) * 1000),
            Err(_) if self.fail_open => {
                self.admitted_unchecked.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => Err(NANOS_PER_SEC),
        };
        self.count(outcome.is_ok());
        outcome
    }

    /// A shared lease's fate from Redis's answer.
    pub fn lease_outcome(&self, reply: Result<bool, StoreError>, token: String) -> Lease {
        match reply {
            Ok(true) => Lease::Taken(token),
            Ok(false) => Lease::Busy,
            Err(_) if self.fail_open => Lease::Unchecked,
            Err(_) => Lease::Busy,
        }
    }

    /// Adaptive limits: a 429 (or 503) pauses everyone until `retry_after_ns` from `now`
    /// (else an exponential pause) and halves the rate; a 2xx/3xx restores it by a tenth
    /// of the configured rate at a time. Returns the pause to share (ms), if any.
    pub fn feedback(&self, now: i64, status: u16, retry_after_ns: Option<i64>) -> Option<i64> {
        let pause = {
            let mut limits = lock(&self.limits);
            if status == 429 || status == 503 {
                limits.throttled += 1;
                let backoff = self
                    .rate
                    .interval_ns()
                    .saturating_mul(1 << limits.throttled.min(16));
                let pause = retry_after_ns.unwrap_or(backoff.min(self.rate.period_ns));
                let factor = (limits.factor * 0.5).max(0.05);
                self.rescale(&mut limits, factor);
                pause
            } else {
                if (200..400).contains(&status) {
                    limits.throttled = 0;
                    if limits.factor < 1.0 {
                        // Rounded to hundredths, so ten steps of 0.1 land on exactly 1.0.
                        let factor = (((limits.factor + 0.1) * 100.0).round() / 100.0).min(1.0);
                        self.rescale(&mut limits, factor);
                    }
                }
                return None;
            }
        };
        self.throttle_events.fetch_add(1, Ordering::Relaxed);
        self.paused_until.fetch_max(now + pause, Ordering::AcqRel);
        Some((pause / 1_000_000).max(1))
    }

    fn rescale(&self, limits: &mut Limits, factor: f64) {
        limits.factor = factor;
        let (rate, min_interval) = (self.rate, self.min_interval());
        limits.global.scale(rate, min_interval, factor);
        for (admission, _) in limits.per_key.values_mut() {
            admission.scale(rate, min_interval, factor);
        }
    }

    /// Nanoseconds left of the in-process pause at `now`.
    pub fn paused_for(&self, now: i64) -> i64 {
        // Saturating: "never paused" is i64::MIN.
        self.paused_until
            .load(Ordering::Acquire)
            .saturating_sub(now)
            .max(0)
    }

    pub fn counts(&self) -> LimiterCounts {
        let limits = lock(&self.limits);
        LimiterCounts {
            admitted: self.admitted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            throttle_events: self.throttle_events.load(Ordering::Relaxed),
            admitted_unchecked: self.admitted_unchecked.load(Ordering::Relaxed),
            rate_factor: limits.factor,
            keys: limits.per_key.len(),
        }
    }
}

fn fresh_admission(rate: Rate, mode: Mode) -> Admission {
    match mode {
        Mode::Outbound {
            min_interval_ns,
            burst,
        } => Admission::outbound(rate, min_interval_ns, burst),
        Mode::Inbound => Admission::inbound(rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = NANOS_PER_SEC;

    #[test]
    fn rate_strings() {
        let minute = Rate {
            count: 80,
            period_ns: 60 * S,
        };
        assert_eq!(Rate::parse("80/minute").unwrap(), minute);
        assert_eq!(Rate::parse("80 per minute").unwrap(), minute);
        assert_eq!(Rate::parse(" 80 / Minutes ").unwrap(), minute);
        assert_eq!(
            Rate::parse("10/second").unwrap(),
            Rate {
                count: 10,
                period_ns: S
            }
        );
        assert_eq!(
            Rate::parse("5/2seconds").unwrap(),
            Rate {
                count: 5,
                period_ns: 2 * S
            }
        );
        assert_eq!(Rate::parse("1000/hour").unwrap().period_ns, 3600 * S);
        assert_eq!(Rate::parse("1000/day").unwrap().period_ns, 86_400 * S);
        for bad in [
            "",
            "80",
            "80/fortnight",
            "0/second",
            "-1/second",
            "x/second",
            "5/0seconds",
            "1.5/second",
        ] {
            let err = Rate::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    /// The largest number of admissions in any half-open window of `period` ns.
    fn worst_window(times: &[i64], period: i64) -> usize {
        let mut worst = 0;
        let mut start = 0;
        for (end, &t) in times.iter().enumerate() {
            while times[start] + period <= t {
                start += 1;
            }
            worst = worst.max(end - start + 1);
        }
        worst
    }

    /// Callers trying at pseudo-random moments (a fixed LCG, so the test is repeatable).
    fn hammer(mut admission: Admission, period: i64, attempts: usize) -> Vec<i64> {
        let mut admitted = Vec::new();
        let mut now = 0i64;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..attempts {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            now += (seed >> 33) as i64 % (period / 40).max(1);
            if admission.try_admit(now).is_ok() {
                admitted.push(now);
            }
        }
        admitted
    }

    #[test]
    fn inbound_never_exceeds_n_in_any_window_and_allows_bursts() {
        let rate = Rate::parse("50/second").unwrap();
        let mut burst = Admission::inbound(rate);
        assert!(
            (0..50).all(|_| burst.try_admit(0).is_ok()),
            "50 back to back"
        );
        assert_eq!(burst.try_admit(1), Err(S - 1));
        assert!(burst.try_admit(S).is_ok(), "the first left the window");
        let times = hammer(Admission::inbound(rate), S, 200_000);
        assert_eq!(worst_window(&times, S), 50);
        let elapsed = (times.last().unwrap() - times[0]) as f64 / S as f64;
        let utilisation = times.len() as f64 / (50.0 * elapsed.ceil());
        assert!(
            utilisation > 0.97,
            "admitted {utilisation:.3} of what the limit allows"
        );
    }

    #[test]
    fn window_and_scaling() {
        let rate = Rate::parse("4/second").unwrap();
        let mut a = Admission::inbound(rate);
        assert_eq!(a.window(0), (4, 4, 0));
        a.try_admit(0).unwrap();
        a.try_admit(S / 2).unwrap();
        assert_eq!(a.window(S / 2), (4, 2, S / 2));
        a.scale(rate, 0, 0.5);
        assert_eq!(
            a.window(S / 2),
            (2, 0, S / 2),
            "halved: full until the first leaves"
        );
        assert!(a.try_admit(S / 2).is_err());
        assert!(a.try_admit(S).is_ok());
        let mut spaced = Admission::outbound(rate, 0, 1);
        spaced.scale(rate, 0, 0.5);
        spaced.try_admit(0).unwrap();
        assert_eq!(
            spaced.try_admit(0),
            Err(S / 2),
            "spacing doubled from 250 ms"
        );
    }

    #[test]
    fn outbound_is_evenly_spaced_and_bursts_are_bounded() {
        let rate = Rate::parse("80/minute").unwrap();
        let mut spaced = Admission::outbound(rate, 0, 1);
        assert!(spaced.try_admit(0).is_ok());
        assert_eq!(
            spaced.try_admit(0),
            Err(750_000_000),
            "60 s / 80 = 0.75 s apart"
        );
        assert!(spaced.try_admit(750_000_000).is_ok());
        let mut slower = Admission::outbound(rate, 2 * S, 1);
        assert!(slower.try_admit(0).is_ok());
        assert_eq!(slower.try_admit(S), Err(S), "min_interval wins when larger");
        let mut bursty = Admission::outbound(rate, 0, 3);
        assert!((0..3).all(|_| bursty.try_admit(0).is_ok()));
        assert!(bursty.try_admit(0).is_err(), "at most 3 back to back");
        for burst in [1, 5, 80] {
            let times = hammer(Admission::outbound(rate, 0, burst), 60 * S, 100_000);
            assert!(worst_window(&times, 60 * S) <= 80, "burst {burst}");
        }
    }

    fn decision(admitted: bool, wait_us: i64) -> Result<SharedDecision, StoreError> {
        Ok(SharedDecision {
            admitted,
            wait_us,
            now_us: 0,
            used: 1,
            reset_us: 0,
        })
    }

    #[test]
    fn shared_decisions_and_failing_open_or_closed() {
        let rate = Rate::parse("80/minute").unwrap();
        let outbound = Mode::Outbound {
            min_interval_ns: 0,
            burst: 2,
        };
        let open = Limiter::new(rate, outbound, "up", 10, true);
        let ask = open.shared_attempt(Some("k"), "m".into());
        assert_eq!(
            ask.keys,
            [
                "tenuto|limit|{up}:k:log",
                "tenuto|limit|{up}:k:tat",
                "tenuto|limit|{up}:pause"
            ]
            .map(str::to_owned)
        );
        assert_eq!(ask.args, [80, 60_000_000, 750_000, 750_000]);
        assert_eq!(open.shared_outcome(&decision(true, 0)), Ok(()));
        assert_eq!(
            open.shared_outcome(&decision(false, 0)),
            Err(1000),
            "never 0"
        );
        let down = Err(StoreError::Unavailable("timed out".into()));
        assert_eq!(open.shared_outcome(&down), Ok(()), "fails open");
        let counts = open.counts();
        assert_eq!(
            (counts.admitted, counts.refused, counts.admitted_unchecked),
            (2, 1, 1)
        );
        assert_eq!(
            open.lease_outcome(Err(StoreError::Command("x".into())), "t".into()),
            Lease::Unchecked
        );
        let closed = Limiter::new(rate, Mode::Inbound, "up", 10, false);
        assert_eq!(closed.shared_outcome(&down), Err(S), "a second");
        assert_eq!(
            closed.lease_outcome(Ok(true), "t".into()),
            Lease::Taken("t".into())
        );
        assert_eq!(
            closed.lease_outcome(down.map(|_| true), "t".into()),
            Lease::Busy
        );
    }

    #[test]
    fn feedback_pauses_and_slows_the_shared_rule_too() {
        let rate = Rate::parse("80/minute").unwrap();
        let lim = Limiter::new(rate, Mode::Inbound, "up", 10, true);
        assert_eq!(lim.feedback(0, 200, None), None);
        assert_eq!(lim.feedback(0, 429, Some(30 * S)), Some(30_000));
        assert_eq!(lim.attempt(S, None), Err(29 * S));
        assert_eq!(lim.paused_for(S), 29 * S);
        assert_eq!(lim.shared_attempt(None, "m".into()).args[0], 40, "halved");
        assert_eq!(lim.counts().throttle_events, 1);
    }
}
