//! Privileged erasure for compliance unlearning.
//!
//! A compliance officer holds the policy's `unlearn` role but usually not
//! the clearance to read what it must erase (a legal counsel erasing an HR
//! file). [`Engine::delete`] reports unreadable documents as not found, so
//! that deleting reveals nothing; this module is the other door, for the
//! unlearning workflow (`lethe-compliance`) only:
//!
//! * every method checks the `unlearn` role first and writes an `unlearn.*`
//!   audit record naming the request, the principal, ids and hashes;
//! * nothing here returns document content to the *officer*: targets and
//!   erasures carry ids, content hashes and chunk counts. The one exception
//!   is [`Engine::unlearning_texts`], which hands the text of the documents
//!   being forgotten (and a retain sample) to the weight-level unlearning
//!   run in the same process; it is audited as `unlearn.read` with the
//!   request id and the purpose, and front ends must never print it;
//! * erasure goes through [`Engine::delete`] (as the system), so whatever
//!   the delete path removes (document table, BM25, dense index, kNN-LM
//!   datastore) an unlearning erasure removes too. The `delete` record it
//!   writes is followed by an `unlearn.erase` record that attributes it to
//!   the officer and the request.

use lethe_label::Role;
use lethe_store::{SearchMode, SearchQuery};
use serde_json::json;

use crate::{sha256_hex, Actor, Engine, Error, Result};

pub use crate::config::UnlearningConfig;

/// A document named by an unlearning request: identity, never content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlearningTarget {
    /// Document id.
    pub id: String,
    /// SHA-256 of its text, hex.
    pub sha256: String,
    /// Chunks it has in the indexes.
    pub chunks: usize,
    /// Its label's policy name, or the label itself.
    pub label: String,
}

/// What [`Engine::erase_for_unlearning`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The store's log sequence number of the delete (`None` when every
    /// document was already gone, e.g. on a resumed run).
    pub store_seq: Option<u64>,
    /// The documents removed now.
    pub removed: Vec<UnlearningTarget>,
    /// Requested ids that were no longer stored.
    pub already_absent: Vec<String>,
    /// Sequence number of the `unlearn.erase` audit record.
    pub audit_seq: u64,
}

/// Counts from [`Engine::probe_retrieval`]: whether forgotten documents can
/// still be retrieved, and whether retained ones still can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetrievalProbe {
    /// Probe queries built from forgotten documents.
    pub forget_queries: usize,
    /// Of those, queries whose top-k (over every stored document) holds a
    /// chunk of a forgotten document. Must be 0 after erasure.
    pub forget_hits: usize,
    /// Probe queries built from retained documents.
    pub retain_queries: usize,
    /// Of those, queries whose top-k holds their own document.
    pub retain_found: usize,
}

/// Words of a probe query: enough to identify a document, short enough to
/// be a query rather than a copy of it.
const PROBE_WORDS: usize = 32;

impl Engine {
    /// Fails unless `actor` may run unlearning (the operator may).
    pub fn require_unlearn(&self, actor: &Actor) -> Result<()> {
        self.require(actor, Role::Unlearn)
    }

    /// Identities of the documents an unlearning request names, readable or
    /// not. Unknown ids fail the call ([`Error::NotFound`]).
    pub fn unlearning_targets(&self, actor: &Actor, ids: &[&str]) -> Result<Vec<UnlearningTarget>> {
        self.require_unlearn(actor)?;
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        ids.iter()
            .map(|id| {
                store
                    .document(id)
                    .map(|d| UnlearningTarget {
                        id: d.id.clone(),
                        sha256: d.content_sha256.clone(),
                        chunks: d.chunks,
                        label: d.label_name.clone().unwrap_or_else(|| d.label.to_string()),
                    })
                    .ok_or_else(|| Error::NotFound(format!("document {id:?}")))
            })
            .collect()
    }

    /// The texts a weight-level unlearning run trains on: the forget set
    /// (`forget` ids still stored, whoever may read them) and up to
    /// `retain` other documents that `actor` may read, chosen by a
    /// deterministic hash of `seed` and the id. Audited as `unlearn.read`;
    /// the texts are for the training run only.
    pub fn unlearning_texts(
        &self,
        actor: &Actor,
        request_id: &str,
        forget: &[&str],
        retain: usize,
        seed: u64,
    ) -> Result<UnlearningTexts> {
        self.require_unlearn(actor)?;
        let policy = self.policy();
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        let forget_texts: Vec<(String, String)> = forget
            .iter()
            .filter_map(|id| store.document_text(id).map(|t| (id.to_string(), t)))
            .collect();
        let mut candidates: Vec<(String, String)> = store
            .documents()
            .into_iter()
            .filter(|d| !forget.contains(&d.id.as_str()))
            .filter(|d| match actor {
                Actor::Operator => true,
                Actor::Principal(p) => policy.may_read(p, &d.label),
            })
            .map(|d| (sha256_hex(format!("{seed}\0{}", d.id).as_bytes()), d.id))
            .collect();
        candidates.sort();
        let retain_texts: Vec<(String, String)> = candidates
            .into_iter()
            .take(retain)
            .filter_map(|(_, id)| store.document_text(&id).map(|t| (id, t)))
            .collect();
        drop(store);
        self.record(
            actor,
            "unlearn.read",
            json!({
                "request": request_id,
                "purpose": "unlearning run: training sets and retrieval probe",
                "forget": forget_texts.iter().map(|(id, t)| json!({"id": id, "sha256": sha256_hex(t.as_bytes())})).collect::<Vec<_>>(),
                "retain_documents": retain_texts.len(),
            }),
        )?;
        Ok(UnlearningTexts {
            forget: forget_texts,
            retain: retain_texts,
        })
    }

