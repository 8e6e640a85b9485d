//! Measuring one model on the world: greedy answers to the evaluation
//! questions classified as gold / corrupted / other, the logit analysis
//! (gold vs corrupted vs random same-type answers), accuracy on the
//! targets' untouched facts and on other entities' facts, and held-out
//! perplexity.
//!
//! Models are reached through [`lethe_unlearn::lm_eval::Scorer`], so a
//! plain decoder and an O3-gated one (which decides per question whether
//! to apply its adapter) are measured by the same code. Each row's *query*
//! is its question prompt, fixed while the answer is generated: a gate
//! decides from the question, never from the answer.

use std::collections::BTreeMap;

use candle_core::{DType, D};
use lethe_unlearn::data::{TextExample, TextSet};
use lethe_unlearn::lm_eval::{self, Scorer};
use serde::{Deserialize, Serialize};

use crate::world::{Question, World};
use crate::Result;

/// What a greedy answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// One of the accepted answers.
    Gold,
    /// The value the corruption documents assert.
    Corrupted,
    /// Anything else (another value, a fragment, nothing).
    Other,
}

/// Classifies an answer (tokens before the closing period).
pub fn classify(answer: &[u32], golds: &[Vec<u32>], corrupted: Option<&[u32]>) -> Outcome {
    if golds.iter().any(|g| g.as_slice() == answer) {
        Outcome::Gold
    } else if corrupted == Some(answer) {
        Outcome::Corrupted
    } else {
        Outcome::Other
    }
}

/// One target question's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetOutcome {
    /// Fact index.
    pub fact: usize,
    /// The greedy answer's class.
    pub outcome: Outcome,
    /// Best mean per-token log-probability over the gold answers.
    pub lp_gold: f64,
    /// Mean per-token log-probability of the corrupted answer.
    pub lp_corrupted: f64,
    /// Mean over the random same-type answers of their mean per-token
    /// log-probability.
    pub lp_random: f64,
    /// Whether the best gold answer outscores the corrupted one and every
    /// random one.
    pub gold_top: bool,
}

/// Everything measured on one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEval {
    /// One entry per corrupted fact, in fact order.
    pub targets: Vec<TargetOutcome>,
    /// Correct answers on the targets' untouched facts.
    pub locality_correct: usize,
    /// Number of those facts.
    pub locality_total: usize,
    /// Correctness of every other evaluated fact (non-target sample and
    /// the facts mixed into the corruption documents), by fact index.
    pub other_correct: BTreeMap<usize, bool>,
    /// Perplexity on the held-out clean paragraphs.
    pub heldout_perplexity: f64,
}

/// Greedy continuations of `prompts`: up to `max_new` tokens, stopping at
/// `stop` (not included in the answer), in prompt order.
pub fn greedy_answers(
    scorer: &dyn Scorer,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: u32,
    batch_size: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let idx: Vec<usize> = (0..prompts.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let mut active: Vec<usize> = chunk.to_vec();
        for _ in 0..max_new {
            if active.is_empty() {
                break;
            }
            let examples: Vec<TextExample> = active
                .iter()
                .map(|&i| {
                    let mut ids = prompts[i].clone();
                    ids.extend_from_slice(&out[i]);
                    let n = ids.len();
                    TextExample::new(ids, n.saturating_sub(1))
                })
                .collect::<std::result::Result<_, _>>()?;
            let set = TextSet::new(examples);
            let rows: Vec<usize> = (0..set.len()).collect();
            let batch = set.batch(&rows, scorer.device())?;
            let queries: Vec<&[u32]> = active.iter().map(|&i| prompts[i].as_slice()).collect();
            let logits = scorer.logits(&batch, &queries)?;
            let pred = logits
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_vec2::<u32>()?;
            let mut still = Vec::with_capacity(active.len());
            for (row, &i) in active.iter().enumerate() {
                let next = pred[row][batch.lengths[row] - 1];
                if next == stop {
                    continue;
                }
                out[i].push(next);
                still.push(i);
            }
            active = still;
        }
    }
    Ok(out)
}

