//! `POST /v1/elevenlabs/tools/search/{org}`: the ElevenLabs server tool the
//! agent calls mid-call to search the caller's memories.
//!
//! The body is `{"query": "...", "caller_id"?: "...", "agent_id"?: "..."}`:
//! only `query` is filled by the LLM. Who the caller is never comes from the
//! LLM:
//!
//! 1. preferred: the `X-Elaaoms-Caller-Token` header, whose value is the
//!    `secret__elaaoms_caller_token` dynamic variable the initiation webhook
//!    issued (ElevenLabs sends `secret__` variables in headers and never
//!    shows them to the LLM). The token names the call's caller and agent;
//!    a body `caller_id` or `agent_id` is then ignored. A token that is
//!    unknown or expired binds nobody: no fallback to the body.
//! 2. otherwise, unless the organization sets `tool_requires_caller_token`:
//!    the body's `caller_id`, which the tool definition binds to the
//!    `system__caller_id` dynamic variable (and `agent_id` to
//!    `system__agent_id`), so the LLM cannot fill them either.
//!
//! Caller id is not authentication: a phone number can be spoofed. An
//! organization that must not read memories to an unverified caller sets
//! `tool_requires_caller_token` and verifies callers before the call.
//!
//! The answer is for an LLM to read: `result` is a short numbered text, and
//! `memories` has the same facts structured. "Nothing found" and "caller
//! not identified" are 200 answers the agent can say something sensible to.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::{DateTime, Utc};
use elaaoms_shared::domain::{AgentId, CallerId, QueryText, ValidationError};
use elaaoms_shared::http::ApiError;
use serde::Serialize;
use serde_json::Value;

use crate::agent_auth::{authenticate, AgentAuthError};
use crate::elevenlabs::hash_caller_token;
use crate::error::database_error;
use crate::memory::MemoryView;
use crate::search::search_sql;
use crate::AppState;

/// The header that carries `secret__elaaoms_caller_token`.
pub const CALLER_TOKEN_HEADER: &str = "x-elaaoms-caller-token";
/// Mid-call questions are short and loosely worded: a lower bar than the
/// search API's default 0.7, and few results to keep the answer short.
const TOOL_RELEVANCE_THRESHOLD: f64 = 0.3;
const TOOL_RESULT_LIMIT: i64 = 5;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ToolMemory {
    pub content: String,
    #[serde(rename = "type")]
    #[schema(value_type = crate::openapi::MemoryTypeName)]
    pub memory_type: String,
    pub importance: i16,
    pub created_at: DateTime<Utc>,
    pub score: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ToolAnswer {
    /// For the LLM to read.
    pub result: String,
    /// Whether a caller could be identified.
    pub caller_identified: bool,
    /// `caller_token`, `system__caller_id`, or `null`.
    pub bound_by: Option<&'static str>,
    pub memories: Vec<ToolMemory>,
}

#[derive(sqlx::FromRow)]
struct Scored {
    #[sqlx(flatten)]
    memory: MemoryView,
    score: f64,
}

#[derive(Debug)]
struct ToolRequest {
    query: QueryText,
    caller_id: Option<CallerId>,
    agent_id: Option<AgentId>,
}

fn parse(body: &[u8]) -> Result<ToolRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("request body is not valid JSON: {err}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    let text = |field: &'static str| -> Result<Option<String>, ValidationError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(ValidationError::new(field, "must be a string")),
        }
    };
    let query = text("query")?.ok_or_else(|| ValidationError::new("query", "is required"))?;
    let query = QueryText::new(query)
        .map_err(|_| ValidationError::new("query", "must be 1 to 1000 characters"))?;
    Ok(ToolRequest {
        query,
        caller_id: text("caller_id")?.map(CallerId::new).transpose()?,
        agent_id: text("agent_id")?.map(AgentId::new).transpose()?,
    })
}

const TOKEN_SQL: &str = "SELECT caller_id, agent_id FROM pending_calls
     WHERE organization_id = $1 AND caller_token_hash = $2 AND caller_token_expires_at > now()";

const REQUIRES_TOKEN_SQL: &str =
    "SELECT tool_requires_caller_token FROM organizations WHERE id = $1";

/// The server tool's request: only `query` is for the LLM; bind
/// `caller_id` to `system__caller_id` and `agent_id` to `system__agent_id`.
#[derive(utoipa::ToSchema)]
#[schema(as = ToolRequest)]
#[allow(dead_code)]
pub(crate) struct ToolRequestSchema {
    #[schema(min_length = 1, max_length = 1000, example = "allergies")]
    query: String,
    #[schema(min_length = 1, max_length = 256)]
    caller_id: Option<String>,
    #[schema(min_length = 1, max_length = 256)]
    agent_id: Option<String>,
}

