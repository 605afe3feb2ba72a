//! TLS to PostgreSQL through rustls, with libpq's `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey`.
//!
//! tokio-postgres itself knows only `sslmode=disable|prefer|require` and leaves
//! certificate checks to the TLS connector. So the TLS parameters are taken out of
//! the connection string before tokio-postgres parses it ([`split_options`]), and
//! [`Tls::new`] turns them into the `SslMode` tokio-postgres should use plus a
//! rustls configuration that verifies what libpq would verify:
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | when the server offers it | not checked |
//! | `require` | always | not checked; with a root certificate file, as `verify-ca` |
//! | `verify-ca` | always | chain checked against the root certificates |
//! | `verify-full` | always | chain and host name checked |
//!
//! The root certificates are `sslrootcert` (a PEM file), else
//! `~/.postgresql/root.crt` when it exists, else (for `verify-*`) the system's
//! trust store; `sslrootcert=system` names the system's store explicitly and, as
//! in libpq, requires `verify-full`. TLS is never used over Unix sockets.
//!
//! A client certificate (PEM, with its chain) is `sslcert`, else
//! `~/.postgresql/postgresql.crt` when it exists; its key is `sslkey`, else
//! `~/.postgresql/postgresql.key`. As in libpq, the key file must not be readable by
//! others: 0600 or stricter when the current user owns it, 0640 or stricter when
//! root does. Unlike libpq, an `sslcert` that names a missing file is an error
//! rather than a connection without a certificate.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The stream of a connection made through [`Tls::connector`].
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Taken as `prefer`: TLS when the server offers it (libpq would try a plain
    /// connection first).
    Allow,
    /// TLS when the server offers it, its certificate not checked (the default).
    Prefer,
    /// Always TLS; the certificate not checked, unless a root certificate file is
    /// given (then as [`SslMode::VerifyCa`]).
    Require,
    /// Always TLS, the certificate's chain checked against the root certificates.
    VerifyCa,
    /// Always TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// The name as libpq spells it (`verify-full`), for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether to insist.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Allow | SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

impl FromStr for SslMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => bail!(
                "sslmode {s:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ),
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS parameters of a connection string (or the PGSSL* variables), as
/// written. `None`: not given; each falls back as in libpq (see the module
/// documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `sslmode` / PGSSLMODE, unparsed: [`Tls::new`] checks it.
    pub sslmode: Option<String>,
    /// `sslrootcert` / PGSSLROOTCERT: a PEM file of root certificates, or `system`.
    pub sslrootcert: Option<String>,
    /// `sslcert` / PGSSLCERT: the client certificate's PEM file.
    pub sslcert: Option<String>,
    /// `sslkey` / PGSSLKEY: the client certificate's private key file.
    pub sslkey: Option<String>,
}

impl TlsOptions {
    /// Stores `value` if `key` is one of ours; false if it is not.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Takes the TLS parameters out of a connection string (URL or
/// key=value), returning the rest for tokio-postgres to parse. A string this
/// cannot read is returned whole, for tokio-postgres to report.
pub fn split_options(conn: &str) -> (String, TlsOptions) {
    let split = if let Some(rest) = conn
        .strip_prefix("postgres://")
        .or_else(|| conn.strip_prefix("postgresql://"))
    {
        split_url(conn, conn.len() - rest.len())
    } else {
        split_key_values(conn)
    };
    split.unwrap_or_else(|| (conn.to_string(), TlsOptions::default()))
}

/// The query of a URL starts at the first `?` after the credentials, as in
/// tokio-postgres's parser.
fn split_url(url: &str, after_scheme: usize) -> Option<(String, TlsOptions)> {
    let rest = &url[after_scheme..];
    let from = after_scheme + rest.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[from..].find('?').map(|q| from + q) else {
        return Some((url.to_string(), TlsOptions::default()));
    };
    let mut options = TlsOptions::default();
    let mut kept = Vec::new();
    for param in url[q + 1..].split('&') {
        let taken = match param.split_once('=') {
            Some((key, value)) => options.take(&percent_decode(key)?, percent_decode(value)?),
            None => false,
        };
        if !taken {
            kept.push(param);
        }
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Some((rest, options))
}

/// Decodes `%XX`; a `%` not followed by two hex digits stays as it is (as in
/// tokio-postgres). `None` when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `key=value` pairs, values bare or in single quotes, `\` escaping the next
/// character: libpq's (and tokio-postgres's) grammar. The pairs that stay are
/// written back quoted.
fn split_key_values(conn: &str) -> Option<(String, TlsOptions)> {
    let mut options = TlsOptions::default();
    let mut kept = Vec::new();
    let mut chars = conn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        if !options.take(&key, value.clone()) {
            kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
    }
    Some((kept.join(" "), options))
}

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file: `sslrootcert`, or libpq's default `~/.postgresql/root.crt`.
    File(PathBuf),
    /// The system's trust store.
    System,
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: no TLS, or a mode that does not check (`prefer`, `require`
    /// without a root certificate file).
    None,
    /// The chain, to `Roots`; not the host name (`verify-ca`).
    Chain(Roots),
    /// The chain and the host name (`verify-full`).
    Full(Roots),
}

/// The client certificate and key files a connection presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate, with its chain (PEM).
    pub cert: PathBuf,
    /// Its unencrypted private key (PEM), which must not be readable by others
    /// (see the module documentation).
    pub key: PathBuf,
}

/// The TLS side of a connection configuration: the mode and a rustls connector
/// that verifies what the mode asks for.
#[derive(Clone)]
pub struct Tls {
    mode: SslMode,
    verification: Verification,
    client_certificate: Option<ClientCertificate>,
    connector: MakeRustlsConnect,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("verification", &self.verification)
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

impl Tls {
    /// Resolves the options. `tcp` says whether any host is reached over TCP:
    /// with Unix sockets only, TLS is never used and no file is read.
    pub fn new(options: &TlsOptions, tcp: bool) -> anyhow::Result<Tls> {
        let system = options.sslrootcert.as_deref() == Some("system");
        let mode = match options.sslmode.as_deref() {
            Some(mode) => mode.parse()?,
            // libpq: sslrootcert=system makes verify-full the default.
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if system && mode != SslMode::VerifyFull {
            bail!("sslmode={mode} may not be used with sslrootcert=system (use verify-full)");
        }
        let explicit = options.sslrootcert.as_deref().filter(|p| !p.is_empty());
        let verification = if mode == SslMode::Disable || !tcp {
            Verification::None
        } else {
            let roots = match explicit {
                Some("system") => Some(Roots::System),
                Some(path) => Some(Roots::File(PathBuf::from(path))),
                None => default_root_file().map(Roots::File),
            };
            match (mode, roots) {
                (SslMode::VerifyFull, roots) => Verification::Full(roots.unwrap_or(Roots::System)),
                (SslMode::VerifyCa, roots) => Verification::Chain(roots.unwrap_or(Roots::System)),
                // libpq: with a root certificate file, require verifies the chain.
                (SslMode::Require, Some(roots)) => Verification::Chain(roots),
                // A named file is read even where it is not used, so that a wrong
                // path is an error rather than silently no verification.
                (_, Some(Roots::File(path))) if explicit.is_some() => {
                    load_roots(&Roots::File(path))?;
                    Verification::None
                }
                _ => Verification::None,
            }
        };
        let client_certificate = if mode == SslMode::Disable || !tcp {
            None
        } else {
            client_certificate(options)
        };
        let identity = client_certificate.as_ref().map(load_identity).transpose()?;
        let connector = MakeRustlsConnect::new(client_config(&verification, identity)?);
        Ok(Tls {
            mode,
            verification,
            client_certificate,
            connector,
        })
    }

    /// The mode the options resolved to. Public for inspection; the unit tests
    /// check it.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// What the connector checks of the server's certificate (the unit tests
    /// check it).
    pub fn verification(&self) -> &Verification {
        &self.verification
    }

    /// The files presented to the server, if any: none over Unix sockets or with
    /// `sslmode=disable` (the unit tests check it).
    pub fn client_certificate(&self) -> Option<&ClientCertificate> {
        self.client_certificate.as_ref()
    }

    /// The `SslMode` for tokio-postgres.
    pub fn negotiation(&self) -> tokio_postgres::config::SslMode {
        self.mode.negotiation()
    }

    /// The connector to hand to tokio-postgres (or deadpool).
    pub fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }
}

/// libpq's default root certificate file, when it exists.
fn default_root_file() -> Option<PathBuf> {
    default_file("root.crt").filter(|p| p.is_file())
}

/// A file in `~/.postgresql`, whether or not it exists.
fn default_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".postgresql").join(name))
}

