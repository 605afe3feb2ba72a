//! Phase 3, live latency: paced writers appending through the optimistic-concurrency
//! path while `pgfold run` keeps up; commit to checkpoint, and commit to
//! `wait_for` (issue 16).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use pgfold::feed::Position;
use pgfold::store::{self, AppendError, NewEvent};
use pgfold::testkit::db::connect;
use pgfold::testkit::process::clock_ticks_per_second;
use serde_json::Value;

use crate::common::{
    items, log, mib, ms, notification_counter, order_created, order_paid, percentile,
    projector_positions, run_nonce, running_daemon, stop_daemon, thousands, Rng,
};
use crate::{Args, Env};

pub struct Committed {
    pub position: Position,
    pub at: Instant,
    pub paid: bool,
}

pub struct LiveWriter {
    pub committed: Vec<Committed>,
    pub conflicts: u64,
    /// BEGIN to COMMIT returned, per event (retries included).
    pub durations: Vec<Duration>,
    /// COMMIT returned -> `pgfold::store::wait_for` returned true, per sampled event.
    pub waits: Vec<Duration>,
    /// Sampled events whose `wait_for` returned false (timed out).
    pub wait_timeouts: u64,
}

/// One live writer in this many also waits for its events with `wait_for`.
const WAIT_SAMPLE_EVERY: usize = 8;
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);

