//! Streaming through the router: SSE, WebSocket, HTTP/2, and request framing checks.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::support::{Options, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_event_arrives_while_the_stream_is_open() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let response = env.get("/events", &env.token(user)).send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");

    // The upstream never ends this stream: the event can only be read if it was forwarded
    // as soon as it was written, not buffered until the end.
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("an event").expect("event bytes");
    assert_eq!(&first[..], b"event: say\ndata: hello\n\n");
    let metrics = env.router.metrics.render();
    assert!(metrics.contains("matrix_router_active_streams 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_through_the_router() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let tls = tls_connect(&env, &[b"http/1.1"]).await;

    let mut request =
        format!("wss://{}/ws", env.router.addr).into_client_request().expect("request");
    let bearer = format!("Bearer {}", env.token(user)).parse().expect("header");
    request.headers_mut().insert("authorization", bearer);
    let (mut socket, response) =
        tokio_tungstenite::client_async(request, tls).await.expect("WebSocket handshake");
    assert_eq!(response.status(), 101);

    for text in ["hello", "second message"] {
        socket.send(Message::text(text)).await.expect("send");
        let echoed = socket.next().await.expect("a reply").expect("reply");
        assert_eq!(echoed, Message::text(text));
    }
    socket.send(Message::binary(vec![0u8, 1, 2, 255])).await.expect("send binary");
    let echoed = socket.next().await.expect("a reply").expect("reply");
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));
    socket.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_host_checks() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();

    // HTTP/2 by ALPN.
    let h2 = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2.get(format!("{}/echo", env.base)).bearer_auth(env.token(user)).send().await;
    let response = response.expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);

    // A body declared larger than the limit is refused before it is read or forwarded.
    let big = vec![b'x'; 11 << 20];
    let response = env.http.post(format!("{}/echo", env.base)).bearer_auth(env.token(user));
    let response = response.body(big).send().await.expect("large request");
    assert_eq!(response.status(), 413);

    // Two Host headers, or none, are refused before authentication.
    for head in [
        "GET /echo HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "GET /echo HTTP/1.0\r\n\r\n",
    ] {
        let mut tls = tls_connect(&env, &[b"http/1.1"]).await;
        tls.write_all(head.as_bytes()).await.expect("write");
        let mut answer = vec![0u8; 12];
        tls.read_exact(&mut answer).await.expect("status line");
        assert_eq!(&answer[9..12], b"400", "{head:?}: {}", String::from_utf8_lossy(&answer));
    }
}

/// A TLS connection to the router that trusts its self-signed certificate.
pub async fn tls_connect(
    env: &TestEnv,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(env.router.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// Accepts any certificate: the tests talk to their own router on loopback.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_are_refused_without_reaching_the_daemon() {
    let Some(env) = TestEnv::start(Options::default()).await else { return };
    let user = Uuid::new_v4();
    let machine = {
        env.echo(user).await;
        env.machine_of(user).await
    };
    let served_before = env.served(&machine).await;

    let auth = format!("Authorization: Bearer {}\r\n\r\n", env.token(user));
    for head in [
        format!("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n{auth}"),
        format!("TRACE /echo HTTP/1.1\r\nHost: localhost\r\n{auth}"),
    ] {
        let mut tls = tls_connect(&env, &[b"http/1.1"]).await;
        tls.write_all(head.as_bytes()).await.expect("write");
        let mut answer = vec![0u8; 12];
        tls.read_exact(&mut answer).await.expect("status line");
        let method = head.split(' ').next().unwrap_or_default();
        assert_eq!(&answer[9..12], b"405", "{method}: {}", String::from_utf8_lossy(&answer));
    }
    assert_eq!(env.served(&machine).await, served_before, "the daemon saw neither request");
}
