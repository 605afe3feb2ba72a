-- What `pgfold status` needs to show a replay's rate and ETA: when it began. The
-- events applied since are `events_applied`, which a replay resets to 0.
ALTER TABLE pgfold.projectors ADD COLUMN IF NOT EXISTS replay_started_at TIMESTAMPTZ;

-- Set by the database rather than by the daemon, so that a replay started by an
-- older pgfold, one that does not know the column, gets its start time too (and
-- never shows the previous replay's): a rewind is the one update that leaves a
-- projector replaying at position 0.
CREATE OR REPLACE FUNCTION pgfold.stamp_replay_start() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.state = 'replaying' AND NEW.position_id = 0 AND NEW.position_tx = '0' THEN
    NEW.replay_started_at := now();
  END IF;
  RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER pgfold_replay_started
  BEFORE UPDATE OF state, position_id, position_tx ON pgfold.projectors
  FOR EACH ROW EXECUTE FUNCTION pgfold.stamp_replay_start();
