//! `GET /v1/callers/{caller_id}/context?agent_id=`: what an agent should
//! know before it says hello.
//!
//! * a summary (first and last seen, number of conversations);
//! * the caller's open issues (most important first, at most 10);
//! * the 10 most recent other memories, newest first.
//!
//! With `agent_id`, only what that agent may see (the sharing predicate: its
//! own memories plus what the organization shares); without, everything.
//! `context_text` renders the same as plain lines, ready to inject into a
//! prompt, within [`CONTEXT_MAX_TOKENS`] tokens counted with the
//! all-MiniLM-L6-v2 WordPiece tokenizer (`tokenizer.json` of the embedding
//! model, via the `tokenizers` crate, without special tokens). It is a real
//! tokenizer but not the LLM's: for English text the counts are close to
//! GPT-style BPE counts, so keep a margin when the prompt is tight. Lines
//! are dropped whole, never cut: open issues first, then the newest
//! memories, so what is left out is the least urgent.
//!
//! An unknown caller is not an error: 200 with `caller_is_returning: false`,
//! no memories and an empty text, which is exactly what a first call needs.

use std::path::Path;
use std::sync::LazyLock;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use elaaoms_shared::domain::{AgentId, CallerId};
use elaaoms_shared::http::ApiError;
use elaaoms_shared::sharing::visible_to_agent_sql;
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Postgres, Row, Transaction};
use tokenizers::Tokenizer;
use uuid::Uuid;

use crate::auth::Organization;
use crate::error::{database_error, QueryError};
use crate::memory::{MemoryView, MEMORY_COLUMNS};
use crate::AppState;

/// The most tokens `context_text` may hold.
pub const CONTEXT_MAX_TOKENS: usize = 2000;
/// Recent memories and open issues, each. A literal in the SQL, not a
/// parameter: a generic plan that knows the limit is small reads a few rows
/// in index order instead of sorting all of a caller's.
const CONTEXT_MEMORIES: i64 = 10;

/// Counts tokens with all-MiniLM-L6-v2's WordPiece tokenizer.
///
/// The `tokenizers` crate takes about 0.1 ms per memory line (Unicode
/// normalisation, offsets, allocations), which made counting the largest
/// part of a pre-call context. ASCII text, which is nearly all of it, is
/// counted here the way the same tokenizer does (BERT uncased: lowercase,
/// split on whitespace and punctuation, greedy longest-match WordPiece over
/// the same vocabulary) in about a microsecond; anything else goes to the
/// `tokenizers` crate. A test checks both agree.
pub struct ContextTokenizer {
    tokenizer: Tokenizer,
    /// The vocabulary, looked up once or more per word. std's SipHash was
    /// most of the counting time; its resistance to hash flooding is not
    /// needed for a set built once from `tokenizer.json` and only read.
    vocab: foldhash::HashSet<String>,
}

/// BERT's WordPiece: a longer word is one unknown token.
const MAX_WORD_CHARS: usize = 100;

