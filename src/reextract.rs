//! `elaaoms reextract`: extracts a period's conversations again (after a
//! prompt or model change). The transcripts come from the payload store and
//! the conversations table, never from the stream, so an erased caller (no
//! rows, no payloads, a tombstone) stays erased. Each conversation moves to
//! `extraction_pending` at the next generation and a `conversation.transcribed`
//! event of that generation is published; the indexer then replaces the
//! previous generation's memories.

use anyhow::{Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use elaaoms_ingest::persist::MAX_INLINE_EVENT_BYTES;
use elaaoms_shared::bus::{event_msg_id, Bus, Envelope, Step};
use elaaoms_shared::config::{AdminDatabaseConfig, BusConfig, PayloadStoreConfig};
use elaaoms_shared::db;
use elaaoms_shared::domain::{ConversationStatus, TransitionKind};
use elaaoms_shared::events::ConversationTranscribed;
use elaaoms_shared::payload_store::{PayloadKind, PayloadStore};
use elaaoms_shared::transcript::turns_of_payload;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct ReextractArgs {
    /// The organization (slug or id).
    #[arg(long)]
    org: String,
    /// Conversations that started at or after this time (RFC 3339).
    #[arg(long)]
    since: DateTime<Utc>,
    /// Conversations that started before this time (RFC 3339).
    #[arg(long)]
    until: DateTime<Utc>,
    /// Show what would be re-extracted; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    admin: AdminDatabaseConfig,
    #[command(flatten)]
    bus: BusConfig,
    #[command(flatten)]
    payloads: PayloadStoreConfig,
}

/// What happened to one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published { generation: i32 },
    WouldPublish { generation: i32 },
    Skipped(String),
}

pub async fn reextract(args: ReextractArgs) -> Result<()> {
    anyhow::ensure!(args.since < args.until, "--since must be before --until");
    let admin = db::connect_admin_pool(&args.admin.database_admin_url).await?;
    let bus = Bus::connect(&args.bus)
        .await
        .context("connecting to NATS")?;
    let payloads = PayloadStore::from_config(&args.payloads)
        .await
        .context("opening the payload store")?;
    let organization_id = resolve_organization(&admin, &args.org).await?;
    let mut done = 0usize;
    let outcomes = run(
        &admin,
        &bus,
        &payloads,
        organization_id,
        (args.since, args.until),
        args.dry_run,
        |conversation_id, outcome| {
            done += 1;
            let what = match outcome {
                Outcome::Published { generation } => {
                    format!("published as generation {generation}")
                }
                Outcome::WouldPublish { generation } => {
                    format!("would publish as generation {generation}")
                }
                Outcome::Skipped(reason) => format!("skipped: {reason}"),
            };
            println!("[{done}] {conversation_id}: {what}");
        },
    )
    .await?;
    let sent = outcomes
        .iter()
        .filter(|(_, outcome)| !matches!(outcome, Outcome::Skipped(_)))
        .count();
    println!(
        "{sent} of {} conversation(s) {}",
        outcomes.len(),
        if args.dry_run {
            "would be re-extracted (dry run)"
        } else {
            "sent for re-extraction"
        }
    );
    Ok(())
}

async fn resolve_organization(admin: &PgPool, org: &str) -> Result<Uuid> {
    let id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM organizations WHERE slug = $1 OR id::text = $1")
            .bind(org)
            .fetch_optional(admin)
            .await
            .context("looking up the organization")?;
    id.with_context(|| format!("no organization `{org}`"))
}

