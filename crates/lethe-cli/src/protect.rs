//! `lethe protect`: protect an image dataset before release, and
//! `lethe protect audit`: measure whether that protection works.
//!
//! This module only turns argv into `lethe-protect`'s plain config structs
//! ([`lethe_protect::ProtectConfig`], [`lethe_protect::AuditConfig`]) and
//! prints what comes back; the optimisation, the release writer (same
//! format as the input plus `manifest.json`), checkpoints, the progress bar
//! and the audit all live in `lethe-protect`.
//!
//! ```text
//! lethe protect --input scans/ --output scans-protected/ --method salm --eps 8/255 --rho 0.1
//! lethe protect --builtin digits --output /tmp/digits-prot --dry-run
//! lethe protect --input scans/ --output out/ --resume        # continue an interrupted run
//! lethe protect audit --spec evals/protect/lesions.json --out evals/results/protect/lesions
//! lethe protect audit --builtin lesions --eps 8/255 --rho 0.25 --classwise --out /tmp/audit
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use lethe_protect::{
    Arch, AuditConfig, DataSource, Dataset, Defence, Headline, LesionSpec, MaskRefresh,
    MaskStrategy, Method, MethodRun, Objective, ProtectConfig, ProtectParams, ReleaseRun,
    RobustnessConfig, SgdParams, StopReason, VictimConfig,
};

