//! Protecting a dataset on disk: load, protect, write the release in the
//! source's format, and a `manifest.json` that makes the release
//! verifiable (which method, which parameters, which seed, which input
//! file became which output file, and how much each image changed).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::class_noise::ClassNoise;
use crate::dataset::{Dataset, Format};
use crate::formats::{self, DataSource, WrittenFile};
use crate::metrics::{ImageQuality, QualitySummary};
use crate::protect::{self, Estimate, ProtectParams, RoundLog, RunControl, StopReason, StopRule};
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
    /// Where to checkpoint after every round (default: none). A saved run
    /// there is continued with `resume` or replaced with `overwrite`;
    /// with neither, [`protect()`] refuses to start.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Resume from `checkpoint_dir`.
    #[serde(default)]
    pub resume: bool,
    /// Allow writing into a non-empty output folder, starting over a run
    /// saved in `checkpoint_dir` and replacing an existing `noise_file`.
    #[serde(default)]
    pub overwrite: bool,
    /// Progress bar with ETA on stderr.
    #[serde(default)]
    pub progress: bool,
    /// Class-wise methods: where to keep the released noise, to protect
    /// images added later the same way ([`ClassNoise`]). A secret that
    /// undoes the protection: never inside `output`.
    #[serde(default)]
    pub noise_file: Option<PathBuf>,
    /// Protect with this class-noise file instead of crafting: every image
    /// gets its class's noise (classes matched by name); `params` is
    /// ignored, the file's parameters go into the manifest.
    #[serde(default)]
    pub reuse_noise: Option<PathBuf>,
}

impl ProtectConfig {
    /// Protect `source` into `output` with `params`: no checkpoint, no
    /// resume or overwrite, no progress bar, no noise file kept or reused
    /// (the serde defaults; set the fields to change them).
    pub fn new(source: DataSource, output: impl Into<PathBuf>, params: ProtectParams) -> Self {
        ProtectConfig {
            source,
            output: output.into(),
            params,
            checkpoint_dir: None,
            resume: false,
            overwrite: false,
            progress: false,
            noise_file: None,
            reuse_noise: None,
        }
    }
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
    /// That round's log (`None` when no round was run: model-free methods,
    /// reused noise).
    pub released: Option<RoundLog>,
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
    pub source: DataSource,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// One entry per image.
    pub items: Vec<ManifestItem>,
    /// Every file written (relative path and SHA-256), the array file of an
    /// array release included: what [`verify_release`] checks.
    pub files: Vec<WrittenFile>,
    /// Round-by-round log.
    pub rounds: Vec<RoundLog>,
    /// Caveats that travel with the release.
    pub warnings: Vec<String>,
    /// SHA-256 of the class-noise file this release reused (no crafting
    /// ran); absent for a crafted release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused_noise: Option<String>,
}

/// One image of the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestItem {
    /// Source file relative to the source folder (`None` inside an array).
    pub source: Option<PathBuf>,
    /// The frame of a multi-frame source file (0-based); absent when the
    /// file holds one image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame: Option<u32>,
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

/// Says how many images no noise step moved: they are released exactly as
/// they were, unprotected (error-minimising steps stop where a surrogate
/// already fits an image so well that its loss gradient is zero).
pub fn unchanged_note(q: &QualitySummary) -> Option<String> {
    (q.unchanged > 0).then(|| {
        format!(
            "{} of {} images are released unchanged: no noise step moved them, so they are \
             not protected (the manifest's per-image quality names them)",
            q.unchanged, q.images
        )
    })
}

