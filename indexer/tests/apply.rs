//! Applying extractions against the real Postgres (pgvector, RLS, the
//! service role) with embeddings from the real model: reinforce, conflict,
//! insert, sharing, redelivery, replay, concurrency, tombstones.

mod common;

use elaaoms_indexer::apply::apply_extraction;
use elaaoms_indexer::{Applied, DedupSettings, Outcome, Verdicts};
use elaaoms_shared::bus::Envelope;
use elaaoms_shared::db;
use elaaoms_shared::domain::{Confidence, ExtractedMemory, Importance, MemoryContent, MemoryType};
use elaaoms_shared::events::MemoriesExtracted;
use elaaoms_shared::test_support::TestDatabase;
use uuid::Uuid;

use common::embedder;

const BAKERY: &str = "agent_bakery";
const DENTAL: &str = "agent_dental";
const MAYA: &str = "+14155550123";

struct World {
    db: TestDatabase,
    org: Uuid,
}

impl World {
    async fn create() -> Self {
        let db = TestDatabase::create().await;
        let org = common::organization_with_caller(&db, &[BAKERY, DENTAL], MAYA).await;
        Self { db, org }
    }

    /// A conversation waiting for its extraction to be applied.
    async fn conversation(&self, conversation_id: &str, agent: &str) {
        common::pending_conversation(&self.db, self.org, conversation_id, agent, MAYA).await;
    }

    /// What a replay does to the conversation: back to pending, generation + 1.
    async fn replay(&self, conversation_id: &str) {
        common::replayed(&self.db, self.org, conversation_id).await;
    }

    fn event(
        &self,
        conversation_id: &str,
        agent: &str,
        generation: i32,
        memories: &[Memory],
    ) -> Envelope<MemoriesExtracted> {
        Envelope::new(
            self.org,
            generation,
            MemoriesExtracted {
                conversation_id: conversation_id.to_owned(),
                agent_id: agent.to_owned(),
                caller_id: MAYA.to_owned(),
                memories: memories.iter().map(Memory::extracted).collect(),
                resolved_issue_ids: Vec::new(),
                extractor: "test".to_owned(),
            },
        )
    }

    async fn apply(&self, event: &Envelope<MemoriesExtracted>) -> Applied {
        apply_event(&self.db.pool, event).await
    }

    async fn memories(&self) -> Vec<Row> {
        sqlx::query_as(
            "SELECT id, content, type, importance, is_shareable, confidence::float8 AS confidence, reinforcement_count,
                    last_reinforced_at IS NOT NULL AS reinforced_at_set, status, metadata, agent_id
               FROM memories WHERE organization_id = $1 ORDER BY created_at, content",
        )
        .bind(self.org)
        .fetch_all(&self.db.admin_pool)
        .await
        .unwrap()
    }

    async fn memory(&self, content: &str) -> Row {
        let rows = self.memories().await;
        rows.into_iter()
            .find(|row| row.content == content)
            .unwrap_or_else(|| panic!("no memory {content:?}"))
    }

    async fn sources(&self, memory_id: Uuid) -> Vec<(String, i32, String)> {
        sqlx::query_as(
            "SELECT conversation_id, generation, kind FROM memory_sources WHERE memory_id = $1
              ORDER BY conversation_id, generation",
        )
        .bind(memory_id)
        .fetch_all(&self.db.admin_pool)
        .await
        .unwrap()
    }
}

async fn apply_event(pool: &sqlx::PgPool, event: &Envelope<MemoriesExtracted>) -> Applied {
    let texts = event
        .payload
        .memories
        .iter()
        .map(|m| m.content.as_str().to_owned())
        .collect();
    let embeddings = embedder().embed(texts).await.expect("embeddings");
    apply_extraction(
        pool,
        event,
        &embeddings,
        embedder().model_name(),
        &DedupSettings::default(),
        &Verdicts::default(),
    )
    .await
    .expect("applied")
}

