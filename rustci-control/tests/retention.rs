//! Retention: finished logs compressed then deleted oldest first, job records and audit
//! entries deleted past their ages, live logs never touched, state kept over a restart,
//! and a database file that gives deleted records' space back.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustci_control::{
    AuditEntry, ControlOptions, ControlPlane, JobRecord, JobState, LogRecord, LogState,
    MemoryStore, RegisterOptions, RetentionOptions, SqliteStore, Store,
};
use rustci_runners::{HostConfig, Job, JobId, LeastLoaded, LocalRunner, Runner, Step};
use serde_json::json;

const HOUR: u64 = 3600;

/// A second from now: a job that ended just now has ended "longer ago than 0 seconds"
/// (ages compare in whole milliseconds).
fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(1)
}

fn local() -> Arc<dyn Runner> {
    let mut c = HostConfig::named("local");
    c.max_concurrency = Some(4);
    Arc::new(LocalRunner::new(c).unwrap())
}

/// Options that do only what a test sets.
fn nothing() -> RetentionOptions {
    let mut o = RetentionOptions::default();
    o.compress_after_secs = None;
    o.log_max_age_secs = None;
    o.log_max_bytes = None;
    o.job_max_age_secs = None;
    o.audit_max_age_secs = None;
    o
}

fn durable(dir: &std::path::Path) -> ControlOptions {
    let store = SqliteStore::open(dir.join("state.db")).unwrap();
    ControlOptions::durable(Arc::new(store), dir.join("logs"))
}

/// A job printing `lines` numbered lines tagged with `tag`.
fn chatty(tag: &str, lines: usize) -> Job {
    Job::new(
        tag,
        vec![Step::run(format!(
            "i=0; while [ $i -lt {lines} ]; do echo \"{tag} line $i of the build output\"; i=$((i+1)); done"
        ))],
    )
}

fn expected(tag: &str, lines: usize) -> Vec<u8> {
    (0..lines)
        .flat_map(|i| format!("{tag} line {i} of the build output\n").into_bytes())
        .collect()
}

fn whole_log(cp: &ControlPlane, id: &JobId) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let chunk = cp.read_log(id, out.len() as u64, 10_000).unwrap();
        if chunk.is_empty() {
            return out;
        }
        out.extend_from_slice(&chunk);
    }
}

async fn followed(cp: &ControlPlane, id: &JobId, from: u64) -> Vec<u8> {
    let mut f = cp.follow_log(id, from).unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = f.next().await {
        out.extend_from_slice(&chunk.unwrap().data);
    }
    out
}

