//! `elaaoms bench`: measurements for BENCHMARKS.md. Each scenario runs the
//! real services in this process against a database of its own
//! (`elaaoms_bench`, recreated each run) and streams of its own (namespace
//! `bench`), and measures a baseline in the same run so the numbers can be
//! compared on any machine.
//!
//! Load is open-loop: requests are started on a fixed schedule and latency
//! is measured from the scheduled start, so a slow server cannot hide its
//! latency by slowing the generator down (no coordinated omission).

mod indexer;
mod ingest;
mod pipeline;
mod search;
mod stub_llm;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use elaaoms_shared::config::{
    AdminDatabaseConfig, BusConfig, DatabaseConfig, EmbeddingConfig, PayloadStoreConfig,
};
use elaaoms_shared::db;
use elaaoms_shared::domain::TranscriptTurn;
use elaaoms_shared::embedder::{Embedder, EmbeddingProviderConfig};
use hdrhistogram::Histogram;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Subcommand, Debug)]
enum Scenario {
    /// Webhooks answered per second and their latency, against raw
    /// JetStream publishing and publish + one Postgres commit.
    Ingest(ingest::IngestBenchArgs),
    /// Webhook to searchable memories: latency per transcript and sustained
    /// transcripts per second, with the rules extractor or a stub LLM.
    Pipeline(pipeline::PipelineBenchArgs),
    /// Search latency at a given number of memories, against the same SQL
    /// issued directly and the embedding alone.
    Search(search::SearchBenchArgs),
    /// Memories embedded and stored per second, one batch and transaction
    /// per extraction against one per memory.
    Indexer(indexer::IndexerBenchArgs),
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    match args.scenario {
        Scenario::Ingest(args) => ingest::run(args).await,
        Scenario::Pipeline(args) => pipeline::run(args).await,
        Scenario::Search(args) => search::run(args).await,
        Scenario::Indexer(args) => indexer::run(args).await,
    }
}

/// Where a benchmark runs: the servers of the normal configuration, with a
/// database and streams of the benchmark's own.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchEnvArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    bus: BusConfig,
    #[command(flatten)]
    embedding: EmbeddingConfig,
    #[command(flatten)]
    embedding_provider: EmbeddingProviderConfig,
    /// The benchmark's database, dropped and recreated by every run (the
    /// smoke tests give each run its own).
    #[arg(
        id = "bench_database",
        long = "bench-database",
        default_value = "elaaoms_bench"
    )]
    bench_database: String,
    /// The benchmark's stream namespace, whose streams every run deletes.
    #[arg(
        id = "bench_namespace",
        long = "bench-namespace",
        default_value = "bench"
    )]
    bench_namespace: String,
}

pub struct BenchEnv {
    pub admin_pool: PgPool,
    pub service_url: SecretString,
    pub pool: PgPool,
    pub bus_config: BusConfig,
    pub organization_id: Uuid,
    pub embedding: EmbeddingConfig,
    embedding_provider: EmbeddingProviderConfig,
    /// On the real disk (not a tmpfs), so ingest's fsyncs cost what they
    /// cost in production; removed by [`BenchEnv::remove_payloads`].
    pub payload_dir: PathBuf,
}

pub const BENCH_SLUG: &str = "bench-org";
pub const BENCH_SECRET: &str = "whsec_bench_0123456789abcdef0123456789abcdef";

/// Replaces the database name in a Postgres URL.
fn with_database(url: &SecretString, database: &str) -> Result<SecretString> {
    let mut parsed = url::Url::parse(url.expose_secret()).context("parsing a database URL")?;
    parsed.set_path(database);
    Ok(SecretString::from(parsed.to_string()))
}

