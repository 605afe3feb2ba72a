//! Phase 7, archive (issue 28's "Performance"): how fast a pass moves events to
//! a local directory, what a pass costs a writer's p99, the archive's size against
//! the table's, a replay with half the log archived against the same replay from
//! the table, and peak RSS of passes and archive replays with 1.9 MB payloads.
//!
//! Databases, all of this phase's own: `NAME_as` (the source: loaded, projected,
//! compacted; the all-in-the-table variant of the replays), `NAME_ar` (a copy with
//! half of it archived, by the first timed pass), `NAME_ap` and `NAME_aw` (copies
//! for the other passes, dropped), `NAME_al` (the large payloads, dropped).
//! Copies are `CREATE DATABASE ... TEMPLATE NAME_as STRATEGY FILE_COPY`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgfold::testkit::db::{self, connect, scalar_i64, scalar_text};
use pgfold::testkit::process::Daemon;
use tokio_postgres::Client;

use crate::common::{
    joined, log, median, mib, ms, output_of, percentile, pgfold_once, replay_args, thousands,
};
use crate::large::{load_large, AS_PGFOLD, LARGE};
use crate::live::live_writers;
use crate::write::bare_database;
use crate::{Args, Env, PGFOLD};

/// Issue 28's targets.
const PASS_EVENTS_PER_SECOND: f64 = 100_000.0;
const WRITER_P99_RATIO: f64 = 2.0;
const ARCHIVE_SHARE: f64 = 0.35;
const REPLAY_RATIO: f64 = 1.3;
const PEAK_RSS_KIB: u64 = 128 * 1024;

/// The writer's quiet seconds before a pass starts (after a second of warm-up
/// that is not counted), and after it ends.
const QUIET_SECONDS: f64 = 5.0;
const WARM_UP_SECONDS: f64 = 1.0;

/// The phase's databases.
struct Names {
    source: String,
    archived: String,
    pass: String,
    writer: String,
    large: String,
}

impl Names {
    fn new(db: &str) -> Names {
        Names {
            source: format!("{db}_as"),
            archived: format!("{db}_ar"),
            pass: format!("{db}_ap"),
            writer: format!("{db}_aw"),
            large: format!("{db}_al"),
        }
    }
}

/// A configuration file archiving `stream_type = 'order'` older than `after` to
/// the directory `dir`.
fn write_config(path: &Path, dir: &Path, after: &str) -> Result<String> {
    std::fs::write(
        path,
        format!(
            "[archive]\nurl = \"file://{}\"\n\n[[archive.policy]]\nstream_types = [\"order\"]\nafter = \"{after}\"\n",
            dir.display()
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

/// `CREATE DATABASE to TEMPLATE from` (a file copy; `from` must have no
/// sessions), after dropping `to`.
async fn copy_database(admin: &Client, from: &str, to: &str) -> Result<()> {
    db::drop_database(admin, to).await?;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {to} TEMPLATE {from} STRATEGY FILE_COPY"
        ))
        .await
        .with_context(|| format!("cannot copy database {from} to {to}"))
}

/// `VACUUM FULL`, `ANALYZE` and a `CHECKPOINT`: the table rewritten compact,
/// its indexes rebuilt, no checkpoint owed for it.
async fn compact(client: &Client) -> Result<()> {
    for sql in ["VACUUM FULL events", "ANALYZE events", "CHECKPOINT"] {
        client.batch_execute(sql).await?;
    }
    Ok(())
}

/// Bytes of `events` with its indexes and TOAST.
async fn table_bytes(client: &Client) -> Result<i64> {
    scalar_i64(client, "SELECT pg_total_relation_size('events')").await
}

/// What the recorded segments hold: (segments, events, bytes).
async fn archived(client: &Client) -> Result<(i64, i64, i64)> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(events), 0)::bigint, coalesce(sum(bytes), 0)::bigint
               FROM pgfold.archive_segments",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// One `pgfold archive` pass: (wall time, peak RSS) of the child.
async fn pass(url: &str, config: &str) -> Result<(f64, u64)> {
    let (secs, peak, _) = output_of(
        Daemon::command(PGFOLD),
        url,
        &["--config", config, "archive"],
    )
    .await?;
    Ok((secs, peak))
}

