//! One job on the engine: choosing a warm or new container, running its steps (as the
//! container's own process or as execs in a keep-alive container), pumping output,
//! stopping on timeout or cancel, telling an OOM kill from a signal, and cleanup.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::query_parameters::{KillContainerOptionsBuilder, ListContainersOptionsBuilder};
use futures::StreamExt;
use rustci_runners::backend::{LABEL_JOB, LABEL_MANAGED, WORKSPACE};
use rustci_runners::job::{Job, JobSpec, StepAction};
use rustci_runners::mask::SecretSet;
use rustci_runners::output::{OutputBudget, StreamWriter};
use rustci_runners::{
    Error, EventKind, Execution, ExecutionSink, JobId, Outcome, OutputStream, SlotGuard, StepStatus,
};
use tokio::time::Instant;

use crate::DockerRunner;
use crate::container::{Cleanup, SINGLE_STEP, container_state, remove_container};
use crate::image::check_image_reference;
use crate::runner::{Inner, engine_error};

/// How often an exec is checked for having exited while its output stays open.
pub(crate) const LEFTOVER_CHECK: Duration = Duration::from_millis(200);
/// How long to wait for output to end after SIGKILL before giving up on it.
pub(crate) const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

/// The environment every step gets, before job, step and secret variables.
pub(crate) fn base_env(id: &JobId, job: &Job, runner: &str) -> Vec<(String, String)> {
    [
        ("CI", "true".to_string()),
        ("RUSTCI", "true".to_string()),
        ("RUSTCI_JOB_ID", id.to_string()),
        ("RUSTCI_JOB_NAME", job.name.clone()),
        ("RUSTCI_RUNNER", runner.to_string()),
        ("RUSTCI_WORKSPACE", WORKSPACE.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A step's environment as the engine takes it (`NAME=value`).
pub(crate) fn step_env(
    base: &[(String, String)],
    job: &Job,
    step: &rustci_runners::Step,
) -> Vec<String> {
    rustci_runners::backend::step_environment(base, job, step)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

pub(crate) fn step_argv(step: &rustci_runners::Step) -> Option<Vec<String>> {
    match &step.action {
        StepAction::Run(script) => Some(vec![
            "/bin/sh".into(),
            "-e".into(),
            "-c".into(),
            script.clone(),
        ]),
        StepAction::Command(argv) => Some(argv.clone()),
        _ => None,
    }
}

impl DockerRunner {
    pub(crate) async fn abandon_job(&self, id: &JobId) -> Result<(), Error> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_JOB}={id}")],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .inner
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine_error("cannot list containers", e))?;
        for c in containers {
            if let Some(cid) = c.id
                && remove_container(&self.inner.docker, &cid).await
            {
                tracing::info!(container = %cid, job_id = %id, "removed the container of an abandoned job");
            }
        }
        Ok(())
    }

    pub(crate) async fn start_job(
        &self,
        spec: &dyn JobSpec,
        id: JobId,
    ) -> Result<Execution, Error> {
        let inner = &self.inner;
        let mut job = spec.to_job();
        if job.image.is_none() {
            job.image = inner.config.default_image.clone();
        }
        job.validate().map_err(Error::InvalidSpec)?;
        let unsupported = |reason: String| Error::Unsupported {
            runner: inner.info.name.clone(),
            reasons: vec![reason],
        };
        let Some(image) = job.image.clone() else {
            return Err(unsupported(
                "the job names no image and the runner has no default image".into(),
            ));
        };
        check_image_reference(&image).map_err(unsupported)?;
        if job.steps.iter().any(|s| step_argv(s).is_none()) {
            return Err(unsupported("a step kind this runner does not know".into()));
        }
        let reasons = inner.caps.unmet(&job);
        if !reasons.is_empty() {
            return Err(Error::Unsupported {
                runner: inner.info.name.clone(),
                reasons,
            });
        }
        let slot = inner
            .running
            .acquire(&inner.info.name, inner.caps.max_concurrency)?;
        let base = base_env(&id, &job, &inner.info.name);
        let workdir = match &job.workdir {
            Some(w) => format!("{WORKSPACE}/{w}"),
            None => WORKSPACE.to_string(),
        };

        let warm = if job.resources.is_empty() && job.workdir.is_none() {
            inner.take_warm(&image).await
        } else {
            None
        };
        // Replace what was taken, and refill a pool that idled away.
        inner.top_up(&image);
        let (container, cleanup, mode) = if let Some(w) = warm {
            (w.id, w.cleanup, Mode::Exec { warm: true })
        } else {
            inner.ensure_image(&image).await?;
            if job.steps.len() == 1 {
                // One step: it is the container's own process, as with `docker run`.
                let step = &job.steps[0];
                let mut cmd = vec![
                    "/bin/sh".to_string(),
                    "-c".into(),
                    SINGLE_STEP.into(),
                    "sh".into(),
                ];
                cmd.extend(step_argv(step).unwrap_or_default());
                let (bind, mut cleanup) = inner.workspace(id.as_str())?;
                let cid = inner
                    .create(
                        &image,
                        id.as_str(),
                        cmd,
                        step_env(&base, &job, step),
                        workdir.clone(),
                        &job.resources,
                        &mut cleanup,
                        bind,
                    )
                    .await?;
                let options = bollard::query_parameters::AttachContainerOptionsBuilder::new()
                    .stream(true)
                    .stdout(true)
                    .stderr(true)
                    .build();
                let attached = inner
                    .docker
                    .attach_container(&cid, Some(options))
                    .await
                    .map_err(|e| {
                        engine_error(&format!("cannot attach to the container of job {id}"), e)
                    })?;
                inner.start_container(&cid, &image).await?;
                (cid, cleanup, Mode::Single(attached.output))
            } else {
                let (cid, cleanup) = inner
                    .keepalive(&image, id.as_str(), Vec::new(), &job.resources)
                    .await?;
                (cid, cleanup, Mode::Exec { warm: false })
            }
        };

        let (execution, sink) = Execution::channel(id.clone(), inner.config.event_buffer);
        let run = JobRun {
            inner: inner.clone(),
            container,
            secrets: SecretSet::new(job.secrets.values().map(String::as_str)),
            budget: OutputBudget::new(inner.config.max_output_bytes),
            base,
            workdir,
            job,
            sink,
            cleanup: Some(cleanup),
            slot: Some(slot),
            oom_baseline: AtomicU64::new(0),
        };
        tokio::spawn(run.run(mode));
        Ok(execution)
    }
}

pub(crate) type LogStream = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>>
            + Send,
    >,
>;

/// How a job's steps run.
pub(crate) enum Mode {
    /// The only step is the container's process; its output is this attached stream.
    Single(LogStream),
    /// Steps are executed in a keep-alive container; a warm container is discarded in
    /// the background after the job.
    Exec { warm: bool },
}

pub(crate) struct JobRun {
    pub(crate) inner: Arc<Inner>,
    pub(crate) container: String,
    pub(crate) job: Job,
    pub(crate) sink: ExecutionSink,
    pub(crate) secrets: SecretSet,
    pub(crate) budget: OutputBudget,
    pub(crate) base: Vec<(String, String)>,
    pub(crate) workdir: String,
    pub(crate) cleanup: Option<Cleanup>,
    pub(crate) slot: Option<SlotGuard>,
    /// OOM kills in the container before the current step.
    pub(crate) oom_baseline: AtomicU64,
}

pub(crate) enum StepEnd {
    Exited(i64),
    TimedOut,
    Cancelled,
    Failed(String),
}

/// What pumping one output stream ended with.
pub(crate) struct Pumped {
    pub(crate) stop: Option<StepEnd>,
    pub(crate) exec_failure: Option<String>,
}

impl JobRun {
    pub(crate) async fn run(mut self, mode: Mode) {
        self.sink
            .emit(EventKind::Started {
                job_id: self.sink.job_id().to_string(),
                runner_id: self.inner.info.id.clone(),
                runner_kind: self.inner.info.kind,
            })
            .await;
        let (outcome, warm) = match mode {
            Mode::Single(output) => (self.single(output).await, false),
            Mode::Exec { warm } => (self.steps().await, warm),
        };
        tracing::info!(job_id = %self.sink.job_id(), runner = %self.inner.info.name, %outcome, "job ended");
        if let Some(cleanup) = self.cleanup.take() {
            if warm {
                // Discarded after the outcome, replaced in the background already.
                self.inner.tasks.spawn(cleanup.run());
            } else {
                cleanup.run().await;
            }
        }
        self.slot.take();
        self.sink.finish(outcome).await;
    }

    /// Announces step `index` and returns its name, start and deadline (the earlier of
    /// the job's and the step's own).
    pub(crate) async fn begin_step(
        &self,
        index: usize,
        step: &rustci_runners::Step,
        job_deadline: Instant,
    ) -> (String, Instant, Instant) {
        let name = step.display_name(index);
        self.sink
            .emit(EventKind::StepStarted {
                step: index,
                name: name.clone(),
            })
            .await;
        let started = Instant::now();
        let deadline = match step.timeout {
            Some(t) => job_deadline.min(started + t),
            None => job_deadline,
        };
        (name, started, deadline)
    }

    pub(crate) async fn single(&mut self, output: LogStream) -> Outcome {
        let step = self.job.steps[0].clone();
        let job_deadline = Instant::now() + self.job.effective_timeout();
        let (name, started, deadline) = self.begin_step(0, &step, job_deadline).await;
        let pumped = self.pump(0, output, deadline, None, "").await;
        let end = match pumped.stop {
            Some(end) => end,
            None => {
                // The output ended, so the container's process has exited: its status
                // comes at once (bounded all the same).
                let mut wait = self.inner.docker.wait_container(
                    &self.container,
                    None::<bollard::query_parameters::WaitContainerOptions>,
                );
                let state = tokio::time::timeout(GIVE_UP_AFTER, wait.next())
                    .await
                    .unwrap_or_else(|_| {
                        Some(Err(bollard::errors::Error::IOError {
                            err: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no exit status from the engine",
                            ),
                        }))
                    });
                // bollard reports a non-zero exit as an error carrying the code.
                match state {
                    Some(Ok(r)) => StepEnd::Exited(r.status_code),
                    Some(Err(bollard::errors::Error::DockerContainerWaitError {
                        code, ..
                    })) => StepEnd::Exited(code),
                    Some(Err(e)) => {
                        StepEnd::Failed(format!("cannot read the exit code of the step: {e}"))
                    }
                    None => StepEnd::Failed("the engine reported no exit code".into()),
                }
            }
        };
        self.conclude(0, &name, &step, started, end)
            .await
            .unwrap_or(Outcome::Succeeded)
    }

    pub(crate) async fn steps(&mut self) -> Outcome {
        let deadline = Instant::now() + self.job.effective_timeout();
        if self.job.workdir.is_some() {
            let mkdir = vec!["mkdir".into(), "-p".into(), self.workdir.clone()];
            let end = self
                .exec(usize::MAX, mkdir, Vec::new(), WORKSPACE.into(), deadline)
                .await;
            match end {
                StepEnd::Exited(0) => {}
                // Stopped while preparing: the job's timeout or cancel, not a failure.
                StepEnd::TimedOut => return Outcome::TimedOut { step: None },
                StepEnd::Cancelled => return Outcome::Cancelled,
                // The engine could not run the `mkdir`: its trouble, maybe for now.
                StepEnd::Failed(message) => {
                    return Outcome::RunnerError {
                        message: format!(
                            "cannot create the working directory {} in the container: {}",
                            self.workdir,
                            self.secrets.mask_str(&message)
                        ),
                        temporary: true,
                    };
                }
                _ => {
                    return Outcome::RunnerError {
                        message: format!(
                            "cannot create the working directory {} in the container",
                            self.workdir
                        ),
                        temporary: false,
                    };
                }
            }
        }
        let steps = self.job.steps.clone();
        for (index, step) in steps.iter().enumerate() {
            if self.sink.is_cancelled() {
                return Outcome::Cancelled;
            }
            let (name, started, step_deadline) = self.begin_step(index, step, deadline).await;
            let argv = step_argv(step).unwrap_or_default();
            let env = step_env(&self.base, &self.job, step);
            if let Some(count) = self.oom_kills() {
                self.oom_baseline.store(count, Ordering::SeqCst);
            }
            let end = self
                .exec(index, argv, env, self.workdir.clone(), step_deadline)
                .await;
            if let Some(outcome) = self.conclude(index, &name, step, started, end).await {
                return outcome;
            }
        }
        Outcome::Succeeded
    }

    /// Reports a step's end; returns the job's outcome when the job ends here.
    pub(crate) async fn conclude(
        &self,
        index: usize,
        name: &str,
        step: &rustci_runners::Step,
        started: Instant,
        end: StepEnd,
    ) -> Option<Outcome> {
        let finish = |status| EventKind::StepFinished {
            step: index,
            name: name.to_string(),
            status,
            duration: started.elapsed(),
        };
        match end {
            StepEnd::Exited(0) => {
                self.sink.emit(finish(StepStatus::Exited(0))).await;
                None
            }
            StepEnd::Exited(code) => {
                let (status, outcome) = if (129..=192).contains(&code) {
                    let signal = (code - 128) as i32;
                    let oom_killed = signal == 9 && self.oom_killed().await;
                    (
                        StepStatus::Signalled(signal),
                        Outcome::Signalled {
                            step: index,
                            step_name: name.to_string(),
                            signal,
                            oom_killed,
                        },
                    )
                } else {
                    (
                        StepStatus::Exited(code as i32),
                        Outcome::Failed {
                            step: index,
                            step_name: name.to_string(),
                            exit_code: code as i32,
                        },
                    )
                };
                self.sink.emit(finish(status)).await;
                (!step.continue_on_error).then_some(outcome)
            }
            StepEnd::TimedOut => {
                self.sink.emit(finish(StepStatus::TimedOut)).await;
                Some(Outcome::TimedOut { step: Some(index) })
            }
            StepEnd::Cancelled => {
                self.sink.emit(finish(StepStatus::Cancelled)).await;
                Some(Outcome::Cancelled)
            }
            StepEnd::Failed(message) => {
                self.sink.emit(finish(StepStatus::NotStarted)).await;
                // An exec the engine could not create or start: the engine's trouble.
                Some(Outcome::RunnerError {
                    message: self.secrets.mask_str(&message),
                    temporary: true,
                })
            }
        }
    }

    /// True when the container's memory cgroup saw an OOM kill (local engine), or the
    /// engine says so.
    pub(crate) async fn oom_killed(&self) -> bool {
        if let Some(count) = self.oom_kills() {
            return count > self.oom_baseline.load(Ordering::SeqCst);
        }
        container_state(&self.inner.docker, &self.container)
            .await
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    }

    /// OOM kills so far in the container's memory cgroup (local engine only).
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        if self.inner.local {
            for file in [
                format!(
                    "/sys/fs/cgroup/memory/docker/{}/memory.oom_control",
                    self.container
                ),
                format!(
                    "/sys/fs/cgroup/system.slice/docker-{}.scope/memory.events",
                    self.container
                ),
                format!("/sys/fs/cgroup/docker/{}/memory.events", self.container),
            ] {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    return Some(
                        text.lines()
                            .find_map(|l| {
                                let mut p = l.split_whitespace();
                                (p.next() == Some("oom_kill")).then(|| p.next()?.parse().ok())?
                            })
                            .unwrap_or(0),
                    );
                }
            }
        }
        None
    }

    pub(crate) async fn signal_container(&self, signal: &str) {
        let options = KillContainerOptionsBuilder::new().signal(signal).build();
        let _ = self
            .inner
            .docker
            .kill_container(&self.container, Some(options))
            .await;
    }

    /// Streams one output to events until it ends, enforcing the deadline and cancel
    /// (SIGTERM to every process of the container, then SIGKILL after the grace period, then
    /// giving up on the stream after [`GIVE_UP_AFTER`]). Output is read by its own future, so
    /// a consumer that reads events slowly never holds back the deadline or cancel.
    /// With `exec_id`, also notices when the exec'd process has exited while background
    /// processes hold its output open, and kills them.
    pub(crate) async fn pump(
        &self,
        step: usize,
        mut output: LogStream,
        deadline: Instant,
        exec_id: Option<&str>,
        program: &str,
    ) -> Pumped {
        // The runner's own execs (the working directory's `mkdir`) run as step
        // `usize::MAX`: their output is not the job's.
        let visible = step != usize::MAX;
        let reader = async {
            let mut out = StreamWriter::new(
                &self.sink,
                step,
                OutputStream::Stdout,
                &self.secrets,
                &self.budget,
            );
            let mut err = StreamWriter::new(
                &self.sink,
                step,
                OutputStream::Stderr,
                &self.secrets,
                &self.budget,
            );
            // The engine reports a failed exec of the program as text on stdout.
            let mut first = true;
            let mut exec_failure: Option<String> = None;
            let mut stream_error = None;
            while let Some(chunk) = output.next().await {
                match chunk {
                    Ok(bollard::container::LogOutput::StdOut { message }) => {
                        if std::mem::take(&mut first)
                            && exec_id.is_some()
                            && message.starts_with(b"OCI runtime exec failed")
                        {
                            exec_failure =
                                Some(String::from_utf8_lossy(&message).trim().to_string());
                        } else if visible {
                            out.write(message).await
                        }
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        if visible {
                            err.write(message).await
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        stream_error = Some(e.to_string());
                        break;
                    }
                }
            }
            out.finish().await;
            if let Some(text) = &exec_failure
                && visible
            {
                let missing =
                    text.contains("no such file or directory") || text.contains("not found");
                let message = if missing {
                    format!("rustci: command not found: {program}\n")
                } else {
                    format!("rustci: cannot execute {program}: {text}\n")
                };
                err.write(message.into()).await;
            }
            err.finish().await;
            (exec_failure, stream_error)
        };
        tokio::pin!(reader);
        let mut stop: Option<StepEnd> = None;
        let mut kill_at: Option<Instant> = None;
        let mut give_up_at: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut check = tokio::time::interval_at(Instant::now() + LEFTOVER_CHECK, LEFTOVER_CHECK);
        // A single-step job's step is the container's own process: when it exits the
        // kernel ends the rest of the container, so there is nothing to look for. An
        // exec's background processes outlive it and keep its output open.
        let mut leftovers_done = exec_id.is_none();
        let mut exited_seen = false;
        let (exec_failure, stream_error) = loop {
            tokio::select! {
                done = &mut reader => break done,
                // The whole container gets SIGTERM, not only the exec's process: what the
                // step started in the background gets the same grace period.
                _ = tokio::time::sleep_until(deadline), if stop.is_none() => {
                    stop = Some(StepEnd::TimedOut);
                    self.signal_container("SIGTERM").await;
                    kill_at = Some(Instant::now() + self.inner.config.termination_grace);
                }
                _ = self.sink.cancelled(), if stop.is_none() => {
                    stop = Some(StepEnd::Cancelled);
                    self.signal_container("SIGTERM").await;
                    kill_at = Some(Instant::now() + self.inner.config.termination_grace);
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    self.signal_container("SIGKILL").await;
                    kill_at = None;
                    give_up_at = Some(Instant::now() + GIVE_UP_AFTER);
                }
                _ = tokio::time::sleep_until(give_up_at.unwrap_or(far)), if give_up_at.is_some() => {
                    // The engine never closed the stream after SIGKILL; the forced removal
                    // that follows the job cleans up.
                    tracing::warn!(container = %self.container, "output did not end after SIGKILL; giving up on it");
                    break (None, None);
                }
                _ = check.tick(), if stop.is_none() && !leftovers_done => {
                    let exited = match exec_id {
                        Some(id) => self.inner.docker.inspect_exec(id).await.ok().and_then(|s| s.running) == Some(false),
                        None => false,
                    };
                    // Two checks in a row: the engine marks an exec finished before its last
                    // output has been read.
                    if exited && exited_seen {
                        leftovers_done = true;
                        self.kill_leftovers().await;
                        if visible {
                            self.sink.emit(EventKind::LeftoverProcesses { step, count: 1 }).await;
                        }
                    }
                    exited_seen = exited;
                }
            }
        };
        if stop.is_none()
            && let Some(e) = &stream_error
        {
            // Without the stream there is no telling what the step does: stop it.
            self.signal_container("SIGKILL").await;
            stop = Some(StepEnd::Failed(format!(
                "lost the output of the step from the engine: {e}"
            )));
        }
        Pumped { stop, exec_failure }
    }

    /// Kills every process of the container but its PID 1, waiting until that is done.
    pub(crate) async fn kill_leftovers(&self) {
        let docker = &self.inner.docker;
        let kill = CreateExecOptions::<String> {
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "kill -KILL -1 2>/dev/null; true".into(),
            ]),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let Ok(k) = docker.create_exec(&self.container, kill).await else {
            return;
        };
        if let Ok(StartExecResults::Attached { mut output, .. }) =
            docker.start_exec(&k.id, None).await
        {
            let drain = async { while output.next().await.is_some() {} };
            let _ = tokio::time::timeout(GIVE_UP_AFTER, drain).await;
        }
    }

    /// Runs one command in the container. `step == usize::MAX` for internal commands
    /// whose output is not shown.
    pub(crate) async fn exec(
        &self,
        step: usize,
        argv: Vec<String>,
        env: Vec<String>,
        workdir: String,
        deadline: Instant,
    ) -> StepEnd {
        let program = argv.first().cloned().unwrap_or_default();
        let config = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv),
            env: Some(env),
            working_dir: Some(workdir),
            user: self.inner.config.user.clone(),
            ..Default::default()
        };
        let docker = &self.inner.docker;
        let exec = match docker.create_exec(&self.container, config).await {
            Ok(e) => e,
            Err(e) => return StepEnd::Failed(format!("cannot create an exec for {program}: {e}")),
        };
        let output = match docker.start_exec(&exec.id, None).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return StepEnd::Failed("exec started detached".into());
            }
            Err(e) => return StepEnd::Failed(format!("cannot start {program}: {e}")),
        };
        let pumped = self
            .pump(step, output, deadline, Some(&exec.id), &program)
            .await;
        if let Some(end) = pumped.stop {
            return end;
        }
        match docker.inspect_exec(&exec.id).await {
            Ok(state) => match (state.exit_code, &pumped.exec_failure) {
                (Some(126 | 127), Some(text)) => {
                    let missing =
                        text.contains("no such file or directory") || text.contains("not found");
                    StepEnd::Exited(if missing { 127 } else { 126 })
                }
                (Some(code), _) => StepEnd::Exited(code),
                (None, _) => {
                    StepEnd::Failed(format!("the engine reported no exit code for {program}"))
                }
            },
            Err(e) => StepEnd::Failed(format!("cannot read the exit code of {program}: {e}")),
        }
    }
}
