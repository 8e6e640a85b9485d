//! SmolLM2 (any Llama-architecture GGUF) with the project's own forward pass.
//!
//! candle-transformers' `quantized_llama` keeps its KV cache inside the model
//! (`&mut self`), hides its tensors and returns the last position's logits
//! only. lethe needs more from the same weights:
//!
//! * a model shared by several threads (`&self`, `Send + Sync`), each request
//!   owning its [`KvCache`];
//! * logits at every position, and hidden states at any layer (kNN-LM keys);
//! * batched teacher-forced scoring of many `(prompt, continuation)` pairs,
//!   which the label propagator calls many times per query.
//!
//! The forward pass runs over *packed* token streams: the sequences of a batch
//! are laid end to end with no padding (on a CPU the matrix products cost per
//! token, so padding would be pure waste), and sequences that share a prefix
//! share its rows (a token trie), so a context scored under many
//! continuations is computed once. Attention runs per sequence with candle's
//! CPU flash-attention kernel, which masks causally by loop bounds (no mask
//! tensors), reads the K/V rows of a sequence's path through the trie, and
//! supports grouped-query heads without copying K/V.
//!
//! Weight formats ([`WeightFormat`]): the file's own (Q4_1 matrices, Q8_0
//! tied output), everything re-quantized to Q8_0 at load (candle has SIMD
//! kernels for Q8_0 but not for Q4_1, so this is much faster; the default),
//! everything dequantized to f32 (fastest for long prompts, 4x the memory),
//! or a hybrid that keeps both Q8_0 (for token-by-token decoding) and f32
//! (for prompts, scoring and hidden states). The Q, K, V projections are
//! fused into one matrix and so are the gate and up projections, which
//! halves the number of matrix products per layer. Rotary tables are
//! precomputed for the whole window, and the KV cache is preallocated and
//! head-major, so a decoding step neither allocates masks nor copies the
//! cache.
//!
//! GGUF stores Q and K rows in the interleaved rotary layout that
//! `rope_i` expects. Position 0 of every sequence is an attention sink whose
//! residual norm is about 7x the others: pool or index hidden states without
//! it.

use std::borrow::Cow;
use std::io::{Read, Seek};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Layout, Module, Storage, Tensor, D};

use crate::{Error, Result};

pub(crate) mod attention;
#[cfg(test)]
pub(crate) mod testutil;

/// How the weight matrices are held in memory (and so which kernels run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored in the file (SmolLM2: Q4_1 matrices, Q8_0 output). Smallest,
    /// but candle's Q4_1 kernel is scalar, so this is slow.
    AsShipped,
    /// Every matrix re-quantized to Q8_0 at load (about 1 s). candle's Q8_0
    /// kernels use AVX2 (and AVX512-VNNI where present). The default.
    /// Slightly less exact than the file: on a CPU with AVX512-VNNI candle
    /// quantizes the down projection's input per 256 values, which measured
    /// perplexity 20.9 against 20.3 for f32 and 20.4 as shipped.
    #[default]
    Q8_0,
    /// Every matrix dequantized to f32 (4x the memory of Q8_0). Best prompt
    /// throughput, slowest token-by-token decoding.
    F32,
    /// Both: Q8_0 for token-by-token decoding, f32 for prompts, scoring and
    /// hidden states (from 8 rows per matrix product on). Fastest
    /// everywhere, at the memory of both (about 660 MiB for SmolLM2).
    Hybrid,
}

impl WeightFormat {
    /// Every format, for benchmarks.
    pub const ALL: [WeightFormat; 4] = [
        WeightFormat::AsShipped,
        WeightFormat::Q8_0,
        WeightFormat::F32,
        WeightFormat::Hybrid,
    ];

    /// A short name (`as-shipped`, `q8_0`, `f32`, `hybrid`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::AsShipped => "as-shipped",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F32 => "f32",
            WeightFormat::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<WeightFormat> {
        match s {
            "as-shipped" | "shipped" | "q4_1" => Ok(WeightFormat::AsShipped),
            "q8_0" | "q8" => Ok(WeightFormat::Q8_0),
            "f32" => Ok(WeightFormat::F32),
            "hybrid" => Ok(WeightFormat::Hybrid),
            other => Err(Error::InvalidArgument(format!(
                "unknown weight format {other:?}: expected as-shipped, q8_0, f32 or hybrid"
            ))),
        }
    }
}

/// Options for [`LlamaModel::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Weight format in memory.
    pub format: WeightFormat,
    /// Cap on the context window (defaults to the file's `context_length`).
    pub max_context: Option<usize>,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Hidden width of the feed-forward block.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the embedding and output matrices).
    pub vocab_size: usize,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub context_length: usize,
    /// Rotary base frequency.
    pub rope_base: f32,
    /// RMS-norm epsilon.
    pub rms_eps: f32,
}

/// Where to read hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAt {
    /// The residual stream after the first `n` blocks (`0`: the token
    /// embeddings, `n_layer`: the last block's output before the final norm).
    Block(usize),
    /// The last block's output after the final RMS norm: what the output
    /// matrix turns into logits ([`LlamaModel::logits_from_hidden`]).
    Final,
}

/// One `(prompt, continuation)` pair to score.
#[derive(Debug, Clone, Copy)]
pub struct ScorePair<'a> {
    /// The conditioning tokens (at least one).
    pub prompt: &'a [u32],
    /// The tokens whose log-probabilities are wanted.
    pub continuation: &'a [u32],
}

