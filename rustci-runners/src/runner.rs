//! The [`Runner`] trait and what flows through it: declared [`Capabilities`], [`Health`],
//! the [`Execution`] handle with its ordered [`Event`] stream, and the [`Outcome`] value.
//!
//! Lifecycle of one execution:
//!
//! ```text
//!  start() ──► Started ──► StepStarted ─► Output* ─► StepFinished ─┐ (per step)
//!                 │                                                │
//!                 │  cancel() / timeout: SIGTERM ─ grace ─ SIGKILL │
//!                 ▼                                                ▼
//!              Finished(Outcome)  ◄───────────────────────────────┘
//!                 │
//!              wait() returns the same Outcome
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::job::JobSpec;

/// The kinds of runner the product knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunnerKind {
    /// Shell steps on the host.
    Local,
    /// Direct exec on the host with enforced limits.
    Native,
    /// One container per job on a Docker engine.
    Docker,
    /// One Pod per job on a Kubernetes cluster.
    Kubernetes,
    /// A runner of a remote agent, reached over the Valkyrie protocol.
    Valkyrie,
}

impl RunnerKind {
    /// Every kind, in declaration order.
    pub const ALL: [RunnerKind; 5] = [
        RunnerKind::Local,
        RunnerKind::Native,
        RunnerKind::Docker,
        RunnerKind::Kubernetes,
        RunnerKind::Valkyrie,
    ];

    /// The lowercase name used in job files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerKind::Local => "local",
            RunnerKind::Native => "native",
            RunnerKind::Docker => "docker",
            RunnerKind::Kubernetes => "kubernetes",
            RunnerKind::Valkyrie => "valkyrie",
        }
    }
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunnerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RunnerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown runner kind {s:?} (expected local, native, docker, kubernetes or valkyrie)"
                )
            })
    }
}

/// Who a runner is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerInfo {
    /// Unique id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Kind of runner.
    pub kind: RunnerKind,
    /// Labels that jobs can ask for in `runs_on.labels`.
    pub labels: BTreeSet<String>,
}

impl RunnerInfo {
    /// A runner identity with a fresh id and the given name and kind.
    pub fn new(name: impl Into<String>, kind: RunnerKind) -> Self {
        RunnerInfo {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            kind,
            labels: BTreeSet::new(),
        }
    }

    /// Adds labels (builder style).
    pub fn with_labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.labels.extend(labels.into_iter().map(Into::into));
        self
    }
}

/// How strongly a job is separated from the host and other jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Isolation {
    /// Host processes with a clean environment and a private workspace.
    Process,
    /// Host processes in their own Linux namespaces.
    Namespaces,
    /// A container.
    Container,
    /// A pod on a cluster node.
    Pod,
    /// Another machine.
    Remote,
}

/// A limit from [`crate::job::Resources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Limit {
    /// `resources.cpus`.
    Cpus,
    /// `resources.memory`.
    Memory,
    /// `resources.pids`.
    Pids,
    /// `resources.cpu_time`.
    CpuTime,
    /// `resources.open_files`.
    OpenFiles,
    /// `resources.file_size`.
    FileSize,
}

