//! `ekm-proxy bench`: the benchmark (DESIGN.md §8, issue 3).
//!
//! Drives a running proxy over HTTPS (or HTTP) with keep-alive connections and properly signed XKS
//! requests, Cloud EKM requests with RS256 bearer tokens, or Azure Managed HSM key wrapping over
//! mutual TLS (on its own listener, `--azure-url`), and in the same run measures the **raw HSM
//! lane**: the same AES-GCM or key-wrapping operation through [`crate::hsm::Pkcs11Backend`] with
//! no HTTP. Per scenario × concurrency it reports throughput,
//! latency percentiles, errors by status, the server's CPU µs per request and RSS (from `/proc`),
//! and the ratio proxy/raw, which is the only form in which performance is claimed.
//!
//! - [`options`]: the command line and the validated [`BenchOptions`].
//! - `load`: the HTTP lane (signing at send time, a fresh `kmsRequestId` per request; Cloud EKM
//!   with one cached token or a token minted per request; Azure with a fresh `request_id`).
//! - `raw`: the raw HSM lane.
//! - [`stats`]: per-worker HDR histograms and error counts, merged at the end.
//! - [`procstat`]: CPU time and RSS of a process from `/proc`.
//! - [`report`]: [`ScenarioReport`], the table and JSON lines.
//! - `spawn`: `--spawn`, the dev-profile server as a child process.
//!
//! The lanes never run at the same time: the load generator and the server share the machine, and
//! each lane should have it to itself. The benchmark sees the server only through the wire (via
//! [`crate::client`]) and `/proc`; it is a leaf module that nothing else depends on.

mod load;
pub mod options;
pub mod procstat;
mod raw;
pub mod report;
mod spawn;
pub mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

pub use options::{
    AzureOptions, BenchArgs, BenchOptions, GcpOptions, RawLane, Scenario, SpawnOptions, Target,
};
pub use report::{IdleReport, LaneReport, RawReport, ScenarioReport};

use load::HttpTarget;
use procstat::ProcWatch;
use raw::RawHsm;
use spawn::SpawnedServer;
use stats::{LaneStats, round3};

/// Why a run could not be made. Per-scenario problems are not errors: they are reported in
/// [`ScenarioReport::error`] and the run goes on.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad options or unreadable files named by them.
    #[error("bench options: {0}")]
    Options(String),
    /// The server could not be reached.
    #[error("cannot reach the server: {0}")]
    Connect(String),
    /// The spawned server failed.
    #[error("spawned server: {0}")]
    Spawn(String),
    /// The raw lane's HSM backend could not start.
    #[error("raw HSM lane: {0}")]
    Hsm(String),
    /// A bug in the benchmark itself.
    #[error("internal: {0}")]
    Internal(String),
}

/// The measured window of a lane: requests answered inside it count.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Start (after the warm-up).
    pub start: Instant,
    /// End.
    pub end: Instant,
}

impl Window {
    /// A window of `duration` beginning `warmup` from now.
    pub fn after(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now() + warmup;
        Self {
            start,
            end: start + duration,
        }
    }

