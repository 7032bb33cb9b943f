//! The audit file writer: appends chained lines (see [`super::chain`]), writes the checkpoint
//! lines the composition root gets MACed in the HSM, and rotates the file by size.
//!
//! One lock orders the chain; each line is one `write(2)` of a complete line (no user-space
//! buffer that could lose lines the chain already counted), so a line the call reports written
//! is in the file. A line that cannot be written does not advance the chain: the file never
//! holds a link to a line it does not hold. Whether a failed write fails the request is the
//! caller's choice (`logging.audit_required`).
//!
//! On start the writer continues the chain of an existing file from its last line and writes a
//! `start` line; a missing or empty file starts a new chain. Must not depend on the HSM, HTTP or
//! front ends (the MAC arrives as bytes).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::chain::{self, GENESIS, kind};
use crate::metrics::AuditMetrics;

/// How much of an existing file's end is read to find its last line.
const TAIL_BYTES: u64 = 1024 * 1024;

/// The audit file's settings (from `[logging]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSettings {
    /// The current file; rotated files sit beside it.
    pub path: PathBuf,
    /// Rotate after the file grows past this many bytes (0: never).
    pub max_bytes: u64,
}

/// Where the chain stands: the next line's number and the previous line's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last line written.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

struct Inner {
    file: File,
    next_seq: u64,
    prev: [u8; 32],
    /// The last line written, if any.
    head: Option<Head>,
    /// Whether the last line written is a checkpoint (then nothing needs covering).
    covered: bool,
    bytes: u64,
}

/// The chained audit file.
pub struct ChainSink {
    settings: ChainSettings,
    /// Only a regular file is rotated (never rename `/dev/null` or a FIFO).
    regular: bool,
    inner: Mutex<Inner>,
    metrics: AuditMetrics,
}

impl std::fmt::Debug for ChainSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSink")
            .field("path", &self.settings.path)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct StartLine<'a> {
    ts: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    instance: &'a str,
    version: &'a str,
    /// `new chain` or `continued`.
    chain: &'a str,
}

#[derive(Serialize)]
struct CheckpointLine<'a> {
    ts: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    covers: u64,
    head: String,
    key: &'a str,
    mac: String,
}

#[derive(Serialize)]
struct RotateLine<'a> {
    ts: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    previous_file: &'a str,
    instance: &'a str,
}

