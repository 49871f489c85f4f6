//! The dashboard's pages (maud templates: every interpolated string is escaped).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use maud::{DOCTYPE, Markup, html};
use rustci_control::{AuditEntry, JobPage, JobQuery, JobRecord, JobState, RunnerEntry, Transition};

use super::super::auth::Role;
use super::super::timeline::{Histogram, Minute, Snapshot};
use super::Session;

fn layout(title: &str, session: Option<&Session>, active: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · rustci" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                header {
                    nav {
                        a.brand href="/" { "rustci" }
                        @if let Some(s) = session {
                            @for (href, name) in nav_items(s.principal.role) {
                                a href=(href) aria-current=[(active == name).then_some("page")] { (name) }
                            }
                            span.who { (s.principal.name) " (" (s.principal.role.as_str()) ")" }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn nav_items(role: Role) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("/", "Overview"),
        ("/runners", "Runners"),
        ("/queue", "Queue"),
        ("/jobs", "Jobs"),
    ];
    if role.allows(Role::Admin) {
        v.push(("/audit", "Audit"));
    }
    v
}

/// A page with one message (errors, refusals).
pub(super) fn message(title: &str, text: &str) -> Markup {
    layout(
        title,
        None,
        "",
        html! {
            h1 { (title) }
            p.message { (text) }
            p { a href="/" { "Back to the dashboard" } }
        },
    )
}

pub(super) fn login(next: &str, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        "",
        html! {
            h1 { "Sign in" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.login method="post" action="/login" {
                label for="key" { "API key" }
                input #key type="password" name="key" autocomplete="current-password" required autofocus;
                input type="hidden" name="next" value=(next);
                button type="submit" { "Sign in" }
            }
            p.hint { "Use the admin key the server printed at its first start, or any key from its configuration. The key's role decides what you may do here." }
        },
    )
}

fn badge(state: JobState) -> Markup {
    html! { span class={ "badge state-" (state.as_str()) } data-state=(state.as_str()) { (state.as_str()) } }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 120_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{:.1} min", ms / 60_000.0)
    }
}

fn when(t: SystemTime) -> String {
    let ms = super::epoch_ms(t);
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03} UTC", ms % 1000)
}

fn time_el(t: SystemTime) -> Markup {
    html! { time datetime=(super::epoch_ms(t)) { (when(t)) } }
}

fn duration_of(r: &JobRecord) -> Option<Duration> {
    let end = r.finished_at.unwrap_or_else(SystemTime::now);
    end.duration_since(r.submitted_at).ok()
}

pub(super) struct Overview<'a> {
    pub queued: usize,
    pub running: usize,
    pub finished_last_hour: u64,
    pub by_status: BTreeMap<&'static str, usize>,
    pub timeline: &'a Snapshot,
}

