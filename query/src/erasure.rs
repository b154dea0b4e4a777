//! `DELETE /v1/callers/{caller_id}`: erase everything the organization holds
//! about a caller. Irreversible and audited.
//!
//! Order, chosen so that a failure half-way can be retried safely:
//!
//! 1. commit the tombstone (`erased_callers`, by `db::caller_hash`) first:
//!    from then on every worker drops the caller's in-flight events, so
//!    nothing is brought back while the rest runs;
//! 2. delete the payload directories of the caller's conversations and the
//!    caller's messages in both streams (`ELAAOMS` and `ELAAOMS_DLQ`: every
//!    event payload carries `caller_id`, dead letters keep the original
//!    body). The stream scan reads each stream once (see
//!    `Bus::purge_matching`): its cost grows with the stream's size, which
//!    is bounded (24 h of events; dead letters until replayed);
//! 3. in one transaction: delete the memories (their `memory_sources`
//!    cascade), the applied-extraction records and outbox rows of the
//!    caller's conversations, the conversations, the pending calls and the
//!    caller row; write the tombstone again (idempotent) and an audit row
//!    with every count (the caller only as a hash).
//!
//! If step 2 fails the answer is 503 and the rows are still there, so a
//! retry finds the same conversations and finishes the job. The answer is
//! 200 with what was removed; a second erasure finds nothing and answers 200
//! with zero counts (`caller_found: false`): erasure is idempotent, and it
//! still sweeps the streams, which may hold a caller the database never saw.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::Json;
use elaaoms_shared::bus::{Envelope, ORGANIZATION_HEADER};
use elaaoms_shared::db::caller_hash;
use elaaoms_shared::domain::CallerId;
use elaaoms_shared::http::ApiError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Organization;
use crate::error::database_error;
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErasureReport {
    pub caller_id: String,
    /// Whether the organization had a caller row for this number.
    pub caller_found: bool,
    pub memories_deleted: u64,
    pub conversations_deleted: u64,
    pub pending_calls_deleted: u64,
    pub outbox_rows_deleted: u64,
    pub payload_directories_deleted: u64,
    pub stream_messages_deleted: u64,
    /// Always true: the tombstone exists after any successful erasure.
    pub tombstoned: bool,
}

/// The part of every event payload erasure matches on.
#[derive(Serialize, Deserialize)]
struct CallerRef {
    #[serde(default)]
    caller_id: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
}

const CONVERSATIONS_SQL: &str =
    "SELECT conversation_id FROM conversations WHERE organization_id = $1 AND caller_id = $2";

