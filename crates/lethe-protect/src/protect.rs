//! Computing the protective noise: error-minimising noise (EM) and its
//! sparse, local variant (SALM).
//!
//! Both solve Huang et al.'s min-min problem (ICLR 2021): alternately train
//! a surrogate on the currently protected images (the theta-step, a few SGD
//! steps) and move every image's noise *down* the surrogate's loss by
//! projected sign-gradient steps (the delta-step), so that the noise
//! becomes a shortcut a fresh model learns instead of the real features.
//! SALM additionally confines each image's noise to a mask of
//! `floor(rho * H * W)` pixel locations chosen by [`mask`]; with `rho = 1`
//! it is EM. The loop, in the notation of the research notes section 7:
//!
//! ```text
//! round r = 1, 2, ...:
//!   (a) train_steps_per_round SGD steps of the surrogate on clip(x + delta)
//!   (b) for each batch (fixed order), pgd_steps times:
//!         g = grad_x CE(f(x + delta), y)            (eval mode)
//!         [SALM: refresh the mask from g, drop noise outside it]
//!         delta = clamp(delta - step * sign(g), -eps, eps)
//!         delta = clamp(x + delta, 0, 1) - x;  delta *= mask
//!       class-wise: one noise per class, stepped along the sum of its
//!       images' gradients
//!   (c) surrogate accuracy and loss on the protected images, and the
//!       shortcut accuracy (mismatched pairs: image of one class, noise of
//!       another, scored against the noise's class); stop when
//!       r >= max_rounds, or r >= min_rounds and (accuracy >= target or
//!       loss < threshold) [and shortcut accuracy >= its target] for the
//!       last `patience` rounds
//! ```
//!
//! The minimum-rounds rule exists because on small, easy, sparse data the
//! surrogate reaches 99% training accuracy on nearly clean images within a
//! round or two, and Huang's accuracy rule alone then stops before any
//! shortcut has formed (research notes, section 5.3). Patience and the
//! shortcut condition go further: the surrogate fitting the protected
//! images says nothing about *what* it fits; the shortcut accuracy says
//! whether the noise, not the content, decides its label.
//!
//! Two options aim the noise at more than one surrogate's quirks:
//! `ensemble` trains further surrogates on the same batches and steps the
//! noise along the sum of their input gradients (noise made against a
//! flatten-head CNN alone is read by a CNN victim but not by a
//! global-pooling ResNet, and the reverse); class-wise `cross_pairs` train
//! and step on images carrying another class's noise and label, so that
//! the noise decides the label whatever the image.
//!
//! `stable_radius` (SEM, Liu et al. 2024) trains and steps under fresh
//! uniform noise on every input, meant to make the noise survive
//! adversarial training. Measured on the lesions selection draw at 4/255
//! (`evals/results/protect/supplementary-selection-seed1`, rows zf): no
//! gain against adversarial training (88 % against 85 % without it), so it
//! is off by default.
//!
//! Which round's noise is released is [`Release`]: by default the noise of
//! the last round; `best_round` releases the round with the highest
//! shortcut accuracy (ties to the lower surrogate loss), because the round
//! log of a min-min run need not improve monotonically (an ensemble
//! surrogate can collapse in one round and recover in the next, and
//! `max_rounds` can stop the run in a bad one). Measured on the lesions
//! selection draw (seed 1) it protected *worse* (fresh victims' mean peak
//! accuracy 50.2 % against 43.7 % for the final round; 52.8 against 43.0
//! over two victim seeds): the surrogates' shortcut accuracy does not
//! predict how well a round's noise protects, so it is not the default.
//! `proxy_victim` ([`proxy`]) ranks rounds instead by what a defender can
//! measure without the test split: after each (or every N-th) round a
//! small fresh model trains for a few epochs on the round's protected
//! images, minus a clean holdout carved from the crafting data, and the
//! round whose proxy reaches the lowest peak holdout accuracy is released.
//! On the lesions selection draw (seed 1) it chose the final round, as the
//! fresh victims would have (proxy 38.3 % for round 12 against 56.7 % for
//! the best-shortcut round 10), but its per-round values are noisy (a
//! 5-epoch CNN proxy on a 180-image holdout ranged 38-64 % across rounds),
//! so it is not the default either.
//! Ensemble members can train with their own learning rate
//! ([`ProtectParams::ensemble_lr`]).
//!
//! The same loop also computes targeted adversarial poisons
//! ([`Objective::Targeted`]): the theta-step then trains on the *clean*
//! images and the delta-step descends the loss at the next class's label,
//! so every mask, budget, ensemble, release and resume option applies
//! unchanged.
//!
//! Runs are deterministic per seed (every random choice of round `r`
//! comes from a generator seeded by `(seed, r)`), on the CPU the same on
//! every x86-64 host with FMA: the models' matrix products are summed in
//! depth blocks that do not depend on the host's caches (`lethe-model`'s
//! `nn/depth.rs`; before that, a long crafting run turned the rounding of
//! two CPUs into different protections: `evals/results/protect/README.md`).
//! Runs can checkpoint after every round and resume to the same result as
//! an uninterrupted run ([`checkpoint`]), can pause after a number of
//! rounds, be cancelled, and show a progress bar with an ETA.

