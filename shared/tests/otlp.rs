//! The OTLP trace exporter against a fake collector (wiremock): spans that
//! continue a `traceparent` are exported under its trace id with its span
//! as parent, and their own ids are what the service sends on.
//!
//! The pipeline is installed per test with `with_default`, not globally.
//! Multi-threaded runtimes: the export task runs on a worker while the test
//! waits for a flush (or, when an assertion fails, for the SDK's shutdown
//! as the pipeline is dropped).

use elaaoms_shared::config::{LogFormat, TelemetryConfig};
use elaaoms_shared::telemetry::{init_tracing, OtlpPipeline, TelemetryError};
use elaaoms_shared::trace::{link_span, TraceParent};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tracing_subscriber::layer::SubscriberExt;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const SAMPLED_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn config(endpoint: Option<&str>, ratio: f64) -> TelemetryConfig {
    TelemetryConfig {
        log_format: LogFormat::Pretty,
        log_filter: "info".to_owned(),
        otel_exporter_otlp_endpoint: endpoint.map(str::to_owned),
        otel_service_name: None,
        otel_traces_sampler_arg: ratio,
    }
}

/// A collector that accepts every OTLP/HTTP protobuf export.
async fn collector() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .and(header("content-type", "application/x-protobuf"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

/// Every span the collector received, with the `service.name` it came with.
async fn exported_spans(server: &MockServer) -> Vec<(String, Span)> {
    let mut spans = Vec::new();
    for request in server.received_requests().await.unwrap_or_default() {
        let export = ExportTraceServiceRequest::decode(request.body.as_slice())
            .expect("the body is an OTLP protobuf export");
        for resource_spans in export.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref()?.value.clone())
                .map(|value| match value {
                    any_value::Value::StringValue(name) => name,
                    other => panic!("service.name is a string, not {other:?}"),
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }
    spans
}

fn find<'a>(spans: &'a [(String, Span)], name: &str) -> &'a (String, Span) {
    spans
        .iter()
        .find(|(_, span)| span.name == name)
        .unwrap_or_else(|| panic!("no exported span {name:?} among {spans:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_continuing_a_traceparent_is_exported_in_that_trace() {
    let server = collector().await;
    let pipeline = OtlpPipeline::from_config(&config(Some(&server.uri()), 1.0), "elaaoms-test")
        .expect("valid configuration")
        .expect("an endpoint turns the exporter on");
    let subscriber = tracing_subscriber::registry().with(pipeline.layer());

    let (continued, started) = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(
            "message",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty
        );
        let continued = link_span(&span, Some(SAMPLED_PARENT));
        span.in_scope(|| tracing::info_span!("handler work").in_scope(|| {}));
        drop(span);

        let root = tracing::info_span!("webhook");
        let started = link_span(&root, None);
        drop(root);
        (continued, started)
    });
    pipeline.flush().expect("the collector took the spans");

    assert_eq!(continued.trace_id(), TRACE_ID);
    assert_ne!(continued.span_id(), PARENT_SPAN_ID);
    assert!(continued.to_string().ends_with("-01"), "{continued}");
    assert_ne!(started.trace_id(), TRACE_ID);

    let spans = exported_spans(&server).await;
    let (service, message) = find(&spans, "message");
    assert_eq!(service, "elaaoms-test");
    assert_eq!(hex::encode(&message.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&message.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(
        hex::encode(&message.span_id),
        continued.span_id(),
        "the header sent on names the exported span"
    );
    let (_, work) = find(&spans, "handler work");
    assert_eq!(hex::encode(&work.trace_id), TRACE_ID);
    assert_eq!(work.parent_span_id, message.span_id);

    let (_, webhook) = find(&spans, "webhook");
    assert_eq!(hex::encode(&webhook.trace_id), started.trace_id());
    assert_eq!(hex::encode(&webhook.span_id), started.span_id());
    assert!(
        webhook.parent_span_id.is_empty(),
        "a new trace has no parent"
    );

    pipeline.shutdown().expect("shuts down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_follow_the_ratio_and_continued_ones_their_sender() {
    let server = collector().await;
    let mut config = config(Some(&format!("{}/", server.uri())), 0.0);
    config.otel_service_name = Some("renamed".to_owned());
    let pipeline = OtlpPipeline::from_config(&config, "elaaoms-test")
        .unwrap()
        .unwrap();
    let subscriber = tracing_subscriber::registry().with(pipeline.layer());

    let (dropped, kept, unsampled) = tracing::subscriber::with_default(subscriber, || {
        let dropped = link_span(&tracing::info_span!("new trace"), None);
        let kept = link_span(
            &tracing::info_span!("sampled upstream"),
            Some(SAMPLED_PARENT),
        );
        let unsampled = link_span(
            &tracing::info_span!("unsampled upstream"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        );
        (dropped, kept, unsampled)
    });
    pipeline.flush().expect("the collector took the spans");

    // The decision travels on in the header's sampled flag.
    assert!(dropped.to_string().ends_with("-00"), "{dropped}");
    assert!(kept.to_string().ends_with("-01"), "{kept}");
    assert!(unsampled.to_string().ends_with("-00"), "{unsampled}");
    assert_eq!(unsampled.trace_id(), "0af7651916cd43dd8448eb211c80319c");

    let spans = exported_spans(&server).await;
    let names: Vec<&str> = spans.iter().map(|(_, span)| span.name.as_str()).collect();
    assert_eq!(
        names,
        ["sampled upstream"],
        "a trailing / in the endpoint is fine"
    );
    assert_eq!(spans[0].0, "renamed", "OTEL_SERVICE_NAME wins");
    assert_eq!(hex::encode(&spans[0].1.span_id), kept.span_id());

    pipeline.shutdown().expect("shuts down");
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_installed_and_our_ids_are_kept() {
    for endpoint in [None, Some(""), Some("  ")] {
        assert!(
            OtlpPipeline::from_config(&config(endpoint, 1.0), "elaaoms-test")
                .unwrap()
                .is_none(),
            "{endpoint:?} means no exporter"
        );
    }
    let guard = init_tracing(&config(None, 1.0), "elaaoms-test").expect("no exporter to build");
    assert!(!guard.is_exporting());

    // Without the OpenTelemetry layer the span continues the header with an
    // id of our own.
    let subscriber = tracing_subscriber::registry().with(tracing_subscriber::fmt::layer());
    let continued = tracing::subscriber::with_default(subscriber, || {
        link_span(&tracing::info_span!("message"), Some(SAMPLED_PARENT))
    });
    assert_eq!(continued.trace_id(), TRACE_ID);
    assert_ne!(continued.span_id(), PARENT_SPAN_ID);
    assert_eq!(TraceParent::parse(&continued.to_string()), Some(continued));
}

#[tokio::test]
async fn a_malformed_endpoint_is_refused_naming_the_variable() {
    for endpoint in ["otel-collector:4318", "ftp://collector", "not a url"] {
        let err = OtlpPipeline::from_config(&config(Some(endpoint), 1.0), "elaaoms-test")
            .expect_err("refused");
        assert!(matches!(err, TelemetryError::Endpoint { .. }), "{err}");
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "{err}"
        );
    }
}

#[test]
fn the_exporter_needs_a_multi_threaded_tokio_runtime() {
    let config = config(Some("http://127.0.0.1:4318"), 1.0);
    let err = OtlpPipeline::from_config(&config, "x").expect_err("no runtime here");
    assert!(matches!(err, TelemetryError::NoRuntime), "{err}");
    let current_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = current_thread
        .block_on(async { OtlpPipeline::from_config(&config, "x") })
        .expect_err("a current-thread runtime");
    assert!(matches!(err, TelemetryError::NoRuntime), "{err}");
}
