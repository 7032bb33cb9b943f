//! Process-wide state of the fault module: initialization, session tracking, slot → label cache,
//! per-token control files with their counters, and the fault decision for each call.
//!
//! No unsafe code here except the calls into the real module, which go through
//! [`crate::Real`]'s helpers.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cryptoki_sys::*;

use crate::Real;
use crate::config::{self, AfterRestore, GcmIv, Validated};

/// What a call is attributed to.
#[derive(Debug, Clone, Copy)]
pub enum Attr {
    /// No slot or session: `_global.json` (latency/errors/hang only).
    Global,
    /// A slot-taking function.
    Slot(CK_SLOT_ID),
    /// A session-taking function.
    Session(CK_SESSION_HANDLE),
}

/// Go-ahead for a forwarded call, with what the forwarder needs to know.
#[derive(Debug, Clone, Copy, Default)]
pub struct Go {
    /// The token is (simulated) removed; only `C_GetSlotInfo` is let through in that state.
    pub removed: bool,
    /// The token's GCM IV convention.
    pub gcm: GcmIv,
}

/// Outcome of the fault decision.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Forward to the real module.
    Go(Go),
    /// Return this value without forwarding (state-driven: removal, re-init required, ...).
    Return(CK_RV),
    /// Return this injected error without forwarding; an operation the call belongs to must be
    /// terminated in the real module, as a real failure would.
    Inject(CK_RV),
}

/// Fault decision: sleep this long (outside the lock), then act on `outcome`.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    /// Latency + hang to apply before the outcome.
    pub sleep: Duration,
    /// The latency part of `sleep`, which a length query does not pay unless
    /// `latency_on_length_queries` is set.
    pub latency: Duration,
    /// `latency_on_length_queries`.
    pub charge_length_queries: bool,
    /// What to do.
    pub outcome: Outcome,
}

impl Decision {
    fn now(outcome: Outcome) -> Self {
        Self {
            sleep: Duration::ZERO,
            latency: Duration::ZERO,
            charge_length_queries: false,
            outcome,
        }
    }

    /// What to sleep for this call: a length query skips the latency unless told otherwise.
    pub fn sleep_for(&self, length_query: bool) -> Duration {
        if length_query && !self.charge_length_queries {
            self.sleep.saturating_sub(self.latency)
        } else {
            self.sleep
        }
    }
}

/// What identifies a file version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: (i64, i64),
    ctime: (i64, i64),
    len: u64,
    ino: u64,
    dev: u64,
}

/// One control file, its effective configuration and its counters.
#[derive(Debug)]
struct ControlFile {
    path: PathBuf,
    loaded: bool,
    stamp: Option<Stamp>,
    bytes: Option<Vec<u8>>,
    /// The effective configuration (default when missing or invalid).
    valid: Validated,
    /// The last read parsed (or the file is missing).
    parse_ok: bool,
    /// Remaining `count` per error rule (`None` = unlimited).
    error_left: Vec<Option<u64>>,
    hang_left: Option<u64>,
}

