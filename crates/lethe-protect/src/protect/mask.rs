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
//! brighten scores `|g| * eps`. The top `k = floor(rho * H * W)` locations
//! of each image (ties broken by position, so masks are deterministic) form
//! the mask, shared by all channels.
//!
//! [`MaskStrategy::Grating`] is the model-free alternative: one periodic
//! texture per class (after the class-wise synthetic shortcuts of the
//! research notes, 2.3-2.5: OPS, AR and LSP need no surrogate either),
//! sparse by construction and readable by any convolution anywhere in the
//! image; error-minimising steps may then refine the noise on it.

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
    /// Model-free and fixed: one periodic pattern per class covering `1 / P`
    /// of the pixels, `P = round(1 / rho)` (at least 2): the sublattices of
    /// the pixel grid of index `P`, most spread-out first, then thick lines
    /// (see [`grating_codes`]). Each class gets a texture that a small
    /// convolution reads anywhere in the image, whatever the model's head,
    /// instead of a set of positions; on a black background the pattern is
    /// free of the image's own texture. A sample-wise method uses the
    /// image's label's pattern. With the `mask` synthetic start it is the
    /// whole noise ([`ProtectParams::lattice_code`](crate::ProtectParams::lattice_code)).
    Grating,
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

/// Number of mask locations for `rho` of `pixels`: the most that stay
/// within the fraction, `floor(rho * pixels)` (at least 1; a `rho` that
/// allows no location is refused before a run, see
/// [`check_mask_size`]).
pub fn mask_size(rho: f64, pixels: usize) -> usize {
    whole_pixels(rho, pixels).clamp(1, pixels)
}

/// `floor(rho * pixels)`, with a fraction that is a whole number of
/// pixels counted as one despite floating-point error.
fn whole_pixels(rho: f64, pixels: usize) -> usize {
    (rho * pixels as f64 + 1e-9).floor() as usize
}

/// Refuses a pixel fraction that allows no location of an image of
/// `pixels` locations.
pub fn check_mask_size(rho: f64, pixels: usize) -> crate::Result<()> {
    if whole_pixels(rho, pixels) == 0 {
        return Err(crate::Error::Config(format!(
            "rho {rho} allows no pixel of a {pixels}-pixel image: use rho >= 1/{pixels}"
        )));
    }
    Ok(())
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

/// One class's [`MaskStrategy::Grating`] pixels, a periodic pattern of
/// density `1 / period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GratingCode {
    /// The sublattice `{(x, y) : y = d*j, x = b*j (mod a)}` of the pixel
    /// grid, of index `a * d` (Hermite normal form, `0 <= b < a`).
    Lattice {
        /// Period along x within a row of the lattice.
        a: i64,
        /// Shift along x from one lattice row to the next.
        b: i64,
        /// Period along y between lattice rows.
        d: i64,
    },
    /// Lines `width` residues thick: `(nx*x + ny*y) mod (width * period)
    /// < width` (a union of `width` cosets, not a lattice).
    Lines {
        /// Normal of the lines, x component.
        nx: i64,
        /// Normal of the lines, y component.
        ny: i64,
        /// Line thickness.
        width: i64,
        /// Lines every `width * period` residues.
        period: i64,
    },
}

impl GratingCode {
    /// Whether pixel `(x, y)` carries the code.
    pub fn contains(&self, x: i64, y: i64) -> bool {
        match *self {
            GratingCode::Lattice { a, b, d } => {
                y.rem_euclid(d) == 0 && (x - b * y.div_euclid(d)).rem_euclid(a) == 0
            }
            GratingCode::Lines {
                nx,
                ny,
                width,
                period,
            } => (nx * x + ny * y).rem_euclid(width * period) < width,
        }
    }
}

