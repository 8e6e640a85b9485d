//! Folder-per-class DICOM datasets: read the stored pixel values, write the
//! protected values back into a copy of each file with every other tag
//! unchanged.
//!
//! Supported: uncompressed transfer syntaxes (implicit VR little endian,
//! explicit VR little and big endian, deflated explicit VR little endian)
//! and RLE Lossless (each written back in its own syntax), 8 or 16 bits
//! allocated, any bits stored, signed or unsigned, 1 sample (MONOCHROME1/2)
//! or 3 samples (RGB, either planar configuration), one frame or many.
//! Other encapsulated (JPEG, JPEG-LS, JPEG 2000, ...) data, and data sets
//! in a syntax dicom-rs cannot read, are refused with a message saying so:
//! decompress or convert first.
//! So are palette and YCbCr colour: a step of a palette index or a chroma
//! sample is no bounded step of the colour a reader sees, so the budget
//! would mean nothing; convert those to RGB first.
//!
//! Each frame of a multi-frame file (a cine loop, an enhanced CT or MR
//! series) is one image of the dataset, labelled by the file's class
//! folder; all of a file's frames are written back into one copy of it.
//! Stored values are normalised over the dataset's range
//! (see [`crate::dataset::Format::Dicom`]); written values are rounded back
//! to integers in that range, and bits above `BitsStored` (old overlay
//! planes) of unsigned data are kept as they were.

use std::path::{Path, PathBuf};

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Tag};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, ReadError};

use crate::dataset::{Dataset, Format, ImageShape, Item};
use crate::formats::{read_file, sha256_hex, write_file, WrittenFile};
use crate::{Error, Result};

mod rle;
#[cfg(test)]
mod tests;

/// Transfer syntaxes whose pixel data is stored as it is: implicit and
/// explicit VR little endian, explicit VR big endian, and deflated explicit
/// VR little endian (the whole data set is deflated, the pixels inside are
/// native; it is written back deflated).
const NATIVE_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
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
    /// RLE Lossless: the pixel data is one encapsulated RLE segment set
    /// per frame.
    rle: bool,
    /// Number of frames (1 unless `NumberOfFrames` says more).
    frames: usize,
}

impl Layout {
    fn shape(&self) -> ImageShape {
        ImageShape {
            channels: self.samples,
            height: self.rows,
            width: self.cols,
        }
    }

    /// Samples in one frame.
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

/// What to do with a data set in a transfer syntax dicom-rs cannot read.
const CONVERT_ADVICE: &str =
    "convert the file to explicit VR little endian first (e.g. `gdcmconv --raw`)";

fn open(path: &Path) -> Result<DefaultDicomObject> {
    dicom_object::open_file(path).map_err(|e| match e {
        // A data set dicom-rs cannot read at all (a private or unknown
        // syntax, or one it would need another build feature for): say
        // what to do, not which cargo feature to enable.
        ReadError::ReadUnrecognizedTransferSyntax { uid, .. } => Error::Unsupported(format!(
            "{}: transfer syntax {uid} is not one lethe knows; {CONVERT_ADVICE}",
            path.display()
        )),
        ReadError::ReadUnsupportedTransferSyntax { uid, name, .. }
        | ReadError::ReadUnsupportedTransferSyntaxWithSuggestion { uid, name, .. } => {
            Error::Unsupported(format!(
                "{}: transfer syntax {uid} ({name}) cannot be read; {CONVERT_ADVICE}",
                path.display()
            ))
        }
        e => Error::decode(path, format!("DICOM: {e}")),
    })
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
    if frames < 1 {
        return Err(Error::decode(path, format!("NumberOfFrames is {frames}")));
    }
    check_photometric(obj, samples, path)?;
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
        frames: frames as usize,
    })
}

/// Refuses colour models whose stored values are not intensities of the
/// colour shown: the budget is a bound on stored values, so it only bounds
/// what a reader sees for grayscale and RGB.
fn check_photometric(obj: &DefaultDicomObject, samples: i64, path: &Path) -> Result<()> {
    let photometric = obj
        .element_opt(tags::PHOTOMETRIC_INTERPRETATION)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string());
    let why = match (samples, photometric.as_deref()) {
        (1, None | Some("MONOCHROME1" | "MONOCHROME2")) | (3, None | Some("RGB")) => return Ok(()),
        (_, Some("PALETTE COLOR")) => {
            "its values index a colour table, so a small step of a value can be any step of \
             the colour"
        }
        (_, Some(p)) if p.starts_with("YBR") => {
            "a step of a luma or chroma sample is no bounded step of the RGB colour shown \
             (and chroma may be subsampled)"
        }
        _ => "lethe reads MONOCHROME1/2 (1 sample) and RGB (3 samples)",
    };
    Err(Error::Unsupported(format!(
        "{}: photometric interpretation {} with {samples} samples per pixel is not supported: \
         {why}; convert it to RGB or grayscale first",
        path.display(),
        photometric.as_deref().unwrap_or("(none)")
    )))
}

