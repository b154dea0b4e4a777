//! The payload store as ingest uses it (real ingest on port 0, own database
//! and streams): a webhook whose payload cannot be stored gets a 503 and
//! leaves nothing behind; once the store is back the same delivery is
//! stored in the documented layout and recorded.

mod common;

use common::*;

#[tokio::test]
async fn an_unwritable_payload_store_is_a_503_that_leaves_nothing_then_a_retry_succeeds() {
    let harness = Harness::start().await;
    let root = harness.payloads.path().to_owned();
    // Break the store after start: its root is now a file, so no
    // conversation directory can be created under it (root ignores
    // permissions, so chmod would not do).
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::write(&root, b"not a directory").unwrap();

    let body = fixture(MAYA_FIXTURE);
    let (status, answer) = harness.post_signed(body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    for table in ["conversations", "callers", "outbox"] {
        assert_eq!(
            harness
                .count(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}: nothing recorded without a stored payload"
        );
    }
    assert_eq!(harness.stream_messages().await, 0, "nothing published");

    std::fs::remove_file(&root).unwrap();
    std::fs::create_dir(&root).unwrap();
    let (status, answer) = harness.post_signed(body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let stored = root
        .join(MAYA_CONVERSATION)
        .join(format!("{MAYA_CONVERSATION}_transcription.json"));
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        body,
        "stored byte for byte"
    );
    assert_eq!(
        harness.payload_files(),
        [stored],
        "one payload file, no staging file left"
    );
    assert_eq!(harness.count("SELECT count(*) FROM conversations").await, 1);
    harness.stop().await;
}
