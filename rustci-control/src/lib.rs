//! # rustci-control
//!
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
//! Everything that must outlive the process goes through a [`Store`] ([`MemoryStore`], or
//! `SqliteStore` with feature `sqlite`); job output goes to a [`LogHub`] that any number of
//! followers read from any offset. After a crash, [`ControlPlane::recover`] queues what was
//! waiting and retries (or marks `lost`) what was running.

#![deny(missing_docs)]

mod archive;
pub mod degradation;
mod dispatcher;
mod error;
mod logs;
mod queue;
mod registry;
pub mod retention;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;

pub use degradation::DegradationOptions;
pub use dispatcher::{
    Attempt, ControlEvent, ControlOptions, ControlPlane, JobRecord, JobState, MAX_DECLINED,
    Observer, Recovery, attempt_id, parse_attempt_id,
};
pub use error::Error;
pub use logs::{LogChunk, LogFollower, LogHub, StoredLog};
pub use queue::{JobQueue, QueuedJob};
pub use registry::{
    HEALTH_HISTORY, HealthCheck, RegisterOptions, Registry, RunnerEntry, RunnerStatus, StatusChange,
};
pub use retention::{RetentionOptions, RetentionReport};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
pub use store::{
    AuditEntry, JobPage, JobQuery, LogRecord, LogState, LogTotals, MemoryStore, RunnerRecord,
    Store, Transition,
};
