//! The operator's commands: migrations, organizations, API keys and the demo.
//! They use the admin role (`DATABASE_ADMIN_URL`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use elaaoms_shared::api_keys::{display_prefix, generate_api_key, hash_api_key};
use elaaoms_shared::config::{parse_secret, AdminDatabaseConfig, DatabaseConfig};
use elaaoms_shared::db;
use elaaoms_shared::domain::OrganizationSlug;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[command(flatten)]
    database: DatabaseConfig,
}

pub async fn migrate(args: MigrateArgs) -> Result<()> {
    db::ensure_database_exists(&args.admin.database_admin_url).await?;
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    db::migrate(&admin).await?;
    db::ensure_service_login_role(&admin, &args.database.database_url).await?;
    println!(
        "migrations applied to {}; services connect as {}",
        db::describe_url(&args.admin.database_admin_url),
        db::describe_url(&args.database.database_url)
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct OrgArgs {
    #[command(subcommand)]
    command: OrgCommand,
}

#[derive(clap::Subcommand, Debug)]
enum OrgCommand {
    /// Create an organization; prints its first API key once.
    Create(OrgCreateArgs),
    /// Issue (or rotate) the secret of the ElevenLabs agent endpoints (the
    /// conversation-initiation webhook and the server tool's
    /// `X-Elaaoms-Secret` header); printed once, only its hash is stored.
    AgentSecret(OrgAgentSecretArgs),
    /// Set the values the initiation webhook sends for the agent's own
    /// dynamic variables (a JSON object of strings, numbers and booleans).
    AgentDefaults(OrgAgentDefaultsArgs),
}

#[derive(clap::Args, Debug)]
struct OrgAgentSecretArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[arg(long)]
    slug: String,
}

#[derive(clap::Args, Debug)]
struct OrgAgentDefaultsArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[arg(long)]
    slug: String,
    /// e.g. '{"business_name": "Crumb & Hearth", "loyalty_points": 0}'
    #[arg(long)]
    json: String,
}

#[derive(clap::Args, Debug)]
struct OrgCreateArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    /// URL-safe name used in the webhook URL.
    #[arg(long)]
    slug: String,
    #[arg(long)]
    name: Option<String>,
    /// The webhook secret configured in ElevenLabs (at least 32 bytes).
    #[arg(long, env = "ELAAOMS_HMAC_SECRET", value_parser = parse_secret, hide_env_values = true)]
    hmac_secret: SecretString,
    /// Succeed without changes when the organization exists.
    #[arg(long)]
    if_not_exists: bool,
}

