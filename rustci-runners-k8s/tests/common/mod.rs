//! What the Kubernetes runner's tests share: the test image, a fake cluster whose kubelet
//! runs pods on this machine's Docker engine, and runners connected to it over HTTPS.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustci_k8s_fake::{FakeCluster, FakeConfig};
use rustci_runners::job::JobSpec;
use rustci_runners::testkit::Target;
use rustci_runners::{Capabilities, Error, Execution, Health, JobId, Runner, RunnerInfo};
use rustci_runners_k8s::{Connection, KubernetesConfig, KubernetesRunner};

pub const IMAGE: &str = rustci_runners::testkit::BUSYBOX_IMAGE;
pub const NAMESPACE: &str = "rustci";

pub fn require() -> bool {
    std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some()
}

/// The test image (built when missing); `None` after `SKIPPED` without an engine, unless
/// the environment demands one.
pub fn image() -> Option<&'static str> {
    rustci_runners::testkit::busybox_image_or_skip()
}

/// A fake cluster with the namespace `rustci`, adjusted by `f`.
pub async fn cluster_with(f: impl FnOnce(&mut FakeConfig)) -> Option<FakeCluster> {
    image()?;
    let mut config = FakeConfig {
        namespaces: vec!["default".into(), NAMESPACE.into()],
        ..FakeConfig::default()
    };
    f(&mut config);
    match FakeCluster::start(config).await {
        Ok(c) => Some(c),
        Err(e) if require() => panic!("RUSTCI_REQUIRE_DOCKER is set but: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: the fake cluster cannot start: {e}");
            None
        }
    }
}

pub async fn cluster() -> Option<FakeCluster> {
    cluster_with(|_| {}).await
}

/// A kubeconfig of `cluster` in a temporary file.
pub fn kubeconfig(cluster: &FakeCluster) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    cluster.write_kubeconfig(file.path(), NAMESPACE).unwrap();
    file
}

/// The test runner's configuration: the fake cluster's kubeconfig, short grace and waits.
pub fn config(kubeconfig: &tempfile::NamedTempFile) -> KubernetesConfig {
    let mut c = KubernetesConfig::default();
    c.name = "k8s-tests".into();
    c.connection = Connection::Kubeconfig {
        path: Some(kubeconfig.path().to_path_buf()),
        context: None,
    };
    c.default_image = Some(IMAGE.into());
    c.termination_grace = Duration::from_secs(1);
    c.pending_timeout = Duration::from_secs(60);
    c.requests_per_second = 500;
    c.max_concurrency = Some(16);
    c
}

pub async fn runner_on(
    cluster: &FakeCluster,
    f: impl FnOnce(&mut KubernetesConfig),
) -> KubernetesRunner {
    let file = kubeconfig(cluster);
    let mut c = config(&file);
    f(&mut c);
    KubernetesRunner::connect(c)
        .await
        .expect("connect to the fake cluster")
}

/// A runner together with the cluster it runs on, so the cluster lives as long as the
/// runner is in use. Forwards every `Runner` method.
pub struct OnCluster {
    pub runner: KubernetesRunner,
    pub cluster: FakeCluster,
}

#[async_trait]
impl Runner for OnCluster {
    fn info(&self) -> &RunnerInfo {
        self.runner.info()
    }
    fn capabilities(&self) -> &Capabilities {
        self.runner.capabilities()
    }
    fn running(&self) -> usize {
        self.runner.running()
    }
    async fn health(&self) -> Health {
        self.runner.health().await
    }
    async fn start(&self, job: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        self.runner.start(job, id).await
    }
    async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        self.runner.abandon(id).await
    }
}

pub async fn target() -> Option<Target> {
    if !rustci_runners::testkit::requires_root(
        "the conformance suite's leftover check on container processes",
    ) {
        return None;
    }
    let cluster = cluster().await?;
    let runner = runner_on(&cluster, |_| {}).await;
    Some(Target::shared(Arc::new(OnCluster { runner, cluster })).with_image(IMAGE))
}

/// Asserts that nothing of the runner is left in the cluster or on the engine.
pub async fn assert_nothing_left(cluster: &FakeCluster) {
    let pods: Vec<String> = cluster
        .pods(NAMESPACE)
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(pods.is_empty(), "pods left: {pods:?}");
    let secrets: Vec<String> = cluster
        .secrets(NAMESPACE)
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(secrets.is_empty(), "secrets left: {secrets:?}");
    let containers = cluster.docker_containers().await;
    assert!(containers.is_empty(), "containers left: {containers:?}");
}
