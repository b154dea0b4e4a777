//! The query service: what agents and their operators read back.
//!
//! * `POST /v1/search`: semantic search over one caller's memories (the
//!   seed's Memory Search Query), ranked by cosine similarity;
//! * `GET /v1/callers/{caller_id}/memories`: a caller's memories, newest first;
//! * `/healthz`, `/readyz`, `/metrics`.
//!
//! Every tenant route authenticates an organization API key
//! (`Authorization: Bearer <key>`) and then touches data only inside
//! [`db::begin_org_tx`], so row-level security backs up each query's own
//! `organization_id` filter.

mod auth;
mod error;
mod memories;
mod memory;
mod metrics;
mod search;

use std::net::SocketAddr;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use elaaoms_shared::config::DatabaseConfig;
use elaaoms_shared::db;
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::telemetry::{health_router, Health};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::QueryError;
pub use memories::{list_sql, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT};
pub use search::search_sql;

/// The name the service reports in `/healthz` and its logs.
pub const SERVICE_NAME: &str = "query";

/// Request bodies larger than this are refused with 413: a search request is
/// a query of at most 1,000 characters and a few small fields.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseConfig,
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
}

/// What every handler shares: cheap to clone.
#[derive(Clone)]
pub(crate) struct AppState {
    pub pool: PgPool,
    pub embedder: Embedder,
    pub metrics: metrics::Metrics,
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
            embedder,
            metrics: metrics::Metrics::register(&registry),
        };
        let health = Health {
            service: SERVICE_NAME,
            registry,
            database: Some(pool.clone()),
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

fn router(state: AppState, health: Health) -> Router {
    let api = Router::new()
        .route("/v1/search", post(search::search))
        .route("/v1/callers/{caller_id}/memories", get(memories::list))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    api.merge(health_router(health))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.metrics,
            metrics::track,
        ))
}
