-- V7's trigger stamps a replay's start, but it called its PL/pgSQL function on
-- every checkpoint move, a hundred times a second per projector while live, to
-- find out that there was nothing to stamp. The same condition as a WHEN clause is
-- tested without calling the function. An older pgfold beside this one behaves
-- the same: only the rewind that starts a replay matches.
CREATE OR REPLACE TRIGGER pgfold_replay_started
  BEFORE UPDATE OF state, position_id, position_tx ON pgfold.projectors
  FOR EACH ROW
  WHEN (NEW.state = 'replaying' AND NEW.position_id = 0 AND NEW.position_tx = '0')
  EXECUTE FUNCTION pgfold.stamp_replay_start();
