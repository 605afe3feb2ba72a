//! Issue 15, part 2: behind a transaction-mode pooler. A real PgBouncer, started
//! by each test, with fewer server connections than pgfold has pooled ones, so
//! that every server connection is shared between pgfold's connections.
//! `database.prepared_statements = false` sends batches, status and the wake-up
//! flag through it; `database.listen_url` takes LISTEN and migrations straight to
//! the server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio_postgres::{Client, NoTls};

use crate::helpers::*;

/// PgBouncer in `transaction` mode in front of one test database, killed when
/// dropped. It refuses to run as root, so as root it runs as `postgres`.
struct Bouncer {
    child: Child,
    /// Its config and log, readable by the user it runs as.
    dir: tempfile::TempDir,
    port: u16,
    dbname: String,
}

impl Bouncer {
    async fn start(db: &TestDb) -> Bouncer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            dir.path().join("userlist.txt"),
            "\"postgres\" \"\"\n\"root\" \"\"\n",
        )
        .unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]
{name} = host=127.0.0.1 port=5432 dbname={name} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = transaction
max_client_conn = 50
default_pool_size = 2
min_pool_size = 0
reserve_pool_size = 0
server_round_robin = 1
logfile = {dir}/pgbouncer.log
",
                name = db.name,
                dir = dir.path().display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(pgbouncer_binary());
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = postgres_ids_if_root() {
            use std::os::unix::process::CommandExt;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .expect("start pgbouncer (apt-get install pgbouncer)");
        let mut bouncer = Bouncer {
            child,
            dir,
            port,
            dbname: db.name.clone(),
        };
        let url = bouncer.url();
        wait_for(
            "PgBouncer to accept connections",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                let exited = bouncer.child.try_wait().expect("try_wait").is_some();
                let log = bouncer.log();
                async move {
                    assert!(!exited, "pgbouncer exited: {log}");
                    match tokio_postgres::connect(&url, NoTls).await {
                        Ok((client, conn)) => {
                            tokio::spawn(conn);
                            client.simple_query("SELECT 1").await.is_ok()
                        }
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
        bouncer
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port, self.dbname
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn pgbouncer_binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/pgbouncer");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("pgbouncer")
    }
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a numeric id")
}

fn postgres_ids_if_root() -> Option<(u32, u32)> {
    (id(&["-u"]) == 0).then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])))
}

/// A migrated test database, a bouncer in front of it, and a direct client.
async fn behind_a_bouncer() -> (TestDb, Bouncer, Client) {
    let db = TestDb::new().await;
    let bouncer = Bouncer::start(&db).await;
    let client = db.client().await;
    (db, bouncer, client)
}

/// The daemon's environment behind the bouncer: batches through it, LISTEN and
/// migrations straight to the server, a pool twice the bouncer's server pool.
fn behind<'a>(bouncer_url: &'a str, db: &'a TestDb, prepared: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", bouncer_url),
        ("PGFOLD_DATABASE__LISTEN_URL", &db.url),
        ("PGFOLD_DATABASE__PREPARED_STATEMENTS", prepared),
        ("PGFOLD_DATABASE__POOL_SIZE", "4"),
    ]
}

/// The errors a named prepared statement meets behind a transaction pooler.
fn prepared_statement_errors(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| {
            l.contains("prepared statement")
                && (l.contains("does not exist") || l.contains("already exists"))
        })
        .collect()
}

/// Counts, in `disarms`, each time a daemon clears the wake-up flag: it does so
/// only on receiving a notification.
async fn count_disarms(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE disarms (at timestamptz NOT NULL DEFAULT now());
             CREATE FUNCTION count_disarm() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO disarms DEFAULT VALUES; RETURN NULL; END $$;
             CREATE TRIGGER count_disarm AFTER UPDATE ON pgfold.wakeup FOR EACH ROW
               WHEN (OLD.armed AND NOT NEW.armed) EXECUTE FUNCTION count_disarm();",
        )
        .await
        .unwrap();
}

async fn armed(client: &Client) -> bool {
    scalar_i64(
        client,
        "SELECT count(*) FROM pgfold.wakeup WHERE id = 1 AND armed",
    )
    .await
        == 1
}

