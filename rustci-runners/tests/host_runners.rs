//! Behaviour of LocalRunner and NativeRunner beyond the conformance suite: leftovers,
//! truncation, workspaces, configuration and job errors, kernel-enforced limits,
//! namespaces and uid switching.

use std::path::PathBuf;
use std::time::Duration;

use rustci_runners::job::Resources;
use rustci_runners::testkit::{Record, Target, processes_of, requires_root, run_job};
use rustci_runners::{
    CgroupMode, Error, EventKind, HostConfig, Job, JobId, Limit, LocalRunner, Namespaces,
    NativeConfig, NativeRunner, Outcome, ResourceUsage, Runner, Step, UsageFigure,
};

fn local(config: HostConfig) -> Target {
    Target::new(LocalRunner::new(config).expect("local runner"))
}

fn native_with(f: impl FnOnce(&mut NativeConfig)) -> NativeRunner {
    let mut config = NativeConfig::default();
    config.host.termination_grace = Duration::from_secs(1);
    f(&mut config);
    NativeRunner::new(config).expect("native runner")
}

fn native() -> Target {
    Target::new(native_with(|_| {}))
}

async fn run(t: &Target, job: Job) -> Record {
    run_job(t, &job).await.unwrap_or_else(|f| panic!("{f}"))
}

fn requires_limit(t: &Target, limit: Limit) -> bool {
    if t.runner().capabilities().limits.contains(&limit) {
        return true;
    }
    if std::env::var_os("RUSTCI_REQUIRE_CGROUPS").is_some() {
        panic!("RUSTCI_REQUIRE_CGROUPS is set but this host cannot enforce {limit}");
    }
    eprintln!("SKIPPED: this host cannot enforce resources.{limit} (no usable cgroup)");
    false
}

#[tokio::test]
async fn leftover_processes_are_reported_and_killed() {
    let t = local(HostConfig::default());
    let r = run(
        &t,
        Job::new(
            "leftover",
            vec![Step::run("sleep 300 & sleep 301 & echo done")],
        ),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded);
    let counts: Vec<usize> = r
        .events
        .iter()
        .filter_map(|e| match e {
            EventKind::LeftoverProcesses { count, .. } => Some(*count),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![2], "events: {:?}", r.events);
}

#[tokio::test]
async fn setsid_daemon_is_killed_when_its_step_ends() {
    let t = native();
    let job = Job::new(
        "daemon",
        vec![Step::command([
            "sh",
            "-c",
            "setsid sh -c 'sleep 300' > /dev/null 2>&1 < /dev/null & echo ok",
        ])],
    );
    let r = run(&t, job).await;
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e, EventKind::LeftoverProcesses { count: 1.., .. }))
    );
    // run_job has already checked that no process with the job's id is alive.
}

#[tokio::test]
async fn output_past_the_limit_is_dropped_behind_one_marker() {
    let mut config = HostConfig::default();
    config.max_output_bytes = 1000;
    let t = local(config);
    let job = Job::new(
        "chatty",
        vec![
            Step::run("head -c 5000 /dev/zero | tr '\\0' a; echo; echo more >&2"),
            Step::run("echo still-running > proof; head -c 3000 /dev/zero; cat proof >&2"),
        ],
    );
    let r = run(&t, job).await;
    assert_eq!(
        r.outcome,
        Outcome::Succeeded,
        "the job keeps running past the limit"
    );
    assert_eq!(r.stdout.len() + r.stderr.len(), 1000);
    let markers = r
        .events
        .iter()
        .filter(|e| matches!(e, EventKind::OutputTruncated { limit: 1000, .. }))
        .count();
    assert_eq!(markers, 1);
}

