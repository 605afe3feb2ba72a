//! `run --rebuild`: a projection rebuilt beside the live one and swapped in, so
//! that readers never see it partial; rebuilt by itself when its definition
//! changes; resumed after a crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pgfold::daemon::RunOptions;
use pgfold::projector::{EventFilter, Fold, Projector, ProjectorError, Registry, Tx};
use pgfold::projectors::{DailyRevenue, OrderSnapshots};
use rust_decimal::Decimal;

use crate::helpers::*;

/// What a reader of the two projections sees: daily_revenue's grand total and
/// order_snapshots' row count.
async fn observe(client: &tokio_postgres::Client) -> (Decimal, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(sum(total), 0) FROM daily_revenue),
                    (SELECT count(*) FROM order_snapshots)",
            &[],
        )
        .await
        .expect("read the projections");
    (row.get(0), row.get(1))
}

async fn scalar_opt_text(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    pgfold::testkit::db::scalar(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_all_beside_live_readers_never_see_a_partial_projection() {
    let (db, client) = projected_orders(100_000).await;
    client
        .batch_execute("GRANT SELECT ON daily_revenue, order_snapshots TO PUBLIC")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    // A reader every few milliseconds: what it sees never goes down, since the
    // writers only add paid orders and new streams.
    let reader = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mut last = observe(&client).await;
            let (first, mut reads, mut worse) = (last, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let now = observe(&client).await;
                if now.0 < last.0 || now.1 < last.1 {
                    worse.push((last, now));
                }
                last = now;
                reads += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (first, last, reads, worse)
        })
    };
    // Writers appending meanwhile.
    let writer = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mut next = 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                append_orders(&client, next, 100).await;
                next += 100;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let outcome = run_once(
        &db.settings(),
        RunOptions {
            rebuild: vec!["all".into()],
            ..RunOptions::default()
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (first, last, reads, worse) = reader.await.unwrap();

    assert!(outcome.parked.is_empty(), "{:?}", outcome.parked);
    let mut swapped: Vec<&str> = outcome.swaps.iter().map(|s| s.projector.as_str()).collect();
    swapped.sort();
    assert_eq!(swapped, ["daily_revenue", "order_snapshots"]);
    for s in &outcome.swaps {
        eprintln!(
            "{}: waited {:?} for the exclusive locks, held them {:?}",
            s.projector, s.lock_wait, s.lock_held
        );
        assert!(
            s.lock_held < Duration::from_millis(100),
            "{} held its exclusive locks {:?}",
            s.projector,
            s.lock_held
        );
        // Bounded by the swap's lock_timeout (50 ms), give or take a round trip.
        assert!(
            s.lock_wait < Duration::from_millis(100),
            "{} queued {:?} for its locks",
            s.projector,
            s.lock_wait
        );
    }
    assert!(reads > 20, "the reader read only {reads} times");
    assert!(
        worse.is_empty(),
        "a reader saw the projections go back ({} times), first {:?}",
        worse.len(),
        worse.first()
    );
    assert!(
        last.0 > first.0 && last.1 > first.1,
        "{first:?} -> {last:?}"
    );

    // The rebuilt tables are the live ones; the tail the writers appended after
    // the swap is applied by the next run as any other.
    run_once(&db.settings(), RunOptions::default()).await;
    assert_projections_exact(&client).await;
    for table in ["daily_revenue", "order_snapshots"] {
        assert_eq!(
            scalar_i64(
                &client,
                &format!(
                    "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a
                      WHERE c.oid = '{table}'::regclass AND a.grantee = 0
                        AND a.privilege_type = 'SELECT'"
                ),
            )
            .await,
            1,
            "the grant on {table} survived the swap"
        );
        assert!(
            scalar_opt_text(
                &client,
                &format!("SELECT to_regclass('pgfold_retired_{table}.{table}')::text")
            )
            .await
            .is_some(),
            "the previous {table} is kept in the retired schema"
        );
    }
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT (SELECT count(*) FROM pgfold.projectors WHERE name LIKE '%.build')
                  + (SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pgfold_build_%')"
        )
        .await,
        0,
        "no build is left behind"
    );
}

#[tokio::test]
async fn a_view_on_the_projection_refuses_the_swap_in_one_line() {
    let (db, client) = projected_orders(2_000).await;
    client
        .batch_execute(
            "CREATE VIEW shipped_orders AS
               SELECT stream_id FROM order_snapshots WHERE state ? 'shippingAddress'",
        )
        .await
        .unwrap();
    let before: i64 = scalar_i64(&client, "SELECT count(*) FROM shipped_orders").await;

    let env = [("DATABASE_URL", db.url.as_str())];
    let out = pgfold(&["run", "--once", "--rebuild", "order_snapshots"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("pgfold: cannot swap in the rebuilt order_snapshots")
            && lines[0].contains("public.shipped_orders"),
        "{stderr}"
    );
    // The live projection and the view are untouched.
    assert_projections_exact(&client).await;
    assert_eq!(
        scalar_i64(&client, "SELECT count(*) FROM shipped_orders").await,
        before
    );

    // Without the view, the next run resumes the build and swaps it in.
    client
        .batch_execute("DROP VIEW shipped_orders")
        .await
        .unwrap();
    run_once_completes_the_swap(&client, &env, "order_snapshots").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_build_then_run_once_resumes_and_swaps() {
    let (db, client) = projected_orders(40_000).await;
    // Small batches, so the kill lands among many build commits.
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_DAEMON__BATCH_SIZE", "200"),
        ("PGFOLD_DAEMON__SET_BATCH_SIZE", "300"),
    ];
    let address = format!("127.0.0.1:{}", free_port());
    let mut with_http = env.to_vec();
    with_http.push(("PGFOLD_HTTP__LISTEN", &address));
    let mut daemon = Daemon::spawn(PGFOLD, &["run", "--rebuild", "order_snapshots"], &with_http);
    wait_for(
        "the build to commit some batches",
        Duration::from_secs(60),
        || async {
            scalar_i64(
                &client,
                "SELECT coalesce(max(events_applied), 0) FROM pgfold.projectors
                  WHERE name = 'order_snapshots.build'",
            )
            .await
                > 3_000
        },
    )
    .await;
    // status shows the build while the live projection keeps serving.
    let (_, status) = status_json(&db.url, &[]);
    let snapshots = projector_status(&status, "order_snapshots");
    assert_eq!(snapshots["state"], "running", "{status}");
    assert!(
        snapshots["rebuild"]["position"].as_i64().unwrap() > 0,
        "{status}"
    );
    assert!(
        snapshots["rebuild"]["lag_events"].as_i64().unwrap() > 0,
        "{status}"
    );
    let table = pgfold(&["status"], &[("DATABASE_URL", db.url.as_str())]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("order_snapshots is rebuilding beside its live tables (requested with --rebuild): position "),
        "{text}"
    );
    let (_, metrics) = get(&address, "/metrics").await;
    assert!(
        metrics.contains("pgfold_rebuild_in_progress{projector=\"order_snapshots\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgfold_rebuild_lag_events{projector=\"order_snapshots\"}"),
        "{metrics}"
    );
    daemon.kill(); // SIGKILL
    assert_projections_exact(&client).await;
    let left: i64 = scalar_i64(
        &client,
        "SELECT count(*) FROM pgfold.projectors WHERE name = 'order_snapshots.build'",
    )
    .await;
    assert_eq!(left, 1, "killed before the swap: the build is still there");

    let mut resumed_env = env.to_vec();
    resumed_env.push(("RUST_LOG", "info"));
    let out = pgfold(&["run", "--once"], &resumed_env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming the rebuild beside the live tables"),
        "the build resumed from its checkpoint: {stderr}"
    );
    assert_projections_exact(&client).await;
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM pgfold.projectors WHERE name LIKE '%.build'"
        )
        .await,
        0
    );
    assert!(scalar_opt_text(
        &client,
        "SELECT to_regclass('pgfold_retired_order_snapshots.order_snapshots')::text"
    )
    .await
    .is_some());
}

