//! Evaluation suites: each runs lethe's real components on generated data
//! with known ground truth and writes a report (JSON, Markdown) under
//! `evals/results/`.
//!
//! * [`labels`]: label quality and soundness of the answer-label
//!   propagators (conservative, permissive, introspection).

pub mod labels;

/// Errors of the evaluation suites.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// The model failed.
    #[error("model: {0}")]
    Model(String),
}

impl Error {
    pub(crate) fn io(source: std::io::Error, path: &std::path::Path) -> Error {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
