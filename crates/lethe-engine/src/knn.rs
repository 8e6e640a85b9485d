//! The kNN-LM datastore, kept in step with the document store, and the
//! `knnlm` answer mode.
//!
//! The store is the source of truth; the datastore (`<data>/knnlm/`) is
//! derived from it and reconciled against it:
//!
//! * deleting a document removes its entries from the datastore in the same
//!   call, before the delete returns, and saves the datastore;
//! * whenever the datastore is loaded (first use after start, e.g. after a
//!   crash between the store's delete and the datastore's save) entries of
//!   documents the store no longer holds, or holds in another version, are
//!   removed before anything reads it, so a crash never resurrects a
//!   deleted document through the kNN-LM;
//! * documents the datastore lacks are added with the generator, after an
//!   ingest when `[knnlm] enabled`, and before a `knnlm` query.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use lethe_knnlm::{Datastore, DocText, KnnConfig, KnnRequest};
use lethe_label::Label;
use lethe_model::generate::FinishReason;
use lethe_rag::{Answer, Cost, Decision, Propagator, Source, StreamEvent, Trace};
use serde_json::json;

use crate::{sha256_hex, Actor, AnswerOutcome, AnswerRequest, Engine, Error, Result};

/// Documents embedded per forward batch while building the datastore.
const BUILD_BATCH: usize = 8;

/// What [`Engine::sync_datastore`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DatastoreSync {
    /// Documents added (new or changed).
    pub added: usize,
    /// Documents whose entries were removed (gone or changed).
    pub removed: usize,
    /// Entries in the datastore afterwards.
    pub entries: usize,
}

/// The datastore slot of an engine: `None` until first loaded.
pub(crate) type Slot = std::sync::RwLock<Option<Datastore>>;

fn versions_of(docs: &[lethe_store::DocumentInfo]) -> BTreeMap<String, String> {
    docs.iter()
        .map(|d| (d.id.clone(), d.content_sha256.clone()))
        .collect()
}

/// Removes the entries of documents the store no longer holds, or holds
/// in another version than the one they were added with; returns how many.
fn drop_stale(ds: &mut Datastore, current: &BTreeMap<String, String>) -> usize {
    let stale: Vec<String> = ds
        .documents()
        .filter(|d| current.get(*d).map(String::as_str) != ds.version(d))
        .map(String::from)
        .collect();
    for d in &stale {
        ds.remove_document(d);
    }
    stale.len()
}

fn knn_err(e: lethe_knnlm::Error) -> Error {
    match e {
        lethe_knnlm::Error::Model(e) => Error::Model(e),
        lethe_knnlm::Error::InvalidInput(m) => Error::BadRequest(m),
        other => Error::BadRequest(format!("kNN-LM datastore: {other}")),
    }
}

impl Engine {
    fn knn_dir(&self) -> PathBuf {
        self.config.data_dir.join("knnlm")
    }

    fn knn_on_disk(&self) -> bool {
        self.knn_dir().join("entries.bin").exists()
    }

    /// The store's documents as (id, version) pairs.
    fn store_versions(&self) -> BTreeMap<String, String> {
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        versions_of(&store.documents())
    }

    /// Loads the datastore into its slot if it is not there yet, removing
    /// entries the store no longer backs. Needs no model. Returns whether a
    /// datastore exists (in memory) afterwards.
    fn knn_load(&self, slot: &mut Option<Datastore>) -> Result<bool> {
        if slot.is_some() {
            return Ok(true);
        }
        if !self.knn_on_disk() {
            return Ok(false);
        }
        let (mut ds, _generation) = Datastore::load(&self.knn_dir()).map_err(knn_err)?;
        let stale = drop_stale(&mut ds, &self.store_versions());
        if stale > 0 {
            self.knn_save(&ds)?;
            tracing::info!(
                removed = stale,
                "kNN-LM datastore: removed entries of documents the store no longer holds"
            );
        }
        *slot = Some(ds);
        Ok(true)
    }

