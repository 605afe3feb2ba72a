-- Rebuild without downtime (issue 14).
--
-- `fingerprint`: the definition a projector's tables were built with (a Rust
-- projector's `version`, a SQL projection's hash). NULL on rows written before
-- this migration, or by an older pgfold: adopted as current, never a reason to
-- rebuild.
--
-- A rebuild beside the live projection keeps its own checkpoint in a row of its
-- own, named `<projector>.build` (a dot never appears in a projector's name), so
-- that every piece of bookkeeping (delivered_ahead, dead_letters, the advisory
-- lock) works for it unchanged. `build_of` names the live projector such a row
-- builds; `build_reason` says why, for `status`. An older pgfold reads
-- pgfold.projectors by projector name only, so it never sees these rows.
--
-- `retired_*`: on a live projector's row after a swap, the checkpoint of the
-- tables moved to `pgfold_retired_<name>` (position, fingerprint, events delivered
-- ahead of it as [{"event_id", "position_tx"}]), so that an operator can swap them
-- back exactly (README, "Rebuild without downtime").
ALTER TABLE pgfold.projectors
  ADD COLUMN IF NOT EXISTS fingerprint text,
  ADD COLUMN IF NOT EXISTS retired_position_tx xid8,
  ADD COLUMN IF NOT EXISTS retired_position_id bigint,
  ADD COLUMN IF NOT EXISTS retired_fingerprint text,
  ADD COLUMN IF NOT EXISTS retired_ahead jsonb,
  ADD COLUMN IF NOT EXISTS build_of text,
  ADD COLUMN IF NOT EXISTS build_reason text,
  ADD COLUMN IF NOT EXISTS build_started_at timestamptz;

-- Puts the tables a swap retired back in place of the live ones, and the
-- checkpoint they were at, in one transaction; the tables it replaces become the
-- retired ones (so a second call swaps forward again). Stop every pgfold instance
-- first and start the definition the retired tables were built with afterwards:
-- a running daemon would go on folding with the newer definition. Runs with the
-- caller's rights and search_path (which must be the daemon's); identifiers are
-- quoted with format('%I').
CREATE OR REPLACE FUNCTION pgfold.swap_back(projector text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  retired text := 'pgfold_retired_' || swap_back.projector;
  scratch text := 'pgfold_swap_back_' || swap_back.projector;
  p record;
  t record;
  live_ahead jsonb;
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock(
    pg_catalog.hashtextextended('pgfold:projector:' || swap_back.projector, 0));
  SELECT * INTO p FROM pgfold.projectors pr WHERE pr.name = swap_back.projector FOR UPDATE;
  IF NOT FOUND OR p.retired_position_id IS NULL
     OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = retired) THEN
    RAISE EXCEPTION 'projector % has no retired projection to swap back to',
      pg_catalog.quote_literal(swap_back.projector)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE format('CREATE SCHEMA %I', scratch);
  FOR t IN
    SELECT c.relname, l.oid IS NOT NULL AS has_live,
           coalesce(ln.nspname, current_schema()) AS live_schema
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_catalog.pg_class l ON l.oid = to_regclass(quote_ident(c.relname))
      LEFT JOIN pg_catalog.pg_namespace ln ON ln.oid = l.relnamespace
     WHERE n.nspname = retired AND c.relkind IN ('r', 'p')
  LOOP
    IF t.has_live THEN
      EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', t.live_schema, t.relname, scratch);
    END IF;
    EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', retired, t.relname, t.live_schema);
  END LOOP;
  FOR t IN
    SELECT c.relname FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = scratch AND c.relkind IN ('r', 'p')
  LOOP
    EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', scratch, t.relname, retired);
  END LOOP;
  EXECUTE format('DROP SCHEMA %I', scratch);
  SELECT coalesce(jsonb_agg(jsonb_build_object('event_id', a.event_id,
                                               'position_tx', a.position_tx::text)), '[]')
    INTO live_ahead
    FROM pgfold.delivered_ahead a WHERE a.projector = swap_back.projector;
  DELETE FROM pgfold.delivered_ahead a WHERE a.projector = swap_back.projector;
  INSERT INTO pgfold.delivered_ahead (projector, event_id, position_tx)
  SELECT swap_back.projector, (r->>'event_id')::bigint, (r->>'position_tx')::xid8
    FROM jsonb_array_elements(coalesce(p.retired_ahead, '[]')) r;
  UPDATE pgfold.projectors pr
     SET position_tx = p.retired_position_tx, position_id = p.retired_position_id,
         fingerprint = p.retired_fingerprint,
         retired_position_tx = p.position_tx, retired_position_id = p.position_id,
         retired_fingerprint = p.fingerprint, retired_ahead = live_ahead,
         state = 'running', failing_event_id = NULL, failing_event_type = NULL,
         attempts = 0, updated_at = now()
   WHERE pr.name = swap_back.projector;
END
$$;
