//! Job latency of `true` through KubernetesRunner against the fake cluster, vs the fake
//! kubelet running the same container directly (create, attach, start, wait, remove on the
//! same engine, no API), in the same run. Also counts the API requests each job costs
//! (the shared watch excluded) and writes the figure next to criterion's results.
//! Needs the engine and the image `rustci-busybox:local` (`scripts/build-test-image`).

use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use rustci::k8s::{Connection, KubernetesConfig, KubernetesRunner};
use rustci::{Job, Outcome, RunnerExt, Step};
use rustci_k8s_fake::{FakeCluster, FakeConfig, run_container_direct};

const IMAGE: &str = "rustci-busybox:local";

fn k8s_latency(c: &mut Criterion) {
    let have = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output();
    if !have.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: image {IMAGE} is missing; run scripts/build-test-image first");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = FakeConfig {
        namespaces: vec!["bench".into()],
        network_mode: "none".into(),
        ..FakeConfig::default()
    };
    let cluster = rt.block_on(FakeCluster::start(fake)).unwrap();
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    cluster
        .write_kubeconfig(kubeconfig.path(), "bench")
        .unwrap();
    let mut config = KubernetesConfig::default();
    config.name = "bench".into();
    config.connection = Connection::Kubeconfig {
        path: Some(kubeconfig.path().to_path_buf()),
        context: None,
    };
    config.default_image = Some(IMAGE.into());
    let runner = rt.block_on(KubernetesRunner::connect(config)).unwrap();
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    let job = Job::new("true", vec![Step::command(["true"])]);

    // API requests per job, for one step and for 50 steps with a secret.
    let mut counts = Vec::new();
    for (steps, secret) in [(1, false), (50, true)] {
        let mut j = Job::new(
            "count",
            (0..steps).map(|_| Step::command(["true"])).collect(),
        );
        if secret {
            j = j.with_secret("TOKEN", "abcdefgh");
        }
        cluster.reset_requests();
        assert_eq!(
            rt.block_on(runner.run_to_completion(&j)).unwrap(),
            Outcome::Succeeded
        );
        let n = cluster
            .requests()
            .iter()
            .filter(|r| {
                !r.query.contains("watch=true")
                    && !r.query.contains("watch=1")
                    && !r.query.contains("labelSelector=rustci.managed")
            })
            .count();
        counts.push(format!(
            "{steps} step(s){}: {n}",
            if secret { " with a secret" } else { "" }
        ));
    }
    let dir = std::path::Path::new(&std::env::var("CARGO_TARGET_DIR").unwrap_or("target".into()))
        .join("criterion");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("k8s_requests_per_job"), counts.join("\n") + "\n");
    eprintln!("API requests per job: {}", counts.join("; "));

    let mut group = c.benchmark_group("k8s_latency");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("fake_kubelet/direct", |b| {
        b.to_async(&rt).iter(|| async {
            let code = run_container_direct(&docker, IMAGE, vec!["true".into()], "none")
                .await
                .unwrap();
            assert_eq!(code, 0);
        })
    });
    group.bench_function("runner/true", |b| {
        b.to_async(&rt).iter(|| async {
            assert_eq!(
                runner.run_to_completion(&job).await.unwrap(),
                Outcome::Succeeded
            );
        })
    });
    group.finish();
    drop(runner);
    rt.block_on(cluster.shutdown());
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, k8s_latency);

fn main() {
    run_window::record("kubernetes", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
