//! Partitions between an agent and the control plane, cut and healed with a TCP proxy
//! on loopback (the multi-host tests do the same across Docker networks).

mod common;

use std::time::Duration;

use common::*;
use rustci_control::JobState;
use rustci_runners::job::{RetryPolicy, RetryWhen};
use rustci_runners::{Outcome, RunnerKind};
use rustci_runners_valkyrie::{Agent, Timings};

fn healthy_remote_runners(cp: &ControlSide) -> Vec<String> {
    cp.plane
        .registry()
        .list()
        .into_iter()
        .filter(|e| e.info().kind == RunnerKind::Valkyrie && e.status.takes_jobs())
        .map(|e| e.info().id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_longer_than_the_lease_fences_the_agent_and_the_job_moves_once() {
    let cp = control_side().await;
    let proxy = Proxy::start(cp.addr.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("marker");

    let a_data = tempfile::tempdir().unwrap();
    let mut a = agent_options(&cp, a_data.path());
    a.server = proxy.addr.clone();
    let a = Agent::start(a).await.unwrap();
    a.wait_connected(true).await;
    let a_runner = wait_runner_healthy(&cp.plane).await;

    let mut job = remote_job(
        "echo run >> \"$MARKER\"; echo started; sleep 3; echo end >> \"$MARKER\"; echo finished",
    );
    job.env
        .insert("MARKER".into(), marker.display().to_string());
    let mut retry = RetryPolicy::default();
    retry.max = 1;
    retry.when = vec![RetryWhen::Lost];
    job.retry = retry;
    let id = cp.plane.submit(job, "test").unwrap();
    wait_state(&cp.plane, &id, JobState::Running).await;
    until("the job started on agent a", || {
        std::fs::read_to_string(&marker).is_ok_and(|m| m == "run\n")
    })
    .await;

    // A second agent, reachable, for the retry.
    let b_data = tempfile::tempdir().unwrap();
    let mut b = agent_options(&cp, b_data.path());
    b.token = Some("token-2".into());
    b.name = Some("agent-b".into());
    let b = Agent::start(b).await.unwrap();
    b.wait_connected(true).await;
    until("both agents' runners take jobs", || {
        healthy_remote_runners(&cp).len() == 2
    })
    .await;

    proxy.cut();
    wait_state(&cp.plane, &id, JobState::Succeeded).await;
    let record = cp.plane.get(&id).unwrap();
    assert_eq!(record.attempts.len(), 2, "{:?}", record.attempts);
    assert_eq!(record.attempts[0].runner_id, a_runner);
    assert_eq!(record.attempts[0].outcome, Some(Outcome::Lost));
    assert_ne!(record.attempts[1].runner_id, a_runner);
    assert_eq!(record.attempts[1].outcome, Some(Outcome::Succeeded));
    // Agent a stopped its run by itself (it never reached its end); the job ran to its
    // end exactly once.
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\nrun\nend\n");

    // Healed: agent a reconnects holding its fenced attempt; the control plane refuses
    // it (abort), and nothing about the job changes.
    proxy.heal();
    until("agent a discarded its superseded attempt", || a.held() == 0).await;
    let after = cp.plane.get(&id).unwrap();
    assert_eq!(after.attempts, record.attempts);
    assert_eq!(after.outcome, Some(Outcome::Succeeded));
    let log = String::from_utf8(log_of(&cp.plane, &id).await).unwrap();
    assert!(log.starts_with("started\n"), "{log:?}");
    assert!(log.ends_with("started\nfinished\n"), "{log:?}");
    assert!(!log.contains("finished\nfinished"), "{log:?}");
    a.stop().await;
    b.stop().await;
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_shorter_than_the_lease_moves_nothing_and_loses_no_byte() {
    let mut timings = Timings::fast();
    timings.heartbeat = Duration::from_millis(400);
    timings.margin = Duration::from_secs(1);
    let cp = control_side_with(timings).await;
    let proxy = Proxy::start(cp.addr.clone()).await;
    let work = tempfile::tempdir().unwrap();
    let (started, go) = (work.path().join("started"), work.path().join("go"));

    let a_data = tempfile::tempdir().unwrap();
    let mut a = agent_options(&cp, a_data.path());
    a.server = proxy.addr.clone();
    let a = Agent::start(a).await.unwrap();
    a.wait_connected(true).await;
    let a_runner = wait_runner_healthy(&cp.plane).await;

    let mut job = remote_job(
        "echo first; touch \"$STARTED\"; while [ ! -e \"$GO\" ]; do sleep 0.01; done; \
         i=0; while [ $i -lt 3000 ]; do echo \"line $i of the partition\"; i=$((i+1)); done",
    );
    job.env
        .insert("STARTED".into(), started.display().to_string());
    job.env.insert("GO".into(), go.display().to_string());
    let id = cp.plane.submit(job, "test").unwrap();
    until("the job started", || started.exists()).await;

    // Cut, let the job write while the agent is away, heal before the lease ends.
    proxy.cut();
    a.wait_connected(false).await;
    std::fs::write(&go, b"").unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    proxy.heal();

    wait_state(&cp.plane, &id, JobState::Succeeded).await;
    let record = cp.plane.get(&id).unwrap();
    assert_eq!(record.attempts.len(), 1, "{:?}", record.attempts);
    assert_eq!(record.attempts[0].runner_id, a_runner);
    let mut want = String::from("first\n");
    for i in 0..3000 {
        want.push_str(&format!("line {i} of the partition\n"));
    }
    let log = String::from_utf8(log_of(&cp.plane, &id).await).unwrap();
    assert_eq!(log.len(), want.len());
    assert!(
        log == want,
        "the stored log differs from what the job wrote"
    );
    a.stop().await;
    cp.hub.shutdown();
}
