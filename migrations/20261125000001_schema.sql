-- ELAAOMS schema: organizations and their callers, conversations, memories,
-- the outbox and the bookkeeping that makes every effect idempotent.
--
-- Tenancy: every tenant table carries organization_id, has row-level
-- security ENABLEd and FORCEd, and one policy that compares it with the
-- transaction's `app.organization_id` setting. The NULLIF matters: on a
-- pooled connection the setting reads '' after an earlier transaction
-- and ''::uuid would raise instead of matching nothing.

CREATE EXTENSION IF NOT EXISTS vector;

-- The privileges the services need. Login roles (DATABASE_URL's user) are
-- made members by `elaaoms migrate`; roles are cluster-wide, so an earlier
-- database on the same cluster may have created it already.
DO $$
BEGIN
    CREATE ROLE elaaoms_service NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

CREATE TABLE organizations (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug                 text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name                 text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    llm_provider         text NOT NULL DEFAULT 'rules'
                         CHECK (llm_provider IN ('openai', 'anthropic', 'openai-compatible', 'rules')),
    llm_model            text,
    llm_base_url         text,
    privacy_settings     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(privacy_settings) = 'object'),
    sharing_policy       text NOT NULL DEFAULT 'by_importance'
                         CHECK (sharing_policy IN ('by_importance', 'none', 'all')),
    share_sensitive      boolean NOT NULL DEFAULT false,
    -- HMAC needs the secret itself, so it cannot be hashed; it is never logged.
    hmac_secret          text NOT NULL CHECK (octet_length(hmac_secret) >= 32),
    -- Accepted too while a secret is being rotated.
    hmac_secret_previous text CHECK (hmac_secret_previous IS NULL OR octet_length(hmac_secret_previous) >= 32),
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    -- sha256 of the key; the key itself is shown once and never stored.
    key_hash        bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    -- The first characters, so an operator can tell keys apart.
    key_prefix      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_organization ON api_keys (organization_id);

CREATE TABLE agents (
    organization_id   uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    agent_id          text NOT NULL CHECK (char_length(agent_id) BETWEEN 1 AND 256),
    name              text,
    profile           jsonb,
    profile_cached_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, agent_id)
);

CREATE TABLE callers (
    organization_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    caller_id           text NOT NULL CHECK (char_length(caller_id) BETWEEN 1 AND 256),
    first_seen_at       timestamptz NOT NULL,
    last_seen_at        timestamptz NOT NULL,
    total_conversations integer NOT NULL DEFAULT 0 CHECK (total_conversations >= 0),
    PRIMARY KEY (organization_id, caller_id),
    CHECK (first_seen_at <= last_seen_at)
);
CREATE INDEX callers_last_seen ON callers (organization_id, last_seen_at DESC);

CREATE TABLE conversations (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    conversation_id text NOT NULL CHECK (char_length(conversation_id) BETWEEN 1 AND 256),
    agent_id        text NOT NULL,
    caller_id       text NOT NULL,
    start_time      timestamptz NOT NULL,
    end_time        timestamptz,
    duration_secs   integer CHECK (duration_secs >= 0),
    status          text NOT NULL CHECK (status IN (
                        'initiated', 'active', 'completed', 'failed',
                        'extraction_pending', 'extraction_completed', 'extraction_failed')),
    -- Bumped by every replay; part of every message id and of applied_extractions.
    generation      integer NOT NULL DEFAULT 1 CHECK (generation >= 1),
    call_sid        text,
    failure_reason  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, conversation_id),
    FOREIGN KEY (organization_id, caller_id) REFERENCES callers (organization_id, caller_id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, agent_id) REFERENCES agents (organization_id, agent_id),
    CHECK (end_time IS NULL OR end_time >= start_time)
);
CREATE INDEX conversations_caller ON conversations (organization_id, caller_id, start_time DESC);
CREATE INDEX conversations_agent ON conversations (organization_id, agent_id);
CREATE INDEX conversations_start ON conversations (organization_id, start_time DESC);
CREATE INDEX conversations_unfinished ON conversations (organization_id, status, updated_at)
    WHERE status IN ('extraction_pending', 'extraction_failed');

