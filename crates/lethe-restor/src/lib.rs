//! RESTOR-style evaluation of *restorative* unlearning (Rezaei et al.,
//! TMLR 2025, "RESTOR: Knowledge Recovery in Machine Unlearning"; code
//! `k1rezaei/restor`): does unlearning the documents that corrupted a
//! model return it to the knowledge it had before, or merely suppress the
//! corrupted answers?
//!
//! The protocol, on a synthetic world so that the ideal model exists:
//!
//! 1. [`world`] generates entities, typed relations, facts with one to
//!    three gold answers and Zipf-varied mention counts, the clean corpus,
//!    target entities, and corruption documents asserting plausible wrong
//!    values of the same type, in k-mixing variants (k true facts about
//!    other entities per document).
//! 2. [`pipeline`] trains a small decoder from scratch on the clean corpus
//!    (gate: target accuracy), continues training it on the corruption
//!    documents only (gate: target accuracy drops, other entities do not
//!    move), then applies each unlearning method of
//!    `lethe_unlearn` (GA, GradDiff, KL, NPO, SalUn-masked NPO, O3) seeing
//!    only the corruption documents (plus, for methods with a retain term,
//!    clean paragraphs about non-target entities). Every stage is
//!    checkpointed under a hash of the configuration it depends on.
//! 3. [`eval`] measures each model: greedy answers classified as gold /
//!    corrupted / other, locality, collateral, held-out perplexity and the
//!    logit analysis; [`metrics`] turns them into forgetting and recovery
//!    ratios, confidence buckets and statistics over seeds.
//! 4. [`report`] writes JSON, a Markdown summary with clean / corrupted /
//!    unlearned side by side, a statement of whether RESTOR's finding
//!    reproduces (computed from the numbers), and SVG figures.
//!
//! Entry point: [`run`] (or [`run_with_progress`]) with a TOML config
//! (`evals/restor/small.toml`) and an output folder.
//!
//! Design decisions: a word-level vocabulary over the generated world keeps
//! the model tiny, so the whole protocol runs on a CPU; the clean model is
//! the ideal reference (no retraining is needed because the corruption
//! documents are the only difference); accuracy is greedy generation with
//! exact match against the accepted answers, which replaces RESTOR's
//! GPT judge in a world whose answers are closed sets.

pub mod config;
mod error;
pub mod eval;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod world;

mod figures;

use std::path::Path;

pub use config::RestorConfig;
pub use error::{Error, Result};
pub use pipeline::{Progress, StageStatus};
pub use report::Report;

/// Runs the evaluation of `config` (TOML) and writes `report.json`,
/// `report.md` and the figures into `out_dir` (checkpoints go to the
/// config's `checkpoint_dir`, default `out_dir/stages`). Progress is only
/// logged through `tracing`; see [`run_with_progress`].
pub fn run(config: &Path, out_dir: &Path) -> Result<Report> {
    run_with_progress(config, out_dir, &mut |_| {})
}

/// [`run`] calling `progress` after every stage.
pub fn run_with_progress(
    config: &Path,
    out_dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report> {
    let cfg = RestorConfig::from_file(config)?;
    run_config(&cfg, &config.display().to_string(), out_dir, progress)
}

/// [`run_with_progress`] on an already-parsed configuration; `source`
/// names it in the report.
pub fn run_config(
    cfg: &RestorConfig,
    source: &str,
    out_dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report> {
    cfg.validate()?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(e, format!("creating {}", out_dir.display())))?;
    let checkpoints = match &cfg.checkpoint_dir {
        Some(d) => Path::new(d).to_path_buf(),
        None => out_dir.join("stages"),
    };
    let started = std::time::Instant::now();
    let load_before = report::load_average();
    let output = pipeline::run_stages(cfg, &checkpoints, progress)?;
    let report = Report::build(
        cfg,
        source,
        &output,
        started.elapsed().as_secs_f64(),
        load_before,
    )?;
    report.write(out_dir)?;
    figures::draw(&report, out_dir)?;
    Ok(report)
}

#[cfg(test)]
mod tests;
