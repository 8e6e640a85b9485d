//! What a protection run is asked to do: the method, budgets, surrogates,
//! stop rule and release rule ([`ProtectParams`]), and their validation.
//! Kept apart from the loop in [`super`] so that the settings a user or a
//! config file can give read in one place.

use lethe_model::DeviceSpec;
use serde::{Deserialize, Serialize};

use super::mask::{MaskRefresh, MaskStrategy};
use super::proxy::ProxyVictim;
use super::RoundLog;
use crate::model::{Arch, SgdParams};
use crate::{Error, Result};

/// Which noise to compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Method {
    /// Error-minimising noise on every pixel (Huang et al. 2021).
    Em {
        /// One noise per class instead of one per image.
        #[serde(default)]
        classwise: bool,
    },
    /// Sparsity-aware local masking: EM confined to a per-image (or
    /// per-class) mask of a fraction `rho` of the pixel locations.
    Salm {
        /// Fraction of pixel locations that may change, in (0, 1].
        rho: f64,
        /// How mask pixels are ranked.
        mask: MaskStrategy,
        /// When masks are recomputed.
        refresh: MaskRefresh,
        /// One noise and one mask per class.
        #[serde(default)]
        classwise: bool,
    },
}

impl Method {
    /// `em`, `em-classwise`, `salm`, `salm-classwise`.
    pub fn label(&self) -> &'static str {
        match self {
            Method::Em { classwise: false } => "em",
            Method::Em { classwise: true } => "em-classwise",
            Method::Salm {
                classwise: false, ..
            } => "salm",
            Method::Salm {
                classwise: true, ..
            } => "salm-classwise",
        }
    }

    /// Whether one noise (and mask) serves every image of a class.
    pub fn classwise(&self) -> bool {
        match self {
            Method::Em { classwise } | Method::Salm { classwise, .. } => *classwise,
        }
    }
}

/// What the noise steps optimise.
///
/// Error-minimising noise (the default) is a shortcut: it makes the
/// protected images *easy*, so a victim fits the noise instead of the
/// content. Targeted adversarial noise (Fowl et al., NeurIPS 2021, "TAP" in
/// the research notes' section 2.7) does the opposite with a surrogate
/// trained on the *clean* images: it moves every image of class `c`
/// towards class `c + 1` (mod the class count). A victim trained on the
/// release learns the next class's non-robust features under the wrong
/// label and, on clean test images, confuses the classes: the anchor is
/// below chance on CIFAR-10 (8.17 % at 8/255). It needs classes that are
/// not robust at the budget: on the generated lesions and on digits at
/// 8/255 (rho 0.25) at most 16 % of the images reach their target on the
/// weaker of two surrogates, and fresh victims lose 6-19 points on the
/// lesions and none on digits (`evals/results/protect/
/// supplementary-selection-seed1`, rows x, y, digits-x).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Huang et al.'s min-min: surrogates train on the protected images and
    /// the noise descends their loss at the true label.
    #[default]
    ErrorMinimising,
    /// Surrogates train on the clean images; the noise descends their loss
    /// at the target label `(y + 1) mod classes`. Class-wise cross pairs
    /// and the shortcut accuracy (a min-min notion) do not apply.
    Targeted,
}

impl Objective {
    fn is_default(&self) -> bool {
        *self == Objective::ErrorMinimising
    }

    /// The label that noise made for class `c` aims at, of `classes`.
    pub(crate) fn target(self, c: usize, classes: usize) -> u32 {
        match self {
            Objective::ErrorMinimising => c as u32,
            Objective::Targeted => ((c + 1) % classes.max(1)) as u32,
        }
    }
}

