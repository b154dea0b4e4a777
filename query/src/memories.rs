//! `GET /v1/callers/{caller_id}/memories?agent_id=&limit=&types=`: a
//! caller's memories, newest first. With `agent_id`, only what that agent
//! may see (the sharing predicate); without, all of them. `types` is a
//! comma-separated list (or the parameter repeated). A caller the
//! organization does not know is a 404.

use std::sync::LazyLock;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use elaaoms_shared::domain::{AgentId, CallerId, MemoryType, ValidationError};
use elaaoms_shared::http::ApiError;
use elaaoms_shared::sharing::visible_to_agent_sql;
use serde::Serialize;

use crate::auth::Organization;
use crate::error::database_error;
use crate::memory::{MemoryView, MEMORY_COLUMNS};
use crate::AppState;

pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 500;

/// The listing statement. Parameters: `$1` organization id (uuid), `$2`
/// caller id (text), `$3` agent whose view applies (text, NULL for all),
/// `$4` memory types (text[], NULL for all), `$5` limit (bigint).
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
              ORDER BY m.created_at DESC, m.id
              LIMIT $5",
            visible = visible_to_agent_sql("$3"),
        )
    });
    &SQL
}

const CALLER_EXISTS_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM callers WHERE organization_id = $1 AND caller_id = $2)";

#[derive(Debug, Clone, PartialEq)]
struct ListParams {
    agent_id: Option<AgentId>,
    limit: i64,
    types: Option<Vec<MemoryType>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ListResponse {
    caller_id: String,
    /// Newest first.
    memories: Vec<MemoryView>,
}

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
    let memories: Vec<MemoryView> = sqlx::query_as(list_sql())
        .bind(organization.id)
        .bind(caller_id.as_str())
        .bind(params.agent_id.as_ref().map(AgentId::as_str))
        .bind(types)
        .bind(params.limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(|err| database_error("listing memories", err))?;
    tx.commit()
        .await
        .map_err(|err| database_error("closing a listing transaction", err))?;
    Ok(Json(ListResponse {
        caller_id: caller_id.into(),
        memories,
    }))
}

fn parse_list_params(pairs: Vec<(String, String)>) -> Result<ListParams, ApiError> {
    let mut params = ListParams {
        agent_id: None,
        limit: DEFAULT_LIST_LIMIT,
        types: None,
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
                    format!("{unknown}: unknown parameter; accepted parameters are agent_id, limit, types"),
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
                types: None
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
    fn invalid_parameters_are_named() {
        for (items, field) in [
            (pairs(&[("limit", "0")]), "limit"),
            (pairs(&[("limit", "501")]), "limit"),
            (pairs(&[("limit", "ten")]), "limit"),
            (pairs(&[("types", "gossip")]), "types"),
            (pairs(&[("agent_id", " ")]), "agent_id"),
            (pairs(&[("offset", "3")]), "offset"),
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
