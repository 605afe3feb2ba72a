//! SQL projections: read models defined in files of SQL, for teams that do not
//! write Rust.
//!
//! Each `*.toml` file in `daemon.projections_dir` defines one projection, named
//! after the file. Its statements are the operator's, trusted like migrations,
//! and run as the daemon's role inside the daemon's batch transaction, so a SQL
//! projection gets every guarantee a built-in has: exactly-once effect, per-stream
//! order, poison handling, replay, several instances. No event data is ever
//! spliced into them: the relations `batch` and `event` carry it.
//!
//! Checks happen in three places: `trust` refuses a file or directory someone
//! other than pgfold's user or root could change; `file::read` rejects what can
//! be told from the file alone, at load; [`SqlProjection`]'s `validate` parses and plans every
//! statement against the database before anything runs.

mod file;
mod projection;
mod scan;
mod trust;

use std::path::Path;

pub use file::Order;
pub use projection::SqlProjection;

use crate::projector::Registry;

/// Adds the projections of every `*.toml` file in `dir` to `registry`. Errors
/// are one line naming the file; nothing is added unless every file is good.
pub fn load(mut registry: Registry, dir: Option<&Path>) -> anyhow::Result<Registry> {
    let Some(dir) = dir else {
        return Ok(registry);
    };
    trust::check_dir(dir)?;
    let entries = std::fs::read_dir(dir).map_err(|e| {
        anyhow::anyhow!(
            "daemon.projections_dir {}: cannot read it: {e}",
            dir.display()
        )
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| anyhow::anyhow!("daemon.projections_dir {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|x| x == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    // Sorted, so that instances list and start them in the same order.
    paths.sort();
    for path in paths {
        let projection = SqlProjection::new(file::read(&path)?)?;
        registry = registry
            .try_register(projection)
            .map_err(|clash| anyhow::anyhow!("{}: {clash}", path.display()))?;
    }
    Ok(registry)
}
