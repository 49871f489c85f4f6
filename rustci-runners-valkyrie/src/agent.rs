//! The agent: registers once, keeps one session to the control plane, runs what it is
//! offered on its local runners, spools output to disk until the control plane holds
//! it, and fences itself when it cannot reach the control plane.
//!
//! Data directory: `agent.json` (id, server, name), `agent.key`, `agent.pem`, `ca.pem`,
//! `attempts.journal` (one JSON line per event of an attempt: started with its job,
//! attempt and runner; finished with its outcome, length and SHA-256; gone once the
//! control plane holds it), and `attempts/<execution id>.out` for an attempt that wrote
//! output. No file is created for an attempt that writes nothing, because file creation
//! and removal are much of what a short job costs. (Directories `attempts/<execution
//! id>/` with `meta.json`, `output` and `outcome.json` from earlier versions are still
//! read.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use rustci_runners::Runner;
use rustci_runners::error::Chain;
use rustci_runners::job::Job;
use rustci_runners::runner::{Canceller, EventKind, JobId, Outcome, OutputStream};

use crate::lease;
use crate::pki::{self, SERVER_NAME};
use crate::proto::{self, agent_message, server_message, valkyrie_client::ValkyrieClient};
use crate::spool::{Journal, Spares, Spool};
use crate::{MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MAX_SPARE_FILES, PROTOCOL_VERSION};

/// How the agent finds the control plane's CA on first contact.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Pinned by fingerprint (`sha256:<hex>`, as the server prints it).
    Fingerprint(String),
    /// A PEM file.
    File(PathBuf),
}

/// How an agent runs.
#[derive(Clone)]
#[non_exhaustive]
pub struct AgentOptions {
    /// The control plane's agent address, `host:port` (an `https://` prefix is allowed).
    pub server: String,
    /// The registration token (needed only until the agent has registered).
    pub token: Option<String>,
    /// The CA, on first contact (afterwards `ca.pem` in the data directory is used).
    pub ca: Option<CaSource>,
    /// The agent's name (default: the host name).
    pub name: Option<String>,
    /// Labels for all its runners.
    pub labels: Vec<String>,
    /// Where it keeps its identity and spools.
    pub data_dir: PathBuf,
    /// Its local runners by name.
    pub runners: Vec<(String, Arc<dyn Runner>)>,
    /// Most output spooled per attempt; past it one marker is written and the rest
    /// counted as dropped.
    pub max_spool_bytes: u64,
    /// First reconnection delay window; doubles per failure up to `backoff_max`.
    pub backoff_base: Duration,
    /// Largest reconnection delay window.
    pub backoff_max: Duration,
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("server", &self.server)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl AgentOptions {
    /// Options with defaults: 256 MiB spool cap, reconnection windows from 1 s to 64 s.
    pub fn new(server: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        AgentOptions {
            server: server.into(),
            token: None,
            ca: None,
            name: None,
            labels: Vec::new(),
            data_dir: data_dir.into(),
            runners: Vec::new(),
            max_spool_bytes: 256 * 1024 * 1024,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(64),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct IdentityFile {
    agent_id: String,
    server: String,
    name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    job_id: String,
    attempt: u32,
    runner: String,
}

/// A line of `attempts.journal`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Start {
        exec: String,
        job_id: String,
        attempt: u32,
        runner: String,
    },
    Done {
        exec: String,
        finished: Finished,
    },
    Gone {
        exec: String,
    },
}

/// Lines the journal may reach before it is rewritten with only the live attempts (and
/// only when there are at most a sixteenth as many of those as lines).
const JOURNAL_REWRITE_LINES: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Finished {
    outcome: Outcome,
    length: u64,
    sha256: String,
    dropped: u64,
    /// What the attempt used, when its runner measures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<rustci_runners::ResourceUsage>,
}

type Key = (String, u32);

struct LocalAttempt {
    /// The execution id (`<job id>-<attempt>`): its output is `attempts/<exec>.out`.
    exec: String,
    /// Its local runner.
    runner: String,
    /// Where an earlier version kept it (a directory), if it did.
    old_dir: Option<PathBuf>,
    spool: Arc<Mutex<Spool>>,
    /// (offset, step, stream) where each run of output began.
    segments: Arc<Mutex<Vec<(u64, u32, u32)>>>,
    /// The control plane holds every byte before this.
    acked: u64,
    /// Sent in this session (acked or not).
    sent: u64,
    finished: Option<Finished>,
    complete_sent: Option<Instant>,
    /// `None` while the local runner is still starting it.
    canceller: Option<Canceller>,
    /// A cancel that arrived while it was starting.
    cancel_requested: bool,
    /// Stopped by the agent itself (self-fence, drain deadline, stop): the job did not
    /// end by itself, so its outcome is `lost`.
    interrupted: bool,
    aborted: bool,
}

struct Shared {
    options: AgentOptions,
    identity: IdentityFile,
    ca_pem: String,
    boot_id: String,
    attempts: Mutex<HashMap<Key, LocalAttempt>>,
    /// `attempts.journal`; locked after `attempts` when both are.
    journal: Mutex<Journal>,
    /// Emptied output files for the next attempts (`spare/`).
    spares: Arc<Spares>,
    output_ready: Notify,
    /// Wakes the session loop to send completions; a permit is kept when it is busy, so
    /// no wake-up is lost.
    complete_ready: Notify,
    session_tx: Mutex<Option<mpsc::Sender<proto::AgentMessage>>>,
    /// Aborted attempts this agent has stopped (or never held), to be reported with
    /// `Released` by the session loop; locked after `attempts` when both are.
    released: Mutex<Vec<Key>>,
    /// Lease: when the last acknowledged heartbeat (or the hello) was sent.
    renewed: Mutex<Option<Instant>>,
    self_fence: Mutex<Duration>,
    draining: std::sync::atomic::AtomicBool,
    /// Why a local runner cannot run jobs now, by name (from its health checks).
    unhealthy: Mutex<HashMap<String, String>>,
    /// Why a local runner takes no new jobs for now (`Health::Full`), by name.
    full: Mutex<HashMap<String, String>>,
    stop: CancellationToken,
    connected: tokio::sync::watch::Sender<bool>,
}

/// A running agent. Dropping it does not stop it; call [`Agent::stop`] or
/// [`Agent::drain`].
pub struct Agent {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.shared.identity.agent_id)
            .finish_non_exhaustive()
    }
}

