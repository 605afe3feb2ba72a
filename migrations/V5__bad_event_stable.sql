-- STABLE rather than the default VOLATILE: pgfold.bad_event reads and writes
-- nothing, it only raises. A volatile call keeps PostgreSQL from inlining the
-- common table expression it sits in, and a rebuild's CTE of every item of every
-- event then spills to temporary files.
ALTER FUNCTION pgfold.bad_event(BIGINT, TEXT) STABLE;
