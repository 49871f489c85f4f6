//! [`ControlPlane`]: queue, dispatch, retries, cancel, lost runners, events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Error;
use crate::logs::{LogFollower, LogHub, safe_id};
use crate::queue::JobQueue;
use crate::registry::{RegisterOptions, Registry, RunnerStatus, StatusChange};
use crate::store::{AuditEntry, JobPage, JobQuery, MemoryStore, Store, Transition};
use rustci_runners::error::Chain;
use rustci_runners::job::{Job, RetryWhen};
use rustci_runners::runner::{Canceller, Event, EventKind, Execution, JobId, Outcome, Runner};
use rustci_runners::select::{RunnerPool, RunnerSnapshot, Selector};

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Lost,
    ];

    /// The state's name, as in JSON and the API (`timed_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Lost => "lost",
        }
    }

    /// The state named `name`, if any.
    pub fn from_name(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

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
    /// When it was assigned (milliseconds since the Unix epoch in JSON).
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub started_at: SystemTime,
    /// When it ended.
    #[serde(default, with = "opt_millis")]
    pub ended_at: Option<SystemTime>,
    /// How it ended; `None` while it runs.
    pub outcome: Option<Outcome>,
    /// Length of the job's log when this attempt's output began: its output is the log
    /// from here (to the next attempt's marker).
    #[serde(default)]
    pub log_offset: u64,
    /// The runner handed the job back before any of it ran (see
    /// [`Error::is_declined`](rustci_runners::Error::is_declined)): the job was queued
    /// again without this attempt counting toward `retry.max`, up to
    /// [`MAX_DECLINED`] times per job. Its number is not reused, so messages about it
    /// stay fenced off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub declined: bool,
    /// What it used, as its runner measured it (`EventKind::Usage`); `None` when the
    /// runner measures nothing (or the attempt ended before it could).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<rustci_runners::ResourceUsage>,
    /// The runner was degraded when the job was placed on it (no runner that is not fit
    /// the job then): why, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// How many times one job may be handed back by runners before it started (an agent that
/// refused an offer for now, say) without those attempts counting toward its
/// `retry.max`. Beyond it, a declined attempt counts as a runner failure like any other.
pub const MAX_DECLINED: usize = 10;

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(
                &(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64),
            ),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)))
    }
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
    /// When it was submitted (milliseconds since the Unix epoch in JSON).
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub submitted_at: SystemTime,
    /// When it reached its terminal state.
    #[serde(default, with = "opt_millis")]
    pub finished_at: Option<SystemTime>,
}

impl JobRecord {
    /// The runner of the latest attempt.
    pub fn runner_id(&self) -> Option<&str> {
        self.attempts.last().map(|a| a.runner_id.as_str())
    }
}

/// Receives the control plane's measurements (for metrics). Every method has an empty
/// default; calls come from the dispatcher, attempt tasks, the health checks and API
/// calls, and must return quickly.
pub trait Observer: Send + Sync {
    /// A selection decision took `elapsed`; `placed` tells whether a runner was found.
    fn selection(&self, elapsed: Duration, placed: bool) {
        let _ = (elapsed, placed);
    }
    /// A job was assigned to a runner of `runner_kind` after waiting `waited` in the queue.
    fn picked(&self, runner_kind: &str, waited: Duration) {
        let _ = (runner_kind, waited);
    }
    /// An attempt on a runner of `runner_kind` ended with `outcome` after `ran`.
    fn attempt_ended(&self, runner_kind: &str, outcome: &Outcome, ran: Duration) {
        let _ = (runner_kind, outcome, ran);
    }
    /// A job wrote its first output `since` it was submitted (pickup as a user sees it),
    /// on a runner of `runner_kind`.
    fn first_output(&self, runner_kind: &str, since: Duration) {
        let _ = (runner_kind, since);
    }
    /// An attempt on a runner of `runner_kind` reported what it used.
    fn usage(&self, runner_kind: &str, usage: &rustci_runners::ResourceUsage) {
        let _ = (runner_kind, usage);
    }
    /// A job reached its terminal `state`; `runner_kind` of its last attempt, if any.
    fn job_finished(&self, runner_kind: Option<&str>, state: JobState, total: Duration) {
        let _ = (runner_kind, state, total);
    }
    /// A runner's status changed.
    fn runner_status(&self, change: &StatusChange) {
        let _ = change;
    }
    /// A retention pass ended (its figures, and the logs by state after it).
    fn retention(&self, report: &crate::retention::RetentionReport) {
        let _ = report;
    }
}

/// How a [`ControlPlane`] is built.
#[non_exhaustive]
pub struct ControlOptions {
    /// How often each runner's health is checked (each check bounded by the same time).
    pub health_interval: Duration,
    /// Where jobs, runners and the audit log are kept.
    pub store: Arc<dyn Store>,
    /// Directory of job log files; `None` keeps logs in memory.
    pub log_dir: Option<PathBuf>,
    /// Receives measurements.
    pub observer: Option<Arc<dyn Observer>>,
    /// Degradation detection's thresholds and windows.
    pub degradation: crate::degradation::DegradationOptions,
    /// Log, job and audit retention by a background task; `None` (the default) keeps
    /// everything.
    pub retention: Option<crate::retention::RetentionOptions>,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            health_interval: Duration::from_secs(30),
            store: Arc::new(MemoryStore::new()),
            log_dir: None,
            observer: None,
            degradation: Default::default(),
            retention: None,
        }
    }
}

impl ControlOptions {
    /// Options with this store and log directory, the rest default.
    pub fn durable(store: Arc<dyn Store>, log_dir: impl Into<PathBuf>) -> Self {
        ControlOptions {
            store,
            log_dir: Some(log_dir.into()),
            ..ControlOptions::default()
        }
    }
}