/// The certificate to present: `sslcert`, else libpq's default when that file
/// exists; with `sslkey`, else the default key file.
fn client_certificate(options: &TlsOptions) -> Option<ClientCertificate> {
    let named = |o: &Option<String>| o.as_deref().filter(|p| !p.is_empty()).map(PathBuf::from);
    let cert = named(&options.sslcert)
        .or_else(|| default_file("postgresql.crt").filter(|p| p.is_file()))?;
    let key = named(&options.sslkey).or_else(|| default_file("postgresql.key"))?;
    Some(ClientCertificate { cert, key })
}

/// Reads the certificate chain and the key; errors are one line and name the file.
fn load_identity(
    files: &ClientCertificate,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let shown = files.cert.display();
    let pem =
        std::fs::read(&files.cert).map_err(|e| anyhow!("cannot read sslcert file {shown}: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("sslcert file {shown} is not valid PEM: {e}"))?;
    if chain.is_empty() {
        bail!("sslcert file {shown} holds no PEM certificate");
    }
    check_key_permissions(&files.key)?;
    let shown = files.key.display();
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow!("sslkey file {shown} holds no unencrypted PEM private key ({e})"))?;
    Ok((chain, key))
}

/// libpq's rule: a key the current user owns must not be accessible to group or
/// others (0600 or stricter); one root owns may be readable by its group (0640).
fn check_key_permissions(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    let meta =
        std::fs::metadata(path).map_err(|e| anyhow!("cannot read sslkey file {shown}: {e}"))?;
    if !meta.is_file() {
        bail!("sslkey file {shown} is not a regular file");
    }
    let mode = meta.mode();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let too_open =
        (meta.uid() == euid && mode & 0o077 != 0) || (meta.uid() == 0 && mode & 0o037 != 0);
    if too_open {
        bail!(
            "sslkey file {shown} has group or world access (mode {:04o}); it must be 0600 or \
             stricter when owned by the current user, 0640 or stricter when owned by root",
            mode & 0o7777
        );
    }
    Ok(())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(
    verification: &Verification,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<ClientConfig> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("cannot set up TLS: {e}"))?;
    let builder = match verification {
        Verification::Full(roots) => builder.with_root_certificates(load_roots(roots)?),
        Verification::Chain(roots) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots: Arc::new(load_roots(roots)?),
                    algorithms,
                }))
        }
        Verification::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification { algorithms })),
    };
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| anyhow!("cannot use the client certificate (sslcert, sslkey): {e}"))?,
        None => builder.with_no_client_auth(),
    };
    // What libpq 17 sends; required by servers that accept direct TLS.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// Reads the trusted roots; errors are one line and name the file.