impl BenchEnv {
    /// Recreates the benchmark database, migrates it, creates the
    /// organization, and deletes the benchmark streams.
    pub async fn prepare(args: &BenchEnvArgs) -> Result<Self> {
        let database = &args.bench_database;
        // It goes into SQL text: a plain identifier only.
        anyhow::ensure!(
            !database.is_empty()
                && database
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "--bench-database must be lowercase letters, digits and underscores"
        );
        let admin_url = with_database(&args.admin.database_admin_url, database)?;
        let service_url = with_database(&args.database.database_url, database)?;
        let maintenance =
            db::connect_admin_pool(&with_database(&args.admin.database_admin_url, "postgres")?)
                .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
        )))
        .execute(&maintenance)
        .await?;
        maintenance.close().await;
        db::ensure_database_exists(&admin_url).await?;
        let admin_pool = db::connect_admin_pool(&admin_url).await?;
        db::migrate(&admin_pool).await?;
        db::ensure_service_login_role(&admin_pool, &service_url).await?;
        let organization_id: Uuid = sqlx::query_scalar(
            "INSERT INTO organizations (slug, name, hmac_secret) VALUES ($1, $1, $2) RETURNING id",
        )
        .bind(BENCH_SLUG)
        .bind(BENCH_SECRET)
        .fetch_one(&admin_pool)
        .await?;
        let pool = db::connect_service_pool(&service_url, 16).await?;

        let bus_config = BusConfig {
            bus_namespace: args.bench_namespace.clone(),
            ..args.bus.clone()
        };
        let bus = elaaoms_shared::bus::Bus::connect(&bus_config).await?;
        for stream in [bus.names.event_stream(), bus.names.dlq_stream()] {
            let _ = bus.jetstream.delete_stream(&stream).await;
        }
        let payload_dir = PathBuf::from(format!("data/bench/{}", args.bench_namespace));
        let _ = std::fs::remove_dir_all(&payload_dir);
        Ok(Self {
            admin_pool,
            service_url,
            pool,
            bus_config,
            organization_id,
            embedding: args.embedding.clone(),
            embedding_provider: args.embedding_provider.clone(),
            payload_dir,
        })
    }

    /// The embedder the services would use (`EMBEDDING_PROVIDER`).
    pub fn embedder(&self) -> Result<Embedder> {
        crate::load_embedder(&self.embedding, &self.embedding_provider)
    }

    pub fn database_config(&self, max_connections: u32) -> DatabaseConfig {
        DatabaseConfig {
            database_url: self.service_url.clone(),
            database_max_connections: max_connections,
        }
    }

    pub fn payload_config(&self) -> PayloadStoreConfig {
        PayloadStoreConfig {
            payload_dir: self.payload_dir.clone(),
            payload_store_url: None,
        }
    }

    pub fn remove_payloads(&self) {
        let _ = std::fs::remove_dir_all(&self.payload_dir);
    }

    /// An API key of the benchmark organization, for the query service.
    pub async fn create_api_key(&self) -> Result<String> {
        let api_key = elaaoms_shared::api_keys::generate_api_key();
        sqlx::query("INSERT INTO api_keys (organization_id, name, key_hash, key_prefix) VALUES ($1, 'bench', $2, 'bench')")
            .bind(self.organization_id)
            .bind(elaaoms_shared::api_keys::hash_api_key(&api_key))
            .execute(&self.admin_pool)
            .await?;
        Ok(api_key)
    }
}

/// A service running on its own task until the shutdown token is cancelled.
pub type ServiceTask = JoinHandle<Result<()>>;

fn spawn_service<E>(
    name: &'static str,
    run: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> ServiceTask
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::spawn(async move { run.await.context(name) })
}

/// Starts ingest on a free port; returns the benchmark organization's
/// webhook URL.
pub async fn start_ingest(
    env: &BenchEnv,
    shutdown: CancellationToken,
) -> Result<(String, ServiceTask)> {
    let service = elaaoms_ingest::IngestService::build(elaaoms_ingest::Config {
        database: env.database_config(16),
        bus: env.bus_config.clone(),
        payloads: env.payload_config(),
        settings: elaaoms_ingest::IngestSettings {
            addr: "127.0.0.1:0".parse().expect("valid address"),
            signature_tolerance: Duration::from_secs(1800),
            max_body_bytes: 64 << 20,
            outbox_relay_interval: Duration::from_secs(5),
            ..elaaoms_ingest::IngestSettings::default()
        },
    })
    .await?;
    let webhook_url = format!(
        "http://{}/v1/webhooks/elevenlabs/{BENCH_SLUG}",
        service.local_addr()
    );
    Ok((webhook_url, spawn_service("ingest", service.run(shutdown))))
}

