//! `elaaoms backfill` against wiremock serving the ElevenLabs conversations
//! API: only conversations we never received are ingested, through the same
//! path as a webhook.

mod common;

use chrono::TimeZone;
use common::*;
use elaaoms_ingest::backfill::{Backfill, ElevenLabsClient};
use elaaoms_ingest::webhook::ParseOptions;
use elaaoms_shared::payload_store::PayloadStore;
use wiremock::matchers::{header, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PRIYA: &str = "conv_gvs3ebxbsrwhj3s2ppxn9kyhzt";
const MAYA_SECOND: &str = "conv_9qgrnn8wf286kk516ewwhhsb3k";
const TOM: &str = "conv_2hj035qepxnq1qxy8m5kd0nwvy";

fn data_of(name: &str) -> serde_json::Value {
    let webhook: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
    webhook["data"].clone()
}

fn summary(conversation_id: &str, start: i64, status: &str) -> serde_json::Value {
    serde_json::json!({
        "agent_id": "agent_2d3fz2b14925mr76yab082z7fj",
        "conversation_id": conversation_id,
        "start_time_unix_secs": start,
        "call_duration_secs": 120,
        "message_count": 20,
        "status": status,
        "call_successful": "success",
    })
}

#[tokio::test]
async fn backfill_ingests_only_the_conversations_we_never_received() {
    let harness = Harness::start().await;
    // Received by webhook: the backfill must not fetch it again.
    assert_eq!(harness.post_signed(fixture(MAYA_FIXTURE)).await.0, 200);

    let api = MockServer::start().await;
    let since = chrono::Utc.with_ymd_and_hms(2025, 11, 1, 0, 0, 0).unwrap();
    let recent = 1_763_000_000;
    Mock::given(method("GET"))
        .and(path("/v1/convai/conversations"))
        .and(header("xi-api-key", "test-api-key"))
        .and(query_param_is_missing("cursor"))
        .and(query_param("call_start_after_unix", since.timestamp().to_string()))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "conversations": [summary(MAYA_CONVERSATION, recent, "done"), summary(PRIYA, recent, "done"), summary(TOM, recent, "processing")],
            "has_more": true,
            "next_cursor": "page-2",
        })))
        .expect(2) // two runs
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/convai/conversations"))
        .and(query_param("cursor", "page-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "conversations": [summary(MAYA_SECOND, recent, "done"), summary("conv_beforethesince", 1_000, "done")],
            "has_more": false,
            "next_cursor": null,
        })))
        .mount(&api)
        .await;
    // Rate limited once, then served.
    Mock::given(method("GET"))
        .and(path(format!("/v1/convai/conversations/{PRIYA}")))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&api)
        .await;
    for (id, name) in [
        (
            PRIYA,
            "post_call_transcription_dental_priya_2025-11-12.json",
        ),
        (
            MAYA_SECOND,
            "post_call_transcription_bakery_maya_2025-11-20.json",
        ),
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/v1/convai/conversations/{id}")))
            .and(header("xi-api-key", "test-api-key"))
            .respond_with(ResponseTemplate::new(200).set_body_json(data_of(name)))
            .mount(&api)
            .await;
    }
    for never in [MAYA_CONVERSATION, TOM, "conv_beforethesince"] {
        Mock::given(method("GET"))
            .and(path(format!("/v1/convai/conversations/{never}")))
            .respond_with(ResponseTemplate::new(500))
            .expect(0)
            .mount(&api)
            .await;
    }

    let client = ElevenLabsClient::new(&api.uri(), "test-api-key".to_owned().into()).unwrap();
    let payloads = PayloadStore::local(harness.payloads.path());
    let options = ParseOptions::default();
    let backfill = Backfill {
        pool: &harness.database.pool,
        bus: &harness.bus.bus,
        payloads: &payloads,
        client: &client,
        parse_options: &options,
    };
    let report = backfill.run(SLUG, None, since).await.unwrap();
    assert_eq!(report.listed, 4, "{report:?}");
    assert_eq!(report.already_present, 1);
    assert_eq!(report.not_done, 1);
    assert_eq!(
        report.ingested,
        vec![PRIYA.to_owned(), MAYA_SECOND.to_owned()]
    );

    assert_eq!(
        harness
            .count("SELECT count(*) FROM conversations WHERE status = 'extraction_pending'")
            .await,
        3
    );
    assert_eq!(
        harness
            .count(
                "SELECT total_conversations::bigint FROM callers WHERE caller_id = '+14155550123'"
            )
            .await,
        2
    );
    assert!(harness
        .payloads
        .path()
        .join(format!("{PRIYA}/{PRIYA}_transcription.json"))
        .is_file());
    eventually(
        std::time::Duration::from_secs(10),
        "three events",
        || async { (harness.stream_messages().await == 3).then_some(()) },
    )
    .await;
    assert_eq!(
        harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        0
    );

    // Running it again finds nothing missing.
    let again = backfill.run(SLUG, None, since).await.unwrap();
    assert!(again.ingested.is_empty(), "{again:?}");
    assert_eq!(again.already_present, 3);
    assert_eq!(harness.stream_messages().await, 3);

    assert!(matches!(
        backfill.run("no-such-org", None, since).await,
        Err(elaaoms_ingest::backfill::BackfillError::UnknownOrganization(_))
    ));
    api.verify().await;
    harness.stop().await;
}

#[tokio::test]
async fn backfill_gives_up_clearly_when_the_api_keeps_failing() {
    let harness = Harness::start().await;
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/convai/conversations"))
        .respond_with(ResponseTemplate::new(401).set_body_string("invalid api key"))
        .mount(&api)
        .await;
    let client = ElevenLabsClient::new(&api.uri(), "wrong".to_owned().into()).unwrap();
    let payloads = PayloadStore::local(harness.payloads.path());
    let options = ParseOptions::default();
    let backfill = Backfill {
        pool: &harness.database.pool,
        bus: &harness.bus.bus,
        payloads: &payloads,
        client: &client,
        parse_options: &options,
    };
    let err = backfill
        .run(SLUG, None, chrono::Utc::now())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err}");
    assert_eq!(harness.count("SELECT count(*) FROM conversations").await, 0);
    harness.stop().await;
}
