//! The public listener: TLS with a handshake deadline, then HTTP/1.1 or HTTP/2 with
//! header-read and stream limits, upgrades enabled for WebSockets.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::config::Limits;
use crate::drain::Drain;
use crate::service::{self, AppState};

/// Accepts connections until the shutdown starts, then closes the listener, asks every
/// connection to finish (idle keep-alive connections close now, a request in flight or an
/// open stream is served to its end) and waits for them.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AppState>,
    limits: Limits,
    drain: Drain,
) {
    let acceptor = TlsAcceptor::from(tls);
    let builder = Arc::new(http_builder(&limits));
    let graceful = GracefulShutdown::new();
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
            graceful.watcher(),
        );
        drain.spawn(task.instrument(span));
    }
    drop(listener);
    tracing::debug!("listener closed; waiting for open connections");
    graceful.shutdown().await;
}

// A stalled request body is cut by the proxy (`body::IdleTimeout`), not here.
// FIXME: no idle timeout on HTTP/2 connections beyond keep-alive pings.
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
    shutdown: Watcher,
) {
    let handshake = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    tracing::debug!("connection open");
    let service = service_fn(move |req| service::handle(state.clone(), req, peer));
    let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    if let Err(e) = shutdown.watch(served).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    tracing::debug!("connection closed");
}
