//! [`ControlPlane`]: queue, dispatch, retries, cancel, lost runners, events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::queue::JobQueue;
use super::registry::{RegisterOptions, Registry, RunnerStatus};
use crate::Error;
use crate::job::{Job, RetryWhen};
use crate::runner::{Canceller, Event, EventKind, JobId, Outcome, Runner};
use crate::select::Selector;

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for a runner.
    Queued,
    /// A runner was chosen; the job is starting.
    Assigned,
    /// Running.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// A step failed.
    Failed,
    /// Cancelled on request.
    Cancelled,
    /// Its timeout expired.
    TimedOut,
    /// Its runner went away and no retry was left.
    Lost,
}

impl JobState {
    /// True once the job has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            JobState::Queued | JobState::Assigned | JobState::Running
        )
    }
}

/// One attempt at running a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Attempt {
    /// 1-based attempt number.
    pub number: u32,
    /// The runner it ran on.
    pub runner_id: String,
    /// When it was assigned.
    pub started_at: SystemTime,
    /// How it ended; `None` while it runs.
    pub outcome: Option<Outcome>,
}

/// Everything the control plane knows about a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// The job.
    pub job: Job,
    /// Who submitted it.
    pub submitter: String,
    /// Where it is.
    pub state: JobState,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Why it waits, when queued and no runner fits.
    pub why_pending: Option<String>,
    /// The final outcome.
    pub outcome: Option<Outcome>,
    /// When it was submitted.
    pub submitted_at: SystemTime,
}

/// What happens in the control plane, for followers.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ControlEvent {
    /// A job changed state.
    JobState {
        /// The job.
        id: JobId,
        /// Its new state.
        state: JobState,
    },
    /// An event of a running attempt (output, steps, …).
    Job {
        /// The job.
        id: JobId,
        /// Attempt number.
        attempt: u32,
        /// The event.
        event: Event,
    },
    /// A runner's status changed.
    Runner {
        /// The runner.
        id: String,
        /// Its new status; `None` when removed.
        status: Option<RunnerStatus>,
    },
}

struct Running {
    runner_id: String,
    canceller: Canceller,
    lost: bool,
    name: String,
    submitter: String,
}

struct State {
    registry: Registry,
    selector: Box<dyn Selector>,
    jobs: Mutex<BTreeMap<JobId, JobRecord>>,
    queue: Mutex<JobQueue>,
    running: Mutex<HashMap<JobId, Running>>,
    /// Attempts assigned and not yet ended, by job: the runner they went to. Counted as
    /// running on that runner from the moment of assignment, before the runner knows.
    assigned: Mutex<HashMap<JobId, String>>,
    /// Cancels asked for while a job was being started.
    cancel_requested: Mutex<BTreeSet<JobId>>,
    /// Runners each queued job has already failed on (a retry prefers others).
    tried: Mutex<HashMap<JobId, BTreeSet<String>>>,
    wake: Notify,
    done: Notify,
    events: broadcast::Sender<ControlEvent>,
    seq: AtomicU64,
    stop: CancellationToken,
}

/// The in-process control plane. Cheap to clone; all clones drive the same state.
#[derive(Clone)]
pub struct ControlPlane {
    state: Arc<State>,
}

