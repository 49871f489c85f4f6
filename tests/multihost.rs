//! The control plane and three agents, each in its own container on a private Docker
//! network: jobs placed by labels, a partition longer than the lease (the agent fences
//! itself, the job moves, the healed agent's attempt is refused), a partition shorter than
//! the lease (nothing moves, the log is exact), `docker kill -s KILL` of an agent
//! restarted with a new boot id, and `docker kill -s KILL` of the control plane's
//! container mid-job (the jobs go on on their agents, a completion made while it was down
//! lands once, the logs are gapless).
//!
//! The containers run the project's own binaries (mounted read-only, with the shared
//! libraries they link) on the test image `rustci-busybox:local` (`scripts/build-test-image`).
//! Without a Docker engine, root or that image the test prints `SKIPPED`; with
//! `RUSTCI_REQUIRE_DOCKER=1` that is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustci::client::ApiClient;
use serde_json::{Value, json};

const ADMIN: &str = "multihost-admin-key-0123456789";
const IMAGE: &str = "rustci-busybox:local";

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why this test cannot run here, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    if let Err(e) = docker(&["version", "--format", "{{.Server.Version}}"]) {
        return Some(format!("no Docker engine: {e}"));
    }
    if docker(&["image", "inspect", IMAGE]).is_err() {
        return Some(format!("no image {IMAGE} (scripts/build-test-image)"));
    }
    None
}

/// The shared libraries a binary links, as `-v path:path:ro` mounts.
fn library_mounts(binary: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut mounts = Vec::new();
    for line in text.lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_string);
        if let Some(p) = path
            && Path::new(&p).exists()
        {
            mounts.push("-v".to_string());
            mounts.push(format!("{p}:{p}:ro"));
        }
    }
    mounts
}

