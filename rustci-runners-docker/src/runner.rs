//! The Docker runner: configuration, engine connection, image policy, container and step
//! execution.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::StreamExt;
use rustci_runners::job::{Job, JobSpec, Resources, StepAction};
use rustci_runners::mask::SecretSet;
use rustci_runners::output::{OutputBudget, StreamWriter};
use rustci_runners::{
    Capabilities, Error, EventKind, Execution, ExecutionSink, Health, Isolation, JobId, Limit,
    Outcome, OutputStream, Runner, RunnerInfo, RunnerKind, SlotGuard, Slots, StepStatus,
};
use tokio::time::Instant;

/// Label on every container the runner creates: always `true`.
pub const LABEL_MANAGED: &str = "rustci.managed";
/// Label: the execution id of the job.
pub const LABEL_JOB: &str = "rustci.job";
/// Label: the runner's id.
pub const LABEL_RUNNER: &str = "rustci.runner";
/// Label: the runner's name (what the start-up sweep matches).
pub const LABEL_RUNNER_NAME: &str = "rustci.runner.name";
/// Label: `host/pid` of the process that owns the container.
pub const LABEL_OWNER: &str = "rustci.owner";

/// Where the workspace is mounted in every job container.
pub const WORKSPACE: &str = "/workspace";

/// First process of every job container: stays alive between steps, forwards SIGTERM to
/// every other process of the container.
/// How often an exec is checked for having exited while its output stays open.
const LEFTOVER_CHECK: Duration = Duration::from_millis(200);
/// How long to wait for output to end after SIGKILL before giving up on it.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

const KEEPALIVE: &str =
    "trap 'kill -TERM -1 2>/dev/null' TERM; while :; do sleep 86400 & wait $!; done";

/// When images are pulled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullPolicy {
    /// Before every job.
    Always,
    /// Only when the engine does not have the image (default).
    #[default]
    IfNotPresent,
    /// Never: a missing image is an error naming it.
    Never,
}

/// How to reach the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
#[derive(Clone, Default, PartialEq, Eq)]
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
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DockerConfig {
    /// Runner name; the start-up sweep removes containers of a dead owner with this name.
    pub name: String,
    /// Labels jobs can ask for.
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
    /// Read-only root file system (the workspace stays writable). Default false.
    pub read_only_rootfs: bool,
    /// Capabilities to drop (e.g. `ALL`). Default none.
    pub cap_drop: Vec<String>,
    /// User to run steps as (`uid[:gid]` or a name in the image). Default the image's.
    pub user: Option<String>,
    /// Directory on the runner's host for workspaces (local engine). Default
    /// `$TMPDIR/rustci-docker`.
    pub workspace_root: PathBuf,
    /// Time between SIGTERM and SIGKILL. Default 10 s.
    pub termination_grace: Duration,
    /// Output kept per job. Default 512 MiB.
    pub max_output_bytes: u64,
    /// Most jobs at once. Default none.
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
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmPool {
    /// Images to keep warm.
    pub images: Vec<String>,
    /// Warm containers per image (at most 64).
    pub size: usize,
    /// How long a warm container may wait for a job.
    pub idle_timeout: Duration,
}

impl WarmPool {
    /// `size` warm containers for each of `images`, reaped after 10 idle minutes.
    pub fn new(images: impl IntoIterator<Item = impl Into<String>>, size: usize) -> Self {
        WarmPool {
            images: images.into_iter().map(Into::into).collect(),
            size: size.min(64),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            name: "docker".into(),
            labels: Vec::new(),
            engine: Engine::Local,
            pull_policy: PullPolicy::IfNotPresent,
            registry_auth: None,
            default_image: None,
            network_mode: "bridge".into(),
            privileged: false,
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

/// Runs each job in its own container on a Docker engine.
pub struct DockerRunner {
    inner: Arc<Inner>,
}

struct Inner {
    docker: Docker,
    info: RunnerInfo,
    caps: Capabilities,
    config: DockerConfig,
    local: bool,
    running: Slots,
    owner: String,
    warm: std::sync::Mutex<WarmState>,
    warm_changed: tokio::sync::Notify,
    /// Background work (refills, discards) that `shutdown` waits for.
    tasks: tokio_util::task::TaskTracker,
}

/// The warm pool's bookkeeping, under one lock.
#[derive(Default)]
struct WarmState {
    /// Started containers per image, oldest first.
    ready: HashMap<String, Vec<WarmContainer>>,
    /// Containers being started per image.
    pending: HashMap<String, usize>,
    /// Set by shutdown or drop: nothing is added any more.
    closed: bool,
}

impl WarmState {
    fn close(&mut self) -> Vec<WarmContainer> {
        self.closed = true;
        self.ready.drain().flat_map(|(_, v)| v).collect()
    }
}

/// A started keep-alive container waiting for a job.
struct WarmContainer {
    id: String,
    cleanup: Cleanup,
    born: Instant,
}

fn unavailable(what: &str, e: bollard::errors::Error) -> Error {
    Error::Unavailable(format!("docker engine unavailable: {what}: {e}"))
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The registry host of an image reference (`docker.io` when it names none).
pub(crate) fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// The reference with `:latest` added when it has neither tag nor digest.
pub(crate) fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// Checks an image reference's syntax: `[registry/]name[:tag][@digest]`.
pub(crate) fn check_image_reference(image: &str) -> Result<(), String> {
    let bad = || format!("invalid image reference {image:?}");
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest
        && !d.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm.chars().all(|c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || matches!(c, '+' | '.' | '_' | '-')
                })
                && hex.len() >= 32
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, 'a'..='f'))
        })
    {
        return Err(bad());
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    let (last_name, tag) = match last.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (last, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || t.starts_with(['.', '-'])
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(bad());
    }
    let path_ok = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && !s.starts_with(['.', '_', '-'])
            && !s.ends_with(['.', '_', '-'])
            // Separators: one `.` or `_`, `__`, or any run of `-`; never mixed.
            && s.as_bytes().windows(2).all(|w| {
                let sep = |c: u8| matches!(c, b'.' | b'_' | b'-');
                !(sep(w[0]) && sep(w[1])) || (w[0] == w[1] && w[0] != b'.')
            })
    };
    let components: Vec<&str> = name.split('/').collect();
    for (i, c) in components.iter().enumerate() {
        let c = if i + 1 == components.len() {
            last_name
        } else {
            c
        };
        // The first component may be a registry host: letters, digits, dots and dashes,
        // with an optional port.
        let host_ok = |h: &str| {
            let (host, port) = h.split_once(':').unwrap_or((h, "0"));
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
                && !host.starts_with(['.', '-'])
                && !host.contains("..")
                && !port.is_empty()
                && port.len() <= 5
                && port.chars().all(|c| c.is_ascii_digit())
        };
        let registry = i == 0
            && components.len() > 1
            && (c.contains('.') || c.contains(':') || c == "localhost")
            && host_ok(c);
        if !(path_ok(c) || registry) {
            return Err(bad());
        }
    }
    Ok(())
}

