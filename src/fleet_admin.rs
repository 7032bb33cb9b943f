//! The operator commands behind `ekm-proxy keys disable|enable`, `keystore disable|enable`,
//! `killswitch engage|release`, `state show` and `audit verify`: they change or read the fleet
//! state in the HSM (every replica on the token obeys within `security.state_poll_secs`) and
//! check the audit chain, from a validated configuration.
//!
//! Depends on `config`, `core::state`, `hsm` (state objects, the backend for MACs) and `audit`;
//! never on HTTP or front ends.

use std::path::PathBuf;

use crate::audit::verify::{self, Options, Report};
use crate::config::Settings;
use crate::core::Backend;
use crate::core::state::{FleetState, StateRecord, StateTarget, StoreId, describe};
use crate::hsm::Pkcs11Backend;

/// A command's failure, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The command names something the configuration does not have (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The HSM refused or failed (exit 1).
    #[error("HSM: {0}")]
    Hsm(String),
}

impl AdminError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            AdminError::Usage(_) => crate::config::EXIT_CONFIG,
            AdminError::Hsm(_) => 1,
        }
    }
}

/// Who runs this command: `--by`, else `$SUDO_USER` or `$USER` at the host name.
pub fn operator(by: Option<&str>) -> String {
    if let Some(by) = by.filter(|b| !b.trim().is_empty()) {
        return by.trim().to_owned();
    }
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| format!("uid-{}", crate::host::uid()));
    format!("{user}@{}", crate::host::name())
}

/// The key store `name` names in the configuration: an XKS key store name, `gcp` (the Cloud EKM
/// front) or an Azure prefix name; `xks:NAME` / `azure:NAME` when a name is on both.
pub fn resolve_store(settings: &Settings, name: &str) -> Result<StoreId, AdminError> {
    let xks: Vec<&str> = settings
        .xks
        .key_stores
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let azure: Vec<&str> = settings
        .azure
        .iter()
        .flat_map(|a| a.prefixes.iter().map(|p| p.name.as_str()))
        .collect();
    let (front, bare) = match name.split_once(':') {
        Some((f @ ("xks" | "azure"), n)) => (Some(f), n),
        _ => (None, name),
    };
    let in_xks = xks.contains(&bare) && front != Some("azure");
    let in_azure = azure.contains(&bare) && front != Some("xks");
    if name == "gcp" {
        if settings.gcp.is_none() {
            return Err(AdminError::Usage(
                "the configuration has no [gcp] section".into(),
            ));
        }
        return Ok(StoreId::gcp());
    }
    match (in_xks, in_azure) {
        (true, false) => Ok(StoreId::xks(bare)),
        (false, true) => Ok(StoreId::azure(bare)),
        (true, true) => Err(AdminError::Usage(format!(
            "'{bare}' is both an XKS key store and an Azure prefix: say xks:{bare} or azure:{bare}"
        ))),
        (false, false) => {
            let mut known: Vec<String> = xks.iter().map(|n| format!("xks:{n}")).collect();
            if settings.gcp.is_some() {
                known.push("gcp".into());
            }
            known.extend(azure.iter().map(|n| format!("azure:{n}")));
            Err(AdminError::Usage(format!(
                "no key store '{name}' in the configuration; known: {}",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )))
        }
    }
}

/// Disable or engage (`disable`), or enable or release, `target` fleet-wide; returns the line to print.
pub fn set_state(
    settings: &Settings,
    target: &StateTarget,
    disable: bool,
    by: &str,
    reason: &str,
) -> Result<String, AdminError> {
    let hsm = &settings.hsm;
    let record = StateRecord {
        active: disable,
        by: by.to_owned(),
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        reason: reason.to_owned(),
    };
    let report = crate::hsm::state::write(&hsm.module, &hsm.token, &hsm.user_pin, target, &record)
        .map_err(|e| AdminError::Hsm(e.to_string()))?;
    let poll = settings.core.state_poll.as_secs();
    Ok(match (target, disable) {
        (StateTarget::KillSwitch, true) => format!(
            "kill switch ENGAGED fleet-wide by {by}: every replica refuses every key operation within {poll} s"
        ),
        (StateTarget::KillSwitch, false) if !report.was_active => {
            "the fleet kill switch was not engaged".to_owned()
        }
        (StateTarget::KillSwitch, false) => {
            format!("kill switch released by {by}: replicas serve again within {poll} s")
        }
        (t, true) => {
            format!("{t} disabled fleet-wide by {by}: every replica refuses it within {poll} s")
        }
        (t, false) if !report.was_active => format!("{t} was not disabled"),
        (t, false) => format!("{t} enabled by {by}: replicas serve it again within {poll} s"),
    })
}

/// `state show`: every mark on the token.
pub fn show_state(settings: &Settings) -> Result<String, AdminError> {
    let hsm = &settings.hsm;
    let marks = crate::hsm::state::read_all(&hsm.module, &hsm.token, &hsm.user_pin)
        .map_err(|e| AdminError::Hsm(e.to_string()))?;
    let state = FleetState::from_marks(marks);
    let mut out = String::new();
    for mark in state.marks() {
        let what = match &mark.target {
            StateTarget::KillSwitch => "kill switch engaged".to_owned(),
            t => format!("{t} disabled"),
        };
        out.push_str(&describe(&what, &mark.record));
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("nothing disabled fleet-wide; kill switch released\n");
    }
    Ok(out)
}

/// `audit verify`: the files given (oldest first), or the chain of the configured audit file;
/// with a configuration the checkpoints' MACs are checked in its HSM.
pub fn verify_audit(
    files: &[PathBuf],
    settings: Option<&Settings>,
    live: bool,
) -> Result<Report, String> {
    let files = if files.is_empty() {
        let path = settings
            .and_then(|s| s.logging.audit_file.clone())
            .ok_or("give the audit files, or --config with logging.audit_file")?;
        verify::chain_files(&path).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        files.to_vec()
    };
    let Some(settings) = settings else {
        return verify::verify(&files, Options { mac: None, live }).map_err(|e| e.to_string());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let metrics = crate::metrics::Metrics::standalone();
    let mut hsm = settings.hsm.clone();
    // One session is enough to check MACs.
    hsm.workers = 1;
    let backend = Pkcs11Backend::start(hsm, metrics.hsm.clone(), metrics.cache.clone())
        .map_err(|e| format!("HSM: {e}"))?;
    let mut check = |key: &str, msg: &[u8]| {
        rt.block_on(backend.hmac_sha256(key, msg.to_vec()))
            .map_err(|e| e.to_string())
    };
    let result = verify::verify(
        &files,
        Options {
            mac: Some(&mut check),
            live,
        },
    )
    .map_err(|e| e.to_string());
    backend.shutdown();
    result
}

/// The report as printed: `OK …` or `BROKEN at file:line: why`, then the notes.
pub fn render_report(report: &Report) -> String {
    let mut out = match &report.broken {
        None => format!(
            "OK: {} line(s), seq {}, {} checkpoint(s), {} MAC(s) verified in the HSM\n",
            report.lines,
            report
                .seq_range
                .map_or("-".to_owned(), |(a, b)| format!("{a}..{b}")),
            report.checkpoints,
            report.verified_macs
        ),
        Some(b) => format!("BROKEN at {b}\n"),
    };
    for note in &report.notes {
        out.push_str("note: ");
        out.push_str(note);
        out.push('\n');
    }
    out
}
