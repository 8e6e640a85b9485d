//! The compliance-unlearning workflow: a crash-safe request ledger, the
//! executor that carries a request out, and signed receipts.
//!
//! A data subject (or their counsel) asks that some documents be forgotten.
//! A principal with the policy's `unlearn` role files the request
//! ([`Compliance::file`]); a run ([`Compliance::run`]) then
//!
//! 1. **weights**: when `[unlearning] model` names the deployment's own
//!    trainable decoder, unlearns the documents' text from it with the
//!    chosen method (`lethe_unlearn`), measures forget and retain NLL
//!    before and after, and writes the new weights as a new version (or,
//!    for O3, an adapter and detector). Without a model, the stage records
//!    that no weights were trained on the documents, with the served
//!    generator's hash ([`weights`]);
//! 2. **erase**: removes the documents from the store and every index via
//!    `lethe_engine::Engine::erase_for_unlearning` (the officer need not
//!    be able to read them), then probes BM25 retrieval: no query built
//!    from a removed document may retrieve it, retained ones still must;
//! 3. **activate**: swaps the live weights (`live.json`, atomically, and
//!    the in-process handle [`Compliance::live_model`]) so a running
//!    daemon uses them without a restart; the epoch counts activations;
//! 4. **receipt**: signs a receipt with Ed25519 ([`receipt`]) holding the
//!    request, the removed documents' hashes, method and hyper-parameters,
//!    mask/adapter hashes, weights hashes before and after, and metrics.
//!
//! **Crash safety.** Each step ends with a ledger record ([`ledger`]),
//! fsynced before the next step begins. After a crash the next run rolls
//! back a half-done weights stage (its staging folder is deleted; nothing
//! was erased yet) and starts it again, and rolls every later step forward
//! (each is idempotent: erasing already-erased ids is a no-op, activation
//! checks `live.json`, the receipt is rebuilt from the ledger and Ed25519
//! signatures are deterministic). A filed request is never lost.
//!
//! The weights stage runs *before* erasure so that a crash can never leave
//! a request whose documents are gone but whose unlearning still needs
//! their text: no copy of the text is ever written outside the store.
//!
//! Layout under `<data_dir>/unlearning/`: `LOCK`, `ledger.log`,
//! `signing-key.pk8` (0600) and `signing-key.pub`, `live.json`,
//! `models/<request>/` (versions and O3 adapters), `receipts/<request>.json`.

pub mod ledger;
pub mod receipt;
pub mod serve;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use lethe_engine::{Actor, Engine};
use serde_json::{json, Value};

pub use ledger::{DocumentRef, ErasureRecord, Phase, Request, RequestStatus, State, WeightsRecord};
pub use receipt::{verify_receipt_file, PublicKey, Receipt, SigningKey, RECEIPT_FORMAT};
pub use serve::{Completion, CompletionRequest, SuppressionGate};
pub use weights::{LiveModel, LiveState, METHODS};

use ledger::{Event, Ledger};

/// Errors of the workflow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine refused or failed (forbidden, unknown document, store...).
    #[error(transparent)]
    Engine(#[from] lethe_engine::Error),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No such request.
    #[error("unknown unlearning request {0:?}")]
    UnknownRequest(String),
    /// The request is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// The weights stage failed.
    #[error("weights: {0}")]
    Weights(String),
    /// An unlearning method failed.
    #[error(transparent)]
    Unlearn(#[from] lethe_unlearn::Error),
    /// A model failed to load or save.
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// The ledger or a state file is damaged (not a crash: a crash only
    /// tears the last ledger record, which is repaired silently).
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// A key file or key text is unusable.
    #[error("key: {0}")]
    BadKey(String),
    /// A receipt file is malformed.
    #[error("receipt: {0}")]
    BadReceipt(String),
    /// A receipt does not verify.
    #[error("verification failed: {0}")]
    VerificationFailed(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A request to file.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// Document ids.
    pub documents: Vec<String>,
    /// Why.
    pub reason: String,
    /// Who asked.
    pub requester: String,
    /// Method (else the run's or the config's).
    pub method: Option<String>,
}

/// What a run reports as it goes.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The request.
    pub request: &'a str,
    /// The step starting now: `weights`, `erase`, `probe`, `activate`,
    /// `receipt`, `commit`.
    pub step: &'static str,
    /// Steps done for this request.
    pub done: u64,
    /// Steps per request.
    pub total: u64,
}

/// Steps of a run, in order.
pub const STEPS: [&str; 6] = ["weights", "erase", "probe", "activate", "receipt", "commit"];

/// The outcome of running one request.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The request id.
    pub id: String,
    /// The signed receipt.
    pub receipt: Receipt,
    /// Whether an interrupted run was resumed.
    pub resumed: bool,
}