/// When the noise optimisation stops.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRule {
    /// Never stop before this many rounds.
    pub min_rounds: usize,
    /// Always stop after this many rounds.
    pub max_rounds: usize,
    /// Stop (after `min_rounds`) once the surrogate's accuracy on the
    /// protected images reaches this.
    pub train_accuracy: Option<f64>,
    /// Stop (after `min_rounds`) once its mean cross-entropy on them falls
    /// below this.
    pub loss_below: Option<f64>,
    /// The accuracy or loss condition must hold for this many consecutive
    /// rounds (1: the first round it holds; 0 is read as 1). A surrogate
    /// that fits nearly clean images reaches the accuracy target long before
    /// a shortcut has formed; asking for the condition over several rounds
    /// keeps optimising the noise against a surrogate that has converged.
    #[serde(default = "one")]
    pub patience: usize,
    /// Besides, the accuracy or loss condition only counts once the noise
    /// decides the label: the surrogate's accuracy *towards the noise's
    /// label* on mismatched pairs (image of one class, noise of another,
    /// [`RoundLog::shortcut_accuracy`]) is at least this.
    #[serde(default)]
    pub shortcut_accuracy: Option<f64>,
}

fn one() -> usize {
    1
}

impl StopRule {
    /// `min_rounds..=max_rounds` rounds, stop at `train_accuracy` or a
    /// loss below `loss_below` on the first round it holds, no shortcut
    /// condition.
    pub fn new(
        min_rounds: usize,
        max_rounds: usize,
        train_accuracy: Option<f64>,
        loss_below: Option<f64>,
    ) -> StopRule {
        StopRule {
            min_rounds,
            max_rounds,
            train_accuracy,
            loss_below,
            patience: 1,
            shortcut_accuracy: None,
        }
    }
}

/// Which round's noise a run releases.
///
/// `best_round` and `proxy_victim` keep a copy of the noise (and mask) of
/// the best round so far and release that one; the round is chosen among
/// all rounds run, the stop rule decides only how many there are.
///
/// - `best_round`: the best round is the one with the highest
///   [`RoundLog::shortcut_accuracy`] (the mismatched-pairs accuracy that
///   the stop rule's `shortcut_accuracy` condition reads; for an ensemble,
///   the lowest over the surrogates); among rounds with equal shortcut
///   accuracy, the one with the lower surrogate loss ([`RoundLog::loss`]);
///   then the earlier one. A round whose shortcut accuracy was not
///   measured (one class) ranks below every measured one, so with a single
///   class the lowest loss decides.
/// - `proxy_victim` ([`ProxyVictim`]): the best round is the measured one
///   with the lowest [`RoundLog::proxy_accuracy`], the peak accuracy on a
///   clean holdout of the crafting data of a fresh small model trained on
///   the round's protected images (see [`proxy`](super::proxy)); on equal
///   accuracy the later round. Unmeasured rounds are never released (if
///   none was measured, the final round is).
/// - `final_round` (the default) releases the noise of the last round, as
///   every run did before this option existed; see [`protect`](super)'s
///   module docs for why `best_round` is not the default.
///
/// In JSON: `"final_round"`, `"best_round"`, or `{"proxy_victim": {...}}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// The noise of the round with the best surrogate shortcut accuracy.
    BestRound,
    /// The noise of the last round.
    #[default]
    FinalRound,
    /// The noise of the round whose proxy victim generalised worst.
    ProxyVictim(ProxyVictim),
}

impl Release {
    /// Whether round `b` is strictly better than round `a` under the
    /// `best_round` rule (the earlier round wins full ties; NaN never wins).
    pub(crate) fn better(b: &RoundLog, a: &RoundLog) -> bool {
        let key = |l: &RoundLog| l.shortcut_accuracy.filter(|x| !x.is_nan()).unwrap_or(-1.0);
        let (kb, ka) = (key(b), key(a));
        if kb != ka {
            return kb > ka;
        }
        b.loss < a.loss || (a.loss.is_nan() && !b.loss.is_nan())
    }

    /// Whether `later` replaces `earlier` as the kept round under this
    /// rule (false for `final_round`, which keeps none).
    pub(crate) fn replaces(&self, later: &RoundLog, earlier: &RoundLog) -> bool {
        match self {
            Release::FinalRound => false,
            Release::BestRound => Release::better(later, earlier),
            Release::ProxyVictim(_) => {
                let Some(b) = later.proxy_accuracy.filter(|x| !x.is_nan()) else {
                    return false;
                };
                earlier
                    .proxy_accuracy
                    .filter(|x| !x.is_nan())
                    .is_none_or(|a| b <= a)
            }
        }
    }

