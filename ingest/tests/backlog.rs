//! The backlog gauges the alert rules watch (deploy/prometheus/alerts.yaml),
//! measured as the service role (row-level security on) across every
//! organization.

use std::time::Duration;

use elaaoms_ingest::outbox::{measure_backlog, BacklogGauges, RelaySettings};
use elaaoms_shared::test_support::TestDatabase;
use prometheus::Registry;
use uuid::Uuid;

async fn insert_outbox_row(database: &TestDatabase, organization_id: Uuid, age: &str) {
    sqlx::query(
        "INSERT INTO outbox (organization_id, subject, msg_id, body, created_at)
         VALUES ($1, 's', $2, '\\x00', now() - $3::interval)",
    )
    .bind(organization_id)
    .bind(Uuid::new_v4().to_string())
    .bind(age)
    .execute(&database.admin_pool)
    .await
    .unwrap();
}

async fn insert_conversation(
    database: &TestDatabase,
    organization_id: Uuid,
    id: &str,
    status: &str,
    age: &str,
) {
    for sql in [
        "INSERT INTO agents (organization_id, agent_id) VALUES ($1, 'agent') ON CONFLICT DO NOTHING",
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
         VALUES ($1, '+14155550123', now(), now(), 1) ON CONFLICT DO NOTHING",
    ] {
        sqlx::query(sql)
            .bind(organization_id)
            .execute(&database.admin_pool)
            .await
            .unwrap();
    }
    // The status machine refuses to create a conversation in these states
    // and stamps updated_at on every write: write it as it would be after
    // its history, with triggers off for this transaction only.
    let mut tx = database.admin_pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time,
                                    status, updated_at)
         VALUES ($1, $2, 'agent', '+14155550123', now() - $4::interval, $3, now() - $4::interval)",
    )
    .bind(organization_id)
    .bind(id)
    .bind(status)
    .bind(age)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

fn settings() -> RelaySettings {
    RelaySettings {
        interval: Duration::from_secs(5),
        grace: Duration::from_secs(10),
        extraction_stuck_after: Duration::from_secs(3600),
    }
}

#[tokio::test]
async fn the_gauges_count_every_organizations_backlog_past_its_threshold() {
    let database = TestDatabase::create().await;
    let first = database
        .create_organization("backlog-a", "whsec_a_0123456789abcdef0123456789abcdef")
        .await;
    let second = database
        .create_organization("backlog-b", "whsec_b_0123456789abcdef0123456789abcdef")
        .await;
    let gauges = BacklogGauges::register(&Registry::new());

    // Nothing waits: zeros, not errors.
    measure_backlog(&database.pool, &settings(), &gauges)
        .await
        .unwrap();
    assert_eq!(gauges.outbox_unpublished.get(), 0);
    assert_eq!(gauges.outbox_oldest_seconds.get(), 0.0);
    assert_eq!(gauges.extraction_pending_stuck.get(), 0);
    assert_eq!(gauges.extraction_pending_oldest_seconds.get(), 0.0);

    // Unpublished past the grace in two organizations; one row still the
    // request's to publish; one published long ago.
    insert_outbox_row(&database, first, "20 minutes").await;
    insert_outbox_row(&database, second, "1 minute").await;
    insert_outbox_row(&database, second, "1 second").await;
    insert_outbox_row(&database, first, "2 hours").await;
    sqlx::query(
        "UPDATE outbox SET published_at = now()
          WHERE created_at < now() - interval '1 hour'",
    )
    .execute(&database.admin_pool)
    .await
    .unwrap();
    // Stuck: two hours in extraction_pending; not stuck: five minutes, and
    // an old conversation in another status.
    insert_conversation(
        &database,
        first,
        "conv_stuck",
        "extraction_pending",
        "2 hours",
    )
    .await;
    insert_conversation(
        &database,
        second,
        "conv_recent",
        "extraction_pending",
        "5 minutes",
    )
    .await;
    insert_conversation(
        &database,
        second,
        "conv_done",
        "extraction_completed",
        "3 hours",
    )
    .await;

    measure_backlog(&database.pool, &settings(), &gauges)
        .await
        .unwrap();
    assert_eq!(gauges.outbox_unpublished.get(), 2);
    let oldest = gauges.outbox_oldest_seconds.get();
    assert!(
        (1199.0..1300.0).contains(&oldest),
        "oldest outbox row: {oldest}"
    );
    assert_eq!(gauges.extraction_pending_stuck.get(), 1);
    let oldest = gauges.extraction_pending_oldest_seconds.get();
    assert!(
        (7199.0..7300.0).contains(&oldest),
        "oldest pending: {oldest}"
    );
}
