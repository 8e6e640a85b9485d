//! The request ledger: an append-only, CRC-framed log of unlearning events.
//!
//! Every state change of a request is one framed JSON record appended and
//! fsynced before the step it describes is considered done (writer:
//! `Ledger::append`; reader: `Ledger::open`, which replays the log).
//! A crash can only tear the last record, which the next open cuts off
//! (the step it described is then redone or rolled back by the executor);
//! a damaged record elsewhere is corruption and refuses to open. The state
//! of every request is the fold of its events, so a request, once its
//! `filed` record is on disk, is never lost.
//!
//! The first record is a header naming the format version.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The ledger format this build writes and reads.
const FORMAT_VERSION: u32 = 1;

/// A filed unlearning request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `ur-000001`, ...
    pub id: String,
    /// Documents to forget.
    pub documents: Vec<DocumentRef>,
    /// Why (the legal basis, ticket, ...).
    pub reason: String,
    /// Who asked (the data subject or their representative).
    pub requester: String,
    /// The principal that filed it (`operator` for the local console).
    pub filed_by: String,
    /// Front end (`cli`, `http`).
    pub via: String,
    /// Unix seconds.
    pub filed_at: u64,
    /// Method asked for at filing time (else the run's or the config's).
    pub method: Option<String>,
}

/// A document named by a request, as it was when the request was filed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentRef {
    /// Id.
    pub id: String,
    /// SHA-256 of its text.
    pub sha256: String,
    /// Chunks in the indexes.
    pub chunks: usize,
    /// Label name.
    pub label: String,
}

/// What the weights stage produced (every measurement is a decimal string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsRecord {
    /// `not_trained`, `unlearned` or `suppression`.
    pub kind: String,
    /// The sentence the receipt states about the weights.
    pub statement: String,
    /// The served generator's file name and SHA-256 (unchanged by unlearning).
    pub generator: String,
    /// SHA-256 of the generator file.
    pub generator_sha256: String,
    /// Method id (`none` when not trained).
    pub method: String,
    /// Hyper-parameters (numbers as strings).
    pub hyperparameters: serde_json::Value,
    /// Tensor hash of the trained model before.
    pub weights_before: Option<String>,
    /// Tensor hash after (equal to before for suppression).
    pub weights_after: Option<String>,
    /// The new weights version (a folder under `unlearning/models/`).
    pub version: Option<String>,
    /// SalUn mask summary (JSON, numbers as strings).
    pub mask: Option<serde_json::Value>,
    /// O3 adapter summary (JSON).
    pub adapter: Option<serde_json::Value>,
    /// O3 detector hash.
    pub detector_sha256: Option<String>,
    /// Tokenizer used for the forget and retain sets.
    pub tokenizer: Option<String>,
    /// Forget examples.
    pub forget_examples: usize,
    /// Retain examples.
    pub retain_examples: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Forget/retain metrics and the method's own measurements.
    pub metrics: BTreeMap<String, String>,
}

/// What the erasure stage did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    /// The store's sequence number of the delete.
    pub store_seq: Option<u64>,
    /// Documents removed by this run.
    pub removed: Vec<DocumentRef>,
    /// Ids already gone when the erasure ran.
    pub already_absent: Vec<String>,
    /// Audit record of the erasure.
    pub audit_seq: u64,
    /// Retrieval probe: forget queries, forget hits, retain queries, retain found.
    pub probe: [usize; 4],
}

/// One ledger record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Event {
    Header {
        format: u32,
    },
    Filed {
        request: Request,
    },
    Started {
        id: String,
        method: String,
        attempt: u32,
        at: u64,
    },
    Staged {
        id: String,
        weights: Box<WeightsRecord>,
        at: u64,
    },
    Erased {
        id: String,
        erasure: ErasureRecord,
        at: u64,
    },
    Activated {
        id: String,
        epoch: u64,
        at: u64,
    },
    Completed {
        id: String,
        receipt_sha256: String,
        at: u64,
    },
    Failed {
        id: String,
        error: String,
        at: u64,
    },
    RolledBack {
        id: String,
        reason: String,
        at: u64,
    },
}

/// Where a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Filed, not started (or rolled back to be started again).
    Pending,
    /// A run is in progress, or was interrupted, after `phase`.
    Running(Phase),
    /// Done; the receipt is signed.
    Completed,
    /// The last attempt failed before anything was erased.
    Failed(String),
}

impl State {
    /// `pending`, `running`, `completed`, `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running(_) => "running",
            State::Completed => "completed",
            State::Failed(_) => "failed",
        }
    }
}

