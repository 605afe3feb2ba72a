//! The transaction every projector method runs in.

use tokio_postgres::Row;

use crate::db::{Db, Params};
use crate::feed::Upcasters;

/// The daemon's transaction, as a projector sees it: setup, reset and every batch
/// alike. Statements are sent as `database.prepared_statements` says: by default
/// prepared once per connection and reused, which spares the server parsing a
/// projector's statement every batch; with `false`, unnamed, which a
/// transaction-mode pooler passes through. Statements are kept by their text, so
/// put values in parameters, never in the SQL.
///
/// There is no commit or rollback here: the daemon commits the projector's writes
/// with its checkpoint.
#[derive(Clone, Copy)]
pub struct Tx<'a> {
    db: &'a dyn Db,
    upcasters: Option<&'a Upcasters>,
}

impl<'a> Tx<'a> {
    /// The daemon wraps its transaction; public so that tests and tools can drive
    /// a projector in a transaction of their own.
    pub fn new(db: &'a dyn Db) -> Tx<'a> {
        Tx {
            db,
            upcasters: None,
        }
    }

    /// This transaction, for a projector whose events are read through
    /// `upcasters`.
    pub(crate) fn with_upcasters<'b>(&self, upcasters: &'b Upcasters) -> Tx<'b>
    where
        'a: 'b,
    {
        Tx {
            db: self.db,
            upcasters: Some(upcasters),
        }
    }

    /// The upcasters the projector's events are read through (see
    /// [`crate::feed::Upcasters`]): a statement that reads `events` itself, rather
    /// than the events it was handed, reads it through
    /// [`Upcasters::layer`] to see the events as the projector does.
    pub fn upcasters(&self) -> Upcasters {
        self.upcasters.cloned().unwrap_or_default()
    }

    /// The rows of `sql`.
    pub async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.db.query(sql, params).await
    }

    /// The one row of `sql`: an error if there are none or several.
    pub async fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, tokio_postgres::Error> {
        self.db.query_one(sql, params).await
    }

    /// The row of `sql`, if any.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        self.db.query_opt(sql, params).await
    }

    /// Runs `sql`; how many rows it wrote.
    pub async fn execute(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        self.db.execute(sql, params).await
    }

    /// Readies `sql` (prepares it, or learns its parameter types) so that
    /// statements sent together, without awaiting each other, run in the order
    /// they were sent: ready each distinct statement before pipelining them.
    pub async fn prepare(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        self.db.ready(sql, params).await
    }

    /// Runs one or more statements without parameters (DDL in `setup`).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.db.batch_execute(sql).await
    }
}
