//! Deduplication recalculated under a new threshold (`elaaoms dedup`): the
//! seed's "deduplication may need recalculating when the threshold
//! changes". The indexer decides once per new memory; after the bar is
//! lowered, memories stored apart may now be duplicates. This finds them
//! caller by caller and merges each into its oldest duplicate, exactly as if
//! the newer one had reinforced the older one when it arrived: its sources
//! become reinforcements of the kept memory (so a later replay of those
//! conversations takes them back correctly), importance is the larger one,
//! and its text is kept in the survivor's `metadata.merged[]`.
//!
//! Stage 2 is the `rules` judge at the new bar: a negation, another value or
//! another person is never merged, whatever the similarity. Only duplicates
//! are merged; memories that merely conflict stay as they are. A raised bar
//! cannot split what was merged before (the merged text is kept for a
//! reader, not re-embedded as a memory), so it finds nothing.

use std::collections::HashSet;

use elaaoms_shared::db;
use elaaoms_shared::sharing::visible_to_agent_sql;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::dedup::{judge, Decision, RulesThresholds};

/// One merge: `merged` goes into `kept`.
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    pub caller_id: String,
    pub kept: Uuid,
    pub kept_content: String,
    pub merged: Uuid,
    pub merged_content: String,
    pub similarity: f64,
}

/// A candidate pair from SQL: the newer memory and an older one its agent
/// may see, at least `threshold` similar.
#[derive(Debug, sqlx::FromRow)]
struct Pair {
    newer: Uuid,
    newer_content: String,
    older: Uuid,
    older_content: String,
    similarity: f64,
}

/// Recalculates one caller in one transaction under the caller's lock (the
/// lock the indexer takes, so no extraction is applied meanwhile). With
/// `dry_run` the same decisions are made and rolled back.
pub async fn recalculate_caller(
    pool: &PgPool,
    organization_id: Uuid,
    caller_id: &str,
    thresholds: RulesThresholds,
    dry_run: bool,
) -> Result<Vec<Merge>, sqlx::Error> {
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    sqlx::query("SELECT 1 FROM callers WHERE organization_id = $1 AND caller_id = $2 FOR UPDATE")
        .bind(organization_id)
        .bind(caller_id)
        .fetch_optional(&mut *tx)
        .await?;
    // Newest first, each newer memory's candidates best first: the newest
    // memories fold into older ones, and a memory that has been merged away
    // is neither kept nor merged again.
    let sql = format!(
        "SELECT n.id AS newer, n.content AS newer_content, m.id AS older, m.content AS older_content,
                -(m.embedding <#> n.embedding)::float8 AS similarity
           FROM memories n
           JOIN memories m ON m.organization_id = n.organization_id AND m.caller_id = n.caller_id
                          AND m.type = n.type AND (m.created_at, m.id) < (n.created_at, n.id)
           JOIN organizations o ON o.id = m.organization_id
          WHERE n.organization_id = $1 AND n.caller_id = $2
            AND (n.type <> 'issue' OR (n.status = 'open' AND m.status = 'open'))
            AND -(m.embedding <#> n.embedding) >= $3
            AND {}
          ORDER BY n.created_at DESC, n.id DESC, similarity DESC",
        visible_to_agent_sql("n.agent_id")
    );
    let pairs: Vec<Pair> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(organization_id)
        .bind(caller_id)
        .bind(thresholds.duplicate)
        .fetch_all(&mut *tx)
        .await?;

    let mut gone: HashSet<Uuid> = HashSet::new();
    let mut merges = Vec::new();
    for pair in pairs {
        if gone.contains(&pair.newer) || gone.contains(&pair.older) {
            continue;
        }
        let decision = judge(
            &pair.older_content,
            &pair.newer_content,
            pair.similarity,
            thresholds,
        );
        if decision != Decision::Duplicate {
            continue;
        }
        merge(
            &mut tx,
            organization_id,
            pair.older,
            pair.newer,
            pair.similarity,
        )
        .await?;
        gone.insert(pair.newer);
        merges.push(Merge {
            caller_id: caller_id.to_owned(),
            kept: pair.older,
            kept_content: pair.older_content,
            merged: pair.newer,
            merged_content: pair.newer_content,
            similarity: pair.similarity,
        });
    }
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(merges)
}

/// Folds `merged` into `kept` as a reinforcement, then deletes it.
async fn merge(
    tx: &mut Transaction<'_, Postgres>,
    organization_id: Uuid,
    kept: Uuid,
    merged: Uuid,
    similarity: f64,
) -> Result<(), sqlx::Error> {
    // Each conversation behind the merged memory becomes one reinforcement
    // of the kept one; a conversation that is already a source counts once.
    let moved = sqlx::query(
        "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind, importance, created_at)
         SELECT organization_id, $2, conversation_id, generation, 'reinforced', importance, created_at
           FROM memory_sources WHERE organization_id = $1 AND memory_id = $3
         ON CONFLICT DO NOTHING",
    )
    .bind(organization_id)
    .bind(kept)
    .bind(merged)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE memories k
            SET reinforcement_count = k.reinforcement_count + $4,
                importance = GREATEST(k.importance, g.importance),
                confidence = (1 - (1 - k.confidence::float8) * (1 - g.confidence::float8))::real,
                last_reinforced_at = GREATEST(k.last_reinforced_at, g.last_reinforced_at, g.created_at, k.created_at),
                metadata = jsonb_set(k.metadata, '{merged}',
                    COALESCE(k.metadata->'merged', '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
                        'id', g.id, 'content', g.content, 'agent_id', g.agent_id, 'created_at', g.created_at,
                        'similarity', $5::float8, 'merged_at', now())))
           FROM memories g
          WHERE k.organization_id = $1 AND k.id = $2 AND g.organization_id = $1 AND g.id = $3",
    )
    .bind(organization_id)
    .bind(kept)
    .bind(merged)
    .bind(moved as i32)
    .bind(similarity)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM memories WHERE organization_id = $1 AND id = $2")
        .bind(organization_id)
        .bind(merged)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// One organization's callers, `page` at a time in caller order (so a run
/// over millions of callers holds no long transaction and no big list).
pub async fn callers_after(
    pool: &PgPool,
    organization_id: Uuid,
    after: &str,
    page: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    let callers = sqlx::query_scalar(
        "SELECT caller_id FROM callers WHERE organization_id = $1 AND caller_id > $2
          ORDER BY caller_id LIMIT $3",
    )
    .bind(organization_id)
    .bind(after)
    .bind(page)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(callers)
}
