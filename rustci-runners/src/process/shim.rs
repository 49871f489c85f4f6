//! Starting a step's process: the shim and the code that runs before `exec`.
//!
//! Every step's process is started under a small *shim*, created with `clone(CLONE_VM)`
//! on a stack of its own: no copy of the runner's page tables, so it costs little more
//! than a thread. The shim becomes a session leader, marks itself
//! a child subreaper, enters the requested namespaces and starts the step's *main* process
//! with `clone(CLONE_VM | CLONE_VFORK)`, which runs until `exec` on a second stack (the
//! same technique `posix_spawn` uses). The shim then closes every descriptor but its
//! status pipe and only waits: orphans of the job (a grandchild that called `setsid`, a
//! daemon) are re-parented to it instead of to init, so the supervisor always finds them
//! among the shim's descendants.
//!
//! Status pipe protocol, fixed 6-byte messages:
//!
//! ```text
//! 'P' pid:i32            main process started with this pid (also its process group)
//! 'E' errno:i32          exec of the step's program failed (the main process exits 127)
//! 'F' errno:i32 stage:u8 the shim could not set the step up; nothing was started
//! 'S' status:i32 left:u8 main process ended with this wait status; left = 1 when other
//!                        processes of the job were still alive at that moment
//! 'R' status:i32         (PID namespace only) the step's command ended with this status
//! ```
//!
//! In a new PID namespace the main process is the namespace's init, which the kernel
//! shields from signals sent inside the namespace (`kill -KILL $$` would do nothing). So
//! there the main process is a real fork that stays a minimal init: it mounts a fresh
//! `/proc`, runs the command as its child, reports the command's real status with an `'R'`
//! message and exits, which makes the kernel kill whatever else is left in the namespace.
//!
//! The shim and the main process share the runner's memory, so everything they run uses
//! only the raw system calls of [`super::sys`]: no allocation, no `errno`, no panics.

use std::ffi::{CString, c_char};
use std::os::fd::RawFd;

use super::sys::{Stack, clone_with_stack, sys, syscall6};
use std::ffi::c_long;

/// A resource limit for `prlimit`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub value: u64,
}

/// Isolation and limits applied before `exec`.
#[derive(Debug, Default)]
pub(crate) struct ShimPlan {
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<CString>,
    /// `unshare` flags for new namespaces.
    pub unshare_flags: libc::c_int,
    /// Mount a fresh `/proc` as init of a new PID namespace.
    pub mount_proc: bool,
    /// Host name inside a new UTS namespace.
    pub hostname: Option<CString>,
    /// Limits applied to the main process.
    pub rlimits: Vec<Rlimit>,
    /// Drop to this uid/gid in the main process.
    pub credentials: Option<(libc::uid_t, libc::gid_t)>,
}

/// Everything the shim reads, prepared by the parent and kept alive (with the stacks)
/// until the shim has been reaped.
pub(crate) struct SpawnRequest {
    pub path: CString,
    pub argv: Vec<CString>,
    pub argv_ptrs: Vec<*const c_char>,
    pub envp: Vec<CString>,
    pub envp_ptrs: Vec<*const c_char>,
    pub cwd: CString,
    pub plan: ShimPlan,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub status: RawFd,
    pub main_stack: Stack,
}

// SAFETY: the raw pointers point into the CStrings owned by the same value.
unsafe impl Send for SpawnRequest {}
unsafe impl Sync for SpawnRequest {}

impl SpawnRequest {
    /// Builds the pointer arrays `execve` needs.
    pub(crate) fn finish_pointers(&mut self) {
        self.argv_ptrs = self.argv.iter().map(|a| a.as_ptr()).collect();
        self.argv_ptrs.push(std::ptr::null());
        self.envp_ptrs = self.envp.iter().map(|e| e.as_ptr()).collect();
        self.envp_ptrs.push(std::ptr::null());
    }
}

/// Setup stages reported with an `'F'` message.
pub(crate) const STAGES: [&str; 11] = [
    "setsid",
    "joining the job's cgroup",
    "becoming a child subreaper",
    "entering new namespaces",
    "starting the step's process",
    "mounting /proc in the new PID namespace",
    "setting the host name",
    "setting resource limits",
    "switching to the configured user",
    "connecting standard streams",
    "entering the working directory",
];

const CLOSE_RANGE_CLOEXEC: usize = 4;
/// How far the one-by-one fallbacks for kernels without `close_range` go.
const FALLBACK_FD_LIMIT: i32 = 65_536;