/// Starts the query service on a free port; returns its base URL.
pub async fn start_query(
    env: &BenchEnv,
    embedder: Embedder,
    shutdown: CancellationToken,
) -> Result<(String, ServiceTask)> {
    let service = elaaoms_query::QueryService::build(
        elaaoms_query::Config {
            database: env.database_config(8),
            // Search touches neither the bus nor the payload store (only
            // erasure does); the query service still needs both configured.
            bus: env.bus_config.clone(),
            payloads: env.payload_config(),
            embedding: env.embedding.clone(),
            settings: elaaoms_query::QuerySettings {
                addr: "127.0.0.1:0".parse().expect("valid address"),
                init_deadline: Duration::from_millis(300),
                caller_token_ttl: Duration::from_secs(3600),
                // Each query text is new, so the cache never answers; keep
                // it at the production size anyway.
                embedding_cache_entries: 1000,
                api_key_cache_ttl: Duration::from_secs(10),
            },
        },
        embedder,
    )
    .await?;
    let base_url = format!("http://{}", service.local_addr());
    Ok((base_url, spawn_service("query", service.run(shutdown))))
}

/// The bundled post-call transcripts.
const FIXTURES: [&str; 4] = [
    "post_call_transcription_bakery_maya_2025-11-03.json",
    "post_call_transcription_bakery_maya_2025-11-20.json",
    "post_call_transcription_dental_priya_2025-11-12.json",
    "post_call_transcription_telecom_tom_2025-11-18.json",
];

fn fixture_files() -> Result<Vec<Vec<u8>>> {
    FIXTURES
        .iter()
        .map(|name| {
            let path = format!("tests/fixtures/elevenlabs/{name}");
            std::fs::read(&path)
                .with_context(|| format!("reading {path} (run from the repository root)"))
        })
        .collect()
}

/// The fixtures' transcripts, normalised as ingest normalises them.
pub fn fixture_transcripts() -> Result<Vec<Vec<TranscriptTurn>>> {
    fixture_files()?
        .iter()
        .map(|body| Ok(elaaoms_shared::transcript::turns_of_payload(body)?))
        .collect()
}

/// Conversation `i` of a run.
pub fn conversation_id(i: u64) -> String {
    format!("conv_bench_{i:08}")
}

