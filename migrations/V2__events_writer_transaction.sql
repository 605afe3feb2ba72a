-- Record the writing transaction of every new event: the daemon reads the log in
-- (transaction, id) order below the oldest running transaction, which is what makes
-- it gap-free whatever order concurrent writers commit in.
--
-- Both statements only touch the catalog: a column without a default is added
-- without rewriting the table, and SET DEFAULT applies to new rows only. They run in
-- one transaction so that no row can be inserted between them with a NULL tx_id by
-- a transaction that is still running; rows that already exist keep NULL and are
-- read as transaction 0, before everything written afterwards.
ALTER TABLE events ADD COLUMN IF NOT EXISTS tx_id xid8;
ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id();
