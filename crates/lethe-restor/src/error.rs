//! The one error type of the RESTOR evaluation.
//!
//! A bad configuration (the user's mistake) is kept apart from failures of
//! the model runtime or of an unlearning method, and from I/O on the
//! checkpoint folder, so that the CLI can say which one happened.

/// Errors of the RESTOR pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message names the field.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The configuration file could not be parsed.
    #[error("config {path}: {message}")]
    ConfigParse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// An unlearning method or metric failed.
    #[error(transparent)]
    Unlearn(#[from] lethe_unlearn::Error),
    /// The model runtime failed.
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A stored checkpoint or metrics file is unreadable or does not match
    /// its key.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file or folder.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Drawing a figure failed.
    #[error("figure {path}: {message}")]
    Figure {
        /// The figure file.
        path: String,
        /// The backend's message.
        message: String,
    },
    /// The generated world cannot satisfy the configuration (e.g. too few
    /// values of a type to pick a wrong one).
    #[error("world: {0}")]
    World(String),
}

/// `Result` with the RESTOR crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(source: std::io::Error, context: impl Into<String>) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Err(InvalidConfig(msg()))` unless `ok`.
pub(crate) fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig(msg()))
    }
}
