//! Configuration of a [`KubernetesRunner`](crate::KubernetesRunner): how to reach the
//! cluster, where jobs run, and the options of every job's Pod.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use rustci_runners::backend::{BackendConfig, ConfigBackend, RunnerSettings};
use rustci_runners::job::units::{serde_duration, serde_size};
use rustci_runners::{Error, Runner};
use serde::Deserialize;

use crate::quantity::validate_quantity;

/// How to reach the API server. In configuration: `infer`, `in_cluster`, or
/// `{kubeconfig: {path: FILE, context: NAME}}` (both optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Connection {
    /// As `kubectl` does: `$KUBECONFIG` or `~/.kube/config`, else the in-cluster service
    /// account (default).
    #[default]
    Infer,
    /// A kubeconfig file (`None`: `$KUBECONFIG` or `~/.kube/config`) and optionally a
    /// context in it other than its current one.
    Kubeconfig {
        /// The file.
        #[serde(default)]
        path: Option<PathBuf>,
        /// The context.
        #[serde(default)]
        context: Option<String>,
    },
    /// The service account of the pod this runner runs in.
    InCluster,
}

pub use rustci_runners::backend::PullPolicy;

/// The container's `imagePullPolicy` for a pull policy.
pub(crate) fn pull_policy_name(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::Never => "Never",
        _ => "IfNotPresent",
    }
}

/// The volume mounted at `/workspace` in every job container.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum WorkspaceVolume {
    /// A fresh `emptyDir` per job (default): nothing outlives the pod.
    EmptyDir {
        /// `medium: Memory` (a tmpfs).
        #[serde(default)]
        memory: bool,
        /// `sizeLimit`, a quantity such as `2Gi`.
        #[serde(default)]
        size_limit: Option<String>,
    },
    /// A directory named after the job's pod on an existing claim (`subPath`). The entry
    /// script empties it when the job ends; a pod killed before that leaves it behind.
    PersistentVolumeClaim {
        /// The claim's name.
        claim_name: String,
    },
}

impl Default for WorkspaceVolume {
    fn default() -> Self {
        WorkspaceVolume::EmptyDir {
            memory: false,
            size_limit: None,
        }
    }
}

/// A patch applied to the generated `PodSpec` of every job, for what the options here do
/// not cover (as GitLab's `pod_spec` and Buildkite's `podSpecPatch` allow).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum PodPatch {
    /// A JSON merge patch (RFC 7386): objects merge, `null` removes, lists are replaced.
    Merge(serde_json::Value),
    /// A JSON patch (RFC 6902): a list of operations.
    Json(serde_json::Value),
    /// A strategic merge patch: like a merge patch, but lists of named objects
    /// (`containers`, `volumes`, `env`, `volumeMounts`, …) merge by `name`, and an element
    /// with `"$patch": "delete"` removes the named one.
    Strategic(serde_json::Value),
}

/// The security context of job pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SecurityOptions {
    /// `runAsNonRoot`.
    pub run_as_non_root: Option<bool>,
    /// `runAsUser`.
    pub run_as_user: Option<i64>,
    /// `runAsGroup`.
    pub run_as_group: Option<i64>,
    /// `fsGroup`: the workspace volume is writable by this group.
    pub fs_group: Option<i64>,
    /// `allowPrivilegeEscalation` (default false).
    pub allow_privilege_escalation: bool,
    /// `readOnlyRootFilesystem`: only the workspace is writable (default false).
    pub read_only_root_filesystem: bool,
    /// Capabilities to drop (e.g. `ALL`).
    pub drop_capabilities: Vec<String>,
}

/// Options of every job's Pod.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PodOptions {
    /// Resource requests of the job container (`cpu`, `memory`, `ephemeral-storage`, …)
    /// when the job asks for none of its own.
    pub requests: BTreeMap<String, String>,
    /// Resource limits of the job container when the job asks for none of its own. A job's
    /// `resources.cpus` and `resources.memory` set both the request and the limit.
    pub limits: BTreeMap<String, String>,
    /// `nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// `tolerations`.
    pub tolerations: Vec<Toleration>,
    /// `affinity`.
    pub affinity: Option<Affinity>,
    /// `serviceAccountName`.
    pub service_account: Option<String>,
    /// `automountServiceAccountToken` (default false: jobs get no API credentials).
    pub automount_service_account_token: bool,
    /// `imagePullPolicy` of the job container; the cluster's default when `None`.
    pub image_pull_policy: Option<PullPolicy>,
    /// Names of `imagePullSecrets`.
    pub image_pull_secrets: Vec<String>,
    /// Security context.
    pub security: SecurityOptions,
    /// The workspace volume.
    pub workspace: WorkspaceVolume,
    /// Annotations on every pod.
    pub annotations: BTreeMap<String, String>,
    /// Labels on every pod (the runner's own `rustci.*` labels cannot be overridden).
    pub labels: BTreeMap<String, String>,
    /// A patch on the generated `PodSpec`.
    pub patch: Option<PodPatch>,
}

