//! What every backend shares, and how backends register themselves.
//!
//! A backend crate (Docker, Kubernetes, or one of an embedding project's own) exports a
//! [`Backend`]: its kind name and a way to build a runner from a serde configuration.
//! [`Backends`] holds the compiled-in kinds; the server, the CLI and any embedding project
//! build runners from configuration through it instead of matching on kind names.
//!
//! ```text
//!  config file / POST /api/runners        Backends
//!  {name, kind: docker, labels, slots,  ──►  "local"  ─► HostBackend::local()
//!   docker: {engine, warm_pool, ...}}        "native" ─► HostBackend::native()
//!                                            "docker" ─► DockerBackend (feature docker)
//!                                                │
//!                                                ▼
//!                                  Backend::build(settings, options) ─► Arc<dyn Runner>
//! ```
//!
//! The same module holds the names every backend uses for the same things: the labels on
//! what a runner creates, the workspace path inside containers, and [`PullPolicy`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::host::HostConfig;
use crate::local::LocalRunner;
use crate::native::{NativeConfig, NativeRunner};
use crate::runner::Runner;

/// Label on every container or pod a runner creates: always `true`.
pub const LABEL_MANAGED: &str = "rustci.managed";
/// Label: the execution id of the job.
pub const LABEL_JOB: &str = "rustci.job";
/// Label: the runner's id.
pub const LABEL_RUNNER: &str = "rustci.runner";
/// Label: the runner's name (what a start-up sweep matches).
pub const LABEL_RUNNER_NAME: &str = "rustci.runner.name";
/// Label (annotation on Kubernetes): the owner token of the process that created the
/// object ([`crate::owner::owner_token`]).
pub const LABEL_OWNER: &str = "rustci.owner";
/// Where the workspace is mounted in every job container (Docker, Kubernetes).
pub const WORKSPACE: &str = "/workspace";

/// When a runner pulls a job's image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PullPolicy {
    /// Before every job.
    Always,
    /// Only when the engine or node does not have the image (default).
    #[default]
    IfNotPresent,
    /// Never: a missing image fails the job, naming the image.
    Never,
}

impl PullPolicy {
    /// The spelling in configuration files: `always`, `if-not-present`, `never`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        }
    }
}

/// A step's environment: a backend's `base` variables (the host's few, `CI`, `RUSTCI_*`),
/// then the job's `env`, the step's `env` and the job's secrets, one entry per name with
/// the value given last, in the order names first appear. With duplicate entries a
/// program would see one or the other depending on how it reads them (C's `getenv` takes
/// the first, shells the last).
pub fn step_environment(
    base: &[(String, String)],
    job: &crate::job::Job,
    step: &crate::job::Step,
) -> Vec<(String, String)> {
    let given = base
        .iter()
        .cloned()
        .chain(job.env.iter().map(|(k, v)| (k.clone(), v.clone())))
        .chain(step.env.iter().map(|(k, v)| (k.clone(), v.clone())))
        .chain(job.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in given {
        match index.get(&k) {
            Some(&i) => out[i].1 = v,
            None => {
                index.insert(k.clone(), out.len());
                out.push((k, v));
            }
        }
    }
    out
}

/// Slots of a runner whose settings name none.
pub const DEFAULT_SLOTS: usize = 4;

/// What every runner has, whatever its kind: the part of a runner's configuration that
/// does not belong to its backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RunnerSettings {
    /// The runner's name (unique per backend where the backend sweeps by name).
    pub name: String,
    /// A fixed runner id (a registration restored after a restart); a new one when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Labels jobs can ask for.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Most jobs at once; [`DEFAULT_SLOTS`] when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<usize>,
    /// Directory under which the runner makes job workspaces, for backends that make
    /// them on this host; the backend's default when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_root: Option<PathBuf>,
}

impl RunnerSettings {
    /// Settings with a name and nothing else.
    pub fn named(name: impl Into<String>) -> Self {
        RunnerSettings {
            name: name.into(),
            id: None,
            labels: Vec::new(),
            slots: None,
            workspace_root: None,
        }
    }

    /// [`RunnerSettings::slots`], or [`DEFAULT_SLOTS`].
    pub fn slots_or_default(&self) -> usize {
        self.slots.unwrap_or(DEFAULT_SLOTS)
    }

    /// A [`HostConfig`] with these settings applied.
    pub fn host_config(&self) -> HostConfig {
        let mut host = HostConfig::named(self.name.clone());
        host.id = self.id.clone();
        host.labels = self.labels.clone();
        host.max_concurrency = Some(self.slots_or_default());
        if let Some(root) = &self.workspace_root {
            host.workspace_root = root.clone();
        }
        host
    }
}