    /// Whether `log` may be kept as the first candidate.
    pub(crate) fn candidate(&self, log: &RoundLog) -> bool {
        match self {
            Release::FinalRound => false,
            Release::BestRound => true,
            Release::ProxyVictim(_) => log.proxy_accuracy.is_some_and(|x| !x.is_nan()),
        }
    }

    /// The proxy settings of a `proxy_victim` release.
    pub fn proxy(&self) -> Option<&ProxyVictim> {
        match self {
            Release::ProxyVictim(p) => Some(p),
            _ => None,
        }
    }
}

/// Everything that determines the noise (with the data and the seed, the
/// result is a pure function of this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectParams {
    /// EM or SALM and their options.
    pub method: Method,
    /// What the noise steps optimise (default error-minimising; see
    /// [`Objective`]).
    #[serde(default, skip_serializing_if = "Objective::is_default")]
    pub objective: Objective,
    /// L-inf budget as a fraction of full scale (8/255 = 0.0314), in
    /// (0, 0.25].
    pub eps: f64,
    /// Sign-gradient step (default `eps / 10`).
    #[serde(default)]
    pub step_size: Option<f64>,
    /// Noise steps per batch per round (20 sample-wise in Huang's code,
    /// 1 class-wise). 0 only with a `synthetic_start`: the start is then
    /// released as it is (a model-free code).
    pub pgd_steps: usize,
    /// Images per noise batch.
    pub pgd_batch: usize,
    /// The surrogate architecture.
    pub surrogate: Arch,
    /// Further surrogates trained alongside `surrogate` (each with its own
    /// weights and optimiser state, on the same batches; at most 7). The
    /// noise steps follow the sum of all surrogates' input gradients, so
    /// the noise has to be a shortcut for every architecture, not only for
    /// one (noise made against a flatten-head CNN alone transfers poorly to
    /// a global-pooling ResNet, and the reverse). A round's accuracy and
    /// shortcut accuracy are the lowest, its loss the highest, over the
    /// surrogates.
    #[serde(default)]
    pub ensemble: Vec<Arch>,
    /// Learning rate of each `ensemble` member, in the same order (empty,
    /// the default: every member uses `sgd.lr`). Momentum, weight decay and
    /// clipping stay those of `sgd`. A global-pooling ResNet member can
    /// need a lower rate than the main CNN surrogate to train stably on
    /// the same batches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ensemble_lr: Vec<f64>,
    /// Surrogate optimiser (of `surrogate`, and of every ensemble member
    /// except for the learning rate where `ensemble_lr` sets one).
    pub sgd: SgdParams,
    /// Surrogate SGD steps per round.
    pub train_steps_per_round: usize,
    /// Images per surrogate step.
    pub train_batch: usize,
    /// Stop rule.
    pub stop: StopRule,
    /// Forward passes (train mode, no weight update) over random batches
    /// of protected images after each round's surrogate steps, so that the
    /// batch-norm running statistics used by the eval-mode noise steps
    /// match the current weights (0: none). Without it a fast-moving
    /// surrogate's eval mode can be far off its train mode and the noise
    /// follows a meaningless gradient.
    #[serde(default)]
    pub bn_recalibration: usize,
    /// Start the noise uniformly in `[-eps, eps]` (inside the mask) instead
    /// of at zero.
    #[serde(default)]
    pub random_start: bool,
    /// Class-wise only: start each class's noise as a synthetic code
    /// instead of zero (`None`, the default). Synthetic class-wise codes are
    /// shortcuts that any architecture picks up in its first epochs (Yu et
    /// al. 2022, research notes 2.5); error-minimising rounds then refine
    /// them against the surrogates. Where the box blocks a sign (black
    /// background cannot darken) the code reads as `0` / `+eps` there:
    /// still one distinct code per class. Measured on the lesions
    /// selection draw (`evals/results/protect/supplementary-selection-seed1`,
    /// rows i-l): worse than the zero start with the same crafting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic_start: Option<SyntheticStart>,
    /// One noise value per pixel location shared by all channels (a
    /// grayscale conversion cannot average it away); RGB only.
    #[serde(default)]
    pub shared_channels: bool,
    /// Class-wise only, in `[0, 1)`: the fraction of surrogate-step and
    /// noise-step samples that carry the noise of *another* class and that
    /// class's label ("cross pairs": image of class `a`, noise and label of
    /// class `b`). The min-min objective alone lets the surrogate fit the
    /// image content and the noise together; cross pairs ask the noise to
    /// decide the label whatever the image, i.e. to be a shortcut that a
    /// fresh model picks up before the content. The released images are
    /// unchanged in kind (each image still gets its own class's noise).
    #[serde(default)]
    pub cross_pairs: f64,
    /// Re-initialise every surrogate (fresh weights, fresh optimiser state)
    /// at the start of every `restart_every`-th round after the first (0,
    /// the default: never). Surrogates that keep training across rounds
    /// end up optimising the noise for models that already read it; a
    /// victim starts from scratch and learns whatever is quickest in its
    /// first epochs, content included. Restarts ask the noise to be picked
    /// up by young models too. Measured on the lesions selection draw
    /// (row n, every 3rd round): worse than no restarts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_every: usize,
    /// SALM with a gradient mask refreshed during the run: refresh it only
    /// up to this round, then keep it (0, the default: refresh to the
    /// end). Every refresh ranks the pixels by the surrogates' current
    /// gradients and zeroes the noise of the pixels that leave the mask;
    /// once the surrogates fit the noise those gradients are small, the
    /// ranking moves, and the next round's surrogates lose the shortcut
    /// they had learnt (the round log's `mask_changed`). A frozen mask
    /// lets the last rounds refine one noise. Measured on the lesions
    /// (`evals/results/protect/README.md`): with 6, the selection draw's
    /// crafting converged by round 9 and its victims' mean peak fell from
    /// 61.6 to 48.5 %; on the reported split the surrogates had not fitted
    /// the noise by round 6, the run ended at `max_rounds` unfitted, and
    /// the mean peak rose from 65.1 to 73.0 %. Freezing before the
    /// surrogates fit can cost more than it saves.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub freeze_mask_after: usize,
    /// Class-wise SALM with a gradient mask only, in `[0, 1)`: this
    /// fraction of the pixel budget `rho` carries the class's model-free
    /// [`MaskStrategy::Grating`] code (`+eps`, fixed, never refined; at the
    /// period of `rho * code_fraction`) and the rest is the strategy's
    /// mask, refined by error-minimising steps as usual (0, the default:
    /// no code). The code alone and the refined noise alone fool
    /// different architectures on the lesions selection draw (rows u and
    /// d of `evals/results/protect/supplementary-selection-seed1`); half
    /// and half (row v) was worse than either.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub code_fraction: f64,
    /// Stable (SEM-style) crafting, in `[0, eps]`: every image the
    /// surrogates train on and every image a noise step differentiates
    /// gets fresh uniform noise in `[-stable_radius, stable_radius]` on
    /// every value (then clipped to the box), so the noise has to lower
    /// the loss under random dense perturbations too (Liu et al., AAAI
    /// 2024, research notes 2.2: the cheap stand-in for REM's inner
    /// adversarial maximisation, meant to survive adversarial training).
    /// 0, the default: off. The released images carry no such noise.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub stable_radius: f64,
    /// Which round's noise is released (default `final_round`; see
    /// [`Release`]).
    #[serde(default)]
    pub release: Release,
    /// Seed of every random choice (surrogate init, batches, random masks).
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// A synthetic class-wise code to start the noise from
/// ([`ProtectParams::synthetic_start`]): `eps` times a random sign per
/// cell, the same on every channel, inside the class's mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticStart {
    /// Side of the code's square cells, in pixels (`blocks`), or of the
    /// repeated tile (`tiled`, cells of one pixel).
    pub side: usize,
    /// How the signs are laid out.
    pub layout: CodeLayout,
}

