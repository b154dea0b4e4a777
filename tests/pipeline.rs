//! End to end: the four services on port 0 against the real NATS and
//! Postgres; signed ElevenLabs fixtures go in at the webhook and come out as
//! searchable memories.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use elaaoms_shared::api_keys::{display_prefix, generate_api_key, hash_api_key};
use elaaoms_shared::config::{DatabaseConfig, PayloadStoreConfig, WorkerConfig};
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::test_support::{TestBus, TestDatabase};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SLUG: &str = "fixture-org-a";
const SECRET: &str = "whsec_fixture_0123456789abcdef0123456789abcdef";
const MAYA: &str = "+14155550123";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/elevenlabs/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct RunningSystem {
    ingest_url: String,
    query_url: String,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _payloads: tempfile::TempDir,
}

impl RunningSystem {
    async fn start(database: &TestDatabase, bus: &TestBus) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let payloads = tempfile::tempdir().unwrap();
        let database_config = DatabaseConfig {
            database_url: database.service_url.clone(),
            database_max_connections: 5,
        };
        let worker = WorkerConfig {
            worker_concurrency: 4,
            worker_per_organization_concurrency: 2,
            worker_max_attempts: 3,
            worker_retry_delays: vec![Duration::from_millis(200)],
            worker_ack_wait: Duration::from_secs(30),
        };
        let payload_config = PayloadStoreConfig {
            payload_dir: payloads.path().to_owned(),
            payload_store_url: None,
        };
        let embedder = Embedder::local(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/models/all-MiniLM-L6-v2"
        )))
        .expect("model files: run deploy/local/setup.sh");

        let ingest = elaaoms_ingest::IngestService::build(elaaoms_ingest::Config {
            database: database_config.clone(),
            bus: bus.config.clone(),
            payloads: payload_config.clone(),
            settings: elaaoms_ingest::IngestSettings {
                addr: any_port(),
                signature_tolerance: Duration::from_secs(1800),
                max_body_bytes: 64 << 20,
                outbox_relay_interval: Duration::from_secs(1),
                ..elaaoms_ingest::IngestSettings::default()
            },
        })
        .await
        .expect("ingest starts");
        let extractor = elaaoms_extractor::ExtractorService::build(elaaoms_extractor::Config {
            database: database_config.clone(),
            bus: bus.config.clone(),
            worker: worker.clone(),
            payloads: payload_config.clone(),
            settings: elaaoms_extractor::ExtractorSettings {
                health_addr: any_port(),
                ..Default::default()
            },
        })
        .await
        .expect("extractor starts");
        let indexer = elaaoms_indexer::IndexerService::build(
            elaaoms_indexer::Config {
                database: database_config.clone(),
                bus: bus.config.clone(),
                worker,
                settings: elaaoms_indexer::IndexerSettings {
                    health_addr: any_port(),
                    dedup_similarity: 0.85,
                    dedup_candidate_similarity: 0.6,
                    dedup_conflict_similarity: 0.7,
                },
                llm: Default::default(),
            },
            embedder.clone(),
        )
        .await
        .expect("indexer starts");
        let query = elaaoms_query::QueryService::build(
            elaaoms_query::Config {
                database: database_config,
                bus: bus.config.clone(),
                payloads: payload_config.clone(),
                embedding: elaaoms_shared::config::EmbeddingConfig {
                    embedding_model_dir: std::path::PathBuf::from(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/data/models/all-MiniLM-L6-v2"
                    )),
                },
                settings: elaaoms_query::QuerySettings {
                    addr: any_port(),
                    init_deadline: Duration::from_millis(300),
                    caller_token_ttl: Duration::from_secs(3600),
                    embedding_cache_entries: 1000,
                    api_key_cache_ttl: Duration::from_secs(10),
                },
            },
            embedder,
        )
        .await
        .expect("query starts");

        let ingest_url = format!("http://{}", ingest.local_addr());
        let query_url = format!("http://{}", query.local_addr());
        let shutdown = CancellationToken::new();
        let tasks = vec![
            tokio::spawn({
                let token = shutdown.clone();
                async move { ingest.run(token).await.expect("ingest runs") }
            }),
            tokio::spawn({
                let token = shutdown.clone();
                async move { extractor.run(token).await.expect("extractor runs") }
            }),
            tokio::spawn({
                let token = shutdown.clone();
                async move { indexer.run(token).await.expect("indexer runs") }
            }),
            tokio::spawn({
                let token = shutdown.clone();
                async move { query.run(token).await.expect("query runs") }
            }),
        ];
        Self {
            ingest_url,
            query_url,
            shutdown,
            tasks,
            _payloads: payloads,
        }
    }

    async fn post_webhook(&self, body: Vec<u8>, signature: String) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/webhooks/elevenlabs/{SLUG}", self.ingest_url))
            .header("content-type", "application/json")
            .header("elevenlabs-signature", signature)
            .body(body)
            .send()
            .await
            .expect("ingest answers")
    }

    async fn post_fixture(&self, name: &str) -> reqwest::Response {
        let body = fixture(name);
        let signature =
            elaaoms_ingest::signature::sign(SECRET, chrono::Utc::now().timestamp(), &body);
        self.post_webhook(body, signature).await
    }

    async fn search(
        &self,
        api_key: &str,
        caller_id: &str,
        query_text: &str,
    ) -> Vec<serde_json::Value> {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/search", self.query_url))
            .bearer_auth(api_key)
            .json(&serde_json::json!({
                "query_text": query_text,
                "caller_id": caller_id,
                "search_all_agents": true,
                "relevance_threshold": 0.3,
                "result_limit": 5,
            }))
            .send()
            .await
            .expect("query answers");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        body["results"].as_array().cloned().unwrap_or_default()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("services stop within 30 s")
                .expect("service task ends cleanly");
        }
    }
}

