//! O3's per-request out-of-distribution detector: does a query belong to
//! what request `t` asked to forget?
//!
//! O3 (Gao et al., ICLR 2025, "On Large Language Model Continual
//! Unlearning"; code `GCYZSL/O3-LLM-UNLEARNING`, `ood_model_selector.py`)
//! scores each layer of a contrastively fine-tuned RoBERTa with a global
//! Mahalanobis term plus a local max-cosine term against a bank of training
//! features, aggregates the layer scores with a linear one-class SVM and
//! maps the result to a soft weight through a two-Gaussian CDF calibration.
//!
//! This implementation, and where it deviates (labelled as the research
//! brief allows for small models):
//!
//! * **Encoder:** the decoder's own hidden states, mean-pooled over the
//!   query's tokens, position 0 left out (attention sink) unless the query
//!   has one token. No separate encoder or contrastive fine-tuning: the
//!   features come from the base model with every unlearning adapter gated
//!   off, so they do not move as adapters are added. By default the
//!   embedding layer is *kept* (O3 drops it with `[:, 1:]`): on a decoder
//!   trained from scratch it carries the lexical signal the upper layers
//!   lack (measured on the tiny test fixture, held-out AUROC about 0.98
//!   with the embeddings against 0.69 with the blocks alone).
//! * **Per-layer score:** with `mu_l`, a shrunk covariance `S_l = (1-a) C_l +
//!   a tr(C_l)/d I` (the empirical covariance is singular with fewer
//!   queries than dimensions) and an L2-normalised feature bank from the
//!   *fit* split, `m_l(x) = (h-mu_l)^T S_l^-1 (h-mu_l)` and
//!   `c_l(x) = max_j cos(h, bank_j)`. Both are standardised by their
//!   *out-of-fold* values (a query matches itself in the bank, so
//!   in-sample statistics would be optimistic):
//!   `s_l = (-(m_l - mean m) / sd m + w (c_l - mean c) / sd c) / (1 + w)`.
//! * **Cross-fitting** (deviation from O3's single train/test split of the
//!   forget data): the final statistics use every forget query, and k-fold
//!   cross-fitting gives each query an out-of-fold score. So every query of
//!   the request is in the bank (its own gate opens) while the calibration
//!   still sees honest held-out scores, from all the data.
//! * **Aggregation:** the mean of `s_l` over layers (instead of the linear
//!   one-class SVM, whose hyperplane on standardised scores is close to an
//!   equal-weight sum). Higher = more like the forget data.
//! * **Calibration to a weight** `w in (0, 1)`, from the in-sample mean
//!   `m1` and the out-of-fold mean `m2` and spread `s2` of the score:
//!   [`Calibration::O3`] is O3's `F(x) = (Phi((x-m1)/s2) + Phi((x-m2)/s2))/2`,
//!   `c = 1 - |F(x) - F(2 x0 - x)|` with `x0 = (m1+m2)/2`,
//!   `w = sigmoid(a c - b)` (a = 10, b = 2), made one-sided (`c = 1` for
//!   `x >= x0`: a query *more* typical than the forget data is not
//!   out-of-distribution); [`Calibration::Tail`] is a logistic step
//!   centred `z` spreads below `m2`.
//! * **Negative floor** [R, beyond O3, whose calibration sees only forget
//!   data]: given queries of data that is *kept* (the compliance workflow's
//!   retain sample), scores at or below the `1 - max_false_positive`
//!   quantile of theirs get weight 0, capped just below the lowest score of
//!   the request's own queries. The calibration above is fitted to the
//!   forget data alone, so it cannot tell how high kept data scores; the
//!   floor closes the gate for what is known to be kept.
//!
//! Statistics are stored in plain vectors and serialise with serde (JSON
//! parsing may round the last bit of an f64, so a reloaded detector can
//! hash differently while deciding identically); their SHA-256 goes into
//! the receipt.

use candle_core::DType;
use lethe_model::decoder::Decoder;
use lethe_model::nn::Mode;
use serde::{Deserialize, Serialize};