/// `lethe protect [OPTIONS]` protects a dataset; `lethe protect audit`
/// trains fresh victims on clean vs protected data.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ProtectArgs {
    /// `audit` (without it: protect a dataset).
    #[command(subcommand)]
    command: Option<ProtectCommand>,
    /// What to protect and where the release goes.
    #[command(flatten)]
    data: DataArgs,
    /// Method and budget.
    #[command(flatten)]
    method: MethodArgs,
    /// The release folder (created; same format as the input, plus
    /// manifest.json).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Checkpoint folder (default: OUTPUT.checkpoint next to the output). A
    /// run saved there is continued with --resume or replaced with
    /// --overwrite; with neither, protect refuses to start.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Do not checkpoint after every round.
    #[arg(long, conflicts_with = "resume")]
    no_checkpoint: bool,
    /// Class-wise methods: where to keep the released noise, a secret that
    /// protects images added later the same way (--reuse-noise) and that
    /// undoes the protection (default: OUTPUT.noise.safetensors next to the
    /// output, never inside it).
    #[arg(long, conflicts_with = "no_noise_file")]
    noise_file: Option<PathBuf>,
    /// Class-wise methods: do not keep the noise (the checkpoint still holds
    /// it unless --no-checkpoint).
    #[arg(long)]
    no_noise_file: bool,
    /// Protect with a class-wise run's noise file instead of crafting: new
    /// images of the same classes (matched by name) and shape get exactly
    /// the released noise. The noise file holds its method and budget, so
    /// the method flags are refused beside it.
    #[arg(long, conflicts_with_all = REUSE_CONFLICTS)]
    reuse_noise: Option<PathBuf>,
    /// Write into a non-empty output folder, start over a run saved in the
    /// checkpoint folder, and replace an existing noise file.
    #[arg(long)]
    overwrite: bool,
    /// Only estimate the run time (times a few steps; writes nothing).
    #[arg(long)]
    dry_run: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum ProtectCommand {
    /// Train fresh victims on clean vs protected data; robustness suite,
    /// image quality, figures; report.json + report.md under --out.
    Audit(Box<AuditArgs>),
    /// Check a release folder against its manifest: every listed file
    /// present with its SHA-256, nothing added (exit status 1 if not).
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The release folder (where `manifest.json` is).
    release: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// The ids of the `MethodArgs` flags that shape crafting (all but
/// `--device` and `--params`), followed by `extra`: the lists of flags
/// that an option holding its own settings refuses beside it.
macro_rules! crafting_flags_and {
    ($($extra:literal),*) => {
        [
            "method", "eps", "rho", "classwise", "targeted", "mask", "refresh", "steps",
            "freeze_mask_after", "min_rounds", "max_rounds", "target_acc", "loss_below",
            "surrogate", "seed", $($extra),*
        ]
    };
}

/// Meaningless beside `audit --release`: nothing is crafted (`--device`
/// stays: the victims use it).
const CRAFTING_FLAGS: [&str; 16] = crafting_flags_and!("params");

/// What `--params` fixes itself: every other `MethodArgs` flag.
const PARAMS_SETS: [&str; 16] = crafting_flags_and!("device");

/// What `--reuse-noise` excludes: every method flag (the noise file holds
/// them) and crafting itself (resume, dry run, a new noise file).
const REUSE_CONFLICTS: [&str; 20] =
    crafting_flags_and!("device", "params", "resume", "dry_run", "noise_file");

/// What `audit --spec` fixes itself: the method flags and the victim and
/// split flags.
const SPEC_SETS: [&str; 21] = crafting_flags_and!(
    "device",
    "params",
    "epochs",
    "seeds",
    "no_robustness",
    "test_fraction"
);

#[derive(Args, Debug)]
struct AuditArgs {
    /// An audit specification (JSON `AuditConfig`, e.g.
    /// evals/protect/lesions.json); without it the audit is built from the
    /// data and method flags (SALM and EM at the same eps). The spec says
    /// everything the method and victim flags would: they are refused
    /// beside it.
    #[arg(long, conflicts_with_all = SPEC_SETS)]
    spec: Option<PathBuf>,
    /// What to audit (ignored with --spec); with --release, the clean data
    /// the release was made from.
    #[command(flatten)]
    data: DataArgs,
    /// A release written by `lethe protect` (its output folder, or the
    /// array file in it), audited as it is instead of crafting SALM and EM:
    /// checked against the clean data (manifest, file hashes, eps), victims
    /// train on its training-split images and are tested on the clean
    /// held-out ones. Repeatable; with --spec, added to the spec's. Nothing
    /// is crafted, so the crafting flags are refused beside it.
    #[arg(long = "release", conflicts_with_all = CRAFTING_FLAGS)]
    releases: Vec<PathBuf>,
    /// SALM's budget.
    #[command(flatten)]
    method: MethodArgs,
    /// Where report.json, report.md and figures/ go.
    #[arg(long, default_value = "evals/results/protect/audit")]
    out: PathBuf,
    /// Victim training epochs.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Victim seeds.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    seeds: Vec<u64>,
    /// Skip the robustness suite.
    #[arg(long)]
    no_robustness: bool,
    /// Fraction of the data held out (clean) for testing.
    #[arg(long, default_value_t = 0.25)]
    test_fraction: f64,
    /// Print the report's summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DataArgs {
    /// A folder with one sub-folder per class (PNG 8/16-bit gray or RGB, or
    /// DICOM), or a .npy/.npz file.
    #[arg(long, short, conflicts_with = "builtin")]
    input: Option<PathBuf>,
    /// A built-in dataset instead of --input.
    #[arg(long, value_enum)]
    builtin: Option<Builtin>,
    /// For a .npy input: the .npy file of labels (integers, or strings naming the classes).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// For a .npz input: the images entry (default: the first of images, x,
    /// X, data, x_train, X_train, train_images, train_x that it holds).
    #[arg(long)]
    images_key: Option<String>,
    /// For a .npz input: the labels entry (default: the one named like the
    /// images entry, y_train for x_train, else labels, y, Y, targets, ...,
    /// label).
    #[arg(long)]
    labels_key: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Builtin {
    /// scikit-learn's 8x8 digits (1797 images, 10 classes).
    Digits,
    /// The generated sparse lesion set (1200 32x32 images, 4 classes).
    Lesions,
    /// scikit-image's LFW subset (200 25x25 faces / non-faces).
    Lfw,
    /// 16x16 tiles of pydicom's CT and MR slices (CT vs MR).
    DicomPatches,
    /// 16x16 RGB tiles of scikit-image's histology and fundus photographs
    /// (histology vs fundus).
    MedicalPatches,
}

#[derive(Args, Debug)]
struct MethodArgs {
    /// Protection method.
    #[arg(long, value_enum, default_value_t = MethodArg::Salm)]
    method: MethodArg,
    /// L-inf budget as a fraction of full scale: `8/255` or `0.0314`.
    #[arg(long, default_value = "8/255", value_parser = parse_fraction, allow_negative_numbers = true)]
    eps: f64,
    /// SALM: fraction of pixel locations that may change.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    rho: f64,
    /// One noise (and mask) per class instead of one per image.
    #[arg(long)]
    classwise: bool,
    /// EM / SALM: targeted adversarial poisoning instead of error
    /// minimising: the surrogate trains on the clean images and each
    /// image's noise aims at the next class (`--target-acc` is then the
    /// attack's success rate).
    #[arg(long)]
    targeted: bool,
    /// SALM: how mask pixels are ranked.
    #[arg(long, value_enum, default_value_t = MaskArg::Feasible)]
    mask: MaskArg,
    /// SALM: when masks are recomputed.
    #[arg(long, value_enum, default_value_t = RefreshArg::PerRound)]
    refresh: RefreshArg,
    /// SALM with a refreshed gradient mask: refresh the masks up to this
    /// round, then keep them (each refresh drops the noise of the pixels
    /// that leave a mask, which can undo a shortcut the surrogates had
    /// learnt).
    #[arg(long)]
    freeze_mask_after: Option<usize>,
    /// Noise (PGD) steps per batch per round.
    #[arg(long)]
    steps: Option<usize>,
    /// Never stop before this many rounds.
    #[arg(long)]
    min_rounds: Option<usize>,
    /// Always stop after this many rounds.
    #[arg(long)]
    max_rounds: Option<usize>,
    /// Stop (after --min-rounds) at this surrogate accuracy on the protected
    /// images.
    #[arg(long, allow_negative_numbers = true)]
    target_acc: Option<f64>,
    /// Stop (after --min-rounds) when the surrogate's loss falls below this.
    #[arg(long, allow_negative_numbers = true)]
    loss_below: Option<f64>,
    /// Surrogate architecture.
    #[arg(long, value_enum, default_value_t = SurrogateArg::Cnn)]
    surrogate: SurrogateArg,
    /// Seed of every random choice (on the CPU, runs are deterministic per
    /// seed on every x86-64 host with FMA; GPUs and other CPUs may round
    /// differently).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Full parameters (`ProtectParams`): a JSON file, or the JSON itself
    /// (`{...}`). They hold every method setting (seed and device too), so
    /// the other method flags are refused beside them.
    #[arg(long, conflicts_with_all = PARAMS_SETS)]
    params: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    /// Sparsity-aware local masking.
    Salm,
    /// Error-minimising noise on every pixel.
    Em,
    /// Model-free class-wise code: +eps on one sparse lattice of the
    /// pixel grid per class (`--rho` of the pixels); no surrogate.
    Code,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MaskArg {
    /// Saliency where a step is possible inside the box (default).
    Feasible,
    /// The image's own foreground, fixed.
    Foreground,
    /// Feasible saliency weighted towards the foreground.
    GradForeground,
    /// Raw gradient magnitude (ablation).
    Gradient,
    /// Random locations, fixed (ablation).
    Random,
    /// One sparse lattice pattern per class, fixed (model-free code).
    Grating,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RefreshArg {
    Fixed,
    PerRound,
    PerStep,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SurrogateArg {
    /// Small CNN with batch norm, CPU-sized: 32-64 channels on images up
    /// to 12 pixels, 32-64-128 up to 64, a block per halving above.
    Cnn,
    /// ResNet-18 (CIFAR stem, width 64): for GPUs.
    Resnet18,
}

/// Parses `8/255`, `0.0314` or `8/255.0` into a fraction.
fn parse_fraction(s: &str) -> Result<f64, String> {
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let a: f64 = a
                .trim()
                .parse()
                .map_err(|_| format!("bad numerator in {s:?}"))?;
            let b: f64 = b
                .trim()
                .parse()
                .map_err(|_| format!("bad denominator in {s:?}"))?;
            if b == 0.0 {
                return Err(format!("zero denominator in {s:?}"));
            }
            a / b
        }
        None => s
            .trim()
            .parse()
            .map_err(|_| format!("not a number: {s:?}"))?,
    };
    if !(v > 0.0 && v <= 0.25) {
        return Err(format!(
            "{s} = {v:.4} is outside (0, 0.25]: give a fraction of full scale such as 8/255"
        ));
    }
    Ok(v)
}

impl DataArgs {
    fn source(&self) -> anyhow::Result<DataSource> {
        match (&self.input, self.builtin) {
            (Some(path), _) if is_array_file(path) => Ok(DataSource::Npy {
                path: path.clone(),
                images_key: self.images_key.clone(),
                labels_key: self.labels_key.clone(),
                labels_path: self.labels.clone(),
            }),
            (Some(path), _) => {
                anyhow::ensure!(
                    !path.is_file(),
                    "input {} is a file but not .npy/.npz: give a folder with one sub-folder \
                     per class, or a .npy/.npz array",
                    path.display()
                );
                anyhow::ensure!(
                    self.labels.is_none() && self.images_key.is_none() && self.labels_key.is_none(),
                    "--labels, --images-key and --labels-key are for .npy/.npz input; a folder's \
                     classes are its sub-folders"
                );
                Ok(DataSource::Folder { path: path.clone() })
            }
            (None, Some(b)) => Ok(match b {
                Builtin::Digits => DataSource::Digits,
                Builtin::Lesions => DataSource::Lesions(LesionSpec::default()),
                Builtin::Lfw => DataSource::LfwSubset,
                Builtin::DicomPatches => DataSource::DicomPatches { patch: 16 },
                Builtin::MedicalPatches => DataSource::MedicalPatches { patch: 16 },
            }),
            (None, None) => Err(anyhow::format_err!(
                "say what to protect: --input PATH (class folders or .npy/.npz) or --builtin NAME"
            )),
        }
    }
}

impl MethodArgs {
    /// The parameters for images of side `side` (picks the surrogate depth).
    fn params(&self, side: usize) -> anyhow::Result<ProtectParams> {
        if let Some(arg) = &self.params {
            let (text, what) = if arg.trim_start().starts_with('{') {
                (arg.clone(), "the --params JSON".to_string())
            } else {
                let text = std::fs::read_to_string(arg)
                    .with_context(|| format!("reading the --params file {arg}"))?;
                (text, arg.clone())
            };
            let p: ProtectParams =
                serde_json::from_str(&text).with_context(|| format!("parsing {what}"))?;
            p.validate()?;
            return Ok(p);
        }
        let mut p = match self.method {
            MethodArg::Code => {
                // Model-free: no surrogate, mask or stop flags apply.
                anyhow::ensure!(
                    !self.targeted,
                    "--targeted needs a surrogate: use it with --method em or salm"
                );
                let mut p = ProtectParams::lattice_code(self.eps, self.rho);
                p.seed = self.seed;
                p.device = self.device.clone();
                p.validate()?;
                return Ok(p);
            }
            MethodArg::Em => ProtectParams {
                method: Method::Em {
                    classwise: self.classwise,
                },
                ..ProtectParams::em(self.eps)
            },
            MethodArg::Salm => ProtectParams {
                method: Method::Salm {
                    rho: self.rho,
                    mask: match self.mask {
                        MaskArg::Feasible => MaskStrategy::Feasible,
                        MaskArg::Foreground => MaskStrategy::Foreground,
                        MaskArg::GradForeground => MaskStrategy::GradForeground,
                        MaskArg::Gradient => MaskStrategy::Gradient,
                        MaskArg::Random => MaskStrategy::Random,
                        MaskArg::Grating => MaskStrategy::Grating,
                    },
                    refresh: match self.refresh {
                        RefreshArg::Fixed => MaskRefresh::Fixed,
                        RefreshArg::PerRound => MaskRefresh::PerRound,
                        RefreshArg::PerStep => MaskRefresh::PerStep,
                    },
                    classwise: self.classwise,
                },
                ..ProtectParams::salm(self.eps, self.rho)
            },
        };
        p.surrogate = match self.surrogate {
            SurrogateArg::Cnn => Arch::cnn_for_side(side, 32),
            SurrogateArg::Resnet18 => Arch::Resnet18 { width: 64 },
        };
        if self.classwise {
            // Huang et al.: class-wise noise needs few steps per batch.
            p.pgd_steps = 5;
            p.stop.min_rounds = 5;
            p.stop.max_rounds = 20;
        }
        if self.targeted {
            p.objective = Objective::Targeted;
        }
        if let Some(s) = self.steps {
            p.pgd_steps = s;
        }
        if let Some(r) = self.freeze_mask_after {
            p.freeze_mask_after = r;
        }
        if let (Some(min), Some(max)) = (self.min_rounds, self.max_rounds) {
            anyhow::ensure!(
                min <= max,
                "--min-rounds {min} is more than --max-rounds {max}"
            );
        }
        if let Some(r) = self.min_rounds {
            p.stop.min_rounds = r;
            p.stop.max_rounds = p.stop.max_rounds.max(r);
        }
        if let Some(r) = self.max_rounds {
            p.stop.max_rounds = r;
            p.stop.min_rounds = p.stop.min_rounds.min(r);
        }
        if let Some(a) = self.target_acc {
            p.stop.train_accuracy = Some(a);
        }
        if let Some(l) = self.loss_below {
            p.stop.loss_below = Some(l);
        }
        p.seed = self.seed;
        p.device = self.device.clone();
        p.validate()?;
        Ok(p)
    }
}

/// Image side of a source (it picks the surrogate's depth), and the
/// dataset when finding the side meant loading it (the built-in datasets'
/// sides are known), so that a protect run reads its source once.
fn side_of(source: &DataSource) -> anyhow::Result<(usize, Option<Dataset>)> {
    Ok(match source {
        DataSource::Digits => (8, None),
        DataSource::Lesions(spec) => (spec.size, None),
        DataSource::LfwSubset => (25, None),
        DataSource::DicomPatches { patch } | DataSource::MedicalPatches { patch } => (*patch, None),
        other => {
            let data = lethe_protect::formats::load(other)?;
            let s = data.shape();
            (s.height.max(s.width), Some(data))
        }
    })
}

/// Runs `lethe protect ...`.
pub fn run(args: ProtectArgs) -> anyhow::Result<()> {
    lethe_protect::tune_cpu_threads();
    match args.command {
        Some(ProtectCommand::Audit(a)) => audit(*a),
        Some(ProtectCommand::Verify(v)) => verify(&v),
        None => {
            let flags = ProtectFlags::from(&args);
            protect(&args.data, &args.method, flags)
        }
    }
}

impl From<&ProtectArgs> for ProtectFlags {
    fn from(args: &ProtectArgs) -> ProtectFlags {
        ProtectFlags {
            output: args.output.clone(),
            checkpoint: args.checkpoint.clone(),
            resume: args.resume,
            no_checkpoint: args.no_checkpoint,
            overwrite: args.overwrite,
            noise_file: args.noise_file.clone(),
            no_noise_file: args.no_noise_file,
            reuse_noise: args.reuse_noise.clone(),
            dry_run: args.dry_run,
            quiet: args.quiet,
            json: args.json,
        }
    }
}

struct ProtectFlags {
    output: Option<PathBuf>,
    checkpoint: Option<PathBuf>,
    resume: bool,
    no_checkpoint: bool,
    overwrite: bool,
    noise_file: Option<PathBuf>,
    no_noise_file: bool,
    reuse_noise: Option<PathBuf>,
    dry_run: bool,
    quiet: bool,
    json: bool,
}

/// Where a run keeps its class noise: the path given, else next to the
/// output for a class-wise crafting run; nowhere when told not to, when
/// reusing a noise, or for a sample-wise method (no class noise).
fn noise_file(f: &ProtectFlags, classwise: bool, output: &Path) -> Option<PathBuf> {
    match (&f.noise_file, f.no_noise_file) {
        (Some(path), _) => Some(path.clone()),
        (None, false) if f.reuse_noise.is_none() && classwise => {
            Some(beside(output, ".noise.safetensors"))
        }
        _ => None,
    }
}

/// `OUTPUT<suffix>` next to the output folder (checkpoint, noise file).
fn beside(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "release".into());
    name.push(suffix);
    output.with_file_name(name)
}

fn protect(data: &DataArgs, method: &MethodArgs, f: ProtectFlags) -> anyhow::Result<()> {
    let source = data.source()?;
    let (side, loaded) = side_of(&source)?;
    let params = method.params(side)?;
    let output = f
        .output
        .clone()
        .ok_or_else(|| anyhow::format_err!("--output DIR is required"))?;
    let noise_file = noise_file(&f, params.method.classwise(), &output);
    let checkpoint_dir = if f.no_checkpoint {
        None
    } else {
        Some(
            f.checkpoint
                .unwrap_or_else(|| beside(&output, ".checkpoint")),
        )
    };
    let cfg = ProtectConfig {
        source,
        output,
        params,
        checkpoint_dir,
        resume: f.resume,
        overwrite: f.overwrite || f.resume,
        progress: !f.quiet && !f.json,
        noise_file,
        reuse_noise: f.reuse_noise,
    };
    if f.dry_run {
        let e = match &loaded {
            Some(dataset) => lethe_protect::estimate_loaded(&cfg, dataset)?,
            None => lethe_protect::estimate(&cfg)?,
        };
        if f.json {
            println!("{}", serde_json::to_string_pretty(&e)?);
        } else if cfg.params.model_free() {
            println!(
                "{} images, model-free (no surrogate, no rounds): the time is reading and \
                 writing the files",
                e.images
            );
        } else {
            println!(
                "{} images, {} noise steps per round at {:.0} image-steps/s: about {} per round, \
                 {} to {} in total ({} to {} rounds)",
                e.images,
                e.image_steps_per_round,
                e.image_steps_per_second,
                duration(e.seconds_per_round),
                duration(e.min_seconds),
                duration(e.max_seconds),
                cfg.params.stop.min_rounds,
                cfg.params.stop.max_rounds
            );
        }
        return Ok(());
    }
    tracing::info!(method = %cfg.params.label(), "protecting");
    let report = match &loaded {
        Some(dataset) => lethe_protect::protect_loaded(&cfg, dataset)?,
        None => lethe_protect::protect(&cfg)?,
    };
    if f.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let q = &report.quality;
    match &cfg.reuse_noise {
        Some(noise) => println!(
            "{}: {} images, {} from {}",
            report.dataset,
            report.images,
            report.method,
            noise.display()
        ),
        None if report.stop_reason == Some(StopReason::ModelFree) => println!(
            "{}: {} images, {}; model-free (no surrogate, no rounds) in {}",
            report.dataset,
            report.images,
            report.method,
            duration(report.seconds)
        ),
        None => println!(
            "{}: {} images, {}; {} round{} ({}) in {}",
            report.dataset,
            report.images,
            report.method,
            report.rounds,
            if report.rounds == 1 { "" } else { "s" },
            StopReason::describe(report.stop_reason),
            duration(report.seconds)
        ),
    }
    println!(
        "quality: PSNR mean {} dB (min {}), SSIM {:.4}, L-inf {:.1}/255, changed pixels {:.1}%",
        db(q.psnr_mean_db),
        db(q.psnr_min_db),
        q.ssim_mean,
        q.linf_max * 255.0,
        100.0 * q.l0_mean
    );
    if let Some(note) = lethe_protect::release::unchanged_note(q) {
        println!("warning: {note}");
    }
    if let Some(note) = lethe_protect::release::weak_release_note(&report, &cfg.params.stop) {
        println!("warning: {note}");
    }
    if let Some(out) = &report.output {
        println!(
            "wrote {} file{} and {} to {}",
            report.files,
            if report.files == 1 { "" } else { "s" },
            lethe_protect::release::MANIFEST_FILE,
            out.display()
        );
        // Auditing the release as `--input` would treat protected images as
        // clean: the release goes to `--release`, beside its clean source.
        println!("check it later: lethe protect verify {}", out.display());
        println!(
            "audit this release: lethe protect audit {} --release {} --out DIR",
            data.flags(),
            out.display()
        );
        if let Some(noise) = &cfg.noise_file {
            println!(
                "class noise kept in {} (secret: it removes the protection; protect images \
                 added later with --reuse-noise {})",
                noise.display(),
                noise.display()
            );
        }
    }
    Ok(())
}

fn audit(a: AuditArgs) -> anyhow::Result<()> {
    let (mut cfg, loaded): (AuditConfig, Option<Dataset>) = match &a.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let cfg = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            (cfg, None)
        }
        None => default_audit(&a)?,
    };
    let extra = release_runs(&a.releases, &a.data, &cfg);
    if cfg.methods.is_empty() && cfg.releases.is_empty() {
        if let Some(first) = extra.first() {
            cfg.headline = Headline {
                salm: first.name.clone(),
                em: None,
            };
        }
    }
    cfg.releases.extend(extra);
    cfg.out_dir = Some(a.out.clone());
    cfg.progress = !a.json;
    let report = match &loaded {
        Some(data) => lethe_protect::audit_loaded(&cfg, data)?,
        None => lethe_protect::audit(&cfg)?,
    };
    let s = &report.summary;
    if a.json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let headline = &report.config.headline.salm;
    println!(
        "{}: victim test accuracy (mean peak) clean {:.1}%, {headline} {:.1}%{}; {headline} PSNR \
         {} dB at eps {:.1}/255, rho {:.2}",
        s.dataset,
        100.0 * s.clean_acc,
        100.0 * s.salm_acc,
        s.em_acc
            .map(|e| format!(", EM {:.1}%", 100.0 * e))
            .unwrap_or_default(),
        db(s.salm_psnr_db),
        s.eps * 255.0,
        s.rho
    );
    if let (Some(w), Some(d)) = (s.salm_acc_worst_defence, &s.worst_defence) {
        println!(
            "worst countermeasure for {headline}: {d} ({:.1}%)",
            100.0 * w
        );
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    println!("report: {}", a.out.join("report.md").display());
    Ok(())
}

fn verify(v: &VerifyArgs) -> anyhow::Result<()> {
    let r = lethe_protect::verify_release(&v.release)?;
    if v.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {} files listed, {} changed, {} missing, {} not listed",
            v.release.display(),
            r.listed,
            r.changed.len(),
            r.missing.len(),
            r.unlisted.len()
        );
        for (what, paths) in [
            ("changed", &r.changed),
            ("missing", &r.missing),
            ("not listed", &r.unlisted),
        ] {
            for p in paths {
                println!("  {what}: {}", p.display());
            }
        }
    }
    if r.intact() {
        Ok(())
    } else {
        Err(anyhow::format_err!(
            "{} does not match its manifest",
            v.release.display()
        ))
    }
}