#[derive(Debug, Clone, sqlx::FromRow)]
#[allow(dead_code)]
struct Row {
    id: Uuid,
    content: String,
    #[sqlx(rename = "type")]
    memory_type: String,
    importance: i16,
    is_shareable: bool,
    confidence: f64,
    reinforcement_count: i32,
    reinforced_at_set: bool,
    status: Option<String>,
    metadata: serde_json::Value,
    agent_id: String,
}

struct Memory(&'static str, MemoryType, i64);

impl Memory {
    fn extracted(&self) -> ExtractedMemory {
        ExtractedMemory {
            content: MemoryContent::new(self.0).unwrap(),
            memory_type: self.1,
            importance: Importance::new(self.2).unwrap(),
            confidence: Confidence::new(0.7).unwrap(),
            source_quote: None,
        }
    }
}

fn done(applied: Applied) -> Outcome {
    match applied {
        Applied::Done(outcome) => outcome,
        other => panic!("expected Done, got {other:?}"),
    }
}

use MemoryType::{Factual, Issue, Preference, Relationship};

#[tokio::test]
async fn a_duplicate_reinforces_and_importance_8_makes_it_shareable() {
    let world = World::create().await;
    world.conversation("conv_1", BAKERY).await;
    world.conversation("conv_2", BAKERY).await;
    let first = done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                1,
                &[Memory("Zuri has a severe tree nut allergy", Factual, 7)],
            ))
            .await,
    );
    assert_eq!((first.created, first.reinforced), (1, 0));
    let before = world.memory("Zuri has a severe tree nut allergy").await;
    assert!(!before.is_shareable);

    let second = done(
        world
            .apply(&world.event(
                "conv_2",
                BAKERY,
                1,
                &[Memory("Zuri is severely allergic to tree nuts", Factual, 9)],
            ))
            .await,
    );
    assert_eq!(
        (second.created, second.reinforced, second.conflicted),
        (0, 1, 0),
        "{second:?}"
    );
    assert!(second.best_similarities[0] >= 0.85, "{second:?}");
    let rows = world.memories().await;
    assert_eq!(rows.len(), 1);
    let after = &rows[0];
    assert_eq!(after.content, "Zuri has a severe tree nut allergy");
    assert_eq!(after.reinforcement_count, 1);
    assert!(after.reinforced_at_set);
    assert_eq!(after.importance, 9);
    assert!(after.is_shareable, "importance 9 is shareable");
    assert!(
        (after.confidence - 0.91).abs() < 1e-3,
        "0.7 and 0.7 make 0.91: {}",
        after.confidence
    );
    assert_eq!(
        world.sources(after.id).await,
        vec![
            ("conv_1".into(), 1, "created".into()),
            ("conv_2".into(), 1, "reinforced".into())
        ]
    );
    let status: String =
        sqlx::query_scalar("SELECT status FROM conversations WHERE conversation_id = 'conv_2'")
            .fetch_one(&world.db.admin_pool)
            .await
            .unwrap();
    assert_eq!(status, "extraction_completed");
}