    /// Whether `t` is inside.
    pub fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    /// Length in seconds.
    pub fn seconds(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// A lane whose workers run until its window ends.
pub(crate) struct RunningLane {
    /// The measured window.
    pub window: Window,
    workers: JoinSet<LaneStats>,
}

impl RunningLane {
    /// Wait for every worker (each stops at the window's end, after at most one request
    /// deadline) and merge their stats.
    pub async fn finish(mut self) -> Result<LaneStats, BenchError> {
        let mut total = LaneStats::new()?;
        while let Some(joined) = self.workers.join_next().await {
            match joined {
                Ok(stats) => total.merge(stats),
                Err(e) => return Err(BenchError::Internal(format!("load worker failed: {e}"))),
            }
        }
        Ok(total)
    }
}

/// CPU consumed by the watched processes over a window, and the server's RSS at its end.
#[derive(Default)]
struct WindowSample {
    server_cpu: Option<Duration>,
    own_cpu: Option<Duration>,
    server_rss: Option<u64>,
}

/// Sleep to the window's start, read CPU clocks, sleep to its end, read again. Runs on the
/// controlling task while the workers run.
async fn sample_window(
    window: Window,
    server: Option<&ProcWatch>,
    own: Option<&ProcWatch>,
) -> WindowSample {
    let cpu = |w: Option<&ProcWatch>| w.and_then(|w| w.cpu_time().ok());
    tokio::time::sleep_until(window.start.into()).await;
    let (server0, own0) = (cpu(server), cpu(own));
    tokio::time::sleep_until(window.end.into()).await;
    let (server1, own1) = (cpu(server), cpu(own));
    WindowSample {
        server_cpu: server0.zip(server1).map(|(a, b)| b.saturating_sub(a)),
        own_cpu: own0.zip(own1).map(|(a, b)| b.saturating_sub(a)),
        server_rss: server.and_then(|w| w.rss_bytes().ok()),
    }
}

fn per_request_us(cpu: Option<Duration>, requests: u64) -> Option<f64> {
    let cpu = cpu?;
    (requests > 0).then(|| (cpu.as_secs_f64() * 1e6 / requests as f64 * 10.0).round() / 10.0)
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

/// Run every scenario × concurrency of `opts` and return the reports.
pub async fn run(opts: BenchOptions) -> Result<Vec<ScenarioReport>, BenchError> {
    run_with(opts, |_| {}).await
}

/// [`run`], calling `on_report` as each report is ready (the CLI prints rows as they come).
pub async fn run_with(
    opts: BenchOptions,
    mut on_report: impl FnMut(&ScenarioReport),
) -> Result<Vec<ScenarioReport>, BenchError> {
    let addr = resolve(&opts.target, opts.allow_remote).await?;

    // The server first: with --spawn, `dev init` may create the CA file the client needs.
    let mut server = None;
    if let Some(sp) = &opts.spawn {
        let conf = spawn::softhsm_conf_for_child(sp)?;
        let needs = spawn::Needs {
            gcp: opts.scenarios.iter().any(|s| s.is_gcp()),
            azure: opts.scenarios.iter().any(|s| s.is_azure()),
        };
        spawn::ensure_dev_profile(sp, conf.as_deref(), needs)?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Err(BenchError::Spawn(format!(
                "something already listens on {addr}; stop it, or drop --spawn to benchmark it"
            )));
        }
        server = Some(SpawnedServer::start(sp, conf.as_deref())?);
    }
    let target = Arc::new(HttpTarget::new(&opts, addr)?);
    if let (Some(s), Some(sp)) = (server.as_mut(), &opts.spawn) {
        eprintln!(
            "bench: started the server (pid {}); waiting for GET /ping",
            s.pid().unwrap_or(0)
        );
        s.wait_ready(&target, sp.ready_timeout).await?;
    } else {
        target
            .connect()
            .await
            .map_err(|e| BenchError::Connect(format!("{addr}: {e}")))?;
    }

    // After the server is up: with --spawn, `dev init` may have just written the dev client
    // certificate the Azure target presents.
    let azure = if opts.scenarios.iter().any(|s| s.is_azure()) {
        Some(azure_target(&opts).await?)
    } else {
        None
    };

    let raw = start_raw_lane(&opts).await;
    let result = match raw {
        Ok(raw) => {
            let targets = Targets {
                main: &target,
                azure: azure.as_ref(),
            };
            let r = measure_all(
                &opts,
                &targets,
                server.as_mut(),
                raw.as_ref(),
                &mut on_report,
            )
            .await;
            if let Some(raw) = raw {
                raw.shutdown().await;
            }
            r
        }
        Err(e) => Err(e),
    };
    if let Some(s) = server {
        s.stop().await;
    }
    result
}

/// The HTTP lane's targets: `--url`, and `--azure-url` when an Azure scenario is selected.
struct Targets<'a> {
    main: &'a Arc<HttpTarget>,
    /// The Azure target, or why there is none: reported by the Azure scenarios only, as a missing
    /// token signer is by the Cloud EKM ones, so a default run against a server without an Azure
    /// listener still measures everything else.
    azure: Option<&'a Result<Arc<HttpTarget>, String>>,
}

impl Targets<'_> {
    /// The target `scenario` is sent to.
    fn of(&self, scenario: Scenario) -> Result<&Arc<HttpTarget>, String> {
        if !scenario.is_azure() {
            return Ok(self.main);
        }
        match self.azure {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(e.clone()),
            None => Err("internal: no Azure target was prepared".to_owned()),
        }
    }
}

