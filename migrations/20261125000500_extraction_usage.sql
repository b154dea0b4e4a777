-- Token usage of the LLM extractions, one row per conversation and
-- generation (a replay is a new generation and a new row). A redelivered
-- message that calls the provider again adds to the same row, so
-- `llm_calls` above one extraction's calls shows duplicate work.

CREATE TABLE extraction_usage (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    conversation_id text NOT NULL CHECK (char_length(conversation_id) BETWEEN 1 AND 256),
    generation      integer NOT NULL CHECK (generation >= 1),
    provider        text NOT NULL,
    model           text NOT NULL,
    prompt_version  text NOT NULL,
    -- Every provider request, repairs and redeliveries included.
    llm_calls       integer NOT NULL CHECK (llm_calls >= 0),
    -- Extractions run for this generation (more than one: a redelivery).
    extractions     integer NOT NULL DEFAULT 1 CHECK (extractions >= 1),
    input_tokens    bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens   bigint NOT NULL CHECK (output_tokens >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, conversation_id, generation)
);
CREATE INDEX extraction_usage_created ON extraction_usage (organization_id, created_at DESC);

ALTER TABLE extraction_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE extraction_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON extraction_usage
    USING (organization_id = NULLIF(current_setting('app.organization_id', true), '')::uuid)
    WITH CHECK (organization_id = NULLIF(current_setting('app.organization_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON extraction_usage TO elaaoms_service;
