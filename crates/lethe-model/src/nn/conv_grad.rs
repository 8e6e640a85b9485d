//! A 2-D convolution whose backward pass runs in matrix products on a GPU.
//!
//! Why this exists: candle's CUDA `conv2d` forward is im2col + one cuBLAS
//! product, but its backward takes the input gradient from
//! `conv_transpose2d`, a naive kernel in which every output element loops
//! over `c_out x k_h x k_w` products with scattered reads. An input
//! gradient of a ResNet-18 on 512 32x32 images is about 285 G
//! multiply-adds, and with candle's backward a whole PGD step took 0.37 s
//! on an H100 (lethe 23.5x slower than PyTorch doing the same round).
//! Measured on an H100 with this op (an EM round, ResNet-18 surrogate,
//! batch 512, TF32; `evals/results/protect-bench-gpu.json` run 4): 2403
//! image-steps/s against 1463 with candle's backward in the same call,
//! 1.64x; PyTorch in that call: 32 284 (lethe 13.4x slower, was 22-23x).
//!
//! [`conv2d_gemm_backward`] computes the same forward with candle's
//! `conv2d` and attaches a backward that is itself a `conv2d` (so im2col +
//! cuBLAS again): the input gradient is the output gradient, dilated by the
//! stride and padded, convolved with the kernel flipped and with its two
//! channel axes swapped. The kernel gradient is candle's own formula, and it
//! is computed only when the kernel is tracked (a PGD step on frozen
//! weights skips it; candle's `conv2d` computes it always).
//!
//! It is a candle `CustomOp3` over `(x, kernel, y)` where `y` is the
//! forward result computed outside without a graph; the op's forward copies
//! `y` (candle has no other way to attach a custom backward to a value
//! computed by its own kernels). The tests check values and gradients
//! against candle's `conv2d` on the CPU, where the same op runs.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::Result;

type KResult<T> = candle_core::Result<T>;

/// `conv2d` of `x` `(n, c_in, h, w)` with `kernel` `(c_out, c_in, k_h,
/// k_w)`, zero `padding` and `stride` (no dilation, one group): candle's
/// forward, with a backward built from `conv2d` instead of
/// `conv_transpose2d` (see the module docs).
pub(crate) fn conv2d_gemm_backward(
    x: &Tensor,
    kernel: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = super::cudnn_algo::conv2d(&x.detach(), &kernel.detach(), padding, stride, 1)?
        .contiguous()?;
    if !x.track_op() && !kernel.track_op() {
        return Ok(y);
    }
    Ok(x.apply_op3(kernel, &y, ConvGemmGrad { stride, padding })?)
}

/// The op: forward = a copy of the precomputed result, backward = two
/// convolutions.
struct ConvGemmGrad {
    stride: usize,
    padding: usize,
}

/// Checks that the precomputed result is the whole of its buffer (the
/// storages' clone copies whole buffers).
fn check_whole(l: &Layout) -> KResult<()> {
    if l.is_contiguous() && l.start_offset() == 0 {
        Ok(())
    } else {
        candle_core::bail!(
            "conv-gemm-grad: the precomputed result must be contiguous from offset 0"
        )
    }
}

