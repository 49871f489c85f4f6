//! The job model: the [`JobSpec`] trait that runners read, and [`Job`], its standard
//! serde implementation loaded from YAML or JSON job files.
//!
//! ```
//! use rustci_runners::job::Job;
//!
//! let job = Job::from_yaml("name: hello\nsteps:\n  - run: echo hi\n").unwrap();
//! assert_eq!(job.name, "hello");
//! assert_eq!(job.steps.len(), 1);
//!
//! let errors = Job::from_yaml("name: bad name\nsteps: []\ncolour: red\n").unwrap_err();
//! assert_eq!(errors.len(), 3);
//! assert!(errors.to_string().contains("colour"));
//! ```

mod parse;
pub mod units;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runner::RunnerKind;

pub use parse::{ValidationError, ValidationErrors};

/// Timeout of a job that sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most steps a job may have.
pub const MAX_STEPS: usize = 100;
/// Largest `run:` script, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;
/// Most retries a job may ask for.
pub const MAX_RETRIES: u32 = 10;

/// The runner-facing view of a job.
///
/// Runners read a job only through this trait, so an embedding project can hand its own
/// pipeline model to any runner. Implementations MUST return the same values on every call
/// while a job is being started. [`Job`] is the standard implementation; anything that
/// crosses a process or network boundary is converted to a `Job` with [`JobSpec::to_job`].
pub trait JobSpec: Send + Sync {
    /// The job's name: 1-128 characters of `[A-Za-z0-9._-]`.
    fn name(&self) -> &str;
    /// The steps, run in order in the same workspace.
    fn steps(&self) -> Cow<'_, [Step]>;
    /// Environment variables for every step.
    fn env(&self) -> Cow<'_, BTreeMap<String, String>>;
    /// Secrets: passed to steps as environment variables and masked in every output.
    fn secrets(&self) -> Cow<'_, BTreeMap<String, String>>;
    /// Limit on the whole job's run time.
    fn timeout(&self) -> Duration;
    /// Working directory relative to the job workspace.
    fn workdir(&self) -> Option<&str>;
    /// Container image; host runners ignore it.
    fn image(&self) -> Option<&str>;
    /// Limits the runner must enforce or refuse the job.
    fn resources(&self) -> Resources;
    /// What the selector must honour.
    fn runs_on(&self) -> Cow<'_, RunsOn>;
    /// Higher runs first.
    fn priority(&self) -> i32;
    /// When and how often a failed attempt is retried.
    fn retry(&self) -> RetryPolicy;

    /// Converts the job into the standard serde model.
    fn to_job(&self) -> Job {
        Job {
            name: self.name().to_string(),
            steps: self.steps().into_owned(),
            env: self.env().into_owned(),
            secrets: self.secrets().into_owned(),
            timeout: Some(self.timeout()),
            workdir: self.workdir().map(str::to_string),
            image: self.image().map(str::to_string),
            resources: self.resources(),
            runs_on: self.runs_on().into_owned(),
            priority: self.priority(),
            retry: self.retry(),
        }
    }
}

/// A job as written in a job file (format version 1).
///
/// Load one with [`Job::from_yaml`], [`Job::from_json`] or [`Job::from_path`], which check
/// everything and report every problem with its field path and position; build one in code
/// and check it with [`Job::validate`]. `Debug` never shows secret values.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Job {
    /// 1-128 characters of `[A-Za-z0-9._-]`.
    pub name: String,
    /// 1 to 100 steps, run in order.
    pub steps: Vec<Step>,
    /// Environment for every step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Passed as environment variables, never shown in any output.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Whole-job timeout; [`DEFAULT_TIMEOUT`] when absent.
    #[serde(
        default,
        with = "units::serde_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Working directory relative to the workspace; no `..`, not absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Image for container runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Limits the runner enforces or refuses.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Constraints on runner selection.
    #[serde(default, skip_serializing_if = "RunsOn::is_empty")]
    pub runs_on: RunsOn,
    /// Higher runs first.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    pub retry: RetryPolicy,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secrets: BTreeMap<&str, &str> =
            self.secrets.keys().map(|k| (k.as_str(), "***")).collect();
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("steps", &self.steps)
            .field("env", &self.env)
            .field("secrets", &secrets)
            .field("timeout", &self.timeout)
            .field("workdir", &self.workdir)
            .field("image", &self.image)
            .field("resources", &self.resources)
            .field("runs_on", &self.runs_on)
            .field("priority", &self.priority)
            .field("retry", &self.retry)
            .finish()
    }
}

