//! How statements are sent: prepared once per connection, or unnamed.
//!
//! A projector's loop runs the same few statements many times a second while it
//! keeps up with a steady flow of writes; sent as text, each would be parsed and
//! planned by the server every time. So by default ([`Statements::Prepared`]) a
//! pooled connection (or a transaction on one) prepares each statement once and
//! reuses it; a dedicated connection prepares per call.
//!
//! A transaction-mode pooler (PgBouncer before 1.21, Supavisor) hands each
//! transaction, and each statement outside one, whichever server connection is
//! free: a statement prepared on one is missing on the next (`prepared
//! statement "s9" does not exist`), or clashes with another client's of the same
//! name (`already exists`). With [`Statements::Unnamed`]
//! (`database.prepared_statements = false`) no named statement is ever sent: each
//! one is parsed, bound and executed as the unnamed statement in a single message
//! batch, which the pooler keeps on one server connection.
//!
//! That form needs the parameters' types up front, which the server infers when it
//! prepares. Rather than make every call site spell them out, they are learned
//! once per SQL text, process-wide, by preparing the statement at the SQL level
//! and reading `pg_prepared_statements` in ONE simple-query message (so a pooler
//! keeps it on one server connection), then `DEALLOCATE`d in the same message.
//! Types inferred from the Rust values instead would differ from the server's
//! inference (a `String` bound where SQL expects `xid8` or `name`), and change
//! what a statement means depending on the mode.
//!
//! [`Session`] carries the mode with the connection: [`super::connect`] and
//! [`super::Pool`] hand out sessions in the mode of the [`super::PgConfig`] they
//! were opened from. Its `query`, `query_one`, `query_opt` and `execute` go
//! through [`Db`], so they shadow tokio-postgres's own (which always prepare a
//! named statement).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, LazyLock, RwLock};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row, SimpleQueryMessage};

/// Bound parameters, as tokio-postgres takes them.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// What [`Db::for_each_row`] hands each row to: false stops the read.
pub type EachRow<'a> = &'a mut (dyn FnMut(Row) -> bool + Send);

/// `database.prepared_statements`: `true` is [`Statements::Prepared`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Statements {
    /// Named statements, prepared once per pooled connection and reused.
    #[default]
    Prepared,
    /// Only the unnamed statement: safe behind a transaction-mode pooler.
    Unnamed,
}

impl Statements {
    /// The mode `database.prepared_statements` asks for.
    pub fn from_setting(prepared_statements: bool) -> Statements {
        if prepared_statements {
            Statements::Prepared
        } else {
            Statements::Unnamed
        }
    }
}

/// Running SQL the way the connection's [`Statements`] mode requires: the
/// daemon's queries, and a projector's through its transaction, go through it. Implemented by [`Session`]s and, preparing per call, by plain
/// tokio-postgres clients and transactions (tests, benchmarks, application code).
#[async_trait]
pub trait Db: Sync {
    /// Every row of `sql`, collected.
    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error>;

    /// Exactly one row; tokio-postgres's own error for none or several.
    async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            // Let tokio-postgres produce its own error for the wrong row count.
            _ => Err(self.row_count_error().await),
        }
    }

    /// The first row, or `None` when there is none.
    async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
        let mut rows = self.query(sql, params).await?;
        Ok((!rows.is_empty()).then(|| rows.remove(0)))
    }

    /// Runs `sql` and returns the number of rows it changed.
    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error>;

    /// Hands the rows of `sql` to `each` as they arrive, until it returns false:
    /// for results too large to hold twice (rows and what they decode to). A
    /// pooled transaction with prepared statements reads through a portal in
    /// growing chunks, so that the server computes little beyond the row where
    /// `each` stops; other sessions stream the rows; anything else collects them
    /// first.
    async fn for_each_row(
        &self,
        sql: &str,
        params: Params<'_>,
        each: EachRow<'_>,
    ) -> Result<(), Error> {
        for row in self.query(sql, params).await? {
            if !each(row) {
                break;
            }
        }
        Ok(())
    }

    /// Does what `sql` needs before it can go in one message (prepare it, or
    /// learn its parameter types), so that statements sent together without
    /// awaiting each other also reach the server in the order they were sent.
    async fn ready(&self, sql: &str, params: Params<'_>) -> Result<(), Error> {
        let _ = (sql, params);
        Ok(())
    }

    /// Runs `sql`, one or more statements separated by semicolons, with the
    /// simple query protocol: no parameters, nothing prepared. For DDL.
    async fn batch_execute(&self, sql: &str) -> Result<(), Error>;

    #[doc(hidden)]
    async fn row_count_error(&self) -> Error;
}

