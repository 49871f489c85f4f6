//! Finding and signalling every process of a job: the main process group, plus all
//! descendants of the job's shim (which catches processes that left the group or the
//! session, since the shim is their subreaper), plus every member of the job's cgroups.

use std::collections::HashMap;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Every process id on this host, from `/proc`.
pub(crate) fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .collect()
}

/// Pids of processes whose environment holds `key=value` (zombies have none).
pub(crate) fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    let needle = format!("{key}={value}");
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
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

/// Process ids of all descendants of `root` (not `root` itself), from `/proc`.
pub(crate) fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in all_pids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces and parentheses: parse after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let _state = fields.next();
        if let Some(ppid) = fields.next().and_then(|p| p.parse::<i32>().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
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
