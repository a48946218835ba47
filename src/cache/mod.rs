//! The envelope cache core: envelope times and states, TTL policy with jitter, counters,
//! and the two stores (memory, Redis). No pyo3 here.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{CoreError, CoreResult};

pub mod conn;
pub mod engine;
pub mod local;
pub mod memory;
#[cfg(feature = "python")]
pub mod py;
pub mod redis;
pub mod topology;

/// The three integer epoch-second stamps of an envelope; bounds are inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    pub fetched_at: i64,
    pub fresh_until: i64,
    pub stale_until: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Hit,
    Stale,
    Miss,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Hit => "hit",
            State::Stale => "stale",
            State::Miss => "miss",
        }
    }
}

impl Times {
    pub fn state(&self, now: i64) -> State {
        if now <= self.fresh_until {
            State::Hit
        } else if now <= self.stale_until {
            State::Stale
        } else {
            State::Miss
        }
    }

    /// Seconds the backend should keep the entry: until `stale_until`, at least 1.
    pub fn keep_for(&self, now: i64) -> u64 {
        (self.stale_until - now).max(1) as u64
    }
}

/// The longest duration tenuto accepts, in seconds (about 317 years): epoch arithmetic
/// and `Duration`s stay far from overflow.
pub const MAX_SECONDS: f64 = 1e10;

/// Validates a duration given in seconds (a TTL, a timeout): a finite number above zero
/// and at most `MAX_SECONDS`. The one check every duration argument goes through.
pub fn check_ttl(name: &str, seconds: f64) -> CoreResult<f64> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_SECONDS {
        return Err(CoreError::invalid(format!(
            "{name} must be a positive number of seconds up to {MAX_SECONDS:e}, got {seconds}"
        )));
    }
    Ok(seconds)
}

/// Reads a duration written with a unit: `"90s"`, `"15m"`, `"2h"`, `"90d"`, `"1w"`,
/// `"500ms"`, decimals allowed (`"1.5h"`), spaces around ignored. The host apps' TTLs are
/// days (90 d, 180 d), easier to read this way than as 7776000.
pub fn parse_duration(name: &str, text: &str) -> CoreResult<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_seconds = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3_600.0,
        "d" => 86_400.0,
        "w" => 604_800.0,
        "" => {
            return Err(CoreError::invalid(format!(
                "{name} {text:?} needs a unit: ms, s, m, h, d or w (e.g. \"90s\", \"15m\", \"90d\"), or pass a number of seconds"
            )))
        }
        other => {
            return Err(CoreError::invalid(format!(
                "{name} {text:?} has an unknown unit {other:?}: use ms, s, m, h, d or w"
            )))
        }
    };
    let value: f64 = number.parse().map_err(|_| {
        CoreError::invalid(format!(
            "{name} {text:?} is not a duration like \"90s\", \"15m\", \"2h\" or \"90d\""
        ))
    })?;
    check_ttl(name, value * unit_seconds)
}

/// `check_ttl` as a `Duration`.
pub fn check_duration(name: &str, seconds: f64) -> CoreResult<std::time::Duration> {
    Ok(std::time::Duration::from_secs_f64(check_ttl(
        name, seconds,
    )?))
}

/// How `set` turns a TTL into envelope times: ±`jitter` × ttl of random spread so entries
/// written together do not expire together, at least 1 s, stale never before fresh.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    jitter: f64,
}

impl TtlPolicy {
    pub fn new(jitter: f64) -> CoreResult<Self> {
        if !(0.0..1.0).contains(&jitter) {
            return Err(CoreError::invalid(format!(
                "jitter must be in [0, 1), got {jitter}"
            )));
        }
        Ok(Self { jitter })
    }

    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// `unit` is a uniform sample in [0, 1) (injected so tests are deterministic).
    fn spread(&self, seconds: f64, unit: f64) -> i64 {
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        ((seconds * factor).round() as i64).max(1)
    }

