//! The server builds every compiled-in runner kind from its configuration through the
//! backend registry: a Docker runner with a warm pool and a Kubernetes runner against the
//! fake cluster each run a job end to end over the HTTP API; configurations that cannot
//! work are refused naming the cause.
//!
//! Without a Docker engine or the test image these tests print `SKIPPED`; with
//! `RUSTCI_REQUIRE_DOCKER` set (as `.ci/run` does) that is a failure instead.

use std::time::Duration;

use rustci::client::ApiClient;
use rustci::server::{RunnerConfig, Server, ServerConfig};
use rustci_k8s_fake::{FakeCluster, FakeConfig};
use serde_json::{Value, json};

const ADMIN: &str = "admin-key-0123456789abcdef";

async fn start(dir: &std::path::Path, runners: Vec<Value>) -> Result<Server, String> {
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.join("data");
    config.admin_key = Some(ADMIN.into());
    config.health_interval_secs = 1;
    config.shutdown_grace_secs = 5;
    config.runners = runners
        .into_iter()
        .map(|r| serde_json::from_value::<RunnerConfig>(r).unwrap())
        .collect();
    config.check().map_err(|e| e.to_string())?;
    Server::start(config).await.map_err(|e| e.to_string())
}

/// Submits `job`, follows its log to the end; returns the text and the final state.
async fn run(client: &ApiClient, job: Value) -> (String, String, Value) {
    let r = client.post_json("/api/jobs", &job).await.unwrap();
    assert_eq!(r.status, 201, "submit: {}", r.error_message());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let mut events = client
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        match ev.event.as_str() {
            "log" => text.push_str(data["text"].as_str().unwrap()),
            "end" => {
                let record = client.get(&format!("/api/jobs/{id}")).await.unwrap().json();
                return (text, data["state"].as_str().unwrap().to_string(), record);
            }
            other => panic!("unexpected event {other}"),
        }
    }
    panic!("the log ended without an end event: {text:?}");
}

/// Ids of the running warm containers of the runner named `name`, through the engine's
/// own CLI.
fn warm_containers(name: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "--filter"])
        .arg(format!("label=rustci.runner.name={name}"))
        // This process's own: another run on the same engine has its own owner token.
        .arg("--filter")
        .arg(format!(
            "label=rustci.owner={}",
            rustci_runners::owner::owner_token()
        ))
        .args(["--format", "{{.ID}} {{.Label \"rustci.job\"}}"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, job)| job.starts_with("warm-"))
        .map(|(id, _)| id.to_string())
        .collect()
}

