//! One control plane with 10,000 agent sessions (`RUSTCI_SCALE_SESSIONS` to change it),
//! real TLS over loopback, and one real agent beside them:
//!
//! - `valkyrie_scale_pickup/with_sessions` — submit to first output byte of `echo x` on
//!   the real agent (`rustci agent`, a process of its own) while every session is connected, vs `valkyrie_scale_pickup/idle`,
//!   the same before any of them is. Target: at most 2x.
//! - Memory: the control plane's resident memory with every session connected and idle,
//!   less the same with them registered but not connected, per session. Target: under
//!   64 KiB.
//! - Heartbeats: the control plane's CPU time over 30 s with every session connected and
//!   nothing else to do, as a share of one core. At the default interval (it grows with
//!   the number of agents, to 200 s for 10,000) that is 50 heartbeats a second, plus the
//!   health checks of 10,000 runners. Target: under 10 %.
//! - Reconnect storm: every session dropped at once (the swarm process killed), started
//!   again, while a job runs on the real agent. The session-start limit holds (at most its
//!   burst plus its rate in any second), every session is back within the documented
//!   window ((N − burst) ÷ rate, plus one retry delay), and the job succeeds with one
//!   attempt.
//!
//! The sessions are lightweight clients (a hello, then heartbeats at the interval the
//! welcome gives) in a second process, this bench's binary started again with
//! `RUSTCI_SCALE_SWARM`, so that the control plane's memory and CPU are its own. Figures
//! go to `target/criterion/valkyrie_scale.json` for `scripts/bench-ratios`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use rustci::control::{ControlOptions, ControlPlane, JobState};
use rustci::select::SelectionEngine;
use rustci::valkyrie::pki::{self, Authority};
use rustci::valkyrie::proto::{
    self, agent_message, server_message, valkyrie_client::ValkyrieClient,
};
use rustci::valkyrie::{Admission, Hub, HubOptions};
use rustci::{Job, RunnerKind, Step};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn sessions() -> usize {
    std::env::var("RUSTCI_SCALE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Any token registers; session starts are timed.
struct Open {
    starts: Mutex<Vec<Instant>>,
}

impl Admission for Open {
    fn admit(&self, _: &str, _: &str) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
    fn audit(&self, _: &str, action: &str, _: Option<&str>, result: &str) {
        if action == "agent.session" && result == "ok" {
            self.starts.lock().unwrap().push(Instant::now());
        }
    }
}

fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

// --- the swarm: the second process -----------------------------------------------------

/// One simulated agent: keeps a session, reconnecting as an agent does.
async fn simulated(
    addr: String,
    ca: String,
    cert: String,
    key: String,
    live: Arc<AtomicUsize>,
    n: usize,
) {
    let mut failures = 0u32;
    loop {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .identity(Identity::from_pem(&cert, &key))
            .domain_name(pki::SERVER_NAME);
        let connected = async {
            let channel = Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| e.to_string())?
                .tls_config(tls)
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(ValkyrieClient::new(channel))
        }
        .await;
        let retry = match connected {
            Err(_) => None,
            Ok(mut client) => session(&mut client, &live, n).await,
        };
        let wait = match retry {
            Some(after) => {
                failures = 0;
                after + jitter(Duration::from_secs(1))
            }
            None => {
                failures += 1;
                jitter(Duration::from_millis(100 << failures.min(6)))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn jitter(window: Duration) -> Duration {
    let n = uuid::Uuid::new_v4().as_u128() as u64;
    Duration::from_millis(n % (window.as_millis() as u64).max(1))
}

/// Runs one session until it ends; `Some(retry_after)` when the control plane said when
/// to come back, `None` when it failed.
async fn session(
    client: &mut ValkyrieClient<tonic::transport::Channel>,
    live: &AtomicUsize,
    n: usize,
) -> Option<Duration> {
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::AgentMessage>(8);
    let hello = proto::AgentMessage {
        kind: Some(agent_message::Kind::Hello(proto::Hello {
            protocol: rustci::valkyrie::PROTOCOL_VERSION,
            agent_version: "swarm".into(),
            boot_id: uuid::Uuid::new_v4().to_string(),
            hostname: "swarm".into(),
            runners: vec![proto::LocalRunner {
                name: "sim".into(),
                kind: "local".into(),
                labels: vec!["simulated".into()],
                slots: 1,
                capabilities_json: serde_json::to_string(&rustci::Capabilities::host(
                    rustci::Isolation::Process,
                ))
                .unwrap(),
            }],
            held: Vec::new(),
            draining: false,
        })),
    };
    tx.send(hello).await.ok()?;
    let outgoing = futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|m| (m, rx)) });
    let mut incoming = client.session(outgoing).await.ok()?.into_inner();
    let interval = match incoming.message().await.ok()??.kind? {
        server_message::Kind::Welcome(w) => Duration::from_millis(w.heartbeat_interval_ms),
        server_message::Kind::Disconnect(d) => {
            return Some(Duration::from_millis(d.retry_after_ms));
        }
        _ => return None,
    };
    if live.fetch_add(1, Ordering::SeqCst) + 1 == n {
        println!("connected {n}");
        let _ = std::io::stdout().flush();
    }
    let mut seq = 0u64;
    // The first heartbeat at a random point of the interval, as agents spread out.
    let mut next = tokio::time::Instant::now() + jitter(interval);
    let ended = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                seq += 1;
                next += interval;
                let beat = proto::AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {
                        seq,
                        free: [("sim".to_string(), 1)].into_iter().collect(),
                        ..Default::default()
                    })),
                };
                if tx.send(beat).await.is_err() {
                    break None;
                }
            }
            m = incoming.message() => match m {
                Ok(Some(proto::ServerMessage { kind: Some(server_message::Kind::Disconnect(d)) })) => {
                    break Some(Duration::from_millis(d.retry_after_ms));
                }
                Ok(Some(_)) => {}
                _ => break None,
            },
        }
    };
    live.fetch_sub(1, Ordering::SeqCst);
    ended
}

