//! The job queue: higher priority first, fair share between submitters within a priority
//! (the submitter with the fewest running jobs goes first), FIFO otherwise.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use rustci_runners::runner::JobId;

/// A job waiting in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueuedJob {
    /// The job's id.
    pub id: JobId,
    /// Higher runs first.
    pub priority: i32,
    /// Who submitted it (fair share key).
    pub submitter: String,
    /// Submission order.
    pub seq: u64,
}

/// Jobs waiting for a runner: by priority, then per submitter in submission order.
#[derive(Debug, Default)]
pub struct JobQueue {
    /// Priority (highest first) → submitter → sequence → job.
    levels: BTreeMap<Reverse<i32>, HashMap<String, BTreeMap<u64, JobId>>>,
    index: HashMap<JobId, (i32, String, u64, BTreeSet<String>)>,
    next_seq: u64,
    /// How many queued jobs ask for each set of labels; the empty set counts the jobs
    /// that ask for none.
    label_sets: HashMap<BTreeSet<String>, usize>,
}

impl JobQueue {
    /// An empty queue.
    pub fn new() -> Self {
        JobQueue::default()
    }

    /// Adds a job at the end of its priority. Its labels are not known to the queue:
    /// it counts as a job any runner may take (see [`JobQueue::label_sets`]).
    pub fn push(&mut self, id: JobId, priority: i32, submitter: impl Into<String>) {
        self.push_asking(id, priority, submitter, BTreeSet::new());
    }

    /// [`JobQueue::push`] of a job asking for runners carrying every label of `labels`.
    /// A job already queued stays as it is.
    pub fn push_asking(
        &mut self,
        id: JobId,
        priority: i32,
        submitter: impl Into<String>,
        labels: BTreeSet<String>,
    ) {
        let submitter = submitter.into();
        if self.index.contains_key(&id) {
            return;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        self.levels
            .entry(Reverse(priority))
            .or_default()
            .entry(submitter.clone())
            .or_default()
            .insert(seq, id.clone());
        *self.label_sets.entry(labels.clone()).or_default() += 1;
        self.index.insert(id, (priority, submitter, seq, labels));
    }

    /// Removes a job; true when it was queued.
    pub fn remove(&mut self, id: &JobId) -> bool {
        let Some((priority, submitter, seq, labels)) = self.index.remove(id) else {
            return false;
        };
        if let Some(level) = self.levels.get_mut(&Reverse(priority)) {
            if let Some(fifo) = level.get_mut(&submitter) {
                fifo.remove(&seq);
                if fifo.is_empty() {
                    level.remove(&submitter);
                }
            }
            if level.is_empty() {
                self.levels.remove(&Reverse(priority));
            }
        }
        if let Some(n) = self.label_sets.get_mut(&labels) {
            *n -= 1;
            if *n == 0 {
                self.label_sets.remove(&labels);
            }
        }
        true
    }

    /// The sets of labels the queued jobs ask for, each once, in order; `None` when a
    /// queued job asks for no label (or was queued by [`JobQueue::push`]), as any runner
    /// may fit it then. Costs the number of distinct sets, not the length of the queue.
    pub fn label_sets(&self) -> Option<Vec<BTreeSet<String>>> {
        if self.label_sets.contains_key(&BTreeSet::new()) {
            return None;
        }
        let mut sets: Vec<BTreeSet<String>> = self.label_sets.keys().cloned().collect();
        sets.sort();
        Some(sets)
    }

    /// Every queued job's id, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = &JobId> {
        self.index.keys()
    }

    /// Number of queued jobs.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The queue in dispatch order, given how many jobs each submitter has running:
    /// higher priority first; within a priority, jobs of submitters with fewer running
    /// jobs first, then submission order.
    pub fn ordered(&self, running_by_submitter: &HashMap<String, usize>) -> Vec<QueuedJob> {
        self.iter_ordered(running_by_submitter).collect()
    }

