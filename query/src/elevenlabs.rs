//! `POST /v1/elevenlabs/conversation-init/{org}`: ElevenLabs' conversation-
//! initiation webhook. ElevenLabs calls it when a phone call comes in, with
//! `{caller_id, agent_id, called_number, call_sid}` and the `X-Elaaoms-Secret`
//! header the user configured, and waits for the agent's dynamic variables
//! before the agent speaks.
//!
//! Never break a call: the answer is always 200 with every variable of
//! [`DOCUMENTED_VARIABLES`] (empty, false or 0 when unknown) plus the
//! organization's defaults for the agent's own placeholders, within a hard
//! deadline (`ELEVENLABS_INIT_DEADLINE`, 300 ms). A slow or failing database,
//! a malformed body or an unknown caller all get the defaults. The one
//! exception is authentication: an unknown organization or a wrong secret
//! is a configuration error, not a call-time failure, and gets 401 so that
//! it shows up while the agent is being set up (ElevenLabs then starts the
//! call without our variables). When the database misses the deadline
//! before the secret could be checked, the answer is still 200 with the
//! documented defaults (and the organization's defaults only if the secret
//! matches the last successful lookup).
//!
//! Within the deadline, best effort, the call is recorded in `pending_calls`
//! (linked to the conversation when the transcript arrives, by `call_sid`)
//! with the hash of a fresh caller token, which is returned as
//! `secret__elaaoms_caller_token`: the server tool trusts that token, not
//! anything the LLM can fill in.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use elaaoms_shared::domain::{AgentId, CallerId};
use elaaoms_shared::http::ApiError;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::agent_auth::{authenticate, AgentAuthError, AgentOrganization};
use crate::context::{load_context, memory_line, CallerContext};
use crate::AppState;

/// The variables the webhook always sends, with their type when unknown.
/// Define the ones the agent's prompt uses in ElevenLabs (with these
/// names); ElevenLabs requires every variable the agent defines.
pub const DOCUMENTED_VARIABLES: &[(&str, &str)] = &[
    ("caller_memory_context", "string: the pre-call context text (at most 2,000 tokens), empty for a new caller"),
    ("caller_is_returning", "boolean: whether the organization knows the caller"),
    ("caller_name", "string: the caller's name if a memory states it, else empty"),
    ("caller_open_issues", "string: one line per open issue, empty when none"),
    ("caller_open_issue_count", "number"),
    ("caller_total_conversations", "number: earlier conversations with the organization"),
    ("caller_last_seen_at", "string: date of the last conversation (YYYY-MM-DD), else empty"),
    ("secret__elaaoms_caller_token", "string (secret, never shown to the LLM): binds the server tool to this call's caller; empty if none was issued"),
];

/// The documented variables for a caller nobody knows (or when anything
/// failed).
fn unknown_caller_variables() -> Map<String, Value> {
    let mut variables = Map::new();
    variables.insert("caller_memory_context".into(), json!(""));
    variables.insert("caller_is_returning".into(), json!(false));
    variables.insert("caller_name".into(), json!(""));
    variables.insert("caller_open_issues".into(), json!(""));
    variables.insert("caller_open_issue_count".into(), json!(0));
    variables.insert("caller_total_conversations".into(), json!(0));
    variables.insert("caller_last_seen_at".into(), json!(""));
    variables.insert("secret__elaaoms_caller_token".into(), json!(""));
    variables
}

fn context_variables(context: &CallerContext, token: Option<String>) -> Map<String, Value> {
    let mut variables = unknown_caller_variables();
    variables.insert("caller_memory_context".into(), json!(context.context_text));
    variables.insert(
        "caller_is_returning".into(),
        json!(context.caller_is_returning),
    );
    variables.insert(
        "caller_name".into(),
        json!(context.caller_name.clone().unwrap_or_default()),
    );
    let issues: Vec<String> = context.open_issues.iter().map(memory_line).collect();
    variables.insert("caller_open_issues".into(), json!(issues.join("\n")));
    variables.insert(
        "caller_open_issue_count".into(),
        json!(context.open_issues.len()),
    );
    if let Some(summary) = &context.summary {
        variables.insert(
            "caller_total_conversations".into(),
            json!(summary.total_conversations),
        );
        variables.insert(
            "caller_last_seen_at".into(),
            json!(summary.last_seen_at.format("%Y-%m-%d").to_string()),
        );
    }
    if let Some(token) = token {
        variables.insert("secret__elaaoms_caller_token".into(), json!(token));
    }
    variables
}

/// The organization's defaults under ours: only string, number and boolean
/// values, never a documented name, never a reserved `system__` one.
fn with_defaults(mut ours: Map<String, Value>, defaults: Option<&Map<String, Value>>) -> Value {
    if let Some(defaults) = defaults {
        for (name, value) in defaults {
            let scalar = value.is_string() || value.is_number() || value.is_boolean();
            if scalar && !name.starts_with("system__") && !ours.contains_key(name) {
                ours.insert(name.clone(), value.clone());
            }
        }
    }
    json!({ "type": "conversation_initiation_client_data", "dynamic_variables": ours })
}

