//! extractor: turns a transcript into memories worth keeping (DESIGN.md
//! section 5). It consumes `conversation.transcribed`, extracts with the
//! organization's chosen extractor (the offline `rules` one, or an LLM
//! provider: OpenAI, Anthropic, any OpenAI-compatible server), validates and
//! publishes `memories.extracted` with the generation's message id, so a
//! redelivery publishes nothing new.
//!
//! Modules: `prompt` (the versioned prompt, the answer's schema and its
//! validation), `provider` (the providers and the retries of one call),
//! `llm` (one extraction: a call and at most one repair), `breaker` (the
//! per-organization circuit breaker), `profiles` (ElevenLabs agent
//! profiles), `privacy` (redaction before anything leaves), `handler` (the consumer-loop handler), `dlq` (listing and
//! replaying dead letters, for `elaaoms replay`), `eval` (precision and recall
//! on a labelled set, for `elaaoms eval`).

pub mod breaker;
pub mod dlq;
pub mod eval;
mod handler;
pub mod llm;
pub mod privacy;
pub mod profiles;
pub mod prompt;
pub mod provider;
pub mod rules;
mod settings;

use std::net::SocketAddr;
use std::sync::Arc;

use elaaoms_shared::bus::consumer::ConsumerSettings;
use elaaoms_shared::bus::{Bus, BusError, Step};
use elaaoms_shared::config::{BusConfig, DatabaseConfig, PayloadStoreConfig, WorkerConfig};
use elaaoms_shared::db::{self, DbError};
use elaaoms_shared::worker::Worker;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use handler::ExtractHandler;
pub use handler::{provider_http_client, OrganizationLlm, Providers};
pub use settings::{AgentProfileSettings, ExtractorSettings, LlmSettings};

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

#[derive(Debug, thiserror::Error)]
pub enum ExtractorError {
    #[error("extractor cannot reach Postgres: {0}")]
    Database(#[from] DbError),
    #[error("extractor: {0}")]
    Bus(#[from] BusError),
    #[error("extractor cannot listen: {0}")]
    Listen(#[from] std::io::Error),
    #[error("extractor payload store: {0}")]
    PayloadStore(#[from] elaaoms_shared::payload_store::PayloadStoreError),
}

pub struct ExtractorService {
    worker: Worker<ExtractHandler>,
}

impl ExtractorService {
    pub async fn build(config: Config) -> Result<Self, ExtractorError> {
        let pool = db::connect_service_pool(
            &config.database.database_url,
            config.database.database_max_connections,
        )
        .await?;
        let bus = Bus::connect(&config.bus).await?;
        bus.ensure_streams().await?;
        let registry = Registry::new();
        let payloads =
            elaaoms_shared::payload_store::PayloadStore::from_config(&config.payloads).await?;
        let handler = Arc::new(ExtractHandler::new(
            pool.clone(),
            bus.clone(),
            payloads,
            &config.settings,
            &registry,
        ));
        let health_listener = elaaoms_shared::http::bind(config.settings.health_addr).await?;
        Ok(Self {
            worker: Worker {
                name: SERVICE_NAME,
                settings: ConsumerSettings::from_config(
                    SERVICE_NAME,
                    Step::Transcribed,
                    &config.worker,
                ),
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
