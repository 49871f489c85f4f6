//! The registration-token ledger: which tokens were issued, which were used up, which an
//! admin revoked. A token registers one runner or one agent; a revoked one registers
//! nothing. The signature and expiry are checked by [`Keys`](super::Keys); this is the
//! state a signed token cannot carry.
//!
//! Stored as JSON lines appended to `<data>/tokens` with a disk flush before the answer,
//! so a use or a revocation survives a crash. Entries of expired tokens are dropped when
//! the ledger is opened (an expired token is refused by its signature check anyway).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::auth::RegistrationClaims;

/// What became of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
#[non_exhaustive]
pub enum TokenState {
    /// It can still register one runner or agent.
    Active,
    /// It registered `by` (`runner <id>` or `agent <id>`).
    Used {
        /// What it registered.
        by: String,
    },
    /// An admin (`by`) revoked it.
    Revoked {
        /// Who revoked it.
        by: String,
    },
}

/// One issued token, as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TokenEntry {
    /// The token's id (its `jti`).
    pub id: String,
    /// Who created it.
    pub issued_by: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Labels it grants.
    pub labels: Vec<String>,
    /// What became of it.
    #[serde(flatten)]
    pub state: TokenState,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Issued {
        id: String,
        by: String,
        exp: u64,
        #[serde(default)]
        labels: Vec<String>,
    },
    Used {
        id: String,
        by: String,
    },
    Revoked {
        id: String,
        by: String,
        /// Set when the ledger did not know the token (issued before it kept one): the
        /// latest the token can expire, after which the entry is dropped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
}

struct State {
    entries: HashMap<String, TokenEntry>,
    /// Tokens a registration is using right now (not yet stored as used).
    pending: std::collections::HashSet<String>,
}

/// The ledger. Every method is safe to call from many requests at once; at most one
/// registration holds a token at a time.
pub struct Tokens {
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("path", &self.path).finish()
    }
}

