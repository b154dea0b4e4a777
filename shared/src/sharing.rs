//! What one agent may see of a caller's memories: the one SQL predicate,
//! written once, used by search, context and deduplication alike.
//!
//! An agent sees its own memories, plus other agents' memories that the
//! organization's `sharing_policy` shares: `by_importance` (the seed's rule
//! and the default: `is_shareable`, importance >= 8), `none`, or `all`.
//! Memories of a sensitive class (health) cross agents only when the
//! organization opts in with `share_sensitive`: a penicillin allergy told to
//! the dental agent does not reach the bakery agent unless it says so.

/// A SQL boolean expression over the alias `m` (memories) and `o`
/// (organizations); `$AGENT` is replaced by the placeholder of the agent id.
const VISIBLE_TO_AGENT: &str = "(m.agent_id = $AGENT
    OR ((o.sharing_policy = 'all' OR (o.sharing_policy = 'by_importance' AND m.is_shareable))
        AND (m.sensitive_class IS NULL OR o.share_sensitive)))";

/// The predicate with the agent bound to placeholder `$n`.
pub fn visible_to_agent_sql(agent_placeholder: &str) -> String {
    VISIBLE_TO_AGENT.replace("$AGENT", agent_placeholder)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_placeholder_is_substituted() {
        let sql = super::visible_to_agent_sql("$3");
        assert!(sql.contains("m.agent_id = $3"));
        assert!(!sql.contains("$AGENT"));
    }
}