use crate::data::{pad_sequences, shuffled};
use crate::error::ensure_config;
use crate::metrics::{mean_std, normal_cdf, sigmoid};
use crate::{Error, Result};

/// How a detector score becomes a weight in `(0, 1)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Calibration {
    /// O3's two-Gaussian CDF calibration, one-sided (see the module docs).
    O3 {
        /// Slope `a` of the final sigmoid (10 in O3).
        sharpness: f64,
        /// Offset `b` of the final sigmoid (2 in O3).
        offset: f64,
    },
    /// `w = sigmoid((x - (m2 - z s2)) / (softness s2))`: half weight `z`
    /// calibration spreads below the typical forget query.
    Tail {
        /// Spreads below the calibration mean where `w = 1/2`.
        z: f64,
        /// Width of the step, in spreads.
        softness: f64,
    },
}

impl Calibration {
    /// O3's constants.
    pub fn o3() -> Calibration {
        Calibration::O3 {
            sharpness: 10.0,
            offset: 2.0,
        }
    }
}

/// How a query's token states become one feature vector per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the query's tokens (O3's choice on RoBERTa), position 0
    /// excluded when `skip_first_token`.
    Mean,
    /// The last token's state: in a causal decoder the only position that
    /// has read the whole query (it is the state that predicts the answer).
    Last,
}

/// Detector settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// Hidden-state indices to use (0 = embeddings, 1 = first block's
    /// output, ...); default: all of them.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Token pooling.
    pub pooling: Pooling,
    /// Leave position 0 out of the mean pooling.
    #[serde(default = "yes")]
    pub skip_first_token: bool,
    /// Covariance shrinkage `a` in `(0, 1]`.
    pub shrinkage: f64,
    /// Weight `w` of the max-cosine term relative to the Mahalanobis term.
    pub cosine_weight: f64,
    /// Folds of the cross-fitting that gives out-of-fold calibration
    /// scores (>= 2).
    pub folds: usize,
    /// Score-to-weight calibration.
    pub calibration: Calibration,
    /// Queries per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seed of the fit/calibration split.
    #[serde(default)]
    pub seed: u64,
    /// Largest share of *negative* queries (not the request's data: a
    /// sample of what is kept) whose gate may open, when negatives are
    /// given to [`OodDetector::calibrate_negatives`]; in `[0, 1)`.
    #[serde(default = "default_max_false_positive")]
    pub max_false_positive: f64,
}

fn default_max_false_positive() -> f64 {
    0.01
}

fn yes() -> bool {
    true
}

fn default_batch() -> usize {
    32
}

impl DetectorConfig {
    /// Every hidden state, mean pooling, shrinkage 0.1, equal
    /// Mahalanobis/cosine weights, 5 folds, O3's calibration.
    pub fn o3() -> DetectorConfig {
        DetectorConfig {
            layers: None,
            pooling: Pooling::Mean,
            skip_first_token: true,
            shrinkage: 0.1,
            cosine_weight: 1.0,
            folds: 5,
            calibration: Calibration::o3(),
            batch_size: default_batch(),
            seed: 0,
            max_false_positive: default_max_false_positive(),
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        ensure_config(self.shrinkage > 0.0 && self.shrinkage <= 1.0, || {
            format!(
                "detector shrinkage must be in (0, 1], got {}",
                self.shrinkage
            )
        })?;
        ensure_config(
            self.cosine_weight.is_finite() && self.cosine_weight >= 0.0,
            || format!("cosine_weight must be >= 0, got {}", self.cosine_weight),
        )?;
        ensure_config(self.folds >= 2, || {
            format!("detector folds must be >= 2, got {}", self.folds)
        })?;
        ensure_config(self.batch_size > 0, || {
            "detector batch_size must be > 0".into()
        })?;
        ensure_config((0.0..1.0).contains(&self.max_false_positive), || {
            format!(
                "detector max_false_positive must be in [0, 1), got {}",
                self.max_false_positive
            )
        })?;
        if let Some(layers) = &self.layers {
            ensure_config(!layers.is_empty(), || "detector layers are empty".into())?;
        }
        match &self.calibration {
            Calibration::O3 { sharpness, offset } => {
                ensure_config(sharpness.is_finite() && *sharpness > 0.0, || {
                    "O3 calibration sharpness must be > 0".into()
                })?;
                ensure_config(offset.is_finite(), || {
                    "O3 calibration offset must be finite".into()
                })
            }
            Calibration::Tail { z, softness } => {
                ensure_config(z.is_finite(), || "tail calibration z must be finite".into())?;
                ensure_config(softness.is_finite() && *softness > 0.0, || {
                    "tail calibration softness must be > 0".into()
                })
            }
        }
    }
}

/// Statistics of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LayerStats {
    layer: usize,
    mean: Vec<f64>,
    /// Lower-triangular Cholesky factor of the shrunk covariance, row-major.
    chol: Vec<f64>,
    /// L2-normalised features of every forget query, row-major `(n, d)`.
    bank: Vec<f64>,
    maha_mean: f64,
    maha_sd: f64,
    cos_mean: f64,
    cos_sd: f64,
}

