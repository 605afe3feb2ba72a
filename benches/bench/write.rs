//! Phase 4, write-side cost: writers placing orders on a bare table (A), a migrated
//! one (M), one `pgfold run` keeps current (B) and one with inline triggers (T).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use pgfold::store;
use pgfold::testkit::db::{self, connect};
use tokio_postgres::Client;

use crate::common::{
    check, correctness, items, joined, log, median, mib, notification_counter, order_created,
    order_paid, run_nonce, running_daemon, stop_daemon, wait_caught_up, DaemonCpu, Rng,
};
use crate::Env;

/// The application's table as the article has it: the CREATE TABLE and 3 indexes.
pub const BARE_SCHEMA: &str = include_str!("../../migrations/V1__events.sql");

/// The write-side configurations, in the order each round runs them.
const WRITE_CONFIGS: [&str; 5] = ["A", "M", "G", "B", "T"];

/// Configuration T: both read models kept inline by row triggers on `events`, as a
/// team without pgfold would write them. They must produce exactly the rows of
/// pgfold's built-ins (checked against `pgfold::testkit::workload`'s SQL folds after the
/// rounds), or the comparison would flatter one side.
const INLINE_TRIGGERS: &str = r#"
CREATE TABLE daily_revenue (
  day DATE NOT NULL,
  category TEXT NOT NULL,
  total NUMERIC NOT NULL,
  PRIMARY KEY (day, category)
);
CREATE TABLE order_snapshots (
  stream_id TEXT PRIMARY KEY,
  sequence BIGINT NOT NULL,
  state JSONB NOT NULL,
  projected_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE FUNCTION inline_daily_revenue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- Sorted so that concurrent payers lock the shared (day, category) rows in one
  -- order: otherwise two of them deadlock.
  INSERT INTO daily_revenue AS d (day, category, total)
  SELECT (NEW.occurred_at AT TIME ZONE 'UTC')::date, i->>'category',
         sum((i->>'price')::numeric * (i->>'qty')::numeric)
    FROM jsonb_array_elements(NEW.payload->'items') AS i
   GROUP BY 1, 2
   ORDER BY 2
  ON CONFLICT (day, category) DO UPDATE SET total = d.total + EXCLUDED.total;
  RETURN NULL;
END $$;
CREATE TRIGGER inline_daily_revenue AFTER INSERT ON events
  FOR EACH ROW WHEN (NEW.event_type = 'OrderPaid') EXECUTE FUNCTION inline_daily_revenue();

CREATE FUNCTION inline_order_snapshots() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  stamp text := to_char(NEW.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
BEGIN
  IF NEW.event_type = 'OrderCreated' THEN
    INSERT INTO order_snapshots AS o (stream_id, sequence, state)
    VALUES (NEW.stream_id, NEW.sequence, jsonb_build_object(
              'orderId', coalesce(NEW.payload->'orderId', 'null'),
              'customerId', coalesce(NEW.payload->'customerId', 'null'),
              'items', coalesce(NEW.payload->'items', 'null'),
              'status', 'pending'))
    ON CONFLICT (stream_id) DO UPDATE
      SET sequence = EXCLUDED.sequence, state = EXCLUDED.state, projected_at = now();
  ELSE
    UPDATE order_snapshots
       SET sequence = NEW.sequence, projected_at = now(),
           state = state || CASE NEW.event_type
             WHEN 'OrderPaid' THEN jsonb_build_object('status', 'paid', 'paidAt', stamp)
             WHEN 'OrderShipped' THEN jsonb_build_object('status', 'shipped', 'shippedAt', stamp)
               || CASE WHEN NEW.payload->'address' IS NULL OR NEW.payload->'address' = 'null' THEN '{}'
                       ELSE jsonb_build_object('shippingAddress', NEW.payload->'address') END
             ELSE jsonb_build_object('status', 'cancelled') END
     WHERE stream_id = NEW.stream_id;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER inline_order_snapshots AFTER INSERT ON events
  FOR EACH ROW WHEN (NEW.stream_type = 'order'
                     AND NEW.event_type IN ('OrderCreated', 'OrderPaid', 'OrderShipped', 'OrderCancelled'))
  EXECUTE FUNCTION inline_order_snapshots();
"#;

/// Each client places new orders until the deadline: `OrderCreated` at sequence 1
/// and `OrderPaid` at sequence 2, each in a transaction of its own, as the article's
/// `appendEvent` does. Returns the clients, events committed, seconds and the
/// machine's CPU busy % over the round.
async fn order_round(
    clients: Vec<Client>,
    seconds: f64,
    tag: &str,
) -> Result<(Vec<Client>, u64, f64, f64)> {
    let cpu0 = machine_cpu();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for (w, mut client) in clients.into_iter().enumerate() {
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ ((w as u64 + 7) * 0x9E37_79B9));
            let mut n = 0u64;
            let mut order = 0u64;
            while Instant::now() < deadline {
                let stream = format!("w-{}-{tag}-{w}-{order}", run_nonce());
                order += 1;
                let order_items = items(&mut rng);
                let created = order_created(&stream, &order_items, &mut rng);
                let paid = order_paid(&stream, &order_items);
                for (sequence, event) in [(1, &created), (2, &paid)] {
                    let tx = client.transaction().await?;
                    store::append(&tx, event, sequence).await?;
                    tx.commit().await?;
                    n += 1;
                }
            }
            anyhow::Ok((client, n))
        }));
    }
    let mut clients = Vec::new();
    let mut total = 0;
    for t in tasks {
        let (c, n) = t.await??;
        clients.push(c);
        total += n;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let busy = match (cpu0, machine_cpu()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    };
    Ok((clients, total, elapsed, busy))
}

