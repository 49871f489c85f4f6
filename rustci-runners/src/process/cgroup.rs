//! Per-job cgroups for memory, pids and CPU limits, on cgroup v2 or the v1 hierarchies.
//!
//! The layout is detected once ([`CgroupSupport::detect`]); each job then gets its own
//! directory under `<mount>/<parent>/` (v2) or `<mount>/<controller>/<parent>/` (v1),
//! which its processes join before `exec` and which is removed when the job ends.

use std::path::{Path, PathBuf};

use crate::runner::Limit;

const V2_MOUNT: &str = "/sys/fs/cgroup";

/// Which cgroup layout this host has and which controllers a job cgroup can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CgroupSupport {
    /// cgroups cannot be used (not mounted, or no permission).
    None,
    /// The unified hierarchy: one parent directory with the usable controllers enabled.
    V2 {
        parent: PathBuf,
        memory: bool,
        pids: bool,
        cpu: bool,
    },
    /// Separate v1 hierarchies, one parent directory per usable controller.
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
    },
}

impl CgroupSupport {
    /// Detects the layout and prepares `parent_name` under each usable controller.
    pub(crate) fn detect(parent_name: &str) -> CgroupSupport {
        let root = Path::new(V2_MOUNT);
        if root.join("cgroup.controllers").exists() {
            return Self::detect_v2(&root.join(parent_name));
        }
        let prepare = |controller: &str, probe_file: &str| -> Option<PathBuf> {
            let mount = root.join(controller);
            if !mount.join("cgroup.procs").exists() {
                return None;
            }
            let parent = mount.join(parent_name);
            std::fs::create_dir_all(&parent).ok()?;
            // Prove that a child can be made here.
            let probe = parent.join(format!("probe-{}", std::process::id()));
            std::fs::create_dir(&probe).ok()?;
            let ok = probe.join(probe_file).exists();
            let _ = std::fs::remove_dir(&probe);
            ok.then_some(parent)
        };
        let memory = prepare("memory", "memory.limit_in_bytes");
        let pids = prepare("pids", "pids.max");
        let cpu = prepare("cpu", "cpu.cfs_quota_us");
        if memory.is_none() && pids.is_none() && cpu.is_none() {
            CgroupSupport::None
        } else {
            CgroupSupport::V1 { memory, pids, cpu }
        }
    }

    fn detect_v2(parent: &Path) -> CgroupSupport {
        let available = std::fs::read_to_string(Path::new(V2_MOUNT).join("cgroup.controllers"))
            .unwrap_or_default();
        if std::fs::create_dir_all(parent).is_err() {
            return CgroupSupport::None;
        }
        let mut enabled = Vec::new();
        for c in ["memory", "pids", "cpu"] {
            if available.split_whitespace().any(|a| a == c)
                && std::fs::write(
                    Path::new(V2_MOUNT).join("cgroup.subtree_control"),
                    format!("+{c}"),
                )
                .is_ok()
                && std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
            {
                enabled.push(c);
            }
        }
        if enabled.is_empty() {
            return CgroupSupport::None;
        }
        CgroupSupport::V2 {
            parent: parent.to_path_buf(),
            memory: enabled.contains(&"memory"),
            pids: enabled.contains(&"pids"),
            cpu: enabled.contains(&"cpu"),
        }
    }

    /// The limits this layout enforces.
    pub(crate) fn limits(&self) -> Vec<Limit> {
        let (m, p, c) = match self {
            CgroupSupport::None => (false, false, false),
            CgroupSupport::V2 {
                memory, pids, cpu, ..
            } => (*memory, *pids, *cpu),
            CgroupSupport::V1 { memory, pids, cpu } => {
                (memory.is_some(), pids.is_some(), cpu.is_some())
            }
        };
        let mut out = Vec::new();
        if m {
            out.push(Limit::Memory);
        }
        if p {
            out.push(Limit::Pids);
        }
        if c {
            out.push(Limit::Cpus);
        }
        out
    }

    /// A human-readable name of the layout.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            CgroupSupport::None => "none",
            CgroupSupport::V2 { .. } => "cgroup v2",
            CgroupSupport::V1 { .. } => "cgroup v1",
        }
    }
}

/// The cgroup directories of one job.
#[derive(Debug)]
pub(crate) struct JobCgroup {
    dirs: Vec<PathBuf>,
    memory_dir: Option<(PathBuf, bool)>,
}

/// Limits to write into a job cgroup.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CgroupLimits {
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), crate::Error> {
    let path = dir.join(file);
    std::fs::write(&path, value)
        .map_err(|e| crate::Error::io(format!("cannot write {value:?} to {}", path.display()), e))
}

