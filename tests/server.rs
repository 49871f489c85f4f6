//! End-to-end tests of the control-plane server: the real server on a loopback port,
//! real runners, real HTTP.

mod common;

use std::path::{Path, PathBuf};

use rustci::client::{ApiClient, ApiResponse, SseEvent};
use rustci::server::{ApiKeyConfig, Role, RunnerConfig, Server, ServerConfig};
use serde_json::{Value, json};

const ADMIN: &str = "admin-key-0123456789abcdef";

fn key_for(role: Role) -> String {
    format!("{}-key-0123456789abcdef", role.as_str())
}

struct TestServer {
    server: Option<Server>,
    dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(tweak: impl FnOnce(&mut ServerConfig, &Path)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().join("data");
        config.admin_key = Some(ADMIN.into());
        for role in [Role::Operator, Role::Submitter, Role::Viewer] {
            config.api_keys.push(api_key(role));
        }
        config.health_interval_secs = 1;
        config.shutdown_grace_secs = 5;
        config.runners = vec![runner("local-a", "local", Some(4), dir.path())];
        tweak(&mut config, dir.path());
        let server = Server::start(config).await.expect("server starts");
        TestServer {
            server: Some(server),
            dir,
        }
    }

    fn client(&self, key: Option<&str>) -> ApiClient {
        ApiClient::of(self.server.as_ref().unwrap(), key.map(str::to_string)).unwrap()
    }