#[tokio::test]
async fn workspaces_are_fresh_and_removed_unless_kept() {
    let root = tempfile::tempdir().unwrap();
    let mut config = HostConfig::default();
    config.workspace_root = root.path().to_path_buf();
    let runner = LocalRunner::new(config.clone()).unwrap();
    let t = Target::shared(std::sync::Arc::new(runner));
    let r = run(
        &t,
        Job::new(
            "ws",
            vec![Step::run("echo $RUSTCI_WORKSPACE; pwd; touch f; mkdir d")],
        ),
    )
    .await;
    let text = r.stdout_text();
    let mut lines = text.lines();
    let workspace = PathBuf::from(lines.next().unwrap());
    assert_eq!(
        lines.next().unwrap(),
        workspace.to_str().unwrap(),
        "steps run in the workspace"
    );
    assert!(workspace.starts_with(root.path()));
    assert!(!workspace.exists(), "a used workspace was left behind");

    // A workspace left untouched may be handed to the next job, but always empty; one a
    // job changed (here: its mode) is never reused.
    let r = run(
        &t,
        Job::new("quiet", vec![Step::run("echo $RUSTCI_WORKSPACE")]),
    )
    .await;
    let quiet = PathBuf::from(r.stdout_text().trim());
    let r = run(
        &t,
        Job::new(
            "chmod",
            vec![Step::run("ls -A; echo $RUSTCI_WORKSPACE; chmod 700 .")],
        ),
    )
    .await;
    let text = r.stdout_text();
    assert_eq!(
        text.trim(),
        quiet.to_str().unwrap(),
        "not empty, or not reused: {text}"
    );
    assert!(!quiet.exists(), "a workspace whose mode changed was kept");
    let r = run(
        &t,
        Job::new("after", vec![Step::run("ls -A; echo $RUSTCI_WORKSPACE")]),
    )
    .await;
    assert_ne!(r.stdout_text().trim(), quiet.to_str().unwrap());
    drop(t);
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        0,
        "dropping the runner leaves nothing under its root"
    );

    config.keep_workspaces = true;
    let t = local(config);
    let mut job = Job::new("kept", vec![Step::run("pwd; touch f")]);
    job.workdir = Some("sub/dir".into());
    let r = run(&t, job).await;
    let cwd = PathBuf::from(r.stdout_text().trim());
    assert!(cwd.ends_with("sub/dir"), "{cwd:?}");
    assert!(cwd.starts_with(root.path()), "{cwd:?}");
    assert!(cwd.join("f").exists(), "kept workspace is gone");
}

#[tokio::test]
async fn workspaces_of_processes_that_are_gone_are_swept_at_start() {
    use rustci_runners::owner::{owner_token, this_host};
    let root = tempfile::tempdir().unwrap();
    let host = this_host();
    let owner_dir = |name: &str, token: &str| {
        let d = root.path().join(name);
        std::fs::create_dir_all(d.join("ws-1/deep")).unwrap();
        std::fs::write(d.join("ws-1/deep/file"), b"left").unwrap();
        std::fs::create_dir(d.join("ws-2")).unwrap();
        std::fs::write(d.join("owner"), token).unwrap();
        d
    };
    // A process of this host that is gone, one alive (this one), one of another host.
    let dead = owner_dir("rustci-x-999999999-1", &format!("{host}/999999999/1"));
    let alive = owner_dir("rustci-y-1-1", &owner_token());
    let elsewhere = owner_dir("rustci-z-1-1", "another-host/1/1");
    // Not an owner directory: no owner file, or another name.
    let unmarked = root.path().join("rustci-unmarked");
    std::fs::create_dir(&unmarked).unwrap();
    let user = root.path().join("ws-of-the-user");
    std::fs::create_dir(&user).unwrap();

    let mut config = HostConfig::default();
    config.workspace_root = root.path().to_path_buf();
    let runner = LocalRunner::new(config).unwrap();
    assert!(!dead.exists(), "the dead process's workspaces are swept");
    for kept in [&alive, &elsewhere, &unmarked, &user] {
        assert!(kept.exists(), "{} was removed", kept.display());
    }
    // This process's own workspaces are in its marked owner directory.
    let t = Target::shared(std::sync::Arc::new(runner));
    let r = run(
        &t,
        Job::new("ws", vec![Step::run("echo $RUSTCI_WORKSPACE")]),
    )
    .await;
    let ws = PathBuf::from(r.stdout_text().trim());
    let mine = ws.parent().unwrap();
    assert_eq!(mine.parent().unwrap(), root.path());
    assert!(
        mine.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("rustci-"),
        "{ws:?}"
    );
    assert_eq!(
        std::fs::read_to_string(mine.join("owner")).unwrap(),
        owner_token()
    );
    let mine = mine.to_path_buf();
    drop(t);
    assert!(
        !mine.exists(),
        "the last runner removes its owner directory"
    );
}

/// The job's `Usage` event (and each step's, in order), from a record's events.
fn usages(r: &Record) -> (Option<ResourceUsage>, Vec<(usize, ResourceUsage)>) {
    let mut job = None;
    let mut steps = Vec::new();
    for e in &r.events {
        match e {
            EventKind::Usage {
                step: Some(s),
                usage,
            } => steps.push((*s, usage.clone())),
            EventKind::Usage { step: None, usage } => {
                assert!(job.is_none(), "one job usage event");
                job = Some(usage.clone());
            }
            _ => {}
        }
    }
    (job, steps)
}

