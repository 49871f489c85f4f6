//! The lease decisions of both sides, as pure functions (see `docs/valkyrie.md`,
//! "Attempts, fencing and leases" and "Reconnection").
//!
//! No I/O, no clock reads, no locks: every instant and duration is passed in. The hub
//! ([`crate::hub`]) and the agent ([`crate::agent`]) call these where they decide, and
//! the model test below drives one control plane and a few agents through the same
//! functions on a virtual clock.
//!
//! - The control plane holds an attempt for one agent (`holder`); it accepts messages
//!   about an attempt only from that agent ([`holds`]), answers a reconnecting agent's
//!   held attempts with a [`verdict`], loses at once the attempts a reconnecting agent no
//!   longer lists ([`lost_at_reconnect`]), gives up the attempts of an agent silent for
//!   longer than the reassignment time ([`lease_expired`]) and the attempts taken up after
//!   a restart whose agent did not come back in time ([`grace_over`]), and takes a
//!   completion only for the current attempt once all its output is stored
//!   ([`completion`]).
//! - The agent renews its lease with each acknowledged heartbeat, from the moment it
//!   *sent* it ([`renewed`]), and kills its attempts once the lease is older than the
//!   self-fence time ([`must_fence`]).

use std::time::{Duration, Instant};

use crate::proto::Verdict;

/// True when the attempt whose holder at the control plane is `holder` (`None`: the
/// control plane has no such live attempt) is held by `agent`: the only case in which a
/// message of `agent` about it is taken. Anything else (superseded, cancelled, lost,
/// withdrawn or unknown) is refused.
pub(crate) fn holds(holder: Option<&str>, agent: &str) -> bool {
    holder == Some(agent)
}

/// The welcome's verdict for one attempt a reconnecting `agent` lists as held: CONTINUE
/// when the control plane still holds it for that agent, DONE when it already stores its
/// outcome (`done`), ABORT otherwise (superseded, lost or unknown).
pub(crate) fn verdict(holder: Option<&str>, agent: &str, done: bool) -> Verdict {
    if holds(holder, agent) {
        Verdict::Continue
    } else if done {
        Verdict::Done
    } else {
        Verdict::Abort
    }
}

/// True when a live attempt of `holder` is lost at once because `agent` reconnected
/// without listing it (`listed`): the process that ran it is gone (a new boot id) or the
/// agent forgot it. Attempts of other agents are not affected.
pub(crate) fn lost_at_reconnect(holder: &str, agent: &str, listed: bool) -> bool {
    holder == agent && !listed
}

/// Since when the control plane counts an agent silent: its last heartbeat (receipt
/// time, or its hello), but never before `since` (the start of its session, the end of
/// it, or the control plane's own start).
pub(crate) fn silent_since(last_beat: Option<Instant>, since: Instant) -> Instant {
    last_beat.map_or(since, |b| b.max(since))
}

/// True when the control plane gives up an agent's attempts at `now`: it has been silent
/// (see [`silent_since`]) for longer than `reassign` (`Timings::reassign_for` of its
/// heartbeat interval, which is always longer than the agent's self-fence time).
pub(crate) fn lease_expired(
    last_beat: Option<Instant>,
    since: Instant,
    reassign: Duration,
    now: Instant,
) -> bool {
    now.saturating_duration_since(silent_since(last_beat, since)) > reassign
}

/// True when an attempt taken up after a control-plane restart, kept for its agent
/// `until` (recovery plus the restart grace), is given up at `now`.
pub(crate) fn grace_over(until: Instant, now: Instant) -> bool {
    now > until
}

/// The agent's lease after the acknowledgement of a heartbeat it sent at `acked_sent`:
/// measured from the sending of the newest acknowledged heartbeat (or hello), so a late
/// acknowledgement of an older heartbeat never moves it back.
pub(crate) fn renewed(current: Option<Instant>, acked_sent: Instant) -> Instant {
    current.map_or(acked_sent, |r| r.max(acked_sent))
}

/// True when the agent must fence itself at `now`: its lease (`renewed`, see
/// [`renewed`]; `None` before its first welcome) has not been renewed for longer than
/// the self-fence time. It then kills its running attempts (their outcome is `lost`) and
/// ends a session that gets no acknowledgements.
pub(crate) fn must_fence(renewed: Option<Instant>, self_fence: Duration, now: Instant) -> bool {
    renewed.is_some_and(|r| now.saturating_duration_since(r) > self_fence)
}

/// What the control plane does with a `Complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The attempt is not (or no longer) the current one: the completion decides
    /// nothing and is answered with `Abort`.
    Refuse,
    /// Output is still on its way: not acknowledged; the agent completes again.
    Wait,
    /// Stored: this completion decides the attempt's outcome, and is acknowledged.
    Accept,
}

/// Whether a completion claiming `length` bytes of output is taken, for an attempt that
/// is the `current` one (still held, not ended or replaced) with `stored` bytes stored.
pub(crate) fn completion(current: bool, stored: u64, length: u64) -> Completion {
    if !current {
        Completion::Refuse
    } else if stored < length {
        Completion::Wait
    } else {
        Completion::Accept
    }
}

/// A model of the lease protocol on a virtual clock: one control plane, two or three
/// agents and a few jobs, driven by random interleavings of offers, accepts, rejects,
/// output, completions, heartbeats, delivery delays, partitions, agent crashes and
/// restarts (new boot id), control-plane restarts, stale messages and time passing.
/// Both sides decide only through the functions above (and the real [`Timings`]).
///
/// After every action and every delivered message or timer, it checks:
/// - (a) no job has two attempts running (started, not finished, not fenced, not
///   aborted, on a live agent) at the same instant;
/// - (b) each job's outcome is decided by at most one attempt: a completion is accepted
///   only for the job's current attempt, at most once, once all its output is stored,
///   and a job that finished with an outcome of its own has exactly one accepted
///   completion, the one that decided it;
/// - (c) every message about an attempt that is not the current one of its sender
///   (superseded, lost, withdrawn, another agent's) is refused;
/// - (d) (in the property itself) the reassignment time is longer than the self-fence
///   time for the heartbeat intervals in use.
///
/// The network: each session has its streams (session and output, each way); a message
/// is delivered in order after a delay of at most D, shorter than the margin `R − F`, or
/// lost with its connection. A partition breaks an agent's connections without telling
/// either side and keeps it from connecting for a while.
///
/// An offer not accepted within `Timings::offer_timeout` is withdrawn: aborted, and its
/// job placed again only once the agent says it no longer runs it (`Released`, a reject
/// or a completion), reconnects without it, or stays away past the reassignment time
/// (what `HubInner::offer` does). Placing it again at once lets a job run twice
/// (`placing_a_withdrawn_offer_again_at_once_lets_a_job_run_twice`).
///
/// Simplifications: a crashed agent's running jobs die with it; killing a job takes no
/// time (no termination grace); the agents' and the control plane's clocks run at the
/// same rate.
///
/// [`Timings`]: crate::Timings
#[cfg(test)]
mod model {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::time::{Duration, Instant};

    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

    use super::{
        Completion, completion, grace_over, holds, lease_expired, lost_at_reconnect, must_fence,
        renewed, verdict,
    };
    use crate::Timings;
    use crate::proto::Verdict;

    const NAMES: [&str; 3] = ["agent-0", "agent-1", "agent-2"];
    /// A job whose attempts were lost this many times ends `lost`.
    const MAX_LOST: u32 = 8;
    /// How long an agent waits for its welcome (as `run_session` does).
    const WELCOME_WITHIN: Duration = Duration::from_secs(10);
    /// The agent's self-fence time before its first welcome (as `Agent::start` sets).
    const FIRST_FENCE: Duration = Duration::from_secs(15);

    /// (job index, attempt number).
    type Key = (usize, u32);

    /// The channels of a session: the session stream each way, the output stream each way.
    const UP: u8 = 0;
    const DOWN: u8 = 1;
    const OUT_UP: u8 = 2;
    const OUT_DOWN: u8 = 3;

