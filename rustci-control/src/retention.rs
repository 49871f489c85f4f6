//! Retention: finished jobs' logs compressed after a while and deleted past an age or a
//! total size (the oldest first), job records and audit entries deleted past their own
//! ages, all in bounded batches by a background task of the control plane.
//!
//! Only finished jobs' logs are touched: a job gets its [`LogRecord`] when it ends, and a
//! log still open for writing is skipped. Each batch is one store call of at most
//! [`RetentionOptions::batch`] records and their files, run on a blocking thread, so
//! dispatch waits at most for one batch's store write.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::logs::LogHub;
use crate::store::{LogRecord, LogState, LogTotals, Store};
use rustci_runners::runner::JobId;

const DAY: u64 = 24 * 3600;

/// What retention keeps and for how long (`ControlOptions::retention`, the server's
/// `retention` section). Ages count from a job's end. By default logs are compressed a
/// day after their job ended and nothing is deleted: the limits are the operator's to set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RetentionOptions {
    /// Run at all. Default true.
    pub enabled: bool,
    /// Seconds between passes (the first pass runs at start). Default 600.
    pub interval_secs: u64,
    /// Compress logs of jobs that ended longer ago than this many seconds (zstd, read
    /// back the same through every route); `null`: never. Default 86400 (a day).
    pub compress_after_secs: Option<u64>,
    /// Delete logs of jobs that ended longer ago than this many seconds; the job's record
    /// stays, and its log answers `LOG_EXPIRED`. `null` (the default): no age limit.
    pub log_max_age_secs: Option<u64>,
    /// Delete the oldest finished logs while all finished logs together take more than
    /// this many bytes in storage (compressed ones at their compressed size); `null`: no
    /// size limit. Default `null`.
    pub log_max_bytes: Option<u64>,
    /// Delete job records (attempts, transitions and log included) of jobs that ended
    /// longer ago than this many seconds; `null` (the default): keep them. At least
    /// `log_max_age_secs`.
    pub job_max_age_secs: Option<u64>,
    /// Delete audit entries older than this many seconds; `null` (the default): keep
    /// them.
    pub audit_max_age_secs: Option<u64>,
    /// Records per batch (1 to 10000). Default 500.
    pub batch: usize,
    /// Bytes of logs one batch compresses at most (a larger log is compressed alone).
    /// Default 67108864 (64 MiB).
    pub batch_bytes: u64,
}

impl Default for RetentionOptions {
    fn default() -> Self {
        RetentionOptions {
            enabled: true,
            interval_secs: 600,
            compress_after_secs: Some(DAY),
            log_max_age_secs: None,
            log_max_bytes: None,
            job_max_age_secs: None,
            audit_max_age_secs: None,
            batch: 500,
            batch_bytes: 64 << 20,
        }
    }
}

impl RetentionOptions {
    /// Checks the values: an interval of at least a second, a batch of 1 to 10000, job
    /// records kept at least as long as logs.
    pub fn check(&self) -> Result<(), String> {
        if self.interval_secs == 0 {
            return Err("retention.interval_secs: at least 1".into());
        }
        if !(1..=10_000).contains(&self.batch) {
            return Err("retention.batch: between 1 and 10000".into());
        }
        if let (Some(jobs), Some(logs)) = (self.job_max_age_secs, self.log_max_age_secs)
            && jobs < logs
        {
            return Err(format!(
                "retention.job_max_age_secs ({jobs}) is below retention.log_max_age_secs ({logs}): \
                 job records are kept at least as long as their logs"
            ));
        }
        Ok(())
    }

    /// Seconds between passes.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs.max(1))
    }
}

/// What one retention pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionReport {
    /// Finished logs measured (their size recorded).
    pub measured: u64,
    /// Logs compressed.
    pub compressed: u64,
    /// Their bytes before compression.
    pub compressed_from: u64,
    /// Their bytes after.
    pub compressed_to: u64,
    /// Logs deleted (by age or total size), their jobs' records kept.
    pub expired: u64,
    /// Bytes in storage those logs took.
    pub expired_bytes: u64,
    /// Job records deleted, with their logs.
    pub jobs_deleted: u64,
    /// Bytes in storage the logs of those jobs took.
    pub jobs_deleted_bytes: u64,
    /// Audit entries deleted.
    pub audit_deleted: u64,
    /// Batches run.
    pub batches: u64,
    /// Logs found open for writing and left for a later pass.
    pub skipped_open: u64,
    /// Logs whose file could not be read, compressed or deleted (each logged).
    pub errors: u64,
    /// Longest batch.
    pub longest_batch: Duration,
    /// The most records one batch measured, compressed, expired or deleted (at most
    /// [`RetentionOptions::batch`]).
    pub most_in_a_batch: usize,
    /// Finished logs by state after the pass.
    pub totals: LogTotals,
}

