//! Waking the workers: LISTEN/NOTIFY when it is cheap, polling as the safety net.
//!
//! `pg_notify` makes every committing transaction that notified queue on one
//! cluster-wide lock, which defeats group commit. So the trigger on `events`
//! notifies only while the flag (the sequence `pgfold.wakeup_armed`, migration V9)
//! is set, and the daemon sets it only when its workers have run out of work. The first notification disarms it again:
//! while the daemon is busy it is going to read anyway, and writers pay nothing.
//!
//! Arming has a race: a writer may have checked the flag just before it was set
//! and commit just after the workers' last look. Such a writer has a transaction id
//! below the `xmax` of a snapshot taken after arming (the "fence"), so the waker
//! watches the horizon until it passes the fence, then wakes the workers once
//! more. After that, every writer sees the flag set and notifies.
//!
//! The LISTEN connection is dedicated (a pooled one would be recycled and its
//! notifications lost) and opened from `database.listen_url`, so that it keeps a
//! session behind a transaction-mode pooler; when it drops, the waker reconnects
//! with backoff and wakes the workers, which catch up from their checkpoints. The
//! flag and the horizon go through the pool.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::types::ToSql;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::{self, Pool};
use crate::feed;
use crate::util::Backoff;

/// The channel the wake-up trigger notifies on: spelled here for Rust, and in
/// migration V9 (`pgfold.notify_if_armed`) for SQL. A test
/// (`the_trigger_notifies_the_channel_the_daemon_listens_on_only_when_armed`) keeps them equal.
pub const CHANNEL: &str = "pgfold_events";

/// The workers' side: report idleness, wait for a reason to look again.
#[derive(Clone)]
pub struct Wakeups {
    generation: watch::Receiver<u64>,
    idle: std::sync::Arc<Notify>,
}

impl Wakeups {
    /// Tells the waker that a worker found nothing to do.
    pub fn report_idle(&self) {
        self.idle.notify_one();
    }

    /// Waits until the next wake-up after the last one this handle saw.
    pub async fn wait(&mut self) {
        // An error means the waker is gone (shutting down); the caller's own
        // cancellation check ends its loop.
        if self.generation.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Marks every wake-up so far as seen.
    pub fn mark_seen(&mut self) {
        self.generation.mark_unchanged();
    }
}

/// The waker task's state.
pub struct Waker {
    pg: db::PgConfig,
    pool: Pool,
    poll_interval: Duration,
    generation: watch::Sender<u64>,
    idle: std::sync::Arc<Notify>,
}

impl Waker {
    pub fn new(pg: db::PgConfig, pool: Pool, poll_interval: Duration) -> (Waker, Wakeups) {
        let (tx, rx) = watch::channel(0);
        let idle = std::sync::Arc::new(Notify::new());
        (
            Waker {
                pg,
                pool,
                poll_interval,
                generation: tx,
                idle: idle.clone(),
            },
            Wakeups {
                generation: rx,
                idle,
            },
        )
    }

