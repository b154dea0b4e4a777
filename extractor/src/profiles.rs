//! Agent profiles (name and purpose) from the ElevenLabs agent API
//! (`GET /v1/convai/agents/{agent_id}`), cached in process and in Postgres
//! (`agents.profile`, `agents.profile_cached_at`) for a TTL.
//!
//! A profile only improves the prompt: a failed fetch is logged and the
//! extraction goes on with the stale profile, or none. Without an
//! ElevenLabs key nothing is fetched; what Postgres knows is used as is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use elaaoms_shared::db;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::prompt::AgentProfile;

/// The agent's instructions are long; the prompt needs what it is for.
const MAX_PURPOSE_CHARS: usize = 1_000;

pub struct ProfileSettings {
    pub api_key: Option<SecretString>,
    pub base_url: String,
    pub ttl: Duration,
    pub timeout: Duration,
}

/// Per (organization, agent): the profile (or knowing there is none) and when it was learnt.
type ProcessCache = HashMap<(Uuid, String), (Option<AgentProfile>, Instant)>;
/// `agents.name`, `agents.profile`, `agents.profile_cached_at`.
type AgentRow = (Option<String>, Option<Value>, Option<DateTime<Utc>>);

pub struct AgentProfiles {
    http: reqwest::Client,
    settings: ProfileSettings,
    cache: Mutex<ProcessCache>,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("ElevenLabs answered HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("cannot reach ElevenLabs: {0}")]
    Http(#[from] reqwest::Error),
}

impl AgentProfiles {
    pub fn new(http: reqwest::Client, settings: ProfileSettings) -> Self {
        Self {
            http,
            settings,
            cache: Mutex::default(),
        }
    }

    /// The agent's profile, from the process cache, Postgres or ElevenLabs
    /// (in that order, each within the TTL). Never fails.
    pub async fn get(
        &self,
        pool: &PgPool,
        organization_id: Uuid,
        agent_id: &str,
    ) -> Option<AgentProfile> {
        let key = (organization_id, agent_id.to_owned());
        if let Some((profile, at)) = self.cache.lock().expect("profile cache lock").get(&key) {
            if at.elapsed() < self.settings.ttl {
                return profile.clone();
            }
        }
        let stored = match load(pool, organization_id, agent_id).await {
            Ok(stored) => stored,
            Err(err) => {
                tracing::warn!(agent_id, error = %err, "cannot read the cached agent profile");
                None
            }
        };
        let fresh = |cached_at: &Option<DateTime<Utc>>| {
            cached_at.is_some_and(|at| {
                Utc::now()
                    .signed_duration_since(at)
                    .to_std()
                    .unwrap_or_default()
                    < self.settings.ttl
            })
        };
        let profile = match (&self.settings.api_key, stored) {
            (_, Some((profile, cached_at))) if fresh(&cached_at) => profile,
            (None, stored) => stored.and_then(|(profile, _)| profile),
            (Some(api_key), stored) => match self.fetch(api_key, agent_id).await {
                Ok(profile) => {
                    if let Err(err) = save(pool, organization_id, agent_id, &profile).await {
                        tracing::warn!(agent_id, error = %err, "cannot cache the agent profile");
                    }
                    Some(profile)
                }
                Err(err) => {
                    tracing::warn!(agent_id, error = %err, "agent profile fetch failed; extracting without a fresh one");
                    // Not cached in process: the next conversation tries again.
                    return stored.and_then(|(profile, _)| profile);
                }
            },
        };
        self.cache
            .lock()
            .expect("profile cache lock")
            .insert(key, (profile.clone(), Instant::now()));
        profile
    }

    async fn fetch(
        &self,
        api_key: &SecretString,
        agent_id: &str,
    ) -> Result<AgentProfile, FetchError> {
        let url = format!(
            "{}/v1/convai/agents/{}",
            self.settings.base_url.trim_end_matches('/'),
            utf8_percent_encode(agent_id)
        );
        let response = self
            .http
            .get(url)
            .timeout(self.settings.timeout)
            .header("xi-api-key", api_key.expose_secret())
            .send()
            .await
            .map_err(reqwest::Error::without_url)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        let body: Value = response.json().await.map_err(reqwest::Error::without_url)?;
        Ok(profile_from_agent(&body))
    }
}

/// Agent ids are ElevenLabs' (`agent_...`), but nothing stops a path
/// separator from arriving in a webhook.
fn utf8_percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Name and purpose from the agent API's answer; only these are kept (the
/// agent's configuration may name tools and webhooks we have no use for).
pub fn profile_from_agent(body: &Value) -> AgentProfile {
    let text = |pointer: &str| {
        body.pointer(pointer)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .map(str::to_owned)
    };
    AgentProfile {
        name: text("/name"),
        purpose: text("/conversation_config/agent/prompt/prompt")
            .map(|prompt| prompt.chars().take(MAX_PURPOSE_CHARS).collect()),
    }
}

type Stored = Option<(Option<AgentProfile>, Option<DateTime<Utc>>)>;

async fn load(pool: &PgPool, organization_id: Uuid, agent_id: &str) -> Result<Stored, sqlx::Error> {
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    let row: Option<AgentRow> = sqlx::query_as(
        "SELECT name, profile, profile_cached_at FROM agents WHERE organization_id = $1 AND agent_id = $2",
    )
    .bind(organization_id)
    .bind(agent_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.map(|(name, profile, cached_at)| {
        let profile = profile
            .and_then(|value| serde_json::from_value::<AgentProfile>(value).ok())
            .or_else(|| {
                name.clone().map(|name| AgentProfile {
                    name: Some(name),
                    purpose: None,
                })
            });
        (profile, cached_at)
    }))
}

async fn save(
    pool: &PgPool,
    organization_id: Uuid,
    agent_id: &str,
    profile: &AgentProfile,
) -> Result<(), sqlx::Error> {
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    // The row exists (the conversation refers to it); the insert covers an
    // agent seen first here.
    sqlx::query(
        "INSERT INTO agents (organization_id, agent_id, name, profile, profile_cached_at)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (organization_id, agent_id) DO UPDATE
            SET name = COALESCE(EXCLUDED.name, agents.name), profile = EXCLUDED.profile,
                profile_cached_at = EXCLUDED.profile_cached_at",
    )
    .bind(organization_id)
    .bind(agent_id)
    .bind(profile.name.as_deref())
    .bind(serde_json::to_value(profile).expect("a profile serialises"))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_and_purpose_come_from_the_agent_config() {
        let body = serde_json::json!({
            "agent_id": "agent_1",
            "name": "Bright Smile Dental",
            "conversation_config": {"agent": {"first_message": "Hi!", "prompt": {"prompt": "You book appointments.", "llm": "gpt-4o"}}},
            "platform_settings": {"workspace_overrides": {"webhooks": {"url": "https://secret"}}}
        });
        let profile = profile_from_agent(&body);
        assert_eq!(profile.name.as_deref(), Some("Bright Smile Dental"));
        assert_eq!(profile.purpose.as_deref(), Some("You book appointments."));
        assert_eq!(
            profile_from_agent(&serde_json::json!({})),
            AgentProfile::default()
        );
        assert_eq!(utf8_percent_encode("agent_1/../x"), "agent_1%2F..%2Fx");
    }
}
