//! The swap: one transaction that puts a caught-up build in place of the live
//! projection.
//!
//! 1. Take the live projector's advisory lock (the one every batch takes, so no
//!    batch of it runs meanwhile, in any instance) and the build's; re-check,
//!    under them, that the build has nothing left below the horizon. If it has,
//!    nothing is changed: the build applies it and the swap is tried again.
//! 2. Before any exclusive lock: copy the grants of each live table onto its new
//!    table, move the live checkpoint to the build's position (with its
//!    delivered-ahead events and dead letters) and delete the build's, and empty
//!    the retired schema (the copy the previous rebuild left).
//! 3. With `lock_timeout` at [`LOCK_TIMEOUT`]: move each live table into
//!    `pgfold_retired_<name>` and the build's into the live table's schema
//!    (`ALTER TABLE … SET SCHEMA`: a catalog update, whatever the table's size),
//!    drop the empty build schema, commit. The live tables' exclusive locks are
//!    taken first (`LOCK TABLE`), so the span they are held is measured apart
//!    from the wait for them: a reader in the way makes the attempt fail after
//!    [`LOCK_TIMEOUT`], rather than queue every later reader behind a long wait,
//!    and the caller retries with backoff. Readers arriving meanwhile wait at most
//!    the wait plus the hold.
//!
//! A view (or materialized view) on a live table would keep pointing at the
//! retired copy, so the swap is refused with one line naming them. Every
//! identifier in the statements is quoted by the server (`format('%I')`).

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::{build_schema, key, retired_schema};
use crate::bookkeeping::{self as checkpoint, State};
use crate::db::{Db, Pool};
use crate::feed;
use crate::projector::{Fold, Projector};

/// How long an `ALTER TABLE` of the swap waits for readers before the attempt is
/// given up and retried.
pub const LOCK_TIMEOUT: &str = "50ms";

/// What one swap attempt did.
#[derive(Debug)]
pub enum Outcome {
    /// Swapped.
    Swapped {
        /// How long it queued for the live tables' exclusive locks (behind readers).
        wait: Duration,
        /// How long it then held them, until the commit.
        held: Duration,
    },
    /// The build has events left to apply below the horizon.
    Pending,
    /// A batch of the live projector or of the build holds its lock.
    Busy,
    /// A reader held a live table past [`LOCK_TIMEOUT`].
    LockTimeout,
    /// The swap cannot be made as things stand (one line, why).
    Refused(String),
}

/// Tries the swap once.
pub async fn attempt(pool: &Pool, p: &dyn Projector) -> anyhow::Result<Outcome> {
    let name = p.name();
    let (key, build, retired) = (key(name), build_schema(name), retired_schema(name));
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    if !checkpoint::try_lock(&tx, name).await? || !checkpoint::try_lock(&tx, &key).await? {
        return Ok(Outcome::Busy);
    }
    // As a batch does: the checkpoint after the locks, the horizon before the read.
    let ck = checkpoint::load(&tx, &key).await?;
    // Another instance may have started the build afresh for another definition.
    if !ck.built_with(&p.fingerprint()) {
        return Ok(Outcome::Busy);
    }
    if ck.state == State::Failed {
        return Ok(Outcome::Pending);
    }
    let horizon = feed::horizon(&tx).await?;
    let pending = match p.fold() {
        Fold::Events(_) => !feed::read_events(&tx, ck.position, horizon, &p.filter(), 1, i64::MAX)
            .await?
            .rows
            .is_empty(),
        Fold::Set(_) | Fold::StreamSet(_) => {
            feed::set_batch_end(&tx, ck.position, Some(horizon), 1, true)
                .await?
                .is_some()
        }
    };
    if pending {
        return Ok(Outcome::Pending);
    }

    let plan = tx
        .query_one(
            "WITH t AS (
               SELECT b.oid AS build_oid, b.relname, b.relowner, l.oid AS live_oid,
                      coalesce(ln.nspname, current_schema()) AS live_schema
                 FROM pg_class b
                 JOIN pg_namespace bn ON bn.oid = b.relnamespace
                 LEFT JOIN pg_class l ON l.oid = to_regclass(quote_ident(b.relname))
                 LEFT JOIN pg_namespace ln ON ln.oid = l.relnamespace
                WHERE bn.nspname = $1 AND b.relkind IN ('r', 'p')
             )
             SELECT
               (SELECT string_agg(DISTINCT format('%I.%I', vn.nspname, v.relname), ', ')
                  FROM pg_depend d
                  JOIN pg_rewrite r ON r.oid = d.objid
                  JOIN pg_class v ON v.oid = r.ev_class
                  JOIN pg_namespace vn ON vn.oid = v.relnamespace
                 WHERE d.classid = 'pg_rewrite'::regclass
                   AND d.refclassid = 'pg_class'::regclass
                   AND d.refobjid IN (SELECT live_oid FROM t WHERE live_oid IS NOT NULL)
                   AND v.oid NOT IN (SELECT live_oid FROM t WHERE live_oid IS NOT NULL)),
               (SELECT string_agg(format('GRANT %s ON TABLE %I.%I TO %s%s',
                         a.privilege_type, $1::text, t.relname,
                         CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                              ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                         CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END), '; ')
                  FROM t JOIN pg_class l ON l.oid = t.live_oid
                  CROSS JOIN LATERAL aclexplode(l.relacl) a
                 WHERE a.grantee <> t.relowner),
               (SELECT string_agg(format('ALTER TABLE %I.%I SET SCHEMA %I',
                                         live_schema, relname, $2::text), '; ')
                  FROM t WHERE live_oid IS NOT NULL),
               (SELECT string_agg(format('ALTER TABLE %I.%I SET SCHEMA %I',
                                         $1::text, relname, live_schema), '; ')
                  FROM t),
               format('SET LOCAL lock_timeout = %L; DROP SCHEMA IF EXISTS %I CASCADE; CREATE SCHEMA %I',
                      $3::text, $2::text, $2::text),
               format('DROP SCHEMA %I CASCADE', $1::text),
               (SELECT count(*) FROM t WHERE live_schema IS NULL),
               (SELECT format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE',
                              string_agg(format('%I.%I', live_schema, relname), ', '))
                  FROM t WHERE live_oid IS NOT NULL)",
            &[&build, &retired, &LOCK_TIMEOUT],
        )
        .await?;
    let views: Option<String> = plan.get(0);
    let grants: Option<String> = plan.get(1);
    let retire: Option<String> = plan.get(2);
    let Some(install) = plan.get::<_, Option<String>>(3) else {
        return Ok(Outcome::Refused(format!(
            "cannot swap in the rebuilt {name}: the build schema {build} holds no table"
        )));
    };
    let prepare_retired: String = plan.get(4);
    let drop_build: String = plan.get(5);
    let lock: Option<String> = plan.get(7);
    if plan.get::<_, i64>(6) > 0 {
        return Ok(Outcome::Refused(format!(
            "cannot swap in the rebuilt {name}: no schema on the search_path to put its new tables in"
        )));
    }
    if let Some(views) = views {
        return Ok(Outcome::Refused(format!(
            "cannot swap in the rebuilt {name}: views depend on its tables ({views}); drop them, let the swap run, then create them again"
        )));
    }

    let prepared = async {
        if let Some(grants) = &grants {
            tx.batch_execute(grants).await?;
        }
        move_checkpoint(&tx, name, &key).await?;
        tx.batch_execute(&prepare_retired).await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    if let Err(e) = prepared.await {
        return classify(name, e);
    }
    // Queue for the live tables' exclusive locks (at most LOCK_TIMEOUT, behind
    // the readers that hold them), then hold them only for the moves and commit.
    let waited = Instant::now();
    if let Some(lock) = &lock {
        if let Err(e) = tx.batch_execute(lock).await {
            return classify(name, e);
        }
    }
    let wait = waited.elapsed();
    let held = Instant::now();
    let swapped = async {
        let mut moves = retire.map(|r| r + "; ").unwrap_or_default();
        moves.push_str(&install);
        moves.push_str("; ");
        moves.push_str(&drop_build);
        tx.batch_execute(&moves).await?;
        tx.commit().await
    };
    match swapped.await {
        Ok(()) => Ok(Outcome::Swapped {
            wait,
            held: held.elapsed(),
        }),
        Err(e) => classify(name, e),
    }
}

