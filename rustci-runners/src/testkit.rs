//! The conformance suite: checks that every [`Runner`] must pass, chosen by its declared
//! [`Capabilities`](crate::Capabilities).
//!
//! Each check is a public async function taking a [`Target`] (a `&dyn Runner` plus the
//! image to use for container runners). Jobs are POSIX `sh` scripts using only commands a
//! static busybox provides, so that container runners can run them in a minimal image. A
//! check returns `Err(Failure)` naming what it saw; it never panics on a runner's mistake.
//!
//! Every check also verifies the event contract (sequence numbers from 0 without gaps,
//! `Started` first, `Finished` last and equal to the outcome) and that no process of its
//! jobs is left on this host afterwards. For the latter, runners MUST put `RUSTCI_JOB_ID`
//! (the execution id) in every step's environment; processes are found through
//! `/proc/*/environ`, which also sees processes in local containers.
//!
//! Use [`conformance_tests!`](crate::conformance_tests) to get one `#[tokio::test]` per
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

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::job::{Job, Step};
use crate::runner::{EventKind, JobId, Outcome, OutputStream, Runner, RunnerInfo};

/// Longest any single check may take before it is declared hung.
pub const CHECK_LIMIT: Duration = Duration::from_secs(180);

/// Names of every check, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "exit_codes",
    "signal_death",
    "stream_separation",
    "large_output",
    "binary_output",
    "env_passing",
    "host_env_isolation",
    "secret_masking",
    "timeout_kills_tree",
    "sigterm_ignored",
    "cancel_mid_run",
    "background_holds_stdout",
    "concurrent_jobs",
    "missing_command",
    "command_without_shell",
    "workspace_isolation",
];

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

/// The result of one check.
pub type CheckResult = Result<(), Failure>;

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

/// Options for [`run_job`].
#[derive(Default)]
struct RunOptions {
    /// Cancel once this text appears on stdout.
    cancel_on: Option<&'static str>,
    /// Keep no output, only count it (for large output).
    count_only: bool,
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
    let started = Instant::now();
    let mut execution = target
        .runner()
        .start(job, JobId::new())
        .await
        .map_err(|e| Failure(format!("start of job {} failed: {e}", job.name)))?;
    let id = execution.id().clone();
    let mut record = Record {
        id: id.clone(),
        stdout: Vec::new(),
        stderr: Vec::new(),
        outcome: Outcome::Lost,
        events: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut stats = Stats::default();
    let mut expected_seq = 0;
    let mut finished = None;
    let mut cancelled = false;
    let baseline_rss = rss_bytes();
    while let Some(event) = execution.next_event().await {
        ensure!(
            event.seq == expected_seq,
            "event sequence jumped from {} to {}",
            expected_seq,
            event.seq
        );
        expected_seq += 1;
        ensure!(
            finished.is_none(),
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
                let sink = match stream {
                    OutputStream::Stdout => &mut record.stdout,
                    OutputStream::Stderr => &mut record.stderr,
                };
                match stream {
                    OutputStream::Stdout => stats.stdout_bytes += data.len() as u64,
                    OutputStream::Stderr => stats.stderr_bytes += data.len() as u64,
                }
                if opts.count_only {
                    stats.stdout_all_zero &= data.iter().all(|b| *b == 0);
                    stats.peak_rss_growth = stats
                        .peak_rss_growth
                        .max(rss_bytes().saturating_sub(baseline_rss));
                } else {
                    sink.extend_from_slice(&data);
                }
                if let Some(marker) = opts.cancel_on
                    && !cancelled
                    && String::from_utf8_lossy(&record.stdout).contains(marker)
                {
                    execution.cancel();
                    cancelled = true;
                }
            }
            EventKind::Finished { outcome } => finished = Some(outcome),
            other => record.events.push(other),
        }
    }
    let from_event =
        finished.ok_or_else(|| Failure("the event stream ended without Finished".into()))?;
    record.outcome = execution.wait().await;
    record.elapsed = started.elapsed();
    ensure!(
        record.outcome == from_event,
        "wait returned {:?} but Finished carried {:?}",
        record.outcome,
        from_event
    );
    let left = processes_of(&id);
    ensure!(
        left.is_empty(),
        "processes of job {} are still alive: {left:?}",
        job.name
    );
    Ok((record, stats))
}

#[derive(Debug)]
struct Stats {
    stdout_bytes: u64,
    stderr_bytes: u64,
    stdout_all_zero: bool,
    peak_rss_growth: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_all_zero: true,
            peak_rss_growth: 0,
        }
    }
}

/// Resident memory of this process in bytes (0 when unknown).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Pids of processes on this host whose environment holds `RUSTCI_JOB_ID=<id>`.
pub fn processes_of(id: &JobId) -> Vec<i32> {
    crate::process::pids_with_env("RUSTCI_JOB_ID", id.as_str())
}

fn expect_outcome(record: &Record, what: &str, ok: impl Fn(&Outcome) -> bool) -> CheckResult {
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
    Ok(())
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
    Ok(())
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
    Ok(())
}

/// 100 MiB of output arrives whole while this process's memory grows by less than 64 MiB.
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
    Ok(())
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
    Ok(())
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
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "env", |o| *o == Outcome::Succeeded)?;
    let expected = format!("demo|step|1|{}|a b  'c'\n", r.id);
    ensure!(
        r.stdout_text() == expected,
        "expected {expected:?}, got {:?}",
        r.stdout_text()
    );
    Ok(())
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
    Ok(())
}

/// Secrets never appear in output: whole, split across two writes, multi-line, on either
/// stream.
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
    Ok(())
}

