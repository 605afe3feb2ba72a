-- A pass recorded a stream whose events it cut into several segments twice: at
-- the first, with `segment` open (every segment from `first_segment` on may hold
-- it), and at the last, exactly. On the benchmark's log 145,000 of a pass's
-- 197,000 streams were written twice, and the second write, an update through
-- ON CONFLICT, was 1.2 s of the recording transactions' time.
--
-- `last_id` bounds a stream's archived events by id instead: a pass knows the
-- last event it chose of each stream when it records the first, so it writes
-- the stream once, final (`last_sequence`, `whole`, `last_id`), with `segment`
-- left open when a later segment of the pass holds more of it. `archive show`
-- reads the segments from `first_segment` on whose ids start at or before
-- `last_id`. NULL (rows of an older pgfold) means: bounded by `segment` alone.
--
-- Rolling upgrade: an older pgfold beside this one reads `segment`, which stays
-- a correct bound (open or exact); its passes update `segment` and
-- `last_sequence` without `last_id`, which the trigger below then forgets, so
-- that a stale bound never hides a segment from `archive show`. The trigger fires
-- on updates only, and only when `last_id` is left as it was: a pass of this
-- pgfold, which inserts its streams and sets `last_id` on every update, runs it
-- only in that corner.
--
-- Adding a column with no default locks archived_streams for a moment (no
-- rewrite). Writers to `events` read it through the append guard: asked for
-- briefly and retried, like V15.
SET LOCAL lock_timeout = '50ms';
ALTER TABLE pgfold.archived_streams ADD COLUMN IF NOT EXISTS last_id BIGINT;

CREATE OR REPLACE FUNCTION pgfold.archived_streams_forget_last_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.last_id := NULL;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER pgfold_forget_last_id
  BEFORE UPDATE ON pgfold.archived_streams
  FOR EACH ROW
  WHEN ((NEW.segment, NEW.last_sequence) IS DISTINCT FROM (OLD.segment, OLD.last_sequence)
        AND NEW.last_id IS NOT DISTINCT FROM OLD.last_id)
  EXECUTE FUNCTION pgfold.archived_streams_forget_last_id();