#[tokio::test]
async fn a_negation_is_a_conflict_that_keeps_the_old_value() {
    let world = World::create().await;
    world.conversation("conv_1", DENTAL).await;
    world.conversation("conv_2", DENTAL).await;
    done(
        world
            .apply(&world.event(
                "conv_1",
                DENTAL,
                1,
                &[Memory("Priya is allergic to penicillin", Factual, 10)],
            ))
            .await,
    );
    let outcome = done(
        world
            .apply(&world.event(
                "conv_2",
                DENTAL,
                1,
                &[Memory("Priya is not allergic to penicillin", Factual, 9)],
            ))
            .await,
    );
    assert_eq!(
        (outcome.created, outcome.reinforced, outcome.conflicted),
        (0, 0, 1),
        "{outcome:?}"
    );
    let rows = world.memories().await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.content, "Priya is not allergic to penicillin");
    assert_eq!(row.importance, 10, "the larger importance stays");
    let conflicts = row.metadata["conflicts"].as_array().expect("conflicts[]");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0]["content"], "Priya is allergic to penicillin");
    assert!(conflicts[0]["created_at"].is_string());
    assert_eq!(conflicts[0]["conversation_id"], "conv_2");
    assert_eq!(
        world.sources(row.id).await,
        vec![
            ("conv_1".into(), 1, "created".into()),
            ("conv_2".into(), 1, "conflict".into())
        ]
    );
    // The stored embedding is the new content's: searching for it finds it exactly.
    let vector = pgvector::Vector::from(
        embedder()
            .embed_one("Priya is not allergic to penicillin")
            .await
            .unwrap(),
    );
    let similarity: f64 =
        sqlx::query_scalar("SELECT -(embedding <#> $1)::float8 FROM memories WHERE id = $2")
            .bind(vector)
            .bind(row.id)
            .fetch_one(&world.db.admin_pool)
            .await
            .unwrap();
    assert!(similarity > 0.999, "{similarity}");
}

#[tokio::test]
async fn other_people_and_other_times_are_not_merged() {
    let world = World::create().await;
    world.conversation("conv_1", DENTAL).await;
    world.conversation("conv_2", DENTAL).await;
    done(
        world
            .apply(&world.event(
                "conv_1",
                DENTAL,
                1,
                &[
                    Memory("Priya is allergic to penicillin", Factual, 10),
                    Memory("Priya prefers appointments at 8 am", Preference, 6),
                ],
            ))
            .await,
    );
    let outcome = done(
        world
            .apply(&world.event(
                "conv_2",
                DENTAL,
                1,
                &[
                    Memory("Priya's son is allergic to penicillin", Factual, 10),
                    Memory("Priya prefers appointments at 5 pm", Preference, 6),
                ],
            ))
            .await,
    );
    assert_eq!(
        (outcome.created, outcome.reinforced, outcome.conflicted),
        (1, 0, 1),
        "{outcome:?}"
    );
    let contents: Vec<String> = world
        .memories()
        .await
        .into_iter()
        .map(|row| row.content)
        .collect();
    assert!(contents.contains(&"Priya is allergic to penicillin".to_owned()));
    assert!(contents.contains(&"Priya's son is allergic to penicillin".to_owned()));
    assert!(contents.contains(&"Priya prefers appointments at 5 pm".to_owned()));
    assert_eq!(contents.len(), 3);
}

#[tokio::test]
async fn one_batch_deduplicates_among_itself() {
    let world = World::create().await;
    world.conversation("conv_1", BAKERY).await;
    let outcome = done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                1,
                &[
                    Memory("Zuri has a severe tree nut allergy", Factual, 10),
                    Memory("Zuri is severely allergic to tree nuts", Factual, 10),
                ],
            ))
            .await,
    );
    // The second finds the first (the transaction sees its own insert); the
    // same conversation saying a thing twice counts once.
    assert_eq!((outcome.created, outcome.reinforced), (1, 0), "{outcome:?}");
    let rows = world.memories().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].reinforcement_count, 0);
}

#[tokio::test]
async fn a_redelivered_extraction_changes_nothing() {
    let world = World::create().await;
    world.conversation("conv_1", BAKERY).await;
    world.conversation("conv_2", BAKERY).await;
    done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                1,
                &[Memory("Prefers a less sweet frosting", Preference, 5)],
            ))
            .await,
    );
    let event = world.event(
        "conv_2",
        BAKERY,
        1,
        &[
            Memory("Prefers frosting that is less sweet", Preference, 5),
            Memory("Maya teaches middle school", Factual, 5),
        ],
    );
    let first = done(world.apply(&event).await);
    assert_eq!((first.created, first.reinforced), (1, 1), "{first:?}");
    let before: Vec<(String, i32)> = world
        .memories()
        .await
        .into_iter()
        .map(|r| (r.content, r.reinforcement_count))
        .collect();
    assert_eq!(world.apply(&event).await, Applied::AlreadyApplied);
    let after: Vec<(String, i32)> = world
        .memories()
        .await
        .into_iter()
        .map(|r| (r.content, r.reinforcement_count))
        .collect();
    assert_eq!(before, after);
}

