//! The proxy-victim release rule: rank crafting rounds by how well a small
//! fresh model, trained on the round's protected images, generalises to
//! clean images it has not seen.
//!
//! The surrogates' own shortcut accuracy did not rank rounds by protection
//! on the lesions selection draw (the `best_round` release protected worse
//! than the final round against fresh victims), so this rule measures what
//! a defender can measure without the reported test split: the crafting
//! data (the *training* split; callers split the test images off before
//! protecting) is split once, stratified and deterministically per seed,
//! into a proxy-training part and a holdout. After a measured round a fresh
//! proxy victim trains on the round's protected (quantised) images of the
//! proxy-training part and its peak accuracy over epochs on the *clean*
//! holdout images is logged ([`super::RoundLog::proxy_accuracy`]); the
//! round with the lowest value is released. The holdout images are still
//! protected and released like every other image; the holdout only decides
//! which round is released. The test split the audit reports never enters
//! the crafting run.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::defence::Defence;
use crate::model::{Arch, SgdParams};
use crate::sources::mix;
use crate::victim::{train_victim, VictimConfig};
use crate::{Error, Result};

/// Settings of the `proxy_victim` release (see the module docs).
///
/// In JSON: `"release": {"proxy_victim": {"arch": {...}, "every": 1,
/// "epochs": 5, "holdout_fraction": 0.2}}`; every field except `arch` has
/// a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyVictim {
    /// Measure after every `every`-th round (and always after the round
    /// at which the stop rule fires, so the final round is a candidate).
    /// Unmeasured rounds are never released. Default 1.
    #[serde(default = "default_every")]
    pub every: usize,
    /// Training epochs of each proxy victim (cosine schedule to zero, peak
    /// holdout accuracy over the epochs). Default 5.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Fraction of each class of the crafting data held out (clean) for
    /// the proxy's accuracy, in (0, 0.5]. Default 0.2.
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
    /// The proxy victim's architecture.
    pub arch: Arch,
    /// Images per proxy SGD step. Default 64.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Proxy optimiser. Default the audit victims' recipe: lr 0.05,
    /// momentum 0.9, weight decay 5e-4, clip 5.
    #[serde(default = "default_sgd")]
    pub sgd: SgdParams,
}

fn default_every() -> usize {
    1
}
fn default_epochs() -> usize {
    5
}
fn default_holdout() -> f64 {
    0.2
}
fn default_batch() -> usize {
    64
}
fn default_sgd() -> SgdParams {
    SgdParams {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        grad_clip: Some(5.0),
    }
}

impl ProxyVictim {
    /// The defaults above with architecture `arch`.
    pub fn new(arch: Arch) -> ProxyVictim {
        ProxyVictim {
            every: default_every(),
            epochs: default_epochs(),
            holdout_fraction: default_holdout(),
            arch,
            batch: default_batch(),
            sgd: default_sgd(),
        }
    }

    /// Checks the settings; the message names the bad one.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.every == 0 || self.every > 100_000 {
            return Err(Error::Config(format!(
                "proxy_victim.every must be 1..=100000, got {}",
                self.every
            )));
        }
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction <= 0.5) {
            return Err(Error::Config(format!(
                "proxy_victim.holdout_fraction must be in (0, 0.5], got {}",
                self.holdout_fraction
            )));
        }
        self.victim_config().validate()
    }

    fn victim_config(&self) -> VictimConfig {
        VictimConfig {
            epochs: self.epochs,
            batch: self.batch,
            sgd: self.sgd,
        }
    }

    /// Whether round `round` is measured (`stopping`: the stop rule fired
    /// after it).
    pub(crate) fn due(&self, round: usize, stopping: bool) -> bool {
        stopping || round % self.every == 0
    }
}

/// The proxy's split of the crafting data: sorted indices of the images it
/// trains on (protected) and of the clean holdout, disjoint, covering every
/// image, stratified per class; a pure function of the data's labels, the
/// fraction and `seed`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProxySplit {
    /// Indices whose protected images the proxy trains on.
    pub train: Vec<usize>,
    /// Indices whose clean images it is scored on.
    pub holdout: Vec<usize>,
}

impl ProxySplit {
    /// Splits `data` (see the type docs); an error with fewer than two
    /// images in every class that could give one to each side.
    pub(crate) fn new(data: &Dataset, fraction: f64, seed: u64) -> Result<ProxySplit> {
        let (train, holdout) = data.split(fraction, mix(seed, 20, 0)).map_err(|e| {
            Error::Config(format!(
                "proxy_victim needs images to hold out of the crafting data: {e}"
            ))
        })?;
        Ok(ProxySplit { train, holdout })
    }
}

/// The proxy-victim measurement of one round.
pub(crate) struct Proxy<'a> {
    cfg: &'a ProxyVictim,
    /// Clean holdout images.
    holdout: Dataset,
    train_idx: Vec<usize>,
    seed: u64,
}

impl<'a> Proxy<'a> {
    /// Prepares the measurement for `data` (the crafting data).
    pub(crate) fn new(cfg: &'a ProxyVictim, data: &Dataset, seed: u64) -> Result<Proxy<'a>> {
        let split = ProxySplit::new(data, cfg.holdout_fraction, seed)?;
        Ok(Proxy {
            cfg,
            holdout: data.subset(&split.holdout)?,
            train_idx: split.train,
            seed,
        })
    }

    /// Peak clean-holdout accuracy of a fresh proxy trained on the
    /// proxy-training part of `protected` (the whole crafting set with the
    /// round's noise, quantised as released). The proxy's initialisation
    /// and batch order are the same every round (seeded by the run's seed
    /// only), so rounds differ only by their noise.
    pub(crate) fn measure(&self, protected: &Dataset, device: &Device) -> Result<f64> {
        let train = protected.subset(&self.train_idx)?;
        let run = train_victim(
            &train,
            &self.holdout,
            &self.cfg.arch,
            mix(self.seed, 21, 0),
            &Defence::None,
            &self.cfg.victim_config(),
            device,
        )?;
        Ok(run.test_acc_peak)
    }
}
