//! WebSockets to the daemon, which speaks HTTP/1.1 only.
//!
//! An HTTP/1.1 `Upgrade: websocket` is relayed as it is: the client's key, the daemon's
//! accept. An HTTP/2 extended CONNECT (RFC 8441, `:protocol = websocket`) has no key, so the
//! router makes one, checks the daemon's `Sec-WebSocket-Accept` against it, and answers the
//! client `200`; the stream then carries the WebSocket frames as the upgraded connection
//! would. Either way the upstream side is a fresh connection that is never pooled, and the
//! two sides are joined only after the daemon answered `101`.

use std::net::SocketAddr;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};

use super::{headers, upstream_failed, upstream_timeout, GuardedBody, Upstream};
use crate::body::RouterBody;
use crate::error::ApiError;
use crate::fleet::ActivityGuard;
use crate::server::OpenStream;

/// RFC 6455 §1.3: appended to the key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Whether the request is an HTTP/2 extended CONNECT for a WebSocket (RFC 8441).
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// `Sec-WebSocket-Accept` for `key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

impl Upstream {
    /// Opens the WebSocket towards the daemon at `addr` and joins it to the client's.
    /// `headers` are the daemon's request headers, already cleaned.
    pub(super) async fn websocket(
        &self,
        mut req: Request<Incoming>,
        uri: Uri,
        mut headers: HeaderMap,
        addr: SocketAddr,
        guard: ActivityGuard,
    ) -> Result<Response<RouterBody>, ApiError> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let over_h2 = is_extended_connect(&req);
        // The tunnel keeps the client's HTTP/2 connection from being closed as idle.
        let open_stream = req.extensions_mut().remove::<OpenStream>();
        let key = over_h2.then(|| {
            let key = new_key();
            headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
            headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            key
        });
        let mut upstream_req = Request::get(uri)
            .body(crate::body::full(Bytes::new()))
            .map_err(|e| ApiError::internal(format!("building the upstream request: {e}")))?;
        *upstream_req.headers_mut() = headers;

        let mut response = self.websocket_handshake(upstream_req, addr).await?;
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let Some(key) = &key {
            check_h2_answer(&response, key, addr)?;
        }
        headers::response_headers(response.headers_mut(), switching && !over_h2);
        if !switching {
            // Refused upgrades are relayed as ordinary responses.
            let (parts, body) = response.into_parts();
            return Ok(Response::from_parts(
                parts,
                GuardedBody { inner: body, _guard: guard }.boxed(),
            ));
        }

        let upstream_upgrade = hyper::upgrade::on(&mut response);
        self.drain.spawn(async move {
            let _guard = guard;
            let _open_stream = open_stream;
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "websocket closed with an error");
            }
        });

        let (mut parts, _) = response.into_parts();
        if over_h2 {
            // RFC 8441 §5: the stream is open once the server answers 2xx; the accept key
            // belongs to the HTTP/1.1 handshake the router made, not to this one.
            parts.status = StatusCode::OK;
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
        Ok(Response::from_parts(parts, crate::body::full(Bytes::new())))
    }

    /// Sends the upgrade request over a fresh connection and returns the daemon's answer.
    async fn websocket_handshake(
        &self,
        upstream_req: Request<RouterBody>,
        addr: SocketAddr,
    ) -> Result<Response<Incoming>, ApiError> {
        let connect = tokio::net::TcpStream::connect(addr);
        let stream = tokio::time::timeout(self.limits.upstream_connect_timeout, connect)
            .await
            .map_err(|_| upstream_timeout(addr))?
            .map_err(|e| upstream_failed(addr, &e))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| upstream_failed(addr, &e))?;
        tokio::spawn(conn.with_upgrades());

        let send = sender.send_request(upstream_req);
        tokio::time::timeout(self.limits.upstream_headers_timeout, send)
            .await
            .map_err(|_| upstream_timeout(addr))?
            .map_err(|e| upstream_failed(addr, &e))
    }
}

/// 16 random bytes, base64 (RFC 6455 §4.1).
fn new_key() -> HeaderValue {
    let bytes: [u8; 16] = rand::random();
    let key = base64::engine::general_purpose::STANDARD.encode(bytes);
    HeaderValue::from_str(&key).expect("base64 is a valid header value")
}

/// For an HTTP/2 client the router is the WebSocket client towards the daemon, so it checks
/// what a browser would: a `101` must accept the router's key. Any other success would open
/// the client's tunnel on a connection that never switched protocols.
fn check_h2_answer(
    response: &Response<Incoming>,
    key: &HeaderValue,
    addr: SocketAddr,
) -> Result<(), ApiError> {
    let status = response.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let expected = accept_key(key.as_bytes());
        let accepted = response.headers().get(header::SEC_WEBSOCKET_ACCEPT);
        if accepted.is_some_and(|a| a.as_bytes() == expected.as_bytes()) {
            return Ok(());
        }
        return Err(upstream_failed(addr, &"the WebSocket accept key does not match"));
    }
    if status.is_success() {
        // The daemon answered, just not with a WebSocket: say that, not that it failed.
        return Err(ApiError::upstream(
            StatusCode::BAD_GATEWAY,
            "websocket_not_accepted",
            "this route does not accept WebSockets",
        )
        .with_detail(format!("the daemon at {addr} answered {status} to a WebSocket upgrade")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455() {
        // The example of RFC 6455 §1.3.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