    /// Erases documents for an unlearning request: from the document table
    /// and every index the delete path covers, whether or not `actor` may
    /// read them. Ids no longer stored are reported, not failed, so a
    /// resumed run can repeat the call. Never returns content.
    pub fn erase_for_unlearning(
        &self,
        actor: &Actor,
        request_id: &str,
        ids: &[&str],
    ) -> Result<Erasure> {
        self.require_unlearn(actor)?;
        let (present, absent): (Vec<&str>, Vec<&str>) = {
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            ids.iter().partition(|id| store.document(id).is_some())
        };
        let mut removed = Vec::new();
        let mut store_seq = None;
        if !present.is_empty() {
            let labels: Vec<(String, String)> = {
                let store = self.store.read().unwrap_or_else(|p| p.into_inner());
                present
                    .iter()
                    .filter_map(|id| store.document(id))
                    .map(|d| {
                        (
                            d.id.clone(),
                            d.label_name.clone().unwrap_or_else(|| d.label.to_string()),
                        )
                    })
                    .collect()
            };
            let report = self.delete(&Actor::Operator, &present)?;
            store_seq = Some(report.seq);
            for r in report.removed {
                let label = labels
                    .iter()
                    .find(|(id, _)| *id == r.id)
                    .map(|(_, l)| l.clone())
                    .unwrap_or_default();
                removed.push(UnlearningTarget {
                    id: r.id,
                    sha256: r.content_sha256,
                    chunks: r.chunks,
                    label,
                });
            }
        }
        let already_absent: Vec<String> = absent.iter().map(|s| s.to_string()).collect();
        let audit_seq = self.record(
            actor,
            "unlearn.erase",
            json!({
                "request": request_id,
                "store_seq": store_seq,
                "documents": removed.iter().map(|r| json!({"id": r.id, "sha256": r.sha256, "chunks": r.chunks, "label": r.label})).collect::<Vec<_>>(),
                "already_absent": already_absent,
            }),
        )?;
        Ok(Erasure {
            store_seq,
            removed,
            already_absent,
            audit_seq,
        })
    }

    /// Probes BM25 retrieval over every stored document with queries built
    /// from the first words of each text: `forget` are `(id, text)` of
    /// forgotten documents (a hit on any of their ids counts), `retain` of
    /// retained ones (finding their own id counts). Returns counts only;
    /// audited as `unlearn.probe`.
    pub fn probe_retrieval(
        &self,
        actor: &Actor,
        request_id: &str,
        forget: &[(String, String)],
        retain: &[(String, String)],
        k: usize,
    ) -> Result<RetrievalProbe> {
        self.require_unlearn(actor)?;
        let forgotten: Vec<&str> = forget.iter().map(|(id, _)| id.as_str()).collect();
        let mut probe = RetrievalProbe::default();
        {
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            let all = store.readable(&|_| true);
            let top = |text: &str| -> Result<Vec<String>> {
                let query = probe_query(text);
                if query.is_empty() {
                    return Ok(Vec::new());
                }
                let hits = store.search(
                    &SearchQuery {
                        text: &query,
                        vector: None,
                        k,
                        mode: SearchMode::Bm25,
                    },
                    &all,
                )?;
                Ok(hits.into_iter().map(|h| h.doc_id).collect())
            };
            for (_, text) in forget {
                probe.forget_queries += 1;
                if top(text)?.iter().any(|d| forgotten.contains(&d.as_str())) {
                    probe.forget_hits += 1;
                }
            }
            for (id, text) in retain {
                probe.retain_queries += 1;
                if top(text)?.iter().any(|d| d == id) {
                    probe.retain_found += 1;
                }
            }
        }
        self.record(
            actor,
            "unlearn.probe",
            json!({
                "request": request_id,
                "k": k,
                "forget_queries": probe.forget_queries,
                "forget_hits": probe.forget_hits,
                "retain_queries": probe.retain_queries,
                "retain_found": probe.retain_found,
            }),
        )?;
        Ok(probe)
    }

    /// Appends an `unlearn.<event>` audit record for the unlearning
    /// workflow (requests filed, runs completed, receipts signed). Needs the
    /// `unlearn` role; `details` must hold ids and hashes, never content.
    pub fn audit_unlearning(
        &self,
        actor: &Actor,
        event: &str,
        details: serde_json::Value,
    ) -> Result<u64> {
        self.require_unlearn(actor)?;
        if event.is_empty()
            || !event
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::BadRequest(format!("bad audit event name {event:?}")));
        }
        self.record(actor, &format!("unlearn.{event}"), details)
    }

    /// The front end this engine was opened for (`cli`, `http`), as its
    /// audit records name it.
    pub fn front_end(&self) -> &str {
        &self.via
    }

    /// The generator's GGUF file (what the daemon serves), for weight
    /// hashes in receipts. Fetched into the model cache if missing.
    pub fn generator_path(&self) -> Result<std::path::PathBuf> {
        let cache = lethe_assets::Cache::new(&self.config.models.cache);
        Ok(cache
            .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)?
            .join(crate::GENERATOR_FILE))
    }
}

/// Texts handed to a weight-level unlearning run.
#[derive(Clone, PartialEq, Eq)]
pub struct UnlearningTexts {
    /// `(id, text)` of the documents to forget that are still stored.
    pub forget: Vec<(String, String)>,
    /// `(id, text)` of a sample of retained documents.
    pub retain: Vec<(String, String)>,
}

impl std::fmt::Debug for UnlearningTexts {
    // Never print document text by accident.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnlearningTexts")
            .field(
                "forget",
                &self.forget.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("retain", &self.retain.len())
            .finish()
    }
}

/// The first [`PROBE_WORDS`] alphanumeric words of `text`.
fn probe_query(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(PROBE_WORDS)
        .collect::<Vec<_>>()
        .join(" ")
}
