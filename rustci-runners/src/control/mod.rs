//! The control plane, in process: a [`Registry`] of runners with status and health, a
//! priority [`JobQueue`] with fair share between submitters, and [`ControlPlane`], which
//! selects a runner for each queued job, runs it, retries it per its policy (preferring
//! another runner), cancels it on request and marks it lost when its runner goes away.
//!
//! Job states:
//!
//! ```text
//!  submit ─► queued ─► assigned ─► running ─► succeeded | failed | timed_out | cancelled
//!              ▲                      │
//!              └──── retry ◄──────────┴─► lost (runner removed / unhealthy mid-job)
//! ```
//!
//! This is the in-memory core; durable storage, the HTTP API and metrics build on it.

mod dispatcher;
mod queue;
mod registry;

pub use dispatcher::{Attempt, ControlEvent, ControlPlane, JobRecord, JobState};
pub use queue::{JobQueue, QueuedJob};
pub use registry::{RegisterOptions, Registry, RunnerEntry, RunnerStatus, StatusChange};
