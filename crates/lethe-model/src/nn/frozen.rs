//! Input gradients through frozen weights in evaluation mode, chained by
//! hand instead of by candle's autograd.
//!
//! Why: a noise step of dataset protection (a PGD step on the images
//! through a frozen surrogate) needs only the gradient with respect to the
//! input. candle's backward pass gives every edge of the graph a zero
//! tensor and an addition, and the fused batch-norm backward also sums the
//! weight and bias gradients it is then told nobody wants. On the 2-core
//! dev machine a flat profile of the CPU bench put the zero tensors and
//! additions at 14 % of a noise step (memset 8.5 %, add 5.8 %); an H200
//! profile put candle's broadcast addition at 33 % of kernel time, in steps
//! bound by host time per op (`evals/results/protect-bench-gpu.json`, run
//! 9b).
//!
//! [`FrozenConv`] holds one convolution (with its batch norm, if any) and
//! computes its output and its input gradient; [`relu_input_gradient`] and
//! [`max_pool2x2_input_gradient`] are the other layers' backward passes.
//! `vision::frozen` chains them through a whole classifier. Each piece
//! calls the kernel the autograd path calls for the same step, so on the
//! CPU the gradient is the same bit for bit (the tests check it), and off
//! the CPU it is the folded form of [`super::conv2d_batch_norm_eval`] with
//! the backward of [`super::conv_grad`]. The folded kernel, its bias and
//! the transposed kernel of the input gradient are computed once per
//! [`FrozenConv`], not once per step.
//!
//! `LETHE_FROZEN_GRAD=off` (read once) sends callers back to autograd, for
//! comparisons ([`enabled`]).

use std::sync::{Arc, OnceLock};

use candle_core::{Tensor, Var};

use super::{
    batch_norm2d, channel_bias, conv2d, conv_grad, cudnn_algo, env_switch, fold_batch_norm, fused,
    kernels, max_pool2x2, on_gpu_kernels,
};
use crate::{Error, Result};

/// Whether callers use this module's hand-chained gradients: yes unless
/// `LETHE_FROZEN_GRAD=off`, read once.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| env_switch("LETHE_FROZEN_GRAD", "on", "off"))
}

/// Whether `x` runs on the fused CPU kernels (f32 on the CPU), where each
/// piece here calls autograd's own kernel.
pub(crate) fn on_cpu_kernels(x: &Tensor) -> bool {
    fused(&[x])
}

/// Batch norm with fixed (running) statistics: weight, bias, mean and
/// variance, each `(c)`, and epsilon.
#[derive(Debug, Clone)]
pub(crate) struct FixedNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
    pub eps: f64,
}

/// A convolution, optionally followed by batch norm with fixed statistics,
/// whose weights do not change while it lives.
#[derive(Debug)]
pub(crate) struct FrozenConv {
    weight: Tensor,
    bias: Option<Tensor>,
    norm: Option<FixedNorm>,
    stride: usize,
    padding: usize,
    /// The CPU path's batch-norm input-gradient factors, made on first use.
    norm_scale: OnceLock<Arc<Vec<f32>>>,
    /// The folded form used off the CPU, made on first use.
    folded: OnceLock<Folded>,
}

/// Batch norm folded into the kernel, and the kernel of the input
/// gradient's convolution.
#[derive(Debug)]
struct Folded {
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: Tensor,
}

