//! The schema against the real Postgres: migrations, pgvector, row-level
//! security and the conversation status machine.

use elaaoms_shared::db;
use elaaoms_shared::domain::{ConversationStatus, TransitionKind};
use elaaoms_shared::test_support::TestDatabase;
use sqlx::{PgPool, Row};
use uuid::Uuid;

const SECRET: &str = "whsec_test_0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn migrations_apply_once_and_a_second_run_changes_nothing() {
    let started = std::time::Instant::now();
    let database = TestDatabase::create().await;
    eprintln!(
        "test database {} ready in {:?}",
        database.name,
        started.elapsed()
    );

    let schema = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(table_name || '.' || column_name || ':' || data_type, ',' ORDER BY table_name, column_name)
               FROM information_schema.columns WHERE table_schema = 'public'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let applied_before: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&database.admin_pool)
        .await
        .unwrap();
    let schema_before = schema(database.admin_pool.clone()).await;
    db::migrate(&database.admin_pool).await.expect("second run");
    let applied_after: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&database.admin_pool)
        .await
        .unwrap();
    assert_eq!(applied_before, db::MIGRATOR.iter().count() as i64);
    assert_eq!(applied_before, applied_after);
    assert_eq!(schema_before, schema(database.admin_pool.clone()).await);

    let vector_version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            .fetch_one(&database.admin_pool)
            .await
            .unwrap();
    assert!(vector_version.starts_with("0.8"), "{vector_version}");
}

#[tokio::test]
async fn a_vector_round_trips_through_pgvector() {
    let database = TestDatabase::create().await;
    let values: Vec<f32> = (0..384).map(|i| (i as f32 - 192.0) / 1000.0).collect();
    let back: pgvector::Vector = sqlx::query_scalar("SELECT $1::vector(384)")
        .bind(pgvector::Vector::from(values.clone()))
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(back.to_vec(), values);
    let wrong_dimension = sqlx::query("SELECT $1::vector(384)")
        .bind(pgvector::Vector::from(vec![0.5_f32; 3]))
        .execute(&database.pool)
        .await;
    assert!(wrong_dimension.is_err());
}

#[tokio::test]
async fn the_service_role_cannot_bypass_row_level_security() {
    let database = TestDatabase::create().await;
    let (user, superuser, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert!(
        !superuser && !bypass,
        "{user} must be neither superuser nor BYPASSRLS"
    );
    let owns_tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(owns_tables, 0, "the service role must not own tables");

    let forced: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT relname::text, relrowsecurity, relforcerowsecurity FROM pg_class
          WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' AND relname <> '_sqlx_migrations'",
    )
    .fetch_all(&database.admin_pool)
    .await
    .unwrap();
    assert!(forced.len() >= 11);
    for (table, enabled, force) in forced {
        assert!(
            enabled && force,
            "{table} must ENABLE and FORCE row-level security"
        );
    }

    // The guard in connect_service_pool refuses a superuser.
    let refused = db::connect_service_pool(&database.admin_url, 1).await;
    assert!(
        matches!(refused, Err(db::DbError::PrivilegedServiceRole { .. })),
        "{refused:?}"
    );
}

async fn seed_caller(database: &TestDatabase, organization_id: Uuid, caller: &str) {
    let mut tx = db::begin_org_tx(&database.pool, organization_id)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
         VALUES ($1, $2, now(), now(), 1)",
    )
    .bind(organization_id)
    .bind(caller)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn each_organization_sees_only_its_own_rows() {
    let database = TestDatabase::create().await;
    let org_a = database.create_organization("org-a", SECRET).await;
    let org_b = database.create_organization("org-b", SECRET).await;
    // The same phone number in two organizations is two callers.
    seed_caller(&database, org_a, "+14155550123").await;
    seed_caller(&database, org_b, "+14155550123").await;

    // No organization set: nothing, not even with no filter at all.
    let unscoped: i64 = sqlx::query_scalar("SELECT count(*) FROM callers")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(unscoped, 0);
    let organizations: i64 = sqlx::query_scalar("SELECT count(*) FROM organizations")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(organizations, 0);

    let mut tx = db::begin_org_tx(&database.pool, org_a).await.unwrap();
    let visible: Vec<Uuid> = sqlx::query_scalar("SELECT organization_id FROM callers")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, vec![org_a]);
    // Writing another organization's row is refused by the policy.
    let foreign_insert = sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at) VALUES ($1, 'x', now(), now())",
    )
    .bind(org_b)
    .execute(&mut *tx)
    .await;
    assert!(
        foreign_insert.is_err(),
        "inserting into another organization must fail"
    );
    tx.rollback().await.unwrap();

    // Updates and deletes cannot reach the other organization either.
    let mut tx = db::begin_org_tx(&database.pool, org_a).await.unwrap();
    let deleted = sqlx::query("DELETE FROM callers WHERE organization_id = $1")
        .bind(org_b)
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 0);
    tx.commit().await.unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM callers")
        .fetch_one(&database.admin_pool)
        .await
        .unwrap();
    assert_eq!(total, 2);
}

