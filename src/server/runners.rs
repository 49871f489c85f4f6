//! Builds the runners a server runs in process, from [`RunnerConfig`]s.

use std::sync::Arc;

use rustci_runners::{Error, HostConfig, LocalRunner, NativeConfig, NativeRunner, Runner};

use super::config::RunnerConfig;

/// Turns runner descriptions into runners.
#[derive(Clone, Debug, Default)]
pub struct RunnerFactory {
    _private: (),
}

/// Slots of a runner whose description names none.
pub const DEFAULT_SLOTS: usize = 4;

impl RunnerFactory {
    /// A factory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the runner `config` describes, with a fixed `id` when given.
    pub async fn build(
        &self,
        config: &RunnerConfig,
        id: Option<String>,
    ) -> Result<Arc<dyn Runner>, Error> {
        let mut host = HostConfig::named(config.name.clone());
        host.id = id;
        host.labels = config.labels.clone();
        host.max_concurrency = Some(config.slots.unwrap_or(DEFAULT_SLOTS));
        if let Some(root) = &config.workspace_root {
            host.workspace_root = root.clone();
        }
        match config.kind.as_str() {
            "local" => Ok(Arc::new(LocalRunner::new(host)?)),
            "native" => {
                let mut native = NativeConfig::default();
                native.host = host;
                Ok(Arc::new(NativeRunner::new(native)?))
            }
            #[cfg(feature = "docker")]
            "docker" => {
                let mut docker = rustci_runners_docker::DockerConfig::default();
                docker.name = config.name.clone();
                docker.labels = config.labels.clone();
                docker.max_concurrency = Some(config.slots.unwrap_or(DEFAULT_SLOTS));
                Ok(Arc::new(
                    rustci_runners_docker::DockerRunner::connect(docker).await?,
                ))
            }
            other => Err(Error::invalid_config(format!(
                "unknown runner kind {other:?}"
            ))),
        }
    }
}