/// The layout of a [`SyntheticStart`] code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeLayout {
    /// One sign per `side x side` block of the image: a position code, read
    /// best by a model with a flattening head.
    Blocks,
    /// One `side x side` tile of per-pixel signs repeated over the image: a
    /// texture that a convolution finds anywhere, read by a global-pooling
    /// model too.
    Tiled,
    /// `+eps` on every pixel of the unit's mask (`side` unused): with a
    /// structured mask ([`MaskStrategy::Grating`]) the mask is the code.
    /// Brightening is the step the box allows on black background.
    Mask,
}

impl ProtectParams {
    /// Sample-wise EM with the research notes' CPU defaults: `eps`, step
    /// `eps / 10`, 20 steps, batch 256, surrogate CNN 32-64-128 with batch
    /// norm, SGD 0.1/0.9/5e-4/clip 5, 10 train steps of 128 per round,
    /// 10 to 40 rounds, stop at 99% accuracy or loss < 1e-3, seed 0.
    pub fn em(eps: f64) -> ProtectParams {
        ProtectParams {
            method: Method::Em { classwise: false },
            objective: Objective::ErrorMinimising,
            eps,
            step_size: None,
            pgd_steps: 20,
            pgd_batch: 256,
            surrogate: Arch::Cnn {
                channels: vec![32, 64, 128],
                batch_norm: true,
            },
            ensemble: Vec::new(),
            ensemble_lr: Vec::new(),
            sgd: SgdParams::unlearnable_examples(),
            train_steps_per_round: 10,
            train_batch: 128,
            stop: StopRule {
                min_rounds: 10,
                max_rounds: 40,
                train_accuracy: Some(0.99),
                loss_below: Some(1e-3),
                patience: 1,
                shortcut_accuracy: None,
            },
            bn_recalibration: 20,
            random_start: false,
            synthetic_start: None,
            restart_every: 0,
            freeze_mask_after: 0,
            code_fraction: 0.0,
            stable_radius: 0.0,
            shared_channels: false,
            cross_pairs: 0.0,
            release: Release::default(),
            seed: 0,
            device: default_device(),
        }
    }

