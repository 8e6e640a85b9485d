//! Differentiable building blocks for the models lethe trains.
//!
//! Why this module exists: candle-nn's fused kernels `ops::rms_norm` (behind
//! `RmsNorm::forward`), `ops::layer_norm`, `ops::softmax_last_dim`,
//! `ops::sdpa` and `rotary_emb::{rope, rope_i, rope_thd}` have **no backward
//! pass**. A model built from them trains silently wrong: the gradient stops
//! at the fused op and every parameter below it keeps its initial value
//! (measured: 2 of 30 tensors of a tiny LM, 0 of 101 of BERT got a
//! gradient). And candle's `max_pool2d` has a backward that is wrong by a
//! factor `1/k^2` (see [`max_pool2x2`]).
//!
//! Every block therefore exists in two forms:
//!
//! * **Reference, from primitive ops** that backpropagate (`sqr`,
//!   `sum_keepdim`, `exp`, `matmul`, `narrow`, `cat`, `silu`, `gather`,
//!   ...): [`rms_norm_reference`], [`Rotary::apply`], [`attention`] with an
//!   additive mask normalised by [`candle_nn::ops::softmax`],
//!   [`batch_norm2d_reference`], candle's `conv2d`, `silu * up`, a
//!   log-sum-exp cross-entropy. These run on every device other than the
//!   CPU (and on the CPU for non-f32 tensors).
//! * **Fused CPU kernels with a hand-written backward**: [`rms_norm`],
//!   [`causal_attention`] (scale + causal mask + softmax in one kernel),
//!   [`Rotary::apply_bthd`] (rotation fused with the head transpose),
//!   [`swiglu`], [`token_log_probs`], [`conv2d`] (im2col and a gemm per
//!   image; col2im in the backward, which skips the products of a frozen
//!   kernel or an untracked input), [`relu`], [`batch_norm2d`] and
//!   [`max_pool2x2`], each a candle `CustomOp` whose
//!   `bwd` is another kernel. candle's backward pass allocates a zero tensor
//!   and an addition for every edge of the graph, so a norm built from seven
//!   primitive ops costs about twenty passes over memory in training; one
//!   node costs two. On the 2-core dev machine (one element-wise thread)
//!   this took a training step of the tiny decoder from ~60 to ~42 ms and
//!   the small CNN from ~100 to ~360 images/s.
//!
//! The tests check, for every fused kernel, that its values and its
//! gradients with respect to every input match the reference (to 1e-5, or
//! 1e-4 for the convolution and batch norm).
//!
//! The vision models' CPU matrix products (inside [`conv2d`]'s kernels,
//! and [`linear_product`] for their heads) are summed in depth blocks that
//! do not depend on the host's caches (module `depth`): gemm's own blocks
//! do, and a crafting run turned that into different protections on two
//! CPUs. Training them gives the same bits on every x86-64 host with FMA.
//!
//! Input gradients through frozen weights skip the graph altogether:
//! module `frozen` calls the backward kernels directly, for
//! `vision::FrozenClassifier`.
//!
//! `log_sum_exp` detaches the *maximum* that only stabilises its
//! exponential. The value is shift-invariant there, so the exact gradient
//! through the maximum is zero: detaching changes no gradient and saves a
//! mask-building backward pass through `max`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, Var, D,
};

use crate::{Error, Result};

/// Whether a forward pass is for training (dropout active, batch-norm batch
/// statistics, running statistics updated) or for evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: stochastic layers are active.
    Train,
    /// Evaluation: deterministic, no state is updated.
    Eval,
}

impl Mode {
    /// True for [`Mode::Train`].
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}

/// The additive value that removes a key from attention.
///
/// Finite on purpose: a row whose keys are all masked then attends
/// uniformly instead of producing NaN, and `exp` of it is exactly 0 in f32.
pub const MASK_VALUE: f32 = -1e9;

/// A trainable parameter: a [`Var`] plus a switch, shared by every parameter
/// of one model, that decides whether forward passes track its gradient.
///
/// Frozen parameters are read through [`Var::as_detached_tensor`], so a
/// backward pass neither computes nor stores their gradients (training a LoRA
/// adapter on a frozen base costs no base-weight gradients).
#[derive(Debug, Clone)]
pub(crate) struct Param {
    var: Var,
    trainable: Arc<AtomicBool>,
}

impl Param {
    pub(crate) fn new(var: Var, trainable: Arc<AtomicBool>) -> Param {
        Param { var, trainable }
    }

    /// The value to use in a forward pass.
    pub(crate) fn tensor(&self) -> Tensor {
        if self.trainable.load(Ordering::Relaxed) {
            self.var.as_tensor().clone()
        } else {
            self.var.as_detached_tensor()
        }
    }

    pub(crate) fn var(&self) -> &Var {
        &self.var
    }
}

/// RMSNorm, `x / sqrt(mean(x^2) + eps) * weight`, over the last dimension,
/// with a backward pass (candle-nn's `RmsNorm::forward` has none).
///
/// `x` is `(..., d)` and `weight` is `(d)`. Fused kernel on the CPU for f32,
/// [`rms_norm_reference`] elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        return Err(Error::InvalidArgument(format!(
            "rms_norm weight is {:?}, expected [{d}]",
            weight.dims()
        )));
    }
    if fused(&[x, weight]) {
        let x = x.contiguous()?;
        return Ok(x.apply_op2(weight, kernels::RmsNorm { eps: eps as f32 })?);
    }
    rms_norm_reference(x, weight, eps)
}

/// [`rms_norm`] from primitive ops only (the reference and the non-CPU path).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// Rotary position embedding in the Hugging Face "half-split" layout:
/// dimension `i` of a head is rotated with dimension `i + head_dim/2`.
///
/// cos/sin tables are computed once for `max_positions` positions. The
/// rotation itself is `x * cos + cat(x2, x1) * cat(-sin, sin)`, which is
/// HF's `x * cos + rotate_half(x) * sin` with the negation folded into the
/// table, built from `narrow`, `cat` and `mul` so it backpropagates
/// (candle-nn's `rotary_emb::rope` does not).
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin_signed: Tensor,
    head_dim: usize,
    /// `(max_positions, head_dim / 2)` tables for the fused CPU kernel.
    half_cos: Arc<Vec<f32>>,
    half_sin: Arc<Vec<f32>>,
}

impl Rotary {
    /// Tables for heads of `head_dim` (even) dimensions, positions
    /// `0..max_positions`, base frequency `theta`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        device: &Device,
    ) -> Result<Rotary> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "rotary head_dim must be even and positive, got {head_dim}"
            )));
        }
        if max_positions == 0 || !theta.is_finite() || theta <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "rotary needs max_positions > 0 and theta > 0, got {max_positions} and {theta}"
            )));
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        let mut half_cos = Vec::with_capacity(max_positions * half);
        let mut half_sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let mut c = Vec::with_capacity(half);
            let mut s = Vec::with_capacity(half);
            for i in 0..half {
                // Same formula and precision as HF: inv_freq in f32, angle in f32.
                let inv_freq = 1.0f32 / (theta.powf((2 * i) as f64 / head_dim as f64) as f32);
                let angle = pos as f32 * inv_freq;
                c.push(angle.cos());
                s.push(angle.sin());
            }
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            sin.extend(s.iter().map(|v| -v));
            sin.extend_from_slice(&s);
            half_cos.extend_from_slice(&c);
            half_sin.extend_from_slice(&s);
        }
        Ok(Rotary {
            cos: Tensor::from_vec(cos, (max_positions, head_dim), device)?,
            sin_signed: Tensor::from_vec(sin, (max_positions, head_dim), device)?,
            head_dim,
            half_cos: Arc::new(half_cos),
            half_sin: Arc::new(half_sin),
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    fn check(&self, seq: usize, hd: usize, offset: usize) -> Result<()> {
        if hd != self.head_dim {
            return Err(Error::InvalidArgument(format!(
                "rotary built for head_dim {}, got {hd}",
                self.head_dim
            )));
        }
        if offset + seq > self.max_positions() {
            return Err(Error::InvalidArgument(format!(
                "sequence reaches position {} but the model has {} positions",
                offset + seq,
                self.max_positions()
            )));
        }
        Ok(())
    }

    /// Takes `x` laid out as a projection's output, `(batch, seq, heads,
    /// head_dim)`, and returns it rotated and transposed to `(batch, heads,
    /// seq, head_dim)`, positions `offset..offset + seq`. On the CPU the
    /// rotation and the transpose are one fused kernel (its backward rotates
    /// back); elsewhere it is `apply(x.transpose(1, 2))`.
    pub fn apply_bthd(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, seq, heads, hd) = x.dims4()?;
        self.check(seq, hd, offset)?;
        if fused(&[x]) {
            let x = x.contiguous()?;
            let op = kernels::Rope {
                cos: self.half_cos.clone(),
                sin: self.half_sin.clone(),
                dims: (b, seq, heads, hd),
                offset,
                inverse: false,
            };
            return Ok(x.apply_op1(op)?);
        }
        self.apply(&x.transpose(1, 2)?.contiguous()?, offset)
    }

    /// Rotates `x` of shape `(batch, heads, seq, head_dim)` for positions
    /// `offset..offset + seq` (primitive ops on any device).
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, seq, hd) = x.dims4()?;
        self.check(seq, hd, offset)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin_signed.narrow(0, offset, seq)?;
        let half = hd / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let swapped = Tensor::cat(&[&x2, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + swapped.broadcast_mul(&sin)?)?)
    }
}

/// The additive causal mask `(seq, seq)`: 0 where key `j <= i`, else
/// [`MASK_VALUE`].
pub fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    causal_mask_offset(seq, seq, device)
}