/// The ElevenLabs server tool: the agent searches the caller's memories
/// mid-call. The caller comes from the caller token (preferred) or
/// `system__caller_id`, never from the LLM.
#[utoipa::path(
    post,
    path = "/v1/elevenlabs/tools/search/{org}",
    tag = "elevenlabs",
    params(
        ("org" = String, Path, description = "The organization's slug"),
        ("X-Elaaoms-Caller-Token" = Option<String>, Header, description = "`{{secret__elaaoms_caller_token}}` from the initiation webhook"),
    ),
    request_body = ToolRequestSchema,
    responses((status = 200, description = "An answer for the LLM to read (also when nothing is found or the caller is not identified)", body = ToolAnswer)),
    security(("agent_secret" = [])),
)]
pub(crate) async fn search_tool(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ToolAnswer>, ApiError> {
    let organization = match authenticate(&state, &slug, &headers).await {
        Ok(organization) => organization,
        Err(AgentAuthError::Unauthorized) => {
            return Err(ApiError::unauthorized(
                "unknown organization or wrong agent secret",
            ))
        }
        Err(AgentAuthError::Database(err)) => {
            return Err(database_error("authenticating a tool call", err))
        }
    };
    let request = parse(&body)?;
    let token = headers
        .get(CALLER_TOKEN_HEADER)
        .map(|value| value.to_str().unwrap_or_default().trim().to_owned());

    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id)
        .await
        .map_err(|err| database_error("opening a tool transaction", err))?;
    let binding: Option<(String, Option<String>, &'static str)> = match token {
        Some(token) => {
            let bound: Option<(String, String)> = if token.is_empty() || token.len() > 256 {
                None
            } else {
                sqlx::query_as(TOKEN_SQL)
                    .bind(organization.id)
                    .bind(hash_caller_token(&token))
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|err| database_error("looking up a caller token", err))?
            };
            bound.map(|(caller, agent)| (caller, Some(agent), "caller_token"))
        }
        None => {
            let requires_token: bool = sqlx::query_scalar(REQUIRES_TOKEN_SQL)
                .bind(organization.id)
                .fetch_one(&mut *tx)
                .await
                .map_err(|err| database_error("reading the tool policy", err))?;
            if requires_token {
                None
            } else {
                let caller = request.caller_id.clone().ok_or_else(|| {
                    ValidationError::new(
                        "caller_id",
                        "is required without a caller token; bind it to system__caller_id",
                    )
                })?;
                Some((
                    caller.into(),
                    request.agent_id.as_ref().map(|a| a.as_str().to_owned()),
                    "system__caller_id",
                ))
            }
        }
    };
    let Some((caller_id, agent_id, bound_by)) = binding else {
        tx.commit()
            .await
            .map_err(|err| database_error("closing a tool transaction", err))?;
        return Ok(Json(ToolAnswer {
            result: "The caller could not be identified, so no memories can be shared. \
                     Ask the caller how you can help instead."
                .to_owned(),
            caller_identified: false,
            bound_by: None,
            memories: Vec::new(),
        }));
    };

    let (embedding, _cached) = state
        .embeddings
        .embed(request.query.as_str())
        .await
        .map_err(|err| ApiError::internal("embedding a tool query", &err))?;
    let found: Vec<Scored> = sqlx::query_as(search_sql())
        .bind(organization.id)
        .bind(&caller_id)
        .bind(pgvector::Vector::from(embedding.as_ref().clone()))
        .bind(agent_id.as_deref())
        .bind(None::<Vec<String>>)
        .bind(None::<i16>)
        .bind(TOOL_RELEVANCE_THRESHOLD)
        .bind(TOOL_RESULT_LIMIT)
        .fetch_all(&mut *tx)
        .await
        .map_err(|err| database_error("searching memories for a tool call", err))?;
    tx.commit()
        .await
        .map_err(|err| database_error("closing a tool transaction", err))?;

    let memories: Vec<ToolMemory> = found
        .into_iter()
        .map(|scored| ToolMemory {
            content: scored.memory.content,
            memory_type: scored.memory.memory_type,
            importance: scored.memory.importance,
            created_at: scored.memory.created_at,
            score: scored.score.min(1.0),
        })
        .collect();
    Ok(Json(ToolAnswer {
        result: render(&memories),
        caller_identified: true,
        bound_by: Some(bound_by),
        memories,
    }))
}

fn render(memories: &[ToolMemory]) -> String {
    if memories.is_empty() {
        return "Nothing remembered about this caller matches the question.".to_owned();
    }
    let mut text = format!(
        "{} thing{} remembered about this caller, most relevant first:",
        memories.len(),
        if memories.len() == 1 { "" } else { "s" }
    );
    for (n, memory) in memories.iter().enumerate() {
        let content = memory
            .content
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        text.push_str(&format!(
            "\n{}. {content} ({}, importance {}, noted {})",
            n + 1,
            memory.memory_type,
            memory.importance,
            memory.created_at.format("%Y-%m-%d")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn only_query_is_required_and_fields_are_named() {
        let request = parse(br#"{"query": "allergies"}"#).unwrap();
        assert!(request.caller_id.is_none());
        for (body, field) in [
            (&br#"{}"#[..], "query"),
            (br#"{"query": ""}"#, "query"),
            (br#"{"query": 5}"#, "query"),
            (br#"{"query": "q", "caller_id": 5}"#, "caller_id"),
            (br#"{"query": "q", "caller_id": " "}"#, "caller_id"),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(
                err.message.starts_with(&format!("{field}: ")),
                "{}",
                err.message
            );
        }
        assert_eq!(parse(b"[]").unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn answers_read_as_a_numbered_list() {
        let memories = [ToolMemory {
            content: "Daughter Zuri has a\nsevere tree nut allergy".into(),
            memory_type: "factual".into(),
            importance: 10,
            created_at: "2025-11-03T10:00:00Z".parse().unwrap(),
            score: 0.6,
        }];
        assert_eq!(
            render(&memories),
            "1 thing remembered about this caller, most relevant first:\n\
             1. Daughter Zuri has a severe tree nut allergy (factual, importance 10, noted 2025-11-03)"
        );
        assert!(render(&[]).starts_with("Nothing remembered"));
    }
}
