//! The Docker runner: configuration, engine connection, image policy, container and step
//! execution.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use rustci_runners::job::{Job, JobSpec, StepAction};
use rustci_runners::mask::SecretSet;
use rustci_runners::output::{OutputBudget, StreamWriter};
use rustci_runners::{
    Capabilities, Error, EventKind, Execution, ExecutionSink, Health, Isolation, JobId, Limit,
    Outcome, OutputStream, Runner, RunnerInfo, RunnerKind, StepStatus,
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
    /// `DOCKER_HOST` if set, else the local socket (default).
    #[default]
    Local,
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
        }
    }
}

/// Runs each job in its own container on a Docker engine.
pub struct DockerRunner {
    docker: Docker,
    info: RunnerInfo,
    caps: Capabilities,
    config: DockerConfig,
    local: bool,
    running: Arc<AtomicUsize>,
    owner: String,
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

fn owner_label() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host}/{}", std::process::id())
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
        && !(d.contains(':')
            && d.split_once(':').is_some_and(|(a, h)| {
                !a.is_empty() && !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())
            }))
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
    };
    let components: Vec<&str> = name.split('/').collect();
    for (i, c) in components.iter().enumerate() {
        let c = if i + 1 == components.len() {
            last_name
        } else {
            c
        };
        // The first component may be a registry host (with a port, upper case allowed).
        let registry = i == 0
            && components.len() > 1
            && (c.contains('.') || c.contains(':') || c == "localhost");
        if !(path_ok(c) || registry) {
            return Err(bad());
        }
    }
    Ok(())
}

impl DockerRunner {
    /// Connects to the engine, checks it answers, reads its capabilities, and removes
    /// containers left by a crashed owner of a runner with the same name.
    ///
    /// Fails with [`Error::Unavailable`] ("docker engine unavailable: …") when the engine
    /// cannot be reached, and [`Error::InvalidConfig`] for unusable settings.
    pub async fn connect(config: DockerConfig) -> Result<Self, Error> {
        let (docker, local) = match &config.engine {
            Engine::Local => (
                Docker::connect_with_local_defaults()
                    .map_err(|e| unavailable("cannot connect", e))?,
                std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://")),
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
        let runner = DockerRunner {
            docker,
            info: runner_info,
            caps,
            config,
            local,
            running: Arc::new(AtomicUsize::new(0)),
            owner: owner_label(),
        };
        runner.sweep().await;
        Ok(runner)
    }

    /// Removes containers of this runner's name whose owning process (on this host) is
    /// gone. Returns how many were removed.
    pub async fn sweep(&self) -> usize {
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
            let (owner_host, owner_pid) = owner.split_once('/').unwrap_or(("", ""));
            let alive = owner_host == host
                && owner_pid
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if owner_host != host || alive || owner == self.owner {
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
                }
            }
        }
        removed
    }

