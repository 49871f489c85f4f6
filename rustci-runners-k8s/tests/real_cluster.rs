//! The conformance suite against a real cluster, for users who have one. Every test is
//! ignored unless asked for, so it shows as skipped in the test summary:
//!
//! ```sh
//! RUSTCI_K8S_KUBECONFIG=~/.kube/config RUSTCI_K8S_NAMESPACE=ci RUSTCI_K8S_IMAGE=busybox:1.36 \
//!   cargo nextest run -p rustci-runners-k8s --features testkit --test real_cluster --run-ignored all
//! ```
//!
//! (`cargo test -p rustci-runners-k8s --features testkit --test real_cluster -- --ignored`
//! does the same.) The namespace (default `default`) must exist and allow creating pods and
//! secrets; the image (default `busybox:1.36`) must be pullable there. Run without
//! `RUSTCI_K8S_KUBECONFIG`, every test fails saying so. The check for leftover processes
//! can only see this machine, so when the pods run on other machines it finds nothing to
//! object to, and `secret_split_across_writes`, which reaches the job's workspace through
//! the job's processes on this machine, reports itself skipped; the others hold in full.

use std::time::Duration;

use rustci_runners::testkit::Target;
use rustci_runners_k8s::{Connection, KubernetesConfig, KubernetesRunner};

async fn target() -> Target {
    let path = std::env::var_os("RUSTCI_K8S_KUBECONFIG").unwrap_or_else(|| {
        panic!("RUSTCI_K8S_KUBECONFIG is not set: these tests need a real cluster's kubeconfig")
    });
    let image = std::env::var("RUSTCI_K8S_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
    let mut config = KubernetesConfig::default();
    config.name = format!("rustci-real-cluster-tests-{}", std::process::id());
    config.connection = Connection::Kubeconfig {
        path: Some(path.into()),
        context: std::env::var("RUSTCI_K8S_CONTEXT").ok(),
    };
    config.namespace =
        Some(std::env::var("RUSTCI_K8S_NAMESPACE").unwrap_or_else(|_| "default".into()));
    config.default_image = Some(image.clone());
    config.termination_grace = Duration::from_secs(2);
    config.max_concurrency = Some(10);
    let runner = KubernetesRunner::connect(config)
        .await
        .unwrap_or_else(|e| panic!("RUSTCI_K8S_KUBECONFIG is set but: {e}"));
    Target::new(runner).with_image(image)
}

rustci_runners::conformance_tests!(
    ignored: "needs a real cluster: set RUSTCI_K8S_KUBECONFIG and run with --run-ignored all",
    target().await
);
