//! The HTTP API: routes, the error envelope, request ids, authentication, roles, rate
//! limits, body limits and timeouts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use rustci_control::{
    AuditEntry, ControlPlane, JobQuery, JobRecord, JobState, RegisterOptions, RunnerEntry,
};
use rustci_runners::error::Chain;
use rustci_runners::{Job, JobId, Outcome};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use super::auth::{AuthFailures, FailureVerdict, Keys, Principal, RateLimiter, Role, client_key};
use super::config::{RunnerConfig, ServerConfig, check_runner_with};
use super::metrics::Metrics;
use super::runners::RunnerFactory;

/// What every request handler shares.
pub struct App {
    /// The control plane.
    pub plane: ControlPlane,
    /// Accepted keys and the token secret.
    pub keys: Keys,
    /// Registration tokens' uses and revocations.
    pub tokens: Arc<super::tokens::Tokens>,
    /// Per-caller rate limits.
    pub limiter: RateLimiter,
    /// Failed authentications, so that a flood is audited in summaries.
    pub auth_failures: AuthFailures,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub config: ServerConfig,
    /// Builds runners for registrations.
    pub factory: RunnerFactory,
    /// Remote agents, when the server listens for them.
    pub hub: Option<rustci_runners_valkyrie::Hub>,
    /// Signed-in dashboard users.
    pub sessions: super::web::Sessions,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// An API error, answered as `{"error": {"code", "message", "details"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }
    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// What went wrong, for people.
    pub fn message(&self) -> &str {
        &self.message
    }
    fn details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }
    fn job_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "JOB_NOT_FOUND",
            format!("no job with id {id:?}"),
        )
    }
    fn runner_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "RUNNER_NOT_FOUND",
            format!("no runner with id {id:?}"),
        )
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(d) = self.details {
            body["details"] = d;
        }
        let mut response = (self.status, Json(json!({ "error": body }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Most log bytes one plain (not followed) log response carries.
const MAX_LOG_RESPONSE: usize = 1 << 20;

/// The request's correlation id (from `X-Request-ID`, or generated).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The router of the whole API, ready to serve or to nest into another axum app.
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so rate limits
/// can tell unauthenticated clients apart.
pub fn router(app: Arc<App>) -> Router {
    let viewer = Router::new()
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/logs", get(job_logs))
        .route("/api/runners", get(list_runners))
        .route("/api/runners/{id}", get(get_runner))
        .route("/api/runners/{id}/status", get(runner_status))
        .route_layer(middleware::from_fn(require_viewer));
    let submitter = Router::new()
        .route("/api/jobs", post(submit_job))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route_layer(middleware::from_fn(require_submitter));
    let operator = Router::new()
        .route("/api/runners/{id}", axum::routing::delete(delete_runner))
        .route("/api/runners/{id}/drain", post(drain_runner))
        .route("/api/runners/{id}/resume", post(resume_runner))
        .route("/api/runners/{id}/health", post(check_runner_health))
        .route_layer(middleware::from_fn(require_operator));
    let agents_admin = Router::new()
        .route("/api/agents/{id}", axum::routing::delete(revoke_agent))
        .route_layer(middleware::from_fn(require_admin));
    let agents_viewer = Router::new()
        .route("/api/agents", get(list_agents))
        .route("/api/agents/{id}", get(get_agent))
        .route_layer(middleware::from_fn(require_viewer));
    let admin = Router::new()
        .route("/api/tokens", post(create_token).get(list_tokens))
        .route("/api/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/audit", get(list_audit))
        .route_layer(middleware::from_fn(require_admin));
    let registrar = Router::new()
        .route("/api/runners", post(register_runner))
        .route_layer(middleware::from_fn(require_runner));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi));
    let limit = app.config.max_body_bytes;
    viewer
        .merge(submitter)
        .merge(operator)
        .merge(admin)
        .merge(registrar)
        .merge(agents_admin)
        .merge(agents_viewer)
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .merge(open)
        .merge(super::web::routes(&app))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(app.clone(), envelope))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this route does not take this method",
    )
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Outermost layer: request id, timeout, metrics, access log, and the envelope for
/// bodies axum rejects before a handler runs.
async fn envelope(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let too_large = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > app.config.max_body_bytes as u64);
    let span = tracing::info_span!("request", request_id = %request_id, %method, route = %route);
    let mut response = if too_large {
        payload_too_large(app.config.max_body_bytes)
    } else {
        let run = next.run(req).instrument(span.clone());
        match tokio::time::timeout(app.config.request_timeout(), run).await {
            Ok(r) => r,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "TIMEOUT",
                "the request took too long and was abandoned",
            )
            .into_response(),
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    // Browsers read API responses too (the dashboard's raw log link): never sniffed.
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let status = response.status();
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "answered"));
    // Methods outside the standard set share one label, so requests cannot mint series.
    let method_label = match method {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::HEAD
        | Method::OPTIONS => method.as_str(),
        _ => "OTHER",
    };
    app.metrics
        .http(method_label, &route, status.as_u16(), started.elapsed());
    response
}

