//! Organization API keys: `Authorization: Bearer <key>`.
//!
//! The key is hashed (SHA-256) and looked up through the `auth_api_key`
//! SECURITY DEFINER function, the one lookup that happens before the
//! organization is known. A missing, malformed, unknown or revoked key gets
//! the same 401, so a client cannot tell which it was.

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
        let found: Option<(Uuid, Uuid)> =
            sqlx::query_as("SELECT organization_id, api_key_id FROM auth_api_key($1)")
                .bind(hash_api_key(key))
                .fetch_optional(&state.pool)
                .await
                .map_err(|err| {
                    AuthRejection::Failed(database_error("looking up an API key", err))
                })?;
        let (id, api_key_id) = found.ok_or(AuthRejection::Unauthorized)?;
        let span = tracing::Span::current();
        span.record("organization_id", tracing::field::display(id));
        span.record("api_key_id", tracing::field::display(api_key_id));
        Ok(Organization { id })
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