/// The longest lifetime `POST /api/tokens` gives a token: 30 days.
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// Why a revoked token registers nothing.
pub(crate) const REVOKED: &str = "the registration token was revoked";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Tokens {
    /// Opens (or starts) the ledger at `path`. `legacy_used` names a file of used token
    /// ids, one per line, that earlier versions kept for agents; its ids count as used.
    /// A line that does not decode is an error naming the file and line: the ledger
    /// guards registrations and is not guessed at.
    pub fn open(path: &Path, legacy_used: Option<&Path>) -> Result<Tokens, String> {
        let mut entries: HashMap<String, TokenEntry> = HashMap::new();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let mut lines = 0usize;
        let count = text.lines().count();
        let mut torn = false;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            lines += 1;
            let parsed: Line = match serde_json::from_str(line) {
                Ok(l) => l,
                // A last line without its newline was cut off by a crash mid-write: the
                // request it belonged to never got its answer, so it is dropped (the
                // rewrite below removes it).
                Err(_) if n + 1 == count && !text.ends_with('\n') => {
                    torn = true;
                    continue;
                }
                Err(e) => return Err(format!("{} line {}: {e}", path.display(), n + 1)),
            };
            apply(&mut entries, parsed);
        }
        if let Some(legacy) = legacy_used
            && let Ok(t) = std::fs::read_to_string(legacy)
        {
            for id in t.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let e = entries.entry(id.to_string()).or_insert_with(|| unknown(id));
                if e.state == TokenState::Active {
                    e.state = TokenState::Used {
                        by: "an agent".into(),
                    };
                }
            }
        }
        let now = now_secs();
        let before = entries.len();
        // Unknown expiry (legacy entries) is kept; expired ones go.
        entries.retain(|_, e| e.expires_at == u64::MAX || e.expires_at > now);
        let tokens = Tokens {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                entries,
                pending: Default::default(),
            }),
        };
        if tokens.state.lock().expect("tokens").entries.len() < before || lines > before || torn {
            tokens.rewrite()?;
        }
        Ok(tokens)
    }

    /// Records a token just issued.
    pub fn issued(&self, claims: &RegistrationClaims) -> Result<(), String> {
        let line = Line::Issued {
            id: claims.jti.clone(),
            by: claims.iss.clone(),
            exp: claims.exp,
            labels: claims.labels.clone(),
        };
        let mut state = self.state.lock().expect("tokens");
        self.append(&line)?;
        apply(&mut state.entries, line);
        Ok(())
    }

    /// Why the token `id` may not register anything now, if it may not: used, revoked,
    /// or in use by a registration in progress. A token the ledger does not know (issued
    /// before it existed) may.
    pub fn check(&self, id: &str) -> Result<(), String> {
        let state = self.state.lock().expect("tokens");
        refusal(&state, id).map_or(Ok(()), Err)
    }

    /// Takes the token `id` for one registration: refused as [`Tokens::check`] refuses.
    /// The returned hold gives the token back when dropped, unless
    /// [`TokenHold::commit`] stored it as used.
    pub fn hold(&self, id: &str) -> Result<TokenHold<'_>, String> {
        let mut state = self.state.lock().expect("tokens");
        if let Some(why) = refusal(&state, id) {
            return Err(why);
        }
        state.pending.insert(id.to_string());
        Ok(TokenHold {
            tokens: self,
            id: id.to_string(),
            done: false,
        })
    }

    /// Revokes the token `id` (`by`: the admin). A used token can be revoked too
    /// (nothing changes for what it registered). A token the ledger does not know was
    /// issued before it kept one, or never: when `id` has the form of a token id (a
    /// UUID) its revocation is recorded all the same, kept until the longest lifetime a
    /// token can have ([`MAX_TOKEN_TTL_SECS`]) has passed; `Ok(false)` for any other id.
    pub fn revoke(&self, id: &str, by: &str) -> Result<bool, String> {
        let mut state = self.state.lock().expect("tokens");
        let exp = match state.entries.get(id) {
            Some(e) if matches!(e.state, TokenState::Revoked { .. }) => return Ok(true),
            Some(_) => None,
            None if uuid::Uuid::parse_str(id).is_ok() => Some(now_secs() + MAX_TOKEN_TTL_SECS),
            None => return Ok(false),
        };
        let line = Line::Revoked {
            id: id.to_string(),
            by: by.to_string(),
            exp,
        };
        self.append(&line)?;
        apply(&mut state.entries, line);
        Ok(true)
    }

    /// The unexpired tokens, newest expiry first.
    pub fn list(&self) -> Vec<TokenEntry> {
        let now = now_secs();
        let state = self.state.lock().expect("tokens");
        let mut out: Vec<TokenEntry> = state
            .entries
            .values()
            .filter(|e| e.expires_at > now)
            .cloned()
            .collect();
        out.sort_by(|a, b| b.expires_at.cmp(&a.expires_at).then(a.id.cmp(&b.id)));
        out
    }

    /// One token's entry.
    pub fn get(&self, id: &str) -> Option<TokenEntry> {
        self.state.lock().expect("tokens").entries.get(id).cloned()
    }

    fn append(&self, line: &Line) -> Result<(), String> {
        let text = serde_json::to_string(line).map_err(|e| e.to_string())?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        writeln!(f, "{text}")
            .and_then(|_| f.sync_data())
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    /// Writes the ledger anew from memory (after dropping expired entries).
    fn rewrite(&self) -> Result<(), String> {
        let state = self.state.lock().expect("tokens");
        let mut text = String::new();
        for e in state.entries.values() {
            let mut lines = vec![Line::Issued {
                id: e.id.clone(),
                by: e.issued_by.clone(),
                exp: e.expires_at,
                labels: e.labels.clone(),
            }];
            match &e.state {
                TokenState::Active => {}
                TokenState::Used { by } => lines.push(Line::Used {
                    id: e.id.clone(),
                    by: by.clone(),
                }),
                TokenState::Revoked { by } => lines.push(Line::Revoked {
                    id: e.id.clone(),
                    by: by.clone(),
                    exp: None,
                }),
            }
            for l in lines {
                text.push_str(&serde_json::to_string(&l).map_err(|e| e.to_string())?);
                text.push('\n');
            }
        }
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

/// One registration's hold on a token; see [`Tokens::hold`].
#[derive(Debug)]
pub struct TokenHold<'a> {
    tokens: &'a Tokens,
    id: String,
    done: bool,
}

impl TokenHold<'_> {
    /// Stores the token as used by `by` (`runner <id>`, `agent <id>`), flushed to disk.
    pub fn commit(mut self, by: &str) -> Result<(), String> {
        let mut state = self.tokens.state.lock().expect("tokens");
        // Revoked while this registration ran: it registers nothing.
        if matches!(
            state.entries.get(&self.id).map(|e| &e.state),
            Some(TokenState::Revoked { .. })
        ) {
            state.pending.remove(&self.id);
            self.done = true;
            return Err(REVOKED.into());
        }
        let line = Line::Used {
            id: self.id.clone(),
            by: by.to_string(),
        };
        let written = self.tokens.append(&line);
        state.pending.remove(&self.id);
        self.done = true;
        written?;
        apply(&mut state.entries, line);
        Ok(())
    }
}

