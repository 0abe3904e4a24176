//! TLS to Postgres, as libpq means it (SPEC §10): `sslmode` disable, prefer,
//! require, verify-ca or verify-full, with `sslrootcert`, `sslcert` and
//! `sslkey`, for every connection: the SQL pool (tokio-postgres through
//! `tokio-postgres-rustls`) and the replication stream (pgwire-replication's
//! own rustls TLS). The parameters are read from `DATABASE_URL` once, and the
//! files are loaded when the configuration is checked, so a wrong path or a
//! bad PEM stops the start with the variable and the fix, not a later connect.
//!
//! tokio-postgres parses only disable/prefer/require and refuses the other
//! parameters, so they are taken out of the URL here and the connection is
//! told `require` for the verifying modes; verification is ours.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, unverified; plaintext otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing, unverified (verified against `sslrootcert` when one is given, as libpq does).
    Require,
    /// TLS with the server's certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it only negotiates, the checks are ours.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

/// A TLS parameter of `DATABASE_URL` that cannot be used, with its fix.
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct TlsConfigError {
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: &'static str,
}

fn config_error(problem: String, fix: &'static str) -> TlsConfigError {
    TlsConfigError { problem, fix }
}

/// Where the CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    /// No CA given: nothing to verify against.
    None,
    /// `sslrootcert=/path/ca.pem`.
    File(PathBuf),
    /// `sslrootcert=system`: the Mozilla root program (webpki-roots).
    System,
}

/// The TLS parameters of `DATABASE_URL`, checked, with their files loaded.
#[derive(Clone)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    roots: Roots,
    client_cert: Option<(PathBuf, PathBuf)>,
    /// The SQL connector's configuration (None for `disable`).
    sql: Option<Arc<ClientConfig>>,
    /// verify-ca: a DNS name of the server's certificate, as the SQL
    /// connection verified it (see `replication`).
    verified_name: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl TlsSettings {
    /// Takes the TLS parameters out of a `postgres://` URL. Returns the URL
    /// without them (for tokio-postgres) and the checked settings.
    pub fn from_url(url: &str) -> Result<(String, TlsSettings), TlsConfigError> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        // Other parameters are kept byte for byte: tokio-postgres decodes
        // them its own way (a `+` is not a space to it).
        let mut kept: Vec<&str> = Vec::new();
        let mut mode = None;
        let (mut rootcert, mut cert, mut key) = (None, None, None);
        for raw in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = raw.split_once('=').unwrap_or((raw, ""));
            let v = percent_decode(v);
            match k {
                "sslmode" => {
                    mode = Some(SslMode::parse(&v).ok_or_else(|| {
                        config_error(
                            format!("sslmode={v} is not a libpq sslmode"),
                            "use sslmode=disable, prefer, require, verify-ca or verify-full",
                        )
                    })?)
                }
                "sslrootcert" => rootcert = Some(v),
                "sslcert" => cert = Some(PathBuf::from(v)),
                "sslkey" => key = Some(PathBuf::from(v)),
                _ => kept.push(raw),
            }
        }
        let mode = mode.unwrap_or_default();
        let roots = match rootcert.as_deref() {
            Some("system") => Roots::System,
            Some(path) => Roots::File(path.into()),
            None => default_root_cert().map_or(Roots::None, Roots::File),
        };
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(config_error(
                    "sslcert and sslkey come together: only one of them is set".into(),
                    "set both sslcert=/path/client.crt and sslkey=/path/client.key, or neither",
                ))
            }
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && roots == Roots::None {
            return Err(config_error(
                format!(
                    "sslmode={} needs the CA that signed the server's certificate",
                    mode.as_str()
                ),
                "add sslrootcert=/path/to/ca.pem (or sslrootcert=system for a publicly signed server) to DATABASE_URL",
            ));
        }
        let mut settings = TlsSettings {
            mode,
            roots,
            client_cert,
            sql: None,
            verified_name: Arc::default(),
        };
        if mode != SslMode::Disable {
            settings.sql = Some(Arc::new(settings.client_config()?));
        }
        let clean = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((clean, settings))
    }

    /// What tokio-postgres is told to negotiate.
    pub fn negotiation(&self) -> tokio_postgres::config::SslMode {
        self.mode.negotiation()
    }

    /// The connector of the SQL pool; None for `disable`.
    pub fn sql_connector(&self) -> Option<tokio_postgres_rustls::MakeRustlsConnect> {
        self.sql
            .as_ref()
            .map(|c| tokio_postgres_rustls::MakeRustlsConnect::new((**c).clone()))
    }

    /// The same settings for the replication stream (built when the stream
    /// starts, after the SQL pool has connected).
    ///
    /// pgwire-replication 0.5's verify-ca ignores only rustls' older
    /// `NotValidForName` error; rustls 0.23.18+ reports a name mismatch as
    /// `NotValidForNameContext`, so a certificate for another name is refused.
    /// The chain check is what verify-ca asks for, so the stream is told, as
    /// its SNI name, a name the certificate carries, taken from the chain the
    /// SQL connection verified: the chain is still checked against the CA.
    pub fn replication(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::config::SslMode as Wire;
        let ca = match &self.roots {
            Roots::File(p) => Some(p.clone()),
            Roots::None | Roots::System => None,
        };
        let mut tls = match self.effective_mode() {
            SslMode::Disable => pgwire_replication::TlsConfig::disabled(),
            SslMode::Prefer => pgwire_replication::TlsConfig {
                mode: Wire::Prefer,
                ..Default::default()
            },
            SslMode::Require => pgwire_replication::TlsConfig::require(),
            SslMode::VerifyCa => {
                let tls = pgwire_replication::TlsConfig::verify_ca(ca);
                match self.verified_name.lock().ok().and_then(|n| n.clone()) {
                    Some(name) => tls.with_sni_hostname(name),
                    None => tls,
                }
            }
            SslMode::VerifyFull => pgwire_replication::TlsConfig::verify_full(ca),
        };
        if let Some((cert, key)) = &self.client_cert {
            tls = tls.with_client_cert(cert, key);
        }
        tls
    }

    /// libpq: `require` with a root certificate verifies the chain, like `verify-ca`.
    fn effective_mode(&self) -> SslMode {
        match (self.mode, &self.roots) {
            (SslMode::Require, Roots::File(_) | Roots::System) => SslMode::VerifyCa,
            (mode, _) => mode,
        }
    }

    fn root_store(&self) -> Result<RootCertStore, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        match &self.roots {
            Roots::None => {}
            Roots::System => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Roots::File(path) => {
                let certs = read_pem_certs(path, "sslrootcert")?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(config_error(
                        format!("sslrootcert={}: no usable CA certificate in it", path.display()),
                        "point sslrootcert at the PEM file of the CA that signed the server's certificate",
                    ));
                }
            }
        }
        Ok(roots)
    }

    fn client_config(&self) -> Result<ClientConfig, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(self.root_store()?);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS: {e}"), "report this as a bug"))?
            .with_root_certificates(roots.clone());
        let mut cfg = match &self.client_cert {
            Some((cert, key)) => {
                let chain = read_pem_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    config_error(
                        format!(
                            "sslkey={}: not a readable PEM private key ({e})",
                            key.display()
                        ),
                        "point sslkey at the client's private key (PEM, PKCS#8 or PKCS#1)",
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    config_error(
                        format!("sslcert/sslkey: {e}"),
                        "use the key that belongs to the client certificate",
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match self.effective_mode() {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Unverified(provider)),
            SslMode::VerifyCa => Arc::new(ChainOnly {
                inner: WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| config_error(format!("TLS: {e}"), "check sslrootcert"))?,
                verified_name: self.verified_name.clone(),
            }),
            // rustls' own verifier checks the chain and the host name.
            SslMode::VerifyFull => return Ok(cfg),
        };
        cfg.dangerous().set_certificate_verifier(verifier);
        Ok(cfg)
    }
}

