//! Fine-tuning for classifiers: SGD on the retain set only, relying on
//! catastrophic forgetting of the forget set (the "FT" baseline of SalUn's
//! tables).

use std::collections::BTreeMap;
use std::time::Instant;

use lethe_model::vision::ImageClassifier;
use serde::{Deserialize, Serialize};

use crate::classifier::{
    check_images, classifier_hash, measure, sgd_for, sgd_pass, validate_sgd, ClassifierMethod,
};
use crate::data::ImageSet;
use crate::error::ensure_config;
use crate::report::UnlearnReport;
use crate::Result;

/// Fine-tuning settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Learning rate.
    pub lr: f64,
    /// Passes over the retain set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
    /// Seed of the batch order.
    pub seed: u64,
}

impl ClassifierMethod for FinetuneConfig {
    fn name(&self) -> &'static str {
        "finetune"
    }

    fn validate(&self) -> Result<()> {
        ensure_config(self.epochs > 0, || "epochs must be > 0".into())?;
        ensure_config(self.batch_size > 0, || "batch_size must be > 0".into())?;
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
        let mut opt = sgd_for(model, self.lr, self.momentum, self.weight_decay)?;
        let mut steps = 0;
        for epoch in 0..self.epochs {
            let seed = self.seed.wrapping_mul(7919).wrapping_add(epoch as u64);
            steps += sgd_pass(model, &mut opt, retain, self.batch_size, seed, 1.0, None)?.0;
        }
        measure(model, "after", forget, retain, &mut metrics)?;
        Ok(UnlearnReport {
            method: self.name().into(),
            hyperparameters: self.hyperparameters(),
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
}