fn payload_too_large(limit: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        format!("the request body is larger than {limit} bytes"),
    )
    .into_response()
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body is larger than {limit} bytes"),
        )
    } else {
        ApiError::invalid(format!("the request body could not be read: {e}"))
    }
}

pub(super) fn audit(
    app: &App,
    actor: &str,
    action: &str,
    target: Option<&str>,
    result: &str,
    rid: &str,
) {
    let entry = AuditEntry::new(
        actor,
        action,
        target.map(str::to_string),
        result,
        Some(rid.to_string()),
    );
    if let Err(e) = app.plane.store().append_audit(&entry) {
        tracing::error!(error = %Chain(&e), "the audit log did not take an entry");
    }
}

/// Audits a failed authentication (`action`, result `AUTHENTICATION_REQUIRED`) of the
/// client at `peer`, counted under `source` ([`client_key`]): recorded one by one only
/// as [`AuthFailures`] allows, the rest in the summaries of its window.
pub(super) fn audit_auth_failure(
    app: &Arc<App>,
    peer: &str,
    source: &str,
    action: &str,
    target: Option<&str>,
    rid: &str,
) {
    let (verdict, summaries) = app
        .auth_failures
        .failed(&format!("{action} {source}"), Instant::now());
    if !summaries.is_empty() {
        // The window that ended: its summaries off the request's thread.
        let app = app.clone();
        tokio::task::spawn_blocking(move || audit_failure_summaries(&app, summaries));
    }
    if verdict == FailureVerdict::Record {
        audit(
            app,
            &format!("anonymous@{peer}"),
            action,
            target,
            "AUTHENTICATION_REQUIRED",
            rid,
        );
    }
}

/// Writes the summaries of a window of failed authentications that ended.
pub(super) fn audit_failure_summaries(app: &App, summaries: Vec<super::auth::FailureSummary>) {
    let secs = app.auth_failures.window().as_secs();
    for s in summaries {
        let (action, actor) = match &s.source {
            Some(key) => {
                let (action, source) = key.split_once(' ').unwrap_or(("auth.failed", key));
                (action.to_string(), format!("anonymous@{source}"))
            }
            None => ("auth.failed".to_string(), "anonymous@*".to_string()),
        };
        let what = if s.source.is_some() {
            "from this source"
        } else {
            "from further sources"
        };
        let entry = AuditEntry::new(
            actor,
            action,
            None,
            format!(
                "AUTHENTICATION_REQUIRED: {} more failed authentications {what} within {secs} s, not recorded one by one",
                s.count
            ),
            None,
        );
        if let Err(e) = app.plane.store().append_audit(&entry) {
            tracing::error!(error = %Chain(&e), "the audit log did not take an entry");
        }
    }
}

/// 429 `RATE_LIMIT_EXCEEDED` with `Retry-After` for a caller whose bucket refills in
/// `wait`.
fn rate_limited(wait: Duration) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMIT_EXCEEDED",
        "too many requests; slow down",
    )
    .details(json!({"retry_after_seconds": wait.as_secs_f64()}));
    e.retry_after = Some(wait.as_secs().max(1));
    e
}

/// Authenticates `X-API-Key` or `Authorization: Bearer`, then applies the rate limit.
async fn authenticate(
    State(app): State<Arc<App>>,
    Extension(rid): Extension<RequestId>,
    req: Request,
    next: Next,
) -> Response {
    let peer_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let peer = peer_ip.map_or_else(|| "unknown".into(), |ip| ip.to_string());
    let source = peer_ip.map_or_else(|| "unknown".into(), client_key);
    let credential = credential(req.headers());
    let action = format!("{} {}", req.method(), req.uri().path());
    // The dashboard's session cookie stands in for a key on reading routes only: no
    // request a cookie can carry changes anything through the API.
    let reading = req.method() == Method::GET || req.method() == Method::HEAD;
    let session = match &credential {
        None if reading => app.sessions.from_headers(req.headers()).map(|(_, s)| s),
        _ => None,
    };
    let session_used = session.is_some();
    let principal = match credential {
        None if session.is_some() => Ok(session.expect("checked").principal),
        None => Err("no API key given (use X-API-Key or Authorization: Bearer)".to_string()),
        Some(c) => app.keys.authenticate(&c).and_then(|p| match &p.token_id {
            Some(id) => app.tokens.check(id).map(|()| p),
            None => Ok(p),
        }),
    };
    let limit_key = match &principal {
        // The dashboard's requests have a bucket of their own, apart from the key's
        // scripts.
        Ok(p) if session_used => format!("session:{}", p.name),
        Ok(p) => p.name.clone(),
        Err(_) => format!("ip:{source}"),
    };
    if let Err(wait) = app.limiter.check(&limit_key) {
        return rate_limited(wait).into_response();
    }
    match principal {
        Ok(p) => {
            let mut req = req;
            req.extensions_mut().insert(p);
            req.extensions_mut().insert(app.clone());
            next.run(req).await
        }
        Err(why) => {
            audit_auth_failure(&app, &peer, &source, "auth.failed", Some(&action), &rid.0);
            tracing::warn!(request_id = %rid.0, %peer, "authentication failed: {why}");
            ApiError::new(StatusCode::UNAUTHORIZED, "AUTHENTICATION_REQUIRED", why).into_response()
        }
    }
}

