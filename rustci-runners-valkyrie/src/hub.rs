//! The control plane's side of the protocol: registration, sessions, leases, output and
//! completion, and the registry entries of agents' runners.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use rustci_control::{ControlPlane, JobState, RegisterOptions, RunnerRecord, parse_attempt_id};
use rustci_runners::error::Chain;
use rustci_runners::runner::{EventKind, ExecutionSink, JobId, Outcome, OutputStream, StepStatus};
use rustci_runners::{Capabilities, Runner};

use crate::lease;
use crate::pki::{self, Authority, ServerIdentity};
use crate::proto::{self, agent_message, server_message};
use crate::remote::{RemoteRunner, RemoteRunnerConfig};
use crate::spool::{Journal, Spares, Spool};
use crate::{MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MAX_SPARE_FILES, PROTOCOL_VERSION, Timings};

/// Most completed attempts waiting for their output file to become a spare; past it
/// they wait for the periodic cleanup.
const MAX_SETTLING: usize = 65_536;

/// Completed attempts that wake the hub to turn their output files into spares before
/// the next sweep.
const SETTLE_BATCH: usize = 64;

/// How a [`Hub`] behaves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HubOptions {
    /// Where it keeps agents and attempt state (`agents.journal`,
    /// `completions.journal`, `attempts/`).
    pub dir: PathBuf,
    /// Lease timings.
    pub timings: Timings,
    /// How long an agent's client certificate is valid; agents renew at two thirds.
    pub certificate_validity: Duration,
    /// Session starts allowed per second on average (a token bucket)…
    pub session_starts_per_second: f64,
    /// …and at once.
    pub session_burst: f64,
}

impl HubOptions {
    /// Defaults, keeping state under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            dir: dir.into(),
            timings: Timings::default(),
            certificate_validity: Duration::from_secs(24 * 3600),
            session_starts_per_second: 200.0,
            session_burst: 400.0,
        }
    }
}

/// What the embedding server decides for the hub: registration tokens and the audit log.
pub trait Admission: Send + Sync {
    /// Checks a registration token and uses it up (a token registers one agent); returns
    /// the labels it grants, or why it is refused. `agent` names the agent it registers
    /// (`<name> (<id>)`, the id it gets if admitted), for the token's record.
    fn admit(&self, token: &str, agent: &str) -> Result<Vec<String>, String>;
    /// Records a security-relevant event (`agent.register`, `agent.session`, …).
    fn audit(&self, actor: &str, action: &str, target: Option<&str>, result: &str);
}

/// Where an agent stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentStatus {
    /// Connected and taking jobs.
    Healthy,
    /// Connected, taking no new jobs.
    Draining,
    /// Not connected; its attempts are kept until the reassignment time.
    Disconnected,
    /// Away for longer than the reassignment time: its attempts were given up.
    Lost,
}

/// An agent as the API shows it.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct AgentView {
    /// Its id (the common name of its certificate).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its host name.
    pub hostname: String,
    /// The address of its current (or last) session.
    pub address: Option<String>,
    /// Its software version.
    pub version: String,
    /// Its labels.
    pub labels: Vec<String>,
    /// Its status.
    pub status: AgentStatus,
    /// When its last heartbeat arrived (milliseconds since the Unix epoch).
    pub last_heartbeat_ms: Option<u64>,
    /// The registry ids of its runners.
    pub runners: Vec<String>,
    /// Attempts it is running (withdrawn offers included).
    pub running: usize,
    /// Offers it did not accept in time that it may still be running (its local runner
    /// was slow to start them, or the session broke): their jobs wait until it says it
    /// stopped them, reconnects without them, or stays away past the reassignment time.
    pub withdrawn: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct AgentRecord {
    id: String,
    name: String,
    hostname: String,
    labels: Vec<String>,
    registered_at_ms: u64,
}

struct SessionHandle {
    id: u64,
    tx: mpsc::Sender<Result<proto::ServerMessage, Status>>,
    close: CancellationToken,
}

struct AgentLive {
    record: AgentRecord,
    session: Option<SessionHandle>,
    boot_id: Option<String>,
    address: Option<String>,
    version: String,
    last_beat: Option<Instant>,
    last_beat_at: Option<SystemTime>,
    since: Instant,
    heartbeat: Duration,
    draining: bool,
    lost: bool,
    unhealthy: HashMap<String, String>,
    /// Local runners that take no new jobs for now (`Heartbeat.full`), with why.
    full: HashMap<String, String>,
}

type Key = (String, u32);

fn key_of(a: &proto::AttemptRef) -> Key {
    (a.job_id.clone(), a.attempt)
}

fn execution_id(key: &Key) -> JobId {
    rustci_control::attempt_id(&JobId::from(key.0.clone()), key.1)
}

enum Phase {
    Offered(Option<oneshot::Sender<Result<(), (String, bool)>>>),
    /// Not accepted in time: aborted, but the agent may be running it (it starts before
    /// it accepts). Kept until the agent says it no longer runs it (`Released`, a
    /// `Reject` or a `Complete`), reconnects without it, or stays away past the
    /// reassignment time; the sender then tells the offer to give the job back, with
    /// the agent's refusal (reason, temporary) when it refused it: it never ran then.
    Withdrawn(Option<oneshot::Sender<Option<Refusal>>>),
    Running,
    /// Taken up after a restart; given up at this instant unless its agent continues it.
    Reattached(Instant),
}

/// An agent's refusal of an offer: its reason, and whether it is temporary.
type Refusal = (String, bool);

pub(crate) struct AttemptIo {
    spool: Spool,
    sink: ExecutionSink,
}

impl AttemptLive {
    /// The agent the control plane holds the attempt for (`lease::holds`); none for a
    /// withdrawn offer, whose messages are refused while the control plane waits to hear
    /// its agent no longer runs it.
    fn holder(&self) -> Option<&str> {
        match self.phase {
            Phase::Withdrawn(_) => None,
            _ => Some(&self.agent),
        }
    }
}

struct AttemptLive {
    agent: String,
    runner: String,
    phase: Phase,
    io: Arc<tokio::sync::Mutex<AttemptIo>>,
    ended: CancellationToken,
    /// Step events and the completion, handled in order by the attempt's own task, so
    /// the session's reader never waits for an attempt (heartbeats are never delayed).
    work: mpsc::UnboundedSender<Work>,
}

enum Work {
    Event(EventKind),
    Complete {
        complete: proto::Complete,
        outcome: Outcome,
        tx: mpsc::Sender<Result<proto::ServerMessage, Status>>,
    },
}

type Io = Arc<tokio::sync::Mutex<AttemptIo>>;

/// True while `io` is still the attempt's current state (not ended, lost or replaced).
fn is_current(inner: &HubInner, key: &Key, io: &Io) -> bool {
    inner
        .state
        .lock()
        .expect("hub")
        .attempts
        .get(key)
        .is_some_and(|a| Arc::ptr_eq(&a.io, io))
}

/// Applies an attempt's step events and its completion, in the order they arrived.
async fn attempt_worker(
    inner: Arc<HubInner>,
    key: Key,
    agent: String,
    io: Io,
    mut rx: mpsc::UnboundedReceiver<Work>,
) {
    while let Some(work) = rx.recv().await {
        match work {
            Work::Event(kind) => {
                let guard = io.lock().await;
                if is_current(&inner, &key, &io) {
                    guard.sink.emit(kind).await;
                }
            }
            Work::Complete {
                complete,
                outcome,
                tx,
            } => {
                if settle(&inner, &agent, &key, &io, complete, outcome, &tx).await {
                    return;
                }
            }
        }
    }
}

/// Takes a completion: stores the outcome once the control plane holds every byte of
/// the output, ends the execution and acknowledges. False when it must wait for more
/// output (the agent completes again).
async fn settle(
    inner: &HubInner,
    agent: &str,
    key: &Key,
    io: &Io,
    c: proto::Complete,
    outcome: Outcome,
    tx: &mpsc::Sender<Result<proto::ServerMessage, Status>>,
) -> bool {
    let r = c.attempt.clone();
    let mut guard = io.lock().await;
    let stored = guard.spool.len();
    match lease::completion(is_current(inner, key, io), stored, c.length) {
        lease::Completion::Refuse => {
            // Ended meanwhile (lost, revoked, cancelled): this completion decides nothing.
            let _ = tx
                .send(Ok(msg(server_message::Kind::Abort(proto::Abort {
                    attempt: r,
                    reason: "the attempt ended before its completion arrived".into(),
                }))))
                .await;
            return true;
        }
        lease::Completion::Wait => {
            // Output still on its way (or lost with a connection): not acked; the agent
            // sends the rest and completes again.
            tracing::debug!(agent = %agent, job_id = %key.0, stored, length = c.length, "a completion before all output is stored; not acknowledged");
            return false;
        }
        lease::Completion::Accept => {}
    }
    let outcome = if stored > c.length || guard.spool.sha256() != c.sha256 {
        tracing::error!(agent = %agent, job_id = %key.0, stored, length = c.length, "the stored output does not match the agent's");
        Outcome::RunnerError {
            message: format!(
                "the control plane's copy of the output ({stored} bytes) does not match the agent's ({} bytes, sha256 {})",
                c.length, c.sha256
            ),
            temporary: true,
        }
    } else {
        outcome
    };
    // A record cut off by a crash is skipped: the attempt then waits for its agent's
    // completion again, as if it had not arrived. Appended with the hub's state locked
    // (then the journal), so a rewrite by the cleanup cannot miss it.
    let record = Completion {
        job_id: key.0.clone(),
        attempt: key.1,
        outcome: outcome.clone(),
    };
    {
        let mut state = inner.state.lock().expect("hub");
        if let Err(e) = inner
            .completions
            .lock()
            .expect("completions")
            .append(&record)
        {
            tracing::error!(error = %e, "storing a completion; not acknowledged");
            return false;
        }
        if state
            .attempts
            .get(key)
            .is_some_and(|a| Arc::ptr_eq(&a.io, io))
            && let Some(at) = state.attempts.remove(key)
        {
            at.ended.cancel();
        }
        state.done.insert(key.clone(), outcome.clone());
    }
    // Its file takes no more bytes (it becomes a spare once settled: a late write
    // through this handle would land in another attempt's file).
    guard.spool.seal();
    // An attempt with nothing stored has no file, as a rule; any other waits for the
    // periodic cleanup.
    if stored > 0 {
        let mut settling = inner.settling.lock().expect("settling");
        // Bounded: what does not fit waits for the periodic cleanup.
        if settling.len() < MAX_SETTLING {
            settling.push(key.clone());
        }
        if settling.len() >= SETTLE_BATCH {
            inner.settle_wake.notify_one();
        }
    }
    if c.dropped > 0 {
        tracing::warn!(agent = %agent, job_id = %key.0, dropped = c.dropped, "the agent's spool dropped output at its cap");
    }
    // Checked when the completion arrived.
    if let Ok(usage) = serde_json::from_str(&c.usage_json) {
        guard
            .sink
            .emit(EventKind::Usage { step: None, usage })
            .await;
    }
    guard.sink.finish(outcome).await;
    drop(guard);
    let _ = tx
        .send(Ok(msg(server_message::Kind::CompleteAck(
            proto::CompleteAck { attempt: r },
        ))))
        .await;
    true
}

