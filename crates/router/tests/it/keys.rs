//! Signing keys and token minting for the tests, and a JWKS endpoint on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use uuid::Uuid;

pub const HS256_SECRET: &str = "test-legacy-jwt-secret-with-at-least-32-characters";
pub const ES_KID: &str = "es-test";
pub const RSA_KID: &str = "rsa-test";

const RSA_PRIVATE_PEM: &str = include_str!("../fixtures/rsa_private.pem");
const RSA_PUBLIC_PEM: &str = include_str!("../fixtures/rsa_public.pem");
const RSA_PUBLIC_JWK: &str = include_str!("../fixtures/rsa_public.jwk.json");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The keys a test signs with, and the issuer the router expects.
pub struct Keys {
    pub issuer: String,
    es_private_der: Vec<u8>,
    pub jwks: serde_json::Value,
}

impl Keys {
    pub fn new(issuer: &str) -> Self {
        let es = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        // Uncompressed SEC1 point: 0x04 || x || y.
        let point = es.public_key_raw();
        let es_jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": ES_KID,
            "key_ops": ["verify"],
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        let rsa_jwk: serde_json::Value = serde_json::from_str(RSA_PUBLIC_JWK).expect("RSA JWK");
        Self {
            issuer: issuer.to_owned(),
            es_private_der: es.serialize_der(),
            jwks: serde_json::json!({ "keys": [es_jwk, rsa_jwk] }),
        }
    }

    /// Claims Supabase puts in a signed-in user's access token.
    pub fn claims(&self, user: Uuid) -> serde_json::Value {
        let now = chrono::Utc::now().timestamp();
        serde_json::json!({
            "iss": self.issuer,
            "aud": "authenticated",
            "sub": user.to_string(),
            "role": "authenticated",
            "exp": now + 3600,
            "iat": now,
            "aal": "aal1",
            "session_id": Uuid::new_v4().to_string(),
            "email": "user@example.com",
            "is_anonymous": false,
        })
    }

    pub fn hs256(&self, claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_secret(HS256_SECRET.as_bytes());
        encode(&Header::new(Algorithm::HS256), claims, &key).expect("HS256 token")
    }

    pub fn es256(&self, claims: &serde_json::Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let key = EncodingKey::from_ec_der(&self.es_private_der);
        encode(&header, claims, &key).expect("ES256 token")
    }

    pub fn rs256(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(RSA_KID.to_owned());
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("RSA key");
        encode(&header, claims, &key).expect("RS256 token")
    }

    /// The algorithm-confusion attack: HS256 keyed with the published RSA public key.
    pub fn hs256_with_rsa_public_key(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(RSA_KID.to_owned());
        let key = EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes());
        encode(&header, claims, &key).expect("HS256 token")
    }

    /// An unsigned token (`alg: none`).
    pub fn unsigned(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "none", "typ": "JWT"});
        format!("{}.{}.", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
    }
}

/// Serves a JWKS document on loopback and counts the fetches.
pub struct JwksServer {
    pub url: String,
    pub fetches: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(jwks: serde_json::Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind JWKS");
        let addr: SocketAddr = listener.local_addr().expect("JWKS addr");
        let fetches = Arc::new(AtomicU64::new(0));
        let body = Bytes::from(jwks.to_string());
        let counter = fetches.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let body = body.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let response = http::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body.clone()))
                            .expect("response");
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { url: format!("http://{addr}/auth/v1/.well-known/jwks.json"), fetches, _task: task }
    }
}
