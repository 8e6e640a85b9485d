//! Language-model measurements for unlearning: NLL and perplexity, answer
//! exact-match accuracy, refusal rate, per-candidate answer log-
//! probabilities (RESTOR's logit analysis) and TOFU-style truth ratios.
//!
//! Everything runs through the [`Scorer`] trait so the same code measures a
//! plain [`Decoder`] and an O3-gated one ([`crate::o3::GatedDecoder`]),
//! which decides per query how strongly to apply each unlearning adapter.
//! A scorer is told each row's *query* (the prompt) separately from the
//! padded batch: a gate must decide from the question, never from the
//! answer being scored.
//!
//! Accuracy is teacher-forced exact match: an example counts as correct
//! when every answer token is the argmax prediction at its position (for a
//! one-token answer this is greedy decoding).

use candle_core::{DType, Device, Tensor, D};
use lethe_model::decoder::Decoder;
use lethe_model::nn::{self, Mode};
use serde::{Deserialize, Serialize};

use crate::data::{TextBatch, TextExample, TextSet};
use crate::{Error, Result};

/// Something that gives next-token logits for padded batches.
pub trait Scorer {
    /// The device batches must live on.
    fn device(&self) -> &Device;
    /// Logits `(batch, seq, vocab)` for `batch.ids`; `queries[i]` is what
    /// row `i` asks (its prompt), for scorers that gate on it.
    fn logits(&self, batch: &TextBatch, queries: &[&[u32]]) -> Result<Tensor>;
}

impl Scorer for Decoder {
    fn device(&self) -> &Device {
        Decoder::device(self)
    }

    fn logits(&self, batch: &TextBatch, _queries: &[&[u32]]) -> Result<Tensor> {
        let was = self.is_base_trainable();
        self.set_base_trainable(false);
        let out = self.forward(&batch.ids, Mode::Eval);
        self.set_base_trainable(was);
        Ok(out?)
    }
}

/// Runs `f` over the set in batches of `batch_size` (in order).
fn for_batches(
    scorer: &dyn Scorer,
    set: &TextSet,
    batch_size: usize,
    mut f: impl FnMut(&[usize], &TextBatch, &Tensor) -> Result<()>,
) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::InvalidConfig("eval batch size must be > 0".into()));
    }
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(batch_size) {
        let batch = set.batch(chunk, scorer.device())?;
        let queries: Vec<&[u32]> = chunk.iter().map(|&i| set.examples()[i].query()).collect();
        let logits = scorer.logits(&batch, &queries)?;
        f(chunk, &batch, &logits)?;
    }
    Ok(())
}

