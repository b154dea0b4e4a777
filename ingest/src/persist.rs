//! The one transaction per webhook: caller, conversation, status and the
//! outbox row, committed together (DESIGN.md section 4, step 2).

use elaaoms_shared::bus::{event_msg_id, Bus, Envelope, Step};
use elaaoms_shared::db::{self, transition_conversation};
use elaaoms_shared::domain::{CallerId, ConversationStatus, TransitionKind};
use elaaoms_shared::events::ConversationTranscribed;
use elaaoms_shared::trace::TraceParent;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::webhook::{InitiationFailure, Transcription};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot encode the event: {0}")]
    Encode(#[from] elaaoms_shared::bus::BusError),
    #[error("conversation has an unknown status `{0}`")]
    UnknownStatus(String),
}

/// An outbox row waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub subject: String,
    pub msg_id: String,
    pub body: Vec<u8>,
    /// The W3C `traceparent` to publish with (NULL on rows older than the
    /// column).
    pub traceparent: Option<String>,
}

async fn ensure_agent_and_caller(
    tx: &mut Transaction<'_, Postgres>,
    organization_id: Uuid,
    agent_id: &str,
    caller_id: &str,
    seen_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agents (organization_id, agent_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(organization_id)
    .bind(agent_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
         VALUES ($1, $2, $3, $3, 0) ON CONFLICT DO NOTHING",
    )
    .bind(organization_id)
    .bind(caller_id)
    .bind(seen_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Counts a conversation the first time it is recorded, never again.
async fn count_conversation(
    tx: &mut Transaction<'_, Postgres>,
    organization_id: Uuid,
    caller_id: &str,
    seen_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE callers SET total_conversations = total_conversations + 1,
                            first_seen_at = LEAST(first_seen_at, $3),
                            last_seen_at = GREATEST(last_seen_at, $3)
          WHERE organization_id = $1 AND caller_id = $2",
    )
    .bind(organization_id)
    .bind(caller_id)
    .bind(seen_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Events whose encoded body is larger than this carry a reference to the
/// payload file instead of their turns: NATS refuses messages over its
/// `max_payload` (1 MiB by default), and headers need room too.
pub const MAX_INLINE_EVENT_BYTES: usize = 900 * 1024;

/// What recording a transcript did.
#[derive(Debug)]
pub struct RecordedTranscription {
    /// The outbox row still to publish: always returned while it is
    /// unpublished, whoever inserted it, so a crash between commit and
    /// publish or a concurrent duplicate cannot lose the event.
    pub pending: Option<OutboxRow>,
    /// Whether this delivery created the conversation (and counted it for
    /// the caller).
    pub new_conversation: bool,
    /// The conversation's status after the transaction.
    pub status: ConversationStatus,
    /// Whether the event refers to the payload file instead of carrying the
    /// turns.
    pub by_reference: bool,
}

/// Records a transcript and queues its event, in one transaction.
///
/// Only a conversation now `extraction_pending` gets an outbox row: a
/// transcript for one already extracted (or failed) is acknowledged and not
/// extracted again; replays are an operator's decision. `payload_key` is the
/// payload store's key of the stored body, used when the event is too large
/// to carry the turns. `trace` is the webhook's span of its trace: the event
/// is published with it as its `traceparent`.
pub async fn record_transcription(
    pool: &PgPool,
    bus: &Bus,
    organization_id: Uuid,
    transcription: &Transcription,
    caller_id: &CallerId,
    payload_key: &str,
    trace: &TraceParent,
) -> Result<RecordedTranscription, PersistError> {
    let conversation_id = transcription.conversation_id.as_str();
    let caller_id = caller_id.as_str();
    let agent_id = transcription.agent_id.as_str();
    let ended_at = transcription.duration_secs.and_then(|secs| {
        transcription
            .started_at
            .checked_add_signed(chrono::Duration::seconds(secs))
    });

    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    ensure_agent_and_caller(
        &mut tx,
        organization_id,
        agent_id,
        caller_id,
        transcription.started_at,
    )
    .await?;
    let new_conversation = sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time,
                                    end_time, duration_secs, status, call_sid)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'completed', $8)
         ON CONFLICT (organization_id, conversation_id) DO NOTHING",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .bind(agent_id)
    .bind(caller_id)
    .bind(transcription.started_at)
    .bind(ended_at)
    .bind(transcription.duration_secs.and_then(|secs| i32::try_from(secs).ok()))
    .bind(transcription.call_sid.as_deref())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if new_conversation {
        count_conversation(
            &mut tx,
            organization_id,
            caller_id,
            transcription.started_at,
        )
        .await?;
    } else {
        // A call we saw start (initiated or active) has now ended.
        transition_conversation(
            &mut tx,
            organization_id,
            conversation_id,
            ConversationStatus::Completed,
            TransitionKind::Normal,
        )
        .await?;
    }
    transition_conversation(
        &mut tx,
        organization_id,
        conversation_id,
        ConversationStatus::ExtractionPending,
        TransitionKind::Normal,
    )
    .await?;
    let (status, generation): (String, i32) = sqlx::query_as(
        "SELECT status, generation FROM conversations WHERE organization_id = $1 AND conversation_id = $2",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .fetch_one(&mut *tx)
    .await?;
    let status = ConversationStatus::parse(&status).ok_or(PersistError::UnknownStatus(status))?;

    let msg_id = event_msg_id(
        organization_id,
        conversation_id,
        Step::Transcribed,
        generation,
    );
    let mut by_reference = false;
    if status == ConversationStatus::ExtractionPending {
        let mut event = Envelope::new(
            organization_id,
            generation,
            ConversationTranscribed {
                conversation_id: conversation_id.to_owned(),
                agent_id: agent_id.to_owned(),
                caller_id: caller_id.to_owned(),
                started_at: transcription.started_at,
                turns: transcription.turns.clone(),
                payload_ref: None,
            },
        );
        let mut body = event.encode()?;
        if body.len() > MAX_INLINE_EVENT_BYTES {
            event.payload.turns = Vec::new();
            event.payload.payload_ref = Some(payload_key.to_owned());
            body = event.encode()?;
            by_reference = true;
        }
        sqlx::query(
            "INSERT INTO outbox (organization_id, subject, msg_id, body, traceparent)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (msg_id) DO NOTHING",
        )
        .bind(organization_id)
        .bind(bus.names.subject(Step::Transcribed))
        .bind(&msg_id)
        .bind(body)
        .bind(trace.to_string())
        .execute(&mut *tx)
        .await?;
    }
    let pending: Option<OutboxRow> = sqlx::query_as(
        "SELECT id, subject, msg_id, body, traceparent FROM outbox
          WHERE organization_id = $1 AND msg_id = $2 AND published_at IS NULL",
    )
    .bind(organization_id)
    .bind(&msg_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(RecordedTranscription {
        pending,
        new_conversation,
        status,
        by_reference,
    })
}

/// A call that never connected: the conversation is `failed` with its
/// reason; nothing is published.
pub async fn record_initiation_failure(
    pool: &PgPool,
    organization_id: Uuid,
    failure: &InitiationFailure,
) -> Result<(), PersistError> {
    let now = chrono::Utc::now();
    let conversation_id = failure.conversation_id.as_str();
    let caller_id = failure.caller_id.as_str();
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    ensure_agent_and_caller(
        &mut tx,
        organization_id,
        failure.agent_id.as_str(),
        caller_id,
        now,
    )
    .await?;
    let inserted = sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time,
                                    status, call_sid, failure_reason)
         VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7)
         ON CONFLICT (organization_id, conversation_id) DO NOTHING",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .bind(failure.agent_id.as_str())
    .bind(caller_id)
    .bind(now)
    .bind(failure.call_sid.as_deref())
    .bind(&failure.failure_reason)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !inserted
        && transition_conversation(
            &mut tx,
            organization_id,
            conversation_id,
            ConversationStatus::Failed,
            TransitionKind::Normal,
        )
        .await?
    {
        sqlx::query("UPDATE conversations SET failure_reason = $3 WHERE organization_id = $1 AND conversation_id = $2")
            .bind(organization_id)
            .bind(conversation_id)
            .bind(&failure.failure_reason)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
