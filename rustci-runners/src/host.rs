//! The job loop shared by [`crate::LocalRunner`] and [`crate::NativeRunner`]: validation,
//! capability checks, workspace, environment, steps in order, outcome, cleanup.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use tokio::time::Instant;

use crate::job::{Job, JobSpec, Resources, StepAction};
use crate::mask::SecretSet;
use crate::output::OutputBudget;
use crate::process::{
    self, CgroupLimits, CgroupSupport, JobCgroup, ProcessEnd, ProcessSpec, Rlimit, ShimPlan,
    Supervision,
};
use crate::runner::{
    Capabilities, EventKind, Execution, ExecutionSink, Health, JobId, Outcome, OutputStream,
    ResourceUsage, RunnerInfo, StepStatus,
};
use crate::{Error, Limit, SlotGuard, Slots};

/// Settings shared by the host runners ([`crate::LocalRunner`], [`crate::NativeRunner`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HostConfig {
    /// Runner name.
    pub name: String,
    /// Runner id; a fresh UUID when `None` (set it to keep one id across restarts).
    pub id: Option<String>,
    /// Labels jobs can ask for.
    pub labels: Vec<String>,
    /// Shell for `run:` steps: program and leading arguments; the script file is appended.
    /// Default `/bin/sh -e`.
    pub shell: Vec<String>,
    /// Directory under which each job gets a fresh workspace. Default `$TMPDIR/rustci`.
    /// Workspaces are made in this process's owner directory
    /// (`rustci-<host>-<pid>-<start time>/`, marked with an `owner` file); a runner made
    /// on the root removes the owner directories of this host's processes that are gone,
    /// so nothing a killed process had (in use or pooled) outlives the next start.
    pub workspace_root: PathBuf,
    /// Keep workspaces after jobs end (for debugging). Default false. Kept workspaces are
    /// made directly under `workspace_root`, and no sweep removes them.
    pub keep_workspaces: bool,
    /// Host environment variables passed to jobs; nothing else of the host's environment is.
    /// Default `PATH`, `HOME`, `LANG`, `TZ`.
    pub env_allowlist: Vec<String>,
    /// Time between SIGTERM and SIGKILL when a job is stopped. Default 10 s.
    pub termination_grace: Duration,
    /// Output (both streams, all steps) kept per job; the rest is dropped behind one
    /// [`EventKind::OutputTruncated`]. Default 512 MiB.
    pub max_output_bytes: u64,
    /// Most jobs at once; `None` for no bound. Default `None`.
    pub max_concurrency: Option<usize>,
    /// Events that may wait unread before output backs up into the job. Default 64.
    pub event_buffer: usize,
    /// From this share of its file system in use (percent), the workspace disk is full:
    /// the runner's health is then [`Health::Full`] ("workspace disk 97% full") and it
    /// gets no new jobs until it recovers. Default 95.
    pub disk_full_percent: f64,
}

impl HostConfig {
    /// Defaults with the given runner name.
    pub fn named(name: impl Into<String>) -> Self {
        HostConfig {
            name: name.into(),
            ..HostConfig::default()
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            name: "host".to_string(),
            id: None,
            labels: Vec::new(),
            shell: vec!["/bin/sh".to_string(), "-e".to_string()],
            workspace_root: std::env::temp_dir().join("rustci"),
            keep_workspaces: false,
            env_allowlist: ["PATH", "HOME", "LANG", "TZ"].map(String::from).to_vec(),
            termination_grace: Duration::from_secs(10),
            max_output_bytes: 512 << 20,
            max_concurrency: None,
            event_buffer: 64,
            disk_full_percent: 95.0,
        }
    }
}

/// Isolation and limits of the native runner, resolved against this host.
#[derive(Clone, Debug, Default)]
pub(crate) struct NativePlan {
    pub cgroups: Option<Arc<CgroupSupport>>,
    pub unshare_flags: libc::c_int,
    pub mount_proc: bool,
    pub hostname: Option<String>,
    pub credentials: Option<(u32, u32)>,
    pub defaults: Resources,
    /// Enforce `resources.memory` with `RLIMIT_AS` (no cgroup memory controller).
    pub memory_rlimit: bool,
}

