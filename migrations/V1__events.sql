-- The application's event store, exactly as the application already has it.
-- On a database that already holds `events` this is a no-op.
CREATE TABLE IF NOT EXISTS events (
  id BIGSERIAL PRIMARY KEY,
  stream_id TEXT NOT NULL,
  stream_type TEXT NOT NULL,
  event_type TEXT NOT NULL,
  event_version INT NOT NULL DEFAULT 1,
  payload JSONB NOT NULL,
  metadata JSONB NOT NULL DEFAULT '{}',
  occurred_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  sequence BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_events_stream_sequence ON events(stream_id, sequence);
CREATE INDEX IF NOT EXISTS idx_events_stream_type_occurred ON events(stream_type, occurred_at);
CREATE INDEX IF NOT EXISTS idx_events_event_type ON events(event_type, occurred_at);
