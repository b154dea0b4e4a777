-- no-transaction
-- Replaced by memories_open_issues_ranked (previous migration).
DROP INDEX CONCURRENTLY IF EXISTS memories_open_issues;
