-- Read your own writes: pgfold.applied and pgfold.wait_for tell an application
-- whether a projector has applied the event it has just appended.

-- Which events each projector consumes, and whether it applies each stream in
-- `sequence` order (Feed::Events, Feed::StreamSet) or as an unordered set
-- (Feed::Set). Written by the daemon when it registers a projector and at every
-- start. NULL (a row an older pgfold wrote) is read conservatively: every event
-- type, every stream type, no order.
ALTER TABLE pgfold.projectors
  ADD COLUMN IF NOT EXISTS event_types text[],
  ADD COLUMN IF NOT EXISTS stream_types text[],
  ADD COLUMN IF NOT EXISTS in_stream_order boolean;

-- The functions are SECURITY DEFINER, so that an application role needs no rights
-- on pgfold's tables or on `events`; with search_path fixed to pg_catalog, every
-- other name in them is qualified. The schema of `events` is resolved here, once,
-- the way V1 created it (the migrating role's search_path).
DO $migration$
DECLARE
  events_table text := (
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = 'events'::regclass);
BEGIN
  EXECUTE replace($fn$
-- The event whose position decides whether (stream_id, sequence) has been applied
-- by the projector. event_tx is NULL when that event does not exist (yet); target
-- is NULL when the projector consumes none of the stream's events up to it.
--
-- A projector that applies each stream in sequence order has applied every earlier
-- event it consumes once it has applied a later one, so the nearest consumed event
-- at or before `sequence` is enough, and an event delivered ahead of its position
-- counts. One that folds unordered sets gives no such promise: it must have passed
-- the latest-positioned consumed event of the stream up to `sequence`.
CREATE OR REPLACE FUNCTION pgfold.applied_target(
  projector text, stream_id text, sequence bigint,
  OUT event_tx xid8, OUT target_tx xid8, OUT target_id bigint, OUT ahead_counts boolean)
LANGUAGE plpgsql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  p record;
BEGIN
  SELECT pr.event_types, pr.stream_types, pr.in_stream_order INTO p
    FROM pgfold.projectors pr WHERE pr.name = applied_target.projector;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown projector %', pg_catalog.quote_literal(applied_target.projector)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT COALESCE(e.tx_id, '0'::xid8) INTO event_tx FROM @events@ e
   WHERE e.stream_id = applied_target.stream_id AND e.sequence = applied_target.sequence;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  ahead_counts := COALESCE(p.in_stream_order, false);
  -- The stream's events are read through (stream_id, sequence) alone, behind an
  -- OFFSET 0 fence: offered the filter too, the planner may combine the index on
  -- stream_type, which covers most of the log, when its statistics are stale.
  IF ahead_counts THEN
    SELECT s.tx, s.id INTO target_tx, target_id FROM (
      SELECT COALESCE(e.tx_id, '0'::xid8) AS tx, e.id, e.event_type, e.stream_type
        FROM @events@ e
       WHERE e.stream_id = applied_target.stream_id AND e.sequence <= applied_target.sequence
       ORDER BY e.sequence DESC OFFSET 0) s
     WHERE (p.event_types IS NULL OR s.event_type = ANY (p.event_types))
       AND (p.stream_types IS NULL OR s.stream_type = ANY (p.stream_types))
     LIMIT 1;
  ELSE
    SELECT s.tx, s.id INTO target_tx, target_id FROM (
      SELECT COALESCE(e.tx_id, '0'::xid8) AS tx, e.id, e.event_type, e.stream_type
        FROM @events@ e
       WHERE e.stream_id = applied_target.stream_id AND e.sequence <= applied_target.sequence
      OFFSET 0) s
     WHERE (p.event_types IS NULL OR s.event_type = ANY (p.event_types))
       AND (p.stream_types IS NULL OR s.stream_type = ANY (p.stream_types))
     ORDER BY s.tx DESC, s.id DESC LIMIT 1;
  END IF;
END
$$;
$fn$, '@events@', events_table);
END
$migration$;

-- Whether the projector has passed the target found by pgfold.applied_target: its
-- checkpoint is at or beyond it (everything at or below a checkpoint has been
-- applied, and nothing appears below it later: positions are only read below the
-- horizon), or it was delivered ahead. One statement, one snapshot: the batch that
-- moves the checkpoint past an event delivered ahead also deletes its row.
CREATE OR REPLACE FUNCTION pgfold.target_passed(
  projector text, target_tx xid8, target_id bigint, ahead_counts boolean)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT target_passed.target_id IS NULL
      OR (target_passed.target_tx, target_passed.target_id) <= (pr.position_tx, pr.position_id)
      OR (target_passed.ahead_counts AND EXISTS (
            SELECT 1 FROM pgfold.delivered_ahead d
             WHERE d.projector = pr.name AND d.event_id = target_passed.target_id))
    FROM pgfold.projectors pr WHERE pr.name = target_passed.projector
$$;

-- True when `projector` has applied every event it consumes of `stream_id` up to
-- and including `sequence` (events it does not consume count as applied, and so do
-- events it gave up on with on_error = "skip"); false otherwise, also when that
-- event does not exist. Reads as of the calling statement's snapshot.
CREATE OR REPLACE FUNCTION pgfold.applied(projector text, stream_id text, sequence bigint)
RETURNS boolean
LANGUAGE plpgsql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  t record;
BEGIN
  t := pgfold.applied_target(projector, stream_id, sequence);
  RETURN t.event_tx IS NOT NULL
     AND pgfold.target_passed(projector, t.target_tx, t.target_id, t.ahead_counts);
END
$$;

-- Waits until pgfold.applied(projector, stream_id, sequence) is true (returns true)
-- or `timeout` passes (returns false). It polls: after one look-up of the event's
-- position, each round reads only the projector's row and delivered_ahead by key,
-- then sleeps 1 ms, growing to 4 ms. Each statement of this VOLATILE function takes
-- a fresh snapshot under READ COMMITTED, so it sees the daemon's commits; it takes
-- no lock beyond those plain reads, and holds only the calling statement's snapshot
-- (which holds back vacuum's horizon, as any statement does) for at most `timeout`.
-- Under REPEATABLE READ or SERIALIZABLE it could never see progress, so it refuses.
CREATE OR REPLACE FUNCTION pgfold.wait_for(
  projector text, stream_id text, sequence bigint, timeout interval DEFAULT '5 seconds')
RETURNS boolean
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  deadline timestamptz := pg_catalog.clock_timestamp() + timeout;
  pause float8 := 0.001;
  t record;
  seen boolean := false;
BEGIN
  IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'pgfold.wait_for needs READ COMMITTED: a % transaction would never see the projection advance',
      pg_catalog.upper(pg_catalog.current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  LOOP
    IF NOT seen THEN
      t := pgfold.applied_target(projector, stream_id, sequence);
      seen := t.event_tx IS NOT NULL;
      IF t.event_tx = pg_catalog.pg_current_xact_id_if_assigned() THEN
        RAISE EXCEPTION 'event % of stream % is not committed yet: call pgfold.wait_for after COMMIT',
          sequence, pg_catalog.quote_literal(stream_id)
          USING ERRCODE = 'invalid_transaction_state';
      END IF;
    END IF;
    IF seen AND pgfold.target_passed(projector, t.target_tx, t.target_id, t.ahead_counts) THEN
      RETURN true;
    END IF;
    IF pg_catalog.clock_timestamp() >= deadline THEN
      RETURN false;
    END IF;
    PERFORM pg_catalog.pg_sleep(LEAST(pause,
      EXTRACT(epoch FROM deadline - pg_catalog.clock_timestamp())::float8));
    pause := LEAST(pause * 2, 0.004);
  END LOOP;
END
$$;

-- Only what an application is given: `GRANT EXECUTE ON FUNCTION pgfold.applied(text,
-- text, bigint), pgfold.wait_for(text, text, bigint, interval) TO app` (USAGE on
-- the schema is PUBLIC's since V4). The helpers are for these two only.
REVOKE ALL ON FUNCTION pgfold.applied_target(text, text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfold.target_passed(text, xid8, bigint, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfold.applied(text, text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgfold.wait_for(text, text, bigint, interval) FROM PUBLIC;
