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

/// Options for [`run_with`].
#[derive(Default)]
struct RunOptions {
    /// Once stdout shows this text, do this (once).
    on_stdout: Option<(&'static str, Trigger)>,
    /// Keep no output, only count it and sample this process's memory (for large output).
    count_only: bool,
}

#[derive(Clone, Copy)]
enum Trigger {
    /// Cancel the execution.
    Cancel,
    /// Write a line into the FIFO of this name in the job's working directory, which the
    /// job waits on (see [`open_gate`]); cancel the execution when no process of the job
    /// on this host has it.
    OpenGate(&'static str),
}

/// What became of a [`Trigger::OpenGate`].
#[derive(Debug, Default)]
enum Gate {
    /// The text never appeared.
    #[default]
    NotReached,
    /// Opened after this many stdout bytes had arrived.
    Opened { stdout_before: usize },
    /// No process of the job on this host had the FIFO; the execution was cancelled.
    Unreachable,
}

/// Starts `job`, collects everything, checks the event contract and leftovers.
pub async fn run_job(target: &Target, job: &Job) -> Result<Record, Failure> {
    run_with(target, job, RunOptions::default())
        .await
        .map(|(r, _)| r)
}

async fn run_with(
    target: &Target,
    job: &Job,
    opts: RunOptions,
) -> Result<(Record, Stats), Failure> {
    // Read before the job starts: an unreadable size fails the run, never passes a bound.
    let baseline_rss = if opts.count_only {
        Some(rss_bytes().map_err(rss_failure)?)
    } else {
        None
    };
    let since = boot_ticks_now();
    let started = Instant::now();
    let execution = target
        .runner()
        .start(job, JobId::new())
        .await
        .map_err(|e| Failure(format!("start of job {} failed: {e}", job.name)))?;
    let id = execution.id().clone();
    let mut run = Collector {
        record: Record {
            id: id.clone(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            outcome: Outcome::Lost,
            events: Vec::new(),
            elapsed: Duration::ZERO,
        },
        stats: Stats::default(),
        watch: ProcessWatch::new(id.clone(), target.on_host(), since),
        opts: &opts,
        baseline_rss,
        expected_seq: 0,
        finished: None,
        triggered: false,
        gate: None,
        execution,
    };
    // The first failure is kept; the job is then cancelled and its events drained, so that
    // a failing check does not leave its job running.
    let mut failure = None;
    while let Some(event) = run.execution.next_event().await {
        if let Err(f) = run.on_event(event)
            && failure.is_none()
        {
            run.execution.cancel();
            failure = Some(f);
        }
    }
    let Collector {
        mut record,
        mut stats,
        watch,
        finished,
        execution,
        gate,
        ..
    } = run;
    record.outcome = execution.wait().await;
    record.elapsed = started.elapsed();
    // The job may read from the gate until it ends.
    drop(gate);
    if let Some(f) = failure {
        return Err(f);
    }
    let from_event =
        finished.ok_or_else(|| Failure("the event stream ended without Finished".into()))?;
    ensure!(
        record.outcome == from_event,
        "wait returned {:?} but Finished carried {:?}",
        record.outcome,
        from_event
    );
    stats.tree_only = watch.tree_only.len();
    let left = watch.leftovers()?;
    ensure!(
        left.is_empty(),
        "processes of job {} are still alive: {}",
        job.name,
        left.join(", ")
    );
    Ok((record, stats))
}

/// The state of one run while its events arrive.
struct Collector<'a> {
    record: Record,
    stats: Stats,
    watch: ProcessWatch,
    opts: &'a RunOptions,
    baseline_rss: Option<u64>,
    expected_seq: u64,
    finished: Option<Outcome>,
    triggered: bool,
    gate: Option<File>,
    execution: crate::runner::Execution,
}

impl Collector<'_> {
    fn on_event(&mut self, event: crate::runner::Event) -> Result<(), Failure> {
        ensure!(
            event.seq == self.expected_seq,
            "event sequence jumped from {} to {}",
            self.expected_seq,
            event.seq
        );
        self.expected_seq += 1;
        ensure!(
            self.finished.is_none(),
            "an event arrived after Finished: {:?}",
            event.kind
        );
        if event.seq == 0 {
            ensure!(
                matches!(event.kind, EventKind::Started { .. }),
                "the first event is {:?}, not Started",
                event.kind
            );
        }
        match event.kind {
            EventKind::Output { stream, data, .. } => {
                // Before anything reacts to the output (a cancel may kill the processes).
                self.watch.on_output()?;
                match stream {
                    OutputStream::Stdout => self.stats.stdout_bytes += data.len() as u64,
                    OutputStream::Stderr => self.stats.stderr_bytes += data.len() as u64,
                }
                if let Some(baseline) = self.baseline_rss {
                    self.stats.stdout_all_zero &= data.iter().all(|b| *b == 0);
                    let now = rss_bytes().map_err(rss_failure)?;
                    self.stats.peak_rss_growth =
                        self.stats.peak_rss_growth.max(now.saturating_sub(baseline));
                } else {
                    match stream {
                        OutputStream::Stdout => self.record.stdout.extend_from_slice(&data),
                        OutputStream::Stderr => self.record.stderr.extend_from_slice(&data),
                    }
                }
                self.react()?;
            }
            EventKind::StepStarted { .. } => {
                self.watch.step_started();
                self.record.events.push(event.kind);
            }
            EventKind::Finished { outcome } => self.finished = Some(outcome),
            other => self.record.events.push(other),
        }
        Ok(())
    }

