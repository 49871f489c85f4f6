//! Resident memory of a `rustci-server` (in this process) holding 10,000 registered
//! runners and 100,000 finished jobs, after serving job listings, a metrics scrape and
//! real jobs. Target: under 200 MiB.
//!
//! Runners are registered over the HTTP API (10,000 local runners, each with its own
//! labels and a row in the store). The finished jobs are written to the store directly,
//! as a server that ran them would have left them, because running 100,000 jobs would
//! take this machine most of an hour. The result is printed and written to
//! `target/criterion/server_memory.json` for `scripts/bench-ratios`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustci::client::ApiClient;
use rustci::control::JobRecord;
use rustci::server::{Server, ServerConfig};
use serde_json::json;

const RUNNERS: usize = 10_000;
const JOBS: usize = 100_000;
const KEY: &str = "memory-bench-admin-key-0123";

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn finished_record(i: usize) -> JobRecord {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    serde_json::from_value(json!({
        "id": format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
        "job": {"name": format!("job-{}", i % 500), "steps": [{"run": "make test"}]},
        "submitter": format!("key:team-{}", i % 20),
        "state": if i.is_multiple_of(10) { "failed" } else { "succeeded" },
        "attempts": [{
            "number": 1,
            "runner_id": format!("runner-{}", i % RUNNERS),
            "started_at": now - 5_000,
            "ended_at": now - 1_000,
            "outcome": if i.is_multiple_of(10) {
                json!({"result": "failed", "step": 0, "step_name": "step-1", "exit_code": 2})
            } else {
                json!({"result": "succeeded"})
            }
        }],
        "why_pending": null,
        "outcome": {"result": "succeeded"},
        "submitted_at": now - 6_000,
        "finished_at": now - 1_000
    }))
    .expect("a job record")
}

#[path = "common/run_window.rs"]
mod run_window;

fn main() {
    run_window::record("server_memory", measure);
}

fn measure() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let baseline = rss_mib();
    let (rss, took) = rt.block_on(async {
        let mut config = ServerConfig::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().join("data");
        config.admin_key = Some(KEY.into());
        config.default_runners = false;
        config.rate_limit_per_second = 1e9;
        config.rate_limit_burst = 1e9;
        // Plain HTTP on loopback, as these figures were first measured; HTTPS adds one
        // handshake per connection and the record layer.
        config.plain_http = true;
        config.health_interval_secs = 30;
        let server = Server::start(config).await.unwrap();
        let client = ApiClient::new(&format!("http://{}", server.addr()), Some(KEY.into())).unwrap();
        let started = Instant::now();
        for i in 0..RUNNERS {
            let body = json!({
                "name": format!("runner-{i}"),
                "kind": "local",
                "labels": [format!("pool-{}", i % 100), format!("zone-{}", i % 7)],
                "slots": 4,
                "workspace_root": ws,
            });
            let r = client.post_json("/api/runners", &body).await.unwrap();
            assert_eq!(r.status, 201, "{}", r.error_message());
        }
        let store = server.app().plane.store().clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..JOBS {
                store.put_job(&finished_record(i)).unwrap();
            }
        })
        .await
        .unwrap();
        // Serve what a busy server serves: listings, metrics, and real jobs.
        for page in 0..20 {
            let r = client
                .get(&format!("/api/jobs?limit=500&cursor={}", JOBS - page * 500))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
        assert_eq!(client.get("/metrics").await.unwrap().status, 200);
        assert_eq!(client.get("/api/runners").await.unwrap().status, 200);
        for _ in 0..20 {
            let r = client
                .post_json(
                    "/api/jobs",
                    &json!({"name": "live", "runs_on": {"labels": ["pool-7"]}, "steps": [{"run": "echo live"}]}),
                )
                .await
                .unwrap();
            let id = r.json()["id"].as_str().unwrap().to_string();
            let record = server.app().plane.wait(&rustci::JobId::from(id)).await.unwrap();
            assert_eq!(record.state, rustci::control::JobState::Succeeded);
        }
        let counts = server.app().plane.store().count_by_state().unwrap();
        let total: u64 = counts.values().sum();
        assert_eq!(total as usize, JOBS + 20);
        let rss = rss_mib();
        let took = started.elapsed();
        server.shutdown().await;
        (rss, took)
    });
    println!(
        "server_memory: {RUNNERS} runners, {JOBS} finished jobs: RSS {rss:.1} MiB (process before start {baseline:.1} MiB), setup took {:.1} s; target under 200 MiB: {}",
        took.as_secs_f64(),
        if rss < 200.0 { "ok" } else { "MISSED" }
    );
    let out = std::path::Path::new(
        &std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("criterion");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("server_memory.json"),
        json!({"runners": RUNNERS, "jobs": JOBS, "rss_mib": rss, "baseline_mib": baseline})
            .to_string(),
    )
    .unwrap();
}
