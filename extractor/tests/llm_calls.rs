//! One extraction against wiremock'd OpenAI, Anthropic and OpenAI-compatible
//! servers: request shapes, answers, retries, timeouts, repair and the
//! permanent failures. No NATS or Postgres here (see worker.rs).

mod common;

use std::time::Duration;

use common::*;
use elaaoms_extractor::llm::{self, ExtractError};
use elaaoms_extractor::prompt::{AgentProfile, OpenIssue, PromptInput};
use elaaoms_extractor::provider::{Anthropic, OpenAi, Provider, RetryPolicy, TokenUsage};
use elaaoms_shared::domain::{MemoryType, Speaker, TranscriptTurn};
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{body_partial_json, body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        max_retry_after: Duration::from_secs(5),
        budget: Duration::from_secs(30),
    }
}

fn openai(server: &MockServer) -> OpenAi {
    OpenAi {
        name: "openai",
        http: http(),
        base_url: format!("{}/v1", server.uri()),
        api_key: Some(SecretString::from("sk-test-key")),
        model: "gpt-4o-mini".into(),
        timeout: Duration::from_secs(5),
    }
}

fn turns() -> Vec<TranscriptTurn> {
    let turn = |speaker, message: &str| TranscriptTurn {
        speaker,
        message: message.into(),
        time_in_call_secs: None,
    };
    vec![
        turn(Speaker::Agent, "Bright Smile Dental, how can I help?"),
        turn(Speaker::User, TRANSCRIPT_CALLER_LINE),
        turn(Speaker::Agent, "Noted. Email or text for reminders?"),
        turn(Speaker::User, "Text is best, I never check my email."),
    ]
}

async fn extract(
    provider: &dyn Provider,
    policy: &RetryPolicy,
    issues: &[OpenIssue],
) -> llm::LlmRun {
    let turns = turns();
    let profile = AgentProfile {
        name: Some("Bright Smile Dental".into()),
        purpose: Some("Books and reschedules dental appointments.".into()),
    };
    llm::extract(
        provider,
        policy,
        &PromptInput {
            agent: Some(&profile),
            open_issues: issues,
            turns: &turns,
        },
    )
    .await
}

fn ok_openai() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(openai_body(&memories_json(&[]).to_string()))
}

async fn request_bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).unwrap())
        .collect()
}

