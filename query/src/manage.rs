//! One memory and one conversation: `GET /v1/memories/{id}`,
//! `DELETE /v1/memories/{id}` (its `memory_sources` go with it) and
//! `GET /v1/conversations/{id}` (status, generation, timestamps). Anything
//! of another organization is a 404, like anything that does not exist.

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use elaaoms_shared::domain::{ConversationId, ValidationError};
use elaaoms_shared::http::ApiError;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Organization;
use crate::error::database_error;
use crate::memory::{MemoryView, MEMORY_COLUMNS};
use crate::AppState;

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct MemoryDetail {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub memory: MemoryView,
    pub caller_id: String,
    pub resolved_at: Option<DateTime<Utc>>,
    pub embedding_model: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct MemoryDeleted {
    pub memory_id: Uuid,
    pub deleted: bool,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct ConversationView {
    pub conversation_id: String,
    pub agent_id: String,
    pub caller_id: String,
    pub status: String,
    pub generation: i32,
    pub start_time: DateTime<Utc>,
    pub end_time: Option<DateTime<Utc>>,
    pub duration_secs: Option<i32>,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Memories whose first source is this conversation.
    pub memory_count: i64,
}

fn memory_id(raw: &str) -> Result<Uuid, ValidationError> {
    Uuid::parse_str(raw).map_err(|_| ValidationError::new("memory_id", "must be a UUID"))
}

/// One memory with every field.
#[utoipa::path(
    get,
    path = "/v1/memories/{memory_id}",
    tag = "memories",
    params(("memory_id" = uuid::Uuid, Path, description = "The memory's id")),
    responses(
        (status = 200, description = "The memory", body = MemoryDetail),
        (status = 404, description = "No such memory in this organization", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn get_memory(
    State(state): State<AppState>,
    organization: Organization,
    Path(raw): Path<String>,
) -> Result<Json<MemoryDetail>, ApiError> {
    let id = memory_id(&raw)?;
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id)
        .await
        .map_err(|err| database_error("opening a memory transaction", err))?;
    let found: Option<MemoryDetail> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {MEMORY_COLUMNS}, m.caller_id, m.resolved_at, m.embedding_model
           FROM memories m WHERE m.organization_id = $1 AND m.id = $2"
    )))
    .bind(organization.id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|err| database_error("reading a memory", err))?;
    tx.commit()
        .await
        .map_err(|err| database_error("closing a memory transaction", err))?;
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found("memory not found"))
}

/// Deletes one memory and its sources.
#[utoipa::path(
    delete,
    path = "/v1/memories/{memory_id}",
    tag = "memories",
    params(("memory_id" = uuid::Uuid, Path, description = "The memory's id")),
    responses(
        (status = 200, description = "Deleted", body = MemoryDeleted),
        (status = 404, description = "No such memory in this organization", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn delete_memory(
    State(state): State<AppState>,
    organization: Organization,
    Path(raw): Path<String>,
) -> Result<Json<MemoryDeleted>, ApiError> {
    let id = memory_id(&raw)?;
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id)
        .await
        .map_err(|err| database_error("opening a memory transaction", err))?;
    let deleted = sqlx::query("DELETE FROM memories WHERE organization_id = $1 AND id = $2")
        .bind(organization.id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|err| database_error("deleting a memory", err))?
        .rows_affected();
    tx.commit()
        .await
        .map_err(|err| database_error("closing a memory transaction", err))?;
    if deleted == 0 {
        return Err(ApiError::not_found("memory not found"));
    }
    tracing::info!(memory_id = %id, "memory deleted");
    Ok(Json(MemoryDeleted {
        memory_id: id,
        deleted: true,
    }))
}

/// A conversation's processing status.
#[utoipa::path(
    get,
    path = "/v1/conversations/{conversation_id}",
    tag = "memories",
    params(("conversation_id" = String, Path, description = "The ElevenLabs conversation id")),
    responses(
        (status = 200, description = "The conversation", body = ConversationView),
        (status = 404, description = "No such conversation in this organization", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn get_conversation(
    State(state): State<AppState>,
    organization: Organization,
    Path(raw): Path<String>,
) -> Result<Json<ConversationView>, ApiError> {
    let conversation_id = ConversationId::new(raw)?;
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id)
        .await
        .map_err(|err| database_error("opening a conversation transaction", err))?;
    let found: Option<ConversationView> = sqlx::query_as(
        "SELECT c.conversation_id, c.agent_id, c.caller_id, c.status, c.generation, c.start_time,
                c.end_time, c.duration_secs, c.failure_reason, c.created_at, c.updated_at,
                (SELECT count(*) FROM memories m
                  WHERE m.organization_id = c.organization_id
                    AND m.conversation_id = c.conversation_id) AS memory_count
           FROM conversations c
          WHERE c.organization_id = $1 AND c.conversation_id = $2",
    )
    .bind(organization.id)
    .bind(conversation_id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(|err| database_error("reading a conversation", err))?;
    tx.commit()
        .await
        .map_err(|err| database_error("closing a conversation transaction", err))?;
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found("conversation not found"))
}
