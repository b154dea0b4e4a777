-- The query service's ElevenLabs agent endpoints and caller erasure.
--
-- * organizations.agent_secret_hash: sha256 of the secret the user puts in
--   ElevenLabs as the `X-Elaaoms-Secret` header of the conversation-initiation
--   webhook and of the server tool. Unlike the HMAC secret it is only
--   compared, so only its hash is stored (the secret is random, 32 bytes).
-- * organizations.dynamic_variable_defaults: values for the agent's own
--   placeholders, always sent by the initiation webhook (strings, numbers,
--   booleans only).
-- * organizations.tool_requires_caller_token: the server tool reads out
--   memories only for a caller bound by a token the initiation webhook issued.
-- * pending_calls.caller_token_hash: sha256 of the `secret__elaaoms_caller_token`
--   the initiation webhook issued for that call.
-- * erasure_audit: one row per erasure request (the caller only as a hash).

ALTER TABLE organizations
    ADD COLUMN agent_secret_hash bytea CHECK (agent_secret_hash IS NULL OR octet_length(agent_secret_hash) = 32),
    ADD COLUMN dynamic_variable_defaults jsonb NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(dynamic_variable_defaults) = 'object'),
    ADD COLUMN tool_requires_caller_token boolean NOT NULL DEFAULT false;

ALTER TABLE pending_calls
    ADD COLUMN caller_token_hash bytea CHECK (caller_token_hash IS NULL OR octet_length(caller_token_hash) = 32),
    ADD COLUMN caller_token_expires_at timestamptz,
    ADD CONSTRAINT pending_calls_token_expiry CHECK ((caller_token_hash IS NULL) = (caller_token_expires_at IS NULL));
CREATE UNIQUE INDEX pending_calls_caller_token ON pending_calls (organization_id, caller_token_hash)
    WHERE caller_token_hash IS NOT NULL;
CREATE INDEX pending_calls_caller ON pending_calls (organization_id, caller_id);

CREATE TABLE erasure_audit (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    caller_hash             bytea NOT NULL CHECK (octet_length(caller_hash) = 32),
    api_key_id              uuid,
    requested_at            timestamptz NOT NULL DEFAULT now(),
    memories_deleted        integer NOT NULL CHECK (memories_deleted >= 0),
    conversations_deleted   integer NOT NULL CHECK (conversations_deleted >= 0),
    pending_calls_deleted   integer NOT NULL CHECK (pending_calls_deleted >= 0),
    outbox_rows_deleted     integer NOT NULL CHECK (outbox_rows_deleted >= 0),
    payload_dirs_deleted    integer NOT NULL CHECK (payload_dirs_deleted >= 0),
    stream_messages_deleted integer NOT NULL CHECK (stream_messages_deleted >= 0)
);
CREATE INDEX erasure_audit_caller ON erasure_audit (organization_id, caller_hash, requested_at DESC);

ALTER TABLE erasure_audit ENABLE ROW LEVEL SECURITY;
ALTER TABLE erasure_audit FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON erasure_audit
    USING (organization_id = NULLIF(current_setting('app.organization_id', true), '')::uuid)
    WITH CHECK (organization_id = NULLIF(current_setting('app.organization_id', true), '')::uuid);
-- An audit trail is appended to, never rewritten.
GRANT SELECT, INSERT ON erasure_audit TO elaaoms_service;

-- The lookup the ElevenLabs agent endpoints make before the organization is
-- known: only what authentication (and the webhook's fallback answer) needs.
CREATE FUNCTION auth_agent_endpoint(p_slug text)
RETURNS TABLE (organization_id uuid, agent_secret_hash bytea, dynamic_variable_defaults jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT id, agent_secret_hash, dynamic_variable_defaults FROM public.organizations
     WHERE slug = p_slug AND agent_secret_hash IS NOT NULL
$$;
REVOKE ALL ON FUNCTION auth_agent_endpoint(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth_agent_endpoint(text) TO elaaoms_service;
