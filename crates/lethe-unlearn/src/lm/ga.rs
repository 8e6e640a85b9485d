//! Gradient ascent: maximise the next-token NLL of the forget set.
//!
//! The simplest unlearning baseline (Jang et al. 2023, "Knowledge Unlearning
//! for Mitigating Privacy Risks in Language Models"). Unbounded: it forgets
//! fast and then destroys the model, so keep its budget small (RESTOR: GA
//! forgets without restoring the clean knowledge).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use lethe_model::decoder::Decoder;
use serde::{Deserialize, Serialize};

use crate::data::TextSet;
use crate::lm::{
    batch_nll, check_inputs, run_method, LmMethod, LmTrainConfig, Objective, StepInput,
};
use crate::report::UnlearnReport;
use crate::Result;

/// Gradient-ascent settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaConfig {
    /// Optimisation.
    pub train: LmTrainConfig,
}

pub(crate) struct GaObjective;

impl Objective for GaObjective {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        Ok(batch_nll(model, input.forget)?.neg()?)
    }
}

impl LmMethod for GaConfig {
    fn name(&self) -> &'static str {
        "ga"
    }

    fn validate(&self) -> Result<()> {
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
        check_inputs(model, forget, retain, false)?;
        run_method(
            self.name(),
            self.hyperparameters(),
            model,
            forget,
            forget,
            retain,
            &self.train,
            &GaObjective,
            None,
            started,
            BTreeMap::new(),
        )
    }
}
