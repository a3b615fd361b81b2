//! Why a build did not produce a result, as data: which step, what kind of failure, and
//! the typed cause chain (`std::error::Error::source`), so that a cluster worker can say
//! "step 3 exited with status 2" without parsing text.

use std::path::PathBuf;
use std::sync::Arc;

use crate::copy::CopyError;
use crate::db::DbError;
use crate::fetch::FetchError;
use crate::sandbox::SandboxError;
use crate::store::StoreError;

/// Which step of a build failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepRef {
    /// 1-based position among the build's steps (`from`, `run`, `copy`, stages included,
    /// in the order they run).
    pub index: usize,
    /// How many steps the spec has in all.
    pub total: usize,
    /// The step as the log heads it: `/src: (run (shell "make"))`.
    pub heading: String,
    /// The step's id, once known.
    pub id: Option<String>,
}

/// What went wrong, without the step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The step's command ran and exited non-zero.
    #[error("`{cmd}` exited with status {status}")]
    Exited { cmd: String, status: i32 },
    /// The step's command was killed by a signal.
    #[error("`{cmd}` was killed by signal {signal}{}", hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Signalled {
        cmd: String,
        signal: i32,
        /// What probably sent it (a memory limit).
        hint: Option<String>,
    },
    /// The step ran longer than the step time limit.
    #[error("`{cmd}` was stopped after the step time limit of {secs} s (--step-timeout)")]
    TimedOut { cmd: String, secs: u64 },
    /// The store's filesystem filled up during the step: whatever it wrote may be
    /// incomplete, so nothing was saved.
    #[error("the store {store} ran out of space during the step ({free} left); nothing was saved. Free space with `obuilder prune --keep-free PERCENT` or `obuilder clean`")]
    DiskFull { store: String, free: String },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The spec cannot be built as written (found before anything ran).
    #[error("{0}")]
    Invalid(String),
    /// Secrets the spec asks for but the caller did not give.
    #[error("the spec needs secret(s) {} that were not given; pass each with --secret ID:FILE", .0.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", "))]
    MissingSecrets(Vec<String>),
    /// A bug: something the builder relies on did not hold.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl StepError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StepError::Io { what, path, source }
    }
}

/// The kind of a failure, for a caller that reports it without the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FailureKind {
    /// The step's command exited with this status.
    Exited {
        status: i32,
    },
    /// The step's command was killed by this signal.
    Signalled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    /// The spec is invalid or asks for something not given.
    Spec,
    DiskFull,
    Sandbox,
    Store,
    Fetch,
    Copy,
    Internal,
}

/// Why a build did not produce a result. Cheap to clone: every waiter of a shared step
/// gets the same one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    #[error("cancelled")]
    Cancelled,
    /// A step failed.
    #[error("{error}")]
    Step {
        step: StepRef,
        #[source]
        error: Arc<StepError>,
    },
    /// Something outside any one step failed (an invalid spec, a missing secret).
    #[error(transparent)]
    Build(Arc<StepError>),
}

impl From<StepError> for BuildError {
    fn from(e: StepError) -> BuildError {
        BuildError::Build(Arc::new(e))
    }
}

impl BuildError {
    /// The failing step, if the failure belongs to one.
    pub fn step(&self) -> Option<&StepRef> {
        match self {
            BuildError::Step { step, .. } => Some(step),
            _ => None,
        }
    }

    /// The underlying error, if any.
    pub fn error(&self) -> Option<&StepError> {
        match self {
            BuildError::Cancelled => None,
            BuildError::Step { error, .. } | BuildError::Build(error) => Some(error),
        }
    }

    pub fn kind(&self) -> FailureKind {
        let Some(e) = self.error() else {
            return FailureKind::Cancelled;
        };
        match e {
            StepError::Exited { status, .. } => FailureKind::Exited { status: *status },
            StepError::Signalled { signal, .. } => FailureKind::Signalled { signal: *signal },
            StepError::TimedOut { .. } => FailureKind::TimedOut,
            StepError::DiskFull { .. } => FailureKind::DiskFull,
            StepError::Sandbox(SandboxError::Cancelled) => FailureKind::Cancelled,
            StepError::Sandbox(_) => FailureKind::Sandbox,
            StepError::Store(_) | StepError::Db(_) | StepError::Io { .. } => FailureKind::Store,
            // A name that matches no image is the spec's mistake, not the fetcher's.
            StepError::Fetch(FetchError::Unknown { .. }) => FailureKind::Spec,
            StepError::Fetch(_) => FailureKind::Fetch,
            StepError::Copy(_) => FailureKind::Copy,
            StepError::Invalid(_) | StepError::MissingSecrets(_) => FailureKind::Spec,
            StepError::Internal(_) => FailureKind::Internal,
        }
    }

    /// The status the step's command exited with, if that is what failed.
    pub fn exit_status(&self) -> Option<i32> {
        match self.kind() {
            FailureKind::Exited { status } => Some(status),
            _ => None,
        }
    }

    /// True when the build's own steps failed (their command exited non-zero, was killed
    /// or timed out, their `copy` or `(user …)` cannot be done, their command does not
    /// exist), as opposed to obuilder or its store failing.
    pub fn is_step_failure(&self) -> bool {
        match self.kind() {
            FailureKind::Exited { .. }
            | FailureKind::Signalled { .. }
            | FailureKind::TimedOut
            | FailureKind::Copy => true,
            FailureKind::Sandbox => matches!(
                self.error(),
                Some(StepError::Sandbox(
                    SandboxError::NoCommand(_) | SandboxError::Unsupported(_)
                ))
            ),
            _ => false,
        }
    }

    /// Attaches the step to an error raised inside it (an error already attached keeps
    /// the innermost step).
    pub fn in_step(self, step: &StepRef) -> BuildError {
        match self {
            BuildError::Build(error) => BuildError::Step {
                step: step.clone(),
                error,
            },
            other => other,
        }
    }
}
