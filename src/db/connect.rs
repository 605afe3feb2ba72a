//! Turning settings into a `tokio_postgres::Config`, the way `psql` would.
//!
//! tokio-postgres parses URLs and key=value strings but does not read libpq's
//! environment variables or defaults, so with no URL configured we apply them here:
//! PGHOST (a host name or a socket directory), PGPORT, PGUSER, PGPASSWORD,
//! PGDATABASE, PGAPPNAME and PGCONNECT_TIMEOUT, falling back to the local socket,
//! the OS user and a database named after it.
//!
//! TLS (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, or PGSSLMODE,
//! PGSSLROOTCERT, PGSSLCERT and PGSSLKEY without a URL) is resolved here too, into the [`PgConfig`] every connection is opened from:
//! see [`super::tls`].
//!
//! [`configs`] reads `[database]`: `url`, and `listen_url` for the connection
//! that needs a session; both carry `prepared_statements` to every connection.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Connection, Socket};

use super::sql::Statements;
use super::tls::{self, Tls, TlsOptions, TlsStream};
use crate::config::DatabaseSettings;

/// A connection configuration and the TLS that goes with it. It dereferences to
/// the `tokio_postgres::Config`; connect through [`PgConfig::connect`] (or
/// `db::connect`, `db::pool`), which use the TLS settings.
#[derive(Clone)]
pub struct PgConfig {
    config: tokio_postgres::Config,
    tls: Tls,
    statements: Statements,
}

impl PgConfig {
    /// The TLS resolved from `sslmode` and friends: the mode, what is verified,
    /// and the connector.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// How statements are sent on connections opened from this configuration.
    pub fn statements(&self) -> Statements {
        self.statements
    }

    /// The same configuration, its connections sending statements as
    /// `statements` says (see [`Statements`]).
    pub fn with_statements(mut self, statements: Statements) -> PgConfig {
        self.statements = statements;
        self
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: &str) -> PgConfig {
        let mut other = self.clone();
        other.config.dbname(dbname);
        other
    }

    /// Opens a connection with the configured TLS; the caller drives the
    /// connection.
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, TlsStream>), tokio_postgres::Error> {
        self.config.connect(self.tls.connector()).await
    }
}

impl Deref for PgConfig {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl DerefMut for PgConfig {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }
}

impl std::fmt::Debug for PgConfig {
    // tokio-postgres's Debug leaves the password out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("config", &self.config)
            .field("tls", &self.tls)
            .field("statements", &self.statements)
            .finish()
    }
}

/// Builds the connection configuration from `url`, or from the environment.
pub fn pg_config(url: Option<&str>) -> anyhow::Result<PgConfig> {
    let (mut config, tls_options) = match url {
        // The parser's error can quote the input, password included: name the
        // problem without it.
        Some(url) => {
            let (rest, tls_options) = tls::split_options(url);
            let config = rest.parse::<tokio_postgres::Config>().map_err(|e| {
                anyhow::anyhow!(
                    "invalid database URL ({}): expected postgres://user@host:port/dbname or host=... dbname=...",
                    crate::util::one_line(&redact(&e.to_string(), url))
                )
            })?;
            (config, tls_options)
        }
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
    // libpq never uses TLS over a Unix socket, whatever sslmode says.
    let tcp = config.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
    // Its errors quote sslmode and sslrootcert, never the password.
    let tls = Tls::new(&tls_options, tcp)?;
    config.ssl_mode(if tcp {
        tls.negotiation()
    } else {
        tokio_postgres::config::SslMode::Disable
    });
    Ok(PgConfig {
        config,
        tls,
        statements: Statements::default(),
    })
}

/// The two connections `[database]` describes.
#[derive(Debug, Clone)]
pub struct Configs {
    /// `database.url`: batches, `status`, the HTTP checks and the wake-up flag.
    pub url: PgConfig,
    /// `database.listen_url`, else `url`: LISTEN and migrations, which need a
    /// session of their own.
    pub listen_url: PgConfig,
}

/// Resolves `[database]` into its two connection configurations, both carrying
/// `prepared_statements`; an empty or absent `listen_url` means `url`.
pub fn configs(database: &DatabaseSettings) -> anyhow::Result<Configs> {
    let statements = Statements::from_setting(database.prepared_statements);
    let url = pg_config(database.url.as_deref())?.with_statements(statements);
    let listen_url = match database.listen_url.as_deref().filter(|u| !u.is_empty()) {
        Some(listen) => pg_config(Some(listen))
            .context("database.listen_url")?
            .with_statements(statements),
        None => url.clone(),
    };
    Ok(Configs { url, listen_url })
}

fn from_env() -> anyhow::Result<(tokio_postgres::Config, TlsOptions)> {
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
    let tls = TlsOptions {
        sslmode: var("PGSSLMODE"),
        sslrootcert: var("PGSSLROOTCERT"),
        sslcert: var("PGSSLCERT"),
        sslkey: var("PGSSLKEY"),
    };
    if let Some(mode) = &tls.sslmode {
        mode.parse::<tls::SslMode>()
            .with_context(|| format!("PGSSLMODE={mode} is not valid"))?;
    }
    Ok((config, tls))
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
    fn tls_modes_reach_tokio_postgres_as_it_knows_them() {
        use tokio_postgres::config::SslMode as Pg;
        let pg = pg_config(Some("postgres://app:s3cret@db/shop?sslmode=verify-ca")).unwrap();
        assert_eq!(pg.get_ssl_mode(), Pg::Require);
        assert_eq!(pg.tls().mode(), tls::SslMode::VerifyCa);
        let pg = pg_config(Some("host=db dbname=shop sslmode=disable")).unwrap();
        assert_eq!(pg.get_ssl_mode(), Pg::Disable);
        // No TLS over a Unix socket, as in libpq.
        let pg = pg_config(Some("host=/run/postgresql sslmode=require")).unwrap();
        assert_eq!(pg.get_ssl_mode(), Pg::Disable);

        let err = pg_config(Some("postgres://app:s3cret@db/shop?sslmode=bogus")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("bogus") && !text.contains("s3cret"), "{text}");
    }

    fn database(url: &str, listen_url: Option<&str>, prepared: bool) -> DatabaseSettings {
        DatabaseSettings {
            url: Some(url.to_string()),
            listen_url: listen_url.map(str::to_string),
            pool_size: 8,
            prepared_statements: prepared,
        }
    }

    #[test]
    fn listen_url_defaults_to_url_and_both_carry_the_statement_mode() {
        let c = configs(&database("postgres://app@pooler:6432/shop", None, false)).unwrap();
        assert_eq!(describe(&c.listen_url), describe(&c.url));
        assert_eq!(
            (c.url.statements(), c.listen_url.statements()),
            (Statements::Unnamed, Statements::Unnamed)
        );

        let c = configs(&database(
            "postgres://app@pooler:6432/shop",
            Some("postgres://app@db:5432/shop"),
            true,
        ))
        .unwrap();
        assert!(describe(&c.url).contains("host=pooler port=6432"));
        assert!(describe(&c.listen_url).contains("host=db port=5432"));
        assert_eq!(c.listen_url.statements(), Statements::Prepared);
    }

    #[test]
    fn a_bad_listen_url_is_named() {
        let err = configs(&database(
            "postgres://app@db/shop",
            Some("postgres://app:s3cret@db:notaport/shop"),
            true,
        ))
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("database.listen_url: invalid database URL"),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
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