/// One teacher-forced continuation token, scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore {
    /// `log p(token | everything before it)`.
    pub logprob: f32,
    /// The most likely token at this position (the lowest id on ties, as in
    /// greedy decoding).
    pub argmax: u32,
    /// `log p(argmax)`.
    pub argmax_logprob: f32,
}

/// Options for batched scoring and hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most distinct tokens computed in one forward pass; larger batches are
    /// split (memory grows with it: about 25 KiB per token in flight).
    pub max_batch_tokens: usize,
    /// Share the rows of common prefixes between sequences.
    pub share_prefixes: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch_tokens: 8192,
            share_prefixes: true,
        }
    }
}

/// Keys and values of the tokens seen so far, owned by one request.
///
/// Make one with [`LlamaModel::new_cache`]; storage grows on demand up to the
/// model's context window.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, head-major `[n_kv_head, capacity, head_dim]` (each head's
    /// keys are one contiguous run, which is what decoding streams through);
    /// positions `..len` are valid.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
    max_len: usize,
    n_layer: usize,
    n_kv_head: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens this cache may hold (the model's context window).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every token (keeps the storage).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` tokens (e.g. to reuse a shared prompt
    /// prefix). Errors if `len` exceeds what is held.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::InvalidArgument(format!(
                "cannot truncate a cache of {} tokens to {len}",
                self.len
            )));
        }
        self.len = len;
        Ok(())
    }

    /// An independent copy (its own storage), e.g. to branch a shared prompt.
    pub fn fork(&self) -> Result<KvCache> {
        let copy =
            |ts: &[Tensor]| -> Result<Vec<Tensor>> { ts.iter().map(|t| Ok(t.copy()?)).collect() };
        Ok(KvCache {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
            capacity: self.capacity,
            max_len: self.max_len,
            n_layer: self.n_layer,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            device: self.device.clone(),
        })
    }

    /// Makes room for `needed` tokens in total.
    fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let cap = needed.max(self.capacity * 2).max(256).min(self.max_len);
        let shape = (self.n_kv_head, cap, self.head_dim);
        let mut k = Vec::with_capacity(self.n_layer);
        let mut v = Vec::with_capacity(self.n_layer);
        for l in 0..self.n_layer {
            let nk = Tensor::zeros(shape, DType::F32, &self.device)?;
            let nv = Tensor::zeros(shape, DType::F32, &self.device)?;
            if self.len > 0 {
                nk.slice_set(&self.k[l].narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                nv.slice_set(&self.v[l].narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            k.push(nk);
            v.push(nv);
        }
        self.k = k;
        self.v = v;
        self.capacity = cap;
        Ok(())
    }
}

/// One transformer block's weights.
#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    /// Q, K and V projections stacked: `[(n_head + 2 n_kv_head) head_dim, d]`.
    wqkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `[2 ffn, d]`.
    w_gate_up: Linear,
    w_down: Linear,
}

/// Which keys and values a run of query rows attends to.
#[derive(Debug)]
enum Keys {
    /// Rows `range` of the packed stream (a sequence not sharing anything).
    Range(Range<usize>),
    /// These rows of the packed stream, in position order (a trie path).
    Gather(Vec<u32>),
    /// The request's KV cache (which already holds the new rows).
    Cache,
}

/// A run of query rows of the packed stream and the keys it sees; the query
/// rows are the last rows of its key sequence (causal).
#[derive(Debug)]
struct Segment {
    rows: Range<usize>,
    keys: Keys,
}

/// Sequences packed end to end, prefixes shared.
#[derive(Debug)]
struct Packed {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    segments: Vec<Segment>,
    /// For each packed sequence (in the order given), the row of each token.
    paths: Vec<Vec<u32>>,
}

/// The contiguous f32 data of a CPU tensor.
pub(crate) fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>()?,
        _ => return Err(Error::Device("expected a CPU tensor".into())),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(Error::InvalidArgument(
            "expected a contiguous tensor".into(),
        )),
    }
}

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Groups sequences into forward passes of at most `budget` new rows each
/// (a single longer sequence gets a pass of its own). Returns the indices of
/// each group, sorted so that shared prefixes are adjacent.
fn plan_groups(seqs: &[&[u32]], budget: usize, share: bool) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    if share {
        order.sort_by(|&a, &b| seqs[a].cmp(seqs[b]));
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut cost = 0usize;
    for &i in &order {
        let shared = match groups.last().and_then(|g| g.last()) {
            Some(&prev) if share => lcp(seqs[prev], seqs[i]),
            _ => 0,
        };
        let extra = seqs[i].len() - shared;
        match groups.last_mut() {
            Some(g) if cost + extra <= budget => {
                g.push(i);
                cost += extra;
            }
            _ => {
                groups.push(vec![i]);
                cost = seqs[i].len();
            }
        }
    }
    groups
}

