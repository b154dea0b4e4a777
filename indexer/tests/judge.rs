//! The LLM deduplication judge, through the real indexer on the bus, with
//! the provider faked by wiremock: one call per extraction with all its
//! pairs, its verdicts applied, and the rules taking over when it fails.

mod common;

use std::time::Duration;

use elaaoms_extractor::LlmSettings;
use elaaoms_indexer::{apply::apply_extraction, DedupSettings, Verdicts};
use elaaoms_shared::bus::{event_msg_id, Envelope, Step};
use elaaoms_shared::config::{DatabaseConfig, WorkerConfig};
use elaaoms_shared::domain::{Confidence, ExtractedMemory, Importance, MemoryContent, MemoryType};
use elaaoms_shared::events::MemoriesExtracted;
use elaaoms_shared::test_support::{TestBus, TestDatabase};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::embedder;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const AGENT: &str = "agent_bakery";
const MAYA: &str = "+14155550123";
const EXISTING: &str = "Likes lemon sponge cake";
/// Another phrasing the rules cannot merge (below their 0.85 bar).
const REPHRASED: &str = "Is very fond of lemon cake";
const UNRELATED: &str = "Prefers to pay by card";

fn memory(content: &str) -> ExtractedMemory {
    ExtractedMemory {
        content: MemoryContent::new(content).unwrap(),
        memory_type: MemoryType::Preference,
        importance: Importance::new(5).unwrap(),
        confidence: Confidence::new(0.8).unwrap(),
        source_quote: None,
    }
}

struct World {
    db: TestDatabase,
    bus: TestBus,
    org: Uuid,
}

impl World {
    /// An organization that extracts with an OpenAI-compatible server at
    /// `llm_url`, and Maya with one stored preference.
    async fn create(llm_url: &str) -> Self {
        let db = TestDatabase::create().await;
        let bus = TestBus::create().await;
        let org = common::organization_with_caller(&db, &[AGENT], MAYA).await;
        sqlx::query(
            "UPDATE organizations SET llm_provider = 'openai-compatible', llm_base_url = $2, llm_model = 'judge-1'
              WHERE id = $1",
        )
        .bind(org)
        .bind(llm_url)
        .execute(&db.admin_pool)
        .await
        .unwrap();
        let world = Self { db, bus, org };
        world.conversation("conv_0").await;
        let first = world.event("conv_0", &[EXISTING]);
        let embeddings = embedder().embed(vec![EXISTING.to_owned()]).await.unwrap();
        apply_extraction(
            &world.db.pool,
            &first,
            &embeddings,
            embedder().model_name(),
            &DedupSettings::default(),
            &Verdicts::default(),
        )
        .await
        .unwrap();
        world
    }

    async fn conversation(&self, conversation_id: &str) {
        common::pending_conversation(&self.db, self.org, conversation_id, AGENT, MAYA).await;
    }

    fn event(&self, conversation_id: &str, contents: &[&str]) -> Envelope<MemoriesExtracted> {
        Envelope::new(
            self.org,
            1,
            MemoriesExtracted {
                conversation_id: conversation_id.to_owned(),
                agent_id: AGENT.to_owned(),
                caller_id: MAYA.to_owned(),
                memories: contents.iter().map(|content| memory(content)).collect(),
                resolved_issue_ids: Vec::new(),
                extractor: "openai-compatible".to_owned(),
            },
        )
    }

