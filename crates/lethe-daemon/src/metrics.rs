//! Prometheus metrics: requests by route and status, latency histograms,
//! refusals, model time, queue depth.

use std::sync::atomic::AtomicI64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: String,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Family<RouteLabel, Histogram>,
    refusals: Family<SinkLabel, Counter>,
    model_seconds: Histogram,
    /// Jobs waiting for a model worker.
    pub queue_depth: Gauge<i64, AtomicI64>,
    /// Jobs running on model workers.
    pub in_flight_jobs: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lethe");
        let requests = Family::<RouteStatus, Counter>::default();
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        let refusals = Family::<SinkLabel, Counter>::default();
        let model_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        let in_flight_jobs = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        registry.register(
            "refusals",
            "Answers refused by the flow check, by sink",
            refusals.clone(),
        );
        registry.register(
            "model_seconds",
            "Seconds spent in the model per query",
            model_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Model jobs waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "model_jobs_in_flight",
            "Model jobs running",
            in_flight_jobs.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            refusals,
            model_seconds,
            queue_depth,
            in_flight_jobs,
        }
    }

    /// Counts a refused answer.
    pub fn refused(&self, sink: &str) {
        self.refusals
            .get_or_create(&SinkLabel {
                sink: sink.to_string(),
            })
            .inc();
    }

    /// Records model time of one query.
    pub fn model_time(&self, secs: f64) {
        self.model_seconds.observe(secs);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Middleware: counts each request by matched route and status and times it.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let start = Instant::now();
    let response = next.run(req).await;
    let m = &state.metrics;
    m.requests
        .get_or_create(&RouteStatus {
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    m.latency
        .get_or_create(&RouteLabel { route })
        .observe(start.elapsed().as_secs_f64());
    response
}