pub(crate) struct HostEngine {
    pub info: RunnerInfo,
    pub caps: Capabilities,
    pub config: HostConfig,
    pub native: Option<NativePlan>,
    running: Slots,
    workspaces: Arc<WorkspacePool>,
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks the parts of a host configuration that do not depend on the runner kind.
pub(crate) fn check_config(config: &HostConfig) -> Result<(), Error> {
    check_host_config(config).map_err(|e| e.for_runner(&config.name))
}

fn check_host_config(config: &HostConfig) -> Result<(), Error> {
    if !(config.disk_full_percent > 0.0 && config.disk_full_percent <= 100.0) {
        return Err(Error::invalid_config(format!(
            "disk_full_percent: {} is not a percentage above 0 and at most 100",
            config.disk_full_percent
        )));
    }
    let Some(shell) = config.shell.first() else {
        return Err(Error::invalid_config("the shell command is empty"));
    };
    if !Path::new(shell).is_absolute() {
        return Err(Error::invalid_config(format!(
            "shell {shell:?} must be an absolute path"
        )));
    }
    if !executable(Path::new(shell)) {
        return Err(Error::invalid_config(format!(
            "shell {shell} does not exist or is not executable"
        )));
    }
    check_workspace_root(&config.workspace_root).map_err(Error::invalid_config)?;
    Ok(())
}

fn check_workspace_root(root: &Path) -> Result<(), String> {
    std::fs::create_dir_all(root)
        .map_err(|e| format!("workspace root {} cannot be created: {e}", root.display()))?;
    let probe = root.join(format!(".probe-{}", crate::runner::JobId::new()));
    std::fs::create_dir(&probe)
        .and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|e| format!("workspace root {} is not writable: {e}", root.display()))
}

