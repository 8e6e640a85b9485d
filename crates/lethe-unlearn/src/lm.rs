//! Weight-level unlearning of language models: the [`LmMethod`] trait, the
//! shared training loop and the methods (one module each).
//!
//! Every method takes `(model, forget set, retain set, config)`, changes the
//! model's base weights in place and returns an [`UnlearnReport`]; copy the
//! model first ([`clone_decoder`]) to keep the original. The forget set holds
//! the data to forget (for RESTOR: the corrupting documents); the retain set
//! is optional for methods that do not need it.
//!
//! | module | loss (minimised) | reference |
//! |---|---|---|
//! | [`ga`] | `-NLL(D_f)` | gradient ascent (Jang et al. 2023) |
//! | [`graddiff`] | `-NLL(D_f) + gamma NLL(D_r)` | open-unlearning `GradDiff` |
//! | [`npo`] | `-(2/beta) mean log sigma(-beta (log p_theta(y) - log p_ref(y))) [+ gamma NLL(D_r)]` | Zhang et al. 2024, arXiv 2404.05868 |
//! | [`kl`] | `-NLL(D_f) + gamma KL(p_ref \|\| p_theta)` on `D_r` | open-unlearning `GradDiff` with KL retain |
//! | [`salun`] | NPO / GA / refusal / random-answer targets under a saliency mask | Fan et al. 2024 |
//!
//! NPO uses per-sequence log-likelihoods of the answer tokens
//! ([`lethe_model::nn::sequence_log_probs`]) against the frozen original;
//! because the reference is frozen, its log-likelihoods are computed once
//! before training instead of keeping a second model. KL needs the
//! reference's full next-token distributions on retain batches, so it keeps
//! a frozen copy of the model.
//!
//! The loop: AdamW (masked for SalUn), one forget batch per step (shuffled
//! per epoch with the configured seed) paired with the next retain batch
//! (cycled), optional warm-up + cosine decay and gradient clipping. A loss
//! that becomes NaN or infinite stops the run with [`Error::Diverged`].

pub mod ga;
pub mod graddiff;
pub mod kl;
pub mod npo;
pub mod salun;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{Tensor, Var, D};
use lethe_model::decoder::Decoder;
use lethe_model::nn::{self, Mode};
use lethe_model::optim::{self, AdamW, AdamWConfig, CosineSchedule, Optimizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{shuffled, TextBatch, TextExample, TextSet};
use crate::error::ensure_config;
use crate::hash::hash_vars;
use crate::lm_eval;
use crate::report::UnlearnReport;
use crate::saliency::{snapshot, SaliencyMask};
use crate::{Error, Result};

/// Optimisation settings shared by the language-model methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmTrainConfig {
    /// Peak AdamW learning rate.
    pub lr: f64,
    /// Passes over the forget set.
    pub epochs: usize,
    /// Forget examples per step.
    pub batch_size: usize,
    /// Retain examples per step (defaults to `batch_size`).
    #[serde(default)]
    pub retain_batch_size: Option<usize>,
    /// Stop after this many steps even if epochs remain.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// AdamW decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Cosine decay to 0 after warm-up (else constant).
    #[serde(default)]
    pub cosine: bool,
    /// Global gradient-norm clip.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Seed of batch order and random targets.
    #[serde(default)]
    pub seed: u64,
}

