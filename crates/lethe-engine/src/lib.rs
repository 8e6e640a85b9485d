//! The façade both front ends (the `lethe` CLI and, later, the daemon) use.
//!
//! An [`Engine`] opens one data directory under one policy and offers the
//! operations a person or an app asks for: ingest labeled documents, search
//! as a principal, delete documents, manage API keys, verify the audit log.
//! It is the one place where the pieces meet: the policy decides
//! ([`lethe_label`]), the store retrieves ([`lethe_store`]), the embedder
//! computes vectors ([`lethe_model`]), and every operation is recorded in
//! the audit log ([`lethe_audit`]) with principals, ids and labels, never
//! document text or key material.
//!
//! **API boundary:** front ends call only this crate. They never open the
//! store, the key file or the audit log themselves.
//!
//! Layout of a data directory: `store/` (documents and indexes), `keys/`
//! (key digests and the server secret), `audit.jsonl` (+ `.head`).

mod config;
pub mod erasure;
mod knn;
mod sources;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use lethe_audit::{AuditLog, Event};
use lethe_auth::KeyStore;
use lethe_label::{Label, Policy, Role};
use lethe_model::generate::Llm;
use lethe_model::gguf_llama::LoadOptions;
use lethe_store::{NewDocument, OnDuplicate, SearchMode, SearchQuery, Store, StoreConfig};
use serde_json::json;

pub use lethe_model::generate::{FinishReason, GenerateConfig, Sampling};
pub use lethe_rag::{Decision, PermissiveConfig, Propagator, Source, StreamEvent};

/// The generator's file inside its asset folder.
const GENERATOR_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub use config::{Config, KnnlmConfig, ModelsConfig};
pub use knn::DatastoreSync;
pub use lethe_audit::Report as AuditReport;
pub use lethe_auth::{KeyRecord, NewKey};
pub use lethe_label as label;
pub use lethe_store::Error as StoreError;
pub use lethe_store::{Consistency, DeleteReport, DocumentInfo, IngestReport, SearchHit};
pub use sources::{document_from_json, read_folder, read_jsonl, LabelSpec, SourceDocument};

/// Verifies an audit log file without opening a data directory.
pub fn verify_audit_file(path: &Path) -> Result<AuditReport> {
    Ok(lethe_audit::verify(path)?)
}

/// Fetches every model lethe uses into `cache` (idempotent) and returns
/// each model's name and folder.
pub fn fetch_models(cache: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    let cache = lethe_assets::Cache::new(cache);
    lethe_assets::Asset::ALL
        .iter()
        .map(|a| Ok((a.name, cache.ensure(*a)?)))
        .collect()
}

/// The default model cache: `LETHE_CACHE`, else the project's `.lethe/cache`.
pub fn default_model_cache() -> PathBuf {
    lethe_assets::Cache::from_env().root().to_path_buf()
}