    fn knn_save(&self, ds: &Datastore) -> Result<()> {
        let seq = self.store.read().unwrap_or_else(|p| p.into_inner()).seq();
        ds.save(&self.knn_dir(), seq).map_err(knn_err)
    }

    /// Removes documents' entries from the datastore (if one exists) and
    /// saves it. Called by every delete path.
    pub(crate) fn knn_forget(&self, ids: &[String]) -> Result<usize> {
        let mut slot = self.knn.write().unwrap_or_else(|p| p.into_inner());
        if !self.knn_load(&mut slot)? {
            return Ok(0);
        }
        let Some(ds) = slot.as_mut() else {
            return Ok(0);
        };
        let removed: usize = ids.iter().map(|id| ds.remove_document(id)).sum();
        self.knn_save(ds)?;
        Ok(removed)
    }

    /// Brings the kNN-LM datastore in line with the store: removes entries
    /// of documents that are gone or changed, adds documents it lacks (one
    /// forward pass of the generator per document), and saves it. Creates
    /// the datastore when there is none.
    pub fn sync_datastore(&self, actor: &Actor) -> Result<DatastoreSync> {
        self.require(actor, lethe_label::Role::Ingest)?;
        self.knn_sync()
    }

    pub(crate) fn knn_sync(&self) -> Result<DatastoreSync> {
        let mut slot = self.knn.write().unwrap_or_else(|p| p.into_inner());
        self.knn_load(&mut slot)?;
        let llm = self.llm()?;
        if slot.is_none() {
            *slot = Some(
                Datastore::new(llm.model.config().d_model, self.config.knnlm.max_doc_tokens)
                    .map_err(knn_err)?,
            );
        }
        let Some(ds) = slot.as_mut() else {
            return Err(Error::BadRequest("kNN-LM datastore unavailable".into()));
        };
        // Snapshot of what must be added, under the store's read lock.
        let (missing, removed) = {
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            let docs = store.documents();
            let stale = drop_stale(ds, &versions_of(&docs));
            let missing: Vec<(String, Label, String, String)> = docs
                .iter()
                .filter(|d| !ds.contains(&d.id))
                .filter_map(|d| {
                    store
                        .document_text(&d.id)
                        .map(|t| (d.id.clone(), d.label.clone(), t, d.content_sha256.clone()))
                })
                .collect();
            (missing, stale)
        };
        for batch in missing.chunks(BUILD_BATCH) {
            let texts: Vec<DocText<'_>> = batch
                .iter()
                .map(|(id, label, text, version)| DocText {
                    id,
                    label,
                    text,
                    version,
                })
                .collect();
            ds.add_documents(&llm, &texts).map_err(knn_err)?;
        }
        if !missing.is_empty() || removed > 0 {
            self.knn_save(ds)?;
        }
        Ok(DatastoreSync {
            added: missing.len(),
            removed,
            entries: ds.len(),
        })
    }

