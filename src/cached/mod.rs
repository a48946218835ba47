//! The `@cache.cached` decorator's pure parts: how a request's states combine, and the
//! negative-result backoff.

use crate::cache::State;

#[cfg(feature = "python")]
pub mod py;

/// How bad a state is for a response's `X-Cache` header: stale beats miss beats hit.
pub fn severity(state: State) -> u8 {
    match state {
        State::Hit => 1,
        State::Miss => 2,
        State::Stale => 3,
    }
}

pub fn from_severity(level: u8) -> Option<State> {
    match level {
        1 => Some(State::Hit),
        2 => Some(State::Miss),
        3 => Some(State::Stale),
        _ => None,
    }
}

/// Seconds to keep the n-th consecutive negative answer: base × factor^(n−1), capped.
pub fn backoff_seconds(base: f64, factor: f64, max: f64, n: u32) -> f64 {
    let exponent = n.saturating_sub(1).min(1024) as i32;
    (base * factor.powi(exponent)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_outranks_miss_outranks_hit() {
        assert!(severity(State::Stale) > severity(State::Miss));
        assert!(severity(State::Miss) > severity(State::Hit));
        for s in [State::Hit, State::Miss, State::Stale] {
            assert_eq!(from_severity(severity(s)), Some(s));
        }
        assert_eq!(from_severity(0), None);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let got: Vec<f64> = (1..=7)
            .map(|n| backoff_seconds(60.0, 2.0, 3600.0, n))
            .collect();
        assert_eq!(got, [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0]);
        assert_eq!(backoff_seconds(60.0, 2.0, 3600.0, u32::MAX), 3600.0);
    }
}
