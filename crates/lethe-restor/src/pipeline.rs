//! The staged pipeline: clean training, corruption per k, unlearning per
//! method, each stage checkpointed under a key that hashes what it
//! depends on, so a finished stage is loaded instead of recomputed.
//!
//! Stage keys (SHA-256 of canonical JSON; [`FORMAT_VERSION`] included so
//! that a change of what a stage stores invalidates old checkpoints):
//!
//! * clean: world config, model shape, clean training, seed;
//! * corrupt: the clean key, corruption training, k;
//! * method: the corrupt key, the method entry.
//!
//! Gate thresholds, the finding's criteria and `eval_batch` are not part of
//! any key: they do not change what a stage computes.
//!
//! A stage folder `<checkpoint_dir>/<kind>-<key prefix>/` holds the weights
//! (`model/` for decoders, `adapter/` + `detector.json` for O3, whose base
//! weights are the corrupted model's) and `stage.json` with the full key,
//! the hashed section and the stage's measurements. `stage.json` is
//! written last (through a temporary file and a rename), so its presence
//! with the right key means the stage finished.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use lethe_model::decoder::Decoder;
use lethe_model::lora::{LoraAdapter, LoraConfig};
use lethe_model::nn::{self, Mode};
use lethe_model::optim::{self, AdamW, AdamWConfig, CosineSchedule, Optimizer};
use lethe_unlearn::data::{TextExample, TextSet};
use lethe_unlearn::lm::{self, clone_decoder, FitReport, LmMethodConfig, LmTrainConfig};
use lethe_unlearn::o3::{AdapterSpec, O3Unlearner};
use lethe_unlearn::UnlearnReport;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{with_seed, MethodEntry, RestorConfig};
use crate::eval::{evaluate, target_accuracy, ModelEval};
use crate::metrics;
use crate::world::World;
use crate::{Error, Result};

/// Version of what stages store; part of every key.
pub const FORMAT_VERSION: u32 = 1;

/// Whether a stage ran or was loaded from its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Computed in this run.
    Computed,
    /// Loaded from a finished checkpoint.
    Loaded,
}

/// A progress event: one stage finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Stages finished so far, this one included.
    pub done: usize,
    /// Stages in the run.
    pub total: usize,
    /// What finished (`seed 0 k 2 NPO`).
    pub stage: String,
    /// Computed or loaded.
    pub status: StageStatus,
}

/// What a stage stores besides its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Seconds the stage took when computed (training + evaluation).
    pub seconds: f64,
    /// Seconds of the evaluation alone.
    pub eval_seconds: f64,
    /// Training loss summary (clean and corrupt stages).
    pub fit: Option<FitReport>,
    /// How the corruption went (corrupt stages).
    #[serde(default)]
    pub corruption: Option<CorruptionLog>,
    /// The method's report (method stages).
    pub unlearn: Option<UnlearnReport>,
    /// The measurements.
    pub eval: ModelEval,
}

#[derive(Serialize, Deserialize)]
struct StageFile<S, M> {
    format: u32,
    key: String,
    section: S,
    record: M,
}

/// SHA-256 (hex) of the canonical JSON of `value` with [`FORMAT_VERSION`].
pub fn stage_key<T: Serialize>(value: &T) -> Result<String> {
    let json = serde_json::to_vec(&(FORMAT_VERSION, value)).map_err(|e| Error::Checkpoint {
        path: String::new(),
        message: format!("cannot serialise a stage section: {e}"),
    })?;
    Ok(lethe_unlearn::hash::hash_bytes(&json))
}

/// The checkpoint folder of one stage.
pub fn stage_dir(root: &Path, kind: &str, key: &str) -> PathBuf {
    root.join(format!("{kind}-{}", &key[..key.len().min(16)]))
}

