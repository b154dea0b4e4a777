-- no-transaction
-- The pre-call context reads a caller's newest name-like facts, ordered by
-- (created_at DESC, id DESC) with a limit of 20. `memories_caller_name_facts`
-- ends at created_at, so the plan sorted all of them first: under row-level
-- security the planner estimates one such row per caller, picks a full sort
-- over an incremental one, and reads 260 rows for a typical caller at 1M
-- memories (2,600 for a caller with 10,000: 6.7 ms of a 10 ms context).
-- With the id in the key the index gives the exact order and the limit
-- stops after 20 rows, whatever the estimate. The old index is dropped by
-- the next migration (CONCURRENTLY allows one statement per migration).
CREATE INDEX CONCURRENTLY memories_caller_name_facts_newest
    ON memories (organization_id, caller_id, created_at DESC, id DESC)
    WHERE type = 'factual' AND (content ILIKE 'caller%' OR content ILIKE 'the caller%');