    /// SALM with the feasibility-aware mask refreshed every round, fraction
    /// `rho`; other settings as [`ProtectParams::em`].
    pub fn salm(eps: f64, rho: f64) -> ProtectParams {
        ProtectParams {
            method: Method::Salm {
                rho,
                mask: MaskStrategy::Feasible,
                refresh: MaskRefresh::PerRound,
                classwise: false,
            },
            ..ProtectParams::em(eps)
        }
    }

    /// The model-free class-wise lattice code: `+eps` on one sparse
    /// lattice of the pixel grid per class ([`MaskStrategy::Grating`],
    /// `rho` of the pixels) and nothing else. No surrogate shapes it (no
    /// training and no noise steps, [`ProtectParams::model_free`]): the
    /// start is released after no round, through the same release,
    /// manifest and audit as every method. Measured on the lesions (`evals/results/protect/
    /// supplementary-lattice-code`): 45 % victim peak accuracy against 52 %
    /// for error-minimising SALM at the same budgets, in seconds instead of
    /// minutes; filtering (JPEG, blur) and adversarial training remove it.
    pub fn lattice_code(eps: f64, rho: f64) -> ProtectParams {
        ProtectParams {
            method: Method::Salm {
                rho,
                mask: MaskStrategy::Grating,
                refresh: MaskRefresh::Fixed,
                classwise: true,
            },
            synthetic_start: Some(SyntheticStart {
                side: 1,
                layout: CodeLayout::Mask,
            }),
            pgd_steps: 0,
            train_steps_per_round: 0,
            stop: StopRule::new(1, 1, None, None),
            ..ProtectParams::salm(eps, rho)
        }
    }

    /// Whether no surrogate shapes the noise: no training steps and no
    /// noise steps, so the start (a synthetic code, random or zero noise)
    /// is the release and there is nothing to run rounds for.
    pub fn model_free(&self) -> bool {
        self.pgd_steps == 0 && self.train_steps_per_round == 0
    }

    /// The step size in use.
    pub fn step(&self) -> f64 {
        self.step_size.unwrap_or(self.eps / 10.0)
    }

