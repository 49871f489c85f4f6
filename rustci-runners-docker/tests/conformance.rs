//! The conformance suite: DockerRunner on the real engine of this machine, with the test
//! image `rustci-busybox:local` (built when the engine lacks it).
//!
//! Without a reachable engine every test prints `SKIPPED`; with `RUSTCI_REQUIRE_DOCKER`
//! set (as `.ci/run` does) that is a failure instead.

mod common;

rustci_runners::conformance_tests!(optional: common::target().await);