    /// The configuration in use.
    pub fn config(&self) -> &DockerConfig {
        &self.config
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
                let options = CreateImageOptionsBuilder::new().from_image(image).build();
                let credentials =
                    self.config
                        .registry_auth
                        .as_ref()
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

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Runner for DockerRunner {
    fn info(&self) -> &RunnerInfo {
        &self.info
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    async fn health(&self) -> Health {
        match tokio::time::timeout(Duration::from_secs(5), self.docker.version()).await {
            Ok(Ok(v)) => {
                let _ = v;
                Health::Healthy
            }
            Ok(Err(e)) => Health::Unhealthy(format!("docker engine unavailable: {e}")),
            Err(_) => Health::Unhealthy("docker engine unavailable: no answer within 5s".into()),
        }
    }

    async fn start(&self, spec: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        let mut job = spec.to_job();
        if job.image.is_none() {
            job.image = self.config.default_image.clone();
        }
        job.validate().map_err(Error::InvalidSpec)?;
        let Some(image) = job.image.clone() else {
            return Err(Error::Unsupported {
                runner: self.info.name.clone(),
                reasons: vec!["the job names no image and the runner has no default image".into()],
            });
        };
        check_image_reference(&image).map_err(|e| Error::Unsupported {
            runner: self.info.name.clone(),
            reasons: vec![e],
        })?;
        let reasons = self.caps.unmet(&job);
        if !reasons.is_empty() {
            return Err(Error::Unsupported {
                runner: self.info.name.clone(),
                reasons,
            });
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(self.running.clone());
        if let Some(max) = self.caps.max_concurrency
            && now >= max
        {
            return Err(Error::Busy {
                runner: self.info.name.clone(),
                running: now,
                max,
            });
        }
        self.ensure_image(&image).await?;

        // Workspace: a host directory bind-mounted (local engine) or a volume (remote).
        let (bind, host_dir) = if self.local {
            let dir = self.config.workspace_root.join(format!("ws-{id}"));
            std::fs::create_dir(&dir).map_err(|e| {
                Error::Unavailable(format!("cannot create workspace {}: {e}", dir.display()))
            })?;
            (format!("{}:{WORKSPACE}", dir.display()), Some(dir))
        } else {
            (format!("rustci-ws-{id}:{WORKSPACE}"), None)
        };
        let mut cleanup = Cleanup {
            docker: self.docker.clone(),
            container: None,
            host_dir,
            volume: (!self.local).then(|| format!("rustci-ws-{id}")),
        };

        let r = &job.resources;
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
            ..Default::default()
        };
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_JOB.to_string(), id.to_string()),
            (LABEL_RUNNER.to_string(), self.info.id.clone()),
            (LABEL_RUNNER_NAME.to_string(), self.config.name.clone()),
            (LABEL_OWNER.to_string(), self.owner.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), KEEPALIVE.into()]),
            entrypoint: Some(vec![]),
            labels: Some(labels),
            working_dir: Some(WORKSPACE.into()),
            user: self.config.user.clone(),
            env: Some(vec![format!("RUSTCI_JOB_ID={id}")]),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = format!("rustci-{id}");
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                Error::Unavailable(format!("cannot create a container from {image}: {e}"))
            })?;
        cleanup.container = Some(created.id.clone());
        self.docker
            .start_container(
                &created.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| {
                Error::Unavailable(format!("cannot start a container from {image}: {e}"))
            })?;

        let (execution, sink) = Execution::channel(id.clone(), self.config.event_buffer);
        let run = JobRun {
            docker: self.docker.clone(),
            container: created.id,
            secrets: SecretSet::new(job.secrets.values().map(String::as_str)),
            budget: OutputBudget::new(self.config.max_output_bytes),
            job,
            sink,
            info: self.info.clone(),
            grace: self.config.termination_grace,
            user: self.config.user.clone(),
            local: self.local,
            cleanup: Some(cleanup),
            slot: Some(slot),
        };
        tokio::spawn(run.run());
        Ok(execution)
    }
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
        if let Some(dir) = self.host_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
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
    docker: Docker,
    container: String,
    job: Job,
    sink: ExecutionSink,
    info: RunnerInfo,
    secrets: SecretSet,
    budget: OutputBudget,
    grace: Duration,
    user: Option<String>,
    local: bool,
    cleanup: Option<Cleanup>,
    slot: Option<Slot>,
}

enum StepEnd {
    Exited(i64),
    TimedOut,
    Cancelled,
    Failed(String),
}

impl JobRun {
    async fn run(mut self) {
        self.sink
            .emit(EventKind::Started {
                job_id: self.sink.job_id().to_string(),
                runner_id: self.info.id.clone(),
                runner_kind: self.info.kind,
            })
            .await;
        let outcome = self.steps().await;
        tracing::info!(job_id = %self.sink.job_id(), runner = %self.info.name, %outcome, "job ended");
        if let Some(cleanup) = self.cleanup.take() {
            cleanup.run().await;
        }
        self.slot.take();
        self.sink.finish(outcome).await;
    }

    fn env(&self, step_env: &std::collections::BTreeMap<String, String>) -> Vec<String> {
        let mut env = vec![
            "CI=true".to_string(),
            "RUSTCI=true".to_string(),
            format!("RUSTCI_JOB_ID={}", self.sink.job_id()),
            format!("RUSTCI_JOB_NAME={}", self.job.name),
            format!("RUSTCI_RUNNER={}", self.info.name),
            format!("RUSTCI_WORKSPACE={WORKSPACE}"),
        ];
        for (k, v) in self.job.env.iter().chain(step_env).chain(&self.job.secrets) {
            env.push(format!("{k}={v}"));
        }
        env
    }

