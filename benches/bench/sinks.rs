//! Phase 7, sinks (numbered 6 in the report): a catch-up of the benchmark
//! database's log to NATS JetStream and to RabbitMQ with publisher confirms
//! (issue 29), `run --once --replay` of a sink, timed from spawn to exit, with
//! its peak RSS. Against the machine's brokers (NATS on 127.0.0.1:4222,
//! RabbitMQ on 127.0.0.1:5672 as guest), into a stream, exchange and queue of
//! the run's own, deleted at the end.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use pgfold::testkit::db::{connect, scalar_i64};
use pgfold::testkit::process::Daemon;

use crate::common::{joined, log, median, mib, once_of, run_nonce, thousands};
use crate::{Env, PGFOLD};

const NATS: &str = "nats://127.0.0.1:4222";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The broker keeps at most this many of the run's messages (the oldest go):
/// a catch-up of millions stays within memory and disk, and each message is
/// still stored and acknowledged as usual.
const KEEP: i64 = 200_000;

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
    channel
        .queue_bind(
            exchange.as_str().into(),
            exchange.as_str().into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

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
            let mut program = Daemon::command(PGFOLD);
            for (k, v) in vars {
                program = program.env(k, v);
            }
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
    channel
        .queue_delete(exchange.as_str().into(), QueueDeleteOptions::default())
        .await?;
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
    Ok(())
}
