//! Job latency of `true`, each runner against its raw baseline in the same run:
//!
//! - `native/true` (NativeRunner, `command: [/bin/true]`) vs `raw/command_true`
//!   (`std::process::Command::new("/bin/true").status()`)
//! - `local/true` (LocalRunner, `run: true`) vs `raw/sh_c_true` (`sh -c true`)
//!
//! A job's latency is from `start` to its outcome, workspace creation and removal included.
//! `scripts/bench-ratios` turns the results into the ratios recorded in BENCHMARKS.md.

use criterion::{Criterion, criterion_group};
use rustci::{HostConfig, Job, LocalRunner, NativeConfig, NativeRunner, Outcome, RunnerExt, Step};

fn latency(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let native = NativeRunner::new(NativeConfig::default()).expect("native runner");
    let local = LocalRunner::new(HostConfig::named("local")).expect("local runner");
    let native_job = Job::new("true", vec![Step::command(["/bin/true"])]);
    let local_job = Job::new("true", vec![Step::run("true")]);

    let mut group = c.benchmark_group("job_latency");
    group.bench_function("raw/command_true", |b| {
        b.iter(|| {
            let status = std::process::Command::new("/bin/true").status().unwrap();
            assert!(status.success());
        })
    });
    group.bench_function("native/true", |b| {
        b.to_async(&rt).iter(|| async {
            let outcome = native.run_to_completion(&native_job).await.unwrap();
            assert_eq!(outcome, Outcome::Succeeded);
        })
    });
    group.bench_function("raw/sh_c_true", |b| {
        b.iter(|| {
            let status = std::process::Command::new("/bin/sh")
                .args(["-c", "true"])
                .status()
                .unwrap();
            assert!(status.success());
        })
    });
    group.bench_function("local/true", |b| {
        b.to_async(&rt).iter(|| async {
            let outcome = local.run_to_completion(&local_job).await.unwrap();
            assert_eq!(outcome, Outcome::Succeeded);
        })
    });
    group.finish();
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, latency);

fn main() {
    run_window::record("latency", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
