//! The unlearning evaluation of issue 6: SalUn on scikit-learn's digits
//! against Retrain (acceptance 1), O3 continual unlearning on a decoder
//! trained from scratch (acceptance 2), and the weight-level language-model
//! methods side by side on the same decoder.
//!
//! Run: `cargo run --release -p lethe-unlearn --example eval_unlearning --
//! [CONFIG] [OUT_JSON]` (defaults `evals/unlearning/small.toml`,
//! `evals/results/unlearning.json`; a Markdown summary is written next to
//! the JSON). Progress goes to stderr.
//!
//! Protocol, digits (per scenario: random 10% forgetting, class-wise
//! forgetting of class `seed % 10`):
//! * split 80/20 train/test per seed, train the original CNN on train;
//! * Retrain = the same recipe from scratch on the retain set;
//! * each method's learning rate and epochs are chosen on separate
//!   *selection seeds* by the smallest mean average gap to those seeds'
//!   Retrain, then frozen for the reported seeds (no tuning on them);
//! * metrics (SalUn's): UA, RA, TA, MIA-efficacy, run time, average gap;
//!   class-wise TA is measured on the test images of the remaining classes.
//!
//! Protocol, O3: a multi-domain fact corpus; a decoder trained on all of
//! it; three sequential requests, each forgetting 80% of one domain's facts
//! (both templates); the other 20% are *held-out* queries of the same
//! domain that neither the adapter nor the detector saw. After each request:
//! gated accuracy and refusal on every forgotten request set and its
//! held-out facts, retain utility on the never-forgotten domains, detector
//! AUROC (held-out same-domain queries vs every other domain's queries), the
//! orthogonality penalty.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use lethe_model::decoder::{Config as DecoderConfig, Decoder};
use lethe_model::vision::{CnnConfig, VisionConfig};
use lethe_unlearn::classifier::finetune::FinetuneConfig;
use lethe_unlearn::classifier::ga::GaClassifierConfig;
use lethe_unlearn::classifier::retrain::RetrainConfig;
use lethe_unlearn::classifier::salun::SalunRlConfig;
use lethe_unlearn::classifier::{
    clone_classifier, evaluate, new_classifier, train_classifier, ClassifierMethod,
    ClassifierTrainConfig,
};
use lethe_unlearn::corpus::{CorpusConfig, FactCorpus};
use lethe_unlearn::data::{digits, shuffled, ImageSet, TextSet};
use lethe_unlearn::lm::{self, clone_decoder, LmMethodConfig, LmTrainConfig};
use lethe_unlearn::lm_eval::{answer_accuracy, refusal_rate};
use lethe_unlearn::metrics::{auroc, mean_std, SalunMetrics};
use lethe_unlearn::o3::{O3Config, O3Unlearner};
use serde::Deserialize;
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalConfig {
    seeds: Vec<u64>,
    selection_seeds: Vec<u64>,
    digits: DigitsConfig,
    o3: O3Eval,
    #[serde(default)]
    lm_methods: Vec<LmMethodConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DigitsConfig {
    test_fraction: f64,
    forget_fraction: f64,
    channels: Vec<usize>,
    train: ClassifierTrainConfig,
    salun: MethodGrid,
    rl: MethodGrid,
    finetune: MethodGrid,
    ga: MethodGrid,
    keep_ratio: f64,
    batch_size: usize,
    /// Scenarios to run (default: both).
    #[serde(default = "all_scenarios")]
    scenarios: Vec<String>,
}

fn yes() -> bool {
    true
}

fn all_scenarios() -> Vec<String> {
    vec!["random".into(), "classwise".into()]
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct MethodGrid {
    lr: Vec<f64>,
    epochs: Vec<usize>,
    /// SalUn/RL only: sequential (false) and/or mixed (true) passes.
    #[serde(default)]
    mixed: Vec<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct O3Eval {
    corpus: CorpusConfig,
    hidden_size: usize,
    intermediate_size: usize,
    layers: usize,
    heads: usize,
    pretrain: LmTrainConfig,
    holdout_fraction: f64,
    requests: Vec<usize>,
    retain_domains: Vec<usize>,
    /// Share of the retain domains' facts held out as detector negatives
    /// (kept data the detector may see; never in the retain evaluation).
    #[serde(default)]
    negative_fraction: f64,
    /// Calibrate detector floors on those negatives (`false`: hold them out
    /// anyway, for an ablation on the same retain evaluation set).
    #[serde(default = "yes")]
    calibrate_negatives: bool,
    method: O3Config,
}

fn main() -> Result<(), BoxError> {
    // The C allocator setting of the `lethe` binary (see the function).
    lethe_model::device::keep_freed_cpu_memory();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().collect();
    let config_path = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("evals/unlearning/small.toml"));
    let out_path = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("evals/results/unlearning.json"));
    // `EVAL_RENDER_ONLY=1`: re-render the Markdown from an existing JSON.
    if std::env::var_os("EVAL_RENDER_ONLY").is_some() {
        let out: Value = serde_json::from_str(&std::fs::read_to_string(&out_path)?)?;
        std::fs::write(out_path.with_extension("md"), markdown(&out))?;
        return Ok(());
    }
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    let cfg: EvalConfig = toml::from_str(&text)?;
    let only = std::env::var("EVAL_ONLY").unwrap_or_default();
    let started = Instant::now();
    let load_before = load_average();

    let mut out = json!({
        "benchmark": "lethe-unlearn eval_unlearning",
        "config_file": config_path.strip_prefix(&root).unwrap_or(&config_path).display().to_string(),
        "config": toml::from_str::<toml::Value>(&text)?,
        "device": "cpu",
        "cores": cores,
        "CANDLE_NUM_THREADS": std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
        "RAYON_NUM_THREADS": std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
    });
    let mut summary = serde_json::Map::new();
    if only.is_empty() || only == "digits" {
        let digits_out = run_digits(&cfg)?;
        summary.insert(
            "salun_random_avg_gap".into(),
            digits_out["random"]["methods"]["salun"]["avg_gap"]["mean"].clone(),
        );
        summary.insert(
            "salun_random_avg_gap_std".into(),
            digits_out["random"]["methods"]["salun"]["avg_gap"]["std"].clone(),
        );
        summary.insert(
            "original_random_avg_gap".into(),
            digits_out["random"]["methods"]["original"]["avg_gap"]["mean"].clone(),
        );
        summary.insert(
            "salun_classwise_avg_gap".into(),
            digits_out["classwise"]["methods"]["salun"]["avg_gap"]["mean"].clone(),
        );
        summary.insert(
            "salun_classwise_ua".into(),
            digits_out["classwise"]["methods"]["salun"]["ua"]["mean"].clone(),
        );
        summary.insert(
            "salun_classwise_ta_drop".into(),
            digits_out["classwise"]["methods"]["salun"]["ta_drop_vs_original"]["mean"].clone(),
        );
        out["digits"] = digits_out;
    }
    if only.is_empty() || only == "o3" {
        let (o3_out, lm_out) = run_o3(&cfg)?;
        summary.insert(
            "o3_detector_auroc".into(),
            o3_out["aggregate"]["detector_auroc_heldout"]["mean"].clone(),
        );
        summary.insert(
            "o3_retain_utility_drop".into(),
            o3_out["aggregate"]["retain_drop_worst_request"]["mean"].clone(),
        );
        summary.insert(
            "o3_retain_utility_drop_max".into(),
            o3_out["aggregate"]["retain_drop_worst_request"]["max"].clone(),
        );
        summary.insert(
            "o3_detector_auroc_min".into(),
            o3_out["aggregate"]["detector_auroc_heldout"]["min"].clone(),
        );
        summary.insert(
            "o3_forget_acc_max".into(),
            o3_out["aggregate"]["forget_acc_all_forgotten_sets"]["max"].clone(),
        );
        summary.insert(
            "o3_chance_accuracy".into(),
            o3_out["corpus"]["chance_accuracy"].clone(),
        );
        let brief: Vec<Value> = o3_out["per_request"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        json!({
                            "request": r["request"],
                            "forget_acc_all_forgotten_mean": r["forget_acc_all_forgotten"]["mean"],
                            "forget_refusal_all_forgotten_mean": r["forget_refusal_all_forgotten"]["mean"],
                            "retain_drop_points_mean": r["retain_drop_points"]["mean"],
                            "detector_auroc_mean": r["detector_auroc_heldout"]["mean"],
                            "orthogonality_penalty_before_mean": r["orthogonality_penalty_before"]["mean"],
                            "orthogonality_penalty_after_mean": r["orthogonality_penalty_after"]["mean"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        summary.insert("o3_per_request".into(), Value::Array(brief));
        out["o3"] = o3_out;
        out["lm_methods"] = lm_out;
    }
    out["summary"] = Value::Object(summary);
    out["targets"] = json!({
        "salun_random_avg_gap": "<= 3 points",
        "salun_classwise_ua": ">= 99",
        "salun_classwise_ta_drop": "<= 2 points",
        "o3_detector_auroc": ">= 0.9",
        "o3_retain_utility_drop": "<= 5 points",
    });
    out["total_seconds"] = json!(round(started.elapsed().as_secs_f64(), 1));
    out["load_average_1min"] = json!([load_before, load_average()]);
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out_path, serde_json::to_string_pretty(&out)?)?;
    let md_path = out_path.with_extension("md");
    std::fs::write(&md_path, markdown(&out))?;
    eprintln!("wrote {} and {}", out_path.display(), md_path.display());
    println!("{}", serde_json::to_string_pretty(&out["summary"])?);
    Ok(())
}

// ---------------------------------------------------------------- digits

struct Split {
    forget: ImageSet,
    retain: ImageSet,
    /// Test set used for TA (class-wise: remaining classes only).
    test_eval: ImageSet,
}

fn digits_split(
    all: &ImageSet,
    cfg: &DigitsConfig,
    seed: u64,
    classwise: bool,
) -> Result<(ImageSet, Split), BoxError> {
    let order = shuffled(all.len(), seed.wrapping_add(17));
    let n_test = (all.len() as f64 * cfg.test_fraction).round() as usize;
    let test = all.subset(&order[..n_test])?;
    let train = all.subset(&order[n_test..])?;
    let (forget_idx, retain_idx): (Vec<usize>, Vec<usize>) = if classwise {
        let class = (seed % 10) as u32;
        (0..train.len()).partition(|&i| train.labels()[i] == class)
    } else {
        let o = shuffled(train.len(), seed.wrapping_add(29));
        let n = (train.len() as f64 * cfg.forget_fraction).round() as usize;
        let mut f = o[..n].to_vec();
        let mut r = o[n..].to_vec();
        f.sort_unstable();
        r.sort_unstable();
        (f, r)
    };
    let test_eval = if classwise {
        let class = (seed % 10) as u32;
        test.subset(&test.indices_where(|l| l != class))?
    } else {
        test.clone()
    };
    let split = Split {
        forget: train.subset(&forget_idx)?,
        retain: train.subset(&retain_idx)?,
        test_eval,
    };
    Ok((train, split))
}

fn cnn_config(cfg: &DigitsConfig) -> VisionConfig {
    VisionConfig::Cnn(CnnConfig {
        in_channels: 1,
        image_size: 8,
        num_classes: 10,
        channels: cfg.channels.clone(),
        batch_norm: true,
    })
}

/// A method instance for a grid point.
fn method_for(name: &str, cfg: &DigitsConfig, p: Point, seed: u64) -> Box<dyn ClassifierMethod> {
    let Point { lr, epochs, mixed } = p;
    let (momentum, wd) = (0.9, 5e-4);
    match name {
        "salun" | "rl" => Box::new(SalunRlConfig {
            keep_ratio: if name == "salun" { cfg.keep_ratio } else { 1.0 },
            lr,
            epochs,
            batch_size: cfg.batch_size,
            momentum,
            weight_decay: wd,
            mask_batch_size: 256,
            exclude_true_label: true,
            seed,
            mixed,
        }),
        "finetune" => Box::new(FinetuneConfig {
            lr,
            epochs,
            batch_size: cfg.batch_size,
            momentum,
            weight_decay: wd,
            seed,
        }),
        _ => Box::new(GaClassifierConfig {
            lr,
            epochs,
            batch_size: cfg.batch_size,
            momentum,
            weight_decay: wd,
            seed,
        }),
    }
}

fn grid_of<'a>(cfg: &'a DigitsConfig, name: &str) -> &'a MethodGrid {
    match name {
        "salun" => &cfg.salun,
        "rl" => &cfg.rl,
        "finetune" => &cfg.finetune,
        _ => &cfg.ga,
    }
}

const METHODS: [&str; 4] = ["salun", "rl", "finetune", "ga"];

/// One grid point.
#[derive(Debug, Clone, Copy)]
struct Point {
    lr: f64,
    epochs: usize,
    mixed: bool,
}

fn points(grid: &MethodGrid) -> Vec<Point> {
    let mixed = if grid.mixed.is_empty() {
        vec![false]
    } else {
        grid.mixed.clone()
    };
    let mut out = Vec::new();
    for &lr in &grid.lr {
        for &epochs in &grid.epochs {
            for &m in &mixed {
                out.push(Point {
                    lr,
                    epochs,
                    mixed: m,
                });
            }
        }
    }
    out
}

fn metrics_json(m: &SalunMetrics) -> Value {
    json!({"ua": round(m.ua, 2), "ra": round(m.ra, 2), "ta": round(m.ta, 2), "mia": round(m.mia, 2)})
}

fn run_digits(cfg: &EvalConfig) -> Result<Value, BoxError> {
    let d = &cfg.digits;
    let all = digits::from_cache()?;
    eprintln!("digits: {} images", all.len());
    let device = Device::Cpu;
    let vision = cnn_config(d);
    let mut out = serde_json::Map::new();
    for (scenario, classwise) in [("random", false), ("classwise", true)] {
        if !d.scenarios.iter().any(|s| s == scenario) {
            continue;
        }
        // --- selection on the selection seeds (mean gap over them)
        let mut refs = Vec::new();
        let mut original_gaps = Vec::new();
        for &sel in &cfg.selection_seeds {
            let (train, split) = digits_split(&all, d, sel, classwise)?;
            let original = new_classifier(&vision, &device, sel)?;
            train_classifier(
                original.as_ref(),
                &train,
                &ClassifierTrainConfig {
                    seed: sel,
                    ..d.train.clone()
                },
            )?;
            let retrained = clone_classifier(original.as_ref())?;
            RetrainConfig {
                train: ClassifierTrainConfig {
                    seed: sel,
                    ..d.train.clone()
                },
                init_seed: sel + 1,
            }
            .unlearn(retrained.as_ref(), &split.forget, &split.retain)?;
            let reference = evaluate(
                retrained.as_ref(),
                &split.forget,
                &split.retain,
                &split.test_eval,
                sel,
            )?;
            let orig = evaluate(
                original.as_ref(),
                &split.forget,
                &split.retain,
                &split.test_eval,
                sel,
            )?;
            original_gaps.push(orig.average_gap(&reference));
            refs.push((sel, split, original, reference));
        }
        let mut chosen: BTreeMap<&str, Point> = BTreeMap::new();
        let mut selection = serde_json::Map::new();
        let (og, _) = mean_std(&original_gaps);
        selection.insert(
            "original_model".into(),
            json!({"selection_avg_gap": round(og, 3), "per_seed_gap": original_gaps.iter().map(|g| round(*g, 2)).collect::<Vec<_>>()}),
        );
        for name in METHODS {
            let mut best: Option<(f64, Point)> = None;
            let mut tried = Vec::new();
            for p in points(grid_of(d, name)) {
                let mut gaps = Vec::new();
                for (sel, split, original, reference) in &refs {
                    let model = clone_classifier(original.as_ref())?;
                    let gap = match method_for(name, d, p, *sel).unlearn(
                        model.as_ref(),
                        &split.forget,
                        &split.retain,
                    ) {
                        Ok(_) => evaluate(
                            model.as_ref(),
                            &split.forget,
                            &split.retain,
                            &split.test_eval,
                            *sel,
                        )?
                        .average_gap(reference),
                        Err(e) => {
                            eprintln!("  {scenario} {name} {p:?}: {e}");
                            f64::INFINITY
                        }
                    };
                    gaps.push(gap);
                }
                let gap = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
                tried.push(json!({"lr": p.lr, "epochs": p.epochs, "mixed": p.mixed, "avg_gap": round(gap, 3), "per_seed_gap": gaps.iter().map(|g| round(*g, 2)).collect::<Vec<_>>()}));
                if best.is_none_or(|b| gap < b.0) {
                    best = Some((gap, p));
                }
            }
            let (gap, p) = best.ok_or("empty grid")?;
            eprintln!("{scenario}: selected {name} {p:?} (selection gap {gap:.2})");
            chosen.insert(name, p);
            selection.insert(name.into(), json!({"lr": p.lr, "epochs": p.epochs, "mixed": p.mixed, "selection_avg_gap": round(gap, 3), "grid": tried}));
        }
        // --- reported seeds
        let mut per_method: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for &seed in &cfg.seeds {
            let (train, split) = digits_split(&all, d, seed, classwise)?;
            let original = new_classifier(&vision, &device, seed)?;
            let t0 = Instant::now();
            train_classifier(
                original.as_ref(),
                &train,
                &ClassifierTrainConfig {
                    seed,
                    ..d.train.clone()
                },
            )?;
            let original_secs = t0.elapsed().as_secs_f64();
            let orig_m = evaluate(
                original.as_ref(),
                &split.forget,
                &split.retain,
                &split.test_eval,
                seed,
            )?;
            let retrained = clone_classifier(original.as_ref())?;
            let rep = RetrainConfig {
                train: ClassifierTrainConfig {
                    seed,
                    ..d.train.clone()
                },
                init_seed: seed + 1,
            }
            .unlearn(retrained.as_ref(), &split.forget, &split.retain)?;
            let ret_m = evaluate(
                retrained.as_ref(),
                &split.forget,
                &split.retain,
                &split.test_eval,
                seed,
            )?;
            let mut push = |name: &str, m: &SalunMetrics, secs: f64, extra: Value| {
                let mut v = metrics_json(m);
                v["seed"] = json!(seed);
                v["seconds"] = json!(round(secs, 3));
                v["avg_gap"] = json!(round(m.average_gap(&ret_m), 3));
                v["ta_drop_vs_original"] = json!(round(orig_m.ta - m.ta, 3));
                v["ta_drop_vs_retrain"] = json!(round(ret_m.ta - m.ta, 3));
                if let Value::Object(e) = extra {
                    for (k, x) in e {
                        v[k] = x;
                    }
                }
                per_method.entry(name.to_string()).or_default().push(v);
            };
            push("original", &orig_m, original_secs, json!({}));
            push("retrain", &ret_m, rep.seconds, json!({}));
            for name in METHODS {
                let model = clone_classifier(original.as_ref())?;
                let report = method_for(name, d, chosen[name], seed).unlearn(
                    model.as_ref(),
                    &split.forget,
                    &split.retain,
                )?;
                let m = evaluate(
                    model.as_ref(),
                    &split.forget,
                    &split.retain,
                    &split.test_eval,
                    seed,
                )?;
                let extra = match &report.mask {
                    Some(mask) => {
                        json!({"mask_sha256": mask.sha256, "mask_kept": mask.kept, "mask_total": mask.total})
                    }
                    None => json!({}),
                };
                push(name, &m, report.seconds, extra);
            }
            let s = &per_method["salun"];
            let last = s.last().ok_or("no salun result")?;
            eprintln!(
                "{scenario} seed {seed}: original {:?} | retrain {:?} | salun UA {} RA {} TA {} MIA {} gap {}",
                metrics_json(&orig_m), metrics_json(&ret_m), last["ua"], last["ra"], last["ta"], last["mia"], last["avg_gap"]
            );
        }
        let mut methods = serde_json::Map::new();
        for (name, runs) in &per_method {
            let mut agg = serde_json::Map::new();
            for key in [
                "ua",
                "ra",
                "ta",
                "mia",
                "avg_gap",
                "seconds",
                "ta_drop_vs_original",
                "ta_drop_vs_retrain",
            ] {
                let vals: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
                let (m, s) = mean_std(&vals);
                agg.insert(key.into(), json!({"mean": round(m, 3), "std": round(s, 3)}));
            }
            agg.insert("per_seed".into(), Value::Array(runs.clone()));
            methods.insert(name.clone(), Value::Object(agg));
        }
        out.insert(
            scenario.into(),
            json!({
                "forget": if classwise { "all training images of class seed % 10" } else { "random 10% of the training images" },
                "ta_set": if classwise { "test images of the remaining classes" } else { "all test images" },
                "selection_seeds": cfg.selection_seeds,
                "selection": selection,
                "methods": methods,
            }),
        );
    }
    Ok(json!({
        "dataset": "scikit-learn digits (1797 8x8 images, 10 classes)",
        "model": {"arch": "SmallCnn", "channels": d.channels, "batch_norm": true},
        "mia": "SalUn's attack: RBF SVC (C = 3, gamma = 1, libsvm-style SMO) on the confidence p(y_true | x); members = |test| retain images, non-members = test; efficacy = % of forget set called non-member",
        "random": out.remove("random").unwrap_or(Value::Null),
        "classwise": out.remove("classwise").unwrap_or(Value::Null),
    }))
}

// ---------------------------------------------------------------- O3

fn examples_of(facts: &[&lethe_unlearn::corpus::Fact]) -> TextSet {
    let mut v = Vec::new();
    for t in 0..2 {
        for f in facts {
            v.push(f.example(t));
        }
    }
    TextSet::new(v)
}

fn queries(set: &TextSet) -> Vec<&[u32]> {
    set.examples().iter().map(|e| e.query()).collect()
}

fn run_o3(cfg: &EvalConfig) -> Result<(Value, Value), BoxError> {
    let o = &cfg.o3;
    let corpus = FactCorpus::generate(o.corpus.clone())?;
    let refusal = corpus.refusal();
    let chance = corpus.chance_accuracy();
    let device = Device::Cpu;
    let mut runs = Vec::new();
    let mut lm_runs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for &seed in &cfg.seeds {
        // Request sets and held-out facts per requested domain.
        let mut request_sets = Vec::new();
        for (t, &domain) in o.requests.iter().enumerate() {
            let facts = corpus.facts_of(&[domain]);
            let order = shuffled(facts.len(), seed.wrapping_mul(31).wrapping_add(t as u64));
            let n_hold = (facts.len() as f64 * o.holdout_fraction).round() as usize;
            let hold: Vec<_> = order[..n_hold].iter().map(|&i| facts[i]).collect();
            let req: Vec<_> = order[n_hold..].iter().map(|&i| facts[i]).collect();
            request_sets.push((domain, examples_of(&req), examples_of(&hold)));
        }
        // Retain facts: a held-out share calibrates the detectors (kept
        // data the workflow would sample), the rest measures retain utility.
        let kept = corpus.facts_of(&o.retain_domains);
        let order = shuffled(kept.len(), seed.wrapping_mul(97).wrapping_add(7));
        let n_neg = (kept.len() as f64 * o.negative_fraction).round() as usize;
        let negatives = examples_of(&order[..n_neg].iter().map(|&i| kept[i]).collect::<Vec<_>>());
        let retain = examples_of(&order[n_neg..].iter().map(|&i| kept[i]).collect::<Vec<_>>());
        let all = corpus.qa(&(0..corpus.domains()).collect::<Vec<_>>());
        let mut mc = DecoderConfig::new(
            corpus.vocab().len(),
            o.hidden_size,
            o.intermediate_size,
            o.layers,
            o.heads,
            8,
        );
        mc.bos_token_id = Some(lethe_unlearn::corpus::BOS);
        let base = Decoder::new(mc, &device, seed)?;
        let t0 = Instant::now();
        let fit = lm::fit(
            &base,
            &all,
            &LmTrainConfig {
                seed,
                ..o.pretrain.clone()
            },
        )?;
        let pretrain_secs = t0.elapsed().as_secs_f64();
        let acc_all = answer_accuracy(&base, &all, 256)?;
        let retain_before = answer_accuracy(&base, &retain, 256)?;
        eprintln!("o3 seed {seed}: pretrained {} params in {pretrain_secs:.1}s, loss {:.3} -> {:.3}, accuracy {acc_all:.3}", base.num_parameters(), fit.first_loss, fit.last_loss);

        // Weight-level LM methods on request 0 (a fresh copy each).
        let (_, req0, hold0) = &request_sets[0];
        let others: Vec<usize> = (0..corpus.domains())
            .filter(|&x| x != request_sets[0].0)
            .collect();
        let lm_retain = corpus.qa(&others);
        for method in &cfg.lm_methods {
            let model = clone_decoder(&base)?;
            let report = method.unlearn(&model, req0, Some(&lm_retain))?;
            let label = lm_label(method);
            let v = json!({
                "seed": seed,
                "forget_acc": round(answer_accuracy(&model, req0, 256)?, 4),
                "forget_refusal": round(refusal_rate(&model, req0, &refusal, 256)?, 4),
                "heldout_domain_acc": round(answer_accuracy(&model, hold0, 256)?, 4),
                "retain_acc": round(answer_accuracy(&model, &retain, 256)?, 4),
                "retain_acc_before": round(retain_before, 4),
                "seconds": round(report.seconds, 3),
                "steps": report.steps,
                "weights_changed": report.weights_before != report.weights_after,
            });
            eprintln!("  {label}: {v}");
            lm_runs.entry(label).or_default().push(v);
        }

        // O3: three sequential requests.
        let mut model = clone_decoder(&base)?;
        let mut o3cfg = o.method.clone();
        o3cfg.train.seed = seed;
        o3cfg.detector.seed = seed;
        let mut unlearner = O3Unlearner::new(o3cfg)?;
        let mut steps = Vec::new();
        for (t, (domain, req, _hold)) in request_sets.iter().enumerate() {
            let report = unlearner.unlearn_with_negatives(
                &mut model,
                &format!("domain-{domain}"),
                req,
                if o.calibrate_negatives {
                    queries(&negatives)
                } else {
                    Vec::new()
                }
                .as_slice(),
            )?;
            let gated = unlearner.gated(&model);
            let mut forgotten = Vec::new();
            for (i, (d_i, req_i, hold_i)) in request_sets.iter().enumerate().take(t + 1) {
                forgotten.push(json!({
                    "request": i,
                    "domain": d_i,
                    "forget_acc": round(answer_accuracy(&gated, req_i, 256)?, 4),
                    "forget_refusal": round(refusal_rate(&gated, req_i, &refusal, 256)?, 4),
                    "forget_gate_on": round(gate_on_rate(&unlearner, &model, req_i, i)?, 4),
                    "heldout_acc": round(answer_accuracy(&gated, hold_i, 256)?, 4),
                    "heldout_refusal": round(refusal_rate(&gated, hold_i, &refusal, 256)?, 4),
                }));
            }
            let not_yet: Vec<usize> = request_sets.iter().skip(t + 1).map(|r| r.0).collect();
            let retain_after = answer_accuracy(&gated, &retain, 256)?;
            let not_yet_acc = if not_yet.is_empty() {
                Value::Null
            } else {
                let s = corpus.qa(&not_yet);
                json!({"before": round(answer_accuracy(&base, &s, 256)?, 4), "after": round(answer_accuracy(&gated, &s, 256)?, 4)})
            };
            // Detector t: held-out same-domain queries vs every other domain.
            let (_, req_t, hold_t) = &request_sets[t];
            let neg_domains: Vec<usize> = (0..corpus.domains()).filter(|&x| x != *domain).collect();
            let neg = corpus.qa(&neg_domains);
            let det = &unlearner.requests()[t].detector;
            let pos_scores = det.scores(&model, &queries(hold_t))?;
            let in_scores = det.scores(&model, &queries(req_t))?;
            let neg_scores = det.scores(&model, &queries(&neg))?;
            let auroc_heldout = auroc(&pos_scores, &neg_scores)?;
            let auroc_in = auroc(&in_scores, &neg_scores)?;
            let retain_gate_on: Vec<f64> = (0..=t)
                .map(|i| gate_on_rate(&unlearner, &model, &retain, i))
                .collect::<Result<_, _>>()?;
            let v = json!({
                "request": t,
                "domain": domain,
                "forget_examples": req.len(),
                "seconds": round(report.seconds, 3),
                "adapter_sha256": report.adapter.as_ref().map(|a| a.sha256.clone()),
                "detector_sha256": report.detector_sha256,
                "base_weights_unchanged": report.weights_before == report.weights_after,
                "adapter_loss_first_last": [round(report.metrics["first_loss"], 4), round(report.metrics["last_loss"], 4)],
                "orthogonality_penalty_before": round(report.metrics["orthogonality_penalty_before"], 6),
                "orthogonality_penalty_after": round(report.metrics["orthogonality_penalty_after"], 6),
                "orthogonality_penalty_total": round(unlearner.total_orthogonality_penalty()?, 6),
                "detector_negatives": negatives.len(),
                "detector_negative_floor": report.metrics.get("detector_negative_floor").map(|f| round(*f, 4)),
                "forgotten": forgotten,
                "retain_acc_before": round(retain_before, 4),
                "retain_acc_after": round(retain_after, 4),
                "retain_drop_points": round(100.0 * (retain_before - retain_after), 3),
                "retain_gate_on": retain_gate_on.iter().map(|x| round(*x, 4)).collect::<Vec<_>>(),
                "not_yet_forgotten_acc": not_yet_acc,
                "detector_auroc_heldout": round(auroc_heldout, 4),
                "detector_auroc_in_sample": round(auroc_in, 4),
            });
            eprintln!("  o3 request {t}: {v}");
            steps.push(v);
        }
        runs.push(json!({
            "seed": seed,
            "parameters": base.num_parameters(),
            "pretrain_seconds": round(pretrain_secs, 2),
            "pretrain_accuracy": round(acc_all, 4),
            "requests": steps,
        }));
    }
    // Aggregates over seeds.
    let collect =
        |f: &dyn Fn(&Value) -> Vec<f64>| -> Vec<f64> { runs.iter().flat_map(f).collect() };
    let aurocs = collect(&|r| {
        r["requests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["detector_auroc_heldout"].as_f64())
                    .collect()
            })
            .unwrap_or_default()
    });
    let worst_drop = collect(&|r| {
        vec![r["requests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["retain_drop_points"].as_f64())
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .unwrap_or(f64::NAN)]
    });
    let forget_acc = collect(&|r| {
        r["requests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .flat_map(|x| x["forgotten"].as_array().cloned().unwrap_or_default())
                    .filter_map(|f| f["forget_acc"].as_f64())
                    .collect()
            })
            .unwrap_or_default()
    });
    let forget_refusal = collect(&|r| {
        r["requests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .flat_map(|x| x["forgotten"].as_array().cloned().unwrap_or_default())
                    .filter_map(|f| f["forget_refusal"].as_f64())
                    .collect()
            })
            .unwrap_or_default()
    });
    let stat = |v: &[f64]| {
        let (m, s) = mean_std(v);
        json!({"mean": round(m, 4), "std": round(s, 4), "min": round(v.iter().copied().fold(f64::INFINITY, f64::min), 4), "max": round(v.iter().copied().fold(f64::NEG_INFINITY, f64::max), 4), "n": v.len()})
    };
    // Per request index, over seeds.
    let mut per_request = Vec::new();
    for t in 0..o.requests.len() {
        let at = |key: &str| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| r["requests"][t][key].as_f64())
                .collect()
        };
        let this_forget = |key: &str| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| r["requests"][t]["forgotten"][t][key].as_f64())
                .collect()
        };
        let all_forgotten = |key: &str| -> Vec<f64> {
            runs.iter()
                .flat_map(|r| {
                    r["requests"][t]["forgotten"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|f| f[key].as_f64())
                .collect()
        };
        per_request.push(json!({
            "request": t,
            "domain": o.requests[t],
            "forget_acc_this_request": stat(&this_forget("forget_acc")),
            "forget_refusal_this_request": stat(&this_forget("forget_refusal")),
            "forget_acc_all_forgotten": stat(&all_forgotten("forget_acc")),
            "forget_refusal_all_forgotten": stat(&all_forgotten("forget_refusal")),
            "retain_drop_points": stat(&at("retain_drop_points")),
            "detector_auroc_heldout": stat(&at("detector_auroc_heldout")),
            "orthogonality_penalty_before": stat(&at("orthogonality_penalty_before")),
            "orthogonality_penalty_after": stat(&at("orthogonality_penalty_after")),
            "orthogonality_penalty_total": stat(&at("orthogonality_penalty_total")),
        }));
    }
    let o3_out = json!({
        "per_request": per_request,
        "corpus": {"domains": corpus.domains(), "facts": corpus.facts().len(), "vocab": corpus.vocab().len(), "chance_accuracy": round(chance, 4)},
        "requests_domains": o.requests,
        "retain_domains": o.retain_domains,
        "negative_fraction": o.negative_fraction,
        "calibrate_negatives": o.calibrate_negatives,
        "max_false_positive": o.method.detector.max_false_positive,
        "detector_encoder": "the decoder's own hidden states (embeddings + every block), mean-pooled; see lethe_unlearn::o3::detector",
        "aggregate": {
            "detector_auroc_heldout": stat(&aurocs),
            "retain_drop_worst_request": stat(&worst_drop),
            "forget_acc_all_forgotten_sets": stat(&forget_acc),
            "forget_refusal_all_forgotten_sets": stat(&forget_refusal),
        },
        "runs": runs,
    });
    let mut lm_out = serde_json::Map::new();
    for (label, runs) in lm_runs {
        let mut agg = serde_json::Map::new();
        for key in [
            "forget_acc",
            "forget_refusal",
            "heldout_domain_acc",
            "retain_acc",
            "seconds",
        ] {
            let vals: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
            let (m, s) = mean_std(&vals);
            agg.insert(key.into(), json!({"mean": round(m, 4), "std": round(s, 4)}));
        }
        agg.insert("per_seed".into(), Value::Array(runs));
        lm_out.insert(label, Value::Object(agg));
    }
    Ok((
        o3_out,
        json!({
            "setting": "forget request 0's facts (80% of its domain) from the pretrained decoder, retain = all other domains; weights changed in place",
            "chance_accuracy": round(chance, 4),
            "methods": lm_out,
        }),
    ))
}

