//! RPC metrics: calls, outcomes by kind and latency histograms, per operation.
//!
//! Latencies go into HDR histograms (microseconds, 3 significant digits, up to 10 minutes),
//! so percentiles are read from the distribution, never from an average. The number of
//! distinct operations is bounded ([`MAX_OPERATIONS`]); further ones are counted under
//! `"other"`.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::time::Duration;

/// Distinct operation labels kept per client or service; the rest are counted as `"other"`.
pub const MAX_OPERATIONS: usize = 64;

/// Upper bounds (µs) of the cumulative buckets in [`LatencyHistogram::buckets`].
pub const BUCKET_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000, 30_000_000,
];

const MAX_TRACKED_US: u64 = 600_000_000;

/// Latency distribution of one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LatencyHistogram {
    /// Observations.
    pub count: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Largest, µs.
    pub max_us: u64,
    /// Sum of every observation, µs (exact, not from the histogram's buckets).
    pub sum_us: u64,
    /// Cumulative counts: observations ≤ each bound of [`BUCKET_BOUNDS_US`] (Prometheus
    /// style; the total is `count`).
    pub buckets: Vec<(u64, u64)>,
}

/// What happened to the calls (or handled requests) of one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OperationMetrics {
    /// Calls made (or requests handled).
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failures by error kind (`"timeout"`, `"no_responders"`, …).
    pub errors: BTreeMap<String, u64>,
    /// Latency of every call, successful or not.
    pub latency: LatencyHistogram,
}

/// A snapshot of RPC metrics, by operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RpcMetrics {
    /// Per operation label.
    pub operations: BTreeMap<String, OperationMetrics>,
}

impl RpcMetrics {
    /// Calls over every operation.
    pub fn calls(&self) -> u64 {
        self.operations.values().map(|o| o.calls).sum()
    }

    /// Failures of `kind` over every operation.
    pub fn errors_of(&self, kind: &str) -> u64 {
        self.operations
            .values()
            .filter_map(|o| o.errors.get(kind))
            .sum()
    }
}

struct Op {
    calls: u64,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    latency: Histogram<u64>,
    sum_us: u64,
}

impl Op {
    fn new() -> Self {
        Self {
            calls: 0,
            ok: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
                .expect("static histogram bounds are valid"),
            sum_us: 0,
        }
    }
}

/// The live recorder (one per client, one per service).
#[derive(Default)]
pub(crate) struct Recorder {
    ops: Mutex<BTreeMap<String, Op>>,
}

impl Recorder {
    /// Records one call of `operation` that took `elapsed`; `error` is the kind of failure.
    pub(crate) fn record(&self, operation: &str, elapsed: Duration, error: Option<&'static str>) {
        let mut ops = self.ops.lock();
        let label = if ops.contains_key(operation) || ops.len() < MAX_OPERATIONS {
            operation
        } else {
            "other"
        };
        if !ops.contains_key(label) {
            ops.insert(label.to_owned(), Op::new());
        }
        let op = ops.get_mut(label).expect("inserted above");
        op.calls += 1;
        match error {
            None => op.ok += 1,
            Some(kind) => *op.errors.entry(kind).or_default() += 1,
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        op.latency.saturating_record(us.clamp(1, MAX_TRACKED_US));
        op.sum_us = op.sum_us.saturating_add(us);
    }

    pub(crate) fn snapshot(&self) -> RpcMetrics {
        let ops = self.ops.lock();
        let operations = ops
            .iter()
            .map(|(name, op)| {
                let h = &op.latency;
                let q = |x: f64| {
                    if h.is_empty() {
                        0
                    } else {
                        h.value_at_quantile(x)
                    }
                };
                let buckets = BUCKET_BOUNDS_US
                    .iter()
                    .map(|&b| (b, h.count_between(0, b)))
                    .collect();
                let metrics = OperationMetrics {
                    calls: op.calls,
                    ok: op.ok,
                    errors: op
                        .errors
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), *v))
                        .collect(),
                    latency: LatencyHistogram {
                        count: h.len(),
                        p50_us: q(0.5),
                        p90_us: q(0.9),
                        p99_us: q(0.99),
                        p999_us: q(0.999),
                        max_us: if h.is_empty() { 0 } else { h.max() },
                        sum_us: op.sum_us,
                        buckets,
                    },
                };
                (name.clone(), metrics)
            })
            .collect();
        RpcMetrics { operations }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_outcomes_and_a_distribution() {
        let r = Recorder::default();
        for us in [100, 200, 300, 400, 10_000] {
            r.record("health_check", Duration::from_micros(us), None);
        }
        r.record("health_check", Duration::from_millis(5), Some("timeout"));
        let m = r.snapshot();
        let op = &m.operations["health_check"];
        assert_eq!((op.calls, op.ok), (6, 5));
        assert_eq!(op.errors["timeout"], 1);
        assert_eq!(op.latency.count, 6);
        assert_eq!(op.latency.sum_us, 100 + 200 + 300 + 400 + 10_000 + 5_000);
        assert!(
            (299..=301).contains(&op.latency.p50_us),
            "{}",
            op.latency.p50_us
        );
        assert!(op.latency.max_us >= 10_000);
        let le_500 = op
            .latency
            .buckets
            .iter()
            .find(|(b, _)| *b == 500)
            .unwrap()
            .1;
        assert_eq!(le_500, 4);
        assert_eq!(m.calls(), 6);
        assert_eq!(m.errors_of("timeout"), 1);
    }

    #[test]
    fn operation_labels_are_bounded() {
        let r = Recorder::default();
        for i in 0..(MAX_OPERATIONS + 10) {
            r.record(&format!("op{i}"), Duration::from_micros(1), None);
        }
        let m = r.snapshot();
        assert_eq!(m.operations.len(), MAX_OPERATIONS + 1);
        assert_eq!(m.operations["other"].calls, 10);
    }
}
