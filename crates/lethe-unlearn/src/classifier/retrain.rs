//! Retrain from scratch: re-initialise the model (same architecture, seeded
//! random weights) and train it on the retain set only. Exact unlearning
//! and the gold standard SalUn's average gap is measured against; also the
//! most expensive method (its run time is SalUn's RTE reference).

use lethe_model::vision::ImageClassifier;
use serde::{Deserialize, Serialize};

use crate::classifier::{
    classifier_device, copy_weights, new_classifier, run_method, train_classifier,
    ClassifierMethod, ClassifierTrainConfig,
};
use crate::data::ImageSet;
use crate::report::UnlearnReport;
use crate::Result;

/// Retrain settings: the original model's recipe and an init seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainConfig {
    /// Training recipe.
    pub train: ClassifierTrainConfig,
    /// Seed of the fresh initialisation.
    pub init_seed: u64,
}

impl ClassifierMethod for RetrainConfig {
    fn name(&self) -> &'static str {
        "retrain"
    }

    fn validate(&self) -> Result<()> {
        self.train.validate()
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
            let fresh = new_classifier(model.config(), &classifier_device(model), self.init_seed)?;
            copy_weights(fresh.as_ref(), model)?;
            train_classifier(model, retain, &self.train)
        })
    }
}
