//! The tamper-evident audit log: every ingest, delete, key creation, search
//! and query leaves a record that cannot be changed without detection.
//!
//! The log is append-only JSON Lines. Each record carries its sequence
//! number, a timestamp, the event, the SHA-256 of the previous record (`prev`)
//! and its own SHA-256 (`hash`, over `prev` and the record's canonical JSON).
//! A separate `audit.head` file holds the sequence number and hash of the
//! last record, replaced atomically after each append, so cutting records off
//! the end is detected too. [`verify`] walks the chain and says, per line,
//! what is wrong: a modified record, a removed, inserted or reordered one, a
//! broken line, or a truncated tail.
//!
//! Appends take an exclusive file lock, so the daemon and the CLI can write
//! the same log. A crash between writing a record and updating the head
//! leaves a record the head does not know yet; the next append adopts it
//! (its chain is intact). A crash in the middle of a record leaves an
//! incomplete last line, which was never acknowledged and is cut away.
//!
//! Events carry principals, labels, ids and hashes, never document text or
//! secrets.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Errors of writing or reading the audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The log is damaged in a way appending must not paper over.
    #[error("audit log is damaged, refusing to append: {0} (run `lethe audit verify`)")]
    Damaged(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What happened, by whom, to what. `details` holds event-specific fields
/// (ids, labels, decisions, hashes); never document text or secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// A short verb: `ingest`, `delete`, `search`, `key.create`, ...
    pub action: String,
    /// Who did it, when known.
    pub principal: Option<String>,
    /// Where the request came from: `cli`, `http`, ...
    pub via: String,
    /// Event-specific fields.
    pub details: serde_json::Value,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// 1-based position in the log.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The event.
    pub event: Event,
    /// Hash of the previous record (64 zeros for the first).
    pub prev: String,
    /// Hash of this record.
    pub hash: String,
}

/// The part of a record its hash covers, in a fixed field order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    ts_ms: u64,
    event: &'a Event,
    prev: &'a str,
}