#[tokio::test]
async fn a_pooled_connection_forgets_the_previous_organization() {
    let database = TestDatabase::create().await;
    let org_a = database.create_organization("org-a", SECRET).await;
    seed_caller(&database, org_a, "+14155550123").await;

    // One connection, so the next transaction reuses it.
    let single = db::connect_service_pool(&database.service_url, 1)
        .await
        .unwrap();
    let mut tx = db::begin_org_tx(&single, org_a).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM callers")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, 1);
    tx.commit().await.unwrap();

    let setting: String = sqlx::query_scalar(
        "SELECT coalesce(current_setting('app.organization_id', true), '<null>')",
    )
    .fetch_one(&single)
    .await
    .unwrap();
    assert_eq!(setting, "", "the setting is transaction-local");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM callers")
        .fetch_one(&single)
        .await
        .expect("'' must not raise thanks to NULLIF");
    assert_eq!(after, 0);
}

#[tokio::test]
async fn lookups_before_the_organization_is_known_return_only_what_auth_needs() {
    let database = TestDatabase::create().await;
    let org_a = database.create_organization("org-a", SECRET).await;
    let row = sqlx::query("SELECT * FROM auth_webhook_secrets('org-a')")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<Uuid, _>("organization_id"), org_a);
    assert_eq!(row.get::<String, _>("hmac_secret"), SECRET);
    assert_eq!(row.columns().len(), 3);
    let unknown = sqlx::query("SELECT * FROM auth_webhook_secrets('nope')")
        .fetch_optional(&database.pool)
        .await
        .unwrap();
    assert!(unknown.is_none());
    let no_key = sqlx::query("SELECT * FROM auth_api_key($1)")
        .bind(vec![0_u8; 32])
        .fetch_optional(&database.pool)
        .await
        .unwrap();
    assert!(no_key.is_none());
}

#[tokio::test]
async fn the_database_enforces_the_seed_validation_rules() {
    let database = TestDatabase::create().await;
    let org = database.create_organization("org-a", SECRET).await;
    let short_secret = sqlx::query(
        "INSERT INTO organizations (slug, name, hmac_secret) VALUES ('x', 'x', 'short')",
    )
    .execute(&database.admin_pool)
    .await;
    assert!(short_secret.is_err(), "secrets under 32 bytes are refused");
    seed_caller(&database, org, "+1").await;
    let mut tx = db::begin_org_tx(&database.pool, org).await.unwrap();
    insert_conversation(&mut tx, org, "conv_1", "completed")
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let insert_memory = |importance: i16, content: String, confidence: f32| {
        let pool = database.pool.clone();
        async move {
            let mut tx = db::begin_org_tx(&pool, org).await.unwrap();
            let result = sqlx::query_scalar::<_, bool>(
                "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type,
                                       importance, confidence, embedding, embedding_model)
                 VALUES ($1, '+1', 'agent_1', 'conv_1', $2, 'factual', $3, $4, $5, 'test')
                 RETURNING is_shareable",
            )
            .bind(org)
            .bind(content)
            .bind(importance)
            .bind(confidence)
            .bind(pgvector::Vector::from(vec![0.0_f32; 384]))
            .fetch_one(&mut *tx)
            .await;
            tx.commit().await.unwrap();
            result
        }
    };
    assert!(!insert_memory(7, "likes tea".into(), 0.5).await.unwrap());
    assert!(insert_memory(8, "allergic to penicillin".into(), 0.5)
        .await
        .unwrap());
    assert!(insert_memory(0, "x".into(), 0.5).await.is_err());
    assert!(insert_memory(11, "x".into(), 0.5).await.is_err());
    assert!(insert_memory(5, "".into(), 0.5).await.is_err());
    assert!(insert_memory(5, "x".repeat(10_001), 0.5).await.is_err());
    assert!(insert_memory(5, "x".into(), 1.5).await.is_err());
}

