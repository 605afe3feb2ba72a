//! Statements prepared once per connection on the hot path.
//!
//! A projector's loop runs the same few statements many times a second while it
//! keeps up with a steady flow of writes; sent as text, each would be parsed and
//! planned by the server every time. Through [`Db`], a pooled connection (or a
//! transaction on one) prepares each statement once and reuses it; a plain client
//! (status, tests) prepares per call, as a text query does.

use async_trait::async_trait;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row};

/// Bound parameters, as tokio-postgres takes them.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

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

    #[doc(hidden)]
    async fn row_count_error(&self) -> Error;
}

macro_rules! cached {
    ($t:ty) => {
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

cached!(deadpool_postgres::Transaction<'_>);
cached!(deadpool_postgres::ClientWrapper);
uncached!(tokio_postgres::Client);
uncached!(tokio_postgres::Transaction<'_>);

async fn row_count_error<C: tokio_postgres::GenericClient>(client: &C) -> Error {
    match client.query_one("SELECT 1 WHERE false", &[]).await {
        Err(e) => e,
        Ok(_) => unreachable!("a query that returns no row cannot return one"),
    }
}