const TREE: &str = "sh -c 'sleep 300' & \
                    if command -v setsid >/dev/null; then setsid sleep 301 & fi; \
                    (sleep 302 &); \
                    echo started; sleep 303";

/// A job timeout stops every process of the job, including ones in a new session.
pub async fn timeout_kills_tree(t: &Target) -> CheckResult {
    let job = t
        .job("timeout", vec![t.sh(TREE)])
        .with_timeout(Duration::from_secs(2));
    let r = run_job(t, &job).await?;
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
    Ok(())
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
    Ok(())
}

/// Cancel stops a running job, its outcome is Cancelled and nothing is left.
pub async fn cancel_mid_run(t: &Target) -> CheckResult {
    let job = t.job("cancel", vec![t.sh(TREE), t.sh("echo never")]);
    let (r, _) = run_with(
        t,
        &job,
        RunOptions {
            cancel_on: Some("started"),
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
    Ok(())
}

/// A background process that keeps stdout open does not hang the job; it is killed.
pub async fn background_holds_stdout(t: &Target) -> CheckResult {
    let job = t.job(
        "background",
        vec![t.sh("sleep 300 & echo done"), t.sh("echo second")],
    );
    let r = run_job(t, &job).await?;
    expect_outcome(&r, "background", |o| *o == Outcome::Succeeded)?;
    ensure!(
        r.stdout_text() == "done\nsecond\n",
        "stdout is {:?}",
        r.stdout_text()
    );
    ensure!(
        r.elapsed < Duration::from_secs(250),
        "the job waited for its background process"
    );
    Ok(())
}

/// 50 jobs at once all succeed and each sees only its own output.
pub async fn concurrent_jobs(t: &Target) -> CheckResult {
    let n = t
        .runner()
        .capabilities()
        .max_concurrency
        .unwrap_or(50)
        .min(50);
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
    Ok(())
}

/// A missing program fails its step with exit code 127 and a message naming it.
pub async fn missing_command(t: &Target) -> CheckResult {
    let caps = t.runner().capabilities();
    if caps.command_steps {
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
    }
    if caps.run_steps {
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
    }
    Ok(())
}

/// `command:` steps are exec'd without a shell: no expansion, arguments kept whole.
pub async fn command_without_shell(t: &Target) -> CheckResult {
    if !t.runner().capabilities().command_steps {
        return Ok(());
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
    Ok(())
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
    Ok(())
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

/// Runs one check by name. `Ok(false)` when the name is unknown.
pub async fn run_check(t: &Target, name: &str) -> Result<bool, Failure> {
    let fut = async {
        match name {
            "exit_codes" => exit_codes(t).await,
            "signal_death" => signal_death(t).await,
            "stream_separation" => stream_separation(t).await,
            "large_output" => large_output(t).await,
            "binary_output" => binary_output(t).await,
            "env_passing" => env_passing(t).await,
            "host_env_isolation" => host_env_isolation(t).await,
            "secret_masking" => secret_masking(t).await,
            "timeout_kills_tree" => timeout_kills_tree(t).await,
            "sigterm_ignored" => sigterm_ignored(t).await,
            "cancel_mid_run" => cancel_mid_run(t).await,
            "background_holds_stdout" => background_holds_stdout(t).await,
            "concurrent_jobs" => concurrent_jobs(t).await,
            "missing_command" => missing_command(t).await,
            "command_without_shell" => command_without_shell(t).await,
            "workspace_isolation" => workspace_isolation(t).await,
            _ => return Ok(false),
        }
        .map(|()| true)
    };
    let info: RunnerInfo = t.runner().info().clone();
    match tokio::time::timeout(CHECK_LIMIT, fut).await {
        Ok(result) => {
            result.map_err(|f| Failure(format!("[{} {}] {name}: {f}", info.kind, info.name)))
        }
        Err(_) => Err(Failure(format!(
            "{name}: hung for more than {CHECK_LIMIT:?}"
        ))),
    }
}

/// Runs every check and returns each failure.
pub async fn run_all(t: &Target) -> Vec<Failure> {
    let mut failures = Vec::new();
    for name in CHECKS {
        if let Err(f) = run_check(t, name).await {
            failures.push(f);
        }
    }
    failures
}

/// Expands to one `#[tokio::test]` per conformance check, each building its target with
/// the given expression.
///
/// With `optional: expr`, the expression gives an `Option<Target>`; `None` skips every
/// check with a visible `SKIPPED` line (use it for targets that need something the host
/// may lack, and make the expression panic when the environment demands the target).
#[macro_export]
macro_rules! conformance_tests {
    (optional: $target:expr) => {
        $crate::conformance_tests!(@each (match $target {
            Some(target) => target,
            None => {
                eprintln!("SKIPPED: conformance target unavailable on this host");
                return;
            }
        });
            exit_codes, signal_death, stream_separation, large_output, binary_output,
            env_passing, host_env_isolation, secret_masking, timeout_kills_tree,
            sigterm_ignored, cancel_mid_run, background_holds_stdout, concurrent_jobs,
            missing_command, command_without_shell, workspace_isolation);
    };
    ($target:expr) => {
        $crate::conformance_tests!(@each $target;
            exit_codes, signal_death, stream_separation, large_output, binary_output,
            env_passing, host_env_isolation, secret_masking, timeout_kills_tree,
            sigterm_ignored, cancel_mid_run, background_holds_stdout, concurrent_jobs,
            missing_command, command_without_shell, workspace_isolation);
    };
    (@each $target:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let target = $target;
                match $crate::testkit::run_check(&target, stringify!($name)).await {
                    Ok(true) => {}
                    Ok(false) => panic!("unknown conformance check {}", stringify!($name)),
                    Err(failure) => panic!("{failure}"),
                }
            }
        )*
    };
}
