//! TLS to PostgreSQL: a throwaway cluster of the test's own (initdb, pg_ctl) that
//! serves TLS with a certificate for `localhost` signed by a CA the test makes,
//! and refuses every connection that is not TLS. The role `pgfold_client` must
//! also present a client certificate signed by that CA (`cert` authentication).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pgfold::daemon::RunOptions;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::helpers::*;

/// A PostgreSQL cluster in a temporary directory, stopped when dropped (also when
/// the test panics).
struct TlsServer {
    dir: tempfile::TempDir,
    /// client.crt and client.key for `pgfold_client`, owned by the test's user
    /// (the server's directory is the server's).
    client: tempfile::TempDir,
    bindir: PathBuf,
    as_postgres: bool,
    port: u16,
}

impl TlsServer {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The CA that signed the server's certificate.
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing the server has.
    fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    fn url(&self, host: &str, params: &str) -> String {
        self.url_as("postgres", host, params)
    }

    fn url_as(&self, user: &str, host: &str, params: &str) -> String {
        let query = if params.is_empty() { "" } else { "?" };
        format!(
            "postgres://{user}@{host}:{}/postgres{query}{params}",
            self.port
        )
    }

    fn client_cert(&self) -> PathBuf {
        self.client.path().join("client.crt")
    }

    fn client_key(&self) -> PathBuf {
        self.client.path().join("client.key")
    }

    /// A PostgreSQL program, as the `postgres` user when we are root (the server
    /// refuses to run as root).
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn start() -> TlsServer {
        let bindir = pg_bindir();
        let as_postgres = run(Command::new("id").arg("-u")).trim() == "0";
        let dir = tempfile::Builder::new()
            .prefix("pgfold-tls-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = TlsServer {
            dir,
            client: tempfile::Builder::new()
                .prefix("pgfold-tls-client-")
                .tempdir()
                .unwrap(),
            bindir,
            as_postgres,
            port,
        };
        let root = server.dir.path();
        write_certificates(root, server.client.path());
        if as_postgres {
            run(Command::new("chown").args(["-R", "postgres:"]).arg(root));
        }
        let data = server.data();
        run(server
            .command("initdb")
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-D"])
            .arg(&data));
        append(
            &data.join("postgresql.conf"),
            &format!(
                "listen_addresses = '127.0.0.1'\nport = {port}\n\
                 unix_socket_directories = '{root}'\n\
                 ssl = on\nssl_cert_file = '{root}/server.crt'\nssl_key_file = '{root}/server.key'\n\
                 ssl_ca_file = '{root}/ca.pem'\n\
                 fsync = off\n",
                root = root.display()
            ),
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all pgfold_client 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let log = root.join("server.log");
        let out = server
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        run(server
            .command("psql")
            .arg("-h")
            .arg(root)
            .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-c", "CREATE ROLE pgfold_client LOGIN SUPERUSER"]));
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .output();
    }
}

/// PGFOLD_TEST_PG_BINDIR, else `pg_config --bindir`, else the newest
/// /usr/lib/postgresql/*/bin.
fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PGFOLD_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
    });
    dirs.pop()
        .expect("no initdb found: set PGFOLD_TEST_PG_BINDIR to PostgreSQL's bin directory")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// ca.pem, server.crt and server.key (for `localhost` only, signed by ca.pem), and
/// other-ca.pem in `dir`; client.crt and client.key (for `pgfold_client`, signed by
/// ca.pem) in `client_dir`.
fn write_certificates(dir: &Path, client_dir: &Path) {
    fn ca(name: &str) -> (CertificateParams, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (params, KeyPair::generate().unwrap())
    }
    let (ca_params, ca_key) = ca("pgfold test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(DnType::CommonName, "pgfold_client");
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &issuer).unwrap();
    let (other_params, other_key) = ca("some other CA");
    let other_cert = other_params.self_signed(&other_key).unwrap();

    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other_cert.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server_cert.pem()).unwrap();
    std::fs::write(client_dir.join("client.crt"), client_cert.pem()).unwrap();
    write_key(&dir.join("server.key"), &server_key);
    write_key(&client_dir.join("client.key"), &client_key);
}

