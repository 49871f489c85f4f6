//! The dashboard's pages against the JSON API calls that carry the same data, in the
//! same run, on a server holding 100,000 finished jobs (written to the store directly,
//! as a server that ran them would have left them):
//!
//! - `dashboard/jobs_page` (`GET /jobs`, 50 jobs as HTML) vs `dashboard/jobs_api`
//!   (`GET /api/jobs?limit=50`). Target: at most 2x.
//! - `dashboard/job_page` (`GET /jobs/{id}`: the job, its attempts, states, spec and
//!   log) vs `dashboard/job_api` (`GET /api/jobs/{id}`: the job with its attempts, states
//!   and spec; the log is a second call, `dashboard/job_api_and_log`). Target: at most 2x
//!   the job's call.
//! - `dashboard/overview_page` (`GET /`): counts, runners by status and three charts
//!   from per-minute aggregates; no job is read. Reported, no target.
//!
//! Plain HTTP on loopback, one connection reused. `scripts/bench-ratios dashboard` turns
//! the results into the ratios in BENCHMARKS.md.

use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group};
use rustci::client::ApiClient;
use rustci::control::JobRecord;
use rustci::server::{Server, ServerConfig};
use serde_json::json;

const JOBS: usize = 100_000;
const KEY: &str = "dashboard-bench-admin-key-0123";

fn finished_record(i: usize) -> JobRecord {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    serde_json::from_value(json!({
        "id": format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
        "job": {"name": format!("job-{}", i % 500), "steps": [{"run": "make test"}],
                "secrets": {"TOKEN": "hunter2"}},
        "submitter": format!("key:team-{}", i % 20),
        "state": if i.is_multiple_of(10) { "failed" } else { "succeeded" },
        "attempts": [{
            "number": 1,
            "runner_id": format!("runner-{}", i % 100),
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

fn dashboard(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (server, api, page, live) = rt.block_on(async {
        let mut config = ServerConfig::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().join("data");
        config.admin_key = Some(KEY.into());
        config.rate_limit_per_second = 1e9;
        config.rate_limit_burst = 1e9;
        config.plain_http = true;
        let server = Server::start(config).await.unwrap();
        let base = format!("http://{}", server.addr());
        let store = server.app().plane.store().clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..JOBS {
                store.put_job(&finished_record(i)).unwrap();
            }
        })
        .await
        .unwrap();
        let api = ApiClient::new(&base, Some(KEY.into())).unwrap();
        // One real job with a log, for the job page.
        let r = api
            .post_json(
                "/api/jobs",
                &json!({"name": "with-log", "steps": [{"run": "seq 1 2000"}]}),
            )
            .await
            .unwrap();
        let live = r.json()["id"].as_str().unwrap().to_string();
        server
            .app()
            .plane
            .wait(&rustci::JobId::from(live.clone()))
            .await
            .unwrap();
        let anon = ApiClient::new(&base, None).unwrap();
        let login = anon
            .request(
                "POST",
                "/login",
                Some((
                    "application/x-www-form-urlencoded",
                    format!("key={KEY}").into_bytes(),
                )),
                &[],
            )
            .await
            .unwrap();
        let cookie = login.headers["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        (server, api, (anon, cookie), live)
    });
    let (anon, cookie) = page;
    let get_page = |path: String| {
        let (anon, cookie) = (&anon, cookie.clone());
        async move {
            let r = anon
                .request("GET", &path, None, &[("cookie", &cookie)])
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{path}");
            r.body.len()
        }
    };
    let get_api = |path: String| {
        let api = &api;
        async move {
            let r = api.get(&path).await.unwrap();
            assert_eq!(r.status, 200, "{path}");
            r.body.len()
        }
    };
    // Both carry the same 50 jobs.
    rt.block_on(async {
        let html = anon
            .request("GET", "/jobs", None, &[("cookie", &cookie)])
            .await
            .unwrap();
        let rows = String::from_utf8_lossy(&html.body).matches("<tr>").count();
        assert_eq!(rows, 51, "a header and 50 jobs");
        let json = api.get("/api/jobs?limit=50").await.unwrap();
        assert_eq!(json.json()["jobs"].as_array().unwrap().len(), 50);
    });

    let mut g = c.benchmark_group("dashboard");
    g.bench_function("jobs_page", |b| {
        b.to_async(&rt).iter(|| get_page("/jobs".into()))
    });
    g.bench_function("jobs_api", |b| {
        b.to_async(&rt)
            .iter(|| get_api("/api/jobs?limit=50".into()))
    });
    g.bench_function("job_page", |b| {
        b.to_async(&rt).iter(|| get_page(format!("/jobs/{live}")))
    });
    g.bench_function("job_api", |b| {
        b.to_async(&rt)
            .iter(|| get_api(format!("/api/jobs/{live}")))
    });
    g.bench_function("job_api_and_log", |b| {
        b.to_async(&rt).iter(|| async {
            get_api(format!("/api/jobs/{live}")).await
                + get_api(format!("/api/jobs/{live}/logs")).await
        })
    });
    g.bench_function("overview_page", |b| {
        b.to_async(&rt).iter(|| get_page("/".into()))
    });
    g.finish();
    rt.block_on(server.shutdown());
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, dashboard);

fn main() {
    run_window::record("dashboard", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