pub(super) fn overview(session: &Session, o: Overview<'_>) -> Markup {
    let hour = o.timeline.last(60);
    let slots = slots_of(&o.timeline.last(360), 10);
    layout(
        "Overview",
        Some(session),
        "Overview",
        html! {
            h1 { "Overview" }
            section #counts .cards data-refresh="5" {
                div.card { span.big #queued { (o.queued) } span { "queued" } }
                div.card { span.big #running { (o.running) } span { "running" } }
                div.card { span.big #finished { (o.finished_last_hour) } span { "finished in the last hour" } }
                div.card {
                    span { "runners" }
                    ul.plain {
                        @for (status, n) in &o.by_status {
                            li { span class={ "dot status-" (status) } {} (n) " " (status) }
                        }
                        @if o.by_status.is_empty() { li { "none registered" } }
                    }
                }
            }
            section {
                h2 { "Jobs per minute, last hour, by outcome" }
                (per_minute_chart(&hour))
            }
            section {
                h2 { "Pickup (submit → first output), last 6 hours, per 10 minutes" }
                (quantile_chart(&slots.iter().map(|(at, _, p)| (*at, p.clone())).collect::<Vec<_>>()))
            }
            section {
                h2 { "Duration (submit → end), last 6 hours, per 10 minutes" }
                (quantile_chart(&slots.iter().map(|(at, d, _)| (*at, d.clone())).collect::<Vec<_>>()))
            }
        },
    )
}

/// Groups minutes into slots of `width`: (first minute, durations, pickups).
fn slots_of(minutes: &[Minute], width: usize) -> Vec<(u64, Histogram, Histogram)> {
    minutes
        .chunks(width)
        .map(|c| {
            let mut d = Histogram::default();
            let mut p = Histogram::default();
            for m in c {
                d.merge(&m.duration);
                p.merge(&m.pickup);
            }
            (c[0].at, d, p)
        })
        .collect()
}

const OUTCOMES: [&str; 4] = ["succeeded", "failed", "cancelled", "other"];

fn outcome_group(state: &str) -> &'static str {
    match state {
        "succeeded" => "succeeded",
        "failed" => "failed",
        "cancelled" => "cancelled",
        _ => "other",
    }
}

fn clock(minute: u64) -> String {
    format!("{:02}:{:02}", (minute / 60) % 24, minute % 60)
}

/// Stacked bars of jobs ended per minute, by outcome.
fn per_minute_chart(minutes: &[Minute]) -> Markup {
    let (w, h, pad) = (600.0, 160.0, 24.0);
    let max = minutes
        .iter()
        .map(Minute::finished_total)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bar = (w - pad) / minutes.len().max(1) as f64;
    html! {
        svg.chart viewBox={ "0 0 " (w) " " (h + 18.0) } role="img" aria-label="jobs per minute by outcome" {
            text.axis x="0" y="10" { (max as u64) "/min" }
            @for (i, m) in minutes.iter().enumerate() {
                @let mut y = h;
                @for group in OUTCOMES {
                    @let n: u64 = m.finished.iter().filter(|(s, _)| outcome_group(s) == group).map(|(_, n)| n).sum();
                    @if n > 0 {
                        @let bh = n as f64 / max * (h - 14.0);
                        @let top = { y -= bh; y };
                        rect class={ "o-" (group) } x=(format!("{:.1}", pad + i as f64 * bar)) y=(format!("{top:.1}")) width=(format!("{:.1}", (bar - 1.0).max(1.0))) height=(format!("{bh:.1}")) {
                            title { (clock(m.at)) ": " (n) " " (group) }
                        }
                    }
                }
            }
            @if let (Some(first), Some(last)) = (minutes.first(), minutes.last()) {
                text.axis x=(pad) y=(h + 14.0) { (clock(first.at)) " UTC" }
                text.axis x=(w - 40.0) y=(h + 14.0) { (clock(last.at)) }
            }
        }
        p.legend {
            @for group in OUTCOMES { span class={ "key o-" (group) } {} (group) " " }
        }
    }
}

/// A slot's p50 and p95, in seconds.
type Pair = (Option<f64>, Option<f64>);

/// p50 and p95 lines over slots; a slot without values breaks the line.
fn quantile_chart(slots: &[(u64, Histogram)]) -> Markup {
    let (w, h, pad) = (600.0, 160.0, 48.0);
    let values: Vec<Pair> = slots
        .iter()
        .map(|(_, hist)| {
            (
                hist.quantile(0.5).map(|d| d.as_secs_f64()),
                hist.quantile(0.95).map(|d| d.as_secs_f64()),
            )
        })
        .collect();
    let max = values
        .iter()
        .filter_map(|(_, p95)| *p95)
        .fold(0.0f64, f64::max);
    let step = (w - pad) / slots.len().max(1) as f64;
    let point = |i: usize, v: f64| {
        let y = h - if max > 0.0 { v / max * (h - 14.0) } else { 0.0 };
        format!("{:.1},{y:.1}", pad + (i as f64 + 0.5) * step)
    };
    let line = |pick: fn(&Pair) -> Option<f64>| -> Vec<String> {
        // Runs of consecutive slots with values, one polyline each.
        let mut runs = Vec::new();
        let mut cur = Vec::new();
        for (i, v) in values.iter().enumerate() {
            match pick(v) {
                Some(x) => cur.push(point(i, x)),
                None if !cur.is_empty() => runs.push(std::mem::take(&mut cur).join(" ")),
                None => {}
            }
        }
        if !cur.is_empty() {
            runs.push(cur.join(" "));
        }
        runs
    };
    let p50 = line(|v| v.0);
    let p95 = line(|v| v.1);
    html! {
        @if max == 0.0 {
            p.empty { "No jobs in this time." }
        } @else {
            svg.chart viewBox={ "0 0 " (w) " " (h + 18.0) } role="img" aria-label="p50 and p95" {
                text.axis x="0" y="10" { (ms(Duration::from_secs_f64(max))) }
                text.axis x="0" y=(h) { "0" }
                @for pts in &p95 { polyline.p95 points=(pts) {} @if !pts.contains(' ') { circle.p95 cx=(pts.split(',').next().unwrap_or("0")) cy=(pts.split(',').nth(1).unwrap_or("0")) r="3" {} } }
                @for pts in &p50 { polyline.p50 points=(pts) {} @if !pts.contains(' ') { circle.p50 cx=(pts.split(',').next().unwrap_or("0")) cy=(pts.split(',').nth(1).unwrap_or("0")) r="3" {} } }
                @if let (Some(first), Some(last)) = (slots.first(), slots.last()) {
                    text.axis x=(pad) y=(h + 14.0) { (clock(first.0)) " UTC" }
                    text.axis x=(w - 40.0) y=(h + 14.0) { (clock(last.0)) }
                }
            }
            p.legend { span.key.l-p50 {} "p50 " span.key.l-p95 {} "p95" }
        }
    }
}

pub(super) fn runners(session: &Session, list: &[RunnerEntry], flash: Option<&str>) -> Markup {
    let operator = session.principal.role.allows(Role::Operator);
    layout(
        "Runners",
        Some(session),
        "Runners",
        html! {
            h1 { "Runners" }
            @if let Some(f) = flash { p.flash role="status" { (f) } }
            @if list.is_empty() { p.empty { "No runner is registered." } }
            div.table-wrap {
            table #runners data-refresh="5" {
                thead { tr {
                    th { "Runner" } th { "Kind" } th { "Labels" } th { "Status" } th { "Slots" } th { "Health checks" } th { "Start-up" }
                    @if operator { th { "Actions" } }
                } }
                tbody {
                    @for e in list {
                        @let info = e.info();
                        @let running = e.runner.running();
                        @let slots = e.runner.capabilities().max_concurrency;
                        tr data-runner=(info.id) {
                            td { strong { (info.name) } br; code.small { (info.id) } }
                            td { (info.kind.as_str()) }
                            td {
                                @for l in e.labels() { span.label { (l) } " " }
                                @for l in &e.reserved_labels { span.label.reserved title="reserved: only jobs that ask for it" { (l) } " " }
                            }
                            td {
                                span class={ "badge status-" (e.status.as_str()) } { (e.status.as_str()) }
                                br; span.small.reason { (e.effective_health().to_string()) }
                                @if e.failures > 0 { br; span.small { (e.failures) " failed checks in a row" } }
                            }
                            td {
                                @match slots {
                                    Some(n) => { meter min="0" max=(n) value=(running) {} " " (running) " / " (n) }
                                    None => { (running) " / unbounded" }
                                }
                            }
                            td.checks {
                                @for c in e.checks.iter() {
                                    @let ok = matches!(c.health, rustci_runners::Health::Healthy);
                                    span class={ "check " (if ok { "ok" } else { "bad" }) } title={ (when(c.at)) ": " (c.health.to_string()) " in " (ms(c.took)) } {}
                                }
                                @if let Some(c) = e.checks.back() { br; span.small { "last " (ms(c.took)) ", " (when(c.at)) } }
                                @if e.checks.is_empty() { span.small { "none yet" } }
                            }
                            td { @match e.startup() { Some(d) => { (ms(d)) }, None => { "–" } } }
                            @if operator {
                                td.actions {
                                    @if e.status.as_str() == "draining" {
                                        (action_form(&format!("/runners/{}/resume", info.id), &session.csrf, "Resume"))
                                    } @else {
                                        (action_form(&format!("/runners/{}/drain", info.id), &session.csrf, "Drain"))
                                    }
                                    (action_form(&format!("/runners/{}/health", info.id), &session.csrf, "Check health"))
                                }
                            }
                        }
                    }
                }
            }
            }
        },
    )
}

