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

pub mod prompt;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use lethe_label::{Label, Violation};
use lethe_model::generate::{FinishReason, GenerateConfig, Llm};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagator {
    /// The join of every retrieved source's label (sound, and as secret as
    /// the most secret source that happened to be retrieved).
    #[default]
    Conservative,
}

impl Propagator {
    /// The name used in requests and audit records.
    pub fn name(self) -> &'static str {
        match self {
            Propagator::Conservative => "conservative",
        }
    }

    /// Parses a propagator name.
    pub fn from_name(name: &str) -> Result<Propagator> {
        match name {
            "conservative" => Ok(Propagator::Conservative),
            other => Err(Error::InvalidRequest(format!(
                "unknown propagator {other:?}; available: conservative"
            ))),
        }
    }
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
    /// Indexes (into the sources) of the sources the label accounts for.
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
    let messages = prompt::messages(question, sources);
    let rendered = llm.chat.render(&messages)?;
    let prompt_sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, rendered.as_bytes()).as_ref());
    let all: Vec<usize> = (0..sources.len()).collect();
    let label = match config.propagator {
        Propagator::Conservative => sources
            .iter()
            .fold(config.model_label.clone(), |acc, s| acc.join(&s.label)),
    };
    let violations = flow_check(&label);
    if !violations.is_empty() {
        return Ok(Answer {
            text: None,
            label,
            label_sources: all,
            decision: Decision::Refused(violations),
            propagator: config.propagator,
            prompt_sha256,
            prompt_tokens: 0,
            completion_tokens: 0,
            finish: None,
            model_secs: 0.0,
        });
    }
    let t = Instant::now();
    if on_event(StreamEvent::Released { label: &label }).is_break() {
        return Err(Error::Cancelled);
    }
    let generation = llm.chat(&messages, &config.generation, |t| on_event(StreamEvent::Text(t)))?;
    Ok(Answer {
        text: Some(generation.text.trim().to_string()),
        label,
        label_sources: all,
        decision: Decision::Released,
        propagator: config.propagator,
        prompt_sha256,
        prompt_tokens: generation.prompt_tokens,
        completion_tokens: generation.tokens.len(),
        finish: Some(generation.finish),
        model_secs: t.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests;