pub async fn org(args: OrgArgs) -> Result<()> {
    match args.command {
        OrgCommand::AgentSecret(args) => {
            let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
            let id = organization_id(&admin, &args.slug).await?;
            let secret = elaaoms_query::generate_agent_secret();
            sqlx::query("UPDATE organizations SET agent_secret_hash = $2 WHERE id = $1")
                .bind(id)
                .bind(elaaoms_query::hash_agent_secret(&secret))
                .execute(&admin)
                .await?;
            println!(
                "agent secret of {} (shown once; the previous one stops working):",
                args.slug
            );
            println!("{secret}");
            println!("send it as the `X-Elaaoms-Secret` header (docs/elevenlabs-setup.md)");
            Ok(())
        }
        OrgCommand::AgentDefaults(args) => {
            let defaults: serde_json::Value =
                serde_json::from_str(&args.json).context("--json is not valid JSON")?;
            let Some(object) = defaults.as_object() else {
                bail!("--json must be a JSON object");
            };
            if let Some((name, _)) = object
                .iter()
                .find(|(_, value)| !(value.is_string() || value.is_number() || value.is_boolean()))
            {
                bail!("{name}: ElevenLabs accepts only strings, numbers and booleans");
            }
            let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
            let id = organization_id(&admin, &args.slug).await?;
            sqlx::query("UPDATE organizations SET dynamic_variable_defaults = $2 WHERE id = $1")
                .bind(id)
                .bind(&defaults)
                .execute(&admin)
                .await?;
            println!(
                "dynamic-variable defaults of {} set ({} variables)",
                args.slug,
                object.len()
            );
            Ok(())
        }
        OrgCommand::Create(args) => {
            let slug = OrganizationSlug::new(args.slug)?;
            if args.hmac_secret.expose_secret().len() < 32 {
                bail!("the webhook HMAC secret must be at least 32 bytes");
            }
            let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
            let existing: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM organizations WHERE slug = $1")
                    .bind(slug.as_str())
                    .fetch_optional(&admin)
                    .await?;
            if let Some(id) = existing {
                if args.if_not_exists {
                    println!("organization {slug} exists ({id}); nothing changed");
                    return Ok(());
                }
                bail!("organization {slug} exists already");
            }
            let id: Uuid = sqlx::query_scalar(
                "INSERT INTO organizations (slug, name, hmac_secret) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(slug.as_str())
            .bind(args.name.as_deref().unwrap_or(slug.as_str()))
            .bind(args.hmac_secret.expose_secret())
            .fetch_one(&admin)
            .await?;
            let key = create_api_key(&admin, id, "default").await?;
            println!("created organization {slug} ({id})");
            println!("API key (shown once, store it now): {key}");
            Ok(())
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ApiKeyArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[command(subcommand)]
    command: ApiKeyCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ApiKeyCommand {
    /// Create a key; it is printed once and only its hash is stored.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// List an organization's keys (prefixes only).
    List {
        #[arg(long)]
        org: String,
    },
    /// Revoke a key by id.
    Revoke {
        #[arg(long)]
        id: Uuid,
    },
}

/// id, name, prefix, created at, revoked at.
type ApiKeyRow = (
    Uuid,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

async fn organization_id(admin: &PgPool, slug: &str) -> Result<Uuid> {
    sqlx::query_scalar("SELECT id FROM organizations WHERE slug = $1")
        .bind(slug)
        .fetch_optional(admin)
        .await?
        .with_context(|| format!("no organization {slug}"))
}

/// The organizations an operator command works on: the one named (slug or
/// id), or all of them in slug order; an unknown name is an error.
pub async fn organizations(admin: &PgPool, org: Option<&str>) -> Result<Vec<(Uuid, String)>> {
    let organizations: Vec<(Uuid, String)> = match org {
        Some(org) => {
            sqlx::query_as("SELECT id, slug FROM organizations WHERE slug = $1 OR id::text = $1")
                .bind(org)
                .fetch_all(admin)
                .await?
        }
        None => {
            sqlx::query_as("SELECT id, slug FROM organizations ORDER BY slug")
                .fetch_all(admin)
                .await?
        }
    };
    if let Some(org) = org {
        anyhow::ensure!(!organizations.is_empty(), "no organization `{org}`");
    }
    Ok(organizations)
}

async fn create_api_key(admin: &PgPool, organization_id: Uuid, name: &str) -> Result<String> {
    let key = generate_api_key();
    sqlx::query("INSERT INTO api_keys (organization_id, name, key_hash, key_prefix) VALUES ($1, $2, $3, $4)")
        .bind(organization_id)
        .bind(name)
        .bind(hash_api_key(&key))
        .bind(display_prefix(&key))
        .execute(admin)
        .await?;
    Ok(key)
}

pub async fn apikey(args: ApiKeyArgs) -> Result<()> {
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    match args.command {
        ApiKeyCommand::Create { org, name } => {
            let id = organization_id(&admin, &org).await?;
            let key = create_api_key(&admin, id, &name).await?;
            println!("API key (shown once, store it now): {key}");
        }
        ApiKeyCommand::List { org } => {
            let id = organization_id(&admin, &org).await?;
            let keys: Vec<ApiKeyRow> = sqlx::query_as(
                "SELECT id, name, key_prefix, created_at, revoked_at FROM api_keys
                      WHERE organization_id = $1 ORDER BY created_at",
            )
            .bind(id)
            .fetch_all(&admin)
            .await?;
            for (id, name, prefix, created, revoked) in keys {
                let state = revoked.map_or("active".to_owned(), |at| format!("revoked {at}"));
                println!("{id}  {prefix}…  {name}  created {created}  {state}");
            }
        }
        ApiKeyCommand::Revoke { id } => {
            let revoked = sqlx::query(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .execute(&admin)
            .await?
            .rows_affected();
            if revoked == 0 {
                bail!("no active key {id}");
            }
            // The query service trusts a key it has checked for
            // API_KEY_CACHE_TTL, so say when revocation is complete.
            println!("revoked {id}: refused by every query service within API_KEY_CACHE_TTL (default 10s)");
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    /// The running ingest service.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest_url: String,
    /// The running query service.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    query_url: String,
    /// Organization of the bundled fixtures.
    #[arg(long, default_value = "fixture-org-a")]
    org: String,
    /// Its webhook secret (the fixtures' README).
    #[arg(long, default_value = "whsec_fixture_0123456789abcdef0123456789abcdef", value_parser = parse_secret)]
    secret: SecretString,
    /// The transcript to send.
    #[arg(
        long,
        default_value = "tests/fixtures/elevenlabs/post_call_transcription_bakery_maya_2025-11-03.json"
    )]
    fixture: PathBuf,
    /// What to search for afterwards.
    #[arg(long, default_value = "Does anyone in the family have a food allergy?")]
    query: String,
}

/// Signs and posts a fixture as ElevenLabs would, waits until the pipeline
/// has indexed it, and prints what a search finds.
pub async fn demo(args: DemoArgs) -> Result<()> {
    let body = std::fs::read(&args.fixture)
        .with_context(|| format!("reading {}", args.fixture.display()))?;
    let fixture: serde_json::Value =
        serde_json::from_slice(&body).context("the fixture is not JSON")?;
    let caller_id = fixture["data"]["metadata"]["phone_call"]["external_number"]
        .as_str()
        .context("the fixture has no data.metadata.phone_call.external_number")?
        .to_owned();
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    let organization = organization_id(&admin, &args.org)
        .await
        .context("create it first: elaaoms org create --slug fixture-org-a --if-not-exists")?;
    let api_key = create_api_key(&admin, organization, "demo").await?;

    let http = reqwest::Client::new();
    let signature = elaaoms_ingest::signature::sign(
        args.secret.expose_secret(),
        chrono::Utc::now().timestamp(),
        &body,
    );
    let webhook_url = format!("{}/v1/webhooks/elevenlabs/{}", args.ingest_url, args.org);
    let response = http
        .post(&webhook_url)
        .header("content-type", "application/json")
        .header("elevenlabs-signature", signature)
        .body(body)
        .send()
        .await
        .with_context(|| format!("posting to {webhook_url}: is `elaaoms run` running?"))?;
    println!("POST {webhook_url} -> {}", response.status());
    if !response.status().is_success() {
        bail!(
            "ingest refused the webhook: {}",
            response.text().await.unwrap_or_default()
        );
    }

    let search = serde_json::json!({
        "query_text": args.query,
        "caller_id": caller_id,
        "search_all_agents": true,
        "relevance_threshold": 0.3,
        "result_limit": 5,
    });
    let started = Instant::now();
    loop {
        let response = http
            .post(format!("{}/v1/search", args.query_url))
            .bearer_auth(&api_key)
            .json(&search)
            .send()
            .await
            .context("searching")?;
        let found: serde_json::Value =
            response.json().await.context("reading the search result")?;
        let results = found["results"].as_array().cloned().unwrap_or_default();
        if !results.is_empty() {
            println!("search {:?} for caller {caller_id}:", args.query);
            for result in results {
                println!(
                    "  {:.3}  [{} {}]  {}",
                    result["score"].as_f64().unwrap_or_default(),
                    result["type"].as_str().unwrap_or_default(),
                    result["importance"],
                    result["content"].as_str().unwrap_or_default()
                );
            }
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("nothing searchable after 60 s: check the services' logs");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
