//! [`SqliteStore`]: the control plane's state in one SQLite file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;

use crate::Error;
use crate::dispatcher::{JobRecord, JobState};
use crate::store::{
    AuditEntry, JobPage, JobQuery, LogRecord, LogState, LogTotals, RunnerRecord, Store, Transition,
};
use rustci_runners::runner::JobId;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    submitter    TEXT NOT NULL,
    state        TEXT NOT NULL,
    submitted_at INTEGER NOT NULL,
    record       TEXT NOT NULL,
    transitions  TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_submitter ON jobs(submitter, seq);
CREATE TABLE IF NOT EXISTS attempts (
    job_id     TEXT NOT NULL,
    number     INTEGER NOT NULL,
    runner_id  TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    outcome    TEXT,
    PRIMARY KEY (job_id, number)
);
CREATE INDEX IF NOT EXISTS attempts_runner ON attempts(runner_id, job_id);
CREATE TABLE IF NOT EXISTS runners (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL,
    config        TEXT NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    result     TEXT NOT NULL,
    request_id TEXT
);
CREATE TABLE IF NOT EXISTS logs (
    job_id      TEXT PRIMARY KEY,
    finished_at INTEGER NOT NULL,
    state       TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    original    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_state ON logs(state, finished_at, job_id);
CREATE INDEX IF NOT EXISTS logs_finished ON logs(finished_at, job_id);
CREATE TABLE IF NOT EXISTS log_totals (
    state    TEXT PRIMARY KEY,
    n        INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    original INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS logs_added AFTER INSERT ON logs BEGIN
    INSERT INTO log_totals (state, n, bytes, original) VALUES (NEW.state, 1, NEW.bytes, NEW.original)
    ON CONFLICT(state) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes,
                                     original = original + excluded.original;
END;
CREATE TRIGGER IF NOT EXISTS logs_removed AFTER DELETE ON logs BEGIN
    UPDATE log_totals SET n = n - 1, bytes = bytes - OLD.bytes, original = original - OLD.original
    WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS logs_changed AFTER UPDATE ON logs BEGIN
    UPDATE log_totals SET n = n - 1, bytes = bytes - OLD.bytes, original = original - OLD.original
    WHERE state = OLD.state;
    INSERT INTO log_totals (state, n, bytes, original) VALUES (NEW.state, 1, NEW.bytes, NEW.original)
    ON CONFLICT(state) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes,
                                     original = original + excluded.original;
END;
";

/// Pages one `compact` call gives back at most (4 KiB each): bounds how long it holds
/// the database.
const COMPACT_PAGES: i64 = 2048;

/// The schema's version (`PRAGMA user_version`): 1 added the `logs` table (retention)
/// and incremental vacuum; 2 the running totals of `logs` by state (`log_totals`, kept by
/// triggers, recounted at every open); 3 moved each job's state transitions from a table
/// of their own into the job's row (`jobs.transitions`, a JSON array), two pages fewer
/// written per state change.
const VERSION: i64 = 3;

/// Write-ahead log frames (pages) after which a checkpoint copies them into the database.
const CHECKPOINT_PAGES: i32 = 1000;

/// A [`Store`] in one SQLite database file (write-ahead log, synchronous=NORMAL: a
/// killed process loses no committed write). Checkpoints, which copy the write-ahead log
/// into the database file and flush it, run on a thread of their own with its own
/// connection, so that writes seldom wait for one: only when the log passes eight times
/// the threshold does a write finish the checkpoint itself.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    checkpoints: Checkpointer,
}

/// The checkpoint thread: woken after a commit leaves the log past [`CHECKPOINT_PAGES`];
/// ends when the store is dropped.
struct Checkpointer {
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Held by whoever checkpoints (the thread, the writer, `compact`): one at a time.
    running: Arc<Mutex<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.wake.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Checkpointer {
    fn start(
        path: &Path,
        writer: &mut Connection,
    ) -> Result<Checkpointer, Box<dyn std::error::Error + Send + Sync>> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let hint = wake.clone();
        let running = Arc::new(Mutex::new(()));
        let inline = running.clone();
        // Replaces the automatic checkpoint of the writing connection. Under a steady
        // stream of writes a checkpoint running beside them never reaches the log's end,
        // and the log restarts only after one that does: past eight times the threshold
        // the writer finishes the copy itself (what the thread copied is not copied
        // again), which bounds the log.
        writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
            if pages >= 8 * CHECKPOINT_PAGES {
                // After the thread's checkpoint, if one runs (it never waits for the store).
                let _one = inline.lock().expect("checkpoint");
                // Passive, the default mode.
                let _ = wal.checkpoint();
            } else if pages >= CHECKPOINT_PAGES {
                let _ = hint.try_send(());
            }
            Ok(())
        }))?;
        let shown = path.display().to_string();
        let mine = running.clone();
        let thread = std::thread::Builder::new()
            .name("rustci-sqlite-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let _one = mine.lock().expect("checkpoint");
                    // PASSIVE: copies what it can without waiting for the writer.
                    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    if let Err(e) = done {
                        tracing::warn!(database = %shown, error = %e, "checkpoint of the write-ahead log failed");
                    }
                }
            })?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
            running,
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The hook holds a sender of the checkpoint thread's channel: gone before the
        // thread is joined, whatever the order of the fields.
        if let Ok(conn) = self.conn.get_mut() {
            let _ =
                conn.wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn db_err(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::Store {
        store: path.display().to_string(),
        context: what.to_string(),
        source: Box::new(e),
    }
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Creates the schema, or brings an older one up to [`VERSION`].
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 1 {
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        // Deleted records' pages go back to the system at each `compact`; a database
        // made before this needs one full vacuum to change mode (once, at the first
        // start of this version: it rewrites the file).
        let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
        // 2: incremental already (a migration that stopped after its vacuum).
        if pages > 0 && mode != 2 {
            conn.execute_batch("VACUUM")?;
        }
    }
    if version < 3 {
        let has_column: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'transitions'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        let jobs_exist: bool = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if jobs_exist && !has_column {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN transitions TEXT NOT NULL DEFAULT '[]'",
            )?;
        }
        let old_table: bool = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'transitions'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if old_table {
            conn.execute_batch(
                "BEGIN;
                 UPDATE jobs SET transitions = COALESCE(
                     (SELECT json_group_array(json_object('state', t.state, 'at', t.at) ORDER BY t.rowid)
                      FROM transitions t WHERE t.job_id = jobs.id),
                     '[]');
                 DROP TABLE transitions;
                 COMMIT;",
            )?;
        }
    }
    conn.execute_batch(SCHEMA)?;
    if version < 1 {
        // Jobs that ended before retention existed are tracked from now on.
        conn.execute(
            "INSERT OR IGNORE INTO logs (job_id, finished_at, state, bytes, original)
             SELECT id, COALESCE(json_extract(record, '$.finished_at'), submitted_at), 'finished', 0, 0
             FROM jobs WHERE state NOT IN ('queued', 'assigned', 'running')",
            [],
        )?;
    }
    // The running totals, recounted at every start: the triggers keep them from here.
    conn.execute_batch(
        "BEGIN;
         DELETE FROM log_totals;
         INSERT INTO log_totals (state, n, bytes, original)
             SELECT state, COUNT(*), SUM(bytes), SUM(original) FROM logs GROUP BY state;
         COMMIT;",
    )?;
    if version < VERSION {
        conn.execute_batch(&format!("PRAGMA user_version = {VERSION}"))?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating when absent) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path).map_err(|e| db_err(&path, "opening the database", e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| db_err(&path, "opening the database", e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA journal_size_limit=67108864;",
        )
            .map_err(|e| db_err(&path, "opening the database", e))?;
        migrate(&conn)
            .map_err(|e| db_err(&path, "bringing the database's schema up to date", e))?;
        // Room for every statement this store prepares.
        conn.set_prepared_statement_cache_capacity(64);
        let mut conn = conn;
        let checkpoints = Checkpointer::start(&path, &mut conn).map_err(|source| Error::Store {
            store: path.display().to_string(),
            context: "starting the checkpoint thread".into(),
            source,
        })?;
        Ok(SqliteStore {
            path,
            conn: Mutex::new(conn),
            checkpoints,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: rusqlite::Error) -> Error {
        db_err(&self.path, what, e)
    }

    fn decode(&self, text: &str) -> Result<JobRecord, Error> {
        serde_json::from_str(text).map_err(|e| Error::Store {
            store: self.path.display().to_string(),
            context: "a job record does not decode".into(),
            source: Box::new(e),
        })
    }

    fn write_job(&self, record: &JobRecord) -> Result<(), Error> {
        let text = serde_json::to_string(record).map_err(|e| Error::Store {
            store: self.path.display().to_string(),
            context: "a job record does not encode".into(),
            source: Box::new(e),
        })?;
        let mut conn = self.conn.lock().expect("store");
        let tx = conn
            .transaction()
            .map_err(|e| self.err("writing a job record", e))?;
        let state = record.state.as_str();
        // Statements prepared once per connection: parsing them each time was most of a
        // write's cost.
        let what = "writing a job record";
        // A state different from the stored one adds a transition to the row.
        tx.prepare_cached(
            "INSERT INTO jobs (id, name, submitter, state, submitted_at, record, transitions)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, json_array(json_object('state', ?4, 'at', ?7)))
             ON CONFLICT(id) DO UPDATE SET
                 transitions = CASE WHEN jobs.state IS excluded.state THEN jobs.transitions
                     ELSE json_insert(jobs.transitions, '$[#]',
                                      json_object('state', excluded.state, 'at', ?7)) END,
                 state = excluded.state,
                 record = excluded.record",
        )
        .and_then(|mut s| {
            s.execute(params![
                record.id.as_str(),
                record.job.name,
                record.submitter,
                state,
                millis(record.submitted_at),
                text,
                millis(SystemTime::now())
            ])
        })
        .map_err(|e| self.err(what, e))?;
        for a in &record.attempts {
            let outcome = a
                .outcome
                .as_ref()
                .and_then(|o| serde_json::to_string(o).ok());
            tx.prepare_cached(
                "INSERT INTO attempts (job_id, number, runner_id, started_at, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(job_id, number) DO UPDATE SET outcome = excluded.outcome
                 WHERE outcome IS NOT excluded.outcome",
            )
            .and_then(|mut s| {
                s.execute(params![
                    record.id.as_str(),
                    a.number,
                    a.runner_id,
                    millis(a.started_at),
                    outcome
                ])
            })
            .map_err(|e| self.err(what, e))?;
        }
        if record.state.is_terminal() {
            // The first time only: a put again of an ended job keeps its log record.
            let at = record.finished_at.unwrap_or_else(SystemTime::now);
            tx.prepare_cached(
                "INSERT OR IGNORE INTO logs (job_id, finished_at, state, bytes, original)
                 VALUES (?1, ?2, 'finished', 0, 0)",
            )
            .and_then(|mut s| s.execute(params![record.id.as_str(), millis(at)]))
            .map_err(|e| self.err(what, e))?;
        }
        tx.commit().map_err(|e| self.err("writing a job record", e))
    }
}

impl Store for SqliteStore {
    fn put_job(&self, record: &JobRecord) -> Result<(), Error> {
        self.write_job(record)
    }

    fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>, Error> {
        let text: Option<String> = {
            let conn = self.conn.lock().expect("store");
            conn.prepare_cached("SELECT record FROM jobs WHERE id = ?1")
                .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
                .map_err(|e| self.err("reading a job record", e))?
        };
        text.map(|t| self.decode(&t)).transpose()
    }

    fn list_jobs(&self, query: &JobQuery) -> Result<JobPage, Error> {
        let limit = query.effective_limit();
        let rows: Vec<(i64, String)> = {
            let conn = self.conn.lock().expect("store");
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, record FROM jobs
                     WHERE seq < ?1
                       AND (?2 IS NULL OR state = ?2)
                       AND (?3 IS NULL OR submitter = ?3)
                       AND (?4 IS NULL OR name = ?4)
                       AND (?6 IS NULL OR EXISTS (SELECT 1 FROM attempts
                                                  WHERE runner_id = ?6 AND job_id = jobs.id))
                     ORDER BY seq DESC LIMIT ?5",
                )
                .map_err(|e| self.err("listing jobs", e))?;
            let before = query.before.map(|b| b as i64).unwrap_or(i64::MAX);
            stmt.query_map(
                params![
                    before,
                    query.state.map(JobState::as_str),
                    query.submitter,
                    query.name,
                    (limit + 1) as i64,
                    query.runner
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err("listing jobs", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("listing jobs", e))?
        };
        let mut page = JobPage::default();
        let more = rows.len() > limit;
        for (seq, text) in rows.into_iter().take(limit) {
            page.jobs.push(self.decode(&text)?);
            page.next = Some(seq as u64);
        }
        if !more {
            page.next = None;
        }
        Ok(page)
    }

    fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, Error> {
        let rows: Vec<String> = {
            let conn = self.conn.lock().expect("store");
            let mut stmt = conn
                .prepare(
                    "SELECT record FROM jobs WHERE state IN ('queued', 'assigned', 'running')
                     ORDER BY seq",
                )
                .map_err(|e| self.err("reading the unfinished jobs", e))?;
            stmt.query_map([], |r| r.get(0))
                .map_err(|e| self.err("reading the unfinished jobs", e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.err("reading the unfinished jobs", e))?
        };
        rows.iter().map(|t| self.decode(t)).collect()
    }

    fn transitions(&self, id: &JobId) -> Result<Vec<Transition>, Error> {
        let what = "reading a job's state transitions";
        let text: Option<String> = {
            let conn = self.conn.lock().expect("store");
            conn.prepare_cached("SELECT transitions FROM jobs WHERE id = ?1")
                .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
                .map_err(|e| self.err(what, e))?
        };
        #[derive(Deserialize)]
        struct Row {
            state: String,
            at: i64,
        }
        let rows: Vec<Row> = match text {
            Some(t) => serde_json::from_str(&t).map_err(|e| Error::Store {
                store: self.path.display().to_string(),
                context: format!("{what}: they do not decode"),
                source: Box::new(e),
            })?,
            None => Vec::new(),
        };
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                JobState::from_name(&r.state).map(|state| Transition {
                    state,
                    at: from_millis(r.at),
                })
            })
            .collect())
    }

    fn count_by_state(&self) -> Result<BTreeMap<JobState, u64>, Error> {
        let conn = self.conn.lock().expect("store");
        let mut stmt = conn
            .prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .map_err(|e| self.err("counting jobs by state", e))?;
        let rows: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err("counting jobs by state", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("counting jobs by state", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| JobState::from_name(&s).map(|st| (st, n as u64)))
            .collect())
    }

    fn put_runner(&self, record: &RunnerRecord) -> Result<(), Error> {
        let conn = self.conn.lock().expect("store");
        conn.execute(
            "INSERT INTO runners (id, name, kind, config, registered_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, kind = excluded.kind,
                                           config = excluded.config",
            params![
                record.id,
                record.name,
                record.kind,
                record.config.to_string(),
                millis(record.registered_at)
            ],
        )
        .map_err(|e| self.err("storing a runner registration", e))?;
        Ok(())
    }

    fn remove_runner(&self, id: &str) -> Result<bool, Error> {
        let conn = self.conn.lock().expect("store");
        let n = conn
            .execute("DELETE FROM runners WHERE id = ?1", [id])
            .map_err(|e| self.err("removing a runner registration", e))?;
        Ok(n > 0)
    }

    fn runners(&self) -> Result<Vec<RunnerRecord>, Error> {
        let conn = self.conn.lock().expect("store");
        let mut stmt = conn
            .prepare("SELECT id, name, kind, config, registered_at FROM runners ORDER BY registered_at, id")
            .map_err(|e| self.err("reading the runner registrations", e))?;
        let rows: Vec<(String, String, String, String, i64)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(|e| self.err("reading the runner registrations", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading the runner registrations", e))?;
        Ok(rows
            .into_iter()
            .map(|(id, name, kind, config, at)| RunnerRecord {
                id,
                name,
                kind,
                config: serde_json::from_str(&config).unwrap_or(serde_json::Value::Null),
                registered_at: from_millis(at),
            })
            .collect())
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<u64, Error> {
        let conn = self.conn.lock().expect("store");
        conn.prepare_cached(
            "INSERT INTO audit (at, actor, action, target, result, request_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                millis(entry.at),
                entry.actor,
                entry.action,
                entry.target,
                entry.result,
                entry.request_id
            ])
        })
        .map_err(|e| self.err("appending to the audit log", e))?;
        Ok(conn.last_insert_rowid() as u64)
    }

    fn audit(&self, before: Option<u64>, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        let conn = self.conn.lock().expect("store");
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at, actor, action, target, result, request_id FROM audit
                 WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(|e| self.err("reading the audit log", e))?;
        let before = before.map(|b| b as i64).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![before, limit as i64], |r| {
                Ok(AuditEntry {
                    seq: r.get::<_, i64>(0)? as u64,
                    at: from_millis(r.get(1)?),
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    result: r.get(5)?,
                    request_id: r.get(6)?,
                })
            })
            .map_err(|e| self.err("reading the audit log", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading the audit log", e))?;
        Ok(rows)
    }

    fn finished_logs(
        &self,
        states: &[LogState],
        before: Option<SystemTime>,
        limit: usize,
    ) -> Result<Vec<LogRecord>, Error> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let what = "reading the finished logs";
        // One query per state over its index, merged: the earliest `limit` of them all.
        let conn = self.conn.lock().expect("store");
        let mut stmt = conn
            .prepare_cached(
                "SELECT job_id, finished_at, bytes, original FROM logs
                 WHERE state = ?1 AND finished_at < ?2
                 ORDER BY finished_at, job_id LIMIT ?3",
            )
            .map_err(|e| self.err(what, e))?;
        let before = before.map_or(i64::MAX, millis);
        if LogState::ALL.iter().all(|s| states.contains(s)) {
            // Every state: one walk of the end-time index.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT job_id, finished_at, bytes, original, state FROM logs
                     WHERE finished_at < ?1 ORDER BY finished_at, job_id LIMIT ?2",
                )
                .map_err(|e| self.err(what, e))?;
            let rows = stmt
                .query_map(params![before, limit as i64], |r| {
                    Ok((
                        LogRecord::finished(
                            JobId::from(r.get::<_, String>(0)?),
                            from_millis(r.get(1)?),
                        ),
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .map_err(|e| self.err(what, e))?;
            let mut all = Vec::new();
            for row in rows {
                let (mut l, bytes, original, state) = row.map_err(|e| self.err(what, e))?;
                // A state this version does not know: taken as not yet measured.
                l.state = LogState::from_name(&state).unwrap_or(LogState::Finished);
                l.bytes = bytes.max(0) as u64;
                l.original = original.max(0) as u64;
                all.push(l);
            }
            return Ok(all);
        }
        let mut all = Vec::new();
        for state in states {
            let rows = stmt
                .query_map(params![state.as_str(), before, limit as i64], |r| {
                    Ok(LogRecord {
                        job_id: JobId::from(r.get::<_, String>(0)?),
                        finished_at: from_millis(r.get(1)?),
                        state: *state,
                        bytes: r.get::<_, i64>(2)?.max(0) as u64,
                        original: r.get::<_, i64>(3)?.max(0) as u64,
                    })
                })
                .map_err(|e| self.err(what, e))?;
            for row in rows {
                all.push(row.map_err(|e| self.err(what, e))?);
            }
        }
        all.sort_by(|a, b| (a.finished_at, &a.job_id).cmp(&(b.finished_at, &b.job_id)));
        all.truncate(limit);
        Ok(all)
    }

    fn log_record(&self, id: &JobId) -> Result<Option<LogRecord>, Error> {
        let conn = self.conn.lock().expect("store");
        let row: Option<(i64, String, i64, i64)> = conn
            .prepare_cached(
                "SELECT finished_at, state, bytes, original FROM logs WHERE job_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(|e| self.err("reading a log record", e))?;
        Ok(row.and_then(|(at, state, bytes, original)| {
            Some(LogRecord {
                job_id: id.clone(),
                finished_at: from_millis(at),
                state: LogState::from_name(&state)?,
                bytes: bytes.max(0) as u64,
                original: original.max(0) as u64,
            })
        }))
    }

    fn put_log_records(&self, records: &[LogRecord]) -> Result<(), Error> {
        let what = "writing log records";
        let mut conn = self.conn.lock().expect("store");
        let tx = conn.transaction().map_err(|e| self.err(what, e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE logs SET state = ?2, bytes = ?3, original = ?4 WHERE job_id = ?1",
                )
                .map_err(|e| self.err(what, e))?;
            for r in records {
                stmt.execute(params![
                    r.job_id.as_str(),
                    r.state.as_str(),
                    r.bytes as i64,
                    r.original as i64
                ])
                .map_err(|e| self.err(what, e))?;
            }
        }
        tx.commit().map_err(|e| self.err(what, e))
    }

    fn log_totals(&self) -> Result<LogTotals, Error> {
        let what = "adding up the logs";
        let conn = self.conn.lock().expect("store");
        let mut stmt = conn
            .prepare_cached("SELECT state, n, bytes, original FROM log_totals WHERE n > 0")
            .map_err(|e| self.err(what, e))?;
        let rows: Vec<(String, i64, i64, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(|e| self.err(what, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(what, e))?;
        let mut t = LogTotals::default();
        for (state, n, bytes, original) in rows {
            if let Some(s) = LogState::from_name(&state) {
                t.by_state
                    .insert(s, (n as u64, bytes.max(0) as u64, original.max(0) as u64));
            }
        }
        Ok(t)
    }

    fn delete_jobs(&self, ids: &[JobId]) -> Result<usize, Error> {
        let what = "deleting job records";
        let mut conn = self.conn.lock().expect("store");
        let tx = conn.transaction().map_err(|e| self.err(what, e))?;
        // Set-based: one statement per table for the whole batch.
        let list = serde_json::to_string(&ids.iter().map(JobId::as_str).collect::<Vec<_>>())
            .map_err(|e| Error::Store {
                store: self.path.display().to_string(),
                context: what.into(),
                source: Box::new(e),
            })?;
        let mut n = 0;
        for (i, sql) in [
            "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM attempts WHERE job_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM logs WHERE job_id IN (SELECT value FROM json_each(?1))",
        ]
        .into_iter()
        .enumerate()
        {
            let deleted = tx
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([&list]))
                .map_err(|e| self.err(what, e))?;
            if i == 0 {
                n = deleted;
            }
        }
        tx.commit().map_err(|e| self.err(what, e))?;
        Ok(n)
    }

    fn delete_audit_before(&self, before: SystemTime, limit: usize) -> Result<usize, Error> {
        let what = "deleting old audit entries";
        let conn = self.conn.lock().expect("store");
        // The oldest entries by sequence, up to the first that is not old: a walk of the
        // primary key, no scan of the table.
        let mut stmt = conn
            .prepare_cached("SELECT seq, at FROM audit ORDER BY seq LIMIT ?1")
            .map_err(|e| self.err(what, e))?;
        let rows: Vec<(i64, i64)> = stmt
            .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(what, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(what, e))?;
        let cutoff = millis(before);
        let Some(last) = rows.iter().take_while(|(_, at)| *at < cutoff).last() else {
            return Ok(0);
        };
        conn.execute("DELETE FROM audit WHERE seq <= ?1", [last.0])
            .map_err(|e| self.err(what, e))
    }

    fn compact(&self) -> Result<bool, Error> {
        let conn = self.conn.lock().expect("store");
        let what = "compacting the database";
        let count = |sql: &str| -> Result<i64, Error> {
            conn.query_row(sql, [], |r| r.get(0))
                .map_err(|e| self.err(what, e))
        };
        // 2: incremental. A file in another mode (changed by hand) has nothing to give.
        if count("PRAGMA auto_vacuum")? != 2 {
            return Ok(false);
        }
        let free = count("PRAGMA freelist_count")?;
        let pages = count("PRAGMA page_count")?;
        // Free pages are reused by new records: only a file at least a quarter free (and
        // at least 64 pages of it) is worth shrinking.
        if free < 64 || free * 4 < pages {
            return Ok(false);
        }
        // Each step of `incremental_vacuum` frees one page: stepped to its end.
        let run = |sql: &str| -> rusqlite::Result<()> {
            let mut stmt = conn.prepare(sql)?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        };
        run(&format!("PRAGMA incremental_vacuum({COMPACT_PAGES})"))
            .map_err(|e| self.err(what, e))?;
        {
            // Not beside the checkpoint thread's: the log is emptied and truncated.
            let _one = self.checkpoints.running.lock().expect("checkpoint");
            run("PRAGMA wal_checkpoint(TRUNCATE)").map_err(|e| self.err(what, e))?;
        }
        // More only when this step gave pages back and some are left.
        let left = count("PRAGMA freelist_count")?;
        Ok(left > 0 && left < free)
    }
}
