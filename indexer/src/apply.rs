//! Applying one extraction, exactly once in effect (DESIGN.md sections 4
//! and 6): one READ COMMITTED transaction locks the caller row, inserts
//! `applied_extractions` first (a redelivery conflicts there and changes
//! nothing), undoes earlier generations of the same conversation when this
//! is a replay, then deduplicates each memory in two stages and reinforces,
//! replaces (conflict) or inserts it.

use elaaoms_extractor::OrganizationLlm;
use elaaoms_shared::bus::Envelope;
use elaaoms_shared::db::{self, transition_conversation};
use elaaoms_shared::domain::{ConversationStatus, ExtractedMemory, MemoryType, TransitionKind};
use elaaoms_shared::events::MemoriesExtracted;
use elaaoms_shared::sharing::visible_to_agent_sql;
use pgvector::Vector;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::dedup::{cosine, Decision, RulesThresholds};
use crate::judge::{PairToJudge, Verdicts};

/// How deduplication decides (DESIGN.md section 6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DedupSettings {
    /// Stage 1: only memories at least this similar are candidates.
    pub candidate_similarity: f64,
    /// Stage 1: at most this many candidates, best first.
    pub max_candidates: i64,
    /// Stage 2 in `rules` mode.
    pub rules: RulesThresholds,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            candidate_similarity: 0.6,
            max_candidates: 5,
            rules: RulesThresholds::default(),
        }
    }
}

/// What applying an extraction did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub created: u32,
    pub reinforced: u32,
    pub conflicted: u32,
    pub resolved: u32,
    /// Memories removed because an earlier generation of this conversation
    /// was their only source (replay).
    pub replaced_memories: u32,
    /// Reinforcements of earlier generations taken back (replay).
    pub reinforcements_taken_back: u32,
    /// The best candidate's similarity for every memory that had one.
    pub best_similarities: Vec<f64>,
}

/// What applying an extraction did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Done(Outcome),
    /// This generation was applied before: nothing changed.
    AlreadyApplied,
    /// A newer generation superseded this one.
    Dropped,
    /// The caller was erased (tombstone), or the caller or conversation is
    /// gone (erasure deleted them).
    Erased,
}

/// Words that make a memory a health matter, shared across agents only
/// when the organization opts in.
const HEALTH_WORDS: &[&str] = &[
    "allerg",
    "epipen",
    "diabet",
    "asthma",
    "medical",
    "medication",
    "penicillin",
    "pregnan",
    "surgery",
    "pain",
    "hospital",
    "insulin",
    "anaphyla",
    "seizure",
    "blood pressure",
];

fn sensitive_class_of(content: &str) -> Option<&'static str> {
    let lower = content.to_lowercase();
    HEALTH_WORDS
        .iter()
        .any(|word| lower.contains(word))
        .then_some("health")
}

