//! Answering questions from labeled sources, and labelling the answer.
//!
//! The pipeline a query goes through once retrieval has picked the sources
//! the caller may read:
//!
//! 1. **Prompt.** The sources and the question become a ChatML conversation
//!    ([`prompt::messages`]). Document text is encoded as plain text, so a
//!    document cannot inject control tokens.
//! 2. **Label before generation.** A [`Propagator`] may know the answer's
//!    label before anything is generated (the conservative propagator: the
//!    join of every source's label). If that label may not flow to the sink,
//!    the answer is refused without running the model.
//! 3. **Generate** with the model.
//! 4. **Label after generation** for propagators that need the answer
//!    (the permissive ones), then the **flow check** against the sink.
//! 5. **Release** the answer with its label, or **refuse** with the reasons
//!    (which labels block which readers), never with content.
//!
//! The answer's label always includes the label of the model itself (what
//! its weights were trained on), [`AnswerConfig::model_label`].

mod introspect;
pub mod permissive;
pub mod prompt;

pub use permissive::{PermissiveConfig, Utility};

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use lethe_label::{Label, Violation};
use lethe_model::generate::{FinishReason, GenerateConfig, Generation, Llm};

/// Errors of the answer pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] lethe_model::Error),
    /// The request cannot be answered as asked.
    #[error("{0}")]
    InvalidRequest(String),
    /// The caller stopped listening before generation began.
    #[error("cancelled by the caller")]
    Cancelled,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A retrieved chunk the caller may read.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Chunk id (`doc#n`).
    pub chunk_id: String,
    /// Document id.
    pub doc_id: String,
    /// The document's label.
    pub label: Label,
    /// The policy's name for the label, when it has one.
    pub label_name: Option<String>,
    /// The chunk text.
    pub text: String,
}

/// How the answer's label is computed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Propagator {
    /// The join of every retrieved source's label (sound, and as secret as
    /// the most secret source that happened to be retrieved).
    #[default]
    Conservative,
    /// Only the labels of the sources that influenced the answer, found by
    /// the λ-similarity search, with restricted regeneration ([`permissive`]).
    Permissive(PermissiveConfig),
    /// Ask the model which sources it used (the paper's baseline), with
    /// restricted regeneration and a conservative fallback.
    Introspection,
}

impl Propagator {
    /// The name used in requests and audit records.
    pub fn name(self) -> &'static str {
        match self {
            Propagator::Conservative => "conservative",
            Propagator::Permissive(_) => "permissive",
            Propagator::Introspection => "introspection",
        }
    }

    /// Parses a propagator name (permissive with default settings).
    pub fn from_name(name: &str) -> Result<Propagator> {
        match name {
            "conservative" => Ok(Propagator::Conservative),
            "permissive" => Ok(Propagator::Permissive(PermissiveConfig::default())),
            "introspection" => Ok(Propagator::Introspection),
            other => Err(Error::InvalidRequest(format!(
                "unknown propagator {other:?}; available: conservative, permissive, introspection"
            ))),
        }
    }
}

/// What producing the answer cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Generations run (full-context, introspection question, restricted).
    pub generations: usize,
    /// Candidate contexts scored teacher-forced.
    pub scored_contexts: usize,
    /// Batched scoring passes.
    pub score_batches: usize,
    /// Tokens generated over all generations.
    pub generated_tokens: usize,
    /// Tokens of the released answer taken from the full-context answer
    /// after the restricted context's own greedy choice was checked to agree
    /// (teacher-forced, in the scoring pass), rather than decoded again.
    pub reused_tokens: usize,
}

/// How the label was found, for evaluation and audit.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// Which path decided (`up-front`, `sink-directed`, `total-order`,
    /// `search`, `widened`, `misaligned-fallback`, `budget-exhausted`,
    /// `introspection`, ...).
    pub route: &'static str,
    /// The minimal λ-similar contexts the search found, as source indexes.
    pub minimal: Vec<Vec<usize>>,
    /// The full-context answer, when it differs from the released one.
    pub full_answer: Option<String>,
    /// Restricted regenerations the alignment check rejected, in order: the
    /// sources each was generated from and what it said. Diagnostics for
    /// evaluations; like `full_answer` it may say more than the released
    /// label allows, so it never leaves the process.
    pub rejected: Vec<(Vec<usize>, String)>,
    /// For introspection: whether the model's reply parsed.
    pub introspection_parsed: Option<bool>,
}

/// Settings of one answer.
#[derive(Debug, Clone)]
pub struct AnswerConfig {
    /// Generation settings.
    pub generation: GenerateConfig,
    /// The label of the model's own knowledge, joined into every answer.
    pub model_label: Label,
    /// How the label is computed.
    pub propagator: Propagator,
}

/// Whether the answer was released.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The answer's label may flow to the sink.
    Released,
    /// It may not; the reasons name labels and readers, never content.
    Refused(Vec<Violation>),
}

impl Decision {
    /// `released` or `refused`.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Released => "released",
            Decision::Refused(_) => "refused",
        }
    }
}

