//! The extractor service on the real NATS and Postgres, with wiremock'd
//! OpenAI, Anthropic and ElevenLabs: success paths, the dead-letter path,
//! the per-organization circuit breaker and a replay from the dead letters.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use elaaoms_extractor::dlq::{self, ReplayFilter, ReplayOutcome};
use elaaoms_extractor::{Config, ExtractorService, ExtractorSettings, LlmSettings};
use elaaoms_shared::bus::{event_msg_id, Envelope, Step};
use elaaoms_shared::config::{DatabaseConfig, PayloadStoreConfig, WorkerConfig};
use elaaoms_shared::events::{ConversationTranscribed, MemoriesExtracted};
use elaaoms_shared::test_support::{TestBus, TestDatabase};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "whsec_test_0123456789abcdef0123456789abcdef";
const AGENT: &str = "agent_dental_01";

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    health: SocketAddr,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("extractor task");
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.health))
            .await
            .expect("metrics answer")
            .text()
            .await
            .unwrap()
    }
}

struct Harness {
    database: TestDatabase,
    bus: TestBus,
    payloads: tempfile::TempDir,
}

fn llm_settings(openai: &MockServer, anthropic: &MockServer) -> LlmSettings {
    LlmSettings {
        openai_api_key: Some(SecretString::from("sk-test-key")),
        openai_base_url: format!("{}/v1", openai.uri()),
        anthropic_api_key: Some(SecretString::from("sk-ant-test")),
        anthropic_base_url: anthropic.uri(),
        max_retries: 1,
        retry_min_delay: Duration::from_millis(1),
        retry_max_delay: Duration::from_millis(5),
        request_timeout: Duration::from_secs(5),
        ..LlmSettings::default()
    }
}

