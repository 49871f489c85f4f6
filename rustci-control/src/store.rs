//! Where the control plane keeps what must survive it: jobs with their attempts and state
//! transitions, runner registrations and the audit log.
//!
//! [`Store`] is synchronous: the control plane calls it while it holds its own job table,
//! so every write is ordered with the state change it records. An embedded database
//! answers in microseconds. [`MemoryStore`] keeps everything in memory (embedding, tests);
//! `SqliteStore` (feature `sqlite`) keeps it in one SQLite file and is what the server uses.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::dispatcher::{JobRecord, JobState};
use rustci_runners::runner::JobId;

/// One change of a job's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Transition {
    /// The state entered.
    pub state: JobState,
    /// When (milliseconds since the Unix epoch in JSON).
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub at: SystemTime,
}

/// Which jobs to list, newest first.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct JobQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this submitter.
    pub submitter: Option<String>,
    /// Only jobs with this name.
    pub name: Option<String>,
    /// Only jobs with an attempt on this runner (by id).
    pub runner: Option<String>,
    /// Only jobs submitted before the one with this cursor (from [`JobPage::next`]).
    pub before: Option<u64>,
    /// At most this many (0 means the default, 50).
    pub limit: usize,
}

impl JobQuery {
    /// The page size in effect.
    pub fn effective_limit(&self) -> usize {
        if self.limit == 0 { 50 } else { self.limit }
    }

    fn matches(&self, r: &JobRecord) -> bool {
        self.state.is_none_or(|s| s == r.state)
            && self.submitter.as_ref().is_none_or(|s| *s == r.submitter)
            && self.name.as_ref().is_none_or(|n| *n == r.job.name)
            && self
                .runner
                .as_ref()
                .is_none_or(|id| r.attempts.iter().any(|a| a.runner_id == *id))
    }
}

/// One page of jobs.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<JobRecord>,
    /// Cursor for the next (older) page; `None` on the last one.
    pub next: Option<u64>,
}

/// A runner registration as stored: enough to describe and re-create it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerRecord {
    /// The runner's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its kind (`local`, `native`, `docker`, …).
    pub kind: String,
    /// The configuration it was registered with, as the registrar gave it.
    pub config: serde_json::Value,
    /// When it was registered.
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub registered_at: SystemTime,
}

impl RunnerRecord {
    /// A record registered now.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        kind: impl Into<String>,
        config: serde_json::Value,
    ) -> Self {
        RunnerRecord {
            id: id.into(),
            name: name.into(),
            kind: kind.into(),
            config,
            registered_at: SystemTime::now(),
        }
    }
}

/// One entry of the audit log: who did what to which object, and whether it was allowed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// Sequence number, assigned by the store (0 before it is appended).
    pub seq: u64,
    /// When.
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub at: SystemTime,
    /// Who: a key's name, a runner, or `anonymous`.
    pub actor: String,
    /// What, e.g. `job.submit`, `runner.drain`, `auth.failed`.
    pub action: String,
    /// On what (a job or runner id), when anything.
    pub target: Option<String>,
    /// `ok`, `denied` or an error code.
    pub result: String,
    /// The request's correlation id, when it came over HTTP.
    pub request_id: Option<String>,
}

impl AuditEntry {
    /// An entry timestamped now.
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        target: Option<String>,
        result: impl Into<String>,
        request_id: Option<String>,
    ) -> Self {
        AuditEntry {
            seq: 0,
            at: SystemTime::now(),
            actor: actor.into(),
            action: action.into(),
            target,
            result: result.into(),
            request_id,
        }
    }
}

/// Durable state of a control plane.
///
/// Contract: every method is atomic; after `put_job` returns, a process crash loses
/// nothing it wrote. `put_job` replaces the whole record (attempts included) and keeps
/// the job's position in submission order from its first put; a put whose state differs
/// from the stored one records a [`Transition`].
pub trait Store: Send + Sync {
    /// Inserts or replaces a job's record.
    fn put_job(&self, record: &JobRecord) -> Result<(), Error>;
    /// One job's record.
    fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>, Error>;
    /// A page of jobs, newest first.
    fn list_jobs(&self, query: &JobQuery) -> Result<JobPage, Error>;
    /// Every job not yet in a terminal state, oldest first.
    fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, Error>;
    /// Every state a job went through, in order.
    fn transitions(&self, id: &JobId) -> Result<Vec<Transition>, Error>;
    /// Number of jobs in each state.
    fn count_by_state(&self) -> Result<BTreeMap<JobState, u64>, Error>;
    /// Inserts or replaces a runner registration.
    fn put_runner(&self, record: &RunnerRecord) -> Result<(), Error>;
    /// Deletes a runner registration; false when there was none.
    fn remove_runner(&self, id: &str) -> Result<bool, Error>;
    /// Every runner registration, oldest first.
    fn runners(&self) -> Result<Vec<RunnerRecord>, Error>;
    /// Appends to the audit log and returns the entry's sequence number.
    fn append_audit(&self, entry: &AuditEntry) -> Result<u64, Error>;
    /// Audit entries with `seq < before` (all when `None`), newest first, at most `limit`.
    fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>, Error>;
}

