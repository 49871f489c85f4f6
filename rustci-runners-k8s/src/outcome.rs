//! How a job ends: its outcome from what the pod status and the step markers said,
//! and the step events that go with it.

use rustci_runners::{EventKind, Outcome, StepStatus};

use crate::watch::Seen;

use crate::job::{JobRun, Steps, Stop};
use crate::logs::Reader;

impl JobRun {
    /// The outcome once the loop has ended.
    pub(crate) async fn outcome(
        &self,
        steps: &mut Steps,
        state: &Seen,
        logs_broke: Option<String>,
    ) -> Outcome {
        let n = self.job.steps.len();
        let current = steps.started.checked_sub(1);
        let unfinished = current.filter(|i| !steps.finished[*i]);
        // The runtime marks the container OOMKilled when any of its processes was; that
        // explains a step's end only when SIGKILL ended it.
        let oom_container = state
            .terminated
            .as_ref()
            .is_some_and(|t| t.reason == "OOMKilled");
        let oom = |code: i32| oom_container && code == 137;
        let finished_outcome = |steps: &Steps| match steps.failure {
            Some((step, code)) => Some(self.step_outcome(step, code, oom(code))),
            None if steps.started == n && steps.codes.iter().all(Option::is_some) => {
                Some(Outcome::Succeeded)
            }
            None => None,
        };
        if let Some((why, _, already)) = steps.stop {
            // A job that had ended before the stop keeps its own outcome.
            if already && let Some(o) = finished_outcome(steps) {
                let status = current
                    .and_then(|i| steps.codes[i])
                    .map_or(why.status(), step_status);
                self.end_unfinished(steps, unfinished, status).await;
                return o;
            }
            self.end_unfinished(steps, unfinished, why.status()).await;
            return match why {
                Stop::TimedOut => Outcome::TimedOut { step: current },
                Stop::Cancelled => Outcome::Cancelled,
            };
        }
        if let Some(t) = &state.terminated
            && matches!(t.reason.as_str(), "StartError" | "ContainerCannotRun")
        {
            self.end_unfinished(steps, unfinished, StepStatus::NotStarted)
                .await;
            return Outcome::RunnerError {
                message: self.secrets.mask_str(&format!(
                    "the job container of pod {} could not start: {}: {}",
                    self.name, t.reason, t.message
                )),
                // The image's entry point cannot run: the same pod would fail again.
                temporary: false,
            };
        }
        if let Some((reason, message)) = &state.pod_failed {
            if reason == "DeadlineExceeded" {
                self.end_unfinished(steps, unfinished, StepStatus::TimedOut)
                    .await;
                tracing::info!(pod = %self.name, %message, "the cluster ended the job pod at its deadline");
                return Outcome::TimedOut { step: current };
            }
            if !state.started {
                return Outcome::RunnerError {
                    message: self.secrets.mask_str(&format!(
                        "pod {} failed before it started: {reason}: {message}",
                        self.name
                    )),
                    // Evicted or rejected by its node before it ran: another try may land
                    // on a node that takes it.
                    temporary: true,
                };
            }
        }
        // Deleted or failed underneath the job (a lost node, an eviction): whatever the
        // steps reported as the container was killed, the job was lost.
        if state.gone || state.deleting || state.pod_failed.is_some() {
            self.end_unfinished(steps, unfinished, StepStatus::Cancelled)
                .await;
            match &state.pod_failed {
                Some((reason, message)) => {
                    tracing::warn!(pod = %self.name, %reason, %message, "the job pod failed underneath the job")
                }
                None => {
                    tracing::warn!(pod = %self.name, "the job pod was deleted underneath the job")
                }
            }
            return Outcome::Lost;
        }
        if steps.failure.is_some() {
            return finished_outcome(steps).unwrap_or(Outcome::Lost);
        }
        if steps.all_finished() {
            return match &state.terminated {
                // Every step passed but the container did not: its first process was killed.
                Some(t) if t.code != 0 => self.step_outcome(n - 1, t.code, oom(t.code)),
                _ => Outcome::Succeeded,
            };
        }
        match (&state.terminated, current) {
            // The entry script failed before its first step (the workspace directory).
            (Some(t), None) if t.code != 0 => Outcome::RunnerError {
                message: format!(
                    "the entry script of pod {} failed before the first step (exit code {}); see its output",
                    self.name, t.code
                ),
                temporary: false,
            },
            // The container ended before the steps did.
            (Some(t), _) if t.code != 0 => {
                let step = current.unwrap_or(0);
                self.end_unfinished(steps, unfinished, step_status(t.code))
                    .await;
                self.step_outcome(step, t.code, oom(t.code))
            }
            // Some output never arrived (a log stream ended early), but the entry script,
            // which exits 0 only when no step failed the job, succeeded.
            (Some(_), _) => {
                if let Some(e) = &logs_broke {
                    tracing::warn!(pod = %self.name, error = %e, "the job's output is incomplete");
                }
                self.end_unfinished(steps, unfinished, StepStatus::Exited(0))
                    .await;
                Outcome::Succeeded
            }
            _ => {
                self.end_unfinished(steps, unfinished, StepStatus::NotStarted)
                    .await;
                Outcome::RunnerError {
                    message: match logs_broke {
                        Some(e) => format!("the output of pod {} broke off: {e}", self.name),
                        None => format!(
                            "the job container of pod {} ended before its steps did",
                            self.name
                        ),
                    },
                    temporary: true,
                }
            }
        }
    }