    /// Runs the indexer until the conversation's extraction is applied.
    async fn index(&self, conversation_id: &str, contents: &[&str]) {
        self.conversation(conversation_id).await;
        let indexer = elaaoms_indexer::IndexerService::build(
            elaaoms_indexer::Config {
                database: DatabaseConfig {
                    database_url: self.db.service_url.clone(),
                    database_max_connections: 4,
                },
                bus: self.bus.config.clone(),
                worker: WorkerConfig {
                    worker_concurrency: 2,
                    worker_per_organization_concurrency: 2,
                    worker_max_attempts: 3,
                    worker_retry_delays: vec![Duration::from_millis(200)],
                    worker_ack_wait: Duration::from_secs(30),
                },
                settings: elaaoms_indexer::IndexerSettings {
                    health_addr: "127.0.0.1:0".parse().unwrap(),
                    dedup_similarity: 0.85,
                    dedup_candidate_similarity: 0.6,
                    dedup_conflict_similarity: 0.7,
                },
                llm: LlmSettings {
                    max_retries: 1,
                    retry_min_delay: Duration::from_millis(10),
                    retry_max_delay: Duration::from_millis(20),
                    request_timeout: Duration::from_secs(5),
                    ..LlmSettings::default()
                },
            },
            embedder().clone(),
        )
        .await
        .expect("build the indexer");
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { indexer.run(shutdown).await.expect("the indexer runs") }
        });
        let event = self.event(conversation_id, contents);
        self.bus
            .bus
            .publish(
                &self.bus.bus.names.subject(Step::Extracted),
                &event_msg_id(self.org, conversation_id, Step::Extracted, 1),
                self.org,
                event.encode().unwrap().into(),
            )
            .await
            .unwrap();
        let mut completed = false;
        for _ in 0..300 {
            let status: String = sqlx::query_scalar(
                "SELECT status FROM conversations WHERE organization_id = $1 AND conversation_id = $2",
            )
            .bind(self.org)
            .bind(conversation_id)
            .fetch_one(&self.db.admin_pool)
            .await
            .unwrap();
            if status == "extraction_completed" {
                completed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.cancel();
        run.await.unwrap();
        assert!(
            completed,
            "the indexer did not apply {conversation_id} in 30 s"
        );
    }

    /// (content, reinforcement_count), oldest first.
    async fn memories(&self) -> Vec<(String, i32)> {
        sqlx::query_as(
            "SELECT content, reinforcement_count FROM memories WHERE organization_id = $1 ORDER BY created_at, content",
        )
        .bind(self.org)
        .fetch_all(&self.db.admin_pool)
        .await
        .unwrap()
    }
}

/// An OpenAI chat completion whose structured output is `verdicts`.
fn completion(verdicts: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "model": "judge-1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": json!({"verdicts": verdicts}).to_string()},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 180, "completion_tokens": 20, "total_tokens": 200}
    }))
}

#[tokio::test]
async fn one_judge_call_per_extraction_and_its_verdict_merges_what_the_rules_would_not() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(completion(json!([{"pair": 0, "verdict": "duplicate"}])))
        .mount(&llm)
        .await;
    let world = World::create(&format!("{}/v1", llm.uri())).await;

    world.index("conv_1", &[REPHRASED, UNRELATED]).await;

    let requests = llm.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "one call for the whole extraction");
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(body["model"], "judge-1");
    assert_eq!(
        body["response_format"]["json_schema"]["name"],
        "record_verdicts"
    );
    let pairs: Value =
        serde_json::from_str(body["messages"][1]["content"].as_str().unwrap()).unwrap();
    let pair0 = &pairs["pairs"][0];
    assert_eq!(
        (pair0["earlier"].as_str(), pair0["newer"].as_str()),
        (Some(EXISTING), Some(REPHRASED)),
        "{pairs}"
    );
    assert!(
        !pairs.to_string().contains(UNRELATED),
        "a memory without candidates is not sent: {pairs}"
    );

    assert_eq!(
        world.memories().await,
        vec![(EXISTING.to_owned(), 1), (UNRELATED.to_owned(), 0)],
        "the judge's duplicate reinforced the stored memory"
    );
}

#[tokio::test]
async fn a_failing_judge_leaves_deduplication_to_the_rules() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream error"))
        .mount(&llm)
        .await;
    let world = World::create(&format!("{}/v1", llm.uri())).await;

    world.index("conv_1", &[REPHRASED]).await;

    assert_eq!(
        llm.received_requests().await.unwrap().len(),
        2,
        "the call and its one retry"
    );
    assert_eq!(
        world.memories().await,
        vec![(EXISTING.to_owned(), 0), (REPHRASED.to_owned(), 0)],
        "the rules keep the pair apart below their bar; the extraction is still applied"
    );
}
