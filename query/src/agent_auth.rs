//! Authentication of the ElevenLabs agent endpoints (the conversation-
//! initiation webhook and the server tool): the organization slug in the
//! path plus the organization's agent secret in the `X-Elaaoms-Secret`
//! header, which the user configures in ElevenLabs for both.
//!
//! ElevenLabs signs neither request (no HMAC is documented for them), so a
//! shared secret header is what there is. Only its SHA-256 is stored
//! (`organizations.agent_secret_hash`): it is random (32 bytes), so a plain
//! hash is enough, and the comparison is constant-time. An unknown
//! organization, one without an agent secret, a missing or a wrong secret
//! all look the same to the client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::AppState;

/// The header that carries the organization's agent secret.
pub const AGENT_SECRET_HEADER: &str = "x-elaaoms-secret";
/// Longer values are not secrets of ours and are refused before hashing.
const MAX_SECRET_LEN: usize = 256;

/// A new agent secret: `eas_` + 64 hex characters (32 random bytes).
pub fn generate_agent_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("eas_{}", hex::encode(bytes))
}

/// What `organizations.agent_secret_hash` stores.
pub fn hash_agent_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// An organization authenticated by its agent secret.
#[derive(Debug, Clone)]
pub(crate) struct AgentOrganization {
    pub id: Uuid,
    /// `organizations.dynamic_variable_defaults` (a JSON object).
    pub defaults: serde_json::Map<String, serde_json::Value>,
}

pub(crate) enum AgentAuthError {
    Unauthorized,
    Database(sqlx::Error),
}

/// The last successful lookup per slug. The initiation webhook uses it only
/// when the database misses the deadline, to still send the organization's
/// placeholder defaults (when the presented secret matches the cached hash).
#[derive(Clone, Default)]
pub(crate) struct AgentAuthCache {
    entries: Arc<Mutex<HashMap<String, CachedOrganization>>>,
}

/// The secret's hash and what authentication returned.
type CachedOrganization = (Vec<u8>, AgentOrganization);

impl AgentAuthCache {
    fn remember(&self, slug: &str, hash: Vec<u8>, organization: AgentOrganization) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the number of organizations whose secret was right.
        entries.insert(slug.to_owned(), (hash, organization));
    }

    /// The cached organization, if the secret matches its cached hash.
    pub fn matching(&self, slug: &str, headers: &HeaderMap) -> Option<AgentOrganization> {
        let secret = presented_secret(headers)?;
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (hash, organization) = entries.get(slug)?;
        secret_matches(secret, hash).then(|| organization.clone())
    }
}

fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AGENT_SECRET_HEADER)?.to_str().ok()?.trim();
    (!value.is_empty() && value.len() <= MAX_SECRET_LEN).then_some(value)
}

fn secret_matches(secret: &str, stored_hash: &[u8]) -> bool {
    bool::from(hash_agent_secret(secret).as_slice().ct_eq(stored_hash))
}

/// Looks the organization up by slug (the `auth_agent_endpoint` SECURITY
/// DEFINER function) and checks the secret header.
pub(crate) async fn authenticate(
    state: &AppState,
    slug: &str,
    headers: &HeaderMap,
) -> Result<AgentOrganization, AgentAuthError> {
    let secret = presented_secret(headers).ok_or(AgentAuthError::Unauthorized)?;
    if slug.len() > 63 {
        return Err(AgentAuthError::Unauthorized);
    }
    let row: Option<(Uuid, Vec<u8>, serde_json::Value)> = sqlx::query_as(
        "SELECT organization_id, agent_secret_hash, dynamic_variable_defaults FROM auth_agent_endpoint($1)",
    )
    .bind(slug)
    .fetch_optional(&state.pool)
    .await
    .map_err(AgentAuthError::Database)?;
    let Some((id, hash, defaults)) = row else {
        // Hash anyway, so an unknown slug costs what a wrong secret costs.
        let _ = secret_matches(secret, &[0; 32]);
        return Err(AgentAuthError::Unauthorized);
    };
    if !secret_matches(secret, &hash) {
        return Err(AgentAuthError::Unauthorized);
    }
    let defaults = match defaults {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let organization = AgentOrganization { id, defaults };
    state.agent_auth.remember(slug, hash, organization.clone());
    let span = tracing::Span::current();
    span.record("organization_id", tracing::field::display(id));
    Ok(organization)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_hash_to_32_bytes() {
        let a = generate_agent_secret();
        let b = generate_agent_secret();
        assert_ne!(a, b);
        assert!(a.starts_with("eas_") && a.len() == 68, "{a}");
        assert_eq!(hash_agent_secret(&a).len(), 32);
        assert!(secret_matches(&a, &hash_agent_secret(&a)));
        assert!(!secret_matches(&b, &hash_agent_secret(&a)));
        assert!(!secret_matches(&a, &[]));
    }

    #[test]
    fn the_header_is_read_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_secret(&headers), None);
        headers.insert(AGENT_SECRET_HEADER, " eas_x ".parse().unwrap());
        assert_eq!(presented_secret(&headers), Some("eas_x"));
        headers.insert(AGENT_SECRET_HEADER, "".parse().unwrap());
        assert_eq!(presented_secret(&headers), None);
        headers.insert(AGENT_SECRET_HEADER, "k".repeat(300).parse().unwrap());
        assert_eq!(presented_secret(&headers), None);
    }
}