fn order(n: i64) -> Vec<pgfold::store::NewEvent> {
    let order = format!("order-{n}");
    let price = json!(format!("{n}.50"));
    let mut events = vec![
        created(&order, "books", price.clone(), 1 + n % 3),
        paid(&order, "books", price, 1 + n % 3),
    ];
    if n % 2 == 0 {
        events.push(shipped(&order, "1 Quay Street"));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_instances_behind_a_transaction_pooler_are_woken_and_end_exact() {
    let (db, bouncer, mut client) = behind_a_bouncer().await;
    let url = bouncer.url();
    pgfold::testkit::workload::load_orders(&client, 1, 500)
        .await
        .unwrap();

    // Polling once an hour: within the test, only a notification can wake them.
    let mut env = behind(&url, &db, "false");
    env.push(("PGFOLD_DAEMON__POLL_INTERVAL_MS", "3600000"));
    let mut first = Daemon::spawn(PGFOLD, &["run"], &env);
    let mut second = Daemon::spawn(PGFOLD, &["run"], &env);

    count_disarms(&client).await;
    let mut next = 1_000_000;
    for round in 0..3 {
        // Idle and armed: the next append notifies.
        wait_for(
            &format!("round {round}: caught up, the wake-up flag armed"),
            Duration::from_secs(60),
            || async { armed(&client).await },
        )
        .await;
        let disarms = scalar_i64(&client, "SELECT count(*) FROM disarms").await;
        for _ in 0..5 {
            next += 1;
            append_all(&mut client, &order(next)).await;
        }
        let stream = format!("order-{next}");
        wait_for(
            &format!("round {round}: the appended orders projected on a notification"),
            Duration::from_secs(30),
            || async { snapshot_exists(&client, &stream).await },
        )
        .await;
        // One instance may take the previous round's notification late and clear
        // the flag the other has just set: these appends then notify nobody (the
        // late instance's workers, still looking, project them) until it arms
        // again once idle. So a writer that keeps writing must see one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let disarmed = tokio::time::timeout(Duration::from_secs(2), async {
                while scalar_i64(&client, "SELECT count(*) FROM disarms").await <= disarms {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            if disarmed.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: no notification received (the flag never disarmed) in 30 s"
            );
            wait_for(
                &format!("round {round}: the wake-up flag armed again"),
                Duration::from_secs(60),
                || async { armed(&client).await },
            )
            .await;
            next += 1;
            append_all(&mut client, &order(next)).await;
        }
        assert!(first.is_running() && second.is_running());
    }
    wait_for("both projectors at the last event they consume", Duration::from_secs(60), || async {
        let behind = scalar_i64(
            &client,
            "SELECT count(*) FROM pgfold.projectors p
              WHERE p.position_id < (SELECT max(e.id) FROM events e
                                      WHERE p.name = 'order_snapshots' OR e.event_type = 'OrderPaid')",
        )
        .await;
        behind == 0
    })
    .await;
    first.kill();
    second.kill();
    assert_projections_exact(&client).await;
    let lines = [first.lines(), second.lines()].concat();
    assert!(
        prepared_statement_errors(&lines).is_empty(),
        "errors behind the pooler: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("WARN") && !l.contains("ERROR")),
        "warnings behind the pooler: {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_and_status_run_behind_a_transaction_pooler() {
    let (db, bouncer, client) = behind_a_bouncer().await;
    let url = bouncer.url();
    pgfold::testkit::workload::load_orders(&client, 1, 1_000)
        .await
        .unwrap();
    let env = behind(&url, &db, "false");

    // Two at once, sharing the bouncer's two server connections.
    let replays: Vec<_> = (0..2)
        .map(|_| {
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            std::thread::spawn(move || {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                pgfold(&["run", "--once", "--replay", "all"], &env)
            })
        })
        .collect();
    for replay in replays {
        let out = replay.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "run --once --replay all: {stderr}"
        );
        assert!(!stderr.contains("prepared statement"), "{stderr}");
    }
    assert_projections_exact(&client).await;

    let (code, status) = status_json(&url, &env[1..]);
    assert_eq!(code, Some(0), "{status}");
    for name in ["daily_revenue", "order_snapshots"] {
        let p = projector_status(&status, name);
        assert_eq!(p["state"], "running", "{status}");
        assert_eq!(p["lag_events"], 0, "{status}");
    }
}

/// Without the setting, through the same kind of bouncer: the daemon's prepared
/// statements land on server connections that never saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_fail_behind_a_transaction_pooler() {
    let (db, bouncer, mut client) = behind_a_bouncer().await;
    let url = bouncer.url();
    let mut env = behind(&url, &db, "true");
    env.push(("PGFOLD_DAEMON__POLL_INTERVAL_MS", "50"));
    let daemon = Daemon::spawn(PGFOLD, &["run"], &env);
    // Each append is a reason for a batch; the daemon's pooled connections take
    // turns on the bouncer's two server connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    while prepared_statement_errors(&daemon.lines()).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no prepared-statement error within 60 s: {:#?}",
            daemon.lines()
        );
        next += 1;
        append_all(&mut client, &order(next)).await;
    }
}