    async fn steps(&mut self) -> Outcome {
        let deadline = Instant::now() + self.job.effective_timeout();
        let workdir = match &self.job.workdir {
            Some(w) => format!("{WORKSPACE}/{w}"),
            None => WORKSPACE.to_string(),
        };
        if self.job.workdir.is_some() {
            // Create the working directory inside the container, as the step user.
            let end = self
                .exec(
                    usize::MAX,
                    vec!["mkdir".into(), "-p".into(), workdir.clone()],
                    Vec::new(),
                    WORKSPACE.into(),
                    deadline,
                )
                .await;
            if !matches!(end, StepEnd::Exited(0)) {
                return Outcome::RunnerError {
                    message: format!(
                        "cannot create the working directory {workdir} in the container"
                    ),
                };
            }
        }
        let steps = self.job.steps.clone();
        for (index, step) in steps.iter().enumerate() {
            if self.sink.is_cancelled() {
                return Outcome::Cancelled;
            }
            let name = step.display_name(index);
            self.sink
                .emit(EventKind::StepStarted {
                    step: index,
                    name: name.clone(),
                })
                .await;
            let started = Instant::now();
            let step_deadline = match step.timeout {
                Some(t) => deadline.min(started + t),
                None => deadline,
            };
            let argv = match &step.action {
                StepAction::Run(script) => {
                    vec!["/bin/sh".into(), "-e".into(), "-c".into(), script.clone()]
                }
                StepAction::Command(argv) => argv.clone(),
                other => {
                    return Outcome::RunnerError {
                        message: format!("step kind {other:?} is not supported by this runner"),
                    };
                }
            };
            let env = self.env(&step.env);
            let end = self
                .exec(index, argv, env, workdir.clone(), step_deadline)
                .await;
            let finish = |status| EventKind::StepFinished {
                step: index,
                name: name.clone(),
                status,
                duration: started.elapsed(),
            };
            match end {
                StepEnd::Exited(0) => self.sink.emit(finish(StepStatus::Exited(0))).await,
                StepEnd::Exited(code) => {
                    let (status, outcome) = if (129..=192).contains(&code) {
                        let signal = (code - 128) as i32;
                        let oom_killed = signal == 9 && self.oom_killed().await;
                        (
                            StepStatus::Signalled(signal),
                            Outcome::Signalled {
                                step: index,
                                step_name: name.clone(),
                                signal,
                                oom_killed,
                            },
                        )
                    } else {
                        (
                            StepStatus::Exited(code as i32),
                            Outcome::Failed {
                                step: index,
                                step_name: name.clone(),
                                exit_code: code as i32,
                            },
                        )
                    };
                    self.sink.emit(finish(status)).await;
                    if !step.continue_on_error {
                        return outcome;
                    }
                }
                StepEnd::TimedOut => {
                    self.sink.emit(finish(StepStatus::TimedOut)).await;
                    return Outcome::TimedOut { step: Some(index) };
                }
                StepEnd::Cancelled => {
                    self.sink.emit(finish(StepStatus::Cancelled)).await;
                    return Outcome::Cancelled;
                }
                StepEnd::Failed(message) => {
                    self.sink.emit(finish(StepStatus::NotStarted)).await;
                    return Outcome::RunnerError {
                        message: self.secrets.mask_str(&message),
                    };
                }
            }
        }
        Outcome::Succeeded
    }

