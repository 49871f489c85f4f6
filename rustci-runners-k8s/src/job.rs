//! One job on the cluster: from its Pod's creation to its deletion.
//!
//! One job:
//!
//! ```text
//!  start(): build Secret + Pod ─► create Secret ─► create Pod ─► (job task)
//!  job task:  Pending ──container started──► Running: follow logs (stdout, stderr)
//!               │  (unschedulable / image pull     │  markers ─► StepStarted/StepFinished
//!               │   failing past pending_timeout:  │  container terminated ─► Outcome
//!               │   RunnerError with the reason)   │
//!               ▼                                  ▼
//!  timeout / cancel: delete Pod with the grace period (SIGTERM, grace, SIGKILL)
//!  always: delete Pod, wait until it is gone, delete Secret, then Finished(outcome)
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::api::ListParams;
use rustci_runners::job::{Job, JobSpec};
use rustci_runners::mask::SecretSet;
use rustci_runners::output::{OutputBudget, StreamWriter};
use rustci_runners::{
    Error, EventKind, Execution, ExecutionSink, JobId, Outcome, OutputStream, SlotGuard, StepStatus,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::LogStreams;
use crate::pod::{self, ANNOTATION_JOB_ID, JobObjects, Owner};
use crate::script::{Mark, Piece, Tag};
use crate::watch::{PodState, Subscription, seen};
use rustci_runners::backend::{LABEL_JOB, LABEL_MANAGED};

use crate::KubernetesRunner;
use crate::logs::{LogItem, Reader, read_log};
use crate::runner::{DELETE_WAIT, Inner, STATUS_WAIT, api_error};

impl KubernetesRunner {
    pub(crate) async fn abandon_job(&self, id: &JobId) -> Result<(), Error> {
        let inner = &self.inner;
        let lp = ListParams::default().labels(&format!(
            "{LABEL_MANAGED}=true,{LABEL_JOB}={}",
            pod::label_safe(id.as_str())
        ));
        // The label is a safe form of the id; the annotation holds it exactly.
        let of_id = |meta: &kube::api::ObjectMeta| is_execution(meta, id);
        let pods = inner
            .pods
            .list_metadata(&lp)
            .await
            .map_err(|e| api_error("cannot list pods", e))?;
        let deletions = pods
            .items
            .into_iter()
            .filter(|p| of_id(&p.metadata))
            .filter_map(|p| {
                let name = p.metadata.name?;
                Some(async move { inner.delete_pod_and_wait(&name, p.metadata.uid).await })
            });
        futures::future::join_all(deletions).await;
        let secrets = inner
            .secrets
            .list_metadata(&lp)
            .await
            .map_err(|e| api_error("cannot list secrets", e))?;
        for s in secrets.items.into_iter().filter(|s| of_id(&s.metadata)) {
            if let Some(name) = s.metadata.name {
                inner.delete_secret(&name).await;
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
        let Some(image) = job.image.clone() else {
            return Err(Error::Unsupported {
                runner: inner.info.name.clone(),
                reasons: vec!["the job names no image and the runner has no default image".into()],
            });
        };
        let mut reasons = inner.caps.unmet(&job);
        if !job.steps.iter().all(crate::script::known_step) {
            reasons.push("a step kind this runner does not know".into());
        }
        if !reasons.is_empty() {
            return Err(Error::Unsupported {
                runner: inner.info.name.clone(),
                reasons,
            });
        }
        let owner = Owner {
            runner_id: &inner.info.id,
            runner_name: &inner.info.name,
            owner: &inner.owner,
            namespace: &inner.namespace,
        };
        let JobObjects {
            pod,
            secret,
            name,
            nonce,
        } = pod::build(&inner.config, &owner, &job, &image, &id)?;
        let slot = inner
            .running
            .acquire(&inner.info.name, inner.caps.max_concurrency)?;
        let Some(subscription) = inner.watch.subscribe(&name) else {
            return Err(Error::Unsupported {
                runner: inner.info.name.clone(),
                reasons: vec![format!("execution {id} is already running on this runner")],
            });
        };
        let mut created = Created {
            inner: inner.clone(),
            name: name.clone(),
            secret: false,
            pod: false,
        };
        // Marked before each request: a dropped `start` cannot tell whether it got through,
        // and deleting what does not exist is harmless. A clean refusal (a conflict with
        // someone else's object, 403, 422) created nothing and must not delete anything.
        if let Some(secret) = &secret {
            created.secret = true;
            if let Err((e, maybe)) = inner
                .create(&inner.secrets, secret, "secret", &name, &id)
                .await
            {
                created.secret = maybe;
                created.undo().await;
                return Err(e);
            }
        }
        created.pod = true;
        if let Err((e, maybe)) = inner.create(&inner.pods, &pod, "pod", &name, &id).await {
            created.pod = maybe;
            created.undo().await;
            return Err(e);
        }
        created.keep();
        tracing::debug!(pod = %name, job_id = %id, "created the job pod");

        let (execution, sink) = Execution::channel(id, inner.config.event_buffer);
        let run = JobRun {
            inner: inner.clone(),
            secrets: SecretSet::new(job.secrets.values().map(String::as_str)),
            budget: OutputBudget::new(inner.config.max_output_bytes),
            has_secret: secret.is_some(),
            name,
            nonce,
            job,
            sink,
            pod: subscription,
            _slot: slot,
        };
        tokio::spawn(run.run());
        Ok(execution)
    }
}

/// True when `meta` belongs to execution `id` (its exact id annotation).
pub(crate) fn is_execution(meta: &kube::api::ObjectMeta, id: &JobId) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_JOB_ID))
        .is_some_and(|v| v == id.as_str())
}

