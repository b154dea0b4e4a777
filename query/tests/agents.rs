//! The pre-call context, the ElevenLabs agent endpoints, memory management
//! and caller erasure, against the real Postgres (a database per test), the
//! real NATS (streams per test) and the real embedder, over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use elaaoms_query::{
    hash_agent_secret, Config, ContextTokenizer, QueryService, QuerySettings, AGENT_SECRET_HEADER,
    CALLER_TOKEN_HEADER, CONTEXT_MAX_TOKENS, DOCUMENTED_VARIABLES,
};
use elaaoms_shared::api_keys::{display_prefix, generate_api_key, hash_api_key};
use elaaoms_shared::bus::{event_msg_id, Envelope, Step};
use elaaoms_shared::config::{DatabaseConfig, EmbeddingConfig, PayloadStoreConfig, WorkerConfig};
use elaaoms_shared::db::{begin_org_tx, caller_hash};
use elaaoms_shared::domain::{Confidence, ExtractedMemory, Importance, MemoryContent, MemoryType};
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::events::MemoriesExtracted;
use elaaoms_shared::test_support::{TestBus, TestDatabase};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const MODEL_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/models/all-MiniLM-L6-v2"
);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/elevenlabs");
const MAYA: &str = "+14155550123";
const PRIYA: &str = "+16465550187";
const BAKERY: &str = "agent_2d3fz2b14925mr76yab082z7fj";
const DENTAL: &str = "agent_ebp8s57vvhem7rqyv5akwpgpf0";

struct Harness {
    db: TestDatabase,
    bus: TestBus,
    embedder: Embedder,
    payloads: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), elaaoms_query::QueryError>>,
}

struct Org {
    id: Uuid,
    slug: String,
    key: String,
    secret: String,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with_deadline(Duration::from_millis(300)).await
    }

    async fn start_with_deadline(init_deadline: Duration) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let db = TestDatabase::create().await;
        let bus = TestBus::create().await;
        let payloads = tempfile::tempdir().unwrap();
        let embedder = tokio::task::spawn_blocking(|| Embedder::local(MODEL_DIR.as_ref()))
            .await
            .unwrap()
            .expect("load the embedding model (deploy/local/setup.sh installs it)");
        let config = Config {
            database: DatabaseConfig {
                database_url: db.service_url.clone(),
                database_max_connections: 4,
            },
            bus: bus.config.clone(),
            payloads: PayloadStoreConfig {
                payload_dir: payloads.path().to_owned(),
                payload_store_url: None,
            },
            embedding: EmbeddingConfig {
                embedding_model_dir: MODEL_DIR.into(),
            },
            settings: QuerySettings {
                addr: "127.0.0.1:0".parse().unwrap(),
                init_deadline,
                caller_token_ttl: Duration::from_secs(3600),
                embedding_cache_entries: 100,
                api_key_cache_ttl: Duration::from_secs(10),
            },
        };
        let service = QueryService::build(config, embedder.clone())
            .await
            .expect("build the query service");
        let addr: SocketAddr = service.local_addr();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(service.run(shutdown.clone()));
        Self {
            db,
            bus,
            embedder,
            payloads,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            shutdown,
            server,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("the service stops after cancellation")
            .unwrap()
            .expect("the service stops cleanly");
        self.bus.cleanup().await;
    }

    /// An organization with an API key, an agent secret and placeholder
    /// defaults.
    async fn organization(&self, slug: &str) -> Org {
        let id = self
            .db
            .create_organization(slug, "a-webhook-secret-of-at-least-32-bytes!!")
            .await;
        let key = generate_api_key();
        sqlx::query("INSERT INTO api_keys (organization_id, name, key_hash, key_prefix) VALUES ($1, 'test', $2, $3)")
            .bind(id)
            .bind(hash_api_key(&key))
            .bind(display_prefix(&key))
            .execute(&self.db.admin_pool)
            .await
            .unwrap();
        let secret = elaaoms_query::generate_agent_secret();
        sqlx::query(
            "UPDATE organizations SET agent_secret_hash = $2,
                    dynamic_variable_defaults = '{\"business_name\": \"Crumb & Hearth\", \"loyalty_points\": 0}'
              WHERE id = $1",
        )
        .bind(id)
        .bind(hash_agent_secret(&secret))
        .execute(&self.db.admin_pool)
        .await
        .unwrap();
        Org {
            id,
            slug: slug.to_owned(),
            key,
            secret,
        }
    }

    /// A caller with a conversation (as ingest creates them).
    async fn conversation(&self, org: &Org, caller: &str, agent: &str, conversation: &str) {
        let mut tx = begin_org_tx(&self.db.pool, org.id).await.unwrap();
        sqlx::query(
            "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
             VALUES ($1, $2, '2025-11-03T10:00:00Z', '2025-11-20T10:00:00Z', 2) ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(caller)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO agents (organization_id, agent_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(agent)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
             VALUES ($1, $2, $3, $4, '2025-11-03T10:00:00Z', 'completed') ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(conversation)
        .bind(agent)
        .bind(caller)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    /// A memory (with a source row), `age_secs` old.
    #[allow(clippy::too_many_arguments)]
    async fn memory(
        &self,
        org: &Org,
        caller: &str,
        agent: &str,
        conversation: &str,
        content: &str,
        memory_type: &str,
        importance: i16,
        age_secs: f64,
    ) -> Uuid {
        self.conversation(org, caller, agent, conversation).await;
        let embedding = self.embedder.embed_one(content).await.unwrap();
        let mut tx = begin_org_tx(&self.db.pool, org.id).await.unwrap();
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type,
                                   importance, confidence, status, embedding, embedding_model, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0.9, $8, $9, 'all-MiniLM-L6-v2',
                     now() - make_interval(secs => $10))
             RETURNING id",
        )
        .bind(org.id)
        .bind(caller)
        .bind(agent)
        .bind(conversation)
        .bind(content)
        .bind(memory_type)
        .bind(importance)
        .bind((memory_type == "issue").then_some("open"))
        .bind(pgvector::Vector::from(embedding))
        .bind(age_secs)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind)
             VALUES ($1, $2, $3, 1, 'created')",
        )
        .bind(org.id)
        .bind(id)
        .bind(conversation)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        id
    }

    async fn get(&self, key: &str, path: &str) -> (u16, Value) {
        respond(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(key),
        )
        .await
    }

    async fn delete(&self, key: &str, path: &str) -> (u16, Value) {
        respond(
            self.http
                .delete(format!("{}{path}", self.base))
                .bearer_auth(key),
        )
        .await
    }

    async fn init(&self, slug: &str, secret: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!(
                "{}/v1/elevenlabs/conversation-init/{slug}",
                self.base
            ))
            .json(body);
        if let Some(secret) = secret {
            request = request.header(AGENT_SECRET_HEADER, secret);
        }
        respond(request).await
    }

    async fn tool(&self, org: &Org, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!(
                "{}/v1/elevenlabs/tools/search/{}",
                self.base, org.slug
            ))
            .header(AGENT_SECRET_HEADER, &org.secret)
            .json(body);
        if let Some(token) = token {
            request = request.header(CALLER_TOKEN_HEADER, token);
        }
        respond(request).await
    }

    async fn admin_count(&self, sql: &str, org: Uuid) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .bind(org)
            .fetch_one(&self.db.admin_pool)
            .await
            .unwrap()
    }
}

