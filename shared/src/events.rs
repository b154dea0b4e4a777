//! The payloads of the pipeline's events (inside an `Envelope`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{ExtractedMemory, TranscriptTurn};

/// ingest → extractor: a call ended and its transcript is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationTranscribed {
    pub conversation_id: String,
    pub agent_id: String,
    pub caller_id: String,
    pub started_at: DateTime<Utc>,
    pub turns: Vec<TranscriptTurn>,
}

/// extractor → indexer: what is worth remembering from one conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoriesExtracted {
    pub conversation_id: String,
    pub agent_id: String,
    pub caller_id: String,
    pub memories: Vec<ExtractedMemory>,
    /// Open issue memories this call resolved.
    #[serde(default)]
    pub resolved_issue_ids: Vec<Uuid>,
    /// Which extractor produced them (`rules`, `openai:gpt-4o-mini`, ...).
    pub extractor: String,
}

/// indexer → anyone: a conversation's memories are searchable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoriesIndexed {
    pub conversation_id: String,
    pub caller_id: String,
    pub created: u32,
    pub reinforced: u32,
}
