//! `elaaoms replay`: the dead-letter stream for operators (the logic is in
//! `elaaoms_extractor::dlq`). `list` needs only NATS; `run` also moves the
//! conversations back to `extraction_pending` with the admin role.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use elaaoms_extractor::dlq::{self, ReplayFilter, ReplayOutcome};
use elaaoms_shared::bus::Bus;
use elaaoms_shared::config::{AdminDatabaseConfig, BusConfig};
use elaaoms_shared::db;
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(subcommand)]
    command: ReplayCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ReplayCommand {
    /// Show the dead letters: sequence, organization, conversation, reason, attempts, time.
    List {
        #[command(flatten)]
        bus: BusConfig,
    },
    /// Send dead letters back to their original subject with a bumped generation.
    Run(ReplayRunArgs),
}

#[derive(clap::Args, Debug)]
struct ReplayRunArgs {
    #[command(flatten)]
    bus: BusConfig,
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    /// Only this organization's dead letters.
    #[arg(long)]
    org: Option<Uuid>,
    /// Only this conversation's.
    #[arg(long)]
    conversation: Option<String>,
    /// Only those whose reason contains this text (case-insensitive).
    #[arg(long)]
    reason_contains: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Only those dead-lettered before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn replay(args: ReplayArgs) -> Result<()> {
    match args.command {
        ReplayCommand::List { bus } => list(bus).await,
        ReplayCommand::Run(args) => run(args).await,
    }
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

async fn list(config: BusConfig) -> Result<()> {
    let bus = Bus::connect(&config).await.context("connecting to NATS")?;
    let letters = dlq::list(&bus).await?;
    println!(
        "{} dead letter(s) in {}",
        letters.len(),
        bus.names.dlq_stream()
    );
    for letter in letters {
        println!(
            "seq {}  {}  org {}  conversation {}  attempts {}  reason: {}",
            letter.sequence,
            letter.time.to_rfc3339(),
            or_dash(letter.organization_id),
            or_dash(letter.conversation_id.as_deref()),
            or_dash(letter.attempts),
            letter.reason
        );
    }
    Ok(())
}

async fn run(args: ReplayRunArgs) -> Result<()> {
    let bus = Bus::connect(&args.bus)
        .await
        .context("connecting to NATS")?;
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    let filter = ReplayFilter {
        organization_id: args.org,
        conversation_id: args.conversation,
        reason_contains: args.reason_contains,
        since: args.since,
        until: args.until,
    };
    let mut done = 0usize;
    let outcomes = dlq::replay(&bus, &admin, &filter, args.dry_run, |letter, outcome| {
        done += 1;
        let what = match outcome {
            ReplayOutcome::Replayed { generation } => {
                format!("replayed as generation {generation}")
            }
            ReplayOutcome::WouldReplay { generation } => {
                format!("would replay as generation {generation}")
            }
            ReplayOutcome::DroppedErased => "dropped: the caller was erased".to_owned(),
            ReplayOutcome::Skipped(reason) => format!("skipped: {reason}"),
        };
        println!(
            "[{done}] seq {} conversation {}: {what}",
            letter.sequence,
            or_dash(letter.conversation_id.as_deref())
        );
    })
    .await?;
    let replayed = outcomes
        .iter()
        .filter(|(_, outcome)| {
            matches!(
                outcome,
                ReplayOutcome::Replayed { .. } | ReplayOutcome::WouldReplay { .. }
            )
        })
        .count();
    println!(
        "{} of {} matching dead letter(s) {}",
        replayed,
        outcomes.len(),
        if args.dry_run {
            "would be replayed (dry run)"
        } else {
            "replayed"
        }
    );
    Ok(())
}
