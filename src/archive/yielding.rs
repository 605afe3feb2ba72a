//! A pass gives way to the application while it writes.
//!
//! A pass keeps up to two server processes and pgfold busy for seconds at a
//! time. On a small server that is every core, and the application's commits
//! wait for one: with 2,000 appends a second on 2 cores, a writer's p99 during a
//! pass was 2.8–4× its p99 without one. So while the database commits more than
//! [`BUSY_COMMITS_PER_SECOND`] transactions a second, the pass works in short
//! steps of [`BUSY_STEP_ROWS`] rows and rests after each for twice as long as it
//! took: the application gets the cores two thirds of the time, and never
//! waits long behind one step. On a quiet database it runs flat out, in long
//! steps.
//!
//! What the application commits is read from `pg_stat_database`, which each
//! server process updates at most once a second: a pass notices writers, and
//! their end, within about a second.

use std::time::{Duration, Instant};

use super::priority::{self, Process};
use crate::db::Db;

/// Commits a second (the pass's own, a few a second, included) above which the
/// application counts as writing.
pub const BUSY_COMMITS_PER_SECOND: f64 = 50.0;

/// While the application writes, the pass rests this many times as long as
/// each step took: it works a third of the time. Measured with pgbench at 2,000
/// appends a second on 2 cores (`benches/pass_p99.sh`), a writer's
/// p99 during a pass was 12-14 ms unpaced, 8-9 ms resting as long as it
/// worked, 7 ms resting twice as long, against 3.5-4.5 ms without a pass.
const REST_PER_WORK: u32 = 2;

/// Rows a step of the pass takes (events read, streams recorded, rows deleted)
/// while the application is quiet: few statements, each long.
const QUIET_STEP_ROWS: usize = 5_000;

/// …and while it writes: a step of a hundred rows keeps a core a millisecond or
/// so, where one of 5,000 kept it for tens, and every commit that met one
/// waited for it. Measured as above, with steps of 5,000, 250 and 100 rows: a
/// writer's p99 after the choice 6.4, 4.0 and 3.0 ms, against 2.0-2.1 ms
/// without a pass, for a pass of 16, 27 and 43 s under writers (5 s alone).
const BUSY_STEP_ROWS: usize = 100;

/// How often the commit count is read: often enough to notice writers within
/// about a second, rarely enough to add nothing to them.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The rate is taken over at least this long, since the counts arrive in
/// per-process lumps once a second.
const RATE_OVER: Duration = Duration::from_secs(1);

/// Tracks whether the application is writing, and rests the pass when it is.
pub struct Yield {
    /// The oldest sample of the current rate window: when, and the count then.
    window: Option<(Instant, i64)>,
    last_sample: Option<Instant>,
    /// Whether a rate has been measured yet: until then the application's
    /// writing is unknown.
    measured: bool,
    busy: bool,
    /// How long the pass rested, in all.
    rested: Duration,
    /// The pass's threads, whose priority it lowers while the application
    /// writes (see `priority`).
    process: Process,
}

impl Yield {
    /// Nothing measured yet, for a pass in `process`.
    pub fn new(process: Process) -> Yield {
        Yield {
            window: None,
            last_sample: None,
            measured: false,
            busy: false,
            rested: Duration::ZERO,
            process,
        }
    }

    /// After a step of the pass that began at `began`: if the application is
    /// writing, rests [`REST_PER_WORK`] times as long as the step took. `db` is any connection of the
    /// pass that is not in the middle of a streamed read (the count is read on
    /// it).
    pub async fn after<C: Db>(
        &mut self,
        db: &C,
        began: Instant,
    ) -> Result<(), tokio_postgres::Error> {
        let worked = began.elapsed();
        self.sample(db).await?;
        if self.busy {
            let rest = worked * REST_PER_WORK;
            tokio::time::sleep(rest).await;
            self.rested += rest;
        }
        Ok(())
    }

    /// How many rows the next step of the pass takes: fewer while the
    /// application writes.
    pub fn step_rows(&self) -> usize {
        match self.busy {
            true => BUSY_STEP_ROWS,
            false => QUIET_STEP_ROWS,
        }
    }

    /// Whether the application is known to be quiet: a rate was measured, and
    /// it was low.
    pub fn quiet(&self) -> bool {
        self.measured && !self.busy
    }

    /// Reads the commit count now, whenever it was last read: the start of
    /// the first rate window.
    pub async fn start<C: Db>(&mut self, db: &C) -> Result<(), tokio_postgres::Error> {
        self.last_sample = None;
        self.sample(db).await
    }

    /// How long the pass rested for the application, in all.
    pub fn rested(&self) -> Duration {
        self.rested
    }

    async fn sample<C: Db>(&mut self, db: &C) -> Result<(), tokio_postgres::Error> {
        let now = Instant::now();
        if self.last_sample.is_some_and(|t| now - t < SAMPLE_EVERY) {
            return Ok(());
        }
        self.last_sample = Some(now);
        // A transaction keeps the statistics it first read unless told to
        // forget them; the recording transaction samples too.
        db.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
        let commits: i64 = db
            .query_one(
                "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
                  WHERE datname = current_database()",
                &[],
            )
            .await?
            .get(0);
        match self.window {
            Some((since, before)) if now - since >= RATE_OVER => {
                let rate = (commits - before) as f64 / (now - since).as_secs_f64();
                let busy = rate > BUSY_COMMITS_PER_SECOND;
                if busy != self.busy {
                    match busy {
                        true => tracing::info!(
                            commits_per_second = rate as u64,
                            "archive: the application is writing; the pass gives it two thirds of the time, and its cores first"
                        ),
                        false => tracing::info!(
                            commits_per_second = rate as u64,
                            "archive: the application is quiet; the pass runs flat out"
                        ),
                    }
                    priority::follow(&self.process, busy);
                }
                self.busy = busy;
                self.measured = true;
                self.window = Some((now, commits));
            }
            Some(_) => {}
            None => self.window = Some((now, commits)),
        }
        Ok(())
    }
}

/// Whether the application is writing now, from how fast transaction ids are
/// used between two readings a moment apart: for a decision the pass makes
/// before [`Yield`] has measured anything. Unlike `pg_stat_database`'s counts,
/// which arrive once a second, the counter moves as each writing transaction
/// ends; readers use none.
pub struct Writes {
    at: Instant,
    next_xid: i64,
}

/// [`Writes`] reads over at least this long…
const WRITES_OVER: Duration = Duration::from_millis(50);

impl Writes {
    /// Reads the counter now.
    pub async fn mark<C: Db>(db: &C) -> Result<Writes, tokio_postgres::Error> {
        Ok(Writes {
            at: Instant::now(),
            next_xid: next_xid(db).await?,
        })
    }

    /// Whether more than [`BUSY_COMMITS_PER_SECOND`] writing transactions a
    /// second (and more than two in all) ended since the mark, waiting for
    /// [`WRITES_OVER`] to have passed since it.
    pub async fn busy<C: Db>(&self, db: &C) -> Result<bool, tokio_postgres::Error> {
        if let Some(rest) = WRITES_OVER.checked_sub(self.at.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        let ended = next_xid(db).await? - self.next_xid;
        let rate = ended as f64 / self.at.elapsed().as_secs_f64();
        Ok(ended > 2 && rate > BUSY_COMMITS_PER_SECOND)
    }
}

async fn next_xid<C: Db>(db: &C) -> Result<i64, tokio_postgres::Error> {
    Ok(db
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0))
}
