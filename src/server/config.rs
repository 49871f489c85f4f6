//! Server settings: defaults, then a config file (TOML or YAML), then `RUSTCI_*`
//! environment variables, then command-line flags — each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::auth::Role;

/// Everything the server can be told.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Directory for the database, job logs and generated secrets. Default `./rustci-data`.
    pub data_dir: PathBuf,
    /// The admin API key. When neither this nor any `api_keys` entry with role admin is
    /// set, one is generated on first start, stored in the data directory and printed once.
    pub admin_key: Option<String>,
    /// Further API keys.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Runners started with the server; when empty and `default_runners` is on, a local
    /// and a native runner (and a Docker runner when the `docker` feature is on and an
    /// engine answers).
    pub runners: Vec<RunnerConfig>,
    /// Start the default runners when `runners` is empty. Default true; false starts
    /// with no runner (runners then come only from registrations).
    pub default_runners: bool,
    /// Largest request body, in bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Requests per second each key (or each client address, before authentication) may
    /// make on average. Default 50.
    pub rate_limit_per_second: f64,
    /// Requests a key may make at once above the average. Default 100.
    pub rate_limit_burst: f64,
    /// Longest time a request may take to be answered (streams excepted), in seconds.
    /// Default 30.
    pub request_timeout_secs: u64,
    /// On shutdown, how long running jobs may go on before they are cancelled, in
    /// seconds. Default 30.
    pub shutdown_grace_secs: u64,
    /// How often runner health is checked, in seconds. Default 10.
    pub health_interval_secs: u64,
    /// The runner kinds a registration token may register (with their defaults only:
    /// a kind's own section and `workspace_root` are for admins). Default `local`,
    /// `native` and `docker` (the local engine, as the default Docker runner uses);
    /// `kubernetes` is left out because its default configuration reaches the cluster
    /// with the server's own credentials.
    pub registration_kinds: Vec<String>,
    /// Address the Valkyrie listener for remote agents binds (gRPC with TLS, client
    /// certificates after registration), e.g. `0.0.0.0:8443`. Its own port, so that its
    /// TLS policy (client certificates) and its long-lived streams stay apart from the
    /// HTTP API. Default: none (no agents).
    pub agent_listen: Option<SocketAddr>,
    /// Host names and addresses the generated server certificate names besides
    /// `rustci-control-plane` (agents verify that fixed name), `localhost`, `127.0.0.1`
    /// and the listen addresses. Default: none.
    pub tls_names: Vec<String>,
    /// Serve the HTTP API over plain HTTP instead of HTTPS. Refused unless `listen` is a
    /// loopback address. Default false.
    pub plain_http: bool,
    /// The API listener's own certificate chain (PEM, leaf first) instead of the one the
    /// data directory's CA issues; needs `tls_key`. Agents keep the generated one (they
    /// pin the data directory's CA). Default: none.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Agents' least heartbeat interval in milliseconds (it grows with the number of
    /// agents; see docs/valkyrie.md). Default 5000.
    pub agent_heartbeat_ms: u64,
    /// What the control plane waits beyond an agent's self-fence time before it gives
    /// the agent's jobs up, in milliseconds. Default 15000.
    pub agent_margin_ms: u64,
    /// After a restart, how long attempts of agents wait for their agent to reconnect,
    /// in seconds. Default 120.
    pub agent_restart_grace_secs: u64,
    /// How long an agent has to accept a job it is offered, in milliseconds: its local
    /// runner's start (an image pull included) must be done by then, or the offer is
    /// withdrawn and the attempt counts as a runner failure. Default 10000.
    pub agent_offer_timeout_ms: u64,
    /// How long a dashboard sign-in lasts, in seconds (at most 30 days). Default 28800
    /// (8 hours).
    pub session_ttl_secs: u64,
    /// The origin browsers reach the dashboard at when a proxy is in front of the
    /// server, e.g. `https://ci.example.com`: forms must come from it, and the session
    /// cookie is `Secure` when it is HTTPS. Default: the listener's scheme and the
    /// request's `Host`.
    pub public_origin: Option<String>,
    /// Networks (CIDR, e.g. `10.0.0.0/8`, `::1/128`) whose clients may read `/metrics`;
    /// any other gets 403 `AUTHORIZATION_FAILED`. Default: empty, any address.
    pub metrics_allow: Vec<ipnet::IpNet>,
    /// `/metrics` needs an API key (any role but `runner`), as the API routes do; a
    /// request without a valid one gets 401 `AUTHENTICATION_REQUIRED`. Default false.
    pub metrics_key_required: bool,
    /// Degradation detection: when a runner's start-up or runner-fault figures make it
    /// `degraded` (see [`rustci_control::DegradationOptions`] for every field and its
    /// default).
    pub degradation: rustci_control::DegradationOptions,
    /// Log, job and audit retention (see [`rustci_control::RetentionOptions`] for every
    /// field and its default): logs compressed after a day, deleted after 90 days, job
    /// records and audit entries after 365 days, a pass every 10 minutes.
    pub retention: rustci_control::RetentionOptions,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("rustci-data"),
            admin_key: None,
            api_keys: Vec::new(),
            runners: Vec::new(),
            default_runners: true,
            max_body_bytes: 1 << 20,
            rate_limit_per_second: 50.0,
            rate_limit_burst: 100.0,
            request_timeout_secs: 30,
            shutdown_grace_secs: 30,
            health_interval_secs: 10,
            registration_kinds: vec!["local".into(), "native".into(), "docker".into()],
            agent_listen: None,
            tls_names: Vec::new(),
            plain_http: false,
            tls_cert: None,
            tls_key: None,
            agent_heartbeat_ms: 5000,
            agent_margin_ms: 15000,
            agent_restart_grace_secs: 120,
            agent_offer_timeout_ms: 10_000,
            session_ttl_secs: 8 * 3600,
            public_origin: None,
            metrics_allow: Vec::new(),
            metrics_key_required: false,
            degradation: Default::default(),
            retention: Default::default(),
        }
    }
}