fn action_form(action: &str, csrf: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" { (label) }
        }
    }
}

pub(super) fn queue(session: &Session, total: usize, jobs: &[JobRecord]) -> Markup {
    layout(
        "Queue",
        Some(session),
        "Queue",
        html! {
            h1 { "Queue" }
            div #queue-part data-refresh="5" {
            p { (total) " waiting, in the order they will be dispatched (priority, then fair share among submitters, then age)." }
            @if jobs.len() < total { p.hint { "Showing the first " (jobs.len()) "." } }
            div.table-wrap {
            table #queue {
                thead { tr { th { "#" } th { "Job" } th { "Priority" } th { "Submitter" } th { "Waiting" } th { "Why it waits" } } }
                tbody {
                    @for (i, r) in jobs.iter().enumerate() {
                        tr {
                            td { (i + 1) }
                            td { a href={ "/jobs/" (r.id.as_str()) } { (r.job.name) } br; code.small { (r.id.as_str()) } }
                            td { (r.job.priority) }
                            td { (r.submitter) }
                            td { @if let Some(d) = duration_of(r) { (ms(d)) } }
                            td.why { (r.why_pending.as_deref().unwrap_or("waiting for the next dispatch round")) }
                        }
                    }
                }
            }
            }
            }
        },
    )
}