fn load_roots(roots: &Roots) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let shown = path.display();
            let pem = std::fs::read(path)
                .map_err(|e| anyhow!("cannot read sslrootcert file {shown}: {e}"))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| anyhow!("sslrootcert file {shown} is not valid PEM: {e}"))?;
                store.add(cert).map_err(|e| {
                    anyhow!("sslrootcert file {shown} holds an unusable certificate: {e}")
                })?;
            }
            if store.is_empty() {
                bail!("sslrootcert file {shown} holds no PEM certificate");
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found.errors.first().map(|e| format!(": {e}"));
                bail!(
                    "no system root certificates found{} (set sslrootcert to a CA file)",
                    why.unwrap_or_default()
                );
            }
        }
    }
    Ok(store)
}

/// `verify-ca` (and `require` with a root file): the chain must lead to a trusted
/// root; the name the certificate was issued for is not checked.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `prefer` and `require`: encryption without authentication of the server, as
/// libpq does with no root certificate. The handshake signature is still checked
/// against the certificate the server presented.
#[derive(Debug)]
struct NoVerification {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(sslmode: Option<&str>, sslrootcert: Option<&str>) -> TlsOptions {
        TlsOptions {
            sslmode: sslmode.map(str::to_string),
            sslrootcert: sslrootcert.map(str::to_string),
            ..TlsOptions::default()
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (rest, o) = split_options(
            "postgres://u:p%3Fw@db:5432/shop?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p%3Fw@db:5432/shop?application_name=x");
        assert_eq!(o, opts(Some("verify-full"), Some("/etc/ca.pem")));

        let (rest, o) = split_options("postgresql://db/shop?sslmode=require");
        assert_eq!(rest, "postgresql://db/shop");
        assert_eq!(o, opts(Some("require"), None));

        let (rest, o) = split_options("postgres://db/shop");
        assert_eq!(rest, "postgres://db/shop");
        assert_eq!(o, TlsOptions::default());
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_strings() {
        let (rest, o) = split_options(
            "host=db sslmode = verify-ca  password='its' sslrootcert='/a b/ca.pem' dbname=shop",
        );
        assert_eq!(o, opts(Some("verify-ca"), Some("/a b/ca.pem")));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_password(), Some(&b"its"[..]));

        let (rest, o) = split_options(r"password='a\'b c' sslmode=disable");
        assert_eq!(o, opts(Some("disable"), None));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a'b c"[..]));
    }