    /// True when the container's memory cgroup saw an OOM kill (local engine), or the
    /// engine says so.
    async fn oom_killed(&self) -> bool {
        if self.local {
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
                    return text.lines().any(|l| {
                        let mut p = l.split_whitespace();
                        p.next() == Some("oom_kill") && p.next().is_some_and(|n| n != "0")
                    });
                }
            }
        }
        self.docker
            .inspect_container(
                &self.container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|c| c.state.and_then(|s| s.oom_killed))
            .unwrap_or(false)
    }

    async fn signal_container(&self, signal: &str) {
        let options = KillContainerOptionsBuilder::new().signal(signal).build();
        let _ = self
            .docker
            .kill_container(&self.container, Some(options))
            .await;
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
            user: self.user.clone(),
            ..Default::default()
        };
        let exec = match self.docker.create_exec(&self.container, config).await {
            Ok(e) => e,
            Err(e) => return StepEnd::Failed(format!("cannot create an exec for {program}: {e}")),
        };
        let mut output = match self.docker.start_exec(&exec.id, None).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return StepEnd::Failed("exec started detached".into());
            }
            Err(e) => return StepEnd::Failed(format!("cannot start {program}: {e}")),
        };
        let visible = step != usize::MAX;
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
        let mut stop: Option<StepEnd> = None;
        let mut kill_at: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        // While output is open, check now and then whether the step's own process has
        // exited: then background processes are holding its output open.
        let mut check = tokio::time::interval_at(
            Instant::now() + Duration::from_millis(200),
            Duration::from_millis(200),
        );
        let mut leftovers_killed = false;
        // The engine reports a failed exec of the program as text on stdout and code 126.
        let mut first = true;
        let mut exec_failure: Option<String> = None;
        loop {
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(bollard::container::LogOutput::StdOut { message })) => {
                        if std::mem::take(&mut first) && message.starts_with(b"OCI runtime exec failed") {
                            exec_failure = Some(String::from_utf8_lossy(&message).trim().to_string());
                        } else if visible {
                            out.write(message).await
                        }
                    }
                    Some(Ok(bollard::container::LogOutput::StdErr { message })) => if visible { err.write(message).await },
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                _ = tokio::time::sleep_until(deadline), if stop.is_none() => {
                    stop = Some(StepEnd::TimedOut);
                    self.signal_container("SIGTERM").await;
                    kill_at = Some(Instant::now() + self.grace);
                }
                _ = self.sink.cancelled(), if stop.is_none() => {
                    stop = Some(StepEnd::Cancelled);
                    self.signal_container("SIGTERM").await;
                    kill_at = Some(Instant::now() + self.grace);
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    self.signal_container("SIGKILL").await;
                    kill_at = None;
                }
                _ = check.tick(), if stop.is_none() && !leftovers_killed => {
                    if let Ok(state) = self.docker.inspect_exec(&exec.id).await
                        && state.running == Some(false)
                    {
                        leftovers_killed = true;
                        let kill = CreateExecOptions::<String> {
                            cmd: Some(vec!["/bin/sh".into(), "-c".into(), "kill -KILL -1 2>/dev/null; true".into()]),
                            ..Default::default()
                        };
                        if let Ok(k) = self.docker.create_exec(&self.container, kill).await {
                            let _ = self.docker.start_exec(&k.id, Some(bollard::exec::StartExecOptions { detach: true, ..Default::default() })).await;
                        }
                        if visible {
                            self.sink.emit(EventKind::LeftoverProcesses { step, count: 1 }).await;
                        }
                    }
                }
            }
        }
        out.finish().await;
        if let Some(end) = stop {
            err.finish().await;
            return end;
        }
        match self.docker.inspect_exec(&exec.id).await {
            Ok(state) => match state.exit_code {
                Some(code) if code == 126 || code == 127 => match exec_failure {
                    Some(text) => {
                        let missing = text.contains("no such file or directory")
                            || text.contains("not found");
                        let message = if missing {
                            format!("rustci: command not found: {program}\n")
                        } else {
                            format!("rustci: cannot execute {program}: {text}\n")
                        };
                        if visible {
                            err.write(message.into()).await;
                        }
                        err.finish().await;
                        StepEnd::Exited(if missing { 127 } else { 126 })
                    }
                    None => {
                        err.finish().await;
                        StepEnd::Exited(code)
                    }
                },
                Some(code) => {
                    err.finish().await;
                    StepEnd::Exited(code)
                }
                None => StepEnd::Failed(format!("the engine reported no exit code for {program}")),
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
            "ubuntu@sha256:0123456789abcdef",
        ] {
            assert!(check_image_reference(ok).is_ok(), "{ok}");
        }
        for bad in [
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