/// Says when the released noise comes from a round that missed the stop
/// rule's targets (a run stopped by `max_rounds`, or a `best_round` or
/// `proxy_victim` release that picked such a round): the surrogates that
/// crafted it did not fit it. Model-free methods and reused noise have no
/// round and no note.
pub fn weak_release_note(report: &ProtectReport, rule: &StopRule) -> Option<String> {
    let log = report.released.as_ref()?;
    let missed = protect::release_missed_targets(rule, report.stop_reason, Some(log));
    (!missed.is_empty()).then(|| {
        format!(
            "the released noise is round {} of {} ({}), which missed the stop rule's targets: \
             {}. The surrogates that crafted it did not fit it; whether it still protects is \
             what `lethe protect audit` measures. More rounds (max_rounds) or another release \
             rule release another round",
            log.round,
            report.rounds,
            StopReason::describe(report.stop_reason),
            missed.join(", ")
        )
    })
}

/// `" frame K"` for a frame of a multi-frame file, else nothing: appended
/// to a file name in messages.
fn frame_suffix(frame: Option<u32>) -> String {
    frame.map(|k| format!(" frame {k}")).unwrap_or_default()
}

/// Refuses an output folder that would publish the clean data or lose
/// files: the output must not be the source, lie inside it or contain it,
/// and must be empty unless `overwrite`, which replaces an earlier release
/// there and nothing else (see [`stale_release_files`]).
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
        if src.starts_with(&dst) {
            return Err(Error::Config(format!(
                "output {} contains the source {}: the release would publish the clean images",
                out.display(),
                path.display()
            )));
        }
    }
    if holds_entries(out, "output")? {
        if !cfg.overwrite {
            return Err(Error::Config(format!(
                "output {} is not empty (overwrite replaces an earlier release there; \
                 CLI: --overwrite)",
                out.display()
            )));
        }
        stale_release_files(out)?;
    }
    Ok(())
}

/// Whether the folder `dir` exists and holds anything; a file there is an
/// error (`what` names the folder's role in it).
pub(crate) fn holds_entries(dir: &Path, what: &str) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "{what} {} exists and is not a folder",
            dir.display()
        )));
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(e, format!("listing {}", dir.display())))?
        .next()
        .is_some())
}

/// The files of the earlier release in `out` (its manifest and every file
/// the manifest lists), which `overwrite` removes before writing so that
/// the new release is exactly what its manifest lists. Any other file
/// there is refused: overwriting replaces a release, it does not delete
/// what lethe did not write.
fn stale_release_files(out: &Path) -> Result<Vec<PathBuf>> {
    let manifest = read_manifest(out).ok();
    let listed: std::collections::HashSet<&Path> = manifest
        .as_ref()
        .map(|m| vouched_files(m).into_iter().map(|(p, _)| p).collect())
        .unwrap_or_default();
    let mut stale = Vec::new();
    let mut foreign = Vec::new();
    for entry in walkdir::WalkDir::new(out).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(|e| formats::walk_error(e, out))?;
        if entry.file_type().is_dir() {
            continue;
        }
        let rel = entry.path().strip_prefix(out).unwrap_or(entry.path());
        if rel == Path::new(MANIFEST_FILE) || listed.contains(rel) {
            stale.push(entry.path().to_path_buf());
        } else {
            foreign.push(rel.to_path_buf());
        }
    }
    if !foreign.is_empty() {
        return Err(Error::Config(format!(
            "output {} holds {} file(s) that no earlier release there lists ({}): \
             overwrite only replaces a release written by `lethe protect`; move them or \
             choose another output",
            out.display(),
            foreign.len(),
            some_paths(&foreign)
        )));
    }
    Ok(stale)
}

/// The first few of `paths` for a message (`a, b, c and 4 more`).
fn some_paths(paths: &[PathBuf]) -> String {
    const SHOWN: usize = 5;
    let mut text = paths
        .iter()
        .take(SHOWN)
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > SHOWN {
        text.push_str(&format!(" and {} more", paths.len() - SHOWN));
    }
    text
}

/// Removes the earlier release in `out` (see [`stale_release_files`]) and
/// the folders it leaves empty.
fn clear_earlier_release(out: &Path) -> Result<()> {
    if !out.is_dir() {
        return Ok(());
    }
    for file in stale_release_files(out)? {
        std::fs::remove_file(&file)
            .map_err(|e| Error::io(e, format!("removing {}", file.display())))?;
    }
    let mut dirs: Vec<PathBuf> = walkdir::WalkDir::new(out)
        .min_depth(1)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_dir())
        .map(|e| e.path().to_path_buf())
        .collect();
    // Deepest first, so a parent is empty once its children are gone.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

