//! Throughput benchmark of dataset protection in image-steps per second
//! (one PGD forward+backward of one image = one image-step), the unit the
//! research notes use (section 5.2). Each dataset is timed twice: the
//! noise step alone (`pgd_only.pgd_image_steps_per_s`: one round without
//! surrogate training or batch-norm recalibration, so the rate is the PGD
//! rate plus an accuracy pass) and one full EM round (`em_round`: 10
//! surrogate steps, 20 recalibration passes, 20 PGD steps per image, the
//! accuracy pass). The CIFAR-sized ResNet-18 (random 32x32 RGB images) is
//! timed PGD-only on CPU, with the full round too on a GPU.
//!
//! Writes ONE JSON object to `evals/results/protect-bench.json` (or the
//! path in `BENCH_OUT`) and prints it:
//!
//! * `digits_cnn`: scikit-learn digits (8x8 gray, 1797 images), CNN
//!   32-64, one sample-wise EM round with 20 PGD steps;
//! * `lesions_cnn`: 256 generated 32x32 gray lesion images, CNN 32-64-128;
//! * `cifar_resnet18`: 32x32 RGB random images through ResNet-18 (width
//!   64, the CIFAR model of the H100 comparison), a short round
//!   (`BENCH_CIFAR_IMAGES` images, default 64, 2 PGD steps) and the
//!   extrapolated time of a full round on 50k images with 20 steps.
//!
//! `--device cuda` (or `BENCH_DEVICE=cuda`) runs on a GPU when built with
//! `--features cuda`; there the CIFAR model is timed by a full round
//! (`em_round`) instead of PGD alone, and `--check` first runs the same
//! short digits protection on the CPU and the GPU and compares them
//! (`check_against_cpu`). `--cifar-only --images N --steps K` runs just the
//! CIFAR round (what `bench_protect_torch.py` calls on the H100); `--tf32`
//! lets the GPU's f32 matrix products use TF32 tensor cores; `--pgd-only`
//! times noise steps alone on a GPU too (what a kernel profile wants);
//! `BENCH_PGD_BATCH` sets the noise batch (default 512, PyTorch's).
//! Threads as in `lethe-model`'s `bench_train`: unless set,
//! `CANDLE_NUM_THREADS=1` and `RAYON_NUM_THREADS` = cores.
//!
//! Run: `cargo run --release -p lethe-protect --example bench_protect`.

use std::path::PathBuf;
use std::time::Instant;