#[tokio::test]
async fn openai_structured_output_request_and_answer() {
    let server = MockServer::start().await;
    let issue = OpenIssue {
        id: Uuid::new_v4(),
        content: "The caller's crown came loose.".into(),
    };
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer sk-test-key"))
        .and(body_partial_json(json!({
            "model": "gpt-4o-mini",
            "response_format": {"type": "json_schema", "json_schema": {"name": "record_memories", "strict": true}}
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body(
            &memories_json(&[issue.id.to_string()]).to_string(),
        )))
        .expect(1)
        .mount(&server)
        .await;

    let run = extract(&openai(&server), &policy(), std::slice::from_ref(&issue)).await;
    let output = run.result.expect("extracted");
    assert_eq!(output.memories.len(), 2);
    assert_eq!(output.memories[0].memory_type, MemoryType::Factual);
    assert_eq!(output.memories[0].importance.get(), 10);
    assert_eq!(output.memories[1].memory_type, MemoryType::Preference);
    assert_eq!(output.resolved_issue_ids, vec![issue.id]);
    assert_eq!(
        run.usage,
        TokenUsage {
            input: 812,
            output: 96
        }
    );
    assert_eq!((run.requests, run.repaired), (1, false));

    let body = &request_bodies(&server).await[0];
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    let system = messages[0]["content"].as_str().unwrap();
    assert!(system.contains("Name: Bright Smile Dental"), "{system}");
    assert!(system.contains(&format!("{}: The caller's crown came loose.", issue.id)));
    assert_eq!(messages[1]["role"], "user");
    assert!(messages[1]["content"]
        .as_str()
        .unwrap()
        .contains(&format!("CALLER: {TRANSCRIPT_CALLER_LINE}")));
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["additionalProperties"],
        false
    );
}

#[tokio::test]
async fn anthropic_tool_use_request_and_answer() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", "sk-ant-test"))
        .and(header("anthropic-version", "2023-06-01"))
        .and(body_partial_json(json!({
            "model": "claude-3-5-haiku-latest",
            "tool_choice": {"type": "tool", "name": "record_memories"},
            "tools": [{"name": "record_memories"}]
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_body(memories_json(&[]))))
        .expect(1)
        .mount(&server)
        .await;
    let provider = Anthropic {
        http: http(),
        base_url: server.uri(),
        api_key: SecretString::from("sk-ant-test"),
        model: "claude-3-5-haiku-latest".into(),
        max_tokens: 2048,
        timeout: Duration::from_secs(5),
    };
    let run = extract(&provider, &policy(), &[]).await;
    let output = run.result.expect("extracted");
    assert_eq!(output.memories.len(), 2);
    assert_eq!(
        run.usage,
        TokenUsage {
            input: 1024,
            output: 150
        }
    );
    let body = &request_bodies(&server).await[0];
    assert!(body["system"]
        .as_str()
        .unwrap()
        .contains("Books and reschedules dental appointments."));
    assert_eq!(body["max_tokens"], 2048);
    assert_eq!(
        body["tools"][0]["input_schema"]["required"],
        json!(["memories", "resolved_issue_ids"])
    );
}

#[tokio::test]
async fn openai_compatible_server_without_a_key_and_with_a_code_fence() {
    let server = MockServer::start().await;
    let fenced = format!("```json\n{}\n```", empty_json());
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body(&fenced)))
        .mount(&server)
        .await;
    let provider = OpenAi {
        name: "openai-compatible",
        api_key: None,
        model: "llama3.1:8b".into(),
        ..openai(&server)
    };
    let run = extract(&provider, &policy(), &[]).await;
    // Nothing worth remembering is a valid, empty answer.
    assert!(run.result.expect("extracted").memories.is_empty());
    let requests = server.received_requests().await.unwrap();
    assert!(requests[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn rate_limit_retry_after_is_honoured_and_capped() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .set_body_json(openai_error(
                    "Rate limit reached for gpt-4o-mini",
                    "requests",
                )),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "3600")
                .set_body_json(openai_error(
                    "Rate limit reached for gpt-4o-mini",
                    "requests",
                )),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ok_openai())
        .mount(&server)
        .await;

    let policy = RetryPolicy {
        max_retry_after: Duration::from_millis(1500),
        ..policy()
    };
    let run = extract(&openai(&server), &policy, &[]).await;
    assert_eq!(
        run.result
            .expect("extracted after the rate limit")
            .memories
            .len(),
        2
    );
    assert_eq!(run.requests, 3);
    // The server's Retry-After replaced the millisecond backoff; the hour was cut to the cap.
    assert_eq!(
        run.retry_waits,
        vec![Duration::from_secs(1), Duration::from_millis(1500)]
    );
}

#[tokio::test]
async fn server_error_then_success() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(openai_error("The server had an error", "server_error")),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ok_openai())
        .mount(&server)
        .await;
    let run = extract(&openai(&server), &policy(), &[]).await;
    assert_eq!(
        run.result.expect("extracted after the 500").memories.len(),
        2
    );
    assert_eq!(run.requests, 2);
    assert_eq!(run.retry_waits.len(), 1);
    assert!(
        run.retry_waits[0] <= Duration::from_millis(10),
        "jittered backoff within its bounds"
    );
}

#[tokio::test]
async fn a_provider_that_keeps_failing_is_transient_after_the_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream connect error"))
        .mount(&server)
        .await;
    let run = extract(&openai(&server), &policy(), &[]).await;
    let err = run.result.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(run.requests, 3, "one request and two retries");
}

