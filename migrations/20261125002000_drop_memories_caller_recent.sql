-- no-transaction
-- Replaced by memories_caller_newest (previous migration).
DROP INDEX CONCURRENTLY IF EXISTS memories_caller_recent;