/// Removes a job's objects if `start` is abandoned (its future dropped, or an error)
/// after some were created.
pub(crate) struct Created {
    pub(crate) inner: Arc<Inner>,
    pub(crate) name: String,
    pub(crate) secret: bool,
    pub(crate) pod: bool,
}

impl Created {
    pub(crate) async fn undo(mut self) {
        let (pod, secret) = (
            std::mem::take(&mut self.pod),
            std::mem::take(&mut self.secret),
        );
        if pod {
            self.inner.delete_pod(&self.name, None).await;
        }
        if secret {
            self.inner.delete_secret(&self.name).await;
        }
    }

    /// The job task owns the objects from here on.
    pub(crate) fn keep(mut self) {
        self.pod = false;
        self.secret = false;
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if (self.pod || self.secret)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let rest = Created {
                inner: self.inner.clone(),
                name: std::mem::take(&mut self.name),
                secret: std::mem::take(&mut self.secret),
                pod: std::mem::take(&mut self.pod),
            };
            handle.spawn(rest.undo());
        }
    }
}

/// Why the runner is ending the job itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    TimedOut,
    Cancelled,
}

impl Stop {
    pub(crate) fn status(self) -> StepStatus {
        match self {
            Stop::TimedOut => StepStatus::TimedOut,
            Stop::Cancelled => StepStatus::Cancelled,
        }
    }
}

pub(crate) struct JobRun {
    pub(crate) inner: Arc<Inner>,
    pub(crate) name: String,
    pub(crate) nonce: String,
    pub(crate) job: Job,
    pub(crate) sink: ExecutionSink,
    pub(crate) secrets: SecretSet,
    pub(crate) budget: OutputBudget,
    pub(crate) has_secret: bool,
    pub(crate) pod: Subscription,
    pub(crate) _slot: SlotGuard,
}