/// The projections' rows as one digest each, to compare two databases:
/// (daily_revenue, order_snapshots).
async fn digests(client: &Client) -> Result<(String, String)> {
    Ok((
        scalar_text(
            client,
            "SELECT coalesce(md5(string_agg(day::text || ' ' || category || ' ' || total::text, E'\\n'
                    ORDER BY day, category)), '') FROM daily_revenue",
        )
        .await?,
        scalar_text(
            client,
            "SELECT coalesce(md5(string_agg(stream_id || ' ' || sequence || ' ' || state::text, E'\\n'
                    ORDER BY stream_id)), '') FROM order_snapshots",
        )
        .await?,
    ))
}

/// What a writer saw through a pass: its transactions' latencies split by
/// whether they overlapped the pass.
struct WriterRound {
    before: Vec<Duration>,
    during: Vec<Duration>,
    after: Vec<Duration>,
    pass_secs: f64,
    pass_events: i64,
    achieved_rate: f64,
}

impl WriterRound {
    fn quiet(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.before.iter().chain(&self.after).copied().collect();
        v.sort();
        v
    }
}

/// The live phase's paced writers on `url` for the quiet seconds, a pass, and the
/// quiet seconds again (`pass_budget`: how long the pass may take).
async fn writer_round(a: &Args, url: &str, config: &str, pass_budget: f64) -> Result<WriterRound> {
    let seconds = (WARM_UP_SECONDS + 2.0 * QUIET_SECONDS + pass_budget).ceil() as u64;
    let wargs = Args {
        seconds,
        ..a.clone()
    };
    let t0 = Instant::now();
    let writers = {
        let url = url.to_string();
        tokio::spawn(async move { live_writers(&url, &wargs, false).await })
    };
    // live_writers starts its writers 200 ms after the call.
    let warm_end = t0 + Duration::from_secs_f64(0.2 + WARM_UP_SECONDS);
    tokio::time::sleep_until((warm_end + Duration::from_secs_f64(QUIET_SECONDS)).into()).await;
    let pass_start = Instant::now();
    let (pass_secs, _) = pass(url, config).await?;
    let pass_end = Instant::now();
    let (w, _) = writers.await??;
    let written_in = seconds as f64;
    let mut round = WriterRound {
        before: Vec::new(),
        during: Vec::new(),
        after: Vec::new(),
        pass_secs,
        pass_events: archived(&connect(url).await?).await?.1,
        achieved_rate: w.committed.len() as f64 / written_in,
    };
    for (c, d) in w.committed.iter().zip(&w.durations) {
        let began = c.at - *d;
        if began < warm_end {
            continue;
        }
        if c.at < pass_start {
            round.before.push(*d);
        } else if began > pass_end {
            round.after.push(*d);
        } else {
            round.during.push(*d);
        }
    }
    for v in [&mut round.before, &mut round.during, &mut round.after] {
        v.sort();
    }
    Ok(round)
}

/// One replay variant: its database, configuration, and per command the
/// (wall time, peak RSS) of each run.
struct Variant {
    name: &'static str,
    url: String,
    config: String,
    times: Vec<Vec<(f64, u64)>>,
}

/// The replays each round runs on each variant.
const REPLAYS: [(&str, &str); 3] = [
    ("--replay all", "all"),
    ("--replay daily_revenue", "daily_revenue"),
    ("--replay order_snapshots", "order_snapshots"),
];

fn replay_command(config: &str, which: &str) -> Vec<String> {
    let mut args = vec!["--config".to_string(), config.to_string()];
    if which == "all" {
        args.extend(["run", "--once", "--replay", "all"].map(String::from));
    } else {
        args.extend(replay_args(which).map(String::from));
    }
    args
}