/// The Azure target, or why it cannot be used (unresolvable host, unreadable client certificate)
/// as the Azure scenarios' error. A non-loopback `--azure-url` without `--allow-remote` is an
/// options error, as it is for `--url`.
async fn azure_target(opts: &BenchOptions) -> Result<Result<Arc<HttpTarget>, String>, BenchError> {
    let az = &opts.azure;
    let addr = match resolve(&az.target, opts.allow_remote).await {
        Ok(addr) => addr,
        Err(e @ BenchError::Options(_)) => return Err(e),
        Err(e) => return Ok(Err(e.to_string())),
    };
    Ok(HttpTarget::azure(opts, addr)
        .map(Arc::new)
        .map_err(|e| format!("{e} (--client-cert/--client-key)")))
}

/// The raw lane's backend, if any scenario has one and it is not switched off.
async fn start_raw_lane(opts: &BenchOptions) -> Result<Option<RawHsm>, BenchError> {
    if !opts.scenarios.iter().any(|s| s.has_raw_lane()) {
        return Ok(None);
    }
    let settings = match &opts.raw {
        RawLane::Off => return Ok(None),
        RawLane::Settings(s) => (**s).clone(),
        RawLane::Config(path) => {
            crate::config::load(path)
                .map_err(|e| BenchError::Hsm(e.to_string()))?
                .hsm
        }
    };
    if std::env::var_os("SOFTHSM2_CONF").is_none()
        && settings.module.to_string_lossy().contains("softhsm")
    {
        eprintln!(
            "bench: SOFTHSM2_CONF is not set; the raw lane uses SoftHSM's default token directory"
        );
    }
    RawHsm::start(settings).await.map(Some)
}