/// An API key and what it may do.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ApiKeyConfig {
    /// Name shown in the audit log.
    pub name: String,
    /// The key itself (at least 16 characters).
    pub key: String,
    /// Its role.
    pub role: Role,
}

/// A runner the server runs in process: the settings every kind has, and the kind's own
/// options in a section named after the kind (`docker: {...}`, `kubernetes: {...}`; see
/// each backend's configuration type). Any other field is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// Its name.
    pub name: String,
    /// A kind compiled into this server ([`crate::backends`]): `local`, `native`, and with
    /// their features `docker` and `kubernetes`.
    pub kind: String,
    /// Labels jobs can ask for.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Labels that reserve it for jobs asking for them.
    #[serde(default)]
    pub reserved_labels: Vec<String>,
    /// Most jobs at once. Default 4.
    #[serde(default, deserialize_with = "whole_number")]
    pub slots: Option<usize>,
    /// Directory under which host runners make job workspaces (default: the system's
    /// temporary directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_root: Option<std::path::PathBuf>,
    /// The kind's own section (at most one, keyed by the kind's name), and anything else
    /// the document had, which [`check_runner`] refuses.
    #[serde(flatten)]
    pub options: std::collections::BTreeMap<String, serde_json::Value>,
}

impl RunnerConfig {
    /// A runner description with default labels and slots.
    pub fn new(name: impl Into<String>, kind: impl Into<String>) -> Self {
        RunnerConfig {
            name: name.into(),
            kind: kind.into(),
            labels: Vec::new(),
            reserved_labels: Vec::new(),
            slots: None,
            workspace_root: None,
            options: Default::default(),
        }
    }

    /// The settings every kind has.
    pub fn settings(&self, id: Option<String>) -> rustci_runners::RunnerSettings {
        let mut s = rustci_runners::RunnerSettings::named(self.name.clone());
        s.id = id;
        s.labels = self.labels.clone();
        s.slots = self.slots;
        s.workspace_root = self.workspace_root.clone();
        s
    }

