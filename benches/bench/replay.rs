//! Phase 2, replay: `pgfold run --once --replay ...` of each built-in and of all,
//! against the same fold in pure SQL (`INSERT ... SELECT`).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;
use pgfold::testkit::db::{connect, scalar_i64};
use pgfold::testkit::workload;

use crate::common::{
    check, correctness, joined, log, median, mib, pgfold_once, replay_args, thousands,
};
use crate::Env;

/// A rebuild: what it rebuilds, its `pgfold` command line, and its (wall time,
/// peak RSS) per run.
type Rebuild = (&'static str, &'static [&'static str], Vec<(f64, u64)>);

/// A replay through an upcaster: what it replays, which upcaster, its command
/// line, and its (wall time, peak RSS) per run.
type Upcast<'a> = (
    &'static str,
    &'static Upcaster,
    Vec<&'a str>,
    Vec<(f64, u64)>,
);

/// An upcaster of `--upcast`: what the report calls it, and its `payload`
/// expression, from version `from` of `OrderPaid` (the log's are all version 1).
struct Upcaster {
    what: &'static str,
    from: i32,
    payload: &'static str,
}

/// `--upcast`'s upcasters. None changes what a projection holds, so the checks
/// still apply.
const UPCASTERS: [Upcaster; 2] = [
    // The example, on every OrderPaid.
    Upcaster {
        what: "upcaster on every OrderPaid",
        from: 1,
        payload: "payload || jsonb_build_object('currency', 'EUR')",
    },
    // One no event matches: what the layer itself costs, without an expression.
    Upcaster {
        what: "upcaster matching no event",
        from: 7,
        payload: "payload || jsonb_build_object('currency', 'EUR')",
    },
];

/// The pure-SQL rebuild's table.
const SCRATCH_TABLE: &str = "bench_sql_daily_revenue";

/// One `pgfold run --once` timed and logged as `what`.
async fn timed(url: &str, what: &str, args: &[&str]) -> Result<(f64, u64)> {
    let r = pgfold_once(url, args).await?;
    log(format!("{what} {:.2} s, peak RSS {}", r.0, mib(r.1)));
    Ok(r)
}

pub async fn replay(env: &mut Env) -> Result<()> {
    let runs = env.args.runs;
    let client = connect(&env.url).await?;
    let events = scalar_i64(&client, "SELECT count(*) FROM events").await? as u64;
    let paid = scalar_i64(
        &client,
        "SELECT count(*) FROM events WHERE event_type = 'OrderPaid'",
    )
    .await? as u64;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {SCRATCH_TABLE};
             CREATE TABLE {SCRATCH_TABLE} (
               day DATE NOT NULL, category TEXT NOT NULL, total NUMERIC NOT NULL,
               PRIMARY KEY (day, category));
             ANALYZE events;"
        ))
        .await?;
    let insert = format!(
        "INSERT INTO {SCRATCH_TABLE} (day, category, total) {}",
        workload::EXPECTED_DAILY_REVENUE
    );
    // The same fold in pure SQL with the upcaster's expression applied to every
    // OrderPaid: what the expression itself costs, whoever applies it.
    let insert_upcast = insert.replacen(
        "FROM events e",
        &format!(
            "FROM (SELECT occurred_at, event_type, {} AS payload FROM events) e",
            UPCASTERS[0].payload
        ),
        1,
    );
    assert_ne!(insert, insert_upcast, "the pure-SQL fold reads `events e`");
    let sql_once = |statement: String| {
        let client = &client;
        async move {
            client
                .batch_execute(&format!("TRUNCATE {SCRATCH_TABLE}"))
                .await?;
            let t = Instant::now();
            client.execute(&statement, &[]).await?;
            anyhow::Ok(t.elapsed().as_secs_f64())
        }
    };
    log("replay: warm-up (pure SQL once, untimed)");
    sql_once(insert.clone()).await?;

    const DR: &[&str] = &replay_args("daily_revenue");
    const OS: &[&str] = &replay_args("order_snapshots");
    const ALL: &[&str] = &["run", "--once", "--replay", "all"];
    // The same rebuilds beside the live projection (issue 14): build, catch up,
    // swap in; the swap drops the copy the previous one retired.
    const RB_DR: &[&str] = &[
        "run",
        "--once",
        "--rebuild",
        "daily_revenue",
        "--projector",
        "daily_revenue",
    ];
    const RB_OS: &[&str] = &[
        "run",
        "--once",
        "--rebuild",
        "order_snapshots",
        "--projector",
        "order_snapshots",
    ];
    let mut beside: [Rebuild; 2] = [
        ("daily_revenue", RB_DR, Vec::new()),
        ("order_snapshots", RB_OS, Vec::new()),
    ];

    // With --upcast, the same replays through each of UPCASTERS.
    let configs = UPCASTERS
        .iter()
        .map(|u| {
            let config = tempfile::NamedTempFile::new()?;
            std::fs::write(
                config.path(),
                format!(
                    "[[upcasters]]\nevent_type = \"OrderPaid\"\nfrom_version = {}\nto_version = {}\n\
                     payload = {:?}\n",
                    u.from,
                    u.from + 1,
                    u.payload
                ),
            )?;
            Ok((u, config))
        })
        .collect::<Result<Vec<_>>>()?;
    let paths: Vec<(&Upcaster, String)> = configs
        .iter()
        .map(|(u, c)| (*u, c.path().to_string_lossy().to_string()))
        .collect();
    let mut upcast: Vec<Upcast> = Vec::new();
    if env.args.upcast {
        for (u, path) in &paths {
            for (name, args) in [("daily_revenue", DR), ("order_snapshots", OS)] {
                let with: Vec<&str> = ["--config", path.as_str()]
                    .into_iter()
                    .chain(args.iter().copied())
                    .collect();
                upcast.push((name, *u, with, Vec::new()));
            }
        }
    }
    let mut sql_upcast = Vec::new();

    let mut sql = Vec::new();
    let mut rebuilds: [Rebuild; 3] = [
        ("daily_revenue", DR, Vec::new()),
        ("order_snapshots", OS, Vec::new()),
        ("all", ALL, Vec::new()),
    ];
    let mut checks: Vec<(String, i64, f64)> = Vec::new();
    for run in 1..=runs {
        let s = sql_once(insert.clone()).await?;
        log(format!("replay run {run}/{runs}: pure SQL {s:.2} s"));
        sql.push(s);
        if env.args.upcast {
            let s = sql_once(insert_upcast.clone()).await?;
            log(format!(
                "replay run {run}/{runs}: pure SQL, the upcaster's expression on every OrderPaid {s:.2} s"
            ));
            sql_upcast.push(s);
        }
        for (name, args, results) in &mut rebuilds {
            let r = pgfold_once(&env.url, args).await?;
            log(format!(
                "replay run {run}/{runs}: pgfold {name} {:.2} s, peak RSS {}",
                r.0,
                mib(r.1)
            ));
            results.push(r);
            if run == runs && *name != "all" {
                let when = format!("after --replay {name}");
                checks.push(check(&client, name, &when).await?);
            }
        }
        for (name, u, args, results) in &mut upcast {
            let what = format!("replay run {run}/{runs}: pgfold {name}, {}", u.what);
            results.push(timed(&env.url, &what, args).await?);
            if run == runs {
                let when = format!("after --replay {name} with an {}", u.what);
                checks.push(check(&client, name, &when).await?);
            }
        }
        for (name, args, results) in &mut beside {
            let r = pgfold_once(&env.url, args).await?;
            log(format!(
                "replay run {run}/{runs}: pgfold --rebuild {name} {:.2} s, peak RSS {}",
                r.0,
                mib(r.1)
            ));
            results.push(r);
            if run == runs {
                let when = format!("after --rebuild {name}");
                checks.push(check(&client, name, &when).await?);
            }
        }
    }
    let [(_, _, rb_dr), (_, _, rb_os)] = beside;
    let [(_, _, dr), (_, _, os), (_, _, all)] = rebuilds;
    checks.push(check(&client, "daily_revenue", "after --replay all").await?);
    checks.push(check(&client, "order_snapshots", "after --replay all").await?);

    let sql_median = median(&sql);
    let r = &mut env.report;
    writeln!(
        r,
        "\n2. Replay: {} events in the log ({} OrderPaid); {runs} runs each, interleaved \
         (SQL, daily_revenue, order_snapshots, all per round), after one untimed warm-up",
        thousands(events),
        thousands(paid)
    )?;
    writeln!(
        r,
        "   events/s = all events in the log / median wall time. pgfold times are the whole \
         child process\n   (`pgfold run --once --replay ...`: start, connect, reset, rebuild, exit). \
         Peak RSS = max VmHWM, polled every 10 ms."
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "   {:<46} {:>9} {:>26} {:>11} {:>8} {:>10}",
        "rebuild", "median", "runs (s)", "events/s", "vs SQL", "peak RSS"
    )?;
    let line = |r: &mut String, name: &str, times: &[f64], peak: Option<u64>| -> Result<()> {
        let m = median(times);
        let runs_text = joined(times, 2);
        writeln!(
            r,
            "   {:<46} {:>7.2} s {:>26} {:>11} {:>7.2}x {:>10}",
            name,
            m,
            runs_text,
            thousands((events as f64 / m) as u64),
            m / sql_median,
            peak.map(mib).unwrap_or_else(|| "-".into())
        )?;
        Ok(())
    };
    line(r, "pure SQL: INSERT ... SELECT (daily_revenue)", &sql, None)?;
    let times = |v: &[(f64, u64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    let peak = |v: &[(f64, u64)]| v.iter().map(|x| x.1).max();
    line(r, "pgfold --replay daily_revenue", &times(&dr), peak(&dr))?;
    line(r, "pgfold --replay order_snapshots", &times(&os), peak(&os))?;
    line(r, "pgfold --replay all", &times(&all), peak(&all))?;
    line(
        r,
        "pgfold --rebuild daily_revenue",
        &times(&rb_dr),
        peak(&rb_dr),
    )?;
    line(
        r,
        "pgfold --rebuild order_snapshots",
        &times(&rb_os),
        peak(&rb_os),
    )?;
    writeln!(
        r,
        "   rebuild beside / replay in place: daily_revenue {:.2}x, order_snapshots {:.2}x (target <= 1.3x)",
        median(&times(&rb_dr)) / median(&times(&dr)),
        median(&times(&rb_os)) / median(&times(&os))
    )?;
    if !upcast.is_empty() {
        line(
            r,
            "pure SQL, the upcaster's expression on OrderPaid",
            &sql_upcast,
            None,
        )?;
    }
    for (name, u, _, results) in &upcast {
        let plain = if *name == "daily_revenue" { &dr } else { &os };
        line(
            r,
            &format!("pgfold --replay {name}, {}", u.what),
            &times(results),
            peak(results),
        )?;
        writeln!(
            r,
            "   {} / plain replay: {name} {:.2}x (target <= 1.15x)",
            u.what,
            median(&times(results)) / median(&times(plain))
        )?;
    }
    if !upcast.is_empty() {
        writeln!(
            r,
            "   the expression's own cost, pure SQL with it / without: {:.2}x",
            median(&sql_upcast) / sql_median
        )?;
    }
    writeln!(r)?;
    writeln!(
        r,
        "   daily_revenue consumes {} events (OrderPaid): {} consumed events/s for pgfold --replay daily_revenue",
        thousands(paid),
        thousands((paid as f64 / median(&times(&dr))) as u64)
    )?;
    correctness(env, &checks)
}
