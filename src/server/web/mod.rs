//! The web dashboard: server-rendered pages of the control plane (overview, runners,
//! queue, jobs, a job with its live log, audit) on the same router as the API.
//!
//! - **Sign-in.** `POST /login` takes an API key once and answers with a session cookie
//!   (`rustci_session`: HttpOnly, SameSite=Strict, Secure over HTTPS, with the session's
//!   lifetime as Max-Age). Sessions live in the server's memory: a restart signs everyone
//!   out. The key's role decides what the pages offer; the actions check it again.
//! - **Reading** needs no JavaScript: every page is HTML from the server. The script only
//!   adds the live parts (the log as it is written, with colours; the state badge;
//!   refreshed counts), through the API's `GET` routes, which take the session cookie.
//!   Only `GET` API requests take it: nothing the API changes can be reached with a
//!   cookie.
//! - **Actions** (cancel, drain, resume, check health, sign out) are HTML forms posted to
//!   the dashboard's own routes. Each carries the session's CSRF token, compared in
//!   constant time, and is refused when its `Origin` is another origin.
//! - **Every page** is sent with a Content-Security-Policy that allows scripts, styles,
//!   images and connections from the server's own origin only (no inline script or
//!   style), and `frame-ancestors 'none'`. Every string a user supplied (job names,
//!   labels, log text) is escaped by the templates.

mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use rustci_control::{JobQuery, JobState};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::api::{App, RequestId, audit, audit_auth_failure, cancel_as, runner_change};
use super::auth::{Principal, Role};

/// The session cookie's name.
pub const COOKIE: &str = "rustci_session";

/// The Content-Security-Policy of every dashboard response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

/// Most sessions kept at once; past it, signing in ends the oldest.
const MAX_SESSIONS: usize = 10_000;

/// Most sessions of one key; past it, signing in with that key ends its oldest (so one
/// key cannot push everyone else's sessions out).
const MAX_SESSIONS_PER_KEY: usize = 32;

/// Longest session lifetime taken (30 days).
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A signed-in dashboard user.
#[derive(Clone, Debug)]
pub struct Session {
    /// Who signed in, with the role of the key they gave.
    pub principal: Principal,
    /// The token every form of this session carries.
    pub csrf: String,
    /// When it ends.
    pub expires: Instant,
}