#[derive(Default)]
struct HubState {
    agents: HashMap<String, AgentLive>,
    attempts: HashMap<Key, AttemptLive>,
    /// Attempts whose outcome is stored here (the completions journal, or a `.done` file
    /// of an earlier version), with it: a reconnecting agent that still holds one is told
    /// it is done, and a restarted control plane finishes it at once.
    done: HashMap<Key, Outcome>,
    revoked: HashSet<String>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// The next free slot for an agent told to come back later: refused agents are given
    /// slots one token apart, so that a storm drains at the limit's rate.
    next_slot: Instant,
}

pub(crate) struct HubInner {
    options: HubOptions,
    authority: Authority,
    admission: Arc<dyn Admission>,
    plane: OnceLock<ControlPlane>,
    state: Mutex<HubState>,
    /// `completions.journal`: the outcome of each completion acknowledged, until the
    /// control plane has settled its attempt. Locked after `state` when both are.
    completions: Mutex<Journal>,
    /// `agents.journal`: registrations and revocations, flushed to disk. Locked after
    /// `state`.
    agents_journal: Mutex<Journal>,
    /// Emptied output files for the next attempts (`spare/`).
    spares: Arc<Spares>,
    /// Attempts completed since the last sweep, whose output files become spares once
    /// the control plane has settled them (the rest wait for the periodic cleanup).
    settling: Mutex<Vec<Key>>,
    /// Wakes [`settle_loop`] early when [`SETTLE_BATCH`] attempts are settling.
    settle_wake: Arc<Notify>,
    sessions: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Refused client certificates, audited one by one up to a rate.
    refusals: Arc<RefusalAudit>,
    stop: CancellationToken,
}

/// Audits refused client certificates (`agent.tls`) one by one, at most
/// [`RefusalAudit::PER_WINDOW`] a minute; past that it counts them, and the count is
/// audited as one entry when the minute is over (by the next refusal or the hub's sweep).
/// Anyone can present a certificate, so refusals must not be able to flood the audit
/// log.
struct RefusalAudit {
    admission: Arc<dyn Admission>,
    window: Mutex<RefusalWindow>,
}

struct RefusalWindow {
    since: Instant,
    recorded: u32,
    suppressed: u64,
}

impl RefusalAudit {
    const PER_WINDOW: u32 = 20;
    const WINDOW: Duration = Duration::from_secs(60);

    fn new(admission: Arc<dyn Admission>) -> RefusalAudit {
        RefusalAudit {
            admission,
            window: Mutex::new(RefusalWindow {
                since: Instant::now(),
                recorded: 0,
                suppressed: 0,
            }),
        }
    }

    /// Records one refusal of `who`'s certificate for `why`.
    fn refused(&self, who: &str, why: &str) {
        let (record, rolled) = {
            let mut w = self.window.lock().expect("refusals");
            let rolled = Self::roll(&mut w, Instant::now());
            if w.recorded < Self::PER_WINDOW {
                w.recorded += 1;
                (true, rolled)
            } else {
                w.suppressed += 1;
                (false, rolled)
            }
        };
        // Audited outside the window's lock: the store may be slow.
        self.audit_suppressed(rolled);
        if record {
            tracing::warn!(agent = %who, error = %why, "refused a client certificate");
            self.admission.audit(
                &format!("cert:{who}"),
                "agent.tls",
                Some(who),
                &format!(
                    "denied: the client certificate is not valid for this control plane ({why})"
                ),
            );
        } else {
            tracing::debug!(agent = %who, error = %why, "refused a client certificate (not audited one by one)");
        }
    }

    /// Ends the window if it is over, auditing what it left uncounted.
    fn flush(&self) {
        let rolled = Self::roll(&mut self.window.lock().expect("refusals"), Instant::now());
        self.audit_suppressed(rolled);
    }

    /// Starts a new window if the current one is over; the refusals it did not audit
    /// one by one, if any.
    fn roll(w: &mut RefusalWindow, now: Instant) -> Option<u64> {
        if now.duration_since(w.since) < Self::WINDOW {
            return None;
        }
        let suppressed = w.suppressed;
        *w = RefusalWindow {
            since: now,
            recorded: 0,
            suppressed: 0,
        };
        (suppressed > 0).then_some(suppressed)
    }

    fn audit_suppressed(&self, count: Option<u64>) {
        let Some(count) = count else { return };
        tracing::warn!(count, "refused client certificates not audited one by one");
        self.admission.audit(
            "cert:*",
            "agent.tls",
            None,
            &format!(
                "denied: {count} more client certificates refused within a minute, not recorded one by one"
            ),
        );
    }
}

/// Connections the kernel queues for the agent listener before it accepts them.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener for [`Hub::serve`] on `addr`, with an accept backlog of [`LISTEN_BACKLOG`]
/// (the system's `net.core.somaxconn` caps it), as a reconnect storm of thousands of
/// agents needs: a connection the kernel cannot queue is dropped, and its agent waits
/// out TCP's retransmission delays. `tokio::net::TcpListener::bind` queues 1,024.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// TLS handshakes of agents in progress at once.
const MAX_HANDSHAKES: usize = 1024;
/// Accepted agent connections waiting for a handshake slot; more are closed at once.
const MAX_WAITING_HANDSHAKES: usize = 8192;
/// Longest time an agent may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A line of `agents.journal`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum AgentEntry {
    Agent(AgentRecord),
    Revoked { id: String },
}

/// A line of `completions.journal`.
#[derive(Serialize, Deserialize)]
struct Completion {
    job_id: String,
    attempt: u32,
    outcome: Outcome,
}

/// The control plane's side of Valkyrie. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("dir", &self.inner.options.dir)
            .finish_non_exhaustive()
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The registry id of runner `local` of agent `agent`.
pub(crate) fn runner_id(agent: &str, local: &str) -> String {
    format!("{agent}.{local}")
}