/// How job output is read from the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LogStreams {
    /// Ask for stdout and stderr separately (`stream=Stdout`/`Stderr`, Kubernetes 1.32+
    /// with `PodLogsQuerySplitStreams`); when the cluster turns out not to separate them,
    /// read one combined stream from then on (default). A cluster that refuses the
    /// parameter is noticed before any output; one that ignores it only when a marker of
    /// the other stream shows up, so on the runner's first job there, output that came
    /// before may also show once more as stderr.
    #[default]
    Auto,
    /// Always separate.
    Split,
    /// One stream; stderr arrives as stdout, as with `kubectl logs`.
    Combined,
}

/// Configuration of a [`KubernetesRunner`](crate::KubernetesRunner).
///
/// As a runner's `kubernetes:` section in the server's configuration (or
/// `POST /api/runners`), every field but `name`, `labels` and `max_concurrency` (which
/// come from the runner's common settings) may be given, with durations as `90s`/`3m`
/// and sizes as `512MiB`; absent fields keep their defaults and unknown ones are refused:
///
/// ```yaml
/// runners:
///   - name: cluster
///     kind: kubernetes
///     slots: 20
///     kubernetes:
///       connection: {kubeconfig: {path: /etc/rustci/kubeconfig, context: ci}}
///       namespace: ci
///       default_image: "busybox:1.36"
///       pending_timeout: 5m
///       pod:
///         requests: {cpu: 500m, memory: 256Mi}
///         node_selector: {pool: ci}
///         image_pull_policy: if-not-present
///         security: {run_as_non_root: true, run_as_user: 1000}
///         patch: {strategic: {spec: {priorityClassName: ci}}}
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KubernetesConfig {
    /// Runner name; the start-up sweep removes pods and secrets left by an earlier runner
    /// of this name in the namespace, so a name MUST be unique per namespace.
    #[serde(skip)]
    pub name: String,
    /// A fixed runner id (a registration restored after a restart keeps its id); a new
    /// one when `None`.
    #[serde(skip)]
    pub id: Option<String>,
    /// Labels jobs can ask for.
    #[serde(skip)]
    pub labels: Vec<String>,
    /// How to reach the cluster.
    pub connection: Connection,
    /// Namespace of job pods; `None`: the kubeconfig context's (else `default`).
    pub namespace: Option<String>,
    /// Image for jobs that name none; without it such jobs are refused.
    pub default_image: Option<String>,
    /// Options of every job's Pod.
    pub pod: PodOptions,
    /// Longest a pod may take to start its container (scheduling, image pull) before the
    /// job fails with the cluster's reason. Default 3 min.
    #[serde(with = "serde_duration")]
    pub pending_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when a job is stopped
    /// (`terminationGracePeriodSeconds`, whole seconds). Default 10 s.
    #[serde(with = "serde_duration")]
    pub termination_grace: Duration,
    /// Added to the job's timeout for the pod's `activeDeadlineSeconds`, so the cluster
    /// ends a pod whose runner went away. Default 1 min.
    #[serde(with = "serde_duration")]
    pub deadline_margin: Duration,
    /// Most API requests per second this runner sends (watch and log streams count once,
    /// when they open). Default 50.
    pub requests_per_second: u32,
    /// How output is read. Default [`LogStreams::Auto`].
    pub log_streams: LogStreams,
    /// Output kept per job. Default 512 MiB.
    #[serde(with = "serde_size")]
    pub max_output_bytes: u64,
    /// Most jobs at once. Default none.
    #[serde(skip)]
    pub max_concurrency: Option<usize>,
    /// Events that may wait unread. Default 64.
    pub event_buffer: usize,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            name: "kubernetes".into(),
            id: None,
            labels: Vec::new(),
            connection: Connection::Infer,
            namespace: None,
            default_image: None,
            pod: PodOptions::default(),
            pending_timeout: Duration::from_secs(180),
            termination_grace: Duration::from_secs(10),
            deadline_margin: Duration::from_secs(60),
            requests_per_second: 50,
            log_streams: LogStreams::Auto,
            max_output_bytes: 512 << 20,
            max_concurrency: None,
            event_buffer: 64,
        }
    }
}