fn credential(headers: &HeaderMap) -> Option<String> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim().to_string());
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, value) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| value.trim().to_string())
}

async fn require(role: Role, req: Request, next: Next) -> Response {
    let Some(p) = req.extensions().get::<Principal>().cloned() else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_REQUIRED",
            "no API key given",
        )
        .into_response();
    };
    if p.role.allows(role) {
        return next.run(req).await;
    }
    if let (Some(app), Some(rid)) = (
        req.extensions().get::<Arc<App>>().cloned(),
        req.extensions().get::<RequestId>().cloned(),
    ) {
        let action = format!("{} {}", req.method(), req.uri().path());
        audit(
            &app,
            &p.name,
            "auth.denied",
            Some(&action),
            "AUTHORIZATION_FAILED",
            &rid.0,
        );
    }
    tracing::warn!(actor = %p.name, role = p.role.as_str(), needed = role.as_str(), "forbidden");
    ApiError::new(
        StatusCode::FORBIDDEN,
        "AUTHORIZATION_FAILED",
        format!(
            "role {} may not do this (needs {})",
            p.role.as_str(),
            role.as_str()
        ),
    )
    .into_response()
}

async fn require_viewer(req: Request, next: Next) -> Response {
    require(Role::Viewer, req, next).await
}
async fn require_submitter(req: Request, next: Next) -> Response {
    require(Role::Submitter, req, next).await
}
async fn require_operator(req: Request, next: Next) -> Response {
    require(Role::Operator, req, next).await
}
async fn require_admin(req: Request, next: Next) -> Response {
    require(Role::Admin, req, next).await
}
async fn require_runner(req: Request, next: Next) -> Response {
    require(Role::Runner, req, next).await
}

// ---------------------------------------------------------------------------------------
// Presentation

fn state_name(s: JobState) -> Value {
    Value::String(s.as_str().into())
}

fn outcome_json(o: &Outcome) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("summary".into(), Value::String(o.to_string()));
    }
    v
}

/// A job as the API shows it: secrets masked.
fn job_json(r: &JobRecord, detail: bool) -> Value {
    let mut job = serde_json::to_value(&r.job).unwrap_or(Value::Null);
    if let Some(Value::Object(secrets)) = job.get_mut("secrets") {
        for v in secrets.values_mut() {
            *v = Value::String("***".into());
        }
    }
    let attempts: Vec<Value> = r
        .attempts
        .iter()
        .map(|a| {
            let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
            if let Some(o) = &a.outcome {
                v["outcome"] = outcome_json(o);
            }
            v
        })
        .collect();
    let mut v = json!({
        "id": r.id.as_str(),
        "name": r.job.name,
        "state": state_name(r.state),
        "submitter": r.submitter,
        "priority": r.job.priority,
        "runner_id": r.runner_id(),
        "attempts": attempts,
        "submitted_at": millis(r.submitted_at),
        "finished_at": r.finished_at.map(millis),
        "outcome": r.outcome.as_ref().map(outcome_json),
        "why_pending": r.why_pending,
    });
    if detail {
        v["job"] = job;
    }
    v
}

fn millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Agents by the registry id of each of their runners.
type AgentsByRunner<'a> = HashMap<&'a str, &'a rustci_runners_valkyrie::AgentView>;

fn by_runner(agents: &[rustci_runners_valkyrie::AgentView]) -> AgentsByRunner<'_> {
    agents
        .iter()
        .flat_map(|a| a.runners.iter().map(move |r| (r.as_str(), a)))
        .collect()
}

/// A runner as the API shows it; a remote agent's runner carries `agent` (`agents` is
/// the hub's current view, when there is a hub).
fn runner_json(e: &RunnerEntry, agents: &AgentsByRunner<'_>) -> Value {
    let info = e.info();
    let agent = agents.get(info.id.as_str()).map(|a| {
        json!({
            "id": a.id,
            "hostname": a.hostname,
            "address": a.address,
            "version": a.version,
            "status": a.status,
            "last_heartbeat_ms": a.last_heartbeat_ms,
            "withdrawn": a.withdrawn,
        })
    });
    json!({
        "agent": agent,
        "id": info.id,
        "name": info.name,
        "kind": info.kind.as_str(),
        "labels": e.labels(),
        "reserved_labels": e.reserved_labels,
        "status": e.status.as_str(),
        "health": e.effective_health().to_string(),
        "running": e.runner.running(),
        "slots": e.runner.capabilities().max_concurrency,
        "capabilities": e.runner.capabilities(),
        "startup_ms": e.startup().map(|d| d.as_secs_f64() * 1000.0),
        "pressure": e.pressure,
    })
}

fn job_id(raw: &str) -> ApiResult<JobId> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(JobId::from(raw.to_string()))
    } else {
        Err(ApiError::job_not_found(raw))
    }
}

/// The job `raw` names, when it is a valid id of a known job.
pub(super) fn find_job_record(app: &App, raw: &str) -> Option<JobRecord> {
    find_job(app, raw).ok()
}