#[tokio::test]
async fn another_agents_private_memory_is_never_reinforced() {
    let world = World::create().await;
    world.conversation("conv_bakery", BAKERY).await;
    world.conversation("conv_dental", DENTAL).await;
    world.conversation("conv_dental_2", DENTAL).await;
    // Importance 5: the bakery's own; importance 8 and not health: shared.
    done(
        world
            .apply(&world.event(
                "conv_bakery",
                BAKERY,
                1,
                &[
                    Memory("Prefers text messages over phone calls", Preference, 5),
                    Memory("Husband Daniel picks up the orders", Relationship, 8),
                ],
            ))
            .await,
    );
    let outcome = done(
        world
            .apply(&world.event(
                "conv_dental",
                DENTAL,
                1,
                &[
                    Memory("Prefers text messages over phone calls", Preference, 5),
                    Memory("Husband Daniel picks up the orders", Relationship, 8),
                ],
            ))
            .await,
    );
    assert_eq!((outcome.created, outcome.reinforced), (1, 1), "{outcome:?}");
    let rows = world.memories().await;
    let texts: Vec<(&str, &str, i32)> = rows
        .iter()
        .filter(|r| r.content.starts_with("Prefers text"))
        .map(|r| {
            (
                r.agent_id.as_str(),
                r.content.as_str(),
                r.reinforcement_count,
            )
        })
        .collect();
    assert_eq!(
        texts.len(),
        2,
        "each agent has its own private memory: {texts:?}"
    );
    assert!(texts.iter().all(|(_, _, count)| *count == 0));
    let shared = world.memory("Husband Daniel picks up the orders").await;
    assert_eq!(
        (shared.agent_id.as_str(), shared.reinforcement_count),
        (BAKERY, 1)
    );

    // A sensitive (health) memory is private to its agent unless the
    // organization opts in, even at importance 10.
    done(
        world
            .apply(&world.event(
                "conv_dental_2",
                DENTAL,
                1,
                &[Memory("Priya is allergic to penicillin", Factual, 10)],
            ))
            .await,
    );
    world.conversation("conv_bakery_2", BAKERY).await;
    let outcome = done(
        world
            .apply(&world.event(
                "conv_bakery_2",
                BAKERY,
                1,
                &[Memory("Priya is allergic to penicillin", Factual, 10)],
            ))
            .await,
    );
    assert_eq!((outcome.created, outcome.reinforced), (1, 0), "{outcome:?}");
}

#[tokio::test]
async fn a_resolved_issue_becomes_resolved() {
    let world = World::create().await;
    world.conversation("conv_1", BAKERY).await;
    world.conversation("conv_2", BAKERY).await;
    done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                1,
                &[Memory(
                    "Croissants bought two weeks ago were burnt on the bottom",
                    Issue,
                    5,
                )],
            ))
            .await,
    );
    let issue = world.memories().await.remove(0);
    assert_eq!(issue.status.as_deref(), Some("open"));
    let mut event = world.event("conv_2", BAKERY, 1, &[]);
    event.payload.resolved_issue_ids = vec![issue.id, Uuid::new_v4()];
    let outcome = done(world.apply(&event).await);
    assert_eq!(outcome.resolved, 1);
    let resolved: (String, bool) =
        sqlx::query_as("SELECT status, resolved_at IS NOT NULL FROM memories WHERE id = $1")
            .bind(issue.id)
            .fetch_one(&world.db.admin_pool)
            .await
            .unwrap();
    assert_eq!(resolved, ("resolved".to_owned(), true));
}

