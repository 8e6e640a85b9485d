//! Classifier unlearning: the [`ClassifierMethod`] trait, training and
//! evaluation helpers, and the methods (one module each): SalUn with random
//! labels ([`salun`]), gradient ascent ([`ga`]), fine-tuning on the retain
//! set ([`finetune`]) and Retrain-from-scratch ([`retrain`]), the exact
//! reference every other method is compared with.
//!
//! Methods change the model in place (copy it first with
//! [`clone_classifier`]) and return an [`UnlearnReport`] with the weight
//! hashes (every tensor of the model's VarMap, batch-norm running
//! statistics included), the mask for SalUn, and forget/retain accuracy
//! before and after.
//!
//! [`evaluate`] computes SalUn's metric suite (UA, RA, TA, MIA-efficacy; see
//! [`crate::metrics`]) for a model and its splits.

pub mod finetune;
pub mod ga;
pub mod retrain;
pub mod salun;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use lethe_model::nn::{self, Mode};
use lethe_model::optim::{self, CosineSchedule, Optimizer, Sgd, SgdConfig};
use lethe_model::vision::{ImageClassifier, ResNet18, SmallCnn, VisionConfig};
use serde::{Deserialize, Serialize};

use crate::data::{shuffled, ImageSet};
use crate::error::ensure_config;
use crate::hash::hash_varmap;
use crate::metrics::{mia_confidence, SalunMetrics, SvcMiaAttack};
use crate::report::UnlearnReport;
use crate::{Error, Result};

/// Plain supervised training with SGD (momentum, weight decay), used for
/// the original model and for Retrain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierTrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Cosine decay of the learning rate to 0 over the run.
    #[serde(default)]
    pub cosine: bool,
    /// Seed of the batch order.
    #[serde(default)]
    pub seed: u64,
}

impl ClassifierTrainConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        validate_sgd_run(
            self.epochs,
            self.batch_size,
            self.lr,
            self.momentum,
            self.weight_decay,
        )
    }
}

/// Checks the ranges of an SGD run: epochs and batch size positive, then
/// [`validate_sgd`].
pub(crate) fn validate_sgd_run(
    epochs: usize,
    batch_size: usize,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<()> {
    ensure_config(epochs > 0, || "epochs must be > 0".into())?;
    ensure_config(batch_size > 0, || "batch_size must be > 0".into())?;
    validate_sgd(lr, momentum, weight_decay)
}

/// An unlearning baseline that is plain SGD over one set: fine-tuning on
/// the retain set (`sign` 1) or gradient ascent on the forget set (`sign`
/// -1). Returns the steps taken.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_epochs(
    model: &dyn ImageClassifier,
    set: &ImageSet,
    sign: f64,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    seed: u64,
) -> Result<usize> {
    let mut opt = sgd_for(model, lr, momentum, weight_decay)?;
    let mut steps = 0;
    for epoch in 0..epochs {
        let seed = seed.wrapping_mul(7919).wrapping_add(epoch as u64);
        steps += sgd_pass(model, &mut opt, set, batch_size, seed, sign, None)?.0;
    }
    Ok(steps)
}

pub(crate) fn validate_sgd(lr: f64, momentum: f64, weight_decay: f64) -> Result<()> {
    ensure_config(lr.is_finite() && lr > 0.0, || {
        format!("lr must be finite and > 0, got {lr}")
    })?;
    ensure_config((0.0..1.0).contains(&momentum), || {
        format!("momentum must be in [0, 1), got {momentum}")
    })?;
    ensure_config(weight_decay.is_finite() && weight_decay >= 0.0, || {
        format!("weight_decay must be >= 0, got {weight_decay}")
    })
}

