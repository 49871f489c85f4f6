//! Running one job for a check: collecting its events, checking the event contract,
//! and what it left behind.

use super::*;

/// Options for [`run_with`].
#[derive(Default)]
pub(crate) struct RunOptions {
    /// Once stdout shows this text, do this (once).
    pub(crate) on_stdout: Option<(&'static str, Trigger)>,
    /// Keep no output, only count it and sample this process's memory (for large output).
    pub(crate) count_only: bool,
}

#[derive(Clone, Copy)]
pub(crate) enum Trigger {
    /// Cancel the execution.
    Cancel,
    /// Write a line into the FIFO of this name in the job's working directory, which the
    /// job waits on (see [`open_gate`]); cancel the execution when no process of the job
    /// on this host has it.
    OpenGate(&'static str),
}

/// What became of a [`Trigger::OpenGate`].
#[derive(Debug, Default)]
pub(crate) enum Gate {
    /// The text never appeared.
    #[default]
    NotReached,
    /// Opened after this many stdout bytes had arrived.
    Opened { stdout_before: usize },
    /// No process of the job on this host had the FIFO; the execution was cancelled.
    Unreachable,
}

/// Starts `job`, collects everything, checks the event contract and leftovers.
pub async fn run_job(target: &Target, job: &Job) -> Result<Record, Failure> {
    run_with(target, job, RunOptions::default())
        .await
        .map(|(r, _)| r)
}

pub(crate) async fn run_with(
    target: &Target,
    job: &Job,
    opts: RunOptions,
) -> Result<(Record, Stats), Failure> {
    // Read before the job starts: an unreadable size fails the run, never passes a bound.
    let baseline_rss = if opts.count_only {
        Some(rss_bytes().map_err(rss_failure)?)
    } else {
        None
    };
    let since = boot_ticks_now();
    let started = Instant::now();
    let execution = target
        .runner()
        .start(job, JobId::new())
        .await
        .map_err(|e| Failure(format!("start of job {} failed: {e}", job.name)))?;
    let id = execution.id().clone();
    let mut run = Collector {
        record: Record {
            id: id.clone(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            outcome: Outcome::Lost,
            events: Vec::new(),
            elapsed: Duration::ZERO,
        },
        stats: Stats::default(),
        watch: ProcessWatch::new(id.clone(), target.on_host(), since),
        opts: &opts,
        baseline_rss,
        expected_seq: 0,
        finished: None,
        triggered: false,
        gate: None,
        execution,
    };
    // The first failure is kept; the job is then cancelled and its events drained, so that
    // a failing check does not leave its job running.
    let mut failure = None;
    while let Some(event) = run.execution.next_event().await {
        if let Err(f) = run.on_event(event)
            && failure.is_none()
        {
            run.execution.cancel();
            failure = Some(f);
        }
    }
    let Collector {
        mut record,
        mut stats,
        watch,
        finished,
        execution,
        gate,
        ..
    } = run;
    record.outcome = execution.wait().await;
    record.elapsed = started.elapsed();
    // The job may read from the gate until it ends.
    drop(gate);
    if let Some(f) = failure {
        return Err(f);
    }
    let from_event =
        finished.ok_or_else(|| Failure("the event stream ended without Finished".into()))?;
    ensure!(
        record.outcome == from_event,
        "wait returned {:?} but Finished carried {:?}",
        record.outcome,
        from_event
    );
    stats.tree_only = watch.tree_only.len();
    let left = watch.leftovers()?;
    ensure!(
        left.is_empty(),
        "processes of job {} are still alive: {}",
        job.name,
        left.join(", ")
    );
    Ok((record, stats))
}

/// The state of one run while its events arrive.
pub(crate) struct Collector<'a> {
    pub(crate) record: Record,
    pub(crate) stats: Stats,
    pub(crate) watch: ProcessWatch,
    pub(crate) opts: &'a RunOptions,
    pub(crate) baseline_rss: Option<u64>,
    pub(crate) expected_seq: u64,
    pub(crate) finished: Option<Outcome>,
    pub(crate) triggered: bool,
    pub(crate) gate: Option<File>,
    pub(crate) execution: crate::runner::Execution,
}

impl Collector<'_> {
    pub(crate) fn on_event(&mut self, event: crate::runner::Event) -> Result<(), Failure> {
        ensure!(
            event.seq == self.expected_seq,
            "event sequence jumped from {} to {}",
            self.expected_seq,
            event.seq
        );
        self.expected_seq += 1;
        ensure!(
            self.finished.is_none(),
            "an event arrived after Finished: {:?}",
            event.kind
        );
        if event.seq == 0 {
            ensure!(
                matches!(event.kind, EventKind::Started { .. }),
                "the first event is {:?}, not Started",
                event.kind
            );
        }
        match event.kind {
            EventKind::Output { stream, data, .. } => {
                // Before anything reacts to the output (a cancel may kill the processes).
                self.watch.on_output()?;
                match stream {
                    OutputStream::Stdout => self.stats.stdout_bytes += data.len() as u64,
                    OutputStream::Stderr => self.stats.stderr_bytes += data.len() as u64,
                }
                if let Some(baseline) = self.baseline_rss {
                    self.stats.stdout_all_zero &= data.iter().all(|b| *b == 0);
                    let now = rss_bytes().map_err(rss_failure)?;
                    self.stats.peak_rss_growth =
                        self.stats.peak_rss_growth.max(now.saturating_sub(baseline));
                } else {
                    match stream {
                        OutputStream::Stdout => self.record.stdout.extend_from_slice(&data),
                        OutputStream::Stderr => self.record.stderr.extend_from_slice(&data),
                    }
                }
                self.react()?;
            }
            EventKind::StepStarted { .. } => {
                self.watch.step_started();
                self.record.events.push(event.kind);
            }
            EventKind::Finished { outcome } => self.finished = Some(outcome),
            other => self.record.events.push(other),
        }
        Ok(())
    }

