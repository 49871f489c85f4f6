//! The control-plane server: the control plane with a SQLite store and log files under a
//! data directory, in-process runners, and the HTTP API ([`router`]) with API keys,
//! roles, registration tokens, rate limits and Prometheus metrics.
//!
//! [`Server::start`] is what the `rustci-server` binary runs; an embedding project can
//! use it the same way, or build an [`App`] and mount [`router`] in its own axum app.

mod agents;
mod api;
mod auth;
mod config;
mod metrics;
mod openapi;
mod runners;
pub mod timeline;
mod tls;
mod tokens;
mod web;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustci_control::{ControlOptions, ControlPlane, RegisterOptions, SqliteStore};
use rustci_runners::select::SelectionEngine;
use tokio::net::TcpListener;

pub use api::{ApiError, App, RequestId, router};
pub use auth::{Keys, Principal, RateLimiter, RegistrationClaims, Role, load_or_create_secret};
pub use config::{
    ApiKeyConfig, ConfigError, Overrides, RunnerConfig, ServerConfig, check_runner,
    check_runner_with,
};
pub use metrics::Metrics;
pub use openapi::document as openapi_document;
pub use runners::{DEFAULT_SLOTS, RunnerFactory};
pub use tokens::{TokenEntry, TokenHold, TokenState, Tokens};
pub use web::{COOKIE as SESSION_COOKIE, CSP, Session, Sessions};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The data directory, store or a runner failed.
    #[error("{0}")]
    Runtime(String),
}

fn runtime(context: &str) -> impl FnOnce(String) -> ServerError + '_ {
    move |e| ServerError::Runtime(format!("{context}: {e}"))
}

/// A started server.
pub struct Server {
    app: Arc<App>,
    addr: SocketAddr,
    scheme: &'static str,
    ca_pem: Option<String>,
    agent_addr: Option<SocketAddr>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    admin_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

fn create_private_dir(path: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| {
            ServerError::Runtime(format!("creating data directory {}: {e}", path.display()))
        })
}

