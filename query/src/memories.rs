//! `GET /v1/callers/{caller_id}/memories`: a caller's memories, newest
//! first, a page at a time.
//!
//! * `limit` (default 50, at most 500);
//! * `agent_id`: only what that agent may see (the sharing predicate);
//!   without it, all of them;
//! * `types`: a comma-separated list (or the parameter repeated);
//! * `min_importance`: 1 to 10;
//! * `cursor`: the `next_cursor` of the previous page.
//!
//! Keyset pagination: the order is `(created_at, id)` descending and the
//! cursor is the last row's pair, so a page starts exactly after the
//! previous one whatever is inserted meanwhile (no duplicates, no gaps, no
//! OFFSET scan). The cursor is opaque to clients: URL-safe base64 (no
//! padding) of `<created_at in microseconds since 1970>.<memory uuid>`.
//! A caller the organization does not know is a 404.

use std::sync::LazyLock;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use elaaoms_shared::domain::{AgentId, CallerId, Importance, MemoryType, ValidationError};
use elaaoms_shared::http::ApiError;
use elaaoms_shared::sharing::visible_to_agent_sql;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Organization;
use crate::error::database_error;
use crate::memory::{MemoryView, MEMORY_COLUMNS};
use crate::AppState;

pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 500;

/// The listing statement. Parameters: `$1` organization id (uuid), `$2`
/// caller id (text), `$3` agent whose view applies (text, NULL for all),
/// `$4` memory types (text[], NULL for all), `$5` minimum importance
/// (smallint, NULL for any), `$6` and `$7` the cursor's `created_at`
/// (timestamptz) and id (uuid), both NULL for the first page, `$8` limit
/// (bigint). The row comparison follows the `ORDER BY`, and
/// `memories_caller_newest` serves both.
pub fn list_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {MEMORY_COLUMNS}
               FROM memories m
               JOIN organizations o ON o.id = m.organization_id
              WHERE m.organization_id = $1
                AND m.caller_id = $2
                AND ($3::text IS NULL OR {visible})
                AND ($4::text[] IS NULL OR m.type = ANY($4))
                AND ($5::smallint IS NULL OR m.importance >= $5)
                AND ($6::timestamptz IS NULL OR (m.created_at, m.id) < ($6, $7::uuid))
              ORDER BY m.created_at DESC, m.id DESC
              LIMIT $8",
            visible = visible_to_agent_sql("$3"),
        )
    });
    &SQL
}

const CALLER_EXISTS_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM callers WHERE organization_id = $1 AND caller_id = $2)";

/// A position in the listing: the last row of a page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cursor {
    created_at: DateTime<Utc>,
    id: Uuid,
}

impl Cursor {
    fn of(memory: &MemoryView) -> Self {
        Self {
            created_at: memory.created_at,
            id: memory.memory_id,
        }
    }