/// Machine-wide (busy, total) jiffies from /proc/stat; idle and iowait count as idle.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

struct WriteConfig {
    db: String,
    url: String,
    clients: Vec<Client>,
}

/// Database `db`, dropped and created again with the application's bare table:
/// the admin connection and the database's URL.
pub async fn bare_database(admin_url: &str, db: &str) -> Result<(Client, String)> {
    let admin = connect(admin_url).await?;
    db::recreate_database(&admin, db).await?;
    let url = db::with_dbname(admin_url, db);
    connect(&url).await?.batch_execute(BARE_SCHEMA).await?;
    Ok((admin, url))
}

/// Where the log stands when a round starts.
#[derive(Clone, Copy)]
struct Start {
    name: &'static str,
    /// Orders (two events each) loaded, then analysed, before the round.
    orders: i64,
}

/// Issue 25: a new deployment's first events, and a log that has been written
/// and analysed for a while. Plans made on an empty log read all of it once it
/// grows, so the two starts are measured apart.
const STARTS: [Start; 2] = [
    Start {
        name: "empty log (a new deployment)",
        orders: 0,
    },
    Start {
        name: "20,000 orders, analysed",
        orders: 20_000,
    },
];

/// G: what a deployment that archives has on `events` once its first pass ran
/// (src/archive/pass.rs creates the trigger): the append guard, with archived
/// streams for it to probe (none of them the writers' own, whose appends must
/// succeed).
const ARCHIVE_GUARD: &str = "
INSERT INTO pgfold.archive_segments (first_id, last_id, events, bytes, checksum, object_key)
VALUES (1, 10000, 10000, 1, 'bench', 'bench.parquet');
INSERT INTO pgfold.archived_streams (stream_id, last_sequence, segment, first_segment, whole)
SELECT 'archived-' || n, 3, 1, 1, true FROM generate_series(1, 10000) n;
ANALYZE pgfold.archived_streams;
CREATE TRIGGER pgfold_archived_append BEFORE INSERT ON events
  FOR EACH ROW EXECUTE FUNCTION pgfold.guard_archived_append();
";

