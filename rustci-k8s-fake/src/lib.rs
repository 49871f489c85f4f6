//! A fake Kubernetes API server for tests, served over real HTTPS on loopback, whose
//! simulated kubelet really runs each pod's containers on the local Docker engine.
//!
//! [`FakeCluster::start`] binds `127.0.0.1`, generates a fresh CA and server certificate,
//! and serves a subset of the core/v1 API with real Kubernetes JSON (the `k8s-openapi`
//! types): namespaces, one node, pods (create/get/list/watch/delete/log) and secrets. A
//! client such as `kube` built from [`FakeCluster::kubeconfig`] talks to it exactly as to a
//! real cluster. A scheduler places pods on the single node (node selector, affinity,
//! taints, cpu/memory requests) and a kubelet runs them as Docker containers, reporting
//! container states, exit codes, `OOMKilled`, image pull failures, deadlines and graceful
//! termination through MODIFIED watch events.
//!
//! Tests can observe every request ([`FakeCluster::requests`]) and inject failures
//! ([`FakeCluster::inject_failure`], [`FakeCluster::forbid`], [`FakeCluster::drop_watches`],
//! [`FakeCluster::compact`], [`FakeCluster::set_schedulable`], [`FakeCluster::lose_node`]).
//!
//! Limitations: only `restartPolicy: Never` semantics are implemented (`Always` and
//! `OnFailure` pods are run like `Never` pods: exited containers are not restarted); init
//! containers, probes, `$(VAR)` expansion, PATCH/PUT and ConfigMaps are not supported;
//! containers of one pod do not share a network namespace.

#![deny(missing_docs)]

mod api;
mod docker;
mod kubelet;
mod logs;
mod quantity;
mod selector;
mod status;
mod store;
mod tls;
mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Taint};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

pub use docker::run_container_direct;

/// The label every Docker container of a fake cluster carries, valued with the cluster id.
pub const CLUSTER_LABEL: &str = "rustci.fake-cluster";

/// How a cluster is set up. [`FakeConfig::default`] gives namespace `default`, TLS on, a
/// random token, node `fake-node` with this host's cpu count and memory, Docker network
/// `bridge`, bookmarks every second and 1000 retained watch events.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Namespaces that exist (others answer 404).
    pub namespaces: Vec<String>,
    /// Serve HTTPS with a fresh self-signed CA and a server certificate for `127.0.0.1` and
    /// `localhost`; plain HTTP when false.
    pub tls: bool,
    /// The bearer token every request must carry (401 Unauthorized otherwise).
    pub token: String,
    /// Port to bind on `127.0.0.1`; 0 = any free port.
    pub port: u16,
    /// Name of the single node.
    pub node_name: String,
    /// Node labels, added to `kubernetes.io/hostname`, `kubernetes.io/os=linux` and
    /// `kubernetes.io/arch`.
    pub node_labels: BTreeMap<String, String>,
    /// Node taints (NoSchedule/NoExecute ones keep intolerant pods off the node).
    pub node_taints: Vec<Taint>,
    /// Node cpu capacity/allocatable as a quantity; `None` = this host's cpu count.
    pub node_cpu: Option<String>,
    /// Node memory capacity/allocatable as a quantity; `None` = this host's MemTotal.
    pub node_memory: Option<String>,
    /// Docker network mode of pod containers.
    pub network_mode: String,
    /// Period of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Number of watch events retained for resumption; resuming from an older
    /// resourceVersion answers 410 Expired.
    pub history: usize,
    /// Whether pod logs honour `stream=Stdout|Stderr` (Kubernetes 1.32+ with the
    /// `PodLogsQuerySplitStreams` feature gate). When false the parameter is ignored, as on
    /// a cluster without the gate, and every log request returns both streams.
    pub split_log_streams: bool,
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// A random lower-case hex string of `n` characters.
pub(crate) fn random_hex(n: usize) -> String {
    let mut s = String::with_capacity(n + 16);
    while s.len() < n {
        s.push_str(&format!("{:016x}", random_u64()));
    }
    s.truncate(n);
    s
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            namespaces: vec!["default".into()],
            tls: true,
            token: random_hex(40),
            port: 0,
            node_name: "fake-node".into(),
            node_labels: BTreeMap::new(),
            node_taints: Vec::new(),
            node_cpu: None,
            node_memory: None,
            network_mode: "bridge".into(),
            bookmark_interval: Duration::from_secs(1),
            history: 1000,
            split_log_streams: true,
        }
    }
}