    /// Carries out the options' trigger once stdout shows its text.
    fn react(&mut self) -> Result<(), Failure> {
        let Some((text, trigger)) = self.opts.on_stdout else {
            return Ok(());
        };
        if self.triggered || !String::from_utf8_lossy(&self.record.stdout).contains(text) {
            return Ok(());
        }
        self.triggered = true;
        match trigger {
            Trigger::Cancel => self.execution.cancel(),
            Trigger::OpenGate(name) => match open_gate(&self.watch, name)? {
                Some(fifo) => {
                    self.gate = Some(fifo);
                    self.stats.gate = Gate::Opened {
                        stdout_before: self.record.stdout.len(),
                    };
                }
                None => {
                    self.execution.cancel();
                    self.stats.gate = Gate::Unreachable;
                }
            },
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Stats {
    stdout_bytes: u64,
    stderr_bytes: u64,
    stdout_all_zero: bool,
    peak_rss_growth: u64,
    gate: Gate,
    /// Processes the watch found only through the process tree (host runners).
    tree_only: usize,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_all_zero: true,
            peak_rss_growth: 0,
            gate: Gate::default(),
            tree_only: 0,
        }
    }
}

/// Resident memory of this process in bytes, from `VmRSS` in `/proc/self/status`; an
/// error when that cannot be read or has no such line.
pub fn rss_bytes() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "/proc/self/status has no readable VmRSS line",
            )
        })
}

fn rss_failure(e: std::io::Error) -> Failure {
    Failure(format!(
        "cannot read this process's resident memory, so the memory bound cannot be checked: {e}"
    ))
}

/// Pids of live processes on this host whose environment holds `RUSTCI_JOB_ID=<id>`.
///
/// An environment that cannot be read (other than of a process that has exited) is an
/// error, not "none", except for processes that cannot be live processes of a job this
/// process started: those started before this process, those without an address space
/// (exiting, zombies, kernel threads), and, when this process is not root, other users'
/// (the jobs of a host runner run as the runner's own user). The checks themselves are
/// stricter: for container runners, whose processes may belong to any user, only
/// processes started before the job are exempt.
pub fn processes_of(id: &JobId) -> Result<Vec<i32>, Failure> {
    let me = crate::process::stat(std::process::id() as i32)
        .ok()
        .flatten()
        .ok_or_else(|| Failure("cannot read /proc/self/stat".into()))?;
    job_pids(id, true, me.start_time)
}

/// Pids whose environment names job `id`. A process whose environment cannot be read is
/// a failure unless it cannot be a live process of the job: it started before `since`
/// (clock ticks after boot, as in `/proc/<pid>/stat`), it has no address space any more
/// (exiting, a zombie or a kernel thread: without root, reading those is refused rather
/// than empty), or `host` is set and it is another user's while this process is not root.
fn job_pids(id: &JobId, host: bool, since: u64) -> Result<Vec<i32>, Failure> {
    let scan = crate::process::scan_env("RUSTCI_JOB_ID", id.as_str())
        .map_err(|e| Failure(format!("cannot list /proc: {e}")))?;
    for (pid, e) in &scan.unreadable {
        let Some(pid) = *pid else {
            return Err(Failure(format!("cannot list /proc: {e}")));
        };
        let cannot_be_the_jobs = match crate::process::stat(pid) {
            Ok(Some(s)) => s.start_time < since || s.vsize == 0 || s.is_dead(),
            Ok(None) => continue,
            Err(stat_error) => {
                return Err(Failure(format!(
                    "cannot read /proc/{pid}/environ ({e}) nor /proc/{pid}/stat ({stat_error}), \
                     so cannot tell whether it is a process of job {id}"
                )));
            }
        };
        if cannot_be_the_jobs || (host && of_another_user(pid)) {
            continue;
        }
        return Err(Failure(format!(
            "cannot read /proc/{pid}/environ ({e}) of {}, so cannot tell whether it is a process of job {id}",
            describe_process(pid)
        )));
    }
    Ok(scan.matching)
}

