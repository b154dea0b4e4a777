//! Publishing outbox rows: right after the webhook's commit, and by a relay
//! for whatever that could not publish (JetStream down, a crash between
//! commit and publish). The message id makes a double publish harmless, so
//! an unpublished row is always (re)published, never skipped.

use std::time::{Duration, Instant};

use bytes::Bytes;
use elaaoms_shared::bus::{Bus, BusError};
use elaaoms_shared::db;
use prometheus::Histogram;
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
/// `latency` observes the publish (successful ones only).
pub async fn publish_one(
    pool: &PgPool,
    bus: &Bus,
    organization_id: Uuid,
    row: &OutboxRow,
    latency: &Histogram,
) -> Result<u64, OutboxError> {
    let started = Instant::now();
    let sequence = bus
        .publish(
            &row.subject,
            &row.msg_id,
            organization_id,
            Bytes::from(row.body.clone()),
        )
        .await?;
    latency.observe(started.elapsed().as_secs_f64());
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    mark_published(&mut tx, organization_id, row.id, sequence).await?;
    tx.commit().await?;
    Ok(sequence)
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

/// How the relay works; see `IngestSettings` for the defaults.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    /// Time between passes.
    pub interval: Duration,
    /// Rows younger than this are left to the request that wrote them (a
    /// double publish would be harmless, only wasted).
    pub grace: Duration,
}

const RELAY_BATCH: i64 = 100;

/// Until `shutdown`: every `interval`, publish what is still unpublished.
/// Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several ingest
/// replicas relay side by side without publishing a row twice at once.
pub async fn run_relay(
    pool: PgPool,
    bus: Bus,
    settings: RelaySettings,
    latency: Histogram,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.interval) => {}
        }
        match relay_pending(&pool, &bus, settings.grace, &latency).await {
            Ok(0) => {}
            Ok(published) => tracing::info!(published, "outbox relay published pending events"),
            Err(err) => tracing::warn!(error = %err, "outbox relay pass failed; retrying"),
        }
    }
}

/// One relay pass over rows older than `grace`; returns how many rows it
/// published. A failed publish ends the pass, keeping what it marked.
pub async fn relay_pending(
    pool: &PgPool,
    bus: &Bus,
    grace: Duration,
    latency: &Histogram,
) -> Result<usize, OutboxError> {
    let organizations: Vec<Uuid> =
        sqlx::query_scalar("SELECT organization_id FROM outbox_pending_organizations($1)")
            .bind(grace)
            .fetch_all(pool)
            .await?;
    let mut published = 0;
    for organization_id in organizations {
        let mut tx = db::begin_org_tx(pool, organization_id).await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, subject, msg_id, body FROM outbox
              WHERE organization_id = $1 AND published_at IS NULL AND created_at < now() - $3::interval
              ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(organization_id)
        .bind(RELAY_BATCH)
        .bind(grace)
        .fetch_all(&mut *tx)
        .await?;
        let mut failure = None;
        for row in rows {
            let started = Instant::now();
            match bus
                .publish(
                    &row.subject,
                    &row.msg_id,
                    organization_id,
                    Bytes::from(row.body),
                )
                .await
            {
                Ok(sequence) => {
                    latency.observe(started.elapsed().as_secs_f64());
                    mark_published(&mut tx, organization_id, row.id, sequence).await?;
                    published += 1;
                }
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        // Keep the marks of what did get published before a failure.
        tx.commit().await?;
        if let Some(err) = failure {
            return Err(err.into());
        }
    }
    Ok(published)
}
