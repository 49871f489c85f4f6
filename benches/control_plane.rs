//! The control plane against same-run baselines:
//!
//! - `selection/engine_10k/*` — one `SelectionEngine` decision among 10,000 runners with
//!   varied kinds, labels, reserved labels, health and load, over a `RunnerPool` (built
//!   once per dispatch round, as the control plane does), vs `raw/command_true`
//!   (`std::process::Command::new("/bin/true").status()`). Target: at most 5 %.
//!   `scan_10k` (no label index) and `pool_build_10k` are reported for reference.
//! - `dispatch/library_2000` — 2,000 `/bin/true` jobs submitted to a `ControlPlane` with
//!   one NativeRunner of 4 slots, all awaited, vs `raw/spawn_2000_x4` (the same 2,000
//!   processes spawned and awaited by 4 threads). Target: at least 0.5x the raw rate.
//! - `dispatch/http_2000` — the same jobs submitted over HTTP to an in-process
//!   `rustci-server` (16 requests in flight). Target: at least 0.5x the raw rate.
//! - `pickup/control_plane` — submit to first output byte of `echo x` on an idle runner,
//!   vs `raw/spawn_first_byte` (spawn `echo x` with a piped stdout and read the first
//!   byte). Target: at most 3x.
//!
//! `scripts/bench-ratios` turns the results into the ratios in BENCHMARKS.md.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use rustci::control::{ControlOptions, ControlPlane, JobState, RegisterOptions};
use rustci::select::{SelectionEngine, Selector};
use rustci::{
    Capabilities, Health, Isolation, Job, NativeConfig, NativeRunner, RunnerInfo, RunnerKind,
    RunnerPool, RunnerSnapshot, Step,
};

const JOBS: usize = 2000;
const SLOTS: usize = 4;

/// 10,000 runners: 4 kinds, 3 to 6 labels each out of 64, one in 20 reserved, one in 25
/// unhealthy, loads from idle to full. Deterministic.
fn runners() -> Vec<RunnerSnapshot> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let kinds = [
        (RunnerKind::Native, Isolation::Process),
        (RunnerKind::Local, Isolation::Process),
        (RunnerKind::Docker, Isolation::Container),
        (RunnerKind::Kubernetes, Isolation::Pod),
    ];
    (0..10_000)
        .map(|i| {
            let (kind, isolation) = kinds[(next() % 4) as usize];
            let labels: Vec<String> = (0..3 + next() % 4)
                .map(|_| format!("label-{}", next() % 64))
                .collect();
            let info = RunnerInfo::new(format!("runner-{i}"), kind).with_labels(labels);
            let mut caps = Capabilities::host(isolation);
            caps.command_steps = true;
            caps.images = isolation != Isolation::Process;
            let slots = 2 + (next() % 15) as usize;
            caps.max_concurrency = Some(slots);
            let health = if next() % 25 == 0 {
                Health::Unhealthy("down".into())
            } else {
                Health::Healthy
            };
            let running = (next() % (slots as u64 + 1)) as usize;
            let mut snap = RunnerSnapshot::new(info, caps, health, running);
            if next() % 20 == 0 {
                snap.reserved_labels
                    .insert(format!("label-{}", next() % 64));
            }
            snap.startup = Some(Duration::from_micros(500 + next() % 5000));
            snap.last_assigned = Some(next() % 100_000);
            snap
        })
        .collect()
}

fn raw_true() {
    let status = Command::new("/bin/true").status().unwrap();
    assert!(status.success());
}

fn selection(c: &mut Criterion) {
    let snapshots = runners();
    let engine = SelectionEngine::default();
    let mut job = Job::new("build", vec![Step::command(["/bin/true"])]);
    job.runs_on.labels = vec!["label-3".into(), "label-17".into()];
    let any = Job::new("any", vec![Step::command(["/bin/true"])]);
    let pool = RunnerPool::new(snapshots.clone());
    assert_eq!(
        engine.select_in(&job, &pool),
        engine.select(&job, &snapshots)
    );
    let mut group = c.benchmark_group("selection");
    group.bench_function("raw/command_true", |b| b.iter(raw_true));
    // What the dispatcher does per decision: the pool is built once per round.
    group.bench_function("engine_10k/two_labels", |b| {
        b.iter(|| engine.select_in(&job, &pool).unwrap())
    });
    group.bench_function("engine_10k/any_runner", |b| {
        b.iter(|| engine.select_in(&any, &pool).unwrap())
    });
    // For reference: a decision without the label index, and building the index.
    group.bench_function("scan_10k/two_labels", |b| {
        b.iter(|| engine.select(&job, &snapshots).unwrap())
    });
    group.bench_function("pool_build_10k", |b| {
        b.iter(|| RunnerPool::new(snapshots.clone()))
    });
    // A whole dispatch round's selection work for one job: the round's pool built from
    // the registry's snapshots (cloned, as the registry hands them out), then one decision.
    group.bench_function("round_10k/pool_build_and_two_labels", |b| {
        b.iter(|| {
            let pool = RunnerPool::new(snapshots.clone());
            engine.select_in(&job, &pool).unwrap()
        })
    });
    group.finish();
}

