//! Logs, metrics and the health endpoints every service mounts.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use sqlx::PgPool;
use tracing_subscriber::EnvFilter;

use crate::bus::Bus;
use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global tracing subscriber: JSON lines in production, pretty
/// in a terminal. A second call (tests, `elaaoms run`) is a no-op.
pub fn init_tracing(config: &TelemetryConfig) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// What `/readyz` checks: the dependencies the service cannot work without.
#[derive(Clone)]
pub struct Health {
    pub service: &'static str,
    pub registry: Registry,
    pub database: Option<PgPool>,
    pub bus: Option<Bus>,
}

/// `/healthz` (the process answers), `/readyz` (its dependencies answer) and
/// `/metrics` (Prometheus text format).
pub fn health_router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(health))
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok", "service": health.service }))
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Some(pool) = &health.database {
        if let Err(err) = crate::db::ping(pool).await {
            tracing::warn!(error = %err, "readiness: database unreachable");
            problems.push("database");
        }
    }
    if let Some(bus) = &health.bus {
        if !bus.is_connected() {
            problems.push("nats");
        }
    }
    if problems.is_empty() {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "failing": problems })),
        )
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&health.registry.gather(), &mut buffer) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            buffer,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Registers a metric, panicking on a programming error (a duplicate name).
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique per registry");
    metric
}
