//! The conformance suite: checks that every [`Runner`] must pass, chosen by its declared
//! [`Capabilities`](crate::Capabilities).
//!
//! Each check is a public async function taking a [`Target`] (a `&dyn Runner` plus the
//! image to use for container runners). Jobs are POSIX `sh` scripts using only commands a
//! static busybox provides, so that container runners can run them in a minimal image. A
//! check returns `Err(Failure)` naming what it saw; it never panics on a runner's mistake.
//! A check that does not apply to the runner (a capability it does not declare, or a
//! runner whose jobs this host cannot see) returns [`CheckOutcome::Skipped`] with the
//! reason: it verified nothing and is not a pass.
//!
//! ```text
//!  run_check(name) ──► check(target) ──► jobs, each through run_job:
//!                                          start ─► events (contract checked, processes
//!                                          recorded) ─► Finished ─► nothing left?
//!                 ◄── Passed | Skipped(reason) | Err(Failure)   (or Err after CHECK_LIMIT)
//! ```
//!
//! Every check also verifies the event contract (sequence numbers from 0 without gaps,
//! `Started` first, `Finished` last and equal to the outcome) and that no process of its
//! jobs is left on this host afterwards. For the latter, runners MUST put `RUSTCI_JOB_ID`
//! (the execution id) in every step's environment; processes are found through
//! `/proc/*/environ`, which also sees processes in local containers. For host runners
//! ([`RunnerKind::Local`], [`RunnerKind::Native`]) the suite also follows each step's
//! process tree, which catches a process that replaced its environment (`env -i`): at the
//! 1st, 2nd, 4th, 8th … output event of a step it records every descendant of the step's
//! shim (the runner's child that is the step's subreaper), and afterwards none of them
//! may be alive. The shim is found from a process whose environment names the job, so a
//! process that replaced its environment is followed when one of its step's processes
//! still has the job's environment at a snapshot (the step's main process, as a rule).
//! A `/proc` entry that cannot be read, for any reason but the process having exited, is
//! a failure, never "nothing left"; the only exceptions are processes that cannot be live
//! processes of the job: those started before it, those without an address space any more
//! (exiting, zombies), and, for host runners when the suite does not run as root, other
//! users' (a host runner's jobs run as its own user).
//!
//! The checks are listed once, in the order [`run_all`] runs them, and that list makes
//! [`CHECKS`], the dispatch of [`run_check`] and the tests of
//! [`conformance_tests!`](crate::conformance_tests), which gives one `#[tokio::test]` per
//! check:
//!
//! ```no_run
//! # mod m {
//! use rustci_runners::testkit::Target;
//! use rustci_runners::{HostConfig, LocalRunner};
//!
//! fn target() -> Target {
//!     Target::new(LocalRunner::new(HostConfig::default()).unwrap())
//! }
//! rustci_runners::conformance_tests!(target());
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::job::{Job, Step};
use crate::process::ProcessTable;
use crate::runner::{EventKind, JobId, Outcome, OutputStream, Runner, RunnerInfo, RunnerKind};

/// Longest any single check may take before it is declared hung.
pub const CHECK_LIMIT: Duration = Duration::from_secs(180);

/// The one list of checks, in the order [`run_all`](crate::testkit::run_all) runs them:
/// expands to `$then! { $args ; name, name, ... }`. Adding a check is writing its function
/// in `testkit` and its name here.
#[doc(hidden)]
#[macro_export]
macro_rules! __rustci_conformance_checks {
    ([$($then:tt)*] { $($args:tt)* }) => {
        $($then)*! { $($args)* ;
            exit_codes,
            signal_death,
            stream_separation,
            large_output,
            binary_output,
            env_passing,
            host_env_isolation,
            secret_masking,
            secret_split_across_writes,
            timeout_kills_tree,
            sigterm_ignored,
            cancel_mid_run,
            background_holds_stdout,
            concurrent_jobs,
            missing_command,
            missing_program_in_script,
            command_without_shell,
            workspace_isolation,
        }
    };
}

