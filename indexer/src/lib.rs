//! indexer: makes extracted memories searchable (DESIGN.md section 6). It
//! consumes `memories.extracted`, embeds outside any transaction, then
//! applies the whole extraction in one transaction that starts by inserting
//! `applied_extractions`: a redelivered extraction conflicts there and
//! changes nothing. It publishes `memories.indexed` afterwards.

pub mod apply;
pub mod dedup;
pub mod judge;
pub mod quality;
pub mod recalculate;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use elaaoms_extractor::{provider_http_client, LlmSettings, Providers};
use elaaoms_shared::bus::consumer::{ConsumerSettings, Delivery, Handler, HandlerError};
use elaaoms_shared::bus::{event_msg_id, Bus, BusError, Envelope, Step};
use elaaoms_shared::config::{BusConfig, DatabaseConfig, WorkerConfig};
use elaaoms_shared::db::{self, DbError};
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::events::{MemoriesExtracted, MemoriesIndexed};
use elaaoms_shared::telemetry;
use elaaoms_shared::worker::Worker;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use apply::{Applied, DedupSettings, Outcome};
pub use judge::Verdicts;

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
    /// The providers of organizations that extract with an LLM, which also
    /// judge their deduplication (the extractor's settings).
    #[command(flatten)]
    pub llm: LlmSettings,
}

/// What only the indexer needs.
#[derive(clap::Args, Debug, Clone)]
pub struct IndexerSettings {
    /// Address of the indexer's /healthz, /readyz and /metrics.
    #[arg(
        id = "indexer_health_addr",
        long = "indexer-health-addr",
        env = "INDEXER_HEALTH_ADDR",
        default_value = "127.0.0.1:9092"
    )]
    pub health_addr: SocketAddr,
    /// Cosine similarity from which a new memory of the same type reinforces
    /// an existing one when the rules see no reason not to (the seed's 0.85).
    #[arg(
        id = "dedup_similarity",
        long,
        env = "DEDUP_SIMILARITY",
        default_value_t = 0.85
    )]
    pub dedup_similarity: f64,
    /// Stage 1 of deduplication: existing memories at least this similar are
    /// candidates for stage 2.
    #[arg(
        id = "dedup_candidate_similarity",
        long,
        env = "DEDUP_CANDIDATE_SIMILARITY",
        default_value_t = 0.6
    )]
    pub dedup_candidate_similarity: f64,
    /// A same-subject pair with another value (negation, number, time,
    /// place, ...) is a conflict from this similarity on; below, another fact.
    #[arg(
        id = "dedup_conflict_similarity",
        long,
        env = "DEDUP_CONFLICT_SIMILARITY",
        default_value_t = 0.7
    )]
    pub dedup_conflict_similarity: f64,
}