/// A fitted detector (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodDetector {
    config: DetectorConfig,
    hidden: usize,
    layers: Vec<LayerStats>,
    fit_mean: f64,
    cal_mean: f64,
    cal_sd: f64,
    n_queries: usize,
    /// Scores at or below it get weight 0 (from negatives; `None`: none
    /// given). Older detector files have none.
    #[serde(default)]
    floor: Option<f64>,
    /// The lowest in-sample score of the request's own queries: a negative
    /// floor stays below it. Older detector files have none (`m2 - 2 s2`
    /// stands in).
    #[serde(default)]
    fit_min: Option<f64>,
}

/// Mean-pooled hidden states: `out[l][q]` is the feature of query `q` at
/// the `l`-th requested layer.
pub(crate) fn pooled_features(
    model: &Decoder,
    queries: &[&[u32]],
    layers: &[usize],
    pooling: Pooling,
    skip_first: bool,
    batch_size: usize,
) -> Result<Vec<Vec<Vec<f64>>>> {
    let n_layers = model.config().num_hidden_layers;
    if let Some(&bad) = layers.iter().find(|&&l| l > n_layers) {
        return Err(Error::InvalidConfig(format!(
            "detector layer {bad} is outside 0..={n_layers}"
        )));
    }
    let was = model.is_base_trainable();
    model.set_base_trainable(false);
    let result = (|| -> Result<Vec<Vec<Vec<f64>>>> {
        let mut out = vec![Vec::with_capacity(queries.len()); layers.len()];
        for chunk in queries.chunks(batch_size.max(1)) {
            let (ids, lengths) = pad_sequences(chunk, model.device())?;
            let (_, hidden) = model.forward_all(&ids, Mode::Eval)?;
            for (li, &layer) in layers.iter().enumerate() {
                let h = hidden[layer].to_dtype(DType::F32)?.to_vec3::<f32>()?;
                for (row, &len) in lengths.iter().enumerate() {
                    let start = match pooling {
                        Pooling::Last => len - 1,
                        Pooling::Mean => usize::from(skip_first && len > 1),
                    };
                    let d = h[row][0].len();
                    let mut f = vec![0f64; d];
                    for pos in &h[row][start..len] {
                        for (a, &v) in f.iter_mut().zip(pos) {
                            *a += f64::from(v);
                        }
                    }
                    let n = (len - start) as f64;
                    f.iter_mut().for_each(|a| *a /= n);
                    out[li].push(f);
                }
            }
        }
        Ok(out)
    })();
    model.set_base_trainable(was);
    result
}

