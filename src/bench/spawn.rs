//! `--spawn`: run the dev-profile server as a child process for the length of a benchmark, so one
//! command gives the full report (server CPU and memory included, since its pid is known).
//!
//! Sets the dev profile up first when its configuration is missing (`ekm-proxy dev init`), gives
//! the child a SoftHSM configuration when `SOFTHSM2_CONF` is unset, waits for `GET /ping`, and
//! stops the child with SIGTERM (then SIGKILL) at the end, or with SIGKILL if the run is dropped.
//! The child's output is kept (its tail in memory, or all of it in `--server-log`) to explain a
//! failed start. Depends on std processes and the HTTP lane's target (for the ping).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::BenchError;
use super::load::HttpTarget;
use super::options::SpawnOptions;

/// Bytes of the child's output kept in memory when no log file is given.
const TAIL_BYTES: usize = 16 * 1024;
/// How long a SIGTERM'd server gets to drain before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The SoftHSM configuration file the child should use: `None` when `SOFTHSM2_CONF` is already
/// set (the child inherits it). The file is written, as `hsm-config/lib.sh` does, if missing.
pub fn softhsm_conf_for_child(opts: &SpawnOptions) -> Result<Option<PathBuf>, BenchError> {
    if std::env::var_os("SOFTHSM2_CONF").is_some() {
        return Ok(None);
    }
    match &opts.softhsm_conf {
        Some(path) => ensure_softhsm_conf(path).map(Some),
        None => Ok(None),
    }
}

