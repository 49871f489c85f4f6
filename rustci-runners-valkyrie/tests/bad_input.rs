//! Bad input against the real hub, over real mutual TLS on loopback, from a hand-made
//! client (no `Agent`): it registers through `Register` with a token and a CSR, then
//! speaks `Session` and `Output` with the certificate it got. Every refusal must be a
//! gRPC status (or an answer) that names its cause, must change nothing stored, and must
//! leave the hub serving: each test checks the control plane's state after the refusal
//! (jobs, attempts, output, the hub's agents, the audit log).

mod common;

use std::time::Duration;

use common::*;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use rustci_control::JobState;
use rustci_runners::{JobId, Outcome};
use rustci_runners_valkyrie::proto::{
    self, agent_message, server_message, valkyrie_client::ValkyrieClient,
};
use rustci_runners_valkyrie::{
    AgentStatus, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Timings, pki,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

/// How long any one answer of the hub may take.
const WAIT: Duration = Duration::from_secs(5);

/// A control plane whose leases outlast every test: no session is closed, and no
/// attempt lost, for want of heartbeats the hand-made client does not send.
async fn plane() -> ControlSide {
    control_side_with(Timings::default()).await
}

// --- the hand-made agent ---------------------------------------------------------------

/// What registration gave the hand-made agent.
struct Creds {
    id: String,
    cert: String,
    key: String,
    ca: String,
}

async fn connect(
    cp: &ControlSide,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(pki::SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", cp.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Registers an agent named `name` with `token` and `labels` through the Register RPC.
async fn register(cp: &ControlSide, token: &str, name: &str, labels: &[&str]) -> Creds {
    let (key, csr) = pki::new_key_and_csr(name).unwrap();
    let channel = connect(cp, cp.hub.authority().ca_pem(), None)
        .await
        .unwrap();
    let r = ValkyrieClient::new(channel)
        .register(proto::RegisterRequest {
            token: token.into(),
            csr_pem: csr,
            name: name.into(),
            hostname: "hand-made".into(),
            version: "test".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        })
        .await
        .expect("registered")
        .into_inner();
    assert_eq!(r.ca_pem, cp.hub.authority().ca_pem());
    Creds {
        id: r.agent_id,
        cert: r.certificate_pem,
        key,
        ca: r.ca_pem,
    }
}

impl Creds {
    async fn client(&self, cp: &ControlSide) -> ValkyrieClient<Channel> {
        ValkyrieClient::new(
            connect(cp, &self.ca, Some((&self.cert, &self.key)))
                .await
                .unwrap(),
        )
    }
}

fn kind(k: agent_message::Kind) -> proto::AgentMessage {
    proto::AgentMessage { kind: Some(k) }
}

fn hello_with(protocol: u32, held: Vec<proto::HeldAttempt>) -> proto::AgentMessage {
    let caps = serde_json::to_string(native_runner("caps").capabilities()).unwrap();
    kind(agent_message::Kind::Hello(proto::Hello {
        protocol,
        agent_version: "test".into(),
        boot_id: "boot-1".into(),
        hostname: "hand-made".into(),
        runners: vec![proto::LocalRunner {
            name: "local".into(),
            kind: "native".into(),
            labels: vec![],
            slots: 4,
            capabilities_json: caps,
        }],
        held,
        draining: false,
    }))
}

fn hello() -> proto::AgentMessage {
    hello_with(PROTOCOL_VERSION, vec![])
}

fn held(r: &proto::AttemptRef, spooled: u64) -> proto::HeldAttempt {
    proto::HeldAttempt {
        attempt: Some(r.clone()),
        spooled,
        finished: false,
    }
}

fn heartbeat(seq: u64, running: Vec<proto::AttemptRef>) -> proto::AgentMessage {
    kind(agent_message::Kind::Heartbeat(proto::Heartbeat {
        seq,
        running,
        ..Default::default()
    }))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn complete(
    r: &proto::AttemptRef,
    outcome: &Outcome,
    length: u64,
    sha256: String,
) -> proto::AgentMessage {
    kind(agent_message::Kind::Complete(proto::Complete {
        attempt: Some(r.clone()),
        outcome_json: serde_json::to_string(outcome).unwrap(),
        length,
        sha256,
        dropped: 0,
        usage_json: String::new(),
    }))
}

/// One session: what the client sends, and what the hub answers.
struct Session {
    tx: UnboundedSender<proto::AgentMessage>,
    rx: Streaming<proto::ServerMessage>,
}

impl Session {
    fn send(&self, m: proto::AgentMessage) {
        self.tx
            .unbounded_send(m)
            .expect("the request stream is open");
    }

    /// The next message of the hub.
    async fn next(&mut self) -> server_message::Kind {
        match tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a message from the hub in time")
        {
            Ok(Some(m)) => m.kind.expect("a server message has a kind"),
            Ok(None) => panic!("the hub ended the session without a status"),
            Err(s) => panic!("the hub ended the session: {s:?}"),
        }
    }

    /// The status that ends the session (the stream must end with one, not plainly).
    async fn ended(&mut self) -> Status {
        match tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("the session ended in time")
        {
            Err(s) => s,
            Ok(Some(m)) => panic!("the session goes on: {m:?}"),
            Ok(None) => panic!("the session ended with no status: its cause is not told"),
        }
    }

    /// Sends a heartbeat and expects its ack as the next message: the session is alive,
    /// and nothing else was queued for this agent before it.
    async fn alive(&mut self, seq: u64) {
        self.send(heartbeat(seq, vec![]));
        match self.next().await {
            server_message::Kind::HeartbeatAck(a) => assert_eq!(a.seq, seq),
            other => panic!("expected the ack of heartbeat {seq}, got {other:?}"),
        }
    }
}

/// Opens a session whose first message is `first`; the hub's status if it refuses.
async fn try_session(
    client: &mut ValkyrieClient<Channel>,
    first: proto::AgentMessage,
) -> Result<Session, Status> {
    let (tx, rx) = unbounded();
    tx.unbounded_send(first).unwrap();
    let response = tokio::time::timeout(WAIT, client.session(rx))
        .await
        .expect("the hub answered the session in time")?;
    Ok(Session {
        tx,
        rx: response.into_inner(),
    })
}

async fn refused_session(
    client: &mut ValkyrieClient<Channel>,
    first: proto::AgentMessage,
) -> Status {
    match try_session(client, first).await {
        Err(s) => s,
        Ok(mut s) => panic!("the session was accepted: {:?}", s.next().await),
    }
}

/// Opens a session with `hello` and takes the welcome.
async fn open(
    client: &mut ValkyrieClient<Channel>,
    hello: proto::AgentMessage,
) -> (Session, proto::Welcome) {
    let mut s = try_session(client, hello).await.expect("session accepted");
    match s.next().await {
        server_message::Kind::Welcome(w) => (s, w),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Reconnects an agent that holds `r` with `spooled` bytes: the hub must continue it
/// from `spooled`.
async fn reconnect(
    client: &mut ValkyrieClient<Channel>,
    r: &proto::AttemptRef,
    spooled: u64,
) -> Session {
    let (s, welcome) = open(client, hello_with(PROTOCOL_VERSION, vec![held(r, spooled)])).await;
    assert_eq!(
        welcome.verdicts,
        vec![proto::HeldVerdict {
            attempt: Some(r.clone()),
            verdict: proto::Verdict::Continue as i32,
            offset: spooled,
        }]
    );
    s
}

struct Output {
    tx: UnboundedSender<proto::OutputChunk>,
    rx: Streaming<proto::OutputAck>,
}

impl Output {
    async fn open(client: &mut ValkyrieClient<Channel>) -> Output {
        let (tx, rx) = unbounded();
        let response = tokio::time::timeout(WAIT, client.output(rx))
            .await
            .expect("the hub answered the output stream in time")
            .expect("output stream accepted");
        Output {
            tx,
            rx: response.into_inner(),
        }
    }

    fn send(&self, r: &proto::AttemptRef, offset: u64, data: &[u8], stream: u32) {
        self.tx
            .unbounded_send(proto::OutputChunk {
                attempt: Some(r.clone()),
                offset,
                data: data.to_vec(),
                stream,
                step: 0,
            })
            .expect("the request stream is open");
    }

    async fn reply(&mut self) -> Result<Option<proto::OutputAck>, Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("the hub answered the chunk in time")
    }

    /// Sends one chunk (stdout) and takes its ack.
    async fn chunk(&mut self, r: &proto::AttemptRef, offset: u64, data: &[u8]) -> proto::OutputAck {
        self.send(r, offset, data, 0);
        self.reply()
            .await
            .expect("an ack, not a status")
            .expect("an ack, not the end of the stream")
    }

    /// The status that ends the output stream.
    async fn ended(&mut self) -> Status {
        match self.reply().await {
            Err(s) => s,
            Ok(Some(a)) => panic!("the output stream goes on: {a:?}"),
            Ok(None) => panic!("the output stream ended with no status: its cause is not told"),
        }
    }
}

/// A job for the runner of the agent with label `label`.
fn job_for(label: &str) -> rustci_runners::Job {
    let mut job = remote_job("echo 'never run: the agent is hand-made'");
    job.runs_on.labels = vec![label.into()];
    job
}

/// Submits a job for `label`, takes its offer on `s`, accepts it and waits until the
/// control plane has it running.
async fn take_job(cp: &ControlSide, s: &mut Session, label: &str) -> (JobId, proto::AttemptRef) {
    let id = cp.plane.submit(job_for(label), "test").unwrap();
    let offer = match s.next().await {
        server_message::Kind::Offer(o) => o,
        other => panic!("expected an offer, got {other:?}"),
    };
    let r = offer.attempt.expect("an offer names its attempt");
    assert_eq!((r.job_id.as_str(), r.attempt), (id.as_str(), 1));
    assert_eq!(offer.runner, "local");
    s.send(kind(agent_message::Kind::Accept(proto::Accept {
        attempt: Some(r.clone()),
    })));
    wait_state(&cp.plane, &id, JobState::Running).await;
    (id, r)
}

/// A registered agent with a live session, its runner healthy in the registry.
async fn connected(
    cp: &ControlSide,
    token: &str,
    name: &str,
    label: &str,
) -> (Creds, ValkyrieClient<Channel>, Session) {
    let creds = register(cp, token, name, &[label]).await;
    let mut client = creds.client(cp).await;
    let (s, welcome) = open(&mut client, hello()).await;
    assert_eq!(welcome.agent_id, creds.id);
    assert_eq!(welcome.protocol, PROTOCOL_VERSION);
    let runner = format!("{}.local", creds.id);
    until("the agent's runner is healthy in the registry", || {
        cp.plane
            .registry()
            .get(&runner)
            .is_some_and(|e| e.status.takes_jobs())
    })
    .await;
    (creds, client, s)
}

/// What the hub shows of its agents: id, name, status, runners, running attempts.
fn agents(cp: &ControlSide) -> Vec<(String, String, AgentStatus, Vec<String>, usize)> {
    cp.hub
        .agents()
        .into_iter()
        .map(|a| (a.id, a.name, a.status, a.runners, a.running))
        .collect()
}

fn audit(cp: &ControlSide) -> Vec<(String, String, String)> {
    cp.tokens.audit.lock().unwrap().clone()
}

fn sessions_started(cp: &ControlSide) -> usize {
    audit(cp)
        .iter()
        .filter(|(_, a, r)| a == "agent.session" && r == "ok")
        .count()
}

fn status_of(cp: &ControlSide, id: &str) -> AgentStatus {
    cp.hub.agent(id).expect("registered").status
}

/// The job is still running its first attempt, with no outcome.
fn still_running(cp: &ControlSide, id: &JobId) {
    let r = cp.plane.get(id).unwrap();
    assert_eq!(r.state, JobState::Running, "{r:?}");
    assert_eq!(r.attempts.len(), 1, "{r:?}");
    assert_eq!(r.attempts[0].outcome, None, "{r:?}");
    assert_eq!(r.outcome, None, "{r:?}");
}

/// Stores `data` as the whole output of `r` and completes it as succeeded: the job
/// succeeds with exactly that log.
async fn finish(
    cp: &ControlSide,
    client: &mut ValkyrieClient<Channel>,
    s: &mut Session,
    id: &JobId,
    r: &proto::AttemptRef,
    data: &[u8],
) {
    if !data.is_empty() {
        let mut out = Output::open(client).await;
        let ack = out.chunk(r, 0, data).await;
        assert_eq!((ack.offset, ack.error.as_str()), (data.len() as u64, ""));
    }
    s.send(complete(
        r,
        &Outcome::Succeeded,
        data.len() as u64,
        sha256_hex(data),
    ));
    match s.next().await {
        server_message::Kind::CompleteAck(a) => assert_eq!(a.attempt.as_ref(), Some(r)),
        other => panic!("expected the completion's ack, got {other:?}"),
    }
    wait_state(&cp.plane, id, JobState::Succeeded).await;
    assert_eq!(cp.plane.get(id).unwrap().attempts.len(), 1);
    assert_eq!(log_of(&cp.plane, id).await, data);
}

// --- the hello ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_an_unsupported_protocol_version_is_refused_naming_both_versions() {
    let cp = plane().await;
    let creds = register(&cp, "token-1", "hand-a", &["first"]).await;
    let mut client = creds.client(&cp).await;
    let runner = format!("{}.local", creds.id);

    // Refused before any session: the agent does not connect, its runner is not
    // registered, no session is recorded.
    for version in [0, PROTOCOL_VERSION + 1, 99] {
        let status = refused_session(&mut client, hello_with(version, vec![])).await;
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&format!(
                "protocol version {version} is not supported; this control plane speaks version {PROTOCOL_VERSION}"
            )),
            "{status:?}"
        );
    }
    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Disconnected);
    assert!(cp.plane.registry().get(&runner).is_none());
    assert_eq!(sessions_started(&cp), 0, "{:?}", audit(&cp));

    // Refused while a session is live: the live session is not replaced.
    let (mut live, _) = open(&mut client, hello()).await;
    until("the agent's runner is healthy", || {
        cp.plane
            .registry()
            .get(&runner)
            .is_some_and(|e| e.status.takes_jobs())
    })
    .await;
    let (job, r) = take_job(&cp, &mut live, "first").await;
    let before = agents(&cp);
    let status = refused_session(&mut client, hello_with(99, vec![held(&r, 0)])).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("protocol version 99"),
        "{status:?}"
    );
    assert_eq!(agents(&cp), before);
    assert_eq!(sessions_started(&cp), 1, "{:?}", audit(&cp));
    live.alive(1).await;
    still_running(&cp, &job);
    finish(&cp, &mut client, &mut live, &job, &r, b"still here\n").await;
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_an_invalid_runner_is_refused_and_registers_nothing() {
    let cp = plane().await;
    let creds = register(&cp, "token-1", "hand-a", &["first"]).await;
    let mut client = creds.client(&cp).await;
    let with_runner = |name: &str, caps: &str| {
        let mut m = hello();
        let Some(agent_message::Kind::Hello(h)) = &mut m.kind else {
            unreachable!()
        };
        h.runners[0].name = name.into();
        h.runners[0].capabilities_json = caps.into();
        m
    };
    let good_caps = serde_json::to_string(native_runner("caps").capabilities()).unwrap();

    let status = refused_session(&mut client, with_runner("no spaces", &good_caps)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("local runner name \"no spaces\": 1 to 64 ASCII letters"),
        "{status:?}"
    );
    let status = refused_session(&mut client, with_runner("local", "{\"run_steps\": 1")).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("capabilities of local runner local: "),
        "{status:?}"
    );

    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Disconnected);
    assert!(
        cp.plane
            .registry()
            .list()
            .iter()
            .all(|e| !e.info().id.starts_with(&creds.id)),
        "no runner of the agent is registered"
    );
    assert_eq!(sessions_started(&cp), 0, "{:?}", audit(&cp));
    // The agent can still connect with a good hello.
    let (mut s, _) = open(&mut client, hello()).await;
    s.alive(1).await;
    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Healthy);
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_that_is_not_a_hello_is_refused() {
    let cp = plane().await;
    let creds = register(&cp, "token-1", "hand-a", &["first"]).await;
    let mut client = creds.client(&cp).await;
    let made_up = proto::AttemptRef {
        job_id: "made-up".into(),
        attempt: 1,
    };
    let not_hellos = [
        heartbeat(1, vec![]),
        kind(agent_message::Kind::Accept(proto::Accept {
            attempt: Some(made_up.clone()),
        })),
        complete(&made_up, &Outcome::Succeeded, 0, sha256_hex(b"")),
        kind(agent_message::Kind::Goodbye(proto::Goodbye {
            reason: "bye".into(),
        })),
        proto::AgentMessage { kind: None },
    ];
    for first in not_hellos {
        let status = refused_session(&mut client, first).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            "the first message of a session must be a hello"
        );
    }
    // A session that ends before its hello.
    let (tx, rx) = unbounded::<proto::AgentMessage>();
    drop(tx);
    let status = tokio::time::timeout(WAIT, client.session(rx))
        .await
        .expect("answered in time")
        .expect_err("refused");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        status.message().contains("ended before its hello"),
        "{status:?}"
    );

    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Disconnected);
    assert!(
        cp.plane
            .registry()
            .get(&format!("{}.local", creds.id))
            .is_none()
    );
    assert_eq!(sessions_started(&cp), 0, "{:?}", audit(&cp));

    // While a session is live, a second one that does not begin with a hello neither
    // replaces it nor touches its attempt.
    let (mut live, _) = open(&mut client, hello()).await;
    until("the agent's runner is healthy", || {
        cp.plane
            .registry()
            .get(&format!("{}.local", creds.id))
            .is_some_and(|e| e.status.takes_jobs())
    })
    .await;
    let (job, r) = take_job(&cp, &mut live, "first").await;
    let before = agents(&cp);
    for first in [
        complete(&r, &Outcome::Succeeded, 0, sha256_hex(b"")),
        heartbeat(7, vec![]),
    ] {
        let status = refused_session(&mut client, first).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("must be a hello"), "{status:?}");
    }
    assert_eq!(agents(&cp), before);
    live.alive(1).await;
    still_running(&cp, &job);
    finish(&cp, &mut client, &mut live, &job, &r, b"ok\n").await;
    cp.hub.shutdown();
}