impl ControlFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            loaded: false,
            stamp: None,
            bytes: None,
            valid: Validated::default(),
            parse_ok: true,
            error_left: Vec::new(),
            hang_left: None,
        }
    }

    /// Re-read the file if it changed. Returns true when the effective content changed.
    fn refresh(&mut self) -> bool {
        let stamp = std::fs::metadata(&self.path).ok().map(|m| Stamp {
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            len: m.len(),
            ino: m.ino(),
            dev: m.dev(),
        });
        if self.loaded && stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        let bytes = match stamp {
            Some(_) => std::fs::read(&self.path).ok(),
            None => None,
        };
        if self.loaded && bytes == self.bytes {
            return false;
        }
        self.loaded = true;
        self.bytes = bytes;
        match &self.bytes {
            None => {
                self.valid = Validated::default();
                self.parse_ok = true;
            }
            Some(b) => match config::parse(b) {
                Ok(v) => {
                    self.valid = v;
                    self.parse_ok = true;
                }
                Err(e) => {
                    eprintln!(
                        "p11-fault: ignoring control file {}: {e}",
                        self.path.display()
                    );
                    self.valid = Validated::default();
                    self.parse_ok = false;
                }
            },
        }
        self.error_left = self.valid.errors.iter().map(|e| e.rule.count).collect();
        self.hang_left = self.valid.config.hang.as_ref().and_then(|h| h.count);
        true
    }

    /// Latency, hang and error rules for one call of `name`.
    fn faults(&mut self, name: &str, rng: &mut Rng) -> Decision {
        let cfg = &self.valid.config;
        let latency_us = cfg
            .latency_us
            .get(name)
            .or_else(|| cfg.latency_us.get("*"))
            .copied()
            .unwrap_or(0);
        let latency = Duration::from_micros(latency_us);
        let charge_length_queries = cfg.latency_on_length_queries;
        let mut sleep_us = latency_us;
        if let Some(h) = &cfg.hang
            && config::matches(&h.functions, name)
        {
            match &mut self.hang_left {
                None => sleep_us = sleep_us.saturating_add(h.ms.saturating_mul(1000)),
                Some(0) => {}
                Some(n) => {
                    *n -= 1;
                    sleep_us = sleep_us.saturating_add(h.ms.saturating_mul(1000));
                }
            }
        }
        let sleep = Duration::from_micros(sleep_us);
        for (i, e) in self.valid.errors.iter().enumerate() {
            if !config::matches(&e.rule.functions, name) {
                continue;
            }
            let left = self.error_left.get_mut(i);
            if let Some(Some(0)) = left {
                continue;
            }
            if let Some(p) = e.rule.probability
                && rng.next_f64() >= p
            {
                continue;
            }
            if let Some(Some(n)) = left {
                *n -= 1;
            }
            return Decision {
                sleep,
                latency,
                charge_length_queries,
                outcome: Outcome::Inject(e.rv),
            };
        }
        Decision {
            sleep,
            latency,
            charge_length_queries,
            outcome: Outcome::Go(Go {
                removed: false,
                gcm: cfg.gcm_iv,
            }),
        }
    }
}

/// One token (by sanitized label).
#[derive(Debug)]
struct TokenState {
    file: ControlFile,
    /// The slot the token was last seen in.
    slot: CK_SLOT_ID,
    /// `removed` as last seen (transition detection).
    last_removed: bool,
    /// `after_restore` of the file that declared the removal.
    restore_mode: AfterRestore,
    /// Restored with `reinit_required` and not yet re-initialized.
    needs_reinit: bool,
}

/// xorshift64* — enough for fault probabilities.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Self((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// All mutable state, behind one mutex (see `crate::state()`).
#[derive(Debug)]
pub struct State {
    /// The fault module is initialized (from the caller's view).
    pub initialized: bool,
    dir: PathBuf,
    /// Open sessions opened through this module → slot.
    sessions: HashMap<CK_SESSION_HANDLE, CK_SLOT_ID>,
    /// Sessions closed by a simulated removal → slot, kept only to attribute calls on old
    /// handles while the token is removed (or awaits re-initialization).
    dead: HashMap<CK_SESSION_HANDLE, CK_SLOT_ID>,
    /// Slot → sanitized token label.
    labels: HashMap<CK_SLOT_ID, String>,
    tokens: HashMap<String, TokenState>,
    global: ControlFile,
    /// `hsm-appended`: IV generated at `C_EncryptInit`, appended by `C_Encrypt`.
    pub gcm_pending: HashMap<CK_SESSION_HANDLE, [u8; 12]>,
    rng: Rng,
    /// Sessions opened through the module since it was loaded, per slot (for the stats file).
    opened: HashMap<CK_SLOT_ID, u64>,
}

/// The control directory: `P11_FAULT_DIR`, else `${TMPDIR:-/tmp}/p11-fault`.
fn control_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("P11_FAULT_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let tmp = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    tmp.join("p11-fault")
}

fn file_for(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.json"))
}

impl State {
    /// Fresh state; reads `P11_FAULT_DIR` once.
    pub fn new() -> Self {
        let dir = control_dir();
        Self {
            initialized: false,
            global: ControlFile::new(file_for(&dir, "_global")),
            dir,
            sessions: HashMap::new(),
            dead: HashMap::new(),
            labels: HashMap::new(),
            tokens: HashMap::new(),
            gcm_pending: HashMap::new(),
            rng: Rng::seeded(),
            opened: HashMap::new(),
        }
    }