/// The request as ElevenLabs sends it; every field optional here, because a
/// bad field must not break the call.
struct InitRequest {
    caller_id: Option<CallerId>,
    agent_id: Option<AgentId>,
    call_sid: Option<String>,
}

fn parse_request(body: &[u8]) -> InitRequest {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |field: &str| value.get(field).and_then(Value::as_str).map(str::to_owned);
    InitRequest {
        caller_id: text("caller_id").and_then(|id| CallerId::new(id).ok()),
        agent_id: text("agent_id").and_then(|id| AgentId::new(id).ok()),
        call_sid: text("call_sid")
            .map(|sid| sid.trim().to_owned())
            .filter(|sid| !sid.is_empty() && sid.len() <= 256),
    }
}

enum InitFailure {
    Unauthorized,
    /// Authenticated, but reading the context failed: defaults.
    Failed(AgentOrganization, String),
    /// Not even authenticated (the database failed).
    Unavailable(String),
}

/// ElevenLabs' request (every field optional: a bad one must not break the
/// call).
#[derive(utoipa::ToSchema)]
#[schema(as = ConversationInitRequest)]
#[allow(dead_code)]
pub(crate) struct InitRequestSchema {
    caller_id: Option<String>,
    agent_id: Option<String>,
    called_number: Option<String>,
    call_sid: Option<String>,
}

/// The answer ElevenLabs expects.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct InitAnswer {
    /// Always `conversation_initiation_client_data`.
    #[serde(rename = "type")]
    #[schema(
        example = "conversation_initiation_client_data",
        pattern = "^conversation_initiation_client_data$"
    )]
    kind: String,
    /// Every documented variable (`caller_memory_context`,
    /// `caller_is_returning`, `caller_name`, ...) plus the organization's
    /// defaults; string, number or boolean values only.
    dynamic_variables: std::collections::HashMap<String, crate::openapi::DynamicVariable>,
}

/// The conversation-initiation webhook: the caller's dynamic variables
/// before the agent speaks. Always 200 within the deadline (defaults on any
/// failure), except 401 for a wrong organization or secret.
#[utoipa::path(
    post,
    path = "/v1/elevenlabs/conversation-init/{org}",
    tag = "elevenlabs",
    params(("org" = String, Path, description = "The organization's slug")),
    request_body = InitRequestSchema,
    responses(
        (status = 200, description = "The dynamic variables", body = InitAnswer),
        (status = 401, description = "Unknown organization or wrong agent secret", body = crate::openapi::ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB", body = crate::openapi::ErrorBody),
    ),
    security(("agent_secret" = [])),
)]
pub(crate) async fn conversation_init(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let request = parse_request(&body);
    let outcome = tokio::time::timeout(
        state.init_deadline,
        answer(&state, &slug, &headers, &request),
    )
    .await;
    let (answer, result) = match outcome {
        Ok(Ok(answer)) => (answer, "ok"),
        Ok(Err(InitFailure::Unauthorized)) => {
            state
                .metrics
                .observe_init("unauthorized", started.elapsed());
            return ApiError::unauthorized("unknown organization or wrong agent secret")
                .into_response();
        }
        Ok(Err(InitFailure::Failed(organization, reason))) => {
            tracing::warn!(reason, "conversation init: answering with defaults");
            (
                with_defaults(unknown_caller_variables(), Some(&organization.defaults)),
                "error",
            )
        }
        Ok(Err(InitFailure::Unavailable(reason))) => {
            tracing::warn!(
                reason,
                "conversation init: cannot authenticate; answering with defaults"
            );
            (fallback(&state, &slug, &headers), "error")
        }
        Err(_elapsed) => {
            tracing::warn!(
                deadline_ms = state.init_deadline.as_millis() as u64,
                "conversation init: deadline passed; answering with defaults"
            );
            (fallback(&state, &slug, &headers), "timeout")
        }
    };
    state.metrics.observe_init(result, started.elapsed());
    (StatusCode::OK, Json(answer)).into_response()
}

fn fallback(state: &AppState, slug: &str, headers: &HeaderMap) -> Value {
    let cached = state.agent_auth.matching(slug, headers);
    with_defaults(
        unknown_caller_variables(),
        cached.as_ref().map(|org| &org.defaults),
    )
}