impl ChainSink {
    /// Open (or create) the file, continue its chain, and write a `start` line naming
    /// `instance`. Fails only when the file cannot be opened or read.
    pub fn open(
        settings: ChainSettings,
        instance: &str,
        metrics: AuditMetrics,
    ) -> std::io::Result<Self> {
        let (file, last, bytes) = open_append(&settings.path)?;
        let regular = file.metadata()?.is_file();
        let (next_seq, prev, head, chain_kind) = match last {
            Some(head) => (head.seq + 1, head.hash, Some(head), "continued"),
            None => (0, GENESIS, None, "new chain"),
        };
        let sink = Self {
            settings,
            regular,
            inner: Mutex::new(Inner {
                file,
                next_seq,
                prev,
                head,
                covered: false,
                bytes,
            }),
            metrics,
        };
        let ts = chain::now_rfc3339();
        let started = sink.append(&StartLine {
            ts: &ts,
            kind: kind::START,
            instance,
            version: env!("CARGO_PKG_VERSION"),
            chain: chain_kind,
        });
        // A file that opens but cannot be written (a full disk) is the requests' problem: each
        // one fails closed or counts a dropped line, per `logging.audit_required`.
        if let Err(e) = started {
            tracing::error!(file = %sink.settings.path.display(), error = %e, "cannot write to the audit file");
        }
        Ok(sink)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Append one event (a serializable JSON object with `ts` and `type` first). Returns its
    /// sequence number.
    pub fn append<T: Serialize>(&self, body: &T) -> std::io::Result<u64> {
        // Serialized outside the lock: only numbering, hashing and the write are ordered.
        let body = serde_json::to_string(body).map_err(std::io::Error::other)?;
        let mut inner = self.lock();
        let seq = inner.next_seq;
        let mut line = chain::compose(seq, &inner.prev, &body);
        let hash = chain::line_hash(line.as_bytes());
        line.push('\n');
        match inner.file.write_all(line.as_bytes()) {
            Ok(()) => {
                inner.next_seq += 1;
                inner.prev = hash;
                inner.head = Some(Head { seq, hash });
                inner.bytes += line.len() as u64;
                inner.covered = false;
                self.metrics.line_written();
                Ok(seq)
            }
            Err(e) => {
                self.metrics.line_dropped();
                Err(e)
            }
        }
    }

    /// The head a checkpoint should cover now: `None` when nothing was written since the last
    /// checkpoint.
    pub fn pending(&self) -> Option<Head> {
        let inner = self.lock();
        if inner.covered { None } else { inner.head }
    }

    /// Write a checkpoint line for `covers` with the HSM's `mac` of
    /// [`chain::checkpoint_message`]`(covers.seq, covers.hash, ts)`.
    pub fn write_checkpoint(
        &self,
        covers: Head,
        ts: &str,
        key: &str,
        mac: &[u8; 32],
    ) -> std::io::Result<u64> {
        let seq = self.append(&CheckpointLine {
            ts,
            kind: kind::CHECKPOINT,
            covers: covers.seq,
            head: hex::encode(covers.hash),
            key,
            mac: hex::encode(mac),
        })?;
        let mut inner = self.lock();
        // Only if nothing slipped in after the checkpoint line.
        if inner.head.map(|h| h.seq) == Some(seq) {
            inner.covered = true;
        }
        Ok(seq)
    }

    /// Whether the file has grown past `max_bytes`.
    pub fn rotation_due(&self) -> bool {
        self.regular && self.settings.max_bytes > 0 && self.lock().bytes >= self.settings.max_bytes
    }

    /// Rename the current file to `<stem>.<UTC time>.<ext>` and continue the chain in a fresh
    /// file whose first line (`rotate`) names the old one. Call right after a checkpoint so the
    /// old file ends covered. Returns the rotated file's path.
    pub fn rotate(&self, instance: &str) -> std::io::Result<PathBuf> {
        let rotated = {
            let mut inner = self.lock();
            let rotated = rotated_name(&self.settings.path, time::OffsetDateTime::now_utc());
            std::fs::rename(&self.settings.path, &rotated)?;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.settings.path)?;
            // A fresh file nobody else can have open yet; the old one's lock ends with its handle.
            file.try_lock().map_err(std::io::Error::other)?;
            inner.file = file;
            inner.bytes = 0;
            rotated
        };
        let name = rotated
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ts = chain::now_rfc3339();
        self.append(&RotateLine {
            ts: &ts,
            kind: kind::ROTATE,
            previous_file: &name,
            instance,
        })?;
        tracing::info!(file = %rotated.display(), "audit file rotated");
        Ok(rotated)
    }