use lethe_protect::dataset::{Dataset, Format, ImageShape, Item};
use lethe_protect::protect::{protect_dataset, ProtectParams, RunControl, StopRule};
use lethe_protect::{formats, Arch, DataSource, LesionSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    let cores = lethe_protect::tune_cpu_threads();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let device = arg("--device")
        .or_else(|| std::env::var("BENCH_DEVICE").ok())
        .unwrap_or_else(|| "cpu".into());
    let cifar_only = args.iter().any(|a| a == "--cifar-only");
    let cifar_images: usize = arg("--images")
        .or_else(|| std::env::var("BENCH_CIFAR_IMAGES").ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let cifar_steps: usize = arg("--steps").and_then(|v| v.parse().ok()).unwrap_or(2);
    // TF32 tensor-core matrix products for f32 on the GPU (PyTorch's
    // default for convolutions); off unless asked for.
    let tf32 = args.iter().any(|a| a == "--tf32");
    lethe_model::device::set_gpu_tf32(tf32);
    let load_before = load_average();

    let mut out = json!({
        "unit": "image-steps/s (one PGD forward+backward of one image = 1 image-step)",
        "device": device,
        "tf32": tf32,
        "cores": cores,
        "CANDLE_NUM_THREADS": std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
        "RAYON_NUM_THREADS": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
    });
    if !cifar_only {
        let digits = formats::load(&DataSource::Digits)?;
        let arch = Arch::Cnn {
            channels: vec![32, 64],
            batch_norm: true,
        };
        out["digits_cnn"] = json!({
            "pgd_only": pgd_only(&digits, arch.clone(), 20, &device)?,
            "em_round": round(&digits, arch, 20, &device)?,
        });
        let lesions = formats::load(&DataSource::Lesions(LesionSpec {
            per_class: 64,
            ..LesionSpec::default()
        }))?;
        let arch = Arch::Cnn {
            channels: vec![32, 64, 128],
            batch_norm: true,
        };
        out["lesions_cnn"] = json!({
            "pgd_only": pgd_only(&lesions, arch.clone(), 20, &device)?,
            "em_round": round(&lesions, arch, 20, &device)?,
        });
    }
    if args.iter().any(|a| a == "--check") && device != "cpu" {
        out["check_against_cpu"] = check_against_cpu(&device)?;
    }
    let cifar = random_rgb(cifar_images, 10, 7)?;
    let arch = Arch::Resnet18 { width: 64 };
    // `--pgd-only`: noise steps alone on a GPU too (for profiling them).
    let (mut c, rate) = if device == "cpu" || args.iter().any(|a| a == "--pgd-only") {
        let c = json!({ "pgd_only": pgd_only(&cifar, arch.clone(), cifar_steps, &device)? });
        let rate = c["pgd_only"]["pgd_image_steps_per_s"].as_f64();
        (c, rate)
    } else {
        // On a GPU the full round is affordable and is what PyTorch is
        // compared with (bench_protect_torch.py reads `em_round.round_s`).
        let c = json!({ "em_round": round(&cifar, arch, cifar_steps, &device)? });
        let rate = c["em_round"]["image_steps_per_s"].as_f64();
        (c, rate)
    };
    let rate = rate.unwrap_or(0.0);
    // A full CIFAR-10 EM round: 50k images x 20 steps, plus 10 surrogate
    // steps of 128 images (counted as 128 image-steps each) and an
    // accuracy pass (about a third of a step per image).
    let full_steps = 50_000.0 * 20.0 + 10.0 * 128.0 + 50_000.0 / 3.0;
    c["extrapolated_full_round_s"] = json!(round2(full_steps / rate.max(1e-9)));
    c["pytorch_h100_reference_s"] = json!({
        "pgd20_over_50k_s": 29.2,
        "em_round_s": "30-32",
        "source": "shared/research/protection-salm.md section 5.2 (PyTorch 2.11, fp32, H100)"
    });
    out["cifar_resnet18"] = c;
    out["load_average_1min"] = json!([load_before, load_average()]);
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    let path = std::env::var("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../evals/results/protect-bench.json")
        });
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, text + "\n")?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Images per noise batch: `BENCH_PGD_BATCH`, default 512 (the batch of
/// the PyTorch reference).
fn pgd_batch() -> usize {
    std::env::var("BENCH_PGD_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&b| b > 0)
        .unwrap_or(512)
}

/// The noise step alone: one round with no surrogate training and no
/// batch-norm recalibration (the accuracy pass remains, about a third of a
/// step per image).
fn pgd_only(
    data: &Dataset,
    arch: Arch,
    steps: usize,
    device: &str,
) -> Result<Value, Box<dyn std::error::Error>> {
    let mut p = ProtectParams::em(8.0 / 255.0);
    p.surrogate = arch.clone();
    p.pgd_steps = steps;
    p.pgd_batch = pgd_batch();
    p.train_steps_per_round = 0;
    p.bn_recalibration = 0;
    p.device = device.to_string();
    p.stop = StopRule::new(1, 1, None, None);
    let r = protect_dataset(data, &p, &RunControl::default())?;
    let s = data.shape();
    Ok(json!({
        "images": data.len(),
        "shape": [s.channels, s.height, s.width],
        "surrogate": arch.label(),
        "pgd_steps": steps,
        "pgd_batch": p.pgd_batch,
        "seconds": round2(r.seconds),
        "image_steps": r.image_steps,
        "pgd_image_steps_per_s": round2(r.image_steps as f64 / r.seconds),
    }))
}

/// One full sample-wise EM round on `data`, timed.
fn round(
    data: &Dataset,
    arch: Arch,
    steps: usize,
    device: &str,
) -> Result<Value, Box<dyn std::error::Error>> {
    let mut p = ProtectParams::em(8.0 / 255.0);
    p.surrogate = arch.clone();
    p.pgd_steps = steps;
    p.pgd_batch = pgd_batch();
    p.train_batch = 128;
    p.train_steps_per_round = 10;
    p.device = device.to_string();
    p.stop = StopRule::new(1, 1, None, None);
    let t0 = Instant::now();
    let r = protect_dataset(data, &p, &RunControl::default())?;
    let wall = t0.elapsed().as_secs_f64();
    let s = data.shape();
    Ok(json!({
        "images": data.len(),
        "shape": [s.channels, s.height, s.width],
        "surrogate": arch.label(),
        "pgd_steps": steps,
        "pgd_batch": p.pgd_batch,
        "train_steps": 10,
        "round_s": round2(r.seconds),
        "wall_s_incl_setup": round2(wall),
        "image_steps": r.image_steps,
        "image_steps_per_s": round2(r.image_steps as f64 / r.seconds),
    }))
}

/// The same short protection run on the CPU and on `device`, compared:
/// the surrogate weights start identical (they are drawn on the host), so
/// the round logs must agree to float tolerance and the released images
/// may differ only where a sign step flipped on a near-zero gradient.
fn check_against_cpu(device: &str) -> Result<Value, Box<dyn std::error::Error>> {
    let digits = formats::load(&DataSource::Digits)?;
    let mut p = ProtectParams::em(8.0 / 255.0);
    p.surrogate = Arch::Cnn {
        channels: vec![32, 64],
        batch_norm: true,
    };
    p.pgd_steps = 10;
    p.stop = StopRule::new(2, 2, None, None);
    let cpu = protect_dataset(&digits, &p, &RunControl::default())?;
    p.device = device.to_string();
    let gpu = protect_dataset(&digits, &p, &RunControl::default())?;
    let (a, b) = (cpu.protected.pixels(), gpu.protected.pixels());
    let levels = |x: f32| (x * 255.0).round() as i32;
    let equal = a
        .iter()
        .zip(b)
        .filter(|(x, y)| levels(**x) == levels(**y))
        .count();
    let max_level_diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (levels(*x) - levels(*y)).abs())
        .max()
        .unwrap_or(0);
    let log = |r: &lethe_protect::protect::Protection| -> Value {
        r.rounds
            .iter()
            .map(|l| json!({"round": l.round, "train_loss": l.train_loss, "accuracy": l.accuracy, "loss": l.loss}))
            .collect()
    };
    Ok(json!({
        "run": "digits, CNN 32-64, sample-wise EM, 2 rounds x 10 PGD steps, seed 0",
        "cpu_rounds": log(&cpu),
        "device_rounds": log(&gpu),
        "released_levels_equal_fraction": equal as f64 / a.len().max(1) as f64,
        "released_max_level_diff": max_level_diff,
        "cpu_s": round2(cpu.seconds),
        "device_s": round2(gpu.seconds),
    }))
}

fn random_rgb(n: usize, classes: u32, seed: u64) -> lethe_protect::Result<Dataset> {
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = ImageShape {
        channels: 3,
        height: 32,
        width: 32,
    };
    let pixels = (0..n * shape.values())
        .map(|_| (rng.random_range(0..256u32) as f32) / 255.0)
        .collect();
    let labels = (0..n).map(|i| i as u32 % classes).collect();
    Dataset::new(
        "random-rgb-32",
        shape,
        pixels,
        labels,
        (0..classes).map(|c| c.to_string()).collect(),
        vec![Item::in_memory(Some(255)); n],
        Format::Generated,
    )
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}