/// Retained documents probed after erasure.
const RETAIN_PROBES: usize = 8;
/// Hits per probe query.
const PROBE_K: usize = 5;

/// The workflow over one engine's data directory.
pub struct Compliance {
    engine: Weak<Engine>,
    dir: PathBuf,
    _lock: lethe_durable::DirLock,
    ledger: Mutex<Ledger>,
    run_lock: Mutex<()>,
    key: SigningKey,
    live: RwLock<LiveState>,
    live_model: Mutex<Option<Arc<LiveModel>>>,
}

impl std::fmt::Debug for Compliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compliance")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

type Registry = Mutex<Vec<(Weak<Engine>, Arc<Compliance>)>>;

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

impl Compliance {
    /// The workflow of `engine`, opened once per engine and process: the
    /// daemon's handlers and its background runs share it (and with it the
    /// ledger lock and the live-model handle). Entries of dropped engines
    /// are released on the next call.
    pub fn shared(engine: &Arc<Engine>) -> Result<Arc<Compliance>> {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|(e, _)| e.strong_count() > 0);
        if let Some((_, c)) = reg
            .iter()
            .find(|(e, _)| std::ptr::eq(e.as_ptr(), Arc::as_ptr(engine)))
        {
            return Ok(c.clone());
        }
        let c = Arc::new(Compliance::open(engine)?);
        reg.push((Arc::downgrade(engine), c.clone()));
        Ok(c)
    }

    /// Opens (creating on first use) the workflow's folder under the
    /// engine's data directory, taking its lock and the signing key.
    pub fn open(engine: &Arc<Engine>) -> Result<Compliance> {
        let dir = engine.config().data_dir.join("unlearning");
        let lock = lethe_durable::DirLock::acquire(&dir).map_err(|e| Error::io(&dir, e))?;
        for sub in ["models", "receipts"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| Error::io(&dir.join(sub), e))?;
        }
        let key = SigningKey::load_or_create(&dir.join("signing-key.pk8"))?;
        let pub_path = dir.join("signing-key.pub");
        let pub_text = format!("{}\n", key.public_key().to_text());
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(pub_text.as_str()) {
            lethe_durable::atomic_write(&pub_path, pub_text.as_bytes())
                .map_err(|e| Error::io(&pub_path, e))?;
        }
        let ledger = Ledger::open(&dir.join("ledger.log"))?;
        let live = weights::read_live(&dir.join("live.json"))?;
        Ok(Compliance {
            engine: Arc::downgrade(engine),
            dir,
            _lock: lock,
            ledger: Mutex::new(ledger),
            run_lock: Mutex::new(()),
            key,
            live: RwLock::new(live),
            live_model: Mutex::new(None),
        })
    }

    fn engine(&self) -> Result<Arc<Engine>> {
        self.engine
            .upgrade()
            .ok_or_else(|| Error::Conflict("the engine was closed".into()))
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The public key that verifies this workflow's receipts.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// Files a request. Every document must exist now; their hashes are
    /// recorded. Needs the `unlearn` role.
    pub fn file(&self, actor: &Actor, req: NewRequest) -> Result<RequestStatus> {
        let engine = self.engine()?;
        engine.require_unlearn(actor)?;
        let mut ids: Vec<String> = Vec::new();
        for d in req.documents {
            let d = d.trim().to_string();
            if d.is_empty() {
                return Err(Error::BadRequest("an empty document id".into()));
            }
            if !ids.contains(&d) {
                ids.push(d);
            }
        }
        if ids.is_empty() {
            return Err(Error::BadRequest("name at least one document".into()));
        }
        if req.reason.trim().is_empty() {
            return Err(Error::BadRequest("a reason is required".into()));
        }
        if req.requester.trim().is_empty() {
            return Err(Error::BadRequest("a requester is required".into()));
        }
        if let Some(m) = &req.method {
            check_method(m)?;
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let targets = engine.unlearning_targets(actor, &refs)?;
        let mut ledger = self.ledger();
        let id = ledger.next_id();
        let request = Request {
            id: id.clone(),
            documents: targets
                .into_iter()
                .map(|t| DocumentRef {
                    id: t.id,
                    sha256: t.sha256,
                    chunks: t.chunks,
                    label: t.label,
                })
                .collect(),
            reason: req.reason,
            requester: req.requester,
            filed_by: actor_name(actor),
            via: engine_via(&engine),
            filed_at: now(),
            method: req.method,
        };
        ledger.append(Event::Filed {
            request: request.clone(),
        })?;
        let status = ledger
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::UnknownRequest(id.clone()))?;
        drop(ledger);
        engine.audit_unlearning(
            actor,
            "request",
            json!({
                "request": id,
                "documents": request.documents.iter().map(|d| json!({"id": d.id, "sha256": d.sha256})).collect::<Vec<_>>(),
                "requester_sha256": sha256_hex(request.requester.as_bytes()),
                "method": request.method,
            }),
        )?;
        tracing::info!(request = %id, documents = request.documents.len(), "unlearning request filed");
        Ok(status)
    }

    /// One request's status. Needs the `unlearn` role.
    pub fn status(&self, actor: &Actor, id: &str) -> Result<RequestStatus> {
        self.engine()?.require_unlearn(actor)?;
        self.ledger()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownRequest(id.to_string()))
    }

    /// Every request, by id. Needs the `unlearn` role.
    pub fn list(&self, actor: &Actor) -> Result<Vec<RequestStatus>> {
        self.engine()?.require_unlearn(actor)?;
        Ok(self.ledger().all().cloned().collect())
    }

    /// Ids of requests a plain `run` would execute: interrupted ones first,
    /// then pending ones, in filing order.
    pub fn runnable(&self) -> Vec<String> {
        let ledger = self.ledger();
        let mut running: Vec<String> = Vec::new();
        let mut pending: Vec<String> = Vec::new();
        for r in ledger.all() {
            match r.state {
                State::Running(_) => running.push(r.request.id.clone()),
                State::Pending => pending.push(r.request.id.clone()),
                _ => {}
            }
        }
        running.extend(pending);
        running
    }

    /// The receipt of a completed request, read from disk and verified.
    pub fn receipt(&self, actor: &Actor, id: &str) -> Result<Receipt> {
        self.engine()?.require_unlearn(actor)?;
        let path = self.receipt_path(id)?;
        if self.ledger().get(id).map(|r| &r.state) != Some(&State::Completed) {
            return Err(Error::Conflict(format!("request {id} has no receipt yet")));
        }
        verify_receipt_file(&path, self.public_key())
    }

    fn receipt_path(&self, id: &str) -> Result<PathBuf> {
        if !id.starts_with("ur-") || !id[3..].chars().all(|c| c.is_ascii_digit()) || id.len() < 4 {
            return Err(Error::UnknownRequest(id.to_string()));
        }
        Ok(self.dir.join("receipts").join(format!("{id}.json")))
    }

    /// The live weights state (epoch, version, suppressions).
    pub fn live(&self) -> LiveState {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The live unlearned model, loaded on first use and swapped in place by
    /// every activation (`None` when no `[unlearning] model` is configured).
    pub fn live_model(&self) -> Result<Option<Arc<LiveModel>>> {
        let engine = self.engine()?;
        let Some(base) = engine.config().unlearning.model.clone() else {
            return Ok(None);
        };
        let state = self.live();
        let mut slot = self.live_model.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref().filter(|m| m.matches(&state)) {
            return Ok(Some(m.clone()));
        }
        let m = weights::load_live(&state, &self.live_sources(&engine, base))?;
        *slot = Some(m.clone());
        Ok(Some(m))
    }

    /// Runs (or resumes) one request as `actor` (needs the `unlearn` role).
    /// A completed request returns its receipt again; a failed one is
    /// retried. `method` overrides the request's and the config's method.
    pub fn run(
        &self,
        actor: &Actor,
        id: &str,
        method: Option<&str>,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<RunOutcome> {
        let engine = self.engine()?;
        engine.require_unlearn(actor)?;
        if let Some(m) = method {
            check_method(m)?;
        }
        let _run = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut status = self
            .ledger()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownRequest(id.to_string()))?;
        let resumed = matches!(status.state, State::Running(_));
        let _span = tracing::info_span!("unlearn_run", request = id).entered();
        if status.state == State::Running(Phase::Started) {
            // The weights stage was cut short: nothing was erased; discard
            // its partial output and start again.
            self.discard_outputs(id)?;
            self.ledger().append(Event::RolledBack {
                id: id.into(),
                reason: "interrupted during the weights stage".into(),
                at: now(),
            })?;
            tracing::warn!(request = id, "rolled back an interrupted weights stage");
            status = self
                .ledger()
                .get(id)
                .cloned()
                .ok_or_else(|| Error::UnknownRequest(id.to_string()))?;
        }
        let total = STEPS.len() as u64;
        let mut step = |i: usize| {
            progress(Progress {
                request: id,
                step: STEPS[i],
                done: i as u64,
                total,
            })
        };
        let doc_ids: Vec<String> = status
            .request
            .documents
            .iter()
            .map(|d| d.id.clone())
            .collect();
        let doc_refs: Vec<&str> = doc_ids.iter().map(String::as_str).collect();
        let ucfg = engine.config().unlearning.clone();
        // Texts: read while the documents are still stored (erasure comes
        // after the weights stage); kept in memory only.
        let mut texts: Option<lethe_engine::erasure::UnlearningTexts> = None;
        if matches!(status.state, State::Pending | State::Failed(_)) {
            // Without a trainable model there is nothing a method could run on.
            let method = match &ucfg.model {
                None => "none".to_string(),
                Some(_) => method
                    .map(str::to_string)
                    .or_else(|| status.request.method.clone())
                    .unwrap_or_else(|| ucfg.method.clone()),
            };
            if ucfg.model.is_some() {
                check_method(&method)?;
            }
            self.ledger().append(Event::Started {
                id: id.into(),
                method: method.clone(),
                attempt: status.attempts + 1,
                at: now(),
            })?;
            step(0);
            let staged = (|| -> Result<WeightsRecord> {
                let generator_path = engine.generator_path()?;
                let generator = generator_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let generator_sha256 = sha256_file(&generator_path)?;
                let t = engine.unlearning_texts(
                    actor,
                    id,
                    &doc_refs,
                    ucfg.retain_sample,
                    seed_of(id),
                )?;
                let record = match &ucfg.model {
                    None => weights::not_trained(generator, generator_sha256),
                    Some(model_dir) => {
                        let live = self.live();
                        let base_dir = match &live.version {
                            Some(v) => self.dir.join("models").join(v),
                            None => model_dir.clone(),
                        };
                        let (record, trained) = weights::stage(&weights::StageInput {
                            request_id: id,
                            method: &method,
                            base_dir,
                            models_dir: &self.dir.join("models"),
                            overrides: ucfg.methods.get(&method),
                            max_seq_len: ucfg.max_seq_len,
                            forget: &t.forget,
                            retain: &t.retain,
                            generator,
                            generator_path: &generator_path,
                            generator_sha256,
                            suppressions: &live.suppressions,
                        })?;
                        if let Some(decoder) = trained {
                            self.pending_model(&engine, model_dir, id, decoder, &live);
                        }
                        record
                    }
                };
                texts = Some(t);
                Ok(record)
            })();
            match staged {
                Ok(record) => self.ledger().append(Event::Staged {
                    id: id.into(),
                    weights: Box::new(record),
                    at: now(),
                })?,
                Err(e) => {
                    let _ = self.discard_outputs(id);
                    self.ledger().append(Event::Failed {
                        id: id.into(),
                        error: e.to_string(),
                        at: now(),
                    })?;
                    tracing::error!(request = id, error = %e, "unlearning failed before erasure; nothing was erased");
                    return Err(e);
                }
            }
        }
        let status = self
            .ledger()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownRequest(id.to_string()))?;
        if status.state == State::Running(Phase::Staged) {
            step(1);
            let t = match texts.take() {
                Some(t) => t,
                None => {
                    engine.unlearning_texts(actor, id, &doc_refs, RETAIN_PROBES, seed_of(id))?
                }
            };
            let erasure = engine.erase_for_unlearning(actor, id, &doc_refs)?;
            step(2);
            let retain_probe: Vec<(String, String)> =
                t.retain.iter().take(RETAIN_PROBES).cloned().collect();
            let probe = engine.probe_retrieval(actor, id, &t.forget, &retain_probe, PROBE_K)?;
            drop(t);
            if probe.forget_hits != 0 {
                return Err(Error::Conflict(format!(
                    "request {id}: {} probe queries still retrieve an erased document",
                    probe.forget_hits
                )));
            }
            let removed = erasure
                .removed
                .into_iter()
                .map(|t| DocumentRef {
                    id: t.id,
                    sha256: t.sha256,
                    chunks: t.chunks,
                    label: t.label,
                })
                .collect();
            self.ledger().append(Event::Erased {
                id: id.into(),
                erasure: ErasureRecord {
                    store_seq: erasure.store_seq,
                    removed,
                    already_absent: erasure.already_absent,
                    audit_seq: erasure.audit_seq,
                    probe: [
                        probe.forget_queries,
                        probe.forget_hits,
                        probe.retain_queries,
                        probe.retain_found,
                    ],
                },
                at: now(),
            })?;
        }
        let status = self
            .ledger()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownRequest(id.to_string()))?;
        if status.state == State::Running(Phase::Erased) {
            step(3);
            let epoch = self.activate(&status)?;
            self.ledger().append(Event::Activated {
                id: id.into(),
                epoch,
                at: now(),
            })?;
        }
        let status = self
            .ledger()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownRequest(id.to_string()))?;
        let receipt = match &status.state {
            State::Running(Phase::Activated) => {
                step(4);
                let receipt = self.key.sign(receipt_body(&status, self.public_key())?)?;
                let text = receipt.to_json();
                let path = self.receipt_path(id)?;
                lethe_durable::atomic_write(&path, text.as_bytes())
                    .map_err(|e| Error::io(&path, e))?;
                step(5);
                let sha = sha256_hex(text.as_bytes());
                self.ledger().append(Event::Completed {
                    id: id.into(),
                    receipt_sha256: sha.clone(),
                    at: now(),
                })?;
                engine.audit_unlearning(
                    actor,
                    "complete",
                    json!({"request": id, "receipt_sha256": sha, "epoch": status.epoch, "resumed": resumed}),
                )?;
                tracing::info!(request = id, "unlearning request completed");
                receipt
            }
            State::Completed => verify_receipt_file(&self.receipt_path(id)?, self.public_key())?,
            other => {
                return Err(Error::Conflict(format!(
                    "request {id} is {} after the run",
                    other.name()
                )));
            }
        };
        Ok(RunOutcome {
            id: id.to_string(),
            receipt,
            resumed,
        })
    }

    /// Runs every interrupted, then every pending request.
    pub fn run_all(
        &self,
        actor: &Actor,
        method: Option<&str>,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Vec<RunOutcome>> {
        self.engine()?.require_unlearn(actor)?;
        let mut out = Vec::new();
        for id in self.runnable() {
            out.push(self.run(actor, &id, method, progress)?);
        }
        Ok(out)
    }

    /// Resumes every run a crash interrupted (nothing pending), as the
    /// operator of this process: what a daemon does when it starts, so an
    /// interrupted request finishes without anyone asking again.
    pub fn resume_interrupted(
        &self,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Vec<RunOutcome>> {
        let interrupted: Vec<String> = self
            .ledger()
            .all()
            .filter(|r| matches!(r.state, State::Running(_)))
            .map(|r| r.request.id.clone())
            .collect();
        let mut out = Vec::new();
        for id in interrupted {
            out.push(self.run(&Actor::Operator, &id, None, progress)?);
        }
        Ok(out)
    }

    /// Where live models of this workflow come from (`base`: the configured
    /// decoder folder).
    fn live_sources(&self, engine: &Arc<Engine>, base: PathBuf) -> weights::LiveSources {
        let engine = engine.clone();
        weights::LiveSources {
            base,
            models_dir: self.dir.join("models"),
            o3_overrides: engine.config().unlearning.methods.get("o3").cloned(),
            generator: Box::new(move || Ok(engine.generator_path()?)),
        }
    }

    /// Remembers a freshly trained decoder (with the suppressions in force)
    /// so activation can swap it in without reloading it from disk. When
    /// that fails, `live_model` loads it lazily instead.
    fn pending_model(
        &self,
        engine: &Arc<Engine>,
        base: &Path,
        id: &str,
        decoder: lethe_model::decoder::Decoder,
        live: &LiveState,
    ) {
        let src = self.live_sources(engine, base.to_path_buf());
        match LiveModel::build(Some(id.to_string()), decoder, &live.suppressions, &src) {
            Ok(m) => {
                *self.live_model.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(m));
            }
            Err(e) => {
                tracing::warn!(request = id, error = %e, "new weights will load on first use")
            }
        }
    }

    /// Makes a staged request's weights live; idempotent.
    fn activate(&self, status: &RequestStatus) -> Result<u64> {
        let id = &status.request.id;
        let path = self.dir.join("live.json");
        let mut state = weights::read_live(&path)?;
        if !state.requests.contains(id) {
            state.epoch += 1;
            state.requests.push(id.clone());
            if let Some(w) = &status.weights {
                match w.kind.as_str() {
                    "unlearned" => {
                        state.version = w.version.clone();
                        state.weights_sha256 = w.weights_after.clone();
                    }
                    "suppression" => state.suppressions.push(id.clone()),
                    _ => {}
                }
            }
            weights::write_live(&path, &state)?;
        }
        let epoch = state
            .requests
            .iter()
            .position(|r| r == id)
            .map_or(state.epoch, |p| p as u64 + 1);
        // Swap the in-process handle: a pending model of this version stays,
        // anything else is reloaded lazily by `live_model`.
        {
            let mut slot = self.live_model.lock().unwrap_or_else(|p| p.into_inner());
            let keep = slot.as_ref().is_some_and(|m| m.matches(&state));
            if !keep {
                *slot = None;
            }
        }
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = state;
        tracing::info!(request = %id, epoch, "unlearning activated");
        Ok(epoch)
    }

    /// Deletes what an unfinished weights stage of `id` may have written.
    fn discard_outputs(&self, id: &str) -> Result<()> {
        let models = self.dir.join("models");
        weights::remove_dir(&models.join(format!(".staging-{id}")))?;
        let live = weights::read_live(&self.dir.join("live.json"))?;
        if !live.requests.iter().any(|r| r == id) {
            weights::remove_dir(&models.join(id))?;
        }
        let mut slot = self.live_model.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|m| {
            m.version.as_deref() == Some(id) && !live.requests.iter().any(|r| r == id)
        }) {
            *slot = None;
        }
        Ok(())
    }
}

