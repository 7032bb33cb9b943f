//! Who and where this process is, for audit records: the host name and the real user id,
//! read from `/proc` (Linux; the proxy's only target). Never fails: an unreadable value is
//! named as unknown rather than stopping a command. Must not depend on the HSM, HTTP or config.

/// The host name (`/proc/sys/kernel/hostname`), or `unknown-host`.
pub fn name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The real user id (`Uid:` in `/proc/self/status`), or `unknown`.
pub fn uid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn name_and_uid_come_from_proc() {
        let expected = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        assert_eq!(super::name(), expected.trim());
        let uid = super::uid();
        assert!(uid.parse::<u32>().is_ok(), "uid {uid:?}");
    }
}
