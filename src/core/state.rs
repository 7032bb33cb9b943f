//! Operator state that every replica of a fleet shares through the HSM: disabled keys, disabled
//! key stores (an XKS key store, the Cloud EKM front, an Azure prefix) and the fleet-wide kill
//! switch.
//!
//! Each entry is a [`StateMark`]: a target that is disabled (or engaged) when its record is
//! `active`, with who set it, when and why. Enabling replaces the record with an inactive one
//! naming who enabled it, so both changes reach the audit trail with their author. The HSM layer stores one PKCS#11 data object per mark (never key
//! material); `ekm-proxy keys|keystore|killswitch` write them, and every replica polls them into a
//! [`FleetState`] that [`super::KeyService`] consults on every key operation.
//!
//! Plain data: must not depend on HTTP, wire JSON or PKCS#11 types. The record's text encoding
//! (`by=…`, `at=…`, `reason=…` lines) is defined here so the HSM layer stores opaque bytes.

use std::collections::BTreeMap;
use std::fmt;

/// What a mark switches off.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StateTarget {
    /// One key, by its label (every front refuses it).
    Key(String),
    /// One key store: `xks:<name>`, `gcp`, or `azure:<prefix name>`.
    Store(StoreId),
    /// Every key operation on every front.
    KillSwitch,
}

/// A key store as the operator names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreId {
    /// `xks`, `gcp` or `azure`.
    pub front: String,
    /// The key store or prefix name; empty for the Cloud EKM front (it has one store).
    pub name: String,
}

impl StoreId {
    /// An XKS key store.
    pub fn xks(name: &str) -> Self {
        Self {
            front: "xks".into(),
            name: name.into(),
        }
    }

    /// The Cloud EKM front (one store).
    pub fn gcp() -> Self {
        Self {
            front: "gcp".into(),
            name: String::new(),
        }
    }

    /// An Azure path prefix.
    pub fn azure(name: &str) -> Self {
        Self {
            front: "azure".into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            f.write_str(&self.front)
        } else {
            write!(f, "{}:{}", self.front, self.name)
        }
    }
}

/// The longest label a state object may carry (labels of keys are at most 128 bytes; the prefix
/// adds a few).
pub const MAX_STATE_LABEL: usize = 256;

impl StateTarget {
    /// The label of the data object holding this mark: `key:<label>`, `keystore:<store>`,
    /// `killswitch`.
    pub fn label(&self) -> String {
        match self {
            StateTarget::Key(label) => format!("key:{label}"),
            StateTarget::Store(store) => format!("keystore:{store}"),
            StateTarget::KillSwitch => "killswitch".into(),
        }
    }

    /// The target a data object's label names, if it names one.
    pub fn from_label(label: &str) -> Option<Self> {
        if label == "killswitch" {
            return Some(StateTarget::KillSwitch);
        }
        if let Some(key) = label.strip_prefix("key:") {
            return (!key.is_empty()).then(|| StateTarget::Key(key.to_owned()));
        }
        let store = label.strip_prefix("keystore:")?;
        let (front, name) = store.split_once(':').unwrap_or((store, ""));
        match (front, name.is_empty()) {
            ("gcp", true) => Some(StateTarget::Store(StoreId::gcp())),
            ("xks" | "azure", false) => Some(StateTarget::Store(StoreId {
                front: front.to_owned(),
                name: name.to_owned(),
            })),
            _ => None,
        }
    }
}

impl fmt::Display for StateTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateTarget::Key(label) => write!(f, "key {label}"),
            StateTarget::Store(store) => write!(f, "key store {store}"),
            StateTarget::KillSwitch => f.write_str("the kill switch"),
        }
    }
}

/// Who switched a target off (or back on), when, and why. Stored as the data object's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRecord {
    /// Whether the target is switched off (disabled, engaged). A record without the field (or
    /// unreadable) counts as active: an object of this application disables unless it says not.
    pub active: bool,
    /// The operator (`user@host` of whoever ran the command, or `--by`).
    pub by: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Free text from `--reason` (may be empty).
    pub reason: String,
}

/// The longest record value written or read (a bound on what a replica parses from the HSM).
pub const MAX_RECORD_BYTES: usize = 4096;

