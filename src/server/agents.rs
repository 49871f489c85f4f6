//! Remote agents in the server: the Valkyrie hub with the server's CA, registration
//! tokens used up by the agents they register, the audit log, and the agents routes.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustci_control::{AuditEntry, ControlPlane};
use rustci_runners_valkyrie::Admission;

use super::auth::Keys;

/// Registration tokens for agents: valid, unexpired, and not used before. A used token's
/// id is appended to `used-tokens` (one per line) before the agent gets its identity, so
/// a token registers one agent even across restarts.
pub(crate) struct TokenAdmission {
    keys: Keys,
    used_path: PathBuf,
    used: Mutex<HashSet<String>>,
    plane: ControlPlane,
}

impl TokenAdmission {
    pub(crate) fn new(keys: Keys, dir: &Path, plane: ControlPlane) -> std::io::Result<Self> {
        let used_path = dir.join("used-tokens");
        let used = match std::fs::read_to_string(&used_path) {
            Ok(s) => s.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        Ok(TokenAdmission {
            keys,
            used_path,
            used: Mutex::new(used),
            plane,
        })
    }
}

impl Admission for TokenAdmission {
    fn admit(&self, token: &str) -> Result<Vec<String>, String> {
        let claims = self.keys.verify_token(token)?;
        let mut used = self.used.lock().expect("tokens");
        if used.contains(&claims.jti) {
            return Err("the registration token was already used".into());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.used_path)
            .map_err(|e| format!("recording the token's use: {e}"))?;
        writeln!(f, "{}", claims.jti)
            .and_then(|_| f.sync_data())
            .map_err(|e| format!("recording the token's use: {e}"))?;
        used.insert(claims.jti);
        Ok(claims.labels)
    }

    fn audit(&self, actor: &str, action: &str, target: Option<&str>, result: &str) {
        let entry = AuditEntry::new(actor, action, target.map(str::to_string), result, None);
        if let Err(e) = self.plane.store().append_audit(&entry) {
            tracing::error!(error = %rustci_runners::error::Chain(&e), "writing the audit log");
        }
    }
}

/// The hub and what it needs, created at server start.
pub(crate) fn hub(
    config: &super::ServerConfig,
    secret: &str,
    plane: &ControlPlane,
    authority: rustci_runners_valkyrie::pki::Authority,
) -> Result<rustci_runners_valkyrie::Hub, String> {
    let dir = config.data_dir.join("valkyrie");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let admission = TokenAdmission::new(Keys::new(std::iter::empty(), secret), &dir, plane.clone())
        .map_err(|e| format!("reading used registration tokens: {e}"))?;
    let mut options = rustci_runners_valkyrie::HubOptions::new(&dir);
    options.timings.heartbeat = std::time::Duration::from_millis(config.agent_heartbeat_ms.max(10));
    options.timings.margin = std::time::Duration::from_millis(config.agent_margin_ms);
    options.timings.restart_grace = std::time::Duration::from_secs(config.agent_restart_grace_secs);
    rustci_runners_valkyrie::Hub::new(options, authority, Arc::new(admission))
        .map_err(|e| format!("starting the agent hub: {e}"))
}
