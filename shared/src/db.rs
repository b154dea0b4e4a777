//! Postgres: the services' pool, the admin pool, migrations, roles and the
//! one way to touch tenant data (an organization-scoped transaction).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The role that holds the services' privileges; login roles are members.
pub const SERVICE_GROUP_ROLE: &str = "elaaoms_service";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    #[error("cannot connect to Postgres at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "the services' database role `{role}` is a superuser or has BYPASSRLS, which would \
         switch off row-level security; point DATABASE_URL at a plain role (see README)"
    )]
    PrivilegedServiceRole { role: String },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

/// Where a URL points, without its password, for error messages and logs.
pub fn describe_url(url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(parsed) => format!(
            "{}@{}:{}{}",
            parsed.username(),
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(5432),
            parsed.path()
        ),
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

fn connect_options(url: &SecretString) -> Result<PgConnectOptions, DbError> {
    url.expose_secret()
        .parse::<PgConnectOptions>()
        .map_err(|err| DbError::InvalidUrl(format!("{}: {err}", describe_url(url))))
}

/// A connection back in the pool for less than this is used without a ping.
///
/// sqlx pings every connection when it comes back to the pool (which also
/// sends a dropped transaction's ROLLBACK), and by default pings it again
/// when it is taken out: one more round trip on every request's path, for
/// a connection that was proven alive a few milliseconds before. Only
/// connections idle for longer are pinged on acquire; one that Postgres
/// closed meanwhile is then replaced, not handed to a request.
pub const PING_CONNECTIONS_IDLE_FOR: Duration = Duration::from_secs(1);

async fn connect(url: &SecretString, max_connections: u32) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|connection, metadata| {
            Box::pin(async move {
                if metadata.idle_for >= PING_CONNECTIONS_IDLE_FOR {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        })
        .connect_with(connect_options(url)?)
        .await
        .map_err(|source| DbError::Connect {
            target: describe_url(url),
            source,
        })
}

/// The services' pool. Refuses a role that would bypass row-level security:
/// superusers and BYPASSRLS roles ignore every policy, even `FORCE`d ones.
pub async fn connect_service_pool(
    url: &SecretString,
    max_connections: u32,
) -> Result<PgPool, DbError> {
    let pool = connect(url, max_connections).await?;
    let (role, privileged): (String, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&pool)
    .await?;
    if privileged {
        return Err(DbError::PrivilegedServiceRole { role });
    }
    Ok(pool)
}

/// The admin pool, for migrations and operator commands.
pub async fn connect_admin_pool(url: &SecretString) -> Result<PgPool, DbError> {
    connect(url, 2).await
}

/// Creates the admin URL's database when it does not exist yet, by way of
/// the server's `postgres` database.
pub async fn ensure_database_exists(admin_url: &SecretString) -> Result<(), DbError> {
    let options = connect_options(admin_url)?;
    let Some(database) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let maintenance = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.database("postgres"))
        .await
        .map_err(|source| DbError::Connect {
            target: describe_url(admin_url),
            source,
        })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&maintenance)
            .await?;
    if !exists {
        let create: String = sqlx::query_scalar("SELECT format('CREATE DATABASE %I', $1::text)")
            .bind(&database)
            .fetch_one(&maintenance)
            .await?;
        match sqlx::query(AssertSqlSafe(create))
            .execute(&maintenance)
            .await
        {
            Ok(_) => tracing::info!(database, "created database"),
            // Another process created it at the same moment.
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => {}
            Err(err) => return Err(err.into()),
        }
    }
    maintenance.close().await;
    Ok(())
}

/// Applies the migrations with the admin pool; a second run changes nothing.
pub async fn migrate(admin_pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(admin_pool).await?;
    Ok(())
}