fn state_of(cp: &ControlPlane, id: &JobId) -> LogState {
    cp.log_record(id).unwrap().expect("a log record").state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_logs_are_compressed_then_deleted_oldest_first_and_live_ones_are_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::with_options(LeastLoaded, durable(dir.path())).unwrap();
    cp.register(local(), RegisterOptions::default());
    let lines = 600;
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = cp
            .submit(chatty(&format!("job{i}"), lines), "alice")
            .unwrap();
        assert_eq!(cp.wait(&id).await.unwrap().state, JobState::Succeeded);
        ids.push(id);
    }
    let plain = expected("job0", lines).len() as u64;
    assert_eq!(cp.log_len(&ids[0]), plain);
    assert!(cp.log_record(&ids[0]).unwrap().is_some());

    // A live job writing while retention runs: its log is never touched.
    let gate = dir.path().join("gate");
    let live = cp
        .submit(
            Job::new(
                "live",
                vec![Step::run(format!(
                    "echo before; while [ ! -e {} ]; do sleep 0.02; done; echo after",
                    gate.display()
                ))],
            ),
            "bob",
        )
        .unwrap();
    let mut follower = cp.follow_log(&live, 0).unwrap();
    let first = follower.next().await.unwrap().unwrap();
    assert_eq!(&first.data[..], b"before\n");
    assert!(
        cp.log_record(&live).unwrap().is_none(),
        "no record while running"
    );

    // Compression: everything that ended more than an hour before `now`.
    let now = SystemTime::now() + Duration::from_secs(2 * HOUR);
    let mut o = nothing();
    o.compress_after_secs = Some(HOUR);
    let r = cp.retain(&o, now).await.unwrap();
    assert_eq!((r.measured, r.compressed), (6, 6), "{r:?}");
    assert_eq!(r.compressed_from, 6 * plain);
    assert!(
        r.compressed_to * 4 < r.compressed_from,
        "build output compresses: {} to {}",
        r.compressed_from,
        r.compressed_to
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(state_of(&cp, id), LogState::Compressed);
        let want = expected(&format!("job{i}"), lines);
        assert_eq!(whole_log(&cp, id), want, "read back through read_log");
        assert_eq!(followed(&cp, id, 0).await, want, "read back by a follower");
        assert_eq!(
            followed(&cp, id, 1000).await,
            want[1000..],
            "from an offset"
        );
        assert_eq!(cp.log_len(id), want.len() as u64);
    }
    assert!(dir.path().join(format!("logs/{}.log.zst", ids[0])).exists());
    assert!(!dir.path().join(format!("logs/{}.log", ids[0])).exists());

    // A size limit that holds two compressed logs: the four oldest go.
    let each = r.compressed_to / 6;
    let mut o = nothing();
    o.log_max_bytes = Some(each * 2 + each / 2);
    let r = cp.retain(&o, now).await.unwrap();
    assert_eq!(r.expired, 4, "{r:?}");
    for (i, id) in ids.iter().enumerate() {
        let want = if i < 4 {
            LogState::Expired
        } else {
            LogState::Compressed
        };
        assert_eq!(state_of(&cp, id), want, "job{i}");
    }
    assert!(whole_log(&cp, &ids[0]).is_empty());
    assert!(!dir.path().join(format!("logs/{}.log.zst", ids[0])).exists());
    assert!(r.totals.stored_bytes() <= each * 2 + each / 2);
    assert!(cp.get(&ids[0]).is_some(), "the job's record stays");

    // Everything past any age and size: the live log still has all it wrote.
    let mut o = nothing();
    o.compress_after_secs = Some(0);
    o.log_max_age_secs = Some(0);
    o.log_max_bytes = Some(0);
    let r = cp.retain(&o, now).await.unwrap();
    assert_eq!(r.expired, 2, "{r:?}");
    std::fs::write(&gate, b"").unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = follower.next().await {
        rest.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(rest, b"after\n");
    assert_eq!(cp.wait(&live).await.unwrap().state, JobState::Succeeded);
    assert_eq!(whole_log(&cp, &live), b"before\nafter\n");
    assert_eq!(state_of(&cp, &live), LogState::Finished);
    cp.shutdown();
    drop(cp);

    // A restart keeps what retention did.
    let cp = ControlPlane::with_options(LeastLoaded, durable(dir.path())).unwrap();
    for id in &ids {
        assert_eq!(state_of(&cp, id), LogState::Expired);
    }
    assert_eq!(whole_log(&cp, &live), b"before\nafter\n");
    let mut o = nothing();
    o.compress_after_secs = Some(HOUR);
    let r = cp.retain(&o, now).await.unwrap();
    assert_eq!((r.measured, r.compressed, r.expired), (1, 1, 0), "{r:?}");
    assert_eq!(state_of(&cp, &live), LogState::Compressed);
    assert_eq!(whole_log(&cp, &live), b"before\nafter\n");
    let again = cp.retain(&o, now).await.unwrap();
    assert_eq!((again.measured, again.compressed), (0, 0), "nothing twice");
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_records_and_audit_entries_go_past_their_ages_in_batches() {
    for durable_store in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let options = if durable_store {
            durable(dir.path())
        } else {
            ControlOptions::default()
        };
        let cp = ControlPlane::with_options(LeastLoaded, options).unwrap();
        cp.register(local(), RegisterOptions::default());
        let mut ids = Vec::new();
        for i in 0..5 {
            let id = cp.submit(chatty(&format!("j{i}"), 3), "alice").unwrap();
            cp.wait(&id).await.unwrap();
            ids.push(id);
        }
        for i in 0..7 {
            let mut e = AuditEntry::new("key:admin", "job.submit", None, "ok", None);
            e.at = UNIX_EPOCH + Duration::from_secs(1_000 + i);
            cp.store().append_audit(&e).unwrap();
        }
        cp.store()
            .append_audit(&AuditEntry::new(
                "key:admin",
                "job.submit",
                None,
                "ok",
                None,
            ))
            .unwrap();
        let mut o = nothing();
        o.job_max_age_secs = Some(HOUR);
        o.audit_max_age_secs = Some(HOUR);
        o.batch = 2;
        // Not yet an hour old: nothing goes but the old audit entries.
        let r = cp.retain(&o, SystemTime::now()).await.unwrap();
        assert_eq!((r.jobs_deleted, r.audit_deleted), (0, 7), "{r:?}");
        assert_eq!(cp.store().audit(None, 100).unwrap().len(), 1);
        let r = cp
            .retain(&o, SystemTime::now() + Duration::from_secs(2 * HOUR))
            .await
            .unwrap();
        assert_eq!(r.jobs_deleted, 5, "{r:?}");
        assert_eq!(r.most_in_a_batch, 2, "five jobs in batches of two: {r:?}");
        for id in &ids {
            assert!(cp.get(id).is_none());
            assert!(cp.store().transitions(id).unwrap().is_empty());
            assert!(cp.log_record(id).unwrap().is_none());
            assert_eq!(cp.log_len(id), 0);
        }
        if durable_store {
            let left: Vec<_> = std::fs::read_dir(dir.path().join("logs"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(left.is_empty(), "log files left: {left:?}");
        }
        cp.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_memory_are_compressed_and_expired_the_same() {
    let cp = ControlPlane::new(LeastLoaded, Duration::from_secs(3600));
    cp.register(local(), RegisterOptions::default());
    let id = cp.submit(chatty("mem", 2000), "alice").unwrap();
    cp.wait(&id).await.unwrap();
    let want = expected("mem", 2000);
    let mut o = nothing();
    o.compress_after_secs = Some(0);
    let r = cp.retain(&o, later()).await.unwrap();
    assert_eq!(r.compressed, 1, "{r:?}");
    assert!(r.compressed_to * 4 < want.len() as u64);
    assert_eq!(whole_log(&cp, &id), want);
    assert_eq!(followed(&cp, &id, 7).await, want[7..]);
    o.log_max_bytes = Some(0);
    let r = cp.retain(&o, later()).await.unwrap();
    assert_eq!(r.expired, 1);
    assert!(whole_log(&cp, &id).is_empty());
    assert_eq!(state_of(&cp, &id), LogState::Expired);
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_compresses_at_most_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::with_options(LeastLoaded, durable(dir.path())).unwrap();
    cp.register(local(), RegisterOptions::default());
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = cp.submit(chatty(&format!("b{i}"), 100), "alice").unwrap();
        cp.wait(&id).await.unwrap();
        ids.push(id);
    }
    let mut o = nothing();
    o.compress_after_secs = Some(0);
    o.batch_bytes = 1;
    let r = cp.retain(&o, later()).await.unwrap();
    assert_eq!(
        (r.compressed, r.most_in_a_batch),
        (3, 3),
        "measured in one: {r:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(state_of(&cp, id), LogState::Compressed);
        assert_eq!(whole_log(&cp, id), expected(&format!("b{i}"), 100));
    }
    // The measurement batch held all three; compression took one per batch.
    let id = cp.submit(chatty("b3", 100), "alice").unwrap();
    cp.wait(&id).await.unwrap();
    let id2 = cp.submit(chatty("b4", 100), "alice").unwrap();
    cp.wait(&id2).await.unwrap();
    let mut m = nothing();
    m.compress_after_secs = None;
    cp.retain(&m, later()).await.unwrap();
    let r = cp.retain(&o, later()).await.unwrap();
    assert_eq!((r.compressed, r.most_in_a_batch), (2, 1), "{r:?}");
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_compressed_holds_up_no_other_and_an_unfinished_expiry_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::with_options(LeastLoaded, durable(dir.path())).unwrap();
    cp.register(local(), RegisterOptions::default());
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = cp.submit(chatty(&format!("c{i}"), 50), "alice").unwrap();
        cp.wait(&id).await.unwrap();
        ids.push(id);
    }
    // The oldest log cannot be read: a directory where its file was.
    let bad = dir.path().join(format!("logs/{}.log", ids[0]));
    std::fs::remove_file(&bad).unwrap();
    std::fs::create_dir(&bad).unwrap();
    let mut o = nothing();
    o.compress_after_secs = Some(0);
    o.batch_bytes = 1;
    let r = cp.retain(&o, later()).await.unwrap();
    assert_eq!((r.compressed, r.errors), (3, 1), "{r:?}");
    assert_eq!(
        state_of(&cp, &ids[0]),
        LogState::Plain,
        "left for a later pass"
    );
    for id in &ids[1..] {
        assert_eq!(state_of(&cp, id), LogState::Compressed);
    }
    std::fs::remove_dir(&bad).unwrap();

    // An expiry a crash interrupted: recorded expiring, its file still there.
    let mut rec = cp.log_record(&ids[1]).unwrap().unwrap();
    rec.state = LogState::Expiring;
    cp.store().put_log_records(&[rec]).unwrap();
    let file = dir.path().join(format!("logs/{}.log.zst", ids[1]));
    assert!(file.exists());
    let r = cp.retain(&nothing(), later()).await.unwrap();
    assert_eq!(r.expired, 1, "{r:?}");
    assert_eq!(state_of(&cp, &ids[1]), LogState::Expired);
    assert!(!file.exists());
    cp.shutdown();
}

#[test]
fn compaction_ends_on_a_file_that_cannot_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        for i in 0..2_000 {
            store.put_job(&finished(i, 1_000 + i, 1_000)).unwrap();
        }
    }
    // Turned back to no vacuum by hand.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA auto_vacuum = NONE; VACUUM;")
        .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    let ids: Vec<JobId> = (0..2_000)
        .map(|i| JobId::from(format!("job{i:06}")))
        .collect();
    assert_eq!(store.delete_jobs(&ids).unwrap(), 2_000);
    assert!(
        !store.compact().unwrap(),
        "nothing to give back in this mode"
    );
}

