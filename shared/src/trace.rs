//! W3C trace context (`traceparent`) carried in HTTP and message headers, so
//! that one webhook's path through ingest, extractor and indexer is one
//! trace: ingest starts (or continues) it, each worker publishes its next
//! event with a child of the one it consumed.
//!
//! Ids come from `rand`, the header is formatted here, and the logs carry
//! `trace_id` as a span field. When the OTLP exporter is on (see
//! `telemetry`), [`link_span`] makes the exported span continue the
//! incoming header and adopts that span's ids, so the ids in the logs, in
//! the headers and in the exporter are the same: the W3C header is the link.

use std::fmt;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rand::Rng;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header name, in HTTP and in NATS message headers (W3C spells it in
/// lower case).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// `00-{trace id}-{parent span id}-{flags}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// The "sampled" flag: set on every trace this service starts, so a
/// collector that samples by the parent keeps the whole pipeline's path.
const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// A new trace with a random trace id and span id.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        Self {
            trace_id: nonzero(|| rng.random()),
            span_id: nonzero(|| rng.random()),
            flags: SAMPLED,
        }
    }

    /// The same trace, a new span: what a service sends on after it has
    /// worked on a message that carried `self`.
    pub fn child(&self) -> Self {
        let mut rng = rand::rng();
        Self {
            trace_id: self.trace_id,
            span_id: nonzero(|| rng.random()),
            flags: self.flags,
        }
    }

    /// Continues the trace of an incoming header (as a child span), or
    /// starts a new one when there is none or it is malformed: a bad header
    /// from a client must never fail a request.
    pub fn continue_or_start(header: Option<&str>) -> Self {
        match header.and_then(Self::parse) {
            Some(parent) => parent.child(),
            None => Self::new_root(),
        }
    }

    /// Parses a header per W3C Trace Context level 1: lower-case hex,
    /// version `ff` invalid, version `00` exactly 55 characters, a later
    /// version may append `-`-separated fields (ignored), all-zero ids
    /// invalid.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        if header.len() < 55 || !header.is_ascii() {
            return None;
        }
        let version = parse_hex::<1>(&header[0..2])?[0];
        if version == 0xff || (version == 0 && header.len() != 55) {
            return None;
        }
        if header.len() > 55 && header.as_bytes()[55] != b'-' {
            return None;
        }
        let bytes = header.as_bytes();
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = parse_hex::<16>(&header[3..35])?;
        let span_id = parse_hex::<8>(&header[36..52])?;
        let flags = parse_hex::<1>(&header[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// 32 lower-case hex digits: the field every log line of the trace
    /// carries.
    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        hex::encode(self.span_id)
    }

    /// The same ids as an OpenTelemetry span context received from another
    /// process: what a span continuing this header takes as its parent.
    pub fn remote_span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::NONE,
        )
    }

    /// The header of an OpenTelemetry span; `None` for an invalid context
    /// (no exporter, or a disabled span).
    pub fn from_span_context(context: &SpanContext) -> Option<Self> {
        if !context.is_valid() {
            return None;
        }
        Some(Self {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
        })
    }
}

/// Makes `span` this service's span of the trace in `incoming` (a
/// `traceparent` header as received, if any) and returns the header to log
/// and to send on. Records it in the span's `trace_id` and `span_id`
/// fields, which the span should declare as `tracing::field::Empty`.
///
/// With the OTLP exporter on, the exported span takes the incoming header
/// as its remote parent, and its own ids (and sampling decision) become the
/// returned header: the next service's span is then its child in the
/// exporter, under the same trace id as in the logs. Without the exporter
/// (or with the span filtered out) this is
/// [`TraceParent::continue_or_start`].
pub fn link_span(span: &tracing::Span, incoming: Option<&str>) -> TraceParent {
    let parent = incoming.and_then(TraceParent::parse);
    if let Some(parent) = &parent {
        // An error means no OpenTelemetry layer or a disabled span: then
        // there is nothing to export and our own ids are used below.
        let _ = span.set_parent(
            opentelemetry::Context::new().with_remote_span_context(parent.remote_span_context()),
        );
    }
    // Starts the exported span (its parent is fixed from here on).
    let exported = span.context();
    let trace =
        TraceParent::from_span_context(exported.span().span_context()).unwrap_or_else(|| {
            match parent {
                Some(parent) => parent.child(),
                None => TraceParent::new_root(),
            }
        });
    span.record("trace_id", trace.trace_id());
    span.record("span_id", trace.span_id());
    trace
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }
}

/// Lower-case hex only: W3C forbids upper case, and a header that breaks
/// the format is treated as absent.
fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// All-zero ids are invalid; a random one is all zero with a probability
/// of 2^-64 at most, but drawing again costs nothing.
fn nonzero<const N: usize>(mut draw: impl FnMut() -> [u8; N]) -> [u8; N] {
    loop {
        let id = draw();
        if id != [0; N] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let parsed = TraceParent::parse(VALID).expect("valid header");
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id(), "00f067aa0ba902b7");
        assert_eq!(parsed.to_string(), VALID);
        // Surrounding whitespace (header folding) is tolerated.
        assert_eq!(TraceParent::parse(&format!(" {VALID} ")), Some(parsed));
    }

    #[test]
    fn malformed_headers_are_rejected() {
        for bad in [
            "",
            "garbage",
            // Upper-case hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero trace id, all-zero span id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is invalid; version 00 has no extra fields.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Wrong separators, a short id, non-hex, non-ASCII.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            // A later version must separate its extra fields with '-'.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?} should be rejected");
        }
    }

    #[test]
    fn a_later_version_with_extra_fields_is_accepted() {
        let header = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        let parsed = TraceParent::parse(header).expect("forward compatible");
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        // What we send on is always version 00.
        assert!(parsed.to_string().starts_with("00-"));
    }

    #[test]
    fn a_malformed_header_starts_a_new_trace_and_a_valid_one_is_continued() {
        let started = TraceParent::continue_or_start(Some("00-not-a-trace-01"));
        assert_ne!(started.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            TraceParent::parse(&started.to_string()),
            Some(started),
            "a new trace formats as a valid header"
        );
        assert!(started.to_string().ends_with("-01"));
        assert_ne!(
            TraceParent::continue_or_start(None).trace_id(),
            started.trace_id(),
            "every new trace has its own id"
        );

        let continued = TraceParent::continue_or_start(Some(VALID));
        assert_eq!(continued.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(continued.span_id(), "00f067aa0ba902b7", "a child span");
    }

    #[test]
    fn the_ids_round_trip_through_an_opentelemetry_span_context() {
        let parsed = TraceParent::parse(VALID).unwrap();
        let context = parsed.remote_span_context();
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(context.trace_id().to_string(), parsed.trace_id());
        assert_eq!(TraceParent::from_span_context(&context), Some(parsed));
        assert_eq!(TraceParent::from_span_context(&SpanContext::NONE), None);
    }

    #[test]
    fn a_child_keeps_the_trace_id_and_flags_with_a_new_span() {
        let root = TraceParent::new_root();
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_eq!(child.to_string().len(), 55);
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(unsampled.child().to_string().ends_with("-00"));
    }
}
