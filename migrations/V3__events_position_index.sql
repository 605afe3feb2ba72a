-- pgfold:no-transaction
-- The reading order. Built concurrently so that the application keeps writing while
-- it is built on a populated table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS pgfold_events_position
  ON events ((COALESCE(tx_id, '0'::xid8)), id);
