//! The Quick Start, as a user runs it: the server with no configuration, then
//! `scripts/runners/manage-runners.sh setup|test|status`, then the `rustci` CLI against it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server in `cwd` with no configuration but a free port; returns it, its
/// URL and every line it printed before listening.
fn start(cwd: &Path) -> (Proc, String, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustci-server"))
        .current_dir(cwd)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("RUSTCI_ADMIN_KEY")
        .env_remove("RUSTCI_CONFIG")
        .env_remove("RUSTCI_DATA_DIR")
        .env("RUSTCI_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let url = loop {
        let line = lines.next().expect("server output").unwrap();
        if let Some(url) = line.strip_prefix("rustci-server: listening on ") {
            break url.to_string();
        }
        printed.push(line);
    };
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), url, printed)
}

fn script(cwd: &Path, url: &str, command: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/runners/manage-runners.sh");
    Command::new(script)
        .arg(command)
        .current_dir(cwd)
        .env("RUSTCI_SERVER", url)
        .env("RUNNER_NAME", "qs-runner")
        .env("RUNNER_LABELS", "quick,start")
        .env_remove("RUSTCI_ADMIN_KEY")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn quick_start_works_with_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url, printed) = start(dir.path());
    // The generated admin key is printed once and stored in the data directory.
    let key = std::fs::read_to_string(dir.path().join("rustci-data/admin.key")).unwrap();
    assert!(
        printed.iter().any(|l| l.contains(key.trim())),
        "{printed:?}"
    );
    let mode = std::fs::metadata(dir.path().join("rustci-data/admin.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);

    let setup = script(dir.path(), &url, "setup");
    assert!(setup.status.success(), "{}", text(&setup.stderr));
    assert!(text(&setup.stdout).contains("registered runner qs-runner (native)"));
    let test = script(dir.path(), &url, "test");
    assert!(
        test.status.success(),
        "{}{}",
        text(&test.stdout),
        text(&test.stderr)
    );
    assert!(text(&test.stdout).contains("rustci-runner-ok"));
    let status = script(dir.path(), &url, "status");
    assert!(status.status.success(), "{}", text(&status.stderr));
    let listing = text(&status.stdout);
    for name in ["qs-runner", "local", "native"] {
        assert!(listing.contains(name), "{listing}");
    }

    // The CLI: submit and follow, list, show.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rustci"))
            .args(args)
            .current_dir(dir.path())
            .env("RUSTCI_SERVER", &url)
            .env("RUSTCI_API_KEY", key.trim())
            .output()
            .unwrap()
    };
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "name: cli\nsteps:\n  - run: echo from-cli\n  - run: exit 7\n",
    )
    .unwrap();
    let out = cli(&["submit", job.to_str().unwrap(), "--follow"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from-cli\n");
    let out = cli(&["jobs", "list"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("cli") && text(&out.stdout).contains("failed"));
    let out = cli(&["runners", "list", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["runners"].as_array().unwrap().len() >= 3);
    let out = Command::new(env!("CARGO_BIN_EXE_rustci"))
        .args(["jobs", "list", "--server", &url])
        .current_dir(dir.path())
        .env_remove("RUSTCI_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("AUTHENTICATION_REQUIRED"));

    // HTTPS by default: away from the data directory the CLI needs the CA, and the
    // fingerprint printed at the first start is enough to get it.
    assert!(url.starts_with("https://"), "{url}");
    let elsewhere = tempfile::tempdir().unwrap();
    let away = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rustci"))
            .args(args)
            .current_dir(elsewhere.path())
            .env("RUSTCI_SERVER", &url)
            .env("RUSTCI_API_KEY", key.trim())
            .env_remove("RUSTCI_DATA_DIR")
            .env_remove("RUSTCI_CA")
            .env_remove("RUSTCI_CA_FINGERPRINT")
            .output()
            .unwrap()
    };
    let out = away(&["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--ca-fingerprint"),
        "{}",
        text(&out.stderr)
    );
    let fingerprint = printed
        .iter()
        .find(|l| l.contains("certificate authority"))
        .and_then(|l| l.rsplit(": ").next())
        .expect("the CA fingerprint is printed at the first start")
        .to_string();
    let out = away(&["jobs", "list", "--ca-fingerprint", &fingerprint]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cli"));
    let ca = elsewhere.path().join("ca.pem");
    let out = away(&[
        "ca",
        "fetch",
        "--ca-fingerprint",
        &fingerprint,
        "-o",
        ca.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = away(&["jobs", "list", "--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // manage-runners.sh away from the data directory, with the fingerprint.
    let status = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/runners/manage-runners.sh"),
    )
    .arg("status")
    .current_dir(elsewhere.path())
    .env("RUSTCI_SERVER", &url)
    .env("RUSTCI_ADMIN_KEY", key.trim())
    .env("RUSTCI_CA_FINGERPRINT", &fingerprint)
    .env("RUSTCI_BIN", env!("CARGO_BIN_EXE_rustci"))
    .env_remove("RUSTCI_CA")
    .output()
    .unwrap();
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(text(&status.stdout).contains("qs-runner"));

    // Restarted, it keeps the key and does not print it again.
    drop(server);
    let (_server, url, printed) = start(dir.path());
    assert!(
        printed.iter().all(|l| !l.contains(key.trim())),
        "{printed:?}"
    );
    let status = script(dir.path(), &url, "status");
    assert!(
        text(&status.stdout).contains("qs-runner"),
        "registered runners come back"
    );

    // A failing test job is reported clearly.
    let bad = script(dir.path(), "http://127.0.0.1:1", "test");
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("cannot reach the server"),
        "{}",
        text(&bad.stderr)
    );
}
