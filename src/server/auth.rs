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
///
/// Memory is bounded and no call scans the table: buckets live in two generations of at
/// most `capacity` callers each. A caller is looked up in the current generation, then
/// in the previous one (and moved to the current); when the current one is full, it
/// becomes the previous one and the older one is dropped (outside the lock). So a
/// caller is forgotten (its bucket full again) only after `capacity` other callers came
/// while it made no request, and a flood of distinct callers holds at most
/// `2 × capacity` buckets.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    capacity: usize,
    table: Mutex<Generations>,
}

type Buckets = HashMap<String, (f64, Instant)>;

#[derive(Default)]
struct Generations {
    current: Buckets,
    previous: Buckets,
}

impl RateLimiter {
    /// Callers per generation of [`RateLimiter::new`].
    pub const DEFAULT_CAPACITY: usize = 50_000;

    /// A limiter keeping at most 2 × [`RateLimiter::DEFAULT_CAPACITY`] callers.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self::with_capacity(rate, burst, Self::DEFAULT_CAPACITY)
    }

    /// A limiter keeping at most `2 × capacity` callers (at least 1 per generation).
    pub fn with_capacity(rate: f64, burst: f64, capacity: usize) -> Self {
        RateLimiter {
            rate,
            burst,
            capacity: capacity.max(1),
            table: Mutex::new(Generations::default()),
        }
    }

    /// Takes one request from `who`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, who: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut dropped = None;
        let result = {
            let mut t = self.table.lock().expect("rate limiter");
            if !t.current.contains_key(who) {
                let known = t.previous.remove(who);
                if t.current.len() >= self.capacity {
                    let full = std::mem::take(&mut t.current);
                    dropped = Some(std::mem::replace(&mut t.previous, full));
                }
                t.current
                    .insert(who.to_string(), known.unwrap_or((self.burst, now)));
            }
            let (tokens, at) = t.current.get_mut(who).expect("inserted");
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
            *at = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                Ok(())
            } else {
                Err(Duration::try_from_secs_f64((1.0 - *tokens) / self.rate)
                    .unwrap_or(Duration::MAX))
            }
        };
        // The old generation is freed without the lock held.
        drop(dropped);
        result
    }

    /// Callers it holds a bucket for.
    pub fn len(&self) -> usize {
        let t = self.table.lock().expect("rate limiter");
        t.current.len() + t.previous.len()
    }

    /// True when it holds no bucket.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key a client address is rate-limited (and its failures counted) under: the
/// address itself for IPv4, its /64 network for IPv6 (one host commonly holds a whole
/// /64, so per-address buckets would not limit it).
pub fn client_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
    }
}

/// Failed authentications, audited so that a flood cannot write one row each: within a
/// window (a minute), the first failure of each source is recorded, up to
/// [`AuthFailures::SOURCES_PER_WINDOW`] sources; the source's further failures are
/// counted, and so are the failures of sources past that number. When the window ends
/// (at the next failure, or at [`AuthFailures::flush`], which the server calls every
/// window), each count becomes one summary entry. So a window writes at most
/// `2 × SOURCES_PER_WINDOW + 1` rows, whatever comes.
pub struct AuthFailures {
    window: Duration,
    state: Mutex<FailureWindow>,
}

struct FailureWindow {
    since: Instant,
    /// Sources recorded in this window, with their failures not recorded one by one.
    sources: HashMap<String, u64>,
    /// Failures of sources past [`AuthFailures::SOURCES_PER_WINDOW`].
    others: u64,
}

/// What [`AuthFailures::failed`] says to do with one failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureVerdict {
    /// Record it one by one.
    Record,
    /// Counted; recorded in the window's summary.
    Counted,
}

/// One summary entry of a window that ended: `count` failures of `source` (`None`: of
/// sources past the limit) not recorded one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureSummary {
    /// The source, or `None` for all sources past the limit together.
    pub source: Option<String>,
    /// Failures counted.
    pub count: u64,
}

impl Default for AuthFailures {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl AuthFailures {
    /// Sources recorded one by one per window.
    pub const SOURCES_PER_WINDOW: usize = 100;

