//! Scenario 3: search latency at scale. Generates `--memories` memories
//! across `--callers` callers (plus one caller with 10,000), with texts from
//! the bundled transcripts and real embeddings for a sample (the rest are
//! those embeddings plus noise, normalised: the scan cost does not depend on
//! the values, only realism of scores does). Then measures, one request at a
//! time: the HTTP search (embedding included), the same SQL issued directly
//! with a precomputed embedding, and the embedding alone.

use std::time::Instant;

use anyhow::Result;
use elaaoms_shared::db;
use elaaoms_shared::embedder::Embedder;
use pgvector::Vector;
use tokio_util::sync::CancellationToken;

use super::{
    fixture_transcripts, machine_description, open_loop, start_query, BenchEnv, BenchEnvArgs,
    Latencies, LATENCY_TABLE_HEADER, TABLE_HEADER,
};

#[derive(clap::Args, Debug)]
pub struct SearchBenchArgs {
    #[command(flatten)]
    env: BenchEnvArgs,
    /// Memories spread across the callers.
    #[arg(long, default_value_t = 10_000)]
    memories: u64,
    #[arg(long, default_value_t = 1_000)]
    callers: u64,
    /// Requests measured per series.
    #[arg(long, default_value_t = 500)]
    requests: u64,
    /// Open loop: searches per second (typical callers, new texts), as
    /// agents mid-call would send them; 0 skips the series.
    #[arg(long, default_value_t = 50.0)]
    search_rate: f64,
    /// Open loop: pre-call contexts per second; 0 skips the series.
    #[arg(long, default_value_t = 200.0)]
    context_rate: f64,
    /// Length of each open-loop series.
    #[arg(long, default_value = "20s", value_parser = elaaoms_shared::config::parse_duration)]
    open_loop_duration: std::time::Duration,
}

const QUERIES: [&str; 8] = [
    "Does anyone in the family have a food allergy?",
    "What flavours does she like?",
    "Is there an open complaint?",
    "How does the caller prefer to be contacted?",
    "Who picks up the orders?",
    "Is the caller anxious about anything?",
    "When are good appointment times?",
    "Does the internet keep dropping?",
];

const HEAVY_CALLER: &str = "caller_heavy";
const HEAVY_MEMORIES: u64 = 10_000;
const NOISE_VECTORS: u64 = 64;

/// Sentences as extracted memories are written, from the fixtures.
fn base_sentences() -> Result<Vec<(String, &'static str)>> {
    Ok(fixture_transcripts()?
        .iter()
        .flat_map(|turns| elaaoms_extractor::rules::extract_memories(turns))
        .map(|memory| {
            (
                memory.content.as_str().to_owned(),
                memory.memory_type.as_str(),
            )
        })
        .collect())
}