/// The record of a finished stage, if `dir` holds one with `key`.
pub fn load_record<M: DeserializeOwned>(dir: &Path, key: &str) -> Result<Option<M>> {
    let path = dir.join("stage.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(e, format!("reading {}", path.display())))?;
    let file: StageFile<serde_json::Value, M> =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if file.format != FORMAT_VERSION || file.key != key {
        tracing::warn!(path = %path.display(), "stage checkpoint has another key; recomputing");
        return Ok(None);
    }
    Ok(Some(file.record))
}

/// Writes a stage's record last, atomically.
pub fn save_record<S: Serialize, M: Serialize>(
    dir: &Path,
    key: &str,
    section: &S,
    record: &M,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
    let file = StageFile {
        format: FORMAT_VERSION,
        key: key.to_string(),
        section,
        record,
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Checkpoint {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    let tmp = dir.join("stage.json.tmp");
    std::fs::write(&tmp, json).map_err(|e| Error::io(e, format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, dir.join("stage.json"))
        .map_err(|e| Error::io(e, format!("renaming {}", tmp.display())))
}

/// One measured model of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRun {
    /// Seed.
    pub seed: u64,
    /// k variant (None for the clean model).
    pub k: Option<usize>,
    /// `clean`, `corrupted` or a method label.
    pub model: String,
    /// Checkpoint key.
    pub key: String,
    /// Computed or loaded.
    pub status: StageStatus,
    /// The stage record.
    pub record: StageRecord,
}

/// Everything the pipeline produced, before aggregation.
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    /// The world.
    pub world: World,
    /// Every measured model, in run order.
    pub runs: Vec<ModelRun>,
    /// Non-target facts of the collateral metric.
    pub nontarget: Vec<usize>,
    /// Mixed-in facts evaluated per k.
    pub mixed: BTreeMap<usize, Vec<usize>>,
}

fn docs_set(docs: &[Vec<u32>]) -> Result<TextSet> {
    Ok(TextSet::documents(docs)?)
}

/// Seed of a stage derived from the run seed and a label.
fn derive_seed(seed: u64, label: &str) -> u64 {
    let h = lethe_unlearn::hash::hash_bytes(format!("{seed}/{label}").as_bytes());
    u64::from_str_radix(&h[..16], 16).unwrap_or(seed)
}

fn with_train_seed(train: &LmTrainConfig, seed: u64) -> LmTrainConfig {
    let mut t = train.clone();
    t.seed = seed;
    t
}

/// Lazily loaded model of a finished stage.
struct Lazy {
    dir: PathBuf,
    model: Option<Decoder>,
}

impl Lazy {
    fn get(&mut self, device: &Device) -> Result<&Decoder> {
        if self.model.is_none() {
            self.model = Some(Decoder::load(&self.dir.join("model"), device)?);
        }
        self.model.as_ref().ok_or_else(|| Error::Checkpoint {
            path: self.dir.display().to_string(),
            message: "model not loaded".into(),
        })
    }
}

fn needs_retain(m: &LmMethodConfig) -> bool {
    match m {
        LmMethodConfig::Ga(_) => false,
        LmMethodConfig::GradDiff(_) | LmMethodConfig::Kl(_) => true,
        LmMethodConfig::Npo(c) => c.retain_weight > 0.0,
        LmMethodConfig::Salun(c) => c.retain_weight > 0.0,
        #[allow(unreachable_patterns)]
        _ => true,
    }
}

/// O3's forget set: every statement of the variant-`k` documents as a
/// question/answer pair (deduplicated, in first-seen order).
pub fn o3_forget_set(world: &World, k: usize) -> Result<TextSet> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for d in world.corruption() {
        for (fact, value) in d.statements(world, k) {
            if seen.insert((fact, value)) {
                let (prompt, answer) = world.statement(fact, value)?;
                let n = prompt.len();
                let mut ids = prompt;
                ids.extend(answer);
                out.push(TextExample::new(ids, n)?);
            }
        }
    }
    Ok(TextSet::new(out))
}

/// Runs every stage (see the module docs), calling `progress` after each.
pub fn run_stages(
    cfg: &RestorConfig,
    checkpoints: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PipelineOutput> {
    let device: Device = cfg
        .device
        .as_deref()
        .unwrap_or("cpu")
        .parse::<lethe_model::DeviceSpec>()?
        .open()?;
    tracing::info!(device = ?device, "RESTOR device");
    let world = World::generate(&cfg.world)?;
    let summary = world.summary();
    tracing::info!(?summary, "world generated");
    let dcfg = cfg.model.decoder(world.vocab().len(), world.max_doc_len());
    let clean_set = docs_set(world.clean_docs())?;
    let retain_set = docs_set(world.retain_docs())?;
    let nontarget = world.nontarget_facts();
    let mut mixed = BTreeMap::new();
    for &k in &cfg.ks {
        let mut m = world.mixed_facts(k);
        m.shuffle(&mut StdRng::seed_from_u64(
            cfg.world.seed ^ 0x3A1E ^ k as u64,
        ));
        m.truncate(cfg.world.nontarget_eval);
        m.sort_unstable();
        mixed.insert(k, m);
    }
    let other: Vec<usize> = nontarget
        .iter()
        .chain(mixed.values().flatten())
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let all_values: Vec<Vec<u32>> = world
        .types()
        .iter()
        .flat_map(|t| t.values.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let total = cfg.seeds.len() * (1 + cfg.ks.len() * (1 + cfg.methods.len()));
    let mut done = 0usize;
    let mut runs = Vec::with_capacity(total);
    let mut report = |runs: &mut Vec<ModelRun>,
                      run: ModelRun,
                      progress: &mut dyn FnMut(Progress)| {
        done += 1;
        let stage = match run.k {
            None => format!("seed {} clean", run.seed),
            Some(k) => format!("seed {} k {} {}", run.seed, k, run.model),
        };
        tracing::info!(stage = %stage, status = ?run.status, seconds = run.record.seconds, "stage finished");
        progress(Progress {
            done,
            total,
            stage,
            status: run.status,
        });
        runs.push(run);
    };
    let eval = |scorer: &dyn lethe_unlearn::lm_eval::Scorer| -> Result<(ModelEval, f64)> {
        let t = Instant::now();
        let e = evaluate(scorer, &world, &other, cfg.eval_batch)?;
        Ok((e, t.elapsed().as_secs_f64()))
    };
    for &seed in &cfg.seeds {
        // Clean.
        let clean_train = with_train_seed(&cfg.clean.train, derive_seed(seed, "clean"));
        let clean_section = (&cfg.world, &cfg.model, &clean_train, seed);
        let clean_key = stage_key(&clean_section)?;
        let clean_dir = stage_dir(checkpoints, "clean", &clean_key);
        let mut clean = Lazy {
            dir: clean_dir.clone(),
            model: None,
        };
        let (record, status) = match load_record::<StageRecord>(&clean_dir, &clean_key)? {
            Some(r) => (r, StageStatus::Loaded),
            None => {
                let t = Instant::now();
                let _span = tracing::info_span!("clean", seed).entered();
                let model = Decoder::new(dcfg.clone(), &device, derive_seed(seed, "init"))?;
                let fit = lm::fit(&model, &clean_set, &clean_train)?;
                model.save(&clean_dir.join("model"))?;
                let (e, es) = eval(&model)?;
                let r = StageRecord {
                    seconds: t.elapsed().as_secs_f64(),
                    eval_seconds: es,
                    fit: Some(fit),
                    corruption: None,
                    unlearn: None,
                    eval: e,
                };
                save_record(&clean_dir, &clean_key, &clean_section, &r)?;
                clean.model = Some(model);
                (r, StageStatus::Computed)
            }
        };
        let clean_acc = metrics::summarize(&record.eval, &[], &[]).target_accuracy;
        report(
            &mut runs,
            ModelRun {
                seed,
                k: None,
                model: "clean".into(),
                key: clean_key.clone(),
                status,
                record,
            },
            progress,
        );
        for &k in &cfg.ks {
            let corrupt_set = docs_set(
                &world
                    .corruption()
                    .iter()
                    .map(|d| d.tokens(k))
                    .collect::<Vec<_>>(),
            )?;
            let corrupt_train = with_train_seed(
                &cfg.corrupt_train(k),
                derive_seed(seed, &format!("corrupt/{k}")),
            );
            let corrupt_section = (
                &clean_key,
                &corrupt_train,
                k,
                &cfg.corrupt.lora,
                &cfg.corrupt.freeze,
                &cfg.corrupt.early_stop,
            );
            let corrupt_key = stage_key(&corrupt_section)?;
            let corrupt_dir = stage_dir(checkpoints, "corrupt", &corrupt_key);
            let mut corrupted = Lazy {
                dir: corrupt_dir.clone(),
                model: None,
            };
            let (record, status) = match load_record::<StageRecord>(&corrupt_dir, &corrupt_key)? {
                Some(r) => (r, StageStatus::Loaded),
                None => {
                    let t = Instant::now();
                    let _span = tracing::info_span!("corrupt", seed, k).entered();
                    let base = clean.get(&device)?;
                    let mut measure = |m: &Decoder| target_accuracy(m, &world, cfg.eval_batch);
                    let stop = cfg.corrupt.early_stop.as_ref().map(|e| StopCheck {
                        every: e.every,
                        stop_at_or_below: clean_acc - e.drop,
                        target_accuracy: &mut measure,
                    });
                    let (model, fit, log) = fit_corruption(
                        base,
                        &corrupt_set,
                        &corrupt_train,
                        cfg.corrupt.lora.as_ref(),
                        &cfg.corrupt.freeze,
                        stop,
                    )?;
                    model.save(&corrupt_dir.join("model"))?;
                    let (e, es) = eval(&model)?;
                    let r = StageRecord {
                        seconds: t.elapsed().as_secs_f64(),
                        eval_seconds: es,
                        fit: Some(fit),
                        corruption: Some(log),
                        unlearn: None,
                        eval: e,
                    };
                    save_record(&corrupt_dir, &corrupt_key, &corrupt_section, &r)?;
                    corrupted.model = Some(model);
                    (r, StageStatus::Computed)
                }
            };
            report(
                &mut runs,
                ModelRun {
                    seed,
                    k: Some(k),
                    model: "corrupted".into(),
                    key: corrupt_key.clone(),
                    status,
                    record,
                },
                progress,
            );
            for entry in &cfg.methods {
                let method_seed = derive_seed(seed, &format!("{}/{k}", entry.label));
                let method_section = (&corrupt_key, entry, method_seed);
                let key = stage_key(&method_section)?;
                let dir = stage_dir(checkpoints, "method", &key);
                let (record, status) = match load_record::<StageRecord>(&dir, &key)? {
                    Some(r) => (r, StageStatus::Loaded),
                    None => {
                        let t = Instant::now();
                        let _span = tracing::info_span!("unlearn", seed, k, method = %entry.label)
                            .entered();
                        let base = corrupted.get(&device)?;
                        let (report_u, e, es) = run_method(
                            entry,
                            method_seed,
                            base,
                            &corrupt_set,
                            &retain_set,
                            &world,
                            k,
                            &all_values,
                            &dir,
                            &eval,
                        )?;
                        let r = StageRecord {
                            seconds: t.elapsed().as_secs_f64(),
                            eval_seconds: es,
                            fit: None,
                            corruption: None,
                            unlearn: Some(report_u),
                            eval: e,
                        };
                        save_record(&dir, &key, &method_section, &r)?;
                        (r, StageStatus::Computed)
                    }
                };
                report(
                    &mut runs,
                    ModelRun {
                        seed,
                        k: Some(k),
                        model: entry.label.clone(),
                        key,
                        status,
                        record,
                    },
                    progress,
                );
            }
        }
    }
    Ok(PipelineOutput {
        world,
        runs,
        nontarget,
        mixed,
    })
}

/// How a corruption run went, beyond its loss summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptionLog {
    /// Trainable parameters (adapter parameters with LoRA).
    pub trained_parameters: usize,
    /// Frozen parameters (0 with LoRA: the whole base counts as fixed).
    pub frozen_parameters: usize,
    /// `(optimiser steps so far, target accuracy)` at every early-stop
    /// check.
    pub checks: Vec<(usize, f64)>,
    /// Whether a check ended training before its step budget.
    pub stopped_early: bool,
}

/// The early-stop check of [`fit_corruption`].
pub struct StopCheck<'a> {
    /// Optimiser steps between checks (> 0).
    pub every: usize,
    /// Training ends once the target accuracy is at most this.
    pub stop_at_or_below: f64,
    /// Measures the target accuracy of the model being trained.
    pub target_accuracy: &'a mut dyn FnMut(&Decoder) -> Result<f64>,
}

/// Continued pre-training of a copy of `base` on `data` (the corruption):
/// AdamW, one shuffled pass per epoch, NLL on every document token.
///
/// With `lora`, an adapter is trained and merged into the weights
/// (RESTOR's recipe); otherwise every parameter whose name contains none
/// of the `freeze` patterns is trained. With `stop`, the target accuracy is
/// measured every `stop.every` steps and training ends as soon as it is
/// at most `stop.stop_at_or_below`.
pub fn fit_corruption(
    base: &Decoder,
    data: &TextSet,
    train: &LmTrainConfig,
    lora: Option<&AdapterSpec>,
    freeze: &[String],
    mut stop: Option<StopCheck<'_>>,
) -> Result<(Decoder, FitReport, CorruptionLog)> {
    train.validate()?;
    if data.is_empty() {
        return Err(Error::InvalidConfig("no documents to train on".into()));
    }
    if let Some(s) = &stop {
        if s.every == 0 {
            return Err(Error::InvalidConfig(
                "the early-stop interval must be > 0".into(),
            ));
        }
    }
    let mut model = clone_decoder(base)?;
    let mut log = CorruptionLog {
        trained_parameters: 0,
        frozen_parameters: 0,
        checks: Vec::new(),
        stopped_early: false,
    };
    let vars = match lora {
        Some(spec) => {
            if !freeze.is_empty() {
                return Err(Error::InvalidConfig(
                    "freezing applies to full fine-tuning only, not with LoRA".into(),
                ));
            }
            let config = LoraConfig {
                rank: spec.rank,
                alpha: spec.alpha,
                dropout: spec.dropout,
                targets: spec.targets.clone(),
            };
            let adapter = LoraAdapter::new(&model, "corruption", config, train.seed)?;
            model.attach_adapter(&adapter)?;
            model.set_base_trainable(false);
            adapter.vars()
        }
        None => {
            let mut vars = Vec::new();
            for (name, var) in model.named_vars() {
                if freeze.iter().any(|p| name.contains(p.as_str())) {
                    log.frozen_parameters += var.elem_count();
                } else {
                    vars.push(var);
                }
            }
            if vars.is_empty() {
                return Err(Error::InvalidConfig(
                    "corrupt.freeze leaves no parameter to train".into(),
                ));
            }
            vars
        }
    };
    log.trained_parameters = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: train.lr,
            weight_decay: train.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let total = data.len().div_ceil(train.batch_size) * train.epochs;
    let total = train.max_steps.map_or(total, |m| m.min(total));
    let schedule = if train.cosine || train.warmup_steps > 0 {
        let min = if train.cosine { 0.0 } else { train.lr };
        Some(CosineSchedule::new(
            train.lr,
            min,
            train.warmup_steps.min(total as u64),
            total as u64,
        )?)
    } else {
        None
    };
    let mut fit = FitReport {
        steps: 0,
        first_loss: f32::NAN,
        last_loss: f32::NAN,
    };
    'outer: for epoch in 0..train.epochs {
        let order = lethe_unlearn::data::shuffled(
            data.len(),
            train.seed ^ (epoch as u64).wrapping_mul(0x9E37),
        );
        for chunk in order.chunks(train.batch_size) {
            if fit.steps >= total {
                break 'outer;
            }
            if let Some(s) = &schedule {
                opt.set_learning_rate(s.lr_at(fit.steps as u64));
            }
            let b = data.batch(chunk, model.device())?;
            let logits = model.forward(&b.ids, Mode::Train)?;
            let loss = nn::causal_lm_loss(&logits, &b.ids, Some(&b.loss_mask))?;
            let step = optim::train_step(&mut opt, &loss, train.max_grad_norm)?;
            if fit.steps == 0 {
                fit.first_loss = step.loss;
            }
            fit.last_loss = step.loss;
            fit.steps += 1;
            if let Some(s) = stop.as_mut() {
                if fit.steps % s.every == 0 && fit.steps < total {
                    let acc = (s.target_accuracy)(&model)?;
                    log.checks.push((fit.steps, acc));
                    if acc <= s.stop_at_or_below {
                        log.stopped_early = true;
                        break 'outer;
                    }
                }
            }
        }
    }
    if lora.is_some() {
        model.merge_adapter("corruption")?;
        let merged = clone_decoder(&model)?;
        merged.set_base_trainable(true);
        return Ok((merged, fit, log));
    }
    Ok((model, fit, log))
}