fn raw_spawn_concurrent(total: usize, threads: usize) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let n = total / threads + usize::from(t < total % threads);
            std::thread::spawn(move || (0..n).for_each(|_| raw_true()))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn native(slots: usize) -> NativeRunner {
    let mut config = NativeConfig::default();
    config.host.name = "bench-native".into();
    config.host.max_concurrency = Some(slots);
    NativeRunner::new(config).unwrap()
}

/// An in-memory control plane with one NativeRunner of `SLOTS` slots.
fn plane_with_native() -> ControlPlane {
    let plane =
        ControlPlane::with_options(SelectionEngine::default(), ControlOptions::default()).unwrap();
    plane.register(Arc::new(native(SLOTS)), RegisterOptions::default());
    plane
}

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = Job::new("true", vec![Step::command(["/bin/true"])]);
    let plane = rt.block_on(async { plane_with_native() });
    let dir = tempfile::tempdir().unwrap();
    let server = rt.block_on(async {
        let mut config = rustci::server::ServerConfig::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().join("data");
        config.admin_key = Some("bench-admin-key-0123456789".into());
        config.rate_limit_per_second = 1e9;
        config.rate_limit_burst = 1e9;
        // Plain HTTP on loopback, as these figures were first measured; HTTPS adds one
        // handshake per connection and the record layer.
        config.plain_http = true;
        let mut r = rustci::server::RunnerConfig::new("bench-native", "native");
        r.slots = Some(SLOTS);
        config.runners = vec![r];
        rustci::server::Server::start(config).await.unwrap()
    });
    let client = rustci::client::ApiClient::new(
        &format!("http://{}", server.addr()),
        Some("bench-admin-key-0123456789".into()),
    )
    .unwrap();
    let body = serde_json::json!({"name": "true", "steps": [{"command": ["/bin/true"]}]});

    let mut group = c.benchmark_group("dispatch");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(JOBS as u64));
    group.bench_function("raw/spawn_2000_x4", |b| {
        b.iter(|| raw_spawn_concurrent(JOBS, SLOTS))
    });
    group.bench_function("library_2000", |b| {
        b.to_async(&rt).iter(|| async {
            let ids: Vec<_> = (0..JOBS)
                .map(|_| plane.submit(job.clone(), "bench").unwrap())
                .collect();
            for id in ids {
                assert_eq!(plane.wait(&id).await.unwrap().state, JobState::Succeeded);
            }
        })
    });
    let app = server.app().clone();
    group.bench_function("http_2000", |b| {
        b.to_async(&rt).iter(|| async {
            let ids: Vec<String> = futures::stream::iter(0..JOBS)
                .map(|_| {
                    let client = client.clone();
                    let body = body.clone();
                    async move {
                        let r = client.post_json("/api/jobs", &body).await.unwrap();
                        assert_eq!(r.status, 201);
                        r.json()["id"].as_str().unwrap().to_string()
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            for id in ids {
                let record = app.plane.wait(&rustci::JobId::from(id)).await.unwrap();
                assert_eq!(record.state, JobState::Succeeded);
            }
        })
    });
    group.finish();
    rt.block_on(async {
        plane.shutdown();
        server.shutdown().await;
    });
}

fn pickup(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plane = rt.block_on(async { plane_with_native() });
    let job = Job::new("echo", vec![Step::command(["/bin/echo", "x"])]);
    let mut group = c.benchmark_group("pickup");
    group.bench_function("raw/spawn_first_byte", |b| {
        b.iter(|| {
            let mut child = Command::new("/bin/echo")
                .arg("x")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut byte = [0u8; 1];
            child
                .stdout
                .as_mut()
                .unwrap()
                .read_exact(&mut byte)
                .unwrap();
            assert_eq!(byte[0], b'x');
            child.wait().unwrap();
        })
    });
    group.bench_function("control_plane", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let plane = plane.clone();
            let job = job.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let id = plane.submit(job.clone(), "bench").unwrap();
                    let mut follower = plane.follow_log(&id, 0).unwrap();
                    let chunk = follower.next().await.unwrap().unwrap();
                    total += started.elapsed();
                    assert_eq!(chunk.data[0], b'x');
                    plane.wait(&id).await.unwrap();
                }
                total
            }
        })
    });
    group.finish();
    plane.shutdown();
}

use futures::StreamExt;

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, selection, dispatch, pickup);

fn main() {
    run_window::record("control_plane", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