impl Limit {
    /// The field name under `resources`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Cpus => "cpus",
            Limit::Memory => "memory",
            Limit::Pids => "pids",
            Limit::CpuTime => "cpu_time",
            Limit::OpenFiles => "open_files",
            Limit::FileSize => "file_size",
        }
    }

    /// The limits a job's resources ask for.
    pub fn requested_by(r: &crate::job::Resources) -> BTreeSet<Limit> {
        let mut set = BTreeSet::new();
        if r.cpus.is_some() {
            set.insert(Limit::Cpus);
        }
        if r.memory.is_some() {
            set.insert(Limit::Memory);
        }
        if r.pids.is_some() {
            set.insert(Limit::Pids);
        }
        if r.cpu_time.is_some() {
            set.insert(Limit::CpuTime);
        }
        if r.open_files.is_some() {
            set.insert(Limit::OpenFiles);
        }
        if r.file_size.is_some() {
            set.insert(Limit::FileSize);
        }
        set
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a runner can do, declared truthfully: a capability is listed only when the runner
/// really provides it on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Runs `run:` (shell script) steps.
    pub run_steps: bool,
    /// Runs `command:` (argv) steps.
    pub command_steps: bool,
    /// Honours a job's `image`.
    pub images: bool,
    /// Runs only jobs that name an image (it has no default image of its own).
    #[serde(default)]
    pub needs_image: bool,
    /// Isolation level of a job.
    pub isolation: Isolation,
    /// Limits this runner enforces; a job asking for any other limit is refused.
    pub limits: BTreeSet<Limit>,
    /// Most jobs at once; `None` for no fixed bound.
    pub max_concurrency: Option<usize>,
    /// Time between SIGTERM and SIGKILL when a job is stopped.
    pub termination_grace: Duration,
    /// Operating system and architecture of the job environment, e.g. `linux/x86_64`.
    pub platform: String,
    /// Number of GPUs a job can use.
    pub gpus: u32,
    /// CPUs of the machine jobs run on, when known.
    pub cpus: Option<f64>,
    /// Memory of the machine jobs run on, in bytes, when known.
    pub memory: Option<u64>,
    /// The figures of [`ResourceUsage`] it reports for every job (see
    /// [`EventKind::Usage`]); others are absent.
    #[serde(default)]
    pub usage: BTreeSet<UsageFigure>,
}

impl Capabilities {
    /// Capabilities of a host runner on this machine with nothing enforced.
    pub fn host(isolation: Isolation) -> Self {
        Capabilities {
            run_steps: true,
            command_steps: false,
            images: false,
            needs_image: false,
            isolation,
            limits: BTreeSet::new(),
            max_concurrency: None,
            termination_grace: Duration::from_secs(10),
            platform: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            gpus: 0,
            cpus: std::thread::available_parallelism()
                .ok()
                .map(|n| n.get() as f64),
            memory: host_memory(),
            usage: BTreeSet::new(),
        }
    }

    /// Every reason this runner cannot take `job`, in words; empty when it can.
    pub fn unmet(&self, job: &dyn JobSpec) -> Vec<String> {
        let image = (self.needs_image && job.image().is_none())
            .then(|| "needs a job image (it has no default image)".to_string());
        self.unmet_step_kind(job)
            .into_iter()
            .chain(image)
            .chain(self.unmet_limits(&job.resources()))
            .collect()
    }

    /// Why the runner cannot run some step of `job` (its kind), if it cannot.
    pub fn unmet_step_kind(&self, job: &dyn JobSpec) -> Option<String> {
        let steps = job.steps();
        let has = |run: bool| {
            steps.iter().any(|s| match &s.action {
                crate::job::StepAction::Run(_) => run,
                crate::job::StepAction::Command(_) => !run,
            })
        };
        if !self.run_steps && has(true) {
            Some("cannot run `run:` steps".to_string())
        } else if !self.command_steps && has(false) {
            Some("cannot run `command:` steps".to_string())
        } else {
            None
        }
    }

    /// Which of the limits `resources` asks for this runner cannot enforce, in words.
    pub fn unmet_limits(&self, resources: &crate::job::Resources) -> Option<String> {
        let missing: Vec<&str> = Limit::requested_by(resources)
            .difference(&self.limits)
            .map(|l| l.as_str())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "cannot enforce resources.{} on this host",
                missing.join(", resources.")
            )
        })
    }
}

/// A runner's count of running jobs, checked against its concurrency limit.
#[derive(Clone, Debug, Default)]
pub struct Slots(Arc<std::sync::atomic::AtomicUsize>);

impl Slots {
    /// No job running.
    pub fn new() -> Self {
        Slots::default()
    }