impl CustomOp3 for ConvGemmGrad {
    fn name(&self) -> &'static str {
        "lethe-conv2d-gemm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> KResult<(CpuStorage, Shape)> {
        check_whole(l)?;
        Ok((y.clone(), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        l: &Layout,
    ) -> KResult<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        check_whole(l)?;
        Ok((y.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> KResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = if x.track_op() {
            Some(input_gradient(
                grad,
                kernel,
                None,
                x.dims4()?,
                self.stride,
                self.padding,
            )?)
        } else {
            None
        };
        let grad_k = if kernel.track_op() {
            Some(kernel_gradient(grad, x, kernel, self.stride, self.padding)?)
        } else {
            None
        };
        Ok((grad_x, grad_k, None))
    }
}

/// The input gradient of `conv2d(x, kernel, stride, padding)` as a
/// stride-1 `conv2d`: the output gradient dilated by `stride` (zeros
/// between rows and columns), with the rows and columns the forward's
/// floor division dropped added back at the end, then padded by
/// `k - 1 - padding` and convolved with the kernel flipped in both spatial
/// axes and with `c_in` and `c_out` swapped ([`transposed_kernel`], built
/// here unless the caller kept one). Falls back to candle's
/// `conv_transpose2d` where `padding > k - 1` (a padding that only the
/// transposed kernel handles without cropping).
pub(crate) fn input_gradient(
    grad: &Tensor,
    kernel: &Tensor,
    transposed: Option<&Tensor>,
    (_, _, h, w): (usize, usize, usize, usize),
    stride: usize,
    padding: usize,
) -> KResult<Tensor> {
    let grad = grad.contiguous()?;
    let kernel = kernel.detach();
    let (n, co, oh, ow) = grad.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    // Rows (columns) of the input past the last window: 0..stride-1.
    let extra_h = h + 2 * padding - ((oh - 1) * stride + kh);
    let extra_w = w + 2 * padding - ((ow - 1) * stride + kw);
    if padding > kh - 1 || padding > kw - 1 || extra_h != extra_w {
        // candle's transposed convolution takes one output padding for
        // both axes; its backward uses the rows' value as well.
        return grad.conv_transpose2d(&kernel, padding, extra_h, stride, 1);
    }
    let dilated = if stride == 1 {
        grad
    } else {
        grad.reshape((n, co, oh, 1, ow, 1))?
            .pad_with_zeros(3, 0, stride - 1)?
            .pad_with_zeros(5, 0, stride - 1)?
            .reshape((n, co, oh * stride, ow * stride))?
            .narrow(2, 0, (oh - 1) * stride + 1 + extra_h)?
            .narrow(3, 0, (ow - 1) * stride + 1 + extra_w)?
    };
    let (ph, pw) = (kh - 1 - padding, kw - 1 - padding);
    let flipped = match transposed {
        Some(t) => t.clone(),
        None => transposed_kernel(&kernel)?,
    };
    if ph == pw {
        super::cudnn_algo::conv2d(&dilated, &flipped, ph, 1, 1)
    } else {
        let padded = dilated
            .pad_with_zeros(2, ph, ph)?
            .pad_with_zeros(3, pw, pw)?;
        super::cudnn_algo::conv2d(&padded, &flipped, 0, 1, 1)
    }
}

/// The kernel of [`input_gradient`]'s convolution: `kernel` `(c_out, c_in,
/// k_h, k_w)` reversed along both spatial axes, with its two channel axes
/// swapped, contiguous.
pub(crate) fn transposed_kernel(kernel: &Tensor) -> KResult<Tensor> {
    flip_spatial(&kernel.detach())?
        .transpose(0, 1)?
        .contiguous()
}

/// `kernel` `(c_out, c_in, k_h, k_w)` reversed along both spatial axes.
fn flip_spatial(kernel: &Tensor) -> KResult<Tensor> {
    let (_, _, kh, kw) = kernel.dims4()?;
    let device = kernel.device();
    let rev = |k: usize| Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, device);
    kernel
        .index_select(&rev(kh)?, 2)?
        .index_select(&rev(kw)?, 3)
}

/// The kernel gradient, candle's own formula for `conv2d`: the input with
/// batch and channels swapped, convolved with the output gradient (batch
/// and channels swapped) as kernel, dilated by the stride, cropped to the
/// kernel's size.
fn kernel_gradient(
    grad: &Tensor,
    x: &Tensor,
    kernel: &Tensor,
    stride: usize,
    padding: usize,
) -> KResult<Tensor> {
    let (_, _, kh, kw) = kernel.dims4()?;
    let g = x
        .detach()
        .transpose(0, 1)?
        .conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    let (_, _, gh, gw) = g.dims4()?;
    if gh != kh || gw != kw {
        g.narrow(2, 0, kh)?.narrow(3, 0, kw)
    } else {
        Ok(g)
    }
}
