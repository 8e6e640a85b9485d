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
            DeviceSpec::Cpu => {
                keep_freed_cpu_memory();
                Ok(Device::Cpu)
            }
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

/// Makes the C allocator keep freed tensor buffers for reuse, once per
/// process; whether it is in effect (always false off glibc).
///
/// glibc serves every allocation above its mmap threshold (32 MiB at most
/// by default) with a fresh `mmap` and unmaps it on free, and trims freed
/// memory at the top of the heap: a CNN step on a batch of 512 allocates
/// and frees activations and im2col buffers of tens to hundreds of MiB,
/// and each one is page-faulted in again, zeroed by the kernel, on the next
/// step (a quarter of a protection run's CPU time went to page faults and
/// kernel memory bookkeeping in `perf`). Raising both thresholds to 2 GiB
/// serves them from the heap and keeps them there, as PyTorch's CPU
/// allocator effectively does (on the main thread, which runs the
/// training and protection loops; another thread's heap takes blocks up
/// to 64 MiB, larger ones are still mapped). Measured with `bench_protect` on 2 cores:
/// noise steps 1.5-1.6x faster (lesions CNN 216-236 -> 348-360
/// image-steps/s), peak memory 6 % higher. The process keeps its peak heap
/// until it exits. Settings the user made (`GLIBC_TUNABLES` with a malloc
/// tunable, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) are left
/// alone. Called by [`DeviceSpec::open`] for the CPU; binaries call it
/// first thing.
pub fn keep_freed_cpu_memory() -> bool {
    static APPLIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *APPLIED.get_or_init(|| {
        let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"))
            || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
        !user_set && raise_malloc_thresholds()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // `mallopt` is a C function
fn raise_malloc_thresholds() -> bool {
    // Just under 2 GiB: the largest value `mallopt` takes.
    const LIMIT: libc::c_int = libc::c_int::MAX;
    // SAFETY: `mallopt` takes two integers and changes allocator settings
    // under glibc's own lock; valid at any time, from any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn raise_malloc_thresholds() -> bool {
    false
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
/// calls; `evals/results/protect-bench-gpu.json` runs 1, 3 and 4).
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

    /// Bytes glibc holds in `mmap`ed blocks.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)] // a C function without arguments
    fn mmapped_bytes() -> usize {
        // SAFETY: `mallinfo2` only reads the allocator's statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_tensor_buffers_come_from_the_heap_after_opening_the_cpu() {
        // 40 MiB: above glibc's default mmap threshold (at most 32 MiB),
        // so without the setting it would be a block of its own; below a
        // thread arena's heap size (64 MiB, the most a test thread, not
        // the main one, can take from its heap).
        DeviceSpec::Cpu.open().unwrap();
        assert!(keep_freed_cpu_memory());
        let before = mmapped_bytes();
        let big = vec![1u8; 40 << 20];
        let during = mmapped_bytes();
        drop(std::hint::black_box(big));
        assert!(
            during < before + (8 << 20),
            "a 40 MiB buffer was mmapped: {before} -> {during} bytes"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}
