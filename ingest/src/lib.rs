//! ingest: receives ElevenLabs' post-call webhooks, verifies them, makes
//! them durable and announces transcripts on JetStream (DESIGN.md sections 4
//! and 7). ElevenLabs does not retry by default, so a webhook is answered
//! 200 only once it is durable: payload file, then one transaction with the
//! conversation and its outbox row. Publishing follows; if JetStream is
//! down the answer is still 200 and the outbox relay publishes later.

pub mod backfill;
pub mod outbox;
pub mod persist;
pub mod signature;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use elaaoms_shared::bus::{Bus, BusError};
use elaaoms_shared::config::{parse_duration, BusConfig, DatabaseConfig, PayloadStoreConfig};
use elaaoms_shared::db::{self, DbError};
use elaaoms_shared::domain::{ConversationId, ConversationStatus};
use elaaoms_shared::http::ApiError;
use elaaoms_shared::payload_store::{PayloadKind, PayloadStore, PayloadStoreError};
use elaaoms_shared::telemetry::{self, Health};
use elaaoms_shared::trace::{link_span, TraceParent, TRACEPARENT_HEADER};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use signature::{verify_signature, SignatureError, SignatureHeader};
use webhook::{parse_webhook_with, ParseOptions, Webhook, WebhookError};

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

/// 64 MiB: the base64 audio of a 30-minute call at 128 kbps is about 38 MB
/// (at ElevenLabs' 16 kbps telephone quality, about 5 MB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

/// What only ingest needs (the shared sections are configured once when
/// `elaaoms run` starts every service).
#[derive(clap::Args, Debug, Clone)]
pub struct IngestSettings {
    /// Where the webhook endpoint listens.
    #[arg(
        id = "ingest_addr",
        long = "ingest-addr",
        env = "INGEST_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub addr: SocketAddr,
    /// Signatures older than this are refused (ElevenLabs' SDKs use 30m).
    #[arg(long, env = "WEBHOOK_SIGNATURE_TOLERANCE", default_value = "30m", value_parser = parse_duration)]
    pub signature_tolerance: Duration,
    /// Largest webhook body accepted (audio webhooks carry base64 MP3; the
    /// default fits a 30-minute call at 128 kbps). Larger bodies get 413.
    #[arg(long, env = "WEBHOOK_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// How often the outbox relay looks for events the request path could
    /// not publish.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub outbox_relay_interval: Duration,
    /// Outbox rows younger than this are left to the request that wrote them.
    #[arg(id = "outbox_relay_grace", long = "outbox-relay-grace", env = "OUTBOX_RELAY_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub outbox_relay_grace: Duration,
    /// A conversation in extraction_pending for longer than this is counted
    /// by the gauge `elaaoms_conversations_extraction_pending_stuck` (the
    /// relay measures it each pass; the retry schedule ends well before).
    #[arg(id = "extraction_stuck_after", long = "extraction-stuck-after", env = "EXTRACTION_STUCK_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub extraction_stuck_after: Duration,
    /// How long a webhook request waits for JetStream's PubAck before it
    /// answers 200 anyway and leaves the event to the outbox relay.
    #[arg(id = "webhook_publish_deadline", long = "webhook-publish-deadline", env = "WEBHOOK_PUBLISH_DEADLINE", default_value = "2s", value_parser = parse_duration)]
    pub publish_deadline: Duration,
    /// Dynamic variable naming the caller of a web call (no phone number);
    /// ElevenLabs' `user_id` is the fallback. Without either the transcript
    /// is stored but not extracted.
    #[arg(id = "web_caller_id_variable", long = "web-caller-id-variable", env = "WEB_CALLER_ID_VARIABLE", default_value = webhook::DEFAULT_WEB_CALLER_VARIABLE)]
    pub web_caller_id_variable: String,
}

