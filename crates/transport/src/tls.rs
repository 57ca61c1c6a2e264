//! TCP with mutual TLS (`tls://HOST:PORT`), for a broker that serves other hosts.
//!
//! Both ends prove who they are: the broker presents its certificate and accepts only
//! clients whose certificate chains to its client CA; a client checks the broker's
//! certificate against its CA and the host name it dialled. TLS 1.3 is preferred and 1.2 the
//! minimum, with the `ring` provider's default cipher suites. The verified subject of the
//! client's certificate becomes [`crate::PeerInfo::tls_subject`], the identity the broker's ACL
//! matches.
//!
//! The handshake runs in the connection's own task ([`crate::Incoming::establish`]), so a
//! peer that never finishes it holds up nobody but itself.

use crate::error::TransportError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files one end of a mutual TLS connection needs, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This end's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This end's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates the other end's certificate must chain to: for a broker, the CA
    /// of its clients; for a client, the CA of the broker.
    pub ca: PathBuf,
}

/// A broker's TLS settings, loaded and checked ([`ServerTls::load`]). Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

/// A client's TLS settings, loaded and checked ([`ClientTls::load`]). Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerTls")
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientTls")
    }
}

/// The `ring` provider: it builds without a C toolchain beyond `cc` and for the Windows GNU
/// target, at the price of the post-quantum hybrid key exchange (X25519MLKEM768) that only the
/// `aws-lc-rs` provider has; rustls marks it deprecated for that reason. Key exchange is
/// X25519, P-256 or P-384.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn bad(what: impl Into<String>) -> TransportError {
    TransportError::Tls(what.into())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let read = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("reading {what} {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("reading {what} {}: {e}", path.display())))?;
    if read.is_empty() {
        return Err(bad(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(read)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        bad(format!(
            "reading the private key {}: {e} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)",
            path.display()
        ))
    })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TransportError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path, "the CA file")? {
        store
            .add(c)
            .map_err(|e| bad(format!("the CA file {}: {e}", path.display())))?;
    }
    Ok(Arc::new(store))
}

/// A certificate and key that do not go together (or a key rustls cannot use).
fn mismatched(files: &TlsFiles, e: &rustls::Error) -> TransportError {
    bad(format!(
        "the certificate {} with the key {}: {e}",
        files.cert.display(),
        files.key.display()
    ))
}

impl ServerTls {
    /// Reads the broker's certificate and key, and the CA its clients' certificates must
    /// chain to. Every client must present such a certificate.
    ///
    /// # Errors
    ///
    /// [`TransportError::Tls`] naming the file and what is wrong with it (missing, not PEM,
    /// no certificate, a key that does not match the certificate…).
    pub fn load(files: &TlsFiles) -> Result<Self, TransportError> {
        let chain = certs(&files.cert, "the certificate")?;
        let key = key(&files.key)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&files.ca)?,
            provider(),
        )
        .build()
        .map_err(|e| bad(format!("the client CA {}: {e}", files.ca.display())))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| bad(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| mismatched(files, &e))?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

impl ClientTls {
    /// Reads the client's certificate and key, and the CA the broker's certificate must
    /// chain to.
    ///
    /// # Errors
    ///
    /// As [`ServerTls::load`].
    pub fn load(files: &TlsFiles) -> Result<Self, TransportError> {
        let chain = certs(&files.cert, "the certificate")?;
        let key = key(&files.key)?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots(&files.ca)?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| mismatched(files, &e))?;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

/// The name a client checks the broker's certificate against: the host it dialled.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, TransportError> {
    ServerName::try_from(host.to_owned())
        .map_err(|_| bad(format!("{host:?} is neither a host name nor an IP address")))
}

/// The subject of a verified peer certificate, as its attributes appear in it
/// (`CN=procmond, O=DaemonEye`), or `None` if it does not parse.
pub(crate) fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

/// The subject of the first certificate in a PEM file: what a policy's `tls_subject` names
/// for a client presenting it.
///
/// # Errors
///
/// [`TransportError::Tls`] if the file holds no certificate that parses.
pub fn subject_of_file(path: &Path) -> Result<String, TransportError> {
    let chain = certs(path, "the certificate")?;
    subject(&chain[0]).ok_or_else(|| {
        bad(format!(
            "the certificate in {} does not parse as X.509",
            path.display()
        ))
    })
}
