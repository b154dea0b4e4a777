//! ingest: receives ElevenLabs' post-call webhooks, verifies them, makes
//! them durable and announces transcripts on JetStream (DESIGN.md sections 4
//! and 7). ElevenLabs does not retry by default, so a webhook is answered
//! 200 only once it is durable: payload file, then one transaction with the
//! conversation and its outbox row. Publishing follows; if JetStream is
//! down the answer is still 200 and the outbox relay publishes later.

mod outbox;
mod persist;
pub mod signature;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use elaaoms_shared::bus::{Bus, BusError};
use elaaoms_shared::config::{parse_duration, BusConfig, DatabaseConfig, PayloadStoreConfig};
use elaaoms_shared::db::{self, DbError};
use elaaoms_shared::http::ApiError;
use elaaoms_shared::payload_store::{PayloadKind, PayloadStore};
use elaaoms_shared::telemetry::{self, Health};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use signature::{verify_signature, SignatureError, SignatureHeader};
use webhook::{parse_webhook, Webhook, WebhookError};

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub payloads: PayloadStoreConfig,
    #[command(flatten)]
    pub settings: IngestSettings,
}

/// What only ingest needs (the shared sections are configured once when
/// `elaaoms run` starts every service).
#[derive(clap::Args, Debug, Clone)]
pub struct IngestSettings {
    /// Where the webhook endpoint listens.
    #[arg(id = "ingest_addr", long = "ingest-addr", env = "INGEST_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Signatures older than this are refused (ElevenLabs' SDKs use 30m).
    #[arg(long, env = "WEBHOOK_SIGNATURE_TOLERANCE", default_value = "30m", value_parser = parse_duration)]
    pub signature_tolerance: Duration,
    /// Largest webhook body accepted (audio webhooks carry base64 MP3).
    #[arg(long, env = "WEBHOOK_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// How often the outbox relay looks for events the request path could
    /// not publish.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub outbox_relay_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest cannot reach Postgres: {0}")]
    Database(#[from] DbError),
    #[error("ingest cannot reach NATS: {0}")]
    Bus(#[from] BusError),
    #[error("ingest cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

/// Signatures this old are still valid but suspicious: ElevenLabs sends at
/// once, so a delay this long means a retry storm or a replay attempt.
const STALE_SIGNATURE_SECS: i64 = 25 * 60;

struct Metrics {
    webhooks: IntCounterVec,
    stale_signatures: IntCounter,
    publish_deferred: IntCounter,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        Self {
            webhooks: telemetry::register(
                registry,
                IntCounterVec::new(
                    Opts::new("elaaoms_ingest_webhooks_total", "Webhooks received, by type and outcome"),
                    &["type", "outcome"],
                )
                .expect("valid metric"),
            ),
            stale_signatures: telemetry::register(
                registry,
                IntCounter::new(
                    "elaaoms_ingest_stale_signatures_total",
                    "Valid signatures older than 25 minutes",
                )
                .expect("valid metric"),
            ),
            publish_deferred: telemetry::register(
                registry,
                IntCounter::new(
                    "elaaoms_ingest_publish_deferred_total",
                    "Events left to the outbox relay because JetStream did not answer",
                )
                .expect("valid metric"),
            ),
        }
    }
}

struct AppState {
    pool: PgPool,
    bus: Bus,
    payloads: PayloadStore,
    signature_tolerance_secs: i64,
    metrics: Metrics,
}

pub struct IngestService {
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    relay_interval: Duration,
}

impl IngestService {
    /// Connects to Postgres and NATS, makes sure the streams exist, binds.
    pub async fn build(config: Config) -> Result<Self, IngestError> {
        let pool = db::connect_service_pool(&config.database.database_url, config.database.database_max_connections).await?;
        let bus = Bus::connect(&config.bus).await?;
        bus.ensure_streams().await?;
        let registry = Registry::new();
        let state = Arc::new(AppState {
            pool: pool.clone(),
            bus: bus.clone(),
            payloads: PayloadStore::local(&config.payloads.payload_dir),
            signature_tolerance_secs: config.settings.signature_tolerance.as_secs() as i64,
            metrics: Metrics::new(&registry),
        });
        let router = Router::new()
            .route("/v1/webhooks/elevenlabs/{org}", post(receive_webhook))
            .layer(DefaultBodyLimit::max(config.settings.max_body_bytes))
            .with_state(state.clone())
            .merge(telemetry::health_router(Health {
                service: "ingest",
                registry,
                database: Some(pool),
                bus: Some(bus),
            }));
        let listener = elaaoms_shared::http::bind(config.settings.addr).await?;
        Ok(Self {
            listener,
            router,
            state,
            relay_interval: config.settings.outbox_relay_interval,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves webhooks and runs the outbox relay until `shutdown`; requests
    /// in progress finish first.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        tracing::info!(addr = %self.local_addr(), "ingest listening");
        let relay = tokio::spawn(outbox::run_relay(
            self.state.pool.clone(),
            self.state.bus.clone(),
            self.relay_interval,
            shutdown.clone(),
        ));
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await;
        shutdown.cancel();
        let _ = relay.await;
        tracing::info!("ingest stopped");
        Ok(served?)
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `POST /v1/webhooks/elevenlabs/{org}`.
async fn receive_webhook(
    State(state): State<Arc<AppState>>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let header = headers.get("elevenlabs-signature").and_then(|value| value.to_str().ok());
    // Format problems first: they say nothing about which organizations exist.
    SignatureHeader::parse(header.ok_or_else(|| signature_rejected(SignatureError::Missing))?)
        .map_err(signature_rejected)?;
    let organization_id = authenticate(&state, &slug, header, &body).await?;

    let webhook = parse_webhook(&body).map_err(|err| {
        state.metrics.webhooks.with_label_values(&["unknown", "rejected"]).inc();
        match err {
            WebhookError::Invalid(invalid) => ApiError::from(invalid),
            other => ApiError::bad_request(other.to_string()),
        }
    })?;
    let (kind, conversation_id) = match &webhook {
        Webhook::Transcription(t) => ("post_call_transcription", t.conversation_id.clone()),
        Webhook::Audio(a) => ("post_call_audio", a.conversation_id.clone()),
        Webhook::InitiationFailure(f) => ("call_initiation_failure", f.conversation_id.clone()),
    };
    let span = tracing::info_span!("webhook", kind, conversation_id = conversation_id.as_str(), %organization_id);
    let _entered = span.enter();

    let stored = match webhook {
        Webhook::Transcription(transcription) => {
            store_payload(&state, conversation_id.as_str(), PayloadKind::Transcription, body.to_vec()).await?;
            let pending = persist::record_transcription(&state.pool, &state.bus, organization_id, &transcription)
                .await
                .map_err(|err| ApiError::unavailable("cannot record transcription", &err))?;
            if let Some(pending) = pending {
                if let Err(err) = outbox::publish_one(&state.pool, &state.bus, organization_id, &pending).await {
                    state.metrics.publish_deferred.inc();
                    tracing::warn!(error = %err, "JetStream did not take the event; the outbox relay will publish it");
                }
            }
            "transcription"
        }
        Webhook::Audio(audio) => {
            store_payload(&state, conversation_id.as_str(), PayloadKind::Audio, audio.mp3).await?;
            "audio"
        }
        Webhook::InitiationFailure(failure) => {
            store_payload(&state, conversation_id.as_str(), PayloadKind::Failure, body.to_vec()).await?;
            persist::record_initiation_failure(&state.pool, organization_id, &failure)
                .await
                .map_err(|err| ApiError::unavailable("cannot record call-initiation failure", &err))?;
            "failure"
        }
    };
    state.metrics.webhooks.with_label_values(&[kind, "accepted"]).inc();
    tracing::info!(stored, "webhook accepted");
    Ok(Json(serde_json::json!({
        "status": "accepted",
        "conversation_id": conversation_id.as_str(),
    })))
}

fn signature_rejected(err: SignatureError) -> ApiError {
    ApiError::unauthorized(err.to_string())
}

/// Finds the organization's secrets and checks the signature. An unknown
/// organization is answered exactly like a wrong signature.
async fn authenticate(state: &AppState, slug: &str, header: Option<&str>, body: &[u8]) -> Result<Uuid, ApiError> {
    let secrets: Option<(Uuid, String, Option<String>)> =
        sqlx::query_as("SELECT organization_id, hmac_secret, hmac_secret_previous FROM auth_webhook_secrets($1)")
            .bind(slug)
            .fetch_optional(&state.pool)
            .await
            .map_err(|err| ApiError::unavailable("cannot look up webhook secrets", &err))?;
    let Some((organization_id, current, previous)) = secrets else {
        return Err(signature_rejected(SignatureError::Mismatch));
    };
    let mut accepted = vec![current.as_str()];
    accepted.extend(previous.as_deref());
    let verified = verify_signature(header, body, &accepted, now_unix(), state.signature_tolerance_secs)
        .map_err(signature_rejected)?;
    if verified.age_secs > STALE_SIGNATURE_SECS {
        state.metrics.stale_signatures.inc();
    }
    Ok(organization_id)
}

async fn store_payload(state: &AppState, conversation_id: &str, kind: PayloadKind, bytes: Vec<u8>) -> Result<(), ApiError> {
    state
        .payloads
        .put(conversation_id, kind, bytes)
        .await
        .map(|_| ())
        .map_err(|err| ApiError::unavailable("cannot store the payload", &err))
}