/// Refuses a checkpoint folder or noise file inside the release (both
/// hold the noise, which undoes the protection) or inside the source
/// folder (writing there changes the dataset being protected).
fn check_side_paths(cfg: &ProtectConfig) -> Result<()> {
    let out = canonical(&cfg.output);
    let source = match &cfg.source {
        DataSource::Folder { path } => Some((canonical(path), true)),
        DataSource::Npy { path, .. } => Some((canonical(path), false)),
        _ => None,
    };
    let sides = [
        ("checkpoint folder", &cfg.checkpoint_dir, "--checkpoint"),
        ("noise file", &cfg.noise_file, "--noise-file"),
    ];
    for (what, path, flag) in sides {
        let Some(path) = path else { continue };
        let p = canonical(path);
        if p.starts_with(&out) {
            return Err(Error::Config(format!(
                "{what} {} is inside the release {}: it holds the noise, which undoes the \
                 protection (CLI: {flag} outside the output)",
                path.display(),
                cfg.output.display()
            )));
        }
        if let Some((src, is_folder)) = &source {
            if (*is_folder && p.starts_with(src)) || (!is_folder && &p == src) {
                return Err(Error::Config(format!(
                    "{what} {} is inside the source {}: writing there would change the \
                     dataset being protected (CLI: {flag} elsewhere)",
                    path.display(),
                    src.display()
                )));
            }
        }
    }
    Ok(())
}

/// The absolute form of a path that may not exist yet.
pub(crate) fn canonical(p: &Path) -> PathBuf {
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

/// [`protect()`] of `data`, already loaded from `cfg.source` (by a caller
/// that read it to choose the parameters): the images are not loaded
/// again (a PNG release reads no source file; DICOM and `.npz` releases
/// still copy their tags and other entries from the source files). `data`
/// must be what `cfg.source` holds: the manifest describes the source
/// from it.
pub fn protect_loaded(cfg: &ProtectConfig, data: &Dataset) -> Result<ProtectReport> {
    run(cfg, Some(data), None, None)
}

/// [`protect()`] that may pause after `pause_after_rounds` rounds (nothing is
/// written then; resume with `resume: true`) and can be cancelled.
pub fn protect_with(
    cfg: &ProtectConfig,
    pause_after_rounds: Option<usize>,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<ProtectReport> {
    run(cfg, None, pause_after_rounds, cancel)
}

/// `cfg.source`'s dataset: `loaded` if the caller has it, else read now.
fn dataset<'a>(
    cfg: &ProtectConfig,
    loaded: Option<&'a Dataset>,
) -> Result<std::borrow::Cow<'a, Dataset>> {
    Ok(match loaded {
        Some(data) => std::borrow::Cow::Borrowed(data),
        None => std::borrow::Cow::Owned(formats::load(&cfg.source)?),
    })
}

