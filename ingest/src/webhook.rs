//! ElevenLabs' post-call webhook bodies, parsed into what ingest needs.
//! Unknown extra fields are ignored; both turn layouts (`null` and `[]`
//! tool calls) parse; tool-call-only turns (`message: null`) are dropped.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use elaaoms_shared::domain::{AgentId, CallerId, ConversationId, Speaker, TranscriptTurn, ValidationError};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("body is not a JSON webhook: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown webhook type `{0}`: expected post_call_transcription, post_call_audio or call_initiation_failure")]
    UnknownType(String),
    #[error("invalid field {0}")]
    Invalid(#[from] ValidationError),
    #[error("post_call_audio: full_audio is not valid base64")]
    Audio,
}

/// A verified webhook, by type.
#[derive(Debug)]
pub enum Webhook {
    Transcription(Transcription),
    Audio(Audio),
    InitiationFailure(InitiationFailure),
}

#[derive(Debug)]
pub struct Transcription {
    pub conversation_id: ConversationId,
    pub agent_id: AgentId,
    pub caller_id: CallerId,
    pub call_sid: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_secs: Option<i64>,
    pub turns: Vec<TranscriptTurn>,
}

#[derive(Debug)]
pub struct Audio {
    pub conversation_id: ConversationId,
    pub mp3: Vec<u8>,
}

#[derive(Debug)]
pub struct InitiationFailure {
    pub conversation_id: ConversationId,
    pub agent_id: AgentId,
    pub caller_id: CallerId,
    pub failure_reason: String,
    pub call_sid: Option<String>,
}

