//! Folder-per-class PNG datasets: 8- and 16-bit, grayscale and RGB.
//!
//! Each file keeps its bit depth on the way back out (an 8-bit file is
//! quantised to 1/255, a 16-bit one to 1/65535). An alpha channel is not
//! protected (a model trains on the colour) but travels: it is kept with
//! the image when the file is read ([`Item::alpha`]) and written back, so
//! an RGBA or gray+alpha PNG is released as one, its transparency
//! unchanged. Palette files are released as RGB.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

use crate::dataset::{Dataset, Format, ImageShape, Item};
use crate::formats::{read_file, sha256_hex, write_file, WrittenFile};
use crate::{Error, Result};

/// A decoded PNG: shape, values in `[0, 1]` (channel-first), grid, and
/// its alpha channel if it has one.
pub(crate) struct Decoded {
    pub shape: ImageShape,
    pub values: Vec<f32>,
    pub levels: u32,
    /// One value per pixel at the file's bit depth.
    pub alpha: Option<Vec<u16>>,
}

/// How a PNG file's decoded form, and so its release (written from the
/// decoded pixels), differs from the file besides its pixel values: read
/// from the file's header and chunk list, for a warning at load time.
pub(crate) fn storage_changes(bytes: &[u8]) -> Vec<&'static str> {
    let mut out = Vec::new();
    if bytes.len() < 33 || &bytes[12..16] != b"IHDR" {
        return out;
    }
    let (depth, colour, interlace) = (bytes[24], bytes[25], bytes[28]);
    if colour == 3 {
        out.push("with a palette are released as RGB");
    } else if depth < 8 {
        out.push("of 1, 2 or 4 bits are released as 8-bit");
    }
    if interlace != 0 {
        out.push("that are interlaced are released non-interlaced");
    }
    let mut at = 8;
    let mut metadata = false;
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let kind = &bytes[at + 4..at + 8];
        match kind {
            b"tRNS" if colour == 0 || colour == 2 => {
                out.push("with a transparent colour (tRNS) are released with an alpha channel")
            }
            b"IHDR" | b"PLTE" | b"IDAT" | b"IEND" | b"tRNS" => {}
            _ => metadata = true,
        }
        at = at.saturating_add(12).saturating_add(len as usize);
    }
    if metadata {
        out.push(
            "with metadata chunks (text, resolution, colour profile) are released without them",
        );
    }
    out
}