/// Per-step bookkeeping of the job loop.
pub(crate) struct Steps {
    pub(crate) started: usize,
    pub(crate) started_at: Vec<Option<Instant>>,
    pub(crate) finished: Vec<bool>,
    /// Exit status of each step, from its end marker.
    pub(crate) codes: Vec<Option<i32>>,
    /// The first step that failed the job on its own, with its status.
    pub(crate) failure: Option<(usize, i32)>,
    /// The runner's stop, and whether the job had already ended (failed, or every step
    /// done) when it came.
    pub(crate) stop: Option<(Stop, Instant, bool)>,
    /// In a combined stream: the step one of whose end markers came and whose other one
    /// is awaited before its `StepFinished`.
    pub(crate) pending_end: Option<usize>,
    /// In a combined stream: which end markers of each step came (1 stdout, 2 stderr).
    pub(crate) ends: Vec<u8>,
    /// Each step's status was recorded before the runner's stop.
    pub(crate) clean: Vec<bool>,
}

impl Steps {
    pub(crate) fn all_finished(&self) -> bool {
        self.started == self.finished.len() && self.finished.iter().all(|f| *f)
    }
}

/// What woke the job loop.
pub(crate) enum Wake {
    Item(usize, Option<LogItem>),
    Pod(bool),
    Timeout,
    Cancel,
    Wait,
}

impl JobRun {
    pub(crate) async fn run(mut self) {
        self.sink
            .emit(EventKind::Started {
                job_id: self.sink.job_id().to_string(),
                runner_id: self.inner.info.id.clone(),
                runner_kind: self.inner.info.kind,
            })
            .await;
        let outcome = self.drive().await;
        self.cleanup().await;
        tracing::debug!(pod = %self.name, %outcome, "job finished");
        self.sink.finish(outcome).await;
    }

    /// Deletes the pod and waits until it is gone, then deletes the secret.
    pub(crate) async fn cleanup(&mut self) {
        let gone = matches!(*self.pod.rx.borrow(), PodState::Gone);
        if !gone {
            let deleting = match &*self.pod.rx.borrow() {
                PodState::Present(p) => p.metadata.deletion_timestamp.is_some(),
                _ => false,
            };
            if deleting || self.inner.delete_pod(&self.name, None).await {
                let limit = self.inner.config.termination_grace + DELETE_WAIT;
                let wait = self.pod.rx.wait_for(|s| matches!(s, PodState::Gone));
                if tokio::time::timeout(limit, wait).await.is_err() {
                    tracing::warn!(pod = %self.name, "the job pod was not gone {limit:?} after its deletion");
                }
            }
        }
        if self.has_secret {
            self.inner.delete_secret(&self.name).await;
        }
    }

