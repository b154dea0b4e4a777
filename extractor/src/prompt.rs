//! The versioned extraction prompt, the JSON schema of the answer, and the
//! validation of that answer into domain types.
//!
//! The prompt text lives in `prompt_v1.txt` so a change to it is a visible,
//! reviewable diff; a change of meaning gets a new file and a new
//! [`PROMPT_VERSION`] (recorded with the token usage of every extraction).

use std::collections::HashSet;

use elaaoms_shared::domain::{
    Confidence, ExtractedMemory, Importance, MemoryContent, MemoryType, Speaker, TranscriptTurn,
    ValidationError,
};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

pub const PROMPT_VERSION: &str = "v1";
const PROMPT_V1: &str = include_str!("prompt_v1.txt");

/// Name of the Anthropic tool / OpenAI schema that carries the answer.
pub const OUTPUT_NAME: &str = "record_memories";

/// What the agent is, when ElevenLabs told us.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
pub struct AgentProfile {
    pub name: Option<String>,
    /// The agent's instructions, shortened: what it is for.
    pub purpose: Option<String>,
}

/// An issue memory of the caller that is still open.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenIssue {
    pub id: Uuid,
    pub content: String,
}

/// Everything the prompt is built from.
#[derive(Debug, Clone)]
pub struct PromptInput<'a> {
    pub agent: Option<&'a AgentProfile>,
    pub open_issues: &'a [OpenIssue],
    pub turns: &'a [TranscriptTurn],
}

/// The system prompt: instructions, the agent's profile, the open issues.
pub fn system_prompt(input: &PromptInput<'_>) -> String {
    let profile = match input.agent {
        Some(AgentProfile { name, purpose }) if name.is_some() || purpose.is_some() => format!(
            "Name: {}\nPurpose: {}",
            name.as_deref().unwrap_or("unknown"),
            purpose.as_deref().unwrap_or("unknown")
        ),
        _ => "Unknown.".to_owned(),
    };
    let issues = if input.open_issues.is_empty() {
        "None.".to_owned()
    } else {
        input
            .open_issues
            .iter()
            .map(|issue| format!("{}: {}", issue.id, one_line(&issue.content)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    PROMPT_V1
        .replace("{agent_profile}", &profile)
        .replace("{open_issues}", &issues)
}

/// The user message: the transcript with speaker roles.
pub fn transcript_message(turns: &[TranscriptTurn]) -> String {
    let mut text = String::from("TRANSCRIPT\n");
    for turn in turns.iter().filter(|turn| !turn.message.trim().is_empty()) {
        let role = match turn.speaker {
            Speaker::Agent => "AGENT",
            Speaker::User => "CALLER",
        };
        text.push_str(role);
        text.push_str(": ");
        text.push_str(&one_line(&turn.message));
        text.push('\n');
    }
    text
}

/// The message that asks for a corrected answer after a validation error.
pub fn repair_message(error: &OutputError) -> String {
    format!(
        "Your answer was rejected: {error}. Answer again with the complete corrected result, \
         following the schema and the rules exactly."
    )
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The JSON schema of the answer: strict-mode compatible for OpenAI (every
/// property required, no additional properties) and the input schema of
/// the Anthropic tool.
pub fn output_schema() -> Value {
    let types: Vec<&str> = MemoryType::ALL.iter().map(|t| t.as_str()).collect();
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["memories", "resolved_issue_ids"],
        "properties": {
            "memories": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["content", "type", "importance", "confidence", "source_quote"],
                    "properties": {
                        "content": {"type": "string", "description": "One standalone third-person sentence about the caller."},
                        "type": {"type": "string", "enum": types},
                        "importance": {"type": "integer", "minimum": 1, "maximum": 10},
                        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                        "source_quote": {"type": ["string", "null"], "description": "The caller's exact words."}
                    }
                }
            },
            "resolved_issue_ids": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Ids of the open issues this call resolved."
            }
        }
    })
}

