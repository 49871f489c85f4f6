//! # rustci-runners-k8s
//!
//! The Kubernetes backend of rustci-runners. It will hold `KubernetesRunner`: one Pod per
//! job through kube, driven by a shared watch, with secrets in a Kubernetes Secret, full
//! pod options and a leftover sweep, plus the fake API server its tests run against.
//! Until then this crate only reserves the name and its place in the facade's `k8s` feature.

#![deny(missing_docs)]
