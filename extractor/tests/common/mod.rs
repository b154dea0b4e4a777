//! Realistic provider answers and helpers shared by the extractor's tests.
#![allow(dead_code)]

use serde_json::{json, Value};

/// The answer's JSON as the model writes it.
pub fn memories_json(resolved: &[String]) -> Value {
    json!({
        "memories": [
            {
                "content": "The caller is allergic to penicillin.",
                "type": "factual",
                "importance": 10,
                "confidence": 0.95,
                "source_quote": "I'm allergic to penicillin, it gives me hives."
            },
            {
                "content": "The caller prefers appointment reminders by text message.",
                "type": "preference",
                "importance": 7,
                "confidence": 0.9,
                "source_quote": "Text is best, I never check my email."
            }
        ],
        "resolved_issue_ids": resolved
    })
}

pub fn empty_json() -> Value {
    json!({"memories": [], "resolved_issue_ids": []})
}

/// A Chat Completions answer (structured output) as OpenAI sends it.
pub fn openai_body(content: &str) -> Value {
    json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1_741_569_952,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 812,
            "completion_tokens": 96,
            "total_tokens": 908,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        },
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306"
    })
}

/// A Messages answer with the forced tool call, as Anthropic sends it.
pub fn anthropic_body(input: Value) -> Value {
    json!({
        "id": "msg_01Aq9w938a90dw8q",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-20241022",
        "content": [{
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "record_memories",
            "input": input
        }],
        "stop_reason": "tool_use",
        "stop_sequence": null,
        "usage": {"input_tokens": 1024, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 150}
    })
}

/// OpenAI's error body.
pub fn openai_error(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// The ElevenLabs agent API's answer (trimmed to the fields that matter
/// plus some that must not leak into the prompt).
pub fn elevenlabs_agent(name: &str, prompt: &str) -> Value {
    json!({
        "agent_id": "agent_dental_01",
        "name": name,
        "conversation_config": {
            "agent": {
                "first_message": "Hi, this is Bright Smile Dental, how can I help?",
                "language": "en",
                "prompt": {"prompt": prompt, "llm": "gemini-2.0-flash-001", "temperature": 0.2}
            },
            "tts": {"voice_id": "21m00Tcm4TlvDq8ikWAM"}
        },
        "metadata": {"created_at_unix_secs": 1_732_000_000},
        "platform_settings": {"workspace_overrides": {"conversation_initiation_client_data_webhook": {"url": "https://example.invalid/hook"}}},
        "tags": []
    })
}

pub const TRANSCRIPT_CALLER_LINE: &str = "I'm allergic to penicillin, it gives me hives.";
