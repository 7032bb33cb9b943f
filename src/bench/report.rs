//! What a run reports: one [`ScenarioReport`] per scenario × concurrency, rendered as a table row
//! or as one JSON line.
//!
//! Plain data plus formatting; the numbers are computed in `super` from [`super::stats`] and
//! [`super::procstat`]. Absent figures (no server pid, no raw lane) are `null` in JSON and `n/a`
//! in the table, never zero, so a missing measurement cannot pass for a good one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::options::Scenario;
use super::stats::{LaneStats, LatencySummary, round3};

/// One lane's figures over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct LaneReport {
    /// Expected answers in the window.
    pub requests: u64,
    /// Expected answers per second.
    pub rps: f64,
    /// Latency of the expected answers (ms).
    pub latency_ms: LatencySummary,
    /// Unexpected answers by HTTP status (`"503"`) and failures by kind (`"timeout"`, `"tls"`,
    /// or the HSM error kind in the raw lane).
    pub errors: BTreeMap<String, u64>,
    /// Sum of `errors`.
    pub error_total: u64,
    /// The first error, described.
    pub first_error: Option<String>,
    /// Connections reopened during the lane (0 in the raw lane).
    pub reconnects: u64,
}

impl LaneReport {
    /// Figures of `stats` over a window of `seconds`.
    pub fn from_stats(stats: &LaneStats, seconds: f64) -> Self {
        let requests = stats.accepted();
        Self {
            requests,
            rps: if seconds > 0.0 {
                (requests as f64 / seconds * 10.0).round() / 10.0
            } else {
                0.0
            },
            latency_ms: stats.latency(),
            errors: stats.errors(),
            error_total: stats.error_total(),
            first_error: stats.first_error().map(str::to_owned),
            reconnects: stats.reconnects(),
        }
    }
}

/// The raw HSM lane's figures.
#[derive(Clone, Debug, Serialize)]
pub struct RawReport {
    /// The lane.
    #[serde(flatten)]
    pub lane: LaneReport,
    /// CPU of the benchmark process per operation (µs): backend, PKCS#11 library and the loop.
    pub cpu_us_per_op: Option<f64>,
}

/// The idle keep-alive connections held open during the run (`--idle-connections`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleReport {
    /// Asked for.
    pub requested: usize,
    /// Opened successfully.
    pub opened: usize,
    /// Still open when this report was made (the server may close idle connections).
    pub still_open: usize,
    /// Server RSS before opening them (MB), if the pid is known.
    pub server_rss_mb_before: Option<f64>,
    /// Server RSS once they were open (MB).
    pub server_rss_mb_after: Option<f64>,
    /// Why the first one that failed did.
    pub first_error: Option<String>,
}

/// The result of one scenario at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Requests in flight at any time (workers).
    pub concurrency: usize,
    /// Keep-alive connections used.
    pub connections: usize,
    /// Plaintext bytes.
    pub plaintext_size: usize,
    /// AAD bytes.
    pub aad_size: usize,
    /// The wrapping algorithm (`A256KW`…) of the Azure scenarios; `None` for the others.
    pub alg: Option<&'static str>,
    /// Length of the measured window (s).
    pub window_s: f64,
    /// The proxy over HTTP(S); `None` if the scenario could not be set up.
    pub proxy: Option<LaneReport>,
    /// Server CPU (user + system) per answered request over the window (µs); needs the pid.
    pub server_cpu_us_per_req: Option<f64>,
    /// Server RSS at the end of the window (MB); needs the pid.
    pub server_rss_mb: Option<f64>,
    /// The benchmark process's own CPU per request during the HTTP lane (µs).
    pub client_cpu_us_per_req: Option<f64>,
    /// HSM sessions the server reopened during the HTTP lane, warm-up included (from
    /// `ekm_hsm_session_reopens_total` on its admin listener; needs `--admin` or `--spawn`).
    pub server_session_reopens: Option<u64>,
    /// The raw HSM lane; `None` when not measured (metadata, health, `--no-raw`).
    pub raw: Option<RawReport>,
    /// `proxy.rps / raw.rps`.
    pub ratio_proxy_raw: Option<f64>,
    /// The idle connections, when `--idle-connections` is set.
    pub idle: Option<IdleReport>,
    /// Why the scenario (or its raw lane) could not be measured.
    pub error: Option<String>,
}

impl ScenarioReport {
    /// The ratio proxy/raw, when both lanes answered.
    pub fn compute_ratio(&mut self) {
        self.ratio_proxy_raw = match (&self.proxy, &self.raw) {
            (Some(p), Some(r)) if r.lane.rps > 0.0 => Some(round3(p.rps / r.lane.rps)),
            _ => None,
        };
    }

    /// One JSON object (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot serialize report: {e}\"}}"))
    }
}

/// Column layout: header text and width. Numbers are right-aligned.
const COLUMNS: &[(&str, usize)] = &[
    ("scenario", 16),
    ("c", 4),
    ("conn", 5),
    ("rps", 9),
    ("p50 ms", 8),
    ("p90 ms", 8),
    ("p99 ms", 8),
    ("max ms", 8),
    ("errors", 8),
    ("srv µs/req", 10),
    ("srv MB", 7),
    ("cli µs/req", 10),
    ("raw rps", 9),
    ("raw p50", 8),
    ("raw p99", 8),
    ("proxy/raw", 9),
];