/// A built-in projector under another version.
struct Versioned<P>(P, u32);

#[async_trait]
impl<P: Projector> Projector for Versioned<P> {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn version(&self) -> u32 {
        self.1
    }
    fn filter(&self) -> EventFilter {
        self.0.filter()
    }
    fn fold(&self) -> Fold<'_> {
        self.0.fold()
    }
    async fn setup(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        self.0.setup(tx).await
    }
    async fn reset(&self, tx: &Tx<'_>) -> Result<(), ProjectorError> {
        self.0.reset(tx).await
    }
}

#[tokio::test]
async fn a_bumped_version_is_rebuilt_by_itself_and_a_missing_fingerprint_adopted() {
    let (db, client) = projected_orders(3_000).await;
    let fingerprints =
        "SELECT string_agg(name || '=' || coalesce(fingerprint, 'NULL'), ' ' ORDER BY name)
                          FROM pgfold.projectors";
    assert_eq!(
        scalar_opt_text(&client, fingerprints).await.as_deref(),
        Some("daily_revenue=v1 order_snapshots=v1")
    );

    let bumped = Registry::new()
        .register(Versioned(DailyRevenue, 2))
        .register(OrderSnapshots);
    let outcome = run_once_with(&db.settings(), &bumped, RunOptions::default()).await;
    let swapped: Vec<&str> = outcome.swaps.iter().map(|s| s.projector.as_str()).collect();
    assert_eq!(swapped, ["daily_revenue"]);
    assert_eq!(
        scalar_opt_text(&client, fingerprints).await.as_deref(),
        Some("daily_revenue=v2 order_snapshots=v1")
    );
    assert_projections_exact(&client).await;
    // The stock binary's daily_revenue is v1 again: status says it will rebuild.
    let (_, status) = status_json(&db.url, &[]);
    assert_eq!(
        projector_status(&status, "daily_revenue")["definition_changed"],
        true,
        "{status}"
    );

    // Back to v1 without a rebuild: the retired tables and their checkpoint
    // return (pgfold.swap_back), then the v1 daemon applies what they lack.
    append_orders(&client, 10_000, 500).await;
    client
        .batch_execute("SELECT pgfold.swap_back('daily_revenue')")
        .await
        .unwrap();
    assert_eq!(
        scalar_opt_text(&client, fingerprints).await.as_deref(),
        Some("daily_revenue=v1 order_snapshots=v1")
    );
    let outcome = run_once(&db.settings(), RunOptions::default()).await;
    assert!(outcome.swaps.is_empty(), "{:?}", outcome.swaps);
    assert_projections_exact(&client).await;
    let error = client
        .batch_execute("SELECT pgfold.swap_back('order_snapshots')")
        .await
        .unwrap_err();
    assert!(
        format!("{error:?}").contains("has no retired projection to swap back to"),
        "{error:?}"
    );

    // A row from before fingerprints were kept is adopted, not rebuilt.
    client
        .batch_execute(
            "UPDATE pgfold.projectors SET fingerprint = NULL WHERE name = 'order_snapshots'",
        )
        .await
        .unwrap();
    let again = Registry::new()
        .register(DailyRevenue)
        .register(Versioned(OrderSnapshots, 3));
    let outcome = run_once_with(&db.settings(), &again, RunOptions::default()).await;
    assert!(outcome.swaps.is_empty(), "{:?}", outcome.swaps);
    assert_eq!(
        scalar_opt_text(&client, fingerprints).await.as_deref(),
        Some("daily_revenue=v1 order_snapshots=v3")
    );
}

