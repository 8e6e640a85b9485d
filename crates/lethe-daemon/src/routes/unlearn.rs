//! Compliance unlearning over HTTP, for principals with the `unlearn` role.
//!
//! * `POST /v1/unlearn` `{documents, reason, requester, method?}` files a
//!   request in the ledger and answers `202 Accepted` with its id at once;
//!   the run (weights, erasure, activation, signed receipt) goes on in a
//!   blocking background task, never on the async runtime. The task also
//!   resumes any run a crash interrupted.
//! * `GET /v1/unlearn/{id}`: state, phase, attempts, and the signed receipt
//!   once completed. `GET /v1/unlearn`: every request.
//! * `GET /v1/unlearn/model`: which weights are live (epoch, version,
//!   hash, suppression adapters), for any authenticated principal.
//! * `GET /v1/unlearn/public-key`: the key that verifies receipts (public).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lethe_compliance::{Compliance, NewRequest, RequestStatus, State as RunState};
use lethe_engine::Actor;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Authed;
use crate::error::{AppError, AppJson};
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/unlearn", post(file).get(list))
        .route("/v1/unlearn/model", get(model))
        .route("/v1/unlearn/public-key", get(public_key))
        .route("/v1/unlearn/{id}", get(status))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRequest {
    documents: Vec<String>,
    reason: String,
    requester: String,
    #[serde(default)]
    method: Option<String>,
}

const MAX_DOCUMENTS: usize = 1000;

pub(super) fn app_error(e: lethe_compliance::Error) -> AppError {
    use lethe_compliance::Error as E;
    match e {
        E::Engine(e) => AppError::from(e),
        E::BadRequest(m) => AppError::bad_request(m),
        E::UnknownRequest(id) => AppError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("unknown unlearning request {id:?}"),
        ),
        E::Conflict(m) => AppError::new(StatusCode::CONFLICT, "conflict_error", m),
        other => AppError::internal(other),
    }
}

/// The engine's workflow, opened off the async runtime.
pub(super) async fn compliance(state: &AppState) -> Result<Arc<Compliance>, AppError> {
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || Compliance::shared(&engine))
        .await
        .map_err(AppError::internal)?
        .map_err(app_error)
}

async fn file(
    State(state): State<AppState>,
    Authed(principal): Authed,
    AppJson(req): AppJson<FileRequest>,
) -> Result<Response, AppError> {
    if req.documents.is_empty() {
        return Err(AppError::bad_request("documents: empty list"));
    }
    if req.documents.len() > MAX_DOCUMENTS {
        return Err(AppError::bad_request(format!(
            "at most {MAX_DOCUMENTS} documents per request"
        )));
    }
    let c = compliance(&state).await?;
    let actor = Actor::Principal(principal);
    let filed = {
        let (c, actor) = (c.clone(), actor.clone());
        tokio::task::spawn_blocking(move || {
            c.file(
                &actor,
                NewRequest {
                    documents: req.documents,
                    reason: req.reason,
                    requester: req.requester,
                    method: req.method,
                },
            )
        })
        .await
        .map_err(AppError::internal)?
        .map_err(app_error)?
    };
    let id = filed.request.id.clone();
    // Run it (and anything a crash interrupted) in the background.
    tokio::task::spawn_blocking(move || {
        for next in c.runnable() {
            match c.run(&actor, &next, None, &mut |_| {}) {
                Ok(_) => tracing::info!(request = %next, "unlearning request completed"),
                Err(e) => tracing::error!(request = %next, error = %e, "unlearning request failed"),
            }
        }
    });
    let body = json!({
        "id": id,
        "state": filed.state.name(),
        "documents": filed.request.documents.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        "status_url": format!("/v1/unlearn/{id}"),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn summary(s: &RequestStatus) -> Value {
    let (phase, error) = match &s.state {
        RunState::Running(p) => (Some(p.name()), None),
        RunState::Failed(e) => (None, Some(e.clone())),
        _ => (None, None),
    };
    json!({
        "id": s.request.id,
        "state": s.state.name(),
        "phase": phase,
        "error": error,
        "documents": s.request.documents.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        "requester": s.request.requester,
        "filed_by": s.request.filed_by,
        "filed_at": s.request.filed_at,
        "method": s.method,
        "attempts": s.attempts,
        "epoch": s.epoch,
    })
}

async fn status(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let c = compliance(&state).await?;
    let actor = Actor::Principal(principal);
    let (s, receipt) = tokio::task::spawn_blocking(move || {
        let s = c.status(&actor, &id)?;
        let receipt = match s.state {
            RunState::Completed => Some(c.receipt(&actor, &id)?),
            _ => None,
        };
        Ok::<_, lethe_compliance::Error>((s, receipt))
    })
    .await
    .map_err(AppError::internal)?
    .map_err(app_error)?;
    let mut body = summary(&s);
    if let (Some(r), Value::Object(m)) = (receipt, &mut body) {
        let file: Value = serde_json::from_str(&r.to_json()).map_err(AppError::internal)?;
        m.insert("receipt".into(), file);
    }
    Ok(Json(body))
}

async fn list(
    State(state): State<AppState>,
    Authed(principal): Authed,
) -> Result<Json<Value>, AppError> {
    let c = compliance(&state).await?;
    let actor = Actor::Principal(principal);
    let all = tokio::task::spawn_blocking(move || c.list(&actor))
        .await
        .map_err(AppError::internal)?
        .map_err(app_error)?;
    Ok(Json(
        json!({"requests": all.iter().map(summary).collect::<Vec<_>>()}),
    ))
}

async fn model(
    State(state): State<AppState>,
    Authed(_principal): Authed,
) -> Result<Json<Value>, AppError> {
    let c = compliance(&state).await?;
    let live = c.live();
    Ok(Json(json!({
        "epoch": live.epoch,
        "configured": state.engine.config().unlearning.model.is_some(),
        "version": live.version,
        "weights_sha256": live.weights_sha256,
        "suppressions": live.suppressions,
    })))
}

async fn public_key(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    let c = compliance(&state).await?;
    let key = c.public_key();
    Ok(Json(
        json!({"algorithm": "ed25519", "public_key": key.to_text(), "key_id": key.key_id()}),
    ))
}