fn write_key(path: &Path, key: &KeyPair) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Whether the connection of `url` (made by pgfold::db) is encrypted, as the
/// server sees it.
async fn ssl_of(url: &str) -> anyhow::Result<bool> {
    let pg = pgfold::db::pg_config(Some(url))?;
    let client = pgfold::db::connect(&pg).await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The binary's error: exit code 1 and one line on stderr.
fn one_line_error(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    lines[0].to_string()
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn connections_follow_sslmode_and_sslrootcert() {
    let server = TlsServer::start();
    let ca = server.ca().display().to_string();
    let other_ca = server.other_ca().display().to_string();
    // No ~/.postgresql/root.crt of the machine's may count.
    let home = server.dir.path().display().to_string();
    let verify_full = server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );

    // The real binary, verifying the chain and the name: migrate, run.
    let env = [("DATABASE_URL", verify_full.as_str()), ("HOME", &home)];
    succeeded(&pgfold(&["migrate"], &env));
    succeeded(&pgfold(&["run", "--once"], &env));

    // The same from PGSSLMODE and PGSSLROOTCERT, with no URL.
    let port = server.port.to_string();
    let env_only = [
        ("PGHOST", "localhost"),
        ("PGPORT", port.as_str()),
        ("PGUSER", "postgres"),
        ("PGDATABASE", "postgres"),
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", ca.as_str()),
        ("HOME", &home),
    ];
    succeeded(&pgfold(&["status"], &env_only));

    // In-process, every connection of the daemon (pool and LISTEN) is TLS.
    assert!(ssl_of(&verify_full).await.unwrap());
    let mut settings = pgfold::config::Settings::load(None).unwrap();
    settings.database.url = Some(verify_full.clone());
    settings.daemon.poll_interval_ms = 200;
    let daemon = RunningDaemon::start(settings, RunOptions::default());
    let watcher = pgfold::db::connect(&pgfold::db::pg_config(Some(&verify_full)).unwrap())
        .await
        .unwrap();
    wait_for(
        "the daemon's LISTEN connection",
        Duration::from_secs(10),
        || {
            let watcher = &watcher;
            async move {
                scalar_i64(
                    watcher,
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
                )
                .await
                    > 0
            }
        },
    )
    .await;
    let plain = scalar_i64(
        &watcher,
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.backend_type = 'client backend' AND NOT s.ssl",
    )
    .await;
    assert_eq!(plain, 0, "connections without TLS");
    daemon.stop().await;

    // verify-ca checks the chain only: 127.0.0.1 is not the certificate's name...
    let by_ip = |params: &str| server.url("127.0.0.1", params);
    assert!(
        ssl_of(&by_ip(&format!("sslmode=verify-ca&sslrootcert={ca}")))
            .await
            .unwrap()
    );
    // ...which verify-full refuses, in one line that says why.
    let out = pgfold(
        &["migrate"],
        &[
            (
                "DATABASE_URL",
                &by_ip(&format!("sslmode=verify-full&sslrootcert={ca}")),
            ),
            ("HOME", &home),
        ],
    );
    let line = one_line_error(&out);
    assert!(line.contains("certificate"), "{line}");
    assert!(line.contains("127.0.0.1"), "{line}");

    // A chain to a CA we do not trust: refused by verify-full, verify-ca, and by
    // require given that root certificate (libpq's rule).
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = server.url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={other_ca}"),
        );
        let err = format!("{:#}", ssl_of(&url).await.unwrap_err());
        assert!(err.contains("certificate"), "{mode}: {err}");
        assert!(!err.contains('\n'), "{mode}: {err}");
    }

    // require without a root certificate: encrypted, nothing verified.
    let require = server.url("127.0.0.1", "sslmode=require");
    succeeded(&pgfold(
        &["migrate"],
        &[("DATABASE_URL", &require), ("HOME", &home)],
    ));
    // The default (prefer) uses TLS when the server offers it.
    assert!(ssl_of(&server.url("127.0.0.1", "")).await.unwrap());

    // disable: the server accepts only TLS.
    let out = pgfold(
        &["migrate"],
        &[
            ("DATABASE_URL", &server.url("localhost", "sslmode=disable")),
            ("HOME", &home),
        ],
    );
    let line = one_line_error(&out);
    assert!(line.contains("no encryption"), "{line}");

    // A root certificate file that is not there: one line naming it.
    let missing = server.dir.path().join("missing.pem").display().to_string();
    let out = pgfold(
        &["migrate"],
        &[(
            "DATABASE_URL",
            &server.url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={missing}"),
            ),
        )],
    );
    let line = one_line_error(&out);
    assert!(line.contains(&missing), "{line}");
}

