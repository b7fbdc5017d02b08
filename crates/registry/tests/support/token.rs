//! A token endpoint for the registry's Bearer flow: checks basic credentials, answers
//! `GET /token?service=&scope=` with a JWT (ES256, certificate in `x5c`) that grants what
//! was asked, and counts how many tokens it issued.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub const SERVICE: &str = "test-registry";
pub const ISSUER: &str = "test-token-issuer";

pub struct TokenServer {
    pub realm: String,
    pub cert: PathBuf,
    issued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Signer {
    key: EncodingKey,
    cert_der_b64: String,
    user: String,
    password: String,
    lifetime_s: u64,
}

impl TokenServer {
    /// Starts on a loopback port; the certificate is written to `dir`.
    pub async fn start(dir: &Path, user: &str, password: &str) -> Self {
        let key_pair = rcgen::KeyPair::generate().expect("key pair");
        let params =
            rcgen::CertificateParams::new(vec!["token-issuer".to_owned()]).expect("params");
        let cert = params.self_signed(&key_pair).expect("self-signed cert");
        let cert_path = dir.join("token-cert.pem");
        std::fs::write(&cert_path, cert.pem()).expect("write cert");

        let signer = Arc::new(Signer {
            key: EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes()).expect("ec key"),
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            user: user.to_owned(),
            password: password.to_owned(),
            lifetime_s: 300,
        });
        let issued = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let realm = format!("http://{}/token", listener.local_addr().expect("addr"));

        let counter = issued.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let signer = signer.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let answer = answer(&signer, &counter, &req);
                        async move { Ok::<_, Infallible>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { realm, cert: cert_path, issued, task }
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    signer: &Signer,
    issued: &AtomicUsize,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", signer.user, signer.password))
    );
    let authorized =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()) == Some(&expected);
    if !authorized {
        return reply(StatusCode::UNAUTHORIZED, "{\"details\":\"bad credentials\"}".into());
    }

    let query = req.uri().query().unwrap_or("");
    let pairs: Vec<(String, String)> = url_pairs(query);
    let service =
        pairs.iter().find(|(k, _)| k == "service").map(|(_, v)| v.clone()).unwrap_or_default();
    let access: Vec<serde_json::Value> = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let actions: Vec<&str> = actions.split(',').collect();
            Some(serde_json::json!({ "type": kind, "name": name, "actions": actions }))
        })
        .collect();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": signer.user, "aud": service,
        "exp": now + signer.lifetime_s, "nbf": now - 10, "iat": now,
        "jti": format!("{}-{}", now, issued.load(Ordering::SeqCst)),
        "access": access,
    });
    let mut header = Header::new(Algorithm::ES256);
    header.x5c = Some(vec![signer.cert_der_b64.clone()]);
    let token = jsonwebtoken::encode(&header, &claims, &signer.key).expect("sign token");
    issued.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({ "token": token, "expires_in": signer.lifetime_s });
    reply(StatusCode::OK, body.to_string())
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    response
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(&format!("http://token.invalid/?{query}")).expect("query");
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}
