//! A trainable decoder-only transformer in the standard Llama layout
//! (Touvron et al. 2023; reference: HF `transformers` `modeling_llama.py`).
//!
//! Pre-norm blocks of RMSNorm → attention with half-split RoPE and optional
//! grouped-query heads → residual, RMSNorm → SwiGLU MLP → residual; final
//! RMSNorm; a language-model head tied to the embedding or not. Every op has
//! a backward pass (see [`crate::nn`]).
//!
//! Why it exists next to the quantized inference model: unlearning, fine-
//! tuning and LoRA need gradients, per-position logits and hidden states of
//! any layer, and the quantized `QMatMul` has none of these.
//!
//! * Tensor names are HF's (`model.embed_tokens.weight`,
//!   `model.layers.N.self_attn.q_proj.weight`, ..., `model.norm.weight`,
//!   `lm_head.weight` unless tied), all in one [`VarMap`], so a checkpoint is
//!   a plain `model.safetensors` + `config.json` folder.
//! * [`Decoder::from_gguf`] loads a llama.cpp GGUF (e.g. SmolLM2-135M) with
//!   every tensor dequantized to f32, un-permuting the Q/K rows that
//!   llama.cpp's converter permuted for its interleaved rotary layout.
//! * Every projection is a [`LoraLinear`], so LoRA adapters attach without
//!   touching the base weights.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::lora::{LoraAdapter, LoraLinear, LoraSite, LoraTarget};
use crate::nn::{self, Mode, Param, Rotary};
use crate::{Error, Result};

/// File name of the weights inside a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the configuration inside a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";

/// Hyper-parameters, read from and written to an HF Llama `config.json`
/// (unknown keys are ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `None` means
    /// as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest sequence the rotary tables cover.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id, if the tokenizer has one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if the tokenizer has one.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Always `"llama"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Always `"silu"` (SwiGLU).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// HF's optional explicit head size; must equal `hidden_size / heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_act() -> String {
    "silu".into()
}

/// What HF tools expect next to the hyper-parameters.
#[derive(Serialize)]
struct ConfigOut<'a> {
    architectures: [&'static str; 1],
    torch_dtype: &'static str,
    #[serde(flatten)]
    config: &'a Config,
}

impl Config {
    /// A config with Llama defaults for the optional fields.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        max_position_embeddings: usize,
    ) -> Config {
        Config {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: None,
            rms_norm_eps: default_eps(),
            rope_theta: default_theta(),
            max_position_embeddings,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            model_type: default_model_type(),
            hidden_act: default_act(),
            head_dim: None,
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one head.
    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks that the numbers describe a buildable model.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("decoder config: {m}")));
        if self.model_type != "llama" {
            return bad(format!("model_type {:?} is not \"llama\"", self.model_type));
        }
        if self.hidden_act != "silu" {
            return bad(format!("hidden_act {:?} is not \"silu\"", self.hidden_act));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be > 0"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_size() % 2 != 0 {
            return bad(format!(
                "head size {} must be even for RoPE",
                self.head_size()
            ));
        }
        if let Some(hd) = self.head_dim {
            if hd != self.head_size() {
                return bad(format!(
                    "head_dim {hd} differs from hidden_size / heads = {}",
                    self.head_size()
                ));
            }
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        Ok(())
    }

    /// Reads an HF `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Writes an HF `config.json` (with `architectures` and `torch_dtype`).
    pub fn to_json_file(&self, path: &Path) -> Result<()> {
        let out = ConfigOut {
            architectures: ["LlamaForCausalLM"],
            torch_dtype: "float32",
            config: self,
        };
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| Error::Format(format!("serialising config: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(e, format!("writing {}", path.display())))
    }

    /// Every parameter name with its shape, in a fixed order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.hidden_size;
        let hd = self.head_size();
        let kv = self.kv_heads() * hd;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![d, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![self.intermediate_size, d],
            ));
            out.push((
                format!("{p}.mlp.up_proj.weight"),
                vec![self.intermediate_size, d],
            ));
            out.push((
                format!("{p}.mlp.down_proj.weight"),
                vec![d, self.intermediate_size],
            ));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, d]));
        }
        out
    }
}