const STATES: [&str; 8] = [
    "queued",
    "assigned",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "lost",
];

pub(super) fn jobs(session: &Session, q: &JobQuery, page: &JobPage) -> Markup {
    let state = q.state.map(|s| s.as_str()).unwrap_or("");
    let filters = |before: Option<u64>| {
        let mut parts = Vec::new();
        if !state.is_empty() {
            parts.push(format!("state={state}"));
        }
        if let Some(s) = &q.submitter {
            parts.push(format!("submitter={}", super::urlencode(s)));
        }
        if let Some(n) = &q.name {
            parts.push(format!("name={}", super::urlencode(n)));
        }
        if let Some(r) = &q.runner {
            parts.push(format!("runner={}", super::urlencode(r)));
        }
        if q.effective_limit() != 50 {
            parts.push(format!("limit={}", q.effective_limit()));
        }
        if let Some(b) = before {
            parts.push(format!("before={b}"));
        }
        format!("/jobs?{}", parts.join("&"))
    };
    layout(
        "Jobs",
        Some(session),
        "Jobs",
        html! {
            h1 { "Jobs" }
            form.filters method="get" action="/jobs" {
                label { "State " select name="state" {
                    option value="" selected[state.is_empty()] { "any" }
                    @for s in STATES { option value=(s) selected[state == s] { (s) } }
                } }
                label { "Submitter " input type="text" name="submitter" value=(q.submitter.as_deref().unwrap_or("")); }
                label { "Name " input type="text" name="name" value=(q.name.as_deref().unwrap_or("")); }
                label { "Runner " input type="text" name="runner" value=(q.runner.as_deref().unwrap_or("")); }
                button type="submit" { "Filter" }
            }
            @if page.jobs.is_empty() { p.empty { "No job matches." } }
            div.table-wrap {
            table #jobs {
                thead { tr { th { "Job" } th { "State" } th { "Submitter" } th { "Submitted" } th { "Duration" } th { "Runner" } } }
                tbody {
                    @for r in &page.jobs {
                        tr {
                            td { a href={ "/jobs/" (r.id.as_str()) } { (r.job.name) } br; code.small { (r.id.as_str()) } }
                            td { (badge(r.state)) }
                            td { (r.submitter) }
                            td { (time_el(r.submitted_at)) }
                            td { @if let Some(d) = duration_of(r) { (ms(d)) } }
                            td { @if let Some(id) = r.runner_id() { a href={ "/jobs?runner=" (super::urlencode(id)) } { code.small { (id) } } } }
                        }
                    }
                }
            }
            }
            nav.pager {
                @if q.before.is_some() { a href=(filters(None)) { "Newest" } }
                @if let Some(next) = page.next { a rel="next" href=(filters(Some(next))) { "Older →" } }
            }
        },
    )
}

