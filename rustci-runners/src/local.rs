//! [`LocalRunner`]: `run:` steps through a shell on the host.
//!
//! Each job gets a fresh workspace under the configured root (removed afterwards unless
//! configured to keep it), a clean environment (only allowlisted host variables plus the
//! job's own), its own session and process group, and masked output. `command:` steps are
//! not supported: use [`crate::NativeRunner`] for those.

use async_trait::async_trait;

use crate::Error;
use crate::host::{HostConfig, HostEngine, check_config, host_labels};
use crate::job::JobSpec;
use crate::runner::{
    Capabilities, Execution, Health, Isolation, JobId, Runner, RunnerInfo, RunnerKind, UsageFigure,
};

/// Runs `run:` steps through a shell on the host.
///
/// ```no_run
/// use rustci_runners::{HostConfig, Job, LocalRunner, RunnerExt, Step};
/// # async fn demo() -> Result<(), rustci_runners::Error> {
/// let runner = LocalRunner::new(HostConfig::named("local"))?;
/// let run = runner.run_collect(&Job::new("hello", vec![Step::run("echo hi")])).await?;
/// assert_eq!(run.stdout, b"hi\n");
/// # Ok(()) }
/// ```
pub struct LocalRunner {
    engine: HostEngine,
}

impl LocalRunner {
    /// A local runner. Fails with an [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) error when the shell is missing or the
    /// workspace root cannot be written.
    pub fn new(config: HostConfig) -> Result<Self, Error> {
        check_config(&config)?;
        let mut info = RunnerInfo::new(config.name.clone(), RunnerKind::Local);
        if let Some(id) = &config.id {
            info.id = id.clone();
        }
        info.labels = host_labels(&config.labels);
        let mut caps = Capabilities::host(Isolation::Process);
        // From the kernel's rusage of each step's processes (see `EventKind::Usage`).
        caps.usage = [UsageFigure::CpuTime, UsageFigure::Io].into();
        caps.max_concurrency = config.max_concurrency;
        caps.termination_grace = config.termination_grace;
        Ok(LocalRunner {
            engine: HostEngine::new(info, caps, config, None),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &HostConfig {
        &self.engine.config
    }
}

#[async_trait]
impl Runner for LocalRunner {
    fn info(&self) -> &RunnerInfo {
        &self.engine.info
    }
    fn capabilities(&self) -> &Capabilities {
        &self.engine.caps
    }
    fn running(&self) -> usize {
        self.engine.running()
    }
    async fn health(&self) -> Health {
        self.engine.health()
    }
    fn pressure(&self) -> Option<crate::runner::HostPressure> {
        Some(self.engine.pressure())
    }
    async fn start(&self, job: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        self.engine.start(job, id).await
    }
    async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        self.engine.abandon(id).await
    }
}