impl Harness {
    async fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            database: TestDatabase::create().await,
            bus: TestBus::create().await,
            payloads: tempfile::tempdir().unwrap(),
        }
    }

    async fn start(&self, settings: ExtractorSettings, max_attempts: u64) -> Running {
        let service = ExtractorService::build(Config {
            database: DatabaseConfig {
                database_url: self.database.service_url.clone(),
                database_max_connections: 5,
            },
            bus: self.bus.config.clone(),
            worker: WorkerConfig {
                worker_concurrency: 4,
                worker_per_organization_concurrency: 2,
                worker_max_attempts: max_attempts,
                worker_retry_delays: vec![Duration::from_millis(50)],
                worker_ack_wait: Duration::from_secs(30),
            },
            payloads: PayloadStoreConfig {
                payload_dir: self.payloads.path().to_owned(),
                payload_store_url: None,
            },
            settings: ExtractorSettings {
                health_addr: "127.0.0.1:0".parse().unwrap(),
                ..settings
            },
        })
        .await
        .expect("extractor starts");
        let health = service.health_addr();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { service.run(token).await.expect("extractor runs") });
        Running {
            shutdown,
            task,
            health,
        }
    }

    async fn organization(&self, slug: &str, provider: &str, base_url: Option<&str>) -> Uuid {
        let id = self.database.create_organization(slug, SECRET).await;
        sqlx::query("UPDATE organizations SET llm_provider = $2, llm_base_url = $3 WHERE id = $1")
            .bind(id)
            .bind(provider)
            .bind(base_url)
            .execute(&self.database.admin_pool)
            .await
            .unwrap();
        id
    }

    /// A conversation waiting for extraction, as ingest leaves it.
    async fn conversation(&self, organization_id: Uuid, conversation_id: &str, caller_id: &str) {
        let admin = &self.database.admin_pool;
        sqlx::query(
            "INSERT INTO agents (organization_id, agent_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(organization_id)
        .bind(AGENT)
        .execute(admin)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
             VALUES ($1, $2, now(), now(), 1) ON CONFLICT DO NOTHING",
        )
        .bind(organization_id)
        .bind(caller_id)
        .execute(admin)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
             VALUES ($1, $2, $3, $4, now(), 'completed')",
        )
        .bind(organization_id)
        .bind(conversation_id)
        .bind(AGENT)
        .bind(caller_id)
        .execute(admin)
        .await
        .unwrap();
        sqlx::query("UPDATE conversations SET status = 'extraction_pending' WHERE organization_id = $1 AND conversation_id = $2")
            .bind(organization_id)
            .bind(conversation_id)
            .execute(admin)
            .await
            .unwrap();
    }

    async fn open_issue(
        &self,
        organization_id: Uuid,
        conversation_id: &str,
        caller_id: &str,
        content: &str,
    ) -> Uuid {
        sqlx::query_scalar(
            "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type, importance,
                                   confidence, status, embedding, embedding_model)
             VALUES ($1, $2, $3, $4, $5, 'issue', 7, 0.9, 'open', array_fill(0.1::real, ARRAY[384])::vector, 'test')
             RETURNING id",
        )
        .bind(organization_id)
        .bind(caller_id)
        .bind(AGENT)
        .bind(conversation_id)
        .bind(content)
        .fetch_one(&self.database.admin_pool)
        .await
        .unwrap()
    }

    async fn publish_transcript(
        &self,
        organization_id: Uuid,
        conversation_id: &str,
        caller_id: &str,
        caller_line: &str,
    ) {
        let payload: ConversationTranscribed = serde_json::from_value(json!({
            "conversation_id": conversation_id,
            "agent_id": AGENT,
            "caller_id": caller_id,
            "started_at": "2026-11-20T15:04:05Z",
            "turns": [
                {"speaker": "agent", "message": "Bright Smile Dental, how can I help?", "time_in_call_secs": 0.0},
                {"speaker": "user", "message": caller_line, "time_in_call_secs": 3.5},
                {"speaker": "agent", "message": "Noted. Email or text for reminders?", "time_in_call_secs": 9.0},
                {"speaker": "user", "message": "Text is best, I never check my email.", "time_in_call_secs": 12.0}
            ]
        }))
        .unwrap();
        let body = Envelope::new(organization_id, 1, payload).encode().unwrap();
        let bus = &self.bus.bus;
        bus.publish(
            &bus.names.subject(Step::Transcribed),
            &event_msg_id(organization_id, conversation_id, Step::Transcribed, 1),
            organization_id,
            Bytes::from(body),
        )
        .await
        .unwrap();
    }

    /// Every `memories.extracted` event in the stream.
    async fn extracted(&self) -> Vec<Envelope<MemoriesExtracted>> {
        let bus = &self.bus.bus;
        let mut stream = bus
            .jetstream
            .get_stream(bus.names.event_stream())
            .await
            .unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut events = Vec::new();
        for sequence in state.first_sequence..=state.last_sequence {
            if let Ok(message) = stream.get_raw_message(sequence).await {
                if message.subject.as_str() == bus.names.subject(Step::Extracted) {
                    events.push(Envelope::decode(&message.payload).unwrap());
                }
            }
        }
        events
    }

    async fn wait_for_extracted(
        &self,
        conversation_id: &str,
        generation: i32,
    ) -> Envelope<MemoriesExtracted> {
        let found = poll(Duration::from_secs(30), || async {
            self.extracted().await.into_iter().find(|event| {
                event.payload.conversation_id == conversation_id && event.generation == generation
            })
        })
        .await;
        found.unwrap_or_else(|| {
            panic!("no extracted event for {conversation_id} generation {generation}")
        })
    }

    async fn status(&self, organization_id: Uuid, conversation_id: &str) -> (String, i32) {
        sqlx::query_as("SELECT status, generation FROM conversations WHERE organization_id = $1 AND conversation_id = $2")
            .bind(organization_id)
            .bind(conversation_id)
            .fetch_one(&self.database.admin_pool)
            .await
            .unwrap()
    }

    async fn wait_for_status(&self, organization_id: Uuid, conversation_id: &str, wanted: &str) {
        let reached = poll(Duration::from_secs(30), || async {
            (self.status(organization_id, conversation_id).await.0 == wanted).then_some(())
        })
        .await;
        assert!(
            reached.is_some(),
            "{conversation_id} never reached {wanted}: {:?}",
            self.status(organization_id, conversation_id).await
        );
    }

    fn failure_file(&self, conversation_id: &str) -> Option<Value> {
        let path = self
            .payloads
            .path()
            .join(conversation_id)
            .join(format!("{conversation_id}_failure.json"));
        std::fs::read(path)
            .ok()
            .map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }
}