    /// Jobs holding a slot now.
    pub fn running(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes a slot for one job, or [`Error::Busy`] naming `runner` when `max` are taken.
    /// The slot is given back when the guard drops.
    pub fn acquire(&self, runner: &str, max: Option<usize>) -> Result<SlotGuard, Error> {
        let now = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let guard = SlotGuard(self.0.clone());
        match max {
            Some(max) if now >= max => Err(Error::Busy {
                runner: runner.to_string(),
                running: now,
                max,
            }),
            _ => Ok(guard),
        }
    }
}

/// One job's slot (see [`Slots`]); released on drop.
#[derive(Debug)]
pub struct SlotGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Total memory of this host from `/proc/meminfo`.
fn host_memory() -> Option<u64> {
    meminfo("MemTotal:")
}

/// A `/proc/meminfo` figure (`key` with its colon), in bytes.
fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// A runner's own view of its health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Health {
    /// Ready for jobs.
    Healthy,
    /// Works, with a problem worth knowing.
    Degraded(String),
    /// Cannot run jobs now.
    Unhealthy(String),
    /// Works, but takes no new jobs until it recovers: its host is short of something
    /// (its workspace disk, say). Its running jobs go on; the control plane shows it as
    /// degraded with this reason.
    Full(String),
    /// Not reachable now (a remote runner whose connection is down). Takes no new jobs,
    /// but unlike [`Health::Unhealthy`] its running jobs are not given up: the runner
    /// itself ends them ([`Outcome::Lost`]) once it knows they are gone.
    Offline(String),
}

impl Health {
    /// True unless unhealthy or offline: it can run (and go on running) jobs.
    pub fn is_usable(&self) -> bool {
        !matches!(self, Health::Unhealthy(_) | Health::Offline(_))
    }

    /// True when it may be given a new job: usable and not [`Health::Full`].
    pub fn takes_new_jobs(&self) -> bool {
        self.is_usable() && !matches!(self, Health::Full(_))
    }
}

/// What a runner's host has left, as the runner measured it at its last health check
/// ([`Runner::pressure`]). Absent figures were not measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostPressure {
    /// Load average over one minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_1m: Option<f64>,
    /// Memory available for new work, bytes (`MemAvailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_available_bytes: Option<u64>,
    /// Free space under the workspace root, bytes (what an unprivileged user may use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
    /// Size of the file system of the workspace root, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<u64>,
    /// How full that file system is, percent (as `df` counts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_percent: Option<f64>,
}

impl HostPressure {
    /// This host's load and memory, and the file system holding `dir`.
    pub fn measure(dir: &std::path::Path) -> HostPressure {
        let load_1m = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        let memory_available_bytes = meminfo("MemAvailable:");
        let mut p = HostPressure {
            load_1m,
            memory_available_bytes,
            ..HostPressure::default()
        };
        // The nearest existing directory: the root may not be made yet.
        let existing = dir.ancestors().find(|d| d.exists());
        if let Some(vfs) = existing.and_then(|d| nix::sys::statvfs::statvfs(d).ok()) {
            // u64 on this platform (fsblkcnt_t, unsigned long).
            let frsize = vfs.fragment_size();
            let used = vfs.blocks().saturating_sub(vfs.blocks_free());
            let avail = vfs.blocks_available();
            p.disk_free_bytes = Some(avail.saturating_mul(frsize));
            p.disk_total_bytes = Some(vfs.blocks().saturating_mul(frsize));
            if used + avail > 0 {
                p.disk_used_percent = Some(used as f64 * 100.0 / (used + avail) as f64);
            }
        }
        p
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Healthy => f.write_str("healthy"),
            Health::Degraded(r) => write!(f, "degraded: {r}"),
            Health::Unhealthy(r) => write!(f, "unhealthy: {r}"),
            Health::Full(r) => write!(f, "full: {r}"),
            Health::Offline(r) => write!(f, "offline: {r}"),
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How one step's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StepStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signalled(i32),
    /// Stopped because a timeout (the step's or the job's) expired.
    TimedOut,
    /// Stopped by cancel.
    Cancelled,
    /// Could not be started (for example a missing program); see the preceding stderr text.
    NotStarted,
}

/// What happened, in order. Every event has a sequence number (starting at 0, no gaps) and
/// a timestamp.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in this execution's stream.
    pub seq: u64,
    /// When it was emitted.
    #[serde(with = "system_time_millis")]
    pub at: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of [`Event`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The job was accepted by a runner.
    Started {
        /// Job id.
        job_id: String,
        /// Runner id.
        runner_id: String,
        /// Runner kind.
        runner_kind: RunnerKind,
    },
    /// A step began.
    StepStarted {
        /// 0-based step index.
        step: usize,
        /// Step name.
        name: String,
    },
    /// Output bytes, secrets already masked. Bytes are kept exactly (not forced to UTF-8).
    Output {
        /// 0-based step index.
        step: usize,
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        #[serde(with = "bytes_lossy")]
        data: Bytes,
    },
    /// Output past the runner's limit was dropped from here on.
    OutputTruncated {
        /// 0-based step index.
        step: usize,
        /// The limit in bytes.
        limit: u64,
    },
    /// Processes of the step were still alive when its main process exited; they were killed.
    LeftoverProcesses {
        /// 0-based step index.
        step: usize,
        /// How many processes were killed.
        count: usize,
    },
    /// A step ended.
    StepFinished {
        /// 0-based step index.
        step: usize,
        /// Step name.
        name: String,
        /// How it ended.
        status: StepStatus,
        /// Run time.
        #[serde(with = "duration_millis")]
        duration: Duration,
    },
    /// What a step or the whole job used, as its runner measured it (see
    /// [`ResourceUsage`]), from runners that measure (their capabilities' `usage`): a
    /// step's just before its `StepFinished`, when the runner measures steps apart; the
    /// job's (`step` absent) at most once, just before `Finished`.
    Usage {
        /// 0-based step index; `None` for the whole job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<usize>,
        /// The figures.
        usage: ResourceUsage,
    },
    /// The job ended; always the last event.
    Finished {
        /// The result, the same value that `wait` returns.
        outcome: Outcome,
    },
}

/// One kind of figure in [`ResourceUsage`], as runners declare what they report
/// ([`Capabilities::usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UsageFigure {
    /// CPU time, user and system.
    CpuTime,
    /// Peak memory.
    PeakMemory,
    /// Bytes read and written.
    Io,
    /// A figure of a newer version, which this one does not know.
    #[serde(other)]
    Other,
}

