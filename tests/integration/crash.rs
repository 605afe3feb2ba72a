//! Exactly-once across a killed process: the projection and its checkpoint commit
//! together, so a SIGKILL at any point neither loses nor repeats an event.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_applies_every_event_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    pgfold::testkit::workload::load_orders(&client, 1, 20_000)
        .await
        .unwrap();
    // Small batches, so the kill lands among many commits.
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFOLD_DAEMON__BATCH_SIZE", "200"),
        ("PGFOLD_DAEMON__SET_BATCH_SIZE", "300"),
    ];

    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgfold"))
            .arg("run")
            .envs(env)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let before = scalar_i64(
            &client,
            "SELECT coalesce(sum(events_applied), 0)::bigint FROM pgfold.projectors",
        )
        .await;
        wait_for(
            "the daemon to commit some batches",
            Duration::from_secs(60),
            || async {
                scalar_i64(
                    &client,
                    "SELECT coalesce(sum(events_applied), 0)::bigint FROM pgfold.projectors",
                )
                .await
                    > before + 2_000
            },
        )
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        eprintln!("round {round}: killed after {before}+ events");
    }

    pgfold_ok(&["run", "--once"], &env);
    assert_projections_exact(&client).await;
}
