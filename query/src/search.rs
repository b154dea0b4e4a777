//! `POST /v1/search`: the seed's Memory Search Query.
//!
//! The query text is embedded (all-MiniLM-L6-v2, L2-normalised), then one
//! statement scans the caller's rows exactly (DESIGN.md section 3): for unit
//! vectors the negative inner product `-(a <#> b)` is the cosine similarity,
//! which is the score and what the threshold bounds. The ordering is written
//! `(m.embedding <#> $3) + 0` so that no vector index can serve it: an HNSW
//! scan filtered by caller afterwards would return too few rows.

use std::sync::LazyLock;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::Json;
use elaaoms_shared::domain::{
    AgentId, CallerId, ConversationId, Importance, MemoryType, QueryText, RelevanceThreshold,
    ResultLimit, ValidationError,
};
use elaaoms_shared::http::ApiError;
use elaaoms_shared::sharing::visible_to_agent_sql;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::Organization;
use crate::error::database_error;
use crate::memory::{MemoryView, MEMORY_COLUMNS};
use crate::AppState;

/// The search statement. Parameters: `$1` organization id (uuid), `$2`
/// caller id (text), `$3` query embedding (vector), `$4` agent whose view
/// applies (text, NULL for all the caller's memories), `$5` memory types
/// (text[], NULL for all), `$6` minimum importance (smallint, NULL for
/// any), `$7` relevance threshold (float8), `$8` result limit (bigint).
///
/// `ranked` reads only columns of the `memories_caller_search` index, so
/// ranking all of a caller's rows is an index-only scan of adjacent index
/// pages rather than one heap page per memory; only the few rows that make
/// the limit are then read from the table (by primary key).
pub fn search_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH ranked AS (
                SELECT m.id, -(m.embedding <#> $3) AS score, m.created_at
                  FROM memories m
                  JOIN organizations o ON o.id = m.organization_id
                 WHERE m.organization_id = $1
                   AND m.caller_id = $2
                   AND ($4::text IS NULL OR {visible})
                   AND ($5::text[] IS NULL OR m.type = ANY($5))
                   AND ($6::smallint IS NULL OR m.importance >= $6)
                   AND -(m.embedding <#> $3) >= $7::float8
                 ORDER BY (m.embedding <#> $3) + 0, m.created_at DESC, m.id
                 LIMIT $8)
             SELECT {MEMORY_COLUMNS}, r.score
               FROM ranked r
               JOIN memories m ON m.organization_id = $1 AND m.id = r.id
              ORDER BY r.score DESC, r.created_at DESC, r.id",
            visible = visible_to_agent_sql("$4"),
        )
    });
    &SQL
}

/// A validated search request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SearchRequest {
    pub query_text: QueryText,
    pub caller_id: CallerId,
    pub agent_id: Option<AgentId>,
    pub search_all_agents: bool,
    pub relevance_threshold: RelevanceThreshold,
    pub result_limit: ResultLimit,
    pub types: Option<Vec<MemoryType>>,
    pub min_importance: Option<Importance>,
}

impl SearchRequest {
    /// The agent whose view of the caller applies, if any: only when an
    /// agent is named and the search is not across all agents.
    fn viewing_agent(&self) -> Option<&AgentId> {
        self.agent_id.as_ref().filter(|_| !self.search_all_agents)
    }
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct SearchResult {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub memory: MemoryView,
    /// Cosine similarity to the query, the relevance threshold's scale.
    pub score: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SearchResponse {
    /// Best first.
    pub results: Vec<SearchResult>,
    pub query_time_ms: f64,
}

/// The documented shape of the request body (the handler validates it by
/// hand, see [`parse_search_request`]).
pub(crate) mod schema {
    use chrono::{DateTime, Utc};

    use crate::openapi::MemoryTypeName;

    /// The seed's Memory Search Query. `null` counts as absent; any other
    /// field is refused with a 422 naming it.
    #[derive(serde::Deserialize, utoipa::ToSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    pub(crate) struct SearchRequest {
        /// What to look for, in plain words.
        #[schema(
            min_length = 1,
            max_length = 1000,
            example = "Does the caller have allergies?"
        )]
        pub query_text: String,
        /// The caller whose memories are searched (usually a phone number).
        #[schema(min_length = 1, max_length = 256, example = "+14155550123")]
        pub caller_id: String,
        /// The agent asking: without `search_all_agents`, only its own
        /// memories and what the sharing policy makes visible.
        #[schema(min_length = 1, max_length = 256)]
        pub agent_id: Option<String>,
        /// Search every agent's memories of the caller.
        #[schema(default = false)]
        pub search_all_agents: Option<bool>,
        /// Minimum cosine similarity of a result.
        #[schema(minimum = 0.0, maximum = 1.0, default = 0.7)]
        pub relevance_threshold: Option<f64>,
        /// Maximum number of results.
        #[schema(minimum = 1, maximum = 100, default = 5)]
        pub result_limit: Option<i64>,
        /// Only these memory types.
        #[schema(min_items = 1)]
        pub types: Option<Vec<MemoryTypeName>>,
        /// Only memories at least this important.
        #[schema(minimum = 1, maximum = 10)]
        pub min_importance: Option<i64>,
        /// The current conversation (validated, does not change results).
        #[schema(min_length = 1, max_length = 256)]
        pub conversation_id: Option<String>,
        /// When the query was made (accepted, does not change results).
        pub timestamp: Option<DateTime<Utc>>,
    }
}

