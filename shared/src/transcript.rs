//! ElevenLabs transcript turns, normalised the same way wherever they are
//! read: by ingest from a webhook, and by the extractor from a stored payload
//! when the event was too large to carry them. Both turn layouts (`null` and
//! `[]` tool calls) parse; tool-call-only turns (`message: null`) and empty
//! messages are dropped.

use serde::Deserialize;

use crate::domain::{Speaker, TranscriptTurn};

/// One turn as ElevenLabs sends it; unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct RawTurn {
    pub role: String,
    pub message: Option<String>,
    pub time_in_call_secs: Option<f64>,
}

pub fn normalise_turns(raw: Vec<RawTurn>) -> Vec<TranscriptTurn> {
    raw.into_iter()
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
        .collect()
}

/// The normalised turns of a stored `post_call_transcription` payload.
pub fn turns_of_payload(body: &[u8]) -> Result<Vec<TranscriptTurn>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Data {
        #[serde(default)]
        transcript: Vec<RawTurn>,
    }
    #[derive(Deserialize)]
    struct Outer {
        data: Data,
    }
    let outer: Outer = serde_json::from_slice(body)?;
    Ok(normalise_turns(outer.data.transcript))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_only_and_empty_turns_are_dropped() {
        let body = br#"{"data": {"transcript": [
            {"role": "agent", "message": "Hello", "time_in_call_secs": 0},
            {"role": "agent", "message": null, "tool_calls": [{"x": 1}]},
            {"role": "user", "message": "  ", "time_in_call_secs": 3},
            {"role": "user", "message": " I am allergic to latex. ", "time_in_call_secs": 5}
        ]}}"#;
        let turns = turns_of_payload(body).unwrap();
        assert_eq!(turns.len(), 2);
        assert_eq!(turns[1].speaker, Speaker::User);
        assert_eq!(turns[1].message, "I am allergic to latex.");
    }
}