async fn create_api_key(database: &TestDatabase, organization_id: Uuid) -> String {
    let key = generate_api_key();
    sqlx::query("INSERT INTO api_keys (organization_id, name, key_hash, key_prefix) VALUES ($1, 'test', $2, $3)")
        .bind(organization_id)
        .bind(hash_api_key(&key))
        .bind(display_prefix(&key))
        .execute(&database.admin_pool)
        .await
        .unwrap();
    key
}

async fn conversation_status(database: &TestDatabase, conversation_id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM conversations WHERE conversation_id = $1")
        .bind(conversation_id)
        .fetch_optional(&database.admin_pool)
        .await
        .unwrap()
}

/// Polls until `check` returns Some, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_become_searchable_memories() {
    let database = TestDatabase::create().await;
    let bus = TestBus::create().await;
    let organization_id = database.create_organization(SLUG, SECRET).await;
    let api_key = create_api_key(&database, organization_id).await;
    let system = RunningSystem::start(&database, &bus).await;

    for name in [
        "post_call_transcription_bakery_maya_2025-11-03.json",
        "post_call_transcription_dental_priya_2025-11-12.json",
        "post_call_transcription_telecom_tom_2025-11-18.json",
    ] {
        let response = system.post_fixture(name).await;
        assert_eq!(
            response.status(),
            200,
            "{name}: {}",
            response.text().await.unwrap()
        );
    }

    // The fact Maya stated becomes searchable...
    let results = eventually(Duration::from_secs(90), || async {
        let results = system
            .search(&api_key, MAYA, "Does her daughter have a nut allergy?")
            .await;
        (!results.is_empty()).then_some(results)
    })
    .await;
    let top = results[0]["content"].as_str().unwrap().to_lowercase();
    assert!(top.contains("nut allergy"), "top result: {top}");
    assert!(results[0]["importance"].as_i64().unwrap() >= 9);
    // ...and the conversations end extraction_completed.
    for conversation in [
        "conv_wxgkkg26wh6wcecpnv68bert84",
        "conv_gvs3ebxbsrwhj3s2ppxn9kyhzt",
        "conv_2hj035qepxnq1qxy8m5kd0nwvy",
    ] {
        let status = eventually(Duration::from_secs(60), || async {
            conversation_status(&database, conversation)
                .await
                .filter(|status| status == "extraction_completed")
        })
        .await;
        assert_eq!(status, "extraction_completed");
    }
    let priya = system
        .search(
            &api_key,
            "+16465550187",
            "Is she allergic to any antibiotics?",
        )
        .await;
    assert!(
        priya[0]["content"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("penicillin"),
        "{priya:?}"
    );
    // Another caller's memories never answer for Maya.
    let maya_internet = system
        .search(&api_key, MAYA, "internet connection keeps dropping")
        .await;
    assert!(maya_internet
        .iter()
        .all(|m| !m["content"].as_str().unwrap().contains("internet")));

    // The raw payload is in the payload store.
    let stored = system
        ._payloads
        .path()
        .join("conv_wxgkkg26wh6wcecpnv68bert84/conv_wxgkkg26wh6wcecpnv68bert84_transcription.json");
    assert_eq!(
        std::fs::read(stored).unwrap(),
        fixture("post_call_transcription_bakery_maya_2025-11-03.json")
    );

    system.stop().await;
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_webhook_changes_nothing_and_bad_signatures_are_refused() {
    let database = TestDatabase::create().await;
    let bus = TestBus::create().await;
    let organization_id = database.create_organization(SLUG, SECRET).await;
    let api_key = create_api_key(&database, organization_id).await;
    let system = RunningSystem::start(&database, &bus).await;

    let name = "post_call_transcription_bakery_maya_2025-11-03.json";
    assert_eq!(system.post_fixture(name).await.status(), 200);
    eventually(Duration::from_secs(90), || async {
        conversation_status(&database, "conv_wxgkkg26wh6wcecpnv68bert84")
            .await
            .filter(|status| status == "extraction_completed")
    })
    .await;
    let count_memories = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM memories")
            .fetch_one(&database.admin_pool)
            .await
            .unwrap()
    };
    let memories_before = count_memories().await;
    assert!(
        memories_before >= 5,
        "the rules extractor finds Maya's facts: {memories_before}"
    );

    // ElevenLabs retries the same webhook (same body, new signature time).
    assert_eq!(system.post_fixture(name).await.status(), 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count_memories().await, memories_before);
    let (conversations, outbox_rows): (i32, i64) = sqlx::query_as(
        "SELECT (SELECT total_conversations FROM callers WHERE caller_id = $1), (SELECT count(*) FROM outbox)",
    )
    .bind(MAYA)
    .fetch_one(&database.admin_pool)
    .await
    .unwrap();
    assert_eq!((conversations, outbox_rows), (1, 1));

    // Signatures: wrong secret, stale timestamp, unknown organization.
    let body = fixture(name);
    let now = chrono::Utc::now().timestamp();
    let wrong_secret =
        elaaoms_ingest::signature::sign("whsec_wrong_0123456789abcdef0123456789abcdef", now, &body);
    assert_eq!(
        system
            .post_webhook(body.clone(), wrong_secret)
            .await
            .status(),
        401
    );
    let stale = elaaoms_ingest::signature::sign(SECRET, now - 31 * 60, &body);
    assert_eq!(system.post_webhook(body.clone(), stale).await.status(), 401);
    let unknown_org = reqwest::Client::new()
        .post(format!(
            "{}/v1/webhooks/elevenlabs/no-such-org",
            system.ingest_url
        ))
        .header(
            "elevenlabs-signature",
            elaaoms_ingest::signature::sign(SECRET, now, &body),
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_org.status(), 401);
    let unknown_body: serde_json::Value = unknown_org.json().await.unwrap();
    assert_eq!(unknown_body["error"]["message"], "signature does not match");
    assert!(!system.search(&api_key, MAYA, "allergy").await.is_empty());

    system.stop().await;
    bus.cleanup().await;
}

