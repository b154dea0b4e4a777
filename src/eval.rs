//! `elaaoms eval`: precision and recall of an extractor on the labelled set
//! (the logic is in `elaaoms_extractor::eval`). `elaaoms eval-dedup`: the
//! quality of deduplication's stage 2 on the labelled pairs (the logic is in
//! `elaaoms_indexer::quality`). `--provider rules` needs nothing; an LLM
//! provider uses the extractor's own configuration (OPENAI_API_KEY,
//! ANTHROPIC_API_KEY, ...), built exactly as the workers build it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use elaaoms_extractor::eval::{self, EvalExtractor, DEFAULT_MATCH_THRESHOLD};
use elaaoms_extractor::provider::{Provider, RetryPolicy};
use elaaoms_extractor::{provider_http_client, LlmSettings, OrganizationLlm, Providers};
use elaaoms_indexer::dedup::{judge, RulesThresholds};
use elaaoms_indexer::quality;
use elaaoms_shared::config::EmbeddingConfig;
use elaaoms_shared::embedder::Embedder;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Directory of labelled cases (one JSON file per transcript).
    #[arg(long, default_value = "tests/data/eval")]
    data_dir: PathBuf,
    /// `rules`, `openai`, `anthropic` or `openai-compatible`.
    #[arg(long, default_value = "rules")]
    provider: String,
    /// The model (default: the provider's configured model).
    #[arg(long)]
    model: Option<String>,
    /// The provider's base URL (default: the configured one).
    #[arg(long)]
    base_url: Option<String>,
    /// Cosine similarity at which an extracted memory matches an expected one of the same type.
    #[arg(long, default_value_t = DEFAULT_MATCH_THRESHOLD)]
    match_threshold: f32,
    /// Fail (exit 1) when overall recall is below this (0-1), for CI.
    #[arg(long)]
    min_recall: Option<f64>,
    /// Fail (exit 1) when overall precision is below this (0-1), for CI.
    #[arg(long)]
    min_precision: Option<f64>,
    #[command(flatten)]
    embedding: EmbeddingConfig,
    #[command(flatten)]
    llm: LlmSettings,
}

/// The provider named on the command line (`None`: rules), built exactly
/// as the workers build an organization's, and how its calls are retried.
fn provider_for(
    llm: LlmSettings,
    provider: &str,
    model: Option<String>,
    base_url: Option<String>,
) -> Result<(Option<Box<dyn Provider>>, RetryPolicy)> {
    let http = provider_http_client().context("building the HTTP client")?;
    let providers = Providers::new(http, llm);
    let provider = providers
        .for_organization(&OrganizationLlm {
            provider: provider.to_owned(),
            model,
            base_url,
        })
        .map_err(|err| anyhow::anyhow!(err))?;
    Ok((provider, providers.retry_policy()))
}

pub async fn eval(args: EvalArgs) -> Result<()> {
    let cases = eval::load_cases(&args.data_dir)?;
    let embedder = Embedder::local(&args.embedding.embedding_model_dir)
        .context("loading the local embedder (run deploy/local/setup.sh)")?;
    let (provider, retry_policy) =
        provider_for(args.llm, &args.provider, args.model, args.base_url)?;
    let extractor = match provider {
        None => EvalExtractor::Rules,
        Some(provider) => EvalExtractor::Llm {
            provider,
            retry_policy,
        },
    };
    println!(
        "evaluating {} on {} case(s) from {} (match: same type, similarity >= {})",
        extractor.label(),
        cases.len(),
        args.data_dir.display(),
        args.match_threshold
    );
    let report = eval::evaluate(
        &extractor,
        &embedder,
        &cases,
        args.match_threshold,
        |id, extracted, matched| eprintln!("  {id}: {extracted} extracted, {matched} matched"),
    )
    .await?;
    println!("{report}");
    for (case, reason) in &report.failures {
        println!("  failed: {case}: {reason}");
    }
    let overall = report.overall;
    if let Some(floor) = args.min_recall {
        if overall.recall().unwrap_or(0.0) < floor {
            bail!("recall below {floor}");
        }
    }
    if let Some(floor) = args.min_precision {
        if overall.precision().unwrap_or(0.0) < floor {
            bail!("precision below {floor}");
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct EvalDedupArgs {
    /// The labelled pairs (JSON lines: existing, new, type, label).
    #[arg(long, default_value = "indexer/tests/data/dedup_pairs.jsonl")]
    pairs: PathBuf,
    /// Stage 2: `rules`, or the LLM judge of `openai`, `anthropic` or `openai-compatible`.
    #[arg(long, default_value = "rules")]
    provider: String,
    /// The model (default: the provider's configured model).
    #[arg(long)]
    model: Option<String>,
    /// The provider's base URL (default: the configured one).
    #[arg(long)]
    base_url: Option<String>,
    /// Pairs per judge call (the indexer sends one extraction's pairs per call).
    #[arg(long, default_value_t = quality::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    #[command(flatten)]
    embedding: EmbeddingConfig,
    #[command(flatten)]
    llm: LlmSettings,
}

pub async fn eval_dedup(args: EvalDedupArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.pairs)
        .with_context(|| format!("reading {}", args.pairs.display()))?;
    let pairs = quality::load_pairs(&text)?;
    let embedder = Embedder::local(&args.embedding.embedding_model_dir)
        .context("loading the local embedder (run deploy/local/setup.sh)")?;
    let similarities = quality::similarities(&embedder, &pairs).await?;
    let (provider, retry_policy) =
        provider_for(args.llm, &args.provider, args.model, args.base_url)?;
    // The indexer's defaults: the rules decide, or decide what the judge left.
    let rules = RulesThresholds::default();
    println!(
        "evaluating deduplication by {} on {} pair(s) from {}",
        args.provider,
        pairs.len(),
        args.pairs.display()
    );
    let report = match provider {
        None => quality::evaluate(
            format!(
                "rules mode, duplicate bar {}, conflict bar {}",
                rules.duplicate, rules.conflict
            ),
            &pairs,
            &similarities,
            rules,
            |index, similarity| judge(&pairs[index].existing, &pairs[index].new, similarity, rules),
        ),
        Some(provider) => {
            let judged = quality::judge_in_batches(
                provider.as_ref(),
                &retry_policy,
                &pairs,
                &similarities,
                args.batch_size,
            )
            .await;
            for failure in &judged.failures {
                eprintln!("  a judge call failed (its pairs went to the rules): {failure}");
            }
            let mut report = quality::evaluate(
                format!(
                    "LLM judge {} ({}), rules fallback duplicate bar {}, conflict bar {}",
                    provider.name(),
                    provider.model(),
                    rules.duplicate,
                    rules.conflict
                ),
                &pairs,
                &similarities,
                rules,
                |index, similarity| judged.decide(&pairs, index, similarity, rules),
            );
            report.judge = Some(judged.coverage);
            report
        }
    };
    for miss in &report.misses {
        println!("{miss}");
    }
    println!("{report}");
    Ok(())
}