/// Dashboard sessions by the SHA-256 of their cookie (so the lookup compares no secret).
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Sessions {
    /// Sessions that last `ttl` from sign-in (at most 30 days).
    pub fn new(ttl: Duration) -> Self {
        Sessions {
            map: Mutex::new(HashMap::new()),
            ttl: ttl.min(MAX_TTL),
        }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a session for `principal`; returns the cookie's value and the session.
    pub fn create(&self, principal: Principal) -> (String, Session) {
        let id = super::auth::random_secret();
        let session = Session {
            principal,
            csrf: super::auth::random_secret(),
            expires: Instant::now() + self.ttl,
        };
        let mut map = self.map.lock().expect("sessions");
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        let name = &session.principal.name;
        if map.values().filter(|s| s.principal.name == *name).count() >= MAX_SESSIONS_PER_KEY
            && let Some(oldest) = map
                .iter()
                .filter(|(_, s)| s.principal.name == *name)
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(digest(&id), session.clone());
        (id, session)
    }

    /// The live session of cookie value `id`; an expired one is ended.
    pub fn get(&self, id: &str) -> Option<Session> {
        let key = digest(id);
        let mut map = self.map.lock().expect("sessions");
        match map.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session of cookie value `id`.
    pub fn end(&self, id: &str) {
        self.map.lock().expect("sessions").remove(&digest(id));
    }

    /// The live session the request's cookie names, with the cookie's value.
    pub fn from_headers(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let s = self.get(&id)?;
        Some((id, s))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The dashboard's routes, to merge into the API's router (see [`super::router`]).
pub(super) fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let pages = Router::new()
        .route("/", get(overview))
        .route("/runners", get(runners))
        .route("/queue", get(queue))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/audit", get(audit_page))
        .route("/logout", post(logout))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/runners/{id}/{action}", post(runner_action))
        .layer(middleware::from_fn_with_state(app.clone(), signed_in));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/static/app.css", get(css))
        .route("/static/app.js", get(js))
        .merge(pages)
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// Pages and actions need a session: a page without one sends the browser to sign in,
/// an action without one is refused.
async fn signed_in(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    match app.sessions.from_headers(req.headers()) {
        Some((_, session)) => {
            req.extensions_mut().insert(session.principal.clone());
            req.extensions_mut().insert(session);
            next.run(req).await
        }
        None if req.method() == Method::GET || req.method() == Method::HEAD => {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let to = format!("/login?next={}", urlencode(path));
            Redirect::to(&to).into_response()
        }
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "your session has ended: sign in again",
        ),
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, pages::message("Refused", why)).into_response()
}

/// Percent-encodes everything but unreserved characters and `/`.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A path on this server to return to, or `/` (no scheme, no other host).
fn local_path(next: Option<&str>) -> String {
    match next {
        // No authority (`//host`, `/\\host`) and no control character: browsers drop
        // tabs and newlines from URLs, so `/<tab>/host` would become `//host`.
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.chars().any(char::is_control) =>
        {
            p.to_string()
        }
        _ => "/".to_string(),
    }
}

/// The origin browsers use for this server: `public_origin` when set (a proxy in
/// front), else the request's `Host` with the listener's scheme.
fn own_origin(app: &App, headers: &HeaderMap) -> Option<String> {
    if let Some(o) = &app.config.public_origin {
        return Some(o.trim_end_matches('/').to_string());
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = if app.config.plain_http {
        "http"
    } else {
        "https"
    };
    Some(format!("{scheme}://{host}"))
}

/// A state-changing form's checks: its origin (when the browser names one) is this
/// server's, and it carries the session's CSRF token. `Err` says why not.
fn check_form(
    app: &App,
    headers: &HeaderMap,
    session: &Session,
    token: &str,
) -> Result<(), &'static str> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = own_origin(app, headers).is_some_and(|o| origin.as_bytes() == o.as_bytes());
        if !same {
            return Err("the form was sent from another site (its Origin is not this server's)");
        }
    }
    if !bool::from(token.as_bytes().ct_eq(session.csrf.as_bytes())) {
        return Err(
            "the form's CSRF token is missing or not this session's: reload the page and try again",
        );
    }
    Ok(())
}

async fn css() -> Response {
    static_asset("text/css; charset=utf-8", include_str!("app.css"))
}

async fn js() -> Response {
    static_asset("text/javascript; charset=utf-8", include_str!("app.js"))
}

fn static_asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    if app.sessions.from_headers(&headers).is_some() {
        return Redirect::to(&local_path(q.next.as_deref())).into_response();
    }
    pages::login(&local_path(q.next.as_deref()), None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(
    State(app): State<Arc<App>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let peer_ip = peer.map(|c| c.0.0.ip());
    let peer = peer_ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    let source = peer_ip.map_or_else(|| "unknown".to_string(), crate::server::auth::client_key);
    let next = local_path(form.next.as_deref());
    if let Some(origin) = headers.get(header::ORIGIN)
        && own_origin(&app, &headers).is_none_or(|o| origin.as_bytes() != o.as_bytes())
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "the sign-in form was sent from another site",
        );
    }
    if app.limiter.check(&format!("login:{source}")).is_err() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(&next, Some("too many attempts; wait a moment")),
        )
            .into_response();
    }
    let principal = app
        .keys
        .authenticate(form.key.trim())
        .ok()
        .filter(|p| p.token_id.is_none() && p.role != Role::Runner);
    let Some(principal) = principal else {
        audit_auth_failure(&app, &peer, &source, "ui.login", None, &rid.0);
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(&next, Some("that API key is not valid")),
        )
            .into_response();
    };
    audit(&app, &principal.name, "ui.login", None, "ok", &rid.0);
    let (id, _) = app.sessions.create(principal);
    let https = match &app.config.public_origin {
        Some(o) => o.starts_with("https://"),
        None => !app.config.plain_http,
    };
    let secure = if https { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        app.sessions.ttl().as_secs().max(1)
    );
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct TokenForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Err(why) = check_form(&app, &headers, &session, &form.csrf) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    if let Some(id) = cookie(&headers, COOKIE) {
        app.sessions.end(&id);
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("rustci_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

#[derive(Deserialize, Default)]
struct Flash {
    done: Option<String>,
}

/// The text of a fixed result code an action redirects with (never text from the URL).
fn flash(code: Option<&str>) -> Option<&'static str> {
    Some(match code? {
        "cancelled" => "Cancel requested.",
        "drained" => "The runner is draining: it takes no new jobs.",
        "resumed" => "The runner takes jobs again.",
        "checked" => "Health check requested: the status shows its answer once it is in.",
        _ => return None,
    })
}

async fn overview(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
) -> Response {
    let (queued, running) = app.plane.counts();
    let mut by_status: std::collections::BTreeMap<&'static str, usize> = Default::default();
    for e in app.plane.registry().list() {
        *by_status.entry(e.status.as_str()).or_default() += 1;
    }
    let timeline = app.metrics.timeline();
    pages::overview(
        &session,
        pages::Overview {
            queued,
            running,
            finished_last_hour: timeline.finished_since(Duration::from_secs(3600)),
            by_status,
            timeline: &timeline,
        },
    )
    .into_response()
}

async fn runners(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    Query(f): Query<Flash>,
) -> Response {
    let list = app.plane.registry().list();
    pages::runners(&session, &list, flash(f.done.as_deref())).into_response()
}

async fn queue(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
) -> Response {
    let (total, jobs) = app.plane.queued(500);
    pages::queue(&session, total, &jobs).into_response()
}

#[derive(Deserialize, Default)]
struct JobsQuery {
    state: Option<String>,
    submitter: Option<String>,
    name: Option<String>,
    runner: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

/// An empty filter field is no filter.
fn filled(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

async fn jobs(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    q: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return refuse(StatusCode::BAD_REQUEST, "the filters are not valid");
    };
    let state = match filled(q.state) {
        None => None,
        Some(s) => match JobState::from_name(&s) {
            Some(s) => Some(s),
            None => return refuse(StatusCode::BAD_REQUEST, &format!("unknown state {s:?}")),
        },
    };
    let mut query = JobQuery::default();
    query.state = state;
    query.submitter = filled(q.submitter);
    query.name = filled(q.name);
    query.runner = filled(q.runner);
    query.before = q.before;
    query.limit = q.limit.unwrap_or(50).clamp(1, 500);
    match app.plane.list(&query) {
        Ok(page) => pages::jobs(&session, &query, &page).into_response(),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("listing jobs: {}", rustci_runners::error::Chain(&e)),
        ),
    }
}

#[derive(Deserialize, Default)]
struct JobView {
    done: Option<String>,
    /// Where the log shown starts (earlier pages of a long log).
    log: Option<u64>,
}

/// Bytes of log a job page shows (the tail, or the page asked for).
pub(crate) const LOG_PAGE: u64 = 256 * 1024;

async fn job(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    Path(id): Path<String>,
    Query(v): Query<JobView>,
) -> Response {
    let Some(record) = super::api::find_job_record(&app, &id) else {
        return refuse(StatusCode::NOT_FOUND, &format!("no job with id {id:?}"));
    };
    let transitions = app.plane.transitions(&record.id).unwrap_or_default();
    let length = app.plane.log_len(&record.id);
    let start = match v.log {
        Some(at) => at.min(length),
        None => length.saturating_sub(LOG_PAGE),
    };
    let text = app
        .plane
        .read_log(&record.id, start, LOG_PAGE as usize)
        .map(|b| b.to_vec())
        .unwrap_or_default();
    pages::job(
        &session,
        &record,
        &transitions,
        pages::LogView {
            start,
            text: &text,
            length,
            follow: v.log.is_none(),
            retention: app.plane.log_record(&record.id).ok().flatten(),
        },
        flash(v.done.as_deref()),
    )
    .into_response()
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    before: Option<u64>,
    actor: Option<String>,
    action: Option<String>,
}

async fn audit_page(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    Query(q): Query<AuditQuery>,
) -> Response {
    if !session.principal.role.allows(Role::Admin) {
        return refuse(StatusCode::FORBIDDEN, "the audit log is for admins");
    }
    const PAGE: usize = 200;
    let entries = match app.plane.store().audit(q.before, PAGE) {
        Ok(e) => e,
        Err(e) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!(
                    "reading the audit log: {}",
                    rustci_runners::error::Chain(&e)
                ),
            );
        }
    };
    let next = if entries.len() == PAGE {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    let actor = filled(q.actor);
    let action = filled(q.action);
    let shown: Vec<_> = entries
        .into_iter()
        .filter(|e| actor.as_ref().is_none_or(|a| e.actor.contains(a.as_str())))
        .filter(|e| {
            action
                .as_ref()
                .is_none_or(|a| e.action.contains(a.as_str()))
        })
        .collect();
    pages::audit(&session, &shown, actor.as_deref(), action.as_deref(), next).into_response()
}