/// Scaled dot-product attention with an additive mask, normalised with
/// [`candle_nn::ops::softmax`] (which has a backward pass, unlike
/// `softmax_last_dim` and `sdpa`).
///
/// * `q`: `(batch, heads, seq, head_dim)`;
/// * `k`, `v`: `(batch, kv_heads, kv_seq, head_dim)` with `heads` a multiple
///   of `kv_heads` (grouped-query attention: query head `h` uses key/value
///   head `h / (heads / kv_heads)`, as HF's `repeat_kv`);
/// * `mask`: `(seq, kv_seq)`, added to the scores before the softmax.
///
/// Returns `(batch, heads, seq, head_dim)`. Grouped heads are handled by
/// folding the group into the query length, so keys and values are never
/// copied per query head.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (bk, hk, s, hdk) = k.dims4()?;
    if bk != b || hdk != hd || hk == 0 || h % hk != 0 || v.dims4()? != (b, hk, s, hd) {
        return Err(Error::InvalidArgument(format!(
            "attention shapes q {:?}, k {:?}, v {:?} do not agree",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if mask.dims() != [t, s] {
        return Err(Error::InvalidArgument(format!(
            "attention mask is {:?}, expected [{t}, {s}]",
            mask.dims()
        )));
    }
    let group = h / hk;
    let scale = 1.0 / (hd as f64).sqrt();
    // (b, hk, group * t, hd): query rows of one key/value head stacked.
    let q = (q.contiguous()?.reshape((b, hk, group * t, hd))? * scale)?;
    let mask = if group == 1 {
        mask.clone()
    } else {
        Tensor::cat(&vec![mask; group], 0)?
    };
    let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let out = probs.matmul(v)?;
    Ok(out.reshape((b, h, t, hd))?)
}

/// 2-D convolution of `x` `(n, c_in, h, w)` with `weight`
/// `(c_out, c_in, k_h, k_w)`, zero `padding` and `stride`, plus an optional
/// `bias` `(c_out)`. Returns `(n, c_out, h_out, w_out)`.
///
/// On the CPU (f32): one graph node (`kernels::Conv2d`) that, image by
/// image and images in parallel, builds the image's im2col in a buffer of
/// its thread and writes `W (c_out, c_in k_h k_w) x cols (c_in k_h k_w,
/// h_out w_out)` straight into the output. Its backward is the same per
/// image (`W^T g`, then col2im) and computes only the gradients the graph
/// needs: none for a frozen kernel (noise steps), none for untracked
/// images (training). It replaced im2col + one batch-wide product +
/// reshape + transpose + copy, five nodes each costing candle's backward
/// a zero tensor and an addition, one of them the size of the whole
/// batch's column matrix (with the fused ReLU, on the 2-core dev machine:
/// lesions CNN noise steps 418 -> 990-1120 image-steps/s, ResNet-18 13 ->
/// 29-31, peak memory of the protection eval 0.37 GB, 1.25 GB in an
/// earlier run;
/// `evals/results/protect-bench.json`). On the CPU for other types,
/// candle's `conv2d`. On a GPU, candle's forward with a
/// backward made of convolutions (module `conv_grad`), or what
/// `LETHE_GPU_CONV` selects (`candle`, `im2col`).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (co, ci, kh, kw) = weight.dims4()?;
    if ci != c || stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        return Err(Error::InvalidArgument(format!(
            "conv2d of {:?} with kernel {:?}, stride {stride}, padding {padding}",
            x.dims(),
            weight.dims()
        )));
    }
    check_conv_bias(bias, co)?;
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (w + 2 * padding - kw) / stride + 1;
    let path = if fused(&[x, weight]) {
        None
    } else if x.device().is_cpu() && !gpu_path_forced() {
        Some(GpuConv::Candle)
    } else {
        Some(gpu_conv())
    };
    // One node for the whole convolution (ours on the CPU, candle's forward
    // with its backward or ours elsewhere): no column matrix here.
    let direct = match path {
        None => {
            let geometry = kernels::ConvGeometry {
                dims: (n, c, h, w),
                kernel: (kh, kw),
                stride,
                padding,
            };
            let op = kernels::Conv2d(geometry);
            Some(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
        }
        Some(GpuConv::Candle) => Some(x.conv2d(weight, padding, stride, 1, 1)?),
        Some(GpuConv::Gemm) => Some(conv_grad::conv2d_gemm_backward(x, weight, stride, padding)?),
        Some(GpuConv::Im2col) => None,
    };
    if let Some(y) = direct {
        return match bias {
            None => Ok(y),
            Some(b) => channel_bias(&y, b),
        };
    }
    let cols = im2col_ops(x, (kh, kw), stride, padding, (oh, ow))?;
    let y = weight.reshape((co, c * kh * kw))?.matmul(&cols)?;
    let y = match bias {
        None => y,
        Some(b) => y.broadcast_add(&b.reshape((co, 1))?)?,
    };
    Ok(y.reshape((co, n, oh, ow))?.transpose(0, 1)?.contiguous()?)
}

/// `x (m, k)` times the transpose of `w (n, k)`: a linear layer's
/// product, differentiable. On the CPU its sums do not depend on the
/// host's cache sizes (module `depth`): a deep product is summed in fixed
/// depth blocks, and more than 512 rows are cut into blocks of rows, so
/// that the weight gradient's sum over rows is fixed too. Elsewhere,
/// candle's `matmul`.
pub fn linear_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if k != kw {
        return Err(Error::InvalidArgument(format!(
            "linear product of {:?} with weights {:?}",
            x.dims(),
            w.dims()
        )));
    }
    if !x.device().is_cpu() {
        return Ok(x.matmul(&w.t()?)?);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    if m > depth::DEPTH_BLOCK {
        let parts = depth::blocks(m)
            .map(|rows| linear_product(&x.narrow(0, rows.start, rows.len())?, &w))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&parts, 0)?);
    }
    // candle's call: `x` row-major, `w^T` with unit stride along the depth.
    let strides = depth::Strides {
        lhs: (k as isize, 1),
        rhs: (1, k as isize),
        dst: (n as isize, 1),
    };
    let mut blocks = depth::depth_blocks(m, n, k, strides).map(|b| {
        x.narrow(1, b.start, b.len())?
            .matmul(&w.narrow(1, b.start, b.len())?.t()?)
    });
    // One block at least; the rest added one after another, as gemm does.
    let first = blocks.next().unwrap_or_else(|| x.matmul(&w.t()?))?;
    Ok(blocks.try_fold(first, |sum, part| sum + part?)?)
}

/// How [`conv2d`] runs on a GPU, chosen once by `LETHE_GPU_CONV`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GpuConv {
    /// Default: candle's forward (im2col + cuBLAS) with a backward made of
    /// two more `conv2d`s ([`conv_grad`]), instead of candle's naive
    /// `conv_transpose2d` kernel for the input gradient. Measured on an
    /// H100 (TF32): 2403 image-steps/s against `Candle`'s 1463 in the same
    /// call; strict fp32: 2066; built with the `cudnn` feature (candle's
    /// `conv2d`, so both directions here, on cuDNN): 3769. With cuDNN's
    /// algorithm asked once per shape, batch norm folded in evaluation and
    /// lethe's CUDA ReLU and bias kernels, on an H200: 10 970 over a full
    /// 50k-image round, PyTorch 38 222 in the same call (run 10); with the
    /// noise steps' input gradients chained by hand (module `frozen`),
    /// 16 405 against PyTorch's 38 101 (run 11); with lethe-protect's
    /// noise update parallel on the host and a closed-form loss gradient,
    /// 19 067 against 38 124 (run 13).
    Gemm,
    /// `LETHE_GPU_CONV=candle`: candle's `conv2d` and its own backward.
    /// Measured on an H100 (an EM round with a ResNet-18 surrogate, batch
    /// 512): 1406 image-steps/s; PyTorch's round on the same card, in
    /// another call: about 32 800 (`evals/results/protect-bench-gpu.json`).
    Candle,
    /// `LETHE_GPU_CONV=im2col`: im2col from primitive ops ([`im2col_ops`]),
    /// measured at 893 image-steps/s in the same call as `Candle`'s 1406:
    /// its copies cost more than the transposed-convolution kernel saves.
    Im2col,
}

/// Tests run the GPU path of [`conv2d`] on the CPU with
/// `tests::with_gpu_path`.
fn gpu_path_forced() -> bool {
    #[cfg(test)]
    {
        tests::GPU_PATH.with(|f| f.get())
    }
    #[cfg(not(test))]
    {
        false
    }
}

fn gpu_conv() -> GpuConv {
    static CHOICE: std::sync::OnceLock<GpuConv> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("LETHE_GPU_CONV").as_deref() {
        Ok("candle") => GpuConv::Candle,
        Ok("im2col") => GpuConv::Im2col,
        Ok("gemm") | Err(_) => GpuConv::Gemm,
        Ok(other) => {
            tracing::warn!(
                value = other,
                "LETHE_GPU_CONV is not one of gemm, candle, im2col: using gemm"
            );
            GpuConv::Gemm
        }
    })
}

/// im2col of `x` `(n, c, h, w)` from primitive, differentiable ops (zero
/// padding, narrow, reshape, stack), laid out as the CPU kernel lays it
/// out: rows `(c, k_h, k_w)`, columns `(n, h_out, w_out)`. Its backward is
/// the ops' own (narrow -> pad, stack -> narrow): copies and sums that run
/// on any device, where a direct transposed-convolution kernel would not.
pub(crate) fn im2col_ops(
    x: &Tensor,
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
    (oh, ow): (usize, usize),
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    // Pad so that every shifted window of `stride * out` rows (columns)
    // fits: the taps of a strided convolution are taken as a window of
    // `stride * out` rows, reshaped to `(out, stride)`, keeping index 0.
    let extra_h = (kh - 1 + stride * oh).saturating_sub(h + 2 * padding);
    let extra_w = (kw - 1 + stride * ow).saturating_sub(w + 2 * padding);
    let xp = x
        .pad_with_zeros(2, padding, padding + extra_h)?
        .pad_with_zeros(3, padding, padding + extra_w)?;
    // Every `stride`-th of `stride * out` entries along `dim`.
    let every = |t: Tensor, dim: usize, out: usize| -> Result<Tensor> {
        if stride == 1 {
            return Ok(t);
        }
        let mut dims = t.dims().to_vec();
        dims.splice(dim..=dim, [out, stride]);
        Ok(t.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?)
    };
    let mut taps = Vec::with_capacity(kh * kw);
    for dy in 0..kh {
        let rows = every(xp.narrow(2, dy, stride * oh)?, 2, oh)?;
        for dx in 0..kw {
            taps.push(every(rows.narrow(3, dx, stride * ow)?, 3, ow)?);
        }
    }
    let cols = Tensor::stack(&taps, 2)?; // (n, c, kh kw, oh, ow)
    Ok(cols
        .permute((1, 2, 0, 3, 4))?
        .reshape((c * kh * kw, n * oh * ow))?)
}

