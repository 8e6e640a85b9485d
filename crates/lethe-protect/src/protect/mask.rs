//! Choosing the pixels SALM may perturb.
//!
//! SALM (Sun et al. 2024) perturbs only "significant pixel regions". The
//! paper's equations are not public; this is the reconstruction in
//! `shared/research/protection-salm.md` section 7, with the fix its failed
//! mini-replication called for. A naive ranking by gradient magnitude picks
//! black background pixels whose descent step points *below zero*: the box
//! constraint clips the step away and the "perturbation" is empty. So the
//! default score ([`MaskStrategy::Feasible`]) is the first-order loss
//! decrease a pixel can actually deliver inside the box and the budget:
//!
//! `score(p) = sum_c |g_c(p)| * room_c(p)`, with `room = min(eps, x)` when
//! the descent direction darkens (`g > 0`) and `min(eps, 1 - x)` when it
//! brightens.
//!
//! A black pixel that must darken scores 0; a black pixel that should
//! brighten scores `|g| * eps`. The top `k = round(rho * H * W)` locations
//! of each image (ties broken by position, so masks are deterministic) form
//! the mask, shared by all channels.

use serde::{Deserialize, Serialize};

use crate::dataset::ImageShape;

/// How mask pixels are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskStrategy {
    /// Feasibility-aware saliency (the default; see the module docs).
    Feasible,
    /// Model-free: the image's own foreground (locally averaged distance
    /// from the image's median value), fixed once.
    Foreground,
    /// Feasibility-aware saliency weighted towards the foreground
    /// (`score * (0.05 + foreground / max foreground)`).
    GradForeground,
    /// Raw gradient magnitude `sum_c |g_c|` (the naive ranking the
    /// research notes found ineffective; kept for ablations).
    Gradient,
    /// Uniformly random locations, fixed once (ablation baseline).
    Random,
}

impl MaskStrategy {
    /// Whether scores need the surrogate's input gradient.
    pub fn needs_gradient(self) -> bool {
        matches!(
            self,
            MaskStrategy::Feasible | MaskStrategy::GradForeground | MaskStrategy::Gradient
        )
    }
}

/// When masks are recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskRefresh {
    /// Once, at the first noise step (model-free strategies: before any).
    Fixed,
    /// At the first noise step of every round; noise on pixels that leave
    /// the mask is dropped.
    PerRound,
    /// At every noise step (sample-wise only; class-wise treats it as
    /// per round).
    PerStep,
}

/// Number of mask locations for `rho` of `pixels` (at least 1).
pub fn mask_size(rho: f64, pixels: usize) -> usize {
    ((rho * pixels as f64).round() as usize).clamp(1, pixels)
}

/// Per-location foreground strength of one planar image: the distance of
/// each value from the image's per-channel median, summed over channels and
/// averaged over a 3x3 neighbourhood.
pub(crate) fn foreground(x: &[f32], s: ImageShape) -> Vec<f32> {
    let hw = s.pixels();
    let mut dist = vec![0f32; hw];
    for c in 0..s.channels {
        let ch = &x[c * hw..(c + 1) * hw];
        let mut sorted = ch.to_vec();
        sorted.sort_by(f32::total_cmp);
        let median = sorted[hw / 2];
        for (d, v) in dist.iter_mut().zip(ch) {
            *d += (v - median).abs();
        }
    }
    let mut out = vec![0f32; hw];
    for y in 0..s.height {
        for x0 in 0..s.width {
            let (mut acc, mut k) = (0f32, 0f32);
            for dy in -1i32..=1 {
                for dx in -1i32..=1 {
                    let (yy, xx) = (y as i32 + dy, x0 as i32 + dx);
                    if yy >= 0 && xx >= 0 && (yy as usize) < s.height && (xx as usize) < s.width {
                        acc += dist[yy as usize * s.width + xx as usize];
                        k += 1.0;
                    }
                }
            }
            out[y * s.width + x0] = acc / k;
        }
    }
    out
}

/// Feasibility-aware saliency of one image (see the module docs).
pub(crate) fn feasible_saliency(x: &[f32], g: &[f32], s: ImageShape, eps: f32) -> Vec<f32> {
    let hw = s.pixels();
    let mut out = vec![0f32; hw];
    for c in 0..s.channels {
        for p in 0..hw {
            let (xv, gv) = (x[c * hw + p], g[c * hw + p]);
            let room = if gv > 0.0 {
                eps.min(xv)
            } else {
                eps.min(1.0 - xv)
            };
            out[p] += gv.abs() * room.max(0.0);
        }
    }
    out
}

/// Scores of one image for a gradient-based strategy.
pub(crate) fn gradient_scores(
    strategy: MaskStrategy,
    x: &[f32],
    g: &[f32],
    s: ImageShape,
    eps: f32,
) -> Vec<f32> {
    match strategy {
        MaskStrategy::Gradient => {
            let hw = s.pixels();
            let mut out = vec![0f32; hw];
            for c in 0..s.channels {
                for p in 0..hw {
                    out[p] += g[c * hw + p].abs();
                }
            }
            out
        }
        MaskStrategy::GradForeground => {
            let sal = feasible_saliency(x, g, s, eps);
            let fg = foreground(x, s);
            let max = fg.iter().copied().fold(0f32, f32::max).max(1e-12);
            sal.iter()
                .zip(&fg)
                .map(|(a, f)| a * (0.05 + f / max))
                .collect()
        }
        _ => feasible_saliency(x, g, s, eps),
    }
}

/// A 0/1 mask of the `k` highest scores (ties: lower index first).
pub(crate) fn top_k(scores: &[f32], k: usize) -> Vec<u8> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(scores.len());
    let cmp = |a: &usize, b: &usize| {
        let (sa, sb) = (clean(scores[*a]), clean(scores[*b]));
        sb.total_cmp(&sa).then(a.cmp(b))
    };
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    let mut mask = vec![0u8; scores.len()];
    for &i in &idx[..k] {
        mask[i] = 1;
    }
    mask
}

fn clean(v: f32) -> f32 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}
