//! Finding a job's processes on this host: by their environment, and for host runners
//! by the step's process tree.

use super::*;

/// Pids of live processes on this host whose environment holds `RUSTCI_JOB_ID=<id>`.
///
/// An environment that cannot be read (other than of a process that has exited) is an
/// error, not "none", except for processes that cannot be live processes of a job this
/// process started: those started before this process, those without an address space
/// (exiting, zombies, kernel threads), and, when this process is not root, other users'
/// (the jobs of a host runner run as the runner's own user). The checks themselves are
/// stricter: for container runners, whose processes may belong to any user, only
/// processes started before the job are exempt.
pub fn processes_of(id: &JobId) -> Result<Vec<i32>, Failure> {
    let me = crate::process::stat(std::process::id() as i32)
        .ok()
        .flatten()
        .ok_or_else(|| Failure("cannot read /proc/self/stat".into()))?;
    job_pids(id, true, me.start_time)
}

/// Pids whose environment names job `id`. A process whose environment cannot be read is
/// a failure unless it cannot be a live process of the job: it started before `since`
/// (clock ticks after boot, as in `/proc/<pid>/stat`), it has no address space any more
/// (exiting, a zombie or a kernel thread: without root, reading those is refused rather
/// than empty), or `host` is set and it is another user's while this process is not root.
pub(crate) fn job_pids(id: &JobId, host: bool, since: u64) -> Result<Vec<i32>, Failure> {
    let scan = crate::process::scan_env("RUSTCI_JOB_ID", id.as_str())
        .map_err(|e| Failure(format!("cannot list /proc: {e}")))?;
    for (pid, e) in &scan.unreadable {
        let Some(pid) = *pid else {
            return Err(Failure(format!("cannot list /proc: {e}")));
        };
        let cannot_be_the_jobs = match crate::process::stat(pid) {
            Ok(Some(s)) => s.start_time < since || s.vsize == 0 || s.is_dead(),
            Ok(None) => continue,
            Err(stat_error) => {
                return Err(Failure(format!(
                    "cannot read /proc/{pid}/environ ({e}) nor /proc/{pid}/stat ({stat_error}), \
                     so cannot tell whether it is a process of job {id}"
                )));
            }
        };
        if cannot_be_the_jobs || (host && of_another_user(pid)) {
            continue;
        }
        // Unreadable for a moment (a process of another program in the middle of exec or
        // of a change of credentials, say): read it again a few times before judging.
        if let Some(matches) = reread_environ(pid, id) {
            if matches {
                return Err(Failure(format!(
                    "{} is a process of job {id} (read on a second try)",
                    describe_process(pid)
                )));
            }
            continue;
        }
        return Err(Failure(format!(
            "cannot read /proc/{pid}/environ ({e}) of {}, so cannot tell whether it is a process of job {id}",
            describe_process(pid)
        )));
    }
    Ok(scan.matching)
}

/// Reads `pid`'s environment again up to 10 times over about 100 ms: `Some(true)` when it
/// names job `id`, `Some(false)` when it does not or the process is gone, `None` when it
/// stays unreadable.
fn reread_environ(pid: i32, id: &JobId) -> Option<bool> {
    let needle = format!("RUSTCI_JOB_ID={id}");
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        match std::fs::read(format!("/proc/{pid}/environ")) {
            Ok(env) => return Some(env.split(|b| *b == 0).any(|v| v == needle.as_bytes())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
            Err(_) => {}
        }
    }
    None
}

