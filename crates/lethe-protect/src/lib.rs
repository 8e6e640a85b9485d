//! Protecting image datasets before release: error-minimising noise (EM)
//! and its sparse, local variant SALM, with an audit that measures whether
//! the protection works and what defeats it.
//!
//! A hospital that publishes an imaging dataset can add small, structured
//! noise so that models trained on the release learn the noise instead of
//! the anatomy and fail on real images ("unlearnable examples", Huang et
//! al., ICLR 2021), while the images stay visually and clinically usable.
//! SALM (Sun et al., arXiv 2403.10573) confines that noise to the most
//! salient pixels, which suits sparse medical images. SALM's equations are
//! not public: this crate implements the reconstruction written down in
//! `shared/research/protection-salm.md` (tagged \[R\] there), including the
//! fix its failed mini-replication called for (rank only pixels where a
//! step is actually possible; see [`protect::mask`]). Claims about it are
//! only as good as the [`audit()`] numbers.
//!
//! The pieces:
//!
//! * [`dataset::Dataset`]: same-shaped images in `[0, 1]`, labels, and per
//!   image where it came from, so the release is written in the source's
//!   format ([`formats`]: folder-per-class PNG 8/16-bit gray/RGB, NumPy
//!   `.npy`/`.npz`, DICOM with every tag kept) or comes from [`sources`]
//!   (scikit-learn digits, scikit-image LFW subset and histology/fundus
//!   colour tiles, pydicom CT/MR tiles, a generated sparse "lesion" set).
//! * [`mod@protect`]: the min-min optimisation with stop rules that do not fire
//!   too early, checkpoint/resume, determinism per seed, progress, a
//!   dry-run [`estimate`] and the choice of the released round's noise
//!   ([`Release`]: final round, best surrogate round, or the round whose
//!   proxy victim generalises worst to a clean holdout, [`ProxyVictim`]);
//!   the surrogate and victims are `lethe-model`'s
//!   CNN and ResNet-18 (`model`, crate-private).
//! * [`release`]: [`protect()`] on files: load, protect, write the release
//!   and a `manifest.json` with hashes, method, parameters and seed.
//! * [`audit()`]: fresh victims (several architectures and seeds) on clean
//!   vs protected training splits, the [`defence`] robustness suite
//!   (grayscale, JPEG, blur, median, noise, flip/crop, cutout, mixup,
//!   adversarial training), [`metrics`] (PSNR, SSIM, L-inf, L0),
//!   [`figures`]; `report.json` (with the headline `summary`), `report.md`
//!   and PNGs.
//!
//! The frontends (`lethe protect ...` and `lethe protect audit ...`, in
//! `lethe-cli`'s `protect` module) pass plain config structs
//! ([`ProtectConfig`], [`AuditConfig`]); nothing here parses arguments or
//! prints. The evaluation behind `evals/results/protect/` is the
//! `protect_eval` example run on the audit configs in `evals/protect/`;
//! the throughput benchmark is the `bench_protect` example. Only `lethe-model` chooses devices; this crate asks it to open
//! the one named in a config (`cpu` by default). Library code logs with
//! `tracing` and reports failures through [`Error`].
//!
//! ```no_run
//! use lethe_protect::{protect, DataSource, ProtectConfig, ProtectParams};
//! let report = protect(&ProtectConfig {
//!     progress: true,
//!     ..ProtectConfig::new(
//!         DataSource::Folder { path: "scans/".into() },
//!         "scans-protected/",
//!         ProtectParams::salm(8.0 / 255.0, 0.1),
//!     )
//! })
//! .unwrap();
//! assert!(report.quality.linf_max <= 8.0 / 255.0 + 0.5 / 255.0);
//! ```

pub mod audit;
pub mod class_noise;
pub mod dataset;
pub mod defence;
mod error;
pub mod figures;
pub mod formats;
pub mod metrics;
mod model;
pub mod protect;
pub mod release;
pub mod sources;
pub mod victim;

pub use audit::{
    audit, audit_loaded, AuditConfig, AuditReport, Headline, MethodRun, ReleaseRun,
    RobustnessConfig,
};
pub use class_noise::ClassNoise;
pub use dataset::{Dataset, ImageShape};
pub use defence::Defence;
pub use error::{Error, Result};
pub use formats::DataSource;
pub use model::{Arch, SgdParams};
pub use protect::mask::{MaskRefresh, MaskStrategy};
pub use protect::{
    Estimate, Method, Objective, ProtectParams, ProxyVictim, Release, RunControl, StopReason,
    StopRule,
};
pub use release::{
    estimate, estimate_loaded, protect, protect_loaded, protect_with, read_release, verify_release,
    ProtectConfig, ProtectReport, ReadRelease, ReleasedRun, VerifyReport,
};
pub use sources::LesionSpec;
pub use victim::VictimConfig;

/// Sets the thread knobs that make candle's CPU training fast (element-wise
/// ops on one thread, matrix multiplies on every core) unless the caller
/// already set them. Call it first thing in a binary, before any tensor
/// work: candle reads them once. Returns the core count.
pub fn tune_cpu_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    cores
}