impl HostEngine {
    pub(crate) fn new(
        info: RunnerInfo,
        caps: Capabilities,
        config: HostConfig,
        native: Option<NativePlan>,
    ) -> Self {
        HostEngine {
            workspaces: Arc::new(WorkspacePool::new(
                config.workspace_root.clone(),
                config.keep_workspaces,
            )),
            info,
            caps,
            config,
            native,
            running: Slots::new(),
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.running.running()
    }

    /// Kills every process left of execution `id` (found by its `RUSTCI_JOB_ID`).
    pub(crate) async fn abandon(&self, id: &JobId) -> Result<(), Error> {
        self.abandon_inner(id)
            .await
            .map_err(|e| e.for_runner(&self.info.name))
    }

    async fn abandon_inner(&self, id: &JobId) -> Result<(), Error> {
        let id = id.to_string();
        let killed = tokio::task::spawn_blocking(move || crate::process::kill_execution(&id))
            .await
            .unwrap_or(0);
        if killed > 0 {
            tracing::info!(runner = %self.info.name, killed, "killed processes of an abandoned job");
        }
        Ok(())
    }

    pub(crate) fn health(&self) -> Health {
        if let Some(shell) = self.config.shell.first()
            && !executable(Path::new(shell))
        {
            return Health::Unhealthy(format!("shell {shell} is missing or not executable"));
        }
        if let Err(e) = check_workspace_root(&self.config.workspace_root) {
            return Health::Unhealthy(e);
        }
        match self.pressure().disk_used_percent {
            Some(used) if used >= self.config.disk_full_percent => Health::Full(format!(
                "workspace disk {:.0}% full (at most {}% for new jobs)",
                used.floor(),
                self.config.disk_full_percent
            )),
            _ => Health::Healthy,
        }
    }

    /// Load, memory and the workspace root's file system, measured now.
    pub(crate) fn pressure(&self) -> crate::runner::HostPressure {
        crate::runner::HostPressure::measure(&self.config.workspace_root)
    }

    pub(crate) async fn start(&self, spec: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        self.start_inner(spec, id)
            .await
            .map_err(|e| e.for_runner(&self.info.name))
    }

    async fn start_inner(&self, spec: &dyn JobSpec, id: JobId) -> Result<Execution, Error> {
        let job = spec.to_job();
        job.validate().map_err(Error::InvalidSpec)?;
        let reasons = self.caps.unmet(&job);
        if !reasons.is_empty() {
            return Err(Error::Unsupported {
                runner: self.info.name.clone(),
                reasons,
            });
        }
        let slot = self
            .running
            .acquire(&self.info.name, self.caps.max_concurrency)?;
        let resources = effective_resources(&job.resources, self.native.as_ref());

        let workspace = self.workspaces.acquire()?;
        let mut guard = WorkspaceGuard {
            path: Some(workspace.clone()),
            keep: self.config.keep_workspaces,
            pool: self.workspaces.clone(),
            fresh: None,
        };
        let cwd = match &job.workdir {
            Some(w) => workspace.join(w),
            None => workspace.clone(),
        };
        std::fs::create_dir_all(&cwd).map_err(|e| {
            Error::io(
                format!("cannot create working directory {}", cwd.display()),
                e,
            )
        })?;
        let native = self.native.clone().unwrap_or_default();
        if let Some((uid, gid)) = native.credentials {
            for dir in cwd.ancestors().take_while(|d| d.starts_with(&workspace)) {
                nix::unistd::chown(dir, Some(uid.into()), Some(gid.into())).map_err(|e| {
                    Error::io(
                        format!("cannot hand {} to uid {uid}", dir.display()),
                        e.into(),
                    )
                })?;
            }
        }
        let cgroup = match &native.cgroups {
            Some(support) if needs_cgroup(&resources) => JobCgroup::create(
                support,
                &format!("job-{id}"),
                CgroupLimits {
                    memory: resources.memory,
                    pids: resources.pids,
                    cpus: resources.cpus,
                },
            )?,
            _ => None,
        };

        let (execution, sink) = Execution::channel(id, self.config.event_buffer);
        let run = JobRun {
            secrets: SecretSet::new(job.secrets.values().map(String::as_str)),
            budget: OutputBudget::new(self.config.max_output_bytes),
            env: self.base_env(&job, sink.job_id(), &workspace),
            job,
            sink,
            info: self.info.clone(),
            shell: self.config.shell.clone(),
            grace: self.config.termination_grace,
            cwd,
            workspace: guard.path.take().map(|path| WorkspaceGuard {
                fresh: Fingerprint::of(&path),
                path: Some(path),
                keep: guard.keep,
                pool: guard.pool.clone(),
            }),
            cgroup,
            native,
            resources,
            scripts: Vec::new(),
            slot: Some(slot),
            usage: process::UsageTotals::default(),
        };
        tokio::spawn(run.run());
        Ok(execution)
    }

    fn base_env(&self, job: &Job, id: &JobId, workspace: &Path) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for name in &self.config.env_allowlist {
            if let Ok(value) = std::env::var(name) {
                env.push((name.clone(), value));
            }
        }
        env.push(("CI".into(), "true".into()));
        env.push(("RUSTCI".into(), "true".into()));
        env.push(("RUSTCI_JOB_ID".into(), id.to_string()));
        env.push(("RUSTCI_JOB_NAME".into(), job.name.clone()));
        env.push(("RUSTCI_RUNNER".into(), self.info.name.clone()));
        env.push(("RUSTCI_WORKSPACE".into(), workspace.display().to_string()));
        env
    }
}

fn needs_cgroup(r: &Resources) -> bool {
    r.memory.is_some() || r.pids.is_some() || r.cpus.is_some()
}

/// The job's limits, tightened by the runner's defaults.
fn effective_resources(job: &Resources, native: Option<&NativePlan>) -> Resources {
    let Some(native) = native else {
        return job.clone();
    };
    let d = &native.defaults;
    fn min<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b < a { b } else { a }),
            (a, b) => a.or(b),
        }
    }
    Resources {
        cpus: min(job.cpus, d.cpus),
        memory: min(job.memory, d.memory),
        pids: min(job.pids, d.pids),
        cpu_time: min(job.cpu_time, d.cpu_time),
        open_files: min(job.open_files, d.open_files),
        file_size: min(job.file_size, d.file_size),
    }
}

