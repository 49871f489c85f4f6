//! Runner selection: the [`Selector`] trait, [`SelectionEngine`] built from [`Filter`]s and
//! weighted [`Scorer`]s, and [`LeastLoaded`], the engine's default.
//!
//! Selection is pure and synchronous: it sees a job and snapshots of candidate runners,
//! does no I/O, and either picks one runner or explains, with counts, why none fits
//! ("2 runners lack label gpu; 1 is unhealthy").
//!
//! ```text
//!   runners ──► filters (all must pass; the first failure is the runner's reason)
//!           ──► scorers (each 0.0..=1.0, times its weight, summed)
//!           ──► highest total wins; ties go to the earlier runner
//! ```

mod engine;

pub use engine::{
    BinPack, FastestStartup, Filter, FreeSlots, Healthy, ImageSupport, KindMatch, LabelAffinity,
    LabelMatch, LeastLoadedScore, ResourcesFit, RoundRobin, Scorer, ScorerKind, SelectionConfig,
    SelectionEngine, Spread, StepKinds,
};

use std::collections::BTreeMap;
use std::fmt;

use crate::job::JobSpec;
use crate::runner::{Capabilities, Health, RunnerInfo};

/// What a selector knows about one runner at one moment.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RunnerSnapshot {
    /// Identity, kind and labels.
    pub info: RunnerInfo,
    /// Declared capabilities.
    pub capabilities: Capabilities,
    /// Last known health.
    pub health: Health,
    /// Jobs running on it.
    pub running: usize,
    /// Labels that reserve the runner: it only takes jobs that ask for every one of them.
    pub reserved_labels: std::collections::BTreeSet<String>,
    /// CPUs asked for by the jobs running on it.
    pub cpus_in_use: f64,
    /// Memory asked for by the jobs running on it, in bytes.
    pub memory_in_use: u64,
    /// Measured job start-up time (median), when known.
    pub startup: Option<std::time::Duration>,
    /// Sequence number of the last assignment to it (larger is more recent).
    pub last_assigned: Option<u64>,
    /// Running jobs by job name.
    pub running_by_name: BTreeMap<String, usize>,
}

impl RunnerSnapshot {
    /// A snapshot from its parts.
    pub fn new(
        info: RunnerInfo,
        capabilities: Capabilities,
        health: Health,
        running: usize,
    ) -> Self {
        RunnerSnapshot {
            info,
            capabilities,
            health,
            running,
            reserved_labels: Default::default(),
            cpus_in_use: 0.0,
            memory_in_use: 0,
            startup: None,
            last_assigned: None,
            running_by_name: BTreeMap::new(),
        }
    }

    /// Free slots, `None` when unbounded.
    pub fn free_slots(&self) -> Option<usize> {
        self.capabilities
            .max_concurrency
            .map(|max| max.saturating_sub(self.running))
    }
}

/// Why no runner fits: each distinct reason with the number of runners it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoRunnerFits {
    /// Reason → how many runners it excluded. A runner counts once, under its first reason.
    pub reasons: BTreeMap<String, usize>,
    /// How many runners were considered.
    pub candidates: usize,
}

impl fmt::Display for NoRunnerFits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.candidates == 0 {
            return f.write_str("no runner is registered");
        }
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(reason, n)| {
                let noun = if *n == 1 { "runner" } else { "runners" };
                format!("{n} {noun}: {reason}")
            })
            .collect();
        write!(f, "no runner fits ({})", parts.join("; "))
    }
}

impl std::error::Error for NoRunnerFits {}

/// Picks the runner for a job.
///
/// Implementations MUST be pure: no I/O, no blocking, the same answer for the same input.
pub trait Selector: Send + Sync {
    /// Returns the index into `runners` of the chosen runner, or why none fits.
    fn select(&self, job: &dyn JobSpec, runners: &[RunnerSnapshot]) -> Result<usize, NoRunnerFits>;

    /// The same decision over a [`RunnerPool`], whose label index lets a selector skip
    /// runners that cannot match (the default ignores the index). MUST return what
    /// `select(job, pool.runners())` returns.
    fn select_in(&self, job: &dyn JobSpec, pool: &RunnerPool) -> Result<usize, NoRunnerFits> {
        self.select(job, pool.runners())
    }

