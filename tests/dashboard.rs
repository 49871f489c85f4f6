//! The web dashboard in a real headless Chromium, driven over WebDriver (chromedriver):
//! sign-in, a job's log appearing live with colours, the state badge following the job,
//! cancel and drain from the pages, why-pending naming the drain, a viewer without
//! buttons, escaping of user text (asserted on the DOM), CSRF refusals (a forged
//! cross-site form and hand-made requests) and session expiry. Screenshots of each page
//! go to `target/dashboard-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver`: without them the tests are skipped
//! with a message, unless `RUSTCI_REQUIRE_BROWSER=1` (CI), which makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use rustci::client::ApiClient;
use rustci::server::{ApiKeyConfig, Role, RunnerConfig, Server, ServerConfig};
use serde_json::{Value, json};

const ADMIN: &str = "admin-key-0123456789abcdef";
const VIEWER: &str = "viewer-key-0123456789abcdef";
const SUBMITTER: &str = "submitter-key-0123456789abcdef";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser tools, or `None` (skipped) when absent and not required.
fn browser_present() -> bool {
    let present = Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists();
    if !present {
        if std::env::var("RUSTCI_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("RUSTCI_REQUIRE_BROWSER=1 but {CHROMEDRIVER} or {CHROMIUM} is missing");
        }
        eprintln!(
            "SKIPPED: no {CHROMEDRIVER} / {CHROMIUM} (apt-get install chromium chromium-driver)"
        );
    }
    present
}

/// chromedriver on a port of its own, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed before closing its session leaves the browser running: its
        // processes carry this driver's profile directory.
        for pid in browser_pids(self._profile.path(), "") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Processes whose command line names `profile` and contains `marker`.
fn browser_pids(profile: &Path, marker: &str) -> Vec<i32> {
    let profile = profile.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(&profile) && cmdline.contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

async fn driver() -> Driver {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let d = Driver {
        child,
        port,
        _profile: tempfile::tempdir().unwrap(),
    };
    common::wait_for("chromedriver listens", 20, async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    d
}

async fn browser(d: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--ignore-certificate-errors", "--window-size=1280,900",
                "--enable-precise-memory-info", "--js-flags=--expose-gc",
                format!("--user-data-dir={}", d._profile.path().display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.port))
        .await
        .expect("a browser session")
}

struct TestServer {
    server: Option<Server>,
    dir: tempfile::TempDir,
}

async fn server(ttl_secs: u64) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.path().join("data");
    config.admin_key = Some(ADMIN.into());
    config.api_keys.push(
        serde_json::from_value::<ApiKeyConfig>(
            json!({"name": "viewer", "key": VIEWER, "role": Role::Viewer}),
        )
        .unwrap(),
    );
    config.api_keys.push(
        serde_json::from_value::<ApiKeyConfig>(
            json!({"name": "submitter", "key": SUBMITTER, "role": Role::Submitter}),
        )
        .unwrap(),
    );
    config.health_interval_secs = 1;
    config.shutdown_grace_secs = 5;
    config.session_ttl_secs = ttl_secs;
    let mut r = RunnerConfig::new("local-a", "local");
    r.slots = Some(4);
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    r.workspace_root = Some(ws);
    config.runners = vec![r];
    let server = Server::start(config).await.expect("server starts");
    TestServer {
        server: Some(server),
        dir,
    }
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.as_ref().unwrap().url())
    }
    fn admin(&self) -> ApiClient {
        ApiClient::of(self.server.as_ref().unwrap(), Some(ADMIN.into())).unwrap()
    }
    fn anonymous(&self) -> ApiClient {
        ApiClient::of(self.server.as_ref().unwrap(), None).unwrap()
    }
    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// Signs in with `key` by hand; returns the `Cookie` header value.