impl ContextTokenizer {
    /// Loads `tokenizer.json` from the embedding model's directory, with its
    /// fixed padding and truncation switched off (they would make every
    /// count 128).
    pub fn load(model_dir: &Path) -> Result<Self, QueryError> {
        let path = model_dir.join("tokenizer.json");
        let error = |reason: String| QueryError::Tokenizer {
            path: path.clone(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|err| error(err.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|err| error(err.to_string()))?;
        let vocab = tokenizer.get_vocab(false).into_keys().collect();
        Ok(Self { tokenizer, vocab })
    }

    /// Tokens of `text`, without `[CLS]`/`[SEP]`.
    pub fn count(&self, text: &str) -> usize {
        if text.is_ascii() {
            return self.count_ascii(text);
        }
        self.count_with_tokenizers(text)
    }

    fn count_with_tokenizers(&self, text: &str) -> usize {
        match self.tokenizer.encode(text, false) {
            Ok(encoding) => encoding.len(),
            // WordPiece does not fail on text; if it ever did, overestimate
            // (one token per byte) so the budget still holds.
            Err(_) => text.len(),
        }
    }

    fn count_ascii(&self, text: &str) -> usize {
        let mut tokens = 0;
        let mut word = String::new();
        for byte in text.bytes() {
            if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') || byte.is_ascii_punctuation() {
                tokens += self.word_pieces(&word);
                word.clear();
                // Punctuation is a token of its own.
                tokens += usize::from(byte.is_ascii_punctuation());
            } else if !byte.is_ascii_control() {
                // Other control characters are removed, without splitting.
                word.push(char::from(byte.to_ascii_lowercase()));
            }
        }
        tokens + self.word_pieces(&word)
    }

    /// Greedy longest-match-first WordPiece of one lowercase ASCII word.
    fn word_pieces(&self, word: &str) -> usize {
        if word.is_empty() {
            return 0;
        }
        if word.len() > MAX_WORD_CHARS {
            return 1;
        }
        let mut pieces = 0;
        let mut start = 0;
        let mut candidate = String::with_capacity(word.len() + 2);
        while start < word.len() {
            let found = (start + 1..=word.len()).rev().find(|&end| {
                candidate.clear();
                if start > 0 {
                    candidate.push_str("##");
                }
                candidate.push_str(&word[start..end]);
                self.vocab.contains(&candidate)
            });
            match found {
                Some(end) => {
                    pieces += 1;
                    start = end;
                }
                // No piece fits: the whole word is one [UNK].
                None => return 1,
            }
        }
        pieces
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct CallerSummary {
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub total_conversations: i32,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct CallerContext {
    pub caller_id: String,
    /// The agent whose view applied; `null` for all memories.
    pub agent_id: Option<String>,
    /// Whether the organization knows this caller.
    pub caller_is_returning: bool,
    /// `null` for an unknown caller.
    pub summary: Option<CallerSummary>,
    /// From a "Caller's name is ..." memory, when there is one.
    pub caller_name: Option<String>,
    /// Open issue memories, most important first.
    pub open_issues: Vec<MemoryView>,
    /// The most recent other memories, newest first.
    pub memories: Vec<MemoryView>,
    /// The above as plain lines, at most `context_max_tokens` tokens.
    pub context_text: String,
    pub context_tokens: usize,
    pub context_max_tokens: usize,
    /// Which tokenizer counted `context_tokens`.
    pub tokenizer: &'static str,
}

/// One row of the context statement: the caller's summary, and a memory
/// with the section it is for (none for a known caller without any).
struct ContextRow {
    summary: CallerSummary,
    section: Option<String>,
    memory: Option<MemoryView>,
}

impl<'r> FromRow<'r, PgRow> for ContextRow {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let section: Option<String> = row.try_get("section")?;
        let memory = match section {
            Some(_) => Some(MemoryView::from_row(row)?),
            None => None,
        };
        Ok(Self {
            summary: CallerSummary::from_row(row)?,
            section,
            memory,
        })
    }
}

/// The caller's summary with its open issues, recent memories and name-like
/// facts visible to the agent, in one statement (one round trip instead of
/// four): no row for an unknown caller, one row without a section for a
/// caller without memories. Each part is ordered and limited on its own;
/// `load_context` orders them again, since UNION ALL does not promise to
/// keep an order.
static CONTEXT_SQL: LazyLock<String> = LazyLock::new(|| {
    let part = |section: &str, filter: &str, order: &str, limit: &str| {
        format!(
            "(SELECT '{section}' AS section, {MEMORY_COLUMNS}
                FROM memories m
                JOIN organizations o ON o.id = m.organization_id
               WHERE m.organization_id = $1
                 AND m.caller_id = $2
                 AND ($3::text IS NULL OR {visible})
                 AND {filter}
               ORDER BY {order}
               LIMIT {limit})",
            visible = visible_to_agent_sql("$3"),
        )
    };
    let sections = [
        part(
            "issue",
            "m.type = 'issue' AND m.status = 'open'",
            "m.importance DESC, m.created_at DESC, m.id DESC",
            &CONTEXT_MEMORIES.to_string(),
        ),
        part(
            "recent",
            "NOT (m.type = 'issue' AND m.status = 'open')",
            "m.created_at DESC, m.id DESC",
            &CONTEXT_MEMORIES.to_string(),
        ),
        part(
            "name",
            "m.type = 'factual' AND (m.content ILIKE 'caller%' OR m.content ILIKE 'the caller%')",
            "m.created_at DESC, m.id DESC",
            "20",
        ),
    ]
    .join(" UNION ALL ");
    format!(
        "SELECT c.first_seen_at, c.last_seen_at, c.total_conversations, s.*
           FROM callers c
           LEFT JOIN LATERAL ({sections}) s ON true
          WHERE c.organization_id = $1 AND c.caller_id = $2"
    )
});

/// The context statement. Parameters: `$1` organization id (uuid), `$2`
/// caller id (text), `$3` agent whose view applies (text, NULL for all).
pub fn context_sql() -> &'static str {
    &CONTEXT_SQL
}

/// Reads the caller's context inside an organization transaction.
pub(crate) async fn load_context(
    tx: &mut Transaction<'static, Postgres>,
    tokenizer: &ContextTokenizer,
    organization_id: Uuid,
    caller_id: &CallerId,
    agent_id: Option<&AgentId>,
) -> Result<CallerContext, sqlx::Error> {
    let agent = agent_id.map(AgentId::as_str);
    let rows: Vec<ContextRow> = sqlx::query_as(CONTEXT_SQL.as_str())
        .bind(organization_id)
        .bind(caller_id.as_str())
        .bind(agent)
        .fetch_all(&mut **tx)
        .await?;
    let summary = rows.first().map(|row| row.summary.clone());
    let (mut open_issues, mut memories, mut named) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let (Some(section), Some(memory)) = (row.section, row.memory) else {
            continue;
        };
        match section.as_str() {
            "issue" => open_issues.push(memory),
            "recent" => memories.push(memory),
            _ => named.push(memory),
        }
    }
    let newest_first = |a: &MemoryView, b: &MemoryView| {
        b.created_at
            .cmp(&a.created_at)
            .then(b.memory_id.cmp(&a.memory_id))
    };
    open_issues.sort_by(|a, b| b.importance.cmp(&a.importance).then(newest_first(a, b)));
    memories.sort_by(newest_first);
    named.sort_by(newest_first);
    let caller_name = named.iter().find_map(|memory| name_from(&memory.content));
    let (context_text, context_tokens) = render(
        summary.as_ref(),
        caller_name.as_deref(),
        &open_issues,
        &memories,
        CONTEXT_MAX_TOKENS,
        |text| tokenizer.count(text),
    );
    Ok(CallerContext {
        caller_id: caller_id.as_str().to_owned(),
        agent_id: agent.map(str::to_owned),
        caller_is_returning: summary.is_some(),
        summary,
        caller_name,
        open_issues,
        memories,
        context_text,
        context_tokens,
        context_max_tokens: CONTEXT_MAX_TOKENS,
        tokenizer: "all-MiniLM-L6-v2 WordPiece (tokenizer.json)",
    })
}