    /// True when this selector never chooses a runner that lacks a label the job asks
    /// for (own, added or reserved), as [`LabelMatch`] rules: a
    /// caller may then offer it only the runners carrying those labels and get the same
    /// choice. The default, false, makes no such promise.
    fn filters_by_labels(&self) -> bool {
        false
    }
}

/// Runner snapshots prepared for many decisions: an index from each label (ordinary or
/// reserved) to the runners carrying it. Build it once per dispatch round and update
/// loads in place as jobs are assigned.
#[derive(Clone, Debug, Default)]
pub struct RunnerPool {
    runners: Vec<RunnerSnapshot>,
    by_label: std::collections::HashMap<String, Vec<u32>>,
    /// Every runner by (load, index), least loaded first; load as ordered `f64` bits.
    by_load: std::collections::BTreeSet<(u64, u32)>,
}

/// A runner's load (running jobs relative to its slots, 0.0 to 1.0) as bits that order
/// like the value.
fn load_key(r: &RunnerSnapshot) -> u64 {
    engine::load(r).to_bits()
}

impl RunnerPool {
    /// Indexes `runners`.
    pub fn new(runners: Vec<RunnerSnapshot>) -> Self {
        let mut by_label: std::collections::HashMap<String, Vec<u32>> =
            std::collections::HashMap::new();
        for (i, r) in runners.iter().enumerate() {
            for l in r.info.labels.iter().chain(&r.reserved_labels) {
                let list = by_label.entry(l.clone()).or_default();
                if list.last() != Some(&(i as u32)) {
                    list.push(i as u32);
                }
            }
        }
        let by_load = runners
            .iter()
            .enumerate()
            .map(|(i, r)| (load_key(r), i as u32))
            .collect();
        RunnerPool {
            runners,
            by_label,
            by_load,
        }
    }

    /// Runner indices from least to most loaded (ties by index).
    pub fn by_load(&self) -> impl Iterator<Item = usize> + '_ {
        self.by_load.iter().map(|&(_, i)| i as usize)
    }

    /// The snapshots, in the order given.
    pub fn runners(&self) -> &[RunnerSnapshot] {
        &self.runners
    }

    /// Records one more job (named `job_name`, counted for spreading) on runner `index`.
    pub fn record_assignment(&mut self, index: usize, job_name: &str) {
        if let Some(r) = self.runners.get_mut(index) {
            self.by_load.remove(&(load_key(r), index as u32));
            r.running += 1;
            *r.running_by_name.entry(job_name.to_string()).or_default() += 1;
            self.by_load.insert((load_key(r), index as u32));
        }
    }

    /// Ascending indices of the runners carrying every label the job asks for (as an
    /// ordinary or reserved label); `None` when it asks for none.
    pub fn label_candidates(&self, job: &dyn JobSpec) -> Option<Vec<u32>> {
        let runs_on = job.runs_on();
        let mut lists: Vec<&[u32]> = runs_on
            .labels
            .iter()
            .map(|l| self.by_label.get(l).map_or(&[][..], Vec::as_slice))
            .collect();
        lists.sort_by_key(|l| l.len());
        let (first, rest) = lists.split_first()?;
        let mut out: Vec<u32> = first.to_vec();
        for list in rest {
            // Both ascending: a merge keeps what is in both.
            let mut j = 0;
            out.retain(|&i| {
                while j < list.len() && list[j] < i {
                    j += 1;
                }
                j < list.len() && list[j] == i
            });
        }
        Some(out)
    }
}

/// The first reason `runner` cannot take `job` under the default filters, in words.
pub fn rejection(job: &dyn JobSpec, runner: &RunnerSnapshot) -> Option<String> {
    engine::default_filters()
        .iter()
        .find_map(|f| f.check(job, runner).err())
}

/// Filters by kind, labels, step kinds, limits, health and free slots, then prefers the
/// runner with the lowest load (running jobs relative to its capacity); ties go to the
/// earlier runner in the list.
///
/// A job with an `image` prefers runners that run images, whatever their load; host
/// runners, which ignore `image`, take it only when no such runner fits. Then runners that
/// are not degraded come first: a degraded one takes a job only when no other fits.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastLoaded;