pub async fn archive(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let n = Names::new(&a.db);
    let admin = connect(&env.admin).await?;
    let url = |db: &str| db::with_dbname(&env.admin, db);
    let dir = tempfile::Builder::new()
        .prefix("pgfold-bench-archive")
        .tempdir()?;
    let started = Instant::now();

    // The source: loaded, projected, compacted, so that every copy and both
    // replay variants start equal and the table's size is that of its rows.
    log(format!("archive: creating database {}", n.source));
    db::recreate_database(&admin, &n.source).await?;
    db::migrate(&url(&n.source)).await?;
    let (events, after, half_streams) = {
        let client = connect(&url(&n.source)).await?;
        crate::load::load_orders(&client, a.events).await?;
        log("archive: projecting the log once (run --once), so that checkpoints allow a pass");
        pgfold_once(&url(&n.source), &["run", "--once"]).await?;
        log("archive: VACUUM FULL events (a compact table: its size is its rows')");
        compact(&client).await?;
        let events = scalar_i64(&client, "SELECT count(*) FROM events").await?;
        // Half the log: whole streams whose newest event is older than the
        // streams' median newest event.
        let row = client
            .query_one(
                "SELECT extract(epoch FROM now() - percentile_disc(0.5) WITHIN GROUP (ORDER BY newest))::bigint,
                        count(*)
                   FROM (SELECT max(occurred_at) AS newest FROM events GROUP BY stream_id) s",
                &[],
            )
            .await?;
        let secs: i64 = row.get(0);
        let streams: i64 = row.get(1);
        (events, format!("{secs} seconds"), streams / 2)
    };
    let source_bytes = table_bytes(&connect(&url(&n.source)).await?).await?;
    log(format!(
        "archive: {events} events, events with indexes {}; policy after = {after:?}",
        mib(source_bytes as u64 / 1024)
    ));

    // a and b, interleaved per round: a pass alone on a fresh copy, then a pass
    // on another copy while the writers append. The first round's pass copy is
    // kept, half archived, for the replays.
    let mut pass_runs: Vec<(f64, u64, i64)> = Vec::new();
    let mut writer_rounds: Vec<WriterRound> = Vec::new();
    let mut segments = (0i64, 0i64, 0i64);
    let mut archive_dir_bytes = 0u64;
    let archived_dir = dir.path().join("archived");
    let mut archived_config = String::new();
    for round in 1..=a.runs {
        let (db_name, archive_dir) = if round == 1 {
            (n.archived.clone(), archived_dir.clone())
        } else {
            (n.pass.clone(), dir.path().join(format!("pass-{round}")))
        };
        copy_database(&admin, &n.source, &db_name).await?;
        let config = write_config(
            &dir.path().join(format!("pass-{round}.toml")),
            &archive_dir,
            &after,
        )?;
        let (secs, peak) = pass(&url(&db_name), &config).await?;
        let client = connect(&url(&db_name)).await?;
        let moved = archived(&client).await?;
        log(format!(
            "archive round {round}/{}: pass moved {} events in {} segments in {secs:.2} s ({} events/s), peak RSS {}",
            a.runs,
            moved.1,
            moved.0,
            thousands((moved.1 as f64 / secs) as u64),
            mib(peak)
        ));
        pass_runs.push((secs, peak, moved.1));
        drop(client);
        if round == 1 {
            segments = moved;
            archive_dir_bytes = dir_bytes(&archive_dir);
            archived_config = config;
        } else {
            db::drop_database(&admin, &db_name).await?;
            let _ = std::fs::remove_dir_all(&archive_dir);
        }

        copy_database(&admin, &n.source, &n.writer).await?;
        let archive_dir = dir.path().join(format!("writer-{round}"));
        let config = write_config(
            &dir.path().join(format!("writer-{round}.toml")),
            &archive_dir,
            &after,
        )?;
        // A pass rests while the writers write (src/archive/yielding.rs): it
        // took eight to ten times as long as alone, and with eight times the
        // writers stopped before it ended.
        let budget = 12.0 * median(&pass_runs.iter().map(|p| p.0).collect::<Vec<_>>()) + 2.0;
        log(format!(
            "archive round {round}/{}: {} writers at {} events/s, a pass after {QUIET_SECONDS} s",
            a.runs, a.writers, a.rate
        ));
        let w = writer_round(&a, &url(&n.writer), &config, budget).await?;
        log(format!(
            "archive round {round}/{}: writer p99 without a pass {} (before {}, after {}), during {} ({} of {} transactions); pass {:.2} s",
            a.runs,
            ms(percentile(&w.quiet(), 99.0)),
            ms(percentile(&w.before, 99.0)),
            ms(percentile(&w.after, 99.0)),
            ms(percentile(&w.during, 99.0)),
            w.during.len(),
            w.before.len() + w.during.len() + w.after.len(),
            w.pass_secs
        ));
        writer_rounds.push(w);
        db::drop_database(&admin, &n.writer).await?;
        let _ = std::fs::remove_dir_all(&archive_dir);
    }

    // c: the archived rows' share of the table: the compact table before, against
    // the same table compacted after the pass.
    let (archived_bytes_table, remaining_events) = {
        let client = connect(&url(&n.archived)).await?;
        log("archive: VACUUM FULL events on the archived copy");
        compact(&client).await?;
        let after_bytes = table_bytes(&client).await?;
        let remaining = scalar_i64(&client, "SELECT count(*) FROM events").await?;
        (source_bytes - after_bytes, remaining)
    };
    if remaining_events + segments.1 != events {
        bail!(
            "the archived copy holds {remaining_events} events in the table and {} in segments, not {events}",
            segments.1
        );
    }

    // d: the replays, interleaved, the variants' order swapped every round.
    let hot_config = write_config(
        &dir.path().join("hot.toml"),
        &dir.path().join("hot"),
        &after,
    )?;
    let mut variants = [
        Variant {
            name: "all in the table",
            url: url(&n.source),
            config: hot_config,
            times: vec![Vec::new(); REPLAYS.len()],
        },
        Variant {
            name: "half archived",
            url: url(&n.archived),
            config: archived_config,
            times: vec![Vec::new(); REPLAYS.len()],
        },
    ];
    for round in 1..=a.runs {
        let order: [usize; 2] = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for v in order {
            let variant = &mut variants[v];
            for (k, (label, which)) in REPLAYS.iter().enumerate() {
                let args = replay_command(&variant.config, which);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let r = pgfold_once(&variant.url, &args).await?;
                log(format!(
                    "archive replay round {round}/{}: {label}, {}: {:.2} s, peak RSS {}",
                    a.runs,
                    variant.name,
                    r.0,
                    mib(r.1)
                ));
                variant.times[k].push(r);
            }
        }
    }
    let same = digests(&connect(&variants[0].url).await?).await?
        == digests(&connect(&variants[1].url).await?).await?;

    // e: peak RSS with 1.9 MB payloads.
    let large = large_memory(env, &admin, &n.large, dir.path()).await?;

    // The report.
    let r = &mut env.report;
    let (large_events, large_bytes) = LARGE;
    writeln!(
        r,
        "\n7. Archive (issue 28): a database of {} events (NAME_as: loaded as in phase 1, projected by `run --once`,\n   \
         `VACUUM FULL events`); the policy moves whole `order` streams whose newest event is older than the\n   \
         median stream's: after = \"{after}\" (~{} of {} streams). Passes are `pgfold archive` (the real binary,\n   \
         spawn to exit) to a local directory (file://), each on a fresh copy of NAME_as (CREATE DATABASE ... TEMPLATE).\n   \
         {} rounds, each: a. a pass alone; b. a pass while writers append. Then d. the replays, interleaved.",
        thousands(events as u64),
        thousands(half_streams as u64),
        thousands(half_streams as u64 * 2),
        a.runs
    )?;
    let pass_secs: Vec<f64> = pass_runs.iter().map(|p| p.0).collect();
    let pass_eps: Vec<f64> = pass_runs.iter().map(|p| p.2 as f64 / p.0).collect();
    let pass_peak = pass_runs.iter().map(|p| p.1).max().unwrap_or(0);
    let eps = median(&pass_eps);
    writeln!(
        r,
        "\n   a. pass: {} events moved per pass in {} segments; runs {} s; median {:.2} s;\n      \
         events/s per run {}; median {} events/s (target >= {}): {}; peak RSS {}",
        thousands(segments.1 as u64),
        segments.0,
        joined(&pass_secs, 2),
        median(&pass_secs),
        joined(&pass_eps, 0),
        thousands(eps as u64),
        thousands(PASS_EVENTS_PER_SECOND as u64),
        verdict(eps >= PASS_EVENTS_PER_SECOND),
        mib(pass_peak)
    )?;

    writeln!(
        r,
        "\n   b. writer: {} writers appending {} events/s in total (the live phase's writers: BEGIN, append at the\n      \
         expected sequence, SELECT tx_id, COMMIT; latency = BEGIN to COMMIT returned), {QUIET_SECONDS} s, then a pass,\n      \
         then {QUIET_SECONDS} s, on a fresh copy each round (the first {WARM_UP_SECONDS} s not counted). \"during\" = transactions\n      \
         that overlapped the pass; \"without\" = those before and after it (the append guard's trigger is in\n      \
         place after the first pass moved anything).",
        a.writers, a.rate
    )?;
    writeln!(
        r,
        "      {:<6} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "round",
        "achieved",
        "pass",
        "moved",
        "n during",
        "p50 w/o",
        "p99 w/o",
        "p50 during",
        "p99 during",
        "ratio"
    )?;
    let mut ratios = Vec::new();
    for (i, w) in writer_rounds.iter().enumerate() {
        let quiet = w.quiet();
        let ratio = percentile(&w.during, 99.0).as_secs_f64()
            / percentile(&quiet, 99.0).as_secs_f64().max(1e-9);
        ratios.push(ratio);
        writeln!(
            r,
            "      {:<6} {:>7.0}/s {:>7.2} s {:>10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>6.2}x",
            i + 1,
            w.achieved_rate,
            w.pass_secs,
            thousands(w.pass_events as u64),
            w.during.len(),
            ms(percentile(&quiet, 50.0)),
            ms(percentile(&quiet, 99.0)),
            ms(percentile(&w.during, 50.0)),
            ms(percentile(&w.during, 99.0)),
            ratio
        )?;
        if w.after.len() < 1000 {
            writeln!(
                r,
                "      !!! round {}: only {} transactions after the pass (it outlasted the writers' budget)",
                i + 1,
                w.after.len()
            )?;
        }
    }
    let writer_ratio = median(&ratios);
    writeln!(
        r,
        "      p99 during / p99 without: median of rounds {writer_ratio:.2}x (target <= {WRITER_P99_RATIO}x): {}",
        verdict(writer_ratio <= WRITER_P99_RATIO)
    )?;

    let per_event = source_bytes as f64 / events as f64 * segments.1 as f64;
    let share_measured = segments.2 as f64 / archived_bytes_table as f64;
    let share_per_event = segments.2 as f64 / per_event;
    writeln!(
        r,
        "\n   c. disk: the archive of {} events is {} ({} bytes recorded, {} in the directory).\n      \
         In the table (events with its indexes and TOAST, pg_total_relation_size): {} before the pass, both compacted\n      \
         by VACUUM FULL; the archived copy {} after it: the rows that left took {} -> archive/table {:.1} %.\n      \
         Per event instead ({} per event x {} events = {}): {:.1} %. Target <= {:.0} %: {}",
        thousands(segments.1 as u64),
        mib(segments.2 as u64 / 1024),
        thousands(segments.2 as u64),
        thousands(archive_dir_bytes),
        mib(source_bytes as u64 / 1024),
        mib((source_bytes - archived_bytes_table) as u64 / 1024),
        mib(archived_bytes_table as u64 / 1024),
        100.0 * share_measured,
        (source_bytes as f64 / events as f64).round(),
        thousands(segments.1 as u64),
        mib(per_event as u64 / 1024),
        100.0 * share_per_event,
        100.0 * ARCHIVE_SHARE,
        verdict(share_measured <= ARCHIVE_SHARE)
    )?;

    writeln!(
        r,
        "\n   d. replay (`run --once --replay ...`, spawn to exit; config with [archive] in both) of NAME_as (all {} events\n      \
         in the table) and NAME_ar (the same log, {} of it archived in {} segments, {} left in the table);\n      \
         {} rounds, variants interleaved (order swapped each round)",
        thousands(events as u64),
        thousands(segments.1 as u64),
        segments.0,
        thousands(remaining_events as u64),
        a.runs
    )?;
    writeln!(
        r,
        "      {:<26} {:<17} {:>9} {:>22} {:>10} {:>10}",
        "replay", "variant", "median", "runs (s)", "peak RSS", "ratio"
    )?;
    let mut replay_ratios = Vec::new();
    let mut replay_peak = 0;
    for (k, (label, _)) in REPLAYS.iter().enumerate() {
        let hot: Vec<f64> = variants[0].times[k].iter().map(|x| x.0).collect();
        for v in &variants {
            let times: Vec<f64> = v.times[k].iter().map(|x| x.0).collect();
            let peak = v.times[k].iter().map(|x| x.1).max().unwrap_or(0);
            replay_peak = replay_peak.max(peak);
            let ratio = median(&times) / median(&hot);
            writeln!(
                r,
                "      {:<26} {:<17} {:>7.2} s {:>22} {:>10} {:>9.2}x",
                label,
                v.name,
                median(&times),
                joined(&times, 2),
                mib(peak),
                ratio
            )?;
            if v.name != variants[0].name {
                replay_ratios.push((label, ratio));
            }
        }
    }
    let worst = replay_ratios
        .iter()
        .map(|(_, x)| *x)
        .fold(f64::NAN, f64::max);
    writeln!(
        r,
        "      half archived / all in the table (medians): {} (target <= {REPLAY_RATIO}x each): {}",
        replay_ratios
            .iter()
            .map(|(l, x)| format!("{} {x:.2}x", l.trim_start_matches("--replay ")))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(worst <= REPLAY_RATIO)
    )?;
    writeln!(
        r,
        "      projections after the last replays: the same in both databases (md5 of daily_revenue's and order_snapshots'\n      \
         rows): {}",
        if same { "yes" } else { "NO" }
    )?;

    writeln!(
        r,
        "\n   e. peak RSS (largest VmHWM, polled every 10 ms) with {large_events} events of {} MB (the large phase's),\n      \
         the benchmark run as pgfold with notes_length (decoded events), {} rounds on a fresh NAME_al each:\n      \
         pass {} (runs {}), `run --once --replay notes_length` from the archive {} (runs {}), notes_length right: {};\n      \
         1 M-event passes above {}, replays {}. Target < {}: {}",
        large_bytes / 1_000_000,
        a.runs,
        mib(large.pass_peak()),
        large.pass.iter().map(|p| mib(p.1)).collect::<Vec<_>>().join(" "),
        mib(large.replay_peak()),
        large.replay.iter().map(|p| mib(p.1)).collect::<Vec<_>>().join(" "),
        if large.right { "yes" } else { "NO" },
        mib(pass_peak),
        mib(replay_peak),
        mib(PEAK_RSS_KIB),
        verdict(
            large.pass_peak().max(large.replay_peak()).max(pass_peak).max(replay_peak)
                < PEAK_RSS_KIB
        )
    )?;
    writeln!(
        r,
        "   (phase time {:.0} s; NAME_as and NAME_ar are kept for inspection, the archive directory is removed)",
        started.elapsed().as_secs_f64()
    )?;
    if !same || !large.right {
        println!("\n{}", env.report);
        bail!(
            "an archive replay's projections differ from the replay of the same log from the table"
        );
    }
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// Peak RSS of passes and archive replays over the large phase's events.
struct Large {
    pass: Vec<(f64, u64)>,
    replay: Vec<(f64, u64)>,
    right: bool,
}

impl Large {
    fn pass_peak(&self) -> u64 {
        self.pass.iter().map(|p| p.1).max().unwrap_or(0)
    }

    fn replay_peak(&self) -> u64 {
        self.replay.iter().map(|p| p.1).max().unwrap_or(0)
    }
}

async fn large_memory(env: &Env, admin: &Client, db_name: &str, dir: &Path) -> Result<Large> {
    let this = std::env::current_exe()?;
    let as_pgfold = || Daemon::command(&this).env(AS_PGFOLD, "1");
    let (large_events, large_bytes) = LARGE;
    let mut out = Large {
        pass: Vec::new(),
        replay: Vec::new(),
        right: true,
    };
    for round in 1..=env.args.runs {
        let (_, url) = bare_database(&env.admin, db_name).await?;
        db::migrate(&url).await?;
        let client = connect(&url).await?;
        load_large(&client).await?;
        let archive_dir: PathBuf = dir.join(format!("large-{round}"));
        let config = write_config(
            &dir.join(format!("large-{round}.toml")),
            &archive_dir,
            "0 seconds",
        )?;
        output_of(as_pgfold(), &url, &["--config", &config, "run", "--once"]).await?;
        let (secs, peak, _) =
            output_of(as_pgfold(), &url, &["--config", &config, "archive"]).await?;
        let moved = archived(&client).await?;
        log(format!(
            "archive large round {round}/{}: pass moved {} events in {} segments in {secs:.2} s, peak RSS {}",
            env.args.runs,
            moved.1,
            moved.0,
            mib(peak)
        ));
        if moved.1 != i64::from(large_events) {
            bail!(
                "the pass moved {} of the {large_events} large events",
                moved.1
            );
        }
        out.pass.push((secs, peak));
        let (secs, peak, _) = output_of(
            as_pgfold(),
            &url,
            &[
                "--config",
                &config,
                "run",
                "--once",
                "--replay",
                "notes_length",
            ],
        )
        .await?;
        log(format!(
            "archive large round {round}/{}: replay of notes_length from the archive {secs:.2} s, peak RSS {}",
            env.args.runs,
            mib(peak)
        ));
        out.replay.push((secs, peak));
        let right = scalar_i64(
            &client,
            &format!("SELECT count(*) FROM notes_length WHERE chars = {large_bytes} / 32 * 32"),
        )
        .await?;
        out.right &= right == i64::from(large_events);
        drop(client);
        db::drop_database(admin, db_name).await?;
        let _ = std::fs::remove_dir_all(&archive_dir);
    }
    Ok(out)
}
