//! # rustci-runners-k8s
//!
//! The Kubernetes backend of rustci-runners: [`KubernetesRunner`] runs each job in a Pod of
//! its own through [kube](https://docs.rs/kube).
//!
//! - **One Pod per job** (`restartPolicy: Never`), labelled `rustci.managed`, `rustci.job`,
//!   `rustci.runner` and `rustci.runner.name` and annotated with its owner, so the sweep at
//!   start-up finds what a crashed runner left. Steps run in order in the job container
//!   under a small generated entry script (see below), so they share the workspace and
//!   start without a container start each.
//! - **Secrets** go into a Kubernetes Secret that the pod references with `secretKeyRef`;
//!   they never appear in the pod spec, and are masked in all output. The Secret is
//!   deleted with the pod.
//! - **Pod options** ([`PodOptions`]): requests and limits, node selector, tolerations,
//!   affinity, service account, pull policy and pull secrets, security context, the
//!   workspace volume (emptyDir or a claim), annotations and labels, and a strategic,
//!   merge or JSON patch on the generated spec for anything else.
//! - **Watch-driven**: one shared watch per runner (label selector) feeds every running
//!   job; output is followed live from the pod log (stdout and stderr apart where the
//!   cluster supports it). Nothing polls.
//! - **Stopping**: timeout and cancel delete the pod with the grace period (the kubelet
//!   sends SIGTERM, waits, then SIGKILL); the pod's `activeDeadlineSeconds` is a backstop
//!   should the runner itself go away.
//!
//! Why one container running a script rather than a container per step: a container per
//! step needs one log request per step and one container start per step, and has no way
//! to let a step fail without failing the pod; a script keeps the API requests per job
//! constant (at most six: create Secret, create Pod, two log streams, delete Pod, delete
//! Secret) and lets the runner report each step's own exit code from markers the script
//! writes around it. Images therefore need a POSIX `/bin/sh`, as with the Docker runner.
//!
//! ```no_run
//! use rustci_runners::{Job, RunnerExt, Step};
//! use rustci_runners_k8s::{Connection, KubernetesConfig, KubernetesRunner};
//! # async fn demo() -> Result<(), rustci_runners::Error> {
//! let mut config = KubernetesConfig::default();
//! config.connection = Connection::Kubeconfig { path: None, context: None };
//! config.namespace = Some("ci".into());
//! config.default_image = Some("busybox:1.36".into());
//! let runner = KubernetesRunner::connect(config).await?;
//! let run = runner.run_collect(&Job::new("hi", vec![Step::run("echo hi")])).await?;
//! assert_eq!(run.stdout, b"hi\n");
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod config;
mod job;
mod logs;
mod outcome;
mod pod;
mod quantity;
mod runner;
mod script;
mod watch;

pub use config::{
    Connection, KIND, KubernetesBackend, KubernetesConfig, LogStreams, PodOptions, PodPatch,
    PullPolicy, SecurityOptions, WorkspaceVolume,
};
pub use k8s_openapi;
pub use pod::{
    ANNOTATION_JOB_ID, ANNOTATION_OWNER, ANNOTATION_RUNNER_NAME, CONTAINER, MAX_SCRIPT_BYTES,
};
pub use quantity::validate_quantity;
pub use runner::KubernetesRunner;
