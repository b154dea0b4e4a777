//! `elaaoms`: one binary for every service and the operator's tools. It
//! only parses configuration, wires the crates together and runs them.

mod backfill;
mod bench;
mod dedup;
mod eval;
mod operator;
mod reembed;
mod reextract;
mod replay;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use elaaoms_shared::config::{
    BusConfig, DatabaseConfig, EmbeddingConfig, PayloadStoreConfig, TelemetryConfig, WorkerConfig,
};
use elaaoms_shared::embedder::{Embedder, EmbeddingProviderConfig};
use elaaoms_shared::telemetry::init_tracing;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "elaaoms",
    version,
    about = "Long-term memory for ElevenLabs voice agents"
)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run all four services in one process (for a laptop or a demo).
    Run(Box<RunArgs>),
    /// Run the webhook receiver.
    Ingest(Box<elaaoms_ingest::Config>),
    /// Run the extraction worker.
    Extractor(Box<elaaoms_extractor::Config>),
    /// Run the indexing worker.
    Indexer(IndexerArgs),
    /// Run the query API.
    Query(QueryArgs),
    /// Create the database if needed, apply migrations, set up the services' role.
    Migrate(operator::MigrateArgs),
    /// Manage organizations.
    Org(operator::OrgArgs),
    /// Manage organization API keys.
    Apikey(operator::ApiKeyArgs),
    /// Send a bundled fixture through the running system and search the result.
    Demo(operator::DemoArgs),
    /// List or replay the dead-letter stream.
    Replay(replay::ReplayArgs),
    /// Ingest the conversations ElevenLabs has that we never received.
    Backfill(backfill::BackfillArgs),
    /// Measure throughput and latency against baselines (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Precision and recall of an extractor on the labelled transcripts.
    Eval(Box<eval::EvalArgs>),
    /// Quality of deduplication (rules or an LLM judge) on the labelled pairs.
    EvalDedup(Box<eval::EvalDedupArgs>),
    /// Extract a period's conversations again from the stored transcripts.
    Reextract(Box<reextract::ReextractArgs>),
    /// Re-embed the memories embedded by another model than the configured one.
    Reembed(Box<reembed::ReembedArgs>),
    /// Recalculate deduplication under a new threshold: report or merge duplicates.
    Dedup(dedup::DedupArgs),
}

#[derive(clap::Args, Debug)]
struct IndexerArgs {
    #[command(flatten)]
    indexer: elaaoms_indexer::Config,
    #[command(flatten)]
    embedding: EmbeddingConfig,
    #[command(flatten)]
    embedding_provider: EmbeddingProviderConfig,
}

#[derive(clap::Args, Debug)]
struct QueryArgs {
    /// Includes the embedding model directory (its tokenizer counts the
    /// context text's tokens).
    #[command(flatten)]
    query: elaaoms_query::Config,
    #[command(flatten)]
    embedding_provider: EmbeddingProviderConfig,
}

/// The shared sections once, then what each service adds.
#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    bus: BusConfig,
    #[command(flatten)]
    worker: WorkerConfig,
    #[command(flatten)]
    payloads: PayloadStoreConfig,
    #[command(flatten)]
    embedding: EmbeddingConfig,
    #[command(flatten)]
    embedding_provider: EmbeddingProviderConfig,
    #[command(flatten)]
    ingest: elaaoms_ingest::IngestSettings,
    #[command(flatten)]
    extractor: elaaoms_extractor::ExtractorSettings,
    #[command(flatten)]
    indexer: elaaoms_indexer::IndexerSettings,
    #[command(flatten)]
    query: elaaoms_query::QuerySettings,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // The default `service.name` of exported traces.
    let service = match &cli.command {
        Command::Ingest(_) => "elaaoms-ingest",
        Command::Extractor(_) => "elaaoms-extractor",
        Command::Indexer(_) => "elaaoms-indexer",
        Command::Query(_) => "elaaoms-query",
        _ => "elaaoms",
    };
    // Held to the end of main: dropping it sends the last spans.
    let _telemetry = init_tracing(&cli.telemetry, service).context("setting up telemetry")?;
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    match cli.command {
        Command::Run(args) => run_all(*args).await,
        Command::Ingest(config) => {
            let service = elaaoms_ingest::IngestService::build(*config)
                .await
                .context("starting ingest")?;
            service.run(shutdown_signal()).await.context("ingest")
        }
        Command::Extractor(config) => {
            let service = elaaoms_extractor::ExtractorService::build(*config)
                .await
                .context("starting the extractor")?;
            service.run(shutdown_signal()).await.context("extractor")
        }
        Command::Indexer(args) => {
            let embedder = load_embedder(&args.embedding, &args.embedding_provider)?;
            let service = elaaoms_indexer::IndexerService::build(args.indexer, embedder)
                .await
                .context("starting the indexer")?;
            service.run(shutdown_signal()).await.context("indexer")
        }
        Command::Query(args) => {
            let embedder = load_embedder(&args.query.embedding, &args.embedding_provider)?;
            let service = elaaoms_query::QueryService::build(args.query, embedder)
                .await
                .context("starting the query service")?;
            service.run(shutdown_signal()).await.context("query")
        }
        Command::Migrate(args) => operator::migrate(args).await,
        Command::Org(args) => operator::org(args).await,
        Command::Apikey(args) => operator::apikey(args).await,
        Command::Demo(args) => operator::demo(args).await,
        Command::Replay(args) => replay::replay(args).await,
        Command::Backfill(args) => backfill::backfill(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::Eval(args) => eval::eval(*args).await,
        Command::EvalDedup(args) => eval::eval_dedup(*args).await,
        Command::Reextract(args) => reextract::reextract(*args).await,
        Command::Reembed(args) => reembed::reembed(*args).await,
        Command::Dedup(args) => dedup::dedup(args).await,
    }
}

