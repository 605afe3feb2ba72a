//! What real deployments bring along: Kubernetes' service-link variables, logs
//! collected off a terminal.

use std::process::Output;

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