impl Hub {
    /// A hub keeping its state under `options.dir` (loading the agents registered
    /// before), signing with `authority`. Call it inside a tokio runtime: it starts the
    /// task that gives up attempts of agents that stayed away too long.
    pub fn new(
        options: HubOptions,
        authority: Authority,
        admission: Arc<dyn Admission>,
    ) -> std::io::Result<Hub> {
        std::fs::create_dir_all(options.dir.join("attempts"))?;
        let mut state = HubState::default();
        // Registered agents: an earlier version's `agents.json`, then the journal.
        let path = options.dir.join("agents.json");
        let mut stored: (Vec<AgentRecord>, Vec<String>) = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(e),
        };
        let (mut agents_journal, entries) =
            Journal::open_synced::<AgentEntry>(&options.dir.join("agents.journal"))?;
        for e in entries {
            match e {
                AgentEntry::Agent(r) => {
                    stored.0.retain(|x| x.id != r.id);
                    stored.0.push(r);
                }
                AgentEntry::Revoked { id } => {
                    stored.0.retain(|x| x.id != id);
                    stored.1.push(id);
                }
            }
        }
        stored.1.sort();
        stored.1.dedup();
        // Written anew (and the old file removed): one line per agent.
        let mut compact: Vec<AgentEntry> =
            stored.0.iter().cloned().map(AgentEntry::Agent).collect();
        compact.extend(
            stored
                .1
                .iter()
                .map(|id| AgentEntry::Revoked { id: id.clone() }),
        );
        agents_journal.rewrite(&compact)?;
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        let now = Instant::now();
        for record in stored.0 {
            state.agents.insert(
                record.id.clone(),
                AgentLive {
                    record,
                    session: None,
                    boot_id: None,
                    address: None,
                    version: String::new(),
                    last_beat: None,
                    last_beat_at: None,
                    since: now,
                    heartbeat: options.timings.heartbeat,
                    draining: false,
                    lost: false,
                    unhealthy: HashMap::new(),
                    full: HashMap::new(),
                },
            );
        }
        state.revoked = stored.1.into_iter().collect();
        // Outcomes stored before a restart and not yet cleaned up: the journal, and the
        // `.done` files of an earlier version.
        let (completions, stored) =
            Journal::open::<Completion>(&options.dir.join("completions.journal"))?;
        for c in stored {
            state.done.insert((c.job_id, c.attempt), c.outcome);
        }
        if let Ok(dir) = std::fs::read_dir(options.dir.join("attempts")) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(stem) = name.strip_suffix(".done")
                    && let Some((job, n)) = parse_attempt_id(&JobId::from(stem.to_string()))
                    && let Some(outcome) = std::fs::read(entry.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Outcome>(&b).ok())
                {
                    state.done.insert((job.as_str().to_string(), n), outcome);
                }
            }
        }
        let spares = Spares::open(&options.dir.join("spare"), MAX_SPARE_FILES)?;
        let burst = options.session_burst.max(1.0);
        let inner = Arc::new(HubInner {
            authority,
            admission: admission.clone(),
            plane: OnceLock::new(),
            state: Mutex::new(state),
            completions: Mutex::new(completions),
            agents_journal: Mutex::new(agents_journal),
            spares,
            settling: Mutex::new(Vec::new()),
            settle_wake: Arc::new(Notify::new()),
            sessions: AtomicU64::new(0),
            refusals: Arc::new(RefusalAudit::new(admission.clone())),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
                next_slot: Instant::now(),
            }),
            stop: CancellationToken::new(),
            options,
        });
        tokio::spawn(sweep_loop(Arc::downgrade(&inner)));
        tokio::spawn(settle_loop(Arc::downgrade(&inner)));
        Ok(Hub { inner })
    }

    /// Connects the hub to its control plane: agents' runners are registered there.
    /// Call once, before [`ControlPlane::recover`] (which may take up attempts of
    /// agents) and before serving.
    pub fn attach(&self, plane: ControlPlane) {
        let _ = self.inner.plane.set(plane);
    }

    /// The backend that rebuilds agents' runners from stored registrations.
    pub fn backend(&self) -> crate::ValkyrieBackend {
        crate::ValkyrieBackend::new(self.inner.clone())
    }

    /// The CA (for its fingerprint and PEM).
    pub fn authority(&self) -> &Authority {
        &self.inner.authority
    }

    /// The gRPC service, for a server of one's own.
    pub fn service(&self) -> proto::valkyrie_server::ValkyrieServer<Service> {
        proto::valkyrie_server::ValkyrieServer::new(Service {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves the protocol on `listener` with TLS (`identity`), client certificates
    /// optional at the handshake (registration has none yet) and required by every call
    /// but `Register`. Returns when [`Hub::shutdown`] is called.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        identity: ServerIdentity,
    ) -> Result<(), String> {
        let config = tls_config(
            &identity,
            self.inner.authority.ca_der(),
            self.inner.refusals.clone(),
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let stop = self.inner.stop.clone();
        // Handshakes run in their own tasks, at most 1024 at once and each for at most
        // 10 s, so a client that connects and says nothing holds up no one for longer.
        // The accept loop never waits for a handshake slot: a connection waits for one
        // in its own task (in arrival order), up to 8,192 of them, and one beyond that
        // is closed at once. Left in the kernel's accept backlog instead, connections of
        // a reconnect storm overflow it, and their clients wait out TCP's exponential
        // retransmission delays (up to a minute and more) instead of a slot.
        let (ready, streams) = mpsc::channel::<
            Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
        >(256);
        let accepting = stop.clone();
        tokio::spawn(async move {
            let handshaking = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
            let waiting = Arc::new(tokio::sync::Semaphore::new(
                MAX_HANDSHAKES + MAX_WAITING_HANDSHAKES,
            ));
            loop {
                let accepted = tokio::select! {
                    _ = accepting.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an agent connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(place) = waiting.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "too many agent handshakes waiting: connection closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, ready) = (acceptor.clone(), ready.clone());
                let (handshaking, stopped) = (handshaking.clone(), accepting.clone());
                tokio::spawn(async move {
                    let _place = place;
                    let slot = tokio::select! {
                        slot = handshaking.acquire_owned() => slot,
                        _ = stopped.cancelled() => return,
                    };
                    let Ok(_slot) = slot else { return };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "agent TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "agent TLS handshake timed out"),
                    }
                });
            }
        });
        let incoming =
            futures::stream::unfold(streams, |mut rx| async { rx.recv().await.map(|s| (s, rx)) });
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(self.service())
            .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
            .await
            .map_err(|e| format!("serving agents: {e}"))
    }

    /// Every registered agent.
    pub fn agents(&self) -> Vec<AgentView> {
        // The registry is read before the hub's state is locked: the registry calls into
        // the hub (`running`) while it holds its own lock, so the two are never nested
        // the other way round.
        let ids = registry_ids(&self.inner);
        let state = self.inner.state.lock().expect("hub");
        let index = Index::new(&ids, &state);
        let mut out: Vec<AgentView> = state.agents.values().map(|a| index.view(a)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Option<AgentView> {
        let ids = self
            .inner
            .plane
            .get()
            .map(|p| p.registry().ids_with_prefix(&format!("{id}.")))
            .unwrap_or_default();
        let state = self.inner.state.lock().expect("hub");
        let a = state.agents.get(id)?;
        Some(Index::new(&ids, &state).view(a))
    }

    /// Revokes an agent: its session closes now, its runners leave the registry, its
    /// attempts are lost, and it can never connect again. False when unknown.
    pub fn revoke(&self, id: &str, actor: &str) -> bool {
        let (session, attempts) = {
            let mut state = self.inner.state.lock().expect("hub");
            let Some(agent) = state.agents.remove(id) else {
                return false;
            };
            state.revoked.insert(id.to_string());
            let keys: Vec<Key> = state
                .attempts
                .iter()
                .filter(|(_, a)| a.agent == id)
                .map(|(k, _)| k.clone())
                .collect();
            let attempts: Vec<AttemptLive> = keys
                .iter()
                .filter_map(|k| state.attempts.remove(k))
                .collect();
            (agent.session, attempts)
        };
        save_agent(&self.inner, &AgentEntry::Revoked { id: id.to_string() });
        if let Some(s) = session {
            let _ = s.tx.try_send(Ok(disconnect("this agent was revoked", 0)));
            s.close.cancel();
        }
        for a in attempts {
            end_lost(a);
        }
        if let Some(plane) = self.inner.plane.get() {
            for rid in plane.registry().ids_with_prefix(&format!("{id}.")) {
                plane.remove(&rid);
                let _ = plane.store().remove_runner(&rid);
            }
        }
        self.inner
            .admission
            .audit(actor, "agent.revoke", Some(id), "ok");
        true
    }

    /// Stops serving and closes every session (agents keep their jobs and reconnect to
    /// the next control plane).
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        let state = self.inner.state.lock().expect("hub");
        for a in state.agents.values() {
            if let Some(s) = &a.session {
                s.close.cancel();
            }
        }
    }
}

fn registry_ids(inner: &HubInner) -> Vec<String> {
    inner
        .plane
        .get()
        .map(|p| p.registry().ids())
        .unwrap_or_default()
}

/// Each agent's runners and attempts, in one pass over the registry and the attempts
/// (a view per agent stays O(1) with thousands of agents).
struct Index<'a> {
    runners: HashMap<&'a str, Vec<String>>,
    /// (attempts, withdrawn ones) by agent.
    attempts: HashMap<&'a str, (usize, usize)>,
}

impl<'a> Index<'a> {
    fn new(ids: &'a [String], state: &'a HubState) -> Index<'a> {
        let mut runners: HashMap<&str, Vec<String>> = HashMap::new();
        for r in ids {
            // A remote runner's id is `<agent id>.<local name>`; agent ids have no dot.
            if let Some((agent, _)) = r.split_once('.') {
                runners.entry(agent).or_default().push(r.clone());
            }
        }
        let mut attempts: HashMap<&str, (usize, usize)> = HashMap::new();
        for at in state.attempts.values() {
            let n = attempts.entry(at.agent.as_str()).or_default();
            n.0 += 1;
            if matches!(at.phase, Phase::Withdrawn(_)) {
                n.1 += 1;
            }
        }
        Index { runners, attempts }
    }

    fn view(&self, a: &AgentLive) -> AgentView {
        let id = a.record.id.as_str();
        let (running, withdrawn) = self.attempts.get(id).copied().unwrap_or_default();
        AgentView {
            id: id.to_string(),
            name: a.record.name.clone(),
            hostname: a.record.hostname.clone(),
            address: a.address.clone(),
            version: a.version.clone(),
            labels: a.record.labels.clone(),
            status: status_of(a),
            last_heartbeat_ms: a.last_beat_at.map(millis),
            runners: self.runners.get(id).cloned().unwrap_or_default(),
            running,
            withdrawn,
        }
    }
}

fn status_of(a: &AgentLive) -> AgentStatus {
    match (&a.session, a.lost, a.draining) {
        (Some(_), _, true) => AgentStatus::Draining,
        (Some(_), _, false) => AgentStatus::Healthy,
        (None, true, _) => AgentStatus::Lost,
        (None, false, _) => AgentStatus::Disconnected,
    }
}

/// Appends a registration or a revocation to the agents' journal (flushed to disk).
fn save_agent(inner: &HubInner, entry: &AgentEntry) {
    if let Err(e) = inner.agents_journal.lock().expect("agents").append(entry) {
        tracing::error!(error = %e, "storing the agents");
    }
}

fn disconnect(reason: &str, retry_after_ms: u64) -> proto::ServerMessage {
    proto::ServerMessage {
        kind: Some(server_message::Kind::Disconnect(proto::Disconnect {
            reason: reason.to_string(),
            retry_after_ms,
        })),
    }
}

fn msg(kind: server_message::Kind) -> proto::ServerMessage {
    proto::ServerMessage { kind: Some(kind) }
}

fn attempt_ref(key: &Key) -> proto::AttemptRef {
    proto::AttemptRef {
        job_id: key.0.clone(),
        attempt: key.1,
    }
}

/// Ends an attempt the control plane gave up: its execution ends `Lost`.
fn end_lost(a: AttemptLive) {
    a.ended.cancel();
    match a.phase {
        Phase::Offered(Some(tx)) => {
            let _ = tx.send(Err(("the agent went away".into(), true)));
            return;
        }
        Phase::Withdrawn(confirm) => {
            if let Some(tx) = confirm {
                let _ = tx.send(None);
            }
            return;
        }
        _ => {}
    }
    tokio::spawn(async move {
        let io = a.io.lock().await;
        io.sink.finish(Outcome::Lost).await;
    });
}

impl HubInner {
    fn attempt_path(&self, key: &Key, ext: &str) -> PathBuf {
        self.options
            .dir
            .join("attempts")
            .join(format!("{}.{ext}", execution_id(key)))
    }

    /// Withdraws an offer not accepted in time: the attempt stays held for its agent
    /// (phase `Withdrawn`) until the agent no longer runs it, which the returned receiver
    /// tells. `None` when it is no longer an unanswered offer (answered as the time ran
    /// out, or gone).
    fn withdraw(&self, key: &Key) -> Option<oneshot::Receiver<Option<Refusal>>> {
        let mut state = self.state.lock().expect("hub");
        let at = state.attempts.get_mut(key)?;
        match &at.phase {
            Phase::Offered(Some(_)) => {
                let (tx, rx) = oneshot::channel();
                at.phase = Phase::Withdrawn(Some(tx));
                tracing::info!(job_id = %key.0, attempt = key.1, agent = %at.agent, "offer not accepted in time: withdrawn; the job is placed again once the agent no longer runs it");
                Some(rx)
            }
            _ => None,
        }
    }

    /// True when `r` names an attempt withdrawn from `agent`, which `agent` now says it
    /// does not run (it released, refused or completed it): the attempt ends, and its
    /// job is placed again.
    fn release_withdrawn(&self, agent: &str, r: Option<&proto::AttemptRef>) -> bool {
        self.release_where(agent, r, |phase| matches!(phase, Phase::Withdrawn(_)))
    }

    /// [`HubInner::release_withdrawn`] for a refusal `rj`: the agent never ran the
    /// attempt (its start failed), so the job is placed again as declined when the
    /// refusal is temporary, and ends with it when it is not, as for a refusal in time.
    fn refuse_withdrawn(&self, agent: &str, rj: &proto::Reject) -> bool {
        let withdrawn = |phase: &Phase| matches!(phase, Phase::Withdrawn(_));
        let Some((k, a)) = self.take_where(agent, rj.attempt.as_ref(), withdrawn) else {
            return false;
        };
        tracing::info!(job_id = %k.0, attempt = k.1, agent, reason = %rj.reason, "the agent refused the withdrawn offer: it never ran");
        a.ended.cancel();
        if let Phase::Withdrawn(Some(tx)) = a.phase {
            let _ = tx.send(Some((rj.reason.clone(), rj.temporary)));
        }
        true
    }

    /// True when `r` names an attempt the control plane holds for `agent` in any phase,
    /// which `agent` says it no longer runs and will not complete (`Released`): it ends
    /// lost, and its job is retried per its policy. This covers an attempt withdrawn
    /// and then taken up again by a restarted control plane, which the agent stops
    /// because it was told to before the restart.
    fn release(&self, agent: &str, r: Option<&proto::AttemptRef>) -> bool {
        self.release_where(agent, r, |_| true)
    }

    /// True when `r` names an attempt running for `agent` (accepted, or continued after
    /// a reconnect) that `agent` now refuses: it never started it (a start still in
    /// progress when an earlier abort arrived), so it ends lost.
    fn release_running(&self, agent: &str, r: Option<&proto::AttemptRef>) -> bool {
        self.release_where(agent, r, |phase| {
            matches!(phase, Phase::Running | Phase::Reattached(_))
        })
    }

    fn release_where(
        &self,
        agent: &str,
        r: Option<&proto::AttemptRef>,
        phase: impl Fn(&Phase) -> bool,
    ) -> bool {
        let Some((k, a)) = self.take_where(agent, r, phase) else {
            return false;
        };
        tracing::info!(job_id = %k.0, attempt = k.1, agent, "the agent no longer runs the attempt");
        end_lost(a);
        true
    }

    /// Removes and returns the attempt `r` names when the control plane holds it for
    /// `agent` in a phase for which `phase` holds.
    fn take_where(
        &self,
        agent: &str,
        r: Option<&proto::AttemptRef>,
        phase: impl Fn(&Phase) -> bool,
    ) -> Option<(Key, AttemptLive)> {
        let k = key_of(r?);
        let mut state = self.state.lock().expect("hub");
        let held = state
            .attempts
            .get(&k)
            .is_some_and(|a| a.agent == agent && phase(&a.phase));
        if !held {
            return None;
        }
        let a = state.attempts.remove(&k)?;
        Some((k, a))
    }

    /// Jobs running on runner `local` of `agent`.
    pub(crate) fn running(&self, agent: &str, local: &str) -> usize {
        self.state
            .lock()
            .expect("hub")
            .attempts
            .values()
            .filter(|a| a.agent == agent && a.runner == local)
            .count()
    }

    pub(crate) fn agent_labels(&self, agent: &str) -> Option<Vec<String>> {
        self.state
            .lock()
            .expect("hub")
            .agents
            .get(agent)
            .map(|a| a.record.labels.clone())
    }

    /// The health of runner `local` of `agent`, as its registry entry shows it.
    pub(crate) fn health(&self, agent: &str, local: &str) -> rustci_runners::Health {
        use rustci_runners::Health;
        let state = self.state.lock().expect("hub");
        let Some(a) = state.agents.get(agent) else {
            return Health::Unhealthy(format!("agent {agent} is not registered (revoked?)"));
        };
        match status_of(a) {
            AgentStatus::Healthy => match (a.unhealthy.get(local), a.full.get(local)) {
                (Some(why), _) => Health::Unhealthy(format!("on agent {}: {why}", a.record.name)),
                (None, Some(why)) => Health::Full(format!("on agent {}: {why}", a.record.name)),
                (None, None) => Health::Healthy,
            },
            AgentStatus::Draining => {
                Health::Offline(format!("agent {} is draining", a.record.name))
            }
            AgentStatus::Disconnected => Health::Offline(format!(
                "agent {} is disconnected (for {}s)",
                a.record.name,
                a.since.elapsed().as_secs()
            )),
            AgentStatus::Lost => Health::Offline(format!(
                "agent {} is lost (disconnected for {}s)",
                a.record.name,
                a.since.elapsed().as_secs()
            )),
        }
    }

    /// Offers attempt `id` to runner `local` of `agent` and waits for the answer.
    pub(crate) async fn offer(
        self: &Arc<Self>,
        agent: &str,
        local: &str,
        runner_id: &str,
        job_json: String,
        id: JobId,
    ) -> Result<rustci_runners::Execution, rustci_runners::Error> {
        use rustci_runners::Error;
        let Some((job, number)) = parse_attempt_id(&id) else {
            return Err(Error::rejected(format!(
                "execution id {id} is not an attempt id of the control plane"
            )));
        };
        let key: Key = (job.as_str().to_string(), number);
        let (execution, sink) = rustci_runners::Execution::channel(id.clone(), 256);
        let path = self.attempt_path(&key, "out");
        // Its file comes with the first byte of output (replacing any earlier one).
        let spool = Spool::lazy_with(&path, &self.spares);
        let (answer_tx, answer_rx) = oneshot::channel();
        let ended = CancellationToken::new();
        let io = Arc::new(tokio::sync::Mutex::new(AttemptIo {
            spool,
            sink: sink.clone(),
        }));
        let tx = {
            let mut state = self.state.lock().expect("hub");
            let Some(a) = state.agents.get(agent) else {
                return Err(Error::unavailable(format!(
                    "agent {agent} is not registered"
                )));
            };
            let Some(session) = &a.session else {
                return Err(Error::unavailable(format!(
                    "agent {} is not connected",
                    a.record.name
                ))
                .temporary(true)
                .declined(true));
            };
            if a.draining {
                return Err(
                    Error::unavailable(format!("agent {} is draining", a.record.name))
                        .temporary(true)
                        .declined(true),
                );
            }
            let tx = session.tx.clone();
            let (work, rx) = mpsc::unbounded_channel();
            tokio::spawn(attempt_worker(
                self.clone(),
                key.clone(),
                agent.to_string(),
                io.clone(),
                rx,
            ));
            state.attempts.insert(
                key.clone(),
                AttemptLive {
                    agent: agent.to_string(),
                    runner: local.to_string(),
                    phase: Phase::Offered(Some(answer_tx)),
                    io: io.clone(),
                    ended: ended.clone(),
                    work,
                },
            );
            tx
        };
        let timeout = self.options.timings.offer_timeout;
        let offer = msg(server_message::Kind::Offer(proto::Offer {
            attempt: Some(attempt_ref(&key)),
            runner: local.to_string(),
            job_json,
            accept_within_ms: timeout.as_millis() as u64,
        }));
        let forget = |inner: &HubInner| {
            inner.state.lock().expect("hub").attempts.remove(&key);
            let _ = std::fs::remove_file(&path);
        };
        if tx.send(Ok(offer)).await.is_err() {
            forget(self);
            return Err(Error::unavailable("the agent's session closed")
                .temporary(true)
                .declined(true));
        }
        let mut answer_rx = answer_rx;
        let answer = match tokio::time::timeout(timeout, &mut answer_rx).await {
            Ok(answer) => answer,
            Err(_) => match self.withdraw(&key) {
                Some(released) => {
                    let _ = tx.try_send(Ok(msg(server_message::Kind::Abort(proto::Abort {
                        attempt: Some(attempt_ref(&key)),
                        reason: "not accepted in time".into(),
                    }))));
                    // The agent may be running it already (it starts before it accepts):
                    // the job goes back only once the agent no longer runs it (it says
                    // so, reconnects without it, or its lease runs out).
                    let refusal = tokio::select! {
                        r = released => r.ok().flatten(),
                        // A hub that stops decides nothing more: the attempt stays as
                        // the store has it, for recovery to take up.
                        _ = self.stop.cancelled() => std::future::pending().await,
                    };
                    forget(self);
                    // Refused late: it never ran. A temporary refusal costs the job no
                    // retry; a permanent one ends it, as a refusal in time would.
                    return Err(if let Some((reason, temporary)) = refusal {
                        Error::rejected(format!(
                            "agent {agent} did not accept the job within {timeout:?}, then refused it: {reason}"
                        ))
                        .temporary(temporary)
                        .declined(true)
                    } else {
                        Error::unavailable(format!(
                            "agent {agent} did not accept the job within {timeout:?}"
                        ))
                        .temporary(true)
                    });
                }
                // Answered as the time ran out.
                None => answer_rx.await,
            },
        };
        match answer {
            Ok(Ok(())) => {}
            Ok(Err((reason, temporary))) => {
                forget(self);
                let e = Error::rejected(format!("agent {agent} refused the job: {reason}"));
                return Err(e.temporary(temporary).declined(true));
            }
            // The attempt went without an answer (the control plane is stopping, or the
            // agent was revoked): a runner failure like any other.
            Err(_) => {
                forget(self);
                return Err(Error::unavailable("the offer was withdrawn").temporary(true));
            }
        }
        sink.emit(EventKind::Started {
            job_id: id.as_str().to_string(),
            runner_id: runner_id.to_string(),
            runner_kind: rustci_runners::RunnerKind::Valkyrie,
        })
        .await;
        self.watch_cancel(key, sink, ended);
        Ok(execution)
    }

    /// Sends `Cancel` to the attempt's agent when its execution is cancelled.
    fn watch_cancel(self: &Arc<Self>, key: Key, sink: ExecutionSink, ended: CancellationToken) {
        let inner = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = ended.cancelled() => {}
                _ = sink.cancelled() => {
                    let tx = {
                        let state = inner.state.lock().expect("hub");
                        state
                            .attempts
                            .get(&key)
                            .and_then(|a| state.agents.get(&a.agent))
                            .and_then(|a| a.session.as_ref().map(|s| s.tx.clone()))
                    };
                    if let Some(tx) = tx {
                        let _ = tx
                            .send(Ok(msg(server_message::Kind::Cancel(proto::Cancel {
                                attempt: Some(attempt_ref(&key)),
                            }))))
                            .await;
                    }
                    // A cancel while disconnected is delivered by the verdict at
                    // reconnection: the attempt is then aborted.
                    let mut state = inner.state.lock().expect("hub");
                    let connected = state
                        .attempts
                        .get(&key)
                        .map(|a| state.agents.get(&a.agent).is_some_and(|x| x.session.is_some()));
                    if connected == Some(false) {
                        let a = state.attempts.remove(&key).expect("present");
                        drop(state);
                        a.ended.cancel();
                        let io = a.io.clone();
                        tokio::spawn(async move {
                            io.lock().await.sink.finish(Outcome::Cancelled).await;
                        });
                    }
                }
            }
        });
    }

    /// Takes up an attempt after a control-plane restart (see [`Runner::reattach`]).
    pub(crate) async fn reattach(
        self: &Arc<Self>,
        agent: &str,
        local: &str,
        id: &JobId,
        held: u64,
    ) -> Result<Option<rustci_runners::Execution>, rustci_runners::Error> {
        use rustci_runners::Error;
        let Some((job, number)) = parse_attempt_id(id) else {
            return Ok(None);
        };
        let key: Key = (job.as_str().to_string(), number);
        if !self.state.lock().expect("hub").agents.contains_key(agent) {
            return Ok(None);
        }
        // No file: the attempt had written nothing yet.
        let path = self.attempt_path(&key, "out");
        let spool = if path.exists() {
            Spool::open(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        } else {
            Spool::lazy_with(&path, &self.spares)
        };
        let done: Option<Outcome> = self.state.lock().expect("hub").done.get(&key).cloned();
        let (execution, sink) = rustci_runners::Execution::channel(id.clone(), 256);
        let io = Arc::new(tokio::sync::Mutex::new(AttemptIo {
            spool,
            sink: sink.clone(),
        }));
        // Replayed under the attempt's lock, so chunks the agent sends on are stored
        // and passed on after it.
        let guard = io.clone().lock_owned().await;
        let ended = CancellationToken::new();
        if done.is_none() {
            let until = Instant::now() + self.options.timings.restart_grace;
            let (work, rx) = mpsc::unbounded_channel();
            tokio::spawn(attempt_worker(
                self.clone(),
                key.clone(),
                agent.to_string(),
                io.clone(),
                rx,
            ));
            self.state.lock().expect("hub").attempts.insert(
                key.clone(),
                AttemptLive {
                    agent: agent.to_string(),
                    runner: local.to_string(),
                    phase: Phase::Reattached(until),
                    io: io.clone(),
                    ended: ended.clone(),
                    work,
                },
            );
            self.watch_cancel(key.clone(), sink.clone(), ended);
        }
        tokio::spawn(async move {
            let io = guard;
            let mut at = held;
            while at < io.spool.len() {
                match io.spool.read_at(at, MAX_CHUNK_BYTES) {
                    Ok(data) if !data.is_empty() => {
                        at += data.len() as u64;
                        io.sink
                            .emit(EventKind::Output {
                                step: 0,
                                stream: OutputStream::Stdout,
                                data: data.into(),
                            })
                            .await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "replaying an attempt's stored output");
                        break;
                    }
                }
            }
            if let Some(outcome) = done {
                io.sink.finish(outcome).await;
            }
        });
        Ok(Some(execution))
    }
}

