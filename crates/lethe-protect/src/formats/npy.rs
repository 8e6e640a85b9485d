//! NumPy `.npy` arrays and `.npz` archives, read and written without
//! Python.
//!
//! The `.npy` format (NEP 1) is a magic string, a version, a Python-dict
//! header (`descr`, `fortran_order`, `shape`) and the raw C-order data.
//! Images may be `uint8` (grid 1/255), `uint16` (grid 1/65535) or
//! `float32`/`float64` already in `[0, 1]` (no grid); layouts `(N, H, W)`,
//! `(N, H, W, C)` and `(N, C, H, W)` with `C` in {1, 3}. Labels are any
//! integer array of length `N`, or a string array (`<U`, `|S`) whose values
//! name the classes. A protected `.npz` keeps every other entry
//! byte-for-byte and replaces only the images entry, with the same dtype,
//! shape and compression.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Format, ImageShape, Item};
use crate::formats::{read_file, sha256_hex, write_file, WrittenFile};
use crate::{Error, Result};

/// Element types accepted for images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `uint8`.
    U8,
    /// `uint16`.
    U16,
    /// `float32`.
    F32,
    /// `float64`.
    F64,
}

/// Axis order of an image array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `(N, H, W)`: grayscale.
    Nhw,
    /// `(N, H, W, C)`: channels last.
    Nhwc,
    /// `(N, C, H, W)`: channels first.
    Nchw,
}

/// Where a NumPy dataset was read from, for writing it back.
#[derive(Debug, Clone, PartialEq)]
pub struct NpySource {
    /// The `.npy` or `.npz` file.
    pub path: PathBuf,
    /// `.npz`: the entry holding the images (without `.npy`).
    pub images_key: Option<String>,
    /// `.npy`: the separate labels file, copied next to the output.
    pub labels_path: Option<PathBuf>,
    /// Image element type.
    pub dtype: NpyDtype,
    /// Image axis order.
    pub layout: Layout,
    /// Big-endian element order in the source.
    pub big_endian: bool,
    /// Full array shape.
    pub array_shape: Vec<usize>,
}

/// A parsed `.npy` array.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// The dtype string, e.g. `<f8`, `|u1`.
    pub descr: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Raw C-order element bytes.
    pub data: Vec<u8>,
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Parses `.npy` bytes (`path` names the file in errors).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Array> {
    let bad = |d: &str| Error::decode(path, format!("bad .npy: {d}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("missing \\x93NUMPY magic"));
    }
    let major = bytes[6];
    let (hlen, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(bad(&format!("unknown version {v}"))),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| bad("header not text"))?;
    let descr = dict_str(header, "descr").ok_or_else(|| bad("no 'descr' in header"))?;
    let fortran = dict_raw(header, "fortran_order").ok_or_else(|| bad("no 'fortran_order'"))?;
    if fortran.starts_with("True") {
        return Err(Error::Unsupported(format!(
            "{}: Fortran-order arrays are not supported (save with np.ascontiguousarray)",
            path.display()
        )));
    }
    let shape_txt = dict_raw(header, "shape").ok_or_else(|| bad("no 'shape' in header"))?;
    let close = shape_txt.find(')').ok_or_else(|| bad("bad shape"))?;
    let inner = shape_txt
        .strip_prefix('(')
        .ok_or_else(|| bad("bad shape"))?
        .get(..close - 1)
        .ok_or_else(|| bad("bad shape"))?;
    let mut shape = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        shape.push(part.parse::<usize>().map_err(|_| bad("bad shape"))?);
    }
    let item = item_size(&descr).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: dtype {descr} is not supported",
            path.display()
        ))
    })?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let need = count
        .checked_mul(item)
        .ok_or_else(|| bad("shape overflows"))?;
    let data = &bytes[end..];
    if data.len() < need {
        return Err(bad(&format!(
            "data is {} bytes, shape {shape:?} of {descr} needs {need}",
            data.len()
        )));
    }
    Ok(Array {
        descr,
        shape,
        data: data[..need].to_vec(),
    })
}

