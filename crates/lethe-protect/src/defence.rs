//! What someone who wants to train on a protected release can do about the
//! noise: the robustness suite of the audit.
//!
//! Three kinds, as in the literature the research notes cite (ISS, APBench,
//! UEraser, Madry adversarial training):
//!
//! * **pre-processing** of the training images, once, before training:
//!   grayscale (also applied to the test images, since it changes the
//!   input), JPEG re-encoding at a quality, Gaussian blur, 3x3 median
//!   filter, additive Gaussian noise;
//! * **augmentation** of every training batch: random crop (zero padding
//!   of `max(1, side / 8)` pixels) with horizontal flip, cutout, mixup;
//! * **adversarial training**: every batch replaced by its PGD adversarial
//!   examples (L-inf `eps`, `steps` steps of `2.5 * eps / steps`, random
//!   start).

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageFormat};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::ImageShape;
use crate::{Error, Result};

/// One countermeasure of the robustness suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "defence", rename_all = "snake_case", deny_unknown_fields)]
pub enum Defence {
    /// Train as released.
    None,
    /// Channel mean of train and test images (a no-op on grayscale data).
    Grayscale,
    /// JPEG re-encoding of the training images at `quality` (1..=100).
    Jpeg {
        /// JPEG quality.
        quality: u8,
    },
    /// Gaussian blur of the training images.
    Blur {
        /// Standard deviation in pixels.
        sigma: f32,
    },
    /// 3x3 median filter of the training images.
    Median,
    /// Additive Gaussian noise on the training images (fixed draw).
    Noise {
        /// Standard deviation.
        sigma: f32,
    },
    /// Random crop (zero padding) and horizontal flip of every batch.
    FlipCrop,
    /// Flip-crop plus a random `size`x`size` square zeroed per image.
    Cutout {
        /// Side of the square.
        size: usize,
    },
    /// Flip-crop plus mixup with `Beta(alpha, alpha)` weights.
    Mixup {
        /// Beta parameter.
        alpha: f32,
    },
    /// PGD adversarial training.
    Adversarial {
        /// L-inf radius.
        eps: f32,
        /// PGD steps.
        steps: usize,
    },
}

/// A fraction of full scale in 1/255ths for a label: `8` for 8/255, `7.6`
/// for 0.03 (a whole number only when it is one).
fn per_255(x: f32) -> String {
    let v = f64::from(x) * 255.0;
    if (v - v.round()).abs() < 1e-4 {
        format!("{:.0}", v)
    } else {
        format!("{:.1}", v)
    }
}

