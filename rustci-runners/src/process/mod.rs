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
mod tree;

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::time::Instant;

use crate::mask::{Masker, SecretSet};
use crate::runner::{EventKind, ExecutionSink, OutputStream};

pub(crate) use cgroup::{CgroupLimits, CgroupSupport, JobCgroup};
pub(crate) use shim::{Rlimit, ShimPlan};

const READ_CHUNK: usize = 64 * 1024;
const REKILL_INTERVAL: Duration = Duration::from_millis(10);

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

/// Output accounting shared by all steps of a job.
#[derive(Debug)]
pub(crate) struct OutputBudget {
    limit: u64,
    used: AtomicU64,
    truncated: AtomicBool,
}

impl OutputBudget {
    pub(crate) fn new(limit: u64) -> Self {
        OutputBudget {
            limit,
            used: AtomicU64::new(0),
            truncated: AtomicBool::new(false),
        }
    }
}

/// Where a supervised process reports to, and its limits.
pub(crate) struct Supervision<'a> {
    pub sink: &'a ExecutionSink,
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
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StopReason {
    TimedOut,
    Cancelled,
}

async fn read_message(rx: &mut pipe::Receiver) -> Option<[u8; 6]> {
    let mut buf = [0u8; 6];
    rx.read_exact(&mut buf).await.ok().map(|_| buf)
}

fn message_value(msg: &[u8; 6]) -> i32 {
    i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]])
}

/// Runs one process to its end. `Err` only when it could not be started; the error
/// names the cause (a missing program is `NotFound`).
pub(crate) async fn supervise(spec: ProcessSpec, sup: Supervision<'_>) -> io::Result<ProcessEnd> {
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let mut plan = spec.plan;
    plan.status_fd = status_w.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the shim only makes async-signal-safe calls on data prepared here.
    unsafe {
        cmd.pre_exec(move || shim::run(&plan));
    }
    let mut child = cmd.spawn()?;
    drop(status_w);
    let shim_pid = child.id().map(|p| p as i32).unwrap_or(0);
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut status_rx = pipe::Receiver::from_owned_fd_unchecked(status_r)?;
    let main_pid = match read_message(&mut status_rx).await {
        Some(msg) if msg[0] == b'P' => Some(message_value(&msg)),
        _ => None,
    };

    let pumps = async {
        tokio::join!(
            pump(stdout, OutputStream::Stdout, &sup),
            pump(stderr, OutputStream::Stderr, &sup)
        )
    };
    tokio::pin!(pumps);

    let signal_all =
        |signal: Signal| tree::signal_job(shim_pid, main_pid, &spec.cgroup_procs, signal);

    let mut pumps_done = false;
    let mut shim_done = false;
    let mut status_open = true;
    let mut main_status: Option<i32> = None;
    let mut command_status: Option<i32> = None;
    let mut stop: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut reaping = false;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut rekill = tokio::time::interval(REKILL_INTERVAL);
    loop {
        // The shim writes the main status before it exits: read the pipe to its end too.
        if pumps_done && shim_done && !status_open {
            break;
        }
        let main_running = main_status.is_none() && status_open;
        tokio::select! {
            _ = &mut pumps, if !pumps_done => pumps_done = true,
            _ = child.wait(), if !shim_done => shim_done = true,
            msg = read_message(&mut status_rx), if status_open => match msg {
                Some(msg) if msg[0] == b'S' => {
                    main_status = Some(message_value(&msg));
                    if msg[5] == 1 {
                        // The main process is done but others of the job live on.
                        let count = signal_all(Signal::SIGKILL);
                        reaping = true;
                        if count > 0 {
                            sup.sink.emit(EventKind::LeftoverProcesses { step: sup.step, count }).await;
                        }
                    }
                }
                Some(msg) if msg[0] == b'R' => command_status = Some(message_value(&msg)),
                Some(_) => {}
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
            _ = rekill.tick(), if reaping => {
                // Processes forked while the previous round was being sent.
                signal_all(Signal::SIGKILL);
            }
        }
    }
    if let Some(reason) = stop {
        return Ok(match reason {
            StopReason::TimedOut => ProcessEnd::TimedOut,
            StopReason::Cancelled => ProcessEnd::Cancelled,
        });
    }
    let status = command_status.or(main_status).unwrap_or(0);
    Ok(if libc::WIFSIGNALED(status) {
        ProcessEnd::Signalled(libc::WTERMSIG(status))
    } else {
        ProcessEnd::Exited(libc::WEXITSTATUS(status))
    })
}

async fn pump(mut reader: impl AsyncRead + Unpin, stream: OutputStream, sup: &Supervision<'_>) {
    let mut masker = Masker::new(sup.secrets.clone());
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {
                let out = masker.push(buf.split().freeze());
                deliver(out, stream, sup).await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let rest = masker.finish();
    deliver(rest, stream, sup).await;
}

async fn deliver(mut data: Bytes, stream: OutputStream, sup: &Supervision<'_>) {
    if data.is_empty() {
        return;
    }
    let budget = sup.output;
    let before = budget.used.fetch_add(data.len() as u64, Ordering::Relaxed);
    if before >= budget.limit {
        return;
    }
    let room = budget.limit - before;
    let over = (data.len() as u64) > room;
    if over {
        data.truncate(room as usize);
    }
    if !data.is_empty() {
        sup.sink
            .emit(EventKind::Output {
                step: sup.step,
                stream,
                data,
            })
            .await;
    }
    if over && !budget.truncated.swap(true, Ordering::Relaxed) {
        sup.sink
            .emit(EventKind::OutputTruncated {
                step: sup.step,
                limit: budget.limit,
            })
            .await;
    }
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
