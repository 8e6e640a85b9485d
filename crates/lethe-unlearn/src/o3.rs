//! O3: continual unlearning with one orthogonal LoRA adapter and one OOD
//! detector per request (Gao, Wang, Ding, Weng, Wang, Zhu, ICLR 2025, "On
//! Large Language Model Continual Unlearning"; code
//! `GCYZSL/O3-LLM-UNLEARNING`).
//!
//! For request `t`:
//!
//! 1. **Adapter.** A fresh LoRA adapter (rank 8, alpha 16 by default, on
//!    every projection) is trained on the request's forget data with
//!    replaced answers (a refusal, or random answers as O3 does for
//!    multiple choice) while every earlier adapter is frozen and gated off.
//!    The loss adds O-LoRA's orthogonality penalty
//!    `lambda sum_{i<t} ||A_i A_t^T||_F^2` (lambda = 0.1) so the new
//!    adapter's input subspace avoids the earlier ones. The base weights do
//!    not change. O3's code keeps resuming one adapter; this keeps one per
//!    request, as the paper describes (and the brief recommends).
//! 2. **Detector.** An [`OodDetector`] is fitted on the request's queries
//!    (see [`detector`]).
//!
//! At inference ([`O3Unlearner::decide`], [`GatedDecoder`]) every detector
//! scores the query on the base model (all gates 0), each weight `w_i` is
//! mapped by [`GateConfig`] (O3: `w > 0.9 -> 1.2`, `0.3 < w <= 0.4 -> w`,
//! else 0; all four numbers configurable) and adapter `i` runs with that
//! gate: `h = W0 x + sum_i g_i (alpha/r) B_i A_i x`. O3's code applies one
//! cumulative adapter with the maximum weight; per-adapter gates are the
//! brief's recommended form.
//!
//! **Suppression only.** The base weights still encode the forgotten data;
//! reports set `suppression_only`. Pair O3 with a weight-level method when
//! removal must be real.
//!
//! Adapter gates are shared state of the model: a [`GatedDecoder`] sets
//! them for each group of rows and resets them to 0, so one model must not
//! serve concurrent forward passes while it does. LoRA dropout draws from
//! candle's unseeded CPU generator, so `dropout > 0` makes runs
//! irreproducible; the default is 0.

pub mod detector;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Tensor, Var};
use lethe_model::decoder::Decoder;
use lethe_model::lora::{orthogonality_penalty, LoraAdapter, LoraConfig, LoraTarget};
use lethe_model::nn::{self, Mode};
use serde::{Deserialize, Serialize};

pub use detector::{Calibration, DetectorConfig, OodDetector, Pooling};

use crate::data::{TextBatch, TextSet};
use crate::error::ensure_config;
use crate::hash::hash_varmap;
use crate::lm::{
    self, decoder_hash, require_prompts, LmTrainConfig, Objective, Relabel, StepInput,
};
use crate::lm_eval::Scorer;
use crate::report::{AdapterSummary, UnlearnReport};
use crate::{Error, Result};

/// LoRA settings of O3's adapters (serialisable form of
/// [`lethe_model::lora::LoraConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha` (output scaled by `alpha / r`).
    pub alpha: f64,
    /// Dropout on the adapter input while training (0 keeps runs
    /// reproducible; see the module docs).
    #[serde(default)]
    pub dropout: f32,
    /// Projections that get an adapter.
    pub targets: Vec<LoraTarget>,
}

impl AdapterSpec {
    /// O3's setting without dropout: r = 8, alpha = 16, every projection.
    pub fn o3() -> AdapterSpec {
        AdapterSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
        }
    }

    fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
        }
    }
}

/// How a detector weight becomes an adapter gate (O3's post-processing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// Weights above this apply the adapter fully...
    pub full_above: f64,
    /// ...with this gate (O3 over-applies: 1.2).
    pub full_value: f64,
    /// Weights in `(keep_low, keep_high]` are used as the gate as they are.
    pub keep_low: f64,
    /// Upper end of the kept band.
    pub keep_high: f64,
}

