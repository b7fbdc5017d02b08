//! TLS on the toolkit's PostgreSQL connections (the rollout's and the router's).
//!
//! The URL's `sslmode` decides, as with libpq: `disable` and `prefer` (the default) connect
//! without TLS, as a database on a private network expects; `require` connects only over
//! TLS, and then always checks the server's certificate and name, as libpq's
//! `verify-full` does: against the Mozilla root set, plus the PEM certificates in
//! `PGSSLROOTCERT` when it is set (a provider's own CA, or a self-signed server).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The variable naming extra trusted certificates, as libpq reads it.
pub const PGSSLROOTCERT: &str = "PGSSLROOTCERT";

#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("reading the certificates in {path} ({PGSSLROOTCERT})")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} ({PGSSLROOTCERT}) holds no usable PEM certificate")]
    NoCertificate { path: PathBuf },
}

/// The TLS connector for a connection with `config`, or `None` when its `sslmode` asks
/// for none.
pub fn connector(
    config: &tokio_postgres::Config,
    root_cert: Option<&Path>,
) -> Result<Option<MakeRustlsConnect>, PgTlsError> {
    if config.get_ssl_mode() != SslMode::Require {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = root_cert {
        add_pem_file(&mut roots, path)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(tls)))
}

fn add_pem_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), PgTlsError> {
    let read = |source| PgTlsError::Read { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        if roots.add(cert.map_err(read)?).is_ok() {
            added += 1;
        }
    }
    if added == 0 {
        return Err(PgTlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(())
}
