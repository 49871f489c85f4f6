//! Delivering a step's output as events: masking, then the job's output limit.
//!
//! Every runner feeds raw chunks from each stream of a step into a [`StreamWriter`]; the
//! writer masks secrets (also across chunk boundaries), counts bytes against the job's
//! [`OutputBudget`] and emits [`EventKind::Output`] events, and once the budget is spent
//! emits a single [`EventKind::OutputTruncated`] and drops the rest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

use crate::mask::{Masker, SecretSet};
use crate::runner::{EventKind, ExecutionSink, OutputStream};

/// Output accounting shared by all steps and streams of one job.
#[derive(Debug)]
pub struct OutputBudget {
    limit: u64,
    used: AtomicU64,
    truncated: AtomicBool,
}

impl OutputBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        OutputBudget {
            limit,
            used: AtomicU64::new(0),
            truncated: AtomicBool::new(false),
        }
    }
}

/// Masks and delivers one stream of one step.
pub struct StreamWriter<'a> {
    sink: &'a ExecutionSink,
    step: usize,
    stream: OutputStream,
    masker: Masker,
    budget: &'a OutputBudget,
}

impl<'a> StreamWriter<'a> {
    /// A writer for `stream` of step `step`.
    pub fn new(
        sink: &'a ExecutionSink,
        step: usize,
        stream: OutputStream,
        secrets: &SecretSet,
        budget: &'a OutputBudget,
    ) -> Self {
        StreamWriter {
            sink,
            step,
            stream,
            masker: Masker::new(secrets.clone()),
            budget,
        }
    }

    /// Feeds a raw chunk.
    pub async fn write(&mut self, chunk: Bytes) {
        let out = self.masker.push(chunk);
        self.deliver(out).await;
    }

    /// Ends the stream, delivering what the masker held back.
    pub async fn finish(mut self) {
        let rest = self.masker.finish();
        self.deliver(rest).await;
    }

    async fn deliver(&self, mut data: Bytes) {
        if data.is_empty() {
            return;
        }
        let budget = self.budget;
        let before = budget.used.fetch_add(data.len() as u64, Ordering::Relaxed);
        if before >= budget.limit {
            return;
        }
        let room = budget.limit - before;
        let over = (data.len() as u64) > room;
        if over {
            data.truncate(room as usize);
        }
        if !data.is_empty() {
            self.sink
                .emit(EventKind::Output {
                    step: self.step,
                    stream: self.stream,
                    data,
                })
                .await;
        }
        if over && !budget.truncated.swap(true, Ordering::Relaxed) {
            self.sink
                .emit(EventKind::OutputTruncated {
                    step: self.step,
                    limit: budget.limit,
                })
                .await;
        }
    }
}
