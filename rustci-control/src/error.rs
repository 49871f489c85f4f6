//! The control plane's one public error type.

use rustci_runners::job::ValidationErrors;

/// Why the control plane could not do what it was asked.
///
/// A job that runs and fails is not an error: it is a [`rustci_runners::Outcome`] in the
/// job's record. Store failures are [`Error::Store`], never runner errors; a runner's own
/// failure keeps its structure as [`Error::Runner`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job breaks the job format's rules.
    #[error("invalid job:\n{0}")]
    InvalidSpec(ValidationErrors),
    /// The control plane is shutting down and takes no new jobs.
    #[error("the control plane is shutting down and takes no new jobs")]
    ShuttingDown,
    /// The durable store failed (the database, or a record that does not encode or decode).
    #[error("store {store}: {context}")]
    Store {
        /// Which store: a path, or `memory`.
        store: String,
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A job's log could not be written or read.
    #[error("{context}")]
    Log {
        /// What was being done, naming the file.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An option of the control plane cannot be used (it names the option).
    #[error("invalid control-plane option: {0}")]
    Config(String),
    /// A runner failed (registration, recovery of its leftovers).
    #[error(transparent)]
    Runner(#[from] rustci_runners::Error),
}

impl Error {
    pub(crate) fn log(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Log {
            context: context.into(),
            source,
        }
    }
}
