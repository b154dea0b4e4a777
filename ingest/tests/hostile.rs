//! Hostile and repeated webhooks against a real ingest (port 0, own
//! database and streams): every refusal has the right status and JSON
//! error, and leaves nothing behind.

mod common;

use common::*;

fn transcription_with(data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": "post_call_transcription",
        "event_timestamp": 1764000000,
        "data": data,
    }))
    .unwrap()
}

fn assert_error(
    status: u16,
    body: &serde_json::Value,
    expected_status: u16,
    code: &str,
    mentions: &str,
    case: &str,
) {
    assert_eq!(status, expected_status, "{case}: {body}");
    assert_eq!(body["error"]["code"], code, "{case}: {body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: message in {body}"));
    assert!(
        message.contains(mentions),
        "{case}: {message:?} should mention {mentions:?}"
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        1,
        "{case}: only the error object: {body}"
    );
}

async fn assert_nothing_recorded(harness: &Harness, case: &str) {
    for table in ["conversations", "callers", "agents", "outbox"] {
        assert_eq!(
            harness
                .count(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{case}: {table}"
        );
    }
    assert_eq!(
        harness.stream_messages().await,
        0,
        "{case}: nothing published"
    );
}

#[tokio::test]
async fn hostile_bodies_are_refused_with_json_errors_and_leave_nothing() {
    let harness = Harness::start().await;
    let maya = fixture(MAYA_FIXTURE);
    let mut invalid_utf8 = maya.clone();
    let at = invalid_utf8
        .windows(5)
        .position(|w| w == b"Maya ")
        .expect("a name to corrupt");
    invalid_utf8[at] = 0xff;
    let deep = format!(
        r#"{{"type": "post_call_transcription", "data": {{"agent_id": "a", "conversation_id": "c", "user_id": "u", "x": {}{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let mut audio: serde_json::Value =
        serde_json::from_slice(&fixture("post_call_audio_bakery_maya_2025-11-03.json")).unwrap();
    audio["data"]["full_audio"] = "this is *not* base64!".into();

    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "truncated JSON",
            maya[..maya.len() / 2].to_vec(),
            400,
            "bad_request",
            "not a JSON webhook",
        ),
        (
            "invalid UTF-8",
            invalid_utf8,
            400,
            "bad_request",
            "not a JSON webhook",
        ),
        (
            "10,000-deep nesting",
            deep.into_bytes(),
            400,
            "bad_request",
            "deeper than",
        ),
        (
            "empty body",
            Vec::new(),
            400,
            "bad_request",
            "not a JSON webhook",
        ),
        (
            "JSON but not an object",
            b"[1, 2, 3]".to_vec(),
            400,
            "bad_request",
            "not a JSON webhook",
        ),
        (
            "wrong field type",
            transcription_with(
                serde_json::json!({"agent_id": "a", "conversation_id": 12345, "user_id": "u"}),
            ),
            400,
            "bad_request",
            "invalid type",
        ),
        (
            "wrong transcript type",
            transcription_with(
                serde_json::json!({"agent_id": "a", "conversation_id": "c", "user_id": "u", "transcript": "hello"}),
            ),
            400,
            "bad_request",
            "invalid type",
        ),
        (
            "missing field",
            transcription_with(serde_json::json!({"conversation_id": "c", "user_id": "u"})),
            400,
            "bad_request",
            "missing field `agent_id`",
        ),
        (
            "missing data",
            br#"{"type": "post_call_transcription"}"#.to_vec(),
            400,
            "bad_request",
            "missing field `data`",
        ),
        (
            "missing type",
            br#"{"data": {}}"#.to_vec(),
            400,
            "bad_request",
            "missing field `type`",
        ),
        (
            "invalid base64 audio",
            serde_json::to_vec(&audio).unwrap(),
            400,
            "bad_request",
            "base64",
        ),
        (
            "unknown type",
            br#"{"type": "post_call_video", "data": {"conversation_id": "c"}}"#.to_vec(),
            400,
            "bad_request",
            "unknown webhook type `post_call_video`",
        ),
        (
            "empty agent id",
            transcription_with(
                serde_json::json!({"agent_id": " ", "conversation_id": "c", "user_id": "u"}),
            ),
            422,
            "invalid_field",
            "agent_id",
        ),
        (
            "conversation id that could escape the payload directory",
            transcription_with(
                serde_json::json!({"agent_id": "a", "conversation_id": "c\u{0007}", "user_id": "u"}),
            ),
            422,
            "invalid_field",
            "conversation_id",
        ),
        (
            "negative duration",
            transcription_with(
                serde_json::json!({"agent_id": "a", "conversation_id": "c", "user_id": "u", "metadata": {"call_duration_secs": -1}}),
            ),
            422,
            "invalid_field",
            "duration",
        ),
    ];
    let total = cases.len();
    for (case, body, status, code, mentions) in cases {
        let (got, answer) = harness.post_signed(body).await;
        assert_error(got, &answer, status, code, mentions, case);
        assert_nothing_recorded(&harness, case).await;
    }
    assert!(
        harness.payload_files().is_empty(),
        "no payload stored: {:?}",
        harness.payload_files()
    );
    let metrics = harness.metrics().await;
    let rejected: u64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("elaaoms_ingest_webhooks_total")
                && line.contains(r#"outcome="rejected""#)
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(rejected, total as u64, "{metrics}");
    harness.stop().await;
}

#[tokio::test]
async fn signature_problems_are_401_and_an_unknown_organization_looks_the_same() {
    let harness = Harness::start().await;
    let body = fixture(MAYA_FIXTURE);
    let now = now();
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing header", None, "missing ElevenLabs-Signature"),
        ("empty header", Some(String::new()), "malformed"),
        ("no v0", Some(format!("t={now}")), "malformed"),
        ("no t", Some(format!("v0={}", "0".repeat(64))), "malformed"),
        (
            "non-numeric t",
            Some(format!("t=soon,v0={}", "0".repeat(64))),
            "malformed",
        ),
        ("short v0", Some(format!("t={now},v0=abc")), "malformed"),
        (
            "unknown key",
            Some(format!("t={now},x=1,v0={}", "0".repeat(64))),
            "malformed",
        ),
        (
            "expired",
            Some(elaaoms_ingest::signature::sign(
                SECRET,
                now - 31 * 60,
                &body,
            )),
            "older than the tolerance",
        ),
        (
            "future",
            Some(elaaoms_ingest::signature::sign(SECRET, now + 6 * 60, &body)),
            "in the future",
        ),
        (
            "wrong secret",
            Some(elaaoms_ingest::signature::sign(
                "whsec_wrong_secret_0123456789abcdef01",
                now,
                &body,
            )),
            "does not match",
        ),
    ];
    for (case, header, mentions) in cases {
        let (status, answer) = harness.post_to(SLUG, body.clone(), header.as_deref()).await;
        assert_error(status, &answer, 401, "unauthorized", mentions, case);
    }
    // A header that is not even text.
    let response = harness
        .client
        .post(format!("{}/v1/webhooks/elevenlabs/{SLUG}", harness.url()))
        .header(
            "ElevenLabs-Signature",
            reqwest::header::HeaderValue::from_bytes(b"t=1,v0=\xff\xfe").unwrap(),
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_error(
        401,
        &answer,
        401,
        "unauthorized",
        "malformed",
        "binary header",
    );

    // Wrong secret for a real organization and a valid-looking signature for
    // an organization that does not exist: the same answer, byte for byte.
    let wrong =
        elaaoms_ingest::signature::sign("whsec_wrong_secret_0123456789abcdef01", now, &body);
    let known = harness.post_to(SLUG, body.clone(), Some(&wrong)).await;
    let unknown = harness
        .post_to("no-such-org", body.clone(), Some(&sign_now(&body)))
        .await;
    assert_eq!(known, unknown);

    assert_nothing_recorded(&harness, "signature failures").await;
    assert!(harness.payload_files().is_empty());
    let metrics = harness.metrics().await;
    for (reason, count) in [
        ("missing", 1),
        ("malformed", 7),
        ("expired", 1),
        ("future", 1),
        ("mismatch", 3),
    ] {
        let line =
            format!(r#"elaaoms_ingest_signature_failures_total{{reason="{reason}"}} {count}"#);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    harness.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_identical_deliveries_make_one_conversation_and_one_event() {
    let harness = Harness::start().await;
    let body = fixture(MAYA_FIXTURE);
    let signature = sign_now(&body);
    let deliveries = (0..20).map(|_| harness.post_to(SLUG, body.clone(), Some(&signature)));
    let answers = futures::future::join_all(deliveries).await;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["conversation_id"], MAYA_CONVERSATION);
    }
    let new = answers
        .iter()
        .filter(|(_, a)| a["extraction"] == "queued")
        .count();
    assert_eq!(new, 20, "every delivery is acknowledged as queued");
    assert_eq!(harness.count("SELECT count(*) FROM conversations").await, 1);
    assert_eq!(
        harness
            .count(
                "SELECT total_conversations::bigint FROM callers WHERE caller_id = '+14155550123'"
            )
            .await,
        1
    );
    assert_eq!(harness.count("SELECT count(*) FROM outbox").await, 1);
    eventually(
        std::time::Duration::from_secs(10),
        "the outbox row published",
        || async {
            (harness
                .count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(harness.stream_messages().await, 1);
    let event = stream_event(&harness.bus, 1).await;
    assert_eq!(event.payload.conversation_id, MAYA_CONVERSATION);
    assert_eq!(event.payload.turns.len(), 25);
    assert_eq!(event.payload.payload_ref, None);
    let metrics = harness.metrics().await;
    assert!(
        metrics.contains(
            r#"elaaoms_ingest_webhooks_total{outcome="accepted",type="post_call_transcription"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"elaaoms_ingest_webhooks_total{outcome="duplicate",type="post_call_transcription"} 19"#), "{metrics}");
    assert!(
        metrics.contains("elaaoms_ingest_publish_seconds_count{path=\"request\"}"),
        "{metrics}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_transcript_for_an_extracted_conversation_is_acknowledged_and_not_repeated() {
    let harness = Harness::start().await;
    let body = fixture(MAYA_FIXTURE);
    assert_eq!(harness.post_signed(body.clone()).await.0, 200);
    eventually(std::time::Duration::from_secs(10), "published", || async {
        (harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .await
            == 1)
            .then_some(())
    })
    .await;
    // The pipeline finished, and the outbox was cleaned up since.
    sqlx::query("UPDATE conversations SET status = 'extraction_completed'")
        .execute(&harness.database.admin_pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox")
        .execute(&harness.database.admin_pool)
        .await
        .unwrap();

    let (status, answer) = harness.post_signed(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["extraction"], "not_repeated");
    assert_eq!(
        harness.count("SELECT count(*) FROM outbox").await,
        0,
        "no new outbox row"
    );
    assert_eq!(
        harness.count("SELECT count(*) FROM conversations WHERE status = 'extraction_completed' AND generation = 1").await,
        1
    );
    assert_eq!(
        harness
            .count("SELECT total_conversations::bigint FROM callers")
            .await,
        1
    );
    assert_eq!(
        harness.stream_messages().await,
        1,
        "nothing published again"
    );
    harness.stop().await;
}

#[tokio::test]
async fn an_unpublished_outbox_row_is_published_by_the_next_delivery() {
    // Relay effectively off: only the request path can publish here.
    let mut harness = Harness::without_ingest().await;
    let body = fixture(MAYA_FIXTURE);
    // A crash right after the commit: recorded, never published.
    let elaaoms_ingest::webhook::Webhook::Transcription(transcription) =
        elaaoms_ingest::webhook::parse_webhook(&body).unwrap()
    else {
        panic!("a transcription");
    };
    let recorded = elaaoms_ingest::persist::record_transcription(
        &harness.database.pool,
        &harness.bus.bus,
        harness.organization_id,
        &transcription,
        transcription.caller_id.as_ref().unwrap(),
        "unused",
        &elaaoms_shared::trace::TraceParent::new_root(),
    )
    .await
    .unwrap();
    assert!(recorded.new_conversation && recorded.pending.is_some());
    harness
        .start_ingest(elaaoms_ingest::IngestSettings {
            outbox_relay_interval: std::time::Duration::from_secs(3600),
            ..test_settings()
        })
        .await;
    // The retried webhook inserts nothing, but the row is still unpublished,
    // so it publishes it.
    let (status, answer) = harness.post_signed(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND stream_seq = 1")
            .await,
        1
    );
    assert_eq!(harness.stream_messages().await, 1);
    assert_eq!(
        harness
            .count("SELECT total_conversations::bigint FROM callers")
            .await,
        1
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_web_call_without_any_caller_is_stored_but_not_extracted() {
    let harness = Harness::start().await;
    let mut web: serde_json::Value = serde_json::from_slice(&fixture(MAYA_FIXTURE)).unwrap();
    web["data"]["conversation_id"] = "conv_webonly".into();
    web["data"]["metadata"]["phone_call"] = serde_json::Value::Null;
    web["data"]["user_id"] = serde_json::Value::Null;
    web["data"]["conversation_initiation_client_data"]["dynamic_variables"]["system__caller_id"] =
        "".into();
    let (status, answer) = harness.post_signed(serde_json::to_vec(&web).unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["extraction"], "skipped_no_caller");
    assert!(harness
        .payloads
        .path()
        .join("conv_webonly/conv_webonly_transcription.json")
        .is_file());
    assert_nothing_recorded(&harness, "web call without caller").await;

    // With the user id the web app passed as a dynamic variable, it is a caller.
    web["data"]["conversation_id"] = "conv_webuser".into();
    web["data"]["conversation_initiation_client_data"]["dynamic_variables"]["user_id"] =
        "web-user-77".into();
    let (status, answer) = harness.post_signed(serde_json::to_vec(&web).unwrap()).await;
    assert_eq!(
        (status, answer["extraction"].as_str()),
        (200, Some("queued")),
        "{answer}"
    );
    assert_eq!(
        harness
            .count("SELECT count(*) FROM conversations WHERE caller_id = 'web-user-77'")
            .await,
        1
    );
    harness.stop().await;
}

#[tokio::test]
async fn audio_sent_chunked_is_stored_as_mp3_and_failures_mark_the_conversation() {
    let harness = Harness::start().await;
    let body = fixture("post_call_audio_bakery_maya_2025-11-03.json");
    let signature = sign_now(&body);
    // Chunked transfer encoding, as ElevenLabs sends audio.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let response = harness
        .client
        .post(format!("{}/v1/webhooks/elevenlabs/{SLUG}", harness.url()))
        .header("ElevenLabs-Signature", signature)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let stored = std::fs::read(
        harness
            .payloads
            .path()
            .join(format!("{MAYA_CONVERSATION}/{MAYA_CONVERSATION}_audio.mp3")),
    )
    .unwrap();
    assert!(stored.starts_with(b"ID3"));
    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
    use base64::Engine;
    let mp3 = base64::engine::general_purpose::STANDARD
        .decode(sent["data"]["full_audio"].as_str().unwrap())
        .unwrap();
    assert_eq!(stored, mp3, "the decoded MP3 is stored");

    let failure = fixture("call_initiation_failure_bakery_reminder_no_answer.json");
    let (status, answer) = harness.post_signed(failure).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        harness
            .count("SELECT count(*) FROM conversations WHERE status = 'failed' AND failure_reason = 'no-answer'")
            .await,
        1
    );
    assert!(harness
        .payloads
        .path()
        .join("conv_23c485c4y1zv50f5vrr2w8v557/conv_23c485c4y1zv50f5vrr2w8v557_failure.json")
        .is_file());
    assert_eq!(harness.count("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        harness.stream_messages().await,
        0,
        "audio and failures publish nothing"
    );
    harness.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_a_json_413() {
    let harness = Harness::start_with(elaaoms_ingest::IngestSettings {
        max_body_bytes: 16 * 1024,
        ..test_settings()
    })
    .await;
    let body = fixture(MAYA_FIXTURE);
    assert!(body.len() > 16 * 1024);
    let (status, answer) = harness.post_signed(body).await;
    assert_error(
        status,
        &answer,
        413,
        "payload_too_large",
        "limit",
        "too large",
    );
    assert_nothing_recorded(&harness, "too large").await;
    harness.stop().await;
}

#[tokio::test]
async fn a_transcript_too_large_for_a_message_travels_by_reference() {
    let harness = Harness::start().await;
    let mut large: serde_json::Value = serde_json::from_slice(&fixture(MAYA_FIXTURE)).unwrap();
    let sentence =
        "I would like to order the lemon sponge with raspberry filling again, please. ".repeat(20);
    let turns: Vec<serde_json::Value> = (0..800)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 { "agent" } else { "user" }, "message": format!("{i}: {sentence}"), "time_in_call_secs": i}))
        .collect();
    large["data"]["transcript"] = serde_json::Value::Array(turns);
    let body = serde_json::to_vec(&large).unwrap();
    assert!(body.len() > 1 << 20);
    let (status, answer) = harness.post_signed(body).await;
    assert_eq!(status, 200, "{answer}");
    eventually(std::time::Duration::from_secs(10), "published", || async {
        (harness.stream_messages().await == 1).then_some(())
    })
    .await;
    let event = stream_event(&harness.bus, 1).await;
    assert!(event.payload.turns.is_empty());
    let key = event.payload.payload_ref.expect("a payload reference");
    assert_eq!(
        key,
        format!("{MAYA_CONVERSATION}/{MAYA_CONVERSATION}_transcription.json")
    );
    let stored = std::fs::read(harness.payloads.path().join(&key)).unwrap();
    let turns = elaaoms_shared::transcript::turns_of_payload(&stored).unwrap();
    assert_eq!(turns.len(), 800);
    assert!(turns[799].message.starts_with("799: "));
    harness.stop().await;
}
