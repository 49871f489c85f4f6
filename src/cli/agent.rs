//! `rustci agent`: a remote agent of a control plane, running jobs on this host's
//! runners over the Valkyrie protocol.

use std::path::PathBuf;
use std::time::Duration;

use rustci_runners::RunnerSettings;
use rustci_runners_valkyrie::{Agent, AgentOptions, CaSource};

/// What `rustci agent` was asked.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AgentArgs {
    /// The control plane's agent address (`host:port`, `https://` allowed).
    pub server: String,
    /// Registration token (first start only).
    pub token: Option<String>,
    /// The CA's fingerprint, as the server printed it.
    pub ca_fingerprint: Option<String>,
    /// The CA as a PEM file.
    pub ca: Option<PathBuf>,
    /// Local runner kinds to offer (`native`, `local`, `docker`, …).
    pub runners: Vec<String>,
    /// Labels for every runner.
    pub labels: Vec<String>,
    /// Jobs each runner runs at once.
    pub slots: Option<usize>,
    /// Where the agent keeps its identity and spools.
    pub data_dir: PathBuf,
    /// The agent's name (default: the host name).
    pub name: Option<String>,
    /// How long a drain (SIGTERM) lets running jobs go on.
    pub drain_timeout: Duration,
    /// Largest window of the random delay before reconnecting.
    pub backoff_max: Duration,
}

impl AgentArgs {
    /// Arguments with defaults: a native runner, data in `./rustci-agent`, a 10 minute
    /// drain.
    pub fn new(server: impl Into<String>) -> Self {
        AgentArgs {
            server: server.into(),
            token: None,
            ca_fingerprint: None,
            ca: None,
            runners: vec!["native".into()],
            labels: Vec::new(),
            slots: None,
            data_dir: PathBuf::from("rustci-agent"),
            name: None,
            drain_timeout: Duration::from_secs(600),
            backoff_max: Duration::from_secs(64),
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT (drain: running jobs finish, up to the drain
/// timeout; a second SIGINT stops at once). Returns the exit code.
pub async fn run(args: AgentArgs, err: &mut dyn std::io::Write) -> i32 {
    let backends = crate::backends();
    let mut runners = Vec::new();
    for kind in &args.runners {
        let mut settings = RunnerSettings::named(format!("agent-{kind}"));
        settings.slots = args.slots;
        match backends
            .build(kind, &settings, &serde_json::Value::Null)
            .await
        {
            Ok(r) => runners.push((kind.clone(), r)),
            Err(e) => {
                let _ = writeln!(
                    err,
                    "rustci agent: runner {kind}: {}",
                    rustci_runners::error::Chain(&e)
                );
                return 2;
            }
        }
    }
    let mut options = AgentOptions::new(args.server.clone(), args.data_dir.clone());
    options.token = args.token.clone();
    options.ca = match (&args.ca_fingerprint, &args.ca) {
        (Some(fp), _) => Some(CaSource::Fingerprint(fp.clone())),
        (None, Some(f)) => Some(CaSource::File(f.clone())),
        (None, None) => None,
    };
    options.name = args.name.clone();
    options.labels = args.labels.clone();
    options.runners = runners;
    options.backoff_max = args.backoff_max;
    options.backoff_base = options.backoff_base.min(args.backoff_max);
    let agent = match Agent::start(options).await {
        Ok(a) => a,
        Err(e) => {
            let _ = writeln!(err, "rustci agent: {e}");
            return 1;
        }
    };
    let _ = writeln!(
        err,
        "rustci agent: agent {} (boot {})",
        agent.id(),
        agent.boot_id()
    );
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = writeln!(err, "rustci agent: cannot install signal handlers");
        agent.stop().await;
        return 1;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = writeln!(
        err,
        "rustci agent: draining (running jobs get {:?}; SIGINT again stops at once)",
        args.drain_timeout
    );
    tokio::select! {
        _ = agent.drain(args.drain_timeout) => {}
        _ = int.recv() => {
            let _ = writeln!(err, "rustci agent: stopping at once");
        }
    }
    agent.stop().await;
    0
}
