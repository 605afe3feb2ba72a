-- The append guard of V13, safe against a pass that is recording a segment while
-- a writer appends. Only the function's body changes: no lock on events, no new
-- object, and an older pgfold beside this one runs the same guard (its trigger
-- calls the function by name).
--
-- V13's guard probed pgfold.archived_streams once, before the row reached the
-- unique index. A pass deleting (stream, sequence) in its open recording
-- transaction was invisible to that probe; a stale writer inserting the same key
-- then waited in the unique index for the pass, and once the pass committed the
-- deleted row no longer objected: the key was in the archive and in the table.
--
-- 1. A row with the very key being appended is locked first (FOR KEY SHARE: it
--    waits for a transaction deleting it, and blocks no reader or UPDATE). The
--    probe of archived_streams that follows is a statement of its own and, in READ
--    COMMITTED, reads a snapshot taken after that wait, so it sees what the pass
--    recorded. Under REPEATABLE READ or SERIALIZABLE the lock fails with 40001
--    instead, and the writer's retry meets the probe. An append with no such row
--    (every append that does not conflict) pays one index probe and locks nothing.
--
-- 2. An append with a new sequence racing the recording transaction (the writer
--    read the stream before the pass deleted it) touches no row the pass touches,
--    so nothing orders the two: the pass may record the stream as archived whole
--    while the writer's event, committed a moment later, is in the table. That is
--    a complete history (the archive, then the table, in sequence order: what
--    `archive show` prints and `stream_head` counts), only the `whole` flag is
--    wrong. So a stream counts as archived whole only while the table holds none
--    of its events: then an append after its newest event is taken, and one into
--    its archived part conflicts (23505) as for a stream archived in part, and
--    the article's loop, which reads the newest sequence from the table, retries
--    once and appends after it. The extra probe runs only for appends to streams
--    recorded whole, which are otherwise refused.
CREATE OR REPLACE FUNCTION pgfold.guard_archived_append() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  a pgfold.archived_streams%ROWTYPE;
BEGIN
  PERFORM 1 FROM events e
    WHERE e.stream_id = NEW.stream_id AND e.sequence = NEW.sequence
    FOR KEY SHARE;
  SELECT * INTO a FROM pgfold.archived_streams WHERE stream_id = NEW.stream_id;
  IF NOT FOUND THEN
    RETURN NEW;
  END IF;
  IF a.whole AND NOT EXISTS (SELECT 1 FROM events e WHERE e.stream_id = NEW.stream_id) THEN
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
