//! Gradient difference: gradient ascent on the forget set plus ordinary
//! next-token NLL on the retain set, `-NLL(D_f) + gamma NLL(D_r)`
//! (open-unlearning `GradDiff` with the NLL retain loss; RESTOR's "GA+FT").

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use lethe_model::decoder::Decoder;
use serde::{Deserialize, Serialize};

use crate::data::TextSet;
use crate::error::ensure_config;
use crate::lm::{
    batch_nll, check_inputs, plus, retain_term, run_method, LmMethod, LmTrainConfig, Objective,
    StepInput,
};
use crate::report::UnlearnReport;
use crate::Result;

/// Gradient-difference settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradDiffConfig {
    /// Weight `gamma` of the retain NLL (> 0).
    pub retain_weight: f64,
    /// Optimisation.
    pub train: LmTrainConfig,
}

struct GradDiffObjective {
    retain_weight: f64,
}

impl Objective for GradDiffObjective {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        let forget = batch_nll(model, input.forget)?.neg()?;
        plus(
            forget,
            retain_term(model, input.retain, self.retain_weight)?,
        )
    }
}

impl LmMethod for GradDiffConfig {
    fn name(&self) -> &'static str {
        "graddiff"
    }

    fn validate(&self) -> Result<()> {
        ensure_config(
            self.retain_weight.is_finite() && self.retain_weight > 0.0,
            || format!("retain_weight must be > 0, got {}", self.retain_weight),
        )?;
        self.train.validate()
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    fn unlearn(
        &self,
        model: &Decoder,
        forget: &TextSet,
        retain: Option<&TextSet>,
    ) -> Result<UnlearnReport> {
        let started = Instant::now();
        self.validate()?;
        check_inputs(model, forget, retain, true)?;
        run_method(
            self.name(),
            self.hyperparameters(),
            model,
            forget,
            forget,
            retain,
            &self.train,
            &GradDiffObjective {
                retain_weight: self.retain_weight,
            },
            None,
            started,
            BTreeMap::new(),
        )
    }
}