/// Polls `check` every 50 ms until it gives something or `limit` passes.
async fn poll<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn openai_extraction_with_profile_issues_and_token_usage() {
    let harness = Harness::new().await;
    let (openai, anthropic, elevenlabs) = (
        MockServer::start().await,
        MockServer::start().await,
        MockServer::start().await,
    );
    let organization = harness.organization("dental-openai", "openai", None).await;
    let caller = "+14155550123";
    harness
        .conversation(organization, "conv_earlier", caller)
        .await;
    let issue = harness
        .open_issue(
            organization,
            "conv_earlier",
            caller,
            "The caller's temporary crown came loose.",
        )
        .await;
    harness
        .conversation(organization, "conv_openai_1", caller)
        .await;

    Mock::given(method("GET"))
        .and(path(format!("/v1/convai/agents/{AGENT}")))
        .and(header("xi-api-key", "xi-test-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(elevenlabs_agent(
            "Bright Smile Dental",
            "You are the receptionist of Bright Smile Dental. You book and reschedule appointments.",
        )))
        .expect(1)
        .mount(&elevenlabs)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(body_string_contains(
            "Bright Smile Dental. You book and reschedule",
        ))
        .and(body_string_contains(issue.to_string()))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body(
            &memories_json(&[issue.to_string()]).to_string(),
        )))
        .expect(1)
        .mount(&openai)
        .await;

    let mut settings = ExtractorSettings {
        llm: llm_settings(&openai, &anthropic),
        ..ExtractorSettings::default()
    };
    settings.profiles.elevenlabs_api_key = Some(SecretString::from("xi-test-key"));
    settings.profiles.elevenlabs_base_url = elevenlabs.uri();
    let running = harness.start(settings, 3).await;
    harness
        .publish_transcript(
            organization,
            "conv_openai_1",
            caller,
            TRANSCRIPT_CALLER_LINE,
        )
        .await;

    let event = harness.wait_for_extracted("conv_openai_1", 1).await;
    assert_eq!(event.payload.extractor, "openai:gpt-4o-mini");
    assert_eq!(event.payload.memories.len(), 2);
    assert_eq!(
        event.payload.memories[0].content.as_str(),
        "The caller is allergic to penicillin."
    );
    assert_eq!(event.payload.resolved_issue_ids, vec![issue]);

    let usage: (String, String, i32, i64, i64, String) = sqlx::query_as(
        "SELECT provider, model, llm_calls, input_tokens, output_tokens, prompt_version FROM extraction_usage
          WHERE organization_id = $1 AND conversation_id = 'conv_openai_1' AND generation = 1",
    )
    .bind(organization)
    .fetch_one(&harness.database.admin_pool)
    .await
    .unwrap();
    assert_eq!(
        usage,
        (
            "openai".into(),
            "gpt-4o-mini".into(),
            1,
            812,
            96,
            "v1".into()
        )
    );
    let (name, cached): (Option<String>, bool) = sqlx::query_as(
        "SELECT name, profile_cached_at IS NOT NULL FROM agents WHERE organization_id = $1 AND agent_id = $2",
    )
    .bind(organization)
    .bind(AGENT)
    .fetch_one(&harness.database.admin_pool)
    .await
    .unwrap();
    assert_eq!(
        (name.as_deref(), cached),
        (Some("Bright Smile Dental"), true)
    );
    let metrics = running.metrics().await;
    assert!(
        metrics.contains(r#"elaaoms_extractor_llm_tokens_total{kind="input",model="gpt-4o-mini",provider="openai"} 812"#),
        "{metrics}"
    );
    running.stop().await;
    harness.bus.cleanup().await;
}