/// A URL parameter's value, percent-decoded (as libpq reads a URI).
fn percent_decode(v: &str) -> String {
    url::form_urlencoded::parse(format!("v={}", v.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// libpq's default CA file, used when `sslrootcert` is not given.
fn default_root_cert() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

fn read_pem_certs(
    path: &std::path::Path,
    param: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            config_error(
                format!("{param}={}: cannot be read ({e})", path.display()),
                "check the path (mounted from the Secret?) and that the sidecar may read it",
            )
        })?
        .collect();
    let certs = certs.map_err(|e| {
        config_error(
            format!(
                "{param}={}: not a PEM certificate file ({e})",
                path.display()
            ),
            "use the PEM file (-----BEGIN CERTIFICATE-----)",
        )
    })?;
    if certs.is_empty() {
        return Err(config_error(
            format!("{param}={}: holds no certificate", path.display()),
            "use the PEM file (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// `prefer`/`require` without a CA: encrypted, the certificate not checked
/// (what libpq does; only verify-ca and verify-full stop a man in the middle).
/// The handshake signatures are still checked, so the session key belongs to
/// whoever holds the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the host name is not checked.
/// Remembers a DNS name of the certificate it accepted (see `replication`).
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
    verified_name: Arc<Mutex<Option<String>>>,
}

impl ChainOnly {
    fn remember_name(&self, end_entity: &CertificateDer<'_>) {
        // A wildcard name is no host name to connect by: `*.example.com`
        // becomes `sidecar.example.com`, which it covers.
        let name = webpki::EndEntityCert::try_from(end_entity)
            .ok()
            .and_then(|c| {
                c.valid_dns_names()
                    .next()
                    .map(|n| match n.strip_prefix("*.") {
                        Some(rest) => format!("sidecar.{rest}"),
                        None => n.to_string(),
                    })
            });
        if let (Some(name), Ok(mut slot)) = (name, self.verified_name.lock()) {
            *slot = Some(name);
        }
    }
}

fn is_name_mismatch(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e) if is_name_mismatch(&e) => Ok(ServerCertVerified::assertion()),
            other => other,
        };
        if verified.is_ok() {
            self.remember_name(end_entity);
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Adds what a failed connection means for TLS, and its fix, to `error`
/// when it is about TLS; otherwise returns it as it is.
pub fn with_advice(error: anyhow::Error, mode: SslMode) -> anyhow::Error {
    match explain(&format!("{error:#}"), mode) {
        Some(advice) => error.context(format!("TLS: {advice}")),
        None => error,
    }
}

/// What a failed connection's error means for TLS, and the fix; None when
/// it is not about TLS. Both connectors' wordings are recognised.
pub fn explain(error: &str, mode: SslMode) -> Option<String> {
    let e = error;
    let verify = mode.as_str();
    if e.contains("UnknownIssuer") || e.contains("unknown issuer") || e.contains("BadSignature") {
        Some(format!(
            "the server's TLS certificate is not signed by the CA in sslrootcert (sslmode={verify}): \
             set sslrootcert to the CA that issued the server's certificate"
        ))
    } else if e.contains("NotValidForName")
        || e.contains("not valid for name")
        || e.contains("is an IP address")
    {
        Some(format!(
            "the server's TLS certificate does not name the host in DATABASE_URL (sslmode={verify}): \
             connect by a host name the certificate carries, or use sslmode=verify-ca"
        ))
    } else if e.contains("server does not support TLS")
        || e.contains("does not support TLS")
        || e.contains("server does not support SSL")
    {
        Some(format!(
            "the server does not accept TLS, but sslmode={verify} requires it: \
             turn ssl on in postgresql.conf, or lower sslmode"
        ))
    } else if (e.contains("no pg_hba.conf entry") || e.contains("pg_hba.conf rejects"))
        && e.contains("no encryption")
    {
        Some(
            "the server accepts this role only over TLS (hostssl in pg_hba.conf): \
             set sslmode=require or stronger in DATABASE_URL"
                .into(),
        )
    } else if e.contains("Expired") || (e.contains("expired") && e.contains("certificate")) {
        Some("the server's TLS certificate has expired: renew it on the server".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_leave_the_url_and_the_rest_stays() {
        let (clean, tls) = TlsSettings::from_url(
            "postgres://u:p@db:5432/ms?sslmode=require&application_name=x&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            clean,
            "postgres://u:p@db:5432/ms?application_name=x&connect_timeout=5"
        );
        assert_eq!(tls.mode, SslMode::Require);
        let (clean, _) = TlsSettings::from_url(
            "postgres://u@db/ms?options=-c%20synchronous_commit%3Dlocal&sslmode=prefer&x=a+b",
        )
        .unwrap();
        assert_eq!(
            clean,
            "postgres://u@db/ms?options=-c%20synchronous_commit%3Dlocal&x=a+b"
        );
        let (clean, tls) = TlsSettings::from_url("postgres://u@db/ms").unwrap();
        assert_eq!(clean, "postgres://u@db/ms");
        assert_eq!(tls.mode, SslMode::Prefer);
        let (clean, tls) = TlsSettings::from_url("postgres://u@db/ms?sslmode=disable").unwrap();
        assert_eq!(clean, "postgres://u@db/ms");
        assert_eq!(tls.mode, SslMode::Disable);
        assert!(tls.sql_connector().is_none());
    }

    #[test]
    fn verifying_modes_need_a_ca_and_say_so() {
        let e = TlsSettings::from_url("postgres://u@db/ms?sslmode=verify-full").unwrap_err();
        assert!(e.problem.contains("verify-full"), "{}", e.problem);
        assert!(e.fix.contains("sslrootcert"));
        let e =
            TlsSettings::from_url("postgres://u@db/ms?sslmode=verify-full&sslrootcert=/nope.pem")
                .unwrap_err();
        assert!(e.problem.contains("/nope.pem"), "{}", e.problem);
        let e = TlsSettings::from_url("postgres://u@db/ms?sslmode=strict").unwrap_err();
        assert!(e.problem.contains("strict"));
        let e = TlsSettings::from_url("postgres://u@db/ms?sslcert=/c.pem").unwrap_err();
        assert!(e.problem.contains("sslkey"));
        let (_, tls) =
            TlsSettings::from_url("postgres://u@db/ms?sslmode=verify-ca&sslrootcert=system")
                .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
    }

    #[test]
    fn connection_errors_are_explained() {
        let full = SslMode::VerifyFull;
        assert!(explain("invalid peer certificate: UnknownIssuer", full)
            .unwrap()
            .contains("sslrootcert"));
        assert!(explain("invalid peer certificate: NotValidForName", full)
            .unwrap()
            .contains("verify-ca"));
        assert!(explain(
            "TLS config error: VerifyFull enabled but host '127.0.0.1' is an IP address",
            full
        )
        .unwrap()
        .contains("host name"));
        assert!(explain(
            "error performing TLS handshake: server does not support TLS",
            SslMode::Require
        )
        .unwrap()
        .contains("ssl on"));
        assert!(explain("password authentication failed", full).is_none());
    }
}