impl FrozenConv {
    /// `weight` `(c_out, c_in, k_h, k_w)`, `bias` and every [`FixedNorm`]
    /// tensor `(c_out)`. The tensors are used as given: pass copies to be
    /// independent of later updates of the weights.
    pub(crate) fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        norm: Option<FixedNorm>,
        stride: usize,
        padding: usize,
    ) -> Result<FrozenConv> {
        let (co, _, _, _) = weight.dims4()?;
        if stride == 0 {
            return Err(Error::InvalidArgument("convolution stride 0".into()));
        }
        super::check_conv_bias(bias.as_ref(), co)?;
        if let Some(n) = &norm {
            super::check_batch_norm_after(&weight, (&n.weight, &n.bias), (&n.mean, &n.var))?;
        }
        Ok(FrozenConv {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            norm,
            stride,
            padding,
            norm_scale: OnceLock::new(),
            folded: OnceLock::new(),
        })
    }

    /// The output for `x` `(n, c_in, h, w)`, without a graph.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.detach();
        if fused(&[&x, &self.weight]) {
            let y = conv2d(
                &x,
                &self.weight,
                self.bias.as_ref(),
                self.stride,
                self.padding,
            )?;
            return match &self.norm {
                None => Ok(y),
                Some(n) => batch_norm2d(&y, &n.weight, &n.bias, Some((&n.mean, &n.var)), n.eps),
            };
        }
        let f = self.folded()?;
        let y = cudnn_algo::conv2d(&x, &f.weight, self.padding, self.stride, 1)?;
        match &f.bias {
            None => Ok(y),
            Some(b) => channel_bias(&y, b),
        }
    }

    /// The gradient with respect to `x` (the input [`FrozenConv::forward`]
    /// was given) of a loss whose gradient with respect to the output is
    /// `g`.
    pub(crate) fn input_gradient(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dims = x.dims4()?;
        if fused(&[x, &self.weight]) {
            let g = match &self.norm {
                None => g.contiguous()?,
                Some(n) => g
                    .contiguous()?
                    .apply_op1_no_bwd(&kernels::ChannelScale(self.norm_scale(n)?))?,
            };
            let (_, _, kh, kw) = self.weight.dims4()?;
            let back = kernels::Conv2dBwd {
                geometry: kernels::ConvGeometry {
                    dims,
                    kernel: (kh, kw),
                    stride: self.stride,
                    padding: self.padding,
                },
                input: true,
                kernel: false,
            };
            let dx =
                x.detach()
                    .contiguous()?
                    .apply_op3_no_bwd(&self.weight.contiguous()?, &g, &back)?;
            return Ok(dx.reshape(dims)?);
        }
        let f = self.folded()?;
        Ok(conv_grad::input_gradient(
            g,
            &f.weight,
            Some(&f.transposed),
            dims,
            self.stride,
            self.padding,
        )?)
    }

    /// `n`'s input-gradient factors (`n` is this conv's own norm).
    fn norm_scale(&self, n: &FixedNorm) -> Result<Arc<Vec<f32>>> {
        if let Some(s) = self.norm_scale.get() {
            return Ok(s.clone());
        }
        let scale = kernels::ChannelScale::of_batch_norm(
            &n.weight.to_vec1::<f32>()?,
            &n.var.to_vec1::<f32>()?,
            n.eps as f32,
        );
        Ok(self.norm_scale.get_or_init(|| scale.0).clone())
    }

    fn folded(&self) -> Result<&Folded> {
        if let Some(f) = self.folded.get() {
            return Ok(f);
        }
        let (weight, bias) = match &self.norm {
            None => (self.weight.clone(), self.bias.clone()),
            Some(n) => {
                let (w, b) = fold_batch_norm(
                    (&self.weight, self.bias.as_ref()),
                    (&n.weight, &n.bias),
                    (&n.mean, &n.var),
                    n.eps,
                )?;
                (w.contiguous()?, Some(b))
            }
        };
        let transposed = conv_grad::transposed_kernel(&weight)?;
        Ok(self.folded.get_or_init(|| Folded {
            weight,
            bias,
            transposed,
        }))
    }
}

/// The gradient with respect to `x` of a loss through `relu(x)`, given the
/// gradient `g` of its output (candle's convention: `x >= 0` passes).
pub(crate) fn relu_input_gradient(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if fused(&[x]) || on_gpu_kernels(&[x]) {
        return Ok(x
            .detach()
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &kernels::ReluBwd)?);
    }
    let pass = x.ge(&x.zeros_like()?)?.to_dtype(x.dtype())?;
    Ok(g.mul(&pass)?)
}

/// The gradient with respect to `x` of a loss through
/// [`max_pool2x2`]`(x)`, given the gradient `g` of its output (the tie rule
/// of [`max_pool2x2`]). Off the CPU, autograd over the pooling alone.
pub(crate) fn max_pool2x2_input_gradient(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        return Ok(x
            .detach()
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &kernels::MaxPool2x2Bwd)?);
    }
    let (_, dx) = local_gradient(x, |v| Ok((max_pool2x2(v)? * g.detach())?.sum_all()?))?;
    Ok(dx)
}

/// `f(x)` (a scalar) and its gradient with respect to `x`, by autograd
/// over `f` alone: for the small ends of a network (a classifier's head
/// and loss), where the graph is a few nodes over small tensors.
pub(crate) fn local_gradient(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(&x.detach())?;
    let value = f(v.as_tensor())?;
    let grads = value.backward()?;
    let dx = match grads.get(v.as_tensor()) {
        Some(g) => g.clone(),
        None => v.as_tensor().zeros_like()?,
    };
    Ok((value, dx))
}