/// A connection, or a transaction on one, with the way its statements are sent.
/// It dereferences to the connection for everything else (`batch_execute`,
/// `simple_query`, ...).
pub struct Session<C> {
    inner: C,
    statements: Statements,
}

impl<C> Session<C> {
    /// Wraps `inner`, sending its statements as `statements` says.
    pub fn new(inner: C, statements: Statements) -> Session<C> {
        Session { inner, statements }
    }

    /// How this session's statements are sent.
    pub fn statements(&self) -> Statements {
        self.statements
    }
}

impl<C> Deref for Session<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.inner
    }
}

impl<C> DerefMut for Session<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.inner
    }
}

impl<C> Session<C>
where
    Session<C>: Db,
{
    /// [`Db::query`], in this session's mode.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
        Db::query(self, sql, params).await
    }

    /// [`Db::query_one`], in this session's mode.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        Db::query_one(self, sql, params).await
    }

    /// [`Db::query_opt`], in this session's mode.
    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
        Db::query_opt(self, sql, params).await
    }

    /// [`Db::execute`], in this session's mode.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
        Db::execute(self, sql, params).await
    }
}

impl Session<deadpool_postgres::Object> {
    /// Begins a transaction on the pooled connection, in the same mode; in
    /// [`Statements::Prepared`] it shares the connection's statement cache.
    pub async fn transaction(
        &mut self,
    ) -> Result<Session<deadpool_postgres::Transaction<'_>>, Error> {
        let statements = self.statements;
        Ok(Session::new(self.inner.transaction().await?, statements))
    }
}

impl Session<tokio_postgres::Client> {
    /// Begins a transaction on the dedicated connection, in the same mode.
    pub async fn transaction(&mut self) -> Result<Session<tokio_postgres::Transaction<'_>>, Error> {
        let statements = self.statements;
        Ok(Session::new(self.inner.transaction().await?, statements))
    }
}

macro_rules! commit {
    ($t:ty) => {
        impl Session<$t> {
            /// Commits the transaction; dropping the session instead rolls it back.
            pub async fn commit(self) -> Result<(), Error> {
                self.inner.commit().await
            }
        }
    };
}