async fn cancel(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Err(why) = check_form(&app, &headers, &session, &form.csrf) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    if !session.principal.role.allows(Role::Submitter) {
        return refuse(StatusCode::FORBIDDEN, "a viewer may not cancel jobs");
    }
    match cancel_as(&app, &session.principal, &rid, &id) {
        Ok(_) => Redirect::to(&format!("/jobs/{}?done=cancelled", urlencode(&id))).into_response(),
        Err(e) => refuse(e.status(), e.message()),
    }
}

async fn runner_action(
    State(app): State<Arc<App>>,
    axum::Extension(session): axum::Extension<Session>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Err(why) = check_form(&app, &headers, &session, &form.csrf) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    if !session.principal.role.allows(Role::Operator) {
        return refuse(
            StatusCode::FORBIDDEN,
            "only operators and admins act on runners",
        );
    }
    let done =
        match action.as_str() {
            "drain" => runner_change(&app, &session.principal, &rid, &id, "runner.drain")
                .map(|_| "drained"),
            "resume" => runner_change(&app, &session.principal, &rid, &id, "runner.resume")
                .map(|_| "resumed"),
            "health" => match app.plane.registry().get(&id) {
                Some(_) => {
                    app.plane.check_runner_soon(&id);
                    audit(
                        &app,
                        &session.principal.name,
                        "runner.health",
                        Some(&id),
                        "ok",
                        &rid.0,
                    );
                    Ok("checked")
                }
                None => return refuse(StatusCode::NOT_FOUND, &format!("no runner with id {id:?}")),
            },
            _ => return refuse(StatusCode::NOT_FOUND, "no such action"),
        };
    match done {
        Ok(code) => Redirect::to(&format!("/runners?done={code}")).into_response(),
        Err(e) => refuse(e.status(), e.message()),
    }
}