/// Clock ticks since boot now, in the unit and clock of the start time in
/// `/proc/<pid>/stat`: a process started later has a start time at least this.
fn boot_ticks_now() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLK_TCK is a plain query.
    let (r, hz) = unsafe {
        (
            libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    if r != 0 || hz <= 0 {
        // Exempts nothing: every unreadable process is then a failure.
        return 0;
    }
    let nanos = now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128;
    (nanos / (1_000_000_000 / hz as u128)) as u64
}

/// `pid` with its command name and owner, as far as `/proc` tells.
fn describe_process(pid: i32) -> String {
    use std::os::unix::fs::MetadataExt;
    let comm = crate::process::stat(pid)
        .ok()
        .flatten()
        .map_or_else(|| "?".to_string(), |s| s.comm);
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map_or_else(|_| "?".to_string(), |m| m.uid().to_string());
    format!("process {pid} ({comm}, uid {owner})")
}

/// True when this process is not root and `pid` is (or was) another user's.
fn of_another_user(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid();
    !me.is_root()
        && std::fs::metadata(format!("/proc/{pid}")).map_or(true, |m| m.uid() != me.as_raw())
}

/// Every process on this host now; any entry that cannot be read (other than of a process
/// that exited) is a failure.
fn process_table() -> Result<ProcessTable, Failure> {
    let table = ProcessTable::scan().map_err(|e| Failure(format!("cannot list /proc: {e}")))?;
    if let Some((path, e)) = table.unreadable.first() {
        return Err(Failure(format!("cannot read {path}: {e}")));
    }
    Ok(table)
}

/// The processes of one job that the suite has seen on this host.
///
/// Processes whose environment names the job are found at any time. For a host runner,
/// each snapshot (at a step's 1st, 2nd, 4th … output event) also climbs from those to the
/// step's shim (the ancestor whose parent is this process) and records every descendant
/// of it: a process that replaced its environment is among them, since the shim is the
/// subreaper of everything the step starts.
struct ProcessWatch {
    id: JobId,
    host: bool,
    /// Clock ticks after boot just before the job was started (see [`job_pids`]).
    since: u64,
    /// Every process recorded while the job ran: pid → start time (which tells a reused
    /// pid from the recorded process).
    seen: BTreeMap<i32, u64>,
    /// The recorded processes whose environment did not name the job.
    tree_only: BTreeSet<i32>,
    /// The shims of the job's steps: pid → start time.
    shims: BTreeMap<i32, u64>,
    /// Output events of the current step so far.
    step_outputs: u64,
}

impl ProcessWatch {
    fn new(id: JobId, host: bool, since: u64) -> Self {
        ProcessWatch {
            id,
            host,
            since,
            seen: BTreeMap::new(),
            tree_only: BTreeSet::new(),
            shims: BTreeMap::new(),
            step_outputs: 0,
        }
    }

    fn step_started(&mut self) {
        self.step_outputs = 0;
    }

    fn on_output(&mut self) -> Result<(), Failure> {
        if !self.host {
            return Ok(());
        }
        self.step_outputs += 1;
        if self.step_outputs.is_power_of_two() {
            self.snapshot()?;
        }
        Ok(())
    }

    /// Records the job's processes as they are now.
    fn snapshot(&mut self) -> Result<(), Failure> {
        let table = process_table()?;
        let by_env = job_pids(&self.id, true, self.since)?;
        let me = std::process::id() as i32;
        let mut roots = by_env.clone();
        for &pid in &by_env {
            let mut p = pid;
            while let Some(s) = table.get(p) {
                if s.ppid == me {
                    self.shims.insert(p, s.start_time);
                    roots.push(p);
                    break;
                }
                if s.ppid <= 1 {
                    break;
                }
                p = s.ppid;
            }
        }
        let below = roots.iter().flat_map(|&root| table.descendants(root));
        for pid in by_env.iter().copied().chain(below) {
            if let Some(s) = table.get(pid).filter(|s| !s.is_dead()) {
                self.seen.insert(pid, s.start_time);
                if !by_env.contains(&pid) {
                    self.tree_only.insert(pid);
                }
            }
        }
        Ok(())
    }

    /// The job's processes still alive, described.
    fn leftovers(&self) -> Result<Vec<String>, Failure> {
        let mut left = BTreeMap::new();
        let describe = |pid: i32, how: &str| match crate::process::stat(pid) {
            Ok(Some(s)) => format!("{pid} ({}, {how})", s.comm),
            _ => format!("{pid} ({how})"),
        };
        for pid in job_pids(&self.id, self.host, self.since)? {
            left.insert(pid, describe(pid, "its environment names the job"));
        }
        if self.host {
            let table = process_table()?;
            let alive = |pid: i32, start: u64| {
                table
                    .get(pid)
                    .is_some_and(|s| s.start_time == start && !s.is_dead())
            };
            for (&pid, &start) in &self.seen {
                if alive(pid, start) {
                    left.entry(pid)
                        .or_insert_with(|| describe(pid, "seen in the job's process tree"));
                }
            }
            for (&shim, &start) in &self.shims {
                if !alive(shim, start) {
                    continue;
                }
                left.entry(shim)
                    .or_insert_with(|| describe(shim, "the shim of one of its steps"));
                for pid in table.descendants(shim) {
                    if table.get(pid).is_some_and(|s| !s.is_dead()) {
                        left.entry(pid)
                            .or_insert_with(|| describe(pid, "below the shim of one of its steps"));
                    }
                }
            }
        }
        Ok(left.into_values().collect())
    }
}

/// Opens the FIFO `name` in the working directory of a process of the watched job on this host
/// (through `/proc/<pid>/cwd`, which reaches into containers too) and writes a line into
/// it. The FIFO is opened read-write, which never blocks and keeps the line in the pipe
/// until the job reads it; the caller keeps the file open until the job has ended. `None`
/// when no process of the job on this host has the FIFO.
fn open_gate(watch: &ProcessWatch, name: &str) -> Result<Option<File>, Failure> {
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;
    for pid in job_pids(&watch.id, watch.host, watch.since)? {
        let path = format!("/proc/{pid}/cwd/{name}");
        if !std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo()) {
            continue;
        }
        let mut fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Failure(format!("cannot open {path}: {e}")))?;
        fifo.write_all(b"go\n")
            .map_err(|e| Failure(format!("cannot write to {path}: {e}")))?;
        return Ok(Some(fifo));
    }
    Ok(None)
}