fn find_job(app: &App, raw: &str) -> ApiResult<JobRecord> {
    let id = job_id(raw)?;
    app.plane
        .get(&id)
        .ok_or_else(|| ApiError::job_not_found(raw))
}

fn find_runner(app: &App, raw: &str) -> ApiResult<RunnerEntry> {
    app.plane
        .registry()
        .get(raw)
        .ok_or_else(|| ApiError::runner_not_found(raw))
}

// ---------------------------------------------------------------------------------------
// Open routes

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let store = app.plane.store().count_by_state();
    let runners = app
        .plane
        .registry()
        .list()
        .iter()
        .filter(|e| e.status.takes_jobs() && e.effective_health().takes_new_jobs())
        .count();
    match store {
        Ok(_) if app.plane.accepting() => Json(json!({
            "status": "ready",
            "runners_taking_jobs": runners,
        }))
        .into_response(),
        Ok(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NOT_READY",
            "the server is shutting down",
        )
        .into_response(),
        Err(e) => {
            // The cause is for the operator's log, not for anyone who asks.
            tracing::error!(error = %Chain(&e), "readiness: the store does not answer");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NOT_READY",
                "the store does not answer (the server's log has the cause)",
            )
            .into_response()
        }
    }
}

/// Whether the caller may read `/metrics` (`metrics_allow`, `metrics_key_required`).
fn metrics_access(
    app: &Arc<App>,
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    rid: &str,
) -> Result<(), ApiError> {
    let config = &app.config;
    if !config.metrics_allow.is_empty() {
        // An IPv4 client on a dual-stack listener arrives as `::ffff:a.b.c.d`.
        let ip = peer.map(|ip| match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        });
        let allowed = ip.is_some_and(|ip| config.metrics_allow.iter().any(|n| n.contains(&ip)));
        if !allowed {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "AUTHORIZATION_FAILED",
                "metrics are not served to this address (metrics_allow)",
            ));
        }
    }
    if config.metrics_key_required {
        // Keys guessed here are limited and audited as on the API routes.
        let source = peer.map_or_else(|| "unknown".to_string(), client_key);
        if let Err(wait) = app.limiter.check(&format!("ip:{source}")) {
            return Err(rate_limited(wait));
        }
        let principal = match credential(headers) {
            Some(c) => app.keys.authenticate(&c),
            None => Err("metrics need an API key (use X-API-Key or Authorization: Bearer)".into()),
        };
        match principal {
            Ok(p) if p.role != Role::Runner => {}
            Ok(_) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "AUTHORIZATION_FAILED",
                    "a registration token does not read metrics",
                ));
            }
            Err(why) => {
                let peer = peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
                audit_auth_failure(
                    app,
                    &peer,
                    &source,
                    "auth.failed",
                    Some("GET /metrics"),
                    rid,
                );
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "AUTHENTICATION_REQUIRED",
                    why,
                ));
            }
        }
    }
    Ok(())
}

async fn metrics(
    State(app): State<Arc<App>>,
    Extension(rid): Extension<RequestId>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = metrics_access(&app, peer.map(|c| c.0.0.ip()), &headers, &rid.0) {
        return e.into_response();
    }
    let text = app
        .metrics
        .render_with_agents(&app.plane, &agent_views(&app));
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            super::metrics::to_prometheus_text(&text),
        )
            .into_response()
    }
}

async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

// ---------------------------------------------------------------------------------------
// Jobs

async fn submit_job(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| body_error(e, app.config.max_body_bytes))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("the request body is not UTF-8 text"))?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a job document (JSON or YAML)",
        ));
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let parsed = if ctype.contains("yaml") {
        Job::from_yaml(text)
    } else {
        Job::from_json(text)
    };
    let job = parsed.map_err(|errors| {
        let details: Vec<Value> = errors
            .errors()
            .iter()
            .map(|e| {
                json!({
                    "field": e.path,
                    "message": e.message,
                    "line": e.position.map(|p| p.0),
                    "column": e.position.map(|p| p.1),
                })
            })
            .collect();
        let first = errors
            .errors()
            .first()
            .map(|e| e.to_string())
            .unwrap_or_default();
        ApiError::invalid(format!("invalid job: {first}")).details(json!({ "problems": details }))
    })?;
    let submitter = p.name.clone();
    let id = app.plane.submit(job, &submitter).map_err(|e| match e {
        rustci_control::Error::InvalidSpec(_) => ApiError::invalid(e.to_string()),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            rustci_runners::error::Chain(&other).to_string(),
        ),
    })?;
    audit(&app, &p.name, "job.submit", Some(id.as_str()), "ok", &rid.0);
    tracing::info!(job_id = %id, submitter = %submitter, "job submitted");
    let state = app
        .plane
        .get(&id)
        .map(|r| r.state)
        .unwrap_or(JobState::Queued);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/jobs/{id}"))],
        Json(json!({"id": id.as_str(), "state": state_name(state)})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    state: Option<String>,
    submitter: Option<String>,
    name: Option<String>,
    runner: Option<String>,
    limit: Option<usize>,
    cursor: Option<u64>,
}

