//! The service's Prometheus metrics and the middleware that records every
//! request (count by route, method and status; latency by route) in a span
//! that carries the route and, once authenticated, the organization.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use elaaoms_shared::telemetry::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tracing::Instrument;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub(crate) struct Metrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    search_stage: HistogramVec,
    init: HistogramVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "elaaoms_query_http_requests_total",
                "HTTP requests answered by the query service",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "elaaoms_query_http_request_duration_seconds",
                "Time to answer an HTTP request of the query service",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let search_stage = HistogramVec::new(
            HistogramOpts::new(
                "elaaoms_query_search_stage_seconds",
                "Time spent in each stage of a search: embed (the query) or database",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        let init = HistogramVec::new(
            HistogramOpts::new(
                "elaaoms_query_conversation_init_seconds",
                "Time to answer the ElevenLabs conversation-initiation webhook, by result \
                 (ok, timeout, error, unauthorized); timeout and error answered the defaults",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["result"],
        )
        .expect("valid metric");
        Self {
            init: register(registry, init),
            requests: register(registry, requests),
            latency: register(registry, latency),
            search_stage: register(registry, search_stage),
        }
    }

    pub fn observe_init(&self, result: &str, elapsed: Duration) {
        self.init
            .with_label_values(&[result])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_stage(&self, stage: &str, elapsed: Duration) {
        self.search_stage
            .with_label_values(&[stage])
            .observe(elapsed.as_secs_f64());
    }
}

/// Middleware: times the request and counts it by its route pattern (never
/// the raw path, which would hold caller ids and grow without bound).
pub(crate) async fn track(
    State(metrics): State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "request",
        method,
        route,
        organization_id = tracing::field::Empty,
        api_key_id = tracing::field::Empty,
    );
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();

    let status = response.status();
    metrics
        .requests
        .with_label_values(&[route.as_str(), method, status.as_str()])
        .inc();
    metrics
        .latency
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "answered"
        );
    });
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}
