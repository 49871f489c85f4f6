//! The server killed with SIGKILL while an agent (its own process) runs jobs, then
//! started again on the same data directory: the jobs go on on the agent, a job that
//! finished while the server was down has its completion land once, and both logs are
//! gapless and exact.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use rustci::client::ApiClient;
use serde_json::{Value, json};

const ADMIN: &str = "agent-crash-admin-key-0123456789";

struct Proc {
    child: Child,
    base: String,
    agents: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path, agent_listen: &str) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustci-server"))
        .args(["--agent-listen", agent_listen])
        .env("RUSTCI_DATA_DIR", dir.join("data"))
        .env("RUSTCI_LISTEN", "127.0.0.1:0")
        .env("RUSTCI_ADMIN_KEY", ADMIN)
        .env("RUSTCI_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut base, mut agents) = (None, None);
    while base.is_none() || agents.is_none() {
        let line = lines
            .next()
            .expect("the server printed its addresses")
            .unwrap();
        if let Some(a) = line.strip_prefix("rustci-server: listening on ") {
            base = Some(a.to_string());
        }
        if let Some(a) = line.strip_prefix("rustci-server: listening for agents on ") {
            agents = Some(a.to_string());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Proc {
        child,
        base: base.unwrap(),
        agents: agents.unwrap(),
    }
}

/// [`common::wait_for`] with this file's bound.
async fn wait_for<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    common::wait_for(what, 60, f).await
}

fn lines_job(name: &str, lines: u32, pause: &str, marker: &Path) -> Value {
    json!({
        "name": name,
        "runs_on": {"kind": "valkyrie"},
        "env": {"MARKER": marker.display().to_string()},
        "steps": [{"run": format!(
            "echo run >> \"$MARKER\"; i=1; while [ $i -le {lines} ]; do echo \"{name} line $i\"; i=$((i+1)); sleep {pause}; done; echo end >> \"$MARKER\""
        )}]
    })
}

fn expected(name: &str, lines: u32) -> String {
    (1..=lines).map(|i| format!("{name} line {i}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_mid_job_keeps_jobs_on_the_agent_and_completes_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), "127.0.0.1:0");
    let admin = admin_client(dir.path(), &server.base);
    let agent_addr = server.agents.clone();
    let ca = std::fs::read_to_string(dir.path().join("data/pki/ca.pem")).unwrap();
    let fp =
        rustci::valkyrie::pki::fingerprint(&rustci::valkyrie::pki::first_cert_der(&ca).unwrap());
    let token = admin
        .post_json("/api/tokens", &json!({"ttl_seconds": 600}))
        .await
        .unwrap()
        .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_rustci"))
        .args([
            "agent",
            "--server",
            &agent_addr,
            "--token",
            &token,
            "--ca-fingerprint",
            &fp,
        ])
        .args(["--runners", "local", "--name", "crash-agent"])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .env("RUSTCI_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the agent's runner takes jobs", async || {
        let v = admin.get("/api/runners").await.ok()?.json();
        v["runners"]
            .as_array()?
            .iter()
            .any(|r| r["kind"] == "valkyrie" && r["status"] == "healthy")
            .then_some(())
    })
    .await;

    let (long_marker, short_marker) = (dir.path().join("long"), dir.path().join("short"));
    let post = async |job: Value| {
        let r = admin.post_json("/api/jobs", &job).await.unwrap();
        assert_eq!(r.status, 201, "{}", r.error_message());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let long = post(lines_job("long", 60, "0.05", &long_marker)).await;
    let short = post(lines_job("short", 12, "0.05", &short_marker)).await;
    for id in [&long, &short] {
        wait_for("both jobs run", async || {
            let v = admin.get(&format!("/api/jobs/{id}")).await.ok()?.json();
            (v["state"] == "running").then_some(())
        })
        .await;
    }

    // kill -9 while both run; the short one ends while the server is down.
    drop(server);
    wait_for(
        "the short job finished on the agent while the server was down",
        async || {
            std::fs::read_to_string(&short_marker)
                .ok()
                .filter(|m| m == "run\nend\n")
        },
    )
    .await;
    let server = start_server(dir.path(), &agent_addr);
    let admin = admin_client(dir.path(), &server.base);
    for (id, name, lines, marker) in [
        (&long, "long", 60, &long_marker),
        (&short, "short", 12, &short_marker),
    ] {
        let record: Value = wait_for("the job ends after the restart", async || {
            let v = admin.get(&format!("/api/jobs/{id}")).await.ok()?.json();
            matches!(
                v["state"].as_str(),
                Some("succeeded" | "failed" | "lost" | "cancelled")
            )
            .then_some(v)
        })
        .await;
        assert_eq!(record["state"], "succeeded", "{name}: {record}");
        assert_eq!(
            record["attempts"].as_array().unwrap().len(),
            1,
            "{name}: {record}"
        );
        let log = admin.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&log.body),
            expected(name, lines),
            "{name}: the log is gapless and exact"
        );
        assert_eq!(
            std::fs::read_to_string(marker).unwrap(),
            "run\nend\n",
            "{name} ran once"
        );
    }
    agent.kill().await.unwrap();
    drop(server);
}

/// The admin's client of the server whose data directory is under `dir`, trusting the
/// CA it created there.
fn admin_client(dir: &Path, base: &str) -> ApiClient {
    let ca = std::fs::read_to_string(dir.join("data/pki/ca.pem")).expect("the server's CA");
    ApiClient::with_trust(base, Some(ADMIN.into()), rustci::client::Trust::CaPem(ca)).unwrap()
}
