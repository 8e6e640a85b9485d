//! `POST /v1/chat/completions` and `GET /v1/models`, OpenAI-compatible.
//!
//! The last user message is the question. lethe's own request fields
//! (`sink`, `k`, `retrieval`, `propagator`) may be sent as extra body fields
//! (the OpenAI clients' `extra_body`) or, for the sink, the `x-lethe-sink`
//! header. lethe's answer fields travel in a `lethe` object beside
//! `choices`, and in `x-lethe-*` headers. Unknown OpenAI fields are
//! accepted and ignored, as OpenAI-compatible servers do; fields lethe
//! cannot honour (`n > 1`, tools) are refused with 400.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use lethe_engine::label::{Label, Policy};
use lethe_engine::{AnswerOutcome, Decision, FinishReason};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{answer_request, refusal, run_query, start_stream, Authed, Knobs, StreamMsg};
use crate::error::{AppError, AppJson};
use crate::{wire, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
}

/// The model names a client may ask for.
fn model_ids(state: &AppState) -> Vec<String> {
    vec![state.engine.model_id(), "lethe".to_string()]
}

async fn models(State(state): State<AppState>, Authed(_): Authed) -> Json<Value> {
    let created = now();
    Json(json!({
        "object": "list",
        "data": model_ids(&state).into_iter().map(|id| json!({
            "id": id, "object": "model", "created": created, "owned_by": "lethe",
        })).collect::<Vec<_>>(),
    }))
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    tools: Option<Value>,
    // lethe extensions
    #[serde(default)]
    sink: Option<String>,
    #[serde(default)]
    k: Option<usize>,
    #[serde(default)]
    retrieval: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    propagator: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

fn question(messages: &[ChatMessage]) -> Result<String, AppError> {
    let last = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| AppError::bad_request("messages: no user message"))?;
    match &last.content {
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut out = Vec::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(AppError::bad_request(format!(
                        "content parts of type {:?} are not supported",
                        p.kind
                    )));
                }
                out.push(p.text.clone().unwrap_or_default());
            }
            Ok(out.join("\n"))
        }
        None => Err(AppError::bad_request(
            "the last user message has no content",
        )),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    Authed(principal): Authed,
    headers: HeaderMap,
    AppJson(req): AppJson<ChatRequest>,
) -> Result<Response, AppError> {
    if !model_ids(&state).contains(&req.model) {
        return Err(AppError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model {:?} does not exist; see GET /v1/models",
                req.model
            ),
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(AppError::bad_request("n must be 1"));
    }
    if req.tools.is_some() {
        return Err(AppError::bad_request("tools are not supported"));
    }
    let query = question(&req.messages)?;
    let sink = req.sink.or_else(|| {
        headers
            .get("x-lethe-sink")
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    let areq = answer_request(
        &state,
        principal,
        query,
        sink,
        Knobs {
            k: req.k,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            retrieval: req.retrieval,
            propagator: req.propagator,
            mode: req.mode,
            stop: match req.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
        },
    )?;
    let model = req.model;
    if req.stream {
        return stream(state, areq, model).await;
    }
    let outcome = run_query(&state, areq).await?;
    if matches!(outcome.answer.decision, Decision::Refused(_)) {
        return Err(refusal(&state, &outcome));
    }
    let policy = state.engine.policy();
    let id = format!("chatcmpl-lethe-{}", outcome.audit_seq);
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": outcome.answer.text.clone().unwrap_or_default()},
            "finish_reason": finish_reason(outcome.answer.finish.as_ref()),
            "logprobs": null,
        }],
        "usage": {
            "prompt_tokens": outcome.answer.prompt_tokens,
            "completion_tokens": outcome.answer.completion_tokens,
            "total_tokens": outcome.answer.prompt_tokens + outcome.answer.completion_tokens,
        },
        "lethe": lethe_extension(&outcome, &policy),
    });
    let mut response = Json(body).into_response();
    lethe_headers(&mut response, &outcome, &policy, true);
    Ok(response)
}

