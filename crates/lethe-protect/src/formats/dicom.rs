//! Folder-per-class DICOM datasets: read the stored pixel values, write the
//! protected values back into a copy of each file with every other tag
//! unchanged.
//!
//! Supported: uncompressed transfer syntaxes (implicit VR little endian,
//! explicit VR little and big endian) and RLE Lossless (written back as
//! RLE), 8 or 16 bits allocated, any bits stored, signed or unsigned, one
//! frame, 1 sample (MONOCHROME1/2) or 3 samples (RGB, either planar
//! configuration). Other encapsulated (JPEG, JPEG-LS, JPEG 2000, ...) or
//! deflated data is refused with a message saying so: decompress first. Stored values are normalised over the dataset's range
//! (see [`crate::dataset::Format::Dicom`]); written values are rounded back
//! to integers in that range, and bits above `BitsStored` (old overlay
//! planes) of unsigned data are kept as they were.

use std::path::{Path, PathBuf};

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Tag};
use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;

use crate::dataset::{Dataset, Format, ImageShape, Item};
use crate::formats::{read_file, sha256_hex, write_file, WrittenFile};
use crate::{Error, Result};

mod rle;

const NATIVE_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
];
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Pixel layout of one DICOM file.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layout {
    rows: usize,
    cols: usize,
    samples: usize,
    planar: bool,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    /// RLE Lossless: the pixel data is one encapsulated RLE frame.
    rle: bool,
}

impl Layout {
    fn shape(&self) -> ImageShape {
        ImageShape {
            channels: self.samples,
            height: self.rows,
            width: self.cols,
        }
    }

    fn count(&self) -> usize {
        self.rows * self.cols * self.samples
    }

    /// Smallest and largest representable stored value.
    fn representable(&self) -> (i64, i64) {
        let b = self.bits_stored as u32;
        if self.signed {
            (-(1i64 << (b - 1)), (1i64 << (b - 1)) - 1)
        } else {
            (0, (1i64 << b) - 1)
        }
    }

    /// The frame's shape for the RLE codec.
    fn rle_geometry(&self) -> rle::Geometry {
        rle::Geometry {
            rows: self.rows,
            cols: self.cols,
            samples: self.samples,
            bytes_per_sample: usize::from(self.bits_allocated / 8),
        }
    }

    /// Index into the file's sample order of planar `(c, y, x)`.
    fn sample_index(&self, c: usize, p: usize) -> usize {
        if self.planar {
            c * self.rows * self.cols + p
        } else {
            p * self.samples + c
        }
    }
}

fn open(path: &Path) -> Result<DefaultDicomObject> {
    dicom_object::open_file(path).map_err(|e| Error::decode(path, format!("DICOM: {e}")))
}

fn int_tag(obj: &DefaultDicomObject, tag: Tag, path: &Path, name: &str) -> Result<i64> {
    obj.element(tag)
        .map_err(|_| Error::decode(path, format!("missing {name}")))?
        .to_int::<i64>()
        .map_err(|e| Error::decode(path, format!("bad {name}: {e}")))
}

fn opt_int_tag(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok().flatten()?.to_int::<i64>().ok()
}

