//! The domain model: the seed's entities and validation rules as types that
//! cannot hold an invalid value. Constructors refuse what the seed forbids,
//! so code that holds a `Importance` or a `QueryText` never re-checks it.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A value broke one of the seed's validation rules. `field` names the
/// offending field so an HTTP layer can answer a 422 that says which one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

pub const MAX_MEMORY_CONTENT_CHARS: usize = 10_000;
pub const MAX_QUERY_TEXT_CHARS: usize = 1_000;
/// Ids come from ElevenLabs or phone numbers; anything longer is garbage.
pub const MAX_ID_CHARS: usize = 256;

/// A non-empty, bounded identifier (caller id, agent id, conversation id).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                let trimmed = value.trim();
                if trimmed.is_empty() {
                    return Err(ValidationError::new($field, "must not be empty"));
                }
                if trimmed.chars().count() > MAX_ID_CHARS {
                    return Err(ValidationError::new(
                        $field,
                        format!("must be at most {MAX_ID_CHARS} characters"),
                    ));
                }
                if trimmed.chars().any(char::is_control) {
                    return Err(ValidationError::new($field, "must not contain control characters"));
                }
                Ok(Self(trimmed.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// The caller's identifier within an organization, usually a phone number.
    CallerId,
    "caller_id"
);
string_id!(
    /// An ElevenLabs agent id.
    AgentId,
    "agent_id"
);
string_id!(
    /// An ElevenLabs conversation id.
    ConversationId,
    "conversation_id"
);

/// An organization's URL slug: lowercase letters, digits and dashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrganizationSlug(String);

impl OrganizationSlug {
    pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        let valid_chars = value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if value.is_empty() || value.len() > 63 || !valid_chars || value.starts_with('-') {
            return Err(ValidationError::new(
                "slug",
                "must be 1 to 63 lowercase letters, digits or dashes, not starting with a dash",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for OrganizationSlug {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<OrganizationSlug> for String {
    fn from(value: OrganizationSlug) -> String {
        value.0
    }
}

impl fmt::Display for OrganizationSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of thing a memory records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryType {
    Factual,
    Preference,
    Issue,
    Emotion,
    Relationship,
}

impl MemoryType {
    pub const ALL: [MemoryType; 5] = [
        MemoryType::Factual,
        MemoryType::Preference,
        MemoryType::Issue,
        MemoryType::Emotion,
        MemoryType::Relationship,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MemoryType::Factual => "factual",
            MemoryType::Preference => "preference",
            MemoryType::Issue => "issue",
            MemoryType::Emotion => "emotion",
            MemoryType::Relationship => "relationship",
        }
    }

    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == value)
            .ok_or_else(|| {
                ValidationError::new(
                    "type",
                    "must be one of factual, preference, issue, emotion, relationship",
                )
            })
    }
}

impl fmt::Display for MemoryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much a memory matters, 1 (trivia) to 10 (safety-critical).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i16")]
pub struct Importance(u8);

impl Importance {
    /// The seed's rule: a memory this important is shared across agents.
    pub const SHAREABLE_FROM: u8 = 8;

    pub fn new(value: i64) -> Result<Self, ValidationError> {
        if !(1..=10).contains(&value) {
            return Err(ValidationError::new(
                "importance",
                "must be between 1 and 10",
            ));
        }
        Ok(Self(value as u8))
    }

    pub fn get(self) -> u8 {
        self.0
    }

    pub fn is_shareable(self) -> bool {
        self.0 >= Self::SHAREABLE_FROM
    }
}

impl TryFrom<i64> for Importance {
    type Error = ValidationError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Importance> for i16 {
    fn from(value: Importance) -> i16 {
        value.0 as i16
    }
}

/// How sure the extractor is, 0.0 to 1.0.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Confidence(f64);

impl Confidence {
    pub fn new(value: f64) -> Result<Self, ValidationError> {
        if !(0.0..=1.0).contains(&value) {
            return Err(ValidationError::new(
                "confidence",
                "must be between 0.0 and 1.0",
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Confidence {
    type Error = ValidationError;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Confidence> for f64 {
    fn from(value: Confidence) -> f64 {
        value.0
    }
}

/// A memory's text: non-empty, at most 10,000 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MemoryContent(String);

impl MemoryContent {
    pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into().trim().to_owned();
        if value.is_empty() {
            return Err(ValidationError::new("content", "must not be empty"));
        }
        if value.chars().count() > MAX_MEMORY_CONTENT_CHARS {
            return Err(ValidationError::new(
                "content",
                format!("must be at most {MAX_MEMORY_CONTENT_CHARS} characters"),
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MemoryContent {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<MemoryContent> for String {
    fn from(value: MemoryContent) -> String {
        value.0
    }
}

/// A search query's text: non-empty, at most 1,000 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryText(String);

impl QueryText {
    pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        if value.trim().is_empty() {
            return Err(ValidationError::new("query_text", "must not be empty"));
        }
        if value.chars().count() > MAX_QUERY_TEXT_CHARS {
            return Err(ValidationError::new(
                "query_text",
                format!("must be at most {MAX_QUERY_TEXT_CHARS} characters"),
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How many results a search returns, 1 to 100 (default 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultLimit(u8);

impl ResultLimit {
    pub const DEFAULT: ResultLimit = ResultLimit(5);

    pub fn new(value: i64) -> Result<Self, ValidationError> {
        if !(1..=100).contains(&value) {
            return Err(ValidationError::new(
                "result_limit",
                "must be between 1 and 100",
            ));
        }
        Ok(Self(value as u8))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// The minimum cosine similarity a search result must reach, 0.0 to 1.0
/// (default 0.7).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelevanceThreshold(f64);

impl RelevanceThreshold {
    pub const DEFAULT: RelevanceThreshold = RelevanceThreshold(0.7);

    pub fn new(value: f64) -> Result<Self, ValidationError> {
        if !(0.0..=1.0).contains(&value) {
            return Err(ValidationError::new(
                "relevance_threshold",
                "must be between 0.0 and 1.0",
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// When a call started and how long it lasted; the seed forbids an end
/// before the start and a negative duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallTiming {
    pub start_time: DateTime<Utc>,
    pub end_time: Option<DateTime<Utc>>,
    pub duration_secs: Option<i64>,
}

impl CallTiming {
    pub fn new(
        start_time: DateTime<Utc>,
        end_time: Option<DateTime<Utc>>,
        duration_secs: Option<i64>,
    ) -> Result<Self, ValidationError> {
        if let Some(end) = end_time {
            if end < start_time {
                return Err(ValidationError::new(
                    "end_time",
                    "must not be before start_time",
                ));
            }
        }
        if let Some(duration) = duration_secs {
            if duration < 0 {
                return Err(ValidationError::new("duration", "must not be negative"));
            }
        }
        Ok(Self {
            start_time,
            end_time,
            duration_secs,
        })
    }
}

/// The state of a conversation. The database enforces the same machine
/// (`UPDATE ... WHERE status = ANY(allowed predecessors)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    Initiated,
    Active,
    Completed,
    Failed,
    ExtractionPending,
    ExtractionCompleted,
    ExtractionFailed,
}

/// Why a status change happens; replay is the only way back from a final
/// extraction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionKind {
    Normal,
    Replay,
}

impl ConversationStatus {
    pub const ALL: [ConversationStatus; 7] = [
        ConversationStatus::Initiated,
        ConversationStatus::Active,
        ConversationStatus::Completed,
        ConversationStatus::Failed,
        ConversationStatus::ExtractionPending,
        ConversationStatus::ExtractionCompleted,
        ConversationStatus::ExtractionFailed,
    ];

    /// The states a conversation may be created in: a conversation-init
    /// webhook creates it `initiated`, a transcript for an unseen
    /// conversation `completed`, a call-initiation failure `failed`.
    pub fn can_be_created_as(self) -> bool {
        matches!(
            self,
            ConversationStatus::Initiated
                | ConversationStatus::Completed
                | ConversationStatus::Failed
        )
    }

    pub fn can_transition_to(self, next: ConversationStatus, kind: TransitionKind) -> bool {
        use ConversationStatus::*;
        match kind {
            TransitionKind::Normal => matches!(
                (self, next),
                (Initiated, Active)
                    | (Initiated, Completed)
                    | (Initiated, Failed)
                    | (Active, Completed)
                    | (Completed, ExtractionPending)
                    | (ExtractionPending, ExtractionCompleted)
                    | (ExtractionPending, ExtractionFailed)
            ),
            TransitionKind::Replay => matches!(
                (self, next),
                (ExtractionFailed, ExtractionPending) | (ExtractionCompleted, ExtractionPending)
            ),
        }
    }

    /// Every state from which `next` may be reached: the `ANY($allowed)` of
    /// the SQL update, derived from the one Rust rule.
    pub fn allowed_predecessors(
        next: ConversationStatus,
        kind: TransitionKind,
    ) -> Vec<ConversationStatus> {
        Self::ALL
            .into_iter()
            .filter(|from| from.can_transition_to(next, kind))
            .collect()
    }

    pub fn as_str(self) -> &'static str {
        use ConversationStatus::*;
        match self {
            Initiated => "initiated",
            Active => "active",
            Completed => "completed",
            Failed => "failed",
            ExtractionPending => "extraction_pending",
            ExtractionCompleted => "extraction_completed",
            ExtractionFailed => "extraction_failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }
}

impl fmt::Display for ConversationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who spoke a transcript turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speaker {
    Agent,
    User,
}

/// One turn of a normalised transcript: tool-call-only turns (no message)
/// are dropped before this point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptTurn {
    pub speaker: Speaker,
    pub message: String,
    pub time_in_call_secs: Option<f64>,
}

/// A memory as an extractor proposes it, validated before it leaves the
/// extractor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractedMemory {
    pub content: MemoryContent,
    #[serde(rename = "type")]
    pub memory_type: MemoryType,
    pub importance: Importance,
    pub confidence: Confidence,
    /// The caller's words this memory rests on.
    pub source_quote: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_empty_and_oversized_values() {
        assert_eq!(CallerId::new("  ").unwrap_err().field, "caller_id");
        assert!(AgentId::new("").is_err());
        assert!(ConversationId::new("x".repeat(MAX_ID_CHARS + 1)).is_err());
        assert!(CallerId::new("+1\n555").is_err());
        assert_eq!(
            CallerId::new(" +14155550123 ").unwrap().as_str(),
            "+14155550123"
        );
    }

    #[test]
    fn ids_validate_when_deserialized() {
        assert!(serde_json::from_str::<CallerId>("\"\"").is_err());
        assert_eq!(
            serde_json::from_str::<AgentId>("\"agent_1\"")
                .unwrap()
                .as_str(),
            "agent_1"
        );
    }

    #[test]
    fn importance_is_one_to_ten_and_shareable_from_eight() {
        for value in [-1, 0, 11, 100] {
            assert_eq!(Importance::new(value).unwrap_err().field, "importance");
        }
        for value in 1..=10 {
            let importance = Importance::new(value).unwrap();
            assert_eq!(importance.is_shareable(), value >= 8);
        }
        assert!(serde_json::from_str::<Importance>("11").is_err());
    }

    #[test]
    fn content_is_non_empty_and_bounded_in_characters() {
        assert!(MemoryContent::new("   ").is_err());
        assert!(MemoryContent::new("é".repeat(MAX_MEMORY_CONTENT_CHARS)).is_ok());
        assert!(MemoryContent::new("é".repeat(MAX_MEMORY_CONTENT_CHARS + 1)).is_err());
    }

    #[test]
    fn confidence_threshold_and_limit_ranges() {
        assert!(Confidence::new(-0.01).is_err());
        assert!(Confidence::new(1.01).is_err());
        assert!(Confidence::new(f64::NAN).is_err());
        assert!(Confidence::new(0.0).is_ok() && Confidence::new(1.0).is_ok());
        assert!(RelevanceThreshold::new(1.5).is_err());
        assert!(RelevanceThreshold::new(f64::NAN).is_err());
        assert_eq!(ResultLimit::new(0).unwrap_err().field, "result_limit");
        assert!(ResultLimit::new(101).is_err());
        assert_eq!(ResultLimit::new(100).unwrap().get(), 100);
    }

    #[test]
    fn query_text_is_non_empty_and_at_most_1000_chars() {
        assert_eq!(QueryText::new("").unwrap_err().field, "query_text");
        assert!(QueryText::new("a".repeat(1000)).is_ok());
        assert!(QueryText::new("a".repeat(1001)).is_err());
    }

    #[test]
    fn call_timing_refuses_end_before_start_and_negative_duration() {
        let start = Utc::now();
        let before = start - chrono::Duration::seconds(1);
        assert_eq!(
            CallTiming::new(start, Some(before), None)
                .unwrap_err()
                .field,
            "end_time"
        );
        assert_eq!(
            CallTiming::new(start, None, Some(-1)).unwrap_err().field,
            "duration"
        );
        assert!(CallTiming::new(start, Some(start), Some(0)).is_ok());
    }

    #[test]
    fn memory_type_round_trips() {
        for t in MemoryType::ALL {
            assert_eq!(MemoryType::parse(t.as_str()).unwrap(), t);
        }
        assert!(MemoryType::parse("opinion").is_err());
    }

    #[test]
    fn status_machine_allows_exactly_the_documented_transitions() {
        use ConversationStatus::*;
        use TransitionKind::*;
        let allowed_normal = [
            (Initiated, Active),
            (Initiated, Completed),
            (Initiated, Failed),
            (Active, Completed),
            (Completed, ExtractionPending),
            (ExtractionPending, ExtractionCompleted),
            (ExtractionPending, ExtractionFailed),
        ];
        let allowed_replay = [
            (ExtractionFailed, ExtractionPending),
            (ExtractionCompleted, ExtractionPending),
        ];
        for from in ConversationStatus::ALL {
            for to in ConversationStatus::ALL {
                assert_eq!(
                    from.can_transition_to(to, Normal),
                    allowed_normal.contains(&(from, to)),
                    "{from} -> {to} (normal)"
                );
                assert_eq!(
                    from.can_transition_to(to, Replay),
                    allowed_replay.contains(&(from, to)),
                    "{from} -> {to} (replay)"
                );
            }
        }
        let created: Vec<_> = ConversationStatus::ALL
            .into_iter()
            .filter(|s| s.can_be_created_as())
            .collect();
        assert_eq!(created, vec![Initiated, Completed, Failed]);
        assert_eq!(
            ConversationStatus::allowed_predecessors(Completed, Normal),
            vec![Initiated, Active]
        );
    }
}