#[derive(Deserialize)]
struct RawWebhook {
    #[serde(rename = "type")]
    kind: String,
    event_timestamp: Option<i64>,
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct RawTranscription {
    agent_id: String,
    conversation_id: String,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    transcript: Vec<RawTurn>,
    #[serde(default)]
    metadata: Option<RawMetadata>,
    #[serde(default)]
    conversation_initiation_client_data: Option<RawInitiationData>,
}

#[derive(Deserialize)]
struct RawTurn {
    role: String,
    message: Option<String>,
    time_in_call_secs: Option<f64>,
}

#[derive(Deserialize, Default)]
struct RawMetadata {
    start_time_unix_secs: Option<i64>,
    call_duration_secs: Option<i64>,
    phone_call: Option<RawPhoneCall>,
}

#[derive(Deserialize)]
struct RawPhoneCall {
    external_number: Option<String>,
    call_sid: Option<String>,
}

#[derive(Deserialize)]
struct RawInitiationData {
    #[serde(default)]
    dynamic_variables: Option<HashMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawAudio {
    conversation_id: String,
    full_audio: String,
}

#[derive(Deserialize)]
struct RawFailure {
    agent_id: String,
    conversation_id: String,
    failure_reason: Option<String>,
    #[serde(default)]
    metadata: Option<RawFailureMetadata>,
}

#[derive(Deserialize)]
struct RawFailureMetadata {
    #[serde(default)]
    body: HashMap<String, serde_json::Value>,
}

/// Just the conversation id, so the payload can be stored before the rest
/// of the body is validated.
pub fn conversation_id_of(body: &[u8]) -> Result<ConversationId, WebhookError> {
    #[derive(Deserialize)]
    struct Data {
        conversation_id: String,
    }
    #[derive(Deserialize)]
    struct Outer {
        data: Data,
    }
    let outer: Outer = serde_json::from_slice(body)?;
    Ok(ConversationId::new(outer.data.conversation_id)?)
}

pub fn parse_webhook(body: &[u8]) -> Result<Webhook, WebhookError> {
    let raw: RawWebhook = serde_json::from_slice(body)?;
    match raw.kind.as_str() {
        "post_call_transcription" => parse_transcription(raw.data, raw.event_timestamp).map(Webhook::Transcription),
        "post_call_audio" => parse_audio(raw.data).map(Webhook::Audio),
        "call_initiation_failure" => parse_failure(raw.data).map(Webhook::InitiationFailure),
        other => Err(WebhookError::UnknownType(other.chars().take(100).collect())),
    }
}

fn parse_transcription(data: serde_json::Value, event_timestamp: Option<i64>) -> Result<Transcription, WebhookError> {
    let raw: RawTranscription = serde_json::from_value(data)?;
    let metadata = raw.metadata.unwrap_or_default();
    let phone_call = metadata.phone_call.as_ref();
    let dynamic = raw
        .conversation_initiation_client_data
        .and_then(|data| data.dynamic_variables)
        .unwrap_or_default();
    let dynamic_str = |name: &str| dynamic.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    // The caller's number, then the web user's id: a web call has no number.
    let caller = phone_call
        .and_then(|call| call.external_number.clone())
        .or_else(|| dynamic_str("system__caller_id"))
        .or(raw.user_id)
        .unwrap_or_default();
    let started_at = metadata
        .start_time_unix_secs
        .or(event_timestamp)
        .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
        .unwrap_or_else(Utc::now);
    if metadata.call_duration_secs.is_some_and(|secs| secs < 0) {
        return Err(ValidationError::new("duration", "must not be negative").into());
    }
    let turns = raw
        .transcript
        .into_iter()
        .filter_map(|turn| {
            let message = turn.message?.trim().to_owned();
            if message.is_empty() {
                return None;
            }
            let speaker = match turn.role.as_str() {
                "user" => Speaker::User,
                _ => Speaker::Agent,
            };
            Some(TranscriptTurn {
                speaker,
                message,
                time_in_call_secs: turn.time_in_call_secs,
            })
        })
        .collect();
    Ok(Transcription {
        conversation_id: ConversationId::new(raw.conversation_id)?,
        agent_id: AgentId::new(raw.agent_id)?,
        caller_id: CallerId::new(caller)?,
        call_sid: phone_call
            .and_then(|call| call.call_sid.clone())
            .or_else(|| dynamic_str("system__call_sid")),
        started_at,
        duration_secs: metadata.call_duration_secs,
        turns,
    })
}

fn parse_audio(data: serde_json::Value) -> Result<Audio, WebhookError> {
    use base64::Engine;
    let raw: RawAudio = serde_json::from_value(data)?;
    let mp3 = base64::engine::general_purpose::STANDARD
        .decode(raw.full_audio.as_bytes())
        .map_err(|_| WebhookError::Audio)?;
    Ok(Audio {
        conversation_id: ConversationId::new(raw.conversation_id)?,
        mp3,
    })
}

fn parse_failure(data: serde_json::Value) -> Result<InitiationFailure, WebhookError> {
    let raw: RawFailure = serde_json::from_value(data)?;
    let body = raw.metadata.map(|m| m.body).unwrap_or_default();
    let field = |name: &str| body.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    // The caller is the far end: who we dialled on an outbound call, who
    // dialled us otherwise (Twilio and SIP name the fields differently).
    let outbound = field("Direction").is_some_and(|d| d.starts_with("outbound"));
    let caller = if outbound {
        field("To").or_else(|| field("to_number"))
    } else {
        field("From").or_else(|| field("from_number"))
    }
    .or_else(|| field("to_number"))
    .unwrap_or_default();
    Ok(InitiationFailure {
        conversation_id: ConversationId::new(raw.conversation_id)?,
        agent_id: AgentId::new(raw.agent_id)?,
        caller_id: CallerId::new(caller)?,
        failure_reason: raw.failure_reason.unwrap_or_else(|| "unknown".to_owned()),
        call_sid: field("CallSid").or_else(|| field("call_sid")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/../tests/fixtures/elevenlabs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn both_turn_layouts_parse_and_tool_turns_are_dropped() {
        let Webhook::Transcription(maya) = parse_webhook(&fixture("post_call_transcription_bakery_maya_2025-11-03.json")).unwrap() else {
            panic!("expected a transcription");
        };
        assert_eq!(maya.caller_id.as_str(), "+14155550123");
        assert_eq!(maya.conversation_id.as_str(), "conv_wxgkkg26wh6wcecpnv68bert84");
        assert_eq!(maya.turns.len(), 25);
        assert!(maya.call_sid.is_some());

        let Webhook::Transcription(tom) = parse_webhook(&fixture("post_call_transcription_telecom_tom_2025-11-18.json")).unwrap() else {
            panic!("expected a transcription");
        };
        assert_eq!(tom.caller_id.as_str(), "+13125550144");
        assert_eq!(tom.duration_secs, Some(182));
        assert!(tom.turns.len() < 21, "the tool-call-only turn is dropped");
        assert!(tom.turns.iter().all(|t| !t.message.contains("CHI-N-114")));
    }

    #[test]
    fn audio_and_failure_parse() {
        let Webhook::Audio(audio) = parse_webhook(&fixture("post_call_audio_bakery_maya_2025-11-03.json")).unwrap() else {
            panic!("expected audio");
        };
        assert!(audio.mp3.starts_with(b"ID3"));
        let Webhook::InitiationFailure(failure) =
            parse_webhook(&fixture("call_initiation_failure_bakery_reminder_no_answer.json")).unwrap()
        else {
            panic!("expected a failure");
        };
        assert_eq!(failure.caller_id.as_str(), "+14155550123");
        assert_eq!(failure.failure_reason, "no-answer");
    }

    #[test]
    fn unknown_types_and_bad_fields_are_named() {
        let unknown = parse_webhook(br#"{"type": "post_call_video", "data": {}}"#).unwrap_err();
        assert!(unknown.to_string().contains("post_call_video"));
        let empty_agent = parse_webhook(
            br#"{"type": "post_call_transcription", "data": {"agent_id": "", "conversation_id": "c", "user_id": "u"}}"#,
        )
        .unwrap_err();
        assert!(empty_agent.to_string().contains("agent_id"), "{empty_agent}");
        assert!(parse_webhook(b"not json").is_err());
    }
}