/// Configuration `k`'s database for one round, dropped and created again as
/// `start` has it, with the writers' connections.
async fn fresh_config(
    admin: &Client,
    admin_url: &str,
    base: &str,
    k: &str,
    start: Start,
    writers: usize,
) -> Result<WriteConfig> {
    let db = format!("{base}_w{}", k.to_lowercase());
    db::recreate_database(admin, &db).await?;
    let url = db::with_dbname(admin_url, &db);
    match k {
        "A" => connect(&url).await?.batch_execute(BARE_SCHEMA).await?,
        "T" => {
            connect(&url)
                .await?
                .batch_execute(&format!("{BARE_SCHEMA}\n{INLINE_TRIGGERS}"))
                .await?
        }
        "G" => {
            db::migrate(&url).await?;
            connect(&url).await?.batch_execute(ARCHIVE_GUARD).await?
        }
        _ => db::migrate(&url).await?,
    }
    if start.orders > 0 {
        // Through T's triggers too, so that its read models hold these orders.
        let client = connect(&url).await?;
        pgfold::testkit::workload::load_orders(&client, 1, start.orders).await?;
        client.batch_execute("ANALYZE events").await?;
    }
    let mut clients = Vec::new();
    for _ in 0..writers {
        clients.push(connect(&url).await?);
    }
    Ok(WriteConfig { db, url, clients })
}

/// What the rounds of one start measured.
#[derive(Default)]
struct Measured {
    /// Per configuration: events/s and machine-wide CPU busy % of each round.
    eps: HashMap<&'static str, Vec<f64>>,
    busy: HashMap<&'static str, Vec<f64>>,
    daemon_cpu: Vec<f64>,
    backend_cpu: Vec<f64>,
    notify_share: Vec<f64>,
    peak_rss: u64,
}

pub async fn write_side(env: &mut Env) -> Result<()> {
    let a = env.args.clone();
    let admin = connect(&env.admin).await?;
    let secs = a.write_seconds as f64;
    let mut run_args = vec!["run".to_string()];
    for p in &a.write_projectors {
        run_args.extend(["--projector".to_string(), p.clone()]);
    }
    let mut checks = Vec::new();
    let mut measured = Vec::new();
    for start in STARTS {
        let mut m = Measured::default();
        for round in 1..=a.runs {
            for k in WRITE_CONFIGS {
                let c = fresh_config(&admin, &env.admin, &a.db, k, start, a.write_writers).await?;
                let tag = format!("{}{round}", k.to_lowercase());
                let (clients, n, s, b) = if k == "B" {
                    let b_client = connect(&c.url).await?;
                    let mut daemon =
                        running_daemon(&b_client, &c.url, run_args.clone(), &a.write_projectors)
                            .await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let (listener, notifications) = notification_counter(&c.url).await?;
                    let cpu0 = DaemonCpu::sample(&b_client, &c.db, &daemon).await?;
                    let out = order_round(c.clients, secs, &tag).await?;
                    let (d, be) = cpu0.until(&DaemonCpu::sample(&b_client, &c.db, &daemon).await?);
                    m.notify_share.push(
                        100.0 * notifications.load(Ordering::Relaxed) as f64 / out.1.max(1) as f64,
                    );
                    drop(listener);
                    m.daemon_cpu.extend(d.map(|d| 100.0 * d / out.2));
                    m.backend_cpu.push(100.0 * be / out.2);
                    daemon.alive()?;
                    if round == a.runs && a.write_projectors.is_empty() {
                        wait_caught_up(&b_client, &mut daemon, &[], Duration::from_secs(600))
                            .await?;
                        for p in ["daily_revenue", "order_snapshots"] {
                            let when = format!("in B (pgfold run), {}", start.name);
                            checks.push(check(&b_client, p, &when).await?);
                        }
                    }
                    m.peak_rss = m.peak_rss.max(stop_daemon(daemon).await?);
                    out
                } else {
                    order_round(c.clients, secs, &tag).await?
                };
                if k == "T" && round == a.runs {
                    let t_client = connect(&c.url).await?;
                    for p in ["daily_revenue", "order_snapshots"] {
                        let when = format!("in T (inline triggers), {}", start.name);
                        checks.push(check(&t_client, p, &when).await?);
                    }
                }
                drop(clients);
                db::drop_database(&admin, &c.db).await?;
                log(format!(
                    "write side, {}, round {round}/{}: {k} {:.0} events/s (machine CPU busy {b:.0} %)",
                    start.name,
                    a.runs,
                    n as f64 / s
                ));
                m.eps.entry(k).or_default().push(n as f64 / s);
                m.busy.entry(k).or_default().push(b);
            }
        }
        measured.push((start, m));
    }
    write_report(env, &measured)?;
    correctness(env, &checks)
}

