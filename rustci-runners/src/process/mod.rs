//! Process supervision shared by every host runner: start one step's process under a
//! shim (see [`shim`]), pump its output, enforce its deadline and cancellation, and make
//! sure that when it ends no process of it is left.
//!
//! ```text
//!            spawn ──► running ──main exits──► reaping leftovers ──► ended
//!                         │                      (SIGKILL, report)
//!           deadline/cancel│
//!                         ▼
//!                    SIGTERM to group + descendants ──grace──► SIGKILL ──► ended
//! ```

mod cgroup;
mod shim;
mod sys;
mod tree;

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::time::Instant;

use crate::mask::SecretSet;
use crate::output::{OutputBudget, StreamWriter};
use crate::runner::{EventKind, ExecutionSink, OutputStream};

pub(crate) use cgroup::{CgroupLimits, CgroupSupport, JobCgroup};
use shim::SpawnRequest;
pub(crate) use shim::{Rlimit, ShimPlan};
use sys::Stack;
pub(crate) use tree::kill_execution;
#[cfg(feature = "testkit")]
pub(crate) use tree::{ProcessTable, scan_env, stat};

const READ_CHUNK: usize = 64 * 1024;
const REKILL_INTERVAL: Duration = Duration::from_millis(10);
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);

/// One process to run.
pub(crate) struct ProcessSpec {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub plan: ShimPlan,
    /// `cgroup.procs` files of the job, to find its processes when killing.
    pub cgroup_procs: Vec<PathBuf>,
}

/// CPU time and block I/O of a job's processes, summed over its steps: `wait4` of each
/// step's shim reports the shim and everything it reaped, and as session leader and
/// subreaper it reaps every process of its step.
#[derive(Debug, Default)]
pub(crate) struct UsageTotals {
    user_us: std::sync::atomic::AtomicU64,
    system_us: std::sync::atomic::AtomicU64,
    in_blocks: std::sync::atomic::AtomicU64,
    out_blocks: std::sync::atomic::AtomicU64,
    /// Steps whose shim was reaped with its figures.
    measured: std::sync::atomic::AtomicU64,
}

impl UsageTotals {
    fn add(&self, ru: &libc::rusage) {
        use std::sync::atomic::Ordering::Relaxed;
        let us = |t: libc::timeval| (t.tv_sec.max(0) as u64) * 1_000_000 + t.tv_usec.max(0) as u64;
        self.user_us.fetch_add(us(ru.ru_utime), Relaxed);
        self.system_us.fetch_add(us(ru.ru_stime), Relaxed);
        self.in_blocks
            .fetch_add(ru.ru_inblock.max(0) as u64, Relaxed);
        self.out_blocks
            .fetch_add(ru.ru_oublock.max(0) as u64, Relaxed);
        self.measured.fetch_add(1, Relaxed);
    }

    /// The sums so far.
    pub(crate) fn snapshot(&self) -> UsageSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        UsageSnapshot {
            user_us: self.user_us.load(Relaxed),
            system_us: self.system_us.load(Relaxed),
            in_blocks: self.in_blocks.load(Relaxed),
            out_blocks: self.out_blocks.load(Relaxed),
            measured: self.measured.load(Relaxed),
        }
    }
}

/// [`UsageTotals`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UsageSnapshot {
    user_us: u64,
    system_us: u64,
    in_blocks: u64,
    out_blocks: u64,
    measured: u64,
}

impl UsageSnapshot {
    /// What was used between `earlier` and this one: (user seconds, system seconds, bytes
    /// read, bytes written), `None` when no step was measured between them. Block counts
    /// are in the kernel's 512-byte units.
    pub(crate) fn since(&self, earlier: &UsageSnapshot) -> Option<(f64, f64, u64, u64)> {
        if self.measured <= earlier.measured {
            return None;
        }
        Some((
            self.user_us.saturating_sub(earlier.user_us) as f64 / 1e6,
            self.system_us.saturating_sub(earlier.system_us) as f64 / 1e6,
            self.in_blocks.saturating_sub(earlier.in_blocks) * 512,
            self.out_blocks.saturating_sub(earlier.out_blocks) * 512,
        ))
    }
}

/// Where a supervised process reports to, and its limits.
pub(crate) struct Supervision<'a> {
    pub sink: &'a ExecutionSink,
    /// Receives the step's CPU time and I/O once its shim is reaped.
    pub usage: &'a UsageTotals,
    pub step: usize,
    pub secrets: &'a SecretSet,
    pub output: &'a OutputBudget,
    pub grace: Duration,
    pub deadline: Instant,
}