/// What a job used, measured by the runner that ran it from the kernel or its engine,
/// never estimated. A figure the runner did not measure is `None` (and absent in JSON),
/// never zero. Wall time per step is in each `StepFinished`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResourceUsage {
    /// CPU time in user mode, seconds, of every process of the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_user_seconds: Option<f64>,
    /// CPU time in the kernel on the job's behalf, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_system_seconds: Option<f64>,
    /// Most memory the job held at once, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// Bytes the job read from storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
    /// Bytes the job wrote to storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    /// Where the figures come from, e.g. `rusage` or `cgroup v1 (memory)`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

impl ResourceUsage {
    /// User plus system CPU time, when both were measured.
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some(self.cpu_user_seconds? + self.cpu_system_seconds?)
    }

    /// Checks the figures from an untrusted source (a remote agent): CPU times finite
    /// and not negative, or why not.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("cpu_user_seconds", self.cpu_user_seconds),
            ("cpu_system_seconds", self.cpu_system_seconds),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{name}: {v} is not a finite number of seconds ≥ 0"));
            }
        }
        Ok(())
    }

    /// True when no figure was measured.
    pub fn is_empty(&self) -> bool {
        self.cpu_user_seconds.is_none()
            && self.cpu_system_seconds.is_none()
            && self.peak_memory_bytes.is_none()
            && self.read_bytes.is_none()
            && self.written_bytes.is_none()
    }

    /// The figures as a short line, e.g. `cpu 0.12s, peak memory 14.2 MiB, io 0 B read /
    /// 4.0 KiB written`; empty when none was measured.
    pub fn summary(&self) -> String {
        fn size(b: u64) -> String {
            const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
            let mut v = b as f64;
            let mut u = 0;
            while v >= 1024.0 && u < UNITS.len() - 1 {
                v /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{b} B")
            } else {
                format!("{v:.1} {}", UNITS[u])
            }
        }
        let mut parts = Vec::new();
        if let Some(c) = self.cpu_seconds() {
            parts.push(format!("cpu {c:.2}s"));
        }
        if let Some(m) = self.peak_memory_bytes {
            parts.push(format!("peak memory {}", size(m)));
        }
        match (self.read_bytes, self.written_bytes) {
            (Some(r), Some(w)) => parts.push(format!("io {} read / {} written", size(r), size(w))),
            (Some(r), None) => parts.push(format!("io {} read", size(r))),
            (None, Some(w)) => parts.push(format!("io {} written", size(w))),
            (None, None) => {}
        }
        parts.join(", ")
    }
}