fn lm_label(m: &LmMethodConfig) -> String {
    match m {
        LmMethodConfig::Salun(c) => match &c.objective {
            lethe_unlearn::lm::salun::SalunObjective::Npo { .. } => "salun_npo".into(),
            lethe_unlearn::lm::salun::SalunObjective::Ga => "salun_ga".into(),
            lethe_unlearn::lm::salun::SalunObjective::Refusal { .. } => "salun_refusal".into(),
            lethe_unlearn::lm::salun::SalunObjective::RandomAnswer { .. } => {
                "salun_random_answer".into()
            }
        },
        LmMethodConfig::Npo(c) if c.retain_weight > 0.0 => "npo_rt".into(),
        other => other.method().name().into(),
    }
}

fn gate_on_rate(
    o3: &O3Unlearner,
    model: &Decoder,
    set: &TextSet,
    i: usize,
) -> Result<f64, BoxError> {
    let d = o3.decide(model, &queries(set))?;
    Ok(d.iter().filter(|g| g[i].gate > 0.0).count() as f64 / d.len().max(1) as f64)
}

// ---------------------------------------------------------------- output

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn fmt(v: &Value) -> String {
    match (v.get("mean"), v.get("std")) {
        (Some(m), Some(s)) => format!("{} ± {}", m, s),
        _ => v.to_string(),
    }
}

