-- pgfold's own bookkeeping, kept out of the application's schema.

-- One row per projector: its checkpoint (the position of the last event it has
-- consumed) and its health. Written in the same transaction as the projector's own
-- writes, so the projection and its checkpoint never disagree.
CREATE TABLE IF NOT EXISTS pgfold.projectors (
  name              TEXT PRIMARY KEY,
  position_tx       xid8 NOT NULL DEFAULT '0',
  position_id       BIGINT NOT NULL DEFAULT 0,
  state             TEXT NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'replaying', 'failed')),
  events_applied    BIGINT NOT NULL DEFAULT 0,
  last_advanced_at  TIMESTAMPTZ,
  -- The event the projector is stuck on, while it is being retried or once parked.
  failing_event_id  BIGINT,
  failing_event_type TEXT,
  attempts          INT NOT NULL DEFAULT 0,
  last_error        TEXT,
  last_error_at     TIMESTAMPTZ,
  -- Set by a replay: the newest position when it began, so that status can tell
  -- when the rebuild has caught up.
  replay_target_tx  xid8,
  replay_target_id  BIGINT,
  updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Events a projector received ahead of their place in (transaction, id) order,
-- because a later event of the same stream needed them first (see src/feed). They are
-- skipped, and their rows deleted, when the checkpoint passes them.
CREATE TABLE IF NOT EXISTS pgfold.delivered_ahead (
  projector   TEXT NOT NULL REFERENCES pgfold.projectors(name) ON DELETE CASCADE,
  event_id    BIGINT NOT NULL,
  position_tx xid8 NOT NULL,
  PRIMARY KEY (projector, event_id)
);

-- Events a projector with on_error = "skip" gave up on.
CREATE TABLE IF NOT EXISTS pgfold.dead_letters (
  projector   TEXT NOT NULL REFERENCES pgfold.projectors(name) ON DELETE CASCADE,
  event_id    BIGINT NOT NULL,
  event_type  TEXT NOT NULL,
  error       TEXT NOT NULL,
  attempts    INT NOT NULL,
  recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (projector, event_id)
);

-- The wake-up flag. NOTIFY serialises every committing transaction that notified on
-- one cluster-wide lock, so writers notify only while a daemon is idle and waiting
-- ("armed"); a busy daemon is going to read again anyway. Unlogged: it is a hint,
-- rebuilt by the daemon, and not worth WAL.
CREATE UNLOGGED TABLE IF NOT EXISTS pgfold.wakeup (
  id    INT PRIMARY KEY CHECK (id = 1),
  armed BOOLEAN NOT NULL
);
INSERT INTO pgfold.wakeup (id, armed) VALUES (1, false) ON CONFLICT (id) DO NOTHING;

CREATE OR REPLACE FUNCTION pgfold.notify_if_armed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT armed FROM pgfold.wakeup WHERE id = 1) THEN
    PERFORM pg_notify('pgfold_events', '');
  END IF;
  RETURN NULL;
END
$$;

-- Per statement, not per row: a multi-row INSERT wakes the daemon once.
CREATE OR REPLACE TRIGGER pgfold_wakeup
  AFTER INSERT ON events
  FOR EACH STATEMENT EXECUTE FUNCTION pgfold.notify_if_armed();

-- Raised from set-based projector SQL when an event cannot be folded, so that a bad
-- payload is an error that names the event rather than a silently skipped row.
CREATE OR REPLACE FUNCTION pgfold.bad_event(event_id BIGINT, problem TEXT)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'event %: %', event_id, problem USING ERRCODE = 'data_exception';
END
$$;

-- Every writer of events runs the trigger, whatever its role.
GRANT USAGE ON SCHEMA pgfold TO PUBLIC;
GRANT SELECT ON pgfold.wakeup TO PUBLIC;
