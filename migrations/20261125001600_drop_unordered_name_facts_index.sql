-- no-transaction
-- Replaced by memories_caller_name_facts_newest (previous migration).
DROP INDEX CONCURRENTLY IF EXISTS memories_caller_name_facts;
