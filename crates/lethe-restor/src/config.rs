//! The evaluation's configuration, read from TOML (`evals/restor/*.toml`).
//!
//! Sections map to pipeline stages, and each stage's checkpoint key hashes
//! exactly the sections it depends on (see [`crate::pipeline`]): changing
//! a method's learning rate recomputes that method only, changing the
//! corruption recipe recomputes corruption and every method, changing the
//! world recomputes everything.

use std::path::Path;

use lethe_model::decoder::Config as DecoderConfig;
use lethe_unlearn::lm::{LmMethodConfig, LmTrainConfig, Relabel};
use lethe_unlearn::o3::{AdapterSpec, DetectorConfig, GateConfig, O3Config};
use serde::{Deserialize, Serialize};

use crate::error::ensure;
use crate::world::{WorldConfig, MAX_K, UNKNOWN};
use crate::{Error, Result};

/// The whole evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestorConfig {
    /// Seeds: each runs clean training, corruption and every method.
    pub seeds: Vec<u64>,
    /// k-mixing variants to run (each in `0..=5`).
    pub ks: Vec<usize>,
    /// Rows per evaluation forward pass.
    #[serde(default = "default_eval_batch")]
    pub eval_batch: usize,
    /// Inner edges of the clean-confidence buckets (increasing, in (0, 1)).
    pub confidence_edges: Vec<f64>,
    /// Where models train and run: `cpu` (default), `cuda` or `cuda:N`
    /// (needs a build with the `cuda` feature). Checkpoints do not depend
    /// on it: a stage finished on one device is reused on another.
    #[serde(default)]
    pub device: Option<String>,
    /// Checkpoint folder (default: `<out_dir>/stages`).
    #[serde(default)]
    pub checkpoint_dir: Option<String>,
    /// The synthetic world.
    pub world: WorldConfig,
    /// The decoder's shape.
    pub model: ModelShape,
    /// Clean training and its gate.
    pub clean: CleanStage,
    /// Corruption and its gate.
    pub corrupt: CorruptStage,
    /// The unlearning methods, in report order.
    pub methods: Vec<MethodEntry>,
    /// Criteria of the reproduction statement.
    pub finding: FindingCriteria,
}

fn default_eval_batch() -> usize {
    64
}

/// The decoder's shape (vocabulary size and positions come from the world).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
}

impl ModelShape {
    /// The decoder config for a vocabulary and a longest document.
    pub fn decoder(&self, vocab: usize, max_len: usize) -> DecoderConfig {
        let mut c = DecoderConfig::new(
            vocab,
            self.hidden_size,
            self.intermediate_size,
            self.layers,
            self.heads,
            max_len.next_power_of_two().max(64),
        );
        c.bos_token_id = Some(crate::world::BOS);
        c.eos_token_id = Some(crate::world::EOS);
        c
    }
}

/// Clean training from scratch on the true corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanStage {
    /// Optimisation (its `seed` is replaced per run).
    pub train: LmTrainConfig,
    /// Gate: smallest target-fact accuracy of the clean model.
    pub min_target_accuracy: f64,
}

/// Continued training on the corruption documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorruptStage {
    /// Optimisation (its `seed` is replaced per run).
    pub train: LmTrainConfig,
    /// Epochs per k variant, in the order of `ks` (default: `train.epochs`
    /// for every k). Documents with more mixed-in true facts dilute the
    /// corrupting signal, so a larger budget keeps every variant corrupted
    /// to a comparable degree (the gate).
    #[serde(default)]
    pub epochs_per_k: Option<Vec<usize>>,
    /// Train a LoRA adapter and merge it into the weights (RESTOR's
    /// recipe) instead of updating every weight; `None`: full fine-tuning.
    #[serde(default)]
    pub lora: Option<AdapterSpec>,
    /// Parameters kept fixed during full fine-tuning: a parameter is
    /// frozen when its name contains one of these patterns (e.g.
    /// `embed_tokens`, `lm_head`, `norm`, `self_attn`, `layers.0.`).
    /// Must be empty with `lora`.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Gate-driven early stop of the corruption (recorded per stage).
    #[serde(default)]
    pub early_stop: Option<EarlyStop>,
    /// Gate: smallest drop of target accuracy (fraction, 0.4 = 40 points).
    pub min_target_drop: f64,
    /// Gate: largest absolute change of non-target accuracy (fraction).
    pub max_nontarget_change: f64,
}

