//! What real deployments bring along: Kubernetes' service-link variables, logs
//! collected off a terminal.

use std::process::{Command, Output};

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
