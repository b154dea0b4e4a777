//! `elaaoms backfill --org X --since T`: ingest the conversations ElevenLabs
//! has that we never received (a webhook lost while we were down, or sent
//! before webhooks were configured). The work is in
//! `elaaoms_ingest::backfill`; this parses arguments and prints the result.

use anyhow::{Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use elaaoms_shared::bus::Bus;
use elaaoms_shared::config::{parse_secret, BusConfig, DatabaseConfig, PayloadStoreConfig};
use elaaoms_shared::payload_store::PayloadStore;
use secrecy::SecretString;

#[derive(clap::Args, Debug)]
pub struct BackfillArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    bus: BusConfig,
    #[command(flatten)]
    payloads: PayloadStoreConfig,
    /// Organization slug.
    #[arg(id = "backfill_org", long = "org")]
    org: String,
    /// Conversations started at or after this time: RFC 3339 or YYYY-MM-DD (UTC).
    #[arg(id = "backfill_since", long = "since", value_parser = parse_since)]
    since: DateTime<Utc>,
    /// Only this ElevenLabs agent's conversations (default: every agent the API key sees).
    #[arg(id = "backfill_agent", long = "agent-id")]
    agent_id: Option<String>,
    /// The organization's ElevenLabs API key (conversations read access).
    #[arg(
        id = "backfill_api_key",
        long = "elevenlabs-api-key",
        env = "ELEVENLABS_API_KEY",
        value_parser = parse_secret,
        hide_env_values = true
    )]
    api_key: SecretString,
    /// ElevenLabs API base URL.
    #[arg(
        id = "backfill_base_url",
        long = "elevenlabs-base-url",
        env = "ELEVENLABS_BASE_URL",
        default_value = elaaoms_ingest::backfill::DEFAULT_BASE_URL
    )]
    base_url: String,
    /// Dynamic variable naming a web call's caller (as ingest's setting).
    #[arg(
        id = "backfill_web_caller_id_variable",
        long = "web-caller-id-variable",
        env = "WEB_CALLER_ID_VARIABLE",
        default_value = elaaoms_ingest::webhook::DEFAULT_WEB_CALLER_VARIABLE
    )]
    web_caller_id_variable: String,
}

fn parse_since(value: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map(|date| {
            date.and_hms_opt(0, 0, 0)
                .expect("midnight exists")
                .and_utc()
        })
        .map_err(|_| format!("`{value}` is not a time like 2025-11-01 or 2025-11-01T12:00:00Z"))
}

pub async fn backfill(args: BackfillArgs) -> Result<()> {
    let pool = elaaoms_shared::db::connect_service_pool(&args.database.database_url, 2)
        .await
        .context("connecting to Postgres")?;
    let bus = Bus::connect(&args.bus)
        .await
        .context("connecting to NATS")?;
    bus.ensure_streams().await.context("setting up streams")?;
    let payloads = PayloadStore::from_config(&args.payloads)
        .await
        .context("opening the payload store")?;
    let client = elaaoms_ingest::backfill::ElevenLabsClient::new(&args.base_url, args.api_key)?;
    let parse_options = elaaoms_ingest::webhook::ParseOptions {
        web_caller_variable: args.web_caller_id_variable,
    };
    let report = elaaoms_ingest::backfill::Backfill {
        pool: &pool,
        bus: &bus,
        payloads: &payloads,
        client: &client,
        parse_options: &parse_options,
    }
    .run(&args.org, args.agent_id.as_deref(), args.since)
    .await
    .context("backfill")?;
    println!(
        "listed {}, already received {}, ingested {}, not finished yet {}, without caller {}, refused {}",
        report.listed,
        report.already_present,
        report.ingested.len(),
        report.not_done,
        report.without_caller,
        report.invalid
    );
    for conversation_id in &report.ingested {
        println!("  ingested {conversation_id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn since_takes_dates_and_rfc3339() {
        assert_eq!(
            super::parse_since("2025-11-01").unwrap().timestamp(),
            1_761_955_200
        );
        assert_eq!(
            super::parse_since("2025-11-01T01:00:00+01:00")
                .unwrap()
                .timestamp(),
            1_761_955_200
        );
        assert!(super::parse_since("last week").is_err());
    }
}
