//! The query service against the real Postgres (a database per test) with
//! the real embedder, called over HTTP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use elaaoms_query::{search_sql, Config, QueryService, QuerySettings};
use elaaoms_shared::api_keys::{display_prefix, generate_api_key, hash_api_key};
use elaaoms_shared::config::{BusConfig, DatabaseConfig, EmbeddingConfig, PayloadStoreConfig};
use elaaoms_shared::db::begin_org_tx;
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::test_support::TestDatabase;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const MODEL_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/models/all-MiniLM-L6-v2"
);
const CALLER: &str = "+14155550123";

// ---------------------------------------------------------------------------
// Harness: a database, the embedder, the service on port 0, an HTTP client.
// ---------------------------------------------------------------------------

struct Harness {
    db: TestDatabase,
    embedder: Embedder,
    base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), elaaoms_query::QueryError>>,
}

impl Harness {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let db = TestDatabase::create().await;
        let embedder = tokio::task::spawn_blocking(|| Embedder::local(MODEL_DIR.as_ref()))
            .await
            .unwrap()
            .expect("load the embedding model (deploy/local/setup.sh installs it)");
        let config = config(db.service_url.clone(), 4, "127.0.0.1:0".parse().unwrap());
        let service = QueryService::build(config, embedder.clone())
            .await
            .expect("build the query service");
        let addr: SocketAddr = service.local_addr();
        assert_ne!(addr.port(), 0);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(service.run(shutdown.clone()));
        Self {
            db,
            embedder,
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
    }

    async fn organization(&self, slug: &str) -> Org {
        let id = self
            .db
            .create_organization(slug, "a-webhook-secret-of-at-least-32-bytes!!")
            .await;
        let key = self.api_key(id).await;
        Org { id, key }
    }

    async fn api_key(&self, organization_id: Uuid) -> String {
        let key = generate_api_key();
        sqlx::query("INSERT INTO api_keys (organization_id, name, key_hash, key_prefix) VALUES ($1, 'test', $2, $3)")
            .bind(organization_id)
            .bind(hash_api_key(&key))
            .bind(display_prefix(&key))
            .execute(&self.db.admin_pool)
            .await
            .unwrap();
        key
    }

    /// Inserts a memory, with its caller, agent and conversation, through the
    /// service role inside the organization's transaction (as the indexer does).
    async fn memory(&self, org: &Org, memory: NewMemory<'_>) -> Uuid {
        let embedding = self.embedder.embed_one(memory.content).await.unwrap();
        let conversation = format!("conv_{}_{}", memory.agent, memory.caller);
        let mut tx = begin_org_tx(&self.db.pool, org.id).await.unwrap();
        sqlx::query(
            "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at)
             VALUES ($1, $2, now(), now()) ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(memory.caller)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO agents (organization_id, agent_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(memory.agent)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
             VALUES ($1, $2, $3, $4, now(), 'completed') ON CONFLICT DO NOTHING",
        )
        .bind(org.id)
        .bind(&conversation)
        .bind(memory.agent)
        .bind(memory.caller)
        .execute(&mut *tx)
        .await
        .unwrap();
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type,
                                   importance, sensitive_class, confidence, status, metadata, embedding,
                                   embedding_model, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0.9, $9, $10, $11, 'all-MiniLM-L6-v2',
                     now() - make_interval(secs => $12))
             RETURNING id",
        )
        .bind(org.id)
        .bind(memory.caller)
        .bind(memory.agent)
        .bind(&conversation)
        .bind(memory.content)
        .bind(memory.memory_type)
        .bind(memory.importance)
        .bind(memory.sensitive_class)
        .bind((memory.memory_type == "issue").then_some("open"))
        .bind(json!({"source_quote": memory.content}))
        .bind(pgvector::Vector::from(embedding))
        .bind(memory.age_secs)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        id
    }

    async fn post_search(&self, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/v1/search", self.base))
            .json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        respond(request).await
    }

    /// Searches and returns the contents of the results, best first.
    async fn search(&self, org: &Org, body: Value) -> Vec<String> {
        let (status, body) = self.post_search(Some(&org.key), &body).await;
        assert_eq!(status, 200, "{body}");
        contents(&body["results"])
    }

    async fn list(&self, org: &Org, caller: &str, query: &str) -> (u16, Value) {
        let caller = caller.replace('+', "%2B");
        let request = self
            .http
            .get(format!("{}/v1/callers/{caller}/memories{query}", self.base))
            .bearer_auth(&org.key);
        respond(request).await
    }
}

