//! The one error type of the unlearning crate.
//!
//! Bad configurations and bad data are distinct variants so that frontends
//! can tell a user's mistake ("keep_ratio must be in (0, 1]") from a failure
//! of the model runtime.

/// Errors of unlearning methods, metrics and data loading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model runtime failed (shape mismatch, bad adapter, ...).
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A method or metric configuration is invalid; the message names the
    /// field and the accepted range.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The data handed to a method or metric cannot be used (empty forget
    /// set, token outside the vocabulary, too few examples to calibrate, ...).
    #[error("invalid data: {0}")]
    InvalidData(String),
    /// Reading a data file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A data file is malformed.
    #[error("format: {0}")]
    Format(String),
    /// Fetching a bundled asset failed.
    #[error(transparent)]
    Asset(#[from] lethe_assets::Error),
    /// Training diverged (the loss became NaN or infinite).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// An internal guarantee was violated (e.g. a weight outside the SalUn
    /// mask moved). Never expected; reported instead of silently accepted.
    #[error("invariant violated: {0}")]
    Invariant(String),
}

/// `Result` with the unlearning crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(source: std::io::Error, context: impl Into<String>) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Returns `Err(InvalidConfig)` with `msg` unless `ok`.
pub(crate) fn ensure_config(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig(msg()))
    }
}
