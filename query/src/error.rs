//! The service's own errors (start-up and serving) and the mapping of
//! database errors to what a client may see.

use std::net::SocketAddr;

use elaaoms_shared::db::DbError;
use elaaoms_shared::http::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("query service: {context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: DbError,
    },
    #[error("query service: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("query service: {context}: {source}")]
    Bus {
        context: &'static str,
        #[source]
        source: elaaoms_shared::bus::BusError,
    },
    #[error("query service: cannot load the context tokenizer {path}: {reason}")]
    Tokenizer {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("query service: serving HTTP failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("query service: payload store: {0}")]
    PayloadStore(#[source] elaaoms_shared::payload_store::PayloadStoreError),
}

/// A database error in a request: 503 when Postgres is unreachable or the
/// pool is exhausted (worth retrying), 500 otherwise. Either way the client
/// learns nothing more; the log gets the chain.
pub(crate) fn database_error(context: &str, err: sqlx::Error) -> ApiError {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            ApiError::unavailable(context, &err)
        }
        other => ApiError::internal(context, &other),
    }
}

/// Unknown routes answer in the same JSON shape as every other error.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}
