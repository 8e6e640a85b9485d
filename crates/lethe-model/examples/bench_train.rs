//! Training-throughput benchmark of the trainable half of `lethe-model`.
//!
//! Prints ONE JSON object to stdout:
//! * tiny decoder, the shape of the PyTorch anchor in `shared/anchors.md`
//!   section 2 (vocab 300, d_model 128, 4 heads, 2 layers, context 64,
//!   batch 16, random tokens, AdamW lr 3e-3), in the Llama layout with a
//!   SwiGLU width of 344 so that the parameter count (472,704) matches the
//!   anchor's GELU MLP (482,092): training tokens/s (forward + loss +
//!   backward + AdamW) and forward-only tokens/s (no autograd graph);
//! * the small CNN on 32x32 RGB images (channels 32/64/128, batch norm,
//!   batch 64, SGD with momentum): training images/s.
//!
//! Threads: candle 0.11's CPU element-wise ops run on a spin-waiting worker
//! pool that, on a 2-core machine, competes with the matrix-multiply
//! threads; training is several times faster with that pool disabled. So
//! unless the caller sets them, this sets `CANDLE_NUM_THREADS=1` (element-
//! wise ops and lethe's fused kernels on one thread) and
//! `RAYON_NUM_THREADS` to the available cores (gemm threads; also spares
//! candle a `/proc/cpuinfo` read per matmul). Both, and the machine's load
//! average, are reported.
//!
//! Run: `cargo run --release -p lethe-model --example bench_train`.
//! `BENCH_STEPS` sets the timed steps (default 40); `BENCH_ONLY=decoder` or
//! `cnn` runs one part.

use std::time::Instant;

use candle_core::{Device, Tensor};
use lethe_model::decoder::{Config, Decoder};
use lethe_model::nn::{self, Mode};
use lethe_model::optim::{self, AdamW, AdamWConfig, Sgd, SgdConfig};
use lethe_model::vision::{CnnConfig, ImageClassifier, SmallCnn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Before any candle call: its pools read these once.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    let steps: usize = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let load_before = load_average();

    let mut out = json!({
        "device": "cpu",
        "cores": cores,
        "CANDLE_NUM_THREADS": std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
        "RAYON_NUM_THREADS": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        "timed_steps": steps,
    });
    if only != "cnn" {
        out["decoder"] = bench_decoder(steps)?;
    }
    if only != "decoder" {
        out["cnn"] = bench_cnn((steps / 2).max(5))?;
    }
    out["load_average_1min"] = json!([load_before, load_average()]);
    println!("{out}");
    Ok(())
}

fn bench_decoder(steps: usize) -> Result<Value, Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    let (vocab, d, ffn, heads, layers, ctx, batch) = (300usize, 128, 344, 4, 2, 64usize, 16usize);
    let model = Decoder::new(Config::new(vocab, d, ffn, layers, heads, ctx), &device, 0)?;
    let mut opt = AdamW::new(
        model.vars(),
        AdamWConfig {
            lr: 3e-3,
            ..AdamWConfig::default()
        },
    )?;
    let batches: Vec<Tensor> = (0..8)
        .map(|_| {
            let ids: Vec<u32> = (0..batch * ctx)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            Tensor::from_vec(ids, (batch, ctx), &device)
        })
        .collect::<candle_core::Result<_>>()?;
    let warmup = 5;

    let mut first_loss = f32::NAN;
    let mut last_loss = f32::NAN;
    let mut train_s = 0f64;
    for i in 0..warmup + steps {
        let ids = &batches[i % batches.len()];
        let t0 = Instant::now();
        let logits = model.forward(ids, Mode::Train)?;
        let loss = nn::causal_lm_loss(&logits, ids, None)?;
        let report = optim::train_step(&mut opt, &loss, None)?;
        if i >= warmup {
            train_s += t0.elapsed().as_secs_f64();
        }
        if i == 0 {
            first_loss = report.loss;
        }
        last_loss = report.loss;
    }

    // Forward only: frozen weights, so no autograd graph is recorded.
    model.set_base_trainable(false);
    let mut fwd_s = 0f64;
    let fwd_steps = 2 * steps;
    for i in 0..warmup + fwd_steps {
        let ids = &batches[i % batches.len()];
        let t0 = Instant::now();
        let logits = model.forward(ids, Mode::Eval)?;
        if i >= warmup {
            fwd_s += t0.elapsed().as_secs_f64();
        }
        drop(logits);
    }
    let tokens = (batch * ctx) as f64;
    Ok(json!({
        "vocab": vocab, "d_model": d, "ffn_swiglu": ffn, "heads": heads, "layers": layers,
        "ctx": ctx, "batch": batch, "params": model.num_parameters(),
        "train_tokens_per_s": (tokens * steps as f64 / train_s).round(),
        "train_ms_per_step": round2(1000.0 * train_s / steps as f64),
        "forward_tokens_per_s": (tokens * fwd_steps as f64 / fwd_s).round(),
        "forward_ms_per_batch": round2(1000.0 * fwd_s / fwd_steps as f64),
        "loss_first_last": [first_loss, last_loss],
        "pytorch_eager_anchor": {"train_tokens_per_s": 35615, "forward_tokens_per_s": 133306},
    }))
}

fn bench_cnn(steps: usize) -> Result<Value, Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(1);
    let batch = 64usize;
    let channels = vec![32, 64, 128];
    let cnn = SmallCnn::new(
        CnnConfig {
            in_channels: 3,
            image_size: 32,
            num_classes: 10,
            channels: channels.clone(),
            batch_norm: true,
        },
        &device,
        0,
    )?;
    let params: usize = cnn.trainable_vars().iter().map(|v| v.elem_count()).sum();
    let mut sgd = Sgd::new(cnn.trainable_vars(), SgdConfig::salun(0.01))?;
    let pixels: Vec<f32> = (0..batch * 3 * 32 * 32)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let images = Tensor::from_vec(pixels, (batch, 3, 32, 32), &device)?;
    let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10u32)).collect();
    let labels = Tensor::from_vec(labels, batch, &device)?;
    let warmup = 3;
    let mut secs = 0f64;
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let logits = cnn.forward(&images, Mode::Train)?;
        let loss = nn::cross_entropy(&logits, &labels, None)?;
        optim::train_step(&mut sgd, &loss, None)?;
        if i >= warmup {
            secs += t0.elapsed().as_secs_f64();
        }
    }
    Ok(json!({
        "image": [3, 32, 32], "channels": channels, "batch_norm": true, "classes": 10,
        "batch": batch, "params": params, "optimizer": "sgd momentum 0.9 wd 5e-4",
        "train_images_per_s": ((batch * steps) as f64 / secs).round(),
        "train_ms_per_step": round2(1000.0 * secs / steps as f64),
    }))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}