#[tokio::test]
async fn a_timeout_is_transient_and_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ok_openai().set_delay(Duration::from_secs(3)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ok_openai())
        .mount(&server)
        .await;
    let provider = OpenAi {
        timeout: Duration::from_millis(300),
        ..openai(&server)
    };
    let run = extract(&provider, &policy(), &[]).await;
    assert_eq!(
        run.result
            .expect("extracted after the timeout")
            .memories
            .len(),
        2
    );
    assert_eq!(run.requests, 2);

    // Always too slow: transient once the retries are spent.
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ok_openai().set_delay(Duration::from_secs(3)))
        .mount(&slow)
        .await;
    let provider = OpenAi {
        timeout: Duration::from_millis(200),
        ..openai(&slow)
    };
    let policy = RetryPolicy {
        max_retries: 1,
        ..policy()
    };
    let err = extract(&provider, &policy, &[]).await.result.unwrap_err();
    assert!(
        err.is_transient() && err.to_string().contains("timed out"),
        "{err}"
    );
}

#[tokio::test]
async fn the_attempt_budget_bounds_the_whole_call() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "30"))
        .mount(&server)
        .await;
    let policy = RetryPolicy {
        max_retry_after: Duration::from_secs(30),
        budget: Duration::from_millis(300),
        ..policy()
    };
    let err = extract(&openai(&server), &policy, &[])
        .await
        .result
        .unwrap_err();
    assert!(
        err.is_transient() && err.to_string().contains("attempt budget"),
        "{err}"
    );
}

#[tokio::test]
async fn invalid_output_is_repaired_by_a_second_call() {
    let server = MockServer::start().await;
    let invalid = json!({"memories": [{"content": "The caller is allergic to penicillin.", "type": "medical",
        "importance": 10, "confidence": 0.9, "source_quote": null}], "resolved_issue_ids": []});
    Mock::given(method("POST"))
        .and(body_string_contains("Your answer was rejected"))
        .respond_with(ok_openai())
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body(&invalid.to_string())))
        .mount(&server)
        .await;
    let run = extract(&openai(&server), &policy(), &[]).await;
    assert_eq!(run.result.expect("repaired").memories.len(), 2);
    assert_eq!((run.requests, run.repaired), (2, true));
    assert_eq!(
        run.usage,
        TokenUsage {
            input: 1624,
            output: 192
        },
        "both calls are counted"
    );
    let bodies = request_bodies(&server).await;
    let repair = bodies[1]["messages"].as_array().unwrap();
    assert_eq!(
        repair.len(),
        4,
        "system, transcript, the rejected answer, the repair request"
    );
    assert_eq!(repair[2]["role"], "assistant");
    assert!(repair[2]["content"].as_str().unwrap().contains("medical"));
    assert!(
        repair[3]["content"]
            .as_str()
            .unwrap()
            .contains("memory 0: type"),
        "{}",
        repair[3]
    );

    // Garbage that is not even JSON is repaired the same way.
    let garbage = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("Your answer was rejected"))
        .respond_with(ok_openai())
        .mount(&garbage)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_body("Sure! Here are the memories: {")),
        )
        .mount(&garbage)
        .await;
    assert!(extract(&openai(&garbage), &policy(), &[])
        .await
        .result
        .is_ok());
}

#[tokio::test]
async fn output_invalid_twice_is_permanent() {
    let server = MockServer::start().await;
    let invalid = json!({"memories": [{"content": "The caller is tall.", "type": "factual", "importance": 42,
        "confidence": 0.9, "source_quote": null}], "resolved_issue_ids": []});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body(&invalid.to_string())))
        .mount(&server)
        .await;
    let run = extract(&openai(&server), &policy(), &[]).await;
    let err = run.result.unwrap_err();
    assert!(matches!(err, ExtractError::Invalid { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("importance"), "{err}");
    assert_eq!(run.requests, 2, "exactly one repair attempt");
}

#[tokio::test]
async fn a_bad_request_is_permanent_and_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(openai_error(
            "Invalid schema for response_format 'record_memories'",
            "invalid_request_error",
        )))
        .mount(&server)
        .await;
    let run = extract(&openai(&server), &policy(), &[]).await;
    let err = run.result.unwrap_err();
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("400") && err.to_string().contains("Invalid schema"),
        "{err}"
    );
    assert_eq!(run.requests, 1);
}
