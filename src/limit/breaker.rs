//! Circuit breaker core (issue 5, first part): closed → open after `failures` consecutive
//! failures; open calls are refused with the time left; after `reset_after` up to
//! `half_open_max` probes go through, and the first probe's outcome closes or reopens it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead; `probe` calls must report back so the breaker can decide.
    Allowed { probe: bool },
    /// Refused: retry in this many nanoseconds.
    Refused { retry_after_ns: i64 },
}

/// Also open when, over the last `window_ns`, at least `min_calls` calls were made and at
/// least `rate` of them failed.
#[derive(Debug, Clone, Copy)]
pub struct FailureRate {
    pub rate: f64,
    pub window_ns: i64,
    pub min_calls: u32,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    failures: u32,
    reset_after_ns: i64,
    half_open_max: u32,
    consecutive_failures: u32,
    opened_at: Option<i64>,
    probes_in_flight: u32,
    failure_rate: Option<FailureRate>,
    /// Outcomes (time, failed) inside the failure-rate window.
    recent: std::collections::VecDeque<(i64, bool)>,
}

impl Breaker {
    pub fn new(failures: u32, reset_after_ns: i64, half_open_max: u32) -> Self {
        Self {
            failures: failures.max(1),
            reset_after_ns: reset_after_ns.max(0),
            half_open_max: half_open_max.max(1),
            consecutive_failures: 0,
            opened_at: None,
            probes_in_flight: 0,
            failure_rate: None,
            recent: std::collections::VecDeque::new(),
        }
    }

    pub fn with_failure_rate(mut self, failure_rate: FailureRate) -> Self {
        self.failure_rate = Some(failure_rate);
        self
    }

    /// Notes an outcome for the failure-rate rule; true if the rate now calls for opening.
    fn note(&mut self, now: i64, failed: bool) -> bool {
        let Some(rule) = self.failure_rate else {
            return false;
        };
        self.recent.push_back((now, failed));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| *t + rule.window_ns <= now)
        {
            self.recent.pop_front();
        }
        let calls = self.recent.len();
        let failed_calls = self.recent.iter().filter(|(_, f)| *f).count();
        calls >= rule.min_calls as usize && failed_calls as f64 >= rule.rate * calls as f64
    }

    pub fn state(&self, now: i64) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now < at + self.reset_after_ns => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    pub fn permit(&mut self, now: i64) -> Permit {
        match (self.state(now), self.opened_at) {
            (BreakerState::Closed, _) => Permit::Allowed { probe: false },
            (BreakerState::Open, Some(at)) => Permit::Refused {
                retry_after_ns: at + self.reset_after_ns - now,
            },
            (BreakerState::HalfOpen, _) if self.probes_in_flight < self.half_open_max => {
                self.probes_in_flight += 1;
                Permit::Allowed { probe: true }
            }
            // Half open with every probe slot taken: wait for a probe to report.
            _ => Permit::Refused { retry_after_ns: 0 },
        }
    }

    /// Any success closes the breaker (a probe's, or a call admitted before it opened).
    pub fn record_success(&mut self, now: i64, probe: bool) {
        if probe {
            self.recent.clear(); // a good probe starts a fresh window
        } else {
            self.note(now, false);
        }
        self.consecutive_failures = 0;
        self.opened_at = None;
        self.probes_in_flight = 0;
    }

    pub fn record_failure(&mut self, now: i64, probe: bool) {
        if probe {
            self.probes_in_flight = 0;
            self.opened_at = Some(now);
            return;
        }
        self.consecutive_failures += 1;
        let rate_exceeded = self.note(now, true);
        if self.opened_at.is_none() && (self.consecutive_failures >= self.failures || rate_exceeded)
        {
            self.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_reset() {
        let mut b = Breaker::new(3, 30 * S, 1);
        for _ in 0..2 {
            assert_eq!(b.permit(0), Permit::Allowed { probe: false });
            b.record_failure(0, false);
        }
        b.record_success(0, false);
        for _ in 0..3 {
            b.record_failure(0, false);
        }
        assert_eq!(b.state(0), BreakerState::Open, "three in a row");
        assert_eq!(
            b.permit(10 * S),
            Permit::Refused {
                retry_after_ns: 20 * S
            }
        );
        assert_eq!(b.state(30 * S), BreakerState::HalfOpen);
        assert_eq!(b.permit(30 * S), Permit::Allowed { probe: true });
        assert_eq!(
            b.permit(30 * S),
            Permit::Refused { retry_after_ns: 0 },
            "one probe at a time"
        );
        b.record_failure(31 * S, true);
        assert_eq!(
            b.state(31 * S),
            BreakerState::Open,
            "a failed probe reopens"
        );
        assert_eq!(b.permit(61 * S), Permit::Allowed { probe: true });
        b.record_success(61 * S, true);
        assert_eq!(b.state(61 * S), BreakerState::Closed, "a good probe closes");
        assert_eq!(b.permit(61 * S), Permit::Allowed { probe: false });
    }

    #[test]
    fn successes_in_between_keep_it_closed() {
        let mut b = Breaker::new(2, S, 1);
        for _ in 0..10 {
            b.record_failure(0, false);
            b.record_success(0, false);
        }
        assert_eq!(b.state(0), BreakerState::Closed);
    }

    #[test]
    fn failure_rate_over_a_window_opens_too() {
        let rule = FailureRate {
            rate: 0.5,
            window_ns: 10 * S,
            min_calls: 4,
        };
        let mut b = Breaker::new(100, S, 1).with_failure_rate(rule);
        b.record_failure(0, false);
        b.record_success(0, false);
        b.record_failure(S, false);
        assert_eq!(b.state(S), BreakerState::Closed, "3 calls: under min_calls");
        b.record_success(2 * S, false);
        assert_eq!(
            b.state(2 * S),
            BreakerState::Closed,
            "2 of 4 failed, the last a success"
        );
        b.record_failure(3 * S, false);
        assert_eq!(
            b.state(3 * S),
            BreakerState::Open,
            "3 of 5 failed: over 50 %"
        );
        let mut old = Breaker::new(100, S, 1).with_failure_rate(rule);
        for t in 0..3 {
            old.record_failure(t * S, false);
        }
        old.record_success(20 * S, false);
        old.record_failure(21 * S, false);
        assert_eq!(
            old.state(21 * S),
            BreakerState::Closed,
            "old failures left the window"
        );
    }
}
