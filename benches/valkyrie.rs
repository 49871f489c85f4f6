//! Remote agents against the same work done in process, in the same run:
//!
//! - `valkyrie_pickup/agent` — submit to first output byte of `echo x` through a
//!   connected agent (one process, real TLS over loopback, the agent's NativeRunner), vs
//!   `valkyrie_pickup/in_process` (the same job on a control plane whose NativeRunner is
//!   in process). Target: at most 1.5x.
//! - `valkyrie_dispatch/agent_2000` — 2,000 `/bin/true` jobs through one agent with a
//!   4-slot NativeRunner, all awaited, vs `valkyrie_dispatch/in_process_2000` (the same
//!   jobs on an in-process 4-slot NativeRunner). Target: at least 0.7x the rate.
//!
//! The agent path does more work than the baseline by design: offer and accept over the
//! session, output spooled on the agent and stored by the control plane before it is
//! acknowledged, completion checked by length and SHA-256.
//!
//! `scripts/bench-ratios valkyrie` turns the results into the ratios in BENCHMARKS.md.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use rustci::control::{ControlOptions, ControlPlane, JobState, RegisterOptions};
use rustci::select::SelectionEngine;
use rustci::valkyrie::pki::Authority;
use rustci::valkyrie::{Admission, Agent, AgentOptions, CaSource, Hub, HubOptions};
use rustci::{Job, NativeConfig, NativeRunner, Runner, RunnerKind, Step};

const JOBS: usize = 2000;
const SLOTS: usize = 4;

struct Tokens(Mutex<Vec<String>>);

impl Admission for Tokens {
    fn admit(&self, token: &str, _: &str) -> Result<Vec<String>, String> {
        let mut t = self.0.lock().unwrap();
        let i = t.iter().position(|x| x == token).ok_or("unknown token")?;
        t.remove(i);
        Ok(Vec::new())
    }
    fn audit(&self, _: &str, _: &str, _: Option<&str>, _: &str) {}
}

fn native(slots: usize) -> Arc<dyn Runner> {
    let mut config = NativeConfig::default();
    config.host.name = "bench-native".into();
    config.host.max_concurrency = Some(slots);
    Arc::new(NativeRunner::new(config).unwrap())
}

fn plane() -> ControlPlane {
    ControlPlane::with_options(SelectionEngine::default(), ControlOptions::default()).unwrap()
}

/// A control plane whose only runner is a connected agent's; keep the guards alive.
struct Remote {
    plane: ControlPlane,
    hub: Hub,
    agent: Option<Agent>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A temporary directory under the directory `var` names, or the default one.
fn temp_in(var: &str) -> tempfile::TempDir {
    match std::env::var_os(var) {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

async fn remote() -> Remote {
    // The control plane's state (CA, journals, output) under RUSTCI_BENCH_STATE_DIR and
    // the agent's under RUSTCI_BENCH_AGENT_DIR when set (`/dev/shm` compares tmpfs with
    // the default temporary directory).
    let dir = temp_in("RUSTCI_BENCH_STATE_DIR");
    let (authority, _) = Authority::load_or_create(&dir.path().join("pki")).unwrap();
    let identity = authority.server_identity(&[]).unwrap();
    let fingerprint = authority.fingerprint();
    let hub = Hub::new(
        HubOptions::new(dir.path().join("valkyrie")),
        authority,
        Arc::new(Tokens(Mutex::new(vec!["t".into()]))),
    )
    .unwrap();
    let plane = plane();
    hub.attach(plane.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let serving = hub.clone();
    tokio::spawn(async move { serving.serve(listener, identity).await });
    let data = temp_in("RUSTCI_BENCH_AGENT_DIR");
    let mut options = AgentOptions::new(addr, data.path());
    options.token = Some("t".into());
    options.ca = Some(CaSource::Fingerprint(fingerprint));
    options.name = Some("bench-agent".into());
    options.runners = vec![("native".into(), native(SLOTS))];
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(true).await;
    // Until the agent's runner takes jobs.
    loop {
        let ready = plane
            .registry()
            .list()
            .iter()
            .any(|e| e.info().kind == RunnerKind::Valkyrie && e.status.takes_jobs());
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Remote {
        plane,
        hub,
        agent: Some(agent),
        _dirs: (dir, data),
    }
}

async fn pickup_once(plane: &ControlPlane, job: &Job) -> Duration {
    let started = Instant::now();
    let id = plane.submit(job.clone(), "bench").unwrap();
    let mut follower = plane.follow_log(&id, 0).unwrap();
    let chunk = follower.next().await.unwrap().unwrap();
    let took = started.elapsed();
    assert_eq!(chunk.data[0], b'x');
    assert_eq!(plane.wait(&id).await.unwrap().state, JobState::Succeeded);
    took
}

async fn dispatch_all(plane: &ControlPlane, job: &Job) {
    let ids: Vec<_> = (0..JOBS)
        .map(|_| plane.submit(job.clone(), "bench").unwrap())
        .collect();
    for id in ids {
        assert_eq!(plane.wait(&id).await.unwrap().state, JobState::Succeeded);
    }
}

fn valkyrie(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let local = rt.block_on(async {
        let p = plane();
        p.register(native(SLOTS), RegisterOptions::default());
        p
    });
    let mut remote = rt.block_on(remote());
    let echo = Job::new("echo", vec![Step::command(["/bin/echo", "x"])]);
    let truth = Job::new("true", vec![Step::command(["/bin/true"])]);

    let mut group = c.benchmark_group("valkyrie_pickup");
    for (name, plane) in [("in_process", &local), ("agent", &remote.plane)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (plane, job) = (plane.clone(), echo.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += pickup_once(&plane, &job).await;
                    }
                    total
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("valkyrie_dispatch");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(JOBS as u64));
    for (name, plane) in [("in_process_2000", &local), ("agent_2000", &remote.plane)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| dispatch_all(plane, &truth))
        });
    }
    group.finish();
    rt.block_on(async {
        if let Some(a) = remote.agent.take() {
            a.stop().await;
        }
        remote.hub.shutdown();
        remote.plane.shutdown();
        local.shutdown();
    });
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, valkyrie);

fn main() {
    run_window::record("valkyrie", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
