//! The router's database connection over TLS: `sslmode=require` connects only to a server
//! whose certificate it trusts (the Mozilla roots, plus `PGSSLROOTCERT`).

use std::time::Duration;

use harness::postgres::PgCluster;
use matrix_router::store::Store;

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_connects_only_to_a_trusted_tls_server() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(tls) = PgCluster::start_tls().expect("PostgreSQL with TLS") else { return };
    let cert = tls.tls_cert().expect("the server's certificate").to_owned();
    let required = format!("{}?sslmode=require", tls.url());

    let trusted = Store::new(&required, TIMEOUT, Some(&cert)).expect("store");
    trusted.ping().await.expect("TLS to a server whose certificate is trusted");

    // Only a TLS handshake can fail on the certificate: the connection above used TLS.
    let untrusted = Store::new(&required, TIMEOUT, None).expect("store");
    let refused = untrusted.ping().await.expect_err("a self-signed certificate not trusted");
    let text = matrix_router::fleet::error_chain(&refused);
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // Without `sslmode`, the connection stays plain as before.
    let plain = Store::new(&tls.url(), TIMEOUT, None).expect("store");
    plain.ping().await.expect("a plain connection by default");

    let Some(no_tls) = PgCluster::start().expect("PostgreSQL") else { return };
    let required = format!("{}?sslmode=require", no_tls.url());
    let store = Store::new(&required, TIMEOUT, Some(&cert)).expect("store");
    assert!(store.ping().await.is_err(), "sslmode=require refuses a server without TLS");

    let bad = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(bad.path(), "not a certificate").expect("write");
    assert!(Store::new(&required, TIMEOUT, Some(bad.path())).is_err(), "a bad PGSSLROOTCERT");
}
