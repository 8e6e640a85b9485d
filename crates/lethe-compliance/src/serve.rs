//! Serving the deployment's own decoder, as unlearning left it.
//!
//! Unlearning the decoder only matters if what answers is the unlearned
//! decoder: [`Compliance::complete`] generates from the live version (the
//! weights every activation swaps in) with every O3 adapter in force,
//! each gated by its own detector on the prompt, as O3 serves requests.
//! A forgotten document's prompt therefore meets its suppression adapter,
//! while other prompts decode as the base weights would.
//!
//! The decoder was trained on documents, so what it says is as secret as
//! they were: `[unlearning] label` names the policy label of its training
//! data. Only principals cleared for that label may ask, the completion
//! carries it, and a sink it may not flow to gets a refusal before any
//! token is generated. Without the label the decoder is not served (fail
//! closed). Each completion is audited (`model.complete`) with hashes, the
//! label, the live version and every gate decision, never text.

use lethe_engine::label::{Label, SinkRef, Violation};
use serde_json::json;

use crate::{Compliance, Error, Result};

/// Most tokens one completion may generate.
pub const MAX_COMPLETION_TOKENS: usize = 512;

/// What a caller asks the deployment's decoder.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The principal asking.
    pub principal: String,
    /// The text to continue.
    pub prompt: String,
    /// Tokens to generate, 1..=[`MAX_COMPLETION_TOKENS`].
    pub max_tokens: usize,
    /// Where the completion goes (`None`: the caller itself).
    pub sink: Option<String>,
}

/// One O3 request's gate for a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct SuppressionGate {
    /// The unlearning request whose adapter this is.
    pub request: String,
    /// Its detector's score for the prompt.
    pub score: f64,
    /// The calibrated weight in (0, 1).
    pub weight: f64,
    /// The gate the adapter ran with (0: off).
    pub gate: f64,
}

/// A completion of the deployment's decoder, or its refusal.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The generated text (empty when refused).
    pub text: String,
    /// The completion's label: `[unlearning] label`.
    pub label: Label,
    /// The label's name.
    pub label_name: String,
    /// The sink it was checked against.
    pub sink: SinkRef,
    /// Why it may not flow to the sink (empty: released).
    pub violations: Vec<Violation>,
    /// The live version that answered (`None`: the configured base).
    pub version: Option<String>,
    /// Activations so far when it answered.
    pub epoch: u64,
    /// The O3 gates, one per suppression in force, in order.
    pub gates: Vec<SuppressionGate>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// The audit record's sequence number.
    pub audit_seq: u64,
}

impl Completion {
    /// Whether the completion was released to its sink.
    pub fn released(&self) -> bool {
        self.violations.is_empty()
    }
}

impl Compliance {
    /// Continues `req.prompt` with the live decoder and the O3 suppressions
    /// in force (see the module docs). Errors: no decoder or no label
    /// configured ([`Error::Conflict`]), a caller not cleared for the label
    /// or not allowed the sink (`Forbidden`), an empty or too long prompt, a
    /// bad token count ([`Error::BadRequest`]). A sink the label may not flow
    /// to is not an error: the completion comes back refused, text empty.
    pub fn complete(&self, req: &CompletionRequest) -> Result<Completion> {
        let engine = self.engine()?;
        let ucfg = &engine.config().unlearning;
        if ucfg.model.is_none() {
            return Err(Error::Conflict(
                "no deployment decoder is configured ([unlearning] model)".into(),
            ));
        }
        let Some(label_name) = ucfg.label.clone() else {
            return Err(Error::Conflict(
                "the deployment decoder has no label: set [unlearning] label to the policy label \
                 of the data it was trained on to serve it"
                    .into(),
            ));
        };
        let (policy, clearance, sink) =
            engine.output_context(&req.principal, req.sink.as_deref())?;
        let label = policy
            .label(&label_name)
            .map_err(|e| Error::Conflict(format!("[unlearning] label: {e}")))?
            .clone();
        if !clearance.may_read(&label.readers) {
            return Err(Error::Engine(lethe_engine::Error::Forbidden(format!(
                "principal {:?} may not read the deployment decoder's label {label_name:?}",
                req.principal
            ))));
        }
        if req.prompt.trim().is_empty() {
            return Err(Error::BadRequest("empty prompt".into()));
        }
        if !(1..=MAX_COMPLETION_TOKENS).contains(&req.max_tokens) {
            return Err(Error::BadRequest(format!(
                "max_tokens must be in 1..={MAX_COMPLETION_TOKENS}, got {}",
                req.max_tokens
            )));
        }
        let model = self
            .live_model()?
            .ok_or_else(|| Error::Conflict("no deployment decoder is configured".into()))?;
        let epoch = self.live().epoch;
        let ids = model.tok.encode(&req.prompt)?;
        let cfg = model.decoder.config();
        if ids.is_empty() {
            return Err(Error::BadRequest("the prompt gives no tokens".into()));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::BadRequest(format!(
                "prompt token {bad} is outside the decoder's vocabulary of {}",
                cfg.vocab_size
            )));
        }
        if ids.len() >= cfg.max_position_embeddings {
            return Err(Error::BadRequest(format!(
                "the prompt has {} tokens; the decoder's context is {}",
                ids.len(),
                cfg.max_position_embeddings
            )));
        }
        let violations = policy.check_flow(&label, &sink);
        let (text, tokens, gates) = if violations.is_empty() {
            let _serving = model.serving.lock().unwrap_or_else(|p| p.into_inner());
            let out = model
                .o3
                .complete(&model.decoder, &ids, req.max_tokens, &[])?;
            let gates: Vec<SuppressionGate> = model
                .suppressions
                .iter()
                .zip(out.gates)
                .map(|(request, g)| SuppressionGate {
                    request: request.clone(),
                    score: g.score,
                    weight: g.weight,
                    gate: g.gate,
                })
                .collect();
            (model.tok.decode(&out.tokens)?, out.tokens.len(), gates)
        } else {
            (String::new(), 0, Vec::new())
        };
        let audit_seq = engine.audit_model_completion(
            &req.principal,
            json!({
                "sink": sink.to_string(),
                "label": label_name,
                "decision": if violations.is_empty() { "released" } else { "refused" },
                "violations": violations.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "version": model.version,
                "epoch": epoch,
                "tokenizer": model.tokenizer_name,
                "prompt_sha256": crate::sha256_hex(req.prompt.as_bytes()),
                "prompt_tokens": ids.len(),
                "completion_tokens": tokens,
                "gates": gates.iter().map(|g| json!({
                    "request": g.request,
                    "weight": crate::receipt::fmt_f64(g.weight),
                    "gate": crate::receipt::fmt_f64(g.gate),
                })).collect::<Vec<_>>(),
            }),
        )?;
        Ok(Completion {
            text,
            label,
            label_name,
            sink,
            violations,
            version: model.version.clone(),
            epoch,
            gates,
            prompt_tokens: ids.len(),
            completion_tokens: tokens,
            audit_seq,
        })
    }
}
