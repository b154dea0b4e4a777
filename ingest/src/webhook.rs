//! ElevenLabs' post-call webhook bodies, parsed into what ingest needs.
//! Unknown extra fields are ignored; both turn layouts (`null` and `[]`
//! tool calls) parse; tool-call-only turns (`message: null`) are dropped.
//!
//! Hostile bodies are refused before anything is stored: nesting deeper than
//! [`MAX_JSON_DEPTH`] (checked by a linear scan, so no recursion can blow the
//! stack), invalid UTF-8, wrong field types and missing fields are
//! [`WebhookError::Json`]; values that parse but break a domain rule are
//! [`WebhookError::Invalid`].

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use elaaoms_shared::domain::{AgentId, CallerId, ConversationId, TranscriptTurn, ValidationError};
use elaaoms_shared::transcript::{normalise_turns, RawTurn};
use serde::de::IgnoredAny;
use serde::Deserialize;

/// Deepest JSON nesting accepted. ElevenLabs' payloads nest about 8 levels
/// (data collection results with JSON schemas); anything far deeper is an
/// attack on a recursive parser, refused before one runs.
pub const MAX_JSON_DEPTH: usize = 64;

/// 2100-01-01: later start times are refused as garbage.
const LATEST_PLAUSIBLE_UNIX_SECS: i64 = 4_102_444_800;

/// The dynamic variable holding the caller of a web call (which has no phone
/// number) unless configured otherwise.
pub const DEFAULT_WEB_CALLER_VARIABLE: &str = "user_id";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("body is not a JSON webhook: {0}")]
    Json(#[from] serde_json::Error),
    #[error("body nests JSON deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    #[error("unknown webhook type `{0}`: expected post_call_transcription, post_call_audio or call_initiation_failure")]
    UnknownType(String),
    #[error("invalid field {0}")]
    Invalid(#[from] ValidationError),
    #[error("post_call_audio: full_audio is not valid base64")]
    Audio,
}

/// How to read a webhook; the caller of a web call is configurable.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Dynamic variable (in `conversation_initiation_client_data`) naming
    /// the caller when the call has no phone number; ElevenLabs' top-level
    /// `user_id` is the fallback.
    pub web_caller_variable: String,
}

impl Default for ParseOptions {
    fn default() -> Self {
        Self {
            web_caller_variable: DEFAULT_WEB_CALLER_VARIABLE.to_owned(),
        }
    }
}

/// A verified webhook, by type.
#[derive(Debug)]
pub enum Webhook {
    Transcription(Transcription),
    Audio(Audio),
    InitiationFailure(InitiationFailure),
}

impl Webhook {
    /// The `type` value ElevenLabs sent, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Webhook::Transcription(_) => "post_call_transcription",
            Webhook::Audio(_) => "post_call_audio",
            Webhook::InitiationFailure(_) => "call_initiation_failure",
        }
    }

    pub fn conversation_id(&self) -> &ConversationId {
        match self {
            Webhook::Transcription(t) => &t.conversation_id,
            Webhook::Audio(a) => &a.conversation_id,
            Webhook::InitiationFailure(f) => &f.conversation_id,
        }
    }
}

