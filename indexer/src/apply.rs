//! Applying one extraction, exactly once in effect.

use elaaoms_shared::bus::Envelope;
use elaaoms_shared::db::{self, transition_conversation};
use elaaoms_shared::domain::{ConversationStatus, ExtractedMemory, MemoryType, TransitionKind};
use elaaoms_shared::events::MemoriesExtracted;
use elaaoms_shared::sharing::visible_to_agent_sql;
use pgvector::Vector;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// What applying an extraction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done { created: u32, reinforced: u32 },
    /// This generation was applied before: nothing changed.
    AlreadyApplied,
    /// The caller was erased, or a newer generation superseded this one.
    Dropped,
}

/// Words that make a memory a health matter, shared across agents only
/// when the organization opts in.
const HEALTH_WORDS: &[&str] = &[
    "allerg", "epipen", "diabet", "asthma", "medical", "medication", "penicillin", "pregnan", "surgery",
    "pain", "hospital", "insulin", "anaphyla", "seizure", "blood pressure",
];

fn sensitive_class_of(content: &str) -> Option<&'static str> {
    let lower = content.to_lowercase();
    HEALTH_WORDS.iter().any(|word| lower.contains(word)).then_some("health")
}

/// Two pieces of evidence for the same fact make it surer than either.
fn combined_confidence(existing: f64, new: f64) -> f64 {
    (1.0 - (1.0 - existing) * (1.0 - new)).clamp(0.0, 1.0)
}

pub async fn apply_extraction(
    pool: &PgPool,
    event: &Envelope<MemoriesExtracted>,
    embeddings: &[Vec<f32>],
    embedding_model: &str,
    dedup_similarity: f64,
) -> Result<Applied, sqlx::Error> {
    let organization_id = event.organization_id;
    let extraction = &event.payload;
    let mut tx = db::begin_org_tx(pool, organization_id).await?;

    // One extraction per caller at a time: two indexers working on two calls
    // of the same caller cannot both insert the same new memory.
    let caller_exists: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM callers WHERE organization_id = $1 AND caller_id = $2 FOR UPDATE",
    )
    .bind(organization_id)
    .bind(&extraction.caller_id)
    .fetch_optional(&mut *tx)
    .await?;
    if caller_exists.is_none() || db::is_caller_erased(&mut tx, organization_id, &extraction.caller_id).await? {
        return Ok(Applied::Dropped);
    }
    let current_generation: Option<i32> = sqlx::query_scalar(
        "SELECT generation FROM conversations WHERE organization_id = $1 AND conversation_id = $2",
    )
    .bind(organization_id)
    .bind(&extraction.conversation_id)
    .fetch_optional(&mut *tx)
    .await?;
    if current_generation.is_none_or(|generation| generation > event.generation) {
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

    let (mut created, mut reinforced) = (0_u32, 0_u32);
    for (memory, embedding) in extraction.memories.iter().zip(embeddings) {
        let embedding = Vector::from(embedding.clone());
        let candidate = closest_visible_memory(&mut tx, event, memory.memory_type, &embedding).await?;
        match candidate {
            Some((memory_id, similarity)) if similarity >= dedup_similarity => {
                if reinforce(&mut tx, event, memory_id, memory).await? {
                    reinforced += 1;
                }
            }
            _ => {
                insert_memory(&mut tx, event, memory, &embedding, embedding_model).await?;
                created += 1;
            }
        }
    }

    sqlx::query(
        "UPDATE applied_extractions SET memories_created = $4, memories_reinforced = $5
          WHERE organization_id = $1 AND conversation_id = $2 AND generation = $3",
    )
    .bind(organization_id)
    .bind(&extraction.conversation_id)
    .bind(event.generation)
    .bind(created as i32)
    .bind(reinforced as i32)
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
    Ok(Applied::Done { created, reinforced })
}

/// The caller's most similar memory of the same type that this agent may
/// see (exact scan of the caller's rows; see DESIGN.md section 3).
async fn closest_visible_memory(
    tx: &mut Transaction<'_, Postgres>,
    event: &Envelope<MemoriesExtracted>,
    memory_type: MemoryType,
    embedding: &Vector,
) -> Result<Option<(Uuid, f64)>, sqlx::Error> {
    let sql = format!(
        "SELECT m.id, -(m.embedding <#> $4)::float8 AS similarity
           FROM memories m JOIN organizations o ON o.id = m.organization_id
          WHERE m.organization_id = $1 AND m.caller_id = $2 AND m.type = $3 AND {}
          ORDER BY (m.embedding <#> $4) + 0
          LIMIT 1",
        visible_to_agent_sql("$5")
    );
    sqlx::query_as(AssertSqlSafe(sql))
        .bind(event.organization_id)
        .bind(&event.payload.caller_id)
        .bind(memory_type.as_str())
        .bind(embedding)
        .bind(&event.payload.agent_id)
        .fetch_optional(&mut **tx)
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
        "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind)
         VALUES ($1, $2, $3, $4, 'reinforced') ON CONFLICT DO NOTHING",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(&event.payload.conversation_id)
    .bind(event.generation)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if !new_source {
        return Ok(false);
    }
    let existing_confidence: f32 =
        sqlx::query_scalar("SELECT confidence FROM memories WHERE organization_id = $1 AND id = $2")
            .bind(event.organization_id)
            .bind(memory_id)
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query(
        "UPDATE memories SET reinforcement_count = reinforcement_count + 1,
                             last_reinforced_at = GREATEST(now(), created_at),
                             importance = GREATEST(importance, $3),
                             confidence = $4
          WHERE organization_id = $1 AND id = $2",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(i16::from(memory.importance))
    .bind(combined_confidence(f64::from(existing_confidence), memory.confidence.get()) as f32)
    .execute(&mut **tx)
    .await?;
    Ok(true)
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
        "INSERT INTO memory_sources (organization_id, memory_id, conversation_id, generation, kind)
         VALUES ($1, $2, $3, $4, 'created')",
    )
    .bind(event.organization_id)
    .bind(memory_id)
    .bind(&extraction.conversation_id)
    .bind(event.generation)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_words_mark_sensitive_memories() {
        assert_eq!(sensitive_class_of("Zuri has a severe tree nut allergy"), Some("health"));
        assert_eq!(sensitive_class_of("Grace is diabetic"), Some("health"));
        assert_eq!(sensitive_class_of("Prefers lemon sponge"), None);
    }

    #[test]
    fn confidence_rises_with_evidence_and_stays_bounded() {
        assert!((combined_confidence(0.7, 0.7) - 0.91).abs() < 1e-9);
        assert_eq!(combined_confidence(1.0, 0.2), 1.0);
        assert!(combined_confidence(0.5, 0.0) >= 0.5);
    }
}
