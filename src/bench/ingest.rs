//! Scenario 1: ingest. Signed transcripts are posted open-loop at a target
//! rate; a webhook counts when it is answered 200 (durable: payload file
//! fsynced, transaction committed, event published). Baselines in the same
//! run: publishing the same event bytes to JetStream with the PubAck
//! awaited, and that publish plus one Postgres insert-and-commit (the least
//! any durable webhook must do).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use elaaoms_shared::bus::{Bus, Envelope, Step};
use elaaoms_shared::config::parse_duration;
use elaaoms_shared::domain::{Speaker, TranscriptTurn};
use elaaoms_shared::events::ConversationTranscribed;
use tokio_util::sync::CancellationToken;

use super::{
    machine_description, open_loop, post_webhook, start_ingest, webhook_bodies, BenchEnv,
    BenchEnvArgs, TABLE_HEADER,
};

#[derive(clap::Args, Debug)]
pub struct IngestBenchArgs {
    #[command(flatten)]
    env: BenchEnvArgs,
    /// Webhooks started per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long each measurement lasts.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
}

pub async fn run(args: IngestBenchArgs) -> Result<()> {
    let env = BenchEnv::prepare(&args.env).await?;
    let shutdown = CancellationToken::new();
    let (webhook_url, server) = start_ingest(&env, shutdown.clone()).await?;

    let count = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let bodies = Arc::new(webhook_bodies(count, false)?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // Warm up connections, prepared statements and the page cache.
    for body in bodies.iter().take(5) {
        post_webhook(&client, &webhook_url, body.clone()).await;
    }

    println!(
        "## ingest, {} per second for {:?}\n\n{}\n",
        args.rate,
        args.duration,
        machine_description()
    );
    println!("{TABLE_HEADER}");
    let (webhooks, errors, seconds) = open_loop(args.rate, args.duration, |i, _| {
        let (client, url, body) = (
            client.clone(),
            webhook_url.clone(),
            bodies[i as usize].clone(),
        );
        async move { post_webhook(&client, &url, body).await }
    })
    .await;
    let webhooks = webhooks.summary();
    println!(
        "{}",
        webhooks.row("webhook answered 200 (durable)", seconds, errors)
    );

    let bus = Bus::connect(&env.bus_config).await?;
    let event = Bytes::from(sample_event(env.organization_id).encode()?);
    let subject = bus.names.subject(Step::Transcribed);
    let organization_id = env.organization_id;
    let (publish, errors, seconds) = open_loop(args.rate, args.duration, |i, _| {
        let (bus, subject, event) = (bus.clone(), subject.clone(), event.clone());
        async move {
            bus.publish(&subject, &format!("baseline-a:{i}"), organization_id, event)
                .await
                .is_ok()
        }
    })
    .await;
    let publish = publish.summary();
    println!(
        "{}",
        publish.row(
            "baseline: JetStream publish, PubAck awaited",
            seconds,
            errors
        )
    );

    sqlx::query(
        "CREATE TABLE bench_durable_baseline (id bigserial PRIMARY KEY, body bytea NOT NULL)",
    )
    .execute(&env.admin_pool)
    .await?;
    let admin_pool = env.admin_pool.clone();
    let (durable, errors, seconds) = open_loop(args.rate, args.duration, |i, _| {
        let (bus, subject, event, pool) = (
            bus.clone(),
            subject.clone(),
            event.clone(),
            admin_pool.clone(),
        );
        async move {
            let inserted = sqlx::query("INSERT INTO bench_durable_baseline (body) VALUES ($1)")
                .bind(event.to_vec())
                .execute(&pool)
                .await
                .is_ok();
            inserted
                && bus
                    .publish(&subject, &format!("baseline-b:{i}"), organization_id, event)
                    .await
                    .is_ok()
        }
    })
    .await;
    let durable = durable.summary();
    println!(
        "{}",
        durable.row(
            "baseline: Postgres insert+commit, then publish",
            seconds,
            errors
        )
    );
    println!(
        "\nwebhook p50 / baseline p50: {:.1}x against publish, {:.1}x against insert+publish",
        webhooks.p50_ms / publish.p50_ms,
        webhooks.p50_ms / durable.p50_ms
    );

    shutdown.cancel();
    server.await??;
    env.remove_payloads();
    Ok(())
}

/// An event the size of a real one (about 25 turns).
fn sample_event(organization_id: uuid::Uuid) -> Envelope<ConversationTranscribed> {
    let turns = (0..25)
        .map(|i| TranscriptTurn {
            speaker: if i % 2 == 0 { Speaker::Agent } else { Speaker::User },
            message: "Lemon sponge with raspberry filling, and can you go easy on the frosting this time?".to_owned(),
            time_in_call_secs: Some(i as f64 * 7.0),
        })
        .collect();
    Envelope::new(
        organization_id,
        1,
        ConversationTranscribed {
            conversation_id: "conv_bench".to_owned(),
            agent_id: "agent_bench".to_owned(),
            caller_id: "+15550100000".to_owned(),
            started_at: chrono::Utc::now(),
            turns,
            payload_ref: None,
        },
    )
}