struct Block {
    input_layernorm: Param,
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    post_attention_layernorm: Param,
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Block {
    fn linears_mut(&mut self) -> [(LoraTarget, &mut LoraLinear); 7] {
        [
            (LoraTarget::Q, &mut self.q_proj),
            (LoraTarget::K, &mut self.k_proj),
            (LoraTarget::V, &mut self.v_proj),
            (LoraTarget::O, &mut self.o_proj),
            (LoraTarget::Gate, &mut self.gate_proj),
            (LoraTarget::Up, &mut self.up_proj),
            (LoraTarget::Down, &mut self.down_proj),
        ]
    }

    fn linears(&self) -> [(LoraTarget, &LoraLinear); 7] {
        [
            (LoraTarget::Q, &self.q_proj),
            (LoraTarget::K, &self.k_proj),
            (LoraTarget::V, &self.v_proj),
            (LoraTarget::O, &self.o_proj),
            (LoraTarget::Gate, &self.gate_proj),
            (LoraTarget::Up, &self.up_proj),
            (LoraTarget::Down, &self.down_proj),
        ]
    }
}

fn site_path(layer: usize, target: LoraTarget) -> String {
    let group = match target {
        LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
        LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
    };
    format!("model.layers.{layer}.{group}.{}", target.module_name())
}

/// The trainable Llama-layout decoder.
///
/// Invariant: `varmap` holds exactly [`Config::parameter_shapes`], f32, and
/// the layers below read those same Vars.
pub struct Decoder {
    config: Config,
    varmap: VarMap,
    trainable: Arc<AtomicBool>,
    embed: Param,
    blocks: Vec<Block>,
    norm: Param,
    /// `None` when the head is tied to the embedding.
    lm_head: Option<LoraLinear>,
    rotary: Rotary,
    device: Device,
    adapters: Vec<String>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("adapters", &self.adapters)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A randomly initialised decoder (HF Llama init: normal(0, 0.02) for
    /// matrices, ones for norms), deterministic for a given `seed`.
    pub fn new(config: Config, device: &Device, seed: u64) -> Result<Decoder> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                normal_vec(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Decoder::from_tensors(config, tensors, device)
    }

    /// Loads a folder written by [`Decoder::save`] (or an HF Llama
    /// checkpoint with a single f32/f16/bf16 `model.safetensors`).
    ///
    /// A bad `config.json`, a missing tensor or a tensor of the wrong shape
    /// is an [`Error::Format`] naming it.
    pub fn load(dir: &Path, device: &Device) -> Result<Decoder> {
        let config = Config::from_json_file(&dir.join(CONFIG_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::Format(format!("{} is missing", weights.display())));
        }
        let tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| Error::Format(format!("{}: {e}", weights.display())))?;
        Decoder::from_tensors(config, tensors, device)
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if
    /// missing). Adapters are not included (merged ones are, as part of the
    /// base weights); save them with [`LoraAdapter::save`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        self.config.to_json_file(&dir.join(CONFIG_FILE))?;
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }

    /// Builds a decoder from named tensors (HF names), checking that every
    /// expected tensor is present with the right shape. Extra tensors are
    /// ignored with a warning.
    pub fn from_tensors(
        config: Config,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Decoder> {
        config.validate()?;
        let varmap = VarMap::new();
        let trainable = Arc::new(AtomicBool::new(true));
        let mut vars: HashMap<String, Param> = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Format(format!("tensor {name} is missing")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Format(format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            let var = Var::from_tensor(&t)?;
            varmap
                .data()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), var.clone());
            vars.insert(name, Param::new(var, trainable.clone()));
        }
        if !tensors.is_empty() {
            let mut extra: Vec<_> = tensors.keys().cloned().collect();
            extra.sort();
            tracing::warn!(?extra, "ignoring tensors that are not part of the decoder");
        }
        let mut take = |name: &str| -> Result<Param> {
            vars.remove(name)
                .ok_or_else(|| Error::Format(format!("tensor {name} is missing")))
        };
        let embed = take("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |n: &str| -> Result<LoraLinear> {
                Ok(LoraLinear::new(take(&format!("{p}.{n}.weight"))?, None))
            };
            let q_proj = lin("self_attn.q_proj")?;
            let k_proj = lin("self_attn.k_proj")?;
            let v_proj = lin("self_attn.v_proj")?;
            let o_proj = lin("self_attn.o_proj")?;
            let gate_proj = lin("mlp.gate_proj")?;
            let up_proj = lin("mlp.up_proj")?;
            let down_proj = lin("mlp.down_proj")?;
            blocks.push(Block {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"))?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = take("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(LoraLinear::new(take("lm_head.weight")?, None))
        };
        let rotary = Rotary::new(
            config.head_size(),
            config.max_position_embeddings,
            config.rope_theta,
            device,
        )?;
        Ok(Decoder {
            config,
            varmap,
            trainable,
            embed,
            blocks,
            norm,
            lm_head,
            rotary,
            device: device.clone(),
            adapters: Vec::new(),
        })
    }

    /// Loads a llama-architecture GGUF file with every tensor dequantized to
    /// f32 (llama.cpp names: `token_embd.weight`, `blk.N.attn_q.weight`, ...;
    /// a missing `output.weight` means a tied head).
    ///
    /// llama.cpp's converter permutes the rows of Q and K so that its
    /// interleaved rotary embedding reproduces HF's half-split one; they are
    /// permuted back here ([`unpermute_qk_rows`]).
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Decoder> {
        let mut file =
            File::open(path).map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        let md = |key: &str| {
            content.metadata.get(key).ok_or_else(|| {
                Error::Format(format!("{}: metadata key {key} is missing", path.display()))
            })
        };
        let md_u32 = |key: &str| -> Result<usize> {
            md(key)?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| Error::Format(format!("{}: {key}: {e}", path.display())))
        };
        let md_f32 = |key: &str| -> Result<f64> {
            md(key)?
                .to_f32()
                .map(f64::from)
                .map_err(|e| Error::Format(format!("{}: {key}: {e}", path.display())))
        };
        let arch = md("general.architecture")?
            .to_string()
            .map_err(|e| Error::Format(format!("{}: general.architecture: {e}", path.display())))?;
        if arch != "llama" {
            return Err(Error::Format(format!(
                "{}: architecture {arch:?} is not llama",
                path.display()
            )));
        }
        let hidden = md_u32("llama.embedding_length")?;
        let heads = md_u32("llama.attention.head_count")?;
        let kv_heads = md_u32("llama.attention.head_count_kv").unwrap_or(heads);
        let embd_info = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| {
                Error::Format(format!("{}: token_embd.weight is missing", path.display()))
            })?;
        let vocab = match embd_info.shape.dims() {
            [vocab, _] => *vocab,
            other => {
                return Err(Error::Format(format!(
                    "{}: token_embd.weight has shape {other:?}, expected a matrix",
                    path.display()
                )))
            }
        };
        let tied = !content.tensor_infos.contains_key("output.weight");
        let optional_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let config = Config {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: md_u32("llama.feed_forward_length")?,
            num_hidden_layers: md_u32("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            rms_norm_eps: md_f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: md_f32("llama.rope.freq_base").unwrap_or(default_theta()),
            max_position_embeddings: md_u32("llama.context_length")?,
            tie_word_embeddings: tied,
            bos_token_id: optional_u32("tokenizer.ggml.bos_token_id"),
            eos_token_id: optional_u32("tokenizer.ggml.eos_token_id"),
            model_type: default_model_type(),
            hidden_act: default_act(),
            head_dim: None,
        };
        config
            .validate()
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        if let Ok(rope_dim) = md_u32("llama.rope.dimension_count") {
            if rope_dim != config.head_size() {
                return Err(Error::Format(format!(
                    "{}: partial rotary ({rope_dim} of {} dims) is not supported",
                    path.display(),
                    config.head_size()
                )));
            }
        }
        let mut read = |name: &str| -> Result<Tensor> {
            let q = content
                .tensor(&mut file, name, device)
                .map_err(|e| Error::Format(format!("{}: tensor {name}: {e}", path.display())))?;
            Ok(q.dequantize(device)?)
        };
        let mut tensors = HashMap::new();
        tensors.insert(
            "model.embed_tokens.weight".to_string(),
            read("token_embd.weight")?,
        );
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let b = format!("blk.{i}");
            let q = read(&format!("{b}.attn_q.weight"))?;
            let k = read(&format!("{b}.attn_k.weight"))?;
            tensors.insert(
                format!("{p}.self_attn.q_proj.weight"),
                unpermute_qk_rows(&q, heads)?,
            );
            tensors.insert(
                format!("{p}.self_attn.k_proj.weight"),
                unpermute_qk_rows(&k, kv_heads)?,
            );
            for (hf, gg) in [
                ("input_layernorm", "attn_norm"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("post_attention_layernorm", "ffn_norm"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ] {
                tensors.insert(
                    format!("{p}.{hf}.weight"),
                    read(&format!("{b}.{gg}.weight"))?,
                );
            }
        }
        tensors.insert("model.norm.weight".to_string(), read("output_norm.weight")?);
        if !tied {
            tensors.insert("lm_head.weight".to_string(), read("output.weight")?);
        }
        Decoder::from_tensors(config, tensors, device)
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The VarMap with every base weight under its HF name.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every base weight with its HF name, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every base weight, sorted by name (what an optimizer trains for a
    /// full fine-tune).
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Number of base parameters.
    pub fn num_parameters(&self) -> usize {
        self.config
            .parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Whether forward passes track gradients of the base weights. Freeze
    /// the base to train adapters only: no base-weight gradient is then
    /// computed at all.
    pub fn set_base_trainable(&self, trainable: bool) {
        self.trainable.store(trainable, Ordering::Relaxed);
    }

    /// Whether the base weights are trainable.
    pub fn is_base_trainable(&self) -> bool {
        self.trainable.load(Ordering::Relaxed)
    }

    /// Logits `(batch, seq, vocab)` for every position of `ids`
    /// (`(batch, seq)`, u32). Right-pad sequences of different lengths: the
    /// causal mask keeps padding from affecting earlier positions.
    pub fn forward(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.run(ids, self.config.num_hidden_layers, mode)?;
        let h = nn::rms_norm(&h, &self.norm.tensor(), self.config.rms_norm_eps)?;
        self.head(&h, mode)
    }

    /// Hidden states `(batch, seq, hidden)` after `layer` blocks: 0 is the
    /// embedding output, `num_hidden_layers` the last block's output (before
    /// the final norm). Runs only the blocks needed.
    pub fn hidden_states(&self, ids: &Tensor, layer: usize, mode: Mode) -> Result<Tensor> {
        if layer > self.config.num_hidden_layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} > number of layers {}",
                self.config.num_hidden_layers
            )));
        }
        self.run(ids, layer, mode)
    }