/// Why a provider's answer was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutputError {
    #[error("the answer is not the JSON object of the schema: {0}")]
    Shape(String),
    #[error("memory {index}: {source}")]
    Memory {
        index: usize,
        #[source]
        source: ValidationError,
    },
    #[error("resolved_issue_ids: `{0}` is not an id")]
    IssueId(String),
}

/// A validated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractionOutput {
    pub memories: Vec<ExtractedMemory>,
    pub resolved_issue_ids: Vec<Uuid>,
}

#[derive(Deserialize)]
struct RawOutput {
    memories: Vec<RawMemory>,
    #[serde(default)]
    resolved_issue_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawMemory {
    content: String,
    #[serde(rename = "type")]
    memory_type: String,
    importance: i64,
    confidence: f64,
    #[serde(default)]
    source_quote: Option<String>,
}

/// Validates an answer (JSON text) against the domain rules. Ids of issues
/// that were not offered are dropped (a model may invent one; that is no
/// reason to fail the extraction), ids that are not ids are an error.
pub fn parse_output(
    text: &str,
    open_issues: &[OpenIssue],
) -> Result<ExtractionOutput, OutputError> {
    let value: Value = serde_json::from_str(strip_code_fence(text))
        .map_err(|err| OutputError::Shape(err.to_string()))?;
    parse_output_value(value, open_issues)
}

pub fn parse_output_value(
    value: Value,
    open_issues: &[OpenIssue],
) -> Result<ExtractionOutput, OutputError> {
    let raw: RawOutput =
        serde_json::from_value(value).map_err(|err| OutputError::Shape(err.to_string()))?;
    let mut memories = Vec::with_capacity(raw.memories.len());
    for (index, memory) in raw.memories.into_iter().enumerate() {
        let invalid = |source: ValidationError| OutputError::Memory { index, source };
        memories.push(ExtractedMemory {
            content: MemoryContent::new(memory.content).map_err(invalid)?,
            memory_type: MemoryType::parse(&memory.memory_type).map_err(invalid)?,
            importance: Importance::new(memory.importance).map_err(invalid)?,
            confidence: Confidence::new(memory.confidence).map_err(invalid)?,
            source_quote: memory.source_quote.filter(|quote| !quote.trim().is_empty()),
        });
    }
    let offered: HashSet<Uuid> = open_issues.iter().map(|issue| issue.id).collect();
    let mut resolved_issue_ids = Vec::new();
    for id in raw.resolved_issue_ids {
        let parsed = Uuid::parse_str(id.trim()).map_err(|_| OutputError::IssueId(id.clone()))?;
        if offered.contains(&parsed) {
            if !resolved_issue_ids.contains(&parsed) {
                resolved_issue_ids.push(parsed);
            }
        } else {
            tracing::warn!(issue_id = %parsed, "the model resolved an issue it was not given; ignored");
        }
    }
    Ok(ExtractionOutput {
        memories,
        resolved_issue_ids,
    })
}

/// OpenAI-compatible servers without structured outputs sometimes wrap the
/// JSON in a Markdown code fence.
fn strip_code_fence(text: &str) -> &str {
    let trimmed = text.trim();
    let Some(inner) = trimmed.strip_prefix("```") else {
        return trimmed;
    };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(speaker: Speaker, message: &str) -> TranscriptTurn {
        TranscriptTurn {
            speaker,
            message: message.to_owned(),
            time_in_call_secs: None,
        }
    }

    #[test]
    fn the_prompt_carries_profile_issues_and_roles() {
        let issue_id = Uuid::new_v4();
        let issues = [OpenIssue {
            id: issue_id,
            content: "The caller's router\ndrops the connection".into(),
        }];
        let profile = AgentProfile {
            name: Some("Dental Desk".into()),
            purpose: Some("Books dental appointments".into()),
        };
        let turns = [
            turn(Speaker::Agent, "Hello!"),
            turn(Speaker::User, "I'm  allergic\nto penicillin."),
        ];
        let input = PromptInput {
            agent: Some(&profile),
            open_issues: &issues,
            turns: &turns,
        };
        let system = system_prompt(&input);
        assert!(system.contains("Name: Dental Desk\nPurpose: Books dental appointments"));
        assert!(system.contains(&format!(
            "{issue_id}: The caller's router drops the connection"
        )));
        assert!(system.contains("9-10: safety or health critical"));
        assert!(!system.contains("{agent_profile}") && !system.contains("{open_issues}"));
        let user = transcript_message(&turns);
        assert_eq!(
            user,
            "TRANSCRIPT\nAGENT: Hello!\nCALLER: I'm allergic to penicillin.\n"
        );
        let unknown = system_prompt(&PromptInput {
            agent: None,
            open_issues: &[],
            turns: &turns,
        });
        assert!(
            unknown.contains("AGENT PROFILE\nUnknown.") && unknown.contains("(id: content)\nNone.")
        );
    }

    #[test]
    fn valid_output_becomes_domain_memories() {
        let issue_id = Uuid::new_v4();
        let issues = [OpenIssue {
            id: issue_id,
            content: "x".into(),
        }];
        let text = format!(
            r#"```json
            {{"memories": [{{"content": "The caller is allergic to penicillin.", "type": "factual",
               "importance": 10, "confidence": 0.95, "source_quote": "I'm allergic to penicillin"}}],
              "resolved_issue_ids": ["{issue_id}", "{}"]}}
            ```"#,
            Uuid::new_v4()
        );
        let output = parse_output(&text, &issues).unwrap();
        assert_eq!(output.memories.len(), 1);
        assert_eq!(output.memories[0].memory_type, MemoryType::Factual);
        assert_eq!(output.memories[0].importance.get(), 10);
        // The invented id is dropped, the offered one kept.
        assert_eq!(output.resolved_issue_ids, vec![issue_id]);
        let empty = parse_output(r#"{"memories": [], "resolved_issue_ids": []}"#, &[]).unwrap();
        assert!(empty.memories.is_empty());
    }

    #[test]
    fn invalid_output_is_refused_with_a_reason() {
        let bad = |text: &str| parse_output(text, &[]).unwrap_err().to_string();
        assert!(bad("not json").contains("not the JSON object"));
        assert!(bad(r#"{"memories": [{"content": "x"}]}"#).contains("not the JSON object"));
        let eleven = bad(
            r#"{"memories": [{"content": "The caller is tall.", "type": "factual", "importance": 11, "confidence": 0.5, "source_quote": null}], "resolved_issue_ids": []}"#,
        );
        assert!(
            eleven.starts_with("memory 0") && eleven.contains("importance"),
            "{eleven}"
        );
        assert!(bad(
            r#"{"memories": [{"content": "The caller is tall.", "type": "gossip", "importance": 3, "confidence": 0.5, "source_quote": null}], "resolved_issue_ids": []}"#
        )
        .contains("type"));
        assert!(bad(
            r#"{"memories": [{"content": "  ", "type": "factual", "importance": 3, "confidence": 0.5, "source_quote": null}], "resolved_issue_ids": []}"#
        )
        .contains("memory 0"));
        assert!(bad(r#"{"memories": [], "resolved_issue_ids": ["issue-1"]}"#).contains("issue-1"));
    }

    #[test]
    fn the_schema_is_strict() {
        let schema = output_schema();
        assert_eq!(schema["additionalProperties"], false);
        let item = &schema["properties"]["memories"]["items"];
        assert_eq!(
            item["required"].as_array().unwrap().len(),
            item["properties"].as_object().unwrap().len()
        );
        assert_eq!(
            item["properties"]["type"]["enum"].as_array().unwrap().len(),
            5
        );
    }
}
