//! Per-worker measurement: an HDR latency histogram, the accepted count, and error counts by HTTP
//! status or failure kind. Each worker owns one [`LaneStats`] (no sharing, no locks on the hot
//! path); the controller merges them when the window closes.
//!
//! Recording allocates nothing: statuses are `u16` keys and failure kinds `&'static str` keys,
//! and only the first failure's text is kept (for the operator). Depends on hdrhistogram only.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::BenchError;

/// Highest latency the histogram tracks exactly (larger values are clamped): 60 s, far beyond
/// any request deadline.
const MAX_TRACKED_NS: u64 = 60_000_000_000;

/// What one worker (or, merged, one lane) measured inside the window.
#[derive(Clone, Debug)]
pub struct LaneStats {
    hist: Histogram<u64>,
    accepted: u64,
    by_status: BTreeMap<u16, u64>,
    by_kind: BTreeMap<&'static str, u64>,
    reconnects: u64,
    first_error: Option<String>,
}

/// Latency percentiles in milliseconds (µs resolution; 3 significant digits from the histogram).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl LaneStats {
    /// Empty stats (1 ns … 60 s, 3 significant digits).
    pub fn new() -> Result<Self, BenchError> {
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3)
            .map_err(|e| BenchError::Internal(format!("histogram: {e:?}")))?;
        Ok(Self {
            hist,
            accepted: 0,
            by_status: BTreeMap::new(),
            by_kind: BTreeMap::new(),
            reconnects: 0,
            first_error: None,
        })
    }

    /// An answer the scenario expects (200, or 400 `InvalidCiphertextException` for bad tags).
    pub fn record_ok(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
        self.accepted += 1;
    }

    /// An HTTP answer the scenario does not expect; `detail` runs only for the first error.
    pub fn record_status(&mut self, status: u16, detail: impl FnOnce() -> String) {
        *self.by_status.entry(status).or_insert(0) += 1;
        self.note(detail);
    }

    /// A failure without an HTTP answer (`connect`, `tls`, `http`, `timeout`, …), or an HSM error
    /// kind in the raw lane.
    pub fn record_kind(&mut self, kind: &'static str, detail: impl FnOnce() -> String) {
        *self.by_kind.entry(kind).or_insert(0) += 1;
        self.note(detail);
    }

    /// A connection reopened after the server (or a failure) closed it. Not an error by itself:
    /// counted so that a server closing keep-alive connections shows up.
    pub fn record_reconnect(&mut self) {
        self.reconnects += 1;
    }

    /// Connections reopened.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn note(&mut self, detail: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(detail());
        }
    }

    /// Add `other` into `self`.
    pub fn merge(&mut self, other: LaneStats) {
        // Both histograms have the same bounds, so adding cannot fail; if it ever did, the counts
        // below stay right and only the percentiles lose `other`'s samples.
        let _ = self.hist.add(&other.hist);
        self.accepted += other.accepted;
        self.reconnects += other.reconnects;
        for (s, n) in other.by_status {
            *self.by_status.entry(s).or_insert(0) += n;
        }
        for (k, n) in other.by_kind {
            *self.by_kind.entry(k).or_insert(0) += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Expected answers inside the window.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Errors inside the window.
    pub fn error_total(&self) -> u64 {
        self.by_status.values().sum::<u64>() + self.by_kind.values().sum::<u64>()
    }

    /// Errors by label: HTTP statuses as `"503"`, other failures by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = self
            .by_status
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        out.extend(self.by_kind.iter().map(|(k, n)| ((*k).to_owned(), *n)));
        out
    }

    /// The first error's description, if any.
    pub fn first_error(&self) -> Option<&str> {
        self.first_error.as_deref()
    }

    /// Percentiles of the accepted answers (all zero when there were none).
    pub fn latency(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        let ms = |ns: u64| round3(ns as f64 / 1e6);
        LatencySummary {
            p50: ms(self.hist.value_at_quantile(0.50)),
            p90: ms(self.hist.value_at_quantile(0.90)),
            p99: ms(self.hist.value_at_quantile(0.99)),
            max: ms(self.hist.max()),
            mean: round3(self.hist.mean() / 1e6),
        }
    }
}

/// Round to 3 decimals (ms → µs resolution), so JSON and the table agree.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        // Two workers: 1..=500 ms and 501..=1000 ms; merged → uniform 1..=1000 ms.
        let mut a = LaneStats::new().unwrap();
        let mut b = LaneStats::new().unwrap();
        for ms in 1..=1000u64 {
            let w = if ms <= 500 { &mut a } else { &mut b };
            w.record_ok(Duration::from_millis(ms));
        }
        a.merge(b);
        assert_eq!(a.accepted(), 1000);
        let l = a.latency();
        // 3 significant digits: within 0.1 % of the exact value.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(l.p50, 500.0), "{l:?}");
        assert!(near(l.p90, 900.0), "{l:?}");
        assert!(near(l.p99, 990.0), "{l:?}");
        assert!(near(l.max, 1000.0), "{l:?}");
        assert!(near(l.mean, 500.5), "{l:?}");
    }

    #[test]
    fn sub_millisecond_resolution() {
        let mut s = LaneStats::new().unwrap();
        s.record_ok(Duration::from_micros(87));
        let l = s.latency();
        assert_eq!(l.p50, 0.087);
        assert_eq!(l.max, 0.087);
        assert_eq!(
            LaneStats::new().unwrap().latency(),
            LatencySummary::default()
        );
    }

    #[test]
    fn errors_by_status_and_kind() {
        let mut a = LaneStats::new().unwrap();
        a.record_status(503, || "503 HsmBusy".into());
        a.record_status(503, || unreachable!("only the first error is described"));
        let mut b = LaneStats::new().unwrap();
        b.record_kind("timeout", || "request deadline".into());
        b.record_status(400, || "400".into());
        a.merge(b);
        assert_eq!(a.error_total(), 4);
        assert_eq!(a.accepted(), 0);
        let e = a.errors();
        assert_eq!(e.get("503"), Some(&2));
        assert_eq!(e.get("400"), Some(&1));
        assert_eq!(e.get("timeout"), Some(&1));
        assert_eq!(a.first_error(), Some("503 HsmBusy"));
    }

    #[test]
    fn rounding() {
        assert_eq!(round3(0.12345), 0.123);
        assert_eq!(round3(1.0005), 1.001);
    }
}