    /// Answers with the kNN-LM (no retrieved context; the datastore,
    /// restricted to the entries the caller may read, shapes every token).
    /// `conservative` labels the answer with every label its neighbours
    /// had; `permissive` with the labels that carried the emitted tokens,
    /// validated and regenerated under that restriction.
    pub(crate) fn answer_knnlm(
        &self,
        req: &AnswerRequest,
        mut on_event: impl FnMut(StreamEvent<'_>) -> ControlFlow<()>,
    ) -> Result<AnswerOutcome> {
        let (policy, clearance, sink) = self.caller(req)?;
        let permissive = match req.propagator {
            Propagator::Conservative => false,
            Propagator::Permissive(_) => true,
            Propagator::Introspection => {
                return Err(Error::BadRequest(
                    "the introspection propagator applies to mode \"rag\" only".into(),
                ))
            }
        };
        if !self.config.knnlm.enabled && !self.knn_on_disk() {
            return Err(Error::BadRequest(
                "mode \"knnlm\" needs a datastore: set `[knnlm] enabled = true` in lethe.toml"
                    .into(),
            ));
        }
        if self.config.knnlm.enabled {
            self.knn_sync()?;
        }
        let llm = self.llm()?;
        let mut slot = self.knn.write().unwrap_or_else(|p| p.into_inner());
        self.knn_load(&mut slot)?;
        drop(slot);
        let slot = self.knn.read().unwrap_or_else(|p| p.into_inner());
        let ds = slot
            .as_ref()
            .ok_or_else(|| Error::BadRequest("the kNN-LM datastore is empty".into()))?;
        let c = &self.config.knnlm;
        let config = KnnConfig {
            k: c.k,
            lambda: c.lambda,
            temperature: c.temperature,
            carry_epsilon: c.carry_epsilon,
            similarity: c.similarity,
            max_tokens: req.generation.max_tokens,
        };
        let allowed = ds.allowed(&|l| clearance.may_read(&l.readers));
        let model_label = Label::public_trusted();
        let flow = |l: &Label| policy.check_flow(l, &sink);
        let started = Instant::now();
        let out = lethe_knnlm::answer(
            &llm,
            ds,
            &KnnRequest {
                question: &req.query,
                caller_allowed: &allowed,
                model_label: &model_label,
                flow_check: &flow,
                config: &config,
                permissive,
            },
            |_| ControlFlow::Continue(()),
        )
        .map_err(knn_err)?;
        let model_secs = started.elapsed().as_secs_f64();
        let labels = ds.labels();
        let sources: Vec<Source> = out
            .sources
            .iter()
            .map(|(doc, l)| Source {
                chunk_id: doc.to_string(),
                doc_id: doc.to_string(),
                label: labels[*l as usize].clone(),
                label_name: policy
                    .labels()
                    .iter()
                    .find(|(_, named)| **named == labels[*l as usize])
                    .map(|(name, _)| name.clone()),
                text: String::new(),
            })
            .collect();
        drop(slot);
        let decision = if out.violations.is_empty() {
            Decision::Released
        } else {
            Decision::Refused(out.violations.clone())
        };
        if let (Decision::Released, Some(text)) = (&decision, &out.text) {
            if on_event(StreamEvent::Released { label: &out.label }).is_continue() {
                let _ = on_event(StreamEvent::Text(text));
            }
        }
        let answer = Answer {
            text: out.text.clone(),
            label: out.label.clone(),
            label_sources: (0..sources.len()).collect(),
            decision,
            propagator: req.propagator,
            prompt_sha256: sha256_hex(req.query.as_bytes()),
            prompt_tokens: 0,
            completion_tokens: out.completion_tokens,
            finish: Some(if out.hit_max_tokens {
                FinishReason::MaxTokens
            } else {
                FinishReason::StopToken(llm.chat.end_of_turn())
            }),
            model_secs,
            cost: Cost {
                generations: out.generations,
                scored_contexts: out.utility_passes,
                score_batches: out.utility_passes,
                generated_tokens: out.completion_tokens,
                reused_tokens: 0,
            },
            trace: Trace {
                route: out.route,
                minimal: Vec::new(),
                full_answer: (out.text.as_deref() != Some(out.full_answer.as_str()))
                    .then(|| out.full_answer.clone()),
                introspection_parsed: None,
                rejected: Vec::new(),
            },
        };
        let audit_seq = self.record(
            &Actor::Principal(req.principal.clone()),
            "query",
            json!({
                "mode": "knnlm",
                "sink": sink.to_string(),
                "propagator": req.propagator.name(),
                "retrieved": sources.iter().map(|s| json!({"doc": s.doc_id, "label": s.label_name.clone().unwrap_or_else(|| s.label.to_string())})).collect::<Vec<_>>(),
                "label": answer.label.to_string(),
                "decision": answer.decision.name(),
                "violations": out.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "route": out.route,
                "model": self.model_id(),
                "completion_tokens": answer.completion_tokens,
                "cost": {"generations": out.generations, "utility_passes": out.utility_passes, "searches": out.searches},
            }),
        )?;
        Ok(AnswerOutcome {
            answer,
            sources,
            sink,
            audit_seq,
        })
    }
}