    /// How the simulated control plane decides what is not a lease function.
    #[derive(Clone, Copy)]
    struct Rules {
        /// The reassignment time for a heartbeat interval (the real one:
        /// [`Timings::reassign_for`]).
        reassign: fn(&Timings, Duration) -> Duration,
        /// What happens to an offer not accepted within `Timings::offer_timeout`.
        withdraw: Withdraw,
        /// Which attempts a `Released` (or a late `Reject`) of their agent ends.
        release: Release,
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Release {
        /// Any attempt the control plane holds for that agent (the real rule,
        /// `HubInner::release` and `release_running`).
        AnyPhase,
        /// Only a withdrawn offer (what the control plane once did).
        WithdrawnOnly,
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Withdraw {
        /// Aborted, and its job placed again once the agent no longer runs it (the real
        /// rule, `HubInner::offer`).
        UntilReleased,
        /// Aborted, and its job placed again at once.
        AtOnce,
    }

    /// The real rules.
    const LEASES: Rules = Rules {
        reassign: Timings::reassign_for,
        withdraw: Withdraw::UntilReleased,
        release: Release::AnyPhase,
    };

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Outcome {
        Succeeded,
        Failed,
        Lost,
        RunnerError,
    }

    impl Outcome {
        /// An outcome that ends the job (the others retry it).
        fn decisive(self) -> bool {
            matches!(self, Outcome::Succeeded | Outcome::Failed)
        }
    }

    /// What happens next. An `agent` picks among the agents the action applies to (those
    /// with an offered attempt for `Accept`, …), so few actions are wasted.
    #[derive(Clone, Copy, Debug)]
    enum Action {
        /// The dispatcher offers a queued job (`job` picks which) to an agent the control
        /// plane has a session with.
        Dispatch { job: u8, agent: u8 },
        /// The agent's local runner has started its oldest offered attempt: it runs, and
        /// the agent accepts.
        Accept { agent: u8 },
        /// The agent's local runner could not start its oldest offered attempt: rejected.
        Reject { agent: u8 },
        /// The agent's first running attempt writes output (and a step event).
        Output { agent: u8, bytes: u8 },
        /// The agent's first running attempt writes its last output and ends by itself.
        /// With `early`, the agent sends its completion at once, before the output is
        /// acknowledged (as a less careful agent may).
        Finish {
            agent: u8,
            bytes: u8,
            succeeded: bool,
            early: bool,
        },
        /// The agent's connections break, and none can be made for `quarters` × h/4.
        /// With `busy`, the agent is one running a job (if any is).
        Partition { agent: u8, quarters: u8, busy: bool },
        /// The agent crashes (its running jobs die with it) and restarts, with a new
        /// boot id, `quarters` × h/4 later.
        Crash { agent: u8, quarters: u8 },
        /// The control plane crashes and is back `quarters` × h/4 later.
        HubRestart { quarters: u8 },
        /// The agent sends a message about an attempt of `job` that is not its current
        /// one (superseded, or another agent's): an accept, a reject, an event, a
        /// completion, an output chunk or a release (`kind`).
        Stale {
            agent: u8,
            job: u8,
            pick: u8,
            kind: u8,
        },
        /// The agent sends the completion of its first finished attempt now, before its
        /// output is acknowledged (as a less careful agent may).
        EarlyComplete { agent: u8 },
        /// Time passes: `sixteenths` × h/16.
        Advance { sixteenths: u8 },
        /// Much time passes: `beats` × h.
        Sleep { beats: u8 },
    }

    #[derive(Clone, Debug)]
    struct Case {
        fast: bool,
        /// The dispatcher places queued jobs at each sweep, and agents start what they
        /// are offered at once (as the real ones do); otherwise only `Dispatch` and
        /// `Accept` do.
        eager: bool,
        agents: usize,
        jobs: usize,
        /// The bound D on delivery delays, in sixteenths of the margin `R − F` (1 to 15:
        /// always shorter than the margin).
        bound: u32,
        /// Delivery delays, as fractions (/255) of the delay bound, used in turn; also
        /// the agents' reconnection delays (fractions of 2h) and the eager dispatcher's
        /// choice of agent.
        delays: Vec<u8>,
        actions: Vec<Action>,
    }

    impl Case {
        fn timings(&self) -> Timings {
            if self.fast {
                Timings::fast()
            } else {
                Timings::default()
            }
        }
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            10 => (0u8..=64).prop_map(|sixteenths| Action::Advance { sixteenths }),
            1 => (0u8..=60).prop_map(|beats| Action::Sleep { beats }),
            1 => any::<u8>().prop_map(|agent| Action::EarlyComplete { agent }),
            4 => (any::<u8>(), any::<u8>()).prop_map(|(job, agent)| Action::Dispatch { job, agent }),
            4 => any::<u8>().prop_map(|agent| Action::Accept { agent }),
            1 => any::<u8>().prop_map(|agent| Action::Reject { agent }),
            2 => (any::<u8>(), 1u8..=255).prop_map(|(agent, bytes)| Action::Output { agent, bytes }),
            1 => (any::<u8>(), 0u8..=3, any::<bool>(), any::<bool>())
                .prop_map(|(agent, bytes, succeeded, early)| Action::Finish { agent, bytes, succeeded, early }),
            2 => (any::<u8>(), outage(), any::<bool>())
                .prop_map(|(agent, quarters, busy)| Action::Partition { agent, quarters, busy }),
            1 => (any::<u8>(), outage()).prop_map(|(agent, quarters)| Action::Crash { agent, quarters }),
            1 => outage().prop_map(|quarters| Action::HubRestart { quarters }),
            2 => (any::<u8>(), any::<u8>(), any::<u8>(), 0u8..6)
                .prop_map(|(agent, job, pick, kind)| Action::Stale { agent, job, pick, kind }),
        ]
    }

    /// How long an outage lasts, in quarters of a heartbeat: mostly around the self-fence
    /// (3h) and reassignment (6h) times, sometimes past the restart grace (24h or 50h).
    fn outage() -> impl Strategy<Value = u8> {
        prop_oneof![4 => 0u8..=48, 1 => any::<u8>()]
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            (any::<bool>(), any::<bool>()),
            2usize..=3,
            1usize..=3,
            prop_oneof![3 => 1u32..=5, 1 => 6u32..=15],
            vec(any::<u8>(), 1..16),
            vec(action(), 1..250),
        )
            .prop_map(
                |((fast, eager), agents, jobs, bound, delays, actions)| Case {
                    fast,
                    eager,
                    agents,
                    jobs,
                    bound,
                    delays,
                    actions,
                },
            )
    }

    /// Agent → control plane.
    #[derive(Clone, Debug)]
    enum Up {
        Hello {
            held: BTreeMap<Key, u64>,
        },
        Beat {
            seq: u64,
            running: Vec<Key>,
        },
        Accept(Key),
        Reject(Key),
        Event(Key),
        Complete {
            key: Key,
            length: u64,
            outcome: Outcome,
        },
        Chunk {
            key: Key,
            offset: u64,
            len: u64,
        },
        /// The agent no longer holds the attempt (it stopped an aborted one, or never
        /// held it).
        Released(Key),
    }

    /// Control plane → agent.
    #[derive(Clone, Debug)]
    enum Down {
        Welcome {
            verdicts: Vec<(Key, Verdict, u64)>,
            heartbeat: Duration,
            self_fence: Duration,
        },
        Ack(u64),
        Offer(Key),
        Abort(Key),
        CompleteAck(Key),
        ChunkAck {
            key: Key,
            offset: u64,
            error: bool,
            abort: bool,
        },
    }

    #[derive(Clone, Debug)]
    enum Ev {
        ToHub {
            sid: u64,
            msg: Up,
        },
        ToAgent {
            sid: u64,
            msg: Down,
        },
        /// An agent's heartbeat tick in session `sid`.
        Beat {
            agent: usize,
            boot: u32,
            sid: u64,
        },
        /// An agent's `fence_watch` tick, checking against the self-fence time it read
        /// before its sleep.
        Fence {
            agent: usize,
            boot: u32,
            fence: Duration,
        },
        /// An agent's session loop connects.
        Connect {
            agent: usize,
            boot: u32,
        },
        WelcomeTimeout {
            agent: usize,
            boot: u32,
            sid: u64,
        },
        AgentBoot {
            agent: usize,
        },
        /// The control plane's sweep (of its run `epoch`).
        Sweep {
            epoch: u32,
        },
        OfferTimeout {
            epoch: u32,
            key: Key,
            sid: u64,
        },
        HubUp,
    }

    struct Link {
        agent: usize,
        dead: bool,
    }

    struct Local {
        /// Offered order (the oldest offered one starts first).
        order: u64,
        /// The local runner started it.
        started: bool,
        /// (outcome, length) once it ended.
        finished: Option<(Outcome, u64)>,
        /// Stopped by the self-fence.
        interrupted: bool,
        aborted: bool,
        spooled: u64,
        acked: u64,
        sent: u64,
        complete_sent: Option<Instant>,
    }

    struct AgentSession {
        id: u64,
        heartbeat: Duration,
        seq: u64,
        sent_at: BTreeMap<u64, Instant>,
    }

