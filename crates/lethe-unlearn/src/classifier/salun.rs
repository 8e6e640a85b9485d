//! SalUn for classifiers: saliency mask + random-label unlearning (Fan et
//! al., ICLR 2024; official `Classification/generate_mask.py` and
//! `unlearn/RL.py`).
//!
//! 1. Mask: in Eval mode (batch-norm running statistics), the per-batch
//!    mean gradients of `-CE(model(x), y)` over the forget set are summed;
//!    the global top `keep_ratio` of `|g|` over every trainable tensor is
//!    trainable ([`crate::saliency`]).
//! 2. For each epoch: one shuffled pass over the forget set with fresh
//!    random labels (uniform over the other classes, as the paper writes;
//!    `exclude_true_label = false` allows the true one, as the official
//!    code does), then one pass over the retain set with true labels (the
//!    official CIFAR-10 order), or with `mixed` one shuffled pass over both
//!    together (the official CIFAR-100 / TinyImageNet order). SGD with
//!    momentum and weight decay, every step confined to the mask with
//!    masked coordinates and their momentum restored exactly.
//!
//! `keep_ratio = 1` is the unmasked random-label baseline ("RL").

use std::collections::BTreeMap;
use std::time::Instant;

use lethe_model::nn::{self, Mode};
use lethe_model::vision::ImageClassifier;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::classifier::{
    check_images, classifier_device, classifier_hash, measure, num_classes, sgd_for, sgd_pass,
    validate_sgd, ClassifierMethod,
};
use crate::data::ImageSet;
use crate::error::ensure_config;
use crate::report::UnlearnReport;
use crate::saliency::{snapshot, GradientAccumulator, SaliencyMask};
use crate::{Error, Result};

/// SalUn (random labels) settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalunRlConfig {
    /// Fraction of weights updated, in `(0, 1]` (SalUn: 0.5).
    pub keep_ratio: f64,
    /// Learning rate (official CIFAR-10 run: 0.013).
    pub lr: f64,
    /// Epochs (forget pass + retain pass each).
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// SGD momentum (0.9).
    pub momentum: f64,
    /// SGD weight decay (5e-4).
    pub weight_decay: f64,
    /// Images per batch of the mask's gradient pass.
    pub mask_batch_size: usize,
    /// Draw random labels among the *other* classes only.
    pub exclude_true_label: bool,
    /// Seed of batch order and random labels.
    pub seed: u64,
    /// Mix the relabelled forget images into the retain pass (one shuffled
    /// pass over both per epoch: the official code's CIFAR-100 and
    /// TinyImageNet variant) instead of a forget pass then a retain pass.
    #[serde(default)]
    pub mixed: bool,
}

impl SalunRlConfig {
    /// SalUn's defaults (keep 50%, momentum 0.9, weight decay 5e-4, 10
    /// epochs, batch 256) at learning rate `lr`.
    pub fn paper(lr: f64) -> SalunRlConfig {
        SalunRlConfig {
            keep_ratio: 0.5,
            lr,
            epochs: 10,
            batch_size: 256,
            momentum: 0.9,
            weight_decay: 5e-4,
            mask_batch_size: 256,
            exclude_true_label: true,
            seed: 0,
            mixed: false,
        }
    }
}

/// SalUn's mask for a classifier (see the module docs).
pub fn classifier_saliency_mask(
    model: &dyn ImageClassifier,
    forget: &ImageSet,
    keep_ratio: f64,
    batch_size: usize,
) -> Result<SaliencyMask> {
    check_images(model, forget, "forget")?;
    ensure_config(batch_size > 0, || "mask batch size must be > 0".into())?;
    let device = classifier_device(model);
    let mut acc = GradientAccumulator::new(model.named_trainable_vars());
    let idx: Vec<usize> = (0..forget.len()).collect();
    for chunk in idx.chunks(batch_size) {
        let (x, y) = forget.batch(chunk, &device)?;
        let logits = model.forward(&x, Mode::Eval)?;
        let loss = nn::cross_entropy(&logits, &y, None)?.neg()?;
        acc.add(&loss)?;
    }
    SaliencyMask::from_scores(&acc.abs_scores()?, keep_ratio)
}

