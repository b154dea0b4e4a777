//! Setup shared by the indexer's test files: the model, an organization
//! with agents and one caller, and conversations waiting for extraction.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::sync::OnceLock;

use elaaoms_shared::embedder::Embedder;
use elaaoms_shared::test_support::TestDatabase;
use uuid::Uuid;

pub const SECRET: &str = "whsec_test_0123456789abcdef0123456789abcdef";

/// The local model, loaded once per test binary.
pub fn embedder() -> &'static Embedder {
    static EMBEDDER: OnceLock<Embedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        Embedder::local(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../data/models/all-MiniLM-L6-v2"
        )))
        .expect("model files: run deploy/local/setup.sh")
    })
}

/// A new organization with `agents` and the caller `caller`.
pub async fn organization_with_caller(db: &TestDatabase, agents: &[&str], caller: &str) -> Uuid {
    let org = db
        .create_organization(&format!("org-{}", Uuid::new_v4().simple()), SECRET)
        .await;
    for agent in agents {
        sqlx::query("INSERT INTO agents (organization_id, agent_id) VALUES ($1, $2)")
            .bind(org)
            .bind(agent)
            .execute(&db.admin_pool)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at) VALUES ($1, $2, now(), now())",
    )
    .bind(org)
    .bind(caller)
    .execute(&db.admin_pool)
    .await
    .unwrap();
    org
}

/// A conversation whose extraction is waiting to be applied.
pub async fn pending_conversation(
    db: &TestDatabase,
    org: Uuid,
    conversation_id: &str,
    agent: &str,
    caller: &str,
) {
    sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
         VALUES ($1, $2, $3, $4, now(), 'completed')",
    )
    .bind(org)
    .bind(conversation_id)
    .bind(agent)
    .bind(caller)
    .execute(&db.admin_pool)
    .await
    .unwrap();
    sqlx::query("UPDATE conversations SET status = 'extraction_pending' WHERE organization_id = $1 AND conversation_id = $2")
        .bind(org)
        .bind(conversation_id)
        .execute(&db.admin_pool)
        .await
        .unwrap();
}

/// What a replay does to the conversation: back to pending, generation + 1.
pub async fn replayed(db: &TestDatabase, org: Uuid, conversation_id: &str) {
    sqlx::query(
        "UPDATE conversations SET status = 'extraction_pending', generation = generation + 1
          WHERE organization_id = $1 AND conversation_id = $2",
    )
    .bind(org)
    .bind(conversation_id)
    .execute(&db.admin_pool)
    .await
    .unwrap();
}