// --- size --------------------------------------------------------------------------------

fn assert_too_large(status: &Status) {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large")
            && status
                .message()
                .contains(&format!("the limit is: {MAX_MESSAGE_BYTES} bytes")),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_limit_is_refused_as_too_large() {
    let cp = plane().await;
    let creds = register(&cp, "token-1", "hand-a", &["first"]).await;
    let mut client = creds.client(&cp).await;
    let huge = "x".repeat(MAX_MESSAGE_BYTES);

    // As the first message: no session.
    let mut big_hello = hello();
    if let Some(agent_message::Kind::Hello(h)) = &mut big_hello.kind {
        h.hostname = huge.clone();
    }
    let status = refused_session(&mut client, big_hello).await;
    assert_too_large(&status);
    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Disconnected);
    assert_eq!(sessions_started(&cp), 0, "{:?}", audit(&cp));

    // Within a session: the session ends with the status; the attempt the agent holds
    // stays the agent's, and it continues it from where it was after reconnecting.
    let (mut s, _) = open(&mut client, hello()).await;
    until("the agent's runner is healthy", || {
        cp.plane
            .registry()
            .get(&format!("{}.local", creds.id))
            .is_some_and(|e| e.status.takes_jobs())
    })
    .await;
    let (job, r) = take_job(&cp, &mut s, "first").await;
    s.send(kind(agent_message::Kind::Goodbye(proto::Goodbye {
        reason: huge.clone(),
    })));
    assert_too_large(&s.ended().await);
    until("the hub closed the session", || {
        status_of(&cp, &creds.id) == AgentStatus::Disconnected
    })
    .await;
    still_running(&cp, &job);
    let mut s = reconnect(&mut client, &r, 0).await;
    // The oversized goodbye was not taken: the agent is not draining.
    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Healthy);

    // On the output stream: the stream ends with the status, and nothing is stored.
    let mut out = Output::open(&mut client).await;
    out.send(&r, 0, huge.as_bytes(), 0);
    assert_too_large(&out.ended().await);
    // One byte over the chunk limit (but under the message limit) is refused too.
    let mut out = Output::open(&mut client).await;
    out.send(&r, 0, &vec![b'y'; MAX_CHUNK_BYTES + 1], 0);
    let status = out.ended().await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        format!(
            "an output chunk of {} bytes; at most {MAX_CHUNK_BYTES}",
            MAX_CHUNK_BYTES + 1
        )
    );
    still_running(&cp, &job);
    s.alive(1).await;
    // The stored length is still 0: the first chunk at offset 0 is taken.
    finish(&cp, &mut client, &mut s, &job, &r, b"small\n").await;
    cp.hub.shutdown();
}

