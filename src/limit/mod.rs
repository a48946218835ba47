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

use std::collections::VecDeque;

pub mod breaker;
#[cfg(feature = "python")]
pub mod py;

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
}
