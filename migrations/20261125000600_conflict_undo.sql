-- A conflict replaces a memory's content with the newer value (the older one
-- goes to metadata.conflicts[] for readers). The source row of the
-- conflict also keeps what a replay needs to undo it exactly: the previous
-- content, model and embedding. memory_sources is already a tenant table
-- (RLS forced, granted to elaaoms_service), so no policy changes.
ALTER TABLE memory_sources
    ADD COLUMN previous_content text,
    ADD COLUMN previous_embedding vector(384),
    ADD COLUMN previous_embedding_model text,
    ADD CONSTRAINT memory_sources_conflict_keeps_previous
        CHECK (kind <> 'conflict' OR (previous_content IS NOT NULL AND previous_embedding IS NOT NULL
                                      AND previous_embedding_model IS NOT NULL));