async fn measure_all(
    opts: &BenchOptions,
    targets: &Targets<'_>,
    mut server: Option<&mut SpawnedServer>,
    raw: Option<&RawHsm>,
    on_report: &mut impl FnMut(&ScenarioReport),
) -> Result<Vec<ScenarioReport>, BenchError> {
    let server_pid = server.as_ref().and_then(|s| s.pid()).or(opts.server_pid);
    let server_watch = match server_pid {
        Some(pid) => Some(ProcWatch::new(pid).map_err(|e| {
            BenchError::Options(format!("server pid {pid}: /proc unreadable: {e}"))
        })?),
        None => None,
    };
    let own_watch = ProcWatch::new(std::process::id()).ok();

    // Idle connections are opened once and held until the end, so every scenario runs with them.
    let (idle_clients, mut idle) = if opts.idle_connections > 0 {
        let before = server_watch.as_ref().and_then(|w| w.rss_bytes().ok());
        let (clients, failed) = load::open_connections(targets.main, opts.idle_connections).await;
        // Let the server finish setting the connections up before reading its memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = server_watch.as_ref().and_then(|w| w.rss_bytes().ok());
        let report = IdleReport {
            requested: opts.idle_connections,
            opened: clients.len(),
            still_open: clients.len(),
            server_rss_mb_before: before.map(mb),
            server_rss_mb_after: after.map(mb),
            first_error: failed.first().map(ToString::to_string),
        };
        eprintln!("bench: {}", report::idle_line(&report));
        (clients, Some(report))
    } else {
        (Vec::new(), None)
    };

    let mut reports = Vec::new();
    let mut nonce: u16 = 0;
    for &scenario in &opts.scenarios {
        // The Azure listener is a second address: when it cannot be reached, say which one and
        // which option names it (a refused probe is the server's answer and says enough).
        let unreachable = |e: String| {
            if scenario.is_azure() {
                format!("Azure target {} (--azure-url): {e}", opts.azure.url)
            } else {
                e
            }
        };
        // One connection to prepare the scenario (pre-encrypt, probe): a failure here is one
        // clear line instead of a table of errors.
        let prepared = match targets.of(scenario) {
            Ok(target) => match target.connect().await {
                Ok(mut c) => target
                    .operation(&mut c, scenario, opts)
                    .await
                    .map(|op| (target, Arc::new(op))),
                Err(e) => Err(unreachable(format!("connect: {e}"))),
            },
            Err(e) => Err(unreachable(e)),
        };
        // Azure wraps a fixed-size key with no AAD; the rows say what was sent.
        let (plaintext_size, aad_size) = if scenario.is_azure() {
            (load::AZURE_DEK_LEN, 0)
        } else {
            (opts.plaintext_size, opts.aad_size)
        };
        let raw_op = match raw {
            Some(raw) => raw
                .operation(scenario, opts)
                .await
                .map(|op| op.map(Arc::new)),
            None => Ok(None),
        };
        for &concurrency in &opts.concurrency {
            nonce = nonce.wrapping_add(1);
            let connections = opts.connections.unwrap_or(concurrency);
            let mut report = ScenarioReport {
                scenario,
                concurrency,
                connections,
                plaintext_size,
                aad_size,
                alg: scenario.is_azure().then(|| opts.azure.alg.name()),
                window_s: opts.duration.as_secs_f64(),
                proxy: None,
                server_cpu_us_per_req: None,
                server_rss_mb: None,
                client_cpu_us_per_req: None,
                server_session_reopens: None,
                raw: None,
                ratio_proxy_raw: None,
                idle: None,
                error: None,
            };
            let mut errors = Vec::new();
            match &prepared {
                Ok((target, op)) => {
                    let reopens_before = admin_counter(opts.admin, SESSION_REOPENS).await;
                    let lane = load::start_lane(
                        target,
                        Arc::clone(op),
                        concurrency,
                        connections,
                        opts.request_timeout,
                        nonce,
                        opts.warmup,
                        opts.duration,
                    )
                    .await;
                    match lane {
                        Ok(lane) => {
                            let window = lane.window;
                            let sample =
                                sample_window(window, server_watch.as_ref(), own_watch.as_ref())
                                    .await;
                            let stats = lane.finish().await?;
                            let answered = stats.accepted() + stats.error_total();
                            let lane = LaneReport::from_stats(&stats, window.seconds());
                            report.server_cpu_us_per_req =
                                per_request_us(sample.server_cpu, answered);
                            report.client_cpu_us_per_req = per_request_us(sample.own_cpu, answered);
                            report.server_rss_mb = sample.server_rss.map(mb);
                            report.window_s = round3(window.seconds());
                            report.proxy = Some(lane);
                            let reopens_after = admin_counter(opts.admin, SESSION_REOPENS).await;
                            report.server_session_reopens = reopens_before
                                .zip(reopens_after)
                                .map(|(a, b)| b.saturating_sub(a));
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Err(e) => errors.push(e.clone()),
            }
            match (&raw_op, raw) {
                (Ok(Some(op)), Some(raw)) => {
                    let lane =
                        raw.start_lane(Arc::clone(op), concurrency, opts.warmup, opts.duration)?;
                    let window = lane.window;
                    let sample = sample_window(window, None, own_watch.as_ref()).await;
                    let stats = lane.finish().await?;
                    report.raw = Some(RawReport {
                        lane: LaneReport::from_stats(&stats, window.seconds()),
                        cpu_us_per_op: per_request_us(
                            sample.own_cpu,
                            stats.accepted() + stats.error_total(),
                        ),
                    });
                }
                (Err(e), _) => errors.push(format!("raw lane: {e}")),
                _ => {}
            }
            report.compute_ratio();
            if !errors.is_empty() {
                report.error = Some(errors.join("; "));
            }
            if let Some(i) = idle.as_mut() {
                i.still_open = idle_clients.iter().filter(|c| !c.is_closed()).count();
                report.idle = Some(i.clone());
            }
            on_report(&report);
            reports.push(report);
            // A spawned server that died makes every later number meaningless: stop here.
            if let Some(s) = server.as_mut() {
                s.check_alive()?;
            }
        }
    }
    drop(idle_clients);
    Ok(reports)
}

/// The server's counter of HSM session reopens: a bad-tag stream must not churn sessions.
const SESSION_REOPENS: &str = "ekm_hsm_session_reopens_total";

/// Read a counter (summed over its label sets) from the admin listener's `GET /metrics`; `None`
/// when there is no admin address or it does not answer. Two short requests per run, outside the
/// window's hot path.
async fn admin_counter(admin: Option<SocketAddr>, name: &str) -> Option<u64> {
    let addr = admin?;
    let mut client = crate::client::Connector::new(addr, None)
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut req = http::Request::new(http_body_util::Full::new(bytes::Bytes::new()));
    *req.uri_mut() = http::Uri::from_static("/metrics");
    req.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_str(&addr.to_string()).ok()?,
    );
    let resp = tokio::time::timeout(Duration::from_secs(2), client.send_raw(req))
        .await
        .ok()?
        .ok()?;
    (resp.status == 200).then(|| parse_counter(&String::from_utf8_lossy(&resp.body), name))?
}

/// Sum of the samples of `name` in Prometheus text; `None` if there are none.
fn parse_counter(text: &str, name: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *total.get_or_insert(0) += v as u64;
        }
    }
    total
}