async fn list_jobs(
    State(app): State<Arc<App>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(params) = params.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let state = params
        .state
        .map(|s| {
            JobState::from_name(&s).ok_or_else(|| {
                ApiError::invalid(format!(
                    "state: unknown state {s:?} (queued, assigned, running, succeeded, failed, cancelled, timed_out, lost)"
                ))
            })
        })
        .transpose()?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit: must be 1 to 500"));
    }
    let mut query = JobQuery::default();
    query.state = state;
    query.submitter = params.submitter;
    query.name = params.name;
    query.runner = params.runner;
    query.before = params.cursor;
    query.limit = limit;
    let page = app
        .plane
        .list(&query)
        .map_err(|e| ApiError::internal(format!("listing jobs: {}", Chain(&e))))?;
    Ok(Json(json!({
        "jobs": page.jobs.iter().map(|r| job_json(r, false)).collect::<Vec<_>>(),
        "next_cursor": page.next,
    })))
}

async fn get_job(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let record = find_job(&app, &id)?;
    let mut v = job_json(&record, true);
    if let Ok(t) = app.plane.transitions(&record.id) {
        v["transitions"] = serde_json::to_value(t).unwrap_or(Value::Null);
    }
    if let Ok(Some(log)) = app.plane.log_record(&record.id) {
        v["log"] = json!({
            "state": log.state.as_str(),
            "stored_bytes": log.bytes,
            "bytes": log.original,
        });
    }
    Ok(Json(v))
}

/// 410 `LOG_EXPIRED` for a job whose log retention deleted.
pub(super) fn check_log_kept(app: &App, id: &JobId) -> ApiResult<()> {
    match app.plane.log_record(id) {
        Ok(Some(log)) if log.state.is_gone() => Err(ApiError::new(
            StatusCode::GONE,
            "LOG_EXPIRED",
            format!("the log of job {id} was deleted by the retention policy"),
        )
        .details(json!({"bytes": log.original}))),
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::internal(Chain(&e).to_string())),
    }
}

async fn cancel_job(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let state = cancel_as(&app, &p, &rid, &id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "state": state_name(state)})),
    )
        .into_response())
}

/// Cancels job `id` for `p` (a submitter only its own), audited; returns the job's state
/// after the request.
pub(super) fn cancel_as(
    app: &App,
    p: &Principal,
    rid: &RequestId,
    id: &str,
) -> ApiResult<JobState> {
    let id = id.to_string();
    let record = find_job(app, &id)?;
    if p.role == Role::Submitter && record.submitter != p.name {
        audit(
            app,
            &p.name,
            "job.cancel",
            Some(&id),
            "AUTHORIZATION_FAILED",
            &rid.0,
        );
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "AUTHORIZATION_FAILED",
            "a submitter may cancel only its own jobs",
        ));
    }
    if record.state.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "JOB_FINISHED",
            format!("job {id} has already ended ({:?})", record.state),
        )
        .details(json!({"state": state_name(record.state)})));
    }
    if !app.plane.cancel(&record.id) {
        // It ended between the look above and the cancel.
        let state = app.plane.get(&record.id).map_or(record.state, |r| r.state);
        audit(
            app,
            &p.name,
            "job.cancel",
            Some(&id),
            "JOB_FINISHED",
            &rid.0,
        );
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "JOB_FINISHED",
            format!("job {id} has already ended"),
        )
        .details(json!({"state": state_name(state)})));
    }
    audit(app, &p.name, "job.cancel", Some(&id), "ok", &rid.0);
    tracing::info!(job_id = %id, actor = %p.name, "cancel requested");
    Ok(app.plane.get(&record.id).map_or(record.state, |r| r.state))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    offset: Option<u64>,
    follow: Option<bool>,
}

async fn job_logs(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let record = find_job(&app, &id)?;
    check_log_kept(&app, &record.id)?;
    // A reconnecting event-stream client resumes after the last event it got.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let offset = resume.or(params.offset).unwrap_or(0);
    let mut follower = app
        .plane
        .follow_log(&record.id, offset)
        .ok_or_else(|| ApiError::job_not_found(&id))?;
    if !params.follow.unwrap_or(false) {
        // What is stored now, without waiting for more, at most MAX_LOG_RESPONSE bytes;
        // `X-Next-Offset` says where the next page starts.
        let mut out = Vec::new();
        let data = loop {
            if out.len() >= MAX_LOG_RESPONSE {
                break out;
            }
            match follower.try_next() {
                Some(Ok(chunk)) => out.extend_from_slice(&chunk.data),
                Some(Err(e)) => return Err(ApiError::internal(Chain(&e).to_string())),
                None => break out,
            }
        };
        let next = offset + data.len() as u64;
        return Ok((
            [
                (
                    header::CONTENT_TYPE,
                    "text/plain; charset=utf-8".to_string(),
                ),
                (
                    header::HeaderName::from_static("x-next-offset"),
                    next.to_string(),
                ),
            ],
            data,
        )
            .into_response());
    }
    let plane = app.plane.clone();
    let job = record.id.clone();
    let stream = async_stream(follower, plane, job);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `ranges` (byte offsets in the log, within `raw`, which starts at `offset`) as
/// `[start, end)` pairs of UTF-16 code units of `raw` decoded lossily, as a browser
/// counts them (an invalid sequence is one replacement character).
fn utf16_ranges(raw: &[u8], offset: u64, ranges: &[(u64, u64)]) -> Vec<[usize; 2]> {
    // The UTF-16 position of each byte of `raw`, and of its end.
    let mut at = Vec::with_capacity(raw.len() + 1);
    let mut units = 0;
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            for _ in 0..c.len_utf8() {
                at.push(units);
            }
            units += c.len_utf16();
        }
        if !chunk.invalid().is_empty() {
            for _ in chunk.invalid() {
                at.push(units);
            }
            units += 1;
        }
    }
    at.push(units);
    let pos = |b: u64| at[(b.saturating_sub(offset) as usize).min(raw.len())];
    ranges.iter().map(|r| [pos(r.0), pos(r.1)]).collect()
}