/// Turns the output files of settled attempts into spares every half heartbeat, or
/// sooner when [`SETTLE_BATCH`] attempts are waiting (so a busy hub keeps spares for
/// what it starts next).
async fn settle_loop(inner: std::sync::Weak<HubInner>) {
    loop {
        let Some(hub) = inner.upgrade() else { return };
        if hub.stop.is_cancelled() {
            return;
        }
        if !hub.settling.lock().expect("settling").is_empty() {
            let h = hub.clone();
            let _ = tokio::task::spawn_blocking(move || retire_settled(&h)).await;
        }
        let pause = hub.options.timings.heartbeat / 2;
        let stop = hub.stop.clone();
        let woken = hub.settle_wake.clone();
        drop(hub);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            _ = woken.notified() => {}
        }
    }
}

/// Gives up attempts whose agent stayed away too long, closes silent sessions and
/// removes the output of attempts the control plane has settled.
async fn sweep_loop(inner: std::sync::Weak<HubInner>) {
    let mut last_cleanup = Instant::now();
    loop {
        let Some(hub) = inner.upgrade() else { return };
        let pause = hub.options.timings.heartbeat / 2;
        if hub.stop.is_cancelled() {
            return;
        }
        sweep(&hub);
        if last_cleanup.elapsed() > Duration::from_secs(30) {
            last_cleanup = Instant::now();
            // Store lookups and the removal of every settled attempt's files since the
            // last cleanup block: on a thread of their own, not one of the runtime's
            // workers (with two of them, one blocked for the burst slowed every session
            // and pickup meanwhile).
            let h = hub.clone();
            let _ = tokio::task::spawn_blocking(move || cleanup(&h)).await;
        }
        let stop = hub.stop.clone();
        drop(hub);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

fn sweep(hub: &HubInner) {
    hub.refusals.flush();
    let now = Instant::now();
    let timings = hub.options.timings;
    let mut lost = Vec::new();
    let mut changed = Vec::new();
    {
        let mut state = hub.state.lock().expect("hub");
        let state = &mut *state;
        for a in state.agents.values_mut() {
            let reassign = timings.reassign_for(a.heartbeat);
            if lease::lease_expired(a.last_beat, a.since, reassign, now) {
                if let Some(s) = a.session.take() {
                    tracing::warn!(agent = %a.record.id, "no heartbeat for longer than the reassignment time: closing its session");
                    let _ = s.tx.try_send(Ok(disconnect("no heartbeat", 0)));
                    s.close.cancel();
                }
                if !a.lost {
                    a.lost = true;
                    changed.push(a.record.id.clone());
                }
            }
        }
        let keys: Vec<Key> = state
            .attempts
            .iter()
            .filter(|(_, at)| match at.phase {
                Phase::Reattached(until) => lease::grace_over(until, now),
                _ => state.agents.get(&at.agent).is_none_or(|a| a.lost),
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(a) = state.attempts.remove(&k) {
                tracing::warn!(job_id = %k.0, attempt = k.1, agent = %a.agent, "the agent stayed away longer than the reassignment time: attempt lost");
                lost.push(a);
            }
        }
    }
    for a in lost {
        end_lost(a);
    }
    for agent in changed {
        check_runners_of(hub, &agent);
    }
}

/// Has the registry check the health of `agent`'s runners now (its connection or
/// health changed), rather than at the next interval.
fn check_runners_of(inner: &HubInner, agent: &str) {
    if let Some(plane) = inner.plane.get() {
        for id in plane.registry().ids_with_prefix(&format!("{agent}.")) {
            plane.check_runner_soon(&id);
        }
    }
}

/// Whether the control plane has attempt `n` of `job` to its end: its job ended, a
/// later attempt began, or this one has an outcome and the job is not running it.
fn settled(plane: &ControlPlane, job: &JobId, n: u32) -> bool {
    match plane.get(job) {
        None => true,
        Some(r) => {
            r.state.is_terminal()
                || r.attempts.len() as u32 > n
                || r.attempts
                    .get(n as usize - 1)
                    .is_some_and(|a| a.outcome.is_some())
                    && r.state != JobState::Running
        }
    }
}

/// Turns the output files of attempts completed since the last sweep into spares, for
/// those the control plane has settled; the others wait for the next sweep. Their
/// outcomes stay for [`cleanup`].
fn retire_settled(hub: &HubInner) {
    let Some(plane) = hub.plane.get() else { return };
    let keys = std::mem::take(&mut *hub.settling.lock().expect("settling"));
    let mut later = Vec::new();
    for key in keys {
        let live = hub.state.lock().expect("hub").attempts.contains_key(&key);
        if live {
            // Taken up again: its file is in use, and the cleanup decides later.
            continue;
        }
        if settled(plane, &JobId::from(key.0.clone()), key.1) {
            hub.spares.retire(&hub.attempt_path(&key, "out"));
        } else {
            later.push(key);
        }
    }
    let mut settling = hub.settling.lock().expect("settling");
    let room = MAX_SETTLING.saturating_sub(settling.len());
    later.truncate(room);
    settling.extend(later);
}

/// Deletes stored output and outcomes of attempts the control plane has settled (the
/// job ended, or moved on to a later attempt); output files become spares.
fn cleanup(hub: &HubInner) {
    let Some(plane) = hub.plane.get() else { return };
    let settled = |job: &JobId, n: u32| settled(plane, job, n);
    let (live, done): (HashSet<Key>, Vec<Key>) = {
        let state = hub.state.lock().expect("hub");
        (
            state.attempts.keys().cloned().collect(),
            state.done.keys().cloned().collect(),
        )
    };
    // Settled completions leave the journal (rewritten when any did).
    let gone: Vec<Key> = done
        .into_iter()
        .filter(|k| !live.contains(k) && settled(&JobId::from(k.0.clone()), k.1))
        .collect();
    if !gone.is_empty() {
        let mut state = hub.state.lock().expect("hub");
        for k in &gone {
            state.done.remove(k);
        }
        let keep: Vec<Completion> = state
            .done
            .iter()
            .map(|((job, n), o)| Completion {
                job_id: job.clone(),
                attempt: *n,
                outcome: o.clone(),
            })
            .collect();
        if let Err(e) = hub.completions.lock().expect("completions").rewrite(&keep) {
            tracing::error!(error = %e, "rewriting the completions journal");
        }
    }
    let Ok(dir) = std::fs::read_dir(hub.options.dir.join("attempts")) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some((stem, _)) = name.rsplit_once('.') else {
            continue;
        };
        let Some((job, n)) = parse_attempt_id(&JobId::from(stem.to_string())) else {
            continue;
        };
        let key = (job.as_str().to_string(), n);
        if live.contains(&key) {
            continue;
        }
        if settled(&job, n) {
            if name.ends_with(".out") {
                hub.spares.retire(&entry.path());
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
            if name.ends_with(".done") {
                hub.state.lock().expect("hub").done.remove(&key);
            }
        }
    }
}

/// The tonic service; see [`Hub::service`].
pub struct Service {
    inner: Arc<HubInner>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The agent listener's TLS: the server's identity, HTTP/2, and client certificates
/// optional (registration has none) but, when presented, checked against the CA, with
/// every refused one audited.
fn tls_config(
    identity: &ServerIdentity,
    ca: &rustls::pki_types::CertificateDer<'static>,
    refusals: Arc<RefusalAudit>,
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("the CA certificate: {e}"))?;
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("the client certificate verifier: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(identity.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| format!("the server key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(AuditingVerifier { inner, refusals }))
        .with_single_cert(chain, key)
        .map_err(|e| format!("the server certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Checks client certificates as webpki does, and audits each one it refuses (a
/// certificate of another CA, an expired one): the hub never sees such a caller.
struct AuditingVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    refusals: Arc<RefusalAudit>,
}

impl std::fmt::Debug for AuditingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditingVerifier").finish_non_exhaustive()
    }
}

impl rustls::server::danger::ClientCertVerifier for AuditingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                let who = pki::common_name(end_entity).unwrap_or_else(|_| "unnamed".into());
                self.refusals.refused(&who, &e.to_string());
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The verified agent id of a call, from its client certificate.
fn caller<T>(inner: &HubInner, request: &Request<T>, action: &str) -> Result<String, Status> {
    let Some(certs) = request.peer_certs() else {
        inner
            .admission
            .audit("anonymous", action, None, "denied: no client certificate");
        return Err(Status::unauthenticated(
            "this call needs the agent's client certificate (register first)",
        ));
    };
    let Some(leaf) = certs.first() else {
        return Err(Status::unauthenticated("no client certificate"));
    };
    let id = pki::common_name(leaf).map_err(Status::unauthenticated)?;
    let state = inner.state.lock().expect("hub");
    if state.revoked.contains(&id) {
        drop(state);
        inner
            .admission
            .audit(&format!("agent:{id}"), action, Some(&id), "denied: revoked");
        return Err(Status::permission_denied(format!("agent {id} is revoked")));
    }
    if !state.agents.contains_key(&id) {
        drop(state);
        inner.admission.audit(
            &format!("agent:{id}"),
            action,
            Some(&id),
            "denied: unknown agent",
        );
        return Err(Status::permission_denied(format!(
            "agent {id} is not registered with this control plane"
        )));
    }
    Ok(id)
}

#[tonic::async_trait]
impl proto::valkyrie_server::Valkyrie for Service {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let inner = &self.inner;
        let peer = request.remote_addr().map(|a| a.to_string());
        let r = request.into_inner();
        let name = if r.name.is_empty() {
            r.hostname.clone()
        } else {
            r.name.clone()
        };
        let actor = format!("agent-registration:{}", peer.as_deref().unwrap_or("?"));
        if !valid_name(&name) {
            inner
                .admission
                .audit(&actor, "agent.register", None, "denied: bad name");
            return Err(Status::invalid_argument(format!(
                "agent name {name:?}: 1 to 64 ASCII letters, digits, '-', '_' or '.'"
            )));
        }
        for l in &r.labels {
            if l.is_empty() || l.len() > 128 || l.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(Status::invalid_argument(format!(
                    "label {l:?}: 1 to 128 characters, no spaces or commas"
                )));
            }
        }
        if inner
            .state
            .lock()
            .expect("hub")
            .agents
            .values()
            .any(|a| a.record.name == name)
        {
            inner
                .admission
                .audit(&actor, "agent.register", None, "denied: name taken");
            return Err(Status::already_exists(format!(
                "an agent named {name:?} is registered; revoke it first or choose another name"
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        // Signed before the token is spent, so a request with a CSR that does not decode
        // leaves the token usable (the certificate is discarded if the token is refused).
        let (certificate_pem, until) =
            match inner
                .authority
                .sign_agent(&r.csr_pem, &id, inner.options.certificate_validity)
            {
                Ok(signed) => signed,
                Err(e) => {
                    inner
                        .admission
                        .audit(&actor, "agent.register", None, "denied: bad CSR");
                    return Err(Status::invalid_argument(e.to_string()));
                }
            };
        let granted = match inner.admission.admit(&r.token, &format!("{name} ({id})")) {
            Ok(l) => l,
            Err(why) => {
                inner
                    .admission
                    .audit(&actor, "agent.register", None, &format!("denied: {why}"));
                return Err(Status::permission_denied(why));
            }
        };
        let mut labels: BTreeSet<String> = r.labels.into_iter().collect();
        labels.extend(granted);
        let record = AgentRecord {
            id: id.clone(),
            name: name.clone(),
            hostname: r.hostname,
            labels: labels.into_iter().collect(),
            registered_at_ms: millis(SystemTime::now()),
        };
        {
            let mut state = inner.state.lock().expect("hub");
            // Checked again under the lock that inserts: two registrations racing for
            // one name cannot both win (the loser's token is spent).
            if state.agents.values().any(|a| a.record.name == name) {
                drop(state);
                inner
                    .admission
                    .audit(&actor, "agent.register", None, "denied: name taken");
                return Err(Status::already_exists(format!(
                    "an agent named {name:?} is registered; revoke it first or choose another name"
                )));
            }
            let saved = AgentEntry::Agent(record.clone());
            state.agents.insert(
                id.clone(),
                AgentLive {
                    record,
                    session: None,
                    boot_id: None,
                    address: peer,
                    version: r.version,
                    last_beat: None,
                    last_beat_at: None,
                    since: Instant::now(),
                    heartbeat: inner.options.timings.heartbeat,
                    draining: false,
                    lost: false,
                    unhealthy: HashMap::new(),
                    full: HashMap::new(),
                },
            );
            drop(state);
            // Flushed before the agent gets its identity, outside the hub's lock.
            save_agent(inner, &saved);
        }
        inner
            .admission
            .audit(&format!("agent:{id}"), "agent.register", Some(&id), "ok");
        tracing::info!(agent = %id, name = %name, "agent registered");
        Ok(Response::new(proto::RegisterResponse {
            agent_id: id,
            certificate_pem,
            ca_pem: inner.authority.ca_pem().to_string(),
            not_after_ms: millis(until),
        }))
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::RenewResponse>, Status> {
        let id = caller(&self.inner, &request, "agent.renew")?;
        let r = request.into_inner();
        let (certificate_pem, until) = self
            .inner
            .authority
            .sign_agent(&r.csr_pem, &id, self.inner.options.certificate_validity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(proto::RenewResponse {
            certificate_pem,
            not_after_ms: millis(until),
        }))
    }

    type SessionStream = BoxStream<proto::ServerMessage>;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let inner = self.inner.clone();
        let agent = caller(&inner, &request, "agent.session")?;
        let peer: Option<SocketAddr> = request.remote_addr();
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<proto::ServerMessage, Status>>(256);
        let out: Self::SessionStream = Box::pin(futures::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|m| (m, rx))
        }));
        if let Err(wait) = take_token(&inner) {
            let _ = tx.try_send(Ok(disconnect(
                "too many sessions starting; retry later",
                wait.as_millis() as u64 + 1,
            )));
            return Ok(Response::new(out));
        }
        let first = tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))?;
        let hello = match first {
            Some(Ok(proto::AgentMessage {
                kind: Some(agent_message::Kind::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                tracing::warn!(agent = %agent, "refused a session: the first message is not a hello");
                return Err(Status::invalid_argument(
                    "the first message of a session must be a hello",
                ));
            }
            Some(Err(s)) => {
                tracing::warn!(agent = %agent, error = %s.message(), "refused a session: its first message does not decode");
                return Err(s);
            }
            None => {
                tracing::info!(agent = %agent, "a session ended before its hello");
                return Err(Status::cancelled("the session ended before its hello"));
            }
        };
        if hello.protocol != PROTOCOL_VERSION {
            tracing::warn!(agent = %agent, protocol = hello.protocol, "refused a session: unsupported protocol version");
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported; this control plane speaks version {PROTOCOL_VERSION}",
                hello.protocol
            )));
        }
        let session_id = inner.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        let close = CancellationToken::new();
        let welcome = start_session(
            &inner,
            &agent,
            hello,
            SessionHandle {
                id: session_id,
                tx: tx.clone(),
                close: close.clone(),
            },
            peer,
        )
        .await?;
        let _ = tx.send(Ok(welcome)).await;
        tokio::spawn(read_session(inner, agent, session_id, incoming, tx, close));
        Ok(Response::new(out))
    }

    type OutputStream = BoxStream<proto::OutputAck>;

    async fn output(
        &self,
        request: Request<Streaming<proto::OutputChunk>>,
    ) -> Result<Response<Self::OutputStream>, Status> {
        let inner = self.inner.clone();
        let agent = caller(&inner, &request, "agent.output")?;
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<proto::OutputAck, Status>>(64);
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    c = incoming.next() => c,
                };
                let chunk = match chunk {
                    Some(Ok(c)) => c,
                    Some(Err(s)) => {
                        // An undecodable or oversized chunk: the stream ends with why.
                        tracing::warn!(agent = %agent, error = %s.message(), "refused an output chunk; closing the output stream");
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    None => return,
                };
                let ack = store_chunk(&inner, &agent, chunk).await;
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(futures::stream::unfold(
            rx,
            |mut rx| async { rx.recv().await.map(|m| (m, rx)) },
        ))))
    }
}