#[tokio::test]
async fn an_erased_caller_is_dropped() {
    let world = World::create().await;
    world.conversation("conv_1", BAKERY).await;
    sqlx::query("INSERT INTO erased_callers (organization_id, caller_hash) VALUES ($1, $2)")
        .bind(world.org)
        .bind(db::caller_hash(MAYA))
        .execute(&world.db.admin_pool)
        .await
        .unwrap();
    let applied = world
        .apply(&world.event(
            "conv_1",
            BAKERY,
            1,
            &[Memory("Maya teaches middle school", Factual, 5)],
        ))
        .await;
    assert_eq!(applied, Applied::Erased);
    assert!(world.memories().await.is_empty());
}

#[tokio::test]
async fn two_indexers_on_one_caller_create_one_memory() {
    let world = World::create().await;
    world.conversation("conv_1", BAKERY).await;
    world.conversation("conv_2", BAKERY).await;
    let one = world.event(
        "conv_1",
        BAKERY,
        1,
        &[Memory("Maya teaches middle school", Factual, 5)],
    );
    let two = world.event(
        "conv_2",
        BAKERY,
        1,
        &[Memory("Maya is a middle school teacher", Factual, 5)],
    );
    // Two tasks on two connections of the pool, as two indexers would be.
    let pool = world.db.pool.clone();
    let first = tokio::spawn({
        let pool = pool.clone();
        async move { apply_event(&pool, &one).await }
    });
    let second = tokio::spawn(async move { apply_event(&pool, &two).await });
    let (first, second) = (done(first.await.unwrap()), done(second.await.unwrap()));
    assert_eq!(first.created + second.created, 1, "{first:?} {second:?}");
    assert_eq!(
        first.reinforced + second.reinforced,
        1,
        "{first:?} {second:?}"
    );
    let rows = world.memories().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].reinforcement_count, 1);
}

#[tokio::test]
async fn a_replay_replaces_the_earlier_generation() {
    let world = World::create().await;
    for conversation in ["conv_0", "conv_1", "conv_2"] {
        world.conversation(conversation, BAKERY).await;
    }
    // conv_0 states a time; conv_1 (generation 1) changes it, creates two
    // memories and reinforces one of conv_0's; conv_2 reinforces one of conv_1's.
    done(
        world
            .apply(&world.event(
                "conv_0",
                BAKERY,
                1,
                &[
                    Memory("Prefers pickup at 10 am on Saturdays", Preference, 5),
                    Memory("Maya teaches middle school", Factual, 5),
                ],
            ))
            .await,
    );
    let gen1 = done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                1,
                &[
                    Memory("Prefers pickup at 2 pm on Saturdays", Preference, 5),
                    Memory("Zuri has a severe tree nut allergy", Factual, 10),
                    Memory("Zuri loves purple", Preference, 3),
                    Memory("Maya is a middle school teacher", Factual, 5),
                ],
            ))
            .await,
    );
    assert_eq!(
        (gen1.created, gen1.reinforced, gen1.conflicted),
        (2, 1, 1),
        "{gen1:?}"
    );
    done(
        world
            .apply(&world.event(
                "conv_2",
                BAKERY,
                1,
                &[Memory(
                    "Zuri is severely allergic to tree nuts",
                    Factual,
                    10,
                )],
            ))
            .await,
    );
    assert_eq!(
        world
            .memory("Zuri has a severe tree nut allergy")
            .await
            .reinforcement_count,
        1
    );
    assert_eq!(
        world
            .memory("Prefers pickup at 2 pm on Saturdays")
            .await
            .content,
        "Prefers pickup at 2 pm on Saturdays"
    );

    // Generation 2 of conv_1 says less: the nut allergy and the teacher only.
    world.replay("conv_1").await;
    let gen2 = done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                2,
                &[
                    Memory("Zuri has a severe tree nut allergy", Factual, 10),
                    Memory("Maya is a middle school teacher", Factual, 5),
                ],
            ))
            .await,
    );
    assert_eq!(
        gen2.replaced_memories, 1,
        "only 'Zuri loves purple' had conv_1 as its only source: {gen2:?}"
    );
    assert_eq!(gen2.reinforcements_taken_back, 1, "{gen2:?}");

    let rows = world.memories().await;
    let contents: Vec<(&str, i32)> = rows
        .iter()
        .map(|r| (r.content.as_str(), r.reinforcement_count))
        .collect();
    assert_eq!(rows.len(), 3, "{contents:?}");
    // The replaced time is back, and its conflict entry is gone.
    let pickup = world.memory("Prefers pickup at 10 am on Saturdays").await;
    assert!(
        pickup
            .metadata
            .get("conflicts")
            .and_then(|c| c.as_array())
            .is_none_or(|c| c.is_empty()),
        "{:?}",
        pickup.metadata
    );
    assert_eq!(pickup.reinforcement_count, 0);
    // Reinforced once by conv_2 and once by conv_1's generation 2, not more.
    let nuts = world.memory("Zuri has a severe tree nut allergy").await;
    assert_eq!(nuts.reinforcement_count, 1, "{contents:?}");
    let mut nut_sources = world.sources(nuts.id).await;
    nut_sources.sort();
    assert_eq!(
        nut_sources,
        vec![
            ("conv_1".into(), 2, "reinforced".into()),
            ("conv_2".into(), 1, "created".into())
        ]
    );
    let teacher = world.memory("Maya teaches middle school").await;
    assert_eq!(
        teacher.reinforcement_count, 1,
        "taken back once, reinforced again once: {contents:?}"
    );
    assert!(!world
        .sources(teacher.id)
        .await
        .iter()
        .any(|(c, g, _)| c == "conv_1" && *g == 1));

    // An old generation arriving late is dropped; the new one redelivered is a no-op.
    let late = world.event(
        "conv_1",
        BAKERY,
        1,
        &[Memory("Zuri loves purple", Preference, 3)],
    );
    assert_eq!(world.apply(&late).await, Applied::Dropped);
    let again = world.event(
        "conv_1",
        BAKERY,
        2,
        &[Memory("Zuri loves purple", Preference, 3)],
    );
    assert_eq!(world.apply(&again).await, Applied::AlreadyApplied);
    assert_eq!(world.memories().await.len(), 3);
}

