//! The `@cache.cached` decorator's pure part: how a request's states combine.

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
}