/// Limits enforced by rlimits on every host.
pub(crate) const RLIMIT_LIMITS: [Limit; 3] = [Limit::CpuTime, Limit::OpenFiles, Limit::FileSize];

fn rlimits(r: &Resources, memory_rlimit: bool) -> Vec<Rlimit> {
    let mut out = Vec::new();
    if memory_rlimit && let Some(bytes) = r.memory {
        out.push(Rlimit {
            resource: libc::RLIMIT_AS,
            value: bytes,
        });
    }
    if let Some(t) = r.cpu_time {
        out.push(Rlimit {
            resource: libc::RLIMIT_CPU,
            value: t.as_secs().max(1) + u64::from(t.subsec_nanos() > 0 && t.as_secs() > 0),
        });
    }
    if let Some(n) = r.open_files {
        out.push(Rlimit {
            resource: libc::RLIMIT_NOFILE,
            value: n,
        });
    }
    if let Some(n) = r.file_size {
        out.push(Rlimit {
            resource: libc::RLIMIT_FSIZE,
            value: n,
        });
    }
    out
}

struct JobRun {
    job: Job,
    sink: ExecutionSink,
    info: RunnerInfo,
    shell: Vec<String>,
    grace: Duration,
    cwd: PathBuf,
    workspace: Option<WorkspaceGuard>,
    cgroup: Option<JobCgroup>,
    native: NativePlan,
    resources: Resources,
    secrets: SecretSet,
    budget: OutputBudget,
    env: Vec<(String, String)>,
    scripts: Vec<PathBuf>,
    slot: Option<SlotGuard>,
    usage: process::UsageTotals,
}

/// Gives a workspace back when dropped, unless it is to be kept.
struct WorkspaceGuard {
    path: Option<PathBuf>,
    keep: bool,
    pool: Arc<WorkspacePool>,
    /// The directory's state when the job got it.
    fresh: Option<Fingerprint>,
}

impl Drop for WorkspaceGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && !self.keep
        {
            self.pool.release(path, self.fresh);
        }
    }
}

/// What must be unchanged for an emptied workspace to count as fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.is_dir().then(|| Fingerprint {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

/// Workspace directories of one runner.
///
/// Each job gets a directory of its own that is empty when the job starts. When a job
/// ends, its directory is deleted; but a directory the job left exactly as it got it
/// (empty, same mode and owner, no extended attributes) is indistinguishable from a new
/// one, so it is kept for the next job instead: on most file systems removing a directory
/// costs several times more than everything else a short job's runner does. Dropping the
/// runner deletes the kept directories.
///
/// Workspaces live in an owner directory of this process under the root,
/// `rustci-<host>-<pid>-<start time>/`, whose `owner` file names the process (host, pid
/// and start time, [`crate::owner::owner_token`]). A runner made on the root later sweeps
/// the owner directories of processes of this host that are gone (killed, crashed) with
/// everything in them, as the Docker and Kubernetes runners sweep their containers and
/// pods; the last runner of a process on a root removes its owner directory when it is
/// dropped and empty. With `keep_workspaces`, workspaces are made directly under the root
/// and nothing sweeps them: they are the user's to look at and remove.
#[derive(Debug)]
pub(crate) struct WorkspacePool {
    /// Where workspaces are made: the owner directory, or the root itself when they are
    /// kept.
    home: PathBuf,
    /// Whether `home` is this process's owner directory.
    owned: bool,
    /// `home` with its existing part resolved (symbolic links, `..`): the key of
    /// [`OWNER_DIRS`], so that two spellings of one root share one count.
    key: PathBuf,
    /// `home` (and its `owner` file) exist, as far as this pool knows.
    ready: std::sync::atomic::AtomicBool,
    free: std::sync::Mutex<Vec<PathBuf>>,
}

