//! An agent's runner as the control plane's registry holds it.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use rustci_runners::backend::{Backend, RunnerSettings, parse_options};
use rustci_runners::job::JobSpec;
use rustci_runners::runner::{Execution, JobId, RunnerInfo};
use rustci_runners::{Capabilities, Error, Health, Runner, RunnerKind};

use crate::hub::HubInner;

/// What the store keeps of an agent's runner (the `valkyrie` section of its
/// registration), so a restarted control plane has it before the agent reconnects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRunnerConfig {
    /// The agent's id.
    pub agent: String,
    /// The runner's name on the agent.
    pub runner: String,
    /// Its kind on the agent (`native`, `docker`, …).
    pub local_kind: String,
    /// What it can do, as the agent reported.
    pub capabilities: Capabilities,
}

/// A runner of a remote agent: `start` offers the job over the agent's session and
/// returns once the agent accepted it; its events and outcome come back over the
/// session. Kind `valkyrie`; id `<agent id>.<runner name>`.
pub struct RemoteRunner {
    info: RunnerInfo,
    config: RemoteRunnerConfig,
    hub: Arc<HubInner>,
}

impl std::fmt::Debug for RemoteRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRunner")
            .field("id", &self.info.id)
            .finish_non_exhaustive()
    }
}

impl RemoteRunner {
    pub(crate) fn new(
        hub: Arc<HubInner>,
        id: String,
        name: String,
        labels: Vec<String>,
        config: RemoteRunnerConfig,
    ) -> Self {
        let mut info = RunnerInfo::new(name, RunnerKind::Valkyrie).with_labels(labels);
        info.id = id;
        RemoteRunner { info, config, hub }
    }

    /// The agent it belongs to.
    pub fn agent_id(&self) -> &str {
        &self.config.agent
    }

    /// Its kind on the agent.
    pub fn local_kind(&self) -> &str {
        &self.config.local_kind
    }
}

#[async_trait]
impl Runner for RemoteRunner {
    fn info(&self) -> &RunnerInfo {
        &self.info
    }

    fn capabilities(&self) -> &Capabilities {
        &self.config.capabilities
    }

    fn running(&self) -> usize {
        self.hub.running(&self.config.agent, &self.config.runner)
    }

    async fn health(&self) -> Health {
        self.hub.health(&self.config.agent, &self.config.runner)
    }

    async fn start(&self, job: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        let job = job.to_job();
        job.validate().map_err(Error::InvalidSpec)?;
        let reasons = self.config.capabilities.unmet(&job);
        if !reasons.is_empty() {
            return Err(Error::Unsupported {
                runner: self.info.name.clone(),
                reasons,
            });
        }
        let json = serde_json::to_string(&job)
            .map_err(|e| Error::rejected(format!("encoding the job: {e}")))?;
        self.hub
            .offer(
                &self.config.agent,
                &self.config.runner,
                &self.info.id,
                json,
                id,
            )
            .await
            .map_err(|e| e.for_runner(&self.info.id))
    }

    async fn reattach(&self, id: &JobId, held: u64) -> Result<Option<Execution>, Error> {
        self.hub
            .reattach(&self.config.agent, &self.config.runner, id, held)
            .await
    }
}

fn parse(options: &serde_json::Value) -> Result<RemoteRunnerConfig, Error> {
    if options.is_null() {
        return Err(Error::invalid_config(
            "valkyrie runners are made by agents registering, not by configuration",
        ));
    }
    parse_options::<Option<RemoteRunnerConfig>>(crate::KIND, options)?
        .ok_or_else(|| Error::invalid_config("valkyrie options: missing"))
}

/// Builds agents' runners from stored registrations (kind `valkyrie`). Only the hub
/// creates such registrations; one naming an agent the hub does not know is refused.
pub struct ValkyrieBackend {
    hub: Arc<HubInner>,
}

impl std::fmt::Debug for ValkyrieBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkyrieBackend").finish_non_exhaustive()
    }
}

impl ValkyrieBackend {
    pub(crate) fn new(hub: Arc<HubInner>) -> Self {
        ValkyrieBackend { hub }
    }
}

#[async_trait]
impl Backend for ValkyrieBackend {
    fn kind(&self) -> &'static str {
        crate::KIND
    }

    fn check(&self, _settings: &RunnerSettings, options: &serde_json::Value) -> Result<(), Error> {
        let config = parse(options)?;
        if self.hub.agent_labels(&config.agent).is_none() {
            return Err(Error::invalid_config(format!(
                "valkyrie runners are made by agents registering; agent {:?} is not registered",
                config.agent
            )));
        }
        Ok(())
    }

    async fn build(
        &self,
        settings: &RunnerSettings,
        options: &serde_json::Value,
    ) -> Result<Arc<dyn Runner>, Error> {
        self.check(settings, options)?;
        let config = parse(options)?;
        let id = settings
            .id
            .clone()
            .unwrap_or_else(|| crate::hub::runner_id(&config.agent, &config.runner));
        Ok(Arc::new(RemoteRunner::new(
            self.hub.clone(),
            id,
            settings.name.clone(),
            settings.labels.clone(),
            config,
        )))
    }
}
