//! Logs, traces, metrics and the health endpoints every service mounts.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use prometheus::{Encoder, Registry, TextEncoder};
use sqlx::PgPool;
use tokio::runtime::RuntimeFlavor;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::bus::Bus;
use crate::config::{LogFormat, TelemetryConfig};

/// How long a flush or the shutdown at exit may wait for the collector.
const EXPORT_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT `{endpoint}` is not an http(s) URL")]
    Endpoint { endpoint: String },
    #[error("the OTLP exporter needs a multi-threaded Tokio runtime (it exports from a task)")]
    NoRuntime,
    #[error("cannot build the OTLP exporter's HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP export: {0}")]
    Export(String),
}

/// Spans exported over OTLP/HTTP (protobuf) in batches from a Tokio task.
/// Cheap to clone; the provider is shared.
#[derive(Clone, Debug)]
pub struct OtlpPipeline {
    provider: SdkTracerProvider,
}

impl OtlpPipeline {
    /// The pipeline `config` asks for: `None` without an
    /// OTEL_EXPORTER_OTLP_ENDPOINT. `service` is the `service.name` unless
    /// OTEL_SERVICE_NAME says otherwise. Needs a multi-threaded Tokio
    /// runtime: the batches are sent from a task on it, and [`flush`]
    /// waits for that task.
    ///
    /// [`flush`]: OtlpPipeline::flush
    pub fn from_config(
        config: &TelemetryConfig,
        service: &str,
    ) -> Result<Option<Self>, TelemetryError> {
        let Some(endpoint) = config
            .otel_exporter_otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
        else {
            return Ok(None);
        };
        let traces_url = traces_url(endpoint)?;
        // On a current-thread runtime the SDK's shutdown, which also runs
        // when the last handle of the provider is dropped, would wait
        // forever for a task that cannot run.
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
        if !multi_threaded {
            return Err(TelemetryError::NoRuntime);
        }
        // The exporter's client is built here, not by the exporter, so that
        // it has the same TLS setup as every other client of ours (ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(EXPORT_DEADLINE)
            .build()
            .map_err(TelemetryError::HttpClient)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url)
            .with_timeout(EXPORT_DEADLINE)
            .build()?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        let service = config.otel_service_name.as_deref().unwrap_or(service);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            // New traces by the ratio; continued ones as their sender
            // decided, so a trace is exported whole or not at all.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.otel_traces_sampler_arg,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        Ok(Some(Self { provider }))
    }

    /// The tracing layer that turns spans into exported spans.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("elaaoms"))
    }

    /// Sends the finished spans now, waiting at most [`EXPORT_DEADLINE`].
    pub fn flush(&self) -> Result<(), TelemetryError> {
        let provider = self.provider.clone();
        within_deadline(move || provider.force_flush())
    }

    /// Sends the finished spans and stops exporting.
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        let provider = self.provider.clone();
        within_deadline(move || provider.shutdown())
    }
}

/// The SDK's flush and shutdown block their thread until the export task
/// on the runtime answers, with no deadline of their own: they run on a
/// thread of their own and are waited for at most [`EXPORT_DEADLINE`]. On a
/// worker of a multi-threaded runtime the wait is announced to Tokio, which
/// moves the worker's other tasks (the export task among them) elsewhere.
fn within_deadline(
    work: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
) -> Result<(), TelemetryError> {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    let wait = || result.recv_timeout(EXPORT_DEADLINE);
    let answer = match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    match answer {
        Ok(outcome) => outcome.map_err(|err| TelemetryError::Export(err.to_string())),
        Err(_) => Err(TelemetryError::Export(format!(
            "no answer within {EXPORT_DEADLINE:?}"
        ))),
    }
}

/// OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; traces go to
/// `/v1/traces` under it (the OTLP/HTTP convention).
fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let invalid = || TelemetryError::Endpoint {
        endpoint: endpoint.to_owned(),
    };
    let url = url::Url::parse(endpoint).map_err(|_| invalid())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid());
    }
    Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

/// What [`init_tracing`] installed; keep it until the process exits: when
/// dropped, it sends the spans still buffered.
#[must_use = "dropping the guard stops the trace exporter"]
pub struct TelemetryGuard {
    otlp: Option<OtlpPipeline>,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn is_exporting(&self) -> bool {
        self.otlp.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(otlp) = self.otlp.take() {
            if let Err(err) = otlp.shutdown() {
                tracing::warn!(error = %err, "spans may be lost at exit");
            }
        }
    }
}

/// Installs the global tracing subscriber: JSON lines in production, pretty
/// in a terminal, plus the OTLP exporter when OTEL_EXPORTER_OTLP_ENDPOINT
/// is set (`service` is the default `service.name`). A second call (tests,
/// `elaaoms run`) installs nothing and returns a guard without exporter.
pub fn init_tracing(
    config: &TelemetryConfig,
    service: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    let otlp = OtlpPipeline::from_config(config, service)?;
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otlp.as_ref().map(OtlpPipeline::layer))
        .try_init()
        .is_ok();
    let otlp = match otlp {
        // Another subscriber was there first: this one's exporter has no
        // spans to send.
        Some(otlp) if !installed => {
            let _ = otlp.shutdown();
            None
        }
        otlp => otlp,
    };
    if otlp.is_some() {
        tracing::info!(
            endpoint = config.otel_exporter_otlp_endpoint.as_deref(),
            sampled = config.otel_traces_sampler_arg,
            "exporting traces over OTLP"
        );
    }
    Ok(TelemetryGuard { otlp })
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