/// The value of `'key': '...'` in a header dict.
fn dict_str(header: &str, key: &str) -> Option<String> {
    let raw = dict_raw(header, key)?;
    let q = raw.chars().next()?;
    if q != '\'' && q != '"' {
        return None;
    }
    let rest = &raw[1..];
    Some(rest[..rest.find(q)?].to_string())
}

/// The text after `'key':` in a header dict, trimmed on the left.
fn dict_raw<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    for quote in ['\'', '"'] {
        let pat = format!("{quote}{key}{quote}");
        if let Some(i) = header.find(&pat) {
            let after = header[i + pat.len()..].trim_start();
            return Some(after.strip_prefix(':')?.trim_start());
        }
    }
    None
}

fn item_size(descr: &str) -> Option<usize> {
    let (order, kind) = descr.split_at(1);
    if !matches!(order, "<" | ">" | "|" | "=") {
        return None;
    }
    match kind {
        "b1" | "u1" | "i1" => Some(1),
        "u2" | "i2" => Some(2),
        "u4" | "i4" | "f4" => Some(4),
        "u8" | "i8" | "f8" => Some(8),
        _ => {
            // Fixed-width strings: `U` (UTF-32 code points), `S` (bytes).
            let (width, n) = match kind.split_at(1) {
                ("U", n) => (4, n),
                ("S", n) => (1, n),
                _ => return None,
            };
            n.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)?
                .checked_mul(width)
        }
    }
}

impl Array {
    fn big_endian(&self) -> bool {
        self.descr.starts_with('>')
    }

    /// Every element as text, for string arrays (`U`, `S`; trailing NULs
    /// are NumPy's padding); `None` for any other dtype.
    pub fn to_strings(&self) -> Option<Vec<String>> {
        let width = item_size(&self.descr)?;
        let text = match self.descr.as_bytes().get(1)? {
            b'U' => {
                let be = self.big_endian();
                self.data
                    .chunks_exact(width)
                    .map(|el| {
                        el.chunks_exact(4)
                            .map(|c| {
                                let b = [c[0], c[1], c[2], c[3]];
                                if be {
                                    u32::from_be_bytes(b)
                                } else {
                                    u32::from_le_bytes(b)
                                }
                            })
                            .take_while(|&c| c != 0)
                            .map(|c| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER))
                            .collect()
                    })
                    .collect()
            }
            b'S' => self
                .data
                .chunks_exact(width)
                .map(|el| {
                    let end = el.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                    String::from_utf8_lossy(&el[..end]).into_owned()
                })
                .collect(),
            _ => return None,
        };
        Some(text)
    }

    /// Every element as `f64`.
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        let be = self.big_endian();
        let kind = &self.descr[1..];
        macro_rules! conv {
            ($t:ty, $n:expr) => {
                self.data
                    .chunks_exact($n)
                    .map(|c| {
                        let mut b = [0u8; $n];
                        b.copy_from_slice(c);
                        (if be {
                            <$t>::from_be_bytes(b)
                        } else {
                            <$t>::from_le_bytes(b)
                        }) as f64
                    })
                    .collect()
            };
        }
        Ok(match kind {
            "b1" | "u1" => self.data.iter().map(|&b| b as f64).collect(),
            "i1" => self.data.iter().map(|&b| b as i8 as f64).collect(),
            "u2" => conv!(u16, 2),
            "i2" => conv!(i16, 2),
            "u4" => conv!(u32, 4),
            "i4" => conv!(i32, 4),
            "u8" => conv!(u64, 8),
            "i8" => conv!(i64, 8),
            "f4" => conv!(f32, 4),
            "f8" => conv!(f64, 8),
            other => return Err(Error::Unsupported(format!("dtype {other}"))),
        })
    }

    /// Serialises as a version 1.0 `.npy` file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!(
                "({})",
                self.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.descr
        );
        // Pad so that magic + version + length + header is a multiple of 64.
        let total = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - total % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + self.data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }
}

/// `.npz` (images, labels) entry pairs tried when no key is given, in
/// order: the common names, then the training half of a Keras-style split
/// archive (`mnist.npz` holds `x_train`, `y_train`, `x_test`, `y_test`),
/// so the split that is released for training is the one protected. The
/// found images entry's partner is tried first for the labels, then every
/// pair's, then `label`.
const NPZ_KEYS: &[(&str, &str)] = &[
    ("images", "labels"),
    ("x", "y"),
    ("X", "Y"),
    ("data", "targets"),
    ("x_train", "y_train"),
    ("X_train", "Y_train"),
    ("train_images", "train_labels"),
    ("train_x", "train_y"),
];

