//! [`KubernetesRunner`], the type implementing [`Runner`]: connecting to the cluster and
//! the start-up checks, the sweep of leftovers, and the API requests (create, delete,
//! with their retries) that a job's objects go through. One job's life is in `job.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use rustci_runners::job::{Job, JobSpec};
use rustci_runners::{
    Capabilities, Error, Execution, Health, Isolation, JobId, Limit, Runner, RunnerInfo,
    RunnerKind, Slots,
};

use crate::config::{Connection, KubernetesConfig};
use crate::job::is_execution;
use crate::pod::{self, ANNOTATION_OWNER, ANNOTATION_RUNNER_NAME, Owner};
use crate::watch::PodWatch;
use rustci_runners::backend::{LABEL_MANAGED, LABEL_RUNNER, LABEL_RUNNER_NAME};

/// How long deletion of a pod may take beyond its grace period before the runner stops
/// waiting for it (and leaves it to the cluster and the next sweep).
pub(crate) const DELETE_WAIT: Duration = Duration::from_secs(60);
/// How long to wait for the container's final status once its output has ended.
pub(crate) const STATUS_WAIT: Duration = Duration::from_secs(60);
/// Attempts of a create or delete request that the API answered with a 5xx or 429.
pub(crate) const ATTEMPTS: u32 = 4;

/// Runs each job in its own Pod on a Kubernetes cluster.
pub struct KubernetesRunner {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: kube::Client,
    pub(crate) pods: Api<Pod>,
    pub(crate) secrets: Api<Secret>,
    pub(crate) namespace: String,
    pub(crate) info: RunnerInfo,
    pub(crate) caps: Capabilities,
    pub(crate) config: KubernetesConfig,
    pub(crate) running: Slots,
    pub(crate) owner: String,
    pub(crate) watch: PodWatch,
    /// The cluster was seen not to separate stdout and stderr in pod logs.
    pub(crate) combined_logs: AtomicBool,
}

/// An API error in words, keeping the cluster's own message. A status answer carries its
/// message, code and reason in the context (the kube error adds nothing to them); a
/// failure to get an answer keeps the kube error as the source. Missing rights (401, 403)
/// are a configuration problem; other refusals (4xx) are the cluster rejecting the
/// request; throttling (429), the server's own trouble (5xx) and no answer at all are the
/// cluster being unavailable for now.
pub(crate) fn api_error(what: &str, e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(status) => {
            let text = format!(
                "{what}: {} ({} {})",
                status.message, status.code, status.reason
            );
            match status.code {
                401 | 403 => Error::invalid_config(text),
                429 => Error::unavailable(text),
                400..=499 => Error::rejected(text),
                _ => Error::unavailable(text),
            }
        }
        _ => Error::unavailable(format!("{what}: the Kubernetes API is unreachable")).caused_by(e),
    }
}

pub(crate) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// True for failures worth another attempt: the server's own trouble or throttling, or
/// no answer at all.
pub(crate) fn retryable(e: &kube::Error) -> bool {
    match status_code(e) {
        Some(code) => code >= 500 || code == 429,
        None => matches!(
            e,
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_)
        ),
    }
}

pub(crate) async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
}

impl KubernetesRunner {
    /// Connects to the cluster and checks, before any job: the configuration (quantities,
    /// names, that the pod patch applies), that the namespace exists, and, by creating a
    /// sample job's Pod and Secret with `dryRun` (nothing is stored), that the runner may
    /// create them there and the cluster accepts them. Reads node capacity where allowed.
    /// Then removes pods and secrets that a dead runner of the same name left (see
    /// [`KubernetesConfig::name`]), waiting until those pods are gone, and starts the
    /// shared pod watch. Every refusal is an error naming its cause.
    pub async fn connect(config: KubernetesConfig) -> Result<Self, Error> {
        let name = config.name.clone();
        Self::connect_to(config)
            .await
            .map_err(|e| e.for_runner(&name))
    }