/// The last durable step of a running request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Started: the weights stage may be half done (rolled back on resume).
    Started,
    /// Weights staged (a complete new version or adapter on disk).
    Staged,
    /// Documents erased from the store and every index.
    Erased,
    /// The new weights are live.
    Activated,
}

impl Phase {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Staged => "staged",
            Phase::Erased => "erased",
            Phase::Activated => "activated",
        }
    }
}

/// A request and everything the ledger knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestStatus {
    /// The request.
    pub request: Request,
    /// Its state.
    pub state: State,
    /// Runs started so far.
    pub attempts: u32,
    /// Method of the current or last run.
    pub method: Option<String>,
    /// Weights stage outcome.
    pub weights: Option<WeightsRecord>,
    /// Erasure outcome.
    pub erasure: Option<ErasureRecord>,
    /// Live epoch after activation.
    pub epoch: Option<u64>,
    /// Unix seconds of activation.
    pub activated_at: Option<u64>,
    /// SHA-256 of the receipt file.
    pub receipt_sha256: Option<String>,
    /// Rollbacks performed after interrupted runs.
    pub rollbacks: u32,
}

/// The open ledger (single writer: the caller holds the directory lock).
#[derive(Debug)]
pub(crate) struct Ledger {
    path: PathBuf,
    file: File,
    requests: BTreeMap<String, RequestStatus>,
    filed: u64,
}

impl Ledger {
    /// Opens or creates the ledger at `path`, replaying it; a torn last
    /// record is cut off.
    pub(crate) fn open(path: &Path) -> Result<Ledger> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        let frames = lethe_durable::read_frames(&bytes);
        if frames.tail == lethe_durable::Tail::Corrupt {
            return Err(Error::Corrupt(format!(
                "{}: a record before the end has a bad checksum",
                path.display()
            )));
        }
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            file: OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?,
            requests: BTreeMap::new(),
            filed: 0,
        };
        for (i, rec) in frames.records.iter().enumerate() {
            let event: Event = serde_json::from_slice(rec)
                .map_err(|e| Error::Corrupt(format!("{}: record {i}: {e}", path.display())))?;
            if i == 0 {
                match event {
                    Event::Header { format } if format == FORMAT_VERSION => continue,
                    Event::Header { format } => {
                        return Err(Error::Corrupt(format!(
                            "{}: ledger format {format}, this build reads {FORMAT_VERSION}",
                            path.display()
                        )))
                    }
                    _ => {
                        return Err(Error::Corrupt(format!(
                            "{}: no header record",
                            path.display()
                        )))
                    }
                }
            }
            ledger
                .apply(event)
                .map_err(|m| Error::Corrupt(format!("{}: record {i}: {m}", path.display())))?;
        }
        if frames.tail == lethe_durable::Tail::Torn {
            tracing::warn!(path = %path.display(), kept = frames.valid_len, "cutting a torn ledger record left by a crash");
        }
        if frames.tail == lethe_durable::Tail::Torn || bytes.len() != frames.valid_len {
            ledger
                .file
                .set_len(frames.valid_len as u64)
                .and_then(|_| ledger.file.sync_all())
                .map_err(|e| Error::io(path, e))?;
        }
        ledger
            .file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        if frames.records.is_empty() {
            let header = serde_json::to_vec(&Event::Header {
                format: FORMAT_VERSION,
            })
            .map_err(|e| Error::Corrupt(format!("serialising the ledger header: {e}")))?;
            lethe_durable::append_frames(&mut ledger.file, &[&header])
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(ledger)
    }

    /// Appends an event durably, then applies it.
    pub(crate) fn append(&mut self, event: Event) -> Result<()> {
        let bytes = serde_json::to_vec(&event)
            .map_err(|e| Error::Corrupt(format!("serialising a ledger event: {e}")))?;
        // Check before writing that the event applies: never log a record
        // that replay would reject.
        let mut probe = self
            .requests
            .get(event_id(&event).unwrap_or_default())
            .cloned();
        check(&event, probe.as_mut(), &self.requests)?;
        lethe_durable::append_frames(&mut self.file, &[&bytes])
            .map_err(|e| Error::io(&self.path, e))?;
        self.apply(event).map_err(Error::Corrupt)
    }

    fn apply(&mut self, event: Event) -> std::result::Result<(), String> {
        let id = event_id(&event).map(str::to_string);
        if let Some(id) = &id {
            let current = self.requests.get_mut(id.as_str());
            if !matches!(event, Event::Filed { .. }) {
                check(&event, current, &BTreeMap::new()).map_err(|e| e.to_string())?;
            }
        }
        match event {
            Event::Header { .. } => return Err("a second header".into()),
            Event::Filed { request } => {
                if self.requests.contains_key(&request.id) {
                    return Err(format!("request {} filed twice", request.id));
                }
                self.filed += 1;
                self.requests.insert(
                    request.id.clone(),
                    RequestStatus {
                        request,
                        state: State::Pending,
                        attempts: 0,
                        method: None,
                        weights: None,
                        erasure: None,
                        epoch: None,
                        activated_at: None,
                        receipt_sha256: None,
                        rollbacks: 0,
                    },
                );
            }
            Event::Started {
                id,
                method,
                attempt,
                ..
            } => {
                let r = self.get_mut(&id)?;
                r.state = State::Running(Phase::Started);
                r.attempts = attempt;
                r.method = Some(method);
                r.weights = None;
            }
            Event::Staged { id, weights, .. } => {
                let r = self.get_mut(&id)?;
                r.state = State::Running(Phase::Staged);
                r.weights = Some(*weights);
            }
            Event::Erased { id, erasure, .. } => {
                let r = self.get_mut(&id)?;
                r.state = State::Running(Phase::Erased);
                r.erasure = Some(erasure);
            }
            Event::Activated { id, epoch, at } => {
                let r = self.get_mut(&id)?;
                r.state = State::Running(Phase::Activated);
                r.epoch = Some(epoch);
                r.activated_at = Some(at);
            }
            Event::Completed {
                id, receipt_sha256, ..
            } => {
                let r = self.get_mut(&id)?;
                r.state = State::Completed;
                r.receipt_sha256 = Some(receipt_sha256);
            }
            Event::Failed { id, error, .. } => {
                let r = self.get_mut(&id)?;
                r.state = State::Failed(error);
                r.weights = None;
            }
            Event::RolledBack { id, .. } => {
                let r = self.get_mut(&id)?;
                r.state = State::Pending;
                r.rollbacks += 1;
                r.weights = None;
            }
        }
        Ok(())
    }

    fn get_mut(&mut self, id: &str) -> std::result::Result<&mut RequestStatus, String> {
        self.requests
            .get_mut(id)
            .ok_or_else(|| format!("event for unknown request {id}"))
    }

    /// The id the next filed request gets.
    pub(crate) fn next_id(&self) -> String {
        format!("ur-{:06}", self.filed + 1)
    }

    /// One request.
    pub(crate) fn get(&self, id: &str) -> Option<&RequestStatus> {
        self.requests.get(id)
    }

    /// Every request, by id.
    pub(crate) fn all(&self) -> impl Iterator<Item = &RequestStatus> {
        self.requests.values()
    }
}

