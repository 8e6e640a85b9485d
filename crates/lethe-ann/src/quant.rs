//! 8-bit scalar quantisation with a rigorous error bound, for an exact scan
//! that reads a quarter of the bytes.
//!
//! Each unit vector `x` is stored a second time as `x̃ = s_x · x_q` with
//! `x_q ∈ [-127, 127]^d` and a per-vector scale `s_x = max|x_i| / 127`,
//! together with `e_x = ‖x − x̃‖` and `n_x = ‖x̃‖` (both rounded up). For a
//! query quantised the same way,
//!
//! ```text
//! |q·x − q̃·x̃| ≤ ‖q‖·‖x − x̃‖ + ‖q − q̃‖·‖x̃‖ = e_x + e_q · n_x      (‖q‖ = 1)
//! ```
//!
//! by Cauchy–Schwarz, and `q̃·x̃ = s_q · s_x · (q_q · x_q)` is an exact integer
//! dot product times two scales. The exact route scans the `i8` rows, keeps
//! the k-th largest *lower* bound `T`, and re-scores with the `f32` kernel
//! only rows whose *upper* bound reaches `T` (plus a slack for floating-point
//! rounding). Any other row is provably below k rows that are each at least
//! `T`, so the result is identical to a full `f32` scan, ties included.

use zeroize::Zeroize;

/// Bytes per `i8` row for dimension `dim` (a multiple of 64).
pub(crate) fn i8_stride(dim: usize) -> usize {
    dim.div_ceil(64) * 64
}

/// Scale and error terms of one quantised vector.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct QMeta {
    /// `s`: the vector is approximated by `s · q`.
    pub(crate) scale: f32,
    /// Upper bound of `‖x − s·q‖`.
    pub(crate) err: f32,
    /// Upper bound of `‖s·q‖`.
    pub(crate) norm: f32,
}

impl Zeroize for QMeta {
    fn zeroize(&mut self) {
        self.scale.zeroize();
        self.err.zeroize();
        self.norm.zeroize();
    }
}

fn round_up(v: f64) -> f32 {
    (v * (1.0 + 1e-6) + 1e-12) as f32
}

/// Quantises `x` (any length up to `out.len()`) into `out`; the rest of
/// `out` is zeroed.
pub(crate) fn quantize(x: &[f32], out: &mut [i8]) -> QMeta {
    out.fill(0);
    let maxabs = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if maxabs == 0.0 {
        return QMeta::default();
    }
    let scale = maxabs / 127.0;
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (o, &v) in out.iter_mut().zip(x) {
        let q = (v / scale).round().clamp(-127.0, 127.0);
        *o = q as i8;
        let approx = scale as f64 * q as f64;
        err += (v as f64 - approx).powi(2);
        norm += approx * approx;
    }
    QMeta {
        scale,
        err: round_up(err.sqrt()),
        norm: round_up(norm.sqrt()),
    }
}

/// Absolute slack covering floating-point rounding of the `f32` kernel's
/// scores (at most `dim · 2^-23` for unit vectors), of the approximate
/// score, and of the query's norm.
pub(crate) fn slack(dim: usize) -> f32 {
    dim as f32 * 2.0f32.powi(-22) + 1e-5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_holds_for_random_unit_vectors() {
        let mut s = 12345u64;
        let mut next = || {
            s = crate::graph::splitmix(s);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for dim in [3usize, 64, 100, 384] {
            let stride = i8_stride(dim);
            for _ in 0..200 {
                let mut unit = |scale: f32| {
                    let mut v: Vec<f32> = (0..dim).map(|_| next() * scale).collect();
                    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    v.iter_mut().for_each(|x| *x /= n);
                    v
                };
                let (q, x) = (unit(1.0), unit(1.0));
                let (mut qq, mut xq) = (vec![0i8; stride], vec![0i8; stride]);
                let (mq, mx) = (quantize(&q, &mut qq), quantize(&x, &mut xq));
                let int: i32 = qq.iter().zip(&xq).map(|(&a, &b)| a as i32 * b as i32).sum();
                let approx = (mq.scale * mx.scale) * int as f32;
                let exact: f64 = q.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let bound = mx.err + mq.err * mx.norm + slack(dim);
                assert!((exact - approx as f64).abs() <= bound as f64, "dim {dim}");
                assert!(bound < 0.05, "bound {bound} too loose to be useful");
            }
        }
    }
}
