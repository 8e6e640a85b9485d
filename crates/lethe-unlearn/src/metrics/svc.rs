//! A C-support-vector classifier with an RBF kernel on one feature: the
//! attack model of SalUn's MIA-efficacy (`evaluation/SVC_MIA.py`:
//! `SVC(C=3, gamma="auto", kernel="rbf")` on the 1-D confidence, so
//! `gamma = 1 / n_features = 1`).
//!
//! Solved like libsvm (Chang & Lin; the solver scikit-learn wraps): the
//! dual `min 1/2 a^T Q a - e^T a` s.t. `0 <= a_i <= C`, `y^T a = 0`, with
//! `Q_ij = y_i y_j K(x_i, x_j)`, by SMO with second-order working-set
//! selection (Fan, Chen & Lin 2005, WSS 3) and libsvm's stopping tolerance
//! `1e-3`, without shrinking; the bias is libsvm's `rho`. The decision
//! function is `f(x) = sum_i y_i a_i K(x_i, x) - rho`, positive class iff
//! `f(x) > 0`.

use crate::{Error, Result};

/// libsvm's default stopping tolerance.
const EPS: f64 = 1e-3;
/// libsvm's `TAU` for non-positive-definite pairs.
const TAU: f64 = 1e-12;

/// A fitted RBF-kernel C-SVC on one feature (see the module docs).
///
/// Invariant: `support` and `coef` have the same length; `coef[i] = y_i
/// a_i` with `0 < a_i <= C`.
#[derive(Debug, Clone, PartialEq)]
pub struct RbfSvc {
    support: Vec<f64>,
    coef: Vec<f64>,
    rho: f64,
    gamma: f64,
    iterations: usize,
}