fn swarm_main(addr: String, ids: String) -> ! {
    raise_open_files();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let text = std::fs::read_to_string(&ids).unwrap();
        let mut lines = text.lines();
        let ca: String = serde_json::from_str(lines.next().unwrap()).unwrap();
        let creds: Vec<(String, String)> =
            lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        let n = creds.len();
        let live = Arc::new(AtomicUsize::new(0));
        for (cert, key) in creds {
            tokio::spawn(simulated(
                addr.clone(),
                ca.clone(),
                cert,
                key,
                live.clone(),
                n,
            ));
        }
        std::future::pending::<()>().await;
    });
    unreachable!()
}

// --- the control plane: this process ---------------------------------------------------

/// The real agent's process, stopped with the bench.
struct RealAgent(std::process::Child);

impl Drop for RealAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Swarm {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Swarm {
    fn start(addr: &str, ids: &std::path::Path) -> Swarm {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("RUSTCI_SCALE_SWARM", addr)
            .env("RUSTCI_SCALE_IDS", ids)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Swarm { child, lines }
    }

    /// Waits until every session is connected; the time it took.
    fn connected(&self, n: usize, within: Duration) -> Duration {
        let started = Instant::now();
        let want = format!("connected {n}");
        loop {
            let left = within
                .checked_sub(started.elapsed())
                .expect("the swarm connected in time");
            if self
                .lines
                .recv_timeout(left)
                .expect("the swarm connected in time")
                == want
            {
                return started.elapsed();
            }
        }
    }