/// Re-extracts the organization's finished conversations that started in
/// `[since, until)`, oldest first; `progress` is told each outcome.
pub async fn run(
    pool: &PgPool,
    bus: &Bus,
    payloads: &PayloadStore,
    organization_id: Uuid,
    (since, until): (DateTime<Utc>, DateTime<Utc>),
    dry_run: bool,
    mut progress: impl FnMut(&str, &Outcome),
) -> Result<Vec<(String, Outcome)>> {
    let conversation_ids: Vec<String> = {
        let mut tx = db::begin_org_tx(pool, organization_id).await?;
        let ids = sqlx::query_scalar(
            "SELECT conversation_id FROM conversations
              WHERE organization_id = $1 AND status IN ('extraction_completed', 'extraction_failed')
                AND start_time >= $2 AND start_time < $3
              ORDER BY start_time, conversation_id",
        )
        .bind(organization_id)
        .bind(since)
        .bind(until)
        .fetch_all(&mut *tx)
        .await
        .context("listing the period's conversations")?;
        tx.commit().await?;
        ids
    };
    let mut outcomes = Vec::with_capacity(conversation_ids.len());
    for conversation_id in conversation_ids {
        let outcome = one(
            pool,
            bus,
            payloads,
            organization_id,
            &conversation_id,
            dry_run,
        )
        .await
        .with_context(|| format!("re-extracting {conversation_id}"))?;
        progress(&conversation_id, &outcome);
        outcomes.push((conversation_id, outcome));
    }
    Ok(outcomes)
}

