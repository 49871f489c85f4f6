//! The conformance suite against the host runners: `local` (LocalRunner) and `native`
//! (NativeRunner, plain and with namespaces where permitted).

mod local {
    use std::time::Duration;

    use rustci_runners::testkit::Target;
    use rustci_runners::{HostConfig, LocalRunner};

    fn target() -> Target {
        let mut config = HostConfig::named("local-conformance");
        config.termination_grace = Duration::from_secs(1);
        Target::new(LocalRunner::new(config).expect("local runner"))
    }

    rustci_runners::conformance_tests!(target());
}

mod native {
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

    /// The same suite with every namespace (PID, mount, IPC, UTS, network) where the host
    /// permits them; `RUSTCI_REQUIRE_NAMESPACES` makes their absence a failure.
    mod with_namespaces {
        use super::*;
        use rustci_runners::Namespaces;

        fn target() -> Option<Target> {
            let mut config = NativeConfig::default();
            config.host.name = "native-namespaces".into();
            config.host.termination_grace = Duration::from_secs(1);
            config.namespaces = Namespaces::all_but_network();
            config.namespaces.net = true;
            match NativeRunner::new(config) {
                Ok(runner) => Some(Target::new(runner)),
                Err(e) if std::env::var_os("RUSTCI_REQUIRE_NAMESPACES").is_some() => {
                    panic!("RUSTCI_REQUIRE_NAMESPACES is set but: {e}")
                }
                Err(e) => {
                    eprintln!("SKIPPED: {e}");
                    None
                }
            }
        }

        rustci_runners::conformance_tests!(optional: target());
    }
}
