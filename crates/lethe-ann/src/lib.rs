//! `lethe-ann`: the partition-filtered dense vector index of lethe.
//!
//! lethe stores chunks of documents, each under an information-flow label;
//! the document store interns labels to small integer ids and, for every
//! query, computes from the policy which ids the caller may read. This crate
//! receives those ids as *partitions* and nothing else: it knows nothing about
//! labels, policies or documents. Its contract is that a search returns
//! **exactly** the top-k among the vectors the filter allows (never a
//! post-filtered top-k that silently returns fewer), fast at every
//! selectivity, and that an erased vector is really gone.
//!
//! # Principal types
//!
//! * [`VectorIndex`]: vectors of one fixed dimension, each under a `u64` key
//!   and a `u32` partition. Similarity is cosine: vectors (and queries) are
//!   L2-normalised on the way in and scored by inner product.
//!   [`insert`](VectorIndex::insert), [`remove`](VectorIndex::remove),
//!   [`search`](VectorIndex::search), [`build_graph`](VectorIndex::build_graph),
//!   [`save`](VectorIndex::save) / [`load`](VectorIndex::load).
//! * [`Filter`]: the allowed partitions. [`Hit`]: key and score; results are
//!   best first with ties broken by ascending key.
//! * [`SearchOptions`] / [`Strategy`] force a route; [`SearchOutput`] and
//!   [`Plan`] report which route was (or would be) taken and why.
//! * [`GraphStatus`]: whether the graph exists and how stale it is.
//! * [`Error`]: one `thiserror` enum, with distinct `DataCorruption` and
//!   `IncompatibleFormat` variants for files.
//!
//! # Design
//!
//! **Storage per partition.** Each partition's vectors live in one contiguous,
//! 64-byte-aligned block, once as `f32` and once quantised to `i8` with a
//! per-vector scale and error bound (module `quant`). Searching an allowed
//! set is then a sequence of contiguous scans, one per partition, with no
//! per-vector filter test. Small sets (under 512 rows) are scored directly by
//! an `f32` kernel that does four rows at a time (eight independent FMA
//! chains; `pulp` picks AVX2+FMA at run time, no `unsafe` here). Larger sets
//! are scanned through the `i8` copies (a quarter of the bytes, `vpmaddwd`),
//! which give each row a guaranteed interval around its true score; only the
//! rows whose upper bound reaches the k-th best lower bound are re-scored in
//! `f32`. That is still an *exact* search, with results identical to a full
//! `f32` scan (the tests compare both paths with brute force key for key).
//! On the reference machine (2-vCPU EPYC, 100k × 384, with other jobs
//! keeping the load average at 4-6) the exact route answers 6.2-7.1k
//! queries/s at 10 % allowed, 49-51k at 1 % and 230-290k at 0.1 %, against
//! faiss `IndexFlatIP`
//! over a pre-sliced subset at 2.9-3.5k, 24-29k and 92-124k on an idle
//! machine (one query per call, anchors.md §4).
//!
//! **Two routes and a planner.** A full exact scan of 100k vectors is memory
//! bound (about 180-200 queries/s even through the `i8` copies), so large allowed
//! sets go through an HNSW graph over all vectors: the layer-0 walk uses
//! every node as a stepping stone but admits only allowed nodes to the result
//! beam, and continues until `ef` allowed nodes are found. Because the walk
//! widens by itself as the allowed fraction falls, `ef` stays fixed (192:
//! recall@10 0.978 unfiltered, ≥ 0.99 filtered, on the benchmark data). The
//! [`planner`](PlannerParams) predicts both costs from a model fitted to
//! measurements (exact: ns per streamed byte, cheaper while the rows fit in
//! cache; graph: distance evaluations `∝ ef × selectivity^-0.84`, ns per
//! evaluation) and takes the cheaper route per query; the crossover on the
//! reference machine lies between 30 % and 50 % of 100k vectors. The graph
//! route falls back to the exact scan whenever it finds fewer than
//! `min(k, allowed)` hits or exceeds its evaluation budget, so `k` larger
//! than the allowed count always returns every allowed vector. Vectors
//! inserted since the last graph build are "pending" and scanned exactly on
//! the graph route, so they are never missed.
//!
//! **Our own graph over ids, not hnsw_rs.** hnsw_rs stores a copy of every
//! point's vector inside its graph, which makes erasure a whole-graph
//! rebuild, with only the exact route serving meanwhile, or a distance that
//! reads vectors through shared global state. It is also slower: measured in
//! the same benchmark run (`--compare-hnsw-rs`, same data, M = 16,
//! ef_construction = 100, 2 build threads, the same background load) it
//! built in 156 s against 54 s here, and searched at 511-529 queries/s at
//! recall 0.98 (ef 128) and 650-761 at 0.96 (ef 96) against 765-1074 at 0.98
//! (ef 192) and 1100-1130 at 0.97 (ef 160) here; its filtered search manages
//! 9-39 queries/s (shared/stack.md). The graph in this crate (module `graph`: hnswlib's
//! construction and neighbour heuristic) holds only node ids: distances read
//! rows from the arena through a `node → (partition, row)` table. Removing a
//! vector turns its node into a vector-less tombstone and re-links every
//! neighbour that pointed to it with the same heuristic, in about 0.5 ms, so
//! recall holds without rebuilds (0.98 → 0.98 after erasing 1 % in the
//! benchmark; ≥ 0.95 after erasing 10 % in the tests). `build_graph` rebuilds
//! from scratch (clearing tombstones); `extend_graph` links pending vectors
//! into the existing graph.
//!
//! **Erasure.** When [`remove`](VectorIndex::remove) returns: the vector's
//! `f32` and `i8` rows have been overwritten by another row and the vacated
//! rows zeroised; the arena never lets the allocator free a block holding
//! vectors without zeroising it first (growth, shrinking and drop go through
//! `zeroize`), and the temporaries of `insert` are zeroised as well; the
//! graph holds no vector data; and the next [`save`](VectorIndex::save)
//! writes a file without it (then renames it over the old one and deletes
//! leftover temporary files). Buffers used for saving and loading are
//! zeroised too. Not covered: blocks of an old file that the file system has
//! freed but not overwritten, copies outside this crate (the caller's own
//! buffers, query vectors, swap). Those need encryption at rest with key
//! erasure.
//!
//! **Persistence.** One file, `vectors.lann`, with a header and a footer that
//! both carry a magic number and [`FORMAT_VERSION`], and a CRC-32 of the body;
//! written to a temporary file, fsynced, renamed, and the directory fsynced,
//! so no reader ever sees a half-written index. The `generation` passed to
//! `save` comes back from `load`: the document store uses it to know which
//! write-ahead-log records the index already reflects. The graph is stored,
//! not rebuilt (100k vectors load in about 0.3 s; a rebuild takes 28-54 s
//! depending on load); the `i8` copies are derived and recomputed on load. A damaged
//! file is [`Error::DataCorruption`], a foreign or newer one
//! [`Error::IncompatibleFormat`]; loading never panics on file content.
//!
//! **Determinism and threads.** Every score, on either route, comes from the
//! same `f32` kernel with the same accumulation order, so a (query, vector)
//! pair always gets bit-identical scores on a given machine, and ties are
//! broken by key. `search` takes `&self` and is safe from many threads;
//! mutation takes `&mut self` (wrap the index in a `RwLock` to share it).
//!
//! # Example
//!
//! ```
//! use lethe_ann::{Filter, GraphParams, VectorIndex};
//!
//! let mut index = VectorIndex::new(3)?;
//! index.insert(1, 10, &[1.0, 0.0, 0.0])?; // key 1, partition (label id) 10
//! index.insert(2, 20, &[0.9, 0.1, 0.0])?;
//! index.insert(3, 10, &[0.0, 1.0, 0.0])?;
//! index.build_graph(&GraphParams::default())?; // optional for small collections
//!
//! let hits = index.search(&[1.0, 0.0, 0.0], 2, &Filter::partitions(&[10]))?;
//! assert_eq!(hits.iter().map(|h| h.key).collect::<Vec<_>>(), vec![1, 3]);
//!
//! assert!(index.remove(1)); // erased from memory and from the next save
//! let hits = index.search(&[1.0, 0.0, 0.0], 2, &Filter::all())?;
//! assert_eq!(hits[0].key, 2);
//! # Ok::<(), lethe_ann::Error>(())
//! ```

#![warn(missing_docs)]

mod arena;
mod error;
mod filter;
mod graph;
mod index;
mod kernel;
mod persist;
mod planner;
mod quant;
mod rowbuf;
mod topk;

#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use filter::Filter;
pub use index::{
    sort_hits, GraphParams, GraphStatus, Hit, SearchOptions, SearchOutput, Strategy, VectorIndex,
    MAX_DIM,
};
pub use persist::{FILE_NAME, FORMAT_VERSION, OLDEST_SUPPORTED_VERSION};
pub use planner::{Plan, PlannerParams, Route};