/// Server-sent events of a log: `event: log` with `id` = the offset after the chunk and
/// `data` = `{"offset", "text", "stderr"}` (`stderr`, when any of the text came from
/// stderr: `[start, end)` ranges of it in UTF-16 code units); then `event: end` with the
/// job's final state. Text is cut only at UTF-8 character boundaries.
fn async_stream(
    follower: rustci_control::LogFollower,
    plane: ControlPlane,
    job: JobId,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
    struct S {
        follower: rustci_control::LogFollower,
        carry: Vec<u8>,
        carry_offset: u64,
        done: bool,
    }
    let start = follower.offset();
    let s = S {
        follower,
        carry: Vec::new(),
        carry_offset: start,
        done: false,
    };
    futures::stream::unfold((s, plane, job), |(mut s, plane, job)| async move {
        if s.done {
            return None;
        }
        loop {
            match s.follower.next().await {
                Some(Ok(chunk)) => {
                    s.carry.extend_from_slice(&chunk.data);
                    let valid = match std::str::from_utf8(&s.carry) {
                        Ok(_) => s.carry.len(),
                        Err(e) if e.error_len().is_none() => e.valid_up_to(),
                        Err(_) => s.carry.len(),
                    };
                    if valid == 0 {
                        continue;
                    }
                    let text = String::from_utf8_lossy(&s.carry[..valid]).into_owned();
                    let offset = s.carry_offset;
                    let stderr = plane.log_stderr(&job, offset, offset + valid as u64);
                    let stderr = (!stderr.is_empty())
                        .then(|| utf16_ranges(&s.carry[..valid], offset, &stderr));
                    s.carry_offset += valid as u64;
                    s.carry.drain(..valid);
                    let mut data = json!({"offset": offset, "text": text});
                    if let Some(r) = stderr {
                        data["stderr"] = json!(r);
                    }
                    let data = data.to_string();
                    let event = format!("event: log\nid: {}\ndata: {data}\n\n", s.carry_offset);
                    return Some((Ok(Bytes::from(event)), (s, plane, job)));
                }
                Some(Err(e)) => {
                    s.done = true;
                    let data = json!({"message": Chain(&e).to_string()}).to_string();
                    let event = format!("event: error\ndata: {data}\n\n");
                    return Some((Ok(Bytes::from(event)), (s, plane, job)));
                }
                None => {
                    s.done = true;
                    let record = plane.get(&job);
                    let mut data = json!({
                        "state": record.as_ref().map(|r| state_name(r.state)),
                        "offset": s.carry_offset + s.carry.len() as u64,
                    });
                    if !s.carry.is_empty() {
                        data["text"] = Value::String(String::from_utf8_lossy(&s.carry).into());
                    }
                    let event = format!("event: end\ndata: {data}\n\n");
                    return Some((Ok(Bytes::from(event)), (s, plane, job)));
                }
            }
        }
    })
    .boxed()
}

// ---------------------------------------------------------------------------------------
// Runners

fn agent_views(app: &App) -> Vec<rustci_runners_valkyrie::AgentView> {
    app.hub.as_ref().map(|h| h.agents()).unwrap_or_default()
}

async fn list_runners(State(app): State<Arc<App>>) -> Json<Value> {
    let agents = agent_views(&app);
    let agents = by_runner(&agents);
    let runners: Vec<Value> = app
        .plane
        .registry()
        .list()
        .iter()
        .map(|e| runner_json(e, &agents))
        .collect();
    Json(json!({ "runners": runners }))
}

async fn get_runner(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let agents = agent_views(&app);
    Ok(Json(runner_json(
        &find_runner(&app, &id)?,
        &by_runner(&agents),
    )))
}

async fn runner_status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let e = find_runner(&app, &id)?;
    Ok(Json(json!({
        "id": id,
        "status": e.status.as_str(),
        "health": e.effective_health().to_string(),
        "running": e.runner.running(),
        "slots": e.runner.capabilities().max_concurrency,
    })))
}

async fn check_runner_health(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let e = find_runner(&app, &id)?;
    let health = match tokio::time::timeout(Duration::from_secs(10), e.runner.health()).await {
        Ok(h) => h.to_string(),
        Err(_) => "unhealthy: no answer within 10s".to_string(),
    };
    Ok(Json(json!({
        "id": id,
        "health": health,
        "status": e.status.as_str(),
    })))
}