/// Every event of the pipeline's stream whose conversation is
/// `conversation_id`: (step subject, `traceparent` header).
async fn events_of(bus: &TestBus, conversation_id: &str) -> Vec<(String, Option<String>)> {
    use elaaoms_shared::bus::{Envelope, Step};
    use elaaoms_shared::events::{ConversationTranscribed, MemoriesExtracted, MemoriesIndexed};

    let names = &bus.bus.names;
    let mut stream = bus
        .bus
        .jetstream
        .get_stream(names.event_stream())
        .await
        .unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut events = Vec::new();
    for sequence in 1..=last {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let subject = message.subject.to_string();
        let payload = &message.payload;
        let conversation = if subject == names.subject(Step::Transcribed) {
            Envelope::<ConversationTranscribed>::decode(payload)
                .unwrap()
                .payload
                .conversation_id
        } else if subject == names.subject(Step::Extracted) {
            Envelope::<MemoriesExtracted>::decode(payload)
                .unwrap()
                .payload
                .conversation_id
        } else if subject == names.subject(Step::Indexed) {
            Envelope::<MemoriesIndexed>::decode(payload)
                .unwrap()
                .payload
                .conversation_id
        } else {
            continue;
        };
        if conversation == conversation_id {
            let traceparent = message
                .headers
                .get(elaaoms_shared::trace::TRACEPARENT_HEADER)
                .map(|value| value.as_str().to_owned());
            events.push((subject, traceparent));
        }
    }
    events
}