impl Server {
    /// Opens the data directory, starts the control plane and its runners, recovers
    /// what a previous run left, and starts serving on `config.listen` (port 0 picks a
    /// free port; see [`Server::addr`]).
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        Self::start_with(config, RunnerFactory::new()).await
    }

    /// [`Server::start`] with the runner kinds of `factory` (an embedding project adds
    /// its own kinds with [`RunnerFactory::with_backends`]).
    pub async fn start_with(
        config: ServerConfig,
        mut factory: RunnerFactory,
    ) -> Result<Server, ServerError> {
        // Embedders build the config themselves: the same checks as a loaded one.
        config.check_with(factory.backends())?;
        let data = config.data_dir.clone();
        create_private_dir(&data)?;
        // One server per data directory: a second one would take the first one's
        // running jobs for interrupted ones and stop them.
        let lock = lock_data_dir(&data)?;
        // Bound before anything starts, so a taken port fails the start cleanly.
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| runtime(&format!("listening on {}", config.listen))(e.to_string()))?;
        let agent_listener = match config.agent_listen {
            Some(a) => Some(
                rustci_runners_valkyrie::listen(a)
                    .map_err(|e| runtime(&format!("listening for agents on {a}"))(e.to_string()))?,
            ),
            None => None,
        };
        let store = SqliteStore::open(data.join("rustci.db")).map_err(|e| {
            runtime("opening the store")(rustci_runners::error::Chain(&e).to_string())
        })?;
        let (secret, _) = load_or_create_secret(&data.join("token.secret"))
            .map_err(|e| runtime("token secret")(e.to_string()))?;
        let mut admin_key_file = None;
        let mut keys: Vec<(String, String, Role)> = config
            .api_keys
            .iter()
            .map(|k| (k.name.clone(), k.key.clone(), k.role))
            .collect();
        match &config.admin_key {
            Some(k) => keys.push(("admin".into(), k.clone(), Role::Admin)),
            None if !keys.iter().any(|k| k.2 == Role::Admin) => {
                let path = data.join("admin.key");
                let (key, created) = load_or_create_secret(&path)
                    .map_err(|e| runtime("admin key")(e.to_string()))?;
                if created {
                    // Printed once, on the run that created it.
                    println!("rustci-server: generated admin API key: {key}");
                    println!(
                        "rustci-server: it is stored in {} and will not be shown again",
                        path.display()
                    );
                }
                admin_key_file = Some(path);
                keys.push(("admin".into(), key, Role::Admin));
            }
            None => {}
        }
        let keys = Keys::new(
            keys.iter().map(|(n, k, r)| (n.as_str(), k.as_str(), *r)),
            &secret,
        );
        let tokens = Arc::new(
            Tokens::open(
                &data.join("tokens"),
                Some(&data.join("valkyrie").join("used-tokens")),
            )
            .map_err(runtime("the registration-token ledger"))?,
        );
        let metrics = Arc::new(Metrics::new());
        let mut options = ControlOptions::durable(Arc::new(store), data.join("logs"));
        options.health_interval = Duration::from_secs(config.health_interval_secs.max(1));
        options.degradation = config.degradation.clone();
        options.retention = Some(config.retention.clone());
        options.observer = Some(metrics.clone());
        let plane =
            ControlPlane::with_options(SelectionEngine::default(), options).map_err(|e| {
                runtime("starting the control plane")(rustci_runners::error::Chain(&e).to_string())
            })?;
        // The certificate authority: it issues the API listener's certificate (unless the
        // user brings one) and the agents' identities.
        let tls_api = !config.plain_http;
        let needs_ca = config.agent_listen.is_some() || (tls_api && config.tls_cert.is_none());
        let mut authority = None;
        if needs_ca {
            let dir = data.join("pki");
            let (ca, created) = rustci_runners_valkyrie::pki::Authority::load_or_create(&dir)
                .map_err(|e| {
                    plane.shutdown();
                    runtime("the certificate authority")(e.to_string())
                })?;
            if created {
                // Printed once, on the run that created it, next to the admin key.
                println!(
                    "rustci-server: created a certificate authority in {}; its fingerprint (for --ca-fingerprint of `rustci` and `rustci agent`): {}",
                    dir.display(),
                    ca.fingerprint()
                );
            }
            authority = Some(ca);
        }
        let names = certificate_names(&config);
        let identity = match &authority {
            Some(ca) => Some(ca.server_identity(&names).map_err(|e| {
                plane.shutdown();
                runtime("the server certificate")(e.to_string())
            })?),
            None => None,
        };
        let ca_pem = authority.as_ref().map(|a| a.ca_pem().to_string());
        let tls = if !tls_api {
            None
        } else {
            let made = match (&config.tls_cert, &config.tls_key, &identity) {
                (Some(cert), Some(key), _) => tls::from_files(cert, key),
                (_, _, Some(id)) => tls::server_config(&id.chain_pem, &id.key_pem),
                _ => Err("no certificate for the API listener".to_string()),
            };
            match made {
                Ok(c) => Some(c),
                Err(e) => {
                    plane.shutdown();
                    return Err(runtime("HTTPS")(e));
                }
            }
        };
        // The hub comes before the runners: stored registrations of agents' runners are
        // rebuilt through it, and recovery may hand it their attempts.
        let hub = match (&agent_listener, authority) {
            (Some(_), Some(authority)) => {
                let hub = agents::hub(&config, &secret, &plane, authority, tokens.clone())
                    .map_err(|e| {
                        plane.shutdown();
                        ServerError::Runtime(e)
                    })?;
                hub.attach(plane.clone());
                factory.register(hub.backend());
                Some(hub)
            }
            _ => None,
        };
        let recovery = match start_runners(&plane, &factory, &config).await {
            Ok(()) => plane.recover().await.map_err(|e| {
                runtime("recovering jobs")(rustci_runners::error::Chain(&e).to_string())
            }),
            Err(e) => Err(e),
        };
        let recovery = match recovery {
            Ok(r) => r,
            Err(e) => {
                plane.shutdown();
                if let Some(h) = &hub {
                    h.shutdown();
                }
                return Err(e);
            }
        };
        if !recovery.requeued.is_empty() || !recovery.lost.is_empty() {
            tracing::info!(
                requeued = recovery.requeued.len(),
                lost = recovery.lost.len(),
                "recovered jobs of the previous run"
            );
        }
        let addr = listener
            .local_addr()
            .map_err(|e| runtime("listener")(e.to_string()))?;
        let mut agent_addr = None;
        if let (Some(hub), Some(l), Some(identity)) = (&hub, agent_listener, identity) {
            agent_addr = l.local_addr().ok();
            let serving = hub.clone();
            tokio::spawn(async move {
                if let Err(e) = serving.serve(l, identity).await {
                    tracing::error!(error = %e, "the agent listener failed");
                }
            });
            tracing::info!(addr = ?agent_addr, "listening for agents");
        }
        let sessions = Sessions::new(Duration::from_secs(config.session_ttl_secs.max(1)));
        let app = Arc::new(App {
            plane: plane.clone(),
            keys,
            tokens,
            limiter: RateLimiter::new(config.rate_limit_per_second, config.rate_limit_burst),
            auth_failures: auth::AuthFailures::default(),
            metrics,
            config,
            factory,
            hub,
            sessions,
        });
        // Failed authentications counted in a window that ended with no failure after
        // it are audited at its end.
        let weak = Arc::downgrade(&app);
        tokio::spawn(async move {
            let every = match weak.upgrade() {
                Some(app) => app.auth_failures.window(),
                None => return,
            };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(app) = weak.upgrade() else { return };
                let summaries = app.auth_failures.flush(std::time::Instant::now());
                if !summaries.is_empty() {
                    let app = app.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        api::audit_failure_summaries(&app, summaries)
                    })
                    .await;
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = router(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = match tls {
            Some(c) => ApiListener::Tls(tls::TlsListener::new(listener, c).map_err(|e| {
                app.plane.shutdown();
                runtime("listener")(e.to_string())
            })?),
            None => ApiListener::Plain(listener),
        };
        let task = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let shutdown = async move {
                let _ = stopped.await;
            };
            let served = match listener {
                ApiListener::Tls(l) => {
                    axum::serve(l.tap_io(|_| ()), service)
                        .with_graceful_shutdown(shutdown)
                        .await
                }
                ApiListener::Plain(l) => {
                    axum::serve(l, service)
                        .with_graceful_shutdown(shutdown)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the HTTP server failed");
            }
            drop(lock);
        });
        tracing::info!(%addr, "rustci-server listening");
        Ok(Server {
            app,
            addr,
            scheme,
            ca_pem,
            agent_addr,
            stop,
            task,
            admin_key_file,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's base URL: `https://ADDR`, or `http://ADDR` with `plain_http`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The data directory's CA certificate (PEM), which issued the API listener's
    /// certificate (unless `tls_cert` brought another) and the agents' identities; `None`
    /// when no CA is in use (plain HTTP or a brought certificate, and no agents).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The address the agent listener is bound to, when it has one.
    pub fn agent_addr(&self) -> Option<SocketAddr> {
        self.agent_addr
    }

    /// The shared state (control plane, keys, metrics).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The file holding the generated admin key, when one was generated.
    pub fn admin_key_file(&self) -> Option<&Path> {
        self.admin_key_file.as_deref()
    }

    /// Graceful shutdown: stops taking jobs, lets running ones finish until the
    /// configured grace period, cancels the rest, stops serving and returns when every
    /// state is stored.
    pub async fn shutdown(self) {
        let grace = Duration::from_secs(self.app.config.shutdown_grace_secs);
        let cancelled = self.app.plane.shutdown_gracefully(grace).await;
        if !cancelled.is_empty() {
            tracing::info!(
                cancelled = cancelled.len(),
                "cancelled jobs still running at the end of the grace period"
            );
        }
        if let Some(hub) = &self.app.hub {
            hub.shutdown();
        }
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    /// Serves until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signalled(self) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        tracing::info!("shutting down: running jobs get the grace period");
        self.shutdown().await;
    }
}

/// Logs to stderr at the level in `RUSTCI_LOG` (`error`, `warn`, `info` (default),
/// `debug`, `trace`). Every line about a job carries its `job_id`, every line about a
/// request its `request_id`.
pub fn init_logging() {
    let level = std::env::var("RUSTCI_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The API's listener: HTTPS by default, plain HTTP when configured.
enum ApiListener {
    Plain(TcpListener),
    Tls(tls::TlsListener),
}

/// The names the generated server certificate covers: the configured ones, the host's
/// name, `localhost`, the loopback addresses and the specific listen addresses.
fn certificate_names(config: &ServerConfig) -> Vec<String> {
    let mut names = config.tls_names.clone();
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
        && !h.is_empty()
    {
        names.push(h.to_string());
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    for a in [Some(config.listen), config.agent_listen]
        .into_iter()
        .flatten()
    {
        if !a.ip().is_unspecified() {
            names.push(a.ip().to_string());
        }
    }
    names
}

/// Takes an exclusive lock on `<data>/lock` for as long as the returned file lives.
fn lock_data_dir(data: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ServerError> {
    let path = data.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ServerError::Runtime(format!("opening {}: {e}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        ServerError::Runtime(format!(
            "data directory {} is in use by another rustci-server ({e})",
            data.display()
        ))
    })
}

/// Starts the configured runners (or the defaults) and the ones registered over the
/// API in an earlier run.
async fn start_runners(
    plane: &ControlPlane,
    factory: &RunnerFactory,
    config: &ServerConfig,
) -> Result<(), ServerError> {
    let configured = if config.runners.is_empty() && config.default_runners {
        default_runners().await
    } else {
        config.runners.clone()
    };
    for r in &configured {
        let runner = factory
            .build(r, Some(r.name.clone()))
            .await
            .map_err(|e| ServerError::Runtime(rustci_runners::error::Chain(&e).to_string()))?;
        let mut options = RegisterOptions::default();
        options.reserved_labels = r.reserved_labels.iter().cloned().collect();
        plane.register(runner, options);
    }
    let registered = plane.store().runners().map_err(|e| {
        runtime("reading runner registrations")(rustci_runners::error::Chain(&e).to_string())
    })?;
    for record in registered {
        let Ok(r) = serde_json::from_value::<RunnerConfig>(record.config.clone()) else {
            tracing::warn!(runner = %record.id, "a stored registration does not decode; skipped");
            continue;
        };
        match factory.build(&r, Some(record.id.clone())).await {
            Ok(runner) => {
                let mut options = RegisterOptions::default();
                options.reserved_labels = r.reserved_labels.iter().cloned().collect();
                plane.register(runner, options);
            }
            Err(e) => {
                tracing::warn!(runner = %record.id, error = %rustci_runners::error::Chain(&e), "a registered runner cannot start")
            }
        }
    }
    Ok(())
}

/// A local and a native runner, plus a Docker runner when the feature is on and an
/// engine answers.
async fn default_runners() -> Vec<RunnerConfig> {
    let out = vec![
        RunnerConfig::new("local", "local"),
        RunnerConfig::new("native", "native"),
    ];
    #[cfg(feature = "docker")]
    let out = {
        use rustci_runners::Runner;
        let mut out = out;
        let docker = rustci_runners_docker::DockerRunner::connect(
            rustci_runners_docker::DockerConfig::default(),
        )
        .await;
        if let Ok(d) = docker
            && d.health().await.is_usable()
        {
            out.push(RunnerConfig::new("docker", "docker"));
        }
        out
    };
    out
}
