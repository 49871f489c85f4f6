//! [`NativeRunner`]: direct exec of `command:` steps (and `run:` steps through a shell)
//! with limits enforced by the kernel.
//!
//! Limits come from the job's `resources`, tightened by the runner's defaults:
//!
//! | resource     | enforced by                          | available                        |
//! |--------------|--------------------------------------|----------------------------------|
//! | `cpu_time`   | `RLIMIT_CPU`                         | always                           |
//! | `open_files` | `RLIMIT_NOFILE`                      | always                           |
//! | `file_size`  | `RLIMIT_FSIZE`                       | always                           |
//! | `memory`     | cgroup memory controller (no swap)   | when cgroups are usable          |
//! | `pids`       | cgroup pids controller               | when cgroups are usable          |
//! | `cpus`       | cgroup CPU quota                     | when cgroups are usable          |
//!
//! Where no cgroup memory controller is usable, [`NativeConfig::address_space_fallback`]
//! enforces `memory` as an address-space limit (`RLIMIT_AS`) instead; it is off by default
//! because address space counts mapped but unused memory too.
//!
//! [`Capabilities::limits`] lists exactly the limits enforced on this host; a job asking
//! for another one is refused before anything runs. Optional namespaces (PID with its own
//! `/proc`, mount, IPC, UTS, network) are probed at construction and reported in
//! [`NativeRunner::isolation`]; a namespace the host does not permit is an error at
//! construction, never silently skipped.

use std::sync::Arc;

use async_trait::async_trait;

use crate::Error;
use crate::host::{HostConfig, HostEngine, NativePlan, RLIMIT_LIMITS, check_config, host_labels};
use crate::job::{JobSpec, Resources};
use crate::process::CgroupSupport;
use crate::runner::{
    Capabilities, Execution, Health, Isolation, JobId, Runner, RunnerInfo, RunnerKind, UsageFigure,
};

/// Linux namespaces to put each step in.
///
/// With a PID namespace, each step's namespace init is a real `fork` of the runner (it
/// must outlive the `exec` of the step's command), so starting a step copies the runner's
/// page tables and the runner's memory is shared copy-on-write with it while the step runs;
/// without one, steps start with no copy at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Namespaces {
    /// New PID namespace with its own `/proc` (implies a mount namespace). When the step's
    /// main process exits, the kernel kills everything left in it.
    pub pid: bool,
    /// New mount namespace.
    pub mount: bool,
    /// New IPC namespace.
    pub ipc: bool,
    /// New UTS namespace with host name `rustci-job`.
    pub uts: bool,
    /// New network namespace: only an unconfigured loopback, so no network.
    pub net: bool,
}

impl Namespaces {
    /// Every namespace but the network one.
    pub fn all_but_network() -> Self {
        Namespaces {
            pid: true,
            mount: true,
            ipc: true,
            uts: true,
            net: false,
        }
    }

    fn any(&self) -> bool {
        self.pid || self.mount || self.ipc || self.uts || self.net
    }

    fn flags(&self) -> libc::c_int {
        let mut f = 0;
        if self.pid {
            f |= libc::CLONE_NEWPID | libc::CLONE_NEWNS;
        }
        if self.mount {
            f |= libc::CLONE_NEWNS;
        }
        if self.ipc {
            f |= libc::CLONE_NEWIPC;
        }
        if self.uts {
            f |= libc::CLONE_NEWUTS;
        }
        if self.net {
            f |= libc::CLONE_NEWNET;
        }
        f
    }
}

/// Whether to use cgroups for memory, pids and CPU limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CgroupMode {
    /// Use them when the host permits; limits they would enforce are otherwise not offered.
    #[default]
    Auto,
    /// Never use them.
    Off,
    /// Fail at construction when they cannot be used.
    Required,
}

/// Configuration of a [`NativeRunner`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NativeConfig {
    /// Settings shared with the local runner.
    pub host: HostConfig,
    /// Namespaces for every step. Default none.
    pub namespaces: Namespaces,
    /// cgroup use. Default [`CgroupMode::Auto`].
    pub cgroups: CgroupMode,
    /// Name of the parent cgroup under which job cgroups are made. Default `rustci`.
    pub cgroup_parent: String,
    /// Run steps as this uid and gid (needs root). Default: the runner's own.
    pub run_as: Option<(u32, u32)>,
    /// Limits applied to every job; a job's own limit can only be lower.
    pub default_resources: Resources,
    /// When cgroups cannot enforce `resources.memory`, enforce it as an address-space
    /// limit (`RLIMIT_AS`) per process instead. Default false.
    pub address_space_fallback: bool,
}

impl Default for NativeConfig {
    fn default() -> Self {
        NativeConfig {
            host: HostConfig::named("native"),
            namespaces: Namespaces::default(),
            cgroups: CgroupMode::Auto,
            cgroup_parent: "rustci".to_string(),
            run_as: None,
            default_resources: Resources::default(),
            address_space_fallback: false,
        }
    }
}

