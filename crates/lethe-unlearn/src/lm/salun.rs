//! SalUn for language models: a weight-saliency mask from the gradient of
//! the forget loss at the original weights, then an unlearning objective
//! whose updates are confined to the mask (Fan et al., ICLR 2024; the
//! research brief's section 5.1 "LLM variant").
//!
//! * Mask: the summed per-batch gradient of the gradient-ascent loss
//!   `-NLL(D_f)` (Eval mode) over every base weight; the global top
//!   `keep_ratio` fraction by magnitude is trainable
//!   ([`crate::saliency`]).
//! * Objective, under the mask: NPO (the restorative choice per RESTOR),
//!   plain gradient ascent, fine-tuning towards a refusal answer, or
//!   towards random answers (the language-model analogue of SalUn's random
//!   labels), each plus an optional retain NLL term.
//! * Frozen coordinates are restored exactly at every step by the masked
//!   optimizer and re-checked bit for bit at the end: a violation is an
//!   [`crate::Error::Invariant`], never silently accepted.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use lethe_model::decoder::Decoder;
use lethe_model::nn::{self, Mode};
use serde::{Deserialize, Serialize};

use crate::data::TextSet;
use crate::error::ensure_config;
use crate::lm::npo::{validate_beta, NpoObjective};
use crate::lm::{
    batch_nll, check_inputs, plus, require_prompts, retain_term, run_method,
    sequence_log_likelihoods, LmMethod, LmTrainConfig, Objective, Relabel, StepInput,
};
use crate::report::UnlearnReport;
use crate::saliency::{GradientAccumulator, SaliencyMask};
use crate::{Error, Result};

/// The default fraction of weights SalUn updates.
pub const DEFAULT_KEEP_RATIO: f64 = 0.5;

fn default_keep_ratio() -> f64 {
    DEFAULT_KEEP_RATIO
}

/// What SalUn optimises inside its mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SalunObjective {
    /// NPO against the frozen original.
    Npo {
        /// NPO's `beta`.
        beta: f64,
    },
    /// Gradient ascent.
    Ga,
    /// Fine-tune towards a refusal answer.
    Refusal {
        /// Refusal tokens.
        answer: Vec<u32>,
    },
    /// Fine-tune towards random answers drawn from `candidates`.
    RandomAnswer {
        /// Candidate answers.
        candidates: Vec<Vec<u32>>,
        /// Never draw the true answer.
        #[serde(default = "yes")]
        exclude_true: bool,
    },
}

fn yes() -> bool {
    true
}

impl SalunObjective {
    fn relabel(&self) -> Option<Relabel> {
        match self {
            SalunObjective::Refusal { answer } => Some(Relabel::Refusal {
                answer: answer.clone(),
            }),
            SalunObjective::RandomAnswer {
                candidates,
                exclude_true,
            } => Some(Relabel::RandomAnswer {
                candidates: candidates.clone(),
                exclude_true: *exclude_true,
            }),
            _ => None,
        }
    }
}

/// SalUn settings for a decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalunLmConfig {
    /// Fraction of weights kept trainable, in `(0, 1]` (default 0.5).
    #[serde(default = "default_keep_ratio")]
    pub keep_ratio: f64,
    /// Batch size of the mask's gradient pass (default: the training one).
    #[serde(default)]
    pub mask_batch_size: Option<usize>,
    /// The masked objective.
    pub objective: SalunObjective,
    /// Weight of a retain NLL term (0 = none).
    #[serde(default)]
    pub retain_weight: f64,
    /// Optimisation.
    pub train: LmTrainConfig,
}

