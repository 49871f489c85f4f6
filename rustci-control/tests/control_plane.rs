//! The in-process control plane with real local runners: dispatch order, why pending,
//! retries on another runner, lost runners, cancel and drain.

use std::sync::Arc;
use std::time::Duration;

use rustci_control::{ControlEvent, ControlPlane, JobState, RegisterOptions};
use rustci_runners::job::{RetryPolicy, RetryWhen};
use rustci_runners::{HostConfig, Job, LeastLoaded, LocalRunner, Outcome, Runner, Step};

fn local(name: &str, slots: Option<usize>) -> Arc<dyn Runner> {
    let mut c = HostConfig::named(name);
    c.max_concurrency = slots;
    c.termination_grace = Duration::from_millis(200);
    Arc::new(LocalRunner::new(c).unwrap())
}

fn plane() -> ControlPlane {
    ControlPlane::new(LeastLoaded, Duration::from_secs(3600))
}

fn retry(max: u32, when: &[RetryWhen]) -> RetryPolicy {
    let mut r = RetryPolicy::default();
    r.max = max;
    r.when = when.to_vec();
    r
}

async fn wait_output(
    events: &mut tokio::sync::broadcast::Receiver<ControlEvent>,
    id: &rustci_runners::JobId,
    want: &[u8],
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(ControlEvent::Job { id: got, event, .. }) = events.recv().await
                && &got == id
                && let rustci_runners::EventKind::Output { data, .. } = event.kind
                && &data[..] == want
            {
                return;
            }
        }
    })
    .await
    .expect("output seen");
}