#[tokio::test]
async fn jobs_report_cpu_time_and_io_from_the_kernel_and_nothing_they_did_not_measure() {
    for t in [local(HostConfig::default()), native()] {
        let kind = t.runner().info().kind;
        let caps = &t.runner().capabilities().usage;
        assert!(caps.contains(&UsageFigure::CpuTime) && caps.contains(&UsageFigure::Io));
        // A busy loop (user time), then 8 MiB written and flushed to the disk.
        let job = Job::new(
            "busy",
            vec![
                Step::run("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"),
                Step::run("dd if=/dev/zero of=f bs=1M count=8 conv=fsync 2>/dev/null"),
            ],
        );
        let r = run(&t, job).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{kind}: {}", r.stderr_text());
        let (job, steps) = usages(&r);
        let job = job.expect("a job usage event");
        assert_eq!(steps.len(), 2, "{kind}: one per step");
        assert_eq!((steps[0].0, steps[1].0), (0, 1));
        let burn = steps[0].1.cpu_user_seconds.unwrap();
        assert!(burn > 0.05, "{kind}: the busy loop's user time is {burn}");
        let written = steps[1].1.written_bytes.unwrap();
        assert!(written >= 8 << 20, "{kind}: {written} bytes written");
        assert!(job.cpu_seconds().unwrap() >= burn);
        assert!(job.written_bytes.unwrap() >= written);
        assert_eq!(job.source, "rusage");
        // Not measured without a cgroup: absent, not zero.
        assert_eq!(job.peak_memory_bytes, None);
        let json = serde_json::to_value(&job).unwrap();
        assert!(json.get("peak_memory_bytes").is_none(), "{json}");
        // Each step's figures come just before its end, the job's just before Finished.
        let kinds: Vec<&str> = r
            .events
            .iter()
            .map(|e| match e {
                EventKind::Usage { .. } => "usage",
                EventKind::StepFinished { .. } => "step_finished",
                EventKind::Finished { .. } => "finished",
                _ => "",
            })
            .filter(|k| !k.is_empty())
            .collect();
        // (A record's events end before `Finished`.)
        assert_eq!(
            kinds,
            ["usage", "step_finished", "usage", "step_finished", "usage"]
        );
        assert!(matches!(
            r.events.last(),
            Some(EventKind::Usage { step: None, .. })
        ));
    }
}

#[tokio::test]
async fn a_job_in_a_memory_cgroup_reports_its_peak_memory() {
    let t = native();
    if !requires_limit(&t, Limit::Memory) {
        return;
    }
    // dd holds one 48 MiB buffer.
    let job = Job::new(
        "buffer",
        vec![Step::run(
            "dd if=/dev/zero of=/dev/null bs=48M count=2 2>/dev/null",
        )],
    )
    .with_resources(Resources {
        memory: Some(256 << 20),
        ..Resources::default()
    });
    let r = run(&t, job).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    let job = usages(&r).0.expect("a job usage event");
    let peak = job.peak_memory_bytes.expect("peak memory from the cgroup");
    assert!(peak >= 48 << 20, "peak {peak}");
    assert!(peak <= 256 << 20, "peak {peak} past the limit");
    assert!(job.source.contains("(memory)"), "{}", job.source);
}

#[tokio::test]
async fn bad_configuration_is_refused_clearly() {
    let mut config = HostConfig::default();
    config.shell = vec!["/nonexistent/shell".into(), "-e".into()];
    let err = LocalRunner::new(config)
        .err()
        .expect("missing shell accepted");
    assert_eq!(
        err.kind(),
        Some(rustci_runners::ErrorKind::InvalidConfig),
        "{err}"
    );
    assert!(!err.is_temporary(), "{err}");
    assert_eq!(
        err.as_runner_error().and_then(|e| e.runner()),
        Some("host"),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/shell"), "{err}");

    let file = tempfile::NamedTempFile::new().unwrap();
    let mut config = HostConfig::default();
    config.workspace_root = file.path().join("below-a-file");
    let err = LocalRunner::new(config)
        .err()
        .expect("unwritable root accepted");
    assert!(err.to_string().contains("below-a-file"), "{err}");

    let mut config = NativeConfig::default();
    config.cgroups = CgroupMode::Off;
    config.default_resources.memory = Some(1 << 30);
    let err = NativeRunner::new(config)
        .err()
        .expect("unenforceable default accepted");
    assert!(err.to_string().contains("resources.memory"), "{err}");
}

#[tokio::test]
async fn workspace_root_that_breaks_later_fails_start_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut config = HostConfig::default();
    config.workspace_root = root.path().join("ws");
    let runner = LocalRunner::new(config).unwrap();
    std::fs::remove_dir_all(root.path().join("ws")).unwrap();
    std::fs::write(root.path().join("ws"), b"now a file").unwrap();
    let err = runner
        .start(&Job::new("x", vec![Step::run("true")]), JobId::new())
        .await
        .expect_err("start succeeded without a workspace");
    assert!(err.to_string().contains("ws"), "{err}");
    assert!(matches!(
        runner.health().await,
        rustci_runners::Health::Unhealthy(_)
    ));
    assert_eq!(runner.running(), 0);
}

