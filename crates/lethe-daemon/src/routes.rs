//! The routes, one module per area, and what they share: authentication
//! and running a query on the model pool.

mod admin;
mod documents;
mod model;
mod openai;
mod query;
mod unlearn;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::Router;
use lethe_engine::label::Label;
use lethe_engine::{AnswerOutcome, AnswerRequest, Decision, StreamEvent};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::error::AppError;
use crate::pool::Rejected;
use crate::{wire, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .merge(admin::router())
        .merge(documents::router())
        .merge(model::router())
        .merge(query::router())
        .merge(openai::router())
        .merge(unlearn::router())
}

/// The authenticated principal of a request (`Authorization: Bearer KEY`).
pub(crate) struct Authed(pub String);

impl FromRequestParts<AppState> for Authed {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            AppError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
        })?;
        let key = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                AppError::unauthorized("malformed Authorization header: expected `Bearer <key>`")
            })?;
        let principal = state
            .engine
            .authenticate(key)
            .map_err(|_| AppError::unauthorized("invalid API key"))?;
        Ok(Authed(principal))
    }
}

fn rejected(r: Rejected) -> AppError {
    match r {
        Rejected::Full => AppError::busy(
            StatusCode::TOO_MANY_REQUESTS,
            "the model queue is full; retry later",
            2,
        ),
        Rejected::ShuttingDown => AppError::busy(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
            5,
        ),
    }
}

fn timeout(state: &AppState) -> Duration {
    Duration::from_secs(state.config.request_timeout_secs.max(1))
}

