-- A replay of a conversation takes back what its earlier generation did
-- (DESIGN.md section 4). Two effects could not be taken back exactly before:
--
-- * An importance raised by a reinforcement or a conflict: each source row
--   now records the importance it brought, so importance (and with it the
--   generated is_shareable) is recomputed from the sources that remain.
--   NULL for rows written before this migration: such a memory keeps its
--   importance.
-- * An issue resolved by the call: the memory records which conversation
--   generation resolved it, so the replay reopens it before applying the
--   new extraction (which may resolve it again).
ALTER TABLE memory_sources
    ADD COLUMN importance smallint CHECK (importance BETWEEN 1 AND 10);

ALTER TABLE memories
    ADD COLUMN resolved_by_conversation_id text,
    ADD COLUMN resolved_by_generation integer,
    ADD CONSTRAINT memories_resolved_by_only_when_resolved
        CHECK (resolved_by_conversation_id IS NULL OR status = 'resolved');
