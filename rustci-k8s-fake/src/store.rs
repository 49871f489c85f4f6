//! The object store: namespaces, pods and secrets, one global resourceVersion counter, the
//! event history kept for watch resumption and the broadcast every watch listens to.
//!
//! All state sits behind one `std::sync::Mutex` that is only held for in-memory work —
//! never across an `.await` or a Docker call.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use tokio::sync::{broadcast, mpsc};

use crate::kubelet::PodCmd;
use crate::selector::Fields;
use crate::status::ApiError;

/// `(namespace, name)`.
pub(crate) type Key = (String, String);

/// The watchable resource types.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// `pods`
    Pod,
    /// `secrets`
    Secret,
}

impl Kind {
    /// The `kind` of one object.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Secret => "Secret",
        }
    }

    /// The resource (plural) name.
    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Secret => "secrets",
        }
    }
}

/// The type of a change.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed (the object is its last state, with a new resourceVersion).
    Deleted,
}

impl EventType {
    /// The watch event `type`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as retained in the history and broadcast to watches.
#[derive(Debug)]
pub(crate) struct Event {
    /// The resourceVersion this change produced.
    pub rv: u64,
    /// Which resource.
    pub kind: Kind,
    /// What happened.
    pub etype: EventType,
    /// Selector fields before the change (modifications only).
    pub prev: Option<Fields>,
    /// Selector fields after the change.
    pub cur: Fields,
    /// The object's JSON.
    pub object: Bytes,
}

/// A pod as the store holds it.
pub(crate) struct PodEntry {
    /// The API object.
    pub pod: Pod,
    /// Creation order, for scheduling fairness.
    pub seq: u64,
    /// The kubelet worker of a scheduled pod.
    pub worker: Option<mpsc::UnboundedSender<PodCmd>>,
}

/// What a new watch starts from.
pub(crate) struct WatchStart {
    /// Synthetic ADDED objects (resourceVersion absent/"0", or initial events requested).
    pub initial: Vec<(Fields, Bytes)>,
    /// Retained events after the requested resourceVersion.
    pub backlog: Vec<Arc<Event>>,
    /// Live events after `backlog`.
    pub rx: broadcast::Receiver<Arc<Event>>,
    /// The resourceVersion the watch is up to date with once `initial` + `backlog` are sent.
    pub rv: u64,
}

/// Everything behind the store's lock.
pub(crate) struct Inner {
    rv: u64,
    min_rv: u64,
    history: VecDeque<Arc<Event>>,
    cap: usize,
    tx: broadcast::Sender<Arc<Event>>,
    seq: u64,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by key.
    pub pods: BTreeMap<Key, PodEntry>,
    /// Secrets by key.
    pub secrets: BTreeMap<Key, Secret>,
}

/// The store.
pub(crate) struct Store {
    inner: Mutex<Inner>,
}

/// Selector fields of a pod.
pub(crate) fn pod_fields(pod: &Pod) -> Fields {
    Fields {
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
    }
}

/// Selector fields of a secret.
pub(crate) fn secret_fields(secret: &Secret) -> Fields {
    Fields {
        name: secret.metadata.name.clone().unwrap_or_default(),
        namespace: secret.metadata.namespace.clone().unwrap_or_default(),
        labels: secret.metadata.labels.clone().unwrap_or_default(),
        phase: None,
        node_name: None,
    }
}

fn json(value: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

impl Store {
    /// An empty store keeping `history` events for resumption.
    pub(crate) fn new(history: usize) -> Self {
        let (tx, _) = broadcast::channel(16384);
        Store {
            inner: Mutex::new(Inner {
                rv: 0,
                min_rv: 0,
                history: VecDeque::new(),
                cap: history.max(1),
                tx,
                seq: 0,
                namespaces: BTreeMap::new(),
                pods: BTreeMap::new(),
                secrets: BTreeMap::new(),
            }),
        }
    }

    /// Locks the store. Never hold the guard across an `.await`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// The current resourceVersion.
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    /// Takes a new resourceVersion without an event (namespaces at start-up).
    pub(crate) fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn publish(
        &mut self,
        kind: Kind,
        etype: EventType,
        prev: Option<Fields>,
        cur: Fields,
        object: Bytes,
    ) {
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            etype,
            prev,
            cur,
            object,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.cap {
            if let Some(old) = self.history.pop_front() {
                self.min_rv = old.rv;
            }
        }
        let _ = self.tx.send(event);
    }

    /// Stores a new pod (its metadata already complete but for the resourceVersion).
    pub(crate) fn insert_pod(&mut self, mut pod: Pod) -> Result<Pod, ApiError> {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        if self.pods.contains_key(&key) {
            return Err(ApiError::already_exists("pods", &key.1));
        }
        let rv = self.bump();
        pod.metadata.resource_version = Some(rv.to_string());
        self.seq += 1;
        self.publish(
            Kind::Pod,
            EventType::Added,
            None,
            pod_fields(&pod),
            json(&pod),
        );
        self.pods.insert(
            key,
            PodEntry {
                pod: pod.clone(),
                seq: self.seq,
                worker: None,
            },
        );
        Ok(pod)
    }

    /// Applies `change` to the pod `key` if it still is the object `uid`; publishes a
    /// MODIFIED event when anything changed. Returns the pod as it is afterwards.
    pub(crate) fn modify_pod(
        &mut self,
        key: &Key,
        uid: &str,
        change: impl FnOnce(&mut Pod),
    ) -> Option<Pod> {
        let entry = self.pods.get_mut(key)?;
        if entry.pod.metadata.uid.as_deref() != Some(uid) {
            return None;
        }
        let mut pod = entry.pod.clone();
        change(&mut pod);
        if pod == entry.pod {
            return Some(pod);
        }
        let prev = pod_fields(&entry.pod);
        self.rv += 1;
        pod.metadata.resource_version = Some(self.rv.to_string());
        let entry = self.pods.get_mut(key)?;
        entry.pod = pod.clone();
        let cur = pod_fields(&pod);
        let object = json(&pod);
        self.publish(Kind::Pod, EventType::Modified, Some(prev), cur, object);
        Some(pod)
    }

    /// Removes the pod `key` if it still is the object `uid`, publishing DELETED.
    pub(crate) fn remove_pod(&mut self, key: &Key, uid: &str) -> Option<PodEntry> {
        if self.pods.get(key)?.pod.metadata.uid.as_deref() != Some(uid) {
            return None;
        }
        let mut entry = self.pods.remove(key)?;
        let rv = self.bump();
        entry.pod.metadata.resource_version = Some(rv.to_string());
        let object = json(&entry.pod);
        self.publish(
            Kind::Pod,
            EventType::Deleted,
            None,
            pod_fields(&entry.pod),
            object,
        );
        Some(entry)
    }

    /// Stores a new secret.
    pub(crate) fn insert_secret(&mut self, mut secret: Secret) -> Result<Secret, ApiError> {
        let key = (
            secret.metadata.namespace.clone().unwrap_or_default(),
            secret.metadata.name.clone().unwrap_or_default(),
        );
        if self.secrets.contains_key(&key) {
            return Err(ApiError::already_exists("secrets", &key.1));
        }
        let rv = self.bump();
        secret.metadata.resource_version = Some(rv.to_string());
        self.publish(
            Kind::Secret,
            EventType::Added,
            None,
            secret_fields(&secret),
            json(&secret),
        );
        self.secrets.insert(key, secret.clone());
        Ok(secret)
    }

    /// Removes a secret, publishing DELETED.
    pub(crate) fn remove_secret(&mut self, key: &Key) -> Option<Secret> {
        let mut secret = self.secrets.remove(key)?;
        let rv = self.bump();
        secret.metadata.resource_version = Some(rv.to_string());
        let object = json(&secret);
        self.publish(
            Kind::Secret,
            EventType::Deleted,
            None,
            secret_fields(&secret),
            object,
        );
        Some(secret)
    }

    /// Forgets every retained event: resuming from any older resourceVersion is a 410.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.min_rv = self.rv;
    }

    /// Starts a watch of `kind`. `from` = `None` for "now, with synthetic ADDED events for
    /// what exists"; `Some(rv)` for "events strictly after rv" (410 when forgotten).
    /// `initial` adds the synthetic events even when resuming (sendInitialEvents).
    pub(crate) fn watch(
        &self,
        kind: Kind,
        from: Option<u64>,
        initial: bool,
    ) -> Result<WatchStart, ApiError> {
        let rx = self.tx.subscribe();
        let mut start = WatchStart {
            initial: Vec::new(),
            backlog: Vec::new(),
            rx,
            rv: self.rv,
        };
        if from.is_none() || initial {
            start.initial = match kind {
                Kind::Pod => self
                    .pods
                    .values()
                    .map(|e| (pod_fields(&e.pod), json(&e.pod)))
                    .collect(),
                Kind::Secret => self
                    .secrets
                    .values()
                    .map(|s| (secret_fields(s), json(s)))
                    .collect(),
            };
            return Ok(start);
        }
        let from = from.unwrap_or_default();
        if from < self.min_rv {
            return Err(ApiError::expired(from, self.min_rv));
        }
        start.backlog = self
            .history
            .iter()
            .filter(|e| e.rv > from && e.kind == kind)
            .cloned()
            .collect();
        Ok(start)
    }
}