async fn generate(env: &BenchEnv, embedder: &Embedder, memories: u64, callers: u64) -> Result<()> {
    let started = Instant::now();
    let base = base_sentences()?;
    let texts: Vec<String> = base.iter().map(|(text, _)| text.clone()).collect();
    let embeddings = embedder.embed(texts).await?;
    let admin = &env.admin_pool;
    sqlx::query("CREATE TABLE bench_base (id bigint PRIMARY KEY, content text, type text, embedding vector(384))")
        .execute(admin)
        .await?;
    for (id, ((content, kind), embedding)) in base.iter().zip(embeddings).enumerate() {
        sqlx::query("INSERT INTO bench_base VALUES ($1, $2, $3, $4)")
            .bind(id as i64)
            .bind(content)
            .bind(kind)
            .bind(Vector::from(embedding))
            .execute(admin)
            .await?;
    }
    sqlx::query("CREATE TABLE bench_noise (id bigint PRIMARY KEY, embedding vector(384))")
        .execute(admin)
        .await?;
    for id in 0..NOISE_VECTORS {
        let noise: Vec<f32> = (0..384)
            .map(|_| (rand::random::<f32>() - 0.5) * 0.08)
            .collect();
        sqlx::query("INSERT INTO bench_noise VALUES ($1, $2)")
            .bind(id as i64)
            .bind(Vector::from(noise))
            .execute(admin)
            .await?;
    }
    let organization_id = env.organization_id;
    sqlx::query("INSERT INTO agents (organization_id, agent_id) VALUES ($1, 'agent_bench')")
        .bind(organization_id)
        .execute(admin)
        .await?;
    sqlx::query(
        "INSERT INTO callers (organization_id, caller_id, first_seen_at, last_seen_at, total_conversations)
         SELECT $1, c, now() - interval '90 days', now(), 1
           FROM (SELECT 'caller_' || lpad(g::text, 6, '0') AS c FROM generate_series(0, $2 - 1) g
                 UNION ALL SELECT $3) callers",
    )
    .bind(organization_id)
    .bind(callers as i64)
    .bind(HEAVY_CALLER)
    .execute(admin)
    .await?;
    sqlx::query(
        "INSERT INTO conversations (organization_id, conversation_id, agent_id, caller_id, start_time, status)
         SELECT $1, 'conv_' || caller_id, 'agent_bench', caller_id, now(), 'completed' FROM callers",
    )
    .bind(organization_id)
    .execute(admin)
    .await?;
    // Memory g belongs to caller g % callers (callers interleave on disk, as
    // calls do over time) and is base sentence (g / callers) % base, so each
    // caller has every kind of memory, not one sentence a thousand times.
    let insert = "INSERT INTO memories (organization_id, caller_id, agent_id, conversation_id, content, type,
                                        importance, confidence, status, created_at, embedding, embedding_model)
         SELECT $1, c.caller_id, 'agent_bench', 'conv_' || c.caller_id, b.content, b.type,
                1 + (g % 10), 0.7, CASE WHEN b.type = 'issue' THEN 'open' END,
                now() - make_interval(mins => g::int), l2_normalize(b.embedding + n.embedding), 'all-MiniLM-L6-v2'
           FROM generate_series(0, $2 - 1) g
           JOIN LATERAL (SELECT CASE WHEN $4 THEN $5 ELSE 'caller_' || lpad((g % $3)::text, 6, '0') END AS caller_id) c ON true
           JOIN LATERAL (SELECT CASE WHEN $4 THEN g ELSE g / $3 END AS k) i ON true
           JOIN bench_base b ON b.id = i.k % (SELECT count(*) FROM bench_base)
           JOIN bench_noise n ON n.id = (i.k / (SELECT count(*) FROM bench_base)) % $6";
    for (rows, heavy) in [(memories, false), (HEAVY_MEMORIES, true)] {
        sqlx::query(sqlx::AssertSqlSafe(insert))
            .bind(organization_id)
            .bind(rows as i64)
            .bind(callers as i64)
            .bind(heavy)
            .bind(HEAVY_CALLER)
            .bind(NOISE_VECTORS as i64)
            .execute(admin)
            .await?;
    }
    // What autovacuum does to a serving table: statistics, and the
    // visibility map that lets search rank from its covering index alone.
    sqlx::raw_sql("VACUUM ANALYZE").execute(admin).await?;
    println!(
        "generated {} memories for {} callers (+{HEAVY_MEMORIES} for one caller) in {:.1} s",
        memories,
        callers,
        started.elapsed().as_secs_f64()
    );
    // The generation's writes are flushed now, not by a checkpoint that
    // would run in the middle of the measurements.
    sqlx::query("CHECKPOINT").execute(admin).await?;
    prewarm(admin).await;
    Ok(())
}

