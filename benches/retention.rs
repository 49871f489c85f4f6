//! Retention over a store of 100,000 finished jobs (SQLite, one 2 KiB log file each),
//! one batch of 500 at a time, against same-run baselines doing the bare work:
//!
//! - `retention/compress_500` — a retention pass that compresses the 500 oldest plain
//!   logs (run after the deletions: these are logs written at the start) (store queries, zstd seekable archives, one `syncfs`, renames, a directory
//!   sync, removal of the originals, the records updated), vs `raw/zstd_500` (500 files
//!   read, compressed with zstd at the same level, written, one `syncfs`, renamed, the
//!   originals removed; no store).
//! - `retention/delete_500` — a retention pass that deletes the 500 oldest job records
//!   with their logs (files, records, attempts, transitions, log records in one
//!   transaction; 500 of 100,000 never leaves a quarter of the file free, so no vacuum
//!   runs), vs
//!   `raw/unlink_and_delete_500` (500 files removed and 500 rows deleted by primary key
//!   from a 100,000-row table in one transaction; no vacuum).
//!
//! The baselines' files are written at the start with the store's, so that both delete
//! files of the same age (a file unlinked right after it was written costs far less).
//! Between iterations (not timed) the store and the baseline's table are refilled to
//! 100,000. A final full pass over everything left prints its batch count and its
//! longest batch.
//! `scripts/bench-ratios retention` prints the ratios.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group};
use rustci::control::{
    ControlOptions, ControlPlane, JobRecord, LogRecord, LogState, RetentionOptions, SqliteStore,
    Store,
};
use rustci::{Job, Step};

const JOBS: u64 = 100_000;
const BATCH: usize = 500;
const T0: u64 = 1_700_000_000_000;
/// Logs the raw compression baseline may take (it uses fewer iterations than that).
const RAW_COMPRESS_POOL: u64 = JOBS;

fn log_text(i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2048);
    let mut n = 0;
    while out.len() < 2048 {
        out.extend_from_slice(
            format!(
                "[{i:06}:{n:03}] Compiling crate-{} v0.{}.{} (registry)\n",
                n % 37,
                n % 7,
                i % 13
            )
            .as_bytes(),
        );
        n += 1;
    }
    out.truncate(2048);
    out
}

fn record(i: u64) -> JobRecord {
    let job = Job::new(
        format!("build-{}", i % 50),
        vec![Step::run("cargo build --release"), Step::run("cargo test")],
    );
    serde_json::from_value(serde_json::json!({
        "id": format!("job{i:08}"),
        "job": job,
        "submitter": "ci",
        "state": "succeeded",
        "attempts": [{"number": 1, "runner_id": "native-1", "started_at": T0 + i, "ended_at": T0 + i + 1,
                      "outcome": {"result": "succeeded"}}],
        "why_pending": null,
        "outcome": {"result": "succeeded"},
        "submitted_at": T0 + i,
        "finished_at": T0 + i,
    }))
    .unwrap()
}

/// A store and log directory holding jobs `from..to`, all measured as plain logs.
struct Fill {
    store: Arc<SqliteStore>,
    logs: PathBuf,
}

impl Fill {
    fn add(&self, from: u64, to: u64) {
        let mut measured = Vec::new();
        for i in from..to {
            let r = record(i);
            let text = log_text(i);
            std::fs::write(self.logs.join(format!("{}.log", r.id)), &text).unwrap();
            self.store.put_job(&r).unwrap();
            let mut l =
                LogRecord::finished(r.id.clone(), UNIX_EPOCH + Duration::from_millis(T0 + i));
            l.state = LogState::Plain;
            l.bytes = text.len() as u64;
            l.original = l.bytes;
            measured.push(l);
            if measured.len() == 1000 {
                self.store.put_log_records(&measured).unwrap();
                measured.clear();
            }
        }
        self.store.put_log_records(&measured).unwrap();
    }
}

fn nothing() -> RetentionOptions {
    let mut o = RetentionOptions::default();
    o.compress_after_secs = None;
    o.log_max_age_secs = None;
    o.log_max_bytes = None;
    o.job_max_age_secs = None;
    o.audit_max_age_secs = None;
    o.batch = BATCH;
    o
}

fn at(i: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(T0 + i)
}

fn syncfs(dir: &Path) {
    let d = std::fs::File::open(dir).unwrap();
    nix::unistd::syncfs(&d).unwrap();
}