#[tokio::test]
async fn anthropic_extraction_and_a_call_with_nothing_to_remember() {
    let harness = Harness::new().await;
    let (openai, anthropic) = (MockServer::start().await, MockServer::start().await);
    let organization = harness
        .organization("bakery-anthropic", "anthropic", None)
        .await;
    harness
        .conversation(organization, "conv_ant_1", "+14155550100")
        .await;
    harness
        .conversation(organization, "conv_ant_empty", "+14155550101")
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(body_string_contains("Just checking your opening hours"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_body(empty_json())))
        .mount(&anthropic)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", "sk-ant-test"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_body(memories_json(&[]))))
        .mount(&anthropic)
        .await;
    // ElevenLabs is down: the profile is skipped, the extraction goes on.
    let elevenlabs = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .mount(&elevenlabs)
        .await;
    let mut settings = ExtractorSettings {
        llm: llm_settings(&openai, &anthropic),
        ..ExtractorSettings::default()
    };
    settings.profiles.elevenlabs_api_key = Some(SecretString::from("xi-test-key"));
    settings.profiles.elevenlabs_base_url = elevenlabs.uri();
    let running = harness.start(settings, 3).await;
    harness
        .publish_transcript(
            organization,
            "conv_ant_1",
            "+14155550100",
            TRANSCRIPT_CALLER_LINE,
        )
        .await;
    harness
        .publish_transcript(
            organization,
            "conv_ant_empty",
            "+14155550101",
            "Just checking your opening hours, thanks.",
        )
        .await;

    let event = harness.wait_for_extracted("conv_ant_1", 1).await;
    assert_eq!(event.payload.extractor, "anthropic:claude-3-5-haiku-latest");
    assert_eq!(event.payload.memories.len(), 2);
    let empty = harness.wait_for_extracted("conv_ant_empty", 1).await;
    assert!(
        empty.payload.memories.is_empty(),
        "nothing worth remembering still completes"
    );
    assert!(
        !elevenlabs.received_requests().await.unwrap().is_empty(),
        "the profile fetch was tried"
    );
    let first = &anthropic.received_requests().await.unwrap()[0];
    let system = first.body_json::<Value>().unwrap()["system"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(system.contains("AGENT PROFILE\nUnknown."), "{system}");
    let tokens: i64 = sqlx::query_scalar(
        "SELECT sum(input_tokens)::bigint FROM extraction_usage WHERE organization_id = $1",
    )
    .bind(organization)
    .fetch_one(&harness.database.admin_pool)
    .await
    .unwrap();
    assert_eq!(tokens, 2048);
    assert!(openai.received_requests().await.unwrap().is_empty());
    running.stop().await;
    harness.bus.cleanup().await;
}

#[tokio::test]
async fn a_rejected_request_goes_to_the_dead_letters_with_a_failure_file() {
    let harness = Harness::new().await;
    let (openai, anthropic) = (MockServer::start().await, MockServer::start().await);
    let organization = harness.organization("dlq-org", "openai", None).await;
    harness
        .conversation(organization, "conv_bad_1", "+14155550111")
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(openai_error(
            "Invalid schema for response_format 'record_memories'",
            "invalid_request_error",
        )))
        .mount(&openai)
        .await;
    let running = harness
        .start(
            ExtractorSettings {
                llm: llm_settings(&openai, &anthropic),
                ..ExtractorSettings::default()
            },
            3,
        )
        .await;
    harness
        .publish_transcript(
            organization,
            "conv_bad_1",
            "+14155550111",
            TRANSCRIPT_CALLER_LINE,
        )
        .await;
    harness
        .wait_for_status(organization, "conv_bad_1", "extraction_failed")
        .await;

    let letters = dlq::list(&harness.bus.bus).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].conversation_id.as_deref(), Some("conv_bad_1"));
    assert_eq!(letters[0].organization_id, Some(organization));
    assert_eq!(
        letters[0].attempts,
        Some(1),
        "a permanent error is not retried"
    );
    assert!(
        letters[0].reason.contains("HTTP 400"),
        "{}",
        letters[0].reason
    );
    let failure = harness
        .failure_file("conv_bad_1")
        .expect("failure.json written");
    assert_eq!(failure["kind"], "extraction");
    assert_eq!(failure["attempts"], 1);
    assert!(
        failure["error_chain"].as_array().unwrap().len() >= 2,
        "{failure}"
    );
    assert_eq!(failure["attempt_log"][0]["kind"], "permanent");
    assert_eq!(failure["attempt_log"][0]["llm_requests"], 1);
    assert_eq!(
        openai.received_requests().await.unwrap().len(),
        1,
        "a 400 is not retried"
    );
    assert!(harness.extracted().await.is_empty());
    running.stop().await;
    harness.bus.cleanup().await;
}