/// The service's configuration for these tests: search never touches the
/// bus or the payload store, so they point at unused names.
fn config(database_url: secrecy::SecretString, max_connections: u32, addr: SocketAddr) -> Config {
    Config {
        database: DatabaseConfig {
            database_url,
            database_max_connections: max_connections,
        },
        bus: BusConfig {
            nats_url: std::env::var("NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
            bus_namespace: "query_search_tests".to_owned(),
            stream_max_bytes: 1 << 20,
            nats_stream_replicas: 1,
        },
        payloads: PayloadStoreConfig {
            payload_dir: std::env::temp_dir().join("elaaoms-query-search-tests-unused"),
            payload_store_url: None,
        },
        embedding: EmbeddingConfig {
            embedding_model_dir: MODEL_DIR.into(),
        },
        settings: QuerySettings {
            addr,
            init_deadline: Duration::from_millis(300),
            caller_token_ttl: Duration::from_secs(3600),
            embedding_cache_entries: 1000,
            api_key_cache_ttl: Duration::from_secs(1),
        },
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

fn contents(results: &Value) -> Vec<String> {
    results
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {results}"))
        .iter()
        .map(|item| item["content"].as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

fn strings(items: &[&str]) -> Vec<String> {
    sorted(items.iter().map(|item| item.to_string()).collect())
}

struct Org {
    id: Uuid,
    key: String,
}

#[derive(Clone, Copy)]
struct NewMemory<'a> {
    caller: &'a str,
    agent: &'a str,
    content: &'a str,
    memory_type: &'a str,
    importance: i16,
    sensitive_class: Option<&'a str>,
    age_secs: f64,
}

fn memory<'a>(
    agent: &'a str,
    content: &'a str,
    memory_type: &'a str,
    importance: i16,
) -> NewMemory<'a> {
    NewMemory {
        caller: CALLER,
        agent,
        content,
        memory_type,
        importance,
        sensitive_class: None,
        age_secs: 0.0,
    }
}

/// Asserts the `{"error": {"code", "message"}}` shape and returns the message.
fn error_message(body: &Value) -> &str {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {body}"));
    assert!(
        error["code"].as_str().is_some_and(|code| !code.is_empty()),
        "{body}"
    );
    error["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"))
}

// ---------------------------------------------------------------------------
// Ranking, threshold, limit, filters
// ---------------------------------------------------------------------------

const ALLERGY: &str = "The caller is allergic to penicillin";
const MORNINGS: &str = "The caller prefers morning appointments";
const SON: &str = "The caller's son Kiran is nine";
const REFUND: &str = "The caller is waiting for a refund of a double charge";

#[tokio::test]
async fn search_ranks_by_similarity_and_honours_threshold_and_limit() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    let allergy_id = h
        .memory(&org, memory("agent_dental", ALLERGY, "factual", 9))
        .await;
    h.memory(&org, memory("agent_dental", MORNINGS, "preference", 5))
        .await;
    h.memory(&org, memory("agent_dental", SON, "relationship", 6))
        .await;
    h.memory(&org, memory("agent_dental", REFUND, "issue", 7))
        .await;

    // Everything, ranked: the allergy first, scores descending, in (0, 1].
    let (status, body) = h
        .post_search(
            Some(&org.key),
            &json!({"query_text": "does she have any drug allergies", "caller_id": CALLER,
                    "relevance_threshold": 0.0, "result_limit": 10}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    let scores: Vec<f64> = results
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert_eq!(results[0]["content"], ALLERGY, "{body}");
    assert!(
        scores.windows(2).all(|pair| pair[0] >= pair[1]),
        "{scores:?}"
    );
    assert!(scores[0] > 0.0 && scores[0] <= 1.0, "{scores:?}");
    assert!(body["query_time_ms"].as_f64().is_some(), "{body}");

    // Every field of the memory is there, under the seed's names.
    let top = &results[0];
    assert_eq!(top["memory_id"], allergy_id.to_string());
    assert_eq!(top["type"], "factual");
    assert_eq!(top["importance"], 9);
    assert_eq!(top["is_shareable"], true);
    assert!(
        (top["confidence"].as_f64().unwrap() - 0.9).abs() < 1e-6,
        "{top}"
    );
    assert_eq!(top["reinforcement_count"], 0);
    assert_eq!(top["status"], Value::Null);
    assert!(top["created_at"].as_str().is_some(), "{top}");
    assert_eq!(top["last_reinforced_at"], Value::Null);
    assert_eq!(top["agent_id"], "agent_dental");
    assert_eq!(
        top["conversation_id"],
        format!("conv_agent_dental_{CALLER}")
    );
    assert_eq!(top["metadata"]["source_quote"], ALLERGY);
    let issue = results.iter().find(|r| r["content"] == REFUND).unwrap();
    assert_eq!(issue["status"], "open");

    // A threshold between the best and the rest keeps the best only; nothing
    // below the threshold is ever returned.
    let threshold = (scores[0] + scores[1]) / 2.0;
    let (_, body) = h
        .post_search(
            Some(&org.key),
            &json!({"query_text": "does she have any drug allergies", "caller_id": CALLER,
                    "relevance_threshold": threshold, "result_limit": 10}),
        )
        .await;
    assert_eq!(contents(&body["results"]), vec![ALLERGY]);
    for threshold in [0.1, 0.2, 0.3, 0.4, 0.5] {
        let (_, body) = h
            .post_search(
                Some(&org.key),
                &json!({"query_text": "does she have any drug allergies", "caller_id": CALLER,
                        "relevance_threshold": threshold, "result_limit": 10}),
            )
            .await;
        let returned = body["results"].as_array().unwrap();
        assert!(
            returned
                .iter()
                .all(|r| r["score"].as_f64().unwrap() >= threshold),
            "{body}"
        );
        assert_eq!(
            returned.len(),
            scores.iter().filter(|&&s| s >= threshold).count(),
            "{body}"
        );
    }

    // The default threshold (0.7): the same sentence matches, a vague one does not.
    let exact = h
        .search(&org, json!({"query_text": ALLERGY, "caller_id": CALLER}))
        .await;
    assert_eq!(exact, vec![ALLERGY]);
    let vague = h
        .search(
            &org,
            json!({"query_text": "what is the weather like on Mars", "caller_id": CALLER}),
        )
        .await;
    assert!(vague.is_empty(), "{vague:?}");

    // result_limit.
    let limited = h
        .search(
            &org,
            json!({"query_text": "does she have any drug allergies", "caller_id": CALLER,
                   "relevance_threshold": 0.0, "result_limit": 2}),
        )
        .await;
    assert_eq!(limited.len(), 2);
    assert_eq!(limited[0], ALLERGY);

    // Type and importance filters.
    let preferences = h
        .search(
            &org,
            json!({"query_text": "when does she like to come in", "caller_id": CALLER,
                   "relevance_threshold": 0.0, "types": ["preference"]}),
        )
        .await;
    assert_eq!(preferences, vec![MORNINGS]);
    let important = h
        .search(
            &org,
            json!({"query_text": "The caller", "caller_id": CALLER, "relevance_threshold": 0.0, "min_importance": 7}),
        )
        .await;
    assert_eq!(sorted(important), strings(&[ALLERGY, REFUND]));

    // A caller with no memories is an empty result, not an error.
    let (status, body) = h
        .post_search(
            Some(&org.key),
            &json!({"query_text": "allergies", "caller_id": "+15550000000"}),
        )
        .await;
    assert_eq!((status, body["results"].clone()), (200, json!([])));
    h.stop().await;
}

#[tokio::test]
async fn listing_is_newest_first_with_limit_and_types() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    for (content, memory_type, age) in [
        (ALLERGY, "factual", 300.0),
        (MORNINGS, "preference", 200.0),
        (SON, "relationship", 100.0),
    ] {
        h.memory(
            &org,
            NewMemory {
                age_secs: age,
                ..memory("agent_dental", content, memory_type, 5)
            },
        )
        .await;
    }
    let (status, body) = h.list(&org, CALLER, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["caller_id"], CALLER);
    assert_eq!(contents(&body["memories"]), vec![SON, MORNINGS, ALLERGY]);
    assert!(body["memories"][0].get("score").is_none(), "{body}");

    let (_, body) = h.list(&org, CALLER, "?limit=2").await;
    assert_eq!(contents(&body["memories"]), vec![SON, MORNINGS]);
    let (_, body) = h.list(&org, CALLER, "?types=factual,preference").await;
    assert_eq!(contents(&body["memories"]), vec![MORNINGS, ALLERGY]);

    for query in ["?limit=0", "?limit=501", "?types=gossip", "?colour=red"] {
        let (status, body) = h.list(&org, CALLER, query).await;
        assert_eq!(status, 422, "{query}: {body}");
        error_message(&body);
    }
    h.stop().await;
}

/// Follows `next_cursor` from the first page to the last and returns the
/// memory ids in the order they came, and how many pages it took.
async fn all_pages(h: &Harness, org: &Org, query: &str) -> (Vec<Uuid>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let page_query = match &cursor {
            Some(cursor) => format!("{query}&cursor={cursor}"),
            None => query.to_owned(),
        };
        let (status, body) = h.list(org, CALLER, &page_query).await;
        assert_eq!(status, 200, "{page_query}: {body}");
        pages += 1;
        assert!(pages <= 50, "pagination does not end: {body}");
        let memories = body["memories"].as_array().unwrap();
        ids.extend(
            memories
                .iter()
                .map(|m| m["memory_id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        match body["next_cursor"].as_str() {
            Some(next) => {
                assert!(!memories.is_empty(), "a cursor after an empty page: {body}");
                cursor = Some(next.to_owned());
            }
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                return (ids, pages);
            }
        }
    }
}

#[tokio::test]
async fn listing_pages_by_keyset_without_duplicates_or_gaps() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    let facts = [
        (
            "The caller is allergic to penicillin",
            "factual",
            9,
            "agent_dental",
        ),
        (
            "The caller prefers morning appointments",
            "preference",
            5,
            "agent_dental",
        ),
        (
            "The caller's son Kiran is nine",
            "relationship",
            6,
            "agent_dental",
        ),
        ("The caller waits for a refund", "issue", 7, "agent_billing"),
        ("The caller lives in Oakland", "factual", 4, "agent_dental"),
        (
            "The caller was upset about the wait",
            "emotion",
            3,
            "agent_billing",
        ),
        ("The caller drives a blue car", "factual", 2, "agent_dental"),
    ];
    let mut ids = Vec::new();
    for (age, (content, memory_type, importance, agent)) in facts.into_iter().enumerate() {
        let id = h
            .memory(
                &org,
                NewMemory {
                    age_secs: 100.0 * (age as f64 + 1.0),
                    ..memory(agent, content, memory_type, importance)
                },
            )
            .await;
        ids.push(id);
    }
    // Ties on created_at are where OFFSET-free paging goes wrong: give three
    // memories the same instant, so only the id orders them.
    sqlx::query("UPDATE memories SET created_at = '2026-01-01T00:00:00Z' WHERE id = ANY($1)")
        .bind(&ids[1..4])
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    let expected: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM memories WHERE organization_id = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(org.id)
    .fetch_all(&h.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(expected.len(), 7);

    // Every page size, including one that ends exactly at the last row.
    for (limit, pages) in [(1, 7), (2, 4), (3, 3), (7, 1), (500, 1)] {
        let (listed, taken) = all_pages(&h, &org, &format!("?limit={limit}")).await;
        assert_eq!(listed, expected, "limit {limit}");
        assert_eq!(taken, pages, "limit {limit}");
    }
    // The default page holds all seven, with no cursor.
    let (_, body) = h.list(&org, CALLER, "").await;
    assert_eq!(body["memories"].as_array().unwrap().len(), 7, "{body}");
    assert!(body["next_cursor"].is_null(), "{body}");

    // Filters apply on every page.
    let (listed, _) = all_pages(&h, &org, "?limit=1&min_importance=5").await;
    let important: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM memories WHERE organization_id = $1 AND importance >= 5
          ORDER BY created_at DESC, id DESC",
    )
    .bind(org.id)
    .fetch_all(&h.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(important.len(), 4);
    assert_eq!(listed, important);
    let (listed, _) = all_pages(&h, &org, "?limit=2&types=factual&agent_id=agent_dental").await;
    let factual: Vec<Uuid> = expected
        .iter()
        .copied()
        .filter(|id| [ids[0], ids[4], ids[6]].contains(id))
        .collect();
    assert_eq!(listed, factual);

    // A memory written between two pages does not shift the next page.
    let (_, first) = h.list(&org, CALLER, "?limit=3").await;
    h.memory(
        &org,
        memory("agent_dental", "The caller moved to Berkeley", "factual", 5),
    )
    .await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (rest, _) = all_pages(&h, &org, &format!("?limit=2&cursor={cursor}")).await;
    let mut seen: Vec<Uuid> = first["memories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["memory_id"].as_str().unwrap().parse().unwrap())
        .collect();
    seen.extend(rest);
    assert_eq!(seen, expected);
    h.stop().await;
}

#[tokio::test]
async fn a_bad_cursor_is_a_422_naming_it() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    h.memory(&org, memory("agent_dental", ALLERGY, "factual", 9))
        .await;
    // Not base64; base64 of garbage; a good shape with a bad uuid.
    for cursor in ["%25%25%25", "bm90LWEtY3Vyc29y", "MTIzNDU2Lm5vdC1hLXV1aWQ"] {
        let (status, body) = h.list(&org, CALLER, &format!("?cursor={cursor}")).await;
        assert_eq!(status, 422, "{cursor}: {body}");
        assert_eq!(body["error"]["code"], "invalid_field", "{body}");
        assert!(error_message(&body).starts_with("cursor: "), "{body}");
    }
    for query in [
        "?min_importance=0",
        "?min_importance=11",
        "?min_importance=x",
    ] {
        let (status, body) = h.list(&org, CALLER, query).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert!(
            error_message(&body).starts_with("min_importance: "),
            "{body}"
        );
    }
    h.stop().await;
}

// ---------------------------------------------------------------------------
// The OpenAPI document
// ---------------------------------------------------------------------------

/// Every route the query service serves, by method and path template.
const SERVED_ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/search"),
    ("get", "/v1/callers/{caller_id}/memories"),
    ("get", "/v1/callers/{caller_id}/context"),
    ("delete", "/v1/callers/{caller_id}"),
    ("get", "/v1/memories/{memory_id}"),
    ("delete", "/v1/memories/{memory_id}"),
    ("get", "/v1/conversations/{conversation_id}"),
    ("post", "/v1/elevenlabs/conversation-init/{org}"),
    ("post", "/v1/elevenlabs/tools/search/{org}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[tokio::test]
async fn openapi_document_describes_every_served_route() {
    let h = Harness::start().await;
    // Unauthenticated, JSON, OpenAPI 3.1.
    let response = h
        .http
        .get(format!("{}/openapi.json", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let document: Value =
        serde_json::from_str(&response.text().await.unwrap()).expect("the document is JSON");
    let version = document["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "{version}");
    assert_eq!(
        document,
        serde_json::to_value(elaaoms_query::openapi_document()).unwrap()
    );

    // Exactly the served routes, no more, no fewer.
    let mut documented: Vec<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|key| ["get", "post", "put", "delete", "patch"].contains(&key.as_str()))
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    documented.sort();
    let mut served: Vec<(String, String)> = SERVED_ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented, served);
    // ...and each listed route really is served: nothing falls through to
    // the "no such route" fallback.
    for (method, path) in SERVED_ROUTES {
        let url = format!(
            "{}{}",
            h.base,
            path.replace("{caller_id}", "%2B1555")
                .replace("{memory_id}", &Uuid::new_v4().to_string())
                .replace("{conversation_id}", "conv_x")
                .replace("{org}", "no-such-org")
        );
        let request = match *method {
            "get" => h.http.get(&url),
            "post" => h.http.post(&url).json(&json!({})),
            "delete" => h.http.delete(&url),
            other => unreachable!("{other}"),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(
            !(status == 404 && body.contains("no such route")) && status != 405,
            "{method} {path}: {status} {body}"
        );
    }

    // Security: bearer API keys for tenant routes, the secret header for
    // the agent endpoints, nothing for operations.
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["agent_secret"]["type"], "apiKey");
    assert_eq!(schemes["agent_secret"]["in"], "header");
    assert!(schemes["agent_secret"]["name"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case(elaaoms_query::AGENT_SECRET_HEADER));
    for (method, path) in SERVED_ROUTES {
        let operation = &document["paths"][path][method];
        let security = operation["security"].to_string();
        let expected = if path.starts_with("/v1/elevenlabs/") {
            "agent_secret"
        } else if path.starts_with("/v1/") {
            "bearer"
        } else {
            assert!(operation.get("security").is_none(), "{method} {path}");
            continue;
        };
        assert!(security.contains(expected), "{method} {path}: {security}");
        // The error shape, on 401 at least, for every protected route.
        assert_eq!(
            operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{method} {path}"
        );
        if !path.contains("conversation-init") {
            for status in ["400", "422", "500", "503"] {
                assert!(
                    operation["responses"].get(status).is_some(),
                    "{method} {path}: no {status}"
                );
            }
        }
    }
    let schemas = &document["components"]["schemas"];
    let error = &schemas["ErrorBody"]["properties"]["error"];
    assert_eq!(error["$ref"], "#/components/schemas/ErrorDetail", "{error}");
    assert_eq!(
        sorted_keys(&schemas["ErrorDetail"]["properties"]),
        strings(&["code", "message"])
    );

    // The search request names the seed's fields (and ours), and refuses
    // anything else.
    let search = &document["paths"]["/v1/search"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"]["$ref"];
    assert_eq!(search, "#/components/schemas/SearchRequest");
    let request = &schemas["SearchRequest"];
    assert_eq!(
        sorted_keys(&request["properties"]),
        strings(&[
            "query_text",
            "caller_id",
            "conversation_id",
            "agent_id",
            "search_all_agents",
            "relevance_threshold",
            "result_limit",
            "timestamp",
            "types",
            "min_importance",
        ])
    );
    assert_eq!(request["required"], json!(["query_text", "caller_id"]));
    assert_eq!(request["additionalProperties"], false);
    assert_eq!(request["properties"]["query_text"]["maxLength"], 1000);
    assert_eq!(request["properties"]["result_limit"]["maximum"], 100);
    assert_eq!(request["properties"]["relevance_threshold"]["default"], 0.7);
    // And the listing documents its pagination.
    let params: Vec<&str> = document["paths"]["/v1/callers/{caller_id}/memories"]["get"]
        ["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "caller_id",
        "limit",
        "agent_id",
        "types",
        "min_importance",
        "cursor",
    ] {
        assert!(params.contains(&name), "{params:?}");
    }
    h.stop().await;
}

fn sorted_keys(object: &Value) -> Vec<String> {
    sorted(
        object
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {object}"))
            .keys()
            .cloned()
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// Tenancy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn organizations_never_see_each_others_callers() {
    let h = Harness::start().await;
    let a = h.organization("org-a").await;
    let b = h.organization("org-b").await;
    // The same phone number is a different caller in each organization.
    h.memory(
        &a,
        memory("agent_a", "The caller's dog is named Biscuit", "factual", 9),
    )
    .await;
    h.memory(
        &b,
        memory("agent_b", "The caller's dog is named Pepper", "factual", 9),
    )
    .await;
    h.memory(
        &b,
        memory("agent_b", "The caller drives a red truck", "factual", 9),
    )
    .await;
    let b_only = "+14155550999";
    h.memory(
        &b,
        NewMemory {
            caller: b_only,
            ..memory("agent_b", "The caller's dog is named Rex", "factual", 9)
        },
    )
    .await;

    for body in [
        json!({"query_text": "what is the dog called", "caller_id": CALLER, "relevance_threshold": 0.0,
               "result_limit": 100}),
        json!({"query_text": "what is the dog called", "caller_id": CALLER, "relevance_threshold": 0.0,
               "result_limit": 100, "search_all_agents": true, "agent_id": "agent_b"}),
        json!({"query_text": "what is the dog called", "caller_id": CALLER, "relevance_threshold": 0.0,
               "result_limit": 100, "agent_id": "agent_a"}),
    ] {
        assert_eq!(
            h.search(&a, body).await,
            vec!["The caller's dog is named Biscuit"]
        );
    }
    let seen_by_b = h
        .search(
            &b,
            json!({"query_text": "what is the dog called", "caller_id": CALLER, "relevance_threshold": 0.0,
                   "search_all_agents": true}),
        )
        .await;
    assert_eq!(
        sorted(seen_by_b),
        strings(&[
            "The caller drives a red truck",
            "The caller's dog is named Pepper"
        ])
    );

    // B's own caller does not exist for A: no results, and a 404 listing.
    let found = h
        .search(
            &a,
            json!({"query_text": "what is the dog called", "caller_id": b_only, "relevance_threshold": 0.0,
                   "search_all_agents": true}),
        )
        .await;
    assert!(found.is_empty(), "{found:?}");
    let (status, body) = h.list(&a, b_only, "").await;
    assert_eq!(status, 404, "{body}");
    error_message(&body);
    let (status, body) = h.list(&a, CALLER, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        contents(&body["memories"]),
        vec!["The caller's dog is named Biscuit"]
    );
    let (_, body) = h.list(&b, b_only, "").await;
    assert_eq!(
        contents(&body["memories"]),
        vec!["The caller's dog is named Rex"]
    );

    // Row-level security is the second wall: inside A's transaction the
    // service role sees none of B's rows even without a filter of its own.
    let mut tx = begin_org_tx(&h.db.pool, a.id).await.unwrap();
    let visible: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT organization_id FROM memories")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, vec![a.id]);
    tx.rollback().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn the_service_role_cannot_bypass_row_level_security() {
    let db = TestDatabase::create().await;
    let (user, superuser, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        !superuser && !bypass,
        "{user} would bypass row-level security"
    );
    // Outside an organization's transaction it sees nothing at all.
    let org = db
        .create_organization("lonely", "a-webhook-secret-of-at-least-32-bytes!!")
        .await;
    sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at) VALUES ($1, $2, now(), now())",
    )
    .bind(org)
    .bind(CALLER)
    .execute(&db.admin_pool)
    .await
    .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM callers")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(seen, 0);
}

// ---------------------------------------------------------------------------
// Sharing between agents
// ---------------------------------------------------------------------------

const JAZZ: &str = "The caller likes jazz music";
const LATEX: &str = "The caller is allergic to latex gloves";
const DIABETES: &str = "The caller has type 2 diabetes";
const WINDOW: &str = "The caller wants a table by the window";

#[tokio::test]
async fn agents_see_their_own_memories_and_what_the_policy_shares() {
    let h = Harness::start().await;
    let org = h.organization("bistro").await;
    h.memory(&org, memory("agent_x", JAZZ, "preference", 5))
        .await;
    h.memory(&org, memory("agent_x", LATEX, "factual", 9)).await;
    h.memory(
        &org,
        NewMemory {
            sensitive_class: Some("health"),
            ..memory("agent_x", DIABETES, "factual", 9)
        },
    )
    .await;
    h.memory(&org, memory("agent_y", WINDOW, "preference", 3))
        .await;

    let as_agent = |agent: &str, all: bool| {
        json!({"query_text": "what do we know about the caller", "caller_id": CALLER,
               "relevance_threshold": 0.0, "result_limit": 100, "agent_id": agent, "search_all_agents": all})
    };
    let listed = |body: Value| sorted(contents(&body["memories"]));

    // by_importance (the default): Y sees its own and X's importance-9 memory,
    // not X's importance-5 one, nor the health one.
    assert_eq!(
        sorted(h.search(&org, as_agent("agent_y", false)).await),
        strings(&[LATEX, WINDOW])
    );
    assert_eq!(
        listed(h.list(&org, CALLER, "?agent_id=agent_y").await.1),
        strings(&[LATEX, WINDOW])
    );
    assert_eq!(
        sorted(h.search(&org, as_agent("agent_x", false)).await),
        strings(&[DIABETES, JAZZ, LATEX])
    );
    // Across all agents, or with no agent named: everything.
    let everything = strings(&[DIABETES, JAZZ, LATEX, WINDOW]);
    assert_eq!(
        sorted(h.search(&org, as_agent("agent_y", true)).await),
        everything
    );
    let no_agent = json!({"query_text": "what do we know about the caller", "caller_id": CALLER,
                          "relevance_threshold": 0.0, "result_limit": 100});
    assert_eq!(sorted(h.search(&org, no_agent).await), everything);
    assert_eq!(listed(h.list(&org, CALLER, "").await.1), everything);

    // Sensitive classes cross agents only when the organization opts in.
    set_org(&h, org.id, "share_sensitive = true").await;
    assert_eq!(
        sorted(h.search(&org, as_agent("agent_y", false)).await),
        strings(&[DIABETES, LATEX, WINDOW])
    );

    // none: only the agent's own memories.
    set_org(&h, org.id, "sharing_policy = 'none'").await;
    assert_eq!(
        h.search(&org, as_agent("agent_y", false)).await,
        vec![WINDOW]
    );
    assert_eq!(
        listed(h.list(&org, CALLER, "?agent_id=agent_y").await.1),
        strings(&[WINDOW])
    );
    assert_eq!(
        sorted(h.search(&org, as_agent("agent_y", true)).await),
        everything
    );

    // all: everything, whatever the importance.
    set_org(&h, org.id, "sharing_policy = 'all'").await;
    assert_eq!(
        sorted(h.search(&org, as_agent("agent_y", false)).await),
        everything
    );
    h.stop().await;
}

async fn set_org(h: &Harness, id: Uuid, assignment: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE organizations SET {assignment} WHERE id = $1"
    )))
    .bind(id)
    .execute(&h.db.admin_pool)
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------
// Validation and authentication
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_requests_get_json_errors_naming_the_field() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    let valid = json!({"query_text": "allergies", "caller_id": CALLER});

    for (body, field) in [
        (json!({"query_text": "", "caller_id": CALLER}), "query_text"),
        (
            json!({"query_text": "x".repeat(1001), "caller_id": CALLER}),
            "query_text",
        ),
        (json!({"query_text": "allergies"}), "caller_id"),
        (
            json!({"query_text": "allergies", "caller_id": CALLER, "result_limit": 101}),
            "result_limit",
        ),
        (
            json!({"query_text": "allergies", "caller_id": CALLER, "result_limit": 0}),
            "result_limit",
        ),
        (
            json!({"query_text": "allergies", "caller_id": CALLER, "relevance_threshold": 1.5}),
            "relevance_threshold",
        ),
        (
            json!({"query_text": "allergies", "caller_id": CALLER, "types": ["gossip"]}),
            "types",
        ),
        (
            json!({"query_text": "allergies", "caller_id": CALLER, "min_importance": 0}),
            "min_importance",
        ),
    ] {
        let (status, response) = h.post_search(Some(&org.key), &body).await;
        assert_eq!(status, 422, "{body}: {response}");
        assert_eq!(response["error"]["code"], "invalid_field");
        assert!(
            error_message(&response).contains(field),
            "{field}: {response}"
        );
    }

    // Not JSON at all, and a body over the limit.
    let response = h
        .http
        .post(format!("{}/v1/search", h.base))
        .bearer_auth(&org.key)
        .header("content-type", "application/json")
        .body("{\"query_text\": ");
    let (status, body) = respond(response).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("JSON"), "{body}");
    let huge = json!({"query_text": "x".repeat(70 * 1024), "caller_id": CALLER});
    let (status, body) = h.post_search(Some(&org.key), &huge).await;
    assert_eq!(status, 413, "{body}");
    error_message(&body);

    // Authentication comes first and never says what was wrong.
    let revoked = h.api_key(org.id).await;
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1")
        .bind(hash_api_key(&revoked))
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    let wrong = generate_api_key();
    let mut messages = Vec::new();
    for key in [None, Some(wrong.as_str()), Some(revoked.as_str()), Some("")] {
        for body in [&valid, &json!({"query_text": ""})] {
            let (status, response) = h.post_search(key, body).await;
            assert_eq!(status, 401, "{key:?}: {response}");
            assert_eq!(response["error"]["code"], "unauthorized");
            messages.push(error_message(&response).to_owned());
        }
    }
    let (status, _) = respond(
        h.http
            .get(format!("{}/v1/callers/{CALLER}/memories", h.base))
            .header("authorization", format!("Basic {}", org.key)),
    )
    .await;
    assert_eq!(status, 401);
    messages.dedup();
    assert_eq!(messages.len(), 1, "{messages:?}");

    // The valid request still works with the valid key.
    let (status, body) = h.post_search(Some(&org.key), &valid).await;
    assert_eq!(status, 200, "{body}");

    // Unknown routes answer in the same shape.
    let (status, body) = respond(h.http.get(format!("{}/v1/nothing-here", h.base))).await;
    assert_eq!(status, 404);
    error_message(&body);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// The plan: an exact scan of the caller's rows, never a vector index
// ---------------------------------------------------------------------------

/// A key that authenticated is cached for `API_KEY_CACHE_TTL` (1 s in these
/// tests): revocation takes effect once that has passed, not later.
#[tokio::test]
async fn a_revoked_key_is_refused_once_its_cache_entry_expires() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    let key = h.api_key(org.id).await;
    let valid = json!({"query_text": "allergies", "caller_id": CALLER});
    let (status, body) = h.post_search(Some(&key), &valid).await;
    assert_eq!(status, 200, "{body}");

    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1")
        .bind(hash_api_key(&key))
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    // Within the TTL the cached answer still stands (the documented price).
    let (status, _) = h.post_search(Some(&key), &valid).await;
    if revoked_at.elapsed() < Duration::from_millis(900) {
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(revoked_at.elapsed())).await;
    let (status, body) = h.post_search(Some(&key), &valid).await;
    assert_eq!(status, 401, "{body}");
    // The organization's other key is untouched.
    let (status, body) = h.post_search(Some(&org.key), &valid).await;
    assert_eq!(status, 200, "{body}");
    h.stop().await;
}

#[tokio::test]
async fn search_never_uses_a_vector_index() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    for (i, content) in [ALLERGY, MORNINGS, SON, REFUND, JAZZ, LATEX, WINDOW]
        .iter()
        .enumerate()
    {
        let caller = if i % 2 == 0 { CALLER } else { "+14155550999" };
        h.memory(
            &org,
            NewMemory {
                caller,
                ..memory("agent_dental", content, "factual", 5)
            },
        )
        .await;
    }
    sqlx::query(
        "CREATE INDEX memories_embedding_hnsw ON memories USING hnsw (embedding vector_ip_ops)",
    )
    .execute(&h.db.admin_pool)
    .await
    .unwrap();
    // Autovacuum sets the visibility map of a serving table; without it an
    // index-only scan would still read every row from the heap.
    sqlx::query("VACUUM ANALYZE memories")
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    let query = pgvector::Vector::from(h.embedder.embed_one("drug allergies").await.unwrap());

    // The control: ordered by the bare distance, the same statement does use
    // the vector index under these settings, so the assertions below mean
    // something.
    let naive = search_sql().replace(
        "ORDER BY (m.embedding <#> $3) + 0, m.created_at DESC, m.id",
        "ORDER BY m.embedding <#> $3",
    );
    assert_ne!(naive, search_sql());
    let plan = explain(&h, org.id, &naive, &query, None, PlanKind::Custom).await;
    assert!(
        plan.contains("memories_embedding_hnsw"),
        "control plan:\n{plan}"
    );

    for kind in [PlanKind::Custom, PlanKind::Generic] {
        for agent in [None, Some("agent_dental")] {
            let plan = explain(&h, org.id, search_sql(), &query, agent, kind).await;
            assert!(
                !plan.contains("memories_embedding_hnsw"),
                "{kind:?} plan used the HNSW index:\n{plan}"
            );
            // The ranking reads the caller's entries of the covering index
            // only, never the heap row by row.
            assert!(
                plan.contains("Index Only Scan using memories_caller_search"),
                "{kind:?} plan did not rank by the caller's covering index:\n{plan}"
            );
        }
    }
    h.stop().await;
}

