//! The registry of runners: identity, reserved labels, status, health and assignment
//! history, and the health checks that move runners between statuses.
//!
//! ```text
//!  register ─► healthy ◄──► degraded          (health checks)
//!                 ▲  │
//!                 │  └───► unhealthy ─► back when a check passes
//!  resume ◄── draining ◄── drain               (no new jobs; running ones finish)
//!  remove ──► gone (its running jobs are lost)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use rustci_runners::runner::{Health, Runner, RunnerInfo};
use rustci_runners::select::RunnerSnapshot;

use crate::degradation::{DegradationOptions, RunnerTrack};

/// Where a runner stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunnerStatus {
    /// Takes jobs.
    Healthy,
    /// Takes jobs; its last health check reported a problem.
    Degraded,
    /// Takes no jobs until a health check passes.
    Unhealthy,
    /// Takes no new jobs; running ones finish.
    Draining,
    /// Not answering at all (a remote runner that went away).
    Offline,
}

impl RunnerStatus {
    /// The status as a word.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerStatus::Healthy => "healthy",
            RunnerStatus::Degraded => "degraded",
            RunnerStatus::Unhealthy => "unhealthy",
            RunnerStatus::Draining => "draining",
            RunnerStatus::Offline => "offline",
        }
    }

    /// True when the runner may get new jobs.
    pub fn takes_jobs(self) -> bool {
        matches!(self, RunnerStatus::Healthy | RunnerStatus::Degraded)
    }
}

/// Options for [`Registry::register`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct RegisterOptions {
    /// Labels that reserve the runner for jobs asking for them.
    pub reserved_labels: BTreeSet<String>,
    /// Labels added to the runner's own (from its [`RunnerInfo`]).
    pub labels: BTreeSet<String>,
}

/// Health checks kept per runner.
pub const HEALTH_HISTORY: usize = 10;

/// One health check's result.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct HealthCheck {
    /// When it ended (milliseconds since the Unix epoch in JSON).
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub at: std::time::SystemTime,
    /// What the runner answered (or that it did not answer in time).
    pub health: Health,
    /// How long it took.
    pub took: Duration,
}

/// A registered runner and what the control plane knows about it.
#[derive(Clone)]
#[non_exhaustive]
pub struct RunnerEntry {
    /// The runner.
    pub runner: Arc<dyn Runner>,
    /// Its status.
    pub status: RunnerStatus,
    /// Its reserved labels.
    pub reserved_labels: BTreeSet<String>,
    /// Labels added to the runner's own.
    pub extra_labels: BTreeSet<String>,
    /// The last health check's answer.
    pub health: Health,
    /// Sequence number of its last assignment.
    pub last_assigned: Option<u64>,
    /// Recent start-up times (start to first event), newest last.
    pub startups: Vec<Duration>,
    /// Health checks failed in a row.
    pub failures: u32,
    /// The last [`HEALTH_HISTORY`] health checks, oldest first (shared between copies of
    /// the entry until one changes).
    pub checks: Arc<VecDeque<HealthCheck>>,
    /// What the control plane saw of its recent jobs (degradation detection; shared
    /// between copies of the entry until one changes).
    pub track: Arc<RunnerTrack>,
    /// What its host had left at the last health check ([`Runner::pressure`]).
    pub pressure: Option<rustci_runners::HostPressure>,
    next_check: Instant,
    /// A check was asked for ([`Registry::check_soon`]) since the last one started.
    check_asked: bool,
}

impl RunnerEntry {
    /// The runner's identity.
    pub fn info(&self) -> &RunnerInfo {
        self.runner.info()
    }

    /// Every label jobs can ask for: the runner's own and the added ones.
    pub fn labels(&self) -> BTreeSet<String> {
        self.info()
            .labels
            .union(&self.extra_labels)
            .cloned()
            .collect()
    }

    /// True when the runner carries `label` for selection: its own, an added one, or a
    /// reserved one.
    pub fn carries(&self, label: &str) -> bool {
        self.info().labels.contains(label)
            || self.extra_labels.contains(label)
            || self.reserved_labels.contains(label)
    }

