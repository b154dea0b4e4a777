//! Horizontal scaling without Docker: two extractor and two indexer
//! processes (the real binary) share the work of many transcripts; one of
//! each is killed with SIGKILL halfway. Every conversation must still end
//! `extraction_completed` exactly once, with no memory applied twice.
//!
//! `SCALING_TRANSCRIPTS` (default 200) sets the load; `SCALING_WORKERS`
//! (default 2) the processes per worker kind. BENCHMARKS.md reports the
//! 1,000-transcript run with one and with two workers of each kind.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use elaaoms_shared::config::{DatabaseConfig, PayloadStoreConfig};
use elaaoms_shared::test_support::{TestBus, TestDatabase};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

const SLUG: &str = "scaling-org";
const SECRET: &str = "whsec_scaling_0123456789abcdef0123456789abcdef";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Workers {
    children: Vec<(String, Child)>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_worker(
    kind: &str,
    index: usize,
    database: &TestDatabase,
    bus: &TestBus,
    payloads: &std::path::Path,
) -> Child {
    let health_var = if kind == "extractor" {
        "EXTRACTOR_HEALTH_ADDR"
    } else {
        "INDEXER_HEALTH_ADDR"
    };
    Command::new(env!("CARGO_BIN_EXE_elaaoms"))
        .arg(kind)
        .env("DATABASE_URL", database.service_url.expose_secret())
        .env("NATS_URL", &bus.config.nats_url)
        .env("BUS_NAMESPACE", &bus.config.bus_namespace)
        .env("STREAM_MAX_BYTES", bus.config.stream_max_bytes.to_string())
        .env(health_var, "127.0.0.1:0")
        .env("PAYLOAD_DIR", payloads)
        .env(
            "EMBEDDING_MODEL_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/data/models/all-MiniLM-L6-v2"),
        )
        .env("WORKER_ACK_WAIT", "5s")
        .env("WORKER_RETRY_DELAYS", "500ms")
        .env("WORKER_MAX_ATTEMPTS", "10")
        .env("RUST_LOG", "warn")
        .env("DATABASE_MAX_CONNECTIONS", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|err| panic!("start {kind} {index}: {err}"))
}

async fn completed(database: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM conversations WHERE status = 'extraction_completed'")
        .fetch_one(&database.admin_pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_load_and_survive_being_killed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let transcripts = env_number("SCALING_TRANSCRIPTS", 200);
    let workers_per_kind = env_number("SCALING_WORKERS", 2);
    let database = TestDatabase::create().await;
    let bus = TestBus::create().await;
    database.create_organization(SLUG, SECRET).await;
    let payloads = tempfile::tempdir().unwrap();

    let ingest = elaaoms_ingest::IngestService::build(elaaoms_ingest::Config {
        database: DatabaseConfig {
            database_url: database.service_url.clone(),
            database_max_connections: 8,
        },
        bus: bus.config.clone(),
        payloads: PayloadStoreConfig {
            payload_dir: payloads.path().to_owned(),
            payload_store_url: None,
        },
        settings: elaaoms_ingest::IngestSettings {
            addr: "127.0.0.1:0".parse().unwrap(),
            signature_tolerance: Duration::from_secs(1800),
            outbox_relay_interval: Duration::from_secs(1),
            ..elaaoms_ingest::IngestSettings::default()
        },
    })
    .await
    .expect("ingest starts");
    let webhook_url = format!(
        "http://{}/v1/webhooks/elevenlabs/{SLUG}",
        ingest.local_addr()
    );
    let shutdown = CancellationToken::new();
    let ingest_task = tokio::spawn(ingest.run(shutdown.clone()));

    let mut workers = Workers {
        children: Vec::new(),
    };
    for index in 0..workers_per_kind {
        for kind in ["extractor", "indexer"] {
            workers.children.push((
                kind.to_owned(),
                spawn_worker(kind, index, &database, &bus, payloads.path()),
            ));
        }
    }

    // One transcript per caller, so no two conversations may merge memories.
    let fixtures: Vec<serde_json::Value> = [
        "post_call_transcription_bakery_maya_2025-11-03.json",
        "post_call_transcription_dental_priya_2025-11-12.json",
        "post_call_transcription_telecom_tom_2025-11-18.json",
    ]
    .iter()
    .map(|name| {
        let path = format!(
            "{}/tests/fixtures/elevenlabs/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    })
    .collect();
    let client = reqwest::Client::new();
    let started = Instant::now();
    for i in 0..transcripts {
        let mut body = fixtures[i % fixtures.len()].clone();
        body["data"]["conversation_id"] = format!("conv_scale_{i:05}").into();
        body["data"]["metadata"]["phone_call"]["external_number"] = format!("+1555{i:07}").into();
        let body = serde_json::to_vec(&body).unwrap();
        let signature =
            elaaoms_ingest::signature::sign(SECRET, chrono::Utc::now().timestamp(), &body);
        let response = client
            .post(&webhook_url)
            .header("elevenlabs-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // Halfway, one extractor and one indexer die without warning.
    let deadline = Instant::now() + Duration::from_secs(900);
    while completed(&database).await < (transcripts / 2) as i64 {
        assert!(
            Instant::now() < deadline,
            "half the transcripts not done in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if workers_per_kind > 1 {
        for kind in ["extractor", "indexer"] {
            let (_, child) = workers
                .children
                .iter_mut()
                .find(|(k, _)| k == kind)
                .unwrap();
            child.kill().expect("SIGKILL a worker");
            child.wait().unwrap();
        }
    }
    while completed(&database).await < transcripts as i64 {
        assert!(
            Instant::now() < deadline,
            "not every transcript completed in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{transcripts} transcripts with {workers_per_kind} extractor(s) and {workers_per_kind} indexer(s): {:.1} s, {:.1} transcripts/s",
        elapsed.as_secs_f64(),
        transcripts as f64 / elapsed.as_secs_f64()
    );

    let applied: Vec<(i64, i64)> =
        sqlx::query_as("SELECT count(*), count(DISTINCT conversation_id) FROM applied_extractions")
            .fetch_all(&database.admin_pool)
            .await
            .unwrap();
    assert_eq!(
        applied,
        vec![(transcripts as i64, transcripts as i64)],
        "each extraction applied once"
    );
    let duplicated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT caller_id, content FROM memories GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&database.admin_pool)
    .await
    .unwrap();
    assert_eq!(duplicated, 0, "no memory stored twice");
    let created_sources: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT memory_id FROM memory_sources WHERE kind = 'created' GROUP BY 1 HAVING count(*) <> 1) s",
    )
    .fetch_one(&database.admin_pool)
    .await
    .unwrap();
    assert_eq!(created_sources, 0, "every memory was created exactly once");
    let callers_counted: i64 = sqlx::query_scalar("SELECT sum(total_conversations) FROM callers")
        .fetch_one(&database.admin_pool)
        .await
        .unwrap();
    assert_eq!(callers_counted, transcripts as i64);

    drop(workers);
    shutdown.cancel();
    ingest_task.await.unwrap().unwrap();
    bus.cleanup().await;
}
