//! `rustci agent` as its own process against the server's agent listener: registration
//! with a token and the CA fingerprint, mutual TLS, a job through the HTTP API run on the
//! agent, the agent in `/api/agents`, its details on its runners in the API, the CLI and
//! the metrics, a drain on SIGTERM, a token that registers only once, a revoked token,
//! and revocation through the runners route.

mod common;

use std::process::Stdio;
use std::time::Duration;

use rustci::client::ApiClient;
use rustci::server::{Server, ServerConfig};
use serde_json::{Value, json};

const ADMIN: &str = "admin-key-0123456789abcdef";
const OPERATOR: &str = "operator-key-0123456789abcdef";

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

/// [`common::wait_for`] with this file's bound.
async fn wait_for<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    common::wait_for(what, 30, f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_registers_runs_jobs_over_mtls_drains_and_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.agent_listen = Some("127.0.0.1:0".parse().unwrap());
    config.data_dir = dir.path().join("data");
    config.admin_key = Some(ADMIN.into());
    config.api_keys = vec![
        serde_json::from_value(json!({"name": "op", "key": OPERATOR, "role": "operator"})).unwrap(),
    ];
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
    // The runner carries its agent's host, address, version, status and heartbeat.
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let details = wait_for("the agent's heartbeat is recorded", async || {
        let v = admin
            .get(&format!("/api/runners/{runner_id}"))
            .await
            .ok()?
            .json();
        v["agent"]["last_heartbeat_ms"]
            .as_u64()
            .map(|_| v["agent"].clone())
    })
    .await;
    assert_eq!(details["id"], agents["id"], "{details}");
    assert_eq!(details["hostname"], host.as_str(), "{details}");
    assert_eq!(details["status"], "healthy", "{details}");
    assert_eq!(details["version"], env!("CARGO_PKG_VERSION"), "{details}");
    assert_eq!(details["withdrawn"], 0, "{details}");
    // The token's ledger entry names the agent it registered.
    let tokens = admin.get("/api/tokens").await.unwrap().json();
    let used = &tokens["tokens"].as_array().unwrap()[0];
    assert_eq!(used["state"], "used", "{tokens}");
    assert_eq!(
        used["by"],
        format!("agent agent-one ({})", agents["id"].as_str().unwrap()),
        "{tokens}"
    );
    assert!(
        details["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{details}"
    );
    // The CLI's runner list shows the agent's host and status.
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let listed = tokio::process::Command::new(env!("CARGO_BIN_EXE_rustci"))
        .args(["runners", "list", "--server", &server.url(), "--ca"])
        .arg(&ca_file)
        .env("RUSTCI_API_KEY", ADMIN)
        .output()
        .await
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let text = String::from_utf8_lossy(&listed.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with(&runner_id))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(&format!("{host} healthy")) && line.contains("s ago"),
        "{line}"
    );
    // The metrics count agents by status and carry each one's last heartbeat.
    let metrics = String::from_utf8_lossy(&admin.get("/metrics").await.unwrap().body).to_string();
    assert!(
        metrics.contains("rustci_agents{status=\"healthy\"} 1"),
        "{metrics}"
    );
    let heartbeat = metrics
        .lines()
        .find(|l| l.starts_with("rustci_agent_last_heartbeat_timestamp_seconds{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        heartbeat.contains(&format!("hostname=\"{host}\""))
            && heartbeat.contains("status=\"healthy\""),
        "{heartbeat}"
    );
    let at: f64 = heartbeat.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(at > 1.0e9, "{heartbeat}");

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
    // A revoked token registers no agent.
    let revoked = admin
        .post_json("/api/tokens", &json!({"ttl_seconds": 600}))
        .await
        .unwrap()
        .json();
    let r = admin
        .request(
            "DELETE",
            &format!("/api/tokens/{}", revoked["id"].as_str().unwrap()),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let third = agent_cmd(
        &agent_addr,
        &dir.path().join("agent3"),
        revoked["token"].as_str().unwrap(),
        &fp,
        "agent-three",
    )
    .output()
    .await
    .unwrap();
    assert_eq!(third.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(stderr.contains("revoked"), "{stderr}");
    assert_eq!(
        admin.get("/api/agents").await.unwrap().json()["agents"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "neither refused agent was registered"
    );

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

    // Revocation through the runners route: an operator may not (it revokes the agent),
    // an admin may. The agent is gone from the API and its runner from the registry; a
    // restart with its stored identity is refused.
    let agent_id = agents["id"].as_str().unwrap().to_string();
    let operator = ApiClient::of(&server, Some(OPERATOR.into())).unwrap();
    let r = operator
        .request("DELETE", &format!("/api/runners/{runner_id}"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.error_message());
    assert!(
        r.error_message().contains(&agent_id),
        "{}",
        r.error_message()
    );
    assert_eq!(
        admin
            .get(&format!("/api/agents/{agent_id}"))
            .await
            .unwrap()
            .status,
        200,
        "the refused request changed nothing"
    );
    let r = admin
        .request("DELETE", &format!("/api/runners/{runner_id}"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(r.json()["revoked_agent"], agent_id.as_str());
    let r = admin
        .request("DELETE", &format!("/api/agents/{agent_id}"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404, "revoked agents are gone");
    assert_eq!(r.json()["error"]["code"], "AGENT_NOT_FOUND");
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