/// A classifier unlearning method.
pub trait ClassifierMethod {
    /// Method id in reports.
    fn name(&self) -> &'static str;
    /// Checks the configuration.
    fn validate(&self) -> Result<()>;
    /// Every hyper-parameter as JSON.
    fn hyperparameters(&self) -> serde_json::Value;
    /// Unlearns `forget` from `model` in place; `retain` is the rest of the
    /// training data.
    fn unlearn(
        &self,
        model: &dyn ImageClassifier,
        forget: &ImageSet,
        retain: &ImageSet,
    ) -> Result<UnlearnReport>;
}

/// Any classifier method, by name (`method = "salun"` plus its fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum ClassifierMethodConfig {
    /// SalUn with random labels (`keep_ratio = 1` is plain RL).
    Salun(salun::SalunRlConfig),
    /// Gradient ascent on the forget set.
    Ga(ga::GaClassifierConfig),
    /// Fine-tuning on the retain set.
    Finetune(finetune::FinetuneConfig),
    /// Retrain from scratch on the retain set.
    Retrain(retrain::RetrainConfig),
}

impl ClassifierMethodConfig {
    /// The method.
    pub fn method(&self) -> &dyn ClassifierMethod {
        match self {
            ClassifierMethodConfig::Salun(c) => c,
            ClassifierMethodConfig::Ga(c) => c,
            ClassifierMethodConfig::Finetune(c) => c,
            ClassifierMethodConfig::Retrain(c) => c,
        }
    }
}

/// A randomly initialised classifier of `config`, deterministic per seed.
pub fn new_classifier(
    config: &VisionConfig,
    device: &Device,
    seed: u64,
) -> Result<Box<dyn ImageClassifier>> {
    Ok(match config {
        VisionConfig::Cnn(c) => Box::new(SmallCnn::new(c.clone(), device, seed)?),
        VisionConfig::Resnet18(c) => Box::new(ResNet18::new(c.clone(), device, seed)?),
    })
}

/// The device a classifier's weights live on.
pub fn classifier_device(model: &dyn ImageClassifier) -> Device {
    model
        .named_trainable_vars()
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu)
}

/// Copies every tensor of `from` (running statistics included) into `to`,
/// which must have the same architecture.
pub fn copy_weights(from: &dyn ImageClassifier, to: &dyn ImageClassifier) -> Result<()> {
    if from.config() != to.config() {
        return Err(Error::InvalidData(
            "cannot copy weights between different architectures".into(),
        ));
    }
    let src = from
        .varmap()
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dst = to.varmap().data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in dst.iter() {
        let s = src
            .get(name)
            .ok_or_else(|| Error::InvalidData(format!("source model has no tensor {name}")))?;
        var.set(&s.as_detached_tensor().copy()?)?;
    }
    Ok(())
}

/// A deep copy of a classifier.
pub fn clone_classifier(model: &dyn ImageClassifier) -> Result<Box<dyn ImageClassifier>> {
    let copy = new_classifier(model.config(), &classifier_device(model), 0)?;
    copy_weights(model, copy.as_ref())?;
    Ok(copy)
}

/// SHA-256 of every tensor of a classifier.
pub fn classifier_hash(model: &dyn ImageClassifier) -> Result<String> {
    hash_varmap(model.varmap())
}

/// Checks that images fit the model.
pub(crate) fn check_images(model: &dyn ImageClassifier, set: &ImageSet, what: &str) -> Result<()> {
    if set.is_empty() {
        return Err(Error::InvalidData(format!("the {what} set is empty")));
    }
    let classes = num_classes(model);
    if set.num_classes() > classes {
        return Err(Error::InvalidData(format!(
            "the {what} set has label {} but the model has {classes} classes",
            set.num_classes() - 1
        )));
    }
    Ok(())
}

/// Number of output classes.
pub fn num_classes(model: &dyn ImageClassifier) -> usize {
    match model.config() {
        VisionConfig::Cnn(c) => c.num_classes,
        VisionConfig::Resnet18(c) => c.num_classes,
    }
}

