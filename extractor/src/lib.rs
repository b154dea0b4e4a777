//! extractor: turns a transcript into memories worth keeping (DESIGN.md
//! section 5). It consumes `conversation.transcribed`, extracts, validates
//! and publishes `memories.extracted` with the generation's message id, so a
//! redelivery publishes nothing new.
//!
//! Today the extractor is the offline `rules` one for every organization;
//! LLM providers plug in behind the same handler.

pub mod rules;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use elaaoms_shared::bus::consumer::{ConsumerSettings, Delivery, Handler, HandlerError};
use elaaoms_shared::bus::{event_msg_id, Bus, BusError, Envelope, Step};
use elaaoms_shared::config::{BusConfig, DatabaseConfig, PayloadStoreConfig, WorkerConfig};
use elaaoms_shared::db::{self, DbError};
use elaaoms_shared::domain::{ConversationStatus, TransitionKind};
use elaaoms_shared::events::{ConversationTranscribed, MemoriesExtracted};
use elaaoms_shared::payload_store::{PayloadKind, PayloadStore};
use elaaoms_shared::telemetry;
use elaaoms_shared::worker::Worker;
use prometheus::{IntCounterVec, Opts, Registry};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const SERVICE_NAME: &str = "extractor";

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub worker: WorkerConfig,
    #[command(flatten)]
    pub payloads: PayloadStoreConfig,
    #[command(flatten)]
    pub settings: ExtractorSettings,
}

/// What only the extractor needs.
#[derive(clap::Args, Debug, Clone)]
pub struct ExtractorSettings {
    /// Address of the extractor's /healthz, /readyz and /metrics.
    #[arg(id = "extractor_health_addr", long = "extractor-health-addr", env = "EXTRACTOR_HEALTH_ADDR", default_value = "127.0.0.1:9091")]
    pub health_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractorError {
    #[error("extractor cannot reach Postgres: {0}")]
    Database(#[from] DbError),
    #[error("extractor: {0}")]
    Bus(#[from] BusError),
    #[error("extractor cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

pub struct ExtractorService {
    worker: Worker<ExtractHandler>,
}

impl ExtractorService {
    pub async fn build(config: Config) -> Result<Self, ExtractorError> {
        let pool = db::connect_service_pool(&config.database.database_url, config.database.database_max_connections).await?;
        let bus = Bus::connect(&config.bus).await?;
        bus.ensure_streams().await?;
        let registry = Registry::new();
        let handler = Arc::new(ExtractHandler {
            pool: pool.clone(),
            bus: bus.clone(),
            payloads: PayloadStore::local(&config.payloads.payload_dir),
            outcomes: telemetry::register(
                &registry,
                IntCounterVec::new(
                    Opts::new("elaaoms_extractor_conversations_total", "Conversations extracted, by outcome"),
                    &["outcome"],
                )
                .expect("valid metric"),
            ),
        });
        let health_listener = elaaoms_shared::http::bind(config.settings.health_addr).await?;
        Ok(Self {
            worker: Worker {
                name: SERVICE_NAME,
                settings: ConsumerSettings::from_config(SERVICE_NAME, Step::Transcribed, &config.worker),
                bus,
                pool,
                handler,
                registry,
                health_listener,
            },
        })
    }

    pub fn health_addr(&self) -> SocketAddr {
        self.worker.health_addr()
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ExtractorError> {
        Ok(self.worker.run(shutdown).await?)
    }
}

struct ExtractHandler {
    pool: PgPool,
    bus: Bus,
    payloads: PayloadStore,
    outcomes: IntCounterVec,
}

impl ExtractHandler {
    fn decode(delivery: &Delivery) -> Result<Envelope<ConversationTranscribed>, HandlerError> {
        Envelope::decode(&delivery.payload).map_err(|err| HandlerError::permanent(&err))
    }

    /// Whether the caller was erased after this event was queued.
    async fn caller_erased(&self, event: &Envelope<ConversationTranscribed>) -> Result<bool, HandlerError> {
        let transient = |err: sqlx::Error| HandlerError::transient(&err);
        let mut tx = db::begin_org_tx(&self.pool, event.organization_id).await.map_err(transient)?;
        let erased = db::is_caller_erased(&mut tx, event.organization_id, &event.payload.caller_id)
            .await
            .map_err(transient)?;
        tx.commit().await.map_err(transient)?;
        Ok(erased)
    }
}

impl Handler for ExtractHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let event = Self::decode(delivery)?;
        if self.caller_erased(&event).await? {
            self.outcomes.with_label_values(&["erased"]).inc();
            tracing::info!(conversation_id = event.payload.conversation_id, "caller erased: dropping transcript");
            return Ok(());
        }
        let transcript = &event.payload;
        let memories = rules::extract_memories(&transcript.turns);
        tracing::info!(
            conversation_id = transcript.conversation_id,
            memories = memories.len(),
            "extracted"
        );
        let extracted = Envelope::new(
            event.organization_id,
            event.generation,
            MemoriesExtracted {
                conversation_id: transcript.conversation_id.clone(),
                agent_id: transcript.agent_id.clone(),
                caller_id: transcript.caller_id.clone(),
                memories,
                resolved_issue_ids: Vec::new(),
                extractor: "rules".to_owned(),
            },
        );
        let body = extracted.encode().map_err(|err| HandlerError::permanent(&err))?;
        let msg_id = event_msg_id(event.organization_id, &transcript.conversation_id, Step::Extracted, event.generation);
        self.bus
            .publish(&self.bus.names.subject(Step::Extracted), &msg_id, event.organization_id, Bytes::from(body))
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        self.outcomes.with_label_values(&["extracted"]).inc();
        Ok(())
    }

    /// The extraction failed for good: the conversation says so and a
    /// failure file keeps the reason next to the payload.
    async fn on_dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), HandlerError> {
        self.outcomes.with_label_values(&["dead_lettered"]).inc();
        let Ok(event) = Self::decode(delivery) else {
            return Ok(()); // Garbage names no conversation to mark.
        };
        let conversation_id = &event.payload.conversation_id;
        let failure = serde_json::json!({
            "kind": "extraction",
            "conversation_id": conversation_id,
            "generation": event.generation,
            "reason": reason,
            "attempts": delivery.attempt,
            "failed_at": chrono::Utc::now(),
        });
        self.payloads
            .put(conversation_id, PayloadKind::Failure, failure.to_string().into_bytes())
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        let mut tx = db::begin_org_tx(&self.pool, event.organization_id)
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        db::transition_conversation(
            &mut tx,
            event.organization_id,
            conversation_id,
            ConversationStatus::ExtractionFailed,
            TransitionKind::Normal,
        )
        .await
        .map_err(|err| HandlerError::transient(&err))?;
        tx.commit().await.map_err(|err| HandlerError::transient(&err))?;
        Ok(())
    }
}
