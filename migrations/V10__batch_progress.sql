-- How far a batch still in flight has come (issue 18). A long stream-set
-- catch-up (a replay of order_snapshots) is one transaction applied in parts, so
-- its checkpoint moves only when it commits; after each part the daemon writes
-- here, from another connection and outside the batch's transaction, the batch's
-- progress, for `pgfold status` and the metrics of other instances.
--
-- A row counts only while the checkpoint it started from (`from_tx`, `from_id`)
-- is still the projector's: once the batch commits, or rolls back and a later one
-- commits, it is ignored (and overwritten by the next batch in parts). UNLOGGED:
-- nothing here needs to survive a crash, which rolls the batch back anyway, and
-- the writes cost no WAL. An older pgfold neither writes nor reads it.
CREATE UNLOGGED TABLE IF NOT EXISTS pgfold.batch_progress (
  name text PRIMARY KEY,
  from_tx xid8 NOT NULL,
  from_id bigint NOT NULL,
  position_id bigint NOT NULL,
  events bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