    /// Write `<dir>/<label>.stats.json`: `{"open_sessions": N, "opened_total": M}`, the sessions
    /// opened through this module on `slot` that are open now, and all it ever opened there.
    /// Tests read it to prove that no session leaked and to count reopens. Written (temp file +
    /// rename) only when a session is opened or closed, so it costs nothing per operation.
    fn write_stats(&self, slot: CK_SLOT_ID) {
        let Some(label) = self.labels.get(&slot) else {
            return;
        };
        let open = self.sessions.values().filter(|s| **s == slot).count();
        let opened = self.opened.get(&slot).copied().unwrap_or(0);
        let path = self.dir.join(format!("{label}.stats.json"));
        let tmp = self
            .dir
            .join(format!(".{label}.stats.{}.tmp", std::process::id()));
        let text = format!("{{\"open_sessions\":{open},\"opened_total\":{opened}}}\n");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// Faults of `_global.json` for `name`.
    pub fn global_faults(&mut self, name: &str) -> Decision {
        self.global.refresh();
        self.global.faults(name, &mut self.rng)
    }

    /// The token key (sanitized label) of a slot, resolving it with the real `C_GetTokenInfo`
    /// on a cache miss. `None` for slots without an initialized token.
    fn slot_key(&mut self, slot: CK_SLOT_ID, real: &Real) -> Option<String> {
        if let Some(k) = self.labels.get(&slot) {
            return Some(k.clone());
        }
        let info = real.token_info(slot)?;
        if info.flags & CKF_TOKEN_INITIALIZED == 0 {
            return None;
        }
        let key = config::sanitize_label(&String::from_utf8_lossy(&info.label));
        if key.is_empty() {
            return None;
        }
        self.labels.insert(slot, key.clone());
        let dir = self.dir.clone();
        self.tokens
            .entry(key.clone())
            .or_insert_with(|| TokenState {
                file: ControlFile::new(file_for(&dir, &key)),
                slot,
                last_removed: false,
                restore_mode: AfterRestore::SessionsInvalid,
                needs_reinit: false,
            })
            .slot = slot;
        Some(key)
    }

    /// Re-read a token's file and act on removal/restore transitions.
    fn refresh_token(&mut self, key: &str, real: &Real) {
        let Some(ts) = self.tokens.get_mut(key) else {
            return;
        };
        if !ts.file.refresh() || !ts.file.parse_ok {
            return;
        }
        let cfg = &ts.file.valid.config;
        let (removed, mode, slot) = (cfg.removed, cfg.after_restore, ts.slot);
        if removed && !ts.last_removed {
            ts.last_removed = true;
            ts.restore_mode = mode;
            self.remove_slot(slot, real);
        } else if !removed && ts.last_removed {
            ts.last_removed = false;
            if ts.restore_mode == AfterRestore::ReinitRequired
                || mode == AfterRestore::ReinitRequired
            {
                ts.needs_reinit = true;
            } else {
                self.dead.retain(|_, s| *s != slot);
            }
        }
    }

    /// Simulated removal: really close every session of the slot, forget ours.
    fn remove_slot(&mut self, slot: CK_SLOT_ID, real: &Real) {
        let gone: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| **s == slot)
            .map(|(h, _)| *h)
            .collect();
        for h in gone {
            self.sessions.remove(&h);
            self.gcm_pending.remove(&h);
            self.dead.insert(h, slot);
        }
        real.close_all_sessions(slot);
        self.write_stats(slot);
    }

    /// Re-read every known token's file (the watcher thread): catches a removal the process
    /// made no call during.
    pub fn poll(&mut self, real: &Real) {
        let keys: Vec<String> = self.tokens.keys().cloned().collect();
        for k in keys {
            self.refresh_token(&k, real);
        }
    }

    /// Is the token in `slot` (simulated) removed? For `C_GetSlotList(TRUE)`.
    pub fn slot_removed(&mut self, slot: CK_SLOT_ID, real: &Real) -> bool {
        let Some(key) = self.slot_key(slot, real) else {
            return false;
        };
        self.refresh_token(&key, real);
        self.tokens.get(&key).is_some_and(|t| t.last_removed)
    }

    /// The fault decision for one call.
    pub fn decide(&mut self, name: &str, attr: Attr, real: &Real) -> Decision {
        if !self.initialized {
            return Decision::now(Outcome::Return(CKR_CRYPTOKI_NOT_INITIALIZED));
        }
        let (slot, session) = match attr {
            Attr::Global => return self.global_faults(name),
            Attr::Slot(s) => (Some(s), None),
            Attr::Session(h) => match self.sessions.get(&h).or_else(|| self.dead.get(&h)) {
                Some(s) => (Some(*s), Some(h)),
                None => (None, Some(h)),
            },
        };
        let Some(key) = slot.and_then(|s| self.slot_key(s, real)) else {
            // A session not opened through this module (or long gone): no faults.
            return Decision::now(Outcome::Go(Go::default()));
        };
        self.refresh_token(&key, real);
        let Some(ts) = self.tokens.get_mut(&key) else {
            return Decision::now(Outcome::Go(Go::default()));
        };
        if ts.needs_reinit {
            return Decision::now(Outcome::Return(CKR_GENERAL_ERROR));
        }
        if ts.last_removed {
            let rv = match (session, name) {
                (Some(h), _) => {
                    if name == "C_CloseSession" {
                        self.dead.remove(&h);
                    }
                    CKR_DEVICE_REMOVED
                }
                (None, "C_GetSlotInfo") => {
                    return Decision::now(Outcome::Go(Go {
                        removed: true,
                        gcm: ts.file.valid.config.gcm_iv,
                    }));
                }
                // Its sessions are already gone.
                (None, "C_CloseAllSessions") => CKR_OK,
                (None, _) => CKR_TOKEN_NOT_PRESENT,
            };
            return Decision::now(Outcome::Return(rv));
        }
        ts.file.faults(name, &mut self.rng)
    }