#[derive(Debug)]
pub struct Transcription {
    pub conversation_id: ConversationId,
    pub agent_id: AgentId,
    /// `None` for a web call that carries neither a phone number nor the
    /// configured user-id variable: stored, but not extracted.
    pub caller_id: Option<CallerId>,
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

/// First pass: only the type. Everything else is skipped without being
/// built (serde_json skips values iteratively, so this cannot recurse).
#[derive(Deserialize)]
struct TypeProbe {
    #[serde(rename = "type")]
    kind: String,
    #[allow(dead_code)]
    data: IgnoredAny,
}

#[derive(Deserialize)]
struct Outer<T> {
    event_timestamp: Option<i64>,
    data: T,
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

/// Borrowed where the JSON string has no escapes, so a large audio body is
/// not copied before it is decoded.
#[derive(Deserialize)]
struct RawAudio<'a> {
    #[serde(borrow)]
    conversation_id: Cow<'a, str>,
    #[serde(borrow)]
    full_audio: Cow<'a, str>,
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

/// Whether `body` nests arrays and objects deeper than `max`. A linear scan
/// that knows strings and escapes; it does not validate the JSON (the parser
/// does that next).
pub fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let mut depth = 0_usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in body {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

pub fn parse_webhook(body: &[u8]) -> Result<Webhook, WebhookError> {
    parse_webhook_with(body, &ParseOptions::default())
}

pub fn parse_webhook_with(body: &[u8], options: &ParseOptions) -> Result<Webhook, WebhookError> {
    if nesting_exceeds(body, MAX_JSON_DEPTH) {
        return Err(WebhookError::TooDeep);
    }
    let probe: TypeProbe = serde_json::from_slice(body)?;
    match probe.kind.as_str() {
        "post_call_transcription" => {
            let outer: Outer<RawTranscription> = serde_json::from_slice(body)?;
            parse_transcription(outer.data, outer.event_timestamp, options)
                .map(Webhook::Transcription)
        }
        "post_call_audio" => {
            let outer: Outer<RawAudio<'_>> = serde_json::from_slice(body)?;
            parse_audio(outer.data).map(Webhook::Audio)
        }
        "call_initiation_failure" => {
            let outer: Outer<RawFailure> = serde_json::from_slice(body)?;
            parse_failure(outer.data).map(Webhook::InitiationFailure)
        }
        other => Err(WebhookError::UnknownType(
            other
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect(),
        )),
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn parse_transcription(
    raw: RawTranscription,
    event_timestamp: Option<i64>,
    options: &ParseOptions,
) -> Result<Transcription, WebhookError> {
    let metadata = raw.metadata.unwrap_or_default();
    let phone_call = metadata.phone_call.as_ref();
    let dynamic = raw
        .conversation_initiation_client_data
        .and_then(|data| data.dynamic_variables)
        .unwrap_or_default();
    let dynamic_str = |name: &str| {
        non_empty(
            dynamic
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        )
    };
    // The caller's number; a web call has none, so then the configured
    // user-id variable, then ElevenLabs' own user_id. Empty strings (which
    // ElevenLabs sends for unknown system variables) count as absent.
    let caller = non_empty(phone_call.and_then(|call| call.external_number.clone()))
        .or_else(|| dynamic_str("system__caller_id"))
        .or_else(|| dynamic_str(&options.web_caller_variable))
        .or_else(|| non_empty(raw.user_id));
    let started_at = match metadata.start_time_unix_secs.or(event_timestamp) {
        // Outside this range a timestamp is garbage, and some of it would
        // overflow chrono or Postgres further on.
        Some(secs) if !(0..=LATEST_PLAUSIBLE_UNIX_SECS).contains(&secs) => {
            return Err(ValidationError::new(
                "start_time_unix_secs",
                "must be a Unix time between 1970 and 2100",
            )
            .into())
        }
        Some(secs) => Utc.timestamp_opt(secs, 0).single().unwrap_or_else(Utc::now),
        None => Utc::now(),
    };
    if metadata
        .call_duration_secs
        .is_some_and(|secs| !(0..=i64::from(i32::MAX)).contains(&secs))
    {
        return Err(ValidationError::new("duration", "must be between 0 and 2^31 seconds").into());
    }
    Ok(Transcription {
        conversation_id: ConversationId::new(raw.conversation_id)?,
        agent_id: AgentId::new(raw.agent_id)?,
        caller_id: caller.map(CallerId::new).transpose()?,
        call_sid: non_empty(phone_call.and_then(|call| call.call_sid.clone()))
            .or_else(|| dynamic_str("system__call_sid")),
        started_at,
        duration_secs: metadata.call_duration_secs,
        turns: normalise_turns(raw.transcript),
    })
}

fn parse_audio(raw: RawAudio<'_>) -> Result<Audio, WebhookError> {
    use base64::Engine;
    let mp3 = base64::engine::general_purpose::STANDARD
        .decode(raw.full_audio.as_bytes())
        .map_err(|_| WebhookError::Audio)?;
    Ok(Audio {
        conversation_id: ConversationId::new(raw.conversation_id.into_owned())?,
        mp3,
    })
}

fn parse_failure(raw: RawFailure) -> Result<InitiationFailure, WebhookError> {
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
        std::fs::read(format!(
            "{}/../tests/fixtures/elevenlabs/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn both_turn_layouts_parse_and_tool_turns_are_dropped() {
        let Webhook::Transcription(maya) = parse_webhook(&fixture(
            "post_call_transcription_bakery_maya_2025-11-03.json",
        ))
        .unwrap() else {
            panic!("expected a transcription");
        };
        assert_eq!(maya.caller_id.as_ref().unwrap().as_str(), "+14155550123");
        assert_eq!(
            maya.conversation_id.as_str(),
            "conv_wxgkkg26wh6wcecpnv68bert84"
        );
        assert_eq!(maya.turns.len(), 25);
        assert!(maya.call_sid.is_some());

        let Webhook::Transcription(tom) = parse_webhook(&fixture(
            "post_call_transcription_telecom_tom_2025-11-18.json",
        ))
        .unwrap() else {
            panic!("expected a transcription");
        };
        assert_eq!(tom.caller_id.as_ref().unwrap().as_str(), "+13125550144");
        assert_eq!(tom.duration_secs, Some(182));
        assert!(tom.turns.len() < 21, "the tool-call-only turn is dropped");
        assert!(tom.turns.iter().all(|t| !t.message.contains("CHI-N-114")));
    }

    #[test]
    fn audio_and_failure_parse() {
        let Webhook::Audio(audio) =
            parse_webhook(&fixture("post_call_audio_bakery_maya_2025-11-03.json")).unwrap()
        else {
            panic!("expected audio");
        };
        assert!(audio.mp3.starts_with(b"ID3"));
        let Webhook::InitiationFailure(failure) = parse_webhook(&fixture(
            "call_initiation_failure_bakery_reminder_no_answer.json",
        ))
        .unwrap() else {
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
        assert!(
            empty_agent.to_string().contains("agent_id"),
            "{empty_agent}"
        );
        assert!(parse_webhook(b"not json").is_err());
    }

    fn web_call(dynamic: &str, user_id: &str) -> Vec<u8> {
        format!(
            r#"{{"type": "post_call_transcription", "event_timestamp": 1764000000, "data": {{
                "agent_id": "agent_web", "conversation_id": "conv_web", {user_id}
                "transcript": [{{"role": "user", "message": "hi", "time_in_call_secs": 1}}],
                "metadata": {{"start_time_unix_secs": 1764000000, "phone_call": null}},
                "conversation_initiation_client_data": {{"dynamic_variables": {{{dynamic}}}}}}}}}"#
        )
        .into_bytes()
    }

    fn caller_of(body: &[u8], options: &ParseOptions) -> Option<String> {
        let Webhook::Transcription(t) = parse_webhook_with(body, options).unwrap() else {
            panic!("expected a transcription");
        };
        t.caller_id.map(|c| c.as_str().to_owned())
    }

    #[test]
    fn a_web_call_uses_the_configured_variable_then_user_id_then_nothing() {
        let default = ParseOptions::default();
        // ElevenLabs sends empty system variables on a web call.
        let empty_system = r#""system__caller_id": "", "user_id": "u-42""#;
        assert_eq!(
            caller_of(&web_call(empty_system, ""), &default).as_deref(),
            Some("u-42")
        );
        let custom = ParseOptions {
            web_caller_variable: "customer_ref".to_owned(),
        };
        let both = r#""customer_ref": "cust-7", "user_id": "u-42""#;
        assert_eq!(
            caller_of(&web_call(both, ""), &custom).as_deref(),
            Some("cust-7")
        );
        assert_eq!(
            caller_of(
                &web_call(r#""system__caller_id": """#, r#""user_id": "top-level","#),
                &default
            )
            .as_deref(),
            Some("top-level")
        );
        assert_eq!(
            caller_of(
                &web_call(r#""system__caller_id": """#, r#""user_id": null,"#),
                &default
            ),
            None
        );
        assert_eq!(
            caller_of(
                &web_call(r#""system__caller_id": "+15550100999""#, ""),
                &default
            )
            .as_deref(),
            Some("+15550100999")
        );
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(nesting_exceeds(deep.as_bytes(), MAX_JSON_DEPTH));
        assert!(matches!(
            parse_webhook(deep.as_bytes()),
            Err(WebhookError::TooDeep)
        ));
        // Brackets inside strings, escaped quotes included, do not count.
        let in_string = format!(r#"{{"a": "{}\"{}"}}"#, "[".repeat(100), "{".repeat(100));
        assert!(!nesting_exceeds(in_string.as_bytes(), 2));
        assert!(!nesting_exceeds(
            &fixture("post_call_transcription_telecom_tom_2025-11-18.json"),
            MAX_JSON_DEPTH
        ));
    }

    #[test]
    fn implausible_times_and_durations_are_invalid_fields() {
        for (start, duration) in [
            ("-1", "10"),
            ("99999999999999", "10"),
            ("1764000000", "-5"),
            ("1764000000", "99999999999"),
        ] {
            let body = format!(
                r#"{{"type": "post_call_transcription", "data": {{"agent_id": "a", "conversation_id": "c", "user_id": "u",
                    "metadata": {{"start_time_unix_secs": {start}, "call_duration_secs": {duration}}}}}}}"#
            );
            assert!(
                matches!(
                    parse_webhook(body.as_bytes()),
                    Err(WebhookError::Invalid(_))
                ),
                "{start} {duration}"
            );
        }
    }

    #[test]
    fn stored_payload_turns_match_the_parsed_ones() {
        let body = fixture("post_call_transcription_telecom_tom_2025-11-18.json");
        let Webhook::Transcription(tom) = parse_webhook(&body).unwrap() else {
            panic!("expected a transcription");
        };
        assert_eq!(
            elaaoms_shared::transcript::turns_of_payload(&body).unwrap(),
            tom.turns
        );
    }

    /// A fuzz-like loop: thousands of mutated fixtures and random bytes
    /// never panic the parser (errors are fine).
    #[test]
    fn mutated_and_random_bodies_never_panic() {
        let seeds: Vec<Vec<u8>> = [
            "post_call_transcription_bakery_maya_2025-11-03.json",
            "post_call_audio_bakery_maya_2025-11-03.json",
            "call_initiation_failure_bakery_reminder_no_answer.json",
        ]
        .iter()
        .map(|name| fixture(name))
        .collect();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let interesting: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b"\\",
            b"null",
            b"-1",
            b"1e999",
            b"\xff",
            b"\"type\"",
        ];
        for round in 0..3_000 {
            let mut body = seeds[round % seeds.len()].clone();
            if round % 10 == 9 {
                body = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
            }
            for _ in 0..=rng.below(8) {
                let at = rng.below(body.len() + 1);
                match rng.below(4) {
                    0 if at < body.len() => body[at] = rng.next() as u8,
                    1 => body.truncate(at),
                    2 => {
                        let token = interesting[rng.below(interesting.len())];
                        body.splice(at..at, token.iter().copied());
                    }
                    _ if at < body.len() => {
                        body.remove(at);
                    }
                    _ => {}
                }
            }
            let _ = parse_webhook(&body);
            let _ = elaaoms_shared::transcript::turns_of_payload(&body);
        }
    }

    pub(crate) struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }
}
