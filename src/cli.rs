//! What the `rustci` command does, as library calls: run a job file with live output,
//! validate job files, list the runners usable on this host.
//!
//! Exit codes of [`run_file`]: the job's own exit code (0 on success), 128 + signal when a
//! step was killed, 124 on timeout, 130 when cancelled (Ctrl-C or SIGTERM), 2 when the file
//! is invalid, 1 when no runner could run it.

pub mod agent;
pub mod remote;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustci_runners::error::Chain;
use rustci_runners::select::{LeastLoaded, RunnerSnapshot, Selector};
use rustci_runners::{
    Error, EventKind, HostConfig, Job, JobId, LocalRunner, NativeConfig, NativeRunner, Outcome,
    OutputStream, ResourceUsage, Runner, RunnerKind, StepStatus,
};

/// Exit code for an invalid job file.
pub const EXIT_INVALID: i32 = 2;
/// Exit code when no runner could run the job.
pub const EXIT_RUNNER: i32 = 1;

/// Which runner `run` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnerChoice {
    /// The selector picks among every runner usable here.
    Auto,
    /// Only runners of this kind.
    Kind(RunnerKind),
}

impl std::str::FromStr for RunnerChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            Ok(RunnerChoice::Auto)
        } else {
            s.parse().map(RunnerChoice::Kind)
        }
    }
}

/// The runners compiled in and constructible on this host, with the reason for each one
/// that is not.
pub async fn host_runners() -> (Vec<Arc<dyn Runner>>, Vec<String>) {
    let mut runners: Vec<Arc<dyn Runner>> = Vec::new();
    let mut problems = Vec::new();
    match LocalRunner::new(HostConfig::named("local")) {
        Ok(r) => runners.push(Arc::new(r)),
        Err(e) => problems.push(Chain(&e).to_string()),
    }
    match NativeRunner::new(NativeConfig::default()) {
        Ok(r) => runners.push(Arc::new(r)),
        Err(e) => problems.push(Chain(&e).to_string()),
    }
    #[cfg(feature = "docker")]
    match rustci_runners_docker::DockerRunner::connect(
        rustci_runners_docker::DockerConfig::default(),
    )
    .await
    {
        Ok(r) => runners.push(Arc::new(r)),
        Err(e) => problems.push(Chain(&e).to_string()),
    }
    #[cfg(feature = "k8s")]
    {
        let home_config = std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".kube/config").exists())
            .unwrap_or(false);
        let configured = std::env::var_os("KUBECONFIG").is_some()
            || home_config
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        if configured {
            let config = rustci_runners_k8s::KubernetesConfig::from_env();
            let connect = rustci_runners_k8s::KubernetesRunner::connect(config);
            match tokio::time::timeout(std::time::Duration::from_secs(15), connect).await {
                Ok(Ok(r)) => runners.push(Arc::new(r)),
                Ok(Err(e)) => problems.push(Chain(&e).to_string()),
                Err(_) => {
                    problems.push("runner kubernetes: the cluster gave no answer within 15s".into())
                }
            }
        } else {
            problems.push(
                "runner kubernetes: no kubeconfig ($KUBECONFIG or ~/.kube/config) and not in a cluster"
                    .into(),
            );
        }
    }
    (runners, problems)
}

/// Prints every problem of a job file to `err`; returns 0 when valid, else 2.
pub fn validate_file(path: &Path, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match Job::from_path(path) {
        Ok(job) => {
            let _ = writeln!(
                out,
                "{}: valid job {:?} with {} steps",
                path.display(),
                job.name,
                job.steps.len()
            );
            0
        }
        Err(Error::InvalidSpec(errors)) => {
            for e in errors.errors() {
                let at = e
                    .position
                    .map(|(l, c)| format!("{l}:{c}:"))
                    .unwrap_or_default();
                let field = if e.path.is_empty() {
                    String::new()
                } else {
                    format!(" {}:", e.path)
                };
                let _ = writeln!(err, "{}:{at}{field} {}", path.display(), e.message);
            }
            let _ = writeln!(err, "{}: {} problem(s)", path.display(), errors.len());
            EXIT_INVALID
        }
        Err(e) => {
            let _ = writeln!(err, "rustci: {}", Chain(&e));
            EXIT_INVALID
        }
    }
}