/// Every part of the pre-call context reads its caller's rows in index
/// order and stops at its limit: with sorting disabled no Sort node may be
/// left in the generic plan. (When an index ended before the statement's
/// tie-breaker, a small row estimate made the plan sort all of a caller's
/// open issues or name-like facts: 7 ms for a caller with thousands.)
#[tokio::test]
async fn the_context_reads_each_section_in_index_order() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    for (content, kind) in [
        (ALLERGY, "factual"),
        (REFUND, "issue"),
        ("Caller's name is Maya Okafor.", "factual"),
    ] {
        h.memory(&org, memory("agent_dental", content, kind, 6))
            .await;
    }
    sqlx::query("VACUUM ANALYZE memories")
        .execute(&h.db.admin_pool)
        .await
        .unwrap();
    for agent in ["NULL", "'agent_dental'"] {
        let mut tx = begin_org_tx(&h.db.pool, org.id).await.unwrap();
        turn_off(
            &mut tx,
            &[
                "enable_seqscan",
                "enable_sort",
                "enable_incremental_sort",
                "enable_bitmapscan",
            ],
        )
        .await;
        let lines = generic_plan(
            &mut tx,
            elaaoms_query::context_sql(),
            &format!("'{}', '{CALLER}', {agent}", org.id),
        )
        .await;
        tx.rollback().await.unwrap();
        let plan = lines.join("\n");
        assert!(!plan.contains("Sort"), "a section is sorted:\n{plan}");
        for index in [
            "memories_open_issues_ranked",
            "memories_caller_newest",
            "memories_caller_name_facts_newest",
        ] {
            assert!(plan.contains(index), "{index} unused:\n{plan}");
        }
    }
    h.stop().await;
}