/// Logits (Eval mode) for every image, in order.
///
/// Runs without tracking weight gradients and leaves the model trainable
/// afterwards (`ImageClassifier` has no getter for the flag).
pub fn predict_logits(
    model: &dyn ImageClassifier,
    set: &ImageSet,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let device = classifier_device(model);
    model.set_trainable(false);
    let result = (|| -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(set.len());
        let idx: Vec<usize> = (0..set.len()).collect();
        for chunk in idx.chunks(batch_size.max(1)) {
            let (x, _) = set.batch(chunk, &device)?;
            let logits = model.forward(&x, Mode::Eval)?;
            out.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok(out)
    })();
    model.set_trainable(true);
    result
}

/// Class probabilities (Eval mode) for every image, in order.
pub fn predict_probs(
    model: &dyn ImageClassifier,
    set: &ImageSet,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    Ok(predict_logits(model, set, batch_size)?
        .into_iter()
        .map(|z| {
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        })
        .collect())
}

/// Accuracy (0..1) of `model` on `set`.
pub fn accuracy(model: &dyn ImageClassifier, set: &ImageSet, batch_size: usize) -> Result<f64> {
    if set.is_empty() {
        return Err(Error::InvalidData("accuracy of an empty set".into()));
    }
    let probs = predict_probs(model, set, batch_size)?;
    let hits = probs
        .iter()
        .zip(set.labels())
        .filter(|(p, &l)| argmax(p) == l as usize)
        .count();
    Ok(hits as f64 / set.len() as f64)
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// SalUn's metrics of `model`: UA on `forget`, RA on `retain`, TA on
/// `test`, and MIA-efficacy on `forget` with SalUn's attack
/// ([`SvcMiaAttack`]: RBF SVC on the confidence `p(y | x)`) trained on
/// `|test|` retain images (chosen with `seed`) as members against `test` as
/// non-members. Percentage points.
pub fn evaluate(
    model: &dyn ImageClassifier,
    forget: &ImageSet,
    retain: &ImageSet,
    test: &ImageSet,
    seed: u64,
) -> Result<SalunMetrics> {
    let bs = 256;
    let features = |set: &ImageSet| -> Result<Vec<f64>> {
        predict_logits(model, set, bs)?
            .iter()
            .zip(set.labels())
            .map(|(z, &l)| mia_confidence(z, l))
            .collect()
    };
    let members_idx: Vec<usize> = shuffled(retain.len(), seed)
        .into_iter()
        .take(test.len())
        .collect();
    let members = features(&retain.subset(&members_idx)?)?;
    let nonmembers = features(test)?;
    let attack = SvcMiaAttack::fit(&members, &nonmembers)?;
    let mia = attack.efficacy(&features(forget)?);
    Ok(SalunMetrics {
        ua: 100.0 * (1.0 - accuracy(model, forget, bs)?),
        ra: 100.0 * accuracy(model, retain, bs)?,
        ta: 100.0 * accuracy(model, test, bs)?,
        mia,
    })
}

/// One shuffled pass of SGD over `set` minimising `sign * CE` (sign -1 is
/// gradient ascent). Returns (steps, mean loss).
pub(crate) fn sgd_pass(
    model: &dyn ImageClassifier,
    opt: &mut dyn Optimizer,
    set: &ImageSet,
    batch_size: usize,
    seed: u64,
    sign: f64,
    schedule: Option<(&CosineSchedule, &mut u64)>,
) -> Result<(usize, f64)> {
    let device = classifier_device(model);
    let order = shuffled(set.len(), seed);
    let mut steps = 0usize;
    let mut total = 0f64;
    let mut schedule = schedule;
    for chunk in order.chunks(batch_size) {
        if let Some((s, step)) = schedule.as_mut() {
            opt.set_learning_rate(s.lr_at(**step));
            **step += 1;
        }
        let (x, y) = set.batch(chunk, &device)?;
        let logits = model.forward(&x, Mode::Train)?;
        let loss = (nn::cross_entropy(&logits, &y, None)? * sign)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Diverged(format!("classifier loss {value}")));
        }
        optim::train_step(opt, &loss, None)?;
        total += f64::from(value);
        steps += 1;
    }
    Ok((steps, total / steps.max(1) as f64))
}

