//! NATS_STREAM_REPLICAS against the single local nats-server: the value
//! reaches both streams' configuration, and more than one replica is
//! refused with an error that says what to set, whether the streams exist
//! (checked here: the server would accept the update) or not (refused by
//! the server), and no stream changes.

use elaaoms_shared::bus::{Bus, BusError};
use elaaoms_shared::config::BusConfig;
use elaaoms_shared::test_support::TestBus;

async fn replicas_of(bus: &Bus, stream: &str) -> usize {
    let mut stream = bus.jetstream.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().config.num_replicas
}

#[tokio::test]
async fn the_configured_replica_count_reaches_both_streams() {
    let test_bus = TestBus::create().await;
    assert_eq!(test_bus.config.nats_stream_replicas, 1);
    let bus = &test_bus.bus;
    bus.ensure_streams().await.unwrap();
    assert_eq!(replicas_of(bus, &bus.names.event_stream()).await, 1);
    assert_eq!(replicas_of(bus, &bus.names.dlq_stream()).await, 1);
    test_bus.cleanup().await;
}

#[tokio::test]
async fn three_replicas_on_a_single_server_are_refused_naming_the_setting() {
    let test_bus = TestBus::create().await;
    let three = BusConfig {
        nats_stream_replicas: 3,
        ..test_bus.config.clone()
    };

    // Existing streams: the server would take the update silently.
    let bus = Bus::connect(&three).await.unwrap();
    let err = bus.ensure_streams().await.expect_err("a single server");
    assert!(
        matches!(err, BusError::StreamReplicas { replicas: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("NATS_STREAM_REPLICAS=1"), "{err}");
    let names = &test_bus.bus.names;
    assert_eq!(replicas_of(&test_bus.bus, &names.event_stream()).await, 1);
    assert_eq!(replicas_of(&test_bus.bus, &names.dlq_stream()).await, 1);
    test_bus.cleanup().await;

    // No streams yet: the server refuses to create them.
    let fresh = Bus::connect(&BusConfig {
        bus_namespace: format!("{}r", test_bus.config.bus_namespace),
        ..three
    })
    .await
    .unwrap();
    let err = fresh.ensure_streams().await.expect_err("a single server");
    assert!(err.to_string().contains("NATS_STREAM_REPLICAS=1"), "{err}");
    assert!(fresh
        .jetstream
        .get_stream(fresh.names.event_stream())
        .await
        .is_err());
}
