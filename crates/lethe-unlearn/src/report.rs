//! What every unlearning method returns: the facts a signed receipt needs.
//!
//! A report names the method and its full hyper-parameters, the weight
//! hashes before and after (equal for adapter methods, which leave the base
//! untouched), the SalUn mask or O3 adapter/detector hashes, whether the
//! method only *suppresses* (O3: the base weights still hold the data, so
//! raw-weight access can recover it), run time and metrics. The compliance
//! workflow signs it; this crate only fills it in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::saliency::MaskSummary;

/// Hash and size of an adapter produced by a method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSummary {
    /// Adapter name (unique on its model).
    pub name: String,
    /// SHA-256 of its A/B tensors (see [`crate::hash`]).
    pub sha256: String,
    /// Trainable scalars.
    pub parameters: usize,
}

/// The outcome of one unlearning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnlearnReport {
    /// Method id (`ga`, `graddiff`, `npo`, `kl`, `salun`, `o3`, `salun_rl`,
    /// `finetune`, `retrain`, ...).
    pub method: String,
    /// Every hyper-parameter, as configured.
    pub hyperparameters: serde_json::Value,
    /// SHA-256 of the model weights when the method started.
    pub weights_before: String,
    /// SHA-256 of the model weights when it finished.
    pub weights_after: String,
    /// The SalUn mask, for masked methods.
    pub mask: Option<MaskSummary>,
    /// The adapter, for adapter methods.
    pub adapter: Option<AdapterSummary>,
    /// SHA-256 of the OOD detector statistics, for O3.
    pub detector_sha256: Option<String>,
    /// True when the method suppresses rather than removes: the base
    /// weights still encode the forgotten data.
    pub suppression_only: bool,
    /// Number of forget examples seen.
    pub forget_examples: usize,
    /// Number of retain examples available to the method (0 if none).
    pub retain_examples: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Measurements taken by the method itself (losses before/after, ...).
    pub metrics: BTreeMap<String, f64>,
}