fn expect_outcome(
    record: &Record,
    what: &str,
    ok: impl Fn(&Outcome) -> bool,
) -> Result<(), Failure> {
    ensure!(
        ok(&record.outcome),
        "{what}: got outcome {:?}; stdout {:?}; stderr {:?}",
        record.outcome,
        tail(&record.stdout),
        tail(&record.stderr)
    );
    Ok(())
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(400);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Exit codes 0, 1, 42 and 255 come back exactly; a failure names its step, and later
/// steps do not run.
pub async fn exit_codes(t: &Target) -> CheckResult {
    for code in [0, 1, 42, 255] {
        let job = t.job(
            "exit-codes",
            vec![
                t.sh("echo first"),
                t.sh(&format!("exit {code}")).named("the-exit"),
                t.sh("echo must-not-run"),
            ],
        );
        let r = run_job(t, &job).await?;
        if code == 0 {
            expect_outcome(&r, "exit 0", |o| *o == Outcome::Succeeded)?;
            ensure!(
                r.stdout_text().contains("must-not-run"),
                "step 3 did not run after exit 0"
            );
        } else {
            expect_outcome(
                &r,
                &format!("exit {code}"),
                |o| matches!(o, Outcome::Failed { step: 1, step_name, exit_code } if *exit_code == code && step_name == "the-exit"),
            )?;
            ensure!(
                r.outcome.exit_code() == code,
                "exit_code() is {}",
                r.outcome.exit_code()
            );
            ensure!(
                !r.stdout_text().contains("must-not-run"),
                "a step ran after a failing one"
            );
        }
    }
    // continue_on_error lets the job go on and succeed.
    let job = t.job(
        "allowed-failure",
        vec![t.sh("exit 3").allow_failure(), t.sh("echo after")],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "continue_on_error", |o| *o == Outcome::Succeeded)?;
    ensure!(
        r.stdout_text() == "after\n",
        "stdout was {:?}",
        r.stdout_text()
    );
    passed()
}

/// A step killed by a signal reports that signal.
pub async fn signal_death(t: &Target) -> CheckResult {
    let job = t.job("signal", vec![t.sh("kill -KILL $$")]);
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "kill -KILL $$", |o| {
        matches!(
            o,
            Outcome::Signalled {
                step: 0,
                signal: 9,
                ..
            }
        )
    })?;
    ensure!(
        r.outcome.exit_code() == 137,
        "exit_code() is {}",
        r.outcome.exit_code()
    );
    passed()
}

/// stdout and stderr stay apart, each in order.
pub async fn stream_separation(t: &Target) -> CheckResult {
    let job = t.job(
        "streams",
        vec![t.sh("i=0; while [ $i -lt 2000 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done")],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "streams", |o| *o == Outcome::Succeeded)?;
    let expect =
        |prefix: &str| -> String { (0..2000).map(|i| format!("{prefix}-{i}\n")).collect() };
    ensure!(
        r.stdout_text() == expect("out"),
        "stdout is not out-0..out-1999 in order: {}",
        tail(&r.stdout)
    );
    ensure!(
        r.stderr_text() == expect("err"),
        "stderr is not err-0..err-1999 in order: {}",
        tail(&r.stderr)
    );
    passed()
}

/// 100 MiB of output arrives whole while this process's memory grows by less than 64 MiB.
/// The memory is sampled from `/proc/self/status` at every output event; when it cannot be
/// read the check fails (an unknown size never passes the bound).
pub async fn large_output(t: &Target) -> CheckResult {
    const SIZE: u64 = 100 << 20;
    let job = t.job(
        "large-output",
        vec![t.sh(&format!("head -c {SIZE} /dev/zero"))],
    );
    let (r, stats) = run_with(
        t,
        &job,
        RunOptions {
            count_only: true,
            ..RunOptions::default()
        },
    )
    .await?;
    expect_outcome(&r, "large output", |o| *o == Outcome::Succeeded)?;
    ensure!(
        stats.stdout_bytes == SIZE,
        "got {} of {SIZE} bytes",
        stats.stdout_bytes
    );
    ensure!(stats.stdout_all_zero, "output bytes were altered");
    ensure!(
        stats.peak_rss_growth < 64 << 20,
        "resident memory grew by {} MiB while streaming",
        stats.peak_rss_growth >> 20
    );
    passed()
}
/// Bytes that are not UTF-8 are delivered unchanged.
pub async fn binary_output(t: &Target) -> CheckResult {
    let job = t.job("binary", vec![t.sh(r"printf '\377\376\000abc\200\n'")]);
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "binary", |o| *o == Outcome::Succeeded)?;
    ensure!(
        r.stdout == b"\xff\xfe\x00abc\x80\n",
        "got bytes {:?}",
        r.stdout
    );
    passed()
}

