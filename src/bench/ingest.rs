//! Scenario 1: ingest. Signed transcripts are posted open-loop at a target
//! rate; a webhook counts when it is answered 200 (durable: payload file
//! fsynced, transaction committed, event published). Baselines in the same
//! run: publishing the same event bytes to JetStream with the PubAck
//! awaited, and that publish plus one Postgres insert-and-commit (the least
//! any durable webhook must do).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use elaaoms_shared::bus::{Bus, Envelope, Step};
use elaaoms_shared::config::{parse_duration, DatabaseConfig, PayloadStoreConfig};
use elaaoms_shared::domain::{Speaker, TranscriptTurn};
use elaaoms_shared::events::ConversationTranscribed;
use tokio_util::sync::CancellationToken;

use super::{
    machine_description, open_loop, BenchEnv, BenchEnvArgs, BENCH_SECRET, BENCH_SLUG, TABLE_HEADER,
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

const FIXTURES: [&str; 4] = [
    "post_call_transcription_bakery_maya_2025-11-03.json",
    "post_call_transcription_bakery_maya_2025-11-20.json",
    "post_call_transcription_dental_priya_2025-11-12.json",
    "post_call_transcription_telecom_tom_2025-11-18.json",
];

/// The fixtures, each request with a conversation id of its own.
fn webhook_bodies(count: u64) -> Result<Vec<Bytes>> {
    let fixtures = FIXTURES
        .iter()
        .map(|name| {
            let path = format!("tests/fixtures/elevenlabs/{name}");
            let text = std::fs::read(&path)
                .with_context(|| format!("reading {path} (run from the repository root)"))?;
            Ok(serde_json::from_slice::<serde_json::Value>(&text)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((0..count)
        .map(|i| {
            let mut body = fixtures[i as usize % fixtures.len()].clone();
            body["data"]["conversation_id"] =
                serde_json::Value::String(format!("conv_bench_{i:08}"));
            Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"))
        })
        .collect())
}

pub async fn run(args: IngestBenchArgs) -> Result<()> {
    let env = BenchEnv::prepare(&args.env).await?;
    let payload_dir = std::path::PathBuf::from("data/bench/payloads");
    let _ = std::fs::remove_dir_all(&payload_dir);
    let service = elaaoms_ingest::IngestService::build(elaaoms_ingest::Config {
        database: DatabaseConfig {
            database_url: env.service_url.clone(),
            database_max_connections: 16,
        },
        bus: env.bus_config.clone(),
        payloads: PayloadStoreConfig {
            payload_dir: payload_dir.clone(),
            payload_store_url: None,
        },
        settings: elaaoms_ingest::IngestSettings {
            addr: "127.0.0.1:0".parse().expect("valid address"),
            signature_tolerance: Duration::from_secs(1800),
            max_body_bytes: 64 << 20,
            outbox_relay_interval: Duration::from_secs(5),
            ..elaaoms_ingest::IngestSettings::default()
        },
    })
    .await?;
    let webhook_url = format!(
        "http://{}/v1/webhooks/elevenlabs/{BENCH_SLUG}",
        service.local_addr()
    );
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(service.run(shutdown.clone()));

    let count = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let bodies = Arc::new(webhook_bodies(count)?);
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
    let (webhooks, errors, seconds) = open_loop(args.rate, args.duration, |i| {
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
    let (publish, errors, seconds) = open_loop(args.rate, args.duration, |i| {
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
    let (durable, errors, seconds) = open_loop(args.rate, args.duration, |i| {
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
    let _ = std::fs::remove_dir_all(&payload_dir);
    Ok(())
}

async fn post_webhook(client: &reqwest::Client, url: &str, body: Bytes) -> bool {
    let signature =
        elaaoms_ingest::signature::sign(BENCH_SECRET, chrono::Utc::now().timestamp(), &body);
    match client
        .post(url)
        .header("content-type", "application/json")
        .header("elevenlabs-signature", signature)
        .body(body)
        .send()
        .await
    {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
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
