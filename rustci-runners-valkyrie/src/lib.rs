//! # rustci-runners-valkyrie
//!
//! The Valkyrie backend of rustci-runners. It will hold the Valkyrie protocol: remote
//! agents that connect to the control plane over TLS, register with a signed token,
//! heartbeat, receive jobs and stream their output back, and the control-plane side that
//! presents each agent as a `Runner`. Until then this crate only reserves the name and its
//! place in the facade's `valkyrie` feature.

#![deny(missing_docs)]