/// Batch normalisation of `x` `(n, c, h, w)` per channel, with `weight` and
/// `bias` `(c)`.
///
/// With `stats = None` (training) it normalises with the batch mean and
/// biased variance over `(n, h, w)`; with `Some((mean, var))` (evaluation)
/// it uses those `(c)` running statistics. Gradients flow to `x`, `weight`
/// and `bias` in both cases. Fused kernel on the CPU, primitive ops
/// elsewhere ([`batch_norm2d_reference`]).
pub fn batch_norm2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        return Err(Error::InvalidArgument(format!(
            "batch norm of {} channels with weight {:?} and bias {:?}",
            c,
            weight.dims(),
            bias.dims()
        )));
    }
    if let Some((m, v)) = stats {
        if m.dims() != [c] || v.dims() != [c] {
            return Err(Error::InvalidArgument(
                "batch norm statistics must be (channels)".into(),
            ));
        }
    }
    if !fused(&[x, weight, bias]) {
        return batch_norm2d_reference(x, weight, bias, stats, eps);
    }
    let fixed = match stats {
        None => None,
        Some((m, v)) => Some(Arc::new((m.to_vec1::<f32>()?, v.to_vec1::<f32>()?))),
    };
    let op = kernels::BatchNorm {
        eps: eps as f32,
        stats: fixed,
    };
    Ok(x.contiguous()?.apply_op3(weight, bias, op)?)
}

/// [`batch_norm2d`] from primitive ops.
pub fn batch_norm2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let shape = (1, c, 1, 1);
    let (mean, var) = match stats {
        None => {
            let mean = x.mean_keepdim((0, 2, 3))?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
            (mean, var)
        }
        Some((m, v)) => (m.reshape(shape)?, v.reshape(shape)?),
    };
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_sub(&mean)?
        .broadcast_mul(&inv)?
        .broadcast_mul(&weight.reshape(shape)?)?
        .broadcast_add(&bias.reshape(shape)?)?)
}

/// `x + b` per channel: `x` `(n, c, ...)`, `b` `(c)`.
///
/// On CUDA (f32) one kernel forward, none backward for `x` (its gradient is
/// the output's) and a sum for a tracked `b` (module `cuda_kernels`);
/// elsewhere candle's broadcast addition.
pub fn channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || b.dims() != [dims[1]] {
        return Err(Error::InvalidArgument(format!(
            "channel bias {:?} for an input {:?}",
            b.dims(),
            dims
        )));
    }
    if on_gpu_kernels(&[x, b]) {
        return Ok(x
            .contiguous()?
            .apply_op2(&b.contiguous()?, kernels::ChannelBias)?);
    }
    let mut shape = vec![1; dims.len()];
    shape[1] = dims[1];
    Ok(x.broadcast_add(&b.reshape(shape)?)?)
}

/// Whether `ts` run lethe's CUDA element-wise kernels (module
/// `cuda_kernels`): built with `cuda`, all f32 on a CUDA device, and
/// `LETHE_GPU_KERNELS` is not `off` (read once; `off` keeps candle's ops,
/// for comparisons).
fn on_gpu_kernels(ts: &[&Tensor]) -> bool {
    if !cfg!(feature = "cuda") {
        return false;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("LETHE_GPU_KERNELS", "on", "off"))
        && ts
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
}

/// [`conv2d`] followed by [`batch_norm2d`] with fixed `(mean, var)`
/// statistics (evaluation), with the same values and gradients up to
/// rounding.
///
/// On the CPU (f32) it is exactly those two calls: the batch norm is one
/// fused kernel there. Elsewhere the normalisation is folded into the
/// convolution, `conv(x, W * s) + (beta - mean * s [+ b * s])` with
/// `s = gamma / sqrt(var + eps)`, computed on `(c_out)`-sized tensors: one
/// activation-sized node (the bias) instead of four (subtract, two
/// multiplies, add), whose backward in candle costs about twenty
/// activation-sized kernels (every edge gets a zero tensor and an
/// addition, and a product computes both factors' gradients even for a
/// frozen factor). Gradients still reach `gamma`, `beta` and the kernel
/// through `s`. On an H200 (ResNet-18 noise steps, 4096 images, one
/// call): 4297 -> 6240 image-steps/s (`evals/results/protect-bench-gpu.json`
/// run 9). `LETHE_GPU_BN=ops` keeps the unfolded form (for comparisons).
pub fn conv2d_batch_norm_eval(
    x: &Tensor,
    (conv_weight, conv_bias): (&Tensor, Option<&Tensor>),
    stride: usize,
    padding: usize,
    (bn_weight, bn_bias): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    eps: f64,
) -> Result<Tensor> {
    check_batch_norm_after(conv_weight, (bn_weight, bn_bias), (mean, var))?;
    if fused(&[x, conv_weight]) || !bn_fold_enabled() {
        let y = conv2d(x, conv_weight, conv_bias, stride, padding)?;
        return batch_norm2d(&y, bn_weight, bn_bias, Some((mean, var)), eps);
    }
    let (folded, shift) = fold_batch_norm(
        (conv_weight, conv_bias),
        (bn_weight, bn_bias),
        (mean, var),
        eps,
    )?;
    conv2d(x, &folded, Some(&shift), stride, padding)
}

/// Checks that a convolution's bias, if any, is `(co)`.
fn check_conv_bias(bias: Option<&Tensor>, co: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [co] => Err(Error::InvalidArgument(format!(
            "conv2d bias {:?}, expected [{co}]",
            b.dims()
        ))),
        _ => Ok(()),
    }
}

/// Checks that batch norm's four `(c)` tensors fit the output channels of
/// `conv_weight`, and returns that count.
fn check_batch_norm_after(
    conv_weight: &Tensor,
    (bn_weight, bn_bias): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
) -> Result<usize> {
    let (co, _, _, _) = conv_weight.dims4()?;
    for (what, t) in [
        ("weight", bn_weight),
        ("bias", bn_bias),
        ("mean", mean),
        ("variance", var),
    ] {
        if t.dims() != [co] {
            return Err(Error::InvalidArgument(format!(
                "batch norm {what} {:?} after a convolution with {co} output channels",
                t.dims()
            )));
        }
    }
    Ok(co)
}

/// The kernel `W * s` and bias `beta - mean * s [+ b * s]` of a convolution
/// with batch norm folded in (`s = gamma / sqrt(var + eps)`), checked for
/// shape; see [`conv2d_batch_norm_eval`].
pub(crate) fn fold_batch_norm(
    (conv_weight, conv_bias): (&Tensor, Option<&Tensor>),
    (bn_weight, bn_bias): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let co = check_batch_norm_after(conv_weight, (bn_weight, bn_bias), (mean, var))?;
    check_conv_bias(conv_bias, co)?;
    let scale = (bn_weight * (var + eps)?.sqrt()?.recip()?)?;
    let mut shift = (bn_bias - (mean * &scale)?)?;
    if let Some(b) = conv_bias {
        shift = (shift + (b * &scale)?)?;
    }
    let folded = conv_weight.broadcast_mul(&scale.reshape((co, 1, 1, 1))?)?;
    Ok((folded, shift))
}

/// Whether [`conv2d_batch_norm_eval`] folds off the CPU: yes unless
/// `LETHE_GPU_BN=ops`, read once. Tests fold whenever the fused kernels
/// are off.
fn bn_fold_enabled() -> bool {
    static FOLD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOLD.get_or_init(|| env_switch("LETHE_GPU_BN", "fold", "ops"))
}

/// An on/off comparison switch read from the environment variable `var`:
/// unset or `on` means on, `off` means off, anything else is warned about
/// and means on. Callers read it once.
pub(crate) fn env_switch(var: &str, on: &str, off: &str) -> bool {
    match std::env::var(var) {
        Err(_) => true,
        Ok(v) if v == on => true,
        Ok(v) if v == off => false,
        Ok(other) => {
            tracing::warn!(value = other, "{var} is not one of {on}, {off}: {on}");
            true
        }
    }
}

/// Per-channel mean and biased variance of `x` `(n, c, h, w)` over
/// `(n, h, w)`, as two `(c)` tensors without gradient.
pub fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, c, _, _) = x.dims4()?;
    if fused(&[x]) {
        let packed = x
            .detach()
            .contiguous()?
            .apply_op1_no_bwd(&kernels::ChannelStats)?;
        return Ok((packed.narrow(0, 0, c)?, packed.narrow(0, c, c)?));
    }
    let x = x.detach();
    let mean = x.mean_keepdim((0, 2, 3))?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
    Ok((mean.reshape(c)?, var.reshape(c)?))
}

/// `max(x, 0)`, with candle's gradient convention (`x >= 0` passes the
/// gradient, so a zero input does too).
///
/// On the CPU (f32) one fused kernel whose backward is one pass, and the
/// same on CUDA (f32, module `cuda_kernels`); candle's `relu` backward
/// builds a zero tensor, a comparison, a cast and a product before its
/// accumulation, five passes over the activation.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) || on_gpu_kernels(&[x]) {
        return Ok(x.contiguous()?.apply_op1(kernels::Relu)?);
    }
    Ok(x.relu()?)
}

/// 2x2 max-pooling with stride 2 over `(n, c, h, w)` (even `h`, `w`), from
/// primitive ops.
///
/// candle's `max_pool2d` has a backward pass, but a wrong one (0.11.1): it
/// multiplies the gradient by the window's *average* of the arg-max mask,
/// so a unique maximum receives `1/k^2` of its gradient (a factor 1/16
/// after two 2x2 pools). Here the window is split into its two rows and two
/// columns and reduced with `max` and `maximum`, whose backward passes route
/// the full gradient to the maximum.
///
/// On the CPU (f32) it is one fused kernel with the same values and the
/// same gradient, ties included: an entry equal to its row's maximum gets
/// that row's gradient, and a row gets the window's gradient if it holds
/// the larger maximum, half of it if the two rows tie (four equal entries,
/// as in a flat background, share twice the window's gradient). The
/// primitive-op form is seven graph nodes over the largest activations of
/// a CNN, each with a zero tensor and an addition in candle's backward
/// pass (lesions CNN noise steps: 346-354 -> 423 image-steps/s, 2 cores).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "2x2 max-pooling needs even height and width, got {h}x{w}"
        )));
    }
    if fused(&[x]) {
        return Ok(x.contiguous()?.apply_op1(kernels::MaxPool2x2)?);
    }
    let cols = x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?;
    let top = cols.narrow(3, 0, 1)?;
    let bottom = cols.narrow(3, 1, 1)?;
    Ok(top.maximum(&bottom)?.reshape((n, c, h / 2, w / 2))?)
}

