//! Getting the database ready for a run: which projectors, the schema, each
//! projector's tables and row, and the replays asked for.
//!
//! [`migrate`] is all of `pgfold migrate` (it needs DDL rights); [`prepare`] is
//! what a daemon does once connected, before its first batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::RunOptions;
use crate::archive::{Check, FetchError};
use crate::bookkeeping::{self as checkpoint, record_fingerprint};
use crate::config::Settings;
use crate::db;
use crate::feed::{self, Position};
use crate::ops::progress::{Progress, Words};
use crate::projector::{Projector, ProjectorError, Registry, Tx};
use crate::util::{one_line, Backoff};

/// How the check of the archive before a replay shows in the progress.
const CHECK_LABEL: &str = "archive check";

/// Selects the projectors to run: `--projector` names, or every enabled one.
/// Unknown names, in the options or the configuration, are errors.
pub fn select(
    settings: &Settings,
    registry: &Registry,
    options: &RunOptions,
) -> anyhow::Result<Vec<Arc<dyn Projector>>> {
    for name in settings.projectors.keys() {
        if registry.get(name).is_none() {
            anyhow::bail!(
                "invalid configuration: unknown projector {:?} in [projectors] (known: {})",
                name,
                registry.names().join(", ")
            );
        }
    }
    let replay = registry.resolve(&options.replay)?;
    let rebuild = registry.resolve(&options.rebuild)?;
    if let Some(name) = options
        .rebuild
        .iter()
        .find(|n| registry.get(n).is_some_and(|p| !p.has_tables()))
    {
        anyhow::bail!(
            "{name} is a sink: it has no tables to rebuild beside the live ones; use --replay {name} to publish every event again"
        );
    }
    if let Some(p) = rebuild
        .iter()
        .find(|p| replay.iter().any(|r| r.name() == p.name()))
    {
        anyhow::bail!(
            "projector {} cannot be both replayed and rebuilt in one run",
            p.name()
        );
    }
    let mut selected = if options.projectors.is_empty() {
        registry
            .iter()
            .filter(|p| settings.projector(p.name()).enabled)
            .cloned()
            .collect()
    } else {
        registry.resolve(&options.projectors)?
    };
    // A replayed or rebuilt projector runs, even if it was not otherwise selected.
    for p in replay
        .into_iter()
        .chain(rebuild.into_iter().filter(|p| p.has_tables()))
    {
        if !selected.iter().any(|q| q.name() == p.name()) {
            selected.push(p);
        }
    }
    Ok(selected)
}

/// Migrates the database and creates every registered projector's tables: what
/// `pgfold migrate` does, and needs DDL rights.
pub async fn migrate(pg: &db::PgConfig, registry: &Registry) -> anyhow::Result<()> {
    let mut client = db::connect(pg).await?;
    db::migrate::run(&client).await?;
    let all: Vec<Arc<dyn Projector>> = registry.iter().cloned().collect();
    validate(&mut client, &all).await?;
    for p in registry.iter() {
        setup(&mut client, p.as_ref()).await?;
    }
    Ok(())
}

/// Prepares `selected` for a run over `client`: migrates if needed, creates
/// missing projector tables, records filters, retries parked projectors, rewinds
/// those to replay, and starts the progress of every catch-up worth showing.
/// Returns the newest position committed now.
pub(super) async fn prepare(
    client: &mut db::Client,
    registry: &Registry,
    options: &RunOptions,
    selected: &[Arc<dyn Projector>],
    progress: &Progress,
    (settings, archive): (&Settings, Option<&crate::archive::Store>),
    token: &CancellationToken,
) -> anyhow::Result<Option<Position>> {
    if !db::migrate::is_current(client).await? {
        db::migrate::run(client)
            .await
            .context("the database needs migrating and this role cannot (run `pgfold migrate` with a role that has DDL rights)")?;
    }
    validate(client, selected).await?;
    let checked = check_archive(
        client,
        (settings, progress),
        registry,
        options,
        selected,
        (archive, token),
    )
    .await?;
    if checked == Checked::Stopped {
        return Ok(None);
    }
    for p in selected {
        if !checkpoint::exists(client, p.name()).await? {
            setup(client, p.as_ref()).await?;
        }
        checkpoint::record_filter(client, p.as_ref()).await?;
        if checkpoint::unpark(client, p.name()).await? {
            tracing::info!(projector = p.name(), "retrying a parked projector");
        }
    }
    let replay = registry.resolve(&options.replay)?;
    for p in &replay {
        rewind(client, p.as_ref()).await?;
    }
    let newest = feed::newest(client).await?.unwrap_or(Position::START);
    // A replay, or a --once run, is a catch-up worth showing progress for.
    for p in selected {
        if options.once || replay.iter().any(|r| r.name() == p.name()) {
            let from = checkpoint::position_id(client, p.name()).await?;
            progress.begin(p.name(), from, newest.id);
        }
    }
    Ok(Some(newest))
}

/// How [`check_archive`] ended, if not in an error.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Checked {
    /// Nothing stands in the way of the replays asked for.
    Ready,
    /// Shutdown came while the store was unreachable: nothing was checked in
    /// full, and nothing may be emptied.
    Stopped,
}