/// The receipt body of an activated request, built from the ledger only.
fn receipt_body(s: &RequestStatus, key: &PublicKey) -> Result<Value> {
    let w = s
        .weights
        .as_ref()
        .ok_or_else(|| Error::Corrupt(format!("request {} has no weights record", s.request.id)))?;
    let e = s
        .erasure
        .as_ref()
        .ok_or_else(|| Error::Corrupt(format!("request {} has no erasure record", s.request.id)))?;
    let r = &s.request;
    let body = json!({
        "format": RECEIPT_FORMAT,
        "key_id": key.key_id(),
        "request": {
            "id": r.id,
            "documents": r.documents.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            "reason": r.reason,
            "requester": r.requester,
            "filed_by": r.filed_by,
            "via": r.via,
            "filed_at": r.filed_at,
        },
        "removed": r.documents.iter().map(|d| json!({"id": d.id, "sha256": d.sha256, "chunks": d.chunks, "label": d.label})).collect::<Vec<_>>(),
        "retrieval": {
            "removed_from": ["document table", "bm25 index", "dense index", "engine delete path (kNN-LM datastore when present)"],
            "store_seq": e.store_seq,
            "erased_now": e.removed.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            "already_absent": e.already_absent,
            "audit_seq": e.audit_seq,
            "probe": {
                "k": PROBE_K,
                "forget_queries": e.probe[0],
                "forget_hits": e.probe[1],
                "retain_queries": e.probe[2],
                "retain_found": e.probe[3],
            },
        },
        "method": {"name": w.method, "hyperparameters": w.hyperparameters},
        "weights": {
            "kind": w.kind,
            "suppression_only": w.kind == "suppression",
            "statement": w.statement,
            "generator": w.generator,
            "generator_sha256": w.generator_sha256,
            "before_sha256": w.weights_before,
            "after_sha256": w.weights_after,
            "version": w.version,
            "mask": w.mask,
            "adapter": w.adapter,
            "detector_sha256": w.detector_sha256,
            "tokenizer": w.tokenizer,
            "forget_examples": w.forget_examples,
            "retain_examples": w.retain_examples,
            "steps": w.steps,
        },
        "metrics": w.metrics,
        "epoch": s.epoch,
        "completed_at": s.activated_at,
        "attempts": s.attempts,
        "rollbacks": s.rollbacks,
    });
    Ok(receipt::signable(body))
}

fn check_method(m: &str) -> Result<()> {
    if METHODS.contains(&m) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "unknown method {m:?}: use one of {}",
            METHODS.join(", ")
        )))
    }
}

fn actor_name(a: &Actor) -> String {
    match a {
        Actor::Operator => "operator".into(),
        Actor::Principal(p) => p.clone(),
    }
}

fn engine_via(engine: &Engine) -> String {
    engine.front_end().to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests;