async fn one(
    pool: &PgPool,
    bus: &Bus,
    payloads: &PayloadStore,
    organization_id: Uuid,
    conversation_id: &str,
    dry_run: bool,
) -> Result<Outcome> {
    let skip = |reason: &str| Ok(Outcome::Skipped(reason.to_owned()));
    // The row stays locked until the event is published: a concurrent
    // replay or a second reextract waits, then sees the new status.
    let mut tx = db::begin_org_tx(pool, organization_id).await?;
    let row: Option<(String, String, String, DateTime<Utc>, i32)> = sqlx::query_as(
        "SELECT status, agent_id, caller_id, start_time, generation FROM conversations
          WHERE organization_id = $1 AND conversation_id = $2 FOR UPDATE",
    )
    .bind(organization_id)
    .bind(conversation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, agent_id, caller_id, started_at, generation)) = row else {
        return skip("the conversation no longer exists");
    };
    let status = ConversationStatus::parse(&status);
    if !status.is_some_and(|status| {
        status.can_transition_to(
            ConversationStatus::ExtractionPending,
            TransitionKind::Replay,
        )
    }) {
        return skip("its status changed meanwhile");
    }
    if db::is_caller_erased(&mut tx, organization_id, &caller_id, Some(started_at)).await? {
        return skip("the caller was erased");
    }
    let body = match payloads
        .get(conversation_id, PayloadKind::Transcription)
        .await
    {
        Ok(body) => body,
        Err(err) => return Ok(Outcome::Skipped(format!("no stored transcript: {err}"))),
    };
    let turns = match turns_of_payload(&body) {
        Ok(turns) => turns,
        Err(err) => {
            return Ok(Outcome::Skipped(format!(
                "unreadable stored transcript: {err}"
            )))
        }
    };
    let new_generation = generation + 1;
    if dry_run {
        return Ok(Outcome::WouldPublish {
            generation: new_generation,
        });
    }
    let moved = db::transition_conversation(
        &mut tx,
        organization_id,
        conversation_id,
        ConversationStatus::ExtractionPending,
        TransitionKind::Replay,
    )
    .await?;
    if !moved {
        return skip("its status changed meanwhile");
    }
    let mut event = Envelope::new(
        organization_id,
        new_generation,
        ConversationTranscribed {
            conversation_id: conversation_id.to_owned(),
            agent_id,
            caller_id,
            started_at,
            turns,
            payload_ref: None,
        },
    );
    let mut encoded = event.encode()?;
    if encoded.len() > MAX_INLINE_EVENT_BYTES {
        // As ingest does: too large for a message, the extractor reads the file.
        event.payload.turns = Vec::new();
        event.payload.payload_ref =
            Some(payloads.key_of(conversation_id, PayloadKind::Transcription)?);
        encoded = event.encode()?;
    }
    let msg_id = event_msg_id(
        organization_id,
        conversation_id,
        Step::Transcribed,
        new_generation,
    );
    bus.publish(
        &bus.names.subject(Step::Transcribed),
        &msg_id,
        organization_id,
        Bytes::from(encoded),
    )
    .await
    .context("publishing the transcript")?;
    // Published first, committed second: a failed publish leaves the
    // conversation as it was, so running the command again retries it.
    tx.commit().await?;
    Ok(Outcome::Published {
        generation: new_generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use elaaoms_shared::embedder::Embedder;
    use elaaoms_shared::test_support::{TestBus, TestDatabase};

    const PAYLOAD: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/elevenlabs/post_call_transcription_dental_priya_2025-11-12.json"
    ));

    async fn conversation(
        database: &TestDatabase,
        organization_id: Uuid,
        conversation_id: &str,
        caller_id: &str,
        start: &str,
        status: &str,
    ) {
        let admin = &database.admin_pool;
        for statement in [
            "INSERT INTO agents (organization_id, agent_id) VALUES ($1, 'agent_dental_01') ON CONFLICT DO NOTHING",
            "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
             VALUES ($1, $2, now(), now(), 1) ON CONFLICT DO NOTHING",
        ] {
            sqlx::query(statement)
                .bind(organization_id)
                .bind(caller_id)
                .execute(admin)
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
             VALUES ($1, $2, 'agent_dental_01', $3, $4::timestamptz, 'completed')",
        )
        .bind(organization_id)
        .bind(conversation_id)
        .bind(caller_id)
        .bind(start)
        .execute(admin)
        .await
        .unwrap();
        // The status trigger allows only real transitions: walk the path.
        let path: &[&str] = match status {
            "extraction_pending" => &["extraction_pending"],
            done => &["extraction_pending", done],
        };
        for next in path {
            sqlx::query("UPDATE conversations SET status = $3 WHERE organization_id = $1 AND conversation_id = $2")
                .bind(organization_id)
                .bind(conversation_id)
                .bind(next)
                .execute(admin)
                .await
                .unwrap();
        }
    }

    async fn transcribed_events(bus: &TestBus) -> Vec<(String, Envelope<ConversationTranscribed>)> {
        let bus = &bus.bus;
        let stream = bus
            .jetstream
            .get_stream(bus.names.event_stream())
            .await
            .unwrap();
        let mut stream = stream;
        let state = stream.info().await.unwrap().state.clone();
        let mut events = Vec::new();
        if state.messages == 0 {
            return events;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            if let Ok(message) = stream.get_raw_message(sequence).await {
                if message.subject.as_str() == bus.names.subject(Step::Transcribed) {
                    let msg_id = message
                        .headers
                        .get("Nats-Msg-Id")
                        .map(|value| value.to_string())
                        .unwrap_or_default();
                    events.push((msg_id, Envelope::decode(&message.payload).unwrap()));
                }
            }
        }
        events
    }

    async fn status(database: &TestDatabase, organization_id: Uuid, id: &str) -> (String, i32) {
        sqlx::query_as(
            "SELECT status, generation FROM conversations WHERE organization_id = $1 AND conversation_id = $2",
        )
        .bind(organization_id)
        .bind(id)
        .fetch_one(&database.admin_pool)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_period_is_re_extracted_at_the_next_generation_and_erased_callers_stay_erased() {
        let database = TestDatabase::create().await;
        let bus = TestBus::create().await;
        let dir = tempfile::tempdir().unwrap();
        let payloads = PayloadStore::local(dir.path());
        let org = database
            .create_organization("reextract-dental", "whsec_reextract_test_secret_0123456789")
            .await;
        let (priya, erased) = ("+14155550161", "+14155550162");
        conversation(
            &database,
            org,
            "conv_in_period",
            priya,
            "2026-11-10T10:00:00Z",
            "extraction_completed",
        )
        .await;
        conversation(
            &database,
            org,
            "conv_failed",
            priya,
            "2026-11-11T10:00:00Z",
            "extraction_failed",
        )
        .await;
        conversation(
            &database,
            org,
            "conv_before",
            priya,
            "2026-10-01T10:00:00Z",
            "extraction_completed",
        )
        .await;
        conversation(
            &database,
            org,
            "conv_pending",
            priya,
            "2026-11-12T10:00:00Z",
            "extraction_pending",
        )
        .await;
        conversation(
            &database,
            org,
            "conv_erased",
            erased,
            "2026-11-13T10:00:00Z",
            "extraction_completed",
        )
        .await;
        conversation(
            &database,
            org,
            "conv_no_payload",
            priya,
            "2026-11-14T10:00:00Z",
            "extraction_completed",
        )
        .await;
        for id in [
            "conv_in_period",
            "conv_failed",
            "conv_before",
            "conv_pending",
            "conv_erased",
        ] {
            payloads
                .put(id, PayloadKind::Transcription, PAYLOAD.as_bytes().to_vec())
                .await
                .unwrap();
        }
        sqlx::query("INSERT INTO erased_callers (organization_id, caller_hash) VALUES ($1, $2)")
            .bind(org)
            .bind(db::caller_hash(erased))
            .execute(&database.admin_pool)
            .await
            .unwrap();
        let period = (
            "2026-11-01T00:00:00Z".parse().unwrap(),
            "2026-12-01T00:00:00Z".parse().unwrap(),
        );

        // A dry run changes nothing.
        let dry = run(
            &database.admin_pool,
            &bus.bus,
            &payloads,
            org,
            period,
            true,
            |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(
            dry[0],
            (
                "conv_in_period".to_owned(),
                Outcome::WouldPublish { generation: 2 }
            )
        );
        assert!(transcribed_events(&bus).await.is_empty());
        assert_eq!(
            status(&database, org, "conv_in_period").await,
            ("extraction_completed".to_owned(), 1)
        );

        let outcomes = run(
            &database.admin_pool,
            &bus.bus,
            &payloads,
            org,
            period,
            false,
            |_, _| {},
        )
        .await
        .unwrap();
        let published: Vec<&str> = outcomes
            .iter()
            .filter(|(_, outcome)| matches!(outcome, Outcome::Published { generation: 2 }))
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(published, ["conv_in_period", "conv_failed"]);
        assert!(outcomes.iter().any(|(id, outcome)| id == "conv_erased"
            && *outcome == Outcome::Skipped("the caller was erased".to_owned())));
        assert!(outcomes.iter().any(|(id, outcome)| id == "conv_no_payload"
            && matches!(outcome, Outcome::Skipped(reason) if reason.starts_with("no stored transcript"))));

        let events = transcribed_events(&bus).await;
        assert_eq!(events.len(), 2, "{events:?}");
        let (msg_id, event) = &events[0];
        assert_eq!(event.generation, 2);
        assert_eq!(event.payload.conversation_id, "conv_in_period");
        assert_eq!(event.payload.caller_id, priya);
        assert_eq!(
            event.payload.turns,
            turns_of_payload(PAYLOAD.as_bytes()).unwrap()
        );
        assert!(!event.payload.turns.is_empty());
        assert_eq!(
            msg_id,
            &event_msg_id(org, "conv_in_period", Step::Transcribed, 2)
        );
        assert_eq!(
            status(&database, org, "conv_in_period").await,
            ("extraction_pending".to_owned(), 2)
        );
        assert_eq!(
            status(&database, org, "conv_failed").await,
            ("extraction_pending".to_owned(), 2)
        );
        assert_eq!(
            status(&database, org, "conv_before").await,
            ("extraction_completed".to_owned(), 1)
        );
        assert_eq!(
            status(&database, org, "conv_erased").await,
            ("extraction_completed".to_owned(), 1)
        );
        assert_eq!(
            status(&database, org, "conv_pending").await,
            ("extraction_pending".to_owned(), 1)
        );
        bus.cleanup().await;
    }

    /// Polls `check` every 100 ms for at most 60 s.
    async fn wait_for<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !check().await {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn a_re_extracted_conversation_completes_once_with_its_memories_replaced() {
        use elaaoms_shared::config::{DatabaseConfig, PayloadStoreConfig, WorkerConfig};
        use std::time::Duration;
        use tokio_util::sync::CancellationToken;

        let _ = rustls::crypto::ring::default_provider().install_default();
        let database = TestDatabase::create().await;
        let bus = TestBus::create().await;
        let dir = tempfile::tempdir().unwrap();
        let payloads = PayloadStore::local(dir.path());
        let org = database
            .create_organization("reextract-loop", "whsec_reextract_loop_secret_0123456789")
            .await;
        let caller = "+14155550163";
        conversation(
            &database,
            org,
            "conv_loop",
            caller,
            "2026-11-10T10:00:00Z",
            "extraction_pending",
        )
        .await;
        payloads
            .put(
                "conv_loop",
                PayloadKind::Transcription,
                PAYLOAD.as_bytes().to_vec(),
            )
            .await
            .unwrap();

        let database_config = DatabaseConfig {
            database_url: database.service_url.clone(),
            database_max_connections: 5,
        };
        let worker = WorkerConfig {
            worker_concurrency: 2,
            worker_per_organization_concurrency: 2,
            worker_max_attempts: 3,
            worker_retry_delays: vec![Duration::from_millis(200)],
            worker_ack_wait: Duration::from_secs(30),
        };
        let extractor = elaaoms_extractor::ExtractorService::build(elaaoms_extractor::Config {
            database: database_config.clone(),
            bus: bus.config.clone(),
            worker: worker.clone(),
            payloads: PayloadStoreConfig {
                payload_dir: dir.path().to_owned(),
                payload_store_url: None,
            },
            settings: elaaoms_extractor::ExtractorSettings {
                health_addr: "127.0.0.1:0".parse().unwrap(),
                ..Default::default()
            },
        })
        .await
        .expect("extractor starts");
        let embedder = Embedder::local(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/models/all-MiniLM-L6-v2"
        )))
        .expect("model files: run deploy/local/setup.sh");
        let indexer = elaaoms_indexer::IndexerService::build(
            elaaoms_indexer::Config {
                database: database_config,
                bus: bus.config.clone(),
                worker,
                settings: elaaoms_indexer::IndexerSettings {
                    health_addr: "127.0.0.1:0".parse().unwrap(),
                    dedup_similarity: 0.85,
                    dedup_candidate_similarity: 0.6,
                    dedup_conflict_similarity: 0.7,
                },
                llm: Default::default(),
            },
            embedder,
        )
        .await
        .expect("indexer starts");
        let shutdown = CancellationToken::new();
        let services = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let (extractor, indexer) =
                    tokio::join!(extractor.run(shutdown.clone()), indexer.run(shutdown));
                extractor.expect("extractor runs");
                indexer.expect("indexer runs");
            }
        });

        // Generation 1, as ingest would have sent it.
        let first = Envelope::new(
            org,
            1,
            ConversationTranscribed {
                conversation_id: "conv_loop".to_owned(),
                agent_id: "agent_dental_01".to_owned(),
                caller_id: caller.to_owned(),
                started_at: "2026-11-10T10:00:00Z".parse().unwrap(),
                turns: turns_of_payload(PAYLOAD.as_bytes()).unwrap(),
                payload_ref: None,
            },
        );
        bus.bus
            .publish(
                &bus.bus.names.subject(Step::Transcribed),
                &event_msg_id(org, "conv_loop", Step::Transcribed, 1),
                org,
                Bytes::from(first.encode().unwrap()),
            )
            .await
            .unwrap();
        let completed_at = |generation: i32| {
            let database = &database;
            move || async move {
                status(database, org, "conv_loop").await
                    == ("extraction_completed".to_owned(), generation)
            }
        };
        wait_for("generation 1 completed", completed_at(1)).await;
        let memories = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM memories WHERE organization_id = $1 AND caller_id = $2",
            )
            .bind(org)
            .bind(caller)
            .fetch_one(&database.admin_pool)
            .await
            .unwrap()
        };
        let before = memories().await;
        assert!(before > 0, "the fixture gives memories");

        let period = (
            "2026-11-01T00:00:00Z".parse().unwrap(),
            "2026-12-01T00:00:00Z".parse().unwrap(),
        );
        let outcomes = run(
            &database.admin_pool,
            &bus.bus,
            &payloads,
            org,
            period,
            false,
            |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(
            outcomes,
            [("conv_loop".to_owned(), Outcome::Published { generation: 2 })]
        );
        wait_for("generation 2 completed", completed_at(2)).await;
        assert_eq!(memories().await, before, "replaced, not doubled");
        let applied: Vec<i32> = sqlx::query_scalar(
            "SELECT generation FROM applied_extractions WHERE organization_id = $1 AND conversation_id = 'conv_loop' ORDER BY generation",
        )
        .bind(org)
        .fetch_all(&database.admin_pool)
        .await
        .unwrap();
        assert_eq!(applied.last(), Some(&2), "{applied:?}");
        shutdown.cancel();
        services.await.unwrap();
        bus.cleanup().await;
    }
}