impl ControlPlane {
    /// A control plane choosing runners with `selector`, checking runner health every
    /// `health_interval` (each check bounded by the same duration). Must be created
    /// inside a Tokio runtime; it runs until [`ControlPlane::shutdown`].
    pub fn new(selector: impl Selector + 'static, health_interval: Duration) -> Self {
        let (events, _) = broadcast::channel(4096);
        let state = Arc::new(State {
            registry: Registry::new(),
            selector: Box::new(selector),
            jobs: Mutex::new(BTreeMap::new()),
            queue: Mutex::new(JobQueue::new()),
            running: Mutex::new(HashMap::new()),
            cancel_requested: Mutex::new(BTreeSet::new()),
            assigned: Mutex::new(HashMap::new()),
            tried: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            done: Notify::new(),
            events,
            seq: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(dispatch_loop(state.clone()));
        tokio::spawn(health_loop(state.clone(), health_interval));
        ControlPlane { state }
    }

    /// The runners.
    pub fn registry(&self) -> &Registry {
        &self.state.registry
    }

    /// Registers a runner and looks for work for it.
    pub fn register(&self, runner: Arc<dyn Runner>, options: RegisterOptions) -> String {
        let id = self.state.registry.register(runner, options);
        let _ = self.state.events.send(ControlEvent::Runner {
            id: id.clone(),
            status: Some(RunnerStatus::Healthy),
        });
        self.state.wake.notify_one();
        id
    }

    /// Stops giving a runner new jobs.
    pub fn drain(&self, runner_id: &str) -> bool {
        let change = self.state.registry.drain(runner_id);
        self.announce(runner_id, change.as_ref().and_then(|c| c.to));
        self.state.registry.get(runner_id).is_some()
    }

    /// Gives a drained runner jobs again.
    pub fn resume(&self, runner_id: &str) -> bool {
        let change = self.state.registry.resume(runner_id);
        self.announce(runner_id, change.as_ref().and_then(|c| c.to));
        self.state.wake.notify_one();
        change.is_some()
    }

    /// Removes a runner; its running jobs are lost (and retried per their policy).
    pub fn remove(&self, runner_id: &str) -> bool {
        let removed = self.state.registry.remove(runner_id).is_some();
        if removed {
            lose_jobs_on(&self.state, runner_id);
            let _ = self.state.events.send(ControlEvent::Runner {
                id: runner_id.to_string(),
                status: None,
            });
        }
        removed
    }

    fn announce(&self, runner_id: &str, status: Option<RunnerStatus>) {
        if status.is_some() {
            let _ = self.state.events.send(ControlEvent::Runner {
                id: runner_id.to_string(),
                status,
            });
        }
    }

    /// Queues a job after validating it.
    pub fn submit(&self, job: Job, submitter: &str) -> Result<JobId, Error> {
        job.validate().map_err(Error::InvalidSpec)?;
        let id = JobId::new();
        let record = JobRecord {
            id: id.clone(),
            submitter: submitter.to_string(),
            state: JobState::Queued,
            attempts: Vec::new(),
            why_pending: None,
            outcome: None,
            submitted_at: SystemTime::now(),
            job: job.clone(),
        };
        self.state
            .jobs
            .lock()
            .expect("jobs")
            .insert(id.clone(), record);
        self.state
            .queue
            .lock()
            .expect("queue")
            .push(id.clone(), job.priority, submitter);
        let _ = self.state.events.send(ControlEvent::JobState {
            id: id.clone(),
            state: JobState::Queued,
        });
        self.state.wake.notify_one();
        Ok(id)
    }

    /// The job's record.
    pub fn get(&self, id: &JobId) -> Option<JobRecord> {
        self.state.jobs.lock().expect("jobs").get(id).cloned()
    }

    /// Every job's record.
    pub fn list(&self) -> Vec<JobRecord> {
        self.state
            .jobs
            .lock()
            .expect("jobs")
            .values()
            .cloned()
            .collect()
    }

    /// Cancels a queued or running job. False when unknown or already ended.
    pub fn cancel(&self, id: &JobId) -> bool {
        if self.state.queue.lock().expect("queue").remove(id) {
            finish(
                &self.state,
                id,
                JobState::Cancelled,
                Some(Outcome::Cancelled),
            );
            return true;
        }
        if let Some(r) = self.state.running.lock().expect("running").get(id) {
            r.canceller.cancel();
            return true;
        }
        // Assigned but still starting: the attempt cancels itself once it runs.
        let starting = self.get(id).is_some_and(|r| r.state == JobState::Assigned);
        if starting {
            self.state
                .cancel_requested
                .lock()
                .expect("cancel")
                .insert(id.clone());
        }
        starting
    }

    /// Waits until the job has ended and returns its record.
    pub async fn wait(&self, id: &JobId) -> Option<JobRecord> {
        loop {
            // Registered before the check, so an end in between still wakes us.
            let notified = self.state.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let record = self.get(id)?;
            if record.state.is_terminal() {
                return Some(record);
            }
            notified.await;
        }
    }

    /// Follows everything that happens from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ControlEvent> {
        self.state.events.subscribe()
    }

    /// Stops dispatching and health checks; running jobs are cancelled.
    pub fn shutdown(&self) {
        self.state.stop.cancel();
        for r in self.state.running.lock().expect("running").values() {
            r.canceller.cancel();
        }
    }
}

fn set_state(state: &State, id: &JobId, to: JobState) {
    if let Some(r) = state.jobs.lock().expect("jobs").get_mut(id) {
        r.state = to;
    }
    let _ = state.events.send(ControlEvent::JobState {
        id: id.clone(),
        state: to,
    });
}

fn finish(state: &State, id: &JobId, to: JobState, outcome: Option<Outcome>) {
    if let Some(r) = state.jobs.lock().expect("jobs").get_mut(id) {
        r.state = to;
        r.outcome = outcome;
        r.why_pending = None;
    }
    state.tried.lock().expect("tried").remove(id);
    state.cancel_requested.lock().expect("cancel").remove(id);
    let _ = state.events.send(ControlEvent::JobState {
        id: id.clone(),
        state: to,
    });
    state.done.notify_waiters();
}

/// Marks every job running on `runner_id` lost and stops it.
fn lose_jobs_on(state: &State, runner_id: &str) {
    for r in state.running.lock().expect("running").values_mut() {
        if r.runner_id == runner_id {
            r.lost = true;
            r.canceller.cancel();
        }
    }
}

async fn health_loop(state: Arc<State>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for change in state.registry.check_health(interval, interval).await {
            if change.to == Some(RunnerStatus::Unhealthy) {
                lose_jobs_on(&state, &change.runner_id);
            }
            if change.to.is_some_and(RunnerStatus::takes_jobs) {
                state.wake.notify_one();
            }
            let _ = state.events.send(ControlEvent::Runner {
                id: change.runner_id,
                status: change.to,
            });
        }
    }
}