pub mod checkpoint;
pub mod mask;
mod params;
pub mod proxy;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use lethe_model::nn::{self, Mode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, ImageShape};
use crate::metrics::{dataset_quality, ImageQuality, QualitySummary};
use crate::model::{FrozenNet, MomentumSgd, Net, SgdParams};
use crate::sources::mix;
use crate::{Error, Result};
use mask::{MaskRefresh, MaskStrategy};
pub use params::{CodeLayout, Method, Objective, ProtectParams, Release, StopRule, SyntheticStart};
pub use proxy::ProxyVictim;

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_rounds` reached.
    MaxRounds,
    /// The accuracy target was met.
    TrainAccuracy,
    /// The loss threshold was met.
    LossThreshold,
    /// A model-free run ([`ProtectParams::model_free`]): no surrogate
    /// shapes the noise, so its start is released after no round (an
    /// untrained surrogate's accuracy would measure nothing).
    ModelFree,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::MaxRounds => "max rounds",
            StopReason::TrainAccuracy => "accuracy target met",
            StopReason::LossThreshold => "loss threshold met",
            StopReason::ModelFree => "model-free",
        })
    }
}

impl StopReason {
    /// How a run with this outcome ended, for reports: the reason, or
    /// "not stopped" for a paused run.
    pub fn describe(reason: Option<StopReason>) -> String {
        reason.map_or_else(|| "not stopped".into(), |r| r.to_string())
    }
}

/// Checkpointing, pausing, cancelling and progress of one run.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Save the state here after every round (and resume from it).
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from `checkpoint_dir` if it holds a checkpoint of the same
    /// data and parameters (a different one is an error).
    pub resume: bool,
    /// Start over even when `checkpoint_dir` holds a saved run (without
    /// `resume` or this, a saved run there is an error: nothing is lost).
    pub overwrite: bool,
    /// Return (resumably) after this many rounds of this call.
    pub pause_after_rounds: Option<usize>,
    /// Set to true from another thread to stop at the next batch.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Draw a progress bar with an ETA on stderr.
    pub progress: bool,
}

/// One round of the optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundLog {
    /// 1-based round.
    pub round: usize,
    /// Mean surrogate training loss of the round's theta-steps.
    pub train_loss: f64,
    /// Surrogate accuracy on the protected images after the round, scored
    /// against the noise's targets (the true labels, except under
    /// [`Objective::Targeted`], where it is the attack's success rate).
    pub accuracy: f64,
    /// Surrogate mean cross-entropy on them.
    pub loss: f64,
    /// Fraction of noise values at the budget (`|delta| >= eps - 1e-6`).
    pub saturated: f64,
    /// How far the noise alone decides the label: the surrogate's accuracy
    /// towards the noise's label on mismatched pairs (every image with the
    /// noise of the next class, class-wise; with the noise of an image of
    /// another class, sample-wise). Near chance: the surrogate reads the
    /// content; near 1: the noise is the shortcut. `None` with one class,
    /// or in checkpoints written before it was measured.
    #[serde(default)]
    pub shortcut_accuracy: Option<f64>,
    /// With the `proxy_victim` release, on measured rounds: the peak
    /// accuracy on the clean holdout of a fresh proxy victim trained on
    /// this round's protected images (see [`proxy`]); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_accuracy: Option<f64>,
    /// SALM with a gradient mask: the fraction of the masked pixels that
    /// entered the masks at this round's refreshes (the noise of the ones
    /// they replaced was dropped); `None` where no mask chosen before was
    /// refreshed (the first round, fixed or frozen masks, other methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_changed: Option<f64>,
    /// Wall time of the round in seconds (the proxy victim included).
    pub seconds: f64,
}

/// The result of [`protect_dataset`].
#[derive(Debug, Clone)]
pub struct Protection {
    /// The protected images on the release grid.
    pub protected: Dataset,
    /// Per-image pixel masks (`H * W` each) of SALM (`None` for EM).
    pub masks: Option<Vec<u8>>,
    /// Class-wise runs: the released noise, to protect images added later
    /// the same way ([`crate::ClassNoise`]; a secret).
    pub class_noise: Option<crate::class_noise::ClassNoise>,
    /// Whether the stop rule fired (false: paused).
    pub finished: bool,
    /// Why it stopped.
    pub stop_reason: Option<StopReason>,
    /// Every round so far.
    pub rounds: Vec<RoundLog>,
    /// The 1-based round whose noise `protected` carries (the last round
    /// with [`Release::FinalRound`], the best one with
    /// [`Release::BestRound`] or [`Release::ProxyVictim`]; 0 before any
    /// round).
    pub released_round: usize,
    /// Wall time of all rounds so far (across resumes).
    pub seconds: f64,
    /// Noise steps taken (images x steps), across resumes.
    pub image_steps: u64,
    /// Per-image quality of the released images.
    pub per_image: Vec<ImageQuality>,
    /// Its summary.
    pub quality: QualitySummary,
}

/// The optimisation state that a checkpoint holds.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub round: usize,
    /// Sample-wise: `n * values`; class-wise: `classes * values`.
    pub delta: Vec<f32>,
    /// Per unit (image or class) `H * W` 0/1 mask; all ones for EM.
    pub mask: Vec<u8>,
    /// Whether each unit's mask has been chosen yet.
    pub mask_ready: Vec<bool>,
    pub log: Vec<RoundLog>,
    pub seconds: f64,
    pub image_steps: u64,
    pub stop: Option<StopReason>,
    /// With [`Release::BestRound`] or [`Release::ProxyVictim`]: a copy of
    /// the noise and masks of the best round so far.
    pub best: Option<BestRound>,
}

/// The noise of the best round so far (see [`Release`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BestRound {
    /// 1-based round.
    pub round: usize,
    /// `State::delta` after that round.
    pub delta: Vec<f32>,
    /// `State::mask` after that round.
    pub mask: Vec<u8>,
}

impl State {
    /// After round `state.round` has been logged: keep its noise if it is
    /// the best so far under `release` (never with `final_round`).
    pub(crate) fn track_best(&mut self, release: &Release) {
        let Some(last) = self.log.last() else {
            return;
        };
        let improves = match &self.best {
            None => release.candidate(last),
            Some(b) => match self.log.iter().find(|l| l.round == b.round) {
                Some(prev) => release.replaces(last, prev),
                None => release.candidate(last),
            },
        };
        if improves {
            self.best = Some(BestRound {
                round: last.round,
                delta: self.delta.clone(),
                mask: self.mask.clone(),
            });
        }
    }

    /// The state whose noise is released: the best round's noise and masks
    /// in place of the current ones where one is kept.
    pub(crate) fn released(&self) -> std::borrow::Cow<'_, State> {
        match &self.best {
            Some(b) if b.round != self.round => {
                let mut s = self.clone();
                s.delta.clone_from(&b.delta);
                s.mask.clone_from(&b.mask);
                s.best = None;
                std::borrow::Cow::Owned(s)
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// The 1-based round of the released noise (0 before any round).
    pub(crate) fn released_round(&self) -> usize {
        self.best.as_ref().map_or(self.round, |b| b.round)
    }
}

/// Protects an in-memory dataset (all of it: split off the test images
/// first). See the module docs.
pub fn protect_dataset(
    data: &Dataset,
    params: &ProtectParams,
    control: &RunControl,
) -> Result<Protection> {
    check_fits(data, params)?;
    let device = params.device_spec()?.open()?;
    let shape = data.shape();
    let classes = data.classes().len();
    let classwise = params.method.classwise();
    let units = if classwise { classes } else { data.len() };
    let fingerprint = checkpoint::fingerprint(data, params);

    let code = code_masks(data, params);
    let loaded = match (&control.checkpoint_dir, control.resume) {
        (Some(dir), true) => {
            checkpoint::load(dir, &fingerprint, shape, 1 + params.ensemble.len(), &device)?
        }
        // Starting over would replace a saved run at the first save: that
        // takes an explicit choice, not a rerun of the same command.
        (Some(dir), false) if !control.overwrite => {
            if let Some(saved) = checkpoint::describe_saved(dir) {
                return Err(Error::Config(format!(
                    "checkpoint folder {} holds {saved}: resume continues it, \
                     overwrite starts over (CLI: --resume / --overwrite)",
                    dir.display()
                )));
            }
            None
        }
        _ => None,
    };
    let (mut state, nets, momentum) = match loaded {
        Some((mut state, nets, momentum)) => {
            tracing::info!(round = state.round, "resuming protection from checkpoint");
            // The stop rule is not part of the run's identity: a run
            // resumed under another rule (more rounds, another target)
            // stops or goes on by that rule.
            if state.stop != Some(StopReason::ModelFree) {
                state.stop = stop_reason(&params.stop, &state.log);
            }
            (state, nets, Some(momentum))
        }
        None => (
            initial_state(data, params, units, &code)?,
            surrogates(params, shape, classes, &device, 0)?,
            None,
        ),
    };
    if params.model_free() && state.stop.is_none() {
        state.stop = Some(StopReason::ModelFree);
    }
    let mut nets = nets;
    let mut opts = optimisers(params, &nets)?;
    if let Some(momentum) = momentum {
        for (opt, m) in opts.iter_mut().zip(momentum) {
            opt.load_state(m)?;
        }
    }

    let proxy = match params.release.proxy() {
        Some(cfg) => Some((cfg, proxy::Proxy::new(cfg, data, params.seed)?)),
        None => None,
    };
    let per_round = (data.len() * params.pgd_steps) as u64;
    let bar = progress_bar(control.progress, per_round * params.stop.max_rounds as u64);
    bar.set_position(per_round * state.round.min(params.stop.max_rounds) as u64);
    let mut rounds_this_call = 0;
    while state.stop.is_none() {
        if control
            .pause_after_rounds
            .is_some_and(|p| rounds_this_call >= p)
        {
            break;
        }
        let t0 = Instant::now();
        let r = state.round + 1;
        if params.restart_every > 0 && r > 1 && (r - 1) % params.restart_every == 0 {
            nets = surrogates(params, shape, classes, &device, r)?;
            opts = optimisers(params, &nets)?;
        }
        let run = Run::new(data, params, &nets, &code);
        let train_loss = run.theta_step(&mut state, &mut opts, r)?;
        let churn = run.delta_step(&mut state, r, control, &bar)?;
        let perturbed = run.perturbed_all(&state);
        let eval = run.evaluate(&perturbed, &run.targets)?;
        let saturated = state
            .delta
            .iter()
            .filter(|d| d.abs() >= run.eps - 1e-6)
            .count() as f64
            / state.delta.len().max(1) as f64;
        let shortcut_accuracy = match run.shortcut_pairs(&state) {
            Some((px, labels)) => Some(run.evaluate(&px, &labels)?.accuracy),
            None => None,
        };
        state.round = r;
        state.log.push(RoundLog {
            round: r,
            train_loss,
            accuracy: eval.accuracy,
            loss: eval.loss,
            saturated,
            shortcut_accuracy,
            proxy_accuracy: None,
            mask_changed: churn.fraction(),
            seconds: 0.0,
        });
        state.stop = stop_reason(&params.stop, &state.log);
        let proxy_accuracy = match &proxy {
            Some((cfg, px)) if cfg.due(r, state.stop.is_some()) => {
                let protected = data
                    .with_pixels(perturbed)?
                    .quantize_within(data, params.eps)?;
                Some(px.measure(&protected, &device)?)
            }
            _ => None,
        };
        let seconds = t0.elapsed().as_secs_f64();
        state.seconds += seconds;
        if let Some(last) = state.log.last_mut() {
            last.proxy_accuracy = proxy_accuracy;
            last.seconds = seconds;
        }
        tracing::info!(
            round = r,
            accuracy = eval.accuracy,
            loss = eval.loss,
            saturated,
            shortcut_accuracy,
            proxy_accuracy,
            mask_changed = churn.fraction(),
            seconds,
            "protection round"
        );
        bar.set_message(format!("acc {:.3} loss {:.4}", eval.accuracy, eval.loss));
        state.track_best(&params.release);
        if let Some(dir) = &control.checkpoint_dir {
            checkpoint::save(dir, &fingerprint, &state, &nets, &opts)?;
        }
        rounds_this_call += 1;
    }
    bar.finish_and_clear();

    let released_round = state.released_round();
    if released_round != state.round {
        tracing::info!(
            released_round,
            last_round = state.round,
            "releasing the noise of the best round"
        );
    }
    let run = Run::new(data, params, &nets, &code);
    let release_state = state.released();
    let released = data
        .with_pixels(run.perturbed_all(&release_state))?
        .quantize_within(data, params.eps)?;
    let (per_image, quality) = dataset_quality(data.pixels(), released.pixels(), shape);
    let masks = match &params.method {
        Method::Em { .. } => None,
        Method::Salm { .. } => Some(run.expanded_masks(&release_state)),
    };
    let class_noise = classwise.then(|| crate::class_noise::ClassNoise {
        shape,
        classes: data.classes().to_vec(),
        params: params.clone(),
        delta: release_state.delta.clone(),
    });
    drop(release_state);
    Ok(Protection {
        protected: released,
        masks,
        class_noise,
        finished: state.stop.is_some(),
        stop_reason: state.stop,
        rounds: state.log,
        released_round,
        seconds: state.seconds,
        image_steps: state.image_steps,
        per_image,
        quality,
    })
}

/// Which of the stop rule's targets one round meets (`None`: the rule sets
/// no such target). The one definition of each comparison, for stopping
/// ([`round_condition`]) and for saying what a round missed
/// ([`missed_targets`]).
struct TargetsMet {
    shortcut: Option<bool>,
    accuracy: Option<bool>,
    loss: Option<bool>,
}

impl TargetsMet {
    fn of(rule: &StopRule, log: &RoundLog) -> TargetsMet {
        TargetsMet {
            shortcut: rule
                .shortcut_accuracy
                .map(|t| !log.shortcut_accuracy.is_none_or(|a| a < t)),
            accuracy: rule.train_accuracy.map(|t| log.accuracy >= t),
            loss: rule.loss_below.map(|l| log.loss < l),
        }
    }

    /// The fit targets (`train_accuracy`, `loss_below`) count as one:
    /// either is enough.
    fn fit(&self) -> bool {
        self.accuracy == Some(true) || self.loss == Some(true)
    }
}

/// Whether one round satisfies the accuracy or loss condition (and the
/// shortcut condition, when set); which one, accuracy first.
fn round_condition(rule: &StopRule, log: &RoundLog) -> Option<StopReason> {
    let met = TargetsMet::of(rule, log);
    if met.shortcut == Some(false) {
        None
    } else if met.accuracy == Some(true) {
        Some(StopReason::TrainAccuracy)
    } else if met.loss == Some(true) {
        Some(StopReason::LossThreshold)
    } else {
        None
    }
}

/// The stop rule's targets that the round of `log` missed, in words; empty
/// when it met every target the rule sets. The fit targets
/// (`train_accuracy`, `loss_below`) count as one, either being enough, as
/// for stopping; the shortcut target is a second one.
pub fn missed_targets(rule: &StopRule, log: &RoundLog) -> Vec<String> {
    let met = TargetsMet::of(rule, log);
    let mut missed = Vec::new();
    if let (Some(false), Some(target)) = (met.shortcut, rule.shortcut_accuracy) {
        missed.push(match log.shortcut_accuracy {
            Some(a) => format!("shortcut accuracy {a:.2} < {target:.2}"),
            None => format!("shortcut accuracy not measured (target {target:.2})"),
        });
    }
    if !met.fit() {
        if let Some(t) = rule.train_accuracy {
            missed.push(format!("surrogate accuracy {:.3} < {t}", log.accuracy));
        }
        if let Some(l) = rule.loss_below {
            missed.push(format!("surrogate loss {:.3e} >= {l:e}", log.loss));
        }
    }
    missed
}

/// [`missed_targets`] of a run's released round: empty where no round was
/// run (reused noise) and for model-free methods, whose rounds fit nothing.
pub fn release_missed_targets(
    rule: &StopRule,
    stop_reason: Option<StopReason>,
    released: Option<&RoundLog>,
) -> Vec<String> {
    match released {
        Some(log) if stop_reason != Some(StopReason::ModelFree) => missed_targets(rule, log),
        _ => Vec::new(),
    }
}

/// The stop decision after the last round of `log`: never before
/// `min_rounds`; then when the accuracy or loss condition has held for the
/// last `patience` rounds; always at `max_rounds`.
fn stop_reason(rule: &StopRule, log: &[RoundLog]) -> Option<StopReason> {
    let last = log.last()?;
    let round = last.round;
    let patience = rule.patience.max(1);
    if round >= rule.min_rounds && log.len() >= patience {
        let recent = &log[log.len() - patience..];
        if recent.iter().all(|l| round_condition(rule, l).is_some()) {
            return round_condition(rule, last);
        }
    }
    (round >= rule.max_rounds).then_some(StopReason::MaxRounds)
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "protect [{bar:30}] {percent:>3}% image-steps {human_pos}/{human_len} {msg} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Checks `params` and that they can change `data` at all: eps allows a
/// step of its release grid, a SALM rho a pixel of its images.
fn check_fits(data: &Dataset, params: &ProtectParams) -> Result<()> {
    params.validate()?;
    data.check_eps(params.eps)?;
    match &params.method {
        Method::Salm { rho, .. } => mask::check_mask_size(*rho, data.shape().pixels()),
        Method::Em { .. } => Ok(()),
    }
}

/// Fresh state: zero (or random) noise, model-free masks chosen.
fn initial_state(data: &Dataset, p: &ProtectParams, units: usize, code: &[u8]) -> Result<State> {
    let shape = data.shape();
    let (v, hw) = (shape.values(), shape.pixels());
    let mut state = State {
        round: 0,
        delta: vec![0.0; units * v],
        mask: vec![1; units * hw],
        mask_ready: vec![true; units],
        log: Vec::new(),
        seconds: 0.0,
        image_steps: 0,
        stop: None,
        best: None,
    };
    if let Method::Salm {
        rho,
        mask: strategy,
        classwise,
        ..
    } = &p.method
    {
        let k = mask::mask_size(*rho, hw);
        state.mask.fill(0);
        state.mask_ready.fill(false);
        if *strategy == MaskStrategy::Grating {
            let gratings = mask::class_gratings(data.classes().len(), *rho, shape);
            for u in 0..units {
                let class = if *classwise {
                    u
                } else {
                    data.labels()[u] as usize
                };
                state.mask[u * hw..(u + 1) * hw]
                    .copy_from_slice(&gratings[class * hw..(class + 1) * hw]);
                state.mask_ready[u] = true;
            }
        } else if !strategy.needs_gradient() {
            for u in 0..units {
                let scores: Vec<f32> = match strategy {
                    MaskStrategy::Random => {
                        let mut rng = StdRng::seed_from_u64(mix(p.seed, 3, u as u64));
                        (0..hw).map(|_| rng.random::<f32>()).collect()
                    }
                    _ if *classwise => {
                        let mut acc = vec![0f32; hw];
                        for i in (0..data.len()).filter(|&i| data.labels()[i] as usize == u) {
                            for (a, f) in acc.iter_mut().zip(mask::foreground(data.image(i), shape))
                            {
                                *a += f;
                            }
                        }
                        acc
                    }
                    _ => mask::foreground(data.image(u), shape),
                };
                state.mask[u * hw..(u + 1) * hw].copy_from_slice(&mask::top_k(&scores, k));
                state.mask_ready[u] = true;
            }
        }
    }
    if let Some(start) = p.synthetic_start {
        synthetic_start(&mut state, shape, start, p.eps as f32, p.seed);
    }
    // The code is part of the noise from the first surrogate step on.
    for (j, _) in code.iter().enumerate().filter(|(_, &m)| m == 1) {
        let (u, q) = (j / hw, j % hw);
        for c in 0..shape.channels {
            state.delta[u * v + c * hw + q] = p.eps as f32;
        }
    }
    if p.random_start {
        let mut rng = StdRng::seed_from_u64(mix(p.seed, 4, 0));
        let eps = p.eps as f32;
        for u in 0..units {
            for c in 0..shape.channels {
                for q in 0..hw {
                    let d: f32 = rng.random_range(-eps..=eps);
                    if state.mask[u * hw + q] == 1 {
                        state.delta[u * v + c * hw + q] = d;
                    }
                }
            }
        }
        if units == data.len() {
            for i in 0..units {
                let x = data.image(i);
                for (j, d) in state.delta[i * v..(i + 1) * v].iter_mut().enumerate() {
                    *d = (x[j] + *d).clamp(0.0, 1.0) - x[j];
                }
            }
        }
    }
    Ok(state)
}

/// [`ProtectParams::synthetic_start`]: one random sign per cell and unit
/// (class), written on every channel of the unit's mask (all of it while a
/// gradient mask is not chosen yet: the first refresh drops what falls
/// outside).
fn synthetic_start(
    state: &mut State,
    shape: ImageShape,
    start: SyntheticStart,
    eps: f32,
    seed: u64,
) {
    let (v, hw) = (shape.values(), shape.pixels());
    let side = start.side.max(1);
    let (rows, cols) = match start.layout {
        CodeLayout::Blocks => (shape.height.div_ceil(side), shape.width.div_ceil(side)),
        CodeLayout::Tiled => (side, side),
        CodeLayout::Mask => (1, 1),
    };
    let units = state.mask_ready.len();
    for u in 0..units {
        let mut rng = StdRng::seed_from_u64(mix(seed, 8, u as u64));
        let code: Vec<f32> = match start.layout {
            CodeLayout::Mask => vec![eps],
            _ => (0..rows * cols)
                .map(|_| if rng.random::<bool>() { eps } else { -eps })
                .collect(),
        };
        let ready = state.mask_ready[u];
        for q in 0..hw {
            if ready && state.mask[u * hw + q] == 0 {
                continue;
            }
            let (y, x) = (q / shape.width, q % shape.width);
            let cell = match start.layout {
                CodeLayout::Blocks => (y / side) * cols + x / side,
                CodeLayout::Tiled => (y % side) * cols + x % side,
                CodeLayout::Mask => 0,
            };
            for c in 0..shape.channels {
                state.delta[u * v + c * hw + q] = code[cell];
            }
        }
    }
}

/// [`ProtectParams::code_fraction`]'s code masks, one per class (empty
/// without a code): the class's grating at the period of `rho *
/// code_fraction`, at most that fraction of the pixels.
fn code_masks(data: &Dataset, p: &ProtectParams) -> Vec<u8> {
    match p.method {
        Method::Salm { rho, .. } if p.code_fraction > 0.0 && p.method.classwise() => {
            mask::class_gratings(data.classes().len(), rho * p.code_fraction, data.shape())
        }
        _ => Vec::new(),
    }
}