/// Packs the sequences `idx` (adjacent shared prefixes) into one stream.
fn pack(seqs: &[&[u32]], idx: &[usize], share: bool) -> Packed {
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    let mut segments = Vec::new();
    let mut paths: Vec<Vec<u32>> = Vec::with_capacity(idx.len());
    for (j, &i) in idx.iter().enumerate() {
        let seq = seqs[i];
        let shared = if share && j > 0 {
            lcp(seqs[idx[j - 1]], seq)
        } else {
            0
        };
        let mut path: Vec<u32> = if shared > 0 {
            paths[j - 1][..shared].to_vec()
        } else {
            Vec::with_capacity(seq.len())
        };
        let start = tokens.len();
        for (p, &t) in seq.iter().enumerate().skip(shared) {
            path.push(tokens.len() as u32);
            tokens.push(t);
            positions.push(p as u32);
        }
        let rows = start..tokens.len();
        if !rows.is_empty() {
            let contiguous = path
                .iter()
                .enumerate()
                .all(|(k, &r)| r as usize == path[0] as usize + k);
            let keys = if contiguous {
                Keys::Range(path[0] as usize..path[0] as usize + path.len())
            } else {
                Keys::Gather(path.clone())
            };
            segments.push(Segment { rows, keys });
        }
        paths.push(path);
    }
    Packed {
        tokens,
        positions,
        segments,
        paths,
    }
}

/// Token positions of a packed stream.
enum Positions<'a> {
    /// `start, start + 1, ...` (one sequence continuing a cache).
    From(usize),
    /// One position per row (packed sequences).
    Each(&'a [u32]),
}

/// A Llama-architecture language model loaded from GGUF.
///
/// All methods take `&self`; the type is `Send + Sync`, so one loaded model
/// serves many threads, each with its own [`KvCache`].
#[derive(Debug)]
pub struct LlamaModel {
    config: LlamaConfig,
    format: WeightFormat,
    /// Token embeddings (quantized rows are dequantized on lookup).
    embed: Linear,
    blocks: Vec<Block>,
    final_norm: Tensor,
    /// Output matrix `[vocab, d]` (tied to the embeddings in SmolLM2).
    output: Linear,
    /// Rotary tables `[context_length, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LlamaModel>();
    assert_send_sync::<KvCache>();
};

fn md<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| Error::Format(format!("GGUF metadata has no {key}")))
}

fn md_usize(content: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = md(content, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| Error::Format(format!("GGUF metadata {key}: {e}")))
}

fn md_f32(content: &gguf_file::Content, key: &str) -> Result<f32> {
    md(content, key)?
        .to_f32()
        .map_err(|e| Error::Format(format!("GGUF metadata {key}: {e}")))
}

impl LlamaConfig {
    /// Reads the hyper-parameters of a `llama` GGUF.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<LlamaConfig> {
        let arch = md(content, "general.architecture")?
            .to_string()
            .map_err(|e| Error::Format(format!("general.architecture: {e}")))?;
        if arch != "llama" {
            return Err(Error::Format(format!(
                "architecture {arch:?} is not supported (only llama)"
            )));
        }
        let n_head = md_usize(content, "llama.attention.head_count")?;
        let d_model = md_usize(content, "llama.embedding_length")?;
        let n_kv_head = md_usize(content, "llama.attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || d_model % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(Error::Format(format!(
                "bad head layout: width {d_model}, {n_head} heads, {n_kv_head} kv heads"
            )));
        }
        let head_dim = d_model / n_head;
        let rope_dim = md_usize(content, "llama.rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim || head_dim % 2 != 0 {
            return Err(Error::Format(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            )));
        }
        let vocab_size = match md_usize(content, "llama.vocab_size") {
            Ok(v) => v,
            Err(_) => md(content, "tokenizer.ggml.tokens")?
                .to_vec()
                .map_err(|e| Error::Format(format!("tokenizer.ggml.tokens: {e}")))?
                .len(),
        };
        Ok(LlamaConfig {
            n_layer: md_usize(content, "llama.block_count")?,
            d_model,
            n_head,
            n_kv_head,
            head_dim,
            ffn_dim: md_usize(content, "llama.feed_forward_length")?,
            vocab_size,
            context_length: md_usize(content, "llama.context_length").unwrap_or(2048),
            rope_base: md_f32(content, "llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: md_f32(content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        })
    }
}

/// A weight matrix `[out, in]`, in one or two representations.
#[derive(Debug, Clone)]
struct Linear {
    /// Used for few rows (token-by-token decoding), and always when `wide` is absent.
    narrow: QMatMul,
    /// f32 copy used for [`WIDE_ROWS`] rows or more ([`WeightFormat::Hybrid`]).
    wide: Option<QMatMul>,
}

/// From this many input rows on, the f32 copy of a hybrid model is used.
const WIDE_ROWS: usize = 8;

impl Linear {
    fn single(m: QMatMul) -> Linear {
        Linear {
            narrow: m,
            wide: None,
        }
    }

    /// `x [rows, in] -> [rows, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let m = match &self.wide {
            Some(w) if rows >= WIDE_ROWS => w,
            _ => &self.narrow,
        };
        Ok(m.forward(x)?)
    }

    /// Rows of the matrix as f32 (an embedding lookup).
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.narrow.embedding(ids)?)
    }

    /// The whole matrix in f32.
    fn to_f32(&self, device: &Device) -> Result<Tensor> {
        let m = self.wide.as_ref().unwrap_or(&self.narrow);
        Ok(match m {
            QMatMul::QTensor(q) => q.dequantize(device)?,
            QMatMul::Tensor(t) => t.clone(),
            QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
        })
    }
}