/// The two bakery calls of tests/fixtures/elevenlabs (README: "Maya again;
/// dedup/reinforcement"), written as an extractor would write them.
#[tokio::test]
async fn mayas_second_call_reinforces_what_the_rules_can_tell() {
    let world = World::create().await;
    world
        .conversation("conv_wxgkkg26wh6wcecpnv68bert84", BAKERY)
        .await;
    world
        .conversation("conv_9qgrnn8wf286kk516ewwhhsb3k", BAKERY)
        .await;
    let first_call = [
        Memory("The caller's name is Maya Okafor", Factual, 6),
        Memory("Maya's daughter Zuri turns seven on 15 November", Relationship, 7),
        Memory("Zuri has a severe tree nut allergy and carries an EpiPen: no almonds, walnuts, pistachios or almond extract", Factual, 10),
        Memory("Maya and Zuri prefer lemon sponge with raspberry filling", Preference, 6),
        Memory("Prefers a less sweet frosting; found last year's buttercream too sugary", Preference, 5),
        Memory("Husband Daniel picks up the orders", Relationship, 5),
        Memory("Zuri loves purple; everything is purple this year", Preference, 3),
        Memory("Croissants bought about two weeks ago were burnt on the bottom", Issue, 5),
        Memory("Felt stressed planning a party for 30 people on top of work", MemoryType::Emotion, 3),
        Memory("Ordered a half-sheet cake for pickup on Saturday 15 November at 10:00, $68", Factual, 4),
    ];
    let first = done(
        world
            .apply(&world.event("conv_wxgkkg26wh6wcecpnv68bert84", BAKERY, 1, &first_call))
            .await,
    );
    assert_eq!(first.created, 10, "{first:?}");
    let croissants = world
        .memory("Croissants bought about two weeks ago were burnt on the bottom")
        .await;

    let second_call = [
        Memory("Her youngest child reacts to all nuts, so no pecan crumble and no almond flour", Factual, 10),
        Memory("The family still loves lemon with raspberry", Preference, 6),
        Memory("The caller is Maya Okafor", Factual, 6),
        Memory("Mother-in-law Grace is visiting from Atlanta for Thanksgiving week", Relationship, 6),
        Memory("Grace is diabetic and wants reduced-sugar options", Factual, 7),
        Memory("Prefers text messages; do not call her cell on weekdays before 5 pm", Preference, 7),
        Memory("Maya teaches middle school", Factual, 5),
        Memory("Zuri's birthday party was a success and Maya was very happy with the cake", MemoryType::Emotion, 4),
        Memory("Daniel works double shifts at times", Relationship, 3),
        Memory("Ordered a reduced-sugar pumpkin pie, an apple pie and a six-inch lemon tart for pickup on Wednesday 26 November at 16:00, $74", Factual, 4),
    ];
    let mut event = world.event("conv_9qgrnn8wf286kk516ewwhhsb3k", BAKERY, 1, &second_call);
    event.payload.resolved_issue_ids = vec![croissants.id];
    let second = done(world.apply(&event).await);
    println!("second call: {second:?}");
    for row in world.memories().await {
        println!(
            "{:>2} {:12} {}",
            row.reinforcement_count, row.memory_type, row.content
        );
    }
    // The name is said twice in close words: reinforced, not inserted.
    let name = world.memory("The caller's name is Maya Okafor").await;
    assert_eq!(name.reinforcement_count, 1);
    assert!(!world
        .memories()
        .await
        .iter()
        .any(|r| r.content == "The caller is Maya Okafor"));
    // Nothing of the first call is lost or overwritten.
    let contents: Vec<String> = world
        .memories()
        .await
        .into_iter()
        .map(|r| r.content)
        .collect();
    for memory in &first_call {
        assert!(
            contents.iter().any(|c| c == memory.0),
            "{} is gone",
            memory.0
        );
    }
    assert_eq!(second.conflicted, 0, "{second:?}");
    assert_eq!(second.resolved, 1);
    // The nut allergy and the lemon preference are said in words too far
    // apart for the rules (cosine about 0.4): they are inserted. This is
    // where the LLM judge is needed.
    assert_eq!((second.created, second.reinforced), (9, 1), "{second:?}");
}