/// How a supervised process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProcessEnd {
    Exited(i32),
    Signalled(i32),
    TimedOut,
    Cancelled,
    /// The step's supervisor (the shim) was killed or stopped answering.
    SupervisorLost,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StopReason {
    TimedOut,
    Cancelled,
}

/// Why a process could not be started.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub error: io::Error,
    /// What was being done, when not the exec itself.
    pub stage: Option<&'static str>,
}

impl From<io::Error> for SpawnError {
    fn from(error: io::Error) -> Self {
        SpawnError { error, stage: None }
    }
}

async fn read_message(rx: &mut pipe::Receiver) -> Option<[u8; 6]> {
    let mut buf = [0u8; 6];
    rx.read_exact(&mut buf).await.ok().map(|_| buf)
}

fn message_value(msg: &[u8; 6]) -> i32 {
    i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]])
}

/// Finds `program` like `execvp` would, in the `PATH` the step will have.
fn resolve_program(program: &OsStr, env: &[(String, String)], cwd: &Path) -> io::Result<PathBuf> {
    let bytes = program.as_encoded_bytes();
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "empty program name",
        ));
    }
    if bytes.contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let mut denied = false;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let candidate = dir.join(program);
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
            denied = true;
        }
    }
    Err(if denied {
        io::Error::from(io::ErrorKind::PermissionDenied)
    } else {
        io::Error::from(io::ErrorKind::NotFound)
    })
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in argument or environment",
        )
    })
}

/// A pipe whose read end is non-blocking (for the runtime) and both ends close-on-exec and
/// numbered 3 or higher (so they never collide with stdio in the child).
fn make_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let r = above_stdio(r)?;
    let w = above_stdio(w)?;
    nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((r, w))
}

fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 3 {
        return Ok(fd);
    }
    Ok(
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)).map(|raw| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        })?,
    )
}

/// The shim while it may still run: owns what it reads. If dropped before the shim was
/// reaped (the supervising future was dropped), the job is killed and reaped first.
struct Shim {
    pid: i32,
    reaped: bool,
    /// What the shim and everything it reaped used, from `wait4`.
    rusage: Option<libc::rusage>,
    request: Option<Box<SpawnRequest>>,
    stack: Option<Stack>,
    cgroup_procs: Vec<PathBuf>,
    main_group: Option<i32>,
}

impl Shim {
    /// Waits for the shim to exit. Returns false if it could not be reaped.
    fn wait(&mut self) -> bool {
        while !self.reaped {
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value of the plain C struct.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: waits for our own child, writing into the two locals.
            let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut ru) };
            if r == self.pid {
                self.reaped = true;
                self.rusage = Some(ru);
            } else if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            } else {
                return false;
            }
        }
        true
    }

    /// Reaps the shim once the status pipe has reached end-of-file: by then the main
    /// process has exec'd or exited (it holds the pipe until then), so no child runs on the
    /// stacks any more and they can be reused.
    fn reap_after_eof(&mut self) {
        if self.wait() {
            if let Some(stack) = self.stack.take() {
                stack.give_back();
            }
            if let Some(request) = self.request.take() {
                request.main_stack.give_back();
            }
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if self.request.is_some() {
            // The supervision was abandoned midway: kill the job and its shim. A main
            // process may still be running on its stack before exec, and SIGKILL takes
            // effect asynchronously, so the stacks and the request are leaked, never reused.
            tree::signal_job(
                self.pid,
                self.main_group,
                &self.cgroup_procs,
                Signal::SIGKILL,
            );
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL);
            self.wait();
            std::mem::forget(self.stack.take());
            std::mem::forget(self.request.take());
        }
    }
}

const STACK_SIZE: usize = 64 * 1024;

/// `/dev/null`, opened once per process (close-on-exec) and given to every step as stdin.
fn dev_null() -> io::Result<std::os::fd::RawFd> {
    static DEV_NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let fd = above_stdio(OwnedFd::from(std::fs::File::open("/dev/null")?))?;
    Ok(DEV_NULL.get_or_init(|| fd).as_raw_fd())
}