/// Errors of engine operations, one variant per kind of outcome a front end
/// treats differently.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The policy file is missing or invalid.
    #[error("policy: {0}")]
    Policy(#[from] lethe_label::PolicyError),
    /// The caller is not allowed to do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request is malformed (bad input file, unknown label, ...).
    #[error("{0}")]
    BadRequest(String),
    /// A referenced thing does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The document store failed.
    #[error(transparent)]
    Store(#[from] lethe_store::Error),
    /// The key store failed.
    #[error(transparent)]
    Keys(#[from] lethe_auth::Error),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] lethe_audit::Error),
    /// A model could not be fetched.
    #[error(transparent)]
    Assets(#[from] lethe_assets::Error),
    /// A model failed to load or run.
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// The caller went away before the work was done.
    #[error("cancelled")]
    Cancelled,
    /// Reading an input file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An operator at the console of this machine, with access to the data
    /// directory anyway: may do everything; recorded as such.
    Operator,
    /// An authenticated principal of the policy.
    Principal(String),
}

impl Actor {
    fn name(&self) -> Option<String> {
        match self {
            Actor::Operator => None,
            Actor::Principal(p) => Some(p.clone()),
        }
    }
}

/// Which retriever to use.
pub use lethe_store::SearchMode as Mode;

/// Embedding dimension of all-MiniLM-L6-v2.
pub const EMBEDDING_DIM: usize = 384;

/// One data directory under one policy.
pub struct Engine {
    config: Config,
    policy: RwLock<Arc<Policy>>,
    store: RwLock<Store>,
    keys: KeyStore,
    audit: AuditLog,
    embedder: OnceLock<Arc<lethe_model::embed::Embedder>>,
    llm: OnceLock<Arc<Llm>>,
    knn: knn::Slot,
    model_init: Mutex<()>,
    via: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.config.data_dir)
            .finish_non_exhaustive()
    }
}

/// A question to answer.
#[derive(Debug, Clone)]
pub struct AnswerRequest {
    /// Who asks (already authenticated).
    pub principal: String,
    /// The question.
    pub query: String,
    /// Where the answer goes (`None`: back to the principal).
    pub sink: Option<String>,
    /// How many chunks to retrieve.
    pub k: usize,
    /// Which retriever.
    pub mode: SearchMode,
    /// How the answer's label is computed.
    pub propagator: lethe_rag::Propagator,
    /// Generation settings.
    pub generation: GenerateConfig,
    /// What generates the answer.
    pub generator: Generator,
}

/// What generates an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Generator {
    /// Retrieval-augmented generation: the retrieved chunks go into the
    /// prompt.
    #[default]
    Rag,
    /// kNN-LM: no context; the datastore's neighbours (restricted to what
    /// the caller may read) are mixed into every next-token distribution.
    KnnLm,
}

impl Generator {
    /// The name used on the wire (`rag`, `knnlm`).
    pub fn name(self) -> &'static str {
        match self {
            Generator::Rag => "rag",
            Generator::KnnLm => "knnlm",
        }
    }
}

/// An answered (or refused) question.
#[derive(Debug, Clone)]
pub struct AnswerOutcome {
    /// The answer, its label and the decision.
    pub answer: lethe_rag::Answer,
    /// The retrieved sources (all readable by the caller).
    pub sources: Vec<lethe_rag::Source>,
    /// The resolved sink.
    pub sink: lethe_label::SinkRef,
    /// The audit record's sequence number.
    pub audit_seq: u64,
}

/// What a search returns.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// The hits, best first.
    pub hits: Vec<SearchHit>,
    /// Chunks the caller may read.
    pub readable_chunks: u64,
    /// Chunks in the store.
    pub total_chunks: u64,
    /// The audit record's sequence number.
    pub audit_seq: u64,
}

