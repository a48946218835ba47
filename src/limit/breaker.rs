//! Circuit breaker core (issue 5, first part): closed → open after `failures` consecutive
//! failures; open calls are refused with the time left; after `reset_after` up to
//! `half_open_max` probes go through, and the first probe's outcome closes or reopens it.
//! `Circuit` adds the counters and the rule between a state shared through Redis and the
//! local one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

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

/// A step of the shared breaker state (see `limit::BREAKER_SCRIPT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    State,
    Permit,
    Success,
    Failure,
}

impl Step {
    fn op(self) -> &'static str {
        match self {
            Step::State => "state",
            Step::Permit => "permit",
            Step::Success => "success",
            Step::Failure => "failure",
        }
    }
}

/// Redis's answer to a step, `{verdict, wait_ms}`; None when it did not answer (or was
/// not asked): the local state decides then.
pub type Reply = Option<(i64, i64)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitCounts {
    pub calls: u64,
    pub failures: u64,
    pub refused: u64,
    pub opened: u64,
}

/// A breaker's local state, counters, and the rule between the shared state and the
/// local one: every decision takes Redis's reply, so blocking and async callers (which
/// only differ in how they wait for it) decide alike.
pub struct Circuit {
    name: String,
    local: Mutex<Breaker>,
    failures_to_open: u32,
    reset_after_ms: i64,
    half_open_max: u32,
    calls: AtomicU64,
    failures: AtomicU64,
    refused: AtomicU64,
    opened: AtomicU64,
    /// The last failure could not be recorded in the shared state (Redis down, or
    /// refusing writes): the local state, which did record it, decides permits until a
    /// shared report succeeds again.
    local_decides: std::sync::atomic::AtomicBool,
}

impl Circuit {
    pub fn new(name: &str, breaker: Breaker) -> Self {
        Self {
            name: name.to_owned(),
            failures_to_open: breaker.failures,
            reset_after_ms: breaker.reset_after_ns / 1_000_000,
            half_open_max: breaker.half_open_max,
            local: Mutex::new(breaker),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            local_decides: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn local(&self) -> MutexGuard<'_, Breaker> {
        crate::sync::lock(&self.local)
    }

    /// The shared state's key and the script's arguments for `step`.
    pub fn shared_step(&self, step: Step, probe: bool) -> (String, [String; 5]) {
        (
            format!("tenuto|breaker|{}", self.name),
            [
                step.op().to_owned(),
                self.failures_to_open.to_string(),
                self.reset_after_ms.to_string(),
                self.half_open_max.to_string(),
                u8::from(probe).to_string(),
            ],
        )
    }

    /// May a call go ahead at `now`, and is it a probe?
    pub fn permit(&self, now: i64, reply: Reply) -> Permit {
        let permit = match reply {
            Some((0, wait_ms)) => Permit::Refused {
                retry_after_ns: wait_ms * 1_000_000,
            },
            Some(_) if self.local_decides.load(Ordering::Acquire) => self.local().permit(now),
            Some((verdict, _)) => Permit::Allowed {
                probe: verdict == 2,
            },
            None => self.local().permit(now),
        };
        let counter = match permit {
            Permit::Allowed { .. } => &self.calls,
            Permit::Refused { .. } => &self.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        permit
    }

    /// A call succeeded (whatever Redis answered, the local state learns it: it decides
    /// while Redis cannot).
    pub fn success(&self, now: i64, probe: bool) {
        self.local().record_success(now, probe);
    }

    /// A call failed: the shared state decided when Redis answered, else the local one.
    pub fn failure(&self, now: i64, probe: bool, reply: Reply) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.local_decides.store(reply.is_none(), Ordering::Release);
        if let Some((open, _)) = reply {
            if open == 1 {
                self.opened.fetch_add(u64::from(!probe), Ordering::Relaxed);
            }
            return;
        }
        let mut local = self.local();
        let was_open = local.state(now) != BreakerState::Closed;
        local.record_failure(now, probe);
        if !was_open && local.state(now) == BreakerState::Open {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn state(&self, now: i64, reply: Reply) -> BreakerState {
        match reply {
            Some(_) if self.local_decides.load(Ordering::Acquire) => self.local().state(now),
            Some((0, _)) => BreakerState::Closed,
            Some((1, _)) => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
            None => self.local().state(now),
        }
    }

    pub fn counts(&self) -> CircuitCounts {
        CircuitCounts {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_step_that_fails_leaves_the_decision_to_the_local_state() {
        // Redis answers permits (reads) but refuses to record failures (writes): the
        // local breaker, which recorded them, opens after `failures` and refuses.
        let circuit = Circuit::new("b", Breaker::new(2, 30 * S, 1));
        let shared_closed = Some((1_i64, 0_i64));
        for _ in 0..2 {
            assert!(matches!(
                circuit.permit(0, shared_closed),
                Permit::Allowed { .. }
            ));
            circuit.failure(0, false, None);
        }
        assert!(matches!(
            circuit.permit(0, shared_closed),
            Permit::Refused { .. }
        ));
        circuit.failure(0, false, Some((1, 0)));
        assert!(
            matches!(
                circuit.permit(31 * S, shared_closed),
                Permit::Allowed { .. }
            ),
            "a recorded shared failure gives the decision back to the shared state"
        );
    }

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

    #[test]
    fn circuit_follows_redis_when_it_answers_and_its_own_state_otherwise() {
        let c = Circuit::new("up", Breaker::new(2, 30 * S, 1));
        assert_eq!(
            c.shared_step(Step::Failure, true),
            (
                "tenuto|breaker|up".to_owned(),
                ["failure", "2", "30000", "1", "1"].map(str::to_owned)
            )
        );
        assert_eq!(
            c.permit(0, Some((0, 1500))),
            Permit::Refused {
                retry_after_ns: 1500 * 1_000_000
            }
        );
        assert_eq!(c.permit(0, Some((2, 0))), Permit::Allowed { probe: true });
        c.failure(0, false, Some((1, 0)));
        c.failure(0, false, Some((1, 0)));
        assert_eq!(c.state(0, None), BreakerState::Closed, "Redis decided");
        assert_eq!(c.state(0, Some((1, 0))), BreakerState::Open);
        c.failure(0, false, None);
        c.failure(0, false, None);
        assert_eq!(c.state(0, None), BreakerState::Open, "no answer: local");
        assert_eq!(
            c.permit(S, None),
            Permit::Refused {
                retry_after_ns: 29 * S
            }
        );
        c.success(S, false);
        assert_eq!(c.permit(S, None), Permit::Allowed { probe: false });
        assert_eq!(
            c.counts(),
            CircuitCounts {
                calls: 2,
                failures: 4,
                refused: 2,
                opened: 3
            }
        );
    }
}
