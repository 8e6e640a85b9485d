//! Decoding with the kNN-LM mixture, teacher-forced utility, perplexity,
//! and the labelled answer.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use lethe_label::{Label, Violation};
use lethe_model::chat::Message;
use lethe_model::generate::Llm;

use crate::datastore::{Datastore, Neighbour};
use crate::{Error, Result};

/// kNN-LM settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnConfig {
    /// Neighbours per step.
    pub k: usize,
    /// Interpolation weight of the kNN distribution.
    pub lambda: f32,
    /// Softmax temperature over cosine similarities.
    pub temperature: f32,
    /// A label "carried" an emitted token when its neighbours gave it at
    /// least this share of the token's probability.
    pub carry_epsilon: f32,
    /// λ-similarity tolerance of the permissive label (as in `lethe-rag`).
    pub similarity: f32,
    /// Most tokens generated.
    pub max_tokens: usize,
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig {
            k: 16,
            lambda: 0.25,
            temperature: 0.01,
            carry_epsilon: 0.05,
            similarity: 0.5,
            max_tokens: 48,
        }
    }
}

/// A generation with what the datastore contributed.
#[derive(Debug, Clone)]
pub struct KnnGeneration {
    /// The text.
    pub text: String,
    /// The tokens (end of turn excluded).
    pub tokens: Vec<u32>,
    /// Per emitted token: the probability mass each label's neighbours gave
    /// it, and the token's total probability.
    pub carried: Vec<(BTreeMap<u32, f32>, f32)>,
    /// Every label id among the neighbours retrieved at any step.
    pub retrieved_labels: BTreeSet<u32>,
    /// Every document among the neighbours retrieved at any step, with its
    /// label id.
    pub retrieved_docs: BTreeMap<Arc<str>, u32>,
    /// Whether generation stopped at `max_tokens` (else at the end of turn
    /// or the context window).
    pub hit_max_tokens: bool,
    /// Datastore searches made.
    pub searches: usize,
}

/// The next-token choice at one step.
struct Step {
    token: u32,
    prob: f32,
    carried: BTreeMap<u32, f32>,
}

/// Mixes the LM distribution with the neighbours' and returns the
/// probability of `token` (or, when `token` is `None`, the argmax).
fn mix(
    lm_log_probs: &[f32],
    neighbours: &[Neighbour],
    config: &KnnConfig,
    token: Option<u32>,
) -> Step {
    let lambda = if neighbours.is_empty() {
        0.0
    } else {
        config.lambda.clamp(0.0, 1.0)
    };
    // softmax(similarity / T) over the neighbours.
    let t = config.temperature.max(1e-4);
    let max = neighbours
        .iter()
        .map(|n| n.score)
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = neighbours
        .iter()
        .map(|n| ((n.score - max) / t).exp())
        .collect();
    let z: f32 = weights.iter().sum::<f32>().max(f32::MIN_POSITIVE);
    let mut knn: BTreeMap<u32, f32> = BTreeMap::new();
    for (n, w) in neighbours.iter().zip(&weights) {
        *knn.entry(n.entry.token).or_default() += w / z;
    }
    let p = |tok: u32| -> f32 {
        let lm = lm_log_probs.get(tok as usize).map_or(0.0, |l| l.exp());
        lambda * knn.get(&tok).copied().unwrap_or(0.0) + (1.0 - lambda) * lm
    };
    let chosen = match token {
        Some(t) => t,
        None => {
            let lm_best = lm_log_probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map_or(0, |(i, _)| i as u32);
            std::iter::once(lm_best)
                .chain(knn.keys().copied())
                .max_by(|a, b| p(*a).total_cmp(&p(*b)).then(b.cmp(a)))
                .unwrap_or(lm_best)
        }
    };
    let mut carried = BTreeMap::new();
    for (n, w) in neighbours.iter().zip(&weights) {
        if n.entry.token == chosen {
            *carried.entry(n.entry.label).or_default() += lambda * w / z;
        }
    }
    Step {
        token: chosen,
        prob: p(chosen),
        carried,
    }
}