    /// Logits and the hidden states after `layer` blocks, in one pass.
    pub fn forward_with_hidden(
        &self,
        ids: &Tensor,
        layer: usize,
        mode: Mode,
    ) -> Result<(Tensor, Tensor)> {
        if layer > self.config.num_hidden_layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} > number of layers {}",
                self.config.num_hidden_layers
            )));
        }
        let (logits, mut all) = self.forward_all(ids, mode)?;
        Ok((logits, all.swap_remove(layer)))
    }

    /// Logits and every hidden state (`num_hidden_layers + 1` tensors
    /// `(batch, seq, hidden)`, index as in [`Decoder::hidden_states`]), in
    /// one pass: per-layer features for an OOD detector.
    pub fn forward_all(&self, ids: &Tensor, mode: Mode) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, t) = self.check_ids(ids)?;
        let mut x = self.embed_ids(ids, b, t)?;
        let mut all = Vec::with_capacity(self.blocks.len() + 1);
        all.push(x.clone());
        for block in &self.blocks {
            x = self.block(block, &x, mode)?;
            all.push(x.clone());
        }
        let h = nn::rms_norm(&x, &self.norm.tensor(), self.config.rms_norm_eps)?;
        Ok((self.head(&h, mode)?, all))
    }

    /// Greedy continuation of one `prompt`: up to `max_new_tokens` argmax
    /// tokens, stopping after any id in `stop`. Returns only the new tokens.
    ///
    /// Recomputes the whole prefix at every step (no key/value cache):
    /// meant for evaluating small trained models on short answers. The
    /// prompt plus the answer must fit in `max_position_embeddings`.
    pub fn greedy(&self, prompt: &[u32], max_new_tokens: usize, stop: &[u32]) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < max_new_tokens && ids.len() < self.config.max_position_embeddings {
            let input = Tensor::from_slice(&ids, (1, ids.len()), &self.device)?;
            let logits = self.forward(&input, Mode::Eval)?;
            let next = logits
                .narrow(1, ids.len() - 1, 1)?
                .flatten_all()?
                .argmax(0)?
                .to_scalar::<u32>()?;
            out.push(next);
            ids.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }

    /// The mean next-token cross-entropy of `ids` (see
    /// [`nn::causal_lm_loss`] for `loss_mask`).
    pub fn loss(&self, ids: &Tensor, loss_mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let logits = self.forward(ids, mode)?;
        nn::causal_lm_loss(&logits, ids, loss_mask)
    }

    /// Every projection an adapter can attach to.
    pub fn lora_sites(&self) -> Vec<LoraSite> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (target, lin) in block.linears() {
                let (out_f, in_f) = lin.dims();
                out.push(LoraSite {
                    path: site_path(i, target),
                    target,
                    in_features: in_f,
                    out_features: out_f,
                });
            }
        }
        out
    }

    /// Names of the attached adapters, in attachment order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(String::as_str).collect()
    }

    /// Attaches `adapter` to every projection it covers. Adapters stack:
    /// each adds its own gated output. Fails, leaving the model unchanged,
    /// if the name is taken or a site or shape does not match.
    pub fn attach_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        if self.adapters.iter().any(|n| n == adapter.name()) {
            return Err(Error::InvalidArgument(format!(
                "an adapter named {} is already attached",
                adapter.name()
            )));
        }
        let sites: HashMap<String, LoraSite> = self
            .lora_sites()
            .into_iter()
            .map(|s| (s.path.clone(), s))
            .collect();
        for site in adapter.sites() {
            let Some(s) = sites.get(&site) else {
                return Err(Error::InvalidArgument(format!(
                    "adapter {} targets {site}, which this decoder does not have",
                    adapter.name()
                )));
            };
            let a_dims = adapter_a_dims(adapter, &site)?;
            let b_dims = adapter_b_dims(adapter, &site)?;
            let r = adapter.config().rank;
            if a_dims != [r, s.in_features] || b_dims != [s.out_features, r] {
                return Err(Error::InvalidArgument(format!(
                    "adapter {}: {site} has A {a_dims:?} and B {b_dims:?}, the layer is ({}, {})",
                    adapter.name(),
                    s.out_features,
                    s.in_features
                )));
            }
        }
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (target, lin) in block.linears_mut() {
                lin.attach(adapter, &site_path(i, target))?;
            }
        }
        self.adapters.push(adapter.name().to_string());
        Ok(())
    }

    /// Removes an adapter. A merged adapter must be unmerged first.
    pub fn detach_adapter(&mut self, name: &str) -> Result<()> {
        self.require_adapter(name)?;
        if self.is_merged(name) {
            return Err(Error::InvalidArgument(format!(
                "adapter {name} is merged into the base weights: unmerge it before detaching"
            )));
        }
        for block in &mut self.blocks {
            for (_, lin) in block.linears_mut() {
                lin.detach(name);
            }
        }
        self.adapters.retain(|n| n != name);
        Ok(())
    }

    /// Folds `gate * alpha/r * B A` of an attached adapter into the base
    /// weights (the gate current at this call). Forward passes then skip the
    /// adapter's own branch. No-op if already merged.
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        self.require_adapter(name)?;
        for block in &mut self.blocks {
            for (_, lin) in block.linears_mut() {
                lin.merge(name)?;
            }
        }
        Ok(())
    }

    /// Subtracts what [`Decoder::merge_adapter`] added. No-op if not merged.
    pub fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        self.require_adapter(name)?;
        for block in &mut self.blocks {
            for (_, lin) in block.linears_mut() {
                lin.unmerge(name)?;
            }
        }
        Ok(())
    }

    /// Whether the named adapter is currently merged.
    pub fn is_merged(&self, name: &str) -> bool {
        self.blocks
            .iter()
            .any(|b| b.linears().iter().any(|(_, l)| l.is_merged(name)))
    }

    fn require_adapter(&self, name: &str) -> Result<()> {
        if self.adapters.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "no adapter named {name} is attached"
            )))
        }
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::InvalidArgument(format!("ids must be (batch, seq), got {:?}", ids.dims()))
        })?;
        if b == 0 || t == 0 {
            return Err(Error::InvalidArgument("empty batch or sequence".into()));
        }
        if t > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "sequence of {t} tokens exceeds the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let max = ids_u32.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.config.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "token id {max} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok((b, t))
    }

    fn embed_ids(&self, ids: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?;
        let x = self.embed.tensor().embedding(&flat)?;
        Ok(x.reshape((b, t, self.config.hidden_size))?)
    }

    fn run(&self, ids: &Tensor, layers: usize, mode: Mode) -> Result<Tensor> {
        let (b, t) = self.check_ids(ids)?;
        let mut x = self.embed_ids(ids, b, t)?;
        for block in self.blocks.iter().take(layers) {
            x = self.block(block, &x, mode)?;
        }
        Ok(x)
    }

    fn block(&self, block: &Block, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, d) = x.dims3()?;
        let hd = cfg.head_size();
        let heads = cfg.num_attention_heads;
        let kv = cfg.kv_heads();
        let eps = cfg.rms_norm_eps;

        let h = nn::rms_norm(x, &block.input_layernorm.tensor(), eps)?;
        let q = block.q_proj.forward(&h, mode)?;
        let k = block.k_proj.forward(&h, mode)?;
        let v = block.v_proj.forward(&h, mode)?;
        let q = self.rotary.apply_bthd(&q.reshape((b, t, heads, hd))?, 0)?;
        let k = self.rotary.apply_bthd(&k.reshape((b, t, kv, hd))?, 0)?;
        let v = v.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
        let att = nn::causal_attention(&q, &k, &v)?;
        let att = att.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + block.o_proj.forward(&att, mode)?)?;

        let h = nn::rms_norm(&x, &block.post_attention_layernorm.tensor(), eps)?;
        let g = block.gate_proj.forward(&h, mode)?;
        let u = block.up_proj.forward(&h, mode)?;
        let m = block.down_proj.forward(&nn::swiglu(&g, &u)?, mode)?;
        Ok((x + m)?)
    }

    fn head(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(h, mode),
            None => {
                let tied = LoraLinear::new(self.embed.clone(), None);
                tied.forward(h, mode)
            }
        }
    }
}