    struct AgentM {
        up: bool,
        boot: u32,
        attempts: BTreeMap<Key, Local>,
        renewed: Option<Instant>,
        self_fence: Duration,
        session: Option<AgentSession>,
        /// (session, when its hello was sent) while waiting for the welcome.
        connecting: Option<(u64, Instant)>,
        offered: u64,
    }

    impl AgentM {
        fn running(&self, key: &Key) -> bool {
            self.up
                && self.attempts.get(key).is_some_and(|a| {
                    a.started && a.finished.is_none() && !a.interrupted && !a.aborted
                })
        }

        fn first_running(&self) -> Option<Key> {
            self.attempts.keys().find(|k| self.running(k)).copied()
        }

        fn oldest_offered(&self) -> Option<Key> {
            self.attempts
                .iter()
                .filter(|(_, a)| !a.started)
                .min_by_key(|(_, a)| a.order)
                .map(|(k, _)| *k)
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Phase {
        Offered,
        /// Not accepted in time, aborted; kept until its agent no longer runs it.
        Withdrawn,
        Running,
        Reattached(Instant),
    }

    struct AttemptM {
        agent: usize,
        phase: Phase,
        stored: u64,
    }

    struct AgentLive {
        session: Option<u64>,
        last_beat: Option<Instant>,
        since: Instant,
        heartbeat: Duration,
        lost: bool,
    }

    struct HubM {
        up: bool,
        epoch: u32,
        agents: Vec<AgentLive>,
        attempts: BTreeMap<Key, AttemptM>,
        /// Attempts whose outcome is stored (durable).
        done: BTreeSet<Key>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum JobState {
        Queued,
        Running(u32),
        Finished { outcome: Outcome, by: Option<u32> },
    }

    struct JobM {
        state: JobState,
        next: u32,
        lost: u32,
    }

    /// What happened over a run (to show the model is not vacuous).
    #[derive(Clone, Copy, Debug, Default)]
    struct Stats {
        cases: u64,
        events: u64,
        offers: u64,
        accepted_completions: u64,
        decided_jobs: u64,
        /// Attempts started while another agent still held an earlier attempt of the
        /// same job (what (a) is about).
        started_while_held_elsewhere: u64,
        waits: u64,
        reassigned: u64,
        fenced: u64,
        grace_over: u64,
        lost_at_reconnect: u64,
        /// Messages about attempts not current for their sender, refused.
        stale_refused: u64,
        verdicts_continue: u64,
        verdicts_done: u64,
        verdicts_abort: u64,
        /// Offers withdrawn, and withdrawn attempts given back once their agent no longer
        /// ran them.
        withdrawn: u64,
        withdrawn_released: u64,
        /// Attempts held as running (or taken up after a restart) that their agent
        /// released or refused.
        released_running: u64,
        /// Cases settled for (e).
        settled: u64,
    }

    impl Stats {
        fn add(&mut self, o: &Stats) {
            self.cases += o.cases;
            self.events += o.events;
            self.offers += o.offers;
            self.accepted_completions += o.accepted_completions;
            self.decided_jobs += o.decided_jobs;
            self.started_while_held_elsewhere += o.started_while_held_elsewhere;
            self.waits += o.waits;
            self.reassigned += o.reassigned;
            self.fenced += o.fenced;
            self.grace_over += o.grace_over;
            self.lost_at_reconnect += o.lost_at_reconnect;
            self.stale_refused += o.stale_refused;
            self.verdicts_continue += o.verdicts_continue;
            self.verdicts_done += o.verdicts_done;
            self.verdicts_abort += o.verdicts_abort;
            self.withdrawn += o.withdrawn;
            self.withdrawn_released += o.withdrawn_released;
            self.released_running += o.released_running;
            self.settled += o.settled;
        }
    }

    struct Sim {
        rules: Rules,
        eager: bool,
        t: Timings,
        /// The heartbeat interval the control plane gives agents.
        h: Duration,
        /// The bound on a message's delivery delay (shorter than the margin `R − F`).
        d: Duration,
        base: Instant,
        now: Duration,
        delays: Vec<u8>,
        next_delay: usize,
        seq: u64,
        events: BTreeMap<(Duration, u64), Ev>,
        /// The last delivery time on each (session, channel): delivery is in order.
        fifo: HashMap<(u64, u8), Duration>,
        links: HashMap<u64, Link>,
        next_sid: u64,
        partitioned_until: Vec<Duration>,
        agents: Vec<AgentM>,
        hub: HubM,
        jobs: Vec<JobM>,
        /// Ground truth: the agent each attempt was offered to.
        offered_to: HashMap<Key, usize>,
        /// Every completion the control plane accepted.
        accepted: Vec<(Key, Outcome)>,
        violations: Vec<String>,
        stats: Stats,
    }

    impl Sim {
        fn new(c: &Case, rules: Rules) -> Sim {
            let t = c.timings();
            let h = t.heartbeat_for(c.agents);
            let d = (t.reassign_for(h) - t.self_fence_for(h)) * c.bound / 16;
            let base = Instant::now();
            let mut sim = Sim {
                rules,
                eager: c.eager,
                t,
                h,
                d,
                base,
                now: Duration::ZERO,
                delays: c.delays.clone(),
                next_delay: 0,
                seq: 0,
                events: BTreeMap::new(),
                fifo: HashMap::new(),
                links: HashMap::new(),
                next_sid: 0,
                partitioned_until: vec![Duration::ZERO; c.agents],
                agents: (0..c.agents)
                    .map(|_| AgentM {
                        up: true,
                        boot: 1,
                        attempts: BTreeMap::new(),
                        renewed: None,
                        self_fence: FIRST_FENCE,
                        session: None,
                        connecting: None,
                        offered: 0,
                    })
                    .collect(),
                hub: HubM {
                    up: true,
                    epoch: 1,
                    agents: (0..c.agents)
                        .map(|_| AgentLive {
                            session: None,
                            last_beat: None,
                            since: base,
                            heartbeat: t.heartbeat,
                            lost: false,
                        })
                        .collect(),
                    attempts: BTreeMap::new(),
                    done: BTreeSet::new(),
                },
                jobs: (0..c.jobs)
                    .map(|_| JobM {
                        state: JobState::Queued,
                        next: 1,
                        lost: 0,
                    })
                    .collect(),
                offered_to: HashMap::new(),
                accepted: Vec::new(),
                violations: Vec::new(),
                stats: Stats {
                    cases: 1,
                    ..Stats::default()
                },
            };
            for agent in 0..c.agents {
                sim.schedule(Duration::ZERO, Ev::Connect { agent, boot: 1 });
                sim.schedule(
                    Duration::ZERO,
                    Ev::Fence {
                        agent,
                        boot: 1,
                        fence: FIRST_FENCE,
                    },
                );
            }
            sim.schedule(Duration::ZERO, Ev::Sweep { epoch: 1 });
            sim
        }

        /// The virtual instant now.
        fn at(&self) -> Instant {
            self.base + self.now
        }

        fn schedule(&mut self, after: Duration, ev: Ev) {
            self.seq += 1;
            self.events.insert((self.now + after, self.seq), ev);
        }

        fn fraction(&mut self) -> u32 {
            let f = self.delays[self.next_delay % self.delays.len()];
            self.next_delay += 1;
            f as u32
        }

        /// How long an agent waits before it connects again: a moment (connecting takes
        /// time) plus up to 2h.
        fn backoff(&mut self) -> Duration {
            self.h / 16 + self.h * 2 * self.fraction() / 255
        }

        /// Sends on a session's channel, delivered in order after at most `d`, unless
        /// the connection is broken (then it is lost).
        fn send(&mut self, sid: u64, ch: u8, ev: Ev) {
            if self.links.get(&sid).is_none_or(|l| l.dead) {
                return;
            }
            let delay = self.d * self.fraction() / 255;
            let when =
                (self.now + delay).max(self.fifo.get(&(sid, ch)).copied().unwrap_or_default());
            self.fifo.insert((sid, ch), when);
            self.seq += 1;
            self.events.insert((when, self.seq), ev);
        }

        fn send_up(&mut self, sid: u64, ch: u8, msg: Up) {
            self.send(sid, ch, Ev::ToHub { sid, msg });
        }

        fn send_down(&mut self, sid: u64, ch: u8, msg: Down) {
            self.send(sid, ch, Ev::ToAgent { sid, msg });
        }

        fn kill(&mut self, sid: u64) {
            if let Some(l) = self.links.get_mut(&sid) {
                l.dead = true;
            }
        }

        /// The agent the control plane holds `key` for: none once it is withdrawn (as
        /// `AttemptLive::holder`).
        fn holder(&self, key: &Key) -> Option<&'static str> {
            self.hub
                .attempts
                .get(key)
                .filter(|a| a.phase != Phase::Withdrawn)
                .map(|a| NAMES[a.agent])
        }

        /// True when `k` is an attempt withdrawn from agent `x`.
        fn withdrawn_from(&self, x: usize, k: &Key) -> bool {
            self.hub
                .attempts
                .get(k)
                .is_some_and(|a| a.agent == x && a.phase == Phase::Withdrawn)
        }

        /// Its agent says it no longer runs withdrawn attempt `k`: the attempt ends, and
        /// its job is placed again (`HubInner::release_withdrawn`).
        fn release_withdrawn(&mut self, k: Key) {
            self.hub.attempts.remove(&k);
            self.stats.withdrawn_released += 1;
            self.end_lost(k, Phase::Withdrawn);
        }

        /// Ground truth: `key` is the job's current attempt, and it was offered to `agent`.
        fn current_for(&self, key: &Key, agent: usize) -> bool {
            self.jobs[key.0].state == JobState::Running(key.1)
                && self.offered_to.get(key) == Some(&agent)
        }

        /// (c): a message of `agent` about `key` that is not its current attempt must be
        /// refused.
        fn refusal(&mut self, key: &Key, agent: usize, refused: bool, what: &str) {
            let current = self.current_for(key, agent);
            if refused && !current {
                self.stats.stale_refused += 1;
            }
            if !current && !refused {
                self.violations.push(format!(
                    "(c) at {:?}: {what} about attempt {} of job {} from {} was taken, but it is not its current attempt (job {:?})",
                    self.now, key.1, key.0, NAMES[agent], self.jobs[key.0].state
                ));
            }
        }

        // ---- the control plane ------------------------------------------------------

        fn finish_job(&mut self, job: usize, outcome: Outcome, by: Option<u32>) {
            if let JobState::Finished { .. } = self.jobs[job].state {
                self.violations.push(format!(
                    "(b) at {:?}: job {job} decided twice ({:?}, then {outcome:?} by {by:?})",
                    self.now, self.jobs[job].state
                ));
            }
            self.jobs[job].state = JobState::Finished { outcome, by };
            self.stats.decided_jobs += 1;
        }

        /// The attempt ended without deciding the job: retried per its policy.
        fn retry(&mut self, job: usize) {
            self.jobs[job].lost += 1;
            if self.jobs[job].lost >= MAX_LOST {
                self.finish_job(job, Outcome::Lost, None);
            } else {
                self.jobs[job].state = JobState::Queued;
            }
        }

        /// The control plane gave the attempt up (`end_lost`, or a withdrawn offer the
        /// agent released or that was placed again at once).
        fn end_lost(&mut self, key: Key, phase: Phase) {
            if self.jobs[key.0].state != JobState::Running(key.1) {
                self.violations.push(format!(
                    "(b) at {:?}: attempt {} of job {} ended while the job is {:?}",
                    self.now, key.1, key.0, self.jobs[key.0].state
                ));
            }
            match phase {
                // Declined: placed again, no retry spent.
                Phase::Offered => self.jobs[key.0].state = JobState::Queued,
                _ => self.retry(key.0),
            }
        }

        fn dispatch(&mut self, job: usize, agent: usize) {
            if !self.hub.up || self.jobs[job].state != JobState::Queued {
                return;
            }
            let Some(sid) = self.hub.agents[agent].session else {
                return;
            };
            let key = (job, self.jobs[job].next);
            self.jobs[job].next += 1;
            self.jobs[job].state = JobState::Running(key.1);
            self.offered_to.insert(key, agent);
            self.hub.attempts.insert(
                key,
                AttemptM {
                    agent,
                    phase: Phase::Offered,
                    stored: 0,
                },
            );
            self.stats.offers += 1;
            self.send_down(sid, DOWN, Down::Offer(key));
            {
                let epoch = self.hub.epoch;
                self.schedule(self.t.offer_timeout, Ev::OfferTimeout { epoch, key, sid });
            }
        }

        fn sweep(&mut self, epoch: u32) {
            if !self.hub.up || epoch != self.hub.epoch {
                return;
            }
            self.schedule(self.t.heartbeat / 2, Ev::Sweep { epoch });
            let now = self.at();
            for i in 0..self.hub.agents.len() {
                let a = &self.hub.agents[i];
                let reassign = (self.rules.reassign)(&self.t, a.heartbeat);
                if lease_expired(a.last_beat, a.since, reassign, now) {
                    if let Some(sid) = self.hub.agents[i].session.take() {
                        self.kill(sid);
                    }
                    self.hub.agents[i].lost = true;
                }
            }
            let gone: Vec<(Key, Phase)> = self
                .hub
                .attempts
                .iter()
                .filter(|(_, at)| match at.phase {
                    Phase::Reattached(until) => grace_over(until, now),
                    _ => self.hub.agents[at.agent].lost,
                })
                .map(|(k, at)| (*k, at.phase))
                .collect();
            for (k, phase) in gone {
                self.hub.attempts.remove(&k);
                match phase {
                    Phase::Reattached(_) => self.stats.grace_over += 1,
                    Phase::Running => self.stats.reassigned += 1,
                    Phase::Offered | Phase::Withdrawn => {}
                }
                self.end_lost(k, phase);
            }
            if self.eager {
                for job in 0..self.jobs.len() {
                    let connected: Vec<usize> = (0..self.hub.agents.len())
                        .filter(|i| self.hub.agents[*i].session.is_some())
                        .collect();
                    if self.jobs[job].state == JobState::Queued && !connected.is_empty() {
                        let agent = connected[self.fraction() as usize % connected.len()];
                        self.dispatch(job, agent);
                    }
                }
            }
        }

        fn start_session(&mut self, x: usize, sid: u64, held: BTreeMap<Key, u64>) {
            let now = self.at();
            let heartbeat = self.t.heartbeat_for(self.agents.len());
            let live = &mut self.hub.agents[x];
            let old = live.session.replace(sid);
            live.last_beat = Some(now);
            live.since = now;
            live.heartbeat = heartbeat;
            live.lost = false;
            if let Some(old) = old.filter(|o| *o != sid) {
                self.kill(old);
            }
            let lost: Vec<(Key, Phase)> = self
                .hub
                .attempts
                .iter()
                .filter(|(k, at)| {
                    lost_at_reconnect(NAMES[at.agent], NAMES[x], held.contains_key(k))
                })
                .map(|(k, at)| (*k, at.phase))
                .collect();
            for (k, phase) in lost {
                self.hub.attempts.remove(&k);
                self.stats.lost_at_reconnect += 1;
                self.end_lost(k, phase);
            }
            let mut verdicts = Vec::new();
            for (k, spooled) in held {
                let v = verdict(self.holder(&k), NAMES[x], self.hub.done.contains(&k));
                let offset = match v {
                    Verdict::Continue => {
                        self.stats.verdicts_continue += 1;
                        let at = self.hub.attempts.get_mut(&k).expect("held");
                        at.phase = Phase::Running;
                        at.stored
                    }
                    Verdict::Done => {
                        self.stats.verdicts_done += 1;
                        spooled
                    }
                    _ => {
                        self.stats.verdicts_abort += 1;
                        0
                    }
                };
                self.refusal(&k, x, v != Verdict::Continue, "a held attempt in a hello");
                verdicts.push((k, v, offset));
            }
            let self_fence = self.t.self_fence_for(heartbeat);
            self.send_down(
                sid,
                DOWN,
                Down::Welcome {
                    verdicts,
                    heartbeat,
                    self_fence,
                },
            );
        }

        fn hub_receives(&mut self, sid: u64, msg: Up) {
            let Some(x) = self.links.get(&sid).map(|l| l.agent) else {
                return;
            };
            if !self.hub.up {
                return;
            }
            if let Up::Hello { held } = msg {
                self.start_session(x, sid, held);
                return;
            }
            if self.hub.agents[x].session != Some(sid) {
                // A closed session's reader has stopped.
                return;
            }
            let me = NAMES[x];
            match msg {
                Up::Hello { .. } => unreachable!(),
                Up::Beat { seq, running } => {
                    self.hub.agents[x].last_beat = Some(self.at());
                    self.send_down(sid, DOWN, Down::Ack(seq));
                    for k in running {
                        let done = self.hub.done.contains(&k);
                        let stray = !done && !holds(self.holder(&k), me);
                        self.refusal(&k, x, stray || done, "a running attempt in a heartbeat");
                        if stray {
                            self.send_down(sid, DOWN, Down::Abort(k));
                        }
                    }
                }
                Up::Accept(k) => {
                    let held = holds(self.holder(&k), me);
                    self.refusal(&k, x, !held, "an accept");
                    if held {
                        let at = self.hub.attempts.get_mut(&k).expect("held");
                        if at.phase == Phase::Offered {
                            at.phase = Phase::Running;
                        }
                    } else {
                        self.send_down(sid, DOWN, Down::Abort(k));
                    }
                }
                Up::Reject(k) if self.withdrawn_from(x, &k) => {
                    // It never ran: declined, as a refusal in time (`refuse_withdrawn`).
                    self.refusal(&k, x, false, "a reject of a withdrawn offer");
                    self.hub.attempts.remove(&k);
                    self.stats.withdrawn_released += 1;
                    self.end_lost(k, Phase::Offered);
                }
                Up::Complete { key: k, .. } if self.withdrawn_from(x, &k) => {
                    // Decides nothing: the agent is told to forget it.
                    self.refusal(&k, x, false, "a completion of a withdrawn offer");
                    self.release_withdrawn(k);
                    self.send_down(sid, DOWN, Down::Abort(k));
                }
                Up::Released(k) if self.withdrawn_from(x, &k) => {
                    self.refusal(&k, x, false, "a release");
                    self.release_withdrawn(k);
                }
                Up::Released(k) => {
                    // Any other attempt held for this agent: it no longer runs there.
                    let taken = self.rules.release == Release::AnyPhase
                        && self.hub.attempts.get(&k).is_some_and(|a| a.agent == x);
                    self.refusal(&k, x, !taken, "a release");
                    if taken {
                        let at = self.hub.attempts.remove(&k).expect("held");
                        self.stats.released_running += 1;
                        self.end_lost(k, at.phase);
                    }
                }
                Up::Reject(k) => {
                    let held = holds(self.holder(&k), me);
                    self.refusal(&k, x, !held, "a reject");
                    if held {
                        let phase = self.hub.attempts[&k].phase;
                        if phase == Phase::Offered || self.rules.release == Release::AnyPhase {
                            self.hub.attempts.remove(&k);
                            self.end_lost(k, phase);
                        }
                    } else {
                        self.send_down(sid, DOWN, Down::Abort(k));
                    }
                }
                Up::Event(k) => {
                    let held = holds(self.holder(&k), me);
                    self.refusal(&k, x, !held, "a step event");
                    if !held {
                        self.send_down(sid, DOWN, Down::Abort(k));
                    }
                }
                Up::Complete {
                    key: k,
                    length,
                    outcome,
                } => {
                    let current = holds(self.holder(&k), me);
                    if !current && self.hub.done.contains(&k) {
                        // Stored already: the agent only missed the ack.
                        self.refusal(&k, x, true, "a completion");
                        self.send_down(sid, DOWN, Down::CompleteAck(k));
                        return;
                    }
                    if current && self.hub.attempts[&k].phase == Phase::Offered {
                        self.refusal(&k, x, true, "a completion");
                        self.send_down(sid, DOWN, Down::Abort(k));
                        return;
                    }
                    let stored = self.hub.attempts.get(&k).map_or(0, |a| a.stored);
                    match completion(current, stored, length) {
                        Completion::Refuse => {
                            self.refusal(&k, x, true, "a completion");
                            self.send_down(sid, DOWN, Down::Abort(k));
                        }
                        Completion::Wait => {
                            self.refusal(&k, x, false, "a completion");
                            self.stats.waits += 1;
                        }
                        Completion::Accept => {
                            self.refusal(&k, x, false, "a completion");
                            if stored < length {
                                self.violations.push(format!(
                                    "(b) at {:?}: a completion of attempt {} of job {} accepted with {stored} of its {length} bytes stored",
                                    self.now, k.1, k.0
                                ));
                            }
                            let outcome = if stored == length {
                                outcome
                            } else {
                                Outcome::RunnerError
                            };
                            self.accept_completion(k, outcome);
                            self.send_down(sid, DOWN, Down::CompleteAck(k));
                        }
                    }
                }
                Up::Chunk {
                    key: k,
                    offset,
                    len,
                } => {
                    let held = holds(self.holder(&k), me);
                    self.refusal(&k, x, !held, "an output chunk");
                    let ack = if !held {
                        Down::ChunkAck {
                            key: k,
                            offset: 0,
                            error: true,
                            abort: !self.hub.done.contains(&k),
                        }
                    } else {
                        let at = self.hub.attempts.get_mut(&k).expect("held");
                        let error = offset != at.stored;
                        if !error {
                            at.stored += len;
                        }
                        Down::ChunkAck {
                            key: k,
                            offset: at.stored,
                            error,
                            abort: false,
                        }
                    };
                    self.send_down(sid, OUT_DOWN, ack);
                }
            }
        }

        fn accept_completion(&mut self, k: Key, outcome: Outcome) {
            if self.jobs[k.0].state != JobState::Running(k.1) {
                self.violations.push(format!(
                    "(b) at {:?}: a completion of attempt {} of job {} accepted while the job is {:?}",
                    self.now, k.1, k.0, self.jobs[k.0].state
                ));
            }
            if self.accepted.iter().any(|(a, _)| *a == k) {
                self.violations.push(format!(
                    "(b) at {:?}: a second completion of attempt {} of job {} accepted",
                    self.now, k.1, k.0
                ));
            }
            self.accepted.push((k, outcome));
            self.stats.accepted_completions += 1;
            self.hub.done.insert(k);
            self.hub.attempts.remove(&k);
            if outcome.decisive() {
                self.finish_job(k.0, outcome, Some(k.1));
            } else {
                self.retry(k.0);
            }
        }

        fn offer_timeout(&mut self, epoch: u32, key: Key, sid: u64) {
            if !self.hub.up || epoch != self.hub.epoch {
                return;
            }
            let Some(at) = self.hub.attempts.get_mut(&key) else {
                return;
            };
            if at.phase != Phase::Offered {
                return;
            }
            self.stats.withdrawn += 1;
            match self.rules.withdraw {
                Withdraw::UntilReleased => at.phase = Phase::Withdrawn,
                Withdraw::AtOnce => {
                    self.hub.attempts.remove(&key);
                    self.end_lost(key, Phase::Withdrawn);
                }
            }
            self.send_down(sid, DOWN, Down::Abort(key));
        }

        fn hub_crash(&mut self, quarters: u8) {
            if !self.hub.up {
                return;
            }
            self.hub.up = false;
            let sids: Vec<u64> = self.links.keys().copied().collect();
            for sid in sids {
                self.kill(sid);
            }
            // The agents see their connections reset and try again.
            for i in 0..self.agents.len() {
                if self.agents[i].up {
                    self.end_agent_session(i);
                }
            }
            self.schedule(self.h * quarters as u32 / 4, Ev::HubUp);
        }

        fn hub_up(&mut self) {
            let now = self.at();
            self.hub.up = true;
            self.hub.epoch += 1;
            for a in &mut self.hub.agents {
                *a = AgentLive {
                    session: None,
                    last_beat: None,
                    since: now,
                    heartbeat: self.t.heartbeat,
                    lost: false,
                };
            }
            // Recovery takes up every attempt the store has running.
            let until = now + self.t.restart_grace;
            for at in self.hub.attempts.values_mut() {
                at.phase = Phase::Reattached(until);
            }
            let epoch = self.hub.epoch;
            self.schedule(Duration::ZERO, Ev::Sweep { epoch });
        }

        // ---- the agents -------------------------------------------------------------

        fn agent_send(&mut self, i: usize, ch: u8, msg: Up) {
            if let Some(sid) = self.agents[i].session.as_ref().map(|s| s.id) {
                self.send_up(sid, ch, msg);
            }
        }

        /// Output not sent yet, and completions due (`output_pump`, `send_completions`).
        fn flush(&mut self, i: usize) {
            let now = self.at();
            let a = &mut self.agents[i];
            let Some(s) = &a.session else {
                return;
            };
            let (sid, every) = (s.id, s.heartbeat);
            let mut out = Vec::new();
            for (k, l) in a.attempts.iter_mut() {
                if l.aborted {
                    continue;
                }
                if l.spooled > l.sent {
                    out.push((
                        OUT_UP,
                        Up::Chunk {
                            key: *k,
                            offset: l.sent,
                            len: l.spooled - l.sent,
                        },
                    ));
                    l.sent = l.spooled;
                }
                if let Some((outcome, length)) = l.finished
                    && l.acked >= length
                    && l.complete_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= every * 2)
                {
                    l.complete_sent = Some(now);
                    out.push((
                        UP,
                        Up::Complete {
                            key: *k,
                            length,
                            outcome,
                        },
                    ));
                }
            }
            for (ch, m) in out {
                self.send_up(sid, ch, m);
            }
        }

        /// The session ends on the agent's side; it connects again after a while.
        fn end_agent_session(&mut self, i: usize) {
            let a = &mut self.agents[i];
            let sid = a
                .session
                .take()
                .map(|s| s.id)
                .or(a.connecting.take().map(|c| c.0));
            for l in a.attempts.values_mut() {
                l.sent = l.acked;
                l.complete_sent = None;
            }
            let boot = a.boot;
            if let Some(sid) = sid {
                self.kill(sid);
            }
            let after = self.backoff();
            self.schedule(after, Ev::Connect { agent: i, boot });
        }

        fn connect(&mut self, i: usize, boot: u32) {
            let a = &self.agents[i];
            if !a.up || a.boot != boot || a.session.is_some() || a.connecting.is_some() {
                return;
            }
            if !self.hub.up || self.now < self.partitioned_until[i] {
                let after = self.backoff();
                self.schedule(after, Ev::Connect { agent: i, boot });
                return;
            }
            self.next_sid += 1;
            let sid = self.next_sid;
            self.links.insert(
                sid,
                Link {
                    agent: i,
                    dead: false,
                },
            );
            let held = a.attempts.iter().map(|(k, l)| (*k, l.spooled)).collect();
            self.agents[i].connecting = Some((sid, self.at()));
            self.send_up(sid, UP, Up::Hello { held });
            self.schedule(
                WELCOME_WITHIN,
                Ev::WelcomeTimeout {
                    agent: i,
                    boot,
                    sid,
                },
            );
        }

        fn welcome_timeout(&mut self, i: usize, boot: u32, sid: u64) {
            let a = &self.agents[i];
            if a.up && a.boot == boot && a.connecting.is_some_and(|c| c.0 == sid) {
                self.end_agent_session(i);
            }
        }

        /// The local runner has started offered attempt `k` (`take_offer`): it runs unless
        /// it was aborted or fenced meanwhile, and the agent accepts.
        fn start(&mut self, i: usize, k: Key) {
            if (0..self.agents.len()).any(|j| {
                j != i && self.agents[j].up && self.agents[j].attempts.keys().any(|o| o.0 == k.0)
            }) {
                self.stats.started_while_held_elsewhere += 1;
            }
            let l = self.agents[i].attempts.get_mut(&k).expect("offered");
            l.started = true;
            let aborted = l.aborted;
            if aborted {
                self.agents[i].attempts.remove(&k);
            } else if l.interrupted {
                l.finished = Some((Outcome::Lost, 0));
            }
            self.agent_send(i, UP, Up::Accept(k));
            if aborted {
                // Stopped at once: the control plane hears it no longer runs.
                self.agent_send(i, UP, Up::Released(k));
            }
            self.flush(i);
        }

        /// Stops an attempt the control plane refuses, and discards it.
        fn agent_abort(&mut self, i: usize, k: &Key) {
            let a = &mut self.agents[i];
            let Some(l) = a.attempts.get_mut(k) else {
                // Not held: said so, for a control plane waiting on a withdrawn offer.
                self.agent_send(i, UP, Up::Released(*k));
                return;
            };
            l.aborted = true;
            if l.started || l.finished.is_some() {
                // Killed (if running) and let go; one still starting is let go when its
                // start returns.
                a.attempts.remove(k);
                self.agent_send(i, UP, Up::Released(*k));
            }
            self.flush(i);
        }

        fn agent_receives(&mut self, sid: u64, msg: Down) {
            let Some(i) = self.links.get(&sid).map(|l| l.agent) else {
                return;
            };
            if !self.agents[i].up {
                return;
            }
            if let Down::Welcome {
                verdicts,
                heartbeat,
                self_fence,
            } = msg
            {
                let Some((_, hello_sent)) = self.agents[i].connecting.filter(|c| c.0 == sid) else {
                    return;
                };
                let a = &mut self.agents[i];
                a.connecting = None;
                a.session = Some(AgentSession {
                    id: sid,
                    heartbeat,
                    seq: 0,
                    sent_at: BTreeMap::new(),
                });
                a.self_fence = self_fence;
                a.renewed = Some(hello_sent);
                for (k, v, offset) in verdicts {
                    match v {
                        Verdict::Continue => {
                            if let Some(l) = self.agents[i].attempts.get_mut(&k) {
                                l.acked = offset;
                                l.sent = offset;
                                l.complete_sent = None;
                            }
                        }
                        Verdict::Done => {
                            self.agents[i].attempts.remove(&k);
                        }
                        _ => self.agent_abort(i, &k),
                    }
                }
                let boot = self.agents[i].boot;
                self.schedule(
                    Duration::ZERO,
                    Ev::Beat {
                        agent: i,
                        boot,
                        sid,
                    },
                );
                self.flush(i);
                return;
            }
            if self.agents[i].session.as_ref().is_none_or(|s| s.id != sid) {
                return;
            }
            match msg {
                Down::Welcome { .. } => unreachable!(),
                Down::Ack(seq) => {
                    let s = self.agents[i].session.as_mut().expect("session");
                    if let Some(at) = s.sent_at.remove(&seq) {
                        let r = self.agents[i].renewed;
                        self.agents[i].renewed = Some(renewed(r, at));
                    }
                }
                Down::Offer(k) => {
                    let a = &mut self.agents[i];
                    if a.attempts.contains_key(&k) {
                        self.agent_send(i, UP, Up::Reject(k));
                        return;
                    }
                    a.offered += 1;
                    let order = a.offered;
                    a.attempts.insert(
                        k,
                        Local {
                            order,
                            started: false,
                            finished: None,
                            interrupted: false,
                            aborted: false,
                            spooled: 0,
                            acked: 0,
                            sent: 0,
                            complete_sent: None,
                        },
                    );
                    if self.eager {
                        self.start(i, k);
                    }
                }
                Down::Abort(k) => self.agent_abort(i, &k),
                Down::CompleteAck(k) => {
                    self.agents[i].attempts.remove(&k);
                }
                Down::ChunkAck {
                    key,
                    offset,
                    error,
                    abort,
                } => {
                    if abort {
                        self.agent_abort(i, &key);
                        return;
                    }
                    if let Some(l) = self.agents[i].attempts.get_mut(&key) {
                        l.acked = l.acked.max(offset);
                        l.sent = if error { l.acked } else { l.sent.max(l.acked) };
                    }
                    self.flush(i);
                }
            }
        }

        fn beat(&mut self, i: usize, boot: u32, sid: u64) {
            let now = self.at();
            let a = &mut self.agents[i];
            if !a.up || a.boot != boot || a.session.as_ref().is_none_or(|s| s.id != sid) {
                return;
            }
            if must_fence(a.renewed, a.self_fence, now) {
                // No acknowledgement for the self-fence time: connect anew.
                self.end_agent_session(i);
                return;
            }
            let s = a.session.as_mut().expect("session");
            s.seq += 1;
            let seq = s.seq;
            s.sent_at.insert(seq, now);
            s.sent_at.retain(|q, _| *q + 64 > seq);
            let every = s.heartbeat;
            let running = a.attempts.keys().copied().collect();
            self.send_up(sid, UP, Up::Beat { seq, running });
            self.flush(i);
            self.schedule(
                every,
                Ev::Beat {
                    agent: i,
                    boot,
                    sid,
                },
            );
        }

        fn fence(&mut self, i: usize, boot: u32, fence: Duration) {
            let now = self.at();
            let a = &mut self.agents[i];
            if !a.up || a.boot != boot {
                return;
            }
            if must_fence(a.renewed, fence, now) {
                for l in a.attempts.values_mut() {
                    if l.finished.is_none() && !l.interrupted {
                        l.interrupted = true;
                        if l.started {
                            l.finished = Some((Outcome::Lost, l.spooled));
                            self.stats.fenced += 1;
                        }
                    }
                }
                self.flush(i);
            }
            let fence = self.agents[i].self_fence;
            self.schedule(
                (fence / 20).max(Duration::from_millis(10)),
                Ev::Fence {
                    agent: i,
                    boot,
                    fence,
                },
            );
        }

        fn crash(&mut self, i: usize, quarters: u8) {
            if !self.agents[i].up {
                return;
            }
            let a = &mut self.agents[i];
            a.up = false;
            let sid = a
                .session
                .take()
                .map(|s| s.id)
                .or(a.connecting.take().map(|c| c.0));
            // What the journal keeps: finished attempts whose completion is not
            // acknowledged. The rest died with the process.
            a.attempts.retain(|_, l| l.finished.is_some() && !l.aborted);
            for l in a.attempts.values_mut() {
                l.acked = 0;
                l.sent = 0;
                l.complete_sent = None;
            }
            if let Some(sid) = sid {
                self.kill(sid);
            }
            self.schedule(self.h * quarters as u32 / 4, Ev::AgentBoot { agent: i });
        }

        fn boot(&mut self, i: usize) {
            let a = &mut self.agents[i];
            a.up = true;
            a.boot += 1;
            a.renewed = None;
            a.self_fence = FIRST_FENCE;
            let boot = a.boot;
            self.schedule(Duration::ZERO, Ev::Connect { agent: i, boot });
            self.schedule(
                Duration::ZERO,
                Ev::Fence {
                    agent: i,
                    boot,
                    fence: FIRST_FENCE,
                },
            );
        }

        fn partition(&mut self, i: usize, quarters: u8) {
            let until = self.now + self.h * quarters as u32 / 4;
            self.partitioned_until[i] = self.partitioned_until[i].max(until);
            let sids: Vec<u64> = self
                .links
                .iter()
                .filter(|(_, l)| l.agent == i && !l.dead)
                .map(|(s, _)| *s)
                .collect();
            for sid in sids {
                self.kill(sid);
            }
        }

        fn stale(&mut self, i: usize, job: usize, pick: u8, kind: u8) {
            if !self.agents[i].up || self.agents[i].session.is_none() {
                return;
            }
            let candidates: Vec<Key> = (1..self.jobs[job].next)
                .map(|n| (job, n))
                .filter(|k| !self.current_for(k, i) && !self.agents[i].attempts.contains_key(k))
                .collect();
            if candidates.is_empty() {
                return;
            }
            let k = candidates[pick as usize % candidates.len()];
            let (ch, msg) = match kind {
                0 => (UP, Up::Accept(k)),
                1 => (UP, Up::Reject(k)),
                2 => (UP, Up::Event(k)),
                3 => (
                    UP,
                    Up::Complete {
                        key: k,
                        length: pick as u64 % 3,
                        outcome: Outcome::Succeeded,
                    },
                ),
                4 => (
                    OUT_UP,
                    Up::Chunk {
                        key: k,
                        offset: 0,
                        len: 1,
                    },
                ),
                _ => (UP, Up::Released(k)),
            };
            self.agent_send(i, ch, msg);
        }

        /// The agent `pick` chooses among the live ones for which `applies` holds.
        fn pick(&self, pick: u8, applies: impl Fn(&AgentM) -> bool) -> Option<usize> {
            let fit: Vec<usize> = (0..self.agents.len())
                .filter(|i| self.agents[*i].up && applies(&self.agents[*i]))
                .collect();
            (!fit.is_empty()).then(|| fit[pick as usize % fit.len()])
        }

        fn act(&mut self, action: Action) -> Result<(), String> {
            let n = self.agents.len();
            let advance = match action {
                Action::Advance { sixteenths } => Some(self.h * sixteenths as u32 / 16),
                Action::Sleep { beats } => Some(self.h * beats as u32),
                _ => None,
            };
            match action {
                Action::Advance { .. } | Action::Sleep { .. } => {
                    let until = self.now + advance.expect("a duration");
                    while let Some(entry) = self.events.first_entry() {
                        if entry.key().0 > until {
                            break;
                        }
                        let ((when, _), ev) = entry.remove_entry();
                        self.now = when;
                        self.stats.events += 1;
                        if self.stats.events > 1_000_000 {
                            return Err(format!("the model loops at {:?}: {ev:?}", self.now));
                        }
                        self.handle(ev);
                        self.check()?;
                    }
                    self.now = until;
                }
                Action::Dispatch { job, agent } => {
                    let queued: Vec<usize> = (0..self.jobs.len())
                        .filter(|j| self.jobs[*j].state == JobState::Queued)
                        .collect();
                    let connected: Vec<usize> = (0..n)
                        .filter(|i| self.hub.agents[*i].session.is_some())
                        .collect();
                    if !queued.is_empty() && !connected.is_empty() {
                        self.dispatch(
                            queued[job as usize % queued.len()],
                            connected[agent as usize % connected.len()],
                        );
                    }
                }
                Action::Accept { agent } => {
                    if let Some(i) = self.pick(agent, |a| a.oldest_offered().is_some())
                        && let Some(k) = self.agents[i].oldest_offered()
                    {
                        self.start(i, k);
                    }
                }
                Action::Reject { agent } => {
                    if let Some(i) = self.pick(agent, |a| a.oldest_offered().is_some())
                        && let Some(k) = self.agents[i].oldest_offered()
                    {
                        self.agents[i].attempts.remove(&k);
                        self.agent_send(i, UP, Up::Reject(k));
                    }
                }
                Action::Output { agent, bytes } => {
                    if let Some(i) = self.pick(agent, |a| a.first_running().is_some())
                        && let Some(k) = self.agents[i].first_running()
                    {
                        let l = self.agents[i].attempts.get_mut(&k).expect("running");
                        l.spooled += bytes as u64;
                        self.agent_send(i, UP, Up::Event(k));
                        self.flush(i);
                    }
                }
                Action::Finish {
                    agent,
                    bytes,
                    succeeded,
                    early,
                } => {
                    if let Some(i) = self.pick(agent, |a| a.first_running().is_some())
                        && let Some(k) = self.agents[i].first_running()
                    {
                        let l = self.agents[i].attempts.get_mut(&k).expect("running");
                        l.spooled += bytes as u64;
                        let outcome = if succeeded {
                            Outcome::Succeeded
                        } else {
                            Outcome::Failed
                        };
                        l.finished = Some((outcome, l.spooled));
                        let length = l.spooled;
                        self.flush(i);
                        if early {
                            self.agent_send(
                                i,
                                UP,
                                Up::Complete {
                                    key: k,
                                    length,
                                    outcome,
                                },
                            );
                        }
                    }
                }
                Action::EarlyComplete { agent } => {
                    let finished = |l: &Local| l.finished.filter(|_| !l.aborted);
                    let due = self
                        .pick(agent, |a| {
                            a.session.is_some()
                                && a.attempts.values().any(|l| finished(l).is_some())
                        })
                        .and_then(|i| {
                            self.agents[i].attempts.iter().find_map(|(k, l)| {
                                finished(l).map(|(outcome, length)| (i, *k, outcome, length))
                            })
                        });
                    if let Some((i, key, outcome, length)) = due {
                        self.agent_send(
                            i,
                            UP,
                            Up::Complete {
                                key,
                                length,
                                outcome,
                            },
                        );
                    }
                }
                Action::Partition {
                    agent,
                    quarters,
                    busy,
                } => {
                    let i = busy
                        .then(|| self.pick(agent, |a| a.first_running().is_some()))
                        .flatten()
                        .unwrap_or(agent as usize % n);
                    self.partition(i, quarters)
                }
                Action::Crash { agent, quarters } => self.crash(agent as usize % n, quarters),
                Action::HubRestart { quarters } => self.hub_crash(quarters),
                Action::Stale {
                    agent,
                    job,
                    pick,
                    kind,
                } => self.stale(
                    agent as usize % n,
                    job as usize % self.jobs.len(),
                    pick,
                    kind,
                ),
            }
            self.check()
        }

        fn handle(&mut self, ev: Ev) {
            match ev {
                Ev::ToHub { sid, msg } => {
                    if self.links.get(&sid).is_some_and(|l| !l.dead) {
                        self.hub_receives(sid, msg);
                    }
                }
                Ev::ToAgent { sid, msg } => {
                    if self.links.get(&sid).is_some_and(|l| !l.dead) {
                        self.agent_receives(sid, msg);
                    }
                }
                Ev::Beat { agent, boot, sid } => self.beat(agent, boot, sid),
                Ev::Fence { agent, boot, fence } => self.fence(agent, boot, fence),
                Ev::Connect { agent, boot } => self.connect(agent, boot),
                Ev::WelcomeTimeout { agent, boot, sid } => self.welcome_timeout(agent, boot, sid),
                Ev::AgentBoot { agent } => self.boot(agent),
                Ev::Sweep { epoch } => self.sweep(epoch),
                Ev::OfferTimeout { epoch, key, sid } => self.offer_timeout(epoch, key, sid),
                Ev::HubUp => self.hub_up(),
            }
        }

        /// The invariants (a), (b) and (c), now.
        fn check(&self) -> Result<(), String> {
            if let Some(v) = self.violations.first() {
                return Err(v.clone());
            }
            for job in 0..self.jobs.len() {
                // (a)
                let running: Vec<(u32, &str)> = self
                    .agents
                    .iter()
                    .enumerate()
                    .flat_map(|(i, a)| {
                        a.attempts
                            .keys()
                            .filter(move |k| k.0 == job && a.running(k))
                            .map(move |k| (k.1, NAMES[i]))
                    })
                    .collect();
                if running.len() > 1 {
                    return Err(format!(
                        "(a) at {:?}: job {job} runs twice at once: (attempt, agent) {running:?}",
                        self.now
                    ));
                }
                // (b)
                let deciding: Vec<u32> = self
                    .accepted
                    .iter()
                    .filter(|(k, o)| k.0 == job && o.decisive())
                    .map(|(k, _)| k.1)
                    .collect();
                if deciding.len() > 1 {
                    return Err(format!(
                        "(b) at {:?}: job {job} decided by attempts {deciding:?}",
                        self.now
                    ));
                }
                if let JobState::Finished { outcome, by } = self.jobs[job].state {
                    let from_one = match by {
                        // Its outcome came from exactly one accepted completion.
                        Some(n) => deciding == [n] && outcome.decisive(),
                        // Given up after too many lost attempts: none decided it.
                        None => deciding.is_empty() && outcome == Outcome::Lost,
                    };
                    if !from_one {
                        return Err(format!(
                            "(b) at {:?}: job {job} finished {outcome:?} by attempt {by:?}, but the completions that decide it are {deciding:?}",
                            self.now
                        ));
                    }
                }
            }
            Ok(())
        }
    }