async fn live_writer(
    url: String,
    writer: usize,
    a: Args,
    start: tokio::time::Instant,
    tag: String,
    sample_waits: bool,
) -> Result<LiveWriter> {
    let (writers, rate) = (a.writers, a.rate);
    let duration = Duration::from_secs(a.seconds);
    let mut client = connect(&url).await?;
    // The application's read-your-writes call, on a connection of its own. One wait
    // at a time: an event committed while the previous wait still runs is not
    // sampled, so that the writer keeps its pace.
    let waiter = match sample_waits {
        true => Some(Arc::new(tokio::sync::Mutex::new(connect(&url).await?))),
        false => None,
    };
    let mut pending = Vec::new();
    let period = Duration::from_secs_f64(writers as f64 / rate as f64);
    let offset = period.mul_f64(writer as f64 / writers as f64);
    let mut tick = tokio::time::interval_at(start + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = start + duration;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((writer as u64 + 1) * 0x1234_5678_9ABC));
    let mut out = LiveWriter {
        committed: Vec::with_capacity(
            (rate as f64 * duration.as_secs_f64() / writers as f64) as usize + 16,
        ),
        conflicts: 0,
        durations: Vec::new(),
        waits: Vec::new(),
        wait_timeouts: 0,
    };
    let mut order = 0u64;
    let mut step = 0u8;
    let mut expected = 1i64;
    let mut order_items = Value::Null;
    loop {
        let scheduled = tick.tick().await;
        if scheduled >= end {
            break;
        }
        let stream = format!("live-{tag}-{writer}-{order}");
        let event = match step {
            0 => {
                order_items = items(&mut rng);
                order_created(&stream, &order_items, &mut rng)
            }
            1 => order_paid(&stream, &order_items),
            _ => NewEvent::new(
                &stream,
                "order",
                "OrderShipped",
                serde_json::json!({"address": format!("{} Harbour Street", rng.below(999))}),
            ),
        };
        // The optimistic-concurrency path: append at the expected sequence in an
        // explicit transaction; on a conflict re-read the stream's last sequence.
        let began = Instant::now();
        loop {
            let tx = client.transaction().await?;
            match store::append(&tx, &event, expected).await {
                Ok(id) => {
                    let txid: String = tx
                        .query_one("SELECT tx_id::text FROM events WHERE id = $1", &[&id])
                        .await?
                        .get(0);
                    tx.commit().await?;
                    let at = Instant::now();
                    out.durations.push(at - began);
                    out.committed.push(Committed {
                        position: Position::new(txid.parse()?, id),
                        at,
                        paid: event.event_type == "OrderPaid",
                    });
                    if let Some(conn) = waiter
                        .as_ref()
                        .and_then(|w| w.clone().try_lock_owned().ok())
                    {
                        let (stream, sequence) = (stream.clone(), expected);
                        pending.push(tokio::spawn(async move {
                            let applied = store::wait_for(
                                &*conn,
                                "order_snapshots",
                                &stream,
                                sequence,
                                WAIT_TIMEOUT,
                            )
                            .await?;
                            anyhow::Ok(applied.then(|| at.elapsed()))
                        }));
                    }
                    break;
                }
                Err(AppendError::Conflict { .. }) => {
                    tx.rollback().await?;
                    out.conflicts += 1;
                    expected = store::last_sequence(&client, &stream).await? + 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        expected += 1;
        step += 1;
        if step == 3 {
            step = 0;
            order += 1;
            expected = 1;
        }
    }
    for wait in pending {
        match wait.await?? {
            Some(d) => out.waits.push(d),
            None => out.wait_timeouts += 1,
        }
    }
    Ok(out)
}

/// Runs the paced live writers (`--writers`, `--rate`, `--seconds`) to the end and
/// merges what they saw; also returns the seconds from their start to their end.
/// With `sample_waits`, one writer in [`WAIT_SAMPLE_EVERY`] also calls `wait_for`.
/// Each call writes new streams of its own, starting at sequence 1.
pub async fn live_writers(url: &str, a: &Args, sample_waits: bool) -> Result<(LiveWriter, f64)> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let tag = format!("{}.{}", run_nonce(), CALLS.fetch_add(1, Ordering::Relaxed));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for w in 0..a.writers {
        tasks.push(tokio::spawn(live_writer(
            url.to_string(),
            w,
            a.clone(),
            start,
            tag.clone(),
            sample_waits && w % WAIT_SAMPLE_EVERY == 0,
        )));
    }
    let mut all = LiveWriter {
        committed: Vec::new(),
        conflicts: 0,
        durations: Vec::new(),
        waits: Vec::new(),
        wait_timeouts: 0,
    };
    for t in tasks {
        let w = t.await??;
        all.conflicts += w.conflicts;
        all.committed.extend(w.committed);
        all.durations.extend(w.durations);
        all.waits.extend(w.waits);
        all.wait_timeouts += w.wait_timeouts;
    }
    Ok((all, start.elapsed().as_secs_f64()))
}

/// First time (when the answer arrived) each projector was seen at each position.
type Observations = HashMap<String, Vec<(Instant, Position)>>;

async fn poll_positions(url: String, stop: Arc<AtomicBool>) -> Result<(Observations, u64, f64)> {
    let client = connect(&url).await?;
    let stmt = client
        .prepare("SELECT name, position_tx::text, position_id FROM pgfold.projectors")
        .await?;
    let mut seen: Observations = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut polls = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let rows = client.query(&stmt, &[]).await?;
        let at = Instant::now();
        polls += 1;
        for row in rows {
            let tx: String = row.get(1);
            let p = Position::new(tx.parse()?, row.get(2));
            let list = seen.entry(row.get(0)).or_default();
            if list.last().map(|(_, last)| *last) != Some(p) {
                list.push((at, p));
            }
        }
    }
    let mean_period_ms = started.elapsed().as_secs_f64() * 1000.0 / polls.max(1) as f64;
    Ok((seen, polls, mean_period_ms))
}

struct LatencyStats {
    consumed: usize,
    visible: usize,
    p50: Duration,
    p95: Duration,
    p99: Duration,
    max: Duration,
    negative: usize,
}

fn latencies(events: &[&Committed], obs: &[(Instant, Position)]) -> LatencyStats {
    let mut lat = Vec::with_capacity(events.len());
    let mut negative = 0;
    for e in events {
        // Checkpoints only move forward, so the first observation at or past the
        // event's position is where it became visible.
        let i = obs.partition_point(|(_, p)| *p < e.position);
        if let Some((at, _)) = obs.get(i) {
            if *at < e.at {
                negative += 1;
            }
            lat.push(at.saturating_duration_since(e.at));
        }
    }
    lat.sort();
    LatencyStats {
        consumed: events.len(),
        visible: lat.len(),
        p50: percentile(&lat, 50.0),
        p95: percentile(&lat, 95.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or_default(),
        negative,
    }
}

pub async fn live(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let client = connect(&env.url).await?;
    log("live: starting `pgfold run` and waiting until it has caught up");
    let daemon = running_daemon(&client, &env.url, vec!["run".to_string()], &[]).await?;
    // Let the workers go idle and arm the wake-up flag, as in production.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = daemon.cpu_ticks();

    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_positions(env.url.clone(), stop.clone()));
    let (_listener, notifications) = notification_counter(&env.url).await?;
    log(format!(
        "live: {} writers appending {} events/s in total for {} s",
        a.writers, a.rate, a.seconds
    ));
    let (
        LiveWriter {
            committed,
            conflicts,
            mut durations,
            mut waits,
            wait_timeouts,
        },
        written_in,
    ) = live_writers(&env.url, &a, true).await?;
    durations.sort();
    waits.sort();
    let cpu1 = daemon.cpu_ticks();
    let notified = notifications.load(Ordering::Relaxed);
    // Let the last events through before stopping the poller.
    let last = committed.iter().map(|c| c.position).max();
    let settle = Instant::now() + Duration::from_secs(30);
    if let Some(last) = last {
        loop {
            let pos = projector_positions(&client).await?;
            if pos.values().all(|(p, _)| *p >= last) || Instant::now() > settle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    let (obs, polls, poll_ms) = poller.await??;
    let peak = stop_daemon(daemon).await?;

    let n = committed.len();
    let rate = n as f64 / a.seconds as f64;
    let tps = clock_ticks_per_second();
    let cpu = match (cpu0, cpu1) {
        (Some(c0), Some(c1)) => format!(
            "{:.0} % of one core",
            100.0 * (c1 - c0) as f64 / tps / written_in
        ),
        _ => "n/a".into(),
    };
    let r = &mut env.report;
    writeln!(
        r,
        "\n3. Live latency: `pgfold run` caught up, then {} writers (own connections) appending new \
         orders\n   (OrderCreated, OrderPaid, OrderShipped) through pgfold::store::append at the expected \
         sequence,\n   one event per transaction, paced at {} events/s in total for {} s",
        a.writers, a.rate, a.seconds
    )?;
    writeln!(
        r,
        "   committed {} events ({:.0}/s achieved), {} conflicts retried; daemon CPU while writing: {}; \
         daemon peak RSS {}",
        thousands(n as u64),
        rate,
        conflicts,
        cpu,
        mib(peak)
    )?;
    writeln!(
        r,
        "   writer transactions that notified (found the wake-up flag armed): {} of {} ({:.0} %)",
        thousands(notified),
        thousands(n as u64),
        100.0 * notified as f64 / n.max(1) as f64
    )?;
    writeln!(
        r,
        "   writer transaction (BEGIN .. COMMIT returned, 4 round trips): p50 {}, p99 {}; \
         each writer must finish one every {:.1} ms to hold the rate{}",
        ms(percentile(&durations, 50.0)),
        ms(percentile(&durations, 99.0)),
        1000.0 * a.writers as f64 / a.rate as f64,
        if rate < 0.95 * a.rate as f64 {
            "\n   !!! the writers could not hold the requested rate on this machine; latencies are for the achieved rate"
        } else {
            ""
        }
    )?;
    writeln!(
        r,
        "   latency = commit returned to the writer -> first poll of pgfold.projectors showing the \
         checkpoint at or past the event.\n   Polled every 1 ms (measured: {} polls, one per {:.2} ms), \
         so figures carry up to ~1 ms + one query of resolution.",
        thousands(polls),
        poll_ms
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "   {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "projector", "events", "visible", "p50", "p95", "p99", "max"
    )?;
    let mut negatives = 0;
    for (name, filter) in [("daily_revenue", true), ("order_snapshots", false)] {
        let evs: Vec<&Committed> = committed.iter().filter(|c| !filter || c.paid).collect();
        let empty = Vec::new();
        let s = latencies(&evs, obs.get(name).unwrap_or(&empty));
        negatives += s.negative;
        writeln!(
            r,
            "   {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            s.consumed,
            s.visible,
            ms(s.p50),
            ms(s.p95),
            ms(s.p99),
            ms(s.max)
        )?;
        if s.visible < s.consumed {
            writeln!(
                r,
                "   !!! {} of {name}'s events never became visible within 30 s",
                s.consumed - s.visible
            )?;
        }
    }
    writeln!(
        r,
        "   {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "wait_for (os)",
        waits.len() as u64 + wait_timeouts,
        waits.len(),
        ms(percentile(&waits, 50.0)),
        ms(percentile(&waits, 95.0)),
        ms(percentile(&waits, 99.0)),
        ms(waits.last().copied().unwrap_or_default())
    )?;
    writeln!(
        r,
        "   (daily_revenue counts only OrderPaid, the events it consumes; order_snapshots all of them. \
         {negatives} observations\n   arrived before the writer saw its own COMMIT return and count as 0 ms.)"
    )?;
    writeln!(
        r,
        "   wait_for (os) = issue 16's read-your-writes: one writer in {WAIT_SAMPLE_EVERY} calls \
         pgfold::store::wait_for('order_snapshots', stream, sequence, {} s)\n   on a second connection \
         right after its COMMIT returns, one wait at a time (events committed meanwhile are not sampled);\n   \
         commit returned -> wait_for returned true. {wait_timeouts} of the sampled waits timed out.",
        WAIT_TIMEOUT.as_secs()
    )?;
    Ok(())
}
