//! The listener's TLS configuration: certificate files, or a self-signed one in dev mode.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};

use crate::config::{TlsSource, ROUTER_TLS_CERT, ROUTER_TLS_KEY};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{name}: reading {}", path.display())]
    Read { name: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{ROUTER_TLS_CERT}: {} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{ROUTER_TLS_KEY}: {} holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("generating a self-signed certificate")]
    SelfSigned(#[source] rcgen::Error),
    #[error(
        "{ROUTER_TLS_CERT} and {ROUTER_TLS_KEY} do not make a TLS configuration (is the \
        key the certificate's?)"
    )]
    Config(#[source] rustls::Error),
}

impl TlsError {
    /// The variable to blame when the error comes from configured files (exit 64), `None`
    /// when generating a self-signed certificate failed.
    pub fn variable(&self) -> Option<&'static str> {
        match self {
            TlsError::Read { name, .. } => Some(name),
            TlsError::NoCertificate { .. } => Some(ROUTER_TLS_CERT),
            TlsError::NoKey { .. } | TlsError::Config(_) => Some(ROUTER_TLS_KEY),
            TlsError::SelfSigned(_) => None,
        }
    }
}

/// A server configuration with ALPN `h2` and `http/1.1`, and the leaf's SHA-256 fingerprint.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub fingerprint: String,
}

pub fn load(source: &TlsSource) -> Result<Tls, TlsError> {
    let (chain, key) = match source {
        TlsSource::Files { cert, key } => (read_chain(cert)?, read_key(key)?),
        TlsSource::SelfSigned => self_signed()?,
    };
    let fingerprint = fingerprint(&chain[0]);

    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls { config: Arc::new(config), fingerprint })
}

/// Uppercase hex pairs joined by colons, as browsers show it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error =
        |source| TlsError::Read { name: ROUTER_TLS_CERT, path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let chain = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read_error =
        |source| TlsError::Read { name: ROUTER_TLS_KEY, path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(read_error)?
        .ok_or_else(|| TlsError::NoKey { path: path.to_owned() })
}

fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(TlsError::SelfSigned)?;
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
    Ok((vec![certified.cert.der().clone()], key.into()))
}