const POOLED_WORKSPACES: usize = 64;

/// The name of the file naming an owner directory's process.
const OWNER_FILE: &str = "owner";

/// Pools of this process per owner directory, so that the last one removes it.
static OWNER_DIRS: std::sync::Mutex<Vec<(PathBuf, usize)>> = std::sync::Mutex::new(Vec::new());

/// This process's owner directory's name: `rustci-<host>-<pid>-<start time>`, the host
/// name reduced to letters, digits, `.` and `-`.
fn owner_dir_name() -> String {
    let host: String = crate::owner::this_host()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let token = crate::owner::owner_token();
    let mut parts = token.rsplit('/');
    let start = parts.next().unwrap_or("0");
    let pid = parts.next().unwrap_or("0");
    format!("rustci-{host}-{pid}-{start}")
}

/// `path` with its longest existing prefix canonicalized (the rest appended as is).
fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Removes the owner directories under `root` whose process (on this host) is gone;
/// returns how many. Directories of live processes, of other hosts and anything
/// without an `owner` file are left alone.
pub(crate) fn sweep_workspaces(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let host = crate::owner::this_host();
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("rustci-")
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let dir = entry.path();
        let Ok(token) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if crate::owner::owner_alive(token.trim(), &host) == Some(false) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => swept += 1,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove the workspaces of a process that is gone")
                }
            }
        }
    }
    swept
}

impl WorkspacePool {
    fn new(root: PathBuf, keep: bool) -> Self {
        let swept = sweep_workspaces(&root);
        if swept > 0 {
            tracing::info!(root = %root.display(), swept, "removed the workspaces of processes that are gone");
        }
        let (home, owned) = if keep {
            (root.clone(), false)
        } else {
            (root.join(owner_dir_name()), true)
        };
        let key = resolved(&home);
        if owned {
            let mut dirs = OWNER_DIRS.lock().expect("owner dirs");
            match dirs.iter_mut().find(|(d, _)| *d == key) {
                Some((_, n)) => *n += 1,
                None => dirs.push((key.clone(), 1)),
            }
        }
        WorkspacePool {
            home,
            owned,
            key,
            ready: std::sync::atomic::AtomicBool::new(false),
            free: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Makes `home` (and its `owner` file) if missing.
    fn prepare(&self) -> Result<(), Error> {
        std::fs::create_dir_all(&self.home).map_err(|e| {
            Error::io(
                format!("cannot create workspace root {}", self.home.display()),
                e,
            )
        })?;
        if self.owned {
            let marker = self.home.join(OWNER_FILE);
            if !marker.exists() {
                std::fs::write(&marker, crate::owner::owner_token())
                    .map_err(|e| Error::io(format!("cannot write {}", marker.display()), e))?;
            }
        }
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// An empty directory for one job (a new one when workspaces are kept).
    fn acquire(&self) -> Result<PathBuf, Error> {
        while let Some(path) = self.free.lock().expect("workspace pool").pop() {
            // Someone may have removed it (or the whole root) meanwhile.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                return Ok(path);
            }
        }
        // The owner file is checked too: without it a crash would leave this process's
        // workspaces unswept (a temporary-file cleaner may have removed it, say).
        if !self.ready.load(std::sync::atomic::Ordering::Acquire)
            || (self.owned && !self.home.join(OWNER_FILE).exists())
        {
            self.prepare()?;
        }
        let path = self.home.join(format!("ws-{}", JobId::new()));
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(path),
            // The root went away since (removed, moved): made again once.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.prepare()?;
                std::fs::create_dir(&path).map_err(|e| {
                    Error::io(format!("cannot create workspace {}", path.display()), e)
                })?;
                Ok(path)
            }
            Err(e) => Err(Error::io(
                format!("cannot create workspace {}", path.display()),
                e,
            )),
        }
    }