#[test]
fn bad_retention_options_name_the_setting() {
    let mut o = RetentionOptions::default();
    o.log_max_age_secs = Some(10 * HOUR);
    o.job_max_age_secs = Some(HOUR);
    let e = o.check().unwrap_err();
    assert!(e.contains("retention.job_max_age_secs"), "{e}");
    let mut o = RetentionOptions::default();
    o.batch = 0;
    assert!(o.check().unwrap_err().contains("retention.batch"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut options = ControlOptions::default();
        let mut o = RetentionOptions::default();
        o.interval_secs = 0;
        options.retention = Some(o);
        let e = ControlPlane::with_options(LeastLoaded, options)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("retention.interval_secs"), "{e}");
    });
}

fn finished(i: u64, at_ms: u64, pad: usize) -> JobRecord {
    let job = Job::new("x".repeat(pad), vec![Step::run("true")]);
    serde_json::from_value(json!({
        "id": format!("job{i:06}"),
        "job": job,
        "submitter": "alice",
        "state": "succeeded",
        "attempts": [],
        "why_pending": null,
        "outcome": null,
        "submitted_at": at_ms,
        "finished_at": at_ms + 5
    }))
    .unwrap()
}

#[test]
fn both_stores_keep_log_records_in_the_order_jobs_ended() {
    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(MemoryStore::new()),
        Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap()),
    ];
    for store in stores {
        // Ended in the order 2, 0, 1; a queued job has no record.
        for (i, at) in [(0, 2_000), (1, 3_000), (2, 1_000)] {
            store.put_job(&finished(i, at, 1)).unwrap();
        }
        let mut queued = finished(3, 500, 1);
        queued.state = JobState::Queued;
        queued.finished_at = None;
        store.put_job(&queued).unwrap();
        let all = store
            .finished_logs(&[LogState::Finished], None, 10)
            .unwrap();
        let order: Vec<&str> = all.iter().map(|r| r.job_id.as_str()).collect();
        assert_eq!(order, ["job000002", "job000000", "job000001"]);
        assert_eq!(
            all[0].finished_at,
            UNIX_EPOCH + Duration::from_millis(1_005)
        );
        let cutoff = UNIX_EPOCH + Duration::from_millis(2_500);
        assert_eq!(
            store
                .finished_logs(&[LogState::Finished], Some(cutoff), 10)
                .unwrap()
                .len(),
            2
        );
        // Updated: across states, still by end time; a put of the job again keeps it.
        let mut r: LogRecord = all[1].clone();
        r.state = LogState::Compressed;
        r.bytes = 10;
        r.original = 100;
        store.put_log_records(&[r]).unwrap();
        // Put again in another terminal state: the log record stays as it is.
        let mut again = finished(0, 9_000, 1);
        again.state = JobState::Lost;
        store.put_job(&again).unwrap();
        let kept = store
            .log_record(&JobId::from("job000000".to_string()))
            .unwrap()
            .unwrap();
        assert_eq!(kept.finished_at, UNIX_EPOCH + Duration::from_millis(2_005));
        assert_eq!(
            store
                .log_record(&JobId::from("job000000".to_string()))
                .unwrap()
                .unwrap()
                .state,
            LogState::Compressed
        );
        let both = store
            .finished_logs(&[LogState::Compressed, LogState::Finished], None, 2)
            .unwrap();
        let order: Vec<&str> = both.iter().map(|r| r.job_id.as_str()).collect();
        assert_eq!(order, ["job000002", "job000000"]);
        let totals = store.log_totals().unwrap();
        assert_eq!(totals.by_state[&LogState::Compressed], (1, 10, 100));
        assert_eq!(totals.by_state[&LogState::Finished].0, 2);
        assert_eq!(totals.stored_bytes(), 10);
        assert!(store.log_record(&queued.id).unwrap().is_none());
        // Deleting takes the record, its log record and transitions.
        let gone = JobId::from("job000002".to_string());
        assert_eq!(
            store
                .delete_jobs(&[gone.clone(), queued.id.clone()])
                .unwrap(),
            2
        );
        assert!(store.get_job(&gone).unwrap().is_none());
        assert!(store.log_record(&gone).unwrap().is_none());
        assert!(store.transitions(&gone).unwrap().is_empty());
        assert_eq!(store.delete_jobs(&[gone]).unwrap(), 0);
        let totals = store.log_totals().unwrap();
        assert_eq!(totals.by_state[&LogState::Finished].0, 1, "{totals:?}");
        assert_eq!(totals.by_state[&LogState::Compressed], (1, 10, 100));
    }
}