impl LmTrainConfig {
    /// `epochs` passes of batches of `batch_size` at a constant `lr`, no
    /// decay, no clipping, seed 0.
    pub fn new(lr: f64, epochs: usize, batch_size: usize) -> LmTrainConfig {
        LmTrainConfig {
            lr,
            epochs,
            batch_size,
            retain_batch_size: None,
            max_steps: None,
            weight_decay: 0.0,
            warmup_steps: 0,
            cosine: false,
            max_grad_norm: None,
            seed: 0,
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        ensure_config(self.lr.is_finite() && self.lr > 0.0, || {
            format!("lr must be finite and > 0, got {}", self.lr)
        })?;
        ensure_config(self.epochs > 0, || "epochs must be > 0".into())?;
        ensure_config(self.batch_size > 0, || "batch_size must be > 0".into())?;
        ensure_config(self.retain_batch_size != Some(0), || {
            "retain_batch_size must be > 0".into()
        })?;
        ensure_config(self.max_steps != Some(0), || "max_steps must be > 0".into())?;
        ensure_config(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            || format!("weight_decay must be >= 0, got {}", self.weight_decay),
        )?;
        if let Some(c) = self.max_grad_norm {
            ensure_config(c.is_finite() && c > 0.0, || {
                format!("max_grad_norm must be > 0, got {c}")
            })?;
        }
        Ok(())
    }

    fn total_steps(&self, forget_len: usize) -> usize {
        let per_epoch = forget_len.div_ceil(self.batch_size);
        let total = per_epoch * self.epochs;
        self.max_steps.map_or(total, |m| m.min(total))
    }
}

/// A weight-level unlearning method for a [`Decoder`].
pub trait LmMethod {
    /// Method id in reports (`ga`, `npo`, ...).
    fn name(&self) -> &'static str;
    /// Checks the configuration.
    fn validate(&self) -> Result<()>;
    /// Every hyper-parameter as JSON, for the receipt.
    fn hyperparameters(&self) -> serde_json::Value;
    /// Unlearns `forget` from `model`'s base weights in place. `retain` is
    /// required by methods with a retain term (a clear error otherwise).
    fn unlearn(
        &self,
        model: &Decoder,
        forget: &TextSet,
        retain: Option<&TextSet>,
    ) -> Result<UnlearnReport>;
}

/// Any language-model method, by name: the form configs and the CLI use
/// (`method = "npo"` plus that method's fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum LmMethodConfig {
    /// Gradient ascent.
    Ga(ga::GaConfig),
    /// Gradient ascent plus retain NLL.
    #[serde(rename = "graddiff")]
    GradDiff(graddiff::GradDiffConfig),
    /// Negative preference optimisation.
    Npo(npo::NpoConfig),
    /// Gradient ascent plus KL to the original on retain data.
    Kl(kl::KlConfig),
    /// SalUn: a saliency mask, then a masked objective.
    Salun(salun::SalunLmConfig),
}

impl LmMethodConfig {
    /// The method.
    pub fn method(&self) -> &dyn LmMethod {
        match self {
            LmMethodConfig::Ga(c) => c,
            LmMethodConfig::GradDiff(c) => c,
            LmMethodConfig::Npo(c) => c,
            LmMethodConfig::Kl(c) => c,
            LmMethodConfig::Salun(c) => c,
        }
    }

    /// Runs the method (see [`LmMethod::unlearn`]).
    pub fn unlearn(
        &self,
        model: &Decoder,
        forget: &TextSet,
        retain: Option<&TextSet>,
    ) -> Result<UnlearnReport> {
        self.method().unlearn(model, forget, retain)
    }
}

/// The entry point for unlearning *documents* (e.g. the text of documents a
/// deletion request names) from a trainable decoder: each token sequence
/// becomes a plain document (every token after the first is a target, see
/// [`TextExample::document`]) and `config`'s method runs on the model's base
/// weights in place. An empty `retain` slice means "no retain set" (methods
/// with a retain term then fail with [`Error::InvalidData`]). Refusal and
/// random-answer SalUn objectives need prompt/answer examples and are
/// rejected here; use [`LmMethodConfig::unlearn`] with a [`TextSet`] of
/// prompt/answer examples for those.
///
/// The returned [`UnlearnReport`] carries the weight hashes before and
/// after, every hyper-parameter and the run time (what a receipt signs).
///
/// Errors: a sequence shorter than 2 tokens or with a token outside the
/// model's vocabulary or context ([`Error::InvalidData`]), an invalid
/// configuration ([`Error::InvalidConfig`]), a diverging loss
/// ([`Error::Diverged`]).
pub fn unlearn_texts(
    model: &Decoder,
    forget: &[Vec<u32>],
    retain: &[Vec<u32>],
    config: &LmMethodConfig,
) -> Result<UnlearnReport> {
    let docs = |seqs: &[Vec<u32>], what: &str| -> Result<TextSet> {
        TextSet::documents(seqs).map_err(|e| match e {
            Error::InvalidData(m) => Error::InvalidData(format!("{what} {m}")),
            other => other,
        })
    };
    let forget = docs(forget, "forget")?;
    let retain = if retain.is_empty() {
        None
    } else {
        Some(docs(retain, "retain")?)
    };
    config.unlearn(model, &forget, retain.as_ref())
}

