//! LoRA adapters, written in the project (Hu et al. 2021, "LoRA: Low-Rank
//! Adaptation of Large Language Models"; layout and file format of HF PEFT).
//!
//! Why not `candle-lora`: it is unmaintained and scales the base output
//! wrongly. Here a linear layer computes
//!
//! ```text
//! y = x W^T (+ b) + sum over attached adapters i of  g_i * (alpha_i / r_i) * dropout(x) A_i^T B_i^T
//! ```
//!
//! with `A_i` `(r, in)` (Kaiming-uniform init, as PEFT) and `B_i` `(out, r)`
//! (zeros, so a fresh adapter is the identity). `g_i` is the adapter's
//! *gate*: O3 applies each unlearning adapter with a per-query weight, and
//! gate 0 leaves the base output bit-identical. Dropout is active only in
//! [`Mode::Train`].
//!
//! * [`LoraLinear`] is the wrapper around a `candle_nn::Linear` that the
//!   decoder owns for every projection; adapters are attached to it, never
//!   forked into it.
//! * [`LoraAdapter`] is one adapter over a whole model: its A/B matrices live
//!   in their own [`VarMap`], so an optimizer given [`LoraAdapter::vars`]
//!   trains only them. Several adapters can be stacked on one base.
//! * Merging folds `g * alpha/r * B A` into the base weight; unmerging
//!   subtracts the same product (exact inverse up to f32 rounding, < 1e-5).
//! * Files: `adapter_model.safetensors` (PEFT tensor names
//!   `base_model.model.<site>.lora_A.weight`) plus `adapter_config.json`.
//! * [`orthogonality_penalty`] is O3's / O-LoRA's `sum ||A_i A_t^T||_F^2`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::decoder::Decoder;
use crate::nn::{Mode, Param};
use crate::{Error, Result};

/// File name of an adapter's weights inside its folder.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of an adapter's configuration inside its folder.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
const PEFT_PREFIX: &str = "base_model.model.";

/// A projection of the decoder that an adapter can target (PEFT module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LoraTarget {
    /// Attention query projection.
    #[serde(rename = "q_proj")]
    Q,
    /// Attention key projection.
    #[serde(rename = "k_proj")]
    K,
    /// Attention value projection.
    #[serde(rename = "v_proj")]
    V,
    /// Attention output projection.
    #[serde(rename = "o_proj")]
    O,
    /// MLP gate projection.
    #[serde(rename = "gate_proj")]
    Gate,
    /// MLP up projection.
    #[serde(rename = "up_proj")]
    Up,
    /// MLP down projection.
    #[serde(rename = "down_proj")]
    Down,
}

impl LoraTarget {
    /// Every target, in layer order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The HF module name (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }
}

/// Hyper-parameters of one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (> 0).
    pub rank: usize,
    /// `alpha`; the adapter output is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout probability on the adapter input during training, in `[0, 1)`.
    pub dropout: f32,
    /// Which projections get an adapter (non-empty, no duplicates).
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// O3's setting: r = 8, alpha = 16, dropout 0.05 on all seven projections.
    pub fn o3() -> LoraConfig {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: LoraTarget::ALL.to_vec(),
        }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument("LoRA rank must be > 0".into()));
        }
        if !self.alpha.is_finite() {
            return Err(Error::InvalidArgument("LoRA alpha must be finite".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::InvalidArgument(
                "LoRA needs at least one target".into(),
            ));
        }
        let mut seen = self.targets.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.targets.len() {
            return Err(Error::InvalidArgument("LoRA targets repeat".into()));
        }
        Ok(())
    }
}

/// On-disk form of the adapter config: PEFT's keys plus lethe's own.
#[derive(Debug, Serialize, Deserialize)]
struct AdapterConfigFile {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    lora_dropout: f32,
    target_modules: Vec<LoraTarget>,
    #[serde(default = "default_bias")]
    bias: String,
    #[serde(default)]
    task_type: Option<String>,
    /// lethe: the adapter's name.
    lethe_name: String,
    /// lethe: the gate the adapter was saved with.
    #[serde(default = "default_gate")]
    lethe_gate: f64,
}

