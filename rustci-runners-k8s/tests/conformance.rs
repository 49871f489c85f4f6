//! The conformance suite: KubernetesRunner against the fake cluster, whose kubelet runs
//! every pod on this machine's Docker engine. Each check gets a cluster of its own.
//!
//! Without a reachable engine every test prints `SKIPPED`; with `RUSTCI_REQUIRE_DOCKER`
//! set (as `.ci/run` does) that is a failure instead. The suite against a real cluster is
//! in `tests/real_cluster.rs`.

mod common;

rustci_runners::conformance_tests!(optional: common::target().await);