fn prompt(llm: &Llm, question: &str) -> Result<Vec<u32>> {
    let messages = vec![
        Message::system("You are a helpful assistant. Answer the question in one sentence."),
        Message::user(question.trim()),
    ];
    Ok(llm.chat.encode(&llm.tokenizer, &messages)?)
}

/// Generates greedily with the kNN-LM mixture, neighbours restricted to
/// the `allowed` label ids. `on_text` receives the text as it grows.
pub fn generate(
    llm: &Llm,
    ds: &Datastore,
    question: &str,
    allowed: &[u32],
    config: &KnnConfig,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<KnnGeneration> {
    if question.trim().is_empty() {
        return Err(Error::InvalidInput("the question is empty".into()));
    }
    let prompt = prompt(llm, question)?;
    let end = llm.chat.end_of_turn();
    let mut cache = llm.model.new_cache();
    let mut hidden = llm.model.forward_hidden(&prompt, &mut cache)?;
    let mut tokens = Vec::new();
    let mut carried = Vec::new();
    let mut retrieved = BTreeSet::new();
    let mut docs = BTreeMap::new();
    let mut hit_max_tokens = true;
    let mut searches = 0;
    let mut shown = String::new();
    for _ in 0..config.max_tokens {
        let h = hidden
            .pop()
            .ok_or_else(|| Error::InvalidInput("the model returned no hidden state".into()))?;
        let lp = llm.model.log_probs_from_hidden(&h)?;
        let neighbours = ds.neighbours(&h, config.k, allowed)?;
        searches += 1;
        retrieved.extend(neighbours.iter().map(|n| n.entry.label));
        docs.extend(
            neighbours
                .iter()
                .map(|n| (n.entry.doc.clone(), n.entry.label)),
        );
        let step = mix(&lp, &neighbours, config, None);
        if step.token == end || llm.tokenizer.is_special(step.token) {
            hit_max_tokens = false;
            break;
        }
        tokens.push(step.token);
        carried.push((step.carried, step.prob));
        let text = llm.tokenizer.decode(&tokens, true)?;
        if !text.ends_with('\u{FFFD}') && text.starts_with(&shown) && text.len() > shown.len() {
            let piece = text[shown.len()..].to_string();
            shown = text;
            if on_text(&piece).is_break() {
                hit_max_tokens = false;
                break;
            }
        }
        if cache.len() + 1 > cache.max_len() {
            hit_max_tokens = false;
            break;
        }
        hidden = llm.model.forward_hidden(&[step.token], &mut cache)?;
    }
    Ok(KnnGeneration {
        text: llm.tokenizer.decode(&tokens, true)?,
        tokens,
        carried,
        retrieved_labels: retrieved,
        retrieved_docs: docs,
        hit_max_tokens,
        searches,
    })
}

/// Mean log-probability of `answer` (teacher-forced) after the question's
/// prompt, under the mixture restricted to `allowed`.
pub fn utility(
    llm: &Llm,
    ds: &Datastore,
    question: &str,
    answer: &[u32],
    allowed: &[u32],
    config: &KnnConfig,
) -> Result<f32> {
    if answer.is_empty() {
        return Ok(0.0);
    }
    let mut seq = prompt(llm, question)?;
    let start = seq.len();
    seq.extend_from_slice(&answer[..answer.len() - 1]);
    let rows = llm
        .model
        .final_hidden_batch(&[seq.as_slice()])?
        .pop()
        .ok_or_else(|| Error::InvalidInput("no hidden states".into()))?;
    let mut total = 0.0;
    for (i, tok) in answer.iter().enumerate() {
        let h = &rows[start - 1 + i];
        let lp = llm.model.log_probs_from_hidden(h)?;
        let nb = ds.neighbours(h, config.k, allowed)?;
        total += mix(&lp, &nb, config, Some(*tok)).prob.max(1e-30).ln();
    }
    Ok(total / answer.len() as f32)
}

/// Perplexities of a text with and without the datastore.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// With the kNN mixture.
    pub knn: f64,
    /// The language model alone.
    pub lm: f64,
    /// Tokens scored.
    pub tokens: usize,
}

