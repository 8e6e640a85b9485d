//! SalUn's weight-saliency mask (Fan et al., ICLR 2024, "SalUn: Empowering
//! Machine Unlearning via Gradient-based Weight Saliency"; official code
//! `OPTML-Group/Unlearn-Saliency`, `Classification/generate_mask.py`).
//!
//! The mask keeps trainable the weights whose forget-loss gradient is
//! largest in magnitude: `m = 1(|sum_batches grad l_f(theta_o)| >= gamma)`,
//! with `gamma` chosen so that the global top `keep_ratio` fraction of all
//! coordinates (pooled across every tensor) is kept; 0.5 is the paper's
//! default. `keep_ratio` is the fraction *updated*, as in the official
//! `with_{ratio}.pt` files. Ties at the threshold are broken by tensor name
//! then flat index, so exactly `floor(keep_ratio * N)` coordinates are kept
//! and the mask is deterministic.
//!
//! Training under the mask goes through `lethe_model::optim`'s masked
//! optimizers ([`SaliencyMask::apply`]): a coordinate with mask 0 is copied
//! from its old value after every step, moments included, so it stays
//! bit-identical to `theta_o` (the February 2026 fix of the official code,
//! PR #33, which let weight decay and momentum move masked weights).
//! [`SaliencyMask::count_changed_outside`] re-checks that bit for bit.

use candle_core::{DType, Tensor, Var};
use lethe_model::optim::Optimizer;
use serde::{Deserialize, Serialize};

use crate::hash::hash_tensors;
use crate::{Error, Result};

/// Sums, over calls to [`GradientAccumulator::add`], the gradients of a
/// list of named Vars (the per-batch mean gradients of SalUn's mask step).
#[derive(Debug)]
pub struct GradientAccumulator {
    vars: Vec<(String, Var)>,
    sums: Vec<Option<Tensor>>,
    batches: usize,
}

impl GradientAccumulator {
    /// An accumulator over `vars` (typically every trainable parameter).
    pub fn new(vars: Vec<(String, Var)>) -> GradientAccumulator {
        let n = vars.len();
        GradientAccumulator {
            vars,
            sums: vec![None; n],
            batches: 0,
        }
    }