/// One kind of runner that can be built from configuration.
///
/// Implementations MUST refuse options they do not understand (an unknown field, a value
/// out of range) with an [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig)
/// error naming the field, from both [`Backend::check`] and [`Backend::build`]; `build`
/// MUST apply every field of [`RunnerSettings`] that the kind supports (name, id,
/// labels, slots, workspace root) over the options.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The kind name in configuration (`local`, `docker`, `kubernetes`).
    fn kind(&self) -> &'static str;

    /// Checks `options` (this kind's own section of a runner's configuration; `null`
    /// when absent) without connecting to anything, so a configuration file is refused
    /// before anything starts.
    fn check(&self, settings: &RunnerSettings, options: &serde_json::Value) -> Result<(), Error>;

    /// Builds the runner (connecting to its engine or cluster where it has one).
    async fn build(
        &self,
        settings: &RunnerSettings,
        options: &serde_json::Value,
    ) -> Result<Arc<dyn Runner>, Error>;
}

/// Deserializes a backend's options section; `null` (no section) is the type's default.
/// The error names the kind and the field that does not fit.
pub fn parse_options<T>(kind: &str, options: &serde_json::Value) -> Result<T, Error>
where
    T: serde::de::DeserializeOwned + Default,
{
    if options.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(options).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::invalid_config(format!("{kind} options: {inner}"))
        } else {
            Error::invalid_config(format!("{kind} options: {path}: {inner}"))
        }
    })
}

/// A backend's configuration type that knows how to become a runner: the usual way to
/// write a [`Backend`] is to implement this for the configuration and register a
/// [`ConfigBackend`] of it, which parses the kind's section with [`parse_options`],
/// applies the [`RunnerSettings`], checks, and connects.
#[async_trait]
pub trait BackendConfig: serde::de::DeserializeOwned + Default + Send + 'static {
    /// The kind name in configuration.
    const KIND: &'static str;

    /// Applies the settings every runner has (name, id, labels, slots, workspace root)
    /// over the parsed options; a setting the kind cannot honour is an error naming it,
    /// never silently dropped.
    fn apply(&mut self, settings: &RunnerSettings) -> Result<(), Error>;

    /// Checks what can be checked without the engine or cluster.
    fn check(&self) -> Result<(), Error>;

    /// Connects and returns the runner.
    async fn connect(self) -> Result<Arc<dyn Runner>, Error>;
}

/// The [`Backend`] of a [`BackendConfig`] type `C`.
pub struct ConfigBackend<C>(std::marker::PhantomData<fn() -> C>);

impl<C: BackendConfig> ConfigBackend<C> {
    /// The backend.
    pub const fn new() -> Self {
        ConfigBackend(std::marker::PhantomData)
    }

    /// Parses, applies the settings and checks: the configuration `build` connects with.
    pub fn config(settings: &RunnerSettings, options: &serde_json::Value) -> Result<C, Error> {
        let mut config: C = parse_options(C::KIND, options)?;
        config.apply(settings)?;
        config.check()?;
        Ok(config)
    }
}

impl<C: BackendConfig> Default for ConfigBackend<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> std::fmt::Debug for ConfigBackend<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigBackend")
    }
}

#[async_trait]
impl<C: BackendConfig> Backend for ConfigBackend<C> {
    fn kind(&self) -> &'static str {
        C::KIND
    }

    fn check(&self, settings: &RunnerSettings, options: &serde_json::Value) -> Result<(), Error> {
        Self::config(settings, options).map(|_| ())
    }

    async fn build(
        &self,
        settings: &RunnerSettings,
        options: &serde_json::Value,
    ) -> Result<Arc<dyn Runner>, Error> {
        Self::config(settings, options)?.connect().await
    }
}

/// The runner kinds this program can build, by name, with the cargo feature that adds
/// each kind that is known but not compiled in.
#[derive(Clone, Default)]
pub struct Backends {
    kinds: BTreeMap<&'static str, Arc<dyn Backend>>,
    absent: BTreeMap<String, String>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .field("absent", &self.absent)
            .finish()
    }
}

impl Backends {
    /// No kinds.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The host kinds of this crate: `local` and `native`.
    pub fn host() -> Self {
        let mut b = Self::empty();
        b.register(HostBackend::local());
        b.register(HostBackend::native());
        b
    }

    /// Adds (or replaces) a kind.
    pub fn register(&mut self, backend: impl Backend + 'static) -> &mut Self {
        self.absent.remove(backend.kind());
        self.kinds.insert(backend.kind(), Arc::new(backend));
        self
    }

