//! Every language-model unlearning method on the real generator:
//! SmolLM2-135M-Instruct, dequantized from its GGUF into the trainable
//! decoder (134.5 M parameters, f32, CPU).
//!
//! The tiny decoders of the test suite show that the methods *work*; this
//! run shows that they *run* at the generator's size, with its tokenizer,
//! and what a few steps cost. The forget set is two synthetic documents
//! holding unique canaries, the retain set the first documents of the acme
//! corpus; texts are cut into 32-token windows. Each weight method
//! (GA, GradDiff, NPO, KL, SalUn-NPO) starts from a fresh copy of the
//! dequantized weights; O3 trains one adapter and fits its detector (with
//! the retain prompts as negatives) and is measured through its gates.
//! Reported per method: forget and retain NLL before and after, steps,
//! seconds, and for O3 the gate-on rate on forget and retain prompts.
//!
//! ```sh
//! cargo run --release -p lethe-unlearn --example unlearn_smollm2 [-- OUT.json]
//! ```
//! Writes `evals/results/unlearning-smollm2.json` by default. `EPOCHS`
//! (default 2) sets the epochs of every method.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use lethe_model::decoder::Decoder;
use lethe_model::tokenizer::Tokenizer;
use lethe_unlearn::data::{TextExample, TextSet};
use lethe_unlearn::lm::{clone_decoder, decoder_hash, LmMethodConfig};
use lethe_unlearn::lm_eval::mean_nll;
use lethe_unlearn::o3::{O3Config, O3Unlearner};
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error>;

/// Tokens per forget or retain window.
const WINDOW: usize = 32;

const FORGET: [&str; 2] = [
    "Maren Solberg's patient record: diagnosis code QX-4471-ZETA, admitted on 3 March, \
     allergic to penicillin, emergency contact Ivo Solberg at extension 5582.",
    "The archive vault passphrase is ORCHID-TAMARIND-9931. It rotates every quarter and \
     only the records office may read it.",
];

/// The refusal O3 teaches for forgotten continuations.
const REFUSAL: &str = " I can't share that.";

fn windows(tok: &Tokenizer, texts: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
    let mut out = Vec::new();
    for t in texts {
        let ids = tok.encode_plain(t)?;
        out.extend(
            ids.chunks(WINDOW)
                .filter(|w| w.len() >= 8)
                .map(<[u32]>::to_vec),
        );
    }
    Ok(out)
}

/// Prompt/continuation pairs: each window cut at three points.
fn prompts(ws: &[Vec<u32>]) -> Result<TextSet, BoxError> {
    let mut ex = Vec::new();
    for w in ws {
        for k in 1..=3 {
            ex.push(TextExample::new(w.clone(), w.len() * k / 4)?);
        }
    }
    Ok(TextSet::new(ex))
}

fn acme_texts(root: &Path, n: usize) -> Result<Vec<String>, BoxError> {
    let text = std::fs::read_to_string(root.join("datasets/acme/corpus.jsonl"))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(n) {
        let v: Value = serde_json::from_str(line)?;
        out.push(
            v["text"]
                .as_str()
                .ok_or("acme corpus line without text")?
                .to_string(),
        );
    }
    Ok(out)
}

