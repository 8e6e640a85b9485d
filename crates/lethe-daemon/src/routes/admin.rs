//! Health, metrics and policy reload.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use lethe_engine::Actor;
use serde_json::{json, Value};

use super::Authed;
use crate::error::AppError;
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/reload-policy", post(reload))
}

async fn healthz(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ok", "queued": state.pool.queued()}))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn reload(
    State(state): State<AppState>,
    Authed(principal): Authed,
) -> Result<Json<Value>, AppError> {
    let policy = state.engine.reload_policy(&Actor::Principal(principal))?;
    Ok(Json(json!({
        "reloaded": true,
        "principals": policy.principals().len(),
        "labels": policy.labels().len(),
        "sinks": policy.sinks().len(),
    })))
}