#[tokio::test]
async fn run_once_ends_when_the_rebuild_beside_parks() {
    // Arrange: the live daily_revenue (v1) has folded every event; an OrderPaid
    // is then damaged, so that v2's build beside parks on it.
    let (db, client) = projected_orders(500).await;
    let poison = scalar_i64(
        &client,
        "UPDATE events SET payload = jsonb_set(payload, '{items}', '\"none\"')
          WHERE id = (SELECT min(id) FROM events WHERE event_type = 'OrderPaid') RETURNING id",
    )
    .await;
    let mut settings = db.settings();
    settings.projectors.insert(
        "daily_revenue".into(),
        pgfold::config::ProjectorSettings {
            max_attempts: 1,
            enabled: true,
            ..Default::default()
        },
    );
    let bumped = Registry::new()
        .register(Versioned(DailyRevenue, 2))
        .register(OrderSnapshots);

    // Act: the live tables wait for a swap that the parked build never makes.
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        run_once_with(&settings, &bumped, RunOptions::default()),
    )
    .await
    .expect("run --once waited for ever on live tables whose rebuild had parked");

    // Assert: the build is reported parked on that event, and nothing swapped.
    assert!(outcome.swaps.is_empty(), "{:?}", outcome.swaps);
    assert_eq!(outcome.parked.len(), 1, "{:?}", outcome.parked);
    assert_eq!(outcome.parked[0].event_id, poison);
    assert_eq!(
        scalar_opt_text(
            &client,
            "SELECT fingerprint FROM pgfold.projectors WHERE name = 'daily_revenue'"
        )
        .await
        .as_deref(),
        Some("v1")
    );
}