/// Fresh surrogates (`surrogate`, then the ensemble); `round` 0 for the
/// start, the round of a restart otherwise (each gets its own weights).
fn surrogates(
    params: &ProtectParams,
    shape: ImageShape,
    classes: usize,
    device: &candle_core::Device,
    round: usize,
) -> Result<Vec<Net>> {
    std::iter::once(&params.surrogate)
        .chain(&params.ensemble)
        .enumerate()
        .map(|(k, arch)| {
            let seed = match round {
                0 => mix(params.seed, 1, k as u64),
                r => mix(params.seed, 9, ((r as u64) << 8) | k as u64),
            };
            Net::new(arch, shape, classes, device, seed)
        })
        .collect()
}

/// One optimiser per surrogate, with fresh momentum.
fn optimisers(params: &ProtectParams, nets: &[Net]) -> Result<Vec<MomentumSgd>> {
    nets.iter()
        .enumerate()
        .map(|(k, net)| MomentumSgd::new(net.named_trainable_vars(), params.sgd_of(k)))
        .collect()
}

/// Borrowed pieces of one run.
struct Run<'a> {
    data: &'a Dataset,
    params: &'a ProtectParams,
    /// The surrogate, then the ensemble.
    nets: &'a [Net],
    classwise: bool,
    eps: f32,
    step: f32,
    /// [`ProtectParams::code_fraction`]'s fixed code pixels, one mask per
    /// class (empty without a code).
    code: &'a [u8],
    /// The label each image's noise steps aim at: its own (error-minimising)
    /// or the next class ([`Objective::Targeted`]).
    targets: Vec<u32>,
}