/// The name in "Caller's name is Maya Okafor" or "Caller is Maya Okafor":
/// at most five capitalised words, so "Caller is very frustrated" is not one.
pub(crate) fn name_from(content: &str) -> Option<String> {
    const PREFIXES: [&str; 5] = [
        "the caller's name is ",
        "caller's name is ",
        "caller name is ",
        "the caller is ",
        "caller is ",
    ];
    let rest = PREFIXES.iter().find_map(|prefix| {
        content
            .get(..prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(prefix))
            .map(|_| &content[prefix.len()..])
    })?;
    let name = rest.trim().trim_end_matches(['.', '!']).trim();
    let words: Vec<&str> = name.split_whitespace().collect();
    let plausible = !words.is_empty()
        && words.len() <= 5
        && name.chars().count() <= 100
        && words
            .iter()
            .all(|word| word.chars().next().is_some_and(char::is_uppercase));
    plausible.then(|| words.join(" "))
}

/// One line per memory: content on one line, then type, importance, date.
pub(crate) fn memory_line(memory: &MemoryView) -> String {
    let content = memory
        .content
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "- {content} ({}, importance {}, {})",
        memory.memory_type,
        memory.importance,
        memory.created_at.format("%Y-%m-%d")
    )
}

/// The context as text, greedily within `budget` tokens: whole lines in
/// priority order (a line that does not fit is left out and later, shorter
/// ones may still fit); a section's heading only with at least one line.
pub(crate) fn render(
    summary: Option<&CallerSummary>,
    caller_name: Option<&str>,
    open_issues: &[MemoryView],
    memories: &[MemoryView],
    budget: usize,
    count: impl Fn(&str) -> usize,
) -> (String, usize) {
    let Some(summary) = summary else {
        return (String::new(), 0);
    };
    let who = caller_name.map_or_else(
        || "Returning caller".to_owned(),
        |name| format!("Returning caller {name}"),
    );
    let plural = if summary.total_conversations == 1 {
        ""
    } else {
        "s"
    };
    let header = format!(
        "{who}: {} earlier conversation{plural}, first {}, last {}.",
        summary.total_conversations,
        summary.first_seen_at.format("%Y-%m-%d"),
        summary.last_seen_at.format("%Y-%m-%d"),
    );
    let sections = [
        ("Open issues:", open_issues),
        ("What we remember (newest first):", memories),
    ];

    let mut lines: Vec<String> = Vec::new();
    let mut used = 0;
    let header_cost = count(&header);
    if header_cost <= budget {
        lines.push(header);
        used += header_cost;
    }
    for (heading, items) in sections {
        let heading_cost = count(heading);
        let mut heading_written = false;
        for memory in items {
            let line = memory_line(memory);
            let cost = count(&line) + if heading_written { 0 } else { heading_cost };
            if used + cost > budget {
                continue;
            }
            if !heading_written {
                lines.push(heading.to_owned());
                heading_written = true;
            }
            lines.push(line);
            used += cost;
        }
    }
    // Per-line counts add up to the whole text's count for WordPiece (lines
    // are split at whitespace anyway); recount to be sure and drop lines
    // from the end if a tokenizer ever disagrees.
    let mut text = lines.join("\n");
    let mut tokens = count(&text);
    while tokens > budget && lines.pop().is_some() {
        text = lines.join("\n");
        tokens = count(&text);
    }
    (text, tokens)
}

