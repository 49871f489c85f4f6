//! The scheduler and the kubelet: placing pods on the single node and running each
//! scheduled pod's containers on Docker, one worker task per pod, reacting to commands
//! (delete, retry, node loss) and container exits — no polling of the API objects.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, NodeSelectorRequirement, Pod, PodCondition,
    PodIP, PodSpec, Taint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::logs::{LogFile, Stream};
use crate::store::Key;
use crate::{CLUSTER_LABEL, NodeLoss, Shared, docker, quantity, validate};

/// A command to a pod's worker.
#[derive(Debug)]
pub(crate) enum PodCmd {
    /// The pod is being deleted with this grace period; `removed` = the API object is
    /// already gone (grace 0), so only clean up.
    Delete {
        /// Seconds between SIGTERM and SIGKILL.
        grace: u64,
        /// The object was already removed from the API.
        removed: bool,
    },
    /// Something the pod waits for may have changed (a secret): retry waiting containers.
    Retry,
    /// The node is lost; acknowledge when handled.
    Lose(NodeLoss, oneshot::Sender<()>),
}

/// The current time as a Kubernetes `Time`.
pub(crate) fn now() -> Time {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default();
    // Kubernetes timestamps have second precision on the wire.
    let secs = nanos / 1_000_000_000 * 1_000_000_000;
    Time(Timestamp::from_nanosecond(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn parse_docker_time(s: Option<&str>) -> Option<Time> {
    let s = s?;
    if s.starts_with("0001-") {
        return None;
    }
    s.parse::<Timestamp>().ok().map(Time)
}

/// Sets a pod condition, keeping lastTransitionTime when the status does not change.
pub(crate) fn set_condition(
    pod: &mut Pod,
    kind: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let conditions = pod
        .status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new);
    let reason = reason.map(str::to_string);
    let message = message.map(str::to_string);
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == kind) {
        if c.status != status {
            c.status = status.to_string();
            c.last_transition_time = Some(now());
        }
        c.reason = reason;
        c.message = message;
    } else {
        conditions.push(PodCondition {
            type_: kind.to_string(),
            status: status.to_string(),
            reason,
            message,
            last_transition_time: Some(now()),
            ..Default::default()
        });
    }
}

/// Summed cpu (cores) and memory (bytes) requests of a pod.
fn requests_of(spec: &PodSpec) -> (f64, f64) {
    let mut cpu = 0.0;
    let mut mem = 0.0;
    for c in &spec.containers {
        if let Some(r) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            cpu += r
                .get("cpu")
                .and_then(|q| quantity::parse(&q.0))
                .unwrap_or(0.0);
            mem += r
                .get("memory")
                .and_then(|q| quantity::parse(&q.0))
                .unwrap_or(0.0);
        }
    }
    (cpu, mem)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The labels of the node.
pub(crate) fn node_labels(shared: &Shared) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = BTreeMap::from([
        (
            "kubernetes.io/hostname".to_string(),
            shared.config.node_name.clone(),
        ),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), arch.to_string()),
    ]);
    labels.extend(shared.config.node_labels.clone());
    labels
}

fn expression_holds(e: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&e.key);
    let values = e.values.clone().unwrap_or_default();
    let int = |s: &str| s.parse::<i64>().ok();
    match e.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => match (
            value.and_then(|v| int(v)),
            values.first().and_then(|v| int(v)),
        ) {
            (Some(a), Some(b)) => a > b,
            _ => false,
        },
        "Lt" => match (
            value.and_then(|v| int(v)),
            values.first().and_then(|v| int(v)),
        ) {
            (Some(a), Some(b)) => a < b,
            _ => false,
        },
        _ => false,
    }
}

fn affinity_holds(shared: &Shared, spec: &PodSpec, labels: &BTreeMap<String, String>) -> bool {
    if let Some(sel) = &spec.node_selector
        && !sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let Some(required) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return true;
    };
    let fields = BTreeMap::from([("metadata.name".to_string(), shared.config.node_name.clone())]);
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.clone().unwrap_or_default();
        let field_exprs = term.match_fields.clone().unwrap_or_default();
        (!exprs.is_empty() || !field_exprs.is_empty())
            && exprs.iter().all(|e| expression_holds(e, labels))
            && field_exprs.iter().all(|e| expression_holds(e, &fields))
    })
}

fn tolerated(spec: &PodSpec, taint: &Taint) -> bool {
    spec.tolerations.iter().flatten().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.operator.as_deref() {
            Some("Exists") => t
                .key
                .as_deref()
                .is_none_or(|k| k.is_empty() || k == taint.key),
            _ => {
                t.key.as_deref() == Some(taint.key.as_str())
                    && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
        };
        effect_ok && key_ok
    })
}