/// [`protect_with`] of a dataset the caller may have loaded already.
fn run(
    cfg: &ProtectConfig,
    loaded: Option<&Dataset>,
    pause_after_rounds: Option<usize>,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<ProtectReport> {
    check_output(cfg)?;
    check_side_paths(cfg)?;
    if let Some(path) = &cfg.noise_file {
        // Another release's noise there would be lost, and with it the
        // means to protect that release's later images.
        if path.exists() && !cfg.overwrite {
            return Err(Error::Config(format!(
                "noise file {} exists (overwrite replaces it; CLI: --overwrite)",
                path.display()
            )));
        }
    }
    if let Some(noise) = &cfg.reuse_noise {
        if cfg.resume || cfg.noise_file.is_some() {
            return Err(Error::Config(
                "reuse_noise crafts nothing: it takes no resume and writes no noise_file".into(),
            ));
        }
        return protect_with_noise(cfg, noise, loaded);
    }
    cfg.params.validate()?;
    if cfg.resume && cfg.checkpoint_dir.is_none() {
        return Err(Error::Config("resume needs a checkpoint_dir".into()));
    }
    if cfg.noise_file.is_some() && !cfg.params.method.classwise() {
        return Err(Error::Config(
            "noise_file keeps a class-wise noise: the method is sample-wise".into(),
        ));
    }
    let data = dataset(cfg, loaded)?;
    let control = RunControl {
        checkpoint_dir: cfg.checkpoint_dir.clone(),
        resume: cfg.resume,
        overwrite: cfg.overwrite,
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
        released: result
            .rounds
            .iter()
            .find(|l| l.round == result.released_round)
            .cloned(),
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
    let content = ReleaseContent {
        params: &cfg.params,
        protected: &result.protected,
        per_image: &result.per_image,
        rounds: &result.rounds,
        reused_noise: None,
    };
    write_release(&data, cfg, &content, &mut report)?;
    if let (Some(path), Some(noise)) = (&cfg.noise_file, &result.class_noise) {
        noise.save(path)?;
    }
    Ok(report)
}

/// [`protect_with`] for `reuse_noise`: applies a saved class noise.
fn protect_with_noise(
    cfg: &ProtectConfig,
    noise_path: &Path,
    loaded: Option<&Dataset>,
) -> Result<ProtectReport> {
    let t0 = std::time::Instant::now();
    let bytes = formats::read_file(noise_path)?;
    let noise = ClassNoise::from_bytes(&bytes, noise_path)?;
    let data = dataset(cfg, loaded)?;
    let protected = noise.apply(&data)?;
    let (per_image, quality) =
        crate::metrics::dataset_quality(data.pixels(), protected.pixels(), data.shape());
    let seconds = t0.elapsed().as_secs_f64();
    let mut report = ProtectReport {
        dataset: data.name().to_string(),
        images: data.len(),
        method: format!("{} (reused class noise)", noise.params.label()),
        finished: true,
        stop_reason: None,
        rounds: 0,
        released_round: 0,
        released: None,
        seconds,
        image_steps: 0,
        image_steps_per_second: 0.0,
        quality,
        output: None,
        files: 0,
    };
    let content = ReleaseContent {
        params: &noise.params,
        protected: &protected,
        per_image: &per_image,
        rounds: &[],
        reused_noise: Some(formats::sha256_hex(&bytes)),
    };
    write_release(&data, cfg, &content, &mut report)?;
    Ok(report)
}

/// What a release holds besides its source's layout: the protected
/// images and how they were made.
struct ReleaseContent<'a> {
    /// The parameters that made the noise.
    params: &'a ProtectParams,
    /// The protected images, on their release grid.
    protected: &'a Dataset,
    /// Per-image quality against the source.
    per_image: &'a [ImageQuality],
    /// The crafting run's rounds (none when a noise was reused).
    rounds: &'a [RoundLog],
    /// SHA-256 of the class-noise file a reuse applied.
    reused_noise: Option<String>,
}

/// Writes the release files and `manifest.json`, filling in `report`'s
/// output and file count.
fn write_release(
    data: &Dataset,
    cfg: &ProtectConfig,
    content: &ReleaseContent<'_>,
    report: &mut ProtectReport,
) -> Result<()> {
    if cfg.overwrite {
        clear_earlier_release(&cfg.output)?;
    }
    let written = formats::write(content.protected, &cfg.output)?;
    report.output = Some(cfg.output.clone());
    report.files = written.len();
    let manifest = manifest(data, cfg, report, content, &written);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Unsupported(format!("serialising the manifest: {e}")))?;
    let path = cfg.output.join(MANIFEST_FILE);
    std::fs::write(&path, json).map_err(|e| Error::io(e, format!("writing {}", path.display())))
}