fn db_bytes(path: &std::path::Path) -> u64 {
    let wal = path.with_extension("db-wal");
    std::fs::metadata(path).unwrap().len() + std::fs::metadata(wal).map_or(0, |m| m.len())
}

#[test]
fn the_database_file_gives_deleted_records_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cp = rt.block_on(async {
        ControlPlane::with_options(
            LeastLoaded,
            ControlOptions::durable(store.clone(), dir.path().join("logs")),
        )
        .unwrap()
    });
    let mut o = nothing();
    o.job_max_age_secs = Some(0);
    o.audit_max_age_secs = Some(0);
    let mut sizes = Vec::new();
    let mut next = 0;
    for round in 0..4 {
        for _ in 0..3_000 {
            store.put_job(&finished(next, 1_000 + next, 1_000)).unwrap();
            next += 1;
        }
        for _ in 0..1_000 {
            let mut e = AuditEntry::new("key:admin", "job.submit", None, "ok", None);
            e.at = UNIX_EPOCH + Duration::from_secs(1);
            store.append_audit(&e).unwrap();
        }
        let full = db_bytes(&path);
        let r = rt.block_on(cp.retain(&o, SystemTime::now())).unwrap();
        assert_eq!((r.jobs_deleted, r.audit_deleted), (3_000, 1_000), "{r:?}");
        let after = db_bytes(&path);
        println!("round {round}: {full} bytes with 3000 jobs, {after} after retention");
        sizes.push((full, after));
    }
    for (full, after) in &sizes {
        assert!(after * 10 < *full, "compacted to under a tenth: {sizes:?}");
        // 3,000 records of about 2 kB: the database and a write-ahead log that its
        // checkpoints keep bounded.
        assert!(*full < 64 << 20, "bounded while written: {sizes:?}");
    }
    let first = sizes[0].1;
    assert!(
        sizes.iter().all(|(_, after)| *after <= first + first / 10),
        "no growth from round to round: {sizes:?}"
    );
    rt.block_on(async { cp.shutdown() });
}