    /// Records that `kind` exists but needs `feature` to be compiled in, so that asking
    /// for it says which feature to enable. No effect when the kind is registered.
    pub fn not_compiled(&mut self, kind: &str, feature: &str) -> &mut Self {
        if !self.kinds.contains_key(kind) {
            self.absent.insert(kind.to_string(), feature.to_string());
        }
        self
    }

    /// The registered kind names, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    /// The backend for `kind`, or an error that says why there is none: a kind that
    /// needs a feature names it; an unknown kind lists the ones there are.
    pub fn get(&self, kind: &str) -> Result<&Arc<dyn Backend>, Error> {
        if let Some(b) = self.kinds.get(kind) {
            return Ok(b);
        }
        Err(match self.absent.get(kind) {
            Some(feature) => Error::invalid_config(format!(
                "runner kind {kind:?} is not compiled into this program: build it with the \
                 cargo feature `{feature}`"
            )),
            None => Error::invalid_config(format!(
                "unknown runner kind {kind:?} (this program runs {})",
                self.kinds().join(", ")
            )),
        })
    }

    /// Checks a runner's configuration without building it.
    pub fn check(
        &self,
        kind: &str,
        settings: &RunnerSettings,
        options: &serde_json::Value,
    ) -> Result<(), Error> {
        self.get(kind)?
            .check(settings, options)
            .map_err(|e| e.for_runner(&settings.name))
    }

    /// Builds a runner of `kind`.
    pub async fn build(
        &self,
        kind: &str,
        settings: &RunnerSettings,
        options: &serde_json::Value,
    ) -> Result<Arc<dyn Runner>, Error> {
        self.get(kind)?
            .build(settings, options)
            .await
            .map_err(|e| e.for_runner(&settings.name))
    }
}

/// Options of a host runner beyond [`RunnerSettings`] (its kind's section).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostOptions {
    /// [`HostConfig::disk_full_percent`].
    disk_full_percent: Option<f64>,
}

/// Builds the host runners: [`LocalRunner`]s (kind `local`) and [`NativeRunner`]s (kind
/// `native`, with the host's defaults for namespaces, cgroups and uid, as
/// [`NativeConfig::default`] probes them).
#[derive(Clone, Copy, Debug)]
pub struct HostBackend {
    kind: &'static str,
    make: fn(HostConfig) -> Result<Arc<dyn Runner>, Error>,
}

impl HostBackend {
    /// Kind `local`.
    pub fn local() -> Self {
        HostBackend {
            kind: "local",
            make: |host| Ok(Arc::new(LocalRunner::new(host)?)),
        }
    }

    /// Kind `native`.
    pub fn native() -> Self {
        HostBackend {
            kind: "native",
            make: |host| {
                let native = NativeConfig {
                    host,
                    ..NativeConfig::default()
                };
                Ok(Arc::new(NativeRunner::new(native)?))
            },
        }
    }
}

#[async_trait]
impl Backend for HostBackend {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn check(&self, _: &RunnerSettings, options: &serde_json::Value) -> Result<(), Error> {
        let o = parse_options::<HostOptions>(self.kind, options)?;
        if let Some(p) = o.disk_full_percent
            && !(p > 0.0 && p <= 100.0)
        {
            return Err(Error::invalid_config(format!(
                "{}.disk_full_percent: {p} is not a percentage above 0 and at most 100",
                self.kind
            )));
        }
        Ok(())
    }

    async fn build(
        &self,
        settings: &RunnerSettings,
        options: &serde_json::Value,
    ) -> Result<Arc<dyn Runner>, Error> {
        self.check(settings, options)?;
        let o = parse_options::<HostOptions>(self.kind, options)?;
        let mut host = settings.host_config();
        if let Some(p) = o.disk_full_percent {
            host.disk_full_percent = p;
        }
        (self.make)(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kinds_build_and_absent_kinds_name_their_feature() {
        let mut b = Backends::host();
        b.not_compiled("docker", "docker");
        assert_eq!(b.kinds(), vec!["local", "native"]);
        let mut settings = RunnerSettings::named("l1");
        settings.slots = Some(2);
        settings.labels = vec!["fast".into()];
        let r = b
            .build("local", &settings, &serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(r.info().name, "l1");
        assert_eq!(r.capabilities().max_concurrency, Some(2));
        assert!(r.info().labels.contains("fast"));

        let e = b.get("docker").err().unwrap().to_string();
        assert!(e.contains("cargo feature `docker`"), "{e}");
        let e = b.get("vm").err().unwrap().to_string();
        assert!(
            e.contains("unknown runner kind \"vm\"") && e.contains("local, native"),
            "{e}"
        );
        let e = b
            .check(
                "local",
                &settings,
                &serde_json::json!({"shell": "/bin/zsh"}),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("runner l1") && e.contains("unknown field `shell`"),
            "{e}"
        );
    }
}
