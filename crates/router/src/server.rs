//! The public listener: TLS with a handshake deadline, then HTTP/1.1 or HTTP/2 with
//! header-read and stream limits, upgrades enabled for WebSockets (HTTP/1.1 `Upgrade` and
//! HTTP/2 extended CONNECT, RFC 8441).
//!
//! A connection with no open stream for the idle timeout is closed, whatever its protocol:
//! HTTP/2 keep-alive pings keep a dead peer from holding it, but a live client that holds a
//! connection without using it would otherwise keep it forever.

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::body::RouterBody;
use crate::config::Limits;
use crate::drain::Drain;
use crate::service::{self, AppState};

/// Accepts connections until the shutdown starts, then closes the listener. Every connection
/// is a drained task that is asked to finish when the shutdown starts (idle keep-alive
/// connections close now, a request in flight or an open stream is served to its end).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AppState>,
    limits: Limits,
    drain: Drain,
) {
    let acceptor = TlsAcceptor::from(tls);
    let builder = Arc::new(http_builder(&limits));
    loop {
        let accepted = tokio::select! {
            () = drain.stopping() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let span = tracing::debug_span!("connection", client.addr = %peer);
        let task = connection(
            tcp,
            peer,
            acceptor.clone(),
            builder.clone(),
            state.clone(),
            limits.clone(),
            drain.clone(),
        );
        drain.spawn(task.instrument(span));
    }
    drop(listener);
    tracing::debug!("listener closed");
}

// A stalled request body is cut by the proxy (`body::IdleTimeout`), and a connection without
// an open stream by `connection`.
fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header timer also bounds how long an idle keep-alive connection stays open;
    // hyper only enforces it with a timer set.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_pending_accept_reset_streams(Some(50))
        .max_header_list_size(16 * 1024)
        // WebSockets over HTTP/2 (RFC 8441).
        .enable_connect_protocol()
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    builder
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    builder: Arc<auto::Builder<TokioExecutor>>,
    state: Arc<AppState>,
    limits: Limits,
    drain: Drain,
) {
    let handshake = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    tracing::debug!("connection open");

    let streams = OpenStreams::default();
    let service = {
        let streams = streams.clone();
        service_fn(move |req| serve_stream(state.clone(), req, peer, streams.open()))
    };
    let mut served = pin!(builder.serve_connection_with_upgrades(TokioIo::new(tls), service));
    let mut idle = pin!(streams.idle_for(limits.header_read_timeout));
    let mut closing = false;
    let result = loop {
        tokio::select! {
            result = served.as_mut() => break result,
            () = drain.stopping(), if !closing => {
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            () = idle.as_mut(), if !closing => {
                tracing::debug!("connection idle: closing");
                closing = true;
                served.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    tracing::debug!("connection closed");
}

/// One request (an HTTP/2 stream, or one exchange on an HTTP/1.1 connection), counted open
/// until its response body ends. An extended CONNECT also carries the count in its
/// extensions, so the tunnel it becomes keeps the connection open too.
async fn serve_stream(
    state: Arc<AppState>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    stream: OpenStream,
) -> Result<Response<CountedBody>, std::convert::Infallible> {
    if req.extensions().get::<hyper::ext::Protocol>().is_some() {
        req.extensions_mut().insert(stream.clone());
    }
    let response = service::handle(state, req, peer).await?;
    Ok(response.map(|inner| CountedBody { inner, _stream: stream }))
}

/// How many streams of one connection are open; every change is seen by the idle timer.
#[derive(Clone, Default)]
struct OpenStreams(Arc<watch::Sender<usize>>);

impl OpenStreams {
    fn open(&self) -> OpenStream {
        self.0.send_modify(|n| *n += 1);
        OpenStream { _count: Arc::new(StreamCount(self.0.clone())) }
    }

    /// Resolves once no stream has been open for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut changes = self.0.subscribe();
        loop {
            let open = *changes.borrow_and_update();
            if open == 0 {
                match tokio::time::timeout(timeout, changes.changed()).await {
                    Err(_) => return,
                    Ok(_) => continue,
                }
            }
            // The sender lives as long as `self`: a closed channel cannot happen here.
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// A stream counted open until the last clone is dropped.
#[derive(Clone)]
pub struct OpenStream {
    _count: Arc<StreamCount>,
}

struct StreamCount(Arc<watch::Sender<usize>>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its stream counted open until it ends or is dropped.
pub struct CountedBody {
    inner: RouterBody,
    _stream: OpenStream,
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