macro_rules! check_table {
    (; $($name:ident),* $(,)?) => {
        /// Names of every check, in the order [`run_all`] runs them.
        pub const CHECKS: &[&str] = &[$(stringify!($name)),*];

        /// Runs the check called `name` (without the time limit); `None` for an unknown name.
        async fn dispatch(t: &Target, name: &str) -> Option<CheckResult> {
            match name {
                $(stringify!($name) => Some($name(t).await),)*
                _ => None,
            }
        }
    };
}

crate::__rustci_conformance_checks!([check_table] {});

/// A runner under test and what its jobs need.
#[derive(Clone)]
pub struct Target {
    runner: Arc<dyn Runner>,
    image: Option<String>,
}

impl Target {
    /// A target for `runner`.
    pub fn new(runner: impl Runner + 'static) -> Self {
        Target {
            runner: Arc::new(runner),
            image: None,
        }
    }

    /// A target for a shared runner.
    pub fn shared(runner: Arc<dyn Runner>) -> Self {
        Target {
            runner,
            image: None,
        }
    }

    /// Sets the image every check job uses (container runners).
    pub fn with_image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// The runner.
    pub fn runner(&self) -> &dyn Runner {
        &*self.runner
    }

    /// A shell step: `run:` when supported, else `command: [sh, -c, ...]`.
    pub fn sh(&self, script: &str) -> Step {
        if self.runner.capabilities().run_steps {
            Step::run(script)
        } else {
            Step::command(["sh", "-c", script])
        }
    }

    /// A job with the target's image.
    pub fn job(&self, name: &str, steps: Vec<Step>) -> Job {
        let mut job = Job::new(name, steps);
        job.image = self.image.clone();
        job
    }

    /// True for a runner whose jobs are processes of this host started by this process
    /// (local, native): their process trees are followed too.
    fn on_host(&self) -> bool {
        matches!(
            self.runner.info().kind,
            RunnerKind::Local | RunnerKind::Native
        )
    }
}

/// Why a check failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

/// How a check ended when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckOutcome {
    /// Everything the check states held.
    Passed,
    /// The check does not apply to this runner; the text says why. Nothing was verified,
    /// and it does not count as a pass.
    Skipped(String),
}

/// The result of one check.
pub type CheckResult = Result<CheckOutcome, Failure>;

fn passed() -> CheckResult {
    Ok(CheckOutcome::Passed)
}

fn skipped(reason: impl Into<String>) -> CheckResult {
    Ok(CheckOutcome::Skipped(reason.into()))
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failure(format!($($msg)+)));
        }
    };
}

/// Everything one job produced.
#[derive(Debug)]
pub struct Record {
    /// Execution id.
    pub id: JobId,
    /// stdout bytes.
    pub stdout: Vec<u8>,
    /// stderr bytes.
    pub stderr: Vec<u8>,
    /// The outcome from `wait` (and from the `Finished` event).
    pub outcome: Outcome,
    /// Events other than output, in order.
    pub events: Vec<EventKind>,
    /// Wall time from start to outcome.
    pub elapsed: Duration,
}

impl Record {
    /// stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text (lossy).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

mod checks;
mod image;
mod processes;
mod run;

pub use checks::*;
pub use image::{BUSYBOX_IMAGE, busybox_image, busybox_image_or_skip, requires_root};
pub use processes::processes_of;
use processes::*;
use run::*;
pub use run::{rss_bytes, run_job};

/// Runs one check by name, within [`CHECK_LIMIT`]. An unknown name is a failure.
pub async fn run_check(t: &Target, name: &str) -> CheckResult {
    let info: RunnerInfo = t.runner().info().clone();
    let tagged =
        |message: String| Failure(format!("[{} {}] {name}: {message}", info.kind, info.name));
    match tokio::time::timeout(CHECK_LIMIT, dispatch(t, name)).await {
        Ok(Some(result)) => result.map_err(|f| tagged(f.0)),
        Ok(None) => Err(Failure(format!(
            "unknown conformance check {name:?} (the checks are {CHECKS:?})"
        ))),
        Err(_) => Err(tagged(format!("hung for more than {CHECK_LIMIT:?}"))),
    }
}

/// What [`run_all`] found.
#[derive(Debug)]
#[non_exhaustive]
pub struct Report {
    /// Each check's name and result, in the order of [`CHECKS`].
    pub results: Vec<(&'static str, CheckResult)>,
}

impl Report {
    /// The checks that passed.
    pub fn passed(&self) -> Vec<&'static str> {
        self.results
            .iter()
            .filter(|(_, r)| matches!(r, Ok(CheckOutcome::Passed)))
            .map(|(name, _)| *name)
            .collect()
    }