impl GateConfig {
    /// O3's constants: `w > 0.9 -> 1.2`, `0.3 < w <= 0.4 -> w`, else 0.
    pub fn o3() -> GateConfig {
        GateConfig {
            full_above: 0.9,
            full_value: 1.2,
            keep_low: 0.3,
            keep_high: 0.4,
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let finite = [
            self.full_above,
            self.full_value,
            self.keep_low,
            self.keep_high,
        ]
        .iter()
        .all(|v| v.is_finite());
        ensure_config(finite, || "gate thresholds must be finite".into())?;
        ensure_config(self.keep_low <= self.keep_high, || {
            format!(
                "gate keep band ({}, {}] is empty or reversed",
                self.keep_low, self.keep_high
            )
        })?;
        ensure_config(self.full_value >= 0.0, || "full_value must be >= 0".into())
    }

    /// The gate for weight `w`.
    pub fn gate(&self, w: f64) -> f64 {
        if w > self.full_above {
            self.full_value
        } else if w > self.keep_low && w <= self.keep_high {
            w
        } else {
            0.0
        }
    }
}

/// O3 settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct O3Config {
    /// The adapters.
    pub adapter: AdapterSpec,
    /// `lambda` of the orthogonality penalty (0.1 in O3).
    pub orthogonal_weight: f64,
    /// What the adapter teaches the model to answer instead.
    pub target: Relabel,
    /// Adapter optimisation (O3: AdamW lr 3e-4, 15 epochs).
    pub train: LmTrainConfig,
    /// The per-request detector.
    pub detector: DetectorConfig,
    /// Weight-to-gate mapping.
    pub gate: GateConfig,
}

impl O3Config {
    /// Checks every part.
    pub fn validate(&self) -> Result<()> {
        self.adapter.lora_validate()?;
        ensure_config(
            self.orthogonal_weight.is_finite() && self.orthogonal_weight >= 0.0,
            || {
                format!(
                    "orthogonal_weight must be >= 0, got {}",
                    self.orthogonal_weight
                )
            },
        )?;
        self.target.validate()?;
        self.train.validate()?;
        self.detector.validate()?;
        self.gate.validate()
    }
}

impl AdapterSpec {
    fn lora_validate(&self) -> Result<()> {
        ensure_config(self.rank > 0, || "adapter rank must be > 0".into())?;
        ensure_config(self.alpha.is_finite() && self.alpha > 0.0, || {
            "adapter alpha must be > 0".into()
        })?;
        ensure_config((0.0..1.0).contains(&self.dropout), || {
            format!("adapter dropout must be in [0, 1), got {}", self.dropout)
        })?;
        ensure_config(!self.targets.is_empty(), || {
            "adapter targets are empty".into()
        })
    }
}

/// One served request: its adapter and its detector.
#[derive(Debug, Clone)]
pub struct O3Request {
    /// The caller's request id.
    pub id: String,
    /// The unlearning adapter (attached to the model, gated per query).
    pub adapter: LoraAdapter,
    /// The detector deciding when to apply it.
    pub detector: OodDetector,
}

/// The gate decision of one request's detector for one query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateDecision {
    /// Detector score (higher = more like that request's forget data).
    pub score: f64,
    /// Calibrated weight in `(0, 1)`.
    pub weight: f64,
    /// Gate applied to the adapter.
    pub gate: f64,
}

/// One completion served through O3's gates ([`O3Unlearner::complete`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GatedCompletion {
    /// The generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Each request's gate decision for the prompt, in request order.
    pub gates: Vec<GateDecision>,
}

/// O3's state across requests.
#[derive(Debug)]
pub struct O3Unlearner {
    config: O3Config,
    requests: Vec<O3Request>,
}

/// O3's adapter loss: CE on the relabelled forget batch plus
/// `lambda` times the orthogonality penalty against earlier adapters.
pub(crate) struct O3Objective<'a> {
    pub(crate) adapter: &'a LoraAdapter,
    pub(crate) previous: Vec<&'a LoraAdapter>,
    pub(crate) lambda: f64,
}

impl Objective for O3Objective<'_> {
    fn loss(&self, model: &Decoder, input: &StepInput<'_>) -> Result<Tensor> {
        let nll = batch_nll_adapter(model, input.forget)?;
        if self.previous.is_empty() || self.lambda == 0.0 {
            return Ok(nll);
        }
        let pen = orthogonality_penalty(self.adapter, &self.previous)?;
        Ok((nll + (pen * self.lambda)?)?)
    }
}