/// Per-example (sum of answer-token log-probs, number of answer tokens).
pub fn answer_log_likelihoods(
    scorer: &dyn Scorer,
    set: &TextSet,
    batch_size: usize,
) -> Result<Vec<(f64, usize)>> {
    let mut out = Vec::with_capacity(set.len());
    for_batches(scorer, set, batch_size, |_, batch, logits| {
        let lp = nn::sequence_log_probs(logits, &batch.ids, Some(&batch.loss_mask))?;
        let (_, t) = batch.ids.dims2()?;
        let counts = batch
            .loss_mask
            .narrow(1, 1, t - 1)?
            .sum(1)?
            .to_vec1::<f32>()?;
        for (l, c) in lp.to_vec1::<f32>()?.into_iter().zip(counts) {
            out.push((f64::from(l), c as usize));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Token-weighted mean NLL of the answer tokens (nats). Errors on an empty
/// set.
pub fn mean_nll(scorer: &dyn Scorer, set: &TextSet, batch_size: usize) -> Result<f64> {
    if set.is_empty() {
        return Err(Error::InvalidData("NLL of an empty set".into()));
    }
    let ll = answer_log_likelihoods(scorer, set, batch_size)?;
    let tokens: usize = ll.iter().map(|(_, c)| c).sum();
    let total: f64 = ll.iter().map(|(l, _)| l).sum();
    Ok(-total / tokens.max(1) as f64)
}

/// `exp(mean NLL)`.
pub fn perplexity(scorer: &dyn Scorer, set: &TextSet, batch_size: usize) -> Result<f64> {
    Ok(mean_nll(scorer, set, batch_size)?.exp())
}

/// Whether each example's answer is reproduced exactly (teacher-forced
/// argmax at every answer position).
pub fn exact_match(scorer: &dyn Scorer, set: &TextSet, batch_size: usize) -> Result<Vec<bool>> {
    let mut out = Vec::with_capacity(set.len());
    for_batches(scorer, set, batch_size, |chunk, batch, logits| {
        let pred = logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?;
        for (row, &i) in chunk.iter().enumerate() {
            let e = &set.examples()[i];
            let first = e.prompt_len().max(1);
            let ok = (first..batch.lengths[row]).all(|p| pred[row][p - 1] == e.ids()[p]);
            out.push(ok);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Fraction of examples answered exactly (0..1).
pub fn answer_accuracy(scorer: &dyn Scorer, set: &TextSet, batch_size: usize) -> Result<f64> {
    if set.is_empty() {
        return Err(Error::InvalidData("accuracy of an empty set".into()));
    }
    let hits = exact_match(scorer, set, batch_size)?;
    Ok(hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64)
}

/// Fraction of examples whose prompt is answered with exactly `refusal`
/// (0..1). Every example needs a prompt.
pub fn refusal_rate(
    scorer: &dyn Scorer,
    set: &TextSet,
    refusal: &[u32],
    batch_size: usize,
) -> Result<f64> {
    if set.is_empty() {
        return Err(Error::InvalidData("refusal rate of an empty set".into()));
    }
    let relabelled: Vec<TextExample> = set
        .examples()
        .iter()
        .map(|e| e.with_answer(refusal))
        .collect::<Result<_>>()?;
    answer_accuracy(scorer, &TextSet::new(relabelled), batch_size)
}

/// Accuracy and refusal rate of a prompt/answer set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnswerStats {
    /// Fraction answered exactly.
    pub accuracy: f64,
    /// Fraction answered with the refusal.
    pub refusal_rate: f64,
    /// Number of examples.
    pub examples: usize,
}

/// [`answer_accuracy`] and [`refusal_rate`] together.
pub fn answer_stats(
    scorer: &dyn Scorer,
    set: &TextSet,
    refusal: &[u32],
    batch_size: usize,
) -> Result<AnswerStats> {
    Ok(AnswerStats {
        accuracy: answer_accuracy(scorer, set, batch_size)?,
        refusal_rate: refusal_rate(scorer, set, refusal, batch_size)?,
        examples: set.len(),
    })
}

/// Mean per-token log-probability of each candidate answer after `prompt`
/// (RESTOR's logit analysis: gold vs corrupted vs random answers).
pub fn candidate_log_probs(
    scorer: &dyn Scorer,
    prompt: &[u32],
    candidates: &[Vec<u32>],
) -> Result<Vec<f64>> {
    if prompt.is_empty() {
        return Err(Error::InvalidData(
            "candidate scoring needs a prompt".into(),
        ));
    }
    let set = TextSet::new(
        candidates
            .iter()
            .map(|c| {
                let mut ids = prompt.to_vec();
                ids.extend_from_slice(c);
                TextExample::new(ids, prompt.len())
            })
            .collect::<Result<_>>()?,
    );
    if set.is_empty() {
        return Ok(Vec::new());
    }
    Ok(answer_log_likelihoods(scorer, &set, candidates.len())?
        .into_iter()
        .map(|(l, c)| l / c.max(1) as f64)
        .collect())
}

/// TOFU-style truth ratio of one prompt/answer example:
/// `R = mean_j P(wrong_j) / P(gold)` with `P = exp(mean token log-prob)`.
/// `R << 1`: the model knows the gold answer; `R ~ 1`: it cannot tell.
pub fn truth_ratio(scorer: &dyn Scorer, example: &TextExample, wrong: &[Vec<u32>]) -> Result<f64> {
    if wrong.is_empty() {
        return Err(Error::InvalidData(
            "a truth ratio needs wrong answers".into(),
        ));
    }
    let mut candidates = vec![example.answer().to_vec()];
    candidates.extend(wrong.iter().cloned());
    let lp = candidate_log_probs(scorer, example.prompt(), &candidates)?;
    let gold = lp[0];
    let ratio = lp[1..].iter().map(|w| (w - gold).exp()).sum::<f64>() / wrong.len() as f64;
    Ok(ratio)
}

#[cfg(test)]
mod tests;
