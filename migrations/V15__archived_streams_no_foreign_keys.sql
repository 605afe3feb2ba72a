-- An archive pass records up to 100,000 streams per segment in
-- pgfold.archived_streams, in the transaction that deletes the segment's rows. Each
-- of V13's two foreign keys to pgfold.archive_segments ran a trigger and a lookup
-- per inserted row: about 7 µs a row, a second and more per million-event pass,
-- spent proving that a row points at the segment inserted a moment earlier in the
-- same transaction.
--
-- Nothing relies on them: archive_segments rows are never deleted or renumbered,
-- and every row of archived_streams is written by the transaction that inserts the
-- segment it names. An older pgfold beside this one writes the same rows the same
-- way and never depended on an error from them.
--
-- Dropping a foreign key locks both tables. Writers to `events` read
-- archived_streams through the append guard, so the lock is asked for briefly and
-- the migration retried rather than left to queue them.
SET LOCAL lock_timeout = '50ms';
ALTER TABLE pgfold.archived_streams
  DROP CONSTRAINT IF EXISTS archived_streams_segment_fkey,
  DROP CONSTRAINT IF EXISTS archived_streams_first_segment_fkey;