/// A [`Store`] in memory: nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    next: u64,
    order: BTreeMap<u64, JobId>,
    jobs: BTreeMap<JobId, (u64, JobRecord, Vec<Transition>)>,
    runners: BTreeMap<String, RunnerRecord>,
    audit: Vec<AuditEntry>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn put_job(&self, record: &JobRecord) -> Result<(), Error> {
        let mut m = self.inner.lock().expect("store");
        let m = &mut *m;
        match m.jobs.get_mut(&record.id) {
            Some((_, r, transitions)) => {
                if r.state != record.state {
                    transitions.push(Transition {
                        state: record.state,
                        at: SystemTime::now(),
                    });
                }
                *r = record.clone();
            }
            None => {
                m.next += 1;
                m.order.insert(m.next, record.id.clone());
                let first = Transition {
                    state: record.state,
                    at: record.submitted_at,
                };
                m.jobs
                    .insert(record.id.clone(), (m.next, record.clone(), vec![first]));
            }
        }
        Ok(())
    }

    fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>, Error> {
        let m = self.inner.lock().expect("store");
        Ok(m.jobs.get(id).map(|(_, r, _)| r.clone()))
    }

    fn list_jobs(&self, query: &JobQuery) -> Result<JobPage, Error> {
        let m = self.inner.lock().expect("store");
        let limit = query.effective_limit();
        let mut page = JobPage::default();
        let upper = query.before.unwrap_or(u64::MAX);
        let mut last = 0;
        for (seq, id) in m.order.range(..upper).rev() {
            let (_, r, _) = &m.jobs[id];
            if !query.matches(r) {
                continue;
            }
            if page.jobs.len() == limit {
                page.next = Some(last);
                break;
            }
            page.jobs.push(r.clone());
            last = *seq;
        }
        Ok(page)
    }

    fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, Error> {
        let m = self.inner.lock().expect("store");
        Ok(m.order
            .values()
            .map(|id| &m.jobs[id].1)
            .filter(|r| !r.state.is_terminal())
            .cloned()
            .collect())
    }

    fn transitions(&self, id: &JobId) -> Result<Vec<Transition>, Error> {
        let m = self.inner.lock().expect("store");
        Ok(m.jobs
            .get(id)
            .map(|(_, _, t)| t.clone())
            .unwrap_or_default())
    }

    fn count_by_state(&self) -> Result<BTreeMap<JobState, u64>, Error> {
        let m = self.inner.lock().expect("store");
        let mut counts = BTreeMap::new();
        for (_, r, _) in m.jobs.values() {
            *counts.entry(r.state).or_default() += 1;
        }
        Ok(counts)
    }

    fn put_runner(&self, record: &RunnerRecord) -> Result<(), Error> {
        let mut m = self.inner.lock().expect("store");
        m.runners.insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn remove_runner(&self, id: &str) -> Result<bool, Error> {
        Ok(self
            .inner
            .lock()
            .expect("store")
            .runners
            .remove(id)
            .is_some())
    }

    fn runners(&self) -> Result<Vec<RunnerRecord>, Error> {
        let m = self.inner.lock().expect("store");
        let mut all: Vec<_> = m.runners.values().cloned().collect();
        all.sort_by_key(|r| r.registered_at);
        Ok(all)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<u64, Error> {
        let mut m = self.inner.lock().expect("store");
        let seq = m.audit.len() as u64 + 1;
        let mut e = entry.clone();
        e.seq = seq;
        m.audit.push(e);
        Ok(seq)
    }

    fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        let m = self.inner.lock().expect("store");
        let upper = before.unwrap_or(u64::MAX);
        Ok(m.audit
            .iter()
            .rev()
            .filter(|e| e.seq < upper)
            .take(limit)
            .cloned()
            .collect())
    }
}
