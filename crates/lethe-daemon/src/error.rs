//! One error type for every handler, rendered as JSON in the OpenAI error
//! shape `{"error": {"message", "type", "code"}}` with the right status.
//!
//! Internal failures send a generic message to the client and log the real
//! one: details of the store or the model are not the client's business, and
//! may carry things it must not see.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

/// An error answered to the client.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    extra: Option<serde_json::Value>,
    retry_after: Option<u64>,
}

impl AppError {
    /// An error with a status, an error type and a message for the client.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> AppError {
        AppError {
            status,
            kind,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> AppError {
        AppError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> AppError {
        AppError::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    /// 403 for a permission the caller lacks.
    pub fn forbidden(message: impl Into<String>) -> AppError {
        AppError::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    /// 429 or 503 with `Retry-After`.
    pub fn busy(status: StatusCode, message: impl Into<String>, retry_after: u64) -> AppError {
        AppError {
            retry_after: Some(retry_after),
            ..AppError::new(status, "overloaded_error", message)
        }
    }

    /// 500 with a generic message; the detail is logged, not sent.
    pub fn internal(detail: impl std::fmt::Display) -> AppError {
        tracing::error!(error = %detail, "internal error");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error",
        )
    }

    /// Adds structured fields to the error object.
    pub fn with_extra(mut self, extra: serde_json::Value) -> AppError {
        self.extra = Some(extra);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.status.as_u16(),
        });
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.extra, error.as_object_mut())
        {
            for (k, v) in extra {
                obj.insert(k, v);
            }
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<lethe_engine::Error> for AppError {
    fn from(e: lethe_engine::Error) -> AppError {
        use lethe_engine::Error as E;
        match e {
            E::Forbidden(m) => AppError::forbidden(m),
            E::BadRequest(m) => AppError::bad_request(m),
            E::NotFound(m) => AppError::new(StatusCode::NOT_FOUND, "not_found_error", m),
            E::Cancelled => AppError::new(
                StatusCode::REQUEST_TIMEOUT,
                "cancelled",
                "request cancelled",
            ),
            E::Store(lethe_engine::StoreError::DuplicateId(m)) => AppError::new(
                StatusCode::CONFLICT,
                "conflict_error",
                format!("duplicate document id: {m}"),
            ),
            E::Store(lethe_engine::StoreError::InvalidInput(m)) => AppError::bad_request(m),
            E::Keys(_) => AppError::unauthorized("invalid API key"),
            other => AppError::internal(other),
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(r: JsonRejection) -> AppError {
        let (kind, message) = match &r {
            JsonRejection::JsonSyntaxError(_) => (
                "invalid_request_error",
                format!("malformed JSON: {}", r.body_text()),
            ),
            JsonRejection::JsonDataError(_) => ("invalid_request_error", r.body_text()),
            JsonRejection::MissingJsonContentType(_) => (
                "invalid_request_error",
                "expected a JSON body with `content-type: application/json`".to_string(),
            ),
            _ if r.status() == StatusCode::PAYLOAD_TOO_LARGE => (
                "invalid_request_error",
                "request body too large".to_string(),
            ),
            _ => ("invalid_request_error", r.body_text()),
        };
        AppError::new(r.status(), kind, message)
    }
}

/// `Json` whose rejections are [`AppError`]s, so bad bodies get our JSON shape.
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(AppJson(v))
    }
}
