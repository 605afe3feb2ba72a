-- pgfold.applied_target (behind pgfold.applied and pgfold.wait_for) reads a
-- stream's events by key. PL/pgSQL keeps each statement's plan for the session,
-- and in PostgreSQL's `auto` mode it makes a generic plan after five calls and
-- keeps it: made while `events` is empty (a new deployment), that plan scans
-- the log, and keeps scanning it on every call as the log grows. Planned for
-- each call's values instead, the look-ups go through (stream_id, sequence)
-- whatever size the log had when the session began. Only the function's own
-- setting changes: no lock on `events`.
ALTER FUNCTION pgfold.applied_target(text, text, bigint) SET plan_cache_mode = force_custom_plan;