/// The target's address: IPv4 preferred (the dev listeners bind 127.0.0.1, while `localhost` may
/// resolve to `::1` first); loopback only unless `allow_remote`.
async fn resolve(target: &Target, allow_remote: bool) -> Result<SocketAddr, BenchError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| BenchError::Connect(format!("cannot resolve {}: {e}", target.host)))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| BenchError::Connect(format!("{} resolves to no address", target.host)))?;
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(BenchError::Options(format!(
            "{} ({addr}) is not a loopback address; pass --allow-remote to benchmark a remote server",
            target.host
        )));
    }
    Ok(addr)
}

/// `ekm-proxy bench`: parse, run, print. Returns the process exit code (0, 1 on failure, 64 on
/// bad options, 130 on ctrl-c).
pub fn main(args: BenchArgs) -> i32 {
    crate::logging::init_cli("warn");
    let opts = match BenchOptions::from_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return crate::config::EXIT_CONFIG;
        }
    };
    if let Some(code) = reexec_with_softhsm_conf(&args) {
        return code;
    }
    // The load generator shares the CPU with the server: by default one thread drives every
    // connection (a current-thread runtime); HSM calls of the raw lane run on the backend's own
    // worker threads either way.
    let runtime = if args.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.client_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    eprintln!(
        "bench: {} scenario(s) × concurrency {:?}, {:?} warm-up + {:?} window each, plaintext {} B, AAD {} B",
        opts.scenarios.len(),
        opts.concurrency,
        opts.warmup,
        opts.duration,
        opts.plaintext_size,
        opts.aad_size
    );
    if opts.scenarios.iter().any(|s| s.is_azure()) {
        eprintln!(
            "bench: Azure scenarios: {} with key {} at {}, {}-byte key, client certificate {}",
            opts.azure.alg,
            opts.azure.key,
            opts.azure.url,
            load::AZURE_DEK_LEN,
            opts.azure.client_identity.0.display()
        );
    }
    let json = args.json;
    let mut header_done = false;
    let print = move |r: &ScenarioReport| {
        if json {
            println!("{}", r.to_json());
        } else {
            if !header_done {
                println!("{}", report::table_header());
                header_done = true;
            }
            println!("{}", report::table_row(r));
        }
    };
    runtime.block_on(async move {
        tokio::select! {
            result = run_with(opts, print) => match result {
                Ok(reports) => i32::from(reports.iter().any(|r| r.error.is_some())),
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            },
            // Dropping the run kills a spawned server (SpawnedServer's Drop).
            _ = tokio::signal::ctrl_c() => {
                eprintln!("bench: interrupted");
                130
            }
        }
    })
}

