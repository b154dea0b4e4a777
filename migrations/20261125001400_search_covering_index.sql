-- no-transaction
-- (CREATE INDEX CONCURRENTLY cannot run in a transaction; it does not block
-- writes while it builds on a large table.)
--
-- Search ranks all of a caller's rows by exact distance (DESIGN.md section
-- 3). A caller's rows are spread over the heap as calls arrive, so reading
-- them from the table touches one 8 KB page per memory: 1,000 random pages
-- for a caller with 1,000 memories, 5.5 ms at 1M memories. This index keeps
-- next to the caller key everything the ranking reads (the embedding and
-- the columns of the filters and the sharing predicate), so the ranking is
-- an index-only scan over the caller's adjacent entries (about 330 pages,
-- 2.4 ms), and only the top results are read from the table.
--
-- It costs space (about 2.6 KB per memory at 1M, more than the table's 2
-- KB) and one more index write per new memory: the price of exact search
-- without a vector index. If building it fails (an invalid index is left
-- behind), `DROP INDEX CONCURRENTLY memories_caller_search` and migrate
-- again.
CREATE INDEX CONCURRENTLY memories_caller_search
    ON memories (organization_id, caller_id)
    INCLUDE (embedding, agent_id, type, importance, is_shareable, sensitive_class, created_at, id);
