//! # rustci
//!
//! Facade over [`rustci_runners`] and its backends. Everything of the core is re-exported
//! at the root; backends are enabled with cargo features:
//!
//! | feature    | module       | crate                      |
//! |------------|--------------|----------------------------|
//! | `docker`   | `docker`     | `rustci-runners-docker`    |
//! | `k8s`      | `k8s`        | `rustci-runners-k8s`       |
//! | `control`  | `control`    | `rustci-control` (`sqlite` adds its SQLite store) |
//! | `cli`      | [`cli`]      | the `rustci` command's behaviour (default) |
//! | `server`   | [`server`]   | the control-plane server and HTTP API (default) |
//!
//! ```no_run
//! use rustci::{HostConfig, Job, LocalRunner, RunnerExt, Step};
//! # async fn demo() -> Result<(), rustci::Error> {
//! let runner = LocalRunner::new(HostConfig::default())?;
//! let outcome = runner.run_to_completion(&Job::new("hi", vec![Step::run("echo hi")])).await?;
//! assert!(outcome.is_success());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
// The OpenAPI document is one large `serde_json::json!` literal.
#![recursion_limit = "512"]

pub use rustci_runners::*;

/// Every runner kind compiled into this build, by name: `local` and `native` always,
/// `docker` with the feature `docker`, `kubernetes` with the feature `k8s`. A kind whose
/// feature is off is known, so asking for it names the feature to enable.
pub fn backends() -> Backends {
    #[allow(unused_mut)]
    let mut b = Backends::host();
    #[cfg(feature = "docker")]
    b.register(rustci_runners_docker::DockerBackend::new());
    #[cfg(not(feature = "docker"))]
    b.not_compiled("docker", "docker");
    #[cfg(feature = "k8s")]
    b.register(rustci_runners_k8s::KubernetesBackend::new());
    #[cfg(not(feature = "k8s"))]
    b.not_compiled("kubernetes", "k8s");
    b
}

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;

/// The control plane: registry, queue, dispatch, store, logs.
#[cfg(feature = "control")]
pub use rustci_control as control;
/// The Docker backend.
#[cfg(feature = "docker")]
pub use rustci_runners_docker as docker;
/// The Kubernetes backend.
#[cfg(feature = "k8s")]
pub use rustci_runners_k8s as k8s;
/// Remote agents over the Valkyrie protocol.
#[cfg(feature = "valkyrie")]
pub use rustci_runners_valkyrie as valkyrie;