impl Drop for TokenHold<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.tokens
                .state
                .lock()
                .expect("tokens")
                .pending
                .remove(&self.id);
        }
    }
}

fn unknown(id: &str) -> TokenEntry {
    TokenEntry {
        id: id.to_string(),
        issued_by: "unknown".into(),
        expires_at: u64::MAX,
        labels: Vec::new(),
        state: TokenState::Active,
    }
}

fn apply(entries: &mut HashMap<String, TokenEntry>, line: Line) {
    match line {
        Line::Issued {
            id,
            by,
            exp,
            labels,
        } => {
            let e = entries.entry(id.clone()).or_insert_with(|| unknown(&id));
            e.issued_by = by;
            e.expires_at = exp;
            e.labels = labels;
        }
        Line::Used { id, by } => {
            let e = entries.entry(id.clone()).or_insert_with(|| unknown(&id));
            // A revocation stays a revocation.
            if !matches!(e.state, TokenState::Revoked { .. }) {
                e.state = TokenState::Used { by };
            }
        }
        Line::Revoked { id, by, exp } => {
            let e = entries.entry(id.clone()).or_insert_with(|| unknown(&id));
            if let Some(exp) = exp
                && e.expires_at == u64::MAX
            {
                e.expires_at = exp;
            }
            e.state = TokenState::Revoked { by };
        }
    }
}