/// Lock timeouts (and deadlocks) are retried; a missing privilege is not going to
/// fix itself; anything else is an error to retry with backoff.
fn classify(name: &str, e: tokio_postgres::Error) -> anyhow::Result<Outcome> {
    match e.code() {
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
            Ok(Outcome::LockTimeout)
        }
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => Ok(Outcome::Refused(format!(
            "cannot swap in the rebuilt {name}: {} (the swap moves the live tables: run it as their owner)",
            crate::db::error_text(&e)
        ))),
        _ => Err(anyhow::anyhow!(crate::util::one_line(&crate::db::error_text(&e)))),
    }
}

/// The live projector takes the build's checkpoint, delivered-ahead events, dead
/// letters and fingerprint, and keeps the retired tables' checkpoint beside it
/// (`retired_*`, for swapping back); the build's row goes.
async fn move_checkpoint<C: Db>(
    tx: &C,
    name: &str,
    key: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE pgfold.projectors l
            SET retired_position_tx = l.position_tx, retired_position_id = l.position_id,
                retired_fingerprint = l.fingerprint,
                retired_ahead = (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                   'event_id', a.event_id, 'position_tx', a.position_tx::text)), '[]')
                                   FROM pgfold.delivered_ahead a WHERE a.projector = l.name),
                position_tx = b.position_tx, position_id = b.position_id,
                events_applied = b.events_applied, last_advanced_at = b.last_advanced_at,
                fingerprint = b.fingerprint, state = 'running',
                failing_event_id = NULL, failing_event_type = NULL, attempts = 0,
                last_error = b.last_error, last_error_at = b.last_error_at,
                replay_target_tx = NULL, replay_target_id = NULL, updated_at = now()
           FROM pgfold.projectors b
          WHERE l.name = $1 AND b.name = $2",
        &[&name, &key],
    )
    .await?;
    for sql in [
        "DELETE FROM pgfold.delivered_ahead WHERE projector = $1 AND $2::text IS NOT NULL",
        "UPDATE pgfold.delivered_ahead SET projector = $1 WHERE projector = $2",
        "DELETE FROM pgfold.dead_letters WHERE projector = $1 AND $2::text IS NOT NULL",
        "UPDATE pgfold.dead_letters SET projector = $1 WHERE projector = $2",
        "DELETE FROM pgfold.projectors WHERE name = $2 AND $1::text IS NOT NULL",
    ] {
        tx.execute(sql, &[&name, &key]).await?;
    }
    Ok(())
}
