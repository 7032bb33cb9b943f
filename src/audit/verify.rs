//! `ekm-proxy audit verify`: checks an audit chain across its files (oldest first) and reports
//! the first break by file and line.
//!
//! What is checked, line by line: the line is a chain line; its `seq` follows the previous one
//! (a removed or reordered line shows as a jump); its `prev` is the hash of the previous line (an
//! edited, inserted or reordered line breaks the link of the line after it); each checkpoint's
//! `head` is the hash of the line it covers and, when a MAC checker is given (the HSM), its MAC
//! verifies; and at the end every line is covered by a verified checkpoint (a line appended after
//! the last checkpoint is reported, except with `live` for a file still being written).
//!
//! Without a MAC checker the chain is still checked, but a chain recomputed from scratch by
//! someone without the HSM key would pass: the report says so. Streaming, bounded memory (the
//! lines since the last checkpoint). Must not depend on the HSM, HTTP or front ends.

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

use super::chain::{self, GENESIS, kind};

/// The longest line read (longer ones are breaks, not allocations).
const MAX_LINE: usize = 1024 * 1024;

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// The first place the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// Where.
    pub at: Position,
    /// What is wrong there.
    pub reason: String,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.reason)
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Checkpoints seen.
    pub checkpoints: u64,
    /// Checkpoints whose MAC the HSM confirmed.
    pub verified_macs: u64,
    /// First and last sequence numbers.
    pub seq_range: Option<(u64, u64)>,
    /// The first break, if any.
    pub broken: Option<Break>,
    /// Things an auditor should know that are not breaks.
    pub notes: Vec<String>,
}

impl Report {
    /// Whether the chain holds.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}

/// Why verification could not be carried out (not a finding about the chain).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HSM could not compute a checkpoint's MAC.
    #[error("{at}: cannot check the checkpoint's MAC: {message}")]
    Mac {
        /// The checkpoint.
        at: Position,
        /// Why.
        message: String,
    },
}

/// Computes `HMAC-SHA-256(key label, message)` in the HSM.
pub type MacCheck<'a> = dyn FnMut(&str, &[u8]) -> Result<[u8; 32], String> + 'a;

/// Verification options.
pub struct Options<'a> {
    /// Checks checkpoint MACs; `None` checks the chain only.
    pub mac: Option<&'a mut MacCheck<'a>>,
    /// The last file is still being written: lines after its last checkpoint are a note, not a
    /// break.
    pub live: bool,
}

struct Pending {
    seq: u64,
    hash: [u8; 32],
    at: Position,
}

