//! The code that runs between `fork` and `exec`.
//!
//! Every job process is started under a small *shim*: the forked child becomes a session
//! leader, joins the job's cgroups, marks itself a child subreaper, enters the requested
//! namespaces and forks the real process (the *main* process). The shim then closes every
//! descriptor but its status pipe and only waits: orphans of the job (a grandchild that
//! called `setsid`, a daemonised server) are re-parented to it instead of to init, so the
//! supervisor can always find them as the shim's descendants.
//!
//! Status pipe protocol, fixed 6-byte messages written by the shim:
//!
//! ```text
//! 'P' pid:i32            main process started with this pid (also its process group)
//! 'S' status:i32 left:u8 main process ended with this wait status; left = 1 when other
//!                        processes of the job were still alive at that moment
//! 'R' status:i32         (PID namespace only) the step's command ended with this status
//! ```
//!
//! In a new PID namespace the main process is the namespace's init, which the kernel
//! shields from signals sent inside the namespace (`kill -KILL $$` would do nothing). So
//! there the main process stays a minimal init that runs the command as its child, reports
//! the command's real status with an `'R'` message and exits, which makes the kernel kill
//! whatever else is left in the namespace.
//!
//! The shim exits once it has no children left. Everything here runs in a forked copy of a
//! multi-threaded process, so it only makes async-signal-safe system calls and never
//! allocates.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

/// A resource limit for `setrlimit`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub value: u64,
}

/// Everything the shim and the main process do before `exec`, prepared in the parent.
#[derive(Debug, Default)]
pub(crate) struct ShimPlan {
    /// Write end of the status pipe (opened close-on-exec).
    pub status_fd: RawFd,
    /// `cgroup.procs` (or `tasks`) files to join, NUL-terminated.
    pub cgroup_procs: Vec<CString>,
    /// `unshare` flags for new namespaces.
    pub unshare_flags: libc::c_int,
    /// Mount a fresh `/proc` in the main process (needs new PID and mount namespaces).
    pub mount_proc: bool,
    /// Host name inside a new UTS namespace.
    pub hostname: Option<CString>,
    /// Limits applied to the main process.
    pub rlimits: Vec<Rlimit>,
    /// Drop to this uid/gid in the main process.
    pub credentials: Option<(libc::uid_t, libc::gid_t)>,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn write_all(fd: RawFd, buf: &[u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the buffer is valid for its length; write is async-signal-safe.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        done += n as usize;
    }
}

fn message(tag: u8, value: i32, extra: u8) -> [u8; 6] {
    let v = value.to_ne_bytes();
    [tag, v[0], v[1], v[2], v[3], extra]
}

/// Runs in the forked child before `exec`.
///
/// Returns `Ok(())` only in the main process, which then goes on to `exec`. The shim never
/// returns.
///
/// # Safety
/// Must only be called from `CommandExt::pre_exec`.
pub(crate) unsafe fn run(plan: &ShimPlan) -> io::Result<()> {
    // SAFETY (whole function): only async-signal-safe libc calls on memory prepared before
    // the fork.
    unsafe {
        check(libc::setsid())?;
        for path in &plan.cgroup_procs {
            let fd = check(libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
        }
        check(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))?;
        if plan.unshare_flags != 0 {
            check(libc::unshare(plan.unshare_flags))?;
        }
        // Do not run the parent's signal handlers (a runtime's SIGCHLD handler, say) here.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);

        let main = check(libc::fork())?;
        if main == 0 {
            return prepare_main(plan);
        }

        // The shim: keep only the status pipe, so the job's output pipes and the parent's
        // exec-error pipe see end-of-file as soon as the main process is done with them.
        let fd = plan.status_fd;
        if fd > 0 {
            close_range(0, (fd - 1) as libc::c_uint);
        }
        close_range((fd + 1) as libc::c_uint, libc::c_uint::MAX);
        write_all(fd, &message(b'P', main, 0));

        let mut status: libc::c_int = 0;
        let mut main_status = None;
        while main_status.is_none() {
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == main {
                main_status = Some(status);
            } else if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        // Reap whatever already ended; anything still alive is a leftover.
        let left = loop {
            let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
            if pid > 0 {
                continue;
            }
            if pid == 0 {
                break true;
            }
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break false;
        };
        write_all(fd, &message(b'S', main_status.unwrap_or(0), left as u8));
        if left {
            // The supervisor kills the leftovers; reap them until none is left.
            loop {
                let pid = libc::waitpid(-1, &mut status, 0);
                if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
        }
        libc::_exit(0)
    }
}

unsafe fn close_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: close_range only closes descriptors of this process.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if ret < 0 {
        // Kernels before 5.9: close one by one up to a sane bound.
        let mut fd = first;
        while fd <= last && fd < 65_536 {
            // SAFETY: closing a descriptor number is always memory-safe.
            unsafe { libc::close(fd as RawFd) };
            fd += 1;
        }
    }
}

/// PID 1 of a new PID namespace: reaps everything, reports the command's status, exits.
unsafe fn namespace_init(status_fd: RawFd, command: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe calls only.
    unsafe {
        if status_fd > 0 {
            close_range(0, (status_fd - 1) as libc::c_uint);
        }
        close_range((status_fd + 1) as libc::c_uint, libc::c_uint::MAX);
        let mut status: libc::c_int = 0;
        loop {
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == command {
                write_all(status_fd, &message(b'R', status, 0));
                break;
            }
            if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        libc::_exit(0)
    }
}

/// Runs in the main process before `exec`.
unsafe fn prepare_main(plan: &ShimPlan) -> io::Result<()> {
    // SAFETY: async-signal-safe calls on memory prepared before the fork.
    unsafe {
        check(libc::setpgid(0, 0))?;
        if plan.mount_proc {
            let command = check(libc::fork())?;
            if command != 0 {
                namespace_init(plan.status_fd, command);
            }
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
        }
        if let Some(name) = &plan.hostname {
            check(libc::sethostname(name.as_ptr(), name.as_bytes().len()))?;
        }
        for limit in &plan.rlimits {
            let value = libc::rlimit {
                rlim_cur: limit.value,
                rlim_max: limit.value,
            };
            check(libc::setrlimit(limit.resource, &value))?;
        }
        if let Some((uid, gid)) = plan.credentials {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
        Ok(())
    }
}