    fn release(&self, path: PathBuf, fresh: Option<Fingerprint>) {
        let untouched = fresh.is_some()
            && Fingerprint::of(&path) == fresh
            && std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none())
            && !has_xattrs(&path);
        if untouched {
            let mut free = self.free.lock().expect("workspace pool");
            if free.len() < POOLED_WORKSPACES {
                free.push(path);
                return;
            }
        }
        if std::fs::remove_dir(&path).is_err() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

impl Drop for WorkspacePool {
    fn drop(&mut self) {
        for path in self.free.get_mut().map(std::mem::take).unwrap_or_default() {
            let _ = std::fs::remove_dir(path);
        }
        if !self.owned {
            return;
        }
        let mut dirs = OWNER_DIRS.lock().expect("owner dirs");
        let Some(i) = dirs.iter().position(|(d, _)| *d == self.key) else {
            return;
        };
        dirs[i].1 -= 1;
        if dirs[i].1 > 0 {
            return;
        }
        dirs.swap_remove(i);
        // The last pool of this process on it (the lock keeps new ones out): removed when
        // nothing but the owner file is left; otherwise (a job still running) it stays,
        // marked, for the next sweep.
        let only_marker = std::fs::read_dir(&self.home)
            .is_ok_and(|d| d.flatten().all(|e| e.file_name() == OWNER_FILE));
        if only_marker {
            let _ = std::fs::remove_file(self.home.join(OWNER_FILE));
            let _ = std::fs::remove_dir(&self.home);
        }
    }
}

fn has_xattrs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return true;
    };
    // SAFETY: a size query with a null buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    n != 0
}

/// Figures from the kernel's rusage: (user seconds, system seconds, bytes read, bytes
/// written).
fn rusage_figures((user, system, read, written): (f64, f64, u64, u64)) -> ResourceUsage {
    ResourceUsage {
        cpu_user_seconds: Some(user),
        cpu_system_seconds: Some(system),
        read_bytes: Some(read),
        written_bytes: Some(written),
        source: "rusage".into(),
        ..Default::default()
    }
}

/// Scripts up to this size are passed with `-c`; longer ones through a file.
const INLINE_SCRIPT_BYTES: usize = 64 * 1024;

impl JobRun {
    async fn run(mut self) {
        let span = tracing::info_span!("job", job_id = %self.sink.job_id(), job = %self.job.name, runner = %self.info.name);
        tracing::debug!(parent: &span, steps = self.job.steps.len(), "job started");
        self.sink
            .emit(EventKind::Started {
                job_id: self.sink.job_id().to_string(),
                runner_id: self.info.id.clone(),
                runner_kind: self.info.kind,
            })
            .await;
        let outcome = self.steps().await;
        tracing::info!(parent: &span, %outcome, "job ended");
        let usage = self.measured();
        if !usage.is_empty() {
            self.sink.emit(EventKind::Usage { step: None, usage }).await;
        }
        self.cleanup().await;
        self.sink.finish(outcome).await;
    }

    /// What the job used: CPU time and I/O from `wait4` of its steps' shims (the
    /// kernel's rusage of every process they reaped), peak memory from its memory cgroup
    /// when it has one (a job with a memory limit on a native runner). The rusage's own
    /// maximum RSS is not used: a process started from the runner's address space (as
    /// every step is, for speed) inherits the runner's high-water mark at `exec`.
    fn measured(&self) -> ResourceUsage {
        let mut usage = self
            .usage
            .snapshot()
            .since(&Default::default())
            .map(rusage_figures)
            .unwrap_or_default();
        if let Some((peak, layout)) = self.cgroup.as_ref().and_then(|c| c.peak_memory()) {
            usage.peak_memory_bytes = Some(peak);
            usage.source = if usage.source.is_empty() {
                format!("{layout} (memory)")
            } else {
                format!("{}, {layout} (memory)", usage.source)
            };
        }
        usage
    }