impl Selector for LeastLoaded {
    fn select(&self, job: &dyn JobSpec, runners: &[RunnerSnapshot]) -> Result<usize, NoRunnerFits> {
        SelectionEngine::default().select(job, runners)
    }
    fn select_in(&self, job: &dyn JobSpec, pool: &RunnerPool) -> Result<usize, NoRunnerFits> {
        SelectionEngine::default().select_in(job, pool)
    }
    fn filters_by_labels(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, Resources, Step};
    use crate::runner::{Isolation, Limit, RunnerKind};

    fn snap(
        name: &str,
        kind: RunnerKind,
        labels: &[&str],
        running: usize,
        max: Option<usize>,
    ) -> RunnerSnapshot {
        let mut caps = Capabilities::host(Isolation::Process);
        caps.command_steps = true;
        caps.max_concurrency = max;
        RunnerSnapshot::new(
            RunnerInfo::new(name, kind).with_labels(labels.iter().copied()),
            caps,
            Health::Healthy,
            running,
        )
    }

    #[test]
    fn picks_least_loaded_matching_runner() {
        let mut job = Job::new("j", vec![Step::run("true")]);
        job.runs_on.labels = vec!["linux".into()];
        let runners = vec![
            snap("a", RunnerKind::Local, &["linux"], 3, Some(4)),
            snap("b", RunnerKind::Local, &[], 0, Some(4)),
            snap("c", RunnerKind::Native, &["linux"], 1, Some(4)),
        ];
        assert_eq!(LeastLoaded.select(&job, &runners), Ok(2));
    }

    #[test]
    fn explains_why_nothing_fits() {
        let mut job = Job::new("j", vec![Step::run("true")]);
        job.runs_on.labels = vec!["gpu".into()];
        job.resources = Resources {
            memory: Some(1 << 20),
            ..Resources::default()
        };
        let mut unhealthy = snap("u", RunnerKind::Local, &["gpu"], 0, None);
        unhealthy.health = Health::Unhealthy("disk full".into());
        unhealthy.capabilities.limits.insert(Limit::Memory);
        let mut full = snap("f", RunnerKind::Local, &["gpu"], 2, Some(2));
        full.capabilities.limits.insert(Limit::Memory);
        let runners = vec![
            snap("a", RunnerKind::Local, &[], 0, None),
            snap("b", RunnerKind::Local, &["linux"], 0, None),
            snap("m", RunnerKind::Local, &["gpu"], 0, None),
            unhealthy,
            full,
        ];
        let err = LeastLoaded.select(&job, &runners).unwrap_err();
        assert_eq!(err.reasons["lacks label gpu"], 2);
        assert_eq!(err.reasons["is unhealthy"], 1);
        assert_eq!(err.reasons["is full"], 1);
        assert_eq!(
            err.reasons["cannot enforce resources.memory on this host"],
            1
        );
        let text = err.to_string();
        assert!(text.contains("2 runners: lacks label gpu"), "{text}");
        assert!(text.contains("1 runner: is full"), "{text}");
    }

    #[test]
    fn jobs_with_images_prefer_image_runners() {
        let mut job = Job::new("j", vec![Step::run("true")]);
        job.image = Some("busybox".into());
        let host = snap("h", RunnerKind::Local, &[], 0, None);
        let mut docker = snap("d", RunnerKind::Docker, &[], 7, Some(8));
        docker.capabilities.images = true;
        assert_eq!(LeastLoaded.select(&job, &[host.clone(), docker]), Ok(1));
        // Host runners ignore the image when nothing else fits.
        assert_eq!(LeastLoaded.select(&job, &[host]), Ok(0));
    }

    #[test]
    fn respects_kind_and_step_kinds() {
        let mut job = Job::new("j", vec![Step::command(["true"])]);
        let mut local = snap("l", RunnerKind::Local, &[], 0, None);
        local.capabilities.command_steps = false;
        let native = snap("n", RunnerKind::Native, &[], 5, None);
        assert_eq!(
            LeastLoaded.select(&job, &[local.clone(), native.clone()]),
            Ok(1)
        );
        job.runs_on.kind = Some(RunnerKind::Local);
        let err = LeastLoaded.select(&job, &[local, native]).unwrap_err();
        assert_eq!(err.reasons.len(), 2, "{err}");
        assert_eq!(
            LeastLoaded.select(&job, &[]).unwrap_err().to_string(),
            "no runner is registered"
        );
    }
}