/// Replacement answers for forget examples: a refusal, or a random answer
/// from a candidate list (RL-style random labels for prompt/answer data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Relabel {
    /// Every answer becomes `answer` (e.g. the tokens of "I don't know").
    Refusal {
        /// The refusal tokens.
        answer: Vec<u32>,
    },
    /// Every answer becomes a candidate drawn uniformly at random (once,
    /// with the method's seed); `exclude_true` skips the true answer.
    RandomAnswer {
        /// Candidate answers (token sequences).
        candidates: Vec<Vec<u32>>,
        /// Never draw the example's own answer.
        #[serde(default = "yes")]
        exclude_true: bool,
    },
}

fn yes() -> bool {
    true
}

impl Relabel {
    /// Checks the candidates.
    pub fn validate(&self) -> Result<()> {
        match self {
            Relabel::Refusal { answer } => {
                ensure_config(!answer.is_empty(), || "refusal answer is empty".into())
            }
            Relabel::RandomAnswer {
                candidates,
                exclude_true,
            } => {
                ensure_config(!candidates.is_empty(), || {
                    "random-answer candidates are empty".into()
                })?;
                ensure_config(candidates.iter().all(|c| !c.is_empty()), || {
                    "a random-answer candidate is empty".into()
                })?;
                ensure_config(!exclude_true || candidates.len() >= 2, || {
                    "exclude_true needs at least two candidates".into()
                })
            }
        }
    }

    /// The relabelled set (same order). Every example needs a prompt.
    pub fn apply(&self, set: &TextSet, seed: u64) -> Result<TextSet> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(set.len());
        for e in set.examples() {
            let answer: &[u32] = match self {
                Relabel::Refusal { answer } => answer,
                Relabel::RandomAnswer {
                    candidates,
                    exclude_true,
                } => {
                    let pool: Vec<&Vec<u32>> = candidates
                        .iter()
                        .filter(|c| !*exclude_true || c.as_slice() != e.answer())
                        .collect();
                    if pool.is_empty() {
                        return Err(Error::InvalidData(
                            "no candidate differs from the true answer".into(),
                        ));
                    }
                    pool[rng.random_range(0..pool.len())]
                }
            };
            out.push(e.with_answer(answer)?);
        }
        Ok(TextSet::new(out))
    }
}

/// A deep copy of `model`'s base weights (adapters are not copied; merged
/// adapters are part of the base).
pub fn clone_decoder(model: &Decoder) -> Result<Decoder> {
    let mut tensors = HashMap::new();
    for (name, var) in model.named_vars() {
        tensors.insert(name, var.as_detached_tensor().copy()?);
    }
    Ok(Decoder::from_tensors(
        model.config().clone(),
        tensors,
        model.device(),
    )?)
}

/// SHA-256 of a decoder's base weights.
pub fn decoder_hash(model: &Decoder) -> Result<String> {
    hash_vars(&model.named_vars())
}

/// What one step's loss sees.
pub(crate) struct StepInput<'a> {
    pub forget: &'a TextBatch,
    pub forget_idx: &'a [usize],
    pub retain: Option<&'a TextBatch>,
}

