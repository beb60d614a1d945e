//! TLS with rustls (the `ring` provider): the certificates, chosen by the client's SNI
//! name and reloaded from their files on demand, and what a completed handshake tells
//! the protocol.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerConnection};
use rustls::sign::CertifiedKey;
use rustls::AlertDescription;

use crate::close::TlsFailure;
use crate::error::Error;

/// The default time a TLS handshake may take.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default number of handshakes (TLS, PROXY header) in progress at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// How a server speaks TLS ([`Builder::tls`](crate::Builder::tls)): certificates and
/// keys from PEM files, or a `rustls` configuration of your own.
///
/// ```no_run
/// use linedancer::TlsConfig;
///
/// // example.com's certificate, and api.example.com's for clients that ask for it by
/// // name (SNI); the first is for every other client.
/// let tls = TlsConfig::pem_files("example.com.pem", "example.com.key")
///     .add_pem_files("api.example.com.pem", "api.example.com.key")
///     .alpn(["h2", "http/1.1"]);
/// ```
#[derive(Clone)]
pub struct TlsConfig(Source);

#[derive(Clone)]
enum Source {
    Files {
        pairs: Vec<(PathBuf, PathBuf)>,
        alpn: Vec<Vec<u8>>,
    },
    Config(Arc<ServerConfig>),
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::Files { pairs, alpn } => f
                .debug_struct("TlsConfig")
                .field("pem_files", pairs)
                .field("alpn", alpn)
                .finish(),
            Source::Config(_) => f.debug_struct("TlsConfig").finish_non_exhaustive(),
        }
    }
}

impl TlsConfig {
    /// A certificate chain and its private key, from PEM files (the chain's first
    /// certificate is the server's; the key is PKCS#8, PKCS#1 or SEC1). The files are
    /// read when the server starts, which fails naming the file and the reason if one
    /// cannot be used, and again on [`ServerHandle::reload_tls`] (SIGHUP under
    /// [`run_until_signal`]).
    ///
    /// [`ServerHandle::reload_tls`]: crate::ServerHandle::reload_tls
    /// [`run_until_signal`]: crate::ServerHandle::run_until_signal
    pub fn pem_files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsConfig(Source::Files {
            pairs: vec![(cert.into(), key.into())],
            alpn: Vec::new(),
        })
    }

    /// One more certificate and key: a client whose SNI name is one of its names (its
    /// DNS subject alternative names, `*.` wildcards included) gets it. The first pair
    /// is for clients that send no name or one that no certificate has. No effect on a
    /// [`server_config`](TlsConfig::server_config).
    pub fn add_pem_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        if let Source::Files { pairs, .. } = &mut self.0 {
            pairs.push((cert.into(), key.into()));
        }
        self
    }

    /// The ALPN protocols offered, most preferred first; the one negotiated is
    /// [`TlsInfo::alpn`]. Default: none. No effect on a
    /// [`server_config`](TlsConfig::server_config), which has its own.
    pub fn alpn<P: AsRef<[u8]>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        if let Source::Files { alpn, .. } = &mut self.0 {
            *alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        }
        self
    }

    /// A `rustls` server configuration of your own (client authentication, session
    /// tickets, another provider): used as it is, and not reloaded.
    pub fn server_config(config: Arc<ServerConfig>) -> Self {
        TlsConfig(Source::Config(config))
    }

    /// Loads the certificates: what the server runs with.
    pub(crate) fn load(&self) -> Result<Tls, Error> {
        match &self.0 {
            Source::Config(config) => Ok(Tls {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::clone(config)),
                certificates: None,
            }),
            Source::Files { pairs, alpn } => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let certificates = Arc::new(Certificates {
                    current: RwLock::new(Arc::new(load_pairs(pairs, &provider)?)),
                    pairs: pairs.clone(),
                    provider: Arc::clone(&provider),
                });
                let mut config = ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| certificate_error(&pairs[0].0, e))?
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::clone(&certificates) as Arc<dyn ResolvesServerCert>);
                config.alpn_protocols = alpn.clone();
                Ok(Tls {
                    acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                    certificates: Some(certificates),
                })
            }
        }
    }
}

