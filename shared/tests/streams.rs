//! Stream setup against the real NATS: created with the design's settings,
//! and safe to run again from every replica at every start.

use std::time::Duration;

use bytes::Bytes;
use elaaoms_shared::bus::{Bus, Step};
use elaaoms_shared::config::BusConfig;
use elaaoms_shared::test_support::TestBus;
use uuid::Uuid;

#[tokio::test]
async fn stream_setup_is_idempotent_and_keeps_messages() {
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    bus.publish(
        &bus.names.subject(Step::Transcribed),
        "kept-1",
        Uuid::new_v4(),
        Bytes::from_static(b"event"),
    )
    .await
    .unwrap();

    // Again, twice, and from a second connection with a larger size bound.
    bus.ensure_streams().await.unwrap();
    bus.ensure_streams().await.unwrap();
    let larger = Bus::connect(&BusConfig {
        stream_max_bytes: test_bus.config.stream_max_bytes * 2,
        ..test_bus.config.clone()
    })
    .await
    .unwrap();
    larger.ensure_streams().await.unwrap();

    let mut events = bus
        .jetstream
        .get_stream(bus.names.event_stream())
        .await
        .unwrap();
    let info = events.info().await.unwrap().clone();
    assert_eq!(
        info.state.messages, 1,
        "re-running setup keeps the messages"
    );
    assert_eq!(info.config.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(info.config.duplicate_window, Duration::from_secs(3600));
    assert_eq!(info.config.max_bytes, test_bus.config.stream_max_bytes * 2);
    assert!(matches!(
        info.config.discard,
        async_nats::jetstream::stream::DiscardPolicy::Old
    ));
    assert!(matches!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    ));
    assert_eq!(
        info.config.subjects,
        vec![format!("{}.elaaoms.v1.>", bus.names.namespace())]
    );

    let mut dead_letters = bus
        .jetstream
        .get_stream(bus.names.dlq_stream())
        .await
        .unwrap();
    let dlq = dead_letters.info().await.unwrap().clone();
    assert_eq!(
        dlq.config.max_age,
        Duration::ZERO,
        "dead letters wait for an operator"
    );
    assert!(matches!(
        dlq.config.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    ));

    // The duplicate window drops a republish with the same message id.
    let again = bus
        .publish(
            &bus.names.subject(Step::Transcribed),
            "kept-1",
            Uuid::new_v4(),
            Bytes::from_static(b"event"),
        )
        .await
        .unwrap();
    assert_eq!(again, info.state.last_sequence);
    assert_eq!(events.info().await.unwrap().state.messages, 1);
    test_bus.cleanup().await;
}