pub(super) struct LogView<'a> {
    pub start: u64,
    pub text: &'a [u8],
    pub length: u64,
    pub follow: bool,
    /// What retention did to it, once the job ended.
    pub retention: Option<rustci_control::LogRecord>,
}

/// Log text for reading without the script: escape sequences removed, `\r` lines
/// reduced to what a terminal would show last.
fn plain_log(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    // The current line as a terminal holds it: `\r` moves back to its start and what
    // follows overwrites.
    let mut line: Vec<char> = Vec::new();
    let mut col = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: drop the next char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else if chars.peek() == Some(&']') {
                    // OSC: up to BEL or ESC \.
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next();
                            break;
                        }
                    }
                } else if chars.next().is_some_and(|c| "()*+".contains(c)) {
                    // Character set selection: one more.
                    chars.next();
                }
            }
            '\r' if chars.peek() != Some(&'\n') => col = 0,
            '\r' => {}
            '\n' => {
                out.extend(line.drain(..));
                out.push('\n');
                col = 0;
            }
            c => {
                if col < line.len() {
                    line[col] = c;
                } else {
                    line.push(c);
                }
                col += 1;
            }
        }
    }
    out.extend(line);
    out
}

pub(super) fn job(
    session: &Session,
    r: &JobRecord,
    transitions: &[Transition],
    log: LogView<'_>,
    flash: Option<&str>,
) -> Markup {
    let may_cancel = !r.state.is_terminal()
        && (session.principal.role.allows(Role::Operator)
            || (session.principal.role == Role::Submitter
                && session.principal.name == r.submitter));
    let mut spec = serde_json::to_value(&r.job).unwrap_or_default();
    if let Some(serde_json::Value::Object(secrets)) = spec.get_mut("secrets") {
        for v in secrets.values_mut() {
            *v = serde_json::Value::String("***".into());
        }
    }
    let spec = serde_json::to_string_pretty(&spec).unwrap_or_default();
    let id = r.id.as_str();
    layout(
        &r.job.name,
        Some(session),
        "Jobs",
        html! {
            h1 { (r.job.name) " " (badge(r.state)) }
            @if let Some(f) = flash { p.flash role="status" { (f) } }
            dl.facts #facts data-job=(id) {
                dt { "Id" } dd { code { (id) } }
                dt { "Submitter" } dd { (r.submitter) }
                dt { "Submitted" } dd { (time_el(r.submitted_at)) }
                dt { "Priority" } dd { (r.job.priority) }
                @if let Some(o) = &r.outcome { dt { "Outcome" } dd #outcome { (o.to_string()) } }
                @if let Some(w) = &r.why_pending { dt { "Why it waits" } dd.why { (w) } }
            }
            @if may_cancel {
                form.inline #cancel method="post" action={ "/jobs/" (id) "/cancel" } {
                    input type="hidden" name="csrf" value=(session.csrf);
                    button.danger type="submit" { "Cancel job" }
                }
            }
            section {
                h2 { "Log" }
                @if let Some(gone) = log.retention.as_ref().filter(|l| l.state.is_gone()) {
                    p.empty #log-expired {
                        "The log (" (gone.original) " bytes) was deleted by the retention policy; the job's record remains."
                    }
                } @else {
                p.small {
                    "Bytes " (log.start) " to " (log.start + log.text.len() as u64) " of " (log.length) ". "
                    @if log.start > 0 {
                        a href={ "/jobs/" (id) "?log=" (log.start.saturating_sub(super::LOG_PAGE)) } { "← earlier" } " "
                    }
                    @if !log.follow && log.start + (log.text.len() as u64) < log.length {
                        a href={ "/jobs/" (id) "?log=" (log.start + log.text.len() as u64) } { "later →" } " "
                        a href={ "/jobs/" (id) } { "live tail" } " "
                    }
                    a href={ "/api/jobs/" (id) "/logs?offset=" (log.start) } { "raw" }
                    " · " span.err-key { "stderr" } " is tinted (where the runner keeps the streams apart)"
                    @if let Some(kept) = log.retention.as_ref().filter(|l| l.state == rustci_control::LogState::Compressed) {
                        " · stored compressed (" (kept.bytes) " bytes)"
                    }
                }
                pre #log .log data-job=(id) data-offset=(log.start) data-follow=(if log.follow { "1" } else { "0" }) { (plain_log(log.text)) }
                }
            }
            section {
                h2 { "Attempts" }
                @if r.attempts.is_empty() { p.empty { "Not started yet." } }
                ol.timeline #attempts {
                    @for a in &r.attempts {
                        li {
                            strong { "Attempt " (a.number) } " on " code { (a.runner_id) }
                            " · started " (time_el(a.started_at))
                            @if let Some(end) = a.ended_at {
                                " · ended " (time_el(end))
                                @if let Ok(d) = end.duration_since(a.started_at) { " (" (ms(d)) ")" }
                            }
                            @match &a.outcome {
                                Some(o) => { " · " span.outcome { (o.to_string()) } }
                                None => { " · running" }
                            }
                            @if a.declined { " · handed back before it ran (not counted as a retry)" }
                        }
                    }
                }
                h2 { "States" }
                ol.timeline #transitions {
                    @for t in transitions { li { (badge(t.state)) " " (time_el(t.at)) } }
                }
            }
            section {
                h2 { "Spec" }
                pre.spec { (spec) }
            }
        },
    )
}

