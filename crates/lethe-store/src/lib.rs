//! The labeled document store: every document with its label, chunked,
//! indexed for BM25 (tantivy) and dense retrieval (lethe-ann), searchable
//! only within what a caller may read.
//!
//! # Design
//!
//! One [`Store`] owns a data directory. The *document table* (ids, labels,
//! chunk texts) is the source of truth; the BM25 and vector indexes are
//! derived from it. Every change is first appended to a write-ahead log
//! (framed, checksummed, fsynced: the commit point), then applied to the
//! table and both indexes. Each index records the log sequence number it
//! reflects (tantivy's commit payload, the vector file's generation), so
//! after a crash the store replays exactly what each index missed, and
//! rebuilds an index from the table when the log no longer covers the gap.
//! A torn last log record (a crash mid-append) is cut; it was never
//! acknowledged. The result: after `kill -9` at any point, a reopened store
//! has no half documents and its indexes agree with its table
//! ([`Store::verify`]).
//!
//! Labels are interned to small ids. A caller's read permission becomes a
//! [`Readable`] set of label ids *before* retrieval, and both retrievers
//! filter inside the search: BM25 by a zero-score query clause with
//! statistics computed over the readable chunks only (no leak through
//! scores), dense retrieval by partition (one partition per label). Results
//! are the exact top-k among readable chunks, never a short post-filtered
//! list.
//!
//! Deletion is exact: the table and vector index erase the chunks at once,
//! BM25 segments holding tombstones are merged away, and the snapshot is
//! rewritten and the log emptied, so no file keeps the deleted text.
//!
//! The store does not embed text itself: ingest takes an [`Embedder`], and
//! dense queries take a vector. It knows labels but not policies.

mod bm25;
mod chunk;
mod record;
mod store;

pub use chunk::{chunk_text, ChunkConfig};
pub use store::{
    Consistency, DeleteReport, DocumentInfo, Embedder, IngestReport, NewDocument, OnDuplicate,
    Readable, RemovedDocument, SearchHit, SearchMode, SearchQuery, Store, StoreConfig,
};

/// Errors of the document store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A store file is damaged.
    #[error("data corruption: {0}")]
    DataCorruption(String),
    /// A store file was written by an incompatible version or setup.
    #[error("incompatible format: {0}")]
    IncompatibleFormat(String),
    /// Bad input from the caller: nothing was written.
    #[error("{0}")]
    InvalidInput(String),
    /// A document id that already exists, or twice in one batch.
    #[error("duplicate document id: {0}")]
    DuplicateId(String),
    /// No document with this id.
    #[error("no document with id {0:?}")]
    UnknownDocument(String),
    /// The embedder failed or returned malformed vectors.
    #[error("embedding failed: {0}")]
    Embedding(String),
    /// Another process holds the store.
    #[error("{0}")]
    Locked(String),
    /// An earlier failure left indexes behind the log: reopen the store.
    #[error("store needs to be reopened after an earlier failure: {0}")]
    Poisoned(String),
    /// tantivy failed.
    #[error("BM25 index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    /// The vector index failed.
    #[error("vector index: {0}")]
    Vectors(#[from] lethe_ann::Error),
}

impl Error {
    pub(crate) fn io(source: std::io::Error, context: impl Into<String>) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Result` with the store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