impl StateRecord {
    /// The stored form: `active=1|0\nby=…\nat=…\nreason=…\n`. Newlines inside values become spaces so the
    /// form stays line-oriented.
    pub fn encode(&self) -> Vec<u8> {
        let clean = |s: &str| s.replace(['\n', '\r'], " ");
        let mut text = format!(
            "active={}\nby={}\nat={}\nreason={}\n",
            u8::from(self.active),
            clean(&self.by),
            self.at,
            clean(&self.reason)
        );
        if text.len() > MAX_RECORD_BYTES {
            let mut end = MAX_RECORD_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text.into_bytes()
    }

    /// Parse a stored value. Whatever cannot be read is left empty: a mark whose record is
    /// unreadable still disables its target (presence is what counts).
    pub fn decode(bytes: &[u8]) -> Self {
        let bytes = &bytes[..bytes.len().min(MAX_RECORD_BYTES)];
        let text = String::from_utf8_lossy(bytes);
        let mut record = StateRecord {
            active: true,
            by: String::new(),
            at: 0,
            reason: String::new(),
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("active", v)) => record.active = v != "0",
                Some(("by", v)) => record.by = v.to_owned(),
                Some(("at", v)) => record.at = v.parse().unwrap_or(0),
                Some(("reason", v)) => record.reason = v.to_owned(),
                _ => {}
            }
        }
        record
    }
}

/// One mark read from the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMark {
    /// What it switches off.
    pub target: StateTarget,
    /// Who, when, why.
    pub record: StateRecord,
}

/// What one replica knows of the shared state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetState {
    /// False until the state was read from the HSM once: until then key operations are refused
    /// with a retryable error (a replica must not serve a key the fleet has disabled just because
    /// it started while the HSM was unreachable).
    pub loaded: bool,
    marks: BTreeMap<StateTarget, StateRecord>,
}

/// A difference between two snapshots, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// The target was switched off (disabled, engaged).
    Set(StateMark),
    /// The target was switched back on; the record is the one that was removed.
    Cleared(StateMark),
}

impl FleetState {
    /// A loaded snapshot made of `marks` (a later duplicate of a target replaces an earlier one).
    pub fn from_marks(marks: impl IntoIterator<Item = StateMark>) -> Self {
        Self {
            loaded: true,
            marks: marks.into_iter().map(|m| (m.target, m.record)).collect(),
        }
    }

    /// Whether `target` is switched off, and by whom.
    pub fn get(&self, target: &StateTarget) -> Option<&StateRecord> {
        self.marks.get(target).filter(|r| r.active)
    }

    /// Every target switched off, in a stable order.
    pub fn marks(&self) -> impl Iterator<Item = StateMark> + '_ {
        self.marks
            .iter()
            .filter(|(_, r)| r.active)
            .map(|(t, r)| StateMark {
                target: t.clone(),
                record: r.clone(),
            })
    }

    /// Number of marks of each kind: (keys, stores, kill switch engaged).
    pub fn counts(&self) -> (usize, usize, bool) {
        let active = || self.marks.iter().filter(|(_, r)| r.active).map(|(t, _)| t);
        let keys = active()
            .filter(|t| matches!(t, StateTarget::Key(_)))
            .count();
        let stores = active()
            .filter(|t| matches!(t, StateTarget::Store(_)))
            .count();
        (keys, stores, self.get(&StateTarget::KillSwitch).is_some())
    }

    /// What changed from `before` to `self`: targets switched off (or re-marked with a new
    /// record), and targets switched back on, with the record naming who did it (the enabling
    /// record, or the last disabling one when the object was deleted outright).
    pub fn changes_since(&self, before: &FleetState) -> Vec<StateChange> {
        let mut out = Vec::new();
        for (target, record) in self.marks.iter().filter(|(_, r)| r.active) {
            if before.get(target) != Some(record) {
                out.push(StateChange::Set(StateMark {
                    target: target.clone(),
                    record: record.clone(),
                }));
            }
        }
        for (target, old) in before.marks.iter().filter(|(_, r)| r.active) {
            if self.get(target).is_none() {
                let record = self.marks.get(target).unwrap_or(old);
                out.push(StateChange::Cleared(StateMark {
                    target: target.clone(),
                    record: record.clone(),
                }));
            }
        }
        out
    }
}