/// SalUn's mask for a decoder: the global top `keep_ratio` of
/// `|sum_batches grad(-NLL(forget batch))|` over every base weight.
pub fn lm_saliency_mask(
    model: &Decoder,
    forget: &TextSet,
    keep_ratio: f64,
    batch_size: usize,
) -> Result<SaliencyMask> {
    if forget.is_empty() {
        return Err(Error::InvalidData("the forget set is empty".into()));
    }
    ensure_config(batch_size > 0, || "mask batch size must be > 0".into())?;
    let was = model.is_base_trainable();
    model.set_base_trainable(true);
    let result = (|| -> Result<SaliencyMask> {
        let mut acc = GradientAccumulator::new(model.named_vars());
        let idx: Vec<usize> = (0..forget.len()).collect();
        for chunk in idx.chunks(batch_size) {
            let b = forget.batch(chunk, model.device())?;
            let logits = model.forward(&b.ids, Mode::Eval)?;
            let loss = nn::causal_lm_loss(&logits, &b.ids, Some(&b.loss_mask))?.neg()?;
            acc.add(&loss)?;
        }
        SaliencyMask::from_scores(&acc.abs_scores()?, keep_ratio)
    })();
    model.set_base_trainable(was);
    result
}

struct GaPlusRetain {
    retain_weight: f64,
}

impl Objective for GaPlusRetain {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        let forget = batch_nll(model, input.forget)?.neg()?;
        plus(
            forget,
            retain_term(model, input.retain, self.retain_weight)?,
        )
    }
}

/// NLL on relabelled forget batches (refusal / random answers).
struct TargetsPlusRetain {
    retain_weight: f64,
}

impl Objective for TargetsPlusRetain {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        let forget = batch_nll(model, input.forget)?;
        plus(
            forget,
            retain_term(model, input.retain, self.retain_weight)?,
        )
    }
}

impl LmMethod for SalunLmConfig {
    fn name(&self) -> &'static str {
        "salun"
    }

    fn validate(&self) -> Result<()> {
        ensure_config(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0, || {
            format!("keep_ratio must be in (0, 1], got {}", self.keep_ratio)
        })?;
        ensure_config(self.mask_batch_size != Some(0), || {
            "mask_batch_size must be > 0".into()
        })?;
        ensure_config(
            self.retain_weight.is_finite() && self.retain_weight >= 0.0,
            || format!("retain_weight must be >= 0, got {}", self.retain_weight),
        )?;
        match &self.objective {
            SalunObjective::Npo { beta } => validate_beta(*beta, self.retain_weight)?,
            SalunObjective::Ga => {}
            other => {
                if let Some(r) = other.relabel() {
                    r.validate()?;
                }
            }
        }
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
        let mask_started = Instant::now();
        let mask = lm_saliency_mask(
            model,
            forget,
            self.keep_ratio,
            self.mask_batch_size.unwrap_or(self.train.batch_size),
        )?;
        let mut metrics = BTreeMap::new();
        metrics.insert("mask_seconds".into(), mask_started.elapsed().as_secs_f64());
        metrics.insert(
            "mask_kept_fraction".into(),
            mask.kept() as f64 / mask.total() as f64,
        );
        let relabelled;
        let (objective, forget_train): (Box<dyn Objective>, &TextSet) = match &self.objective {
            SalunObjective::Npo { beta } => (
                Box::new(NpoObjective {
                    beta: *beta,
                    retain_weight: self.retain_weight,
                    reference: sequence_log_likelihoods(model, forget, self.train.batch_size)?,
                }),
                forget,
            ),
            SalunObjective::Ga => (
                Box::new(GaPlusRetain {
                    retain_weight: self.retain_weight,
                }),
                forget,
            ),
            other => {
                require_prompts(forget)?;
                let relabel = other.relabel().ok_or_else(|| {
                    Error::Invariant("target objective without relabelling".into())
                })?;
                relabelled = relabel.apply(forget, self.train.seed)?;
                (
                    Box::new(TargetsPlusRetain {
                        retain_weight: self.retain_weight,
                    }),
                    &relabelled,
                )
            }
        };
        run_method(
            self.name(),
            self.hyperparameters(),
            model,
            forget,
            forget_train,
            retain,
            &self.train,
            objective.as_ref(),
            Some(&mask),
            started,
            metrics,
        )
    }
}