    /// Emits `StepFinished` for a step that was still running when the job ended.
    pub(crate) async fn end_unfinished(
        &self,
        steps: &Steps,
        step: Option<usize>,
        status: StepStatus,
    ) {
        if let Some(i) = step {
            self.emit_finished(steps, i, status).await;
        }
    }

    pub(crate) async fn emit_finished(&self, steps: &Steps, step: usize, status: StepStatus) {
        self.sink
            .emit(EventKind::StepFinished {
                step,
                name: self.job.steps[step].display_name(step),
                status,
                duration: steps.started_at[step]
                    .map(|t| t.elapsed())
                    .unwrap_or_default(),
            })
            .await;
    }

    /// Notes a step's end status (the first stream to report it wins). A step that ends
    /// after the runner's stop ended because of it, and fails nothing on its own.
    pub(crate) fn record_end(&self, steps: &mut Steps, step: usize, code: i32) {
        if steps.codes[step].is_some() {
            return;
        }
        steps.codes[step] = Some(code);
        steps.clean[step] = steps.stop.is_none();
        if code != 0
            && steps.stop.is_none()
            && steps.failure.is_none()
            && !self.job.steps[step].continue_on_error
        {
            steps.failure = Some((step, code));
        }
    }

    /// Emits a step's `StepFinished` once.
    pub(crate) async fn finish_step(&self, steps: &mut Steps, step: usize) {
        if steps.finished[step] {
            return;
        }
        steps.finished[step] = true;
        let status = match (steps.stop, steps.codes[step]) {
            (_, Some(code)) if steps.clean[step] => step_status(code),
            (Some((why, _, _)), _) => why.status(),
            (None, Some(code)) => step_status(code),
            // No end marker on any stream (the output was cut off).
            (None, None) => StepStatus::NotStarted,
        };
        self.emit_finished(steps, step, status).await;
    }

    /// Emits `StepFinished` once every stream has passed a step's end, then lets the
    /// streams that waited for it go on.
    pub(crate) async fn barrier(&self, readers: &mut [Reader], steps: &mut Steps) {
        let Some(step) = readers.iter().filter_map(|r| r.blocked).min() else {
            return;
        };
        // A stream past this step (it lost the end marker) or ended counts as there.
        if !readers
            .iter()
            .all(|r| r.done || r.blocked.is_some_and(|b| b >= step))
        {
            return;
        }
        self.finish_step(steps, step).await;
        for r in readers.iter_mut() {
            if r.blocked == Some(step) {
                r.blocked = None;
            }
        }
    }

    pub(crate) fn step_outcome(&self, step: usize, code: i32, oom: bool) -> Outcome {
        let step_name = self.job.steps[step].display_name(step);
        if (129..=192).contains(&code) || oom {
            Outcome::Signalled {
                step,
                step_name,
                signal: if oom { 9 } else { code - 128 },
                oom_killed: oom,
            }
        } else {
            Outcome::Failed {
                step,
                step_name,
                exit_code: code,
            }
        }
    }

    pub(crate) fn not_started(&self, state: &Seen) -> Outcome {
        let reason = state
            .pending
            .clone()
            .unwrap_or_else(|| "no status from the cluster".into());
        // An image that may never be pulled or is not a valid name fails again on any
        // try; an unschedulable pod or a registry that did not answer may not.
        let temporary = !state.hopeless;
        Outcome::RunnerError {
            message: self.secrets.mask_str(&format!(
                "pod {} did not start within {:?}: {reason}",
                self.name, self.inner.config.pending_timeout
            )),
            temporary,
        }
    }
}

pub(crate) fn step_status(code: i32) -> StepStatus {
    if (129..=192).contains(&code) {
        StepStatus::Signalled(code - 128)
    } else {
        StepStatus::Exited(code)
    }
}