fn manifest(
    data: &Dataset,
    cfg: &ProtectConfig,
    report: &ProtectReport,
    content: &ReleaseContent<'_>,
    written: &[WrittenFile],
) -> Manifest {
    let per_file = written.len() == data.len();
    // Folder releases keep each source file's relative path; the frames of
    // a multi-frame file share one output file.
    let by_path: std::collections::HashMap<&Path, &WrittenFile> =
        written.iter().map(|w| (w.path.as_path(), w)).collect();
    let items = (0..data.len())
        .map(|i| {
            let item = &data.items()[i];
            let output = match item.path.as_deref().and_then(|p| by_path.get(p)) {
                Some(w) => Some(*w),
                None => per_file.then(|| &written[i]),
            };
            ManifestItem {
                source: item.path.clone(),
                frame: item.frame,
                source_sha256: item.sha256.clone(),
                output: output.map(|w| w.path.clone()),
                output_sha256: output.map(|w| w.sha256.clone()),
                class: data.classes()[data.labels()[i] as usize].clone(),
                quality: content.per_image[i],
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
    if let Ok(Some(note)) = data.check_eps(content.params.eps) {
        warnings.push(note);
    }
    if matches!(data.format(), Format::Dicom { .. }) {
        warnings.push(
            "DICOM files keep every tag of their source, SOP Instance UIDs and Image Type \
             included: a released file shares its UID with its original although its pixels \
             differ. Never import a release and its originals into one archive (the one would \
             replace the other); assign new UIDs first if both must coexist."
                .into(),
        );
    }
    if let Some(note) = unchanged_note(&report.quality) {
        warnings.push(note);
    }
    if let Some(note) = weak_release_note(report, &content.params.stop) {
        warnings.push(note);
    }
    if matches!(data.format(), Format::Npy(_)) && !per_file {
        warnings.push("array output: per-image output hashes are not defined".into());
    }
    if let Some(sha) = &content.reused_noise {
        warnings.push(format!(
            "No noise was crafted for this release: it carries the class noise of an earlier \
             run (noise file SHA-256 {sha}); that run's rounds are in its own manifest."
        ));
    }
    Manifest {
        tool: "lethe-protect",
        version: env!("CARGO_PKG_VERSION"),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        report: report.clone(),
        params: content.params.clone(),
        source: cfg.source.clone(),
        classes: data.classes().to_vec(),
        items,
        files: written.to_vec(),
        rounds: content.rounds.to_vec(),
        warnings,
        reused_noise: content.reused_noise.clone(),
    }
}

/// Dry run: loads the data, times a few steps and extrapolates.
pub fn estimate(cfg: &ProtectConfig) -> Result<Estimate> {
    estimate_loaded(cfg, &formats::load(&cfg.source)?)
}

/// [`estimate()`] of `data`, already loaded from `cfg.source`.
pub fn estimate_loaded(cfg: &ProtectConfig, data: &Dataset) -> Result<Estimate> {
    protect::estimate_dataset(data, &cfg.params)
}

/// The parts of a `manifest.json` an audit needs, read back.
#[derive(Debug, Deserialize)]
struct ManifestOnDisk {
    report: ReleasedRun,
    params: ProtectParams,
    classes: Vec<String>,
    items: Vec<ManifestItemOnDisk>,
    rounds: Vec<RoundLog>,
    /// Absent from manifests written before the list existed.
    #[serde(default)]
    files: Vec<WrittenFile>,
}

/// How a release's run went, as its manifest's `report` says.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReleasedRun {
    /// Why the run stopped.
    pub stop_reason: Option<StopReason>,
    /// The round whose noise was released.
    pub released_round: usize,
    /// Wall time of its optimisation (seconds, over the whole source).
    pub seconds: f64,
    /// Noise steps taken.
    pub image_steps: u64,
}

#[derive(Debug, Deserialize)]
struct ManifestItemOnDisk {
    source: Option<PathBuf>,
    #[serde(default)]
    frame: Option<u32>,
    source_sha256: Option<String>,
    output: Option<PathBuf>,
    #[serde(default)]
    output_sha256: Option<String>,
}

/// Reads and parses `folder/manifest.json`.
fn read_manifest(folder: &Path) -> Result<ManifestOnDisk> {
    let path = folder.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::io(
            e,
            format!(
                "reading {} (a release written by `lethe protect` has one)",
                path.display()
            ),
        )
    })?;
    let manifest: ManifestOnDisk =
        serde_json::from_str(&text).map_err(|e| Error::decode(&path, format!("manifest: {e}")))?;
    // Every path a manifest names is read (and hashed) by verify and the
    // audit: none may lead out of the release.
    let named = manifest
        .files
        .iter()
        .map(|f| &f.path)
        .chain(manifest.items.iter().filter_map(|i| i.output.as_ref()));
    for p in named {
        let inside = p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside || p.as_os_str().is_empty() {
            return Err(Error::decode(
                &path,
                format!(
                    "manifest lists {}: a release's paths are relative and stay inside it",
                    p.display()
                ),
            ));
        }
    }
    Ok(manifest)
}

