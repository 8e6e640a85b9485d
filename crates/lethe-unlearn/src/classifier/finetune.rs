//! Fine-tuning for classifiers: SGD on the retain set only, relying on
//! catastrophic forgetting of the forget set (the "FT" baseline of SalUn's
//! tables).

use lethe_model::vision::ImageClassifier;
use serde::{Deserialize, Serialize};

use crate::classifier::{run_method, sgd_epochs, validate_sgd_run, ClassifierMethod};
use crate::data::ImageSet;
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
        validate_sgd_run(
            self.epochs,
            self.batch_size,
            self.lr,
            self.momentum,
            self.weight_decay,
        )
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
            sgd_epochs(
                model,
                retain,
                1.0,
                self.epochs,
                self.batch_size,
                self.lr,
                self.momentum,
                self.weight_decay,
                self.seed,
            )
        })
    }
}