/// Deduplication uses the one sharing predicate, so the organization's
/// policy decides what another agent's call may reinforce.
#[tokio::test]
async fn the_sharing_policy_decides_what_another_agent_may_reinforce() {
    for (policy, share_sensitive, memory, expected_reinforced) in [
        (
            "all",
            false,
            Memory("Maya teaches middle school", Factual, 5),
            1,
        ),
        (
            "none",
            false,
            Memory("Husband Daniel picks up the orders", Relationship, 9),
            0,
        ),
        (
            "by_importance",
            true,
            Memory("Zuri has a severe tree nut allergy", Factual, 10),
            1,
        ),
        (
            "by_importance",
            false,
            Memory("Zuri has a severe tree nut allergy", Factual, 10),
            0,
        ),
    ] {
        let world = World::create().await;
        sqlx::query(
            "UPDATE organizations SET sharing_policy = $2, share_sensitive = $3 WHERE id = $1",
        )
        .bind(world.org)
        .bind(policy)
        .bind(share_sensitive)
        .execute(&world.db.admin_pool)
        .await
        .unwrap();
        world.conversation("conv_bakery", BAKERY).await;
        world.conversation("conv_dental", DENTAL).await;
        let text = memory.0;
        done(
            world
                .apply(&world.event("conv_bakery", BAKERY, 1, &[memory]))
                .await,
        );
        let outcome = done(
            world
                .apply(&world.event(
                    "conv_dental",
                    DENTAL,
                    1,
                    &[Memory(
                        text,
                        MemoryType::parse(&world.memory(text).await.memory_type).unwrap(),
                        5,
                    )],
                ))
                .await,
        );
        assert_eq!(
            outcome.reinforced, expected_reinforced,
            "{policy} share_sensitive={share_sensitive}: {outcome:?}"
        );
        assert_eq!(
            outcome.created,
            1 - expected_reinforced,
            "{policy}: {outcome:?}"
        );
    }
}