    async fn connect_to(config: KubernetesConfig) -> Result<Self, Error> {
        config.check()?;
        let kube_config = match &config.connection {
            Connection::Infer => kube::Config::infer().await.map_err(|e| {
                Error::invalid_config(
                    "no Kubernetes configuration found (kubeconfig or in-cluster)",
                )
                .caused_by(e)
            })?,
            Connection::Kubeconfig { path, context } => {
                let file = match path {
                    Some(p) => kube::config::Kubeconfig::read_from(p).map_err(|e| {
                        Error::invalid_config(format!("kubeconfig {}", p.display())).caused_by(e)
                    })?,
                    None => kube::config::Kubeconfig::read().map_err(|e| {
                        Error::invalid_config("kubeconfig ($KUBECONFIG or ~/.kube/config)")
                            .caused_by(e)
                    })?,
                };
                let options = kube::config::KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| {
                        let which = context
                            .as_deref()
                            .map(|c| format!(" (context {c:?})"))
                            .unwrap_or_default();
                        Error::invalid_config(format!("kubeconfig{which}")).caused_by(e)
                    })?
            }
            Connection::InCluster => kube::Config::incluster()
                .map_err(|e| Error::invalid_config("in-cluster configuration").caused_by(e))?,
        };
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| kube_config.default_namespace.clone());
        // The runner retries what is safe to retry itself, through the rate limit; kube's own
        // retry layer sits below it and would multiply requests unseen.
        let mut kube_config = kube_config;
        kube_config.default_retry = false;
        let rate = tower::limit::RateLimitLayer::new(
            u64::from(config.requests_per_second),
            Duration::from_secs(1),
        );
        let client = kube::client::ClientBuilder::try_from(kube_config)
            .map_err(|e| Error::invalid_config("cannot build a Kubernetes client").caused_by(e))?
            .with_layer(&rate)
            .build();

        // The namespace must exist. A runner allowed only into its namespace may not read
        // the Namespace object: listing pods there then stands in for it.
        let namespaces: Api<Namespace> = Api::all(client.clone());
        match namespaces.get(&namespace).await {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(404) => {
                return Err(Error::invalid_config(format!(
                    "namespace {namespace:?} does not exist"
                )));
            }
            Err(e) if status_code(&e) == Some(403) => {}
            Err(e) => {
                return Err(api_error(
                    &format!("cannot read namespace {namespace:?}"),
                    e,
                ));
            }
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);

        let owner = rustci_runners::owner::owner_token();
        let mut info = RunnerInfo::new(config.name.clone(), RunnerKind::Kubernetes)
            .with_labels(config.labels.iter().cloned());
        if let Some(id) = &config.id {
            info.id = id.clone();
        }
        let mut caps = Capabilities::host(Isolation::Pod);
        caps.command_steps = true;
        caps.images = true;
        caps.needs_image = config.default_image.is_none();
        caps.limits = BTreeSet::from([Limit::Cpus, Limit::Memory]);
        caps.max_concurrency = config.max_concurrency;
        caps.termination_grace = config.termination_grace;
        caps.platform = "linux".into();
        caps.cpus = None;
        caps.memory = None;
        // Node capacity, when the runner may read nodes: the largest node bounds a job.
        let nodes: Api<Node> = Api::all(client.clone());
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            for node in list.items {
                let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
                if let Some(v) = allocatable
                    .get("cpu")
                    .and_then(|q| crate::quantity::quantity_value(&q.0))
                {
                    caps.cpus = Some(caps.cpus.unwrap_or(0.0).max(v));
                }
                if let Some(v) = allocatable
                    .get("memory")
                    .and_then(|q| crate::quantity::quantity_value(&q.0))
                {
                    caps.memory = Some(caps.memory.unwrap_or(0).max(v as u64));
                }
            }
        }

        // A job's objects must be acceptable: build a sample (the patch must apply), then
        // have the API server check it without storing it (`dryRun`): the namespace, the
        // right to create pods and secrets, admission and quotas.
        let sample = Job::new("sample", vec![rustci_runners::Step::run("true")])
            .with_secret("RUSTCI_SAMPLE", "x");
        let objects = pod::build(
            &config,
            &Owner {
                runner_id: &info.id,
                runner_name: &info.name,
                owner: &owner,
                namespace: &namespace,
            },
            &sample,
            config.default_image.as_deref().unwrap_or("busybox"),
            &JobId::new(),
        )?;
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        if let Some(secret) = &objects.secret {
            secrets.create(&dry, secret).await.map_err(|e| {
                api_error(
                    &format!("cannot create secrets in namespace {namespace:?}"),
                    e,
                )
            })?;
        }
        pods.create(&dry, &objects.pod)
            .await
            .map_err(|e| match status_code(&e) {
                Some(404) => {
                    Error::invalid_config(format!("namespace {namespace:?} does not exist"))
                }
                _ => api_error(&format!("cannot create pods in namespace {namespace:?}"), e),
            })?;

        let selector = format!(
            "{LABEL_MANAGED}=true,{LABEL_RUNNER}={}",
            pod::label_safe(&info.id)
        );
        let watch = PodWatch::start(pods.clone(), &selector);
        let inner = Arc::new(Inner {
            client,
            pods,
            secrets,
            namespace,
            info,
            caps,
            config,
            running: Slots::new(),
            owner,
            watch,
            combined_logs: AtomicBool::new(false),
        });
        inner.sweep().await?;
        Ok(KubernetesRunner { inner })
    }

    /// The namespace jobs run in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The configuration the runner was connected with.
    pub fn config(&self) -> &KubernetesConfig {
        &self.inner.config
    }

    /// Removes pods and secrets of this runner's name whose owner is gone; returns how many
    /// objects were removed. [`KubernetesRunner::connect`] does this once.
    pub async fn sweep(&self) -> Result<usize, Error> {
        self.inner.sweep().await
    }
}