commit!(deadpool_postgres::Transaction<'_>);

impl Session<deadpool_postgres::Transaction<'_>> {
    /// Runs `last`, the transaction's last statements, and commits, in one round
    /// trip: the COMMIT leaves right behind them instead of after their answers.
    /// The server runs a connection's messages in the order they arrive, so
    /// `last` must send every statement it runs when first polled, each already
    /// readied ([`Db::ready`]): a statement still being prepared, or one sent
    /// after an answer, would reach the server after the COMMIT, outside the
    /// transaction. If a statement of `last` fails, the server turns the COMMIT
    /// into a rollback, and its error is returned.
    pub async fn commit_behind<T>(
        self,
        last: impl AsyncFnOnce(&Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let (out, committed) = tokio::join!(last(&self), self.inner.batch_execute("COMMIT"));
        let out = out?;
        committed?;
        // The transaction has ended on the server; dropping it would send a
        // ROLLBACK, which PostgreSQL would answer with a warning.
        let Session { inner, .. } = self;
        std::mem::forget(inner);
        Ok(out)
    }
}
commit!(tokio_postgres::Transaction<'_>);

/// `$inner`: the tokio-postgres client or transaction under the session;
/// `$cached`: whether prepared statements are kept per connection (deadpool's
/// cache) rather than prepared per call.
macro_rules! session {
    ($t:ty => $inner:ty, cached: $cached:tt, rows: $rows:ident) => {
        impl Session<$t> {
            fn driver(&self) -> &$inner {
                &self.inner
            }

            async fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement, Error> {
                prepare!(self, sql, $cached)
            }
        }

        #[async_trait]
        impl Db for Session<$t> {
            async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
                let statement = match self.statements {
                    Statements::Unnamed => return unnamed_query(self.driver(), sql, params).await,
                    Statements::Prepared => self.statement(sql).await?,
                };
                GenericClient::query(self.driver(), &statement, params).await
            }
            async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
                let statement = match self.statements {
                    Statements::Unnamed => {
                        return unnamed_execute(self.driver(), sql, params).await
                    }
                    Statements::Prepared => self.statement(sql).await?,
                };
                GenericClient::execute(self.driver(), &statement, params).await
            }
            async fn for_each_row(
                &self,
                sql: &str,
                params: Params<'_>,
                each: EachRow<'_>,
            ) -> Result<(), Error> {
                match self.statements {
                    Statements::Unnamed => unnamed_rows(self.driver(), sql, params, each).await,
                    Statements::Prepared => $rows(&self.inner, sql, params, each).await,
                }
            }
            async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
                GenericClient::batch_execute(self.driver(), sql).await
            }
            async fn ready(&self, sql: &str, params: Params<'_>) -> Result<(), Error> {
                match self.statements {
                    Statements::Unnamed => {
                        parameter_types(self.driver(), sql, params).await.map(drop)
                    }
                    Statements::Prepared => self.statement(sql).await.map(drop),
                }
            }
            async fn row_count_error(&self) -> Error {
                row_count_error(self.driver()).await
            }
        }
    };
}

macro_rules! prepare {
    ($self:ident, $sql:ident, true) => {
        $self.inner.prepare_cached($sql).await
    };
    ($self:ident, $sql:ident, false) => {
        GenericClient::prepare($self.driver(), $sql).await
    };
}

session!(deadpool_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>, cached: true, rows: portal_rows);
session!(deadpool_postgres::Object => tokio_postgres::Client, cached: true, rows: streamed_rows);
session!(tokio_postgres::Client => tokio_postgres::Client, cached: false, rows: per_call_rows);
session!(tokio_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>, cached: false, rows: per_call_rows);

// A plain client outside a session (tests, benchmarks, an application's own
// code): a named statement per call, as tokio-postgres's text queries do.
macro_rules! plain {
    ($t:ty) => {
        #[async_trait]
        impl Db for $t {
            async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
                GenericClient::query(self, sql, params).await
            }
            async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
                GenericClient::execute(self, sql, params).await
            }
            async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
                GenericClient::batch_execute(self, sql).await
            }
            async fn row_count_error(&self) -> Error {
                row_count_error(self).await
            }
        }
    };
}

plain!(tokio_postgres::Client);
plain!(tokio_postgres::Transaction<'_>);

async fn row_count_error<C: GenericClient + Sync>(client: &C) -> Error {
    // Unnamed, so that it is safe in either mode.
    match client.query_typed_one("SELECT 1 WHERE false", &[]).await {
        Err(e) => e,
        Ok(_) => unreachable!("a query that returns no row cannot return one"),
    }
}

async fn unnamed_query<C: GenericClient + Sync>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, Error> {
    let types = parameter_types(client, sql, params).await?;
    client.query_typed(sql, &typed(params, &types)).await
}

async fn unnamed_execute<C: GenericClient + Sync>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<u64, Error> {
    let types = parameter_types(client, sql, params).await?;
    client.execute_typed(sql, &typed(params, &types)).await
}

fn typed<'a>(params: Params<'a>, types: &[Type]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().copied().zip(types.iter().cloned()).collect()
}

/// Parameter types by SQL text, learned from the server once per process.
static PARAMETER_TYPES: LazyLock<RwLock<HashMap<String, Arc<[Type]>>>> =
    LazyLock::new(Default::default);

