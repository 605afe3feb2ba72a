//! Phase 7, sinks (numbered 6 in the report): a catch-up of the benchmark
//! database's log to NATS JetStream and to RabbitMQ with publisher confirms
//! (issue 29), `run --once --replay` of a sink, timed from spawn to exit, with
//! its peak RSS; then each sink live, `pgfold run` publishing what the live
//! phase's paced writers append: commit to broker-acknowledged latency, and
//! the daemon's RSS at the start and end. Against the machine's brokers (NATS
//! on 127.0.0.1:4222, RabbitMQ on 127.0.0.1:5672 as guest), into streams, an
//! exchange and queues of the run's own, deleted at the end.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use pgfold::testkit::db::{connect, scalar_i64};
use pgfold::testkit::process::{vm_rss_kib, Daemon, Spawn};
use tokio::sync::oneshot;
use tokio_postgres::Client;

use crate::common::{
    joined, log, median, mib, ms, once_of, percentile, run_nonce, running_daemon_of, stop_daemon,
    thousands,
};
use crate::live::{live_writers, Committed, LiveWriter};
use crate::{Env, PGFOLD};

const NATS: &str = "nats://127.0.0.1:4222";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The broker keeps at most this many of the run's messages (the oldest go):
/// a catch-up of millions stays within memory and disk, and each message is
/// still stored and acknowledged as usual.
const KEEP: i64 = 200_000;
/// Live: events committed in the first seconds of the run (capped at a fifth
/// of `--seconds`) are not measured, while the connections and caches warm up.
const WARM_UP: Duration = Duration::from_secs(2);
/// Live: how long the last events may take to arrive once the writers stop.
const SETTLE: Duration = Duration::from_secs(30);
/// Live: how long to keep listening after the last expected message, so that
/// a duplicate sent late is seen.
const GRACE: Duration = Duration::from_millis(300);

pub async fn sinks(env: &mut Env) -> Result<()> {
    let client = connect(&env.url).await?;
    let events = scalar_i64(&client, "SELECT count(*) FROM events").await? as u64;
    let nonce = format!("{:x}", run_nonce() & 0xffff_ffff);
    let subject_prefix = format!("pgfoldbench{nonce}");
    let exchange = format!("pgfold-bench-{nonce}");

    let nats = async_nats::connect(NATS)
        .await
        .context("NATS on 127.0.0.1:4222")?;
    let js = jetstream::new(nats);
    let amqp = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .context("RabbitMQ on 127.0.0.1:5672")?;
    let channel = amqp.create_channel().await?;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut limits = FieldTable::default();
    limits.insert("x-max-length".into(), AMQPValue::LongLongInt(KEEP));
    channel
        .queue_declare(
            exchange.as_str().into(),
            QueueDeclareOptions::default(),
            limits,
        )
        .await?;
    bind(&channel, exchange.as_str().into(), &exchange).await?;

    let subject = format!("{subject_prefix}.{{stream_type}}.{{event_type}}");
    let sinks: [(&str, Vec<(&str, &str)>); 2] = [
        (
            "bench_nats",
            vec![
                ("PGFOLD_SINKS__BENCH_NATS__URL", NATS),
                ("PGFOLD_SINKS__BENCH_NATS__SUBJECT", subject.as_str()),
            ],
        ),
        (
            "bench_rabbit",
            vec![
                ("PGFOLD_SINKS__BENCH_RABBIT__URL", AMQP),
                ("PGFOLD_SINKS__BENCH_RABBIT__EXCHANGE", exchange.as_str()),
                (
                    "PGFOLD_SINKS__BENCH_RABBIT__SUBJECT",
                    "bench.{stream_type}.{event_type}",
                ),
            ],
        ),
    ];
    let mut results = Vec::new();
    for (name, vars) in &sinks {
        let mut runs = Vec::new();
        for run in 1..=env.args.runs {
            // A new stream each run: JetStream would take a republish within
            // its duplicate window for a duplicate, and store nothing.
            let stream_name = format!("PGFOLD_BENCH_{}_{run}", nonce.to_uppercase());
            if *name == "bench_nats" {
                js.create_stream(stream::Config {
                    name: stream_name.clone(),
                    subjects: vec![format!("{subject_prefix}.>")],
                    max_messages: KEEP,
                    ..Default::default()
                })
                .await?;
            }
            let program = Daemon::command(PGFOLD).envs(vars.iter().copied());
            let args = ["run", "--once", "--replay", name, "--projector", name];
            let r = once_of(program, &env.url, &args).await;
            if *name == "bench_nats" {
                js.delete_stream(&stream_name).await?;
            }
            let (secs, peak) = r?;
            log(format!(
                "sinks: {name} run {run}/{}: {:.2} s, {:.0} events/s, peak RSS {}",
                env.args.runs,
                secs,
                events as f64 / secs,
                mib(peak)
            ));
            runs.push((secs, peak));
        }
        results.push((*name, runs));
    }

    // Live, each sink from where its catch-up left it (the end of the log).
    let mut live = Vec::new();
    let stream_name = format!("PGFOLD_BENCH_{}_LIVE", nonce.to_uppercase());
    let live_stream = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{subject_prefix}.>")],
            max_messages: KEEP,
            ..Default::default()
        })
        .await?;
    // An ordered consumer reads the stream: what it delivers, the stream has
    // stored, which is what JetStream acknowledges to the publisher.
    let messages = live_stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await?
        .messages()
        .await?
        .filter_map(|m| async move {
            m.map_err(|e| log(format!("sinks: JetStream ordered consumer: {e}")))
                .ok()
                .map(|m| m.message.payload.to_vec())
        })
        .boxed();
    let r = live_sink(env, &client, sinks[0].0, &sinks[0].1, messages).await;
    js.delete_stream(&stream_name).await?;
    live.push((sinks[0].0, r?));

    // RabbitMQ confirms once the message is in every queue it is routed to; a
    // consumer of the only one receives it from there.
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    bind(&channel, queue.name().clone(), &exchange).await?;
    channel
        .queue_delete(exchange.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let messages = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .filter_map(|d| async move {
            d.map_err(|e| log(format!("sinks: RabbitMQ consumer: {e}")))
                .ok()
                .map(|d| d.data)
        })
        .boxed();
    let r = live_sink(env, &client, sinks[1].0, &sinks[1].1, messages).await;
    channel
        .queue_delete(queue.name().clone(), QueueDeleteOptions::default())
        .await?;
    live.push((sinks[1].0, r?));

    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    client
        .execute(
            "DELETE FROM pgfold.projectors WHERE name IN ('bench_nats', 'bench_rabbit')",
            &[],
        )
        .await?;

    let r = &mut env.report;
    writeln!(
        r,
        "\n6. Sinks: catch-up of {} events (`run --once --replay`) to NATS JetStream and to \
         RabbitMQ with confirms;\n   {} runs, from spawn to exit",
        thousands(events),
        env.args.runs
    )?;
    for (name, runs) in &results {
        let times: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let rates: Vec<f64> = times.iter().map(|t| events as f64 / t).collect();
        let peak = runs.iter().map(|r| r.1).max().unwrap_or(0);
        writeln!(
            r,
            "   {name:<13} median {:.2} s = {:.0} events/s (runs: {} s); peak RSS {}",
            median(&times),
            median(&rates),
            joined(&times, 2),
            mib(peak)
        )?;
    }
    report_live(env, &live)?;
    Ok(())
}