/// Decodes PNG bytes (`path` only names the file in errors).
pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Decoded> {
    let img = image::load_from_memory_with_format(bytes, ImageFormat::Png)
        .map_err(|e| Error::decode(path, format!("PNG decode failed: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let alpha = alpha_of(&img);
    let (channels, levels, interleaved): (usize, u32, Vec<f32>) = match img {
        DynamicImage::ImageLuma8(b) => (1, 255, b.into_raw().iter().map(|&v| v as f32).collect()),
        DynamicImage::ImageLuma16(b) => {
            (1, 65535, b.into_raw().iter().map(|&v| v as f32).collect())
        }
        DynamicImage::ImageRgb8(b) => (3, 255, b.into_raw().iter().map(|&v| v as f32).collect()),
        DynamicImage::ImageRgb16(b) => (3, 65535, b.into_raw().iter().map(|&v| v as f32).collect()),
        DynamicImage::ImageLumaA8(b) => {
            let raw = b.into_raw();
            (1, 255, raw.chunks(2).map(|p| p[0] as f32).collect())
        }
        DynamicImage::ImageLumaA16(b) => {
            let raw = b.into_raw();
            (1, 65535, raw.chunks(2).map(|p| p[0] as f32).collect())
        }
        DynamicImage::ImageRgba8(b) => {
            let raw = b.into_raw();
            let v = raw
                .chunks(4)
                .flat_map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
                .collect();
            (3, 255, v)
        }
        DynamicImage::ImageRgba16(b) => {
            let raw = b.into_raw();
            let v = raw
                .chunks(4)
                .flat_map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
                .collect();
            (3, 65535, v)
        }
        other => {
            return Err(Error::Unsupported(format!(
                "{}: PNG colour type {:?} is not supported",
                path.display(),
                other.color()
            )))
        }
    };
    let shape = ImageShape {
        channels,
        height: h,
        width: w,
    };
    let values = hwc_to_chw(&interleaved, shape, levels as f32);
    Ok(Decoded {
        shape,
        values,
        levels,
        alpha,
    })
}

/// Interleaved `(h, w, c)` to planar `(c, h, w)`, divided by `levels`.
pub(crate) fn hwc_to_chw(src: &[f32], s: ImageShape, levels: f32) -> Vec<f32> {
    let mut out = vec![0f32; s.values()];
    for y in 0..s.height {
        for x in 0..s.width {
            for c in 0..s.channels {
                out[(c * s.height + y) * s.width + x] =
                    src[(y * s.width + x) * s.channels + c] / levels;
            }
        }
    }
    out
}

/// Planar `(c, h, w)` in `[0, 1]` to interleaved integers on a `levels` grid.
fn chw_to_hwc_int(src: &[f32], s: ImageShape, levels: u32) -> Vec<u32> {
    let mut out = vec![0u32; s.values()];
    let l = levels as f32;
    for y in 0..s.height {
        for x in 0..s.width {
            for c in 0..s.channels {
                let v = src[(c * s.height + y) * s.width + x].clamp(0.0, 1.0);
                out[(y * s.width + x) * s.channels + c] = (v * l).round() as u32;
            }
        }
    }
    out
}

/// The alpha channel of a decoded PNG, one value per pixel at the file's
/// bit depth (`None` without one).
fn alpha_of(img: &DynamicImage) -> Option<Vec<u16>> {
    match img {
        DynamicImage::ImageLumaA8(b) => Some(b.as_raw().chunks(2).map(|p| p[1].into()).collect()),
        DynamicImage::ImageLumaA16(b) => Some(b.as_raw().chunks(2).map(|p| p[1]).collect()),
        DynamicImage::ImageRgba8(b) => Some(b.as_raw().chunks(4).map(|p| p[3].into()).collect()),
        DynamicImage::ImageRgba16(b) => Some(b.as_raw().chunks(4).map(|p| p[3]).collect()),
        _ => None,
    }
}

/// Interleaved colour values with `alpha` (one per pixel) appended to each
/// pixel's channels.
fn with_alpha<T: Copy>(color: &[T], channels: usize, alpha: &[T]) -> Vec<T> {
    color
        .chunks(channels)
        .zip(alpha)
        .flat_map(|(px, &a)| px.iter().copied().chain(std::iter::once(a)))
        .collect()
}

/// Encodes one image (values in `[0, 1]`) as an 8-bit (`levels` 255 or
/// less) or 16-bit PNG; with `alpha` (one value per pixel at that depth)
/// as gray+alpha or RGBA.
pub(crate) fn encode(
    values: &[f32],
    s: ImageShape,
    sixteen_bit: bool,
    alpha: Option<&[u16]>,
) -> Result<Vec<u8>> {
    let (w, h) = (s.width as u32, s.height as u32);
    if alpha.is_some_and(|a| a.len() != s.pixels()) {
        return Err(Error::Unsupported(format!(
            "alpha channel of {} values for a {s} image",
            alpha.map_or(0, <[u16]>::len)
        )));
    }
    let img = if sixteen_bit {
        let data: Vec<u16> = chw_to_hwc_int(values, s, 65535)
            .into_iter()
            .map(|v| v as u16)
            .collect();
        match (s.channels, alpha) {
            (1, None) => {
                ImageBuffer::<Luma<u16>, _>::from_raw(w, h, data).map(DynamicImage::ImageLuma16)
            }
            (1, Some(a)) => ImageBuffer::<LumaA<u16>, _>::from_raw(w, h, with_alpha(&data, 1, a))
                .map(DynamicImage::ImageLumaA16),
            (_, None) => {
                ImageBuffer::<Rgb<u16>, _>::from_raw(w, h, data).map(DynamicImage::ImageRgb16)
            }
            (_, Some(a)) => ImageBuffer::<Rgba<u16>, _>::from_raw(w, h, with_alpha(&data, 3, a))
                .map(DynamicImage::ImageRgba16),
        }
    } else {
        let data: Vec<u8> = chw_to_hwc_int(values, s, 255)
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let alpha8: Option<Vec<u8>> = alpha.map(|a| a.iter().map(|&v| v.min(255) as u8).collect());
        match (s.channels, alpha8) {
            (1, None) => {
                ImageBuffer::<Luma<u8>, _>::from_raw(w, h, data).map(DynamicImage::ImageLuma8)
            }
            (1, Some(a)) => ImageBuffer::<LumaA<u8>, _>::from_raw(w, h, with_alpha(&data, 1, &a))
                .map(DynamicImage::ImageLumaA8),
            (_, None) => {
                ImageBuffer::<Rgb<u8>, _>::from_raw(w, h, data).map(DynamicImage::ImageRgb8)
            }
            (_, Some(a)) => ImageBuffer::<Rgba<u8>, _>::from_raw(w, h, with_alpha(&data, 3, &a))
                .map(DynamicImage::ImageRgba8),
        }
    };
    let img = img.ok_or_else(|| Error::Unsupported(format!("cannot encode shape {s}")))?;
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, ImageFormat::Png)
        .map_err(|e| Error::Unsupported(format!("PNG encoding failed: {e}")))?;
    Ok(buf.into_inner())
}

/// Reads the listed `(label, path)` PNG files of a class-folder dataset.
pub(crate) fn load_files(
    root: &Path,
    files: &[(u32, PathBuf)],
    classes: Vec<String>,
) -> Result<Dataset> {
    let mut shape: Option<(ImageShape, PathBuf)> = None;
    let mut pixels = Vec::new();
    let mut labels = Vec::with_capacity(files.len());
    let mut items = Vec::with_capacity(files.len());
    let mut changes: Vec<(&'static str, usize, PathBuf)> = Vec::new();
    for (label, path) in files {
        let bytes = read_file(path)?;
        let d = decode(&bytes, path)?;
        for change in storage_changes(&bytes) {
            match changes.iter_mut().find(|c| c.0 == change) {
                Some(c) => c.1 += 1,
                None => changes.push((change, 1, path.clone())),
            }
        }
        match &shape {
            None => shape = Some((d.shape, path.clone())),
            Some((s, first)) if *s != d.shape => {
                let fix = if (s.height, s.width) == (d.shape.height, d.shape.width) {
                    "grayscale beside colour (a palette file reads as RGB): convert them to one \
                     colour type first"
                } else {
                    "resize or crop them to one size first"
                };
                return Err(Error::Unsupported(format!(
                    "images differ in shape: {} is {}x{}x{} but {} is {}x{}x{} ({fix})",
                    first.display(),
                    s.channels,
                    s.height,
                    s.width,
                    path.display(),
                    d.shape.channels,
                    d.shape.height,
                    d.shape.width
                )));
            }
            Some(_) => {}
        }
        pixels.extend_from_slice(&d.values);
        labels.push(*label);
        items.push(Item {
            path: Some(path.strip_prefix(root).unwrap_or(path).to_path_buf()),
            sha256: Some(sha256_hex(&bytes)),
            levels: Some(d.levels),
            alpha: d.alpha,
            frame: None,
        });
    }
    for (change, count, example) in changes {
        tracing::warn!(
            files = count,
            example = %example.display(),
            "PNG files {change}"
        );
    }
    let (shape, _) = shape.ok_or_else(|| Error::Unsupported("no PNG files".into()))?;
    let name = crate::formats::file_name(root);
    Dataset::new(
        name,
        shape,
        pixels,
        labels,
        classes,
        items,
        Format::PngFolder {
            root: root.to_path_buf(),
        },
    )
}

/// Writes every image as a PNG under `out` (same relative path and bit
/// depth as its source, and the source file's alpha channel when it had
/// one; generated images go to `class/00000.png`). Reads no source file.
pub(crate) fn write_folder(data: &Dataset, out: &Path) -> Result<Vec<WrittenFile>> {
    let mut written = Vec::with_capacity(data.len());
    for (i, item) in data.items().iter().enumerate() {
        let rel = match &item.path {
            Some(p) => p.clone(),
            None => {
                let class = &data.classes()[data.labels()[i] as usize];
                PathBuf::from(safe_component(class)).join(format!("{i:05}.png"))
            }
        };
        let sixteen = item.levels.is_some_and(|l| l > 255);
        let bytes = encode(data.image(i), data.shape(), sixteen, item.alpha.as_deref())?;
        written.push(write_file(out, &rel, &bytes)?);
    }
    Ok(written)
}

/// A class name usable as a folder name.
pub(crate) fn safe_component(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}