/// Lists the runners usable on this host with capabilities and health.
pub async fn list_runners(json: bool, out: &mut dyn Write) -> i32 {
    let (runners, problems) = host_runners().await;
    for runner in &runners {
        let info = runner.info();
        let caps = runner.capabilities();
        let health = runner.health().await;
        if json {
            let line = serde_json::json!({
                "info": info, "capabilities": caps, "health": health,
            });
            let _ = writeln!(out, "{line}");
        } else {
            let steps: Vec<&str> = [(caps.run_steps, "run"), (caps.command_steps, "command")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
            let limits: Vec<&str> = caps.limits.iter().map(|l| l.as_str()).collect();
            let _ = writeln!(
                out,
                "{:<8} {:<9} {}\n         steps: {}; isolation: {:?}; limits: {}; platform: {}; labels: {}",
                info.name,
                info.kind.as_str(),
                health,
                steps.join(", "),
                caps.isolation,
                if limits.is_empty() {
                    "none".to_string()
                } else {
                    limits.join(", ")
                },
                caps.platform,
                info.labels.iter().cloned().collect::<Vec<_>>().join(", "),
            );
        }
    }
    for p in problems {
        let _ = writeln!(out, "unavailable: {p}");
    }
    0
}

/// Picks the runner for `job`: the selector over the runners of the chosen kind (or all).
pub async fn choose_runner(
    job: &Job,
    choice: RunnerChoice,
    runners: &[Arc<dyn Runner>],
) -> Result<Arc<dyn Runner>, String> {
    let candidates: Vec<&Arc<dyn Runner>> = runners
        .iter()
        .filter(|r| match choice {
            RunnerChoice::Auto => true,
            RunnerChoice::Kind(k) => r.info().kind == k,
        })
        .collect();
    if candidates.is_empty() {
        return Err(match choice {
            RunnerChoice::Kind(k) => {
                format!("no {k} runner is available in this build or on this host")
            }
            RunnerChoice::Auto => "no runner is available on this host".to_string(),
        });
    }
    let mut snapshots = Vec::new();
    for r in &candidates {
        snapshots.push(RunnerSnapshot::new(
            r.info().clone(),
            r.capabilities().clone(),
            r.health().await,
            r.running(),
        ));
    }
    let index = LeastLoaded
        .select(job, &snapshots)
        .map_err(|e| e.to_string())?;
    Ok(candidates[index].clone())
}

/// How [`run_file`] shows a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunOutput {
    /// The job's output as it arrives (stdout to `out`, stderr to `err`), each step's start
    /// and end as a header line on `err`, and the final status line on `err`.
    #[default]
    Sections,
    /// The job's own output and the final status line only (`--quiet`).
    Quiet,
    /// One JSON event per line on `out` and the final status line on `err` (`--json`).
    Json,
}

/// A step's header line: `── step 2/3 "build"` when it starts, with what it ended in
/// and used (`── step 2/3 "build": exited 0 in 1.20s (cpu 0.93s, …)`) when it ends.
fn step_header(
    step: usize,
    of: usize,
    name: &str,
    end: Option<(&StepStatus, Duration, Option<&ResourceUsage>)>,
) -> String {
    let head = format!("── step {}/{of} {name:?}", step + 1);
    match end {
        None => head,
        Some((status, took, usage)) => {
            let status = match status {
                StepStatus::Exited(c) => format!("exited {c}"),
                StepStatus::Signalled(s) => format!("killed by signal {s}"),
                StepStatus::TimedOut => "timed out".to_string(),
                StepStatus::Cancelled => "cancelled".to_string(),
                StepStatus::NotStarted => "not started".to_string(),
                other => format!("{other:?}"),
            };
            let used = usage.map(ResourceUsage::summary).unwrap_or_default();
            if used.is_empty() {
                format!("{head}: {status} in {:.2}s", took.as_secs_f64())
            } else {
                format!("{head}: {status} in {:.2}s ({used})", took.as_secs_f64())
            }
        }
    }
}