/// Mean per-token log-probabilities of `candidates[q]` after
/// `questions[q].prompt`, batched over all questions.
fn candidate_scores(
    scorer: &dyn Scorer,
    questions: &[Question],
    candidates: &[Vec<Vec<u32>>],
    batch_size: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut examples = Vec::new();
    for (q, cands) in questions.iter().zip(candidates) {
        for c in cands {
            let mut ids = q.prompt.clone();
            ids.extend_from_slice(c);
            examples.push(TextExample::new(ids, q.prompt.len())?);
        }
    }
    let set = TextSet::new(examples);
    let ll = if set.is_empty() {
        Vec::new()
    } else {
        lm_eval::answer_log_likelihoods(scorer, &set, batch_size)?
    };
    let mut it = ll.into_iter();
    let mut out = Vec::with_capacity(questions.len());
    for cands in candidates {
        let mut row = Vec::with_capacity(cands.len());
        for _ in cands {
            let (l, c) = it.next().unwrap_or((f64::NEG_INFINITY, 1));
            row.push(l / c.max(1) as f64);
        }
        out.push(row);
    }
    Ok(out)
}

/// Correctness of greedy answers to the questions of `facts`.
fn answer_correctness(
    scorer: &dyn Scorer,
    world: &World,
    facts: &[usize],
    batch_size: usize,
) -> Result<Vec<(usize, Outcome)>> {
    let questions: Vec<Question> = facts
        .iter()
        .map(|&f| world.question(f))
        .collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| q.prompt.clone()).collect();
    let answers = greedy_answers(
        scorer,
        &prompts,
        world.max_answer_len() + 1,
        world.period(),
        batch_size,
    )?;
    Ok(questions
        .iter()
        .zip(&answers)
        .map(|(q, a)| (q.fact, classify(a, &q.golds, q.corrupted.as_deref())))
        .collect())
}

/// Greedy exact-match accuracy on the target (corrupted) facts alone: the
/// quantity of the corruption gate, cheap enough to check during training.
pub fn target_accuracy(scorer: &dyn Scorer, world: &World, batch_size: usize) -> Result<f64> {
    let outcomes = answer_correctness(scorer, world, &world.target_facts(), batch_size)?;
    if outcomes.is_empty() {
        return Ok(0.0);
    }
    let gold = outcomes.iter().filter(|(_, o)| *o == Outcome::Gold).count();
    Ok(gold as f64 / outcomes.len() as f64)
}

/// Measures `scorer` on `world`: the target questions with the logit
/// analysis, locality, the given `other_facts` (non-target sample plus
/// mixed-in facts) and held-out perplexity.
pub fn evaluate(
    scorer: &dyn Scorer,
    world: &World,
    other_facts: &[usize],
    batch_size: usize,
) -> Result<ModelEval> {
    let target_facts = world.target_facts();
    let questions: Vec<Question> = target_facts
        .iter()
        .map(|&f| world.question(f))
        .collect::<Result<_>>()?;
    let outcomes = answer_correctness(scorer, world, &target_facts, batch_size)?;
    let candidates: Vec<Vec<Vec<u32>>> = questions
        .iter()
        .map(|q| {
            let mut c = q.golds.clone();
            c.extend(q.corrupted.iter().cloned());
            c.extend(q.random.iter().cloned());
            c
        })
        .collect();
    let scores = candidate_scores(scorer, &questions, &candidates, batch_size)?;
    let mut targets = Vec::with_capacity(questions.len());
    for ((q, (_, outcome)), s) in questions.iter().zip(&outcomes).zip(&scores) {
        let g = q.golds.len();
        let lp_gold = s[..g].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lp_corrupted, rest) = if q.corrupted.is_some() {
            (s[g], &s[g + 1..])
        } else {
            (f64::NEG_INFINITY, &s[g..])
        };
        let lp_random = if rest.is_empty() {
            f64::NEG_INFINITY
        } else {
            rest.iter().sum::<f64>() / rest.len() as f64
        };
        let gold_top = lp_gold > lp_corrupted && rest.iter().all(|&r| lp_gold > r);
        targets.push(TargetOutcome {
            fact: q.fact,
            outcome: *outcome,
            lp_gold,
            lp_corrupted,
            lp_random,
            gold_top,
        });
    }
    let locality = answer_correctness(scorer, world, &world.locality_facts(), batch_size)?;
    let other = answer_correctness(scorer, world, other_facts, batch_size)?;
    let heldout = TextSet::documents(world.heldout_docs())?;
    Ok(ModelEval {
        targets,
        locality_correct: locality.iter().filter(|(_, o)| *o == Outcome::Gold).count(),
        locality_total: locality.len(),
        other_correct: other
            .into_iter()
            .map(|(f, o)| (f, o == Outcome::Gold))
            .collect(),
        heldout_perplexity: lm_eval::perplexity(scorer, &heldout, batch_size)?,
    })
}

#[cfg(test)]
mod tests;