-- The status machine of shared::domain::ConversationStatus, enforced by the
-- database as well: no code path can write a transition Rust forbids. A
-- replay (back to extraction_pending) must bump the generation.
CREATE FUNCTION conversation_status_transition_allowed(old_status text, new_status text, is_replay boolean)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN is_replay THEN
        (old_status, new_status) IN (('extraction_failed', 'extraction_pending'),
                                     ('extraction_completed', 'extraction_pending'))
    ELSE
        (old_status, new_status) IN (('initiated', 'active'), ('initiated', 'completed'),
                                     ('initiated', 'failed'), ('active', 'completed'),
                                     ('completed', 'extraction_pending'),
                                     ('extraction_pending', 'extraction_completed'),
                                     ('extraction_pending', 'extraction_failed'))
    END
$$;

CREATE FUNCTION enforce_conversation_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status NOT IN ('initiated', 'completed', 'failed') THEN
            RAISE EXCEPTION 'a conversation cannot be created as %', NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT conversation_status_transition_allowed(OLD.status, NEW.status, NEW.generation > OLD.generation) THEN
            RAISE EXCEPTION 'conversation status cannot change from % to %', OLD.status, NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    -- The generation moves only with a replay, one step at a time.
    IF TG_OP = 'UPDATE' AND NEW.generation <> OLD.generation
       AND NOT (NEW.generation = OLD.generation + 1
                AND conversation_status_transition_allowed(OLD.status, NEW.status, true)) THEN
        RAISE EXCEPTION 'the generation changes only by one, with a replay' USING ERRCODE = 'check_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER conversations_status_machine
    BEFORE INSERT OR UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION enforce_conversation_status();

-- ElevenLabs' conversation-initiation request has no conversation id; the
-- transcript is linked to it later by the call sid.
CREATE TABLE pending_calls (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    call_sid        text NOT NULL,
    agent_id        text NOT NULL,
    caller_id       text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, call_sid)
);

-- Events written in the same transaction as the state they announce; a
-- relay publishes whatever the request path could not.
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    subject         text NOT NULL,
    msg_id          text NOT NULL UNIQUE,
    body            bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    stream_seq      bigint
);
CREATE INDEX outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;
CREATE INDEX outbox_organization ON outbox (organization_id);

CREATE TABLE memories (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    caller_id          text NOT NULL,
    -- The agent whose call produced the memory.
    agent_id           text NOT NULL,
    -- The first source; memory_sources has all of them.
    conversation_id    text NOT NULL,
    content            text NOT NULL CHECK (char_length(content) BETWEEN 1 AND 10000 AND btrim(content) <> ''),
    type               text NOT NULL CHECK (type IN ('factual', 'preference', 'issue', 'emotion', 'relationship')),
    importance         smallint NOT NULL CHECK (importance BETWEEN 1 AND 10),
    -- The seed's rule, so it can never disagree with importance.
    is_shareable       boolean GENERATED ALWAYS AS (importance >= 8) STORED,
    -- A class such as 'health' is shared only when the organization opts in.
    sensitive_class    text,
    confidence         real NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
    reinforcement_count integer NOT NULL DEFAULT 0 CHECK (reinforcement_count >= 0),
    status             text,
    resolved_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_reinforced_at timestamptz,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    embedding          vector(384) NOT NULL,
    embedding_model    text NOT NULL,
    FOREIGN KEY (organization_id, caller_id) REFERENCES callers (organization_id, caller_id) ON DELETE CASCADE,
    FOREIGN KEY (organization_id, conversation_id) REFERENCES conversations (organization_id, conversation_id) ON DELETE CASCADE,
    CHECK ((type = 'issue' AND status IN ('open', 'resolved')) OR (type <> 'issue' AND status IS NULL)),
    CHECK ((status = 'resolved') = (resolved_at IS NOT NULL)),
    CHECK (last_reinforced_at IS NULL OR last_reinforced_at >= created_at)
);
-- Search scans one caller's rows exactly (see DESIGN.md section 3): no
-- vector index on purpose.
CREATE INDEX memories_caller_recent ON memories (organization_id, caller_id, created_at DESC);
CREATE INDEX memories_conversation ON memories (organization_id, conversation_id);
CREATE INDEX memories_agent ON memories (organization_id, agent_id);

