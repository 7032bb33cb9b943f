//! The audit chain's line format, shared by the writer ([`super::sink`]) and the verifier
//! ([`super::verify`]).
//!
//! Every line is one JSON object that starts with `"seq"` (0, 1, 2, … without gaps across rotated
//! files) and `"prev"` (hex SHA-256 of the exact bytes of the previous line, without its newline;
//! 64 zeros for the first line of a chain). Removing, editing, reordering or inserting a line
//! breaks the link of the line after it. A `"type":"checkpoint"` line carries an HMAC-SHA-256,
//! computed inside the HSM, of [`checkpoint_message`]: the sequence number and hash of the line
//! it covers and its own time stamp, so someone who can rewrite the file but cannot use the HSM
//! key cannot produce a chain that verifies.
//!
//! Pure functions and types; must not depend on the HSM, HTTP or front ends.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `prev` of the first line of a chain.
pub const GENESIS: [u8; 32] = [0; 32];

/// Line types.
pub mod kind {
    /// A process started writing (first line of a chain, or a restart continuing one).
    pub const START: &str = "start";
    /// A key-operation decision (allowed, denied, failed).
    pub const DECISION: &str = "decision";
    /// A fleet state change (key or key store disabled or enabled, kill switch).
    pub const STATE: &str = "state";
    /// An HMAC of the chain head made in the HSM.
    pub const CHECKPOINT: &str = "checkpoint";
    /// The first line of a file after rotation, naming the file before it.
    pub const ROTATE: &str = "rotate";
}

/// SHA-256 of one line's bytes (without the newline).
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// A line: `{"seq":N,"prev":"<hex>",` followed by the rest of `body`, a serialized JSON object
/// (whose opening brace is replaced). `body` must be a JSON object.
pub fn compose(seq: u64, prev: &[u8; 32], body: &str) -> String {
    let rest = body.strip_prefix('{').unwrap_or(body);
    let sep = if rest.starts_with('}') { "" } else { "," };
    format!(
        "{{\"seq\":{seq},\"prev\":\"{}\"{sep}{rest}",
        hex::encode(prev)
    )
}

/// The bytes a checkpoint's MAC covers: a fixed label, the covered line's sequence number and
/// hash, and the checkpoint's own time stamp.
pub fn checkpoint_message(covers: u64, head: &[u8; 32], ts: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64 + ts.len());
    msg.extend_from_slice(b"ekm-proxy audit checkpoint v1\n");
    msg.extend_from_slice(&covers.to_be_bytes());
    msg.extend_from_slice(head);
    msg.extend_from_slice(ts.as_bytes());
    msg
}

/// The fields the verifier reads from every line (the rest is the event).
#[derive(Debug, Deserialize)]
pub struct Header {
    /// Position in the chain.
    pub seq: u64,
    /// Hex SHA-256 of the previous line.
    pub prev: String,
    /// Line type (see [`kind`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 time stamp.
    #[serde(default)]
    pub ts: String,
    /// Checkpoints: the sequence number of the line covered.
    #[serde(default)]
    pub covers: Option<u64>,
    /// Checkpoints: hex hash of the covered line.
    #[serde(default)]
    pub head: Option<String>,
    /// Checkpoints: hex HMAC-SHA-256.
    #[serde(default)]
    pub mac: Option<String>,
    /// Checkpoints: the HSM key's label.
    #[serde(default)]
    pub key: Option<String>,
}

/// The current time as the chain writes it (RFC 3339, UTC, microseconds).
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// 32 bytes from 64 hex digits.
pub fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_start_with_seq_and_prev_and_keep_the_body() {
        let line = compose(7, &[0xab; 32], r#"{"type":"decision","key":"k"}"#);
        assert!(line.starts_with(r#"{"seq":7,"prev":"abab"#));
        assert!(line.ends_with(r#","type":"decision","key":"k"}"#));
        let header: Header = serde_json::from_str(&line).unwrap();
        assert_eq!((header.seq, header.kind.as_str()), (7, "decision"));
        assert_eq!(parse_hash(&header.prev), Some([0xab; 32]));
        assert_eq!(
            compose(0, &GENESIS, "{}"),
            format!("{{\"seq\":0,\"prev\":\"{}\"}}", "0".repeat(64))
        );
    }

    #[test]
    fn the_checkpoint_message_binds_position_head_and_time() {
        let a = checkpoint_message(1, &[1; 32], "t");
        assert_ne!(a, checkpoint_message(2, &[1; 32], "t"));
        assert_ne!(a, checkpoint_message(1, &[2; 32], "t"));
        assert_ne!(a, checkpoint_message(1, &[1; 32], "u"));
        assert_eq!(line_hash(b"abc").len(), 32);
        assert_ne!(line_hash(b"abc"), line_hash(b"abd"));
        assert!(parse_hash("zz").is_none());
        assert!(now_rfc3339().ends_with('Z'));
    }
}