/// A `.npy` / `.npz` path (any case); anything else is a folder.
fn is_array_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npy") || e.eq_ignore_ascii_case("npz"))
}

/// The array file of an array release given by its folder: a folder
/// without sub-folders holding one `.npz`, or one `.npy` besides the
/// labels file. `None` for anything else (a folder release).
fn array_release_file(path: &Path, data: &DataArgs) -> Option<PathBuf> {
    let entries: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if entries.iter().any(|p| p.is_dir()) {
        return None;
    }
    let labels = data.labels.as_ref().and_then(|l| l.file_name());
    let arrays: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| is_array_file(p) && p.file_name() != labels)
        .collect();
    match arrays.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

/// `--release` paths as audit entries, named after their folders (made
/// unique among `cfg`'s methods and releases).
fn release_runs(paths: &[PathBuf], data: &DataArgs, cfg: &AuditConfig) -> Vec<ReleaseRun> {
    let mut taken: Vec<String> = cfg
        .methods
        .iter()
        .map(|m| m.name.clone())
        .chain(cfg.releases.iter().map(|r| r.name.clone()))
        .chain(["clean".to_string()])
        .collect();
    paths
        .iter()
        .map(|path| {
            let array_in_folder = array_release_file(path, data);
            let path = array_in_folder.as_ref().unwrap_or(path);
            let is_array = is_array_file(path);
            let folder = if is_array {
                path.parent()
            } else {
                Some(path.as_path())
            };
            let base = folder
                .and_then(|f| f.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "release".into());
            let mut name = base.clone();
            let mut k = 2;
            while taken.contains(&name) {
                name = format!("{base}-{k}");
                k += 1;
            }
            taken.push(name.clone());
            let source = if is_array {
                DataSource::Npy {
                    path: path.clone(),
                    images_key: data.images_key.clone(),
                    labels_key: data.labels_key.clone(),
                    // A release writes its labels file under the same name.
                    labels_path: data
                        .labels
                        .as_ref()
                        .and_then(|l| Some(path.parent()?.join(l.file_name()?))),
                }
            } else {
                DataSource::Folder { path: path.clone() }
            };
            ReleaseRun { name, source }
        })
        .collect()
}