/// Semantic search over one caller's memories, ranked by cosine similarity.
#[utoipa::path(
    post,
    path = "/v1/search",
    tag = "search",
    request_body = schema::SearchRequest,
    responses((status = 200, description = "Results, best first", body = SearchResponse)),
    security(("bearer" = [])),
)]
pub(crate) async fn search(
    State(state): State<AppState>,
    organization: Organization,
    SearchBody(request): SearchBody,
) -> Result<Json<SearchResponse>, ApiError> {
    let started = Instant::now();
    // The transaction opens (a round trip to Postgres) while the query is
    // embedded (milliseconds of CPU on the blocking pool), not after.
    let embedded = async {
        let embedding = state.embeddings.embed(request.query_text.as_str()).await;
        state.metrics.observe_stage("embed", started.elapsed());
        embedding
    };
    let opened = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id);
    let (embedded, opened) = tokio::join!(embedded, opened);
    let (embedding, _cached) =
        embedded.map_err(|err| ApiError::internal("embedding a search query", &err))?;
    let mut tx = opened.map_err(|err| database_error("opening a search transaction", err))?;

    let queried = Instant::now();
    let types: Option<Vec<&str>> = request
        .types
        .as_ref()
        .map(|types| types.iter().map(|t| t.as_str()).collect());
    let mut results: Vec<SearchResult> = sqlx::query_as(search_sql())
        .bind(organization.id)
        .bind(request.caller_id.as_str())
        .bind(pgvector::Vector::from(embedding.as_ref().clone()))
        .bind(request.viewing_agent().map(AgentId::as_str))
        .bind(types)
        .bind(request.min_importance.map(i16::from))
        .bind(request.relevance_threshold.get())
        .bind(i64::from(request.result_limit.get()))
        .fetch_all(&mut *tx)
        .await
        .map_err(|err| database_error("searching memories", err))?;
    elaaoms_shared::db::end_read_only(tx);
    state.metrics.observe_stage("database", queried.elapsed());

    // Rounding can put a unit vector's similarity with itself a hair above 1.
    for result in &mut results {
        result.score = result.score.min(1.0);
    }
    Ok(Json(SearchResponse {
        results,
        query_time_ms: started.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// The request body, parsed and validated: 400 for a body that is not a
/// JSON object, 413 past [`crate::MAX_BODY_BYTES`], 422 naming the field
/// for anything the seed's rules refuse. Always in the JSON error shape.
pub(crate) struct SearchBody(pub SearchRequest);

impl FromRequest<AppState> for SearchBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                let status = rejection.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "payload_too_large"
                } else {
                    "bad_request"
                };
                ApiError::new(status, code, rejection.body_text())
            })?;
        parse_search_request(&bytes).map(SearchBody)
    }
}

/// Fields of the seed's Memory Search Query that this endpoint accepts;
/// anything else is refused so that a misspelt option does not silently
/// fall back to its default.
const ACCEPTED_FIELDS: &str = "query_text, caller_id, agent_id, search_all_agents, \
     relevance_threshold, result_limit, types, min_importance, conversation_id, timestamp";