/// Causal attention without an explicit mask: key `j` is visible to query
/// `i` iff `j <= i + (kv_seq - seq)` (so a query block at the end of a longer
/// key sequence sees the whole prefix). Same shapes as [`attention`].
///
/// On the CPU the scale, the causal mask and the softmax are one fused
/// kernel with its own backward; elsewhere it is [`attention`] with an
/// additive mask.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (bk, hk, s, hdk) = k.dims4()?;
    if bk != b || hdk != hd || hk == 0 || h % hk != 0 || s < t || v.dims4()? != (b, hk, s, hd) {
        return Err(Error::InvalidArgument(format!(
            "attention shapes q {:?}, k {:?}, v {:?} do not agree",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if !fused(&[q, k, v]) {
        let mask = causal_mask_offset(t, s, q.device())?;
        return attention(q, k, v, &mask);
    }
    let group = h / hk;
    let q = q.contiguous()?.reshape((b, hk, group * t, hd))?;
    let scores = q.matmul(&k.t()?)?;
    let op = kernels::CausalSoftmax {
        t,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let probs = scores.apply_op1(op)?;
    Ok(probs.matmul(v)?.reshape((b, h, t, hd))?)
}

/// The additive mask `(seq, kv_seq)` letting query `i` see keys
/// `j <= i + kv_seq - seq`.
fn causal_mask_offset(seq: usize, kv_seq: usize, device: &Device) -> Result<Tensor> {
    let off = kv_seq - seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..kv_seq).map(move |j| if j <= i + off { 0.0 } else { MASK_VALUE }))
        .collect();
    Ok(Tensor::from_vec(data, (seq, kv_seq), device)?)
}

/// The SwiGLU gate, `silu(gate) * up` (the three projections around it are
/// the caller's, so that they can carry LoRA adapters).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::InvalidArgument(format!(
            "swiglu gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )));
    }
    if fused(&[gate, up]) {
        return Ok(gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, kernels::Swiglu)?);
    }
    Ok((gate.silu()? * up)?)
}

/// `log(sum(exp(x)))` over the last dimension, keeping it (`(..., 1)`).
pub fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    // The max only keeps exp() in range; its exact gradient is zero.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    Ok((sum.log()? + max)?)
}

/// Log-probability of each target under `logits`: `logits` is `(n, vocab)`,
/// `targets` is `(n)` of `u32`; returns `(n)` f32.
///
/// Targets must be valid ids (`< vocab`); use [`cross_entropy`] with an
/// ignore index for padded positions.
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    check_targets(targets, n, vocab)?;
    if fused(&[logits]) {
        let nll = logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, kernels::Nll)?;
        return Ok(nll.neg()?);
    }
    let picked = logits.gather(&targets.reshape((n, 1))?, 1)?;
    Ok((picked - log_sum_exp(logits)?)?.reshape(n)?)
}

/// Mean cross-entropy over the rows of `logits` (`(n, vocab)`) whose target
/// (`(n)`, `u32`) is not `ignore_index`.
///
/// Returns a scalar. When every row is ignored the loss is 0 (still attached
/// to the graph, so a backward pass gives zero gradients, never NaN).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(Error::InvalidArgument(format!(
            "targets are {:?}, expected [{n}]",
            targets.dims()
        )));
    }
    let targets = targets.to_dtype(DType::U32)?;
    let weights = match ignore_index {
        None => Tensor::ones(n, DType::F32, logits.device())?,
        Some(ignore) => targets.ne(ignore)?.to_dtype(DType::F32)?,
    };
    let safe_targets = match ignore_index {
        None => targets,
        Some(ignore) => {
            let keep = targets.ne(ignore)?;
            keep.where_cond(&targets, &targets.zeros_like()?)?
        }
    };
    weighted_nll(logits, &safe_targets, &weights)
}

/// Cross-entropy weighted per row: `sum(w_i * nll_i) / max(sum(w_i), 1)`.
///
/// `weights` is `(n)` float (a 0/1 loss mask, or soft weights).
pub fn weighted_nll(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if weights.dims() != [n] {
        return Err(Error::InvalidArgument(format!(
            "loss weights are {:?}, expected [{n}]",
            weights.dims()
        )));
    }
    let weights = weights.to_dtype(logits.dtype())?;
    let lp = token_log_probs(logits, targets)?;
    let total = weights.sum_all()?.to_scalar::<f32>()?;
    let denom = f64::from(total.max(1.0));
    Ok(((lp * weights)?.sum_all()?.neg()? / denom)?)
}

/// The next-token loss of a causal language model.
///
/// `logits` is `(batch, seq, vocab)` for input `ids` `(batch, seq)`; position
/// `t` predicts `ids[t + 1]`. `loss_mask`, if given, is `(batch, seq)` float
/// and weights the *predicted* token (`mask[b, t + 1]` weights the prediction
/// of `ids[b, t + 1]`): 0 for padding and for prompt tokens that should not
/// be trained on. Returns the weighted mean NLL (a scalar).
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor, loss_mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    if ids.dims() != [b, t] {
        return Err(Error::InvalidArgument(format!(
            "ids are {:?}, logits {:?}",
            ids.dims(),
            logits.dims()
        )));
    }
    if t < 2 {
        return Err(Error::InvalidArgument(
            "a causal LM loss needs sequences of at least 2 tokens".into(),
        ));
    }
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), vocab))?;
    let targets = ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .reshape(b * (t - 1))?;
    let weights = match loss_mask {
        None => Tensor::ones(b * (t - 1), DType::F32, logits.device())?,
        Some(m) => {
            if m.dims() != [b, t] {
                return Err(Error::InvalidArgument(format!(
                    "loss mask is {:?}, expected [{b}, {t}]",
                    m.dims()
                )));
            }
            m.narrow(1, 1, t - 1)?
                .to_dtype(DType::F32)?
                .reshape(b * (t - 1))?
        }
    };
    weighted_nll(&pred, &targets, &weights)
}

/// Per-sequence sum of next-token log-probabilities, `(batch)`: the
/// log-likelihood NPO-style unlearning losses compare between models.
/// `loss_mask` has the same meaning as in [`causal_lm_loss`].
pub fn sequence_log_probs(
    logits: &Tensor,
    ids: &Tensor,
    loss_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    if ids.dims() != [b, t] || t < 2 {
        return Err(Error::InvalidArgument(format!(
            "ids are {:?}, logits {:?}: need matching (batch, seq >= 2)",
            ids.dims(),
            logits.dims()
        )));
    }
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), vocab))?;
    let targets = ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .reshape(b * (t - 1))?;
    let lp = token_log_probs(&pred, &targets)?.reshape((b, t - 1))?;
    let lp = match loss_mask {
        None => lp,
        Some(m) => {
            if m.dims() != [b, t] {
                return Err(Error::InvalidArgument(format!(
                    "loss mask is {:?}, expected [{b}, {t}]",
                    m.dims()
                )));
            }
            (lp * m.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?)?
        }
    };
    Ok(lp.sum(1)?)
}