impl IndexerSettings {
    pub fn dedup(&self) -> DedupSettings {
        DedupSettings {
            candidate_similarity: self.dedup_candidate_similarity,
            rules: dedup::RulesThresholds {
                duplicate: self.dedup_similarity,
                conflict: self.dedup_conflict_similarity,
            },
            ..DedupSettings::default()
        }
    }
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
        let pool = db::connect_service_pool(
            &config.database.database_url,
            config.database.database_max_connections,
        )
        .await?;
        let bus = Bus::connect(&config.bus).await?;
        bus.ensure_streams().await?;
        let registry = Registry::new();
        let http = provider_http_client().expect("an HTTP client with the ring provider");
        let handler = Arc::new(IndexHandler {
            pool: pool.clone(),
            bus: bus.clone(),
            embedder,
            dedup: config.settings.dedup(),
            providers: Providers::new(http, config.llm),
            metrics: Metrics::register(&registry),
        });
        let health_listener = elaaoms_shared::http::bind(config.settings.health_addr).await?;
        Ok(Self {
            worker: Worker {
                name: SERVICE_NAME,
                settings: ConsumerSettings::from_config(
                    SERVICE_NAME,
                    Step::Extracted,
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

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IndexerError> {
        Ok(self.worker.run(shutdown).await?)
    }
}

struct IndexHandler {
    pool: PgPool,
    bus: Bus,
    embedder: Embedder,
    dedup: DedupSettings,
    providers: Providers,
    metrics: Metrics,
}

impl IndexHandler {
    /// The LLM judge's verdicts for this extraction, when its organization
    /// extracts with an LLM; none (the rules decide) otherwise, and when the
    /// judge cannot answer.
    async fn verdicts(
        &self,
        event: &Envelope<MemoriesExtracted>,
        embeddings: &[Vec<f32>],
    ) -> Result<Verdicts, HandlerError> {
        let (llm, pairs) = apply::pairs_to_judge(&self.pool, event, embeddings, &self.dedup)
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        let Some(llm) = llm else {
            return Ok(Verdicts::default());
        };
        if pairs.is_empty() {
            return Ok(Verdicts::default());
        }
        let provider = match self.providers.for_organization(&llm) {
            Ok(Some(provider)) => provider,
            Ok(None) => return Ok(Verdicts::default()),
            Err(err) => {
                self.metrics.judge_fallback(&err);
                return Ok(Verdicts::default());
            }
        };
        match judge::judge_pairs(provider.as_ref(), &self.providers.retry_policy(), &pairs).await {
            Ok(judged) => {
                self.metrics
                    .judge_calls
                    .with_label_values(&["judged"])
                    .inc();
                self.metrics.judge_pairs.inc_by(pairs.len() as u64);
                for (kind, tokens) in [
                    ("input", judged.usage.input),
                    ("output", judged.usage.output),
                ] {
                    self.metrics
                        .judge_tokens
                        .with_label_values(&[kind])
                        .inc_by(tokens);
                }
                tracing::debug!(
                    pairs = pairs.len(),
                    verdicts = judged.verdicts.len(),
                    prompt = judge::JUDGE_PROMPT_VERSION,
                    "deduplication judged"
                );
                Ok(judged.verdicts)
            }
            Err(err) => {
                self.metrics.judge_fallback(&err);
                Ok(Verdicts::default())
            }
        }
    }
}

struct Metrics {
    /// created | reinforced | conflicted | resolved | replaced (replay).
    memories: IntCounterVec,
    /// The best stage-1 candidate's similarity, per memory that had one.
    dedup_similarity: Histogram,
    /// Seconds to embed one extraction's memories.
    embedding_seconds: Histogram,
    /// LLM judge calls: judged | fell_back (to the rules).
    judge_calls: IntCounterVec,
    judge_pairs: IntCounter,
    /// LLM judge tokens: input | output.
    judge_tokens: IntCounterVec,
}

impl Metrics {
    fn register(registry: &Registry) -> Self {
        Self {
            memories: telemetry::register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "elaaoms_indexer_memories_total",
                        "Memories applied, by effect",
                    ),
                    &["effect"],
                )
                .expect("valid metric"),
            ),
            dedup_similarity: telemetry::register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "elaaoms_indexer_dedup_similarity",
                        "Similarity of each new memory's best deduplication candidate",
                    )
                    .buckets(vec![0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]),
                )
                .expect("valid metric"),
            ),
            embedding_seconds: telemetry::register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "elaaoms_indexer_embedding_seconds",
                        "Time to embed one extraction's memories",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            judge_calls: telemetry::register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "elaaoms_indexer_judge_calls_total",
                        "LLM deduplication judge calls, by outcome (judged, fell_back to the rules)",
                    ),
                    &["outcome"],
                )
                .expect("valid metric"),
            ),
            judge_pairs: telemetry::register(
                registry,
                IntCounter::new(
                    "elaaoms_indexer_judge_pairs_total",
                    "Memory pairs judged by the LLM",
                )
                .expect("valid metric"),
            ),
            judge_tokens: telemetry::register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "elaaoms_indexer_judge_tokens_total",
                        "LLM deduplication judge tokens, by kind (input, output)",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
        }
    }

    fn judge_fallback(&self, err: &(dyn std::error::Error + 'static)) {
        tracing::warn!(
            error = %elaaoms_shared::bus::consumer::error_chain(err),
            "the LLM judge could not answer; the rules deduplicate this extraction"
        );
        self.judge_calls.with_label_values(&["fell_back"]).inc();
    }

    fn record(&self, outcome: &Outcome) {
        for (effect, count) in [
            ("created", outcome.created),
            ("reinforced", outcome.reinforced),
            ("conflicted", outcome.conflicted),
            ("resolved", outcome.resolved),
            ("replaced", outcome.replaced_memories),
        ] {
            self.memories
                .with_label_values(&[effect])
                .inc_by(u64::from(count));
        }
        for similarity in &outcome.best_similarities {
            self.dedup_similarity.observe(*similarity);
        }
    }
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
        let timer = self.metrics.embedding_seconds.start_timer();
        let embeddings = self
            .embedder
            .embed(texts)
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        timer.observe_duration();
        let verdicts = self.verdicts(&event, &embeddings).await?;
        let applied = apply::apply_extraction(
            &self.pool,
            &event,
            &embeddings,
            self.embedder.model_name(),
            &self.dedup,
            &verdicts,
        )
        .await
        .map_err(|err| HandlerError::transient(&err))?;
        tracing::info!(
            conversation_id = event.payload.conversation_id,
            ?applied,
            "indexed"
        );
        let outcome = match applied {
            Applied::Done(outcome) => outcome,
            Applied::AlreadyApplied | Applied::Dropped => return Ok(()),
            Applied::Erased => {
                if let Err(err) = self.bus.delete_event(delivery.stream_sequence).await {
                    tracing::warn!(error = %err, "cannot delete an erased caller's event; it goes at retention");
                }
                return Ok(());
            }
        };
        self.metrics.record(&outcome);
        let (created, reinforced) = (outcome.created, outcome.reinforced);
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
        let body = indexed
            .encode()
            .map_err(|err| HandlerError::permanent(&err))?;
        let msg_id = event_msg_id(
            event.organization_id,
            &event.payload.conversation_id,
            Step::Indexed,
            event.generation,
        );
        self.bus
            .publish_traced(
                &self.bus.names.subject(Step::Indexed),
                &msg_id,
                event.organization_id,
                Some(&delivery.trace),
                Bytes::from(body),
            )
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_effects_and_similarities() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry);
        metrics.record(&Outcome {
            created: 2,
            reinforced: 1,
            conflicted: 1,
            best_similarities: vec![0.93, 0.7],
            ..Outcome::default()
        });
        assert_eq!(metrics.memories.with_label_values(&["created"]).get(), 2);
        assert_eq!(metrics.memories.with_label_values(&["reinforced"]).get(), 1);
        assert_eq!(metrics.memories.with_label_values(&["conflicted"]).get(), 1);
        assert_eq!(metrics.dedup_similarity.get_sample_count(), 2);
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        assert!(
            names.contains(&"elaaoms_indexer_embedding_seconds".to_owned()),
            "{names:?}"
        );
    }
}
