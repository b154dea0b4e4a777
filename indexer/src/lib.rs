//! indexer: makes extracted memories searchable (DESIGN.md section 6). It
//! consumes `memories.extracted`, embeds outside any transaction, then
//! applies the whole extraction in one transaction that starts by inserting
//! `applied_extractions`: a redelivered extraction conflicts there and
//! changes nothing. It publishes `memories.indexed` afterwards.

mod apply;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use elaaoms_shared::bus::consumer::{ConsumerSettings, Delivery, Handler, HandlerError};
use elaaoms_shared::bus::{event_msg_id, Bus, BusError, Envelope, Step};
use elaaoms_shared::config::{BusConfig, DatabaseConfig, WorkerConfig};
use elaaoms_shared::db::{self, DbError};
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::events::{MemoriesExtracted, MemoriesIndexed};
use elaaoms_shared::telemetry;
use elaaoms_shared::worker::Worker;
use prometheus::{IntCounterVec, Opts, Registry};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use apply::Applied;

pub const SERVICE_NAME: &str = "indexer";

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub bus: BusConfig,
    #[command(flatten)]
    pub worker: WorkerConfig,
    #[command(flatten)]
    pub settings: IndexerSettings,
}

/// What only the indexer needs.
#[derive(clap::Args, Debug, Clone)]
pub struct IndexerSettings {
    /// Address of the indexer's /healthz, /readyz and /metrics.
    #[arg(id = "indexer_health_addr", long = "indexer-health-addr", env = "INDEXER_HEALTH_ADDR", default_value = "127.0.0.1:9092")]
    pub health_addr: SocketAddr,
    /// Cosine similarity from which a new memory of the same type reinforces
    /// an existing one (the seed's 0.85).
    #[arg(long, env = "DEDUP_SIMILARITY", default_value_t = 0.85)]
    pub dedup_similarity: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexerError {
    #[error("indexer cannot reach Postgres: {0}")]
    Database(#[from] DbError),
    #[error("indexer: {0}")]
    Bus(#[from] BusError),
    #[error("indexer cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

pub struct IndexerService {
    worker: Worker<IndexHandler>,
}

impl IndexerService {
    /// The embedder is passed in so one process can share the model.
    pub async fn build(config: Config, embedder: Embedder) -> Result<Self, IndexerError> {
        let pool = db::connect_service_pool(&config.database.database_url, config.database.database_max_connections).await?;
        let bus = Bus::connect(&config.bus).await?;
        bus.ensure_streams().await?;
        let registry = Registry::new();
        let handler = Arc::new(IndexHandler {
            pool: pool.clone(),
            bus: bus.clone(),
            embedder,
            dedup_similarity: config.settings.dedup_similarity,
            memories: telemetry::register(
                &registry,
                IntCounterVec::new(
                    Opts::new("elaaoms_indexer_memories_total", "Memories applied, by effect"),
                    &["effect"],
                )
                .expect("valid metric"),
            ),
        });
        let health_listener = elaaoms_shared::http::bind(config.settings.health_addr).await?;
        Ok(Self {
            worker: Worker {
                name: SERVICE_NAME,
                settings: ConsumerSettings::from_config(SERVICE_NAME, Step::Extracted, &config.worker),
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

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IndexerError> {
        Ok(self.worker.run(shutdown).await?)
    }
}

struct IndexHandler {
    pool: PgPool,
    bus: Bus,
    embedder: Embedder,
    dedup_similarity: f64,
    memories: IntCounterVec,
}

impl Handler for IndexHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let event: Envelope<MemoriesExtracted> =
            Envelope::decode(&delivery.payload).map_err(|err| HandlerError::permanent(&err))?;
        let texts = event
            .payload
            .memories
            .iter()
            .map(|memory| memory.content.as_str().to_owned())
            .collect();
        let embeddings = self.embedder.embed(texts).await.map_err(|err| HandlerError::transient(&err))?;
        let applied = apply::apply_extraction(
            &self.pool,
            &event,
            &embeddings,
            self.embedder.model_name(),
            self.dedup_similarity,
        )
        .await
        .map_err(|err| HandlerError::transient(&err))?;
        tracing::info!(conversation_id = event.payload.conversation_id, ?applied, "indexed");
        let Applied::Done { created, reinforced } = applied else {
            return Ok(());
        };
        self.memories.with_label_values(&["created"]).inc_by(u64::from(created));
        self.memories.with_label_values(&["reinforced"]).inc_by(u64::from(reinforced));
        let indexed = Envelope::new(
            event.organization_id,
            event.generation,
            MemoriesIndexed {
                conversation_id: event.payload.conversation_id.clone(),
                caller_id: event.payload.caller_id.clone(),
                created,
                reinforced,
            },
        );
        let body = indexed.encode().map_err(|err| HandlerError::permanent(&err))?;
        let msg_id = event_msg_id(event.organization_id, &event.payload.conversation_id, Step::Indexed, event.generation);
        self.bus
            .publish(&self.bus.names.subject(Step::Indexed), &msg_id, event.organization_id, Bytes::from(body))
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        Ok(())
    }
}