#[derive(Debug, Clone, Copy)]
enum PlanKind {
    /// Planned with the parameter values, as the first executions are.
    Custom,
    /// The plan a cached prepared statement may switch to.
    Generic,
}

/// The plan of `sql` (the search statement's parameters) as the service
/// role runs it, with sequential scans, sorts and bitmap scans discouraged so
/// that any usable index wins. Vector literals are shortened.
async fn explain(
    h: &Harness,
    org: Uuid,
    sql: &str,
    query: &pgvector::Vector,
    agent: Option<&str>,
    kind: PlanKind,
) -> String {
    let mut tx = begin_org_tx(&h.db.pool, org).await.unwrap();
    turn_off(
        &mut tx,
        &["enable_seqscan", "enable_sort", "enable_bitmapscan"],
    )
    .await;
    let lines: Vec<String> = match kind {
        PlanKind::Custom => sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .bind(org)
            .bind(CALLER)
            .bind(query.clone())
            .bind(agent)
            .bind(None::<Vec<String>>)
            .bind(None::<i16>)
            .bind(0.7_f64)
            .bind(5_i64)
            .fetch_all(&mut *tx)
            .await
            .unwrap(),
        PlanKind::Generic => {
            let agent = agent.map_or("NULL".to_owned(), |agent| format!("'{agent}'"));
            let arguments = format!(
                "'{org}', '{CALLER}', '{}', {agent}, NULL, NULL, 0.7, 5",
                vector_literal(query)
            );
            generic_plan(&mut tx, sql, &arguments).await
        }
    };
    tx.rollback().await.unwrap();
    lines
        .iter()
        .map(|line| match (line.find("'["), line.find("]'")) {
            (Some(start), Some(end)) if start < end => {
                format!("{}'[...]'{}", &line[..start], &line[end + 2..])
            }
            _ => line.clone(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `SET LOCAL <setting> = off` for each planner setting.
async fn turn_off(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, settings: &[&str]) {
    for setting in settings {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL {setting} = off")))
            .execute(&mut **tx)
            .await
            .unwrap();
    }
}

/// The generic plan of `sql` (what a cached prepared statement may switch
/// to), executed with `arguments` written as SQL literals.
async fn generic_plan(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    sql: &str,
    arguments: &str,
) -> Vec<String> {
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut **tx)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE planned AS {sql}")))
        .execute(&mut **tx)
        .await
        .unwrap();
    let lines = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN EXECUTE planned({arguments})"
    )))
    .fetch_all(&mut **tx)
    .await
    .unwrap();
    sqlx::raw_sql("DEALLOCATE planned")
        .execute(&mut **tx)
        .await
        .unwrap();
    lines
}

