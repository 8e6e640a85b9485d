//! Reading datasets from disk and writing protected copies in the same
//! format.
//!
//! Three on-disk layouts are supported, each chosen by what the data is:
//!
//! * a folder with one sub-folder per class of PNG files ([`png`]: 8- and
//!   16-bit, grayscale or RGB, alpha carried over; every file keeps its own
//!   bit depth and colour type when written back);
//! * a NumPy `.npy` / `.npz` array ([`npy`]: `uint8`, `uint16`, `float32`,
//!   `float64` images, `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)`);
//! * a folder with one sub-folder per class of DICOM files ([`dicom`]:
//!   uncompressed or RLE Lossless pixel data, grayscale or RGB, every frame
//!   of a multi-frame file an image of its own; every other tag kept when
//!   the protected pixels are written back).
//!
//! A class folder may nest (`class/patient/series/file.dcm` is the usual
//! DICOM layout): its files are found at any depth, in file-name order
//! within each folder, and keep their relative paths in the release.
//! Hidden files and folders (`.name`) are skipped.
//! plus the built-in datasets of [`crate::sources`]. Writing always puts
//! the protected files under a fresh output folder next to a
//! `manifest.json` (see [`crate::release`]); sources are never modified.

pub mod dicom;
pub mod npy;
pub mod png;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Format};
use crate::sources::LesionSpec;
use crate::{Error, Result};

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// A folder with one sub-folder per class, holding PNG or DICOM files
    /// (not both).
    Folder {
        /// The folder.
        path: PathBuf,
    },
    /// A `.npy` file of images (with labels in `labels_path`) or a `.npz`
    /// archive holding images and labels.
    Npy {
        /// The `.npy` or `.npz` file.
        path: PathBuf,
        /// `.npz` only: the images entry (default: `images`, `x`, `X` or
        /// `data`, whichever exists).
        #[serde(default)]
        images_key: Option<String>,
        /// `.npz` only: the labels entry (default: `labels`, `y` or
        /// `targets`, whichever exists).
        #[serde(default)]
        labels_key: Option<String>,
        /// `.npy` only: a `.npy` file of labels (integers or class-name strings), one per image.
        #[serde(default)]
        labels_path: Option<PathBuf>,
    },
    /// scikit-learn's 8x8 handwritten digits (1797 images, 10 classes),
    /// fetched with `lethe-assets`.
    Digits,
    /// The generated sparse "lesion" dataset (deterministic per seed).
    Lesions(LesionSpec),
    /// scikit-image's LFW subset: 200 grayscale 25x25 images, faces vs
    /// non-faces.
    LfwSubset,
    /// `patch`x`patch` tiles cut from pydicom's CT and MR test slices,
    /// labelled by modality (a small real-DICOM classification task).
    DicomPatches {
        /// Tile side in pixels (8..=32).
        patch: usize,
    },
    /// `patch`x`patch` RGB tiles cut from scikit-image's histology and
    /// fundus sample photographs, labelled by modality (a small real
    /// colour medical classification task).
    MedicalPatches {
        /// Tile side in pixels (8..=32).
        patch: usize,
    },
}

/// Loads a dataset.
pub fn load(source: &DataSource) -> Result<Dataset> {
    match source {
        DataSource::Folder { path } => load_folder(path),
        DataSource::Npy {
            path,
            images_key,
            labels_key,
            labels_path,
        } => npy::load(
            path,
            images_key.as_deref(),
            labels_key.as_deref(),
            labels_path.as_deref(),
        ),
        DataSource::Digits => crate::sources::digits(),
        DataSource::Lesions(spec) => crate::sources::lesions(spec),
        DataSource::LfwSubset => crate::sources::lfw_subset(),
        DataSource::DicomPatches { patch } => crate::sources::dicom_patches(*patch),
        DataSource::MedicalPatches { patch } => crate::sources::medical_patches(*patch),
    }
}

/// One file written by [`write()`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrittenFile {
    /// Path relative to the output folder.
    pub path: PathBuf,
    /// SHA-256 of what was written.
    pub sha256: String,
}

/// Writes `data` (already quantised, see [`Dataset::quantize_within`]) under
/// `out` in the format it was read from. `out` must not be the source
/// folder.
pub fn write(data: &Dataset, out: &Path) -> Result<Vec<WrittenFile>> {
    fs::create_dir_all(out).map_err(|e| Error::io(e, format!("creating {}", out.display())))?;
    match data.format() {
        Format::Generated | Format::PngFolder { .. } => png::write_folder(data, out),
        Format::Npy(src) => npy::write(data, src, out),
        Format::Dicom { root, range } => dicom::write_folder(data, root, *range, out),
    }
}

/// What a file in a class folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Png,
    Dicom,
}

