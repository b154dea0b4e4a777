//! Missed webhooks: list an organization's conversations from the
//! ElevenLabs API and ingest those we never received, through the same path
//! as a webhook (payload file, one transaction, outbox, publish).
//!
//! `GET {base}/v1/convai/conversations?agent_id=&cursor=&call_start_after_unix=`
//! pages through summaries; `GET {base}/v1/convai/conversations/{id}` returns
//! the same `data` a `post_call_transcription` webhook carries.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use elaaoms_shared::bus::Bus;
use elaaoms_shared::db;
use elaaoms_shared::payload_store::{PayloadKind, PayloadStore};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::webhook::{parse_webhook_with, ParseOptions, Webhook};
use crate::{outbox, persist};

pub const DEFAULT_BASE_URL: &str = "https://api.elevenlabs.io";
/// Attempts per API request (429 and 5xx are retried).
const ATTEMPTS: u32 = 5;
/// Longest wait we accept from a Retry-After header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("unknown organization `{0}`")]
    UnknownOrganization(String),
    #[error("ElevenLabs API {url}: {reason}")]
    Api { url: String, reason: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot store the payload of {conversation_id}: {source}")]
    Store {
        conversation_id: String,
        #[source]
        source: elaaoms_shared::payload_store::PayloadStoreError,
    },
    #[error("cannot record {conversation_id}: {source}")]
    Record {
        conversation_id: String,
        #[source]
        source: persist::PersistError,
    },
}

/// What a backfill run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackfillReport {
    /// Conversations the API listed since the start time.
    pub listed: usize,
    /// Already received (webhook or an earlier backfill).
    pub already_present: usize,
    /// Ingested now.
    pub ingested: Vec<String>,
    /// Not finished on ElevenLabs' side yet (status other than `done`).
    pub not_done: usize,
    /// Stored but not extracted: no caller (see the web-call rule).
    pub without_caller: usize,
    /// Refused by the parser (logged with the reason).
    pub invalid: usize,
}

pub struct ElevenLabsClient {
    http: reqwest::Client,
    base_url: String,
    api_key: SecretString,
}

#[derive(Deserialize)]
struct ConversationPage {
    #[serde(default)]
    conversations: Vec<ConversationSummary>,
    #[serde(default)]
    has_more: bool,
    next_cursor: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ConversationSummary {
    pub conversation_id: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub start_time_unix_secs: Option<i64>,
    #[serde(default)]
    pub status: Option<String>,
}

impl ElevenLabsClient {
    pub fn new(base_url: &str, api_key: SecretString) -> Result<Self, BackfillError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| BackfillError::Api {
                url: base_url.to_owned(),
                reason: err.to_string(),
            })?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    /// GET with the API key; 429 (honouring Retry-After), 5xx and transport
    /// errors are retried with backoff.
    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Bytes, BackfillError> {
        let url = format!("{}{path}", self.base_url);
        let api_error = |reason: String| BackfillError::Api {
            url: url.clone(),
            reason,
        };
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            let sent = self
                .http
                .get(&url)
                .query(query)
                .header("xi-api-key", self.api_key.expose_secret())
                .send()
                .await;
            let retry_reason = match sent {
                Ok(response) if response.status().is_success() => {
                    return response
                        .bytes()
                        .await
                        .map_err(|err| api_error(err.to_string()));
                }
                Ok(response)
                    if response.status().as_u16() == 429 || response.status().is_server_error() =>
                {
                    if let Some(wait) = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                    {
                        delay = Duration::from_secs(wait).min(MAX_RETRY_AFTER);
                    }
                    format!("HTTP {}", response.status())
                }
                Ok(response) => return Err(api_error(format!("HTTP {}", response.status()))),
                Err(err) => err.to_string(),
            };
            if attempt == ATTEMPTS {
                return Err(api_error(format!(
                    "{retry_reason} after {ATTEMPTS} attempts"
                )));
            }
            tracing::warn!(%url, attempt, reason = retry_reason, ?delay, "ElevenLabs API request failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_AFTER);
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Every conversation started at or after `since` (all agents, or one).
    pub async fn list_conversations(
        &self,
        agent_id: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<Vec<ConversationSummary>, BackfillError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![
                ("call_start_after_unix", since.timestamp().to_string()),
                ("page_size", "100".to_owned()),
            ];
            if let Some(agent_id) = agent_id {
                query.push(("agent_id", agent_id.to_owned()));
            }
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor.clone()));
            }
            let body = self.get("/v1/convai/conversations", &query).await?;
            let page: ConversationPage =
                serde_json::from_slice(&body).map_err(|err| BackfillError::Api {
                    url: format!("{}/v1/convai/conversations", self.base_url),
                    reason: format!("unexpected answer: {err}"),
                })?;
            // The API filters too; this keeps us right if it does not.
            all.extend(page.conversations.into_iter().filter(|c| {
                c.start_time_unix_secs
                    .is_none_or(|t| t >= since.timestamp())
            }));
            match page.next_cursor {
                Some(next) if page.has_more && cursor.as_deref() != Some(next.as_str()) => {
                    cursor = Some(next)
                }
                _ => return Ok(all),
            }
        }
    }

    /// One conversation, as the `data` of a transcription webhook.
    pub async fn conversation(
        &self,
        conversation_id: &str,
    ) -> Result<serde_json::Value, BackfillError> {
        let path = format!("/v1/convai/conversations/{conversation_id}");
        let body = self.get(&path, &[]).await?;
        serde_json::from_slice(&body).map_err(|err| BackfillError::Api {
            url: format!("{}{path}", self.base_url),
            reason: format!("unexpected answer: {err}"),
        })
    }
}

