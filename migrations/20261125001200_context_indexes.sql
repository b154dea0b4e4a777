-- The pre-call context reads a caller's open issues and the memory that
-- names the caller on every call; without these it scans all the caller's
-- rows (8-10 ms for a caller with 10,000 memories, see BENCHMARKS.md).
-- Partial, so they stay small: only open issues and name-like facts.
CREATE INDEX memories_open_issues
    ON memories (organization_id, caller_id, importance DESC, created_at DESC)
    WHERE type = 'issue' AND status = 'open';

CREATE INDEX memories_caller_name_facts
    ON memories (organization_id, caller_id, created_at DESC)
    WHERE type = 'factual' AND (content ILIKE 'caller%' OR content ILIKE 'the caller%');