/// Runs a single step as the container's own process (PID 1 is this `sh`): forwards
/// SIGTERM to every process, waits for the step, exits with its status. When it exits,
/// the kernel ends every other process of the container. As a background job of a
/// non-interactive shell, the step starts with SIGINT and SIGQUIT ignored.
const SINGLE_STEP: &str = "trap 'kill -TERM -1 2>/dev/null' TERM; \"$@\" & child=$!; \
    while :; do wait \"$child\"; code=$?; kill -0 \"$child\" 2>/dev/null || exit \"$code\"; done";

impl DockerRunner {
    /// Connects to the engine, checks it answers, reads its capabilities, removes
    /// containers left by a crashed owner of a runner with the same name, and starts the
    /// warm pool if one is configured.
    ///
    /// Fails with [`Error::Unavailable`] ("docker engine unavailable: …") when the engine
    /// cannot be reached, and [`Error::InvalidConfig`] for unusable settings.
    pub async fn connect(config: DockerConfig) -> Result<Self, Error> {
        let (docker, local) = match &config.engine {
            Engine::Local => (
                Docker::connect_with_defaults().map_err(|e| unavailable("cannot connect", e))?,
                std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://")),
            ),
            Engine::Socket(path) => (
                Docker::connect_with_unix(
                    &path.display().to_string(),
                    120,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| unavailable(&format!("cannot connect to {}", path.display()), e))?,
                true,
            ),
            Engine::Tls {
                address,
                ca,
                cert,
                key,
            } => {
                for (what, path) in [
                    ("CA certificate", ca),
                    ("client certificate", cert),
                    ("client key", key),
                ] {
                    if !path.is_file() {
                        return Err(Error::InvalidConfig(format!(
                            "{what} {} does not exist",
                            path.display()
                        )));
                    }
                }
                (
                    Docker::connect_with_ssl(
                        address,
                        key,
                        cert,
                        ca,
                        120,
                        bollard::API_DEFAULT_VERSION,
                    )
                    .map_err(|e| unavailable(&format!("cannot connect to {address}"), e))?,
                    false,
                )
            }
        };
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| {
                Error::Unavailable("docker engine unavailable: no answer within 10s".into())
            })?
            .map_err(|e| unavailable("version negotiation failed", e))?;
        let info = docker
            .info()
            .await
            .map_err(|e| unavailable("cannot read engine info", e))?;
        let mut caps = Capabilities::host(Isolation::Container);
        caps.command_steps = true;
        caps.images = true;
        caps.needs_image = config.default_image.is_none();
        caps.max_concurrency = config.max_concurrency;
        caps.termination_grace = config.termination_grace;
        caps.platform = format!(
            "{}/{}",
            info.os_type.clone().unwrap_or_else(|| "linux".into()),
            info.architecture.clone().unwrap_or_default()
        );
        if info.memory_limit.unwrap_or(false) {
            caps.limits.insert(Limit::Memory);
        }
        if info.pids_limit.unwrap_or(false) {
            caps.limits.insert(Limit::Pids);
        }
        if info.cpu_cfs_quota.unwrap_or(false) {
            caps.limits.insert(Limit::Cpus);
        }
        // Per-process limits through the container's ulimits, which every engine applies.
        caps.limits
            .extend([Limit::CpuTime, Limit::OpenFiles, Limit::FileSize]);
        caps.cpus = info.ncpu.map(|n| n as f64);
        caps.memory = info.mem_total.map(|m| m as u64);
        caps.gpus = info
            .runtimes
            .as_ref()
            .is_some_and(|r| r.contains_key("nvidia"))
            .into();
        let mut labels: BTreeSet<String> = config.labels.iter().cloned().collect();
        labels.insert(caps.platform.replace('/', "-"));
        labels.insert("docker".into());
        let mut runner_info = RunnerInfo::new(config.name.clone(), RunnerKind::Docker);
        runner_info.labels = labels;
        if local {
            std::fs::create_dir_all(&config.workspace_root).map_err(|e| {
                Error::InvalidConfig(format!(
                    "workspace root {} cannot be created: {e}",
                    config.workspace_root.display()
                ))
            })?;
        }
        if let Some(pool) = &config.warm_pool {
            for image in &pool.images {
                check_image_reference(image).map_err(Error::InvalidConfig)?;
            }
        }
        let inner = Arc::new(Inner {
            docker,
            info: runner_info,
            caps,
            config,
            local,
            running: Slots::new(),
            owner: rustci_runners::owner::owner_token(),
            warm: std::sync::Mutex::new(WarmState::default()),
            warm_changed: tokio::sync::Notify::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        inner.sweep().await;
        if let Some(pool) = inner.config.warm_pool.clone() {
            for image in &pool.images {
                inner.ensure_image(image).await?;
                inner.top_up(image);
            }
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(pool.idle_timeout / 2 + Duration::from_millis(1));
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { break };
                    inner.reap_idle(pool.idle_timeout).await;
                }
            });
        }
        Ok(DockerRunner { inner })
    }

    /// Removes containers of this runner's name whose owning process (on this host) is
    /// gone. Returns how many were removed.
    pub async fn sweep(&self) -> usize {
        self.inner.sweep().await
    }

    /// The configuration in use.
    pub fn config(&self) -> &DockerConfig {
        &self.inner.config
    }

    /// Removes the warm containers and waits for background work (refills, discards of
    /// used warm containers) to finish. Jobs still running are not affected; call this
    /// when done with the runner, before the runtime goes away.
    pub async fn shutdown(&self) {
        let warm = self
            .inner
            .warm
            .lock()
            .map(|mut w| w.close())
            .unwrap_or_default();
        for w in warm {
            w.cleanup.run().await;
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Waits until every image of the warm pool has its full number of warm containers
    /// (returns at once without a pool).
    pub async fn warm_up(&self) {
        let Some(pool) = self.inner.config.warm_pool.clone() else {
            return;
        };
        loop {
            let notified = self.inner.warm_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pool.images.iter().all(|i| self.warm_ready(i) >= pool.size) {
                return;
            }
            // Starts what is missing (again, after a failed start), then waits for news.
            for image in &pool.images {
                self.inner.top_up(image);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Warm containers ready now for `image`.
    pub fn warm_ready(&self, image: &str) -> usize {
        self.inner
            .warm
            .lock()
            .expect("warm pool")
            .ready
            .get(image)
            .map_or(0, Vec::len)
    }
}

impl Drop for DockerRunner {
    /// Best effort without [`DockerRunner::shutdown`]: warm containers are removed in the
    /// background if a runtime is still there; the next start's sweep removes the rest.
    fn drop(&mut self) {
        let warm = self
            .inner
            .warm
            .lock()
            .map(|mut w| w.close())
            .unwrap_or_default();
        if warm.is_empty() {
            return;
        }
        // Cleanup's own drop removes each container (in the background when a runtime is
        // there); a crash leaves them to the next start's sweep.
        drop(warm);
    }
}

impl Inner {
    async fn sweep(&self) -> usize {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_RUNNER_NAME}={}", self.config.name),
            ],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(containers) = self.docker.list_containers(Some(options)).await else {
            return 0;
        };
        let host = self.owner.split('/').next().unwrap_or_default().to_string();
        let mut removed = 0;
        for c in containers {
            let owner = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_OWNER))
                .cloned()
                .unwrap_or_default();
            if rustci_runners::owner::owner_alive(&owner, &host).unwrap_or(true)
                || owner == self.owner
            {
                continue;
            }
            if let Some(id) = c.id {
                let job = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_JOB))
                    .cloned()
                    .unwrap_or_default();
                if remove_container(&self.docker, &id).await {
                    tracing::info!(container = %id, job_id = %job, "removed a container left by a crashed runner");
                    removed += 1;
                }
                if !self.local {
                    let _ = self
                        .docker
                        .remove_volume(
                            &format!("rustci-ws-{job}"),
                            None::<bollard::query_parameters::RemoveVolumeOptions>,
                        )
                        .await;
                } else {
                    let _ = std::fs::remove_dir_all(
                        self.config.workspace_root.join(format!("ws-{job}")),
                    );
                }
            }
        }
        removed
    }

    async fn ensure_image(&self, image: &str) -> Result<(), Error> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(unavailable(&format!("cannot inspect image {image}"), e)),
        };
        match (self.config.pull_policy, present) {
            (PullPolicy::Never, false) => Err(Error::Unavailable(format!(
                "image {image} is not on the engine and the pull policy is never"
            ))),
            (PullPolicy::Never, true) | (PullPolicy::IfNotPresent, true) => Ok(()),
            (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => {
                // Without a tag the engine would pull every tag of the repository.
                let reference = with_default_tag(image);
                let options = CreateImageOptionsBuilder::new()
                    .from_image(&reference)
                    .build();
                // Credentials go only to the registry they are for.
                let registry = registry_of(image);
                let credentials = self
                    .config
                    .registry_auth
                    .as_ref()
                    .filter(|a| {
                        a.server
                            .trim_start_matches("https://")
                            .trim_end_matches('/')
                            == registry
                    })
                    .map(|a| bollard::auth::DockerCredentials {
                        username: Some(a.username.clone()),
                        password: Some(a.password.clone()),
                        serveraddress: Some(a.server.clone()),
                        ..Default::default()
                    });
                let mut pull = self.docker.create_image(Some(options), None, credentials);
                while let Some(progress) = pull.next().await {
                    if let Err(e) = progress {
                        return Err(Error::Unavailable(format!(
                            "cannot pull image {image}: {e}"
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// A workspace for `key` (a job id or a warm container's name) and the cleanup that
    /// removes it; returns the bind specification.
    fn workspace(&self, key: &str) -> Result<(String, Cleanup), Error> {
        let mut cleanup = Cleanup {
            docker: self.docker.clone(),
            container: None,
            host_dir: None,
            volume: None,
        };
        if self.local {
            let dir = self.config.workspace_root.join(format!("ws-{key}"));
            std::fs::create_dir(&dir).map_err(|e| {
                Error::Unavailable(format!("cannot create workspace {}: {e}", dir.display()))
            })?;
            cleanup.host_dir = Some(dir.clone());
            if self.config.user.is_some() {
                // Steps run as another user than the runner's: let them write.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(
                    |e| {
                        Error::Unavailable(format!(
                            "cannot open workspace {} to the step user: {e}",
                            dir.display()
                        ))
                    },
                )?;
            }
            Ok((format!("{}:{WORKSPACE}", dir.display()), cleanup))
        } else {
            cleanup.volume = Some(format!("rustci-ws-{key}"));
            Ok((format!("rustci-ws-{key}:{WORKSPACE}"), cleanup))
        }
    }

    /// Creates (does not start) a job container.
    #[allow(clippy::too_many_arguments)]
    async fn create(
        &self,
        image: &str,
        key: &str,
        cmd: Vec<String>,
        env: Vec<String>,
        workdir: String,
        r: &Resources,
        cleanup: &mut Cleanup,
        bind: String,
    ) -> Result<String, Error> {
        let host_config = HostConfig {
            binds: Some(vec![bind]),
            network_mode: Some(self.config.network_mode.clone()),
            memory: r.memory.map(|m| m as i64),
            // Swap equal to memory: no swap on top of the limit.
            memory_swap: r.memory.map(|m| m as i64),
            nano_cpus: r.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: r.pids.map(|p| p as i64),
            privileged: Some(self.config.privileged),
            security_opt: (!self.config.privileged)
                .then(|| vec!["no-new-privileges:true".to_string()]),
            readonly_rootfs: Some(self.config.read_only_rootfs),
            cap_drop: (!self.config.cap_drop.is_empty()).then(|| self.config.cap_drop.clone()),
            ulimits: ulimits(r),
            ..Default::default()
        };
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_JOB.to_string(), key.to_string()),
            (LABEL_RUNNER.to_string(), self.info.id.clone()),
            (LABEL_RUNNER_NAME.to_string(), self.config.name.clone()),
            (LABEL_OWNER.to_string(), self.owner.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(cmd),
            entrypoint: Some(vec![]),
            labels: Some(labels),
            working_dir: Some(workdir),
            user: self.config.user.clone(),
            env: Some(env),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = format!("rustci-{key}");
        // By name, before the call: a create that succeeds on the engine but fails on the
        // way back is removed all the same.
        cleanup.container = Some(name.clone());
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                Error::Unavailable(format!("cannot create a container from {image}: {e}"))
            })?;
        cleanup.container = Some(created.id.clone());
        Ok(created.id)
    }

    async fn start_container(&self, id: &str, image: &str) -> Result<(), Error> {
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(|e| Error::Unavailable(format!("cannot start a container from {image}: {e}")))
    }

    /// A started keep-alive container for `image` with no job yet.
    async fn keepalive(
        &self,
        image: &str,
        key: &str,
        env: Vec<String>,
        r: &Resources,
    ) -> Result<(String, Cleanup), Error> {
        let (bind, mut cleanup) = self.workspace(key)?;
        let id = self
            .create(
                image,
                key,
                vec!["/bin/sh".into(), "-c".into(), KEEPALIVE.into()],
                env,
                WORKSPACE.into(),
                r,
                &mut cleanup,
                bind,
            )
            .await?;
        self.start_container(&id, image).await?;
        Ok((id, cleanup))
    }

    /// Starts, in the background, as many warm containers for `image` as the pool lacks
    /// (counting those already starting). Does nothing for images the pool does not keep.
    fn top_up(self: &Arc<Self>, image: &str) {
        let Some(pool) = &self.config.warm_pool else {
            return;
        };
        if !pool.images.iter().any(|i| i == image) {
            return;
        }
        let missing = {
            let mut warm = self.warm.lock().expect("warm pool");
            if warm.closed {
                return;
            }
            let have = warm.ready.get(image).map_or(0, Vec::len)
                + warm.pending.get(image).copied().unwrap_or(0);
            let missing = pool.size.saturating_sub(have);
            *warm.pending.entry(image.to_string()).or_default() += missing;
            missing
        };
        for _ in 0..missing {
            let inner = self.clone();
            let image = image.to_string();
            self.tasks.spawn(async move {
                let key = format!("warm-{}", JobId::new());
                let started = inner
                    .keepalive(&image, &key, Vec::new(), &Resources::default())
                    .await;
                let surplus = {
                    let mut warm = inner.warm.lock().expect("warm pool");
                    if let Some(p) = warm.pending.get_mut(&image) {
                        *p = p.saturating_sub(1);
                    }
                    match started {
                        Ok((id, cleanup)) if !warm.closed => {
                            warm.ready
                                .entry(image.clone())
                                .or_default()
                                .push(WarmContainer {
                                    id,
                                    cleanup,
                                    born: Instant::now(),
                                });
                            None
                        }
                        Ok((_, cleanup)) => Some(cleanup),
                        Err(e) => {
                            tracing::warn!(%image, error = %e, "cannot start a warm container");
                            None
                        }
                    }
                };
                if let Some(cleanup) = surplus {
                    cleanup.run().await;
                }
                inner.warm_changed.notify_waiters();
            });
        }
    }

    async fn reap_idle(&self, idle: Duration) {
        let expired: Vec<WarmContainer> = {
            let mut warm = self.warm.lock().expect("warm pool");
            let mut out = Vec::new();
            for list in warm.ready.values_mut() {
                let (old, young): (Vec<_>, Vec<_>) =
                    list.drain(..).partition(|w| w.born.elapsed() >= idle);
                *list = young;
                out.extend(old);
            }
            out
        };
        for w in expired {
            w.cleanup.run().await;
        }
    }

    /// The oldest warm container for `image` that is still running; dead ones are
    /// discarded.
    async fn take_warm(&self, image: &str) -> Option<WarmContainer> {
        loop {
            let candidate = {
                let mut warm = self.warm.lock().expect("warm pool");
                let list = warm.ready.get_mut(image)?;
                if list.is_empty() {
                    return None;
                }
                list.remove(0)
            };
            let running = container_state(&self.docker, &candidate.id)
                .await
                .and_then(|s| s.running)
                == Some(true);
            if running {
                return Some(candidate);
            }
            candidate.cleanup.run().await;
        }
    }
}

/// `resources.cpu_time`, `open_files` and `file_size` as container ulimits.
fn ulimits(r: &Resources) -> Option<Vec<bollard::models::ResourcesUlimits>> {
    let limit = |name: &str, value: u64| bollard::models::ResourcesUlimits {
        name: Some(name.to_string()),
        soft: Some(value as i64),
        hard: Some(value as i64),
    };
    let mut out = Vec::new();
    if let Some(t) = r.cpu_time {
        out.push(limit("cpu", t.as_secs_f64().ceil().max(1.0) as u64));
    }
    if let Some(n) = r.open_files {
        out.push(limit("nofile", n));
    }
    if let Some(bytes) = r.file_size {
        // The engine takes fsize in bytes.
        out.push(limit("fsize", bytes));
    }
    (!out.is_empty()).then_some(out)
}

/// The engine's view of a container's state, when it answers.
async fn container_state(docker: &Docker, id: &str) -> Option<bollard::models::ContainerState> {
    docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .ok()?
        .state
}

async fn remove_container(docker: &Docker, id: &str) -> bool {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => true,
        Err(e) => is_not_found(&e),
    }
}

/// The environment every step gets, before job, step and secret variables.
fn base_env(id: &JobId, job: &Job, runner: &str) -> Vec<String> {
    vec![
        "CI=true".to_string(),
        "RUSTCI=true".to_string(),
        format!("RUSTCI_JOB_ID={id}"),
        format!("RUSTCI_JOB_NAME={}", job.name),
        format!("RUSTCI_RUNNER={runner}"),
        format!("RUSTCI_WORKSPACE={WORKSPACE}"),
    ]
}

fn step_env(base: &[String], job: &Job, step: &rustci_runners::Step) -> Vec<String> {
    let mut env = base.to_vec();
    for (k, v) in job.env.iter().chain(&step.env).chain(&job.secrets) {
        env.push(format!("{k}={v}"));
    }
    env
}

fn step_argv(step: &rustci_runners::Step) -> Option<Vec<String>> {
    match &step.action {
        StepAction::Run(script) => Some(vec![
            "/bin/sh".into(),
            "-e".into(),
            "-c".into(),
            script.clone(),
        ]),
        StepAction::Command(argv) => Some(argv.clone()),
        _ => None,
    }
}

#[async_trait]
impl Runner for DockerRunner {
    fn info(&self) -> &RunnerInfo {
        &self.inner.info
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    fn running(&self) -> usize {
        self.inner.running.running()
    }

    async fn health(&self) -> Health {
        match tokio::time::timeout(Duration::from_secs(5), self.inner.docker.version()).await {
            Ok(Ok(_)) => Health::Healthy,
            Ok(Err(e)) => Health::Unhealthy(format!("docker engine unavailable: {e}")),
            Err(_) => Health::Unhealthy("docker engine unavailable: no answer within 5s".into()),
        }
    }

    async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_JOB}={id}")],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .inner
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| Error::Unavailable(format!("docker engine unavailable: {e}")))?;
        for c in containers {
            if let Some(cid) = c.id
                && remove_container(&self.inner.docker, &cid).await
            {
                tracing::info!(container = %cid, job_id = %id, "removed the container of an abandoned job");
            }
        }
        Ok(())
    }

    async fn start(&self, spec: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        let inner = &self.inner;
        let mut job = spec.to_job();
        if job.image.is_none() {
            job.image = inner.config.default_image.clone();
        }
        job.validate().map_err(Error::InvalidSpec)?;
        let unsupported = |reason: String| Error::Unsupported {
            runner: inner.info.name.clone(),
            reasons: vec![reason],
        };
        let Some(image) = job.image.clone() else {
            return Err(unsupported(
                "the job names no image and the runner has no default image".into(),
            ));
        };
        check_image_reference(&image).map_err(unsupported)?;
        if job.steps.iter().any(|s| step_argv(s).is_none()) {
            return Err(unsupported("a step kind this runner does not know".into()));
        }
        let reasons = inner.caps.unmet(&job);
        if !reasons.is_empty() {
            return Err(Error::Unsupported {
                runner: inner.info.name.clone(),
                reasons,
            });
        }
        let slot = inner
            .running
            .acquire(&inner.info.name, inner.caps.max_concurrency)?;
        let base = base_env(&id, &job, &inner.info.name);
        let workdir = match &job.workdir {
            Some(w) => format!("{WORKSPACE}/{w}"),
            None => WORKSPACE.to_string(),
        };

        let warm = if job.resources.is_empty() && job.workdir.is_none() {
            inner.take_warm(&image).await
        } else {
            None
        };
        // Replace what was taken, and refill a pool that idled away.
        inner.top_up(&image);
        let (container, cleanup, mode) = if let Some(w) = warm {
            (w.id, w.cleanup, Mode::Exec { warm: true })
        } else {
            inner.ensure_image(&image).await?;
            if job.steps.len() == 1 {
                // One step: it is the container's own process, as with `docker run`.
                let step = &job.steps[0];
                let mut cmd = vec![
                    "/bin/sh".to_string(),
                    "-c".into(),
                    SINGLE_STEP.into(),
                    "sh".into(),
                ];
                cmd.extend(step_argv(step).unwrap_or_default());
                let (bind, mut cleanup) = inner.workspace(id.as_str())?;
                let cid = inner
                    .create(
                        &image,
                        id.as_str(),
                        cmd,
                        step_env(&base, &job, step),
                        workdir.clone(),
                        &job.resources,
                        &mut cleanup,
                        bind,
                    )
                    .await?;
                let options = bollard::query_parameters::AttachContainerOptionsBuilder::new()
                    .stream(true)
                    .stdout(true)
                    .stderr(true)
                    .build();
                let attached = inner
                    .docker
                    .attach_container(&cid, Some(options))
                    .await
                    .map_err(|e| {
                        Error::Unavailable(format!(
                            "cannot attach to the container of job {id}: {e}"
                        ))
                    })?;
                inner.start_container(&cid, &image).await?;
                (cid, cleanup, Mode::Single(attached.output))
            } else {
                let (cid, cleanup) = inner
                    .keepalive(&image, id.as_str(), Vec::new(), &job.resources)
                    .await?;
                (cid, cleanup, Mode::Exec { warm: false })
            }
        };

        let (execution, sink) = Execution::channel(id.clone(), inner.config.event_buffer);
        let run = JobRun {
            inner: inner.clone(),
            container,
            secrets: SecretSet::new(job.secrets.values().map(String::as_str)),
            budget: OutputBudget::new(inner.config.max_output_bytes),
            base,
            workdir,
            job,
            sink,
            cleanup: Some(cleanup),
            slot: Some(slot),
            oom_baseline: AtomicU64::new(0),
        };
        tokio::spawn(run.run(mode));
        Ok(execution)
    }
}

type LogStream = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>>
            + Send,
    >,
>;

/// How a job's steps run.
enum Mode {
    /// The only step is the container's process; its output is this attached stream.
    Single(LogStream),
    /// Steps are executed in a keep-alive container; a warm container is discarded in
    /// the background after the job.
    Exec { warm: bool },
}

/// Removes the container and workspace of a job when dropped.
struct Cleanup {
    docker: Docker,
    container: Option<String>,
    host_dir: Option<PathBuf>,
    volume: Option<String>,
}

impl Cleanup {
    async fn run(mut self) {
        if let Some(id) = self.container.take() {
            remove_container(&self.docker, &id).await;
        }
        if let Some(volume) = self.volume.take() {
            let _ = self
                .docker
                .remove_volume(
                    &volume,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await;
        }
        if let Some(dir) = self.host_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            // Typically files a container's root user made, below a runner that is not
            // root: left for an administrator, named in the log.
            tracing::warn!(workspace = %dir.display(), error = %e, "cannot remove a workspace");
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Start failed midway (or the task was dropped): finish the removal in the
        // background if a runtime is there, else remove what is local.
        if self.container.is_none() && self.volume.is_none() {
            if let Some(dir) = self.host_dir.take() {
                let _ = std::fs::remove_dir_all(dir);
            }
            return;
        }
        let rest = Cleanup {
            docker: self.docker.clone(),
            container: self.container.take(),
            host_dir: self.host_dir.take(),
            volume: self.volume.take(),
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(rest.run());
        } else if let Some(dir) = rest.host_dir.clone() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct JobRun {
    inner: Arc<Inner>,
    container: String,
    job: Job,
    sink: ExecutionSink,
    secrets: SecretSet,
    budget: OutputBudget,
    base: Vec<String>,
    workdir: String,
    cleanup: Option<Cleanup>,
    slot: Option<SlotGuard>,
    /// OOM kills in the container before the current step.
    oom_baseline: AtomicU64,
}

enum StepEnd {
    Exited(i64),
    TimedOut,
    Cancelled,
    Failed(String),
}

/// What pumping one output stream ended with.
struct Pumped {
    stop: Option<StepEnd>,
    exec_failure: Option<String>,
}

impl JobRun {
    async fn run(mut self, mode: Mode) {
        self.sink
            .emit(EventKind::Started {
                job_id: self.sink.job_id().to_string(),
                runner_id: self.inner.info.id.clone(),
                runner_kind: self.inner.info.kind,
            })
            .await;
        let (outcome, warm) = match mode {
            Mode::Single(output) => (self.single(output).await, false),
            Mode::Exec { warm } => (self.steps().await, warm),
        };
        tracing::info!(job_id = %self.sink.job_id(), runner = %self.inner.info.name, %outcome, "job ended");
        if let Some(cleanup) = self.cleanup.take() {
            if warm {
                // Discarded after the outcome, replaced in the background already.
                self.inner.tasks.spawn(cleanup.run());
            } else {
                cleanup.run().await;
            }
        }
        self.slot.take();
        self.sink.finish(outcome).await;
    }

    /// Announces step `index` and returns its name, start and deadline (the earlier of
    /// the job's and the step's own).
    async fn begin_step(
        &self,
        index: usize,
        step: &rustci_runners::Step,
        job_deadline: Instant,
    ) -> (String, Instant, Instant) {
        let name = step.display_name(index);
        self.sink
            .emit(EventKind::StepStarted {
                step: index,
                name: name.clone(),
            })
            .await;
        let started = Instant::now();
        let deadline = match step.timeout {
            Some(t) => job_deadline.min(started + t),
            None => job_deadline,
        };
        (name, started, deadline)
    }

    async fn single(&mut self, output: LogStream) -> Outcome {
        let step = self.job.steps[0].clone();
        let job_deadline = Instant::now() + self.job.effective_timeout();
        let (name, started, deadline) = self.begin_step(0, &step, job_deadline).await;
        let pumped = self.pump(0, output, deadline, None, "").await;
        let end = match pumped.stop {
            Some(end) => end,
            None => {
                // The output ended, so the container's process has exited: its status
                // comes at once (bounded all the same).
                let mut wait = self.inner.docker.wait_container(
                    &self.container,
                    None::<bollard::query_parameters::WaitContainerOptions>,
                );
                let state = tokio::time::timeout(GIVE_UP_AFTER, wait.next())
                    .await
                    .unwrap_or_else(|_| {
                        Some(Err(bollard::errors::Error::IOError {
                            err: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no exit status from the engine",
                            ),
                        }))
                    });
                // bollard reports a non-zero exit as an error carrying the code.
                match state {
                    Some(Ok(r)) => StepEnd::Exited(r.status_code),
                    Some(Err(bollard::errors::Error::DockerContainerWaitError {
                        code, ..
                    })) => StepEnd::Exited(code),
                    Some(Err(e)) => {
                        StepEnd::Failed(format!("cannot read the exit code of the step: {e}"))
                    }
                    None => StepEnd::Failed("the engine reported no exit code".into()),
                }
            }
        };
        self.conclude(0, &name, &step, started, end)
            .await
            .unwrap_or(Outcome::Succeeded)
    }

    async fn steps(&mut self) -> Outcome {
        let deadline = Instant::now() + self.job.effective_timeout();
        if self.job.workdir.is_some() {
            let mkdir = vec!["mkdir".into(), "-p".into(), self.workdir.clone()];
            let end = self
                .exec(usize::MAX, mkdir, Vec::new(), WORKSPACE.into(), deadline)
                .await;
            if !matches!(end, StepEnd::Exited(0)) {
                return Outcome::RunnerError {
                    message: format!(
                        "cannot create the working directory {} in the container",
                        self.workdir
                    ),
                };
            }
        }
        let steps = self.job.steps.clone();
        for (index, step) in steps.iter().enumerate() {
            if self.sink.is_cancelled() {
                return Outcome::Cancelled;
            }
            let (name, started, step_deadline) = self.begin_step(index, step, deadline).await;
            let argv = step_argv(step).unwrap_or_default();
            let env = step_env(&self.base, &self.job, step);
            if let Some(count) = self.oom_kills() {
                self.oom_baseline.store(count, Ordering::SeqCst);
            }
            let end = self
                .exec(index, argv, env, self.workdir.clone(), step_deadline)
                .await;
            if let Some(outcome) = self.conclude(index, &name, step, started, end).await {
                return outcome;
            }
        }
        Outcome::Succeeded
    }

    /// Reports a step's end; returns the job's outcome when the job ends here.
    async fn conclude(
        &self,
        index: usize,
        name: &str,
        step: &rustci_runners::Step,
        started: Instant,
        end: StepEnd,
    ) -> Option<Outcome> {
        let finish = |status| EventKind::StepFinished {
            step: index,
            name: name.to_string(),
            status,
            duration: started.elapsed(),
        };
        match end {
            StepEnd::Exited(0) => {
                self.sink.emit(finish(StepStatus::Exited(0))).await;
                None
            }
            StepEnd::Exited(code) => {
                let (status, outcome) = if (129..=192).contains(&code) {
                    let signal = (code - 128) as i32;
                    let oom_killed = signal == 9 && self.oom_killed().await;
                    (
                        StepStatus::Signalled(signal),
                        Outcome::Signalled {
                            step: index,
                            step_name: name.to_string(),
                            signal,
                            oom_killed,
                        },
                    )
                } else {
                    (
                        StepStatus::Exited(code as i32),
                        Outcome::Failed {
                            step: index,
                            step_name: name.to_string(),
                            exit_code: code as i32,
                        },
                    )
                };
                self.sink.emit(finish(status)).await;
                (!step.continue_on_error).then_some(outcome)
            }
            StepEnd::TimedOut => {
                self.sink.emit(finish(StepStatus::TimedOut)).await;
                Some(Outcome::TimedOut { step: Some(index) })
            }
            StepEnd::Cancelled => {
                self.sink.emit(finish(StepStatus::Cancelled)).await;
                Some(Outcome::Cancelled)
            }
            StepEnd::Failed(message) => {
                self.sink.emit(finish(StepStatus::NotStarted)).await;
                Some(Outcome::RunnerError {
                    message: self.secrets.mask_str(&message),
                })
            }
        }
    }

    /// True when the container's memory cgroup saw an OOM kill (local engine), or the
    /// engine says so.
    async fn oom_killed(&self) -> bool {
        if let Some(count) = self.oom_kills() {
            return count > self.oom_baseline.load(Ordering::SeqCst);
        }
        container_state(&self.inner.docker, &self.container)
            .await
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }

    /// OOM kills so far in the container's memory cgroup (local engine only).
    fn oom_kills(&self) -> Option<u64> {
        if self.inner.local {
            for file in [
                format!(
                    "/sys/fs/cgroup/memory/docker/{}/memory.oom_control",
                    self.container
                ),
                format!(
                    "/sys/fs/cgroup/system.slice/docker-{}.scope/memory.events",
                    self.container
                ),
                format!("/sys/fs/cgroup/docker/{}/memory.events", self.container),
            ] {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    return Some(
                        text.lines()
                            .find_map(|l| {
                                let mut p = l.split_whitespace();
                                (p.next() == Some("oom_kill")).then(|| p.next()?.parse().ok())?
                            })
                            .unwrap_or(0),
                    );
                }
            }
        }
        None
    }

    async fn signal_container(&self, signal: &str) {
        let options = KillContainerOptionsBuilder::new().signal(signal).build();
        let _ = self
            .inner
            .docker
            .kill_container(&self.container, Some(options))
            .await;
    }

    /// Streams one output to events until it ends, enforcing the deadline and cancel
    /// (SIGTERM to every process of the container, then SIGKILL after the grace period, then
    /// giving up on the stream after [`GIVE_UP_AFTER`]). Output is read by its own future, so
    /// a consumer that reads events slowly never holds back the deadline or cancel.
    /// With `exec_id`, also notices when the exec'd process has exited while background
    /// processes hold its output open, and kills them.
    async fn pump(
        &self,
        step: usize,
        mut output: LogStream,
        deadline: Instant,
        exec_id: Option<&str>,
        program: &str,
    ) -> Pumped {
        let visible = step != usize::MAX;
        let reader = async {
            let mut out = StreamWriter::new(
                &self.sink,
                step,
                OutputStream::Stdout,
                &self.secrets,
                &self.budget,
            );
            let mut err = StreamWriter::new(
                &self.sink,
                step,
                OutputStream::Stderr,
                &self.secrets,
                &self.budget,
            );
            // The engine reports a failed exec of the program as text on stdout.
            let mut first = true;
            let mut exec_failure: Option<String> = None;
            let mut stream_error = None;
            while let Some(chunk) = output.next().await {
                match chunk {
                    Ok(bollard::container::LogOutput::StdOut { message }) => {
                        if std::mem::take(&mut first)
                            && exec_id.is_some()
                            && message.starts_with(b"OCI runtime exec failed")
                        {
                            exec_failure =
                                Some(String::from_utf8_lossy(&message).trim().to_string());
                        } else if visible {
                            out.write(message).await
                        }
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        if visible {
                            err.write(message).await
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        stream_error = Some(e.to_string());
                        break;
                    }
                }
            }
            out.finish().await;
            if let Some(text) = &exec_failure
                && visible
            {
                let missing =
                    text.contains("no such file or directory") || text.contains("not found");
                let message = if missing {
                    format!("rustci: command not found: {program}\n")
                } else {
                    format!("rustci: cannot execute {program}: {text}\n")
                };
                err.write(message.into()).await;
            }
            err.finish().await;
            (exec_failure, stream_error)
        };
        tokio::pin!(reader);
        let mut stop: Option<StepEnd> = None;
        let mut kill_at: Option<Instant> = None;
        let mut give_up_at: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut check = tokio::time::interval_at(Instant::now() + LEFTOVER_CHECK, LEFTOVER_CHECK);
        let mut leftovers_done = exec_id.is_none();
        let mut exited_seen = false;
        let (exec_failure, stream_error) = loop {
            tokio::select! {
                done = &mut reader => break done,
                _ = tokio::time::sleep_until(deadline), if stop.is_none() => {
                    stop = Some(StepEnd::TimedOut);
                    self.signal_container("SIGTERM").await;
                    kill_at = Some(Instant::now() + self.inner.config.termination_grace);
                }
                _ = self.sink.cancelled(), if stop.is_none() => {
                    stop = Some(StepEnd::Cancelled);
                    self.signal_container("SIGTERM").await;
                    kill_at = Some(Instant::now() + self.inner.config.termination_grace);
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    self.signal_container("SIGKILL").await;
                    kill_at = None;
                    give_up_at = Some(Instant::now() + GIVE_UP_AFTER);
                }
                _ = tokio::time::sleep_until(give_up_at.unwrap_or(far)), if give_up_at.is_some() => {
                    // The engine never closed the stream after SIGKILL; the forced removal
                    // that follows the job cleans up.
                    tracing::warn!(container = %self.container, "output did not end after SIGKILL; giving up on it");
                    break (None, None);
                }
                _ = check.tick(), if stop.is_none() && !leftovers_done => {
                    let exited = match exec_id {
                        Some(id) => self.inner.docker.inspect_exec(id).await.ok().and_then(|s| s.running) == Some(false),
                        None => false,
                    };
                    // Two checks in a row: the engine marks an exec finished before its last
                    // output has been read.
                    if exited && exited_seen {
                        leftovers_done = true;
                        self.kill_leftovers().await;
                        if visible {
                            self.sink.emit(EventKind::LeftoverProcesses { step, count: 1 }).await;
                        }
                    }
                    exited_seen = exited;
                }
            }
        };
        if stop.is_none()
            && let Some(e) = &stream_error
        {
            // Without the stream there is no telling what the step does: stop it.
            self.signal_container("SIGKILL").await;
            stop = Some(StepEnd::Failed(format!(
                "lost the output of the step from the engine: {e}"
            )));
        }
        Pumped { stop, exec_failure }
    }

    /// Kills every process of the container but its PID 1, waiting until that is done.
    async fn kill_leftovers(&self) {
        let docker = &self.inner.docker;
        let kill = CreateExecOptions::<String> {
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "kill -KILL -1 2>/dev/null; true".into(),
            ]),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let Ok(k) = docker.create_exec(&self.container, kill).await else {
            return;
        };
        if let Ok(StartExecResults::Attached { mut output, .. }) =
            docker.start_exec(&k.id, None).await
        {
            let drain = async { while output.next().await.is_some() {} };
            let _ = tokio::time::timeout(GIVE_UP_AFTER, drain).await;
        }
    }

    /// Runs one command in the container. `step == usize::MAX` for internal commands
    /// whose output is not shown.
    async fn exec(
        &self,
        step: usize,
        argv: Vec<String>,
        env: Vec<String>,
        workdir: String,
        deadline: Instant,
    ) -> StepEnd {
        let program = argv.first().cloned().unwrap_or_default();
        let config = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv),
            env: Some(env),
            working_dir: Some(workdir),
            user: self.inner.config.user.clone(),
            ..Default::default()
        };
        let docker = &self.inner.docker;
        let exec = match docker.create_exec(&self.container, config).await {
            Ok(e) => e,
            Err(e) => return StepEnd::Failed(format!("cannot create an exec for {program}: {e}")),
        };
        let output = match docker.start_exec(&exec.id, None).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return StepEnd::Failed("exec started detached".into());
            }
            Err(e) => return StepEnd::Failed(format!("cannot start {program}: {e}")),
        };
        let pumped = self
            .pump(step, output, deadline, Some(&exec.id), &program)
            .await;
        if let Some(end) = pumped.stop {
            return end;
        }
        match docker.inspect_exec(&exec.id).await {
            Ok(state) => match (state.exit_code, &pumped.exec_failure) {
                (Some(126 | 127), Some(text)) => {
                    let missing =
                        text.contains("no such file or directory") || text.contains("not found");
                    StepEnd::Exited(if missing { 127 } else { 126 })
                }
                (Some(code), _) => StepEnd::Exited(code),
                (None, _) => {
                    StepEnd::Failed(format!("the engine reported no exit code for {program}"))
                }
            },
            Err(e) => StepEnd::Failed(format!("cannot read the exit code of {program}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_image_reference;

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "rustci-busybox:local",
            "library/alpine:3.20",
            "registry.example.com:5000/team/app:1.2.3",
            "localhost/x",
            "ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(check_image_reference(ok).is_ok(), "{ok}");
        }
        assert_eq!(super::registry_of("busybox"), "docker.io");
        assert_eq!(super::registry_of("library/busybox"), "docker.io");
        assert_eq!(
            super::registry_of("registry.example.com:5000/a/b"),
            "registry.example.com:5000"
        );
        assert_eq!(super::registry_of("localhost/x"), "localhost");
        assert_eq!(super::with_default_tag("ubuntu"), "ubuntu:latest");
        assert_eq!(
            super::with_default_tag("reg:5000/ubuntu"),
            "reg:5000/ubuntu:latest"
        );
        assert_eq!(super::with_default_tag("ubuntu:24.04"), "ubuntu:24.04");
        assert_eq!(
            super::with_default_tag("ubuntu@sha256:ab"),
            "ubuntu@sha256:ab"
        );
        for bad in [
            "ubuntu@sha256:0123456789abcdef",
            "x:.tag",
            "reg?x.io/a",
            "reg..io/a",
            "reg.io:99999999/a",
            "",
            "Busybox",
            "a b",
            "x:",
            "x::y",
            "-x",
            "x@sha256:",
            "x@nothex:zz",
            "a//b",
        ] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
    }
}
