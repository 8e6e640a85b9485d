//! `POST /v1/query`: lethe's own query API.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use lethe_engine::Decision;
use serde::Deserialize;
use serde_json::json;

use super::{answer_request, refusal, run_query, Authed, Knobs};
use crate::error::{AppError, AppJson};
use crate::{wire, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/query", post(query))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    query: String,
    #[serde(default)]
    sink: Option<String>,
    #[serde(default)]
    k: Option<usize>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    retrieval: Option<String>,
    #[serde(default)]
    propagator: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
}

async fn query(
    State(state): State<AppState>,
    Authed(principal): Authed,
    headers: HeaderMap,
    AppJson(req): AppJson<QueryRequest>,
) -> Result<Response, AppError> {
    let sink = req.sink.or_else(|| {
        headers
            .get("x-lethe-sink")
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    let areq = answer_request(
        &state,
        principal,
        req.query,
        sink,
        Knobs {
            k: req.k,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            retrieval: req.retrieval,
            propagator: req.propagator,
            mode: req.mode,
            stop: Vec::new(),
        },
    )?;
    let outcome = run_query(&state, areq).await?;
    if matches!(outcome.answer.decision, Decision::Refused(_)) {
        return Err(refusal(&state, &outcome));
    }
    let policy = state.engine.policy();
    let body = json!({
        "answer": outcome.answer.text.clone().unwrap_or_default(),
        "label": wire::label(&outcome.answer.label, &policy),
        "sources": wire::sources(&outcome, &policy),
        "decision": "released",
        "sink": outcome.sink.to_string(),
        "propagator": outcome.answer.propagator.name(),
        "audit_id": outcome.audit_seq.to_string(),
        "model": state.engine.model_id(),
        "usage": {
            "prompt_tokens": outcome.answer.prompt_tokens,
            "completion_tokens": outcome.answer.completion_tokens,
        },
        "finish_reason": super::openai::finish_reason(outcome.answer.finish.as_ref()),
    });
    let mut response = Json(body).into_response();
    super::openai::lethe_headers(&mut response, &outcome, &policy, true);
    Ok(response)
}