impl Engine {
    /// Opens the data directory named by `config` under its policy. `via`
    /// names the front end in audit records (`cli`, `http`).
    pub fn open(config: Config, via: &str) -> Result<Engine> {
        let policy = Policy::load(&config.policy)?;
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|e| io_err(data, e))?;
        let store = Store::open(&data.join("store"), StoreConfig::new(EMBEDDING_DIM))?;
        let keys = KeyStore::open(&data.join("keys"))?;
        let audit = AuditLog::open(&data.join("audit.jsonl"))?;
        Ok(Engine {
            config,
            policy: RwLock::new(Arc::new(policy)),
            store: RwLock::new(store),
            keys,
            audit,
            embedder: OnceLock::new(),
            llm: OnceLock::new(),
            knn: Default::default(),
            model_init: Mutex::new(()),
            via: via.to_string(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the policy file and swaps it in atomically; on error the old
    /// policy stays in force.
    pub fn reload_policy(&self, actor: &Actor) -> Result<Arc<Policy>> {
        self.require(actor, Role::Admin)?;
        let policy = Arc::new(Policy::load(&self.config.policy)?);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
        self.record(
            actor,
            "policy.reload",
            json!({"file": self.config.policy.display().to_string()}),
        )?;
        Ok(policy)
    }

    fn embedder(&self) -> Result<Arc<lethe_model::embed::Embedder>> {
        if let Some(e) = self.embedder.get() {
            return Ok(e.clone());
        }
        let _guard = self.model_init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.embedder.get() {
            return Ok(e.clone());
        }
        let cache = lethe_assets::Cache::new(&self.config.models.cache);
        let dir = cache.ensure(lethe_assets::Asset::ALL_MINILM_L6_V2)?;
        let device = self.config.models.device.open()?;
        let e = Arc::new(lethe_model::embed::Embedder::load(&dir, &device)?);
        let _ = self.embedder.set(e.clone());
        Ok(e)
    }

    /// The generator, loaded on first use.
    pub fn llm(&self) -> Result<Arc<Llm>> {
        if let Some(l) = self.llm.get() {
            return Ok(l.clone());
        }
        let _guard = self.model_init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = self.llm.get() {
            return Ok(l.clone());
        }
        let cache = lethe_assets::Cache::new(&self.config.models.cache);
        let dir = cache.ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)?;
        let device = self.config.models.device.open()?;
        let options = LoadOptions {
            format: self.config.models.generator_format,
            max_context: Some(self.config.models.max_context),
        };
        let l = Arc::new(Llm::load(&dir.join(GENERATOR_FILE), &device, &options)?);
        let _ = self.llm.set(l.clone());
        Ok(l)
    }

    /// Loads both models now rather than on the first request.
    pub fn warm_up(&self) -> Result<()> {
        self.embedder()?;
        self.llm()?;
        Ok(())
    }

    /// The generator's id as reported to clients and in audit records.
    pub fn model_id(&self) -> String {
        format!(
            "smollm2-135m-instruct-{}",
            self.config.models.generator_format.name()
        )
    }

    /// Answers a question as a principal: retrieves what it may read,
    /// computes the answer's label, checks the flow to the sink, and
    /// generates only when the answer may be released (for propagators that
    /// know the label up front). `on_event` hears the release and then the
    /// answer while it is generated. Every call is audited, released or refused.
    pub fn answer(
        &self,
        req: &AnswerRequest,
        on_event: impl FnMut(StreamEvent<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<AnswerOutcome> {
        match req.generator {
            Generator::Rag => self.answer_rag(req, on_event),
            Generator::KnnLm => self.answer_knnlm(req, on_event),
        }
    }

    /// A principal's policy, clearance and the sink its output goes to
    /// (`None`: itself): unknown principals and sinks they may not use are
    /// `Forbidden`, unknown sinks `BadRequest`. Every answering path (RAG,
    /// kNN-LM, the deployment's decoder) starts here.
    pub fn output_context(
        &self,
        principal: &str,
        sink: Option<&str>,
    ) -> Result<(Arc<Policy>, lethe_label::Clearance, lethe_label::SinkRef)> {
        let policy = self.policy();
        let clearance = policy
            .clearance(principal)
            .map_err(|e| Error::Forbidden(e.to_string()))?;
        let sink = policy.resolve_sink(principal, sink).map_err(|e| match e {
            lethe_label::LookupError::UnknownSink(s) => {
                Error::BadRequest(format!("unknown sink {s:?}"))
            }
            e => Error::Forbidden(e.to_string()),
        })?;
        Ok((policy, clearance, sink))
    }

    /// The caller's policy, clearance and resolved sink.
    fn caller(
        &self,
        req: &AnswerRequest,
    ) -> Result<(Arc<Policy>, lethe_label::Clearance, lethe_label::SinkRef)> {
        let (policy, clearance, sink) = self.output_context(&req.principal, req.sink.as_deref())?;
        if req.query.trim().is_empty() {
            return Err(Error::BadRequest("empty query".into()));
        }
        Ok((policy, clearance, sink))
    }

    fn answer_rag(
        &self,
        req: &AnswerRequest,
        on_event: impl FnMut(StreamEvent<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<AnswerOutcome> {
        let (policy, clearance, sink) = self.caller(req)?;
        let hits = {
            let vector = match req.mode {
                SearchMode::Bm25 => None,
                _ => Some(
                    self.embedder()?
                        .embed(&[req.query.as_str()])?
                        .pop()
                        .unwrap_or_default(),
                ),
            };
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            let readable = store.readable(&|l| clearance.may_read(&l.readers));
            store.search(
                &SearchQuery {
                    text: &req.query,
                    vector: vector.as_deref(),
                    k: req.k,
                    mode: req.mode,
                },
                &readable,
            )?
        };
        let sources: Vec<lethe_rag::Source> = hits
            .into_iter()
            .map(|h| lethe_rag::Source {
                chunk_id: h.chunk_id,
                doc_id: h.doc_id,
                label: h.label,
                label_name: h.label_name,
                text: h.text,
            })
            .collect();
        let llm = self.llm()?;
        let config = lethe_rag::AnswerConfig {
            generation: req.generation.clone(),
            model_label: Label::public_trusted(),
            propagator: req.propagator,
        };
        let flow = |l: &Label| policy.check_flow(l, &sink);
        let answer = lethe_rag::answer(&llm, &req.query, &sources, &config, &flow, on_event)
            .map_err(|e| match e {
                lethe_rag::Error::InvalidRequest(m) => Error::BadRequest(m),
                lethe_rag::Error::Model(e) => Error::Model(e),
                lethe_rag::Error::Cancelled => Error::Cancelled,
                other => Error::BadRequest(other.to_string()),
            })?;
        let audit_seq = self.record(
            &Actor::Principal(req.principal.clone()),
            "query",
            json!({
                "sink": sink.to_string(),
                "propagator": req.propagator.name(),
                "retrieved": sources.iter().map(|s| json!({"chunk": s.chunk_id, "label": s.label_name.clone().unwrap_or_else(|| s.label.to_string())})).collect::<Vec<_>>(),
                "label": answer.label.to_string(),
                "decision": answer.decision.name(),
                "violations": match &answer.decision {
                    lethe_rag::Decision::Refused(v) => v.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                    lethe_rag::Decision::Released => Vec::new(),
                },
                "label_sources": answer.label_sources.iter().filter_map(|i| sources.get(*i)).map(|s| s.chunk_id.clone()).collect::<Vec<_>>(),
                "route": answer.trace.route,
                "model": self.model_id(),
                "prompt_sha256": answer.prompt_sha256,
                "completion_tokens": answer.completion_tokens,
                "cost": {
                    "generations": answer.cost.generations,
                    "scored_contexts": answer.cost.scored_contexts,
                    "score_batches": answer.cost.score_batches,
                },
            }),
        )?;
        Ok(AnswerOutcome {
            answer,
            sources,
            sink,
            audit_seq,
        })
    }

    /// Appends the `model.complete` audit record of a completion served
    /// from the deployment's own decoder (by `lethe-compliance`, which
    /// holds it). `details` must hold labels, hashes and gate decisions,
    /// never prompt or completion text.
    pub fn audit_model_completion(
        &self,
        principal: &str,
        details: serde_json::Value,
    ) -> Result<u64> {
        self.record(
            &Actor::Principal(principal.to_string()),
            "model.complete",
            details,
        )
    }

    fn require(&self, actor: &Actor, role: Role) -> Result<()> {
        match actor {
            Actor::Operator => Ok(()),
            Actor::Principal(p) => {
                let policy = self.policy();
                policy
                    .principal(p)
                    .map_err(|e| Error::Forbidden(e.to_string()))?;
                if policy.has_role(p, role) {
                    Ok(())
                } else {
                    Err(Error::Forbidden(format!(
                        "principal {p:?} lacks the {role} role"
                    )))
                }
            }
        }
    }

    fn record(&self, actor: &Actor, action: &str, details: serde_json::Value) -> Result<u64> {
        let rec = self.audit.append(Event {
            action: action.to_string(),
            principal: actor.name(),
            via: self.via.clone(),
            details,
        })?;
        Ok(rec.seq)
    }

    /// Resolves each source document's label under the policy. Unlabeled
    /// documents get the policy's default label, or fail closed.
    pub fn resolve_labels(&self, docs: Vec<SourceDocument>) -> Result<Vec<NewDocument>> {
        let policy = self.policy();
        let mut out = Vec::with_capacity(docs.len());
        let mut problems = Vec::new();
        for d in docs {
            let resolved: Result<(Label, Option<String>)> = match &d.label {
                LabelSpec::Named(name) => policy
                    .label(name)
                    .map(|l| (l.clone(), Some(name.clone())))
                    .map_err(|_| Error::BadRequest(format!("{}: unknown label {name:?}", d.origin))),
                LabelSpec::Inline(label) => policy
                    .check_label(label)
                    .map(|_| (label.clone(), None))
                    .map_err(|e| Error::BadRequest(format!("{}: {e}", d.origin))),
                LabelSpec::Unlabeled => match policy.default_label() {
                    Some((name, l)) => Ok((l.clone(), Some(name.to_string()))),
                    None => Err(Error::BadRequest(format!(
                        "{}: document {:?} has no label and the policy names no default label (unlabeled data is refused)",
                        d.origin, d.id
                    ))),
                },
            };
            match resolved {
                Ok((label, label_name)) => out.push(NewDocument {
                    id: d.id,
                    label,
                    label_name,
                    text: d.text,
                    meta: d.meta,
                }),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(Error::BadRequest(problems.join("\n")))
        }
    }

    /// Ingests documents, all or nothing.
    pub fn ingest(
        &self,
        actor: &Actor,
        docs: Vec<SourceDocument>,
        replace: bool,
    ) -> Result<IngestReport> {
        self.require(actor, Role::Ingest)?;
        let docs = self.resolve_labels(docs)?;
        let summary: Vec<serde_json::Value> = docs
            .iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "label": d.label_name.clone().unwrap_or_else(|| d.label.to_string()),
                    "sha256": sha256_hex(d.text.as_bytes()),
                })
            })
            .collect();
        let embedder = self.embedder()?;
        let adapter = EmbedAdapter(&embedder);
        let report = {
            let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
            let mode = if replace {
                OnDuplicate::Replace
            } else {
                OnDuplicate::Reject
            };
            store.ingest(docs, mode, &adapter)?
        };
        if self.config.knnlm.enabled {
            self.knn_sync()?;
        } else if !report.replaced.is_empty() {
            // A replaced document's old entries must not outlive it.
            self.knn_forget(&report.replaced)?;
        }
        self.record(
            actor,
            "ingest",
            json!({"store_seq": report.seq, "documents": summary, "chunks": report.chunks, "replaced": report.replaced}),
        )?;
        Ok(report)
    }

    /// Searches as `principal`: only chunks it may read, exact top-k.
    pub fn search(
        &self,
        principal: &str,
        query: &str,
        k: usize,
        mode: SearchMode,
    ) -> Result<SearchResult> {
        let policy = self.policy();
        let clearance = policy
            .clearance(principal)
            .map_err(|e| Error::Forbidden(e.to_string()))?;
        if query.trim().is_empty() {
            return Err(Error::BadRequest("empty query".into()));
        }
        let vector = match mode {
            SearchMode::Bm25 => None,
            SearchMode::Dense | SearchMode::Hybrid => {
                let e = self.embedder()?;
                Some(e.embed(&[query])?.pop().unwrap_or_default())
            }
        };
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        let readable = store.readable(&|l| clearance.may_read(&l.readers));
        let hits = store.search(
            &SearchQuery {
                text: query,
                vector: vector.as_deref(),
                k,
                mode,
            },
            &readable,
        )?;
        let readable_chunks = store.readable_chunks(&readable);
        let total_chunks = store.chunk_count() as u64;
        drop(store);
        let audit_seq = self.record(
            &Actor::Principal(principal.to_string()),
            "search",
            json!({
                "query_sha256": sha256_hex(query.as_bytes()),
                "mode": format!("{mode:?}").to_lowercase(),
                "k": k,
                "hits": hits.iter().map(|h| json!({"chunk": h.chunk_id, "label": label_display(h)})).collect::<Vec<_>>(),
            }),
        )?;
        Ok(SearchResult {
            hits,
            readable_chunks,
            total_chunks,
            audit_seq,
        })
    }

    /// Deletes documents exactly from the store and every index. A
    /// principal may only delete documents it may read; others are reported
    /// as not found, so deleting does not reveal what exists.
    pub fn delete(&self, actor: &Actor, ids: &[&str]) -> Result<DeleteReport> {
        self.require(actor, Role::Delete)?;
        let report = {
            let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
            if let Actor::Principal(p) = actor {
                let policy = self.policy();
                for id in ids {
                    let readable = store
                        .document(id)
                        .is_some_and(|d| policy.may_read(p, &d.label));
                    if !readable {
                        return Err(Error::NotFound(format!("document {id:?}")));
                    }
                }
            }
            store.delete(ids).map_err(|e| match e {
                lethe_store::Error::UnknownDocument(id) => {
                    Error::NotFound(format!("document {id:?}"))
                }
                e => Error::Store(e),
            })?
        };
        // The datastore's entries go before the delete returns (and, after
        // a crash here, when the datastore is next loaded).
        let ids_removed: Vec<String> = report.removed.iter().map(|r| r.id.clone()).collect();
        let knn_entries = self.knn_forget(&ids_removed)?;
        self.record(
            actor,
            "delete",
            json!({
                "store_seq": report.seq,
                "knnlm_entries_removed": knn_entries,
                "documents": report.removed.iter().map(|r| json!({"id": r.id, "chunks": r.chunks, "sha256": r.content_sha256})).collect::<Vec<_>>(),
            }),
        )?;
        Ok(report)
    }

    /// Every stored document's metadata.
    pub fn documents(&self) -> Vec<DocumentInfo> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .documents()
    }

    /// Creates an API key for a principal of the policy; the key is returned once.
    pub fn create_key(&self, actor: &Actor, principal: &str) -> Result<NewKey> {
        self.require(actor, Role::Admin)?;
        self.policy()
            .principal(principal)
            .map_err(|e| Error::NotFound(e.to_string()))?;
        let key = self.keys.create(principal)?;
        self.record(
            actor,
            "key.create",
            json!({"key_id": key.record.id, "for": principal}),
        )?;
        Ok(key)
    }

    /// Revokes a key by id.
    pub fn revoke_key(&self, actor: &Actor, id: &str) -> Result<KeyRecord> {
        self.require(actor, Role::Admin)?;
        let r = self.keys.revoke(id)?;
        self.record(
            actor,
            "key.revoke",
            json!({"key_id": id, "for": r.principal}),
        )?;
        Ok(r)
    }

    /// Key records (never keys).
    pub fn keys(&self) -> Vec<KeyRecord> {
        self.keys.list()
    }

    /// The principal a key authenticates, if the key is valid and the
    /// principal still exists in the current policy.
    pub fn authenticate(&self, key: &str) -> Result<String> {
        let principal = self.keys.authenticate(key)?;
        self.policy()
            .principal(&principal)
            .map_err(|_| Error::Keys(lethe_auth::Error::InvalidKey))?;
        Ok(principal)
    }

    /// Verifies the audit log.
    pub fn verify_audit(&self) -> Result<lethe_audit::Report> {
        Ok(lethe_audit::verify(self.audit.path())?)
    }

    /// Checks that the store's table and indexes agree.
    pub fn verify_store(&self) -> Result<Consistency> {
        Ok(self
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verify()?)
    }

    /// Compacts the store and releases the data directory.
    pub fn close(self) -> Result<()> {
        let store = self.store.into_inner().unwrap_or_else(|p| p.into_inner());
        store.close()?;
        Ok(())
    }
}

/// How a hit's label is shown: its policy name, or the label itself.
pub fn label_display(hit: &SearchHit) -> String {
    hit.label_name
        .clone()
        .unwrap_or_else(|| hit.label.to_string())
}

struct EmbedAdapter<'a>(&'a lethe_model::embed::Embedder);

impl lethe_store::Embedder for EmbedAdapter<'_> {
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn embed(&self, texts: &[&str]) -> std::result::Result<Vec<Vec<f32>>, String> {
        self.0.embed(texts).map_err(|e| e.to_string())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The repository root when running from a checkout (for defaults such as
/// the example policy), else the current directory.
pub fn project_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    match here.canonicalize() {
        Ok(p) if p.join("Cargo.toml").exists() => p,
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests;