/// Random labels for `labels` among `classes` classes.
pub(crate) fn random_labels(
    labels: &[u32],
    classes: usize,
    exclude_true: bool,
    seed: u64,
) -> Result<Vec<u32>> {
    if classes < 2 && exclude_true {
        return Err(Error::InvalidData(
            "random labels other than the true one need at least 2 classes".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(labels
        .iter()
        .map(|&y| {
            if exclude_true {
                let r = rng.random_range(0..classes as u32 - 1);
                if r >= y {
                    r + 1
                } else {
                    r
                }
            } else {
                rng.random_range(0..classes as u32)
            }
        })
        .collect())
}

impl ClassifierMethod for SalunRlConfig {
    fn name(&self) -> &'static str {
        if self.keep_ratio >= 1.0 {
            "rl"
        } else {
            "salun"
        }
    }

    fn validate(&self) -> Result<()> {
        ensure_config(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0, || {
            format!("keep_ratio must be in (0, 1], got {}", self.keep_ratio)
        })?;
        ensure_config(self.epochs > 0, || "epochs must be > 0".into())?;
        ensure_config(self.batch_size > 0, || "batch_size must be > 0".into())?;
        ensure_config(self.mask_batch_size > 0, || {
            "mask_batch_size must be > 0".into()
        })?;
        validate_sgd(self.lr, self.momentum, self.weight_decay)
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    fn unlearn(
        &self,
        model: &dyn ImageClassifier,
        forget: &ImageSet,
        retain: &ImageSet,
    ) -> Result<UnlearnReport> {
        let started = Instant::now();
        self.validate()?;
        check_images(model, forget, "forget")?;
        check_images(model, retain, "retain")?;
        let weights_before = classifier_hash(model)?;
        let mut metrics = BTreeMap::new();
        measure(model, "before", forget, retain, &mut metrics)?;
        let mask = classifier_saliency_mask(model, forget, self.keep_ratio, self.mask_batch_size)?;
        let named = model.named_trainable_vars();
        let theta0 = snapshot(&named)?;
        let mut opt = sgd_for(model, self.lr, self.momentum, self.weight_decay)?;
        mask.apply(&mut opt, &named)?;
        let classes = num_classes(model);
        let mut steps = 0;
        for epoch in 0..self.epochs {
            let _span = tracing::debug_span!("salun_epoch", epoch).entered();
            let epoch_seed = self.seed.wrapping_mul(7919).wrapping_add(epoch as u64);
            let labels = random_labels(
                forget.labels(),
                classes,
                self.exclude_true_label,
                epoch_seed,
            )?;
            let relabelled = forget.with_labels(labels)?;
            if self.mixed {
                let both = relabelled.concat(retain)?;
                let (s, loss) = sgd_pass(
                    model,
                    &mut opt,
                    &both,
                    self.batch_size,
                    epoch_seed ^ 3,
                    1.0,
                    None,
                )?;
                steps += s;
                tracing::debug!(epoch, loss, "salun epoch (mixed)");
            } else {
                let (s, fl) = sgd_pass(
                    model,
                    &mut opt,
                    &relabelled,
                    self.batch_size,
                    epoch_seed ^ 1,
                    1.0,
                    None,
                )?;
                let (r, rl) = sgd_pass(
                    model,
                    &mut opt,
                    retain,
                    self.batch_size,
                    epoch_seed ^ 2,
                    1.0,
                    None,
                )?;
                steps += s + r;
                tracing::debug!(epoch, forget_loss = fl, retain_loss = rl, "salun epoch");
            }
        }
        let changed = mask.count_changed_outside(&theta0, &named)?;
        if changed != 0 {
            return Err(Error::Invariant(format!(
                "{changed} weights outside the saliency mask changed"
            )));
        }
        metrics.insert("frozen_weights_changed".into(), 0.0);
        measure(model, "after", forget, retain, &mut metrics)?;
        Ok(UnlearnReport {
            method: self.name().into(),
            hyperparameters: self.hyperparameters(),
            weights_before,
            weights_after: classifier_hash(model)?,
            mask: Some(mask.summary()?),
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
}
