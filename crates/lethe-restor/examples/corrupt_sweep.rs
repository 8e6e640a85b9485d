//! Sizes the corruption stage: runs several corruption recipes against the
//! clean checkpoints of a finished run and prints the corruption gate's
//! numbers for each, without running any unlearning method.
//!
//! `cargo run --release -p lethe-restor --example corrupt_sweep -- CONFIG SWEEP [CHECKPOINTS]`
//!
//! `SWEEP` is a TOML file of `[[variants]]`, each with a `label` and a
//! `corrupt` table in the config's `[corrupt]` format; `CHECKPOINTS`
//! (default `evals/results/restor/stages`) must hold the clean stages of
//! CONFIG (same world, model and clean training). Non-target accuracy is
//! reported both on the config's sample and on every non-target fact.
//! Output: one JSON line per (variant, seed, k) on stdout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use lethe_model::decoder::Decoder;
use lethe_restor::config::{CorruptStage, RestorConfig};
use lethe_restor::eval::{evaluate, target_accuracy};
use lethe_restor::metrics::summarize;
use lethe_restor::pipeline::{fit_corruption, StopCheck};
use lethe_restor::world::World;
use lethe_unlearn::data::{TextExample, TextSet};
use serde::Deserialize;

#[derive(Deserialize)]
struct Sweep {
    variants: Vec<Variant>,
}

#[derive(Deserialize)]
struct Variant {
    label: String,
    corrupt: CorruptStage,
}

/// The clean checkpoint of `seed` whose hashed world equals `cfg`'s.
fn clean_dir(root: &Path, cfg: &RestorConfig, seed: u64) -> Option<PathBuf> {
    let world = serde_json::to_value(&cfg.world).ok()?;
    let model = serde_json::to_value(&cfg.model).ok()?;
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let dir = entry.path();
        let is_clean = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("clean-"));
        if !is_clean {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join("stage.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let s = &v["section"];
        if s[0] == world && s[1] == model && s[3] == serde_json::json!(seed) {
            return Some(dir);
        }
    }
    None
}

/// Where collateral lands: among non-target facts (all / lost), the
/// share whose entity shares a name word with a target, whose relation is
/// corrupted for such a target, and the mean clean-corpus mentions.
fn collateral(
    world: &World,
    clean: &lethe_restor::eval::ModelEval,
    corr: &lethe_restor::eval::ModelEval,
    facts: &[usize],
) -> serde_json::Value {
    let shares = |fi: usize| -> (bool, bool) {
        let f = &world.facts()[fi];
        let name = &world.entities()[f.entity].name;
        let mut word = false;
        let mut rel = false;
        for (ti, t) in world.entities().iter().enumerate() {
            if !t.is_target || !t.name.iter().any(|w| name.contains(w)) {
                continue;
            }
            word = true;
            rel |= world
                .facts()
                .iter()
                .any(|g| g.entity == ti && g.relation == f.relation && g.corrupted.is_some());
        }
        (word, rel)
    };
    let stat = |set: &[usize]| -> serde_json::Value {
        let n = set.len().max(1) as f64;
        let (mut w, mut r, mut m) = (0.0, 0.0, 0.0);
        for &fi in set {
            let (a, b) = shares(fi);
            w += f64::from(u8::from(a));
            r += f64::from(u8::from(b));
            m += world.facts()[fi].mentions as f64;
        }
        serde_json::json!({"n": set.len(), "name_word": w / n, "name_word_and_rel": r / n, "mentions": m / n})
    };
    let ok = |e: &lethe_restor::eval::ModelEval, f: usize| {
        e.other_correct.get(&f).copied().unwrap_or(false)
    };
    let lost: Vec<usize> = facts
        .iter()
        .copied()
        .filter(|&f| ok(clean, f) && !ok(corr, f))
        .collect();
    let gained: Vec<usize> = facts
        .iter()
        .copied()
        .filter(|&f| !ok(clean, f) && ok(corr, f))
        .collect();
    serde_json::json!({"all": stat(facts), "lost": stat(&lost), "gained": gained.len()})
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let mut args = std::env::args().skip(1);
    let (Some(config), Some(sweep)) = (args.next(), args.next()) else {
        return Err("usage: corrupt_sweep CONFIG SWEEP [CHECKPOINTS]".into());
    };
    let root = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "evals/results/restor/stages".into()),
    );
    let cfg = RestorConfig::from_file(Path::new(&config))?;
    let sweep: Sweep = toml::from_str(&std::fs::read_to_string(&sweep)?)?;
    let world = World::generate(&cfg.world)?;
    let sample = world.nontarget_facts();
    let all: Vec<usize> = (0..world.facts().len())
        .filter(|&i| !world.entities()[world.facts()[i].entity].is_target)
        .collect();
    let device = Device::Cpu;
    for &seed in &cfg.seeds {
        let Some(dir) = clean_dir(&root, &cfg, seed) else {
            eprintln!(
                "no clean checkpoint for seed {seed} under {}",
                root.display()
            );
            continue;
        };
        let clean = Decoder::load(&dir.join("model"), &device)?;
        let clean_eval = evaluate(&clean, &world, &all, cfg.eval_batch)?;
        let c_sample = summarize(&clean_eval, &sample, &[]);
        let c_all = summarize(&clean_eval, &all, &[]);
        for v in &sweep.variants {
            let mut vcfg = cfg.clone();
            vcfg.corrupt = v.corrupt.clone();
            vcfg.validate()?;
            for &k in &cfg.ks {
                let docs: Vec<TextExample> = world
                    .corruption()
                    .iter()
                    .map(|d| TextExample::document(d.tokens(k)))
                    .collect::<Result<_, _>>()?;
                let set = TextSet::new(docs);
                let mut train = vcfg.corrupt_train(k);
                train.seed = seed.wrapping_mul(1000) + k as u64;
                let t = Instant::now();
                let mut measure = |m: &Decoder| target_accuracy(m, &world, cfg.eval_batch);
                let stop = vcfg.corrupt.early_stop.as_ref().map(|e| StopCheck {
                    every: e.every,
                    stop_at_or_below: c_sample.target_accuracy - e.drop,
                    target_accuracy: &mut measure,
                });
                let (model, fit, log) = fit_corruption(
                    &clean,
                    &set,
                    &train,
                    vcfg.corrupt.lora.as_ref(),
                    &vcfg.corrupt.freeze,
                    stop,
                )?;
                let secs = t.elapsed().as_secs_f64();
                let e = evaluate(&model, &world, &all, cfg.eval_batch)?;
                let flips = collateral(&world, &clean_eval, &e, &all);
                let s_sample = summarize(&e, &sample, &[]);
                let s_all = summarize(&e, &all, &[]);
                println!(
                    "{}",
                    serde_json::json!({
                        "variant": v.label,
                        "seed": seed,
                        "k": k,
                        "steps": fit.steps,
                        "stopped_early": log.stopped_early,
                        "drop": c_sample.target_accuracy - s_sample.target_accuracy,
                        "corrupted_rate": s_sample.corrupted_rate,
                        "nt_change_sample": s_sample.nontarget_accuracy - c_sample.nontarget_accuracy,
                        "nt_change_all": s_all.nontarget_accuracy - c_all.nontarget_accuracy,
                        "locality_change": s_sample.locality - c_sample.locality,
                        "seconds": secs,
                        "collateral": flips,
                    })
                );
            }
        }
    }
    Ok(())
}
