//! # rustci-runners
//!
//! Run CI jobs on pluggable executors.
//!
//! - [`job`]: the job model. [`JobSpec`] is what runners read; [`Job`] is its standard
//!   serde implementation, loaded from YAML or JSON with every problem reported.
//! - [`runner`]: the [`Runner`] trait (object safe, `Arc<dyn Runner>`), its declared
//!   [`Capabilities`], the [`Execution`] handle with its ordered [`Event`] stream, and the
//!   [`Outcome`] value. A failed job is an outcome; `Err` means the runner could not work.
//! - [`select`]: the pure, synchronous [`Selector`] trait and [`LeastLoaded`].
//! - [`LocalRunner`] (shell steps on the host) and [`NativeRunner`] (direct exec with
//!   kernel-enforced limits) share one process supervisor: each step runs in its own
//!   session and process group under a subreaper shim, so SIGTERM → grace → SIGKILL reaches
//!   every process of the job, including ones that called `setsid`, and nothing of a job is
//!   left when it ends.
//! - `testkit` (feature `testkit`): the conformance suite every runner must pass.
//!
//! ```no_run
//! use rustci_runners::{Job, NativeConfig, NativeRunner, Runner, Step, EventKind, JobId};
//! # async fn demo() -> Result<(), rustci_runners::Error> {
//! let runner = NativeRunner::new(NativeConfig::default())?;
//! let job = Job::new("uname", vec![Step::command(["uname", "-s"])]);
//! let mut execution = runner.start(&job, JobId::new()).await?;
//! while let Some(event) = execution.next_event().await {
//!     if let EventKind::Output { data, .. } = &event.kind {
//!         print!("{}", String::from_utf8_lossy(data));
//!     }
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod error;
mod host;
pub mod job;
mod local;
pub mod mask;
mod native;
pub mod output;
pub mod owner;
mod process;
pub mod runner;
pub mod select;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::{Backend, BackendConfig, Backends, ConfigBackend, PullPolicy, RunnerSettings};
pub use error::{Error, ErrorKind, RunnerError};
pub use host::HostConfig;
pub use job::{Job, JobSpec, Resources, Step, StepAction};
pub use local::LocalRunner;
pub use native::{CgroupMode, Namespaces, NativeConfig, NativeRunner};
pub use runner::{
    Canceller, Capabilities, CollectedRun, Event, EventKind, Execution, ExecutionSink, Health,
    HostPressure, Isolation, JobId, Limit, Outcome, OutputStream, ResourceUsage, Runner, RunnerExt,
    RunnerInfo, RunnerKind, SlotGuard, Slots, StepStatus, UsageFigure,
};
pub use select::{LeastLoaded, NoRunnerFits, RunnerPool, RunnerSnapshot, Selector};