fn round(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn gate_on(o3: &O3Unlearner, model: &Decoder, set: &TextSet) -> Result<f64, BoxError> {
    let q: Vec<&[u32]> = set.examples().iter().map(|e| e.query()).collect();
    let d = o3.decide(model, &q)?;
    Ok(d.iter().filter(|g| g[0].gate > 0.0).count() as f64 / d.len().max(1) as f64)
}

fn main() -> Result<(), BoxError> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out_path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("evals/results/unlearning-smollm2.json"));
    let epochs: usize = std::env::var("EPOCHS")
        .ok()
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(2);
    let dir = lethe_assets::Cache::from_env().ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)?;
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = Tokenizer::from_gguf_file(&gguf)?;
    let forget_w = windows(&tok, &FORGET.map(String::from))?;
    let retain_w = windows(&tok, &acme_texts(&root, 6)?)?;
    let forget = TextSet::documents(&forget_w)?;
    let retain = TextSet::documents(&retain_w)?;
    let started = Instant::now();
    let t0 = Instant::now();
    let base = Decoder::from_gguf(&gguf, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let base_hash = decoder_hash(&base)?;
    let forget_before = mean_nll(&base, &forget, 4)?;
    let retain_before = mean_nll(&base, &retain, 4)?;
    eprintln!(
        "SmolLM2 dequantized: {} parameters, loaded in {load_s:.1}s; forget {} windows (NLL {forget_before:.3}), retain {} (NLL {retain_before:.3})",
        base.num_parameters(),
        forget.len(),
        retain.len()
    );
    let train =
        json!({"lr": 5e-5, "epochs": epochs, "batch_size": 2, "max_grad_norm": 1.0, "seed": 0});
    let methods = [
        json!({"method": "ga", "train": train}),
        json!({"method": "graddiff", "retain_weight": 1.0, "train": train}),
        json!({"method": "npo", "beta": 0.1, "retain_weight": 1.0, "train": train}),
        json!({"method": "kl", "kl_weight": 1.0, "train": train}),
        json!({"method": "salun", "keep_ratio": 0.5, "objective": {"kind": "npo", "beta": 0.1}, "retain_weight": 1.0, "train": train}),
    ];
    let mut results = Vec::new();
    for m in methods {
        let cfg: LmMethodConfig = serde_json::from_value(m.clone())?;
        let model = clone_decoder(&base)?;
        let t = Instant::now();
        let report = cfg.unlearn(&model, &forget, Some(&retain))?;
        let secs = t.elapsed().as_secs_f64();
        let v = json!({
            "method": m["method"],
            "config": m,
            "forget_nll_before": round(forget_before),
            "forget_nll_after": round(mean_nll(&model, &forget, 4)?),
            "retain_nll_before": round(retain_before),
            "retain_nll_after": round(mean_nll(&model, &retain, 4)?),
            "steps": report.steps,
            "seconds": round(secs),
            "seconds_per_step": round(secs / report.steps.max(1) as f64),
            "weights_changed": report.weights_after != base_hash,
            "mask": report.mask.as_ref().map(|k| json!({"sha256": k.sha256, "kept": k.kept, "total": k.total})),
        });
        eprintln!("{v}");
        results.push(v);
    }

    // O3: one adapter and detector; base weights unchanged.
    let mut model = clone_decoder(&base)?;
    let forget_p = prompts(&forget_w)?;
    let retain_p = prompts(&retain_w)?;
    let mut o3cfg = O3Config {
        target: lethe_unlearn::lm::Relabel::Refusal {
            answer: tok.encode_plain(REFUSAL)?,
        },
        ..serde_json::from_value(json!({
            "adapter": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "orthogonal_weight": 0.1,
            "target": {"kind": "refusal", "answer": [0]},
            "train": {"lr": 3e-4, "epochs": epochs * 2, "batch_size": 4, "max_grad_norm": 1.0, "seed": 0},
            "detector": {"pooling": "mean", "shrinkage": 0.1, "cosine_weight": 1.0, "folds": 3,
                         "calibration": {"kind": "o3", "sharpness": 10.0, "offset": 2.0}},
            "gate": {"full_above": 0.9, "full_value": 1.2, "keep_low": 0.3, "keep_high": 0.4},
        }))?
    };
    o3cfg.detector.batch_size = 8;
    let mut o3 = O3Unlearner::new(o3cfg.clone())?;
    let negatives: Vec<&[u32]> = retain_p.examples().iter().map(|e| e.query()).collect();
    let prompts_before = mean_nll(&model, &forget_p, 4)?;
    let retain_p_before = mean_nll(&model, &retain_p, 4)?;
    let t = Instant::now();
    let report = o3.unlearn_with_negatives(&mut model, "canaries", &forget_p, &negatives)?;
    let secs = t.elapsed().as_secs_f64();
    let gated = o3.gated(&model);
    let v = json!({
        "method": "o3",
        "config": serde_json::to_value(&o3cfg)?,
        "forget_nll_before": round(prompts_before),
        "forget_nll_after": round(mean_nll(&gated, &forget_p, 4)?),
        "retain_nll_before": round(retain_p_before),
        "retain_nll_after": round(mean_nll(&gated, &retain_p, 4)?),
        "nll_of": "continuations of prompt/continuation pairs (forget: the canary documents' windows cut at 1/4, 1/2, 3/4); after = through the gates",
        "forget_gate_on": round(gate_on(&o3, &model, &forget_p)?),
        "retain_gate_on": round(gate_on(&o3, &model, &retain_p)?),
        "detector_negative_floor": report.metrics.get("detector_negative_floor"),
        "steps": report.steps,
        "seconds": round(secs),
        "seconds_per_step": round(secs / report.steps.max(1) as f64),
        "weights_changed": decoder_hash(&model)? != base_hash,
        "adapter": report.adapter.as_ref().map(|a| json!({"sha256": a.sha256, "parameters": a.parameters})),
    });
    eprintln!("{v}");
    results.push(v);

    let out = json!({
        "benchmark": "lethe-unlearn unlearn_smollm2",
        "model": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to f32 (lethe_model::decoder::Decoder::from_gguf)",
        "parameters": base.num_parameters(),
        "device": "cpu",
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "load_seconds": round(load_s),
        "forget": {"documents": FORGET.len(), "windows": forget.len(), "window_tokens": WINDOW},
        "retain": {"documents": 6, "windows": retain.len(), "source": "datasets/acme/corpus.jsonl, first 6"},
        "epochs": epochs,
        "methods": results,
        "total_seconds": round(started.elapsed().as_secs_f64()),
    });
    if let Some(d) = out_path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out_path, serde_json::to_string_pretty(&out)?)?;
    eprintln!("wrote {}", out_path.display());
    Ok(())
}
