//! Remote agents over the Valkyrie protocol: gRPC over HTTP/2 with mutual TLS.
//!
//! - [`Hub`] is the control plane's side: it listens for agents, registers every
//!   runner an agent offers as an ordinary [`Runner`](rustci_runners::Runner) of kind
//!   `valkyrie` in the control plane's registry ([`RemoteRunner`]), and turns a
//!   `start` into an offer over the agent's session. Selection, queueing, retries,
//!   `why_pending`, logs and metrics need no second code path.
//! - [`Agent`] is the other side: it registers once with a registration token, keeps one
//!   session to the control plane and runs what it is offered on its local runners.
//! - [`pki`] is the control plane's private CA (server and agent certificates).
//!
//! The protocol — messages, the state machines of a session and of an attempt, timings,
//! error codes and the compatibility rule — is specified in `docs/valkyrie.md`; the
//! `.proto` is `proto/valkyrie/v1/valkyrie.proto`, and [`proto`] is generated from it
//! (`scripts/gen-valkyrie`).
#![deny(missing_docs)]

use std::time::Duration;

pub mod agent;
mod codec;
mod hub;
mod lease;
pub mod pki;
mod remote;
mod spool;

pub use agent::{Agent, AgentOptions, CaSource};
pub use hub::{Admission, AgentStatus, AgentView, Hub, HubOptions, LISTEN_BACKLOG, listen};
pub use remote::{RemoteRunner, RemoteRunnerConfig, ValkyrieBackend};

/// The generated protocol types and the tonic client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!("gen/valkyrie.v1.rs");
}

/// The protocol version this crate speaks (`Hello.protocol`, `Welcome.protocol`).
pub const PROTOCOL_VERSION: u32 = 2;

/// The runner kind of an agent's runners in the control plane.
pub const KIND: &str = "valkyrie";

/// Largest message either side accepts (a job with its secrets, or an output chunk).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest output chunk an agent sends.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// Most emptied output files the hub and an agent each keep for the attempts to come
/// (see `spool::Spares`).
pub(crate) const MAX_SPARE_FILES: usize = 4096;

/// The timings of leases (see `docs/valkyrie.md`, "Timings").
///
/// An agent renews the leases of all its attempts with every heartbeat the control plane
/// acknowledges. An agent that has had no acknowledgement for [`Timings::self_fence`]
/// (measured from the *sending* of the last acknowledged heartbeat, on its monotonic
/// clock) kills its attempts by itself. The control plane gives an attempt up only
/// after [`Timings::reassign`] without a heartbeat from its agent (measured from the
/// *receipt* of the last one), and `reassign > self_fence` always: by the time a job can
/// be handed to another runner, its previous run has been stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// Least heartbeat interval.
    pub heartbeat: Duration,
    /// Heartbeats the control plane may take in a second, over all agents; with many
    /// agents the interval grows so that this rate holds (`agents / rate`).
    pub heartbeat_rate: u32,
    /// Self-fence time, in heartbeat intervals (at least 2).
    pub self_fence_beats: u32,
    /// The margin the control plane adds before it reassigns.
    pub margin: Duration,
    /// After a control-plane restart, attempts loaded from the store are kept this long
    /// for their agents to reconnect (at least `2 × reassign`).
    pub restart_grace: Duration,
    /// How long an offer waits for its accept.
    pub offer_timeout: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat: Duration::from_secs(5),
            heartbeat_rate: 50,
            self_fence_beats: 3,
            margin: Duration::from_secs(15),
            restart_grace: Duration::from_secs(120),
            offer_timeout: Duration::from_secs(10),
        }
    }
}

impl Timings {
    /// The heartbeat interval with `agents` agents connected.
    pub fn heartbeat_for(&self, agents: usize) -> Duration {
        let rate = self.heartbeat_rate.max(1) as f64;
        self.heartbeat
            .max(Duration::from_secs_f64(agents as f64 / rate))
    }

    /// Self-fence time for a heartbeat interval.
    pub fn self_fence_for(&self, heartbeat: Duration) -> Duration {
        heartbeat * self.self_fence_beats.max(2)
    }

    /// Reassignment time for a heartbeat interval: self-fence plus the margin (and
    /// never less than one more heartbeat).
    pub fn reassign_for(&self, heartbeat: Duration) -> Duration {
        self.self_fence_for(heartbeat) + self.margin.max(heartbeat)
    }

    /// Timings for tests: a 200 ms heartbeat, 600 ms self-fence, 1.2 s reassignment.
    pub fn fast() -> Self {
        Timings {
            heartbeat: Duration::from_millis(200),
            heartbeat_rate: 50,
            self_fence_beats: 3,
            margin: Duration::from_millis(600),
            restart_grace: Duration::from_secs(10),
            offer_timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassignment_always_comes_after_self_fencing() {
        for t in [Timings::default(), Timings::fast()] {
            for agents in [0, 1, 100, 10_000, 1_000_000] {
                let h = t.heartbeat_for(agents);
                assert!(h >= t.heartbeat);
                assert!(t.reassign_for(h) > t.self_fence_for(h));
                assert!(t.reassign_for(h) - t.self_fence_for(h) >= h);
            }
        }
        // 10,000 agents at 50 heartbeats a second: one every 200 s each.
        assert_eq!(
            Timings::default().heartbeat_for(10_000),
            Duration::from_secs(200)
        );
    }
}