fn layout(obj: &DefaultDicomObject, path: &Path) -> Result<Layout> {
    let ts = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    let rle = ts == RLE_LOSSLESS;
    if !rle && !NATIVE_SYNTAXES.contains(&ts) {
        return Err(Error::Unsupported(format!(
            "{}: transfer syntax {ts} is compressed or deflated; decompress it first \
             (e.g. `dcmdjpeg` / `gdcmconv --raw`)",
            path.display()
        )));
    }
    let rows = int_tag(obj, tags::ROWS, path, "Rows")?;
    let cols = int_tag(obj, tags::COLUMNS, path, "Columns")?;
    let samples = opt_int_tag(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let bits_allocated = int_tag(obj, tags::BITS_ALLOCATED, path, "BitsAllocated")?;
    let bits_stored = opt_int_tag(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    let signed = opt_int_tag(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    // RLE segments are sample planes whatever PlanarConfiguration says.
    let planar = rle || opt_int_tag(obj, tags::PLANAR_CONFIGURATION).unwrap_or(0) == 1;
    let frames = opt_int_tag(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
    if frames != 1 {
        return Err(Error::Unsupported(format!(
            "{}: {frames} frames; only single-frame images are supported",
            path.display()
        )));
    }
    if rows <= 0 || cols <= 0 || !(samples == 1 || samples == 3) {
        return Err(Error::Unsupported(format!(
            "{}: {rows}x{cols} with {samples} samples per pixel is not supported",
            path.display()
        )));
    }
    if !(bits_allocated == 8 || bits_allocated == 16)
        || bits_stored < 1
        || bits_stored > bits_allocated
    {
        return Err(Error::Unsupported(format!(
            "{}: {bits_stored} bits stored in {bits_allocated} allocated is not supported",
            path.display()
        )));
    }
    Ok(Layout {
        rows: rows as usize,
        cols: cols as usize,
        samples: samples as usize,
        planar,
        bits_allocated: bits_allocated as u16,
        bits_stored: bits_stored as u16,
        signed,
        rle,
    })
}

/// The raw pixel words of the file (one per sample; 8-bit data widened).
fn raw_words(obj: &DefaultDicomObject, l: &Layout, path: &Path) -> Result<Vec<u16>> {
    let elem = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| Error::decode(path, "no PixelData"))?;
    let words: Vec<u16> = match elem.value() {
        Value::Primitive(PrimitiveValue::U16(v)) => {
            if l.bits_allocated == 8 {
                v.iter()
                    .flat_map(|w| w.to_le_bytes())
                    .map(u16::from)
                    .collect()
            } else {
                v.to_vec()
            }
        }
        Value::Primitive(PrimitiveValue::U8(v)) => {
            if l.bits_allocated == 8 {
                v.iter().map(|&b| u16::from(b)).collect()
            } else {
                v.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect()
            }
        }
        Value::PixelSequence(seq) if l.rle => {
            // One frame; an encoder that split it into fragments is undone.
            let frame: Vec<u8> = seq.fragments().concat();
            rle::decode_frame(&frame, l.rle_geometry()).map_err(|e| Error::decode(path, e))?
        }
        Value::PixelSequence(_) => {
            return Err(Error::Unsupported(format!(
                "{}: encapsulated (compressed) pixel data; decompress it first",
                path.display()
            )))
        }
        _ => {
            return Err(Error::decode(
                path,
                "PixelData has an unexpected value type",
            ))
        }
    };
    if words.len() < l.count() {
        return Err(Error::decode(
            path,
            format!(
                "PixelData holds {} samples, {}x{}x{} needs {}",
                words.len(),
                l.rows,
                l.cols,
                l.samples,
                l.count()
            ),
        ));
    }
    Ok(words)
}

/// A word's stored value (masked to BitsStored, sign-extended if signed).
fn stored_value(word: u16, l: &Layout) -> i64 {
    let b = l.bits_stored as u32;
    let mask = if b >= 16 { u16::MAX } else { (1u16 << b) - 1 };
    let v = (word & mask) as i64;
    if l.signed && v >= (1i64 << (b - 1)) {
        v - (1i64 << b)
    } else {
        v
    }
}

/// Stored values of one file in planar `(c, h, w)` order.
fn read_stored(path: &Path) -> Result<(Layout, Vec<i64>)> {
    let obj = open(path)?;
    let l = layout(&obj, path)?;
    let words = raw_words(&obj, &l, path)?;
    let hw = l.rows * l.cols;
    let mut out = vec![0i64; l.count()];
    for c in 0..l.samples {
        for p in 0..hw {
            out[c * hw + p] = stored_value(words[l.sample_index(c, p)], &l);
        }
    }
    Ok((l, out))
}

/// Reads the listed `(label, path)` DICOM files of a class-folder dataset.
pub(crate) fn load_files(
    root: &Path,
    files: &[(u32, PathBuf)],
    classes: Vec<String>,
) -> Result<Dataset> {
    let mut all: Vec<(Layout, Vec<i64>)> = Vec::with_capacity(files.len());
    let mut hashes = Vec::with_capacity(files.len());
    for (_, path) in files {
        let (l, stored) = read_stored(path)?;
        if let Some((first, _)) = all.first() {
            if first.shape() != l.shape() {
                return Err(Error::Unsupported(format!(
                    "images differ in shape: {} is {} but {} is {}",
                    files[0].1.display(),
                    first.shape(),
                    path.display(),
                    l.shape()
                )));
            }
        }
        hashes.push(sha256_hex(&read_file(path)?));
        all.push((l, stored));
    }
    let lo = all
        .iter()
        .flat_map(|(_, v)| v.iter())
        .min()
        .copied()
        .unwrap_or(0);
    let hi = all
        .iter()
        .flat_map(|(_, v)| v.iter())
        .max()
        .copied()
        .unwrap_or(0);
    if hi <= lo {
        return Err(Error::Unsupported(format!(
            "{}: every pixel has the same stored value {lo}",
            root.display()
        )));
    }
    let span = (hi - lo) as f64;
    let shape = all[0].0.shape();
    let mut pixels = Vec::with_capacity(files.len() * shape.values());
    for (_, stored) in &all {
        pixels.extend(stored.iter().map(|&v| ((v - lo) as f64 / span) as f32));
    }
    let levels = u32::try_from(hi - lo).ok();
    let items = files
        .iter()
        .zip(hashes)
        .map(|((_, p), h)| Item {
            path: Some(p.strip_prefix(root).unwrap_or(p).to_path_buf()),
            sha256: Some(h),
            levels,
            alpha: None,
        })
        .collect();
    Dataset::new(
        crate::formats::file_name(root),
        shape,
        pixels,
        files.iter().map(|(l, _)| *l).collect(),
        classes,
        items,
        Format::Dicom {
            root: root.to_path_buf(),
            range: (lo as f64, hi as f64),
        },
    )
}

/// Writes each image into a copy of its source file under `out`.
pub(crate) fn write_folder(
    data: &Dataset,
    root: &Path,
    range: (f64, f64),
    out: &Path,
) -> Result<Vec<WrittenFile>> {
    let mut written = Vec::with_capacity(data.len());
    for (i, item) in data.items().iter().enumerate() {
        let rel = item.path.clone().ok_or_else(|| {
            Error::Unsupported("a DICOM image without a source file cannot be written".into())
        })?;
        let src = root.join(&rel);
        let bytes = replace_pixels(&src, data.image(i), data.shape(), range)?;
        written.push(write_file(out, &rel, &bytes)?);
    }
    Ok(written)
}

/// The bytes of `src` with its pixel data replaced by `values` (planar,
/// normalised with `range`).
fn replace_pixels(
    src: &Path,
    values: &[f32],
    shape: ImageShape,
    range: (f64, f64),
) -> Result<Vec<u8>> {
    let mut obj = open(src)?;
    let l = layout(&obj, src)?;
    if l.shape() != shape {
        return Err(Error::Unsupported(format!(
            "{} is {}, the protected image is {shape}",
            src.display(),
            l.shape()
        )));
    }
    let mut words = raw_words(&obj, &l, src)?;
    let (min_r, max_r) = l.representable();
    let b = l.bits_stored as u32;
    let mask: u16 = if b >= 16 { u16::MAX } else { (1u16 << b) - 1 };
    let hw = l.rows * l.cols;
    for c in 0..l.samples {
        for p in 0..hw {
            let x = values[c * hw + p] as f64;
            let v = (range.0 + x * (range.1 - range.0)).round() as i64;
            let v = v.clamp(min_r, max_r);
            let k = l.sample_index(c, p);
            words[k] = if l.signed {
                v as i16 as u16
            } else {
                (words[k] & !mask) | (v as u16 & mask)
            };
        }
    }
    let elem = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| Error::decode(src, "no PixelData"))?;
    let vr = elem.vr();
    if l.rle {
        let offsets = elem.value().offset_table().unwrap_or_default().to_vec();
        let frame =
            rle::encode_frame(&words, l.rle_geometry()).map_err(|e| Error::decode(src, e))?;
        // The one frame starts at offset 0 whatever the basic offset table held.
        let offsets = if offsets.is_empty() { offsets } else { vec![0] };
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            vr,
            PixelFragmentSequence::new(offsets, vec![frame]),
        ));
        return serialise(obj, src);
    }
    let new_value = match elem.value() {
        Value::Primitive(PrimitiveValue::U16(_)) => {
            if l.bits_allocated == 8 {
                let bytes: Vec<u8> = words.iter().map(|&w| w as u8).collect();
                PrimitiveValue::U16(
                    bytes
                        .chunks(2)
                        .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                        .collect(),
                )
            } else {
                PrimitiveValue::U16(words.into_iter().collect())
            }
        }
        _ => {
            if l.bits_allocated == 8 {
                PrimitiveValue::U8(words.iter().map(|&w| w as u8).collect())
            } else {
                PrimitiveValue::U8(words.iter().flat_map(|w| w.to_le_bytes()).collect())
            }
        }
    };
    obj.put(DataElement::new(tags::PIXEL_DATA, vr, new_value));
    serialise(obj, src)
}

/// The file's bytes (preamble, meta group, data set).
fn serialise(obj: DefaultDicomObject, src: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    obj.write_all(&mut bytes)
        .map_err(|e| Error::Unsupported(format!("writing DICOM {}: {e}", src.display())))?;
    Ok(bytes)
}

/// Raw stored values of a DICOM file in planar order (for tests and tools).
pub fn stored_values(path: &Path) -> Result<(ImageShape, Vec<i64>)> {
    let (l, v) = read_stored(path)?;
    Ok((l.shape(), v))
}
