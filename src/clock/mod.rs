//! Time source for every mechanism. Injectable so expiry, jitter and limiter tests run
//! without sleeping (the moka `Clock::mock` / governor `FakeRelativeClock` habit).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(feature = "python")]
pub mod py;

/// Wall-clock time as nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_nanos(&self) -> i64;

    /// Whole epoch seconds, rounded down: the unit of envelope fields.
    fn now_secs(&self) -> i64 {
        self.now_nanos().div_euclid(1_000_000_000)
    }

    /// Waits `nanos`: really for the system clock; a manual clock just moves on, so code
    /// that waits (a blocking rate limiter) runs instantly and deterministically in tests.
    fn sleep(&self, nanos: i64) {
        if nanos > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(nanos as u64));
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_nanos(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(before) => -(before.duration().as_nanos() as i64),
        }
    }

    /// Whole seconds need no nanosecond clock: the coarse one (a few ms of resolution) is
    /// a plain memory read, several times cheaper on every cache lookup.
    #[cfg(target_os = "linux")]
    fn now_secs(&self) -> i64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
            ts.tv_sec
        } else {
            self.now_nanos().div_euclid(1_000_000_000)
        }
    }
}

/// A clock that only moves when told to. Shared by reference so a test and the cache it
/// drives see the same time.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicI64,
}

impl ManualClock {
    pub fn new(start_nanos: i64) -> Arc<Self> {
        Arc::new(Self {
            nanos: AtomicI64::new(start_nanos),
        })
    }

    pub fn set_nanos(&self, nanos: i64) {
        self.nanos.store(nanos, Ordering::SeqCst);
    }

    pub fn advance_nanos(&self, delta: i64) {
        self.nanos.fetch_add(delta, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> i64 {
        self.nanos.load(Ordering::SeqCst)
    }

    fn sleep(&self, nanos: i64) {
        self.advance_nanos(nanos.max(0));
    }
}

pub type ClockRef = Arc<dyn Clock>;

pub fn system() -> ClockRef {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_700_000_000_500_000_000);
        assert_eq!(clock.now_secs(), 1_700_000_000);
        clock.advance_nanos(600_000_000);
        assert_eq!(clock.now_secs(), 1_700_000_001);
        clock.set_nanos(-1);
        assert_eq!(
            clock.now_secs(),
            -1,
            "seconds round down, also before the epoch"
        );
    }

    #[test]
    fn system_clock_is_after_2020_and_coarse_seconds_agree() {
        let fine = SystemClock.now_nanos().div_euclid(1_000_000_000);
        let coarse = SystemClock.now_secs();
        assert!(coarse > 1_577_836_800);
        assert!((fine - coarse).abs() <= 1, "fine {fine}, coarse {coarse}");
    }
}