struct Cluster {
    prefix: String,
    net: String,
    subnet_base: String,
    containers: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

impl Cluster {
    /// A network of its own; `slot` (0 to 9) tells the tests of one process apart.
    fn new(slot: u32) -> Cluster {
        let prefix = format!("rustci-mh-{}-{slot}", std::process::id());
        let net = format!("{prefix}-net");
        // A private /24 of its own per test, so fixed addresses survive a disconnect and
        // reconnect (an agent's TCP connection then lives on).
        let third = 100 + (std::process::id() * 10 + slot) % 150;
        let subnet_base = format!("10.213.{third}");
        let _ = docker(&["network", "rm", &net]);
        docker(&[
            "network",
            "create",
            "--subnet",
            &format!("{subnet_base}.0/24"),
            "--label",
            "rustci.test=multihost",
            &net,
        ])
        .expect("network created");
        Cluster {
            prefix,
            net,
            subnet_base,
            containers: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn run(&mut self, name: &str, ip: u8, extra: &[String], command: &[&str]) -> String {
        let container = format!("{}-{name}", self.prefix);
        let _ = docker(&["rm", "-f", &container]);
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &container,
            "--hostname",
            name,
            "--network",
            &self.net,
            "--ip",
            &format!("{}.{ip}", self.subnet_base),
            "--tmpfs",
            "/tmp",
            "--label",
            "rustci.test=multihost",
            "-e",
            "RUSTCI_LOG=info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        args.push(IMAGE.to_string());
        args.extend(command.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs).expect("container started");
        self.containers.push(container.clone());
        container
    }

    fn ip(&self, n: u8) -> String {
        format!("{}.{n}", self.subnet_base)
    }
}

/// [`common::wait_for`] with this file's bound.
async fn wait_for<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    common::wait_for(what, 90, f).await
}

async fn submit(admin: &ApiClient, job: Value) -> String {
    let r = admin.post_json("/api/jobs", &job).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.error_message());
    r.json()["id"].as_str().unwrap().to_string()
}

async fn job(admin: &ApiClient, id: &str) -> Value {
    admin.get(&format!("/api/jobs/{id}")).await.unwrap().json()
}

async fn wait_state(admin: &ApiClient, id: &str, states: &[&str]) -> Value {
    wait_for(&format!("job {id} reaches one of {states:?}"), async || {
        let v = admin.get(&format!("/api/jobs/{id}")).await.ok()?.json();
        states.iter().any(|s| v["state"] == *s).then_some(v)
    })
    .await
}

async fn log(admin: &ApiClient, id: &str) -> String {
    let r = admin.get(&format!("/api/jobs/{id}/logs")).await.unwrap();
    String::from_utf8_lossy(&r.body).to_string()
}

/// The deployed system: the control plane's container, its CA, an admin client, and the
/// agents as (name, container, address suffix) with their ids by name.
struct Deployment {
    cluster: Cluster,
    cp: String,
    ca: String,
    admin: ApiClient,
    agents: Vec<(String, String, u8)>,
    ids: std::collections::HashMap<String, String>,
}

impl Deployment {
    fn id_of(&self, name: &str) -> String {
        self.ids[name].clone()
    }
}

/// An admin client of the control plane in container `cp` through its published port
/// (looked up again after a restart), once it answers.
async fn admin_of(cp: &str, ca: &str) -> ApiClient {
    let port = wait_for("the control plane's port is published", async || {
        docker(&["port", cp, "8080/tcp"])
            .ok()
            .and_then(|p| p.lines().next().map(str::to_string))
    })
    .await;
    let admin = ApiClient::with_trust(
        &format!("https://{port}"),
        Some(ADMIN.into()),
        rustci::client::Trust::CaPem(ca.to_string()),
    )
    .unwrap();
    wait_for("the control plane answers", async || {
        admin.get("/healthz").await.ok().filter(|r| r.status == 200)
    })
    .await;
    admin
}

/// The control plane (heartbeats every `heartbeat_ms`, `margin_ms` between self-fence
/// and reassignment) and `agent_count` agents labelled `host-N` and `pool`, each in its
/// own container on a network of its own, all healthy.
async fn deploy(slot: u32, heartbeat_ms: u64, margin_ms: u64, agent_count: u8) -> Deployment {
    let server_bin = env!("CARGO_BIN_EXE_rustci-server");
    let agent_bin = env!("CARGO_BIN_EXE_rustci");
    let mut cluster = Cluster::new(slot);

    let cp_data = cluster.path("cp");
    std::fs::write(
        cluster.dir.path().join("server.yaml"),
        format!(
            "listen: 0.0.0.0:8080\ndata_dir: /data\nadmin_key: {ADMIN}\ndefault_runners: false\n\
             health_interval_secs: 1\nagent_listen: 0.0.0.0:8443\nagent_heartbeat_ms: {heartbeat_ms}\n\
             agent_margin_ms: {margin_ms}\n"
        ),
    )
    .unwrap();
    let mut extra = vec![
        "-p".to_string(),
        "127.0.0.1::8080".to_string(),
        "-v".to_string(),
        format!("{server_bin}:/bin/rustci-server:ro"),
        "-v".to_string(),
        format!("{}:/data", cp_data.display()),
        "-v".to_string(),
        format!(
            "{}:/server.yaml:ro",
            cluster.dir.path().join("server.yaml").display()
        ),
        "-e".to_string(),
        "RUSTCI_CONFIG=/server.yaml".to_string(),
    ];
    extra.extend(library_mounts(server_bin));
    let cp = cluster.run("cp", 2, &extra, &["/bin/rustci-server"]);
    let ca = wait_for("the CA exists", async || {
        std::fs::read_to_string(cp_data.join("pki/ca.pem")).ok()
    })
    .await;
    let admin = admin_of(&cp, &ca).await;
    let fp =
        rustci::valkyrie::pki::fingerprint(&rustci::valkyrie::pki::first_cert_der(&ca).unwrap());

    // The agents, each registered with its own single-use token.
    let mut agents = Vec::new();
    for n in 1..=agent_count {
        let token = admin
            .post_json(
                "/api/tokens",
                &json!({"ttl_seconds": 600, "labels": ["pool"]}),
            )
            .await
            .unwrap()
            .json()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let data = cluster.path(&format!("agent-{n}"));
        let mut extra = vec![
            "-v".to_string(),
            format!("{agent_bin}:/bin/rustci:ro"),
            "-v".to_string(),
            format!("{}:/data", data.display()),
        ];
        extra.extend(library_mounts(agent_bin));
        let name = format!("agent-{n}");
        let labels = format!("host-{n}");
        let server = format!("{}:8443", cluster.ip(2));
        let container = cluster.run(
            &name,
            10 + n,
            &extra,
            &[
                "/bin/rustci",
                "agent",
                "--server",
                &server,
                "--token",
                &token,
                "--ca-fingerprint",
                &fp,
                "--runners",
                "local",
                "--labels",
                &labels,
                "--name",
                &name,
                "--data-dir",
                "/data",
                "--backoff-max",
                "1",
            ],
        );
        agents.push((name, container, 10 + n));
    }
    let listed = wait_for("every agent is healthy with its runners", async || {
        let v = admin.get("/api/agents").await.ok()?.json();
        let list = v["agents"].as_array()?.clone();
        (list.len() == agent_count as usize
            && list
                .iter()
                .all(|a| a["status"] == "healthy" && !a["runners"].as_array().unwrap().is_empty()))
        .then_some(list)
    })
    .await;
    let ids = listed
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, _, n) in &agents {
        let a = listed.iter().find(|a| a["name"] == *name).unwrap();
        assert_eq!(
            a["address"].as_str().unwrap().split(':').next().unwrap(),
            cluster.ip(*n)
        );
    }
    wait_for("every agent's runner takes jobs", async || {
        let v = admin.get("/api/runners").await.ok()?.json();
        (v["runners"]
            .as_array()?
            .iter()
            .filter(|r| r["kind"] == "valkyrie" && r["status"] == "healthy")
            .count()
            == agent_count as usize)
            .then_some(())
    })
    .await;
    Deployment {
        cluster,
        cp,
        ca,
        admin,
        agents,
        ids,
    }
}