/// What [`verify_release`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Files the manifest lists.
    pub listed: usize,
    /// Listed files whose content no longer has the listed hash.
    pub changed: Vec<PathBuf>,
    /// Listed files that are gone.
    pub missing: Vec<PathBuf>,
    /// Files in the folder the manifest does not list (besides the
    /// manifest itself).
    pub unlisted: Vec<PathBuf>,
}

impl VerifyReport {
    /// Every listed file is present and unchanged, and nothing was added.
    pub fn intact(&self) -> bool {
        self.changed.is_empty() && self.missing.is_empty() && self.unlisted.is_empty()
    }
}

/// Checks a release folder against its manifest: every file it lists is
/// there with the same SHA-256, and no other file was added. (Manifests
/// from before the file list have per-image output hashes, used instead.)
pub fn verify_release(folder: &Path) -> Result<VerifyReport> {
    verify_with(folder, &read_manifest(folder)?)
}

/// Every file `manifest` vouches for, in its order, with each hash it gives
/// it: the file list and every image's own output. An image is checked
/// even when its file was struck from the list, and a file the two lists
/// give different hashes cannot match both.
fn vouched_files(manifest: &ManifestOnDisk) -> Vec<(&Path, Vec<&str>)> {
    let pairs = manifest
        .files
        .iter()
        .map(|f| (f.path.as_path(), f.sha256.as_str()))
        .chain(
            manifest
                .items
                .iter()
                .filter_map(|i| Some((i.output.as_deref()?, i.output_sha256.as_deref()?))),
        );
    let mut files: Vec<(&Path, Vec<&str>)> = Vec::new();
    let mut index: std::collections::HashMap<&Path, usize> = Default::default();
    for (path, sha) in pairs {
        let k = *index.entry(path).or_insert_with(|| {
            files.push((path, Vec::new()));
            files.len() - 1
        });
        if !files[k].1.contains(&sha) {
            files[k].1.push(sha);
        }
    }
    files
}

/// [`verify_release`] against a manifest already read from `folder`.
fn verify_with(folder: &Path, manifest: &ManifestOnDisk) -> Result<VerifyReport> {
    let files = vouched_files(manifest);
    if files.is_empty() {
        return Err(Error::Config(format!(
            "{} lists no files to check",
            folder.join(MANIFEST_FILE).display()
        )));
    }
    let mut report = VerifyReport {
        listed: files.len(),
        changed: Vec::new(),
        missing: Vec::new(),
        unlisted: Vec::new(),
    };
    for (rel, hashes) in &files {
        let path = folder.join(rel);
        if !path.is_file() {
            report.missing.push(rel.to_path_buf());
            continue;
        }
        let sha = formats::sha256_hex(&formats::read_file(&path)?);
        if hashes.iter().any(|h| *h != sha) {
            report.changed.push(rel.to_path_buf());
        }
    }
    let listed: std::collections::HashSet<&Path> = files.iter().map(|(p, _)| *p).collect();
    for entry in walkdir::WalkDir::new(folder).sort_by_file_name() {
        let entry = entry.map_err(|e| formats::walk_error(e, folder))?;
        // Links count as added files: a release is plain files.
        if entry.file_type().is_dir() {
            continue;
        }
        let rel = entry.path().strip_prefix(folder).unwrap_or(entry.path());
        if rel != Path::new(MANIFEST_FILE) && !listed.contains(rel) {
            report.unlisted.push(rel.to_path_buf());
        }
    }
    Ok(report)
}

