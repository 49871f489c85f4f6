//! The selection engine: filters and weighted scorers, in the spirit of the Kubernetes
//! scheduling framework.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{NoRunnerFits, RunnerPool, RunnerSnapshot, Selector};
use crate::job::JobSpec;
use crate::runner::Health;

/// A yes/no condition a runner must meet to take a job.
pub trait Filter: Send + Sync {
    /// Short name, for configuration and logs.
    fn name(&self) -> &'static str;
    /// `Err` with the reason in words ("lacks label gpu") when the runner cannot take the
    /// job. MUST be pure.
    fn check(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String>;
    /// True when [`Filter::check`] would be `Ok`; implementations override it to answer
    /// without building the reason. MUST agree with `check`.
    fn passes(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        self.check(job, runner).is_ok()
    }
}

/// A preference among runners that passed every filter.
pub trait Scorer: Send + Sync {
    /// Short name, for configuration and logs.
    fn name(&self) -> &'static str;
    /// How much this scorer likes `runners[index]` for `job`, from 0.0 to 1.0. `runners`
    /// holds only the runners that passed the filters. MUST be pure.
    fn score(&self, job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64;
    /// Every runner's score, in order (`out` is cleared first). The default calls
    /// [`Scorer::score`] for each; scorers that compare runners override it to do their
    /// shared work once.
    fn score_all(&self, job: &dyn JobSpec, runners: &[&RunnerSnapshot], out: &mut Vec<f64>) {
        out.clear();
        out.extend((0..runners.len()).map(|i| self.score(job, runners, i)));
    }
}

/// `runs_on.kind` must match the runner's kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct KindMatch;

impl Filter for KindMatch {
    fn name(&self) -> &'static str {
        "kind"
    }
    fn check(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        match job.runs_on().kind {
            Some(kind) if kind != runner.info.kind => Err(format!("is not of kind {kind}")),
            _ => Ok(()),
        }
    }
    fn passes(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        job.runs_on().kind.is_none_or(|k| k == runner.info.kind)
    }
}

/// Every label in `runs_on.labels` must be on the runner, and every reserved label of the
/// runner must be asked for by the job (a reserved runner only takes jobs meant for it).
#[derive(Clone, Copy, Debug, Default)]
pub struct LabelMatch;

impl Filter for LabelMatch {
    fn name(&self) -> &'static str {
        "labels"
    }
    fn check(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        let runs_on = job.runs_on();
        let missing: Vec<&str> = runs_on
            .labels
            .iter()
            .filter(|l| !runner.info.labels.contains(*l) && !runner.reserved_labels.contains(*l))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!("lacks label {}", missing.join(", ")));
        }
        let unasked: Vec<&str> = runner
            .reserved_labels
            .iter()
            .filter(|l| !runs_on.labels.contains(l))
            .map(String::as_str)
            .collect();
        if !unasked.is_empty() {
            return Err(format!(
                "is reserved for jobs asking for {}",
                unasked.join(", ")
            ));
        }
        Ok(())
    }
    fn passes(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        let runs_on = job.runs_on();
        runs_on
            .labels
            .iter()
            .all(|l| runner.info.labels.contains(l) || runner.reserved_labels.contains(l))
            && runner
                .reserved_labels
                .iter()
                .all(|l| runs_on.labels.contains(l))
    }
}

/// The runner must run every kind of step the job has.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepKinds;

impl Filter for StepKinds {
    fn name(&self) -> &'static str {
        "step-kinds"
    }
    fn check(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        runner.capabilities.unmet_step_kind(job).map_or(Ok(()), Err)
    }
    fn passes(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        let caps = &runner.capabilities;
        (caps.run_steps && caps.command_steps)
            || job.steps().iter().all(|s| match &s.action {
                crate::job::StepAction::Run(_) => caps.run_steps,
                crate::job::StepAction::Command(_) => caps.command_steps,
            })
    }
}

/// A job without an image never goes to a runner that needs one.
/// With `strict`, a job that names an image only goes to runners that run images. Without
/// it (the default) host runners, which ignore `image`, may take it; scorers should then
/// prefer image runners ([`SelectionEngine`] always does).
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageSupport {
    /// Refuse runners that cannot run images.
    pub strict: bool,
}