impl OodDetector {
    /// Fits a detector on the queries of one request's forget data
    /// (duplicates are merged; at least 4 distinct queries are needed).
    /// Features are the model's hidden states as it runs now: gate every
    /// unlearning adapter off first (O3 does).
    pub fn fit(
        model: &Decoder,
        queries: &[&[u32]],
        config: &DetectorConfig,
    ) -> Result<OodDetector> {
        config.validate()?;
        let mut distinct: Vec<&[u32]> = Vec::new();
        for q in queries {
            if q.is_empty() {
                return Err(Error::InvalidData("empty detector query".into()));
            }
            if !distinct.contains(q) {
                distinct.push(q);
            }
        }
        let n = distinct.len();
        let needed = (config.folds + 2).max(4);
        if n < needed {
            return Err(Error::InvalidData(format!(
                "an OOD detector with {} folds needs at least {needed} distinct forget queries, got {n}",
                config.folds
            )));
        }
        let layers: Vec<usize> = match &config.layers {
            Some(l) => l.clone(),
            None => (0..=model.config().num_hidden_layers).collect(),
        };
        let feats = pooled_features(
            model,
            &distinct,
            &layers,
            config.pooling,
            config.skip_first_token,
            config.batch_size,
        )?;
        // Out-of-fold raw scores: fold k's queries against statistics of
        // the other folds.
        let mut fold_of = vec![0usize; n];
        for (k, &q) in shuffled(n, config.seed).iter().enumerate() {
            fold_of[q] = k % config.folds;
        }
        let mut held: Vec<Vec<(f64, f64)>> = vec![vec![(0.0, 0.0); n]; layers.len()];
        // n >= folds + 2, so every fold has queries on both sides.
        for fold in 0..config.folds {
            for (li, &layer) in layers.iter().enumerate() {
                let train: Vec<&Vec<f64>> = (0..n)
                    .filter(|&q| fold_of[q] != fold)
                    .map(|q| &feats[li][q])
                    .collect();
                let st = fit_layer(layer, &train, config.shrinkage)?;
                for q in (0..n).filter(|&q| fold_of[q] == fold) {
                    held[li][q] = st.raw(&feats[li][q]);
                }
            }
        }
        // Final statistics on every query, standardised by the out-of-fold
        // raw scores.
        let mut stats = Vec::with_capacity(layers.len());
        for (li, &layer) in layers.iter().enumerate() {
            let all: Vec<&Vec<f64>> = feats[li].iter().collect();
            let mut st = fit_layer(layer, &all, config.shrinkage)?;
            let (mm, ms) = mean_std(&held[li].iter().map(|r| r.0).collect::<Vec<_>>());
            let (cm, cs) = mean_std(&held[li].iter().map(|r| r.1).collect::<Vec<_>>());
            st.maha_mean = mm;
            st.maha_sd = ms.max(1e-6 * mm.abs().max(1.0));
            st.cos_mean = cm;
            st.cos_sd = cs.max(1e-6);
            stats.push(st);
        }
        let hidden = model.config().hidden_size;
        let mut det = OodDetector {
            config: config.clone(),
            hidden,
            layers: stats,
            fit_mean: 0.0,
            cal_mean: 0.0,
            cal_sd: 1.0,
            n_queries: n,
            floor: None,
            fit_min: None,
        };
        let in_sample = det.scores_of_features(&feats);
        let out_of_fold: Vec<f64> = (0..n)
            .map(|q| {
                let per: Vec<(f64, f64)> = (0..det.layers.len()).map(|li| held[li][q]).collect();
                det.combine(&per)
            })
            .collect();
        let (m1, _) = mean_std(&in_sample);
        let (m2, s2) = mean_std(&out_of_fold);
        det.fit_mean = m1;
        det.cal_mean = m2;
        det.cal_sd = s2.max(1e-6);
        det.fit_min = in_sample.iter().copied().min_by(f64::total_cmp);
        tracing::debug!(queries = n, m1, m2, s2, "fitted OOD detector");
        Ok(det)
    }

