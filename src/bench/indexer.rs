//! Scenario 4: the indexer's work without the bus. `--extractions`
//! extractions, each the memories the `rules` extractor finds in one of the
//! bundled transcripts, for a caller of its own, are indexed with the
//! indexer's own code (`apply_extraction`) against the benchmark database,
//! one at a time:
//!
//! * batched, as the indexer does it: one `embed` call for an extraction's
//!   memories, then one transaction for the extraction;
//! * one by one: each memory embedded alone and applied as an extraction of
//!   its own (its own conversation), in its own transaction.
//!
//! Both do the same deduplication work: memories of one transcript meet
//! each other (in the batch's transaction, or in the caller's earlier
//! transactions), never those of another caller.

use std::time::{Duration, Instant};

use anyhow::Result;
use elaaoms_indexer::apply::{apply_extraction, DedupSettings};
use elaaoms_indexer::{Applied, Verdicts};
use elaaoms_shared::bus::Envelope;
use elaaoms_shared::domain::ExtractedMemory;
use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::events::MemoriesExtracted;

use super::{fixture_transcripts, machine_description, BenchEnv, BenchEnvArgs};

#[derive(clap::Args, Debug)]
pub struct IndexerBenchArgs {
    #[command(flatten)]
    env: BenchEnvArgs,
    /// The deduplication thresholds (the health address is not used).
    #[command(flatten)]
    indexer: elaaoms_indexer::IndexerSettings,
    /// Extractions indexed in each mode.
    #[arg(long, default_value_t = 50)]
    extractions: u64,
}

const AGENT: &str = "agent_bench";

/// One extraction to index: its conversation, caller and memories.
struct Extraction<'a> {
    conversation_id: String,
    caller_id: String,
    memories: &'a [ExtractedMemory],
}

/// What indexing a series took.
#[derive(Default)]
struct Totals {
    transactions: u64,
    memories: u64,
    created: u64,
    reinforced: u64,
    embedding: Duration,
    applying: Duration,
}

impl Totals {
    fn seconds(&self) -> f64 {
        (self.embedding + self.applying).as_secs_f64()
    }

    fn per_second(&self) -> f64 {
        self.memories as f64 / self.seconds()
    }

    fn row(&self, name: &str) -> String {
        format!(
            "| {name} | {} | {} | {} / {} | {:.2} | {:.1} | {:.2} | {:.2} | {:.0}% |",
            self.transactions,
            self.memories,
            self.created,
            self.reinforced,
            self.seconds(),
            self.per_second(),
            self.embedding.as_secs_f64() * 1000.0 / self.memories as f64,
            self.applying.as_secs_f64() * 1000.0 / self.memories as f64,
            100.0 * self.embedding.as_secs_f64() / self.seconds()
        )
    }
}

const TABLE_HEADER: &str = "| what | transactions | memories | created / reinforced | seconds | memories per second | embedding ms per memory | Postgres ms per memory | embedding share |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |";

/// Creates the callers and their conversations, `extraction_pending` as
/// the extractor leaves them.
async fn create_rows(env: &BenchEnv, extractions: &[Extraction<'_>]) -> Result<()> {
    let admin = &env.admin_pool;
    let callers: Vec<&str> = extractions.iter().map(|e| e.caller_id.as_str()).collect();
    let conversations: Vec<&str> = extractions
        .iter()
        .map(|e| e.conversation_id.as_str())
        .collect();
    sqlx::query(
        "INSERT INTO agents (organization_id, agent_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(env.organization_id)
    .bind(AGENT)
    .execute(admin)
    .await?;
    sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
         SELECT DISTINCT $1, c, now(), now(), 1 FROM unnest($2::text[]) c ON CONFLICT DO NOTHING",
    )
    .bind(env.organization_id)
    .bind(&callers)
    .execute(admin)
    .await?;
    sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
         SELECT $1, conversation, $2, caller, now(), 'completed' FROM unnest($3::text[], $4::text[]) AS t(conversation, caller)",
    )
    .bind(env.organization_id)
    .bind(AGENT)
    .bind(&conversations)
    .bind(&callers)
    .execute(admin)
    .await?;
    sqlx::query(
        "UPDATE conversations SET status = 'extraction_pending' WHERE organization_id = $1 AND conversation_id = ANY($2)",
    )
    .bind(env.organization_id)
    .bind(&conversations)
    .execute(admin)
    .await?;
    Ok(())
}