/// Clock ticks since boot now, in the unit and clock of the start time in
/// `/proc/<pid>/stat`: a process started later has a start time at least this.
pub(crate) fn boot_ticks_now() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLK_TCK is a plain query.
    let (r, hz) = unsafe {
        (
            libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    if r != 0 || hz <= 0 {
        // Exempts nothing: every unreadable process is then a failure.
        return 0;
    }
    let nanos = now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128;
    (nanos / (1_000_000_000 / hz as u128)) as u64
}

/// `pid` with its command name and owner, as far as `/proc` tells.
pub(crate) fn describe_process(pid: i32) -> String {
    use std::os::unix::fs::MetadataExt;
    let comm = crate::process::stat(pid)
        .ok()
        .flatten()
        .map_or_else(|| "?".to_string(), |s| s.comm);
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map_or_else(|_| "?".to_string(), |m| m.uid().to_string());
    format!("process {pid} ({comm}, uid {owner})")
}

/// True when this process is not root and `pid` is (or was) another user's.
pub(crate) fn of_another_user(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid();
    !me.is_root()
        && std::fs::metadata(format!("/proc/{pid}")).map_or(true, |m| m.uid() != me.as_raw())
}

/// Every process on this host now; any entry that cannot be read (other than of a process
/// that exited) is a failure.
pub(crate) fn process_table() -> Result<ProcessTable, Failure> {
    let table = ProcessTable::scan().map_err(|e| Failure(format!("cannot list /proc: {e}")))?;
    if let Some((path, e)) = table.unreadable.first() {
        return Err(Failure(format!("cannot read {path}: {e}")));
    }
    Ok(table)
}

/// The processes of one job that the suite has seen on this host.
///
/// Processes whose environment names the job are found at any time. For a host runner,
/// each snapshot (at a step's 1st, 2nd, 4th … output event) also climbs from those to the
/// step's shim (the ancestor whose parent is this process) and records every descendant
/// of it: a process that replaced its environment is among them, since the shim is the
/// subreaper of everything the step starts.
pub(crate) struct ProcessWatch {
    pub(crate) id: JobId,
    pub(crate) host: bool,
    /// Clock ticks after boot just before the job was started (see [`job_pids`]).
    pub(crate) since: u64,
    /// Every process recorded while the job ran: pid → start time (which tells a reused
    /// pid from the recorded process).
    pub(crate) seen: BTreeMap<i32, u64>,
    /// The recorded processes whose environment did not name the job.
    pub(crate) tree_only: BTreeSet<i32>,
    /// The shims of the job's steps: pid → start time.
    pub(crate) shims: BTreeMap<i32, u64>,
    /// Output events of the current step so far.
    pub(crate) step_outputs: u64,
}

impl ProcessWatch {
    pub(crate) fn new(id: JobId, host: bool, since: u64) -> Self {
        ProcessWatch {
            id,
            host,
            since,
            seen: BTreeMap::new(),
            tree_only: BTreeSet::new(),
            shims: BTreeMap::new(),
            step_outputs: 0,
        }
    }

    pub(crate) fn step_started(&mut self) {
        self.step_outputs = 0;
    }

    pub(crate) fn on_output(&mut self) -> Result<(), Failure> {
        if !self.host {
            return Ok(());
        }
        self.step_outputs += 1;
        if self.step_outputs.is_power_of_two() {
            self.snapshot()?;
        }
        Ok(())
    }

    /// Records the job's processes as they are now.
    pub(crate) fn snapshot(&mut self) -> Result<(), Failure> {
        let table = process_table()?;
        let by_env = job_pids(&self.id, true, self.since)?;
        let me = std::process::id() as i32;
        let mut roots = by_env.clone();
        for &pid in &by_env {
            let mut p = pid;
            while let Some(s) = table.get(p) {
                if s.ppid == me {
                    self.shims.insert(p, s.start_time);
                    roots.push(p);
                    break;
                }
                if s.ppid <= 1 {
                    break;
                }
                p = s.ppid;
            }
        }
        let below = roots.iter().flat_map(|&root| table.descendants(root));
        for pid in by_env.iter().copied().chain(below) {
            if let Some(s) = table.get(pid).filter(|s| !s.is_dead()) {
                self.seen.insert(pid, s.start_time);
                if !by_env.contains(&pid) {
                    self.tree_only.insert(pid);
                }
            }
        }
        Ok(())
    }

    /// The job's processes still alive, described.
    pub(crate) fn leftovers(&self) -> Result<Vec<String>, Failure> {
        let mut left = BTreeMap::new();
        let describe = |pid: i32, how: &str| match crate::process::stat(pid) {
            Ok(Some(s)) => format!("{pid} ({}, {how})", s.comm),
            _ => format!("{pid} ({how})"),
        };
        for pid in job_pids(&self.id, self.host, self.since)? {
            left.insert(pid, describe(pid, "its environment names the job"));
        }
        if self.host {
            let table = process_table()?;
            let alive = |pid: i32, start: u64| {
                table
                    .get(pid)
                    .is_some_and(|s| s.start_time == start && !s.is_dead())
            };
            for (&pid, &start) in &self.seen {
                if alive(pid, start) {
                    left.entry(pid)
                        .or_insert_with(|| describe(pid, "seen in the job's process tree"));
                }
            }
            for (&shim, &start) in &self.shims {
                if !alive(shim, start) {
                    continue;
                }
                left.entry(shim)
                    .or_insert_with(|| describe(shim, "the shim of one of its steps"));
                for pid in table.descendants(shim) {
                    if table.get(pid).is_some_and(|s| !s.is_dead()) {
                        left.entry(pid)
                            .or_insert_with(|| describe(pid, "below the shim of one of its steps"));
                    }
                }
            }
        }
        Ok(left.into_values().collect())
    }
}

/// Opens the FIFO `name` in the working directory of a process of the watched job on this host
/// (through `/proc/<pid>/cwd`, which reaches into containers too) and writes a line into
/// it. The FIFO is opened read-write, which never blocks and keeps the line in the pipe
/// until the job reads it; the caller keeps the file open until the job has ended. `None`
/// when no process of the job on this host has the FIFO.
pub(crate) fn open_gate(watch: &ProcessWatch, name: &str) -> Result<Option<File>, Failure> {
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;
    for pid in job_pids(&watch.id, watch.host, watch.since)? {
        let path = format!("/proc/{pid}/cwd/{name}");
        if !std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo()) {
            continue;
        }
        let mut fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Failure(format!("cannot open {path}: {e}")))?;
        fifo.write_all(b"go\n")
            .map_err(|e| Failure(format!("cannot write to {path}: {e}")))?;
        return Ok(Some(fifo));
    }
    Ok(None)
}