pub(super) fn audit(
    session: &Session,
    entries: &[AuditEntry],
    actor: Option<&str>,
    action: Option<&str>,
    next: Option<u64>,
) -> Markup {
    layout(
        "Audit",
        Some(session),
        "Audit",
        html! {
            h1 { "Audit log" }
            form.filters method="get" action="/audit" {
                label { "Actor contains " input type="text" name="actor" value=(actor.unwrap_or("")); }
                label { "Action contains " input type="text" name="action" value=(action.unwrap_or("")); }
                button type="submit" { "Filter" }
            }
            div.table-wrap {
            table #audit {
                thead { tr { th { "#" } th { "When" } th { "Actor" } th { "Action" } th { "Target" } th { "Result" } } }
                tbody {
                    @for e in entries {
                        tr {
                            td { (e.seq) }
                            td { (time_el(e.at)) }
                            td { (e.actor) }
                            td { code { (e.action) } }
                            td { @if let Some(t) = &e.target { code.small { (t) } } }
                            td { (e.result) }
                        }
                    }
                }
            }
            }
            @if let Some(n) = next {
                nav.pager { a rel="next" href={ "/audit?before=" (n) "&actor=" (super::urlencode(actor.unwrap_or(""))) "&action=" (super::urlencode(action.unwrap_or(""))) } { "Older →" } }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_log_drops_escapes_and_keeps_what_a_terminal_shows_last() {
        let raw = b"\x1b[31mred\x1b[0m done\n10%\r50%\r100%\nend\r\n\x1b]0;title\x07x\x1b(B\n";
        assert_eq!(plain_log(raw), "red done\n100%\nend\nx\n");
        assert_eq!(
            plain_log(b"abcdef\rXY"),
            "XYcdef",
            "overwritten as a terminal does"
        );
    }
}
