//! [`Store`]: the document table, the write-ahead log, and the two indexes
//! kept in step with them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lethe_ann::{Filter, GraphParams, VectorIndex};
use lethe_durable::{DirLock, Tail};
use lethe_label::Label;

use crate::bm25::{Bm25, ReadableStats};
use crate::chunk::{chunk_text, ChunkConfig};
use crate::record::{
    ChunkRecord, DocRecord, Op, Removed, Snapshot, WalRecord, SNAPSHOT_MAGIC, SNAPSHOT_OLDEST,
    SNAPSHOT_VERSION,
};
use crate::{Error, Result};

/// Computes embeddings for chunk texts. The store calls it at ingest; it
/// knows nothing about models.
pub trait Embedder {
    /// Length of every vector.
    fn dim(&self) -> usize;
    /// One vector per text, in order.
    fn embed(&self, texts: &[&str]) -> std::result::Result<Vec<Vec<f32>>, String>;
}

/// Store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Embedding dimension (fixed per store).
    pub dim: usize,
    /// How documents are split.
    pub chunking: ChunkConfig,
    /// Build the vector graph once this many vectors exist; smaller stores
    /// are searched by exact scan only.
    pub graph_min_vectors: usize,
    /// Compact (snapshot + truncate the log) when the log grows past this.
    pub wal_compact_bytes: u64,
}

impl StoreConfig {
    /// Defaults for a given embedding dimension.
    pub fn new(dim: usize) -> StoreConfig {
        StoreConfig {
            dim,
            chunking: ChunkConfig::DEFAULT,
            graph_min_vectors: 20_000,
            wal_compact_bytes: 64 << 20,
        }
    }
}

/// A document to ingest.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDocument {
    /// Unique id chosen by the caller.
    pub id: String,
    /// Its label (already resolved and checked against the policy).
    pub label: Label,
    /// The policy's name for the label, when it has one.
    pub label_name: Option<String>,
    /// The text.
    pub text: String,
    /// Free metadata (title, source path, ...).
    pub meta: BTreeMap<String, String>,
}

/// What to do when an ingested id already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDuplicate {
    /// Refuse the whole batch.
    Reject,
    /// Replace the stored document.
    Replace,
}

/// A stored document, without its text.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentInfo {
    /// Id.
    pub id: String,
    /// Label.
    pub label: Label,
    /// The policy's name for the label.
    pub label_name: Option<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Number of chunks.
    pub chunks: usize,
    /// SHA-256 of the ingested text, hex.
    pub content_sha256: String,
}

/// Result of an ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// Sequence number of the log record.
    pub seq: u64,
    /// Ids ingested.
    pub documents: Vec<String>,
    /// Chunks created.
    pub chunks: usize,
    /// Ids that replaced an existing document.
    pub replaced: Vec<String>,
}

/// A removed document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedDocument {
    /// Id.
    pub id: String,
    /// Chunks removed.
    pub chunks: usize,
    /// SHA-256 of its text, hex.
    pub content_sha256: String,
}

/// Result of a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteReport {
    /// Sequence number of the log record.
    pub seq: u64,
    /// What was removed.
    pub removed: Vec<RemovedDocument>,
}

/// Which retriever answers a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMode {
    /// Keyword search (tantivy BM25).
    Bm25,
    /// Embedding search.
    Dense,
    /// Both, fused by reciprocal rank.
    Hybrid,
}

/// A search request.
#[derive(Debug, Clone)]
pub struct SearchQuery<'a> {
    /// The query text (BM25 and hybrid).
    pub text: &'a str,
    /// The query embedding (dense and hybrid).
    pub vector: Option<&'a [f32]>,
    /// How many hits.
    pub k: usize,
    /// Which retriever.
    pub mode: SearchMode,
}

/// One retrieved chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// `doc#index`.
    pub chunk_id: String,
    /// Internal chunk key.
    pub key: u64,
    /// Document id.
    pub doc_id: String,
    /// Position of the chunk in its document.
    pub chunk_index: u32,
    /// Label of the document.
    pub label: Label,
    /// Policy name of the label.
    pub label_name: Option<String>,
    /// BM25 score, cosine similarity, or fused RRF score.
    pub score: f32,
    /// The chunk text.
    pub text: String,
}

/// The labels a caller may read, computed once per request.
#[derive(Debug, Clone)]
pub struct Readable {
    /// `None`: every label.
    ids: Option<Vec<u32>>,
}

impl Readable {
    /// The readable label ids (`None`: all).
    pub fn ids(&self) -> Option<&[u32]> {
        self.ids.as_deref()
    }
}