fn vector_literal(vector: &pgvector::Vector) -> String {
    let items: Vec<String> = vector.as_slice().iter().map(f32::to_string).collect();
    format!("[{}]", items.join(","))
}

// ---------------------------------------------------------------------------
// Start-up, health, metrics, shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn health_and_metrics_are_served() {
    let h = Harness::start().await;
    let org = h.organization("clinic").await;
    let (status, body) = respond(h.http.get(format!("{}/healthz", h.base))).await;
    assert_eq!((status, body["service"].as_str()), (200, Some("query")));
    let (status, body) = respond(h.http.get(format!("{}/readyz", h.base))).await;
    assert_eq!(status, 200, "{body}");

    h.post_search(
        Some(&org.key),
        &json!({"query_text": "allergies", "caller_id": CALLER}),
    )
    .await;
    h.post_search(
        None,
        &json!({"query_text": "allergies", "caller_id": CALLER}),
    )
    .await;
    let metrics = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"elaaoms_query_http_requests_total{method="POST",route="/v1/search",status="200"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"elaaoms_query_http_requests_total{method="POST",route="/v1/search",status="401"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("elaaoms_query_http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"elaaoms_query_search_stage_seconds_count{stage="embed"} 1"#),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn build_fails_fast_with_a_clear_message() {
    let embedder = tokio::task::spawn_blocking(|| Embedder::local(MODEL_DIR.as_ref()))
        .await
        .unwrap()
        .unwrap();
    let unreachable = config(
        "postgres://nobody:secret-password@127.0.0.1:1/elaaoms"
            .to_owned()
            .into(),
        1,
        "127.0.0.1:0".parse().unwrap(),
    );
    let err = QueryService::build(unreachable, embedder.clone())
        .await
        .err()
        .expect("no database");
    let message = err.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("secret-password"), "{message}");

    let db = TestDatabase::create().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = config(db.service_url.clone(), 1, taken.local_addr().unwrap());
    let err = QueryService::build(busy, embedder)
        .await
        .err()
        .expect("address in use");
    assert!(
        err.to_string()
            .contains(&taken.local_addr().unwrap().to_string()),
        "{err}"
    );
}