/// Makes DATABASE_URL's user a login role that is a member of the service
/// group role (creating it with the URL's password when it does not exist).
/// Roles are cluster-wide, so a concurrent creation is tolerated.
pub async fn ensure_service_login_role(
    admin_pool: &PgPool,
    service_url: &SecretString,
) -> Result<(), DbError> {
    let parsed = url::Url::parse(service_url.expose_secret())
        .map_err(|err| DbError::InvalidUrl(format!("DATABASE_URL: {err}")))?;
    let user = percent_decode(parsed.username());
    if user.is_empty() {
        return Err(DbError::InvalidUrl(
            "DATABASE_URL has no user name".to_owned(),
        ));
    }
    let password = parsed.password().map(percent_decode);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(&user)
            .fetch_one(admin_pool)
            .await?;
    if !exists {
        // Identifiers and literals cannot be bound; format() quotes them.
        let create: String = sqlx::query_scalar(
            "SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD %L', $1::text, $2::text)",
        )
        .bind(&user)
        .bind(password.as_deref())
        .fetch_one(admin_pool)
        .await?;
        match sqlx::query(AssertSqlSafe(create)).execute(admin_pool).await {
            Ok(_) => tracing::info!(role = user, "created the services' login role"),
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42710") => {}
            Err(err) => return Err(err.into()),
        }
    }
    let grant: String = sqlx::query_scalar("SELECT format('GRANT %I TO %I', $1::text, $2::text)")
        .bind(SERVICE_GROUP_ROLE)
        .bind(&user)
        .fetch_one(admin_pool)
        .await?;
    sqlx::query(AssertSqlSafe(grant))
        .execute(admin_pool)
        .await?;
    Ok(())
}

fn percent_decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned()
}

/// Opens a READ COMMITTED transaction scoped to one organization: row-level
/// security lets it see and write that organization's rows only. The setting
/// is transaction-local, so the pooled connection forgets it at commit or
/// rollback. All tenant data goes through here.
pub async fn begin_org_tx(
    pool: &PgPool,
    organization_id: Uuid,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    // BEGIN and the scope in one round trip (the simple-query protocol runs
    // them all). The id is a `Uuid`, formatted by us: nothing to escape.
    //
    // Generic plans: every tenant statement is anchored on an organization
    // and (nearly always) a caller, so the plan does not depend on their
    // values, while planning it anew for each execution cost more than
    // running it (measured: 0.9 ms planning against 0.1 ms execution for
    // the pre-call context at 1M memories). Search's generic plan is
    // asserted in query/tests/search.rs.
    pool.begin_with(AssertSqlSafe(format!(
        "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
         SELECT set_config('app.organization_id', '{organization_id}', true)"
    )))
    .await
}

/// Ends a transaction that only read: it is dropped, not committed. sqlx
/// then queues a ROLLBACK that goes out with the ping it sends anyway when
/// the connection returns to the pool, in the background, so the request
/// does not wait a round trip for a COMMIT that would change nothing. The
/// organization scope is transaction-local and ends with it either way.
pub fn end_read_only(tx: Transaction<'static, Postgres>) {
    drop(tx);
}

/// `SELECT 1`, for readiness probes.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// Moves a conversation to `next` if, and only if, the status machine allows
/// it from its current status (`WHERE status = ANY(allowed)`; the table's
/// trigger enforces the same rule). A replay also bumps the generation.
/// Returns whether the row changed.
pub async fn transition_conversation(
    tx: &mut Transaction<'_, Postgres>,
    organization_id: Uuid,
    conversation_id: &str,
    next: crate::domain::ConversationStatus,
    kind: crate::domain::TransitionKind,
) -> Result<bool, sqlx::Error> {
    use crate::domain::{ConversationStatus, TransitionKind};
    let allowed: Vec<&str> = ConversationStatus::allowed_predecessors(next, kind)
        .into_iter()
        .map(ConversationStatus::as_str)
        .collect();
    let generation_step = i32::from(kind == TransitionKind::Replay);
    let result = sqlx::query(
        "UPDATE conversations SET status = $3, generation = generation + $4
          WHERE organization_id = $1 AND conversation_id = $2 AND status = ANY($5)",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .bind(next.as_str())
    .bind(generation_step)
    .bind(&allowed)
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// How an erased caller is remembered: a hash, not the number itself.
pub fn caller_hash(caller_id: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(caller_id.as_bytes()).to_vec()
}

/// Whether the caller was erased after a conversation that started at
/// `conversation_started_at` (`None`: erased at any time). Workers check this
/// before applying anything, so events in flight during an erasure bring
/// nothing back; a caller who calls again after being erased starts afresh.
pub async fn is_caller_erased(
    tx: &mut Transaction<'_, Postgres>,
    organization_id: Uuid,
    caller_id: &str,
    conversation_started_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM erased_callers
                         WHERE organization_id = $1 AND caller_hash = $2
                           AND ($3::timestamptz IS NULL OR erased_at >= $3))",
    )
    .bind(organization_id)
    .bind(caller_hash(caller_id))
    .bind(conversation_started_at)
    .fetch_one(&mut **tx)
    .await
}