#[tokio::test]
async fn invalid_and_unsupported_jobs_are_errors_before_anything_runs() {
    let local = LocalRunner::new(HostConfig::default()).unwrap();
    let err = local
        .start(&Job::new("bad name", vec![]), JobId::new())
        .await
        .unwrap_err();
    let Error::InvalidSpec(errors) = &err else {
        panic!("{err}")
    };
    assert_eq!(errors.len(), 2, "{errors}");

    let err = local
        .start(
            &Job::new("argv", vec![Step::command(["true"])]),
            JobId::new(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("command:"), "{err}");

    let job = Job::new("limited", vec![Step::run("true")]).with_resources(Resources {
        memory: Some(1 << 20),
        ..Resources::default()
    });
    let err = local.start(&job, JobId::new()).await.unwrap_err();
    assert!(err.to_string().contains("resources.memory"), "{err}");

    let native = native_with(|c| c.cgroups = CgroupMode::Off);
    let err = native.start(&job, JobId::new()).await.unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert_eq!(native.running(), 0);
}

#[tokio::test]
async fn concurrency_limit_is_enforced() {
    let mut config = HostConfig::default();
    config.max_concurrency = Some(1);
    let runner = LocalRunner::new(config).unwrap();
    let first = runner
        .start(&Job::new("one", vec![Step::run("sleep 300")]), JobId::new())
        .await
        .unwrap();
    let err = runner
        .start(&Job::new("two", vec![Step::run("true")]), JobId::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Busy {
                running: 1,
                max: 1,
                ..
            }
        ),
        "{err}"
    );
    first.cancel();
    assert_eq!(first.wait().await, Outcome::Cancelled);
    assert_eq!(runner.running(), 0);
}

#[tokio::test]
async fn memory_limit_ends_in_an_oom_kill() {
    let t = native();
    if !requires_limit(&t, Limit::Memory) {
        return;
    }
    let job = Job::new(
        "hog",
        vec![Step::run(
            "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived",
        )],
    )
    .with_resources(Resources {
        memory: Some(64 << 20),
        ..Resources::default()
    });
    let r = run(&t, job).await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Signalled {
                signal: 9,
                oom_killed: true,
                ..
            }
        ),
        "{:?} {}",
        r.outcome,
        r.stderr_text()
    );
    assert!(!r.stdout_text().contains("survived"));
}

#[tokio::test]
async fn memory_as_address_space_without_cgroups() {
    let runner = native_with(|c| {
        c.cgroups = CgroupMode::Off;
        c.address_space_fallback = true;
    });
    assert!(runner.capabilities().limits.contains(&Limit::Memory));
    assert!(
        runner.isolation().contains("RLIMIT_AS"),
        "{}",
        runner.isolation()
    );
    let t = Target::new(runner);
    let job = Job::new(
        "hog",
        vec![Step::run(
            "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived",
        )],
    )
    .with_resources(Resources {
        memory: Some(64 << 20),
        ..Resources::default()
    });
    let r = run(&t, job).await;
    assert!(!r.outcome.is_success(), "{:?}", r.outcome);
    assert!(!r.stdout_text().contains("survived"));
    let ok = Job::new("small", vec![Step::run("echo fits")]).with_resources(Resources {
        memory: Some(64 << 20),
        ..Resources::default()
    });
    assert_eq!(run(&t, ok).await.stdout_text(), "fits\n");
}