/// Closes every descriptor except `keep` (which is 3 or higher).
unsafe fn close_all_but(keep: RawFd) {
    // SAFETY: closing descriptors of this process only.
    unsafe {
        let low = sys!(libc::SYS_close_range, 0, keep - 1, 0);
        let high = sys!(libc::SYS_close_range, keep + 1, u32::MAX, 0);
        if low < 0 || high < 0 {
            // Kernels before 5.9.
            for fd in (0..FALLBACK_FD_LIMIT).filter(|fd| *fd != keep) {
                sys!(libc::SYS_close, fd);
            }
        }
    }
}

fn message(tag: u8, value: i32, extra: u8) -> [u8; 6] {
    let v = value.to_ne_bytes();
    [tag, v[0], v[1], v[2], v[3], extra]
}

unsafe fn send(fd: RawFd, msg: [u8; 6]) {
    // SAFETY: writing our own buffer; 6 bytes to a pipe are written at once.
    unsafe {
        loop {
            let n = sys!(libc::SYS_write, fd, msg.as_ptr(), msg.len());
            if n != -(libc::EINTR as isize) {
                break;
            }
        }
    }
}

unsafe fn fail(status: RawFd, errno: isize, stage: u8) -> isize {
    // SAFETY: see `send`.
    unsafe { send(status, message(b'F', (-errno) as i32, stage)) };
    127
}