/// A projector defined outside pgfold (examples/custom_projector.rs: two tables,
/// decoded events, folded in Rust) rebuilds beside its live tables too: it only
/// has to address them by unqualified name.
#[tokio::test]
async fn a_custom_projector_rebuilds_beside_its_live_tables() {
    let db = TestDb::new().await;
    let client = db.client().await;
    append_orders(&client, 1, 2_000).await;
    let env = [("DATABASE_URL", db.url.as_str())];
    let run = |args: &[&str]| {
        let out = std::process::Command::new(custom_projector_binary())
            .args(args)
            .env_remove("DATABASE_URL")
            .envs(env)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["run", "--once", "--projector", "customer_spend"]);
    let live = "SELECT customer_id, paid FROM customer_spend";
    client
        .batch_execute(&format!("CREATE TABLE spend_before AS {live}"))
        .await
        .unwrap();
    // Tamper with the live copy: the rebuild must come from the log, not from it.
    client
        .batch_execute("UPDATE customer_spend SET paid = paid + 1")
        .await
        .unwrap();

    run(&["run", "--once", "--rebuild", "customer_spend"]);

    let differences = pgfold::testkit::workload::differences(
        &client,
        live,
        "SELECT customer_id, paid FROM spend_before",
    )
    .await
    .unwrap();
    assert_eq!(differences, 0, "customer_spend rebuilt from the log");
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgfold_retired_customer_spend'"
        )
        .await,
        2,
        "both of its tables were swapped"
    );
}

/// Two instances asked to rebuild the same projection: one swaps, the other sees
/// its build gone and carries on serving, and the projection is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_rebuild_once_and_both_carry_on() {
    let (db, client) = projected_orders(20_000).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("RUST_LOG", "info"),
        ("PGFOLD_DAEMON__SET_BATCH_SIZE", "2000"),
    ];
    let args = ["run", "--rebuild", "daily_revenue"];
    let mut a = Daemon::spawn(PGFOLD, &args, &env);
    let mut b = Daemon::spawn(PGFOLD, &args, &env);
    let said = |d: &Daemon, text: &str| d.lines().iter().filter(|l| l.contains(text)).count();
    wait_for("a swap", Duration::from_secs(60), || async {
        said(&a, "rebuilt projection swapped in") + said(&b, "rebuilt projection swapped in") == 1
            && said(&a, "another instance swapped the rebuild in")
                + said(&b, "another instance swapped the rebuild in")
                == 1
    })
    .await;
    assert!(a.is_running() && b.is_running());
    let newest = append_orders(&client, 100_000, 500).await;
    wait_for(
        "the live projections to catch up",
        Duration::from_secs(60),
        || async {
            scalar_i64(&client, "SELECT min(position_id) FROM pgfold.projectors").await == newest
        },
    )
    .await;
    a.kill();
    b.kill();
    assert_projections_exact(&client).await;
    for d in [&a, &b] {
        assert_eq!(said(d, "retrying"), 0, "{:?}", d.lines());
    }
}

/// A SQL projection whose file changes is rebuilt beside its live table by
/// itself, and a reader never sees it partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_sql_projection_file_is_rebuilt_by_itself_with_no_partial_reads() {
    let db = TestDb::new().await;
    let client = db.client().await;
    append_orders(&client, 1, 30_000).await;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/projections/daily_revenue_sql.toml"),
    )
    .unwrap();
    write_projection(&dir, "daily_revenue_sql", &example);
    let load = || pgfold::sql_projections::load(pgfold::projectors::builtin(), Some(&dir)).unwrap();
    let pg = pgfold::db::pg_config(Some(&db.url)).unwrap();
    pgfold::daemon::migrate(&pg, &load()).await.unwrap();
    run_once_with(&db.settings(), &load(), RunOptions::default()).await;
    let expected = |factor: i32| {
        format!(
            "SELECT day, category, total * {factor} FROM ({}) x",
            pgfold::testkit::workload::EXPECTED_DAILY_REVENUE
        )
    };
    let live = "SELECT day, category, total FROM daily_revenue_sql";
    assert_eq!(
        pgfold::testkit::workload::differences(&client, live, &expected(1))
            .await
            .unwrap(),
        0
    );

    // The definition of revenue changes: twice the amount.
    let doubled = example.replace(
        "* (i.item->>'qty')::numeric AS amount",
        "* (i.item->>'qty')::numeric * 2 AS amount",
    );
    assert_ne!(doubled, example);
    write_projection(&dir, "daily_revenue_sql", &doubled);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let total = || async {
                client
                    .query_one("SELECT coalesce(sum(total), 0) FROM daily_revenue_sql", &[])
                    .await
                    .unwrap()
                    .get::<_, Decimal>(0)
            };
            let first = total().await;
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(total().await);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (first, seen)
        })
    };
    let outcome = run_once_with(&db.settings(), &load(), RunOptions::default()).await;
    stop.store(true, Ordering::Relaxed);
    let (first, seen) = reader.await.unwrap();
    drop(temp);

    let swapped: Vec<&str> = outcome.swaps.iter().map(|s| s.projector.as_str()).collect();
    assert_eq!(swapped, ["daily_revenue_sql"]);
    assert_eq!(
        pgfold::testkit::workload::differences(&client, live, &expected(2))
            .await
            .unwrap(),
        0,
        "the new definition, from the first event"
    );
    // Before the swap the old total, after it the doubled one: nothing between.
    let doubled_total = first * Decimal::from(2);
    assert!(!seen.is_empty());
    for t in &seen {
        assert!(
            *t == first || *t == doubled_total,
            "a reader saw {t}, neither {first} nor {doubled_total}"
        );
    }
}