    /// [`JobQueue::ordered`] lazily: producing the first `n` jobs costs about
    /// `n log(submitters)`, not a sort of the whole queue.
    pub fn iter_ordered<'a>(
        &'a self,
        running_by_submitter: &'a HashMap<String, usize>,
    ) -> impl Iterator<Item = QueuedJob> + 'a {
        self.levels
            .iter()
            .flat_map(move |(Reverse(priority), level)| {
                // A k-way merge of the submitters' FIFOs by (running jobs, sequence).
                let mut fifos: Vec<(
                    &String,
                    std::iter::Peekable<std::collections::btree_map::Iter<'a, u64, JobId>>,
                )> = level
                    .iter()
                    .map(|(s, fifo)| (s, fifo.iter().peekable()))
                    .collect();
                let mut heap = BinaryHeap::new();
                for (i, (submitter, fifo)) in fifos.iter_mut().enumerate() {
                    if let Some((seq, _)) = fifo.peek() {
                        let running = running_by_submitter.get(*submitter).copied().unwrap_or(0);
                        heap.push(Reverse((running, **seq, i)));
                    }
                }
                let priority = *priority;
                std::iter::from_fn(move || {
                    let Reverse((running, _, i)) = heap.pop()?;
                    let (submitter, fifo) = &mut fifos[i];
                    let (seq, id) = fifo.next()?;
                    if let Some((next, _)) = fifo.peek() {
                        heap.push(Reverse((running, **next, i)));
                    }
                    Some(QueuedJob {
                        id: id.clone(),
                        priority,
                        submitter: (*submitter).clone(),
                        seq: *seq,
                    })
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_fair_share_then_fifo() {
        let mut q = JobQueue::new();
        let ids: Vec<JobId> = (0..5).map(|i| JobId::from(format!("j{i}"))).collect();
        q.push(ids[0].clone(), 0, "alice");
        q.push(ids[1].clone(), 0, "alice");
        q.push(ids[2].clone(), 0, "bob");
        q.push(ids[3].clone(), 5, "carol");
        q.push(ids[4].clone(), 0, "bob");
        let running = HashMap::from([("alice".to_string(), 2), ("bob".to_string(), 0)]);
        let order: Vec<String> = q
            .ordered(&running)
            .iter()
            .map(|j| j.id.to_string())
            .collect();
        assert_eq!(order, ["j3", "j2", "j4", "j0", "j1"]);
        assert!(q.remove(&ids[2]));
        assert!(!q.remove(&ids[2]));
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn label_sets_follow_pushes_and_removals() {
        let mut q = JobQueue::new();
        let set = |ls: &[&str]| ls.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>();
        let id = |i: u32| JobId::from(format!("j{i}"));
        assert_eq!(q.label_sets(), Some(vec![]));
        q.push_asking(id(0), 0, "a", set(&["linux", "x86"]));
        q.push_asking(id(1), 0, "a", set(&["gpu"]));
        q.push_asking(id(2), 0, "b", set(&["gpu"]));
        // Pushed again while queued: nothing changes.
        q.push_asking(id(2), 0, "b", set(&["other"]));
        assert_eq!(
            q.label_sets(),
            Some(vec![set(&["gpu"]), set(&["linux", "x86"])])
        );
        q.push_asking(id(3), 0, "b", set(&[]));
        assert_eq!(
            q.label_sets(),
            None,
            "a job asking for no label fits any runner"
        );
        q.push(id(4), 0, "c");
        assert!(q.remove(&id(3)));
        assert_eq!(q.label_sets(), None, "labels unknown (push) count as none");
        assert!(q.remove(&id(4)));
        assert!(q.remove(&id(1)));
        assert_eq!(
            q.label_sets(),
            Some(vec![set(&["gpu"]), set(&["linux", "x86"])]),
            "one job still asks for gpu"
        );
        assert!(q.remove(&id(2)) && q.remove(&id(0)));
        assert_eq!(q.label_sets(), Some(vec![]));
    }
}