/// Verify `files` as one chain, oldest first.
pub fn verify(files: &[PathBuf], mut options: Options<'_>) -> Result<Report, VerifyError> {
    let mut report = Report::default();
    let mut last: Option<(u64, [u8; 32])> = None;
    let mut uncovered: VecDeque<Pending> = VecDeque::new();
    let mut last_covered: Option<(u64, [u8; 32])> = None;
    for file in files {
        let reader = std::fs::File::open(file).map_err(|source| VerifyError::Io {
            file: file.clone(),
            source,
        })?;
        let mut reader = std::io::BufReader::new(reader);
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|source| VerifyError::Io {
                    file: file.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            report.lines += 1;
            let at = Position {
                file: file.clone(),
                line: line_no,
            };
            let broken = |reason: String| Break {
                at: at.clone(),
                reason,
            };
            if buf.last() != Some(&b'\n') {
                let reason = if buf.len() > MAX_LINE {
                    "line longer than 1 MiB: not a chain line"
                } else {
                    "the file ends in a partial line (a write was cut short)"
                };
                report.broken = Some(broken(reason.into()));
                return Ok(report);
            }
            let line = &buf[..buf.len() - 1];
            let header: chain::Header = match serde_json::from_slice(line) {
                Ok(h) => h,
                Err(_) => {
                    report.broken = Some(broken("not a chain line (no seq, prev and type)".into()));
                    return Ok(report);
                }
            };
            let Some(prev) = chain::parse_hash(&header.prev) else {
                report.broken = Some(broken("prev is not a SHA-256 in hex".into()));
                return Ok(report);
            };
            match last {
                None if header.seq == 0 && prev != GENESIS => {
                    report.broken = Some(broken(
                        "the first line of a chain must have prev 0…0".into(),
                    ));
                    return Ok(report);
                }
                None if header.seq != 0 => report.notes.push(format!(
                    "the chain starts at seq {} in {at}: earlier files were not given",
                    header.seq
                )),
                None => {}
                Some((seq, _)) if header.seq != seq + 1 => {
                    let reason = if header.seq == 0 {
                        format!(
                            "a new chain starts here (after seq {seq}): the file before it was replaced or the chain restarted"
                        )
                    } else if header.seq > seq + 1 {
                        format!(
                            "seq jumps from {seq} to {}: {} line(s) removed before this one",
                            header.seq,
                            header.seq - seq - 1
                        )
                    } else {
                        format!(
                            "seq {} after {seq}: lines reordered or repeated",
                            header.seq
                        )
                    };
                    report.broken = Some(broken(reason));
                    return Ok(report);
                }
                Some((_, hash)) if prev != hash => {
                    report.broken = Some(broken(
                        "prev is not the hash of the line before: that line was altered, or a line was inserted or removed here"
                            .into(),
                    ));
                    return Ok(report);
                }
                Some(_) => {}
            }
            let hash = chain::line_hash(line);
            report.seq_range = Some((
                report.seq_range.map_or(header.seq, |(first, _)| first),
                header.seq,
            ));
            last = Some((header.seq, hash));
            if header.kind != kind::CHECKPOINT {
                uncovered.push_back(Pending {
                    seq: header.seq,
                    hash,
                    at,
                });
                continue;
            }
            report.checkpoints += 1;
            let (Some(covers), Some(head), Some(mac), Some(key)) = (
                header.covers,
                header.head.as_deref().and_then(chain::parse_hash),
                header.mac.as_deref().and_then(chain::parse_hash),
                header.key.as_deref(),
            ) else {
                report.broken = Some(broken(
                    "checkpoint without covers, head, key and mac".into(),
                ));
                return Ok(report);
            };
            let known = uncovered
                .iter()
                .find(|p| p.seq == covers)
                .map(|p| p.hash)
                .or_else(|| last_covered.filter(|(s, _)| *s == covers).map(|(_, h)| h));
            match known {
                None => {
                    report.broken = Some(broken(format!(
                        "the checkpoint covers seq {covers}, which is not a line since the previous checkpoint"
                    )));
                    return Ok(report);
                }
                Some(h) if h != head => {
                    report.broken = Some(broken(format!(
                        "the checkpoint's head is not the hash of seq {covers}: a line up to it was altered"
                    )));
                    return Ok(report);
                }
                Some(_) => {}
            }
            if let Some(check) = options.mac.as_deref_mut() {
                let msg = chain::checkpoint_message(covers, &head, &header.ts);
                let expected = check(key, &msg).map_err(|message| VerifyError::Mac {
                    at: at.clone(),
                    message,
                })?;
                if !bool::from(expected.ct_eq(&mac)) {
                    report.broken = Some(broken(format!(
                        "the checkpoint's MAC does not verify with the HSM key '{key}': the chain was rewritten by someone without the key"
                    )));
                    return Ok(report);
                }
                report.verified_macs += 1;
            }
            uncovered.retain(|p| p.seq > covers);
            last_covered = Some((covers, head));
        }
    }
    if let Some(first) = uncovered.front() {
        let msg = format!(
            "{} line(s) from {} on are not covered by a checkpoint (appended after the last one, or the writer stopped without one)",
            uncovered.len(),
            first.at
        );
        if options.live {
            report.notes.push(msg);
        } else {
            report.broken = Some(Break {
                at: first.at.clone(),
                reason: "not covered by any checkpoint: appended after the last checkpoint, or the writer stopped without one (use --live for a file still being written)".into(),
            });
            return Ok(report);
        }
    }
    if options.mac.is_none() && report.checkpoints > 0 {
        report.notes.push(
            "checkpoint MACs were not checked (give --config to check them in the HSM): a chain recomputed without the HSM key would pass"
                .into(),
        );
    }
    Ok(report)
}

