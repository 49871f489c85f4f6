//! Remote agents in the server: the Valkyrie hub with the server's CA, registration
//! tokens used up by the agents they register, the audit log, and the agents routes.

use std::sync::Arc;

use rustci_control::{AuditEntry, ControlPlane};
use rustci_runners_valkyrie::Admission;

use super::auth::Keys;
use super::tokens::Tokens;

/// Registration tokens for agents: valid, unexpired, not revoked and not used before.
/// The ledger stores the use before the agent gets its identity, so a token registers
/// one agent even across restarts.
pub(crate) struct TokenAdmission {
    keys: Keys,
    tokens: Arc<Tokens>,
    plane: ControlPlane,
}

impl TokenAdmission {
    pub(crate) fn new(keys: Keys, tokens: Arc<Tokens>, plane: ControlPlane) -> Self {
        TokenAdmission {
            keys,
            tokens,
            plane,
        }
    }
}

impl Admission for TokenAdmission {
    fn admit(&self, token: &str, agent: &str) -> Result<Vec<String>, String> {
        let claims = self.keys.verify_token(token)?;
        self.tokens
            .hold(&claims.jti)?
            .commit(&format!("agent {agent}"))?;
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
    tokens: Arc<Tokens>,
) -> Result<rustci_runners_valkyrie::Hub, String> {
    let dir = config.data_dir.join("valkyrie");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let admission =
        TokenAdmission::new(Keys::new(std::iter::empty(), secret), tokens, plane.clone());
    let mut options = rustci_runners_valkyrie::HubOptions::new(&dir);
    options.timings.heartbeat = std::time::Duration::from_millis(config.agent_heartbeat_ms.max(10));
    options.timings.margin = std::time::Duration::from_millis(config.agent_margin_ms);
    options.timings.restart_grace = std::time::Duration::from_secs(config.agent_restart_grace_secs);
    options.timings.offer_timeout =
        std::time::Duration::from_millis(config.agent_offer_timeout_ms.max(100));
    rustci_runners_valkyrie::Hub::new(options, authority, Arc::new(admission))
        .map_err(|e| format!("starting the agent hub: {e}"))
}
