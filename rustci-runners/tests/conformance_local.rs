//! The conformance suite against LocalRunner.

use std::time::Duration;

use rustci_runners::testkit::Target;
use rustci_runners::{HostConfig, LocalRunner};

fn target() -> Target {
    let mut config = HostConfig::named("local-conformance");
    config.termination_grace = Duration::from_secs(1);
    Target::new(LocalRunner::new(config).expect("local runner"))
}

rustci_runners::conformance_tests!(target());