/// Job env, step env (which overrides), and the execution id reach the step.
pub async fn env_passing(t: &Target) -> CheckResult {
    let mut job = t.job(
        "env",
        vec![
            t.sh("echo \"$APP|$MODE|$STEP_ONLY|$RUSTCI_JOB_ID|$SPACED\"")
                .with_env("MODE", "step")
                .with_env("STEP_ONLY", "1"),
        ],
    );
    job.env.insert("APP".into(), "demo".into());
    job.env.insert("MODE".into(), "job".into());
    job.env.insert("SPACED".into(), "a b  'c'".into());
    // A program exec'd directly sees the environment as the runner built it: one entry
    // per name (with duplicates, C's `getenv` would see the first).
    let direct = t.runner().capabilities().command_steps;
    if direct {
        job.steps
            .push(Step::command(["env"]).with_env("MODE", "command"));
    }
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "env", |o| *o == Outcome::Succeeded)?;
    let expected = format!("demo|step|1|{}|a b  'c'\n", r.id);
    let stdout = r.stdout_text();
    let (first, rest) = stdout.split_at(stdout.find('\n').map_or(stdout.len(), |i| i + 1));
    ensure!(first == expected, "expected {expected:?}, got {first:?}");
    if direct {
        let modes: Vec<&str> = rest.lines().filter(|l| l.starts_with("MODE=")).collect();
        ensure!(
            modes == ["MODE=command"],
            "`env` in a command step saw {modes:?} for MODE, expected exactly [\"MODE=command\"]"
        );
    }
    passed()
}

/// Host environment variables do not leak into jobs (beyond PATH, HOME, LANG, TZ, CI and the
/// usual shell and terminal variables).
pub async fn host_env_isolation(t: &Target) -> CheckResult {
    // Also `CI`: every runner sets `CI=true` in jobs, which equals the host's own `CI=true`
    // on a CI machine without having leaked from it.
    const TOLERATED: &[&str] = &[
        "PATH", "HOME", "LANG", "TZ", "PWD", "OLDPWD", "SHLVL", "_", "HOSTNAME", "TERM", "USER",
        "LOGNAME", "SHELL", "CI",
    ];
    let host: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, v)| !TOLERATED.contains(&k.as_str()) && v.len() >= 4)
        .collect();
    ensure!(
        !host.is_empty(),
        "this process has no environment variable to test isolation with; run under cargo test"
    );
    let job = t.job("host-env", vec![t.sh("env")]);
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "env", |o| *o == Outcome::Succeeded)?;
    let text = r.stdout_text();
    let leaked: Vec<&String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| host.get(*k).is_some_and(|hv| hv == v))
        .map(|(k, _)| host.get_key_value(k).map(|(k, _)| k).unwrap())
        .collect();
    ensure!(
        leaked.is_empty(),
        "host variables leaked into the job: {leaked:?}"
    );
    passed()
}

/// Secrets never appear in output: whole, in two writes in quick succession (which the
/// runner may read as one chunk), multi-line, on either stream.
/// [`secret_split_across_writes`] makes sure of a real split.
pub async fn secret_masking(t: &Target) -> CheckResult {
    let token = "s3cr3t-T0ken-Value";
    let multi = "-----BEGIN-----\nline-two-is-secret\n-----END-----";
    let mut job = t.job(
        "secrets",
        vec![t.sh("echo \"token=$API_TOKEN\"\n\
             printf 's3cr3t-T0'; printf 'ken-Value\\n'\n\
             echo \"$API_TOKEN\" >&2\n\
             printf '%s\\n' \"$MULTI\"\n\
             echo \"$MULTI\" | while read -r line; do echo \"$line\"; done\n\
             exit 3")],
    );
    job.secrets.insert("API_TOKEN".into(), token.into());
    job.secrets.insert("MULTI".into(), multi.into());
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "secrets", |o| {
        matches!(o, Outcome::Failed { exit_code: 3, .. })
    })?;
    for (name, bytes) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        for needle in [token, "line-two-is-secret", "s3cr3t-T0ken"] {
            ensure!(
                !text.contains(needle),
                "{name} shows secret text {needle:?}: {text:?}"
            );
        }
    }
    ensure!(
        r.stdout_text().starts_with("token=***\n***\n"),
        "stdout does not show the masks: {:?}",
        r.stdout_text()
    );
    ensure!(
        r.stderr_text() == "***\n",
        "stderr is {:?}",
        r.stderr_text()
    );
    let events = format!("{:?}", r.events);
    ensure!(!events.contains(token), "events show the secret: {events}");
    passed()
}

/// Marker of the first half in [`secret_split_across_writes`]; the rest of its line keeps
/// it clear of the bytes a masker holds back.
const SPLIT_MARKER: &str = "split-secret-first-half-written";

