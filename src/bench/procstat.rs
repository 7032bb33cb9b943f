//! CPU time and resident memory of a process, read from `/proc` (Linux).
//!
//! CPU is `utime + stime` from `/proc/<pid>/stat` (fields 14 and 15, in clock ticks), so a delta
//! over the measured window divided by the requests answered in it is the server's CPU cost per
//! request, user and kernel time together (TLS, syscalls and the HSM library all count). Memory is
//! `VmRSS` from `/proc/<pid>/status`. Depends on std only; the tick length comes from
//! `getconf CLK_TCK` because std has no `sysconf`, and this crate allows no `unsafe`.

use std::time::Duration;

/// Reads one process's CPU time and RSS.
#[derive(Clone, Debug)]
pub struct ProcWatch {
    pid: u32,
    ticks_per_second: u64,
}

impl ProcWatch {
    /// Watch `pid`; fails if the process is not visible in `/proc`.
    pub fn new(pid: u32) -> std::io::Result<Self> {
        let w = Self {
            pid,
            ticks_per_second: clock_ticks_per_second(),
        };
        w.cpu_time()?;
        Ok(w)
    }

    /// The watched pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CPU time (user + system) consumed so far by every thread of the process.
    pub fn cpu_time(&self) -> std::io::Result<Duration> {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let ticks = parse_stat_cpu_ticks(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unreadable /proc/<pid>/stat",
            )
        })?;
        Ok(ticks_to_duration(ticks, self.ticks_per_second))
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> std::io::Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        parse_vmrss_kib(&text).map(|kib| kib * 1024).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no VmRSS in /proc/<pid>/status",
            )
        })
    }
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// `utime + stime` in clock ticks from the text of `/proc/<pid>/stat`.
///
/// The second field (`comm`) is the executable name in parentheses and may itself contain spaces
/// and parentheses, so fields are counted from the *last* `)`.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let after_comm = &text[text.rfind(')')? + 1..];
    // After `comm`: field 3 (state) is the first; utime and stime are fields 14 and 15.
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_vmrss_kib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_ascii_whitespace();
    let value = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

/// `getconf CLK_TCK`, or 100 (the value on every mainstream Linux) if it cannot be run.
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_comm() {
        let text = "4242 (ekm (proxy) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 1234 56 0 0 20 0 9 0 \
                    777 123456789 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(text), Some(1290));
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn vmrss() {
        let text = "Name:\tekm-proxy\nVmPeak:\t  200000 kB\nVmRSS:\t   12345 kB\nThreads:\t9\n";
        assert_eq!(parse_vmrss_kib(text), Some(12345));
        assert_eq!(parse_vmrss_kib("Name:\tx\n"), None);
        assert_eq!(parse_vmrss_kib("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn ticks() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn watches_this_process() {
        let w = ProcWatch::new(std::process::id()).unwrap();
        assert!(w.rss_bytes().unwrap() > 0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(w.cpu_time().unwrap() > Duration::ZERO);
    }
}
