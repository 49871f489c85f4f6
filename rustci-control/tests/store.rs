//! The same contract checked on both stores: `MemoryStore` and `SqliteStore`.

use std::sync::Arc;

use rustci_control::{
    AuditEntry, JobQuery, JobRecord, JobState, MemoryStore, RunnerRecord, SqliteStore, Store,
};
use rustci_runners::{Job, JobId, Step};
use serde_json::json;

fn record(i: usize, submitter: &str, state: JobState) -> JobRecord {
    let job = Job::new(format!("job-{}", i % 3), vec![Step::run("true")]);
    serde_json::from_value(json!({
        "id": format!("job{i:04}"),
        "job": job,
        "submitter": submitter,
        "state": state,
        "attempts": [],
        "why_pending": null,
        "outcome": null,
        "submitted_at": 1_000 + i as u64,
        "finished_at": null
    }))
    .unwrap()
}

fn contract(store: Arc<dyn Store>) {
    for i in 0..7 {
        let who = if i % 2 == 0 { "alice" } else { "bob" };
        store.put_job(&record(i, who, JobState::Queued)).unwrap();
    }
    // Updates keep the submission order and record transitions.
    let mut r = record(2, "alice", JobState::Running);
    store.put_job(&r).unwrap();
    r.state = JobState::Succeeded;
    store.put_job(&r).unwrap();
    store.put_job(&r).unwrap();
    let states: Vec<JobState> = store
        .transitions(&r.id)
        .unwrap()
        .iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        states,
        [JobState::Queued, JobState::Running, JobState::Succeeded]
    );
    assert_eq!(
        store.get_job(&r.id).unwrap().unwrap().state,
        JobState::Succeeded
    );
    assert!(
        store
            .get_job(&JobId::from("nope".to_string()))
            .unwrap()
            .is_none()
    );

    // Pages, newest first, with a cursor.
    let mut q = JobQuery::default();
    q.limit = 3;
    let first = store.list_jobs(&q).unwrap();
    let ids: Vec<String> = first.jobs.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(ids, ["job0006", "job0005", "job0004"]);
    q.before = first.next;
    let second = store.list_jobs(&q).unwrap();
    let ids: Vec<String> = second.jobs.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(ids, ["job0003", "job0002", "job0001"]);
    q.before = second.next;
    let third = store.list_jobs(&q).unwrap();
    assert_eq!(third.jobs.len(), 1);
    assert_eq!(third.next, None);

    // Filters.
    let mut q = JobQuery::default();
    q.submitter = Some("bob".into());
    assert_eq!(store.list_jobs(&q).unwrap().jobs.len(), 3);
    let mut q = JobQuery::default();
    q.state = Some(JobState::Succeeded);
    assert_eq!(store.list_jobs(&q).unwrap().jobs.len(), 1);
    let mut q = JobQuery::default();
    q.name = Some("job-0".into());
    assert_eq!(store.list_jobs(&q).unwrap().jobs.len(), 3);

    let unfinished = store.unfinished_jobs().unwrap();
    assert_eq!(unfinished.len(), 6);
    assert_eq!(unfinished[0].id.to_string(), "job0000", "oldest first");
    let counts = store.count_by_state().unwrap();
    assert_eq!(counts[&JobState::Queued], 6);
    assert_eq!(counts[&JobState::Succeeded], 1);

    // By runner: any attempt on it counts, not only the last.
    for (i, runners) in [(7, vec!["r-a", "r-b"]), (8, vec!["r-b"]), (9, vec![])] {
        let mut r = record(i, "carol", JobState::Failed);
        r.attempts = runners
            .iter()
            .enumerate()
            .map(|(n, id)| {
                serde_json::from_value(json!({
                    "number": n + 1, "runner_id": id, "started_at": 2_000 + n,
                    "ended_at": 2_500 + n, "outcome": {"result": "failed", "step": 0, "step_name": "s", "exit_code": 1}
                }))
                .unwrap()
            })
            .collect();
        store.put_job(&r).unwrap();
    }
    let by = |runner: &str| -> Vec<String> {
        let mut q = JobQuery::default();
        q.runner = Some(runner.into());
        store
            .list_jobs(&q)
            .unwrap()
            .jobs
            .iter()
            .map(|j| j.id.to_string())
            .collect()
    };
    assert_eq!(by("r-b"), ["job0008", "job0007"]);
    assert_eq!(by("r-a"), ["job0007"]);
    assert!(by("r-c").is_empty());
    let mut q = JobQuery::default();
    q.runner = Some("r-b".into());
    q.limit = 1;
    let page = store.list_jobs(&q).unwrap();
    assert_eq!(page.jobs.len(), 1);
    q.before = page.next;
    assert_eq!(
        store.list_jobs(&q).unwrap().jobs[0].id.to_string(),
        "job0007"
    );

    // Runners.
    store
        .put_runner(&RunnerRecord::new(
            "r1",
            "one",
            "native",
            json!({"slots": 2}),
        ))
        .unwrap();
    store
        .put_runner(&RunnerRecord::new("r2", "two", "local", json!({})))
        .unwrap();
    assert_eq!(store.runners().unwrap().len(), 2);
    assert!(store.remove_runner("r1").unwrap());
    assert!(!store.remove_runner("r1").unwrap());
    let left = store.runners().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].config, json!({}));

    // Audit log: sequence numbers, newest first, paging with `before`.
    for i in 0..5 {
        let seq = store
            .append_audit(&AuditEntry::new(
                "key:admin",
                "job.submit",
                Some(format!("job{i}")),
                "ok",
                None,
            ))
            .unwrap();
        assert_eq!(seq, i + 1);
    }
    let newest = store.audit(None, 2).unwrap();
    assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 4]);
    let older = store.audit(Some(4), 10).unwrap();
    assert_eq!(older.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 2, 1]);
}

#[test]
fn memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryStore::new()));
}

#[test]
fn sqlite_store_keeps_the_contract_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    contract(Arc::new(SqliteStore::open(&path).unwrap()));
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.unfinished_jobs().unwrap().len(), 6);
    assert_eq!(again.audit(None, 100).unwrap().len(), 5);
}

#[test]
fn an_unusable_database_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = SqliteStore::open(dir.path().join("missing/dir/state.db")).unwrap_err();
    assert!(e.to_string().contains("missing/dir/state.db"), "{e}");
}

#[test]
fn state_names_match_their_json() {
    for s in JobState::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        assert_eq!(JobState::from_name(s.as_str()), Some(s));
    }
    assert_eq!(JobState::from_name("sideways"), None);
}
