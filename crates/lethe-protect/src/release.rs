//! Protecting a dataset on disk: load, protect, write the release in the
//! source's format, and a `manifest.json` that makes the release
//! verifiable (which method, which parameters, which seed, which input
//! file became which output file, and how much each image changed).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Format};
use crate::formats::{self, DataSource, WrittenFile};
use crate::metrics::{ImageQuality, QualitySummary};
use crate::protect::{self, Estimate, ProtectParams, RoundLog, RunControl, StopReason};
use crate::{Error, Result};

/// File name of the manifest in an output folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What `lethe protect` does: one dataset in, one protected release out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectConfig {
    /// The dataset to protect.
    pub source: DataSource,
    /// The output folder (created; must be empty unless `overwrite`, and
    /// must not be inside the source folder).
    pub output: PathBuf,
    /// Method and parameters.
    pub params: ProtectParams,
    /// Where to checkpoint after every round (default: none).
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Resume from `checkpoint_dir`.
    #[serde(default)]
    pub resume: bool,
    /// Allow writing into a non-empty output folder.
    #[serde(default)]
    pub overwrite: bool,
    /// Progress bar with ETA on stderr.
    #[serde(default)]
    pub progress: bool,
}

/// The summary `protect` returns (and the manifest's header).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProtectReport {
    /// Dataset name.
    pub dataset: String,
    /// Images protected.
    pub images: usize,
    /// Method label (`salm eps=8.0/255 rho=0.10 (...)`).
    pub method: String,
    /// Whether the stop rule fired (false: paused, resumable).
    pub finished: bool,
    /// Why it stopped.
    pub stop_reason: Option<StopReason>,
    /// Rounds run.
    pub rounds: usize,
    /// The round whose noise was released (see `ProtectParams::release`).
    pub released_round: usize,
    /// Wall time of the optimisation (seconds, across resumes).
    pub seconds: f64,
    /// Noise steps taken (images x steps).
    pub image_steps: u64,
    /// Throughput of the optimisation.
    pub image_steps_per_second: f64,
    /// Quality of the release against the input.
    pub quality: QualitySummary,
    /// The output folder (`None` when paused: nothing is written).
    pub output: Option<PathBuf>,
    /// Files written (relative to `output`).
    pub files: usize,
}

/// `manifest.json`: provenance of a protected release.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// Always `lethe-protect`.
    pub tool: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// Seconds since the Unix epoch when written.
    pub created_unix: u64,
    /// The run summary.
    pub report: ProtectReport,
    /// Every parameter, the seed included.
    pub params: ProtectParams,
    /// Where the data came from.
    pub source: String,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// One entry per image.
    pub items: Vec<ManifestItem>,
    /// Round-by-round log.
    pub rounds: Vec<RoundLog>,
    /// Caveats that travel with the release.
    pub warnings: Vec<String>,
}

/// One image of the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestItem {
    /// Source file relative to the source folder (`None` inside an array).
    pub source: Option<PathBuf>,
    /// SHA-256 of the source file.
    pub source_sha256: Option<String>,
    /// Output file (relative to the output folder).
    pub output: Option<PathBuf>,
    /// SHA-256 of the output file.
    pub output_sha256: Option<String>,
    /// Class name.
    pub class: String,
    /// Quality against the source.
    pub quality: ImageQuality,
}

fn check_output(cfg: &ProtectConfig) -> Result<()> {
    let out = &cfg.output;
    if let DataSource::Folder { path } | DataSource::Npy { path, .. } = &cfg.source {
        let (src, dst) = (canonical(path), canonical(out));
        if dst.starts_with(&src) || (path.is_file() && Some(dst.as_path()) == src.parent()) {
            return Err(Error::Config(format!(
                "output {} must not be the source or inside it",
                out.display()
            )));
        }
    }
    if out.exists() && !cfg.overwrite {
        let non_empty = std::fs::read_dir(out)
            .map_err(|e| Error::io(e, format!("listing {}", out.display())))?
            .next()
            .is_some();
        if non_empty {
            return Err(Error::Config(format!(
                "output {} is not empty (set overwrite to write into it)",
                out.display()
            )));
        }
    }
    Ok(())
}