impl<'a> Run<'a> {
    fn new(
        data: &'a Dataset,
        params: &'a ProtectParams,
        nets: &'a [Net],
        code: &'a [u8],
    ) -> Run<'a> {
        let classes = data.classes().len();
        let targets = data
            .labels()
            .iter()
            .map(|&y| params.objective.target(y as usize, classes))
            .collect();
        Run {
            data,
            params,
            nets,
            classwise: params.method.classwise(),
            eps: params.eps as f32,
            step: params.step() as f32,
            code,
            targets,
        }
    }

    /// Whether pixel `q` of class `c` carries the fixed code.
    fn is_code(&self, c: usize, q: usize) -> bool {
        carries_code(self.code, self.shape().pixels(), c, q)
    }

    fn shape(&self) -> ImageShape {
        self.data.shape()
    }

    /// The noise unit of image `i`: its class (class-wise) or itself.
    fn unit_of(&self, i: usize) -> usize {
        if self.classwise {
            self.data.labels()[i] as usize
        } else {
            i
        }
    }

    /// Protected (unquantised) values of image `i`, appended to `out`.
    fn push_perturbed(&self, state: &State, i: usize, out: &mut Vec<f32>) {
        self.push_with_unit(state, i, self.unit_of(i), out);
    }

    /// What the surrogates train on for image `i`: the protected image
    /// (error-minimising) or the clean one ([`Objective::Targeted`]).
    fn push_training(&self, state: &State, i: usize, out: &mut Vec<f32>) {
        match self.params.objective {
            Objective::ErrorMinimising => self.push_perturbed(state, i, out),
            Objective::Targeted => out.extend_from_slice(self.data.image(i)),
        }
    }

    /// Image `i` with the noise of unit `u` (a class, class-wise; an
    /// image, sample-wise), clipped to the box, appended to `out`.
    fn push_with_unit(&self, state: &State, i: usize, u: usize, out: &mut Vec<f32>) {
        let v = self.shape().values();
        out.extend(protected(
            self.data.image(i),
            &state.delta[u * v..(u + 1) * v],
        ));
    }

    /// Mismatched pairs for [`RoundLog::shortcut_accuracy`]: every image
    /// with the noise of the next class (class-wise) or of the next image
    /// of another class (sample-wise), labelled with the noise's class.
    /// `None` when there is no other class.
    fn shortcut_pairs(&self, state: &State) -> Option<(Vec<f32>, Vec<u32>)> {
        let classes = self.data.classes().len();
        let labels = self.data.labels();
        let n = self.data.len();
        if classes < 2 || n == 0 || self.params.objective == Objective::Targeted {
            return None;
        }
        let mut px = Vec::with_capacity(self.data.pixels().len());
        let mut targets = Vec::with_capacity(n);
        for (i, &y) in labels.iter().enumerate() {
            if self.classwise {
                let c = (y as usize + 1) % classes;
                self.push_with_unit(state, i, c, &mut px);
                targets.push(c as u32);
            } else {
                let j = (1..n).map(|k| (i + k) % n).find(|&j| labels[j] != y)?;
                self.push_with_unit(state, i, j, &mut px);
                targets.push(labels[j]);
            }
        }
        Some((px, targets))
    }

    /// Class-wise cross pairs: for each image of `idx`, the class whose
    /// noise (and label) it carries in this step: its own, or with
    /// probability `cross_pairs` another class drawn uniformly.
    fn pair_classes(&self, idx: &[usize], rng: &mut StdRng) -> Vec<usize> {
        let classes = self.data.classes().len();
        idx.iter()
            .map(|&i| {
                let y = self.data.labels()[i] as usize;
                if classes > 1
                    && self.params.cross_pairs > 0.0
                    && rng.random::<f64>() < self.params.cross_pairs
                {
                    (y + 1 + rng.random_range(0..classes - 1)) % classes
                } else {
                    y
                }
            })
            .collect()
    }

    fn perturbed_all(&self, state: &State) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.data.pixels().len());
        for i in 0..self.data.len() {
            self.push_perturbed(state, i, &mut out);
        }
        out
    }

    /// Per-image masks (class masks repeated for class-wise runs).
    fn expanded_masks(&self, state: &State) -> Vec<u8> {
        if !self.classwise {
            return state.mask.clone();
        }
        let hw = self.shape().pixels();
        let mut out = Vec::with_capacity(self.data.len() * hw);
        for &l in self.data.labels() {
            let c = l as usize;
            out.extend_from_slice(&state.mask[c * hw..(c + 1) * hw]);
        }
        out
    }

    /// Accuracy and loss of every surrogate on `pixels`: the lowest
    /// accuracy (with that surrogate's confusion matrix) and the highest
    /// loss.
    fn evaluate(&self, pixels: &[f32], labels: &[u32]) -> Result<crate::model::Eval> {
        let mut out: Option<crate::model::Eval> = None;
        for net in self.nets {
            let e = net.evaluate(pixels, labels, self.params.pgd_batch)?;
            out = Some(match out {
                None => e,
                Some(o) => crate::model::Eval {
                    accuracy: o.accuracy.min(e.accuracy),
                    loss: o.loss.max(e.loss),
                    confusion: if e.accuracy < o.accuracy {
                        e.confusion
                    } else {
                        o.confusion
                    },
                },
            });
        }
        out.ok_or_else(|| Error::Config("no surrogate".into()))
    }

    /// (a): surrogate SGD steps on the protected images (every surrogate
    /// on the same batches); the mean loss.
    fn theta_step(&self, state: &mut State, opts: &mut [MomentumSgd], round: usize) -> Result<f64> {
        let n = self.data.len();
        let bs = self.params.train_batch.min(n);
        let mut rng = StdRng::seed_from_u64(mix(self.params.seed, 2, round as u64));
        let mut total = 0f64;
        let steps = self.params.train_steps_per_round;
        let mut prng = StdRng::seed_from_u64(mix(self.params.seed, 6, round as u64));
        for _ in 0..steps {
            let idx = rand::seq::index::sample(&mut rng, n, bs).into_vec();
            let mut px = Vec::with_capacity(bs * self.shape().values());
            let mut labels = Vec::with_capacity(bs);
            if self.classwise && self.params.cross_pairs > 0.0 {
                for (&i, c) in idx.iter().zip(self.pair_classes(&idx, &mut prng)) {
                    self.push_with_unit(state, i, c, &mut px);
                    labels.push(c as u32);
                }
            } else {
                for &i in &idx {
                    self.push_training(state, i, &mut px);
                    labels.push(self.data.labels()[i]);
                }
            }
            jitter(&mut px, self.params.stable_radius, &mut prng);
            for (net, opt) in self.nets.iter().zip(opts.iter_mut()) {
                let x = net.batch(&px)?;
                let y = net.labels(&labels)?;
                let logits = net.forward(&x, Mode::Train)?;
                let loss = nn::cross_entropy(&logits, &y, None)?;
                total += opt.step(&loss)? as f64 / self.nets.len() as f64;
            }
        }
        if self.params.bn_recalibration > 0 && steps > 0 {
            for net in self.nets {
                net.set_trainable(false);
            }
            let result = (|| -> Result<()> {
                for _ in 0..self.params.bn_recalibration {
                    let idx = rand::seq::index::sample(&mut rng, n, bs).into_vec();
                    let mut px = Vec::with_capacity(bs * self.shape().values());
                    for &i in &idx {
                        self.push_training(state, i, &mut px);
                    }
                    jitter(&mut px, self.params.stable_radius, &mut prng);
                    for net in self.nets {
                        net.forward(&net.batch(&px)?, Mode::Train)?;
                    }
                }
                Ok(())
            })();
            for net in self.nets {
                net.set_trainable(true);
            }
            result?;
        }
        Ok(if steps == 0 {
            0.0
        } else {
            total / steps as f64
        })
    }

    /// Input gradients of CE at the protected images `idx` towards their
    /// targets; class-wise with `pairs`, image `idx[b]` carries the noise
    /// of class `pairs[b]` (and aims at that class's target) instead of
    /// its own. With `jitter_seed`, the images get
    /// [`ProtectParams::stable_radius`]'s uniform noise first (none at
    /// radius 0, see [`jitter`]); mask ranking passes `None`.
    fn gradients(
        &self,
        frozen: &[FrozenNet<'_>],
        state: &State,
        idx: std::ops::Range<usize>,
        pairs: Option<&[usize]>,
        jitter_seed: Option<u64>,
    ) -> Result<Vec<f32>> {
        // Each image with the noise of its unit (see `push_with_unit`),
        // one image per task.
        let units: Vec<(usize, usize)> = match pairs {
            Some(pairs) => idx.clone().zip(pairs.iter().copied()).collect(),
            None => idx.clone().map(|i| (i, self.unit_of(i))).collect(),
        };
        let v = self.shape().values();
        let mut px = vec![0f32; units.len() * v];
        let (data, delta) = (&self.data, &state.delta);
        px.par_chunks_mut(v).zip(&units).for_each(|(out, &(i, u))| {
            let values = protected(data.image(i), &delta[u * v..(u + 1) * v]);
            for (o, p) in out.iter_mut().zip(values) {
                *o = p;
            }
        });
        if let Some(seed) = jitter_seed {
            jitter(
                &mut px,
                self.params.stable_radius,
                &mut StdRng::seed_from_u64(seed),
            );
        }
        let labels: Vec<u32> = match pairs {
            Some(pairs) => pairs
                .iter()
                .map(|&c| self.params.objective.target(c, self.data.classes().len()))
                .collect(),
            None => self.targets[idx].to_vec(),
        };
        let mut g: Vec<f32> = Vec::new();
        for (net, frozen) in self.nets.iter().zip(frozen) {
            let x = net.batch(&px)?;
            let y = net.labels(&labels)?;
            let (_, gk) = frozen.input_gradient(&x, &y)?;
            let gk = gk.flatten_all()?.to_vec1::<f32>()?;
            if g.is_empty() {
                g = gk;
            } else {
                for (a, b) in g.iter_mut().zip(gk) {
                    *a += b;
                }
            }
        }
        if self.params.shared_channels && self.shape().channels > 1 {
            let s = self.shape();
            let (v, hw) = (s.values(), s.pixels());
            for img in g.chunks_mut(v) {
                for p in 0..hw {
                    let sum: f32 = (0..s.channels).map(|c| img[c * hw + p]).sum();
                    for c in 0..s.channels {
                        img[c * hw + p] = sum;
                    }
                }
            }
        }
        Ok(g)
    }

    fn salm(&self) -> Option<(f64, MaskStrategy, MaskRefresh)> {
        match &self.params.method {
            Method::Salm {
                rho, mask, refresh, ..
            } => Some((*rho, *mask, *refresh)),
            Method::Em { .. } => None,
        }
    }

    /// (b): the noise update over every batch.
    fn delta_step(
        &self,
        state: &mut State,
        round: usize,
        control: &RunControl,
        bar: &ProgressBar,
    ) -> Result<Churn> {
        let n = self.data.len();
        let bs = self.params.pgd_batch;
        let mut churn = Churn::default();
        // The surrogates do not change during the pass: one snapshot each.
        let frozen = self.freeze_nets()?;
        if self.classwise {
            self.refresh_class_masks(&frozen, state, round, &mut churn)?;
        }
        let mut start = 0;
        while start < n {
            if control
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(Error::Cancelled);
            }
            let end = (start + bs).min(n);
            for t in 0..self.params.pgd_steps {
                let step_key = ((round as u64) << 32) ^ ((start as u64) << 10) ^ t as u64;
                let jitter_seed = Some(mix(self.params.seed, 9, step_key));
                if self.classwise {
                    let pairs = if self.params.cross_pairs > 0.0 {
                        let mut prng = StdRng::seed_from_u64(mix(self.params.seed, 7, step_key));
                        let idx: Vec<usize> = (start..end).collect();
                        self.pair_classes(&idx, &mut prng)
                    } else {
                        (start..end)
                            .map(|i| self.data.labels()[i] as usize)
                            .collect()
                    };
                    let g =
                        self.gradients(&frozen, state, start..end, Some(&pairs), jitter_seed)?;
                    self.class_update(state, start..end, &pairs, &g);
                } else {
                    let g = self.gradients(&frozen, state, start..end, None, jitter_seed)?;
                    if let Some((rho, strategy, refresh)) = self.salm() {
                        self.refresh_image_masks(
                            state,
                            start..end,
                            &g,
                            (rho, strategy, refresh),
                            (round, t),
                            &mut churn,
                        );
                    }
                    self.sample_update(state, start..end, &g);
                }
                state.image_steps += (end - start) as u64;
                bar.inc((end - start) as u64);
            }
            start = end;
        }
        tracing::debug!(round, "delta step done");
        Ok(churn)
    }

    /// Whether `round` is past [`ProtectParams::freeze_mask_after`]: masks
    /// already chosen are kept.
    fn masks_frozen(&self, round: usize) -> bool {
        let after = self.params.freeze_mask_after;
        after > 0 && round > after
    }

    fn refresh_image_masks(
        &self,
        state: &mut State,
        idx: std::ops::Range<usize>,
        g: &[f32],
        (rho, strategy, refresh): (f64, MaskStrategy, MaskRefresh),
        (round, t): (usize, usize),
        churn: &mut Churn,
    ) {
        if !strategy.needs_gradient() {
            return;
        }
        let s = self.shape();
        let (v, hw) = (s.values(), s.pixels());
        let k = mask::mask_size(rho, hw);
        let frozen = self.masks_frozen(round);
        for (b, i) in idx.enumerate() {
            let due = !state.mask_ready[i]
                || (!frozen
                    && match refresh {
                        MaskRefresh::PerStep => true,
                        MaskRefresh::PerRound => t == 0,
                        MaskRefresh::Fixed => false,
                    });
            if !due {
                continue;
            }
            let scores = mask::gradient_scores(
                strategy,
                self.data.image(i),
                &g[b * v..(b + 1) * v],
                s,
                self.eps,
            );
            let m = mask::top_k(&scores, k);
            for c in 0..s.channels {
                for (q, &keep) in m.iter().enumerate() {
                    if keep == 0 {
                        state.delta[i * v + c * hw + q] = 0.0;
                    }
                }
            }
            if state.mask_ready[i] {
                churn.count(&state.mask[i * hw..(i + 1) * hw], &m);
            }
            state.mask[i * hw..(i + 1) * hw].copy_from_slice(&m);
            state.mask_ready[i] = true;
        }
    }

    /// Sign-gradient descent with the three projections, one image per
    /// task (each image's own arithmetic, so any thread count gives the
    /// same values; on a GPU this host loop runs between two steps while
    /// the device waits).
    fn sample_update(&self, state: &mut State, idx: std::ops::Range<usize>, g: &[f32]) {
        let s = self.shape();
        let (v, hw) = (s.values(), s.pixels());
        let (step, eps, data) = (self.step, self.eps, &self.data);
        let mask = &state.mask;
        state.delta[idx.start * v..idx.end * v]
            .par_chunks_mut(v)
            .zip(g.par_chunks(v))
            .zip(idx)
            .for_each(|((delta, g), i)| {
                let x = data.image(i);
                let m = &mask[i * hw..(i + 1) * hw];
                for ((delta, g), x) in delta.chunks_mut(hw).zip(g.chunks(hw)).zip(x.chunks(hw)) {
                    for q in 0..hw {
                        delta[q] = if m[q] == 0 {
                            0.0
                        } else {
                            let d = (delta[q] - step * sign(g[q])).clamp(-eps, eps);
                            (x[q] + d).clamp(0.0, 1.0) - x[q]
                        };
                    }
                }
            });
    }

    /// Class-wise: a projected sign step of each class noise along the
    /// summed input gradients of its images in the batch (the gradient of
    /// the batch loss with respect to the shared noise). An image whose
    /// pixel is already clipped at 0 or 1 in the step's direction adds
    /// nothing there.
    fn class_update(
        &self,
        state: &mut State,
        idx: std::ops::Range<usize>,
        pairs: &[usize],
        g: &[f32],
    ) {
        let s = self.shape();
        let (v, hw) = (s.values(), s.pixels());
        let classes = self.data.classes().len();
        // Per class, the sum over the batch's images in batch order; one
        // class per task (the same order, so the same sums, on any thread
        // count).
        let images: Vec<(usize, usize)> = idx.enumerate().collect();
        let (delta, data) = (&state.delta, &self.data);
        let sum: Vec<Vec<f32>> = (0..classes)
            .into_par_iter()
            .map(|c| {
                let mut sum = vec![0f32; v];
                let d = &delta[c * v..(c + 1) * v];
                for &(b, i) in images.iter().filter(|&&(b, _)| pairs[b] == c) {
                    let x = data.image(i);
                    for (((s, gv), xv), dv) in
                        sum.iter_mut().zip(&g[b * v..(b + 1) * v]).zip(x).zip(d)
                    {
                        let p = xv + dv;
                        // Descent moves the pixel by -sign(g): blocked at the box.
                        let blocked = (*gv > 0.0 && p <= 0.0) || (*gv < 0.0 && p >= 1.0);
                        if !blocked {
                            *s += gv;
                        }
                    }
                }
                sum
            })
            .collect();
        // `self` is not `Sync` (the surrogates): the closure takes fields.
        let (step, eps, code) = (self.step, self.eps, self.code);
        let mask = &state.mask;
        state.delta[..classes * v]
            .par_chunks_mut(v)
            .zip(sum)
            .enumerate()
            .for_each(|(c, (delta, sum))| {
                let m = &mask[c * hw..(c + 1) * hw];
                for (delta, sum) in delta.chunks_mut(hw).zip(sum.chunks(hw)) {
                    for q in 0..hw {
                        delta[q] = if carries_code(code, hw, c, q) {
                            eps
                        } else if m[q] == 1 {
                            (delta[q] - step * sign(sum[q])).clamp(-eps, eps)
                        } else {
                            0.0
                        };
                    }
                }
            });
    }

    /// Every surrogate frozen as it is now (see [`Net::freeze`]).
    fn freeze_nets(&self) -> Result<Vec<FrozenNet<'_>>> {
        self.nets.iter().map(Net::freeze).collect()
    }

    /// Class-wise SALM with a gradient strategy: class score = sum of its
    /// images' scores, from one gradient pass (per round, or once when
    /// fixed).
    fn refresh_class_masks(
        &self,
        frozen: &[FrozenNet<'_>],
        state: &mut State,
        round: usize,
        churn: &mut Churn,
    ) -> Result<()> {
        let Some((rho, strategy, refresh)) = self.salm() else {
            return Ok(());
        };
        let keep = refresh == MaskRefresh::Fixed || self.masks_frozen(round);
        if !strategy.needs_gradient() || (keep && state.mask_ready.iter().all(|&r| r)) {
            return Ok(());
        }
        let s = self.shape();
        let (v, hw) = (s.values(), s.pixels());
        let classes = self.data.classes().len();
        let mut scores = vec![0f32; classes * hw];
        let n = self.data.len();
        let mut start = 0;
        while start < n {
            let end = (start + self.params.pgd_batch).min(n);
            let g = self.gradients(frozen, state, start..end, None, None)?;
            for (b, i) in (start..end).enumerate() {
                let c = self.data.labels()[i] as usize;
                let sc = mask::gradient_scores(
                    strategy,
                    self.data.image(i),
                    &g[b * v..(b + 1) * v],
                    s,
                    self.eps,
                );
                for (a, x) in scores[c * hw..(c + 1) * hw].iter_mut().zip(sc) {
                    *a += x;
                }
            }
            start = end;
        }
        let k = mask::mask_size(rho, hw);
        for c in 0..classes {
            // Code pixels are fixed (their noise stays +eps): the refined
            // mask takes the rest of the budget from the other pixels.
            let code: Vec<usize> = (0..hw).filter(|&q| self.is_code(c, q)).collect();
            for &q in &code {
                scores[c * hw + q] = -1.0;
            }
            let mut m = mask::top_k(&scores[c * hw..(c + 1) * hw], k.saturating_sub(code.len()));
            for &q in &code {
                m[q] = 1;
            }
            for ch in 0..s.channels {
                for (q, &keep) in m.iter().enumerate() {
                    if keep == 0 {
                        state.delta[c * v + ch * hw + q] = 0.0;
                    }
                }
            }
            if state.mask_ready[c] {
                churn.count(&state.mask[c * hw..(c + 1) * hw], &m);
            }
            state.mask[c * hw..(c + 1) * hw].copy_from_slice(&m);
            state.mask_ready[c] = true;
        }
        Ok(())
    }
}

