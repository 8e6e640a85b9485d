//! Optimizers that honour per-parameter 0/1 masks exactly, a cosine
//! learning-rate schedule with linear warm-up, and global-norm gradient
//! clipping.
//!
//! Why not candle-nn's: its `SGD` has no momentum or weight decay, and its
//! `AdamW` decays every variable it holds, including ones whose gradient was
//! zeroed. SalUn trains only the "salient" weights (mask 1) and must leave
//! the rest *exactly* where they were; the official SalUn code let weight
//! decay and momentum move masked weights anyway. Here a masked coordinate
//! (mask 0) is copied from its old value with `where_cond`, and so are its
//! optimizer moments: it is bit-identical after any number of steps.
//!
//! A parameter without a gradient in the [`GradStore`] is skipped entirely
//! (no decay, no moment update, no step count), as in PyTorch when
//! `p.grad is None`.
//!
//! The API works on any set of [`Var`]s: a decoder's, a LoRA adapter's
//! VarMap, a CNN's. [`train_step`] runs backward, optional clipping and the
//! update.

use std::f64::consts::PI;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// An optimizer over a fixed list of Vars.
pub trait Optimizer {
    /// Applies one update from `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The current learning rate.
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate (for schedules).
    fn set_learning_rate(&mut self, lr: f64);
    /// The Vars it updates, in construction order.
    fn vars(&self) -> Vec<Var>;
    /// Restricts updates of `var` to the coordinates where `mask` is 1
    /// (`mask` has the Var's shape; any integer or float dtype with values
    /// 0/1). Coordinates where it is 0 never change again, through the
    /// gradient, weight decay or momentum.
    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()>;
    /// Removes the mask of `var` (all coordinates train again).
    fn clear_mask(&mut self, var: &Var) -> Result<()>;
}

/// One trained Var with its mask and optimizer state.
#[derive(Debug)]
struct Slot {
    var: Var,
    /// u8 0/1, the Var's shape.
    mask: Option<Tensor>,
    /// Adam first moment, or SGD momentum buffer.
    m: Option<Tensor>,
    /// Adam second moment.
    v: Option<Tensor>,
    steps: u64,
}

fn slots_from(vars: Vec<Var>) -> Result<Vec<Slot>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(vars.len());
    for var in vars {
        if !var.dtype().is_float() {
            return Err(Error::InvalidArgument(format!(
                "cannot optimise a {:?} variable",
                var.dtype()
            )));
        }
        if !seen.insert(var.id()) {
            return Err(Error::InvalidArgument("a variable is listed twice".into()));
        }
        out.push(Slot {
            var,
            mask: None,
            m: None,
            v: None,
            steps: 0,
        });
    }
    Ok(out)
}

fn find_slot<'a>(slots: &'a mut [Slot], var: &Var) -> Result<&'a mut Slot> {
    slots
        .iter_mut()
        .find(|s| s.var.id() == var.id())
        .ok_or_else(|| {
            Error::InvalidArgument("the variable is not one this optimizer trains".into())
        })
}

fn check_mask(var: &Var, mask: &Tensor) -> Result<Tensor> {
    if mask.dims() != var.dims() {
        return Err(Error::InvalidArgument(format!(
            "mask shape {:?} differs from the variable's {:?}",
            mask.dims(),
            var.dims()
        )));
    }
    let as_f = mask.to_dtype(DType::F32)?.flatten_all()?;
    let ones = as_f
        .eq(1f32)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    let zeros = as_f
        .eq(0f32)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    if (ones + zeros) as usize != as_f.elem_count() {
        return Err(Error::InvalidArgument(
            "a mask must hold only 0 and 1".into(),
        ));
    }
    Ok(mask.to_dtype(DType::U8)?.to_device(var.device())?)
}

/// Keeps `new` where the mask is 1 and `old` (bit for bit) where it is 0.
fn masked(mask: &Option<Tensor>, new: Tensor, old: &Tensor) -> Result<Tensor> {
    match mask {
        None => Ok(new),
        Some(m) => Ok(m.where_cond(&new, old)?),
    }
}