/// Stacks matrices with the same input width along their rows, in `format`.
fn stack_rows(parts: Vec<QTensor>, format: WeightFormat, device: &Device) -> Result<Linear> {
    let rows: usize = parts.iter().map(|p| p.shape().dims()[0]).sum();
    let cols = parts[0].shape().dims()[1];
    let same_dtype = parts.iter().all(|p| p.dtype() == parts[0].dtype());
    if format == WeightFormat::AsShipped && same_dtype {
        // Quantized rows are independent byte runs: concatenate them.
        let dtype = parts[0].dtype();
        let mut bytes = Vec::new();
        for p in &parts {
            bytes.extend_from_slice(&p.data()?);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
        return Ok(Linear::single(QMatMul::QTensor(Arc::new(QTensor::new(
            storage,
            (rows, cols),
        )?))));
    }
    let f32s = parts
        .iter()
        .map(|p| p.dequantize(device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let full = Tensor::cat(&f32s, 0)?;
    convert_f32(full, None, format)
}

/// One matrix in `format`.
fn convert(t: QTensor, format: WeightFormat, device: &Device) -> Result<Linear> {
    match format {
        WeightFormat::AsShipped => Ok(Linear::single(QMatMul::QTensor(Arc::new(t)))),
        _ => {
            let f = t.dequantize(device)?;
            let q8 = (t.dtype() == GgmlDType::Q8_0).then_some(t);
            convert_f32(f, q8, format)
        }
    }
}

/// An f32 matrix in `format`; `q8` is its Q8_0 form when already at hand.
fn convert_f32(t: Tensor, q8: Option<QTensor>, format: WeightFormat) -> Result<Linear> {
    let quantized = |t: &Tensor| -> Result<QMatMul> {
        Ok(QMatMul::QTensor(Arc::new(match q8 {
            Some(q) => q,
            None => QTensor::quantize(t, GgmlDType::Q8_0)?,
        })))
    };
    Ok(match format {
        WeightFormat::F32 => Linear::single(QMatMul::Tensor(t)),
        WeightFormat::Hybrid => Linear {
            narrow: quantized(&t)?,
            wide: Some(QMatMul::Tensor(t)),
        },
        // Q8_0 (and AsShipped with mixed types, which must be re-quantized to stack).
        WeightFormat::Q8_0 | WeightFormat::AsShipped => Linear::single(quantized(&t)?),
    })
}

/// Raw tensors of one block, before conversion.
struct RawBlock {
    attn_norm: QTensor,
    q: QTensor,
    k: QTensor,
    v: QTensor,
    o: QTensor,
    ffn_norm: QTensor,
    gate: QTensor,
    up: QTensor,
    down: QTensor,
}

impl RawBlock {
    fn convert(self, format: WeightFormat, device: &Device) -> Result<Block> {
        Ok(Block {
            attn_norm: self.attn_norm.dequantize(device)?,
            wqkv: stack_rows(vec![self.q, self.k, self.v], format, device)?,
            wo: convert(self.o, format, device)?,
            ffn_norm: self.ffn_norm.dequantize(device)?,
            w_gate_up: stack_rows(vec![self.gate, self.up], format, device)?,
            w_down: convert(self.down, format, device)?,
        })
    }
}

fn check_shape(t: &QTensor, name: &str, shape: (usize, usize)) -> Result<()> {
    if t.shape().dims() != [shape.0, shape.1] {
        return Err(Error::Format(format!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            t.shape().dims()
        )));
    }
    Ok(())
}

fn check_vector(t: &QTensor, name: &str, len: usize) -> Result<()> {
    if t.shape().dims() != [len] {
        return Err(Error::Format(format!(
            "tensor {name} has shape {:?}, expected [{len}]",
            t.shape().dims()
        )));
    }
    Ok(())
}

impl LlamaModel {
    /// Loads a GGUF file.
    pub fn load(path: &Path, device: &Device, options: &LoadOptions) -> Result<LlamaModel> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        LlamaModel::from_gguf(&content, &mut file, device, options)
    }

    /// Builds the model from parsed GGUF metadata and the file it came from.
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<LlamaModel> {
        let started = std::time::Instant::now();
        let mut config = LlamaConfig::from_gguf(content)?;
        if let Some(max) = options.max_context {
            if max == 0 {
                return Err(Error::InvalidArgument(
                    "max_context must be positive".into(),
                ));
            }
            config.context_length = config.context_length.min(max);
        }
        let c = &config;
        let mut tensor = |name: &str| -> Result<QTensor> {
            content
                .tensor(reader, name, device)
                .map_err(|e| Error::Format(format!("tensor {name}: {e}")))
        };
        let qkv_rows = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let embed_q = tensor("token_embd.weight")?;
        check_shape(&embed_q, "token_embd.weight", (c.vocab_size, c.d_model))?;
        let output_q = if content.tensor_infos.contains_key("output.weight") {
            let t = tensor("output.weight")?;
            check_shape(&t, "output.weight", (c.vocab_size, c.d_model))?;
            Some(t)
        } else {
            None
        };
        let final_norm = tensor("output_norm.weight")?;
        check_vector(&final_norm, "output_norm.weight", c.d_model)?;
        let mut raw = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let mut get = |n: &str, shape: Option<(usize, usize)>| -> Result<QTensor> {
                let name = format!("blk.{l}.{n}.weight");
                let t = tensor(&name)?;
                match shape {
                    Some(s) => check_shape(&t, &name, s)?,
                    None => check_vector(&t, &name, c.d_model)?,
                }
                Ok(t)
            };
            raw.push(RawBlock {
                attn_norm: get("attn_norm", None)?,
                q: get("attn_q", Some((qkv_rows.0, c.d_model)))?,
                k: get("attn_k", Some((qkv_rows.1, c.d_model)))?,
                v: get("attn_v", Some((qkv_rows.1, c.d_model)))?,
                o: get("attn_output", Some((c.d_model, qkv_rows.0)))?,
                ffn_norm: get("ffn_norm", None)?,
                gate: get("ffn_gate", Some((c.ffn_dim, c.d_model)))?,
                up: get("ffn_up", Some((c.ffn_dim, c.d_model)))?,
                down: get("ffn_down", Some((c.d_model, c.ffn_dim)))?,
            });
        }

        // Convert the blocks on all cores: re-quantizing is the slow part of loading.
        let format = options.format;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, raw.len().max(1));
        let per = raw.len().div_ceil(threads).max(1);
        let mut chunks: Vec<Vec<RawBlock>> = Vec::new();
        let mut it = raw.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(per).collect());
        }
        let converted: Vec<Result<Vec<Block>>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|b| b.convert(format, device))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Format("weight conversion thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut blocks = Vec::with_capacity(c.n_layer);
        for part in converted {
            blocks.extend(part?);
        }

        // Embeddings and output: tied in SmolLM2, so one matrix serves both.
        let (embed, output) = match output_q {
            None => {
                let out = convert(embed_q, format, device)?;
                (out.clone(), out)
            }
            Some(out) => (
                convert(embed_q, format, device)?,
                convert(out, format, device)?,
            ),
        };

        let half = c.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / c.rope_base.powf((2 * i) as f32 / c.head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(c.context_length * half);
        let mut sin = Vec::with_capacity(c.context_length * half);
        for p in 0..c.context_length {
            for &f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (c.context_length, half), device)?;
        let sin = Tensor::from_vec(sin, (c.context_length, half), device)?;
        tracing::info!(
            format = format.name(),
            layers = c.n_layer,
            secs = started.elapsed().as_secs_f64(),
            "loaded GGUF llama"
        );
        Ok(LlamaModel {
            final_norm: final_norm.dequantize(device)?,
            config,
            format,
            embed,
            blocks,
            output,
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The weight format in memory.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            capacity: 0,
            max_len: self.config.context_length,
            n_layer: self.config.n_layer,
            n_kv_head: self.config.n_kv_head,
            head_dim: self.config.head_dim,
            device: self.device.clone(),
        }
    }

    fn check_tokens(&self, tokens: &[u32], what: &str) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument(format!("{what}: no tokens")));
        }
        if let Some(t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "{what}: token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    fn check_cache(&self, cache: &KvCache, extra: usize) -> Result<()> {
        let c = &self.config;
        if cache.n_layer != c.n_layer
            || cache.n_kv_head != c.n_kv_head
            || cache.head_dim != c.head_dim
        {
            return Err(Error::InvalidArgument(
                "the KV cache was made for a different model".into(),
            ));
        }
        if cache.len + extra > c.context_length {
            return Err(Error::InvalidArgument(format!(
                "{} cached + {extra} new tokens exceed the context window of {}",
                cache.len, c.context_length
            )));
        }
        Ok(())
    }

    /// Runs `tokens` after what `cache` holds and returns the logits at every
    /// new position, `[tokens.len(), vocab]`. The cache then holds them too.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let h = self.forward_cached(tokens, cache)?;
        self.logits_from_hidden(&self.final_norm(&h)?)
    }

    /// Like [`Self::forward`] but returns only the last position's logits, `[vocab]`.
    pub fn forward_last(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let h = self.forward_cached(tokens, cache)?;
        let last = h.narrow(0, tokens.len() - 1, 1)?;
        Ok(self
            .logits_from_hidden(&self.final_norm(&last)?)?
            .squeeze(0)?)
    }

    /// Runs `tokens` into the cache without computing logits (prompt prefill
    /// whose logits are not needed).
    pub fn extend(&self, tokens: &[u32], cache: &mut KvCache) -> Result<()> {
        self.forward_cached(tokens, cache).map(|_| ())
    }

    /// The residual stream after the last block for the new tokens.
    fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.check_tokens(tokens, "forward")?;
        self.check_cache(cache, tokens.len())?;
        cache.reserve(cache.len + tokens.len())?;
        let seg = [Segment {
            rows: 0..tokens.len(),
            keys: Keys::Cache,
        }];
        let start = cache.len;
        let h = self.run(
            tokens,
            Positions::From(start),
            &seg,
            Some(cache),
            self.config.n_layer,
        )?;
        cache.len = start + tokens.len();
        Ok(h)
    }

    /// Applies the final RMS norm.
    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &h.contiguous()?,
            &self.final_norm,
            self.config.rms_eps,
        )?)
    }

    /// Logits `[rows, vocab]` from final hidden states `[rows, d]` (as
    /// returned by [`Self::hidden_states`] with [`HiddenAt::Final`]).
    pub fn logits_from_hidden(&self, final_hidden: &Tensor) -> Result<Tensor> {
        self.output.forward(&final_hidden.contiguous()?)
    }

    /// Runs `tokens` after what `cache` holds and returns the final hidden
    /// state (after the last norm: the vector the output matrix reads) at
    /// every new position, one `Vec` of width `d` per token. kNN-LM keys
    /// and queries are these vectors.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        let h = self.forward_cached(tokens, cache)?;
        Ok(self.final_norm(&h)?.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Log-probabilities over the vocabulary from one final hidden state
    /// (as returned by [`Self::forward_hidden`]).
    pub fn log_probs_from_hidden(&self, final_hidden: &[f32]) -> Result<Vec<f32>> {
        if final_hidden.len() != self.config.d_model {
            return Err(Error::InvalidArgument(format!(
                "hidden state has {} values, the model {}",
                final_hidden.len(),
                self.config.d_model
            )));
        }
        let h = Tensor::from_slice(final_hidden, (1, final_hidden.len()), &self.device)?;
        let logits = self
            .logits_from_hidden(&h)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        Ok(candle_nn::ops::log_softmax(&logits, 0)?.to_vec1()?)
    }

    /// Final hidden states of many sequences (from scratch, batched as
    /// [`Self::hidden_states_batch`] does): per sequence, one row per
    /// position.
    pub fn final_hidden_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<Vec<f32>>>> {
        self.hidden_states_batch(seqs, HiddenAt::Final, &BatchOptions::default())?
            .into_iter()
            .map(|t| Ok(t.to_dtype(DType::F32)?.to_vec2()?))
            .collect()
    }

    /// The output matrix `[vocab, d]` in f32 (dequantized).
    pub fn output_weight(&self) -> Result<Tensor> {
        self.output.to_f32(&self.device)
    }

    fn check_hidden_at(&self, at: HiddenAt) -> Result<usize> {
        match at {
            HiddenAt::Final => Ok(self.config.n_layer),
            HiddenAt::Block(n) if n <= self.config.n_layer => Ok(n),
            HiddenAt::Block(n) => Err(Error::InvalidArgument(format!(
                "layer {n} requested; the model has {} blocks",
                self.config.n_layer
            ))),
        }
    }

    fn check_len(&self, len: usize, what: &str) -> Result<()> {
        if len > self.config.context_length {
            return Err(Error::InvalidArgument(format!(
                "{what}: {len} tokens exceed the context window of {}",
                self.config.context_length
            )));
        }
        Ok(())
    }

    /// Hidden states `[tokens.len(), d]` at every position of one sequence
    /// (computed from scratch; blocks after the requested one are skipped).
    pub fn hidden_states(&self, tokens: &[u32], at: HiddenAt) -> Result<Tensor> {
        let mut out = self.hidden_states_batch(&[tokens], at, &BatchOptions::default())?;
        out.pop()
            .ok_or_else(|| Error::InvalidArgument("hidden_states: no sequence".into()))
    }

    /// Hidden states of many sequences, packed into as few forward passes as
    /// `options` allow; one `[len_i, d]` tensor per sequence, in input order.
    pub fn hidden_states_batch(
        &self,
        seqs: &[&[u32]],
        at: HiddenAt,
        options: &BatchOptions,
    ) -> Result<Vec<Tensor>> {
        let n_blocks = self.check_hidden_at(at)?;
        for s in seqs {
            self.check_tokens(s, "hidden_states")?;
            self.check_len(s.len(), "hidden_states")?;
        }
        let mut out: Vec<Option<Tensor>> = vec![None; seqs.len()];
        let budget = options.max_batch_tokens.max(1);
        for group in plan_groups(seqs, budget, options.share_prefixes) {
            let packed = pack(seqs, &group, options.share_prefixes);
            let h = self.run(
                &packed.tokens,
                Positions::Each(&packed.positions),
                &packed.segments,
                None,
                n_blocks,
            )?;
            let h = if at == HiddenAt::Final {
                self.final_norm(&h)?
            } else {
                h
            };
            for (&i, path) in group.iter().zip(&packed.paths) {
                let rows = Tensor::new(path.as_slice(), &self.device)?;
                out[i] = Some(h.index_select(&rows, 0)?);
            }
        }
        out.into_iter()
            .map(|t| t.ok_or_else(|| Error::InvalidArgument("sequence was not computed".into())))
            .collect()
    }

    /// Teacher-forced log-probabilities: for each pair, `log p(c_i | prompt,
    /// c_<i)` for every continuation token `c_i`, in input order.
    ///
    /// All pairs are packed into as few forward passes as `options` allow;
    /// pairs sharing a prompt prefix compute it once, and logits are only
    /// computed at the positions that predict a continuation token.
    pub fn score(&self, pairs: &[ScorePair<'_>], options: &BatchOptions) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .score_detailed(pairs, options)?
            .into_iter()
            .map(|s| s.into_iter().map(|t| t.logprob).collect())
            .collect())
    }

    /// [`score`](Self::score) with, at every continuation position, the
    /// token greedy decoding would have chosen there: what lets a caller
    /// check a draft continuation against greedy decoding of the prompt in
    /// one batched pass (see `Llm::chat_from_draft`).
    pub fn score_detailed(
        &self,
        pairs: &[ScorePair<'_>],
        options: &BatchOptions,
    ) -> Result<Vec<Vec<TokenScore>>> {
        for (i, p) in pairs.iter().enumerate() {
            if p.prompt.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "score: pair {i} has an empty prompt (at least one token must precede the continuation)"
                )));
            }
            self.check_tokens(p.prompt, "score prompt")?;
            if !p.continuation.is_empty() {
                self.check_tokens(p.continuation, "score continuation")?;
            }
            self.check_len(p.prompt.len() + p.continuation.len(), "score")?;
        }
        // The last continuation token is never an input.
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|p| {
                let mut s = p.prompt.to_vec();
                if let Some((_, init)) = p.continuation.split_last() {
                    s.extend_from_slice(init);
                }
                s
            })
            .collect();
        let seq_refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let mut out: Vec<Vec<TokenScore>> = pairs
            .iter()
            .map(|p| {
                vec![
                    TokenScore {
                        logprob: 0.0,
                        argmax: 0,
                        argmax_logprob: 0.0,
                    };
                    p.continuation.len()
                ]
            })
            .collect();
        let budget = options.max_batch_tokens.max(1);
        for group in plan_groups(&seq_refs, budget, options.share_prefixes) {
            let packed = pack(&seq_refs, &group, options.share_prefixes);
            // Which rows predict which continuation tokens.
            let mut row_of_node: std::collections::HashMap<u32, usize> = Default::default();
            let mut rows: Vec<u32> = Vec::new();
            // (pair, index in continuation, logits row, target token)
            let mut wanted: Vec<(usize, usize, usize, u32)> = Vec::new();
            for (&i, path) in group.iter().zip(&packed.paths) {
                let p = &pairs[i];
                for (k, &target) in p.continuation.iter().enumerate() {
                    let node = path[p.prompt.len() - 1 + k];
                    let r = *row_of_node.entry(node).or_insert_with(|| {
                        rows.push(node);
                        rows.len() - 1
                    });
                    wanted.push((i, k, r, target));
                }
            }
            if rows.is_empty() {
                continue;
            }
            let h = self.run(
                &packed.tokens,
                Positions::Each(&packed.positions),
                &packed.segments,
                None,
                self.config.n_layer,
            )?;
            let h = h.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
            let h = self.final_norm(&h)?;
            // Logits in slices of rows to bound memory (vocab floats per row).
            const ROWS_PER_SLICE: usize = 256;
            let vocab = self.config.vocab_size;
            let mut lse = Vec::with_capacity(rows.len());
            let mut best: Vec<u32> = Vec::with_capacity(rows.len());
            let mut top: Vec<f32> = Vec::with_capacity(rows.len());
            let mut picked = vec![0f32; wanted.len()];
            for start in (0..rows.len()).step_by(ROWS_PER_SLICE) {
                let n = ROWS_PER_SLICE.min(rows.len() - start);
                let logits = self.logits_from_hidden(&h.narrow(0, start, n)?)?;
                lse.extend(logits.log_sum_exp(D::Minus1)?.to_vec1::<f32>()?);
                best.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
                top.extend(logits.max(D::Minus1)?.to_vec1::<f32>()?);
                let (idx, pos): (Vec<u32>, Vec<usize>) = wanted
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| (start..start + n).contains(&w.2))
                    .map(|(j, w)| (((w.2 - start) * vocab) as u32 + w.3, j))
                    .unzip();
                let vals = logits
                    .flatten_all()?
                    .index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?
                    .to_vec1::<f32>()?;
                for (j, v) in pos.into_iter().zip(vals) {
                    picked[j] = v;
                }
            }
            for (j, &(i, k, r, _)) in wanted.iter().enumerate() {
                out[i][k] = TokenScore {
                    logprob: picked[j] - lse[r],
                    argmax: best[r],
                    argmax_logprob: top[r] - lse[r],
                };
            }
        }
        Ok(out)
    }

    /// Attention of the query rows `q` `[n, n_head, head_dim]` over `k`, `v`:
    /// packed rows `[rows, n_kv_head, head_dim]`, or with `cached` a
    /// head-major cache `[n_kv_head, capacity, head_dim]` whose first
    /// `kv_rows` positions are valid. Returns `[n, n_head * head_dim]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &[Segment],
        kv_rows: usize,
        cached: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = q.dim(0)?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        if !self.device.is_cpu() {
            return self.attend_ops(q, k, v, segments, kv_rows, cached);
        }
        let jobs: Vec<attention::Job<'_>> = segments
            .iter()
            .map(|seg| attention::Job {
                q_rows: seg.rows.clone(),
                keys: match &seg.keys {
                    Keys::Range(r) => attention::KeyRows::Range {
                        start: r.start,
                        len: r.len(),
                    },
                    Keys::Gather(p) => attention::KeyRows::List(p),
                    Keys::Cache => attention::KeyRows::Range {
                        start: 0,
                        len: kv_rows,
                    },
                },
                causal: true,
            })
            .collect();
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let hd = c.head_dim;
        // Packed rows are `[rows, n_kv_head, head_dim]`; a cache is head-major
        // `[n_kv_head, capacity, head_dim]`.
        let (stride, head_stride) = if cached {
            (hd, k.dim(1)? * hd)
        } else {
            (c.n_kv_head * hd, hd)
        };
        let out = attention::attend(
            attention::Rows {
                data: cpu_slice(&qg, ql)?,
                stride: c.n_head * hd,
                head_stride: hd,
            },
            attention::Rows {
                data: cpu_slice(&kg, kl)?,
                stride,
                head_stride,
            },
            attention::Rows {
                data: cpu_slice(&vg, vl)?,
                stride,
                head_stride,
            },
            n,
            &jobs,
            attention::Heads {
                n_head: c.n_head,
                n_kv_head: c.n_kv_head,
                head_dim: c.head_dim,
            },
            scale,
        );
        Ok(Tensor::from_vec(
            out,
            (n, c.n_head * c.head_dim),
            &self.device,
        )?)
    }

    /// The same attention from generic tensor ops (explicit mask and
    /// softmax), for devices other than the CPU.
    fn attend_ops(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &[Segment],
        kv_rows: usize,
        cached: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let rk = c.n_head / c.n_kv_head;
        let mut outs = Vec::with_capacity(segments.len());
        for seg in segments {
            let s = seg.rows.len();
            // Keys and values as [Hkv, L, D].
            let (ks, vs) = match &seg.keys {
                Keys::Range(r) if !cached => (
                    k.narrow(0, r.start, r.len())?
                        .transpose(0, 1)?
                        .contiguous()?,
                    v.narrow(0, r.start, r.len())?
                        .transpose(0, 1)?
                        .contiguous()?,
                ),
                Keys::Gather(p) if !cached => {
                    let idx = Tensor::new(p.as_slice(), &self.device)?;
                    (
                        k.index_select(&idx, 0)?.transpose(0, 1)?.contiguous()?,
                        v.index_select(&idx, 0)?.transpose(0, 1)?.contiguous()?,
                    )
                }
                Keys::Cache if cached => (
                    k.narrow(1, 0, kv_rows)?.contiguous()?,
                    v.narrow(1, 0, kv_rows)?.contiguous()?,
                ),
                _ => {
                    return Err(Error::InvalidArgument(
                        "attention keys do not match the key layout".into(),
                    ))
                }
            };
            let l = ks.dim(1)?;
            let first = l - s;
            // [S, H, D] -> [Hkv, rk * S, D]; heads of a group are adjacent.
            let qs = q
                .narrow(0, seg.rows.start, s)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((c.n_kv_head, rk * s, c.head_dim))?;
            let att = (qs.matmul(&ks.t()?)? * scale as f64)?.reshape((c.n_kv_head, rk, s, l))?;
            let mask: Vec<f32> = (0..s)
                .flat_map(|i| {
                    (0..l).map(move |j| {
                        if j <= first + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (s, l), &self.device)?;
            let att = candle_nn::ops::softmax_last_dim(&att.broadcast_add(&mask)?)?;
            let o = att.reshape((c.n_kv_head, rk * s, l))?.matmul(&vs)?; // [Hkv, rk * S, D]
            outs.push(
                o.reshape((c.n_head, s, c.head_dim))?
                    .transpose(0, 1)?
                    .reshape((s, c.n_head * c.head_dim))?,
            );
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// The forward pass over a packed stream: returns the residual stream
    /// `[N, d]` after `n_blocks` blocks. With a cache, the new keys and
    /// values are written at rows `cache.len..` (the caller advances `len`).
    fn run(
        &self,
        tokens: &[u32],
        positions: Positions<'_>,
        segments: &[Segment],
        mut cache: Option<&mut KvCache>,
        n_blocks: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.rows(&ids)?;
        if n_blocks == 0 {
            return Ok(x);
        }
        let half = c.head_dim / 2;
        let (cos, sin) = match positions {
            Positions::From(start) => {
                (self.cos.narrow(0, start, n)?, self.sin.narrow(0, start, n)?)
            }
            Positions::Each(p) => {
                let idx = Tensor::new(p, &self.device)?;
                (
                    self.cos.index_select(&idx, 0)?,
                    self.sin.index_select(&idx, 0)?,
                )
            }
        };
        let cos = cos.reshape((n, 1, half))?;
        let sin = sin.reshape((n, 1, half))?;
        let q_width = c.n_head * c.head_dim;
        let kv_width = c.n_kv_head * c.head_dim;
        let past = cache.as_ref().map(|c| c.len).unwrap_or(0);
        for (l, b) in self.blocks.iter().take(n_blocks).enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, c.rms_eps)?;
            let qkv = b.wqkv.forward(&h)?;
            let q = qkv
                .narrow(1, 0, q_width)?
                .contiguous()?
                .reshape((n, c.n_head, 1, c.head_dim))?;
            let k = qkv.narrow(1, q_width, kv_width)?.contiguous()?.reshape((
                n,
                c.n_kv_head,
                1,
                c.head_dim,
            ))?;
            let v = qkv
                .narrow(1, q_width + kv_width, kv_width)?
                .contiguous()?
                .reshape((n, c.n_kv_head, c.head_dim))?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?
                .reshape((n, c.n_head, c.head_dim))?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?.reshape((
                n,
                c.n_kv_head,
                c.head_dim,
            ))?;
            let attn = match cache.as_deref_mut() {
                Some(cache) => {
                    cache.k[l].slice_set(&k.transpose(0, 1)?.contiguous()?, 1, past)?;
                    cache.v[l].slice_set(&v.transpose(0, 1)?.contiguous()?, 1, past)?;
                    self.attend(&q, &cache.k[l], &cache.v[l], segments, past + n, true)?
                }
                None => self.attend(&q, &k, &v, segments, n, false)?,
            };
            x = (x + b.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, c.rms_eps)?;
            let gu = b.w_gate_up.forward(&h)?;
            let act = (candle_nn::ops::silu(&gu.narrow(1, 0, c.ffn_dim)?)?
                * gu.narrow(1, c.ffn_dim, c.ffn_dim)?)?;
            x = (x + b.w_down.forward(&act)?)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests;