fn certificate_error(path: &Path, reason: impl ToString) -> Error {
    Error::Certificate {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A server's TLS: the acceptor, and the certificates when they came from files.
pub(crate) struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    certificates: Option<Arc<Certificates>>,
}

impl Tls {
    /// Reads the certificate files again and, if every one is good, serves the new
    /// certificates to handshakes from now on; otherwise keeps the old ones. Returns
    /// how many certificates are served, `None` without files.
    pub(crate) fn reload(&self) -> Result<Option<usize>, Error> {
        let Some(certificates) = &self.certificates else {
            return Ok(None);
        };
        let loaded = load_pairs(&certificates.pairs, &certificates.provider)?;
        let count = loaded.entries.len();
        *certificates
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
        Ok(Some(count))
    }
}

/// The certificates loaded from files, replaced whole on reload; picks one for each
/// handshake by the client's SNI name.
#[derive(Debug)]
struct Certificates {
    current: RwLock<Arc<Loaded>>,
    pairs: Vec<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
}

/// Each certificate with the DNS names it is for, in the order given.
#[derive(Debug)]
struct Loaded {
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner));
        let chosen = hello.server_name().and_then(|name| {
            (loaded.entries.iter())
                .find(|(names, _)| names.iter().any(|pattern| name_matches(pattern, name)))
        });
        chosen
            .or(loaded.entries.first())
            .map(|(_, key)| Arc::clone(key))
    }
}

/// Whether a certificate's DNS name (`example.com`, `*.example.com`) covers `name`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

fn load_pairs(pairs: &[(PathBuf, PathBuf)], provider: &CryptoProvider) -> Result<Loaded, Error> {
    let entries = pairs
        .iter()
        .map(|(cert, key)| load_pair(cert, key, provider))
        .collect::<Result<_, _>>()?;
    Ok(Loaded { entries })
}

/// One certificate chain and key, checked to match, with the chain's DNS names.
fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Vec<String>, Arc<CertifiedKey>), Error> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| certificate_error(cert_path, pem_reason(e, "CERTIFICATE")))?;
    let Some(leaf) = chain.first() else {
        return Err(certificate_error(cert_path, "no CERTIFICATE in the file"));
    };
    let names = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| certificate_error(cert_path, format!("not a valid certificate: {e}")))?
        .valid_dns_names()
        .map(str::to_owned)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| certificate_error(key_path, pem_reason(e, "PRIVATE KEY")))?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        certificate_error(
            key_path,
            format!("cannot use this key with {}: {e}", cert_path.display()),
        )
    })?;
    Ok((names, Arc::new(certified)))
}

/// Why a PEM file that should hold a `kind` cannot be used.
fn pem_reason(error: rustls::pki_types::pem::Error, kind: &str) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => format!("no {kind} in the file"),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// What a completed TLS handshake settled, for the protocol
/// ([`Ctx::tls`](crate::Ctx::tls), [`Connection::tls`](crate::Connection::tls)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    server_name: Option<String>,
    alpn: Option<Vec<u8>>,
    version: Option<&'static str>,
}

impl TlsInfo {
    pub(crate) fn of(connection: &ServerConnection) -> Self {
        TlsInfo {
            server_name: connection.server_name().map(str::to_owned),
            alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
            version: connection
                .protocol_version()
                .and_then(|version| version.as_str()),
        }
    }

    /// The host name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The ALPN protocol agreed on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The TLS version, such as `TLSv1_3`.
    pub fn version(&self) -> Option<&'static str> {
        self.version
    }
}

/// Sorts a failed handshake's error.
pub(crate) fn failure(error: &io::Error) -> TlsFailure {
    if let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::PeerMisbehaved(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => TlsFailure::BadMessage,
            rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
                TlsFailure::Incompatible
            }
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied
                // What a client says when our certificate's signature, or our proof
                // of its key, does not verify.
                | AlertDescription::DecryptError => TlsFailure::CertificateRejected,
                AlertDescription::HandshakeFailure
                | AlertDescription::ProtocolVersion
                | AlertDescription::InsufficientSecurity
                | AlertDescription::NoApplicationProtocol => TlsFailure::Incompatible,
                _ => TlsFailure::Alert,
            },
            _ => TlsFailure::Other,
        };
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsFailure::PeerClosed,
        io::ErrorKind::InvalidData => TlsFailure::BadMessage,
        _ => TlsFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("example.com", "EXAMPLE.com"));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }
}