async fn runner_action(
    app: &App,
    p: &Principal,
    rid: &RequestId,
    id: &str,
    action: &str,
) -> ApiResult<Json<Value>> {
    runner_change(app, p, rid, id, action).map(Json)
}

/// Drains (`runner.drain`), resumes (`runner.resume`) or removes (anything else) runner
/// `id` for `p`, audited; returns `{"id", "status"}`.
pub(super) fn runner_change(
    app: &App,
    p: &Principal,
    rid: &RequestId,
    id: &str,
    action: &str,
) -> ApiResult<Value> {
    find_runner(app, id)?;
    match action {
        "runner.drain" => {
            app.plane.drain(id);
        }
        "runner.resume" => {
            app.plane.resume(id);
        }
        _ => {
            app.plane.remove(id);
            if let Err(e) = app.plane.store().remove_runner(id) {
                tracing::error!(runner = %id, error = %Chain(&e), "removing a runner registration");
            }
        }
    }
    audit(app, &p.name, action, Some(id), "ok", &rid.0);
    tracing::info!(runner = %id, actor = %p.name, "{action}");
    let status = app
        .plane
        .registry()
        .get(id)
        .map_or("removed", |e| e.status.as_str());
    Ok(json!({"id": id, "status": status}))
}

async fn drain_runner(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    runner_action(&app, &p, &rid, &id, "runner.drain").await
}

async fn resume_runner(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    runner_action(&app, &p, &rid, &id, "runner.resume").await
}

fn hub(app: &App) -> ApiResult<&rustci_runners_valkyrie::Hub> {
    app.hub.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "AGENT_NOT_FOUND",
            "this server does not listen for agents (set agent_listen)",
        )
    })
}

async fn list_agents(State(app): State<Arc<App>>) -> ApiResult<Json<Value>> {
    let agents = hub(&app)?.agents();
    Ok(Json(json!({ "agents": agents })))
}

async fn get_agent(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match hub(&app)?.agent(&id) {
        Some(a) => Ok(Json(json!(a))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "AGENT_NOT_FOUND",
            format!("no agent {id}"),
        )),
    }
}

async fn revoke_agent(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if hub(&app)?.revoke(&id, &p.name) {
        Ok(Json(json!({ "revoked": id })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "AGENT_NOT_FOUND",
            format!("no agent {id}"),
        ))
    }
}

async fn delete_runner(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    // A remote agent's runner comes back with the agent's next session: removing it
    // means revoking the agent, which is for admins.
    if let Some(agent) = agent_of(&app, &id) {
        if p.role != Role::Admin {
            audit(
                &app,
                &p.name,
                "runner.delete",
                Some(&id),
                "AUTHORIZATION_FAILED",
                &rid.0,
            );
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "AUTHORIZATION_FAILED",
                format!(
                    "runner {id} belongs to agent {agent}; removing it revokes the agent, which \
                     is for admins (DELETE /api/agents/{agent})"
                ),
            ));
        }
        hub(&app)?.revoke(&agent, &p.name);
        audit(&app, &p.name, "runner.delete", Some(&id), "ok", &rid.0);
        return Ok(Json(
            json!({"id": id, "status": "removed", "revoked_agent": agent}),
        ));
    }
    runner_action(&app, &p, &rid, &id, "runner.delete").await
}

/// The agent whose runner `runner` is, when it is a remote agent's.
fn agent_of(app: &App, runner: &str) -> Option<String> {
    app.hub
        .as_ref()?
        .agents()
        .into_iter()
        .find(|a| a.runners.iter().any(|r| r == runner))
        .map(|a| a.id)
}

fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> ApiResult<T> {
    let body = body.map_err(|e| body_error(e, limit))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!("invalid JSON body: {e}"))
            .details(json!({"line": e.line(), "column": e.column()}))
    })
}

