//! Scenario 2: end to end. The four services run in this process as `elaaoms
//! run` runs them; signed transcripts are posted open-loop at a target rate,
//! each with a conversation and a caller of its own, and each is measured
//! from its scheduled send until the indexer announces its memories
//! (`memories.indexed`, published after the transaction that makes them
//! searchable committed). The baseline in the same run is the webhook's own
//! answer (ingest alone).
//!
//! The extractor is the organization's choice: `rules` (the default), or a
//! stub OpenAI-compatible server started here that answers after a set
//! delay, so the pipeline is measured with an LLM's latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use elaaoms_shared::bus::{Bus, Envelope, Step};
use elaaoms_shared::config::{parse_duration, WorkerConfig};
use elaaoms_shared::events::MemoriesIndexed;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{
    conversation_id, machine_description, open_loop, post_webhook, spawn_service, start_ingest,
    start_query, stub_llm, webhook_bodies, BenchEnv, BenchEnvArgs, Latencies,
    PERCENTILE_TABLE_HEADER,
};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Extractor {
    /// The offline rules extractor (`llm_provider = 'rules'`).
    Rules,
    /// A stub OpenAI-compatible server on localhost that answers after
    /// `--llm-delay` (`llm_provider = 'openai-compatible'`).
    StubLlm,
}

#[derive(clap::Args, Debug)]
pub struct PipelineBenchArgs {
    #[command(flatten)]
    env: BenchEnvArgs,
    /// The extractor's and the indexer's worker settings (their in-flight
    /// limits bound the throughput).
    #[command(flatten)]
    worker: WorkerConfig,
    #[command(flatten)]
    indexer: elaaoms_indexer::IndexerSettings,
    /// Transcripts started per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Transcripts sent, each a conversation and a caller of its own.
    #[arg(long, default_value_t = 120)]
    transcripts: u64,
    #[arg(long, value_enum, default_value_t = Extractor::Rules)]
    extractor: Extractor,
    /// The stub LLM's mean answer time.
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    llm_delay: Duration,
    /// The stub LLM's answer time varies uniformly by up to this either way.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    llm_jitter: Duration,
    /// A transcript not indexed this long after its send counts as an error.
    #[arg(long = "indexed-timeout", default_value = "10m", value_parser = parse_duration)]
    indexed_timeout: Duration,
}

/// Transcripts sent and not yet indexed: conversation id to the sender that
/// receives its memory count.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<u32>>>>;