async fn dispatch_loop(state: Arc<State>) {
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = state.wake.notified() => {}
        }
        dispatch_round(&state);
    }
}

/// Places every queued job that fits somewhere now.
fn dispatch_round(state: &Arc<State>) {
    let (by_submitter, by_runner) = {
        let running = state.running.lock().expect("running");
        let mut by_submitter: HashMap<String, usize> = HashMap::new();
        let mut by_runner: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for r in running.values() {
            *by_submitter.entry(r.submitter.clone()).or_default() += 1;
            *by_runner
                .entry(r.runner_id.clone())
                .or_default()
                .entry(r.name.clone())
                .or_default() += 1;
        }
        (by_submitter, by_runner)
    };
    let order = state.queue.lock().expect("queue").ordered(&by_submitter);
    let mut assigned_to: HashMap<String, usize> = HashMap::new();
    for runner in state.assigned.lock().expect("assigned").values() {
        *assigned_to.entry(runner.clone()).or_default() += 1;
    }
    for queued in order {
        let Some(job) = state
            .jobs
            .lock()
            .expect("jobs")
            .get(&queued.id)
            .map(|r| r.job.clone())
        else {
            continue;
        };
        let mut snapshots = state.registry.snapshots(&by_runner);
        for snap in &mut snapshots {
            let ours = assigned_to.get(&snap.info.id).copied().unwrap_or(0);
            snap.running = snap.running.max(ours);
        }
        // A retry prefers runners it has not failed on, when any of them fits.
        let tried = state
            .tried
            .lock()
            .expect("tried")
            .get(&queued.id)
            .cloned()
            .unwrap_or_default();
        let fresh: Vec<_> = snapshots
            .iter()
            .filter(|s| !tried.contains(&s.info.id))
            .cloned()
            .collect();
        let chosen = match state.selector.select(&job, &fresh) {
            Ok(i) => Ok(fresh[i].info.id.clone()),
            Err(_) if !tried.is_empty() => state
                .selector
                .select(&job, &snapshots)
                .map(|i| snapshots[i].info.id.clone()),
            Err(e) => Err(e),
        };
        let runner_id = match chosen {
            Ok(id) => id,
            Err(why) => {
                let mut text = if why.candidates == 0 {
                    "no runner takes jobs".to_string()
                } else {
                    why.to_string()
                };
                for (status, n) in state.registry.out_of_service() {
                    let noun = if n == 1 { "runner is" } else { "runners are" };
                    text.push_str(&format!("; {n} {noun} {}", status.as_str()));
                }
                if let Some(r) = state.jobs.lock().expect("jobs").get_mut(&queued.id) {
                    r.why_pending = Some(text);
                }
                continue;
            }
        };
        let Some(entry) = state.registry.get(&runner_id) else {
            continue;
        };
        state.queue.lock().expect("queue").remove(&queued.id);
        *assigned_to.entry(runner_id.clone()).or_default() += 1;
        state
            .assigned
            .lock()
            .expect("assigned")
            .insert(queued.id.clone(), runner_id.clone());
        let seq = state.seq.fetch_add(1, Ordering::SeqCst) + 1;
        state.registry.record_assignment(&runner_id, seq);
        let number = {
            let mut jobs = state.jobs.lock().expect("jobs");
            let Some(r) = jobs.get_mut(&queued.id) else {
                continue;
            };
            r.why_pending = None;
            r.attempts.push(Attempt {
                number: r.attempts.len() as u32 + 1,
                runner_id: runner_id.clone(),
                started_at: SystemTime::now(),
                outcome: None,
            });
            r.attempts.len() as u32
        };
        set_state(state, &queued.id, JobState::Assigned);
        tokio::spawn(run_attempt(
            state.clone(),
            queued.id.clone(),
            queued.submitter.clone(),
            job,
            entry.runner.clone(),
            number,
        ));
    }
}