/// A secret written in two `write`s, the second only once the runner has delivered output
/// of the first, is still masked: the output never shows it and shows `***` once.
///
/// The job makes a FIFO in its working directory, prints a line and the first half of the
/// secret in one `printf` (one `write`), then waits on the FIFO. When the line arrives as
/// an output event (so the runner has read the write that carried the first half), the
/// check writes into the FIFO through `/proc/<pid>/cwd` of a process of the job, and the
/// job prints the second half. No timing is involved. Where no process of the job is
/// visible on this host (a remote engine or cluster) the check cannot reach the FIFO: it
/// cancels the job and is skipped.
pub async fn secret_split_across_writes(t: &Target) -> CheckResult {
    const TOKEN: &str = "s3cr3t-T0ken-Value";
    const GATE: &str = ".rustci-split-gate";
    let line = format!("{SPLIT_MARKER} (the second half follows once the check opens the gate)");
    let mut job = t.job(
        "split-secret",
        vec![t.sh(&format!(
            "mkfifo {GATE}\n\
             printf '%s\\ns3cr3t-T0' '{line}'\n\
             read -r go < {GATE}\n\
             printf 'ken-Value\\n'"
        ))],
    );
    job.secrets.insert("API_TOKEN".into(), TOKEN.into());
    let (r, stats) = run_with(
        t,
        &job,
        RunOptions {
            on_stdout: Some((SPLIT_MARKER, Trigger::OpenGate(GATE))),
            ..RunOptions::default()
        },
    )
    .await?;
    let stdout_before = match stats.gate {
        Gate::Opened { stdout_before } => stdout_before,
        Gate::Unreachable if !t.on_host() => {
            return skipped(
                "no process of the job is visible on this host (a remote engine or cluster), \
                 so the check cannot reach the FIFO in its workspace",
            );
        }
        Gate::Unreachable => {
            return Err(Failure(format!(
                "no process of the job on this host had the FIFO {GATE} in its working directory"
            )));
        }
        Gate::NotReached => {
            expect_outcome(&r, "split secret", |_| false)?;
            unreachable!("expect_outcome with a false predicate fails")
        }
    };
    expect_outcome(&r, "split secret", |o| *o == Outcome::Succeeded)?;
    for (name, text) in [("stdout", r.stdout_text()), ("stderr", r.stderr_text())] {
        for needle in [TOKEN, "s3cr3t-T0", "ken-Value"] {
            ensure!(
                !text.contains(needle),
                "{name} shows secret text {needle:?}: {text:?}"
            );
        }
    }
    ensure!(
        r.stdout_text() == format!("{line}\n***\n"),
        "stdout is {:?}, not the line and one mask",
        r.stdout_text()
    );
    ensure!(
        !String::from_utf8_lossy(&r.stdout[..stdout_before]).contains("***"),
        "the mask arrived before the second half was written"
    );
    passed()
}

/// Starts background processes in every way a job can (a child, a new session, a
/// double fork, a clean environment), then prints `started` from the clean-environment
/// one, which is therefore running when the first output event arrives.
const TREE: &str = "sh -c 'sleep 300' & \
                    if command -v setsid >/dev/null; then setsid sleep 301 & fi; \
                    (sleep 302 &); \
                    env -i sh -c 'echo started; exec sleep 304' & \
                    sleep 303";

/// For a host runner, the process-tree watch must have seen the `env -i` process of
/// [`TREE`] (which the environment scan cannot find), so that its check was exercised.
fn tree_watch_saw_clean_env(t: &Target, stats: &Stats) -> Result<(), Failure> {
    ensure!(
        !t.on_host() || stats.tree_only > 0,
        "the process-tree watch did not see the job's `env -i` process"
    );
    Ok(())
}

/// A job timeout stops every process of the job, including ones in a new session and one
/// with a clean environment.
pub async fn timeout_kills_tree(t: &Target) -> CheckResult {
    let job = t
        .job("timeout", vec![t.sh(TREE)])
        .with_timeout(Duration::from_secs(2));
    let (r, stats) = run_with(t, &job, RunOptions::default()).await?;
    expect_outcome(&r, "timeout", |o| matches!(o, Outcome::TimedOut { .. }))?;
    ensure!(
        r.outcome.exit_code() == 124,
        "exit_code() is {}",
        r.outcome.exit_code()
    );
    ensure!(
        r.stdout_text().contains("started"),
        "output before the timeout was lost"
    );
    tree_watch_saw_clean_env(t, &stats)?;
    // A per-step timeout behaves the same.
    let job = t.job(
        "step-timeout",
        vec![
            t.sh(TREE).with_timeout(Duration::from_secs(1)),
            t.sh("echo never"),
        ],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "step timeout", |o| {
        matches!(o, Outcome::TimedOut { step: Some(0) })
    })?;
    ensure!(
        !r.stdout_text().contains("never"),
        "a step ran after a timeout"
    );
    passed()
}

/// A job that ignores SIGTERM is killed once the grace period has passed.
pub async fn sigterm_ignored(t: &Target) -> CheckResult {
    let grace = t.runner().capabilities().termination_grace;
    let timeout = Duration::from_secs(1);
    let job = t
        .job(
            "ignores-term",
            vec![t.sh("trap '' TERM; sleep 300 & echo armed; sleep 300")],
        )
        .with_timeout(timeout);
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "SIGTERM ignored", |o| {
        matches!(o, Outcome::TimedOut { .. })
    })?;
    ensure!(
        r.elapsed >= timeout + grace,
        "the job ended after {:?}, before its timeout {timeout:?} plus the grace period {grace:?}",
        r.elapsed
    );
    passed()
}

