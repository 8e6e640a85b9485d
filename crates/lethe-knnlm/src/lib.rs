//! kNN-LM over labeled documents, with label-restricted neighbours and a
//! permissive label for what it generates.
//!
//! After Khandelwal et al., "Generalization through Memorization: Nearest
//! Neighbor Language Models" (ICLR 2020): a *datastore* maps the model's
//! hidden state at every position of every document (the key) to the token
//! that follows (the value). While generating, the current hidden state
//! retrieves its `k` nearest keys and
//! `p(w) = λ · p_kNN(w) + (1 − λ) · p_LM(w)`, where `p_kNN` puts
//! `softmax(similarity / T)` mass on each neighbour's next token.
//!
//! lethe's additions:
//!
//! * every entry carries its document's label and id; the neighbour search
//!   is restricted to entries the caller (or a candidate label) allows, by
//!   partition inside the vector index (one partition per label), never by
//!   post-filtering;
//! * deleting a document erases all of its entries (keys included) from the
//!   index: exact unlearning of the non-parametric part;
//! * the **permissive kNN label** ([`answer`]): the labels of the neighbours
//!   that actually carried the emitted tokens, validated by λ-similarity of
//!   the teacher-forced utility under the restricted datastore, then a
//!   restricted regeneration whose label is the join of every neighbour it
//!   retrieved (sound by construction, as in `lethe-rag`).
//!
//! Keys are the final hidden state (after the last norm, the vector the
//! output matrix reads), L2-normalised, compared by cosine similarity; the
//! original used squared L2 on the last FFN input. Position 0 of each
//! document (an attention sink with an outsized norm) is not stored.

mod datastore;
mod decode;

pub use datastore::{Datastore, DocText, Entry, Neighbour};
pub use decode::{
    answer, generate, perplexity, utility, KnnAnswer, KnnConfig, KnnGeneration, KnnRequest,
    Perplexity,
};

/// Errors of the kNN-LM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// The vector index failed.
    #[error(transparent)]
    Index(#[from] lethe_ann::Error),
    /// Bad input.
    #[error("{0}")]
    InvalidInput(String),
    /// A datastore file is damaged or foreign.
    #[error("datastore file: {0}")]
    Corrupt(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