fn default_bias() -> String {
    "none".into()
}

fn default_gate() -> f64 {
    1.0
}

/// Gate and trainability of one adapter, shared with every layer it is
/// attached to (so changing the gate needs no access to the model).
#[derive(Debug)]
struct AdapterState {
    gate_bits: AtomicU64,
    trainable: AtomicBool,
}

impl AdapterState {
    fn gate(&self) -> f64 {
        f64::from_bits(self.gate_bits.load(Ordering::Relaxed))
    }
}

/// The A and B matrices of one adapter at one projection.
#[derive(Debug, Clone)]
struct LoraPair {
    a: Var,
    b: Var,
}

/// A LoRA adapter over a whole decoder: one (A, B) pair per targeted
/// projection, keyed by the projection's HF module path
/// (`model.layers.3.self_attn.q_proj`).
///
/// Invariant: `pairs` is non-empty, every A is `(rank, in)`, every B is
/// `(out, rank)`, and `varmap` holds exactly these Vars under PEFT names.
#[derive(Clone)]
pub struct LoraAdapter {
    name: String,
    config: LoraConfig,
    varmap: VarMap,
    pairs: BTreeMap<String, LoraPair>,
    state: Arc<AdapterState>,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("sites", &self.pairs.len())
            .field("gate", &self.gate())
            .finish_non_exhaustive()
    }
}

