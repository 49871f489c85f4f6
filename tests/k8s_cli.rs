//! `rustci run FILE --runner kubernetes` against the standalone fake cluster, as the README
//! shows a person without a cluster: start `rustci-fake-cluster`, point `KUBECONFIG` at the
//! file it writes, run jobs, stop it with SIGTERM, and nothing is left on the engine.
//!
//! Without a Docker engine the test prints `SKIPPED`; with `RUSTCI_REQUIRE_DOCKER` set (as
//! `.ci/run` does) that is a failure instead.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const IMAGE: &str = rustci_runners::testkit::BUSYBOX_IMAGE;

fn fake_cluster_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_rustci")).with_file_name("rustci-fake-cluster")
}

struct Fake {
    child: std::process::Child,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rustci(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rustci"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUSTCI_K8S_NAMESPACE", "rustci")
        .env_remove("RUSTCI_K8S_CONTEXT")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn rustci_runs_jobs_on_the_standalone_fake_cluster() {
    if rustci_runners::testkit::busybox_image_or_skip().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let binary = fake_cluster_binary();
    assert!(binary.exists(), "{} is not built", binary.display());
    let mut child = Command::new(&binary)
        .args(["--port", "0", "--namespace", "rustci", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut fake = Fake { child };
    let mut lines = BufReader::new(stdout).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("kubeconfig written to");
        said.push(line);
        if done {
            break;
        }
    }
    assert!(kubeconfig.exists(), "no kubeconfig; the fake said {said:?}");
    assert!(
        said.iter()
            .any(|l| l.starts_with("listening on https://127.0.0.1:")),
        "{said:?}"
    );
    let cluster_id = said
        .iter()
        .find_map(|l| l.strip_prefix("cluster "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no cluster id in {said:?}"))
        .to_string();

    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "name: on-k8s\nimage: {IMAGE}\nsecrets: {{TOKEN: s3cr3t-cli}}\nsteps:\n  - run: echo \"hello $TOKEN\"; echo warn >&2\n  - command: [sh, -c, 'exit 3']\n"
        ),
    )
    .unwrap();
    let (code, out, err) = rustci(
        &kubeconfig,
        &["run", job.to_str().unwrap(), "--runner", "kubernetes"],
    );
    assert_eq!(code, 3, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "hello ***\n");
    // The step's stderr after its header line.
    assert!(err.starts_with("── step 1/2 \"step-1\"\nwarn\n"), "{err}");
    assert!(err.contains("on kubernetes runner kubernetes"), "{err}");

    let (code, out, err) = rustci(&kubeconfig, &["runners"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kubernetes"), "{out}");

    // SIGTERM: the fake stops, removing every container it made.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(fake.child.id() as i32, libc::SIGTERM) };
    let status = fake.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=rustci.fake-cluster={cluster_id}"))
        .output()
        .unwrap();
    assert!(left.status.success());
    assert_eq!(String::from_utf8_lossy(&left.stdout), "", "containers left");
}
