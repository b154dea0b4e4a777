//! The labelled pairs of tests/data/dedup_pairs.jsonl through stage 1 (the
//! candidate bar) and stage 2, with the real embedding model.
//!
//! In `rules` mode: prints the quality numbers; asserts that no
//! contradiction is ever merged and that recall and precision stay at what
//! was measured. With the LLM judge (an OpenAI-compatible server faked by
//! wiremock): an oracle that answers each pair's label shows that verdicts
//! flow end to end and that stage 1 still caps recall; a failing or silent
//! judge leaves every pair to the rules.

use std::collections::HashMap;
use std::time::Duration;

use elaaoms_extractor::{LlmSettings, OrganizationLlm, Providers};
use elaaoms_indexer::dedup::{judge, Decision, RulesThresholds};
use elaaoms_indexer::quality::{
    evaluate, judge_in_batches, load_pairs, similarities, JudgedPairs, LabelledPair, QualityReport,
    CANDIDATE_SIMILARITY, DEFAULT_BATCH_SIZE,
};
use elaaoms_shared::embedder::Embedder;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

fn model_dir() -> std::path::PathBuf {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/models/all-MiniLM-L6-v2"
    )
    .into()
}

/// The labelled set and each pair's similarity.
async fn labelled() -> (Vec<LabelledPair>, Vec<f64>) {
    let pairs = load_pairs(include_str!("data/dedup_pairs.jsonl")).expect("the labelled set");
    assert!(pairs.len() >= 200, "the set has {} pairs", pairs.len());
    let embedder = Embedder::local(&model_dir()).expect("model files: run deploy/local/setup.sh");
    let similarities = similarities(&embedder, &pairs).await.expect("embeddings");
    (pairs, similarities)
}

fn rules_report(
    pairs: &[LabelledPair],
    similarities: &[f64],
    rules: RulesThresholds,
) -> QualityReport {
    evaluate(
        format!(
            "rules mode, duplicate bar {}, conflict bar {}",
            rules.duplicate, rules.conflict
        ),
        pairs,
        similarities,
        rules,
        |index, similarity| judge(&pairs[index].existing, &pairs[index].new, similarity, rules),
    )
}

#[tokio::test]
async fn rules_mode_quality_on_the_labelled_pairs() {
    let (pairs, similarities) = labelled().await;

    let default = rules_report(&pairs, &similarities, RulesThresholds::default());
    for miss in &default.misses {
        println!("{miss}");
    }
    println!("{default}");
    // For the report: what a lower duplicate bar would buy and cost.
    for duplicate in [0.80, 0.78] {
        let rules = RulesThresholds {
            duplicate,
            ..RulesThresholds::default()
        };
        println!("{}", rules_report(&pairs, &similarities, rules));
    }
    let (recall, precision) = (default.recall(), default.precision());
    let QualityReport {
        false_merges_of_conflicts,
        distinct_merged,
        found_conflicts,
        ..
    } = default;
    assert_eq!(
        false_merges_of_conflicts, 0,
        "a contradicting fact was merged"
    );
    // Measured: one, "account number ends in 4471" against "card number ends
    // in 4471" (cosine 0.88; nothing in the rules tells an account from a card).
    assert!(
        distinct_merged <= 1,
        "{distinct_merged} facts about something else were merged"
    );
    // The measured numbers (see the report); a change to the rules that lowers them fails here.
    assert!(recall >= 0.82, "recall {recall:.3}");
    assert!(precision >= 0.98, "precision {precision:.3}");
    assert!(found_conflicts >= 71, "conflicts {found_conflicts}");
}

/// An OpenAI chat completion whose structured output is `verdicts`.
fn completion(verdicts: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "model": "judge-1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": json!({"verdicts": verdicts}).to_string()},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 180, "completion_tokens": 20, "total_tokens": 200}
    }))
}

/// A judge that knows the answers: each pair of the request gets its label,
/// looked up by the pair's type and texts.
struct Oracle {
    labels: HashMap<(String, String, String), &'static str>,
}

impl Respond for Oracle {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).expect("a JSON request");
        let user = body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .find(|message| message["role"] == "user")
            .expect("a user message");
        let message: Value =
            serde_json::from_str(user["content"].as_str().expect("text")).expect("JSON pairs");
        let verdicts: Vec<Value> = message["pairs"]
            .as_array()
            .expect("pairs")
            .iter()
            .filter_map(|pair| {
                let key = ["type", "earlier", "newer"]
                    .map(|field| pair[field].as_str().unwrap_or_default().to_owned());
                let label = self
                    .labels
                    .get(&(key[0].clone(), key[1].clone(), key[2].clone()))?;
                Some(json!({"pair": pair["pair"], "verdict": label}))
            })
            .collect();
        completion(Value::Array(verdicts))
    }
}

/// The judge of an organization on the OpenAI-compatible server at `llm`,
/// built as `elaaoms eval-dedup` and the indexer build it, then asked in
/// batches.
async fn judge_with(llm: &MockServer, pairs: &[LabelledPair], similarities: &[f64]) -> JudgedPairs {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = LlmSettings {
        max_retries: 1,
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        ..LlmSettings::default()
    };
    let policy = settings.retry_policy();
    let provider = Providers::new(reqwest::Client::new(), settings)
        .for_organization(&OrganizationLlm {
            provider: "openai-compatible".to_owned(),
            model: Some("judge-1".to_owned()),
            base_url: Some(format!("{}/v1", llm.uri())),
        })
        .expect("a configured provider")
        .expect("an LLM provider");
    judge_in_batches(
        provider.as_ref(),
        &policy,
        pairs,
        similarities,
        DEFAULT_BATCH_SIZE,
    )
    .await
}