impl LoraAdapter {
    /// A fresh adapter for `decoder`: A Kaiming-uniform (bound `1/sqrt(in)`,
    /// PEFT's default) from a generator seeded by `seed`, B zero, gate 1,
    /// trainable.
    pub fn new(
        decoder: &Decoder,
        name: &str,
        config: LoraConfig,
        seed: u64,
    ) -> Result<LoraAdapter> {
        config.validate()?;
        if name.is_empty() {
            return Err(Error::InvalidArgument("adapter name is empty".into()));
        }
        let device = decoder.device().clone();
        let mut rng = StdRng::seed_from_u64(seed);
        let varmap = VarMap::new();
        let mut pairs = BTreeMap::new();
        for site in decoder.lora_sites() {
            if !config.targets.contains(&site.target) {
                continue;
            }
            let bound = 1.0 / (site.in_features as f64).sqrt();
            let a_data: Vec<f32> = (0..config.rank * site.in_features)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(
                a_data,
                (config.rank, site.in_features),
                &device,
            )?)?;
            let b = Var::zeros((site.out_features, config.rank), DType::F32, &device)?;
            insert_pair(&varmap, &site.path, &a, &b);
            pairs.insert(site.path, LoraPair { a, b });
        }
        if pairs.is_empty() {
            return Err(Error::InvalidArgument(
                "the decoder has no projection matching the LoRA targets".into(),
            ));
        }
        Ok(LoraAdapter::from_parts(
            name.to_string(),
            config,
            varmap,
            pairs,
            1.0,
        ))
    }

    fn from_parts(
        name: String,
        config: LoraConfig,
        varmap: VarMap,
        pairs: BTreeMap<String, LoraPair>,
        gate: f64,
    ) -> LoraAdapter {
        LoraAdapter {
            name,
            config,
            varmap,
            pairs,
            state: Arc::new(AdapterState {
                gate_bits: AtomicU64::new(gate.to_bits()),
                trainable: AtomicBool::new(true),
            }),
        }
    }

    /// The adapter's name (unique among the adapters attached to a model).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same adapter under another name (to attach adapters loaded from
    /// separate folders that were saved under one name). Errors on an empty
    /// name.
    pub fn renamed(mut self, name: &str) -> Result<LoraAdapter> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("adapter name is empty".into()));
        }
        self.name = name.to_string();
        Ok(self)
    }

    /// Its hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The current gate.
    pub fn gate(&self) -> f64 {
        self.state.gate()
    }

    /// Sets the gate that scales this adapter's output in every layer it is
    /// attached to. Takes effect on the next forward pass; a *merged*
    /// adapter keeps the gate it was merged with until it is unmerged.
    pub fn set_gate(&self, gate: f64) -> Result<()> {
        if !gate.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "gate must be finite, got {gate}"
            )));
        }
        self.state
            .gate_bits
            .store(gate.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// Whether forward passes track gradients of this adapter's A and B.
    /// Freeze earlier adapters while training a new one on top of them.
    pub fn set_trainable(&self, trainable: bool) {
        self.state.trainable.store(trainable, Ordering::Relaxed);
    }

    /// Whether gradients are tracked.
    pub fn is_trainable(&self) -> bool {
        self.state.trainable.load(Ordering::Relaxed)
    }

    /// The VarMap holding A and B (PEFT names).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every A and B Var, in site order (A then B): what an optimizer trains.
    pub fn vars(&self) -> Vec<Var> {
        self.pairs
            .values()
            .flat_map(|p| [p.a.clone(), p.b.clone()])
            .collect()
    }

    /// The A matrices `(rank, in)` keyed by site, for orthogonality penalties.
    pub fn a_matrices(&self) -> Vec<(String, Tensor)> {
        self.pairs
            .iter()
            .map(|(site, p)| (site.clone(), p.a.as_tensor().clone()))
            .collect()
    }

    /// The module paths this adapter covers.
    pub fn sites(&self) -> Vec<String> {
        self.pairs.keys().cloned().collect()
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into
    /// `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        let file = AdapterConfigFile {
            peft_type: "LORA".into(),
            r: self.config.rank,
            lora_alpha: self.config.alpha,
            lora_dropout: self.config.dropout,
            target_modules: self.config.targets.clone(),
            bias: default_bias(),
            task_type: Some("CAUSAL_LM".into()),
            lethe_name: self.name.clone(),
            lethe_gate: self.gate(),
        };
        let json = serde_json::to_string_pretty(&file)
            .map_err(|e| Error::Format(format!("serialising adapter config: {e}")))?;
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        std::fs::write(&cfg_path, json)
            .map_err(|e| Error::io(e, format!("writing {}", cfg_path.display())))?;
        let tensors: Vec<(String, Tensor)> = self
            .pairs
            .iter()
            .flat_map(|(site, p)| {
                [
                    (a_name(site), p.a.as_tensor().clone()),
                    (b_name(site), p.b.as_tensor().clone()),
                ]
            })
            .collect();
        let weights = dir.join(ADAPTER_WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors.into_iter().collect(), &weights)?;
        Ok(())
    }

    /// Reads an adapter saved by [`LoraAdapter::save`] (or by PEFT with the
    /// same tensor names). Shapes are checked against the config here and
    /// against the model when it is attached.
    pub fn load(dir: &Path, device: &Device) -> Result<LoraAdapter> {
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::io(e, format!("reading {}", cfg_path.display())))?;
        let file: AdapterConfigFile = serde_json::from_str(&text)
            .map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))?;
        if file.peft_type != "LORA" {
            return Err(Error::Format(format!(
                "{}: peft_type is {:?}, expected \"LORA\"",
                cfg_path.display(),
                file.peft_type
            )));
        }
        if file.bias != "none" {
            return Err(Error::Format(format!(
                "{}: LoRA bias {:?} is not supported (only \"none\")",
                cfg_path.display(),
                file.bias
            )));
        }
        let config = LoraConfig {
            rank: file.r,
            alpha: file.lora_alpha,
            dropout: file.lora_dropout,
            targets: file.target_modules,
        };
        config
            .validate()
            .map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))?;
        if !file.lethe_gate.is_finite() {
            return Err(Error::Format(format!(
                "{}: gate is not finite",
                cfg_path.display()
            )));
        }
        let weights = dir.join(ADAPTER_WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::Format(format!("{} is missing", weights.display())));
        }
        let tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| Error::Format(format!("{}: {e}", weights.display())))?;
        let mut sites: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, t) in tensors {
            let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
                return Err(Error::Format(format!(
                    "unexpected tensor {name} in {}",
                    weights.display()
                )));
            };
            if let Some(site) = rest.strip_suffix(".lora_A.weight") {
                sites.entry(site.to_string()).or_default().0 = Some(t);
            } else if let Some(site) = rest.strip_suffix(".lora_B.weight") {
                sites.entry(site.to_string()).or_default().1 = Some(t);
            } else {
                return Err(Error::Format(format!(
                    "unexpected tensor {name} in {}",
                    weights.display()
                )));
            }
        }
        if sites.is_empty() {
            return Err(Error::Format(format!(
                "{} holds no LoRA tensors",
                weights.display()
            )));
        }
        let varmap = VarMap::new();
        let mut pairs = BTreeMap::new();
        for (site, (a, b)) in sites {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Format(format!(
                    "{site}: lora_A or lora_B is missing"
                )));
            };
            let (ra, _) = a
                .dims2()
                .map_err(|_| Error::Format(format!("{site}: lora_A is not a matrix")))?;
            let (_, rb) = b
                .dims2()
                .map_err(|_| Error::Format(format!("{site}: lora_B is not a matrix")))?;
            if ra != config.rank || rb != config.rank {
                return Err(Error::Format(format!(
                    "{site}: A is {:?} and B is {:?}, rank should be {}",
                    a.dims(),
                    b.dims(),
                    config.rank
                )));
            }
            let a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
            let b = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
            insert_pair(&varmap, &site, &a, &b);
            pairs.insert(site, LoraPair { a, b });
        }
        Ok(LoraAdapter::from_parts(
            file.lethe_name,
            config,
            varmap,
            pairs,
            file.lethe_gate,
        ))
    }
}