/// Erases everything the organization holds about a caller (irreversible,
/// audited, idempotent).
#[utoipa::path(
    delete,
    path = "/v1/callers/{caller_id}",
    tag = "memories",
    params(("caller_id" = String, Path, description = "The caller's phone number or id")),
    responses((status = 200, description = "What was removed; zero counts when nothing was left", body = ErasureReport)),
    security(("bearer" = [])),
)]
pub(crate) async fn erase_caller(
    State(state): State<AppState>,
    organization: Organization,
    Path(caller_id): Path<String>,
) -> Result<Json<ErasureReport>, ApiError> {
    let caller_id = CallerId::new(caller_id)?;
    let caller = caller_id.as_str();
    let org = organization.id;
    let db = |context: &'static str| move |err| database_error(context, err);

    // 1. The tombstone, committed before anything else.
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, org)
        .await
        .map_err(db("opening an erasure transaction"))?;
    insert_tombstone(&mut tx, org, caller)
        .await
        .map_err(db("writing an erasure tombstone"))?;
    let conversations: Vec<String> = sqlx::query_scalar(CONVERSATIONS_SQL)
        .bind(org)
        .bind(caller)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("listing a caller's conversations"))?;
    tx.commit()
        .await
        .map_err(db("committing an erasure tombstone"))?;

    // 2. Files and streams.
    let mut payload_directories_deleted = delete_payload_dirs(&state, &conversations).await?;
    let stream_messages_deleted = purge_streams(&state, org, caller, &conversations).await?;

    // 3. The rows, in one transaction.
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, org)
        .await
        .map_err(db("opening an erasure transaction"))?;
    // Conversations that arrived meanwhile are deleted below too; their
    // payload directories are removed after the commit.
    let all_conversations: Vec<String> = sqlx::query_scalar(CONVERSATIONS_SQL)
        .bind(org)
        .bind(caller)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("listing a caller's conversations"))?;
    let memories_deleted = execute(
        &mut tx,
        "DELETE FROM memories WHERE organization_id = $1 AND caller_id = $2",
        org,
        caller,
    )
    .await
    .map_err(db("deleting a caller's memories"))?;
    sqlx::query(
        "DELETE FROM applied_extractions WHERE organization_id = $1 AND conversation_id = ANY($2)",
    )
    .bind(org)
    .bind(&all_conversations)
    .execute(&mut *tx)
    .await
    .map_err(db("deleting a caller's extraction records"))?;
    // Outbox message ids are `{org}:{conversation}:{step}:{generation}`.
    let outbox_rows_deleted = sqlx::query(
        "DELETE FROM outbox WHERE organization_id = $1 AND split_part(msg_id, ':', 2) = ANY($2)",
    )
    .bind(org)
    .bind(&all_conversations)
    .execute(&mut *tx)
    .await
    .map_err(db("deleting a caller's outbox rows"))?
    .rows_affected();
    let conversations_deleted = execute(
        &mut tx,
        "DELETE FROM conversations WHERE organization_id = $1 AND caller_id = $2",
        org,
        caller,
    )
    .await
    .map_err(db("deleting a caller's conversations"))?;
    let pending_calls_deleted = execute(
        &mut tx,
        "DELETE FROM pending_calls WHERE organization_id = $1 AND caller_id = $2",
        org,
        caller,
    )
    .await
    .map_err(db("deleting a caller's pending calls"))?;
    let caller_found = execute(
        &mut tx,
        "DELETE FROM callers WHERE organization_id = $1 AND caller_id = $2",
        org,
        caller,
    )
    .await
    .map_err(db("deleting a caller"))?
        > 0;
    insert_tombstone(&mut tx, org, caller)
        .await
        .map_err(db("writing an erasure tombstone"))?;
    let late: Vec<String> = {
        let known: HashSet<&String> = conversations.iter().collect();
        all_conversations
            .iter()
            .filter(|id| !known.contains(id))
            .cloned()
            .collect()
    };
    sqlx::query(
        "INSERT INTO erasure_audit (organization_id, caller_hash, memories_deleted,
             conversations_deleted, pending_calls_deleted, outbox_rows_deleted,
             payload_dirs_deleted, stream_messages_deleted)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(org)
    .bind(caller_hash(caller))
    .bind(count(memories_deleted))
    .bind(count(conversations_deleted))
    .bind(count(pending_calls_deleted))
    .bind(count(outbox_rows_deleted))
    .bind(count(payload_directories_deleted))
    .bind(count(stream_messages_deleted))
    .execute(&mut *tx)
    .await
    .map_err(db("writing the erasure audit row"))?;
    tx.commit().await.map_err(db("committing an erasure"))?;
    payload_directories_deleted += delete_payload_dirs(&state, &late).await?;

    tracing::info!(
        memories_deleted,
        conversations_deleted,
        pending_calls_deleted,
        payload_directories_deleted,
        stream_messages_deleted,
        "caller erased"
    );
    Ok(Json(ErasureReport {
        caller_id: caller.to_owned(),
        caller_found,
        memories_deleted,
        conversations_deleted,
        pending_calls_deleted,
        outbox_rows_deleted,
        payload_directories_deleted,
        stream_messages_deleted,
        tombstoned: true,
    }))
}

fn count(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

async fn insert_tombstone(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    org: Uuid,
    caller: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO erased_callers (organization_id, caller_hash) VALUES ($1, $2)
         ON CONFLICT (organization_id, caller_hash) DO UPDATE SET erased_at = now()",
    )
    .bind(org)
    .bind(caller_hash(caller))
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

async fn execute(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    sql: &'static str,
    org: Uuid,
    caller: &str,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(sql)
        .bind(org)
        .bind(caller)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// Deletes every payload of each conversation (locally its
/// `{PAYLOAD_DIR}/{conversation_id}/` directory); returns how many existed.
async fn delete_payload_dirs(state: &AppState, conversations: &[String]) -> Result<u64, ApiError> {
    let mut deleted = 0;
    for conversation_id in conversations {
        match state.payloads.delete_conversation(conversation_id).await {
            Ok(true) => deleted += 1,
            Ok(false) => {}
            Err(err) => {
                return Err(ApiError::unavailable(
                    &format!("erasure: deleting the payloads of {conversation_id}"),
                    &err,
                ))
            }
        }
    }
    Ok(deleted)
}

/// Deletes the caller's messages from the event and dead-letter streams:
/// this organization's events whose payload names the caller or one of the
/// caller's conversations.
async fn purge_streams(
    state: &AppState,
    org: Uuid,
    caller: &str,
    conversations: &[String],
) -> Result<u64, ApiError> {
    let org_text = org.to_string();
    let conversations: HashSet<&str> = conversations.iter().map(String::as_str).collect();
    let mut deleted = 0;
    for stream in [state.bus.names.event_stream(), state.bus.names.dlq_stream()] {
        deleted += state
            .bus
            .purge_matching(&stream, |headers, payload| {
                // The header is a cheap pre-filter; the envelope decides.
                let other_org = headers
                    .and_then(|h| h.get(ORGANIZATION_HEADER))
                    .is_some_and(|value| value.as_str() != org_text);
                if other_org {
                    return false;
                }
                let Ok(envelope) = Envelope::<CallerRef>::decode(payload) else {
                    return false;
                };
                envelope.organization_id == org
                    && (envelope.payload.caller_id.as_deref() == Some(caller)
                        || envelope
                            .payload
                            .conversation_id
                            .as_deref()
                            .is_some_and(|id| conversations.contains(id)))
            })
            .await
            .map_err(|err| {
                ApiError::unavailable(&format!("erasure: purging stream {stream}"), &err)
            })?;
    }
    Ok(deleted)
}