/// The absolute form of a path that may not exist yet.
fn canonical(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
            canonical(parent).join(name)
        }
        _ => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Protects the dataset of `cfg.source` and writes the release to
/// `cfg.output`.
pub fn protect(cfg: &ProtectConfig) -> Result<ProtectReport> {
    protect_with(cfg, None, None)
}

/// [`protect()`] that may pause after `pause_after_rounds` rounds (nothing is
/// written then; resume with `resume: true`) and can be cancelled.
pub fn protect_with(
    cfg: &ProtectConfig,
    pause_after_rounds: Option<usize>,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<ProtectReport> {
    cfg.params.validate()?;
    if cfg.resume && cfg.checkpoint_dir.is_none() {
        return Err(Error::Config("resume needs a checkpoint_dir".into()));
    }
    check_output(cfg)?;
    let data = formats::load(&cfg.source)?;
    let control = RunControl {
        checkpoint_dir: cfg.checkpoint_dir.clone(),
        resume: cfg.resume,
        pause_after_rounds,
        cancel,
        progress: cfg.progress,
    };
    let result = protect::protect_dataset(&data, &cfg.params, &control)?;
    let mut report = ProtectReport {
        dataset: data.name().to_string(),
        images: data.len(),
        method: cfg.params.label(),
        finished: result.finished,
        stop_reason: result.stop_reason,
        rounds: result.rounds.len(),
        released_round: result.released_round,
        seconds: result.seconds,
        image_steps: result.image_steps,
        image_steps_per_second: result.image_steps as f64 / result.seconds.max(1e-9),
        quality: result.quality.clone(),
        output: None,
        files: 0,
    };
    if !result.finished {
        return Ok(report);
    }
    let written = formats::write(&result.protected, &cfg.output)?;
    report.output = Some(cfg.output.clone());
    report.files = written.len();
    let manifest = manifest(&data, cfg, &report, &result, &written);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Unsupported(format!("serialising the manifest: {e}")))?;
    let path = cfg.output.join(MANIFEST_FILE);
    std::fs::write(&path, json).map_err(|e| Error::io(e, format!("writing {}", path.display())))?;
    Ok(report)
}

fn manifest(
    data: &Dataset,
    cfg: &ProtectConfig,
    report: &ProtectReport,
    result: &protect::Protection,
    written: &[WrittenFile],
) -> Manifest {
    let per_file = written.len() == data.len();
    let items = (0..data.len())
        .map(|i| {
            let item = &data.items()[i];
            ManifestItem {
                source: item.path.clone(),
                source_sha256: item.sha256.clone(),
                output: per_file.then(|| written[i].path.clone()),
                output_sha256: per_file.then(|| written[i].sha256.clone()),
                class: data.classes()[data.labels()[i] as usize].clone(),
                quality: result.per_image[i],
            }
        })
        .collect();
    let mut warnings = vec![
        "Re-encoding with a lossy codec (JPEG) or heavy filtering is itself a countermeasure: \
         release the files exactly as written."
            .to_string(),
        "Protection was only measured on this tool's audit models; run `lethe protect audit` \
         and read its robustness table before relying on it."
            .to_string(),
    ];
    if matches!(data.format(), Format::Npy(_)) && !per_file {
        warnings.push("array output: per-image output hashes are not defined".into());
    }
    Manifest {
        tool: "lethe-protect",
        version: env!("CARGO_PKG_VERSION"),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        report: report.clone(),
        params: cfg.params.clone(),
        source: format!("{:?}", cfg.source),
        classes: data.classes().to_vec(),
        items,
        rounds: result.rounds.clone(),
        warnings,
    }
}

/// Dry run: loads the data, times a few steps and extrapolates.
pub fn estimate(cfg: &ProtectConfig) -> Result<Estimate> {
    let data = formats::load(&cfg.source)?;
    protect::estimate_dataset(&data, &cfg.params)
}

#[cfg(test)]
mod tests;
