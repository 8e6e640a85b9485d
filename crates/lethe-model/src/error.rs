//! The one error type of the model runtime.

/// Errors of loading, running and training models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle.
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
    /// A model file is malformed or not what was expected (missing tensor,
    /// wrong shape, missing GGUF metadata key, bad config.json).
    #[error("model format: {0}")]
    Format(String),
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A caller passed an argument the runtime cannot honour (empty batch,
    /// context longer than the model's window, unknown LoRA target, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The requested device is not available in this build or on this machine.
    #[error("device: {0}")]
    Device(String),
}

/// `Result` with the model runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(source: std::io::Error, context: impl Into<String>) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
