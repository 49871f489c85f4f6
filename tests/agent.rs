//! `rustci agent` as its own process against the server's agent listener: registration
//! with a token and the CA fingerprint, mutual TLS, a job through the HTTP API run on the
//! agent, the agent in `/api/agents`, a drain on SIGTERM, a token that registers only
//! once, and revocation.

use std::process::Stdio;
use std::time::Duration;

use rustci::client::ApiClient;
use rustci::server::{Server, ServerConfig};
use serde_json::{Value, json};

const ADMIN: &str = "admin-key-0123456789abcdef";

fn agent_cmd(
    server: &str,
    data: &std::path::Path,
    token: &str,
    fp: &str,
    name: &str,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_rustci"));
    c.args([
        "agent",
        "--server",
        server,
        "--token",
        token,
        "--ca-fingerprint",
        fp,
    ])
    .args(["--runners", "local", "--labels", "remote", "--name", name])
    .arg("--data-dir")
    .arg(data)
    .args(["--drain-timeout", "20"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    c
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_registers_runs_jobs_over_mtls_drains_and_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.agent_listen = Some("127.0.0.1:0".parse().unwrap());
    config.data_dir = dir.path().join("data");
    config.admin_key = Some(ADMIN.into());
    config.default_runners = false;
    config.health_interval_secs = 1;
    let server = Server::start(config).await.expect("server starts");
    let admin = ApiClient::of(&server, Some(ADMIN.into())).unwrap();
    let agent_addr = server.agent_addr().expect("agent listener").to_string();
    let ca = std::fs::read_to_string(dir.path().join("data/pki/ca.pem")).unwrap();
    let fp =
        rustci::valkyrie::pki::fingerprint(&rustci::valkyrie::pki::first_cert_der(&ca).unwrap());

    let token = admin
        .post_json(
            "/api/tokens",
            &json!({"ttl_seconds": 600, "labels": ["granted"]}),
        )
        .await
        .unwrap();
    assert_eq!(token.status, 201, "{}", token.error_message());
    let token = token.json()["token"].as_str().unwrap().to_string();

    let data = dir.path().join("agent");
    let mut agent = agent_cmd(&agent_addr, &data, &token, &fp, "agent-one")
        .spawn()
        .unwrap();

    // The agent and its runner appear in the API.
    let agents = wait_for("the agent is listed as healthy", async || {
        let r = admin.get("/api/agents").await.ok()?;
        let v = r.json();
        let a = v["agents"].as_array()?.first()?.clone();
        (a["status"] == "healthy" && !a["runners"].as_array()?.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(agents["name"], "agent-one");
    assert!(
        agents["labels"]
            .as_array()
            .unwrap()
            .contains(&json!("granted"))
    );
    let runner_id = agents["runners"][0].as_str().unwrap().to_string();
    let runner = wait_for("the agent's runner is healthy", async || {
        let v = admin
            .get(&format!("/api/runners/{runner_id}"))
            .await
            .ok()?
            .json();
        (v["status"] == "healthy").then_some(v)
    })
    .await;
    assert_eq!(runner["kind"], "valkyrie", "{runner}");

    // A job through the HTTP API runs on the agent.
    let job = json!({
        "name": "on-agent",
        "runs_on": {"kind": "valkyrie", "labels": ["remote", "granted"]},
        "steps": [{"run": "echo from the agent; echo to stderr >&2"}]
    });
    let r = admin.post_json("/api/jobs", &job).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.error_message());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let record: Value = wait_for("the job ends", async || {
        let v = admin.get(&format!("/api/jobs/{id}")).await.ok()?.json();
        matches!(v["state"].as_str(), Some("succeeded" | "failed" | "lost")).then_some(v)
    })
    .await;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["attempts"][0]["runner_id"], runner_id);
    let log = admin.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
    let text = String::from_utf8_lossy(&log.body).to_string();
    assert!(
        text.contains("from the agent\n") && text.contains("to stderr\n"),
        "{text:?}"
    );

    // The token registered one agent: a second agent with it is refused.
    let other = agent_cmd(
        &agent_addr,
        &dir.path().join("agent2"),
        &token,
        &fp,
        "agent-two",
    )
    .output()
    .await
    .unwrap();
    assert_eq!(other.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("already used"), "{stderr}");

    // SIGTERM drains: a running job finishes, then the agent exits 0.
    let job = json!({
        "name": "during-drain",
        "runs_on": {"kind": "valkyrie"},
        "steps": [{"run": "sleep 1; echo drained fine"}]
    });
    let id = admin.post_json("/api/jobs", &job).await.unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the job runs", async || {
        let v = admin.get(&format!("/api/jobs/{id}")).await.ok()?.json();
        (v["state"] == "running").then_some(())
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(agent.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the agent exits after draining")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let v = admin.get(&format!("/api/jobs/{id}")).await.unwrap().json();
    assert_eq!(v["state"], "succeeded", "{v}");

    // Revocation: the agent is gone from the API and its runner from the registry; a
    // restart with its stored identity is refused.
    let agent_id = agents["id"].as_str().unwrap().to_string();
    let r = admin
        .request("DELETE", &format!("/api/agents/{agent_id}"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(
        admin
            .get(&format!("/api/runners/{runner_id}"))
            .await
            .unwrap()
            .status,
        404
    );
    let mut again = agent_cmd(&agent_addr, &data, &token, &fp, "agent-one")
        .spawn()
        .unwrap();
    wait_for(
        "the revoked agent's session is refused and audited",
        async || {
            let v = admin.get("/api/audit?limit=50").await.ok()?.json();
            v["entries"]
                .as_array()?
                .iter()
                .any(|e| e["action"] == "agent.session" && e["result"] == "denied: revoked")
                .then_some(())
        },
    )
    .await;
    again.kill().await.unwrap();
    server.shutdown().await;
}