/// The result of a job. A failed job is an outcome, not an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Every step succeeded (or failed with `continue_on_error`).
    Succeeded,
    /// A step exited with a non-zero code.
    Failed {
        /// 0-based step index.
        step: usize,
        /// Step name.
        step_name: String,
        /// Exit code, 1-255.
        exit_code: i32,
    },
    /// A step was killed by a signal it did not ask for.
    Signalled {
        /// 0-based step index.
        step: usize,
        /// Step name.
        step_name: String,
        /// Signal number.
        signal: i32,
        /// True when the kernel's out-of-memory killer did it.
        oom_killed: bool,
    },
    /// The job's or a step's timeout expired.
    TimedOut {
        /// The step that was running.
        step: Option<usize>,
    },
    /// Cancelled on request.
    Cancelled,
    /// The runner went away while the job ran.
    Lost,
    /// The runner could not do its work.
    RunnerError {
        /// What went wrong, with its causes.
        message: String,
        /// Whether running the job again may succeed (see
        /// [`Error::is_temporary`](crate::Error::is_temporary)); the control plane
        /// retries a runner failure only when it is. Records written before this field
        /// existed read as `false`.
        #[serde(default)]
        temporary: bool,
    },
}

impl Outcome {
    /// True only for [`Outcome::Succeeded`].
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded)
    }

    /// The process exit code a command-line tool should use for this outcome: 0, the step's
    /// code, 128 + signal, 124 for a timeout, 130 when cancelled, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::Failed { exit_code, .. } => *exit_code,
            Outcome::Signalled { signal, .. } => 128 + signal,
            Outcome::TimedOut { .. } => 124,
            Outcome::Cancelled => 130,
            Outcome::Lost | Outcome::RunnerError { .. } => 1,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded => f.write_str("succeeded"),
            Outcome::Failed {
                step_name,
                exit_code,
                ..
            } => write!(f, "failed: step {step_name:?} exited with code {exit_code}"),
            Outcome::Signalled {
                step_name,
                signal,
                oom_killed,
                ..
            } => {
                write!(
                    f,
                    "failed: step {step_name:?} was killed by signal {signal}"
                )?;
                if *oom_killed {
                    f.write_str(" (out of memory)")?;
                }
                Ok(())
            }
            Outcome::TimedOut { .. } => f.write_str("timed out"),
            Outcome::Cancelled => f.write_str("cancelled"),
            Outcome::Lost => f.write_str("lost: the runner went away"),
            Outcome::RunnerError { message, .. } => write!(f, "runner error: {message}"),
        }
    }
}

