//! # rustci-runners-docker
//!
//! The Docker backend of rustci-runners. It will hold `DockerRunner`: one container per
//! job on a Docker engine reached through bollard (local socket, `DOCKER_HOST`, or TCP
//! with TLS client certificates), with pull policies, resource limits, live logs, cleanup
//! by label sweep, and a warm pool. Until then this crate only reserves the name and its
//! place in the facade's `docker` feature.

#![deny(missing_docs)]