/// Runs `f` (one batch) on a blocking thread, timing it into `report`.
async fn batch<T: Send + 'static>(
    report: &mut RetentionReport,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Config(format!("a retention batch panicked: {e}")))?;
    report.batches += 1;
    report.longest_batch = report.longest_batch.max(started.elapsed());
    out
}

fn before(now: SystemTime, secs: u64) -> SystemTime {
    now.checked_sub(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// What a batch did: records changed (0 ends a phase), and its figures.
#[derive(Default)]
struct Done {
    progress: usize,
    seen: usize,
    report: RetentionReport,
}

fn merge(into: &mut RetentionReport, d: &RetentionReport) {
    into.measured += d.measured;
    into.compressed += d.compressed;
    into.compressed_from += d.compressed_from;
    into.compressed_to += d.compressed_to;
    into.expired += d.expired;
    into.expired_bytes += d.expired_bytes;
    into.jobs_deleted += d.jobs_deleted;
    into.jobs_deleted_bytes += d.jobs_deleted_bytes;
    into.audit_deleted += d.audit_deleted;
    into.skipped_open += d.skipped_open;
    into.errors += d.errors;
    into.most_in_a_batch = into.most_in_a_batch.max(d.most_in_a_batch);
}

fn measure(store: &dyn Store, logs: &LogHub, limit: usize) -> Result<Done, Error> {
    let rows = store.finished_logs(&[LogState::Finished], None, limit)?;
    let mut done = Done {
        seen: rows.len(),
        ..Done::default()
    };
    let mut updates = Vec::new();
    for mut r in rows {
        match logs.stored(&r.job_id) {
            Ok(Some(s)) => {
                r.state = if s.compressed {
                    LogState::Compressed
                } else {
                    LogState::Plain
                };
                (r.bytes, r.original) = (s.bytes, s.original);
                updates.push(r);
            }
            Ok(None) => done.report.skipped_open += 1,
            Err(e) => {
                tracing::error!(job_id = %r.job_id, error = %rustci_runners::error::Chain(&e), "retention: measuring a log");
                done.report.errors += 1;
            }
        }
    }
    store.put_log_records(&updates)?;
    done.progress = updates.len();
    done.report.measured = updates.len() as u64;
    done.report.most_in_a_batch = updates.len();
    Ok(done)
}

fn compress(
    store: &dyn Store,
    logs: &LogHub,
    cutoff: SystemTime,
    limit: usize,
    max_bytes: u64,
    after: &std::sync::Mutex<Option<(SystemTime, JobId)>>,
) -> Result<Done, Error> {
    let mut rows = store.finished_logs(&[LogState::Plain], Some(cutoff), limit)?;
    let mut done = Done {
        seen: rows.len(),
        ..Done::default()
    };
    // Past the logs this pass tried already: one that fails stays plain for the next
    // pass and does not hold up the rest.
    let mut after = after.lock().expect("cursor");
    if let Some(last) = &*after {
        rows.retain(|r| (r.finished_at, &r.job_id) > (last.0, &last.1));
    }
    // At most `max_bytes` of logs (at least one log) per batch; the rest in the next.
    let mut bytes = 0u64;
    let fits = rows
        .iter()
        .position(|r| {
            bytes += r.bytes;
            bytes > max_bytes
        })
        .map_or(rows.len(), |i| i.max(1));
    if fits < rows.len() {
        rows.truncate(fits);
        done.seen = limit;
    }
    if let Some(last) = rows.last() {
        *after = Some((last.finished_at, last.job_id.clone()));
    }
    let ids: Vec<JobId> = rows.iter().map(|r| r.job_id.clone()).collect();
    let results = logs.compress(&ids);
    let mut updates = Vec::new();
    for (mut r, result) in rows.into_iter().zip(results) {
        match result {
            Ok(Some(s)) => {
                if s.compressed {
                    done.report.compressed += 1;
                    done.report.compressed_from += s.original;
                    done.report.compressed_to += s.bytes;
                }
                // An empty log has nothing to compress: it is done all the same.
                r.state = LogState::Compressed;
                (r.bytes, r.original) = (s.bytes, s.original);
                updates.push(r);
            }
            Ok(None) => done.report.skipped_open += 1,
            Err(e) => {
                tracing::error!(job_id = %r.job_id, error = %rustci_runners::error::Chain(&e), "retention: compressing a log");
                done.report.errors += 1;
            }
        }
    }
    store.put_log_records(&updates)?;
    // Progress is what was tried: failures are behind the cursor.
    done.progress = ids.len();
    done.report.most_in_a_batch = updates.len();
    Ok(done)
}

/// Expires the logs of `rows` (finished jobs' logs still kept), up to `enough` bytes
/// when given: recorded expiring first, so that a reader meanwhile gets `LOG_EXPIRED`
/// rather than an empty log, then their files deleted, then recorded expired. A log whose
/// removal did not finish stays expiring, and the next pass removes it
/// ([`finish_expiring`]).
fn expire(
    store: &dyn Store,
    logs: &LogHub,
    rows: Vec<LogRecord>,
    mut enough: Option<u64>,
) -> Result<Done, Error> {
    let mut done = Done {
        seen: rows.len(),
        ..Done::default()
    };
    let mut going = Vec::new();
    for mut r in rows {
        if enough == Some(0) {
            break;
        }
        if logs.is_open(&r.job_id) {
            done.report.skipped_open += 1;
            continue;
        }
        if let Some(left) = &mut enough {
            *left = left.saturating_sub(r.bytes.max(1));
        }
        r.state = LogState::Expiring;
        going.push(r);
    }
    store.put_log_records(&going)?;
    done.progress = going.len();
    done.report.most_in_a_batch = going.len();
    let gone = remove_logs(logs, going, &mut done.report);
    mark_expired(store, gone, &mut done.report)?;
    Ok(done)
}

/// Records the logs of `gone` (their files removed) expired, counting them.
fn mark_expired(
    store: &dyn Store,
    gone: Vec<LogRecord>,
    report: &mut RetentionReport,
) -> Result<(), Error> {
    report.expired += gone.len() as u64;
    report.expired_bytes += gone.iter().map(|r| r.bytes).sum::<u64>();
    let gone: Vec<LogRecord> = gone
        .into_iter()
        .map(|mut r| {
            r.state = LogState::Expired;
            r.bytes = 0;
            r
        })
        .collect();
    store.put_log_records(&gone)
}

/// Removes the files of `rows`; returns those removed (the rest are counted as errors).
fn remove_logs(
    logs: &LogHub,
    rows: Vec<LogRecord>,
    report: &mut RetentionReport,
) -> Vec<LogRecord> {
    let mut gone = Vec::with_capacity(rows.len());
    for r in rows {
        match logs.remove(&r.job_id) {
            Ok(_) => gone.push(r),
            Err(e) => {
                tracing::error!(job_id = %r.job_id, error = %rustci_runners::error::Chain(&e), "retention: deleting a log");
                report.errors += 1;
            }
        }
    }
    gone
}

/// Removes what an earlier expiry left (a crash or a failed removal between recording a
/// log expiring and its files going).
fn finish_expiring(store: &dyn Store, logs: &LogHub, limit: usize) -> Result<Done, Error> {
    let rows = store.finished_logs(&[LogState::Expiring], None, limit)?;
    let mut done = Done {
        seen: rows.len(),
        ..Done::default()
    };
    let gone = remove_logs(logs, rows, &mut done.report);
    done.progress = gone.len();
    done.report.most_in_a_batch = gone.len();
    mark_expired(store, gone, &mut done.report)?;
    Ok(done)
}

const KEPT: [LogState; 3] = [LogState::Finished, LogState::Plain, LogState::Compressed];

fn delete_jobs(
    store: &dyn Store,
    logs: &LogHub,
    cutoff: SystemTime,
    limit: usize,
) -> Result<Done, Error> {
    let rows = store.finished_logs(&LogState::ALL, Some(cutoff), limit)?;
    let mut done = Done {
        seen: rows.len(),
        ..Done::default()
    };
    let mut going = Vec::new();
    for r in rows {
        if logs.is_open(&r.job_id) {
            done.report.skipped_open += 1;
            continue;
        }
        going.push(r);
    }
    // Expiring first (a reader meanwhile gets `LOG_EXPIRED`), then the files, then the
    // records: a crash between leaves records the next pass finishes.
    let expiring: Vec<LogRecord> = going
        .iter()
        .filter(|r| r.state.is_kept())
        .map(|r| {
            let mut r = r.clone();
            r.state = LogState::Expiring;
            r
        })
        .collect();
    store.put_log_records(&expiring)?;
    let gone = remove_logs(logs, going, &mut done.report);
    done.report.jobs_deleted_bytes += gone.iter().map(|r| r.bytes).sum::<u64>();
    let ids: Vec<JobId> = gone.into_iter().map(|r| r.job_id).collect();
    let n = store.delete_jobs(&ids)?;
    done.report.jobs_deleted = n as u64;
    done.progress = ids.len();
    done.report.most_in_a_batch = ids.len();
    Ok(done)
}

/// One pass of every phase, as of `now`, each in batches until it has nothing left or
/// makes no progress; stops between batches when `stop` is cancelled.
pub(crate) async fn pass(
    store: Arc<dyn Store>,
    logs: LogHub,
    o: &RetentionOptions,
    now: SystemTime,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<RetentionReport, Error> {
    o.check().map_err(Error::Config)?;
    let mut report = RetentionReport::default();
    let limit = o.batch;
    type Phase = Box<dyn Fn(&dyn Store, &LogHub) -> Result<Done, Error> + Send + Sync>;
    let mut phases: Vec<Phase> = vec![
        Box::new(move |s, l| measure(s, l, limit)),
        Box::new(move |s, l| finish_expiring(s, l, limit)),
    ];
    if let Some(secs) = o.compress_after_secs {
        let cutoff = before(now, secs);
        let max_bytes = o.batch_bytes;
        let after = std::sync::Mutex::new(None);
        phases.push(Box::new(move |s, l| {
            compress(s, l, cutoff, limit, max_bytes, &after)
        }));
    }
    if let Some(secs) = o.log_max_age_secs {
        let cutoff = before(now, secs);
        phases.push(Box::new(move |s, l| {
            let rows = s.finished_logs(&KEPT, Some(cutoff), limit)?;
            expire(s, l, rows, None)
        }));
    }
    if let Some(max) = o.log_max_bytes {
        phases.push(Box::new(move |s, l| {
            let stored = s.log_totals()?.stored_bytes();
            if stored <= max {
                return Ok(Done::default());
            }
            let rows = s.finished_logs(&KEPT, None, limit)?;
            let mut d = expire(s, l, rows, Some(stored - max))?;
            // More may be needed: the next batch looks again.
            d.seen = limit;
            Ok(d)
        }));
    }
    if let Some(secs) = o.job_max_age_secs {
        let cutoff = before(now, secs);
        phases.push(Box::new(move |s, l| delete_jobs(s, l, cutoff, limit)));
    }
    if let Some(secs) = o.audit_max_age_secs {
        let cutoff = before(now, secs);
        phases.push(Box::new(move |s, _| {
            let n = s.delete_audit_before(cutoff, limit)?;
            let mut d = Done {
                progress: n,
                seen: n,
                ..Done::default()
            };
            d.report.audit_deleted = n as u64;
            d.report.most_in_a_batch = n;
            Ok(d)
        }));
    }
    let phases: Vec<Arc<Phase>> = phases.into_iter().map(Arc::new).collect();
    for phase in phases {
        loop {
            if stop.is_cancelled() {
                return Ok(report);
            }
            let (s, l, p) = (store.clone(), logs.clone(), phase.clone());
            let done = batch(&mut report, move || p(&*s, &l)).await?;
            merge(&mut report, &done.report);
            if done.progress == 0 || done.seen < limit {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    if report.jobs_deleted > 0 || report.audit_deleted > 0 {
        loop {
            let s = store.clone();
            if stop.is_cancelled() || !batch(&mut report, move || s.compact()).await? {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    let s = store.clone();
    report.totals = batch(&mut report, move || s.log_totals()).await?;
    Ok(report)
}