#[tokio::test]
async fn the_circuit_breaker_isolates_a_failing_organization() {
    let harness = Harness::new().await;
    let (healthy, anthropic, failing) = (
        MockServer::start().await,
        MockServer::start().await,
        MockServer::start().await,
    );
    let broken_url = format!("{}/v1", failing.uri());
    let broken = harness
        .organization("broken-provider", "openai", Some(&broken_url))
        .await;
    let fine = harness.organization("fine-provider", "openai", None).await;
    harness
        .conversation(broken, "conv_broken_1", "+14155550200")
        .await;
    for n in 1..=3 {
        harness
            .conversation(fine, &format!("conv_fine_{n}"), "+14155550201")
            .await;
    }
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(openai_error("The server had an error", "server_error")),
        )
        .mount(&failing)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_body(&memories_json(&[]).to_string())),
        )
        .mount(&healthy)
        .await;
    let mut llm = llm_settings(&healthy, &anthropic);
    llm.max_retries = 0;
    llm.breaker_threshold = 2;
    llm.breaker_cooldown = Duration::from_secs(3600);
    let running = harness
        .start(
            ExtractorSettings {
                llm,
                ..ExtractorSettings::default()
            },
            6,
        )
        .await;
    harness
        .publish_transcript(
            broken,
            "conv_broken_1",
            "+14155550200",
            TRANSCRIPT_CALLER_LINE,
        )
        .await;
    for n in 1..=3 {
        harness
            .publish_transcript(
                fine,
                &format!("conv_fine_{n}"),
                "+14155550201",
                TRANSCRIPT_CALLER_LINE,
            )
            .await;
    }
    for n in 1..=3 {
        harness
            .wait_for_extracted(&format!("conv_fine_{n}"), 1)
            .await;
    }
    // The broken organization's message spends its deliveries without
    // calling the provider once the circuit is open, then dead-letters.
    harness
        .wait_for_status(broken, "conv_broken_1", "extraction_failed")
        .await;
    assert_eq!(
        failing.received_requests().await.unwrap().len(),
        2,
        "the provider is called until the circuit opens (threshold 2), then not at all"
    );
    let failure = harness.failure_file("conv_broken_1").expect("failure.json");
    let log = failure["attempt_log"].as_array().unwrap();
    assert!(
        log[0]["error"].as_str().unwrap().contains("HTTP 500"),
        "{failure}"
    );
    assert!(
        log.iter().any(
            |attempt| attempt["error"].as_str().unwrap().contains("circuit open")
                && attempt["llm_requests"] == 0
        ),
        "{failure}"
    );
    assert_eq!(healthy.received_requests().await.unwrap().len(), 3);
    let metrics = running.metrics().await;
    assert!(
        metrics.contains("elaaoms_extractor_circuits_opened_total 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("elaaoms_extractor_circuit_rejections_total 0"),
        "{metrics}"
    );
    running.stop().await;
    harness.bus.cleanup().await;
}

