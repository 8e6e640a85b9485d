//! The datastore: (hidden-state key → next token) entries with the label and
//! position of the document they come from, in a label-partitioned index.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use lethe_ann::{Filter, VectorIndex};
use lethe_label::Label;
use lethe_model::generate::Llm;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One datastore entry: the token that followed a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The next token.
    pub token: u32,
    /// The document it comes from.
    pub doc: Arc<str>,
    /// Position of the token in the document.
    pub pos: u32,
    /// Label id (index into [`Datastore::labels`]).
    pub label: u32,
}

/// A document to add: its id, label, text, and a version string (e.g. the
/// content hash) that tells a later reconciliation whether the stored
/// entries still reflect the document.
#[derive(Debug, Clone, Copy)]
pub struct DocText<'a> {
    /// Document id.
    pub id: &'a str,
    /// Its label.
    pub label: &'a Label,
    /// Its text.
    pub text: &'a str,
    /// Its version.
    pub version: &'a str,
}

/// A retrieved entry with its cosine similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    /// Entry key.
    pub key: u64,
    /// Similarity.
    pub score: f32,
    /// The entry.
    pub entry: Entry,
}

/// The kNN-LM datastore.
pub struct Datastore {
    dim: usize,
    index: VectorIndex,
    entries: HashMap<u64, Entry>,
    docs: BTreeMap<String, Vec<u64>>,
    versions: BTreeMap<String, String>,
    labels: Vec<Label>,
    next_key: u64,
    /// Most tokens of a document that enter the datastore.
    max_doc_tokens: usize,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("entries", &self.entries.len())
            .field("documents", &self.docs.len())
            .field("labels", &self.labels.len())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Sidecar {
    dim: u32,
    next_key: u64,
    max_doc_tokens: u32,
    labels: Vec<Label>,
    versions: BTreeMap<String, String>,
    /// Document ids, referenced by index from `entries`.
    docs: Vec<String>,
    /// (key, token, document index, position, label id).
    entries: Vec<(u64, u32, u32, u32, u32)>,
}

const MAGIC: [u8; 8] = *b"LETHKNNS";
const VERSION: u32 = 2;

impl Datastore {
    /// An empty datastore for a model's hidden width.
    pub fn new(dim: usize, max_doc_tokens: usize) -> Result<Datastore> {
        Ok(Datastore {
            dim,
            index: VectorIndex::new(dim)?,
            entries: HashMap::new(),
            docs: BTreeMap::new(),
            versions: BTreeMap::new(),
            labels: Vec::new(),
            next_key: 0,
            max_doc_tokens: max_doc_tokens.max(2),
        })
    }

    /// Entries stored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Documents stored.
    pub fn documents(&self) -> impl Iterator<Item = &str> {
        self.versions.keys().map(String::as_str)
    }

    /// The version a document was added with.
    pub fn version(&self, doc: &str) -> Option<&str> {
        self.versions.get(doc).map(String::as_str)
    }

    /// Whether a document has entries.
    pub fn contains(&self, doc: &str) -> bool {
        self.versions.contains_key(doc)
    }

    /// Every label seen, by id.
    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// The entries of one document.
    pub fn entries_of(&self, doc: &str) -> Vec<&Entry> {
        self.docs
            .get(doc)
            .map(|keys| keys.iter().filter_map(|k| self.entries.get(k)).collect())
            .unwrap_or_default()
    }

    fn label_id(&mut self, label: &Label) -> u32 {
        match self.labels.iter().position(|l| l == label) {
            Some(i) => i as u32,
            None => {
                self.labels.push(label.clone());
                (self.labels.len() - 1) as u32
            }
        }
    }