type EvalFn<'a> = dyn Fn(&dyn lethe_unlearn::lm_eval::Scorer) -> Result<(ModelEval, f64)> + 'a;

/// Runs one method on a copy of `base` and evaluates the result.
#[allow(clippy::too_many_arguments)]
fn run_method(
    entry: &MethodEntry,
    seed: u64,
    base: &Decoder,
    forget: &TextSet,
    retain: &TextSet,
    world: &World,
    k: usize,
    all_values: &[Vec<u32>],
    dir: &Path,
    eval: &EvalFn<'_>,
) -> Result<(UnlearnReport, ModelEval, f64)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
    let mut model = clone_decoder(base)?;
    match (&entry.lm, &entry.o3) {
        (Some(lm_cfg), None) => {
            let m = with_seed(lm_cfg, seed);
            let r = m.unlearn(&model, forget, needs_retain(&m).then_some(retain))?;
            model.save(&dir.join("model"))?;
            let (e, es) = eval(&model)?;
            Ok((r, e, es))
        }
        (None, Some(spec)) => {
            let o3_forget = o3_forget_set(world, k)?;
            let mut o3 = O3Unlearner::new(spec.o3_config(seed, all_values))?;
            let r = o3.unlearn(&mut model, "restor", &o3_forget)?;
            for req in o3.requests() {
                req.adapter.save(&dir.join("adapter"))?;
                let json = serde_json::to_vec(&req.detector).map_err(|e| Error::Checkpoint {
                    path: dir.display().to_string(),
                    message: e.to_string(),
                })?;
                std::fs::write(dir.join("detector.json"), json)
                    .map_err(|e| Error::io(e, format!("writing {}", dir.display())))?;
            }
            let gated = o3.gated(&model);
            let (e, es) = eval(&gated)?;
            Ok((r, e, es))
        }
        _ => Err(Error::InvalidConfig(format!(
            "method {:?} needs exactly one of `lm` and `o3`",
            entry.label
        ))),
    }
}

#[cfg(test)]
mod tests;
