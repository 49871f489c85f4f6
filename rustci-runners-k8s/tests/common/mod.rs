//! What the Kubernetes runner's tests share: the test image, a fake cluster whose kubelet
//! runs pods on this machine's Docker engine, and runners connected to it over HTTPS.

#![allow(dead_code)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustci_k8s_fake::{FakeCluster, FakeConfig};
use rustci_runners::job::JobSpec;
use rustci_runners::testkit::Target;
use rustci_runners::{Capabilities, Error, Execution, Health, JobId, Runner, RunnerInfo};
use rustci_runners_k8s::{Connection, KubernetesConfig, KubernetesRunner};

pub const IMAGE: &str = "rustci-busybox:local";
pub const NAMESPACE: &str = "rustci";

pub fn require() -> bool {
    std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some()
}

/// Builds the test image unless the engine has it (one test process at a time). `None`
/// when there is no engine and the environment does not require one.
pub fn image() -> Option<&'static str> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let lock = std::fs::File::create(std::env::temp_dir().join("rustci-test-image.lock"))
            .map_err(|e| format!("lock file: {e}"))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        let have = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .map_err(|e| format!("docker CLI: {e}"))?;
        if have.status.success() {
            return Ok(());
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-test-image");
        let out = Command::new(script)
            .arg(IMAGE)
            .output()
            .map_err(|e| format!("{script}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "building {IMAGE} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    match result {
        Ok(()) => Some(IMAGE),
        Err(e) if require() => panic!("RUSTCI_REQUIRE_DOCKER is set but: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: no usable Docker engine for the fake cluster's kubelet: {e}");
            None
        }
    }
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