impl Default for IngestSettings {
    /// The same values as the command line's defaults (a test checks).
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            signature_tolerance: Duration::from_secs(30 * 60),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            outbox_relay_interval: Duration::from_secs(5),
            outbox_relay_grace: Duration::from_secs(10),
            extraction_stuck_after: Duration::from_secs(3600),
            publish_deadline: Duration::from_secs(2),
            web_caller_id_variable: webhook::DEFAULT_WEB_CALLER_VARIABLE.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest cannot reach Postgres: {0}")]
    Database(#[from] DbError),
    #[error("ingest cannot reach NATS: {0}")]
    Bus(#[from] BusError),
    #[error("ingest cannot listen: {0}")]
    Listen(#[from] std::io::Error),
    #[error("ingest payload store: {0}")]
    PayloadStore(#[from] PayloadStoreError),
}

/// Signatures this old are still valid but suspicious: ElevenLabs sends at
/// once, so a delay this long means a retry storm or a replay attempt.
const STALE_SIGNATURE_SECS: i64 = 25 * 60;

struct Metrics {
    webhooks: IntCounterVec,
    signature_failures: IntCounterVec,
    stale_signatures: IntCounter,
    publish_deferred: IntCounter,
    publish_seconds: HistogramVec,
    backlog: outbox::BacklogGauges,
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
            signature_failures: telemetry::register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "elaaoms_ingest_signature_failures_total",
                        "Webhooks refused at authentication, by reason (an unknown organization counts as mismatch)",
                    ),
                    &["reason"],
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
            publish_seconds: telemetry::register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "elaaoms_ingest_publish_seconds",
                        "Time from publish to JetStream's PubAck, by path (request or relay)",
                    )
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                    &["path"],
                )
                .expect("valid metric"),
            ),
            backlog: outbox::BacklogGauges::register(registry),
        }
    }

    fn signature_failure(&self, err: &SignatureError) {
        let reason = match err {
            SignatureError::Missing => "missing",
            SignatureError::Malformed => "malformed",
            SignatureError::Expired => "expired",
            SignatureError::FromTheFuture => "future",
            SignatureError::Mismatch => "mismatch",
        };
        self.signature_failures.with_label_values(&[reason]).inc();
    }
}

struct AppState {
    pool: PgPool,
    bus: Bus,
    payloads: PayloadStore,
    signature_tolerance_secs: i64,
    publish_deadline: Duration,
    parse_options: ParseOptions,
    metrics: Metrics,
}

pub struct IngestService {
    listener: TcpListener,
    router: Router,
    state: Arc<AppState>,
    relay: outbox::RelaySettings,
}

