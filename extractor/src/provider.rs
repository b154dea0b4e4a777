//! LLM providers behind one trait, and the retries around one call.
//!
//! A provider turns an [`LlmRequest`] (system prompt, messages, the JSON
//! schema of the answer) into the answer's JSON text and the tokens it cost.
//! Errors are classified once, here: 429, 408, 5xx (and Anthropic's 529),
//! timeouts and connection errors are transient and retried with jittered
//! exponential backoff (honouring a capped `Retry-After`) within a budget;
//! any other 4xx is permanent: sending the same request again cannot help.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// One request for structured output.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    /// The name of the answer's schema (OpenAI) or tool (Anthropic).
    pub output_name: &'static str,
    pub system: String,
    pub messages: Vec<ChatMessage>,
    pub schema: Value,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
}

impl std::ops::AddAssign for TokenUsage {
    fn add_assign(&mut self, other: Self) {
        self.input += other.input;
        self.output += other.output;
    }
}

/// The answer: JSON text meant to match the request's schema (not yet
/// validated), and its cost.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmAnswer {
    pub text: String,
    pub usage: TokenUsage,
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// Worth retrying: rate limited, overloaded, down, slow, unreachable.
    #[error("{provider}: {reason}")]
    Transient {
        provider: &'static str,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused the request itself (bad request, bad key,
    /// unknown model) or is not configured: retrying cannot help.
    #[error("{provider}: {reason}")]
    Permanent {
        provider: &'static str,
        reason: String,
    },
}

impl CallError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CallError::Transient { .. })
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Transient { retry_after, .. } => *retry_after,
            CallError::Permanent { .. } => None,
        }
    }
}

/// One LLM API. Implementations are cheap to build (they share one HTTP
/// client), so one is made per organization and message.
pub trait Provider: Send + Sync {
    /// `openai`, `anthropic`, `openai-compatible`.
    fn name(&self) -> &'static str;
    fn model(&self) -> &str;
    fn complete<'a>(
        &'a self,
        request: &'a LlmRequest,
    ) -> BoxFuture<'a, Result<LlmAnswer, CallError>>;
}

/// Classifies a non-success HTTP answer.
fn status_error(
    provider: &'static str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
) -> CallError {
    let snippet: String = body.chars().take(500).collect();
    let reason = format!("HTTP {status}: {snippet}");
    let transient = status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
        // Anthropic: overloaded.
        || status.as_u16() == 529;
    if transient {
        CallError::Transient {
            provider,
            reason,
            retry_after: retry_after(headers),
        }
    } else {
        CallError::Permanent { provider, reason }
    }
}

/// `Retry-After` in seconds (`retry-after-ms` too, which OpenAI sends).
/// The HTTP-date form is not used by the LLM APIs and is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|value| value.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header("retry-after")
        .and_then(|value| value.parse::<f64>().ok())
        .filter(|secs| secs.is_finite())
        .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
}

fn transport_error(provider: &'static str, err: reqwest::Error) -> CallError {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // Without the URL: it may carry a key for some compatible servers.
    let reason = format!(
        "{kind}: {}",
        elaaoms_shared::bus::consumer::error_chain(&err.without_url())
    );
    CallError::Transient {
        provider,
        reason,
        retry_after: None,
    }
}

/// Sends a JSON POST and returns the decoded JSON body of a 2xx answer.
async fn post_json(
    provider: &'static str,
    request: reqwest::RequestBuilder,
    body: &Value,
) -> Result<Value, CallError> {
    let response = request
        .json(body)
        .send()
        .await
        .map_err(|err| transport_error(provider, err))?;
    let status = response.status();
    let headers = response.headers().clone();
    let text = response
        .text()
        .await
        .map_err(|err| transport_error(provider, err))?;
    if !status.is_success() {
        return Err(status_error(provider, status, &headers, &text));
    }
    // A 2xx that is not JSON comes from a proxy in the way, not the model.
    serde_json::from_str(&text).map_err(|err| CallError::Transient {
        provider,
        reason: format!("HTTP {status} with a body that is not JSON: {err}"),
        retry_after: None,
    })
}