fn event_id(e: &Event) -> Option<&str> {
    match e {
        Event::Header { .. } => None,
        Event::Filed { request } => Some(&request.id),
        Event::Started { id, .. }
        | Event::Staged { id, .. }
        | Event::Erased { id, .. }
        | Event::Activated { id, .. }
        | Event::Completed { id, .. }
        | Event::Failed { id, .. }
        | Event::RolledBack { id, .. } => Some(id),
    }
}

/// Whether `event` is a legal transition from `current`.
fn check(
    event: &Event,
    current: Option<&mut RequestStatus>,
    all: &BTreeMap<String, RequestStatus>,
) -> Result<()> {
    let state = current.as_ref().map(|r| r.state.clone());
    let ok = match (event, &state) {
        (Event::Header { .. }, _) => false,
        (Event::Filed { request }, None) => !all.contains_key(&request.id),
        (Event::Filed { .. }, Some(_)) => false,
        (_, None) => false,
        (Event::Started { .. }, Some(State::Pending | State::Failed(_))) => true,
        (Event::Staged { .. }, Some(State::Running(Phase::Started))) => true,
        (Event::Erased { .. }, Some(State::Running(Phase::Staged))) => true,
        (Event::Activated { .. }, Some(State::Running(Phase::Erased))) => true,
        (Event::Completed { .. }, Some(State::Running(Phase::Activated))) => true,
        (Event::Failed { .. }, Some(State::Running(Phase::Started))) => true,
        (Event::RolledBack { .. }, Some(State::Running(Phase::Started))) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Corrupt(format!(
            "illegal ledger transition {} from {:?}",
            serde_json::to_value(event)
                .ok()
                .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_default(),
            state
        )))
    }
}
