//! Turning settings into a `tokio_postgres::Config`, the way `psql` would.
//!
//! tokio-postgres parses URLs and key=value strings but does not read libpq's
//! environment variables or defaults, so with no URL configured we apply them here:
//! PGHOST (a host name or a socket directory), PGPORT, PGUSER, PGPASSWORD,
//! PGDATABASE, PGAPPNAME and PGCONNECT_TIMEOUT, falling back to the local socket,
//! the OS user and a database named after it.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_postgres::config::Host;

/// Builds the connection configuration from `url`, or from the environment.
pub fn pg_config(url: Option<&str>) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = match url {
        // The parser's error can quote the input, password included: name the
        // problem without it.
        Some(url) => url.parse::<tokio_postgres::Config>().map_err(|e| {
            anyhow::anyhow!(
                "invalid database URL ({}): expected postgres://user@host:port/dbname or host=... dbname=...",
                crate::config::one_line(&redact(&e.to_string(), url))
            )
        })?,
        None => from_env()?,
    };
    if config.get_application_name().is_none() {
        config.application_name("pgfold");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    // A peer that vanished (a killed pod, a cut network) must not hold a projector
    // lock until the kernel gives up on the socket.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    if config.get_hosts().is_empty() {
        let port = port_of(&config);
        add_default_host(&mut config, port);
    }
    if config.get_user().is_none() {
        config.user(os_user());
    }
    if config.get_dbname().is_none() {
        let user = config.get_user().unwrap_or_default().to_string();
        config.dbname(&user);
    }
    Ok(config)
}

fn from_env() -> anyhow::Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::new();
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(port) = var("PGPORT") {
        let port: u16 = port
            .parse()
            .with_context(|| format!("PGPORT is {port:?}, not a port number"))?;
        config.port(port);
    }
    if let Some(hosts) = var("PGHOST") {
        for host in hosts.split(',') {
            if host.starts_with('/') {
                config.host_path(host);
            } else {
                config.host(host);
            }
        }
    }
    if let Some(user) = var("PGUSER") {
        config.user(&user);
    }
    if let Some(password) = var("PGPASSWORD") {
        config.password(password);
    }
    if let Some(dbname) = var("PGDATABASE") {
        config.dbname(&dbname);
    }
    if let Some(app) = var("PGAPPNAME") {
        config.application_name(&app);
    }
    if let Some(secs) = var("PGCONNECT_TIMEOUT") {
        let secs: u64 = secs
            .parse()
            .with_context(|| format!("PGCONNECT_TIMEOUT is {secs:?}, not a number of seconds"))?;
        config.connect_timeout(Duration::from_secs(secs.max(2)));
    }
    if let Some(mode) = var("PGSSLMODE") {
        if mode != "disable" && mode != "prefer" && mode != "allow" {
            bail!("PGSSLMODE={mode} is not supported yet: TLS connections are not implemented");
        }
    }
    Ok(config)
}

fn port_of(config: &tokio_postgres::Config) -> u16 {
    config.get_ports().first().copied().unwrap_or(5432)
}

/// libpq's default: the local socket where the server keeps it, else TCP localhost.
fn add_default_host(config: &mut tokio_postgres::Config, port: u16) {
    for dir in ["/var/run/postgresql", "/run/postgresql", "/tmp"] {
        if Path::new(dir).join(format!(".s.PGSQL.{port}")).exists() {
            config.host_path(dir);
            return;
        }
    }
    config.host("localhost");
}

fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "postgres".to_string())
}

/// Where a configuration points, for logs and errors: never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!(
        "host={} port={} user={} dbname={}",
        hosts.join(","),
        port_of(config),
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?"),
    )
}

/// Removes the password of `url` from a message that might quote it.
pub fn redact(message: &str, url: &str) -> String {
    match password_in(url) {
        Some(pw) if !pw.is_empty() => message.replace(pw, "********"),
        _ => message.to_string(),
    }
}

fn password_in(url: &str) -> Option<&str> {
    if let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let userinfo = &rest[..rest.find('@')?];
        return userinfo.split_once(':').map(|(_, pw)| pw);
    }
    url.split_whitespace()
        .find_map(|kv| kv.strip_prefix("password="))
        .map(|pw| pw.trim_matches('\''))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_redacted_from_urls_and_key_value_strings() {
        let url = "postgres://app:s3cret@db:5432/shop";
        assert_eq!(
            redact("could not use s3cret", url),
            "could not use ********"
        );
        let kv = "host=db password=hunter2 dbname=shop";
        assert_eq!(redact("bad hunter2", kv), "bad ********");
    }

    #[test]
    fn describe_never_shows_the_password() {
        let config = pg_config(Some("postgres://app:s3cret@db.example.com:6543/shop")).unwrap();
        let text = describe(&config);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("host=db.example.com port=6543 user=app dbname=shop"),
            "{text}"
        );
    }

    #[test]
    fn a_malformed_url_is_one_line_without_the_password() {
        let err = pg_config(Some("postgres://app:s3cret@db:notaport/shop")).unwrap_err();
        let text = format!("{err:#}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("invalid database URL"), "{text}");
    }
}