/// Stops the corruption as soon as the target accuracy has dropped far
/// enough below the clean model's: every `every` optimiser steps the
/// target facts are evaluated (greedy exact match, as in the gate) and
/// training ends once `clean - current >= drop`. Corrupting no further
/// than the gate needs keeps the collateral damage on other entities
/// small; the steps actually taken are part of each stage's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStop {
    /// Target-accuracy drop (fraction) that ends the corruption.
    pub drop: f64,
    /// Optimiser steps between checks (> 0).
    pub every: usize,
}

/// One unlearning method of the comparison: exactly one of `lm` and `o3`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodEntry {
    /// Name in the report (`GA`, `NPO`, ...); unique.
    pub label: String,
    /// A weight-level method of `lethe_unlearn::lm`.
    #[serde(default)]
    pub lm: Option<LmMethodConfig>,
    /// O3 (adapter + detector; suppression only).
    #[serde(default)]
    pub o3: Option<O3Spec>,
}

/// What O3's adapter teaches the model to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum O3Target {
    /// The word `unknown` (O3's refusal; never in the corpus).
    Refusal,
    /// A random value of any type (O3's random answers), never the
    /// asserted value itself.
    RandomAnswer,
}

/// O3's settings in world terms (targets are named, not token ids).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct O3Spec {
    /// The adapter.
    pub adapter: AdapterSpec,
    /// Orthogonality weight (unused with one request; kept for O3 parity).
    pub orthogonal_weight: f64,
    /// Replacement answers.
    pub target: O3Target,
    /// Adapter optimisation.
    pub train: LmTrainConfig,
    /// The detector.
    pub detector: DetectorConfig,
    /// Weight-to-gate mapping.
    pub gate: GateConfig,
}

impl O3Spec {
    /// The `lethe_unlearn` config with training seed `seed`; `values` are
    /// the candidate answers of [`O3Target::RandomAnswer`].
    pub fn o3_config(&self, seed: u64, values: &[Vec<u32>]) -> O3Config {
        let mut train = self.train.clone();
        train.seed = seed;
        O3Config {
            adapter: self.adapter.clone(),
            orthogonal_weight: self.orthogonal_weight,
            target: match self.target {
                O3Target::Refusal => Relabel::Refusal {
                    answer: vec![UNKNOWN],
                },
                O3Target::RandomAnswer => Relabel::RandomAnswer {
                    candidates: values.to_vec(),
                    exclude_true: true,
                },
            },
            train,
            detector: self.detector.clone(),
            gate: self.gate.clone(),
        }
    }
}

/// Thresholds of the statement "GA and KL forget without restoring; NPO
/// restores, more at small k".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindingCriteria {
    /// Labels of the methods expected to forget without restoring.
    pub forgetters: Vec<String>,
    /// Label of the method expected to restore.
    pub restorer: String,
    /// Forgetting ratio at least this counts as "forgets".
    pub forget_min: f64,
    /// Recovery at most this counts as "does not restore".
    pub no_restore_max: f64,
    /// Recovery at least this counts as "restores".
    pub restore_min: f64,
}

