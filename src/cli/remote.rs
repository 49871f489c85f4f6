//! The `rustci` subcommands that talk to a server: `submit`, `jobs …`, `runners … --server`.
//!
//! Exit codes: 0 on success; with `submit --follow` and `jobs logs -f`, the job's own
//! result (0 succeeded, the failed step's exit code, 124 timed out, 130 cancelled, 1
//! otherwise); 2 for an unreadable or invalid job file; 1 when the server refuses or
//! cannot be reached (the envelope's code and message are printed).

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::client::{ApiClient, ApiResponse, Trust};

/// Where the server is, how its certificate is checked and how to authenticate.
#[derive(Clone, Debug)]
pub struct Remote {
    /// Base URL, e.g. `https://127.0.0.1:8080`.
    pub server: String,
    /// API key.
    pub api_key: Option<String>,
    /// What an `https://` server's certificate must verify against.
    pub trust: Trust,
}

/// The trust the CLI's flags ask for: the CA file `ca`, else the pinned `fingerprint`,
/// else the server's CA in `data_dir/pki/ca.pem` when that file exists (the CLI runs
/// beside the server), else the system's CA bundle. An unreadable `ca` or data-directory
/// CA, or a malformed fingerprint, is an error naming it.
pub fn trust(
    ca: Option<&Path>,
    fingerprint: Option<&str>,
    data_dir: &Path,
) -> Result<Trust, String> {
    if let Some(path) = ca {
        return std::fs::read_to_string(path)
            .map(Trust::CaPem)
            .map_err(|e| format!("reading the CA file {}: {e}", path.display()));
    }
    if let Some(f) = fingerprint {
        return rustci_runners_valkyrie::pki::parse_fingerprint(f)
            .map(Trust::Fingerprint)
            .map_err(|e| format!("--ca-fingerprint {f:?}: {e}"));
    }
    let beside = data_dir.join("pki").join("ca.pem");
    match std::fs::read_to_string(&beside) {
        Ok(pem) => Ok(Trust::CaPem(pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Trust::System),
        // There but unreadable: trusting the system's CAs instead would fail later with
        // a less clear error, or trust what was not meant.
        Err(e) => Err(format!("reading the server's CA {}: {e}", beside.display())),
    }
}

fn client(remote: &Remote) -> Result<ApiClient, String> {
    ApiClient::with_trust(&remote.server, remote.api_key.clone(), remote.trust.clone())
}

/// The client, or `None` after printing why there is none.
fn client_or_report(remote: &Remote, err: &mut dyn Write) -> Option<ApiClient> {
    client(remote)
        .map_err(|e| {
            let _ = writeln!(err, "rustci: {e}");
        })
        .ok()
}

fn check(r: ApiResponse, err: &mut dyn Write) -> Option<Value> {
    if (200..300).contains(&r.status) {
        Some(r.json())
    } else {
        let _ = writeln!(err, "rustci: {}", r.error_message());
        None
    }
}

/// The exit code a finished job's record stands for.
pub fn exit_code_of(job: &Value) -> i32 {
    match job["state"].as_str() {
        Some("succeeded") => 0,
        Some("timed_out") => 124,
        Some("cancelled") => 130,
        Some("failed") => job["outcome"]["exit_code"]
            .as_i64()
            .map(|c| c as i32)
            .filter(|c| *c != 0)
            .unwrap_or(1),
        _ => 1,
    }
}

/// `rustci submit FILE`: sends the job; with `follow`, streams its log and exits with
/// its result.
pub async fn submit(
    remote: &Remote,
    file: &Path,
    follow: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(err, "rustci: cannot read {}: {e}", file.display());
            return super::EXIT_INVALID;
        }
    };
    let is_json = file.extension().is_some_and(|e| e == "json");
    let ctype = if is_json {
        "application/json"
    } else {
        "application/yaml"
    };
    let Some(c) = client_or_report(remote, err) else {
        return 1;
    };
    let r = match c
        .request("POST", "/api/jobs", Some((ctype, text.into_bytes())), &[])
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "rustci: {e}");
            return 1;
        }
    };
    let invalid = r.status == 400;
    let Some(v) = check(r, err) else {
        return if invalid { super::EXIT_INVALID } else { 1 };
    };
    let id = v["id"].as_str().unwrap_or_default().to_string();
    if !follow {
        let _ = writeln!(out, "{id}");
        return 0;
    }
    let _ = writeln!(err, "rustci: job {id} queued on {}", remote.server);
    follow_logs(&c, &id, 0, out, err).await
}