/// Why a cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// The Docker engine is not reachable (or answered an error).
    #[error("docker engine unreachable: {0}")]
    Docker(String),
    /// The listening socket could not be bound.
    #[error("cannot bind 127.0.0.1:{port}: {source}")]
    Bind {
        /// The requested port.
        port: u16,
        /// The OS error.
        source: std::io::Error,
    },
    /// Certificate generation or TLS setup failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A filesystem operation (temp dir) failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// One HTTP request the API server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, upper case.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (empty when none).
    pub query: String,
    /// HTTP status code of the answer.
    pub status: u16,
}

/// A failure to inject: the next `times` requests whose method matches (`None` = any, case
/// insensitive) and whose path contains `path_contains` get `status` with a proper
/// `Status` body (403 Forbidden, 409 Conflict, 500 InternalError, 503 ServiceUnavailable,
/// ...), without being processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRule {
    /// HTTP method to match, e.g. `Some("POST".into())`; `None` matches every method.
    pub method: Option<String>,
    /// Substring of the request path (not the query) to match; empty matches everything.
    pub path_contains: String,
    /// HTTP status to answer.
    pub status: u16,
    /// How many matching requests fail; the rule is dropped afterwards.
    pub times: usize,
}

impl FailureRule {
    /// The next `times` requests with `method` whose path contains `path_contains` are
    /// answered with `status`.
    pub fn new(method: &str, path_contains: &str, status: u16, times: usize) -> Self {
        FailureRule {
            method: Some(method.to_string()),
            path_contains: path_contains.to_string(),
            status,
            times,
        }
    }
}

/// How [`FakeCluster::lose_node`] loses the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeLoss {
    /// Every pod on the node is killed and removed from the API (DELETED events) without
    /// anyone asking.
    DeletePods,
    /// Containers are killed; pods become phase `Failed` with reason `NodeLost`, container
    /// statuses left as they last were.
    FailPods,
}

/// State shared by the API server, the scheduler and the kubelet.
pub(crate) struct Shared {
    pub config: FakeConfig,
    pub cluster_id: String,
    pub store: store::Store,
    pub docker: bollard::Docker,
    pub dir: PathBuf,
    pub logs: Mutex<HashMap<(String, String), Arc<logs::LogFile>>>,
    pub schedulable: AtomicBool,
    pub sched: Notify,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub failures: Mutex<Vec<FailureRule>>,
    pub forbidden: Mutex<HashSet<(String, String)>>,
    pub drop_gen: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    pub tasks: Mutex<JoinSet<()>>,
    pub ip_seq: AtomicU32,
    pub node_cpu: f64,
    pub node_memory: f64,
    pub node_cpu_text: String,
    pub node_memory_text: String,
}

impl Shared {
    /// Spawns a task the cluster aborts at shutdown.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Whether the cluster is shutting down.
    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// A running fake cluster. Dropping it stops the server and best-effort removes every
/// Docker container and temp dir it made; [`FakeCluster::shutdown`] does the same and
/// waits for it.
pub struct FakeCluster {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: Option<String>,
    tmp: Option<tempfile::TempDir>,
    cleaned: bool,
}

fn host_cpus() -> String {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string()
}

fn host_memory() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|kb| format!("{kb}Ki")))
        })
        .unwrap_or_else(|| "8Gi".into())
}