#[test]
fn an_older_database_gets_log_records_and_keeps_its_transitions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        // The schema before retention: no `logs` table, no incremental vacuum, transitions
        // in a table of their own.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                 name TEXT NOT NULL, submitter TEXT NOT NULL, state TEXT NOT NULL,
                 submitted_at INTEGER NOT NULL, record TEXT NOT NULL);
             CREATE TABLE transitions (job_id TEXT NOT NULL, state TEXT NOT NULL, at INTEGER NOT NULL);
             INSERT INTO transitions VALUES ('job000000', 'queued', 7000), ('job000001', 'queued', 7001),
                                            ('job000000', 'running', 7002), ('job000000', 'succeeded', 7005);",
        )
        .unwrap();
        for (i, state) in [(0, "succeeded"), (1, "running")] {
            let mut r = finished(i, 7_000, 1);
            r.state = JobState::from_name(state).unwrap();
            conn.execute(
                "INSERT INTO jobs (id, name, submitter, state, submitted_at, record)
                 VALUES (?1, 'x', 'alice', ?2, 7000, ?3)",
                rusqlite::params![r.id.as_str(), state, serde_json::to_string(&r).unwrap()],
            )
            .unwrap();
        }
    }
    let store = SqliteStore::open(&path).unwrap();
    let ended = store
        .log_record(&JobId::from("job000000".to_string()))
        .unwrap()
        .expect("tracked");
    assert_eq!(ended.finished_at, UNIX_EPOCH + Duration::from_millis(7_005));
    assert_eq!(ended.state, LogState::Finished);
    assert_eq!(
        store.log_totals().unwrap().by_state[&LogState::Finished].0,
        1
    );
    // Transitions moved into the jobs' rows, in order.
    let moved: Vec<(JobState, u64)> = store
        .transitions(&JobId::from("job000000".to_string()))
        .unwrap()
        .into_iter()
        .map(|t| {
            (
                t.state,
                t.at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
            )
        })
        .collect();
    assert_eq!(
        moved,
        [
            (JobState::Queued, 7000),
            (JobState::Running, 7002),
            (JobState::Succeeded, 7005)
        ]
    );
    assert_eq!(
        store
            .transitions(&JobId::from("job000001".to_string()))
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .log_record(&JobId::from("job000001".to_string()))
            .unwrap()
            .is_none()
    );
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, 2, "incremental");
}
