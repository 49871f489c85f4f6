//! One shared watch of the runner's pods, feeding every running job.
//!
//! A single `kube_runtime::watcher` (label selector `rustci.runner=<id>`) follows all pods
//! of the runner; each job subscribes to its pod's name and sees the latest state. The
//! watcher re-lists after a dropped connection or `410 Gone`; a pod that a job had seen
//! and that is missing from such a re-list was deleted meanwhile, and its job is told so.
//!
//! ```text
//!  subscribe(name) ──► Unknown ──ADDED/MODIFIED──► Present(pod) ──DELETED──► Gone
//!                         │                           ▲    │
//!                         └───────────────────────────┘    └─ absent after a re-list ─► Gone
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as make_watcher};
use tokio::sync::watch;

use crate::pod::CONTAINER;

/// What a job knows of its pod.
#[derive(Clone, Debug)]
pub(crate) enum PodState {
    /// Not seen yet.
    Unknown,
    /// The latest state.
    Present(Arc<Pod>),
    /// Deleted.
    Gone,
}

#[derive(Default)]
struct Shared {
    subscribers: Mutex<HashMap<String, watch::Sender<PodState>>>,
    /// The last watch error, cleared by the next event.
    error: Mutex<Option<String>>,
}

/// The shared watch; stops when dropped.
pub(crate) struct PodWatch {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A job's view of its pod; unsubscribes when dropped.
pub(crate) struct Subscription {
    shared: Arc<Shared>,
    name: String,
    pub(crate) rx: watch::Receiver<PodState>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared
            .subscribers
            .lock()
            .expect("watch lock")
            .remove(&self.name);
    }
}

impl PodWatch {
    /// Starts watching the pods of `api` that match `selector`.
    pub(crate) fn start(api: Api<Pod>, selector: &str) -> PodWatch {
        let shared = Arc::new(Shared::default());
        let config = watcher::Config::default().labels(selector);
        let stream = make_watcher(api, config).default_backoff().boxed();
        let task = tokio::spawn(run(stream, shared.clone()));
        PodWatch { shared, task }
    }

    /// Follows the pod called `name`; subscribe before creating it so no event is missed.
    /// `None` when a job of this runner already follows that name.
    pub(crate) fn subscribe(&self, name: &str) -> Option<Subscription> {
        let (tx, rx) = watch::channel(PodState::Unknown);
        let mut subscribers = self.shared.subscribers.lock().expect("watch lock");
        if subscribers.contains_key(name) {
            return None;
        }
        subscribers.insert(name.to_string(), tx);
        Some(Subscription {
            shared: self.shared.clone(),
            name: name.to_string(),
            rx,
        })
    }

    /// The last error of the watch, while it is failing.
    pub(crate) fn error(&self) -> Option<String> {
        self.shared.error.lock().expect("watch lock").clone()
    }
}

async fn run(
    mut stream: impl futures::Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin,
    shared: Arc<Shared>,
) {
    let mut listed: Option<HashSet<String>> = None;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(e) => {
                *shared.error.lock().expect("watch lock") = None;
                e
            }
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                *shared.error.lock().expect("watch lock") = Some(e.to_string());
                continue;
            }
        };
        let subscribers = shared.subscribers.lock().expect("watch lock");
        let send = |pod: &Pod, state: PodState| {
            if let Some(name) = &pod.metadata.name
                && let Some(tx) = subscribers.get(name)
            {
                tx.send_replace(state);
            }
        };
        match event {
            Event::Apply(pod) => {
                let pod = Arc::new(pod);
                send(&pod, PodState::Present(pod.clone()));
            }
            Event::Delete(pod) => send(&pod, PodState::Gone),
            Event::Init => listed = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let (Some(set), Some(name)) = (listed.as_mut(), &pod.metadata.name) {
                    set.insert(name.clone());
                }
                let pod = Arc::new(pod);
                send(&pod, PodState::Present(pod.clone()));
            }
            Event::InitDone => {
                let seen = listed.take().unwrap_or_default();
                for (name, tx) in subscribers.iter() {
                    let was_present = matches!(*tx.borrow(), PodState::Present(_));
                    if was_present && !seen.contains(name) {
                        tx.send_replace(PodState::Gone);
                    }
                }
            }
        }
    }
}

/// How the job container ended.
#[derive(Clone, Debug, Default)]
pub(crate) struct Terminated {
    pub(crate) code: i32,
    pub(crate) reason: String,
    pub(crate) message: String,
}

/// What the pod's status says about the job container.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// The container started (running or terminated).
    pub(crate) started: bool,
    /// The container is running now.
    pub(crate) running: bool,
    /// How it ended, once terminated.
    pub(crate) terminated: Option<Terminated>,
    /// Pod phase Failed with this pod-level reason (DeadlineExceeded, NodeLost, Evicted, …).
    pub(crate) pod_failed: Option<(String, String)>,
    /// The pod is done: phase Succeeded or Failed, or its job container ended while other
    /// containers (added by a patch) may run on.
    pub(crate) done: bool,
    /// Someone deleted the pod (it has a deletion timestamp).
    pub(crate) deleting: bool,
    /// Why it is still pending, in the cluster's words.
    pub(crate) pending: Option<String>,
    /// Pending for a reason that cannot resolve by waiting.
    pub(crate) hopeless: bool,
    pub(crate) gone: bool,
}

pub(crate) fn seen(state: &PodState) -> Seen {
    let mut s = Seen::default();
    let pod = match state {
        PodState::Unknown => return s,
        PodState::Gone => {
            s.gone = true;
            return s;
        }
        PodState::Present(p) => p,
    };
    s.deleting = pod.metadata.deletion_timestamp.is_some();
    let Some(status) = &pod.status else {
        return s;
    };
    let phase = status.phase.as_deref();
    s.done = matches!(phase, Some("Succeeded" | "Failed"));
    if phase == Some("Failed")
        && let Some(reason) = status.reason.as_ref().filter(|r| !r.is_empty())
    {
        s.pod_failed = Some((reason.clone(), status.message.clone().unwrap_or_default()));
    }
    let container = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER);
    if let Some(state) = container.and_then(|c| c.state.as_ref()) {
        if state.running.is_some() {
            s.started = true;
            s.running = true;
        }
        if let Some(t) = &state.terminated {
            s.started = true;
            s.terminated = Some(Terminated {
                code: t.exit_code,
                reason: t.reason.clone().unwrap_or_default(),
                message: t.message.clone().unwrap_or_default(),
            });
            let containers = pod.spec.as_ref().map_or(1, |spec| spec.containers.len());
            s.done |= containers > 1;
        }
        if let Some(w) = &state.waiting {
            let reason = w.reason.clone().unwrap_or_default();
            s.hopeless = matches!(reason.as_str(), "InvalidImageName" | "ErrImageNeverPull");
            s.pending = Some(match &w.message {
                Some(m) if !m.is_empty() => format!("{reason}: {m}"),
                _ => reason,
            });
        }
    }
    if s.pending.is_none()
        && !s.started
        && let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        s.pending = Some(format!(
            "{}: {}",
            c.reason.as_deref().unwrap_or("Unschedulable"),
            c.message
                .as_deref()
                .unwrap_or("the pod cannot be scheduled")
        ));
    }
    s
}
