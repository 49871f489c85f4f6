//! Per-minute aggregates of the last hours, kept as jobs finish and start writing: what
//! the dashboard's overview draws (jobs per minute by outcome, p50 and p95 of pickup and
//! duration) without reading any job. A job costs one bucket update under a mutex; a
//! snapshot copies at most [`MINUTES`] minutes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Minutes kept (6 hours).
pub const MINUTES: usize = 360;

/// Histogram buckets: bucket `i` holds values up to `2^(i/2)` ms (1 ms to about 6.6 h;
/// the last one holds everything longer).
const BUCKETS: usize = 50;

/// Counts by log-spaced bucket: quantiles within a factor of √2.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
}

fn upper_ms(i: usize) -> f64 {
    2f64.powf(i as f64 / 2.0)
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        let ms = d.as_secs_f64() * 1000.0;
        let i = if ms <= 1.0 {
            0
        } else {
            ((ms.log2() * 2.0).ceil() as usize).min(BUCKETS - 1)
        };
        self.counts[i] += 1;
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0 to 1), as its bucket's upper bound; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(upper_ms(i) / 1000.0));
            }
        }
        None
    }
}

/// One minute's aggregates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub at: u64,
    /// Jobs that ended, by terminal state (`succeeded`, `failed`, `cancelled`, ...).
    pub finished: Vec<(&'static str, u64)>,
    /// Submit to end of the jobs that ended.
    pub duration: Histogram,
    /// Submit to first output of the jobs whose first output came.
    pub pickup: Histogram,
}

impl Minute {
    /// Jobs that ended in this minute.
    pub fn finished_total(&self) -> u64 {
        self.finished.iter().map(|(_, n)| n).sum()
    }
}

/// The aggregates, newest minute last.
#[derive(Debug, Default)]
pub struct Timeline {
    minutes: Mutex<VecDeque<Minute>>,
}

fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60
}

impl Timeline {
    fn with_minute(&self, f: impl FnOnce(&mut Minute)) {
        let now = minute_of(SystemTime::now());
        let mut m = self.minutes.lock().expect("timeline");
        if m.back().is_none_or(|b| b.at < now) {
            m.push_back(Minute {
                at: now,
                ..Minute::default()
            });
            while m.len() > MINUTES {
                m.pop_front();
            }
        }
        f(m.back_mut().expect("pushed"));
    }

    /// A job ended in `state` after `total` since it was submitted.
    pub fn finished(&self, state: &'static str, total: Duration) {
        self.with_minute(|m| {
            match m.finished.iter_mut().find(|(s, _)| *s == state) {
                Some((_, n)) => *n += 1,
                None => m.finished.push((state, 1)),
            }
            m.duration.observe(total);
        });
    }

    /// A job's first output came `since` it was submitted.
    pub fn first_output(&self, since: Duration) {
        self.with_minute(|m| m.pickup.observe(since));
    }

    /// A copy of the minutes of the last [`MINUTES`], with the current minute's number.
    pub fn snapshot(&self) -> Snapshot {
        let now = minute_of(SystemTime::now());
        let minutes = self
            .minutes
            .lock()
            .expect("timeline")
            .iter()
            .filter(|m| m.at + MINUTES as u64 > now)
            .cloned()
            .collect();
        Snapshot { now, minutes }
    }
}

/// A copy of the timeline.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The current minute (since the Unix epoch).
    pub now: u64,
    /// Minutes with anything in them, oldest first.
    pub minutes: Vec<Minute>,
}

impl Snapshot {
    /// Jobs that ended within `window`, in whole minutes up to the current one (an hour
    /// is the same 60 minutes as `last(60)`).
    pub fn finished_since(&self, window: Duration) -> u64 {
        let from = (self.now + 1).saturating_sub((window.as_secs() / 60).max(1));
        self.minutes
            .iter()
            .filter(|m| m.at >= from)
            .map(Minute::finished_total)
            .sum()
    }

    /// The minutes `[now - n + 1, now]` in order, empty where nothing happened.
    pub fn last(&self, n: usize) -> Vec<Minute> {
        let from = (self.now + 1).saturating_sub(n as u64);
        (from..=self.now)
            .map(|at| {
                self.minutes
                    .iter()
                    .find(|m| m.at == at)
                    .cloned()
                    .unwrap_or(Minute {
                        at,
                        ..Minute::default()
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds_within_a_factor_of_root_two() {
        let mut h = Histogram::default();
        for ms in 1..=100u64 {
            h.observe(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64() * 1000.0;
        let p95 = h.quantile(0.95).unwrap().as_secs_f64() * 1000.0;
        assert!((50.0..=50.0 * 2f64.sqrt()).contains(&p50), "{p50}");
        assert!((95.0..=95.0 * 2f64.sqrt()).contains(&p95), "{p95}");
        assert_eq!(Histogram::default().quantile(0.5), None);
        let mut merged = Histogram::default();
        merged.merge(&h);
        merged.merge(&h);
        assert_eq!(merged.count(), 200);
        assert_eq!(merged.quantile(0.5), h.quantile(0.5));
    }

    #[test]
    fn finished_jobs_are_counted_by_state_in_the_current_minute() {
        let t = Timeline::default();
        t.finished("succeeded", Duration::from_millis(20));
        t.finished("succeeded", Duration::from_millis(40));
        t.finished("failed", Duration::from_secs(2));
        t.first_output(Duration::from_millis(3));
        let s = t.snapshot();
        assert_eq!(s.finished_since(Duration::from_secs(3600)), 3);
        let last = s.last(60);
        assert_eq!(last.len(), 60);
        let now = last.last().unwrap();
        assert_eq!(now.at, s.now);
        assert_eq!(now.finished, [("succeeded", 2), ("failed", 1)]);
        assert_eq!(now.duration.count(), 3);
        assert_eq!(now.pickup.count(), 1);
        assert!(last[..59].iter().all(|m| m.finished_total() == 0));
    }
}