/// The pre-call context of a caller as one agent sees it.
#[utoipa::path(
    get,
    path = "/v1/callers/{caller_id}/context",
    tag = "memories",
    params(
        ("caller_id" = String, Path, description = "The caller's phone number or id"),
        ("agent_id" = Option<String>, Query, description = "The agent about to take the call; without it, every memory", min_length = 1, max_length = 256),
    ),
    responses((status = 200, description = "The context (an unknown caller gets an empty one)", body = CallerContext)),
    security(("bearer" = [])),
)]
pub(crate) async fn context(
    State(state): State<AppState>,
    organization: Organization,
    UrlPath(caller_id): UrlPath<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<CallerContext>, ApiError> {
    let caller_id = CallerId::new(caller_id)?;
    let Query(pairs) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let mut agent_id = None;
    for (name, value) in pairs {
        match name.as_str() {
            "agent_id" => agent_id = Some(AgentId::new(value)?),
            unknown => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    format!("{unknown}: unknown parameter; the accepted parameter is agent_id"),
                ))
            }
        }
    }
    let mut tx = elaaoms_shared::db::begin_org_tx(&state.pool, organization.id)
        .await
        .map_err(|err| database_error("opening a context transaction", err))?;
    let context = load_context(
        &mut tx,
        &state.tokenizer,
        organization.id,
        &caller_id,
        agent_id.as_ref(),
    )
    .await
    .map_err(|err| database_error("reading a caller's context", err))?;
    elaaoms_shared::db::end_read_only(tx);
    Ok(Json(context))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(content: &str, memory_type: &str, importance: i16) -> MemoryView {
        MemoryView {
            memory_id: Uuid::new_v4(),
            content: content.to_owned(),
            memory_type: memory_type.to_owned(),
            importance,
            is_shareable: importance >= 8,
            confidence: 0.9,
            reinforcement_count: 0,
            status: (memory_type == "issue").then(|| "open".to_owned()),
            created_at: "2025-11-20T10:00:00Z".parse().unwrap(),
            last_reinforced_at: None,
            agent_id: "agent_a".into(),
            conversation_id: "conv_1".into(),
            metadata: serde_json::json!({}),
        }
    }

    fn summary() -> CallerSummary {
        CallerSummary {
            first_seen_at: "2025-11-03T10:00:00Z".parse().unwrap(),
            last_seen_at: "2025-11-20T10:00:00Z".parse().unwrap(),
            total_conversations: 2,
        }
    }

    #[test]
    fn the_ascii_counter_agrees_with_the_tokenizers_crate() {
        let tokenizer = ContextTokenizer::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../data/models/all-MiniLM-L6-v2"
        )))
        .expect("model files: run deploy/local/setup.sh");
        let long_word = "x".repeat(101);
        let mut texts: Vec<String> = vec![
            "- The caller's daughter Zuri has a severe tree nut allergy (factual, importance 10, 2026-11-20)".into(),
            "Prefers pickup at 3:30pm on Saturdays; e-mail: maya.okafor@example.com!!".into(),
            "Order #5531 (refund $42.50) hasn't arrived -- ticket ID ZX-99/7".into(),
            "Tabs\tand\nnewlines\r\nand  double  spaces".into(),
            "control\u{0c}chars\u{7f} join\u{0b}words".into(),
            "qwzxjkvb unfathomablenesses antidisestablishmentarianism".into(),
            long_word,
            String::new(),
            "   ".into(),
        ];
        // Every memory the rules extractor writes from the bundled calls.
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/elevenlabs");
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let body = std::fs::read(entry.unwrap().path()).unwrap();
            if let Ok(turns) = elaaoms_shared::transcript::turns_of_payload(&body) {
                for turn in &turns {
                    texts.push(turn.message.clone());
                }
            }
        }
        assert!(texts.len() > 50, "{} texts", texts.len());
        for text in texts.iter().filter(|text| text.is_ascii()) {
            assert_eq!(
                tokenizer.count_ascii(text),
                tokenizer.count_with_tokenizers(text),
                "{text:?}"
            );
        }
        // Not ASCII: the tokenizers crate counts.
        assert_eq!(
            tokenizer.count("Café crème brûlée"),
            tokenizer.count_with_tokenizers("Café crème brûlée")
        );
    }

    fn words(text: &str) -> usize {
        text.split_whitespace().count()
    }

    #[test]
    fn unknown_callers_get_no_text() {
        assert_eq!(
            render(None, None, &[], &[], 2000, words),
            (String::new(), 0)
        );
    }

    #[test]
    fn issues_come_first_and_lines_are_whole() {
        let issues = [memory("Croissants were burnt", "issue", 5)];
        let memories = [memory("Prefers lemon\nwith raspberry", "preference", 6)];
        let (text, tokens) = render(
            Some(&summary()),
            Some("Maya Okafor"),
            &issues,
            &memories,
            2000,
            words,
        );
        assert_eq!(
            text,
            "Returning caller Maya Okafor: 2 earlier conversations, first 2025-11-03, last 2025-11-20.\n\
             Open issues:\n\
             - Croissants were burnt (issue, importance 5, 2025-11-20)\n\
             What we remember (newest first):\n\
             - Prefers lemon with raspberry (preference, importance 6, 2025-11-20)"
        );
        assert_eq!(tokens, words(&text));
    }

    #[test]
    fn the_budget_drops_whole_lines_never_cuts_one() {
        let long = "word ".repeat(50);
        let memories = [
            memory("short one", "factual", 5),
            memory(&long, "factual", 5),
            memory("short two", "factual", 5),
        ];
        // Header (11 words) + heading (5) + "short one" line (6) + "short two" (6) = 28.
        let (text, tokens) = render(Some(&summary()), None, &[], &memories, 30, words);
        assert!(tokens <= 30, "{tokens}");
        assert!(
            text.contains("short one") && text.contains("short two"),
            "{text}"
        );
        assert!(!text.contains("word word"), "{text}");
        for line in text.lines() {
            assert!(
                line.ends_with(')') || line.ends_with(':') || line.ends_with('.'),
                "{line}"
            );
        }
        // Too small for anything but the header: no empty section heading.
        let (text, _) = render(Some(&summary()), None, &[], &memories, 12, words);
        assert!(!text.contains("What we remember"), "{text}");
    }

    #[test]
    fn names_are_taken_only_from_name_memories() {
        assert_eq!(
            name_from("Caller's name is Maya Okafor").as_deref(),
            Some("Maya Okafor")
        );
        assert_eq!(
            name_from("Caller is Maya Okafor.").as_deref(),
            Some("Maya Okafor")
        );
        assert_eq!(
            name_from("the caller's NAME is Ana Lucia Ferreira").as_deref(),
            Some("Ana Lucia Ferreira")
        );
        assert_eq!(name_from("Caller is very frustrated"), None);
        assert_eq!(name_from("Caller lives in Atlanta"), None);
        assert_eq!(name_from("Caller's name is "), None);
    }
}