async fn stream(
    state: AppState,
    areq: lethe_engine::AnswerRequest,
    model: String,
) -> Result<Response, AppError> {
    let mut rx = start_stream(&state, areq)?;
    // The first message decides the response: a release (stream), or the end
    // (a refusal or an error, answered with a status code, before any byte
    // of the stream is sent).
    let label = match rx.recv().await {
        Some(StreamMsg::Released(label)) => label,
        Some(StreamMsg::Done(result)) => {
            let outcome = (*result)?;
            return Err(match outcome.answer.decision {
                Decision::Refused(_) => refusal(&state, &outcome),
                Decision::Released => AppError::internal("stream ended before it started"),
            });
        }
        Some(StreamMsg::Text(_)) => {
            return Err(AppError::internal("text before the release decision"))
        }
        None => return Err(AppError::internal("a model worker dropped a stream")),
    };
    let policy = state.engine.policy();
    let created = now();
    let id = format!("chatcmpl-lethe-{created}-{}", std::process::id());
    let chunk = move |delta: Value, finish: Option<&str>, extra: Option<Value>| {
        let mut v = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if let (Some(extra), Some(obj)) = (extra, v.as_object_mut()) {
            obj.insert("lethe".into(), extra);
        }
        Event::default().data(v.to_string())
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None, None);
    let metrics = state.metrics.clone();
    let policy_for_end = policy.clone();
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |msg| -> Vec<Event> {
        match msg {
            StreamMsg::Text(t) => vec![chunk(json!({"content": t}), None, None)],
            StreamMsg::Released(_) => Vec::new(),
            StreamMsg::Done(result) => match *result {
                Ok(outcome) => {
                    metrics.model_time(outcome.answer.model_secs);
                    vec![
                        chunk(
                            json!({}),
                            Some(finish_reason(outcome.answer.finish.as_ref())),
                            Some(lethe_extension(&outcome, &policy_for_end)),
                        ),
                        Event::default().data("[DONE]"),
                    ]
                }
                Err(e) => {
                    tracing::error!(error = %e, "stream failed mid-answer");
                    vec![Event::default().event("error").data(
                        json!({"error": {"message": "internal error", "type": "server_error"}})
                            .to_string(),
                    )]
                }
            },
        }
    });
    let stream = futures_util::stream::once(async move { vec![first] })
        .chain(events)
        .flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    let h = response.headers_mut();
    insert(h, "x-lethe-decision", "released");
    insert(h, "x-lethe-label", &label.to_string());
    if let Some(name) = label_name(&label, &policy) {
        insert(h, "x-lethe-label-name", &name);
    }
    Ok(response)
}

fn label_name(label: &Label, policy: &Policy) -> Option<String> {
    policy
        .labels()
        .iter()
        .find(|(_, l)| *l == label)
        .map(|(n, _)| n.clone())
}

/// lethe's fields of an answer.
pub(super) fn lethe_extension(outcome: &AnswerOutcome, policy: &Policy) -> Value {
    json!({
        "label": wire::label(&outcome.answer.label, policy),
        "sources": wire::sources(outcome, policy),
        "decision": outcome.answer.decision.name(),
        "sink": outcome.sink.to_string(),
        "propagator": outcome.answer.propagator.name(),
        "audit_id": outcome.audit_seq.to_string(),
    })
}

/// The `x-lethe-*` headers of a released answer.
pub(super) fn lethe_headers(
    response: &mut Response,
    outcome: &AnswerOutcome,
    policy: &Policy,
    with_audit: bool,
) {
    let h = response.headers_mut();
    insert(h, "x-lethe-decision", outcome.answer.decision.name());
    insert(h, "x-lethe-label", &outcome.answer.label.to_string());
    if let Some(name) = label_name(&outcome.answer.label, policy) {
        insert(h, "x-lethe-label-name", &name);
    }
    insert(h, "x-lethe-sink", &outcome.sink.to_string());
    let sources: Vec<&str> = outcome
        .sources
        .iter()
        .map(|s| s.chunk_id.as_str())
        .collect();
    insert(h, "x-lethe-sources", &sources.join(","));
    if with_audit {
        insert(h, "x-lethe-audit-id", &outcome.audit_seq.to_string());
    }
}

fn insert(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(&wire::header_text(value)) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// OpenAI's finish reason for a generation.
pub(super) fn finish_reason(f: Option<&FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::MaxTokens) | Some(FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
