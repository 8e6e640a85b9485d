//! Image-quality measures of a perturbation: PSNR, SSIM, L-inf, L2, L0.
//!
//! All on values in `[0, 1]` (peak 1). SSIM is Wang et al. (2004) with an
//! 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel and
//! averaged. Images smaller than the window (8x8 digits) are handled by
//! truncating the window at the border and renormalising its weights, so
//! every pixel gets a local estimate; on large images this differs from the
//! "valid" convention only in a border of 5 pixels. L0 counts pixel
//! locations where any channel moved by more than half an 8-bit level.

use serde::Serialize;

use crate::dataset::ImageShape;

/// Half an 8-bit step: smaller changes are rounding, not perturbation.
pub const L0_THRESHOLD: f32 = 0.5 / 255.0;

/// Quality of one protected image against its original.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ImageQuality {
    /// Peak signal-to-noise ratio in dB (`None` when identical).
    pub psnr_db: Option<f64>,
    /// Structural similarity (1 = identical).
    pub ssim: f64,
    /// Largest absolute change.
    pub linf: f64,
    /// Euclidean norm of the change.
    pub l2: f64,
    /// Fraction of pixel locations changed (see [`L0_THRESHOLD`]).
    pub l0_fraction: f64,
}

/// PSNR in dB of `b` against `a` with peak 1 (`None` when equal).
pub fn psnr(a: &[f32], b: &[f32]) -> Option<f64> {
    let mse = mse(a, b);
    if mse == 0.0 {
        None
    } else {
        Some(10.0 * (1.0 / mse).log10())
    }
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().max(1) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / n
}

/// The 11-tap Gaussian (sigma 1.5), unnormalised.
fn gaussian_taps() -> [f64; 11] {
    let mut t = [0f64; 11];
    for (i, v) in t.iter_mut().enumerate() {
        let d = i as f64 - 5.0;
        *v = (-d * d / (2.0 * 1.5 * 1.5)).exp();
    }
    t
}

/// Separable Gaussian filter with border-renormalised weights.
fn blur(img: &[f64], h: usize, w: usize, taps: &[f64; 11]) -> Vec<f64> {
    let mut tmp = vec![0f64; h * w];
    for y in 0..h {
        for x in 0..w {
            let (mut acc, mut norm) = (0.0, 0.0);
            for (k, t) in taps.iter().enumerate() {
                let xx = x as isize + k as isize - 5;
                if xx >= 0 && (xx as usize) < w {
                    acc += t * img[y * w + xx as usize];
                    norm += t;
                }
            }
            tmp[y * w + x] = acc / norm;
        }
    }
    let mut out = vec![0f64; h * w];
    for y in 0..h {
        for x in 0..w {
            let (mut acc, mut norm) = (0.0, 0.0);
            for (k, t) in taps.iter().enumerate() {
                let yy = y as isize + k as isize - 5;
                if yy >= 0 && (yy as usize) < h {
                    acc += t * tmp[yy as usize * w + x];
                    norm += t;
                }
            }
            out[y * w + x] = acc / norm;
        }
    }
    out
}

/// Mean SSIM of `b` against `a` (planar images of `shape`).
pub fn ssim(a: &[f32], b: &[f32], shape: ImageShape) -> f64 {
    let (h, w) = (shape.height, shape.width);
    let hw = h * w;
    let taps = gaussian_taps();
    let (c1, c2) = ((0.01f64).powi(2), (0.03f64).powi(2));
    let mut total = 0.0;
    for c in 0..shape.channels {
        let x: Vec<f64> = a[c * hw..(c + 1) * hw].iter().map(|&v| v as f64).collect();
        let y: Vec<f64> = b[c * hw..(c + 1) * hw].iter().map(|&v| v as f64).collect();
        let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
        let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
        let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
        let (mx, my) = (blur(&x, h, w, &taps), blur(&y, h, w, &taps));
        let (sxx, syy, sxy) = (
            blur(&xx, h, w, &taps),
            blur(&yy, h, w, &taps),
            blur(&xy, h, w, &taps),
        );
        let mut sum = 0.0;
        for i in 0..hw {
            let vx = (sxx[i] - mx[i] * mx[i]).max(0.0);
            let vy = (syy[i] - my[i] * my[i]).max(0.0);
            let cov = sxy[i] - mx[i] * my[i];
            sum += ((2.0 * mx[i] * my[i] + c1) * (2.0 * cov + c2))
                / ((mx[i] * mx[i] + my[i] * my[i] + c1) * (vx + vy + c2));
        }
        total += sum / hw as f64;
    }
    total / shape.channels as f64
}