/// Runs a query on the model pool and waits for the whole outcome.
pub(crate) async fn run_query(
    state: &AppState,
    req: AnswerRequest,
) -> Result<AnswerOutcome, AppError> {
    let (tx, rx) = oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let engine = state.engine.clone();
    state
        .pool
        .submit(move || {
            let result = engine.answer(&req, |_| {
                if flag.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let _ = tx.send(result);
        })
        .map_err(rejected)?;
    match tokio::time::timeout(timeout(state), rx).await {
        Err(_) => {
            cancel.store(true, Ordering::Relaxed);
            Err(AppError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "the query took too long and was cancelled",
            ))
        }
        Ok(Err(_)) => Err(AppError::internal("a model worker dropped a job")),
        Ok(Ok(r)) => {
            let outcome = r?;
            state.metrics.model_time(outcome.answer.model_secs);
            Ok(outcome)
        }
    }
}

/// What a streaming query sends from the worker to the response.
pub(crate) enum StreamMsg {
    /// The answer will be released with this label.
    Released(Label),
    /// More answer text.
    Text(String),
    /// The end: the outcome, or the error.
    Done(Box<Result<AnswerOutcome, lethe_engine::Error>>),
}

/// Starts a query on the model pool that streams its events. Generation
/// stops when the receiver is dropped (the client went away) or the
/// deadline passes.
pub(crate) fn start_stream(
    state: &AppState,
    req: AnswerRequest,
) -> Result<mpsc::Receiver<StreamMsg>, AppError> {
    let (tx, rx) = mpsc::channel(256);
    let engine = state.engine.clone();
    let deadline = std::time::Instant::now() + timeout(state);
    state
        .pool
        .submit(move || {
            let result = engine.answer(&req, |event| {
                if std::time::Instant::now() > deadline {
                    return ControlFlow::Break(());
                }
                let msg = match event {
                    StreamEvent::Released { label } => StreamMsg::Released(label.clone()),
                    StreamEvent::Text(t) => StreamMsg::Text(t.to_string()),
                };
                match tx.blocking_send(msg) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            });
            let _ = tx.blocking_send(StreamMsg::Done(Box::new(result)));
        })
        .map_err(rejected)?;
    Ok(rx)
}

/// The 403 answer for a refused query: labels and readers, never content.
pub(crate) fn refusal(state: &AppState, outcome: &AnswerOutcome) -> AppError {
    let policy = state.engine.policy();
    let violations = match &outcome.answer.decision {
        Decision::Refused(v) => v.clone(),
        Decision::Released => Vec::new(),
    };
    let sink = outcome.sink.to_string();
    state.metrics.refused(&sink);
    // The caller may read every retrieved source; say which ones block.
    let blocking: Vec<serde_json::Value> = outcome
        .sources
        .iter()
        .enumerate()
        .filter(|(_, s)| !policy.check_flow(&s.label, &outcome.sink).is_empty())
        .map(|(i, s)| wire::source(s, outcome.answer.label_sources.contains(&i), &policy))
        .collect();
    AppError::new(
        StatusCode::FORBIDDEN,
        "policy_refusal",
        format!("the answer's label may not flow to sink {sink}"),
    )
    .with_extra(json!({
        "decision": "refused",
        "sink": sink,
        "label": wire::label(&outcome.answer.label, &policy),
        "violations": violations.iter().map(wire::violation).collect::<Vec<_>>(),
        "blocking_sources": blocking,
        "audit_id": outcome.audit_seq.to_string(),
    }))
}

/// Validated generation and retrieval knobs shared by both query APIs.
pub(crate) struct Knobs {
    pub k: Option<usize>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub retrieval: Option<String>,
    pub propagator: Option<String>,
    pub mode: Option<String>,
    pub stop: Vec<String>,
}

pub(crate) fn answer_request(
    state: &AppState,
    principal: String,
    query: String,
    sink: Option<String>,
    knobs: Knobs,
) -> Result<AnswerRequest, AppError> {
    let cfg = &state.config;
    let k = knobs.k.unwrap_or(cfg.default_k);
    if k == 0 || k > cfg.max_k {
        return Err(AppError::bad_request(format!(
            "k must be between 1 and {}",
            cfg.max_k
        )));
    }
    let max_tokens = knobs.max_tokens.unwrap_or(cfg.default_max_tokens);
    if max_tokens == 0 || max_tokens > cfg.max_tokens_limit {
        return Err(AppError::bad_request(format!(
            "max_tokens must be between 1 and {}",
            cfg.max_tokens_limit
        )));
    }
    if query.trim().is_empty() {
        return Err(AppError::bad_request("the query is empty"));
    }
    if query.len() > 16_384 {
        return Err(AppError::bad_request(
            "the query is longer than 16384 bytes",
        ));
    }
    let mode = match knobs.retrieval.as_deref() {
        None | Some("hybrid") => lethe_engine::Mode::Hybrid,
        Some("bm25") => lethe_engine::Mode::Bm25,
        Some("dense") => lethe_engine::Mode::Dense,
        Some(other) => {
            return Err(AppError::bad_request(format!(
                "unknown retrieval {other:?}: use hybrid, bm25 or dense"
            )))
        }
    };
    let generator = match knobs.mode.as_deref() {
        None | Some("rag") => lethe_engine::Generator::Rag,
        Some("knnlm") => lethe_engine::Generator::KnnLm,
        Some(other) => {
            return Err(AppError::bad_request(format!(
                "unknown mode {other:?}: use \"rag\" or \"knnlm\""
            )))
        }
    };
    let propagator =
        lethe_engine::Propagator::from_name(knobs.propagator.as_deref().unwrap_or("conservative"))
            .map_err(|e| AppError::bad_request(e.to_string()))?;
    let sampling = match knobs.temperature {
        None => lethe_engine::Sampling::Greedy,
        Some(t) if !(0.0..=2.0).contains(&t) || !t.is_finite() => {
            return Err(AppError::bad_request("temperature must be between 0 and 2"))
        }
        Some(0.0) => lethe_engine::Sampling::Greedy,
        Some(t) => {
            let top_p = knobs.top_p.unwrap_or(1.0);
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(AppError::bad_request("top_p must be in (0, 1]"));
            }
            lethe_engine::Sampling::Sample {
                temperature: t,
                top_p,
                top_k: None,
                seed: knobs.seed.unwrap_or(0),
            }
        }
    };
    if knobs.stop.len() > 4 || knobs.stop.iter().any(|s| s.is_empty() || s.len() > 64) {
        return Err(AppError::bad_request(
            "stop: at most 4 non-empty strings of at most 64 bytes",
        ));
    }
    Ok(AnswerRequest {
        principal,
        query,
        sink,
        k,
        mode,
        propagator,
        generation: lethe_engine::GenerateConfig {
            max_tokens,
            sampling,
            stop_strings: knobs.stop,
            // No repetition penalty: answers must copy facts from the context.
            ..lethe_engine::GenerateConfig::default()
        },
        generator,
    })
}