/// The codes of `classes` classes at `period` (`>= 2`), one per class, no
/// two equal or translates of each other. First every sublattice of index
/// `period`, the most spread-out first (longest shortest vector, then the
/// most square: shortest second vector): at period 4 the 2x2 dot lattice, the two brick
/// lattices, the diagonals, then the rows and columns. High-frequency,
/// evenly spread codes are the ones least like image content. Past those
/// (`sigma(period)` of them, 7 at period 4), lines 2, 3, ... residues thick
/// at the matching period, one per direction distinct modulo `width *
/// period` (a translate of a lattice is a coset, which thick lines are not).
pub fn grating_codes(classes: usize, period: i64) -> Vec<GratingCode> {
    let period = period.max(2);
    let mut lattices = Vec::new();
    for a in (1..=period).filter(|a| period % a == 0) {
        let d = period / a;
        for b in 0..a {
            let (s1, s2) = reduced_lengths((a, 0), (b, d));
            lattices.push(((std::cmp::Reverse(s1), s2, a, b), d));
        }
    }
    lattices.sort();
    let mut codes: Vec<GratingCode> = lattices
        .into_iter()
        .map(|((_, _, a, b), d)| GratingCode::Lattice { a, b, d })
        .take(classes)
        .collect();
    let mut width = 2;
    while codes.len() < classes {
        let m = width * period;
        let mut keys = std::collections::BTreeSet::new();
        for n in 1..=m {
            for (nx, ny) in ring(n) {
                if codes.len() == classes {
                    break;
                }
                // The same line set modulo m: (nx, ny) up to a unit factor.
                let key = (1..m)
                    .filter(|&u| gcd(u, m) == 1)
                    .map(|u| ((u * nx).rem_euclid(m), (u * ny).rem_euclid(m)))
                    .min()
                    .unwrap_or((nx.rem_euclid(m), ny.rem_euclid(m)));
                if gcd(gcd(key.0, key.1), m) == 1 && keys.insert(key) {
                    codes.push(GratingCode::Lines {
                        nx,
                        ny,
                        width,
                        period,
                    });
                }
            }
        }
        width += 1;
    }
    codes
}

/// The primitive directions `(a, b)` with `max(|a|, |b|) == n`, `a >= 0`,
/// axis-aligned first, then diagonal.
fn ring(n: i64) -> Vec<(i64, i64)> {
    let mut ring = Vec::new();
    for a in 0..=n {
        for b in -n..=n {
            if a.max(b.abs()) == n && (a > 0 || b > 0) && gcd(a, b.abs()) == 1 {
                ring.push((a, b));
            }
        }
    }
    ring.sort_by_key(|&(a, b)| {
        let kind = match (a == 0 || b == 0, a == b.abs()) {
            (true, _) => 0,
            (false, true) => 1,
            _ => 2,
        };
        (kind, a, -b)
    });
    ring
}

/// Squared lengths of a Lagrange-reduced basis of the lattice spanned by
/// `u` and `v`: its shortest vector and the shortest one independent of it.
fn reduced_lengths(mut u: (i64, i64), mut v: (i64, i64)) -> (i64, i64) {
    let norm = |w: (i64, i64)| w.0 * w.0 + w.1 * w.1;
    loop {
        if norm(u) > norm(v) {
            std::mem::swap(&mut u, &mut v);
        }
        let dot = u.0 * v.0 + u.1 * v.1;
        // Reduced once |dot| <= |u|^2 / 2 (ties stop here: rounding a
        // half would swing v back and forth).
        if 2 * dot.abs() <= norm(u) {
            return (norm(u), norm(v));
        }
        let m = (dot as f64 / norm(u) as f64).round() as i64;
        v = (v.0 - m * u.0, v.1 - m * u.1);
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// The grating period for a pixel fraction `rho`: `round(1 / rho)`, at
/// least 2 (every pixel would be no code).
pub fn grating_period(rho: f64) -> i64 {
    ((1.0 / rho.max(1e-9)).round() as i64).clamp(2, 1 << 20)
}

/// Every class's [`MaskStrategy::Grating`] mask for a pixel fraction
/// `fraction`, one `H*W` mask per class, concatenated.
pub(crate) fn class_gratings(classes: usize, fraction: f64, s: ImageShape) -> Vec<u8> {
    let k = mask_size(fraction, s.pixels());
    grating_codes(classes, grating_period(fraction))
        .into_iter()
        .flat_map(|c| grating(c, s, k))
        .collect()
}

/// The [`MaskStrategy::Grating`] mask of one code ([`grating_codes`] at
/// [`grating_period`]), at most `k` pixels (row-major order past that).
pub(crate) fn grating(code: GratingCode, s: ImageShape, k: usize) -> Vec<u8> {
    let mut mask = vec![0u8; s.pixels()];
    let mut used = 0;
    for (q, m) in mask.iter_mut().enumerate() {
        let (y, x) = ((q / s.width) as i64, (q % s.width) as i64);
        if used < k && code.contains(x, y) {
            *m = 1;
            used += 1;
        }
    }
    mask
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
