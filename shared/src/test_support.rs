//! Helpers for tests against the real Postgres and NATS: every test gets its
//! own database (a copy of a migrated template) and its own stream names.
//!
//! Settings come from `TEST_DATABASE_ADMIN_URL` (default: the local
//! superuser, `postgres://postgres@127.0.0.1:5432/postgres`) and `NATS_URL`.

use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::SecretString;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool};

use crate::bus::Bus;
use crate::config::BusConfig;
use crate::db;

/// The services' login role in tests; created (NOSUPERUSER, NOBYPASSRLS) on
/// first use.
pub const TEST_SERVICE_USER: &str = "elaaoms_test_app";
const TEST_SERVICE_PASSWORD: &str = "elaaoms_test_app";
/// Leftovers of crashed test runs older than this are dropped.
const STALE_AFTER_SECS: u64 = 3600;

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A database of its own for one test, migrated, with a pool for the
/// services' role (row-level security applies) and one for the admin role.
pub struct TestDatabase {
    pub name: String,
    pub service_url: SecretString,
    pub admin_url: SecretString,
    /// Connected as the services' role: what production code gets.
    pub pool: PgPool,
    /// Connected as the admin (superuser): for setup and for inspection.
    pub admin_pool: PgPool,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let server: PgConnectOptions = admin_url().parse().expect("TEST_DATABASE_ADMIN_URL");
        let maintenance = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(server.clone().database("postgres"))
            .await
            .expect("connect to Postgres as admin: is it running? (deploy/local/setup.sh)");
        let template = ensure_template(&maintenance, &server).await;
        let name = format!("elaaoms_test_{}_{}", now_secs(), random_suffix());
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE {template}"
        )))
        .execute(&maintenance)
        .await
        .expect("create test database from template");
        maintenance.close().await;

        let admin_options = server.clone().database(&name);
        let service_options = server
            .clone()
            .database(&name)
            .username(TEST_SERVICE_USER)
            .password(TEST_SERVICE_PASSWORD);
        let admin_url = SecretString::from(admin_options.to_url_lossy().to_string());
        let service_url = SecretString::from(service_options.to_url_lossy().to_string());
        let admin_pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(admin_options)
            .await
            .expect("connect to test database as admin");
        let pool = db::connect_service_pool(&service_url, 5)
            .await
            .expect("connect to test database as the service role");
        Self {
            name,
            service_url,
            admin_url,
            pool,
            admin_pool,
        }
    }

    /// Creates an organization through the admin role, as `elaaoms org
    /// create` does, and returns its id.
    pub async fn create_organization(&self, slug: &str, hmac_secret: &str) -> uuid::Uuid {
        sqlx::query_scalar(
            "INSERT INTO organizations (slug, name, hmac_secret) VALUES ($1, $1, $2) RETURNING id",
        )
        .bind(slug)
        .bind(hmac_secret)
        .fetch_one(&self.admin_pool)
        .await
        .expect("insert organization")
    }
}

/// A template database migrated once per migration set, shared by all tests
/// (and test processes: nextest runs each test in its own process).
async fn ensure_template(maintenance: &PgPool, server: &PgConnectOptions) -> String {
    let mut hasher = Sha256::new();
    for migration in db::MIGRATOR.iter() {
        hasher.update(migration.version.to_le_bytes());
        hasher.update(&migration.checksum);
    }
    let digest = hex::encode(hasher.finalize());
    let template = format!("elaaoms_template_{}", &digest[..16]);

    let mut conn = maintenance.acquire().await.expect("admin connection");
    // One process builds the template; the others wait here.
    sqlx::query("SELECT pg_advisory_lock(7345001)")
        .execute(&mut *conn)
        .await
        .expect("advisory lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut *conn)
            .await
            .expect("look up template");
    if !exists {
        drop_stale_databases(&mut conn).await;
        let building = format!("{template}_building");
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building}")))
            .execute(&mut *conn)
            .await
            .expect("drop half-built template");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {building}")))
            .execute(&mut *conn)
            .await
            .expect("create template database");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(server.clone().database(&building))
            .await
            .expect("connect to template database");
        db::migrate(&admin)
            .await
            .expect("migrate template database");
        let service_url = SecretString::from(
            server
                .clone()
                .username(TEST_SERVICE_USER)
                .password(TEST_SERVICE_PASSWORD)
                .to_url_lossy()
                .to_string(),
        );
        db::ensure_service_login_role(&admin, &service_url)
            .await
            .expect("create the test service role");
        admin.close().await;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE {building} RENAME TO {template}"
        )))
        .execute(&mut *conn)
        .await
        .expect("publish template database");
    }
    sqlx::query("SELECT pg_advisory_unlock(7345001)")
        .execute(&mut *conn)
        .await
        .expect("advisory unlock");
    template
}

/// Test databases outlive crashed tests; drop those older than an hour (and
/// templates of older migration sets, which nothing uses any more).
async fn drop_stale_databases(conn: &mut sqlx::PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'elaaoms\\_test\\_%' OR datname LIKE 'elaaoms\\_template\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap_or_default();
    let cutoff = now_secs().saturating_sub(STALE_AFTER_SECS);
    for name in names {
        let stale = match name.strip_prefix("elaaoms_test_") {
            Some(rest) => rest
                .split('_')
                .next()
                .and_then(|secs| secs.parse::<u64>().ok())
                .is_some_and(|created| created < cutoff),
            None => true,
        };
        if stale {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut *conn)
            .await;
        }
    }
}

/// Streams of their own for one test: a namespace `t{time}{random}`.
pub struct TestBus {
    pub bus: Bus,
    pub config: BusConfig,
}

impl TestBus {
    pub async fn create() -> Self {
        let config = BusConfig {
            nats_url: std::env::var("NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
            bus_namespace: format!("t{}x{}", now_secs(), random_suffix()),
            stream_max_bytes: 64 << 20,
            nats_stream_replicas: 1,
        };
        Self::with_config(config).await
    }

    pub async fn with_config(config: BusConfig) -> Self {
        let bus = Bus::connect(&config)
            .await
            .expect("connect to NATS: is it running? (deploy/local/setup.sh)");
        delete_stale_streams(&bus).await;
        bus.ensure_streams().await.expect("create test streams");
        Self { bus, config }
    }

    /// Deletes this test's streams.
    pub async fn cleanup(&self) {
        for stream in [self.bus.names.event_stream(), self.bus.names.dlq_stream()] {
            let _ = self.bus.jetstream.delete_stream(&stream).await;
        }
    }
}

async fn delete_stale_streams(bus: &Bus) {
    use futures::TryStreamExt;
    let Ok(names) = bus
        .jetstream
        .stream_names()
        .try_collect::<Vec<String>>()
        .await
    else {
        return;
    };
    let cutoff = now_secs().saturating_sub(STALE_AFTER_SECS);
    for name in names {
        let created = name
            .strip_prefix('T')
            .and_then(|rest| rest.split('X').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| created < cutoff) {
            let _ = bus.jetstream.delete_stream(&name).await;
        }
    }
}

/// The admin URL of the test server, for tests that need their own.
pub fn test_admin_url() -> SecretString {
    SecretString::from(admin_url())
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("service_url", &db::describe_url(&self.service_url))
            .finish()
    }
}
