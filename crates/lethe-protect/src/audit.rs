//! `lethe protect audit`: does the protection actually work, and what
//! defeats it?
//!
//! The protocol of the research notes (section 6): split the data into
//! train and test *before* protecting; protect only the training split
//! with every configured method; train fresh victims (several
//! architectures, several seeds, random initialisation) on the clean and on
//! each protected training split and measure test accuracy on the clean
//! test split; then retrain one victim per method under every countermeasure
//! of the robustness suite ([`crate::defence`]). Image quality (PSNR, SSIM,
//! L-inf, L0) is measured on the released (quantised) images.
//!
//! A release already written by `lethe protect` can be audited as it is
//! (`releases`): it is read back, checked against the clean data it claims
//! to protect ([`crate::release::read_release`]), and its training-split
//! images face the same victims; its held-out images are never trained on,
//! and the victims are tested on their clean versions.
//!
//! Accuracies are the **peak over epochs** (the attacker may early-stop on
//! a clean validation set) averaged over architectures and seeds; the final
//! values, the spread and each run are in the report too. The headline
//! `summary` names the dataset, the clean, SALM and EM accuracies, SALM's
//! PSNR, epsilon and rho, and whether the acceptance bar (clean >=
//! 0.9, SALM <= 0.3, eps <= 8/255, rho <= 0.25, PSNR >= 30 dB) is met. The
//! report states what it measured, never more: a failed bar is written as
//! failed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, ImageShape};
use crate::defence::Defence;
use crate::figures;
use crate::formats::{self, DataSource};
use crate::metrics::QualitySummary;
use crate::model::Arch;
use crate::protect::{self, Method, ProtectParams, RoundLog, RunControl, StopReason};
use crate::sources::ClassSignal;
use crate::victim::{train_victim, VictimConfig, VictimRun};
use crate::{Error, Result};

/// One protection method of an audit, under a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodRun {
    /// A unique name (`salm`, `em`, `salm-eps16`, ...).
    pub name: String,
    /// Its parameters.
    pub params: ProtectParams,
}

/// A release made earlier by `lethe protect`, audited as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRun {
    /// A unique name among methods and releases.
    pub name: String,
    /// The release: its output folder, or the array file inside it.
    pub source: DataSource,
}

/// Which victims face which countermeasures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobustnessConfig {
    /// The suite.
    pub defences: Vec<Defence>,
    /// Methods that face it (empty: all).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Index into the audit's `victims` of the architecture used.
    #[serde(default)]
    pub arch: usize,
    /// Victim seed.
    #[serde(default)]
    pub seed: u64,
}

/// Method names the headline summary reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Headline {
    /// The SALM run.
    pub salm: String,
    /// The EM run at the same epsilon (optional).
    #[serde(default)]
    pub em: Option<String>,
}

/// Everything an audit does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The dataset.
    pub source: DataSource,
    /// Fraction held out as the clean test split.
    pub test_fraction: f64,
    /// Seed of the stratified split.
    pub split_seed: u64,
    /// Protection methods, crafted on the training split.
    #[serde(default)]
    pub methods: Vec<MethodRun>,
    /// Releases of the same data written earlier, audited as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<ReleaseRun>,
    /// Victim architectures (at least one).
    pub victims: Vec<Arch>,
    /// Victim seeds (at least one).
    pub seeds: Vec<u64>,
    /// Victim training.
    pub victim: VictimConfig,
    /// The robustness suite (`None`: skipped).
    #[serde(default)]
    pub robustness: Option<RobustnessConfig>,
    /// Names for the summary.
    pub headline: Headline,
    /// Where `report.json`, `report.md` and `figures/` go (`None`: nothing
    /// is written).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N` for the victims.
    #[serde(default = "default_device")]
    pub device: String,
    /// Progress bars on stderr.
    #[serde(default)]
    pub progress: bool,
}

fn default_device() -> String {
    "cpu".into()
}

/// The headline numbers (`report.json`'s top-level `summary`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Dataset name.
    pub dataset: String,
    /// Mean peak test accuracy of victims trained on clean data.
    pub clean_acc: f64,
    /// The same for the SALM release.
    pub salm_acc: f64,
    /// The same for the EM release (if audited).
    pub em_acc: Option<f64>,
    /// Highest peak accuracy of any SALM victim (worst case over
    /// architectures and seeds).
    pub salm_acc_worst: f64,
    /// Mean per-image PSNR of the SALM release (dB).
    pub salm_psnr_db: Option<f64>,
    /// Mean per-image PSNR of the EM release (dB).
    pub em_psnr_db: Option<f64>,
    /// SALM's L-inf budget as a fraction of full scale.
    pub eps: f64,
    /// SALM's pixel fraction.
    pub rho: f64,
    /// Normalised unlearnability `(clean - salm) / (clean - chance)`;
    /// `None` when clean victims are within [`MIN_LEARNED`] of chance
    /// (nothing was learned that protection could take away).
    pub salm_unlearnability: Option<f64>,
    /// Worst SALM peak accuracy over the robustness suite.
    pub salm_acc_worst_defence: Option<f64>,
    /// The countermeasure that reached it.
    pub worst_defence: Option<String>,
    /// clean >= 0.9, salm <= 0.3, eps <= 8/255, rho <= 0.25, PSNR >= 30.
    pub meets_acceptance: bool,
}

/// Facts about the audited data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetInfo {
    /// Name.
    pub name: String,
    /// Image shape.
    pub shape: ImageShape,
    /// Class names.
    pub classes: Vec<String>,
    /// Training images (protected).
    pub train: usize,
    /// Test images (clean).
    pub test: usize,
    /// Fraction of exactly-zero pixel values in the training split (how
    /// sparse the data is).
    pub zero_fraction: f64,
    /// Test images per class.
    pub test_per_class: Vec<usize>,
    /// The chance level: the test accuracy of always answering the most
    /// frequent test class (`1 / classes` when they are balanced).
    pub chance: f64,
    /// Generated lesions only: what each class's lesions add to their
    /// images, over every generated image ([`crate::sources::lesion_class_signal`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_signal: Option<Vec<ClassSignal>>,
}

