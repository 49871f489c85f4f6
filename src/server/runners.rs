//! Builds the runners a server runs in process, from [`RunnerConfig`]s, through the
//! registry of compiled-in runner kinds ([`Backends`]).

use std::sync::Arc;

use rustci_runners::{Backends, Error, Runner};

use super::config::RunnerConfig;

/// Turns runner descriptions into runners.
#[derive(Clone, Debug)]
pub struct RunnerFactory {
    backends: Backends,
}

pub use rustci_runners::backend::DEFAULT_SLOTS;

impl Default for RunnerFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl RunnerFactory {
    /// A factory for every kind compiled into this program ([`crate::backends`]).
    pub fn new() -> Self {
        Self::with_backends(crate::backends())
    }

    /// A factory for these kinds (an embedding project adds its own).
    pub fn with_backends(backends: Backends) -> Self {
        RunnerFactory { backends }
    }

    /// Adds a kind (the server adds `valkyrie` once its hub exists).
    pub(crate) fn register(&mut self, backend: impl rustci_runners::Backend + 'static) {
        self.backends.register(backend);
    }

    /// The kinds it builds.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Builds the runner `config` describes, with a fixed `id` when given (every built-in
    /// kind takes it; see [`rustci_runners::RunnerSettings::id`]).
    pub async fn build(
        &self,
        config: &RunnerConfig,
        id: Option<String>,
    ) -> Result<Arc<dyn Runner>, Error> {
        self.backends
            .build(&config.kind, &config.settings(id), &config.kind_options())
            .await
    }
}
