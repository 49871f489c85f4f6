//! The test image for container runners: `FROM scratch` plus a static busybox, built
//! once per machine.

use super::*;

/// The image that tests of container runners use: `FROM scratch` plus a static busybox,
/// so that no registry is needed.
pub const BUSYBOX_IMAGE: &str = "rustci-busybox:local";

/// Makes sure the local Docker engine has [`BUSYBOX_IMAGE`], building it with the `docker`
/// CLI from this host's static busybox (Debian's `busybox-static`) when it is missing.
/// Test processes running in parallel build it once: the others wait on a file lock and
/// find it. The error says what is missing (the engine, busybox, or why the build failed).
pub fn busybox_image() -> Result<&'static str, String> {
    use std::process::Command;
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let lock = std::fs::File::create(std::env::temp_dir().join("rustci-test-image.lock"))
            .map_err(|e| format!("lock file: {e}"))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        let engine = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .map_err(|e| format!("docker CLI: {e}"))?;
        if !engine.status.success() {
            return Err(format!(
                "the engine is unreachable: {}",
                String::from_utf8_lossy(&engine.stderr).trim()
            ));
        }
        let have = Command::new("docker")
            .args(["image", "inspect", BUSYBOX_IMAGE])
            .output()
            .map_err(|e| format!("docker CLI: {e}"))?;
        if have.status.success() {
            return Ok(());
        }
        let dir = tempfile_dir()?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("no busybox binary (install Debian's busybox-static)")?;
        let result = (|| {
            std::fs::copy(busybox, dir.join("busybox")).map_err(|e| e.to_string())?;
            std::fs::write(
                dir.join("Dockerfile"),
                "FROM scratch\nLABEL rustci.test-image=true\nCOPY busybox /bin/busybox\n\
                 RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n\
                 CMD [\"/bin/sh\"]\n",
            )
            .map_err(|e| e.to_string())?;
            let out = Command::new("docker")
                .args(["build", "-q", "-t", BUSYBOX_IMAGE])
                .arg(&dir)
                .output()
                .map_err(|e| format!("docker build: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "docker build failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    });
    result.clone().map(|()| BUSYBOX_IMAGE)
}

/// [`busybox_image`] for a test: `None` after printing a `SKIPPED` line when there is no
/// usable engine, but a panic when `RUSTCI_REQUIRE_DOCKER` is set (as CI does).
pub fn busybox_image_or_skip() -> Option<&'static str> {
    match busybox_image() {
        Ok(image) => Some(image),
        Err(e) if std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some() => {
            panic!("RUSTCI_REQUIRE_DOCKER is set but: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no usable Docker engine: {e}");
            None
        }
    }
}

/// A fresh private directory under the system's temporary directory.
pub(crate) fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("rustci-image-{}", JobId::new()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// True when the tests run as root. Otherwise prints `SKIPPED: <what> needs root`, or
/// panics when `RUSTCI_REQUIRE_ROOT` is set (as `.ci/run` does). Switching users needs
/// root, and so does the suite's leftover check for container runners: their processes
/// belong to other users, whose environments only root can read.
pub fn requires_root(what: &str) -> bool {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return true;
    }
    if std::env::var_os("RUSTCI_REQUIRE_ROOT").is_some() {
        panic!("RUSTCI_REQUIRE_ROOT is set but the tests run as uid {euid}: {what} needs root");
    }
    eprintln!("SKIPPED: {what} needs root");
    false
}