/// Waits (bounded) until `cond` holds, checking it every 100 ms.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_docker_runner_with_a_warm_pool_runs_a_job() {
    let Some(image) = rustci_runners::testkit::busybox_image_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A fixed name: the start-up sweep of a later run removes what a crashed one left.
    let name = "server-backends-warm".to_string();
    let server = start(
        dir.path(),
        vec![json!({
            "name": name,
            "kind": "docker",
            "labels": ["containers"],
            "slots": 2,
            "docker": {
                "pull_policy": "never",
                "default_image": image,
                "network_mode": "none",
                "termination_grace": "2s",
                "warm_pool": {"images": [image], "size": 1, "idle_timeout": "10m"}
            }
        })],
    )
    .await
    .expect("the server starts with a docker runner");
    let client = ApiClient::of(&server, Some(ADMIN.into())).unwrap();
    // The pool the configuration asked for is started by the runner itself.
    eventually("a warm container", || warm_containers(&name).len() == 1).await;
    let before = warm_containers(&name);

    let runners = client.get("/api/runners").await.unwrap().json();
    let listed = runners["runners"]
        .as_array()
        .or_else(|| runners.as_array())
        .cloned()
        .unwrap_or_default();
    assert!(
        listed
            .iter()
            .any(|r| r["name"] == name.as_str() && r["kind"] == "docker"),
        "{runners}"
    );

    let (text, state, record) = run(
        &client,
        json!({"name": "in-a-container", "runs_on": {"kind": "docker", "labels": ["containers"]},
               "steps": [{"run": "echo hello from $(cat /proc/1/comm)"}]}),
    )
    .await;
    assert_eq!(state, "succeeded", "{text} {record}");
    assert_eq!(text, "hello from sh\n", "{record}");
    // The job took the warm container (it is gone), and a new one replaces it.
    eventually("the warm pool refilled", || {
        let now = warm_containers(&name);
        now.len() == 1 && now != before
    })
    .await;
    server.shutdown().await;
    // Stopping the server stops its runners: nothing of the pool is left on the engine.
    eventually("the warm pool removed", || {
        warm_containers(&name).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_kubernetes_runner_runs_a_job_on_the_fake_cluster() {
    let Some(image) = rustci_runners::testkit::busybox_image_or_skip() else {
        return;
    };
    let cluster = match FakeCluster::start(FakeConfig {
        namespaces: vec!["default".into(), "ci".into()],
        ..FakeConfig::default()
    })
    .await
    {
        Ok(c) => c,
        Err(e) if std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some() => {
            panic!("RUSTCI_REQUIRE_DOCKER is set but the fake cluster cannot start: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the fake cluster cannot start: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig, "default").unwrap();
    let server = start(
        dir.path(),
        vec![json!({
            "name": "cluster",
            "kind": "kubernetes",
            "kubernetes": {
                "connection": {"kubeconfig": {"path": kubeconfig}},
                "namespace": "ci",
                "default_image": image,
                "termination_grace": "2s",
                "pod": {"labels": {"team": "ci"}, "image_pull_policy": "never"}
            }
        })],
    )
    .await
    .expect("the server starts with a kubernetes runner");
    let client = ApiClient::of(&server, Some(ADMIN.into())).unwrap();
    let (text, state, record) = run(
        &client,
        json!({"name": "in-a-pod", "runs_on": {"kind": "kubernetes"},
               "steps": [{"run": "echo hello from $RUSTCI_RUNNER"}]}),
    )
    .await;
    assert_eq!(state, "succeeded", "{text} {record}");
    assert_eq!(text, "hello from cluster\n", "{record}");
    // The pod ran in the configured namespace with the configured labels.
    let requests = cluster.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("/namespaces/ci/pods")),
        "no pod created in namespace ci"
    );
    server.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn runner_configurations_that_cannot_work_are_refused_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            json!({"name": "a", "kind": "vm"}),
            "unknown runner kind \"vm\"",
        ),
        (
            json!({"name": "a", "kind": "native", "docker": {"privileged": true}}),
            "unknown field `docker`",
        ),
        (
            json!({"name": "a", "kind": "docker", "docker": {"engine": {"tls": {"address": "tcp://127.0.0.1:1", "ca": "/nonexistent/ca.pem", "cert": "/nonexistent/cert.pem", "key": "/nonexistent/key.pem"}}}}),
            "/nonexistent/ca.pem",
        ),
        (
            json!({"name": "a", "kind": "docker", "docker": {"warm_pool": {"images": ["busybox"], "size": 1, "idle": "1m"}}}),
            "unknown field `idle`",
        ),
        (
            json!({"name": "a", "kind": "docker", "docker": {"termination_grace": "soon"}}),
            "termination_grace",
        ),
        (
            json!({"name": "a", "kind": "kubernetes", "kubernetes": {"pod": {"requests": {"cpu": "lots"}}}}),
            "pod.requests.cpu",
        ),
        (
            json!({"name": "a", "kind": "kubernetes", "kubernetes": {"name": "other"}}),
            "unknown field `name`",
        ),
    ];
    for (runner, expected) in cases {
        let e = start(dir.path(), vec![runner.clone()])
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted {runner}"));
        assert!(
            e.contains(expected),
            "{runner}: expected {expected:?} in {e:?}"
        );
    }
}