/// The protection run of one method.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodResult {
    /// Name.
    pub name: String,
    /// Label with the main parameters.
    pub label: String,
    /// Parameters.
    pub params: ProtectParams,
    /// Rounds run.
    pub rounds: usize,
    /// Why it stopped.
    pub stop_reason: Option<StopReason>,
    /// The round whose noise was released (see `ProtectParams::release`).
    pub released_round: usize,
    /// Wall time of the protection.
    pub seconds: f64,
    /// Noise steps (images x steps).
    pub image_steps: u64,
    /// Throughput.
    pub image_steps_per_second: f64,
    /// Quality of the release.
    pub quality: QualitySummary,
    /// Round log.
    pub round_log: Vec<RoundLog>,
    /// Where the release was read from, when it was not crafted by the
    /// audit (its time and steps are then those of the whole release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// One victim run, tagged with the training data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VictimRow {
    /// `clean` or a method name.
    pub data: String,
    /// The run.
    #[serde(flatten)]
    pub run: VictimRun,
}

/// Accuracy of one training set on one architecture over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccuracyRow {
    /// `clean` or a method name.
    pub data: String,
    /// Architecture label.
    pub arch: String,
    /// Seeds.
    pub runs: usize,
    /// Mean of the peak test accuracies.
    pub peak_mean: f64,
    /// Smallest and largest peak.
    pub peak_range: (f64, f64),
    /// Mean final test accuracy.
    pub final_mean: f64,
    /// Mean accuracy on the training images as trained on.
    pub train_mean: f64,
    /// Recall of each class (fraction of its test images predicted as
    /// it) at each run's peak epoch, mean over runs: what a victim stopped
    /// early still learns.
    pub recall_peak: Vec<f64>,
    /// The same after the last epoch.
    pub recall_final: Vec<f64>,
    /// Precision of each class (fraction of the test images predicted as
    /// it that are of it) at the peak epoch, mean over runs; a class never
    /// predicted has precision 0.
    pub precision_peak: Vec<f64>,
}

/// One countermeasure against every audited training set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RobustnessRow {
    /// Defence label.
    pub defence: String,
    /// `None` when it does not apply (grayscale on grayscale data).
    pub not_applicable: Option<String>,
    /// `(data, peak, final)` per training set.
    pub results: Vec<(String, f64, f64)>,
}

/// The full audit result (`report.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    /// Headline numbers.
    pub summary: Summary,
    /// The data.
    pub dataset: DatasetInfo,
    /// The configuration that produced this report.
    pub config: AuditConfig,
    /// Protection runs.
    pub methods: Vec<MethodResult>,
    /// Accuracy table (training set x architecture).
    pub accuracy: Vec<AccuracyRow>,
    /// Robustness table.
    pub robustness: Vec<RobustnessRow>,
    /// Every victim run.
    pub victims: Vec<VictimRow>,
    /// Files written (relative to `out_dir`).
    pub files: Vec<String>,
    /// Observations generated from the numbers (failed bars, caveats).
    pub notes: Vec<String>,
    /// Total wall time.
    pub wall_seconds: f64,
    /// Where it ran.
    pub environment: Environment,
}

/// Where an audit ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Environment {
    /// Device.
    pub device: String,
    /// Available cores.
    pub cores: usize,
    /// Crate version.
    pub version: &'static str,
}

impl AuditConfig {
    fn validate(&self) -> Result<()> {
        if (self.methods.is_empty() && self.releases.is_empty())
            || self.victims.is_empty()
            || self.seeds.is_empty()
        {
            return Err(Error::Config(
                "an audit needs at least one method or release, victim architecture and seed"
                    .into(),
            ));
        }
        let names: Vec<&str> = self
            .methods
            .iter()
            .map(|m| m.name.as_str())
            .chain(self.releases.iter().map(|r| r.name.as_str()))
            .collect();
        let known = |n: &str| names.contains(&n);
        let mut sorted = names.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) || sorted.contains(&"clean") {
            return Err(Error::Config(
                "method and release names must be unique and not `clean`".into(),
            ));
        }
        if let Some(bad) = names.iter().find(|n| {
            n.trim().is_empty() || n.chars().any(|c| c.is_control() || c == '|' || c == '`')
        }) {
            return Err(Error::Config(format!(
                "method and release names must be non-empty, without control characters, `|` \
                 or backticks (they head report columns): {bad:?}"
            )));
        }
        let mut seeds = self.seeds.clone();
        seeds.sort_unstable();
        if seeds.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::Config(format!(
                "victim seeds repeat ({:?}): a repeated seed trains the same victim twice",
                self.seeds
            )));
        }
        let mut headline = std::iter::once(&self.headline.salm).chain(&self.headline.em);
        if let Some(bad) = headline.find(|n| !known(n)) {
            return Err(Error::Config(format!(
                "headline name `{bad}` is not a method or release name (known: {})",
                names.join(", ")
            )));
        }
        if let Some(r) = &self.robustness {
            if r.arch >= self.victims.len() {
                return Err(Error::Config("robustness.arch is out of range".into()));
            }
            if let Some(bad) = r.methods.iter().find(|n| !known(n)) {
                return Err(Error::Config(format!("robustness method {bad} is unknown")));
            }
            for d in &r.defences {
                d.validate()?;
            }
        }
        for m in &self.methods {
            m.params.validate()?;
        }
        if let Some(out) = &self.out_dir {
            self.check_out_dir(out)?;
        }
        self.victim.validate()
    }

    /// Refuses a report folder inside the data or a release (the report
    /// would become part of what is read and verified next time), a file,
    /// and a non-empty folder that is not an earlier audit report.
    fn check_out_dir(&self, out: &Path) -> Result<()> {
        let dst = crate::release::canonical(out);
        let mut guarded: Vec<(&str, PathBuf)> = Vec::new();
        if let DataSource::Folder { path } | DataSource::Npy { path, .. } = &self.source {
            guarded.push(("the data", path.clone()));
        }
        for r in &self.releases {
            match &r.source {
                DataSource::Folder { path } => guarded.push(("a release", path.clone())),
                DataSource::Npy { path, .. } => {
                    let folder = path.parent().unwrap_or(Path::new("."));
                    guarded.push(("a release", folder.to_path_buf()));
                }
                _ => {}
            }
        }
        for (what, path) in guarded {
            if dst.starts_with(crate::release::canonical(&path)) {
                return Err(Error::Config(format!(
                    "report folder {} is inside {what} ({}): the report would become part of it \
                     (CLI: --out elsewhere)",
                    out.display(),
                    path.display()
                )));
            }
        }
        if crate::release::holds_entries(out, "report folder")?
            && !out.join("report.json").is_file()
        {
            return Err(Error::Config(format!(
                "report folder {} holds files and no earlier report.json: choose an empty \
                 or new folder (an earlier audit's folder is rewritten in place)",
                out.display()
            )));
        }
        Ok(())
    }
}

