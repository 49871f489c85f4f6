//! The `rustci-fake-cluster` binary: starts, writes a usable kubeconfig, prints where it
//! listens, and exits 0 after cleaning up on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_until_sigterm() {
    if common::image().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kc");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustci-fake-cluster"))
        .args(["--namespace", "jobs", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    if first.is_empty() {
        let _ = child.wait();
        panic!("no output");
    }
    assert!(
        first.starts_with("listening on https://127.0.0.1:"),
        "{first}"
    );
    let cluster = lines.next().unwrap().unwrap();
    assert!(
        cluster.starts_with("cluster ") && cluster.contains("rustci.fake-cluster="),
        "{cluster}"
    );
    let second = lines.next().unwrap().unwrap();
    assert_eq!(
        second,
        format!("kubeconfig written to {}", kubeconfig.display())
    );
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let client = common::client_for(&text).await.unwrap();
    let ns: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    ns.get("jobs").await.unwrap();
    // SAFETY: signalling the child we spawned, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
