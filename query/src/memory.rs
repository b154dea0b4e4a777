//! A memory as clients see it: the seed's field names, the same shape in
//! search results (plus `score`) and in listings.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// The select list for [`MemoryView`], over the alias `m` (memories).
pub(crate) const MEMORY_COLUMNS: &str = "m.id AS memory_id, m.content, m.type, m.importance, \
     m.is_shareable, m.confidence, m.reinforcement_count, m.status, m.created_at, \
     m.last_reinforced_at, m.agent_id, m.conversation_id, m.metadata";

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct MemoryView {
    pub memory_id: Uuid,
    pub content: String,
    /// factual, preference, issue, emotion or relationship.
    #[serde(rename = "type")]
    #[schema(value_type = crate::openapi::MemoryTypeName)]
    #[sqlx(rename = "type")]
    pub memory_type: String,
    #[schema(minimum = 1, maximum = 10)]
    pub importance: i16,
    pub is_shareable: bool,
    pub confidence: f32,
    pub reinforcement_count: i32,
    /// `open` or `resolved` for issues, `null` otherwise.
    pub status: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_reinforced_at: Option<DateTime<Utc>>,
    /// The agent whose call produced the memory.
    pub agent_id: String,
    /// The conversation the memory was first extracted from.
    pub conversation_id: String,
    /// Source quotes, earlier conflicting values and their dates.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}