impl Defence {
    /// A short label, e.g. `jpeg-q10`.
    pub fn label(&self) -> String {
        match self {
            Defence::None => "none".into(),
            Defence::Grayscale => "grayscale".into(),
            Defence::Jpeg { quality } => format!("jpeg-q{quality}"),
            Defence::Blur { sigma } => format!("blur-s{sigma}"),
            Defence::Median => "median3".into(),
            Defence::Noise { sigma } => format!("noise-s{}/255", per_255(*sigma)),
            Defence::FlipCrop => "flip-crop".into(),
            Defence::Cutout { size } => format!("cutout-{size}"),
            Defence::Mixup { alpha } => format!("mixup-a{alpha}"),
            Defence::Adversarial { eps, steps } => {
                format!("adv-train-eps{}/255-k{steps}", per_255(*eps))
            }
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        let bad = match self {
            Defence::Jpeg { quality } => !(1..=100).contains(quality),
            Defence::Blur { sigma } | Defence::Noise { sigma } => !(*sigma > 0.0 && *sigma <= 10.0),
            Defence::Cutout { size } => *size == 0,
            Defence::Mixup { alpha } => !(*alpha > 0.0 && alpha.is_finite()),
            Defence::Adversarial { eps, steps } => !(*eps > 0.0 && *eps <= 0.25) || *steps == 0,
            _ => false,
        };
        if bad {
            return Err(Error::Config(format!("bad defence parameters: {self:?}")));
        }
        Ok(())
    }

    /// Whether the test images go through the same pre-processing.
    pub(crate) fn applies_to_test(&self) -> bool {
        matches!(self, Defence::Grayscale)
    }

    /// Whether training batches are augmented with crop and flip.
    pub(crate) fn flip_crop(&self) -> bool {
        matches!(
            self,
            Defence::FlipCrop | Defence::Cutout { .. } | Defence::Mixup { .. }
        )
    }
}

/// Applies a pre-processing defence to a stack of images (others: copy).
pub(crate) fn preprocess(
    defence: &Defence,
    pixels: &[f32],
    shape: ImageShape,
    rng: &mut StdRng,
) -> Result<Vec<f32>> {
    let v = shape.values();
    let mut out = Vec::with_capacity(pixels.len());
    for img in pixels.chunks(v) {
        match defence {
            Defence::Grayscale => out.extend(grayscale(img, shape)),
            Defence::Jpeg { quality } => out.extend(jpeg(img, shape, *quality)?),
            Defence::Blur { sigma } => out.extend(gaussian_blur(img, shape, *sigma)),
            Defence::Median => out.extend(median3(img, shape)),
            Defence::Noise { sigma } => out.extend(img.iter().map(|x| {
                let u1: f32 = rng.random_range(1e-7f32..1.0);
                let u2: f32 = rng.random_range(0.0f32..1.0);
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
                (x + sigma * z).clamp(0.0, 1.0)
            })),
            _ => out.extend_from_slice(img),
        }
    }
    Ok(out)
}

/// Channel mean replicated to every channel (shape unchanged).
pub(crate) fn grayscale(img: &[f32], s: ImageShape) -> Vec<f32> {
    if s.channels == 1 {
        return img.to_vec();
    }
    let hw = s.pixels();
    let mut out = vec![0f32; img.len()];
    for p in 0..hw {
        // ITU-R 601 luma, as PIL's convert("L").
        let y = 0.299 * img[p] + 0.587 * img[hw + p] + 0.114 * img[2 * hw + p];
        for c in 0..3 {
            out[c * hw + p] = y;
        }
    }
    out
}

/// Encodes as 8-bit JPEG at `quality` and decodes.
pub(crate) fn jpeg(img: &[f32], s: ImageShape, quality: u8) -> Result<Vec<f32>> {
    let hw = s.pixels();
    let mut raw = vec![0u8; img.len()];
    for c in 0..s.channels {
        for p in 0..hw {
            raw[p * s.channels + c] = (img[c * hw + p].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    let color = if s.channels == 1 {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(&raw, s.width as u32, s.height as u32, color)
        .map_err(|e| Error::Unsupported(format!("JPEG encoding failed: {e}")))?;
    let dec = image::load(Cursor::new(&buf), ImageFormat::Jpeg)
        .map_err(|e| Error::Unsupported(format!("JPEG decoding failed: {e}")))?;
    let back: Vec<u8> = if s.channels == 1 {
        dec.to_luma8().into_raw()
    } else {
        dec.to_rgb8().into_raw()
    };
    let mut out = vec![0f32; img.len()];
    for c in 0..s.channels {
        for p in 0..hw {
            out[c * hw + p] = back[p * s.channels + c] as f32 / 255.0;
        }
    }
    Ok(out)
}

/// Separable Gaussian blur (radius `ceil(3 sigma)`, border-renormalised).
pub(crate) fn gaussian_blur(img: &[f32], s: ImageShape, sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as isize;
    let taps: Vec<f32> = (-r..=r)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let (h, w, hw) = (s.height, s.width, s.pixels());
    let mut out = vec![0f32; img.len()];
    for c in 0..s.channels {
        let ch = &img[c * hw..(c + 1) * hw];
        let mut tmp = vec![0f32; hw];
        for y in 0..h {
            for x in 0..w {
                let (mut a, mut n) = (0.0, 0.0);
                for (k, t) in taps.iter().enumerate() {
                    let xx = x as isize + k as isize - r;
                    if xx >= 0 && (xx as usize) < w {
                        a += t * ch[y * w + xx as usize];
                        n += t;
                    }
                }
                tmp[y * w + x] = a / n;
            }
        }
        for y in 0..h {
            for x in 0..w {
                let (mut a, mut n) = (0.0, 0.0);
                for (k, t) in taps.iter().enumerate() {
                    let yy = y as isize + k as isize - r;
                    if yy >= 0 && (yy as usize) < h {
                        a += t * tmp[yy as usize * w + x];
                        n += t;
                    }
                }
                out[c * hw + y * w + x] = a / n;
            }
        }
    }
    out
}

/// 3x3 median filter (borders use the available neighbours).
pub(crate) fn median3(img: &[f32], s: ImageShape) -> Vec<f32> {
    let (h, w, hw) = (s.height, s.width, s.pixels());
    let mut out = vec![0f32; img.len()];
    let mut win = Vec::with_capacity(9);
    for c in 0..s.channels {
        for y in 0..h {
            for x in 0..w {
                win.clear();
                for dy in -1i32..=1 {
                    for dx in -1i32..=1 {
                        let (yy, xx) = (y as i32 + dy, x as i32 + dx);
                        if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                            win.push(img[c * hw + yy as usize * w + xx as usize]);
                        }
                    }
                }
                win.sort_by(f32::total_cmp);
                out[c * hw + y * w + x] = win[win.len() / 2];
            }
        }
    }
    out
}

/// Random crop after zero padding by `pad`, and a random horizontal flip,
/// in place on one image.
pub(crate) fn flip_crop(img: &mut [f32], s: ImageShape, pad: usize, rng: &mut StdRng) {
    let (h, w, hw) = (s.height, s.width, s.pixels());
    let dy = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let dx = rng.random_range(0..=2 * pad) as isize - pad as isize;
    let flip = rng.random_bool(0.5);
    let src = img.to_vec();
    for c in 0..s.channels {
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x } as isize + dx;
                let sy = y as isize + dy;
                img[c * hw + y * w + x] =
                    if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        src[c * hw + sy as usize * w + sx as usize]
                    } else {
                        0.0
                    };
            }
        }
    }
}