/// Hash chain root: the `prev` of record 1.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn record_hash(seq: u64, ts_ms: u64, event: &Event, prev: &str) -> String {
    // serde_json writes struct fields in declaration order and object keys of
    // `Value` sorted, so this serialisation is canonical.
    let bytes = serde_json::to_vec(&Hashed {
        seq,
        ts_ms,
        event,
        prev,
    })
    .unwrap_or_default();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    lock: Mutex<()>,
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path`; the head lives beside it
    /// as `<path>.head`.
    pub fn open(path: &Path) -> Result<AuditLog> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            head_path: head_path(path),
            lock: Mutex::new(()),
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an event durably and returns its record.
    pub fn append(&self, event: Event) -> Result<Record> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| io_err(&self.path, e))?;
        file.lock().map_err(|e| io_err(&self.path, e))?;
        let result = self.append_locked(&mut file, event);
        let _ = file.unlock();
        result
    }

    fn append_locked(&self, file: &mut File, event: Event) -> Result<Record> {
        let (seq, prev) = self.recover_tail(file)?;
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let seq = seq + 1;
        let hash = record_hash(seq, ts_ms, &event, &prev);
        let record = Record {
            seq,
            ts_ms,
            event,
            prev,
            hash: hash.clone(),
        };
        let mut line = serde_json::to_vec(&record).map_err(|e| Error::Damaged(e.to_string()))?;
        line.push(b'\n');
        file.seek(SeekFrom::End(0))
            .map_err(|e| io_err(&self.path, e))?;
        file.write_all(&line).map_err(|e| io_err(&self.path, e))?;
        file.sync_data().map_err(|e| io_err(&self.path, e))?;
        self.write_head(&Head { seq, hash })?;
        Ok(record)
    }

    /// Reads the head and reconciles it with the end of the log: cuts an
    /// incomplete last line, adopts whole records the head has not seen.
    fn recover_tail(&self, file: &mut File) -> Result<(u64, String)> {
        let head = self.read_head()?;
        let len = file.metadata().map_err(|e| io_err(&self.path, e))?.len();
        if len == 0 {
            return match head {
                Some(h) if h.seq > 0 => Err(Error::Damaged(format!(
                    "the head records {} entries but the log is empty",
                    h.seq
                ))),
                _ => Ok((0, GENESIS.to_string())),
            };
        }
        // Read the whole log only when the head does not match its end; the
        // common case reads just the last line.
        let bytes = fs::read(&self.path).map_err(|e| io_err(&self.path, e))?;
        let mut end = bytes.len();
        if bytes.last() != Some(&b'\n') {
            // A crash during the last append: that record was never acknowledged.
            end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            file.set_len(end as u64)
                .map_err(|e| io_err(&self.path, e))?;
            file.sync_data().map_err(|e| io_err(&self.path, e))?;
        }
        let body = &bytes[..end];
        let Some(last_line) = body.split(|b| *b == b'\n').rev().find(|l| !l.is_empty()) else {
            return Ok((0, GENESIS.to_string()));
        };
        let last: Record = serde_json::from_slice(last_line)
            .map_err(|e| Error::Damaged(format!("last record is not valid JSON: {e}")))?;
        if last.hash != record_hash(last.seq, last.ts_ms, &last.event, &last.prev) {
            return Err(Error::Damaged(format!(
                "record {} does not match its hash",
                last.seq
            )));
        }
        match head {
            Some(h) if h.seq == last.seq && h.hash == last.hash => {}
            Some(h) if h.seq + 1 == last.seq => {
                // Written but the head update was lost: the chain must continue from the head.
                if last.prev != h.hash {
                    return Err(Error::Damaged(format!(
                        "record {} does not follow the recorded head",
                        last.seq
                    )));
                }
            }
            Some(h) => {
                return Err(Error::Damaged(format!(
                    "the head records {} entries, the log ends at {}",
                    h.seq, last.seq
                )))
            }
            None if last.seq == 1 => {}
            None => return Err(Error::Damaged("the head file is missing".into())),
        }
        Ok((last.seq, last.hash))
    }

    fn read_head(&self) -> Result<Option<Head>> {
        match fs::read(&self.head_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Damaged(format!("head file unreadable: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&self.head_path, e)),
        }
    }

    fn write_head(&self, head: &Head) -> Result<()> {
        let bytes = serde_json::to_vec(head).map_err(|e| Error::Damaged(e.to_string()))?;
        lethe_durable::atomic_write(&self.head_path, &bytes).map_err(|e| io_err(&self.head_path, e))
    }
}

fn head_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".head");
    path.with_file_name(name)
}

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What is wrong at one place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// 1-based line in the file (0 for the whole log).
    pub line: usize,
    /// What was found.
    pub kind: FindingKind,
}

/// Kinds of tampering and damage [`verify`] tells apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// The line is not a record.
    Malformed(String),
    /// The record's content does not match its own hash: it was modified.
    Modified {
        /// The record's sequence number.
        seq: u64,
    },
    /// The record's `prev` is not the previous record's hash. With the
    /// sequence numbers this says whether records were removed before it,
    /// inserted, or reordered.
    ChainBroken {
        /// Sequence number expected at this line.
        expected_seq: u64,
        /// Sequence number found.
        found_seq: u64,
        /// The most likely cause.
        cause: ChainCause,
    },
    /// The head records more entries (or another last hash) than the log
    /// holds: records were cut from the end.
    Truncated {
        /// Entries the head records.
        head_seq: u64,
        /// Entries the log holds.
        log_seq: u64,
    },
    /// A record exists that the head does not know, beyond the one a crash
    /// can explain.
    Appended {
        /// Entries the head records.
        head_seq: u64,
        /// Entries the log holds.
        log_seq: u64,
    },
}

/// Why a chain link is broken, judged from sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainCause {
    /// Records are missing before this one.
    Removed,
    /// A record that does not belong was inserted here.
    Inserted,
    /// Records appear out of order.
    Reordered,
    /// The previous record was modified (its hash changed).
    PreviousModified,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: ", self.line)?;
        match &self.kind {
            FindingKind::Malformed(m) => write!(f, "not a valid record ({m})"),
            FindingKind::Modified { seq } => write!(f, "record {seq} was modified (hash mismatch)"),
            FindingKind::ChainBroken {
                expected_seq,
                found_seq,
                cause,
            } => {
                let what = match cause {
                    ChainCause::Removed => "records were removed before it",
                    ChainCause::Inserted => "a record was inserted",
                    ChainCause::Reordered => "records were reordered",
                    ChainCause::PreviousModified => "the previous record was modified",
                };
                write!(
                    f,
                    "chain broken: expected record {expected_seq}, found {found_seq}: {what}"
                )
            }
            FindingKind::Truncated { head_seq, log_seq } => write!(
                f,
                "records removed from the end: the head records {head_seq}, the log ends at {log_seq}"
            ),
            FindingKind::Appended { head_seq, log_seq } => write!(
                f,
                "records appended outside lethe: the head records {head_seq}, the log ends at {log_seq}"
            ),
        }
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records read.
    pub records: u64,
    /// Everything found wrong, in file order; empty means intact.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether the log is intact.
    pub fn is_intact(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Verifies the whole log at `path` against its chain and its head.
pub fn verify(path: &Path) -> Result<Report> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut findings = Vec::new();
    let mut prev_hash = GENESIS.to_string();
    let mut expected_seq = 1u64;
    let mut seen = std::collections::BTreeSet::new();
    let mut records = 0u64;
    let mut last_seq = 0u64;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| io_err(path, e))?;
        if line.is_empty() {
            continue;
        }
        let rec: Record = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                findings.push(Finding {
                    line: line_no,
                    kind: FindingKind::Malformed(e.to_string()),
                });
                expected_seq += 1;
                continue;
            }
        };
        records += 1;
        let own_ok = rec.hash == record_hash(rec.seq, rec.ts_ms, &rec.event, &rec.prev);
        if !own_ok {
            findings.push(Finding {
                line: line_no,
                kind: FindingKind::Modified { seq: rec.seq },
            });
        }
        if rec.prev != prev_hash || rec.seq != expected_seq {
            let cause = if rec.seq == expected_seq {
                // Right place, wrong link: the previous record was changed
                // and its hash recomputed.
                ChainCause::PreviousModified
            } else if rec.seq > expected_seq {
                ChainCause::Removed
            } else if rec.seq == last_seq {
                ChainCause::Inserted
            } else {
                ChainCause::Reordered
            };
            findings.push(Finding {
                line: line_no,
                kind: FindingKind::ChainBroken {
                    expected_seq,
                    found_seq: rec.seq,
                    cause,
                },
            });
        }
        seen.insert(rec.seq);
        prev_hash = rec.hash.clone();
        last_seq = rec.seq;
        expected_seq = rec.seq + 1;
    }
    // A gap whose records appear elsewhere in the file is a reordering.
    for f in &mut findings {
        if let FindingKind::ChainBroken {
            expected_seq,
            found_seq,
            cause: cause @ ChainCause::Removed,
        } = &mut f.kind
        {
            if (*expected_seq..*found_seq).any(|s| seen.contains(&s)) {
                *cause = ChainCause::Reordered;
            }
        }
    }
    let head = match fs::read(head_path(path)) {
        Ok(b) => serde_json::from_slice::<Head>(&b).ok(),
        Err(_) => None,
    };
    match head {
        Some(h) if h.seq > last_seq || (h.seq == last_seq && h.hash != prev_hash) => {
            findings.push(Finding {
                line: 0,
                kind: FindingKind::Truncated {
                    head_seq: h.seq,
                    log_seq: last_seq,
                },
            })
        }
        // One record beyond the head is what a crash between the append and
        // the head update leaves; more is not.
        Some(h) if last_seq > h.seq + 1 => findings.push(Finding {
            line: 0,
            kind: FindingKind::Appended {
                head_seq: h.seq,
                log_seq: last_seq,
            },
        }),
        None if last_seq > 1 => findings.push(Finding {
            line: 0,
            kind: FindingKind::Truncated {
                head_seq: 0,
                log_seq: last_seq,
            },
        }),
        _ => {}
    }
    Ok(Report { records, findings })
}

#[cfg(test)]
mod tests;