impl KubernetesConfig {
    /// The defaults, with what the environment sets: the kubeconfig as `kubectl` finds it
    /// (`$KUBECONFIG`, `~/.kube/config`, else in-cluster), `RUSTCI_K8S_CONTEXT` (a context
    /// other than the current one), `RUSTCI_K8S_NAMESPACE` and `RUSTCI_K8S_IMAGE` (the
    /// image of jobs that name none).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let connection = match var("RUSTCI_K8S_CONTEXT") {
            Some(context) => Connection::Kubeconfig {
                path: None,
                context: Some(context),
            },
            None => Connection::Infer,
        };
        KubernetesConfig {
            connection,
            namespace: var("RUSTCI_K8S_NAMESPACE"),
            default_image: var("RUSTCI_K8S_IMAGE"),
            ..KubernetesConfig::default()
        }
    }

    /// Every problem with this configuration that can be seen without the cluster.
    pub(crate) fn check(&self) -> Result<(), Error> {
        let mut problems = Vec::new();
        let quantities = self
            .pod
            .requests
            .iter()
            .map(|(k, v)| (format!("pod.requests.{k}"), v))
            .chain(
                self.pod
                    .limits
                    .iter()
                    .map(|(k, v)| (format!("pod.limits.{k}"), v)),
            );
        for (field, value) in quantities {
            if let Err(e) = validate_quantity(value) {
                problems.push(format!("{field}: {e}"));
            }
        }
        if let WorkspaceVolume::EmptyDir {
            size_limit: Some(s),
            ..
        } = &self.pod.workspace
            && let Err(e) = validate_quantity(s)
        {
            problems.push(format!("pod.workspace.size_limit: {e}"));
        }
        if let WorkspaceVolume::PersistentVolumeClaim { claim_name } = &self.pod.workspace
            && !is_dns_subdomain(claim_name)
        {
            problems.push(format!(
                "pod.workspace.claim_name: {claim_name:?} is not a valid object name"
            ));
        }
        if let Some(ns) = &self.namespace
            && !is_dns_label(ns)
        {
            problems.push(format!(
                "namespace: {ns:?} is not a valid namespace name (lowercase letters, digits and '-', at most 63)"
            ));
        }
        if self.termination_grace.subsec_nanos() != 0 {
            problems.push("termination_grace: must be whole seconds".into());
        }
        if self.requests_per_second == 0 {
            problems.push("requests_per_second: must be at least 1".into());
        }
        for (k, v) in &self.pod.labels {
            if k.starts_with("rustci.") {
                problems.push(format!(
                    "pod.labels.{k}: the rustci.* labels are the runner's own"
                ));
            } else if !is_label_value(v) {
                problems.push(format!("pod.labels.{k}: {v:?} is not a valid label value"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid_config(problems.join("; ")).for_runner(&self.name))
        }
    }
}

/// RFC 1123 label: what namespace names must be.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what most object names must be.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub(crate) fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// The kind name of Kubernetes runners in configuration: `kubernetes`.
pub const KIND: &str = "kubernetes";

/// Builds [`KubernetesRunner`](crate::KubernetesRunner)s from a runner's settings and its
/// `kubernetes:` section (a [`KubernetesConfig`]); register `KubernetesBackend::new()` in a
/// [`rustci_runners::Backends`].
pub type KubernetesBackend = ConfigBackend<KubernetesConfig>;

#[async_trait]
impl BackendConfig for KubernetesConfig {
    const KIND: &'static str = KIND;

    fn apply(&mut self, settings: &RunnerSettings) -> Result<(), Error> {
        if settings.workspace_root.is_some() {
            return Err(Error::invalid_config(
                "workspace_root: a kubernetes runner's workspaces are volumes of its pods \
                 (set pod.workspace instead)",
            ));
        }
        self.name = settings.name.clone();
        self.id = settings.id.clone();
        self.labels = settings.labels.clone();
        self.max_concurrency = Some(settings.slots_or_default());
        Ok(())
    }

    fn check(&self) -> Result<(), Error> {
        KubernetesConfig::check(self)
    }

    async fn connect(self) -> Result<Arc<dyn Runner>, Error> {
        Ok(Arc::new(crate::KubernetesRunner::connect(self).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_quantities_and_names_are_named() {
        let mut config = KubernetesConfig::default();
        config.pod.requests.insert("cpu".into(), "lots".into());
        config.pod.limits.insert("memory".into(), "10MB".into());
        config.namespace = Some("Not_Valid".into());
        let e = config.check().unwrap_err().to_string();
        assert!(e.contains("pod.requests.cpu: \"lots\""), "{e}");
        assert!(e.contains("pod.limits.memory: \"10MB\""), "{e}");
        assert!(e.contains("namespace: \"Not_Valid\""), "{e}");
        assert!(KubernetesConfig::default().check().is_ok());
    }
}
