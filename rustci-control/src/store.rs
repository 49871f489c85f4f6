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

/// Where a finished job's log is in its retention ([`crate::RetentionOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LogState {
    /// The job ended; its log's size is not measured yet.
    Finished,
    /// Stored as written.
    Plain,
    /// Stored compressed.
    Compressed,
    /// Being deleted by retention: recorded before its files go (a reader gets
    /// `LOG_EXPIRED`), and retried by the next pass when a removal did not finish.
    Expiring,
    /// Deleted by retention; the job's record remains.
    Expired,
}

impl LogState {
    /// Every state.
    pub const ALL: [LogState; 5] = [
        LogState::Finished,
        LogState::Plain,
        LogState::Compressed,
        LogState::Expiring,
        LogState::Expired,
    ];

    /// The state's name: `finished`, `plain`, `compressed`, `expiring`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogState::Finished => "finished",
            LogState::Plain => "plain",
            LogState::Compressed => "compressed",
            LogState::Expiring => "expiring",
            LogState::Expired => "expired",
        }
    }

    /// The state named `name`, if any.
    pub fn from_name(name: &str) -> Option<LogState> {
        LogState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// True for a log still in storage (finished, plain or compressed).
    pub fn is_kept(self) -> bool {
        matches!(
            self,
            LogState::Finished | LogState::Plain | LogState::Compressed
        )
    }

    /// True for a log retention deleted or is deleting (expiring, expired): readers get
    /// `LOG_EXPIRED`.
    pub fn is_gone(self) -> bool {
        !self.is_kept()
    }
}

/// A finished job's log as retention tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogRecord {
    /// The job.
    pub job_id: JobId,
    /// When the job ended.
    #[serde(with = "rustci_runners::runner::system_time_millis")]
    pub finished_at: SystemTime,
    /// Where the log is.
    pub state: LogState,
    /// Bytes in storage (0 until measured, and once expired).
    pub bytes: u64,
    /// Bytes as written (0 until measured).
    pub original: u64,
}

impl LogRecord {
    /// A record of a log just finished.
    pub fn finished(job_id: JobId, finished_at: SystemTime) -> Self {
        LogRecord {
            job_id,
            finished_at,
            state: LogState::Finished,
            bytes: 0,
            original: 0,
        }
    }
}

/// What finished jobs' logs take, by state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogTotals {
    /// Per state: (logs, bytes in storage, bytes as written).
    pub by_state: BTreeMap<LogState, (u64, u64, u64)>,
}

impl LogTotals {
    /// Bytes in storage of the logs still kept.
    pub fn stored_bytes(&self) -> u64 {
        self.by_state
            .iter()
            .filter(|(s, _)| s.is_kept())
            .map(|(_, t)| t.1)
            .sum()
    }
}

/// Durable state of a control plane.
///
/// Contract: every method is atomic; after `put_job` returns, a process crash loses
/// nothing it wrote. `put_job` replaces the whole record (attempts included) and keeps
/// the job's position in submission order from its first put; a put whose state differs
/// from the stored one records a [`Transition`]; the first put of a job in a terminal
/// state adds its [`LogRecord`] (state [`LogState::Finished`]) for retention.
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
    /// Finished jobs' log records in one of `states` whose job ended before `before`
    /// (any time when `None`), the earliest ended first (then by job id), at most `limit`.
    fn finished_logs(
        &self,
        states: &[LogState],
        before: Option<SystemTime>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, Error>;
    /// One job's log record (`None` while the job has not ended, or is unknown).
    fn log_record(&self, id: &JobId) -> Result<Option<LogRecord>, Error>;
    /// Replaces the state and sizes of log records, atomically; a record whose job is
    /// not in the store is ignored.
    fn put_log_records(&self, records: &[LogRecord]) -> Result<(), Error>;
    /// Totals of all log records by state.
    fn log_totals(&self) -> Result<LogTotals, Error>;
    /// Deletes jobs with everything stored about them (attempts, transitions, log
    /// record), atomically; returns how many there were.
    fn delete_jobs(&self, ids: &[JobId]) -> Result<usize, Error>;
    /// Deletes the oldest audit entries by sequence number that are older than `before`,
    /// at most `limit`, stopping at the first that is not (entries are appended in time
    /// order); returns how many.
    fn delete_audit_before(&self, before: SystemTime, limit: usize) -> Result<usize, Error>;
    /// Gives part of the space of deleted records back to the system where the store can
    /// and where enough is free to be worth it (SQLite: a bounded incremental vacuum and
    /// a checkpoint of its write-ahead log, once a quarter of the file is free). Returns
    /// true when more is left to give back: called again until false. Default: nothing.
    fn compact(&self) -> Result<bool, Error> {
        Ok(false)
    }
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
    audit_seq: u64,
    logs: BTreeMap<JobId, LogRecord>,
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
        if record.state.is_terminal() && !m.logs.contains_key(&record.id) {
            let at = record.finished_at.unwrap_or_else(SystemTime::now);
            m.logs.insert(
                record.id.clone(),
                LogRecord::finished(record.id.clone(), at),
            );
        }
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
        m.audit_seq += 1;
        let seq = m.audit_seq;
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

    fn finished_logs(
        &self,
        states: &[LogState],
        before: Option<SystemTime>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, Error> {
        let m = self.inner.lock().expect("store");
        let mut all: Vec<&LogRecord> = m
            .logs
            .values()
            .filter(|l| states.contains(&l.state) && before.is_none_or(|b| l.finished_at < b))
            .collect();
        all.sort_by(|a, b| (a.finished_at, &a.job_id).cmp(&(b.finished_at, &b.job_id)));
        Ok(all.into_iter().take(limit).cloned().collect())
    }

    fn log_record(&self, id: &JobId) -> Result<Option<LogRecord>, Error> {
        Ok(self.inner.lock().expect("store").logs.get(id).cloned())
    }

    fn put_log_records(&self, records: &[LogRecord]) -> Result<(), Error> {
        let mut m = self.inner.lock().expect("store");
        for r in records {
            if let Some(l) = m.logs.get_mut(&r.job_id) {
                l.state = r.state;
                l.bytes = r.bytes;
                l.original = r.original;
            }
        }
        Ok(())
    }

    fn log_totals(&self) -> Result<LogTotals, Error> {
        let m = self.inner.lock().expect("store");
        let mut t = LogTotals::default();
        for l in m.logs.values() {
            let e = t.by_state.entry(l.state).or_default();
            e.0 += 1;
            e.1 += l.bytes;
            e.2 += l.original;
        }
        Ok(t)
    }

    fn delete_jobs(&self, ids: &[JobId]) -> Result<usize, Error> {
        let mut m = self.inner.lock().expect("store");
        let mut n = 0;
        for id in ids {
            if let Some((seq, _, _)) = m.jobs.remove(id) {
                m.order.remove(&seq);
                n += 1;
            }
            m.logs.remove(id);
        }
        Ok(n)
    }

    fn delete_audit_before(&self, before: SystemTime, limit: usize) -> Result<usize, Error> {
        let mut m = self.inner.lock().expect("store");
        let n = m
            .audit
            .iter()
            .take(limit)
            .take_while(|e| e.at < before)
            .count();
        m.audit.drain(..n);
        Ok(n)
    }
}