    /// Back-propagates the scalar `loss` and adds each Var's gradient.
    pub fn add(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        for (slot, (_, var)) in self.sums.iter_mut().zip(&self.vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                *slot = Some(match slot.take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// Number of losses added.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// `|sum of gradients|` per Var (zeros for Vars that never got one).
    pub fn abs_scores(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.vars.len());
        for ((name, var), sum) in self.vars.iter().zip(&self.sums) {
            let s = match sum {
                Some(s) => s.abs()?,
                None => var.as_detached_tensor().zeros_like()?,
            };
            out.push((name.clone(), s));
        }
        Ok(out)
    }
}

/// What a receipt records about a mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskSummary {
    /// SHA-256 of the mask tensors (see [`crate::hash`]).
    pub sha256: String,
    /// Coordinates kept trainable.
    pub kept: usize,
    /// All coordinates.
    pub total: usize,
    /// The requested fraction.
    pub keep_ratio: f64,
}

/// A global top-fraction 0/1 mask over named tensors.
///
/// Invariant: `masks` is sorted by name, each mask is u8 with values 0/1,
/// and exactly `kept` ones are set in total.
#[derive(Debug, Clone)]
pub struct SaliencyMask {
    masks: Vec<(String, Tensor)>,
    kept: usize,
    total: usize,
    keep_ratio: f64,
}

impl SaliencyMask {
    /// Keeps the `floor(keep_ratio * N)` coordinates with the largest
    /// `scores` (pooled over all tensors). `keep_ratio` is in `(0, 1]`.
    pub fn from_scores(scores: &[(String, Tensor)], keep_ratio: f64) -> Result<SaliencyMask> {
        if !(keep_ratio > 0.0 && keep_ratio <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "keep_ratio must be in (0, 1], got {keep_ratio}"
            )));
        }
        if scores.is_empty() {
            return Err(Error::InvalidData("no tensors to build a mask over".into()));
        }
        let mut sorted: Vec<&(String, Tensor)> = scores.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for w in sorted.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(Error::InvalidData(format!(
                    "tensor {} is listed twice",
                    w[0].0
                )));
            }
        }
        let values: Vec<Vec<f32>> = sorted
            .iter()
            .map(|(_, t)| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let total: usize = values.iter().map(Vec::len).sum();
        let keep = (keep_ratio * total as f64).floor() as usize;
        if keep == 0 {
            return Err(Error::InvalidConfig(format!(
                "keep_ratio {keep_ratio} keeps no coordinate of {total}"
            )));
        }
        if values.iter().flatten().any(|v| v.is_nan()) {
            return Err(Error::InvalidData("saliency scores contain NaN".into()));
        }
        let threshold = if keep == total {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = values.iter().flatten().copied().collect();
            let (_, kth, _) = all.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a));
            *kth
        };
        let above = values.iter().flatten().filter(|&&v| v > threshold).count();
        let mut ties_left = keep - above;
        let mut masks = Vec::with_capacity(sorted.len());
        for ((name, t), vals) in sorted.iter().zip(&values) {
            let mut m = vec![0u8; vals.len()];
            for (i, &v) in vals.iter().enumerate() {
                if v > threshold {
                    m[i] = 1;
                } else if v == threshold && ties_left > 0 {
                    m[i] = 1;
                    ties_left -= 1;
                }
            }
            masks.push((name.clone(), Tensor::from_vec(m, t.dims(), t.device())?));
        }
        Ok(SaliencyMask {
            masks,
            kept: keep,
            total,
            keep_ratio,
        })
    }

    /// Number of coordinates kept trainable.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// Number of coordinates.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The requested fraction.
    pub fn keep_ratio(&self) -> f64 {
        self.keep_ratio
    }

    /// The u8 0/1 mask of each tensor, sorted by name.
    pub fn masks(&self) -> &[(String, Tensor)] {
        &self.masks
    }

    /// The mask of one tensor.
    pub fn mask(&self, name: &str) -> Option<&Tensor> {
        self.masks.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    /// SHA-256 of the mask.
    pub fn sha256(&self) -> Result<String> {
        hash_tensors(&self.masks)
    }

    /// Hash and counts for a receipt.
    pub fn summary(&self) -> Result<MaskSummary> {
        Ok(MaskSummary {
            sha256: self.sha256()?,
            kept: self.kept,
            total: self.total,
            keep_ratio: self.keep_ratio,
        })
    }

    /// Restricts `optimizer`'s updates of each named Var to its mask. Every
    /// Var must have a mask of its shape.
    pub fn apply(&self, optimizer: &mut dyn Optimizer, vars: &[(String, Var)]) -> Result<()> {
        for (name, var) in vars {
            let mask = self.mask(name).ok_or_else(|| {
                Error::InvalidData(format!("the saliency mask has no entry for {name}"))
            })?;
            optimizer.set_mask(var, mask)?;
        }
        Ok(())
    }

    /// Number of coordinates outside the mask (mask 0) whose current value
    /// differs bit for bit from `before` (a snapshot taken when training
    /// started). 0 is SalUn's guarantee.
    pub fn count_changed_outside(
        &self,
        before: &[(String, Tensor)],
        vars: &[(String, Var)],
    ) -> Result<usize> {
        let mut changed = 0usize;
        for (name, var) in vars {
            let Some(mask) = self.mask(name) else {
                continue;
            };
            let old = before
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::InvalidData(format!("no snapshot of {name}")))?;
            let m = mask.flatten_all()?.to_vec1::<u8>()?;
            let a = old.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let b = var
                .as_detached_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            changed += m
                .iter()
                .zip(a.iter().zip(&b))
                .filter(|(&mi, (x, y))| mi == 0 && x.to_bits() != y.to_bits())
                .count();
        }
        Ok(changed)
    }
}

/// Deep copies of the current values of named Vars (a `theta_o` snapshot).
pub fn snapshot(vars: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().copy()?)))
        .collect()
}

#[cfg(test)]
mod tests;
