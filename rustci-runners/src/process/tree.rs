//! Finding and signalling every process of a job: the main process group, plus all
//! descendants of the job's shim (which catches processes that left the group or the
//! session, since the shim is their subreaper), plus every member of the job's cgroups.
//!
//! The scans of `/proc` come in two strengths. The supervisor's (signalling, killing) are
//! lenient: a process it cannot read is skipped and the rest are still signalled. The
//! conformance suite's are strict: [`ProcessTable::scan`] and [`scan_env`] return every
//! read error other than the process having exited (`ENOENT`, `ESRCH`), so that "could
//! not look" is never mistaken for "nothing there". Both use the same readers.

use std::collections::HashMap;
use std::io;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// True when a read of `/proc/<pid>/...` failed because the process is gone.
fn exited(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// The contents of `/proc/<pid>/<file>`; `None` when the process has exited.
fn read_proc(pid: i32, file: &str) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(format!("/proc/{pid}/{file}")) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if exited(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every process id on this host, from `/proc`, with the errors of entries that could not
/// be listed; `Err` when `/proc` cannot be opened at all.
fn list_pids() -> io::Result<(Vec<i32>, Vec<Unreadable>)> {
    let mut pids = Vec::new();
    let mut errors = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        match entry {
            Ok(entry) => {
                if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                    pids.push(pid);
                }
            }
            Err(e) => errors.push(("/proc".to_string(), e)),
        }
    }
    Ok((pids, errors))
}

/// A `/proc` path that could not be read, and why.
pub(crate) type Unreadable = (String, io::Error);

/// One process as `/proc/<pid>/stat` shows it.
#[cfg_attr(not(feature = "testkit"), allow(dead_code))] // read by the conformance suite
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    /// The state letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead) ...
    pub state: u8,
    /// Start time in clock ticks after boot: with the pid, it names one process, whatever
    /// process gets the pid later.
    pub start_time: u64,
    /// Size of the address space in bytes: 0 for a process that has none (a kernel
    /// thread, or one that is exiting), which therefore has no environment either.
    pub vsize: u64,
    /// The command name.
    pub comm: String,
}

impl ProcStat {
    /// True for a zombie or a dead process: it runs nothing any more.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))] // read by the conformance suite
    pub(crate) fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X')
    }

    fn parse(pid: i32, stat: &[u8]) -> io::Result<ProcStat> {
        let text = String::from_utf8_lossy(stat);
        // The command name may contain spaces and parentheses: parse after the last ')'.
        let parsed = (|| {
            let open = text.find('(')?;
            let close = text.rfind(')')?;
            let comm = text.get(open + 1..close)?.to_string();
            let mut fields = text[close + 1..].split_whitespace();
            let state = *fields.next()?.as_bytes().first()?;
            let ppid = fields.next()?.parse().ok()?;
            // Fields 22 and 23 of the whole line; the 20th and 21st after the command name.
            let start_time = fields.nth(17)?.parse().ok()?;
            let vsize = fields.next()?.parse().ok()?;
            Some(ProcStat {
                pid,
                ppid,
                state,
                start_time,
                vsize,
                comm,
            })
        })();
        parsed.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed /proc/{pid}/stat: {text:?}"),
            )
        })
    }
}

/// The state of one process now; `None` when it has exited.
pub(crate) fn stat(pid: i32) -> io::Result<Option<ProcStat>> {
    read_proc(pid, "stat")?
        .map(|bytes| ProcStat::parse(pid, &bytes))
        .transpose()
}

/// Every process on this host at one moment, with the parent of each.
pub(crate) struct ProcessTable {
    procs: HashMap<i32, ProcStat>,
    /// What could not be read, for a reason other than a process's exit.
    pub unreadable: Vec<Unreadable>,
}