impl Filter for ImageSupport {
    fn name(&self) -> &'static str {
        "image"
    }
    fn check(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        if self.strict && job.image().is_some() && !runner.capabilities.images {
            return Err("cannot run images".into());
        }
        if runner.capabilities.needs_image && job.image().is_none() {
            return Err("needs a job image".into());
        }
        Ok(())
    }
    fn passes(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        let caps = &runner.capabilities;
        let image = job.image().is_some();
        (image || !caps.needs_image) && (!self.strict || !image || caps.images)
    }
}

/// The runner must enforce every limit the job asks for, and have the CPUs and memory the
/// job asks for free (when it declares its capacity).
#[derive(Clone, Copy, Debug, Default)]
pub struct ResourcesFit;

impl Filter for ResourcesFit {
    fn name(&self) -> &'static str {
        "resources"
    }
    fn check(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        let caps = &runner.capabilities;
        let r = job.resources();
        if let Some(reason) = caps.unmet_limits(&r) {
            return Err(reason);
        }
        if let (Some(want), Some(total)) = (r.cpus, caps.cpus)
            && want > total - runner.cpus_in_use + 1e-9
        {
            return Err("has too few free CPUs".into());
        }
        if let (Some(want), Some(total)) = (r.memory, caps.memory)
            && want > total.saturating_sub(runner.memory_in_use)
        {
            return Err("has too little free memory".into());
        }
        Ok(())
    }
}

/// Unhealthy, offline and full runners take no jobs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Healthy;

impl Filter for Healthy {
    fn name(&self) -> &'static str {
        "health"
    }
    fn check(&self, _job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        match &runner.health {
            Health::Unhealthy(_) => Err("is unhealthy".into()),
            Health::Offline(_) => Err("is offline".into()),
            Health::Full(why) => Err(format!("takes no new jobs ({why})")),
            _ => Ok(()),
        }
    }
    fn passes(&self, _job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        runner.health.takes_new_jobs()
    }
}

/// Full runners take no jobs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FreeSlots;

impl Filter for FreeSlots {
    fn name(&self) -> &'static str {
        "slots"
    }
    fn check(&self, _job: &dyn JobSpec, runner: &RunnerSnapshot) -> Result<(), String> {
        if runner.free_slots() == Some(0) {
            Err("is full".into())
        } else {
            Ok(())
        }
    }
    fn passes(&self, _job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        runner.free_slots() != Some(0)
    }
}

pub(crate) fn load(r: &RunnerSnapshot) -> f64 {
    match r.capabilities.max_concurrency {
        Some(max) if max > 0 => (r.running as f64 / max as f64).min(1.0),
        _ => r.running as f64 / (r.running as f64 + 8.0),
    }
}

/// Prefers the runner with the lowest load (running jobs relative to its slots).
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastLoadedScore;

impl Scorer for LeastLoadedScore {
    fn name(&self) -> &'static str {
        "least-loaded"
    }
    fn score(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64 {
        1.0 - load(runners[index])
    }
}

/// Prefers the busiest runner that still fits, packing jobs onto few runners.
#[derive(Clone, Copy, Debug, Default)]
pub struct BinPack;

impl Scorer for BinPack {
    fn name(&self) -> &'static str {
        "bin-pack"
    }
    fn score(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64 {
        load(runners[index])
    }
}

/// Prefers runners running the fewest jobs of the same name, spreading a job's runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread;

impl Scorer for Spread {
    fn name(&self) -> &'static str {
        "spread"
    }
    fn score(&self, job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64 {
        let same = runners[index]
            .running_by_name
            .get(job.name())
            .copied()
            .unwrap_or(0);
        1.0 / (1.0 + same as f64)
    }
}

/// Prefers runners with the fastest measured start-up; unmeasured runners score 0.5.
#[derive(Clone, Copy, Debug, Default)]
pub struct FastestStartup;

impl Scorer for FastestStartup {
    fn name(&self) -> &'static str {
        "fastest-startup"
    }
    fn score(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64 {
        let fastest = runners.iter().filter_map(|r| r.startup).min();
        match (runners[index].startup, fastest) {
            (Some(own), Some(best)) if !own.is_zero() => best.as_secs_f64() / own.as_secs_f64(),
            (Some(_), Some(_)) => 1.0,
            _ => 0.5,
        }
    }
    fn score_all(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], out: &mut Vec<f64>) {
        let fastest = runners.iter().filter_map(|r| r.startup).min();
        out.clear();
        out.extend(runners.iter().map(|r| match (r.startup, fastest) {
            (Some(own), Some(best)) if !own.is_zero() => best.as_secs_f64() / own.as_secs_f64(),
            (Some(_), Some(_)) => 1.0,
            _ => 0.5,
        }));
    }
}