/// The files of `path`'s chain, oldest first: rotated files (`<stem>.<time>.<ext>` beside it)
/// then `path` itself.
pub fn chain_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.strip_prefix(&format!("{stem}.")).is_some_and(|rest| {
                    rest.len() > 16
                        && rest.as_bytes()[8] == b'T'
                        && (rest.ends_with(&ext) || rest.contains(&format!("{ext}.")))
                })
            })
        })
        .collect();
    rotated.sort();
    rotated.push(path.to_path_buf());
    Ok(rotated)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `n` decision lines with a checkpoint (MAC = SHA-256 of the message, standing in
    /// for the HSM) after every `every` lines.
    fn build(n: u64, every: u64) -> Vec<String> {
        let mut lines = Vec::new();
        let mut prev = GENESIS;
        let mut seq = 0;
        let mut push = |body: String, lines: &mut Vec<String>| {
            let line = chain::compose(seq, &prev, &body);
            prev = chain::line_hash(line.as_bytes());
            lines.push(line);
            seq += 1;
            (seq - 1, prev)
        };
        for i in 0..n {
            let (s, h) = push(
                format!(r#"{{"ts":"t","type":"decision","n":{i}}}"#),
                &mut lines,
            );
            if (i + 1) % every == 0 || i + 1 == n {
                let mac = fake_mac(&chain::checkpoint_message(s, &h, "t"));
                let body = format!(
                    r#"{{"ts":"t","type":"checkpoint","covers":{s},"head":"{}","key":"k","mac":"{}"}}"#,
                    hex::encode(h),
                    hex::encode(mac)
                );
                push(body, &mut lines);
            }
        }
        lines
    }

    fn fake_mac(msg: &[u8]) -> [u8; 32] {
        chain::line_hash(&[b"key".as_slice(), msg].concat())
    }

    fn run(lines: &[String], with_mac: bool) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(
            &path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let mut check = |_: &str, msg: &[u8]| Ok(fake_mac(msg));
        let options = Options {
            mac: if with_mac { Some(&mut check) } else { None },
            live: false,
        };
        verify(&[path], options).unwrap()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let lines = build(10, 3);
        let r = run(&lines, true);
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.lines, r.checkpoints, r.verified_macs), (14, 4, 4));
        let r = run(&lines, false);
        assert!(r.ok());
        assert!(r.notes.iter().any(|n| n.contains("not checked")));
    }

    #[test]
    fn each_kind_of_tampering_is_found_at_its_line() {
        let lines = build(10, 3);
        // Removed line 3 (seq 2): line 3 of the copy (seq 3) jumps.
        let mut removed = lines.clone();
        removed.remove(2);
        let b = run(&removed, true).broken.unwrap();
        assert_eq!(b.at.line, 3);
        assert!(b.reason.contains("jumps from 1 to 3"), "{b}");
        // Edited line 2: line 3 no longer links.
        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"n\":1", "\"n\":9");
        let b = run(&edited, true).broken.unwrap();
        assert_eq!(b.at.line, 3);
        assert!(b.reason.contains("altered"), "{b}");
        // Swapped lines 2 and 3.
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        let b = run(&swapped, true).broken.unwrap();
        assert_eq!(b.at.line, 2);
        // A forged line appended after the last checkpoint.
        let mut appended = lines.clone();
        let last = appended.last().unwrap().clone();
        let h: chain::Header = serde_json::from_str(&last).unwrap();
        appended.push(chain::compose(
            h.seq + 1,
            &chain::line_hash(last.as_bytes()),
            r#"{"ts":"t","type":"decision","n":99}"#,
        ));
        let b = run(&appended, true).broken.unwrap();
        assert_eq!(b.at.line, lines.len() as u64 + 1);
        assert!(b.reason.contains("not covered"), "{b}");
    }

    #[test]
    fn a_chain_recomputed_without_the_key_fails_only_with_the_mac_check() {
        let lines = build(6, 3);
        // Rewrite line 2 and recompute every hash, head and (with a wrong key) MAC.
        let mut forged: Vec<String> = Vec::new();
        let mut prev = GENESIS;
        for (i, l) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut body = v.as_object().unwrap().clone();
            body.remove("seq");
            body.remove("prev");
            if i == 1 {
                body.insert("n".into(), 42.into());
            }
            if body["type"] == "checkpoint" {
                let covers = body["covers"].as_u64().unwrap();
                let head = chain::line_hash(forged[covers as usize].as_bytes());
                body.insert("head".into(), hex::encode(head).into());
                body.insert("mac".into(), hex::encode([0u8; 32]).into());
            }
            let line = chain::compose(
                i as u64,
                &prev,
                &serde_json::Value::Object(body).to_string(),
            );
            prev = chain::line_hash(line.as_bytes());
            forged.push(line);
        }
        assert!(run(&forged, false).ok());
        let b = run(&forged, true).broken.unwrap();
        assert!(b.reason.contains("MAC does not verify"), "{b}");
        assert_eq!(b.at.line, 4);
    }

    #[test]
    fn rotated_files_are_found_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "audit.jsonl",
            "audit.20261201T010203Z.jsonl",
            "audit.20261130T235959Z.jsonl",
            "other.jsonl",
            "audit.notes.jsonl",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let files = chain_files(&dir.path().join("audit.jsonl")).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "audit.20261130T235959Z.jsonl",
                "audit.20261201T010203Z.jsonl",
                "audit.jsonl"
            ]
        );
    }
}