#[tokio::test]
async fn a_client_certificate_is_presented_where_the_server_requires_one() {
    let server = TlsServer::start();
    let ca = server.ca().display().to_string();
    let cert = server.client_cert().display().to_string();
    let key = server.client_key().display().to_string();
    let home = server.dir.path().display().to_string();
    let port = server.port.to_string();
    let verify = format!("sslmode=verify-full&sslrootcert={ca}");

    // Without a certificate the server refuses the role, in one line that says why.
    let bare = server.url_as("pgfold_client", "localhost", &verify);
    let out = pgfold(&["status"], &[("DATABASE_URL", &bare), ("HOME", &home)]);
    let line = one_line_error(&out);
    assert!(
        line.starts_with("pgfold: cannot connect to PostgreSQL at host=localhost")
            && line.ends_with("connection requires a valid client certificate"),
        "{line}"
    );

    // In the URL: the real binary migrates and runs; the server saw the certificate.
    let with_cert = format!("{bare}&sslcert={cert}&sslkey={key}");
    let env = [("DATABASE_URL", with_cert.as_str()), ("HOME", &home)];
    succeeded(&pgfold(&["migrate"], &env));
    succeeded(&pgfold(&["run", "--once"], &env));
    let client = pgfold::db::connect(&pgfold::db::pg_config(Some(&with_cert)).unwrap())
        .await
        .unwrap();
    let (user, dn): (String, Option<String>) = client
        .query_one(
            "SELECT current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(user, "pgfold_client");
    assert_eq!(dn.as_deref(), Some("/CN=pgfold_client"));

    // In a key=value string.
    let key_values = format!(
        "host=localhost port={port} user=pgfold_client dbname=postgres sslmode=verify-full \
         sslrootcert='{ca}' sslcert='{cert}' sslkey='{key}'"
    );
    succeeded(&pgfold(
        &["status"],
        &[("DATABASE_URL", &key_values), ("HOME", &home)],
    ));

    // From PGSSLCERT and PGSSLKEY, with no URL.
    let libpq_env = |extra: &[(&'static str, &str)], home: &str| {
        let mut env = vec![
            ("PGHOST", "localhost".to_string()),
            ("PGPORT", port.clone()),
            ("PGUSER", "pgfold_client".to_string()),
            ("PGDATABASE", "postgres".to_string()),
            ("PGSSLMODE", "verify-full".to_string()),
            ("PGSSLROOTCERT", ca.clone()),
            ("HOME", home.to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        pgfold(
            &["status"],
            &env.iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
        )
    };
    succeeded(&libpq_env(
        &[("PGSSLCERT", &cert), ("PGSSLKEY", &key)],
        &home,
    ));

    // libpq's defaults, ~/.postgresql/postgresql.crt and postgresql.key.
    let own_home = tempfile::tempdir().unwrap();
    let dot = own_home.path().join(".postgresql");
    std::fs::create_dir(&dot).unwrap();
    std::fs::copy(server.client_cert(), dot.join("postgresql.crt")).unwrap();
    std::fs::copy(server.client_key(), dot.join("postgresql.key")).unwrap();
    succeeded(&libpq_env(&[], own_home.path().to_str().unwrap()));

    // A key others may read is refused before connecting, naming the file.
    use std::os::unix::fs::PermissionsExt;
    let key_file = dot.join("postgresql.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let line = one_line_error(&libpq_env(&[], own_home.path().to_str().unwrap()));
    assert!(line.contains(key_file.to_str().unwrap()), "{line}");
    assert!(line.contains("0600"), "{line}");
}