/// Identifier of one execution of a job.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A fresh random id.
    pub fn new() -> Self {
        JobId(uuid::Uuid::new_v4().simple().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        JobId::new()
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        JobId(s)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An executor of jobs. Object safe: use it as `Arc<dyn Runner>`.
///
/// Contract:
/// - [`Runner::start`] MUST validate the job and check it against the runner's
///   [`Capabilities`] before creating anything; a job it cannot run is an `Err`
///   ([`Error::InvalidSpec`] or [`Error::Unsupported`]) and leaves nothing behind.
/// - Once `start` returns `Ok`, every way the job ends (including the runner failing
///   mid-job) is reported as an [`Outcome`], never as an `Err`; a non-zero exit is
///   [`Outcome::Failed`].
/// - The events of one execution are totally ordered and end with exactly one
///   [`EventKind::Finished`] carrying the same outcome that [`Execution::wait`] returns.
/// - When the execution ends, nothing the job started is left running and its workspace
///   is gone unless the runner is configured to keep it.
/// - Dropping an [`Execution`] without waiting does not stop the job; call
///   [`Execution::cancel`] for that.
#[async_trait]
pub trait Runner: Send + Sync {
    /// Who this runner is.
    fn info(&self) -> &RunnerInfo;
    /// What it can do, truthfully.
    fn capabilities(&self) -> &Capabilities;
    /// Jobs it is running now.
    fn running(&self) -> usize;
    /// Checks whether it can run jobs now. SHOULD answer within a few seconds.
    async fn health(&self) -> Health;
    /// What its host has left (load, memory, disk under its workspace), measured now;
    /// `None` (the default) from runners that do not measure it. MUST be cheap: the
    /// control plane asks at every health check.
    fn pressure(&self) -> Option<HostPressure> {
        None
    }
    /// Starts `job` under execution id `id` and returns its handle.
    async fn start(&self, job: &dyn JobSpec, id: JobId) -> Result<Execution, Error>;
    /// Stops whatever is left of execution `id` started by an earlier process that is
    /// gone (a control plane that crashed mid-job), so a retry never runs beside it.
    /// Succeeds when nothing is left. The default does nothing, for runners whose jobs
    /// cannot outlive the process that started them.
    async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        let _ = id;
        Ok(())
    }
    /// Takes up execution `id` again after the control plane that started it stopped
    /// (crashed or restarted), when the job may still be running where this runner sent
    /// it (a remote agent keeps running its jobs while the control plane is away).
    /// `held` is how many bytes of the execution's output the control plane has stored:
    /// the returned execution's output continues from there, without gap or repeat.
    ///
    /// `Ok(None)` (the default) means the runner cannot follow it; the control plane
    /// then treats the attempt as interrupted ([`Runner::abandon`], then lost). An
    /// execution that later learns the job is gone ends with [`Outcome::Lost`].
    async fn reattach(&self, id: &JobId, held: u64) -> Result<Option<Execution>, Error> {
        let _ = (id, held);
        Ok(None)
    }
}

/// A running (or finished) job: its ordered events, cancel, and wait.
///
/// Events are buffered in a bounded channel: a caller that keeps the execution MUST read
/// its events (or call [`Execution::wait`], which discards them), or the job's output
/// will back up into the job.
pub struct Execution {
    id: JobId,
    events: mpsc::Receiver<Event>,
    cancel: CancellationToken,
    done: oneshot::Receiver<Outcome>,
}

impl fmt::Debug for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Execution").field("id", &self.id).finish()
    }
}

impl Execution {
    /// Creates a connected execution handle and the sink a runner drives it with.
    /// `buffer` is the number of events that may wait unread.
    pub fn channel(id: JobId, buffer: usize) -> (Execution, ExecutionSink) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        let cancel = CancellationToken::new();
        let sink = ExecutionSink {
            inner: Arc::new(SinkInner {
                job_id: id.clone(),
                seq: tokio::sync::Mutex::new(0),
                tx,
                done: std::sync::Mutex::new(Some(done_tx)),
            }),
            cancel: cancel.clone(),
        };
        let execution = Execution {
            id,
            events: rx,
            cancel,
            done: done_rx,
        };
        (execution, sink)
    }

    /// The execution id.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// The next event, or `None` after [`EventKind::Finished`] has been delivered.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Asks the runner to stop the job: SIGTERM (or the runner's equivalent), then after
    /// the grace period SIGKILL. The outcome becomes [`Outcome::Cancelled`] unless the job
    /// had already finished. Idempotent.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A handle that cancels this execution from elsewhere.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.cancel.clone())
    }

    /// Waits for the outcome, discarding events not yet read.
    pub async fn wait(self) -> Outcome {
        let Execution {
            mut events, done, ..
        } = self;
        events.close();
        // Drain what is already queued so that the runner is never blocked on a full channel.
        while events.try_recv().is_ok() {}
        drop(events);
        done.await.unwrap_or(Outcome::Lost)
    }
}

/// Cancels an execution; cheap to clone.
#[derive(Clone, Debug)]
pub struct Canceller(CancellationToken);

impl Canceller {
    /// See [`Execution::cancel`].
    pub fn cancel(&self) {
        self.0.cancel();
    }
}

struct SinkInner {
    job_id: JobId,
    seq: tokio::sync::Mutex<u64>,
    tx: mpsc::Sender<Event>,
    done: std::sync::Mutex<Option<oneshot::Sender<Outcome>>>,
}

/// The runner side of an [`Execution`]: emits events with sequence numbers and timestamps,
/// observes cancellation and delivers the outcome. Clones share one sequence.
#[derive(Clone)]
pub struct ExecutionSink {
    inner: Arc<SinkInner>,
    cancel: CancellationToken,
}