/// How much one round's mask refreshes changed the masks
/// ([`RoundLog::mask_changed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Churn {
    /// Pixels in a refreshed mask that were not in it before.
    entered: u64,
    /// Pixels in the refreshed masks.
    masked: u64,
}

impl Churn {
    /// Counts one refresh of a mask chosen before, `old` to `new`.
    fn count(&mut self, old: &[u8], new: &[u8]) {
        for (&o, &n) in old.iter().zip(new) {
            self.masked += u64::from(n);
            self.entered += u64::from(n == 1 && o == 0);
        }
    }

    /// The fraction of refreshed mask pixels that are new; `None` when no
    /// mask chosen before was refreshed.
    fn fraction(&self) -> Option<f64> {
        (self.masked > 0).then(|| self.entered as f64 / self.masked as f64)
    }
}

/// Image `x` plus noise `d`, clipped to the box (unquantised).
fn protected<'a>(x: &'a [f32], d: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
    x.iter().zip(d).map(|(a, b)| (a + b).clamp(0.0, 1.0))
}

/// Adds uniform noise in `[-radius, radius]` to every value, clipped to
/// the box ([`ProtectParams::stable_radius`]); nothing at radius 0.
fn jitter(px: &mut [f32], radius: f64, rng: &mut StdRng) {
    if radius <= 0.0 {
        return;
    }
    let r = radius as f32;
    for p in px.iter_mut() {
        *p = (*p + rng.random_range(-r..=r)).clamp(0.0, 1.0);
    }
}

