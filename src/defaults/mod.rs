//! Default-value fallback: the range rule a value must pass to be kept.

#[cfg(feature = "python")]
pub mod py;

/// Allowed values of one field: numbers within bounds, optionally whole numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub min_exclusive: bool,
    pub max_exclusive: bool,
    pub integer: bool,
}

impl Range {
    /// Why these bounds can admit nothing sensible, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.min.is_some_and(f64::is_nan) || self.max.is_some_and(f64::is_nan) {
            return Some("bounds must not be NaN".into());
        }
        match (self.min, self.max) {
            (Some(min), Some(max)) if min > max => {
                Some(format!("min ({min}) is above max ({max})"))
            }
            _ => None,
        }
    }

    pub fn allows(&self, x: f64, is_integer_type: bool) -> bool {
        if x.is_nan() || (self.integer && !is_integer_type) {
            return false;
        }
        let above_min = match self.min {
            Some(min) if self.min_exclusive => x > min,
            Some(min) => x >= min,
            None => true,
        };
        let below_max = match self.max {
            Some(max) if self.max_exclusive => x < max,
            Some(max) => x <= max,
            None => true,
        };
        above_min && below_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(min: Option<f64>, max: Option<f64>) -> Range {
        Range {
            min,
            max,
            min_exclusive: false,
            max_exclusive: false,
            integer: false,
        }
    }

    #[test]
    fn bounds_types_and_nan() {
        let prob = range(Some(0.0), Some(1.0));
        assert!(prob.allows(0.0, false) && prob.allows(1.0, true) && prob.allows(0.5, false));
        assert!(
            !prob.allows(1.01, false) && !prob.allows(-0.1, false) && !prob.allows(f64::NAN, false)
        );
        let tempo = Range {
            min_exclusive: true,
            ..range(Some(0.0), None)
        };
        assert!(
            !tempo.allows(0.0, false) && tempo.allows(0.001, false) && tempo.allows(1e6, false)
        );
        let key = Range {
            integer: true,
            ..range(Some(-1.0), Some(11.0))
        };
        assert!(key.allows(-1.0, true) && key.allows(11.0, true));
        assert!(
            !key.allows(5.0, false),
            "a float is the wrong type for an integer field"
        );
        assert!(!key.allows(12.0, true));
    }
}