fn batch_nll_adapter(model: &Decoder, batch: &TextBatch) -> Result<Tensor> {
    let logits = model.forward(&batch.ids, Mode::Train)?;
    Ok(nn::causal_lm_loss(
        &logits,
        &batch.ids,
        Some(&batch.loss_mask),
    )?)
}

impl O3Unlearner {
    /// An unlearner with no request yet.
    pub fn new(config: O3Config) -> Result<O3Unlearner> {
        config.validate()?;
        Ok(O3Unlearner {
            config,
            requests: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &O3Config {
        &self.config
    }

    /// Requests served so far, in order.
    pub fn requests(&self) -> &[O3Request] {
        &self.requests
    }

    /// Takes back a request served earlier (its saved adapter and detector,
    /// e.g. by an earlier run of the compliance workflow): the adapter is
    /// attached to `model` gated off and frozen, so later requests are
    /// trained orthogonal to it and gated decoding applies it. The adapter
    /// is renamed `o3-N` by its position; a repeated request id or an
    /// adapter that does not fit the model is an error, and nothing changes.
    pub fn restore(
        &mut self,
        model: &mut Decoder,
        id: &str,
        adapter: LoraAdapter,
        detector: OodDetector,
    ) -> Result<()> {
        if id.is_empty() {
            return Err(Error::InvalidData("request id is empty".into()));
        }
        if self.requests.iter().any(|r| r.id == id) {
            return Err(Error::InvalidData(format!(
                "request {id} was already served"
            )));
        }
        let adapter = adapter.renamed(&format!("o3-{}", self.requests.len()))?;
        adapter.set_gate(0.0)?;
        adapter.set_trainable(false);
        model.attach_adapter(&adapter)?;
        self.requests.push(O3Request {
            id: id.to_string(),
            adapter,
            detector,
        });
        Ok(())
    }

    /// Serves one request: trains its adapter (attached to `model`, left
    /// gated off) and fits its detector. The base weights are unchanged.
    pub fn unlearn(
        &mut self,
        model: &mut Decoder,
        request_id: &str,
        forget: &TextSet,
    ) -> Result<UnlearnReport> {
        self.unlearn_with_negatives(model, request_id, forget, &[])
    }

    /// [`O3Unlearner::unlearn`], then calibrates the new detector against
    /// `negatives`, queries of data that is kept
    /// ([`OodDetector::calibrate_negatives`]): at most the configured
    /// `max_false_positive` share of them opens the new adapter's gate.
    pub fn unlearn_with_negatives(
        &mut self,
        model: &mut Decoder,
        request_id: &str,
        forget: &TextSet,
        negatives: &[&[u32]],
    ) -> Result<UnlearnReport> {
        let started = Instant::now();
        if request_id.is_empty() {
            return Err(Error::InvalidData("request id is empty".into()));
        }
        if self.requests.iter().any(|r| r.id == request_id) {
            return Err(Error::InvalidData(format!(
                "request {request_id} was already served"
            )));
        }
        lm::check_inputs(model, forget, None, false)?;
        require_prompts(forget)?;
        let t = self.requests.len();
        let cfg = &self.config;
        let weights_before = decoder_hash(model)?;
        let targets = cfg
            .target
            .apply(forget, cfg.train.seed.wrapping_add(t as u64))?;
        targets.check_fits(
            model.config().vocab_size,
            model.config().max_position_embeddings,
        )?;
        for r in &self.requests {
            r.adapter.set_gate(0.0)?;
            r.adapter.set_trainable(false);
        }
        let name = format!("o3-{t}");
        let adapter = LoraAdapter::new(
            model,
            &name,
            cfg.adapter.lora(),
            cfg.train.seed.wrapping_add(1000 + t as u64),
        )?;
        model.attach_adapter(&adapter)?;
        let trained = (|| -> Result<(lm::TrainOutcome, f64, f64)> {
            adapter.set_gate(1.0)?;
            adapter.set_trainable(true);
            let previous: Vec<&LoraAdapter> = self.requests.iter().map(|r| &r.adapter).collect();
            let pen_before = penalty_value(&adapter, &previous)?;
            let named: Vec<(String, Var)> = adapter
                .vars()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{name}.{i}"), v))
                .collect();
            let objective = O3Objective {
                adapter: &adapter,
                previous: previous.clone(),
                lambda: cfg.orthogonal_weight,
            };
            let outcome = lm::train(
                model, named, false, &targets, None, &cfg.train, &objective, None,
            )?;
            let pen_after = penalty_value(&adapter, &previous)?;
            Ok((outcome, pen_before, pen_after))
        })();
        adapter.set_trainable(false);
        adapter.set_gate(0.0)?;
        let (outcome, pen_before, pen_after) = match trained {
            Ok(v) => v,
            Err(e) => {
                model.detach_adapter(&name)?;
                return Err(e);
            }
        };
        let queries: Vec<&[u32]> = forget.examples().iter().map(|e| e.query()).collect();
        let mut det_cfg = cfg.detector.clone();
        det_cfg.seed = det_cfg.seed.wrapping_add(t as u64);
        let detector = match OodDetector::fit(model, &queries, &det_cfg).and_then(|mut d| {
            d.calibrate_negatives(model, negatives)?;
            Ok(d)
        }) {
            Ok(d) => d,
            Err(e) => {
                model.detach_adapter(&name)?;
                return Err(e);
            }
        };
        let weights_after = decoder_hash(model)?;
        if weights_after != weights_before {
            return Err(Error::Invariant(
                "O3 changed the base weights of the model".into(),
            ));
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("first_loss".into(), f64::from(outcome.first_loss));
        metrics.insert("last_loss".into(), f64::from(outcome.last_loss));
        metrics.insert("orthogonality_penalty_before".into(), pen_before);
        metrics.insert("orthogonality_penalty_after".into(), pen_after);
        metrics.insert("earlier_adapters".into(), t as f64);
        let (m1, m2, s2) = detector.calibration_stats();
        metrics.insert("detector_fit_mean".into(), m1);
        metrics.insert("detector_calibration_mean".into(), m2);
        metrics.insert("detector_calibration_sd".into(), s2);
        metrics.insert("detector_negatives".into(), negatives.len() as f64);
        if let Some(f) = detector.floor() {
            metrics.insert("detector_negative_floor".into(), f);
        }
        let report = UnlearnReport {
            method: "o3".into(),
            hyperparameters: serde_json::to_value(cfg).unwrap_or(serde_json::Value::Null),
            weights_before,
            weights_after,
            mask: None,
            adapter: Some(AdapterSummary {
                name: name.clone(),
                sha256: hash_varmap(adapter.varmap())?,
                parameters: adapter.num_parameters(),
            }),
            detector_sha256: Some(detector.sha256()),
            suppression_only: true,
            forget_examples: forget.len(),
            retain_examples: 0,
            steps: outcome.steps,
            seconds: started.elapsed().as_secs_f64(),
            metrics,
        };
        tracing::info!(request = request_id, adapter = %name, steps = outcome.steps, "O3 request served");
        self.requests.push(O3Request {
            id: request_id.to_string(),
            adapter,
            detector,
        });
        Ok(report)
    }

    /// `sum over pairs i < j of ||A_i A_j^T||_F^2` over all served adapters.
    pub fn total_orthogonality_penalty(&self) -> Result<f64> {
        let mut total = 0f64;
        for j in 1..self.requests.len() {
            let prev: Vec<&LoraAdapter> = self.requests[..j].iter().map(|r| &r.adapter).collect();
            total += penalty_value(&self.requests[j].adapter, &prev)?;
        }
        Ok(total)
    }

    /// Gate decisions `out[q][i]` of every request `i` for every query `q`,
    /// scored on the base model (all gates are 0 after the call).
    pub fn decide(&self, model: &Decoder, queries: &[&[u32]]) -> Result<Vec<Vec<GateDecision>>> {
        self.zero_gates()?;
        let mut out = vec![Vec::with_capacity(self.requests.len()); queries.len()];
        if queries.is_empty() {
            return Ok(out);
        }
        for r in &self.requests {
            let scores = r.detector.scores(model, queries)?;
            for (q, s) in scores.into_iter().enumerate() {
                let w = r.detector.weight(s);
                out[q].push(GateDecision {
                    score: s,
                    weight: w,
                    gate: self.config.gate.gate(w),
                });
            }
        }
        Ok(out)
    }

    /// Greedy completion of `prompt` as O3 serves it: every detector scores
    /// the prompt on the base model, each adapter runs with its gate for the
    /// whole completion, then all gates go back to 0. Returns the new tokens
    /// (at most `max_new_tokens`, stopping after any id in `stop`) and the
    /// gate decisions, one per request in order. Gates are shared state of
    /// `model` (see the module docs): callers serialise completions.
    pub fn complete(
        &self,
        model: &Decoder,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<GatedCompletion> {
        if prompt.is_empty() {
            return Err(Error::InvalidData("empty prompt".into()));
        }
        let gates = self.decide(model, &[prompt])?.pop().unwrap_or_default();
        let tokens = self.under_gates(model, || {
            for (r, g) in self.requests.iter().zip(&gates) {
                r.adapter.set_gate(g.gate)?;
            }
            Ok(model.greedy(prompt, max_new_tokens, stop)?)
        })?;
        Ok(GatedCompletion { tokens, gates })
    }

    /// Runs `f` (which sets adapter gates) with the base weights frozen,
    /// then restores their trainability and turns every gate off again,
    /// whatever `f` returned.
    fn under_gates<R>(&self, model: &Decoder, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let was = model.is_base_trainable();
        model.set_base_trainable(false);
        let result = f();
        model.set_base_trainable(was);
        self.zero_gates()?;
        result
    }

    /// A [`Scorer`] that gates each row by its query.
    pub fn gated<'a>(&'a self, model: &'a Decoder) -> GatedDecoder<'a> {
        GatedDecoder { model, o3: self }
    }

    fn zero_gates(&self) -> Result<()> {
        for r in &self.requests {
            r.adapter.set_gate(0.0)?;
        }
        Ok(())
    }
}

fn penalty_value(adapter: &LoraAdapter, previous: &[&LoraAdapter]) -> Result<f64> {
    if previous.is_empty() {
        return Ok(0.0);
    }
    Ok(f64::from(
        orthogonality_penalty(adapter, previous)?
            .detach()
            .to_scalar::<f32>()?,
    ))
}

/// A decoder whose O3 adapters are gated per query (see the module docs).
#[derive(Debug)]
pub struct GatedDecoder<'a> {
    model: &'a Decoder,
    o3: &'a O3Unlearner,
}

impl Scorer for GatedDecoder<'_> {
    fn device(&self) -> &candle_core::Device {
        self.model.device()
    }

    fn logits(&self, batch: &TextBatch, queries: &[&[u32]]) -> Result<Tensor> {
        let (b, _) = batch.ids.dims2()?;
        if queries.len() != b {
            return Err(Error::InvalidData(format!(
                "{} queries for a batch of {b}",
                queries.len()
            )));
        }
        let decisions = self.o3.decide(self.model, queries)?;
        // Group rows with identical gate vectors.
        let mut groups: BTreeMap<Vec<u64>, Vec<u32>> = BTreeMap::new();
        for (row, d) in decisions.iter().enumerate() {
            let key: Vec<u64> = d.iter().map(|g| g.gate.to_bits()).collect();
            groups.entry(key).or_default().push(row as u32);
        }
        self.o3.under_gates(self.model, || {
            let mut parts = Vec::with_capacity(groups.len());
            let mut order = Vec::with_capacity(b);
            for (key, rows) in &groups {
                for (r, bits) in self.o3.requests.iter().zip(key) {
                    r.adapter.set_gate(f64::from_bits(*bits))?;
                }
                let idx = Tensor::from_slice(rows, rows.len(), self.model.device())?;
                let ids = batch.ids.index_select(&idx, 0)?;
                parts.push(self.model.forward(&ids, Mode::Eval)?);
                order.extend_from_slice(rows);
            }
            let all = Tensor::cat(&parts, 0)?;
            // Row `order[k]` sits at position k: invert the permutation.
            let mut inverse = vec![0u32; b];
            for (k, &row) in order.iter().enumerate() {
                inverse[row as usize] = k as u32;
            }
            let inv = Tensor::from_vec(inverse, b, self.model.device())?;
            Ok(all.index_select(&inv, 0)?)
        })
    }
}

#[cfg(test)]
mod tests;