/// The outcome of the pipeline.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The answer text; `None` when refused (it is never returned then).
    pub text: Option<String>,
    /// The answer's label.
    pub label: Label,
    /// Indexes (into the sources) of the sources the answer was generated
    /// from, and whose labels it carries.
    pub label_sources: Vec<usize>,
    /// Released or refused.
    pub decision: Decision,
    /// The propagator that computed the label.
    pub propagator: Propagator,
    /// SHA-256 of the rendered prompt (for the audit log).
    pub prompt_sha256: String,
    /// Tokens of prompt and of answer.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Why generation ended (`None` when nothing was generated).
    pub finish: Option<FinishReason>,
    /// Seconds spent in the model.
    pub model_secs: f64,
    /// What it cost.
    pub cost: Cost,
    /// How the label was found.
    pub trace: Trace,
}

/// What a streaming caller hears while an answer is produced.
#[derive(Debug, Clone, Copy)]
pub enum StreamEvent<'a> {
    /// The answer will be released with this label (sent once, before any
    /// text). Never sent for a refused answer.
    Released {
        /// The answer's label.
        label: &'a Label,
    },
    /// The next piece of answer text (whole UTF-8 characters).
    Text(&'a str),
}

/// Runs the pipeline. `flow_check` returns the violations of a label
/// against the sink (empty: allowed). `on_event` hears the release
/// decision and then the answer as it is generated, only once the answer
/// is known to be releasable; it may stop generation by returning `Break`.
pub fn answer(
    llm: &Arc<Llm>,
    question: &str,
    sources: &[Source],
    config: &AnswerConfig,
    flow_check: &dyn Fn(&Label) -> Vec<Violation>,
    mut on_event: impl FnMut(StreamEvent<'_>) -> ControlFlow<()>,
) -> Result<Answer> {
    if question.trim().is_empty() {
        return Err(Error::InvalidRequest("the question is empty".into()));
    }
    if sources.len() > 64 {
        return Err(Error::InvalidRequest(
            "at most 64 sources per answer".into(),
        ));
    }
    let t = Instant::now();
    let n = sources.len();
    let full = permissive::full_mask(n);
    let mut cost = Cost::default();
    let mut trace = Trace::default();

    // The scores of the full-context answer under the chosen context, when
    // the search computed them: the draft check of the regeneration.
    let mut checked: Option<(Vec<u32>, Vec<lethe_model::gguf_llama::TokenScore>)> = None;
    // Larger contexts to fall back on when the restricted answer disagrees.
    let mut widening: Vec<permissive::Mask> = Vec::new();
    // Decide which sources the released answer is generated from.
    let (chosen, pre_generated) = match config.propagator {
        Propagator::Conservative => {
            trace.route = "up-front";
            (full, None)
        }
        Propagator::Permissive(p) => {
            let full_gen = generate(
                llm,
                question,
                sources,
                full,
                &config.generation,
                &mut cost,
                |_| ControlFlow::Continue(()),
            )?;
            let mut scored_tokens = full_gen.tokens.clone();
            if let FinishReason::StopToken(t) = full_gen.finish {
                scored_tokens.push(t);
            }
            let draft = permissive::Draft {
                tokens: &full_gen.tokens,
                scored: &scored_tokens,
                logprobs: &full_gen.logprobs,
            };
            match permissive::search(&permissive::Problem {
                llm,
                question,
                sources,
                draft: &draft,
                model_label: &config.model_label,
                config: &p,
                flow_check,
            })? {
                Some(found) => {
                    cost.scored_contexts = found.scored;
                    cost.score_batches = found.batches;
                    trace.route = found.route;
                    trace.minimal = found
                        .minimal
                        .iter()
                        .map(|m| permissive::members(*m, n).collect())
                        .collect();
                    checked = found.checked.map(|c| (scored_tokens, c));
                    widening = found.widening;
                    (found.chosen, Some(full_gen))
                }
                None => {
                    trace.route = "budget-exhausted";
                    (full, Some(full_gen))
                }
            }
        }
        Propagator::Introspection => {
            let full_gen = generate(
                llm,
                question,
                sources,
                full,
                &config.generation,
                &mut cost,
                |_| ControlFlow::Continue(()),
            )?;
            let (mask, parsed) = introspect::used_sources(llm, question, sources, &full_gen.text)?;
            cost.generations += 1;
            trace.route = "introspection";
            trace.introspection_parsed = Some(parsed);
            (mask, Some(full_gen))
        }
    };
    // The permissive propagator verifies the restricted regeneration before
    // anything is released: a restricted answer that does not say what the
    // full-context answer said falls back to the full-context answer with
    // the conservative label.
    let (chosen, regenerated) = match (config.propagator, &pre_generated) {
        (Propagator::Permissive(p), Some(full_gen)) if chosen != full => {
            let g = regenerate(
                llm,
                question,
                sources,
                chosen,
                checked.as_ref(),
                &config.generation,
                &mut cost,
            )?;
            trace.full_answer = Some(full_gen.text.trim().to_string());
            let aligned = |g: &Generation| {
                p.min_alignment.is_none_or(|min| {
                    permissive::alignment(&g.text, &full_gen.text, question) >= min
                })
            };
            if aligned(&g) {
                (chosen, Some(g))
            } else {
                trace.rejected.push((
                    permissive::members(chosen, n).collect(),
                    g.text.trim().to_string(),
                ));
                // Widen: add back the most influential left-out label
                // classes one at a time until a regeneration agrees.
                let mut released = None;
                for &wider in widening.iter().take(p.max_widening) {
                    let g = regenerate(
                        llm,
                        question,
                        sources,
                        wider,
                        None,
                        &config.generation,
                        &mut cost,
                    )?;
                    if aligned(&g) {
                        trace.route = "widened";
                        released = Some((wider, Some(g)));
                        break;
                    }
                    trace.rejected.push((
                        permissive::members(wider, n).collect(),
                        g.text.trim().to_string(),
                    ));
                }
                released.unwrap_or_else(|| {
                    trace.route = "misaligned-fallback";
                    (full, None)
                })
            }
        }
        _ => (chosen, None),
    };
    let label = permissive::mask_label(&config.model_label, sources, chosen);
    let label_sources: Vec<usize> = permissive::members(chosen, n).collect();
    let messages = prompt::messages(question, &subset(sources, chosen));
    let rendered = llm.chat.render(&messages)?;
    let prompt_sha256 =
        hex::encode(ring::digest::digest(&ring::digest::SHA256, rendered.as_bytes()).as_ref());

    let violations = flow_check(&label);
    if !violations.is_empty() {
        return Ok(Answer {
            text: None,
            label,
            label_sources,
            decision: Decision::Refused(violations),
            propagator: config.propagator,
            prompt_sha256,
            prompt_tokens: 0,
            completion_tokens: 0,
            finish: None,
            model_secs: t.elapsed().as_secs_f64(),
            cost,
            trace,
        });
    }
    if on_event(StreamEvent::Released { label: &label }).is_break() {
        return Err(Error::Cancelled);
    }
    // The released answer: already generated from exactly the chosen
    // sources (the full-context answer, or the verified regeneration), or
    // generated now from them (conservative; introspection's restriction).
    let released = match (regenerated, pre_generated) {
        (Some(g), _) => {
            let _ = on_event(StreamEvent::Text(&g.text));
            g
        }
        (None, Some(g)) if chosen == full => {
            let _ = on_event(StreamEvent::Text(&g.text));
            g
        }
        (None, pre) => {
            if let Some(g) = &pre {
                trace.full_answer = Some(g.text.trim().to_string());
            }
            generate(
                llm,
                question,
                sources,
                chosen,
                &config.generation,
                &mut cost,
                |t| on_event(StreamEvent::Text(t)),
            )?
        }
    };
    Ok(Answer {
        text: Some(released.text.trim().to_string()),
        label,
        label_sources,
        decision: Decision::Released,
        propagator: config.propagator,
        prompt_sha256,
        prompt_tokens: released.prompt_tokens,
        completion_tokens: released.tokens.len(),
        finish: Some(released.finish),
        model_secs: t.elapsed().as_secs_f64(),
        cost,
        trace,
    })
}

fn subset(sources: &[Source], mask: permissive::Mask) -> Vec<Source> {
    sources
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, s)| s.clone())
        .collect()
}