impl Inner {
    pub(crate) async fn sweep(&self) -> Result<usize, Error> {
        let selector = format!(
            "{LABEL_MANAGED}=true,{LABEL_RUNNER_NAME}={}",
            pod::label_safe(&self.info.name)
        );
        let lp = ListParams::default().labels(&selector);
        let host = rustci_runners::owner::this_host();
        // Alive on this host, and not this process: another runner of the same name here.
        // The label is a safe form of the name; the annotation, where there is one, holds
        // it exactly.
        let keep = |meta: &kube::api::ObjectMeta| {
            let annotations = meta.annotations.as_ref();
            let name = annotations.and_then(|a| a.get(ANNOTATION_RUNNER_NAME));
            if name.is_some_and(|n| *n != self.info.name) {
                return true;
            }
            match annotations.and_then(|a| a.get(ANNOTATION_OWNER)) {
                Some(o) if *o == self.owner => true,
                Some(o) => rustci_runners::owner::owner_alive(o, &host) == Some(true),
                None => false,
            }
        };
        let mut removed = 0;
        let pods = self.pods.list(&lp).await.map_err(|e| {
            api_error(
                &format!("cannot list pods in namespace {:?}", self.namespace),
                e,
            )
        })?;
        // Every leftover is deleted at once, and then waited for: a retry must never run
        // beside what is left of an earlier attempt.
        let deletions = pods.items.into_iter().filter_map(|p| {
            if keep(&p.metadata) {
                return None;
            }
            let name = p.metadata.name?;
            tracing::info!(pod = %name, "removing a pod left by an earlier runner");
            Some(async move { self.delete_pod_and_wait(&name, p.metadata.uid).await })
        });
        removed += futures::future::join_all(deletions)
            .await
            .into_iter()
            .filter(|gone| *gone)
            .count();
        let secrets = self.secrets.list(&lp).await.map_err(|e| {
            api_error(
                &format!("cannot list secrets in namespace {:?}", self.namespace),
                e,
            )
        })?;
        for s in secrets.items {
            if keep(&s.metadata) {
                continue;
            }
            if let Some(name) = s.metadata.name
                && self.delete_secret(&name).await
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes a pod; `grace` in seconds, `None` for the pod's own. True when the pod is
    /// being deleted or was already gone.
    pub(crate) async fn delete_pod(&self, name: &str, grace: Option<u32>) -> bool {
        // Zero would be a force deletion: the object goes at once while its containers
        // may still run on the node.
        let dp = DeleteParams {
            grace_period_seconds: grace.map(|g| g.max(1)),
            ..DeleteParams::default()
        };
        self.delete(
            &self.pods,
            "pod",
            name,
            &dp,
            "its activeDeadlineSeconds and the next sweep remove it",
        )
        .await
    }

    pub(crate) async fn delete_secret(&self, name: &str) -> bool {
        self.delete(
            &self.secrets,
            "secret",
            name,
            &DeleteParams::default(),
            "the next sweep removes it",
        )
        .await
    }

    /// Deletes an object, retrying what the server failed at; true when it is being
    /// deleted or was already gone. A failure is logged with what will clean up instead.
    pub(crate) async fn delete<K>(
        &self,
        api: &Api<K>,
        kind: &str,
        name: &str,
        dp: &DeleteParams,
        fallback: &str,
    ) -> bool
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        for attempt in 0..ATTEMPTS {
            match api.delete(name, dp).await {
                Ok(_) => return true,
                Err(e) if status_code(&e) == Some(404) => return true,
                Err(e) if retryable(&e) && attempt + 1 < ATTEMPTS => backoff(attempt).await,
                Err(e) => {
                    tracing::error!(%kind, %name, error = %e, "cannot delete a job's {kind}; {fallback}");
                    return false;
                }
            }
        }
        false
    }

    /// Deletes a pod with its own grace period and waits (through a watch of that pod)
    /// until it is gone, so nothing of it runs on.
    pub(crate) async fn delete_pod_and_wait(&self, name: &str, uid: Option<String>) -> bool {
        if !self.delete_pod(name, None).await {
            return false;
        }
        let uid = uid.unwrap_or_default();
        let gone = kube::runtime::wait::await_condition(
            self.pods.clone(),
            name,
            kube::runtime::conditions::is_deleted(&uid),
        );
        let limit = self.config.termination_grace + DELETE_WAIT;
        match tokio::time::timeout(limit, gone).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(pod = %name, error = %e, "cannot follow the deletion of a pod");
                false
            }
            Err(_) => {
                tracing::warn!(pod = %name, "a deleted pod was not gone after {limit:?}");
                false
            }
        }
    }

    /// Creates an object, retrying what the server failed at. A `409` after such a retry
    /// is the earlier attempt having succeeded when the object there is ours (execution
    /// `id`'s, made by this runner). On failure, the flag says whether the object may exist
    /// all the same (a request whose answer was a server error or none may have been
    /// carried out).
    pub(crate) async fn create<K>(
        &self,
        api: &Api<K>,
        object: &K,
        kind: &str,
        name: &str,
        id: &JobId,
    ) -> Result<(), (Error, bool)>
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let exists = || async {
            api.get_metadata(name).await.is_ok_and(|o| {
                let meta = o.metadata;
                is_execution(&meta, id)
                    && meta
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION_OWNER))
                        == Some(&self.owner)
            })
        };
        let what = format!(
            "cannot create {kind} {name:?} in namespace {:?}",
            self.namespace
        );
        let mut ambiguous = false;
        for attempt in 0..ATTEMPTS {
            match api.create(&PostParams::default(), object).await {
                Ok(_) => return Ok(()),
                Err(e) if status_code(&e) == Some(409) && ambiguous => {
                    if exists().await {
                        return Ok(());
                    }
                    // Someone else's object under this name: nothing of ours to remove.
                    return Err((api_error(&what, e), false));
                }
                Err(e) if retryable(&e) && attempt + 1 < ATTEMPTS => {
                    ambiguous = true;
                    backoff(attempt).await
                }
                Err(e) => {
                    let maybe = ambiguous || retryable(&e);
                    return Err((api_error(&what, e), maybe));
                }
            }
        }
        unreachable!("the last attempt returns")
    }
}

#[async_trait]
impl Runner for KubernetesRunner {
    fn info(&self) -> &RunnerInfo {
        &self.inner.info
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    fn running(&self) -> usize {
        self.inner.running.running()
    }

    async fn health(&self) -> Health {
        let inner = &self.inner;
        let lp = ListParams::default().limit(1);
        let probe = inner.pods.list_metadata(&lp);
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(_)) => match inner.watch.error() {
                Some(e) => Health::Degraded(format!("the pod watch is reconnecting: {e}")),
                None => Health::Healthy,
            },
            Ok(Err(e)) => Health::Unhealthy(format!(
                "cannot list pods in namespace {:?}: {e}",
                inner.namespace
            )),
            Err(_) => Health::Unhealthy("the Kubernetes API gave no answer within 5s".into()),
        }
    }

    async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        self.abandon_job(id)
            .await
            .map_err(|e| e.for_runner(&self.inner.info.name))
    }

    async fn start(&self, spec: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        self.start_job(spec, id)
            .await
            .map_err(|e| e.for_runner(&self.inner.info.name))
    }
}
