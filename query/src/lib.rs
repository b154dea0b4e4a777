//! The query service: what agents and their operators read back.
//!
//! * `POST /v1/search`: semantic search over one caller's memories (the
//!   seed's Memory Search Query), ranked by cosine similarity;
//! * `GET /v1/callers/{caller_id}/memories`: a caller's memories, newest first;
//! * `GET /v1/callers/{caller_id}/context`: the pre-call context (summary,
//!   open issues, recent memories and a ready-to-inject text);
//! * `GET|DELETE /v1/memories/{id}`, `GET /v1/conversations/{id}`,
//!   `DELETE /v1/callers/{caller_id}` (erasure);
//! * the ElevenLabs agent endpoints `POST /v1/elevenlabs/conversation-init/{org}`
//!   and `POST /v1/elevenlabs/tools/search/{org}` (authenticated by the
//!   organization's agent secret header instead of an API key);
//! * `/healthz`, `/readyz`, `/metrics`;
//! * `/openapi.json`: the OpenAPI 3.1 document, unauthenticated.
//!
//! Every tenant route authenticates an organization API key
//! (`Authorization: Bearer <key>`) and then touches data only inside
//! [`db::begin_org_tx`], so row-level security backs up each query's own
//! `organization_id` filter.

mod agent_auth;
mod auth;
mod context;
mod elevenlabs;
mod embedding_cache;
mod erasure;
mod error;
mod manage;
mod memories;
mod memory;
mod metrics;
mod openapi;
mod search;
mod tool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use elaaoms_shared::bus::Bus;
use elaaoms_shared::config::{
    parse_duration, BusConfig, DatabaseConfig, EmbeddingConfig, PayloadStoreConfig,
};
use elaaoms_shared::db;
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::telemetry::{health_router, Health};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use agent_auth::{generate_agent_secret, hash_agent_secret, AGENT_SECRET_HEADER};
pub use context::context_sql;
pub use context::{ContextTokenizer, CONTEXT_MAX_TOKENS};
pub use elevenlabs::DOCUMENTED_VARIABLES;
pub use error::QueryError;
pub use memories::{list_sql, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT};
pub use openapi::{AGENT_SECRET_SCHEME, BEARER_SCHEME};
pub use search::search_sql;
pub use tool::CALLER_TOKEN_HEADER;

/// The name the service reports in `/healthz` and its logs.
pub const SERVICE_NAME: &str = "query";

/// Request bodies larger than this are refused with 413: a search request is
/// a query of at most 1,000 characters and a few small fields.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Erasure deletes the caller's messages from both streams.
    #[command(flatten)]
    pub bus: BusConfig,
    /// Erasure deletes the caller's payload directories.
    #[command(flatten)]
    pub payloads: PayloadStoreConfig,
    /// The context text is counted with the model's `tokenizer.json`.
    #[command(flatten)]
    pub embedding: EmbeddingConfig,
    #[command(flatten)]
    pub settings: QuerySettings,
}

/// What only the query service needs (the shared sections are configured
/// once when `elaaoms run` starts every service).
#[derive(clap::Args, Debug, Clone)]
pub struct QuerySettings {
    /// where the query API listens
    #[arg(
        id = "query_addr",
        long = "query-addr",
        env = "QUERY_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub addr: SocketAddr,

    /// hard deadline of the ElevenLabs conversation-initiation webhook: past
    /// it, the webhook answers 200 with the default variables
    #[arg(
        id = "query_init_deadline",
        long = "elevenlabs-init-deadline",
        env = "ELEVENLABS_INIT_DEADLINE",
        default_value = "300ms",
        value_parser = parse_duration
    )]
    pub init_deadline: Duration,

    /// how long a caller token issued by the initiation webhook binds the
    /// server tool to that call's caller
    #[arg(
        id = "query_caller_token_ttl",
        long = "caller-token-ttl",
        env = "CALLER_TOKEN_TTL",
        default_value = "6h",
        value_parser = parse_duration
    )]
    pub caller_token_ttl: Duration,

    /// query embeddings kept in the in-process LRU cache (0 disables it)
    #[arg(
        id = "query_embedding_cache_entries",
        long = "query-embedding-cache-entries",
        env = "QUERY_EMBEDDING_CACHE_ENTRIES",
        default_value_t = 1000
    )]
    pub embedding_cache_entries: usize,

    /// how long an API key that authenticated is trusted without asking the
    /// database again: a revoked key is refused at most this long after
    /// revocation (0s asks every time)
    #[arg(
        id = "query_api_key_cache_ttl",
        long = "api-key-cache-ttl",
        env = "API_KEY_CACHE_TTL",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub api_key_cache_ttl: Duration,
}