pub(crate) fn parse_search_request(body: &[u8]) -> Result<SearchRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("request body is not valid JSON: {err}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    let mut fields = Fields(object);

    let query_text = QueryText::new(fields.required_string("query_text")?)?;
    let caller_id = CallerId::new(fields.required_string("caller_id")?)?;
    let agent_id = fields
        .optional_string("agent_id")?
        .map(AgentId::new)
        .transpose()?;
    let search_all_agents = fields.optional_bool("search_all_agents")?.unwrap_or(false);
    let relevance_threshold = match fields.optional_number("relevance_threshold")? {
        Some(value) => RelevanceThreshold::new(value)?,
        None => RelevanceThreshold::DEFAULT,
    };
    let result_limit = match fields.optional_integer("result_limit", "between 1 and 100")? {
        Some(value) => ResultLimit::new(value)?,
        None => ResultLimit::DEFAULT,
    };
    let types = fields.optional_types("types")?;
    let min_importance = fields
        .optional_integer("min_importance", "between 1 and 10")?
        .map(|value| {
            Importance::new(value)
                .map_err(|_| ValidationError::new("min_importance", "must be between 1 and 10"))
        })
        .transpose()?;
    // The seed's request also carries these; neither changes the result,
    // but a conversation id must still be a valid one.
    let _conversation_id = fields
        .optional_string("conversation_id")?
        .map(ConversationId::new)
        .transpose()?;
    fields.0.remove("timestamp");

    if let Some(unknown) = fields.0.keys().next() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{unknown}: unknown field; accepted fields are {ACCEPTED_FIELDS}"),
        ));
    }
    Ok(SearchRequest {
        query_text,
        caller_id,
        agent_id,
        search_all_agents,
        relevance_threshold,
        result_limit,
        types,
        min_importance,
    })
}

/// The body's fields, taken one by one; `null` counts as absent.
struct Fields(Map<String, Value>);

impl Fields {
    fn take(&mut self, field: &str) -> Option<Value> {
        self.0.remove(field).filter(|value| !value.is_null())
    }

    fn required_string(&mut self, field: &'static str) -> Result<String, ValidationError> {
        self.optional_string(field)?
            .ok_or_else(|| ValidationError::new(field, "is required"))
    }