/// Generates the answer from the sources in `mask` (greedy decoding of the
/// restricted prompt, exactly), reusing the full-context answer as far as
/// the restricted context's own greedy choices agree with it when the
/// search scored it there (`checked`: the scored tokens and their scores).
#[allow(clippy::too_many_arguments)]
fn regenerate(
    llm: &Llm,
    question: &str,
    sources: &[Source],
    mask: permissive::Mask,
    checked: Option<&(Vec<u32>, Vec<lethe_model::gguf_llama::TokenScore>)>,
    config: &GenerateConfig,
    cost: &mut Cost,
) -> Result<Generation> {
    if let Some((draft, scores)) = checked {
        let messages = prompt::messages(question, &subset(sources, mask));
        if let Some(g) = llm.chat_from_draft(&messages, draft, scores, config)? {
            let reused = g
                .tokens
                .iter()
                .zip(draft)
                .take_while(|(a, b)| a == b)
                .count();
            cost.generations += 1;
            cost.reused_tokens += reused;
            cost.generated_tokens += g.tokens.len() - reused;
            return Ok(g);
        }
    }
    generate(llm, question, sources, mask, config, cost, |_| {
        ControlFlow::Continue(())
    })
}

/// Generates an answer from the sources in `mask`.
fn generate(
    llm: &Llm,
    question: &str,
    sources: &[Source],
    mask: permissive::Mask,
    config: &GenerateConfig,
    cost: &mut Cost,
    on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let messages = prompt::messages(question, &subset(sources, mask));
    let g = llm.chat(&messages, config, on_text)?;
    cost.generations += 1;
    cost.generated_tokens += g.tokens.len();
    Ok(g)
}

#[cfg(test)]
mod tests;
