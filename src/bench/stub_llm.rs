//! A stand-in for an OpenAI-compatible chat-completions server, so the
//! pipeline can be measured with an LLM's latency and without its cost or
//! its variance. It answers like OpenAI with structured outputs: the
//! answer's JSON as the message content, after the configured delay.
//!
//! * An extraction (the prompt of `elaaoms_extractor::prompt`): the memories
//!   the `rules` extractor finds in the request's transcript, so the indexer
//!   has the same work as with the rules; only the latency is made up.
//! * A deduplication judgement (the indexer's `{"pairs": [...]}` message):
//!   `distinct` for every pair, the prompt's answer when unsure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use elaaoms_shared::domain::{Speaker, TranscriptTurn};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::ServiceTask;

#[derive(Clone)]
struct Stub {
    delay: Duration,
    jitter: Duration,
    counts: Arc<Counts>,
}

/// Completions answered, by kind.
#[derive(Default)]
pub struct Counts {
    pub extractions: AtomicU64,
    pub judgements: AtomicU64,
}

/// The running stub: its base URL (up to `/v1`, as `llm_base_url` wants
/// it) and what it answered.
pub struct StubLlm {
    pub base_url: String,
    pub counts: Arc<Counts>,
    pub task: ServiceTask,
}

/// Starts the stub on a free port; each answer takes `delay` plus or minus
/// up to `jitter` (uniformly).
pub async fn start(
    delay: Duration,
    jitter: Duration,
    shutdown: CancellationToken,
) -> Result<StubLlm> {
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(Stub {
            delay,
            jitter: jitter.min(delay),
            counts: counts.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base_url = format!("http://{}/v1", listener.local_addr()?);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        Ok(())
    });
    Ok(StubLlm {
        base_url,
        counts,
        task,
    })
}

fn message_contents(request: &Value) -> impl Iterator<Item = &str> {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|message| message["content"].as_str())
}

/// The transcript as the extractor's prompt writes it: `TRANSCRIPT` and one
/// `AGENT: ...` or `CALLER: ...` line per turn.
fn transcript_of(request: &Value) -> Option<Vec<TranscriptTurn>> {
    let transcript = message_contents(request).find(|content| content.starts_with("TRANSCRIPT"))?;
    Some(
        transcript
            .lines()
            .filter_map(|line| {
                let (speaker, message) = if let Some(rest) = line.strip_prefix("CALLER: ") {
                    (Speaker::User, rest)
                } else {
                    (Speaker::Agent, line.strip_prefix("AGENT: ")?)
                };
                Some(TranscriptTurn {
                    speaker,
                    message: message.to_owned(),
                    time_in_call_secs: None,
                })
            })
            .collect(),
    )
}

/// The pair numbers of a deduplication judgement's `{"pairs": [...]}`.
fn pairs_of(request: &Value) -> Option<Vec<Value>> {
    message_contents(request).find_map(|content| {
        let message: Value = serde_json::from_str(content).ok()?;
        let pairs = message.get("pairs")?.as_array()?;
        Some(pairs.iter().map(|pair| pair["pair"].clone()).collect())
    })
}

fn extraction_answer(turns: &[TranscriptTurn]) -> Value {
    let memories: Vec<Value> = elaaoms_extractor::rules::extract_memories(turns)
        .iter()
        .map(|memory| {
            json!({
                "content": memory.content.as_str(),
                "type": memory.memory_type.as_str(),
                "importance": memory.importance.get(),
                "confidence": memory.confidence.get(),
                "source_quote": memory.source_quote,
            })
        })
        .collect();
    json!({"memories": memories, "resolved_issue_ids": []})
}

async fn complete(
    State(stub): State<Stub>,
    Json(request): Json<Value>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let answer = if let Some(turns) = transcript_of(&request) {
        stub.counts.extractions.fetch_add(1, Ordering::Relaxed);
        extraction_answer(&turns)
    } else if let Some(pairs) = pairs_of(&request) {
        stub.counts.judgements.fetch_add(1, Ordering::Relaxed);
        let verdicts: Vec<Value> = pairs
            .into_iter()
            .map(|pair| json!({"pair": pair, "verdict": "distinct"}))
            .collect();
        json!({ "verdicts": verdicts })
    } else {
        return Err((
            StatusCode::BAD_REQUEST,
            "neither a transcript nor deduplication pairs in the request".to_owned(),
        ));
    }
    .to_string();

    let spread = stub.jitter.as_secs_f64() * (2.0 * rand::random::<f64>() - 1.0);
    tokio::time::sleep(Duration::from_secs_f64(
        (stub.delay.as_secs_f64() + spread).max(0.0),
    ))
    .await;

    // Roughly four characters per token, for the usage bookkeeping.
    let prompt_chars: usize = message_contents(&request).map(str::len).sum();
    let (prompt_tokens, completion_tokens) = (prompt_chars / 4, answer.len() / 4);
    Ok(Json(json!({
        "id": format!("chatcmpl-bench-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": request["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    })))
}
