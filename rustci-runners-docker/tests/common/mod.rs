//! What the Docker runner's tests share: the test image and runners on this machine's
//! engine.

#![allow(dead_code)]

use std::time::Duration;

use rustci_runners::testkit::Target;
use rustci_runners_docker::{DockerConfig, DockerRunner, PullPolicy};

pub const IMAGE: &str = rustci_runners::testkit::BUSYBOX_IMAGE;

pub fn require() -> bool {
    std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some()
}

/// The test image, built when the engine lacks it; `None` (after `SKIPPED`) without an
/// engine, unless the environment demands one.
pub fn image() -> Option<&'static str> {
    rustci_runners::testkit::busybox_image_or_skip()
}

/// The test runner's configuration: short grace, never pull.
pub fn config() -> DockerConfig {
    let mut c = DockerConfig::default();
    c.name = "docker-tests".into();
    c.termination_grace = Duration::from_secs(1);
    c.pull_policy = PullPolicy::Never;
    c
}

/// A runner on the local engine with [`config`] adjusted by `f`; `None` (after
/// `SKIPPED`) without an engine, unless the environment demands one.
pub async fn runner_with(f: impl FnOnce(&mut DockerConfig)) -> Option<DockerRunner> {
    image()?;
    let mut c = config();
    f(&mut c);
    match DockerRunner::connect(c).await {
        Ok(r) => Some(r),
        Err(e) if require() => panic!("RUSTCI_REQUIRE_DOCKER is set but: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

/// The conformance target: a runner with the default test configuration and the test
/// image; `None` (after `SKIPPED`) without an engine or without root.
pub async fn target() -> Option<Target> {
    if !rustci_runners::testkit::requires_root(
        "the conformance suite's leftover check on container processes",
    ) {
        return None;
    }
    Some(Target::new(runner_with(|_| {}).await?).with_image(IMAGE))
}
