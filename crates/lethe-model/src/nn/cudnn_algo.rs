//! cuDNN's forward-convolution algorithm, asked once per convolution shape
//! instead of on every call (feature `cudnn`; without it, [`conv2d`] is
//! candle's).
//!
//! Why: candle's `conv2d` on a GPU asks cuDNN's heuristic
//! (`cudnnGetConvolutionForwardAlgorithm_v7`) on every call, host time
//! that public reports put at 70 us to over a millisecond per call, and a
//! noise step of a ResNet-18 makes 40 convolutions (20 forward, 20 input
//! gradients). An H200 profile of those steps (run 9b in
//! `evals/results/protect-bench-gpu.json`) found about 21 ms of kernel
//! time in a 512-image step that took about 56 ms, with the SMs busy
//! 59-71 % of the time: the host was the bound. Here the heuristic runs
//! once per (device, input shape and strides, kernel shape, padding,
//! stride, dilation) on the descriptors candle builds for the same call,
//! and later calls hand its answer to `conv2d_with_algo`: the same
//! algorithm, so the same numbers. Measured in run 10: 7078 -> 8592
//! image-steps/s on an H200 (contiguous inputs only then; strided inputs,
//! the dilated gradients of stride-2 convolutions, were added after the
//! session's GPU time was spent and are untimed).
//!
//! `LETHE_CUDNN_ALGO_CACHE=off` (read once) asks on every call as candle
//! does, for comparisons. f32 only, with a contiguous kernel (candle sends
//! other kernels to its own im2col); a strided input is described with its
//! strides, as candle describes it. Anything else, or any cuDNN error
//! while asking, falls back to candle's `conv2d`, which asks on its own.

use candle_core::Tensor;

type KResult<T> = candle_core::Result<T>;

/// `x.conv2d(kernel, padding, stride, dilation, 1)`, with cuDNN's
/// algorithm looked up once per shape on a CUDA device.
pub(crate) fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> KResult<Tensor> {
    #[cfg(feature = "cudnn")]
    if let Some(algo) = cached::algorithm(x, kernel, padding, stride, dilation)? {
        return x.conv2d_with_algo(kernel, padding, stride, dilation, 1, Some(algo));
    }
    x.conv2d(kernel, padding, stride, dilation, 1)
}

#[cfg(feature = "cudnn")]
mod cached {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::conv::CudnnFwdAlgo;
    use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvForward, Cudnn};
    use candle_core::cuda_backend::DeviceId;
    use candle_core::{CudaDevice, DType, Device, Tensor};

    use super::KResult;

    /// What determines cuDNN's answer: device, input shape, input strides
    /// (`None` when contiguous), kernel shape, padding, stride, dilation.
    type Key = (
        DeviceId,
        [usize; 4],
        Option<[usize; 4]>,
        [usize; 4],
        usize,
        usize,
        usize,
    );

    thread_local! {
        /// One cuDNN handle per device and thread (as candle keeps its own).
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    }

    /// The algorithm for this call: `None` off CUDA, for other types or a
    /// non-contiguous kernel, with the cache switched off, or where cuDNN
    /// gave no answer (candle then asks on its own).
    pub(super) fn algorithm(
        x: &Tensor,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
        dilation: usize,
    ) -> KResult<Option<CudnnFwdAlgo>> {
        let Device::Cuda(dev) = x.device() else {
            return Ok(None);
        };
        if !enabled() || x.dtype() != DType::F32 || !kernel.is_contiguous() {
            return Ok(None);
        }
        let strides = match x.stride() {
            _ if x.is_contiguous() => None,
            &[a, b, c, d] => Some([a, b, c, d]),
            _ => return Ok(None),
        };
        let (xd, kd) = (x.dims4()?, kernel.dims4()?);
        let key: Key = (
            dev.id(),
            [xd.0, xd.1, xd.2, xd.3],
            strides,
            [kd.0, kd.1, kd.2, kd.3],
            padding,
            stride,
            dilation,
        );
        static ANSWERS: OnceLock<Mutex<HashMap<Key, Option<CudnnFwdAlgo>>>> = OnceLock::new();
        let mut answers = ANSWERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Asked under the lock: once per shape, at first use.
        Ok(*answers.entry(key).or_insert_with(|| ask(dev, &key).ok()))
    }

    /// Whether the cache is on: unless `LETHE_CUDNN_ALGO_CACHE=off`.
    fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| crate::nn::env_switch("LETHE_CUDNN_ALGO_CACHE", "on", "off"))
    }

    /// cuDNN's heuristic answer for `key`, on the descriptors candle's
    /// `launch_conv2d::<f32, f32>` builds for the same call.
    fn ask(dev: &CudaDevice, key: &Key) -> Result<CudnnFwdAlgo, String> {
        let (_, x, strides, k, padding, stride, dilation) = *key;
        let cudnn = HANDLES.with(|h| -> Result<Arc<Cudnn>, String> {
            if let Some(c) = h.borrow().get(&dev.id()) {
                return Ok(c.clone());
            }
            let c = Cudnn::new(dev.cuda_stream()).map_err(|e| format!("{e:?}"))?;
            h.borrow_mut().insert(dev.id(), c.clone());
            Ok(c)
        })?;
        let int = |v: usize| i32::try_from(v).map_err(|_| format!("{v} does not fit cuDNN"));
        let (p, s, d) = (int(padding)?, int(stride)?, int(dilation)?);
        let span = |i: usize, kk: usize| (i + 2 * padding).checked_sub(dilation * (kk - 1) + 1);
        let (Some(oh), Some(ow)) = (span(x[2], k[2]), span(x[3], k[3])) else {
            return Err("kernel larger than the padded input".into());
        };
        let (oh, ow) = (oh / stride + 1, ow / stride + 1);
        let e = |e: candle_core::cuda_backend::cudarc::cudnn::CudnnError| format!("{e:?}");
        let conv = cudnn
            .create_conv2d::<f32>(
                [p, p],
                [s, s],
                [d, d],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(e)?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let dims = [int(x[0])?, int(x[1])?, int(x[2])?, int(x[3])?];
        let xdesc = match strides {
            None => cudnn.create_4d_tensor::<f32>(nchw, dims),
            Some(s) => {
                let s = [int(s[0])?, int(s[1])?, int(s[2])?, int(s[3])?];
                cudnn.create_4d_tensor_ex::<f32>(dims, s)
            }
        }
        .map_err(e)?;
        let wdesc = cudnn
            .create_4d_filter::<f32>(nchw, [int(k[0])?, int(k[1])?, int(k[2])?, int(k[3])?])
            .map_err(e)?;
        let ydesc = cudnn
            .create_4d_tensor::<f32>(nchw, [int(x[0])?, int(k[0])?, int(oh)?, int(ow)?])
            .map_err(e)?;
        let forward = ConvForward {
            conv: &conv,
            x: &xdesc,
            w: &wdesc,
            y: &ydesc,
        };
        use sys::cudnnConvolutionFwdAlgo_t as A;
        Ok(match forward.pick_algorithm().map_err(e)? {
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => CudnnFwdAlgo::ImplicitGemm,
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => {
                CudnnFwdAlgo::ImplicitPrecompGemm
            }
            A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM => CudnnFwdAlgo::Gemm,
            A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT => CudnnFwdAlgo::Direct,
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT => CudnnFwdAlgo::Fft,
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING => CudnnFwdAlgo::FftTiling,
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD => CudnnFwdAlgo::Winograd,
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => CudnnFwdAlgo::WinogradNonFused,
            other => return Err(format!("unknown cuDNN algorithm {other:?}")),
        })
    }
}