fn a_name(site: &str) -> String {
    format!("{PEFT_PREFIX}{site}.lora_A.weight")
}

fn b_name(site: &str) -> String {
    format!("{PEFT_PREFIX}{site}.lora_B.weight")
}

fn insert_pair(varmap: &VarMap, site: &str, a: &Var, b: &Var) {
    // The map's mutex is only poisoned if another thread panicked while
    // holding it; recover the data rather than propagate the panic.
    let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.insert(a_name(site), a.clone());
    data.insert(b_name(site), b.clone());
}

/// O3 / O-LoRA's orthogonality loss: `sum over shared sites and previous
/// adapters i of ||A_i A_t^T||_F^2`, with `A_t` from `current` (gradients
/// flow into it) and the previous A matrices detached.
///
/// Returns a scalar (0 when there is nothing to compare).
pub fn orthogonality_penalty(current: &LoraAdapter, previous: &[&LoraAdapter]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    let device = current
        .pairs
        .values()
        .next()
        .map(|p| p.a.device().clone())
        .unwrap_or(Device::Cpu);
    for (site, pair) in &current.pairs {
        for prev in previous {
            let Some(other) = prev.pairs.get(site) else {
                continue;
            };
            let (_, din) = pair.a.dims2()?;
            let (_, dprev) = other.a.dims2()?;
            if din != dprev {
                return Err(Error::InvalidArgument(format!(
                    "{site}: adapters {} and {} have different input sizes",
                    current.name, prev.name
                )));
            }
            let prod = other
                .a
                .as_detached_tensor()
                .matmul(&pair.a.as_tensor().t()?)?;
            let term = prod.sqr()?.sum_all()?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
    }
    match total {
        Some(t) => Ok(t),
        None => Ok(Tensor::zeros((), DType::F32, &device)?),
    }
}

/// A description of one projection an adapter can attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSite {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Which kind of projection it is.
    pub target: LoraTarget,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
}

/// One adapter attached to one layer.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    state: Arc<AdapterState>,
    /// `Some(factor)` while merged: `factor * B A` was added to the base.
    merged: Option<f64>,
}

/// A linear layer (`y = x W^T + b`, HF layout `W: (out, in)`) that can carry
/// any number of LoRA adapters. The decoder owns one per projection.
///
/// The base is a `candle_nn::Linear` built over the layer's parameters at
/// every forward pass (a cheap handle copy), so the trainable/frozen switch
/// of the base applies without rebuilding the model.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Param,
    bias: Option<Param>,
    slots: Vec<Slot>,
}