async fn insert_conversation(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    org: Uuid,
    conversation_id: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agents (organization_id, agent_id) VALUES ($1, 'agent_1') ON CONFLICT DO NOTHING",
    )
    .bind(org)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
         VALUES ($1, $2, 'agent_1', '+1', now(), $3)",
    )
    .bind(org)
    .bind(conversation_id)
    .bind(status)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

#[tokio::test]
async fn the_status_machine_is_the_same_in_rust_and_in_sql() {
    let database = TestDatabase::create().await;
    let org = database.create_organization("org-a", SECRET).await;
    seed_caller(&database, org, "+1").await;

    // Creation: only initiated, completed and failed.
    for status in ConversationStatus::ALL {
        let mut tx = db::begin_org_tx(&database.pool, org).await.unwrap();
        let created =
            insert_conversation(&mut tx, org, &format!("create_{status}"), status.as_str()).await;
        assert_eq!(
            created.is_ok(),
            status.can_be_created_as(),
            "create as {status}"
        );
        let _ = tx.rollback().await;
    }

    // Every pair, through both the guarded update and a raw update that
    // only the trigger stands in front of.
    for (index, from) in ConversationStatus::ALL.into_iter().enumerate() {
        for to in ConversationStatus::ALL {
            for kind in [TransitionKind::Normal, TransitionKind::Replay] {
                let expected = from.can_transition_to(to, kind);
                let conversation = format!("c{index}_{to}_{kind:?}");

                let mut tx = db::begin_org_tx(&database.pool, org).await.unwrap();
                insert_conversation(&mut tx, org, &conversation, "completed")
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                // Put the row in `from` behind the trigger's back.
                sqlx::query(
                    "ALTER TABLE conversations DISABLE TRIGGER conversations_status_machine",
                )
                .execute(&database.admin_pool)
                .await
                .unwrap();
                sqlx::query("UPDATE conversations SET status = $1 WHERE conversation_id = $2")
                    .bind(from.as_str())
                    .bind(&conversation)
                    .execute(&database.admin_pool)
                    .await
                    .unwrap();
                sqlx::query(
                    "ALTER TABLE conversations ENABLE TRIGGER conversations_status_machine",
                )
                .execute(&database.admin_pool)
                .await
                .unwrap();

                let mut tx = db::begin_org_tx(&database.pool, org).await.unwrap();
                let guarded =
                    db::transition_conversation(&mut tx, org, &conversation, to, kind).await;
                match guarded {
                    Ok(changed) => {
                        assert_eq!(changed, expected, "{from} -> {to} ({kind:?}) guarded")
                    }
                    Err(err) => panic!("{from} -> {to} ({kind:?}): {err}"),
                }
                tx.rollback().await.unwrap();

                let mut tx = db::begin_org_tx(&database.pool, org).await.unwrap();
                let bump = i32::from(kind == TransitionKind::Replay);
                let raw = sqlx::query(
                    "UPDATE conversations SET status = $1, generation = generation + $2 WHERE conversation_id = $3",
                )
                .bind(to.as_str())
                .bind(bump)
                .bind(&conversation)
                .execute(&mut *tx)
                .await;
                let unchanged_status = from == to && kind == TransitionKind::Normal;
                assert_eq!(
                    raw.is_ok(),
                    expected || unchanged_status,
                    "{from} -> {to} ({kind:?}) raw update: {raw:?}"
                );
                let _ = tx.rollback().await;
            }
        }
    }
}

/// Connections are pinged on acquire only after `PING_CONNECTIONS_IDLE_FOR`
/// in the pool (not on every acquire, sqlx's default): one that Postgres
/// closed while it sat idle is still replaced, not handed to a request.
#[tokio::test]
async fn a_connection_postgres_closed_while_idle_is_replaced_before_use() {
    let database = TestDatabase::create().await;
    let single = db::connect_service_pool(&database.service_url, 1)
        .await
        .unwrap();
    let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&single)
        .await
        .unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&database.admin_pool)
        .await
        .unwrap();
    assert!(terminated);

    tokio::time::sleep(db::PING_CONNECTIONS_IDLE_FOR + std::time::Duration::from_millis(200)).await;
    let second: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&single)
        .await
        .expect("the dead connection is replaced, not used");
    assert_ne!(first, second);
}
