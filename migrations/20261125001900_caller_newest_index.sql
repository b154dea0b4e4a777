-- no-transaction
-- A caller's memories newest first, in exactly the order of the memory
-- listing (keyset on (created_at, id), both descending) and of the
-- context's recent memories: the index gives the order, so a limit stops
-- early whatever the planner estimates. Replaces memories_caller_recent,
-- which ended at created_at (next migration).
CREATE INDEX CONCURRENTLY memories_caller_newest
    ON memories (organization_id, caller_id, created_at DESC, id DESC);
