-- no-transaction
-- As for the name-like facts (migration 20261125001500): the context's open
-- issues are ordered by (importance DESC, created_at DESC, id DESC) with a
-- limit of 10, and `memories_open_issues` ended at created_at. For a caller
-- with thousands of open issues the plan sorted all of them (2,400 rows,
-- 7.6 ms, measured at 10,000 memories) whenever the planner's estimate was
-- small. With the id in the key the limit stops after 10 rows.
CREATE INDEX CONCURRENTLY memories_open_issues_ranked
    ON memories (organization_id, caller_id, importance DESC, created_at DESC, id DESC)
    WHERE type = 'issue' AND status = 'open';
