-- Observability: the trace context an outbox row is published with, and the
-- counts behind the pipeline's backlog gauges.

-- The W3C `traceparent` of the webhook that queued the event: the relay
-- publishes it too, so an event published late stays in its trace. NULL for
-- rows written before this migration (they are published without one).
ALTER TABLE outbox ADD COLUMN traceparent text
    CHECK (traceparent IS NULL OR char_length(traceparent) BETWEEN 55 AND 128);

-- The ingest relay reports these before it knows any organization, like
-- outbox_pending_organizations: they run with the owner's rights across
-- organizations and return only counts and ages, never a row.

-- Outbox rows unpublished for longer than p_older_than (the relay's grace:
-- younger ones are still the webhook request's to publish), and the age of
-- the oldest of them in seconds (0 when there is none).
CREATE FUNCTION outbox_backlog(p_older_than interval)
RETURNS TABLE (unpublished bigint, oldest_seconds double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT count(*),
           COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::double precision
      FROM public.outbox
     WHERE published_at IS NULL AND created_at < now() - p_older_than
$$;
REVOKE ALL ON FUNCTION outbox_backlog(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_backlog(interval) TO elaaoms_service;

-- Conversations in extraction_pending for longer than p_older_than (since
-- their last status change), and the age of the oldest conversation in
-- extraction_pending at all, in seconds (0 when there is none).
CREATE FUNCTION extraction_pending_backlog(p_older_than interval)
RETURNS TABLE (stuck bigint, oldest_seconds double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT count(*) FILTER (WHERE updated_at < now() - p_older_than),
           COALESCE(EXTRACT(EPOCH FROM now() - min(updated_at)), 0)::double precision
      FROM public.conversations
     WHERE status = 'extraction_pending'
$$;
REVOKE ALL ON FUNCTION extraction_pending_backlog(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION extraction_pending_backlog(interval) TO elaaoms_service;