    /// The checks that did not apply, each with the reason.
    pub fn skipped(&self) -> Vec<(&'static str, &str)> {
        self.results
            .iter()
            .filter_map(|(name, r)| match r {
                Ok(CheckOutcome::Skipped(reason)) => Some((*name, reason.as_str())),
                _ => None,
            })
            .collect()
    }

    /// The failures.
    pub fn failures(&self) -> Vec<&Failure> {
        self.results
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .collect()
    }
}

/// Runs every check, one after the other, and reports each one's result.
pub async fn run_all(t: &Target) -> Report {
    let mut results = Vec::new();
    for &name in CHECKS {
        results.push((name, run_check(t, name).await));
    }
    Report { results }
}

/// Runs check `name` as a test does: a failure panics, a skip prints
/// `SKIPPED: <check>: <reason>` to stderr. `None` for the target (one this host cannot
/// provide) skips the check with that reason. The tests of
/// [`conformance_tests!`](crate::conformance_tests) are calls of this.
pub async fn check_as_test(target: Option<Target>, name: &str) {
    let Some(target) = target else {
        eprintln!("SKIPPED: {name}: the conformance target is unavailable on this host");
        return;
    };
    match run_check(&target, name).await {
        Ok(CheckOutcome::Passed) => {}
        Ok(CheckOutcome::Skipped(reason)) => eprintln!("SKIPPED: {name}: {reason}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// Expands to one `#[tokio::test]` per conformance check (see [`testkit`](crate::testkit)),
/// each building its target with the given expression and running the check with
/// [`check_as_test`](crate::testkit::check_as_test).
///
/// - `conformance_tests!(expr)`: `expr` gives a [`Target`](crate::testkit::Target).
/// - `conformance_tests!(optional: expr)`: `expr` gives an `Option<Target>`; `None` skips
///   the check with a visible `SKIPPED` line (use it for targets that need something the
///   host may lack, and make the expression panic when the environment demands the
///   target, as `RUSTCI_REQUIRE_*` variables do).
/// - `conformance_tests!(ignored: "reason", expr)`: every test is `#[ignore = "reason"]`,
///   so that it shows as skipped in the test runner's summary and runs only when asked for
///   (`cargo nextest run --run-ignored all`, `cargo test -- --ignored`); `expr` gives a
///   `Target` and should panic, naming what is missing, when it cannot.
#[macro_export]
macro_rules! conformance_tests {
    (@each $attrs:tt ($target:expr); $($name:ident),* $(,)?) => {
        $( $crate::conformance_tests!(@one $attrs ($target) $name); )*
    };
    (@one [$($attr:tt)*] ($target:expr) $name:ident) => {
        $($attr)*
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::testkit::check_as_test($target, stringify!($name)).await;
        }
    };
    (ignored: $reason:literal, $target:expr) => {
        $crate::__rustci_conformance_checks!([$crate::conformance_tests] {
            @each [#[ignore = $reason]] (::std::option::Option::Some($target))
        });
    };
    (optional: $target:expr) => {
        $crate::__rustci_conformance_checks!([$crate::conformance_tests] {
            @each [] ($target)
        });
    };
    ($target:expr) => {
        $crate::__rustci_conformance_checks!([$crate::conformance_tests] {
            @each [] (::std::option::Option::Some($target))
        });
    };
}