    #[test]
    fn an_unreadable_string_is_left_to_tokio_postgres() {
        let (rest, o) = split_options("host=db sslmode");
        assert_eq!(rest, "host=db sslmode");
        assert_eq!(o, TlsOptions::default());
    }

    #[test]
    fn modes_resolve_as_in_libpq() {
        let tls = Tls::new(&opts(None, None), true).unwrap();
        assert_eq!(tls.mode(), SslMode::Prefer);
        assert_eq!(tls.verification(), &Verification::None);

        let tls = Tls::new(&opts(Some("disable"), Some("/nonexistent")), true).unwrap();
        assert_eq!(tls.negotiation(), tokio_postgres::config::SslMode::Disable);

        let err = Tls::new(&opts(Some("require"), Some("system")), true).unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");

        let err = Tls::new(&opts(Some("verify-everything"), None), true).unwrap_err();
        assert!(err.to_string().contains("verify-everything"), "{err}");

        // Unix sockets only: no TLS, no file read.
        let tls = Tls::new(&opts(Some("verify-full"), Some("/nonexistent")), false).unwrap();
        assert_eq!(tls.verification(), &Verification::None);
    }

    #[test]
    fn a_bad_root_certificate_file_is_one_line_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (mode, path) in [
            ("verify-full", &missing),
            ("require", &missing),
            ("prefer", &missing),
            ("verify-ca", &garbage),
            ("verify-full", &broken),
        ] {
            let err = Tls::new(&opts(Some(mode), path.to_str()), true).unwrap_err();
            let text = format!("{err:#}");
            assert!(text.contains(path.to_str().unwrap()), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn client_certificate_parameters_are_taken_out_of_urls_and_key_values() {
        let (rest, o) = split_options(
            "postgres://app@db/shop?sslcert=%2Fetc%2Fc.pem&application_name=x&sslkey=%2Fetc%2Fk.pem",
        );
        assert_eq!(rest, "postgres://app@db/shop?application_name=x");
        assert_eq!(o.sslcert.as_deref(), Some("/etc/c.pem"));
        assert_eq!(o.sslkey.as_deref(), Some("/etc/k.pem"));

        let (rest, o) = split_options("host=db sslcert='/a b/c.pem' sslkey=/k.pem dbname=shop");
        assert_eq!(o.sslcert.as_deref(), Some("/a b/c.pem"));
        assert_eq!(o.sslkey.as_deref(), Some("/k.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("shop"));
    }

    #[test]
    fn a_key_others_may_read_is_refused_as_libpq_does() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        std::fs::write(&key, "not checked before the permissions\n").unwrap();
        // Owned by the current user (the test's): 0600 or stricter.
        for (mode, allowed) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = check_key_permissions(&key);
            assert_eq!(result.is_ok(), allowed, "{mode:o}: {result:?}");
            if let Err(e) = result {
                let text = e.to_string();
                assert!(text.contains(key.to_str().unwrap()), "{text}");
                assert!(!text.contains('\n'), "{text}");
            }
        }
        let err = check_key_permissions(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn client_certificate_files_are_read_only_where_tls_may_be_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["pgfold".to_string()])
            .unwrap()
            .self_signed(&key_pair)
            .unwrap();
        let (cert_file, key_file) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |mode: &str, cert: &Path| TlsOptions {
            sslmode: Some(mode.to_string()),
            sslcert: cert.to_str().map(str::to_string),
            sslkey: key_file.to_str().map(str::to_string),
            ..TlsOptions::default()
        };

        let tls = Tls::new(&with("require", &cert_file), true).unwrap();
        let expected = ClientCertificate {
            cert: cert_file.clone(),
            key: key_file.clone(),
        };
        assert_eq!(tls.client_certificate(), Some(&expected));

        // A named certificate that is not there is an error naming it...
        let missing = dir.path().join("missing.crt");
        let err = Tls::new(&with("prefer", &missing), true).unwrap_err();
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
        // ...except where no TLS would be used.
        for (mode, tcp) in [("disable", true), ("require", false)] {
            let tls = Tls::new(&with(mode, &missing), tcp).unwrap();
            assert_eq!(tls.client_certificate(), None, "{mode}");
        }
    }
}