/// The local model (default) or OpenAI's API, as EMBEDDING_PROVIDER says.
fn load_embedder(config: &EmbeddingConfig, provider: &EmbeddingProviderConfig) -> Result<Embedder> {
    Embedder::from_config(&config.embedding_model_dir, provider).context("setting up the embedder")
}

/// Builds all four services (failing fast if any cannot start), then runs
/// them until Ctrl-C or SIGTERM stops them all.
async fn run_all(args: RunArgs) -> Result<()> {
    let embedder = load_embedder(&args.embedding, &args.embedding_provider)?;
    let ingest = elaaoms_ingest::IngestService::build(elaaoms_ingest::Config {
        database: args.database.clone(),
        bus: args.bus.clone(),
        payloads: args.payloads.clone(),
        settings: args.ingest,
    })
    .await
    .context("starting ingest")?;
    let llm = args.extractor.llm.clone();
    let extractor = elaaoms_extractor::ExtractorService::build(elaaoms_extractor::Config {
        database: args.database.clone(),
        bus: args.bus.clone(),
        worker: args.worker.clone(),
        payloads: args.payloads.clone(),
        settings: args.extractor,
    })
    .await
    .context("starting the extractor")?;
    let indexer = elaaoms_indexer::IndexerService::build(
        elaaoms_indexer::Config {
            database: args.database.clone(),
            bus: args.bus.clone(),
            worker: args.worker.clone(),
            settings: args.indexer,
            llm,
        },
        embedder.clone(),
    )
    .await
    .context("starting the indexer")?;
    let query = elaaoms_query::QueryService::build(
        elaaoms_query::Config {
            database: args.database.clone(),
            bus: args.bus.clone(),
            payloads: args.payloads.clone(),
            embedding: args.embedding.clone(),
            settings: args.query,
        },
        embedder,
    )
    .await
    .context("starting the query service")?;

    let ingest_url = format!("http://{}", ingest.local_addr());
    let query_url = format!("http://{}", query.local_addr());
    println!("ELAAOMS is running. Stop it with Ctrl-C.");
    println!("  webhook URL: {ingest_url}/v1/webhooks/elevenlabs/<organization-slug>");
    println!("  query URL:   {query_url}/v1/search   (Authorization: Bearer <api key>)");
    println!("  health:      {ingest_url}/readyz, {query_url}/readyz, http://{}/metrics, http://{}/metrics", extractor.health_addr(), indexer.health_addr());
    println!("  try it:      cargo run -- demo   (in another terminal: signs a bundled fixture, posts it, searches)");

    let shutdown = shutdown_signal();
    let (ingest, extractor, indexer, query) = tokio::join!(
        ingest.run(shutdown.clone()),
        extractor.run(shutdown.clone()),
        indexer.run(shutdown.clone()),
        query.run(shutdown.clone()),
    );
    ingest.context("ingest")?;
    extractor.context("extractor")?;
    indexer.context("indexer")?;
    query.context("query")?;
    Ok(())
}

/// A token cancelled by Ctrl-C or SIGTERM (what Kubernetes sends).
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("can listen for SIGTERM");
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: finishing work in flight");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches duplicate argument names across the flattened sections.
        super::Cli::command().debug_assert();
    }
}