    /// Carries out the options' trigger once stdout shows its text.
    pub(crate) fn react(&mut self) -> Result<(), Failure> {
        let Some((text, trigger)) = self.opts.on_stdout else {
            return Ok(());
        };
        if self.triggered || !String::from_utf8_lossy(&self.record.stdout).contains(text) {
            return Ok(());
        }
        self.triggered = true;
        match trigger {
            Trigger::Cancel => self.execution.cancel(),
            Trigger::OpenGate(name) => match open_gate(&self.watch, name)? {
                Some(fifo) => {
                    self.gate = Some(fifo);
                    self.stats.gate = Gate::Opened {
                        stdout_before: self.record.stdout.len(),
                    };
                }
                None => {
                    self.execution.cancel();
                    self.stats.gate = Gate::Unreachable;
                }
            },
        }
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) stdout_bytes: u64,
    pub(crate) stderr_bytes: u64,
    pub(crate) stdout_all_zero: bool,
    pub(crate) peak_rss_growth: u64,
    pub(crate) gate: Gate,
    /// Processes the watch found only through the process tree (host runners).
    pub(crate) tree_only: usize,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_all_zero: true,
            peak_rss_growth: 0,
            gate: Gate::default(),
            tree_only: 0,
        }
    }
}

/// Resident memory of this process in bytes, from `VmRSS` in `/proc/self/status`; an
/// error when that cannot be read or has no such line.
pub fn rss_bytes() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "/proc/self/status has no readable VmRSS line",
            )
        })
}

pub(crate) fn rss_failure(e: std::io::Error) -> Failure {
    Failure(format!(
        "cannot read this process's resident memory, so the memory bound cannot be checked: {e}"
    ))
}

pub(crate) fn expect_outcome(
    record: &Record,
    what: &str,
    ok: impl Fn(&Outcome) -> bool,
) -> Result<(), Failure> {
    ensure!(
        ok(&record.outcome),
        "{what}: got outcome {:?}; stdout {:?}; stderr {:?}",
        record.outcome,
        tail(&record.stdout),
        tail(&record.stderr)
    );
    Ok(())
}

pub(crate) fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(400);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