fn usage_field(value: &Value, field: &str) -> u64 {
    value.get(field).and_then(Value::as_u64).unwrap_or(0)
}

fn unexpected(provider: &'static str, what: &str) -> CallError {
    CallError::Transient {
        provider,
        reason: format!("unexpected response: {what}"),
        retry_after: None,
    }
}

/// OpenAI Chat Completions with structured outputs (`response_format` with
/// a strict JSON schema); also any OpenAI-compatible server by base URL.
pub struct OpenAi {
    pub name: &'static str,
    pub http: reqwest::Client,
    /// Up to and including `/v1`.
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub model: String,
    pub timeout: Duration,
}

impl OpenAi {
    fn body(&self, request: &LlmRequest) -> Value {
        let mut messages = vec![json!({"role": "system", "content": request.system})];
        messages.extend(
            request
                .messages
                .iter()
                .map(|message| json!({"role": message.role.as_str(), "content": message.content})),
        );
        json!({
            "model": self.model,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": request.output_name, "strict": true, "schema": request.schema}
            }
        })
    }

    fn answer(&self, body: &Value) -> Result<LlmAnswer, CallError> {
        let message = body
            .pointer("/choices/0/message")
            .ok_or_else(|| unexpected(self.name, "no choices[0].message"))?;
        let usage = body.get("usage").cloned().unwrap_or(Value::Null);
        let usage = TokenUsage {
            input: usage_field(&usage, "prompt_tokens"),
            output: usage_field(&usage, "completion_tokens"),
        };
        // A refusal is an answer that does not follow the schema: the
        // validation refuses it and the repair turn asks again.
        let text = match (
            message.get("content").and_then(Value::as_str),
            message.get("refusal").and_then(Value::as_str),
        ) {
            (Some(content), _) => content.to_owned(),
            (None, Some(refusal)) => format!("(refused) {refusal}"),
            (None, None) => String::new(),
        };
        Ok(LlmAnswer { text, usage })
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        self.name
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        request: &'a LlmRequest,
    ) -> BoxFuture<'a, Result<LlmAnswer, CallError>> {
        Box::pin(async move {
            let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
            let mut http = self.http.post(url).timeout(self.timeout);
            if let Some(key) = &self.api_key {
                http = http.bearer_auth(key.expose_secret());
            }
            let body = post_json(self.name, http, &self.body(request)).await?;
            self.answer(&body)
        })
    }
}

/// Anthropic Messages with one tool whose input schema is the answer: the
/// model is made to call it, and its input is the answer.
pub struct Anthropic {
    pub http: reqwest::Client,
    /// Without `/v1`.
    pub base_url: String,
    pub api_key: SecretString,
    pub model: String,
    pub max_tokens: u32,
    pub timeout: Duration,
}

pub const ANTHROPIC_VERSION: &str = "2023-06-01";

impl Anthropic {
    fn body(&self, request: &LlmRequest) -> Value {
        let messages: Vec<Value> = request
            .messages
            .iter()
            .map(|message| json!({"role": message.role.as_str(), "content": message.content}))
            .collect();
        json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": request.system,
            "messages": messages,
            "tools": [{
                "name": request.output_name,
                "description": "Record the memories about the caller and the open issues this call resolved.",
                "input_schema": request.schema
            }],
            "tool_choice": {"type": "tool", "name": request.output_name}
        })
    }

    fn answer(body: &Value, output_name: &str) -> Result<LlmAnswer, CallError> {
        let content = body
            .get("content")
            .and_then(Value::as_array)
            .ok_or_else(|| unexpected("anthropic", "no content"))?;
        let usage = body.get("usage").cloned().unwrap_or(Value::Null);
        let usage = TokenUsage {
            input: usage_field(&usage, "input_tokens")
                + usage_field(&usage, "cache_creation_input_tokens")
                + usage_field(&usage, "cache_read_input_tokens"),
            output: usage_field(&usage, "output_tokens"),
        };
        let tool_input = content.iter().find(|block| {
            block.get("type").and_then(Value::as_str) == Some("tool_use")
                && block.get("name").and_then(Value::as_str) == Some(output_name)
        });
        let text = match tool_input.and_then(|block| block.get("input")) {
            Some(input) => input.to_string(),
            // No tool call: whatever text there is fails validation and the
            // repair turn asks again.
            None => content
                .iter()
                .filter_map(|block| block.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        Ok(LlmAnswer { text, usage })
    }
}

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        request: &'a LlmRequest,
    ) -> BoxFuture<'a, Result<LlmAnswer, CallError>> {
        Box::pin(async move {
            let url = format!("{}/v1/messages", self.base_url.trim_end_matches('/'));
            let http = self
                .http
                .post(url)
                .timeout(self.timeout)
                .header("x-api-key", self.api_key.expose_secret())
                .header("anthropic-version", ANTHROPIC_VERSION);
            let body = post_json("anthropic", http, &self.body(request)).await?;
            Self::answer(&body, request.output_name)
        })
    }
}

