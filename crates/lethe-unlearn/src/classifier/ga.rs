//! Gradient ascent for classifiers: SGD on `-CE` over the forget set (the
//! "GA" baseline of SalUn's tables). Very learning-rate sensitive: the
//! SalUn maintainers grid-search it over `[1e-5, 0.1]`.

use lethe_model::vision::ImageClassifier;
use serde::{Deserialize, Serialize};

use crate::classifier::{run_method, sgd_for, sgd_pass, validate_sgd, ClassifierMethod};
use crate::data::ImageSet;
use crate::error::ensure_config;
use crate::report::UnlearnReport;
use crate::Result;

/// Gradient-ascent settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaClassifierConfig {
    /// Learning rate.
    pub lr: f64,
    /// Passes over the forget set.
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

impl ClassifierMethod for GaClassifierConfig {
    fn name(&self) -> &'static str {
        "ga"
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
        run_method(self, model, forget, retain, || {
            let mut opt = sgd_for(model, self.lr, self.momentum, self.weight_decay)?;
            let mut steps = 0;
            for epoch in 0..self.epochs {
                let seed = self.seed.wrapping_mul(7919).wrapping_add(epoch as u64);
                steps += sgd_pass(model, &mut opt, forget, self.batch_size, seed, -1.0, None)?.0;
            }
            Ok(steps)
        })
    }
}
