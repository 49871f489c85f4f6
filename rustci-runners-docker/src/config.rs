//! The Docker runner's configuration: the engine to reach, image policy, container
//! settings and the warm pool.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use rustci_runners::backend::{BackendConfig, ConfigBackend, RunnerSettings};
use rustci_runners::{Error, Runner};
use serde::Deserialize;

use crate::DockerRunner;

pub use rustci_runners::backend::PullPolicy;

/// How to reach the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Engine {
    /// `DOCKER_HOST` if set (with `DOCKER_TLS_VERIFY` and `DOCKER_CERT_PATH` for TLS, as
    /// the docker CLI reads them), else the local socket (default). A `tcp://` host counts
    /// as remote: workspaces are volumes on the engine.
    #[default]
    Local,
    /// The engine listening on this Unix socket.
    Socket(PathBuf),
    /// A remote engine over TCP with TLS client certificates (how a Docker-in-Docker
    /// engine is reached). Workspaces are volumes on that engine.
    Tls {
        /// `tcp://host:port` or `host:port`.
        address: String,
        /// CA certificate (PEM) that signed the engine's certificate.
        ca: PathBuf,
        /// Client certificate (PEM).
        cert: PathBuf,
        /// Client key (PEM).
        key: PathBuf,
    },
}

/// Registry credentials for pulls.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
    /// Registry address, e.g. `registry.example.com`.
    pub server: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"***")
            .field("server", &self.server)
            .finish()
    }
}

/// Configuration of a [`DockerRunner`].
///
/// As a runner's `docker:` section in the server's configuration (or
/// `POST /api/runners`), every field but `name`, `labels`, `max_concurrency` and
/// `workspace_root` (which come from the runner's common settings) may be given; absent
/// fields keep their defaults and unknown ones are refused:
///
/// ```yaml
/// runners:
///   - name: containers
///     kind: docker
///     slots: 8
///     docker:
///       engine: {tls: {address: "tcp://10.0.0.5:2376", ca: ca.pem, cert: cert.pem, key: key.pem}}
///       pull_policy: never             # always | if-not-present | never
///       default_image: "busybox:1.36"
///       network_mode: none
///       termination_grace: 5s
///       warm_pool: {images: ["busybox:1.36"], size: 2, idle_timeout: 10m}
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DockerConfig {
    /// Runner name; the start-up sweep removes containers of a dead owner with this name.
    #[serde(skip)]
    pub name: String,
    /// A fixed runner id (a registration restored after a restart keeps its id); a new
    /// one when `None`.
    #[serde(skip)]
    pub id: Option<String>,
    /// Labels jobs can ask for.
    #[serde(skip)]
    pub labels: Vec<String>,
    /// The engine.
    pub engine: Engine,
    /// Pull policy. Default [`PullPolicy::IfNotPresent`].
    pub pull_policy: PullPolicy,
    /// Registry credentials for pulls.
    pub registry_auth: Option<RegistryAuth>,
    /// Image for jobs that name none; without it such jobs are refused.
    pub default_image: Option<String>,
    /// Network mode of job containers (`bridge`, `none`, `host`, a network name). Default
    /// `bridge`.
    pub network_mode: String,
    /// Run job containers privileged. Default false.
    pub privileged: bool,
    /// With `privileged`, the images that may run privileged (references as the jobs
    /// give them; a reference without a tag means `:latest`); a job with another image
    /// runs unprivileged. Empty (default): every image, when `privileged` is on.
    pub allowed_privileged_images: Vec<String>,
    /// Read-only root file system (the workspace stays writable). Default false.
    pub read_only_rootfs: bool,
    /// Capabilities to drop (e.g. `ALL`). Default none.
    pub cap_drop: Vec<String>,
    /// User to run steps as (`uid[:gid]` or a name in the image). Default the image's.
    pub user: Option<String>,
    /// Directory on the runner's host for workspaces (local engine). Default
    /// `$TMPDIR/rustci-docker`.
    #[serde(skip)]
    pub workspace_root: PathBuf,
    /// Time between SIGTERM and SIGKILL. Default 10 s.
    #[serde(with = "rustci_runners::job::units::serde_duration")]
    pub termination_grace: Duration,
    /// Output kept per job. Default 512 MiB.
    #[serde(with = "rustci_runners::job::units::serde_size")]
    pub max_output_bytes: u64,
    /// Most jobs at once. Default none.
    #[serde(skip)]
    pub max_concurrency: Option<usize>,
    /// Events that may wait unread. Default 64.
    pub event_buffer: usize,
    /// Pre-started containers for fast starts. Default none.
    pub warm_pool: Option<WarmPool>,
}

