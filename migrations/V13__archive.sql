-- Retention: events moved out of the table into Parquet segments in object storage
-- (see src/archive). Everything here is new; the only DDL on `events` is the append
-- guard's trigger, created under the migrator's short lock_timeout and retried like
-- V4's and V7's triggers.

-- One row per segment, written in the transaction that deletes its events from the
-- table: a segment is either recorded with its rows gone, or not recorded with its
-- rows still in the table (an object uploaded but never recorded is ignored).
CREATE TABLE IF NOT EXISTS pgfold.archive_segments (
  segment     BIGSERIAL PRIMARY KEY,
  first_id    BIGINT NOT NULL,
  last_id     BIGINT NOT NULL,
  events      BIGINT NOT NULL,
  -- The object's size, and the SHA-256 of its bytes (hex).
  bytes       BIGINT NOT NULL,
  checksum    TEXT NOT NULL,
  object_key  TEXT NOT NULL UNIQUE,
  created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Streams with events in the archive: the last archived sequence, the segment that
-- holds it (and the first that holds any of them: `archive show` reads those
-- between), and whether the stream left whole (then it takes no more events).
CREATE TABLE IF NOT EXISTS pgfold.archived_streams (
  stream_id     TEXT PRIMARY KEY,
  last_sequence BIGINT NOT NULL,
  segment       BIGINT NOT NULL REFERENCES pgfold.archive_segments (segment),
  whole         BOOLEAN NOT NULL,
  first_segment BIGINT NOT NULL REFERENCES pgfold.archive_segments (segment)
);

-- The last pass, for status: when, what it moved, and what held it back.
CREATE TABLE IF NOT EXISTS pgfold.archive_passes (
  id          INT PRIMARY KEY CHECK (id = 1),
  finished_at TIMESTAMPTZ NOT NULL,
  segments    BIGINT NOT NULL,
  events      BIGINT NOT NULL,
  bytes       BIGINT NOT NULL,
  held_back_by TEXT
);

-- The highest segment each projector has consumed, through the archive (a replay,
-- a rebuild, a new projector) or through the table before the segment left it.
-- A pass records a segment only while every projector is past its events, and
-- raises every row to it in the same transaction; a row rewound or new starts at
-- 0 and reads the segments first (src/worker/archived.rs).
ALTER TABLE pgfold.projectors ADD COLUMN IF NOT EXISTS archive_applied BIGINT NOT NULL DEFAULT 0;

-- The last sequence of a stream across the archive and the table: what an
-- application's `currentMax` must be once a stream has events in the archive.
CREATE OR REPLACE FUNCTION pgfold.stream_head(p_stream_id TEXT) RETURNS BIGINT
LANGUAGE sql STABLE AS $$
  SELECT greatest(coalesce((SELECT max(e.sequence) FROM events e WHERE e.stream_id = p_stream_id), 0),
                  coalesce((SELECT a.last_sequence FROM pgfold.archived_streams a
                             WHERE a.stream_id = p_stream_id), 0))
$$;

-- The append guard. A stream archived whole has no row left in the table for the
-- unique (stream_id, sequence) index to object to, so an append computing
-- `currentMax + 1` would start it again at 1. It fails with 55000
-- (object_not_in_prerequisite_state), never 23505: an optimistic writer retries
-- on 23505, and would retry forever. An append into the archived prefix of a
-- stream archived in part is the conflict the unique index would have raised,
-- and raises it (23505), so that the writer reloads and retries as usual.
-- One primary-key probe of pgfold.archived_streams per inserted row, once archiving
-- has begun.
CREATE OR REPLACE FUNCTION pgfold.guard_archived_append() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  a pgfold.archived_streams%ROWTYPE;
BEGIN
  SELECT * INTO a FROM pgfold.archived_streams WHERE stream_id = NEW.stream_id;
  IF NOT FOUND THEN
    RETURN NEW;
  END IF;
  IF a.whole THEN
    RAISE EXCEPTION 'stream % is archived (whole, last sequence %): it takes no more events',
      NEW.stream_id, a.last_sequence
      USING ERRCODE = '55000',
            HINT = 'pgfold.stream_head(stream_id) gives the last sequence across the archive and the table';
  END IF;
  IF NEW.sequence <= a.last_sequence THEN
    RAISE EXCEPTION 'duplicate key value violates unique constraint "idx_events_stream_sequence"'
      USING ERRCODE = '23505', CONSTRAINT = 'idx_events_stream_sequence',
            DETAIL = format('Key (stream_id, sequence)=(%s, %s) is in the archive (archived up to sequence %s).',
                            NEW.stream_id, NEW.sequence, a.last_sequence);
  END IF;
  RETURN NEW;
END
$$;

-- The trigger that runs it is created by the first archive pass, before it
-- deletes anything (src/archive/pass.rs): a deployment that never archives pays
-- nothing on its appends, and this migration takes no lock on events.

-- Every writer of events runs the guard, whatever its role.
GRANT SELECT ON pgfold.archived_streams TO PUBLIC;
