//! `elaaoms reembed`: re-embeds the memories whose embedding was made by
//! another model than the configured one (after a model change). Batched
//! and organization by organization under the organization's RLS scope;
//! resumable, because only rows still on another model are picked; search
//! keeps working meanwhile, because each row keeps its old vector until its
//! new one replaces it in a short transaction.

use anyhow::{Context, Result};
use elaaoms_shared::config::{AdminDatabaseConfig, EmbeddingConfig};
use elaaoms_shared::db;
use elaaoms_shared::embedder::{Embedder, EmbeddingProviderConfig};
use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct ReembedArgs {
    /// Only this organization (slug or id); default: all of them.
    #[arg(long)]
    org: Option<String>,
    /// Memories embedded per batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Count what would be re-embedded; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[command(flatten)]
    embedding: EmbeddingConfig,
    #[command(flatten)]
    embedding_provider: EmbeddingProviderConfig,
}

/// One organization's outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Memories on another model when the run reached them.
    pub stale: u64,
    pub reembedded: u64,
    /// Changed (content edited, or deleted) between read and write: left to
    /// the next run or to the indexer, which embeds with the current model.
    pub changed_meanwhile: u64,
}

pub async fn reembed(args: ReembedArgs) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    let embedder = crate::load_embedder(&args.embedding, &args.embedding_provider)?;
    let organizations = crate::operator::organizations(&admin, args.org.as_deref()).await?;
    println!("re-embedding with {}", embedder.model_name());
    for (organization_id, slug) in organizations {
        let counts = run(
            &admin,
            &embedder,
            organization_id,
            args.batch_size,
            args.dry_run,
            |done| eprint!("\r{slug}: {done} re-embedded"),
        )
        .await
        .with_context(|| format!("re-embedding {slug}"))?;
        eprintln!();
        if args.dry_run {
            println!(
                "{slug}: {} memories would be re-embedded (dry run)",
                counts.stale
            );
        } else {
            println!(
                "{slug}: {} of {} re-embedded, {} changed meanwhile",
                counts.reembedded, counts.stale, counts.changed_meanwhile
            );
        }
    }
    Ok(())
}