// --- unknown kinds -----------------------------------------------------------------------

/// `AgentMessage` as a later protocol version might have it: a `kind` oneof case (field
/// 42) this control plane does not know, beside the hello it does.
#[derive(Clone, PartialEq, prost::Message)]
struct LaterAgentMessage {
    #[prost(message, optional, tag = "1")]
    hello: Option<proto::Hello>,
    #[prost(message, optional, tag = "42")]
    later_kind: Option<proto::Goodbye>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_no_known_kind_ends_the_session_with_invalid_argument() {
    let cp = plane().await;
    let (creds, mut client, mut s) = connected(&cp, "token-1", "hand-a", "first").await;
    let (job, r) = take_job(&cp, &mut s, "first").await;
    let runners = agents(&cp)[0].3.clone();

    let unknown = format!(
        "a message of a kind this control plane does not know (protocol version {PROTOCOL_VERSION})"
    );
    let unknown = unknown.as_str();
    let refusals: Vec<(&str, proto::AgentMessage, &str)> = vec![
        (
            "an unset oneof",
            proto::AgentMessage { kind: None },
            unknown,
        ),
        (
            "a second hello",
            hello_with(PROTOCOL_VERSION, vec![held(&r, 0)]),
            "a second hello in one session",
        ),
        (
            "an attempt event of no known kind",
            kind(agent_message::Kind::Event(proto::AttemptEvent {
                attempt: Some(r.clone()),
                kind: None,
            })),
            "an attempt event of a kind this control plane does not know",
        ),
        (
            "an undecodable step status",
            kind(agent_message::Kind::Event(proto::AttemptEvent {
                attempt: Some(r.clone()),
                kind: Some(proto::attempt_event::Kind::StepFinished(
                    proto::StepFinished {
                        step: 0,
                        name: "build".into(),
                        status_json: "{\"exited\": \"zero\"}".into(),
                        duration_ms: 1,
                        usage_json: String::new(),
                    },
                )),
            })),
            "step_finished.status_json: ",
        ),
        (
            "an undecodable step usage",
            kind(agent_message::Kind::Event(proto::AttemptEvent {
                attempt: Some(r.clone()),
                kind: Some(proto::attempt_event::Kind::StepFinished(
                    proto::StepFinished {
                        step: 0,
                        name: "build".into(),
                        status_json: "{\"exited\": 0}".into(),
                        duration_ms: 1,
                        usage_json: "{\"cpu_user_seconds\": -1.5}".into(),
                    },
                )),
            })),
            "step_finished.usage_json: ",
        ),
        (
            "an undecodable outcome",
            kind(agent_message::Kind::Complete(proto::Complete {
                attempt: Some(r.clone()),
                outcome_json: "{\"result\": \"won\"}".into(),
                length: 0,
                sha256: sha256_hex(b""),
                dropped: 0,
                usage_json: String::new(),
            })),
            "complete.outcome_json: ",
        ),
        (
            "an undecodable usage",
            kind(agent_message::Kind::Complete(proto::Complete {
                attempt: Some(r.clone()),
                outcome_json: "{\"result\": \"succeeded\"}".into(),
                length: 0,
                sha256: sha256_hex(b""),
                dropped: 0,
                usage_json: "{\"peak_memory_bytes\": -5}".into(),
            })),
            "complete.usage_json: ",
        ),
    ];
    for (what, m, cause) in refusals {
        s.send(m);
        let status = s.ended().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(cause), "{what}: {status:?}");
        until("the hub closed the session", || {
            status_of(&cp, &creds.id) == AgentStatus::Disconnected
        })
        .await;
        // Nothing about the attempt changed: the agent continues it.
        still_running(&cp, &job);
        s = reconnect(&mut client, &r, 0).await;
    }