    /// The kind's own section (`null` when absent).
    pub fn kind_options(&self) -> serde_json::Value {
        self.options
            .get(&self.kind)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Deserializes an optional whole number, accepting JSON's `4.0` for `4`.
pub(crate) fn whole_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    let v: Option<serde_json::Value> = Option::deserialize(d)?;
    let Some(v) = v else { return Ok(None) };
    let n = v
        .as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9_007_199_254_740_992.0)
                .map(|f| f as u64)
        })
        .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number, found {v}")))?;
    T::try_from(n)
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{n} is too large")))
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Settings given on the command line (each `None` when absent).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Overrides {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--admin-key`.
    pub admin_key: Option<String>,
    /// `--agent-listen`.
    pub agent_listen: Option<SocketAddr>,
    /// `--tls-names`, added to the configured ones.
    pub tls_names: Vec<String>,
    /// `--plain-http`.
    pub plain_http: bool,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
}

impl ServerConfig {
    /// Reads a config file: TOML when it ends in `.toml`, YAML otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("reading config {}: {e}", path.display())))?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_saphyr::from_str(&text).map_err(|e| e.to_string())
        };
        let config: ServerConfig =
            parsed.map_err(|e| ConfigError(format!("config {}: {e}", path.display())))?;
        config.check()?;
        Ok(config)
    }

    /// Defaults, then the config file (from `overrides.config` or `RUSTCI_CONFIG`), then
    /// `env` (`RUSTCI_LISTEN`, `RUSTCI_DATA_DIR`, `RUSTCI_ADMIN_KEY`, `RUSTCI_PLAIN_HTTP`
    /// = `1`/`true`), then `overrides`.
    pub fn resolve(
        env: impl Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let file = overrides
            .config
            .clone()
            .or_else(|| env("RUSTCI_CONFIG").map(PathBuf::from));
        let mut config = match file {
            Some(path) => ServerConfig::from_file(&path)?,
            None => ServerConfig::default(),
        };
        let listen = overrides.listen.clone().or_else(|| env("RUSTCI_LISTEN"));
        if let Some(listen) = listen {
            config.listen = listen.parse().map_err(|e| {
                ConfigError(format!(
                    "listen address {listen:?}: {e} (expected e.g. 127.0.0.1:8080)"
                ))
            })?;
        }
        if let Some(dir) = overrides
            .data_dir
            .clone()
            .or_else(|| env("RUSTCI_DATA_DIR").map(PathBuf::from))
        {
            config.data_dir = dir;
        }
        if let Some(key) = overrides
            .admin_key
            .clone()
            .or_else(|| env("RUSTCI_ADMIN_KEY"))
        {
            config.admin_key = Some(key);
        }
        if let Some(a) = overrides.agent_listen {
            config.agent_listen = Some(a);
        }
        config.tls_names.extend(overrides.tls_names.iter().cloned());
        if overrides.plain_http
            || env("RUSTCI_PLAIN_HTTP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        {
            config.plain_http = true;
        }
        if overrides.tls_cert.is_some() {
            config.tls_cert = overrides.tls_cert.clone();
        }
        if overrides.tls_key.is_some() {
            config.tls_key = overrides.tls_key.clone();
        }
        config.check()?;
        Ok(config)
    }

    /// Checks every setting without starting anything (runners are checked by their
    /// backend, without connecting). Loading a configuration runs it.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_with(&crate::backends())
    }

    /// [`ServerConfig::check`] with runner kinds from `backends` (an embedding project's
    /// own kinds included).
    pub fn check_with(&self, backends: &rustci_runners::Backends) -> Result<(), ConfigError> {
        self.degradation.check().map_err(ConfigError)?;
        self.retention.check().map_err(ConfigError)?;
        let short = |k: &str| k.len() < 16;
        if self.admin_key.as_deref().is_some_and(short) {
            return Err(ConfigError(
                "admin_key: must be at least 16 characters".into(),
            ));
        }
        for (i, k) in self.api_keys.iter().enumerate() {
            if short(&k.key) {
                return Err(ConfigError(format!(
                    "api_keys[{i}] ({}): key must be at least 16 characters",
                    k.name
                )));
            }
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError("max_body_bytes: must be greater than 0".into()));
        }
        let rate_ok = self.rate_limit_per_second.is_finite() && self.rate_limit_per_second > 0.0;
        let burst_ok = self.rate_limit_burst.is_finite() && self.rate_limit_burst >= 1.0;
        if !rate_ok || !burst_ok {
            return Err(ConfigError(
                "rate_limit_per_second must be > 0 and rate_limit_burst >= 1".into(),
            ));
        }
        if self.plain_http && !self.listen.ip().is_loopback() {
            return Err(ConfigError(format!(
                "plain_http: refused for the non-loopback address {}: API keys would cross \
                 the network in clear (serve HTTPS, the default, or listen on 127.0.0.1)",
                self.listen
            )));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError(
                    "tls_cert and tls_key: give both or neither".into(),
                ));
            }
            (Some(_), Some(_)) if self.plain_http => {
                return Err(ConfigError(
                    "plain_http with tls_cert: choose one (plain HTTP uses no certificate)".into(),
                ));
            }
            _ => {}
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.runners.iter().enumerate() {
            check_runner_with(r, backends)
                .map_err(|e| ConfigError(format!("runners[{i}]: {e}")))?;
            if !names.insert(&r.name) {
                return Err(ConfigError(format!(
                    "runners[{i}]: name {:?} is used twice",
                    r.name
                )));
            }
        }
        Ok(())
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

/// Checks a runner description (name and kind).
pub fn check_runner(r: &RunnerConfig) -> Result<(), String> {
    check_runner_with(r, &crate::backends())
}

/// [`check_runner`] with runner kinds from `backends`.
pub fn check_runner_with(
    r: &RunnerConfig,
    backends: &rustci_runners::Backends,
) -> Result<(), String> {
    if r.name.is_empty()
        || r.name.len() > 64
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "name {:?}: 1 to 64 letters, digits, '-', '_' or '.'",
            r.name
        ));
    }
    if r.slots == Some(0) || r.slots.is_some_and(|s| s > 1024) {
        return Err("slots: 1 to 1024".into());
    }
    if let Some(other) = r.options.keys().find(|k| **k != r.kind) {
        return Err(format!(
            "unknown field `{other}`: a runner takes name, kind, labels, reserved_labels, \
             slots, workspace_root and a section named after its kind ({})",
            r.kind
        ));
    }
    backends
        .check(&r.kind, &r.settings(None), &r.kind_options())
        .map_err(|e| rustci_runners::error::Chain(&e).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("server.toml");
        std::fs::write(
            &toml,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/srv/rustci\"\nmax_body_bytes = 2048\n\n[[runners]]\nname = \"fast\"\nkind = \"native\"\nslots = 8\n",
        )
        .unwrap();
        let env = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        let mut flags = Overrides {
            config: Some(toml.clone()),
            ..Overrides::default()
        };
        let c = ServerConfig::resolve(env(&[]), &flags).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.data_dir, PathBuf::from("/srv/rustci"));
        assert_eq!(c.max_body_bytes, 2048);
        assert_eq!(c.runners[0].slots, Some(8));
        // The environment overrides the file; flags override both.
        let c = ServerConfig::resolve(
            env(&[
                ("RUSTCI_LISTEN", "127.0.0.1:9100"),
                ("RUSTCI_DATA_DIR", "/env"),
            ]),
            &flags,
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        flags.listen = Some("127.0.0.1:9200".into());
        let c = ServerConfig::resolve(env(&[("RUSTCI_LISTEN", "127.0.0.1:9100")]), &flags).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9200");

        // YAML too, found through RUSTCI_CONFIG.
        let yaml = dir.path().join("server.yaml");
        std::fs::write(&yaml, "listen: 127.0.0.1:9300\nrate_limit_burst: 5\n").unwrap();
        let c = ServerConfig::resolve(
            env(&[("RUSTCI_CONFIG", yaml.to_str().unwrap())]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9300");
        assert_eq!(c.rate_limit_burst, 5.0);
    }

    #[test]
    fn bad_settings_name_their_cause() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.yaml");
        std::fs::write(&f, "listen: 127.0.0.1:1\nlisten_port: 3\n").unwrap();
        let e = ServerConfig::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("listen_port"), "{e}");
        let mut flags = Overrides {
            listen: Some("not-an-address".into()),
            ..Overrides::default()
        };
        let e = ServerConfig::resolve(|_| None, &flags)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not-an-address"), "{e}");
        flags.listen = None;
        flags.admin_key = Some("short".into());
        let e = ServerConfig::resolve(|_| None, &flags)
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_key"), "{e}");
        std::fs::write(
            &f,
            "runners:\n  - {name: a, kind: local}\n  - {name: a, kind: native}\n",
        )
        .unwrap();
        let e = ServerConfig::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let plain = Overrides {
            plain_http: true,
            listen: Some("0.0.0.0:8080".into()),
            ..Overrides::default()
        };
        let e = ServerConfig::resolve(|_| None, &plain)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plain_http") && e.contains("0.0.0.0:8080"),
            "{e}"
        );
        // The environment's switch is the same setting.
        let e = ServerConfig::resolve(
            |k| match k {
                "RUSTCI_PLAIN_HTTP" => Some("true".into()),
                "RUSTCI_LISTEN" => Some("[::]:8080".into()),
                _ => None,
            },
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("non-loopback"), "{e}");
        let loopback = Overrides {
            plain_http: true,
            listen: Some("127.0.0.1:8080".into()),
            ..Overrides::default()
        };
        assert!(
            ServerConfig::resolve(|_| None, &loopback)
                .unwrap()
                .plain_http
        );
        // HTTPS is the default.
        assert!(!ServerConfig::default().plain_http);
        let half = Overrides {
            tls_cert: Some("/etc/cert.pem".into()),
            ..Overrides::default()
        };
        let e = ServerConfig::resolve(|_| None, &half)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_key"), "{e}");
    }
}