/// Starts the shim for `spec`. Returns it with the read ends of stdout, stderr and the
/// status pipe.
fn spawn(
    spec: ProcessSpec,
) -> Result<(Shim, pipe::Receiver, pipe::Receiver, pipe::Receiver), SpawnError> {
    let path = resolve_program(&spec.program, &spec.env, &spec.cwd)?;
    let (out_r, out_w) = make_pipe()?;
    let (err_r, err_w) = make_pipe()?;
    let (status_r, status_w) = make_pipe()?;
    let devnull = dev_null()?;
    // Everything that can fail happens before the clone.
    let (out_w, err_w, status_w) = (out_w, err_w, status_w);
    let out_rx = pipe::Receiver::from_owned_fd_unchecked(out_r)?;
    let err_rx = pipe::Receiver::from_owned_fd_unchecked(err_r)?;
    let status_rx = pipe::Receiver::from_owned_fd_unchecked(status_r)?;
    let mut argv = vec![cstring(spec.program.as_encoded_bytes())?];
    for a in &spec.args {
        argv.push(cstring(a.as_encoded_bytes())?);
    }
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut request = Box::new(SpawnRequest {
        path: cstring(path.as_os_str().as_encoded_bytes())?,
        argv,
        argv_ptrs: Vec::new(),
        envp,
        envp_ptrs: Vec::new(),
        cwd: cstring(spec.cwd.as_os_str().as_encoded_bytes())?,
        plan: spec.plan,
        stdin: devnull,
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        status: status_w.as_raw_fd(),
        main_stack: Stack::take(STACK_SIZE)?,
    });
    request.finish_pointers();
    let stack = Stack::take(STACK_SIZE)?;

    // Block every signal around clone so that none is handled in the child before it has
    // reset its dispositions; the child unblocks them itself.
    // The raw call blocks every signal, including the two glibc keeps for itself.
    let all: u64 = !0;
    let mut previous: u64 = 0;
    // SAFETY: both masks are valid 8-byte sigsets.
    let r = unsafe {
        sys::syscall6(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &all as *const u64 as usize,
                &mut previous as *mut u64 as usize,
                8,
                0,
                0,
            ],
        )
    };
    if r < 0 {
        return Err(io::Error::from_raw_os_error(-r as i32).into());
    }
    // SAFETY: the request and both stacks live in `Shim` until the shim is reaped; the
    // shim only makes raw system calls.
    let pid = unsafe {
        sys::clone_with_stack(
            (libc::CLONE_VM | libc::SIGCHLD) as usize,
            stack.top(),
            shim::shim_entry,
            &*request as *const SpawnRequest as usize,
        )
    };
    // SAFETY: restores the mask saved above.
    unsafe {
        sys::syscall6(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &previous as *const u64 as usize,
                0,
                8,
                0,
                0,
            ],
        );
    }
    if pid < 0 {
        return Err(io::Error::from_raw_os_error(-pid as i32).into());
    }
    // The shim has its own copy of the descriptor table: close the parent's write ends so
    // that end-of-file means the job is done with them.
    drop((out_w, err_w, status_w));
    let shim = Shim {
        pid: pid as i32,
        reaped: false,
        rusage: None,
        request: Some(request),
        stack: Some(stack),
        cgroup_procs: spec.cgroup_procs,
        main_group: None,
    };
    Ok((shim, out_rx, err_rx, status_rx))
}

