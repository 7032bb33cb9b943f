//! The operational log on stderr (text or JSON). The writer is non-blocking so a slow terminal
//! never stalls request handling. With `logging.audit_file`, audit events go to the chained file
//! (`audit::sink`, opened by `app`) and are kept out of this log; without it they are part of it.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{EnvFilter, FilterFn};
use tracing_subscriber::prelude::*;

use crate::audit;
use crate::config::{LogFormat, LoggingSettings};

/// Keeps the background writers alive; drop it last (it flushes).
pub struct LogGuard {
    _guards: Vec<WorkerGuard>,
}

/// Install the global subscriber (once per process; later calls are ignored).
pub fn init(settings: &LoggingSettings) -> std::io::Result<LogGuard> {
    let mut guards = Vec::new();
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // The writer thread drains every pending line into the buffer and flushes once per batch:
    // one write(2) per burst instead of one per line (this halves logging's cost under load).
    let (stderr, guard) =
        tracing_appender::non_blocking(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    guards.push(guard);
    // Audit events reach tracing only when there is no audit file; keep them out regardless.
    let audit_elsewhere = settings.audit_file.is_some();
    let not_audit = FilterFn::new(move |meta| !(audit_elsewhere && meta.target() == audit::TARGET));
    let ops = match settings.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(stderr)
            .with_filter(not_audit)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(stderr)
            .with_filter(not_audit)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(ops)
        .try_init();
    Ok(LogGuard { _guards: guards })
}

/// A minimal stderr subscriber for commands that run before (or without) a configuration.
pub fn init_cli(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