/// A release written by [`protect()`], read back and paired with the clean
/// dataset it was made from.
#[derive(Debug, Clone)]
pub struct ReadRelease {
    /// The protected images in the clean dataset's order, normalised as the
    /// clean dataset is (a DICOM release's own value range may be narrower).
    pub data: Dataset,
    /// How it was made (from its manifest).
    pub params: ProtectParams,
    /// How its run went.
    pub run: ReleasedRun,
    /// Its round log.
    pub rounds: Vec<RoundLog>,
    /// Images whose source file hash in the manifest was checked against
    /// the clean file (0 for array and generated sources, which have none).
    pub hashes_checked: usize,
}

/// Reads the release at `source` (an output folder of `lethe protect`, or
/// the array file inside one) and checks that it is a protection of
/// `clean`: its manifest lists the same classes and images (source file
/// hashes equal where both sides have them), the labels and shape agree,
/// and no image differs from its clean version by more than the manifest's
/// epsilon.
pub fn read_release(source: &DataSource, clean: &Dataset) -> Result<ReadRelease> {
    let folder = match source {
        DataSource::Folder { path } => path.clone(),
        DataSource::Npy { path, .. } => path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        other => {
            return Err(Error::Config(format!(
                "a release is a folder or array file written by `lethe protect`, not {other:?}"
            )))
        }
    };
    let manifest = read_manifest(&folder)?;
    // The files are what the manifest says they are (what `verify`
    // checks): an audit of edited files would measure another release.
    let check = verify_with(&folder, &manifest)?;
    if !check.changed.is_empty() || !check.missing.is_empty() {
        return Err(Error::Config(format!(
            "release {} does not match its manifest: {} file(s) changed ({}), {} missing ({}); \
             `lethe protect verify` lists them",
            folder.display(),
            check.changed.len(),
            some_paths(&check.changed),
            check.missing.len(),
            some_paths(&check.missing)
        )));
    }
    let released = formats::load(source)?;
    let released = in_manifest_order(released, &manifest, &folder)?;
    let mismatch = |what: String| {
        Error::Config(format!(
            "{} is not a protection of {}: {what}",
            folder.display(),
            clean.name()
        ))
    };
    let sorted = |c: &[String]| {
        let mut c = c.to_vec();
        c.sort();
        c
    };
    if manifest.classes != clean.classes() || sorted(released.classes()) != sorted(clean.classes())
    {
        return Err(mismatch(format!(
            "classes {:?} vs {:?}",
            released.classes(),
            clean.classes()
        )));
    }
    if released.len() != clean.len() || manifest.items.len() != clean.len() {
        return Err(mismatch(format!(
            "{} images ({} in its manifest) vs {}",
            released.len(),
            manifest.items.len(),
            clean.len()
        )));
    }
    if released.shape() != clean.shape() {
        return Err(mismatch(format!(
            "shape {} vs {}",
            released.shape(),
            clean.shape()
        )));
    }
    // A folder's classes are its sorted sub-folder names: compare by name.
    let class_of = |d: &Dataset, i: usize| d.classes()[d.labels()[i] as usize].clone();
    if let Some(i) = (0..clean.len()).find(|&i| class_of(&released, i) != class_of(clean, i)) {
        return Err(mismatch(format!(
            "image {i} is {} in the release, {} here",
            class_of(&released, i),
            class_of(clean, i)
        )));
    }
    let released = Dataset::new(
        released.name(),
        released.shape(),
        released.pixels().to_vec(),
        clean.labels().to_vec(),
        clean.classes().to_vec(),
        released.items().to_vec(),
        released.format().clone(),
    )?;
    let mut hashes_checked = 0;
    for (i, (m, c)) in manifest.items.iter().zip(clean.items()).enumerate() {
        if let (Some(a), Some(b)) = (&m.source_sha256, &c.sha256) {
            if a != b {
                return Err(mismatch(format!(
                    "image {i} ({}) was made from another file",
                    c.path.as_deref().unwrap_or(Path::new("?")).display()
                )));
            }
            hashes_checked += 1;
        }
        if let (Some(a), Some(b)) = (&m.source, &c.path) {
            if a != b || m.frame != c.frame {
                return Err(mismatch(format!(
                    "image {i} is {}{} in the manifest, {}{} here",
                    a.display(),
                    frame_suffix(m.frame),
                    b.display(),
                    frame_suffix(c.frame)
                )));
            }
        }
    }
    let data = renormalised_like(released, clean)?;
    // Releases keep the budget on their grid (`Dataset::quantize_within`);
    // the slack covers float error of the renormalisation only.
    let tolerance = manifest.params.eps + 1e-5;
    for i in 0..clean.len() {
        let linf = clean
            .image(i)
            .iter()
            .zip(data.image(i))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if f64::from(linf) > tolerance {
            return Err(mismatch(format!(
                "image {i} differs from its clean version by {:.1}/255, more than eps {:.1}/255",
                f64::from(linf) * 255.0,
                manifest.params.eps * 255.0
            )));
        }
    }
    Ok(ReadRelease {
        data,
        params: manifest.params,
        run: manifest.report,
        rounds: manifest.rounds,
        hashes_checked,
    })
}