fn markdown(out: &Value) -> String {
    let mut s = String::new();
    s.push_str("# Unlearning evaluation (lethe-unlearn `eval_unlearning`)\n\n");
    s.push_str(&format!(
        "Config `{}`; CPU, {} cores (CANDLE_NUM_THREADS={}, RAYON_NUM_THREADS={}); total {} s; load average {}.\n\n",
        out["config_file"].as_str().unwrap_or("?"),
        out["cores"], out["CANDLE_NUM_THREADS"], out["RAYON_NUM_THREADS"], out["total_seconds"], out["load_average_1min"]
    ));
    if let Some(p) = out["sections_provenance"].as_object() {
        for (section, how) in p {
            s.push_str(&format!(
                "Section {section}: {}.\n\n",
                how.as_str().unwrap_or("?")
            ));
        }
    }
    s.push_str(
        "## Summary (targets in parentheses)\n\n| figure | value | target |\n|---|---|---|\n",
    );
    if let Some(map) = out["summary"].as_object() {
        for (k, v) in map.iter().filter(|(_, v)| !v.is_array()) {
            s.push_str(&format!(
                "| {k} | {v} | {} |\n",
                out["targets"][k].as_str().unwrap_or("")
            ));
        }
    }
    let sm = &out["summary"];
    if !sm["salun_random_avg_gap"].is_null() {
        s.push_str(&format!(
            "\nReading the random-forgetting figure: on digits, Retrain barely differs from the original model (the unchanged original's average gap to Retrain is {} on the reported seeds), so the selection on the selection seeds picks a gentle SalUn; its gap {} ± {} is only slightly below doing nothing. Stronger SalUn settings in the grid (more epochs or a larger learning rate) have larger gaps: see `selection.salun.grid` in the JSON.\n",
            sm["original_random_avg_gap"], sm["salun_random_avg_gap"], sm["salun_random_avg_gap_std"]
        ));
    }
    if !sm["o3_retain_utility_drop"].is_null() {
        s.push_str(&format!(
            "\nO3 retain utility drop = mean over seeds of each seed's worst request ({} points); the worst seed's is {} points. Held-out facts of a forgotten domain (seen by neither adapter nor detector) are only partly suppressed: see `heldout_acc` / `heldout_refusal` per request.\n",
            sm["o3_retain_utility_drop"], sm["o3_retain_utility_drop_max"]
        ));
    }
    if let Some(mia) = out["digits"]["mia"].as_str() {
        s.push_str(&format!("\nDigits MIA-efficacy: {mia}.\n"));
    }
    for scenario in ["random", "classwise"] {
        let sc = &out["digits"][scenario];
        if sc.is_null() {
            continue;
        }
        s.push_str(&format!(
            "\n## Digits, {scenario} forgetting ({}; TA on {})\n\nMean ± std over seeds; percentage points; run time in seconds.\n\n| method | UA | MIA-eff | RA | TA | avg gap | TA drop vs original | run time |\n|---|---|---|---|---|---|---|---|\n",
            sc["forget"].as_str().unwrap_or(""), sc["ta_set"].as_str().unwrap_or("")
        ));
        for name in ["retrain", "salun", "rl", "finetune", "ga", "original"] {
            let m = &sc["methods"][name];
            if m.is_null() {
                continue;
            }
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
                fmt(&m["ua"]),
                fmt(&m["mia"]),
                fmt(&m["ra"]),
                fmt(&m["ta"]),
                fmt(&m["avg_gap"]),
                fmt(&m["ta_drop_vs_original"]),
                fmt(&m["seconds"])
            ));
        }
        if let Some(sel) = sc["selection"].as_object() {
            s.push_str("\nSelected on the selection seeds: ");
            let parts: Vec<String> = sel
                .iter()
                .filter(|(k, _)| k.as_str() != "original_model")
                .map(|(k, v)| {
                    let mixed = if v["mixed"].as_bool() == Some(true) {
                        ", mixed passes"
                    } else {
                        ""
                    };
                    format!("{k} lr {} × {} epochs{mixed}", v["lr"], v["epochs"])
                })
                .collect();
            s.push_str(&parts.join("; "));
            s.push_str(&format!(
                ".\nMean average gap on the selection seeds: {}; the unchanged original model's: {}.\n",
                sel.iter()
                    .filter(|(k, _)| k.as_str() != "original_model")
                    .map(|(k, v)| format!("{k} {}", v["selection_avg_gap"]))
                    .collect::<Vec<_>>()
                    .join(", "),
                sel.get("original_model").map_or(Value::Null, |o| o["selection_avg_gap"].clone())
            ));
        }
    }
    let o3 = &out["o3"];
    if !o3.is_null() {
        s.push_str(&format!(
            "\n## O3 continual unlearning\n\nCorpus: {}. Requests forget domains {} in order; retain domains {}.\n\n",
            o3["corpus"], o3["requests_domains"], o3["retain_domains"]
        ));
        let a = &o3["aggregate"];
        s.push_str(&format!(
            "- detector AUROC (held-out same-domain queries vs all other domains): {}\n- retain utility drop, worst request per seed (points): {}\n- gated accuracy on every forgotten request set after each request: {}\n- gated refusal rate on the same: {}\n\n",
            a["detector_auroc_heldout"], a["retain_drop_worst_request"], a["forget_acc_all_forgotten_sets"], a["forget_refusal_all_forgotten_sets"]
        ));
        if o3["negative_fraction"].as_f64().unwrap_or(0.0) > 0.0 {
            s.push_str(&format!(
                "Detector negatives: {} of the retain domains' facts are held out of the retain evaluation; detectors {} calibrated on them (score floor passed by at most {} of them, kept below every score of the request's own queries).\n\n",
                o3["negative_fraction"],
                if o3["calibrate_negatives"].as_bool().unwrap_or(false) { "are" } else { "are not" },
                o3["max_false_positive"],
            ));
        }
        if let Some(ab) = out["o3_negatives_ablation"].as_object() {
            s.push_str("Negative-floor ablation (same retain evaluation set, mean / worst seed of each seed's worst request):\n\n| seeds | detectors | retain drop mean | retain drop worst | held-out forget refusal |\n|---|---|---|---|---|\n");
            for (name, v) in ab {
                if let Some(rows) = v.as_object() {
                    for (variant, r) in rows {
                        s.push_str(&format!(
                            "| {name} | {variant} | {} | {} | {} |\n",
                            r["retain_drop_mean"],
                            r["retain_drop_worst"],
                            r["heldout_refusal_mean"]
                        ));
                    }
                }
            }
            s.push('\n');
        }
        s.push_str("Per request (mean ± std over seeds):\n\n| request | domain | forget acc (all forgotten sets) | refusal (all forgotten sets) | retain drop (points) | detector AUROC | orth. penalty before | orth. penalty after |\n|---|---|---|---|---|---|---|---|\n");
        for r in o3["per_request"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["request"],
                r["domain"],
                fmt(&r["forget_acc_all_forgotten"]),
                fmt(&r["forget_refusal_all_forgotten"]),
                fmt(&r["retain_drop_points"]),
                fmt(&r["detector_auroc_heldout"]),
                fmt(&r["orthogonality_penalty_before"]),
                fmt(&r["orthogonality_penalty_after"])
            ));
        }
        s.push_str("\nPer seed and request:\n\n");
        s.push_str("| seed | request | forget acc (each forgotten set) | refusal | held-out domain acc | retain acc before → after | AUROC held-out | orth. penalty before → after |\n|---|---|---|---|---|---|---|---|\n");
        for run in o3["runs"].as_array().into_iter().flatten() {
            for r in run["requests"].as_array().into_iter().flatten() {
                let f = r["forgotten"].as_array().cloned().unwrap_or_default();
                let accs: Vec<String> = f.iter().map(|x| x["forget_acc"].to_string()).collect();
                let refs: Vec<String> = f.iter().map(|x| x["forget_refusal"].to_string()).collect();
                let held: Vec<String> = f.iter().map(|x| x["heldout_acc"].to_string()).collect();
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} → {} | {} | {} → {} |\n",
                    run["seed"],
                    r["request"],
                    accs.join(", "),
                    refs.join(", "),
                    held.join(", "),
                    r["retain_acc_before"],
                    r["retain_acc_after"],
                    r["detector_auroc_heldout"],
                    r["orthogonality_penalty_before"],
                    r["orthogonality_penalty_after"]
                ));
            }
        }
    }
    let lm = &out["lm_methods"];
    if let Some(methods) = lm["methods"].as_object() {
        s.push_str(&format!(
            "\n## Weight-level LM methods\n\n{} (chance {}).\n\n| method | forget acc | refusal | held-out domain acc | retain acc | run time (s) |\n|---|---|---|---|---|---|\n",
            lm["setting"].as_str().unwrap_or(""), lm["chance_accuracy"]
        ));
        for (k, m) in methods {
            s.push_str(&format!(
                "| {k} | {} | {} | {} | {} | {} |\n",
                fmt(&m["forget_acc"]),
                fmt(&m["forget_refusal"]),
                fmt(&m["heldout_domain_acc"]),
                fmt(&m["retain_acc"]),
                fmt(&m["seconds"])
            ));
        }
    }
    s
}