fn retention(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    let fill = Fill {
        store: store.clone(),
        logs: logs.clone(),
    };
    let started = Instant::now();
    fill.add(0, JOBS);
    eprintln!(
        "retention bench: {JOBS} jobs stored in {:?}",
        started.elapsed()
    );
    let plane = rt.block_on(async {
        ControlPlane::with_options(
            rustci::select::SelectionEngine::default(),
            ControlOptions::durable(store.clone(), &logs),
        )
        .unwrap()
    });

    // The raw baselines' own data: files and a table of 100,000 rows.
    let raw = dir.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let db = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE t (id TEXT PRIMARY KEY, record TEXT NOT NULL);",
    )
    .unwrap();
    let row = serde_json::to_string(&record(0)).unwrap();
    {
        let tx = db.unchecked_transaction().unwrap();
        for i in 0..JOBS {
            tx.execute(
                "INSERT INTO t VALUES (?1, ?2)",
                (format!("job{i:08}"), &row),
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    // As old as the store's logs: written at the start, flushed like them.
    let (pool_a, pool_b) = (raw.join("a"), raw.join("b"));
    std::fs::create_dir_all(&pool_a).unwrap();
    std::fs::create_dir_all(&pool_b).unwrap();
    let write_raw = |dir: &Path, from: u64, to: u64| {
        for i in from..to {
            std::fs::write(dir.join(format!("{i}.log")), log_text(i)).unwrap();
        }
    };
    write_raw(&pool_a, 0, RAW_COMPRESS_POOL);
    write_raw(&pool_b, 0, JOBS);
    syncfs(&raw);
    syncfs(&logs);
    let mut raw_next = 0u64;

    let mut group = c.benchmark_group("retention");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));

    // Deletion: the 500 oldest jobs each iteration, 500 new ones added after (untimed).
    let mut oldest = 0u64;
    let mut next = JOBS;
    group.bench_function("retention/delete_500", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut o = nothing();
                o.job_max_age_secs = Some(0);
                let now = at(oldest + BATCH as u64);
                let t = Instant::now();
                let r = rt.block_on(plane.retain(&o, now)).unwrap();
                total += t.elapsed();
                assert_eq!(r.jobs_deleted, BATCH as u64, "{r:?}");
                oldest += BATCH as u64;
                fill.add(next, next + BATCH as u64);
                next += BATCH as u64;
            }
            total
        })
    });
    let mut raw_oldest = 0u64;
    let mut raw_rows = JOBS;
    group.bench_function("raw/unlink_and_delete_500", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                for i in raw_oldest..raw_oldest + BATCH as u64 {
                    std::fs::remove_file(pool_b.join(format!("{i}.log"))).unwrap();
                }
                let tx = db.unchecked_transaction().unwrap();
                let mut n = 0;
                for i in raw_oldest..raw_oldest + BATCH as u64 {
                    n += tx
                        .execute("DELETE FROM t WHERE id = ?1", [format!("job{i:08}")])
                        .unwrap();
                }
                tx.commit().unwrap();
                total += t.elapsed();
                assert_eq!(n, BATCH);
                raw_oldest += BATCH as u64;
                write_raw(&pool_b, raw_rows, raw_rows + BATCH as u64);
                let tx = db.unchecked_transaction().unwrap();
                for _ in 0..BATCH {
                    tx.execute(
                        "INSERT INTO t VALUES (?1, ?2)",
                        (format!("job{raw_rows:08}"), &row),
                    )
                    .unwrap();
                    raw_rows += 1;
                }
                tx.commit().unwrap();
            }
            total
        })
    });
    // Compression: the next 500 plain logs each iteration, from the oldest left (100,000
    // are there to take; those written at the start first).
    let mut compressed = oldest;
    group.bench_function("retention/compress_500", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                assert!(compressed + (BATCH as u64) <= next, "out of plain logs");
                let mut o = nothing();
                o.compress_after_secs = Some(0);
                let now = at(compressed + BATCH as u64);
                let t = Instant::now();
                let r = rt.block_on(plane.retain(&o, now)).unwrap();
                total += t.elapsed();
                assert_eq!(r.compressed, BATCH as u64, "{r:?}");
                compressed += BATCH as u64;
            }
            total
        })
    });
    group.bench_function("raw/zstd_500", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                assert!(
                    raw_next + (BATCH as u64) <= RAW_COMPRESS_POOL,
                    "out of raw logs"
                );
                let t = Instant::now();
                let mut names = Vec::with_capacity(BATCH);
                for i in raw_next..raw_next + BATCH as u64 {
                    let src = pool_a.join(format!("{i}.log"));
                    let text = std::fs::read(&src).unwrap();
                    let z = zstd::bulk::compress(&text, 3).unwrap();
                    let tmp = pool_a.join(format!("{i}.zst.tmp"));
                    std::fs::write(&tmp, z).unwrap();
                    names.push((src, tmp, pool_a.join(format!("{i}.zst"))));
                }
                syncfs(&pool_a);
                for (src, tmp, dst) in names {
                    std::fs::rename(tmp, dst).unwrap();
                    std::fs::remove_file(src).unwrap();
                }
                total += t.elapsed();
                raw_next += BATCH as u64;
            }
            total
        })
    });

    group.finish();

    // Everything left, in one pass of batches of 500.
    let left = store.log_totals().unwrap();
    let count: u64 = left.by_state.values().map(|t| t.0).sum();
    let mut o = nothing();
    o.job_max_age_secs = Some(0);
    let t = Instant::now();
    let r = rt.block_on(plane.retain(&o, SystemTime::now())).unwrap();
    let took = t.elapsed();
    assert_eq!(r.jobs_deleted, count);
    eprintln!(
        "retention bench: a full pass deleted {count} jobs in {} batches, {took:?} in all, the longest batch {:?}",
        r.batches, r.longest_batch
    );
    rt.block_on(async { plane.shutdown() });
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, retention);

fn main() {
    run_window::record("retention", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