fn judged_report(
    pairs: &[LabelledPair],
    similarities: &[f64],
    judged: &JudgedPairs,
) -> QualityReport {
    let rules = RulesThresholds::default();
    let mut report = evaluate(
        "LLM judge openai-compatible (judge-1), rules fallback",
        pairs,
        similarities,
        rules,
        |index, similarity| judged.decide(pairs, index, similarity, rules),
    );
    report.judge = Some(judged.coverage.clone());
    report
}

/// How many pairs labelled `label` are (not) candidates of stage 1.
fn count(pairs: &[LabelledPair], similarities: &[f64], label: Decision, candidate: bool) -> usize {
    pairs
        .iter()
        .zip(similarities)
        .filter(|(pair, &similarity)| {
            pair.label == label && (similarity >= CANDIDATE_SIMILARITY) == candidate
        })
        .count()
}

#[tokio::test]
async fn an_oracle_judge_finds_every_duplicate_that_stage_1_lets_through() {
    let (pairs, similarities) = labelled().await;
    let labels = pairs
        .iter()
        .map(|pair| {
            (
                (
                    pair.memory_type.as_str().to_owned(),
                    pair.existing.clone(),
                    pair.new.clone(),
                ),
                pair.label.as_str(),
            )
        })
        .collect();
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(Oracle { labels })
        .mount(&llm)
        .await;

    let judged = judge_with(&llm, &pairs, &similarities).await;
    let report = judged_report(&pairs, &similarities, &judged);
    println!("{report}");

    let candidates = similarities
        .iter()
        .filter(|&&similarity| similarity >= CANDIDATE_SIMILARITY)
        .count();
    let batches = candidates.div_ceil(DEFAULT_BATCH_SIZE);
    assert_eq!(llm.received_requests().await.unwrap().len(), batches);
    let coverage = report.judge.as_ref().unwrap();
    assert_eq!(
        (
            coverage.asked,
            coverage.answered,
            coverage.calls,
            coverage.failed_calls
        ),
        (candidates, candidates, batches, 0),
        "{:?}",
        judged.failures
    );
    assert_eq!(
        (coverage.usage.input, coverage.usage.output),
        (180 * batches as u64, 20 * batches as u64)
    );

    // Every duplicate past stage 1 is found; those below the bar stay missed.
    let (duplicates_in, duplicates_out) = (
        count(&pairs, &similarities, Decision::Duplicate, true),
        count(&pairs, &similarities, Decision::Duplicate, false),
    );
    assert!(duplicates_in > 0);
    assert_eq!(report.duplicates_past_stage_1, duplicates_in);
    assert_eq!(
        report.found_duplicates, duplicates_in,
        "recall 1.0 past stage 1"
    );
    assert_eq!(report.duplicates - report.found_duplicates, duplicates_out);
    assert_eq!(
        report.recall(),
        duplicates_in as f64 / (duplicates_in + duplicates_out) as f64
    );
    assert_eq!(
        report.found_conflicts,
        count(&pairs, &similarities, Decision::Conflict, true)
    );
    assert_eq!(report.false_merges_of_conflicts, 0);
    assert_eq!((report.distinct_merged, report.distinct_conflicted), (0, 0));
    assert_eq!(
        (report.merged_right, report.merged),
        (duplicates_in, duplicates_in)
    );
    // What is left wrong is stage 1's: pairs below the bar, kept apart.
    for miss in &report.misses {
        assert!(
            miss.similarity < CANDIDATE_SIMILARITY && miss.decision == Decision::Distinct,
            "{miss}"
        );
    }
    assert_eq!(
        report.misses.len(),
        duplicates_out + count(&pairs, &similarities, Decision::Conflict, false)
    );
    assert!(report.to_string().contains(&format!(
        "judge answered {candidates} of {candidates} pairs"
    )));
}

#[tokio::test]
async fn a_failing_or_silent_judge_leaves_every_pair_to_the_rules() {
    let (pairs, similarities) = labelled().await;
    let llm = MockServer::start().await;
    // The first batch fails (its call and one retry); the others get no verdict.
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream error"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&llm)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(completion(json!([])))
        .mount(&llm)
        .await;

    let judged = judge_with(&llm, &pairs, &similarities).await;
    let report = judged_report(&pairs, &similarities, &judged);
    println!("{report}");

    let coverage = report.judge.clone().unwrap();
    let batches = coverage.asked.div_ceil(DEFAULT_BATCH_SIZE);
    assert!(batches > 1);
    assert_eq!(
        (coverage.answered, coverage.calls, coverage.failed_calls),
        (0, batches, 1)
    );
    assert_eq!(judged.failures.len(), 1);
    assert_eq!(
        (coverage.usage.input, coverage.usage.output),
        (180 * (batches as u64 - 1), 20 * (batches as u64 - 1)),
        "only the answered calls cost tokens"
    );
    let rules = rules_report(&pairs, &similarities, RulesThresholds::default());
    assert_eq!(
        QualityReport {
            mode: rules.mode.clone(),
            judge: None,
            ..report
        },
        rules,
        "the rules decided every pair"
    );
}
