//! `elaaoms bench`: measurements for BENCHMARKS.md. Each scenario runs the
//! real services in this process against a database of its own
//! (`elaaoms_bench`, recreated each run) and streams of its own (namespace
//! `bench`), and measures a baseline in the same run so the numbers can be
//! compared on any machine.
//!
//! Load is open-loop: requests are started on a fixed schedule and latency
//! is measured from the scheduled start, so a slow server cannot hide its
//! latency by slowing the generator down (no coordinated omission).

mod ingest;
mod search;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use elaaoms_shared::config::{AdminDatabaseConfig, BusConfig, DatabaseConfig, EmbeddingConfig};
use elaaoms_shared::db;
use hdrhistogram::Histogram;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
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
    /// Search latency at a given number of memories, against the same SQL
    /// issued directly and the embedding alone.
    Search(search::SearchBenchArgs),
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    match args.scenario {
        Scenario::Ingest(args) => ingest::run(args).await,
        Scenario::Search(args) => search::run(args).await,
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
}

pub struct BenchEnv {
    pub admin_pool: PgPool,
    pub service_url: SecretString,
    pub pool: PgPool,
    pub bus_config: BusConfig,
    pub organization_id: Uuid,
    pub embedding: EmbeddingConfig,
}

pub const BENCH_SLUG: &str = "bench-org";
pub const BENCH_SECRET: &str = "whsec_bench_0123456789abcdef0123456789abcdef";
const BENCH_DATABASE: &str = "elaaoms_bench";

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
        let admin_url = with_database(&args.admin.database_admin_url, BENCH_DATABASE)?;
        let service_url = with_database(&args.database.database_url, BENCH_DATABASE)?;
        let maintenance =
            db::connect_admin_pool(&with_database(&args.admin.database_admin_url, "postgres")?)
                .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)"
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
            bus_namespace: "bench".to_owned(),
            ..args.bus.clone()
        };
        let bus = elaaoms_shared::bus::Bus::connect(&bus_config).await?;
        for stream in [bus.names.event_stream(), bus.names.dlq_stream()] {
            let _ = bus.jetstream.delete_stream(&stream).await;
        }
        Ok(Self {
            admin_pool,
            service_url,
            pool,
            bus_config,
            organization_id,
            embedding: args.embedding.clone(),
        })
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

    /// `p50 / p99 / max` in milliseconds, and the count.
    pub fn summary(&self) -> Summary {
        let histogram = self.0.lock().expect("histogram lock");
        let ms = |micros: u64| micros as f64 / 1000.0;
        Summary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
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

pub const LATENCY_TABLE_HEADER: &str =
    "| what | requests | p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- |";

pub const TABLE_HEADER: &str =
    "| what | requests | errors | per second | p50 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- | --- | --- |";

/// Starts `make_request(i)` at `rate` per second for `duration`, each on
/// its own task, and records each latency from its scheduled start.
pub async fn open_loop<F, Fut>(
    rate: f64,
    duration: Duration,
    make_request: F,
) -> (Latencies, u64, f64)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let latencies = Latencies::new();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let request = make_request(i);
        let latencies = latencies.clone();
        let errors = errors.clone();
        tasks.spawn(async move {
            if !request.await {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            latencies.record(scheduled.elapsed());
        });
    }
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
    format!(
        "{cores} cores ({cpu}), {memory} RAM, {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}
