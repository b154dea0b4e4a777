//! The benchmark scenarios in miniature (a few transcripts, seconds each):
//! `elaaoms bench ...` of the debug binary must succeed and print its table
//! with the expected rows and counts. No timing is asserted; BENCHMARKS.md
//! reports the full runs.

use std::process::Command;

use elaaoms_shared::test_support::{test_admin_url, TestBus, TestDatabase};
use secrecy::ExposeSecret;

/// Runs `elaaoms bench <args>` with a database and streams of its own and
/// returns what it printed.
async fn bench(args: &[&str]) -> String {
    let database = TestDatabase::create().await;
    let bus = TestBus::create().await;
    // The bench drops and recreates its database: only the name is used.
    database.pool.close().await;
    database.admin_pool.close().await;
    let output = Command::new(env!("CARGO_BIN_EXE_elaaoms"))
        .arg("bench")
        .args(args)
        .args(["--bench-database", &database.name])
        .args(["--bench-namespace", &bus.config.bus_namespace])
        .env("DATABASE_ADMIN_URL", database.admin_url.expose_secret())
        .env("DATABASE_URL", database.service_url.expose_secret())
        .env("NATS_URL", &bus.config.nats_url)
        .env(
            "EMBEDDING_MODEL_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/data/models/all-MiniLM-L6-v2"),
        )
        .env("RUST_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("start elaaoms");

    let maintenance = elaaoms_shared::db::connect_admin_pool(&test_admin_url())
        .await
        .expect("connect as admin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        database.name
    )))
    .execute(&maintenance)
    .await
    .expect("drop the bench database");
    bus.cleanup().await;

    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "elaaoms bench {args:?} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The cells of the table row named `name`.
fn row<'a>(stdout: &'a str, name: &str) -> Vec<&'a str> {
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row `{name}` in:\n{stdout}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

fn number(cell: &str) -> f64 {
    cell.parse()
        .unwrap_or_else(|_| panic!("`{cell}` is not a number"))
}

/// The number printed right before `words`, e.g. `5 memories returned`.
fn number_before(stdout: &str, words: &str) -> u64 {
    let at = stdout
        .find(words)
        .unwrap_or_else(|| panic!("no `{words}` in:\n{stdout}"));
    stdout[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before `{words}` in:\n{stdout}"))
}

fn assert_pipeline_indexed_all(stdout: &str, transcripts: &str) {
    let webhooks = row(stdout, "baseline: webhook answered 200 (ingest alone)");
    assert_eq!((webhooks[1], webhooks[2]), (transcripts, "0"), "{stdout}");
    let end_to_end = row(stdout, "webhook sent to memories indexed (end to end)");
    assert_eq!(
        (end_to_end[1], end_to_end[2]),
        (transcripts, "0"),
        "{stdout}"
    );
    assert!(number(end_to_end[3]) > 0.0, "{stdout}");
    assert!(number_before(stdout, "memories = ") > 0, "{stdout}");
    assert!(
        number_before(stdout, "memories returned") > 0,
        "the last caller's memories are searchable: {stdout}"
    );
}

#[tokio::test]
async fn pipeline_with_the_rules_extractor() {
    let stdout = bench(&["pipeline", "--transcripts", "5", "--rate", "5"]).await;
    assert!(stdout.contains("## pipeline, rules extractor"), "{stdout}");
    assert_pipeline_indexed_all(&stdout, "5");
}

#[tokio::test]
async fn pipeline_with_a_stub_llm() {
    let stdout = bench(&[
        "pipeline",
        "--transcripts",
        "5",
        "--rate",
        "5",
        "--extractor",
        "stub-llm",
        "--llm-delay",
        "200ms",
        "--llm-jitter",
        "50ms",
    ])
    .await;
    assert_pipeline_indexed_all(&stdout, "5");
    // Five measured and one warm-up transcript went through the stub.
    assert_eq!(number_before(&stdout, "extractions"), 6, "{stdout}");
    assert!(stdout.contains("expected ceiling: 4 in flight"), "{stdout}");
}

#[tokio::test]
async fn indexer_batched_and_one_by_one() {
    let stdout = bench(&["indexer", "--extractions", "3"]).await;
    let batched = row(
        &stdout,
        "batched: one embed call and one transaction per extraction",
    );
    let single = row(
        &stdout,
        "one by one: one embed call and one transaction per memory",
    );
    assert_eq!(batched[1], "3", "{stdout}");
    let memories = number(batched[2]);
    assert!(memories > 3.0, "{stdout}");
    assert_eq!(number(single[1]), memories, "a transaction per memory");
    assert_eq!(single[2], batched[2], "the same memories both ways");
    for cells in [&batched, &single] {
        let (created, reinforced) = cells[3].split_once(" / ").expect("created / reinforced");
        assert_eq!(number(created) + number(reinforced), memories, "{stdout}");
        assert!(number(cells[5]) > 0.0, "{stdout}");
    }
    assert!(stdout.contains("batched / one by one: "), "{stdout}");
}

#[tokio::test]
async fn ingest_with_its_baselines() {
    let stdout = bench(&["ingest", "--rate", "20", "--duration", "1s"]).await;
    for name in [
        "webhook answered 200 (durable)",
        "baseline: JetStream publish, PubAck awaited",
        "baseline: Postgres insert+commit, then publish",
    ] {
        let cells = row(&stdout, name);
        assert_eq!((cells[1], cells[2]), ("20", "0"), "{stdout}");
    }
}

#[tokio::test]
async fn search_with_its_baselines() {
    let stdout = bench(&[
        "search",
        "--memories",
        "200",
        "--callers",
        "10",
        "--requests",
        "5",
        "--search-rate",
        "10",
        "--context-rate",
        "20",
        "--open-loop-duration",
        "1s",
    ])
    .await;
    for name in [
        "HTTP search incl. embedding (typical caller)",
        "baseline: same SQL directly (typical caller)",
        "baseline: query embedding alone",
        "HTTP pre-call context (caller with 10k)",
    ] {
        assert_eq!(row(&stdout, name)[1], "5", "{stdout}");
    }
    // The open-loop series: every request scheduled, none failed.
    let search = row(&stdout, "HTTP search incl. embedding, 10 per second");
    assert_eq!((search[1], search[2]), ("10", "0"), "{stdout}");
    let context = row(&stdout, "HTTP pre-call context, 20 per second");
    assert_eq!((context[1], context[2]), ("20", "0"), "{stdout}");
}