async fn cookie_for(anon: &ApiClient, key: &str) -> String {
    let r = anon
        .request(
            "POST",
            "/login",
            Some((
                "application/x-www-form-urlencoded",
                format!("key={key}").into_bytes(),
            )),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 303, "signed in");
    r.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// The CSRF token in the page at `path` (its sign-out form has it).
async fn csrf_in(anon: &ApiClient, cookie: &str, path: &str) -> String {
    let r = anon
        .request("GET", path, None, &[("cookie", cookie)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{path}");
    let html = String::from_utf8_lossy(&r.body).to_string();
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..at + 64].to_string()
}

async fn form_post(anon: &ApiClient, cookie: &str, path: &str, csrf: &str) -> u16 {
    anon.request(
        "POST",
        path,
        Some((
            "application/x-www-form-urlencoded",
            format!("csrf={csrf}").into_bytes(),
        )),
        &[("cookie", cookie)],
    )
    .await
    .unwrap()
    .status
}

async fn submit(api: &ApiClient, job: Value) -> String {
    let r = api.post_json("/api/jobs", &job).await.unwrap();
    assert_eq!(r.status, 201, "submit: {}", r.error_message());
    r.json()["id"].as_str().unwrap().to_string()
}

async fn job_state(api: &ApiClient, id: &str) -> String {
    let r = api.get(&format!("/api/jobs/{id}")).await.unwrap();
    r.json()["state"].as_str().unwrap_or_default().to_string()
}

/// Runs `script` in the page until it returns something other than null/false.
async fn until_js(c: &Client, what: &str, script: &str) -> Value {
    common::wait_for(what, 30, async || match c.execute(script, vec![]).await {
        Ok(Value::Null) | Ok(Value::Bool(false)) => None,
        Ok(v) => Some(v),
        Err(_) => None,
    })
    .await
}

fn shots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let d = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("a screenshot");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

async fn sign_in(c: &Client, t: &TestServer, key: &str) {
    c.goto(&t.url("/")).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert_eq!(
        url.path(),
        "/login",
        "a page without a session sends to sign-in"
    );
    c.find(Locator::Id("key"))
        .await
        .unwrap()
        .send_keys(key)
        .await
        .unwrap();
    c.find(Locator::Css("form.login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_js(
        c,
        "the overview after sign-in",
        "return location.pathname === '/' && document.getElementById('queued') !== null",
    )
    .await;
}

async fn session_cookie(c: &Client) -> String {
    let cookies = c.get_all_cookies().await.unwrap();
    let cookie = cookies
        .iter()
        .find(|k| k.name() == "rustci_session")
        .expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie.secure(),
        Some(true),
        "over HTTPS the cookie is Secure"
    );
    assert_eq!(
        cookie.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict")
    );
    cookie.value().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_jobs_live_and_its_actions_are_guarded() {
    if !browser_present() {
        return;
    }
    let t = server(3600).await;
    let api = t.admin();
    let d = driver().await;
    let c = browser(&d).await;

    // Sign-in: the login page first, then the overview.
    c.goto(&t.url("/login")).await.unwrap();
    shot(&c, "login").await;
    sign_in(&c, &t, ADMIN).await;
    let cookie = session_cookie(&c).await;

    // A job whose log comes in two parts, the second after the page is open.
    let gate = t.dir.path().join("gate");
    let script = format!(
        "printf '\\033[32mfirst line\\033[0m\\n'; \
         while [ ! -e {gate} ]; do sleep 0.05; done; \
         printf 'second <b>not bold</b>\\n'; printf '10%%\\r50%%\\r100%%\\n'; \
         echo '<script>alert(1)</script>'",
        gate = gate.display()
    );
    let id = submit(
        &api,
        json!({"name": "live-log", "steps": [{"name": "<img src=x onerror=alert(2)>", "run": script}]}),
    )
    .await;
    c.goto(&t.url(&format!("/jobs/{id}"))).await.unwrap();
    c.execute("window.__sameDocument = 'yes'", vec![])
        .await
        .unwrap();
    until_js(
        &c,
        "the first line, green, live",
        "const s = [...document.querySelectorAll('#log span.f2')]; \
         return s.some(e => e.textContent === 'first line')",
    )
    .await;
    let state = until_js(
        &c,
        "the badge says running",
        "const b = document.querySelector('h1 .badge'); \
         return b && b.dataset.state === 'running' ? b.textContent : null",
    )
    .await;
    assert_eq!(state, "running");
    std::fs::write(&gate, b"").unwrap();
    let lines = until_js(
        &c,
        "the rest of the log, and the badge turning to succeeded without a reload",
        "const b = document.querySelector('h1 .badge'); \
         if (!b || b.dataset.state !== 'succeeded') return null; \
         if (window.__sameDocument !== 'yes') return 'reloaded'; \
         const lines = [...document.querySelectorAll('#log .line')].map(l => l.textContent); \
         return lines.includes('<script>alert(1)</script>') ? lines : null",
    )
    .await;
    let lines: Vec<String> = serde_json::from_value(lines).expect("no reload happened");
    let text: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        text,
        [
            "first line",
            "second <b>not bold</b>",
            "100%",
            "<script>alert(1)</script>"
        ],
        "in order; the \\r progress line shows what a terminal shows last"
    );
    // Escaped: the log's and the step's markup are text, not elements.
    let dom = c
        .execute(
            "return [document.querySelectorAll('#log b').length, \
                     document.querySelectorAll('main script, main img').length, \
                     document.querySelector('pre.spec').textContent.includes('<img src=x onerror=alert(2)>')]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(dom, json!([0, 0, true]));
    until_js(
        &c,
        "the attempts section shows the outcome once the job ended",
        "const a = document.getElementById('attempts'); \
         return a && a.textContent.includes('succeeded') && !a.textContent.includes('running') \
           && window.__sameDocument === 'yes'",
    )
    .await;
    shot(&c, "job").await;
    // At a phone's width the page fits without scrolling sideways (the log wraps).
    c.set_window_size(390, 844).await.unwrap();
    let fits = until_js(
        &c,
        "the job page laid out at a phone's width",
        "return window.innerWidth <= 400 \
           ? [document.documentElement.scrollWidth, document.documentElement.clientWidth] : null",
    )
    .await;
    assert!(
        fits[0].as_u64() <= fits[1].as_u64(),
        "no sideways scroll: {fits}"
    );
    shot(&c, "job-phone").await;
    c.set_window_size(1280, 900).await.unwrap();

    // stdout and stderr, kept apart by the runner, are told apart in the page.
    let both = submit(
        &api,
        json!({"name": "two-streams", "steps": [{"run": "echo on-stdout; echo on-stderr >&2"}]}),
    )
    .await;
    c.goto(&t.url(&format!("/jobs/{both}"))).await.unwrap();
    let marked = until_js(
        &c,
        "both lines, stderr marked",
        "const lines = [...document.querySelectorAll('#log .line')]; \
         const out = lines.find(l => l.textContent === 'on-stdout'); \
         const err = lines.find(l => l.textContent === 'on-stderr'); \
         if (!out || !err) return null; \
         return [out.querySelectorAll('.err').length, \
                 [...err.querySelectorAll('.err')].map(e => e.textContent).join('')]",
    )
    .await;
    assert_eq!(marked, json!([0, "on-stderr"]));

    // Cancel from the page.
    let sleeper = submit(
        &api,
        json!({"name": "sleeper", "steps": [{"run": "sleep 60"}]}),
    )
    .await;
    c.goto(&t.url(&format!("/jobs/{sleeper}"))).await.unwrap();
    until_js(
        &c,
        "the sleeper runs",
        "const b = document.querySelector('h1 .badge'); return b && b.dataset.state === 'running'",
    )
    .await;
    // A forged request with the session's cookie but not its token, or from another
    // origin with the token, is refused; the job keeps running.
    let csrf = c
        .find(Locator::Css("#cancel input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let anon = t.anonymous();
    let cookie_header = format!("rustci_session={cookie}");
    let path = format!("/jobs/{sleeper}/cancel");
    let no_token = anon
        .request(
            "POST",
            &path,
            Some(("application/x-www-form-urlencoded", b"csrf=".to_vec())),
            &[("cookie", &cookie_header)],
        )
        .await
        .unwrap();
    assert_eq!(no_token.status, 403);
    let foreign = anon
        .request(
            "POST",
            &path,
            Some((
                "application/x-www-form-urlencoded",
                format!("csrf={csrf}").into_bytes(),
            )),
            &[
                ("cookie", &cookie_header),
                ("origin", "https://evil.example"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(foreign.status, 403);
    // The API takes no cookie for a change at all.
    let api_with_cookie = anon
        .request(
            "POST",
            &format!("/api{path}"),
            None,
            &[("cookie", &cookie_header)],
        )
        .await
        .unwrap();
    assert_eq!(api_with_cookie.status, 401);
    assert_eq!(job_state(&api, &sleeper).await, "running");
    // A cross-site page's form, in the browser, arrives without the session (the cookie
    // is SameSite=Strict) and is refused.
    let target = t.url(&path);
    let evil = forged_site(&target).await;
    c.goto(&evil).await.unwrap();
    c.find(Locator::Id("go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let answer = until_js(
        &c,
        "the forged form's answer",
        "return location.pathname.endsWith('/cancel') && document.readyState === 'complete' \
           ? document.body.textContent : null",
    )
    .await;
    assert!(
        answer.as_str().unwrap().contains("sign in again"),
        "refused for want of a session: {answer}"
    );
    assert_eq!(job_state(&api, &sleeper).await, "running");
    // A submitter, with its own session and token, may not cancel another's job.
    let submitter = cookie_for(&anon, SUBMITTER).await;
    let token = csrf_in(&anon, &submitter, "/jobs").await;
    assert_eq!(form_post(&anon, &submitter, &path, &token).await, 403);
    assert_eq!(
        form_post(&anon, &submitter, "/runners/local-a/drain", &token).await,
        403
    );
    assert_eq!(job_state(&api, &sleeper).await, "running");
    // The page's own button works.
    c.goto(&t.url(&format!("/jobs/{sleeper}"))).await.unwrap();
    c.execute("window.__sameDocument = 'yes'", vec![])
        .await
        .unwrap();
    c.find(Locator::Css("#cancel button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_js(
        &c,
        "the badge says cancelled",
        "const b = document.querySelector('h1 .badge'); return b && b.dataset.state === 'cancelled'",
    )
    .await;
    assert_eq!(job_state(&api, &sleeper).await, "cancelled");

    // Drain from the runners page: a new job then waits, its why-pending names the drain.
    let checks = until_js(
        &c,
        "the runners page shows the runner's health checks with their latency",
        "if (location.pathname !== '/runners') { location.href = '/runners'; return null; } \
         const ok = document.querySelectorAll('td.checks .check.ok'); \
         return ok.length >= 2 ? [...ok].map(e => e.getAttribute('title')) : null",
    )
    .await;
    for title in checks.as_array().unwrap() {
        let title = title.as_str().unwrap();
        assert!(
            title.contains("healthy in ") && title.contains(" ms"),
            "{title}"
        );
    }
    c.goto(&t.url("/runners")).await.unwrap();
    shot(&c, "runners").await;
    c.find(Locator::Css("td.actions form[action$='/drain'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_js(
        &c,
        "the runner shows draining",
        "return [...document.querySelectorAll('#runners .badge')].some(b => b.textContent === 'draining')",
    )
    .await;
    let waiting = submit(&api, json!({"name": "waits", "steps": [{"run": "true"}]})).await;
    let why = until_js(
        &c,
        "the queue page names the drain",
        &format!(
            "if (location.pathname !== '/queue') {{ location.href = '/queue'; return null; }} \
             const row = [...document.querySelectorAll('#queue tr')].find(r => r.textContent.includes('{waiting}')); \
             const why = row && row.querySelector('.why').textContent; \
             return why && why.includes('draining') ? why : null"
        ),
    )
    .await;
    assert!(why.as_str().unwrap().contains("draining"), "{why}");
    shot(&c, "queue").await;
    c.goto(&t.url("/runners")).await.unwrap();
    c.find(Locator::Css("td.actions form[action$='/resume'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    common::wait_for("the waiting job runs after resume", 30, async || {
        (job_state(&api, &waiting).await == "succeeded").then_some(())
    })
    .await;

    // The other pages render.
    c.goto(&t.url("/jobs")).await.unwrap();
    let rows = c.find_all(Locator::Css("#jobs tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 4);
    shot(&c, "jobs").await;
    // The runner column links to that runner's jobs; an unknown runner has none.
    c.find(Locator::Css("#jobs tbody tr td:last-child a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let filtered = c.current_url().await.unwrap();
    assert_eq!(filtered.query(), Some("runner=local-a"));
    assert_eq!(
        c.find_all(Locator::Css("#jobs tbody tr"))
            .await
            .unwrap()
            .len(),
        4
    );
    c.goto(&t.url("/jobs?runner=elsewhere")).await.unwrap();
    assert!(
        c.find_all(Locator::Css("#jobs tbody tr"))
            .await
            .unwrap()
            .is_empty()
    );
    c.goto(&t.url("/audit")).await.unwrap();
    let audit = c
        .find(Locator::Id("audit"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        audit.contains("job.cancel") && audit.contains("runner.drain"),
        "{audit}"
    );
    shot(&c, "audit").await;
    c.goto(&t.url("/")).await.unwrap();
    shot(&c, "overview").await;
    let finished = c
        .find(Locator::Id("finished"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(finished, "4");

    // Sign out: the cookie no longer opens a page.
    c.find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_js(
        &c,
        "the sign-in page",
        "return location.pathname === '/login'",
    )
    .await;
    let after = anon
        .request("GET", "/jobs", None, &[("cookie", &cookie_header)])
        .await
        .unwrap();
    assert_eq!(after.status, 303, "signed out");

    // A viewer sees no buttons.
    sign_in(&c, &t, VIEWER).await;
    c.goto(&t.url("/runners")).await.unwrap();
    let buttons = c
        .execute(
            "return [document.querySelector('h1').textContent, \
                     document.querySelectorAll('#runners tbody tr').length, \
                     document.querySelectorAll('main form').length, \
                     document.querySelectorAll('td.actions').length]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        buttons,
        json!(["Runners", 1, 0, 0]),
        "the page, its runner, no button"
    );
    let running = submit(
        &api,
        json!({"name": "viewed", "steps": [{"run": "sleep 60"}]}),
    )
    .await;
    c.goto(&t.url(&format!("/jobs/{running}"))).await.unwrap();
    let title = c
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(title.starts_with("viewed"), "{title}");
    assert!(
        c.find(Locator::Id("cancel")).await.is_err(),
        "no cancel button"
    );
    // The routes refuse a viewer even with its own session and token.
    let viewer = cookie_for(&anon, VIEWER).await;
    let token = csrf_in(&anon, &viewer, "/jobs").await;
    let cancel = format!("/jobs/{running}/cancel");
    assert_eq!(form_post(&anon, &viewer, &cancel, &token).await, 403);
    assert_eq!(
        form_post(&anon, &viewer, "/runners/local-a/drain", &token).await,
        403
    );
    assert_eq!(job_state(&api, &running).await, "running");
    c.goto(&t.url("/audit")).await.unwrap();
    let refused = c
        .find(Locator::Css("main"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(refused.contains("for admins"), "{refused}");
    let nav = c
        .find(Locator::Css("nav"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!nav.contains("Audit"), "{nav}");
    api.request("POST", &format!("/api/jobs/{running}/cancel"), None, &[])
        .await
        .unwrap();

    c.close().await.unwrap();
    drop(d);
    t.stop().await;
}

/// A page on another origin (plain HTTP, another port) with a form that posts to
/// `target`; returns its URL.
async fn forged_site(target: &str) -> String {
    let page = format!(
        "<!doctype html><title>forged</title><form method=post action=\"{target}\">\
         <input type=hidden name=csrf value=guess><button id=go>win a prize</button></form>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_expiry() {
    if !browser_present() {
        return;
    }
    let t = server(1).await;
    let d = driver().await;
    let c = browser(&d).await;
    sign_in(&c, &t, ADMIN).await;
    let cookie = format!("rustci_session={}", session_cookie(&c).await);
    let anon = t.anonymous();
    let fresh = anon
        .request("GET", "/jobs", None, &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(fresh.status, 200, "the session works at first");
    // The time passing is what is tested: the session lasts one second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The server ends it (not only the browser, which drops the cookie at its Max-Age).
    let late = anon
        .request("GET", "/jobs", None, &[("cookie", &cookie)])
        .await
        .unwrap();
    assert_eq!(late.status, 303);
    assert_eq!(late.headers["location"], "/login?next=/jobs");
    c.goto(&t.url("/jobs")).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert_eq!(url.path(), "/login", "an expired session sends to sign-in");
    assert_eq!(url.query(), Some("next=/jobs"));
    c.close().await.unwrap();
    drop(d);
    t.stop().await;
}

/// A 50 MB log: the page opens at its tail, follows what comes after, and keeps the
/// browser's memory bounded however long the log is: at most 5,001 lines in the page,
/// a JavaScript heap under 64 MiB, and the browser's renderer processes under 256 MiB
/// (proportional set size after a garbage collection; about 200 MiB measured, of which
/// 90 MiB are renderers of the browser itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_log_loads_and_follows_in_bounded_memory() {
    if !browser_present() {
        return;
    }
    let t = server(3600).await;
    let api = t.admin();
    let d = driver().await;
    let c = browser(&d).await;
    sign_in(&c, &t, ADMIN).await;
    let gate = t.dir.path().join("gate");
    // 45 MB before the page opens, 5 MB while it follows (lines of 100 bytes).
    let line = "x".repeat(91);
    let script = format!(
        "seq -f 'a%08g {line}' 1 450000; \
         while [ ! -e {gate} ]; do sleep 0.05; done; \
         seq -f 'b%08g {line}' 1 50000; echo 'the very end'",
        gate = gate.display()
    );
    let id = submit(&api, json!({"name": "big-log", "steps": [{"run": script}]})).await;
    common::wait_for("45 MB of log stored", 120, async || {
        let r = api
            .get(&format!("/api/jobs/{id}/logs?offset=44999900"))
            .await
            .unwrap();
        (!r.body.is_empty()).then_some(())
    })
    .await;
    c.goto(&t.url(&format!("/jobs/{id}"))).await.unwrap();
    until_js(
        &c,
        "the page shows the tail of the first part",
        "return [...document.querySelectorAll('#log .line')].some(l => l.textContent.startsWith('a00450000'))",
    )
    .await;
    std::fs::write(&gate, b"").unwrap();
    let seen = until_js(
        &c,
        "the followed part up to its last line",
        "const lines = document.querySelectorAll('#log .line'); \
         const texts = [...lines].map(l => l.textContent); \
         return texts.includes('the very end') ? texts.length : null",
    )
    .await;
    assert!(
        seen.as_u64().unwrap() <= 5001,
        "at most 5,000 lines and the notice stay in the page: {seen}"
    );
    let (heap, notice) = {
        let v = c
            .execute(
                "return [performance.memory.usedJSHeapSize, \
                         document.querySelector('#log .trimmed').textContent]",
                vec![],
            )
            .await
            .unwrap();
        (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_string())
    };
    assert!(heap < 64 << 20, "JavaScript heap {heap} bytes");
    assert!(notice.contains("earlier lines left the page"), "{notice}");
    // The browser's renderer processes as a whole (DOM, layout, heaps), proportional
    // set size, once garbage is collected: what the page holds, not what it threw away.
    let before = renderer_pss(&d);
    c.execute("window.gc(); window.gc();", vec![])
        .await
        .unwrap();
    let pss = renderer_pss(&d);
    assert!(pss > 0, "found the browser's renderer processes");
    assert!(pss < 256 << 20, "renderers' memory {} MiB", pss >> 20);
    eprintln!(
        "50 MB log: {seen} lines in the page, JavaScript heap {} KiB, renderers' PSS {} MiB after a GC ({} MiB before)",
        heap >> 10,
        pss >> 20,
        before >> 20
    );
    shot(&c, "big-log").await;
    c.close().await.unwrap();
    drop(d);
    t.stop().await;
}

/// Proportional set size of the renderer processes of this driver's browser (its
/// profile directory is on their command lines).
fn renderer_pss(d: &Driver) -> u64 {
    browser_pids(d._profile.path(), "--type=renderer")
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|rollup| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .sum()
}

/// 10,000 jobs page correctly: newest first, every job once, in order, to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_page_in_order_without_gaps() {
    if !browser_present() {
        return;
    }
    let t = server(3600).await;
    // Written to the store as a server that ran them would have left them.
    let store = t.server.as_ref().unwrap().app().plane.store().clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::task::spawn_blocking(move || {
        for i in 0..10_000u64 {
            let r: rustci::control::JobRecord = serde_json::from_value(json!({
                "id": format!("job{i:05}"),
                "job": {"name": format!("n{}", i % 7), "steps": [{"run": "true"}]},
                "submitter": "key:admin",
                "state": "succeeded",
                "attempts": [],
                "why_pending": null,
                "outcome": {"result": "succeeded"},
                "submitted_at": now - 100_000 + i,
                "finished_at": now - 50_000 + i,
            }))
            .unwrap();
            store.put_job(&r).unwrap();
        }
    })
    .await
    .unwrap();
    let d = driver().await;
    let c = browser(&d).await;
    sign_in(&c, &t, ADMIN).await;
    // The default page: the 50 newest.
    c.goto(&t.url("/jobs")).await.unwrap();
    let first = page_ids(&c).await;
    let want: Vec<String> = (9950..10_000).rev().map(|i| format!("job{i:05}")).collect();
    assert_eq!(first, want);
    // Walk every page of 500 by its "Older" link.
    let all = walk_pages(&c, &t.url("/jobs?limit=500")).await;
    let want: Vec<String> = (0..10_000).rev().map(|i| format!("job{i:05}")).collect();
    assert_eq!(all.len(), 10_000);
    assert!(all == want, "every job once, newest first");
    // A filter pages too: one name in seven.
    let named = walk_pages(&c, &t.url("/jobs?name=n3&limit=500")).await;
    let want: Vec<String> = (0..10_000)
        .rev()
        .filter(|i| i % 7 == 3)
        .map(|i| format!("job{i:05}"))
        .collect();
    assert_eq!(named, want);
    c.close().await.unwrap();
    drop(d);
    t.stop().await;
}

/// The job ids of every page from `url` on, following each page's "Older" link.
async fn walk_pages(c: &Client, url: &str) -> Vec<String> {
    c.goto(url).await.unwrap();
    let mut ids = Vec::new();
    loop {
        ids.extend(page_ids(c).await);
        match c.find(Locator::Css("a[rel=next]")).await {
            Ok(next) => next.click().await.unwrap(),
            Err(_) => return ids,
        }
    }
}

async fn page_ids(c: &Client) -> Vec<String> {
    let v = c
        .execute(
            "return [...document.querySelectorAll('#jobs tbody tr td:first-child code')].map(e => e.textContent)",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}