impl ExecutionSink {
    /// The execution id.
    pub fn job_id(&self) -> &JobId {
        &self.inner.job_id
    }

    /// Emits an event; waits while the channel is full. Returns quietly when nobody is
    /// listening any more. Concurrent calls are serialised, so sequence numbers always
    /// arrive in order.
    pub async fn emit(&self, kind: EventKind) {
        let mut seq = self.inner.seq.lock().await;
        let event = Event {
            seq: *seq,
            at: SystemTime::now(),
            kind,
        };
        *seq += 1;
        let _ = self.inner.tx.send(event).await;
    }

    /// True while someone may still read events.
    pub fn has_listener(&self) -> bool {
        !self.inner.tx.is_closed()
    }

    /// Completes when cancel was requested.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// True when cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Emits [`EventKind::Finished`] and delivers the outcome to `wait`. Only the first
    /// call has an effect.
    pub async fn finish(&self, outcome: Outcome) {
        let sender = self.inner.done.lock().expect("sink lock").take();
        if let Some(sender) = sender {
            self.emit(EventKind::Finished {
                outcome: outcome.clone(),
            })
            .await;
            let _ = sender.send(outcome);
        }
    }
}

/// Conveniences over any [`Runner`]; implemented for every runner.
#[async_trait]
pub trait RunnerExt: Runner {
    /// Runs `job` to completion and returns its outcome, discarding output.
    async fn run_to_completion(&self, job: &dyn JobSpec) -> Result<Outcome, Error> {
        Ok(self.start(job, JobId::new()).await?.wait().await)
    }

    /// Runs `job` to completion and collects its output per stream.
    async fn run_collect(&self, job: &dyn JobSpec) -> Result<CollectedRun, Error> {
        let mut execution = self.start(job, JobId::new()).await?;
        let mut run = CollectedRun {
            id: execution.id().clone(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            events: Vec::new(),
            outcome: Outcome::Lost,
        };
        while let Some(event) = execution.next_event().await {
            match &event.kind {
                EventKind::Output { stream, data, .. } => match stream {
                    OutputStream::Stdout => run.stdout.extend_from_slice(data),
                    OutputStream::Stderr => run.stderr.extend_from_slice(data),
                },
                EventKind::Finished { outcome } => run.outcome = outcome.clone(),
                _ => {}
            }
            run.events.push(event);
        }
        Ok(run)
    }
}

impl<R: Runner + ?Sized> RunnerExt for R {}

/// Everything a run produced, from [`RunnerExt::run_collect`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CollectedRun {
    /// Execution id.
    pub id: JobId,
    /// All stdout bytes.
    pub stdout: Vec<u8>,
    /// All stderr bytes.
    pub stderr: Vec<u8>,
    /// Every event, output included.
    pub events: Vec<Event>,
    /// The outcome.
    pub outcome: Outcome,
}

/// Serde helper for `#[serde(with = "...")]`: a [`SystemTime`] as whole milliseconds
/// since the Unix epoch (times before the epoch are written as 0). The wire form of every
/// timestamp in events and in the control plane's records.
pub mod system_time_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Writes `t` as milliseconds since the epoch.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        s.serialize_u64(ms as u64)
    }
    /// Reads milliseconds since the epoch.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(UNIX_EPOCH + Duration::from_millis(u64::deserialize(d)?))
    }
}

mod duration_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Output bytes in JSON: a UTF-8 string when the bytes are valid UTF-8, otherwise an object
/// with the bytes in base-16, so nothing is lost.
mod bytes_lossy {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Hex { hex: String },
    }

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(text) => Repr::Text(text.to_string()).serialize(s),
            Err(_) => Repr::Hex {
                hex: b.iter().map(|x| format!("{x:02x}")).collect(),
            }
            .serialize(s),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(t) => Ok(Bytes::from(t)),
            Repr::Hex { hex } => {
                if hex.len() % 2 != 0 {
                    return Err(serde::de::Error::custom("odd hex length"));
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map(Bytes::from)
                    .map_err(serde::de::Error::custom)
            }
        }
    }
}