    // A oneof case from a later protocol version reaches the hub as an unset oneof.
    let channel = connect(&cp, &creds.ca, Some((&creds.cert, &creds.key)))
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = unbounded::<LaterAgentMessage>();
    let Some(agent_message::Kind::Hello(h)) = hello_with(PROTOCOL_VERSION, vec![held(&r, 0)]).kind
    else {
        unreachable!()
    };
    tx.unbounded_send(LaterAgentMessage {
        hello: Some(h),
        later_kind: None,
    })
    .unwrap();
    let mut later = grpc
        .streaming(
            tonic::Request::new(rx),
            tonic::codegen::http::uri::PathAndQuery::from_static("/valkyrie.v1.Valkyrie/Session"),
            tonic_prost::ProstCodec::<LaterAgentMessage, proto::ServerMessage>::default(),
        )
        .await
        .expect("session accepted")
        .into_inner();
    let welcome = tokio::time::timeout(WAIT, later.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(welcome.kind, Some(server_message::Kind::Welcome(_))),
        "{welcome:?}"
    );
    tx.unbounded_send(LaterAgentMessage {
        hello: None,
        later_kind: Some(proto::Goodbye {
            reason: "from the future".into(),
        }),
    })
    .unwrap();
    let status = tokio::time::timeout(WAIT, later.message())
        .await
        .unwrap()
        .expect_err("the session ends with a status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), unknown);
    until("the hub closed the session", || {
        status_of(&cp, &creds.id) == AgentStatus::Disconnected
    })
    .await;
    still_running(&cp, &job);

    let mut s = reconnect(&mut client, &r, 0).await;
    assert_eq!(agents(&cp)[0].3, runners);
    finish(&cp, &mut client, &mut s, &job, &r, b"done\n").await;
    cp.hub.shutdown();
}

// --- attempts the agent does not hold ----------------------------------------------------

fn assert_abort(m: server_message::Kind, r: Option<&proto::AttemptRef>, cause: &str) {
    match m {
        server_message::Kind::Abort(a) => {
            assert_eq!(a.attempt.as_ref(), r, "{a:?}");
            assert!(a.reason.contains(cause), "{a:?}");
        }
        other => panic!("expected an abort of {r:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_about_an_attempt_the_agent_does_not_hold_are_answered_with_abort() {
    let cp = plane().await;
    let (_a, mut client_a, mut a) = connected(&cp, "token-1", "hand-a", "first").await;
    let (_b, mut client_b, mut b) = connected(&cp, "token-2", "hand-b", "second").await;
    let (job_a, ra) = take_job(&cp, &mut a, "first").await;
    let (job_b, rb) = take_job(&cp, &mut b, "second").await;
    let before = agents(&cp);
    let not_held = |r: &proto::AttemptRef| {
        format!(
            "attempt {} of job {} is not held by this agent (superseded, cancelled or unknown)",
            r.attempt, r.job_id
        )
    };
    // Agent a, about b's attempt, a later attempt of its own job, and a made-up one.
    let ra2 = proto::AttemptRef {
        job_id: ra.job_id.clone(),
        attempt: 2,
    };
    let made_up = proto::AttemptRef {
        job_id: "no-such-job".into(),
        attempt: 1,
    };
    a.send(kind(agent_message::Kind::Accept(proto::Accept {
        attempt: Some(rb.clone()),
    })));
    a.send(kind(agent_message::Kind::Event(proto::AttemptEvent {
        attempt: Some(rb.clone()),
        kind: Some(proto::attempt_event::Kind::StepStarted(
            proto::StepStarted {
                step: 0,
                name: "forged".into(),
            },
        )),
    })));
    a.send(complete(
        &rb,
        &Outcome::Failed {
            step: 0,
            step_name: "forged".into(),
            exit_code: 3,
        },
        0,
        sha256_hex(b""),
    ));
    a.send(kind(agent_message::Kind::Accept(proto::Accept {
        attempt: Some(ra2.clone()),
    })));
    a.send(complete(&ra2, &Outcome::Succeeded, 0, sha256_hex(b"")));
    a.send(complete(&made_up, &Outcome::Succeeded, 0, sha256_hex(b"")));
    a.send(kind(agent_message::Kind::Accept(proto::Accept {
        attempt: None,
    })));
    a.send(kind(agent_message::Kind::Reject(proto::Reject {
        attempt: Some(rb.clone()),
        reason: "forged".into(),
        temporary: false,
    })));
    a.send(heartbeat(9, vec![rb.clone()]));

    assert_abort(a.next().await, Some(&rb), &not_held(&rb));
    assert_abort(a.next().await, Some(&rb), &not_held(&rb));
    assert_abort(a.next().await, Some(&rb), &not_held(&rb));
    assert_abort(a.next().await, Some(&ra2), &not_held(&ra2));
    assert_abort(a.next().await, Some(&ra2), &not_held(&ra2));
    assert_abort(a.next().await, Some(&made_up), &not_held(&made_up));
    assert_abort(
        a.next().await,
        None,
        "a message about an attempt without its attempt reference",
    );
    // The reject of an attempt it does not hold gets an abort like the rest; then the
    // heartbeat's ack, then the abort of the attempt it claims to run.
    assert_abort(a.next().await, Some(&rb), &not_held(&rb));
    match a.next().await {
        server_message::Kind::HeartbeatAck(h) => assert_eq!(h.seq, 9),
        other => panic!("expected the ack of heartbeat 9, got {other:?}"),
    }
    assert_abort(
        a.next().await,
        Some(&rb),
        &format!(
            "attempt 1 of job {} is not held by this agent (superseded, cancelled or lost)",
            rb.job_id
        ),
    );
    // None of this ended the session, or reached agent b.
    a.alive(10).await;
    b.alive(1).await;

    // Output about b's attempt is refused with abort and not stored.
    let mut out = Output::open(&mut client_a).await;
    let ack = out.chunk(&rb, 0, b"forged output\n").await;
    assert_eq!(ack.attempt.as_ref(), Some(&rb));
    assert!(ack.abort, "{ack:?}");
    assert_eq!(ack.offset, 0);
    assert_eq!(ack.error, not_held(&rb));
    // …and the output stream goes on.
    let ack = out.chunk(&made_up, 0, b"x").await;
    assert!(ack.abort && ack.error == not_held(&made_up), "{ack:?}");

    assert_eq!(agents(&cp), before);
    still_running(&cp, &job_a);
    still_running(&cp, &job_b);
    // Both attempts are intact: each agent finishes its own, with its own output only.
    finish(&cp, &mut client_b, &mut b, &job_b, &rb, b"b\n").await;
    finish(&cp, &mut client_a, &mut a, &job_a, &ra, b"a\n").await;
    cp.hub.shutdown();
}

// --- output offsets ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_chunk_at_the_wrong_offset_is_not_stored() {
    let cp = plane().await;
    let (_creds, mut client, mut s) = connected(&cp, "token-1", "hand-a", "first").await;
    let (job, r) = take_job(&cp, &mut s, "first").await;
    let mut out = Output::open(&mut client).await;
    let mismatch = |offset: u64, len: u64| {
        format!("offset {offset} does not match the stored length {len}; send from {len}")
    };

    // Ahead of the stored length (nothing stored yet).
    let ack = out.chunk(&r, 3, b"xyz").await;
    assert_eq!(ack.attempt.as_ref(), Some(&r));
    assert_eq!((ack.offset, ack.abort), (0, false), "{ack:?}");
    assert_eq!(ack.error, mismatch(3, 0));
    // At the stored length: stored.
    let ack = out.chunk(&r, 0, b"hello ").await;
    assert_eq!((ack.offset, ack.error.as_str(), ack.abort), (6, "", false));
    // Behind it (a resend of stored bytes, with other bytes): not stored.
    let ack = out.chunk(&r, 0, b"HELLO ").await;
    assert_eq!((ack.offset, ack.abort), (6, false), "{ack:?}");
    assert_eq!(ack.error, mismatch(0, 6));
    let ack = out.chunk(&r, 5, b"!!").await;
    assert_eq!(ack.error, mismatch(5, 6));
    // Far ahead of it.
    let ack = out.chunk(&r, u64::MAX, b"?").await;
    assert_eq!((ack.offset, ack.abort), (6, false), "{ack:?}");
    assert_eq!(ack.error, mismatch(u64::MAX, 6));
    // The stream goes on from the offset the hub told.
    let ack = out.chunk(&r, 6, b"world\n").await;
    assert_eq!((ack.offset, ack.error.as_str(), ack.abort), (12, "", false));

    // A chunk naming no known stream ends the output stream, storing nothing.
    out.send(&r, 12, b"???", 7);
    let status = out.ended().await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "output stream 7: 0 (stdout) or 1 (stderr)"
    );

    // A new output stream picks up at the stored length, which is still 12.
    let mut out = Output::open(&mut client).await;
    let ack = out.chunk(&r, 15, b"?").await;
    assert_eq!(ack.error, mismatch(15, 12));
    still_running(&cp, &job);
    s.send(complete(
        &r,
        &Outcome::Succeeded,
        12,
        sha256_hex(b"hello world\n"),
    ));
    match s.next().await {
        server_message::Kind::CompleteAck(a) => assert_eq!(a.attempt.as_ref(), Some(&r)),
        other => panic!("expected the completion's ack, got {other:?}"),
    }
    wait_state(&cp.plane, &job, JobState::Succeeded).await;
    assert_eq!(log_of(&cp.plane, &job).await, b"hello world\n");
    cp.hub.shutdown();
}

// --- completion ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_before_all_output_is_stored_is_not_acknowledged() {
    let cp = plane().await;
    let (_creds, mut client, mut s) = connected(&cp, "token-1", "hand-a", "first").await;
    let (job, r) = take_job(&cp, &mut s, "first").await;
    let mut out = Output::open(&mut client).await;
    assert_eq!(out.chunk(&r, 0, b"abc").await.offset, 3);

