//! The crate's one public error type.

use crate::job::ValidationErrors;

/// Why a runner or the job loader could not do its work.
///
/// A job that runs and fails is not an error: it is an [`crate::runner::Outcome`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job breaks the job format's rules.
    #[error("invalid job:\n{0}")]
    InvalidSpec(ValidationErrors),
    /// The runner cannot run this job (a step kind, a limit or an image it does not support).
    #[error("runner {runner} cannot run this job: {reasons}", reasons = .reasons.join("; "))]
    Unsupported {
        /// The runner's name.
        runner: String,
        /// Every reason, in words.
        reasons: Vec<String>,
    },
    /// The runner is at its concurrency limit.
    #[error("runner {runner} is busy: {running} of {max} slots in use")]
    Busy {
        /// The runner's name.
        runner: String,
        /// Jobs running.
        running: usize,
        /// Its limit.
        max: usize,
    },
    /// The runner's configuration cannot work on this host.
    #[error("invalid runner configuration: {0}")]
    InvalidConfig(String),
    /// Something the runner depends on is not available.
    #[error("{0}")]
    Unavailable(String),
    /// An operating-system call failed.
    #[error("{context}")]
    Io {
        /// What was being done, naming the path or program.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Displays an error with every cause in its source chain, `outer: inner: innermost`,
/// for messages that reach a person (the CLI, API error envelopes, logs). Error types in
/// this project keep their cause out of their own message, as the standard library
/// advises, so this is how the whole story gets printed.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut last = self.0.to_string();
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            // A transparent wrapper repeats its source's message; print it once.
            if text != last && !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            next = e.source();
        }
        Ok(())
    }
}