/// What [`ControlPlane::recover`] found in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Jobs queued again (waiting ones, and interrupted ones with a retry left).
    pub requeued: Vec<JobId>,
    /// Interrupted jobs with no retry left, now `lost`.
    pub lost: Vec<JobId>,
    /// Interrupted jobs whose runner took their attempt up again ([`Runner::reattach`]):
    /// they go on where they are.
    pub reattached: Vec<JobId>,
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
    store: Arc<dyn Store>,
    logs: LogHub,
    observer: Option<Arc<dyn Observer>>,
    /// False once shutdown began: no submissions, no dispatch.
    accepting: AtomicBool,
    /// Jobs not yet ended (ended ones live only in the store).
    jobs: Mutex<BTreeMap<JobId, JobRecord>>,
    queue: Mutex<JobQueue>,
    running: Mutex<HashMap<JobId, Running>>,
    /// Attempts assigned and not yet ended, by job: the runner they went to. Counted as
    /// running on that runner from the moment of assignment, before the runner knows.
    assigned: Mutex<HashMap<JobId, String>>,
    /// Why queued jobs wait when the last round stopped early (no free slot anywhere).
    waiting_reason: Mutex<Option<String>>,
    /// Cancels asked for while a job was being started.
    cancel_requested: Mutex<BTreeSet<JobId>>,
    /// Unfinished jobs whose runner output has begun (for `Observer::first_output`).
    wrote: Mutex<BTreeSet<JobId>>,
    /// Runners each queued job has already failed on (a retry prefers others).
    tried: Mutex<HashMap<JobId, BTreeSet<String>>>,
    wake: Notify,
    /// Wakes the health loop early (a runner's start failed temporarily).
    health_wake: Notify,
    done: Notify,
    events: broadcast::Sender<ControlEvent>,
    seq: AtomicU64,
    stop: CancellationToken,
    /// One retention pass at a time.
    retaining: tokio::sync::Mutex<()>,
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
        Self::with_options(
            selector,
            ControlOptions {
                health_interval,
                ..ControlOptions::default()
            },
        )
        .expect("in-memory logs cannot fail")
    }

    /// A control plane with a store, log directory and observer. Must be created inside
    /// a Tokio runtime. Call [`ControlPlane::recover`] after registering runners to pick
    /// up what the store holds from a previous run.
    pub fn with_options(
        selector: impl Selector + 'static,
        options: ControlOptions,
    ) -> Result<Self, Error> {
        let logs = match &options.log_dir {
            Some(dir) => LogHub::in_dir(dir)?,
            None => LogHub::in_memory(),
        };
        let health_interval = options.health_interval;
        options.degradation.check().map_err(Error::Config)?;
        let retention = options.retention.filter(|r| r.enabled);
        if let Some(r) = &retention {
            r.check().map_err(Error::Config)?;
        }
        let (events, _) = broadcast::channel(4096);
        let state = Arc::new(State {
            registry: Registry::with_degradation(options.degradation),
            selector: Box::new(selector),
            store: options.store,
            logs,
            observer: options.observer,
            accepting: AtomicBool::new(true),
            jobs: Mutex::new(BTreeMap::new()),
            queue: Mutex::new(JobQueue::new()),
            running: Mutex::new(HashMap::new()),
            cancel_requested: Mutex::new(BTreeSet::new()),
            wrote: Mutex::new(BTreeSet::new()),
            waiting_reason: Mutex::new(None),
            assigned: Mutex::new(HashMap::new()),
            tried: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            health_wake: Notify::new(),
            done: Notify::new(),
            events,
            seq: AtomicU64::new(0),
            stop: CancellationToken::new(),
            retaining: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(dispatch_loop(state.clone()));
        tokio::spawn(health_loop(state.clone(), health_interval));
        if let Some(r) = retention {
            tokio::spawn(retention_loop(state.clone(), r));
        }
        Ok(ControlPlane { state })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.state.store
    }

    /// Picks up the jobs a previous run left unfinished: queued ones are queued again;
    /// ones that were assigned or running are interrupted attempts, marked `lost` — what
    /// is left of them on any registered runner is stopped first ([`Runner::abandon`]),
    /// then they are retried when their policy retries lost jobs and attempts remain,
    /// otherwise they end `lost`.
    pub async fn recover(&self) -> Result<Recovery, Error> {
        let mut report = Recovery::default();
        let runners: Vec<_> = self
            .state
            .registry
            .list()
            .into_iter()
            .map(|e| e.runner)
            .collect();
        for mut record in self.state.store.unfinished_jobs()? {
            if self
                .state
                .jobs
                .lock()
                .expect("jobs")
                .contains_key(&record.id)
            {
                continue;
            }
            let id = record.id.clone();
            let interrupted = record.state != JobState::Queued;
            if interrupted {
                let number = record.attempts.len() as u32;
                let attempt_id = attempt_id(&id, number);
                // The attempt's runner may still be able to follow it (a remote agent
                // kept running it): then it goes on, nothing is abandoned.
                if let Some(last) = record.attempts.last().filter(|a| a.outcome.is_none())
                    && let Some(runner) = runners.iter().find(|r| r.info().id == last.runner_id)
                {
                    let held = self.state.logs.len(&id).saturating_sub(last.log_offset);
                    match runner.reattach(&attempt_id, held).await {
                        Ok(Some(execution)) => {
                            tracing::info!(job_id = %id, attempt = number, runner = %last.runner_id, "job was running when the control plane stopped: its runner still follows it");
                            self.follow_reattached(record, runner.clone(), number, execution);
                            report.reattached.push(id);
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(job_id = %id, runner = %last.runner_id, error = %Chain(&e), "the runner could not take up an interrupted attempt");
                        }
                    }
                }
                for runner in &runners {
                    if let Err(e) = runner.abandon(&attempt_id).await {
                        tracing::warn!(job_id = %id, runner = %runner.info().id, error = %Chain(&e), "could not stop what is left of an interrupted attempt");
                    }
                }
                if let Some(a) = record.attempts.last_mut() {
                    a.outcome.get_or_insert(Outcome::Lost);
                    a.ended_at.get_or_insert(SystemTime::now());
                }
                let counted = record.attempts.iter().filter(|a| !a.declined).count() as u32;
                let retry = record.job.retry.when.contains(&RetryWhen::Lost)
                    && counted <= record.job.retry.max;
                if !retry {
                    record.state = JobState::Lost;
                    record.outcome = Some(Outcome::Lost);
                    record.finished_at = Some(SystemTime::now());
                    self.state.store.put_job(&record)?;
                    tracing::warn!(job_id = %id, "job was running when the control plane stopped; no retry left: lost");
                    report.lost.push(id);
                    continue;
                }
                if let Some(a) = record.attempts.last() {
                    self.state
                        .tried
                        .lock()
                        .expect("tried")
                        .entry(id.clone())
                        .or_default()
                        .insert(a.runner_id.clone());
                }
                tracing::info!(job_id = %id, "job was running when the control plane stopped: retrying");
            }
            record.state = JobState::Queued;
            self.state.store.put_job(&record)?;
            self.state.logs.open(&id);
            let (priority, submitter) = (record.job.priority, record.submitter.clone());
            let labels = asks(&record.job);
            self.state
                .jobs
                .lock()
                .expect("jobs")
                .insert(id.clone(), record);
            self.state.queue.lock().expect("queue").push_asking(
                id.clone(),
                priority,
                submitter,
                labels,
            );
            report.requeued.push(id);
        }
        self.state.wake.notify_one();
        Ok(report)
    }

    /// Follows an attempt taken up again by its runner after a restart.
    fn follow_reattached(
        &self,
        record: JobRecord,
        runner: Arc<dyn Runner>,
        number: u32,
        execution: Execution,
    ) {
        let state = self.state.clone();
        let (id, submitter, job) = (
            record.id.clone(),
            record.submitter.clone(),
            record.job.clone(),
        );
        let runner_id = runner.info().id.clone();
        self.state.logs.open(&id);
        self.state
            .jobs
            .lock()
            .expect("jobs")
            .insert(id.clone(), record);
        self.state
            .assigned
            .lock()
            .expect("assigned")
            .insert(id.clone(), runner_id);
        let span = tracing::info_span!("job", job_id = %id, attempt = number);
        tokio::spawn(
            async move {
                let started = tokio::time::Instant::now();
                let outcome = follow_execution(
                    &state, &id, &submitter, &job, &runner, number, execution, started, true,
                )
                .await;
                end_attempt(state, id, submitter, job, runner, number, outcome, started);
            }
            .instrument(span),
        );
    }

    /// Asks for runner `id`'s health to be checked now rather than at the next interval
    /// (a remote runner whose connection changed). Unknown ids are ignored.
    pub fn check_runner_soon(&self, id: &str) {
        self.state.registry.check_soon(id);
        self.state.health_wake.notify_one();
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

    /// Replaces a runner's added and reserved labels (its own labels stay) and looks for
    /// work for it. False when it is unknown.
    pub fn update(&self, runner_id: &str, options: RegisterOptions) -> bool {
        let updated = self.state.registry.update(runner_id, options);
        if updated {
            self.state.wake.notify_one();
        }
        updated
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
            if let Some(o) = &self.state.observer {
                o.runner_status(&StatusChange {
                    runner_id: runner_id.to_string(),
                    from: None,
                    to: None,
                    reason: None,
                });
            }
            lose_jobs_on(&self.state, runner_id);
            let _ = self.state.events.send(ControlEvent::Runner {
                id: runner_id.to_string(),
                status: None,
            });
        }
        removed
    }

    fn announce(&self, runner_id: &str, status: Option<RunnerStatus>) {
        if let (Some(o), Some(_)) = (&self.state.observer, status) {
            o.runner_status(&StatusChange {
                runner_id: runner_id.to_string(),
                from: None,
                to: status,
                reason: None,
            });
        }
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
        if !self.state.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let id = JobId::new();
        let record = JobRecord {
            id: id.clone(),
            submitter: submitter.to_string(),
            state: JobState::Queued,
            attempts: Vec::new(),
            why_pending: None,
            outcome: None,
            submitted_at: SystemTime::now(),
            finished_at: None,
            job: job.clone(),
        };
        // The log is open before the job can be seen, so a follower never finds a known
        // job without its live log.
        self.state.logs.open(&id);
        {
            let mut jobs = self.state.jobs.lock().expect("jobs");
            if let Err(e) = self.state.store.put_job(&record) {
                drop(jobs);
                self.state.logs.close(&id);
                return Err(e);
            }
            jobs.insert(id.clone(), record);
        }
        self.state.queue.lock().expect("queue").push_asking(
            id.clone(),
            job.priority,
            submitter,
            asks(&job),
        );
        let _ = self.state.events.send(ControlEvent::JobState {
            id: id.clone(),
            state: JobState::Queued,
        });
        self.state.wake.notify_one();
        Ok(id)
    }

    /// The job's record: live state for unfinished jobs, the store for the rest.
    pub fn get(&self, id: &JobId) -> Option<JobRecord> {
        if let Some(r) = self.state.jobs.lock().expect("jobs").get(id) {
            let mut r = r.clone();
            if r.state == JobState::Queued && r.why_pending.is_none() {
                r.why_pending = self.state.waiting_reason.lock().expect("waiting").clone();
            }
            return Some(r);
        }
        if !safe_id(id.as_str()) {
            return None;
        }
        match self.state.store.get_job(id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(job_id = %id, error = %Chain(&e), "reading a job from the store");
                None
            }
        }
    }

    /// A page of jobs, newest first.
    pub fn list(&self, query: &JobQuery) -> Result<JobPage, Error> {
        self.state.store.list_jobs(query)
    }

    /// The states a job went through.
    pub fn transitions(&self, id: &JobId) -> Result<Vec<Transition>, Error> {
        self.state.store.transitions(id)
    }

    /// The first `limit` queued jobs in the order they will be dispatched (priority,
    /// then fair share among submitters, then submission order), each with its
    /// `why_pending`, and how many are queued in all. Costs about `limit` times the log
    /// of the number of submitters, plus a look at the running jobs.
    pub fn queued(&self, limit: usize) -> (usize, Vec<JobRecord>) {
        let by_submitter = {
            let running = self.state.running.lock().expect("running");
            let mut by: HashMap<String, usize> = HashMap::new();
            for r in running.values() {
                *by.entry(r.submitter.clone()).or_default() += 1;
            }
            by
        };
        let (total, ids): (usize, Vec<JobId>) = {
            let queue = self.state.queue.lock().expect("queue");
            (
                queue.len(),
                queue
                    .iter_ordered(&by_submitter)
                    .take(limit)
                    .map(|q| q.id)
                    .collect(),
            )
        };
        (total, ids.iter().filter_map(|id| self.get(id)).collect())
    }

    /// Jobs queued and jobs assigned or running, now.
    pub fn counts(&self) -> (usize, usize) {
        let queued = self.state.queue.lock().expect("queue").len();
        let live = self.state.jobs.lock().expect("jobs").len();
        (queued, live.saturating_sub(queued))
    }

    /// The parts of bytes `[from, to)` of the job's log that came from stderr (where its
    /// runner kept the streams apart), in order.
    pub fn log_stderr(&self, id: &JobId, from: u64, to: u64) -> Vec<(u64, u64)> {
        self.state.logs.stderr_ranges(id, from, to)
    }

    /// How many bytes of the job's log are stored now.
    pub fn log_len(&self, id: &JobId) -> u64 {
        self.state.logs.len(id)
    }

    /// Up to `max` bytes of the job's log at `offset`, as stored now.
    pub fn read_log(&self, id: &JobId, offset: u64, max: usize) -> Result<bytes::Bytes, Error> {
        self.state.logs.read(id, offset, max)
    }

    /// Follows a job's log from byte `offset`: what is stored, then the live tail until
    /// the job ends. `None` when the job is unknown.
    pub fn follow_log(&self, id: &JobId, offset: u64) -> Option<LogFollower> {
        self.get(id)?;
        Some(self.state.logs.follow(id, offset))
    }

    /// A finished job's log record: whether its log is kept, compressed or expired, and
    /// its sizes. `None` while the job runs, or when it is unknown.
    pub fn log_record(&self, id: &JobId) -> Result<Option<crate::store::LogRecord>, Error> {
        self.state.store.log_record(id)
    }

    /// Runs one retention pass now with `options`, with ages counted back from `now`
    /// (normally `SystemTime::now()`), waiting for a pass under way to end first. The
    /// background task (`ControlOptions::retention`) runs the same passes.
    pub async fn retain(
        &self,
        options: &crate::retention::RetentionOptions,
        now: SystemTime,
    ) -> Result<crate::retention::RetentionReport, Error> {
        retain(&self.state, options, now).await
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
        // Being assigned or starting: the attempt cancels itself once it runs.
        let live = self.state.jobs.lock().expect("jobs").contains_key(id);
        if !live {
            return false;
        }
        self.state
            .cancel_requested
            .lock()
            .expect("cancel")
            .insert(id.clone());
        // It may have started between the two looks: cancel it directly too.
        if let Some(r) = self.state.running.lock().expect("running").get(id) {
            r.canceller.cancel();
        }
        true
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

    /// False once shutdown began (no new jobs are taken).
    pub fn accepting(&self) -> bool {
        self.state.accepting.load(Ordering::SeqCst)
    }

    /// Follows everything that happens from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ControlEvent> {
        self.state.events.subscribe()
    }

    /// Stops dispatching and health checks; running jobs are cancelled.
    pub fn shutdown(&self) {
        self.state.accepting.store(false, Ordering::SeqCst);
        self.state.stop.cancel();
        for r in self.state.running.lock().expect("running").values() {
            r.canceller.cancel();
        }
    }

    /// Graceful shutdown: takes no new jobs and starts none, lets running jobs finish for
    /// up to `deadline`, then cancels the rest and waits for them to end. Queued jobs
    /// stay queued in the store for the next run. Returns the ids of jobs it cancelled.
    pub async fn shutdown_gracefully(&self, deadline: Duration) -> Vec<JobId> {
        self.state.accepting.store(false, Ordering::SeqCst);
        let until = tokio::time::Instant::now() + deadline;
        let mut cancelled = Vec::new();
        loop {
            let notified = self.state.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy: Vec<JobId> = self
                .state
                .assigned
                .lock()
                .expect("assigned")
                .keys()
                .cloned()
                .collect();
            if busy.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= until {
                for id in busy {
                    if !cancelled.contains(&id) && self.cancel(&id) {
                        tracing::info!(job_id = %id, "shutdown deadline passed: cancelling");
                        cancelled.push(id);
                    }
                }
                notified.await;
                continue;
            }
            let _ = tokio::time::timeout_at(until, notified).await;
        }
        self.state.stop.cancel();
        self.state.logs.close_all();
        cancelled
    }
}