fn adapter_a_dims(adapter: &LoraAdapter, site: &str) -> Result<Vec<usize>> {
    adapter
        .a_matrices()
        .into_iter()
        .find(|(s, _)| s == site)
        .map(|(_, t)| t.dims().to_vec())
        .ok_or_else(|| {
            Error::InvalidArgument(format!("adapter {} has no A at {site}", adapter.name()))
        })
}

fn adapter_b_dims(adapter: &LoraAdapter, site: &str) -> Result<Vec<usize>> {
    let vars = adapter
        .varmap()
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    vars.get(&format!("base_model.model.{site}.lora_B.weight"))
        .map(|v| v.dims().to_vec())
        .ok_or_else(|| {
            Error::InvalidArgument(format!("adapter {} has no B at {site}", adapter.name()))
        })
}

/// Undoes llama.cpp's Q/K row permutation.
///
/// The converter stores `W.reshape(heads, 2, hd/2, in).swapaxes(1, 2)`, which
/// turns HF's half-split rotary pairs `(i, i + hd/2)` into adjacent rows
/// `(2i, 2i + 1)` for llama.cpp's interleaved rotary. This applies the
/// inverse, `reshape(heads, hd/2, 2, in).swapaxes(1, 2)`. `heads` is the
/// number of query heads for Q and of key/value heads for K.
pub fn unpermute_qk_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || out % (2 * heads) != 0 {
        return Err(Error::Format(format!(
            "cannot un-permute a ({out}, {inp}) matrix over {heads} heads"
        )));
    }
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

pub(crate) fn normal_vec(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    // Box-Muller: two uniforms give two independent standard normals.
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = rng.random::<f32>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f32::consts::PI * u2;
        out.push(r * th.cos() * std);
        out.push(r * th.sin() * std);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests;