impl IngestService {
    /// Connects to Postgres and NATS, makes sure the streams exist, binds.
    pub async fn build(config: Config) -> Result<Self, IngestError> {
        let pool = db::connect_service_pool(
            &config.database.database_url,
            config.database.database_max_connections,
        )
        .await?;
        let bus = Bus::connect(&config.bus).await?;
        bus.ensure_streams().await?;
        let registry = Registry::new();
        let settings = config.settings;
        let state = Arc::new(AppState {
            pool: pool.clone(),
            bus: bus.clone(),
            payloads: PayloadStore::from_config(&config.payloads).await?,
            signature_tolerance_secs: settings.signature_tolerance.as_secs() as i64,
            publish_deadline: settings.publish_deadline,
            parse_options: ParseOptions {
                web_caller_variable: settings.web_caller_id_variable.clone(),
            },
            metrics: Metrics::new(&registry),
        });
        let router = Router::new()
            .route("/v1/webhooks/elevenlabs/{org}", post(receive_webhook))
            .layer(DefaultBodyLimit::max(settings.max_body_bytes))
            .with_state(state.clone())
            .merge(telemetry::health_router(Health {
                service: "ingest",
                registry,
                database: Some(pool),
                bus: Some(bus),
            }));
        let listener = elaaoms_shared::http::bind(settings.addr).await?;
        Ok(Self {
            listener,
            router,
            state,
            relay: outbox::RelaySettings {
                interval: settings.outbox_relay_interval,
                grace: settings.outbox_relay_grace,
                extraction_stuck_after: settings.extraction_stuck_after,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves webhooks and runs the outbox relay until `shutdown`; requests
    /// in progress finish first.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        tracing::info!(addr = %self.local_addr(), "ingest listening");
        let relay = tokio::spawn(outbox::run_relay(
            self.state.pool.clone(),
            self.state.bus.clone(),
            self.relay,
            self.state
                .metrics
                .publish_seconds
                .with_label_values(&["relay"]),
            self.state.metrics.backlog.clone(),
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

/// A handled webhook: the metric outcome and the JSON answer.
struct Accepted {
    outcome: &'static str,
    body: serde_json::Value,
}

/// `POST /v1/webhooks/elevenlabs/{org}`. Every answer is counted by type
/// and outcome (`rejected` for 4xx, `failed` for 5xx).
async fn receive_webhook(
    State(state): State<Arc<AppState>>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut kind = "unknown";
    let result = handle_webhook(&state, &slug, &headers, body, &mut kind).await;
    let outcome = match &result {
        Ok(accepted) => accepted.outcome,
        Err(err) if err.status.is_client_error() => "rejected",
        Err(_) => "failed",
    };
    state
        .metrics
        .webhooks
        .with_label_values(&[kind, outcome])
        .inc();
    match result {
        Ok(accepted) => Json(accepted.body).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn handle_webhook(
    state: &AppState,
    slug: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: &mut &'static str,
) -> Result<Accepted, ApiError> {
    let header = headers
        .get("elevenlabs-signature")
        .and_then(|value| value.to_str().ok());
    // Format problems first: they say nothing about which organizations exist.
    let parsed = match header {
        None if headers.contains_key("elevenlabs-signature") => Err(SignatureError::Malformed),
        None => Err(SignatureError::Missing),
        Some(value) => SignatureHeader::parse(value).map(|_| ()),
    };
    if let Err(err) = parsed {
        state.metrics.signature_failure(&err);
        return Err(signature_rejected(err));
    }
    let body = body.map_err(body_rejected)?;
    let organization_id = authenticate(state, slug, header, &body).await?;

    let webhook = parse_webhook_with(&body, &state.parse_options).map_err(|err| match err {
        WebhookError::Invalid(invalid) => ApiError::from(invalid),
        other => ApiError::bad_request(other.to_string()),
    })?;
    *kind = webhook.kind();
    let conversation_id = webhook.conversation_id().clone();
    // One trace per webhook, continued from the sender's `traceparent`
    // when it sends a valid one (in the OTLP exporter too, when it is on);
    // the transcript's event carries it on.
    let span = tracing::info_span!(
        "webhook",
        kind = *kind,
        conversation_id = conversation_id.as_str(),
        %organization_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty
    );
    let trace = link_span(
        &span,
        headers
            .get(TRACEPARENT_HEADER)
            .and_then(|value| value.to_str().ok()),
    );
    // Instrumented, not entered: the span must not leak into other tasks
    // polled on this thread while the webhook awaits.
    record_webhook(
        state,
        organization_id,
        webhook,
        conversation_id,
        body,
        trace,
    )
    .instrument(span)
    .await
}

/// Stores the payload and records the webhook, by type.
async fn record_webhook(
    state: &AppState,
    organization_id: Uuid,
    webhook: Webhook,
    conversation_id: ConversationId,
    body: Bytes,
    trace: TraceParent,
) -> Result<Accepted, ApiError> {
    let (outcome, extraction) = match webhook {
        Webhook::Transcription(transcription) => {
            if let Some(caller_id) = transcription.caller_id.as_ref() {
                if caller_erased_since(
                    state,
                    organization_id,
                    caller_id.as_str(),
                    transcription.started_at,
                )
                .await?
                {
                    // A late delivery of a call from before the caller's
                    // erasure: keep nothing of it.
                    tracing::info!(
                        "transcript of an erased caller's earlier call: acknowledged, not stored"
                    );
                    return Ok(Accepted {
                        outcome: "erased",
                        body: serde_json::json!({
                            "status": "accepted",
                            "conversation_id": conversation_id.as_str(),
                            "extraction": "caller_erased",
                        }),
                    });
                }
            }
            let payload_key = store_payload(
                state,
                conversation_id.as_str(),
                PayloadKind::Transcription,
                // Shares the request's buffer: no copy of the body.
                body.clone(),
            )
            .await?;
            let Some(caller_id) = transcription.caller_id.as_ref() else {
                tracing::warn!(
                    web_caller_variable = state.parse_options.web_caller_variable.as_str(),
                    "transcript stored but not extracted: no phone number, no system__caller_id and no web caller variable or user_id"
                );
                return Ok(Accepted {
                    outcome: "stored_without_caller",
                    body: serde_json::json!({
                        "status": "accepted",
                        "conversation_id": conversation_id.as_str(),
                        "extraction": "skipped_no_caller",
                    }),
                });
            };
            let recorded = persist::record_transcription(
                &state.pool,
                &state.bus,
                organization_id,
                &transcription,
                caller_id,
                &payload_key,
                &trace,
            )
            .await
            .map_err(|err| ApiError::unavailable("cannot record transcription", &err))?;
            if recorded.by_reference {
                tracing::info!("transcript too large for an event: it travels by reference to its payload file");
            }
            if let Some(pending) = &recorded.pending {
                publish_now(state, organization_id, pending).await;
            }
            match (recorded.new_conversation, recorded.status) {
                (true, _) => ("accepted", "queued"),
                (false, ConversationStatus::ExtractionPending) => ("duplicate", "queued"),
                (false, status) => {
                    tracing::info!(%status, "transcript for a conversation past extraction: acknowledged, not extracted again");
                    ("duplicate", "not_repeated")
                }
            }
        }
        Webhook::Audio(audio) => {
            store_payload(
                state,
                conversation_id.as_str(),
                PayloadKind::Audio,
                Bytes::from(audio.mp3),
            )
            .await?;
            ("accepted", "none")
        }
        Webhook::InitiationFailure(failure) => {
            store_payload(
                state,
                conversation_id.as_str(),
                PayloadKind::Failure,
                body.clone(),
            )
            .await?;
            persist::record_initiation_failure(&state.pool, organization_id, &failure)
                .await
                .map_err(|err| {
                    ApiError::unavailable("cannot record call-initiation failure", &err)
                })?;
            ("accepted", "none")
        }
    };
    tracing::info!(outcome, "webhook accepted");
    Ok(Accepted {
        outcome,
        body: serde_json::json!({
            "status": "accepted",
            "conversation_id": conversation_id.as_str(),
            "extraction": extraction,
        }),
    })
}

/// Whether the caller was erased after this call started.
async fn caller_erased_since(
    state: &AppState,
    organization_id: Uuid,
    caller_id: &str,
    started_at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, ApiError> {
    let unavailable = |err: sqlx::Error| ApiError::unavailable("cannot check erasures", &err);
    let mut tx = db::begin_org_tx(&state.pool, organization_id)
        .await
        .map_err(unavailable)?;
    let erased = db::is_caller_erased(&mut tx, organization_id, caller_id, Some(started_at))
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    Ok(erased)
}

/// Publishes right away with a short deadline; on failure the row stays
/// for the relay and the webhook is still answered 200 (it is durable).
async fn publish_now(state: &AppState, organization_id: Uuid, pending: &persist::OutboxRow) {
    let latency = state
        .metrics
        .publish_seconds
        .with_label_values(&["request"]);
    let published = tokio::time::timeout(
        state.publish_deadline,
        outbox::publish_one(&state.pool, &state.bus, organization_id, pending, &latency),
    )
    .await;
    let failure = match published {
        Ok(Ok(_)) => return,
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no PubAck before the request's publish deadline".to_owned(),
    };
    state.metrics.publish_deferred.inc();
    tracing::warn!(
        error = failure,
        "JetStream did not take the event; the outbox relay will publish it"
    );
}

fn signature_rejected(err: SignatureError) -> ApiError {
    ApiError::unauthorized(err.to_string())
}

fn body_rejected(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "payload_too_large",
            "webhook body exceeds the configured limit (WEBHOOK_MAX_BODY_BYTES)",
        )
    } else {
        ApiError::new(status, "bad_request", "cannot read the request body")
    }
}

/// A secret no organization has, so an unknown organization costs the same
/// HMAC work as a known one.
const DUMMY_SECRET: &str = "elaaoms-unknown-organization-0123456789abcdef";

/// Finds the organization's secrets and checks the signature. An unknown
/// organization is answered exactly like a wrong signature.
async fn authenticate(
    state: &AppState,
    slug: &str,
    header: Option<&str>,
    body: &[u8],
) -> Result<Uuid, ApiError> {
    let secrets: Option<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT organization_id, hmac_secret, hmac_secret_previous FROM auth_webhook_secrets($1)",
    )
    .bind(slug)
    .fetch_optional(&state.pool)
    .await
    .map_err(|err| ApiError::unavailable("cannot look up webhook secrets", &err))?;
    let Some((organization_id, current, previous)) = secrets else {
        let _ = verify_signature(
            header,
            body,
            &[DUMMY_SECRET],
            now_unix(),
            state.signature_tolerance_secs,
        );
        tracing::info!(
            slug,
            "webhook for an unknown organization refused as a signature mismatch"
        );
        state.metrics.signature_failure(&SignatureError::Mismatch);
        return Err(signature_rejected(SignatureError::Mismatch));
    };
    let mut accepted = vec![current.as_str()];
    accepted.extend(previous.as_deref());
    let verified = verify_signature(
        header,
        body,
        &accepted,
        now_unix(),
        state.signature_tolerance_secs,
    )
    .map_err(|err| {
        state.metrics.signature_failure(&err);
        signature_rejected(err)
    })?;
    if verified.age_secs > STALE_SIGNATURE_SECS {
        state.metrics.stale_signatures.inc();
    }
    Ok(organization_id)
}

/// Stores the payload durably; returns its store key.
async fn store_payload(
    state: &AppState,
    conversation_id: &str,
    kind: PayloadKind,
    bytes: Bytes,
) -> Result<String, ApiError> {
    state
        .payloads
        .put(conversation_id, kind, bytes)
        .await
        .map_err(|err| ApiError::unavailable("cannot store the payload", &err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: IngestSettings,
    }

    #[test]
    fn default_settings_match_the_command_line_defaults() {
        let parsed = Cli::parse_from(["ingest"]).settings;
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", IngestSettings::default())
        );
    }
}