/// Reads an image dataset from `.npy` (+ labels file) or `.npz`.
pub(crate) fn load(
    path: &Path,
    images_key: Option<&str>,
    labels_key: Option<&str>,
    labels_path: Option<&Path>,
) -> Result<Dataset> {
    let bytes = read_file(path)?;
    let is_npz = bytes.starts_with(b"PK");
    let (images, labels, key) = if is_npz {
        if labels_path.is_some() {
            return Err(Error::Config(
                "labels_path (CLI: --labels) is for .npy files; a .npz holds its labels \
                 (labels_key, CLI: --labels-key)"
                    .into(),
            ));
        }
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&bytes))
            .map_err(|e| Error::decode(path, format!("bad .npz archive: {e}")))?;
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::decode(path, format!("bad .npz archive: {e}")))?;
        let find = |wanted: Option<&str>, defaults: &[&str], what: &str| -> Result<String> {
            let candidates: Vec<&str> = match wanted {
                Some(k) => vec![k],
                None => defaults.to_vec(),
            };
            candidates
                .iter()
                .find(|k| names.iter().any(|n| n == &format!("{k}.npy")))
                .map(|k| k.to_string())
                .ok_or_else(|| {
                    Error::Unsupported(format!(
                        "{}: no {what} entry (looked for {candidates:?}; the archive has {names:?}); \
                         name it with {what}_key (CLI: --{what}-key)",
                        path.display()
                    ))
                })
        };
        let image_defaults: Vec<&str> = NPZ_KEYS.iter().map(|(i, _)| *i).collect();
        let ik = find(images_key, &image_defaults, "images")?;
        // The partner of the images entry first (`x_train` -> `y_train`), so
        // a split archive is never paired across its halves.
        let partner = NPZ_KEYS.iter().find(|(i, _)| *i == ik).map(|(_, l)| *l);
        let label_defaults: Vec<&str> = partner
            .into_iter()
            .chain(
                NPZ_KEYS
                    .iter()
                    .map(|(_, l)| *l)
                    .filter(|l| Some(*l) != partner),
            )
            .chain(["label"])
            .collect();
        let lk = find(labels_key, &label_defaults, "labels")?;
        let mut read_entry = |k: &str| -> Result<Array> {
            let mut entry = zip
                .by_name(&format!("{k}.npy"))
                .map_err(|e| Error::decode(path, format!("entry {k}: {e}")))?;
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| Error::decode(path, format!("entry {k}: {e}")))?;
            parse(&buf, &path.join(format!("{k}.npy")))
        };
        let images = read_entry(&ik)?;
        let labels = read_entry(&lk)?;
        (images, labels, Some(ik))
    } else {
        let images = parse(&bytes, path)?;
        let lp = labels_path.ok_or_else(|| {
            Error::Config(format!(
                "{} is a .npy of images: give labels_path (a .npy of labels; CLI: --labels) \
                 or use a .npz",
                path.display()
            ))
        })?;
        let labels = parse(&read_file(lp)?, lp)?;
        (images, labels, None)
    };
    from_arrays(
        path,
        &images,
        &labels,
        key,
        labels_path,
        &sha256_hex(&bytes),
    )
}

/// Dense class ids of `labels`: the classes are the distinct values in
/// increasing order, and each label's id is its class's position.
fn class_ids<T: Ord + Clone>(labels: &[T]) -> (Vec<u32>, Vec<T>) {
    let mut classes = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let ids = labels
        .iter()
        .map(|l| classes.binary_search(l).unwrap_or(0) as u32)
        .collect();
    (ids, classes)
}

/// Integer labels as whole numbers (any integer or float dtype holding
/// only whole numbers).
fn integer_labels(labels: &Array, path: &Path) -> Result<Vec<i64>> {
    let not_labels = || {
        Error::Unsupported(format!(
            "{}: labels must be integers or strings, found dtype {}",
            path.display(),
            labels.descr
        ))
    };
    let raw = labels.to_f64().map_err(|_| not_labels())?;
    if raw.iter().any(|l| l.fract() != 0.0 || !l.is_finite()) {
        return Err(not_labels());
    }
    Ok(raw.iter().map(|&l| l as i64).collect())
}

