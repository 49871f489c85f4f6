//! What the Valkyrie tests share: a control plane with its hub on loopback, agents,
//! waiting for job states, and a TCP proxy that can cut the network between an agent and
//! the control plane.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustci_control::{ControlEvent, ControlPlane, JobState};
use rustci_runners::job::RunsOn;
use rustci_runners::{HostConfig, Job, LeastLoaded, LocalRunner, Runner, RunnerKind, Step};
use rustci_runners_valkyrie::pki::Authority;
use rustci_runners_valkyrie::{Admission, AgentOptions, CaSource, Hub, HubOptions, Timings};
use tokio_util::sync::CancellationToken;

/// Tokens that register one agent each; every audit entry kept.
#[derive(Default)]
pub struct Tokens {
    pub unused: Mutex<Vec<String>>,
    pub audit: Mutex<Vec<(String, String, String)>>,
}

impl Admission for Tokens {
    fn admit(&self, token: &str, _: &str) -> Result<Vec<String>, String> {
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

pub struct ControlSide {
    pub plane: ControlPlane,
    pub hub: Hub,
    pub tokens: Arc<Tokens>,
    pub addr: String,
    pub fingerprint: String,
    /// The control plane's state (the hub's is `valkyrie/`).
    pub dir: tempfile::TempDir,
}

pub async fn control_side() -> ControlSide {
    control_side_with(Timings::fast()).await
}

pub async fn control_side_with(timings: Timings) -> ControlSide {
    let dir = tempfile::tempdir().unwrap();
    let (authority, _) = Authority::load_or_create(&dir.path().join("pki")).unwrap();
    let fingerprint = authority.fingerprint();
    let identity = authority.server_identity(&["127.0.0.1".into()]).unwrap();
    let tokens = Arc::new(Tokens::default());
    tokens
        .unused
        .lock()
        .unwrap()
        .extend(["token-1".into(), "token-2".into(), "token-3".into()]);
    let mut options = HubOptions::new(dir.path().join("valkyrie"));
    options.timings = timings;
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
        dir,
    }
}

pub fn native_runner(name: &str) -> Arc<dyn Runner> {
    let mut c = HostConfig::named(name);
    c.max_concurrency = Some(4);
    c.termination_grace = Duration::from_millis(200);
    Arc::new(LocalRunner::new(c).unwrap())
}

pub fn agent_options(cp: &ControlSide, data: &std::path::Path) -> AgentOptions {
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

pub async fn wait_state(plane: &ControlPlane, id: &rustci_runners::JobId, want: JobState) {
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

pub async fn wait_runner_healthy(plane: &ControlPlane) -> String {
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

pub async fn log_of(plane: &ControlPlane, id: &rustci_runners::JobId) -> Vec<u8> {
    let mut f = plane.follow_log(id, 0).expect("log");
    let mut out = Vec::new();
    while let Some(c) = f.next().await {
        out.extend_from_slice(&c.unwrap().data);
    }
    out
}

pub fn remote_job(script: &str) -> Job {
    let mut job = Job::new("remote", vec![Step::run(script)]);
    let mut on = RunsOn::default();
    on.kind = Some(RunnerKind::Valkyrie);
    on.labels = vec!["fast".into(), "from-token".into()];
    job.runs_on = on;
    job
}

/// A TCP proxy in front of the control plane whose link can be cut (every connection
/// through it closed, new ones refused) and healed: a network partition between one
/// agent and the control plane.
pub struct Proxy {
    pub addr: String,
    cut: Arc<AtomicBool>,
    kill: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(Mutex::new(CancellationToken::new()));
        let (c, k) = (cut.clone(), kill.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let token = k.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    }
                });
            }
        });
        Proxy { addr, cut, kill }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut k = self.kill.lock().unwrap();
        k.cancel();
        *k = CancellationToken::new();
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Waits until `f` holds (30 s at most).
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}