/// SALM (the flags) and EM at the same eps, two victims, the suite; with
/// `--release`, no crafting: the releases are the audited data. Also
/// returns the dataset when sizing the models meant reading it, for the
/// audit to use instead of reading it again.
fn default_audit(a: &AuditArgs) -> anyhow::Result<(AuditConfig, Option<Dataset>)> {
    // The default audit crafts SALM and EM from the budget flags; a method
    // of the caller's own choosing is an audit spec's job.
    anyhow::ensure!(
        a.method.params.is_none(),
        "audit crafts SALM and EM from the budget flags (--eps, --rho, ...) and does not take \
         --params: to audit other parameters, list them in an audit spec (--spec FILE, the \
         JSON of evals/protect/lesions.json), or protect with them and audit the release \
         (--release DIR)"
    );
    anyhow::ensure!(
        a.method.method == MethodArg::Salm,
        "audit crafts SALM and EM both, so --method does not apply: to audit another method, \
         protect with it and audit the release (--release DIR), or write an audit spec (--spec)"
    );
    let source = a.data.source()?;
    let (side, loaded) = side_of(&source)?;
    let salm = MethodArgs {
        method: MethodArg::Salm,
        params: None,
        ..a.method.clone_flags()
    }
    .params(side)?;
    let em = MethodArgs {
        method: MethodArg::Em,
        params: None,
        ..a.method.clone_flags()
    }
    .params(side)?;
    let e8 = 8.0 / 255.0;
    let defences = vec![
        Defence::Grayscale,
        Defence::Jpeg { quality: 10 },
        Defence::Jpeg { quality: 30 },
        Defence::Jpeg { quality: 50 },
        Defence::Jpeg { quality: 75 },
        Defence::Blur { sigma: 1.0 },
        Defence::Median,
        Defence::Noise { sigma: e8 },
        Defence::FlipCrop,
        Defence::Cutout {
            size: (side / 4).max(2),
        },
        Defence::Mixup { alpha: 1.0 },
        Defence::Adversarial {
            eps: 4.0 / 255.0,
            steps: 3,
        },
    ];
    let cfg = AuditConfig {
        source,
        test_fraction: a.test_fraction,
        split_seed: 0,
        methods: if a.releases.is_empty() {
            vec![
                MethodRun {
                    name: "salm".into(),
                    params: salm,
                },
                MethodRun {
                    name: "em".into(),
                    params: em,
                },
            ]
        } else {
            Vec::new()
        },
        releases: Vec::new(),
        victims: vec![Arch::cnn_for_side(side, 16), Arch::Resnet18 { width: 8 }],
        seeds: a.seeds.clone(),
        victim: VictimConfig {
            epochs: a.epochs,
            batch: 64,
            sgd: SgdParams {
                lr: 0.05,
                ..SgdParams::unlearnable_examples()
            },
        },
        robustness: (!a.no_robustness).then_some(RobustnessConfig {
            defences,
            methods: Vec::new(),
            arch: 0,
            seed: a.seeds.first().copied().unwrap_or(0),
        }),
        headline: Headline {
            salm: "salm".into(),
            em: Some("em".into()),
        },
        out_dir: None,
        device: a.method.device.clone(),
        progress: true,
    };
    Ok((cfg, loaded))
}

