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
    /// The runner (or the backend it drives) could not do its work: see [`RunnerError`]
    /// for what kind of failure, whether a retry can help, and the cause.
    #[error(transparent)]
    Runner(Box<RunnerError>),
    /// A job file could not be read.
    #[error("cannot read job file {}", path.display())]
    JobFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What kind of failure a [`RunnerError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Something the runner depends on does not answer or is missing (an engine, a
    /// cluster, a daemon's socket). Temporary by default.
    Unavailable,
    /// The runner's configuration cannot work (here, or at all). Never temporary.
    InvalidConfig,
    /// The engine or cluster refused the request (a 4xx, an admission webhook, an image
    /// reference it does not accept). Not temporary by default.
    Rejected,
    /// An operating-system call failed (a workspace, a cgroup file, a pipe).
    Io,
}

impl ErrorKind {
    /// The kind's name, as in logs and API error details.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Io => "io",
        }
    }

    fn temporary_by_default(self) -> bool {
        matches!(self, ErrorKind::Unavailable)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runner's failure with its structure kept: which runner, what kind of failure,
/// whether trying again can help, what was being done (in words), and the underlying
/// error (bollard's, kube's, the operating system's) as its [`source`].
///
/// Its message is `runner NAME: CONTEXT` (`invalid configuration: ` before the context
/// for [`ErrorKind::InvalidConfig`]); the cause is not repeated in it. Print an error with
/// [`Chain`] to show the causes too.
///
/// [`source`]: std::error::Error::source
#[derive(Debug)]
pub struct RunnerError {
    runner: Option<String>,
    kind: ErrorKind,
    temporary: bool,
    declined: bool,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl RunnerError {
    /// The runner's name, when known (a runner names itself in what it returns; a
    /// configuration refused before the runner exists may not).
    pub fn runner(&self) -> Option<&str> {
        self.runner.as_deref()
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when the same request may succeed if tried again later (an engine that did
    /// not answer, a 5xx, a 429); false when retrying cannot help (a refused spec, a bad
    /// configuration).
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// What was being done, in words.
    pub fn context(&self) -> &str {
        &self.context
    }
}

impl std::fmt::Display for RunnerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = &self.runner {
            write!(f, "runner {r}: ")?;
        }
        if self.kind == ErrorKind::InvalidConfig {
            f.write_str("invalid configuration: ")?;
        }
        f.write_str(&self.context)
    }
}

impl std::error::Error for RunnerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// A runner failure of `kind`, `context` saying what was being done. Temporary when
    /// the kind is by default ([`ErrorKind::Unavailable`]); change it with
    /// [`Error::temporary`].
    pub fn runner_failure(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error::Runner(Box::new(RunnerError {
            runner: None,
            kind,
            temporary: kind.temporary_by_default(),
            declined: false,
            context: context.into(),
            source: None,
        }))
    }

    /// [`ErrorKind::Unavailable`]: something the runner depends on does not answer.
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::runner_failure(ErrorKind::Unavailable, context)
    }

    /// [`ErrorKind::InvalidConfig`]: the runner's configuration cannot work.
    pub fn invalid_config(context: impl Into<String>) -> Self {
        Self::runner_failure(ErrorKind::InvalidConfig, context)
    }

    /// [`ErrorKind::Rejected`]: the engine or cluster refused the request.
    pub fn rejected(context: impl Into<String>) -> Self {
        Self::runner_failure(ErrorKind::Rejected, context)
    }

    /// [`ErrorKind::Io`]: an operating-system call failed; `source` is kept. Temporary when
    /// the host was short of something for now (see [`is_shortage`]).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let temporary = is_shortage(&source);
        Self::runner_failure(ErrorKind::Io, context)
            .caused_by(source)
            .temporary(temporary)
    }

    /// Sets the cause of a runner failure (no effect on other variants).
    pub fn caused_by(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        if let Error::Runner(e) = &mut self {
            e.source = Some(source.into());
        }
        self
    }

    /// Says whether retrying can help (no effect on other variants).
    pub fn temporary(mut self, temporary: bool) -> Self {
        if let Error::Runner(e) = &mut self {
            e.temporary = temporary;
        }
        self
    }

    /// Says that the runner handed the job back before any of it ran (a remote agent that
    /// was not connected, was draining, or refused it for now), so that a control
    /// plane may place it again without counting an attempt (no effect on other
    /// variants).
    pub fn declined(mut self, declined: bool) -> Self {
        if let Error::Runner(e) = &mut self {
            e.declined = declined;
        }
        self
    }

    /// True when nothing of the job ran: a runner failure marked
    /// [`declined`](Error::declined), or a busy runner.
    pub fn is_declined(&self) -> bool {
        match self {
            Error::Runner(e) => e.declined,
            Error::Busy { .. } => true,
            _ => false,
        }
    }

    /// Names the runner, unless the failure already names one (no effect on other
    /// variants).
    pub fn for_runner(mut self, name: &str) -> Self {
        if let Error::Runner(e) = &mut self
            && e.runner.is_none()
        {
            e.runner = Some(name.to_string());
        }
        self
    }

    /// The runner failure's structure, for a [`Error::Runner`].
    pub fn as_runner_error(&self) -> Option<&RunnerError> {
        match self {
            Error::Runner(e) => Some(e),
            _ => None,
        }
    }

    /// The kind of a runner failure; `None` for the other variants.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.as_runner_error().map(RunnerError::kind)
    }

    /// True when trying the same thing again later may succeed: a temporary runner
    /// failure, or a busy runner. A job that breaks the format, a runner that cannot run
    /// it, a bad configuration or a refused request are not.
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Runner(e) => e.is_temporary(),
            Error::Busy { .. } => true,
            _ => false,
        }
    }
}

/// True for the failures of a host that is short of something for now (processes, memory,
/// file descriptors, disk space: `EAGAIN`, `ENOMEM`, `EMFILE`, `ENFILE`, `ENOSPC`), after
/// which the same request may succeed later. A missing file, a refused permission or a
/// limit the host does not allow are not.
pub fn is_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::ENOSPC)
    )
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