#[tokio::test]
async fn pids_limit_stops_a_fork_bomb() {
    let t = native();
    if !requires_limit(&t, Limit::Pids) {
        return;
    }
    let job = Job::new(
        "forks",
        vec![Step::run(
            "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; echo all-forked",
        )],
    )
    .with_resources(Resources {
        pids: Some(20),
        ..Resources::default()
    });
    let r = run(&t, job).await;
    assert!(
        matches!(r.outcome, Outcome::Failed { .. }),
        "{:?}",
        r.outcome
    );
    assert!(!r.stdout_text().contains("all-forked"));
    assert!(
        r.stderr_text().to_lowercase().contains("fork"),
        "{}",
        r.stderr_text()
    );
}

#[tokio::test]
async fn cpu_quota_is_written_for_the_job() {
    let t = native();
    if !requires_limit(&t, Limit::Cpus) {
        return;
    }
    let job = Job::new(
        "quota",
        vec![Step::run(
            "if [ -e /sys/fs/cgroup/cgroup.controllers ]; then \
               p=$(sed -n 's/^0:://p' /proc/self/cgroup); cat /sys/fs/cgroup$p/cpu.max; \
             else \
               p=$(grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:' /proc/self/cgroup | cut -d: -f3); \
               cat /sys/fs/cgroup/cpu$p/cpu.cfs_quota_us; \
             fi",
        )],
    )
    .with_resources(Resources {
        cpus: Some(0.5),
        ..Resources::default()
    });
    let r = run(&t, job).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    assert!(r.stdout_text().starts_with("50000"), "{}", r.stdout_text());
}

#[tokio::test]
async fn rlimits_are_enforced() {
    let t = native();
    let caps = t.runner().capabilities();
    for l in [Limit::CpuTime, Limit::OpenFiles, Limit::FileSize] {
        assert!(caps.limits.contains(&l), "{l} is always enforceable");
    }
    let spin = Job::new("spin", vec![Step::run("while :; do :; done")]).with_resources(Resources {
        cpu_time: Some(Duration::from_secs(1)),
        ..Resources::default()
    });
    let r = run(&t, spin).await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Signalled {
                signal: libc::SIGXCPU,
                ..
            } | Outcome::Signalled { signal: 9, .. }
        ),
        "{:?}",
        r.outcome
    );

    let files = Job::new("files", vec![Step::command(["sh", "-c", "ulimit -n"])]).with_resources(
        Resources {
            open_files: Some(17),
            ..Resources::default()
        },
    );
    assert_eq!(run(&t, files).await.stdout_text(), "17\n");

    let big = Job::new(
        "big",
        vec![Step::run("head -c 100000 /dev/zero > big; echo wrote")],
    )
    .with_resources(Resources {
        file_size: Some(4096),
        ..Resources::default()
    });
    let r = run(&t, big).await;
    assert!(
        matches!(r.outcome, Outcome::Failed { .. }),
        "{:?}",
        r.outcome
    );
    assert!(!r.stdout_text().contains("wrote"));
}

fn namespace_runner() -> Option<NativeRunner> {
    let mut config = NativeConfig::default();
    config.host.termination_grace = Duration::from_secs(1);
    config.namespaces = Namespaces::all_but_network();
    config.namespaces.net = true;
    match NativeRunner::new(config) {
        Ok(r) => Some(r),
        Err(e) if std::env::var_os("RUSTCI_REQUIRE_NAMESPACES").is_none() => {
            eprintln!("SKIPPED: namespaces are not permitted here: {e}");
            None
        }
        Err(e) => panic!("RUSTCI_REQUIRE_NAMESPACES is set but: {e}"),
    }
}

#[tokio::test]
async fn namespaces_isolate_pids_hostname_and_network() {
    let Some(runner) = namespace_runner() else {
        return;
    };
    assert_eq!(
        runner.capabilities().isolation,
        rustci_runners::Isolation::Namespaces
    );
    let t = Target::new(runner);
    let job = Job::new(
        "ns",
        vec![Step::run(
            "echo pid=$$; hostname; ls /proc | grep -c '^[0-9]'; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
        )],
    );
    let r = run(&t, job).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    let text = r.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    // The step runs as PID 2, under a minimal init that is PID 1 of the namespace.
    assert_eq!(lines[0], "pid=2", "{text}");
    assert_eq!(lines[1], "rustci-job");
    let visible: usize = lines[2].parse().unwrap();
    assert!(visible <= 5, "the job sees {visible} processes");
    assert_eq!(&lines[3..], &["lo"], "network interfaces: {text}");
}

