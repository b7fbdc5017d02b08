//! A loopback HTTP proxy in front of the registry that answers like some registries do:
//! `Location` headers turned into relative paths, and a 503 for the first upload start
//! and the first manifest put (which a client must retry).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

pub struct RewritingProxy {
    pub port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    upstream: String,
    failed_starts: AtomicUsize,
    failed_manifests: AtomicUsize,
    relative_locations: AtomicUsize,
}

impl RewritingProxy {
    pub async fn start(upstream_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State {
            upstream: format!("http://127.0.0.1:{upstream_port}"),
            failed_starts: AtomicUsize::new(0),
            failed_manifests: AtomicUsize::new(0),
            relative_locations: AtomicUsize::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (state, http) = (shared.clone(), http.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (state, http) = (state.clone(), http.clone());
                        async move { Ok::<_, Infallible>(forward(&state, &http, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { port, state, task }
    }

    /// 503s answered so far (upload starts, manifest puts).
    pub fn injected_failures(&self) -> (usize, usize) {
        (
            self.state.failed_starts.load(Ordering::SeqCst),
            self.state.failed_manifests.load(Ordering::SeqCst),
        )
    }

    /// `Location` headers rewritten to relative paths.
    pub fn relative_locations(&self) -> usize {
        self.state.relative_locations.load(Ordering::SeqCst)
    }
}

impl Drop for RewritingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    state: &State,
    http: &reqwest::Client,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path_and_query =
        req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let is_start = method == hyper::Method::POST && req.uri().path().ends_with("/blobs/uploads/");
    let is_manifest = method == hyper::Method::PUT && req.uri().path().contains("/manifests/");
    if is_start && state.failed_starts.fetch_add(1, Ordering::SeqCst) == 0 {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "try again");
    }
    if is_manifest && state.failed_manifests.fetch_add(1, Ordering::SeqCst) == 0 {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "try again");
    }
    // Keep the counters at one failure each.
    if is_start {
        state.failed_starts.store(1, Ordering::SeqCst);
    }
    if is_manifest {
        state.failed_manifests.store(1, Ordering::SeqCst);
    }

    let headers = req.headers().clone();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut upstream = http.request(method, format!("{}{path_and_query}", state.upstream));
    for (name, value) in headers.iter() {
        if name != hyper::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let Ok(answer) = upstream.body(body).send().await else {
        return plain(StatusCode::BAD_GATEWAY, "upstream failed");
    };

    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if name == reqwest::header::LOCATION {
            // Absolute -> relative: keep the path and query only.
            let location = value.to_str().unwrap_or_default();
            let relative = reqwest::Url::parse(location)
                .map(|u| {
                    format!(
                        "{}{}",
                        u.path(),
                        u.query().map(|q| format!("?{q}")).unwrap_or_default()
                    )
                })
                .unwrap_or_else(|_| location.to_owned());
            state.relative_locations.fetch_add(1, Ordering::SeqCst);
            response = response.header(name.as_str(), relative);
        } else if name != reqwest::header::TRANSFER_ENCODING
            && name != reqwest::header::CONTENT_LENGTH
        {
            response = response.header(name.as_str(), value.as_bytes());
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    response.body(Full::new(bytes)).expect("response")
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