pub async fn apply_extraction(
    pool: &PgPool,
    event: &Envelope<MemoriesExtracted>,
    embeddings: &[Vec<f32>],
    embedding_model: &str,
    settings: &DedupSettings,
    verdicts: &Verdicts,
) -> Result<Applied, sqlx::Error> {
    let organization_id = event.organization_id;
    let extraction = &event.payload;
    let mut tx = db::begin_org_tx(pool, organization_id).await?;

    // One extraction per caller at a time: two indexers working on two calls
    // of the same caller cannot both insert the same new memory. READ
    // COMMITTED takes a new snapshot per statement, so whoever waits here
    // sees what the other committed.
    let caller_exists: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM callers WHERE organization_id = $1 AND caller_id = $2 FOR UPDATE",
    )
    .bind(organization_id)
    .bind(&extraction.caller_id)
    .fetch_optional(&mut *tx)
    .await?;
    if caller_exists.is_none() {
        return Ok(Applied::Erased);
    }
    let conversation: Option<(i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT generation, start_time FROM conversations WHERE organization_id = $1 AND conversation_id = $2",
    )
    .bind(organization_id)
    .bind(&extraction.conversation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((current_generation, started_at)) = conversation else {
        return Ok(Applied::Erased);
    };
    if db::is_caller_erased(
        &mut tx,
        organization_id,
        &extraction.caller_id,
        Some(started_at),
    )
    .await?
    {
        return Ok(Applied::Erased);
    }
    if current_generation > event.generation {
        return Ok(Applied::Dropped);
    }
    let first_application = sqlx::query(
        "INSERT INTO applied_extractions (organization_id, conversation_id, generation) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(organization_id)
    .bind(&extraction.conversation_id)
    .bind(event.generation)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !first_application {
        return Ok(Applied::AlreadyApplied);
    }

    let mut outcome = Outcome::default();
    if event.generation > 1 {
        undo_earlier_generations(&mut tx, event, &mut outcome).await?;
    }

    for (memory, embedding) in extraction.memories.iter().zip(embeddings) {
        let embedding = Vector::from(embedding.clone());
        let candidates =
            candidates(&mut tx, event, memory.memory_type, &embedding, settings).await?;
        if let Some(best) = candidates.first() {
            outcome.best_similarities.push(best.similarity);
        }
        // Best first; the first candidate that is not another fact decides.
        let decided = candidates.iter().find_map(|candidate| {
            match verdicts.decide(
                &candidate.content,
                memory.content.as_str(),
                candidate.similarity,
                settings.rules,
            ) {
                Decision::Distinct => None,
                decision => Some((candidate.id, decision)),
            }
        });
        match decided {
            Some((memory_id, Decision::Duplicate)) => {
                if reinforce(&mut tx, event, memory_id, memory).await? {
                    outcome.reinforced += 1;
                }
            }
            Some((memory_id, _conflict)) => {
                replace_with_newer_value(
                    &mut tx,
                    event,
                    memory_id,
                    memory,
                    &embedding,
                    embedding_model,
                )
                .await?;
                outcome.conflicted += 1;
            }
            None => {
                insert_memory(&mut tx, event, memory, &embedding, embedding_model).await?;
                outcome.created += 1;
            }
        }
    }
    outcome.resolved = resolve_issues(&mut tx, event).await?;

    sqlx::query(
        "UPDATE applied_extractions SET memories_created = $4, memories_reinforced = $5
          WHERE organization_id = $1 AND conversation_id = $2 AND generation = $3",
    )
    .bind(organization_id)
    .bind(&extraction.conversation_id)
    .bind(event.generation)
    .bind(outcome.created as i32)
    .bind(outcome.reinforced as i32)
    .execute(&mut *tx)
    .await?;
    transition_conversation(
        &mut tx,
        organization_id,
        &extraction.conversation_id,
        ConversationStatus::ExtractionCompleted,
        TransitionKind::Normal,
    )
    .await?;
    tx.commit().await?;
    Ok(Applied::Done(outcome))
}

/// Before the transaction: the organization's extractor, and, when it is
/// an LLM, the pairs stage 1 finds for its judge: each new memory against
/// its candidates, and against the batch's earlier memories of the same
/// type. The transaction finds the same pairs unless another indexer wrote
/// to this caller meanwhile; the rules judge what it finds anew.
pub async fn pairs_to_judge(
    pool: &PgPool,
    event: &Envelope<MemoriesExtracted>,
    embeddings: &[Vec<f32>],
    settings: &DedupSettings,
) -> Result<(Option<OrganizationLlm>, Vec<PairToJudge>), sqlx::Error> {
    let mut tx = db::begin_org_tx(pool, event.organization_id).await?;
    let llm: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT llm_provider, llm_model, llm_base_url FROM organizations WHERE id = $1",
    )
    .bind(event.organization_id)
    .fetch_optional(&mut *tx)
    .await?;
    let llm =
        llm.filter(|(provider, _, _)| provider != "rules")
            .map(|(provider, model, base_url)| OrganizationLlm {
                provider,
                model,
                base_url,
            });
    let mut pairs = Vec::new();
    if llm.is_none() {
        return Ok((None, pairs));
    }
    let memories = &event.payload.memories;
    for (index, (memory, embedding)) in memories.iter().zip(embeddings).enumerate() {
        let vector = Vector::from(embedding.clone());
        for candidate in candidates(&mut tx, event, memory.memory_type, &vector, settings).await? {
            pairs.push(PairToJudge {
                existing: candidate.content,
                new: memory.content.as_str().to_owned(),
                memory_type: memory.memory_type,
                similarity: candidate.similarity,
            });
        }
        for (earlier, earlier_embedding) in memories[..index].iter().zip(embeddings) {
            let similarity = cosine(embedding, earlier_embedding);
            if earlier.memory_type == memory.memory_type
                && similarity >= settings.candidate_similarity
            {
                pairs.push(PairToJudge {
                    existing: earlier.content.as_str().to_owned(),
                    new: memory.content.as_str().to_owned(),
                    memory_type: memory.memory_type,
                    similarity,
                });
            }
        }
    }
    tx.commit().await?;
    Ok((llm, pairs))
}