    // Claims 100 bytes (the hub holds 3, and never more than 3 here), with another
    // outcome than the real completion below.
    s.send(complete(
        &r,
        &Outcome::Failed {
            step: 0,
            step_name: "early".into(),
            exit_code: 3,
        },
        100,
        sha256_hex(&[b'a'; 100]),
    ));
    // The completions of one attempt are taken in order: once the real one is acked,
    // the early one has been handled, and must not have been acked or stored.
    s.send(complete(&r, &Outcome::Succeeded, 3, sha256_hex(b"abc")));
    match s.next().await {
        server_message::Kind::CompleteAck(a) => assert_eq!(a.attempt.as_ref(), Some(&r)),
        other => panic!("expected one completion's ack, got {other:?}"),
    }
    s.alive(1).await;
    until("the job ended", || {
        cp.plane.get(&job).unwrap().state.is_terminal()
    })
    .await;
    let record = cp.plane.get(&job).unwrap();
    assert_eq!(record.state, JobState::Succeeded, "{record:?}");
    assert_eq!(record.outcome, Some(Outcome::Succeeded), "{record:?}");
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(log_of(&cp.plane, &job).await, b"abc");
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_length_or_checksum_differs_ends_the_attempt_as_a_runner_error() {
    let cp = plane().await;
    let (_creds, mut client, mut s) = connected(&cp, "token-1", "hand-a", "first").await;

    // (length, sha256 the agent claims, stored bytes)
    let cases: [(u64, String, &[u8]); 2] = [
        // The same length, another checksum.
        (3, sha256_hex(b"abd"), b"abc"),
        // Fewer bytes than the hub holds.
        (4, sha256_hex(b"abcd"), b"abcdef"),
    ];
    for (length, sha, stored) in cases {
        let (job, r) = take_job(&cp, &mut s, "first").await;
        let mut out = Output::open(&mut client).await;
        assert_eq!(out.chunk(&r, 0, stored).await.offset, stored.len() as u64);
        s.send(complete(&r, &Outcome::Succeeded, length, sha.clone()));
        match s.next().await {
            server_message::Kind::CompleteAck(a) => assert_eq!(a.attempt.as_ref(), Some(&r)),
            other => panic!("expected the completion's ack, got {other:?}"),
        }
        until("the attempt ended", || {
            cp.plane.get(&job).unwrap().state.is_terminal()
        })
        .await;
        let record = cp.plane.get(&job).unwrap();
        assert_eq!(
            record.attempts.len(),
            1,
            "not retried (retry.max 0): {record:?}"
        );
        let want = format!(
            "the control plane's copy of the output ({} bytes) does not match the agent's ({length} bytes, sha256 {sha})",
            stored.len()
        );
        match &record.attempts[0].outcome {
            Some(Outcome::RunnerError { message, temporary }) => {
                assert!(message.contains(&want), "{message}");
                assert!(*temporary);
            }
            other => panic!("expected a runner error, got {other:?}"),
        }
        assert_eq!(record.state, JobState::Failed, "{record:?}");
        // The agent completing again (it missed the ack) is acked, and changes nothing.
        s.send(complete(&r, &Outcome::Succeeded, length, sha));
        match s.next().await {
            server_message::Kind::CompleteAck(a) => assert_eq!(a.attempt.as_ref(), Some(&r)),
            other => panic!("expected the completion's ack, got {other:?}"),
        }
        s.alive(1).await;
        assert_eq!(cp.plane.get(&job).unwrap().attempts, record.attempts);
        assert_eq!(cp.plane.get(&job).unwrap().state, record.state);
    }
    cp.hub.shutdown();
}

// --- forged sessions -----------------------------------------------------------------------

/// A TLS connection to the hub with the client certificate `cert`, made with rustls
/// directly, and one read after the HTTP/2 preface: the error that ends it, or
/// `served: …` when the server answers.
async fn raw_tls(cp: &ControlSide, ca: &str, cert: &str, key: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki::first_cert_der(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![pki::first_cert_der(cert).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&cp.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let result = tokio::time::timeout(WAIT, async {
        let mut tls = connector
            .connect(ServerName::try_from(pki::SERVER_NAME).unwrap(), tcp)
            .await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    })
    .await
    .expect("the hub answered in time");
    match result {
        Err(e) => e.to_string(),
        Ok(0) => panic!("the hub closed the connection without telling why"),
        Ok(n) => format!("served: {n} bytes of HTTP/2"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_signed_by_another_ca_is_refused() {
    let cp = plane().await;
    let (creds, _client, mut live) = connected(&cp, "token-1", "hand-a", "first").await;
    let before = agents(&cp);
    let audit_before = audit(&cp);

    // Another CA signs a certificate for the registered agent's id.
    let other = tempfile::tempdir().unwrap();
    let (rogue, _) = pki::Authority::load_or_create(other.path()).unwrap();
    let (key, csr) = pki::new_key_and_csr("forger").unwrap();
    let (cert, _) = rogue
        .sign_agent(&csr, &creds.id, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(
        pki::common_name(&pki::first_cert_der(&cert).unwrap()).unwrap(),
        creds.id
    );

    // Through tonic the refusal is a failed call: the server's TLS ends the connection.
    let status = match connect(&cp, &creds.ca, Some((&cert, &key))).await {
        Err(e) => Status::unavailable(format!("{e:?}")),
        Ok(channel) => match try_session(&mut ValkyrieClient::new(channel), hello()).await {
            Err(s) => s,
            Ok(_) => panic!("a session with a certificate of another CA"),
        },
    };
    assert!(
        matches!(
            status.code(),
            Code::Cancelled | Code::Unavailable | Code::Unknown
        ),
        "{status:?}"
    );
    // On the wire, the TLS handshake is refused with an alert that names the cause: the
    // certificate's issuer is not this control plane's CA (each CA has a name of its own).
    let err = raw_tls(&cp, &creds.ca, &cert, &key).await;
    assert_eq!(err, "received fatal alert: UnknownCA");
    // The hub's own certificate for the agent, over the same raw path, is served: the
    // refusal above is the certificate's doing, not the raw client's.
    let ok = raw_tls(&cp, &creds.ca, &creds.cert, &creds.key).await;
    assert!(ok.starts_with("served: "), "{ok}");

    assert_eq!(agents(&cp), before);
    // Each refused handshake (tonic's, which may try more than once, then the raw one) is
    // audited under the name the certificate claims; nothing else was.
    let after = audit(&cp);
    let added: Vec<_> = after[audit_before.len()..].to_vec();
    assert!(added.len() >= 2, "{added:?}");
    for (actor, action, result) in &added {
        assert_eq!(actor, &format!("cert:{}", creds.id));
        assert_eq!(action, "agent.tls");
        assert!(
            result.starts_with("denied: the client certificate is not valid")
                && result.contains("UnknownIssuer"),
            "{result}"
        );
    }
    assert_eq!(&after[..audit_before.len()], &audit_before[..]);
    live.alive(1).await;
    assert_eq!(status_of(&cp, &creds.id), AgentStatus::Healthy);
    cp.hub.shutdown();
}

// A registration whose CSR does not decode is refused before its token is spent: the
// same token then registers the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_with_a_bad_csr_is_refused_and_keeps_its_token() {
    let cp = plane().await;
    let channel = connect(&cp, cp.hub.authority().ca_pem(), None)
        .await
        .unwrap();
    let status = ValkyrieClient::new(channel)
        .register(proto::RegisterRequest {
            token: "token-1".into(),
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n".into(),
            name: "bad-csr".into(),
            hostname: "hand-made".into(),
            version: "test".into(),
            labels: vec![],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("certificate signing request"),
        "{status:?}"
    );
    assert!(agents(&cp).is_empty(), "nothing registered");
    assert!(
        audit(&cp)
            .iter()
            .any(|(_, a, r)| a == "agent.register" && r == "denied: bad CSR"),
        "{:?}",
        audit(&cp)
    );
    let creds = register(&cp, "token-1", "bad-csr", &[]).await;
    assert_eq!(agents(&cp).len(), 1);
    assert_eq!(agents(&cp)[0].0, creds.id);
    cp.hub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_for_an_unregistered_agent_is_refused_and_audited() {
    let cp = plane().await;
    let (creds, _client, mut live) = connected(&cp, "token-1", "hand-a", "first").await;
    let before = agents(&cp);

    // The hub's own CA, for an id it never registered.
    let ghost = "00000000-0000-4000-8000-000000000000";
    let (key, csr) = pki::new_key_and_csr("ghost").unwrap();
    let (cert, _) = cp
        .hub
        .authority()
        .sign_agent(&csr, ghost, Duration::from_secs(3600))
        .unwrap();
    let channel = connect(&cp, &creds.ca, Some((&cert, &key))).await.unwrap();
    let mut client = ValkyrieClient::new(channel);
    let not_registered = format!("agent {ghost} is not registered with this control plane");
    let denied = |action: &str| {
        audit(&cp)
            .iter()
            .filter(|(actor, a, r)| {
                actor == &format!("agent:{ghost}") && a == action && r == "denied: unknown agent"
            })
            .count()
    };

    let status = refused_session(&mut client, hello()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), not_registered);
    assert_eq!(denied("agent.session"), 1, "{:?}", audit(&cp));

    let (_tx, rx) = unbounded::<proto::OutputChunk>();
    let status = client.output(rx).await.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), not_registered);
    assert_eq!(denied("agent.output"), 1, "{:?}", audit(&cp));

    let (_, csr) = pki::new_key_and_csr("ghost").unwrap();
    let status = client
        .renew(proto::RenewRequest { csr_pem: csr })
        .await
        .expect_err("no certificate for an unregistered agent");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), not_registered);
    assert_eq!(denied("agent.renew"), 1, "{:?}", audit(&cp));

    // Without a certificate at all, the output stream is refused as unauthenticated.
    let anonymous = connect(&cp, &creds.ca, None).await.unwrap();
    let (_tx, rx) = unbounded::<proto::OutputChunk>();
    let status = ValkyrieClient::new(anonymous)
        .output(rx)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );
    assert!(
        audit(&cp).iter().any(|(actor, a, r)| actor == "anonymous"
            && a == "agent.output"
            && r == "denied: no client certificate"),
        "{:?}",
        audit(&cp)
    );

    // The hub made no agent of it, and the registered one is undisturbed.
    assert_eq!(agents(&cp), before);
    assert!(cp.hub.agent(ghost).is_none());
    live.alive(1).await;
    assert_eq!(sessions_started(&cp), 1);
    cp.hub.shutdown();
}