    pub(crate) fn start_reader(
        &self,
        stream: Option<&'static str>,
        out: OutputStream,
        tag: Tag,
    ) -> Reader {
        let (tx, rx) = mpsc::channel(16);
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            self.inner.namespace, self.name
        );
        let task = tokio::spawn(read_log(
            self.inner.client.clone(),
            path,
            stream,
            self.nonce.clone(),
            tx,
        ));
        Reader {
            rx,
            task,
            stream: out,
            tag,
            step: None,
            blocked: None,
            stash: None,
            done: false,
            delivered: false,
        }
    }

    pub(crate) fn readers(&self) -> Vec<Reader> {
        let split = match self.inner.config.log_streams {
            LogStreams::Split => true,
            LogStreams::Combined => false,
            LogStreams::Auto => !self.inner.combined_logs.load(Ordering::Relaxed),
        };
        if split {
            vec![
                self.start_reader(Some("Stdout"), OutputStream::Stdout, Tag::Out),
                self.start_reader(Some("Stderr"), OutputStream::Stderr, Tag::Err),
            ]
        } else {
            vec![self.start_reader(None, OutputStream::Stdout, Tag::Out)]
        }
    }

    pub(crate) async fn request_stop(&self, steps: &mut Steps, why: Stop) {
        let already = steps.failure.is_some()
            || (steps.started == steps.codes.len() && steps.clean.iter().all(|c| *c));
        steps.stop = Some((why, Instant::now(), already));
        let grace = self.inner.config.termination_grace.as_secs() as u32;
        self.inner.delete_pod(&self.name, Some(grace)).await;
    }

    /// Drives the job to its outcome; the pod may still exist afterwards.
    pub(crate) async fn drive(&mut self) -> Outcome {
        let started = Instant::now();
        let far = started + Duration::from_secs(100 * 365 * 86400);
        let later = |d: Duration| started.checked_add(d).unwrap_or(far).min(far);
        let job_deadline = later(self.job.effective_timeout());
        let pending_deadline = later(self.inner.config.pending_timeout);
        let grace = self.inner.config.termination_grace;
        let n = self.job.steps.len();
        let mut steps = Steps {
            started: 0,
            started_at: vec![None; n],
            finished: vec![false; n],
            codes: vec![None; n],
            failure: None,
            stop: None,
            pending_end: None,
            ends: vec![0; n],
            clean: vec![false; n],
        };
        let mut readers: Vec<Reader> = Vec::new();
        let mut writers: Vec<Option<StreamWriter<'_>>> = vec![None, None];
        let mut state = seen(&self.pod.rx.borrow_and_update());
        let mut logs_broke: Option<String> = None;
        let mut output_done_at: Option<Instant> = None;
        let sink = &self.sink;
        let budget = &self.budget;
        let secrets = &self.secrets;
        // When the pod was seen deleted (or deleting) without the runner's stop.
        let mut lost_at: Option<Instant> = None;

        loop {
            // Follow the logs once the container has started.
            if readers.is_empty() && state.started && output_done_at.is_none() {
                readers = self.readers();
            }
            let reading = readers.iter().any(|r| !r.done);
            if !reading && !readers.is_empty() && output_done_at.is_none() {
                output_done_at = Some(Instant::now());
            }
            // The end: output read, and the pod's end known.
            let ended = state.done || state.gone;
            if ended && !reading {
                break;
            }
            // Deleted underneath the job: its output may still drain for a while, but a
            // stream from a node that is gone would never end.
            if lost_at.is_none() && steps.stop.is_none() && (state.gone || state.deleting) {
                lost_at = Some(Instant::now());
            }
            if let Some(at) = lost_at
                && at.elapsed() >= grace + DELETE_WAIT
            {
                break;
            }
            // Output ended but the pod's status lags: wait for it a while, unless the
            // container is still running (its log stream broke), which only the
            // container's end or the job's timeout ends.
            if let Some(at) = output_done_at
                && at.elapsed() >= STATUS_WAIT
                && !state.running
            {
                break;
            }
            let stop = steps.stop;
            if stop.is_none()
                && !state.started
                && !ended
                && (state.hopeless || Instant::now() >= pending_deadline)
            {
                return self.not_started(&state);
            }
            // Only the step running now can time out on its own: the markers say which
            // one that is and when it started.
            let step_deadline = steps.started.checked_sub(1).and_then(|i| {
                match (
                    steps.finished[i],
                    steps.started_at[i],
                    self.job.steps[i].timeout,
                ) {
                    (false, Some(at), Some(t)) => Some(at.checked_add(t).unwrap_or(far)),
                    _ => None,
                }
            });
            let timeout_at = step_deadline.map_or(job_deadline, |d| d.min(job_deadline));
            let stop_wait = stop.map(|(_, at, _)| at + grace + DELETE_WAIT);
            let pending_at = (stop.is_none() && !state.started).then_some(pending_deadline);
            let status_at = output_done_at
                .filter(|_| !state.running)
                .map(|at| at + STATUS_WAIT);
            let lost_wait = lost_at.map(|at| at + grace + DELETE_WAIT);

            // The next item: a stashed one first, else whichever unblocked stream has one.
            // A stream that reached a step's end marker waits (is blocked) until the other
            // stream reaches it too, so that no output of the next step is emitted before
            // this step's `StepFinished`: stdout and stderr are separate HTTP streams with
            // no order between them but the markers.
            let stashed = readers
                .iter_mut()
                .enumerate()
                .find(|(_, r)| r.blocked.is_none() && r.stash.is_some())
                .and_then(|(i, r)| r.stash.take().map(|item| (i, item)));
            let wake = if let Some((i, item)) = stashed {
                Wake::Item(i, Some(item))
            } else {
                let (r0, r1) = match readers.as_mut_slice() {
                    [a, b] => (Some(a), Some(b)),
                    [a] => (Some(a), None),
                    _ => (None, None),
                };
                let can0 = r0.as_ref().is_some_and(|r| !r.done && r.blocked.is_none());
                let can1 = r1.as_ref().is_some_and(|r| !r.done && r.blocked.is_none());
                let (rx0, rx1) = (r0.map(|r| &mut r.rx), r1.map(|r| &mut r.rx));
                tokio::select! {
                    item = async { rx0.unwrap().recv().await }, if can0 => Wake::Item(0, item),
                    item = async { rx1.unwrap().recv().await }, if can1 => Wake::Item(1, item),
                    changed = self.pod.rx.changed() => Wake::Pod(changed.is_ok()),
                    _ = tokio::time::sleep_until(timeout_at), if stop.is_none() => Wake::Timeout,
                    _ = sink.cancelled(), if stop.is_none() => Wake::Cancel,
                    _ = tokio::time::sleep_until(
                        [stop_wait, pending_at, status_at, lost_wait].into_iter().flatten().min().unwrap_or(far)
                    ) => Wake::Wait,
                }
            };
            match wake {
                Wake::Pod(true) => state = seen(&self.pod.rx.borrow_and_update()),
                Wake::Pod(false) => {
                    // Only this job drops its subscription; seen for robustness.
                    state.gone = true;
                    break;
                }
                Wake::Timeout => self.request_stop(&mut steps, Stop::TimedOut).await,
                Wake::Cancel => self.request_stop(&mut steps, Stop::Cancelled).await,
                Wake::Wait => {
                    if let Some((_, at, _)) = stop
                        && at.elapsed() >= grace + DELETE_WAIT
                    {
                        tracing::warn!(pod = %self.name, "the job pod did not stop in time");
                        break;
                    }
                }
                Wake::Item(i, None) => {
                    readers[i].done = true;
                    if let Some(w) = writers[i].take() {
                        w.finish().await;
                    }
                    if readers.len() == 1
                        && let Some(k) = steps.pending_end.take()
                    {
                        self.finish_step(&mut steps, k).await;
                    }
                    self.barrier(&mut readers, &mut steps).await;
                }
                Wake::Item(i, Some(LogItem::Failed { code, message })) => {
                    let refused =
                        matches!(code, Some(400) | Some(422)) && message.contains("stream");
                    if readers.len() == 2
                        && refused
                        && self.inner.config.log_streams == LogStreams::Auto
                        && !readers.iter().any(|r| r.delivered)
                    {
                        // The cluster refuses split streams: one combined one.
                        self.inner.combined_logs.store(true, Ordering::Relaxed);
                        for w in writers.iter_mut().filter_map(Option::take) {
                            w.finish().await;
                        }
                        readers = vec![self.start_reader(None, OutputStream::Stdout, Tag::Out)];
                        continue;
                    }
                    tracing::warn!(pod = %self.name, error = %message, "reading the job's log failed");
                    if logs_broke.is_none() {
                        let note = self.secrets.mask_str(&format!(
                            "rustci: the log stream of pod {} broke off ({message}); output from here on is lost\n",
                            self.name
                        ));
                        sink.emit(EventKind::Output {
                            step: steps.started.saturating_sub(1),
                            stream: OutputStream::Stderr,
                            data: note.into(),
                        })
                        .await;
                        logs_broke = Some(message);
                    }
                    readers[i].done = true;
                    if let Some(w) = writers[i].take() {
                        w.finish().await;
                    }
                    self.barrier(&mut readers, &mut steps).await;
                }
                Wake::Item(i, Some(LogItem::Piece(Piece::Output(data)))) => {
                    let step = readers[i].step.unwrap_or(0);
                    readers[i].delivered = true;
                    let stream = readers[i].stream;
                    let w = writers[i].get_or_insert_with(|| {
                        StreamWriter::new(sink, step, stream, secrets, budget)
                    });
                    w.write(data).await;
                }
                Wake::Item(i, Some(LogItem::Piece(Piece::Marker(tag, mark)))) => {
                    let combined = readers.len() == 1;
                    if tag != readers[i].tag && !combined {
                        // Both requests got both streams: the cluster ignores `stream`.
                        // Keep the stdout request as the combined one.
                        self.inner.combined_logs.store(true, Ordering::Relaxed);
                        if let Some(w) = writers[1].take() {
                            w.finish().await;
                        }
                        readers.truncate(1);
                        readers[0].stream = OutputStream::Stdout;
                        self.barrier(&mut readers, &mut steps).await;
                        continue;
                    }
                    match (mark, tag) {
                        // In a combined stream the stderr end marker closes the step whose
                        // stdout already ended: its stderr has all arrived.
                        // In one combined stream a step closes once both of its end
                        // markers came (the pipes are drained apart, so either may be
                        // first): after the stderr one, its stderr has all arrived.
                        (Mark::End(step, code), tag) if combined && step < n => {
                            self.record_end(&mut steps, step, code);
                            steps.ends[step] |= if tag == Tag::Out { 1 } else { 2 };
                            if steps.ends[step] == 3 {
                                if steps.pending_end == Some(step) {
                                    steps.pending_end = None;
                                }
                                self.finish_step(&mut steps, step).await;
                            } else {
                                steps.pending_end = Some(step);
                            }
                        }
                        (_, Tag::Err) if combined => {}
                        (Mark::Start(step), _) if step < n => {
                            // A stream that starts a step before the previous one closed
                            // lost that end marker: close it first.
                            if let Some(prev) = step.checked_sub(1)
                                && steps.started > prev
                                && !steps.finished[prev]
                            {
                                if combined {
                                    steps.pending_end = None;
                                    self.finish_step(&mut steps, prev).await;
                                } else if readers[i].blocked.is_none()
                                    && readers[i].step == Some(prev)
                                {
                                    readers[i].blocked = Some(prev);
                                    readers[i].stash =
                                        Some(LogItem::Piece(Piece::Marker(tag, mark)));
                                    if let Some(w) = writers[i].take() {
                                        w.finish().await;
                                    }
                                    self.barrier(&mut readers, &mut steps).await;
                                    continue;
                                }
                            }
                            readers[i].step = Some(step);
                            if let Some(w) = writers[i].take() {
                                w.finish().await;
                            }
                            let stream = readers[i].stream;
                            writers[i] =
                                Some(StreamWriter::new(sink, step, stream, secrets, budget));
                            if step >= steps.started {
                                steps.started = step + 1;
                                steps.started_at[step] = Some(Instant::now());
                                sink.emit(EventKind::StepStarted {
                                    step,
                                    name: self.job.steps[step].display_name(step),
                                })
                                .await;
                            }
                        }
                        (Mark::End(step, code), _) if step < n => {
                            self.record_end(&mut steps, step, code);
                            if let Some(w) = writers[i].take() {
                                w.finish().await;
                            }
                            readers[i].blocked = Some(step);
                            self.barrier(&mut readers, &mut steps).await;
                        }
                        _ => {}
                    }
                }
            }
        }
        for w in writers.into_iter().flatten() {
            w.finish().await;
        }
        drop(readers);
        if let Some(k) = steps.pending_end.take() {
            self.finish_step(&mut steps, k).await;
        }
        self.outcome(&mut steps, &state, logs_broke).await
    }
}
