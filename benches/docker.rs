//! Job latency of `true` in the busybox image: DockerRunner (cold: a container per job;
//! warm: a job starting in a pre-started pool container) vs `docker run --rm` of the same
//! image on the same engine, in the same run. Needs the engine and the image
//! `rustci-busybox:local` (`scripts/build-test-image` builds it; so do the Docker tests).

use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rustci::docker::{DockerConfig, DockerRunner, PullPolicy, WarmPool};
use rustci::{Job, Outcome, RunnerExt, Step};

const IMAGE: &str = "rustci-busybox:local";

fn docker_latency(c: &mut Criterion) {
    let have = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output();
    if !have.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: image {IMAGE} is missing; run the Docker tests first");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = DockerConfig::default();
    config.name = "bench-cold".into();
    config.pull_policy = PullPolicy::Never;
    config.network_mode = "none".into();
    let cold = rt.block_on(DockerRunner::connect(config.clone())).unwrap();
    let mut warm_config = config.clone();
    warm_config.name = "bench-warm".into();
    warm_config.warm_pool = Some(WarmPool::new([IMAGE], 2));
    let warm = rt.block_on(DockerRunner::connect(warm_config)).unwrap();
    let mut job = Job::new("true", vec![Step::command(["true"])]);
    job.image = Some(IMAGE.into());

    let mut group = c.benchmark_group("docker_latency");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(15));
    group.bench_function("cli/docker_run_rm", |b| {
        b.iter(|| {
            let status = Command::new("docker")
                .args(["run", "--rm", "--network", "none", IMAGE, "true"])
                .status()
                .unwrap();
            assert!(status.success());
        })
    });
    group.bench_function("runner/cold", |b| {
        b.to_async(&rt).iter(|| async {
            assert_eq!(
                cold.run_to_completion(&job).await.unwrap(),
                Outcome::Succeeded
            );
        })
    });
    // Each measured job starts with a full pool (refilling happens between jobs, untimed):
    // this is the latency a job sees when a warm container is ready.
    group.bench_function("runner/warm", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(warm.warm_up());
                let started = std::time::Instant::now();
                let outcome = rt.block_on(warm.run_to_completion(&job)).unwrap();
                total += started.elapsed();
                assert_eq!(outcome, Outcome::Succeeded);
            }
            total
        })
    });
    group.finish();
    rt.block_on(warm.shutdown());
    rt.block_on(cold.shutdown());
}

criterion_group!(benches, docker_latency);
criterion_main!(benches);