    fn wake_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut notifications: Option<Listener> = None;
        let mut reconnect = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut reconnect_at = tokio::time::Instant::now();
        let mut armed = false;
        let mut fence: Option<u64> = None;
        let mut fence_backoff = Backoff::new(Duration::from_millis(1), self.poll_interval);
        let mut fence_at = tokio::time::Instant::now();
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if notifications.is_none() && tokio::time::Instant::now() >= reconnect_at {
                match listen(&self.pg).await {
                    Ok(listener) => {
                        if reconnect.peek() > Duration::from_millis(100) {
                            tracing::info!("LISTEN connection re-established");
                        }
                        reconnect.reset();
                        notifications = Some(listener);
                        // Whatever was committed while we were not listening.
                        armed = false;
                        self.wake_all();
                    }
                    Err(e) => {
                        let delay = reconnect.next_delay();
                        tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "cannot LISTEN; polling meanwhile");
                        reconnect_at = tokio::time::Instant::now() + delay;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                message = recv(&mut notifications), if notifications.is_some() => {
                    match message {
                        Some(()) => {
                            if let Some(l) = notifications.as_mut() {
                                while l.rx.try_recv().is_ok() {}
                            }
                            // Cleared even if this instance did not set it: another
                            // instance did (and got the same notification), or
                            // someone else, and writers should stop notifying.
                            armed = false;
                            if let Err(e) = self.set_armed(false).await {
                                tracing::debug!(error = %e, "could not disarm the wake-up flag");
                            }
                            fence = None;
                            self.wake_all();
                        }
                        None => {
                            tracing::warn!("LISTEN connection lost; reconnecting");
                            notifications = None;
                            armed = false;
                            reconnect_at = tokio::time::Instant::now();
                            self.wake_all();
                        }
                    }
                }
                _ = self.idle.notified(), if !armed && notifications.is_some() => {
                    match self.arm().await {
                        Ok(xmax) => {
                            armed = true;
                            fence = Some(xmax);
                            fence_backoff.reset();
                            fence_at = tokio::time::Instant::now() + fence_backoff.next_delay();
                        }
                        Err(e) => tracing::debug!(error = %e, "could not arm the wake-up flag"),
                    }
                }
                _ = tokio::time::sleep_until(fence_at), if fence.is_some() => {
                    match self.horizon().await {
                        Ok(h) if Some(h) >= fence => {
                            fence = None;
                            self.wake_all();
                        }
                        Ok(_) => fence_at = tokio::time::Instant::now() + fence_backoff.next_delay(),
                        Err(e) => {
                            tracing::debug!(error = %e, "could not read the horizon");
                            fence_at = tokio::time::Instant::now() + fence_backoff.next_delay();
                        }
                    }
                }
                _ = tokio::time::sleep_until(reconnect_at), if notifications.is_none() => {}
                _ = poll.tick() => {
                    // The safety net, and a repair for a flag lost with its unlogged
                    // table after a crash.
                    if armed {
                        let _ = self.set_armed(true).await;
                    }
                    self.wake_all();
                }
            }
        }
    }

    /// Sets the flag and returns the fence: the xmax of a snapshot taken after.
    async fn arm(&self) -> anyhow::Result<u64> {
        self.set_armed(true).await?;
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
            .await?;
        Ok(feed::Position::parse_tx(row.get(0))?)
    }

    /// Sets the flag the trigger reads (migration V9's sequence), and the table
    /// an older pgfold running beside this one reads. Each only when it changes:
    /// an UPDATE that matches nothing takes no xid, and a setval that is not made
    /// writes no WAL.
    async fn set_armed(&self, armed: bool) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let value = i64::from(armed);
        let (table, sequence): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&armed], [&value]);
        let (n, _) = tokio::try_join!(
            client.execute(
                "UPDATE pgfold.wakeup SET armed = $1 WHERE id = 1 AND armed IS DISTINCT FROM $1",
                &table,
            ),
            client.execute(
                "SELECT setval('pgfold.wakeup_armed', $1, true)
                  WHERE pg_sequence_last_value('pgfold.wakeup_armed') IS DISTINCT FROM $1",
                &sequence,
            )
        )?;
        if n == 0 && armed {
            client
                .execute(
                    "INSERT INTO pgfold.wakeup (id, armed) VALUES (1, true) ON CONFLICT (id) DO NOTHING",
                    &[],
                )
                .await?;
        }
        Ok(())
    }

    async fn horizon(&self) -> anyhow::Result<u64> {
        let client = self.pool.get().await?;
        Ok(feed::horizon(&client).await?.tx)
    }
}

async fn recv(listener: &mut Option<Listener>) -> Option<()> {
    match listener {
        Some(l) => l.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The LISTEN connection: the client must live as long as we listen, and the
/// task that drives the connection ends with it.
struct Listener {
    client: tokio_postgres::Client,
    rx: mpsc::UnboundedReceiver<()>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens the LISTEN connection; its notifications arrive on `rx`, which closes
/// when the connection does.
async fn listen(pg: &db::PgConfig) -> anyhow::Result<Listener> {
    let (client, mut connection) = tokio::time::timeout(db::handshake_timeout(pg), pg.connect())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at {}: no answer",
                db::describe(pg)
            )
        })?
        .map_err(|e| db::unreachable_error(pg, &e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        // tokio-postgres drops notifications unless the connection is driven
        // through poll_message.
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "LISTEN connection error");
                    break;
                }
            }
        }
    });
    let listener = Listener { client, rx, driver };
    listener
        .client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|e| anyhow::anyhow!("LISTEN failed: {}", db::error_text(&e)))?;
    Ok(listener)
}
