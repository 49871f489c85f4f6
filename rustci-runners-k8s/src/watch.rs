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
