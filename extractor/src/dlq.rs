//! The dead-letter stream for operators: list what is in it, and replay it.
//!
//! A replay sends a dead letter back to its original subject with a bumped
//! generation (a message id with the old generation would be dropped as a
//! duplicate): the conversation goes back to `extraction_pending` with
//! `generation + 1` (the replay transition of the status machine), the event
//! is republished with `event_msg_id(org, conversation, step, generation)`,
//! and only after its PubAck is the dead letter deleted. Each step can be
//! repeated after a crash: a conversation already moved to
//! `extraction_pending` at a newer generation than the dead letter's is
//! republished at that generation (same message id, so no double event
//! inside the duplicate window), then the dead letter is deleted.

use async_nats::jetstream::context::GetStreamErrorKind;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use elaaoms_shared::bus::{
    event_msg_id, Bus, Envelope, Step, DLQ_ATTEMPTS_HEADER, DLQ_ORIGINAL_SUBJECT_HEADER,
    DLQ_REASON_HEADER, DLQ_SERVICE_HEADER,
};
use elaaoms_shared::db;
use elaaoms_shared::domain::{ConversationStatus, TransitionKind};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot read the dead-letter stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("dead letter {sequence}: {reason}")]
    Message { sequence: u64, reason: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// One message of the dead-letter stream, with what its headers and body say.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    pub original_subject: Option<String>,
    pub service: Option<String>,
    pub reason: String,
    pub attempts: Option<u64>,
    pub organization_id: Option<Uuid>,
    pub conversation_id: Option<String>,
    pub generation: Option<i32>,
    payload: Bytes,
}

impl DeadLetter {
    fn envelope(&self) -> Option<Envelope<serde_json::Value>> {
        Envelope::decode(&self.payload).ok()
    }
}

/// Reads every message of the dead-letter stream, oldest first.
pub async fn list(bus: &Bus) -> Result<Vec<DeadLetter>, DlqError> {
    let stream_name = bus.names.dlq_stream();
    let stream_error = |reason: String| DlqError::Stream {
        stream: stream_name.clone(),
        reason,
    };
    let mut stream = match bus.jetstream.get_stream(&stream_name).await {
        Ok(stream) => stream,
        // No worker has started yet: nothing was ever dead-lettered.
        Err(err)
            if matches!(err.kind(), GetStreamErrorKind::JetStream(js)
                if js.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(Vec::new())
        }
        Err(err) => return Err(stream_error(err.to_string())),
    };
    let state = stream
        .info()
        .await
        .map_err(|err| stream_error(err.to_string()))?
        .state
        .clone();
    let mut letters = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return Ok(letters);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            // Deleted (replayed) messages leave gaps.
            Err(err)
                if err.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                continue
            }
            Err(err) => return Err(stream_error(format!("message {sequence}: {err}"))),
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
        };
        let mut letter = DeadLetter {
            sequence,
            time: DateTime::from_timestamp_nanos(
                i64::try_from(message.time.unix_timestamp_nanos()).unwrap_or(0),
            ),
            original_subject: header(DLQ_ORIGINAL_SUBJECT_HEADER),
            service: header(DLQ_SERVICE_HEADER),
            reason: header(DLQ_REASON_HEADER).unwrap_or_default(),
            attempts: header(DLQ_ATTEMPTS_HEADER).and_then(|value| value.parse().ok()),
            organization_id: None,
            conversation_id: None,
            generation: None,
            payload: message.payload,
        };
        if let Some(envelope) = letter.envelope() {
            letter.organization_id = Some(envelope.organization_id);
            letter.generation = Some(envelope.generation);
            letter.conversation_id = envelope
                .payload
                .get("conversation_id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
        }
        letters.push(letter);
    }
    Ok(letters)
}

/// Which dead letters a replay takes; empty means all.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub organization_id: Option<Uuid>,
    pub conversation_id: Option<String>,
    pub reason_contains: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl ReplayFilter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.organization_id
            .is_none_or(|org| letter.organization_id == Some(org))
            && self
                .conversation_id
                .as_deref()
                .is_none_or(|conversation| letter.conversation_id.as_deref() == Some(conversation))
            && self
                .reason_contains
                .as_deref()
                .is_none_or(|text| letter.reason.to_lowercase().contains(&text.to_lowercase()))
            && self.since.is_none_or(|since| letter.time >= since)
            && self.until.is_none_or(|until| letter.time < until)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Republished at this generation and deleted from the dead letters.
    Replayed { generation: i32 },
    /// `--dry-run`: would be republished at this generation.
    WouldReplay { generation: i32 },
    /// The caller was erased: the dead letter is deleted, nothing is sent.
    DroppedErased,
    /// Left in the dead letters, for this reason.
    Skipped(String),
}

