//! `lethe serve`: policy-checked LLM queries over HTTP.
//!
//! Apps send questions; lethe retrieves only what the caller may read,
//! generates an answer with the local model, computes the answer's label,
//! checks that the label may flow to the sink the answer is going to, and
//! either releases the answer with its label or refuses with a structured
//! reason (HTTP 403) that names labels and readers, never content.
//!
//! Routes (JSON; bearer API keys):
//!
//! * `POST /v1/query`: lethe's own API: `{query, sink?, k?, mode?,
//!   retrieval?, propagator?, max_tokens?}` → `{answer, label, sources,
//!   decision, audit_id}`.
//! * `POST /v1/chat/completions`, `GET /v1/models`: OpenAI-compatible, so a
//!   stock OpenAI client works; lethe's fields travel in a `lethe` extension
//!   object and in `x-lethe-*` headers; `stream: true` gives server-sent
//!   events.
//! * `POST /v1/documents`, `DELETE /v1/documents/{id}`: ingest and delete,
//!   for principals whose roles allow it.
//! * `POST /v1/admin/reload-policy` (admin role; SIGHUP does the same),
//!   `GET /healthz`, `GET /metrics` (Prometheus text).
//!
//! Model work never runs on the async runtime: requests become jobs in a
//! bounded queue served by worker threads (module `pool`). A full queue answers
//! 429 with `Retry-After`; a request past its deadline is cancelled (the
//! generation loop stops) and answered 504. Nothing crosses principals:
//! every request builds its own prompt and KV cache.
//!
//! **Architecture invariant:** this is the only crate that knows HTTP and
//! the wire JSON shapes; everything else goes through `lethe-engine`.

mod error;
mod metrics;
mod pool;
mod routes;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use lethe_engine::Engine;
use serde::Deserialize;

pub use error::AppError;
pub use metrics::Metrics;
pub use pool::ModelPool;

/// Daemon settings: the `[server]` table of `lethe.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (loopback by default).
    pub listen: SocketAddr,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Chunks retrieved when a request gives no `k`.
    pub default_k: usize,
    /// Largest `k` a request may ask for.
    pub max_k: usize,
    /// Seconds a query may take before it is cancelled (504).
    pub request_timeout_secs: u64,
    /// Jobs that may wait for a model worker before requests get 429.
    pub queue_capacity: usize,
    /// Model worker threads.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1 << 20,
            max_tokens_limit: 512,
            default_max_tokens: 128,
            default_k: 4,
            max_k: 32,
            request_timeout_secs: 120,
            queue_capacity: 16,
            workers: 1,
        }
    }
}

impl ServerConfig {
    /// Reads the `[server]` table (absent: defaults).
    pub fn from_table(table: Option<&toml::Value>) -> Result<ServerConfig, String> {
        match table {
            None => Ok(ServerConfig::default()),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| format!("[server]: {}", e.message())),
        }
    }
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The model job queue.
    pub pool: Arc<ModelPool>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub config: Arc<ServerConfig>,
}

impl AppState {
    /// Builds the state and starts the model workers.
    pub fn new(engine: Arc<Engine>, config: ServerConfig) -> AppState {
        let metrics = Arc::new(Metrics::new());
        let pool = Arc::new(ModelPool::start(
            config.workers.max(1),
            config.queue_capacity.max(1),
            metrics.clone(),
        ));
        AppState {
            engine,
            pool,
            metrics,
            config: Arc::new(config),
        }
    }
}

/// The router, with every route and layer; tests drive it in-process.
pub fn app(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    routes::router()
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting connections and
/// drains in-flight requests; queued model jobs finish before the workers stop.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "lethe daemon listening");
    let pool = state.pool.clone();
    let reload_state = state.clone();
    #[cfg(unix)]
    let reloader = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match reload_state
                .engine
                .reload_policy(&lethe_engine::Actor::Operator)
            {
                Ok(_) => tracing::info!("policy reloaded on SIGHUP"),
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed; the old policy stays in force")
                }
            }
        }
    });
    resume_unlearning(&state);
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    #[cfg(unix)]
    reloader.abort();
    pool.shutdown(Duration::from_secs(30));
    result
}

/// Finishes, in the background, any unlearning run a crash interrupted
/// (only when this data directory has an unlearning ledger: a daemon
/// without one never takes the workflow's lock).
fn resume_unlearning(state: &AppState) {
    let engine = state.engine.clone();
    let ledger = engine.config().data_dir.join("unlearning/ledger.log");
    if !ledger.is_file() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        let c = match lethe_compliance::Compliance::shared(&engine) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "unlearning ledger not opened; interrupted runs wait for the next run");
                return;
            }
        };
        match c.resume_interrupted(&mut |_| {}) {
            Ok(done) => {
                for r in done {
                    tracing::info!(request = %r.id, "interrupted unlearning run resumed and completed");
                }
            }
            Err(e) => tracing::error!(error = %e, "resuming an interrupted unlearning run failed"),
        }
    });
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}

#[cfg(test)]
mod tests;