/// The raw pixel words of the file, frame after frame (one per sample;
/// 8-bit data widened).
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
            let mut words = Vec::with_capacity(l.count() * l.frames);
            for frame in rle_frames(seq.offset_table(), seq.fragments(), l.frames)
                .map_err(|e| Error::decode(path, e))?
            {
                // Exactly one frame's samples, or an error.
                words.extend(
                    rle::decode_frame(&frame, l.rle_geometry())
                        .map_err(|e| Error::decode(path, e))?,
                );
            }
            words
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
    if words.len() < l.count() * l.frames {
        return Err(Error::decode(
            path,
            format!(
                "PixelData holds {} samples, {} frame(s) of {}x{}x{} need {}",
                words.len(),
                l.frames,
                l.rows,
                l.cols,
                l.samples,
                l.count() * l.frames
            ),
        ));
    }
    Ok(words)
}

/// The encoded bytes of each of `frames` RLE frames. One frame may span
/// several fragments (an encoder's choice, joined here); with more than
/// one frame, the basic offset table says where each starts, or, without
/// one, each fragment is one frame (as the standard asks of RLE).
fn rle_frames(
    offsets: &[u32],
    fragments: &[Vec<u8>],
    frames: usize,
) -> Result<Vec<Vec<u8>>, String> {
    if frames == 1 {
        return Ok(vec![fragments.concat()]);
    }
    if offsets.is_empty() {
        if fragments.len() != frames {
            return Err(format!(
                "{} RLE fragments for {frames} frames and no offset table",
                fragments.len()
            ));
        }
        return Ok(fragments.to_vec());
    }
    if offsets.len() != frames || offsets[0] != 0 || offsets.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "the basic offset table lists {} frame offsets {:?}, the file has {frames} frames",
            offsets.len(),
            &offsets[..offsets.len().min(4)]
        ));
    }
    // An item's offset counts its 8-byte header (tag and length) too.
    let mut out = vec![Vec::new(); frames];
    let mut at = 0u64;
    for fragment in fragments {
        let frame = offsets.partition_point(|&o| u64::from(o) <= at) - 1;
        out[frame].extend_from_slice(fragment);
        at += 8 + fragment.len() as u64;
    }
    if let Some(k) = out.iter().position(Vec::is_empty) {
        return Err(format!(
            "the basic offset table points frame {k} at no fragment"
        ));
    }
    Ok(out)
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

/// Stored values of one file, one planar `(c, h, w)` vector per frame.
fn read_stored(path: &Path) -> Result<(Layout, Vec<Vec<i64>>)> {
    let obj = open(path)?;
    let l = layout(&obj, path)?;
    let words = raw_words(&obj, &l, path)?;
    let hw = l.rows * l.cols;
    let frames = words
        .chunks_exact(l.count())
        .take(l.frames)
        .map(|frame| {
            let mut out = vec![0i64; l.count()];
            for c in 0..l.samples {
                for p in 0..hw {
                    out[c * hw + p] = stored_value(frame[l.sample_index(c, p)], &l);
                }
            }
            out
        })
        .collect();
    Ok((l, frames))
}

/// Reads the listed `(label, path)` DICOM files of a class-folder dataset,
/// every frame of a file as one image.
pub(crate) fn load_files(
    root: &Path,
    files: &[(u32, PathBuf)],
    classes: Vec<String>,
) -> Result<Dataset> {
    let mut all: Vec<(Layout, Vec<Vec<i64>>)> = Vec::with_capacity(files.len());
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
    let stored = || all.iter().flat_map(|(_, frames)| frames.iter().flatten());
    let lo = stored().min().copied().unwrap_or(0);
    let hi = stored().max().copied().unwrap_or(0);
    if hi <= lo {
        return Err(Error::Unsupported(format!(
            "{}: every pixel has the same stored value {lo}",
            root.display()
        )));
    }
    let span = (hi - lo) as f64;
    let shape = all[0].0.shape();
    let images: usize = all.iter().map(|(_, frames)| frames.len()).sum();
    let mut pixels = Vec::with_capacity(images * shape.values());
    let mut labels = Vec::with_capacity(images);
    let mut items = Vec::with_capacity(images);
    let levels = u32::try_from(hi - lo).ok();
    for (((label, path), (layout, frames)), sha256) in files.iter().zip(&all).zip(hashes) {
        for (k, frame) in frames.iter().enumerate() {
            pixels.extend(frame.iter().map(|&v| ((v - lo) as f64 / span) as f32));
            labels.push(*label);
            items.push(Item {
                path: Some(path.strip_prefix(root).unwrap_or(path).to_path_buf()),
                sha256: Some(sha256.clone()),
                levels,
                alpha: None,
                frame: (layout.frames > 1).then_some(k as u32),
            });
        }
    }
    Dataset::new(
        crate::formats::file_name(root),
        shape,
        pixels,
        labels,
        classes,
        items,
        Format::Dicom {
            root: root.to_path_buf(),
            range: (lo as f64, hi as f64),
        },
    )
}

