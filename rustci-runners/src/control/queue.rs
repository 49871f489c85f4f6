//! The job queue: higher priority first, fair share between submitters within a priority
//! (the submitter with the fewest running jobs goes first), FIFO otherwise.

use std::collections::HashMap;

use crate::runner::JobId;

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

/// Jobs waiting for a runner.
#[derive(Debug, Default)]
pub struct JobQueue {
    jobs: Vec<QueuedJob>,
    next_seq: u64,
}

impl JobQueue {
    /// An empty queue.
    pub fn new() -> Self {
        JobQueue::default()
    }

    /// Adds a job at the end of its priority.
    pub fn push(&mut self, id: JobId, priority: i32, submitter: impl Into<String>) {
        self.next_seq += 1;
        self.jobs.push(QueuedJob {
            id,
            priority,
            submitter: submitter.into(),
            seq: self.next_seq,
        });
    }

    /// Removes a job; true when it was queued.
    pub fn remove(&mut self, id: &JobId) -> bool {
        let before = self.jobs.len();
        self.jobs.retain(|j| &j.id != id);
        before != self.jobs.len()
    }

    /// Number of queued jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The queue in dispatch order, given how many jobs each submitter has running.
    pub fn ordered(&self, running_by_submitter: &HashMap<String, usize>) -> Vec<QueuedJob> {
        let mut jobs = self.jobs.clone();
        jobs.sort_by_key(|j| {
            (
                std::cmp::Reverse(j.priority),
                running_by_submitter.get(&j.submitter).copied().unwrap_or(0),
                j.seq,
            )
        });
        jobs
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
}