/// How one call is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first request.
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A longer `Retry-After` is cut to this.
    pub max_retry_after: Duration,
    /// The whole call, retries and waits included, within one delivery.
    pub budget: Duration,
}

/// What the retries did, whatever the outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallReport {
    /// HTTP requests sent.
    pub requests: u32,
    /// The waits between them, in order.
    pub waits: Vec<Duration>,
}

/// Calls the provider, retrying transient failures with jittered
/// exponential backoff; a `Retry-After` replaces the backoff's delay (capped).
pub async fn call_with_retries(
    provider: &dyn Provider,
    request: &LlmRequest,
    policy: &RetryPolicy,
) -> (Result<LlmAnswer, CallError>, CallReport) {
    let report = Arc::new(Mutex::new(CallReport::default()));
    let backoff = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_retries);
    let attempt = || {
        let report = report.clone();
        async move {
            report.lock().expect("report lock").requests += 1;
            provider.complete(request).await
        }
    };
    let max_retry_after = policy.max_retry_after;
    let retries = attempt
        .retry(backoff)
        .when(CallError::is_transient)
        .adjust(move |err: &CallError, delay| match (delay, err.retry_after()) {
            // Out of retries: the Retry-After does not buy another one.
            (None, _) => None,
            (Some(_), Some(wait)) => Some(wait.min(max_retry_after)),
            (Some(delay), None) => Some(delay),
        })
        .notify({
            let report = report.clone();
            move |err: &CallError, wait| {
                tracing::warn!(error = %err, wait_ms = wait.as_millis() as u64, "LLM call failed; retrying");
                report.lock().expect("report lock").waits.push(wait);
            }
        });
    let result = match tokio::time::timeout(policy.budget, retries).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Transient {
            provider: provider.name(),
            reason: format!("no answer within the attempt budget of {:?}", policy.budget),
            retry_after: None,
        }),
    };
    let report = report.lock().expect("report lock").clone();
    (result, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn statuses_are_classified() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        let limited = status_error(
            "openai",
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            "slow down",
        );
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(7)));
        assert!(limited.is_transient());
        for status in [500, 502, 503, 529, 408] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                status_error("x", status, &HeaderMap::new(), "").is_transient(),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 422] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                !status_error("x", status, &HeaderMap::new(), "").is_transient(),
                "{status}"
            );
        }
        let mut ms = HeaderMap::new();
        ms.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&ms), Some(Duration::from_millis(250)));
        let mut date = HeaderMap::new();
        date.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&date), None);
    }

    #[test]
    fn anthropic_answer_is_the_tool_input() {
        let body = json!({
            "content": [
                {"type": "text", "text": "Recording."},
                {"type": "tool_use", "id": "toolu_1", "name": "record_memories", "input": {"memories": [], "resolved_issue_ids": []}}
            ],
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2}
        });
        let answer = Anthropic::answer(&body, "record_memories").unwrap();
        assert_eq!(
            answer.usage,
            TokenUsage {
                input: 12,
                output: 5
            }
        );
        let value: Value = serde_json::from_str(&answer.text).unwrap();
        assert_eq!(value["memories"], json!([]));
    }
}
