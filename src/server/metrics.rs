//! Prometheus metrics of the control plane and the HTTP API.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustci_control::{ControlPlane, JobState, Observer, RunnerStatus, StatusChange};
use rustci_runners::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    state: String,
    runner_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    runner_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunnerLabels {
    runner: String,
    name: String,
    runner_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
    name: String,
    hostname: String,
    version: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    jobs_finished: Family<OutcomeLabels, Counter>,
    job_duration: Family<KindLabels, Histogram>,
    queue_wait: Family<KindLabels, Histogram>,
    job_cpu: Family<KindLabels, Histogram>,
    job_peak_memory: Family<KindLabels, Histogram>,
    attempts: Family<OutcomeLabels, Counter>,
    selection: Histogram,
    jobs_queued: Gauge,
    jobs_running: Gauge,
    runner_healthy: Family<RunnerLabels, Gauge>,
    runner_slots_used: Family<RunnerLabels, Gauge>,
    runner_slots: Family<RunnerLabels, Gauge>,
    runner_transitions: Family<StatusLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
    agents: Family<StatusLabels, Gauge>,
    agent_heartbeat: Family<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    log_stored: Family<StateLabels, Gauge>,
    logs: Family<StateLabels, Gauge>,
    retention_deleted: Family<WhatLabels, Counter>,
    log_pruned_bytes: Counter,
    logs_compressed: Counter,
    log_compression_saved: Counter,
    retention_batch: Gauge<f64, std::sync::atomic::AtomicU64>,
    timeline: super::timeline::Timeline,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabels {
    what: String,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to ~9 h.
    Histogram::new(exponential_buckets(0.001, 3.0, 16))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics, registered under the `rustci` prefix.
    pub fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("rustci")),
            jobs_finished: Family::default(),
            job_duration: Family::new_with_constructor(seconds_histogram),
            queue_wait: Family::new_with_constructor(seconds_histogram),
            job_cpu: Family::new_with_constructor(seconds_histogram),
            // 1 MiB to 64 GiB.
            job_peak_memory: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1048576.0, 2.0, 17))
            }),
            attempts: Family::default(),
            selection: Histogram::new(exponential_buckets(0.000_001, 4.0, 12)),
            jobs_queued: Gauge::default(),
            jobs_running: Gauge::default(),
            runner_healthy: Family::default(),
            runner_slots_used: Family::default(),
            runner_slots: Family::default(),
            runner_transitions: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(seconds_histogram),
            agents: Family::default(),
            agent_heartbeat: Family::default(),
            log_stored: Family::default(),
            logs: Family::default(),
            retention_deleted: Family::default(),
            log_pruned_bytes: Counter::default(),
            logs_compressed: Counter::default(),
            log_compression_saved: Counter::default(),
            retention_batch: Gauge::default(),
            timeline: Default::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics");
            r.register(
                "jobs_finished",
                "Jobs that reached a terminal state, by state and runner kind",
                m.jobs_finished.clone(),
            );
            r.register(
                "job_duration_seconds",
                "Time from submission to terminal state",
                m.job_duration.clone(),
            );
            r.register(
                "job_cpu_seconds",
                "CPU time (user and system) of each attempt that reported it, by runner kind",
                m.job_cpu.clone(),
            );
            r.register(
                "job_peak_memory_bytes",
                "Peak memory of each attempt that reported it, by runner kind",
                m.job_peak_memory.clone(),
            );
            r.register(
                "queue_wait_seconds",
                "Time a job waited in the queue before a runner picked it up",
                m.queue_wait.clone(),
            );
            r.register(
                "attempts",
                "Attempts that ended, by outcome and runner kind",
                m.attempts.clone(),
            );
            r.register(
                "selection_seconds",
                "Time one runner-selection decision took",
                m.selection.clone(),
            );
            r.register(
                "jobs_queued",
                "Jobs waiting for a runner",
                m.jobs_queued.clone(),
            );
            r.register(
                "jobs_running",
                "Jobs assigned to a runner or running",
                m.jobs_running.clone(),
            );
            r.register(
                "runner_healthy",
                "1 when the runner takes jobs (healthy or degraded), else 0",
                m.runner_healthy.clone(),
            );
            r.register(
                "runner_slots_used",
                "Jobs running on the runner",
                m.runner_slots_used.clone(),
            );
            r.register(
                "runner_slots",
                "Jobs the runner may run at once (0 when unbounded)",
                m.runner_slots.clone(),
            );
            r.register(
                "runner_status_changes",
                "Runner status transitions, by the status entered",
                m.runner_transitions.clone(),
            );
            r.register(
                "http_requests",
                "HTTP requests answered, by method, route and status",
                m.http_requests.clone(),
            );
            r.register(
                "http_request_duration_seconds",
                "Time to answer an HTTP request",
                m.http_duration.clone(),
            );
            r.register(
                "agents",
                "Remote agents, by status (healthy, draining, disconnected, lost)",
                m.agents.clone(),
            );
            r.register(
                "agent_last_heartbeat_timestamp_seconds",
                "When each remote agent's last heartbeat arrived (Unix time; 0 before the first), with its host name, version and status",
                m.agent_heartbeat.clone(),
            );
            r.register(
                "log_stored_bytes",
                "Bytes finished jobs' logs take in storage, by retention state (finished: not yet measured, plain, compressed), as of the last retention pass",
                m.log_stored.clone(),
            );
            r.register(
                "logs",
                "Finished jobs' logs by retention state (finished, plain, compressed, expired), as of the last retention pass",
                m.logs.clone(),
            );
            r.register(
                "retention_deleted",
                "What retention deleted: logs (expired, the job kept), jobs (records with their logs), audit (entries)",
                m.retention_deleted.clone(),
            );
            r.register(
                "log_pruned_bytes",
                "Bytes of storage retention gave back by deleting logs (expired or with their job)",
                m.log_pruned_bytes.clone(),
            );
            r.register(
                "logs_compressed",
                "Logs retention compressed",
                m.logs_compressed.clone(),
            );
            r.register(
                "log_compression_saved_bytes",
                "Bytes of storage compression saved (original minus compressed)",
                m.log_compression_saved.clone(),
            );
            r.register(
                "retention_longest_batch_seconds",
                "The longest batch of the last retention pass",
                m.retention_batch.clone(),
            );
        }
        m
    }

    /// Counts an answered HTTP request.
    pub fn http(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                method: method.to_string(),
                route: route.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// The per-minute aggregates of the last hours (see [`super::timeline`]).
    pub fn timeline(&self) -> super::timeline::Snapshot {
        self.timeline.snapshot()
    }

    /// The text exposition, with gauges read from `plane` now.
    pub fn render(&self, plane: &ControlPlane) -> String {
        self.render_with_agents(plane, &[])
    }

    /// [`Metrics::render`] with the remote agents' gauges read from `agents`.
    pub fn render_with_agents(
        &self,
        plane: &ControlPlane,
        agents: &[rustci_runners_valkyrie::AgentView],
    ) -> String {
        // Held from the first gauge cleared to the last line encoded: two scrapes at once
        // would otherwise clear each other's per-runner and per-agent series mid-render.
        let registry = self.registry.lock().expect("metrics");
        self.agents.clear();
        self.agent_heartbeat.clear();
        for status in ["healthy", "draining", "disconnected", "lost"] {
            self.agents
                .get_or_create(&StatusLabels {
                    status: status.into(),
                })
                .set(0);
        }
        for a in agents {
            let status = serde_json::to_value(a.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            self.agents
                .get_or_create(&StatusLabels {
                    status: status.clone(),
                })
                .inc();
            self.agent_heartbeat
                .get_or_create(&AgentLabels {
                    agent: a.id.clone(),
                    name: a.name.clone(),
                    hostname: a.hostname.clone(),
                    version: a.version.clone(),
                    status,
                })
                .set(a.last_heartbeat_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        }
        let (queued, running) = plane.counts();
        self.jobs_queued.set(queued as i64);
        self.jobs_running.set(running as i64);
        self.runner_healthy.clear();
        self.runner_slots_used.clear();
        self.runner_slots.clear();
        for entry in plane.registry().list() {
            let info = entry.info();
            let labels = RunnerLabels {
                runner: info.id.clone(),
                name: info.name.clone(),
                runner_kind: info.kind.as_str().to_string(),
            };
            self.runner_healthy
                .get_or_create(&labels)
                .set(i64::from(entry.status.takes_jobs()));
            self.runner_slots_used
                .get_or_create(&labels)
                .set(entry.runner.running() as i64);
            self.runner_slots
                .get_or_create(&labels)
                .set(entry.runner.capabilities().max_concurrency.unwrap_or(0) as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The same metrics in the Prometheus text format 0.0.4 (for clients that do not ask
/// for OpenMetrics): counter families are named with their `_total` suffix, and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn outcome_state(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed { .. } | Outcome::Signalled { .. } => "failed",
        Outcome::TimedOut { .. } => "timed_out",
        Outcome::Cancelled => "cancelled",
        Outcome::Lost => "lost",
        _ => "runner_error",
    }
}

impl Observer for Metrics {
    fn selection(&self, elapsed: Duration, _placed: bool) {
        self.selection.observe(elapsed.as_secs_f64());
    }
    fn picked(&self, runner_kind: &str, waited: Duration) {
        self.queue_wait
            .get_or_create(&KindLabels {
                runner_kind: runner_kind.to_string(),
            })
            .observe(waited.as_secs_f64());
    }
    fn attempt_ended(&self, runner_kind: &str, outcome: &Outcome, _ran: Duration) {
        self.attempts
            .get_or_create(&OutcomeLabels {
                state: outcome_state(outcome).to_string(),
                runner_kind: runner_kind.to_string(),
            })
            .inc();
    }
    fn usage(&self, runner_kind: &str, usage: &rustci_runners::ResourceUsage) {
        let labels = KindLabels {
            runner_kind: runner_kind.to_string(),
        };
        if let Some(cpu) = usage.cpu_seconds() {
            self.job_cpu.get_or_create(&labels).observe(cpu);
        }
        if let Some(m) = usage.peak_memory_bytes {
            self.job_peak_memory
                .get_or_create(&labels)
                .observe(m as f64);
        }
    }
    fn first_output(&self, _runner_kind: &str, since: Duration) {
        self.timeline.first_output(since);
    }
    fn job_finished(&self, runner_kind: Option<&str>, state: JobState, total: Duration) {
        self.timeline.finished(state.as_str(), total);
        let kind = runner_kind.unwrap_or("none").to_string();
        self.jobs_finished
            .get_or_create(&OutcomeLabels {
                state: state.as_str().to_string(),
                runner_kind: kind.clone(),
            })
            .inc();
        self.job_duration
            .get_or_create(&KindLabels { runner_kind: kind })
            .observe(total.as_secs_f64());
    }
    fn runner_status(&self, change: &StatusChange) {
        let status = change.to.map_or("removed", RunnerStatus::as_str);
        self.runner_transitions
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
    }
    fn retention(&self, r: &rustci_control::RetentionReport) {
        for state in rustci_control::LogState::ALL {
            let (n, bytes, _) = r.totals.by_state.get(&state).copied().unwrap_or_default();
            let labels = StateLabels {
                state: state.as_str().to_string(),
            };
            self.logs.get_or_create(&labels).set(n as i64);
            if state.is_kept() {
                self.log_stored.get_or_create(&labels).set(bytes as i64);
            }
        }
        for (what, n) in [
            ("logs", r.expired),
            ("jobs", r.jobs_deleted),
            ("audit", r.audit_deleted),
        ] {
            self.retention_deleted
                .get_or_create(&WhatLabels { what: what.into() })
                .inc_by(n);
        }
        self.log_pruned_bytes
            .inc_by(r.expired_bytes + r.jobs_deleted_bytes);
        self.logs_compressed.inc_by(r.compressed);
        self.log_compression_saved
            .inc_by(r.compressed_from.saturating_sub(r.compressed_to));
        self.retention_batch.set(r.longest_batch.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustci_control::RegisterOptions;
    use rustci_runners::select::SelectionEngine;
    use rustci_runners::{HostConfig, LocalRunner};

    use super::*;

    // Scrapes at once each see every runner's series: a render's clearing of the
    // per-runner families must not reach another render's output.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_each_show_every_runner() {
        let plane = ControlPlane::new(SelectionEngine::default(), Duration::from_secs(60));
        let runner = LocalRunner::new(HostConfig::named("scraped")).unwrap();
        let id = plane.register(Arc::new(runner), RegisterOptions::default());
        let metrics = Arc::new(Metrics::new());
        let series = format!("rustci_runner_slots{{runner=\"{id}\"");
        let scrapers: Vec<_> = (0..4)
            .map(|_| {
                let (metrics, plane, series) = (metrics.clone(), plane.clone(), series.clone());
                std::thread::spawn(move || {
                    (0..300)
                        .filter(|_| !metrics.render(&plane).contains(&series))
                        .count()
                })
            })
            .collect();
        let missing: usize = scrapers.into_iter().map(|s| s.join().unwrap()).sum();
        assert_eq!(missing, 0, "{missing} of 1,200 scrapes lacked {series}");
        plane.shutdown();
    }
}
