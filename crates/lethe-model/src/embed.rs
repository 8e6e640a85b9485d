//! Sentence embeddings with all-MiniLM-L6-v2 (384-d, unit length).
//!
//! Dense retrieval needs one vector per passage and per query. This is the
//! sentence-transformers recipe: a BERT encoder, the mean of its last hidden
//! states over the tokens of each input, then L2 normalisation, so cosine
//! similarity is a dot product.
//!
//! The encoder is this crate's own forward pass over the standard BERT
//! weights (the safetensors names carry no `bert.` prefix; a prefixed file
//! also loads), because the batched form matters: inputs of a batch are
//! *packed* end to end instead of padded to a common length, and attention
//! runs per input (bidirectional) with the kernel the language model uses.
//! Padding tokens are therefore never computed, the shipped tokenizer's fixed
//! padding to 128 is switched off, and a text embeds to the same vector alone
//! or in any batch. The query, key and value projections are fused into one
//! matrix product. Inputs are truncated at [`EmbedderConfig::max_length`]
//! tokens. A test checks the result against candle-transformers' `BertModel`.

use std::path::Path;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use crate::gguf_llama::attention;
use crate::{Error, Result};

/// Embedder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedderConfig {
    /// Longest input in tokens (`[CLS]` and `[SEP]` included); longer inputs are
    /// cut. Capped at the model's position table (512). The default, 256, is
    /// what sentence-transformers uses for this model.
    pub max_length: usize,
    /// Inputs per forward pass.
    pub batch_size: usize,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        EmbedderConfig {
            max_length: 256,
            batch_size: 32,
        }
    }
}

/// BERT hyper-parameters (the fields of `config.json` this encoder needs).
#[derive(Debug, Clone, serde::Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(vb: VarBuilder<'_>, size: usize) -> Result<Norm> {
        // Old checkpoints name them gamma/beta.
        let (w, b) = if vb.contains_tensor("weight") {
            ("weight", "bias")
        } else {
            ("gamma", "beta")
        };
        Ok(Norm {
            weight: vb.get(size, w)?,
            bias: vb.get(size, b)?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            eps,
        )?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    /// Query, key and value stacked: `[3 hidden, hidden]`.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    out: Linear,
    out_norm: Norm,
}