/// Binds `queue` to every message the sinks publish to `exchange`.
async fn bind(channel: &lapin::Channel, queue: ShortString, exchange: &str) -> Result<()> {
    channel
        .queue_bind(
            queue,
            exchange.into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// What one sink's live run saw.
struct Live {
    /// Events the writers committed, and per second over `--seconds`.
    committed: usize,
    rate: f64,
    /// Commit returned -> received, per event committed after the warm-up
    /// and received, sorted.
    latencies: Vec<Duration>,
    /// Messages received before their writer saw its COMMIT return (counted
    /// as 0 ms).
    early: usize,
    arrivals: Arrivals,
    /// The daemon's VmRSS when the writers started and when they stopped, and
    /// its peak, in KiB.
    rss_start: Option<u64>,
    rss_end: Option<u64>,
    peak: u64,
}

/// `pgfold run --projector NAME` with the sink's settings in `vars`, caught
/// up, while the live phase's paced writers (`--writers`, `--rate`,
/// `--seconds`) append; `messages` are the bodies a subscriber receives.
async fn live_sink(
    env: &Env,
    client: &Client,
    name: &str,
    vars: &[(&str, &str)],
    messages: BoxStream<'static, Vec<u8>>,
) -> Result<Live> {
    let a = &env.args;
    let count = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = oneshot::channel();
    let receiver = tokio::spawn(receive(messages, count.clone(), stopped));
    let program: Spawn = Daemon::command(PGFOLD).envs(vars.iter().copied());
    let daemon = running_daemon_of(
        program,
        client,
        &env.url,
        vec!["run".into(), "--projector".into(), name.into()],
        &[name.to_string()],
    )
    .await?;
    // Let the worker go idle and arm the wake-up flag, as in production.
    tokio::time::sleep(Duration::from_millis(500)).await;
    log(format!(
        "sinks: {name} live, {} writers appending {} events/s in total for {} s",
        a.writers, a.rate, a.seconds
    ));
    let rss_start = vm_rss_kib(daemon.pid());
    let (LiveWriter { committed, .. }, _) = live_writers(&env.url, a, false).await?;
    let rss_end = vm_rss_kib(daemon.pid());
    let settle = Instant::now() + SETTLE;
    while count.load(Ordering::Relaxed) < committed.len() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(GRACE).await;
    let _ = stop.send(());
    let received = receiver.await?;
    let peak = stop_daemon(daemon).await?;

    let warm_up = WARM_UP.min(Duration::from_secs(a.seconds) / 5);
    let since = committed.iter().map(|c| c.at).min();
    let commits: HashMap<i64, &Committed> = committed.iter().map(|c| (c.position.id, c)).collect();
    let arrivals = arrivals(&commits, &received)?;
    let mut latencies = Vec::new();
    let mut early = 0;
    for (id, at) in &arrivals.first {
        let c = commits[id];
        if since.is_some_and(|s| c.at < s + warm_up) {
            continue;
        }
        if *at < c.at {
            early += 1;
        }
        latencies.push(at.saturating_duration_since(c.at));
    }
    latencies.sort();
    Ok(Live {
        committed: committed.len(),
        rate: committed.len() as f64 / a.seconds as f64,
        latencies,
        early,
        arrivals,
        rss_start,
        rss_end,
        peak,
    })
}

/// Collects the messages with the instant each arrived, until `stop`.
async fn receive(
    mut messages: BoxStream<'static, Vec<u8>>,
    count: Arc<AtomicUsize>,
    mut stop: oneshot::Receiver<()>,
) -> Vec<(Instant, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        tokio::select! {
            m = messages.next() => match m {
                Some(body) => {
                    got.push((Instant::now(), body));
                    count.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            },
            _ = &mut stop => break,
        }
    }
    got
}

/// Whether each committed event arrived exactly once, and each stream's in
/// `sequence` order.
#[derive(Default)]
struct Arrivals {
    /// The first arrival of each committed event, by event id.
    first: HashMap<i64, Instant>,
    /// Committed events that never arrived.
    missing: usize,
    /// Second and later arrivals of an event.
    duplicates: usize,
    /// First arrivals whose sequence did not follow their stream's previous one.
    out_of_order: usize,
    /// Messages of events these writers did not commit: those the daemon
    /// published while catching up at its start (the previous sink's live run).
    earlier: usize,
}

fn arrivals(
    commits: &HashMap<i64, &Committed>,
    received: &[(Instant, Vec<u8>)],
) -> Result<Arrivals> {
    let mut a = Arrivals::default();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for (at, body) in received {
        let event: serde_json::Value =
            serde_json::from_slice(body).context("a message that is not the event as JSON")?;
        let field = |k: &str| event.get(k).context(format!("a message without {k}"));
        let id = field("id")?.as_i64().context("id is not a number")?;
        let sequence = field("sequence")?
            .as_i64()
            .context("sequence is not a number")?;
        let stream = field("stream_id")?.as_str().context("stream_id")?;
        if !commits.contains_key(&id) {
            a.earlier += 1;
        } else if !seen.insert(id) {
            a.duplicates += 1;
        } else {
            // Each writer's streams are new: they start at sequence 1.
            let previous = last.insert(stream.to_string(), sequence).unwrap_or(0);
            if sequence != previous + 1 {
                a.out_of_order += 1;
            }
            a.first.insert(id, *at);
        }
    }
    a.missing = commits.len() - a.first.len();
    Ok(a)
}

fn report_live(env: &mut Env, live: &[(&str, Live)]) -> Result<()> {
    let a = &env.args;
    let warm_up = WARM_UP.min(Duration::from_secs(a.seconds) / 5);
    let r = &mut env.report;
    writeln!(
        r,
        "\n   live: `pgfold run --projector NAME` caught up, then the live phase's {} writers appending \
         orders at {} events/s\n   in total for {} s; latency = COMMIT returned to the writer -> the \
         message received by a consumer on this machine\n   (JetStream: an ordered consumer of the \
         stream, which delivers only what the stream has stored, as it acknowledges;\n   RabbitMQ: a \
         consumer of the one queue bound, which has the message once the broker confirms it), per \
         event\n   committed after the first {:.1} s. Issue 29's target: p99 <= 25 ms, RSS flat.",
        a.writers,
        a.rate,
        a.seconds,
        warm_up.as_secs_f64()
    )?;
    writeln!(
        r,
        "\n   {:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   daemon RSS start -> end (peak)",
        "sink", "events", "measured", "p50", "p95", "p99", "max"
    )?;
    let rss = |k: Option<u64>| k.map_or("n/a".to_string(), mib);
    for (name, l) in live {
        writeln!(
            r,
            "   {:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   {} -> {} ({})",
            name,
            l.committed,
            l.latencies.len(),
            ms(percentile(&l.latencies, 50.0)),
            ms(percentile(&l.latencies, 95.0)),
            ms(percentile(&l.latencies, 99.0)),
            ms(l.latencies.last().copied().unwrap_or_default()),
            rss(l.rss_start),
            rss(l.rss_end),
            mib(l.peak)
        )?;
    }
    for (name, l) in live {
        let x = &l.arrivals;
        writeln!(
            r,
            "   {name}: {:.0} events/s committed; missing {}, duplicates {}, out of order {} \
             (must be 0); {} arrived before COMMIT returned (0 ms);\n     {} earlier events \
             published while catching up at the start, not counted{}",
            l.rate,
            x.missing,
            x.duplicates,
            x.out_of_order,
            l.early,
            x.earlier,
            if x.missing + x.duplicates + x.out_of_order > 0 {
                "\n   !!! not every event arrived exactly once and in order"
            } else {
                ""
            }
        )?;
        if l.rate < 0.95 * a.rate as f64 {
            writeln!(
                r,
                "   !!! {name}: the writers could not hold the requested rate; latencies are for the achieved rate"
            )?;
        }
    }
    Ok(())
}