/// Builds the dataset from parsed arrays.
fn from_arrays(
    path: &Path,
    images: &Array,
    labels: &Array,
    images_key: Option<String>,
    labels_path: Option<&Path>,
    file_hash: &str,
) -> Result<Dataset> {
    let dtype = match &images.descr[1..] {
        "u1" => NpyDtype::U8,
        "u2" => NpyDtype::U16,
        "f4" => NpyDtype::F32,
        "f8" => NpyDtype::F64,
        other => {
            return Err(Error::Unsupported(format!(
                "{}: image dtype {other} is not supported (use uint8, uint16, float32 or float64)",
                path.display()
            )))
        }
    };
    let s = &images.shape;
    let (layout, n, shape) = match s.len() {
        3 => (
            Layout::Nhw,
            s[0],
            ImageShape {
                channels: 1,
                height: s[1],
                width: s[2],
            },
        ),
        4 if s[3] == 1 || s[3] == 3 => (
            Layout::Nhwc,
            s[0],
            ImageShape {
                channels: s[3],
                height: s[1],
                width: s[2],
            },
        ),
        4 if s[1] == 1 || s[1] == 3 => (
            Layout::Nchw,
            s[0],
            ImageShape {
                channels: s[1],
                height: s[2],
                width: s[3],
            },
        ),
        _ => {
            return Err(Error::Unsupported(format!(
                "{}: image array shape {s:?} is not (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {{1, 3}}",
                path.display()
            )))
        }
    };
    if labels.shape.len() != 1 || labels.shape[0] != n {
        return Err(Error::Unsupported(format!(
            "{}: {n} images but labels have shape {:?}",
            path.display(),
            labels.shape
        )));
    }
    let (label_ids, classes) = match labels.to_strings() {
        Some(names) => class_ids(&names),
        None => {
            let (ids, values) = class_ids(&integer_labels(labels, path)?);
            (ids, values.iter().map(i64::to_string).collect())
        }
    };

    let raw = images.to_f64()?;
    let (scale, levels) = match dtype {
        NpyDtype::U8 => (1.0 / 255.0, Some(255)),
        NpyDtype::U16 => (1.0 / 65535.0, Some(65535)),
        NpyDtype::F32 | NpyDtype::F64 => (1.0, None),
    };
    if levels.is_none() {
        if let Some(v) = raw.iter().find(|v| !v.is_finite()) {
            return Err(Error::Unsupported(format!(
                "{}: float images must lie in [0, 1], found {v} (a missing or broken value)",
                path.display()
            )));
        }
        if let Some(v) = raw.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            let hint = if (0.0..=255.0).contains(v) {
                "values in [0, 255]: divide by 255, or store them as uint8"
            } else {
                "rescale them to [0, 1] first, with the scale you want the budget measured on"
            };
            return Err(Error::Unsupported(format!(
                "{}: float images must lie in [0, 1], found {v} ({hint})",
                path.display()
            )));
        }
    }
    let vals = shape.values();
    let mut pixels = vec![0f32; raw.len()];
    for i in 0..n {
        let src = &raw[i * vals..(i + 1) * vals];
        let dst = &mut pixels[i * vals..(i + 1) * vals];
        match layout {
            Layout::Nhw | Layout::Nchw => {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = (*s * scale) as f32;
                }
            }
            Layout::Nhwc => {
                let hw = shape.pixels();
                for p in 0..hw {
                    for c in 0..shape.channels {
                        dst[c * hw + p] = (src[p * shape.channels + c] * scale) as f32;
                    }
                }
            }
        }
    }
    let items = (0..n).map(|_| Item::in_memory(levels)).collect();
    tracing::debug!(file = %path.display(), sha256 = file_hash, n, "loaded numpy dataset");
    Dataset::new(
        crate::formats::file_name(path),
        shape,
        pixels,
        label_ids,
        classes,
        items,
        Format::Npy(NpySource {
            path: path.to_path_buf(),
            images_key,
            labels_path: labels_path.map(Path::to_path_buf),
            dtype,
            layout,
            big_endian: images.big_endian(),
            array_shape: images.shape.clone(),
        }),
    )
}