    /// `C_Initialize` succeeded.
    pub fn on_initialize(&mut self) {
        self.initialized = true;
        for t in self.tokens.values_mut() {
            t.needs_reinit = false;
        }
    }

    /// `C_Finalize`: the sessions to close in the real module; forgets everything per-process.
    pub fn on_finalize(&mut self) -> Vec<CK_SESSION_HANDLE> {
        self.initialized = false;
        self.dead.clear();
        self.gcm_pending.clear();
        let drained: Vec<(CK_SESSION_HANDLE, CK_SLOT_ID)> = self.sessions.drain().collect();
        let mut slots: Vec<CK_SLOT_ID> = drained.iter().map(|(_, s)| *s).collect();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            self.write_stats(slot);
        }
        self.labels.clear();
        drained.into_iter().map(|(h, _)| h).collect()
    }

    /// A session was opened through the module.
    pub fn on_open(&mut self, h: CK_SESSION_HANDLE, slot: CK_SLOT_ID) {
        self.dead.remove(&h);
        self.sessions.insert(h, slot);
        *self.opened.entry(slot).or_insert(0) += 1;
        self.write_stats(slot);
    }

    /// A session was closed (or found invalid).
    pub fn on_close(&mut self, h: CK_SESSION_HANDLE) {
        let slot = self.sessions.remove(&h);
        self.gcm_pending.remove(&h);
        if let Some(slot) = slot {
            self.write_stats(slot);
        }
    }

    /// All sessions of a slot were closed.
    pub fn on_close_all(&mut self, slot: CK_SLOT_ID) {
        let gone: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| **s == slot)
            .map(|(h, _)| *h)
            .collect();
        for h in gone {
            self.on_close(h);
        }
    }

    /// `C_InitToken` on a slot: its label may have changed.
    pub fn forget_slot(&mut self, slot: CK_SLOT_ID) {
        self.labels.remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_reset_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let mut f = ControlFile::new(path.clone());
        let mut rng = Rng::seeded();
        assert!(f.refresh());
        assert!(matches!(
            f.faults("C_Encrypt", &mut rng).outcome,
            Outcome::Go(_)
        ));
        std::fs::write(
            &path,
            br#"{"errors":[{"functions":["C_Encrypt"],"ckr":"CKR_DEVICE_ERROR","count":2}]}"#,
        )
        .unwrap();
        assert!(f.refresh());
        for _ in 0..2 {
            assert!(matches!(
                f.faults("C_Encrypt", &mut rng).outcome,
                Outcome::Inject(CKR_DEVICE_ERROR)
            ));
        }
        assert!(matches!(
            f.faults("C_Encrypt", &mut rng).outcome,
            Outcome::Go(_)
        ));
        assert!(matches!(
            f.faults("C_Decrypt", &mut rng).outcome,
            Outcome::Go(_)
        ));
        assert!(!f.refresh());
        std::fs::write(
            &path,
            br#"{"errors":[{"functions":["*"],"ckr":"CKR_DEVICE_ERROR","count":1}]  }"#,
        )
        .unwrap();
        assert!(f.refresh());
        assert!(matches!(
            f.faults("C_Decrypt", &mut rng).outcome,
            Outcome::Inject(CKR_DEVICE_ERROR)
        ));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(f.refresh());
        assert!(!f.parse_ok);
        assert!(matches!(
            f.faults("C_Decrypt", &mut rng).outcome,
            Outcome::Go(_)
        ));
    }

    #[test]
    fn probability_is_roughly_respected() {
        let mut rng = Rng::seeded();
        let hits = (0..10_000).filter(|_| rng.next_f64() < 0.25).count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }
}
