//! A loopback TCP proxy in front of the registry that drops the connection carrying the
//! first blob upload once `cut_after` bytes of it went through.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CuttingProxy {
    pub port: u16,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start(upstream_port: u16, cut_after: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let counter = cuts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, armed.clone(), counter.clone(), cut_after));
            }
        });
        Self { port, cuts, task }
    }

    /// Connections cut so far (0 or 1).
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
    cut_after: usize,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let downstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });

    let mut buffer = vec![0u8; 64 * 1024];
    let mut upload_bytes: Option<usize> = None;
    while let Ok(n) = client_read.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let data = &buffer[..n];
        if upload_bytes.is_none() && is_upload_start(data) {
            upload_bytes = Some(0);
        }
        if let Some(seen) = upload_bytes.as_mut() {
            *seen += n;
            if *seen > cut_after && armed.swap(false, Ordering::SeqCst) {
                // Drop both directions mid-body, like a registry or load balancer dying.
                cuts.fetch_add(1, Ordering::SeqCst);
                downstream.abort();
                return;
            }
        }
        if server_write.write_all(data).await.is_err() {
            break;
        }
    }
    let _ = downstream.await;
}

fn is_upload_start(data: &[u8]) -> bool {
    let starts = |prefix: &[u8]| data.windows(prefix.len()).any(|w| w == prefix);
    starts(b"PATCH /v2/") || (starts(b"PUT /v2/") && starts(b"/blobs/uploads/"))
}
