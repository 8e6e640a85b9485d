//! KL-regularised gradient ascent: `-NLL(D_f) + gamma KL(p_ref || p_theta)`
//! on retain batches, where `p_ref` is a frozen copy of the model at the
//! start (open-unlearning `GradDiff` with the KL retain loss; MUSE's
//! `GA_KLR`). The KL term anchors the model's whole next-token distribution
//! on retain data to the original, not only the likelihood of the observed
//! tokens.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use lethe_model::decoder::Decoder;
use lethe_model::nn::Mode;
use serde::{Deserialize, Serialize};

use crate::data::TextSet;
use crate::error::ensure_config;
use crate::lm::{
    batch_nll, check_inputs, clone_decoder, kl_to_reference, run_method, LmMethod, LmTrainConfig,
    Objective, StepInput,
};
use crate::report::UnlearnReport;
use crate::{Error, Result};

/// KL-regularised gradient-ascent settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlConfig {
    /// Weight `gamma` of the KL term (> 0).
    pub kl_weight: f64,
    /// Optimisation.
    pub train: LmTrainConfig,
}

struct KlObjective {
    reference: Decoder,
    kl_weight: f64,
}

impl Objective for KlObjective {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        let forget = batch_nll(model, input.forget)?.neg()?;
        let retain = input
            .retain
            .ok_or_else(|| Error::InvalidData("KL needs a retain batch".into()))?;
        let logits = model.forward(&retain.ids, Mode::Train)?;
        let ref_logits = self.reference.forward(&retain.ids, Mode::Eval)?;
        let kl = kl_to_reference(&logits, &ref_logits, retain)?;
        Ok((forget + (kl * self.kl_weight)?)?)
    }
}

impl LmMethod for KlConfig {
    fn name(&self) -> &'static str {
        "kl"
    }

    fn validate(&self) -> Result<()> {
        ensure_config(self.kl_weight.is_finite() && self.kl_weight > 0.0, || {
            format!("kl_weight must be > 0, got {}", self.kl_weight)
        })?;
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
        let reference = clone_decoder(model)?;
        reference.set_base_trainable(false);
        run_method(
            self.name(),
            self.hyperparameters(),
            model,
            forget,
            forget,
            retain,
            &self.train,
            &KlObjective {
                reference,
                kl_weight: self.kl_weight,
            },
            None,
            started,
            BTreeMap::new(),
        )
    }
}