/// Prefers the runner assigned least recently (never assigned first).
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobin;

impl Scorer for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }
    fn score(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64 {
        let Some(own) = runners[index].last_assigned else {
            return 1.0;
        };
        let seqs: Vec<u64> = runners.iter().filter_map(|r| r.last_assigned).collect();
        let (min, max) = (
            seqs.iter().min().copied().unwrap_or(own),
            seqs.iter().max().copied().unwrap_or(own),
        );
        if max == min {
            return 0.5;
        }
        // Oldest assignment → just under 1, newest → 0.
        0.99 * (max - own) as f64 / (max - min) as f64
    }
    fn score_all(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], out: &mut Vec<f64>) {
        let seqs = runners.iter().filter_map(|r| r.last_assigned);
        let (min, max) = seqs.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        out.clear();
        out.extend(runners.iter().map(|r| match r.last_assigned {
            None => 1.0,
            Some(_) if max == min => 0.5,
            Some(own) => 0.99 * (max - own) as f64 / (max - min) as f64,
        }));
    }
}

/// Prefers runners carrying more of the preferred labels.
#[derive(Clone, Debug, Default)]
pub struct LabelAffinity {
    /// Labels to prefer.
    pub preferred: Vec<String>,
}

impl Scorer for LabelAffinity {
    fn name(&self) -> &'static str {
        "label-affinity"
    }
    fn score(&self, _job: &dyn JobSpec, runners: &[&RunnerSnapshot], index: usize) -> f64 {
        if self.preferred.is_empty() {
            return 0.0;
        }
        let have = self
            .preferred
            .iter()
            .filter(|l| runners[index].info.labels.contains(*l))
            .count();
        have as f64 / self.preferred.len() as f64
    }
}

/// The scorers a [`SelectionConfig`] can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ScorerKind {
    /// [`LeastLoadedScore`].
    LeastLoaded,
    /// [`BinPack`].
    BinPack,
    /// [`Spread`].
    Spread,
    /// [`FastestStartup`].
    FastestStartup,
    /// [`RoundRobin`].
    RoundRobin,
    /// [`LabelAffinity`] with [`SelectionConfig::preferred_labels`].
    LabelAffinity,
}

/// Selection settings, as they appear in a configuration file:
///
/// ```
/// use rustci_runners::select::{SelectionConfig, SelectionEngine};
/// let config: SelectionConfig = serde_json::from_str(
///     r#"{"weights": {"least-loaded": 1.0, "fastest-startup": 2.0}, "strict_images": true}"#,
/// ).unwrap();
/// let engine = SelectionEngine::from_config(&config);
/// assert_eq!(engine.scorer_names(), ["least-loaded", "fastest-startup"]);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SelectionConfig {
    /// Scorer weights; a scorer with weight 0 or absent is not used. Default
    /// `least-loaded: 1`.
    #[serde(default = "SelectionConfig::default_weights")]
    pub weights: BTreeMap<ScorerKind, f64>,
    /// Jobs naming an image go only to runners that run images. Default false.
    #[serde(default)]
    pub strict_images: bool,
    /// Labels [`ScorerKind::LabelAffinity`] prefers.
    #[serde(default)]
    pub preferred_labels: Vec<String>,
}

impl SelectionConfig {
    fn default_weights() -> BTreeMap<ScorerKind, f64> {
        BTreeMap::from([(ScorerKind::LeastLoaded, 1.0)])
    }
}

impl Default for SelectionConfig {
    fn default() -> Self {
        SelectionConfig {
            weights: Self::default_weights(),
            strict_images: false,
            preferred_labels: Vec::new(),
        }
    }
}

/// The highest [`preference`].
const BEST: u8 = 3;

/// What comes before any score, highest first: a runner that runs the image a job names
/// (over one that would ignore it), then one that is not degraded (a degraded runner
/// takes a job only when no other fits).
fn preference(job: &dyn JobSpec, r: &RunnerSnapshot) -> u8 {
    let image_ok = job.image().is_none() || r.capabilities.images;
    let healthy = !matches!(r.health, Health::Degraded(_));
    (image_ok as u8) << 1 | healthy as u8
}