/// A replay (generation g) takes back what generations before g of the same
/// conversation contributed, so that applying g does not count them twice:
/// memories they alone produced go; reinforcements they added are taken
/// back; values they replaced come back when nothing replaced them since;
/// a memory they created that other conversations reinforced stays, with
/// its oldest remaining source promoted to creator.
async fn undo_earlier_generations(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
    outcome: &mut Outcome,
) -> Result<(), sqlx::Error> {
    let (organization_id, conversation_id, generation) = (
        event.organization_id,
        &event.payload.conversation_id,
        event.generation,
    );
    // The predicate "this source row belongs to an earlier generation".
    const EARLIER: &str = "s.organization_id = $1 AND s.conversation_id = $2 AND s.generation < $3";

    let removed = sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM memories m
          WHERE m.organization_id = $1
            AND EXISTS (SELECT 1 FROM memory_sources s WHERE s.memory_id = m.id AND {EARLIER})
            AND NOT EXISTS (SELECT 1 FROM memory_sources s WHERE s.memory_id = m.id AND NOT ({EARLIER}))"
    )))
    .bind(organization_id)
    .bind(conversation_id)
    .bind(generation)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    outcome.replaced_memories = removed as u32;

    // Issues an earlier generation resolved are open again until this one
    // says otherwise.
    sqlx::query(
        "UPDATE memories SET status = 'open', resolved_at = NULL,
                             resolved_by_conversation_id = NULL, resolved_by_generation = NULL
          WHERE organization_id = $1 AND resolved_by_conversation_id = $2 AND resolved_by_generation < $3",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .bind(generation)
    .execute(&mut **tx)
    .await?;

    // Values replaced by an earlier generation come back if that replacement
    // is still the latest one (the last entry of metadata.conflicts).
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE memories m
            SET content = s.previous_content, embedding = s.previous_embedding,
                embedding_model = s.previous_embedding_model,
                metadata = m.metadata #- '{{conflicts,-1}}'
           FROM memory_sources s
          WHERE {EARLIER} AND s.kind = 'conflict' AND m.organization_id = $1 AND m.id = s.memory_id
            AND m.metadata->'conflicts'->-1->>'conversation_id' = $2
            AND (m.metadata->'conflicts'->-1->>'generation')::int = s.generation"
    )))
    .bind(organization_id)
    .bind(conversation_id)
    .bind(generation)
    .execute(&mut **tx)
    .await?;

    let taken_back: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "WITH taken AS (
             SELECT s.memory_id, count(*)::int AS n FROM memory_sources s
              WHERE {EARLIER} AND s.kind = 'reinforced' GROUP BY s.memory_id),
         updated AS (
             UPDATE memories m SET reinforcement_count = GREATEST(0, m.reinforcement_count - taken.n)
               FROM taken WHERE m.organization_id = $1 AND m.id = taken.memory_id
             RETURNING taken.n)
         SELECT sum(n)::bigint FROM updated"
    )))
    .bind(organization_id)
    .bind(conversation_id)
    .bind(generation)
    .fetch_one(&mut **tx)
    .await?;
    outcome.reinforcements_taken_back = taken_back.unwrap_or(0) as u32;

    // Created here, reinforced elsewhere: one reinforcement becomes the creation.
    sqlx::query(AssertSqlSafe(format!(
        "WITH orphaned AS (
             SELECT s.memory_id FROM memory_sources s WHERE {EARLIER} AND s.kind = 'created'),
         promoted AS (
             SELECT DISTINCT ON (o.memory_id) o.memory_id, o.conversation_id, o.generation
               FROM memory_sources o JOIN orphaned USING (memory_id)
              WHERE o.organization_id = $1 AND o.kind = 'reinforced'
                AND NOT (o.conversation_id = $2 AND o.generation < $3)
              ORDER BY o.memory_id, o.created_at, o.conversation_id),
         kinds AS (
             UPDATE memory_sources o SET kind = 'created' FROM promoted p
              WHERE o.organization_id = $1 AND o.memory_id = p.memory_id
                AND o.conversation_id = p.conversation_id AND o.generation = p.generation
             RETURNING o.memory_id)
         UPDATE memories m SET reinforcement_count = GREATEST(0, m.reinforcement_count - 1)
           FROM kinds WHERE m.organization_id = $1 AND m.id = kinds.memory_id"
    )))
    .bind(organization_id)
    .bind(conversation_id)
    .bind(generation)
    .execute(&mut **tx)
    .await?;

    let touched: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
        "DELETE FROM memory_sources s WHERE {EARLIER} RETURNING s.memory_id"
    )))
    .bind(organization_id)
    .bind(conversation_id)
    .bind(generation)
    .fetch_all(&mut **tx)
    .await?;
    // The last reinforcement is now the latest one that remains, and the
    // importance the highest one a remaining source brought (unless a source
    // predates the per-source importance: then it stays).
    sqlx::query(
        "UPDATE memories m
            SET last_reinforced_at = (SELECT GREATEST(max(s.created_at), m.created_at) FROM memory_sources s
                                       WHERE s.memory_id = m.id AND s.kind = 'reinforced'),
                importance = COALESCE(
                    (SELECT max(s.importance) FROM memory_sources s WHERE s.memory_id = m.id
                      HAVING count(*) = count(s.importance)),
                    m.importance)
          WHERE m.organization_id = $1 AND m.id = ANY($2)",
    )
    .bind(organization_id)
    .bind(&touched)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One stage-1 candidate.