async fn follow_logs(
    c: &ApiClient,
    id: &str,
    offset: u64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let mut events = match c
        .events(
            &format!("/api/jobs/{id}/logs?follow=true&offset={offset}"),
            &[],
        )
        .await
    {
        Ok(e) => e,
        Err(e) => {
            let _ = writeln!(err, "rustci: {e}");
            return 1;
        }
    };
    if events.status != 200 {
        let _ = writeln!(err, "rustci: HTTP {} following job {id}", events.status);
        return 1;
    }
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                let _ = writeln!(err, "rustci: {e}");
                return 1;
            }
        };
        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        if let Some(text) = data["text"].as_str() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        if ev.event == "end" {
            break;
        }
    }
    match c.get(&format!("/api/jobs/{id}")).await {
        Ok(r) => match check(r, err) {
            Some(job) => {
                let _ = writeln!(
                    err,
                    "rustci: job {id} {}",
                    job["state"].as_str().unwrap_or("?")
                );
                exit_code_of(&job)
            }
            None => 1,
        },
        Err(e) => {
            let _ = writeln!(err, "rustci: {e}");
            1
        }
    }
}

/// What `rustci jobs` does.
#[derive(Clone, Debug)]
pub enum JobsAction {
    /// List recent jobs, optionally in one state.
    List {
        /// Only this state.
        state: Option<String>,
        /// At most this many.
        limit: usize,
    },
    /// One job's record.
    Show(String),
    /// Cancel a job.
    Cancel(String),
    /// A job's log; `follow` streams it to the end.
    Logs {
        /// Job id.
        id: String,
        /// Follow until the job ends.
        follow: bool,
    },
}

/// `rustci jobs …`.
pub async fn jobs(
    remote: &Remote,
    action: JobsAction,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let Some(c) = client_or_report(remote, err) else {
        return 1;
    };
    let result = match &action {
        JobsAction::List { state, limit } => {
            let mut path = format!("/api/jobs?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            c.get(&path).await
        }
        JobsAction::Show(id) => c.get(&format!("/api/jobs/{id}")).await,
        JobsAction::Cancel(id) => {
            c.request("POST", &format!("/api/jobs/{id}/cancel"), None, &[])
                .await
        }
        JobsAction::Logs { id, follow: true } => {
            return follow_logs(&c, id, 0, out, err).await;
        }
        JobsAction::Logs { id, follow: false } => c.get(&format!("/api/jobs/{id}/logs")).await,
    };
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "rustci: {e}");
            return 1;
        }
    };
    if let JobsAction::Logs { .. } = action {
        if r.status == 200 {
            let _ = out.write_all(&r.body);
            return 0;
        }
        check(r, err);
        return 1;
    }
    let Some(v) = check(r, err) else {
        return 1;
    };
    if json {
        let _ = writeln!(out, "{v}");
        return 0;
    }
    match action {
        JobsAction::List { .. } => {
            let _ = writeln!(
                out,
                "{:<34} {:<24} {:<10} {:<20} RUNNER",
                "ID", "NAME", "STATE", "SUBMITTER"
            );
            for j in v["jobs"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<34} {:<24} {:<10} {:<20} {}",
                    j["id"].as_str().unwrap_or(""),
                    j["name"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    j["submitter"].as_str().unwrap_or(""),
                    j["runner_id"].as_str().unwrap_or("-"),
                );
            }
        }
        JobsAction::Show(_) => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
        }
        JobsAction::Cancel(id) => {
            let _ = writeln!(
                out,
                "job {id}: cancel requested ({})",
                v["state"].as_str().unwrap_or("?")
            );
        }
        JobsAction::Logs { .. } => {}
    }
    0
}

/// What `rustci runners … --server` does.
#[derive(Clone, Debug)]
pub enum RunnersAction {
    /// List runners with status and load.
    List,
    /// One runner.
    Show(String),
    /// Stop giving it jobs.
    Drain(String),
    /// Give it jobs again.
    Resume(String),
}

