//! `init_tracing` with the OTLP exporter on, and the consumer loop under it,
//! against the real NATS and a fake collector (wiremock): the span of a
//! message continues the `traceparent` it came with, the header a handler
//! sends on names that exported span (so the next service's span is its
//! child), and dropping the guard sends what is left.
//!
//! One test in this binary: it installs the global subscriber.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use elaaoms_shared::bus::consumer::{
    run_consumer, ConsumerSettings, Delivery, Handler, HandlerError,
};
use elaaoms_shared::bus::{Step, ORGANIZATION_HEADER};
use elaaoms_shared::config::{LogFormat, TelemetryConfig};
use elaaoms_shared::telemetry::init_tracing;
use elaaoms_shared::test_support::TestBus;
use elaaoms_shared::trace::{TraceParent, TRACEPARENT_HEADER};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const WAIT: Duration = Duration::from_secs(15);
const UPSTREAM: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Records the trace each delivery carries, inside a span of its own.
#[derive(Default)]
struct Recorder {
    traces: Mutex<Vec<TraceParent>>,
}

impl Handler for Recorder {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        tracing::info_span!("handle").in_scope(|| tracing::info!("handled"));
        self.traces.lock().unwrap().push(delivery.trace);
        Ok(())
    }
}

fn exported(requests: &[wiremock::Request]) -> Vec<ResourceSpans> {
    requests
        .iter()
        .map(|request| ExportTraceServiceRequest::decode(request.body.as_slice()).unwrap())
        .flat_map(|export| export.resource_spans)
        .collect()
}

// Multi-threaded, as in `main`: the export task runs on a worker while the
// guard's drop waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_tracing_exports_a_message_span_in_the_trace_of_its_traceparent() {
    let collector = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let config = TelemetryConfig {
        log_format: LogFormat::Pretty,
        log_filter: "info".to_owned(),
        otel_exporter_otlp_endpoint: Some(collector.uri()),
        otel_service_name: None,
        otel_traces_sampler_arg: 1.0,
    };
    let guard = init_tracing(&config, "elaaoms-extractor").expect("exporter built");
    assert!(guard.is_exporting());

    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let mut headers = HeaderMap::new();
    headers.insert(ORGANIZATION_HEADER, Uuid::new_v4().to_string().as_str());
    headers.insert(TRACEPARENT_HEADER, UPSTREAM);
    bus.publish_with_headers(
        &bus.names.subject(Step::Transcribed),
        "traced-1",
        headers,
        Bytes::from_static(b"event"),
    )
    .await
    .unwrap();

    let handler = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_consumer(
        bus.clone(),
        ConsumerSettings {
            service: "extractor".to_owned(),
            step: Step::Transcribed,
            concurrency: 2,
            per_organization_concurrency: 1,
            max_attempts: 3,
            retry_delays: vec![Duration::from_millis(50)],
            ack_wait: Duration::from_secs(5),
            pull_expiry: Duration::from_secs(1),
        },
        handler.clone(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + WAIT;
    while handler.traces.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the message was never handled");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    test_bus.cleanup().await;

    // Sends the spans still buffered.
    drop(guard);

    let sent_on = handler.traces.lock().unwrap()[0];
    assert_eq!(sent_on.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    let exported = exported(&collector.received_requests().await.unwrap());
    for resource_spans in &exported {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.name")
            .and_then(|attribute| attribute.value.clone()?.value);
        assert_eq!(
            service,
            Some(Value::StringValue("elaaoms-extractor".to_owned()))
        );
    }
    let spans: Vec<_> = exported
        .into_iter()
        .flat_map(|resource| resource.scope_spans)
        .flat_map(|scope| scope.spans)
        .collect();
    let message = spans
        .iter()
        .find(|span| span.name == "message")
        .unwrap_or_else(|| panic!("no message span in {spans:?}"));
    assert_eq!(
        hex::encode(&message.trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(hex::encode(&message.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(hex::encode(&message.span_id), sent_on.span_id());
    let handle = spans
        .iter()
        .find(|span| span.name == "handle")
        .expect("the handler's span is exported");
    assert_eq!(handle.parent_span_id, message.span_id);
}