/// A replay also takes back what the earlier generation did to importance
/// (and so to is_shareable) and to issues it resolved.
#[tokio::test]
async fn a_replay_takes_back_raised_importance_and_resolved_issues() {
    let world = World::create().await;
    for conversation in ["conv_0", "conv_1"] {
        world.conversation(conversation, BAKERY).await;
    }
    done(
        world
            .apply(&world.event(
                "conv_0",
                BAKERY,
                1,
                &[
                    Memory("Maya is a middle school teacher", Factual, 5),
                    Memory(
                        "Croissants bought last week were burnt on the bottom",
                        Issue,
                        6,
                    ),
                ],
            ))
            .await,
    );
    let issue = world
        .memory("Croissants bought last week were burnt on the bottom")
        .await;
    // conv_1 reinforces the fact with importance 9 (shareable) and resolves the issue.
    let mut event = world.event(
        "conv_1",
        BAKERY,
        1,
        &[Memory("Maya teaches middle school", Factual, 9)],
    );
    event.payload.resolved_issue_ids = vec![issue.id];
    let gen1 = done(world.apply(&event).await);
    assert_eq!((gen1.reinforced, gen1.resolved), (1, 1), "{gen1:?}");
    let teacher = world.memory("Maya is a middle school teacher").await;
    assert_eq!((teacher.importance, teacher.is_shareable), (9, true));
    assert_eq!(
        world
            .memory("Croissants bought last week were burnt on the bottom")
            .await
            .status
            .as_deref(),
        Some("resolved")
    );

    // Generation 2 of conv_1 reinforces with importance 6 and resolves nothing.
    world.replay("conv_1").await;
    let gen2 = done(
        world
            .apply(&world.event(
                "conv_1",
                BAKERY,
                2,
                &[Memory("Maya teaches middle school", Factual, 6)],
            ))
            .await,
    );
    assert_eq!(
        (
            gen2.reinforced,
            gen2.reinforcements_taken_back,
            gen2.resolved
        ),
        (1, 1, 0),
        "{gen2:?}"
    );
    let teacher = world.memory("Maya is a middle school teacher").await;
    assert_eq!(
        (
            teacher.importance,
            teacher.is_shareable,
            teacher.reinforcement_count
        ),
        (6, false, 1),
        "the 9 came only from generation 1"
    );
    let reopened: (Option<String>, bool, Option<String>) = sqlx::query_as(
        "SELECT status, resolved_at IS NULL, resolved_by_conversation_id FROM memories WHERE id = $1",
    )
    .bind(issue.id)
    .fetch_one(&world.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(reopened, (Some("open".to_owned()), true, None));

    // Generation 3 resolves it again: resolved by the new generation.
    world.replay("conv_1").await;
    let mut event = world.event("conv_1", BAKERY, 3, &[]);
    event.payload.resolved_issue_ids = vec![issue.id];
    let gen3 = done(world.apply(&event).await);
    assert_eq!(gen3.resolved, 1);
    let resolved_by: (Option<String>, Option<i32>) = sqlx::query_as(
        "SELECT resolved_by_conversation_id, resolved_by_generation FROM memories WHERE id = $1",
    )
    .bind(issue.id)
    .fetch_one(&world.db.admin_pool)
    .await
    .unwrap();
    assert_eq!(resolved_by, (Some("conv_1".to_owned()), Some(3)));
    let teacher = world.memory("Maya is a middle school teacher").await;
    assert_eq!(
        (teacher.importance, teacher.reinforcement_count),
        (5, 0),
        "generation 3 took back generation 2's reinforcement"
    );
}