    /// Why the control plane finds the runner degraded (its start-up or runner-fault
    /// figures), when it does; the runner's own health may say more.
    pub fn degraded_by_control_plane(&self) -> Option<&str> {
        self.track.reason()
    }

    /// Its health as the selection engine sees it: the runner's own answer, or degraded
    /// with the control plane's reason when the runner says healthy but its figures do not.
    pub fn effective_health(&self) -> Health {
        match (&self.health, self.track.reason()) {
            (Health::Healthy, Some(why)) => Health::Degraded(why.to_string()),
            (h, _) => h.clone(),
        }
    }

    /// Median of the recent start-up times.
    pub fn startup(&self) -> Option<Duration> {
        let mut s = self.startups.clone();
        s.sort();
        s.get(s.len() / 2).copied()
    }
}

/// A change of a runner's status.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusChange {
    /// The runner's id.
    pub runner_id: String,
    /// Before.
    pub from: Option<RunnerStatus>,
    /// After; `None` when removed.
    pub to: Option<RunnerStatus>,
    /// Why, when the control plane's degradation detection made the change.
    pub reason: Option<String>,
}

/// The status a runner's health and the control plane's finding give (not draining).
fn status_for(health: &Health, finding: Option<&str>) -> RunnerStatus {
    match health {
        Health::Healthy if finding.is_some() => RunnerStatus::Degraded,
        Health::Healthy => RunnerStatus::Healthy,
        // Full: degraded, and the selection engine gives it no new job.
        Health::Degraded(_) | Health::Full(_) => RunnerStatus::Degraded,
        Health::Offline(_) => RunnerStatus::Offline,
        _ => RunnerStatus::Unhealthy,
    }
}

fn snapshot(
    e: &RunnerEntry,
    running: &BTreeMap<String, BTreeMap<String, usize>>,
) -> RunnerSnapshot {
    let by_name = running.get(&e.info().id).cloned().unwrap_or_default();
    let mut info = e.info().clone();
    info.labels.extend(e.extra_labels.iter().cloned());
    let mut snap = RunnerSnapshot::new(
        info,
        e.runner.capabilities().clone(),
        e.effective_health(),
        e.runner.running(),
    );
    snap.reserved_labels = e.reserved_labels.clone();
    snap.last_assigned = e.last_assigned;
    snap.startup = e.startup();
    snap.running_by_name = by_name;
    snap
}

/// Runners known to a control plane.
#[derive(Default)]
pub struct Registry {
    entries: RwLock<Entries>,
    degradation: DegradationOptions,
}

/// The entries by id, and the ids by every label they carry (own, added or reserved),
/// kept together under one lock. Entries are added, relabelled and removed only through
/// [`Entries::insert`], [`Entries::relabel`] and [`Entries::remove`], which keep the
/// index; everything else reaches the map through `Deref`.
#[derive(Default)]
struct Entries {
    map: BTreeMap<String, RunnerEntry>,
    by_label: HashMap<String, BTreeSet<String>>,
}

impl std::ops::Deref for Entries {
    type Target = BTreeMap<String, RunnerEntry>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Entries {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

fn all_labels(e: &RunnerEntry) -> impl Iterator<Item = &String> {
    e.info()
        .labels
        .iter()
        .chain(&e.extra_labels)
        .chain(&e.reserved_labels)
}

impl Entries {
    fn index(&mut self, id: &str) {
        let Some(e) = self.map.get(id) else { return };
        for l in all_labels(e) {
            self.by_label
                .entry(l.clone())
                .or_default()
                .insert(id.to_string());
        }
    }

    fn unindex(&mut self, id: &str) {
        let Some(e) = self.map.get(id) else { return };
        for l in all_labels(e) {
            if let Some(ids) = self.by_label.get_mut(l) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_label.remove(l);
                }
            }
        }
    }

    fn insert(&mut self, id: String, entry: RunnerEntry) {
        self.unindex(&id);
        self.map.insert(id.clone(), entry);
        self.index(&id);
    }

    fn remove(&mut self, id: &str) -> Option<RunnerEntry> {
        self.unindex(id);
        self.map.remove(id)
    }