#[derive(Debug, sqlx::FromRow)]
struct Candidate {
    id: Uuid,
    content: String,
    similarity: f64,
}

/// Stage 1: the caller's memories of the same type that this agent may see
/// (the one sharing predicate), at least `candidate_similarity` similar,
/// best first. Exact scan of the caller's rows (DESIGN.md section 3). A
/// resolved issue is history: a new complaint is a new issue.
async fn candidates(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
    memory_type: MemoryType,
    embedding: &Vector,
    settings: &DedupSettings,
) -> Result<Vec<Candidate>, sqlx::Error> {
    let sql = format!(
        "SELECT m.id, m.content, -(m.embedding <#> $4)::float8 AS similarity
           FROM memories m JOIN organizations o ON o.id = m.organization_id
          WHERE m.organization_id = $1 AND m.caller_id = $2 AND m.type = $3
            AND (m.type <> 'issue' OR m.status = 'open')
            AND -(m.embedding <#> $4) >= $6
            AND {}
          ORDER BY (m.embedding <#> $4) + 0
          LIMIT $7",
        visible_to_agent_sql("$5")
    );
    sqlx::query_as(AssertSqlSafe(sql))
        .bind(event.organization_id)
        .bind(&event.payload.caller_id)
        .bind(memory_type.as_str())
        .bind(embedding)
        .bind(&event.payload.agent_id)
        .bind(settings.candidate_similarity)
        .bind(settings.max_candidates)
        .fetch_all(&mut **tx)
        .await
}

/// Counts this conversation as one more source of the memory. The same
/// conversation saying a thing twice reinforces it once.
async fn reinforce(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
    memory_id: Uuid,
    memory: &ExtractedMemory,
) -> Result<bool, sqlx::Error> {
    let new_source = sqlx::query(
        "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind, importance)
         VALUES ($1, $2, $3, $4, 'reinforced', $5) ON CONFLICT DO NOTHING",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(&event.payload.conversation_id)
    .bind(event.generation)
    .bind(i16::from(memory.importance))
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if !new_source {
        return Ok(false);
    }
    // is_shareable is generated from importance: it follows by itself.
    sqlx::query(
        "UPDATE memories SET reinforcement_count = reinforcement_count + 1,
                             last_reinforced_at = GREATEST(now(), created_at),
                             importance = GREATEST(importance, $3),
                             confidence = (1 - (1 - confidence::float8) * (1 - $4))::real
          WHERE organization_id = $1 AND id = $2",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(i16::from(memory.importance))
    .bind(memory.confidence.get())
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// Conflict: the newest value becomes the content (with its embedding);
/// the old value and its dates are appended to `metadata.conflicts`, and the
/// source row keeps what a replay needs to restore it. Nothing is lost.
async fn replace_with_newer_value(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
    memory_id: Uuid,
    memory: &ExtractedMemory,
    embedding: &Vector,
    embedding_model: &str,
) -> Result<(), sqlx::Error> {
    // A memory this same extraction created already has its source row.
    sqlx::query(
        "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind,
                                     previous_content, previous_embedding, previous_embedding_model, importance)
         SELECT $1, m.id, $3, $4, 'conflict', m.content, m.embedding, m.embedding_model, $5
           FROM memories m WHERE m.organization_id = $1 AND m.id = $2
         ON CONFLICT (memory_id, conversation_id, generation)
         DO UPDATE SET importance = GREATEST(memory_sources.importance, EXCLUDED.importance)",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(&event.payload.conversation_id)
    .bind(event.generation)
    .bind(i16::from(memory.importance))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE memories
            SET metadata = jsonb_set(metadata, '{conflicts}',
                    COALESCE(metadata->'conflicts', '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
                        'content', content, 'created_at', created_at, 'last_reinforced_at', last_reinforced_at,
                        'replaced_at', now(), 'conversation_id', $3::text, 'generation', $4::int))),
                content = $5, embedding = $6, embedding_model = $7,
                importance = GREATEST(importance, $8), confidence = $9,
                sensitive_class = COALESCE($10, sensitive_class)
          WHERE organization_id = $1 AND id = $2",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(&event.payload.conversation_id)
    .bind(event.generation)
    .bind(memory.content.as_str())
    .bind(embedding)
    .bind(embedding_model)
    .bind(i16::from(memory.importance))
    .bind(memory.confidence.get() as f32)
    .bind(sensitive_class_of(memory.content.as_str()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Open issues of this caller that the call resolved (the extractor names
/// them); ids of other callers or of non-issues change nothing.
async fn resolve_issues(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
) -> Result<u32, sqlx::Error> {
    if event.payload.resolved_issue_ids.is_empty() {
        return Ok(0);
    }
    let resolved = sqlx::query(
        "UPDATE memories SET status = 'resolved', resolved_at = GREATEST(now(), created_at),
                             resolved_by_conversation_id = $4, resolved_by_generation = $5
          WHERE organization_id = $1 AND caller_id = $2 AND id = ANY($3) AND type = 'issue' AND status = 'open'",
    )
    .bind(event.organization_id)
    .bind(&event.payload.caller_id)
    .bind(&event.payload.resolved_issue_ids)
    .bind(&event.payload.conversation_id)
    .bind(event.generation)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(resolved as u32)
}

async fn insert_memory(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
    memory: &ExtractedMemory,
    embedding: &Vector,
    embedding_model: &str,
) -> Result<(), sqlx::Error> {
    let extraction = &event.payload;
    let status = (memory.memory_type == MemoryType::Issue).then_some("open");
    let metadata = serde_json::json!({
        "source_quote": memory.source_quote,
        "extractor": extraction.extractor,
    });
    let memory_id: Uuid = sqlx::query_scalar(
        "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type, importance,
                               sensitive_class, confidence, status, metadata, embedding, embedding_model)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         RETURNING id",
    )
    .bind(event.organization_id)
    .bind(&extraction.caller_id)
    .bind(&extraction.agent_id)
    .bind(&extraction.conversation_id)
    .bind(memory.content.as_str())
    .bind(memory.memory_type.as_str())
    .bind(i16::from(memory.importance))
    .bind(sensitive_class_of(memory.content.as_str()))
    .bind(memory.confidence.get() as f32)
    .bind(status)
    .bind(metadata)
    .bind(embedding)
    .bind(embedding_model)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind, importance)
         VALUES ($1, $2, $3, $4, 'created', $5)",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(&extraction.conversation_id)
    .bind(event.generation)
    .bind(i16::from(memory.importance))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_words_mark_sensitive_memories() {
        assert_eq!(
            sensitive_class_of("Zuri has a severe tree nut allergy"),
            Some("health")
        );
        assert_eq!(sensitive_class_of("Grace is diabetic"), Some("health"));
        assert_eq!(sensitive_class_of("Prefers lemon sponge"), None);
    }
}