    /// The configuration it was fitted with.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Hidden-state indices it reads.
    pub fn layers(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.layer).collect()
    }

    /// `(in-sample mean, out-of-fold mean, out-of-fold spread)` of the
    /// score: O3's `m1`, `m2`, `s2`.
    pub fn calibration_stats(&self) -> (f64, f64, f64) {
        (self.fit_mean, self.cal_mean, self.cal_sd)
    }

    /// Calibrates against `negatives`, queries known *not* to be the
    /// request's data (a sample of what is kept) [R, beyond O3, whose
    /// calibration sees only forget data]: scores at or below the floor get
    /// weight 0, the floor being the `1 - max_false_positive` quantile of
    /// the negatives' scores, so at most that share of them can open the
    /// gate. The floor always stays below every score of the request's own
    /// queries, so negatives that look like the forget data can never
    /// close the gate on what the request named. No negatives: no floor.
    /// Returns the floor.
    pub fn calibrate_negatives(
        &mut self,
        model: &Decoder,
        negatives: &[&[u32]],
    ) -> Result<Option<f64>> {
        if negatives.iter().any(|q| q.is_empty()) {
            return Err(Error::InvalidData("empty negative query".into()));
        }
        if negatives.is_empty() {
            self.floor = None;
            return Ok(None);
        }
        let mut scores = self.scores(model, negatives)?;
        scores.sort_by(f64::total_cmp);
        // At most floor(n * max_fp) negatives may lie above the floor.
        let allowed = (scores.len() as f64 * self.config.max_false_positive).floor() as usize;
        let quantile = scores[scores.len() - 1 - allowed.min(scores.len() - 1)];
        let cap = self.floor_cap();
        let floor = quantile.min(cap);
        tracing::debug!(
            negatives = scores.len(),
            quantile,
            cap,
            floor,
            "negative floor"
        );
        self.floor = Some(floor);
        Ok(Some(floor))
    }

    /// The highest a negative floor may go: just below the lowest score of
    /// the request's own queries (`m2 - 2 s2` for detectors saved without
    /// it).
    pub fn floor_cap(&self) -> f64 {
        // A margin for batch-dependent rounding of the same query's score.
        self.fit_min.map_or(self.cal_mean - 2.0 * self.cal_sd, |m| {
            m - 1e-6 * m.abs().max(1.0)
        })
    }

    /// The negative floor, if calibrated (see
    /// [`OodDetector::calibrate_negatives`]).
    pub fn floor(&self) -> Option<f64> {
        self.floor
    }

    /// Scores of `queries` (higher = more like the forget data).
    pub fn scores(&self, model: &Decoder, queries: &[&[u32]]) -> Result<Vec<f64>> {
        if model.config().hidden_size != self.hidden {
            return Err(Error::InvalidData(format!(
                "detector fitted on width {}, model has {}",
                self.hidden,
                model.config().hidden_size
            )));
        }
        let feats = pooled_features(
            model,
            queries,
            &self.layers(),
            self.config.pooling,
            self.config.skip_first_token,
            self.config.batch_size,
        )?;
        Ok(self.scores_of_features(&feats))
    }

    /// Scores from precomputed features (`feats[l][q]`, layers as
    /// [`OodDetector::layers`]).
    pub(crate) fn scores_of_features(&self, feats: &[Vec<Vec<f64>>]) -> Vec<f64> {
        let n = feats.first().map_or(0, Vec::len);
        (0..n)
            .map(|q| {
                let per: Vec<(f64, f64)> = self
                    .layers
                    .iter()
                    .zip(feats)
                    .map(|(st, f)| st.raw(&f[q]))
                    .collect();
                self.combine(&per)
            })
            .collect()
    }

    /// The aggregated score of per-layer raw `(Mahalanobis, max cosine)`.
    fn combine(&self, raw: &[(f64, f64)]) -> f64 {
        let w = self.config.cosine_weight;
        let total: f64 = self
            .layers
            .iter()
            .zip(raw)
            .map(|(st, &(m, c))| {
                let zm = -(m - st.maha_mean) / st.maha_sd;
                let zc = (c - st.cos_mean) / st.cos_sd;
                (zm + w * zc) / (1.0 + w)
            })
            .sum();
        total / self.layers.len() as f64
    }

    /// The calibrated weight in `(0, 1)` of a score; 0 at or below the
    /// negative floor.
    pub fn weight(&self, score: f64) -> f64 {
        if self.floor.is_some_and(|f| score <= f) {
            return 0.0;
        }
        let (m1, m2, s2) = (self.fit_mean, self.cal_mean, self.cal_sd);
        match self.config.calibration {
            Calibration::O3 { sharpness, offset } => {
                let x0 = 0.5 * (m1 + m2);
                let c = if score >= x0 {
                    1.0
                } else {
                    let f =
                        |y: f64| 0.5 * normal_cdf((y - m1) / s2) + 0.5 * normal_cdf((y - m2) / s2);
                    1.0 - (f(score) - f(2.0 * x0 - score)).abs()
                };
                sigmoid(sharpness * c - offset)
            }
            Calibration::Tail { z, softness } => sigmoid((score - (m2 - z * s2)) / (softness * s2)),
        }
    }

    /// SHA-256 of every statistic (for receipts).
    pub fn sha256(&self) -> String {
        let mut bytes = Vec::new();
        let mut put = |v: f64| bytes.extend_from_slice(&v.to_le_bytes());
        put(self.hidden as f64);
        put(self.fit_mean);
        put(self.cal_mean);
        put(self.cal_sd);
        for v in self.floor.iter().chain(&self.fit_min) {
            put(*v);
        }
        for l in &self.layers {
            put(l.layer as f64);
            for v in l.mean.iter().chain(&l.chol).chain(&l.bank) {
                put(*v);
            }
            put(l.maha_mean);
            put(l.maha_sd);
            put(l.cos_mean);
            put(l.cos_sd);
        }
        let cfg = serde_json::to_vec(&self.config).unwrap_or_default();
        bytes.extend_from_slice(&cfg);
        crate::hash::hash_bytes(&bytes)
    }
}