impl RbfSvc {
    /// Fits the classifier separating `positive` from `negative` (class
    /// weights 1, as scikit-learn's default) with penalty `c` and kernel
    /// `exp(-gamma (x - x')^2)`.
    pub fn fit(positive: &[f64], negative: &[f64], c: f64, gamma: f64) -> Result<RbfSvc> {
        if positive.is_empty() || negative.is_empty() {
            return Err(Error::InvalidData(
                "the SVC needs examples of both classes".into(),
            ));
        }
        if positive.iter().chain(negative).any(|x| !x.is_finite()) {
            return Err(Error::InvalidData("SVC features must be finite".into()));
        }
        if !(c.is_finite() && c > 0.0 && gamma.is_finite() && gamma > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "SVC needs C > 0 and gamma > 0, got C = {c}, gamma = {gamma}"
            )));
        }
        let x: Vec<f64> = positive.iter().chain(negative).copied().collect();
        let y: Vec<f64> = std::iter::repeat_n(1.0, positive.len())
            .chain(std::iter::repeat_n(-1.0, negative.len()))
            .collect();
        let n = x.len();
        let kernel = |a: f64, b: f64| (-gamma * (a - b) * (a - b)).exp();
        // Q_ij = y_i y_j K_ij, kept whole (n is a few thousand at most here).
        let mut q = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let v = y[i] * y[j] * kernel(x[i], x[j]);
                q[i * n + j] = v;
                q[j * n + i] = v;
            }
        }
        let mut alpha = vec![0f64; n];
        let mut grad = vec![-1f64; n];
        let max_iter = (100 * n).max(10_000_000 / n.max(1));
        let mut iter = 0;
        while iter < max_iter {
            // Working set selection (WSS 3).
            let mut gmax = f64::NEG_INFINITY;
            let mut i_sel = usize::MAX;
            for t in 0..n {
                let up = (y[t] > 0.0 && alpha[t] < c) || (y[t] < 0.0 && alpha[t] > 0.0);
                if up && -y[t] * grad[t] >= gmax {
                    gmax = -y[t] * grad[t];
                    i_sel = t;
                }
            }
            if i_sel == usize::MAX {
                break;
            }
            let i = i_sel;
            let mut gmin = f64::INFINITY;
            let mut j_sel = usize::MAX;
            let mut obj_min = f64::INFINITY;
            for t in 0..n {
                let low = (y[t] > 0.0 && alpha[t] > 0.0) || (y[t] < 0.0 && alpha[t] < c);
                if !low {
                    continue;
                }
                let v = -y[t] * grad[t];
                gmin = gmin.min(v);
                let b = gmax - v;
                if b > 0.0 {
                    let mut a = q[i * n + i] + q[t * n + t] - 2.0 * y[i] * y[t] * q[i * n + t];
                    if a <= 0.0 {
                        a = TAU;
                    }
                    let obj = -(b * b) / a;
                    if obj <= obj_min {
                        obj_min = obj;
                        j_sel = t;
                    }
                }
            }
            if gmax - gmin < EPS || j_sel == usize::MAX {
                break;
            }
            let j = j_sel;
            iter += 1;
            let (old_i, old_j) = (alpha[i], alpha[j]);
            if y[i] != y[j] {
                let mut quad = q[i * n + i] + q[j * n + j] + 2.0 * q[i * n + j];
                if quad <= 0.0 {
                    quad = TAU;
                }
                let delta = (-grad[i] - grad[j]) / quad;
                let diff = alpha[i] - alpha[j];
                alpha[i] += delta;
                alpha[j] += delta;
                if diff > 0.0 {
                    if alpha[j] < 0.0 {
                        alpha[j] = 0.0;
                        alpha[i] = diff;
                    }
                } else if alpha[i] < 0.0 {
                    alpha[i] = 0.0;
                    alpha[j] = -diff;
                }
                if diff > 0.0 {
                    if alpha[i] > c {
                        alpha[i] = c;
                        alpha[j] = c - diff;
                    }
                } else if alpha[j] > c {
                    alpha[j] = c;
                    alpha[i] = c + diff;
                }
            } else {
                let mut quad = q[i * n + i] + q[j * n + j] - 2.0 * q[i * n + j];
                if quad <= 0.0 {
                    quad = TAU;
                }
                let delta = (grad[i] - grad[j]) / quad;
                let sum = alpha[i] + alpha[j];
                alpha[i] -= delta;
                alpha[j] += delta;
                if sum > c {
                    if alpha[i] > c {
                        alpha[i] = c;
                        alpha[j] = sum - c;
                    }
                } else if alpha[j] < 0.0 {
                    alpha[j] = 0.0;
                    alpha[i] = sum;
                }
                if sum > c {
                    if alpha[j] > c {
                        alpha[j] = c;
                        alpha[i] = sum - c;
                    }
                } else if alpha[i] < 0.0 {
                    alpha[i] = 0.0;
                    alpha[j] = sum;
                }
            }
            let (di, dj) = (alpha[i] - old_i, alpha[j] - old_j);
            for t in 0..n {
                grad[t] += q[t * n + i] * di + q[t * n + j] * dj;
            }
        }
        if iter >= max_iter {
            tracing::warn!(iter, "SVC solver reached its iteration limit");
        }
        // rho as libsvm computes it.
        let (mut ub, mut lb) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut free, mut sum_free) = (0usize, 0f64);
        for t in 0..n {
            let yg = y[t] * grad[t];
            if alpha[t] >= c {
                if y[t] < 0.0 {
                    ub = ub.min(yg);
                } else {
                    lb = lb.max(yg);
                }
            } else if alpha[t] <= 0.0 {
                if y[t] > 0.0 {
                    ub = ub.min(yg);
                } else {
                    lb = lb.max(yg);
                }
            } else {
                free += 1;
                sum_free += yg;
            }
        }
        let rho = if free > 0 {
            sum_free / free as f64
        } else {
            (ub + lb) / 2.0
        };
        let (mut support, mut coef) = (Vec::new(), Vec::new());
        for t in 0..n {
            if alpha[t] > 0.0 {
                support.push(x[t]);
                coef.push(y[t] * alpha[t]);
            }
        }
        Ok(RbfSvc {
            support,
            coef,
            rho,
            gamma,
            iterations: iter,
        })
    }

    /// The decision function `sum_i y_i a_i K(x_i, x) - rho`.
    pub fn decision(&self, x: f64) -> f64 {
        self.support
            .iter()
            .zip(&self.coef)
            .map(|(s, c)| c * (-self.gamma * (s - x) * (s - x)).exp())
            .sum::<f64>()
            - self.rho
    }

    /// Whether `x` is classified as the positive class.
    pub fn predict(&self, x: f64) -> bool {
        self.decision(x) > 0.0
    }

    /// The support vectors' coefficients `y_i a_i`.
    pub fn dual_coef(&self) -> &[f64] {
        &self.coef
    }

    /// The support vectors.
    pub fn support_vectors(&self) -> &[f64] {
        &self.support
    }

    /// libsvm's `rho` (the decision function's offset).
    pub fn rho(&self) -> f64 {
        self.rho
    }

    /// SMO iterations the fit took.
    pub fn iterations(&self) -> usize {
        self.iterations
    }
}