fn host_name() -> String {
    nix_hostname().unwrap_or_else(|| "agent".to_string())
}

fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn server_addr(server: &str) -> String {
    server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

fn read_opt(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

fn write_private(path: &Path, data: &str) -> Result<(), String> {
    pki::write_private(path, data).map_err(|e| e.to_string())
}

/// Appends `record` to the journal; rewrites the journal from `live` when it has grown
/// long. Called with the attempts locked, so records follow the order of changes.
fn journal(shared: &Shared, live: &HashMap<Key, LocalAttempt>, record: Record) {
    let mut j = shared.journal.lock().expect("journal");
    if let Err(e) = j.append(&record) {
        tracing::error!(error = %e, "writing the attempts journal");
    }
    if j.lines() > JOURNAL_REWRITE_LINES && live.len() * 16 < j.lines() {
        let mut records = Vec::new();
        for a in live.values() {
            if let Some(r) = a.start_record() {
                records.push(r);
            }
            if let Some(f) = &a.finished {
                records.push(Record::Done {
                    exec: a.exec.clone(),
                    finished: f.clone(),
                });
            }
        }
        if let Err(e) = j.rewrite(&records) {
            tracing::error!(error = %e, "rewriting the attempts journal");
        }
    }
}

impl LocalAttempt {
    fn start_record(&self) -> Option<Record> {
        let (job, attempt) = rustci_control::parse_attempt_id(&JobId::from(self.exec.clone()))?;
        Some(Record::Start {
            exec: self.exec.clone(),
            job_id: job.as_str().to_string(),
            attempt,
            runner: self.runner.clone(),
        })
    }
}

/// Lets an attempt go: its output file becomes a spare (an earlier version's directory
/// is removed), and the journal says it is gone. Called with the attempts locked (`live`
/// without it).
fn let_go(shared: &Shared, live: &HashMap<Key, LocalAttempt>, a: LocalAttempt) {
    if let Some(dir) = &a.old_dir {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        a.spool.lock().expect("spool").retire(&shared.spares);
    }
    journal(shared, live, Record::Gone { exec: a.exec });
}

fn jitter(window: Duration) -> Duration {
    let n = uuid::Uuid::new_v4().as_u128() as u64;
    let ms = window.as_millis().max(1) as u64;
    Duration::from_millis(n % ms)
}

impl Agent {
    /// Loads the agent's identity from its data directory, registering first when it
    /// has none (which needs `options.token` and `options.ca`), cleans up what an
    /// earlier run left, and starts the session loop.
    pub async fn start(options: AgentOptions) -> Result<Agent, String> {
        if options.runners.is_empty() {
            return Err("an agent needs at least one local runner".into());
        }
        let dir = options.data_dir.clone();
        std::fs::create_dir_all(dir.join("attempts"))
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let ca_pem = find_ca(&options).await?;
        let journal_path = dir.join("attempts.journal");
        let (journal, records) = Journal::open::<Record>(&journal_path)
            .map_err(|e| format!("reading {}: {e}", journal_path.display()))?;
        let spares = Spares::open(&dir.join("spare"), MAX_SPARE_FILES)
            .map_err(|e| format!("opening {}: {e}", dir.join("spare").display()))?;
        let identity = match read_opt(&dir.join("agent.json"))? {
            Some(s) => serde_json::from_str::<IdentityFile>(&s)
                .map_err(|e| format!("{}: {e}", dir.join("agent.json").display()))?,
            None => register(&options, &ca_pem).await?,
        };
        let shared = Arc::new(Shared {
            identity,
            ca_pem,
            boot_id: uuid::Uuid::new_v4().to_string(),
            attempts: Mutex::new(HashMap::new()),
            journal: Mutex::new(journal),
            spares,
            output_ready: Notify::new(),
            complete_ready: Notify::new(),
            session_tx: Mutex::new(None),
            released: Mutex::new(Vec::new()),
            renewed: Mutex::new(None),
            self_fence: Mutex::new(Duration::from_secs(15)),
            draining: std::sync::atomic::AtomicBool::new(false),
            unhealthy: Mutex::new(HashMap::new()),
            full: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            connected: tokio::sync::watch::channel(false).0,
            options,
        });
        load_attempts(&shared, records).await;
        tokio::spawn(fence_watch(shared.clone()));
        tokio::spawn(health_watch(shared.clone()));
        let task = tokio::spawn(session_loop(shared.clone()));
        Ok(Agent { shared, task })
    }

    /// The agent's id.
    pub fn id(&self) -> &str {
        &self.shared.identity.agent_id
    }

    /// The boot id of this run.
    pub fn boot_id(&self) -> &str {
        &self.shared.boot_id
    }

    /// Waits until a session is up (`true`) or down (`false`).
    pub async fn wait_connected(&self, connected: bool) {
        let mut rx = self.shared.connected.subscribe();
        let _ = rx.wait_for(|c| *c == connected).await;
    }

    /// Attempts held now (running, or finished and not yet acknowledged).
    pub fn held(&self) -> usize {
        self.shared.attempts.lock().expect("attempts").len()
    }

    /// Takes no new jobs; waits for running ones up to `deadline` (then cancels them),
    /// waits for their completions to be acknowledged (up to the same deadline again),
    /// and says goodbye. Call [`Agent::stop`] after it.
    pub async fn drain(&self, deadline: Duration) {
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        send(&self.shared, heartbeat(&self.shared, 0)).await;
        let until = Instant::now() + deadline;
        let unfinished = |s: &Shared| {
            s.attempts
                .lock()
                .expect("attempts")
                .values()
                .filter(|a| a.finished.is_none())
                .count()
        };
        while unfinished(&self.shared) > 0 && Instant::now() < until {
            let notified = self.shared.output_ready.notified();
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        for a in self.shared.attempts.lock().expect("attempts").values_mut() {
            if a.finished.is_none() {
                a.interrupted = true;
                if let Some(c) = &a.canceller {
                    c.cancel();
                }
            }
        }
        let until = Instant::now() + deadline;
        while self.held() > 0 && Instant::now() < until {
            let notified = self.shared.output_ready.notified();
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        send(
            &self.shared,
            proto::AgentMessage {
                kind: Some(agent_message::Kind::Goodbye(proto::Goodbye {
                    reason: "drained".into(),
                })),
            },
        )
        .await;
    }

    /// Stops at once: cancels running jobs (their spools stay on disk) and closes the
    /// session.
    pub async fn stop(self) {
        for a in self.shared.attempts.lock().expect("attempts").values_mut() {
            if a.finished.is_none() {
                a.interrupted = true;
                if let Some(c) = &a.canceller {
                    c.cancel();
                }
            }
        }
        self.shared.stop.cancel();
        let _ = self.task.await;
    }
}

async fn find_ca(options: &AgentOptions) -> Result<String, String> {
    let path = options.data_dir.join("ca.pem");
    let stored = read_opt(&path)?;
    let ca = match (&options.ca, stored) {
        (Some(CaSource::File(f)), _) => std::fs::read_to_string(f)
            .map_err(|e| format!("reading the CA file {}: {e}", f.display()))?,
        (Some(CaSource::Fingerprint(fp)), Some(stored)) => {
            let pin = pki::parse_fingerprint(fp)?;
            let der = pki::first_cert_der(&stored)?;
            if pki::parse_fingerprint(&pki::fingerprint(&der))? != pin {
                return Err(format!(
                    "the CA stored in {} does not have the fingerprint given ({fp})",
                    path.display()
                ));
            }
            stored
        }
        (Some(CaSource::Fingerprint(fp)), None) => {
            let pin = pki::parse_fingerprint(fp)?;
            pki::fetch_pinned_ca(&server_addr(&options.server), pin).await?
        }
        (None, Some(stored)) => stored,
        (None, None) => {
            return Err(format!(
                "no CA for the control plane: give --ca-fingerprint (printed by the server at its first start) or --ca FILE; {} does not exist yet",
                path.display()
            ));
        }
    };
    pki::first_cert_der(&ca).map_err(|e| format!("the CA: {e}"))?;
    if read_opt(&path)?.as_deref() != Some(ca.as_str()) {
        write_private(&path, &ca)?;
    }
    Ok(ca)
}

fn endpoint(options: &AgentOptions) -> Result<Endpoint, String> {
    Endpoint::from_shared(format!("https://{}", server_addr(&options.server)))
        .map_err(|e| format!("server address {:?}: {e}", options.server))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                .tcp_nodelay(true)
        })
}

async fn register(options: &AgentOptions, ca_pem: &str) -> Result<IdentityFile, String> {
    let token = options.token.clone().ok_or_else(|| {
        format!(
            "this agent is not registered yet ({} has no agent.json): give --token (from POST /api/tokens)",
            options.data_dir.display()
        )
    })?;
    let name = options.name.clone().unwrap_or_else(host_name);
    let (key, csr) = pki::new_key_and_csr(&name).map_err(|e| e.to_string())?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(SERVER_NAME);
    let channel = endpoint(options)?
        .tls_config(tls)
        .map_err(|e| format!("TLS: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {}: {}", options.server, Chain(&e)))?;
    let mut client = ValkyrieClient::new(channel);
    let r = client
        .register(proto::RegisterRequest {
            token,
            csr_pem: csr,
            name: name.clone(),
            hostname: host_name(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: options.labels.clone(),
        })
        .await
        .map_err(|s| format!("registration refused: {}", s.message()))?
        .into_inner();
    let dir = &options.data_dir;
    write_private(&dir.join("agent.key"), &key)?;
    write_private(&dir.join("agent.pem"), &r.certificate_pem)?;
    let identity = IdentityFile {
        agent_id: r.agent_id,
        server: options.server.clone(),
        name,
    };
    write_private(
        &dir.join("agent.json"),
        &serde_json::to_string_pretty(&identity).expect("serializable"),
    )?;
    tracing::info!(agent = %identity.agent_id, "registered with the control plane");
    Ok(identity)
}

/// Attempts an earlier run of the agent left: finished ones are held (their completion
/// is still owed); unfinished ones died with that run, and what is left of them is
/// stopped.
async fn load_attempts(shared: &Arc<Shared>, records: Vec<Record>) {
    let root = shared.options.data_dir.join("attempts");
    // (meta, finished) by execution id, from the journal, in order.
    let mut seen: HashMap<String, (Option<Meta>, Option<Finished>)> = HashMap::new();
    for r in records {
        match r {
            Record::Start {
                exec,
                job_id,
                attempt,
                runner,
            } => {
                seen.insert(
                    exec,
                    (
                        Some(Meta {
                            job_id,
                            attempt,
                            runner,
                        }),
                        None,
                    ),
                );
            }
            Record::Done { exec, finished } => {
                if let Some(e) = seen.get_mut(&exec) {
                    e.1 = Some(finished);
                }
            }
            Record::Gone { exec } => {
                seen.remove(&exec);
            }
        }
    }
    // (exec, meta, finished, old directory)
    type Found = (String, Option<Meta>, Option<Finished>, Option<PathBuf>);
    let mut found: Vec<Found> = seen
        .into_iter()
        .map(|(exec, (m, f))| (exec, m, f, None))
        .collect();
    let mut known: std::collections::HashSet<String> = found.iter().map(|f| f.0.clone()).collect();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                // An earlier version's layout.
                let meta: Option<Meta> = std::fs::read(path.join("meta.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                let finished: Option<Finished> = std::fs::read(path.join("outcome.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                known.insert(name.clone());
                found.push((name, meta, finished, Some(path)));
            } else if let Some(stem) = name.strip_suffix(".out")
                && !known.contains(stem)
            {
                // Output of an attempt the journal no longer lists: left over.
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let gone = {
        let mut attempts = shared.attempts.lock().expect("attempts");
        let mut stale = Vec::new();
        for (exec, meta, finished, old_dir) in found {
            let out = match &old_dir {
                Some(d) => d.join("output"),
                None => root.join(format!("{exec}.out")),
            };
            match (meta, finished) {
                (Some(meta), Some(finished)) => {
                    let spool = if out.exists() {
                        Spool::open(&out)
                    } else {
                        Ok(Spool::lazy(&out))
                    };
                    match spool {
                        Ok(spool) => {
                            attempts.insert(
                                (meta.job_id, meta.attempt),
                                LocalAttempt {
                                    exec,
                                    runner: meta.runner,
                                    old_dir,
                                    spool: Arc::new(Mutex::new(spool)),
                                    segments: Arc::new(Mutex::new(vec![(0, 0, 0)])),
                                    acked: 0,
                                    sent: 0,
                                    finished: Some(finished),
                                    complete_sent: None,
                                    canceller: None,
                                    cancel_requested: false,
                                    interrupted: false,
                                    aborted: false,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::error!(error = %e, path = %out.display(), "reading a spool");
                            stale.push((exec, Some(meta), old_dir, out));
                        }
                    }
                }
                (meta, _) => stale.push((exec, meta, old_dir, out)),
            }
        }
        // What died with the earlier run: stopped, and its files removed.
        let mut gone = Vec::new();
        for (exec, meta, old_dir, out) in stale {
            match old_dir {
                Some(d) => {
                    let _ = std::fs::remove_dir_all(d);
                }
                None => {
                    let _ = std::fs::remove_file(out);
                }
            }
            gone.push((exec, meta));
        }
        // The journal anew: the held attempts only.
        {
            let mut records = Vec::new();
            for a in attempts.values() {
                if a.old_dir.is_some() {
                    continue;
                }
                if let Some(r) = a.start_record() {
                    records.push(r);
                }
                if let Some(f) = &a.finished {
                    records.push(Record::Done {
                        exec: a.exec.clone(),
                        finished: f.clone(),
                    });
                }
            }
            if let Err(e) = shared.journal.lock().expect("journal").rewrite(&records) {
                tracing::error!(error = %e, "rewriting the attempts journal");
            }
        }
        gone
    };
    for (exec, meta) in gone {
        if let Some(meta) = meta
            && let Some((_, r)) = shared
                .options
                .runners
                .iter()
                .find(|(n, _)| *n == meta.runner)
            && let Err(e) = r.abandon(&JobId::from(exec)).await
        {
            tracing::warn!(error = %Chain(&e), "stopping what is left of an attempt of an earlier run");
        }
    }
}

/// Kills every running attempt once the lease has not been renewed for the self-fence
/// time: by then the control plane may give them to another runner.
async fn fence_watch(shared: Arc<Shared>) {
    loop {
        let fence = *shared.self_fence.lock().expect("fence");
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep((fence / 20).max(Duration::from_millis(10))) => {}
        }
        let renewed = *shared.renewed.lock().expect("renewed");
        if !lease::must_fence(renewed, fence, Instant::now()) {
            continue;
        }
        let mut attempts = shared.attempts.lock().expect("attempts");
        for (k, a) in attempts.iter_mut() {
            if a.finished.is_none() && !a.interrupted {
                a.interrupted = true;
                tracing::warn!(job_id = %k.0, attempt = k.1, "no lease renewal for the self-fence time: stopping the attempt");
                if let Some(c) = &a.canceller {
                    c.cancel();
                }
            }
        }
    }
}

/// Checks the local runners' health every 10 s; heartbeats carry what is wrong.
async fn health_watch(shared: Arc<Shared>) {
    loop {
        for (name, r) in &shared.options.runners {
            let (why, full) = match tokio::time::timeout(Duration::from_secs(5), r.health()).await {
                Ok(rustci_runners::Health::Full(why)) => (None, Some(why)),
                Ok(h) if h.is_usable() => (None, None),
                Ok(h) => (Some(h.to_string()), None),
                Err(_) => (Some("no health answer within 5 s".to_string()), None),
            };
            let mut unhealthy = shared.unhealthy.lock().expect("health");
            match why {
                Some(w) => unhealthy.insert(name.clone(), w),
                None => unhealthy.remove(name),
            };
            drop(unhealthy);
            let mut full_now = shared.full.lock().expect("health");
            match full {
                Some(w) => full_now.insert(name.clone(), w),
                None => full_now.remove(name),
            };
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

async fn send(shared: &Shared, m: proto::AgentMessage) {
    let tx = shared.session_tx.lock().expect("tx").clone();
    if let Some(tx) = tx {
        let _ = tx.send(m).await;
    }
}

fn heartbeat(shared: &Shared, seq: u64) -> proto::AgentMessage {
    let attempts = shared.attempts.lock().expect("attempts");
    let mut free = HashMap::new();
    for (name, r) in &shared.options.runners {
        let max = r.capabilities().max_concurrency.unwrap_or(usize::MAX);
        free.insert(
            name.clone(),
            max.saturating_sub(r.running()).min(u32::MAX as usize) as u32,
        );
    }
    proto::AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {
            seq,
            free,
            unhealthy: shared.unhealthy.lock().expect("health").clone(),
            full: shared.full.lock().expect("health").clone(),
            running: attempts
                .keys()
                .map(|k| proto::AttemptRef {
                    job_id: k.0.clone(),
                    attempt: k.1,
                })
                .collect(),
            draining: shared.draining.load(std::sync::atomic::Ordering::SeqCst),
        })),
    }
}

async fn session_loop(shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let pause = match run_session(&shared).await {
            Ok(retry_after) => {
                failures = 0;
                retry_after + jitter(shared.options.backoff_base)
            }
            Err(e) => {
                tracing::warn!(error = %e, "session to the control plane failed");
                failures = failures.saturating_add(1);
                let window = shared
                    .options
                    .backoff_base
                    .saturating_mul(2u32.saturating_pow(failures.min(16)))
                    .min(shared.options.backoff_max);
                jitter(window)
            }
        };
        *shared.session_tx.lock().expect("tx") = None;
        shared.connected.send_replace(false);
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn client(shared: &Shared) -> Result<ValkyrieClient<Channel>, String> {
    let dir = &shared.options.data_dir;
    let cert = std::fs::read_to_string(dir.join("agent.pem"))
        .map_err(|e| format!("reading agent.pem: {e}"))?;
    let key = std::fs::read_to_string(dir.join("agent.key"))
        .map_err(|e| format!("reading agent.key: {e}"))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&shared.ca_pem))
        .identity(Identity::from_pem(cert, key))
        .domain_name(SERVER_NAME);
    let channel = endpoint(&shared.options)?
        .tls_config(tls)
        .map_err(|e| format!("TLS: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {}: {}", shared.options.server, Chain(&e)))?;
    Ok(ValkyrieClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Renews the client certificate when a third of its validity is left.
async fn renew_if_due(shared: &Shared, client: &mut ValkyrieClient<Channel>) {
    let dir = &shared.options.data_dir;
    let Ok(cert) = std::fs::read_to_string(dir.join("agent.pem")) else {
        return;
    };
    let Ok(der) = pki::first_cert_der(&cert) else {
        return;
    };
    let Ok(until) = pki::not_after(&der) else {
        return;
    };
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    // Certificates are issued for a day by default: renewed with a third of it left.
    if left > Duration::from_secs(8 * 3600) {
        return;
    }
    let Ok(key) = std::fs::read_to_string(dir.join("agent.key")) else {
        return;
    };
    let Ok(csr) = pki::csr_for(&key, &shared.identity.name) else {
        return;
    };
    match client.renew(proto::RenewRequest { csr_pem: csr }).await {
        Ok(r) => {
            if let Err(e) = write_private(&dir.join("agent.pem"), &r.into_inner().certificate_pem) {
                tracing::error!(error = %e, "storing the renewed certificate");
            } else {
                tracing::info!("renewed the agent's certificate");
            }
        }
        Err(s) => tracing::warn!(error = %s.message(), "renewing the agent's certificate"),
    }
}

/// One session: hello, welcome and verdicts, then offers, heartbeats and output until
/// it ends. Returns how long the control plane asked to wait before reconnecting.
async fn run_session(shared: &Arc<Shared>) -> Result<Duration, String> {
    let mut client = client(shared).await?;
    renew_if_due(shared, &mut client).await;
    let (tx, rx) = mpsc::channel::<proto::AgentMessage>(256);
    let held: Vec<proto::HeldAttempt> = {
        let attempts = shared.attempts.lock().expect("attempts");
        // What is not held now is not listed in the hello, which says the same.
        shared.released.lock().expect("released").clear();
        attempts
            .iter()
            .map(|(k, a)| proto::HeldAttempt {
                attempt: Some(proto::AttemptRef {
                    job_id: k.0.clone(),
                    attempt: k.1,
                }),
                spooled: a.spool.lock().expect("spool").len(),
                finished: a.finished.is_some(),
            })
            .collect()
    };
    let runners = shared
        .options
        .runners
        .iter()
        .map(|(name, r)| proto::LocalRunner {
            name: name.clone(),
            kind: r.info().kind.as_str().to_string(),
            labels: r.info().labels.iter().cloned().collect(),
            slots: r
                .capabilities()
                .max_concurrency
                .unwrap_or(0)
                .min(u32::MAX as usize) as u32,
            capabilities_json: serde_json::to_string(r.capabilities()).expect("serializable"),
        })
        .collect();
    let hello_sent = Instant::now();
    tx.send(proto::AgentMessage {
        kind: Some(agent_message::Kind::Hello(proto::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: shared.boot_id.clone(),
            hostname: host_name(),
            runners,
            held,
            draining: shared.draining.load(std::sync::atomic::Ordering::SeqCst),
        })),
    })
    .await
    .map_err(|_| "session channel closed".to_string())?;
    let outbound = futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client
        .session(outbound)
        .await
        .map_err(|s| format!("session refused: {}", s.message()))?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .map_err(|_| "no welcome within 10 s".to_string())?
        .map_err(|s| format!("session refused: {}", s.message()))?
        .ok_or("the control plane closed the session before its welcome")?;
    let welcome = match first.kind {
        Some(server_message::Kind::Welcome(w)) => w,
        Some(server_message::Kind::Disconnect(d)) => {
            tracing::info!(reason = %d.reason, retry_after_ms = d.retry_after_ms, "the control plane asked to reconnect later");
            return Ok(Duration::from_millis(d.retry_after_ms));
        }
        _ => return Err("the first message of the control plane was not a welcome".into()),
    };
    let heartbeat_every = Duration::from_millis(welcome.heartbeat_interval_ms.max(10));
    *shared.self_fence.lock().expect("fence") = Duration::from_millis(welcome.self_fence_ms);
    *shared.renewed.lock().expect("renewed") = Some(hello_sent);
    apply_verdicts(shared, &welcome.verdicts);
    *shared.session_tx.lock().expect("tx") = Some(tx.clone());
    shared.connected.send_replace(true);
    tracing::info!(session = %welcome.session_id, heartbeat_ms = welcome.heartbeat_interval_ms, self_fence_ms = welcome.self_fence_ms, "session to the control plane started");

    // Output on its own stream.
    let (chunk_tx, chunk_rx) = mpsc::channel::<proto::OutputChunk>(16);
    let chunks = futures::stream::unfold(chunk_rx, |mut rx| async {
        rx.recv().await.map(|m| (m, rx))
    });
    let mut acks = client
        .output(chunks)
        .await
        .map_err(|s| format!("output stream refused: {}", s.message()))?
        .into_inner();
    let session_end = CancellationToken::new();
    let pump = tokio::spawn(output_pump(shared.clone(), chunk_tx, session_end.clone()));

    // The certificate is renewed while the session lasts, not only when one starts: an
    // agent whose certificate expired could not connect again.
    let mut renew_check = Instant::now() + Duration::from_secs(60);
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(heartbeat_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break Ok(Duration::ZERO),
            _ = tick.tick() => {
                // A session that gets no acknowledgement for the self-fence time is not
                // working (a connection that died silently): end it and connect anew.
                let fence = *shared.self_fence.lock().expect("fence");
                if lease::must_fence(*shared.renewed.lock().expect("renewed"), fence, Instant::now()) {
                    break Err(format!("no heartbeat acknowledged for {fence:?}"));
                }
                seq += 1;
                sent_at.insert(seq, Instant::now());
                sent_at.retain(|s, _| *s + 64 > seq);
                if tx.send(heartbeat(shared, seq)).await.is_err() {
                    break Err("session channel closed".to_string());
                }
                if Instant::now() >= renew_check {
                    renew_check = Instant::now() + Duration::from_secs(60);
                    let (shared, mut client) = (shared.clone(), client.clone());
                    tokio::spawn(async move { renew_if_due(&shared, &mut client).await });
                }
                send_completions(shared, &tx, heartbeat_every).await;
            }
            _ = shared.complete_ready.notified() => {
                send_completions(shared, &tx, heartbeat_every).await;
            }
            ack = acks.next() => match ack {
                Some(Ok(ack)) => {
                    on_ack(shared, ack);
                    send_completions(shared, &tx, heartbeat_every).await;
                }
                Some(Err(s)) => break Err(format!("output stream: {}", s.message())),
                None => break Err("the control plane closed the output stream".into()),
            },
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    match m.kind {
                        Some(server_message::Kind::HeartbeatAck(a)) => {
                            if let Some(at) = sent_at.remove(&a.seq) {
                                let mut r = shared.renewed.lock().expect("renewed");
                                *r = Some(lease::renewed(*r, at));
                            }
                        }
                        Some(server_message::Kind::Offer(o)) => match hold_offer(shared, o) {
                            Ok(taken) => {
                                let shared = shared.clone();
                                tokio::spawn(async move { run_offer(&shared, taken).await });
                            }
                            Err(Some(reject)) => {
                                let tx = tx.clone();
                                tokio::spawn(async move { tx.send(*reject).await });
                            }
                            Err(None) => {}
                        },
                        Some(server_message::Kind::Cancel(c)) => {
                            if let Some(r) = c.attempt
                                && let Some(a) = shared.attempts.lock().expect("attempts").get_mut(&(r.job_id, r.attempt))
                            {
                                match &a.canceller {
                                    Some(c) => c.cancel(),
                                    None => a.cancel_requested = true,
                                }
                            }
                        }
                        Some(server_message::Kind::Abort(a)) => {
                            if let Some(r) = a.attempt {
                                abort(shared, &(r.job_id, r.attempt), &a.reason);
                            }
                        }
                        Some(server_message::Kind::CompleteAck(c)) => {
                            if let Some(r) = c.attempt {
                                forget(shared, &(r.job_id, r.attempt));
                            }
                        }
                        Some(server_message::Kind::Drain(_)) => {
                            shared.draining.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        Some(server_message::Kind::Disconnect(d)) => {
                            tracing::info!(reason = %d.reason, "the control plane closed the session");
                            break Ok(Duration::from_millis(d.retry_after_ms));
                        }
                        Some(server_message::Kind::Welcome(_)) => {
                            break Err("a second welcome in one session".into());
                        }
                        None => {
                            break Err("a message of a kind this agent does not know".into());
                        }
                    }
                }
                Ok(None) => break Err("the control plane ended the session".into()),
                Err(s) => break Err(format!("session: {}", s.message())),
            },
        }
    };
    session_end.cancel();
    let _ = pump.await;
    *shared.session_tx.lock().expect("tx") = None;
    // What was sent but not acknowledged is sent again in the next session.
    for a in shared.attempts.lock().expect("attempts").values_mut() {
        a.sent = a.acked;
        a.complete_sent = None;
    }
    result
}

fn apply_verdicts(shared: &Arc<Shared>, verdicts: &[proto::HeldVerdict]) {
    for v in verdicts {
        let Some(r) = &v.attempt else { continue };
        let key = (r.job_id.clone(), r.attempt);
        match proto::Verdict::try_from(v.verdict).unwrap_or(proto::Verdict::Abort) {
            proto::Verdict::Continue => {
                if let Some(a) = shared.attempts.lock().expect("attempts").get_mut(&key) {
                    a.acked = v.offset;
                    a.sent = v.offset;
                    a.complete_sent = None;
                }
            }
            proto::Verdict::Done => forget(shared, &key),
            _ => abort(shared, &key, "the control plane gave it up (superseded)"),
        }
    }
    wake(shared);
}

/// Something changed that the output pump, a drain or the completions wait for.
fn wake(shared: &Shared) {
    shared.output_ready.notify_waiters();
    shared.complete_ready.notify_one();
}

/// Stops an attempt the control plane refuses and discards it.
fn abort(shared: &Shared, key: &Key, reason: &str) {
    let mut attempts = shared.attempts.lock().expect("attempts");
    let Some(a) = attempts.get_mut(key) else {
        // Not held (never taken, refused, or stopped already): the control plane may be
        // waiting to hear it does not run here.
        release(shared, key);
        drop(attempts);
        wake(shared);
        return;
    };
    tracing::warn!(job_id = %key.0, attempt = key.1, reason, "attempt aborted");
    a.aborted = true;
    if let Some(c) = &a.canceller {
        c.cancel();
    }
    if a.finished.is_some() {
        let a = attempts.remove(key).expect("present");
        let_go(shared, &attempts, a);
        release(shared, key);
    }
    drop(attempts);
    wake(shared);
}

/// Queues a `Released` for `key`: an aborted attempt no longer runs here. Sent by the
/// session loop (`send_completions`); lost with the session, which is harmless: the next
/// hello does not list the attempt, and that tells the control plane the same.
fn release(shared: &Shared, key: &Key) {
    shared.released.lock().expect("released").push(key.clone());
}

/// Forgets an attempt whose outcome the control plane holds.
fn forget(shared: &Shared, key: &Key) {
    let mut attempts = shared.attempts.lock().expect("attempts");
    if let Some(a) = attempts.remove(key) {
        let_go(shared, &attempts, a);
    }
    drop(attempts);
    wake(shared);
}

fn on_ack(shared: &Shared, ack: proto::OutputAck) {
    let Some(r) = ack.attempt else { return };
    let key = (r.job_id, r.attempt);
    if ack.abort {
        abort(shared, &key, &ack.error);
        return;
    }
    let mut attempts = shared.attempts.lock().expect("attempts");
    let Some(a) = attempts.get_mut(&key) else {
        return;
    };
    if !ack.error.is_empty() {
        // Not stored: everything from the control plane's length on is sent again.
        tracing::debug!(job_id = %key.0, error = %ack.error, "output chunk not stored; resending from the control plane's offset");
        a.acked = a.acked.max(ack.offset);
        a.sent = a.acked;
    } else {
        a.acked = a.acked.max(ack.offset);
        a.sent = a.sent.max(a.acked);
    }
    drop(attempts);
    wake(shared);
}

async fn send_completions(
    shared: &Shared,
    tx: &mpsc::Sender<proto::AgentMessage>,
    every: Duration,
) {
    let due: Vec<proto::AgentMessage> = {
        let mut attempts = shared.attempts.lock().expect("attempts");
        attempts
            .iter_mut()
            .filter_map(|(k, a)| {
                let f = a.finished.as_ref()?;
                if a.aborted || a.acked < f.length {
                    return None;
                }
                if a.complete_sent.is_some_and(|t| t.elapsed() < every * 2) {
                    return None;
                }
                a.complete_sent = Some(Instant::now());
                Some(proto::AgentMessage {
                    kind: Some(agent_message::Kind::Complete(proto::Complete {
                        attempt: Some(proto::AttemptRef {
                            job_id: k.0.clone(),
                            attempt: k.1,
                        }),
                        outcome_json: serde_json::to_string(&f.outcome).expect("serializable"),
                        length: f.length,
                        sha256: f.sha256.clone(),
                        dropped: f.dropped,
                        usage_json: f
                            .usage
                            .as_ref()
                            .map(|u| serde_json::to_string(u).expect("serializable"))
                            .unwrap_or_default(),
                    })),
                })
            })
            .collect()
    };
    let released = std::mem::take(&mut *shared.released.lock().expect("released"));
    let released = released
        .into_iter()
        .map(|(job_id, attempt)| proto::AgentMessage {
            kind: Some(agent_message::Kind::Released(proto::Released {
                attempt: Some(proto::AttemptRef { job_id, attempt }),
            })),
        });
    for m in due.into_iter().chain(released) {
        let _ = tx.send(m).await;
    }
}

/// Sends spooled output the control plane does not have yet, at most 1 MiB in flight
/// per attempt.
async fn output_pump(
    shared: Arc<Shared>,
    tx: mpsc::Sender<proto::OutputChunk>,
    end: CancellationToken,
) {
    const IN_FLIGHT: u64 = 1024 * 1024;
    loop {
        let notified = shared.output_ready.notified();
        let mut work = Vec::new();
        {
            let mut attempts = shared.attempts.lock().expect("attempts");
            for (k, a) in attempts.iter_mut() {
                if a.aborted {
                    continue;
                }
                let spool = a.spool.lock().expect("spool");
                let len = spool.len();
                if a.sent >= len || a.sent.saturating_sub(a.acked) >= IN_FLIGHT {
                    continue;
                }
                let segments = a.segments.lock().expect("segments");
                let (seg_start, step, stream, seg_end) = segment_at(&segments, a.sent, len);
                let _ = seg_start;
                let max = ((seg_end - a.sent) as usize).min(MAX_CHUNK_BYTES);
                match spool.read_at(a.sent, max) {
                    Ok(data) if !data.is_empty() => {
                        let offset = a.sent;
                        a.sent += data.len() as u64;
                        work.push(proto::OutputChunk {
                            attempt: Some(proto::AttemptRef {
                                job_id: k.0.clone(),
                                attempt: k.1,
                            }),
                            offset,
                            data,
                            stream,
                            step,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "reading a spool"),
                }
            }
        }
        let idle = work.is_empty();
        for chunk in work {
            tokio::select! {
                _ = end.cancelled() => return,
                r = tx.send(chunk) => if r.is_err() { return },
            }
        }
        if idle {
            tokio::select! {
                _ = end.cancelled() => return,
                _ = notified => {}
            }
        }
    }
}

/// The segment holding `offset`: (start, step, stream, end).
fn segment_at(segments: &[(u64, u32, u32)], offset: u64, len: u64) -> (u64, u32, u32, u64) {
    let i = segments
        .partition_point(|s| s.0 <= offset)
        .saturating_sub(1);
    let (start, step, stream) = segments.get(i).copied().unwrap_or((0, 0, 0));
    let end = segments.get(i + 1).map_or(len, |s| s.0).min(len);
    (start, step, stream, end.max(offset))
}

/// An offer this agent holds from the moment its session loop read it, before the local
/// runner starts it.
struct Taken {
    key: Key,
    r: proto::AttemptRef,
    job: Job,
    runner: Arc<dyn Runner>,
    exec: JobId,
    spool: Arc<Mutex<Spool>>,
    segments: Arc<Mutex<Vec<(u64, u32, u32)>>>,
}

fn reject_msg(r: &proto::AttemptRef, reason: String, temporary: bool) -> proto::AgentMessage {
    proto::AgentMessage {
        kind: Some(agent_message::Kind::Reject(proto::Reject {
            attempt: Some(r.clone()),
            reason,
            temporary,
        })),
    }
}

/// Takes an offer into the held attempts, or says why not (the reject to send). Called
/// by the session loop itself, so an abort that follows the offer on the session
/// always finds the attempt (and stops it, however far its start has got). An offer
/// without an attempt reference is ignored (`Err(None)`).
fn hold_offer(
    shared: &Arc<Shared>,
    o: proto::Offer,
) -> Result<Taken, Option<Box<proto::AgentMessage>>> {
    let Some(r) = o.attempt.clone() else {
        return Err(None);
    };
    let key = (r.job_id.clone(), r.attempt);
    if shared.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Some(Box::new(reject_msg(
            &r,
            "the agent is draining".into(),
            true,
        ))));
    }
    let Some((_, runner)) = shared.options.runners.iter().find(|(n, _)| *n == o.runner) else {
        return Err(Some(Box::new(reject_msg(
            &r,
            format!("this agent has no runner named {:?}", o.runner),
            false,
        ))));
    };
    let job: Job = match serde_json::from_str(&o.job_json) {
        Ok(j) => j,
        Err(e) => {
            return Err(Some(Box::new(reject_msg(
                &r,
                format!("the job does not decode: {e}"),
                false,
            ))));
        }
    };
    let mut attempts = shared.attempts.lock().expect("attempts");
    if attempts.contains_key(&key) {
        return Err(Some(Box::new(reject_msg(
            &r,
            "this attempt is already held".into(),
            false,
        ))));
    }
    let exec = rustci_control::attempt_id(&JobId::from(key.0.clone()), key.1);
    // Its output file comes with its first byte; the journal records it now.
    let spool = Spool::lazy_with(
        &shared
            .options
            .data_dir
            .join("attempts")
            .join(format!("{exec}.out")),
        &shared.spares,
    );
    // Held from before the local runner starts it (which may take long, an image pull),
    // so a reconnection meanwhile lists it and an abort or cancel is not lost.
    let spool = Arc::new(Mutex::new(spool));
    let segments = Arc::new(Mutex::new(Vec::new()));
    attempts.insert(
        key.clone(),
        LocalAttempt {
            exec: exec.as_str().to_string(),
            runner: o.runner.clone(),
            old_dir: None,
            spool: spool.clone(),
            segments: segments.clone(),
            acked: 0,
            sent: 0,
            finished: None,
            complete_sent: None,
            canceller: None,
            cancel_requested: false,
            interrupted: false,
            aborted: false,
        },
    );
    // Journalled once in the map, so a rewrite of the journal keeps it.
    journal(
        shared,
        &attempts,
        Record::Start {
            exec: exec.as_str().to_string(),
            job_id: key.0.clone(),
            attempt: key.1,
            runner: o.runner.clone(),
        },
    );
    Ok(Taken {
        key,
        r,
        job,
        runner: runner.clone(),
        exec,
        spool,
        segments,
    })
}

/// Starts a held offer on its local runner, accepts it, and follows it to its end.
async fn run_offer(shared: &Arc<Shared>, taken: Taken) {
    let Taken {
        key,
        r,
        job,
        runner,
        exec,
        spool,
        segments,
    } = taken;
    let started = runner
        .start(&job, exec.clone())
        .await
        .map_err(|e| (Chain(&e).to_string(), e.is_temporary()));
    let mut execution = match started {
        Ok(e) => e,
        Err((why, temporary)) => {
            // Refused while still held: an abort that arrives meanwhile finds it and
            // sends no `Released` that could overtake the refusal (the control plane
            // treats a withdrawn offer's refusal as one that never ran).
            send(shared, reject_msg(&r, why, temporary)).await;
            let mut attempts = shared.attempts.lock().expect("attempts");
            if let Some(a) = attempts.remove(&key) {
                let_go(shared, &attempts, a);
            }
            return;
        }
    };
    let stop_now = {
        let mut attempts = shared.attempts.lock().expect("attempts");
        match attempts.get_mut(&key) {
            Some(a) => {
                a.canceller = Some(execution.canceller());
                a.aborted || a.cancel_requested || a.interrupted
            }
            None => true,
        }
    };
    if stop_now {
        execution.cancel();
    }
    // Through the session of now: the one that made the offer may be gone.
    send(
        shared,
        proto::AgentMessage {
            kind: Some(agent_message::Kind::Accept(proto::Accept {
                attempt: Some(r.clone()),
            })),
        },
    )
    .await;
    let cap = shared.options.max_spool_bytes;
    let mut outcome = Outcome::Lost;
    let mut last_segment: Option<(u32, u32)> = None;
    // A step's figures come just before its end, and travel with it.
    let mut step_usage: Option<(usize, rustci_runners::ResourceUsage)> = None;
    let mut job_usage: Option<rustci_runners::ResourceUsage> = None;
    while let Some(event) = execution.next_event().await {
        match event.kind {
            EventKind::Output { step, stream, data } => {
                let stream = match stream {
                    OutputStream::Stdout => 0,
                    _ => 1,
                };
                let step = step as u32;
                let mut s = spool.lock().expect("spool");
                if last_segment != Some((step, stream)) {
                    segments
                        .lock()
                        .expect("segments")
                        .push((s.len(), step, stream));
                    last_segment = Some((step, stream));
                }
                let marker = format!(
                    "\n[rustci] output truncated: the agent's spool holds at most {cap} bytes per attempt\n"
                );
                if let Err(e) = s.append_capped(&data, cap, marker.as_bytes()) {
                    tracing::error!(error = %e, "spooling output");
                }
                drop(s);
                wake(shared);
            }
            EventKind::StepStarted { step, name } => {
                send(
                    shared,
                    proto::AgentMessage {
                        kind: Some(agent_message::Kind::Event(proto::AttemptEvent {
                            attempt: Some(r.clone()),
                            kind: Some(proto::attempt_event::Kind::StepStarted(
                                proto::StepStarted {
                                    step: step as u32,
                                    name,
                                },
                            )),
                        })),
                    },
                )
                .await;
            }
            EventKind::Usage {
                step: Some(step),
                usage,
            } => step_usage = Some((step, usage)),
            EventKind::Usage { step: None, usage } => job_usage = Some(usage),
            EventKind::StepFinished {
                step,
                name,
                status,
                duration,
            } => {
                let usage_json = step_usage
                    .take()
                    .filter(|(s, _)| *s == step)
                    .map(|(_, u)| serde_json::to_string(&u).expect("serializable"))
                    .unwrap_or_default();
                send(
                    shared,
                    proto::AgentMessage {
                        kind: Some(agent_message::Kind::Event(proto::AttemptEvent {
                            attempt: Some(r.clone()),
                            kind: Some(proto::attempt_event::Kind::StepFinished(
                                proto::StepFinished {
                                    step: step as u32,
                                    name,
                                    status_json: serde_json::to_string(&status)
                                        .expect("serializable"),
                                    duration_ms: duration.as_millis() as u64,
                                    usage_json,
                                },
                            )),
                        })),
                    },
                )
                .await;
            }
            EventKind::Finished { outcome: o } => outcome = o,
            _ => {}
        }
    }
    let (length, sha256, dropped) = {
        let s = spool.lock().expect("spool");
        (s.len(), s.sha256(), s.dropped)
    };
    let mut attempts = shared.attempts.lock().expect("attempts");
    let Some(a) = attempts.get_mut(&key) else {
        return;
    };
    if a.interrupted {
        // Stopped by the agent (the lease ran out, a drain's deadline, a stop): the job
        // did not end by itself.
        outcome = Outcome::Lost;
    }
    let finished = Finished {
        outcome,
        length,
        sha256,
        dropped,
        usage: job_usage,
    };
    if a.aborted {
        let a = attempts.remove(&key).expect("present");
        let_go(shared, &attempts, a);
        release(shared, &key);
        drop(attempts);
        wake(shared);
        return;
    }
    let exec = a.exec.clone();
    a.finished = Some(finished.clone());
    a.canceller = None;
    // A record cut off by a crash is skipped: the attempt then counts as unfinished
    // (stopped and given up), as if the crash came a moment sooner.
    journal(shared, &attempts, Record::Done { exec, finished });
    drop(attempts);
    wake(shared);
}