/// Takes a session-start token; when there is none, the wait until this agent's own
/// slot (slots are one token apart, after the last one given).
fn take_token(inner: &HubInner) -> Result<(), Duration> {
    let mut b = inner.bucket.lock().expect("bucket");
    let now = Instant::now();
    let rate = inner.options.session_starts_per_second.max(0.001);
    let burst = inner.options.session_burst.max(1.0);
    b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        return Ok(());
    }
    let earliest = now + Duration::from_secs_f64((1.0 - b.tokens) / rate);
    let slot = b.next_slot.max(earliest);
    b.next_slot = slot + Duration::from_secs_f64(1.0 / rate);
    Err(slot - now)
}

/// Takes the hello: replaces an older session, registers the agent's runners, and
/// answers for every attempt it holds.
async fn start_session(
    inner: &Arc<HubInner>,
    agent: &str,
    hello: proto::Hello,
    handle: SessionHandle,
    peer: Option<SocketAddr>,
) -> Result<proto::ServerMessage, Status> {
    for r in &hello.runners {
        if !valid_name(&r.name) {
            tracing::warn!(agent = %agent, runner = %r.name, "refused a session: a runner's name is not valid");
            return Err(Status::invalid_argument(format!(
                "local runner name {:?}: 1 to 64 ASCII letters, digits, '-', '_' or '.'",
                r.name
            )));
        }
        serde_json::from_str::<Capabilities>(&r.capabilities_json).map_err(|e| {
            tracing::warn!(agent = %agent, runner = %r.name, error = %e, "refused a session: a runner's capabilities do not decode");
            Status::invalid_argument(format!("capabilities of local runner {}: {e}", r.name))
        })?;
    }
    let agents = inner.state.lock().expect("hub").agents.len();
    let heartbeat = inner.options.timings.heartbeat_for(agents);
    let held: HashMap<Key, &proto::HeldAttempt> = hello
        .held
        .iter()
        .filter_map(|h| h.attempt.as_ref().map(|a| (key_of(a), h)))
        .collect();
    let mut verdicts = Vec::new();
    let mut lost = Vec::new();
    let (old, labels, name) = {
        let mut state = inner.state.lock().expect("hub");
        let state = &mut *state;
        let Some(a) = state.agents.get_mut(agent) else {
            return Err(Status::permission_denied(format!(
                "agent {agent} is not registered"
            )));
        };
        let old = a.session.replace(handle);
        let new_boot = a.boot_id.as_deref() != Some(hello.boot_id.as_str());
        a.boot_id = Some(hello.boot_id.clone());
        a.address = peer.map(|p| p.to_string());
        a.version = hello.agent_version.clone();
        a.last_beat = Some(Instant::now());
        a.last_beat_at = Some(SystemTime::now());
        a.since = Instant::now();
        a.heartbeat = heartbeat;
        a.draining = hello.draining;
        a.lost = false;
        a.unhealthy.clear();
        a.full.clear();
        let (labels, name) = (a.record.labels.clone(), a.record.name.clone());
        // Attempts the control plane has for this agent that it no longer holds: the
        // process that ran them is gone (a new boot id), or it forgot them. Lost now,
        // without waiting for the lease.
        let mine: Vec<Key> = state
            .attempts
            .iter()
            .filter(|(k, at)| lease::lost_at_reconnect(&at.agent, agent, held.contains_key(*k)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in mine {
            if let Some(at) = state.attempts.remove(&k) {
                tracing::warn!(job_id = %k.0, attempt = k.1, agent = %agent, new_boot, "the reconnected agent no longer holds the attempt: lost");
                lost.push(at);
            }
        }
        for (k, h) in &held {
            let holder = state.attempts.get(k).and_then(AttemptLive::holder);
            let verdict = lease::verdict(holder, agent, state.done.contains_key(k));
            let offset = match verdict {
                proto::Verdict::Continue => {
                    if let Some(at) = state.attempts.get_mut(k) {
                        match &mut at.phase {
                            Phase::Reattached(_) => at.phase = Phase::Running,
                            // Held means taken: its accept was lost with the old session.
                            Phase::Offered(answer) => {
                                if let Some(answer) = answer.take() {
                                    let _ = answer.send(Ok(()));
                                }
                                at.phase = Phase::Running;
                            }
                            Phase::Running | Phase::Withdrawn(_) => {}
                        }
                    }
                    None
                }
                proto::Verdict::Done => Some(h.spooled),
                _ => Some(0),
            };
            verdicts.push((k.clone(), verdict, offset));
        }
        (old, labels, name)
    };
    if let Some(old) = old {
        let _ = old.tx.try_send(Ok(disconnect(
            "replaced by a newer session of this agent",
            0,
        )));
        old.close.cancel();
    }
    for at in lost {
        end_lost(at);
    }
    // The control plane's durable length of each continued attempt.
    let mut out = Vec::new();
    for (k, verdict, offset) in verdicts {
        let offset = match offset {
            Some(o) => o,
            None => {
                let io = inner
                    .state
                    .lock()
                    .expect("hub")
                    .attempts
                    .get(&k)
                    .map(|a| a.io.clone());
                // Waits for a replay or a chunk being stored right now, so the offset
                // is the exact durable length.
                match io {
                    Some(io) => io.lock().await.spool.len(),
                    None => 0,
                }
            }
        };
        out.push(proto::HeldVerdict {
            attempt: Some(attempt_ref(&k)),
            verdict: verdict as i32,
            offset,
        });
    }
    register_runners(inner, agent, &name, &labels, &hello.runners);
    inner.admission.audit(
        &format!("agent:{agent}"),
        "agent.session",
        Some(agent),
        "ok",
    );
    tracing::info!(agent = %agent, name = %name, held = hello.held.len(), "agent session started");
    let t = &inner.options.timings;
    Ok(msg(server_message::Kind::Welcome(proto::Welcome {
        session_id: format!("{agent}/{}", uuid::Uuid::new_v4()),
        heartbeat_interval_ms: heartbeat.as_millis() as u64,
        self_fence_ms: t.self_fence_for(heartbeat).as_millis() as u64,
        reassign_ms: t.reassign_for(heartbeat).as_millis() as u64,
        verdicts: out,
        agent_id: agent.to_string(),
        protocol: PROTOCOL_VERSION,
    })))
}

/// Puts the agent's runners in the registry (and the store, so a restarted control
/// plane has them before the agent reconnects); removes ones it no longer offers.
fn register_runners(
    inner: &Arc<HubInner>,
    agent: &str,
    agent_name: &str,
    labels: &[String],
    runners: &[proto::LocalRunner],
) {
    let Some(plane) = inner.plane.get() else {
        return;
    };
    let prefix = format!("{agent}.");
    let mut offered = BTreeSet::new();
    for r in runners {
        let id = runner_id(agent, &r.name);
        offered.insert(id.clone());
        let caps: Capabilities =
            serde_json::from_str(&r.capabilities_json).expect("checked in start_session");
        let mut all_labels: BTreeSet<String> = labels.iter().cloned().collect();
        all_labels.extend(r.labels.iter().cloned());
        let config = RemoteRunnerConfig {
            agent: agent.to_string(),
            runner: r.name.clone(),
            local_kind: r.kind.clone(),
            capabilities: caps,
        };
        let name = format!("{agent_name}/{}", r.name);
        let existing = plane.registry().get(&id);
        if let Some(e) = &existing {
            let same = e.info().labels == all_labels
                && e.info().name == name
                && e.runner.capabilities() == &config.capabilities;
            if same || e.runner.running() > 0 {
                plane.check_runner_soon(&id);
                continue;
            }
            plane.remove(&id);
        }
        let runner: Arc<dyn Runner> = Arc::new(RemoteRunner::new(
            inner.clone(),
            id.clone(),
            name.clone(),
            all_labels.iter().cloned().collect(),
            config.clone(),
        ));
        plane.register(runner, RegisterOptions::default());
        plane.check_runner_soon(&id);
        let record = RunnerRecord::new(
            id.clone(),
            name.clone(),
            crate::KIND,
            serde_json::json!({
                "name": name,
                "kind": crate::KIND,
                "labels": all_labels,
                "slots": config.capabilities.max_concurrency,
                crate::KIND: config,
            }),
        );
        if let Err(e) = plane.store().put_runner(&record) {
            tracing::error!(runner = %id, error = %Chain(&e), "storing an agent's runner");
        }
    }
    // The agent's runners it no longer offers (and that run nothing) leave. Looked up by
    // their id prefix: a scan of the whole registry per session start would make a storm
    // of reconnecting agents quadratic.
    for id in plane.registry().ids_with_prefix(&prefix) {
        let idle = plane
            .registry()
            .get(&id)
            .is_some_and(|e| e.runner.running() == 0);
        if !offered.contains(&id) && idle {
            plane.remove(&id);
            let _ = plane.store().remove_runner(&id);
        }
    }
}

async fn read_session(
    inner: Arc<HubInner>,
    agent: String,
    session_id: u64,
    mut incoming: Streaming<proto::AgentMessage>,
    tx: mpsc::Sender<Result<proto::ServerMessage, Status>>,
    close: CancellationToken,
) {
    let end = loop {
        let next = tokio::select! {
            _ = close.cancelled() => break "closed by the control plane".to_string(),
            _ = inner.stop.cancelled() => break "the control plane is stopping".to_string(),
            m = incoming.next() => m,
        };
        let m = match next {
            Some(Ok(m)) => m,
            Some(Err(s)) => {
                // An undecodable or oversized message: the agent is told why the session
                // ends (the status), not just that it did.
                let end = format!("stream error: {}", s.message());
                let _ = tx.send(Err(s)).await;
                break end;
            }
            None => break "the agent closed the session".to_string(),
        };
        if let Err(status) = handle(&inner, &agent, session_id, m, &tx).await {
            tracing::warn!(agent = %agent, error = %status.message(), "refused a message; closing the session");
            let _ = tx.send(Err(status)).await;
            break "protocol error".to_string();
        }
    };
    let current = {
        let mut state = inner.state.lock().expect("hub");
        match state.agents.get_mut(&agent) {
            Some(a) if a.session.as_ref().is_some_and(|s| s.id == session_id) => {
                a.session = None;
                a.since = a.last_beat.unwrap_or_else(Instant::now);
                true
            }
            _ => false,
        }
    };
    if current {
        tracing::info!(agent = %agent, reason = %end, "agent session ended");
        check_runners_of(&inner, &agent);
    }
}

/// The attempt `r` names if `agent` holds it now; otherwise why not.
fn held_by(inner: &HubInner, agent: &str, r: Option<&proto::AttemptRef>) -> Result<Key, String> {
    let r = r.ok_or("a message about an attempt without its attempt reference")?;
    let k = key_of(r);
    let state = inner.state.lock().expect("hub");
    let holder = state.attempts.get(&k).and_then(AttemptLive::holder);
    if lease::holds(holder, agent) {
        Ok(k)
    } else {
        Err(format!(
            "attempt {} of job {} is not held by this agent (superseded, cancelled or unknown)",
            k.1, k.0
        ))
    }
}

async fn handle(
    inner: &Arc<HubInner>,
    agent: &str,
    session_id: u64,
    m: proto::AgentMessage,
    tx: &mpsc::Sender<Result<proto::ServerMessage, Status>>,
) -> Result<(), Status> {
    let abort = |r: Option<proto::AttemptRef>, reason: String| {
        tracing::warn!(agent = %agent, reason = %reason, "refused a message about an attempt");
        msg(server_message::Kind::Abort(proto::Abort {
            attempt: r,
            reason,
        }))
    };
    match m.kind {
        None => {
            return Err(Status::invalid_argument(format!(
                "a message of a kind this control plane does not know (protocol version \
                 {PROTOCOL_VERSION})"
            )));
        }
        Some(agent_message::Kind::Hello(_)) => {
            return Err(Status::invalid_argument("a second hello in one session"));
        }
        Some(agent_message::Kind::Heartbeat(h)) => {
            let taken = {
                let mut state = inner.state.lock().expect("hub");
                let state = &mut *state;
                match state.agents.get_mut(agent) {
                    Some(a) if a.session.as_ref().is_some_and(|s| s.id == session_id) => {
                        let was_draining = a.draining;
                        a.last_beat = Some(Instant::now());
                        a.last_beat_at = Some(SystemTime::now());
                        a.draining = h.draining;
                        let unhealthy: HashMap<String, String> = h
                            .unhealthy
                            .into_iter()
                            .filter(|(_, why)| !why.is_empty())
                            .collect();
                        let full: HashMap<String, String> = h
                            .full
                            .into_iter()
                            .filter(|(_, why)| !why.is_empty())
                            .collect();
                        let changed = unhealthy != a.unhealthy
                            || full != a.full
                            || was_draining != a.draining;
                        a.unhealthy = unhealthy;
                        a.full = full;
                        // Attempts the agent runs that the control plane gave up (lost
                        // while it was away, cancelled meanwhile): it must stop them.
                        let strays: Vec<proto::AttemptRef> = h
                            .running
                            .iter()
                            .filter(|r| {
                                let k = key_of(r);
                                !state.done.contains_key(&k)
                                    && !lease::holds(
                                        state.attempts.get(&k).and_then(AttemptLive::holder),
                                        agent,
                                    )
                            })
                            .cloned()
                            .collect();
                        Some((changed, strays))
                    }
                    _ => None,
                }
            };
            if let Some((changed, strays)) = taken {
                let _ = tx.try_send(Ok(msg(server_message::Kind::HeartbeatAck(
                    proto::HeartbeatAck { seq: h.seq },
                ))));
                for r in strays {
                    let why = format!(
                        "attempt {} of job {} is not held by this agent (superseded, cancelled or lost)",
                        r.attempt, r.job_id
                    );
                    let _ = tx.send(Ok(abort(Some(r), why))).await;
                }
                if changed {
                    check_runners_of(inner, agent);
                }
            }
        }
        Some(agent_message::Kind::Accept(a)) => {
            let r = a.attempt.clone();
            match held_by(inner, agent, a.attempt.as_ref()) {
                Ok(k) => {
                    let mut state = inner.state.lock().expect("hub");
                    if let Some(at) = state.attempts.get_mut(&k)
                        && let Phase::Offered(answer) = &mut at.phase
                    {
                        if let Some(answer) = answer.take() {
                            let _ = answer.send(Ok(()));
                        }
                        at.phase = Phase::Running;
                    }
                }
                Err(why) => {
                    let _ = tx.send(Ok(abort(r, why))).await;
                }
            }
        }
        // A refused withdrawn offer, or a refusal of an attempt continued since (after a
        // control-plane restart): the agent does not run it.
        Some(agent_message::Kind::Reject(rj))
            if inner.refuse_withdrawn(agent, &rj)
                || inner.release_running(agent, rj.attempt.as_ref()) => {}
        Some(agent_message::Kind::Reject(rj)) => match held_by(inner, agent, rj.attempt.as_ref()) {
            Ok(k) => {
                let mut state = inner.state.lock().expect("hub");
                if let Some(at) = state.attempts.get_mut(&k)
                    && let Phase::Offered(answer) = &mut at.phase
                    && let Some(answer) = answer.take()
                {
                    let _ = answer.send(Err((rj.reason, rj.temporary)));
                }
            }
            // A refusal of an attempt this agent does not hold: it is told, as for any
            // message about such an attempt.
            Err(why) => {
                let _ = tx.send(Ok(abort(rj.attempt, why))).await;
            }
        },
        Some(agent_message::Kind::Event(ev)) => {
            let r = ev.attempt.clone();
            let k = match held_by(inner, agent, ev.attempt.as_ref()) {
                Ok(k) => k,
                Err(why) => {
                    let _ = tx.send(Ok(abort(r, why))).await;
                    return Ok(());
                }
            };
            let kind = match ev.kind {
                Some(proto::attempt_event::Kind::StepStarted(s)) => EventKind::StepStarted {
                    step: s.step as usize,
                    name: s.name,
                },
                Some(proto::attempt_event::Kind::StepFinished(s)) => {
                    let status: StepStatus = serde_json::from_str(&s.status_json).map_err(|e| {
                        Status::invalid_argument(format!("step_finished.status_json: {e}"))
                    })?;
                    if !s.usage_json.is_empty() {
                        let usage =
                            serde_json::from_str::<rustci_runners::ResourceUsage>(&s.usage_json)
                                .map_err(|e| e.to_string())
                                .and_then(|u| u.check().map(|()| u))
                                .map_err(|e| {
                                    Status::invalid_argument(format!(
                                        "step_finished.usage_json: {e}"
                                    ))
                                })?;
                        if let Some(a) = inner.state.lock().expect("hub").attempts.get(&k) {
                            let _ = a.work.send(Work::Event(EventKind::Usage {
                                step: Some(s.step as usize),
                                usage,
                            }));
                        }
                    }
                    EventKind::StepFinished {
                        step: s.step as usize,
                        name: s.name,
                        status,
                        duration: Duration::from_millis(s.duration_ms),
                    }
                }
                None => {
                    return Err(Status::invalid_argument(
                        "an attempt event of a kind this control plane does not know",
                    ));
                }
            };
            if let Some(a) = inner.state.lock().expect("hub").attempts.get(&k) {
                let _ = a.work.send(Work::Event(kind));
            }
        }
        // A withdrawn offer's attempt ended on the agent: it decides nothing (the job was
        // given back), and the agent is told to forget it.
        Some(agent_message::Kind::Complete(c))
            if inner.release_withdrawn(agent, c.attempt.as_ref()) =>
        {
            let why = "the offer was withdrawn (not accepted in time)".to_string();
            let _ = tx.send(Ok(abort(c.attempt, why))).await;
        }
        Some(agent_message::Kind::Released(rl)) => {
            // Never answered; about an attempt not held for this agent it changes nothing.
            inner.release(agent, rl.attempt.as_ref());
        }
        Some(agent_message::Kind::Complete(c)) => {
            let r = c.attempt.clone();
            let k = match held_by(inner, agent, c.attempt.as_ref()) {
                Ok(k) => k,
                Err(why) => {
                    // Already stored here: the agent only missed the ack.
                    if r.as_ref().is_some_and(|r| {
                        inner
                            .state
                            .lock()
                            .expect("hub")
                            .done
                            .contains_key(&key_of(r))
                    }) {
                        let _ = tx
                            .send(Ok(msg(server_message::Kind::CompleteAck(
                                proto::CompleteAck { attempt: r },
                            ))))
                            .await;
                    } else {
                        let _ = tx.send(Ok(abort(r, why))).await;
                    }
                    return Ok(());
                }
            };
            let outcome: Outcome = serde_json::from_str(&c.outcome_json)
                .map_err(|e| Status::invalid_argument(format!("complete.outcome_json: {e}")))?;
            if !c.usage_json.is_empty() {
                serde_json::from_str::<rustci_runners::ResourceUsage>(&c.usage_json)
                    .map_err(|e| e.to_string())
                    .and_then(|u| u.check())
                    .map_err(|e| Status::invalid_argument(format!("complete.usage_json: {e}")))?;
            }
            let offered = {
                let state = inner.state.lock().expect("hub");
                match state.attempts.get(&k) {
                    Some(a) if matches!(a.phase, Phase::Offered(_)) => true,
                    Some(a) => {
                        let _ = a.work.send(Work::Complete {
                            complete: c,
                            outcome,
                            tx: tx.clone(),
                        });
                        false
                    }
                    None => false,
                }
            };
            if offered {
                let _ = tx
                    .send(Ok(abort(
                        r,
                        "a completion before the offer was accepted".into(),
                    )))
                    .await;
            }
        }
        Some(agent_message::Kind::Goodbye(g)) => {
            tracing::info!(agent = %agent, reason = %g.reason, "agent said goodbye");
            if let Some(a) = inner.state.lock().expect("hub").agents.get_mut(agent) {
                a.draining = true;
            }
        }
    }
    Ok(())
}

/// Stores one output chunk at the attempt's durable length and answers with the new one.
async fn store_chunk(
    inner: &Arc<HubInner>,
    agent: &str,
    chunk: proto::OutputChunk,
) -> Result<proto::OutputAck, Status> {
    let r = chunk.attempt.clone();
    let k = match held_by(inner, agent, chunk.attempt.as_ref()) {
        Ok(k) => k,
        Err(why) => {
            let done = r.as_ref().is_some_and(|r| {
                inner
                    .state
                    .lock()
                    .expect("hub")
                    .done
                    .contains_key(&key_of(r))
            });
            return Ok(proto::OutputAck {
                attempt: r,
                offset: 0,
                error: why,
                abort: !done,
            });
        }
    };
    if chunk.data.len() > MAX_CHUNK_BYTES {
        return Err(Status::invalid_argument(format!(
            "an output chunk of {} bytes; at most {MAX_CHUNK_BYTES}",
            chunk.data.len()
        )));
    }
    let stream = match chunk.stream {
        0 => OutputStream::Stdout,
        1 => OutputStream::Stderr,
        n => {
            return Err(Status::invalid_argument(format!(
                "output stream {n}: 0 (stdout) or 1 (stderr)"
            )));
        }
    };
    let Some(io) = inner
        .state
        .lock()
        .expect("hub")
        .attempts
        .get(&k)
        .map(|a| a.io.clone())
    else {
        return Ok(proto::OutputAck {
            attempt: r,
            offset: 0,
            error: "the attempt ended".into(),
            abort: true,
        });
    };
    let mut io_guard = io.lock().await;
    // It may have ended while this chunk waited for the lock.
    if !is_current(inner, &k, &io) {
        return Ok(proto::OutputAck {
            attempt: r,
            offset: 0,
            error: "the attempt ended".into(),
            abort: true,
        });
    }
    let io = &mut *io_guard;
    let len = io.spool.len();
    if chunk.offset != len {
        return Ok(proto::OutputAck {
            attempt: r,
            offset: len,
            error: format!(
                "offset {} does not match the stored length {len}; send from {len}",
                chunk.offset
            ),
            abort: false,
        });
    }
    if let Err(e) = io.spool.append(&chunk.data) {
        tracing::error!(error = %e, path = %io.spool.path().display(), "storing output");
        return Ok(proto::OutputAck {
            attempt: r,
            offset: len,
            error: format!("the control plane could not store the chunk: {e}"),
            abort: false,
        });
    }
    let new_len = io.spool.len();
    io.sink
        .emit(EventKind::Output {
            step: chunk.step as usize,
            stream,
            data: chunk.data.into(),
        })
        .await;
    Ok(proto::OutputAck {
        attempt: r,
        offset: new_len,
        error: String::new(),
        abort: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(String, String)>>);

    impl Admission for Recorded {
        fn admit(&self, _: &str, _: &str) -> Result<Vec<String>, String> {
            Err("not here".into())
        }
        fn audit(&self, actor: &str, action: &str, _: Option<&str>, result: &str) {
            assert_eq!(action, "agent.tls");
            self.0
                .lock()
                .unwrap()
                .push((actor.to_string(), result.to_string()));
        }
    }

    #[test]
    fn refused_certificates_are_audited_one_by_one_up_to_a_rate_then_counted() {
        let audit = Arc::new(Recorded::default());
        let refusals = RefusalAudit::new(audit.clone());
        for i in 0..25 {
            refusals.refused(&format!("who-{i}"), "unknown issuer");
        }
        {
            let entries = audit.0.lock().unwrap();
            assert_eq!(entries.len(), RefusalAudit::PER_WINDOW as usize);
            assert_eq!(entries[0].0, "cert:who-0");
            assert!(entries[0].1.contains("unknown issuer"), "{:?}", entries[0]);
        }
        // Within the minute, nothing more is written.
        refusals.flush();
        assert_eq!(audit.0.lock().unwrap().len(), 20);
        // Once the minute is over, the five not written one by one are, as one entry,
        // and the next window starts empty.
        let later = Instant::now() + RefusalAudit::WINDOW + Duration::from_secs(1);
        let rolled = RefusalAudit::roll(&mut refusals.window.lock().unwrap(), later);
        assert_eq!(rolled, Some(5));
        refusals.audit_suppressed(rolled);
        let entries = audit.0.lock().unwrap().clone();
        assert_eq!(entries.len(), 21);
        assert_eq!(entries[20].0, "cert:*");
        assert!(entries[20].1.contains("5 more"), "{:?}", entries[20]);
        let w = refusals.window.lock().unwrap();
        assert_eq!((w.recorded, w.suppressed), (0, 0));
    }
}