/// SIGKILL in the middle of the swap transaction (held up by a reader, so that
/// it can be caught there): the old projection stays, complete, and the next
/// run swaps the new one in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_swap_leaves_the_old_projection_then_run_once_swaps() {
    let (db, client) = projected_orders(5_000).await;
    // A reader in a long transaction: every swap attempt queues behind it for
    // its lock_timeout, gives up and retries.
    let reader = db.client().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM daily_revenue")
        .await
        .unwrap();
    let env = [("DATABASE_URL", db.url.as_str())];
    let mut daemon = Daemon::spawn(PGFOLD, &["run", "--rebuild", "daily_revenue"], &env);
    let in_swap = format!(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = '{}' AND wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%'",
        db.name
    );
    wait_for(
        "a swap waiting for its lock",
        Duration::from_secs(60),
        || async { scalar_i64(&client, &in_swap).await > 0 },
    )
    .await;
    daemon.kill(); // SIGKILL, mid-transaction
    reader.batch_execute("COMMIT").await.unwrap();

    // Old and complete: the swap's transaction left nothing behind.
    assert_projections_exact(&client).await;
    assert_eq!(
        scalar_opt_text(
            &client,
            "SELECT to_regclass('pgfold_retired_daily_revenue.daily_revenue')::text"
        )
        .await,
        None,
        "nothing was retired"
    );
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM pgfold.projectors WHERE name = 'daily_revenue.build'"
        )
        .await,
        1
    );

    run_once_completes_the_swap(&client, &env, "daily_revenue").await;
}

/// An instance still running the old definition stops applying once the new one
/// is swapped in: it never folds with one definition into tables built with
/// another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_the_old_definition_stops_applying_after_the_swap() {
    let (db, client) = projected_orders(2_000).await;
    // The stock binary: daily_revenue v1.
    let env = [("DATABASE_URL", db.url.as_str()), ("RUST_LOG", "info")];
    let old = Daemon::spawn(PGFOLD, &["run"], &env);
    // Running (past its start, where it would see v2 tables and rebuild v1)
    // before v2 starts.
    wait_for(
        "the old instance to run",
        Duration::from_secs(60),
        || async { old.lines().iter().any(|l| l.contains("running")) },
    )
    .await;
    let bumped = Registry::new()
        .register(Versioned(DailyRevenue, 2))
        .register(OrderSnapshots);
    let outcome = run_once_with(&db.settings(), &bumped, RunOptions::default()).await;
    assert_eq!(outcome.swaps.len(), 1);

    let newest = append_orders(&client, 10_000, 200).await;
    wait_for(
        "the old instance to keep order_snapshots current and refuse daily_revenue",
        Duration::from_secs(60),
        || async {
            scalar_i64(
                &client,
                "SELECT position_id FROM pgfold.projectors WHERE name = 'order_snapshots'",
            )
            .await
                == newest
                && old
                    .lines()
                    .iter()
                    .any(|l| l.contains("built with another definition"))
        },
    )
    .await;
    assert!(
        scalar_i64(
            &client,
            "SELECT position_id FROM pgfold.projectors WHERE name = 'daily_revenue'"
        )
        .await
            < newest,
        "the v1 instance applied into the v2 tables"
    );
    drop(old);
    run_once_with(&db.settings(), &bumped, RunOptions::default()).await;
    assert_projections_exact(&client).await;
}

/// `pgfold run --once` succeeds, both projections equal their folds, and the
/// swap retired `projector`'s old table.
async fn run_once_completes_the_swap(
    client: &tokio_postgres::Client,
    env: &[(&str, &str)],
    projector: &str,
) {
    pgfold_ok(&["run", "--once"], env);
    assert_projections_exact(client).await;
    let retired = format!("SELECT to_regclass('pgfold_retired_{projector}.{projector}')::text");
    assert!(
        scalar_opt_text(client, &retired).await.is_some(),
        "{projector} was not retired"
    );
}