async fn respond(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request reaches the service");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {status}: not JSON: {text}"));
    (status, body)
}

fn path_caller(caller: &str) -> String {
    caller.replace('+', "%2B")
}

fn contents(items: &Value) -> Vec<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {items}"))
        .iter()
        .map(|item| item["content"].as_str().unwrap().to_owned())
        .collect()
}

fn fixture_init_request() -> Value {
    let text = std::fs::read_to_string(format!(
        "{FIXTURES}/conversation_initiation_request_maya.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Asserts the initiation answer's shape: every documented variable present
/// with a scalar of the documented type, and only scalars anywhere.
fn assert_init_shape(body: &Value) -> &serde_json::Map<String, Value> {
    assert_eq!(
        body["type"], "conversation_initiation_client_data",
        "{body}"
    );
    let variables = body["dynamic_variables"]
        .as_object()
        .expect("dynamic_variables object");
    for (name, doc) in DOCUMENTED_VARIABLES {
        let value = variables
            .get(*name)
            .unwrap_or_else(|| panic!("{name} missing: {body}"));
        let ok = if doc.starts_with("boolean") {
            value.is_boolean()
        } else if doc.starts_with("number") {
            value.is_number()
        } else {
            value.is_string()
        };
        assert!(ok, "{name} has the wrong type: {value}");
    }
    for (name, value) in variables {
        assert!(
            value.is_string() || value.is_number() || value.is_boolean(),
            "{name}: {value}"
        );
    }
    variables
}

// ---------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------

#[tokio::test]
async fn context_puts_open_issues_first_then_recent_visible_memories() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let other = h.organization("org-b").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Caller's name is Maya Okafor",
        "factual",
        6,
        300.0,
    )
    .await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Croissants were burnt on the bottom",
        "issue",
        5,
        200.0,
    )
    .await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Prefers lemon sponge with raspberry filling",
        "preference",
        6,
        100.0,
    )
    .await;
    // Another agent: a shareable memory (importance 9) and a private one.
    h.memory(
        &org,
        MAYA,
        DENTAL,
        "conv_dental_1",
        "Allergic to latex; use nitrile gloves",
        "factual",
        9,
        50.0,
    )
    .await;
    h.memory(
        &org,
        MAYA,
        DENTAL,
        "conv_dental_1",
        "Prefers 8 am appointments",
        "preference",
        5,
        10.0,
    )
    .await;
    // Twelve more bakery memories: only the ten newest non-issue ones come back.
    for n in 0..12 {
        h.memory(
            &org,
            MAYA,
            BAKERY,
            "conv_bakery_2",
            &format!("Ordered cake number {n}"),
            "factual",
            3,
            400.0 + f64::from(n),
        )
        .await;
    }

    let (status, body) = h
        .get(
            &org.key,
            &format!(
                "/v1/callers/{}/context?agent_id={BAKERY}",
                path_caller(MAYA)
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["caller_is_returning"], true);
    assert_eq!(body["caller_name"], "Maya Okafor");
    assert_eq!(body["summary"]["total_conversations"], 2);
    assert_eq!(body["summary"]["first_seen_at"], "2025-11-03T10:00:00Z");
    assert_eq!(
        contents(&body["open_issues"]),
        ["Croissants were burnt on the bottom"]
    );
    let recent = contents(&body["memories"]);
    assert_eq!(recent.len(), 10, "{recent:?}");
    assert_eq!(
        recent[0], "Allergic to latex; use nitrile gloves",
        "newest visible first"
    );
    assert_eq!(recent[1], "Prefers lemon sponge with raspberry filling");
    assert!(
        !recent.iter().any(|m| m.contains("8 am")),
        "the dental agent's private memory: {recent:?}"
    );
    let text = body["context_text"].as_str().unwrap();
    let issue_at = text.find("Croissants").expect("issue in text");
    let lemon_at = text.find("lemon sponge").expect("memory in text");
    assert!(issue_at < lemon_at, "{text}");
    assert!(
        text.starts_with("Returning caller Maya Okafor: 2 earlier conversations"),
        "{text}"
    );
    let tokenizer = ContextTokenizer::load(MODEL_DIR.as_ref()).unwrap();
    assert_eq!(
        body["context_tokens"].as_u64().unwrap() as usize,
        tokenizer.count(text)
    );

    // Without an agent: everything, including the dental agent's private memory.
    let (_, all) = h
        .get(
            &org.key,
            &format!("/v1/callers/{}/context", path_caller(MAYA)),
        )
        .await;
    assert!(contents(&all["memories"]).contains(&"Prefers 8 am appointments".to_owned()));

    // The same number in another organization is a stranger there.
    let (status, foreign) = h
        .get(
            &other.key,
            &format!("/v1/callers/{}/context", path_caller(MAYA)),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(foreign["caller_is_returning"], false);
    assert_eq!(foreign["memories"], json!([]));
    assert_eq!(foreign["context_text"], "");
    h.stop().await;
}

#[tokio::test]
async fn context_text_stays_within_the_token_budget_with_whole_lines() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    // Ten long memories (~400 tokens each) cannot all fit in 2,000 tokens.
    for n in 0..10 {
        let content = format!(
            "Detail {n}: {}",
            "the caller described the cake decorations at great length ".repeat(45)
        );
        h.memory(
            &org,
            MAYA,
            BAKERY,
            "conv_long",
            &content,
            "factual",
            5,
            f64::from(n),
        )
        .await;
    }
    let (status, body) = h
        .get(
            &org.key,
            &format!("/v1/callers/{}/context", path_caller(MAYA)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["context_text"].as_str().unwrap();
    let tokenizer = ContextTokenizer::load(MODEL_DIR.as_ref()).unwrap();
    let tokens = tokenizer.count(text);
    assert!(tokens <= CONTEXT_MAX_TOKENS, "{tokens}");
    assert!(
        tokens > CONTEXT_MAX_TOKENS / 2,
        "the budget is used: {tokens}"
    );
    let included = text
        .lines()
        .filter(|line| line.starts_with("- Detail"))
        .count();
    assert!((1..10).contains(&included), "{included} lines");
    for line in text.lines().filter(|line| line.starts_with("- Detail")) {
        assert!(line.ends_with(')'), "lines are whole: {line}");
    }
    assert_eq!(
        body["memories"].as_array().unwrap().len(),
        10,
        "the structured list is complete"
    );
    h.stop().await;
}

#[tokio::test]
async fn context_for_an_unknown_caller_is_empty_and_validation_is_named() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let (status, body) = h.get(&org.key, "/v1/callers/%2B15550000000/context").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["caller_is_returning"], false);
    assert_eq!(body["summary"], Value::Null);
    assert_eq!(body["context_text"], "");
    assert_eq!(body["context_tokens"], 0);

    let (status, body) = h.get(&org.key, "/v1/callers/%2B1/context?agent=x").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("agent: "),
        "{body}"
    );
    let (status, _) = h
        .get(&org.key, "/v1/callers/%2B1/context?agent_id=%20")
        .await;
    assert_eq!(status, 422);
    let (status, _) = respond(h.http.get(format!("{}/v1/callers/%2B1/context", h.base))).await;
    assert_eq!(status, 401);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Conversation-initiation webhook