impl JobCgroup {
    /// Creates the job's directories and writes its limits. Only controllers with a limit
    /// are used, except that one directory is always made so that the job's processes can
    /// be found and killed through it.
    pub(crate) fn create(
        support: &CgroupSupport,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<Option<JobCgroup>, crate::Error> {
        let mut cg = JobCgroup {
            dirs: Vec::new(),
            memory_dir: None,
        };
        let result = cg.populate(support, name, limits);
        match result {
            Ok(()) if cg.dirs.is_empty() => Ok(None),
            Ok(()) => Ok(Some(cg)),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    fn make(&mut self, parent: &Path, name: &str) -> Result<PathBuf, crate::Error> {
        let dir = parent.join(name);
        std::fs::create_dir(&dir)
            .map_err(|e| crate::Error::io(format!("cannot create cgroup {}", dir.display()), e))?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    fn populate(
        &mut self,
        support: &CgroupSupport,
        name: &str,
        l: CgroupLimits,
    ) -> Result<(), crate::Error> {
        match support {
            CgroupSupport::None => Ok(()),
            CgroupSupport::V2 {
                parent,
                memory,
                pids,
                cpu,
            } => {
                let dir = self.make(parent, name)?;
                let l = CgroupLimits {
                    memory: l.memory.filter(|_| *memory),
                    pids: l.pids.filter(|_| *pids),
                    cpus: l.cpus.filter(|_| *cpu),
                };
                if let Some(m) = l.memory {
                    write(&dir, "memory.max", &m.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(&dir, "memory.swap.max", "0")?;
                    }
                    self.memory_dir = Some((dir.clone(), true));
                }
                if let Some(p) = l.pids {
                    write(&dir, "pids.max", &p.to_string())?;
                }
                if let Some(c) = l.cpus {
                    write(
                        &dir,
                        "cpu.max",
                        &format!("{} 100000", (c * 100_000.0).ceil() as u64),
                    )?;
                }
                Ok(())
            }
            CgroupSupport::V1 { memory, pids, cpu } => {
                // The pids hierarchy (or any usable one) always tracks the job's processes.
                if let (Some(parent), Some(m)) = (memory, l.memory) {
                    let dir = self.make(parent, name)?;
                    write(&dir, "memory.limit_in_bytes", &m.to_string())?;
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(&dir, "memory.memsw.limit_in_bytes", &m.to_string())?;
                    }
                    if dir.join("memory.swappiness").exists() {
                        let _ = write(&dir, "memory.swappiness", "0");
                    }
                    self.memory_dir = Some((dir, false));
                }
                if let (Some(parent), Some(c)) = (cpu, l.cpus) {
                    let dir = self.make(parent, name)?;
                    write(&dir, "cpu.cfs_period_us", "100000")?;
                    write(
                        &dir,
                        "cpu.cfs_quota_us",
                        &((c * 100_000.0).ceil() as u64).to_string(),
                    )?;
                }
                if let Some(parent) = pids {
                    let dir = self.make(parent, name)?;
                    if let Some(p) = l.pids {
                        write(&dir, "pids.max", &p.to_string())?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The `cgroup.procs` files the job's processes join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// True when the kernel's OOM killer killed a process of this job.
    pub(crate) fn oom_killed(&self) -> bool {
        let Some((dir, v2)) = &self.memory_dir else {
            return false;
        };
        let file = if *v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let mut parts = l.split_whitespace();
                parts.next() == Some("oom_kill") && parts.next().is_some_and(|n| n != "0")
            })
            || (!*v2
                && std::fs::read_to_string(dir.join("memory.failcnt"))
                    .map(|s| s.trim() != "0")
                    .unwrap_or(false)
                && std::fs::read_to_string(dir.join("memory.oom_control"))
                    .map(|s| s.contains("under_oom 1"))
                    .unwrap_or(false))
    }

    /// The most memory the job's processes held at once, from its memory cgroup
    /// (`memory.peak` on v2, `memory.max_usage_in_bytes` on v1); `None` without one (no
    /// memory limit) or when the kernel does not say. With the layout's name.
    pub(crate) fn peak_memory(&self) -> Option<(u64, &'static str)> {
        let (dir, v2) = self.memory_dir.as_ref()?;
        let (file, name) = if *v2 {
            ("memory.peak", "cgroup v2")
        } else {
            ("memory.max_usage_in_bytes", "cgroup v1")
        };
        let n = std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some((n, name))
    }

    /// Removes the directories; call once no process of the job is left.
    pub(crate) fn remove(&mut self) {
        for dir in self.dirs.drain(..).rev() {
            // A cgroup can stay busy for a moment while its last task is torn down.
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}