/// A serving database has its working set in memory; a freshly generated
/// one does not (bulk inserts bypass the buffer cache). Loads the memories
/// table and its indexes into shared_buffers with pg_prewarm where the
/// extension is installed, and says how much fits.
async fn prewarm(admin: &sqlx::PgPool) {
    let loaded: Result<(i64, String), sqlx::Error> = async {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            .execute(admin)
            .await?;
        sqlx::query_as(
            "SELECT sum(pg_prewarm(c.oid))::bigint, current_setting('shared_buffers')
               FROM pg_class c
              WHERE c.oid = 'memories'::regclass
                 OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'memories'::regclass)",
        )
        .fetch_one(admin)
        .await
    }
    .await;
    match loaded {
        Ok((blocks, shared_buffers)) => println!(
            "prewarmed {} MB of the memories table and its indexes (shared_buffers = {shared_buffers})",
            blocks * 8 / 1024
        ),
        Err(err) => println!("not prewarmed (pg_prewarm unavailable: {err}): the first reads are cold"),
    }
}

pub async fn run(args: SearchBenchArgs) -> Result<()> {
    let env = BenchEnv::prepare(&args.env).await?;
    let embedder = env.embedder()?;
    generate(&env, &embedder, args.memories, args.callers).await?;
    let api_key = env.create_api_key().await?;
    let shutdown = CancellationToken::new();
    let (base_url, server) = start_query(&env, embedder.clone(), shutdown.clone()).await?;
    let search_url = format!("{base_url}/v1/search");
    let client = reqwest::Client::new();

    let caller_of = |i: u64| format!("caller_{:06}", (i * 7919) % args.callers);
    // Each query text is new, so no cache can answer it.
    let query_of = |i: u64| format!("{} ({i})", QUERIES[i as usize % QUERIES.len()]);
    let warm = args.requests.min(50);

    let http = Latencies::new();
    let heavy = Latencies::new();
    for i in 0..args.requests + warm {
        for (caller, latencies) in [(caller_of(i), &http), (HEAVY_CALLER.to_owned(), &heavy)] {
            let body = serde_json::json!({
                // Per caller too, so the service's embedding cache never answers.
                "query_text": format!("{} {caller}", query_of(i)),
                "caller_id": caller,
                "relevance_threshold": 0.3,
                "result_limit": 5,
            });
            let started = Instant::now();
            let response = client
                .post(&search_url)
                .bearer_auth(&api_key)
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "search failed: {}",
                response.status()
            );
            response.bytes().await?;
            if i >= warm {
                latencies.record(started.elapsed());
            }
        }
    }

    // The pre-call context embeds nothing: summary, open issues and the
    // newest visible memories by the caller's btree, plus the token count.
    let context = Latencies::new();
    let context_heavy = Latencies::new();
    for i in 0..args.requests + warm {
        for (caller, latencies) in [
            (caller_of(i), &context),
            (HEAVY_CALLER.to_owned(), &context_heavy),
        ] {
            let url = format!("{base_url}/v1/callers/{caller}/context?agent_id=agent_bench");
            let started = Instant::now();
            let response = client.get(&url).bearer_auth(&api_key).send().await?;
            anyhow::ensure!(
                response.status().is_success(),
                "context failed: {}",
                response.status()
            );
            response.bytes().await?;
            if i >= warm {
                latencies.record(started.elapsed());
            }
        }
    }

    let embedding = Latencies::new();
    let sql = Latencies::new();
    let sql_heavy = Latencies::new();
    for i in 0..args.requests + warm {
        let started = Instant::now();
        let vector = Vector::from(embedder.embed_one(&query_of(i)).await?);
        if i >= warm {
            embedding.record(started.elapsed());
        }
        for (caller, latencies) in [(caller_of(i), &sql), (HEAVY_CALLER.to_owned(), &sql_heavy)] {
            let started = Instant::now();
            let mut tx = db::begin_org_tx(&env.pool, env.organization_id).await?;
            let rows = sqlx::query(sqlx::AssertSqlSafe(elaaoms_query::search_sql()))
                .bind(env.organization_id)
                .bind(&caller)
                .bind(&vector)
                .bind(None::<String>)
                .bind(None::<Vec<String>>)
                .bind(None::<i16>)
                .bind(0.3_f64)
                .bind(5_i64)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            std::hint::black_box(rows);
            if i >= warm {
                latencies.record(started.elapsed());
            }
        }
    }

    println!(
        "\n## search, {} memories across {} callers (+ one caller with {HEAVY_MEMORIES})\n\n{}\n",
        args.memories,
        args.callers,
        machine_description()
    );
    println!("{LATENCY_TABLE_HEADER}");
    for (name, latencies) in [
        ("HTTP search incl. embedding (typical caller)", &http),
        ("HTTP search incl. embedding (caller with 10k)", &heavy),
        ("baseline: same SQL directly (typical caller)", &sql),
        ("baseline: same SQL directly (caller with 10k)", &sql_heavy),
        ("baseline: query embedding alone", &embedding),
        ("HTTP pre-call context (typical caller)", &context),
        ("HTTP pre-call context (caller with 10k)", &context_heavy),
    ] {
        println!("{}", latencies.summary().latency_row(name));
    }
    let (http, sql, embedding) = (http.summary(), sql.summary(), embedding.summary());
    println!(
        "\nHTTP search p50 {:.2} ms = embedding {:.2} ms + SQL {:.2} ms + {:.2} ms other (auth, JSON, HTTP)",
        http.p50_ms,
        embedding.p50_ms,
        sql.p50_ms,
        http.p50_ms - embedding.p50_ms - sql.p50_ms
    );

    // Open loop at the rates: requests start on schedule whatever
    // the answers do, so queueing shows in the latencies.
    println!(
        "\n### open loop, {:?} per series\n\n{TABLE_HEADER}",
        args.open_loop_duration
    );
    if args.search_rate > 0.0 {
        let series = open_loop(args.search_rate, args.open_loop_duration, |i, _| {
            let (client, url, key) = (client.clone(), search_url.clone(), api_key.clone());
            // Offset from the sequential series so no text repeats.
            let i = i + 1_000_000;
            let caller = caller_of(i);
            let body = serde_json::json!({
                "query_text": format!("{} {caller}", query_of(i)),
                "caller_id": caller,
                "relevance_threshold": 0.3,
                "result_limit": 5,
            });
            async move { succeeded(client.post(url).bearer_auth(key).json(&body)).await }
        })
        .await;
        println!(
            "{}",
            open_loop_row(
                &format!(
                    "HTTP search incl. embedding, {} per second",
                    args.search_rate
                ),
                series
            )
        );
        // The same rate of embeddings alone: how much of the open-loop
        // search is the embedding on an otherwise idle machine.
        let series = open_loop(args.search_rate, args.open_loop_duration, |i, _| {
            let embedder = embedder.clone();
            let text = query_of(i + 2_000_000);
            async move { embedder.embed_one(&text).await.is_ok() }
        })
        .await;
        println!(
            "{}",
            open_loop_row(
                &format!(
                    "baseline: query embedding alone, {} per second",
                    args.search_rate
                ),
                series
            )
        );
    }
    if args.context_rate > 0.0 {
        let series = open_loop(args.context_rate, args.open_loop_duration, |i, _| {
            let (client, key) = (client.clone(), api_key.clone());
            let url = format!(
                "{base_url}/v1/callers/{}/context?agent_id=agent_bench",
                caller_of(i)
            );
            async move { succeeded(client.get(url).bearer_auth(key)).await }
        })
        .await;
        println!(
            "{}",
            open_loop_row(
                &format!("HTTP pre-call context, {} per second", args.context_rate),
                series
            )
        );
    }

    shutdown.cancel();
    server.await??;
    env.remove_payloads();
    Ok(())
}

/// A table row of one open-loop series, as [`open_loop`] returned it.
fn open_loop_row(name: &str, (latencies, errors, seconds): (Latencies, u64, f64)) -> String {
    latencies.summary().row(name, seconds, errors)
}

/// Sends the request and reads the whole answer; whether it was a 2xx.
async fn succeeded(request: reqwest::RequestBuilder) -> bool {
    match request.send().await {
        Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
        Err(_) => false,
    }
}
