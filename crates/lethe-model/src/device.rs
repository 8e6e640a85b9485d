//! Device selection: `cpu`, `cuda` or `cuda:N`, chosen once at run time.
//!
//! CPU is the default and what tests run on. A `cuda` device is only
//! available when the crate was built with the `cuda` feature; asking for it
//! otherwise is a clear error, never a silent fallback.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Which device a model runs on, as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (default).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<DeviceSpec> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| Error::Device(format!("bad CUDA ordinal in {other:?}"))),
                None => Err(Error::Device(format!(
                    "unknown device {other:?}: expected cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

/// Lets f32 matrix products on a GPU use TF32 tensor cores (10-bit
/// mantissa; PyTorch's default for convolutions), process-wide. Off by
/// default; no effect on the CPU or without the `cuda` feature.
pub fn set_gpu_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let err = |e: &dyn std::fmt::Display| Error::Device(format!("cuda:{ordinal}: {e}"));
    let device = Device::new_cuda(ordinal).map_err(|e| err(&e))?;
    if let Err(e) = keep_freed_memory(&device) {
        // Only a matter of speed: carry on with the driver's default.
        tracing::warn!(ordinal, error = %e, "could not keep freed GPU memory in the pool");
    }
    Ok(device)
}

/// candle allocates every tensor with `cuMemAllocAsync` from the device's
/// default memory pool, whose release threshold is 0: at each
/// synchronisation (every read-back of a gradient) the pool hands its free
/// memory back to the driver, and the next step maps it again, gigabytes a
/// step for a ResNet on a batch of 512. A threshold of `u64::MAX` keeps
/// freed memory in the pool for reuse, as PyTorch's caching allocator does.
/// The memory stays with the process until it exits. On an H100 it is
/// worth a few percent at most: candle's own convolution backward ran at
/// 1463 image-steps/s with it against 1395-1406 without it (different
/// calls; `evals/results/protect-bench-h100.json` runs 1, 3 and 4).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // two driver calls that cudarc exposes only as `unsafe`
fn keep_freed_memory(device: &Device) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let cu_device = device.as_cuda_device()?.cuda_stream().context().cu_device();
    let mut threshold = u64::MAX;
    // SAFETY: `cu_device` comes from a live context; the release threshold
    // attribute takes a pointer to a `u64` (cuMemPoolSetAttribute docs).
    unsafe {
        let pool = result::device::get_default_mem_pool(cu_device)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "cuda:{ordinal} requested, but this binary was built without the `cuda` feature \
         (build it with `cargo xtask cuda-build`)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}