/// AdamW hyper-parameters (defaults are PyTorch's, weight decay 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (`p -= lr * wd * p`).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (Loshchilov & Hutter), PyTorch's update order, with masks.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer for `vars` (each at most once, float dtype).
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<AdamW> {
        validate_lr(config.lr)?;
        if !(0.0..1.0).contains(&config.beta1) || !(0.0..1.0).contains(&config.beta2) {
            return Err(Error::InvalidArgument(
                "AdamW betas must be in [0, 1)".into(),
            ));
        }
        if !nonneg(config.eps) || config.eps == 0.0 || !nonneg(config.weight_decay) {
            return Err(Error::InvalidArgument(
                "AdamW needs eps > 0 and weight_decay >= 0".into(),
            ));
        }
        Ok(AdamW {
            slots: slots_from(vars)?,
            config,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.config;
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.steps += 1;
            let t = slot.steps as i32;
            let p = slot.var.as_detached_tensor();
            let g = g.to_dtype(p.dtype())?;
            let m_old = match &slot.m {
                Some(m) => m.clone(),
                None => p.zeros_like()?,
            };
            let v_old = match &slot.v {
                Some(v) => v.clone(),
                None => p.zeros_like()?,
            };
            let m = ((&m_old * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&v_old * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            // p * (1 - lr wd) - lr * (m / bc1) / (sqrt(v / bc2) + eps)
            let denom = ((&v * (1.0 / bc2))?.sqrt()? + c.eps)?;
            let update = ((&m * (c.lr / bc1))? / denom)?;
            let decayed = if c.weight_decay > 0.0 {
                (&p * (1.0 - c.lr * c.weight_decay))?
            } else {
                p.clone()
            };
            let new_p = (decayed - update)?;
            let new_p = masked(&slot.mask, new_p, &p)?;
            slot.m = Some(masked(&slot.mask, m, &m_old)?);
            slot.v = Some(masked(&slot.mask, v, &v_old)?);
            slot.var.set(&new_p)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()> {
        let mask = check_mask(var, mask)?;
        find_slot(&mut self.slots, var)?.mask = Some(mask);
        Ok(())
    }

    fn clear_mask(&mut self, var: &Var) -> Result<()> {
        find_slot(&mut self.slots, var)?.mask = None;
        Ok(())
    }
}

/// SGD hyper-parameters (PyTorch semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum buffer.
    pub dampening: f64,
    /// L2 weight decay added to the gradient (`g += wd * p`).
    pub weight_decay: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
}

impl SgdConfig {
    /// SalUn's classifier setting: momentum 0.9, weight decay 5e-4.
    pub fn salun(lr: f64) -> SgdConfig {
        SgdConfig {
            lr,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-4,
            nesterov: false,
        }
    }
}

/// SGD with momentum, dampening, weight decay and Nesterov, with masks.
#[derive(Debug)]
pub struct Sgd {
    slots: Vec<Slot>,
    config: SgdConfig,
}

impl Sgd {
    /// An optimizer for `vars`.
    pub fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Sgd> {
        validate_lr(config.lr)?;
        if !nonneg(config.momentum) || !nonneg(config.weight_decay) || !nonneg(config.dampening) {
            return Err(Error::InvalidArgument(
                "SGD momentum, dampening and weight decay must be >= 0".into(),
            ));
        }
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::InvalidArgument(
                "Nesterov momentum requires momentum > 0 and zero dampening".into(),
            ));
        }
        Ok(Sgd {
            slots: slots_from(vars)?,
            config,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.config;
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.steps += 1;
            let p = slot.var.as_detached_tensor();
            let mut d = g.to_dtype(p.dtype())?;
            if c.weight_decay > 0.0 {
                d = (d + (&p * c.weight_decay)?)?;
            }
            if c.momentum > 0.0 {
                let buf = match &slot.m {
                    // PyTorch: the first buffer is the gradient itself.
                    None => d.clone(),
                    Some(old) => ((old * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                let buf = match &slot.m {
                    None => masked(&slot.mask, buf, &p.zeros_like()?)?,
                    Some(old) => masked(&slot.mask, buf, old)?,
                };
                d = if c.nesterov {
                    (d + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                slot.m = Some(buf);
            }
            let new_p = (&p - (d * c.lr)?)?;
            let new_p = masked(&slot.mask, new_p, &p)?;
            slot.var.set(&new_p)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    fn set_mask(&mut self, var: &Var, mask: &Tensor) -> Result<()> {
        let mask = check_mask(var, mask)?;
        find_slot(&mut self.slots, var)?.mask = Some(mask);
        Ok(())
    }

    fn clear_mask(&mut self, var: &Var) -> Result<()> {
        find_slot(&mut self.slots, var)?.mask = None;
        Ok(())
    }
}

/// Finite and `>= 0` (false for NaN).
fn nonneg(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn validate_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "learning rate must be finite and >= 0, got {lr}"
        )))
    }
}

/// Cosine decay with linear warm-up (HF `get_cosine_schedule_with_warmup`,
/// plus a floor):
///
/// * `step < warmup`: `peak * step / warmup`;
/// * `warmup <= step < total`: `min + (peak - min) * (1 + cos(pi * p)) / 2`
///   with `p = (step - warmup) / (total - warmup)`;
/// * `step >= total`: `min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    peak: f64,
    min: f64,
    warmup: u64,
    total: u64,
}

impl CosineSchedule {
    /// A schedule peaking at `peak` after `warmup` steps and reaching `min`
    /// at `total`. Needs `0 <= min <= peak` and `warmup <= total`, `total > 0`.
    pub fn new(peak: f64, min: f64, warmup: u64, total: u64) -> Result<CosineSchedule> {
        if !(peak.is_finite() && min.is_finite() && 0.0 <= min && min <= peak) {
            return Err(Error::InvalidArgument(format!(
                "cosine schedule needs 0 <= min ({min}) <= peak ({peak})"
            )));
        }
        if total == 0 || warmup > total {
            return Err(Error::InvalidArgument(format!(
                "cosine schedule needs 0 < total ({total}) and warmup ({warmup}) <= total"
            )));
        }
        Ok(CosineSchedule {
            peak,
            min,
            warmup,
            total,
        })
    }

    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup as f64;
        }
        if step >= self.total {
            return self.min;
        }
        let progress = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        self.min + (self.peak - self.min) * 0.5 * (1.0 + (PI * progress).cos())
    }
}

/// The L2 norm of all gradients of `vars` taken together (vars without a
/// gradient count as zero).
pub fn global_grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += f64::from(
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            );
        }
    }
    Ok(total.sqrt())
}

