//! Bad input: one line naming the problem, a non-zero exit, the database untouched.

use crate::helpers::*;

fn stderr_line(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("pgfold: ")).collect();
    assert!(!lines.is_empty(), "no error line in {text:?}");
    assert!(
        !text.contains("panicked") && !text.contains("backtrace"),
        "{text}"
    );
    lines[0].to_string()
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

#[tokio::test]
async fn an_unknown_projector_is_named_and_nothing_is_touched() {
    let db = TestDb::empty().await;
    for args in [
        vec!["run", "--once", "--projector", "revenue_by_day"],
        vec!["run", "--once", "--replay", "x'; DROP TABLE events; --"],
    ] {
        let out = pgfold(&args, &[("DATABASE_URL", &db.url)]);

        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let line = stderr_line(&out);
        assert!(line.contains("unknown projector"), "{line}");
        assert!(
            line.contains("daily_revenue, order_snapshots"),
            "lists the known ones: {line}"
        );
    }
    let client = db.client().await;
    assert_eq!(
        scalar_i64(
            &client,
            "SELECT count(*) FROM pg_tables WHERE schemaname IN ('public', 'pgfold')"
        )
        .await,
        0,
        "the database was touched"
    );
}

#[tokio::test]
async fn a_malformed_config_file_is_named() {
    let cases = [
        (
            "[daemon]\npoll_interval_ms = \"soon\"\n",
            "poll_interval_ms",
        ),
        ("[daemon]\npoll_intervall_ms = 5\n", "poll_intervall_ms"),
        ("[daemon\n", "TOML"),
        (
            "[projectors.revenue]\nenabled = true\n",
            "unknown projector \"revenue\"",
        ),
        (
            "[projectors.daily_revenue]\non_error = \"ignore\"\n",
            "ignore",
        ),
        (
            "[daemon]\nbatch_bytes = 0\n",
            "daemon.batch_bytes must be at least 1",
        ),
        ("[daemon]\nbatch_bytes = -5\n", "batch_bytes"),
    ];
    for (contents, expected) in cases {
        let file = config_file(contents);
        let out = pgfold(
            &["run", "--once", "--config", file.path().to_str().unwrap()],
            &[("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")],
        );
        assert_eq!(out.status.code(), Some(1), "{contents}");
        let line = stderr_line(&out);
        assert!(
            line.contains("invalid configuration") || line.contains("invalid"),
            "{line}"
        );
        assert!(
            line.to_lowercase().contains(&expected.to_lowercase()),
            "{contents}: {line}"
        );
    }
}

#[tokio::test]
async fn a_missing_config_file_is_named() {
    let out = pgfold(&["status", "--config", "/nonexistent/pgfold.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).contains("/nonexistent/pgfold.toml"));
}

#[tokio::test]
async fn an_unreachable_database_fails_within_the_connect_timeout_without_the_password() {
    for url in [
        "postgres://app:hunter2@127.0.0.1:1/shop",
        "postgres://app:hunter2@no-such-host.invalid/shop",
    ] {
        let started = std::time::Instant::now();
        let out = pgfold(
            &["run", "--once"],
            &[
                ("DATABASE_URL", url),
                ("PGFOLD_DAEMON__CONNECT_TIMEOUT_MS", "300"),
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{url}");
        let line = stderr_line(&out);
        assert!(line.contains("cannot connect"), "{line}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("hunter2"),
            "password leaked"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}

#[tokio::test]
async fn a_malformed_url_is_named() {
    let out = pgfold(
        &["status"],
        &[("DATABASE_URL", "postgres://app:hunter2@db:port/shop")],
    );
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(line.contains("invalid database URL"), "{line}");
    assert!(!line.contains("hunter2"));
}

#[tokio::test]
async fn unknown_arguments_are_one_line() {
    let out = pgfold(&["run", "--onse"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).contains("--onse"));
}
