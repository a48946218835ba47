//! Counters an exporter reads at scrape time: nothing here runs on a hit path. Upstream
//! calls (a cached function's loads and refreshes) are counted by outcome and timed in a
//! fixed-bucket histogram sized for APIs that take from milliseconds to over a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the upstream-latency buckets; the last bucket is +Inf.
pub const UPSTREAM_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one past every bound.
    counts: [AtomicU64; UPSTREAM_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// A histogram read at one moment: cumulative counts per bound, as Prometheus wants.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_secs: f64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = UPSTREAM_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(UPSTREAM_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(UPSTREAM_BUCKETS.len() + 1);
        for (i, count) in self.counts.iter().enumerate() {
            running += count.load(Ordering::Relaxed);
            let bound = UPSTREAM_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            cumulative.push((bound, running));
        }
        HistogramSnapshot {
            cumulative,
            count: running,
            sum_secs: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// One cached function's calls to its upstream.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub seconds: Histogram,
}

impl UpstreamStats {
    pub fn record(&self, ok: bool, took: Duration) {
        let counter = if ok { &self.ok } else { &self.errors };
        counter.fetch_add(1, Ordering::Relaxed);
        self.seconds.observe(took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounded() {
        let stats = UpstreamStats::default();
        stats.record(true, Duration::from_millis(3));
        stats.record(true, Duration::from_millis(700));
        stats.record(false, Duration::from_secs(45));
        stats.record(false, Duration::from_secs(500));
        let snap = stats.seconds.snapshot();
        assert_eq!(snap.count, 4);
        assert_eq!(snap.cumulative[0], (0.005, 1));
        assert_eq!(snap.cumulative[7], (1.0, 2), "0.7 s is under 1 s");
        assert_eq!(snap.cumulative[12], (60.0, 3));
        assert_eq!(snap.cumulative.last(), Some(&(f64::INFINITY, 4)));
        assert!((snap.sum_secs - 545.703).abs() < 1e-6);
        assert_eq!(stats.ok.load(Ordering::Relaxed), 2);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
    }
}
