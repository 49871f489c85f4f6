//! A bounded load run against the server binary on loopback: concurrent clients send a
//! fixed mix of submits, listings, job reads, log follows and bad requests, then stop.
//! Asserted: no 5xx, every submitted job succeeds exactly once, and the server's memory
//! comes back within a bound once the run is over. Requests per second and latency
//! percentiles are printed (`--no-capture`); no timing is asserted. BENCHMARKS.md has the
//! figures of a release build.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{ServerProc, start_server};

use rustci::client::ApiClient;
use serde_json::{Value, json};

const ADMIN: &str = "load-admin-key-0123456789";
/// Concurrent clients.
const CLIENTS: usize = 8;
/// Requests each client sends.
const REQUESTS: usize = 250;
/// How much more the server may hold after the run than before it (resident memory).
const RSS_BOUND: u64 = 96 << 20;

fn start(dir: &Path) -> ServerProc {
    start_server(dir, ADMIN, "error")
}

/// Resident memory of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    by_status: std::collections::BTreeMap<u16, usize>,
    submitted: Vec<String>,
}

/// One client's share: request `i` of client `c` is chosen by `i % 10`, so every run
/// sends the same mix: 2 submits, 3 listings, 2 job reads, 1 log follow, 2 bad requests.
async fn client(c: usize, api: ApiClient, bad: ApiClient, seed: String) -> Tally {
    let mut t = Tally::default();
    for i in 0..REQUESTS {
        let latest = t.submitted.last().cloned().unwrap_or_else(|| seed.clone());
        let started = Instant::now();
        let status = match i % 10 {
            0 | 5 => {
                let job = json!({"name": format!("load-{c}-{i}"), "steps": [{"run": "echo ok"}]});
                let r = api.post_json("/api/jobs", &job).await.unwrap();
                if r.status == 201 {
                    t.submitted
                        .push(r.json()["id"].as_str().unwrap().to_string());
                }
                r.status
            }
            1 | 4 | 7 => api.get("/api/jobs?limit=20").await.unwrap().status,
            2 | 8 => {
                api.get(&format!("/api/jobs/{latest}"))
                    .await
                    .unwrap()
                    .status
            }
            3 => {
                // Follows the seed job's finished log to its end.
                let mut ev = api
                    .events(&format!("/api/jobs/{seed}/logs?follow=true"), &[])
                    .await
                    .unwrap();
                let status = ev.status;
                while let Some(e) = ev.next().await {
                    if e.unwrap().event == "end" {
                        break;
                    }
                }
                status
            }
            6 => bad.get("/api/jobs").await.unwrap().status,
            _ => {
                let body = Some(("application/json", b"{\"name\": ".to_vec()));
                api.request("POST", "/api/jobs", body, &[])
                    .await
                    .unwrap()
                    .status
            }
        };
        t.latencies.push(started.elapsed());
        *t.by_status.entry(status).or_default() += 1;
    }
    t
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_load_run_gets_no_5xx_loses_no_job_and_gives_memory_back() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(
        dir.path().join("server.yaml"),
        format!(
            "rate_limit_per_second: 100000\nrate_limit_burst: 100000\nrunners:\n  - name: local-a\n    kind: local\n    slots: 4\n    workspace_root: {}\n",
            ws.display()
        ),
    )
    .unwrap();
    let server = start(dir.path());
    let ca = std::fs::read_to_string(dir.path().join("data/pki/ca.pem")).unwrap();
    let trust = || rustci::client::Trust::CaPem(ca.clone());
    let api = ApiClient::with_trust(&server.base, Some(ADMIN.into()), trust()).unwrap();
    let bad =
        ApiClient::with_trust(&server.base, Some("not-a-key-0123456789".into()), trust()).unwrap();
    let pid = server.child.id();

    let seed = api
        .post_json(
            "/api/jobs",
            &json!({"name": "seed", "steps": [{"run": "seq 1 2000"}]}),
        )
        .await
        .unwrap()
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(wait_terminal(&api, &seed).await["state"], "succeeded");
    let before = rss(pid);

    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, api.clone(), bad.clone(), seed.clone())))
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.latencies.extend(t.latencies);
        for (s, n) in t.by_status {
            *all.by_status.entry(s).or_default() += n;
        }
        all.submitted.extend(t.submitted);
    }
    let took = started.elapsed();
    all.latencies.sort();
    let total = all.latencies.len();
    eprintln!(
        "load: {total} requests from {CLIENTS} clients in {:.2} s: {:.0} requests/s; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; by status {:?}",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        percentile(&all.latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&all.latencies, 0.99).as_secs_f64() * 1e3,
        all.latencies.last().unwrap().as_secs_f64() * 1e3,
        all.by_status
    );
    assert_eq!(total, CLIENTS * REQUESTS);
    let server_errors: usize = all
        .by_status
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(server_errors, 0, "{:?}", all.by_status);
    // Exactly the mix: every request got the answer its kind calls for.
    let per = |k: usize| CLIENTS * REQUESTS * k / 10;
    assert_eq!(
        all.by_status.get(&201),
        Some(&per(2)),
        "{:?}",
        all.by_status
    );
    assert_eq!(
        all.by_status.get(&401),
        Some(&per(1)),
        "{:?}",
        all.by_status
    );
    assert_eq!(
        all.by_status.get(&400),
        Some(&per(1)),
        "{:?}",
        all.by_status
    );
    assert_eq!(
        all.by_status.get(&200),
        Some(&per(6)),
        "{:?}",
        all.by_status
    );

    // No job lost: each succeeded, with one attempt and its output.
    assert_eq!(all.submitted.len(), per(2));
    for id in &all.submitted {
        let job = wait_terminal(&api, id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job}");
    }
    let logs = api
        .get(&format!("/api/jobs/{}/logs", all.submitted[0]))
        .await
        .unwrap();
    assert_eq!(&logs.body[..], b"ok\n");

    let after = rss(pid);
    eprintln!(
        "load: server RSS {:.1} MiB before, {:.1} MiB after the run",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert!(
        after <= before + RSS_BOUND,
        "the server holds {} MiB more after the run",
        (after - before) >> 20
    );
}

/// The job's record once it is in a terminal state.
async fn wait_terminal(api: &ApiClient, id: &str) -> Value {
    let mut events = api
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    while let Some(e) = events.next().await {
        if e.unwrap().event == "end" {
            break;
        }
    }
    api.get(&format!("/api/jobs/{id}")).await.unwrap().json()
}
