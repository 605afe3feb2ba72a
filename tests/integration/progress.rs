//! Progress of a long replay, as an operator sees it: the real binary on a
//! pseudo-terminal (bars), with JSON logs (structured lines), and `status`.
//!
//! The terminal test runs `pgfold` on a pseudo-terminal rather than drawing the
//! bars into a buffer in-process: what is checked is then exactly what a terminal
//! receives, log lines and cursor movements included, replayed through a terminal
//! emulator (`vt100`) to see the screen as an operator would.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};

use crate::helpers::*;

/// Orders to load: about 2.5 events each. Sized so that the replay takes several
/// seconds on a small CI machine (the work is PostgreSQL's, so the debug build of
/// the daemon does not change that).
const ORDERS: i64 = 240_000;
const ORDERS_PER_SLICE: i64 = 5_000;

/// Every bar must move: a `Fold::Set` catch-up (daily_revenue) is cut into ranges,
/// a `Fold::StreamSet` one (order_snapshots) is one range applied in parts of a
/// few streams each.
const PROJECTORS: [&str; 2] = ["daily_revenue", "order_snapshots"];

/// One bar as drawn on the screen at some moment.
#[derive(Debug, Clone)]
struct Bar {
    at: Duration,
    projector: String,
    percent: u64,
    position: u64,
    total: u64,
    eta_seconds: Option<f64>,
    caught_up: bool,
}

/// A bar line: `   daily_revenue [=====>   ]  42% 123,456/300,000 ids  ...`.
fn parse_bar(line: &str, at: Duration) -> Option<Bar> {
    let (name, rest) = line.split_once(" [")?;
    let (_, rest) = rest.split_once("] ")?;
    let (percent, rest) = rest.trim_start().split_once("% ")?;
    let (counts, rest) = rest.split_once(" ids")?;
    let (position, total) = counts.split_once('/')?;
    let number = |s: &str| s.trim().replace(',', "").parse::<u64>().ok();
    let eta_seconds = rest
        .split_once("eta ")
        .and_then(|(_, eta)| parse_eta(eta.trim()));
    Some(Bar {
        at,
        projector: name.trim().to_string(),
        percent: percent.trim().parse().ok()?,
        position: number(position)?,
        total: number(total)?,
        eta_seconds,
        caught_up: rest.contains("caught up"),
    })
}

/// `42s`, `3m 05s`, `2h 10m`; `?` (unknown) is `None`.
fn parse_eta(text: &str) -> Option<f64> {
    let mut seconds = 0.0;
    for part in text.split_whitespace() {
        let (n, unit) = part.split_at(part.len().checked_sub(1)?);
        let n: f64 = n.parse().ok()?;
        seconds += n * match unit {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
    }
    Some(seconds)
}

/// Runs `pgfold ARGS` on a 140×40 pseudo-terminal until it exits; returns its
/// exit code and what it wrote, in chunks stamped with when they arrived.
pub(crate) fn run_on_a_terminal(
    args: &[&str],
    env: &[(&str, &str)],
) -> (u32, Vec<(Duration, Vec<u8>)>) {
    let pty = native_pty_system()
        .openpty(PtySize {
            rows: 40,
            cols: 140,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("open a pseudo-terminal");
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_pgfold"));
    cmd.args(args);
    cmd.env_remove("DATABASE_URL");
    cmd.env("TERM", "xterm-256color");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = pty.slave.spawn_command(cmd).expect("spawn pgfold");
    drop(pty.slave);
    let mut reader = pty.master.try_clone_reader().expect("pty reader");
    let chunks = Arc::new(Mutex::new(Vec::new()));
    let sink = chunks.clone();
    let started = Instant::now();
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        // Ends with an error (EIO) or 0 once the child has exited.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push((started.elapsed(), buf[..n].to_vec()));
        }
    });
    let status = child.wait().expect("wait for pgfold");
    drop(pty.master);
    reading.join().unwrap();
    let chunks = std::mem::take(&mut *chunks.lock().unwrap());
    (status.exit_code(), chunks)
}