/// Before anything is emptied: checks the archive settings against the server,
/// warns about SQL projections that read `events` themselves beside archiving,
/// and, when a projector is to be replayed or rebuilt from the first event,
/// fetches and verifies every archived segment, so that a missing or corrupt one
/// stops the run here, in one line naming it. A store that does not answer is
/// retried with backoff, as the workers retry it: nothing has been emptied yet
/// (with `--once`, for at most `daemon.connect_timeout_ms`).
pub(super) async fn check_archive(
    client: &db::Client,
    (settings, progress): (&Settings, &Progress),
    registry: &Registry,
    options: &RunOptions,
    selected: &[Arc<dyn Projector>],
    (store, token): (Option<&crate::archive::Store>, &CancellationToken),
) -> anyhow::Result<Checked> {
    if let Some(archive) = &settings.archive {
        crate::archive::check_policies(client, &archive.policy).await?;
        for p in selected.iter().filter(|p| p.reads_events()) {
            tracing::warn!(
                projector = p.name(),
                "this projection reads `events` itself, beside archiving: while a replay or rebuild reads the archive, those reads see only what is still in the table"
            );
        }
    }
    let from_first: Vec<_> = registry
        .resolve(&options.replay)?
        .into_iter()
        .chain(registry.resolve(&options.rebuild)?)
        .filter(|p| settings.projector(p.name()).history == crate::config::History::All)
        .collect();
    if from_first.is_empty() {
        return Ok(Checked::Ready);
    }
    let segments = crate::archive::segments(client, 0).await?;
    if segments.is_empty() {
        return Ok(Checked::Ready);
    }
    let store = store.with_context(|| {
        format!(
            "the archive holds {} segment(s) that a replay must read, and [archive] url is not set",
            segments.len()
        )
    })?;
    // Every segment is fetched whole (its size, checksum and ids checked): for a
    // large archive in object storage, the first long wait of the replay.
    let total: i64 = segments.iter().map(|s| s.events).sum();
    progress.begin_as(CHECK_LABEL, 0, total, Words::CHECK);
    let give_up_after = options.once.then(|| settings.daemon.connect_timeout());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut checked = 0;
    crate::archive::test_pause("replay-check");
    for s in &segments {
        let mut failing_since = None;
        loop {
            match crate::archive::fetch_verified(store, s, Check::Footer).await {
                Ok(_) => break,
                Err(FetchError::Unavailable(why)) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if let Some(limit) = give_up_after.filter(|l| since.elapsed() >= *l) {
                        anyhow::bail!(
                            "the archive's store has been unavailable for {} ms (daemon.connect_timeout_ms), before the replay: {why}",
                            limit.as_millis()
                        );
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %why,
                        retry_in_ms = delay.as_millis() as u64,
                        "archive check: archive error; retrying"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = token.cancelled() => {
                            progress.finish(CHECK_LABEL);
                            return Ok(Checked::Stopped);
                        }
                    }
                }
                Err(e @ FetchError::Bad(_)) => return Err(e.into()),
            }
        }
        backoff.reset();
        checked += s.events;
        progress.advance(CHECK_LABEL, checked, s.events as u64);
    }
    progress.finish(CHECK_LABEL);
    tracing::info!(
        segments = segments.len(),
        "archived segments verified before the replay"
    );
    Ok(Checked::Ready)
}

/// Checks every projector's statements against the database before anything
/// runs (see [`Projector::validate`]): in one transaction, rolled back, after
/// creating the tables of those that have none yet. The first error stops the
/// command, and nothing has changed.
async fn validate(
    client: &mut db::Client,
    projectors: &[Arc<dyn Projector>],
) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    for p in projectors {
        let t = Tx::new(&tx);
        let outcome = async {
            if !checkpoint::exists(&tx, p.name()).await? {
                p.setup(&t).await?;
            }
            p.validate(&t).await
        };
        outcome.await.map_err(|e| match e {
            // A SQL projection's errors name its file and statement already.
            ProjectorError::Other(e) => e,
            e => anyhow::anyhow!("projector {}: {}", p.name(), one_line(&e.to_string())),
        })?;
    }
    // Dropped: rolled back.
    Ok(())
}

/// Creates the projector's tables and its row, in one transaction.
async fn setup(client: &mut db::Client, p: &dyn Projector) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    p.setup(&Tx::new(&tx))
        .await
        .with_context(|| format!("failed to create the tables of projector {}", p.name()))?;
    if checkpoint::register(&tx, p.name()).await? {
        record_fingerprint(&tx, p).await?;
    }
    checkpoint::record_filter(&tx, p).await?;
    tx.commit().await?;
    Ok(())
}

/// Empties a projector and rewinds it to the first event, under its lock.
async fn rewind(client: &mut db::Client, p: &dyn Projector) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    checkpoint::lock(&tx, p.name()).await?;
    let target = feed::newest(&tx).await?;
    p.reset(&Tx::new(&tx))
        .await
        .with_context(|| format!("failed to reset projector {}", p.name()))?;
    checkpoint::rewind(&tx, p.name(), target).await?;
    record_fingerprint(&tx, p).await?;
    tx.commit().await?;
    tracing::info!(projector = p.name(), "replaying from the first event");
    Ok(())
}