/// Everything a backfill needs.
pub struct Backfill<'a> {
    pub pool: &'a PgPool,
    pub bus: &'a Bus,
    pub payloads: &'a PayloadStore,
    pub client: &'a ElevenLabsClient,
    pub parse_options: &'a ParseOptions,
}

impl Backfill<'_> {
    /// Ingests the organization's conversations since `since` that are not
    /// in the database yet. Safe to run again: what is present is skipped,
    /// and recording is idempotent anyway.
    pub async fn run(
        &self,
        organization_slug: &str,
        agent_id: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<BackfillReport, BackfillError> {
        let organization_id: Uuid =
            sqlx::query_scalar("SELECT organization_id FROM auth_webhook_secrets($1)")
                .bind(organization_slug)
                .fetch_optional(self.pool)
                .await?
                .ok_or_else(|| BackfillError::UnknownOrganization(organization_slug.to_owned()))?;
        let listed = self.client.list_conversations(agent_id, since).await?;
        let present = self.known_conversations(organization_id).await?;
        let mut report = BackfillReport {
            listed: listed.len(),
            ..BackfillReport::default()
        };
        let latency = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(
            "backfill_publish",
            "unused",
        ))
        .expect("valid histogram");
        for summary in listed {
            if present.contains(&summary.conversation_id) {
                report.already_present += 1;
                continue;
            }
            if summary
                .status
                .as_deref()
                .is_some_and(|status| status != "done")
            {
                report.not_done += 1;
                continue;
            }
            let data = self.client.conversation(&summary.conversation_id).await?;
            let body = serde_json::to_vec(&serde_json::json!({
                "type": "post_call_transcription",
                "event_timestamp": Utc::now().timestamp(),
                "data": data,
            }))
            .expect("JSON values serialise");
            let transcription = match parse_webhook_with(&body, self.parse_options) {
                Ok(Webhook::Transcription(transcription)) => transcription,
                Ok(_) => unreachable!("the body is built as a transcription"),
                Err(err) => {
                    tracing::warn!(conversation_id = summary.conversation_id, error = %err, "conversation from the API refused");
                    report.invalid += 1;
                    continue;
                }
            };
            // The listing and the conversation must agree, or the payload
            // would be filed under a name the API did not give.
            if transcription.conversation_id.as_str() != summary.conversation_id {
                tracing::warn!(
                    conversation_id = summary.conversation_id,
                    "the API answered another conversation"
                );
                report.invalid += 1;
                continue;
            }
            let conversation_id = summary.conversation_id.clone();
            let store_error = |source| BackfillError::Store {
                conversation_id: conversation_id.clone(),
                source,
            };
            self.payloads
                .put(&conversation_id, PayloadKind::Transcription, body)
                .await
                .map_err(store_error)?;
            let Some(caller_id) = transcription.caller_id.as_ref() else {
                tracing::warn!(
                    conversation_id,
                    "backfilled transcript stored but not extracted: no caller id"
                );
                report.without_caller += 1;
                continue;
            };
            let key = self
                .payloads
                .key_of(&conversation_id, PayloadKind::Transcription)
                .map_err(store_error)?;
            let recorded = persist::record_transcription(
                self.pool,
                self.bus,
                organization_id,
                &transcription,
                caller_id,
                &key,
                // A backfilled conversation starts its own trace.
                &elaaoms_shared::trace::TraceParent::new_root(),
            )
            .await
            .map_err(|source| BackfillError::Record {
                conversation_id: conversation_id.clone(),
                source,
            })?;
            if let Some(pending) = &recorded.pending {
                if let Err(err) =
                    outbox::publish_one(self.pool, self.bus, organization_id, pending, &latency)
                        .await
                {
                    tracing::warn!(conversation_id, error = %err, "not published now; ingest's outbox relay will");
                }
            }
            tracing::info!(conversation_id, "backfilled");
            report.ingested.push(conversation_id);
        }
        Ok(report)
    }

    async fn known_conversations(
        &self,
        organization_id: Uuid,
    ) -> Result<HashSet<String>, sqlx::Error> {
        let mut tx = db::begin_org_tx(self.pool, organization_id).await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT conversation_id FROM conversations WHERE organization_id = $1",
        )
        .bind(organization_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids.into_iter().collect())
    }
}