/// Whether the pod fits the node given what is already used; the scheduler's message
/// otherwise.
fn fit(shared: &Shared, spec: &PodSpec, used: (f64, f64, usize)) -> Result<(), String> {
    const NOT_HELPFUL: &str =
        " preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.";
    if !shared.schedulable.load(Ordering::SeqCst) {
        return Err(format!(
            "0/1 nodes are available: 1 node(s) were unschedulable.{NOT_HELPFUL}"
        ));
    }
    for taint in &shared.config.node_taints {
        if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute") && !tolerated(spec, taint) {
            return Err(format!(
                "0/1 nodes are available: 1 node(s) had untolerated taint {{{}: {}}}.{NOT_HELPFUL}",
                taint.key,
                taint.value.as_deref().unwrap_or("")
            ));
        }
    }
    if !affinity_holds(shared, spec, &node_labels(shared)) {
        return Err(format!(
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.{NOT_HELPFUL}"
        ));
    }
    let (cpu, mem) = requests_of(spec);
    let mut short = Vec::new();
    if used.2 + 1 > 110 {
        short.push("1 Too many pods");
    }
    if used.0 + cpu > shared.node_cpu + 1e-9 {
        short.push("1 Insufficient cpu");
    }
    if used.1 + mem > shared.node_memory + 0.5 {
        short.push("1 Insufficient memory");
    }
    if !short.is_empty() {
        return Err(format!(
            "0/1 nodes are available: {}. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
            short.join(", ")
        ));
    }
    Ok(())
}

/// The scheduler: runs a pass whenever kicked (pod created or removed, schedulability
/// changed).
pub(crate) async fn scheduler(shared: Arc<Shared>) {
    loop {
        shared.sched.notified().await;
        schedule_pass(&shared);
    }
}

fn schedule_pass(shared: &Arc<Shared>) {
    let node = shared.config.node_name.clone();
    let mut spawn = Vec::new();
    {
        let mut st = shared.store.lock();
        let mut used = (0.0, 0.0, 0usize);
        let mut pending = Vec::new();
        for (key, e) in &st.pods {
            let spec = e.pod.spec.clone().unwrap_or_default();
            match spec.node_name.as_deref() {
                Some(n) => {
                    if n == node && !is_terminal(&e.pod) {
                        let (c, m) = requests_of(&spec);
                        used.0 += c;
                        used.1 += m;
                        used.2 += 1;
                    }
                    if n == node
                        && e.worker.is_none()
                        && e.pod.metadata.deletion_timestamp.is_none()
                    {
                        // Created with spec.nodeName: bypasses the scheduler.
                        pending.push((e.seq, key.clone(), true));
                    }
                }
                None if e.pod.metadata.deletion_timestamp.is_none() => {
                    pending.push((e.seq, key.clone(), false));
                }
                None => {}
            }
        }
        pending.sort_by_key(|p| p.0);
        for (_, key, bound) in pending {
            let Some(entry) = st.pods.get(&key) else {
                continue;
            };
            let uid = entry.pod.metadata.uid.clone().unwrap_or_default();
            let spec = entry.pod.spec.clone().unwrap_or_default();
            if !bound {
                match fit(shared, &spec, used) {
                    Ok(()) => {
                        let (c, m) = requests_of(&spec);
                        used.0 += c;
                        used.1 += m;
                        used.2 += 1;
                        st.modify_pod(&key, &uid, |p| {
                            p.spec.get_or_insert_with(Default::default).node_name =
                                Some(node.clone());
                            set_condition(p, "PodScheduled", "True", None, None);
                        });
                    }
                    Err(message) => {
                        st.modify_pod(&key, &uid, |p| {
                            set_condition(
                                p,
                                "PodScheduled",
                                "False",
                                Some("Unschedulable"),
                                Some(&message),
                            );
                        });
                        continue;
                    }
                }
            }
            let (tx, rx) = mpsc::unbounded_channel();
            if let Some(e) = st.pods.get_mut(&key) {
                e.worker = Some(tx);
                spawn.push((key, uid, e.pod.clone(), rx));
            }
        }
    }
    for (key, uid, pod, rx) in spawn {
        let worker = Worker::new(shared.clone(), key, uid, pod, rx);
        shared.spawn(worker.run());
    }
}

/// Tells every pod worker about a node loss and waits until all handled it.
pub(crate) async fn lose_node(shared: &Arc<Shared>, how: NodeLoss) {
    let workers: Vec<_> = {
        let st = shared.store.lock();
        st.pods.values().filter_map(|e| e.worker.clone()).collect()
    };
    let mut acks = Vec::new();
    for w in workers {
        let (tx, rx) = oneshot::channel();
        if w.send(PodCmd::Lose(how, tx)).is_ok() {
            acks.push(rx);
        }
    }
    for ack in acks {
        let _ = ack.await;
    }
}

/// Sends `cmd` to the workers of every pod in `namespace` (secret changes).
pub(crate) fn retry_namespace(shared: &Shared, namespace: &str) {
    let st = shared.store.lock();
    for ((ns, _), e) in &st.pods {
        if ns == namespace
            && let Some(w) = &e.worker
        {
            let _ = w.send(PodCmd::Retry);
        }
    }
}

/// Why a container is not started yet.
struct Waiting {
    reason: String,
    message: Option<String>,
    /// Retry after this long (image pulls); `None` = retry only when told to.
    backoff: Option<Duration>,
}

impl Waiting {
    fn new(reason: &str, message: impl Into<String>) -> Self {
        Waiting {
            reason: reason.into(),
            message: Some(message.into()),
            backoff: None,
        }
    }
}

/// How a container ended.
struct Exit {
    code: i64,
    oom: bool,
    started: Option<Time>,
    finished: Option<Time>,
    message: Option<String>,
}

/// Files of a secret volume: path -> (content, mode).
type SecretFiles = BTreeMap<String, (Vec<u8>, u32)>;