// ---------------------------------------------------------------------------

#[tokio::test]
async fn init_webhook_answers_the_fixture_with_context_and_records_the_call() {
    let h = Harness::start().await;
    let org = h.organization("fixture-org-a").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Caller's name is Maya Okafor",
        "factual",
        6,
        300.0,
    )
    .await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Zuri has a severe tree nut allergy and carries an EpiPen",
        "factual",
        10,
        200.0,
    )
    .await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Croissants were burnt on the bottom",
        "issue",
        5,
        100.0,
    )
    .await;

    let request = fixture_init_request();
    let (status, body) = h.init(&org.slug, Some(&org.secret), &request).await;
    assert_eq!(status, 200, "{body}");
    let variables = assert_init_shape(&body);
    assert_eq!(variables["caller_is_returning"], true);
    assert_eq!(variables["caller_name"], "Maya Okafor");
    assert_eq!(variables["caller_total_conversations"], 2);
    assert_eq!(variables["caller_open_issue_count"], 1);
    assert_eq!(variables["caller_last_seen_at"], "2025-11-20");
    assert!(variables["caller_open_issues"]
        .as_str()
        .unwrap()
        .contains("Croissants"));
    assert!(variables["caller_memory_context"]
        .as_str()
        .unwrap()
        .contains("tree nut allergy"));
    assert_eq!(
        variables["business_name"], "Crumb & Hearth",
        "organization default"
    );
    assert_eq!(variables["loyalty_points"], 0);
    let token = variables["secret__elaaoms_caller_token"].as_str().unwrap();
    assert!(token.starts_with("ect_"), "{token}");

    let (caller, agent, token_hash): (String, String, Vec<u8>) = sqlx::query_as(
        "SELECT caller_id, agent_id, caller_token_hash FROM pending_calls WHERE organization_id = $1 AND call_sid = $2",
    )
    .bind(org.id)
    .bind("CAb1d67d1ca50eab6e757e84048b6e40d2")
    .fetch_one(&h.db.admin_pool)
    .await
    .unwrap();
    assert_eq!((caller.as_str(), agent.as_str()), (MAYA, BAKERY));
    assert_ne!(token_hash, token.as_bytes(), "only a hash is stored");
    assert_eq!(token_hash.len(), 32);
    h.stop().await;
}