    pub fn stamp(
        &self,
        now: i64,
        ttl: f64,
        stale_ttl: Option<f64>,
        mut unit: impl FnMut() -> f64,
    ) -> CoreResult<Times> {
        let ttl = check_ttl("ttl", ttl)?;
        let fresh_until = now + self.spread(ttl, unit());
        let stale_until = match stale_ttl {
            None => fresh_until,
            Some(stale_ttl) => {
                let stale_ttl = check_ttl("stale_ttl", stale_ttl)?;
                if stale_ttl < ttl {
                    return Err(CoreError::invalid(format!(
                        "stale_ttl ({stale_ttl}) must not be shorter than ttl ({ttl})"
                    )));
                }
                if stale_ttl == ttl {
                    fresh_until
                } else {
                    (now + self.spread(stale_ttl, unit())).max(fresh_until + 1)
                }
            }
        };
        Ok(Times {
            fetched_at: now,
            fresh_until,
            stale_until,
        })
    }
}

/// Counters behind `Cache.stats()`: relaxed atomics, cheap on every path.
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub stale_hits: AtomicU64,
    pub misses: AtomicU64,
    pub sets: AtomicU64,
    pub deletes: AtomicU64,
    /// Unreadable values found under a tenuto key.
    pub decode_errors: AtomicU64,
    /// Backend calls that failed (unreachable, timed out, or answered an error).
    pub backend_errors: AtomicU64,
}

impl Counters {
    pub fn count_state(&self, state: State) {
        let counter = match state {
            State::Hit => &self.hits,
            State::Stale => &self.stale_hits,
            State::Miss => &self.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("ttl", "90s").unwrap(), 90.0);
        assert_eq!(parse_duration("ttl", "15m").unwrap(), 900.0);
        assert_eq!(parse_duration("ttl", " 2h ").unwrap(), 7200.0);
        assert_eq!(parse_duration("ttl", "90d").unwrap(), 7_776_000.0);
        assert_eq!(parse_duration("ttl", "1.5h").unwrap(), 5400.0);
        assert_eq!(parse_duration("ttl", "500ms").unwrap(), 0.5);
        assert_eq!(parse_duration("ttl", "1w").unwrap(), 604_800.0);
        for bad in [
            "60",
            "5x",
            "m",
            "",
            "-5s",
            "0s",
            "1e400s",
            "1.2.3h",
            "5 minutes",
        ] {
            let err = parse_duration("ttl", bad).unwrap_err().to_string();
            assert!(err.contains("ttl"), "{bad}: {err}");
        }
    }

    fn times(fresh_until: i64, stale_until: i64) -> Times {
        Times {
            fetched_at: 0,
            fresh_until,
            stale_until,
        }
    }

    #[test]
    fn state_bounds_are_inclusive() {
        let t = times(10, 20);
        assert_eq!(t.state(10), State::Hit);
        assert_eq!(t.state(11), State::Stale);
        assert_eq!(t.state(20), State::Stale);
        assert_eq!(t.state(21), State::Miss);
    }

    #[test]
    fn no_jitter_stamps_exactly() {
        let policy = TtlPolicy::new(0.0).unwrap();
        let t = policy.stamp(1000, 300.0, Some(3600.0), || 0.9).unwrap();
        assert_eq!(
            t,
            Times {
                fetched_at: 1000,
                fresh_until: 1300,
                stale_until: 4600
            }
        );
        let t = policy.stamp(1000, 300.0, None, || 0.9).unwrap();
        assert_eq!(t.stale_until, t.fresh_until, "no stale window by default");
    }

    #[test]
    fn jitter_stays_within_bounds_and_stale_after_fresh() {
        let policy = TtlPolicy::new(0.1).unwrap();
        for (a, b) in [(0.0, 0.0), (0.999, 0.0), (0.0, 0.999), (0.5, 0.5)] {
            let mut samples = [a, b].into_iter();
            let t = policy
                .stamp(0, 100.0, Some(105.0), || samples.next().unwrap())
                .unwrap();
            assert!((90..=110).contains(&t.fresh_until), "{t:?}");
            assert!(t.stale_until > t.fresh_until, "{t:?}");
        }
        let t = policy.stamp(0, 0.2, None, || 0.0).unwrap();
        assert_eq!(t.fresh_until, 1, "at least one second");
    }

    #[test]
    fn bad_ttls_are_rejected() {
        let policy = TtlPolicy::new(0.0).unwrap();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(policy.stamp(0, bad, None, || 0.5).is_err());
        }
        let err = policy.stamp(0, 10.0, Some(5.0), || 0.5).unwrap_err();
        assert!(err.to_string().contains("stale_ttl"));
        assert!(TtlPolicy::new(1.5).is_err());
    }
}