#[derive(Default)]
struct Slot {
    id: Option<String>,
    started: bool,
    running: bool,
    done: bool,
    pull_failures: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StopWhy {
    Deadline,
    Delete { removed: bool },
}

struct Stopping {
    why: StopWhy,
    kill_at: Instant,
    killed: bool,
}

/// The per-pod kubelet worker.
struct Worker {
    shared: Arc<Shared>,
    key: Key,
    uid: String,
    pod: Pod,
    spec: PodSpec,
    rx: mpsc::UnboundedReceiver<PodCmd>,
    exit_tx: mpsc::UnboundedSender<(usize, Exit)>,
    exit_rx: mpsc::UnboundedReceiver<(usize, Exit)>,
    slots: Vec<Slot>,
    pod_dir: PathBuf,
    volumes: Option<HashMap<String, (PathBuf, bool)>>,
    retry_at: Option<Instant>,
    deadline: Option<Instant>,
    stopping: Option<Stopping>,
    finished: bool,
    lost: bool,
    acks: Vec<oneshot::Sender<()>>,
    pod_ip: String,
}

fn ready_unready(pod: &mut Pod) {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
        set_condition(pod, "ContainersReady", "False", Some("PodCompleted"), None);
        set_condition(pod, "Ready", "False", Some("PodCompleted"), None);
        return;
    }
    let unready: Vec<String> = statuses
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.clone())
        .collect();
    if unready.is_empty() && !statuses.is_empty() {
        set_condition(pod, "ContainersReady", "True", None, None);
        set_condition(pod, "Ready", "True", None, None);
    } else {
        let message = format!("containers with unready status: [{}]", unready.join(" "));
        set_condition(
            pod,
            "ContainersReady",
            "False",
            Some("ContainersNotReady"),
            Some(&message),
        );
        set_condition(
            pod,
            "Ready",
            "False",
            Some("ContainersNotReady"),
            Some(&message),
        );
    }
}

/// Recomputes the phase (restartPolicy Never) and the readiness conditions from the
/// container statuses.
fn refresh_phase(pod: &mut Pod) {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let state = |s: &ContainerStatus| s.state.clone().unwrap_or_default();
    let waiting = statuses
        .iter()
        .filter(|s| state(s).waiting.is_some())
        .count();
    let running = statuses
        .iter()
        .filter(|s| state(s).running.is_some())
        .count();
    let failed = statuses
        .iter()
        .filter(|s| state(s).terminated.is_some_and(|t| t.exit_code != 0))
        .count();
    let phase = if waiting > 0 || statuses.is_empty() {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if failed > 0 {
        "Failed"
    } else {
        "Succeeded"
    };
    let status = pod.status.get_or_insert_with(Default::default);
    if !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        status.phase = Some(phase.to_string());
    }
    ready_unready(pod);
}

/// Marks the pod failed by its active deadline.
fn deadline_exceeded(p: &mut Pod) {
    let s = p.status.get_or_insert_with(Default::default);
    s.phase = Some("Failed".into());
    s.reason = Some("DeadlineExceeded".into());
    s.message = Some("Pod was active on the node longer than the specified deadline".into());
}