    fn admin(&self) -> ApiClient {
        self.client(Some(ADMIN))
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

fn api_key(role: Role) -> ApiKeyConfig {
    serde_json::from_value(json!({"name": role.as_str(), "key": key_for(role), "role": role}))
        .unwrap()
}

fn runner(name: &str, kind: &str, slots: Option<usize>, root: &Path) -> RunnerConfig {
    let mut r = RunnerConfig::new(name, kind);
    r.slots = slots;
    let ws = root.join(format!("ws-{name}"));
    std::fs::create_dir_all(&ws).unwrap();
    r.workspace_root = Some(ws);
    r
}

async fn submit(client: &ApiClient, job: Value) -> String {
    let r = client.post_json("/api/jobs", &job).await.unwrap();
    assert_eq!(r.status, 201, "submit: {}", r.error_message());
    assert_eq!(r.json()["state"], "queued");
    r.json()["id"].as_str().unwrap().to_string()
}

/// Follows a job's log to its end; returns the text and the `end` event's data.
async fn follow_to_end(client: &ApiClient, id: &str) -> (String, Value) {
    let mut events = client
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    assert_eq!(events.status, 200);
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        match ev.event.as_str() {
            "log" => text.push_str(data["text"].as_str().unwrap()),
            "end" => return (text, data),
            other => panic!("unexpected event {other}: {}", ev.data),
        }
    }
    panic!("the stream ended without an end event; got {text:?}");
}

fn error_code(r: &ApiResponse) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn sh_job(name: &str, script: &str) -> Value {
    json!({"name": name, "steps": [{"run": script}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_and_its_log_and_record_are_served() {
    let t = TestServer::start(|_, _| {}).await;
    let c = t.admin();
    let yaml =
        "name: hello\nsecrets:\n  TOKEN: s3cr3t-value\nsteps:\n  - run: echo \"hello $TOKEN\"\n";
    let r = c
        .request(
            "POST",
            "/api/jobs",
            Some(("application/yaml", yaml.as_bytes().to_vec())),
            &[("x-request-id", "test-req-1")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.error_message());
    assert_eq!(r.headers["x-request-id"], "test-req-1");
    let id = r.json()["id"].as_str().unwrap().to_string();

    let (text, end) = follow_to_end(&c, &id).await;
    assert_eq!(text, "hello ***\n");
    assert_eq!(end["state"], "succeeded");

    let job = c.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(job["runner_id"], "local-a");
    assert_eq!(job["job"]["secrets"]["TOKEN"], "***", "secrets are masked");
    let states: Vec<&str> = job["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "assigned", "running", "succeeded"]);

    let logs = c.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
    assert_eq!(&logs.body[..], b"hello ***\n");
    assert_eq!(logs.headers["x-next-offset"], "10");
    let tail = c
        .get(&format!("/api/jobs/{id}/logs?offset=6"))
        .await
        .unwrap();
    assert_eq!(&tail.body[..], b"***\n");

    let list = c.get("/api/jobs?state=succeeded").await.unwrap().json();
    assert_eq!(list["jobs"][0]["id"], id.as_str());
    let audit = c.get("/api/audit").await.unwrap().json();
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "job.submit" && e["request_id"] == "test-req-1"),
        "{audit}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_listing_pages_and_filters() {
    let t = TestServer::start(|_, _| {}).await;
    let c = t.admin();
    let sub = t.client(Some(&key_for(Role::Submitter)));
    let mut ids = Vec::new();
    for i in 0..5 {
        let client = if i % 2 == 0 { &c } else { &sub };
        let id = submit(client, sh_job(&format!("j{i}"), "true")).await;
        follow_to_end(&c, &id).await;
        ids.push(id);
    }
    let first = c.get("/api/jobs?limit=2").await.unwrap().json();
    let page: Vec<&str> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[4].as_str(), ids[3].as_str()]);
    let cursor = first["next_cursor"].as_u64().unwrap();
    let second = c
        .get(&format!("/api/jobs?limit=2&cursor={cursor}"))
        .await
        .unwrap()
        .json();
    assert_eq!(second["jobs"][0]["id"], ids[2].as_str());
    let mine = c
        .get("/api/jobs?submitter=key:submitter")
        .await
        .unwrap()
        .json();
    assert_eq!(mine["jobs"].as_array().unwrap().len(), 2);
    assert!(mine["next_cursor"].is_null());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_gets_the_envelope_and_changes_nothing() {
    let t = TestServer::start(|c, _| {
        c.max_body_bytes = 4096;
        c.rate_limit_per_second = 0.001;
        c.rate_limit_burst = 40.0;
    })
    .await;
    let c = t.admin();
    let viewer = t.client(Some(&key_for(Role::Viewer)));
    let count = |v: Value| v["jobs"].as_array().unwrap().len();
    let before = count(c.get("/api/jobs").await.unwrap().json());

    // 400: malformed JSON, a wrong field, malformed YAML.
    let r = c
        .request(
            "POST",
            "/api/jobs",
            Some(("application/json", b"{\"name\": ".to_vec())),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "INVALID_REQUEST")
    );
    let r = c
        .post_json(
            "/api/jobs",
            &json!({"name": "x", "steps": [{"run": "true", "timeout": "-1s"}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["details"]["problems"][0]["field"],
        "steps[0].timeout",
        "{}",
        r.json()
    );
    let r = c
        .request(
            "POST",
            "/api/jobs",
            Some(("application/yaml", b"name: [unclosed\nsteps: 3\n".to_vec())),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "INVALID_REQUEST")
    );
    let r = c.get("/api/jobs?state=sideways").await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "INVALID_REQUEST")
    );
    assert!(r.error_message().contains("state"));

    // 404: unknown ids and path tricks.
    for path in [
        "/api/jobs/0123456789abcdef",
        "/api/jobs/..%2F..%2Fetc%2Fpasswd",
        "/api/jobs/..%2Frustci.db/logs",
        "/api/jobs/%2e%2e/logs?follow=true",
    ] {
        let r = c.get(path).await.unwrap();
        assert_eq!(
            (r.status, error_code(&r).as_str()),
            (404, "JOB_NOT_FOUND"),
            "{path}"
        );
    }
    let r = c.get("/api/runners/nope").await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "RUNNER_NOT_FOUND")
    );
    let r = c
        .request("POST", "/api/runners/nope/drain", None, &[])
        .await
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "RUNNER_NOT_FOUND")
    );
    let r = c.get("/api/nothing-here").await.unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (404, "NOT_FOUND"));

    // 401 and 403.
    let r = t.client(None).get("/api/jobs").await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "AUTHENTICATION_REQUIRED")
    );
    let r = t
        .client(Some("wrong-key-0123456789"))
        .get("/api/jobs")
        .await
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "AUTHENTICATION_REQUIRED")
    );
    let r = viewer
        .post_json("/api/jobs", &sh_job("v", "true"))
        .await
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (403, "AUTHORIZATION_FAILED")
    );

    // 413, with and without a declared length.
    let big = sh_job("big", &"x".repeat(10_000));
    let r = c.post_json("/api/jobs", &big).await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (413, "PAYLOAD_TOO_LARGE")
    );

    // 409: cancelling a finished job.
    let id = submit(&c, sh_job("done", "true")).await;
    follow_to_end(&c, &id).await;
    let r = c
        .request("POST", &format!("/api/jobs/{id}/cancel"), None, &[])
        .await
        .unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (409, "JOB_FINISHED"));

    // Nothing above created or changed a job but the one submitted on purpose.
    assert_eq!(count(c.get("/api/jobs").await.unwrap().json()), before + 1);
    let job = c.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    assert_eq!(job["state"], "succeeded");

    // 429: the viewer's bucket (40) runs dry; the admin's is separate.
    let mut limited = None;
    for _ in 0..60 {
        let r = viewer.get("/api/runners").await.unwrap();
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200);
    }
    let r = limited.expect("the rate limit is reached");
    assert_eq!(error_code(&r), "RATE_LIMIT_EXCEEDED");
    assert!(r.headers.contains_key("retry-after"));

    // 500: a damaged record in the store is reported, not hidden.
    let db = t.dir.path().join("data/rustci.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE jobs SET record = 'not json' WHERE id = ?1", [&id])
        .unwrap();
    let r = c.get("/api/jobs").await.unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (500, "INTERNAL_ERROR"));

    let audit = c.get("/api/audit?limit=1000").await.unwrap().json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // Two failed authentications from one address within a minute: the first is
    // recorded, the second counted for the window's summary.
    assert_eq!(actions.iter().filter(|a| **a == "auth.failed").count(), 1);
    assert!(actions.contains(&"auth.denied"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_restricted_and_failed_authentications_do_not_flood_the_audit_log() {
    // Loopback is not in the allowed network.
    let t = TestServer::start(|c, _| {
        c.metrics_allow = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    let r = t.admin().get("/metrics").await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (403, "AUTHORIZATION_FAILED")
    );
    assert!(
        r.error_message().contains("metrics_allow"),
        "{}",
        r.error_message()
    );
    t.stop().await;

    let t = TestServer::start(|c, _| {
        c.metrics_allow = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        c.metrics_key_required = true;
    })
    .await;
    let r = t.client(None).get("/metrics").await.unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "AUTHENTICATION_REQUIRED")
    );
    let r = t
        .client(Some("not-a-key-0123456789"))
        .get("/metrics")
        .await
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "AUTHENTICATION_REQUIRED")
    );
    let r = t
        .client(Some(&key_for(Role::Viewer)))
        .get("/metrics")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("rustci_jobs_queued"));

    // 90 more failed authentications from this address (under the address's burst of
    // 100): each answered 401, and still one audit entry in the minute, the first
    // failure's (the request for metrics without a key).
    let bad = t.client(Some("wrong-key-0123456789abcdef"));
    for _ in 0..90 {
        let r = bad.get("/api/jobs").await.unwrap();
        assert_eq!(r.status, 401);
    }
    let audit = t.admin().get("/api/audit?limit=1000").await.unwrap().json();
    let failed: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "auth.failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["actor"], "anonymous@127.0.0.1");
    assert_eq!(failed[0]["target"], "GET /metrics");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_route_class() {
    let t = TestServer::start(|_, _| {}).await;
    let admin = t.admin();
    // A submitter's job (for job routes) and a registration token (for the runner role).
    let id = submit(
        &t.client(Some(&key_for(Role::Submitter))),
        sh_job("r", "true"),
    )
    .await;
    follow_to_end(&admin, &id).await;
    let token = admin
        .post_json("/api/tokens", &json!({"ttl_seconds": 600}))
        .await
        .unwrap();
    assert_eq!(token.status, 201, "{}", token.error_message());
    let token = token.json()["token"].as_str().unwrap().to_string();

    // (method, path, body, roles allowed)
    let job = sh_job("r2", "true");
    let routes: Vec<(&str, String, Option<Value>, &[&str])> = vec![
        (
            "GET",
            "/api/jobs".into(),
            None,
            &["admin", "operator", "submitter", "viewer"],
        ),
        (
            "GET",
            format!("/api/jobs/{id}"),
            None,
            &["admin", "operator", "submitter", "viewer"],
        ),
        (
            "GET",
            format!("/api/jobs/{id}/logs"),
            None,
            &["admin", "operator", "submitter", "viewer"],
        ),
        (
            "GET",
            "/api/runners".into(),
            None,
            &["admin", "operator", "submitter", "viewer"],
        ),
        (
            "GET",
            "/api/runners/local-a".into(),
            None,
            &["admin", "operator", "submitter", "viewer"],
        ),
        (
            "GET",
            "/api/runners/local-a/status".into(),
            None,
            &["admin", "operator", "submitter", "viewer"],
        ),
        (
            "POST",
            "/api/jobs".into(),
            Some(job),
            &["admin", "operator", "submitter"],
        ),
        (
            "POST",
            format!("/api/jobs/{id}/cancel"),
            None,
            &["admin", "operator", "submitter"],
        ),
        (
            "POST",
            "/api/runners/local-a/health".into(),
            None,
            &["admin", "operator"],
        ),
        (
            "POST",
            "/api/runners/local-a/drain".into(),
            None,
            &["admin", "operator"],
        ),
        (
            "POST",
            "/api/runners/local-a/resume".into(),
            None,
            &["admin", "operator"],
        ),
        (
            "DELETE",
            "/api/runners/not-there".into(),
            None,
            &["admin", "operator"],
        ),
        ("POST", "/api/tokens".into(), Some(json!({})), &["admin"]),
        ("GET", "/api/audit".into(), None, &["admin"]),
        (
            "POST",
            "/api/runners".into(),
            // A name the check refuses: the role may register, the body is wrong (400).
            Some(json!({"name": "", "kind": "local"})),
            &["admin", "runner"],
        ),
    ];
    let callers: Vec<(&str, String)> = vec![
        ("admin", ADMIN.to_string()),
        ("operator", key_for(Role::Operator)),
        ("submitter", key_for(Role::Submitter)),
        ("viewer", key_for(Role::Viewer)),
        ("runner", token),
    ];
    for (method, path, body, allowed) in &routes {
        for (role, key) in &callers {
            let c = t.client(Some(key));
            let body = body
                .as_ref()
                .map(|b| ("application/json", b.to_string().into_bytes()));
            let r = c.request(method, path, body, &[]).await.unwrap();
            if allowed.contains(role) {
                assert!(
                    r.status != 401 && r.status != 403,
                    "{role} {method} {path}: {} {}",
                    r.status,
                    r.error_message()
                );
            } else {
                assert_eq!(
                    r.status,
                    403,
                    "{role} {method} {path}: {}",
                    r.error_message()
                );
                assert_eq!(error_code(&r), "AUTHORIZATION_FAILED");
            }
        }
    }
    // A submitter cannot cancel someone else's job.
    let other = submit(&admin, sh_job("long", "sleep 30")).await;
    let r = t
        .client(Some(&key_for(Role::Submitter)))
        .request("POST", &format!("/api/jobs/{other}/cancel"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = admin
        .request("POST", &format!("/api/jobs/{other}/cancel"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let (_, end) = follow_to_end(&admin, &other).await;
    assert_eq!(end["state"], "cancelled");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_tokens_register_runners_and_expire() {
    let t = TestServer::start(|_, _| {}).await;
    let admin = t.admin();
    let r = admin
        .post_json(
            "/api/tokens",
            &json!({"ttl_seconds": 600, "labels": ["pool-a"]}),
        )
        .await
        .unwrap();
    let token = r.json()["token"].as_str().unwrap().to_string();
    let first_id = r.json()["id"].as_str().unwrap().to_string();
    let as_runner = t.client(Some(&token));
    let ws = t.dir.path().join("ws-reg");
    std::fs::create_dir_all(&ws).unwrap();
    // A token may not pick a path on the server.
    let r = as_runner
        .post_json(
            "/api/runners",
            &json!({"name": "reg-0", "kind": "native", "workspace_root": ws}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.error_message());
    // Nor an engine, certificate paths or privileges through a kind's section (refused
    // before the section is checked, so the message says nothing of the server's files),
    // nor a kind whose defaults reach the server's own cluster credentials.
    for body in [
        json!({"name": "reg-d", "kind": "docker", "docker": {"privileged": true}}),
        json!({"name": "reg-t", "kind": "docker", "docker": {"engine": {"tls": {
            "address": "tcp://127.0.0.1:1", "ca": "/etc/hostname", "cert": "/nonexistent", "key": "/nonexistent"}}}}),
        json!({"name": "reg-k", "kind": "kubernetes"}),
    ] {
        let r = as_runner.post_json("/api/runners", &body).await.unwrap();
        assert_eq!(r.status, 403, "{body}: {}", r.error_message());
        assert_eq!(error_code(&r), "AUTHORIZATION_FAILED", "{body}");
        assert!(
            !r.error_message().contains("/nonexistent"),
            "{}",
            r.error_message()
        );
    }
    // The token may not read or drain.
    let r = as_runner.get("/api/runners").await.unwrap();
    assert_eq!(r.status, 403);
    let r = as_runner
        .post_json(
            "/api/runners",
            &json!({"name": "reg-1", "kind": "native", "labels": ["fast"], "slots": 2}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.error_message());
    let registered = r.json();
    let rid = registered["id"].as_str().unwrap().to_string();
    let labels: Vec<&str> = registered["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        labels.contains(&"fast") && labels.contains(&"pool-a"),
        "{labels:?}"
    );
    // A token registers one runner.
    let r = as_runner
        .post_json("/api/runners", &json!({"name": "reg-2", "kind": "native"}))
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.error_message());
    assert!(
        r.error_message().contains("already used") && r.error_message().contains(&rid),
        "{}",
        r.error_message()
    );
    // A revoked token registers nothing; the listing says what became of each.
    let second = admin
        .post_json("/api/tokens", &json!({"ttl_seconds": 600}))
        .await
        .unwrap()
        .json();
    let r = admin
        .request(
            "DELETE",
            &format!("/api/tokens/{}", second["id"].as_str().unwrap()),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
    let r = t
        .client(second["token"].as_str())
        .post_json("/api/runners", &json!({"name": "reg-3", "kind": "native"}))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        r.error_message().contains("revoked"),
        "{}",
        r.error_message()
    );
    let listed = admin.get("/api/tokens").await.unwrap().json();
    let state_of = |id: &str| {
        listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .map(|e| (e["state"].clone(), e["by"].clone()))
            .unwrap()
    };
    assert_eq!(
        state_of(&first_id),
        (json!("used"), json!(format!("runner {rid}")))
    );
    assert_eq!(
        state_of(second["id"].as_str().unwrap()),
        (json!("revoked"), json!("key:admin"))
    );
    let r = admin
        .request("DELETE", "/api/tokens/no-such-token", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(error_code(&r), "TOKEN_NOT_FOUND");
    let audit = admin.get("/api/audit?limit=100").await.unwrap().json();
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "token.revoke" && e["target"] == second["id"]),
        "{audit}"
    );
    // A job asking for the token's label goes to the new runner.
    let id = submit(
        &admin,
        json!({"name": "on-reg", "runs_on": {"labels": ["pool-a"]}, "steps": [{"command": ["true"]}]}),
    )
    .await;
    let (_, end) = follow_to_end(&admin, &id).await;
    assert_eq!(end["state"], "succeeded");
    let job = admin.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    assert_eq!(job["runner_id"], rid.as_str());

    // Expired and forged tokens are refused.
    let secret = std::fs::read_to_string(t.dir.path().join("data/token.secret")).unwrap();
    let claims =
        json!({"jti": "old", "sub": "runner-registration", "exp": 1000, "iat": 900, "iss": "test"});
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap();
    let r = t
        .client(Some(&expired))
        .post_json("/api/runners", &json!({"name": "late", "kind": "local"}))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        r.error_message().contains("expired"),
        "{}",
        r.error_message()
    );
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"jti": "f", "sub": "runner-registration", "exp": 4_000_000_000u64, "iat": 1, "iss": "x"}),
        &jsonwebtoken::EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    let r = t
        .client(Some(&forged))
        .post_json("/api/runners", &json!({"name": "forged", "kind": "local"}))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let runners = admin.get("/api/runners").await.unwrap().json();
    assert_eq!(runners["runners"].as_array().unwrap().len(), 2);

    // Registrations survive a restart with the same id.
    let TestServer { server, dir, .. } = t;
    server.unwrap().shutdown().await;
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.path().join("data");
    config.admin_key = Some(ADMIN.into());
    config.runners = vec![runner("local-a", "local", Some(4), dir.path())];
    let again = Server::start(config).await.unwrap();
    let c = ApiClient::of(&again, Some(ADMIN.into())).unwrap();
    let r = c.get(&format!("/api/runners/{rid}")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(r.json()["name"], "reg-1");
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_resume_from_the_last_event_id() {
    let t = TestServer::start(|_, _| {}).await;
    let c = t.admin();
    let gate = t.dir.path().join("gate");
    let script = format!(
        "for i in $(seq 1 200); do echo \"line $i\"; done\nwhile [ ! -e '{}' ]; do sleep 0.02; done\necho tail-é-end",
        gate.display()
    );
    let id = submit(&c, sh_job("resume", &script)).await;
    // First follower: read until "line 200" arrives, remember the last id, hang up.
    let mut events = c
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    let mut first = String::new();
    let mut last_id = None;
    while !first.contains("line 200\n") {
        let ev: SseEvent = events.next().await.unwrap().unwrap();
        assert_eq!(ev.event, "log");
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(data["offset"].as_u64().unwrap(), first.len() as u64);
        first.push_str(data["text"].as_str().unwrap());
        last_id = ev.id;
    }
    drop(events);
    let last_id = last_id.unwrap();
    assert_eq!(last_id, first.len().to_string());
    // Resume with Last-Event-ID while the job still runs, then let it finish.
    let mut resumed = c
        .events(
            &format!("/api/jobs/{id}/logs?follow=true"),
            &[("last-event-id", &last_id)],
        )
        .await
        .unwrap();
    std::fs::write(&gate, b"").unwrap();
    let mut rest = String::new();
    loop {
        let ev = resumed.next().await.unwrap().unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        if ev.event == "end" {
            assert_eq!(data["state"], "succeeded");
            break;
        }
        rest.push_str(data["text"].as_str().unwrap());
    }
    let whole = c.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
    let whole = String::from_utf8(whole.body.to_vec()).unwrap();
    assert_eq!(
        format!("{first}{rest}"),
        whole,
        "nothing lost, nothing twice"
    );
    assert!(whole.ends_with("line 200\ntail-é-end\n"));
    // The offset query parameter resumes too, on a finished job.
    let (text, _) = {
        let mut ev = c
            .events(
                &format!("/api/jobs/{id}/logs?follow=true&offset={last_id}"),
                &[],
            )
            .await
            .unwrap();
        let mut text = String::new();
        loop {
            let e = ev.next().await.unwrap().unwrap();
            let data: Value = serde_json::from_str(&e.data).unwrap();
            if e.event == "end" {
                break (text, data);
            }
            text.push_str(data["text"].as_str().unwrap());
        }
    };
    assert_eq!(text, rest);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_followers_of_one_chatty_job_get_every_byte() {
    let t = TestServer::start(|c, _| {
        c.rate_limit_burst = 1000.0;
    })
    .await;
    let c = t.admin();
    let gate = t.dir.path().join("gate");
    // ~170 kB of numbered lines, released once every follower is connected.
    let script = format!(
        "while [ ! -e '{}' ]; do sleep 0.02; done\nseq 1 30000",
        gate.display()
    );
    let id = submit(&c, sh_job("chatty", &script)).await;
    let mut followers = Vec::new();
    for _ in 0..200 {
        followers.push(
            c.events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
                .await
                .unwrap(),
        );
    }
    // One more that never reads: it must not hold the job back.
    let _stalled = c
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    std::fs::write(&gate, b"").unwrap();
    let tasks: Vec<_> = followers
        .into_iter()
        .map(|mut f| {
            tokio::spawn(async move {
                let mut text = String::new();
                loop {
                    let ev = f.next().await.unwrap().unwrap();
                    let data: Value = serde_json::from_str(&ev.data).unwrap();
                    if ev.event == "end" {
                        return (text, data["state"].as_str().unwrap().to_string());
                    }
                    text.push_str(data["text"].as_str().unwrap());
                }
            })
        })
        .collect();
    let expected: String = (1..=30_000).map(|i| format!("{i}\n")).collect();
    for task in tasks {
        let (text, state) = task.await.unwrap();
        assert_eq!(state, "succeeded");
        assert!(
            text == expected,
            "a follower got {} of {} bytes",
            text.len(),
            expected.len()
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_runners_get_no_jobs_until_resumed() {
    let t = TestServer::start(|c, dir| {
        c.runners = vec![
            runner("local-a", "local", Some(4), dir),
            runner("local-b", "local", Some(4), dir),
        ];
    })
    .await;
    let op = t.client(Some(&key_for(Role::Operator)));
    let r = op
        .request("POST", "/api/runners/local-a/drain", None, &[])
        .await
        .unwrap();
    assert_eq!(r.json()["status"], "draining");
    let status = op.get("/api/runners/local-a/status").await.unwrap().json();
    assert_eq!(status["status"], "draining");
    for i in 0..6 {
        let id = submit(&op, sh_job(&format!("d{i}"), "true")).await;
        follow_to_end(&op, &id).await;
        let job = op.get(&format!("/api/jobs/{id}")).await.unwrap().json();
        assert_eq!(job["runner_id"], "local-b");
    }
    // Both drained: jobs wait and say why.
    op.request("POST", "/api/runners/local-b/drain", None, &[])
        .await
        .unwrap();
    let id = submit(&op, sh_job("waits", "true")).await;
    let mut events = op
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    let job = op.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    assert_eq!(job["state"], "queued");
    op.request("POST", "/api/runners/local-a/resume", None, &[])
        .await
        .unwrap();
    loop {
        let ev = events.next().await.unwrap().unwrap();
        if ev.event == "end" {
            break;
        }
    }
    let job = op.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    assert_eq!(job["runner_id"], "local-a");
    assert_eq!(job["state"], "succeeded");
    let audit = t.admin().get("/api/audit").await.unwrap().json();
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "runner.resume" && e["actor"] == "key:operator")
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_turning_unhealthy_mid_job_loses_it_and_it_is_retried_elsewhere() {
    let t = TestServer::start(|c, dir| {
        let mut a = runner("local-a", "local", Some(4), dir);
        a.labels = vec!["first".into()];
        c.runners = vec![a, runner("local-b", "local", Some(4), dir)];
    })
    .await;
    let c = t.admin();
    let gate = t.dir.path().join("gate");
    // Drain b so the job lands on a; resume b once the job runs.
    c.request("POST", "/api/runners/local-b/drain", None, &[])
        .await
        .unwrap();
    let script = format!(
        "echo started\nwhile [ ! -e '{}' ]; do sleep 0.02; done\necho finished",
        gate.display()
    );
    let id = submit(
        &c,
        json!({"name": "moves", "retry": {"max": 1, "when": ["lost"]}, "steps": [{"run": script}]}),
    )
    .await;
    let mut events = c
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    let ev = events.next().await.unwrap().unwrap();
    assert!(ev.data.contains("started"));
    c.request("POST", "/api/runners/local-b/resume", None, &[])
        .await
        .unwrap();
    // Runner a's workspace root turns into a file: its health check fails.
    let root = t.dir.path().join("ws-local-a");
    std::fs::rename(&root, t.dir.path().join("ws-local-a.moved")).unwrap();
    std::fs::write(&root, b"not a directory").unwrap();
    let mut text = String::new();
    loop {
        let ev = events.next().await.unwrap().unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        if ev.event == "end" {
            assert_eq!(data["state"], "succeeded");
            break;
        }
        text.push_str(data["text"].as_str().unwrap());
        if text.contains("attempt 2 on runner local-b") && text.ends_with("started\n") {
            std::fs::write(&gate, b"").unwrap();
        }
    }
    let job = c.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["runner_id"], "local-a");
    assert_eq!(attempts[0]["outcome"]["result"], "lost");
    assert_eq!(attempts[1]["runner_id"], "local-b");
    let status = c.get("/api/runners/local-a/status").await.unwrap().json();
    assert_eq!(status["status"], "unhealthy");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_jobs_runners_and_requests_and_pass_promtool() {
    let t = TestServer::start(|_, _| {}).await;
    let c = t.admin();
    let ok = submit(&c, sh_job("ok", "true")).await;
    let bad = submit(&c, sh_job("bad", "exit 3")).await;
    follow_to_end(&c, &ok).await;
    follow_to_end(&c, &bad).await;
    let r = t.client(None).get("/metrics").await.unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for needle in [
        "rustci_jobs_finished_total{state=\"succeeded\",runner_kind=\"local\"} 1",
        "rustci_jobs_finished_total{state=\"failed\",runner_kind=\"local\"} 1",
        "rustci_job_duration_seconds_count{runner_kind=\"local\"} 2",
        "rustci_queue_wait_seconds_count{runner_kind=\"local\"} 2",
        "rustci_selection_seconds_count",
        "rustci_jobs_queued 0",
        "rustci_jobs_running 0",
        "rustci_runner_healthy{runner=\"local-a\",name=\"local-a\",runner_kind=\"local\"} 1",
        "rustci_runner_slots{runner=\"local-a\",name=\"local-a\",runner_kind=\"local\"} 4",
        "rustci_http_requests_total{method=\"POST\",route=\"/api/jobs\",status=\"201\"} 2",
        "rustci_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    promtool_check(&text, t.dir.path());
    // OpenMetrics for clients that ask for it (as Prometheus does).
    let om = t
        .client(None)
        .request(
            "GET",
            "/metrics",
            None,
            &[("accept", "application/openmetrics-text; version=1.0.0")],
        )
        .await
        .unwrap();
    let om = String::from_utf8(om.body.to_vec()).unwrap();
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE rustci_jobs_finished counter"));
    t.stop().await;
}

fn promtool_check(text: &str, dir: &Path) {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(promtool) = promtool else {
        assert!(
            std::env::var_os("RUSTCI_REQUIRE_PROMTOOL").is_none(),
            "promtool is required (RUSTCI_REQUIRE_PROMTOOL) but not installed"
        );
        eprintln!("SKIPPED promtool check: promtool is not installed (Debian package prometheus)");
        return;
    };
    let file = dir.join("scrape.txt");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_cancels_what_outlives_the_grace_period_and_stores_it() {
    let t = TestServer::start(|c, _| c.shutdown_grace_secs = 1).await;
    let c = t.admin();
    let id = submit(&c, sh_job("forever", "echo up; exec sleep 600")).await;
    let mut events = c
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    events.next().await.unwrap().unwrap();
    let data = t.dir.path().join("data");
    let server = t.server.unwrap();
    server.shutdown().await;
    // The follower got the end.
    let mut end = None;
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        if ev.event == "end" {
            end = Some(ev);
        }
    }
    let end: Value = serde_json::from_str(&end.expect("end event").data).unwrap();
    assert_eq!(end["state"], "cancelled");
    let store = rustci::control::SqliteStore::open(data.join("rustci.db")).unwrap();
    use rustci::control::Store;
    let record = store
        .get_job(&rustci::JobId::from(id.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(record.state, rustci::control::JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_per_data_directory() {
    let t = TestServer::start(|_, _| {}).await;
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = t.dir.path().join("data");
    config.admin_key = Some(ADMIN.into());
    config.runners = vec![runner("local-x", "local", Some(1), t.dir.path())];
    let e = Server::start(config).await.unwrap_err().to_string();
    assert!(e.contains("in use by another rustci-server"), "{e}");
    // The first one is untouched.
    let id = submit(&t.admin(), sh_job("still-here", "true")).await;
    assert_eq!(follow_to_end(&t.admin(), &id).await.1["state"], "succeeded");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_https_by_default_and_clients_check_the_certificate() {
    use rustci::client::Trust;
    let t = TestServer::start(|_, _| {}).await;
    let server = t.server.as_ref().unwrap();
    let url = server.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    // Trusting the data directory's CA (what the CLI finds beside the server).
    let ca = std::fs::read_to_string(t.dir.path().join("data/pki/ca.pem")).unwrap();
    assert_eq!(server.ca_pem(), Some(ca.as_str()));
    let ok = ApiClient::with_trust(&url, Some(ADMIN.into()), Trust::CaPem(ca.clone()))
        .unwrap()
        .get("/api/jobs")
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    // Pinned by fingerprint, as printed at creation.
    let fp =
        rustci::valkyrie::pki::fingerprint(&rustci::valkyrie::pki::first_cert_der(&ca).unwrap());
    let pin = rustci::valkyrie::pki::parse_fingerprint(&fp).unwrap();
    let pinned = ApiClient::with_trust(&url, Some(ADMIN.into()), Trust::Fingerprint(pin))
        .unwrap()
        .get("/api/jobs")
        .await
        .unwrap();
    assert_eq!(pinned.status, 200);
    // `rustci ca fetch` hands the same CA to tools that take a file, checked by the pin.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = rustci::cli::remote::fetch_ca(&url, &fp, None, &mut out, &mut err).await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert_eq!(
        rustci::valkyrie::pki::first_cert_der(&String::from_utf8(out).unwrap()).unwrap(),
        rustci::valkyrie::pki::first_cert_der(&ca).unwrap()
    );

    // Another CA, a wrong pin, the system's bundle: refused, saying why.
    let other = tempfile::tempdir().unwrap();
    let (stranger, _) = rustci::valkyrie::pki::Authority::load_or_create(other.path()).unwrap();
    let refused = |trust: Trust| {
        let url = url.clone();
        async move {
            ApiClient::with_trust(&url, Some(ADMIN.into()), trust)
                .unwrap()
                .get("/api/jobs")
                .await
                .unwrap_err()
        }
    };
    for e in [
        refused(Trust::CaPem(stranger.ca_pem().to_string())).await,
        refused(Trust::System).await,
    ] {
        assert!(e.contains("certificate") && e.contains("--ca"), "{e}");
    }
    let wrong = rustci::valkyrie::pki::parse_fingerprint(&stranger.fingerprint()).unwrap();
    let e = refused(Trust::Fingerprint(wrong)).await;
    assert!(e.contains("pinned fingerprint"), "{e}");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code =
        rustci::cli::remote::fetch_ca(&url, &stranger.fingerprint(), None, &mut out, &mut err)
            .await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = format!("http://{}", server.addr());
    assert!(
        ApiClient::new(&plain, Some(ADMIN.into()))
            .unwrap()
            .get("/api/jobs")
            .await
            .is_err()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_loopback_and_a_brought_certificate() {
    use rustci::client::Trust;
    // Plain HTTP when asked for, on loopback.
    let t = TestServer::start(|c, _| c.plain_http = true).await;
    let server = t.server.as_ref().unwrap();
    assert!(server.url().starts_with("http://127.0.0.1:"));
    assert!(server.ca_pem().is_none(), "no CA is needed for plain HTTP");
    assert_eq!(t.admin().get("/api/jobs").await.unwrap().status, 200);
    // The CLI over plain HTTP reads no CA: neither a missing system bundle nor an
    // unreadable data-directory CA (a directory in its place) stops it.
    let data = t.dir.path().join("cli-data");
    std::fs::create_dir_all(data.join("pki/ca.pem")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rustci"))
        .args([
            "jobs",
            "list",
            "--server",
            &server.url(),
            "--api-key",
            ADMIN,
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("SSL_CERT_FILE", t.dir.path().join("no-such-bundle.crt"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("the CLI answers within a minute")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("STATE"));
    t.stop().await;

    // The user's own certificate and key, from the user's own CA.
    let theirs = tempfile::tempdir().unwrap();
    let (ca, _) = rustci::valkyrie::pki::Authority::load_or_create(theirs.path()).unwrap();
    ca.server_identity(&["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (
        theirs.path().join("server.pem"),
        theirs.path().join("server.key"),
    );
    let t = TestServer::start(|c, _| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let server = t.server.as_ref().unwrap();
    assert!(server.ca_pem().is_none(), "no CA was generated");
    assert!(!t.dir.path().join("data/pki").exists());
    let r = ApiClient::with_trust(
        &server.url(),
        Some(ADMIN.into()),
        Trust::CaPem(ca.ca_pem().to_string()),
    )
    .unwrap()
    .get("/api/jobs")
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    t.stop().await;

    // A key that does not belong to the certificate stops the start with the cause.
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.path().join("data");
    config.admin_key = Some(ADMIN.into());
    config.default_runners = false;
    config.tls_cert = Some(cert);
    config.tls_key = Some(theirs.path().join("ca.key"));
    let e = Server::start(config).await.unwrap_err().to_string();
    assert!(e.contains("do not go together"), "{e}");
}

#[test]
fn the_server_refuses_plain_http_on_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustci-server"))
        .args(["--plain-http", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("RUSTCI_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain_http") && err.contains("non-loopback"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_aggregates_count_jobs_as_they_end_and_first_write() {
    let t = TestServer::start(|_, _| {}).await;
    let admin = t.admin();
    let quiet = submit(&admin, sh_job("quiet", "true")).await;
    let loud = submit(&admin, sh_job("loud", "echo hello; exit 3")).await;
    for id in [&quiet, &loud] {
        follow_to_end(&admin, id).await;
    }
    let app = t.server.as_ref().unwrap().app().clone();
    // Counted as each job ends, just after its record and log are final.
    let snapshot = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let s = app.metrics.timeline();
            if s.finished_since(std::time::Duration::from_secs(3600)) >= 2 {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both jobs counted");
    let minutes = snapshot.last(60);
    let finished: u64 = minutes.iter().map(|m| m.finished_total()).sum();
    let failed: u64 = minutes
        .iter()
        .flat_map(|m| m.finished.iter())
        .filter(|(s, _)| *s == "failed")
        .map(|(_, n)| n)
        .sum();
    let pickups: u64 = minutes.iter().map(|m| m.pickup.count()).sum();
    let durations: u64 = minutes.iter().map(|m| m.duration.count()).sum();
    assert_eq!(finished, 2);
    assert_eq!(failed, 1);
    assert_eq!(durations, 2);
    assert_eq!(pickups, 1, "only the job that wrote output has a pickup");
    assert_eq!(
        snapshot.finished_since(std::time::Duration::from_secs(3600)),
        2
    );
    t.stop().await;
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_workspace_disk_fills_up_takes_no_new_jobs_until_it_recovers() {
    if !rustci_runners::testkit::requires_root("mounting a small tmpfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &disk,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .expect("mount a tmpfs");
    let _mounted = Tmpfs(disk.clone());
    let t = TestServer::start(|c, _| {
        let mut r = RunnerConfig::new("small", "local");
        r.workspace_root = Some(disk.join("ws"));
        r.options
            .insert("local".into(), json!({"disk_full_percent": 90}));
        c.runners = vec![r];
    })
    .await;
    let c = t.admin();
    let runner = |c: ApiClient| async move {
        let list = c.get("/api/runners").await.unwrap().json();
        list["runners"][0].clone()
    };
    let until = |want: &'static str| {
        let c = t.admin();
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    let r = runner(c.clone()).await;
                    // After a health check (which measures the pressure).
                    if r["status"] == want && !r["pressure"].is_null() {
                        return r;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the runner never became {want}"))
        }
    };
    let r = until("healthy").await;
    let p = &r["pressure"];
    assert!(p["disk_total_bytes"].as_u64().unwrap() >= 4 << 20, "{r}");
    assert!(p["memory_available_bytes"].as_u64().is_some(), "{r}");
    assert!(p["load_1m"].as_f64().is_some(), "{r}");

    // 3.8 MiB of 4: past 90 %.
    let filler = disk.join("filler");
    std::fs::write(&filler, vec![7u8; 3_800_000]).unwrap();
    let r = until("degraded").await;
    let health = r["health"].as_str().unwrap();
    assert!(health.starts_with("full: workspace disk 9"), "{health}");
    assert!(health.contains("% full"), "{health}");
    let id = submit(&c, sh_job("waits", "echo ran")).await;
    // Once a dispatch round has looked at it, it waits saying why.
    let job = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let job = c.get(&format!("/api/jobs/{id}")).await.unwrap().json();
            let why = job["why_pending"].as_str().unwrap_or_default();
            if why.contains("workspace disk") {
                return job;
            }
            assert_eq!(job["state"], "queued", "{job}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job waits for the full runner, saying why");
    assert_eq!(job["state"], "queued", "{job}");

    // Room again: it recovers at its next health check and the job runs.
    std::fs::remove_file(&filler).unwrap();
    until("healthy").await;
    let (text, end) = follow_to_end(&c, &id).await;
    assert_eq!(text, "ran\n");
    assert_eq!(end["state"], "succeeded");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_compresses_then_expires_the_oldest_log_and_a_restart_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = |max_bytes: u64| {
        let mut c = ServerConfig::default();
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.data_dir = dir.path().join("data");
        c.admin_key = Some(ADMIN.into());
        c.runners = vec![runner("local-a", "local", Some(2), dir.path())];
        c.retention.interval_secs = 1;
        c.retention.compress_after_secs = Some(0);
        // Each log below is about 60 kB of hex text from 20,000 random bytes: at least
        // 20 kB compressed (random bytes do not compress), and about 24 kB in practice.
        // Two fit in 60 kB, three do not.
        c.retention.log_max_bytes = Some(max_bytes);
        c
    };
    let server = Server::start(config(60_000)).await.unwrap();
    let c = ApiClient::of(&server, Some(ADMIN.into())).unwrap();
    let mut jobs = Vec::new();
    for i in 0..3 {
        let out = dir.path().join(format!("out{i}"));
        let script = format!(
            "head -c 20000 /dev/urandom | od -An -tx1 | tee '{}'",
            out.display()
        );
        let id = submit(&c, sh_job(&format!("noisy{i}"), &script)).await;
        let (_, end) = follow_to_end(&c, &id).await;
        assert_eq!(end["state"], "succeeded");
        jobs.push((id, std::fs::read_to_string(&out).unwrap()));
    }
    let log_state = |id: String| {
        let c = c.clone();
        async move {
            let job = c.get(&format!("/api/jobs/{id}")).await.unwrap().json();
            job["log"]["state"].as_str().map(str::to_string)
        }
    };
    let oldest = jobs[0].0.clone();
    let r = common::wait_for("the oldest log expires", 30, async || {
        let r = c.get(&format!("/api/jobs/{oldest}/logs")).await.unwrap();
        (r.status == 410).then_some(r)
    })
    .await;
    assert_eq!(error_code(&r), "LOG_EXPIRED", "{}", r.error_message());
    assert!(
        r.error_message().contains("retention"),
        "{}",
        r.error_message()
    );
    let r = c
        .get(&format!("/api/jobs/{oldest}/logs?follow=true"))
        .await
        .unwrap();
    assert_eq!(r.status, 410, "followers get the same answer");
    for (id, _) in &jobs[1..] {
        let id = id.clone();
        let mut last = None;
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                last = log_state(id.clone()).await;
                if last.as_deref() == Some("compressed") {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the log of {id} is not compressed but {last:?}"));
    }
    // Read back through both routes exactly as written.
    for (id, want) in &jobs[1..] {
        let r = c.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(String::from_utf8_lossy(&r.body), *want);
        let r = c
            .get(&format!("/api/jobs/{id}/logs?offset=1000"))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.body), want[1000..]);
        let (text, end) = follow_to_end(&c, id).await;
        assert_eq!(text, *want);
        assert_eq!(end["state"], "succeeded");
        let job = c.get(&format!("/api/jobs/{id}")).await.unwrap().json();
        assert_eq!(job["log"]["bytes"], want.len());
        assert!(job["log"]["stored_bytes"].as_u64().unwrap() < want.len() as u64);
    }
    let job = c.get(&format!("/api/jobs/{oldest}")).await.unwrap().json();
    assert_eq!(job["log"]["state"], "expired");
    assert_eq!(job["state"], "succeeded", "the record stays");
    let metrics = String::from_utf8(c.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in the metrics"))
            .to_string()
    };
    assert!(line("rustci_retention_deleted_total{what=\"logs\"} ").ends_with(" 1"));
    let stored: u64 = line("rustci_log_stored_bytes{state=\"compressed\"} ")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((40_000..=60_000).contains(&stored), "{stored}");
    assert!(
        line("rustci_log_pruned_bytes_total ")
            .rsplit(' ')
            .next()
            .unwrap()
            != "0"
    );
    // The dashboard's job pages say so too.
    let anon = ApiClient::of(&server, None).unwrap();
    let form = format!("key={ADMIN}").into_bytes();
    let r = anon
        .request(
            "POST",
            "/login",
            Some(("application/x-www-form-urlencoded", form)),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 303);
    let cookie = r.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = |id: String| {
        let (anon, cookie) = (anon.clone(), cookie.clone());
        async move {
            let r = anon
                .request("GET", &format!("/jobs/{id}"), None, &[("cookie", &cookie)])
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            String::from_utf8(r.body.to_vec()).unwrap()
        }
    };
    let html = page(oldest.clone()).await;
    assert!(html.contains("deleted by the retention policy"), "{html}");
    assert!(!html.contains("id=\"log\""), "no log shown");
    let html = page(jobs[2].0.clone()).await;
    assert!(html.contains("stored compressed"), "{html}");
    assert!(html.contains(&jobs[2].1[..200]), "the log's text is shown");
    server.shutdown().await;

    // A restart (with room for everything) keeps the expired log expired and the rest
    // readable.
    let server = Server::start(config(10_000_000)).await.unwrap();
    let c = ApiClient::of(&server, Some(ADMIN.into())).unwrap();
    let r = c.get(&format!("/api/jobs/{oldest}/logs")).await.unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (410, "LOG_EXPIRED"));
    let (id, want) = &jobs[2];
    let r = c.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.body), *want);
    server.shutdown().await;
}