impl FakeCluster {
    /// Connects to the local Docker engine, binds `127.0.0.1:config.port` and starts
    /// serving. Fails with [`FakeError::Docker`] when the engine does not answer a ping,
    /// [`FakeError::Bind`] when the port is taken, [`FakeError::Config`] for invalid
    /// node quantities or namespace names.
    pub async fn start(config: FakeConfig) -> Result<FakeCluster, FakeError> {
        let node_cpu_text = config.node_cpu.clone().unwrap_or_else(host_cpus);
        let node_memory_text = config.node_memory.clone().unwrap_or_else(host_memory);
        let node_cpu = quantity::parse(&node_cpu_text)
            .ok_or_else(|| FakeError::Config(format!("node_cpu {node_cpu_text:?}")))?;
        let node_memory = quantity::parse(&node_memory_text)
            .ok_or_else(|| FakeError::Config(format!("node_memory {node_memory_text:?}")))?;
        for ns in &config.namespaces {
            if !validate::is_subdomain(ns) || ns.len() > 63 || ns.contains('.') {
                return Err(FakeError::Config(format!("namespace name {ns:?}")));
            }
        }
        let docker = bollard::Docker::connect_with_defaults()
            .map_err(|e| FakeError::Docker(e.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|e| FakeError::Docker(e.to_string()))?;
        let tls = if config.tls {
            Some(tls::generate()?)
        } else {
            None
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.port))
            .await
            .map_err(|source| FakeError::Bind {
                port: config.port,
                source,
            })?;
        let addr = listener.local_addr()?;
        let tmp = tempfile::Builder::new()
            .prefix("rustci-k8s-fake-")
            .tempdir()?;
        let cluster_id = random_hex(12);
        let store = store::Store::new(config.history);
        {
            let mut st = store.lock();
            for ns in &config.namespaces {
                let rv = st.bump();
                st.namespaces
                    .insert(ns.clone(), api::namespace_object(ns, rv, &cluster_id));
            }
        }
        let (drop_gen, _) = watch::channel(0);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            cluster_id,
            store,
            docker,
            dir: tmp.path().to_path_buf(),
            logs: Mutex::new(HashMap::new()),
            schedulable: AtomicBool::new(true),
            sched: Notify::new(),
            requests: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            forbidden: Mutex::new(HashSet::new()),
            drop_gen,
            shutdown,
            tasks: Mutex::new(JoinSet::new()),
            ip_seq: AtomicU32::new(1),
            node_cpu,
            node_memory,
            node_cpu_text,
            node_memory_text,
        });
        let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server_config));
        shared.spawn(api::serve(shared.clone(), listener, acceptor));
        shared.spawn(kubelet::scheduler(shared.clone()));
        Ok(FakeCluster {
            shared,
            addr,
            ca_pem,
            tmp: Some(tmp),
            cleaned: false,
        })
    }

    /// The server URL: `https://127.0.0.1:PORT` (`http://` when TLS is off).
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The bearer token the API requires.
    pub fn token(&self) -> &str {
        &self.shared.config.token
    }

    /// The id of this cluster: the value of [`CLUSTER_LABEL`] on its Docker containers.
    pub fn cluster_id(&self) -> &str {
        &self.shared.cluster_id
    }

    /// A YAML kubeconfig with one cluster `fake` (server + `certificate-authority-data`),
    /// one user `fake` (the token) and the current context `fake` using `namespace`.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        use base64::Engine;
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let ca = self
            .ca_pem
            .as_ref()
            .map(|pem| {
                format!(
                    "    certificate-authority-data: {}\n",
                    base64::engine::general_purpose::STANDARD.encode(pem)
                )
            })
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n{ca}users:\n- name: fake\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {ns}\ncurrent-context: fake\npreferences: {{}}\n",
            server = q(&self.url()),
            token = q(&self.shared.config.token),
            ns = q(namespace),
        )
    }

    /// Writes [`FakeCluster::kubeconfig`] to `path` (mode 0600).
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(self.kubeconfig(namespace).as_bytes())
    }

    /// The CA certificate (PEM) that signed the server certificate; `None` without TLS.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// Every HTTP request received so far, in order of arrival of their answers' heads
    /// (method, path, query, status).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the recorded requests.
    pub fn reset_requests(&self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The pods of `namespace` as the API holds them now, sorted by name.
    pub fn pods(&self, namespace: &str) -> Vec<Pod> {
        let st = self.shared.store.lock();
        st.pods
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, e)| e.pod.clone())
            .collect()
    }

    /// The secrets of `namespace` as the API holds them now, sorted by name.
    pub fn secrets(&self, namespace: &str) -> Vec<Secret> {
        let st = self.shared.store.lock();
        st.secrets
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Ids of the Docker containers this cluster's kubelet created that still exist
    /// (found by [`CLUSTER_LABEL`]).
    pub fn docker_containers(&self) -> impl Future<Output = Vec<String>> + use<> {
        let docker = self.shared.docker.clone();
        let id = self.shared.cluster_id.clone();
        async move { docker::containers_of(&docker, &id).await }
    }

    /// Makes the next `rule.times` requests that match `rule` fail with `rule.status`.
    pub fn inject_failure(&self, rule: FailureRule) {
        self.shared
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rule);
    }

    /// Permanently answers 403 Forbidden to `verb` (`create`, `get`, `list`, `watch`,
    /// `delete`) on `resource` (`pods`, `secrets`, `namespaces`, `nodes`, `pods/log`).
    pub fn forbid(&self, verb: &str, resource: &str) {
        self.shared
            .forbidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((verb.to_string(), resource.to_string()));
    }

    /// Abruptly ends every open watch response: the connection is cut mid-stream, without
    /// an ERROR event or the terminating chunk.
    pub fn drop_watches(&self) {
        self.shared.drop_gen.send_modify(|g| *g += 1);
    }

    /// Forgets all watch event history: any watch resuming from a resourceVersion older
    /// than the current one gets a 410 Expired ERROR event.
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    /// When false, pods not yet scheduled stay Pending with condition PodScheduled=False,
    /// reason Unschedulable; when set back to true they get scheduled.
    pub fn set_schedulable(&self, yes: bool) {
        self.shared.schedulable.store(yes, Ordering::SeqCst);
        self.shared.sched.notify_one();
    }

    /// Loses the node as `how` says, returning once every pod on it was handled (for
    /// [`NodeLoss::DeletePods`]: removed from the API; for [`NodeLoss::FailPods`]: killed
    /// and marked Failed/NodeLost). The node itself stays Ready; new pods still schedule.
    pub async fn lose_node(&self, how: NodeLoss) {
        kubelet::lose_node(&self.shared, how).await;
    }

    /// Stops serving, kills and removes every Docker container of this cluster and
    /// removes its temp dir (emptyDir and PVC directories, logs).
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        let mut tasks =
            std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        self.finish_logs();
        docker::remove_all(&self.shared.docker, &self.shared.cluster_id).await;
        if let Some(tmp) = self.tmp.take() {
            let _ = tokio::task::spawn_blocking(move || tmp.close()).await;
        }
        self.cleaned = true;
    }

    fn finish_logs(&self) {
        let logs = self.shared.logs.lock().unwrap_or_else(|p| p.into_inner());
        for log in logs.values() {
            log.finish();
        }
    }
}

// The handle is shared across tasks and threads by tests.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FakeCluster>();
};

impl Drop for FakeCluster {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.shared.shutdown.send_replace(true);
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
        self.finish_logs();
        let id = self.shared.cluster_id.clone();
        let tmp = self.tmp.take();
        // A thread of its own with its own runtime: Drop may run inside (or outside) any
        // runtime, and the cluster's Docker client belongs to the caller's runtime.
        let cleanup = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                && let Ok(docker) = bollard::Docker::connect_with_defaults()
            {
                rt.block_on(docker::remove_all(&docker, &id));
            }
            drop(tmp);
        });
        let _ = cleanup.join();
    }
}