    impl Sim {
        /// After the case's actions: every outage over, every start in progress
        /// returned, and time enough for offers, leases and the restart grace to run out.
        /// Then (e): the control plane holds no attempt that waits forever. A withdrawn
        /// or taken-up attempt is settled by then, and one it holds as running is one its
        /// agent is up and still running.
        fn settle(&mut self) -> Result<(), String> {
            let n = self.agents.len();
            let reassign = [self.t.heartbeat, self.t.heartbeat_for(n)]
                .into_iter()
                .map(|h| (self.rules.reassign)(&self.t, h))
                .max()
                .expect("two");
            let long = self.t.restart_grace + reassign * 2 + self.t.offer_timeout + self.h * 8;
            // The longest outage is 255 quarters of h.
            let sleep = |sim: &mut Sim, d: Duration| {
                let beats = d.as_nanos().div_ceil(sim.h.as_nanos()).min(255) as u8;
                sim.act(Action::Sleep { beats })
            };
            sleep(self, self.h * 64)?;
            sleep(self, long)?;
            for i in 0..n {
                if !self.agents[i].up {
                    continue;
                }
                let starting: Vec<Key> = self.agents[i]
                    .attempts
                    .iter()
                    .filter(|(_, l)| !l.started)
                    .map(|(k, _)| *k)
                    .collect();
                for k in starting {
                    self.start(i, k);
                }
            }
            sleep(self, long)?;
            sleep(self, long)?;
            self.stats.settled += 1;
            for (k, at) in &self.hub.attempts {
                let agent = &self.agents[at.agent];
                let running = agent.attempts.get(k).is_some_and(|l| !l.aborted);
                let stuck = match at.phase {
                    // The eager dispatcher goes on placing jobs; an offer of its last
                    // sweep may be on its way.
                    Phase::Offered => !self.eager,
                    Phase::Withdrawn | Phase::Reattached(_) => true,
                    Phase::Running => !(agent.up && running),
                };
                if stuck {
                    return Err(format!(
                        "(e) at {:?}: the control plane still holds attempt {} of job {} for {} as {:?}, which that agent does not run (it holds {:?})",
                        self.now,
                        k.1,
                        k.0,
                        NAMES[at.agent],
                        at.phase,
                        agent.attempts.keys().collect::<Vec<_>>()
                    ));
                }
            }
            Ok(())
        }
    }