fn refusal(state: &State, id: &str) -> Option<String> {
    match state.entries.get(id).map(|e| &e.state) {
        Some(TokenState::Used { by }) => Some(format!(
            "the registration token was already used (it registered {by})"
        )),
        Some(TokenState::Revoked { .. }) => Some(REVOKED.into()),
        _ if state.pending.contains(id) => {
            Some("the registration token is being used by another registration".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(id: &str, exp: u64) -> RegistrationClaims {
        RegistrationClaims {
            jti: id.into(),
            sub: "runner-registration".into(),
            exp,
            iat: 0,
            iss: "key:admin".into(),
            labels: vec!["x".into()],
        }
    }

    #[test]
    fn one_use_revocation_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let later = now_secs() + 3600;
        let t = Tokens::open(&path, None).unwrap();
        for id in ["a", "b", "c"] {
            t.issued(&claims(id, later)).unwrap();
        }
        t.issued(&claims("old", now_secs() - 1)).unwrap();
        // One registration at a time holds a token; a failed one gives it back.
        let hold = t.hold("a").unwrap();
        assert!(t.hold("a").unwrap_err().contains("another registration"));
        drop(hold);
        // A revocation during a registration stops it.
        t.issued(&claims("d", later)).unwrap();
        let hold = t.hold("d").unwrap();
        assert!(t.revoke("d", "key:admin").unwrap());
        assert!(hold.commit("runner r0").unwrap_err().contains("revoked"));
        assert!(t.check("d").unwrap_err().contains("revoked"));
        t.hold("a").unwrap().commit("runner r1").unwrap();
        let e = t.check("a").unwrap_err();
        assert!(e.contains("already used") && e.contains("runner r1"), "{e}");
        assert!(t.revoke("b", "key:admin").unwrap());
        assert!(t.check("b").unwrap_err().contains("revoked"));
        assert!(!t.revoke("nope", "key:admin").unwrap());
        t.check("c").unwrap();
        // Unknown tokens (issued before the ledger) may register.
        t.check("never-seen").unwrap();
        drop(t);

        // After a restart: the same answers, and the expired entry is gone.
        let t = Tokens::open(&path, None).unwrap();
        assert!(t.check("a").unwrap_err().contains("already used"));
        assert!(t.check("b").unwrap_err().contains("revoked"));
        t.check("c").unwrap();
        assert!(t.get("old").is_none());
        let listed: Vec<String> = t.list().into_iter().map(|e| e.id).collect();
        assert_eq!(listed, ["a", "b", "c", "d"]);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            7,
            "rewritten without the expired token: 4 issued, 1 used, 2 revoked"
        );

        // A line cut off by a crash (the last, without its newline) is dropped; a damaged
        // one stops the start, naming the line.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"op\":\"revoked\",\"id\":\"c");
        std::fs::write(&path, &text).unwrap();
        let t = Tokens::open(&path, None).unwrap();
        t.check("c").unwrap();
        drop(t);
        std::fs::write(&path, "{\"op\":\"issued\"}\n").unwrap();
        let e = Tokens::open(&path, None).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn legacy_used_ids_stay_used() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("used-tokens");
        std::fs::write(&legacy, "t1\nt2\n").unwrap();
        let t = Tokens::open(&dir.path().join("tokens"), Some(&legacy)).unwrap();
        assert!(t.check("t1").unwrap_err().contains("already used"));
        assert!(t.check("t2").is_err());
        t.check("t3").unwrap();
    }

    // A token issued before the ledger existed is in no entry; revoking its id (a UUID)
    // still refuses it, after a restart too, and the entry goes once no token issued
    // then can be valid any more.
    #[test]
    fn a_token_the_ledger_never_saw_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let old = uuid::Uuid::new_v4().to_string();
        let t = Tokens::open(&path, None).unwrap();
        t.check(&old).unwrap();
        assert!(t.revoke(&old, "key:admin").unwrap());
        assert!(t.check(&old).unwrap_err().contains("revoked"));
        assert!(t.hold(&old).unwrap_err().contains("revoked"));
        let entry = t.get(&old).unwrap();
        let kept = entry.expires_at.saturating_sub(now_secs());
        assert!(
            (MAX_TOKEN_TTL_SECS - 60..=MAX_TOKEN_TTL_SECS).contains(&kept),
            "kept for {kept} s"
        );
        drop(t);
        let t = Tokens::open(&path, None).unwrap();
        assert!(t.check(&old).unwrap_err().contains("revoked"));
        drop(t);
        // Past that lifetime the entry is dropped when the ledger is opened.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(&format!("\"exp\":{}", entry.expires_at), "\"exp\":1");
        assert!(text.contains("\"exp\":1"), "{text}");
        std::fs::write(&path, text).unwrap();
        assert!(Tokens::open(&path, None).unwrap().get(&old).is_none());
        // An id that cannot be a token's is not recorded.
        let t = Tokens::open(&path, None).unwrap();
        assert!(!t.revoke("not-a-token-id", "key:admin").unwrap());
        assert!(t.get("not-a-token-id").is_none());
    }
}