/// Milliseconds since the Unix epoch of `t`.
pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_on_this_server_are_returned_to() {
        assert_eq!(local_path(Some("/jobs?state=failed")), "/jobs?state=failed");
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "https://evil.example/",
            "evil",
        ] {
            assert_eq!(local_path(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(local_path(None), "/");
    }

    fn principal(name: &str) -> Principal {
        Principal {
            name: name.into(),
            role: Role::Viewer,
            token_labels: Vec::new(),
            token_id: None,
        }
    }

    #[test]
    fn one_key_cannot_push_out_the_sessions_of_others() {
        let s = Sessions::new(Duration::from_secs(3600));
        let (admin, _) = s.create(principal("key:admin"));
        let mine: Vec<String> = (0..MAX_SESSIONS_PER_KEY + 5)
            .map(|_| s.create(principal("key:viewer")).0)
            .collect();
        assert!(s.get(&admin).is_some(), "another key's session stays");
        assert!(s.get(mine.last().unwrap()).is_some());
        let live = mine.iter().filter(|id| s.get(id).is_some()).count();
        assert_eq!(live, MAX_SESSIONS_PER_KEY);
        s.end(&admin);
        assert!(s.get(&admin).is_none());
        // An absurd lifetime is capped rather than overflowing.
        let long = Sessions::new(Duration::from_secs(u64::MAX));
        assert_eq!(long.ttl(), MAX_TTL);
        assert!(long.get(&long.create(principal("key:x")).0).is_some());
    }
}