/// The default filters, in the order their reasons are reported.
pub(crate) fn default_filters() -> Vec<Box<dyn Filter>> {
    vec![
        Box::new(KindMatch),
        Box::new(LabelMatch),
        Box::new(StepKinds),
        Box::new(ImageSupport::default()),
        Box::new(ResourcesFit),
        Box::new(Healthy),
        Box::new(FreeSlots),
    ]
}

/// A [`Selector`] made of filters and weighted scorers.
///
/// Every runner must pass every filter; a runner that fails is counted under the first
/// failing filter's reason. Among the rest, each scorer's score times its weight is summed,
/// and the highest total wins. Whatever the scores, a job that names an image prefers
/// runners that run images over ones that would ignore it, and then runners that are not
/// degraded over degraded ones; remaining ties go to the earlier runner, so the result
/// depends only on the input.
pub struct SelectionEngine {
    filters: Vec<Box<dyn Filter>>,
    scorers: Vec<(Box<dyn Scorer>, f64)>,
    /// The filters include [`LabelMatch`], so a pool's label index may narrow the
    /// candidates.
    has_label_filter: bool,
}

impl Default for SelectionEngine {
    fn default() -> Self {
        SelectionEngine::from_config(&SelectionConfig::default())
    }
}

impl SelectionEngine {
    /// An engine with the given filters and no scorers.
    pub fn new(filters: Vec<Box<dyn Filter>>) -> Self {
        let has_label_filter = filters.iter().any(|f| f.name() == LabelMatch.name());
        SelectionEngine {
            filters,
            scorers: Vec::new(),
            has_label_filter,
        }
    }

    /// Adds a scorer with a weight (builder style).
    pub fn with_scorer(mut self, scorer: impl Scorer + 'static, weight: f64) -> Self {
        self.scorers.push((Box::new(scorer), weight));
        self
    }

    /// The default filters and the configured scorers.
    pub fn from_config(config: &SelectionConfig) -> Self {
        let mut filters = default_filters();
        if config.strict_images {
            filters[3] = Box::new(ImageSupport { strict: true });
        }
        let mut engine = SelectionEngine::new(filters);
        for (kind, weight) in &config.weights {
            if *weight <= 0.0 || !weight.is_finite() {
                continue;
            }
            let scorer: Box<dyn Scorer> = match kind {
                ScorerKind::LeastLoaded => Box::new(LeastLoadedScore),
                ScorerKind::BinPack => Box::new(BinPack),
                ScorerKind::Spread => Box::new(Spread),
                ScorerKind::FastestStartup => Box::new(FastestStartup),
                ScorerKind::RoundRobin => Box::new(RoundRobin),
                ScorerKind::LabelAffinity => Box::new(LabelAffinity {
                    preferred: config.preferred_labels.clone(),
                }),
            };
            engine.scorers.push((scorer, *weight));
        }
        engine
    }

    /// True when the only scorer is [`LeastLoadedScore`]: the best runner is then the
    /// least loaded one that passes.
    fn least_loaded_only(&self) -> bool {
        matches!(self.scorers.as_slice(), [(s, w)] if s.name() == LeastLoadedScore.name() && *w > 0.0)
    }