#[tokio::test]
async fn run_as_drops_privileges() {
    if !nix::unistd::geteuid().is_root() {
        // Without root, run_as is refused when the runner is made, naming why.
        let mut config = NativeConfig::default();
        config.run_as = Some((65534, 65534));
        let err = NativeRunner::new(config)
            .err()
            .expect("run_as accepted without root");
        assert!(err.to_string().contains("root"), "{err}");
    }
    if !requires_root("run_as (uid 65534)") {
        return;
    }
    let t = Target::new(native_with(|c| c.run_as = Some((65534, 65534))));
    let r = run(
        &t,
        Job::new(
            "nobody",
            vec![Step::run("id -u; id -g; echo x > file && cat file")],
        ),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), "65534\n65534\nx\n");
    // A working directory below the workspace is made for the job and handed to its user
    // (every directory from the workspace down), so the step can enter it and write there.
    let mut job = Job::new(
        "workdir",
        vec![Step::command(["sh", "-c", "pwd; touch here && echo wrote"])],
    );
    job.workdir = Some("a/b".into());
    let r = run(&t, job).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    assert!(
        r.stdout_text().ends_with("/a/b\nwrote\n"),
        "{}",
        r.stdout_text()
    );
}

#[tokio::test]
async fn setup_failures_name_their_stage_and_are_runner_errors() {
    // A limit above the kernel's maximum cannot be set, for any user: the stage named is
    // the resource limits, and it is the runner's failure, not the job's.
    let t = native();
    let mut job = Job::new("bad-limit", vec![Step::command(["true"])]);
    job.resources.open_files = Some(u64::MAX);
    let r = run(&t, job).await;
    match &r.outcome {
        Outcome::RunnerError { message, .. } => {
            assert!(message.contains("resource limits"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    if !requires_root("run_as (uid 65534)") {
        return;
    }
    // The workspace root lies in a directory only root may enter (mode 0700), so the
    // job's user cannot reach its working directory: the stage named is entering it.
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let t = Target::new(native_with(|c| {
        c.run_as = Some((65534, 65534));
        c.host.workspace_root = root.path().join("workspaces");
    }));
    let r = run(&t, Job::new("no-entry", vec![Step::command(["true"])])).await;
    match &r.outcome {
        Outcome::RunnerError { message, .. } => {
            assert!(
                message.contains("entering the working directory"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cancelled_job_leaves_no_process() {
    let mut config = HostConfig::default();
    config.termination_grace = Duration::from_millis(200);
    let runner = LocalRunner::new(config).unwrap();
    let mut execution = runner
        .start(
            &Job::new(
                "c",
                vec![Step::run(
                    "trap '' TERM; setsid sleep 300 & echo go; sleep 300",
                )],
            ),
            JobId::new(),
        )
        .await
        .unwrap();
    let id = execution.id().clone();
    loop {
        let event = execution
            .next_event()
            .await
            .expect("events end before output");
        if let EventKind::Output { data, .. } = &event.kind {
            assert_eq!(&data[..], b"go\n");
            break;
        }
    }
    assert!(!processes_of(&id).expect("scan /proc").is_empty());
    execution.cancel();
    assert_eq!(execution.wait().await, Outcome::Cancelled);
    assert_eq!(processes_of(&id).expect("scan /proc"), Vec::<i32>::new());
}

#[tokio::test]
async fn a_job_that_kills_its_supervisor_is_a_runner_error() {
    let t = local(HostConfig::default());
    let r = run(
        &t,
        Job::new("parricide", vec![Step::run("kill -9 $PPID; echo after")]),
    )
    .await;
    assert!(
        matches!(&r.outcome, Outcome::RunnerError { message, .. } if message.contains("supervisor")),
        "{:?}",
        r.outcome
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_reaches_the_process_once_with_the_value_that_wins() {
    // `printenv` prints every entry of a name that the environment holds: with duplicate
    // entries it would print both values (and C's getenv would see the first).
    for t in [native(), local(HostConfig::named("local"))] {
        let mut step = Step::command(["printenv", "FOO", "TOKEN"]);
        step.env.insert("FOO".into(), "from-step".into());
        let job = Job::new("env", vec![step])
            .with_env("FOO", "from-job")
            .with_env("TOKEN", "plain")
            .with_secret("TOKEN", "s3cr3t-value");
        if !t.runner().capabilities().command_steps {
            continue;
        }
        let r = run(&t, job).await;
        assert!(
            r.outcome.is_success(),
            "{:?}: {}",
            r.outcome,
            r.stderr_text()
        );
        assert_eq!(r.stdout_text(), "from-step\n***\n");
    }
}
