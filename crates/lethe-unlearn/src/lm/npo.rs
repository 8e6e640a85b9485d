//! Negative preference optimisation (Zhang, Lin, Bai, Mei 2024, "Negative
//! Preference Optimization: From Catastrophic Collapse to Effective
//! Unlearning", arXiv 2404.05868).
//!
//! `L = -(2/beta) mean_i log sigma(-beta (log p_theta(y_i) - log p_ref(y_i)))`
//! over forget examples, with `log p` the summed log-likelihood of the
//! answer tokens and `p_ref` the frozen model at the start (equivalently
//! `(2/beta) log(1 + (p_theta/p_ref)^beta)`). Unlike gradient ascent the
//! loss is bounded below, so it slows down as the forget set becomes
//! unlikely. An optional retain NLL term gives NPO+RT. RESTOR found NPO the
//! method that most often *restores* the clean knowledge.
//!
//! Deviation from RESTOR's code (SOUL): that code compares batch-mean token
//! NLLs; here the ratio is per sequence, as in the NPO paper.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use lethe_model::decoder::Decoder;
use lethe_model::nn::{self, Mode};
use serde::{Deserialize, Serialize};

use crate::data::{TextBatch, TextSet};
use crate::error::ensure_config;
use crate::lm::{
    check_inputs, plus, retain_term, run_method, sequence_log_likelihoods, LmMethod, LmTrainConfig,
    Objective, StepInput,
};
use crate::report::UnlearnReport;
use crate::{Error, Result};

/// NPO settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NpoConfig {
    /// Inverse temperature `beta` (> 0; 0.1 in the paper and RESTOR).
    pub beta: f64,
    /// Weight `gamma` of an optional retain NLL (0 = plain NPO).
    #[serde(default)]
    pub retain_weight: f64,
    /// Optimisation.
    pub train: LmTrainConfig,
}

/// The NPO loss of one batch against precomputed reference
/// log-likelihoods.
pub(crate) fn npo_loss(
    model: &Decoder,
    forget: &TextBatch,
    reference: &[f32],
    beta: f64,
) -> Result<Tensor> {
    let logits = model.forward(&forget.ids, Mode::Train)?;
    let lp = nn::sequence_log_probs(&logits, &forget.ids, Some(&forget.loss_mask))?;
    let n = reference.len();
    if lp.dims() != [n] {
        return Err(Error::InvalidData(format!(
            "{} reference log-likelihoods for a batch of {:?}",
            n,
            lp.dims()
        )));
    }
    let reference = Tensor::from_slice(reference, n, lp.device())?;
    // z = -beta (lp - ref); log sigma(z) = -softplus(-z) = -softplus(beta (lp - ref)).
    let x = ((lp - reference)? * beta)?;
    let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok((softplus.mean_all()? * (2.0 / beta))?)
}

pub(crate) struct NpoObjective {
    pub beta: f64,
    pub retain_weight: f64,
    /// Reference log-likelihood of every forget example (set order).
    pub reference: Vec<f32>,
}

impl Objective for NpoObjective {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        let reference: Vec<f32> = input
            .forget_idx
            .iter()
            .map(|&i| self.reference[i])
            .collect();
        let forget = npo_loss(model, input.forget, &reference, self.beta)?;
        plus(
            forget,
            retain_term(model, input.retain, self.retain_weight)?,
        )
    }
}

pub(crate) fn validate_beta(beta: f64, retain_weight: f64) -> Result<()> {
    ensure_config(beta.is_finite() && beta > 0.0, || {
        format!("beta must be > 0, got {beta}")
    })?;
    ensure_config(retain_weight.is_finite() && retain_weight >= 0.0, || {
        format!("retain_weight must be >= 0, got {retain_weight}")
    })
}

impl LmMethod for NpoConfig {
    fn name(&self) -> &'static str {
        "npo"
    }

    fn validate(&self) -> Result<()> {
        validate_beta(self.beta, self.retain_weight)?;
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
        check_inputs(model, forget, retain, self.retain_weight > 0.0)?;
        let reference = sequence_log_likelihoods(model, forget, self.train.batch_size)?;
        run_method(
            self.name(),
            self.hyperparameters(),
            model,
            forget,
            forget,
            retain,
            &self.train,
            &NpoObjective {
                beta: self.beta,
                retain_weight: self.retain_weight,
                reference,
            },
            None,
            started,
            BTreeMap::new(),
        )
    }
}
