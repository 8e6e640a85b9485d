//! Training a fresh "victim" model on (protected or clean) training images
//! and measuring its test accuracy: the only honest evidence that
//! protection works.
//!
//! SGD with momentum and weight decay, a cosine learning-rate schedule to
//! zero, global-norm clipping, as in the unlearnable-examples victim recipe
//! (scaled down in epochs for the CPU). The test accuracy is measured after
//! every epoch and both the **peak** (an attacker with early stopping on a
//! clean validation set gets this) and the final value are reported.

use std::time::Instant;

use candle_core::{Device, Tensor};
use lethe_model::nn::{self, Mode};
use lethe_model::optim::CosineSchedule;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, ImageShape};
use crate::defence::{self, Defence};
use crate::model::{Arch, MomentumSgd, Net, SgdParams};
use crate::sources::mix;
use crate::{Error, Result};

/// How victims are trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VictimConfig {
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per SGD step.
    pub batch: usize,
    /// Optimiser (the learning rate is the cosine schedule's peak).
    pub sgd: SgdParams,
}

impl VictimConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.epochs > 10_000 {
            return Err(Error::Config(format!(
                "victim epochs must be 1..=10000, got {}",
                self.epochs
            )));
        }
        if self.batch == 0 {
            return Err(Error::Config("victim batch must be positive, got 0".into()));
        }
        self.sgd.validate()
    }
}

/// One victim run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VictimRun {
    /// Architecture label.
    pub arch: String,
    /// Initialisation and shuffling seed.
    pub seed: u64,
    /// Countermeasure label.
    pub defence: String,
    /// Peak test accuracy over epochs.
    pub test_acc_peak: f64,
    /// Test accuracy after the last epoch.
    pub test_acc_final: f64,
    /// Epoch (1-based) of the peak.
    pub peak_epoch: usize,
    /// Accuracy on the training images as trained on (after any
    /// pre-processing), after the last epoch: near 1 with a low test
    /// accuracy is the shortcut signature.
    pub train_acc_final: f64,
    /// Test accuracy after each epoch.
    pub curve: Vec<f64>,
    /// Test images by true class (rows) and predicted class (columns) at
    /// the peak epoch: which classes a victim still tells apart when it
    /// generalises best.
    pub confusion_peak: Vec<Vec<u32>>,
    /// The same after the last epoch.
    pub confusion_final: Vec<Vec<u32>>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Trains a fresh `arch` (seeded by `seed`) on `train` under `defence` and