/// The raw lane loads SoftHSM in this process, which reads `SOFTHSM2_CONF` from the environment;
/// the crate may not set environment variables (no `unsafe`, and house rules), so when it is unset
/// and the dev SoftHSM configuration is to be used, run this same command again as a child with
/// it set. Returns the child's exit code, or `None` to carry on in this process.
fn reexec_with_softhsm_conf(args: &BenchArgs) -> Option<i32> {
    if std::env::var_os("SOFTHSM2_CONF").is_some() || (args.no_raw && !args.spawn) {
        return None;
    }
    let conf = if args.spawn {
        match spawn::ensure_softhsm_conf(&args.softhsm_conf) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return Some(1);
            }
        }
    } else if args.softhsm_conf.is_file() {
        std::path::absolute(&args.softhsm_conf).ok()?
    } else {
        return None;
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("cannot find the ekm-proxy executable: {e}");
            return Some(1);
        }
    };
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .status();
    match status {
        Ok(s) => Some(s.code().unwrap_or(130)),
        Err(e) => {
            eprintln!("cannot re-run with SOFTHSM2_CONF={}: {e}", conf.display());
            Some(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        let w = Window::after(Duration::from_millis(10), Duration::from_millis(20));
        assert!(!w.contains(Instant::now()));
        assert!(w.contains(w.start));
        assert!(!w.contains(w.end));
        assert!((w.seconds() - 0.02).abs() < 1e-9);
    }

    #[test]
    fn per_request_figures() {
        assert_eq!(
            per_request_us(Some(Duration::from_millis(50)), 1000),
            Some(50.0)
        );
        assert_eq!(per_request_us(Some(Duration::from_millis(50)), 0), None);
        assert_eq!(per_request_us(None, 10), None);
        assert_eq!(mb(3 * 1024 * 1024 / 2), 1.5);
    }

    #[test]
    fn prometheus_counters() {
        let text = "# HELP ekm_hsm_session_reopens_total x\n# TYPE ekm_hsm_session_reopens_total counter\n\
                    ekm_hsm_session_reopens_total 3\nekm_hsm_session_reopens_total_other 9\n\
                    ekm_requests_total{op=\"a\"} 2\nekm_requests_total{op=\"b\"} 5\n";
        assert_eq!(parse_counter(text, SESSION_REOPENS), Some(3));
        assert_eq!(parse_counter(text, "ekm_requests_total"), Some(7));
        assert_eq!(parse_counter(text, "absent_total"), None);
    }

    #[tokio::test]
    async fn loopback_only_by_default() {
        let t = Target::parse("https://127.0.0.1:1/x").unwrap();
        assert_eq!(resolve(&t, false).await.unwrap().port(), 1);
        let t = Target::parse("https://192.0.2.1:443/x").unwrap();
        assert!(matches!(
            resolve(&t, false).await,
            Err(BenchError::Options(_))
        ));
        assert!(resolve(&t, true).await.is_ok());
    }
}
