-- Rebuild without downtime (issue 14).
--
-- `fingerprint`: the definition a projector's tables were built with (a Rust
-- projector's `version`, a SQL projection's hash). NULL on rows written before
-- this migration, or by an older pgfold: adopted as current, never a reason to
-- rebuild.
--
-- A rebuild beside the live projection keeps its own checkpoint in a row of its
-- own, named `<projector>.build` (a dot never appears in a projector's name), so
-- that every piece of bookkeeping (delivered_ahead, dead_letters, the advisory
-- lock) works for it unchanged. `build_of` names the live projector such a row
-- builds; `build_reason` says why, for `status`. An older pgfold reads
-- pgfold.projectors by projector name only, so it never sees these rows.
ALTER TABLE pgfold.projectors
  ADD COLUMN IF NOT EXISTS fingerprint text,
  ADD COLUMN IF NOT EXISTS build_of text,
  ADD COLUMN IF NOT EXISTS build_reason text,
  ADD COLUMN IF NOT EXISTS build_started_at timestamptz;