/// A pool of pre-started containers per image.
///
/// A job whose image has a warm container and that asks for no `resources` of its own
/// starts by executing its steps in that container, which skips container creation and
/// start (the bulk of a cold job's latency). The container is discarded after the job,
/// in the background, and a new one is started to replace it. Warm containers carry the
/// label `rustci.job=warm-…` (they exist before their job); the job's id is in every step's
/// environment. Containers idle for longer than `idle_timeout` are removed and only
/// replaced when the image is used again.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WarmPool {
    /// Images to keep warm.
    pub images: Vec<String>,
    /// Warm containers per image (at most 64).
    pub size: usize,
    /// How long a warm container may wait for a job (default 10 minutes).
    #[serde(
        default = "default_idle_timeout",
        with = "rustci_runners::job::units::serde_duration"
    )]
    pub idle_timeout: Duration,
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}

impl WarmPool {
    /// `size` warm containers for each of `images`, reaped after 10 idle minutes.
    pub fn new(images: impl IntoIterator<Item = impl Into<String>>, size: usize) -> Self {
        WarmPool {
            images: images.into_iter().map(Into::into).collect(),
            size: size.min(64),
            idle_timeout: default_idle_timeout(),
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            name: "docker".into(),
            id: None,
            labels: Vec::new(),
            engine: Engine::Local,
            pull_policy: PullPolicy::IfNotPresent,
            registry_auth: None,
            default_image: None,
            network_mode: "bridge".into(),
            privileged: false,
            allowed_privileged_images: Vec::new(),
            read_only_rootfs: false,
            cap_drop: Vec::new(),
            user: None,
            workspace_root: std::env::temp_dir().join("rustci-docker"),
            termination_grace: Duration::from_secs(10),
            max_output_bytes: 512 << 20,
            max_concurrency: None,
            event_buffer: 64,
            warm_pool: None,
        }
    }
}

impl DockerConfig {
    /// Checks what can be checked without an engine: the warm pool's size and image
    /// references, the TLS files, the network mode. [`DockerRunner::connect`] runs it
    /// first.
    ///
    /// [`DockerRunner::connect`]: crate::DockerRunner::connect
    pub fn check(&self) -> Result<(), Error> {
        if let Engine::Tls { ca, cert, key, .. } = &self.engine {
            for (what, path) in [
                ("CA certificate", ca),
                ("client certificate", cert),
                ("client key", key),
            ] {
                if !path.is_file() {
                    return Err(Error::invalid_config(format!(
                        "{what} {} does not exist",
                        path.display()
                    )));
                }
            }
        }
        if self.network_mode.is_empty() {
            return Err(Error::invalid_config("network_mode: must not be empty"));
        }
        if let Some(pool) = &self.warm_pool {
            if pool.size > 64 {
                return Err(Error::invalid_config(format!(
                    "warm_pool.size: {} is more than 64",
                    pool.size
                )));
            }
            for image in &pool.images {
                crate::image::check_image_reference(image)
                    .map_err(|e| Error::invalid_config(format!("warm_pool.images: {e}")))?;
            }
        }
        for image in &self.allowed_privileged_images {
            crate::image::check_image_reference(image)
                .map_err(|e| Error::invalid_config(format!("allowed_privileged_images: {e}")))?;
        }
        if let Some(image) = &self.default_image {
            crate::image::check_image_reference(image)
                .map_err(|e| Error::invalid_config(format!("default_image: {e}")))?;
        }
        Ok(())
    }
}

/// The kind name of Docker runners in configuration: `docker`.
pub const KIND: &str = "docker";

/// Builds [`DockerRunner`]s from a runner's settings and its `docker:` section (a
/// [`DockerConfig`]); register `DockerBackend::new()` in a [`rustci_runners::Backends`].
pub type DockerBackend = ConfigBackend<DockerConfig>;

#[async_trait]
impl BackendConfig for DockerConfig {
    const KIND: &'static str = KIND;

    fn apply(&mut self, settings: &RunnerSettings) -> Result<(), Error> {
        self.name = settings.name.clone();
        self.id = settings.id.clone();
        self.labels = settings.labels.clone();
        self.max_concurrency = Some(settings.slots_or_default());
        if let Some(root) = &settings.workspace_root {
            self.workspace_root = root.clone();
        }
        Ok(())
    }

    fn check(&self) -> Result<(), Error> {
        DockerConfig::check(self)
    }

    async fn connect(self) -> Result<Arc<dyn Runner>, Error> {
        Ok(Arc::new(DockerRunner::connect(self).await?))
    }
}
