//! A control plane and an agent in one process, over real TLS on loopback: registration
//! with a pinned CA, mutual TLS sessions, a job run on the agent with its output stored
//! byte for byte, and the refusals (bad token, reused token, no client certificate,
//! wrong CA).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustci_control::{ControlEvent, ControlPlane, JobState};
use rustci_runners::job::RunsOn;
use rustci_runners::{
    HostConfig, Job, LeastLoaded, LocalRunner, Outcome, Runner, RunnerKind, Step,
};
use rustci_runners_valkyrie::pki::Authority;
use rustci_runners_valkyrie::{Admission, Agent, AgentOptions, CaSource, Hub, HubOptions, Timings};

/// Tokens that register one agent each; every audit entry kept.
#[derive(Default)]
struct Tokens {
    unused: Mutex<Vec<String>>,
    audit: Mutex<Vec<(String, String, String)>>,
}

impl Admission for Tokens {
    fn admit(&self, token: &str) -> Result<Vec<String>, String> {
        let mut unused = self.unused.lock().unwrap();
        match unused.iter().position(|t| t == token) {
            Some(i) => {
                unused.remove(i);
                Ok(vec!["from-token".into()])
            }
            None => Err("the registration token is not valid or was used".into()),
        }
    }
    fn audit(&self, actor: &str, action: &str, _target: Option<&str>, result: &str) {
        self.audit
            .lock()
            .unwrap()
            .push((actor.into(), action.into(), result.into()));
    }
}

struct ControlSide {
    plane: ControlPlane,
    hub: Hub,
    tokens: Arc<Tokens>,
    addr: String,
    fingerprint: String,
    _dir: tempfile::TempDir,
}

async fn control_side() -> ControlSide {
    let dir = tempfile::tempdir().unwrap();
    let (authority, _) = Authority::load_or_create(&dir.path().join("pki")).unwrap();
    let fingerprint = authority.fingerprint();
    let identity = authority.server_identity(&["127.0.0.1".into()]).unwrap();
    let tokens = Arc::new(Tokens::default());
    tokens.unused.lock().unwrap().push("token-1".into());
    let mut options = HubOptions::new(dir.path().join("valkyrie"));
    options.timings = Timings::fast();
    let hub = Hub::new(options, authority, tokens.clone()).unwrap();
    let plane = ControlPlane::new(LeastLoaded, Duration::from_millis(100));
    hub.attach(plane.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let serving = hub.clone();
    tokio::spawn(async move { serving.serve(listener, identity).await });
    ControlSide {
        plane,
        hub,
        tokens,
        addr,
        fingerprint,
        _dir: dir,
    }
}

fn native_runner(name: &str) -> Arc<dyn Runner> {
    let mut c = HostConfig::named(name);
    c.max_concurrency = Some(4);
    c.termination_grace = Duration::from_millis(200);
    Arc::new(LocalRunner::new(c).unwrap())
}

fn agent_options(cp: &ControlSide, data: &std::path::Path) -> AgentOptions {
    let mut o = AgentOptions::new(cp.addr.clone(), data);
    o.token = Some("token-1".into());
    o.ca = Some(CaSource::Fingerprint(cp.fingerprint.clone()));
    o.name = Some("agent-a".into());
    o.labels = vec!["fast".into()];
    o.runners = vec![("local".into(), native_runner("agent-local"))];
    o.backoff_base = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(500);
    o
}

async fn wait_state(plane: &ControlPlane, id: &rustci_runners::JobId, want: JobState) {
    let mut events = plane.subscribe();
    if plane.get(id).unwrap().state == want {
        return;
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(ControlEvent::JobState { id: got, state }) if &got == id && state == want => {
                    return;
                }
                Err(_) if plane.get(id).unwrap().state == want => return,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "job reached {want:?}; it is {:?}",
            plane.get(id).unwrap().state
        )
    });
}

async fn wait_runner_healthy(plane: &ControlPlane) -> String {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(e) = plane
                .registry()
                .list()
                .into_iter()
                .find(|e| e.info().kind == RunnerKind::Valkyrie && e.status.takes_jobs())
            {
                return e.info().id.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the agent's runner became healthy in the registry")
}

async fn log_of(plane: &ControlPlane, id: &rustci_runners::JobId) -> Vec<u8> {
    let mut f = plane.follow_log(id, 0).expect("log");
    let mut out = Vec::new();
    while let Some(c) = f.next().await {
        out.extend_from_slice(&c.unwrap().data);
    }
    out
}

fn remote_job(script: &str) -> Job {
    let mut job = Job::new("remote", vec![Step::run(script)]);
    let mut on = RunsOn::default();
    on.kind = Some(RunnerKind::Valkyrie);
    on.labels = vec!["fast".into(), "from-token".into()];
    job.runs_on = on;
    job
}

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
