//! Publishing outbox rows: right after the webhook's commit, and by a relay
//! for whatever that could not publish (JetStream down, a crash between
//! commit and publish). The message id makes a double publish harmless.

use std::time::Duration;

use bytes::Bytes;
use elaaoms_shared::bus::{Bus, BusError};
use elaaoms_shared::db;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::persist::OutboxRow;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Publish(#[from] BusError),
    #[error("cannot mark the outbox row published: {0}")]
    Database(#[from] sqlx::Error),
}

/// Publishes one row, awaiting the PubAck, then marks it published.
pub async fn publish_one(pool: &PgPool, bus: &Bus, organization_id: Uuid, row: &OutboxRow) -> Result<(), OutboxError> {
    let sequence = bus
        .publish(&row.subject, &row.msg_id, organization_id, Bytes::from(row.body.clone()))
        .await?;
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    mark_published(&mut tx, organization_id, row.id, sequence).await?;
    tx.commit().await?;
    Ok(())
}

async fn mark_published(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    organization_id: Uuid,
    id: i64,
    sequence: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE outbox SET published_at = now(), stream_seq = $3
          WHERE organization_id = $1 AND id = $2 AND published_at IS NULL",
    )
    .bind(organization_id)
    .bind(id)
    .bind(sequence as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Rows younger than this are left to the request that wrote them.
const RELAY_GRACE: Duration = Duration::from_secs(10);
const RELAY_BATCH: i64 = 100;

/// Until `shutdown`: every `interval`, publish what is still unpublished.
/// Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several ingest
/// replicas relay side by side without publishing a row twice at once.
pub async fn run_relay(pool: PgPool, bus: Bus, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match relay_pending(&pool, &bus).await {
            Ok(0) => {}
            Ok(published) => tracing::info!(published, "outbox relay published pending events"),
            Err(err) => tracing::warn!(error = %err, "outbox relay pass failed; retrying"),
        }
    }
}

/// One relay pass; returns how many rows it published.
pub async fn relay_pending(pool: &PgPool, bus: &Bus) -> Result<usize, OutboxError> {
    let organizations: Vec<Uuid> =
        sqlx::query_scalar("SELECT organization_id FROM outbox_pending_organizations($1)")
            .bind(RELAY_GRACE)
            .fetch_all(pool)
            .await?;
    let mut published = 0;
    for organization_id in organizations {
        let mut tx = db::begin_org_tx(pool, organization_id).await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, subject, msg_id, body FROM outbox
              WHERE organization_id = $1 AND published_at IS NULL
              ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(organization_id)
        .bind(RELAY_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let sequence = bus
                .publish(&row.subject, &row.msg_id, organization_id, Bytes::from(row.body))
                .await?;
            mark_published(&mut tx, organization_id, row.id, sequence).await?;
            published += 1;
        }
        tx.commit().await?;
    }
    Ok(published)
}