/// The table header (two lines: names and a rule).
pub fn table_header() -> String {
    let mut out = String::new();
    for (i, (name, width)) in COLUMNS.iter().enumerate() {
        if i == 0 {
            let _ = write!(out, "{name:<width$}");
        } else {
            let _ = write!(out, " {name:>width$}");
        }
    }
    let rule_len = out.chars().count();
    out.push('\n');
    out.push_str(&"-".repeat(rule_len));
    out
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

/// One table row, then one indented line per error detail (first error, setup error).
pub fn table_row(r: &ScenarioReport) -> String {
    let p = r.proxy.as_ref();
    let raw = r.raw.as_ref().map(|r| &r.lane);
    let errors = p.map_or_else(|| "n/a".to_owned(), |p| p.error_total.to_string());
    let cells: Vec<String> = vec![
        r.scenario.as_str().to_owned(),
        r.concurrency.to_string(),
        r.connections.to_string(),
        opt(p.map(|p| p.rps), 0),
        opt(p.map(|p| p.latency_ms.p50), 3),
        opt(p.map(|p| p.latency_ms.p90), 3),
        opt(p.map(|p| p.latency_ms.p99), 3),
        opt(p.map(|p| p.latency_ms.max), 3),
        errors,
        opt(r.server_cpu_us_per_req, 1),
        opt(r.server_rss_mb, 1),
        opt(r.client_cpu_us_per_req, 1),
        opt(raw.map(|l| l.rps), 0),
        opt(raw.map(|l| l.latency_ms.p50), 3),
        opt(raw.map(|l| l.latency_ms.p99), 3),
        opt(r.ratio_proxy_raw, 3),
    ];
    let mut out = String::new();
    for (i, (cell, (_, width))) in cells.iter().zip(COLUMNS).enumerate() {
        if i == 0 {
            let _ = write!(out, "{cell:<width$}");
        } else {
            let _ = write!(out, " {cell:>width$}");
        }
    }
    if let Some(p) = p
        && p.error_total > 0
    {
        let _ = write!(
            out,
            "\n    proxy errors {:?}; first: {}",
            p.errors,
            p.first_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(l) = raw
        && l.error_total > 0
    {
        let _ = write!(
            out,
            "\n    raw errors {:?}; first: {}",
            l.errors,
            l.first_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(n) = r.server_session_reopens
        && n > 0
    {
        let _ = write!(
            out,
            "\n    the server reopened {n} HSM session(s) during this run"
        );
    }
    if let Some(i) = &r.idle
        && i.still_open < i.opened
    {
        let _ = write!(
            out,
            "\n    idle connections still open: {} of {}",
            i.still_open, i.opened
        );
    }
    if let Some(e) = &r.error {
        let _ = write!(out, "\n    not measured: {e}");
    }
    out
}

/// The idle-connection summary line.
pub fn idle_line(i: &IdleReport) -> String {
    let mut out = format!(
        "idle keep-alive connections: {} requested, {} opened; server RSS {} MB before, {} MB after",
        i.requested,
        i.opened,
        opt(i.server_rss_mb_before, 1),
        opt(i.server_rss_mb_after, 1)
    );
    if let Some(e) = &i.first_error {
        let _ = write!(out, "; first failure: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn report() -> ScenarioReport {
        let mut stats = LaneStats::new().unwrap();
        for _ in 0..100 {
            stats.record_ok(Duration::from_micros(250));
        }
        stats.record_status(503, || "HTTP 503 HsmBusy".into());
        let mut raw = LaneStats::new().unwrap();
        for _ in 0..400 {
            raw.record_ok(Duration::from_micros(30));
        }
        let mut r = ScenarioReport {
            scenario: Scenario::DecryptBadTag,
            concurrency: 32,
            connections: 32,
            plaintext_size: 32,
            aad_size: 64,
            alg: None,
            window_s: 1.0,
            proxy: Some(LaneReport::from_stats(&stats, 1.0)),
            server_cpu_us_per_req: Some(55.25),
            server_rss_mb: Some(20.0),
            client_cpu_us_per_req: None,
            server_session_reopens: Some(0),
            raw: Some(RawReport {
                lane: LaneReport::from_stats(&raw, 1.0),
                cpu_us_per_op: Some(9.0),
            }),
            ratio_proxy_raw: None,
            idle: None,
            error: None,
        };
        r.compute_ratio();
        r
    }

    #[test]
    fn ratio_and_json() {
        let r = report();
        assert_eq!(r.ratio_proxy_raw, Some(0.25));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["scenario"], "decrypt-bad-tag");
        assert_eq!(v["proxy"]["rps"], 100.0);
        assert_eq!(v["proxy"]["errors"]["503"], 1);
        assert_eq!(v["proxy"]["latency_ms"]["p50"], 0.25);
        assert_eq!(v["raw"]["rps"], 400.0);
        assert_eq!(v["raw"]["cpu_us_per_op"], 9.0);
        assert!(v["client_cpu_us_per_req"].is_null());
        assert!(v["alg"].is_null());
        assert!(!r.to_json().contains('\n'));
    }

    #[test]
    fn table_rows_line_up_with_the_header() {
        let header = table_header();
        let first = header.lines().next().unwrap();
        let row = table_row(&report());
        let mut lines = row.lines();
        assert_eq!(lines.next().unwrap().chars().count(), first.chars().count());
        assert!(lines.next().unwrap().contains("HTTP 503 HsmBusy"));
        let mut bare = report();
        bare.proxy = None;
        bare.raw = None;
        bare.compute_ratio();
        bare.error = Some("probe request: HTTP 403 AccessDeniedException".into());
        let row = table_row(&bare);
        assert!(row.contains("n/a"));
        assert!(row.contains("not measured: probe request"));
    }
}
