//! DockerRunner against the real engine of this machine: the Docker-specific behaviour
//! (the conformance suite is in `tests/conformance.rs`). The engine has no images and
//! cannot pull, so the tests build `rustci-busybox:local` (`FROM scratch` + a static
//! busybox) with the engine's CLI.
//!
//! Without a reachable engine every test prints `SKIPPED`; with `RUSTCI_REQUIRE_DOCKER`
//! set (as `.ci/run` does) that is a failure instead.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::{IMAGE, config, image, require, runner_with, target};
use rustci_runners::job::Resources;
use rustci_runners::testkit::{Target, run_job};
use rustci_runners::{Job, JobId, Outcome, Runner, Step};
use rustci_runners_docker::{DockerRunner, Engine, PullPolicy};

fn containers_of(job: &JobId) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=rustci.job={job}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn job(steps: Vec<Step>) -> Job {
    let mut j = Job::new("docker-test", steps);
    j.image = Some(IMAGE.into());
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_under_each_pull_policy() {
    let Some(never) = runner_with(|c| c.pull_policy = PullPolicy::Never).await else {
        return;
    };
    let mut j = job(vec![Step::run("true")]);
    j.image = Some("rustci-does-not-exist:never".into());
    let err = never.start(&j, JobId::new()).await.unwrap_err();
    assert!(
        err.to_string().contains("rustci-does-not-exist:never"),
        "{err}"
    );
    assert!(err.to_string().contains("pull policy is never"), "{err}");

    // Present locally: runs under every policy but `always`, which must pull and cannot here.
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Always] {
        let runner = runner_with(|c| c.pull_policy = policy).await.unwrap();
        let id = JobId::new();
        let result = runner
            .start(&job(vec![Step::run("echo ok")]), id.clone())
            .await;
        match policy {
            PullPolicy::IfNotPresent => {
                assert_eq!(result.unwrap().wait().await, Outcome::Succeeded)
            }
            _ => {
                let err = result.unwrap_err();
                assert!(
                    err.to_string()
                        .contains("cannot pull image rustci-busybox:local"),
                    "{err}"
                );
            }
        }
        assert_eq!(containers_of(&id), 0);
        // Missing and not pullable (no registry here): a clear pull error.
        let mut j = job(vec![Step::run("true")]);
        j.image = Some("rustci-does-not-exist:pull".into());
        let err = runner.start(&j, JobId::new()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot pull image rustci-does-not-exist:pull"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_any_container() {
    let Some(runner) = runner_with(|_| {}).await else {
        return;
    };
    let id = JobId::new();
    let mut j = job(vec![Step::run("true")]);
    j.image = Some("Not A Valid/Reference".into());
    let err = runner.start(&j, id.clone()).await.unwrap_err();
    assert!(err.to_string().contains("invalid image reference"), "{err}");
    let mut j = job(vec![Step::run("true")]);
    j.image = None;
    let err = runner.start(&j, id.clone()).await.unwrap_err();
    assert!(err.to_string().contains("no image"), "{err}");
    assert_eq!(containers_of(&id), 0);

    let mut bogus = config();
    bogus.engine = Engine::Tls {
        address: "tcp://127.0.0.1:1".into(),
        ca: "/nonexistent/ca.pem".into(),
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
    };
    let err = DockerRunner::connect(bogus).await.err().unwrap();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_down_is_a_clear_error() {
    if image().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = config();
    c.engine = Engine::Socket(dir.path().join("no-engine.sock"));
    let err = DockerRunner::connect(c)
        .await
        .err()
        .expect("connected to a socket that does not exist");
    assert_eq!(
        err.kind(),
        Some(rustci_runners::ErrorKind::Unavailable),
        "{err}"
    );
    assert!(err.is_temporary(), "{err}");
    assert!(
        err.to_string().contains("docker engine unavailable"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_is_an_oom_outcome() {
    let Some(t) = target().await else { return };
    let mut j = job(vec![Step::run(
        "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived",
    )]);
    j.resources = Resources {
        memory: Some(64 << 20),
        ..Resources::default()
    };
    let r = run_job(&t, &j).await.unwrap();
    assert!(
        matches!(
            r.outcome,
            Outcome::Signalled {
                signal: 9,
                oom_killed: true,
                ..
            }
        ),
        "{:?}",
        r.outcome
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_stops_a_fork_bomb() {
    let Some(t) = target().await else { return };
    let mut j = job(vec![Step::run(
        "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; echo all-forked",
    )]);
    j.resources = Resources {
        pids: Some(20),
        ..Resources::default()
    };
    let r = run_job(&t, &j).await.unwrap();
    assert!(!r.outcome.is_success(), "{:?}", r.outcome);
    assert!(!r.stdout_text().contains("all-forked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ulimits_from_resources() {
    let Some(t) = target().await else { return };
    let mut j = job(vec![Step::run(
        "ulimit -n; head -c 100000 /dev/zero > big; echo wrote",
    )]);
    j.resources = Resources {
        open_files: Some(64),
        file_size: Some(4096),
        ..Resources::default()
    };
    let r = run_job(&t, &j).await.unwrap();
    assert!(!r.outcome.is_success(), "{:?}", r.outcome);
    assert!(r.stdout_text().starts_with("64\n"), "{}", r.stdout_text());
    assert!(!r.stdout_text().contains("wrote"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_has_no_network() {
    let Some(runner) = runner_with(|c| c.network_mode = "none".into()).await else {
        return;
    };
    let t = Target::new(runner).with_image(IMAGE);
    let r = run_job(&t, &job(vec![Step::run("ls /sys/class/net")]))
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), "lo\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_crashed_owner_are_swept() {
    if image().is_none() {
        return;
    }
    // A container labelled as if a runner of this name had died with it.
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            "rustci.managed=true",
            "--label",
            "rustci.runner.name=docker-sweep-test",
            "--label",
            "rustci.job=crashed",
        ])
        .arg("--label")
        .arg(format!(
            "rustci.owner={}/999999999",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
        ))
        .args([IMAGE, "sleep", "300"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let runner = runner_with(|c| c.name = "docker-sweep-test".into())
        .await
        .unwrap();
    let gone = Command::new("docker")
        .args(["inspect", &id])
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "the crashed owner's container is still there"
    );
    assert_eq!(runner.sweep().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_jobs() {
    let Some(t) = target().await else { return };
    let jobs: Vec<Job> = (0..20)
        .map(|i| job(vec![Step::run(format!("echo job-{i}"))]))
        .collect();
    let runs = futures::future::join_all(jobs.iter().map(|j| run_job(&t, j))).await;
    let mut seen = HashMap::new();
    for (i, r) in runs.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.stdout_text(), format!("job-{i}\n"));
        assert_eq!(containers_of(&r.id), 0);
        seen.insert(r.id, ());
    }
    assert_eq!(seen.len(), 20);
}

fn container_ids(filter: &str) -> Vec<String> {
    container_ids_where(&[filter])
}

fn container_ids_where(filters: &[&str]) -> Vec<String> {
    let mut args = vec!["ps", "-aq", "--no-trunc"];
    for f in filters {
        args.extend(["--filter", f]);
    }
    let out = Command::new("docker").args(&args).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_starts_jobs_in_prestarted_containers() {
    let Some(runner) = runner_with(|c| {
        c.name = "docker-warm-test".into();
        c.warm_pool = Some(rustci_runners_docker::WarmPool::new([IMAGE], 2));
    })
    .await
    else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(60), runner.warm_up())
        .await
        .expect("pool filled");
    assert_eq!(runner.warm_ready(IMAGE), 2);
    // The two warm ones run; a start that failed under load may still be being removed.
    let warm_before = container_ids_where(&[
        "label=rustci.runner.name=docker-warm-test",
        "status=running",
    ]);
    assert_eq!(warm_before.len(), 2);
    let runner = std::sync::Arc::new(runner);
    let t = Target::shared(runner.clone());
    let r = run_job(&t, &job(vec![Step::run("hostname; echo $RUSTCI_JOB_ID")]))
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    let text = r.stdout_text();
    let mut lines = text.lines();
    let host = lines.next().unwrap();
    assert!(
        warm_before.iter().any(|id| id.starts_with(host)),
        "{host} is not a warm container: {warm_before:?}"
    );
    assert_eq!(lines.next().unwrap(), r.id.as_str());
    // A job with its own limits gets a fresh container.
    let mut limited = job(vec![Step::run("hostname")]);
    limited.resources.pids = Some(50);
    let r = run_job(&t, &limited).await.unwrap();
    let host = r.stdout_text().trim().to_string();
    assert!(!warm_before.iter().any(|id| id.starts_with(&host)));
    drop(t);
    runner.shutdown().await;
    assert_eq!(
        container_ids("label=rustci.runner.name=docker-warm-test"),
        Vec::<String>::new(),
        "shutdown left containers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_warm_containers_are_reaped() {
    let Some(runner) = runner_with(|c| {
        c.name = "docker-reap-test".into();
        let mut pool = rustci_runners_docker::WarmPool::new([IMAGE], 1);
        pool.idle_timeout = Duration::from_secs(3);
        c.warm_pool = Some(pool);
    })
    .await
    else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(60), runner.warm_up())
        .await
        .expect("pool filled");
    // Wait (bounded) for the reaper to remove the idle container.
    let reaped = tokio::time::timeout(Duration::from_secs(30), async {
        while !container_ids("label=rustci.runner.name=docker-reap-test").is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(reaped.is_ok(), "the idle warm container was not reaped");
    assert_eq!(runner.warm_ready(IMAGE), 0);
    runner.shutdown().await;
}

/// A second engine reachable only over TLS (the environment of
/// `scripts/runners/setup-dind-environment.sh`, started here on its own port, directory and
/// bridge), driven through `Engine::Tls`: workspaces are volumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_engine_over_tls() {
    if image().is_none() {
        return;
    }
    let root = nix_is_root();
    if !root || Command::new("dockerd").arg("--version").output().is_err() {
        if require() {
            panic!(
                "RUSTCI_REQUIRE_DOCKER is set but a second engine cannot be started here (needs root and dockerd)"
            );
        }
        eprintln!("SKIPPED: a second engine needs root and dockerd");
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let script = repo.join("scripts/runners/setup-dind-environment.sh");
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let env = [
        (
            "RUSTCI_DIND_DIR",
            dir.path().join("dind").display().to_string(),
        ),
        ("RUSTCI_DIND_PORT", port.to_string()),
        ("RUSTCI_DIND_BRIDGE", format!("rci{}", port)),
        ("RUSTCI_DIND_SUBNET", format!("172.31.{}", 10 + port % 240)),
    ];
    let script_run = |verb: &str| {
        let out = Command::new(&script)
            .arg(verb)
            .envs(env.clone())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    struct Cleanup<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Cleanup<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let _cleanup = Cleanup(|| {
        let _ = Command::new(&script)
            .arg("cleanup")
            .envs(env.clone())
            .output();
    });
    let (ok, text) = script_run("start");
    assert!(ok, "{text}");
    let certs = dir.path().join("dind/certs");
    let host = format!("tcp://127.0.0.1:{port}");
    let built = Command::new(repo.join("scripts/build-test-image"))
        .env("DOCKER_HOST", &host)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &certs)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );

    let runner = runner_with(|c| {
        c.name = "docker-tls-test".into();
        c.engine = Engine::Tls {
            address: host.clone(),
            ca: certs.join("ca.pem"),
            cert: certs.join("cert.pem"),
            key: certs.join("key.pem"),
        };
    })
    .await
    .expect("TLS engine");
    let runner = std::sync::Arc::new(runner);
    let t = Target::shared(runner.clone());
    let r = run_job(
        &t,
        &job(vec![
            Step::run("echo remote > f; uname -s"),
            Step::run("cat f; pwd"),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), "Linux\nremote\n/workspace\n");
    assert_eq!(runner.health().await, rustci_runners::Health::Healthy);

    // The engine goes away: health says so, and a job is a clear error, not a hang.
    let (ok, text) = script_run("stop");
    assert!(ok, "{text}");
    let health = runner.health().await;
    assert!(
        matches!(&health, rustci_runners::Health::Unhealthy(r) if r.contains("docker engine unavailable")),
        "{health:?}"
    );
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        runner.start(&job(vec![Step::run("true")]), JobId::new()),
    )
    .await
    .expect("start hung with the engine down")
    .unwrap_err();
    assert!(
        err.to_string().contains("docker engine unavailable"),
        "{err}"
    );
    let (ok, text) = script_run("start");
    assert!(ok, "{text}");
    // Without the client certificate the engine refuses the connection.
    let mut c = config();
    c.engine = Engine::Tls {
        address: host.clone(),
        ca: certs.join("ca.pem"),
        cert: certs.join("server-cert.pem"),
        key: certs.join("server-key.pem"),
    };
    assert!(
        DockerRunner::connect(c).await.is_err(),
        "a server certificate was accepted as a client's"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Effective capabilities of a step's process, as `/proc/self/status` gives them.
async fn effective_caps(runner: DockerRunner) -> u64 {
    let t = Target::new(runner);
    let r = run_job(&t, &job(vec![Step::run("grep CapEff /proc/self/status")]))
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(r.outcome, Outcome::Succeeded, "{}", r.stderr_text());
    let text = r.stdout_text();
    let hex = text
        .trim()
        .rsplit(|c: char| c.is_whitespace())
        .next()
        .unwrap();
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// Needs an engine that may hand out every capability (this project's CI machines run
/// in a sandbox that refuses `--privileged`); the decision itself is unit-tested in
/// `src/container.rs`. Run with `--run-ignored all` where `docker run --privileged` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an engine that can run privileged containers"]
async fn privileged_containers_only_for_allowed_images() {
    let Some(plain) = runner_with(|c| c.name = "docker-tests-plain".into()).await else {
        return;
    };

    let allowed = runner_with(|c| {
        c.name = "docker-tests-privileged".into();
        c.privileged = true;
        c.allowed_privileged_images = vec![IMAGE.into()];
    })
    .await
    .unwrap();
    let others_only = runner_with(|c| {
        c.name = "docker-tests-others".into();
        c.privileged = true;
        c.allowed_privileged_images = vec!["registry.example/other:1".into()];
    })
    .await
    .unwrap();
    let unprivileged = effective_caps(plain).await;
    let privileged = effective_caps(allowed).await;
    // A privileged container has every capability; the engine's default set is a subset.
    assert_ne!(privileged, unprivileged);
    assert_eq!(privileged & unprivileged, unprivileged);
    // An image that is not on the list runs without the privileges.
    assert_eq!(effective_caps(others_only).await, unprivileged);
}
