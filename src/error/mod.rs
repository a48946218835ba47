//! One error type for the whole core; the bindings map each kind to one Python exception.

#[cfg(feature = "python")]
pub mod py;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// Bad configuration or argument value (Python `ValueError`).
    #[error("{0}")]
    InvalidValue(String),
    /// An argument of the wrong type (Python `TypeError`).
    #[error("{0}")]
    InvalidType(String),
    /// The backend could not be reached and the caller asked not to fail open.
    #[error("{0}")]
    BackendUnavailable(String),
    /// A backend answered, but with an error (wrong type, script error, ...).
    #[error("{0}")]
    Backend(String),
    /// Waiting here could never end (a thread waiting for a flight it leads itself).
    #[error("{0}")]
    WouldDeadlock(String),
}

pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        CoreError::InvalidValue(msg.into())
    }
}
