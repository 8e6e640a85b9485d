//! CUDA forms of the element-wise kernels that protection's noise steps
//! run hundreds of times per batch (feature `cuda`).
//!
//! Why: on a GPU a PGD step of a ResNet is bound by activation-sized
//! passes, not by its matrix products, and candle's own backward adds
//! passes of its own. Its `relu` backward builds a zero tensor, a
//! comparison, a cast and a product before accumulating (five passes); a
//! broadcast bias addition accumulates into both sides, the bias side an
//! activation-sized zero tensor plus an addition even when the bias is
//! frozen. Here the forward of each op is one kernel, and so is the
//! backward ([`super::kernels::Relu`], [`super::kernels::ChannelBias`]).
//! On an H200 (ResNet-18 noise steps, batch norm folded, 4096 images, one
//! call): 6240 -> 7363 image-steps/s (`evals/results/protect-bench-gpu.json`
//! run 9).
//!
//! The kernels are CUDA C compiled with NVRTC the first time one is used
//! (a few hundred milliseconds, once per process) and loaded once per
//! device by candle. f32 only; contiguous inputs (the callers make them so).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{cudarc, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape};

type KResult<T> = candle_core::Result<T>;

/// The module's name in candle's per-device cache of custom modules.
const MODULE: &str = "lethe_elementwise";

/// A grid-stride loop over at most 2^31 elements ([`length`]), so that
/// `i + blockDim.x * gridDim.x` cannot wrap around in 32 bits.
const SOURCE: &str = r#"
extern "C" __global__ void lethe_relu_f32(const unsigned int n, const float* x, float* y) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = fmaxf(x[i], 0.0f);
    }
}

// g * (x >= 0), the product candle's relu backward forms.
extern "C" __global__ void lethe_relu_bwd_f32(const unsigned int n, const float* x, const float* g, float* dx) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        dx[i] = g[i] * (x[i] >= 0.0f ? 1.0f : 0.0f);
    }
}

// x (n, c, hw) + b (c).
extern "C" __global__ void lethe_channel_bias_f32(const unsigned int n, const unsigned int c, const unsigned int hw,
                                                  const float* x, const float* b, float* y) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = x[i] + b[(i / hw) % c];
    }
}
"#;

/// The module's PTX, compiled once per process.
fn ptx() -> KResult<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling lethe's CUDA kernels: {e}")))
}

/// The contiguous f32 elements of `s` under `l`.
fn view<'a>(s: &'a CudaStorage, l: &Layout) -> KResult<cudarc::driver::CudaView<'a, f32>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("lethe CUDA kernel: input is not contiguous".into())
    })?;
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// `n` as the kernels' 32-bit length: at most 2^31 (8 GiB of f32 in one
/// tensor), else an error.
fn length(n: usize) -> KResult<u32> {
    if n > 1 << 31 {
        candle_core::bail!("lethe CUDA kernel: {n} elements, at most 2^31")
    }
    Ok(n as u32)
}

/// The length argument of a kernel over `n` elements and a new output of
/// `n` f32 (every element is written by the kernel).
#[allow(unsafe_code)] // uninitialised device memory, written whole by the kernel
fn prepare(dev: &CudaDevice, n: usize) -> KResult<(u32, cudarc::driver::CudaSlice<f32>)> {
    let count = length(n)?;
    // SAFETY: the kernels write every element of their output.
    let out = unsafe { dev.alloc::<f32>(n) }?;
    Ok((count, out))
}

/// Launches one thread per element.
#[allow(unsafe_code)] // an FFI launch with the kernel's own argument list
fn run(builder: &mut cudarc::driver::LaunchArgs<'_>, count: u32) -> KResult<()> {
    if count > 0 {
        // SAFETY: each caller pushes the arguments of its kernel's signature
        // in SOURCE, in order.
        unsafe { builder.launch(LaunchConfig::for_num_elems(count)) }.w()?;
    }
    Ok(())
}

/// `max(x, 0)`.
pub(super) fn relu(s: &CudaStorage, l: &Layout) -> KResult<(CudaStorage, Shape)> {
    let x = view(s, l)?;
    let dev = s.device();
    let func = dev.get_or_load_custom_func("lethe_relu_f32", MODULE, ptx()?)?;
    let (count, out) = prepare(dev, l.shape().elem_count())?;
    let mut b = func.builder();
    b.arg(&count);
    b.arg(&x);
    b.arg(&out);
    run(&mut b, count)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        l.shape().clone(),
    ))
}

/// `g * (x >= 0)`.
pub(super) fn relu_bwd(
    sx: &CudaStorage,
    lx: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
) -> KResult<(CudaStorage, Shape)> {
    let n = lx.shape().elem_count();
    if lg.shape().elem_count() != n {
        candle_core::bail!(
            "relu backward: {} gradients for {n} inputs",
            lg.shape().elem_count()
        )
    }
    let (x, g) = (view(sx, lx)?, view(sg, lg)?);
    let dev = sx.device();
    let func = dev.get_or_load_custom_func("lethe_relu_bwd_f32", MODULE, ptx()?)?;
    let (count, out) = prepare(dev, n)?;
    let mut b = func.builder();
    b.arg(&count);
    b.arg(&x);
    b.arg(&g);
    b.arg(&out);
    run(&mut b, count)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        lx.shape().clone(),
    ))
}

/// `x + b` with `x` `(n, c, ...)` and `b` `(c)`.
pub(super) fn channel_bias(
    sx: &CudaStorage,
    lx: &Layout,
    sb: &CudaStorage,
    lb: &Layout,
) -> KResult<(CudaStorage, Shape)> {
    let (c, hw) = super::kernels::channel_bias_dims(lx, lb)?;
    let (c, hw) = (length(c)?, length(hw)?);
    let (x, bias) = (view(sx, lx)?, view(sb, lb)?);
    let dev = sx.device();
    let func = dev.get_or_load_custom_func("lethe_channel_bias_f32", MODULE, ptx()?)?;
    let (count, out) = prepare(dev, lx.shape().elem_count())?;
    let mut b = func.builder();
    b.arg(&count);
    b.arg(&c);
    b.arg(&hw);
    b.arg(&x);
    b.arg(&bias);
    b.arg(&out);
    run(&mut b, count)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        lx.shape().clone(),
    ))
}
