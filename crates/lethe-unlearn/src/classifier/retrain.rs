//! Retrain from scratch: re-initialise the model (same architecture, seeded
//! random weights) and train it on the retain set only. Exact unlearning
//! and the gold standard SalUn's average gap is measured against; also the
//! most expensive method (its run time is SalUn's RTE reference).

use std::collections::BTreeMap;
use std::time::Instant;

use lethe_model::vision::ImageClassifier;
use serde::{Deserialize, Serialize};

use crate::classifier::{
    check_images, classifier_device, classifier_hash, copy_weights, measure, new_classifier,
    train_classifier, ClassifierMethod, ClassifierTrainConfig,
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
        let started = Instant::now();
        self.validate()?;
        check_images(model, forget, "forget")?;
        check_images(model, retain, "retain")?;
        let weights_before = classifier_hash(model)?;
        let mut metrics = BTreeMap::new();
        measure(model, "before", forget, retain, &mut metrics)?;
        let fresh = new_classifier(model.config(), &classifier_device(model), self.init_seed)?;
        copy_weights(fresh.as_ref(), model)?;
        let steps = train_classifier(model, retain, &self.train)?;
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