/// All measures of `protected` against `clean` (one image, planar).
pub fn image_quality(clean: &[f32], protected: &[f32], shape: ImageShape) -> ImageQuality {
    let hw = shape.pixels();
    let mut changed = vec![false; hw];
    let mut linf = 0f32;
    let mut l2 = 0f64;
    for (i, (a, b)) in clean.iter().zip(protected).enumerate() {
        let d = (a - b).abs();
        linf = linf.max(d);
        l2 += (d as f64).powi(2);
        if d > L0_THRESHOLD {
            changed[i % hw] = true;
        }
    }
    ImageQuality {
        psnr_db: psnr(clean, protected),
        ssim: ssim(clean, protected, shape),
        linf: linf as f64,
        l2: l2.sqrt(),
        l0_fraction: changed.iter().filter(|&&c| c).count() as f64 / hw as f64,
    }
}

/// Aggregates of [`ImageQuality`] over a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualitySummary {
    /// Images compared.
    pub images: usize,
    /// Images left exactly unchanged (PSNR undefined; excluded from PSNR
    /// means and percentiles).
    pub unchanged: usize,
    /// Mean of per-image PSNR (dB).
    pub psnr_mean_db: Option<f64>,
    /// Smallest per-image PSNR (dB).
    pub psnr_min_db: Option<f64>,
    /// 5th percentile of per-image PSNR (dB).
    pub psnr_p05_db: Option<f64>,
    /// PSNR of the whole dataset (from the mean squared error over every
    /// value).
    pub psnr_dataset_db: Option<f64>,
    /// Mean SSIM.
    pub ssim_mean: f64,
    /// Smallest SSIM.
    pub ssim_min: f64,
    /// Largest L-inf over images.
    pub linf_max: f64,
    /// Mean L2 norm.
    pub l2_mean: f64,
    /// Mean fraction of changed pixel locations.
    pub l0_mean: f64,
    /// Largest fraction of changed pixel locations.
    pub l0_max: f64,
}

/// Per-image quality and its summary for two stacks of same-shaped images.
pub fn dataset_quality(
    clean: &[f32],
    protected: &[f32],
    shape: ImageShape,
) -> (Vec<ImageQuality>, QualitySummary) {
    let v = shape.values();
    let n = clean.len() / v.max(1);
    let per: Vec<ImageQuality> = (0..n)
        .map(|i| {
            image_quality(
                &clean[i * v..(i + 1) * v],
                &protected[i * v..(i + 1) * v],
                shape,
            )
        })
        .collect();
    let mut psnrs: Vec<f64> = per.iter().filter_map(|q| q.psnr_db).collect();
    psnrs.sort_by(f64::total_cmp);
    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let (s, c) = xs.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
        if c == 0 {
            0.0
        } else {
            s / c as f64
        }
    };
    let summary = QualitySummary {
        images: n,
        unchanged: n - psnrs.len(),
        psnr_mean_db: (!psnrs.is_empty()).then(|| psnrs.iter().sum::<f64>() / psnrs.len() as f64),
        psnr_min_db: psnrs.first().copied(),
        psnr_p05_db: (!psnrs.is_empty()).then(|| psnrs[(psnrs.len() - 1) * 5 / 100]),
        psnr_dataset_db: psnr(clean, protected),
        ssim_mean: mean(&mut per.iter().map(|q| q.ssim)),
        ssim_min: per.iter().map(|q| q.ssim).fold(f64::INFINITY, f64::min),
        linf_max: per.iter().map(|q| q.linf).fold(0.0, f64::max),
        l2_mean: mean(&mut per.iter().map(|q| q.l2)),
        l0_mean: mean(&mut per.iter().map(|q| q.l0_fraction)),
        l0_max: per.iter().map(|q| q.l0_fraction).fold(0.0, f64::max),
    };
    (per, summary)
}

#[cfg(test)]
mod tests;