/// Entry of the shim; `arg` is a `*const SpawnRequest`.
///
/// # Safety
/// Only for [`clone_with_stack`] from [`super::spawn`].
pub(crate) unsafe extern "C" fn shim_entry(arg: usize) -> isize {
    // SAFETY (whole function): the request outlives the shim; raw system calls only.
    unsafe {
        let req = &*(arg as *const SpawnRequest);
        let status = req.status;
        // Default dispositions everywhere (the runner's handlers must not run here), then
        // unblock what the parent blocked around clone.
        let zeroed = [0usize; 4];
        for sig in 1..=64usize {
            if sig != libc::SIGKILL as usize && sig != libc::SIGSTOP as usize {
                sys!(libc::SYS_rt_sigaction, sig, zeroed.as_ptr(), 0, 8);
            }
        }
        let empty = 0u64;
        sys!(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            0,
            8
        );

        let r = sys!(libc::SYS_setsid);
        if r < 0 {
            return fail(status, r, 0);
        }
        let r = sys!(libc::SYS_prctl, libc::PR_SET_CHILD_SUBREAPER, 1);
        if r < 0 {
            return fail(status, r, 2);
        }
        if req.plan.unshare_flags != 0 {
            let r = sys!(libc::SYS_unshare, req.plan.unshare_flags);
            if r < 0 {
                return fail(status, r, 3);
            }
        }

        let main = if req.plan.mount_proc {
            // A real fork: the namespace's init stays alive, which a vfork child cannot.
            let pid = sys!(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
            if pid == 0 {
                sys!(libc::SYS_exit, namespace_main(req));
            }
            pid
        } else {
            clone_with_stack(
                (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as usize,
                req.main_stack.top(),
                main_entry,
                arg,
            )
        };
        if main < 0 {
            return fail(status, main, 4);
        }
        send(status, message(b'P', main as i32, 0));

        // Keep only the status pipe, so the step's pipes see end-of-file as soon as the
        // job's own processes are done with them.
        close_all_but(status);

        let mut wstatus: libc::c_int = 0;
        let mut main_status = None;
        while main_status.is_none() {
            let pid = sys!(
                libc::SYS_wait4,
                -1isize,
                &mut wstatus as *mut libc::c_int,
                0,
                0
            );
            if pid == main {
                main_status = Some(wstatus);
            } else if pid < 0 && pid != -(libc::EINTR as isize) {
                break;
            }
        }
        // Reap whatever already ended; anything still alive is a leftover.
        let left = loop {
            let pid = sys!(
                libc::SYS_wait4,
                -1isize,
                &mut wstatus as *mut libc::c_int,
                libc::WNOHANG,
                0
            );
            if pid > 0 || pid == -(libc::EINTR as isize) {
                continue;
            }
            break pid == 0;
        };
        send(status, message(b'S', main_status.unwrap_or(0), left as u8));
        if left {
            // The supervisor kills the leftovers; reap them until none is left.
            loop {
                let pid = sys!(
                    libc::SYS_wait4,
                    -1isize,
                    &mut wstatus as *mut libc::c_int,
                    0,
                    0
                );
                if pid < 0 && pid != -(libc::EINTR as isize) {
                    break;
                }
            }
        }
        0
    }
}

/// Entry of the main process (vfork-style child of the shim).
unsafe extern "C" fn main_entry(arg: usize) -> isize {
    // SAFETY: see `shim_entry`.
    unsafe {
        let req = &*(arg as *const SpawnRequest);
        sys!(libc::SYS_setpgid, 0, 0);
        exec_step(req)
    }
}

/// Main process of a step in a new PID namespace: PID 1, mounts `/proc`, forks the
/// command, reports its status.
unsafe fn namespace_main(req: &SpawnRequest) -> isize {
    // SAFETY: see `shim_entry`; this is a full fork, so it owns its memory.
    unsafe {
        let status = req.status;
        sys!(libc::SYS_setpgid, 0, 0);
        let r = sys!(
            libc::SYS_mount,
            c"none".as_ptr(),
            c"/".as_ptr(),
            0,
            libc::MS_REC | libc::MS_PRIVATE,
            0
        );
        let r = if r < 0 {
            r
        } else {
            sys!(
                libc::SYS_mount,
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                0
            )
        };
        if r < 0 {
            return fail(status, r, 5);
        }
        let command = sys!(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
        if command == 0 {
            return exec_step(req);
        }
        if command < 0 {
            return fail(status, command, 4);
        }
        close_all_but(status);
        let mut wstatus: libc::c_int = 0;
        loop {
            let pid = sys!(
                libc::SYS_wait4,
                -1isize,
                &mut wstatus as *mut libc::c_int,
                0,
                0
            );
            if pid == command {
                send(status, message(b'R', wstatus, 0));
                break;
            }
            if pid < 0 && pid != -(libc::EINTR as isize) {
                break;
            }
        }
        0
    }
}

/// Joins the job's cgroups, applies limits and credentials, wires up stdio and execs the
/// step's program. Returns only on failure: `'F'` with the stage for anything before
/// `execve`, `'E'` for `execve` itself.
///
/// The cgroups are joined here, by the process about to exec, and not by the shim: the
/// shim shares the runner's memory, and the kernel's out-of-memory killer, choosing a
/// victim inside a job's cgroup, would otherwise see the runner's whole size and kill every
/// process sharing it, the runner included. (A vfork-style child is never chosen; after
/// `exec` the process has memory of its own.)
unsafe fn exec_step(req: &SpawnRequest) -> isize {
    // SAFETY: see `shim_entry`.
    unsafe {
        let status = req.status;
        for path in &req.plan.cgroup_procs {
            let fd = sys!(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC
            );
            if fd < 0 {
                return fail(status, fd, 1);
            }
            let w = sys!(libc::SYS_write, fd, b"0".as_ptr(), 1);
            sys!(libc::SYS_close, fd);
            if w < 0 {
                return fail(status, w, 1);
            }
        }
        if let Some(name) = &req.plan.hostname {
            let r = sys!(libc::SYS_sethostname, name.as_ptr(), name.as_bytes().len());
            if r < 0 {
                return fail(status, r, 6);
            }
        }
        for (from, to) in [(req.stdin, 0), (req.stdout, 1), (req.stderr, 2)] {
            let r = sys!(libc::SYS_dup3, from, to, 0);
            if r < 0 {
                return fail(status, r, 9);
            }
        }
        // After stdio: a low open-files limit must not break the wiring above.
        for limit in &req.plan.rlimits {
            let value = [limit.value, limit.value];
            let r = sys!(libc::SYS_prlimit64, 0, limit.resource, value.as_ptr(), 0);
            if r < 0 {
                return fail(status, r, 7);
            }
        }
        if let Some((uid, gid)) = req.plan.credentials {
            let r = sys!(libc::SYS_setgroups, 0, 0);
            if r < 0 {
                return fail(status, r, 8);
            }
            let r = sys!(libc::SYS_setgid, gid);
            if r < 0 {
                return fail(status, r, 8);
            }
            let r = sys!(libc::SYS_setuid, uid);
            if r < 0 {
                return fail(status, r, 8);
            }
        }
        // Descriptors the runner's process left inheritable must not reach the job.
        if sys!(libc::SYS_close_range, 3, u32::MAX, CLOSE_RANGE_CLOEXEC) < 0 {
            // Kernels before 5.11: one descriptor at a time.
            for fd in 3..FALLBACK_FD_LIMIT {
                sys!(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        let r = sys!(libc::SYS_chdir, req.cwd.as_ptr());
        if r < 0 {
            return fail(status, r, 10);
        }
        let r = sys!(
            libc::SYS_execve,
            req.path.as_ptr(),
            req.argv_ptrs.as_ptr(),
            req.envp_ptrs.as_ptr()
        );
        send(status, message(b'E', (-r) as i32, 0));
        127
    }
}
