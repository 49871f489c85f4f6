//! Degradation detection: per runner, a rolling window of start-up latency against the
//! runner's own baseline, and of the outcomes that are the runner's fault (runner errors,
//! lost attempts). A runner whose figures cross a threshold is `degraded` with the reason
//! in words; the selection engine then prefers other runners, and the runner recovers
//! when its figures return.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Thresholds and windows of degradation detection (`ControlOptions::degradation`, the
/// server's `degradation` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct DegradationOptions {
    /// Detect at all. Default true.
    pub enabled: bool,
    /// Start-ups (submission handed to the runner, to its first event) compared with the
    /// baseline: their median. Default 5.
    pub startup_recent: usize,
    /// Start-ups before those that form the runner's baseline (their median), taken only
    /// while its start-up is not found slow. Default 50.
    pub startup_baseline: usize,
    /// Start-ups the baseline needs before any comparison. Default 5.
    pub startup_min_baseline: usize,
    /// Slow means the recent median is above this many times the baseline's... Default 3.
    pub startup_factor: f64,
    /// ... and above the baseline by at least this many milliseconds (so that a runner
    /// starting in 1 ms is not slow at 4 ms). Default 100.
    pub startup_floor_ms: u64,
    /// Attempts whose outcomes are counted. Default 20.
    pub fault_window: usize,
    /// Attempts the window needs before a rate counts. Default 4.
    pub fault_min: usize,
    /// Share of those attempts that ended in a runner error or lost, from which the runner
    /// is degraded. Default 0.5.
    pub fault_rate: f64,
    /// Samples older than this many seconds are forgotten, so that old evidence does not
    /// keep a runner degraded. Default 600.
    pub max_age_secs: u64,
}

impl Default for DegradationOptions {
    fn default() -> Self {
        DegradationOptions {
            enabled: true,
            startup_recent: 5,
            startup_baseline: 50,
            startup_min_baseline: 5,
            startup_factor: 3.0,
            startup_floor_ms: 100,
            fault_window: 20,
            fault_min: 4,
            fault_rate: 0.5,
            max_age_secs: 600,
        }
    }
}

impl DegradationOptions {
    /// Checks the values: counts at least 1, a factor above 1, a rate in (0, 1].
    pub fn check(&self) -> Result<(), String> {
        if self.startup_recent == 0 || self.startup_baseline == 0 || self.fault_window == 0 {
            return Err("degradation: the windows must hold at least one sample".into());
        }
        if self.startup_min_baseline == 0 || self.startup_min_baseline > self.startup_baseline {
            return Err(format!(
                "degradation.startup_min_baseline: between 1 and startup_baseline ({})",
                self.startup_baseline
            ));
        }
        if self.fault_min == 0 || self.fault_min > self.fault_window {
            return Err(format!(
                "degradation.fault_min: between 1 and fault_window ({})",
                self.fault_window
            ));
        }
        if !(self.startup_factor.is_finite() && self.startup_factor > 1.0) {
            return Err("degradation.startup_factor: a number above 1".into());
        }
        if !(self.fault_rate > 0.0 && self.fault_rate <= 1.0) {
            return Err("degradation.fault_rate: above 0 and at most 1".into());
        }
        Ok(())
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age_secs.max(1))
    }
}

/// What the control plane has seen of one runner's recent jobs.
#[derive(Clone, Debug, Default)]
pub struct RunnerTrack {
    baseline: VecDeque<Duration>,
    recent: VecDeque<(Instant, Duration)>,
    outcomes: VecDeque<(Instant, bool)>,
    slow: bool,
    reason: Option<String>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

impl RunnerTrack {
    /// Why the runner is degraded, when it is.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// A measured start-up. True when the finding changed (degraded or recovered).
    pub fn startup(&mut self, o: &DegradationOptions, took: Duration, now: Instant) -> bool {
        self.recent.push_back((now, took));
        while self.recent.len() > o.startup_recent {
            let (_, d) = self.recent.pop_front().expect("non-empty");
            // A slow runner's start-ups do not become its new normal.
            if !self.slow {
                self.baseline.push_back(d);
                while self.baseline.len() > o.startup_baseline {
                    self.baseline.pop_front();
                }
            }
        }
        self.evaluate(o, now)
    }

    /// An attempt's end: `fault` when it was the runner's (a runner error or lost). True
    /// when the finding changed.
    pub fn outcome(&mut self, o: &DegradationOptions, fault: bool, now: Instant) -> bool {
        self.outcomes.push_back((now, fault));
        while self.outcomes.len() > o.fault_window {
            self.outcomes.pop_front();
        }
        self.evaluate(o, now)
    }