    async fn cleanup(&mut self) {
        if let Some(mut cg) = self.cgroup.take() {
            // Removing a cgroup may wait for the kernel to let go of it: off the runtime.
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        for script in self.scripts.drain(..) {
            let _ = std::fs::remove_file(script);
        }
        self.workspace.take();
        self.slot.take();
    }

    async fn steps(&mut self) -> Outcome {
        let started = Instant::now();
        let job_deadline = started + self.job.effective_timeout();
        let steps = self.job.steps.clone();
        for (index, step) in steps.iter().enumerate() {
            // A cancel or the job's deadline between two steps starts no further step:
            // checked here, not only while a step runs.
            if self.sink.is_cancelled() {
                return Outcome::Cancelled;
            }
            let name = step.display_name(index);
            if Instant::now() >= job_deadline {
                return Outcome::TimedOut { step: Some(index) };
            }
            self.sink
                .emit(EventKind::StepStarted {
                    step: index,
                    name: name.clone(),
                })
                .await;
            let step_started = Instant::now();
            let deadline = match step.timeout {
                Some(t) => job_deadline.min(step_started + t),
                None => job_deadline,
            };
            let (program, args) = match &step.action {
                StepAction::Run(script) => {
                    let mut args: Vec<OsString> =
                        self.shell[1..].iter().map(OsString::from).collect();
                    if script.len() <= INLINE_SCRIPT_BYTES {
                        args.push("-c".into());
                        args.push(script.into());
                    } else {
                        // Too long for one argument: a file beside the workspace.
                        let file = match self.workspace.as_ref().and_then(|w| w.path.as_ref()) {
                            Some(w) => w.with_extension(format!("step-{index}.sh")),
                            None => PathBuf::new(),
                        };
                        if let Err(e) = write_script(&file, script, self.native.credentials) {
                            return self
                                .step_error(
                                    index,
                                    &name,
                                    step_started,
                                    format!(
                                        "cannot write the script of step {name:?} to {}: {e}",
                                        file.display()
                                    ),
                                    crate::error::is_shortage(&e),
                                )
                                .await;
                        }
                        self.scripts.push(file.clone());
                        args.push(file.into_os_string());
                    }
                    (OsString::from(&self.shell[0]), args)
                }
                StepAction::Command(argv) => (
                    OsString::from(&argv[0]),
                    argv[1..].iter().map(OsString::from).collect(),
                ),
            };
            // Later entries win, secrets last, so no `env` entry can shadow a secret; one
            // entry per name reaches the process.
            let env = crate::backend::step_environment(&self.env, &self.job, step);
            let cgroup_procs = self
                .cgroup
                .as_ref()
                .map(JobCgroup::procs_files)
                .unwrap_or_default();
            let plan = ShimPlan {
                cgroup_procs: cgroup_procs
                    .iter()
                    .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
                    .collect(),
                unshare_flags: self.native.unshare_flags,
                mount_proc: self.native.mount_proc,
                hostname: self
                    .native
                    .hostname
                    .as_ref()
                    .and_then(|h| std::ffi::CString::new(h.as_str()).ok()),
                rlimits: rlimits(&self.resources, self.native.memory_rlimit),
                credentials: self.native.credentials,
            };
            let spec = ProcessSpec {
                program: program.clone(),
                args,
                env,
                cwd: self.cwd.clone(),
                plan,
                cgroup_procs,
            };
            let supervision = Supervision {
                sink: &self.sink,
                usage: &self.usage,
                step: index,
                secrets: &self.secrets,
                output: &self.budget,
                grace: self.grace,
                deadline,
            };
            let before = self.usage.snapshot();
            let end = process::supervise(spec, supervision).await;
            let elapsed = step_started.elapsed();
            if let Some(figures) = self.usage.snapshot().since(&before) {
                self.sink
                    .emit(EventKind::Usage {
                        step: Some(index),
                        usage: rusage_figures(figures),
                    })
                    .await;
            }
            let finish = |status| EventKind::StepFinished {
                step: index,
                name: name.clone(),
                status,
                duration: elapsed,
            };
            match end {
                Err(spawn_error) => {
                    let program = program.to_string_lossy().into_owned();
                    let e = &spawn_error.error;
                    let message = match (spawn_error.stage, e.kind()) {
                        (Some(stage), _) => format!("cannot start {program}: {stage} failed: {e}"),
                        (None, std::io::ErrorKind::NotFound) => {
                            format!("command not found: {program}")
                        }
                        (None, std::io::ErrorKind::PermissionDenied) => {
                            format!("permission denied: {program}")
                        }
                        (None, _) => format!("cannot start {program}: {e}"),
                    };
                    let message = self.secrets.mask_str(&message);
                    if matches!(step.action, StepAction::Run(_)) || spawn_error.stage.is_some() {
                        // The shell itself, or the isolation around the step, could not be
                        // set up: the runner's problem, not the job's.
                        let temporary = crate::error::is_shortage(e);
                        return self
                            .step_error(index, &name, step_started, message, temporary)
                            .await;
                    }
                    self.sink
                        .emit(EventKind::Output {
                            step: index,
                            stream: OutputStream::Stderr,
                            data: format!("rustci: {message}\n").into(),
                        })
                        .await;
                    self.sink.emit(finish(StepStatus::NotStarted)).await;
                    let exit_code = if e.kind() == std::io::ErrorKind::NotFound {
                        127
                    } else {
                        126
                    };
                    if !step.continue_on_error {
                        return Outcome::Failed {
                            step: index,
                            step_name: name,
                            exit_code,
                        };
                    }
                }
                Ok(ProcessEnd::Exited(0)) => self.sink.emit(finish(StepStatus::Exited(0))).await,
                Ok(ProcessEnd::Exited(code)) => {
                    self.sink.emit(finish(StepStatus::Exited(code))).await;
                    if !step.continue_on_error {
                        return Outcome::Failed {
                            step: index,
                            step_name: name,
                            exit_code: code,
                        };
                    }
                }
                Ok(ProcessEnd::Signalled(signal)) => {
                    self.sink.emit(finish(StepStatus::Signalled(signal))).await;
                    let oom_killed = self.cgroup.as_ref().is_some_and(JobCgroup::oom_killed);
                    if !step.continue_on_error {
                        return Outcome::Signalled {
                            step: index,
                            step_name: name,
                            signal,
                            oom_killed,
                        };
                    }
                }
                Ok(ProcessEnd::TimedOut) => {
                    self.sink.emit(finish(StepStatus::TimedOut)).await;
                    return Outcome::TimedOut { step: Some(index) };
                }
                Ok(ProcessEnd::SupervisorLost) => {
                    self.sink.emit(finish(StepStatus::NotStarted)).await;
                    return Outcome::RunnerError {
                        message: format!(
                            "the supervisor of step {name:?} was killed or stopped; its processes were killed"
                        ),
                        // Killed from outside the job's own steps' control (an OOM kill of
                        // the host, a `kill` of the supervisor): running it again may work,
                        // and the job's retry policy bounds how often.
                        temporary: true,
                    };
                }
                Ok(ProcessEnd::Cancelled) => {
                    self.sink.emit(finish(StepStatus::Cancelled)).await;
                    return Outcome::Cancelled;
                }
            }
        }
        Outcome::Succeeded
    }

    async fn step_error(
        &self,
        index: usize,
        name: &str,
        started: Instant,
        message: String,
        temporary: bool,
    ) -> Outcome {
        self.sink
            .emit(EventKind::StepFinished {
                step: index,
                name: name.to_string(),
                status: StepStatus::NotStarted,
                duration: started.elapsed(),
            })
            .await;
        Outcome::RunnerError { message, temporary }
    }
}

fn write_script(path: &Path, script: &str, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A new file only (never through a symlink), readable by its owner alone.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(script.as_bytes())?;
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(path, Some(uid.into()), Some(gid.into()))?;
    }
    Ok(())
}

/// Labels every host runner carries: operating system and architecture.
pub(crate) fn host_labels(extra: &[String]) -> BTreeSet<String> {
    let mut labels: BTreeSet<String> = extra.iter().cloned().collect();
    labels.insert(std::env::consts::OS.to_string());
    labels.insert(std::env::consts::ARCH.to_string());
    labels
}