async fn wait_state(cp: &ControlPlane, id: &rustci_runners::JobId, want: JobState) {
    let mut events = cp.subscribe();
    if cp.get(id).unwrap().state == want {
        return;
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(ControlEvent::JobState { id: got, state }) = events.recv().await
                && &got == id
                && state == want
            {
                return;
            }
        }
    })
    .await
    .expect("state reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_in_priority_then_fair_share_order() {
    let cp = plane();
    let mut events = cp.subscribe();
    let gate = tempfile::tempdir().unwrap();
    let gate_file = gate.path().join("open");
    let submit = |name: &str, priority: i32, who: &str, script: &str| {
        let mut j = Job::new(name, vec![Step::run(script)]);
        j.priority = priority;
        cp.submit(j, who).unwrap()
    };
    let blocker = format!(
        "while [ ! -e {} ]; do sleep 0.02; done",
        gate_file.display()
    );
    let ids = [
        submit("a1", 0, "alice", &blocker),
        submit("a2", 0, "alice", "true"),
        submit("b1", 0, "bob", "true"),
        submit("urgent", 9, "carol", "true"),
    ];
    // Two slots. First round: `urgent` (priority), then `a1` (FIFO: nobody runs anything).
    // When `urgent` ends, alice has `a1` running and bob nothing: `b1` goes before `a2`.
    cp.register(local("two-slots", Some(2)), RegisterOptions::default());
    let mut assigned = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(60), async {
        while assigned.len() < 4 {
            if let ControlEvent::JobState {
                id,
                state: JobState::Assigned,
            } = events.recv().await.unwrap()
            {
                assigned.push(cp.get(&id).unwrap().job.name.clone());
            }
        }
    })
    .await;
    assert!(
        collected.is_ok(),
        "only {assigned:?} assigned: {:?}",
        cp.list(&Default::default()).map(|p| p.jobs)
    );
    assert_eq!(assigned, ["urgent", "a1", "b1", "a2"]);
    std::fs::write(&gate_file, b"").unwrap();
    for id in &ids {
        assert_eq!(cp.wait(id).await.unwrap().state, JobState::Succeeded);
    }
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_jobs_say_why_and_drained_runners_get_nothing() {
    let cp = plane();
    let runner = cp.register(local("plain", None), RegisterOptions::default());
    let mut gpu = Job::new("needs-gpu", vec![Step::run("true")]);
    gpu.runs_on.labels = vec!["gpu".into()];
    let id = cp.submit(gpu, "alice").unwrap();
    let ok = cp
        .submit(Job::new("fine", vec![Step::run("true")]), "alice")
        .unwrap();
    assert_eq!(cp.wait(&ok).await.unwrap().state, JobState::Succeeded);
    let r = cp.get(&id).unwrap();
    assert_eq!(r.state, JobState::Queued);
    assert_eq!(
        r.why_pending.as_deref(),
        Some("no runner fits (1 runner: lacks label gpu)")
    );

    assert!(cp.drain(&runner));
    let held = cp
        .submit(Job::new("held", vec![Step::run("true")]), "bob")
        .unwrap();
    // Drained runners are not candidates at all; the reason says so.
    let why = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(why) = cp.get(&held).unwrap().why_pending {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the dispatcher looked at the job");
    assert_eq!(why, "no runner takes jobs; 1 runner is draining");
    assert_eq!(cp.get(&held).unwrap().state, JobState::Queued);
    assert!(cp.resume(&runner));
    assert_eq!(cp.wait(&held).await.unwrap().state, JobState::Succeeded);
    assert!(cp.cancel(&id));
    assert_eq!(cp.wait(&id).await.unwrap().state, JobState::Cancelled);
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_on_another_runner() {
    let cp = plane();
    cp.register(local("r1", None), RegisterOptions::default());
    cp.register(local("r2", None), RegisterOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut j = Job::new(
        "flaky",
        vec![Step::run(format!(
            "if mkdir {}/first 2>/dev/null; then exit 3; fi",
            dir.path().display()
        ))],
    );
    j.retry = retry(2, &[RetryWhen::Failure]);
    let id = cp.submit(j, "alice").unwrap();
    let r = cp.wait(&id).await.unwrap();
    assert_eq!(r.state, JobState::Succeeded);
    assert_eq!(r.attempts.len(), 2);
    assert!(matches!(
        r.attempts[0].outcome,
        Some(Outcome::Failed { exit_code: 3, .. })
    ));
    assert_ne!(
        r.attempts[0].runner_id, r.attempts[1].runner_id,
        "the retry went to the same runner"
    );

    // Without a retry policy for failures, one attempt and done.
    let id = cp
        .submit(Job::new("fails", vec![Step::run("exit 4")]), "alice")
        .unwrap();
    let r = cp.wait(&id).await.unwrap();
    assert_eq!(r.state, JobState::Failed);
    assert_eq!(r.attempts.len(), 1);
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_runner_goes_away_is_lost_and_retried() {
    let cp = plane();
    let first = cp.register(local("doomed", None), RegisterOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut j = Job::new(
        "long",
        vec![Step::run(format!(
            "if mkdir {}/first 2>/dev/null; then echo started; sleep 300; fi; echo done",
            dir.path().display()
        ))],
    );
    j.retry = retry(1, &[RetryWhen::Lost]);
    let mut events = cp.subscribe();
    let id = cp.submit(j, "alice").unwrap();
    // Lose the runner only once the first attempt is past its `mkdir`.
    wait_output(&mut events, &id, b"started\n").await;
    cp.register(local("survivor", None), RegisterOptions::default());
    assert!(cp.remove(&first));
    let r = tokio::time::timeout(Duration::from_secs(20), cp.wait(&id))
        .await
        .unwrap_or_else(|_| panic!("not ended: {:?}", cp.get(&id)))
        .unwrap();
    assert_eq!(r.state, JobState::Succeeded, "{r:?}");
    assert_eq!(r.attempts.len(), 2);
    assert_eq!(r.attempts[0].outcome, Some(Outcome::Lost));
    assert_eq!(r.attempts[0].runner_id, first);
    assert_ne!(r.attempts[1].runner_id, first);

    // Lost with no retry left: the job ends lost.
    let second = r.attempts[1].runner_id.clone();
    let id = cp
        .submit(Job::new("orphan", vec![Step::run("sleep 300")]), "alice")
        .unwrap();
    wait_state(&cp, &id, JobState::Running).await;
    assert!(cp.remove(&second));
    let r = tokio::time::timeout(Duration::from_secs(20), cp.wait(&id))
        .await
        .unwrap_or_else(|_| panic!("not ended: {:?}", cp.get(&id)))
        .unwrap();
    assert_eq!(r.state, JobState::Lost);
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_output_reaches_followers() {
    let cp = plane();
    cp.register(local("r", None), RegisterOptions::default());
    let mut events = cp.subscribe();
    let id = cp
        .submit(
            Job::new("chatty", vec![Step::run("echo hello; sleep 300")]),
            "alice",
        )
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(ControlEvent::Job { id: got, event, .. }) = events.recv().await
                && got == id
                && let rustci_runners::EventKind::Output { data, .. } = event.kind
            {
                return data;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&got[..], b"hello\n");
    assert!(cp.cancel(&id));
    let r = cp.wait(&id).await.unwrap();
    assert_eq!(r.state, JobState::Cancelled);
    assert_eq!(r.outcome, Some(Outcome::Cancelled));
    assert!(!cp.cancel(&id), "cancelling an ended job");
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_runners_labels_places_waiting_jobs() {
    let cp = plane();
    let runner = cp.register(local("plain", None), RegisterOptions::default());
    let mut gpu = Job::new("needs-gpu", vec![Step::run("true")]);
    gpu.runs_on.labels = vec!["gpu".into()];
    let id = cp.submit(gpu, "alice").unwrap();
    // No runner carries the label: it cannot have been placed.
    assert_eq!(cp.get(&id).unwrap().state, JobState::Queued);
    let mut options = RegisterOptions::default();
    options.labels.insert("gpu".into());
    assert!(cp.update(&runner, options));
    assert!(!cp.update("unknown", RegisterOptions::default()));
    let record = cp.wait(&id).await.unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempts[0].runner_id, runner);
    assert!(cp.registry().get(&runner).unwrap().labels().contains("gpu"));
    cp.shutdown();
}

/// A local runner whose first `failures` starts fail with a runner error that is
/// `temporary` or not, that counts its health checks, and whose first health check
/// waits for `release` when `hold_first_check` is set.
struct FailingStarts {
    inner: LocalRunner,
    failures: std::sync::atomic::AtomicUsize,
    temporary: bool,
    health_checks: tokio::sync::watch::Sender<usize>,
    hold_first_check: bool,
    release: tokio::sync::Notify,
    declined: bool,
}

#[async_trait::async_trait]
impl Runner for FailingStarts {
    fn info(&self) -> &rustci_runners::RunnerInfo {
        self.inner.info()
    }
    fn capabilities(&self) -> &rustci_runners::Capabilities {
        self.inner.capabilities()
    }
    fn running(&self) -> usize {
        self.inner.running()
    }
    async fn health(&self) -> rustci_runners::Health {
        let first = *self.health_checks.borrow() == 0;
        self.health_checks.send_modify(|n| *n += 1);
        if first && self.hold_first_check {
            self.release.notified().await;
        }
        self.inner.health().await
    }
    async fn start(
        &self,
        job: &dyn rustci_runners::JobSpec,
        id: rustci_runners::JobId,
    ) -> Result<rustci_runners::Execution, rustci_runners::Error> {
        use std::sync::atomic::Ordering;
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(
                rustci_runners::Error::unavailable("the engine did not answer")
                    .temporary(self.temporary)
                    .declined(self.declined)
                    .for_runner(&self.info().name),
            );
        }
        self.inner.start(job, id).await
    }
}

fn failing(name: &str, failures: usize, temporary: bool) -> Arc<FailingStarts> {
    Arc::new(FailingStarts {
        inner: LocalRunner::new(HostConfig::named(name)).unwrap(),
        failures: failures.into(),
        temporary,
        health_checks: tokio::sync::watch::channel(0).0,
        hold_first_check: false,
        release: tokio::sync::Notify::new(),
        declined: false,
    })
}

fn declining(name: &str, times: usize) -> Arc<FailingStarts> {
    let mut r = Arc::into_inner(failing(name, times, true)).unwrap();
    r.declined = true;
    Arc::new(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_handing_a_job_back_before_it_starts_costs_no_retry() {
    let cp = plane();
    cp.register(declining("picky", 3), RegisterOptions::default());
    // No retry policy at all: the declined attempts are not retries.
    let job = Job::new("handed-back", vec![Step::run("echo ran")]);
    let id = cp.submit(job, "alice").unwrap();
    let record = tokio::time::timeout(Duration::from_secs(60), cp.wait(&id))
        .await
        .expect("the job ended")
        .unwrap();
    assert_eq!(record.state, JobState::Succeeded, "{record:?}");
    let declined: Vec<bool> = record.attempts.iter().map(|a| a.declined).collect();
    assert_eq!(declined, [true, true, true, false], "{record:?}");
    // Numbers are not reused: each declined attempt keeps its own.
    let numbers: Vec<u32> = record.attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_too_often_fails_as_a_runner_error() {
    let cp = plane();
    cp.register(
        declining("never", rustci_control::MAX_DECLINED + 5),
        RegisterOptions::default(),
    );
    let job = Job::new("never-taken", vec![Step::run("echo ran")]);
    let id = cp.submit(job, "alice").unwrap();
    let record = tokio::time::timeout(Duration::from_secs(60), cp.wait(&id))
        .await
        .expect("the job ended")
        .unwrap();
    assert_eq!(record.state, JobState::Failed, "{record:?}");
    assert_eq!(
        record.attempts.len(),
        rustci_control::MAX_DECLINED + 1,
        "{record:?}"
    );
    let last = record.attempts.last().unwrap();
    assert!(!last.declined);
    assert!(
        matches!(
            &last.outcome,
            Some(Outcome::RunnerError {
                temporary: true,
                ..
            })
        ),
        "{last:?}"
    );
    cp.shutdown();
}

// On a current-thread runtime the control plane's tasks run only when the test awaits:
// the runner is registered before the health loop's first round, which therefore checks
// it, and the next scheduled round is an hour away.
#[tokio::test(flavor = "current_thread")]
async fn a_temporary_runner_error_is_retried_and_has_the_runner_checked_at_once() {
    let cp = plane();
    let runner = failing("flaky", 1, true);
    let mut checks = runner.health_checks.subscribe();
    cp.register(runner.clone(), RegisterOptions::default());
    tokio::time::timeout(Duration::from_secs(30), checks.wait_for(|n| *n >= 1))
        .await
        .expect("first health check")
        .unwrap();
    let mut job = Job::new("retried", vec![Step::run("echo ran")]);
    job.retry = retry(2, &[RetryWhen::RunnerFailure]);
    let id = cp.submit(job, "alice").unwrap();
    let record = tokio::time::timeout(Duration::from_secs(60), cp.wait(&id))
        .await
        .expect("the job ended")
        .unwrap();
    assert_eq!(record.state, JobState::Succeeded, "{record:?}");
    assert_eq!(record.attempts.len(), 2, "{record:?}");
    assert!(
        matches!(
            &record.attempts[0].outcome,
            Some(Outcome::RunnerError { temporary: true, message }) if message.contains("the engine did not answer")
        ),
        "{:?}",
        record.attempts[0].outcome
    );
    // The failure had the runner's health checked again without waiting for the interval.
    tokio::time::timeout(Duration::from_secs(30), checks.wait_for(|n| *n >= 2))
        .await
        .expect("a health check right after the temporary failure")
        .unwrap();
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_runner_error_ends_the_job_whatever_its_retry_policy() {
    let cp = plane();
    cp.register(failing("refusing", 1, false), RegisterOptions::default());
    let mut job = Job::new("not-retried", vec![Step::run("echo ran")]);
    job.retry = retry(3, &[RetryWhen::RunnerFailure]);
    let id = cp.submit(job, "alice").unwrap();
    let record = tokio::time::timeout(Duration::from_secs(60), cp.wait(&id))
        .await
        .expect("the job ended")
        .unwrap();
    assert_eq!(record.state, JobState::Failed, "{record:?}");
    assert_eq!(record.attempts.len(), 1, "{record:?}");
    assert!(
        matches!(
            &record.attempts[0].outcome,
            Some(Outcome::RunnerError {
                temporary: false,
                ..
            })
        ),
        "{:?}",
        record.attempts[0].outcome
    );
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_asked_for_during_a_health_round_is_not_lost() {
    let registry = Arc::new(rustci_control::Registry::new());
    let runner = Arc::new(FailingStarts {
        hold_first_check: true,
        ..Arc::into_inner(failing("held", 0, false)).unwrap()
    });
    let mut checks = runner.health_checks.subscribe();
    let id = registry.register(runner.clone(), RegisterOptions::default());
    let hour = Duration::from_secs(3600);
    let round = tokio::spawn({
        let registry = registry.clone();
        async move { registry.check_health(hour, hour).await }
    });
    // The round is inside the runner's health check: ask for another one now.
    checks.wait_for(|n| *n == 1).await.unwrap();
    registry.check_soon(&id);
    runner.release.notify_one();
    round.await.unwrap();
    // Without the request the runner would next be due in an hour.
    registry.check_health(hour, hour).await;
    assert_eq!(
        *checks.borrow(),
        2,
        "the check asked for during the round was lost"
    );
    // And only once: the request was answered.
    registry.check_health(hour, hour).await;
    assert_eq!(*checks.borrow(), 2);
}

/// A round starts with only the runners carrying a queued job's labels (own, added or
/// reserved); where they place nothing, it widens to every runner, so a waiting job's
/// reason is the one a round over all runners gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_jobs_among_many_runners_are_placed_and_say_why_they_wait() {
    let cp = plane();
    for i in 0..20 {
        cp.register(
            local(&format!("plain-{i}"), Some(1)),
            RegisterOptions::default(),
        );
    }
    let mut options = RegisterOptions::default();
    options.labels.insert("special".into());
    let special = cp.register(local("special", Some(1)), options);
    let mut options = RegisterOptions::default();
    options.reserved_labels.insert("gpu".into());
    let gpu = cp.register(local("gpu", Some(1)), options);

    let job = |name: &str, label: &str, script: &str| {
        let mut j = Job::new(name, vec![Step::run(script)]);
        j.runs_on.labels = vec![label.into()];
        j
    };
    let long = cp
        .submit(job("long", "special", "sleep 30"), "alice")
        .unwrap();
    wait_state(&cp, &long, JobState::Running).await;
    assert_eq!(cp.get(&long).unwrap().attempts[0].runner_id, special);
    let reserved = cp.submit(job("reserved", "gpu", "true"), "alice").unwrap();
    let record = cp.wait(&reserved).await.unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempts[0].runner_id, gpu);

    // The one runner carrying the label is busy: the job waits, and says why in terms of
    // every runner, not only the one it was looking at first.
    let waits = cp.submit(job("waits", "special", "true"), "bob").unwrap();
    let why = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(why) = cp.get(&waits).unwrap().why_pending {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the dispatcher looked at the job");
    assert_eq!(
        why,
        "no runner fits (1 runner: is full; 21 runners: lacks label special)"
    );
    assert!(cp.cancel(&long));
    let record = cp.wait(&waits).await.unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempts[0].runner_id, special);
    cp.shutdown();
}

fn labelled(label: &str) -> RegisterOptions {
    let mut options = RegisterOptions::default();
    options.labels.insert(label.into());
    options
}

fn asking(name: &str, label: &str) -> Job {
    let mut j = Job::new(name, vec![Step::run("true")]);
    j.runs_on.labels = vec![label.into()];
    j
}

/// A round that widens (a job that no runner carrying its labels fits) keeps what it
/// assigned before: the second copy of a job goes to the other runner carrying its
/// label, as in a round over every runner.
// One thread: the three submissions are queued before any round runs.
#[tokio::test]
async fn a_widened_round_still_spreads_the_copies_of_a_job() {
    use rustci_runners::select::{ScorerKind, SelectionConfig, SelectionEngine};
    let mut config = SelectionConfig::default();
    config.weights = std::collections::BTreeMap::from([(ScorerKind::Spread, 1.0)]);
    let cp = ControlPlane::new(
        SelectionEngine::from_config(&config),
        Duration::from_secs(3600),
    );
    let mut carrying = [
        cp.register(local("x-1", Some(4)), labelled("x")),
        cp.register(local("x-2", Some(4)), labelled("x")),
    ];
    carrying.sort();
    cp.register(local("plain", Some(4)), RegisterOptions::default());
    let a = cp.submit(asking("build", "x"), "alice").unwrap();
    let nowhere = cp.submit(asking("elsewhere", "nowhere"), "alice").unwrap();
    let b = cp.submit(asking("build", "x"), "alice").unwrap();
    let (a, b) = (cp.wait(&a).await.unwrap(), cp.wait(&b).await.unwrap());
    assert_eq!(
        a.attempts[0].runner_id, carrying[0],
        "ties go to the first runner"
    );
    assert_eq!(
        b.attempts[0].runner_id, carrying[1],
        "the second copy of build is spread to the other runner carrying x"
    );
    let waits = cp.get(&nowhere).unwrap();
    assert_eq!(waits.state, JobState::Queued);
    assert!(
        waits
            .why_pending
            .as_deref()
            .is_some_and(|w| w.contains("3 runners: lacks label nowhere")),
        "{waits:?}"
    );
    cp.shutdown();
}

/// A selector that does not promise to filter by labels is given every runner, even for
/// a job that asks for labels: it may choose one that lacks them.
#[tokio::test]
async fn a_selector_without_a_label_filter_sees_every_runner() {
    use rustci_runners::select::SelectionEngine;
    // No filters and no scorers: the first runner (by id) wins.
    let cp = ControlPlane::new(SelectionEngine::new(Vec::new()), Duration::from_secs(3600));
    let runner = |id: &str| {
        let mut c = HostConfig::named(id);
        c.id = Some(id.to_string());
        Arc::new(LocalRunner::new(c).unwrap()) as Arc<dyn Runner>
    };
    let with_x = cp.register(runner("b-with-x"), labelled("x"));
    let plain = cp.register(runner("a-plain"), RegisterOptions::default());
    assert_eq!((plain.as_str(), with_x.as_str()), ("a-plain", "b-with-x"));
    let id = cp.submit(asking("build", "x"), "alice").unwrap();
    let record = cp.wait(&id).await.unwrap();
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempts[0].runner_id, plain);
    cp.shutdown();
}

/// The registry's label index follows registration, relabelling, draining and removal:
/// the snapshots for a set of labels are exactly the runners taking jobs that carry them
/// all (own, added or reserved), the same as a filter over every runner.
#[test]
fn the_label_index_matches_a_scan_of_every_runner() {
    use std::collections::{BTreeMap, BTreeSet};
    let registry = rustci_control::Registry::new();
    let set = |ls: &[&str]| ls.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>();
    let with = |labels: &[&str], reserved: &[&str]| {
        let mut o = RegisterOptions::default();
        o.labels = set(labels);
        o.reserved_labels = set(reserved);
        o
    };
    let a = registry.register(local("a", None), with(&["x", "y"], &[]));
    let b = registry.register(local("b", None), with(&["x"], &["gpu"]));
    let c = registry.register(local("c", None), with(&[], &[]));
    let none = BTreeMap::new();
    let ids = |sets: &[BTreeSet<String>]| -> Vec<String> {
        registry
            .snapshots_carrying(&none, sets)
            .into_iter()
            .map(|s| s.info.id)
            .collect()
    };
    let scan = |sets: &[BTreeSet<String>]| -> Vec<String> {
        registry
            .snapshots_where(&none, |e| {
                sets.iter().any(|s| s.iter().all(|l| e.carries(l)))
            })
            .into_iter()
            .map(|s| s.info.id)
            .collect()
    };
    let cases = [
        vec![set(&["x"])],
        vec![set(&["x", "y"])],
        vec![set(&["gpu"])],
        vec![set(&["x", "gpu"]), set(&["y"])],
        vec![set(&["nowhere"])],
        vec![set(&[])],
    ];
    let check = |what: &str| {
        for sets in &cases {
            assert_eq!(ids(sets), scan(sets), "{what}: {sets:?}");
        }
    };
    check("registered");
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(ids(&[set(&["x"])]), both);
    assert_eq!(ids(&[set(&["gpu"])]), vec![b.clone()]);
    assert!(registry.update(&c, with(&["y", "gpu"], &[])));
    assert!(registry.update(&a, with(&[], &[])));
    check("relabelled");
    assert_eq!(ids(&[set(&["y"])]), vec![c.clone()]);
    // Registered again under its id, with other labels: the old ones are gone from the
    // index, the new ones in it.
    assert_eq!(ids(&[set(&["x"])]), vec![b.clone()]);
    let again = registry.get(&a).expect("registered").runner.clone();
    assert_eq!(registry.register(again, with(&["x", "z"], &[])), a);
    check("registered again");
    assert_eq!(ids(&[set(&["z"])]), vec![a.clone()]);
    assert_eq!(ids(&[set(&["x"])]), both);
    assert!(registry.update(&a, with(&[], &[])));
    check("relabelled again");
    registry.drain(&b);
    check("drained");
    assert_eq!(ids(&[set(&["gpu"])]), vec![c.clone()]);
    registry.remove(&c);
    check("removed");
    assert!(ids(&[set(&["gpu"])]).is_empty());
    assert_eq!(ids(&[set(&[])]), vec![a]);
}

/// A local runner whose starts wait `delay_ms` first, and fail with a temporary runner
/// error while `fail` is set or `fail_next` is above zero.
struct Flaky {
    inner: LocalRunner,
    delay_ms: std::sync::atomic::AtomicU64,
    fail: std::sync::atomic::AtomicBool,
    fail_next: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Runner for Flaky {
    fn info(&self) -> &rustci_runners::RunnerInfo {
        self.inner.info()
    }
    fn capabilities(&self) -> &rustci_runners::Capabilities {
        self.inner.capabilities()
    }
    fn running(&self) -> usize {
        self.inner.running()
    }
    async fn health(&self) -> rustci_runners::Health {
        self.inner.health().await
    }
    async fn start(
        &self,
        job: &dyn rustci_runners::JobSpec,
        id: rustci_runners::JobId,
    ) -> Result<rustci_runners::Execution, rustci_runners::Error> {
        use std::sync::atomic::Ordering;
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let once = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if once || self.fail.load(Ordering::SeqCst) {
            return Err(
                rustci_runners::Error::unavailable("the engine did not answer")
                    .temporary(true)
                    .for_runner(&self.info().name),
            );
        }
        self.inner.start(job, id).await
    }
}

fn flaky(name: &str, label: &str) -> Arc<Flaky> {
    let mut c = HostConfig::named(name);
    c.labels = vec![label.to_string()];
    Arc::new(Flaky {
        inner: LocalRunner::new(c).unwrap(),
        delay_ms: 0.into(),
        fail: false.into(),
        fail_next: 0.into(),
    })
}

fn on(label: Option<&str>, retries: u32) -> Job {
    let mut j = Job::new("j", vec![Step::run("true")]);
    if let Some(l) = label {
        j.runs_on.labels = vec![l.to_string()];
    }
    j.retry = retry(retries, &[RetryWhen::RunnerFailure]);
    j
}

async fn run_one(cp: &ControlPlane, job: Job) -> rustci_control::JobRecord {
    let id = cp.submit(job, "alice").unwrap();
    tokio::time::timeout(Duration::from_secs(60), cp.wait(&id))
        .await
        .expect("the job ended")
        .unwrap()
}

fn status_of(cp: &ControlPlane, id: &str) -> rustci_control::RunnerStatus {
    cp.registry().get(id).unwrap().status
}

fn audited(cp: &ControlPlane, action: &str) -> Vec<rustci_control::AuditEntry> {
    cp.store()
        .audit(None, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.action == action)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_gets_slow_is_degraded_jobs_go_elsewhere_and_it_recovers() {
    let cp = plane();
    let mut events = cp.subscribe();
    let slow = flaky("slow", "s");
    let a = cp.register(slow.clone(), RegisterOptions::default());
    let b = cp.register(flaky("other", "o"), RegisterOptions::default());
    // Its baseline: ten fast start-ups.
    for _ in 0..10 {
        assert_eq!(
            run_one(&cp, on(Some("s"), 0)).await.state,
            JobState::Succeeded
        );
    }
    assert_eq!(status_of(&cp, &a), rustci_control::RunnerStatus::Healthy);
    // Starts now wait 400 ms: degraded once the median of the last five is slow.
    slow.delay_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        run_one(&cp, on(Some("s"), 0)).await;
    }
    assert_eq!(status_of(&cp, &a), rustci_control::RunnerStatus::Degraded);
    let entry = cp.registry().get(&a).unwrap();
    let why = entry.degraded_by_control_plane().unwrap().to_string();
    assert!(why.starts_with("start-up "), "{why}");
    assert!(why.contains("its baseline of"), "{why}");
    let degraded = audited(&cp, "runner.degraded");
    assert_eq!(degraded.len(), 1);
    assert_eq!(degraded[0].target.as_deref(), Some(a.as_str()));
    assert!(degraded[0].result.contains("start-up"), "{:?}", degraded[0]);
    // The transition is an event.
    let mut saw = false;
    while let Ok(ev) = events.try_recv() {
        if let ControlEvent::Runner { id, status } = ev
            && id == a
            && status == Some(rustci_control::RunnerStatus::Degraded)
        {
            saw = true;
        }
    }
    assert!(saw, "a runner event for the degradation");
    // Jobs either runner could take go to the other one, although both are idle.
    for _ in 0..6 {
        let r = run_one(&cp, on(None, 0)).await;
        assert_eq!(r.attempts.len(), 1);
        assert_eq!(r.attempts[0].runner_id, b, "{r:?}");
        assert_eq!(r.attempts[0].degraded, None);
    }
    // Only it fits: it takes the job, and the record says it was degraded.
    let r = run_one(&cp, on(Some("s"), 0)).await;
    assert_eq!(r.attempts[0].runner_id, a);
    let note = r.attempts[0].degraded.as_deref().expect("a note");
    assert!(note.starts_with("start-up "), "{note}");
    // Fast again: recovered once the median is.
    slow.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        run_one(&cp, on(Some("s"), 0)).await;
    }
    assert_eq!(status_of(&cp, &a), rustci_control::RunnerStatus::Healthy);
    assert_eq!(
        cp.registry().get(&a).unwrap().degraded_by_control_plane(),
        None
    );
    let recovered = audited(&cp, "runner.recovered");
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    cp.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_failing_with_runner_errors_is_degraded_and_retries_avoid_it() {
    let cp = plane();
    let failing = flaky("failing", "f");
    let a = cp.register(failing.clone(), RegisterOptions::default());
    let other = flaky("other", "o");
    let b = cp.register(other.clone(), RegisterOptions::default());
    failing
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..4 {
        let r = run_one(&cp, on(Some("f"), 0)).await;
        assert!(
            matches!(r.outcome, Some(Outcome::RunnerError { .. })),
            "{r:?}"
        );
    }
    assert_eq!(status_of(&cp, &a), rustci_control::RunnerStatus::Degraded);
    let why = cp
        .registry()
        .get(&a)
        .unwrap()
        .degraded_by_control_plane()
        .unwrap()
        .to_string();
    assert_eq!(
        why,
        "4 of the last 4 attempts ended in a runner error or were lost"
    );
    // Its health checks still pass: the finding stands beside them.
    cp.registry().check_soon(&a);
    cp.registry()
        .check_health(Duration::from_secs(3600), Duration::from_secs(10))
        .await;
    assert_eq!(status_of(&cp, &a), rustci_control::RunnerStatus::Degraded);
    // A job either could take goes to the other runner; when its first attempt fails
    // there, the retry goes there again rather than to the degraded runner.
    other
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let r = run_one(&cp, on(None, 2)).await;
    assert_eq!(r.state, JobState::Succeeded, "{r:?}");
    let runners: Vec<&str> = r.attempts.iter().map(|x| x.runner_id.as_str()).collect();
    assert_eq!(runners, [b.as_str(), b.as_str()], "{r:?}");
    // It works again: successes bring the rate down and it recovers (4 faults of 9).
    failing
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(
            run_one(&cp, on(Some("f"), 0)).await.state,
            JobState::Succeeded
        );
    }
    assert_eq!(
        status_of(&cp, &a),
        rustci_control::RunnerStatus::Degraded,
        "4 of 8 is still the rate"
    );
    assert_eq!(
        run_one(&cp, on(Some("f"), 0)).await.state,
        JobState::Succeeded
    );
    assert_eq!(status_of(&cp, &a), rustci_control::RunnerStatus::Healthy);
    cp.shutdown();
}