impl DataArgs {
    /// The data flags as they would be typed.
    fn flags(&self) -> String {
        let mut f = match (&self.input, self.builtin) {
            (Some(p), _) => format!("--input {}", p.display()),
            (None, Some(b)) => format!(
                "--builtin {}",
                b.to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            ),
            (None, None) => String::new(),
        };
        for (flag, v) in [
            (
                "--labels",
                self.labels.as_ref().map(|p| p.display().to_string()),
            ),
            ("--images-key", self.images_key.clone()),
            ("--labels-key", self.labels_key.clone()),
        ] {
            if let Some(v) = v {
                f.push_str(&format!(" {flag} {v}"));
            }
        }
        f
    }
}

impl MethodArgs {
    fn clone_flags(&self) -> MethodArgs {
        MethodArgs {
            method: self.method,
            eps: self.eps,
            rho: self.rho,
            classwise: self.classwise,
            targeted: self.targeted,
            mask: self.mask,
            refresh: self.refresh,
            freeze_mask_after: self.freeze_mask_after,
            steps: self.steps,
            min_rounds: self.min_rounds,
            max_rounds: self.max_rounds,
            target_acc: self.target_acc,
            loss_below: self.loss_below,
            surrogate: self.surrogate,
            seed: self.seed,
            device: self.device.clone(),
            params: self.params.clone(),
        }
    }
}

