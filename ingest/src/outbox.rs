//! Publishing outbox rows: right after the webhook's commit, and by a relay
//! for whatever that could not publish (JetStream down, a crash between
//! commit and publish). The message id makes a double publish harmless, so
//! an unpublished row is always (re)published, never skipped.

use std::time::{Duration, Instant};

use bytes::Bytes;
use elaaoms_shared::bus::{Bus, BusError};
use elaaoms_shared::db;
use elaaoms_shared::telemetry;
use elaaoms_shared::trace::TraceParent;
use prometheus::{Gauge, Histogram, IntGauge, Registry};
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
        .publish_traced(
            &row.subject,
            &row.msg_id,
            organization_id,
            row_trace(row).as_ref(),
            Bytes::from(row.body.clone()),
        )
        .await?;
    latency.observe(started.elapsed().as_secs_f64());
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    mark_published(&mut tx, organization_id, row.id, sequence).await?;
    tx.commit().await?;
    Ok(sequence)
}

/// The row's trace context; a value that does not parse (never written by
/// this code) is dropped rather than sent on malformed.
fn row_trace(row: &OutboxRow) -> Option<TraceParent> {
    row.traceparent.as_deref().and_then(TraceParent::parse)
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
    /// A conversation in `extraction_pending` for longer than this counts
    /// as stuck in `elaaoms_conversations_extraction_pending_stuck`.
    pub extraction_stuck_after: Duration,
}

/// What waits in the pipeline, measured by every relay pass across all
/// organizations (every ingest replica reports the same numbers; the alert
/// rules take the max). Names match deploy/prometheus/alerts.yaml.
#[derive(Clone)]
pub struct BacklogGauges {
    pub outbox_unpublished: IntGauge,
    pub outbox_oldest_seconds: Gauge,
    pub extraction_pending_stuck: IntGauge,
    pub extraction_pending_oldest_seconds: Gauge,
}

impl BacklogGauges {
    pub fn register(registry: &Registry) -> Self {
        Self {
            outbox_unpublished: telemetry::register(
                registry,
                IntGauge::new(
                    "elaaoms_outbox_unpublished",
                    "Outbox events unpublished for longer than the relay's grace",
                )
                .expect("valid metric"),
            ),
            outbox_oldest_seconds: telemetry::register(
                registry,
                Gauge::new(
                    "elaaoms_outbox_oldest_unpublished_seconds",
                    "Age of the oldest outbox event unpublished for longer than the relay's grace (0 when none)",
                )
                .expect("valid metric"),
            ),
            extraction_pending_stuck: telemetry::register(
                registry,
                IntGauge::new(
                    "elaaoms_conversations_extraction_pending_stuck",
                    "Conversations in extraction_pending for longer than EXTRACTION_STUCK_AFTER",
                )
                .expect("valid metric"),
            ),
            extraction_pending_oldest_seconds: telemetry::register(
                registry,
                Gauge::new(
                    "elaaoms_conversations_extraction_pending_oldest_seconds",
                    "Time since the oldest conversation in extraction_pending entered it (0 when none)",
                )
                .expect("valid metric"),
            ),
        }
    }
}

/// Sets the backlog gauges from the database (two aggregate queries on
/// partial indexes; SECURITY DEFINER functions that return only counts, as
/// the relay knows no organization here).
pub async fn measure_backlog(
    pool: &PgPool,
    settings: &RelaySettings,
    gauges: &BacklogGauges,
) -> Result<(), sqlx::Error> {
    let (unpublished, oldest): (i64, f64) =
        sqlx::query_as("SELECT unpublished, oldest_seconds FROM outbox_backlog($1)")
            .bind(settings.grace)
            .fetch_one(pool)
            .await?;
    gauges.outbox_unpublished.set(unpublished);
    gauges.outbox_oldest_seconds.set(oldest);
    let (stuck, oldest): (i64, f64) =
        sqlx::query_as("SELECT stuck, oldest_seconds FROM extraction_pending_backlog($1)")
            .bind(settings.extraction_stuck_after)
            .fetch_one(pool)
            .await?;
    gauges.extraction_pending_stuck.set(stuck);
    gauges.extraction_pending_oldest_seconds.set(oldest);
    Ok(())
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
    gauges: BacklogGauges,
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
        // After the pass: what it could not publish is the backlog.
        if let Err(err) = measure_backlog(&pool, &settings, &gauges).await {
            tracing::warn!(error = %err, "cannot measure the pipeline backlog");
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
            "SELECT id, subject, msg_id, body, traceparent FROM outbox
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
            let trace = row_trace(&row);
            match bus
                .publish_traced(
                    &row.subject,
                    &row.msg_id,
                    organization_id,
                    trace.as_ref(),
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
