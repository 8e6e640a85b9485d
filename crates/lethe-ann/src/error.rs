//! The one error type of `lethe-ann`.
//!
//! Every fallible operation returns [`crate::Result`]. Bad input (wrong
//! dimension, non-finite values, duplicate keys) and bad files (corrupt or
//! written by an incompatible version) are distinct, typed variants so that the
//! document store can react to each without parsing messages.

use std::path::PathBuf;

/// Everything that can go wrong in `lethe-ann`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A vector (inserted or queried) does not have the index's dimension.
    #[error("vector has {got} dimensions, the index expects {expected}")]
    DimensionMismatch {
        /// The index's dimension.
        expected: usize,
        /// The length of the vector that was passed.
        got: usize,
    },
    /// A vector holds a NaN or an infinity.
    #[error("vector holds a non-finite value at position {position}")]
    NonFinite {
        /// Index of the first offending component.
        position: usize,
    },
    /// A vector has (numerically) zero length, so it has no direction.
    #[error("vector has zero norm and cannot be normalised")]
    ZeroVector,
    /// `insert` was called with a key that is already in the index.
    #[error("key {0} is already in the index")]
    DuplicateKey(u64),
    /// A parameter is out of its valid range.
    #[error("invalid parameter: {0}")]
    InvalidParams(String),
    /// The index would exceed one of its fixed-width counters.
    #[error("capacity exceeded: {0}")]
    CapacityExceeded(&'static str),
    /// The worker thread pool for a graph build could not be created.
    #[error("could not start build threads: {0}")]
    ThreadPool(String),
    /// An operating-system I/O error while saving or loading.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is damaged: bad checksum, truncated, or internally inconsistent.
    #[error("corrupt index file {path}: {reason}")]
    DataCorruption {
        /// The damaged file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// A file is intact but was written in a format this build cannot read.
    #[error("incompatible index file {path}: {reason}")]
    IncompatibleFormat {
        /// The file.
        path: PathBuf,
        /// What does not match (magic number, version).
        reason: String,
    },
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