#[tokio::test]
async fn init_webhook_for_an_unknown_caller_sends_every_variable_empty() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let request = json!({"caller_id": "+15550100999", "agent_id": BAKERY, "called_number": "+14155550100", "call_sid": "CA-new"});
    let (status, body) = h.init(&org.slug, Some(&org.secret), &request).await;
    assert_eq!(status, 200, "{body}");
    let variables = assert_init_shape(&body);
    assert_eq!(variables["caller_is_returning"], false);
    assert_eq!(variables["caller_memory_context"], "");
    assert_eq!(variables["caller_name"], "");
    assert_eq!(variables["caller_total_conversations"], 0);
    assert_eq!(variables["business_name"], "Crumb & Hearth");

    // A body that is not what ElevenLabs sends still gets the defaults.
    for bad in [json!("garbage"), json!({"caller_id": 5}), json!({})] {
        let (status, body) = h.init(&org.slug, Some(&org.secret), &bad).await;
        assert_eq!(status, 200, "{body}");
        let variables = assert_init_shape(&body);
        assert_eq!(variables["caller_is_returning"], false);
        assert_eq!(variables["secret__elaaoms_caller_token"], "");
    }
    h.stop().await;
}

#[tokio::test]
async fn init_webhook_refuses_unknown_organizations_and_wrong_secrets() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let other = h.organization("org-b").await;
    let request = fixture_init_request();
    for (slug, secret) in [
        ("org-a", None),
        ("org-a", Some("eas_wrong")),
        ("org-a", Some(other.secret.as_str())),
        ("no-such-org", Some(org.secret.as_str())),
    ] {
        let (status, body) = h.init(slug, secret, &request).await;
        assert_eq!(status, 401, "{slug} {secret:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let calls = h
        .admin_count(
            "SELECT count(*) FROM pending_calls WHERE organization_id = $1",
            org.id,
        )
        .await;
    assert_eq!(calls, 0, "nothing recorded for a refused request");
    h.stop().await;
}

#[tokio::test]
async fn init_webhook_answers_defaults_when_the_database_is_slow() {
    let h = Harness::start_with_deadline(Duration::from_millis(300)).await;
    let org = h.organization("org-a").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_bakery_1",
        "Caller's name is Maya Okafor",
        "factual",
        6,
        10.0,
    )
    .await;
    let request = fixture_init_request();
    // A first call authenticates (and is remembered for the fallback).
    let (status, body) = h.init(&org.slug, Some(&org.secret), &request).await;
    assert_eq!(status, 200);
    assert_eq!(body["dynamic_variables"]["caller_is_returning"], true);

    // Hold a lock that every context read waits for, until the answer came.
    let mut blocker = h.db.admin_pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE callers, organizations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        h.init(&org.slug, Some(&org.secret), &request),
    )
    .await
    .expect("the webhook answers while the database is blocked");
    blocker.rollback().await.unwrap();

    let (status, body) = answered;
    assert_eq!(status, 200, "{body}");
    let variables = assert_init_shape(&body);
    assert_eq!(
        variables["caller_is_returning"], false,
        "defaults, not a half answer"
    );
    assert_eq!(variables["caller_memory_context"], "");
    assert_eq!(
        variables["business_name"], "Crumb & Hearth",
        "cached organization defaults"
    );

    // With a wrong secret the fallback does not hand out the organization's defaults.
    let mut blocker = h.db.admin_pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE callers, organizations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (status, body) = h.init(&org.slug, Some("eas_wrong"), &request).await;
    blocker.rollback().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let variables = assert_init_shape(&body);
    assert!(!variables.contains_key("business_name"), "{body}");

    let (_, metrics) = {
        let response = h
            .http
            .get(format!("{}/metrics", h.base))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert!(
        metrics.contains(r#"elaaoms_query_conversation_init_seconds_count{result="timeout"} 2"#),
        "{metrics}"
    );
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Server tool
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_server_tool_binds_the_caller_to_the_token_not_the_body() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let other = h.organization("org-b").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_maya",
        "Zuri has a severe tree nut allergy",
        "factual",
        10,
        10.0,
    )
    .await;
    h.memory(
        &org,
        PRIYA,
        BAKERY,
        "conv_priya",
        "Allergic to penicillin",
        "factual",
        10,
        10.0,
    )
    .await;

    let (_, init) = h
        .init(&org.slug, Some(&org.secret), &fixture_init_request())
        .await;
    let token = init["dynamic_variables"]["secret__elaaoms_caller_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // A prompt-injected body names Priya: the token still means Maya.
    let (status, body) = h
        .tool(
            &org,
            Some(&token),
            &json!({"query": "any allergies?", "caller_id": PRIYA, "agent_id": DENTAL}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["caller_identified"], true);
    assert_eq!(body["bound_by"], "caller_token");
    assert_eq!(
        contents(&body["memories"]),
        ["Zuri has a severe tree nut allergy"]
    );
    let result = body["result"].as_str().unwrap();
    assert!(
        result.contains("1. Zuri has a severe tree nut allergy"),
        "{result}"
    );
    assert!(!result.contains("penicillin"), "{result}");

    // An unknown token binds nobody, and the body is no fallback.
    let (status, body) = h
        .tool(
            &org,
            Some("ect_forged"),
            &json!({"query": "any allergies?", "caller_id": PRIYA}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["caller_identified"], false);
    assert_eq!(body["memories"], json!([]));

    // Org B's secret with org A's token: the token is not org B's.
    let (status, body) = h
        .tool(&other, Some(&token), &json!({"query": "any allergies?"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["caller_identified"], false);

    // Without a token, system__caller_id (in the body) binds the caller.
    let (status, body) = h
        .tool(
            &org,
            None,
            &json!({"query": "allergic to medicine", "caller_id": PRIYA}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["bound_by"], "system__caller_id");
    assert_eq!(contents(&body["memories"]), ["Allergic to penicillin"]);

    // ...unless the organization requires a token.
    sqlx::query("UPDATE organizations SET tool_requires_caller_token = true WHERE id = $1")
        .bind(org.id)
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    let (status, body) = h
        .tool(
            &org,
            None,
            &json!({"query": "allergic to medicine", "caller_id": PRIYA}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["caller_identified"], false);
    assert_eq!(body["memories"], json!([]));
    h.stop().await;
}

#[tokio::test]
async fn the_server_tool_validates_and_authenticates() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let (status, body) = h.tool(&org, None, &json!({"caller_id": MAYA})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("query: "));
    let (status, body) = h
        .tool(
            &org,
            None,
            &json!({"query": "x".repeat(1001), "caller_id": MAYA}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = h.tool(&org, None, &json!({"query": "allergies"})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("caller_id: "));
    let (status, body) = h
        .tool(
            &org,
            None,
            &json!({"query": "allergies", "caller_id": MAYA}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["result"]
        .as_str()
        .unwrap()
        .starts_with("Nothing remembered"));

    let (status, _) = respond(
        h.http
            .post(format!(
                "{}/v1/elevenlabs/tools/search/{}",
                h.base, org.slug
            ))
            .header(AGENT_SECRET_HEADER, "eas_wrong")
            .json(&json!({"query": "q", "caller_id": MAYA})),
    )
    .await;
    assert_eq!(status, 401);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Memory management
// ---------------------------------------------------------------------------

#[tokio::test]
async fn memories_and_conversations_are_read_and_deleted_within_the_organization() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let other = h.organization("org-b").await;
    let id = h
        .memory(
            &org,
            MAYA,
            BAKERY,
            "conv_bakery_1",
            "Prefers lemon sponge",
            "preference",
            6,
            10.0,
        )
        .await;
    // The same phone number and conversation id in org B.
    let theirs = h
        .memory(
            &other,
            MAYA,
            BAKERY,
            "conv_bakery_1",
            "Prefers chocolate",
            "preference",
            6,
            10.0,
        )
        .await;

    let (status, body) = h.get(&org.key, &format!("/v1/memories/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], "Prefers lemon sponge");
    assert_eq!(body["caller_id"], MAYA);
    assert_eq!(body["type"], "preference");
    assert_eq!(body["embedding_model"], "all-MiniLM-L6-v2");

    let (status, body) = h.get(&org.key, "/v1/conversations/conv_bakery_1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["generation"], 1);
    assert_eq!(body["memory_count"], 1);
    assert_eq!(body["caller_id"], MAYA);

    // Org B's key sees none of org A's, and cannot delete it.
    assert_eq!(
        h.get(&other.key, &format!("/v1/memories/{id}")).await.0,
        404
    );
    assert_eq!(
        h.delete(&other.key, &format!("/v1/memories/{id}")).await.0,
        404
    );
    assert_eq!(
        h.get(&org.key, &format!("/v1/memories/{theirs}")).await.0,
        404
    );
    let (_, theirs_conv) = h.get(&other.key, "/v1/conversations/conv_bakery_1").await;
    assert_eq!(theirs_conv["memory_count"], 1, "org B's own conversation");

    let (status, body) = h.delete(&org.key, &format!("/v1/memories/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(h.get(&org.key, &format!("/v1/memories/{id}")).await.0, 404);
    assert_eq!(
        h.delete(&org.key, &format!("/v1/memories/{id}")).await.0,
        404
    );
    let sources = h
        .admin_count(
            "SELECT count(*) FROM memory_sources WHERE organization_id = $1",
            org.id,
        )
        .await;
    assert_eq!(sources, 0, "sources cascade");
    assert_eq!(
        h.get(&other.key, &format!("/v1/memories/{theirs}")).await.0,
        200
    );

    let (status, body) = h.get(&org.key, "/v1/memories/not-a-uuid").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("memory_id: "));
    assert_eq!(
        h.get(&org.key, "/v1/conversations/conv_missing").await.0,
        404
    );
    assert_eq!(
        respond(h.http.get(format!("{}/v1/memories/{id}", h.base)))
            .await
            .0,
        401
    );
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Erasure
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct TestEvent {
    conversation_id: String,
    caller_id: String,
}

async fn publish(h: &Harness, org: Uuid, conversation: &str, caller: &str, dlq: bool, n: u32) {
    let names = &h.bus.bus.names;
    let subject = names.subject(Step::Transcribed);
    let subject = if dlq {
        names.dlq_subject_for(&subject)
    } else {
        subject
    };
    let body = Envelope::new(
        org,
        1,
        TestEvent {
            conversation_id: conversation.to_owned(),
            caller_id: caller.to_owned(),
        },
    )
    .encode()
    .unwrap();
    h.bus
        .bus
        .publish(
            &subject,
            &format!("{org}:{conversation}:{dlq}:{n}"),
            org,
            body.into(),
        )
        .await
        .unwrap();
}

async fn stream_messages(h: &Harness, stream: &str) -> u64 {
    h.bus
        .bus
        .jetstream
        .get_stream(stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

fn payload_dir(h: &Harness, conversation: &str) -> PathBuf {
    let dir = h.payloads.path().join(conversation);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{conversation}_transcription.json")),
        b"{}",
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn erasure_leaves_nothing_behind_and_a_tombstone() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let other = h.organization("org-b").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_maya_1",
        "Prefers lemon sponge",
        "preference",
        6,
        10.0,
    )
    .await;
    h.memory(
        &org,
        MAYA,
        DENTAL,
        "conv_maya_2",
        "Allergic to latex",
        "factual",
        9,
        5.0,
    )
    .await;
    h.memory(
        &org,
        PRIYA,
        DENTAL,
        "conv_priya_1",
        "Allergic to penicillin",
        "factual",
        10,
        5.0,
    )
    .await;
    // The same number in org B must survive.
    h.memory(
        &other,
        MAYA,
        BAKERY,
        "conv_maya_1",
        "Prefers chocolate",
        "preference",
        6,
        10.0,
    )
    .await;
    let (status, _) = h
        .init(&org.slug, Some(&org.secret), &fixture_init_request())
        .await;
    assert_eq!(status, 200);
    sqlx::query(
        "INSERT INTO outbox (organization_id, subject, msg_id, body) VALUES ($1, 's', $2, '\\x00')",
    )
    .bind(org.id)
    .bind(format!("{}:conv_maya_1:transcribed:1", org.id))
    .execute(&h.db.admin_pool)
    .await
    .unwrap();
    let maya_dirs = [
        payload_dir(&h, "conv_maya_1"),
        payload_dir(&h, "conv_maya_2"),
    ];
    let priya_dir = payload_dir(&h, "conv_priya_1");

    let events = h.bus.bus.names.event_stream();
    let dead_letters = h.bus.bus.names.dlq_stream();
    publish(&h, org.id, "conv_maya_1", MAYA, false, 1).await;
    publish(&h, org.id, "conv_maya_2", MAYA, false, 2).await;
    publish(&h, org.id, "conv_maya_2", MAYA, true, 3).await;
    publish(&h, org.id, "conv_priya_1", PRIYA, false, 4).await;
    publish(&h, other.id, "conv_maya_1", MAYA, false, 5).await;
    publish(&h, other.id, "conv_maya_1", MAYA, true, 6).await;
    assert_eq!(stream_messages(&h, &events).await, 4);
    assert_eq!(stream_messages(&h, &dead_letters).await, 2);

    let (status, report) = h
        .delete(&org.key, &format!("/v1/callers/{}", path_caller(MAYA)))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["caller_found"], true);
    assert_eq!(report["memories_deleted"], 2);
    assert_eq!(report["conversations_deleted"], 2);
    assert_eq!(report["pending_calls_deleted"], 1);
    assert_eq!(report["outbox_rows_deleted"], 1);
    assert_eq!(report["payload_directories_deleted"], 2);
    assert_eq!(report["stream_messages_deleted"], 3);
    assert_eq!(report["tombstoned"], true);

    // Nothing of Maya in org A, in any table.
    for table in ["memories", "conversations", "pending_calls", "callers"] {
        let left = h
            .admin_count(&format!("SELECT count(*) FROM {table} WHERE organization_id = $1 AND caller_id = '{MAYA}'"), org.id)
            .await;
        assert_eq!(left, 0, "{table}");
    }
    let sources = h
        .admin_count("SELECT count(*) FROM memory_sources WHERE organization_id = $1 AND conversation_id LIKE 'conv_maya%'", org.id)
        .await;
    assert_eq!(sources, 0);
    let outbox = h
        .admin_count(
            "SELECT count(*) FROM outbox WHERE organization_id = $1",
            org.id,
        )
        .await;
    assert_eq!(outbox, 0);
    let tombstone: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM erased_callers WHERE organization_id = $1 AND caller_hash = $2)",
    )
    .bind(org.id)
    .bind(caller_hash(MAYA))
    .fetch_one(&h.db.admin_pool)
    .await
    .unwrap();
    assert!(tombstone);
    let audit: (i32, i32, i32) = sqlx::query_as(
        "SELECT memories_deleted, stream_messages_deleted, payload_dirs_deleted FROM erasure_audit
          WHERE organization_id = $1 AND caller_hash = $2",
    )
    .bind(org.id)
    .bind(caller_hash(MAYA))
    .fetch_one(&h.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(audit, (2, 3, 2));
    for dir in &maya_dirs {
        assert!(!dir.exists(), "{}", dir.display());
    }
    assert!(priya_dir.exists());
    assert_eq!(
        stream_messages(&h, &events).await,
        2,
        "Priya's and org B's events stay"
    );
    assert_eq!(
        stream_messages(&h, &dead_letters).await,
        1,
        "org B's dead letter stays"
    );

    // Others are untouched: Priya in org A, Maya in org B.
    let (_, priya) = h
        .get(
            &org.key,
            &format!("/v1/callers/{}/context", path_caller(PRIYA)),
        )
        .await;
    assert_eq!(priya["caller_is_returning"], true);
    let (_, theirs) = h
        .get(
            &other.key,
            &format!("/v1/callers/{}/context", path_caller(MAYA)),
        )
        .await;
    assert_eq!(contents(&theirs["memories"]), ["Prefers chocolate"]);

    // A second erasure finds nothing.
    let (status, again) = h
        .delete(&org.key, &format!("/v1/callers/{}", path_caller(MAYA)))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["caller_found"], false);
    for field in [
        "memories_deleted",
        "conversations_deleted",
        "pending_calls_deleted",
        "payload_directories_deleted",
        "stream_messages_deleted",
    ] {
        assert_eq!(again[field], 0, "{field}");
    }
    let audits = h
        .admin_count(
            "SELECT count(*) FROM erasure_audit WHERE organization_id = $1",
            org.id,
        )
        .await;
    assert_eq!(audits, 2, "every erasure request is audited");
    h.stop().await;
}

/// Publishes the extractor's `memories.extracted` for one conversation with
/// one new memory; returns its stream sequence.
async fn publish_extraction(
    h: &Harness,
    org: Uuid,
    conversation: &str,
    caller: &str,
    content: &str,
) -> u64 {
    let event = Envelope::new(
        org,
        1,
        MemoriesExtracted {
            conversation_id: conversation.to_owned(),
            agent_id: DENTAL.to_owned(),
            caller_id: caller.to_owned(),
            memories: vec![ExtractedMemory {
                content: MemoryContent::new(content).unwrap(),
                memory_type: MemoryType::Factual,
                importance: Importance::new(8).unwrap(),
                confidence: Confidence::new(0.9).unwrap(),
                source_quote: None,
            }],
            resolved_issue_ids: vec![],
            extractor: "rules".to_owned(),
        },
    );
    h.bus
        .bus
        .publish(
            &h.bus.bus.names.subject(Step::Extracted),
            &event_msg_id(org, conversation, Step::Extracted, 1),
            org,
            event.encode().unwrap().into(),
        )
        .await
        .unwrap()
}

/// The test bus's event stream.
async fn event_stream(h: &Harness) -> async_nats::jetstream::stream::Stream {
    h.bus
        .bus
        .jetstream
        .get_stream(h.bus.bus.names.event_stream())
        .await
        .unwrap()
}

/// Waits (bounded) until the indexer has settled every extraction up to
/// `sequence`: acknowledged, nothing pending or being redelivered.
async fn indexer_settled(h: &Harness, sequence: u64) {
    let stream = event_stream(h).await;
    let consumer = h.bus.bus.names.consumer(elaaoms_indexer::SERVICE_NAME);
    for _ in 0..300 {
        if let Ok(info) = stream.consumer_info(&consumer).await {
            if info.ack_floor.stream_sequence >= sequence
                && info.num_pending == 0
                && info.num_ack_pending == 0
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the indexer did not settle the extractions up to {sequence} within 30 s");
}

async fn start_indexer(h: &Harness) -> (CancellationToken, JoinHandle<()>) {
    let indexer = elaaoms_indexer::IndexerService::build(
        elaaoms_indexer::Config {
            database: DatabaseConfig {
                database_url: h.db.service_url.clone(),
                database_max_connections: 4,
            },
            bus: h.bus.config.clone(),
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
            llm: Default::default(),
        },
        h.embedder.clone(),
    )
    .await
    .expect("build the indexer");
    let shutdown = CancellationToken::new();
    let run = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { indexer.run(shutdown).await.expect("the indexer runs") }
    });
    (shutdown, run)
}

/// Erasure against an extraction in flight, through the real indexer on the
/// bus: once the tombstone is committed (erasure's first step), an
/// extraction for the caller adds nothing, neither in the window before the
/// caller's rows are deleted nor after the erasure finished; another
/// caller's extraction in the same stream is applied (so the indexer did
/// run and did see the erased caller's event).
#[tokio::test]
async fn erasure_wins_over_an_extraction_in_flight() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_maya_1",
        "Prefers lemon sponge",
        "preference",
        6,
        10.0,
    )
    .await;
    h.conversation(&org, MAYA, DENTAL, "conv_maya_2").await;
    h.conversation(&org, PRIYA, DENTAL, "conv_priya_1").await;
    h.conversation(&org, PRIYA, DENTAL, "conv_priya_2").await;
    let (stop_indexer, indexer) = start_indexer(&h).await;
    let count = |sql: &'static str| h.admin_count(sql, org.id);

    // 1. The window: erasure has committed its tombstone and not yet
    //    deleted anything, so Maya's caller and conversation rows are still
    //    there, and her extraction arrives. Only the tombstone can stop it.
    sqlx::query("INSERT INTO erased_callers (organization_id, caller_hash) VALUES ($1, $2)")
        .bind(org.id)
        .bind(caller_hash(MAYA))
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    publish_extraction(&h, org.id, "conv_maya_2", MAYA, "Maya is allergic to latex").await;
    let last = publish_extraction(
        &h,
        org.id,
        "conv_priya_1",
        PRIYA,
        "Priya is allergic to nuts",
    )
    .await;
    indexer_settled(&h, last).await;
    assert_eq!(
        count("SELECT count(*) FROM memories WHERE organization_id = $1 AND caller_id = '+16465550187'").await,
        1,
        "the other caller's extraction was applied"
    );
    assert_eq!(
        count("SELECT count(*) FROM memories WHERE organization_id = $1 AND caller_id = '+14155550123'").await,
        1,
        "only Maya's memory from before the erasure began"
    );
    assert_eq!(
        count("SELECT count(*) FROM applied_extractions WHERE organization_id = $1 AND conversation_id = 'conv_maya_2'").await,
        0
    );

    // 2. The erasure completes; then an extraction that was still in the
    //    extractor (published after the stream sweep) reaches the indexer.
    let (status, report) = h
        .delete(&org.key, &format!("/v1/callers/{}", path_caller(MAYA)))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["memories_deleted"], 1, "{report}");
    let late = publish_extraction(&h, org.id, "conv_maya_2", MAYA, "Maya moved to Berkeley").await;
    let last =
        publish_extraction(&h, org.id, "conv_priya_2", PRIYA, "Priya drives a blue car").await;
    indexer_settled(&h, last).await;
    // The indexer deleted the late event it dropped: nothing of Maya is
    // left in the stream until retention. The other caller's stays.
    let stream = event_stream(&h).await;
    assert!(
        stream.get_raw_message(late).await.is_err(),
        "the erased caller's late event is gone from the stream"
    );
    assert!(stream.get_raw_message(last).await.is_ok());
    assert_eq!(
        count("SELECT count(*) FROM memories WHERE organization_id = $1 AND caller_id = '+16465550187'").await,
        2
    );
    for sql in [
        "SELECT count(*) FROM memories WHERE organization_id = $1 AND caller_id = '+14155550123'",
        "SELECT count(*) FROM conversations WHERE organization_id = $1 AND caller_id = '+14155550123'",
        "SELECT count(*) FROM callers WHERE organization_id = $1 AND caller_id = '+14155550123'",
        "SELECT count(*) FROM applied_extractions WHERE organization_id = $1 AND conversation_id LIKE 'conv_maya%'",
        "SELECT count(*) FROM memory_sources WHERE organization_id = $1 AND conversation_id LIKE 'conv_maya%'",
    ] {
        assert_eq!(count(sql).await, 0, "{sql}");
    }
    // Dropped, not dead-lettered: the indexer recognised the erased caller.
    assert_eq!(stream_messages(&h, &h.bus.bus.names.dlq_stream()).await, 0);
    let (status, context) = h
        .get(
            &org.key,
            &format!("/v1/callers/{}/context", path_caller(MAYA)),
        )
        .await;
    assert_eq!(status, 200, "{context}");
    assert_eq!(context["caller_is_returning"], false, "{context}");
    assert_eq!(context["memories"], json!([]), "{context}");

    stop_indexer.cancel();
    tokio::time::timeout(Duration::from_secs(10), indexer)
        .await
        .expect("the indexer stops after cancellation")
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn erasure_is_scoped_to_the_key_organization_and_validated() {
    let h = Harness::start().await;
    let org = h.organization("org-a").await;
    let other = h.organization("org-b").await;
    h.memory(
        &org,
        MAYA,
        BAKERY,
        "conv_maya_1",
        "Prefers lemon sponge",
        "preference",
        6,
        10.0,
    )
    .await;
    // Org B erases "Maya": org A's Maya is untouched.
    let (status, report) = h
        .delete(&other.key, &format!("/v1/callers/{}", path_caller(MAYA)))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["caller_found"], false);
    assert_eq!(report["memories_deleted"], 0);
    let (_, ours) = h
        .get(
            &org.key,
            &format!("/v1/callers/{}/context", path_caller(MAYA)),
        )
        .await;
    assert_eq!(contents(&ours["memories"]), ["Prefers lemon sponge"]);
    let tombstones = h
        .admin_count(
            "SELECT count(*) FROM erased_callers WHERE organization_id = $1",
            org.id,
        )
        .await;
    assert_eq!(tombstones, 0);

    assert_eq!(h.delete(&org.key, "/v1/callers/%20").await.0, 422);
    assert_eq!(
        respond(h.http.delete(format!("{}/v1/callers/%2B1", h.base)))
            .await
            .0,
        401
    );
    h.stop().await;
}