    /// Counting in windows of `window`.
    pub fn new(window: Duration) -> Self {
        AuthFailures {
            window,
            state: Mutex::new(FailureWindow {
                since: Instant::now(),
                sources: HashMap::new(),
                others: 0,
            }),
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// One failure of `source` at `now`: whether to record it, and the summaries of a
    /// window that ended before it (to record first).
    pub fn failed(&self, source: &str, now: Instant) -> (FailureVerdict, Vec<FailureSummary>) {
        let mut w = self.state.lock().expect("auth failures");
        let summaries = Self::roll(&mut w, self.window, now);
        let verdict = if let Some(n) = w.sources.get_mut(source) {
            *n += 1;
            FailureVerdict::Counted
        } else if w.sources.len() < Self::SOURCES_PER_WINDOW {
            w.sources.insert(source.to_string(), 0);
            FailureVerdict::Record
        } else {
            w.others += 1;
            FailureVerdict::Counted
        };
        (verdict, summaries)
    }

    /// The summaries of the window if it ended by `now` (a new one starts then).
    pub fn flush(&self, now: Instant) -> Vec<FailureSummary> {
        Self::roll(
            &mut self.state.lock().expect("auth failures"),
            self.window,
            now,
        )
    }

    fn roll(w: &mut FailureWindow, window: Duration, now: Instant) -> Vec<FailureSummary> {
        if now.saturating_duration_since(w.since) < window {
            return Vec::new();
        }
        let mut out: Vec<FailureSummary> = w
            .sources
            .drain()
            .filter(|(_, n)| *n > 0)
            .map(|(source, count)| FailureSummary {
                source: Some(source),
                count,
            })
            .collect();
        out.sort_by(|a, b| a.source.cmp(&b.source));
        if w.others > 0 {
            out.push(FailureSummary {
                source: None,
                count: w.others,
            });
        }
        w.others = 0;
        w.since = now;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_callers_is_bounded_and_a_limited_caller_stays_limited() {
        // A rate too slow to refill during the test: only the buckets matter.
        let limiter = RateLimiter::with_capacity(0.001, 3.0, 1000);
        for _ in 0..3 {
            limiter.check("busy").unwrap();
        }
        assert!(limiter.check("busy").is_err());
        for i in 0..20_000 {
            limiter.check(&format!("flood-{i}")).unwrap();
            assert!(limiter.len() <= 2000, "bounded at {}", limiter.len());
            if i % 250 == 0 {
                assert!(limiter.check("busy").is_err(), "still limited after {i}");
            }
        }
        // A caller seen in the previous generation keeps its bucket.
        let limiter = RateLimiter::with_capacity(0.001, 2.0, 10);
        limiter.check("a").unwrap();
        limiter.check("a").unwrap();
        for i in 0..10 {
            limiter.check(&format!("b{i}")).unwrap();
        }
        assert!(limiter.check("a").is_err(), "moved across, still empty");
        // One not seen for two generations is forgotten: its bucket is full again.
        for i in 0..25 {
            limiter.check(&format!("c{i}")).unwrap();
        }
        limiter.check("a").unwrap();
        assert!(limiter.len() <= 20);
    }

    #[test]
    fn client_keys_group_ipv6_by_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), "2001:db8:1:2::/64");
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        assert_eq!(client_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
    }

    #[test]
    fn failures_are_recorded_once_per_source_and_window_then_summarised() {
        let f = AuthFailures::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(f.failed("a", t0), (FailureVerdict::Record, vec![]));
        for _ in 0..5 {
            assert_eq!(f.failed("a", t0).0, FailureVerdict::Counted);
        }
        assert_eq!(f.failed("b", t0).0, FailureVerdict::Record);
        for i in 0..AuthFailures::SOURCES_PER_WINDOW + 50 {
            f.failed(&format!("many-{i}"), t0);
        }
        assert!(
            f.flush(t0 + Duration::from_secs(59)).is_empty(),
            "not over yet"
        );
        // The next window starts with a's failure recorded again, after the summaries.
        let (verdict, summaries) = f.failed("a", t0 + Duration::from_secs(60));
        assert_eq!(verdict, FailureVerdict::Record);
        assert_eq!(
            summaries,
            vec![
                FailureSummary {
                    source: Some("a".into()),
                    count: 5
                },
                FailureSummary {
                    source: None,
                    count: 52
                },
            ],
            "b failed once (recorded); 98 of the many were recorded, 52 counted"
        );
        f.failed("a", t0 + Duration::from_secs(61));
        assert_eq!(
            f.flush(t0 + Duration::from_secs(120)),
            vec![FailureSummary {
                source: Some("a".into()),
                count: 1
            }]
        );
        assert!(f.flush(t0 + Duration::from_secs(500)).is_empty());
    }
}