    fn kill(self) {
        drop(self);
    }
}

impl Drop for Swarm {
    // A panic in the bench must not leave 10,000 sessions running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn scale(c: &mut Criterion) {
    let n = sessions();
    raise_open_files();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admission = Arc::new(Open {
        starts: Mutex::new(Vec::new()),
    });
    let options = HubOptions::new(dir.path().join("valkyrie"));
    let (rate, burst) = (options.session_starts_per_second, options.session_burst);
    let (plane, hub, addr, ca, agent) = rt.block_on(async {
        let (authority, _) = Authority::load_or_create(&dir.path().join("pki")).unwrap();
        let identity = authority.server_identity(&[]).unwrap();
        let fingerprint = authority.fingerprint();
        let ca = authority.ca_pem().to_string();
        let hub = Hub::new(options, authority, admission.clone()).unwrap();
        let plane =
            ControlPlane::with_options(SelectionEngine::default(), ControlOptions::default())
                .unwrap();
        hub.attach(plane.clone());
        let listener = rustci::valkyrie::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let serving = hub.clone();
        tokio::spawn(async move { serving.serve(listener, identity).await });
        // The real agent is a process of its own, as in production: a job it spawns must
        // not inherit (and close) the control plane's 10,000 sockets.
        let agent = RealAgent(
            std::process::Command::new(env!("CARGO_BIN_EXE_rustci"))
                .args(["agent", "--server", &addr, "--token", "real"])
                .args(["--ca-fingerprint", &fingerprint])
                .args(["--runners", "native", "--slots", "4", "--labels", "real"])
                .args(["--name", "real-agent"])
                .arg("--data-dir")
                .arg(dir.path().join("agent"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("starting the real agent (rustci agent)"),
        );
        while !plane
            .registry()
            .list()
            .iter()
            .any(|e| e.info().kind == RunnerKind::Valkyrie && e.status.takes_jobs())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (plane, hub, addr, ca, agent)
    });

    // Every simulated agent registers once (setup, not measured).
    let ids = dir.path().join("swarm.ids");
    rt.block_on(async {
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca))
                    .domain_name(pki::SERVER_NAME),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut out = vec![serde_json::to_string(&ca).unwrap()];
        let mut pending = futures::stream::FuturesUnordered::new();
        use futures::StreamExt;
        for i in 0..n {
            let mut client = ValkyrieClient::new(channel.clone());
            pending.push(async move {
                let (key, csr) =
                    tokio::task::spawn_blocking(move || pki::new_key_and_csr("sim").unwrap())
                        .await
                        .unwrap();
                let r = client
                    .register(proto::RegisterRequest {
                        token: "sim".into(),
                        csr_pem: csr,
                        name: format!("sim-{i}"),
                        hostname: "swarm".into(),
                        version: "swarm".into(),
                        labels: vec!["simulated".into()],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (r.certificate_pem, key)
            });
            if pending.len() >= 64
                && let Some(c) = pending.next().await
            {
                out.push(serde_json::to_string(&c).unwrap());
            }
        }
        while let Some(c) = pending.next().await {
            out.push(serde_json::to_string(&c).unwrap());
        }
        std::fs::write(&ids, out.join("\n")).unwrap();
    });

    let echo = {
        let mut j = Job::new("echo", vec![Step::command(["/bin/echo", "x"])]);
        j.runs_on.labels = vec!["real".into()];
        j
    };
    let mut group = c.benchmark_group("valkyrie_scale_pickup");
    group.bench_function("idle", |b| {
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

    // Every session connected.
    let before = rss_bytes();
    let swarm = Swarm::start(&addr, &ids);
    let connect_took = swarm.connected(n, Duration::from_secs(600));
    // Settled: the sessions' first heartbeats are spread over the interval.
    std::thread::sleep(Duration::from_secs(5));
    let after = rss_bytes();
    let per_session = after.saturating_sub(before) as f64 / n as f64;
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let idle_cpu = (cpu_time() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();

    group.bench_function("with_sessions", |b| {
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
    group.finish();

    // The storm: every session dropped at once, a job running on the real agent.
    let job = {
        let mut j = Job::new(
            "through-the-storm",
            vec![Step::run(
                "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.25; done",
            )],
        );
        j.runs_on.labels = vec!["real".into()];
        j
    };
    let id = plane.submit(job, "bench").unwrap();
    swarm.kill();
    rt.block_on(async {
        while hub
            .agents()
            .iter()
            .filter(|a| a.status == rustci::valkyrie::AgentStatus::Healthy)
            .count()
            > 1
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let storm_from = Instant::now();
    admission.starts.lock().unwrap().clear();
    let swarm = Swarm::start(&addr, &ids);
    let storm_took = swarm.connected(n, Duration::from_secs(600));
    let starts = admission.starts.lock().unwrap().clone();
    let mut window = VecDeque::new();
    let mut max_per_second = 0;
    for t in &starts {
        window.push_back(*t);
        while window
            .front()
            .is_some_and(|f| t.duration_since(*f) > Duration::from_secs(1))
        {
            window.pop_front();
        }
        max_per_second = max_per_second.max(window.len());
    }
    let record = rt.block_on(plane.wait(&id)).unwrap();
    let job_ok = record.state == JobState::Succeeded && record.attempts.len() == 1;
    // What became of each of its attempts, for when it did not succeed at once.
    let job_attempts: Vec<serde_json::Value> = record
        .attempts
        .iter()
        .map(|a| {
            serde_json::json!({
                "runner": a.runner_id,
                "outcome": a.outcome,
                "declined": a.declined,
                "seconds": a.ended_at.and_then(|e| e.duration_since(a.started_at).ok()).map(|d| d.as_secs_f64()),
            })
        })
        .collect();
    swarm.kill();
    let documented = Duration::from_secs_f64((n as f64 - burst).max(0.0) / rate + 2.0);
    let storm_started = storm_from.elapsed();

    let figures = serde_json::json!({
        "sessions": n,
        "connect_seconds": connect_took.as_secs_f64(),
        "memory_per_session_bytes": per_session,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "idle_cpu_share": idle_cpu,
        "heartbeat_interval_seconds": rustci::valkyrie::Timings::default().heartbeat_for(n + 1).as_secs_f64(),
        "storm_seconds": storm_took.as_secs_f64(),
        "storm_documented_seconds": documented.as_secs_f64(),
        "storm_session_starts": starts.len(),
        "storm_max_starts_in_a_second": max_per_second,
        "session_start_limit": {"rate": rate, "burst": burst},
        "storm_job_succeeded_once": job_ok,
        "storm_job_attempts": job_attempts,
    });
    println!(
        "valkyrie_scale: {figures} (storm measured over {:.1} s)",
        storm_started.as_secs_f64()
    );
    let out = std::path::PathBuf::from(
        std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()),
    )
    .join("criterion");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("valkyrie_scale.json"), figures.to_string()).unwrap();
    drop(agent);
    rt.block_on(async {
        hub.shutdown();
        plane.shutdown();
    });
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(10));
    targets = scale
}

fn main() {
    if let (Ok(addr), Ok(ids)) = (
        std::env::var("RUSTCI_SCALE_SWARM"),
        std::env::var("RUSTCI_SCALE_IDS"),
    ) {
        swarm_main(addr, ids);
    }
    run_window::record("valkyrie_scale", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