impl RestorConfig {
    /// The corruption training of variant `k` (epochs from
    /// `epochs_per_k` when set).
    pub fn corrupt_train(&self, k: usize) -> LmTrainConfig {
        let mut t = self.corrupt.train.clone();
        if let (Some(e), Some(i)) = (
            &self.corrupt.epochs_per_k,
            self.ks.iter().position(|&x| x == k),
        ) {
            t.epochs = e[i];
        }
        t
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<RestorConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
        let cfg: RestorConfig = toml::from_str(&text).map_err(|e| Error::ConfigParse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every section.
    pub fn validate(&self) -> Result<()> {
        ensure(!self.seeds.is_empty(), || "seeds is empty".into())?;
        let mut seeds = self.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
        ensure(seeds.len() == self.seeds.len(), || "seeds repeat".into())?;
        ensure(!self.ks.is_empty(), || "ks is empty".into())?;
        ensure(self.ks.iter().all(|&k| k <= MAX_K), || {
            format!("every k must be in 0..={MAX_K}")
        })?;
        let mut ks = self.ks.clone();
        ks.sort_unstable();
        ks.dedup();
        ensure(ks == self.ks, || {
            "ks must be increasing and distinct".into()
        })?;
        ensure(self.eval_batch > 0, || "eval_batch must be > 0".into())?;
        if let Some(d) = &self.device {
            d.parse::<lethe_model::DeviceSpec>()
                .map_err(|e| Error::InvalidConfig(format!("device: {e}")))?;
        }
        ensure(
            self.confidence_edges.windows(2).all(|w| w[0] < w[1])
                && self.confidence_edges.iter().all(|&e| e > 0.0 && e < 1.0),
            || "confidence_edges must be increasing, in (0, 1)".into(),
        )?;
        self.world.validate()?;
        let m = &self.model;
        ensure(
            m.hidden_size > 0 && m.intermediate_size > 0 && m.layers > 0 && m.heads > 0,
            || "model sizes must be > 0".into(),
        )?;
        ensure(m.hidden_size % m.heads == 0, || {
            "model.hidden_size must be a multiple of model.heads".into()
        })?;
        self.clean.train.validate()?;
        ensure(
            (0.0..=1.0).contains(&self.clean.min_target_accuracy),
            || "clean.min_target_accuracy must be in [0, 1]".into(),
        )?;
        self.corrupt.train.validate()?;
        if let Some(l) = &self.corrupt.lora {
            ensure(
                l.rank > 0 && l.alpha.is_finite() && l.alpha > 0.0 && !l.targets.is_empty(),
                || "corrupt.lora needs rank > 0, alpha > 0 and targets".into(),
            )?;
            ensure(l.dropout == 0.0, || {
                "corrupt.lora.dropout must be 0 (candle's dropout cannot be seeded)".into()
            })?;
        }
        ensure(
            self.corrupt.lora.is_none() || self.corrupt.freeze.is_empty(),
            || "corrupt.freeze applies to full fine-tuning only, not with corrupt.lora".into(),
        )?;
        ensure(self.corrupt.freeze.iter().all(|p| !p.is_empty()), || {
            "corrupt.freeze entries must be non-empty name patterns".into()
        })?;
        if let Some(e) = &self.corrupt.early_stop {
            ensure(e.drop > 0.0 && e.drop <= 1.0 && e.every > 0, || {
                "corrupt.early_stop needs drop in (0, 1] and every > 0".into()
            })?;
        }
        if let Some(e) = &self.corrupt.epochs_per_k {
            ensure(e.len() == self.ks.len() && e.iter().all(|&x| x > 0), || {
                "corrupt.epochs_per_k needs one positive entry per k".into()
            })?;
        }
        ensure((0.0..=1.0).contains(&self.corrupt.min_target_drop), || {
            "corrupt.min_target_drop must be in [0, 1]".into()
        })?;
        ensure(
            (0.0..=1.0).contains(&self.corrupt.max_nontarget_change),
            || "corrupt.max_nontarget_change must be in [0, 1]".into(),
        )?;
        ensure(!self.methods.is_empty(), || "methods is empty".into())?;
        let mut labels: Vec<&str> = Vec::new();
        for m in &self.methods {
            ensure(!m.label.is_empty(), || "a method label is empty".into())?;
            ensure(!["clean", "corrupted"].contains(&m.label.as_str()), || {
                format!("method label {:?} is reserved", m.label)
            })?;
            ensure(!labels.contains(&m.label.as_str()), || {
                format!("method label {:?} repeats", m.label)
            })?;
            labels.push(&m.label);
            match (&m.lm, &m.o3) {
                (Some(lm), None) => lm.method().validate()?,
                (None, Some(o3)) => o3
                    .o3_config(0, &[vec![UNKNOWN], vec![UNKNOWN + 1]])
                    .validate()?,
                _ => {
                    return Err(Error::InvalidConfig(format!(
                        "method {:?} needs exactly one of `lm` and `o3`",
                        m.label
                    )))
                }
            }
        }
        let f = &self.finding;
        for l in f.forgetters.iter().chain(std::iter::once(&f.restorer)) {
            ensure(labels.contains(&l.as_str()), || {
                format!("finding names method {l:?}, which is not configured")
            })?;
        }
        Ok(())
    }
}

/// `method` with its training seed set to `seed`.
pub fn with_seed(method: &LmMethodConfig, seed: u64) -> LmMethodConfig {
    let mut m = method.clone();
    match &mut m {
        LmMethodConfig::Ga(c) => c.train.seed = seed,
        LmMethodConfig::GradDiff(c) => c.train.seed = seed,
        LmMethodConfig::Npo(c) => c.train.seed = seed,
        LmMethodConfig::Kl(c) => c.train.seed = seed,
        LmMethodConfig::Salun(c) => c.train.seed = seed,
        // New methods keep their configured seed.
        #[allow(unreachable_patterns)]
        _ => {}
    }
    m
}