#[tokio::test]
async fn a_dead_letter_replay_completes_once() {
    let harness = Harness::new().await;
    let (openai, anthropic) = (MockServer::start().await, MockServer::start().await);
    let organization = harness.organization("replay-org", "openai", None).await;
    harness
        .conversation(organization, "conv_replay_1", "+14155550300")
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(openai_error(
            "Incorrect API key provided",
            "invalid_request_error",
        )))
        .mount(&openai)
        .await;
    let running = harness
        .start(
            ExtractorSettings {
                llm: llm_settings(&openai, &anthropic),
                ..ExtractorSettings::default()
            },
            3,
        )
        .await;
    harness
        .publish_transcript(
            organization,
            "conv_replay_1",
            "+14155550300",
            TRANSCRIPT_CALLER_LINE,
        )
        .await;
    harness
        .wait_for_status(organization, "conv_replay_1", "extraction_failed")
        .await;
    assert_eq!(dlq::list(&harness.bus.bus).await.unwrap().len(), 1);

    // The operator fixes the key; the provider answers again.
    openai.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_body(&memories_json(&[]).to_string())),
        )
        .mount(&openai)
        .await;

    let admin = &harness.database.admin_pool;
    let everything = ReplayFilter::default();
    let dry = dlq::replay(&harness.bus.bus, admin, &everything, true, |_, _| {})
        .await
        .unwrap();
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0].1, ReplayOutcome::WouldReplay { generation: 2 });
    assert_eq!(
        harness.status(organization, "conv_replay_1").await,
        ("extraction_failed".into(), 1)
    );
    let other_org = ReplayFilter {
        organization_id: Some(Uuid::new_v4()),
        ..ReplayFilter::default()
    };
    assert!(
        dlq::replay(&harness.bus.bus, admin, &other_org, false, |_, _| {})
            .await
            .unwrap()
            .is_empty()
    );

    let mut reported = 0;
    let done = dlq::replay(&harness.bus.bus, admin, &everything, false, |_, _| {
        reported += 1
    })
    .await
    .unwrap();
    assert_eq!(reported, 1);
    assert_eq!(done[0].1, ReplayOutcome::Replayed { generation: 2 });
    assert_eq!(
        harness.status(organization, "conv_replay_1").await,
        ("extraction_pending".into(), 2)
    );
    assert!(
        dlq::list(&harness.bus.bus).await.unwrap().is_empty(),
        "the dead letter is gone"
    );

    let event = harness.wait_for_extracted("conv_replay_1", 2).await;
    assert_eq!(event.payload.memories.len(), 2);
    // A second replay finds nothing; the extraction happened once.
    assert!(
        dlq::replay(&harness.bus.bus, admin, &everything, false, |_, _| {})
            .await
            .unwrap()
            .is_empty()
    );
    let calls: i32 = sqlx::query_scalar(
        "SELECT llm_calls FROM extraction_usage WHERE organization_id = $1 AND conversation_id = 'conv_replay_1' AND generation = 2",
    )
    .bind(organization)
    .fetch_one(admin)
    .await
    .unwrap();
    assert_eq!(calls, 1);
    running.stop().await;
    let extracted: Vec<_> = harness
        .extracted()
        .await
        .into_iter()
        .filter(|event| event.payload.conversation_id == "conv_replay_1")
        .collect();
    assert_eq!(extracted.len(), 1, "one extracted event, at generation 2");
    harness.bus.cleanup().await;
}

