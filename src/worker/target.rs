//! Where a batch writes: the live tables, or a rebuild's tables beside them.
//!
//! A projector addresses its tables by unqualified name, so a rebuild reaches its
//! new copy by putting the build schema first on the `search_path` of every
//! batch transaction. The worker is handed the target as a value; it never asks
//! `rebuild` where to write.

use crate::db::Db;

/// The checkpoint row a worker keeps its books under, and the tables it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The projector's live tables, under its own checkpoint row (its name).
    Live,
    /// A build beside the live tables: under the checkpoint row `key` (with its
    /// own advisory lock), into the tables found first in `schema`.
    Beside {
        /// The build's checkpoint row.
        key: String,
        /// The schema its tables are in.
        schema: String,
    },
}

impl Target {
    /// The checkpoint row (and advisory lock) of `projector`'s batches here.
    pub fn key(&self, projector: &str) -> String {
        match self {
            Target::Live => projector.to_string(),
            Target::Beside { key, .. } => key.clone(),
        }
    }

    /// Readies a batch transaction to write here.
    pub async fn enter<C: Db>(&self, tx: &C) -> Result<(), tokio_postgres::Error> {
        match self {
            Target::Live => Ok(()),
            Target::Beside { schema, .. } => search_path_first(tx, schema).await,
        }
    }
}

/// For the rest of this transaction: names are looked up in `schema` first, then
/// as the session would. Quoted by the server (`quote_ident`).
pub async fn search_path_first<C: Db>(tx: &C, schema: &str) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT set_config('search_path',
                           quote_ident($1::text) || ', ' || current_setting('search_path'), true)",
        &[&schema],
    )
    .await?;
    Ok(())
}
