//! What real deployments bring along: Kubernetes' service-link variables, logs
//! collected off a terminal, and the Grafana dashboard and Prometheus alerting
//! rules in deploy/, whose metric names must be what the daemon exports.

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use crate::helpers::*;

/// What Kubernetes puts into every container of a namespace with a Service named
/// `pgfold` that has a port named `metrics` (9187).
const SERVICE_LINKS: [(&str, &str); 8] = [
    ("PGFOLD_SERVICE_HOST", "10.96.12.34"),
    ("PGFOLD_SERVICE_PORT", "9187"),
    ("PGFOLD_SERVICE_PORT_METRICS", "9187"),
    ("PGFOLD_PORT", "tcp://10.96.12.34:9187"),
    ("PGFOLD_PORT_9187_TCP", "tcp://10.96.12.34:9187"),
    ("PGFOLD_PORT_9187_TCP_PROTO", "tcp"),
    ("PGFOLD_PORT_9187_TCP_PORT", "9187"),
    ("PGFOLD_PORT_9187_TCP_ADDR", "10.96.12.34"),
];

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn kubernetes_service_links_are_not_configuration() {
    let db = TestDb::new().await;
    let mut env = SERVICE_LINKS.to_vec();
    env.push(("DATABASE_URL", &db.url));
    env.push(("RUST_LOG", "pgfold=debug"));

    let out = pgfold(&["status"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    let line = text
        .lines()
        .find(|l| l.contains("not configuration"))
        .unwrap_or_else(|| panic!("no debug line naming the ignored variables in {text}"));
    for (name, _) in SERVICE_LINKS {
        assert!(line.contains(name), "{name} not named in {line}");
    }
    let out = pgfold(&["run", "--once"], &env);
    assert!(out.status.success(), "{}", stderr(&out));

    // With the double underscore it is configuration, and a typo is still an error.
    env.push(("PGFOLD_DAEMON__POLL_INTERVL_MS", "500"));
    let out = pgfold(&["status"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("poll_intervl_ms"), "{text}");
}

const ESC: u8 = 0x1b;

#[tokio::test]
async fn logs_are_coloured_only_on_a_terminal_without_no_color() {
    let db = TestDb::new().await;
    let base = [("DATABASE_URL", db.url.as_str()), ("RUST_LOG", "info")];
    let logged = |out: &Output| {
        assert!(out.status.success(), "{}", stderr(out));
        let text = stderr(out);
        assert!(text.contains("connected"), "no log line in {text}");
        out.stderr.clone()
    };

    // stderr is a pipe, as under journald, docker and kubectl.
    let text = logged(&pgfold(&["run", "--once"], &base));
    assert!(!text.contains(&ESC), "escape codes off a terminal");
    let mut json = base.to_vec();
    json.push(("PGFOLD_LOG__FORMAT", "json"));
    let text = logged(&pgfold(&["run", "--once"], &json));
    assert!(!text.contains(&ESC), "escape codes in JSON logs");

    // On a terminal (a pseudo-terminal from script(1)) the text logs are coloured,
    // unless NO_COLOR is set to anything but the empty string.
    let on_terminal = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", "\"$BIN\" run --once", "/dev/null"])
            .env("BIN", env!("CARGO_BIN_EXE_pgfold"))
            .env_remove("NO_COLOR")
            .envs(base)
            .stdin(std::process::Stdio::null());
        if let Some(value) = no_color {
            cmd.env("NO_COLOR", value);
        }
        let out = cmd.output().expect("run script(1)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        assert!(text.contains("connected"), "no log line in {text}");
        out.stdout
    };
    assert!(on_terminal(None).contains(&ESC), "no colour on a terminal");
    assert!(
        on_terminal(Some("")).contains(&ESC),
        "NO_COLOR= (empty) disabled colour"
    );
    assert!(
        !on_terminal(Some("1")).contains(&ESC),
        "colour despite NO_COLOR=1"
    );
}

/// The series names a `/metrics` body can hold, from its `# TYPE` lines (so a
/// family with no sample yet, such as errors before the first error, counts):
/// counters as `_total`, histograms as `_bucket`, `_sum` and `_count`, as
/// Prometheus stores what it scrapes.
fn exported_series(body: &str) -> BTreeSet<String> {
    let mut series = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "gauge" => &[""],
            other => panic!("unexpected metric type {other} of {name}"),
        };
        series.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    series
}

/// Every `pgfold_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pgfold_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn deploy_file(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every expression of the dashboard's panels and variables.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        queries.extend(
            targets
                .iter()
                .map(|t| t["expr"].as_str().expect("expr").to_string()),
        );
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["definition"].as_str() {
            queries.push(query.to_string());
        }
    }
    queries
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_the_daemon_exports() {
    let db = TestDb::new().await;
    let address = format!("127.0.0.1:{}", free_port());
    let _daemon = Daemon::spawn(
        PGFOLD,
        &["run"],
        &[("DATABASE_URL", &db.url), ("PGFOLD_HTTP__LISTEN", &address)],
    );
    let mut client = db.client().await;
    append_all(
        &mut client,
        &[created("order-1", "books", serde_json::json!("4.00"), 1)],
    )
    .await;
    // Once a batch is applied every family, the histogram included, has samples.
    wait_for("a batch in /metrics", Duration::from_secs(15), || async {
        tokio::net::TcpStream::connect(&address).await.is_ok()
            && get(&address, "/metrics")
                .await
                .1
                .contains("pgfold_batch_duration_seconds_bucket{")
    })
    .await;
    let (_, body) = get(&address, "/metrics").await;
    let exported = exported_series(&body);
    assert!(exported.contains("pgfold_events_applied_total"), "{body}");
    // Names Prometheus never stores must not pass.
    assert!(!exported.contains("pgfold_events_applied"));
    assert!(!exported.contains("pgfold_batch_duration_seconds"));

    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("deploy/grafana/pgfold.json")).expect("dashboard JSON");
    let used = metric_names(&dashboard_queries(&dashboard).join("\n"));
    let rules = deploy_file("deploy/prometheus/pgfold-rules.yml");
    for (file, used, required) in [
        (
            "deploy/grafana/pgfold.json",
            &used,
            &[
                "pgfold_lag_events",
                "pgfold_lag_seconds",
                "pgfold_events_applied_total",
                "pgfold_batch_duration_seconds_bucket",
                "pgfold_projector_state",
                "pgfold_dead_letters",
                "pgfold_horizon_stall_seconds",
            ][..],
        ),
        (
            "deploy/prometheus/pgfold-rules.yml",
            &metric_names(&rules),
            &[
                "pgfold_projector_state",
                "pgfold_lag_seconds",
                "pgfold_horizon_stall_seconds",
                "pgfold_dead_letters",
            ][..],
        ),
    ] {
        let unknown: Vec<&String> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses {unknown:?}, which /metrics does not export:\n{body}"
        );
        for name in required {
            assert!(used.contains(*name), "{file} does not show {name}");
        }
    }
    assert!(rules.contains("up{job=\"pgfold\"} == 0") && rules.contains("absent(up{"));
}