async fn register_runner(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut config: RunnerConfig = json_body(body, app.config.max_body_bytes)?;
    // A registration token registers a runner of its own; what reaches into the server's
    // host (engines, kubeconfigs, privileges, paths, ambient credentials) is for admins.
    // Refused before the configuration is checked, so that a check (of certificate
    // paths, say) tells such a caller nothing about the server's files.
    let refused = if p.role != Role::Runner {
        None
    } else if !app.config.registration_kinds.contains(&config.kind) {
        Some(format!(
            "a registration token may register runners of kind {}; {:?} is for admins",
            app.config.registration_kinds.join(", "),
            config.kind
        ))
    } else if config.options.contains_key(&config.kind) {
        // Other unknown fields fall through to the check below, which names them (400).
        Some(
            "a registration token may not give a runner's kind section (engines, kubeconfigs \
             and privileges on the server); an admin may"
                .to_string(),
        )
    } else if config.workspace_root.is_some() {
        Some(
            "a registration token may not choose workspace_root (a path on the server); an admin may"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(why) = refused {
        audit(
            &app,
            &p.name,
            "runner.register",
            None,
            "AUTHORIZATION_FAILED",
            &rid.0,
        );
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "AUTHORIZATION_FAILED",
            why,
        ));
    }
    check_runner_with(&config, app.factory.backends()).map_err(ApiError::invalid)?;
    for l in &p.token_labels {
        if !config.labels.contains(l) {
            config.labels.push(l.clone());
        }
    }
    // A token registers one runner: held while this registration runs, stored as used
    // before the registration is.
    let hold = match &p.token_id {
        Some(t) => Some(app.tokens.hold(t).map_err(|why| {
            ApiError::new(StatusCode::UNAUTHORIZED, "AUTHENTICATION_REQUIRED", why)
        })?),
        None => None,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let runner = app
        .factory
        .build(&config, Some(id.clone()))
        .await
        .map_err(|e| ApiError::invalid(format!("the runner cannot start here: {}", Chain(&e))))?;
    // Stored under the id the runner has (the one given here, for every built-in kind).
    let id = runner.info().id.clone();
    let record = rustci_control::RunnerRecord::new(
        id.clone(),
        config.name.clone(),
        config.kind.clone(),
        serde_json::to_value(&config).unwrap_or(Value::Null),
    );
    if let Some(hold) = hold {
        hold.commit(&format!("runner {id}")).map_err(|e| {
            if e == super::tokens::REVOKED {
                ApiError::new(StatusCode::UNAUTHORIZED, "AUTHENTICATION_REQUIRED", e)
            } else {
                ApiError::internal(format!("recording the token's use: {e}"))
            }
        })?;
    }
    app.plane
        .store()
        .put_runner(&record)
        .map_err(|e| ApiError::internal(format!("storing the registration: {}", Chain(&e))))?;
    let mut options = RegisterOptions::default();
    options.reserved_labels = config.reserved_labels.iter().cloned().collect();
    let id = app.plane.register(runner, options);
    audit(&app, &p.name, "runner.register", Some(&id), "ok", &rid.0);
    tracing::info!(runner = %id, name = %config.name, kind = %config.kind, actor = %p.name, "runner registered");
    let entry = find_runner(&app, &id)?;
    Ok((
        StatusCode::CREATED,
        Json(runner_json(&entry, &AgentsByRunner::new())),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default, deserialize_with = "super::config::whole_number")]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    labels: Vec<String>,
}

async fn create_token(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let bytes = body.map_err(|e| body_error(e, app.config.max_body_bytes))?;
    let req: TokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        TokenRequest {
            ttl_seconds: None,
            labels: Vec::new(),
        }
    } else {
        json_body(Ok(bytes), app.config.max_body_bytes)?
    };
    let ttl = req.ttl_seconds.unwrap_or(3600);
    if !(1..=super::tokens::MAX_TOKEN_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_seconds: must be 1 to 2592000 (30 days)",
        ));
    }
    let (token, claims) = app
        .keys
        .issue_token(&p.name, Duration::from_secs(ttl), req.labels)
        .map_err(ApiError::internal)?;
    app.tokens
        .issued(&claims)
        .map_err(|e| ApiError::internal(format!("recording the token: {e}")))?;
    audit(
        &app,
        &p.name,
        "token.create",
        Some(&claims.jti),
        "ok",
        &rid.0,
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "id": claims.jti,
            "expires_at": claims.exp * 1000,
            "labels": claims.labels,
        })),
    )
        .into_response())
}

async fn list_tokens(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({ "tokens": app.tokens.list() }))
}

async fn revoke_token(
    State(app): State<Arc<App>>,
    Extension(p): Extension<Principal>,
    Extension(rid): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let known = app
        .tokens
        .revoke(&id, &p.name)
        .map_err(|e| ApiError::internal(format!("recording the revocation: {e}")))?;
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "TOKEN_NOT_FOUND",
            format!("{id:?} is not a registration token id (a UUID)"),
        ));
    }
    audit(&app, &p.name, "token.revoke", Some(&id), "ok", &rid.0);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    limit: Option<usize>,
    before: Option<u64>,
}

async fn list_audit(
    State(app): State<Arc<App>>,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(params) = params.map_err(|e| ApiError::invalid(format!("query: {e}")))?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: must be 1 to 1000"));
    }
    let entries = app
        .plane
        .store()
        .audit(params.before, limit)
        .map_err(|e| ApiError::internal(format!("reading the audit log: {}", Chain(&e))))?;
    let next = if entries.len() == limit {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Json(json!({ "entries": entries, "next_before": next })))
}

#[cfg(test)]
mod tests {
    use super::utf16_ranges;

    #[test]
    fn stderr_ranges_count_as_a_browser_does() {
        // "a", an invalid byte (one replacement character), "é" (2 bytes, 1 unit),
        // "😀" (4 bytes, 2 units), "b".
        let raw: Vec<u8> = [&b"a\xff"[..], "é".as_bytes(), "😀".as_bytes(), b"b"].concat();
        // Bytes: a=100, \xff=101, é=102..104, 😀=104..108, b=108, starting at offset 100.
        assert_eq!(
            utf16_ranges(&raw, 100, &[(101, 102), (104, 108), (108, 109)]),
            [[1, 2], [3, 5], [5, 6]]
        );
        // A range running past the text ends with it.
        assert_eq!(utf16_ranges(&raw, 100, &[(108, 500)]), [[5, 6]]);
    }
}