/// Scales the gradients of `vars` so that their global L2 norm is at most
/// `max_norm` (PyTorch `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`
/// when the norm exceeds it). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "max_norm must be positive, got {max_norm}"
        )));
    }
    let norm = global_grad_norm(grads, vars)?;
    if !norm.is_finite() {
        return Err(Error::InvalidArgument(format!("gradient norm is {norm}")));
    }
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * factor)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// What one [`train_step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The loss value.
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
}

/// Backward pass of the scalar `loss`, optional global-norm clipping of the
/// optimizer's Vars, one optimizer step.
pub fn train_step(
    optimizer: &mut dyn Optimizer,
    loss: &Tensor,
    max_grad_norm: Option<f64>,
) -> Result<StepReport> {
    if loss.elem_count() != 1 {
        return Err(Error::InvalidArgument(format!(
            "the loss must be a scalar, got shape {:?}",
            loss.dims()
        )));
    }
    let value = loss
        .to_dtype(DType::F32)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f32>()?;
    if !value.is_finite() {
        return Err(Error::InvalidArgument(format!("the loss is {value}")));
    }
    let mut grads = loss.backward()?;
    let vars = optimizer.vars();
    let grad_norm = match max_grad_norm {
        Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
        None => global_grad_norm(&grads, &vars)?,
    };
    optimizer.step(&grads)?;
    Ok(StepReport {
        loss: value,
        grad_norm,
        lr: optimizer.learning_rate(),
    })
}

#[cfg(test)]
mod tests;