/// Perplexity of plain text (every token after the second) with the
/// neighbours restricted to `allowed`, beside the LM alone.
pub fn perplexity(
    llm: &Llm,
    ds: &Datastore,
    text: &str,
    allowed: &[u32],
    config: &KnnConfig,
) -> Result<Perplexity> {
    let tokens = llm.tokenizer.encode_plain(text)?;
    if tokens.len() < 3 {
        return Err(Error::InvalidInput("text too short to score".into()));
    }
    let rows = llm
        .model
        .final_hidden_batch(&[&tokens[..tokens.len() - 1]])?
        .pop()
        .ok_or_else(|| Error::InvalidInput("no hidden states".into()))?;
    let (mut nll_knn, mut nll_lm, mut n) = (0.0f64, 0.0f64, 0usize);
    for t in 1..tokens.len() - 1 {
        let lp = llm.model.log_probs_from_hidden(&rows[t])?;
        let nb = ds.neighbours(&rows[t], config.k, allowed)?;
        let next = tokens[t + 1];
        nll_knn -= f64::from(mix(&lp, &nb, config, Some(next)).prob.max(1e-30).ln());
        nll_lm -= f64::from(lp.get(next as usize).copied().unwrap_or(-69.0));
        n += 1;
    }
    Ok(Perplexity {
        knn: (nll_knn / n as f64).exp(),
        lm: (nll_lm / n as f64).exp(),
        tokens: n,
    })
}

/// A kNN-LM answer with its label.
#[derive(Debug, Clone)]
pub struct KnnAnswer {
    /// The released text; `None` when refused.
    pub text: Option<String>,
    /// The answer's label.
    pub label: Label,
    /// Violations against the sink (empty when released).
    pub violations: Vec<Violation>,
    /// How the label was found: `carried` (the carrying labels were
    /// λ-similar), `sink-directed`, or `retrieved` (fallback: every label
    /// retrieved while generating the full answer).
    pub route: &'static str,
    /// Label ids the released generation was restricted to.
    pub allowed: Vec<u32>,
    /// The unrestricted answer, when it differs from the released one.
    pub full_answer: String,
    /// Generations, utility passes and datastore searches.
    pub generations: usize,
    /// Teacher-forced utility passes.
    pub utility_passes: usize,
    /// Datastore searches over all passes.
    pub searches: usize,
    /// The documents whose entries the released generation retrieved,
    /// with their label ids (the label is their join with the model's).
    pub sources: Vec<(Arc<str>, u32)>,
    /// Tokens of the released generation.
    pub completion_tokens: usize,
    /// Whether the released generation stopped at `max_tokens`.
    pub hit_max_tokens: bool,
}

/// What [`answer`] needs besides the model and the datastore.
#[derive(Clone, Copy)]
pub struct KnnRequest<'a> {
    /// The question.
    pub question: &'a str,
    /// Label ids the caller may read.
    pub caller_allowed: &'a [u32],
    /// The model's own label (joined into every answer's label).
    pub model_label: &'a Label,
    /// The sink's check: the violations a label would cause (empty: flows).
    pub flow_check: &'a dyn Fn(&Label) -> Vec<Violation>,
    /// Decoding settings.
    pub config: &'a KnnConfig,
    /// Search for a lower label (permissive); `false` labels the answer
    /// with every label its neighbours had (conservative).
    pub permissive: bool,
}

impl std::fmt::Debug for KnnRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnnRequest")
            .field("question", &self.question)
            .field("caller_allowed", &self.caller_allowed)
            .field("config", self.config)
            .finish_non_exhaustive()
    }
}