/// The execution id a runner gets for attempt `number` of job `id`: `<job id>-<number>`.
/// Unique per attempt, it is also the attempt's fencing token for remote runners.
pub fn attempt_id(id: &JobId, number: u32) -> JobId {
    JobId::from(format!("{id}-{number}"))
}

/// The job id and attempt number of an execution id made by [`attempt_id`].
pub fn parse_attempt_id(execution: &JobId) -> Option<(JobId, u32)> {
    let (job, number) = execution.as_str().rsplit_once('-')?;
    let number: u32 = number.parse().ok().filter(|n| *n > 0)?;
    (!job.is_empty() && number.to_string() == execution.as_str()[job.len() + 1..])
        .then(|| (JobId::from(job.to_string()), number))
}

/// Writes a record to the store; a failing store is logged, the job goes on.
fn save(state: &State, record: &JobRecord) {
    if let Err(e) = state.store.put_job(record) {
        tracing::error!(job_id = %record.id, error = %Chain(&e), "the store did not take a job's state");
    }
}

fn set_state(state: &State, id: &JobId, to: JobState) {
    {
        let mut jobs = state.jobs.lock().expect("jobs");
        if let Some(r) = jobs.get_mut(id) {
            r.state = to;
            save(state, r);
        }
    }
    let _ = state.events.send(ControlEvent::JobState {
        id: id.clone(),
        state: to,
    });
}