/// Result of [`Store::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consistency {
    /// Documents.
    pub documents: usize,
    /// Chunks in the table.
    pub chunks: usize,
    /// Chunks in the BM25 index.
    pub bm25_chunks: usize,
    /// Vectors in the vector index.
    pub vectors: usize,
    /// Every disagreement found; empty means consistent.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct DocEntry {
    pub(crate) label_id: u32,
    pub(crate) label_name: Option<String>,
    pub(crate) meta: BTreeMap<String, String>,
    pub(crate) content_sha256: String,
    pub(crate) chunk_keys: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct ChunkEntry {
    pub(crate) doc_id: Arc<str>,
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) tokens: u64,
}

/// Reciprocal rank fusion constant (Cormack et al. 2009).
const RRF_K: f32 = 60.0;

/// A labeled document store under one data directory.
///
/// Files: `wal.log` (framed records since the last snapshot),
/// `snapshot.bin` (sealed document table), `bm25/` (tantivy),
/// `vectors/` (lethe-ann), `LOCK`.
pub struct Store {
    dir: PathBuf,
    _lock: DirLock,
    config: StoreConfig,
    seq: u64,
    next_chunk_key: u64,
    pub(crate) labels: Vec<Label>,
    label_ids: HashMap<Label, u32>,
    label_chunks: Vec<u64>,
    label_tokens: Vec<u64>,
    pub(crate) docs: BTreeMap<String, DocEntry>,
    pub(crate) chunks: HashMap<u64, ChunkEntry>,
    wal: File,
    wal_len: u64,
    bm25: Bm25,
    ann: VectorIndex,
    poisoned: Option<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("seq", &self.seq)
            .field("documents", &self.docs.len())
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store in `dir` (creating it), recovering from any crash:
    /// a torn last log record is cut, log records newer than each index are
    /// replayed into it, and an index that cannot be caught up is rebuilt
    /// from the document table.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<Store> {
        if config.dim == 0 {
            return Err(Error::InvalidInput(
                "embedding dimension must be positive".into(),
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        let lock = DirLock::acquire(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Error::Locked(e.to_string())
            } else {
                Error::io(e, "taking the store lock")
            }
        })?;

        let snapshot = read_snapshot(&dir.join("snapshot.bin"))?;
        let (wal, wal_len, records) = open_wal(&dir.join("wal.log"))?;
        let (bm25, bm25_seq) = Bm25::open(&dir.join("bm25"))?;

        let mut store = Store {
            dir: dir.to_path_buf(),
            _lock: lock,
            config,
            seq: 0,
            next_chunk_key: 0,
            labels: Vec::new(),
            label_ids: HashMap::new(),
            label_chunks: Vec::new(),
            label_tokens: Vec::new(),
            docs: BTreeMap::new(),
            chunks: HashMap::new(),
            wal,
            wal_len,
            bm25,
            ann: VectorIndex::new(config.dim)?,
            poisoned: None,
        };

        // 1. The document table: snapshot, then newer log records. Vectors
        //    are kept aside in case the vector index must be rebuilt.
        let mut vectors: HashMap<u64, (u32, Vec<f32>)> = HashMap::new();
        let snapshot_seq = match snapshot {
            Some(s) => {
                if s.dim as usize != config.dim {
                    return Err(Error::IncompatibleFormat(format!(
                        "store holds {}-dimensional embeddings, the embedder makes {}",
                        s.dim, config.dim
                    )));
                }
                store.seq = s.seq;
                store.next_chunk_key = s.next_chunk_key;
                for (i, l) in s.labels.into_iter().enumerate() {
                    store.intern_at(i as u32, l)?;
                }
                for d in s.docs {
                    store.table_insert(&d, &mut vectors)?;
                }
                s.seq
            }
            None => 0,
        };
        for pair in records.windows(2) {
            if pair[1].seq != pair[0].seq + 1 {
                return Err(Error::DataCorruption(format!(
                    "write-ahead log jumps from record {} to {}",
                    pair[0].seq, pair[1].seq
                )));
            }
        }
        for r in records.iter().filter(|r| r.seq > snapshot_seq) {
            if r.seq != store.seq + 1 {
                return Err(Error::DataCorruption(format!(
                    "write-ahead log jumps from record {} to {}",
                    store.seq, r.seq
                )));
            }
            store.table_apply(&r.op, &mut vectors)?;
            store.seq = r.seq;
        }

        // 2. BM25: replay what it misses, or rebuild when the log no longer
        //    covers the gap.
        // An index at sequence number `g` can be caught up when the log
        // holds every record after `g` (records are contiguous, checked above).
        let oldest_logged = records.first().map(|r| r.seq);
        let current = store.seq;
        let catch_up =
            |g: u64| g == current || (g < current && oldest_logged.is_some_and(|o| o <= g + 1));
        if catch_up(bm25_seq) {
            for r in records.iter().filter(|r| r.seq > bm25_seq) {
                store.bm25_apply(&r.op)?;
            }
            if bm25_seq != store.seq {
                store.bm25.commit(store.seq)?;
            }
        } else {
            tracing::warn!(
                bm25_seq,
                store_seq = store.seq,
                "rebuilding the BM25 index from the document table"
            );
            store.bm25.delete_all()?;
            for (id, d) in &store.docs {
                for key in &d.chunk_keys {
                    let c = &store.chunks[key];
                    store.bm25.add_chunk(id, *key, d.label_id, &c.text)?;
                }
            }
            store.bm25.commit(store.seq)?;
        }

        // 3. Vectors: load the saved index when it is exactly current or can
        //    be caught up from the log; otherwise rebuild from the table.
        let vec_dir = dir.join("vectors");
        let loaded = if vec_dir.join(lethe_ann::FILE_NAME).exists() {
            match VectorIndex::load(&vec_dir) {
                Ok((ann, g)) if ann.dim() == config.dim => Some((ann, g)),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "vector index unreadable; rebuilding");
                    None
                }
            }
        } else {
            None
        };
        let ann_ok = match loaded {
            Some((ann, g)) if catch_up(g) => {
                store.ann = ann;
                for r in records.iter().filter(|r| r.seq > g) {
                    store.ann_apply(&r.op)?;
                }
                true
            }
            _ => false,
        };
        if !ann_ok {
            let mut keys: Vec<&u64> = vectors.keys().collect();
            keys.sort();
            let mut ann = VectorIndex::new(config.dim)?;
            for key in keys {
                let (label, v) = &vectors[key];
                ann.insert(*key, *label, v)?;
            }
            store.ann = ann;
            store.maintain_graph()?;
        }
        drop(vectors);
        store.verify_counts()?;
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence number of the last applied operation.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The settings in use.
    pub fn config(&self) -> StoreConfig {
        self.config
    }

    /// Every distinct label ever stored, by id.
    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// A document's metadata.
    pub fn document(&self, id: &str) -> Option<DocumentInfo> {
        self.docs.get(id).map(|d| self.info(id, d))
    }

    /// Every document's metadata, by id.
    pub fn documents(&self) -> Vec<DocumentInfo> {
        self.docs.iter().map(|(id, d)| self.info(id, d)).collect()
    }

    /// The text of a document, reassembled from its chunks.
    pub fn document_text(&self, id: &str) -> Option<String> {
        let d = self.docs.get(id)?;
        let parts: Vec<&str> = d
            .chunk_keys
            .iter()
            .map(|k| self.chunks[k].text.as_str())
            .collect();
        Some(parts.join("\n\n"))
    }

    fn info(&self, id: &str, d: &DocEntry) -> DocumentInfo {
        DocumentInfo {
            id: id.to_string(),
            label: self.labels[d.label_id as usize].clone(),
            label_name: d.label_name.clone(),
            meta: d.meta.clone(),
            chunks: d.chunk_keys.len(),
            content_sha256: d.content_sha256.clone(),
        }
    }

    /// The labels a caller may read, given its read decision.
    pub fn readable(&self, may_read: &dyn Fn(&Label) -> bool) -> Readable {
        let ids: Vec<u32> = (0..self.labels.len() as u32)
            .filter(|&i| may_read(&self.labels[i as usize]))
            .collect();
        if ids.len() == self.labels.len() {
            Readable { ids: None }
        } else {
            Readable { ids: Some(ids) }
        }
    }

    /// Chunks the caller may read.
    pub fn readable_chunks(&self, readable: &Readable) -> u64 {
        match readable.ids() {
            None => self.chunks.len() as u64,
            Some(ids) => ids.iter().map(|&i| self.label_chunks[i as usize]).sum(),
        }
    }

    /// Splits `text` the way ingest will.
    pub fn chunk(&self, text: &str) -> Vec<String> {
        chunk_text(text, self.config.chunking)
    }

    /// Ingests documents atomically: either every document of the batch is
    /// stored and indexed, or (on any error) none is.
    pub fn ingest(
        &mut self,
        docs: Vec<NewDocument>,
        on_duplicate: OnDuplicate,
        embedder: &dyn Embedder,
    ) -> Result<IngestReport> {
        self.check_poisoned()?;
        if embedder.dim() != self.config.dim {
            return Err(Error::InvalidInput(format!(
                "embedder makes {}-dimensional vectors, the store holds {}",
                embedder.dim(),
                self.config.dim
            )));
        }
        // Validate everything before anything is written.
        let mut seen = BTreeSet::new();
        let mut replaced = Vec::new();
        for d in &docs {
            validate_id(&d.id)?;
            if !seen.insert(d.id.as_str()) {
                return Err(Error::DuplicateId(format!(
                    "{:?} appears twice in the batch",
                    d.id
                )));
            }
            if let Some(existing) = self.docs.get(&d.id) {
                match on_duplicate {
                    OnDuplicate::Reject => {
                        return Err(Error::DuplicateId(format!("{:?} is already stored", d.id)));
                    }
                    OnDuplicate::Replace => replaced.push(Removed {
                        id: d.id.clone(),
                        chunk_keys: existing.chunk_keys.clone(),
                    }),
                }
            }
            validate_text(&d.id, &d.text)?;
        }
        if docs.is_empty() {
            return Err(Error::InvalidInput("nothing to ingest".into()));
        }

        // Chunk and embed (may fail; nothing is written yet).
        let chunked: Vec<Vec<String>> = docs.iter().map(|d| self.chunk(&d.text)).collect();
        let all_texts: Vec<&str> = chunked.iter().flatten().map(String::as_str).collect();
        let mut vectors = Vec::with_capacity(all_texts.len());
        for batch in all_texts.chunks(32) {
            let vs = embedder.embed(batch).map_err(Error::Embedding)?;
            if vs.len() != batch.len() {
                return Err(Error::Embedding(format!(
                    "embedder returned {} vectors for {} texts",
                    vs.len(),
                    batch.len()
                )));
            }
            for v in &vs {
                if v.len() != self.config.dim
                    || v.iter().any(|x| !x.is_finite())
                    || v.iter().all(|x| *x == 0.0)
                {
                    return Err(Error::Embedding(
                        "embedder returned a malformed vector".into(),
                    ));
                }
            }
            vectors.extend(vs);
        }

        // Assign ids and build the record.
        let mut next_label = self.labels.len() as u32;
        let mut new_labels: HashMap<Label, u32> = HashMap::new();
        let mut next_key = self.next_chunk_key;
        let mut vec_iter = vectors.into_iter();
        let mut records = Vec::with_capacity(docs.len());
        for (d, texts) in docs.into_iter().zip(chunked) {
            let label_id = match self
                .label_ids
                .get(&d.label)
                .or_else(|| new_labels.get(&d.label))
            {
                Some(&id) => id,
                None => {
                    let id = next_label;
                    next_label += 1;
                    new_labels.insert(d.label.clone(), id);
                    id
                }
            };
            let chunks = texts
                .into_iter()
                .enumerate()
                .map(|(i, text)| {
                    let key = next_key;
                    next_key += 1;
                    ChunkRecord {
                        key,
                        index: i as u32,
                        text,
                        vector: vec_iter.next().unwrap_or_default(),
                    }
                })
                .collect();
            records.push(DocRecord {
                content_sha256: sha256_hex(d.text.as_bytes()),
                id: d.id,
                label_id,
                label: d.label,
                label_name: d.label_name,
                meta: d.meta,
                chunks,
            });
        }
        let report = IngestReport {
            seq: self.seq + 1,
            documents: records.iter().map(|r| r.id.clone()).collect(),
            chunks: records.iter().map(|r| r.chunks.len()).sum(),
            replaced: replaced.iter().map(|r| r.id.clone()).collect(),
        };
        self.commit(Op::Ingest {
            docs: records,
            replaced,
        })?;
        self.maybe_compact()?;
        Ok(report)
    }

    /// Deletes documents by id, exactly: when this returns, no index, log or
    /// snapshot file of the store holds their text, terms or vectors.
    /// Unknown ids fail the whole call before anything changes.
    pub fn delete(&mut self, ids: &[&str]) -> Result<DeleteReport> {
        self.check_poisoned()?;
        let mut removed = Vec::new();
        let mut report = Vec::new();
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(*id) {
                continue;
            }
            let d = self
                .docs
                .get(*id)
                .ok_or_else(|| Error::UnknownDocument((*id).to_string()))?;
            removed.push(Removed {
                id: (*id).to_string(),
                chunk_keys: d.chunk_keys.clone(),
            });
            report.push(RemovedDocument {
                id: (*id).to_string(),
                chunks: d.chunk_keys.len(),
                content_sha256: d.content_sha256.clone(),
            });
        }
        if removed.is_empty() {
            return Err(Error::InvalidInput("no document ids given".into()));
        }
        self.commit(Op::Delete { removed })?;
        // Exactness: purge tombstones from BM25 and rewrite the snapshot so
        // neither the log nor an old snapshot keeps the text.
        self.guard(|s| s.bm25.purge_deleted())?;
        self.compact()?;
        Ok(DeleteReport {
            seq: self.seq,
            removed: report,
        })
    }

    /// Searches among the chunks the caller may read. The result is the
    /// exact top-k among readable chunks for BM25 and for dense retrieval
    /// below the graph threshold (above it, dense recall is measured by the
    /// retrieval benchmark); it is never a post-filtered list that silently
    /// returns fewer hits than exist.
    pub fn search(&self, query: &SearchQuery<'_>, readable: &Readable) -> Result<Vec<SearchHit>> {
        self.check_poisoned()?;
        if query.k == 0 {
            return Ok(Vec::new());
        }
        let need_vector = matches!(query.mode, SearchMode::Dense | SearchMode::Hybrid);
        let vector = match (need_vector, query.vector) {
            (true, None) => {
                return Err(Error::InvalidInput(
                    "dense and hybrid search need a query vector".into(),
                ));
            }
            (true, Some(v)) if v.len() != self.config.dim => {
                return Err(Error::InvalidInput(format!(
                    "query vector has {} dimensions, the store holds {}",
                    v.len(),
                    self.config.dim
                )));
            }
            (_, v) => v,
        };
        let scored: Vec<(u64, f32)> = match query.mode {
            SearchMode::Bm25 => self.bm25_search(query.text, query.k, readable)?,
            SearchMode::Dense => {
                self.dense_search(vector.unwrap_or_default(), query.k, readable)?
            }
            SearchMode::Hybrid => {
                let depth = (query.k * 4).max(20);
                let lexical = self.bm25_search(query.text, depth, readable)?;
                let dense = self.dense_search(vector.unwrap_or_default(), depth, readable)?;
                fuse(&[lexical, dense], query.k)
            }
        };
        Ok(scored
            .into_iter()
            .filter_map(|(key, score)| self.hit(key, score))
            .collect())
    }

    fn hit(&self, key: u64, score: f32) -> Option<SearchHit> {
        let c = self.chunks.get(&key)?;
        let d = self.docs.get(&*c.doc_id)?;
        Some(SearchHit {
            chunk_id: format!("{}#{}", c.doc_id, c.index),
            key,
            doc_id: c.doc_id.to_string(),
            chunk_index: c.index,
            label: self.labels[d.label_id as usize].clone(),
            label_name: d.label_name.clone(),
            score,
            text: c.text.clone(),
        })
    }

    fn bm25_search(&self, text: &str, k: usize, readable: &Readable) -> Result<Vec<(u64, f32)>> {
        let stats = match readable.ids() {
            None => ReadableStats {
                docs: self.chunks.len() as u64,
                tokens: self.label_tokens.iter().sum(),
            },
            Some(ids) => ReadableStats {
                docs: ids.iter().map(|&i| self.label_chunks[i as usize]).sum(),
                tokens: ids.iter().map(|&i| self.label_tokens[i as usize]).sum(),
            },
        };
        let mut hits = self.bm25.search(text, k, readable.ids(), stats)?;
        // Deterministic order: score, then key.
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(hits)
    }

    fn dense_search(
        &self,
        vector: &[f32],
        k: usize,
        readable: &Readable,
    ) -> Result<Vec<(u64, f32)>> {
        let filter = match readable.ids() {
            None => Filter::all(),
            Some(ids) => Filter::partitions(ids),
        };
        Ok(self
            .ann
            .search(vector, k, &filter)?
            .into_iter()
            .map(|h| (h.key, h.score))
            .collect())
    }

    /// Checks that the table and both indexes agree chunk by chunk.
    pub fn verify(&self) -> Result<Consistency> {
        let mut problems = Vec::new();
        let live = self.bm25.live_chunks()?;
        let mut bm25_keys = HashMap::new();
        for (key, label) in &live {
            if bm25_keys.insert(*key, *label).is_some() {
                problems.push(format!("chunk {key} is indexed twice in BM25"));
            }
        }
        for (id, d) in &self.docs {
            for key in &d.chunk_keys {
                match self.chunks.get(key) {
                    Some(c) if &*c.doc_id == id.as_str() => {}
                    _ => problems.push(format!(
                        "document {id:?}: chunk {key} missing from the table"
                    )),
                }
                match bm25_keys.get(key) {
                    Some(l) if *l == d.label_id => {}
                    Some(_) => problems.push(format!(
                        "document {id:?}: chunk {key} has another label in BM25"
                    )),
                    None => {
                        problems.push(format!("document {id:?}: chunk {key} missing from BM25"))
                    }
                }
                match self.ann.partition_of(*key) {
                    Some(p) if p == d.label_id => {}
                    Some(_) => problems.push(format!(
                        "document {id:?}: chunk {key} has another label in the vector index"
                    )),
                    None => problems.push(format!(
                        "document {id:?}: chunk {key} missing from the vector index"
                    )),
                }
            }
        }
        for key in bm25_keys.keys() {
            if !self.chunks.contains_key(key) {
                problems.push(format!("BM25 holds chunk {key} of no stored document"));
            }
        }
        if self.ann.len() != self.chunks.len() {
            problems.push(format!(
                "vector index holds {} vectors for {} chunks",
                self.ann.len(),
                self.chunks.len()
            ));
        }
        Ok(Consistency {
            documents: self.docs.len(),
            chunks: self.chunks.len(),
            bm25_chunks: live.len(),
            vectors: self.ann.len(),
            problems,
        })
    }

    /// Writes a snapshot and saves the vector index at the current sequence
    /// number, then empties the log. Called after deletes, when the log
    /// grows large, and on [`Store::close`].
    pub fn compact(&mut self) -> Result<()> {
        self.check_poisoned()?;
        self.guard(|s| {
            // Order matters for crash safety: every derived file first, the
            // snapshot next, the log last.
            s.ann.save(&s.dir.join("vectors"), s.seq)?;
            let snapshot = s.snapshot()?;
            let bytes = postcard::to_allocvec(&snapshot)
                .map_err(|e| Error::DataCorruption(e.to_string()))?;
            let sealed = lethe_durable::seal(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, &bytes);
            let path = s.dir.join("snapshot.bin");
            lethe_durable::atomic_write(&path, &sealed)
                .map_err(|e| Error::io(e, "writing the snapshot"))?;
            s.wal
                .set_len(0)
                .map_err(|e| Error::io(e, "truncating the log"))?;
            s.wal
                .sync_all()
                .map_err(|e| Error::io(e, "syncing the log"))?;
            s.wal_len = 0;
            Ok(())
        })
    }

    /// Compacts and releases the store.
    pub fn close(mut self) -> Result<()> {
        self.compact()
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let mut docs = Vec::with_capacity(self.docs.len());
        for (id, d) in &self.docs {
            let mut chunks = Vec::with_capacity(d.chunk_keys.len());
            for key in &d.chunk_keys {
                let c = &self.chunks[key];
                let vector = self
                    .ann
                    .vector(*key)
                    .ok_or_else(|| Error::DataCorruption(format!("chunk {key} has no vector")))?
                    .to_vec();
                chunks.push(ChunkRecord {
                    key: *key,
                    index: c.index,
                    text: c.text.clone(),
                    vector,
                });
            }
            docs.push(DocRecord {
                id: id.clone(),
                label_id: d.label_id,
                label: self.labels[d.label_id as usize].clone(),
                label_name: d.label_name.clone(),
                meta: d.meta.clone(),
                content_sha256: d.content_sha256.clone(),
                chunks,
            });
        }
        Ok(Snapshot {
            seq: self.seq,
            dim: self.config.dim as u32,
            next_chunk_key: self.next_chunk_key,
            labels: self.labels.clone(),
            docs,
        })
    }

    fn maybe_compact(&mut self) -> Result<()> {
        if self.wal_len > self.config.wal_compact_bytes {
            self.compact()?;
        }
        Ok(())
    }

    /// Logs an operation durably (the commit point), then applies it to the
    /// table and both indexes.
    fn commit(&mut self, op: Op) -> Result<()> {
        let record = WalRecord {
            seq: self.seq + 1,
            op,
        };
        let bytes =
            postcard::to_allocvec(&record).map_err(|e| Error::DataCorruption(e.to_string()))?;
        self.wal_len = lethe_durable::append_frames(&mut self.wal, &[&bytes])
            .map_err(|e| Error::io(e, "appending to the log"))?;
        // From here on the operation is durable; a failure below leaves the
        // in-memory state behind the log, so the store refuses further work
        // until it is reopened (which replays the log).
        self.guard(|s| {
            let mut scratch = HashMap::new();
            s.table_apply(&record.op, &mut scratch)?;
            s.seq = record.seq;
            s.bm25_apply(&record.op)?;
            s.bm25.commit(s.seq)?;
            s.ann_apply(&record.op)?;
            s.maintain_graph()
        })
    }

    fn guard(&mut self, f: impl FnOnce(&mut Store) -> Result<()>) -> Result<()> {
        let r = f(self);
        if let Err(e) = &r {
            tracing::error!(error = %e, "store operation failed after its log record; reopen to recover");
            self.poisoned = Some(e.to_string());
        }
        r
    }

    fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(m) => Err(Error::Poisoned(m.clone())),
            None => Ok(()),
        }
    }

    fn intern_at(&mut self, id: u32, label: Label) -> Result<()> {
        let i = id as usize;
        if i < self.labels.len() {
            if self.labels[i] != label {
                return Err(Error::DataCorruption(format!(
                    "label id {id} is bound to two labels"
                )));
            }
            return Ok(());
        }
        if i != self.labels.len() {
            return Err(Error::DataCorruption(format!(
                "label id {id} skips ids (next is {})",
                self.labels.len()
            )));
        }
        self.label_ids.insert(label.clone(), id);
        self.labels.push(label);
        self.label_chunks.push(0);
        self.label_tokens.push(0);
        Ok(())
    }

    fn table_insert(
        &mut self,
        d: &DocRecord,
        vectors: &mut HashMap<u64, (u32, Vec<f32>)>,
    ) -> Result<()> {
        self.intern_at(d.label_id, d.label.clone())?;
        let doc_id: Arc<str> = Arc::from(d.id.as_str());
        let mut keys = Vec::with_capacity(d.chunks.len());
        for c in &d.chunks {
            let tokens = self.bm25.count_tokens(&c.text);
            self.label_chunks[d.label_id as usize] += 1;
            self.label_tokens[d.label_id as usize] += tokens;
            self.chunks.insert(
                c.key,
                ChunkEntry {
                    doc_id: doc_id.clone(),
                    index: c.index,
                    text: c.text.clone(),
                    tokens,
                },
            );
            vectors.insert(c.key, (d.label_id, c.vector.clone()));
            keys.push(c.key);
            self.next_chunk_key = self.next_chunk_key.max(c.key + 1);
        }
        self.docs.insert(
            d.id.clone(),
            DocEntry {
                label_id: d.label_id,
                label_name: d.label_name.clone(),
                meta: d.meta.clone(),
                content_sha256: d.content_sha256.clone(),
                chunk_keys: keys,
            },
        );
        Ok(())
    }

    fn table_remove(&mut self, r: &Removed, vectors: &mut HashMap<u64, (u32, Vec<f32>)>) {
        if let Some(d) = self.docs.remove(&r.id) {
            for key in &d.chunk_keys {
                if let Some(c) = self.chunks.remove(key) {
                    self.label_chunks[d.label_id as usize] -= 1;
                    self.label_tokens[d.label_id as usize] -= c.tokens;
                }
                vectors.remove(key);
            }
        }
    }

    fn table_apply(&mut self, op: &Op, vectors: &mut HashMap<u64, (u32, Vec<f32>)>) -> Result<()> {
        match op {
            Op::Ingest { docs, replaced } => {
                for r in replaced {
                    self.table_remove(r, vectors);
                }
                for d in docs {
                    self.table_insert(d, vectors)?;
                }
            }
            Op::Delete { removed } => {
                for r in removed {
                    self.table_remove(r, vectors);
                }
            }
        }
        Ok(())
    }

    fn bm25_apply(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::Ingest { docs, replaced } => {
                for r in replaced {
                    self.bm25.delete_doc(&r.id);
                }
                for d in docs {
                    // Idempotent under replay: drop whatever a previous,
                    // uncommitted attempt may have left.
                    self.bm25.delete_doc(&d.id);
                    for c in &d.chunks {
                        self.bm25.add_chunk(&d.id, c.key, d.label_id, &c.text)?;
                    }
                }
            }
            Op::Delete { removed } => {
                for r in removed {
                    self.bm25.delete_doc(&r.id);
                }
            }
        }
        Ok(())
    }

    fn ann_apply(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::Ingest { docs, replaced } => {
                for r in replaced {
                    for key in &r.chunk_keys {
                        self.ann.remove(*key);
                    }
                }
                for d in docs {
                    for c in &d.chunks {
                        self.ann.remove(c.key);
                        self.ann.insert(c.key, d.label_id, &c.vector)?;
                    }
                }
            }
            Op::Delete { removed } => {
                for r in removed {
                    for key in &r.chunk_keys {
                        self.ann.remove(*key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps the vector graph in step: built once the store is large enough,
    /// extended with new vectors, rebuilt when removals have left many
    /// tombstones.
    fn maintain_graph(&mut self) -> Result<()> {
        let status = self.ann.graph_status();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        if self.ann.len() < self.config.graph_min_vectors {
            if status.built {
                self.ann.drop_graph();
            }
            return Ok(());
        }
        let params = GraphParams {
            threads,
            ..GraphParams::default()
        };
        if !status.built || status.tombstones * 4 > status.nodes.max(1) {
            self.ann.build_graph(&params)?;
        } else if status.pending > 0 {
            self.ann.extend_graph(threads)?;
        }
        Ok(())
    }

    fn verify_counts(&self) -> Result<()> {
        let total: u64 = self.label_chunks.iter().sum();
        if total as usize != self.chunks.len() {
            return Err(Error::DataCorruption(
                "per-label chunk counts disagree with the table".into(),
            ));
        }
        Ok(())
    }
}

/// Reciprocal rank fusion of ranked lists: score = sum of 1/(RRF_K + rank).
fn fuse(lists: &[Vec<(u64, f32)>], k: usize) -> Vec<(u64, f32)> {
    let mut scores: HashMap<u64, f32> = HashMap::new();
    for list in lists {
        for (rank, (key, _)) in list.iter().enumerate() {
            *scores.entry(*key).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
        }
    }
    let mut out: Vec<(u64, f32)> = scores.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.truncate(k);
    out
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidInput("document id is empty".into()));
    }
    if id.len() > 512 {
        return Err(Error::InvalidInput(format!(
            "document id is {} bytes; the limit is 512",
            id.len()
        )));
    }
    if id.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidInput(format!(
            "document id {id:?} contains control characters"
        )));
    }
    if id.contains('#') {
        return Err(Error::InvalidInput(format!(
            "document id {id:?} contains '#', which separates chunk numbers"
        )));
    }
    Ok(())
}