fn check_targets(targets: &Tensor, n: usize, vocab: usize) -> Result<()> {
    if targets.dims() != [n] {
        return Err(Error::InvalidArgument(format!(
            "targets are {:?}, expected [{n}]",
            targets.dims()
        )));
    }
    if targets.dtype() != DType::U32 {
        return Err(Error::InvalidArgument(format!(
            "targets must be u32, got {:?}",
            targets.dtype()
        )));
    }
    if n > 0 {
        let max = targets.max(0)?.to_scalar::<u32>()?;
        if max as usize >= vocab {
            return Err(Error::InvalidArgument(format!(
                "target id {max} is outside the vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}

/// Whether the fused CPU kernels apply: every tensor f32 on the CPU.
fn fused(ts: &[&Tensor]) -> bool {
    #[cfg(test)]
    if tests::REFERENCE_ONLY.with(|f| f.get()) {
        return false;
    }
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// CPU kernels for the fused ops, each a candle `CustomOp` whose backward
/// pass is another kernel (applied without a backward of its own).
mod kernels {
    use super::*;

    use rayon::prelude::*;

    type KResult<T> = candle_core::Result<T>;

    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> KResult<&'a [f32]> {
        let data = s.as_slice::<f32>()?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&data[a..b]),
            None => candle_core::bail!("lethe fused kernel: input is not contiguous"),
        }
    }

    fn slice_u32<'a>(s: &'a CpuStorage, l: &Layout) -> KResult<&'a [u32]> {
        let data = s.as_slice::<u32>()?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&data[a..b]),
            None => candle_core::bail!("lethe fused kernel: input is not contiguous"),
        }
    }

    /// Splits a packed backward output into tensors shaped like `shapes`.
    fn unpack(packed: &Tensor, shapes: &[&Shape]) -> KResult<Vec<Tensor>> {
        let mut out = Vec::with_capacity(shapes.len());
        let mut at = 0;
        for shape in shapes {
            let n = shape.elem_count();
            out.push(packed.narrow(0, at, n)?.reshape(*shape)?);
            at += n;
        }
        Ok(out)
    }

    pub(super) struct RmsNorm {
        pub(super) eps: f32,
    }

    impl CustomOp2 for RmsNorm {
        fn name(&self) -> &'static str {
            "lethe-rms-norm"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let w = slice(s2, l2)?;
            let d = w.len();
            let mut y = vec![0f32; x.len()];
            for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *yv = xv * r * wv;
                }
            }
            Ok((CpuStorage::F32(y), l1.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            g: &Tensor,
        ) -> KResult<(Option<Tensor>, Option<Tensor>)> {
            let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
            let mut parts = unpack(&packed, &[x.shape(), w.shape()])?.into_iter();
            Ok((parts.next(), parts.next()))
        }
    }

    /// `[dx, dw]` of RMSNorm: with `r = 1/sqrt(mean(x^2) + eps)`,
    /// `dx = r (g w) - r^3/d * x * sum(g w x)`, `dw = sum over rows of g x r`.
    struct RmsNormBwd {
        eps: f32,
    }

    impl CustomOp3 for RmsNormBwd {
        fn name(&self) -> &'static str {
            "lethe-rms-norm-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let w = slice(s2, l2)?;
            let g = slice(s3, l3)?;
            let d = w.len();
            let mut out = vec![0f32; x.len() + d];
            let (dx, dw) = out.split_at_mut(x.len());
            for ((xr, gr), dxr) in x
                .chunks_exact(d)
                .zip(g.chunks_exact(d))
                .zip(dx.chunks_exact_mut(d))
            {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                let mut dot = 0f32;
                for i in 0..d {
                    dot += gr[i] * w[i] * xr[i];
                    dw[i] += gr[i] * xr[i] * r;
                }
                let c = r * r * r * dot / d as f32;
                for i in 0..d {
                    dxr[i] = r * gr[i] * w[i] - c * xr[i];
                }
            }
            let n = out.len();
            Ok((CpuStorage::F32(out), Shape::from(n)))
        }
    }

    /// Scaled, causally masked softmax over the last dimension of
    /// `(..., rows, kv)`, where row `r` is query position `r % t` (grouped
    /// query heads stack `group` blocks of `t` rows) and sees keys
    /// `j <= r % t + kv - t`. Masked probabilities are exactly 0.
    pub(super) struct CausalSoftmax {
        pub(super) t: usize,
        pub(super) scale: f32,
    }

    impl CustomOp1 for CausalSoftmax {
        fn name(&self) -> &'static str {
            "lethe-causal-softmax"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s, l)?;
            let kv = l.dims()[l.dims().len() - 1];
            let rows = l.dims()[l.dims().len() - 2];
            if kv < self.t || rows % self.t != 0 {
                candle_core::bail!("causal softmax: {rows} rows, {kv} keys, {} queries", self.t)
            }
            let off = kv - self.t;
            let mut y = vec![0f32; x.len()];
            for (r, (xr, yr)) in x.chunks_exact(kv).zip(y.chunks_exact_mut(kv)).enumerate() {
                let visible = (r % rows) % self.t + off + 1;
                let (xv, yv) = (&xr[..visible], &mut yr[..visible]);
                let max = xv.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let mut sum = 0f32;
                for (o, v) in yv.iter_mut().zip(xv) {
                    *o = ((v - max) * self.scale).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                yv.iter_mut().for_each(|o| *o *= inv);
            }
            Ok((CpuStorage::F32(y), l.shape().clone()))
        }

        fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> KResult<Option<Tensor>> {
            Ok(Some(y.apply_op2_no_bwd(
                &g.contiguous()?,
                &SoftmaxBwd { scale: self.scale },
            )?))
        }
    }

    /// Where the taps of one convolution fall: input `(n, c, h, w)`,
    /// kernel `(k_h, k_w)`, stride and zero padding.
    #[derive(Clone, Copy, Debug)]
    pub(super) struct ConvGeometry {
        pub(super) dims: (usize, usize, usize, usize),
        pub(super) kernel: (usize, usize),
        pub(super) stride: usize,
        pub(super) padding: usize,
    }

    impl ConvGeometry {
        fn out_hw(&self) -> (usize, usize) {
            let (_, _, h, w) = self.dims;
            let (kh, kw) = self.kernel;
            (
                (h + 2 * self.padding - kh) / self.stride + 1,
                (w + 2 * self.padding - kw) / self.stride + 1,
            )
        }

        /// Rows of one image's column matrix: `c k_h k_w`.
        fn patch_len(&self) -> usize {
            let (_, c, _, _) = self.dims;
            c * self.kernel.0 * self.kernel.1
        }

        /// Output pixels of one image: `h_out w_out`.
        fn out_pixels(&self) -> usize {
            let (oh, ow) = self.out_hw();
            oh * ow
        }

        /// A 1x1 kernel with stride 1 and no padding: an image *is* its
        /// column matrix.
        fn is_pointwise(&self) -> bool {
            self.kernel == (1, 1) && self.stride == 1 && self.padding == 0
        }

        /// The output columns `ox` in `lo..hi` whose tap `kj` falls inside
        /// an input row of width `w` (not in the padding).
        fn valid_columns(&self, kj: usize, w: usize, ow: usize) -> (usize, usize) {
            let (s, pad) = (self.stride, self.padding);
            // ix = ox s + kj - pad must lie in 0..w.
            let lo = if pad > kj { (pad - kj).div_ceil(s) } else { 0 };
            let hi = if w + pad > kj {
                ((w + pad - kj - 1) / s + 1).min(ow)
            } else {
                0
            };
            (lo.min(hi), hi)
        }

        /// Length of the im2col buffer one thread needs (none for a
        /// pointwise kernel).
        fn buffer_len(&self) -> usize {
            if self.is_pointwise() {
                0
            } else {
                self.patch_len() * self.out_pixels()
            }
        }

        /// The column matrix of `image`: the image itself for a pointwise
        /// kernel, else its im2col written into `buffer`.
        fn columns<'a>(&self, image: &'a [f32], buffer: &'a mut [f32]) -> &'a [f32] {
            if self.is_pointwise() {
                image
            } else {
                self.im2col(image, buffer);
                buffer
            }
        }

        /// For kernel tap `(ki, kj)`, calls `f(oy, columns, ix0)` for every
        /// output row `oy`: `columns` is the range of output columns whose
        /// tap falls inside the image (empty when the tap's input row is
        /// padding), `ix0` the input index (within one image plane) of the
        /// first of them; the next ones follow every `stride` pixels.
        fn tap_rows(
            &self,
            ki: usize,
            kj: usize,
            mut f: impl FnMut(usize, std::ops::Range<usize>, usize),
        ) {
            let (_, _, h, w) = self.dims;
            let (oh, ow) = self.out_hw();
            let (lo, hi) = self.valid_columns(kj, w, ow);
            for oy in 0..oh {
                let iy = (oy * self.stride + ki) as isize - self.padding as isize;
                if iy < 0 || iy >= h as isize || lo == hi {
                    f(oy, 0..0, 0);
                    continue;
                }
                let ix0 = lo * self.stride + kj - self.padding;
                f(oy, lo..hi, iy as usize * w + ix0);
            }
        }

        /// im2col of one image `(c, h, w)` into `cols` `(c k_h k_w, h_out
        /// w_out)`: row `(ci, ki, kj)` holds the input under tap `(ki, kj)`
        /// of every output pixel, zeros in the padding.
        fn im2col(&self, image: &[f32], cols: &mut [f32]) {
            let (_, _, h, w) = self.dims;
            let (kh, kw) = self.kernel;
            let (_, ow) = self.out_hw();
            let (p, s) = (self.out_pixels(), self.stride);
            for (row, out) in cols.chunks_exact_mut(p.max(1)).enumerate() {
                let (ci, ki, kj) = (row / (kh * kw), row / kw % kh, row % kw);
                let src = &image[ci * h * w..(ci + 1) * h * w];
                self.tap_rows(ki, kj, |oy, columns, ix0| {
                    let line = &mut out[oy * ow..(oy + 1) * ow];
                    line[..columns.start].fill(0.0);
                    line[columns.end..].fill(0.0);
                    let dst = &mut line[columns.clone()];
                    if s == 1 {
                        dst.copy_from_slice(&src[ix0..ix0 + dst.len()]);
                    } else {
                        for (d, v) in dst.iter_mut().zip(src[ix0..].iter().step_by(s)) {
                            *d = *v;
                        }
                    }
                });
            }
        }

        /// The adjoint of [`Self::im2col`]: adds every column entry into the
        /// pixel of `image` it was copied from, taps in a fixed order.
        fn col2im(&self, cols: &[f32], image: &mut [f32]) {
            let (_, _, h, w) = self.dims;
            let (kh, kw) = self.kernel;
            let (_, ow) = self.out_hw();
            let (p, s) = (self.out_pixels(), self.stride);
            for (row, src) in cols.chunks_exact(p.max(1)).enumerate() {
                let (ci, ki, kj) = (row / (kh * kw), row / kw % kh, row % kw);
                let dst = &mut image[ci * h * w..(ci + 1) * h * w];
                self.tap_rows(ki, kj, |oy, columns, ix0| {
                    let from = &src[oy * ow + columns.start..oy * ow + columns.end];
                    for (d, v) in dst[ix0..].iter_mut().step_by(s).zip(from) {
                        *d += v;
                    }
                });
            }
        }
    }

    /// A dense row-major or transposed view of a matrix in a slice:
    /// element `(i, j)` at `i * row_stride + j * col_stride`.
    #[derive(Clone, Copy)]
    struct View<'a> {
        data: &'a [f32],
        row_stride: usize,
        col_stride: usize,
    }

    impl<'a> View<'a> {
        /// `rows x cols` stored row by row.
        fn rows(data: &'a [f32], cols: usize) -> Self {
            View {
                data,
                row_stride: cols,
                col_stride: 1,
            }
        }

        /// The `rows x _` transpose of a matrix stored row by row (so with
        /// `rows` columns).
        fn transposed(data: &'a [f32], rows: usize) -> Self {
            View {
                data,
                row_stride: 1,
                col_stride: rows,
            }
        }

        /// Whether a `rows x cols` matrix fits in the slice.
        fn holds(&self, rows: usize, cols: usize) -> bool {
            rows == 0
                || cols == 0
                || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
        }
    }

    /// `dst (m x n, row by row) = [dst +] lhs (m x k) rhs (k x n)` on this
    /// thread (the callers run one product per image in parallel).
    #[allow(unsafe_code)] // `gemm::gemm` takes raw pointers and strides
    fn matmul(
        dst: &mut [f32],
        accumulate: bool,
        (m, n, k): (usize, usize, usize),
        lhs: View,
        rhs: View,
    ) -> KResult<()> {
        if dst.len() < m * n || !lhs.holds(m, k) || !rhs.holds(k, n) {
            candle_core::bail!("lethe conv: a {m}x{k} by {k}x{n} product does not fit its buffers")
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accumulate {
                dst[..m * n].fill(0.0);
            }
            return Ok(());
        }
        let strides = depth::Strides {
            lhs: (lhs.row_stride as isize, lhs.col_stride as isize),
            rhs: (rhs.row_stride as isize, rhs.col_stride as isize),
            dst: (n as isize, 1),
        };
        // Depth blocks that gemm sums in one pass on any host, one after
        // another into `dst`, as gemm sums its own blocks.
        for (i, block) in depth::depth_blocks(m, n, k, strides).enumerate() {
            // SAFETY: the checks above keep every index the product touches
            // ((m-1, n-1) of `dst`, (m-1, k-1) of `lhs`, (k-1, n-1) of
            // `rhs`, all strides non-negative) inside its slice, and a block
            // is a sub-range of `0..k`, so its offset operands stay inside
            // too; `dst` is borrowed mutably, so it aliases neither input.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    block.len(),
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    accumulate || i > 0,
                    lhs.data.as_ptr().add(block.start * lhs.col_stride),
                    lhs.col_stride as isize,
                    lhs.row_stride as isize,
                    rhs.data.as_ptr().add(block.start * rhs.row_stride),
                    rhs.col_stride as isize,
                    rhs.row_stride as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        Ok(())
    }

    /// Images per partial sum of the kernel gradient, at least. The
    /// partials depend only on the shapes and are added in a fixed order,
    /// so the sum is the same, bit for bit, on any number of threads.
    const IMAGES_PER_PARTIAL: usize = 8;

    /// Floats that the partial sums of one kernel gradient may hold
    /// together (64 MiB): a wide kernel (ResNet-18's last stage, 2.4M
    /// weights) gets fewer, larger partials instead of 64 copies.
    pub(super) const PARTIALS_BUDGET: usize = 1 << 24;

    /// Images per partial sum for `n` images and a kernel of `kernel_len`
    /// weights.
    pub(super) fn images_per_partial(n: usize, kernel_len: usize) -> usize {
        let max_partials = (PARTIALS_BUDGET / kernel_len.max(1)).max(1);
        IMAGES_PER_PARTIAL.max(n.div_ceil(max_partials))
    }

    /// 2-D convolution `(x (n, c, h, w), weight (c_out, c, k_h, k_w)) ->
    /// (n, c_out, h_out, w_out)`, one image at a time: its im2col in a
    /// buffer of the thread's own, one matrix product written straight into
    /// the output. Images run in parallel. One node in candle's graph
    /// where im2col + matmul + reshape + transpose + copy were five (each
    /// a zero tensor and an addition in the backward pass, one of them the
    /// size of the column matrix).
    pub(super) struct Conv2d(pub(super) ConvGeometry);

    /// `(x, weight)` as slices, their sizes checked against the geometry;
    /// also the number of output channels.
    fn conv_operands<'a>(
        g: &ConvGeometry,
        s1: &'a CpuStorage,
        l1: &Layout,
        s2: &'a CpuStorage,
        l2: &Layout,
    ) -> KResult<(&'a [f32], &'a [f32], usize)> {
        let x = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let (n, c, h, wd) = g.dims;
        let co = match l2.dims() {
            [co, ci, kh, kw] if *ci == c && (*kh, *kw) == g.kernel => *co,
            d => candle_core::bail!("lethe conv: kernel {d:?} for geometry {g:?}"),
        };
        if x.len() != n * c * h * wd {
            candle_core::bail!("lethe conv: {} inputs for dims {:?}", x.len(), g.dims)
        }
        Ok((x, w, co))
    }

    impl CustomOp2 for Conv2d {
        fn name(&self) -> &'static str {
            "lethe-conv2d"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let g = &self.0;
            let (x, w, co) = conv_operands(g, s1, l1, s2, l2)?;
            let (n, c, h, wd) = g.dims;
            let (oh, ow) = g.out_hw();
            let (k, p) = (g.patch_len(), g.out_pixels());
            let mut y = vec![0f32; n * co * p];
            let shape = Shape::from((n, co, oh, ow));
            if y.is_empty() {
                return Ok((CpuStorage::F32(y), shape));
            }
            y.par_chunks_mut(co * p)
                .zip(x.par_chunks((c * h * wd).max(1)))
                .try_for_each_init(
                    || vec![0f32; g.buffer_len()],
                    |buffer, (out, image)| {
                        let cols = g.columns(image, buffer);
                        matmul(
                            out,
                            false,
                            (co, p, k),
                            View::rows(w, k),
                            View::rows(cols, p),
                        )
                    },
                )?;
            Ok((CpuStorage::F32(y), shape))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            g: &Tensor,
        ) -> KResult<(Option<Tensor>, Option<Tensor>)> {
            // A frozen kernel (a noise step) or an untracked input (the
            // images, in training) needs no gradient: skip its products.
            let back = Conv2dBwd {
                geometry: self.0,
                input: x.track_op(),
                kernel: w.track_op(),
            };
            if !back.input && !back.kernel {
                return Ok((None, None));
            }
            let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &back)?;
            let mut shapes = Vec::new();
            if back.input {
                shapes.push(x.shape());
            }
            if back.kernel {
                shapes.push(w.shape());
            }
            let mut parts = unpack(&packed, &shapes)?.into_iter();
            let dx = if back.input { parts.next() } else { None };
            let dw = if back.kernel { parts.next() } else { None };
            Ok((dx, dw))
        }
    }

    /// `[dx, dw]` of [`Conv2d`] from `(x, weight, g)`, each only if asked
    /// for: `dx` image by image (`W^T g` then col2im), `dw = sum g cols^T`
    /// in partial sums of [`images_per_partial`] images. Each image's
    /// im2col is built again here: a copy, cheap beside the products, where
    /// keeping the forward's would hold the batch's column matrix.
    pub(super) struct Conv2dBwd {
        pub(super) geometry: ConvGeometry,
        pub(super) input: bool,
        pub(super) kernel: bool,
    }

    impl CustomOp3 for Conv2dBwd {
        fn name(&self) -> &'static str {
            "lethe-conv2d-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let geo = &self.geometry;
            let (x, w, co) = conv_operands(geo, s1, l1, s2, l2)?;
            let g = slice(s3, l3)?;
            let (n, c, h, wd) = geo.dims;
            let (k, p) = (geo.patch_len(), geo.out_pixels());
            if g.len() != n * co * p {
                candle_core::bail!(
                    "lethe conv backward: {} gradients, {} outputs",
                    g.len(),
                    n * co * p
                )
            }
            let image_len = c * h * wd;
            let dx_len = if self.input { x.len() } else { 0 };
            let dw_len = if self.kernel { w.len() } else { 0 };
            let mut out = vec![0f32; dx_len + dw_len];
            if image_len == 0 || p == 0 {
                // No output pixel: every gradient is zero.
                let len = out.len();
                return Ok((CpuStorage::F32(out), Shape::from(len)));
            }
            let (dx, dw) = out.split_at_mut(dx_len);
            if self.input {
                let wt = View::transposed(w, k);
                dx.par_chunks_mut(image_len)
                    .zip(g.par_chunks(co * p))
                    .try_for_each_init(
                        || vec![0f32; geo.buffer_len()],
                        |gcols, (dst, gi)| {
                            if geo.is_pointwise() {
                                return matmul(dst, false, (k, p, co), wt, View::rows(gi, p));
                            }
                            matmul(gcols, false, (k, p, co), wt, View::rows(gi, p))?;
                            geo.col2im(gcols, dst);
                            Ok(())
                        },
                    )?;
            }
            if self.kernel {
                let chunk = images_per_partial(n, w.len());
                let partials = x
                    .par_chunks(image_len * chunk)
                    .zip(g.par_chunks(co * p * chunk))
                    .map_init(
                        || vec![0f32; geo.buffer_len()],
                        |buffer, (images, grads)| -> KResult<Vec<f32>> {
                            let mut acc = vec![0f32; co * k];
                            for (image, gi) in images.chunks(image_len).zip(grads.chunks(co * p)) {
                                let ct = View::transposed(geo.columns(image, buffer), p);
                                matmul(&mut acc, true, (co, k, p), View::rows(gi, p), ct)?;
                            }
                            Ok(acc)
                        },
                    )
                    .collect::<KResult<Vec<_>>>()?;
                for part in &partials {
                    for (d, v) in dw.iter_mut().zip(part) {
                        *d += v;
                    }
                }
            }
            let len = out.len();
            Ok((CpuStorage::F32(out), Shape::from(len)))
        }
    }

    /// 2x2 max-pooling with stride 2 of a contiguous NCHW tensor (even
    /// height and width, checked by the caller).
    ///
    /// The backward is the primitive-op form's (`max` over the columns of
    /// each row, then `maximum` of the two rows), ties included, so both
    /// forms train the same: an entry equal to its row's maximum gets that
    /// row's gradient, and a row gets the window's gradient if it holds the
    /// larger maximum, half of it if the two rows tie. Ties are common: a
    /// flat background (black in sparse medical images) gives four equal
    /// activations, which share twice the window's gradient.
    pub(super) struct MaxPool2x2;

    /// `(h, w)` of a 4-d layout.
    fn plane(l: &Layout) -> KResult<(usize, usize)> {
        match l.dims() {
            [_, _, h, w] if h % 2 == 0 && w % 2 == 0 => Ok((*h, *w)),
            d => candle_core::bail!("2x2 max-pool of {d:?}"),
        }
    }

    /// Indices in the plane of the window at output `(oy, ox)`: top left,
    /// top right, bottom left, bottom right.
    fn window(w: usize, oy: usize, ox: usize) -> [usize; 4] {
        let tl = 2 * oy * w + 2 * ox;
        [tl, tl + 1, tl + w, tl + w + 1]
    }

    impl CustomOp1 for MaxPool2x2 {
        fn name(&self) -> &'static str {
            "lethe-max-pool-2x2"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s, l)?;
            let (h, w) = plane(l)?;
            let (oh, ow) = (h / 2, w / 2);
            let mut y = vec![0f32; x.len() / 4];
            x.par_chunks_exact(h * w)
                .zip(y.par_chunks_exact_mut(oh * ow))
                .for_each(|(p, out)| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let [a, b, c, d] = window(w, oy, ox).map(|i| p[i]);
                            out[oy * ow + ox] = a.max(b).max(c.max(d));
                        }
                    }
                });
            let d = l.dims();
            Ok((CpuStorage::F32(y), Shape::from((d[0], d[1], oh, ow))))
        }

        fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> KResult<Option<Tensor>> {
            Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &MaxPool2x2Bwd)?))
        }
    }

    /// `dx` of [`MaxPool2x2`] from `(x, g)` (the tie rule is there).
    pub(super) struct MaxPool2x2Bwd;

    impl CustomOp2 for MaxPool2x2Bwd {
        fn name(&self) -> &'static str {
            "lethe-max-pool-2x2-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let g = slice(s2, l2)?;
            let (h, w) = plane(l1)?;
            let (oh, ow) = (h / 2, w / 2);
            if g.len() * 4 != x.len() {
                candle_core::bail!(
                    "max-pool backward: {} gradients for {} inputs",
                    g.len(),
                    x.len()
                )
            }
            let mut dx = vec![0f32; x.len()];
            x.par_chunks_exact(h * w)
                .zip(g.par_chunks_exact(oh * ow))
                .zip(dx.par_chunks_exact_mut(h * w))
                .for_each(|((p, gp), dp)| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let idx = window(w, oy, ox);
                            let [a, b, c, d] = idx.map(|i| p[i]);
                            let (top, bottom) = (a.max(b), c.max(d));
                            let g = gp[oy * ow + ox];
                            let (gt, gb) = match top.partial_cmp(&bottom) {
                                Some(std::cmp::Ordering::Greater) => (g, 0.0),
                                Some(std::cmp::Ordering::Less) => (0.0, g),
                                _ => (g / 2.0, g / 2.0),
                            };
                            for (k, (v, row_max, row_g)) in
                                [(a, top, gt), (b, top, gt), (c, bottom, gb), (d, bottom, gb)]
                                    .into_iter()
                                    .enumerate()
                            {
                                if v == row_max {
                                    dp[idx[k]] = row_g;
                                }
                            }
                        }
                    }
                });
            Ok((CpuStorage::F32(dx), l1.shape().clone()))
        }
    }

    /// Elements per parallel task of the element-wise kernels.
    const ELEMENTWISE_CHUNK: usize = 1 << 14;

    /// `max(x, 0)`; see [`super::relu`].
    pub(super) struct Relu;

    impl CustomOp1 for Relu {
        fn name(&self) -> &'static str {
            "lethe-relu"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s, l)?;
            let mut y = vec![0f32; x.len()];
            y.par_chunks_mut(ELEMENTWISE_CHUNK)
                .zip(x.par_chunks(ELEMENTWISE_CHUNK))
                .for_each(|(out, xs)| {
                    for (o, v) in out.iter_mut().zip(xs) {
                        *o = v.max(0.0);
                    }
                });
            Ok((CpuStorage::F32(y), l.shape().clone()))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> KResult<(candle_core::CudaStorage, Shape)> {
            super::cuda_kernels::relu(s, l)
        }

        fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> KResult<Option<Tensor>> {
            Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &ReluBwd)?))
        }
    }

    /// `g * (x >= 0)` from `(x, g)`: the product candle's own backward
    /// forms, so the gradient is the same bit for bit.
    pub(super) struct ReluBwd;

    impl CustomOp2 for ReluBwd {
        fn name(&self) -> &'static str {
            "lethe-relu-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let g = slice(s2, l2)?;
            if g.len() != x.len() {
                candle_core::bail!(
                    "relu backward: {} gradients for {} inputs",
                    g.len(),
                    x.len()
                )
            }
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(ELEMENTWISE_CHUNK)
                .zip(x.par_chunks(ELEMENTWISE_CHUNK))
                .zip(g.par_chunks(ELEMENTWISE_CHUNK))
                .for_each(|((out, xs), gs)| {
                    for ((o, v), gv) in out.iter_mut().zip(xs).zip(gs) {
                        *o = gv * if *v >= 0.0 { 1.0 } else { 0.0 };
                    }
                });
            Ok((CpuStorage::F32(dx), l1.shape().clone()))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &Layout,
            s2: &candle_core::CudaStorage,
            l2: &Layout,
        ) -> KResult<(candle_core::CudaStorage, Shape)> {
            super::cuda_kernels::relu_bwd(s1, l1, s2, l2)
        }
    }

    /// `x + b` for `x` `(n, c, ...)` and a per-channel `b` `(c)`; see
    /// [`super::channel_bias`]. Backward: the output gradient itself for
    /// `x` (no kernel), its sum over every axis but the channel for `b`,
    /// and nothing for a `b` that is not tracked (candle's broadcast
    /// addition accumulates an activation-sized gradient into it anyway).
    pub(super) struct ChannelBias;

    /// `(c, plane)` of [`ChannelBias`]'s operands: `x` `(n, c, ...)` with
    /// `plane` elements per channel, `b` `(c)`.
    pub(super) fn channel_bias_dims(x: &Layout, b: &Layout) -> KResult<(usize, usize)> {
        match b.shape().dims() {
            [c] => Ok((*c, channel_plane(x, *c, "channel bias")?)),
            d => candle_core::bail!("channel bias {d:?} for an input {:?}", x.dims()),
        }
    }

    /// Elements per channel of `x` `(n, c, ...)`, checking that it has `c`
    /// channels (`what` names the op in the error).
    fn channel_plane(x: &Layout, c: usize, what: &str) -> KResult<usize> {
        let dims = x.dims();
        if dims.len() < 2 || dims[1] != c {
            candle_core::bail!("{what} of {c} channels for an input {dims:?}")
        }
        Ok(dims[2..].iter().product::<usize>().max(1))
    }

    impl CustomOp2 for ChannelBias {
        fn name(&self) -> &'static str {
            "lethe-channel-bias"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let (c, plane) = channel_bias_dims(l1, l2)?;
            let x = slice(s1, l1)?;
            let b = slice(s2, l2)?;
            let mut y = x.to_vec();
            y.par_chunks_mut(plane).enumerate().for_each(|(i, out)| {
                let bias = b[i % c];
                for v in out {
                    *v += bias;
                }
            });
            Ok((CpuStorage::F32(y), l1.shape().clone()))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &Layout,
            s2: &candle_core::CudaStorage,
            l2: &Layout,
        ) -> KResult<(candle_core::CudaStorage, Shape)> {
            super::cuda_kernels::channel_bias(s1, l1, s2, l2)
        }

        fn bwd(
            &self,
            x: &Tensor,
            b: &Tensor,
            _y: &Tensor,
            g: &Tensor,
        ) -> KResult<(Option<Tensor>, Option<Tensor>)> {
            let dx = x.track_op().then(|| g.clone());
            let db = if b.track_op() {
                let axes: Vec<usize> = (0..g.rank()).filter(|&a| a != 1).collect();
                Some(g.sum(axes)?)
            } else {
                None
            };
            Ok((dx, db))
        }
    }

    /// `g * scale[c]` for `g` `(n, c, ...)`: the input gradient of batch
    /// norm with fixed statistics, `scale = w / sqrt(var + eps)` computed
    /// as [`BatchNormBwd`] computes it, so the same values bit for bit
    /// (without that op's weight and bias sums).
    pub(super) struct ChannelScale(pub(super) Arc<Vec<f32>>);

    impl ChannelScale {
        /// The factors `w / sqrt(var + eps)` in [`BatchNormBwd`]'s f32
        /// arithmetic.
        pub(super) fn of_batch_norm(w: &[f32], var: &[f32], eps: f32) -> ChannelScale {
            let r = inv_std(var, eps);
            ChannelScale(Arc::new(w.iter().zip(r).map(|(w, r)| w * r).collect()))
        }
    }

    impl CustomOp1 for ChannelScale {
        fn name(&self) -> &'static str {
            "lethe-channel-scale"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> KResult<(CpuStorage, Shape)> {
            let c = self.0.len();
            let plane = channel_plane(l, c, "channel scale")?;
            let g = slice(s, l)?;
            let mut out = vec![0f32; g.len()];
            out.par_chunks_mut(plane)
                .zip(g.par_chunks(plane))
                .enumerate()
                .for_each(|(i, (o, gs))| {
                    let k = self.0[i % c];
                    for (d, gv) in o.iter_mut().zip(gs) {
                        *d = k * gv;
                    }
                });
            Ok((CpuStorage::F32(out), l.shape().clone()))
        }
    }

    /// Per-channel mean and biased variance over `(n, h, w)` of an NCHW
    /// tensor, computed in f64: `[mean (c), var (c)]`.
    fn channel_moments(x: &[f32], dims: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (n, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
        let count = (n * hw) as f64;
        // One channel per task, its sum in a fixed order: the same on any
        // number of threads.
        (0..c)
            .into_par_iter()
            .map(|ci| {
                let mut s = 0f64;
                let mut ss = 0f64;
                for b in 0..n {
                    for v in &x[(b * c + ci) * hw..(b * c + ci + 1) * hw] {
                        s += f64::from(*v);
                        ss += f64::from(*v) * f64::from(*v);
                    }
                }
                let m = s / count;
                (m as f32, (ss / count - m * m).max(0.0) as f32)
            })
            .unzip()
    }

    /// `[mean (c), var (c)]` of an NCHW tensor.
    pub(super) struct ChannelStats;

    impl CustomOp1 for ChannelStats {
        fn name(&self) -> &'static str {
            "lethe-channel-stats"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s, l)?;
            let (mut mean, var) = channel_moments(x, l.dims());
            let c = mean.len();
            mean.extend_from_slice(&var);
            Ok((CpuStorage::F32(mean), Shape::from(2 * c)))
        }
    }

    /// Batch norm over NCHW: `(x - mean) * r * w + b`, `r = 1/sqrt(var + eps)`,
    /// with the batch's statistics (`stats = None`) or fixed ones.
    pub(super) struct BatchNorm {
        pub(super) eps: f32,
        pub(super) stats: Option<Arc<(Vec<f32>, Vec<f32>)>>,
    }

    /// `1 / sqrt(var + eps)` per channel, the one f32 formula batch
    /// norm's forward, its backward and [`ChannelScale`] share (so their
    /// values agree bit for bit).
    fn inv_std(var: &[f32], eps: f32) -> Vec<f32> {
        var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
    }

    impl BatchNorm {
        fn moments(&self, x: &[f32], dims: &[usize]) -> (Vec<f32>, Vec<f32>) {
            match &self.stats {
                Some(s) => (s.0.clone(), s.1.clone()),
                None => channel_moments(x, dims),
            }
        }
    }

    impl CustomOp3 for BatchNorm {
        fn name(&self) -> &'static str {
            "lethe-batch-norm"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let w = slice(s2, l2)?;
            let b = slice(s3, l3)?;
            let dims = l1.dims();
            let (n, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
            let (mean, var) = self.moments(x, dims);
            let mut y = vec![0f32; x.len()];
            if n * c * hw == 0 {
                return Ok((CpuStorage::F32(y), l1.shape().clone()));
            }
            let affine: Vec<(f32, f32)> = inv_std(&var, self.eps)
                .into_iter()
                .enumerate()
                .map(|(ci, r)| (r * w[ci], b[ci] - mean[ci] * r * w[ci]))
                .collect();
            // One image per task.
            y.par_chunks_mut(c * hw)
                .zip(x.par_chunks(c * hw))
                .for_each(|(out, image)| {
                    for (((scale, shift), o), v) in affine
                        .iter()
                        .zip(out.chunks_exact_mut(hw))
                        .zip(image.chunks_exact(hw))
                    {
                        for (o, v) in o.iter_mut().zip(v) {
                            *o = v * scale + shift;
                        }
                    }
                });
            Ok((CpuStorage::F32(y), l1.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            b: &Tensor,
            _y: &Tensor,
            g: &Tensor,
        ) -> KResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let back = BatchNormBwd {
                eps: self.eps,
                stats: self.stats.clone(),
            };
            let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &back)?;
            let mut parts = unpack(&packed, &[x.shape(), w.shape(), b.shape()])?.into_iter();
            Ok((parts.next(), parts.next(), parts.next()))
        }
    }

    /// `[dx, dw, db]` of batch norm. With batch statistics,
    /// `dx = w r / N * (N g - sum(g) - xhat * sum(g xhat))`; with fixed ones,
    /// `dx = w r g`. `dw = sum(g xhat)`, `db = sum(g)` per channel.
    struct BatchNormBwd {
        eps: f32,
        stats: Option<Arc<(Vec<f32>, Vec<f32>)>>,
    }

    impl CustomOp3 for BatchNormBwd {
        fn name(&self) -> &'static str {
            "lethe-batch-norm-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let w = slice(s2, l2)?;
            let g = slice(s3, l3)?;
            let dims = l1.dims();
            let (n, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
            let fwd = BatchNorm {
                eps: self.eps,
                stats: self.stats.clone(),
            };
            let (mean, var) = fwd.moments(x, dims);
            let count = (n * hw) as f32;
            let mut out = vec![0f32; x.len() + 2 * c];
            let (dx, rest) = out.split_at_mut(x.len());
            let (dw, db) = rest.split_at_mut(c);
            // Per-channel sums, one channel per task in a fixed order (the
            // same on any number of threads), then dx one image per task.
            let r = inv_std(&var, self.eps);
            let sums: Vec<(f64, f64)> = (0..c)
                .into_par_iter()
                .map(|ci| {
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for bi in 0..n {
                        let at = (bi * c + ci) * hw;
                        for (gv, xv) in g[at..at + hw].iter().zip(&x[at..at + hw]) {
                            sg += f64::from(*gv);
                            sgx += f64::from(gv * (xv - mean[ci]) * r[ci]);
                        }
                    }
                    (sg, sgx)
                })
                .collect();
            for (ci, (sg, sgx)) in sums.iter().enumerate() {
                dw[ci] = *sgx as f32;
                db[ci] = *sg as f32;
            }
            if n * c * hw > 0 {
                dx.par_chunks_mut(c * hw)
                    .zip(g.par_chunks(c * hw))
                    .zip(x.par_chunks(c * hw))
                    .for_each(|((dimg, gimg), ximg)| {
                        for ci in 0..c {
                            let at = ci * hw;
                            let (dxs, gs, xs) = (
                                &mut dimg[at..at + hw],
                                &gimg[at..at + hw],
                                &ximg[at..at + hw],
                            );
                            let k = w[ci] * r[ci];
                            if self.stats.is_some() {
                                for (d, gv) in dxs.iter_mut().zip(gs) {
                                    *d = k * gv;
                                }
                            } else {
                                let (sg, sgx) = sums[ci];
                                let (mg, mgx) = (sg as f32 / count, sgx as f32 / count);
                                for ((d, gv), xv) in dxs.iter_mut().zip(gs).zip(xs) {
                                    let xhat = (xv - mean[ci]) * r[ci];
                                    *d = k * (gv - mg - xhat * mgx);
                                }
                            }
                        }
                    });
            }
            let len = out.len();
            Ok((CpuStorage::F32(out), Shape::from(len)))
        }
    }

    /// `scale * y * (g - sum(g y))` per row.
    struct SoftmaxBwd {
        scale: f32,
    }

    impl CustomOp2 for SoftmaxBwd {
        fn name(&self) -> &'static str {
            "lethe-softmax-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let y = slice(s1, l1)?;
            let g = slice(s2, l2)?;
            let kv = l1.dims()[l1.dims().len() - 1];
            let mut dx = vec![0f32; y.len()];
            for ((yr, gr), dr) in y
                .chunks_exact(kv)
                .zip(g.chunks_exact(kv))
                .zip(dx.chunks_exact_mut(kv))
            {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((d, yv), gv) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = self.scale * yv * (gv - dot);
                }
            }
            Ok((CpuStorage::F32(dx), l1.shape().clone()))
        }
    }

    /// Half-split rotary embedding fused with the head transpose:
    /// forward `(b, t, h, hd) -> (b, h, t, hd)` rotating by `+angle`; the
    /// inverse `(b, h, t, hd) -> (b, t, h, hd)` rotating by `-angle` is its
    /// backward (a rotation's Jacobian is its transpose).
    pub(super) struct Rope {
        pub(super) cos: Arc<Vec<f32>>,
        pub(super) sin: Arc<Vec<f32>>,
        /// `(b, t, h, hd)`.
        pub(super) dims: (usize, usize, usize, usize),
        pub(super) offset: usize,
        pub(super) inverse: bool,
    }

    impl CustomOp1 for Rope {
        fn name(&self) -> &'static str {
            "lethe-rope"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s, l)?;
            let (b, t, h, hd) = self.dims;
            let half = hd / 2;
            if x.len() != b * t * h * hd {
                candle_core::bail!("rope: {} elements for dims {:?}", x.len(), self.dims)
            }
            let sign = if self.inverse { -1.0f32 } else { 1.0 };
            let mut y = vec![0f32; x.len()];
            for bi in 0..b {
                for ti in 0..t {
                    let table = (ti + self.offset) * half;
                    let cos = &self.cos[table..table + half];
                    let sin = &self.sin[table..table + half];
                    for hi in 0..h {
                        let bthd = ((bi * t + ti) * h + hi) * hd;
                        let bhtd = ((bi * h + hi) * t + ti) * hd;
                        let (src, dst) = if self.inverse {
                            (bhtd, bthd)
                        } else {
                            (bthd, bhtd)
                        };
                        let (x1, x2) = x[src..src + hd].split_at(half);
                        let (y1, y2) = y[dst..dst + hd].split_at_mut(half);
                        for i in 0..half {
                            let (c, s) = (cos[i], sign * sin[i]);
                            y1[i] = x1[i] * c - x2[i] * s;
                            y2[i] = x2[i] * c + x1[i] * s;
                        }
                    }
                }
            }
            let shape = if self.inverse {
                Shape::from((b, t, h, hd))
            } else {
                Shape::from((b, h, t, hd))
            };
            Ok((CpuStorage::F32(y), shape))
        }

        fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> KResult<Option<Tensor>> {
            let back = Rope {
                cos: self.cos.clone(),
                sin: self.sin.clone(),
                dims: self.dims,
                offset: self.offset,
                inverse: !self.inverse,
            };
            Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
        }
    }

    fn sigmoid(v: f32) -> f32 {
        1.0 / (1.0 + (-v).exp())
    }

    /// `silu(gate) * up`.
    pub(super) struct Swiglu;

    impl CustomOp2 for Swiglu {
        fn name(&self) -> &'static str {
            "lethe-swiglu"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let g = slice(s1, l1)?;
            let u = slice(s2, l2)?;
            let y: Vec<f32> = g.iter().zip(u).map(|(g, u)| g * sigmoid(*g) * u).collect();
            Ok((CpuStorage::F32(y), l1.shape().clone()))
        }

        fn bwd(
            &self,
            g: &Tensor,
            u: &Tensor,
            _y: &Tensor,
            grad: &Tensor,
        ) -> KResult<(Option<Tensor>, Option<Tensor>)> {
            let packed = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwigluBwd)?;
            let mut parts = unpack(&packed, &[g.shape(), u.shape()])?.into_iter();
            Ok((parts.next(), parts.next()))
        }
    }

    /// `[d gate, d up]` of SwiGLU.
    struct SwigluBwd;

    impl CustomOp3 for SwigluBwd {
        fn name(&self) -> &'static str {
            "lethe-swiglu-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let g = slice(s1, l1)?;
            let u = slice(s2, l2)?;
            let d = slice(s3, l3)?;
            let n = g.len();
            let mut out = vec![0f32; 2 * n];
            let (dg, du) = out.split_at_mut(n);
            for i in 0..n {
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = d[i] * silu;
            }
            Ok((CpuStorage::F32(out), Shape::from(2 * n)))
        }
    }

    /// Per-row negative log-likelihood `logsumexp(row) - row[target]` of
    /// `(n, vocab)` logits and `(n)` u32 targets.
    pub(super) struct Nll;

    impl CustomOp2 for Nll {
        fn name(&self) -> &'static str {
            "lethe-nll"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let t = slice_u32(s2, l2)?;
            let vocab = l1.dims()[1];
            let mut out = Vec::with_capacity(t.len());
            for (row, &target) in x.chunks_exact(vocab).zip(t) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                let target = target as usize;
                if target >= vocab {
                    candle_core::bail!("target {target} outside the vocabulary of {vocab}")
                }
                out.push(sum.ln() + max - row[target]);
            }
            Ok((CpuStorage::F32(out), l2.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            t: &Tensor,
            _y: &Tensor,
            g: &Tensor,
        ) -> KResult<(Option<Tensor>, Option<Tensor>)> {
            Ok((
                Some(x.apply_op3_no_bwd(t, &g.contiguous()?, &NllBwd)?),
                None,
            ))
        }
    }

    /// `g_row * (softmax(row) - onehot(target))`.
    struct NllBwd;

    impl CustomOp3 for NllBwd {
        fn name(&self) -> &'static str {
            "lethe-nll-bwd"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> KResult<(CpuStorage, Shape)> {
            let x = slice(s1, l1)?;
            let t = slice_u32(s2, l2)?;
            let g = slice(s3, l3)?;
            let vocab = l1.dims()[1];
            let mut dx = vec![0f32; x.len()];
            for (((row, &target), &gr), dr) in x
                .chunks_exact(vocab)
                .zip(t)
                .zip(g)
                .zip(dx.chunks_exact_mut(vocab))
            {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                let mut sum = 0f32;
                for (d, v) in dr.iter_mut().zip(row) {
                    *d = (v - max).exp();
                    sum += *d;
                }
                let scale = gr / sum;
                dr.iter_mut().for_each(|d| *d *= scale);
                dr[target as usize] -= gr;
            }
            Ok((CpuStorage::F32(dx), l1.shape().clone()))
        }
    }
}

mod conv_grad;
#[cfg(feature = "cuda")]
mod cuda_kernels;
mod cudnn_algo;
mod depth;
pub(crate) mod frozen;

#[cfg(test)]
pub(crate) mod tests;