/// [`Run::is_code`] on the fields it reads: `code` holds one `hw`-pixel
/// 0/1 plane per class (empty: no code).
fn carries_code(code: &[u8], hw: usize, c: usize, q: usize) -> bool {
    code.get(c * hw + q) == Some(&1)
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// A dry-run time estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Images to protect.
    pub images: usize,
    /// Noise steps per round (images x pgd_steps).
    pub image_steps_per_round: u64,
    /// Measured noise-step throughput on this machine (0 for a model-free
    /// run: nothing is timed).
    pub image_steps_per_second: f64,
    /// Estimated seconds per round (noise steps, surrogate steps and the
    /// accuracy pass).
    pub seconds_per_round: f64,
    /// Estimated total at `min_rounds`.
    pub min_seconds: f64,
    /// Estimated total at `max_rounds`.
    pub max_seconds: f64,
}

/// Times a few surrogate and noise steps on `data` and extrapolates a full
/// run (a few seconds; nothing is written).
pub fn estimate_dataset(data: &Dataset, params: &ProtectParams) -> Result<Estimate> {
    check_fits(data, params)?;
    if params.model_free() {
        // No round runs: the time is reading and writing the files.
        return Ok(Estimate {
            images: data.len(),
            image_steps_per_round: 0,
            image_steps_per_second: 0.0,
            seconds_per_round: 0.0,
            min_seconds: 0.0,
            max_seconds: 0.0,
        });
    }
    let device = params.device_spec()?.open()?;
    let shape = data.shape();
    let v = shape.values();
    let n = data.len();
    let pb = params.pgd_batch.min(n);
    let tb = params.train_batch.min(n);
    // Every surrogate's time adds up: each one takes every step.
    let (mut per_image_step, mut per_train_step) = (0f64, 0f64);
    for (k, arch) in std::iter::once(&params.surrogate)
        .chain(&params.ensemble)
        .enumerate()
    {
        let net = Net::new(
            arch,
            shape,
            data.classes().len(),
            &device,
            mix(params.seed, 1, k as u64),
        )?;
        let x = net.batch(&data.pixels()[..pb * v])?;
        let y = net.labels(&data.labels()[..pb])?;
        // Warm-up, then time two noise steps (through one snapshot, as a
        // noise pass takes them).
        let frozen = net.freeze()?;
        frozen.input_gradient(&x, &y)?;
        let t0 = Instant::now();
        for _ in 0..2 {
            frozen.input_gradient(&x, &y)?;
        }
        per_image_step += t0.elapsed().as_secs_f64() / (2 * pb) as f64;
        per_train_step += seconds_per_train_step(&net, params.sgd, data, tb)?;
    }
    let steps = (n * params.pgd_steps) as u64;
    let mut round = steps as f64 * per_image_step
        + params.train_steps_per_round as f64 * per_train_step
        + n as f64 * per_image_step / 3.0;
    let classwise_mask = matches!(
        &params.method,
        Method::Salm { classwise: true, mask, refresh, .. }
            if mask.needs_gradient() && *refresh != MaskRefresh::Fixed
    );
    if classwise_mask {
        round += n as f64 * per_image_step;
    }
    if let Some(proxy) = params.release.proxy() {
        // A proxy victim's training, spread over the rounds it measures.
        let net = Net::new(
            &proxy.arch,
            shape,
            data.classes().len(),
            &device,
            mix(params.seed, 21, 0),
        )?;
        let pb = proxy.batch.min(n);
        let per_step = seconds_per_train_step(&net, proxy.sgd, data, pb)?;
        let train = n as f64 * (1.0 - proxy.holdout_fraction);
        let per_measure = proxy.epochs as f64 * (train / pb as f64).ceil() * per_step;
        round += per_measure / proxy.every as f64;
    }
    Ok(Estimate {
        images: n,
        image_steps_per_round: steps,
        image_steps_per_second: 1.0 / per_image_step,
        seconds_per_round: round,
        min_seconds: round * params.stop.min_rounds as f64,
        max_seconds: round * params.stop.max_rounds as f64,
    })
}

/// Seconds of one SGD step of `net` on a batch of the first `batch` images
/// (the mean of two steps).
fn seconds_per_train_step(net: &Net, sgd: SgdParams, data: &Dataset, batch: usize) -> Result<f64> {
    let v = data.shape().values();
    let mut opt = MomentumSgd::new(net.named_trainable_vars(), sgd)?;
    let x = net.batch(&data.pixels()[..batch * v])?;
    let y = net.labels(&data.labels()[..batch])?;
    let t = Instant::now();
    for _ in 0..2 {
        let logits = net.forward(&x, Mode::Train)?;
        opt.step(&nn::cross_entropy(&logits, &y, None)?)?;
    }
    Ok(t.elapsed().as_secs_f64() / 2.0)
}

#[cfg(test)]
mod tests;