/// Trains `model` on `data` from its current weights.
pub fn train_classifier(
    model: &dyn ImageClassifier,
    data: &ImageSet,
    cfg: &ClassifierTrainConfig,
) -> Result<usize> {
    cfg.validate()?;
    check_images(model, data, "training")?;
    let mut opt = Sgd::new(
        model.trainable_vars(),
        SgdConfig {
            lr: cfg.lr,
            momentum: cfg.momentum,
            dampening: 0.0,
            weight_decay: cfg.weight_decay,
            nesterov: false,
        },
    )?;
    let per_epoch = data.len().div_ceil(cfg.batch_size) as u64;
    let total = per_epoch * cfg.epochs as u64;
    let schedule = if cfg.cosine {
        Some(CosineSchedule::new(cfg.lr, 0.0, 0, total)?)
    } else {
        None
    };
    let mut step = 0u64;
    let mut steps = 0usize;
    for epoch in 0..cfg.epochs {
        let _span = tracing::debug_span!("train_epoch", epoch).entered();
        let (s, loss) = sgd_pass(
            model,
            &mut opt,
            data,
            cfg.batch_size,
            cfg.seed.wrapping_mul(1000).wrapping_add(epoch as u64),
            1.0,
            schedule.as_ref().map(|s| (s, &mut step)),
        )?;
        steps += s;
        tracing::debug!(epoch, loss, "classifier epoch");
    }
    Ok(steps)
}

/// The frame every weight-changing classifier method shares: validate,
/// check the sets, hash and measure before, run `train` (which returns the
/// steps taken), hash and measure after, and report.
pub(crate) fn run_method(
    method: &dyn ClassifierMethod,
    model: &dyn ImageClassifier,
    forget: &ImageSet,
    retain: &ImageSet,
    train: impl FnOnce() -> Result<usize>,
) -> Result<UnlearnReport> {
    let started = std::time::Instant::now();
    method.validate()?;
    check_images(model, forget, "forget")?;
    check_images(model, retain, "retain")?;
    let weights_before = classifier_hash(model)?;
    let mut metrics = BTreeMap::new();
    measure(model, "before", forget, retain, &mut metrics)?;
    let steps = train()?;
    measure(model, "after", forget, retain, &mut metrics)?;
    Ok(UnlearnReport {
        method: method.name().into(),
        hyperparameters: method.hyperparameters(),
        weights_before,
        weights_after: classifier_hash(model)?,
        mask: None,
        adapter: None,
        detector_sha256: None,
        suppression_only: false,
        forget_examples: forget.len(),
        retain_examples: retain.len(),
        steps,
        seconds: started.elapsed().as_secs_f64(),
        metrics,
    })
}

/// Forget/retain accuracy of `model`, for reports.
pub(crate) fn measure(
    model: &dyn ImageClassifier,
    prefix: &str,
    forget: &ImageSet,
    retain: &ImageSet,
    metrics: &mut BTreeMap<String, f64>,
) -> Result<()> {
    metrics.insert(
        format!("forget_acc_{prefix}"),
        accuracy(model, forget, 256)?,
    );
    metrics.insert(
        format!("retain_acc_{prefix}"),
        accuracy(model, retain, 256)?,
    );
    Ok(())
}

/// An SGD optimiser over every trainable weight.
pub(crate) fn sgd_for(
    model: &dyn ImageClassifier,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<Sgd> {
    Ok(Sgd::new(
        model.trainable_vars(),
        SgdConfig {
            lr,
            momentum,
            dampening: 0.0,
            weight_decay,
            nesterov: false,
        },
    )?)
}

#[cfg(test)]
mod tests;