impl ProcessTable {
    /// Reads `/proc/*/stat`. `Err` only when `/proc` itself cannot be listed.
    pub(crate) fn scan() -> io::Result<ProcessTable> {
        let (pids, unreadable) = list_pids()?;
        let mut table = ProcessTable {
            procs: HashMap::new(),
            unreadable,
        };
        for pid in pids {
            match stat(pid) {
                Ok(Some(s)) => {
                    table.procs.insert(pid, s);
                }
                Ok(None) => {}
                Err(e) => table.unreadable.push((format!("/proc/{pid}/stat"), e)),
            }
        }
        Ok(table)
    }

    /// One process of the table.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))] // read by the conformance suite
    pub(crate) fn get(&self, pid: i32) -> Option<&ProcStat> {
        self.procs.get(&pid)
    }

    /// Process ids of all descendants of `root` (not `root` itself).
    pub(crate) fn descendants(&self, root: i32) -> Vec<i32> {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for s in self.procs.values() {
            children.entry(s.ppid).or_default().push(s.pid);
        }
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            if let Some(kids) = children.get(&pid) {
                for &kid in kids {
                    out.push(kid);
                    stack.push(kid);
                }
            }
        }
        out
    }
}

/// The processes whose environment holds one variable, from a strict scan.
#[cfg_attr(not(feature = "testkit"), allow(dead_code))] // read by the conformance suite
pub(crate) struct EnvScan {
    /// Pids whose environment holds the variable (zombies and kernel threads have none).
    pub matching: Vec<i32>,
    /// Processes whose environment could not be read, for a reason other than their
    /// exit (or `/proc` entries that could not be listed, with pid `None`).
    pub unreadable: Vec<(Option<i32>, io::Error)>,
}

/// Reads `/proc/*/environ` for `key=value`. `Err` only when `/proc` cannot be listed.
pub(crate) fn scan_env(key: &str, value: &str) -> io::Result<EnvScan> {
    let needle = format!("{key}={value}");
    let (pids, unlisted) = list_pids()?;
    let mut scan = EnvScan {
        matching: Vec::new(),
        unreadable: unlisted.into_iter().map(|(_, e)| (None, e)).collect(),
    };
    for pid in pids {
        match read_proc(pid, "environ") {
            Ok(Some(env)) if env.split(|b| *b == 0).any(|var| var == needle.as_bytes()) => {
                scan.matching.push(pid)
            }
            Ok(_) => {}
            Err(e) => scan.unreadable.push((Some(pid), e)),
        }
    }
    Ok(scan)
}

/// Pids of processes whose environment holds `key=value`; processes that cannot be read
/// are skipped (the lenient form, for killing).
pub(crate) fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    scan_env(key, value)
        .map(|scan| scan.matching)
        .unwrap_or_default()
}

/// Kills (SIGKILL) every process of execution `id`, found by its `RUSTCI_JOB_ID`, until
/// none is left; gives up after a few rounds if new ones keep appearing.
pub(crate) fn kill_execution(id: &str) -> usize {
    let mut killed = 0;
    for _ in 0..20 {
        let pids = pids_with_env("RUSTCI_JOB_ID", id);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    killed
}

/// Process ids of all descendants of `root` (not `root` itself), from `/proc`; processes
/// that cannot be read are skipped (the lenient form, for signalling).
pub(crate) fn descendants(root: i32) -> Vec<i32> {
    ProcessTable::scan()
        .map(|table| table.descendants(root))
        .unwrap_or_default()
}

/// Sends `signal` to the main process group, every descendant of the shim and every
/// process in `cgroup_procs` files. Returns how many processes were found below the shim
/// (looked up before anything is signalled).
pub(crate) fn signal_job(
    shim: i32,
    main_group: Option<i32>,
    cgroup_procs: &[std::path::PathBuf],
    signal: Signal,
) -> usize {
    let found = descendants(shim);
    if let Some(group) = main_group {
        let _ = killpg(Pid::from_raw(group), signal);
    }
    let count = found.len();
    for pid in found {
        let _ = kill(Pid::from_raw(pid), signal);
    }
    for file in cgroup_procs {
        if let Ok(text) = std::fs::read_to_string(file) {
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if pid != shim {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
        }
    }
    count
}