/// Runs `command:` steps by direct exec and `run:` steps through a shell, with limits
/// enforced by the kernel.
pub struct NativeRunner {
    engine: HostEngine,
    isolation: String,
}

impl NativeRunner {
    /// A native runner; probes what this host permits. Fails with
    /// an [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) error when a requested namespace, uid switch or required cgroup
    /// setup is not possible here, or when the shell or workspace root are unusable.
    pub fn new(config: NativeConfig) -> Result<Self, Error> {
        let name = config.host.name.clone();
        Self::probe(config).map_err(|e| e.for_runner(&name))
    }

    fn probe(config: NativeConfig) -> Result<Self, Error> {
        check_config(&config.host)?;
        let mut plan = NativePlan {
            defaults: config.default_resources.clone(),
            ..NativePlan::default()
        };
        let mut notes = Vec::new();
        if config.namespaces.any() {
            let flags = config.namespaces.flags();
            if !crate::process::probe_namespaces(flags, config.namespaces.pid) {
                return Err(Error::invalid_config(format!(
                    "this host does not permit the requested namespaces ({:?})",
                    config.namespaces
                )));
            }
            plan.unshare_flags = flags;
            plan.mount_proc = config.namespaces.pid;
            if config.namespaces.uts {
                plan.hostname = Some("rustci-job".to_string());
            }
            notes.push(format!("namespaces {:?}", config.namespaces));
        }
        if let Some((uid, gid)) = config.run_as {
            if !nix::unistd::geteuid().is_root() {
                return Err(Error::invalid_config(format!(
                    "run_as uid {uid} gid {gid} needs the runner to run as root"
                )));
            }
            plan.credentials = Some((uid, gid));
            notes.push(format!("uid {uid} gid {gid}"));
        }
        let mut info = RunnerInfo::new(config.host.name.clone(), RunnerKind::Native);
        if let Some(id) = &config.host.id {
            info.id = id.clone();
        }
        info.labels = host_labels(&config.host.labels);
        let isolation = if config.namespaces.any() {
            Isolation::Namespaces
        } else {
            Isolation::Process
        };
        let mut caps = Capabilities::host(isolation);
        caps.command_steps = true;
        // From the kernel's rusage of each step's processes; peak memory too, from the
        // job's memory cgroup, for a job with a memory limit (not declared: not every job).
        caps.usage = [UsageFigure::CpuTime, UsageFigure::Io].into();
        caps.max_concurrency = config.host.max_concurrency;
        caps.termination_grace = config.host.termination_grace;
        caps.limits.extend(RLIMIT_LIMITS);
        if config.cgroups != CgroupMode::Off {
            let support = CgroupSupport::detect(&config.cgroup_parent);
            if support == CgroupSupport::None && config.cgroups == CgroupMode::Required {
                return Err(Error::invalid_config(
                    "cgroups are required but cannot be used on this host",
                ));
            }
            caps.limits.extend(support.limits());
            notes.push(format!(
                "{} ({})",
                support.describe(),
                support
                    .limits()
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            if support != CgroupSupport::None {
                plan.cgroups = Some(Arc::new(support));
            }
        }
        if config.address_space_fallback && !caps.limits.contains(&crate::Limit::Memory) {
            caps.limits.insert(crate::Limit::Memory);
            plan.memory_rlimit = true;
            notes.push("memory as address space (RLIMIT_AS)".to_string());
        }
        // A runner-wide default limit the host cannot enforce would be skipped silently.
        let unenforced: Vec<&str> = crate::Limit::requested_by(&config.default_resources)
            .difference(&caps.limits)
            .map(|l| l.as_str())
            .collect();
        if !unenforced.is_empty() {
            return Err(Error::invalid_config(format!(
                "default resources.{} cannot be enforced on this host",
                unenforced.join(", resources.")
            )));
        }
        Ok(NativeRunner {
            engine: HostEngine::new(info, caps, config.host, Some(plan)),
            isolation: if notes.is_empty() {
                "process group and session".to_string()
            } else {
                notes.join("; ")
            },
        })
    }

    /// What this runner enforces on this host, in words.
    pub fn isolation(&self) -> &str {
        &self.isolation
    }
}

#[async_trait]
impl Runner for NativeRunner {
    fn info(&self) -> &RunnerInfo {
        &self.engine.info
    }
    fn capabilities(&self) -> &Capabilities {
        &self.engine.caps
    }
    fn running(&self) -> usize {
        self.engine.running()
    }
    async fn health(&self) -> Health {
        self.engine.health()
    }
    fn pressure(&self) -> Option<crate::runner::HostPressure> {
        Some(self.engine.pressure())
    }
    async fn start(&self, job: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        self.engine.start(job, id).await
    }
    async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        self.engine.abandon(id).await
    }
}