async fn run_attempt(
    state: Arc<State>,
    id: JobId,
    submitter: String,
    job: Job,
    runner: Arc<dyn Runner>,
    number: u32,
) {
    let runner_id = runner.info().id.clone();
    let attempt_id = JobId::from(format!("{id}-{number}"));
    let started = tokio::time::Instant::now();
    let outcome = match runner.start(&job, attempt_id).await {
        Err(e) => Outcome::RunnerError {
            message: e.to_string(),
        },
        Ok(mut execution) => {
            state.running.lock().expect("running").insert(
                id.clone(),
                Running {
                    runner_id: runner_id.clone(),
                    canceller: execution.canceller(),
                    lost: false,
                    name: job.name.clone(),
                    submitter: submitter.clone(),
                },
            );
            // A cancel that arrived while the job was being assigned.
            if state.cancel_requested.lock().expect("cancel").remove(&id) {
                execution.cancel();
            }
            set_state(&state, &id, JobState::Running);
            let mut outcome = Outcome::Lost;
            let mut first = true;
            while let Some(event) = execution.next_event().await {
                if std::mem::take(&mut first) {
                    state.registry.record_startup(&runner_id, started.elapsed());
                }
                if let EventKind::Finished { outcome: o } = &event.kind {
                    outcome = o.clone();
                }
                let _ = state.events.send(ControlEvent::Job {
                    id: id.clone(),
                    attempt: number,
                    event,
                });
            }
            let lost = state
                .running
                .lock()
                .expect("running")
                .remove(&id)
                .is_some_and(|r| r.lost);
            if lost && matches!(outcome, Outcome::Cancelled) {
                Outcome::Lost
            } else {
                outcome
            }
        }
    };
    if let Some(r) = state.jobs.lock().expect("jobs").get_mut(&id)
        && let Some(a) = r.attempts.last_mut()
    {
        a.outcome = Some(outcome.clone());
    }
    state.assigned.lock().expect("assigned").remove(&id);
    let cause = match &outcome {
        Outcome::Succeeded | Outcome::Cancelled => None,
        Outcome::Failed { .. } | Outcome::Signalled { .. } => Some(RetryWhen::Failure),
        Outcome::TimedOut { .. } => Some(RetryWhen::Timeout),
        Outcome::Lost => Some(RetryWhen::Lost),
        _ => Some(RetryWhen::RunnerFailure),
    };
    let retry = cause.is_some_and(|c| job.retry.when.contains(&c))
        && number <= job.retry.max
        && !state.stop.is_cancelled();
    if retry {
        state
            .tried
            .lock()
            .expect("tried")
            .entry(id.clone())
            .or_default()
            .insert(runner_id);
        state
            .queue
            .lock()
            .expect("queue")
            .push(id.clone(), job.priority, submitter);
        set_state(&state, &id, JobState::Queued);
    } else {
        let final_state = match &outcome {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Cancelled => JobState::Cancelled,
            Outcome::TimedOut { .. } => JobState::TimedOut,
            Outcome::Lost => JobState::Lost,
            _ => JobState::Failed,
        };
        finish(&state, &id, final_state, Some(outcome));
    }
    state.wake.notify_one();
}