    /// Checks every parameter; the message names the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps <= 0.25) {
            return Err(Error::Config(format!(
                "eps must be in (0, 0.25] as a fraction of full scale (8/255 = 0.0314), got {}",
                self.eps
            )));
        }
        let step = self.step();
        if !(step > 0.0 && step <= self.eps) {
            return Err(Error::Config(format!(
                "step size must be in (0, eps], got {step}"
            )));
        }
        if let Method::Salm { rho, .. } = &self.method {
            if !(*rho > 0.0 && *rho <= 1.0) {
                return Err(Error::Config(format!("rho must be in (0, 1], got {rho}")));
            }
        }
        if self.pgd_steps > 1000 {
            return Err(Error::Config(format!(
                "pgd_steps must be 0..=1000, got {}",
                self.pgd_steps
            )));
        }
        if self.pgd_steps == 0 && self.synthetic_start.is_none() {
            return Err(Error::Config(
                "pgd_steps 0 (CLI: --steps 0) releases the start as it is: it needs a \
                 synthetic_start (CLI: --method code)"
                    .into(),
            ));
        }
        if self.ensemble.len() > 7 {
            return Err(Error::Config(format!(
                "ensemble takes at most 7 further surrogates, got {}",
                self.ensemble.len()
            )));
        }
        if !self.ensemble_lr.is_empty() && self.ensemble_lr.len() != self.ensemble.len() {
            return Err(Error::Config(format!(
                "ensemble_lr needs one learning rate per ensemble member ({}), got {}",
                self.ensemble.len(),
                self.ensemble_lr.len()
            )));
        }
        if let Some(lr) = self
            .ensemble_lr
            .iter()
            .find(|lr| !(lr.is_finite() && **lr > 0.0))
        {
            return Err(Error::Config(format!(
                "ensemble_lr values must be positive, got {lr}"
            )));
        }
        if self.pgd_batch == 0 || self.train_batch == 0 {
            return Err(Error::Config("batch sizes must be positive".into()));
        }
        let s = &self.stop;
        if s.min_rounds == 0 || s.min_rounds > s.max_rounds || s.max_rounds > 100_000 {
            return Err(Error::Config(format!(
                "need 1 <= min_rounds ({}) <= max_rounds ({}) <= 100000 \
                 (CLI: --min-rounds, --max-rounds)",
                s.min_rounds, s.max_rounds
            )));
        }
        if s.train_accuracy.is_some_and(|a| !(a > 0.0 && a <= 1.0)) {
            return Err(Error::Config(
                "train_accuracy (CLI: --target-acc) must be in (0, 1]".into(),
            ));
        }
        if s.loss_below.is_some_and(|l| !(l > 0.0 && l.is_finite())) {
            return Err(Error::Config(
                "loss_below (CLI: --loss-below) must be positive".into(),
            ));
        }
        if s.patience > s.max_rounds {
            return Err(Error::Config(format!(
                "stop patience ({}) exceeds max_rounds ({})",
                s.patience, s.max_rounds
            )));
        }
        if s.shortcut_accuracy.is_some_and(|a| !(a > 0.0 && a <= 1.0)) {
            return Err(Error::Config("shortcut_accuracy must be in (0, 1]".into()));
        }
        if !(self.cross_pairs >= 0.0 && self.cross_pairs < 1.0) {
            return Err(Error::Config(format!(
                "cross_pairs must be in [0, 1), got {}",
                self.cross_pairs
            )));
        }
        if self.cross_pairs > 0.0 && !self.method.classwise() {
            return Err(Error::Config(
                "cross_pairs needs a class-wise method (one noise per class)".into(),
            ));
        }
        if self.objective == Objective::Targeted
            && (self.cross_pairs > 0.0 || self.stop.shortcut_accuracy.is_some())
        {
            return Err(Error::Config(
                "the targeted objective has no cross pairs or shortcut accuracy \
                 (they are min-min notions): drop cross_pairs / stop.shortcut_accuracy"
                    .into(),
            ));
        }
        if self.model_free() && self.release.proxy().is_some() {
            return Err(Error::Config(
                "a proxy_victim release picks among rounds: a model-free run (no training \
                 and no noise steps) has none"
                    .into(),
            ));
        }
        if let Some(start) = &self.synthetic_start {
            if !self.method.classwise() {
                return Err(Error::Config(
                    "synthetic_start needs a class-wise method (one noise per class)".into(),
                ));
            }
            if self.random_start {
                return Err(Error::Config(
                    "synthetic_start and random_start are two different starts: pick one".into(),
                ));
            }
            if start.side == 0 || start.side > 64 {
                return Err(Error::Config(format!(
                    "synthetic_start side must be 1..=64 pixels, got {}",
                    start.side
                )));
            }
        }
        if !(self.stable_radius >= 0.0 && self.stable_radius <= self.eps) {
            return Err(Error::Config(format!(
                "stable_radius must be in [0, eps] = [0, {}], got {}",
                self.eps, self.stable_radius
            )));
        }
        if self.stable_radius > 0.0 && self.model_free() {
            return Err(Error::Config(
                "stable_radius shapes surrogate and noise steps: a model-free run has none".into(),
            ));
        }
        if self.freeze_mask_after > 0 {
            match &self.method {
                Method::Salm { mask, refresh, .. }
                    if mask.needs_gradient() && *refresh != MaskRefresh::Fixed => {}
                _ => {
                    return Err(Error::Config(
                        "freeze_mask_after needs SALM with a gradient mask (feasible, \
                         grad_foreground or gradient) refreshed per round or per step"
                            .into(),
                    ))
                }
            }
        }
        if self.code_fraction != 0.0 {
            if !(0.0..1.0).contains(&self.code_fraction) {
                return Err(Error::Config(format!(
                    "code_fraction must be in [0, 1), got {}",
                    self.code_fraction
                )));
            }
            match &self.method {
                Method::Salm {
                    mask, classwise, ..
                } if *classwise && mask.needs_gradient() => {}
                _ => {
                    return Err(Error::Config(
                        "code_fraction needs class-wise SALM with a gradient mask \
                         (feasible, grad_foreground or gradient)"
                            .into(),
                    ))
                }
            }
            if self.synthetic_start.is_some() || self.random_start {
                return Err(Error::Config(
                    "code_fraction starts the code itself: drop synthetic_start / random_start"
                        .into(),
                ));
            }
        }
        if let Some(proxy) = self.release.proxy() {
            proxy.validate()?;
        }
        self.sgd.validate()?;
        self.device_spec()?;
        Ok(())
    }

    /// The optimiser settings of surrogate `k` (0: `surrogate`, then the
    /// ensemble members).
    pub(crate) fn sgd_of(&self, k: usize) -> SgdParams {
        let mut sgd = self.sgd;
        if let Some(&lr) = k.checked_sub(1).and_then(|m| self.ensemble_lr.get(m)) {
            sgd.lr = lr;
        }
        sgd
    }

    pub(crate) fn device_spec(&self) -> Result<DeviceSpec> {
        self.device
            .parse::<DeviceSpec>()
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// A short label such as `salm eps=8/255 rho=0.10 (feasible, per_round)`
    /// (`start=...` names a synthetic start: `code` for the lattice code).
    pub fn label(&self) -> String {
        let mut eps = format!("eps={:.1}/255", self.eps * 255.0);
        if self.objective == Objective::Targeted {
            eps.push_str(" targeted");
        }
        if self.cross_pairs > 0.0 {
            eps.push_str(&format!(" cross={:.2}", self.cross_pairs));
        }
        if self.stable_radius > 0.0 {
            eps.push_str(&format!(" stable={:.1}/255", self.stable_radius * 255.0));
        }
        if let Some(start) = self.synthetic_start {
            match start.layout {
                CodeLayout::Mask => eps.push_str(" start=code"),
                CodeLayout::Blocks => eps.push_str(&format!(" start=blocks{}", start.side)),
                CodeLayout::Tiled => eps.push_str(&format!(" start=tiled{}", start.side)),
            }
        }
        match &self.method {
            Method::Salm {
                rho, mask, refresh, ..
            } => {
                let refresh = match self.freeze_mask_after {
                    0 => format!("{refresh:?}"),
                    r => format!("{refresh:?} to round {r}"),
                };
                format!(
                    "{} {eps} rho={rho:.2} ({mask:?}, {refresh})",
                    self.method.label()
                )
            }
            Method::Em { .. } => format!("{} {eps}", self.method.label()),
        }
    }
}