    /// Runs one case, then lets it settle; the first invariant it breaks, if any.
    fn simulate(c: &Case, rules: Rules) -> Result<Stats, String> {
        let mut sim = Sim::new(c, rules);
        for a in &c.actions {
            sim.act(*a)?;
        }
        sim.settle()?;
        Ok(sim.stats)
    }

    /// `cases` cases from a fixed seed (so the coverage checks below are stable), unless
    /// `PROPTEST_CASES` or `PROPTEST_RNG_SEED` say otherwise (for a longer search).
    fn config(cases: u32) -> Config {
        let env = Config::default();
        Config {
            cases: if env_set() { env.cases } else { cases },
            rng_seed: match env.rng_seed {
                RngSeed::Random => RngSeed::Fixed(0x1ea5e),
                seed => seed,
            },
            failure_persistence: None,
            max_shrink_iters: 1024,
            ..env
        }
    }

    fn env_set() -> bool {
        ["PROPTEST_CASES", "PROPTEST_RNG_SEED"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }

    /// Checks the property — (d) for the heartbeat intervals in use (the control plane's
    /// own and the one it gives agents), then (a), (b) and (c) over a run — with
    /// `rules`; what the runs did, or the smallest failing case proptest found.
    fn check(rules: Rules, cases: u32) -> Result<Stats, TestError<Case>> {
        let total = RefCell::new(Stats::default());
        TestRunner::new(config(cases)).run(&case(), |c| {
            let t = c.timings();
            for h in [t.heartbeat, t.heartbeat_for(c.agents)] {
                let (r, f) = ((rules.reassign)(&t, h), t.self_fence_for(h));
                prop_assert!(
                    r > f,
                    "(d) reassignment {r:?} is not longer than self-fence {f:?}"
                );
            }
            let stats = simulate(&c, rules).map_err(TestCaseError::fail)?;
            total.borrow_mut().add(&stats);
            Ok(())
        })?;
        Ok(total.into_inner())
    }

    /// The simulation alone (no (d)), expecting proptest to find a case that breaks (a).
    fn counterexample(rules: Rules) -> (String, Case) {
        let result = TestRunner::new(config(1024)).run(&case(), |c| {
            simulate(&c, rules).map(|_| ()).map_err(TestCaseError::fail)
        });
        match result {
            Err(TestError::Fail(why, c)) => (why.to_string(), c),
            other => panic!("expected a counterexample, got {other:?}"),
        }
    }

    #[test]
    fn leases_keep_a_job_from_running_twice_and_decide_it_once() {
        let s = match check(LEASES, 128) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        eprintln!("{s:?}");
        if !env_set() {
            // The interleavings reach what the invariants are about.
            assert!(s.accepted_completions > 0 && s.decided_jobs > 0, "{s:?}");
            assert!(s.reassigned > 0 && s.fenced > 0, "{s:?}");
            assert!(s.started_while_held_elsewhere > 0, "{s:?}");
            assert!(s.lost_at_reconnect > 0 && s.grace_over > 0, "{s:?}");
            assert!(s.verdicts_continue > 0 && s.verdicts_abort > 0, "{s:?}");
            assert!(s.stale_refused > 0 && s.waits > 0, "{s:?}");
            assert!(s.withdrawn > 0 && s.withdrawn_released > 0, "{s:?}");
            assert!(s.released_running > 0 && s.settled == s.cases, "{s:?}");
        }
    }

    /// The test can fail: a control plane that hears `Released` only for a withdrawn
    /// offer (what it once did) keeps, after a restart, an attempt it took up and its
    /// agent continued, then stopped because it was told to before the restart: (e).
    #[test]
    fn a_release_heard_only_for_withdrawn_offers_leaves_an_attempt_held_forever() {
        let withdrawn_only = Rules {
            release: Release::WithdrawnOnly,
            ..LEASES
        };
        let (why, c) = counterexample(withdrawn_only);
        eprintln!("{why}\n{c:?}");
        assert!(why.contains("(e)"), "{why}");
    }

    /// The test can fail: with a reassignment time shorter than the self-fence time (by
    /// one heartbeat), (d) refuses the timings, and the simulation alone finds a job
    /// running twice.
    #[test]
    fn a_reassignment_time_shorter_than_the_self_fence_lets_a_job_run_twice() {
        let broken = Rules {
            reassign: |t, h| t.self_fence_for(h) - h,
            ..LEASES
        };
        match check(broken, 1) {
            Err(TestError::Fail(why, _)) => assert!(why.message().contains("(d)"), "{why}"),
            other => panic!("(d) should refuse the timings, got {other:?}"),
        }
        let (why, c) = counterexample(broken);
        eprintln!("{why}\n{c:?}");
        assert!(why.contains("(a)"), "{why}");
    }

    /// The test can fail: placing a withdrawn offer's job again at once (what the
    /// control plane once did), while the agent may already run it (it starts before it
    /// accepts: its accept late, or lost with a broken connection), lets a job run twice.
    #[test]
    fn placing_a_withdrawn_offer_again_at_once_lets_a_job_run_twice() {
        let at_once = Rules {
            withdraw: Withdraw::AtOnce,
            ..LEASES
        };
        let (why, c) = counterexample(at_once);
        eprintln!("{why}\n{c:?}");
        assert!(why.contains("(a)"), "{why}");
    }
}