/// A method's loss, minimised by [`train`].
pub(crate) trait Objective {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor>;
}

/// What [`train`] did.
pub(crate) struct TrainOutcome {
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
}

/// The shared loop (see the module docs). Batches come from `forget_train`
/// (the forget set, or its relabelled form).
///
/// `vars` are the Vars trained (the base weights, or an adapter's); the
/// base weights track gradients during the run only if `train_base`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    model: &Decoder,
    named: Vec<(String, Var)>,
    train_base: bool,
    forget_train: &TextSet,
    retain: Option<&TextSet>,
    cfg: &LmTrainConfig,
    objective: &dyn Objective,
    mask: Option<&SaliencyMask>,
) -> Result<TrainOutcome> {
    let device = model.device().clone();
    let mut opt = AdamW::new(
        named.iter().map(|(_, v)| v.clone()).collect(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    if let Some(mask) = mask {
        mask.apply(&mut opt, &named)?;
    }
    let total = cfg.total_steps(forget_train.len());
    let schedule = if cfg.cosine || cfg.warmup_steps > 0 {
        let min = if cfg.cosine { 0.0 } else { cfg.lr };
        Some(CosineSchedule::new(
            cfg.lr,
            min,
            cfg.warmup_steps.min(total as u64),
            total as u64,
        )?)
    } else {
        None
    };
    let retain_bs = cfg.retain_batch_size.unwrap_or(cfg.batch_size);
    let mut retain_order: Vec<usize> = Vec::new();
    let mut retain_pos = 0usize;
    let mut retain_epoch = 0u64;
    let mut outcome = TrainOutcome {
        steps: 0,
        first_loss: f32::NAN,
        last_loss: f32::NAN,
    };
    let was_trainable = model.is_base_trainable();
    model.set_base_trainable(train_base);
    let result = (|| -> Result<()> {
        for epoch in 0..cfg.epochs {
            let _span = tracing::debug_span!("unlearn_epoch", epoch).entered();
            let order = shuffled(
                forget_train.len(),
                cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37),
            );
            for chunk in order.chunks(cfg.batch_size) {
                if outcome.steps >= total {
                    return Ok(());
                }
                let forget = forget_train.batch(chunk, &device)?;
                let retain_batch = match retain {
                    Some(r) if !r.is_empty() => {
                        let mut idx = Vec::with_capacity(retain_bs);
                        while idx.len() < retain_bs.min(r.len()) {
                            if retain_pos >= retain_order.len() {
                                retain_order = shuffled(
                                    r.len(),
                                    cfg.seed.wrapping_add(0x5EED).wrapping_add(retain_epoch),
                                );
                                retain_epoch += 1;
                                retain_pos = 0;
                            }
                            idx.push(retain_order[retain_pos]);
                            retain_pos += 1;
                        }
                        Some(r.batch(&idx, &device)?)
                    }
                    _ => None,
                };
                let input = StepInput {
                    forget: &forget,
                    forget_idx: chunk,
                    retain: retain_batch.as_ref(),
                };
                if let Some(s) = &schedule {
                    opt.set_learning_rate(s.lr_at(outcome.steps as u64));
                }
                let loss = objective.loss(model, &input)?;
                let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(Error::Diverged(format!(
                        "loss {value} at step {}",
                        outcome.steps
                    )));
                }
                optim::train_step(&mut opt, &loss, cfg.max_grad_norm)?;
                if outcome.steps == 0 {
                    outcome.first_loss = value;
                }
                outcome.last_loss = value;
                outcome.steps += 1;
                tracing::trace!(step = outcome.steps, loss = value, "unlearn step");
            }
        }
        Ok(())
    })();
    model.set_base_trainable(was_trainable);
    result?;
    Ok(outcome)
}

/// What [`fit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Optimizer steps.
    pub steps: usize,
    /// Loss of the first step.
    pub first_loss: f32,
    /// Loss of the last step.
    pub last_loss: f32,
}