/// The trace id of every step's event, once the indexed one is out.
async fn trace_ids_of(bus: &TestBus, conversation_id: &str) -> Vec<String> {
    use elaaoms_shared::trace::TraceParent;

    let events = eventually(Duration::from_secs(90), || async {
        let events = events_of(bus, conversation_id).await;
        (events.len() == 3).then_some(events)
    })
    .await;
    let subjects: Vec<&str> = events.iter().map(|(subject, _)| subject.as_str()).collect();
    let names = &bus.bus.names;
    use elaaoms_shared::bus::Step;
    assert_eq!(
        subjects,
        [
            names.subject(Step::Transcribed),
            names.subject(Step::Extracted),
            names.subject(Step::Indexed)
        ]
    );
    let parsed: Vec<TraceParent> = events
        .iter()
        .map(|(subject, header)| {
            let header = header
                .as_deref()
                .unwrap_or_else(|| panic!("{subject} has no traceparent"));
            TraceParent::parse(header).unwrap_or_else(|| panic!("{subject}: bad {header}"))
        })
        .collect();
    // Each step publishes its own span of the trace.
    let spans: std::collections::HashSet<String> =
        parsed.iter().map(TraceParent::span_id).collect();
    assert_eq!(spans.len(), 3, "one span per step: {events:?}");
    parsed.iter().map(TraceParent::trace_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_webhook_is_one_trace_through_the_pipeline() {
    let database = TestDatabase::create().await;
    let bus = TestBus::create().await;
    database.create_organization(SLUG, SECRET).await;
    let system = RunningSystem::start(&database, &bus).await;

    // A sender's trace is continued...
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = fixture("post_call_transcription_bakery_maya_2025-11-03.json");
    let signature = elaaoms_ingest::signature::sign(SECRET, chrono::Utc::now().timestamp(), &body);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/webhooks/elevenlabs/{SLUG}",
            system.ingest_url
        ))
        .header("content-type", "application/json")
        .header("elevenlabs-signature", signature)
        .header(
            "traceparent",
            format!("00-{incoming_trace}-00f067aa0ba902b7-01"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // ...and a webhook without one (or with a malformed one) starts its own.
    let body = fixture("post_call_transcription_dental_priya_2025-11-12.json");
    let signature = elaaoms_ingest::signature::sign(SECRET, chrono::Utc::now().timestamp(), &body);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/webhooks/elevenlabs/{SLUG}",
            system.ingest_url
        ))
        .header("content-type", "application/json")
        .header("elevenlabs-signature", signature)
        .header("traceparent", "00-not-a-valid-trace-01")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let maya = trace_ids_of(&bus, "conv_wxgkkg26wh6wcecpnv68bert84").await;
    assert_eq!(maya, vec![incoming_trace; 3]);
    let priya = trace_ids_of(&bus, "conv_gvs3ebxbsrwhj3s2ppxn9kyhzt").await;
    assert_eq!(priya, vec![priya[0].clone(); 3], "one trace: {priya:?}");
    assert_ne!(priya[0], incoming_trace);

    // The outbox row keeps the trace the relay would publish with.
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT traceparent FROM outbox WHERE split_part(msg_id, ':', 2) = 'conv_wxgkkg26wh6wcecpnv68bert84'",
    )
    .fetch_one(&database.admin_pool)
    .await
    .unwrap();
    assert!(
        stored.is_some_and(|header| header.contains(incoming_trace)),
        "outbox row's traceparent"
    );

    system.stop().await;
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_caller_stays_erased_but_a_new_call_starts_afresh() {
    let database = TestDatabase::create().await;
    let bus = TestBus::create().await;
    let organization_id = database.create_organization(SLUG, SECRET).await;
    let api_key = create_api_key(&database, organization_id).await;
    let system = RunningSystem::start(&database, &bus).await;
    let first_call = "post_call_transcription_bakery_maya_2025-11-03.json";
    let maya_memories = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM memories WHERE caller_id = $1")
            .bind(MAYA)
            .fetch_one(&database.admin_pool)
            .await
            .unwrap()
    };

    assert_eq!(system.post_fixture(first_call).await.status(), 200);
    eventually(Duration::from_secs(90), || async {
        conversation_status(&database, "conv_wxgkkg26wh6wcecpnv68bert84")
            .await
            .filter(|status| status == "extraction_completed")
    })
    .await;
    assert!(maya_memories().await > 0);

    let erased = reqwest::Client::new()
        .delete(format!("{}/v1/callers/{MAYA}", system.query_url))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);
    assert_eq!(maya_memories().await, 0);

    // ElevenLabs delivers the old call again: nothing of it comes back.
    let late = system.post_fixture(first_call).await;
    assert_eq!(late.status(), 200);
    let late: serde_json::Value = late.json().await.unwrap();
    assert_eq!(late["extraction"], "caller_erased");
    assert_eq!(
        conversation_status(&database, "conv_wxgkkg26wh6wcecpnv68bert84").await,
        None
    );

    // Maya calls again after the erasure: a new call is remembered.
    let mut body: serde_json::Value = serde_json::from_slice(&fixture(
        "post_call_transcription_bakery_maya_2025-11-20.json",
    ))
    .unwrap();
    body["data"]["metadata"]["start_time_unix_secs"] = (chrono::Utc::now().timestamp() + 1).into();
    let body = serde_json::to_vec(&body).unwrap();
    let signature = elaaoms_ingest::signature::sign(SECRET, chrono::Utc::now().timestamp(), &body);
    assert_eq!(system.post_webhook(body, signature).await.status(), 200);
    eventually(Duration::from_secs(90), || async {
        conversation_status(&database, "conv_9qgrnn8wf286kk516ewwhhsb3k")
            .await
            .filter(|status| status == "extraction_completed")
    })
    .await;
    assert!(
        maya_memories().await > 0,
        "the new call's memories are kept"
    );
    let old_conversation_memories: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM memories WHERE conversation_id = 'conv_wxgkkg26wh6wcecpnv68bert84'",
    )
    .fetch_one(&database.admin_pool)
    .await
    .unwrap();
    assert_eq!(old_conversation_memories, 0);

    system.stop().await;
    bus.cleanup().await;
}
