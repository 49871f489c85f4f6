//! API keys, roles, registration tokens and per-key rate limits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a caller may do. Each role includes the ones listed after it, except `runner`,
/// which may only register runners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including registration tokens and the audit log.
    Admin,
    /// Runners (drain, resume, delete, health) and any job.
    Operator,
    /// Submits jobs and cancels its own.
    Submitter,
    /// Reads jobs, logs and runners.
    Viewer,
    /// A runner registering itself with a registration token.
    Runner,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
            Role::Runner => "runner",
        }
    }

    /// True when this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Runner, Role::Runner) => true,
            (Role::Runner, _) => false,
            (Role::Admin, _) => true,
            (_, Role::Runner) => false,
            (have, need) => have <= need,
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Name for the audit log (`key:<name>` or `token:<id>`).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Labels a registration token grants the runner it registers.
    pub token_labels: Vec<String>,
    /// The registration token's id, when the caller presented one.
    pub token_id: Option<String>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The claims of a registration token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistrationClaims {
    /// Token id.
    pub jti: String,
    /// Always `runner-registration`.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    pub iat: u64,
    /// Who created it.
    pub iss: String,
    /// Labels the registered runner gets in addition to its own.
    #[serde(default)]
    pub labels: Vec<String>,
}

const TOKEN_SUBJECT: &str = "runner-registration";

/// The keys the server accepts and the secret that signs registration tokens.
pub struct Keys {
    by_digest: HashMap<[u8; 32], (String, Role)>,
    signing: EncodingKey,
    verifying: DecodingKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("keys", &self.by_digest.len())
            .finish()
    }
}

/// A new random secret: two random (version 4) UUIDs, 244 random bits from the OS, as
/// 64 hex digits.
pub fn random_secret() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

/// Reads a secret file, or creates it (mode 0600) with a fresh secret. Returns the secret
/// and whether it was created now.
pub fn load_or_create_secret(path: &Path) -> std::io::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret = random_secret();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok((secret, true))
}

impl Keys {
    /// Keys from `(name, key, role)` triples, signing tokens with `secret`.
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str, Role)>, secret: &str) -> Self {
        Keys {
            by_digest: keys
                .into_iter()
                .map(|(name, key, role)| (digest(key), (name.to_string(), role)))
                .collect(),
            signing: EncodingKey::from_secret(secret.as_bytes()),
            verifying: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// Who presents `credential` (an API key or a registration token), or why nobody.
    pub fn authenticate(&self, credential: &str) -> Result<Principal, String> {
        if let Some((name, role)) = self.by_digest.get(&digest(credential)) {
            return Ok(Principal {
                name: format!("key:{name}"),
                role: *role,
                token_labels: Vec::new(),
                token_id: None,
            });
        }
        if credential.split('.').count() == 3 {
            let claims = self.verify_token(credential)?;
            return Ok(Principal {
                name: format!("token:{}", claims.jti),
                role: Role::Runner,
                token_labels: claims.labels,
                token_id: Some(claims.jti),
            });
        }
        Err("the API key is not valid".into())
    }

    /// Creates a registration token valid for `ttl`.
    pub fn issue_token(
        &self,
        issuer: &str,
        ttl: Duration,
        labels: Vec<String>,
    ) -> Result<(String, RegistrationClaims), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = RegistrationClaims {
            jti: uuid::Uuid::new_v4().to_string(),
            sub: TOKEN_SUBJECT.into(),
            exp: now + ttl.as_secs().max(1),
            iat: now,
            iss: issuer.to_string(),
            labels,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.signing)
            .map_err(|e| format!("signing the token: {e}"))?;
        Ok((token, claims))
    }

    /// The claims of a valid, unexpired registration token, or why it is not one.
    pub fn verify_token(&self, token: &str) -> Result<RegistrationClaims, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.sub = Some(TOKEN_SUBJECT.into());
        jsonwebtoken::decode::<RegistrationClaims>(token, &self.verifying, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    "the registration token has expired".to_string()
                }
                _ => format!("the registration token is not valid ({e})"),
            })
    }
}

/// Token buckets per caller: `rate` requests per second on average, `burst` at once.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limiter.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `who`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, who: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter");
        if buckets.len() > 100_000 {
            // Forget full buckets rather than grow without bound.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(who.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::try_from_secs_f64((1.0 - *tokens) / self.rate).unwrap_or(Duration::MAX))
        }
    }
}
