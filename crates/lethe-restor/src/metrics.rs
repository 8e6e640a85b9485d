//! RESTOR's numbers from per-question measurements: rates, the forgetting
//! and recovery ratios, summary statistics over seeds and the split by
//! clean-model confidence. Pure functions on plain data, checked in the
//! tests on hand-made cases.
//!
//! * **Forgetting** `= (Corr_corr - Corr_unl) / Corr_corr`: the fraction of
//!   the corrupted model's corrupted answers the method removed.
//! * **Recovery** `= (Acc_unl - Acc_corr) / (Acc_clean - Acc_corr)`: 1 when
//!   the unlearned model answers the target questions as well as the clean
//!   model, 0 when no better than the corrupted one, negative when worse.
//!   Undefined (None) when the corruption did not lower accuracy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::eval::{ModelEval, Outcome};

/// The per-model numbers of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Gold answers on the corrupted facts.
    pub target_accuracy: f64,
    /// Corrupted answers on the corrupted facts.
    pub corrupted_rate: f64,
    /// Neither gold nor corrupted.
    pub other_rate: f64,
    /// Accuracy on the targets' untouched facts.
    pub locality: f64,
    /// Accuracy on the non-target sample (collateral).
    pub nontarget_accuracy: f64,
    /// Accuracy on the facts mixed into this k variant's documents (None
    /// for k = 0 or models without a k).
    pub mixed_accuracy: Option<f64>,
    /// Held-out perplexity.
    pub heldout_perplexity: f64,
    /// Mean best-gold log-probability per token.
    pub lp_gold: f64,
    /// Mean corrupted-answer log-probability per token.
    pub lp_corrupted: f64,
    /// Mean random-answer log-probability per token.
    pub lp_random: f64,
    /// Fraction of questions where the gold answer scores highest.
    pub gold_top_rate: f64,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Accuracy over `facts` from `eval.other_correct` (facts not evaluated
/// are skipped; None when none was).
pub fn accuracy_on(eval: &ModelEval, facts: &[usize]) -> Option<f64> {
    let hits: Vec<bool> = facts
        .iter()
        .filter_map(|f| eval.other_correct.get(f).copied())
        .collect();
    if hits.is_empty() {
        None
    } else {
        Some(hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64)
    }
}

/// Rates of a subset of target facts (all when `only` is None):
/// `(accuracy, corrupted rate, other rate, n)`.
pub fn rates(eval: &ModelEval, only: Option<&[usize]>) -> (f64, f64, f64, usize) {
    let rows: Vec<Outcome> = eval
        .targets
        .iter()
        .filter(|t| only.is_none_or(|o| o.contains(&t.fact)))
        .map(|t| t.outcome)
        .collect();
    let n = rows.len();
    if n == 0 {
        return (0.0, 0.0, 0.0, 0);
    }
    let frac = |o: Outcome| rows.iter().filter(|&&r| r == o).count() as f64 / n as f64;
    (
        frac(Outcome::Gold),
        frac(Outcome::Corrupted),
        frac(Outcome::Other),
        n,
    )
}

/// The [`Summary`] of one model; `nontarget` is the collateral sample,
/// `mixed` the facts mixed into the model's k variant (empty for k = 0).
pub fn summarize(eval: &ModelEval, nontarget: &[usize], mixed: &[usize]) -> Summary {
    let (acc, corr, other, _) = rates(eval, None);
    let finite = |v: f64| if v.is_finite() { Some(v) } else { None };
    Summary {
        target_accuracy: acc,
        corrupted_rate: corr,
        other_rate: other,
        locality: if eval.locality_total == 0 {
            0.0
        } else {
            eval.locality_correct as f64 / eval.locality_total as f64
        },
        nontarget_accuracy: accuracy_on(eval, nontarget).unwrap_or(0.0),
        mixed_accuracy: if mixed.is_empty() {
            None
        } else {
            accuracy_on(eval, mixed)
        },
        heldout_perplexity: eval.heldout_perplexity,
        lp_gold: mean(eval.targets.iter().filter_map(|t| finite(t.lp_gold))),
        lp_corrupted: mean(eval.targets.iter().filter_map(|t| finite(t.lp_corrupted))),
        lp_random: mean(eval.targets.iter().filter_map(|t| finite(t.lp_random))),
        gold_top_rate: mean(eval.targets.iter().map(|t| f64::from(u8::from(t.gold_top)))),
    }
}

/// Smallest corruption effect for which a ratio is defined.
const EPS: f64 = 1e-9;

/// `(Corr_corr - Corr_unl) / Corr_corr`; None when the corrupted model
/// gave no corrupted answer.
pub fn forgetting(corr_corrupted: f64, corr_unlearned: f64) -> Option<f64> {
    if corr_corrupted <= EPS {
        None
    } else {
        Some((corr_corrupted - corr_unlearned) / corr_corrupted)
    }
}

/// `(Acc_unl - Acc_corr) / (Acc_clean - Acc_corr)`; None when the
/// corruption did not lower accuracy.
pub fn recovery(acc_clean: f64, acc_corrupted: f64, acc_unlearned: f64) -> Option<f64> {
    let gap = acc_clean - acc_corrupted;
    if gap <= EPS {
        None
    } else {
        Some((acc_unlearned - acc_corrupted) / gap)
    }
}

/// Mean, sample standard deviation and count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one value).
    pub std: f64,
    /// Number of values.
    pub n: usize,
}

impl Stat {
    /// The statistics of `values` (None when empty).
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let m = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Stat {
            mean: m,
            std: var.sqrt(),
            n,
        })
    }
}

/// Index of the bucket of `p` given increasing inner `edges`
/// (`edges = [0.5, 0.9]` gives buckets `< 0.5`, `0.5..0.9`, `>= 0.9`).
pub fn bucket(p: f64, edges: &[f64]) -> usize {
    edges.iter().take_while(|&&e| p >= e).count()
}

/// The clean model's confidence of each target fact: the probability of
/// its best gold answer, `exp(mean per-token log-prob)`.
pub fn confidences(clean: &ModelEval) -> BTreeMap<usize, f64> {
    clean
        .targets
        .iter()
        .map(|t| (t.fact, t.lp_gold.exp()))
        .collect()
}

/// Bucket labels for `edges` (`< 0.5`, `0.5-0.9`, `>= 0.9`).
pub fn bucket_labels(edges: &[f64]) -> Vec<String> {
    let mut out = Vec::with_capacity(edges.len() + 1);
    for i in 0..=edges.len() {
        out.push(match (i.checked_sub(1).map(|j| edges[j]), edges.get(i)) {
            (None, Some(hi)) => format!("< {hi}"),
            (Some(lo), Some(hi)) => format!("{lo}-{hi}"),
            (Some(lo), None) => format!(">= {lo}"),
            (None, None) => "all".to_string(),
        });
    }
    out
}

#[cfg(test)]
mod tests;
