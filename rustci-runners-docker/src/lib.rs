//! # rustci-runners-docker
//!
//! [`DockerRunner`]: one container per job on a Docker engine, through bollard.
//!
//! Lifecycle of a job:
//!
//! ```text
//!  start(): validate ─ image per pull policy ─ workspace ─ create + start container
//!           (labels rustci.job / rustci.runner / rustci.owner; limits; /workspace)
//!     │
//!     ▼  for each step: exec in the container (run: image shell -e -c; command: argv)
//!        ── output streamed live ── exit code from the engine
//!     │      timeout/cancel: SIGTERM to every process of the container, grace, SIGKILL
//!     ▼
//!  container and workspace removed (always; a crashed owner's leftovers are swept
//!  by label when a runner with the same name starts)
//! ```
//!
//! The container's first process is a small `sh` loop that keeps it alive between steps
//! and forwards SIGTERM to every process in the container, so images need a POSIX
//! `/bin/sh` (a static busybox is enough). An exit code of 129-192 from the engine is
//! reported as death by signal (code - 128): the engine cannot tell the two apart.

#![deny(missing_docs)]

mod config;
mod container;
mod image;
mod job;
mod runner;
mod warm;

pub use config::{DockerBackend, DockerConfig, Engine, KIND, PullPolicy, RegistryAuth, WarmPool};
pub use runner::DockerRunner;