fn validate_text(id: &str, text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::InvalidInput(format!("document {id:?} has no text")));
    }
    let control = text
        .chars()
        .filter(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        .count();
    if control * 100 > text.chars().count().max(1) || text.contains('\0') {
        return Err(Error::InvalidInput(format!(
            "document {id:?} looks binary ({control} control characters)"
        )));
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn read_snapshot(path: &Path) -> Result<Option<Snapshot>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(e, format!("reading {}", path.display()))),
    };
    let (payload, _version) =
        lethe_durable::unseal(&bytes, SNAPSHOT_MAGIC, SNAPSHOT_OLDEST, SNAPSHOT_VERSION).map_err(
            |e| match e {
                lethe_durable::SealError::Corrupt(m) => {
                    Error::DataCorruption(format!("snapshot: {m}"))
                }
                e @ lethe_durable::SealError::Incompatible { .. } => {
                    Error::IncompatibleFormat(format!("snapshot: {e}"))
                }
            },
        )?;
    postcard::from_bytes(payload)
        .map(Some)
        .map_err(|e| Error::DataCorruption(format!("snapshot does not decode: {e}")))
}

fn open_wal(path: &Path) -> Result<(File, u64, Vec<WalRecord>)> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
    let frames = lethe_durable::read_frames(&bytes);
    let mut records = Vec::with_capacity(frames.records.len());
    for (i, payload) in frames.records.iter().enumerate() {
        let r: WalRecord = postcard::from_bytes(payload).map_err(|e| {
            Error::DataCorruption(format!("log record {} does not decode: {e}", i + 1))
        })?;
        records.push(r);
    }
    match frames.tail {
        Tail::Clean => {}
        Tail::Torn => {
            // The crash case: the last append never completed, so it was
            // never acknowledged. Cut it off.
            tracing::warn!(
                kept = records.len(),
                bytes = bytes.len() - frames.valid_len,
                "cutting a torn record from the end of the log"
            );
            file.set_len(frames.valid_len as u64)
                .map_err(|e| Error::io(e, "truncating the log"))?;
            file.sync_all()
                .map_err(|e| Error::io(e, "syncing the log"))?;
        }
        Tail::Corrupt => {
            return Err(Error::DataCorruption(format!(
                "write-ahead log is corrupt after record {} (not a torn tail: a record in the middle fails its checksum)",
                records.len()
            )));
        }
    }
    let _ = &mut file;
    Ok((file, frames.valid_len as u64, records))
}