/// The images of `data` as an array shaped like the source's.
fn images_array(data: &Dataset, src: &NpySource) -> Array {
    let shape = data.shape();
    let vals = shape.values();
    let hw = shape.pixels();
    let mut ordered = Vec::with_capacity(data.pixels().len());
    for i in 0..data.len() {
        let img = data.image(i);
        match src.layout {
            Layout::Nhw | Layout::Nchw => ordered.extend_from_slice(img),
            Layout::Nhwc => {
                for p in 0..hw {
                    for c in 0..shape.channels {
                        ordered.push(img[c * hw + p]);
                    }
                }
            }
        }
    }
    debug_assert_eq!(ordered.len(), data.len() * vals);
    let be = src.big_endian;
    let mut bytes = Vec::new();
    let order = if be { '>' } else { '<' };
    let descr = match src.dtype {
        NpyDtype::U8 => {
            bytes.extend(ordered.iter().map(|v| (v * 255.0).round() as u8));
            "|u1".to_string()
        }
        NpyDtype::U16 => {
            for v in &ordered {
                let x = (v * 65535.0).round() as u16;
                bytes.extend_from_slice(&if be { x.to_be_bytes() } else { x.to_le_bytes() });
            }
            format!("{order}u2")
        }
        NpyDtype::F32 => {
            for v in &ordered {
                bytes.extend_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() });
            }
            format!("{order}f4")
        }
        NpyDtype::F64 => {
            for v in &ordered {
                let x = *v as f64;
                bytes.extend_from_slice(&if be { x.to_be_bytes() } else { x.to_le_bytes() });
            }
            format!("{order}f8")
        }
    };
    let mut array_shape = src.array_shape.clone();
    if let Some(first) = array_shape.first_mut() {
        *first = data.len();
    }
    Array {
        descr,
        shape: array_shape,
        data: bytes,
    }
}

/// Writes the protected array (and copies the other `.npz` entries or the
/// labels file) under `out`.
pub(crate) fn write(data: &Dataset, src: &NpySource, out: &Path) -> Result<Vec<WrittenFile>> {
    let array = images_array(data, src);
    let name = PathBuf::from(crate::formats::file_name(&src.path));
    let mut written = Vec::new();
    match &src.images_key {
        None => {
            written.push(write_file(out, &name, &array.to_bytes())?);
            if let Some(lp) = &src.labels_path {
                let lname = PathBuf::from(crate::formats::file_name(lp));
                written.push(write_file(out, &lname, &read_file(lp)?)?);
            }
        }
        Some(key) => {
            let source = fs::File::open(&src.path)
                .map_err(|e| Error::io(e, format!("opening {}", src.path.display())))?;
            let mut zin = zip::ZipArchive::new(source)
                .map_err(|e| Error::decode(&src.path, format!("bad .npz archive: {e}")))?;
            let mut buf = std::io::Cursor::new(Vec::new());
            {
                let mut zout = zip::ZipWriter::new(&mut buf);
                let target = format!("{key}.npy");
                for i in 0..zin.len() {
                    let entry = zin
                        .by_index(i)
                        .map_err(|e| Error::decode(&src.path, e.to_string()))?;
                    if entry.name_raw() == target.as_bytes() {
                        let opts = zip::write::SimpleFileOptions::default()
                            .compression_method(entry.compression());
                        drop(entry);
                        zout.start_file(target.as_str(), opts)
                            .map_err(|e| Error::Unsupported(format!("writing .npz: {e}")))?;
                        zout.write_all(&array.to_bytes())
                            .map_err(|e| Error::io(e, "writing .npz entry"))?;
                    } else {
                        zout.raw_copy_file(entry)
                            .map_err(|e| Error::Unsupported(format!("copying .npz entry: {e}")))?;
                    }
                }
                zout.finish()
                    .map_err(|e| Error::Unsupported(format!("finishing .npz: {e}")))?;
            }
            written.push(write_file(out, &name, &buf.into_inner())?);
        }
    }
    Ok(written)
}
