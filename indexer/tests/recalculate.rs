//! `elaaoms dedup`'s recalculation against the real Postgres and model:
//! a lowered bar merges what the indexer kept apart, never another person
//! or another agent's private memory; a dry run changes nothing; a second
//! run finds nothing; a replay afterwards still takes back exactly what its
//! conversation brought.

mod common;

use elaaoms_indexer::apply::apply_extraction;
use elaaoms_indexer::dedup::RulesThresholds;
use elaaoms_indexer::recalculate::{callers_after, recalculate_caller};
use elaaoms_indexer::{Applied, DedupSettings, Verdicts};
use elaaoms_shared::bus::Envelope;
use elaaoms_shared::domain::{Confidence, ExtractedMemory, Importance, MemoryContent, MemoryType};
use elaaoms_shared::events::MemoriesExtracted;
use elaaoms_shared::test_support::TestDatabase;
use uuid::Uuid;

use common::embedder;

const BAKERY: &str = "agent_bakery";
const DENTAL: &str = "agent_dental";
const MAYA: &str = "+14155550123";

async fn setup() -> (TestDatabase, Uuid) {
    let db = TestDatabase::create().await;
    let org = common::organization_with_caller(&db, &[BAKERY, DENTAL], MAYA).await;
    (db, org)
}

/// Applies one conversation's extraction (creating the conversation for
/// generation 1, bumping it for a replay).
async fn apply(
    db: &TestDatabase,
    org: Uuid,
    conversation_id: &str,
    agent: &str,
    generation: i32,
    memories: &[(&str, i64)],
) {
    if generation == 1 {
        common::pending_conversation(db, org, conversation_id, agent, MAYA).await;
    } else {
        common::replayed(db, org, conversation_id).await;
    }
    let event = Envelope::new(
        org,
        generation,
        MemoriesExtracted {
            conversation_id: conversation_id.to_owned(),
            agent_id: agent.to_owned(),
            caller_id: MAYA.to_owned(),
            memories: memories
                .iter()
                .map(|(content, importance)| ExtractedMemory {
                    content: MemoryContent::new(*content).unwrap(),
                    memory_type: MemoryType::Preference,
                    importance: Importance::new(*importance).unwrap(),
                    confidence: Confidence::new(0.7).unwrap(),
                    source_quote: None,
                })
                .collect(),
            resolved_issue_ids: Vec::new(),
            extractor: "test".to_owned(),
        },
    );
    let texts = memories.iter().map(|(c, _)| (*c).to_owned()).collect();
    let embeddings = embedder().embed(texts).await.unwrap();
    let applied = apply_extraction(
        &db.pool,
        &event,
        &embeddings,
        embedder().model_name(),
        &DedupSettings::default(),
        &Verdicts::default(),
    )
    .await
    .unwrap();
    assert!(matches!(applied, Applied::Done(_)), "{applied:?}");
}

/// (content, agent, reinforcement_count, importance), in content order.
async fn memories(db: &TestDatabase, org: Uuid) -> Vec<(String, String, i32, i16)> {
    sqlx::query_as(
        "SELECT content, agent_id, reinforcement_count, importance FROM memories
          WHERE organization_id = $1 ORDER BY content",
    )
    .bind(org)
    .fetch_all(&db.admin_pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_lowered_bar_merges_what_the_indexer_kept_apart_and_nothing_else() {
    let (db, org) = setup().await;
    apply(
        &db,
        org,
        "conv_0",
        BAKERY,
        1,
        &[("Likes lemon sponge cake", 5)],
    )
    .await;
    apply(
        &db,
        org,
        "conv_1",
        BAKERY,
        1,
        &[
            ("Is very fond of lemon cake", 7),
            ("Maya's son likes lemon sponge cake", 5),
        ],
    )
    .await;
    // The dental agent's private memory: the bakery's is not visible to it.
    apply(
        &db,
        org,
        "conv_2",
        DENTAL,
        1,
        &[("Really likes lemon sponge cake", 5)],
    )
    .await;
    let before = memories(&db, org).await;
    assert_eq!(before.len(), 4, "kept apart at the 0.85 bar: {before:?}");

    let lowered = RulesThresholds {
        duplicate: 0.6,
        ..RulesThresholds::default()
    };
    let dry = recalculate_caller(&db.pool, org, MAYA, lowered, true)
        .await
        .unwrap();
    assert_eq!(dry.len(), 1, "{dry:?}");
    assert_eq!(dry[0].merged_content, "Is very fond of lemon cake");
    assert_eq!(dry[0].kept_content, "Likes lemon sponge cake");
    assert!(
        dry[0].similarity >= 0.6 && dry[0].similarity < 0.85,
        "{dry:?}"
    );
    assert_eq!(
        memories(&db, org).await,
        before,
        "a dry run changes nothing"
    );

    let merged = recalculate_caller(&db.pool, org, MAYA, lowered, false)
        .await
        .unwrap();
    assert_eq!(merged, dry, "the dry run reported exactly what is merged");
    assert_eq!(
        memories(&db, org).await,
        vec![
            ("Likes lemon sponge cake".into(), BAKERY.into(), 1, 7),
            (
                "Maya's son likes lemon sponge cake".into(),
                BAKERY.into(),
                0,
                5
            ),
            ("Really likes lemon sponge cake".into(), DENTAL.into(), 0, 5),
        ]
    );
    let (merged_text, sources): (Option<String>, Vec<String>) = {
        let text = sqlx::query_scalar(
            "SELECT metadata->'merged'->0->>'content' FROM memories WHERE organization_id = $1 AND content = $2",
        )
        .bind(org)
        .bind("Likes lemon sponge cake")
        .fetch_one(&db.admin_pool)
        .await
        .unwrap();
        let sources = sqlx::query_scalar(
            "SELECT s.conversation_id || ':' || s.kind FROM memory_sources s JOIN memories m ON m.id = s.memory_id
              WHERE m.organization_id = $1 AND m.content = $2 ORDER BY 1",
        )
        .bind(org)
        .bind("Likes lemon sponge cake")
        .fetch_all(&db.admin_pool)
        .await
        .unwrap();
        (text, sources)
    };
    assert_eq!(merged_text.as_deref(), Some("Is very fond of lemon cake"));
    assert_eq!(sources, vec!["conv_0:created", "conv_1:reinforced"]);

    let again = recalculate_caller(&db.pool, org, MAYA, lowered, false)
        .await
        .unwrap();
    assert!(again.is_empty(), "nothing left to merge: {again:?}");

    // A replay of conv_1 that no longer says it takes back its
    // reinforcement and the importance it brought.
    apply(&db, org, "conv_1", BAKERY, 2, &[]).await;
    let after_replay = memories(&db, org).await;
    assert_eq!(
        after_replay[0],
        ("Likes lemon sponge cake".into(), BAKERY.into(), 0, 5),
        "{after_replay:?}"
    );

    assert_eq!(
        callers_after(&db.pool, org, "", 10).await.unwrap(),
        vec![MAYA.to_owned()]
    );
    assert!(callers_after(&db.pool, org, MAYA, 10)
        .await
        .unwrap()
        .is_empty());
}