/// Runs a job file and streams its output; returns the process exit code.
///
/// What is shown is `output`'s ([`RunOutput`]); the status line goes to `err` at the end
/// in every mode. Ctrl-C and SIGTERM cancel the job (its processes are stopped) and give
/// exit code 130.
pub async fn run_file(
    path: &Path,
    choice: RunnerChoice,
    output: RunOutput,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let json = output == RunOutput::Json;
    let sections = output == RunOutput::Sections;
    let job = match Job::from_path(path) {
        Ok(job) => job,
        Err(_) => return validate_file(path, &mut std::io::sink(), err),
    };
    let (runners, problems) = host_runners().await;
    let runner = match choose_runner(&job, choice, &runners).await {
        Ok(r) => r,
        Err(reason) => {
            let _ = writeln!(err, "rustci: cannot run {}: {reason}", job.name);
            for p in problems {
                let _ = writeln!(err, "rustci: unavailable: {p}");
            }
            return EXIT_RUNNER;
        }
    };
    let started = Instant::now();
    let mut execution = match runner.start(&job, JobId::new()).await {
        Ok(e) => e,
        Err(e) => {
            let _ = writeln!(err, "rustci: {}", Chain(&e));
            return if matches!(e, Error::InvalidSpec(_)) {
                EXIT_INVALID
            } else {
                EXIT_RUNNER
            };
        }
    };
    let canceller = execution.canceller();
    let signals = tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        canceller.cancel();
    });
    let mut outcome = Outcome::Lost;
    // The last output shown did not end its line.
    let mut mid_line = false;
    let mut step_usage: Option<(usize, ResourceUsage)> = None;
    let mut job_usage: Option<ResourceUsage> = None;
    while let Some(event) = execution.next_event().await {
        if json && let Ok(line) = serde_json::to_string(&event) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        match event.kind {
            EventKind::Output { stream, data, .. } if !json => {
                let w: &mut dyn Write = match stream {
                    OutputStream::Stdout => out,
                    OutputStream::Stderr => err,
                };
                let _ = w.write_all(&data);
                let _ = w.flush();
                if let Some(last) = data.last() {
                    mid_line = *last != b'\n';
                }
            }
            EventKind::StepStarted { step, name } if sections => {
                let _ = writeln!(err, "{}", step_header(step, job.steps.len(), &name, None));
                mid_line = false;
                let _ = err.flush();
            }
            EventKind::StepFinished {
                step,
                name,
                status,
                duration,
            } if sections => {
                // A header starts a line of its own, after output that did not end one.
                let _ = writeln!(
                    err,
                    "{}{}",
                    if mid_line { "\n" } else { "" },
                    step_header(
                        step,
                        job.steps.len(),
                        &name,
                        Some((
                            &status,
                            duration,
                            step_usage
                                .as_ref()
                                .filter(|(s, _)| *s == step)
                                .map(|(_, u)| u)
                        ))
                    )
                );
                mid_line = false;
                let _ = err.flush();
            }
            EventKind::OutputTruncated { limit, .. } if !json => {
                let _ = writeln!(err, "\n[rustci: output truncated after {limit} bytes]");
            }
            EventKind::LeftoverProcesses { step, count } if !json => {
                let _ = writeln!(
                    err,
                    "[rustci: step {} left {count} process(es) running; they were killed]",
                    step + 1
                );
            }
            EventKind::Usage {
                step: Some(step),
                usage,
            } => step_usage = Some((step, usage)),
            EventKind::Usage { step: None, usage } => job_usage = Some(usage),
            EventKind::Finished { outcome: o } => outcome = o,
            _ => {}
        }
    }
    signals.abort();
    let used = job_usage
        .map(|u| u.summary())
        .filter(|u| !u.is_empty())
        .map(|u| format!(" ({u})"))
        .unwrap_or_default();
    let _ = writeln!(
        err,
        "rustci: job {} {} in {:.2}s on {} runner {}{used}",
        job.name,
        outcome,
        started.elapsed().as_secs_f64(),
        runner.info().kind,
        runner.info().name
    );
    outcome.exit_code()
}