    /// Forgets what is too old and decides again; true when the finding changed.
    pub fn evaluate(&mut self, o: &DegradationOptions, now: Instant) -> bool {
        let before = self.reason.is_some();
        if !o.enabled {
            self.slow = false;
            self.reason = None;
            return before;
        }
        let old = |t: Instant| now.saturating_duration_since(t) > o.max_age();
        while self.recent.front().is_some_and(|(t, _)| old(*t)) {
            self.recent.pop_front();
        }
        while self.outcomes.front().is_some_and(|(t, _)| old(*t)) {
            self.outcomes.pop_front();
        }
        let mut reasons = Vec::new();
        self.slow = false;
        if self.recent.len() >= o.startup_recent && self.baseline.len() >= o.startup_min_baseline {
            let recent = median(self.recent.iter().map(|(_, d)| *d).collect());
            let base = median(self.baseline.iter().copied().collect());
            let floor = Duration::from_millis(o.startup_floor_ms);
            if recent.as_secs_f64() > base.as_secs_f64() * o.startup_factor && recent > base + floor
            {
                self.slow = true;
                let times = recent.as_secs_f64() / base.as_secs_f64().max(1e-6);
                reasons.push(format!(
                    "start-up {} (median of the last {}), {times:.1}x its baseline of {}",
                    ms(recent),
                    self.recent.len(),
                    ms(base)
                ));
            }
        }
        if self.outcomes.len() >= o.fault_min {
            let faults = self.outcomes.iter().filter(|(_, f)| *f).count();
            if faults as f64 / self.outcomes.len() as f64 >= o.fault_rate {
                reasons.push(format!(
                    "{faults} of the last {} attempts ended in a runner error or were lost",
                    self.outcomes.len()
                ));
            }
        }
        self.reason = (!reasons.is_empty()).then(|| reasons.join("; "));
        before != self.reason.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_ups_degrade_and_recover_against_the_runners_own_baseline() {
        let o = DegradationOptions::default();
        let mut t = RunnerTrack::default();
        let now = Instant::now();
        let fast = Duration::from_millis(20);
        for _ in 0..10 {
            assert!(!t.startup(&o, fast, now));
        }
        assert_eq!(t.reason(), None);
        // Two slow ones are not yet the median of five.
        let slow = Duration::from_millis(400);
        assert!(!t.startup(&o, slow, now));
        assert!(!t.startup(&o, slow, now));
        assert!(t.startup(&o, slow, now), "three of five");
        let why = t.reason().unwrap();
        assert!(
            why.contains("start-up 400 ms") && why.contains("20.0x its baseline of 20 ms"),
            "{why}"
        );
        // Slow for a long time: the baseline keeps the runner's normal.
        for _ in 0..100 {
            t.startup(&o, slow, now);
        }
        assert!(t.reason().is_some());
        for _ in 0..2 {
            assert!(!t.startup(&o, fast, now));
        }
        assert!(t.startup(&o, fast, now), "recovered at three fast of five");
        assert_eq!(t.reason(), None);
        // A small absolute rise is not slow, whatever the ratio.
        let mut quick = RunnerTrack::default();
        for _ in 0..10 {
            quick.startup(&o, Duration::from_millis(1), now);
        }
        for _ in 0..5 {
            quick.startup(&o, Duration::from_millis(50), now);
        }
        assert_eq!(quick.reason(), None);
    }

    #[test]
    fn a_runner_fault_rate_degrades_and_old_evidence_expires() {
        let o = DegradationOptions::default();
        let mut t = RunnerTrack::default();
        let now = Instant::now();
        assert!(!t.outcome(&o, true, now));
        assert!(!t.outcome(&o, true, now));
        assert!(!t.outcome(&o, false, now), "three attempts are too few");
        assert!(t.outcome(&o, true, now), "three of four");
        assert_eq!(
            t.reason(),
            Some("3 of the last 4 attempts ended in a runner error or were lost")
        );
        for _ in 0..3 {
            t.outcome(&o, false, now);
        }
        assert_eq!(t.reason(), None, "three of seven");
        t.outcome(&o, true, now);
        assert!(t.reason().is_some(), "four of eight");
        // Ten minutes later, nothing is left of it.
        assert!(t.evaluate(&o, now + Duration::from_secs(601)));
        assert_eq!(t.reason(), None);
        // Disabled: never degraded.
        let off = DegradationOptions {
            enabled: false,
            ..DegradationOptions::default()
        };
        let mut t = RunnerTrack::default();
        for _ in 0..10 {
            t.outcome(&off, true, now);
        }
        assert_eq!(t.reason(), None);
    }

    #[test]
    fn bad_options_are_refused_with_the_field_named() {
        assert!(DegradationOptions::default().check().is_ok());
        let o = DegradationOptions {
            fault_rate: 0.0,
            ..DegradationOptions::default()
        };
        assert!(o.check().unwrap_err().contains("fault_rate"));
        let o = DegradationOptions {
            startup_factor: 0.5,
            ..DegradationOptions::default()
        };
        assert!(o.check().unwrap_err().contains("startup_factor"));
        let o = DegradationOptions {
            fault_min: 30,
            ..DegradationOptions::default()
        };
        assert!(o.check().unwrap_err().contains("fault_min"));
    }
}