    /// `fsync` the file (shutdown).
    pub fn sync(&self) -> std::io::Result<()> {
        self.lock().file.sync_data()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the chain half-updated: the fields change
        // together after a successful write.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `dir/audit.jsonl` → `dir/audit.20261201T010203Z.jsonl` (sorts before the current file and in
/// time order, so `audit*.jsonl` lists a chain oldest first).
fn rotated_name(path: &Path, now: time::OffsetDateTime) -> PathBuf {
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit".into());
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{stamp}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{stamp}"),
    };
    let mut candidate = path.with_file_name(&name);
    // Two rotations within one second: add a counter rather than overwrite.
    let mut n = 1;
    while candidate.exists() {
        candidate = path.with_file_name(format!("{name}.{n}"));
        n += 1;
    }
    candidate
}

/// Open for appending and find the chain's last link: the last complete line, if it parses.
/// A file ending in a partial line gets a newline so the next line starts clean (the verifier
/// reports the partial line).
fn open_append(path: &Path) -> std::io::Result<(File, Option<Head>, u64)> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    // One writer per chain, taken before anything is written: a second replica (or a second
    // process on this host) appending to the same file would interleave two chains into one that
    // never verifies.
    if file.metadata()?.is_file() {
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => std::io::Error::other(
                "another process is writing this audit file (each replica needs its own logging.audit_file)",
            ),
            std::fs::TryLockError::Error(e) => e,
        })?;
    }
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((file, None, 0));
    }
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.read_to_end(&mut tail)?;
    let mut bytes = len;
    if tail.last() != Some(&b'\n') {
        file.write_all(b"\n")?;
        bytes += 1;
        tracing::warn!(file = %path.display(), "the audit file ended in a partial line; it will not verify past it");
        return Ok((file, None, bytes));
    }
    let body = &tail[..tail.len() - 1];
    let last = body
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(body, |i| &body[i + 1..]);
    let head = serde_json::from_slice::<chain::Header>(last)
        .ok()
        .map(|h| Head {
            seq: h.seq,
            hash: chain::line_hash(last),
        });
    if head.is_none() {
        tracing::warn!(file = %path.display(), "the audit file's last line is not a chain line; starting a new chain");
    }
    Ok((file, head, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> ChainSettings {
        ChainSettings {
            path: dir.join("audit.jsonl"),
            max_bytes: 0,
        }
    }

    #[derive(Serialize)]
    struct Ev {
        ts: &'static str,
        #[serde(rename = "type")]
        kind: &'static str,
        n: u32,
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn lines_link_and_a_restart_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::standalone().audit;
        {
            let sink = ChainSink::open(settings(dir.path()), "a", metrics.clone()).unwrap();
            for n in 0..3 {
                sink.append(&Ev {
                    ts: "t",
                    kind: "decision",
                    n,
                })
                .unwrap();
            }
        }
        let sink = ChainSink::open(settings(dir.path()), "b", metrics).unwrap();
        let all = lines(sink.path());
        assert_eq!(all.len(), 5);
        let mut prev = GENESIS;
        for (i, line) in all.iter().enumerate() {
            let h: chain::Header = serde_json::from_str(line).unwrap();
            assert_eq!(h.seq, i as u64);
            assert_eq!(chain::parse_hash(&h.prev), Some(prev), "line {i}");
            prev = chain::line_hash(line.as_bytes());
        }
        assert!(all[4].contains(r#""chain":"continued""#));
        assert!(all[0].contains(r#""chain":"new chain""#));
    }

    #[test]
    fn a_second_writer_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::standalone().audit;
        let first = ChainSink::open(settings(dir.path()), "a", metrics.clone()).unwrap();
        let second = ChainSink::open(settings(dir.path()), "b", metrics.clone()).unwrap_err();
        assert!(second.to_string().contains("another process"), "{second}");
        drop(first);
        assert!(ChainSink::open(settings(dir.path()), "c", metrics).is_ok());
    }

    #[test]
    fn a_checkpoint_covers_the_head_until_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::standalone().audit;
        let sink = ChainSink::open(settings(dir.path()), "a", metrics).unwrap();
        let head = sink.pending().unwrap();
        assert_eq!(head.seq, 0);
        sink.write_checkpoint(head, "t", "k", &[7; 32]).unwrap();
        assert_eq!(sink.pending(), None);
        sink.append(&Ev {
            ts: "t",
            kind: "decision",
            n: 1,
        })
        .unwrap();
        assert_eq!(sink.pending().map(|h| h.seq), Some(2));
    }

    #[test]
    fn rotation_continues_the_chain_in_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::standalone().audit;
        let mut s = settings(dir.path());
        s.max_bytes = 400;
        let sink = ChainSink::open(s, "a", metrics).unwrap();
        assert!(!sink.rotation_due());
        for n in 0..3 {
            sink.append(&Ev {
                ts: "t",
                kind: "decision",
                n,
            })
            .unwrap();
        }
        assert!(sink.rotation_due());
        let old_head = sink.pending().unwrap();
        let rotated = sink.rotate("a").unwrap();
        assert!(!sink.rotation_due());
        let name = rotated.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("audit.") && name.ends_with(".jsonl"),
            "{name}"
        );
        assert!(name.as_str() < "audit.jsonl");
        let first = lines(sink.path()).remove(0);
        let h: chain::Header = serde_json::from_str(&first).unwrap();
        assert_eq!(h.seq, old_head.seq + 1);
        assert_eq!(chain::parse_hash(&h.prev), Some(old_head.hash));
        assert!(first.contains(&name));
    }

    #[test]
    fn a_partial_last_line_is_terminated_and_a_new_chain_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"{\"seq\":0,\"prev\":\"00").unwrap();
        let metrics = crate::metrics::Metrics::standalone().audit;
        let sink = ChainSink::open(settings(dir.path()), "a", metrics).unwrap();
        let all = lines(sink.path());
        assert_eq!(all.len(), 2);
        assert!(all[1].starts_with("{\"seq\":0,"));
    }
}