#[tokio::test]
async fn a_transcript_sent_by_reference_is_read_from_the_payload_store() {
    let harness = Harness::new().await;
    let organization = harness
        .organization("bakery-by-reference", "rules", None)
        .await;
    let conversation_id = "conv_wxgkkg26wh6wcecpnv68bert84";
    harness
        .conversation(organization, conversation_id, "+14155550123")
        .await;
    // What ingest stored, and an event too large to carry the turns.
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/elevenlabs/post_call_transcription_bakery_maya_2025-11-03.json"
    ))
    .unwrap();
    let dir = harness.payloads.path().join(conversation_id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{conversation_id}_transcription.json")),
        fixture,
    )
    .unwrap();
    let payload = ConversationTranscribed {
        conversation_id: conversation_id.to_owned(),
        agent_id: AGENT.to_owned(),
        caller_id: "+14155550123".to_owned(),
        started_at: chrono::Utc::now(),
        turns: Vec::new(),
        payload_ref: Some(format!(
            "{conversation_id}/{conversation_id}_transcription.json"
        )),
    };
    let bus = &harness.bus.bus;
    bus.publish(
        &bus.names.subject(Step::Transcribed),
        &event_msg_id(organization, conversation_id, Step::Transcribed, 1),
        organization,
        Bytes::from(Envelope::new(organization, 1, payload).encode().unwrap()),
    )
    .await
    .unwrap();
    let running = harness.start(ExtractorSettings::default(), 3).await;

    let event = harness.wait_for_extracted(conversation_id, 1).await;
    assert!(
        event
            .payload
            .memories
            .iter()
            .any(|memory| memory.content.as_str().contains("tree nut allergy")),
        "the turns came from the payload file: {:?}",
        event.payload.memories
    );
    running.stop().await;
    harness.bus.cleanup().await;
}

#[tokio::test]
async fn a_card_number_in_a_transcript_never_reaches_the_extracted_event() {
    let harness = Harness::new().await;
    let (openai, anthropic) = (MockServer::start().await, MockServer::start().await);
    let organization = harness.organization("shop-private", "openai", None).await;
    sqlx::query("UPDATE organizations SET privacy_settings = $2 WHERE id = $1")
        .bind(organization)
        .bind(json!({"redact": ["email"]}))
        .execute(&harness.database.admin_pool)
        .await
        .unwrap();
    let rules_org = harness.organization("shop-rules", "rules", None).await;
    let caller = "+14155550142";
    harness
        .conversation(organization, "conv_card_llm", caller)
        .await;
    harness
        .conversation(rules_org, "conv_card_rules", caller)
        .await;
    // A model that repeats the card number anyway (as if it had seen it).
    let answer = json!({
        "memories": [{
            "content": "The caller wants card 4111 1111 1111 1111 kept on file; receipts to maya.chen@example.com.",
            "type": "preference",
            "importance": 6,
            "confidence": 0.9,
            "source_quote": "keep my card 4111-1111-1111-1111 on file"
        }],
        "resolved_issue_ids": []
    });
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body(&answer.to_string())))
        .mount(&openai)
        .await;
    let settings = ExtractorSettings {
        llm: llm_settings(&openai, &anthropic),
        ..ExtractorSettings::default()
    };
    let running = harness.start(settings, 3).await;
    let line = "Please keep my card 4111 1111 1111 1111 on file, my SSN is 123-45-6789, \
                and I prefer morning appointments.";
    harness
        .publish_transcript(organization, "conv_card_llm", caller, line)
        .await;
    harness
        .publish_transcript(rules_org, "conv_card_rules", caller, line)
        .await;

    for conversation in ["conv_card_llm", "conv_card_rules"] {
        let event = harness.wait_for_extracted(conversation, 1).await;
        let text = serde_json::to_string(&event.payload).unwrap();
        for secret in ["4111", "123-45-6789", "maya.chen@example.com"] {
            assert!(
                !text.contains(secret),
                "{conversation} leaked {secret}: {text}"
            );
        }
        if conversation == "conv_card_llm" {
            let memory = &event.payload.memories[0];
            assert_eq!(
                memory.content.as_str(),
                "The caller wants card [redacted card number] kept on file; receipts to [redacted email]."
            );
            assert_eq!(
                memory.source_quote.as_deref(),
                Some("keep my card [redacted card number] on file")
            );
        }
    }
    // The provider never saw the numbers either.
    let requests = openai.received_requests().await.unwrap();
    let sent = String::from_utf8_lossy(&requests[0].body).into_owned();
    assert!(
        !sent.contains("4111") && !sent.contains("123-45-6789"),
        "{sent}"
    );
    assert!(sent.contains("[redacted card number]"), "{sent}");
    running.stop().await;
    harness.bus.cleanup().await;
}