/// What every handler shares: cheap to clone.
#[derive(Clone)]
pub(crate) struct AppState {
    pub pool: PgPool,
    pub embeddings: embedding_cache::EmbeddingCache,
    pub api_keys: auth::ApiKeyCache,
    pub metrics: metrics::Metrics,
    pub bus: Bus,
    pub payloads: elaaoms_shared::payload_store::PayloadStore,
    pub tokenizer: Arc<ContextTokenizer>,
    pub agent_auth: agent_auth::AgentAuthCache,
    pub init_deadline: Duration,
    pub caller_token_ttl: Duration,
}

/// A bound, connected query service, ready to [`run`](QueryService::run).
pub struct QueryService {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
    pool: PgPool,
}

impl QueryService {
    /// Connects (fail fast with a clear message) and binds. The embedder is
    /// passed in so one process can share it.
    pub async fn build(config: Config, embedder: Embedder) -> Result<Self, QueryError> {
        let pool = db::connect_service_pool(
            &config.database.database_url,
            config.database.database_max_connections,
        )
        .await
        .map_err(|source| QueryError::Database {
            context: "connecting to Postgres",
            source,
        })?;
        let model_dir = &config.embedding.embedding_model_dir;
        let tokenizer = ContextTokenizer::load(model_dir)?;
        let bus = Bus::connect(&config.bus)
            .await
            .map_err(|source| QueryError::Bus {
                context: "connecting to NATS",
                source,
            })?;
        let listener = elaaoms_shared::http::bind(config.settings.addr)
            .await
            .map_err(|source| QueryError::Bind {
                addr: config.settings.addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| QueryError::Bind {
            addr: config.settings.addr,
            source,
        })?;

        let registry = prometheus::Registry::new();
        let state = AppState {
            pool: pool.clone(),
            embeddings: embedding_cache::EmbeddingCache::new(
                embedder,
                config.settings.embedding_cache_entries,
            ),
            api_keys: auth::ApiKeyCache::new(config.settings.api_key_cache_ttl),
            metrics: metrics::Metrics::register(&registry),
            bus,
            payloads: elaaoms_shared::payload_store::PayloadStore::from_config(&config.payloads)
                .await
                .map_err(QueryError::PayloadStore)?,
            tokenizer: Arc::new(tokenizer),
            agent_auth: agent_auth::AgentAuthCache::default(),
            init_deadline: config.settings.init_deadline,
            caller_token_ttl: config.settings.caller_token_ttl,
        };
        let health = Health {
            service: SERVICE_NAME,
            registry,
            database: Some(pool.clone()),
            // Only erasure needs NATS: search, context and the ElevenLabs
            // endpoints must stay in service while it is down.
            bus: None,
        };
        let router = router(state, health);
        tracing::info!(addr = %local_addr, "query service listening");
        Ok(Self {
            listener,
            local_addr,
            router,
            pool,
        })
    }

    /// The address the service listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled (axum graceful shutdown: requests
    /// in flight finish), then closes the pool and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), QueryError> {
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        self.pool.close().await;
        tracing::info!("query service stopped");
        served.map_err(QueryError::Serve)
    }
}

/// The tenant and agent routes, each registered with its OpenAPI
/// description (`routes!` takes the handler's `#[utoipa::path]`), so the
/// document cannot miss a route the service answers.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(search::search))
        .routes(routes!(memories::list))
        .routes(routes!(context::context))
        .routes(routes!(erasure::erase_caller))
        .routes(routes!(manage::get_memory, manage::delete_memory))
        .routes(routes!(manage::get_conversation))
        .routes(routes!(elevenlabs::conversation_init))
        .routes(routes!(tool::search_tool))
}

/// The OpenAPI document the service serves at `/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let (_, mut document) = api_routes().split_for_parts();
    openapi::add_error_responses(&mut document);
    document
}

fn router(state: AppState, health: Health) -> Router {
    let (api, mut document) = api_routes().split_for_parts();
    openapi::add_error_responses(&mut document);
    let document = Bytes::from(
        document
            .to_json()
            .expect("the OpenAPI document serializes (it is built from static descriptions)"),
    );
    let api = api
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    let docs = Router::new()
        .route("/openapi.json", get(openapi::serve))
        .with_state(document);
    api.merge(docs)
        .merge(health_router(health))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.metrics,
            metrics::track,
        ))
}