/// `released` in the order of the manifest's items (the clean dataset's
/// order): a folder is read back grouped by class and sorted by file name,
/// which need not be the order the images were protected in. Arrays keep
/// their order.
fn in_manifest_order(
    released: Dataset,
    manifest: &ManifestOnDisk,
    folder: &Path,
) -> Result<Dataset> {
    let outputs: Option<Vec<(&PathBuf, Option<u32>)>> = manifest
        .items
        .iter()
        .map(|m| m.output.as_ref().map(|p| (p, m.frame)))
        .collect();
    let (Some(outputs), true) = (outputs, released.items().iter().all(|i| i.path.is_some())) else {
        return Ok(released);
    };
    let index: std::collections::HashMap<(&Path, Option<u32>), usize> = released
        .items()
        .iter()
        .enumerate()
        .filter_map(|(j, item)| item.path.as_deref().map(|p| ((p, item.frame), j)))
        .collect();
    let order = outputs
        .iter()
        .map(|&(p, frame)| {
            index.get(&(p.as_path(), frame)).copied().ok_or_else(|| {
                Error::Config(format!(
                    "{} lists {}{} but the folder does not hold it",
                    folder.join(MANIFEST_FILE).display(),
                    p.display(),
                    frame_suffix(frame)
                ))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    if order.len() != released.len() {
        return Err(Error::Config(format!(
            "{} lists {} images, the folder holds {}",
            folder.join(MANIFEST_FILE).display(),
            order.len(),
            released.len()
        )));
    }
    released.subset(&order)
}

/// `released` with its values mapped onto `clean`'s normalisation: a DICOM
/// folder is normalised by its own smallest and largest stored value, which
/// protection may have moved by a few levels.
fn renormalised_like(released: Dataset, clean: &Dataset) -> Result<Dataset> {
    match (released.format(), clean.format()) {
        (Format::Dicom { range: r, .. }, Format::Dicom { range: c, .. }) if r != c => {
            let (r, c) = (*r, *c);
            let pixels = released
                .pixels()
                .iter()
                .map(|&x| {
                    let stored = r.0 + f64::from(x) * (r.1 - r.0);
                    (((stored - c.0) / (c.1 - c.0)) as f32).clamp(0.0, 1.0)
                })
                .collect();
            released.with_pixels(pixels)
        }
        _ => Ok(released),
    }
}

#[cfg(test)]
mod tests;