/// Runs one process to its end. `Err` only when it could not be started; the error
/// names the cause (a missing program is `NotFound`).
pub(crate) async fn supervise(
    spec: ProcessSpec,
    sup: Supervision<'_>,
) -> Result<ProcessEnd, SpawnError> {
    let (mut shim, stdout, stderr, mut status_rx) = spawn(spec)?;
    let shim_pid = shim.pid;

    let pumps = async {
        tokio::join!(
            pump(stdout, OutputStream::Stdout, &sup),
            pump(stderr, OutputStream::Stderr, &sup)
        )
    };
    tokio::pin!(pumps);

    let mut pumps_done = false;
    let mut status_open = true;
    let mut main_pid: Option<i32> = None;
    let mut main_status: Option<i32> = None;
    let mut command_status: Option<i32> = None;
    let mut exec_error: Option<i32> = None;
    let mut setup_error: Option<(i32, u8)> = None;
    let mut stop: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut reaping = false;
    // When killed processes do not go away (stopped shim, uninterruptible sleep), stop
    // waiting this long after the first SIGKILL.
    let mut give_up_at: Option<Instant> = None;
    let mut gave_up = false;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut rekill: Option<tokio::time::Interval> = None;
    loop {
        // The shim writes its last message just before it exits: the pipe's end-of-file
        // means it is gone.
        if pumps_done && !status_open {
            break;
        }
        // Once the main process is reaped its group id may be reused: stop signalling it.
        let group = if main_status.is_none() {
            main_pid
        } else {
            None
        };
        let signal_all =
            |signal: Signal| tree::signal_job(shim_pid, group, &shim.cgroup_procs, signal);
        if reaping && give_up_at.is_none() {
            give_up_at =
                Some(Instant::now() + sup.grace.max(Duration::from_secs(1)) + GIVE_UP_AFTER);
        }
        let main_running = main_status.is_none() && status_open;
        tokio::select! {
            _ = &mut pumps, if !pumps_done => pumps_done = true,
            msg = read_message(&mut status_rx), if status_open => match msg {
                Some(msg) => match msg[0] {
                    b'P' => {
                        main_pid = Some(message_value(&msg));
                        shim.main_group = main_pid;
                    }
                    b'E' => exec_error = Some(message_value(&msg)),
                    b'F' => setup_error = Some((message_value(&msg), msg[5])),
                    b'R' => command_status = Some(message_value(&msg)),
                    b'S' => {
                        main_status = Some(message_value(&msg));
                        if msg[5] == 1 {
                            // The main process is done but others of the job live on.
                            let count = signal_all(Signal::SIGKILL);
                            reaping = true;
                            if count > 0 && exec_error.is_none() {
                                sup.sink.emit(EventKind::LeftoverProcesses { step: sup.step, count }).await;
                            }
                        }
                    }
                    _ => {}
                },
                None => status_open = false,
            },
            _ = tokio::time::sleep_until(sup.deadline), if main_running && stop.is_none() => {
                stop = Some(StopReason::TimedOut);
                signal_all(Signal::SIGTERM);
                kill_at = Some(Instant::now() + sup.grace);
            }
            _ = sup.sink.cancelled(), if main_running && stop.is_none() => {
                stop = Some(StopReason::Cancelled);
                signal_all(Signal::SIGTERM);
                kill_at = Some(Instant::now() + sup.grace);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() && !reaping => {
                signal_all(Signal::SIGKILL);
                reaping = true;
            }
            _ = async { rekill.get_or_insert_with(|| tokio::time::interval(REKILL_INTERVAL)).tick().await }, if reaping => {
                // Processes forked while the previous round was being sent.
                signal_all(Signal::SIGKILL);
            }
            _ = tokio::time::sleep_until(give_up_at.unwrap_or(far)), if give_up_at.is_some() => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim_pid), Signal::SIGKILL);
                gave_up = true;
                break;
            }
        }
    }
    if gave_up {
        // Drop (of `shim`) kills and reaps what it can and never reuses the stacks.
        tracing::warn!(
            shim = shim_pid,
            "processes of a step did not die after SIGKILL; giving up on them"
        );
        return Ok(ProcessEnd::SupervisorLost);
    }
    shim.reap_after_eof();
    if let Some(ru) = &shim.rusage {
        sup.usage.add(ru);
    }
    if let Some((errno, stage)) = setup_error {
        return Err(SpawnError {
            error: io::Error::from_raw_os_error(errno),
            stage: Some(
                shim::STAGES
                    .get(stage as usize)
                    .copied()
                    .unwrap_or("setting up"),
            ),
        });
    }
    if let Some(errno) = exec_error {
        return Err(io::Error::from_raw_os_error(errno).into());
    }
    if let Some(reason) = stop {
        return Ok(match reason {
            StopReason::TimedOut => ProcessEnd::TimedOut,
            StopReason::Cancelled => ProcessEnd::Cancelled,
        });
    }
    let Some(status) = command_status.or(main_status) else {
        return Ok(ProcessEnd::SupervisorLost);
    };
    Ok(if libc::WIFSIGNALED(status) {
        ProcessEnd::Signalled(libc::WTERMSIG(status))
    } else {
        ProcessEnd::Exited(libc::WEXITSTATUS(status))
    })
}

async fn pump(mut reader: impl AsyncRead + Unpin, stream: OutputStream, sup: &Supervision<'_>) {
    let mut writer = StreamWriter::new(sup.sink, sup.step, stream, sup.secrets, sup.output);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => writer.write(buf.split().freeze()).await,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    writer.finish().await;
}

/// True when a child may enter new namespaces with `flags` (and, with `mount_proc`, mount
/// a fresh `/proc` as PID 1 of a new PID namespace). Runs the check in a forked child.
pub(crate) fn probe_namespaces(flags: libc::c_int, mount_proc: bool) -> bool {
    // SAFETY: the children only make async-signal-safe calls and exit with _exit.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return false;
        }
        if pid == 0 {
            if libc::unshare(flags) != 0 {
                libc::_exit(1);
            }
            if mount_proc {
                let inner = libc::fork();
                if inner < 0 {
                    libc::_exit(1);
                }
                if inner == 0 {
                    let ok = libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                        && libc::mount(
                            c"proc".as_ptr(),
                            c"/proc".as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            std::ptr::null(),
                        ) == 0;
                    libc::_exit(if ok { 0 } else { 1 });
                }
                let mut status = 0;
                libc::waitpid(inner, &mut status, 0);
                libc::_exit(
                    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                        0
                    } else {
                        1
                    },
                );
            }
            libc::_exit(0);
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return false;
            }
        }
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}