    fn relabel(&mut self, id: &str, options: RegisterOptions) -> bool {
        if !self.map.contains_key(id) {
            return false;
        }
        self.unindex(id);
        let e = self.map.get_mut(id).expect("present");
        e.reserved_labels = options.reserved_labels;
        e.extra_labels = options.labels;
        self.index(id);
        true
    }

    /// The ids of the runners carrying every label of at least one of `sets`, in order.
    fn carrying(&self, sets: &[BTreeSet<String>]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for set in sets {
            let mut lists: Vec<&BTreeSet<String>> = Vec::new();
            for l in set {
                match self.by_label.get(l) {
                    Some(ids) => lists.push(ids),
                    None => {
                        lists.clear();
                        break;
                    }
                }
            }
            // An empty set asks for nothing: every runner carries it.
            if set.is_empty() {
                out.extend(self.map.keys().cloned());
                continue;
            }
            lists.sort_by_key(|ids| ids.len());
            let Some((first, rest)) = lists.split_first() else {
                continue;
            };
            out.extend(
                first
                    .iter()
                    .filter(|id| rest.iter().all(|ids| ids.contains(*id)))
                    .cloned(),
            );
        }
        out
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// An empty registry detecting degradation with `options`.
    pub fn with_degradation(options: DegradationOptions) -> Self {
        Registry {
            entries: Default::default(),
            degradation: options,
        }
    }

    /// The degradation detection's settings.
    pub fn degradation(&self) -> &DegradationOptions {
        &self.degradation
    }

    /// Adds a runner (healthy until a check says otherwise); returns its id.
    pub fn register(&self, runner: Arc<dyn Runner>, options: RegisterOptions) -> String {
        let id = runner.info().id.clone();
        let entry = RunnerEntry {
            runner,
            status: RunnerStatus::Healthy,
            reserved_labels: options.reserved_labels,
            extra_labels: options.labels,
            health: Health::Healthy,
            last_assigned: None,
            startups: Vec::new(),
            failures: 0,
            checks: Arc::new(VecDeque::new()),
            track: Arc::new(RunnerTrack::default()),
            pressure: None,
            next_check: Instant::now(),
            check_asked: false,
        };
        self.entries
            .write()
            .expect("registry")
            .insert(id.clone(), entry);
        id
    }

    fn set_status(
        &self,
        id: &str,
        f: impl FnOnce(RunnerStatus) -> Option<RunnerStatus>,
    ) -> Option<StatusChange> {
        let mut entries = self.entries.write().expect("registry");
        let entry = entries.get_mut(id)?;
        let to = f(entry.status)?;
        let from = entry.status;
        entry.status = to;
        (from != to).then(|| StatusChange {
            runner_id: id.to_string(),
            from: Some(from),
            to: Some(to),
            reason: None,
        })
    }

    /// Feeds the degradation detection of runner `id` through `f` (which says whether the
    /// finding changed); the status change it makes, with its reason, if any. A draining
    /// runner's status stays as it is.
    fn track(
        &self,
        id: &str,
        f: impl FnOnce(&mut RunnerTrack, &DegradationOptions) -> bool,
    ) -> Option<StatusChange> {
        let mut entries = self.entries.write().expect("registry");
        let e = entries.get_mut(id)?;
        if !f(Arc::make_mut(&mut e.track), &self.degradation) {
            return None;
        }
        // Findings move a runner only between healthy and degraded: a draining,
        // unhealthy or offline runner stays as it is (its next health check decides).
        if !matches!(e.status, RunnerStatus::Healthy | RunnerStatus::Degraded)
            || !matches!(e.health, Health::Healthy)
        {
            return None;
        }
        let to = status_for(&e.health, e.track.reason());
        let from = e.status;
        e.status = to;
        (from != to).then(|| StatusChange {
            runner_id: id.to_string(),
            from: Some(from),
            to: Some(to),
            reason: Some(
                e.track
                    .reason()
                    .map(|r| format!("degraded: {r}"))
                    .unwrap_or_else(|| "recovered: its figures are back to normal".into()),
            ),
        })
    }

    /// Records an attempt's end on runner `id`: `fault` when it was the runner's (a
    /// runner error, lost). The status change degradation detection makes, if any.
    pub fn record_outcome(&self, id: &str, fault: bool) -> Option<StatusChange> {
        self.track(id, |t, o| t.outcome(o, fault, std::time::Instant::now()))
    }

    /// Forgets every runner's evidence older than the detection's `max_age_secs`; the
    /// status changes that makes.
    pub fn expire_findings(&self) -> Vec<StatusChange> {
        let ids = self.ids();
        ids.iter()
            .filter_map(|id| self.track(id, |t, o| t.evaluate(o, std::time::Instant::now())))
            .collect()
    }

    /// Replaces a runner's added and reserved labels. False when it is unknown.
    pub fn update(&self, id: &str, options: RegisterOptions) -> bool {
        self.entries.write().expect("registry").relabel(id, options)
    }

    /// Stops giving the runner new jobs. `None` when unknown or unchanged.
    pub fn drain(&self, id: &str) -> Option<StatusChange> {
        self.set_status(id, |_| Some(RunnerStatus::Draining))
    }

    /// Gives a drained runner jobs again, with the status its last health check and the
    /// control plane's findings give (the next check may change it).
    pub fn resume(&self, id: &str) -> Option<StatusChange> {
        let to = {
            let entries = self.entries.read().expect("registry");
            let e = entries.get(id)?;
            match &e.health {
                // Never checked, or unhealthy when drained: given a chance until the
                // next check, as before.
                Health::Unhealthy(_) | Health::Offline(_) => RunnerStatus::Healthy,
                h => status_for(h, e.track.reason()),
            }
        };
        self.set_status(id, |s| (s == RunnerStatus::Draining).then_some(to))
    }

    /// Removes a runner; returns it.
    pub fn remove(&self, id: &str) -> Option<Arc<dyn Runner>> {
        self.entries
            .write()
            .expect("registry")
            .remove(id)
            .map(|e| e.runner)
    }

    /// One runner's entry.
    pub fn get(&self, id: &str) -> Option<RunnerEntry> {
        self.entries.read().expect("registry").get(id).cloned()
    }

    /// Every entry, by id.
    pub fn list(&self) -> Vec<RunnerEntry> {
        self.entries
            .read()
            .expect("registry")
            .values()
            .cloned()
            .collect()
    }

    /// The ids of every registered runner, in order (without copying the entries).
    pub fn ids(&self) -> Vec<String> {
        self.entries
            .read()
            .expect("registry")
            .keys()
            .cloned()
            .collect()
    }

    /// The ids of the registered runners whose id starts with `prefix`, in order: a
    /// range lookup, not a scan, so it stays cheap with thousands of runners (a remote
    /// agent's runners share the prefix `<agent id>.`).
    pub fn ids_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries
            .read()
            .expect("registry")
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(id, _)| id)
            .take_while(|id| id.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Records an assignment (for round-robin).
    pub fn record_assignment(&self, id: &str, seq: u64) {
        if let Some(e) = self.entries.write().expect("registry").get_mut(id) {
            e.last_assigned = Some(seq);
        }
    }

    /// Records a measured start-up time (kept for the fastest-startup scorer: the last
    /// 16) and feeds degradation detection; the status change that makes, if any.
    pub fn record_startup(&self, id: &str, startup: Duration) -> Option<StatusChange> {
        if let Some(e) = self.entries.write().expect("registry").get_mut(id) {
            e.startups.push(startup);
            if e.startups.len() > 16 {
                e.startups.remove(0);
            }
        }
        self.track(id, |t, o| t.startup(o, startup, std::time::Instant::now()))
    }

    /// Snapshots of the runners that take jobs, for a selector; `running` gives each
    /// runner's running jobs by job name.
    pub fn snapshots(
        &self,
        running: &BTreeMap<String, BTreeMap<String, usize>>,
    ) -> Vec<RunnerSnapshot> {
        self.snapshots_where(running, |_| true)
    }

    /// [`Registry::snapshots`] of only the runners taking jobs that carry every label
    /// (own, added or reserved) of at least one of `sets`: found through an index by
    /// label, so the cost follows the runners that match, not all runners.
    pub fn snapshots_carrying(
        &self,
        running: &BTreeMap<String, BTreeMap<String, usize>>,
        sets: &[BTreeSet<String>],
    ) -> Vec<RunnerSnapshot> {
        let entries = self.entries.read().expect("registry");
        entries
            .carrying(sets)
            .iter()
            .filter_map(|id| entries.get(id))
            .filter(|e| e.status.takes_jobs())
            .map(|e| snapshot(e, running))
            .collect()
    }

    /// [`Registry::snapshots`] of only the runners taking jobs for which `keep` holds,
    /// checked before anything is copied.
    pub fn snapshots_where(
        &self,
        running: &BTreeMap<String, BTreeMap<String, usize>>,
        keep: impl Fn(&RunnerEntry) -> bool,
    ) -> Vec<RunnerSnapshot> {
        self.entries
            .read()
            .expect("registry")
            .values()
            .filter(|e| e.status.takes_jobs() && keep(e))
            .map(|e| snapshot(e, running))
            .collect()
    }

    /// How many runners are out of service, by status (for explaining a pending job).
    pub fn out_of_service(&self) -> BTreeMap<RunnerStatus, usize> {
        let mut out = BTreeMap::new();
        for e in self.entries.read().expect("registry").values() {
            if !e.status.takes_jobs() {
                *out.entry(e.status).or_default() += 1;
            }
        }
        out
    }

    /// Makes runner `id` due for a health check at the next [`Registry::check_health`]
    /// (after a start failed in a way that suggests its engine or cluster is gone).
    pub fn check_soon(&self, id: &str) {
        if let Some(e) = self.entries.write().expect("registry").get_mut(id) {
            e.next_check = Instant::now();
            e.check_asked = true;
        }
    }

    /// Checks the health of every runner that is due, each within `timeout`; a runner
    /// that keeps failing is checked less and less often (doubling up to 16 intervals).
    /// Returns the status changes.
    pub async fn check_health(&self, interval: Duration, timeout: Duration) -> Vec<StatusChange> {
        let now = Instant::now();
        let due: Vec<(String, Arc<dyn Runner>)> = self
            .entries
            .write()
            .expect("registry")
            .iter_mut()
            .filter(|(_, e)| e.next_check <= now && e.status != RunnerStatus::Draining)
            .map(|(id, e)| {
                // Answered by this check; one asked for while it runs stays due.
                e.check_asked = false;
                (id.clone(), e.runner.clone())
            })
            .collect();
        let checks = due.into_iter().map(|(id, runner)| async move {
            let started = Instant::now();
            let checked = async { (runner.health().await, runner.pressure()) };
            let (health, pressure) = match tokio::time::timeout(timeout, checked).await {
                Ok(answer) => answer,
                Err(_) => (
                    Health::Unhealthy(format!("no health answer within {timeout:?}")),
                    None,
                ),
            };
            (id, health, started.elapsed(), pressure)
        });
        let results = futures::future::join_all(checks).await;
        let mut changes = Vec::new();
        let mut entries = self.entries.write().expect("registry");
        for (id, health, took, pressure) in results {
            let Some(e) = entries.get_mut(&id) else {
                continue;
            };
            e.pressure = pressure;
            let history = Arc::make_mut(&mut e.checks);
            if history.len() == HEALTH_HISTORY {
                history.pop_front();
            }
            history.push_back(HealthCheck {
                at: std::time::SystemTime::now(),
                health: health.clone(),
                took,
            });
            if e.status == RunnerStatus::Draining {
                continue;
            }
            let to = status_for(&health, e.track.reason());
            e.failures = if to == RunnerStatus::Unhealthy {
                e.failures.saturating_add(1)
            } else {
                0
            };
            e.next_check = if e.check_asked {
                Instant::now()
            } else {
                Instant::now() + interval * 2u32.pow(e.failures.min(4))
            };
            e.health = health;
            if e.status != to {
                changes.push(StatusChange {
                    runner_id: id.clone(),
                    from: Some(e.status),
                    to: Some(to),
                    reason: None,
                });
                e.status = to;
            }
        }
        changes
    }
}