/// evaluates on `test` after every epoch.
pub fn train_victim(
    train: &Dataset,
    test: &Dataset,
    arch: &Arch,
    seed: u64,
    defence: &Defence,
    config: &VictimConfig,
    device: &Device,
) -> Result<VictimRun> {
    config.validate()?;
    defence.validate()?;
    let shape = train.shape();
    if test.shape() != shape || test.classes().len() != train.classes().len() {
        return Err(Error::Unsupported(
            "train and test images differ in shape or classes".into(),
        ));
    }
    let t0 = Instant::now();
    let classes = train.classes().len();
    let net = Net::new(arch, shape, classes, device, mix(seed, 11, 0))?;
    let mut opt = MomentumSgd::new(net.named_trainable_vars(), config.sgd)?;
    let mut rng = StdRng::seed_from_u64(mix(seed, 12, 0));
    let train_px = defence::preprocess(defence, train.pixels(), shape, &mut rng)?;
    let test_px = if defence.applies_to_test() {
        defence::preprocess(defence, test.pixels(), shape, &mut rng)?
    } else {
        test.pixels().to_vec()
    };
    let n = train.len();
    let bs = config.batch.min(n);
    let steps_per_epoch = n.div_ceil(bs);
    let total = (steps_per_epoch * config.epochs) as u64;
    let schedule = CosineSchedule::new(config.sgd.lr, 0.0, 0, total)?;
    let v = shape.values();
    let pad = (shape.height.max(shape.width) / 8).max(1);
    let mut step = 0u64;
    let mut curve = Vec::with_capacity(config.epochs);
    let (mut peak, mut peak_epoch) = (0.0, 0);
    let mut confusion_peak = Vec::new();
    let mut confusion_final = Vec::new();
    let mut order: Vec<usize> = (0..n).collect();
    for epoch in 0..config.epochs {
        let mut erng = StdRng::seed_from_u64(mix(seed, 13, epoch as u64));
        order.shuffle(&mut erng);
        for chunk in order.chunks(bs) {
            opt.set_lr(schedule.lr_at(step));
            step += 1;
            let mut px = Vec::with_capacity(chunk.len() * v);
            let mut labels = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let mut img = train_px[i * v..(i + 1) * v].to_vec();
                if defence.flip_crop() {
                    defence::flip_crop(&mut img, shape, pad, &mut erng);
                }
                if let Defence::Cutout { size } = defence {
                    defence::cutout(&mut img, shape, *size, &mut erng);
                }
                px.extend(img);
                labels.push(train.labels()[i]);
            }
            let loss = match defence {
                Defence::Mixup { alpha } => {
                    mixup_loss(&net, &px, &labels, shape, *alpha, &mut erng)?
                }
                Defence::Adversarial { eps, steps } => {
                    let adv = pgd_attack(&net, &px, &labels, *eps, *steps, &mut erng)?;
                    let logits = net.forward(&net.batch(&adv)?, Mode::Train)?;
                    nn::cross_entropy(&logits, &net.labels(&labels)?, None)?
                }
                _ => {
                    let logits = net.forward(&net.batch(&px)?, Mode::Train)?;
                    nn::cross_entropy(&logits, &net.labels(&labels)?, None)?
                }
            };
            opt.step(&loss)?;
        }
        let eval = net.evaluate(&test_px, test.labels(), 512)?;
        // The first epoch with the highest accuracy is the peak.
        if epoch == 0 || eval.accuracy > peak {
            (peak, peak_epoch) = (eval.accuracy, epoch + 1);
            confusion_peak.clone_from(&eval.confusion);
        }
        curve.push(eval.accuracy);
        confusion_final = eval.confusion;
    }
    let train_eval = net.evaluate(&train_px, train.labels(), 512)?;
    Ok(VictimRun {
        arch: arch.label(),
        seed,
        defence: defence.label(),
        test_acc_peak: peak,
        test_acc_final: curve.last().copied().unwrap_or(0.0),
        peak_epoch,
        train_acc_final: train_eval.accuracy,
        curve,
        confusion_peak,
        confusion_final,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Mixup: `lambda * CE(y) + (1 - lambda) * CE(y[perm])` on mixed images.
fn mixup_loss(
    net: &Net,
    px: &[f32],
    labels: &[u32],
    shape: ImageShape,
    alpha: f32,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let v = shape.values();
    let b = labels.len();
    let lam = defence::beta(alpha, rng);
    let mut perm: Vec<usize> = (0..b).collect();
    perm.shuffle(rng);
    let mut mixed = Vec::with_capacity(px.len());
    for i in 0..b {
        let (a, o) = (&px[i * v..(i + 1) * v], &px[perm[i] * v..(perm[i] + 1) * v]);
        mixed.extend(a.iter().zip(o).map(|(x, y)| lam * x + (1.0 - lam) * y));
    }
    let other: Vec<u32> = perm.iter().map(|&p| labels[p]).collect();
    let logits = net.forward(&net.batch(&mixed)?, Mode::Train)?;
    let la = nn::cross_entropy(&logits, &net.labels(labels)?, None)?;
    let lb = nn::cross_entropy(&logits, &net.labels(&other)?, None)?;
    Ok(((la * lam as f64)? + (lb * (1.0 - lam) as f64)?)?)
}

/// L-inf PGD maximising the loss (random start, step `2.5 eps / steps`).
fn pgd_attack(
    net: &Net,
    px: &[f32],
    labels: &[u32],
    eps: f32,
    steps: usize,
    rng: &mut StdRng,
) -> Result<Vec<f32>> {
    let alpha = 2.5 * eps / steps as f32;
    let mut adv: Vec<f32> = px
        .iter()
        .map(|&x| (x + rng.random_range(-eps..=eps)).clamp(0.0, 1.0))
        .collect();
    let y = net.labels(labels)?;
    // The weights do not change during the attack: one snapshot.
    let frozen = net.freeze()?;
    for _ in 0..steps {
        let (_, g) = frozen.input_gradient(&net.batch(&adv)?, &y)?;
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        for ((a, x), gv) in adv.iter_mut().zip(px).zip(&g) {
            let s = if *gv > 0.0 {
                1.0
            } else if *gv < 0.0 {
                -1.0
            } else {
                0.0
            };
            *a = (*a + alpha * s).clamp(x - eps, x + eps).clamp(0.0, 1.0);
        }
    }
    Ok(adv)
}
