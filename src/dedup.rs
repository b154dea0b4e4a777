//! `elaaoms dedup --threshold X [--dry-run]`: recalculates deduplication
//! under a new similarity bar and reports or merges the duplicates it finds
//! (see `elaaoms_indexer::recalculate`). Caller by caller, each in its own
//! short transaction under the caller's lock, so it runs beside the workers.

use anyhow::{Context, Result};
use elaaoms_indexer::dedup::RulesThresholds;
use elaaoms_indexer::recalculate::{callers_after, recalculate_caller, Merge};
use elaaoms_shared::config::AdminDatabaseConfig;
use elaaoms_shared::db;

/// Merges printed per organization; the counts cover all of them.
const SHOWN_MERGES: usize = 20;
const CALLERS_PER_PAGE: i64 = 500;

#[derive(clap::Args, Debug)]
pub struct DedupArgs {
    /// The new duplicate bar (cosine similarity, the seed's default 0.85).
    #[arg(long)]
    threshold: f64,
    /// Only this organization (slug or id); default: all of them.
    #[arg(long)]
    org: Option<String>,
    /// Report what would be merged; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    admin: AdminDatabaseConfig,
}

pub async fn dedup(args: DedupArgs) -> Result<()> {
    anyhow::ensure!(
        args.threshold > 0.0 && args.threshold <= 1.0,
        "--threshold must be in (0, 1], got {}",
        args.threshold
    );
    let thresholds = RulesThresholds {
        duplicate: args.threshold,
        ..RulesThresholds::default()
    };
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    let organizations = crate::operator::organizations(&admin, args.org.as_deref()).await?;
    let verb = if args.dry_run {
        "would merge"
    } else {
        "merged"
    };
    for (organization_id, slug) in organizations {
        let mut callers = 0u64;
        let mut merges: Vec<Merge> = Vec::new();
        let mut after = String::new();
        loop {
            let page = callers_after(&admin, organization_id, &after, CALLERS_PER_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            for caller_id in &page {
                let found = recalculate_caller(
                    &admin,
                    organization_id,
                    caller_id,
                    thresholds,
                    args.dry_run,
                )
                .await
                .with_context(|| format!("recalculating {slug}"))?;
                merges.extend(found);
                callers += 1;
            }
            eprint!("\r{slug}: {callers} callers, {} duplicates", merges.len());
        }
        eprintln!();
        println!(
            "{slug}: {verb} {} duplicate memories at similarity >= {} ({callers} callers){}",
            merges.len(),
            args.threshold,
            if args.dry_run { " (dry run)" } else { "" }
        );
        for merge in merges.iter().take(SHOWN_MERGES) {
            println!(
                "  {:.3}  {:?}  into  {:?}  ({})",
                merge.similarity, merge.merged_content, merge.kept_content, merge.caller_id
            );
        }
        if merges.len() > SHOWN_MERGES {
            println!("  ... and {} more", merges.len() - SHOWN_MERGES);
        }
    }
    Ok(())
}