/// Why the test cannot run, or a panic when `RUSTCI_REQUIRE_DOCKER` says it must.
fn skip() -> bool {
    match missing() {
        None => false,
        Some(why) if std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some() => {
            panic!("RUSTCI_REQUIRE_DOCKER=1 but: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            true
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_other_hosts_survive_partitions_and_kill_9() {
    if skip() {
        return;
    }
    // Heartbeats every 300 ms, so self-fence after 900 ms and reassignment after 2.4 s.
    let d = deploy(0, 300, 1500, 3).await;
    let (admin, agents, cluster) = (d.admin.clone(), &d.agents, &d.cluster);
    let id_of = |name: &str| d.id_of(name);
    // Labels choose the host.
    for n in [2, 3, 1] {
        let id = submit(
            &admin,
            json!({"name": "where", "runs_on": {"labels": [format!("host-{n}")]},
                   "steps": [{"run": "hostname"}]}),
        )
        .await;
        let v = wait_state(&admin, &id, &["succeeded", "failed", "lost"]).await;
        assert_eq!(v["state"], "succeeded", "{v}");
        let runner = v["attempts"][0]["runner_id"].as_str().unwrap();
        assert!(runner.starts_with(&id_of(&format!("agent-{n}"))), "{v}");
        assert_eq!(log(&admin, &id).await, format!("agent-{n}\n"));
    }

    // A partition longer than the reassignment time, mid-job.
    let id = submit(
        &admin,
        json!({"name": "moves", "runs_on": {"labels": ["pool"]},
               "retry": {"max": 1, "when": ["lost"]},
               "steps": [{"run": "echo \"start on $(hostname)\"; sleep 6; echo \"end on $(hostname)\""}]}),
    )
    .await;
    let v = wait_state(&admin, &id, &["running"]).await;
    let first = v["attempts"][0]["runner_id"].as_str().unwrap().to_string();
    let (victim, victim_container, victim_ip) = agents
        .iter()
        .find(|(name, _, _)| first.starts_with(&id_of(name)))
        .cloned()
        .unwrap();
    wait_for("the job printed on its first host", async || {
        log(&admin, &id).await.contains("start on").then_some(())
    })
    .await;
    docker(&["network", "disconnect", &cluster.net, &victim_container]).unwrap();
    let v = wait_state(&admin, &id, &["succeeded", "failed", "lost"]).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{v}");
    assert_eq!(attempts[0]["outcome"]["result"], "lost", "{v}");
    assert_ne!(attempts[1]["runner_id"], attempts[0]["runner_id"]);
    let text = log(&admin, &id).await;
    assert_eq!(
        text.matches("end on").count(),
        1,
        "one complete run: {text:?}"
    );
    assert!(!text.contains(&format!("end on {victim}")), "{text:?}");
    // The partitioned agent stopped the job by itself: nothing of it runs there.
    let ps = docker(&["exec", &victim_container, "ps"]).unwrap();
    assert!(
        !ps.contains("sleep 6"),
        "the fenced job still runs on {victim}: {ps}"
    );
    // Reconnected, its late messages about the attempt are refused and change nothing.
    docker(&[
        "network",
        "connect",
        "--ip",
        &cluster.ip(victim_ip),
        &cluster.net,
        &victim_container,
    ])
    .unwrap();
    wait_for("the partitioned agent's attempt was refused", async || {
        let logs = docker(&["logs", &victim_container]).ok()?;
        let stderr = Command::new("docker")
            .args(["logs", &victim_container])
            .output()
            .ok()?;
        let all = format!("{logs}{}", String::from_utf8_lossy(&stderr.stderr));
        all.contains("attempt aborted").then_some(())
    })
    .await;
    wait_for("the partitioned agent is healthy again", async || {
        let v = admin
            .get(&format!("/api/agents/{}", id_of(&victim)))
            .await
            .ok()?
            .json();
        (v["status"] == "healthy").then_some(())
    })
    .await;
    assert_eq!(job(&admin, &id).await["attempts"], v["attempts"]);

    // A partition shorter than the lease: nothing moves, the log is exact.
    let (short, short_container, short_ip) = agents
        .iter()
        .find(|(name, _, _)| *name != victim)
        .cloned()
        .unwrap();
    let n = short.trim_start_matches("agent-");
    let id = submit(
        &admin,
        json!({"name": "stays", "runs_on": {"labels": [format!("host-{n}")]},
               "steps": [{"run": "i=0; while [ $i -lt 60 ]; do echo \"line $i\"; i=$((i+1)); sleep 0.05; done"}]}),
    )
    .await;
    wait_for("the job printed", async || {
        log(&admin, &id).await.contains("line 3\n").then_some(())
    })
    .await;
    docker(&["network", "disconnect", &cluster.net, &short_container]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    docker(&[
        "network",
        "connect",
        "--ip",
        &cluster.ip(short_ip),
        &cluster.net,
        &short_container,
    ])
    .unwrap();
    let v = wait_state(&admin, &id, &["succeeded", "failed", "lost"]).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
    let want: String = (0..60).map(|i| format!("line {i}\n")).collect();
    assert_eq!(log(&admin, &id).await, want);

    // kill -9 of an agent mid-job, restarted at once: a new boot id with nothing held,
    // so its attempt is lost at once and the job runs again.
    let id = submit(
        &admin,
        json!({"name": "killed", "runs_on": {"labels": ["pool"]},
               "retry": {"max": 1, "when": ["lost"]},
               "steps": [{"run": "echo \"start on $(hostname)\"; sleep 3; echo \"end on $(hostname)\""}]}),
    )
    .await;
    let v = wait_state(&admin, &id, &["running"]).await;
    let first = v["attempts"][0]["runner_id"].as_str().unwrap().to_string();
    let (killed, killed_container, _) = agents
        .iter()
        .find(|(name, _, _)| first.starts_with(&id_of(name)))
        .cloned()
        .unwrap();
    docker(&["kill", "-s", "KILL", &killed_container]).unwrap();
    docker(&["start", &killed_container]).unwrap();
    let v = wait_state(&admin, &id, &["succeeded", "failed", "lost"]).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{v}");
    assert_eq!(attempts[0]["outcome"]["result"], "lost", "{v}");
    // The restarted agent kept its identity.
    wait_for("the killed agent is back under its id", async || {
        let v = admin
            .get(&format!("/api/agents/{}", id_of(&killed)))
            .await
            .ok()?
            .json();
        (v["status"] == "healthy").then_some(())
    })
    .await;
    assert_eq!(
        log(&admin, &id).await.matches("end on").count(),
        1,
        "one complete run"
    );
}

/// A job's steps: `lines` numbered lines a `pause` apart, between a start and an end
/// mark appended to `/data/marks-NAME` on the agent (its data directory, shared with
/// the test).
fn lines_job(name: &str, host: u8, lines: u32, pause: &str) -> Value {
    json!({
        "name": name,
        "runs_on": {"labels": [format!("host-{host}")]},
        "steps": [{"run": format!(
            "echo run >> /data/marks-{name}; i=1; while [ $i -le {lines} ]; do echo \"{name} line $i\"; i=$((i+1)); sleep {pause}; done; echo end >> /data/marks-{name}"
        )}]
    })
}

fn expected_lines(name: &str, lines: u32) -> String {
    (1..=lines).map(|i| format!("{name} line {i}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_control_plane_container_keeps_jobs_on_the_agents() {
    if skip() {
        return;
    }
    // Heartbeats every 2 s: an agent fences itself after 6 s without the control plane,
    // longer than the restart below takes.
    let d = deploy(1, 2000, 1500, 2).await;
    let admin = &d.admin;
    let (long, short) = (
        submit(admin, lines_job("long", 1, 100, "0.05")).await,
        submit(admin, lines_job("short", 2, 10, "0.05")).await,
    );
    for id in [&long, &short] {
        wait_state(admin, id, &["running"]).await;
    }
    wait_for("the long job printed", async || {
        log(admin, &long)
            .await
            .contains("long line 3\n")
            .then_some(())
    })
    .await;

    // kill -9 of the control plane's container; the short job ends while it is down.
    docker(&["kill", "-s", "KILL", &d.cp]).unwrap();
    let agent_dir = |n: u8| d.cluster.dir.path().join(format!("agent-{n}"));
    wait_for(
        "the short job finished on its agent while the control plane was down",
        async || {
            std::fs::read_to_string(agent_dir(2).join("marks-short"))
                .ok()
                .filter(|m| m == "run\nend\n")
        },
    )
    .await;
    assert_ne!(
        std::fs::read_to_string(agent_dir(1).join("marks-long")).unwrap(),
        "run\nend\n",
        "the long job was still running when the control plane came back"
    );
    docker(&["start", &d.cp]).unwrap();
    let admin = admin_of(&d.cp, &d.ca).await;

    for (id, name, host, lines) in [(&long, "long", 1, 100), (&short, "short", 2, 10)] {
        let v = wait_state(&admin, id, &["succeeded", "failed", "lost", "cancelled"]).await;
        assert_eq!(v["state"], "succeeded", "{name}: {v}");
        assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{name}: {v}");
        assert!(
            v["attempts"][0]["runner_id"]
                .as_str()
                .unwrap()
                .starts_with(&d.id_of(&format!("agent-{host}"))),
            "{name}: {v}"
        );
        assert_eq!(
            log(&admin, id).await,
            expected_lines(name, lines),
            "{name}: the log is gapless and exact"
        );
        assert_eq!(
            std::fs::read_to_string(agent_dir(host).join(format!("marks-{name}"))).unwrap(),
            "run\nend\n",
            "{name} ran once"
        );
    }
    // Both agents are back in their sessions.
    wait_for("both agents are healthy again", async || {
        let v = admin.get("/api/agents").await.ok()?.json();
        let list = v["agents"].as_array()?.clone();
        (list.len() == 2 && list.iter().all(|a| a["status"] == "healthy")).then_some(())
    })
    .await;
}