async fn parameter_types<C: GenericClient + Sync>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Arc<[Type]>, Error> {
    if params.is_empty() {
        // Nothing to learn: a statement without parameters (or one the server
        // will reject for the missing ones) goes as it is.
        return Ok(Arc::from([]));
    }
    if let Some(types) = PARAMETER_TYPES
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(sql)
    {
        return Ok(types.clone());
    }
    // Random, so that a statement left behind (the message failed between PREPARE
    // and DEALLOCATE) never collides with another process's on a shared server
    // connection.
    let name = format!("pgfold_parameter_types_{:016x}", rand::random::<u64>());
    let messages = client
        .client()
        .simple_query(&format!(
            // The line break ends a comment the SQL may end with.
            "PREPARE {name} AS {sql}
             ;
             SELECT parameter_types::oid[]::text FROM pg_prepared_statements WHERE name = '{name}';
             DEALLOCATE {name}"
        ))
        .await?;
    let oids = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default();
    let types: Arc<[Type]> = oids
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .filter(|oid| !oid.is_empty())
        // A type tokio-postgres does not know (an extension's, a projector's own)
        // could only be looked up by a named statement: such a parameter fails
        // with tokio-postgres's error naming it (cast it in the SQL instead).
        .map(|oid| {
            oid.parse()
                .ok()
                .and_then(Type::from_oid)
                .unwrap_or(Type::UNKNOWN)
        })
        .collect();
    PARAMETER_TYPES
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(sql.to_string(), types.clone());
    Ok(types)
}

/// Rows fetched from a portal at first; each further fetch takes four times as
/// many. Small first fetches keep the server from reading (and decompressing)
/// many large rows beyond where the reader stops; a live batch of a few events or
/// a full one of 2,000 small events still takes one to five round trips.
const FIRST_FETCH: i32 = 16;
const LARGEST_FETCH: i32 = 4096;

async fn portal_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: Params<'_>,
    each: EachRow<'_>,
) -> Result<(), Error> {
    let statement = tx.prepare_cached(sql).await?;
    let portal = tx.bind(&statement, params).await?;
    let mut fetch = FIRST_FETCH;
    loop {
        let rows = tx.query_portal_raw(&portal, fetch).await?;
        futures_util::pin_mut!(rows);
        let mut fetched = 0;
        while let Some(row) = rows.try_next().await? {
            fetched += 1;
            if !each(row) {
                return Ok(());
            }
        }
        if fetched < fetch {
            return Ok(());
        }
        fetch = fetch.saturating_mul(4).min(LARGEST_FETCH);
    }
}

async fn streamed_rows(
    client: &deadpool_postgres::Object,
    sql: &str,
    params: Params<'_>,
    each: EachRow<'_>,
) -> Result<(), Error> {
    let statement = client.prepare_cached(sql).await?;
    hand_on(
        client.query_raw(&statement, params.iter().copied()).await?,
        each,
    )
    .await
}

/// Hands streamed rows to `each` until it returns false; the rest are read and
/// dropped by the connection.
async fn hand_on(rows: tokio_postgres::RowStream, each: EachRow<'_>) -> Result<(), Error> {
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        if !each(row) {
            break;
        }
    }
    Ok(())
}

/// A dedicated connection, its statement prepared per call: the rows stream.
async fn per_call_rows<C: GenericClient + Sync>(
    client: &C,
    sql: &str,
    params: Params<'_>,
    each: EachRow<'_>,
) -> Result<(), Error> {
    hand_on(
        GenericClient::query_raw(client, sql, params.iter().copied()).await?,
        each,
    )
    .await
}

/// Unnamed statements have no portal to fetch from in chunks: the rows stream,
/// and those after the one where `each` stops are read and dropped.
async fn unnamed_rows<C: GenericClient + Sync>(
    client: &C,
    sql: &str,
    params: Params<'_>,
    each: EachRow<'_>,
) -> Result<(), Error> {
    let types = parameter_types(client, sql, params).await?;
    hand_on(
        client.query_typed_raw(sql, typed(params, &types)).await?,
        each,
    )
    .await
}
