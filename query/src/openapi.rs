//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the code.
//!
//! Each handler carries its `#[utoipa::path]` and is registered with
//! `utoipa_axum::routes!`, so a route cannot be served without being
//! documented (see `router` in lib.rs). What is common to every route is
//! added here once: the two security schemes, the error shape
//! `{"error": {"code", "message"}}` and the error statuses each kind of
//! route can answer (see [`add_error_responses`]). The health routes come
//! from the shared crate and are described by the `doc_*` functions below.
//!
//! The handlers parse their requests by hand (so that every validation
//! error names its field); the request schemas here are the documented
//! shape of what they accept.

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as OpenApiDoc, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::agent_auth::AGENT_SECRET_HEADER;

/// The name of the API-key security scheme (`Authorization: Bearer`).
pub const BEARER_SCHEME: &str = "bearer";
/// The name of the agent-secret security scheme (the ElevenLabs endpoints).
pub const AGENT_SECRET_SCHEME: &str = "agent_secret";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ELAAOMS query API",
        description = "Search, pre-call context and memory management for ElevenLabs agents. \
            Tenant routes take an organization API key (`Authorization: Bearer elk_...`); the \
            ElevenLabs endpoints take the organization's agent secret in `X-Elaaoms-Secret`. \
            Every error is `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(doc_healthz, doc_readyz, doc_metrics, doc_openapi),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "search", description = "Semantic search over a caller's memories"),
        (name = "memories", description = "Listing, reading and deleting memories; erasure"),
        (name = "elevenlabs", description = "Endpoints ElevenLabs calls during a phone call"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
pub(crate) struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("elk_<64 hex>")
                    .description(Some(
                        "An organization API key (`elaaoms apikey create`); every query is scoped to its organization",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            AGENT_SECRET_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                // Header names are case-insensitive; this is how the README spells it.
                "X-Elaaoms-Secret",
                "The organization's agent secret (`elaaoms org agent-secret`), configured in ElevenLabs as a request header",
            ))),
        );
        debug_assert!(AGENT_SECRET_HEADER.eq_ignore_ascii_case("X-Elaaoms-Secret"));
    }
}

/// Every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`,
    /// `not_found`, `payload_too_large`, `invalid_field`, `internal`,
    /// `unavailable`.
    #[schema(example = "invalid_field")]
    pub code: String,
    /// For people; a validation error starts with the field's name and a colon.
    #[schema(example = "result_limit: must be between 1 and 100")]
    pub message: String,
}

/// The error statuses a route can answer besides those its own annotation
/// lists, by kind of route:
///
/// * every `/v1` route: 400 (unparsable query string or body), 422 (a
///   field or parameter the rules refuse, named in the message), 500 and
///   503 (a dependency is down);
/// * with a request body: 413 past the body limit;
/// * with a security requirement: 401.
///
/// The conversation-initiation webhook answers 200 with defaults whatever
/// fails (never break a call) and only 401 or 413 otherwise: its operation
/// lists them itself and is skipped here.
pub(crate) fn add_error_responses(openapi: &mut OpenApiDoc) {
    const NEVER_FAILS: &str = "conversation_init";
    for (path, item) in openapi.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            if operation.operation_id.as_deref() == Some(NEVER_FAILS) {
                continue;
            }
            let mut statuses = vec![
                ("400", "The query string or body cannot be parsed"),
                (
                    "422",
                    "A field or parameter is invalid; the message starts with its name",
                ),
                ("500", "Internal error (details only in the service's log)"),
                (
                    "503",
                    "A dependency (Postgres, NATS) is unavailable; retry later",
                ),
            ];
            if operation.request_body.is_some() {
                statuses.push(("413", "The body is larger than 64 KiB"));
            }
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                statuses.push(("401", "Missing, unknown or revoked credentials"));
            }
            for (status, description) in statuses {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| RefOr::T(error_response(description)));
            }
        }
    }
}

/// A response whose body is [`ErrorBody`].
pub(crate) fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                ))))
                .build(),
        )
        .build()
}

/// `/healthz`'s answer.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
struct Liveness {
    #[schema(example = "ok")]
    status: String,
    #[schema(example = "query")]
    service: String,
}

/// `/readyz`'s answer; `failing` lists what is down when it is 503.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
struct Readiness {
    /// `ready` or `unavailable`.
    status: String,
    failing: Option<Vec<String>>,
}

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Liveness)))]
#[allow(dead_code)]
fn doc_healthz() {}

/// The process and its database answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency is down", body = Readiness),
    ))]
#[allow(dead_code)]
fn doc_readyz() {}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String)))]
#[allow(dead_code)]
fn doc_metrics() {}

/// This document (OpenAPI 3.1), unauthenticated.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
#[allow(dead_code)]
fn doc_openapi() {}

/// Serves the document built once at start-up.
pub(crate) async fn serve(
    axum::extract::State(document): axum::extract::State<axum::body::Bytes>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document,
    )
}

/// The memory types.
#[derive(Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum MemoryTypeName {
    Factual,
    Preference,
    Issue,
    Emotion,
    Relationship,
}

/// A dynamic variable's value: ElevenLabs accepts only these.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum DynamicVariable {
    Text(String),
    Number(f64),
    Flag(bool),
}
