//! What the write-ahead log and the snapshot hold, and their file formats.
//!
//! Both are postcard-encoded. A WAL record is one framed, checksummed entry
//! (`lethe_durable::frame`); the snapshot is one sealed file
//! (`lethe_durable::seal`) replaced atomically. Records carry every id they
//! assign (label ids, chunk keys) so replaying them is deterministic and
//! idempotent, whatever state an index was left in.

use std::collections::BTreeMap;

use lethe_label::Label;
use serde::{Deserialize, Serialize};

/// Snapshot file magic.
pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"LETHSNAP";
/// Snapshot format version written by this build.
pub(crate) const SNAPSHOT_VERSION: u32 = 1;
/// Oldest snapshot version this build reads.
pub(crate) const SNAPSHOT_OLDEST: u32 = 1;

/// One chunk as logged: its key, position, text and embedding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChunkRecord {
    pub key: u64,
    pub index: u32,
    pub text: String,
    pub vector: Vec<f32>,
}

/// One document as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DocRecord {
    pub id: String,
    pub label_id: u32,
    pub label: Label,
    pub label_name: Option<String>,
    pub meta: BTreeMap<String, String>,
    pub content_sha256: String,
    pub chunks: Vec<ChunkRecord>,
}

/// A document removed by an operation, with the chunk keys it had.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Removed {
    pub id: String,
    pub chunk_keys: Vec<u64>,
}

/// A logged operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Op {
    /// Add documents; `replaced` were removed first (re-ingest of an id).
    Ingest {
        docs: Vec<DocRecord>,
        replaced: Vec<Removed>,
    },
    /// Remove documents.
    Delete { removed: Vec<Removed> },
}

/// A WAL entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WalRecord {
    pub seq: u64,
    pub op: Op,
}

/// The whole document table at one sequence number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub seq: u64,
    pub dim: u32,
    pub next_chunk_key: u64,
    pub labels: Vec<Label>,
    pub docs: Vec<DocRecord>,
}
