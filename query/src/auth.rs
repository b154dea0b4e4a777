//! Organization API keys: `Authorization: Bearer <key>`.
//!
//! The key is hashed (SHA-256) and looked up through the `auth_api_key`
//! SECURITY DEFINER function, the one lookup that happens before the
//! organization is known. A missing, malformed, unknown or revoked key gets
//! the same 401, so a client cannot tell which it was.
//!
//! A key that authenticated is remembered for `API_KEY_CACHE_TTL` (default
//! 10 s): every search and pre-call context would otherwise spend a
//! database round trip on it. The price is that a revoked key keeps working
//! in each query process for at most that long. Failures are never cached,
//! so a new key works at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use elaaoms_shared::api_keys::hash_api_key;
use elaaoms_shared::http::ApiError;
use uuid::Uuid;

use crate::error::database_error;
use crate::AppState;

/// Keys are `elk_` + 64 hex characters; anything far longer is not a key
/// and is refused before hashing.
const MAX_KEY_LEN: usize = 256;

/// The organization a request was authenticated as (the key's id goes to
/// the request's log span).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Organization {
    pub id: Uuid,
}

/// Why a request was not authenticated: a 401 (always the same one) or a
/// failure on our side.
pub(crate) enum AuthRejection {
    Unauthorized,
    Failed(ApiError),
}

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        match self {
            AuthRejection::Unauthorized => (
                [(WWW_AUTHENTICATE, "Bearer")],
                ApiError::unauthorized("missing or invalid API key"),
            )
                .into_response(),
            AuthRejection::Failed(err) => err.into_response(),
        }
    }
}

impl FromRequestParts<AppState> for Organization {
    type Rejection = AuthRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer_token(parts).ok_or(AuthRejection::Unauthorized)?;
        let key_hash = hash_api_key(key);
        let (id, api_key_id) = match state.api_keys.get(&key_hash) {
            Some(found) => found,
            None => {
                let found: Option<(Uuid, Uuid)> =
                    sqlx::query_as("SELECT organization_id, api_key_id FROM auth_api_key($1)")
                        .bind(&key_hash)
                        .fetch_optional(&state.pool)
                        .await
                        .map_err(|err| {
                            AuthRejection::Failed(database_error("looking up an API key", err))
                        })?;
                let found = found.ok_or(AuthRejection::Unauthorized)?;
                state.api_keys.remember(key_hash, found);
                found
            }
        };
        let span = tracing::Span::current();
        span.record("organization_id", tracing::field::display(id));
        span.record("api_key_id", tracing::field::display(api_key_id));
        Ok(Organization { id })
    }
}

/// API keys that authenticated recently, by their hash.
#[derive(Clone)]
pub(crate) struct ApiKeyCache {
    ttl: Duration,
    entries: Arc<Mutex<HashMap<Vec<u8>, CachedKey>>>,
}

/// (organization id, API key id), and when the database said so.
type CachedKey = ((Uuid, Uuid), Instant);

/// More keys than any organization uses at once; past it the cache starts
/// over rather than grow.
const API_KEY_CACHE_CAPACITY: usize = 10_000;

impl ApiKeyCache {
    /// A zero `ttl` disables the cache.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
        }
    }

    fn get(&self, key_hash: &[u8]) -> Option<(Uuid, Uuid)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let &(found, checked_at) = entries.get(key_hash)?;
        (checked_at.elapsed() < self.ttl).then_some(found)
    }

    fn remember(&self, key_hash: Vec<u8>, found: (Uuid, Uuid)) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= API_KEY_CACHE_CAPACITY {
            entries.retain(|_, (_, checked_at)| checked_at.elapsed() < self.ttl);
            if entries.len() >= API_KEY_CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key_hash, (found, Instant::now()));
    }
}

/// The key of an `Authorization: Bearer <key>` header (scheme matched
/// case-insensitively), or `None` when it is absent or malformed.
fn bearer_token(parts: &Parts) -> Option<&str> {
    let header = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = header.trim().split_once(' ')?;
    let key = key.trim();
    let well_formed = scheme.eq_ignore_ascii_case("bearer")
        && !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && !key.contains(char::is_whitespace);
    well_formed.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(header: Option<&str>) -> Parts {
        let mut builder = Request::builder();
        if let Some(value) = header {
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn cached_keys_expire_and_a_zero_ttl_caches_nothing() {
        let found = (Uuid::new_v4(), Uuid::new_v4());
        let cache = ApiKeyCache::new(Duration::from_millis(50));
        cache.remember(b"hash".to_vec(), found);
        assert_eq!(cache.get(b"hash"), Some(found));
        assert_eq!(cache.get(b"other"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(b"hash"), None, "an entry past its TTL");

        let disabled = ApiKeyCache::new(Duration::ZERO);
        disabled.remember(b"hash".to_vec(), found);
        assert_eq!(disabled.get(b"hash"), None);
    }

    #[test]
    fn a_full_cache_starts_over_instead_of_growing() {
        let cache = ApiKeyCache::new(Duration::from_secs(60));
        for i in 0..=API_KEY_CACHE_CAPACITY {
            cache.remember(i.to_le_bytes().to_vec(), (Uuid::nil(), Uuid::nil()));
        }
        let entries = cache.entries.lock().unwrap().len();
        assert!(entries <= API_KEY_CACHE_CAPACITY, "{entries} entries");
        assert!(cache.get(&API_KEY_CACHE_CAPACITY.to_le_bytes()).is_some());
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(
            bearer_token(&parts(Some("Bearer elk_abc"))),
            Some("elk_abc")
        );
        assert_eq!(
            bearer_token(&parts(Some("bearer  elk_abc "))),
            Some("elk_abc")
        );
        assert_eq!(bearer_token(&parts(None)), None);
        assert_eq!(bearer_token(&parts(Some("Basic elk_abc"))), None);
        assert_eq!(bearer_token(&parts(Some("Bearer"))), None);
        assert_eq!(bearer_token(&parts(Some("Bearer "))), None);
        assert_eq!(bearer_token(&parts(Some("Bearer a b"))), None);
        let long = format!("Bearer {}", "k".repeat(MAX_KEY_LEN + 1));
        assert_eq!(bearer_token(&parts(Some(&long))), None);
    }
}