/// Zeroes a random `size`x`size` square (centre uniform over the image,
/// clipped at the border), in place.
pub(crate) fn cutout(img: &mut [f32], s: ImageShape, size: usize, rng: &mut StdRng) {
    let (h, w, hw) = (s.height, s.width, s.pixels());
    let cy = rng.random_range(0..h) as isize;
    let cx = rng.random_range(0..w) as isize;
    let half = size as isize / 2;
    for c in 0..s.channels {
        for y in (cy - half).max(0)..(cy - half + size as isize).min(h as isize) {
            for x in (cx - half).max(0)..(cx - half + size as isize).min(w as isize) {
                img[c * hw + y as usize * w + x as usize] = 0.0;
            }
        }
    }
}

/// A `Beta(a, a)` draw (via two Gamma draws, Marsaglia-Tsang).
pub(crate) fn beta(a: f32, rng: &mut StdRng) -> f32 {
    let x = gamma(a, rng);
    let y = gamma(a, rng);
    if x + y == 0.0 {
        0.5
    } else {
        x / (x + y)
    }
}

fn gamma(a: f32, rng: &mut StdRng) -> f32 {
    if a < 1.0 {
        let u: f32 = rng.random_range(1e-7f32..1.0);
        return gamma(a + 1.0, rng) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let u1: f32 = rng.random_range(1e-7f32..1.0);
        let u2: f32 = rng.random_range(0.0f32..1.0);
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f32 = rng.random_range(1e-7f32..1.0);
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

#[cfg(test)]
mod tests;