/// Runs the audit (see the module docs) and writes the report when
/// `out_dir` is set.
pub fn audit(cfg: &AuditConfig) -> Result<AuditReport> {
    // Checked before the data is read: a bad config costs no loading.
    cfg.validate()?;
    run(cfg, &formats::load(&cfg.source)?)
}

/// [`audit`] on `data`, already read from `cfg.source` by the caller (a
/// caller that had to read the source anyway, to size its models, does
/// not read it twice). `data` must be what `cfg.source` holds: the
/// releases in `cfg.releases` are matched against it image by image.
pub fn audit_loaded(cfg: &AuditConfig, data: &Dataset) -> Result<AuditReport> {
    cfg.validate()?;
    run(cfg, data)
}

/// The audit of a checked config on its data.
fn run(cfg: &AuditConfig, data: &Dataset) -> Result<AuditReport> {
    let t0 = Instant::now();
    let device = cfg
        .device
        .parse::<lethe_model::DeviceSpec>()
        .map_err(|e| Error::Config(e.to_string()))?
        .open()?;
    let (tr, te) = data.split(cfg.test_fraction, cfg.split_seed)?;
    let train = data.subset(&tr)?;
    let test = data.subset(&te)?;
    let zeros = train.pixels().iter().filter(|&&v| v == 0.0).count();
    let test_per_class = test.class_counts();
    let info = DatasetInfo {
        name: data.name().to_string(),
        shape: data.shape(),
        classes: data.classes().to_vec(),
        train: train.len(),
        test: test.len(),
        zero_fraction: zeros as f64 / train.pixels().len() as f64,
        chance: test_per_class.iter().copied().max().unwrap_or(0) as f64 / test.len().max(1) as f64,
        test_per_class,
        class_signal: match &cfg.source {
            DataSource::Lesions(spec) => Some(crate::sources::lesion_class_signal(spec)?),
            _ => None,
        },
    };
    tracing::info!(dataset = %info.name, train = info.train, test = info.test, "audit");

    let mut methods = Vec::new();
    let mut releases: Vec<(String, Dataset)> = vec![("clean".into(), train.clone())];
    for m in &cfg.methods {
        tracing::info!(method = %m.name, "protecting the training split");
        let control = RunControl {
            progress: cfg.progress,
            ..RunControl::default()
        };
        let p = protect::protect_dataset(&train, &m.params, &control)?;
        methods.push(MethodResult {
            name: m.name.clone(),
            label: m.params.label(),
            params: m.params.clone(),
            rounds: p.rounds.len(),
            stop_reason: p.stop_reason,
            released_round: p.released_round,
            seconds: p.seconds,
            image_steps: p.image_steps,
            image_steps_per_second: p.image_steps as f64 / p.seconds.max(1e-9),
            quality: p.quality.clone(),
            round_log: p.rounds.clone(),
            release: None,
        });
        releases.push((m.name.clone(), p.protected));
    }
    for r in &cfg.releases {
        tracing::info!(release = %r.name, "reading a release");
        let read = crate::release::read_release(&r.source, data)?;
        let protected = read.data.subset(&tr)?;
        let (_, quality) =
            crate::metrics::dataset_quality(train.pixels(), protected.pixels(), train.shape());
        methods.push(MethodResult {
            name: r.name.clone(),
            label: read.params.label(),
            params: read.params,
            rounds: read.rounds.len(),
            stop_reason: read.run.stop_reason,
            released_round: read.run.released_round,
            seconds: read.run.seconds,
            image_steps: read.run.image_steps,
            image_steps_per_second: read.run.image_steps as f64 / read.run.seconds.max(1e-9),
            quality,
            round_log: read.rounds,
            release: Some(release_path(&r.source)),
        });
        releases.push((r.name.clone(), protected));
    }

    let mut victims = Vec::new();
    for (name, set) in &releases {
        for arch in &cfg.victims {
            for &seed in &cfg.seeds {
                let run =
                    train_victim(set, &test, arch, seed, &Defence::None, &cfg.victim, &device)?;
                tracing::info!(data = %name, arch = %run.arch, seed, peak = run.test_acc_peak, "victim");
                victims.push(VictimRow {
                    data: name.clone(),
                    run,
                });
            }
        }
    }

    let mut robustness = Vec::new();
    if let Some(rc) = &cfg.robustness {
        let arch = &cfg.victims[rc.arch];
        for d in &rc.defences {
            if matches!(d, Defence::Grayscale) && data.shape().channels == 1 {
                robustness.push(RobustnessRow {
                    defence: d.label(),
                    not_applicable: Some("the data is already grayscale".into()),
                    results: Vec::new(),
                });
                continue;
            }
            let mut results = Vec::new();
            for (name, set) in &releases {
                if name != "clean" && !rc.methods.is_empty() && !rc.methods.contains(name) {
                    continue;
                }
                let run = train_victim(set, &test, arch, rc.seed, d, &cfg.victim, &device)?;
                tracing::info!(defence = %d.label(), data = %name, peak = run.test_acc_peak, "robustness");
                results.push((name.clone(), run.test_acc_peak, run.test_acc_final));
                victims.push(VictimRow {
                    data: name.clone(),
                    run,
                });
            }
            robustness.push(RobustnessRow {
                defence: d.label(),
                not_applicable: None,
                results,
            });
        }
    }

    let accuracy = accuracy_table(&victims, &releases, &cfg.victims);
    let summary = summary(cfg, &info, &methods, &victims, &robustness)?;
    let kind = headline_kind(&methods, &cfg.headline.salm);
    let mut notes = notes(&summary, &methods, &accuracy, &info, kind, &cfg.victim);
    notes.extend(early_peak_notes(&victims, cfg.victim.epochs));
    if let Some(r) = &cfg.robustness {
        if !r.methods.contains(&cfg.headline.salm) {
            notes.push(format!(
                "The robustness suite did not run `{}` (it ran {:?}): the headline has no worst \
                 countermeasure.",
                cfg.headline.salm, r.methods
            ));
        }
    }
    let mut report = AuditReport {
        summary,
        dataset: info,
        config: cfg.clone(),
        methods,
        accuracy,
        robustness,
        victims,
        files: Vec::new(),
        notes,
        wall_seconds: 0.0,
        environment: Environment {
            device: cfg.device.clone(),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            version: env!("CARGO_PKG_VERSION"),
        },
    };
    report.wall_seconds = t0.elapsed().as_secs_f64();
    if let Some(dir) = &cfg.out_dir {
        report.files = write_report(&mut report, &train, &releases, dir)?;
    }
    Ok(report)
}