/// `rustci runners … --server URL`.
pub async fn runners(
    remote: &Remote,
    action: RunnersAction,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let Some(c) = client_or_report(remote, err) else {
        return 1;
    };
    let result = match &action {
        RunnersAction::List => c.get("/api/runners").await,
        RunnersAction::Show(id) => c.get(&format!("/api/runners/{id}")).await,
        RunnersAction::Drain(id) => {
            c.request("POST", &format!("/api/runners/{id}/drain"), None, &[])
                .await
        }
        RunnersAction::Resume(id) => {
            c.request("POST", &format!("/api/runners/{id}/resume"), None, &[])
                .await
        }
    };
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "rustci: {e}");
            return 1;
        }
    };
    let Some(v) = check(r, err) else {
        return 1;
    };
    if json {
        let _ = writeln!(out, "{v}");
        return 0;
    }
    match action {
        RunnersAction::List => {
            let _ = writeln!(
                out,
                "{:<38} {:<16} {:<8} {:<10} {:<7} {:<30} LABELS",
                "ID", "NAME", "KIND", "STATUS", "SLOTS", "AGENT"
            );
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            for r in v["runners"].as_array().into_iter().flatten() {
                let slots = match r["slots"].as_u64() {
                    Some(s) => format!("{}/{s}", r["running"]),
                    None => format!("{}/-", r["running"]),
                };
                let labels: Vec<&str> = r["labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<38} {:<16} {:<8} {:<10} {:<7} {:<30} {}",
                    r["id"].as_str().unwrap_or(""),
                    r["name"].as_str().unwrap_or(""),
                    r["kind"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    slots,
                    agent_cell(&r["agent"], now_ms),
                    labels.join(",")
                );
            }
        }
        RunnersAction::Show(_) => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
        }
        RunnersAction::Drain(id) | RunnersAction::Resume(id) => {
            let _ = writeln!(out, "runner {id}: {}", v["status"].as_str().unwrap_or("?"));
        }
    }
    0
}

/// `host status, heartbeat Ns ago` of a runner's agent; `-` for a runner of the server.
fn agent_cell(agent: &Value, now_ms: u64) -> String {
    if agent.is_null() {
        return "-".into();
    }
    let host = agent["hostname"].as_str().unwrap_or("?");
    let status = agent["status"].as_str().unwrap_or("?");
    match agent["last_heartbeat_ms"].as_u64() {
        Some(at) => format!("{host} {status} {}s ago", now_ms.saturating_sub(at) / 1000),
        None => format!("{host} {status}"),
    }
}

/// `rustci ca fetch`: connects to the `https://` server `server`, checks that its chain
/// holds the CA with `fingerprint` and that the server's certificate verifies against it
/// for the URL's host, and writes that CA (PEM) to `output` (stdout when `None`). What a
/// tool that takes only a CA file (curl, `manage-runners.sh`) needs first. Exit code 0,
/// or 1 with the cause on `err`.
pub async fn fetch_ca(
    server: &str,
    fingerprint: &str,
    output: Option<&Path>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let result = async {
        let pin = rustci_runners_valkyrie::pki::parse_fingerprint(fingerprint)
            .map_err(|e| format!("--ca-fingerprint {fingerprint:?}: {e}"))?;
        let authority = server
            .strip_prefix("https://")
            .ok_or_else(|| format!("server URL {server:?}: expected https://HOST:PORT"))?
            .split('/')
            .next()
            .unwrap_or_default();
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            _ => authority,
        };
        let addr = if host.len() == authority.len() {
            format!("{authority}:443")
        } else {
            authority.to_string()
        };
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let pem = rustci_runners_valkyrie::pki::fetch_pinned_ca_named(&addr, name, pin).await?;
        match output {
            Some(path) => {
                std::fs::write(path, &pem).map_err(|e| format!("writing {}: {e}", path.display()))
            }
            None => out
                .write_all(pem.as_bytes())
                .map_err(|e| format!("writing the CA: {e}")),
        }
    }
    .await;
    match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "rustci: {e}");
            1
        }
    }
}