/// Ordinary training: minimises the answer-token NLL of `data` with the
/// shared loop (used to train small decoders from scratch for tests and
/// evaluations, and to corrupt or repair models in RESTOR-style runs).
pub fn fit(model: &Decoder, data: &TextSet, cfg: &LmTrainConfig) -> Result<FitReport> {
    cfg.validate()?;
    check_inputs(model, data, None, false)?;
    struct Nll;
    impl Objective for Nll {
        fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
            batch_nll(model, input.forget)
        }
    }
    let out = train(model, model.named_vars(), true, data, None, cfg, &Nll, None)?;
    Ok(FitReport {
        steps: out.steps,
        first_loss: out.first_loss,
        last_loss: out.last_loss,
    })
}

/// Mean next-token NLL over the answer tokens of a batch.
pub(crate) fn batch_nll(model: &Decoder, batch: &TextBatch) -> Result<Tensor> {
    let logits = model.forward(&batch.ids, Mode::Train)?;
    Ok(nn::causal_lm_loss(
        &logits,
        &batch.ids,
        Some(&batch.loss_mask),
    )?)
}

/// The retain term `weight * NLL(retain batch)`, or `None` when the weight
/// is 0.
pub(crate) fn retain_term(
    model: &Decoder,
    retain: Option<&TextBatch>,
    weight: f64,
) -> Result<Option<Tensor>> {
    if weight == 0.0 {
        return Ok(None);
    }
    let batch = retain.ok_or_else(|| {
        Error::InvalidData("the method has a retain term but no retain batch".into())
    })?;
    Ok(Some((batch_nll(model, batch)? * weight)?))
}

/// `a + b` where `b` may be absent.
pub(crate) fn plus(a: Tensor, b: Option<Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => (a + b)?,
        None => a,
    })
}

/// Per-example sum of answer-token log-probabilities under `model`
/// (Eval mode, no gradient), in set order.
pub(crate) fn sequence_log_likelihoods(
    model: &Decoder,
    set: &TextSet,
    batch_size: usize,
) -> Result<Vec<f32>> {
    let was = model.is_base_trainable();
    model.set_base_trainable(false);
    let result = (|| -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(set.len());
        let idx: Vec<usize> = (0..set.len()).collect();
        for chunk in idx.chunks(batch_size.max(1)) {
            let b = set.batch(chunk, model.device())?;
            let logits = model.forward(&b.ids, Mode::Eval)?;
            let lp = nn::sequence_log_probs(&logits, &b.ids, Some(&b.loss_mask))?;
            out.extend(lp.to_vec1::<f32>()?);
        }
        Ok(out)
    })();
    model.set_base_trainable(was);
    result
}

/// `log softmax` over the last dimension.
pub(crate) fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.broadcast_sub(&nn::log_sum_exp(logits)?)?)
}

/// Masked mean over `(b, t-1)` prediction positions of `KL(p_ref || p_model)`
/// for a batch: `ref_logits` are the frozen reference's (detached).
pub(crate) fn kl_to_reference(
    logits: &Tensor,
    ref_logits: &Tensor,
    batch: &TextBatch,
) -> Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let lp = log_softmax(&logits.narrow(1, 0, t - 1)?)?;
    let lq = log_softmax(&ref_logits.narrow(1, 0, t - 1)?.detach())?;
    let q = lq.exp()?;
    let per_pos = (q * (lq - lp)?)?.sum(D::Minus1)?; // (b, t-1)
    let mask = batch.loss_mask.narrow(1, 1, t - 1)?;
    let denom = f64::from(mask.sum_all()?.to_scalar::<f32>()?.max(1.0));
    Ok(((per_pos * mask)?.sum_all()? / denom)?)
}

