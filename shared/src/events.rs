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
    /// Empty when the transcript was too large for a JetStream message:
    /// then `payload_ref` names its payload file.
    pub turns: Vec<TranscriptTurn>,
    /// The payload-store key (`{conversation_id}/{conversation_id}_transcription.json`)
    /// of a transcript too large to travel inline. A consumer that sees it
    /// reads the file and normalises its turns (`transcript::turns_of_payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_ref: Option<String>,
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