    /// Postgres keeps microseconds, so they round-trip exactly.
    pub(crate) fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.id
        ))
    }

    pub(crate) fn decode(raw: &str) -> Result<Self, ValidationError> {
        let invalid = || ValidationError::new("cursor", "is not a cursor this listing returned");
        let bytes = URL_SAFE_NO_PAD.decode(raw.trim()).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let (micros, id) = text.split_once('.').ok_or_else(invalid)?;
        let micros: i64 = micros.parse().map_err(|_| invalid())?;
        Ok(Self {
            created_at: DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?,
            id: Uuid::parse_str(id).map_err(|_| invalid())?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ListParams {
    agent_id: Option<AgentId>,
    limit: i64,
    types: Option<Vec<MemoryType>>,
    min_importance: Option<Importance>,
    cursor: Option<Cursor>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ListResponse {
    caller_id: String,
    /// Newest first.
    memories: Vec<MemoryView>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// The query parameters, for the OpenAPI document (the handler parses them
/// itself so that every error names its parameter).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct ListQuery {
    /// Page size.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// Only what this agent may see (its own memories and what the
    /// organization's sharing policy makes visible).
    #[param(min_length = 1, max_length = 256)]
    agent_id: Option<String>,
    /// Comma-separated memory types: factual, preference, issue, emotion,
    /// relationship.
    #[param(
        pattern = "^(factual|preference|issue|emotion|relationship)(,(factual|preference|issue|emotion|relationship))*$"
    )]
    types: Option<String>,
    /// Only memories at least this important.
    #[param(minimum = 1, maximum = 10)]
    min_importance: Option<i64>,
    /// The previous page's `next_cursor` (opaque).
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
}

/// A caller's memories, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/callers/{caller_id}/memories",
    tag = "memories",
    params(
        ("caller_id" = String, Path, description = "The caller's phone number or id"),
        ListQuery,
    ),
    responses(
        (status = 200, description = "One page of memories", body = ListResponse),
        (status = 404, description = "The organization does not know this caller", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    organization: Organization,
    Path(caller_id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let caller_id = CallerId::new(caller_id)?;
    let Query(pairs) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let params = parse_list_params(pairs)?;
    let types: Option<Vec<&str>> = params
        .types
        .as_ref()
        .map(|types| types.iter().map(|t| t.as_str()).collect());

    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id)
        .await
        .map_err(|err| database_error("opening a listing transaction", err))?;
    let known: bool = sqlx::query_scalar(CALLER_EXISTS_SQL)
        .bind(organization.id)
        .bind(caller_id.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|err| database_error("looking up a caller", err))?;
    if !known {
        return Err(ApiError::not_found("caller not found"));
    }
    // One row more than the page tells whether another page follows.
    let mut memories: Vec<MemoryView> = sqlx::query_as(list_sql())
        .bind(organization.id)
        .bind(caller_id.as_str())
        .bind(params.agent_id.as_ref().map(AgentId::as_str))
        .bind(types)
        .bind(params.min_importance.map(i16::from))
        .bind(params.cursor.map(|cursor| cursor.created_at))
        .bind(params.cursor.map(|cursor| cursor.id))
        .bind(params.limit + 1)
        .fetch_all(&mut *tx)
        .await
        .map_err(|err| database_error("listing memories", err))?;
    tx.commit()
        .await
        .map_err(|err| database_error("closing a listing transaction", err))?;
    let more = memories.len() as i64 > params.limit;
    memories.truncate(params.limit as usize);
    let next_cursor = more
        .then(|| memories.last().map(|last| Cursor::of(last).encode()))
        .flatten();
    Ok(Json(ListResponse {
        caller_id: caller_id.into(),
        memories,
        next_cursor,
    }))
}

fn parse_list_params(pairs: Vec<(String, String)>) -> Result<ListParams, ApiError> {
    let mut params = ListParams {
        agent_id: None,
        limit: DEFAULT_LIST_LIMIT,
        types: None,
        min_importance: None,
        cursor: None,
    };
    for (name, value) in pairs {
        match name.as_str() {
            "agent_id" => params.agent_id = Some(AgentId::new(value)?),
            "limit" => {
                params.limit = value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|limit| (1..=MAX_LIST_LIMIT).contains(limit))
                    .ok_or_else(|| {
                        ValidationError::new(
                            "limit",
                            format!("must be an integer between 1 and {MAX_LIST_LIMIT}"),
                        )
                    })?;
            }
            "min_importance" => {
                let invalid = || {
                    ValidationError::new("min_importance", "must be an integer between 1 and 10")
                };
                let value = value.trim().parse::<i64>().map_err(|_| invalid())?;
                params.min_importance = Some(Importance::new(value).map_err(|_| invalid())?);
            }
            "cursor" => params.cursor = Some(Cursor::decode(&value)?),
            "types" => {
                let types = params.types.get_or_insert_with(Vec::new);
                for name in value
                    .split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                {
                    let memory_type = MemoryType::parse(name).map_err(|_| {
                        ValidationError::new(
                            "types",
                            "must list factual, preference, issue, emotion or relationship, separated by commas",
                        )
                    })?;
                    if !types.contains(&memory_type) {
                        types.push(memory_type);
                    }
                }
            }
            unknown => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    format!("{unknown}: unknown parameter; accepted parameters are agent_id, limit, types, min_importance, cursor"),
                ));
            }
        }
    }
    // `types=` with nothing in it filters nothing.
    if params.types.as_ref().is_some_and(Vec::is_empty) {
        params.types = None;
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(
            parse_list_params(vec![]).unwrap(),
            ListParams {
                agent_id: None,
                limit: DEFAULT_LIST_LIMIT,
                types: None,
                min_importance: None,
                cursor: None,
            }
        );
        let params = parse_list_params(pairs(&[
            ("agent_id", "agent_x"),
            ("limit", "500"),
            ("types", "factual, issue"),
            ("types", "preference,factual"),
        ]))
        .unwrap();
        assert_eq!(params.agent_id.unwrap().as_str(), "agent_x");
        assert_eq!(params.limit, 500);
        assert_eq!(
            params.types.unwrap(),
            vec![
                MemoryType::Factual,
                MemoryType::Issue,
                MemoryType::Preference
            ]
        );
    }

    #[test]
    fn cursors_round_trip_exactly() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        let encoded = cursor.encode();
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{encoded}"
        );
        assert_eq!(Cursor::decode(&encoded).unwrap(), cursor);
        let params =
            parse_list_params(pairs(&[("cursor", &encoded), ("min_importance", "7")])).unwrap();
        assert_eq!(params.cursor, Some(cursor));
        assert_eq!(params.min_importance.map(Importance::get), Some(7));
    }

    #[test]
    fn invalid_parameters_are_named() {
        for (items, field) in [
            (pairs(&[("limit", "0")]), "limit"),
            (pairs(&[("limit", "501")]), "limit"),
            (pairs(&[("limit", "ten")]), "limit"),
            (pairs(&[("types", "gossip")]), "types"),
            (pairs(&[("agent_id", " ")]), "agent_id"),
            (pairs(&[("offset", "3")]), "offset"),
            (pairs(&[("min_importance", "0")]), "min_importance"),
            (pairs(&[("min_importance", "high")]), "min_importance"),
            (pairs(&[("cursor", "not a cursor")]), "cursor"),
            (
                pairs(&[("cursor", &URL_SAFE_NO_PAD.encode("12.nope"))]),
                "cursor",
            ),
            (
                pairs(&[(
                    "cursor",
                    &URL_SAFE_NO_PAD.encode("x.00000000-0000-0000-0000-000000000000"),
                )]),
                "cursor",
            ),
        ] {
            let err = parse_list_params(items).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(
                err.message.starts_with(&format!("{field}: ")),
                "{}",
                err.message
            );
        }
    }
}