    fn optional_string(&mut self, field: &'static str) -> Result<Option<String>, ValidationError> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::String(value)) => Ok(Some(value)),
            Some(_) => Err(ValidationError::new(field, "must be a string")),
        }
    }

    fn optional_bool(&mut self, field: &'static str) -> Result<Option<bool>, ValidationError> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(value)),
            Some(_) => Err(ValidationError::new(field, "must be true or false")),
        }
    }

    fn optional_number(&mut self, field: &'static str) -> Result<Option<f64>, ValidationError> {
        match self.take(field) {
            None => Ok(None),
            Some(value) => value
                .as_f64()
                .map(Some)
                .ok_or_else(|| ValidationError::new(field, "must be a number")),
        }
    }

    /// An integer; one too large for i64 is passed on as `i64::MAX` so the
    /// domain type reports it out of range.
    fn optional_integer(
        &mut self,
        field: &'static str,
        range: &str,
    ) -> Result<Option<i64>, ValidationError> {
        match self.take(field) {
            None => Ok(None),
            Some(value) => value
                .as_i64()
                .or_else(|| value.as_u64().map(|_| i64::MAX))
                .map(Some)
                .ok_or_else(|| ValidationError::new(field, format!("must be an integer {range}"))),
        }
    }

    fn optional_types(
        &mut self,
        field: &'static str,
    ) -> Result<Option<Vec<MemoryType>>, ValidationError> {
        let Some(value) = self.take(field) else {
            return Ok(None);
        };
        let invalid = || {
            ValidationError::new(
                field,
                "must be a non-empty array of factual, preference, issue, emotion, relationship",
            )
        };
        let Value::Array(items) = value else {
            return Err(invalid());
        };
        if items.is_empty() {
            return Err(invalid());
        }
        let mut types = Vec::with_capacity(items.len());
        for item in items {
            let memory_type = item
                .as_str()
                .and_then(|name| MemoryType::parse(name).ok())
                .ok_or_else(invalid)?;
            if !types.contains(&memory_type) {
                types.push(memory_type);
            }
        }
        Ok(Some(types))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<SearchRequest, ApiError> {
        parse_search_request(value.to_string().as_bytes())
    }

    fn error_message(value: Value) -> (StatusCode, String) {
        let err = parse(value).unwrap_err();
        (err.status, err.message)
    }

    #[test]
    fn defaults_follow_the_seed() {
        let request =
            parse(json!({"query_text": "allergies?", "caller_id": "+14155550123"})).unwrap();
        assert_eq!(request.relevance_threshold, RelevanceThreshold::DEFAULT);
        assert_eq!(request.result_limit, ResultLimit::DEFAULT);
        assert!(!request.search_all_agents);
        assert_eq!(request.agent_id, None);
        assert_eq!(request.types, None);
        assert_eq!(request.min_importance, None);
    }

    #[test]
    fn every_field_is_read() {
        let request = parse(json!({
            "query_text": "allergies?", "caller_id": "+1", "agent_id": "agent_x",
            "search_all_agents": false, "relevance_threshold": 0.5, "result_limit": 7,
            "types": ["factual", "issue", "factual"], "min_importance": 6,
            "conversation_id": "conv_1", "timestamp": "2026-11-25T10:00:00Z"
        }))
        .unwrap();
        assert_eq!(
            request.agent_id.as_ref().map(AgentId::as_str),
            Some("agent_x")
        );
        assert_eq!(
            request.viewing_agent().map(AgentId::as_str),
            Some("agent_x")
        );
        assert_eq!(request.relevance_threshold.get(), 0.5);
        assert_eq!(request.result_limit.get(), 7);
        assert_eq!(
            request.types,
            Some(vec![MemoryType::Factual, MemoryType::Issue])
        );
        assert_eq!(request.min_importance.map(Importance::get), Some(6));
    }

    #[test]
    fn searching_all_agents_drops_the_agent_view() {
        let request = parse(json!({
            "query_text": "q", "caller_id": "+1", "agent_id": "agent_x", "search_all_agents": true
        }))
        .unwrap();
        assert_eq!(request.viewing_agent(), None);
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (json!({"query_text": "", "caller_id": "+1"}), "query_text"),
            (
                json!({"query_text": "x".repeat(1001), "caller_id": "+1"}),
                "query_text",
            ),
            (json!({"caller_id": "+1"}), "query_text"),
            (json!({"query_text": 5, "caller_id": "+1"}), "query_text"),
            (json!({"query_text": "q"}), "caller_id"),
            (json!({"query_text": "q", "caller_id": "  "}), "caller_id"),
            (
                json!({"query_text": "q", "caller_id": "+1", "agent_id": ""}),
                "agent_id",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "search_all_agents": "yes"}),
                "search_all_agents",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "relevance_threshold": 1.5}),
                "relevance_threshold",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "relevance_threshold": -0.1}),
                "relevance_threshold",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "result_limit": 0}),
                "result_limit",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "result_limit": 101}),
                "result_limit",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "result_limit": 5.5}),
                "result_limit",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "result_limit": u64::MAX}),
                "result_limit",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "types": []}),
                "types",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "types": ["gossip"]}),
                "types",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "types": "factual"}),
                "types",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "min_importance": 11}),
                "min_importance",
            ),
            (
                json!({"query_text": "q", "caller_id": "+1", "result_limt": 3}),
                "result_limt",
            ),
        ];
        for (body, field) in cases {
            let (status, message) = error_message(body.clone());
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{body}: {message}"
            );
            assert!(
                message.starts_with(&format!("{field}: ")),
                "{body}: {message}"
            );
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_bad_requests() {
        for body in [&b"{not json"[..], b"[]", b"\"text\"", b""] {
            let err = parse_search_request(body).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.code, "bad_request");
        }
    }

    #[test]
    fn null_means_absent() {
        let request = parse(json!({
            "query_text": "q", "caller_id": "+1", "agent_id": null, "result_limit": null, "types": null
        }))
        .unwrap();
        assert_eq!(request.agent_id, None);
        assert_eq!(request.result_limit, ResultLimit::DEFAULT);
    }

    #[test]
    fn the_statement_cannot_use_a_vector_index_and_filters_by_organization() {
        let sql = search_sql();
        assert!(sql.contains("ORDER BY (m.embedding <#> $3) + 0"), "{sql}");
        assert!(sql.contains("m.organization_id = $1"), "{sql}");
        assert!(sql.contains("m.agent_id = $4"), "{sql}");
    }
}