/// Embeds and applies each extraction in turn, as the indexer's handler
/// does for one message.
async fn index(
    env: &BenchEnv,
    embedder: &Embedder,
    dedup: &DedupSettings,
    extractions: &[Extraction<'_>],
) -> Result<Totals> {
    let mut totals = Totals::default();
    for extraction in extractions {
        let texts = extraction
            .memories
            .iter()
            .map(|memory| memory.content.as_str().to_owned())
            .collect();
        let started = Instant::now();
        let embeddings = embedder.embed(texts).await?;
        totals.embedding += started.elapsed();
        let event = Envelope::new(
            env.organization_id,
            1,
            MemoriesExtracted {
                conversation_id: extraction.conversation_id.clone(),
                agent_id: AGENT.to_owned(),
                caller_id: extraction.caller_id.clone(),
                memories: extraction.memories.to_vec(),
                resolved_issue_ids: Vec::new(),
                extractor: "rules".to_owned(),
            },
        );
        let started = Instant::now();
        let applied = apply_extraction(
            &env.pool,
            &event,
            &embeddings,
            embedder.model_name(),
            dedup,
            // No judge's verdicts: the rules decide, as for a `rules` organization.
            &Verdicts::default(),
        )
        .await?;
        totals.applying += started.elapsed();
        let Applied::Done(outcome) = applied else {
            anyhow::bail!(
                "{} was not applied: {applied:?}",
                extraction.conversation_id
            );
        };
        totals.transactions += 1;
        totals.memories += extraction.memories.len() as u64;
        totals.created += u64::from(outcome.created);
        totals.reinforced += u64::from(outcome.reinforced);
    }
    Ok(totals)
}

pub async fn run(args: IndexerBenchArgs) -> Result<()> {
    anyhow::ensure!(args.extractions > 0, "--extractions must be positive");
    let env = BenchEnv::prepare(&args.env).await?;
    let embedder = env.embedder()?;
    let dedup = args.indexer.dedup();
    let transcripts: Vec<Vec<ExtractedMemory>> = fixture_transcripts()?
        .iter()
        .map(|turns| elaaoms_extractor::rules::extract_memories(turns))
        .collect();
    let memories_of = |i: u64| transcripts[i as usize % transcripts.len()].as_slice();

    let batched: Vec<Extraction> = (0..args.extractions)
        .map(|i| Extraction {
            conversation_id: format!("conv_batched_{i:06}"),
            caller_id: format!("caller_batched_{i:06}"),
            memories: memories_of(i),
        })
        .collect();
    let one_by_one: Vec<Extraction> = (0..args.extractions)
        .flat_map(|i| {
            memories_of(i)
                .chunks(1)
                .enumerate()
                .map(move |(m, memory)| Extraction {
                    conversation_id: format!("conv_single_{i:06}_{m:03}"),
                    caller_id: format!("caller_single_{i:06}"),
                    memories: memory,
                })
        })
        .collect();
    create_rows(&env, &batched).await?;
    create_rows(&env, &one_by_one).await?;

    // Warm up the model and the connections, outside the measurement.
    let warm_up: Vec<String> = transcripts
        .iter()
        .flatten()
        .map(|memory| memory.content.as_str().to_owned())
        .collect();
    embedder.embed(warm_up).await?;
    sqlx::query("SELECT 1").execute(&env.pool).await?;

    let batched = index(&env, &embedder, &dedup, &batched).await?;
    let one_by_one = index(&env, &embedder, &dedup, &one_by_one).await?;

    println!(
        "## indexer, {} extractions ({} memories) each way\n\n{}\n",
        args.extractions,
        batched.memories,
        machine_description()
    );
    println!("{TABLE_HEADER}");
    println!(
        "{}",
        batched.row("batched: one embed call and one transaction per extraction")
    );
    println!(
        "{}",
        one_by_one.row("one by one: one embed call and one transaction per memory")
    );
    println!(
        "\nbatched / one by one: {:.2}x memories per second ({:.2}x in embedding, {:.2}x in Postgres)",
        batched.per_second() / one_by_one.per_second(),
        one_by_one.embedding.as_secs_f64() / batched.embedding.as_secs_f64(),
        one_by_one.applying.as_secs_f64() / batched.applying.as_secs_f64()
    );
    Ok(())
}
