//! Statements prepared once per connection on the hot path.
//!
//! A projector's loop runs the same few statements many times a second while it
//! keeps up with a steady flow of writes; sent as text, each would be parsed and
//! planned by the server every time. Through [`Db`], a pooled connection (or a
//! transaction on one) prepares each statement once and reuses it; a plain client
//! (status, tests) prepares per call, as a text query does.

use async_trait::async_trait;
use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row};

/// Bound parameters, as tokio-postgres takes them.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// What [`Db::for_each_row`] hands each row to: false stops the read.
pub type EachRow<'a> = &'a mut (dyn FnMut(Row) -> bool + Send);

#[async_trait]
pub trait Db: Sync {
    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error>;

    async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            // Let tokio-postgres produce its own error for the wrong row count.
            _ => Err(self.row_count_error().await),
        }
    }

    async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
        let mut rows = self.query(sql, params).await?;
        Ok((!rows.is_empty()).then(|| rows.remove(0)))
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error>;

    /// Hands the rows of `sql` to `each` as they arrive, until it returns false:
    /// for results too large to hold twice (rows and what they decode to). A
    /// pooled transaction reads through a portal in growing chunks, so that the
    /// server computes little beyond the row where `each` stops; a pooled
    /// connection streams the rows; anything else collects them first.
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

    #[doc(hidden)]
    async fn row_count_error(&self) -> Error;
}

macro_rules! cached {
    ($t:ty, $for_each_row:ident) => {
        #[async_trait]
        impl Db for $t {
            async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
                let statement = self.prepare_cached(sql).await?;
                tokio_postgres::GenericClient::query(&**self, &statement, params).await
            }
            async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
                let statement = self.prepare_cached(sql).await?;
                tokio_postgres::GenericClient::execute(&**self, &statement, params).await
            }
            async fn for_each_row(
                &self,
                sql: &str,
                params: Params<'_>,
                each: EachRow<'_>,
            ) -> Result<(), Error> {
                $for_each_row(self, sql, params, each).await
            }
            async fn row_count_error(&self) -> Error {
                row_count_error(&**self).await
            }
        }
    };
}

macro_rules! uncached {
    ($t:ty) => {
        #[async_trait]
        impl Db for $t {
            async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
                tokio_postgres::GenericClient::query(self, sql, params).await
            }
            async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
                tokio_postgres::GenericClient::execute(self, sql, params).await
            }
            async fn row_count_error(&self) -> Error {
                row_count_error(self).await
            }
        }
    };
}

cached!(deadpool_postgres::Transaction<'_>, portal_rows);
cached!(deadpool_postgres::ClientWrapper, streamed_rows);
uncached!(tokio_postgres::Client);
uncached!(tokio_postgres::Transaction<'_>);

async fn row_count_error<C: tokio_postgres::GenericClient>(client: &C) -> Error {
    match client.query_one("SELECT 1 WHERE false", &[]).await {
        Err(e) => e,
        Ok(_) => unreachable!("a query that returns no row cannot return one"),
    }
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
    client: &deadpool_postgres::ClientWrapper,
    sql: &str,
    params: Params<'_>,
    each: EachRow<'_>,
) -> Result<(), Error> {
    let statement = client.prepare_cached(sql).await?;
    let rows = client.query_raw(&statement, params.iter().copied()).await?;
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        if !each(row) {
            break;
        }
    }
    Ok(())
}