/// The screen once every chunk has been drawn, through a terminal emulator.
pub(crate) fn last_screen(chunks: &[(Duration, Vec<u8>)]) -> String {
    let size = |n| std::num::NonZeroU16::new(n).unwrap();
    let mut parser = vt100::Parser::new(size(40), size(140), 0);
    for (_, bytes) in chunks {
        parser.process(bytes);
    }
    let rows: Vec<String> = parser.screen().rows(0, 140).collect();
    rows.join("\n")
}

/// The screen after each chunk, through a terminal emulator: every bar drawn, and
/// how many bars each projector had on the screen at once.
fn screens(chunks: &[(Duration, Vec<u8>)]) -> (Vec<Bar>, String) {
    let size = |n| std::num::NonZeroU16::new(n).unwrap();
    let mut parser = vt100::Parser::new(size(40), size(140), 0);
    let mut bars = Vec::new();
    for (at, bytes) in chunks {
        parser.process(bytes);
        let screen = parser.screen().contents();
        // Row by row: a bar padded to the full width wraps into the next row in
        // `contents()`.
        let drawn: Vec<Bar> = parser
            .screen()
            .rows(0, 140)
            .filter_map(|l| parse_bar(&l, *at))
            .collect();
        for p in PROJECTORS {
            let copies = drawn.iter().filter(|b| b.projector == p).count();
            assert!(
                copies <= 1,
                "{p} has {copies} bars on the screen at once:\n{screen}"
            );
        }
        bars.extend(drawn);
    }
    let rows: Vec<String> = parser.screen().rows(0, 140).collect();
    (bars, rows.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_on_a_terminal_shows_one_moving_bar_per_projector_that_finishes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // In slices, as orders come in over time: each slice of the log holds every
    // kind of event, so every range of the replay costs about the same.
    for first in (1..=ORDERS).step_by(ORDERS_PER_SLICE as usize) {
        pgfold::testkit::workload::load_orders(&client, first, ORDERS_PER_SLICE)
            .await
            .unwrap();
    }
    // What autovacuum does after a bulk load, done now: the planner needs to know
    // the table before it is read in ranges.
    client.batch_execute("ANALYZE events").await.unwrap();
    let newest = scalar_i64(&client, "SELECT max(id) FROM events").await as u64;

    let url = db.url.clone();
    let (code, chunks) = tokio::task::spawn_blocking(move || {
        run_on_a_terminal(
            &["run", "--once", "--replay", "all"],
            // Log lines are printed while the bars are up: they must not tear them.
            &[("DATABASE_URL", &url), ("RUST_LOG", "info")],
        )
    })
    .await
    .unwrap();

    let (bars, last_screen) = screens(&chunks);
    assert_eq!(code, 0, "pgfold failed:\n{last_screen}");
    for p in PROJECTORS {
        let mine: Vec<&Bar> = bars.iter().filter(|b| b.projector == p).collect();
        assert!(!mine.is_empty(), "no bar for {p}:\n{last_screen}");
        assert!(mine.iter().all(|b| b.total == newest), "{p}: {mine:?}");
        assert!(
            mine.windows(2).all(|w| w[0].position <= w[1].position),
            "{p}: the bar went backwards: {mine:?}"
        );
        assert!(
            mine.iter()
                .take_while(|b| b.position == mine[0].position)
                .all(|b| b.eta_seconds.is_none()),
            "{p}: an ETA before anything was measured: {mine:?}"
        );

        let end = mine
            .iter()
            .find(|b| b.position == b.total)
            .unwrap_or_else(|| panic!("{p} never reached 100 %: {mine:?}"));
        assert_moves_and_eta(p, &mine, end);

        // The last state: 100 % with a summary, still on the screen.
        let last = mine.last().unwrap();
        assert!(
            last.percent == 100 && last.caught_up,
            "{p}'s last bar: {last:?}"
        );
        assert!(
            last_screen
                .lines()
                .any(|l| l.contains(p) && l.contains("100%") && l.contains("caught up")),
            "{p} is not shown finished at the end:\n{last_screen}"
        );
    }
    // The log lines made it, whole, above the bars.
    assert!(
        last_screen
            .lines()
            .any(|l| l.contains("caught up") && l.contains("events_applied=")),
        "{last_screen}"
    );
    assert_json_progress(&db.url, newest);
}

/// Each move of the bar, up to the end: at least one every 2 s; and the ETA
/// shown once a third is done, against the time it really took.
fn assert_moves_and_eta(p: &str, mine: &[&Bar], end: &Bar) {
    {
        let mut moves = vec![mine[0].at];
        moves.extend(
            mine.windows(2)
                .filter(|w| w[1].position > w[0].position)
                .map(|w| w[1].at),
        );
        let longest = moves
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        assert!(
            longest <= Duration::from_secs(2),
            "{p}: no progress for {longest:?} (moves at {moves:?})"
        );
        assert!(
            moves.len() >= 4,
            "{p}: the replay should move the bar several times: {moves:?}"
        );

        // The ETA shown once a third is done, against the time it really took.
        let third = mine
            .iter()
            .find(|b| b.position * 3 >= b.total && b.position < b.total)
            .unwrap_or_else(|| panic!("{p}: no ETA after a third: {mine:?}"));
        let actual = (end.at - third.at).as_secs_f64();
        let eta = third
            .eta_seconds
            .unwrap_or_else(|| panic!("{p}: no ETA at {third:?}"));
        assert!(
            // The ETA is shown in whole seconds, rounded up: the estimate
            // itself lay within the second below what is shown.
            eta - 1.0 <= 2.0 * actual && actual <= 2.0 * eta,
            "{p}: ETA {eta} s at {} %, actually {actual:.1} s (moves at {moves:?}): {mine:?}",
            third.percent
        );
    }
}

/// The same replay with JSON logs: `catching up` lines with increasing
/// positions, then `caught up`.
fn assert_json_progress(url: &str, newest: u64) {
    let out = pgfold(
        &["run", "--once", "--replay", "all"],
        &[
            ("DATABASE_URL", url),
            ("PGFOLD_LOG__FORMAT", "json"),
            ("RUST_LOG", "info"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for p in PROJECTORS {
        let progress: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| {
                l["projector"] == p
                    && (l["message"] == "catching up" || l["message"] == "caught up")
            })
            .collect();
        let last = progress.last().unwrap();
        assert_eq!(last["message"], "caught up", "{last}");
        assert_eq!(last["position"].as_u64(), Some(newest), "{last}");
        let positions: Vec<u64> = progress
            .iter()
            .map(|l| l["position"].as_u64().unwrap())
            .collect();
        // The last progress line can fall in the same instant as the summary,
        // at the same position: only the progress lines must strictly rise.
        let rising = &positions[..positions.len() - 1];
        assert!(
            positions.len() >= 2
                && rising.windows(2).all(|w| w[0] < w[1])
                && rising.last() <= positions.last(),
            "{p}: positions {positions:?} in {progress:?}"
        );
        let first = progress[0];
        assert_eq!(first["message"], "catching up", "{first}");
        assert!(first["events_per_second"].is_u64(), "{first}");
        assert!(first["eta_seconds"].as_f64().is_some(), "{first}");
        assert_eq!(first["target_position"].as_u64(), Some(newest), "{first}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_a_replay_in_progress() {
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 20_000)
        .await
        .unwrap();
    let newest = scalar_i64(&client, "SELECT max(id) FROM events").await;
    let address = format!("127.0.0.1:{}", free_port());
    // Small batches: the replay lasts long enough to be looked at.
    let _daemon = Daemon::spawn(
        PGFOLD,
        &[
            "run",
            "--replay",
            "daily_revenue",
            "--projector",
            "daily_revenue",
        ],
        &[
            ("DATABASE_URL", &db.url),
            ("PGFOLD_DAEMON__SET_BATCH_SIZE", "500"),
            ("PGFOLD_HTTP__LISTEN", &address),
        ],
    );
    let replaying = "SELECT count(*) FROM pgfold.projectors
                      WHERE name = 'daily_revenue' AND state = 'replaying' AND events_applied > 0";
    wait_for(
        "the replay to apply events",
        Duration::from_secs(60),
        || async { scalar_i64(&client, replaying).await == 1 },
    )
    .await;
    // Hold the projector's lock: the daemon skips it, and the replay stands still
    // where it is while we look.
    client
        .execute(
            "SELECT pg_advisory_lock(hashtextextended('pgfold:projector:' || $1, 0))",
            &[&"daily_revenue"],
        )
        .await
        .unwrap();
    assert_eq!(
        scalar_i64(&client, replaying).await,
        1,
        "the replay finished before it could be looked at"
    );
    let position = scalar_i64(
        &client,
        "SELECT position_id FROM pgfold.projectors WHERE name = 'daily_revenue'",
    )
    .await;

    let (_, status) = status_json(&db.url, &[]);
    let replay = &projector_status(&status, "daily_revenue")["replay"];
    assert_eq!(replay["position"], position, "{replay}");
    assert_eq!(replay["target"], newest, "{replay}");
    assert!(
        replay["events_per_second"].as_f64().unwrap() > 0.0,
        "{replay}"
    );
    let eta = replay["eta_seconds"].as_f64().unwrap();
    assert!(eta > 0.0, "{replay}");
    assert!(
        projector_status(&status, "order_snapshots")["replay"].is_null(),
        "{status}"
    );
    let table = pgfold(&["status"], &[("DATABASE_URL", &db.url)]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("daily_revenue is replaying: ")
            && text.contains(&format!("({position} of {newest} ids)")),
        "{text}"
    );
    wait_for("/metrics to answer", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(&address).await.is_ok()
    })
    .await;
    let (_, metrics) = get(&address, "/metrics").await;
    for expected in [
        format!("pgfold_replay_position{{projector=\"daily_revenue\"}} {position}"),
        format!("pgfold_replay_target{{projector=\"daily_revenue\"}} {newest}"),
    ] {
        assert!(metrics.contains(&expected), "no {expected} in:\n{metrics}");
    }
    assert!(
        metrics.contains("pgfold_replay_eta_seconds{projector=\"daily_revenue\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("pgfold_replay_position{projector=\"order_snapshots\"}"),
        "{metrics}"
    );

    client
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended('pgfold:projector:' || $1, 0))",
            &[&"daily_revenue"],
        )
        .await
        .unwrap();
    wait_for("the replay to finish", Duration::from_secs(120), || async {
        scalar_i64(
            &client,
            "SELECT count(*) FROM pgfold.projectors WHERE state = 'replaying'",
        )
        .await
            == 0
    })
    .await;
    let (_, status) = status_json(&db.url, &[]);
    assert!(
        projector_status(&status, "daily_revenue")["replay"].is_null(),
        "{status}"
    );
}

/// A stream-set replay is one batch applied in parts, and its checkpoint moves
/// only when it commits: meanwhile `status`, from another process, shows how far
/// it has come from what the daemon records after each part
/// (`pgfold.batch_progress`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_stream_set_replay_in_progress_before_it_commits() {
    // Arrange
    let db = TestDb::new().await;
    let client = db.client().await;
    for first in (1..=100_000).step_by(25_000) {
        pgfold::testkit::workload::load_orders(&client, first, 25_000)
            .await
            .unwrap();
    }
    client.batch_execute("ANALYZE events").await.unwrap();
    let newest = scalar_i64(&client, "SELECT max(id) FROM events").await;

    // Act
    let _daemon = Daemon::spawn(
        PGFOLD,
        &[
            "run",
            "--replay",
            "order_snapshots",
            "--projector",
            "order_snapshots",
        ],
        &[("DATABASE_URL", &db.url)],
    );

    // Assert
    let url = db.url.clone();
    wait_for(
        "status to show the replay part way, before its batch commits",
        Duration::from_secs(120),
        || {
            let url = url.clone();
            async move {
                let (_, status) = status_json(&url, &[]);
                let p = projector_status(&status, "order_snapshots");
                let replay = &p["replay"];
                let position = replay["position"].as_i64().unwrap_or(0);
                p["position"] == 0
                    && position > 0
                    && position < newest
                    && replay["target"] == newest
                    && replay["events_per_second"]
                        .as_f64()
                        .is_some_and(|r| r > 0.0)
                    && replay["eta_seconds"].as_f64().is_some_and(|s| s > 0.0)
            }
        },
    )
    .await;
}