async fn answer(
    state: &AppState,
    slug: &str,
    headers: &HeaderMap,
    request: &InitRequest,
) -> Result<Value, InitFailure> {
    let organization = match authenticate(state, slug, headers).await {
        Ok(organization) => organization,
        Err(AgentAuthError::Unauthorized) => return Err(InitFailure::Unauthorized),
        Err(AgentAuthError::Database(err)) => {
            return Err(InitFailure::Unavailable(err.to_string()))
        }
    };
    let Some(caller_id) = &request.caller_id else {
        return Ok(with_defaults(
            unknown_caller_variables(),
            Some(&organization.defaults),
        ));
    };
    // Reading the context and recording the call are independent: run them
    // side by side on two connections, so the deadline covers one round trip.
    let (context, token) = tokio::join!(
        read_context(state, &organization, caller_id, request.agent_id.as_ref()),
        record_pending_call(state, &organization, caller_id, request),
    );
    let token = token.unwrap_or_else(|err| {
        tracing::warn!(error = %err, "conversation init: cannot record the pending call");
        None
    });
    match context {
        Ok(context) => Ok(with_defaults(
            context_variables(&context, token),
            Some(&organization.defaults),
        )),
        Err(err) => Err(InitFailure::Failed(organization, err.to_string())),
    }
}

async fn read_context(
    state: &AppState,
    organization: &AgentOrganization,
    caller_id: &CallerId,
    agent_id: Option<&AgentId>,
) -> Result<CallerContext, sqlx::Error> {
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id).await?;
    let context = load_context(
        &mut tx,
        &state.tokenizer,
        organization.id,
        caller_id,
        agent_id,
    )
    .await?;
    tx.commit().await?;
    Ok(context)
}

/// Records the call and returns the caller token it issued (none without a
/// call sid and an agent: there is nothing to bind it to).
async fn record_pending_call(
    state: &AppState,
    organization: &AgentOrganization,
    caller_id: &CallerId,
    request: &InitRequest,
) -> Result<Option<String>, sqlx::Error> {
    let (Some(call_sid), Some(agent_id)) = (&request.call_sid, &request.agent_id) else {
        return Ok(None);
    };
    let token = new_caller_token();
    let ttl =
        chrono::Duration::from_std(state.caller_token_ttl).unwrap_or(chrono::Duration::hours(6));
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id).await?;
    // A repeated request for the same call (a retry) issues a new token; the
    // older one stops working.
    sqlx::query(
        "INSERT INTO pending_calls (organization_id, call_sid, agent_id, caller_id,
                                    caller_token_hash, caller_token_expires_at)
         VALUES ($1, $2, $3, $4, $5, now() + $6)
         ON CONFLICT (organization_id, call_sid) DO UPDATE
            SET agent_id = EXCLUDED.agent_id, caller_id = EXCLUDED.caller_id,
                caller_token_hash = EXCLUDED.caller_token_hash,
                caller_token_expires_at = EXCLUDED.caller_token_expires_at,
                received_at = now()",
    )
    .bind(organization.id)
    .bind(call_sid)
    .bind(agent_id.as_str())
    .bind(caller_id.as_str())
    .bind(hash_caller_token(&token))
    .bind(ttl)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(token))
}

/// `ect_` + 64 hex characters (32 random bytes).
fn new_caller_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("ect_{}", hex::encode(bytes))
}

/// What `pending_calls.caller_token_hash` stores.
pub(crate) fn hash_caller_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_variable_is_present_with_a_scalar_value() {
        let variables = unknown_caller_variables();
        assert_eq!(variables.len(), DOCUMENTED_VARIABLES.len());
        for (name, _) in DOCUMENTED_VARIABLES {
            let value = &variables[*name];
            assert!(
                value.is_string() || value.is_number() || value.is_boolean(),
                "{name}"
            );
        }
    }

    #[test]
    fn organization_defaults_fill_in_but_never_override_or_nest() {
        let defaults = json!({
            "business_hours": "9-5", "discount": 10, "vip": false,
            "caller_name": "OVERRIDE", "system__caller_id": "+1", "nested": {"a": 1}, "list": [1]
        });
        let answer = with_defaults(unknown_caller_variables(), defaults.as_object());
        assert_eq!(answer["type"], "conversation_initiation_client_data");
        let variables = answer["dynamic_variables"].as_object().unwrap();
        assert_eq!(variables["business_hours"], "9-5");
        assert_eq!(variables["discount"], 10);
        assert_eq!(variables["vip"], false);
        assert_eq!(variables["caller_name"], "");
        for absent in ["system__caller_id", "nested", "list"] {
            assert!(!variables.contains_key(absent), "{absent}");
        }
    }

    #[test]
    fn requests_are_read_leniently() {
        let request = parse_request(
            br#"{"caller_id": "+14155550123", "agent_id": "agent_x", "called_number": "+1", "call_sid": "CA1"}"#,
        );
        assert_eq!(request.caller_id.unwrap().as_str(), "+14155550123");
        assert_eq!(request.call_sid.as_deref(), Some("CA1"));
        let garbage = parse_request(b"not json");
        assert!(
            garbage.caller_id.is_none() && garbage.agent_id.is_none() && garbage.call_sid.is_none()
        );
        let wrong_types = parse_request(br#"{"caller_id": 5, "call_sid": ""}"#);
        assert!(wrong_types.caller_id.is_none() && wrong_types.call_sid.is_none());
    }
}
