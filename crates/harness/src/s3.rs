//! An S3-compatible server on a loopback port: MinIO when `minio` is on `PATH`, otherwise
//! `moto_server` (PyPI `moto[server]`).
//!
//! Conditional writes, checked against both servers: `moto_server` 5.2 answers a PutObject
//! with `If-None-Match: *` on an existing key with 412, with a wrong `If-Match` with 412, and
//! with `If-Match` on a missing key with 404 (as AWS does). MinIO honours both headers since
//! 2023. The daemon's snapshots rely only on the create-only form (`If-None-Match: *`).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use s3::creds::Credentials;
use s3::{Bucket, BucketConfiguration, Region};

use crate::process::{free_port, wait_for_port, ChildGuard};
use crate::tools;

/// How to install the fallback server, for messages.
pub const INSTALL_HINT: &str =
    "install it with `pip install 'moto[server]'` (or put `minio` on PATH)";

/// Test credentials; the server is reachable only on loopback.
const ACCESS_KEY: &str = "matrix-test-access";
const SECRET_KEY: &str = "matrix-test-secret-key";
const REGION: &str = "eu-west-1";

/// Which program serves the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Kind {
    Minio,
    Moto,
}

/// A running S3-compatible server; stopped when dropped.
#[derive(Debug)]
pub struct S3Server {
    kind: S3Kind,
    addr: SocketAddr,
    _server: ChildGuard,
    _temp: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on a free loopback port.
    ///
    /// `Ok(None)` means neither MinIO nor `moto_server` is installed and the caller should
    /// skip (said loudly; a panic under CI, see [`tools::require`]).
    pub fn start() -> anyhow::Result<Option<Self>> {
        let temp = tempfile::Builder::new().prefix("matrix-s3-").tempdir()?;
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));

        let (kind, mut command) = if let Some(minio) = tools::find("minio") {
            let mut command = Command::new(minio);
            command
                .arg("server")
                .arg(temp.path())
                .args(["--address", &addr.to_string()])
                .args(["--console-address", &format!("127.0.0.1:{}", free_port())])
                .env("MINIO_ROOT_USER", ACCESS_KEY)
                .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
                .env("MINIO_SITE_REGION", REGION)
                .env("MINIO_BROWSER", "off");
            (S3Kind::Minio, command)
        } else {
            let Some(moto) = tools::require("moto_server", INSTALL_HINT) else { return Ok(None) };
            let mut command = Command::new(moto);
            command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            (S3Kind::Moto, command)
        };
        command.stdout(Stdio::null()).stderr(Stdio::null());

        let mut server = ChildGuard::spawn(&format!("{kind:?}"), &mut command)?;
        wait_for_port(addr, Duration::from_secs(30))
            .and_then(|()| server.check_running())
            .with_context(|| format!("{kind:?} did not start on {addr}"))?;
        Ok(Some(Self { kind, addr, _server: server, _temp: temp }))
    }

    /// Which program is serving.
    pub fn kind(&self) -> S3Kind {
        self.kind
    }

    /// The endpoint URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The region to sign requests for.
    pub fn region(&self) -> &'static str {
        REGION
    }

    /// The access key id.
    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    /// The secret access key.
    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// The `S3_*` variables a daemon needs to use `bucket` on this server.
    pub fn env(&self, bucket: &str) -> Vec<(&'static str, String)> {
        vec![
            ("S3_ENDPOINT", self.endpoint()),
            ("S3_BUCKET", bucket.to_owned()),
            ("S3_REGION", REGION.to_owned()),
            ("S3_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("S3_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
        ]
    }

    /// A path-style handle on `name`, for tests that inspect or upload objects directly.
    pub fn bucket(&self, name: &str) -> anyhow::Result<Box<Bucket>> {
        let bucket = Bucket::new(name, self.s3_region(), self.credentials()?)
            .with_context(|| format!("bucket handle {name}"))?;
        Ok(bucket.with_path_style())
    }

    /// Creates bucket `name`. Callable from async code too: the request runs on a thread
    /// of its own.
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let region = self.s3_region();
        let credentials = self.credentials()?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime =
                        tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    runtime.block_on(async {
                        Bucket::create_with_path_style(
                            name,
                            region,
                            credentials,
                            BucketConfiguration::default(),
                        )
                        .await
                        .with_context(|| format!("creating bucket {name}"))
                    })?;
                    anyhow::Ok(())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("creating bucket {name}: thread panicked"))?
        })
    }

    fn s3_region(&self) -> Region {
        Region::Custom { region: REGION.to_owned(), endpoint: self.endpoint() }
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        Credentials::new(Some(ACCESS_KEY), Some(SECRET_KEY), None, None, None)
            .context("S3 credentials")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn put_status(bucket: &Bucket, key: &str, body: &[u8], condition: (&'static str, &str)) -> u16 {
        let mut headers = HeaderMap::new();
        headers.insert(condition.0, HeaderValue::from_str(condition.1).expect("header value"));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = runtime.block_on(bucket.put_object_with_content_type_and_headers(
            key,
            body,
            "application/octet-stream",
            Some(headers),
        ));
        match result {
            Ok(response) => response.status_code(),
            Err(s3::error::S3Error::HttpFailWithBody(status, _)) => status,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    /// The snapshot generation check depends on create-only writes being refused.
    #[test]
    fn server_honours_create_only_and_compare_and_swap_puts() {
        let Some(server) = S3Server::start().unwrap() else { return };
        server.create_bucket("conditional").unwrap();
        let bucket = server.bucket("conditional").unwrap();

        assert_eq!(put_status(&bucket, "k", b"one", ("if-none-match", "*")), 200);
        assert_eq!(put_status(&bucket, "k", b"two", ("if-none-match", "*")), 412);
        assert_eq!(put_status(&bucket, "k", b"two", ("if-match", "\"not-the-etag\"")), 412);
        let one_md5 = "\"f97c5d29941bfb1b2fdab0874906ab82\"";
        assert_eq!(put_status(&bucket, "k", b"two", ("if-match", one_md5)), 200);
    }
}