    /// Names of the scorers in use, in order.
    pub fn scorer_names(&self) -> Vec<&'static str> {
        self.scorers.iter().map(|(s, _)| s.name()).collect()
    }

    /// Every runner's total score for `job` (`None` for runners filtered out), for
    /// explaining a choice.
    pub fn scores(&self, job: &dyn JobSpec, runners: &[RunnerSnapshot]) -> Vec<Option<f64>> {
        let passing: Vec<usize> = (0..runners.len())
            .filter(|&i| self.passes(job, &runners[i]))
            .collect();
        let totals = self.totals(job, runners, &passing);
        let mut out = vec![None; runners.len()];
        for (pos, i) in passing.iter().enumerate() {
            out[*i] = Some(totals[pos]);
        }
        out
    }

    fn passes(&self, job: &dyn JobSpec, runner: &RunnerSnapshot) -> bool {
        self.filters.iter().all(|f| f.passes(job, runner))
    }

    /// Summed weighted scores of `passing` (indices into `runners`, ascending).
    fn totals(&self, job: &dyn JobSpec, runners: &[RunnerSnapshot], passing: &[usize]) -> Vec<f64> {
        let refs: Vec<&RunnerSnapshot> = passing.iter().map(|&i| &runners[i]).collect();
        let mut totals = vec![0.0; refs.len()];
        let mut scores = Vec::with_capacity(refs.len());
        for (scorer, weight) in &self.scorers {
            scorer.score_all(job, &refs, &mut scores);
            for (t, s) in totals.iter_mut().zip(&scores) {
                *t += weight * s.clamp(0.0, 1.0);
            }
        }
        totals
    }

    /// The best of `candidates` (ascending indices into `runners`) that passes every
    /// filter, or `None`.
    fn choose(
        &self,
        job: &dyn JobSpec,
        runners: &[RunnerSnapshot],
        candidates: impl Iterator<Item = usize>,
    ) -> Option<usize> {
        let passing: Vec<usize> = candidates
            .filter(|&i| self.passes(job, &runners[i]))
            .collect();
        if passing.len() <= 1 {
            return passing.first().copied();
        }
        let totals = self.totals(job, runners, &passing);
        let mut best: Option<(usize, u8, f64)> = None;
        for (pos, &i) in passing.iter().enumerate() {
            let score = totals[pos];
            let rank = preference(job, &runners[i]);
            let better = match best {
                None => true,
                Some((_, best_rank, best_score)) => {
                    rank > best_rank || (rank == best_rank && score > best_score + 1e-12)
                }
            };
            if better {
                best = Some((i, rank, score));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// Why no runner fits: each runner counted under its first failing filter's reason.
    fn explain(&self, job: &dyn JobSpec, runners: &[RunnerSnapshot]) -> NoRunnerFits {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for r in runners {
            if let Some(reason) = self.filters.iter().find_map(|f| f.check(job, r).err()) {
                *reasons.entry(reason).or_default() += 1;
            }
        }
        NoRunnerFits {
            reasons,
            candidates: runners.len(),
        }
    }
}

impl Selector for SelectionEngine {
    fn select(&self, job: &dyn JobSpec, runners: &[RunnerSnapshot]) -> Result<usize, NoRunnerFits> {
        self.choose(job, runners, 0..runners.len())
            .ok_or_else(|| self.explain(job, runners))
    }

    fn filters_by_labels(&self) -> bool {
        self.has_label_filter
    }

    fn select_in(&self, job: &dyn JobSpec, pool: &RunnerPool) -> Result<usize, NoRunnerFits> {
        let runners = pool.runners();
        let chosen = match pool.label_candidates(job) {
            // Only runners carrying every label the job asks for pass the label filter.
            Some(candidates) if self.has_label_filter => {
                self.choose(job, runners, candidates.iter().map(|&i| i as usize))
            }
            _ if self.least_loaded_only() => {
                // The least loaded runner that passes wins (ties to the lower index, as
                // in `choose`), among those of the best `preference`.
                let mut best: Option<(usize, u8)> = None;
                for i in pool.by_load() {
                    let r = &runners[i];
                    if !self.passes(job, r) {
                        continue;
                    }
                    let rank = preference(job, r);
                    if best.is_none_or(|(_, b)| rank > b) {
                        best = Some((i, rank));
                        if rank == BEST {
                            break;
                        }
                    }
                }
                best.map(|(i, _)| i)
            }
            _ => self.choose(job, runners, 0..runners.len()),
        };
        chosen.ok_or_else(|| self.explain(job, runners))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::job::{Job, Step};
    use crate::runner::{Capabilities, Isolation, RunnerInfo, RunnerKind};

    fn snap(name: &str, running: usize, max: Option<usize>) -> RunnerSnapshot {
        let mut caps = Capabilities::host(Isolation::Process);
        caps.command_steps = true;
        caps.max_concurrency = max;
        caps.cpus = Some(4.0);
        caps.memory = Some(8 << 30);
        RunnerSnapshot::new(
            RunnerInfo::new(name, RunnerKind::Native),
            caps,
            Health::Healthy,
            running,
        )
    }

    fn job() -> Job {
        Job::new("build", vec![Step::run("true")])
    }

    fn engine(kind: ScorerKind) -> SelectionEngine {
        SelectionEngine::from_config(&SelectionConfig {
            weights: BTreeMap::from([(kind, 1.0)]),
            ..SelectionConfig::default()
        })
    }

    #[test]
    fn degraded_runners_take_jobs_only_when_no_other_fits() {
        let mut runners = vec![snap("a", 0, Some(4)), snap("b", 3, Some(4))];
        runners[0].health = Health::Degraded("slow start-up".into());
        for kind in [
            ScorerKind::LeastLoaded,
            ScorerKind::BinPack,
            ScorerKind::Spread,
        ] {
            let e = engine(kind);
            assert_eq!(e.select(&job(), &runners), Ok(1), "{kind:?}");
            let pool = RunnerPool::new(runners.clone());
            assert_eq!(e.select_in(&job(), &pool), Ok(1), "{kind:?} over a pool");
        }
        // b is full: the degraded runner is the only fit and takes the job.
        runners[1].running = 4;
        let e = engine(ScorerKind::LeastLoaded);
        assert_eq!(e.select(&job(), &runners), Ok(0));
        assert_eq!(e.select_in(&job(), &RunnerPool::new(runners)), Ok(0));
    }

    #[test]
    fn scorers_order_runners_as_named() {
        let runners = vec![
            snap("a", 1, Some(4)),
            snap("b", 3, Some(4)),
            snap("c", 2, Some(4)),
        ];
        assert_eq!(
            engine(ScorerKind::LeastLoaded).select(&job(), &runners),
            Ok(0)
        );
        assert_eq!(engine(ScorerKind::BinPack).select(&job(), &runners), Ok(1));

        let mut spread = runners.clone();
        spread[0].running_by_name.insert("build".into(), 2);
        spread[1].running_by_name.insert("build".into(), 1);
        spread[2].running_by_name.insert("build".into(), 0);
        assert_eq!(engine(ScorerKind::Spread).select(&job(), &spread), Ok(2));

        let mut fast = runners.clone();
        fast[0].startup = Some(Duration::from_millis(200));
        fast[1].startup = Some(Duration::from_millis(5));
        assert_eq!(
            engine(ScorerKind::FastestStartup).select(&job(), &fast),
            Ok(1)
        );

        let mut rr = runners.clone();
        rr[0].last_assigned = Some(9);
        rr[1].last_assigned = Some(3);
        rr[2].last_assigned = Some(7);
        assert_eq!(engine(ScorerKind::RoundRobin).select(&job(), &rr), Ok(1));
        rr[2].last_assigned = None;
        assert_eq!(engine(ScorerKind::RoundRobin).select(&job(), &rr), Ok(2));

        let c = SelectionConfig {
            weights: BTreeMap::from([(ScorerKind::LabelAffinity, 1.0)]),
            preferred_labels: vec!["ssd".into()],
            ..SelectionConfig::default()
        };
        let mut aff = runners.clone();
        aff[2].info.labels.insert("ssd".into());
        assert_eq!(SelectionEngine::from_config(&c).select(&job(), &aff), Ok(2));
    }

    #[test]
    fn weights_combine_scorers() {
        let mut runners = vec![snap("busy-fast", 3, Some(4)), snap("idle-slow", 0, Some(4))];
        runners[0].startup = Some(Duration::from_millis(10));
        runners[1].startup = Some(Duration::from_millis(100));
        let mut c = SelectionConfig {
            weights: BTreeMap::from([
                (ScorerKind::LeastLoaded, 1.0),
                (ScorerKind::FastestStartup, 0.1),
            ]),
            ..SelectionConfig::default()
        };
        assert_eq!(
            SelectionEngine::from_config(&c).select(&job(), &runners),
            Ok(1)
        );
        c.weights = BTreeMap::from([
            (ScorerKind::LeastLoaded, 0.1),
            (ScorerKind::FastestStartup, 1.0),
        ]);
        assert_eq!(
            SelectionEngine::from_config(&c).select(&job(), &runners),
            Ok(0)
        );
    }

    #[test]
    fn reserved_labels_and_resources_fit() {
        let mut gpu = snap("gpu", 0, None);
        gpu.reserved_labels.insert("gpu".into());
        let plain = snap("plain", 5, None);
        let runners = vec![gpu, plain];
        // A job not asking for gpu never lands on the reserved runner, however idle.
        assert_eq!(SelectionEngine::default().select(&job(), &runners), Ok(1));
        let mut wants = job();
        wants.runs_on.labels = vec!["gpu".into()];
        assert_eq!(SelectionEngine::default().select(&wants, &runners), Ok(0));

        let mut big = job();
        big.resources.memory = Some(6 << 30);
        let mut full = snap("full", 1, None);
        full.memory_in_use = 4 << 30;
        full.capabilities.limits.insert(crate::Limit::Memory);
        let mut roomy = snap("roomy", 3, None);
        roomy.capabilities.limits.insert(crate::Limit::Memory);
        assert_eq!(
            SelectionEngine::default().select(&big, &[full.clone(), roomy]),
            Ok(1)
        );
        let err = SelectionEngine::default()
            .select(&big, &[full])
            .unwrap_err();
        assert_eq!(err.reasons["has too little free memory"], 1);
    }

    #[test]
    fn strict_images_and_config_parsing() {
        let mut j = job();
        j.image = Some("alpine".into());
        let host = snap("host", 0, None);
        let mut c: SelectionConfig = serde_json::from_str(r#"{"strict_images": true}"#).unwrap();
        let err = SelectionEngine::from_config(&c)
            .select(&j, std::slice::from_ref(&host))
            .unwrap_err();
        assert_eq!(err.reasons["cannot run images"], 1);
        c.strict_images = false;
        assert_eq!(SelectionEngine::from_config(&c).select(&j, &[host]), Ok(0));
        assert!(serde_json::from_str::<SelectionConfig>(r#"{"weights": {"fastest": 1}}"#).is_err());
        assert!(serde_json::from_str::<SelectionConfig>(r#"{"colour": 1}"#).is_err());
    }

    /// A pool's label index and the batch scorers change nothing: `select_in` and
    /// `select` agree, and `scores` matches per-runner `score`, on varied runners.
    #[test]
    fn indexed_selection_agrees_with_the_plain_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut all = BTreeMap::new();
        for kind in [
            ScorerKind::LeastLoaded,
            ScorerKind::BinPack,
            ScorerKind::Spread,
            ScorerKind::FastestStartup,
            ScorerKind::RoundRobin,
            ScorerKind::LabelAffinity,
        ] {
            all.insert(kind, 1.0 + (next() % 3) as f64);
        }
        let engines = [
            SelectionEngine::default(),
            SelectionEngine::from_config(&SelectionConfig {
                weights: all,
                strict_images: false,
                preferred_labels: vec!["l1".into(), "l2".into()],
            }),
        ];
        for round in 0..200 {
            let runners: Vec<RunnerSnapshot> = (0..(1 + next() % 40))
                .map(|i| {
                    let mut s = snap(&format!("r{i}"), (next() % 4) as usize, Some(3));
                    s.info.labels = (0..next() % 4)
                        .map(|_| format!("l{}", next() % 6))
                        .collect();
                    if next() % 5 == 0 {
                        s.reserved_labels.insert(format!("l{}", next() % 6));
                    }
                    if next() % 7 == 0 {
                        s.health = Health::Unhealthy("down".into());
                    }
                    s.startup = (next() % 3 > 0).then(|| Duration::from_micros(next() % 900 + 1));
                    s.last_assigned = (next() % 3 > 0).then(|| next() % 50);
                    s.capabilities.images = next() % 3 == 0;
                    s
                })
                .collect();
            let mut job = job();
            job.runs_on.labels = (0..next() % 3)
                .map(|_| format!("l{}", next() % 6))
                .collect();
            if next() % 3 == 0 {
                job.image = Some("busybox".into());
            }
            let mut pool = RunnerPool::new(runners.clone());
            let mut runners = runners;
            for engine in &engines {
                // A few decisions in a row, each recorded in the pool as the dispatcher does.
                for _ in 0..3 {
                    let chosen = engine.select_in(&job, &pool);
                    assert_eq!(chosen, engine.select(&job, &runners), "round {round}");
                    let Ok(i) = chosen else { break };
                    pool.record_assignment(i, &job.name);
                    runners[i].running += 1;
                    *runners[i]
                        .running_by_name
                        .entry(job.name.clone())
                        .or_default() += 1;
                }
                let passing: Vec<&RunnerSnapshot> = runners
                    .iter()
                    .filter(|r| engine.filters.iter().all(|f| f.check(&job, r).is_ok()))
                    .collect();
                let expected: Vec<f64> = (0..passing.len())
                    .map(|i| {
                        engine
                            .scorers
                            .iter()
                            .map(|(s, w)| w * s.score(&job, &passing, i).clamp(0.0, 1.0))
                            .sum()
                    })
                    .collect();
                let got: Vec<f64> = engine
                    .scores(&job, &runners)
                    .into_iter()
                    .flatten()
                    .collect();
                assert_eq!(got.len(), expected.len());
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        (g - e).abs() < 1e-9,
                        "round {round}: {got:?} vs {expected:?}"
                    );
                }
            }
        }
    }
}
