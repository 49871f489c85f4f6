//! Job latency of `true` in the busybox image: DockerRunner (cold: a container per job;
//! warm: a job starting in a pre-started pool container) vs `docker run --rm` of the same
//! image on the same engine, in the same run. Needs the engine and the image
//! `rustci-busybox:local` (`scripts/build-test-image` builds it; so do the Docker tests).

use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
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
    // Only when measuring (`cargo bench`), not in criterion's quick test mode.
    if std::env::args().any(|a| a == "--bench") {
        sustained_warm(&rt, &config, &job);
    }
}

/// The warm pool's cost over a sustained run: 200 jobs back to back on a fresh warm
/// runner, with no waiting for the pool between jobs, timed until the runner's shutdown
/// has finished every background removal and refill. Written to
/// `target/criterion/docker_latency/warm_sustained_200.json` as the time per job, which
/// `scripts/bench-ratios` compares with `cli/docker_run_rm` from the same run.
fn sustained_warm(rt: &tokio::runtime::Runtime, config: &DockerConfig, job: &Job) {
    const JOBS: u32 = 200;
    let mut warm_config = config.clone();
    warm_config.name = "bench-warm-sustained".into();
    warm_config.warm_pool = Some(WarmPool::new([IMAGE], 2));
    let warm = rt.block_on(DockerRunner::connect(warm_config)).unwrap();
    rt.block_on(warm.warm_up());
    let started = std::time::Instant::now();
    for _ in 0..JOBS {
        let outcome = rt.block_on(warm.run_to_completion(job)).unwrap();
        assert_eq!(outcome, Outcome::Succeeded);
    }
    rt.block_on(warm.shutdown());
    let total = started.elapsed();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target".into());
    let dir = target.join("criterion/docker_latency");
    let _ = std::fs::create_dir_all(&dir);
    let per_job = total.as_nanos() as f64 / f64::from(JOBS);
    let _ = std::fs::write(
        dir.join("warm_sustained_200.json"),
        format!(
            "{{\"jobs\": {JOBS}, \"total_ns\": {}, \"per_job_ns\": {per_job:.0}}}\n",
            total.as_nanos()
        ),
    );
    eprintln!(
        "warm pool, {JOBS} jobs sustained, removal and refill included: {:.1} ms per job",
        per_job / 1e6
    );
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, docker_latency);

fn main() {
    run_window::record("docker", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