fn finish(state: &State, id: &JobId, to: JobState, outcome: Option<Outcome>) {
    let record = state.jobs.lock().expect("jobs").remove(id).map(|mut r| {
        r.state = to;
        r.outcome = outcome;
        r.why_pending = None;
        r.finished_at = Some(SystemTime::now());
        save(state, &r);
        r
    });
    state.logs.close(id);
    if let (Some(r), Some(o)) = (&record, &state.observer) {
        let kind = r
            .runner_id()
            .and_then(|rid| state.registry.get(rid))
            .map(|e| e.info().kind.as_str().to_string());
        let total = r
            .finished_at
            .and_then(|f| f.duration_since(r.submitted_at).ok())
            .unwrap_or_default();
        o.job_finished(kind.as_deref(), to, total);
    }
    state.tried.lock().expect("tried").remove(id);
    state.cancel_requested.lock().expect("cancel").remove(id);
    state.wrote.lock().expect("wrote").remove(id);
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

/// Reports a status change that degradation detection made: to the observer (metrics),
/// as an event, in the audit log and the server's log; a recovered runner wakes dispatch.
fn report_finding(state: &State, change: StatusChange) {
    let reason = change.reason.clone().unwrap_or_default();
    let degraded = change.to == Some(RunnerStatus::Degraded);
    if degraded {
        tracing::warn!(runner = %change.runner_id, %reason, "runner degraded");
    } else {
        tracing::info!(runner = %change.runner_id, %reason, "runner recovered");
    }
    let entry = AuditEntry::new(
        "control-plane",
        if degraded {
            "runner.degraded"
        } else {
            "runner.recovered"
        },
        Some(change.runner_id.clone()),
        reason,
        None,
    );
    if let Err(e) = state.store.append_audit(&entry) {
        tracing::error!(error = %Chain(&e), "the audit log did not take an entry");
    }
    if let Some(o) = &state.observer {
        o.runner_status(&change);
    }
    if change.to.is_some_and(RunnerStatus::takes_jobs) {
        state.wake.notify_one();
    }
    let _ = state.events.send(ControlEvent::Runner {
        id: change.runner_id,
        status: change.to,
    });
}

async fn health_loop(state: Arc<State>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = state.health_wake.notified() => {}
        }
        for change in state.registry.expire_findings() {
            report_finding(&state, change);
        }
        for change in state.registry.check_health(interval, interval).await {
            if let Some(o) = &state.observer {
                o.runner_status(&change);
            }
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

async fn retain(
    state: &State,
    options: &crate::retention::RetentionOptions,
    now: SystemTime,
) -> Result<crate::retention::RetentionReport, Error> {
    let _one = state.retaining.lock().await;
    let report = crate::retention::pass(
        state.store.clone(),
        state.logs.clone(),
        options,
        now,
        &state.stop,
    )
    .await?;
    if let Some(o) = &state.observer {
        o.retention(&report);
    }
    Ok(report)
}

async fn retention_loop(state: Arc<State>, options: crate::retention::RetentionOptions) {
    let mut tick = tokio::time::interval(options.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match retain(&state, &options, SystemTime::now()).await {
            Ok(r) => {
                let changed = r.compressed + r.expired + r.jobs_deleted + r.audit_deleted;
                if changed > 0 || r.errors > 0 {
                    tracing::info!(
                        compressed = r.compressed,
                        expired = r.expired,
                        jobs_deleted = r.jobs_deleted,
                        audit_deleted = r.audit_deleted,
                        errors = r.errors,
                        batches = r.batches,
                        longest_batch_ms = r.longest_batch.as_millis() as u64,
                        "retention pass"
                    );
                }
            }
            Err(e) => tracing::error!(error = %Chain(&e), "retention pass failed"),
        }
    }
}

async fn dispatch_loop(state: Arc<State>) {
    loop {
        tokio::select! {
            _ = state.stop.cancelled() => return,
            _ = state.wake.notified() => {}
        }
        if state.accepting.load(Ordering::SeqCst) {
            dispatch_round(&state);
        }
    }
}

/// Places every queued job that fits somewhere now.
fn dispatch_round(state: &Arc<State>) {
    // Running jobs per submitter order the queue (fair share); per runner and job name
    // they feed the scorers that spread copies of one job over runners.
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
    // The queue's order, taken in batches so a long queue is not cloned and sorted whole
    // every round; the lock is not held while selecting.
    let batch = |skip: usize, take: usize| -> Vec<crate::queue::QueuedJob> {
        let queue = state.queue.lock().expect("queue");
        queue
            .iter_ordered(&by_submitter)
            .skip(skip)
            .take(take)
            .collect()
    };
    if state.queue.lock().expect("queue").is_empty() {
        return;
    }
    // When every queued job asks for labels, the round starts with the runners that
    // carry all the labels of at least one of them (selection needs that), not with
    // every runner: with thousands of runners (remote agents) most cannot take any job
    // queued now, and copying them all is most of a round's cost. Where that smaller
    // pool places nothing (no fit, or full), the round widens to every runner and goes
    // on from the same job, so placements and the reasons jobs wait are those of a
    // round over all runners.
    let wanted = if state.selector.filters_by_labels() {
        state.queue.lock().expect("queue").label_sets()
    } else {
        None
    };
    let assigned_to = assigned_counts(state);
    let mut pool = build_pool(state, &by_runner, &assigned_to, wanted.as_deref());
    let mut narrow = wanted.is_some();
    // Free slots left among the pool's runners; `None` when one has no bound. Once none
    // is left, the rest of the queue waits without a selection each.
    let free_in = |pool: &RunnerPool| -> Option<usize> {
        pool.runners()
            .iter()
            .try_fold(0usize, |sum, r| r.free_slots().map(|f| sum + f))
    };
    let mut free = free_in(&pool);
    *state.waiting_reason.lock().expect("waiting") = None;
    let mut skip = 0usize;
    'round: loop {
        // A few more jobs than free slots: some near the head may fit no runner, and
        // the ones behind them must still get their chance this round.
        let chunk = batch(skip, free.map_or(64, |f| f + 8));
        if chunk.is_empty() {
            break;
        }
        for queued in chunk {
            if free == Some(0) && narrow {
                pool = widen(state, &by_runner, &assigned_to, pool);
                free = free_in(&pool);
                narrow = false;
            }
            if free == Some(0) {
                // The rest waits; `get` reports this reason for jobs without their own.
                let text = if pool.runners().is_empty() {
                    with_out_of_service(state, "no runner takes jobs".to_string())
                } else {
                    with_out_of_service(state, "every runner taking jobs is full".to_string())
                };
                *state.waiting_reason.lock().expect("waiting") = Some(text);
                break 'round;
            }
            let Some(job) = state
                .jobs
                .lock()
                .expect("jobs")
                .get(&queued.id)
                .map(|r| r.job.clone())
            else {
                skip += 1;
                continue;
            };
            // Queued since the round started, asking for labels the pool was not built
            // for: runners outside it may carry them.
            if narrow
                && wanted
                    .as_deref()
                    .is_some_and(|w| w.binary_search(&asks(&job)).is_err())
            {
                pool = widen(state, &by_runner, &assigned_to, pool);
                free = free_in(&pool);
                narrow = false;
            }
            // A retry prefers runners it has not failed on, when any of them fits. A
            // preference, not an exclusion: when only a runner it failed on fits, the job
            // goes there rather than waiting for a runner that may never come.
            let tried = state
                .tried
                .lock()
                .expect("tried")
                .get(&queued.id)
                .cloned()
                .unwrap_or_default();
            let picked_at = Instant::now();
            let chosen = loop {
                let runners = pool.runners();
                let chosen = if tried.is_empty() {
                    state.selector.select_in(&job, &pool)
                } else {
                    let fresh: Vec<usize> = (0..runners.len())
                        .filter(|&i| !tried.contains(&runners[i].info.id))
                        .collect();
                    let subset: Vec<RunnerSnapshot> =
                        fresh.iter().map(|&i| runners[i].clone()).collect();
                    let degraded =
                        |i: usize| matches!(runners[i].health, rustci_runners::Health::Degraded(_));
                    match state.selector.select(&job, &subset) {
                        // A degraded runner it has not failed on comes after a runner
                        // in order that it has: the retry avoids the degraded runner.
                        Ok(i) if degraded(fresh[i]) => {
                            match state.selector.select_in(&job, &pool) {
                                Ok(j) if !degraded(j) => Ok(j),
                                _ => Ok(fresh[i]),
                            }
                        }
                        Ok(i) => Ok(fresh[i]),
                        Err(_) => state.selector.select_in(&job, &pool),
                    }
                };
                match chosen {
                    Err(_) if narrow => {
                        pool = widen(state, &by_runner, &assigned_to, pool);
                        free = free_in(&pool);
                        narrow = false;
                    }
                    chosen => break chosen,
                }
            };
            let chosen = chosen.map(|i| (i, pool.runners()[i].info.id.clone()));
            if let Some(o) = &state.observer {
                o.selection(picked_at.elapsed(), chosen.is_ok());
            }
            let runner_id = match chosen {
                Ok((index, id)) => {
                    pool.record_assignment(index, &job.name);
                    id
                }
                Err(why) => {
                    let text = with_out_of_service(
                        state,
                        if why.candidates == 0 {
                            "no runner takes jobs".to_string()
                        } else {
                            why.to_string()
                        },
                    );
                    if let Some(r) = state.jobs.lock().expect("jobs").get_mut(&queued.id) {
                        if r.why_pending.as_deref() != Some(text.as_str()) {
                            tracing::info!(job_id = %queued.id, why = %text, "job waits");
                        }
                        r.why_pending = Some(text);
                    }
                    // The job keeps its place in the queue; the ones behind it may fit
                    // elsewhere, so one unplaceable job never blocks the queue.
                    skip += 1;
                    continue;
                }
            };
            // Checked again at assignment: a drain or removal since the round's snapshot
            // wins.
            let Some(entry) = state
                .registry
                .get(&runner_id)
                .filter(|e| e.status.takes_jobs())
            else {
                skip += 1;
                continue;
            };
            // Cancelled since it was read from the queue: nothing to start.
            if !state.queue.lock().expect("queue").remove(&queued.id) {
                continue;
            }
            if let Some(f) = free.as_mut() {
                *f = f.saturating_sub(1);
            }
            state
                .assigned
                .lock()
                .expect("assigned")
                .insert(queued.id.clone(), runner_id.clone());
            // A global assignment order, so the round-robin scorer can tell which
            // runner was used least recently.
            let seq = state.seq.fetch_add(1, Ordering::SeqCst) + 1;
            state.registry.record_assignment(&runner_id, seq);
            let number = {
                let mut jobs = state.jobs.lock().expect("jobs");
                let Some(r) = jobs.get_mut(&queued.id) else {
                    continue;
                };
                r.why_pending = None;
                let now = SystemTime::now();
                let since = r
                    .attempts
                    .last()
                    .and_then(|a| a.ended_at)
                    .unwrap_or(r.submitted_at);
                if let Some(o) = &state.observer {
                    o.picked(
                        entry.info().kind.as_str(),
                        now.duration_since(since).unwrap_or_default(),
                    );
                }
                let number = r.attempts.len() as u32 + 1;
                if number > 1 {
                    let marker = format!("\n[rustci] attempt {number} on runner {runner_id}\n");
                    if let Err(e) = state.logs.append(&queued.id, marker.as_bytes()) {
                        tracing::error!(job_id = %queued.id, error = %Chain(&e), "writing the job log");
                    }
                }
                // Recorded before the task starts, so the stored record (written with the
                // Assigned state below) names the runner whose leftovers recovery must
                // stop after a crash, and where in the log this attempt's output begins.
                r.attempts.push(Attempt {
                    number,
                    runner_id: runner_id.clone(),
                    started_at: now,
                    ended_at: None,
                    outcome: None,
                    log_offset: state.logs.len(&queued.id),
                    declined: false,
                    usage: None,
                    degraded: match entry.effective_health() {
                        rustci_runners::Health::Degraded(why)
                            if entry.status == RunnerStatus::Degraded =>
                        {
                            Some(why)
                        }
                        _ => None,
                    },
                });
                r.attempts.len() as u32
            };
            tracing::info!(job_id = %queued.id, runner = %runner_id, attempt = number, "job assigned");
            set_state(state, &queued.id, JobState::Assigned);
            // Everything logged while the attempt runs (the runner's lines included)
            // carries the job's id.
            let span = tracing::info_span!("job", job_id = %queued.id, attempt = number);
            tokio::spawn(
                run_attempt(
                    state.clone(),
                    queued.id.clone(),
                    queued.submitter.clone(),
                    job,
                    entry.runner.clone(),
                    number,
                )
                .instrument(span),
            );
        }
    }
}

/// The labels `job` asks for, as the queue counts them.
fn asks(job: &Job) -> BTreeSet<String> {
    job.runs_on.labels.iter().cloned().collect()
}

/// Jobs assigned to each runner but not started yet, as a round starts.
fn assigned_counts(state: &State) -> HashMap<String, usize> {
    let mut assigned_to: HashMap<String, usize> = HashMap::new();
    for runner in state.assigned.lock().expect("assigned").values() {
        *assigned_to.entry(runner.clone()).or_default() += 1;
    }
    assigned_to
}

/// A round's pool: the runners taking jobs (only those carrying every label of one of
/// `only`, when given), with the jobs assigned to them but not started yet
/// (`assigned_to`, taken as the round started) counted as running, so a runner is never
/// offered more jobs than it has slots while starts are in flight (they do not show in
/// its own `running()` yet). Loads are updated in place as the round assigns jobs.
fn build_pool(
    state: &State,
    by_runner: &BTreeMap<String, BTreeMap<String, usize>>,
    assigned_to: &HashMap<String, usize>,
    only: Option<&[BTreeSet<String>]>,
) -> RunnerPool {
    let mut snapshots = match only {
        None => state.registry.snapshots(by_runner),
        Some(sets) => state.registry.snapshots_carrying(by_runner, sets),
    };
    count_assigned(&mut snapshots, assigned_to);
    RunnerPool::new(snapshots)
}

fn count_assigned(snapshots: &mut [RunnerSnapshot], assigned_to: &HashMap<String, usize>) {
    for snap in snapshots {
        let ours = assigned_to.get(&snap.info.id).copied().unwrap_or(0);
        snap.running = snap.running.max(ours);
    }
}

/// `narrow` with every other runner taking jobs added, in the registry's order (by id),
/// as [`build_pool`] over all runners orders them. `narrow`'s snapshots are kept as the
/// round updated them, so the jobs it assigned still count for loads and spreading, as
/// in a round that started with every runner.
fn widen(
    state: &State,
    by_runner: &BTreeMap<String, BTreeMap<String, usize>>,
    assigned_to: &HashMap<String, usize>,
    narrow: RunnerPool,
) -> RunnerPool {
    let have: std::collections::HashSet<String> =
        narrow.runners().iter().map(|r| r.info.id.clone()).collect();
    let mut others = state
        .registry
        .snapshots_where(by_runner, |e| !have.contains(&e.info().id));
    count_assigned(&mut others, assigned_to);
    let mut all = narrow.runners().to_vec();
    all.extend(others);
    all.sort_by(|a, b| a.info.id.cmp(&b.info.id));
    RunnerPool::new(all)
}

/// `text` followed by the runners out of service, by status ("; 1 runner is draining").
fn with_out_of_service(state: &State, mut text: String) -> String {
    for (status, n) in state.registry.out_of_service() {
        let noun = if n == 1 { "runner is" } else { "runners are" };
        text.push_str(&format!("; {n} {noun} {}", status.as_str()));
    }
    text
}

async fn run_attempt(
    state: Arc<State>,
    id: JobId,
    submitter: String,
    job: Job,
    runner: Arc<dyn Runner>,
    number: u32,
) {
    let attempt_id = attempt_id(&id, number);
    let started = tokio::time::Instant::now();
    let mut declined = false;
    let outcome = match runner.start(&job, attempt_id).await {
        Err(e) => {
            // A permanent refusal ends the job even when nothing ran.
            declined = e.is_declined() && e.is_temporary();
            Outcome::RunnerError {
                message: Chain(&e).to_string(),
                temporary: e.is_temporary(),
            }
        }
        Ok(execution) => {
            follow_execution(
                &state, &id, &submitter, &job, &runner, number, execution, started, false,
            )
            .await
        }
    };
    if declined {
        decline_attempt(state, id, submitter, job, runner, number, outcome, started);
    } else {
        end_attempt(state, id, submitter, job, runner, number, outcome, started);
    }
}

/// Reads an attempt's events until it ends and returns its outcome.
#[allow(clippy::too_many_arguments)]
async fn follow_execution(
    state: &Arc<State>,
    id: &JobId,
    submitter: &str,
    job: &Job,
    runner: &Arc<dyn Runner>,
    number: u32,
    mut execution: Execution,
    started: tokio::time::Instant,
    reattached: bool,
) -> Outcome {
    let runner_id = runner.info().id.clone();
    state.running.lock().expect("running").insert(
        id.clone(),
        Running {
            runner_id: runner_id.clone(),
            canceller: execution.canceller(),
            lost: false,
            name: job.name.clone(),
            submitter: submitter.to_string(),
        },
    );
    // A cancel that arrived while the job was being assigned.
    if state.cancel_requested.lock().expect("cancel").remove(id) {
        execution.cancel();
    }
    set_state(state, id, JobState::Running);
    let mut outcome = Outcome::Lost;
    let mut first = true;
    // The job's first runner output, whichever attempt writes it; not for an attempt
    // taken up again after a restart (its job's pickup is long past, or unknown).
    let mut first_output = !reattached;
    while let Some(event) = execution.next_event().await {
        // A reattached attempt's first event is no start-up (it started before).
        if std::mem::take(&mut first)
            && !reattached
            && let Some(change) = state.registry.record_startup(&runner_id, started.elapsed())
        {
            report_finding(state, change);
        }
        match &event.kind {
            EventKind::Finished { outcome: o } => outcome = o.clone(),
            EventKind::Usage { step: None, usage } => {
                if let Some(r) = state.jobs.lock().expect("jobs").get_mut(id)
                    && let Some(a) = r.attempts.iter_mut().find(|a| a.number == number)
                {
                    a.usage = Some(usage.clone());
                }
                if let Some(o) = &state.observer {
                    o.usage(runner.info().kind.as_str(), usage);
                }
            }
            EventKind::Output { data, stream, .. } => {
                if !data.is_empty()
                    && std::mem::take(&mut first_output)
                    && state.wrote.lock().expect("wrote").insert(id.clone())
                    && let Some(o) = &state.observer
                {
                    let submitted = state
                        .jobs
                        .lock()
                        .expect("jobs")
                        .get(id)
                        .map(|r| r.submitted_at);
                    if let Some(since) =
                        submitted.and_then(|t| SystemTime::now().duration_since(t).ok())
                    {
                        o.first_output(runner.info().kind.as_str(), since);
                    }
                }
                let stderr = *stream == rustci_runners::runner::OutputStream::Stderr;
                if let Err(e) = state.logs.append_from(id, stderr, data) {
                    tracing::error!(job_id = %id, error = %Chain(&e), "writing the job log");
                }
            }
            _ => {}
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
        .remove(id)
        .is_some_and(|r| r.lost);
    if lost && matches!(outcome, Outcome::Cancelled) {
        Outcome::Lost
    } else {
        outcome
    }
}

/// An attempt the runner handed back before it started: queued again without counting
/// toward `retry.max` while the job has been declined fewer than [`MAX_DECLINED`] times;
/// otherwise it ends like any runner failure.
#[allow(clippy::too_many_arguments)]
fn decline_attempt(
    state: Arc<State>,
    id: JobId,
    submitter: String,
    job: Job,
    runner: Arc<dyn Runner>,
    number: u32,
    outcome: Outcome,
    started: tokio::time::Instant,
) {
    let declined_before = match state.jobs.lock().expect("jobs").get(&id) {
        Some(r) => r.attempts.iter().filter(|a| a.declined).count(),
        None => return,
    };
    // A cancel that came while it was being started ends it here: it is not placed again.
    let cancelled = state.cancel_requested.lock().expect("cancel").remove(&id);
    if cancelled || declined_before >= MAX_DECLINED || !state.accepting.load(Ordering::SeqCst) {
        let outcome = if cancelled {
            Outcome::Cancelled
        } else {
            outcome
        };
        end_attempt(state, id, submitter, job, runner, number, outcome, started);
        return;
    }
    if let Some(r) = state.jobs.lock().expect("jobs").get_mut(&id)
        && let Some(a) = r.attempts.last_mut()
    {
        a.declined = true;
    }
    // Queued again by the shared path, whatever the policy (see `end_attempt`).
    end_attempt(state, id, submitter, job, runner, number, outcome, started);
}

/// Records how an attempt ended, then retries the job or finishes it.
#[allow(clippy::too_many_arguments)]
fn end_attempt(
    state: Arc<State>,
    id: JobId,
    submitter: String,
    job: Job,
    runner: Arc<dyn Runner>,
    number: u32,
    outcome: Outcome,
    started: tokio::time::Instant,
) {
    let runner_id = runner.info().id.clone();
    if let Outcome::RunnerError {
        temporary: true, ..
    } = &outcome
    {
        // The runner's engine, cluster or host may be in trouble (it failed to start the
        // job, or lost it midway): check its health now rather than at the next interval,
        // so that it stops getting jobs if it is.
        state.registry.check_soon(&runner_id);
        state.health_wake.notify_one();
    }
    if let Some(r) = state.jobs.lock().expect("jobs").get_mut(&id)
        && let Some(a) = r.attempts.last_mut()
    {
        a.outcome = Some(outcome.clone());
        a.ended_at = Some(SystemTime::now());
    }
    if let Some(o) = &state.observer {
        o.attempt_ended(runner.info().kind.as_str(), &outcome, started.elapsed());
    }
    // The runner's fault counts against it: a failure of its own (a temporary runner
    // error: its engine, cluster or host) or a job it lost. Not an attempt it handed back
    // before it started (declined: busy, not broken), nor a permanent refusal, which
    // is the job's (a spec or an image that can never work).
    let handed_back = state
        .jobs
        .lock()
        .expect("jobs")
        .get(&id)
        .and_then(|r| r.attempts.last().map(|a| a.declined))
        .unwrap_or(false);
    if !handed_back {
        let fault = matches!(
            outcome,
            Outcome::RunnerError {
                temporary: true,
                ..
            } | Outcome::Lost
        );
        if let Some(change) = state.registry.record_outcome(&runner_id, fault) {
            report_finding(&state, change);
        }
    }
    tracing::info!(job_id = %id, attempt = number, outcome = %outcome, "attempt ended");
    state.assigned.lock().expect("assigned").remove(&id);
    let cause = match &outcome {
        Outcome::Succeeded | Outcome::Cancelled => None,
        Outcome::Failed { .. } | Outcome::Signalled { .. } => Some(RetryWhen::Failure),
        Outcome::TimedOut { .. } => Some(RetryWhen::Timeout),
        Outcome::Lost => Some(RetryWhen::Lost),
        Outcome::RunnerError {
            temporary: true, ..
        } => Some(RetryWhen::RunnerFailure),
        // A runner failure that retrying cannot help (a refused spec, a configuration
        // that cannot work) ends the job at once, whatever its policy.
        _ => None,
    };
    // Attempts handed back before they started do not count, and one just handed back
    // (marked by `decline_attempt`) is placed again whatever the policy.
    let (counted, declined) =
        state
            .jobs
            .lock()
            .expect("jobs")
            .get(&id)
            .map_or((number, false), |r| {
                (
                    r.attempts.iter().filter(|a| !a.declined).count() as u32,
                    r.attempts.last().is_some_and(|a| a.declined),
                )
            });
    let retry = (declined
        || cause.is_some_and(|c| job.retry.when.contains(&c)) && counted <= job.retry.max)
        && state.accepting.load(Ordering::SeqCst)
        && state.jobs.lock().expect("jobs").contains_key(&id);
    if retry {
        state
            .tried
            .lock()
            .expect("tried")
            .entry(id.clone())
            .or_default()
            .insert(runner_id);
        state.queue.lock().expect("queue").push_asking(
            id.clone(),
            job.priority,
            submitter,
            asks(&job),
        );
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