impl LayerStats {
    /// `(Mahalanobis distance squared, max cosine to the bank)`.
    fn raw(&self, h: &[f64]) -> (f64, f64) {
        let d = self.mean.len();
        // Forward substitution: L y = h - mu; distance = |y|^2.
        let mut y = vec![0f64; d];
        for i in 0..d {
            let row = &self.chol[i * d..i * d + i];
            let s = row
                .iter()
                .zip(&y[..i])
                .fold(h[i] - self.mean[i], |s, (l, v)| s - l * v);
            y[i] = s / self.chol[i * d + i];
        }
        let maha = y.iter().map(|v| v * v).sum();
        let norm = h.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        let mut best = f64::NEG_INFINITY;
        for row in self.bank.chunks(d) {
            let c = row.iter().zip(h).map(|(a, b)| a * b).sum::<f64>() / norm;
            best = best.max(c);
        }
        (maha, best)
    }
}

/// Mean, shrunk-covariance Cholesky factor and normalised bank of one
/// layer's features (standardisation is filled in by the caller).
fn fit_layer(layer: usize, fit: &[&Vec<f64>], shrinkage: f64) -> Result<LayerStats> {
    let n = fit.len();
    let d = fit.first().map_or(0, |f| f.len());
    if n == 0 || d == 0 {
        return Err(Error::InvalidData("no detector features to fit".into()));
    }
    let mut mean = vec![0f64; d];
    for f in fit {
        for (m, v) in mean.iter_mut().zip(f.iter()) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![0f64; d * d];
    for f in fit {
        for i in 0..d {
            let di = f[i] - mean[i];
            for j in 0..=i {
                cov[i * d + j] += di * (f[j] - mean[j]) / n as f64;
            }
        }
    }
    let trace: f64 = (0..d).map(|i| cov[i * d + i]).sum();
    let ridge = shrinkage * (trace / d as f64).max(1e-8);
    for i in 0..d {
        for j in 0..=i {
            cov[i * d + j] *= 1.0 - shrinkage;
        }
        cov[i * d + i] += ridge;
    }
    let chol = cholesky(&cov, d).ok_or_else(|| {
        Error::InvalidData(format!(
            "layer {layer}: covariance is not positive definite"
        ))
    })?;
    let mut bank = Vec::with_capacity(n * d);
    for f in fit {
        let norm = f.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        bank.extend(f.iter().map(|v| v / norm));
    }
    Ok(LayerStats {
        layer,
        mean,
        chol,
        bank,
        maha_mean: 0.0,
        maha_sd: 1.0,
        cos_mean: 0.0,
        cos_sd: 1.0,
    })
}

/// Cholesky factor (lower, row-major) of a symmetric positive-definite
/// matrix given by its lower triangle; `None` if not positive definite.
pub(crate) fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}
