//! Durable file primitives every persistent part of lethe shares.
//!
//! lethe promises that a crash (`kill -9`, power loss) never leaves half a
//! document, half a key file or half an audit record. Three mechanisms give
//! that, and they live here so each is written (and tested) once:
//!
//! * [`atomic_write`]: replace a file by writing a temporary sibling,
//!   fsyncing it, renaming it over the target and fsyncing the directory.
//!   Readers see the old or the new file, never a mix.
//! * [`seal`] / [`unseal`]: a footer with a magic number, a format version and
//!   a CRC32, so a truncated, corrupted or foreign file is a typed error.
//! * [`frame`] / [`read_frames`]: length- and CRC-framed records for
//!   append-only logs; a torn last record (the crash case) is detected and
//!   reported so the log can be cut back to its last whole record.
//!
//! [`DirLock`] keeps two processes from writing the same data directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of sealed files.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The file is shorter than a footer, has the wrong magic or a bad CRC.
    #[error("corrupt file: {0}")]
    Corrupt(String),
    /// The file is a known kind but a version this build cannot read.
    #[error("format version {found} is not supported (this build reads {oldest} to {newest})")]
    Incompatible {
        /// The version found in the file.
        found: u32,
        /// The oldest version this build reads.
        oldest: u32,
        /// The newest version this build reads.
        newest: u32,
    },
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = parent_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(&parent)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

const FOOTER_LEN: usize = 8 + 4 + 4 + 8;

/// Appends a footer `magic | version | crc32(payload) | payload length` to `payload`.
pub fn seal(magic: [u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + FOOTER_LEN);
    out.extend_from_slice(payload);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out
}

/// Checks the footer written by [`seal`] and returns the payload and its version.
pub fn unseal(
    bytes: &[u8],
    magic: [u8; 8],
    oldest: u32,
    newest: u32,
) -> Result<(&[u8], u32), SealError> {
    if bytes.len() < FOOTER_LEN {
        return Err(SealError::Corrupt(format!(
            "{} bytes is shorter than the {FOOTER_LEN}-byte footer",
            bytes.len()
        )));
    }
    let (payload, footer) = bytes.split_at(bytes.len() - FOOTER_LEN);
    if footer[..8] != magic {
        return Err(SealError::Corrupt(
            "wrong magic number (not this kind of file)".into(),
        ));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([footer[i], footer[i + 1], footer[i + 2], footer[i + 3]]);
    let version = u32_at(8);
    let crc = u32_at(12);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&footer[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    if len != payload.len() as u64 {
        return Err(SealError::Corrupt(format!(
            "footer says {len} payload bytes, file has {}",
            payload.len()
        )));
    }
    if version < oldest || version > newest {
        return Err(SealError::Incompatible {
            found: version,
            oldest,
            newest,
        });
    }
    if crc32fast::hash(payload) != crc {
        return Err(SealError::Corrupt("CRC mismatch".into()));
    }
    Ok((payload, version))
}

/// Frames one log record: `len u32 | crc32 u32 | payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The records of a framed log.
#[derive(Debug)]
pub struct Frames<'a> {
    /// Every whole, intact record in order.
    pub records: Vec<&'a [u8]>,
    /// Byte length of the intact prefix (where the next record goes).
    pub valid_len: usize,
    /// What follows the intact prefix, when something does.
    pub tail: Tail,
}

/// What was found after the last intact record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Nothing: the log ends cleanly.
    Clean,
    /// A record cut short: the expected effect of a crash during an append.
    Torn,
    /// A whole-length record whose CRC does not match: corruption, not a crash.
    Corrupt,
}

/// Splits a framed log into records. A short final record is `Torn`; a
/// complete record with a bad checksum is `Corrupt` (the caller decides:
/// a crash only ever tears the last record).
pub fn read_frames(bytes: &[u8]) -> Frames<'_> {
    let mut records = Vec::new();
    let mut pos = 0;
    let tail = loop {
        if pos == bytes.len() {
            break Tail::Clean;
        }
        if bytes.len() - pos < 8 {
            break Tail::Torn;
        }
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let crc = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let start = pos + 8;
        if bytes.len() - start < len {
            break Tail::Torn;
        }
        let payload = &bytes[start..start + len];
        if crc32fast::hash(payload) != crc {
            // A crash can leave a full-length record with garbage only if it
            // is the last one; anything after it means corruption.
            break if start + len == bytes.len() {
                Tail::Torn
            } else {
                Tail::Corrupt
            };
        }
        records.push(payload);
        pos = start + len;
    };
    Frames {
        records,
        valid_len: pos,
        tail,
    }
}

/// Appends framed records to a log file and fsyncs; returns the new length.
pub fn append_frames(file: &mut File, payloads: &[&[u8]]) -> io::Result<u64> {
    let mut buf = Vec::new();
    for p in payloads {
        buf.extend_from_slice(&frame(p));
    }
    file.write_all(&buf)?;
    file.sync_data()?;
    file.metadata().map(|m| m.len())
}

/// An exclusive lock on a directory, held while the value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock file `LOCK` in `dir`, failing at once if another
    /// process holds it.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        fs::create_dir_all(dir)?;
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another lethe process", dir.display()),
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests;