impl LoraLinear {
    pub(crate) fn new(weight: Param, bias: Option<Param>) -> LoraLinear {
        LoraLinear {
            weight,
            bias,
            slots: Vec::new(),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.var().dims();
        (d[0], d[1])
    }

    /// Names of the attached adapters, in attachment order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// The base weight `(out, in)` as used in forward passes.
    pub fn weight(&self) -> Tensor {
        self.weight.tensor()
    }

    /// `x` is `(..., in)`; returns `(..., out)`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let base =
            candle_nn::Linear::new(self.weight.tensor(), self.bias.as_ref().map(Param::tensor));
        let mut y = base.forward(x)?;
        for slot in &self.slots {
            if slot.merged.is_some() {
                continue;
            }
            let gate = slot.state.gate();
            if gate == 0.0 {
                continue;
            }
            let (a, b) = if slot.state.trainable.load(Ordering::Relaxed) {
                (slot.a.as_tensor().clone(), slot.b.as_tensor().clone())
            } else {
                (slot.a.as_detached_tensor(), slot.b.as_detached_tensor())
            };
            let input = if mode.is_train() && slot.dropout > 0.0 {
                candle_nn::ops::dropout(x, slot.dropout)?
            } else {
                x.clone()
            };
            let h = candle_nn::Linear::new(a, None).forward(&input)?;
            let h = candle_nn::Linear::new(b, None).forward(&h)?;
            y = (y + (h * (gate * slot.scale))?)?;
        }
        Ok(y)
    }

    pub(crate) fn attach(&mut self, adapter: &LoraAdapter, site: &str) -> Result<()> {
        let Some(pair) = adapter.pairs.get(site) else {
            return Ok(());
        };
        let (out, inp) = self.dims();
        if pair.a.dims() != [adapter.config.rank, inp]
            || pair.b.dims() != [out, adapter.config.rank]
        {
            return Err(Error::InvalidArgument(format!(
                "adapter {}: {site} has A {:?} and B {:?}, the layer is ({out}, {inp})",
                adapter.name,
                pair.a.dims(),
                pair.b.dims()
            )));
        }
        if self.slots.iter().any(|s| s.name == adapter.name) {
            return Err(Error::InvalidArgument(format!(
                "an adapter named {} is already attached",
                adapter.name
            )));
        }
        self.slots.push(Slot {
            name: adapter.name.clone(),
            a: pair.a.clone(),
            b: pair.b.clone(),
            scale: adapter.config.scale(),
            dropout: adapter.config.dropout,
            state: adapter.state.clone(),
            merged: None,
        });
        Ok(())
    }

    pub(crate) fn is_merged(&self, name: &str) -> bool {
        self.slots
            .iter()
            .any(|s| s.name == name && s.merged.is_some())
    }

    pub(crate) fn detach(&mut self, name: &str) {
        self.slots.retain(|s| s.name != name);
    }

    /// Adds `gate * scale * B A` to the base weight.
    pub(crate) fn merge(&mut self, name: &str) -> Result<()> {
        let weight = self.weight.var().clone();
        for slot in self
            .slots
            .iter_mut()
            .filter(|s| s.name == name && s.merged.is_none())
        {
            let factor = slot.state.gate() * slot.scale;
            let delta = (slot
                .b
                .as_detached_tensor()
                .matmul(&slot.a.as_detached_tensor())?
                * factor)?;
            let merged = (weight.as_detached_tensor() + delta)?;
            weight.set(&merged)?;
            slot.merged = Some(factor);
        }
        Ok(())
    }

    /// Subtracts exactly what [`LoraLinear::merge`] added.
    pub(crate) fn unmerge(&mut self, name: &str) -> Result<()> {
        let weight = self.weight.var().clone();
        for slot in self.slots.iter_mut().filter(|s| s.name == name) {
            if let Some(factor) = slot.merged {
                let delta = (slot
                    .b
                    .as_detached_tensor()
                    .matmul(&slot.a.as_detached_tensor())?
                    * factor)?;
                let restored = (weight.as_detached_tensor() - delta)?;
                weight.set(&restored)?;
                slot.merged = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