impl Job {
    /// A job with the given name and steps and every optional field at its default.
    pub fn new(name: impl Into<String>, steps: Vec<Step>) -> Self {
        Job {
            name: name.into(),
            steps,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            timeout: None,
            workdir: None,
            image: None,
            resources: Resources::default(),
            runs_on: RunsOn::default(),
            priority: 0,
            retry: RetryPolicy::default(),
        }
    }

    /// Sets an environment variable (builder style).
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets a secret (builder style).
    pub fn with_secret(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.secrets.insert(name.into(), value.into());
        self
    }

    /// Sets the whole-job timeout (builder style).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the resources (builder style).
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// Sets the working directory (builder style).
    pub fn with_workdir(mut self, workdir: impl Into<String>) -> Self {
        self.workdir = Some(workdir.into());
        self
    }

    /// Parses and validates a YAML job document. Every problem is reported, each with its
    /// field path, line and column.
    pub fn from_yaml(text: &str) -> Result<Job, ValidationErrors> {
        parse::parse_document(text)
    }

    /// Parses and validates a JSON job document (JSON is read as YAML 1.2, so problems carry
    /// line and column too).
    pub fn from_json(text: &str) -> Result<Job, ValidationErrors> {
        parse::parse_document(text)
    }

    /// Reads a job file (YAML, or JSON when the name ends in `.json`) and validates it.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Job, crate::Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::JobFile {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            Job::from_json(&text)
        } else {
            Job::from_yaml(&text)
        };
        parsed.map_err(crate::Error::InvalidSpec)
    }

    /// Checks every rule of the job format on a job built in code. Errors name field paths
    /// but carry no positions.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        parse::check_semantics(self, &mut |path, message| errors.push(path, message, None));
        errors.into_result()
    }

    /// The effective whole-job timeout.
    pub fn effective_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }
}

impl JobSpec for Job {
    fn name(&self) -> &str {
        &self.name
    }
    fn steps(&self) -> Cow<'_, [Step]> {
        Cow::Borrowed(&self.steps)
    }
    fn env(&self) -> Cow<'_, BTreeMap<String, String>> {
        Cow::Borrowed(&self.env)
    }
    fn secrets(&self) -> Cow<'_, BTreeMap<String, String>> {
        Cow::Borrowed(&self.secrets)
    }
    fn timeout(&self) -> Duration {
        self.effective_timeout()
    }
    fn workdir(&self) -> Option<&str> {
        self.workdir.as_deref()
    }
    fn image(&self) -> Option<&str> {
        self.image.as_deref()
    }
    fn resources(&self) -> Resources {
        self.resources.clone()
    }
    fn runs_on(&self) -> Cow<'_, RunsOn> {
        Cow::Borrowed(&self.runs_on)
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn retry(&self) -> RetryPolicy {
        self.retry.clone()
    }
    fn to_job(&self) -> Job {
        let mut job = self.clone();
        job.timeout = Some(self.effective_timeout());
        job
    }
}

/// What a step runs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepAction {
    /// A script for the runner's shell, run with errexit.
    Run(String),
    /// An argv executed directly, without a shell.
    Command(Vec<String>),
}

/// One step of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawStep", into = "RawStep")]
#[non_exhaustive]
pub struct Step {
    /// Display name; [`Step::display_name`] gives `step-N` when absent.
    pub name: Option<String>,
    /// What the step runs.
    pub action: StepAction,
    /// Per-step timeout.
    pub timeout: Option<Duration>,
    /// A failure here does not fail the job.
    pub continue_on_error: bool,
    /// Step-only environment; overrides the job's.
    pub env: BTreeMap<String, String>,
}