pub async fn run(args: PipelineBenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.rate > 0.0 && args.transcripts > 0,
        "--rate and --transcripts must be positive"
    );
    let env = BenchEnv::prepare(&args.env).await?;
    let embedder = env.embedder()?;
    let shutdown = CancellationToken::new();
    let mut services = Vec::new();

    let stub = match args.extractor {
        Extractor::Rules => None,
        Extractor::StubLlm => {
            let stub = stub_llm::start(args.llm_delay, args.llm_jitter, shutdown.clone()).await?;
            sqlx::query(
                "UPDATE organizations SET llm_provider = 'openai-compatible', llm_model = 'bench-stub',
                        llm_base_url = $2 WHERE id = $1",
            )
            .bind(env.organization_id)
            .bind(&stub.base_url)
            .execute(&env.admin_pool)
            .await?;
            Some(stub)
        }
    };

    // The four services, built as `elaaoms run` builds them.
    let (webhook_url, ingest) = start_ingest(&env, shutdown.clone()).await?;
    services.push(ingest);
    let extractor = elaaoms_extractor::ExtractorService::build(elaaoms_extractor::Config {
        database: env.database_config(16),
        bus: env.bus_config.clone(),
        worker: args.worker.clone(),
        payloads: env.payload_config(),
        settings: elaaoms_extractor::ExtractorSettings {
            health_addr: "127.0.0.1:0".parse().expect("valid address"),
            ..elaaoms_extractor::ExtractorSettings::default()
        },
    })
    .await
    .context("starting the extractor")?;
    services.push(spawn_service("extractor", extractor.run(shutdown.clone())));
    let indexer = elaaoms_indexer::IndexerService::build(
        elaaoms_indexer::Config {
            database: env.database_config(16),
            bus: env.bus_config.clone(),
            worker: args.worker.clone(),
            settings: elaaoms_indexer::IndexerSettings {
                health_addr: "127.0.0.1:0".parse().expect("valid address"),
                ..args.indexer.clone()
            },
            // The organization's provider judges deduplication pairs too
            // (the stub here); its URL comes from the organization's row.
            llm: elaaoms_extractor::LlmSettings::default(),
        },
        embedder.clone(),
    )
    .await
    .context("starting the indexer")?;
    services.push(spawn_service("indexer", indexer.run(shutdown.clone())));
    let (query_url, query) = start_query(&env, embedder, shutdown.clone()).await?;
    services.push(query);

    // A core subscription sees every event the stream stores on the subject.
    let bus = Bus::connect(&env.bus_config).await?;
    let mut indexed = bus
        .client
        .subscribe(bus.names.subject(Step::Indexed))
        .await?;
    let waiting: Waiting = Arc::default();
    let dispatcher = tokio::spawn({
        let waiting = waiting.clone();
        async move {
            while let Some(message) = indexed.next().await {
                let Ok(event) = Envelope::<MemoriesIndexed>::decode(&message.payload) else {
                    continue;
                };
                let done = waiting
                    .lock()
                    .expect("waiting lock")
                    .remove(&event.payload.conversation_id);
                if let Some(done) = done {
                    let _ = done.send(event.payload.created + event.payload.reinforced);
                }
            }
        }
    });

    // One more body than measured: the last one warms up connections, the
    // model and Postgres' caches, end to end.
    let bodies = Arc::new(webhook_bodies(args.transcripts + 1, true)?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let timeout = args.indexed_timeout;
    // Sends transcript `i`; returns when the webhook was answered and how
    // many memories were indexed, or `None`s for what did not happen.
    let send_and_wait = |i: u64| {
        let (client, url, body, waiting) = (
            client.clone(),
            webhook_url.clone(),
            bodies[i as usize].clone(),
            waiting.clone(),
        );
        async move {
            let (done, memories) = oneshot::channel();
            waiting
                .lock()
                .expect("waiting lock")
                .insert(conversation_id(i), done);
            if !post_webhook(&client, &url, body).await {
                return (None, None);
            }
            let answered = Instant::now();
            match tokio::time::timeout(timeout, memories).await {
                Ok(Ok(memories)) => (Some(answered), Some(memories)),
                _ => (Some(answered), None),
            }
        }
    };
    let (_, warm_up) = send_and_wait(args.transcripts).await;
    anyhow::ensure!(
        warm_up.is_some(),
        "the warm-up transcript was not indexed within {timeout:?}"
    );

    let webhooks = Latencies::new();
    let webhook_errors = Arc::new(AtomicU64::new(0));
    let memories = Arc::new(AtomicU64::new(0));
    let sending = Duration::from_secs_f64(args.transcripts as f64 / args.rate);
    let (end_to_end, errors, seconds) = open_loop(args.rate, sending, |i, scheduled| {
        let request = send_and_wait(i);
        let (webhooks, webhook_errors, memories) =
            (webhooks.clone(), webhook_errors.clone(), memories.clone());
        async move {
            let (answered, indexed) = request.await;
            match answered {
                Some(answered) => webhooks.record(answered - scheduled),
                None => {
                    webhook_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(count) = indexed {
                memories.fetch_add(u64::from(count), Ordering::Relaxed);
            }
            indexed.is_some()
        }
    })
    .await;

    // The memories of the last transcript, through the query service.
    let api_key = env.create_api_key().await?;
    let last_caller = format!("+1555{:07}", args.transcripts - 1);
    let search: serde_json::Value = client
        .post(format!("{query_url}/v1/search"))
        .bearer_auth(&api_key)
        .json(&serde_json::json!({
            "query_text": "What should the agent remember about this caller?",
            "caller_id": last_caller,
            "relevance_threshold": 0.0,
            "result_limit": 5,
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let found = search["results"].as_array().map_or(0, Vec::len);

    let mode = match args.extractor {
        Extractor::Rules => "rules extractor".to_owned(),
        Extractor::StubLlm => format!(
            "stub LLM answering in {:?} ± {:?}",
            args.llm_delay, args.llm_jitter
        ),
    };
    println!(
        "## pipeline, {mode}, {} transcripts at {} per second\n\n{}\n",
        args.transcripts,
        args.rate,
        machine_description()
    );
    println!("{PERCENTILE_TABLE_HEADER}");
    let webhooks = webhooks.summary();
    println!(
        "{}",
        webhooks.percentile_row(
            "baseline: webhook answered 200 (ingest alone)",
            sending.as_secs_f64(),
            webhook_errors.load(Ordering::Relaxed)
        )
    );
    let end_to_end = end_to_end.summary();
    println!(
        "{}",
        end_to_end.percentile_row(
            "webhook sent to memories indexed (end to end)",
            seconds,
            errors
        )
    );
    let indexed = end_to_end.count - errors;
    let memories = memories.load(Ordering::Relaxed);
    println!(
        "\nsustained: {indexed} transcripts indexed in {seconds:.1} s = {:.2} per second (offered {:.2}); \
         {memories} memories = {:.1} per transcript, {:.1} per second",
        indexed as f64 / seconds,
        args.rate,
        memories as f64 / indexed.max(1) as f64,
        memories as f64 / seconds
    );
    // One organization: its per-organization limit applies before the
    // worker's own.
    let in_flight = args
        .worker
        .worker_concurrency
        .min(args.worker.worker_per_organization_concurrency)
        .max(1);
    println!(
        "in flight per worker: {in_flight} (WORKER_CONCURRENCY {}, WORKER_PER_ORGANIZATION_CONCURRENCY {}, one organization)",
        args.worker.worker_concurrency, args.worker.worker_per_organization_concurrency
    );
    if let Some(stub) = &stub {
        let delay = args.llm_delay.as_secs_f64();
        println!(
            "expected ceiling: {in_flight} in flight / {delay:.2} s per LLM answer = {:.2} transcripts per second \
             (extractor; the indexer's deduplication judge has the same limit); the stub answered {} extractions \
             and {} deduplication judgements",
            in_flight as f64 / delay,
            stub.counts.extractions.load(Ordering::Relaxed),
            stub.counts.judgements.load(Ordering::Relaxed)
        );
    }
    println!("search for the last transcript's caller: {found} memories returned");

    shutdown.cancel();
    dispatcher.abort();
    for service in services {
        service.await??;
    }
    if let Some(stub) = stub {
        stub.task.await??;
    }
    env.remove_payloads();
    Ok(())
}
