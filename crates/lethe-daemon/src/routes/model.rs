//! The deployment's own decoder, served as unlearning left it.
//!
//! `POST /v1/model/complete` `{prompt, max_tokens?, sink?}` continues the
//! prompt with the live version of `[unlearning] model` and every O3
//! suppression adapter in force, each gated by its detector
//! (`lethe_compliance::serve`). The completion carries `[unlearning]
//! label`: callers must be cleared for it, and a sink it may not flow to
//! gets the same 403 refusal as a query, before anything is generated. The
//! reply names the live version, the epoch and every gate, so a client can
//! see an unlearning request take effect without a restart.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use lethe_compliance::{Completion, CompletionRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use super::unlearn::{app_error, compliance};
use super::Authed;
use crate::error::{AppError, AppJson};
use crate::{wire, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/model/complete", post(complete))
}

/// Tokens generated when the request names no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    prompt: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    sink: Option<String>,
}

async fn complete(
    State(state): State<AppState>,
    Authed(principal): Authed,
    AppJson(req): AppJson<CompleteRequest>,
) -> Result<Json<Value>, AppError> {
    let c = compliance(&state).await?;
    let request = CompletionRequest {
        principal,
        prompt: req.prompt,
        max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        sink: req.sink,
    };
    let out = tokio::task::spawn_blocking(move || c.complete(&request))
        .await
        .map_err(AppError::internal)?
        .map_err(app_error)?;
    let policy = state.engine.policy();
    if !out.released() {
        let sink = out.sink.to_string();
        state.metrics.refused(&sink);
        return Err(AppError::new(
            StatusCode::FORBIDDEN,
            "policy_refusal",
            format!("the deployment decoder's label may not flow to sink {sink}"),
        )
        .with_extra(json!({
            "decision": "refused",
            "sink": sink,
            "label": wire::label(&out.label, &policy),
            "violations": out.violations.iter().map(wire::violation).collect::<Vec<_>>(),
            "audit_id": out.audit_seq.to_string(),
        })));
    }
    Ok(Json(body(&out, &policy)))
}

fn body(out: &Completion, policy: &lethe_engine::label::Policy) -> Value {
    json!({
        "text": out.text,
        "decision": "released",
        "sink": out.sink.to_string(),
        "label": wire::label(&out.label, policy),
        "model": {"version": out.version, "epoch": out.epoch},
        "suppressions": out.gates.iter().map(|g| json!({
            "request": g.request,
            "score": g.score,
            "weight": g.weight,
            "gate": g.gate,
            "applied": g.gate > 0.0,
        })).collect::<Vec<_>>(),
        "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens},
        "audit_id": out.audit_seq.to_string(),
    })
}