fn linear(vb: VarBuilder<'_>, out_dim: usize, in_dim: usize) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

impl Layer {
    fn load(vb: VarBuilder<'_>, h: usize) -> Result<Layer> {
        let att = vb.pp("attention");
        let part = |name: &str| -> Result<(Tensor, Tensor)> {
            let p = att.pp("self").pp(name);
            Ok((p.get((h, h), "weight")?, p.get(h, "bias")?))
        };
        let (qw, qb) = part("query")?;
        let (kw, kb) = part("key")?;
        let (vw, vb_) = part("value")?;
        let inter = vb.pp("intermediate").pp("dense");
        let inter_dim = inter.get_unchecked("weight")?.dim(0)?;
        Ok(Layer {
            qkv: Linear::new(
                Tensor::cat(&[qw, kw, vw], 0)?,
                Some(Tensor::cat(&[qb, kb, vb_], 0)?),
            ),
            attn_out: linear(att.pp("output").pp("dense"), h, h)?,
            attn_norm: Norm::load(att.pp("output").pp("LayerNorm"), h)?,
            intermediate: linear(inter, inter_dim, h)?,
            out: linear(vb.pp("output").pp("dense"), h, inter_dim)?,
            out_norm: Norm::load(vb.pp("output").pp("LayerNorm"), h)?,
        })
    }
}

/// A loaded sentence embedder. `&self` methods; `Send + Sync`.
pub struct Embedder {
    word: Tensor,
    position: Tensor,
    /// Token-type 0 embedding, `[hidden]`.
    type0: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    tokenizer: tokenizers::Tokenizer,
    hidden: usize,
    n_head: usize,
    eps: f32,
    config: EmbedderConfig,
    device: Device,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dim", &self.hidden)
            .field("layers", &self.layers.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Embedder>();
};

impl Embedder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a
    /// model folder, with the default [`EmbedderConfig`].
    pub fn load(dir: &Path, device: &Device) -> Result<Embedder> {
        Embedder::load_with(dir, device, EmbedderConfig::default())
    }

    /// Loads with explicit settings.
    pub fn load_with(dir: &Path, device: &Device, config: EmbedderConfig) -> Result<Embedder> {
        if config.max_length < 2 || config.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "embedder needs max_length >= 2 and batch_size >= 1".into(),
            ));
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| Error::io(e, format!("reading {}", path.display())))
        };
        let bc: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| Error::Format(format!("config.json: {e}")))?;
        if let Some(act) = &bc.hidden_act {
            if act != "gelu" {
                return Err(Error::Format(format!(
                    "hidden_act {act:?} is not supported (only gelu)"
                )));
            }
        }
        let h = bc.hidden_size;
        if bc.num_attention_heads == 0 || h % bc.num_attention_heads != 0 {
            return Err(Error::Format(format!(
                "{h} hidden units do not split into {} heads",
                bc.num_attention_heads
            )));
        }
        let vb =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, device)?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let word = emb.get_unchecked("word_embeddings.weight")?;
        if word.dims().len() != 2 || word.dim(1)? != h {
            return Err(Error::Format(format!(
                "word embeddings of shape {:?}",
                word.dims()
            )));
        }
        let position = emb.get(
            (bc.max_position_embeddings, h),
            "position_embeddings.weight",
        )?;
        let types = emb.get_unchecked("token_type_embeddings.weight")?;
        let type0 = types.get(0)?;
        let embed_norm = Norm::load(emb.pp("LayerNorm"), h)?;
        let layers = (0..bc.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), h))
            .collect::<Result<Vec<_>>>()?;

        let mut tokenizer = tokenizers::Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))?;
        let max_length = config.max_length.min(bc.max_position_embeddings);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Embedder {
            word,
            position,
            type0,
            embed_norm,
            layers,
            tokenizer,
            hidden: h,
            n_head: bc.num_attention_heads,
            eps: bc.layer_norm_eps as f32,
            config: EmbedderConfig {
                max_length,
                ..config
            },
            device: device.clone(),
        })
    }

    /// Width of the embeddings (384).
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// The settings in force (`max_length` already capped).
    pub fn config(&self) -> EmbedderConfig {
        self.config
    }

    /// Unit-length embeddings, one per text, in input order. An empty list
    /// gives an empty list; an empty text is embedded like any other (its
    /// tokens are `[CLS] [SEP]`).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.config.batch_size) {
            let encodings = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
            out.extend(self.embed_ids(&ids)?);
        }
        Ok(out)
    }

    /// Embeds already tokenized inputs (with `[CLS]`/`[SEP]`), packed into
    /// one forward pass.
    fn embed_ids(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.word.dim(0)?;
        let max_pos = self.position.dim(0)?;
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for s in batch {
            if s.is_empty() || s.len() > max_pos {
                return Err(Error::InvalidArgument(format!(
                    "an input of {} tokens (1 to {max_pos} allowed)",
                    s.len()
                )));
            }
            if let Some(t) = s.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidArgument(format!(
                    "token id {t} outside the vocabulary"
                )));
            }
            spans.push(ids.len()..ids.len() + s.len());
            ids.extend_from_slice(s);
            pos.extend(0..s.len() as u32);
        }
        let n = ids.len();
        let h = self.hidden;
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let pos = Tensor::from_vec(pos, n, &self.device)?;
        let x = self
            .word
            .index_select(&ids, 0)?
            .add(&self.position.index_select(&pos, 0)?)?
            .broadcast_add(&self.type0)?;
        let mut x = self.embed_norm.forward(&x, self.eps)?;
        let hd = h / self.n_head;
        let heads = attention::Heads {
            n_head: self.n_head,
            n_kv_head: self.n_head,
            head_dim: hd,
        };
        let jobs: Vec<attention::Job<'_>> = spans
            .iter()
            .map(|r| attention::Job {
                q_rows: r.clone(),
                keys: attention::KeyRows::Range {
                    start: r.start,
                    len: r.len(),
                },
                causal: false,
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.contiguous()?; // [n, 3h]
            let attn = if self.device.is_cpu() {
                let (g, l) = qkv.storage_and_layout();
                let data = crate::gguf_llama::cpu_slice(&g, l)?;
                let view = |offset: usize| attention::Rows {
                    data: &data[offset..],
                    stride: 3 * h,
                    head_stride: hd,
                };
                let out = attention::attend(view(0), view(h), view(2 * h), n, &jobs, heads, scale);
                Tensor::from_vec(out, (n, h), &self.device)?
            } else {
                self.attend_ops(&qkv, &spans, scale)?
            };
            let x1 = layer
                .attn_norm
                .forward(&(layer.attn_out.forward(&attn)? + &x)?, self.eps)?;
            let inner = layer.intermediate.forward(&x1)?;
            let inner = if self.device.is_cpu() {
                inner.apply_op1_no_bwd(&GeluErf)?
            } else {
                inner.gelu_erf()?
            };
            x = layer
                .out_norm
                .forward(&(layer.out.forward(&inner)? + &x1)?, self.eps)?;
        }
        // Mean over each input's rows: one product with a [batch, n] averaging matrix.
        let mut pool = vec![0f32; batch.len() * n];
        for (b, r) in spans.iter().enumerate() {
            let w = 1.0 / r.len() as f32;
            pool[b * n + r.start..b * n + r.end].fill(w);
        }
        let pool = Tensor::from_vec(pool, (batch.len(), n), &self.device)?;
        let mean = pool.matmul(&x)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }

    /// Bidirectional attention per input from generic tensor ops, for
    /// devices other than the CPU.
    fn attend_ops(
        &self,
        qkv: &Tensor,
        spans: &[std::ops::Range<usize>],
        scale: f32,
    ) -> Result<Tensor> {
        let h = self.hidden;
        let hd = h / self.n_head;
        let mut outs = Vec::with_capacity(spans.len());
        for r in spans {
            let s = r.len();
            let part = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(0, r.start, s)?
                    .narrow(1, i * h, h)?
                    .reshape((s, self.n_head, hd))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let att = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale as f64)?)?;
            outs.push(att.matmul(&v)?.transpose(0, 1)?.reshape((s, h))?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}

/// GELU with the exact (erf) form, as BERT uses it, in a loop that
/// vectorizes: candle's `gelu_erf` calls a scalar `erf` per element, which
/// measured about a tenth of the embedder's time.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-vectorized"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("gelu input must be contiguous".into()))?;
        let out: Vec<f32> = data[a..b].iter().map(|&x| gelu_erf(x)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `0.5 x (1 + erf(x / sqrt 2))`, with erf from Abramowitz and Stegun 7.1.26
/// (absolute error below 1.5e-7).
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * attention::exp_approx(-a * a);
    let erf = if z < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

#[cfg(test)]
mod tests;