/// Losses measured by every LM method before and after.
pub(crate) fn measure(
    model: &Decoder,
    prefix: &str,
    forget: &TextSet,
    retain: Option<&TextSet>,
    metrics: &mut BTreeMap<String, f64>,
) -> Result<()> {
    metrics.insert(
        format!("forget_nll_{prefix}"),
        lm_eval::mean_nll(model, forget, 32)?,
    );
    if let Some(r) = retain.filter(|r| !r.is_empty()) {
        metrics.insert(
            format!("retain_nll_{prefix}"),
            lm_eval::mean_nll(model, r, 32)?,
        );
    }
    Ok(())
}

/// Checks the inputs shared by every LM method.
pub(crate) fn check_inputs(
    model: &Decoder,
    forget: &TextSet,
    retain: Option<&TextSet>,
    needs_retain: bool,
) -> Result<()> {
    if forget.is_empty() {
        return Err(Error::InvalidData("the forget set is empty".into()));
    }
    let c = model.config();
    forget.check_fits(c.vocab_size, c.max_position_embeddings)?;
    match retain {
        Some(r) => r.check_fits(c.vocab_size, c.max_position_embeddings)?,
        None if needs_retain => {
            return Err(Error::InvalidData(
                "this method configuration needs a retain set".into(),
            ))
        }
        None => {}
    }
    if needs_retain && retain.is_some_and(TextSet::is_empty) {
        return Err(Error::InvalidData(
            "this method configuration needs a non-empty retain set".into(),
        ));
    }
    Ok(())
}

/// Runs `objective` with the shared loop and fills in a report.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_method(
    name: &'static str,
    hyperparameters: serde_json::Value,
    model: &Decoder,
    forget: &TextSet,
    forget_train: &TextSet,
    retain: Option<&TextSet>,
    cfg: &LmTrainConfig,
    objective: &dyn Objective,
    mask: Option<&SaliencyMask>,
    started: Instant,
    mut metrics: BTreeMap<String, f64>,
) -> Result<UnlearnReport> {
    let weights_before = decoder_hash(model)?;
    measure(model, "before", forget, retain, &mut metrics)?;
    let before = match mask {
        Some(_) => Some(snapshot(&model.named_vars())?),
        None => None,
    };
    let outcome = train(
        model,
        model.named_vars(),
        true,
        forget_train,
        retain,
        cfg,
        objective,
        mask,
    )?;
    if let (Some(mask), Some(before)) = (mask, &before) {
        let changed = mask.count_changed_outside(before, &model.named_vars())?;
        if changed != 0 {
            return Err(Error::Invariant(format!(
                "{changed} weights outside the saliency mask changed"
            )));
        }
        metrics.insert("frozen_weights_changed".into(), 0.0);
    }
    measure(model, "after", forget, retain, &mut metrics)?;
    metrics.insert("first_loss".into(), f64::from(outcome.first_loss));
    metrics.insert("last_loss".into(), f64::from(outcome.last_loss));
    tracing::info!(
        method = name,
        steps = outcome.steps,
        first_loss = outcome.first_loss,
        last_loss = outcome.last_loss,
        "language-model unlearning done"
    );
    Ok(UnlearnReport {
        method: name.to_string(),
        hyperparameters,
        weights_before,
        weights_after: decoder_hash(model)?,
        mask: mask.map(SaliencyMask::summary).transpose()?,
        adapter: None,
        detector_sha256: None,
        suppression_only: false,
        forget_examples: forget.len(),
        retain_examples: retain.map_or(0, TextSet::len),
        steps: outcome.steps,
        seconds: started.elapsed().as_secs_f64(),
        metrics,
    })
}

/// A relabelled copy keeps prompt/answer structure; documents cannot be
/// relabelled. Used by objectives with targets.
pub(crate) fn require_prompts(set: &TextSet) -> Result<()> {
    if let Some(i) = set
        .examples()
        .iter()
        .position(|e: &TextExample| e.prompt_len() == 0)
    {
        return Err(Error::InvalidData(format!(
            "forget example {i} has no prompt: refusal and random-answer targets need \
             prompt/answer examples"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