/// The operator-facing reason a mark gives, e.g. `key disabled fleet-wide by alice@host at
/// 2026-12-01T01:02:03Z: incident 42`.
pub fn describe(what: &str, record: &StateRecord) -> String {
    let when = time::OffsetDateTime::from_unix_timestamp(i64::try_from(record.at).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| record.at.to_string());
    let by = if record.by.is_empty() {
        "an operator"
    } else {
        &record.by
    };
    if record.reason.is_empty() {
        format!("{what} by {by} at {when}")
    } else {
        format!("{what} by {by} at {when}: {}", record.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(target: StateTarget, by: &str) -> StateMark {
        StateMark {
            target,
            record: StateRecord {
                active: true,
                by: by.into(),
                at: 1_764_550_923,
                reason: "incident 42".into(),
            },
        }
    }

    #[test]
    fn labels_round_trip_and_unknown_labels_are_ignored() {
        for target in [
            StateTarget::Key("dev-aes-1".into()),
            StateTarget::Key("a:b".into()),
            StateTarget::Store(StoreId::xks("dev")),
            StateTarget::Store(StoreId::gcp()),
            StateTarget::Store(StoreId::azure("mhsm-1")),
            StateTarget::KillSwitch,
        ] {
            assert_eq!(StateTarget::from_label(&target.label()), Some(target));
        }
        assert_eq!(
            StateTarget::label(&StateTarget::Store(StoreId::gcp())),
            "keystore:gcp"
        );
        for label in [
            "",
            "key:",
            "keystore:",
            "keystore:xks",
            "keystore:gcp:x",
            "other",
            "keystore:aws:x",
        ] {
            assert_eq!(StateTarget::from_label(label), None, "{label}");
        }
    }

    #[test]
    fn records_round_trip_and_cannot_inject_lines() {
        let r = StateRecord {
            active: false,
            by: "alice@host".into(),
            at: 42,
            reason: "line1\nat=0\nby=mallory".into(),
        };
        let back = StateRecord::decode(&r.encode());
        assert!(!back.active);
        assert_eq!(back.by, "alice@host");
        assert_eq!(back.at, 42);
        assert_eq!(back.reason, "line1 at=0 by=mallory");
        let garbage = StateRecord::decode(b"\xff\xfe junk");
        assert_eq!((garbage.by.as_str(), garbage.at), ("", 0));
        assert!(garbage.active, "an unreadable record still disables");
        let long = StateRecord {
            active: true,
            by: "b".into(),
            at: 1,
            reason: "é".repeat(MAX_RECORD_BYTES),
        };
        assert!(long.encode().len() <= MAX_RECORD_BYTES);
        assert!(String::from_utf8(long.encode()).is_ok());
    }

    #[test]
    fn changes_name_what_was_set_and_cleared() {
        let before = FleetState::from_marks([
            mark(StateTarget::Key("k1".into()), "alice"),
            mark(StateTarget::KillSwitch, "bob"),
        ]);
        let after = FleetState::from_marks([
            mark(StateTarget::Key("k1".into()), "alice"),
            mark(StateTarget::Store(StoreId::xks("dev")), "carol"),
        ]);
        let changes = after.changes_since(&before);
        assert_eq!(
            changes,
            vec![
                StateChange::Set(mark(StateTarget::Store(StoreId::xks("dev")), "carol")),
                StateChange::Cleared(mark(StateTarget::KillSwitch, "bob")),
            ]
        );
        assert!(after.changes_since(&after).is_empty());
        // Enabling leaves an inactive record naming who enabled: the change names them.
        let mut enabled = mark(StateTarget::Key("k1".into()), "dave");
        enabled.record.active = false;
        let later = FleetState::from_marks([enabled.clone()]);
        assert_eq!(
            later.changes_since(&after),
            vec![
                StateChange::Cleared(enabled),
                StateChange::Cleared(mark(StateTarget::Store(StoreId::xks("dev")), "carol")),
            ]
        );
        assert_eq!(later.counts(), (0, 0, false));
        assert_eq!(later.marks().count(), 0);
        assert!(later.get(&StateTarget::Key("k1".into())).is_none());
        assert_eq!(after.counts(), (1, 1, false));
        assert_eq!(before.counts(), (1, 0, true));
        assert!(!FleetState::default().loaded);
    }

    #[test]
    fn description_names_who_when_and_why() {
        let m = mark(StateTarget::KillSwitch, "alice@ops-1");
        assert_eq!(
            describe("engaged", &m.record),
            "engaged by alice@ops-1 at 2025-12-01T01:02:03Z: incident 42"
        );
        let anon = StateRecord {
            active: true,
            by: String::new(),
            at: 0,
            reason: String::new(),
        };
        assert_eq!(
            describe("disabled", &anon),
            "disabled by an operator at 1970-01-01T00:00:00Z"
        );
    }
}