    /// Adds documents: runs the model over each text and stores one entry
    /// per position (after the first) with the token that follows it.
    /// Replaces a document that is already stored.
    pub fn add_documents(&mut self, llm: &Llm, docs: &[DocText<'_>]) -> Result<usize> {
        let mut seqs = Vec::with_capacity(docs.len());
        for DocText { id, text, .. } in docs {
            if id.is_empty() {
                return Err(Error::InvalidInput("document id is empty".into()));
            }
            let mut tokens = llm.tokenizer.encode_plain(text)?;
            tokens.truncate(self.max_doc_tokens);
            seqs.push(tokens);
        }
        let refs: Vec<&[u32]> = seqs
            .iter()
            .filter(|s| s.len() >= 3)
            .map(Vec::as_slice)
            .collect();
        let hidden = if refs.is_empty() {
            Vec::new()
        } else {
            llm.model.final_hidden_batch(&refs)?
        };
        let mut hidden = hidden.into_iter();
        let mut added = 0;
        for (d, tokens) in docs.iter().zip(&seqs) {
            let (id, label) = (d.id, d.label);
            self.remove_document(id);
            self.versions.insert(id.to_string(), d.version.to_string());
            if tokens.len() < 3 {
                continue;
            }
            let rows = hidden.next().ok_or_else(|| {
                Error::InvalidInput("the model returned fewer sequences than given".into())
            })?;
            let label_id = self.label_id(label);
            let doc: Arc<str> = Arc::from(id);
            let mut keys = Vec::with_capacity(tokens.len());
            // Position t's state predicts token t + 1; skip the attention sink at 0.
            for t in 1..tokens.len() - 1 {
                let key = self.next_key;
                self.next_key += 1;
                self.index.insert(key, label_id, &rows[t])?;
                self.entries.insert(
                    key,
                    Entry {
                        token: tokens[t + 1],
                        doc: doc.clone(),
                        pos: (t + 1) as u32,
                        label: label_id,
                    },
                );
                keys.push(key);
                added += 1;
            }
            self.docs.insert(id.to_string(), keys);
        }
        Ok(added)
    }

    /// Erases every entry of a document (keys included); returns how many.
    pub fn remove_document(&mut self, doc: &str) -> usize {
        self.versions.remove(doc);
        let Some(keys) = self.docs.remove(doc) else {
            return 0;
        };
        for k in &keys {
            self.index.remove(*k);
            self.entries.remove(k);
        }
        keys.len()
    }

    /// The label ids a predicate allows.
    pub fn allowed(&self, may_read: &dyn Fn(&Label) -> bool) -> Vec<u32> {
        (0..self.labels.len() as u32)
            .filter(|&i| may_read(&self.labels[i as usize]))
            .collect()
    }

    /// The `k` nearest entries among the allowed label ids.
    pub fn neighbours(&self, query: &[f32], k: usize, allowed: &[u32]) -> Result<Vec<Neighbour>> {
        if query.len() != self.dim {
            return Err(Error::InvalidInput(format!(
                "query has {} dimensions, the datastore {}",
                query.len(),
                self.dim
            )));
        }
        if allowed.is_empty() || self.entries.is_empty() {
            return Ok(Vec::new());
        }
        let hits = self.index.search(query, k, &Filter::partitions(allowed))?;
        Ok(hits
            .into_iter()
            .filter_map(|h| {
                self.entries.get(&h.key).map(|e| Neighbour {
                    key: h.key,
                    score: h.score,
                    entry: e.clone(),
                })
            })
            .collect())
    }

    /// Saves atomically into `dir` (the index and a sealed sidecar), with a
    /// generation number the caller uses to know what the files reflect.
    pub fn save(&self, dir: &Path, generation: u64) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
        self.index.save(dir, generation)?;
        let sidecar = Sidecar {
            dim: self.dim as u32,
            next_key: self.next_key,
            max_doc_tokens: self.max_doc_tokens as u32,
            labels: self.labels.clone(),
            versions: self.versions.clone(),
            docs: self.docs.keys().cloned().collect(),
            entries: self
                .docs
                .values()
                .enumerate()
                .flat_map(|(d, keys)| {
                    keys.iter().filter_map(move |k| {
                        self.entries
                            .get(k)
                            .map(|e| (*k, e.token, d as u32, e.pos, e.label))
                    })
                })
                .collect(),
        };
        let bytes = postcard::to_allocvec(&sidecar).map_err(|e| Error::Corrupt(e.to_string()))?;
        let sealed = lethe_durable::seal(MAGIC, VERSION, &bytes);
        lethe_durable::atomic_write(&dir.join("entries.bin"), &sealed).map_err(|e| io(e, dir))?;
        Ok(())
    }

    /// Loads what [`Datastore::save`] wrote, with its generation.
    pub fn load(dir: &Path) -> Result<(Datastore, u64)> {
        let (index, generation) = VectorIndex::load(dir)?;
        let bytes = std::fs::read(dir.join("entries.bin")).map_err(|e| io(e, dir))?;
        let (payload, _) = lethe_durable::unseal(&bytes, MAGIC, VERSION, VERSION)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let side: Sidecar =
            postcard::from_bytes(payload).map_err(|e| Error::Corrupt(e.to_string()))?;
        if side.dim as usize != index.dim() {
            return Err(Error::Corrupt(
                "index and entries disagree on the dimension".into(),
            ));
        }
        let doc_ids: Vec<Arc<str>> = side.docs.iter().map(|d| Arc::from(d.as_str())).collect();
        let mut docs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut entries = HashMap::with_capacity(side.entries.len());
        for &(k, token, d, pos, label) in &side.entries {
            if !index.contains(k) {
                return Err(Error::Corrupt(format!("entry {k} has no key in the index")));
            }
            let doc = doc_ids.get(d as usize).ok_or_else(|| {
                Error::Corrupt(format!(
                    "entry {k} names document #{d}, which is not listed"
                ))
            })?;
            if label as usize >= side.labels.len() {
                return Err(Error::Corrupt(format!(
                    "entry {k} names label #{label}, which is not listed"
                )));
            }
            docs.entry(doc.to_string()).or_default().push(k);
            entries.insert(
                k,
                Entry {
                    token,
                    doc: doc.clone(),
                    pos,
                    label,
                },
            );
        }
        for keys in docs.values_mut() {
            keys.sort_unstable();
        }
        if index.len() != entries.len() {
            return Err(Error::Corrupt(
                "index and entries disagree on the count".into(),
            ));
        }
        Ok((
            Datastore {
                dim: side.dim as usize,
                index,
                entries,
                docs,
                versions: side.versions,
                labels: side.labels,
                next_key: side.next_key,
                max_doc_tokens: side.max_doc_tokens as usize,
            },
            generation,
        ))
    }
}

fn io(source: std::io::Error, path: &Path) -> Error {
    Error::Io {
        context: path.display().to_string(),
        source,
    }
}