/// `pgfold migrate` uses `listen_url` alone: `url` may point nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_connects_to_listen_url() {
    let db = TestDb::empty().await;
    let nowhere = format!("postgres://postgres@127.0.0.1:{}/{}", free_port(), db.name);
    let out = pgfold(
        &["migrate"],
        &[
            ("DATABASE_URL", &nowhere),
            ("PGFOLD_DATABASE__LISTEN_URL", &db.url),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let client = db.client().await;
    // Migrated, and the built-in projectors registered.
    let projectors = scalar_i64(&client, "SELECT count(*) FROM pgfold.projectors").await;
    assert_eq!(projectors, 2, "{stderr}");
}

#[test]
fn a_malformed_listen_url_is_one_line_naming_the_key() {
    let out = pgfold(
        &["migrate"],
        &[(
            "PGFOLD_DATABASE__LISTEN_URL",
            "postgres://app:s3cret@db:notaport/shop",
        )],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("pgfold: database.listen_url: invalid database URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// What the setting promises at the level of one connection: unnamed, nothing is
/// left prepared on the server session (`pg_prepared_statements` lists the
/// protocol-level statements too), whatever the statement and its parameters.
#[tokio::test]
async fn unnamed_statements_leave_nothing_prepared_on_the_connection() {
    use pgfold::db::Statements;
    let db = TestDb::new().await;
    for statements in [Statements::Unnamed, Statements::Prepared] {
        let pg = pgfold::db::pg_config(Some(&db.url))
            .unwrap()
            .with_statements(statements);
        let pool = pgfold::db::pool(&pg, 2).unwrap();
        let conn = pool.get().await.unwrap();
        let row = conn
            .query_one(
                "SELECT $1::text || $2::bigint, $3::text[] = ARRAY['a'], $4::jsonb ->> 'k',
                        ($5::numeric * 2)::text, $6::text IS NULL -- ends in a comment",
                &[
                    &"x",
                    &7i64,
                    &vec!["a"],
                    &json!({"k": "v"}),
                    &rust_decimal::Decimal::new(125, 2),
                    &None::<String>,
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                row.get::<_, String>(0),
                row.get::<_, bool>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(3),
                row.get::<_, bool>(4)
            ),
            (
                "x7".to_string(),
                true,
                "v".to_string(),
                "2.50".to_string(),
                true
            )
        );
        let updated = conn
            .execute(
                "UPDATE pgfold.projectors SET state = state WHERE name = $1",
                &[&"nobody"],
            )
            .await
            .unwrap();
        assert_eq!(updated, 0);
        let err = conn
            .query_one("SELECT 1 WHERE $1::int = 0", &[&1i32])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("number of rows"), "{err}");

        let prepared: i64 = conn
            .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap()
            .get(0);
        match statements {
            Statements::Unnamed => assert_eq!(prepared, 0, "named statements were sent"),
            Statements::Prepared => assert!(prepared > 0, "the pool no longer prepares"),
        }
    }
}