fn write_report(env: &mut Env, measured: &[(Start, Measured)]) -> Result<()> {
    let a = env.args.clone();
    let r = &mut env.report;
    writeln!(
        r,
        "\n4. Write-side cost: {} writers (own connections) placing new orders as the article's appendEvent \
         does:\n   OrderCreated (sequence 1), then OrderPaid (sequence 2), each BEGIN; INSERT at the expected \
         sequence\n   (pgfold::store::append); COMMIT; 1-5 items in 20 categories, occurred_at = now(). {} s per \
         round,\n   rounds interleaved A M G B T x {}, medians; every round on fresh databases of its own \
         ({}_wa ...),\n   from each start below: an empty log, and 20,000 orders loaded and analysed.",
        a.write_writers, a.write_seconds, a.runs, a.db
    )?;
    writeln!(
        r,
        "   A = bare events table (migrations/V1__events.sql: table + 3 indexes), no read models\n   \
         M = pgfold-migrated (tx_id column, position index, wake-up trigger), no daemon\n   \
         G = M with the archive's append guard on events, as after a first archive pass (10,000 archived streams)\n   \
         B = pgfold-migrated, `pgfold run` keeping the built-ins current (caught up before each round)\n   \
         T = bare table + both read models kept inline by AFTER INSERT FOR EACH ROW triggers (plpgsql), no pgfold"
    )?;
    if !a.write_projectors.is_empty() {
        writeln!(
            r,
            "   B runs only: {} (--write-projectors)",
            a.write_projectors.join(", ")
        )?;
    }
    for (start, m) in measured {
        write_start(r, start, m)?;
    }
    Ok(())
}

fn write_start(r: &mut String, start: &Start, m: &Measured) -> Result<()> {
    let (eps, busy) = (&m.eps, &m.busy);
    writeln!(r, "\n   Start: {}", start.name)?;
    let med = |k: &str| median(&eps[k]);
    let per_round = |k: &str, base: &str| -> f64 {
        let ratios: Vec<f64> = eps[k].iter().zip(&eps[base]).map(|(x, b)| x / b).collect();
        median(&ratios)
    };
    writeln!(r)?;
    writeln!(
        r,
        "   {:<4} {:>30} {:>10} {:>12} {:>20} {:>16}",
        "", "events/s per round", "median", "median/A", "median of round/A", "machine CPU busy"
    )?;
    for k in WRITE_CONFIGS {
        let rounds = joined(&eps[k], 0);
        writeln!(
            r,
            "   {:<4} {:>30} {:>10.0} {:>11.2}x {:>19.2}x {:>15.0}%",
            k,
            rounds,
            med(k),
            med(k) / med("A"),
            per_round(k, "A"),
            median(&busy[k])
        )?;
    }
    writeln!(r)?;
    let pcts = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.0} %"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        r,
        "   B rounds: share of writer transactions that notified (counted by an extra LISTEN connection): {}",
        pcts(&m.notify_share)
    )?;
    writeln!(
        r,
        "   B rounds: CPU of the daemon process {} and of its PostgreSQL backends {} (of one core, per round);\n   \
         daemon peak RSS {}",
        pcts(&m.daemon_cpu),
        pcts(&m.backend_cpu),
        mib(m.peak_rss)
    )?;
    writeln!(
        r,
        "   ratios (median events/s; in brackets the median of per-round ratios):\n   \
         B/A = {:.2}x ({:.2}x)   B/T = {:.2}x ({:.2}x)   T/A = {:.2}x ({:.2}x)   M/A = {:.2}x ({:.2}x)   G/A = {:.2}x ({:.2}x)   G/M = {:.2}x ({:.2}x)\n   \
         targets (issues 11 and 25, from either start): B/T >= 1.2 (stretch 1.3), B/A >= 0.8",
        med("B") / med("A"),
        per_round("B", "A"),
        med("B") / med("T"),
        per_round("B", "T"),
        med("T") / med("A"),
        per_round("T", "A"),
        med("M") / med("A"),
        per_round("M", "A"),
        med("G") / med("A"),
        per_round("G", "A"),
        med("G") / med("M"),
        per_round("G", "M"),
    )?;
    Ok(())
}