/// Webhook bodies: the fixtures in turn, each with a conversation id of its
/// own ([`conversation_id`]) and, with `own_callers`, a caller of its own
/// (a new caller has nothing to deduplicate against, as in the scaling run).
pub fn webhook_bodies(count: u64, own_callers: bool) -> Result<Vec<Bytes>> {
    let fixtures = fixture_files()?
        .iter()
        .map(|body| Ok(serde_json::from_slice::<serde_json::Value>(body)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((0..count)
        .map(|i| {
            let mut body = fixtures[i as usize % fixtures.len()].clone();
            body["data"]["conversation_id"] = serde_json::Value::String(conversation_id(i));
            if own_callers {
                body["data"]["metadata"]["phone_call"]["external_number"] =
                    serde_json::Value::String(format!("+1555{i:07}"));
            }
            Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"))
        })
        .collect())
}

/// Posts a webhook signed as ElevenLabs signs; true when answered 2xx.
pub async fn post_webhook(client: &reqwest::Client, url: &str, body: Bytes) -> bool {
    let signature =
        elaaoms_ingest::signature::sign(BENCH_SECRET, chrono::Utc::now().timestamp(), &body);
    match client
        .post(url)
        .header("content-type", "application/json")
        .header("elevenlabs-signature", signature)
        .body(body)
        .send()
        .await
    {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

/// Latencies in microseconds, shared by concurrent requests.
#[derive(Clone)]
pub struct Latencies(Arc<Mutex<Histogram<u64>>>);

impl Latencies {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(
            Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
        )))
    }

    pub fn record(&self, elapsed: Duration) {
        let micros = (elapsed.as_micros() as u64).clamp(1, 120_000_000);
        self.0
            .lock()
            .expect("histogram lock")
            .saturating_record(micros);
    }

    /// `p50 / p95 / p99 / max` in milliseconds, and the count.
    pub fn summary(&self) -> Summary {
        let histogram = self.0.lock().expect("histogram lock");
        let ms = |micros: u64| micros as f64 / 1000.0;
        Summary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p95_ms: ms(histogram.value_at_quantile(0.95)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn row(&self, name: &str, seconds: f64, errors: u64) -> String {
        format!(
            "| {name} | {} | {errors} | {:.1} | {:.2} | {:.2} | {:.2} |",
            self.count,
            self.count as f64 / seconds,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

impl Summary {
    /// For requests issued one at a time, where a rate means nothing.
    pub fn latency_row(&self, name: &str) -> String {
        format!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            self.count, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

impl Summary {
    /// [`Summary::row`] with p95, for latencies measured in seconds.
    pub fn percentile_row(&self, name: &str, seconds: f64, errors: u64) -> String {
        format!(
            "| {name} | {} | {errors} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            self.count,
            self.count as f64 / seconds,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

pub const PERCENTILE_TABLE_HEADER: &str =
    "| what | transcripts | errors | per second | p50 ms | p95 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- | --- | --- | --- |";

pub const LATENCY_TABLE_HEADER: &str =
    "| what | requests | p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- |";

pub const TABLE_HEADER: &str =
    "| what | requests | errors | per second | p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- | --- | --- |";

/// Starts `make_request(i, scheduled)` at `rate` per second for `duration`,
/// each on its own task, and records each latency from its scheduled start.
///
/// The schedule is kept by a thread of its own that sleeps to each start,
/// not by a tokio timer: tokio's timers fire on whole milliseconds, which
/// added 0-1 ms of the generator's own lateness to every latency (measured
/// from the scheduled start, as it must be, so that queueing in the system
/// under test shows). A thread's sleep is late by tens of microseconds.
pub async fn open_loop<F, Fut>(
    rate: f64,
    duration: Duration,
    make_request: F,
) -> (Latencies, u64, f64)
where
    F: Fn(u64, Instant) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let latencies = Latencies::new();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let started = Instant::now();
    let (starts, mut due) = tokio::sync::mpsc::unbounded_channel();
    let clock = std::thread::spawn(move || {
        for i in 0..total {
            let scheduled = started + interval * i as u32;
            std::thread::sleep(scheduled.saturating_duration_since(Instant::now()));
            if starts.send((i, scheduled)).is_err() {
                break;
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((i, scheduled)) = due.recv().await {
        let request = make_request(i, scheduled);
        let latencies = latencies.clone();
        let errors = errors.clone();
        tasks.spawn(async move {
            if !request.await {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            latencies.record(scheduled.elapsed());
        });
    }
    clock.join().expect("the open-loop clock thread panicked");
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    (
        latencies,
        errors.load(std::sync::atomic::Ordering::Relaxed),
        seconds,
    )
}

/// Machine facts for the report.
pub fn machine_description() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".to_owned());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    // On a shared virtual machine, time stolen by neighbours shows as CPU
    // pressure with nothing else running here: numbers vary with it.
    let pressure = std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("some"))
                .and_then(|line| line.split_whitespace().find(|f| f.starts_with("avg60=")))
                .map(|field| format!(", CPU pressure {}%", &field["avg60=".len()..]))
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {memory} RAM, {}{pressure}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}
