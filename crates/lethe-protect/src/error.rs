//! The one error type of dataset protection.
//!
//! Every failure a user can cause (a corrupt file, images of different
//! sizes, an epsilon outside its range, a checkpoint from another run) is a
//! variant here with a message that names the file or the parameter; the
//! library never panics on user input.

use std::path::{Path, PathBuf};

/// Errors of loading, protecting, auditing and writing datasets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A data file could not be decoded (corrupt PNG, truncated DICOM,
    /// malformed `.npy` header, ...).
    #[error("{path}: {detail}")]
    Decode {
        /// The offending file.
        path: PathBuf,
        /// What was wrong with it.
        detail: String,
    },
    /// The data is readable but not something this crate can protect
    /// (compressed DICOM, 4-channel PNG with transparency, images of
    /// different shapes in one dataset, a single class, ...).
    #[error("unsupported data: {0}")]
    Unsupported(String),
    /// A parameter is out of range or inconsistent (epsilon, rho, rounds,
    /// split fractions, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A checkpoint exists but belongs to a different configuration or is
    /// damaged.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },
    /// The run was cancelled through its [`crate::RunControl`].
    #[error("cancelled")]
    Cancelled,
    /// The model runtime failed.
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A bundled dataset could not be fetched.
    #[error(transparent)]
    Assets(#[from] lethe_assets::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(source: std::io::Error, context: impl Into<String>) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A decoding error for `path`.
    pub fn decode(path: &Path, detail: impl Into<String>) -> Error {
        Error::Decode {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}