/// Write a SoftHSM configuration whose token directory sits next to it, unless it exists;
/// returns its absolute path (SoftHSM resolves the token directory from the text, not the cwd).
pub fn ensure_softhsm_conf(path: &Path) -> Result<PathBuf, BenchError> {
    let path = std::path::absolute(path)
        .map_err(|e| BenchError::Spawn(format!("SoftHSM config path {}: {e}", path.display())))?;
    if path.is_file() {
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .map_err(|e| BenchError::Spawn(format!("cannot create {}: {e}", tokens.display())))?;
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&path, text)
        .map_err(|e| BenchError::Spawn(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// Which optional parts of the dev profile the selected scenarios use.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// The `[gcp]` section and the JWT signer.
    pub gcp: bool,
    /// The `[azure]` section, its keys and the dev client certificate.
    pub azure: bool,
}

/// Run `dev init` when the configuration is the dev profile's and does not exist yet, or predates
/// a section the selected scenarios need (Cloud EKM with its JWT signer, Azure with its client
/// certificate): `dev init` is idempotent, rewrites only the generated `dev.toml` and adds what is
/// missing (the Azure keys), keeping the token, the other keys and the certificates.
pub fn ensure_dev_profile(
    opts: &SpawnOptions,
    softhsm_conf: Option<&Path>,
    needs: Needs,
) -> Result<(), BenchError> {
    let parent = opts.config.parent();
    let is_dev_default = opts.config.file_name().is_some_and(|n| n == "dev.toml")
        && parent
            .and_then(Path::file_name)
            .is_some_and(|n| n == "hsm-config");
    let root = parent.and_then(Path::parent).filter(|_| is_dev_default);
    let root = root.map(|r| {
        if r.as_os_str().is_empty() {
            Path::new(".")
        } else {
            r
        }
    });
    let why = if !opts.config.is_file() {
        "is missing"
    } else if needs.gcp
        && let Some(root) = root
        && !has_gcp_profile(&opts.config, root)
    {
        "has no Cloud EKM section or JWT signer (it predates them)"
    } else if needs.azure
        && let Some(root) = root
        && !has_azure_profile(&opts.config, root)
    {
        "has no Azure section or dev client certificate (it predates them)"
    } else {
        return Ok(());
    };
    let Some(root) = root else {
        return Err(BenchError::Spawn(format!(
            "{} does not exist (only the dev profile's hsm-config/dev.toml is created automatically)",
            opts.config.display()
        )));
    };
    eprintln!(
        "bench: {} {why}; running `ekm-proxy dev init --root {}`",
        opts.config.display(),
        root.display()
    );
    let mut cmd = Command::new(&opts.exe);
    cmd.args(["dev", "init", "--root"])
        .arg(root)
        .stdout(Stdio::null());
    if let Some(conf) = softhsm_conf {
        cmd.env("SOFTHSM2_CONF", conf);
    }
    let status = cmd
        .status()
        .map_err(|e| BenchError::Spawn(format!("cannot run {}: {e}", opts.exe.display())))?;
    if !status.success() {
        return Err(BenchError::Spawn(format!(
            "`ekm-proxy dev init` failed ({status})"
        )));
    }
    Ok(())
}

/// Whether the dev configuration has the `[gcp]` section and the dev signer exists.
fn has_gcp_profile(config: &Path, root: &Path) -> bool {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    text.lines().any(|l| l.trim() == "[gcp]")
        && root.join(crate::dev::profile::JWT_SIGNER_PATH).is_file()
}

/// Whether the dev configuration has the `[azure]` section and the dev client certificate exists.
fn has_azure_profile(config: &Path, root: &Path) -> bool {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    text.lines().any(|l| l.trim() == "[azure]")
        && root.join(super::options::DEV_CLIENT_CERT).is_file()
        && root.join(super::options::DEV_CLIENT_KEY).is_file()
}

/// The server child. Dropping it kills the child.
pub struct SpawnedServer {
    child: Option<Child>,
    tail: Arc<Mutex<Vec<u8>>>,
    log: Option<PathBuf>,
}

impl SpawnedServer {
    /// Start `<exe> serve --config <config>`.
    pub fn start(opts: &SpawnOptions, softhsm_conf: Option<&Path>) -> Result<Self, BenchError> {
        let mut cmd = Command::new(&opts.exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&opts.config)
            .stdin(Stdio::null());
        if let Some(conf) = softhsm_conf {
            cmd.env("SOFTHSM2_CONF", conf);
        }
        match &opts.log {
            Some(path) => {
                let file = std::fs::File::create(path).map_err(|e| {
                    BenchError::Spawn(format!("cannot create {}: {e}", path.display()))
                })?;
                let err = file
                    .try_clone()
                    .map_err(|e| BenchError::Spawn(format!("{}: {e}", path.display())))?;
                cmd.stdout(file).stderr(err);
            }
            // Piped, not discarded: the server's own logging is part of its cost, and the tail
            // explains a failed start.
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| BenchError::Spawn(format!("cannot start {}: {e}", opts.exe.display())))?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            keep_tail(out, Arc::clone(&tail));
        }
        if let Some(err) = child.stderr.take() {
            keep_tail(err, Arc::clone(&tail));
        }
        Ok(Self {
            child: Some(child),
            tail,
            log: opts.log.clone(),
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error if the child has exited, with its status and last output.
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        let Some(child) = self.child.as_mut() else {
            return Err(BenchError::Spawn("the server was already stopped".into()));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Spawn(format!(
                "the server exited ({status}){}",
                self.output_tail()
            ))),
            Err(e) => Err(BenchError::Spawn(format!(
                "cannot check the server process: {e}"
            ))),
        }
    }

    /// Wait until `GET /ping` answers 200, the child exits, or `timeout` passes.
    pub async fn wait_ready(
        &mut self,
        target: &HttpTarget,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            self.check_alive()?;
            match target.connect().await {
                Ok(mut client) => match target.ping(&mut client).await {
                    Ok(200) => return Ok(()),
                    Ok(status) => last = format!("GET /ping answered {status}"),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(BenchError::Spawn(format!(
            "the server did not answer GET /ping within {timeout:?} (last: {last}){}",
            self.output_tail()
        )))
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL. Returns the exit status if known.
    pub async fn stop(mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // std can only SIGKILL; `kill -TERM` lets the server close its HSM sessions cleanly.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// The end of the child's output, for error messages.
    pub fn output_tail(&self) -> String {
        if let Some(path) = &self.log {
            let text = std::fs::read(path).unwrap_or_default();
            let start = text.len().saturating_sub(4096);
            return format!(
                "\n--- end of {} ---\n{}",
                path.display(),
                String::from_utf8_lossy(&text[start..])
            );
        }
        // Give the reader threads a moment to drain what the child wrote just before exiting.
        std::thread::sleep(Duration::from_millis(50));
        let tail = self.tail.lock().map(|t| t.clone()).unwrap_or_default();
        if tail.is_empty() {
            String::new()
        } else {
            let start = tail.len().saturating_sub(4096);
            format!(
                "\n--- server output (end) ---\n{}",
                String::from_utf8_lossy(&tail[start..])
            )
        }
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        // Reached on errors and interruption: never leave a server holding the port.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Read `r` to its end on a thread, keeping the last [`TAIL_BYTES`]. The thread ends when the
/// child closes the pipe; it is detached, never joined.
fn keep_tail(mut r: impl Read + Send + 'static, tail: Arc<Mutex<Vec<u8>>>) {
    let spawned = std::thread::Builder::new()
        .name("bench-server-output".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut t) = tail.lock() {
                            t.extend_from_slice(&buf[..n]);
                            if t.len() > 2 * TAIL_BYTES {
                                let cut = t.len() - TAIL_BYTES;
                                t.drain(..cut);
                            }
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("bench: cannot read the server's output ({e}); it may block when the pipe fills");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_softhsm_conf_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf/softhsm2.conf");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let written = ensure_softhsm_conf(&path).unwrap();
        let text = std::fs::read_to_string(&written).unwrap();
        assert!(text.contains(&format!(
            "directories.tokendir = {}",
            dir.path().join("conf/tokens").display()
        )));
        assert!(dir.path().join("conf/tokens").is_dir());
        std::fs::write(&path, "custom").unwrap();
        ensure_softhsm_conf(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "custom");
    }

    #[test]
    fn only_the_dev_config_is_created() {
        let opts = SpawnOptions {
            exe: PathBuf::from("/nonexistent/ekm-proxy"),
            config: PathBuf::from("/nonexistent/prod.toml"),
            softhsm_conf: None,
            log: None,
            ready_timeout: Duration::from_secs(1),
        };
        let all = Needs {
            gcp: true,
            azure: true,
        };
        let err = ensure_dev_profile(&opts, None, all)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only the dev profile"), "{err}");
        // An existing non-dev config is used as it is, gcp, azure or not.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prod.toml");
        std::fs::write(&config, "").unwrap();
        let opts = SpawnOptions { config, ..opts };
        ensure_dev_profile(&opts, None, all).unwrap();
    }

    #[test]
    fn a_dev_profile_without_gcp_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("hsm-config/dev.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, "[hsm]\n").unwrap();
        assert!(!has_gcp_profile(&config, dir.path()));
        std::fs::write(&config, "[hsm]\n[gcp]\npath_prefix = \"/g\"\n").unwrap();
        assert!(!has_gcp_profile(&config, dir.path()), "no signer yet");
        let signer = dir.path().join(crate::dev::profile::JWT_SIGNER_PATH);
        std::fs::create_dir_all(signer.parent().unwrap()).unwrap();
        std::fs::write(&signer, "").unwrap();
        assert!(has_gcp_profile(&config, dir.path()));
    }

    #[test]
    fn a_dev_profile_without_azure_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("hsm-config/dev.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, "[hsm]\n[gcp]\n").unwrap();
        assert!(!has_azure_profile(&config, dir.path()));
        std::fs::write(&config, "[hsm]\n[azure]\nekm_vendor = \"x\"\n").unwrap();
        assert!(
            !has_azure_profile(&config, dir.path()),
            "no client certificate yet"
        );
        let certs = dir.path().join("certs/dev");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("client.pem"), "").unwrap();
        assert!(!has_azure_profile(&config, dir.path()), "no client key yet");
        std::fs::write(certs.join("client-key.pem"), "").unwrap();
        assert!(has_azure_profile(&config, dir.path()));
    }
}