/// Re-embeds one organization's stale memories, `batch_size` at a time in
/// id order (so a row that changed meanwhile is passed, never retried in a
/// loop). `progress` gets the running count.
pub async fn run(
    pool: &PgPool,
    embedder: &Embedder,
    organization_id: Uuid,
    batch_size: usize,
    dry_run: bool,
    mut progress: impl FnMut(u64),
) -> Result<Counts> {
    let model = embedder.model_name().to_owned();
    let mut counts = Counts::default();
    if dry_run {
        let mut tx = db::begin_org_tx(pool, organization_id).await?;
        let stale: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM memories WHERE organization_id = $1 AND embedding_model <> $2",
        )
        .bind(organization_id)
        .bind(&model)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        counts.stale = u64::try_from(stale).unwrap_or_default();
        return Ok(counts);
    }
    let mut after = Uuid::nil();
    loop {
        // Read, embed outside any transaction, then write.
        let batch: Vec<(Uuid, String)> = {
            let mut tx = db::begin_org_tx(pool, organization_id).await?;
            let rows = sqlx::query_as(
                "SELECT id, content FROM memories
                  WHERE organization_id = $1 AND embedding_model <> $2 AND id > $3
                  ORDER BY id LIMIT $4",
            )
            .bind(organization_id)
            .bind(&model)
            .bind(after)
            .bind(i64::try_from(batch_size).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            rows
        };
        let Some((last, _)) = batch.last() else {
            return Ok(counts);
        };
        after = *last;
        counts.stale += batch.len() as u64;
        let vectors = embedder
            .embed(batch.iter().map(|(_, content)| content.clone()).collect())
            .await
            .context("embedding a batch")?;
        let mut tx = db::begin_org_tx(pool, organization_id).await?;
        for ((id, content), vector) in batch.iter().zip(vectors) {
            // Only if the content is still what was embedded.
            let updated = sqlx::query(
                "UPDATE memories SET embedding = $4, embedding_model = $5
                  WHERE organization_id = $1 AND id = $2 AND content = $3 AND embedding_model <> $5",
            )
            .bind(organization_id)
            .bind(id)
            .bind(content)
            .bind(Vector::from(vector))
            .bind(&model)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                counts.reembedded += 1;
            } else {
                counts.changed_meanwhile += 1;
            }
        }
        tx.commit().await?;
        progress(counts.reembedded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elaaoms_shared::test_support::TestDatabase;

    fn embedder() -> Embedder {
        Embedder::local(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/models/all-MiniLM-L6-v2"
        )))
        .expect("model files: run deploy/local/setup.sh")
    }

    async fn memory(database: &TestDatabase, org: Uuid, content: &str, model: &str) -> Uuid {
        let admin = &database.admin_pool;
        sqlx::query("INSERT INTO agents (organization_id, agent_id) VALUES ($1, 'agent_a') ON CONFLICT DO NOTHING")
            .bind(org)
            .execute(admin)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
             VALUES ($1, '+14155550170', now(), now(), 1) ON CONFLICT DO NOTHING",
        )
        .bind(org)
        .execute(admin)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
             VALUES ($1, 'conv_reembed', 'agent_a', '+14155550170', now(), 'completed') ON CONFLICT DO NOTHING",
        )
        .bind(org)
        .execute(admin)
        .await
        .unwrap();
        sqlx::query_scalar(
            "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type, importance,
                                   confidence, embedding, embedding_model)
             VALUES ($1, '+14155550170', 'agent_a', 'conv_reembed', $2, 'preference', 6, 0.9,
                     array_fill(0.1::real, ARRAY[384])::vector, $3)
             RETURNING id",
        )
        .bind(org)
        .bind(content)
        .bind(model)
        .fetch_one(admin)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn stale_memories_are_re_embedded_in_batches_and_only_in_their_organization() {
        let database = TestDatabase::create().await;
        let embedder = embedder();
        let model = embedder.model_name().to_owned();
        let org = database
            .create_organization("reembed-a", "whsec_reembed_test_secret_0123456789a")
            .await;
        let other = database
            .create_organization("reembed-b", "whsec_reembed_test_secret_0123456789b")
            .await;
        let contents = [
            "The caller prefers morning appointments.",
            "The caller prefers text messages to email.",
            "The caller prefers the seeded gluten-free loaf.",
        ];
        let mut stale = Vec::new();
        for content in contents {
            stale.push(memory(&database, org, content, "old-model-v0").await);
        }
        let current = memory(&database, org, "The caller prefers Dr. Patel.", &model).await;
        let elsewhere = memory(
            &database,
            other,
            "The caller prefers afternoons.",
            "old-model-v0",
        )
        .await;

        let dry = run(&database.pool, &embedder, org, 2, true, |_| {})
            .await
            .unwrap();
        assert_eq!(dry.stale, 3);
        assert_eq!(dry.reembedded, 0);

        let mut reports = Vec::new();
        let counts = run(&database.pool, &embedder, org, 2, false, |done| {
            reports.push(done)
        })
        .await
        .unwrap();
        assert_eq!(
            counts,
            Counts {
                stale: 3,
                reembedded: 3,
                changed_meanwhile: 0
            }
        );
        assert_eq!(reports, [2, 3], "two batches of at most two");

        let expected = embedder.embed_one(contents[0]).await.unwrap();
        let (stored_model, stored): (String, Vector) =
            sqlx::query_as("SELECT embedding_model, embedding FROM memories WHERE id = $1")
                .bind(stale[0])
                .fetch_one(&database.admin_pool)
                .await
                .unwrap();
        assert_eq!(stored_model, model);
        let stored = stored.to_vec();
        assert!(
            stored
                .iter()
                .zip(&expected)
                .all(|(a, b)| (a - b).abs() < 1e-4),
            "the stored vector is the content's embedding"
        );
        let model_of = |id: Uuid| {
            sqlx::query_scalar::<_, String>("SELECT embedding_model FROM memories WHERE id = $1")
                .bind(id)
                .fetch_one(&database.admin_pool)
        };
        assert_eq!(
            model_of(elsewhere).await.unwrap(),
            "old-model-v0",
            "another organization is untouched"
        );
        assert_eq!(model_of(current).await.unwrap(), model);

        // Resumable: a second run finds nothing left.
        let again = run(&database.pool, &embedder, org, 2, false, |_| {})
            .await
            .unwrap();
        assert_eq!(again, Counts::default());
    }
}