fn fs_group_dir(path: &std::path::Path, group: Option<i64>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g as u32))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o2775))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    }
    Ok(())
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        key: Key,
        uid: String,
        pod: Pod,
        rx: mpsc::UnboundedReceiver<PodCmd>,
    ) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        let n = spec.containers.len();
        let pod_dir = shared.dir.join("pods").join(&uid);
        let seq = shared.ip_seq.fetch_add(1, Ordering::Relaxed);
        let pod_ip = format!("10.244.{}.{}", (seq / 250) % 250, seq % 250 + 2);
        Worker {
            shared,
            key,
            uid,
            pod,
            spec,
            rx,
            exit_tx,
            exit_rx,
            slots: (0..n).map(|_| Slot::default()).collect(),
            pod_dir,
            volumes: None,
            retry_at: None,
            deadline: None,
            stopping: None,
            finished: false,
            lost: false,
            acks: Vec::new(),
            pod_ip,
        }
    }

    /// Applies `change` to the API object (then recomputes phase and conditions unless the
    /// node was lost).
    fn update(&self, change: impl FnOnce(&mut Pod)) -> Option<Pod> {
        let lost = self.lost;
        self.shared
            .store
            .lock()
            .modify_pod(&self.key, &self.uid, |p| {
                change(p);
                if !lost {
                    refresh_phase(p);
                }
            })
    }

    fn update_container(&self, i: usize, change: impl FnOnce(&mut ContainerStatus)) {
        if self.lost {
            return;
        }
        self.update(|p| {
            if let Some(s) = p
                .status
                .as_mut()
                .and_then(|s| s.container_statuses.as_mut())
                .and_then(|c| c.get_mut(i))
            {
                change(s);
            }
        });
    }

    fn set_waiting(&self, i: usize, w: &Waiting) {
        let state = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(w.reason.clone()),
                message: w.message.clone(),
            }),
            ..Default::default()
        };
        self.update_container(i, |s| s.state = Some(state));
    }

    async fn run(mut self) {
        let container_statuses: Vec<ContainerStatus> = self
            .spec
            .containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                ready: false,
                restart_count: 0,
                started: Some(false),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("ContainerCreating".into()),
                        message: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let pod_ip = self.pod_ip.clone();
        let started = self.update(|p| {
            let s = p.status.get_or_insert_with(Default::default);
            s.start_time = Some(now());
            s.host_ip = Some("127.0.0.1".into());
            s.host_ips = Some(vec![HostIP {
                ip: "127.0.0.1".into(),
            }]);
            s.pod_ip = Some(pod_ip.clone());
            s.pod_ips = Some(vec![PodIP { ip: pod_ip.clone() }]);
            s.container_statuses = Some(container_statuses);
            set_condition(p, "PodReadyToStartContainers", "True", None, None);
            set_condition(p, "Initialized", "True", None, None);
        });
        let Some(pod) = started else {
            // Deleted before the worker ran.
            self.cleanup().await;
            return;
        };
        self.pod = pod;
        self.deadline = self
            .spec
            .active_deadline_seconds
            .map(|s| Instant::now() + Duration::from_secs(s.max(0) as u64));
        let mut retry_now = true;
        let mut rx_closed = false;
        loop {
            if self.shared.is_shutting_down() {
                return;
            }
            // Commands first (a delete that raced with scheduling must not start anything).
            while !rx_closed && let Ok(cmd) = self.rx.try_recv() {
                retry_now |= self.on_cmd(cmd).await;
            }
            if retry_now && self.stopping.is_none() && !self.finished {
                retry_now = false;
                self.start_pending().await;
            }
            if self.stopping.is_some() && !self.slots.iter().any(|s| s.running) {
                if self.finish_stop().await {
                    return;
                }
                continue;
            }
            let far = Instant::now() + Duration::from_secs(86400 * 365);
            let kill_at = self
                .stopping
                .as_ref()
                .filter(|s| !s.killed)
                .map(|s| s.kill_at);
            let retry_at = self
                .retry_at
                .filter(|_| self.stopping.is_none() && !self.finished);
            let deadline = self
                .deadline
                .filter(|_| self.stopping.is_none() && !self.finished);
            tokio::select! {
                cmd = self.rx.recv(), if !rx_closed => match cmd {
                    // The API object is gone (a grace-0 delete already sent its command,
                    // or the store dropped the pod): stop and clean up.
                    None => {
                        rx_closed = true;
                        self.begin_stop(StopWhy::Delete { removed: true }, 0).await;
                    }
                    Some(cmd) => retry_now |= self.on_cmd(cmd).await,
                },
                Some((i, exit)) = self.exit_rx.recv() => self.on_exit(i, exit),
                _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    self.signal_all("SIGKILL").await;
                    if let Some(s) = self.stopping.as_mut() {
                        s.killed = true;
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {
                    self.retry_at = None;
                    retry_now = true;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    self.deadline = None;
                    let grace = self.spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64;
                    self.begin_stop(StopWhy::Deadline, grace).await;
                }
            }
        }
    }

    async fn on_cmd(&mut self, cmd: PodCmd) -> bool {
        match cmd {
            PodCmd::Delete { grace, removed } => {
                self.begin_stop(StopWhy::Delete { removed }, grace).await;
                false
            }
            PodCmd::Retry => true,
            PodCmd::Lose(NodeLoss::DeletePods, ack) => {
                // The node is gone: the pod garbage collector removes the API object,
                // and no kubelet reports how its containers ended.
                self.lost = true;
                let _ = self.shared.store.lock().remove_pod(&self.key, &self.uid);
                self.shared.sched.notify_one();
                self.acks.push(ack);
                self.begin_stop(StopWhy::Delete { removed: true }, 0).await;
                false
            }
            PodCmd::Lose(NodeLoss::FailPods, ack) => {
                let name = self.key.1.clone();
                let node = self.shared.config.node_name.clone();
                if !self.lost {
                    self.signal_all("SIGKILL").await;
                    self.update(|p| {
                        let s = p.status.get_or_insert_with(Default::default);
                        s.phase = Some("Failed".into());
                        s.reason = Some("NodeLost".into());
                        s.message = Some(format!(
                            "Node {node} which was running pod {name} is unresponsive"
                        ));
                        ready_unready(p);
                    });
                    self.lost = true;
                    self.finished = true;
                    self.shared.sched.notify_one();
                }
                let _ = ack.send(());
                false
            }
        }
    }

    async fn signal_all(&self, signal: &str) {
        let ids: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.running)
            .filter_map(|s| s.id.clone())
            .collect();
        let docker = &self.shared.docker;
        futures::future::join_all(ids.iter().map(|id| docker::signal(docker, id, signal))).await;
    }

    async fn begin_stop(&mut self, why: StopWhy, grace: u64) {
        let kill_at = Instant::now() + Duration::from_secs(grace);
        match self.stopping.as_mut() {
            Some(s) => {
                s.why = match (s.why, why) {
                    (StopWhy::Delete { removed: a }, StopWhy::Delete { removed: b }) => {
                        StopWhy::Delete { removed: a || b }
                    }
                    (StopWhy::Delete { removed }, StopWhy::Deadline) => StopWhy::Delete { removed },
                    (StopWhy::Deadline, w) => w,
                };
                if kill_at < s.kill_at {
                    s.kill_at = kill_at;
                }
            }
            None => {
                self.stopping = Some(Stopping {
                    why,
                    kill_at,
                    killed: false,
                });
                if grace > 0 {
                    self.signal_all("SIGTERM").await;
                }
            }
        }
        if grace == 0
            && let Some(s) = self.stopping.as_mut()
            && !s.killed
        {
            s.killed = true;
            self.signal_all("SIGKILL").await;
        }
    }

    /// Every container stopped: finish what the stop was for. True = the worker is done.
    async fn finish_stop(&mut self) -> bool {
        let Some(stopping) = self.stopping.take() else {
            return false;
        };
        match stopping.why {
            StopWhy::Deadline => {
                self.update(deadline_exceeded);
                self.finished = true;
                self.shared.sched.notify_one();
                false
            }
            StopWhy::Delete { removed } => {
                self.cleanup().await;
                if !removed {
                    self.shared.store.lock().remove_pod(&self.key, &self.uid);
                }
                self.shared.sched.notify_one();
                for ack in self.acks.drain(..) {
                    let _ = ack.send(());
                }
                true
            }
        }
    }

    /// Removes the pod's containers, volumes and logs.
    async fn cleanup(&mut self) {
        let docker = &self.shared.docker;
        let ids: Vec<String> = self.slots.iter().filter_map(|s| s.id.clone()).collect();
        futures::future::join_all(ids.iter().map(|id| docker::remove(docker, id))).await;
        let logs: Vec<Arc<LogFile>> = {
            let mut all = self.shared.logs.lock().unwrap_or_else(|p| p.into_inner());
            self.spec
                .containers
                .iter()
                .filter_map(|c| all.remove(&(self.uid.clone(), c.name.clone())))
                .collect()
        };
        for log in &logs {
            log.finish();
        }
        let pod_dir = self.pod_dir.clone();
        let log_dir = self.shared.dir.join("logs").join(&self.uid);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(pod_dir);
            let _ = std::fs::remove_dir_all(log_dir);
        })
        .await;
    }

    fn on_exit(&mut self, i: usize, exit: Exit) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.running = false;
        slot.done = true;
        let id = slot.id.clone();
        let reason = if exit.oom {
            "OOMKilled"
        } else if exit.code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let terminated = ContainerStateTerminated {
            exit_code: exit.code as i32,
            reason: Some(reason.into()),
            message: exit.message,
            started_at: exit.started,
            finished_at: exit.finished.or_else(|| Some(now())),
            container_id: id.map(|id| format!("docker://{id}")),
            signal: None,
        };
        // The last container stopped by the deadline: the pod fails with the reason in the
        // same update, so nobody sees a Failed phase without it.
        let deadline_done = self
            .stopping
            .as_ref()
            .is_some_and(|s| s.why == StopWhy::Deadline)
            && !self.slots.iter().any(|s| s.running);
        if self.lost {
            return;
        }
        self.update(|p| {
            if let Some(s) = p
                .status
                .as_mut()
                .and_then(|s| s.container_statuses.as_mut())
                .and_then(|c| c.get_mut(i))
            {
                s.state = Some(ContainerState {
                    terminated: Some(terminated),
                    ..Default::default()
                });
                s.ready = false;
                s.started = Some(false);
            }
            if deadline_done {
                deadline_exceeded(p);
            }
        });
        let terminal = self
            .shared
            .store
            .lock()
            .pods
            .get(&self.key)
            .is_some_and(|p| is_terminal(&p.pod));
        if terminal && !self.finished {
            self.finished = true;
            // Its requests no longer count: pending pods may fit now.
            self.shared.sched.notify_one();
        }
    }

    /// Tries to start every container not started yet, in order.
    async fn start_pending(&mut self) {
        if self.volumes.is_none() {
            match self.prepare_volumes().await {
                Ok(v) => self.volumes = Some(v),
                Err(w) => {
                    for i in 0..self.slots.len() {
                        self.set_waiting(i, &w);
                    }
                    if let Some(b) = w.backoff {
                        self.retry_at = Some(Instant::now() + b);
                    }
                    return;
                }
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].started || self.slots[i].done {
                continue;
            }
            if self.shared.is_shutting_down() {
                return;
            }
            match self.start_container(i).await {
                Ok(()) => {}
                Err(w) => {
                    self.set_waiting(i, &w);
                    if let Some(b) = w.backoff {
                        let at = Instant::now() + b;
                        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                    }
                }
            }
        }
    }

    async fn prepare_volumes(&self) -> Result<HashMap<String, (PathBuf, bool)>, Waiting> {
        let fs_group = self.spec.security_context.as_ref().and_then(|s| s.fs_group);
        let mut out = HashMap::new();
        let mut work: Vec<(PathBuf, Option<SecretFiles>)> = Vec::new();
        for v in self.spec.volumes.iter().flatten() {
            if v.empty_dir.is_some() {
                let path = self.pod_dir.join("volumes").join(&v.name);
                work.push((path.clone(), None));
                out.insert(v.name.clone(), (path, false));
            } else if let Some(pvc) = &v.persistent_volume_claim {
                let path = self.shared.dir.join("pvc").join(&pvc.claim_name);
                work.push((path.clone(), None));
                out.insert(v.name.clone(), (path, pvc.read_only.unwrap_or(false)));
            } else if let Some(h) = &v.host_path {
                out.insert(v.name.clone(), (PathBuf::from(&h.path), false));
            } else if let Some(sv) = &v.secret {
                let secret_name = sv.secret_name.clone().unwrap_or_default();
                let secret = self
                    .shared
                    .store
                    .lock()
                    .secrets
                    .get(&(self.key.0.clone(), secret_name.clone()))
                    .cloned();
                let default_mode = sv.default_mode.unwrap_or(0o644) as u32;
                let mut files = BTreeMap::new();
                match secret {
                    None if sv.optional == Some(true) => {}
                    None => {
                        return Err(Waiting {
                            reason: "ContainerCreating".into(),
                            message: Some(format!(
                                "MountVolume.SetUp failed for volume \"{}\" : secret \"{secret_name}\" not found",
                                v.name
                            )),
                            backoff: Some(Duration::from_secs(2)),
                        });
                    }
                    Some(s) => {
                        let data = s.data.unwrap_or_default();
                        match &sv.items {
                            Some(items) => {
                                for item in items {
                                    match data.get(&item.key) {
                                        Some(b) => {
                                            let mode =
                                                item.mode.map(|m| m as u32).unwrap_or(default_mode);
                                            files.insert(item.path.clone(), (b.0.clone(), mode));
                                        }
                                        None if sv.optional == Some(true) => {}
                                        None => {
                                            return Err(Waiting::new(
                                                "CreateContainerConfigError",
                                                format!(
                                                    "couldn't find key {} in Secret {}/{secret_name}",
                                                    item.key, self.key.0
                                                ),
                                            ));
                                        }
                                    }
                                }
                            }
                            None => {
                                for (k, b) in data {
                                    files.insert(k, (b.0, default_mode));
                                }
                            }
                        }
                    }
                }
                let path = self.pod_dir.join("secrets").join(&v.name);
                work.push((path.clone(), Some(files)));
                out.insert(v.name.clone(), (path, true));
            } else {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!(
                        "volume \"{}\": only emptyDir, persistentVolumeClaim, hostPath and secret volumes are supported by rustci-k8s-fake",
                        v.name
                    ),
                ));
            }
        }
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            for (path, files) in work {
                match files {
                    None => fs_group_dir(&path, fs_group)?,
                    Some(files) => {
                        std::fs::create_dir_all(&path)?;
                        for (name, (data, mode)) in files {
                            let file = path.join(&name);
                            if let Some(parent) = file.parent() {
                                std::fs::create_dir_all(parent)?;
                            }
                            std::fs::write(&file, data)?;
                            std::fs::set_permissions(
                                &file,
                                std::fs::Permissions::from_mode(mode & 0o7777),
                            )?;
                            if let Some(g) = fs_group {
                                std::os::unix::fs::chown(&file, None, Some(g as u32))?;
                            }
                        }
                    }
                }
            }
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) => Err(Waiting::new(
                "CreateContainerConfigError",
                format!("cannot set up the pod's volumes: {e}"),
            )),
            Err(e) => Err(Waiting::new("CreateContainerConfigError", e.to_string())),
        }
    }

    fn env(&self, c: &Container) -> Result<Vec<String>, Waiting> {
        let ns = &self.key.0;
        let st = self.shared.store.lock();
        let mut env: Vec<(String, String)> = Vec::new();
        let mut put = |k: String, v: String| {
            if let Some(e) = env.iter_mut().find(|(ek, _)| *ek == k) {
                e.1 = v;
            } else {
                env.push((k, v));
            }
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.secret_ref {
                match st.secrets.get(&(ns.clone(), r.name.clone())) {
                    Some(s) => {
                        for (k, v) in s.data.clone().unwrap_or_default() {
                            put(format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into());
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => {
                        return Err(Waiting::new(
                            "CreateContainerConfigError",
                            format!("secret \"{}\" not found", r.name),
                        ));
                    }
                }
            }
            if let Some(r) = &from.config_map_ref
                && r.optional != Some(true)
            {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!("configmap \"{}\" not found", r.name),
                ));
            }
        }
        for e in c.env.iter().flatten() {
            let value = match &e.value_from {
                None => Some(e.value.clone().unwrap_or_default()),
                Some(from) => {
                    if let Some(r) = &from.secret_key_ref {
                        let optional = r.optional == Some(true);
                        match st.secrets.get(&(ns.clone(), r.name.clone())) {
                            None if optional => None,
                            None => {
                                return Err(Waiting::new(
                                    "CreateContainerConfigError",
                                    format!("secret \"{}\" not found", r.name),
                                ));
                            }
                            Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                                Some(v) => Some(String::from_utf8_lossy(&v.0).into_owned()),
                                None if optional => None,
                                None => {
                                    return Err(Waiting::new(
                                        "CreateContainerConfigError",
                                        format!(
                                            "couldn't find key {} in Secret {ns}/{}",
                                            r.key, r.name
                                        ),
                                    ));
                                }
                            },
                        }
                    } else if let Some(f) = &from.field_ref {
                        Some(match f.field_path.as_str() {
                            "metadata.name" => self.key.1.clone(),
                            "metadata.namespace" => ns.clone(),
                            "metadata.uid" => self.uid.clone(),
                            "spec.nodeName" => self.shared.config.node_name.clone(),
                            "spec.serviceAccountName" => {
                                self.spec.service_account_name.clone().unwrap_or_default()
                            }
                            "status.podIP" => self.pod_ip.clone(),
                            "status.hostIP" => "127.0.0.1".into(),
                            _ => String::new(),
                        })
                    } else if let Some(r) = &from.config_map_key_ref {
                        if r.optional == Some(true) {
                            None
                        } else {
                            return Err(Waiting::new(
                                "CreateContainerConfigError",
                                format!("configmap \"{}\" not found", r.name),
                            ));
                        }
                    } else {
                        Some(String::new())
                    }
                }
            };
            if let Some(v) = value {
                put(e.name.clone(), v);
            }
        }
        Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
    }

    fn binds(&self, c: &Container) -> Result<Vec<String>, Waiting> {
        let volumes = self.volumes.clone().unwrap_or_default();
        let mut binds = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some((host, ro)) = volumes.get(&m.name) else {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!("volume \"{}\" not found", m.name),
                ));
            };
            let mut host = host.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                host = host.join(sub);
                if !host.exists()
                    && let Err(e) = std::fs::create_dir_all(&host)
                {
                    return Err(Waiting::new(
                        "CreateContainerConfigError",
                        format!(
                            "failed to create subPath directory for volumeMount \"{}\": {e}",
                            m.name
                        ),
                    ));
                }
            }
            let ro = *ro || m.read_only == Some(true);
            binds.push(format!(
                "{}:{}{}",
                host.display(),
                m.mount_path,
                if ro { ":ro" } else { "" }
            ));
        }
        Ok(binds)
    }

    async fn start_container(&mut self, i: usize) -> Result<(), Waiting> {
        let c = self.spec.containers[i].clone();
        let image = c.image.clone().unwrap_or_default();
        if !validate::is_image_reference(&image) {
            return Err(Waiting::new(
                "InvalidImageName",
                format!(
                    "Failed to apply default image tag \"{image}\": couldn't parse image name \"{image}\": invalid reference format"
                ),
            ));
        }
        let docker = self.shared.docker.clone();
        let info = match docker.inspect_image(&image).await {
            Ok(info) => info,
            Err(e) => {
                let slot = &mut self.slots[i];
                if docker::is_not_found(&e) && c.image_pull_policy.as_deref() == Some("Never") {
                    return Err(Waiting::new(
                        "ErrImageNeverPull",
                        format!(
                            "Container image \"{image}\" is not present with pull policy of Never"
                        ),
                    ));
                }
                slot.pull_failures += 1;
                let n = slot.pull_failures;
                let why = if docker::is_not_found(&e) {
                    format!(
                        "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": {image}: not found"
                    )
                } else {
                    format!("failed to pull and unpack image \"{image}\": {e}")
                };
                return Err(if n == 1 {
                    Waiting {
                        reason: "ErrImagePull".into(),
                        message: Some(why),
                        backoff: Some(Duration::from_secs(1)),
                    }
                } else {
                    Waiting {
                        reason: "ImagePullBackOff".into(),
                        message: Some(format!("Back-off pulling image \"{image}\"")),
                        backoff: Some(Duration::from_secs((5u64 << (n - 2).min(6)).min(300))),
                    }
                });
            }
        };
        let env = self.env(&c)?;
        let binds = self.binds(&c)?;
        let pod_sc = self.spec.security_context.clone().unwrap_or_default();
        let sc = c.security_context.clone().unwrap_or_default();
        let run_as_user = sc.run_as_user.or(pod_sc.run_as_user);
        let run_as_group = sc.run_as_group.or(pod_sc.run_as_group);
        let run_as_non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root);
        let image_user = info
            .config
            .as_ref()
            .and_then(|c| c.user.clone())
            .unwrap_or_default();
        let pod_ref = format!("{}_{}({})", self.key.1, self.key.0, self.uid);
        if run_as_non_root == Some(true) {
            let user_part = image_user.split(':').next().unwrap_or("").to_string();
            match run_as_user {
                Some(0) => {
                    return Err(Waiting::new(
                        "CreateContainerConfigError",
                        format!(
                            "container has runAsNonRoot and image will run as root (pod: \"{pod_ref}\", container: {})",
                            c.name
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    if user_part.is_empty() || user_part == "0" || user_part == "root" {
                        return Err(Waiting::new(
                            "CreateContainerConfigError",
                            format!(
                                "container has runAsNonRoot and image will run as root (pod: \"{pod_ref}\", container: {})",
                                c.name
                            ),
                        ));
                    }
                    if user_part.parse::<u32>().is_err() {
                        return Err(Waiting::new(
                            "CreateContainerConfigError",
                            format!(
                                "container has runAsNonRoot and image has non-numeric user ({user_part}), cannot verify user is non-root (pod: \"{pod_ref}\", container: {})",
                                c.name
                            ),
                        ));
                    }
                }
            }
        }
        let user = match (run_as_user, run_as_group) {
            (Some(u), Some(g)) => Some(format!("{u}:{g}")),
            (Some(u), None) => Some(u.to_string()),
            (None, Some(g)) => {
                let u = image_user.split(':').next().unwrap_or("");
                Some(format!("{}:{g}", if u.is_empty() { "0" } else { u }))
            }
            (None, None) => None,
        };
        let mut groups: Vec<String> = pod_sc
            .supplemental_groups
            .iter()
            .flatten()
            .map(|g| g.to_string())
            .collect();
        if let Some(g) = pod_sc.fs_group {
            groups.push(g.to_string());
        }
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        let requests = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone())
            .unwrap_or_default();
        let memory = limits
            .get("memory")
            .and_then(|q| quantity::parse(&q.0))
            .map(|m| m as i64);
        let nano_cpus = limits
            .get("cpu")
            .and_then(|q| quantity::parse(&q.0))
            .map(|c| (c * 1e9) as i64)
            .filter(|n| *n > 0);
        let cpu_shares = requests
            .get("cpu")
            .and_then(|q| quantity::parse(&q.0))
            .map(|c| ((c * 1024.0) as i64).max(2));
        let caps = sc.capabilities.clone().unwrap_or_default();
        let mut security_opt = Vec::new();
        if sc.allow_privilege_escalation == Some(false) {
            security_opt.push("no-new-privileges".to_string());
        }
        let labels = HashMap::from([
            (CLUSTER_LABEL.to_string(), self.shared.cluster_id.clone()),
            ("rustci.fake.pod-namespace".to_string(), self.key.0.clone()),
            ("rustci.fake.pod-name".to_string(), self.key.1.clone()),
            ("rustci.fake.pod-uid".to_string(), self.uid.clone()),
            ("rustci.fake.container".to_string(), c.name.clone()),
        ]);
        let mut hostname = self.key.1.clone();
        hostname.truncate(63);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: c.command.clone(),
            cmd: c.args.clone(),
            env: Some(env),
            working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
            labels: Some(labels),
            user,
            hostname: Some(hostname.trim_end_matches(['-', '.']).to_string()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(HostConfig {
                binds: Some(binds),
                memory,
                memory_swap: memory,
                nano_cpus,
                cpu_shares,
                network_mode: Some(self.shared.config.network_mode.clone()),
                readonly_rootfs: sc.read_only_root_filesystem,
                security_opt: (!security_opt.is_empty()).then_some(security_opt),
                privileged: sc.privileged,
                cap_add: caps.add.clone(),
                cap_drop: caps.drop.clone(),
                group_add: (!groups.is_empty()).then_some(groups),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!(
            "k8s_{}_{}_{}_{}_0",
            c.name, self.key.1, self.key.0, self.uid
        );
        let (id, mut output) = docker::create_attached(&docker, Some(name), body)
            .await
            .map_err(|e| Waiting::new("CreateContainerError", e))?;
        self.slots[i].id = Some(id.clone());
        let log_path = self
            .shared
            .dir
            .join("logs")
            .join(&self.uid)
            .join(format!("{}.log", c.name));
        let (log, mut writer) = LogFile::create(log_path).await.map_err(|e| {
            Waiting::new(
                "CreateContainerError",
                format!("cannot create the log file: {e}"),
            )
        })?;
        self.shared
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((self.uid.clone(), c.name.clone()), log);
        let (pump_tx, pump_rx) = oneshot::channel::<()>();
        self.shared.spawn(async move {
            while let Some(item) = output.next().await {
                let written = match item {
                    Ok(bollard::container::LogOutput::StdOut { message })
                    | Ok(bollard::container::LogOutput::Console { message }) => {
                        writer.write(Stream::Stdout, &message).await
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        writer.write(Stream::Stderr, &message).await
                    }
                    Ok(_) => Ok(()),
                    Err(_) => break,
                };
                if written.is_err() {
                    break;
                }
            }
            writer.close().await;
            let _ = pump_tx.send(());
        });
        self.slots[i].started = true;
        let image_id = info.id.clone().unwrap_or_default();
        if let Err(message) = docker::start(&docker, &id).await {
            // As containerd reports it: terminated, exit code 128, reason StartError.
            self.slots[i].done = true;
            let cid = format!("docker://{id}");
            self.update_container(i, |s| {
                s.container_id = Some(cid.clone());
                s.image_id = image_id;
                s.state = Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 128,
                        reason: Some("StartError".into()),
                        message: Some(message),
                        container_id: Some(cid),
                        finished_at: Some(now()),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            });
            return Ok(());
        }
        self.slots[i].running = true;
        let started_at = docker::state(&docker, &id)
            .await
            .and_then(|s| parse_docker_time(s.started_at.as_deref()))
            .or_else(|| Some(now()));
        let cid = format!("docker://{id}");
        self.update_container(i, |s| {
            s.container_id = Some(cid);
            s.image_id = image_id;
            s.ready = true;
            s.started = Some(true);
            s.state = Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: started_at.clone(),
                }),
                ..Default::default()
            });
        });
        let tx = self.exit_tx.clone();
        self.shared.spawn(async move {
            let state = docker::wait_exit(&docker, &id).await;
            // The log is complete before the exit is reported.
            let _ = tokio::time::timeout(Duration::from_secs(30), pump_rx).await;
            let state = match state {
                Some(s) if s.running != Some(true) => {
                    docker::state(&docker, &id).await.unwrap_or(s)
                }
                other => other.unwrap_or_default(),
            };
            let exit = Exit {
                code: state.exit_code.unwrap_or(-1),
                oom: state.oom_killed == Some(true),
                started: parse_docker_time(state.started_at.as_deref()).or(started_at),
                finished: parse_docker_time(state.finished_at.as_deref()),
                message: state.error.filter(|e| !e.is_empty()),
            };
            let _ = tx.send((i, exit));
        });
        Ok(())
    }
}
