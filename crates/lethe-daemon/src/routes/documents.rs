//! `POST /v1/documents` and `DELETE /v1/documents/{id}`.

use axum::extract::{Path, State};
use axum::routing::{delete, post};
use axum::{Json, Router};
use lethe_engine::Actor;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Authed;
use crate::error::{AppError, AppJson};
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/documents", post(ingest))
        .route("/v1/documents/{id}", delete(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestRequest {
    documents: Vec<Value>,
    #[serde(default)]
    replace: bool,
}

const MAX_DOCUMENTS: usize = 1000;

async fn ingest(
    State(state): State<AppState>,
    Authed(principal): Authed,
    AppJson(req): AppJson<IngestRequest>,
) -> Result<Json<Value>, AppError> {
    if req.documents.is_empty() {
        return Err(AppError::bad_request("documents: empty list"));
    }
    if req.documents.len() > MAX_DOCUMENTS {
        return Err(AppError::bad_request(format!(
            "at most {MAX_DOCUMENTS} documents per request"
        )));
    }
    let mut docs = Vec::with_capacity(req.documents.len());
    let mut problems = Vec::new();
    for (i, v) in req.documents.into_iter().enumerate() {
        match lethe_engine::document_from_json(v, &format!("documents[{i}]")) {
            Ok(d) => docs.push(d),
            Err(e) => problems.push(e),
        }
    }
    if !problems.is_empty() {
        return Err(AppError::bad_request(problems.join("\n")));
    }
    let engine = state.engine.clone();
    let actor = Actor::Principal(principal);
    let report = tokio::task::spawn_blocking(move || engine.ingest(&actor, docs, req.replace))
        .await
        .map_err(AppError::internal)??;
    Ok(Json(json!({
        "ingested": report.documents,
        "chunks": report.chunks,
        "replaced": report.replaced,
    })))
}

async fn remove(
    State(state): State<AppState>,
    Authed(principal): Authed,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let engine = state.engine.clone();
    let actor = Actor::Principal(principal);
    let report = tokio::task::spawn_blocking(move || engine.delete(&actor, &[id.as_str()]))
        .await
        .map_err(AppError::internal)??;
    Ok(Json(json!({
        "deleted": report.removed.iter().map(|r| json!({"id": r.id, "chunks": r.chunks})).collect::<Vec<_>>(),
    })))
}