/// Writes each file's images (all its frames) into a copy of the source
/// file under `out`: one written file per source file.
pub(crate) fn write_folder(
    data: &Dataset,
    root: &Path,
    range: (f64, f64),
    out: &Path,
) -> Result<Vec<WrittenFile>> {
    let items = data.items();
    let mut written = Vec::with_capacity(data.len());
    let mut start = 0;
    while start < items.len() {
        let rel = items[start].path.clone().ok_or_else(|| {
            Error::Unsupported("a DICOM image without a source file cannot be written".into())
        })?;
        let end = start
            + items[start..]
                .iter()
                .take_while(|item| item.path.as_ref() == Some(&rel))
                .count();
        if let Some(k) = (start..end).find(|&k| items[k].frame.unwrap_or(0) as usize != k - start) {
            return Err(Error::Unsupported(format!(
                "{}: image {k} is frame {:?} of it, expected frame {}: a multi-frame file is \
                 written from all of its frames, in order",
                rel.display(),
                items[k].frame,
                k - start
            )));
        }
        let src = root.join(&rel);
        let frames: Vec<&[f32]> = (start..end).map(|k| data.image(k)).collect();
        let bytes = replace_pixels(&src, &frames, data.shape(), range)?;
        written.push(write_file(out, &rel, &bytes)?);
        start = end;
    }
    Ok(written)
}

/// The bytes of `src` with its pixel data replaced by `frames` (one planar
/// vector per frame, normalised with `range`).
fn replace_pixels(
    src: &Path,
    frames: &[&[f32]],
    shape: ImageShape,
    range: (f64, f64),
) -> Result<Vec<u8>> {
    let mut obj = open(src)?;
    let l = layout(&obj, src)?;
    if l.shape() != shape || l.frames != frames.len() {
        return Err(Error::Unsupported(format!(
            "{} holds {} frame(s) of {}, the protected data has {} of {shape}",
            src.display(),
            l.frames,
            l.shape(),
            frames.len()
        )));
    }
    let mut words = raw_words(&obj, &l, src)?;
    let (min_r, max_r) = l.representable();
    let b = l.bits_stored as u32;
    let mask: u16 = if b >= 16 { u16::MAX } else { (1u16 << b) - 1 };
    let hw = l.rows * l.cols;
    for (f, values) in frames.iter().enumerate() {
        let frame = &mut words[f * l.count()..(f + 1) * l.count()];
        for c in 0..l.samples {
            for p in 0..hw {
                let x = values[c * hw + p] as f64;
                let v = (range.0 + x * (range.1 - range.0)).round() as i64;
                let v = v.clamp(min_r, max_r);
                let k = l.sample_index(c, p);
                frame[k] = if l.signed {
                    v as i16 as u16
                } else {
                    (frame[k] & !mask) | (v as u16 & mask)
                };
            }
        }
    }
    let elem = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| Error::decode(src, "no PixelData"))?;
    let vr = elem.vr();
    if l.rle {
        let had_offsets = !elem.value().offset_table().unwrap_or_default().is_empty();
        let encoded = words
            .chunks_exact(l.count())
            .take(l.frames)
            .map(|frame| rle::encode_frame(frame, l.rle_geometry()))
            .collect::<Result<Vec<Vec<u8>>, String>>()
            .map_err(|e| Error::decode(src, e))?;
        // One fragment per frame; an offset counts each item's 8-byte header.
        let starts: Vec<u64> = encoded
            .iter()
            .scan(0u64, |at, f| {
                let start = *at;
                *at += 8 + f.len() as u64;
                Some(start)
            })
            .collect();
        let offsets = if had_offsets {
            let offsets = starts
                .iter()
                .map(|&s| u32::try_from(s))
                .collect::<Result<Vec<u32>, _>>();
            offsets.map_err(|_| Error::decode(src, "RLE frames beyond 4 GiB"))?
        } else {
            Vec::new()
        };
        if obj
            .element_opt(tags::EXTENDED_OFFSET_TABLE)
            .ok()
            .flatten()
            .is_some()
        {
            let lengths: Vec<u64> = encoded.iter().map(|f| f.len() as u64).collect();
            obj.put(DataElement::new(
                tags::EXTENDED_OFFSET_TABLE,
                dicom_core::VR::OV,
                PrimitiveValue::U64(starts.into_iter().collect()),
            ));
            obj.put(DataElement::new(
                tags::EXTENDED_OFFSET_TABLE_LENGTHS,
                dicom_core::VR::OV,
                PrimitiveValue::U64(lengths.into_iter().collect()),
            ));
        }
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            vr,
            PixelFragmentSequence::new(offsets, encoded),
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

/// Raw stored values of a DICOM file, one planar vector per frame (for
/// tests and tools).
pub fn stored_values(path: &Path) -> Result<(ImageShape, Vec<Vec<i64>>)> {
    let (l, frames) = read_stored(path)?;
    Ok((l.shape(), frames))
}
