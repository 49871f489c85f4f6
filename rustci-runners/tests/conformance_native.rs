//! The conformance suite against NativeRunner, plain and with namespaces where permitted.

use std::time::Duration;

use rustci_runners::testkit::Target;
use rustci_runners::{NativeConfig, NativeRunner};

fn target() -> Target {
    let mut config = NativeConfig::default();
    config.host.name = "native-conformance".into();
    config.host.termination_grace = Duration::from_secs(1);
    Target::new(NativeRunner::new(config).expect("native runner"))
}

rustci_runners::conformance_tests!(target());