/// Replays the dead letters that match `filter`, calling `progress` after
/// each. `admin_pool` is the operator's pool (organization-scoped
/// transactions all the same).
pub async fn replay(
    bus: &Bus,
    admin_pool: &PgPool,
    filter: &ReplayFilter,
    dry_run: bool,
    mut progress: impl FnMut(&DeadLetter, &ReplayOutcome),
) -> Result<Vec<(DeadLetter, ReplayOutcome)>, DlqError> {
    let letters: Vec<DeadLetter> = list(bus)
        .await?
        .into_iter()
        .filter(|letter| filter.matches(letter))
        .collect();
    let stream = bus
        .jetstream
        .get_stream(bus.names.dlq_stream())
        .await
        .map_err(|err| DlqError::Stream {
            stream: bus.names.dlq_stream(),
            reason: err.to_string(),
        })?;
    let mut outcomes = Vec::with_capacity(letters.len());
    for letter in letters {
        let outcome = replay_one(bus, admin_pool, &stream, &letter, dry_run).await?;
        progress(&letter, &outcome);
        outcomes.push((letter, outcome));
    }
    Ok(outcomes)
}

fn step_of(bus: &Bus, subject: &str) -> Option<Step> {
    [Step::Transcribed, Step::Extracted, Step::Indexed]
        .into_iter()
        .find(|step| bus.names.subject(*step) == subject)
}

async fn replay_one(
    bus: &Bus,
    admin_pool: &PgPool,
    stream: &async_nats::jetstream::stream::Stream,
    letter: &DeadLetter,
    dry_run: bool,
) -> Result<ReplayOutcome, DlqError> {
    let skip = |reason: &str| Ok(ReplayOutcome::Skipped(reason.to_owned()));
    let Some(envelope) = letter.envelope() else {
        return skip("the body is not an event envelope");
    };
    let (Some(subject), Some(conversation_id)) =
        (&letter.original_subject, &letter.conversation_id)
    else {
        return skip("no original subject or conversation id");
    };
    let Some(step) = step_of(bus, subject) else {
        return skip("the original subject is not one of this deployment's");
    };
    let organization_id = envelope.organization_id;
    let caller_id = envelope
        .payload
        .get("caller_id")
        .and_then(serde_json::Value::as_str);

    let mut tx = db::begin_org_tx(admin_pool, organization_id).await?;
    if let Some(caller_id) = caller_id {
        if db::is_caller_erased(&mut tx, organization_id, caller_id, None).await? {
            if !dry_run {
                delete(stream, letter.sequence).await?;
            }
            return Ok(ReplayOutcome::DroppedErased);
        }
    }
    let row: Option<(String, i32)> = sqlx::query_as(
        "SELECT status, generation FROM conversations WHERE organization_id = $1 AND conversation_id = $2 FOR UPDATE",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, generation)) = row else {
        return skip("the conversation does not exist");
    };
    let status = ConversationStatus::parse(&status);
    let new_generation = match status {
        Some(status)
            if status.can_transition_to(
                ConversationStatus::ExtractionPending,
                TransitionKind::Replay,
            ) =>
        {
            generation + 1
        }
        // An earlier replay moved it and stopped before the delete.
        Some(ConversationStatus::ExtractionPending) if generation > envelope.generation => {
            generation
        }
        _ => {
            return Ok(ReplayOutcome::Skipped(format!(
                "the conversation is {} at generation {generation}",
                status.map_or("in an unknown status", ConversationStatus::as_str)
            )))
        }
    };
    if dry_run {
        return Ok(ReplayOutcome::WouldReplay {
            generation: new_generation,
        });
    }
    if new_generation > generation {
        let moved = db::transition_conversation(
            &mut tx,
            organization_id,
            conversation_id,
            ConversationStatus::ExtractionPending,
            TransitionKind::Replay,
        )
        .await?;
        if !moved {
            return skip("the conversation changed status meanwhile");
        }
    }
    tx.commit().await?;

    let mut replayed = envelope;
    replayed.id = Uuid::new_v4();
    replayed.occurred_at = Utc::now();
    replayed.generation = new_generation;
    let message_error = |reason: String| DlqError::Message {
        sequence: letter.sequence,
        reason,
    };
    let body = replayed
        .encode()
        .map_err(|err| message_error(err.to_string()))?;
    let msg_id = event_msg_id(organization_id, conversation_id, step, new_generation);
    bus.publish(subject, &msg_id, organization_id, Bytes::from(body))
        .await
        .map_err(|err| message_error(err.to_string()))?;
    delete(stream, letter.sequence).await?;
    Ok(ReplayOutcome::Replayed {
        generation: new_generation,
    })
}

async fn delete(
    stream: &async_nats::jetstream::stream::Stream,
    sequence: u64,
) -> Result<(), DlqError> {
    stream
        .delete_message(sequence)
        .await
        .map(|_| ())
        .map_err(|err| DlqError::Message {
            sequence,
            reason: format!("republished, but cannot delete the dead letter: {err}"),
        })
}