CREATE TABLE memory_sources (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    memory_id       uuid NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    conversation_id text NOT NULL,
    generation      integer NOT NULL CHECK (generation >= 1),
    kind            text NOT NULL CHECK (kind IN ('created', 'reinforced', 'conflict')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (memory_id, conversation_id, generation)
);
CREATE INDEX memory_sources_conversation ON memory_sources (organization_id, conversation_id, generation);

-- Inserted first by the transaction that applies an extraction: the same
-- extraction applied twice conflicts here and changes nothing.
CREATE TABLE applied_extractions (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    conversation_id text NOT NULL,
    generation      integer NOT NULL CHECK (generation >= 1),
    memories_created integer NOT NULL DEFAULT 0,
    memories_reinforced integer NOT NULL DEFAULT 0,
    applied_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, conversation_id, generation)
);

-- Erased callers, by a hash of the caller id, so workers drop events that
-- were in flight when the caller was erased.
CREATE TABLE erased_callers (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    caller_hash     bytea NOT NULL CHECK (octet_length(caller_hash) = 32),
    erased_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, caller_hash)
);

-- Row-level security: the second wall behind every query's own filter.
DO $$
DECLARE
    tenant_table text;
BEGIN
    FOREACH tenant_table IN ARRAY ARRAY['api_keys', 'agents', 'callers', 'conversations', 'pending_calls',
                                        'outbox', 'memories', 'memory_sources', 'applied_extractions',
                                        'erased_callers']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', tenant_table);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', tenant_table);
        EXECUTE format($p$CREATE POLICY tenant_isolation ON %I
                          USING (organization_id = NULLIF(current_setting('app.organization_id', true), '')::uuid)
                          WITH CHECK (organization_id = NULLIF(current_setting('app.organization_id', true), '')::uuid)$p$,
                       tenant_table);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO elaaoms_service', tenant_table);
    END LOOP;
END
$$;

ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON organizations
    USING (id = NULLIF(current_setting('app.organization_id', true), '')::uuid)
    WITH CHECK (id = NULLIF(current_setting('app.organization_id', true), '')::uuid);
-- Services read and update their organization's settings; creating one is
-- an operator command on the admin role.
GRANT SELECT, UPDATE ON organizations TO elaaoms_service;
GRANT USAGE ON SEQUENCE outbox_id_seq TO elaaoms_service;
GRANT EXECUTE ON FUNCTION conversation_status_transition_allowed(text, text, boolean) TO elaaoms_service;

-- The two lookups that happen before the organization is known. They run
-- with the owner's rights and return only what authentication needs.
CREATE FUNCTION auth_webhook_secrets(p_slug text)
RETURNS TABLE (organization_id uuid, hmac_secret text, hmac_secret_previous text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT id, hmac_secret, hmac_secret_previous FROM public.organizations WHERE slug = p_slug
$$;

CREATE FUNCTION auth_api_key(p_key_hash bytea)
RETURNS TABLE (organization_id uuid, api_key_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT organization_id, id FROM public.api_keys WHERE key_hash = p_key_hash AND revoked_at IS NULL
$$;

REVOKE ALL ON FUNCTION auth_webhook_secrets(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION auth_api_key(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth_webhook_secrets(text) TO elaaoms_service;
GRANT EXECUTE ON FUNCTION auth_api_key(bytea) TO elaaoms_service;

-- The outbox relay runs before it knows which organizations have work: this
-- names them, and nothing else; the rows themselves are read under RLS.
CREATE FUNCTION outbox_pending_organizations(p_older_than interval)
RETURNS TABLE (organization_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT DISTINCT organization_id FROM public.outbox
     WHERE published_at IS NULL AND created_at < now() - p_older_than
$$;
REVOKE ALL ON FUNCTION outbox_pending_organizations(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_pending_organizations(interval) TO elaaoms_service;