/// Cancel stops a running job, its outcome is Cancelled and nothing is left (a process
/// with a clean environment included).
pub async fn cancel_mid_run(t: &Target) -> CheckResult {
    let job = t.job("cancel", vec![t.sh(TREE), t.sh("echo never")]);
    let (r, stats) = run_with(
        t,
        &job,
        RunOptions {
            on_stdout: Some(("started", Trigger::Cancel)),
            ..RunOptions::default()
        },
    )
    .await?;
    expect_outcome(&r, "cancel", |o| *o == Outcome::Cancelled)?;
    ensure!(
        r.outcome.exit_code() == 130,
        "exit_code() is {}",
        r.outcome.exit_code()
    );
    ensure!(
        !r.stdout_text().contains("never"),
        "a step ran after cancel"
    );
    tree_watch_saw_clean_env(t, &stats)?;
    passed()
}

/// A background process that keeps stdout open does not hang the job: when the step's
/// main process exits, the runner stops it and the job goes on.
///
/// The background processes (one with a clean environment) would run for an hour, twenty
/// times [`CHECK_LIMIT`], so the check ends within its limit only if the job did not wait
/// for them; and afterwards none of them may be alive. Host runners without namespaces
/// also report them as [`EventKind::LeftoverProcesses`] of the step (in a PID namespace
/// the kernel ends them with the step's main process); a runner that reports leftovers
/// reports them for that step.
pub async fn background_holds_stdout(t: &Target) -> CheckResult {
    let job = t.job(
        "background",
        vec![
            t.sh("sleep 3600 & env -i sh -c 'exec sleep 3601' & echo done"),
            t.sh("echo second"),
        ],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "background", |o| *o == Outcome::Succeeded)?;
    ensure!(
        r.stdout_text() == "done\nsecond\n",
        "stdout is {:?}",
        r.stdout_text()
    );
    let mut reported = 0;
    for e in &r.events {
        if let EventKind::LeftoverProcesses { step, count } = e {
            ensure!(
                *step == 0,
                "leftover processes reported for step {step}, not for the step that started them: {:?}",
                r.events
            );
            reported += count;
        }
    }
    // In namespaces, the step's PID namespace ends with its main process and the kernel
    // kills the rest before the runner could count them.
    let must_report =
        t.on_host() && t.runner().capabilities().isolation == crate::runner::Isolation::Process;
    ensure!(
        !must_report || reported >= 1,
        "the runner did not report the background processes as leftovers: {:?}",
        r.events
    );
    passed()
}

/// How many jobs [`concurrent_jobs`] runs at once when the runner declares no bound.
pub const CONCURRENT_JOBS: usize = 50;

/// `min(50, max_concurrency)` jobs ([`CONCURRENT_JOBS`] when the runner declares no bound)
/// are started at once; all are accepted, all succeed and each sees only its own output.
/// When fewer than 50 run, a `NOTE:` line on stderr says how many; a runner that takes at
/// most one job at a time is skipped. A job the runner refuses is a failure that says how
/// many of them started.
pub async fn concurrent_jobs(t: &Target) -> CheckResult {
    let declared = t.runner().capabilities().max_concurrency;
    let n = declared.map_or(CONCURRENT_JOBS, |max| max.min(CONCURRENT_JOBS));
    if n < 2 {
        return skipped(format!(
            "the runner declares max_concurrency {n}: no two jobs run at once"
        ));
    }
    if n < CONCURRENT_JOBS {
        eprintln!(
            "NOTE: concurrent_jobs: {n} jobs at once, the runner's max_concurrency (else {CONCURRENT_JOBS})"
        );
    }
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            t.job(
                &format!("concurrent-{i}"),
                vec![t.sh(&format!(
                    "for k in 1 2 3 4 5 6 7 8 9 10; do echo job-{i}-$k; done; echo job-{i}-err >&2"
                ))],
            )
        })
        .collect();
    let runs = futures::future::join_all(jobs.iter().map(|job| run_job(t, job))).await;
    let failed = runs.iter().filter(|r| r.is_err()).count();
    if let Some(Err(first)) = runs.iter().find(|r| r.is_err()) {
        return Err(Failure(format!(
            "{failed} of {n} jobs at once failed or were refused; the first: {first}"
        )));
    }
    for (i, r) in runs.into_iter().enumerate() {
        let r = r?;
        expect_outcome(&r, &format!("job {i}"), |o| *o == Outcome::Succeeded)?;
        let expected: String = (1..=10).map(|k| format!("job-{i}-{k}\n")).collect();
        ensure!(
            r.stdout_text() == expected,
            "job {i} stdout is {:?}",
            r.stdout_text()
        );
        ensure!(
            r.stderr_text() == format!("job-{i}-err\n"),
            "job {i} stderr is {:?}",
            r.stderr_text()
        );
    }
    passed()
}

/// A `command:` step whose program does not exist fails with exit code 127 and a message
/// naming it. Skipped for runners without `command:` steps.
pub async fn missing_command(t: &Target) -> CheckResult {
    if !t.runner().capabilities().command_steps {
        return skipped("the runner does not declare command_steps");
    }
    let job = t.job(
        "missing",
        vec![Step::command(["/nonexistent/rustci-missing", "x"])],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "missing command", |o| {
        matches!(
            o,
            Outcome::Failed {
                step: 0,
                exit_code: 127,
                ..
            }
        )
    })?;
    ensure!(
        r.stderr_text().contains("rustci-missing"),
        "stderr does not name the program: {:?}",
        r.stderr_text()
    );
    passed()
}

