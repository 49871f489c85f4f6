//! [`DockerRunner`]: the type implementing [`Runner`]: connecting to the engine, what the
//! runner declares, health, and the entry points of a job (in `job.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use rustci_runners::{
    Capabilities, Error, Execution, Health, Isolation, JobId, JobSpec, Limit, Runner, RunnerInfo,
    RunnerKind, Slots,
};

use crate::config::{DockerConfig, Engine};
use crate::warm::WarmState;

/// Runs each job in its own container on a Docker engine.
pub struct DockerRunner {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) docker: Docker,
    pub(crate) info: RunnerInfo,
    pub(crate) caps: Capabilities,
    pub(crate) config: DockerConfig,
    pub(crate) local: bool,
    pub(crate) running: Slots,
    pub(crate) owner: String,
    pub(crate) warm: std::sync::Mutex<WarmState>,
    pub(crate) warm_changed: tokio::sync::Notify,
    /// Background work (refills, discards) that `shutdown` waits for.
    pub(crate) tasks: tokio_util::task::TaskTracker,
}

/// A failure talking to the engine, classified: a 4xx answer (but 408 and 429) is the
/// engine refusing the request, which retrying does not change; anything else (no
/// connection, a timeout, a 5xx) means the engine is unavailable for now.
pub(crate) fn engine_error(what: &str, e: bollard::errors::Error) -> Error {
    match &e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. }
            if (400..500).contains(status_code) && ![408, 429].contains(status_code) =>
        {
            Error::rejected(format!("docker engine refused: {what}")).caused_by(e)
        }
        _ => Error::unavailable(format!("docker engine unavailable: {what}")).caused_by(e),
    }
}

pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerRunner {
    /// Connects to the engine, checks it answers, reads its capabilities, removes
    /// containers left by a crashed owner of a runner with the same name, and starts the
    /// warm pool if one is configured.
    ///
    /// Fails with an [`ErrorKind::Unavailable`](rustci_runners::ErrorKind::Unavailable)
    /// error ("docker engine unavailable: …", temporary) when the engine cannot be reached,
    /// and [`ErrorKind::InvalidConfig`](rustci_runners::ErrorKind::InvalidConfig) for
    /// unusable settings; every error names the runner.
    pub async fn connect(config: DockerConfig) -> Result<Self, Error> {
        let name = config.name.clone();
        Self::connect_to(config)
            .await
            .map_err(|e| e.for_runner(&name))
    }

    async fn connect_to(config: DockerConfig) -> Result<Self, Error> {
        config.check()?;
        let (docker, local) = match &config.engine {
            Engine::Local => (
                Docker::connect_with_defaults().map_err(|e| engine_error("cannot connect", e))?,
                std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://")),
            ),
            Engine::Socket(path) => (
                Docker::connect_with_unix(
                    &path.display().to_string(),
                    120,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| engine_error(&format!("cannot connect to {}", path.display()), e))?,
                true,
            ),
            Engine::Tls {
                address,
                ca,
                cert,
                key,
            } => (
                Docker::connect_with_ssl(address, key, cert, ca, 120, bollard::API_DEFAULT_VERSION)
                    .map_err(|e| engine_error(&format!("cannot connect to {address}"), e))?,
                false,
            ),
        };
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| Error::unavailable("docker engine unavailable: no answer within 10s"))?
            .map_err(|e| engine_error("version negotiation failed", e))?;
        let info = docker
            .info()
            .await
            .map_err(|e| engine_error("cannot read engine info", e))?;
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
        if let Some(id) = &config.id {
            runner_info.id = id.clone();
        }
        runner_info.labels = labels;
        if local {
            std::fs::create_dir_all(&config.workspace_root).map_err(|e| {
                Error::invalid_config(format!(
                    "workspace root {} cannot be created",
                    config.workspace_root.display()
                ))
                .caused_by(e)
            })?;
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
        self.abandon_job(id)
            .await
            .map_err(|e| e.for_runner(&self.inner.info.name))
    }

    async fn start(&self, spec: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        self.start_job(spec, id)
            .await
            .map_err(|e| e.for_runner(&self.inner.info.name))
    }
}
