//! The checks, each a public async function over a [`Target`].

use super::*;

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
    let (r, _) = run_with(t, &job, RunOptions::default()).await?;
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
    // Whether the process-tree watch saw the `env -i` process is asserted in
    // `cancel_mid_run` only: there the cancel follows the output event the snapshot is
    // taken at, while here, under load, the timeout may end the tree before the event is
    // read.
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