/// Answers with the kNN-LM and labels the answer permissively:
///
/// 1. generate with every entry the caller may read;
/// 2. the labels whose neighbours carried at least `carry_epsilon` of an
///    emitted token's probability form the candidate label `L0`;
/// 3. if the answer is λ-similar under the datastore restricted to
///    entries at or below `L0` (and, when `L0` cannot reach the sink, to
///    entries that can), use that restriction; otherwise keep the caller's;
/// 4. regenerate under the chosen restriction; the label is the model's
///    joined with every label retrieved while regenerating.
pub fn answer(
    llm: &Llm,
    ds: &Datastore,
    request: &KnnRequest<'_>,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<KnnAnswer> {
    let KnnRequest {
        question,
        caller_allowed,
        model_label,
        flow_check,
        config,
        permissive,
    } = *request;
    let labels = ds.labels();
    let join_ids = |ids: &mut dyn Iterator<Item = u32>| {
        ids.fold(model_label.clone(), |acc, i| acc.join(&labels[i as usize]))
    };
    // Label-closed restriction: every allowed id at or below `l`.
    let below = |l: &Label| -> Vec<u32> {
        caller_allowed
            .iter()
            .copied()
            .filter(|&i| labels[i as usize].flows_to(l))
            .collect()
    };
    let full = generate(llm, ds, question, caller_allowed, config, |_| {
        ControlFlow::Continue(())
    })?;
    let mut searches = full.searches;
    let mut carriers = BTreeSet::new();
    for (mass, p) in &full.carried {
        for (label, m) in mass {
            if *m >= config.carry_epsilon * p {
                carriers.insert(*label);
            }
        }
    }
    let l0 = join_ids(&mut carriers.iter().copied());
    let mut candidates: Vec<(Vec<u32>, &'static str)> = Vec::new();
    if permissive {
        candidates.push((below(&l0), "carried"));
    }
    if permissive && !flow_check(&l0).is_empty() {
        let sink_ok: Vec<u32> = caller_allowed
            .iter()
            .copied()
            .filter(|&i| flow_check(&model_label.join(&labels[i as usize])).is_empty())
            .collect();
        candidates.push((sink_ok, "sink-directed"));
    }
    // A candidate that keeps every entry would change nothing.
    candidates.retain(|(allowed, _)| allowed.len() < caller_allowed.len());
    candidates.dedup_by(|a, b| a.0 == b.0);
    let mut utility_passes = 0;
    let threshold = if candidates.is_empty() || full.tokens.is_empty() {
        f32::INFINITY
    } else {
        utility_passes += 1;
        searches += full.tokens.len();
        utility(llm, ds, question, &full.tokens, caller_allowed, config)?
            + config.similarity.clamp(1e-6, 1.0).ln()
    };
    let mut chosen: (Vec<u32>, &'static str) = (caller_allowed.to_vec(), "retrieved");
    for (allowed, route) in candidates {
        if threshold.is_infinite() {
            break;
        }
        let u = utility(llm, ds, question, &full.tokens, &allowed, config)?;
        utility_passes += 1;
        searches += full.tokens.len();
        if u >= threshold {
            chosen = (allowed, route);
            break;
        }
    }
    let released = if chosen.1 == "retrieved" {
        full.clone()
    } else {
        generate(llm, ds, question, &chosen.0, config, |_| {
            ControlFlow::Continue(())
        })?
    };
    searches += released.searches;
    let generations = if chosen.1 == "retrieved" { 1 } else { 2 };
    let label = join_ids(&mut released.retrieved_labels.iter().copied());
    let violations = flow_check(&label);
    let text = if violations.is_empty() {
        let _ = on_text(&released.text);
        Some(released.text.trim().to_string())
    } else {
        None
    };
    Ok(KnnAnswer {
        text,
        label,
        violations,
        route: chosen.1,
        allowed: chosen.0,
        full_answer: full.text.trim().to_string(),
        generations,
        utility_passes,
        searches,
        sources: released
            .retrieved_docs
            .iter()
            .map(|(d, l)| (d.clone(), *l))
            .collect(),
        completion_tokens: released.tokens.len(),
        hit_max_tokens: released.hit_max_tokens,
    })
}