/// Reads a folder of class sub-folders.
fn load_folder(root: &Path) -> Result<Dataset> {
    let mut classes = Vec::new();
    for entry in read_dir_sorted(root)? {
        let name = file_name(&entry);
        if entry.is_dir() && !name.starts_with('.') {
            classes.push((name, entry));
        }
    }
    if classes.len() < 2 {
        return Err(Error::Unsupported(format!(
            "{} must hold one sub-folder per class (at least two), found {}",
            root.display(),
            classes.len()
        )));
    }
    let mut files: Vec<(u32, PathBuf, FileKind)> = Vec::new();
    let mut kept_classes = Vec::new();
    for (name, dir) in classes {
        let label = kept_classes.len() as u32;
        let before = files.len();
        let mut walk = walkdir::WalkDir::new(&dir).sort_by_file_name().into_iter();
        while let Some(entry) = walk.next() {
            let entry = entry.map_err(|e| walk_error(e, &dir))?;
            if entry.depth() > 0 && entry.file_name().to_string_lossy().starts_with('.') {
                // Hidden entries (.DS_Store, ._name AppleDouble files,
                // .git) are never data; say so for what looks like an image.
                if entry.file_type().is_dir() {
                    walk.skip_current_dir();
                } else if kind_by_name(entry.path()).is_some() {
                    tracing::warn!(path = %entry.path().display(), "skipping a hidden file");
                }
                continue;
            }
            // Files, and links to files (links to folders are not followed).
            let path = entry.into_path();
            if !path.is_file() {
                if !path.is_dir() && !path.exists() {
                    tracing::warn!(path = %path.display(), "skipping a broken link");
                }
                continue;
            }
            match detect_kind(&path)? {
                Some(kind) => files.push((label, path, kind)),
                None => tracing::warn!(path = %path.display(), "skipping: neither PNG nor DICOM"),
            }
        }
        if files.len() == before {
            tracing::warn!(
                class = %name,
                folder = %dir.display(),
                "skipping a class folder with no PNG or DICOM image"
            );
        } else {
            kept_classes.push(name);
        }
    }
    if kept_classes.len() < 2 {
        return Err(Error::Unsupported(format!(
            "{} must hold at least two class sub-folders with images, found {} ({:?})",
            root.display(),
            kept_classes.len(),
            kept_classes
        )));
    }
    let Some(&(_, _, kind)) = files.first() else {
        return Err(Error::Unsupported(format!(
            "no PNG or DICOM files under {}",
            root.display()
        )));
    };
    if let Some((_, p, _)) = files.iter().find(|f| f.2 != kind) {
        return Err(Error::Unsupported(format!(
            "{} mixes PNG and DICOM files ({} differs from the first file)",
            root.display(),
            p.display()
        )));
    }
    let names = kept_classes;
    match kind {
        FileKind::Png => png::load_files(root, &files_of(&files), names),
        FileKind::Dicom => dicom::load_files(root, &files_of(&files), names),
    }
}

fn files_of(files: &[(u32, PathBuf, FileKind)]) -> Vec<(u32, PathBuf)> {
    files.iter().map(|(l, p, _)| (*l, p.clone())).collect()
}

/// What a file's name says it holds (`.png`, `.dcm`, `.dicom`, any case).
fn kind_by_name(path: &Path) -> Option<FileKind> {
    let ext = path.extension()?.to_string_lossy().to_ascii_lowercase();
    match ext.as_str() {
        "png" => Some(FileKind::Png),
        "dcm" | "dicom" => Some(FileKind::Dicom),
        _ => None,
    }
}

/// PNG by signature, DICOM by the `DICM` preamble (extension-less DICOM
/// files are common).
fn detect_kind(path: &Path) -> Result<Option<FileKind>> {
    use std::io::Read;
    let mut head = [0u8; 132];
    let mut f =
        fs::File::open(path).map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let mut n = 0;
    while n < head.len() {
        let k = f
            .read(&mut head[n..])
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    if n >= 8 && head[..8] == *b"\x89PNG\r\n\x1a\n" {
        return Ok(Some(FileKind::Png));
    }
    if n >= 132 && head[128..132] == *b"DICM" {
        return Ok(Some(FileKind::Dicom));
    }
    // A file named like an image that is not one is corrupt, not ignorable.
    match kind_by_name(path) {
        Some(FileKind::Png) => Err(Error::decode(path, "not a PNG file (bad signature)")),
        Some(FileKind::Dicom) => Err(Error::decode(path, "not a DICOM file (no DICM preamble)")),
        None => Ok(None),
    }
}

/// A folder walk's error as ours, naming the entry it failed on (or `root`).
pub(crate) fn walk_error(e: walkdir::Error, root: &Path) -> Error {
    let at = e.path().unwrap_or(root).display().to_string();
    Error::io(
        e.into_io_error()
            .unwrap_or_else(|| std::io::Error::other("a folder loop")),
        format!("listing {at}"),
    )
}

pub(crate) fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = fs::read_dir(dir).map_err(|e| Error::io(e, format!("listing {}", dir.display())))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(e, format!("listing {}", dir.display())))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// SHA-256 of bytes, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io(e, format!("reading {}", path.display())))
}

/// Writes `bytes` to `out/rel` (creating folders) and returns its record.
pub(crate) fn write_file(out: &Path, rel: &Path, bytes: &[u8]) -> Result<WrittenFile> {
    let path = out.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| Error::io(e, format!("creating {}", parent.display())))?;
    }
    fs::write(&path, bytes).map_err(|e| Error::io(e, format!("writing {}", path.display())))?;
    Ok(WrittenFile {
        path: rel.to_path_buf(),
        sha256: sha256_hex(bytes),
    })
}

#[cfg(test)]
mod tests;