impl Step {
    /// A shell-script step.
    pub fn run(script: impl Into<String>) -> Self {
        Step::new(StepAction::Run(script.into()))
    }

    /// A direct-exec step.
    pub fn command<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Step::new(StepAction::Command(
            argv.into_iter().map(Into::into).collect(),
        ))
    }

    fn new(action: StepAction) -> Self {
        Step {
            name: None,
            action,
            timeout: None,
            continue_on_error: false,
            env: BTreeMap::new(),
        }
    }

    /// Sets the name (builder style).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the per-step timeout (builder style).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Marks the step as allowed to fail (builder style).
    pub fn allow_failure(mut self) -> Self {
        self.continue_on_error = true;
        self
    }

    /// Sets a step environment variable (builder style).
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// The step's name, or `step-N` (1-based) when it has none.
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("step-{}", index + 1))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(
        default,
        with = "units::serde_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    continue_on_error: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
}

impl TryFrom<RawStep> for Step {
    type Error = String;
    fn try_from(raw: RawStep) -> Result<Self, String> {
        let action = match (raw.run, raw.command) {
            (Some(script), None) => StepAction::Run(script),
            (None, Some(argv)) => StepAction::Command(argv),
            _ => return Err("a step needs exactly one of `run` and `command`".into()),
        };
        Ok(Step {
            name: raw.name,
            action,
            timeout: raw.timeout,
            continue_on_error: raw.continue_on_error,
            env: raw.env,
        })
    }
}

impl From<Step> for RawStep {
    fn from(step: Step) -> Self {
        let (run, command) = match step.action {
            StepAction::Run(s) => (Some(s), None),
            StepAction::Command(c) => (None, Some(c)),
        };
        RawStep {
            name: step.name,
            run,
            command,
            timeout: step.timeout,
            continue_on_error: step.continue_on_error,
            env: step.env,
        }
    }
}

/// Limits a runner must enforce for the job, or refuse it.
///
/// Build one with struct update syntax: `Resources { memory: Some(1 << 30), ..Resources::default() }`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU share in cores (`1.5` = one and a half cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    #[serde(
        default,
        with = "units::serde_opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<u64>,
    /// Most processes and threads at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// CPU time limit per process.
    #[serde(
        default,
        with = "units::serde_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_time: Option<Duration>,
    /// Most open files per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Largest file a process may write, in bytes.
    #[serde(
        default,
        with = "units::serde_opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub file_size: Option<u64>,
}

impl Resources {
    /// True when no limit is asked for.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// What the selector must honour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RunsOn {
    /// Only runners of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<RunnerKind>,
    /// Labels that must all be on the runner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

impl RunsOn {
    /// True when there is no constraint.
    pub fn is_empty(&self) -> bool {
        self.kind.is_none() && self.labels.is_empty()
    }
}

/// Why an attempt may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RetryWhen {
    /// The job's own steps failed (non-zero exit or signal).
    Failure,
    /// The job timed out.
    Timeout,
    /// The runner could not do its work.
    RunnerFailure,
    /// The runner went away while the job ran.
    Lost,
}

impl RetryWhen {
    /// The spelling used in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryWhen::Failure => "failure",
            RetryWhen::Timeout => "timeout",
            RetryWhen::RunnerFailure => "runner_failure",
            RetryWhen::Lost => "lost",
        }
    }
}

/// When and how often a failed attempt is retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = none, at most [`MAX_RETRIES`]).
    #[serde(default)]
    pub max: u32,
    /// Causes that allow a retry; `runner_failure` and `lost` when absent.
    #[serde(default = "RetryPolicy::default_when")]
    pub when: Vec<RetryWhen>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max: 0,
            when: Self::default_when(),
        }
    }
}

impl RetryPolicy {
    fn default_when() -> Vec<RetryWhen> {
        vec![RetryWhen::RunnerFailure, RetryWhen::Lost]
    }

    fn is_default(&self) -> bool {
        *self == RetryPolicy::default()
    }
}
