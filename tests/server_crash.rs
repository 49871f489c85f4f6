//! The server binary killed with SIGKILL mid-job and started again: nothing is lost and
//! nothing runs twice at once.

mod common;

use std::path::Path;

use common::{ServerProc, start_server};

use rustci::client::ApiClient;
use serde_json::{Value, json};

const ADMIN: &str = "crash-admin-key-0123456789";

fn start(dir: &Path) -> ServerProc {
    start_server(dir, ADMIN, "warn")
}

async fn submit(c: &ApiClient, job: Value) -> String {
    let r = c.post_json("/api/jobs", &job).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.error_message());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Reads a job's event stream until its text contains `needle`.
async fn wait_for_text(c: &ApiClient, id: &str, needle: &str) {
    let mut events = c
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        if let Some(t) = data["text"].as_str() {
            text.push_str(t);
        }
        if text.contains(needle) {
            return;
        }
        assert_ne!(
            ev.event, "end",
            "job {id} ended before {needle:?}: {text:?}"
        );
    }
    panic!("stream of {id} ended before {needle:?}");
}

async fn state_at_end(c: &ApiClient, id: &str) -> String {
    let mut events = c
        .events(&format!("/api/jobs/{id}/logs?follow=true"), &[])
        .await
        .unwrap();
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        if ev.event == "end" {
            let data: Value = serde_json::from_str(&ev.data).unwrap();
            return data["state"].as_str().unwrap().to_string();
        }
    }
    panic!("no end event for {id}");
}

fn gated(name: &str, marker: &Path, gate: &Path, retry: bool) -> Value {
    let script = format!(
        "echo start >> '{m}'\necho started\nwhile [ ! -e '{g}' ]; do sleep 0.02; done\necho end >> '{m}'",
        m = marker.display(),
        g = gate.display()
    );
    let mut job = json!({"name": name, "steps": [{"run": script}]});
    if retry {
        job["retry"] = json!({"max": 1, "when": ["lost"]});
    }
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_loses_nothing_and_runs_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(
        dir.path().join("server.yaml"),
        format!(
            "runners:\n  - name: local-a\n    kind: local\n    slots: 2\n    workspace_root: {ws}\n  - name: local-b\n    kind: local\n    reserved_labels: [pool]\n    slots: 1\n    workspace_root: {ws}\nshutdown_grace_secs: 2\n",
            ws = ws.display()
        ),
    )
    .unwrap();
    let gate = dir.path().join("gate");
    let marker_a = dir.path().join("a.marks");
    let marker_d = dir.path().join("d.marks");

    let server = start(dir.path());
    let c = admin_client(dir.path(), &server.base);
    let done = submit(
        &c,
        json!({"name": "before", "steps": [{"run": "echo done-before"}]}),
    )
    .await;
    assert_eq!(state_at_end(&c, &done).await, "succeeded");
    // Its workspace, untouched, is pooled by local-b (reserved: nothing else runs there).
    let pooled = submit(
        &c,
        json!({"name": "pooled", "runs_on": {"labels": ["pool"]}, "steps": [{"run": "true"}]}),
    )
    .await;
    assert_eq!(state_at_end(&c, &pooled).await, "succeeded");
    let a = submit(&c, gated("retried", &marker_a, &gate, true)).await;
    let d = submit(&c, gated("not-retried", &marker_d, &gate, false)).await;
    wait_for_text(&c, &a, "started").await;
    wait_for_text(&c, &d, "started").await;
    // Both slots are busy: this one waits in the queue.
    let b = submit(
        &c,
        json!({"name": "queued", "steps": [{"run": "echo b-ran"}]}),
    )
    .await;
    let queued = c.get(&format!("/api/jobs/{b}")).await.unwrap().json();
    assert_eq!(queued["state"], "queued");

    // The killed process's workspaces: two in use, one pooled (the first job's), in its
    // owner directory.
    let old_dirs: Vec<_> = std::fs::read_dir(&ws)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(old_dirs.len(), 1, "{old_dirs:?}");
    let workspaces = std::fs::read_dir(&old_dirs[0])
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "owner")
        .count();
    assert_eq!(workspaces, 3, "two in use, one pooled");

    // SIGKILL: no shutdown code runs.
    drop(server);
    let a1 = rustci_runners::JobId::from(format!("{a}-1"));
    assert!(
        !rustci_runners::testkit::processes_of(&a1)
            .expect("scan /proc")
            .is_empty(),
        "the killed server's job processes outlive it (what restart must clean up)"
    );

    let server = start(dir.path());
    let c = admin_client(dir.path(), &server.base);
    // Nothing of the killed process is left under the workspace root.
    for d in &old_dirs {
        assert!(!d.exists(), "{} outlived its process", d.display());
    }
    // Recovery stopped what was left of the interrupted attempts before retrying.
    assert!(
        rustci_runners::testkit::processes_of(&a1)
            .expect("scan /proc")
            .is_empty()
    );
    let d1 = rustci_runners::JobId::from(format!("{d}-1"));
    assert!(
        rustci_runners::testkit::processes_of(&d1)
            .expect("scan /proc")
            .is_empty()
    );

    assert_eq!(state_at_end(&c, &b).await, "succeeded");
    assert_eq!(state_at_end(&c, &d).await, "lost");
    wait_for_text(&c, &a, "attempt 2 on runner local-a").await;
    std::fs::write(&gate, b"").unwrap();
    assert_eq!(state_at_end(&c, &a).await, "succeeded");

    let ja = c.get(&format!("/api/jobs/{a}")).await.unwrap().json();
    let attempts = ja["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{ja}");
    assert_eq!(attempts[0]["outcome"]["result"], "lost");
    assert_eq!(attempts[1]["outcome"]["result"], "succeeded");
    assert_eq!(
        std::fs::read_to_string(&marker_a).unwrap(),
        "start\nstart\nend\n",
        "attempt 1 never finished beside attempt 2"
    );
    assert_eq!(std::fs::read_to_string(&marker_d).unwrap(), "start\n");
    let jb = c.get(&format!("/api/jobs/{b}")).await.unwrap().json();
    assert_eq!(jb["attempts"].as_array().unwrap().len(), 1);
    let logs = c.get(&format!("/api/jobs/{b}/logs")).await.unwrap();
    assert_eq!(&logs.body[..], b"b-ran\n");
    // What finished before the crash is still there, log included.
    let before = c.get(&format!("/api/jobs/{done}")).await.unwrap().json();
    assert_eq!(before["state"], "succeeded");
    let logs = c.get(&format!("/api/jobs/{done}/logs")).await.unwrap();
    assert_eq!(&logs.body[..], b"done-before\n");
    let logs = c.get(&format!("/api/jobs/{a}/logs")).await.unwrap();
    let text = String::from_utf8_lossy(&logs.body);
    assert!(
        text.starts_with("started\n") && text.contains("[rustci] attempt 2 on runner local-a"),
        "{text:?}"
    );

    // A graceful stop (SIGTERM) ends with exit status 0.
    let mut server = server;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The admin's client of the server whose data directory is under `dir`, trusting the
/// CA it created there.
fn admin_client(dir: &Path, base: &str) -> ApiClient {
    let ca = std::fs::read_to_string(dir.join("data/pki/ca.pem")).expect("the server's CA");
    ApiClient::with_trust(base, Some(ADMIN.into()), rustci::client::Trust::CaPem(ca)).unwrap()
}