/// A `run:` script calling a program that does not exist fails its step with exit code
/// 127. Skipped for runners without `run:` steps.
pub async fn missing_program_in_script(t: &Target) -> CheckResult {
    if !t.runner().capabilities().run_steps {
        return skipped("the runner does not declare run_steps");
    }
    let job = t.job("missing-sh", vec![Step::run("rustci-missing-program")]);
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "missing program in a script", |o| {
        matches!(
            o,
            Outcome::Failed {
                step: 0,
                exit_code: 127,
                ..
            }
        )
    })?;
    passed()
}

/// `command:` steps are exec'd without a shell: no expansion, arguments kept whole.
/// Skipped for runners without `command:` steps.
pub async fn command_without_shell(t: &Target) -> CheckResult {
    if !t.runner().capabilities().command_steps {
        return skipped("the runner does not declare command_steps");
    }
    let job = t.job(
        "argv",
        vec![Step::command(["printf", "[%s]", "a b", "$HOME", "*", ""])],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "argv", |o| *o == Outcome::Succeeded)?;
    ensure!(
        r.stdout_text() == "[a b][$HOME][*][]",
        "stdout is {:?}",
        r.stdout_text()
    );
    passed()
}

/// Each job starts in an empty workspace of its own; steps of one job share it. Two jobs
/// run at once, then a third after them: none may see another's files.
pub async fn workspace_isolation(t: &Target) -> CheckResult {
    let make = |i: usize| {
        t.job(
            &format!("workspace-{i}"),
            vec![t.sh("ls -A; touch \"m-$RUSTCI_JOB_ID\""), t.sh("ls -A")],
        )
    };
    let (job_a, job_b, job_c) = (make(1), make(2), make(3));
    let (a, b) = tokio::join!(run_job(t, &job_a), run_job(t, &job_b));
    let c = run_job(t, &job_c).await;
    for r in [a?, b?, c?] {
        expect_outcome(&r, "workspace", |o| *o == Outcome::Succeeded)?;
        let expected = format!("m-{}\n", r.id);
        ensure!(
            r.stdout_text() == expected,
            "the workspace was not empty at the start or not shared between steps: {:?} (expected {expected:?})",
            r.stdout_text()
        );
    }
    passed()
}

/// The image that tests of container runners use: `FROM scratch` plus a static busybox,
/// so that no registry is needed.
pub const BUSYBOX_IMAGE: &str = "rustci-busybox:local";

/// Makes sure the local Docker engine has [`BUSYBOX_IMAGE`], building it with the `docker`
/// CLI from this host's static busybox (Debian's `busybox-static`) when it is missing.
/// Test processes running in parallel build it once: the others wait on a file lock and
/// find it. The error says what is missing (the engine, busybox, or why the build failed).
pub fn busybox_image() -> Result<&'static str, String> {
    use std::process::Command;
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let lock = std::fs::File::create(std::env::temp_dir().join("rustci-test-image.lock"))
            .map_err(|e| format!("lock file: {e}"))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        let engine = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .map_err(|e| format!("docker CLI: {e}"))?;
        if !engine.status.success() {
            return Err(format!(
                "the engine is unreachable: {}",
                String::from_utf8_lossy(&engine.stderr).trim()
            ));
        }
        let have = Command::new("docker")
            .args(["image", "inspect", BUSYBOX_IMAGE])
            .output()
            .map_err(|e| format!("docker CLI: {e}"))?;
        if have.status.success() {
            return Ok(());
        }
        let dir = tempfile_dir()?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("no busybox binary (install Debian's busybox-static)")?;
        let result = (|| {
            std::fs::copy(busybox, dir.join("busybox")).map_err(|e| e.to_string())?;
            std::fs::write(
                dir.join("Dockerfile"),
                "FROM scratch\nLABEL rustci.test-image=true\nCOPY busybox /bin/busybox\n\
                 RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n\
                 CMD [\"/bin/sh\"]\n",
            )
            .map_err(|e| e.to_string())?;
            let out = Command::new("docker")
                .args(["build", "-q", "-t", BUSYBOX_IMAGE])
                .arg(&dir)
                .output()
                .map_err(|e| format!("docker build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "docker build failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    });
    result.clone().map(|()| BUSYBOX_IMAGE)
}

/// [`busybox_image`] for a test: `None` after printing a `SKIPPED` line when there is no
/// usable engine, but a panic when `RUSTCI_REQUIRE_DOCKER` is set (as CI does).
pub fn busybox_image_or_skip() -> Option<&'static str> {
    match busybox_image() {
        Ok(image) => Some(image),
        Err(e) if std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some() => {
            panic!("RUSTCI_REQUIRE_DOCKER is set but: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no usable Docker engine: {e}");
            None
        }
    }
}

/// A fresh private directory under the system's temporary directory.
fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("rustci-image-{}", JobId::new()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

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