/// The path a release was read from, for the report.
fn release_path(source: &DataSource) -> String {
    match source {
        DataSource::Folder { path } | DataSource::Npy { path, .. } => path.display().to_string(),
        other => format!("{other:?}"),
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn accuracy_table(
    victims: &[VictimRow],
    releases: &[(String, Dataset)],
    archs: &[Arch],
) -> Vec<AccuracyRow> {
    let mut rows = Vec::new();
    for (name, _) in releases {
        for arch in archs {
            let label = arch.label();
            let runs: Vec<&VictimRun> = victims
                .iter()
                .filter(|v| &v.data == name && v.run.arch == label && v.run.defence == "none")
                .map(|v| &v.run)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let peaks: Vec<f64> = runs.iter().map(|r| r.test_acc_peak).collect();
            rows.push(AccuracyRow {
                data: name.clone(),
                arch: label,
                runs: runs.len(),
                peak_mean: mean(&peaks),
                peak_range: (
                    peaks.iter().copied().fold(f64::INFINITY, f64::min),
                    peaks.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ),
                final_mean: mean(&runs.iter().map(|r| r.test_acc_final).collect::<Vec<_>>()),
                train_mean: mean(&runs.iter().map(|r| r.train_acc_final).collect::<Vec<_>>()),
                recall_peak: mean_per_class(runs.iter().map(|r| &r.confusion_peak), recall),
                recall_final: mean_per_class(runs.iter().map(|r| &r.confusion_final), recall),
                precision_peak: mean_per_class(runs.iter().map(|r| &r.confusion_peak), precision),
            });
        }
    }
    rows
}

/// Recall of class `c` in confusion matrix `m` (0 without test images).
fn recall(m: &[Vec<u32>], c: usize) -> f64 {
    let total: u32 = m[c].iter().sum();
    ratio(m[c].get(c).copied().unwrap_or(0), total)
}

/// Precision of class `c` in confusion matrix `m` (0 when never predicted).
fn precision(m: &[Vec<u32>], c: usize) -> f64 {
    let predicted: u32 = m.iter().filter_map(|row| row.get(c)).sum();
    ratio(m[c].get(c).copied().unwrap_or(0), predicted)
}

fn ratio(a: u32, b: u32) -> f64 {
    if b == 0 {
        0.0
    } else {
        f64::from(a) / f64::from(b)
    }
}

/// `per_class(m, c)` for every class, averaged over the matrices.
fn mean_per_class<'a>(
    matrices: impl Iterator<Item = &'a Vec<Vec<u32>>>,
    per_class: fn(&[Vec<u32>], usize) -> f64,
) -> Vec<f64> {
    let mut sums: Vec<f64> = Vec::new();
    let mut count = 0usize;
    for m in matrices {
        if sums.len() < m.len() {
            sums.resize(m.len(), 0.0);
        }
        for (c, sum) in sums.iter_mut().enumerate().take(m.len()) {
            *sum += per_class(m, c);
        }
        count += 1;
    }
    sums.iter().map(|s| s / count.max(1) as f64).collect()
}

/// Mean and max peak accuracy of the undefended victims trained on `data`.
fn peak_stats(victims: &[VictimRow], data: &str) -> (f64, f64) {
    let peaks: Vec<f64> = victims
        .iter()
        .filter(|v| v.data == data && v.run.defence == "none")
        .map(|v| v.run.test_acc_peak)
        .collect();
    (mean(&peaks), peaks.iter().copied().fold(0.0, f64::max))
}

fn summary(
    cfg: &AuditConfig,
    info: &DatasetInfo,
    methods: &[MethodResult],
    victims: &[VictimRow],
    robustness: &[RobustnessRow],
) -> Result<Summary> {
    let salm = methods
        .iter()
        .find(|m| m.name == cfg.headline.salm)
        .ok_or_else(|| Error::Config(format!("no method named {}", cfg.headline.salm)))?;
    let em = cfg
        .headline
        .em
        .as_ref()
        .and_then(|e| methods.iter().find(|m| &m.name == e));
    let (clean_acc, _) = peak_stats(victims, "clean");
    let (salm_acc, salm_worst) = peak_stats(victims, &salm.name);
    let em_acc = em.map(|e| peak_stats(victims, &e.name).0);
    let rho = match &salm.params.method {
        Method::Salm { rho, .. } => *rho,
        Method::Em { .. } => 1.0,
    };
    let learned = clean_acc - info.chance;
    let worst = robustness
        .iter()
        .filter_map(|r| {
            r.results
                .iter()
                .find(|(d, _, _)| d == &salm.name)
                .map(|(_, p, _)| (r.defence.clone(), *p))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let psnr = salm.quality.psnr_mean_db;
    Ok(Summary {
        dataset: info.name.clone(),
        clean_acc,
        salm_acc,
        em_acc,
        salm_acc_worst: salm_worst,
        salm_psnr_db: psnr,
        em_psnr_db: em.and_then(|e| e.quality.psnr_mean_db),
        eps: salm.params.eps,
        rho,
        salm_unlearnability: (learned >= MIN_LEARNED).then(|| (clean_acc - salm_acc) / learned),
        salm_acc_worst_defence: worst.as_ref().map(|w| w.1),
        worst_defence: worst.map(|w| w.0),
        meets_acceptance: clean_acc >= 0.9
            && salm_acc <= 0.3
            && salm.params.eps <= 8.0 / 255.0 + 1e-9
            && rho <= 0.25
            && psnr.is_some_and(|p| p >= 30.0),
    })
}

/// What the report calls the headline run: `SALM` or `EM`, after its
/// method (a release audited as it is may be either).
fn headline_kind(methods: &[MethodResult], headline: &str) -> &'static str {
    match methods
        .iter()
        .find(|m| m.name == headline)
        .map(|m| &m.params.method)
    {
        Some(Method::Em { .. }) => "EM",
        _ => "SALM",
    }
}

/// How far above chance clean victims must be for unlearnability to be
/// defined (below it the ratio divides by noise).
pub const MIN_LEARNED: f64 = 0.1;

/// Fewer SGD steps than this and a victim has barely trained, whatever
/// the data (the reported datasets' victims take 440-450).
const FEW_VICTIM_STEPS: usize = 100;

/// Fewer test images of a class than this and the report says so.
const MIN_TEST_PER_CLASS: usize = 5;

/// "Victims took only N SGD steps ...": said when a small training split
/// and few epochs leave the victims barely trained (a batch per epoch on a
/// few dozen images), so the fix is named.
fn short_training(train: usize, victim: &VictimConfig) -> Option<String> {
    let steps = train.div_ceil(victim.batch.min(train).max(1)) * victim.epochs;
    (train > 0 && steps < FEW_VICTIM_STEPS).then(|| {
        format!(
            "Victims took only {steps} SGD steps ({train} training images in batches of {}, \
             {} epochs): raise the epochs (at least {} steps) before reading these numbers.",
            victim.batch.min(train),
            victim.epochs,
            FEW_VICTIM_STEPS
        )
    })
}

/// Where the class signal is known (generated lesions): how it compares
/// with the largest perturbation SALM (and dense EM) may add at the
/// headline budget, `eps^2` on every allowed value.
fn signal_note(s: &Summary, info: &DatasetInfo) -> Option<String> {
    let signal = info.class_signal.as_ref()?;
    let carriers: Vec<&ClassSignal> = signal.iter().filter(|c| c.energy_mean > 0.0).collect();
    if carriers.is_empty() {
        return None;
    }
    let values = (info.shape.pixels() * info.shape.channels) as f64;
    let dense = values * s.eps * s.eps;
    let budget = s.rho * dense;
    let per_class: Vec<String> = carriers
        .iter()
        .map(|c| {
            format!(
                "{:.2} for {} (smallest {:.2}, {:.0} pixels changed)",
                c.energy_mean, c.class, c.energy_min, c.pixels_mean
            )
        })
        .collect();
    let (lo, hi) = carriers.iter().fold((f64::INFINITY, 0f64), |(lo, hi), c| {
        (lo.min(c.energy_mean), hi.max(c.energy_mean))
    });
    Some(format!(
        "Class signal against the budget: on average a lesion adds a squared L2 norm (0..1 \
         scale) of {}; the largest perturbation SALM may add at eps={:.1}/255, rho={:.2} is \
         {budget:.3} (every allowed value moved by eps), so the mean lesion carries {:.1}-{:.1}x \
         SALM's budget; dense EM at the same eps may add {dense:.3}.",
        per_class.join(", "),
        s.eps * 255.0,
        s.rho,
        lo / budget,
        hi / budget,
    ))
}

fn notes(
    s: &Summary,
    methods: &[MethodResult],
    accuracy: &[AccuracyRow],
    info: &DatasetInfo,
    kind: &str,
    victim: &VictimConfig,
) -> Vec<String> {
    let mut notes: Vec<String> = methods
        .iter()
        .filter_map(|m| {
            m.release.as_ref().map(|path| {
                format!(
                    "`{}` is the release read from {path} ({}), not crafted by this audit: its \
                     training-split images were trained on and its held-out ones never were; \
                     its time and image-steps are those of the whole release.",
                    m.name, m.label
                )
            })
        })
        .collect();
    for m in methods {
        let released = m.round_log.iter().find(|l| l.round == m.released_round);
        let missed = protect::release_missed_targets(&m.params.stop, m.stop_reason, released);
        if !missed.is_empty() {
            notes.push(format!(
                "`{}` releases round {} of {} ({}), which missed its stop rule's targets: {}. \
                 Its surrogates did not fit the released noise.",
                m.name,
                m.released_round,
                m.rounds,
                StopReason::describe(m.stop_reason),
                missed.join(", ")
            ));
        }
    }
    if s.clean_acc < 0.9 {
        notes.push(format!(
            "Clean victims reach only {:.1}% (< 90%): the victim recipe or the data is too hard; \
             protection numbers on this dataset are weak evidence.",
            100.0 * s.clean_acc,
        ));
    }
    notes.extend(short_training(info.train, victim));
    notes.extend(signal_note(s, info));
    if s.salm_unlearnability.is_none() {
        notes.push(format!(
            "Unlearnability is not defined here: clean victims ({:.1}%) are within {:.0} points \
             of chance ({:.1}%).",
            100.0 * s.clean_acc,
            100.0 * MIN_LEARNED,
            100.0 * info.chance
        ));
    }
    let smallest = info.test_per_class.iter().copied().min().unwrap_or(0);
    if smallest < MIN_TEST_PER_CLASS {
        notes.push(format!(
            "The test split is small: {} images, per class {:?} ({}); one image moves an \
             accuracy by {:.1} points.",
            info.test,
            info.test_per_class,
            if smallest == 0 {
                "a class without test images has no recall: n/a"
            } else {
                "recalls are coarse"
            },
            100.0 / info.test.max(1) as f64
        ));
    }
    let uniform = 1.0 / info.classes.len().max(1) as f64;
    if info.chance > uniform + 0.05 {
        notes.push(format!(
            "The test classes are unbalanced: always answering the largest one scores {:.1}% \
             (the chance level used here, not {:.1}%).",
            100.0 * info.chance,
            100.0 * uniform
        ));
    }
    if s.salm_acc > 0.3 {
        notes.push(format!(
            "{kind} does NOT make {} unlearnable at eps={:.1}/255, rho={:.2}: victims still reach \
             {:.1}% (mean peak) against {:.1}% clean.",
            s.dataset,
            s.eps * 255.0,
            s.rho,
            100.0 * s.salm_acc,
            100.0 * s.clean_acc
        ));
    }
    if let (Some(w), Some(d)) = (s.salm_acc_worst_defence, &s.worst_defence) {
        if w > s.salm_acc + 0.2 {
            notes.push(format!(
                "Countermeasure `{d}` restores {kind} victims to {:.1}%.",
                100.0 * w
            ));
        }
    }
    for row in accuracy {
        if row.data != "clean" && row.train_mean > 0.95 && row.peak_mean < 0.5 {
            notes.push(format!(
                "{} on {}: {:.0}% training vs {:.0}% test accuracy, the shortcut signature.",
                row.data,
                row.arch,
                100.0 * row.train_mean,
                100.0 * row.peak_mean
            ));
        }
    }
    notes.extend(
        accuracy
            .iter()
            .filter(|r| r.data != "clean")
            .filter_map(|r| recognised_note(r, &info.classes)),
    );
    for m in methods {
        if m.stop_reason == Some(StopReason::MaxRounds) {
            notes.push(format!(
                "{} stopped at max_rounds ({}), not by its accuracy/loss rule.",
                m.name, m.rounds
            ));
        }
    }
    if info.shape.channels == 1 {
        notes.push("Grayscale conversion does not apply: the data is single-channel.".into());
    }
    notes
}

/// For each protected training set whose victims mostly peak in the first
/// tenth of training (at least one epoch) and never reach that peak again:
/// where those peaks are, what clean victims of the same architecture and
/// seed reach at the same epoch, and the best accuracy of every run after
/// that window. The headline peak is unchanged; this says whether it is a
/// transient of barely trained models. A run that reaches its peak early
/// and holds it (a task learned in an epoch) is no transient.
fn early_peak_notes(victims: &[VictimRow], epochs: usize) -> Vec<String> {
    let window = (epochs / 10).max(1);
    if epochs <= window {
        // No epoch after the window: nothing to compare a peak with.
        return Vec::new();
    }
    let plain = |v: &&VictimRow| v.run.defence == "none";
    let mut names: Vec<&str> = Vec::new();
    for v in victims.iter().filter(plain).filter(|v| v.data != "clean") {
        if !names.contains(&v.data.as_str()) {
            names.push(&v.data);
        }
    }
    let mut notes = Vec::new();
    for name in names {
        let runs: Vec<&VictimRun> = victims
            .iter()
            .filter(plain)
            .filter(|v| v.data == name)
            .map(|v| &v.run)
            .collect();
        let best_after = |r: &VictimRun| r.curve.iter().skip(window).copied().fold(0.0, f64::max);
        let early: Vec<&&VictimRun> = runs
            .iter()
            .filter(|r| r.peak_epoch <= window && best_after(r) < r.test_acc_peak)
            .collect();
        if early.len() * 2 <= runs.len() {
            continue;
        }
        let clean_at = |r: &VictimRun| {
            victims
                .iter()
                .filter(plain)
                .find(|v| v.data == "clean" && v.run.arch == r.arch && v.run.seed == r.seed)
                .and_then(|v| v.run.curve.get(r.peak_epoch.checked_sub(1)?).copied())
        };
        let pcts = |xs: &mut dyn Iterator<Item = f64>| {
            xs.map(|x| format!("{:.0}", 100.0 * x))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let later: Vec<f64> = runs.iter().map(|r| best_after(r)).collect();
        let clean: Vec<f64> = early.iter().filter_map(|r| clean_at(r)).collect();
        notes.push(format!(
            "{name}: {} of {} victims peak within the first {window} of {epochs} epochs (at {}%; \
             epochs {}){}; after epoch {window} their best is {}% (mean {:.1}%).",
            early.len(),
            runs.len(),
            pcts(&mut early.iter().map(|r| r.test_acc_peak)),
            early
                .iter()
                .map(|r| r.peak_epoch.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if clean.len() == early.len() {
                format!(
                    ", where clean victims of the same architecture and seed are at {}%",
                    pcts(&mut clean.iter().copied())
                )
            } else {
                String::new()
            },
            pcts(&mut later.iter().copied()),
            100.0 * mean(&later)
        ));
    }
    notes
}

/// The classes a row's victims still recognise at their peak epoch (mean
/// recall and mean precision both >= 80 %), with both values: a class that
/// merely collects every prediction has a high recall but a low precision.
fn recognised(row: &AccuracyRow, classes: &[String]) -> Vec<(String, f64, f64)> {
    row.recall_peak
        .iter()
        .zip(&row.precision_peak)
        .enumerate()
        .filter(|(_, (r, p))| **r >= 0.8 && **p >= 0.8)
        .map(|(c, (r, p))| {
            let name = classes.get(c).map_or("?", String::as_str);
            (name.to_string(), *r, *p)
        })
        .collect()
}

/// The report's sentence for [`recognised`] classes (none: `None`): every
/// class, up to three with their values, or the names of more.
fn recognised_note(row: &AccuracyRow, classes: &[String]) -> Option<String> {
    let kept = recognised(row, classes);
    let what = match kept.len() {
        0 => return None,
        k if k == classes.len() => {
            "every class (recall and precision >= 80% each): the protection hides none of them"
                .to_string()
        }
        1..=3 => kept
            .iter()
            .map(|(n, r, p)| {
                format!(
                    "{n} (recall {:.0}%, precision {:.0}%)",
                    100.0 * r,
                    100.0 * p
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        k => format!(
            "{k} of {} classes (recall and precision >= 80% each): {}",
            classes.len(),
            kept.iter()
                .map(|(n, _, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Some(format!(
        "{} on {}: at their peak epoch the victims still recognise {what}.",
        row.data, row.arch
    ))
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

fn opt_db(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

/// The caption's key to a chart: each series' colour, marker and name.
fn captions(series: &[figures::NamedSeries]) -> String {
    series
        .iter()
        .map(figures::NamedSeries::caption)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Writes `report.json`, `report.md` and the figures; returns the files.
fn write_report(
    report: &mut AuditReport,
    train: &Dataset,
    releases: &[(String, Dataset)],
    dir: &Path,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir.join("figures"))
        .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
    let mut files = Vec::new();

    // Examples: up to two images per class, at most 8 rows.
    let shape = train.shape();
    let mut picks = Vec::new();
    for c in 0..train.classes().len() as u32 {
        picks.extend(
            (0..train.len())
                .filter(|&i| train.labels()[i] == c)
                .take(if train.classes().len() > 4 { 1 } else { 2 }),
        );
    }
    picks.truncate(8);
    let rows: Vec<(&[f32], Vec<&[f32]>)> = picks
        .iter()
        .map(|&i| {
            (
                train.image(i),
                releases[1..].iter().map(|(_, d)| d.image(i)).collect(),
            )
        })
        .collect();
    let eps = report
        .methods
        .iter()
        .map(|m| m.params.eps)
        .fold(0.0, f64::max) as f32;
    if releases.len() > 1 {
        let grid = figures::examples_grid(&rows, shape, eps.max(1e-6))?;
        figures::save(&grid, &dir.join("figures/examples.png"))?;
        files.push("figures/examples.png".into());
    }

    // Accuracy against epsilon, per method family (kind, rho).
    let mut families: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for m in &report.methods {
        let family = match &m.params.method {
            Method::Salm { rho, .. } => format!("{} rho={rho:.2}", m.params.method.label()),
            Method::Em { .. } => m.params.method.label().to_string(),
        };
        let (acc, _) = peak_stats(&report.victims, &m.name);
        match families.iter_mut().find(|f| f.0 == family) {
            Some(f) => f.1.push((m.params.eps * 255.0, acc)),
            None => families.push((family, vec![(m.params.eps * 255.0, acc)])),
        }
    }
    let sweeps: Vec<(String, Vec<(f64, f64)>)> = families
        .into_iter()
        .filter(|f| f.1.len() > 1)
        .map(|(n, mut pts)| {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (n, pts)
        })
        .collect();
    let mut sweep_caption = String::new();
    if !sweeps.is_empty() {
        let xmax = sweeps
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.0))
            .fold(0.0, f64::max);
        let (clean, _) = peak_stats(&report.victims, "clean");
        let series: Vec<figures::NamedSeries> = std::iter::once(figures::NamedSeries {
            name: "clean".into(),
            style: figures::Style::REFERENCE,
            points: vec![(0.0, clean), (xmax, clean)],
        })
        .chain(
            sweeps
                .iter()
                .enumerate()
                .map(|(k, (name, pts))| figures::NamedSeries {
                    name: name.clone(),
                    style: figures::Style::nth(k),
                    points: pts.clone(),
                }),
        )
        .collect();
        files.extend(figures::save_line_charts(
            dir,
            "accuracy_vs_eps",
            figures::ChartText {
                title: &format!(
                    "{}: victim peak test accuracy against eps",
                    report.dataset.name
                ),
                x_desc: "eps (x/255)",
                y_desc: "peak test accuracy",
            },
            &series,
            (0.0, xmax),
            Some(report.dataset.chance),
        )?);
        sweep_caption = format!(
            "x: epsilon in 1/255 units (0 to {xmax:.0}); y: victim peak test accuracy (0 to 1, \
             grid every 0.1); dashed: chance. {}.",
            captions(&series)
        );
    }

    // Test accuracy per epoch, first architecture and seed.
    let first_arch = report.config.victims[0].label();
    let first_seed = report.config.seeds[0];
    let mut series = Vec::new();
    let mut epochs = 1.0;
    for (k, (name, _)) in releases.iter().enumerate() {
        if let Some(v) = report.victims.iter().find(|v| {
            &v.data == name
                && v.run.arch == first_arch
                && v.run.seed == first_seed
                && v.run.defence == "none"
        }) {
            epochs = v.run.curve.len() as f64;
            series.push(figures::NamedSeries {
                name: name.clone(),
                style: figures::Style::nth(k),
                points: v
                    .run
                    .curve
                    .iter()
                    .enumerate()
                    .map(|(e, a)| ((e + 1) as f64, *a))
                    .collect(),
            });
        }
    }
    files.extend(figures::save_line_charts(
        dir,
        "test_accuracy_curves",
        figures::ChartText {
            title: &format!(
                "{}: test accuracy per epoch ({first_arch}, seed {first_seed})",
                report.dataset.name
            ),
            x_desc: "epoch",
            y_desc: "test accuracy (clean test split)",
        },
        &series,
        (1.0, epochs.max(2.0)),
        Some(report.dataset.chance),
    )?);

    files.push("report.json".into());
    files.push("report.md".into());
    report.files = files.clone();
    let md = markdown(report, &sweep_caption, &captions(&series));
    std::fs::write(dir.join("report.md"), md)
        .map_err(|e| Error::io(e, format!("writing {}", dir.display())))?;
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| Error::Unsupported(format!("serialising the report: {e}")))?;
    std::fs::write(dir.join("report.json"), json)
        .map_err(|e| Error::io(e, format!("writing {}", dir.display())))?;
    Ok(files)
}

/// The Markdown report of one audit.
pub fn markdown(r: &AuditReport, sweep_caption: &str, curve_caption: &str) -> String {
    use std::fmt::Write;
    let s = &r.summary;
    let kind = headline_kind(&r.methods, &r.config.headline.salm);
    let mut md = String::new();
    let _ = writeln!(md, "# Protection audit: {}\n", r.dataset.name);
    let _ = writeln!(
        md,
        "{} train images (protected) / {} test images (clean), shape {}x{}x{}, {} classes, \
         {:.0}% of training pixel values exactly zero. Victims: {} x seeds {:?}, {} epochs. \
         Accuracies are victim test accuracy in %, peak over epochs, mean over architectures \
         and seeds unless stated.\n",
        r.dataset.train,
        r.dataset.test,
        r.dataset.shape.channels,
        r.dataset.shape.height,
        r.dataset.shape.width,
        r.dataset.classes.len(),
        100.0 * r.dataset.zero_fraction,
        r.config
            .victims
            .iter()
            .map(|a| a.label())
            .collect::<Vec<_>>()
            .join(", "),
        r.config.seeds,
        r.config.victim.epochs
    );
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(md, "| | value |\n|---|---|");
    let _ = writeln!(md, "| clean accuracy | {} |", pct(s.clean_acc));
    let _ = writeln!(
        md,
        "| {kind} accuracy (eps {:.1}/255, rho {:.2}) | {} (worst run {}) |",
        s.eps * 255.0,
        s.rho,
        pct(s.salm_acc),
        pct(s.salm_acc_worst)
    );
    if let Some(e) = s.em_acc {
        let _ = writeln!(md, "| EM accuracy (same eps) | {} |", pct(e));
    }
    let _ = writeln!(md, "| {kind} PSNR | {} dB |", opt_db(s.salm_psnr_db));
    let _ = writeln!(
        md,
        "| {kind} unlearnability U | {} |",
        s.salm_unlearnability.map_or_else(
            || "n/a (clean is near chance)".into(),
            |u| format!("{u:.2}")
        )
    );
    if let (Some(w), Some(d)) = (s.salm_acc_worst_defence, &s.worst_defence) {
        let _ = writeln!(md, "| {kind} worst countermeasure | {d}: {} |", pct(w));
    }
    let _ = writeln!(
        md,
        "| acceptance (clean >= 90, {kind} <= 30, eps <= 8/255, rho <= 0.25, PSNR >= 30) | {} |\n",
        if s.meets_acceptance { "met" } else { "NOT met" }
    );

    let _ = writeln!(md, "## Methods side by side\n");
    let _ = writeln!(
        md,
        "| method | parameters | victim acc | PSNR mean / min dB | SSIM | L-inf (x255) | L0 mean | rounds (stop) | released round | shortcut acc (released) | time s | image-steps/s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (clean, _) = peak_stats(&r.victims, "clean");
    let _ = writeln!(
        md,
        "| clean | - | {} | - | 1 | 0 | 0 | - | - | - | - | - |",
        pct(clean)
    );
    for m in &r.methods {
        let (acc, _) = peak_stats(&r.victims, &m.name);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} / {} | {:.3} | {:.1} | {:.3} | {} ({}) | {} | {} | {:.0} | {:.0} |",
            m.name,
            m.label,
            pct(acc),
            opt_db(m.quality.psnr_mean_db),
            opt_db(m.quality.psnr_min_db),
            m.quality.ssim_mean,
            m.quality.linf_max * 255.0,
            m.quality.l0_mean,
            m.rounds,
            StopReason::describe(m.stop_reason),
            m.released_round,
            m.round_log
                .iter()
                .find(|l| l.round == m.released_round)
                .and_then(|l| l.shortcut_accuracy)
                .map(pct)
                .unwrap_or_else(|| "-".into()),
            m.seconds,
            m.image_steps_per_second
        );
    }
    for m in &r.methods {
        let proxy: Vec<String> = m
            .round_log
            .iter()
            .filter_map(|l| l.proxy_accuracy.map(|a| format!("{} {}", l.round, pct(a))))
            .collect();
        if !proxy.is_empty() {
            let _ = writeln!(
                md,
                "\n{}: proxy-victim peak accuracy on the clean holdout of the crafting data, \
                 by round (round accuracy): {}; released round {}.",
                m.name,
                proxy.join(", "),
                m.released_round
            );
        }
    }
    let _ = writeln!(md, "\n## Victims per architecture\n");
    let _ = writeln!(
        md,
        "| training data | architecture | runs | peak mean | peak range | final mean | train acc |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for a in &r.accuracy {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {}-{} | {} | {} |",
            a.data,
            a.arch,
            a.runs,
            pct(a.peak_mean),
            pct(a.peak_range.0),
            pct(a.peak_range.1),
            pct(a.final_mean),
            pct(a.train_mean)
        );
    }
    let classes = &r.dataset.classes;
    if r.accuracy
        .iter()
        .any(|a| a.recall_peak.len() == classes.len())
    {
        let _ = writeln!(
            md,
            "\n## Per-class recall (peak epoch / last epoch, mean over seeds)\n"
        );
        let _ = writeln!(
            md,
            "| training data | architecture | {} |",
            classes.join(" | ")
        );
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(classes.len()));
        for a in r
            .accuracy
            .iter()
            .filter(|a| a.recall_peak.len() == classes.len())
        {
            let cells: Vec<String> = a
                .recall_peak
                .iter()
                .zip(&a.recall_final)
                .enumerate()
                .map(|(c, (p, f))| match r.dataset.test_per_class.get(c) {
                    Some(0) => "n/a".to_string(),
                    _ => format!("{} / {}", pct(*p), pct(*f)),
                })
                .collect();
            let _ = writeln!(md, "| {} | {} | {} |", a.data, a.arch, cells.join(" | "));
        }
    }
    if !r.robustness.is_empty() {
        let arch = r
            .config
            .robustness
            .as_ref()
            .map(|rc| r.config.victims[rc.arch].label())
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "\n## Robustness (victim {arch}, one seed; peak / final accuracy)\n"
        );
        let cols: Vec<String> = r
            .robustness
            .iter()
            .find(|row| !row.results.is_empty())
            .map(|row| row.results.iter().map(|(d, _, _)| d.clone()).collect())
            .unwrap_or_default();
        let _ = writeln!(md, "| defence | {} |", cols.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(cols.len()));
        for row in &r.robustness {
            match &row.not_applicable {
                Some(why) => {
                    let rest = " n/a |".repeat(cols.len().saturating_sub(1));
                    let _ = writeln!(md, "| {} | n/a: {why} |{rest}", row.defence);
                }
                None => {
                    let cells: Vec<String> = row
                        .results
                        .iter()
                        .map(|(_, p, f)| format!("{} / {}", pct(*p), pct(*f)))
                        .collect();
                    let _ = writeln!(md, "| {} | {} |", row.defence, cells.join(" | "));
                }
            }
        }
    }
    let _ = writeln!(md, "\n## Figures\n");
    if r.files.iter().any(|f| f == "figures/examples.png") {
        let _ = writeln!(
            md,
            "![examples](figures/examples.png)\n\nOne row per training image. Columns: original, \
             then for each method ({}) the released image and |delta| / eps as a heat map \
             (black 0, red, yellow, white = full budget).\n",
            r.methods
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !sweep_caption.is_empty() {
        let _ = writeln!(
            md,
            "![accuracy vs eps](figures/accuracy_vs_eps.svg)\n\n{sweep_caption} \
             (The same chart without text: `figures/accuracy_vs_eps.png`.)\n"
        );
    }
    let _ = writeln!(
        md,
        "![curves](figures/test_accuracy_curves.svg)\n\nTest accuracy per epoch ({}, seed {}); \
         y from 0 to 1, dashed: chance. {curve_caption}. (The same chart without text: \
         `figures/test_accuracy_curves.png`.)\n",
        r.config.victims[0].label(),
        r.config.seeds[0]
    );
    if !r.notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let _ = writeln!(
        md,
        "\nWall time {:.0} s on {} ({} cores).",
        r.wall_seconds, r.environment.device, r.environment.cores
    );
    md
}

#[cfg(test)]
mod tests;