fn db(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

fn duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProtectArgs,
    }

    fn parse(argv: &[&str]) -> ProtectArgs {
        let mut full = vec!["lethe-protect"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full) {
            Ok(c) => c.args,
            Err(e) => panic!("{argv:?} did not parse: {e}"),
        }
    }

    /// `argv` parsed as the `audit` subcommand.
    fn audit_args(argv: &[&str]) -> AuditArgs {
        match parse(argv).command {
            Some(ProtectCommand::Audit(audit)) => *audit,
            _ => panic!("audit was not parsed as the subcommand"),
        }
    }

    #[test]
    fn eps_accepts_fractions_and_refuses_nonsense() {
        assert!((parse_fraction("8/255").unwrap_or(0.0) - 8.0 / 255.0).abs() < 1e-12);
        assert!((parse_fraction("0.0314").unwrap_or(0.0) - 0.0314).abs() < 1e-12);
        assert!(parse_fraction("8").is_err());
        assert!(parse_fraction("8/0").is_err());
        assert!(parse_fraction("x/255").is_err());
        assert!(parse_fraction("-1/255").is_err());
    }

    #[test]
    fn the_issue_command_line_builds_salm_params() {
        let a = parse(&[
            "--builtin",
            "lesions",
            "--method",
            "salm",
            "--eps",
            "8/255",
            "--rho",
            "0.1",
            "-o",
            "/tmp/x",
        ]);
        assert!(a.command.is_none());
        let p = a.method.params(32).expect("valid params");
        assert_eq!(
            p.method,
            Method::Salm {
                rho: 0.1,
                mask: MaskStrategy::Feasible,
                refresh: MaskRefresh::PerRound,
                classwise: false
            }
        );
        assert!((p.eps - 8.0 / 255.0).abs() < 1e-12);
        assert_eq!(
            p.surrogate,
            Arch::Cnn {
                channels: vec![32, 64, 128],
                batch_norm: true
            }
        );
        assert!(matches!(a.data.source(), Ok(DataSource::Lesions(_))));
        // Digits-sized and slice-sized images get their own depth.
        for (side, channels) in [(8, vec![32, 64]), (512, vec![8, 8, 16, 32, 64, 128])] {
            assert_eq!(
                a.method.params(side).unwrap().surrogate,
                Arch::Cnn {
                    channels,
                    batch_norm: true
                },
                "side {side}"
            );
        }
    }

    #[test]
    fn method_code_builds_the_lattice_code() {
        let a = parse(&[
            "--builtin",
            "lesions",
            "--method",
            "code",
            "--rho",
            "0.25",
            "--seed",
            "3",
            "-o",
            "/tmp/x",
        ]);
        let p = a.method.params(32).expect("valid params");
        let mut want = ProtectParams::lattice_code(8.0 / 255.0, 0.25);
        want.seed = 3;
        assert_eq!(p, want);
        assert!(matches!(
            p.method,
            Method::Salm {
                mask: MaskStrategy::Grating,
                classwise: true,
                ..
            }
        ));
        let bad = parse(&[
            "--builtin",
            "lesions",
            "--method",
            "code",
            "--rho",
            "0",
            "-o",
            "/x",
        ]);
        assert!(bad.method.params(32).is_err());
    }

    #[test]
    fn targeted_flag_sets_the_objective_and_needs_a_surrogate() {
        let args = [
            "--builtin",
            "lesions",
            "--targeted",
            "--rho",
            "0.25",
            "-o",
            "/x",
        ];
        let p = parse(&args).method.params(32).expect("valid params");
        assert_eq!(p.objective, Objective::Targeted);
        let plain = parse(&["--builtin", "lesions", "-o", "/x"]);
        let p = plain.method.params(32).expect("valid params");
        assert_eq!(p.objective, Objective::ErrorMinimising);
        let code = parse(&[
            "--builtin",
            "lesions",
            "--method",
            "code",
            "--targeted",
            "-o",
            "/x",
        ]);
        let e = code.method.params(32).unwrap_err().to_string();
        assert!(e.contains("--targeted"), "{e}");
    }

    /// `argv`'s parse error, or a panic when it parses.
    fn refused(argv: &[&str]) -> String {
        let mut full = vec!["lethe-protect"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full) {
            Ok(_) => panic!("{argv:?} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_refusal_lists_name_every_method_flag() {
        use clap::Args as _;
        let cmd = MethodArgs::augment_args(clap::Command::new("m"));
        let ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
        // A flag added to MethodArgs must join the lists (or be --device /
        // --params, which they name by hand).
        for id in &ids {
            assert!(
                CRAFTING_FLAGS.contains(id) || *id == "device",
                "--{id} is missing from crafting_flags_and!"
            );
            assert!(PARAMS_SETS.contains(id) || *id == "params", "{id}");
            assert!(
                REUSE_CONFLICTS.contains(id) && SPEC_SETS.contains(id),
                "{id}"
            );
        }
        assert_eq!(ids.len(), 17);
    }

    #[test]
    fn flags_that_would_be_ignored_are_refused() {
        // Nothing is crafted for a written release.
        let e = refused(&[
            "audit",
            "--builtin",
            "digits",
            "--release",
            "r",
            "--eps",
            "4/255",
        ]);
        assert!(e.contains("--eps") && e.contains("--release"), "{e}");
        refused(&[
            "audit",
            "--builtin",
            "lesions",
            "--release",
            "r",
            "--method",
            "em",
        ]);
        // A spec fixes the method, victims and split.
        for flag in [["--epochs", "3"], ["--rho", "0.2"], ["--device", "cuda"]] {
            let e = refused(&["audit", "--spec", "s.json", flag[0], flag[1]]);
            assert!(e.contains(flag[0]), "{e}");
        }
        refused(&["audit", "--spec", "s.json", "--no-robustness"]);
        // Full parameters fix every method flag, seed included.
        let e = refused(&["-o", "o", "--params", "{}", "--seed", "3"]);
        assert!(e.contains("--params") && e.contains("--seed"), "{e}");
        refused(&["-o", "o", "--params", "p.json", "--classwise"]);
        // Still fine: the release with victim flags, a spec with a release.
        let ok = audit_args(&[
            "audit",
            "--builtin",
            "digits",
            "--release",
            "r",
            "--epochs",
            "3",
        ]);
        assert_eq!(ok.epochs, 3);
        audit_args(&["audit", "--spec", "s.json", "--release", "r"]);
        // The default audit crafts SALM and EM itself.
        let p = audit_args(&["audit", "--builtin", "digits", "--params", "{}"]);
        let e = format!("{:#}", default_audit(&p).unwrap_err());
        assert!(e.contains("--params") && e.contains("--spec"), "{e}");
        assert!(!e.contains("  "), "a message runs on with spaces: {e}");
        let m = audit_args(&["audit", "--builtin", "digits", "--method", "code"]);
        let e = format!("{:#}", default_audit(&m).unwrap_err());
        assert!(e.contains("--method") && !e.contains("  "), "{e}");
    }

    #[test]
    fn audit_is_a_subcommand_and_bad_rho_is_refused() {
        let audit = audit_args(&[
            "audit",
            "--builtin",
            "digits",
            "--classwise",
            "--rho",
            "0.25",
        ]);
        let (cfg, _) = default_audit(&audit).expect("a default audit");
        assert_eq!(cfg.methods.len(), 2);
        assert!(matches!(
            cfg.methods[1].params.method,
            Method::Em { classwise: true }
        ));
        let bad = parse(&["--builtin", "digits", "--rho", "1.5", "-o", "/tmp/x"]);
        assert!(bad.method.params(8).is_err());
    }

    #[test]
    fn npy_inputs_and_checkpoint_paths() {
        let a = parse(&["-i", "data/x.npz", "-o", "out/rel"]);
        assert!(matches!(a.data.source(), Ok(DataSource::Npy { .. })));
        assert_eq!(
            beside(Path::new("out/rel"), ".checkpoint"),
            PathBuf::from("out/rel.checkpoint")
        );
        let none = parse(&["-o", "out/rel"]);
        assert!(none.data.source().is_err());
    }

    #[test]
    fn inconsistent_flags_are_refused_and_params_may_be_inline() {
        let a = parse(&["-o", "o", "--min-rounds", "3", "--max-rounds", "1"]);
        let e = a.method.params(32).unwrap_err().to_string();
        assert!(
            e.contains("--min-rounds 3 is more than --max-rounds 1"),
            "{e}"
        );
        // One bound alone moves the default other one.
        let a = parse(&["-o", "o", "--max-rounds", "1"]);
        let p = a.method.params(32).unwrap();
        assert_eq!((p.stop.min_rounds, p.stop.max_rounds), (1, 1));
        // Negative numbers reach the range checks instead of clap's
        // "unexpected argument".
        let a = parse(&["-o", "o", "--rho", "-0.1"]);
        let e = a.method.params(32).unwrap_err().to_string();
        assert!(e.contains("rho must be in (0, 1]"), "{e}");
        let json = serde_json::to_string(&ProtectParams::em(4.0 / 255.0)).unwrap();
        let a = parse(&["-o", "o", "--params", &json]);
        let p = a.method.params(32).unwrap();
        assert!((p.eps - 4.0 / 255.0).abs() < 1e-12);
        let a = parse(&["-o", "o", "--params", "{bad"]);
        let e = format!("{:#}", a.method.params(32).unwrap_err());
        assert!(e.contains("parsing the --params JSON"), "{e}");
        // Array options on a folder would be ignored: refused instead.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let a = parse(&["-i", d, "-o", "o", "--labels", "y.npy"]);
        let e = a.data.source().unwrap_err().to_string();
        assert!(e.contains("for .npy/.npz input"), "{e}");
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, b"x").unwrap();
        let a = parse(&["-i", file.to_str().unwrap(), "-o", "o"]);
        let e = a.data.source().unwrap_err().to_string();
        assert!(e.contains("is a file but not .npy/.npz"), "{e}");
    }

    #[test]
    fn class_noise_is_kept_beside_the_output_for_class_wise_crafting() {
        let kept = |argv: &[&str]| {
            let a = parse(argv);
            let classwise = a.method.params(32).unwrap().method.classwise();
            noise_file(&ProtectFlags::from(&a), classwise, Path::new("out/rel"))
        };
        let beside_out = Some(PathBuf::from("out/rel.noise.safetensors"));
        assert_eq!(kept(&["--method", "code", "-o", "out/rel"]), beside_out);
        assert_eq!(kept(&["--classwise", "-o", "out/rel"]), beside_out);
        // Sample-wise runs have no class noise; asked not to; reusing one.
        assert_eq!(kept(&["-o", "out/rel"]), None);
        assert_eq!(kept(&["--method", "code", "--no-noise-file"]), None);
        assert_eq!(kept(&["--reuse-noise", "k.safetensors"]), None);
        assert_eq!(
            kept(&["--classwise", "--noise-file", "keys/k.safetensors"]),
            Some(PathBuf::from("keys/k.safetensors"))
        );
        // Reusing a noise crafts nothing: no resume, no dry run, and the
        // noise file's own method and budget.
        for extra in [
            "--resume",
            "--dry-run",
            "--classwise",
            "--seed=2",
            "--eps=4/255",
        ] {
            let argv = ["lethe-protect", "--reuse-noise", "k.safetensors", extra];
            assert!(Cli::try_parse_from(argv).is_err(), "{extra}");
        }
    }

    #[test]
    fn releases_are_audited_without_crafting_under_unique_names() {
        let digits = audit_args(&["audit", "--builtin", "digits", "--release", "out/rel"]);
        let (cfg, _) = default_audit(&digits).expect("a default audit");
        assert!(cfg.methods.is_empty());
        let audit = audit_args(&[
            "audit",
            "-i",
            "data/x.npy",
            "--labels",
            "data/y.npy",
            "--release",
            "out/rel",
            "--release",
            "other/rel",
            "--release",
            "arr/set.npy",
        ]);
        let runs = release_runs(&audit.releases, &audit.data, &cfg);
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["rel", "rel-2", "arr"]);
        assert_eq!(
            runs[0].source,
            DataSource::Folder {
                path: "out/rel".into()
            }
        );
        // An array release carries its labels file under the source's name.
        let DataSource::Npy { labels_path, .. } = &runs[2].source else {
            panic!("{:?}", runs[2].source);
        };
        assert_eq!(labels_path.as_deref(), Some(Path::new("arr/y.npy")));
        assert_eq!(audit.data.flags(), "--input data/x.npy --labels data/y.npy");
        let builtin = parse(&["--builtin", "dicom-patches", "-o", "o"]);
        assert_eq!(builtin.data.flags(), "--builtin dicom-patches");
        let colour = parse(&["--builtin", "medical-patches", "-o", "o"]);
        assert!(matches!(
            colour.data.source(),
            Ok(DataSource::MedicalPatches { patch: 16 })
        ));
    }

    #[test]
    fn an_array_release_may_be_named_by_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let npz = dir.path().join("npz-rel");
        std::fs::create_dir(&npz).unwrap();
        std::fs::write(npz.join("d.npz"), b"x").unwrap();
        std::fs::write(npz.join("manifest.json"), b"{}").unwrap();
        let npy = dir.path().join("npy-rel");
        std::fs::create_dir(&npy).unwrap();
        std::fs::write(npy.join("x.npy"), b"x").unwrap();
        std::fs::write(npy.join("y.npy"), b"x").unwrap();
        let folder = dir.path().join("png-rel");
        std::fs::create_dir_all(folder.join("a")).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let audit = audit_args(&[
            "audit",
            "-i",
            "data/x.npy",
            "--labels",
            "data/y.npy",
            "--release",
            &s(&npz),
            "--release",
            &s(&npy),
            "--release",
            &s(&folder),
        ]);
        let digits = audit_args(&["audit", "--builtin", "digits", "--release", "r"]);
        let (cfg, _) = default_audit(&digits).expect("a default audit");
        let runs = release_runs(&audit.releases, &audit.data, &cfg);
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["npz-rel", "npy-rel", "png-rel"]);
        let array = |r: &ReleaseRun| match &r.source {
            DataSource::Npy { path, .. } => Some(path.clone()),
            _ => None,
        };
        assert_eq!(array(&runs[0]), Some(npz.join("d.npz")));
        // The labels file is told apart by the source's labels name.
        assert_eq!(array(&runs[1]), Some(npy.join("x.npy")));
        assert_eq!(array(&runs[2]), None);
    }
}
