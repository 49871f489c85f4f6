//! A control plane and an agent in one process, over real TLS on loopback: registration
//! with a pinned CA, mutual TLS sessions, a job run on the agent with its output stored
//! byte for byte, and the refusals (bad token, reused token, no client certificate,
//! wrong CA).

mod common;

use std::time::Duration;

use common::*;
use rustci_control::JobState;
use rustci_runners::Outcome;
use rustci_runners_valkyrie::{Agent, CaSource};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_over_pinned_tls_and_runs_a_job_with_its_output_intact() {
    let cp = control_side().await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(agent_options(&cp, data.path())).await.unwrap();
    agent.wait_connected(true).await;
    let runner_id = wait_runner_healthy(&cp.plane).await;
    assert_eq!(runner_id, format!("{}.local", agent.id()));
    let entry = cp.plane.registry().get(&runner_id).unwrap();
    assert!(entry.info().labels.contains("fast"));
    assert!(entry.info().labels.contains("from-token"));
    let view = cp.hub.agent(agent.id()).unwrap();
    assert_eq!(view.name, "agent-a");
    assert_eq!(view.status, rustci_runners_valkyrie::AgentStatus::Healthy);

    // Output larger than one chunk, on both streams, with bytes that are not UTF-8.
    let script = "printf 'out\\n'; printf 'err\\n' >&2; head -c 600000 /dev/zero | tr '\\0' 'x'; printf '\\377\\376end'";
    let id = cp.plane.submit(remote_job(script), "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Succeeded).await;
    let record = cp.plane.get(&id).unwrap();
    assert_eq!(record.outcome, Some(Outcome::Succeeded));
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].runner_id, runner_id);
    let log = log_of(&cp.plane, &id).await;
    let mut want = Vec::new();
    want.extend_from_slice(b"out\n");
    want.extend_from_slice(b"err\n");
    want.extend(std::iter::repeat_n(b'x', 600_000));
    want.extend_from_slice(b"\xff\xfeend");
    // stdout and stderr are two pipes: their relative order is the agent's order of
    // reading them; the bytes of each are exact.
    let mut got_sorted = log.clone();
    got_sorted.sort_unstable();
    let mut want_sorted = want.clone();
    want_sorted.sort_unstable();
    assert_eq!(log.len(), want.len());
    assert_eq!(got_sorted, want_sorted);
    assert!(log.ends_with(b"\xff\xfeend"));
    // What the attempt used, measured on the agent, travels with its completion; each
    // step's with its end.
    let usage = record.attempts[0]
        .usage
        .as_ref()
        .expect("the attempt's usage");
    assert!(usage.cpu_seconds().is_some(), "{usage:?}");
    assert_eq!(usage.source, "rusage");
    let caps = entry.runner.capabilities();
    assert!(
        caps.usage.contains(&rustci_runners::UsageFigure::CpuTime),
        "{caps:?}"
    );
    let mut events = cp.plane.subscribe();
    let id = cp.plane.submit(remote_job("true"), "test").unwrap();
    let mut step_usage = false;
    let mut job_usage = false;
    while !(step_usage && job_usage) {
        let ev = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("events")
            .unwrap();
        if let rustci_control::ControlEvent::Job { id: j, event, .. } = ev
            && j == id
            && let rustci_runners::EventKind::Usage { step, usage } = event.kind
        {
            assert!(usage.cpu_user_seconds.is_some());
            match step {
                Some(0) => step_usage = true,
                None => job_usage = true,
                other => panic!("usage of step {other:?}"),
            }
        }
    }
    wait_state(&cp.plane, &id, JobState::Succeeded).await;

    // A failing job is a failed outcome, with its exit code, over the wire.
    let id = cp.plane.submit(remote_job("exit 7"), "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Failed).await;
    assert!(matches!(
        cp.plane.get(&id).unwrap().outcome,
        Some(Outcome::Failed { exit_code: 7, .. })
    ));

    // Cancel reaches the agent and stops the job there.
    let id = cp.plane.submit(remote_job("sleep 30"), "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Running).await;
    assert!(cp.plane.cancel(&id));
    wait_state(&cp.plane, &id, JobState::Cancelled).await;

    // Completed attempts are forgotten by the agent once acknowledged.
    tokio::time::timeout(Duration::from_secs(10), async {
        while agent.held() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the agent forgot acknowledged attempts");

    // Restarting the agent reuses its identity (no token needed).
    let id_before = agent.id().to_string();
    agent.stop().await;
    let mut again = agent_options(&cp, data.path());
    again.token = None;
    let agent = Agent::start(again).await.unwrap();
    assert_eq!(agent.id(), id_before);
    agent.wait_connected(true).await;
    let id = cp.plane.submit(remote_job("echo again"), "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Succeeded).await;
    assert_eq!(log_of(&cp.plane, &id).await, b"again\n");
    agent.stop().await;
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_audited() {
    let cp = control_side().await;
    // A wrong token.
    let data = tempfile::tempdir().unwrap();
    let mut o = agent_options(&cp, data.path());
    o.token = Some("not-a-token".into());
    let err = Agent::start(o).await.unwrap_err();
    assert!(
        err.contains("registration refused") && err.contains("not valid"),
        "{err}"
    );
    assert!(!data.path().join("agent.json").exists());

    // A CA pin that does not match what the server presents.
    let data = tempfile::tempdir().unwrap();
    let mut o = agent_options(&cp, data.path());
    o.ca = Some(CaSource::Fingerprint(format!("sha256:{}", "ab".repeat(32))));
    let err = Agent::start(o).await.unwrap_err();
    assert!(err.contains("pinned fingerprint"), "{err}");

    // The token works once…
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(agent_options(&cp, data.path())).await.unwrap();
    agent.wait_connected(true).await;
    // …and not twice.
    let data2 = tempfile::tempdir().unwrap();
    let mut o = agent_options(&cp, data2.path());
    o.name = Some("agent-b".into());
    let err = Agent::start(o).await.unwrap_err();
    assert!(err.contains("not valid or was used"), "{err}");

    // A session without a client certificate.
    let ca = std::fs::read_to_string(data.path().join("ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .domain_name(rustci_runners_valkyrie::pki::SERVER_NAME);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cp.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = rustci_runners_valkyrie::proto::valkyrie_client::ValkyrieClient::new(channel);
    let status = client.session(futures::stream::empty()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );

    // A revoked agent is disconnected and cannot come back.
    let id = agent.id().to_string();
    assert!(cp.hub.revoke(&id, "admin"));
    agent.wait_connected(false).await;
    assert!(
        cp.plane
            .registry()
            .list()
            .iter()
            .all(|e| !e.info().id.starts_with(&id))
    );
    let audit = cp.tokens.audit.lock().unwrap().clone();
    assert!(
        audit
            .iter()
            .any(|(_, a, r)| a == "agent.register" && r.starts_with("denied")),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|(_, a, r)| a == "agent.session" && r == "denied: no client certificate"),
        "{audit:?}"
    );
    // Its reconnection attempts are refused as revoked.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if cp
                .tokens
                .audit
                .lock()
                .unwrap()
                .iter()
                .any(|(_, a, r)| a == "agent.session" && r == "denied: revoked")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the revoked agent's reconnection was refused");
    agent.stop().await;
    cp.hub.shutdown();
}

/// A runner whose first start is special: it fails at once (`release` None), or waits
/// until released and then fails (`then_runs` false) or starts the job (true).
struct FirstStartFails {
    inner: std::sync::Arc<dyn rustci_runners::Runner>,
    first: std::sync::atomic::AtomicBool,
    release: Option<std::sync::Arc<tokio::sync::Notify>>,
    then_runs: bool,
    /// Starts of the inner runner that returned an execution.
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl rustci_runners::Runner for FirstStartFails {
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
        if self.first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            if let Some(r) = &self.release {
                r.notified().await;
            }
            if !self.then_runs {
                return Err(rustci_runners::Error::unavailable("no room right now"));
            }
        }
        let execution = self.inner.start(job, id).await?;
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(execution)
    }
}

async fn agent_with(
    cp: &ControlSide,
    data: &std::path::Path,
    release: Option<std::sync::Arc<tokio::sync::Notify>>,
    then_runs: bool,
) -> (Agent, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let mut options = agent_options(cp, data);
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    options.runners = vec![(
        "local".into(),
        std::sync::Arc::new(FirstStartFails {
            inner: native_runner("agent-local"),
            first: true.into(),
            release,
            then_runs,
            started: started.clone(),
        }),
    )];
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(true).await;
    wait_runner_healthy(&cp.plane).await;
    (agent, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_refusal_is_placed_again_without_costing_a_retry() {
    let cp = control_side().await;
    let data = tempfile::tempdir().unwrap();
    let (agent, _) = agent_with(&cp, data.path(), None, false).await;
    let marks = data.path().join("marks");
    // No retry policy: only an attempt that does not count can let it run again.
    let job = remote_job(&format!("echo ran >> {}", marks.display()));
    let id = cp.plane.submit(job, "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Succeeded).await;
    let record = cp.plane.get(&id).unwrap();
    assert_eq!(record.attempts.len(), 2, "{record:?}");
    assert!(record.attempts[0].declined, "{record:?}");
    assert!(
        matches!(&record.attempts[0].outcome, Some(Outcome::RunnerError { message, .. }) if message.contains("refused the job") && message.contains("no room right now")),
        "{:?}",
        record.attempts[0].outcome
    );
    assert!(!record.attempts[1].declined);
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "ran\n");
    agent.stop().await;
    cp.hub.shutdown();
}

/// An offer not accepted in time (the local runner's start is slow) is withdrawn, but
/// the agent starts a job before it accepts it, so it may be running: the job is placed
/// again only once the agent says it no longer runs it. `then_runs`: the slow start
/// fails, and the agent refuses the offer late (it never ran: declined, costing no
/// retry, and the job runs on its next attempt); or it starts the job, which the agent
/// stops at once and releases (a runner failure: with no retry policy the job fails).
async fn withdrawn_offer(then_runs: bool) {
    let mut timings = rustci_runners_valkyrie::Timings::fast();
    timings.offer_timeout = Duration::from_millis(300);
    let cp = control_side_with(timings).await;
    let data = tempfile::tempdir().unwrap();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (agent, started) = agent_with(&cp, data.path(), Some(release.clone()), then_runs).await;
    let marks = data.path().join("marks");
    let job = remote_job(&format!(
        "echo started >> {m}; sleep 2; echo finished >> {m}",
        m = marks.display()
    ));
    let id = cp.plane.submit(job, "test").unwrap();
    until("the offer is withdrawn", || {
        cp.hub.agent(agent.id()).unwrap().withdrawn == 1
    })
    .await;
    // Withdrawn, but not given back: the agent still holds it (its start is pending).
    let record = cp.plane.get(&id).unwrap();
    assert!(!record.state.is_terminal(), "{record:?}");
    assert_eq!(record.attempts.len(), 1, "{record:?}");
    assert_eq!(record.attempts[0].outcome, None, "{record:?}");
    assert_eq!(agent.held(), 1);

    release.notify_one();
    let ends = if then_runs {
        JobState::Failed
    } else {
        JobState::Succeeded
    };
    wait_state(&cp.plane, &id, ends).await;
    until("the agent holds nothing", || agent.held() == 0).await;
    assert_eq!(cp.hub.agent(agent.id()).unwrap().withdrawn, 0);
    let marks = std::fs::read_to_string(&marks).unwrap_or_default();
    let record = cp.plane.get(&id).unwrap();
    let first = &record.attempts[0];
    assert!(
        matches!(&first.outcome, Some(Outcome::RunnerError { message, temporary: true }) if message.contains("did not accept")),
        "{:?}",
        first.outcome
    );
    // One start of the job reached the runner either way: the late one that was
    // stopped, or the next attempt's.
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);
    if then_runs {
        // Stopped before its end, and not placed again.
        assert!(!marks.contains("finished"), "{marks:?}");
        assert_eq!(record.attempts.len(), 1, "{record:?}");
        assert!(!first.declined, "{record:?}");
    } else {
        assert!(first.declined, "{record:?}");
        assert!(
            matches!(&first.outcome, Some(Outcome::RunnerError { message, .. }) if message.contains("then refused it")),
            "{:?}",
            first.outcome
        );
        assert_eq!(record.attempts.len(), 2, "{record:?}");
        assert_eq!(marks, "started\nfinished\n");
    }
    agent.stop().await;
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_offer_that_the_agent_refuses_late_is_declined_and_placed_again() {
    withdrawn_offer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_offer_that_started_late_is_stopped_and_given_back_then() {
    withdrawn_offer(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_reads_what_its_last_run_left_and_clears_the_rest() {
    let cp = control_side().await;
    let proxy = Proxy::start(cp.addr.clone()).await;
    let data = tempfile::tempdir().unwrap();
    let mut options = agent_options(&cp, data.path());
    options.server = proxy.addr.clone();
    let agent = Agent::start(options.clone()).await.unwrap();
    agent.wait_connected(true).await;
    agent.stop().await;

    // What a crashed run could leave: a finished attempt whose completion is owed (its
    // output in a file), an unfinished one (output too), one let go, a line cut off by
    // the crash, an earlier version's directory, and output no record names.
    let attempts = data.path().join("attempts");
    std::fs::write(attempts.join("job-z-1.out"), b"output").unwrap();
    std::fs::write(attempts.join("job-x-1.out"), b"partial").unwrap();
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(b"output")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let outcome = serde_json::to_string(&Outcome::Succeeded).unwrap();
    let journal = format!(
        "{{\"op\":\"start\",\"exec\":\"job-z-1\",\"job_id\":\"job-z\",\"attempt\":1,\"runner\":\"local\"}}\n\
         {{\"op\":\"start\",\"exec\":\"job-x-1\",\"job_id\":\"job-x\",\"attempt\":1,\"runner\":\"local\"}}\n\
         {{\"op\":\"start\",\"exec\":\"job-v-1\",\"job_id\":\"job-v\",\"attempt\":1,\"runner\":\"local\"}}\n\
         {{\"op\":\"done\",\"exec\":\"job-z-1\",\"finished\":{{\"outcome\":{outcome},\"length\":6,\"sha256\":\"{sha}\",\"dropped\":0}}}}\n\
         {{\"op\":\"gone\",\"exec\":\"job-v-1\"}}\n\
         {{\"op\":\"done\",\"exec\":\"job-x-1\",\"fini"
    );
    std::fs::write(data.path().join("attempts.journal"), journal).unwrap();
    let old = attempts.join("job-y-1");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("meta.json"),
        b"{\"job_id\":\"job-y\",\"attempt\":1,\"runner\":\"local\"}",
    )
    .unwrap();
    std::fs::write(attempts.join("job-w-1.out"), b"nobody's").unwrap();

    // Restarted while the control plane cannot be reached: only the owed completion is
    // held; the rest is gone.
    proxy.cut();
    options.token = None;
    let agent = Agent::start(options).await.unwrap();
    assert_eq!(agent.held(), 1);
    let mut left: Vec<String> = std::fs::read_dir(&attempts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["job-z-1.out"]);
    // The journal was rewritten with the held attempt only.
    let journal = std::fs::read_to_string(data.path().join("attempts.journal")).unwrap();
    assert_eq!(journal.lines().count(), 2, "{journal}");
    assert!(journal.lines().all(|l| l.contains("job-z-1")), "{journal}");
    // Reconnected, the control plane does not know that attempt: it is aborted and its
    // files go.
    proxy.heal();
    agent.wait_connected(true).await;
    until("the unknown attempt is let go", || {
        agent.held() == 0 && std::fs::read_dir(&attempts).unwrap().next().is_none()
    })
    .await;
    let journal = std::fs::read_to_string(data.path().join("attempts.journal")).unwrap();
    assert!(
        journal.lines().last().unwrap().contains("\"gone\""),
        "{journal}"
    );
    agent.stop().await;
    cp.hub.shutdown();
}

/// (inode, length) of each file in `dir`, sorted.
fn files_in(dir: &std::path::Path) -> Vec<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<(u64, u64)> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| {
                let m = e.unwrap().metadata().unwrap();
                (m.ino(), m.len())
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort_unstable();
    v
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// A finished attempt's output file becomes an empty spare on both sides, and the next
/// attempt's output file is that spare (the same inode): a stream of short jobs
/// allocates no new files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_attempts_leave_empty_spares_that_the_next_attempts_reuse() {
    let cp = control_side().await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::start(agent_options(&cp, data.path())).await.unwrap();
    agent.wait_connected(true).await;
    wait_runner_healthy(&cp.plane).await;
    let hub = cp.dir.path().join("valkyrie");
    let agent_dir = data.path().to_path_buf();

    let id = cp.plane.submit(remote_job("echo first"), "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Succeeded).await;
    assert_eq!(log_of(&cp.plane, &id).await, b"first\n");
    until("both sides keep the attempt's file as a spare", || {
        files_in(&hub.join("spare")).len() == 1 && files_in(&agent_dir.join("spare")).len() == 1
    })
    .await;
    let hub_spare = files_in(&hub.join("spare"))[0];
    let agent_spare = files_in(&agent_dir.join("spare"))[0];
    assert_eq!((hub_spare.1, agent_spare.1), (0, 0), "spares are emptied");
    assert!(files_in(&hub.join("attempts")).is_empty());
    assert!(files_in(&agent_dir.join("attempts")).is_empty());

    // The next attempt writes into the spares.
    let id = cp
        .plane
        .submit(remote_job("echo second; sleep 30"), "test")
        .unwrap();
    until("the second attempt's output is stored", || {
        files_in(&hub.join("attempts")) == [(hub_spare.0, 7)]
            && files_in(&agent_dir.join("attempts")) == [(agent_spare.0, 7)]
    })
    .await;
    assert!(files_in(&hub.join("spare")).is_empty());
    assert!(files_in(&agent_dir.join("spare")).is_empty());
    assert!(cp.plane.cancel(&id));
    wait_state(&cp.plane, &id, JobState::Cancelled).await;
    assert_eq!(log_of(&cp.plane, &id).await, b"second\n");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runner_with_a_full_disk_is_degraded_and_takes_no_new_jobs() {
    let cp = control_side().await;
    let data = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let used = rustci_runners::HostPressure::measure(ws.path())
        .disk_used_percent
        .unwrap_or(0.0);
    if used < 1.0 {
        eprintln!(
            "SKIPPED: the temporary directory's file system is {used:.2}% used; the test needs a threshold below its use"
        );
        return;
    }
    let mut c = rustci_runners::HostConfig::named("agent-full");
    c.workspace_root = ws.path().to_path_buf();
    c.disk_full_percent = used / 2.0;
    let mut options = agent_options(&cp, data.path());
    options.runners = vec![(
        "local".into(),
        std::sync::Arc::new(rustci_runners::LocalRunner::new(c).unwrap()),
    )];
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(true).await;
    // The agent's heartbeat says its runner is full: degraded (not unhealthy), no new jobs.
    let id = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(e) = cp.plane.registry().list().into_iter().find(|e| {
                e.info().kind == rustci_runners::RunnerKind::Valkyrie
                    && matches!(e.health, rustci_runners::Health::Full(_))
            }) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the agent's runner shows as full");
    assert_eq!(id.status, rustci_control::RunnerStatus::Degraded);
    let why = id.health.to_string();
    assert!(
        why.starts_with("full: on agent agent-a: workspace disk "),
        "{why}"
    );
    let job = cp.plane.submit(remote_job("echo ran"), "test").unwrap();
    let record = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let r = cp.plane.get(&job).unwrap();
            if r.why_pending
                .as_deref()
                .is_some_and(|w| w.contains("workspace disk"))
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job waits, saying why");
    assert_eq!(record.state, JobState::Queued);
    assert!(record.attempts.is_empty());
    assert!(cp.plane.cancel(&job));
    agent.stop().await;
}
