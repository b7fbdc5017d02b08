//! Pushes to a real `docker-registry` on loopback, pulled back with `skopeo`.

mod support;

use std::path::Path;
use std::process::Command;

use registry::{BlobOutcome, Client, ClientConfig, Credentials, Reference, UploadConfig};
use support::images::{build_layout, BuiltImage, LayerSpec};
use support::proxy::CuttingProxy;
use support::server::{Auth, RegistryServer};
use support::token::{TokenServer, ISSUER, SERVICE};

const MIB: usize = 1024 * 1024;

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Small chunks so that a few MiB exercise the chunked path.
fn small_chunks() -> ClientConfig {
    ClientConfig {
        upload: UploadConfig { monolithic_limit: MIB as u64, chunk_size: MIB as u64 },
        ..ClientConfig::default()
    }
}

/// Three layers: a large one (chunked), a small one, and a top one that `top` varies.
fn image(dir: &Path, top: &str) -> BuiltImage {
    build_layout(
        dir,
        "v1",
        &[
            LayerSpec::noise("base.bin", 3 * MIB + 12_345, 1),
            LayerSpec::noise("middle.bin", 200_000, 2),
            LayerSpec::text("etc/top.txt", top),
        ],
    )
}

fn reference(server_port: u16, repository: &str) -> Reference {
    Reference::parse(&format!("127.0.0.1:{server_port}/{repository}:v1")).expect("reference")
}

/// Pulls `reference` with skopeo into an OCI layout and checks it holds the same bytes.
fn assert_pulls_back_identical(image: &BuiltImage, reference: &str, creds: Option<&str>) {
    let Some(skopeo) =
        harness::tools::require("skopeo", "install it with `apt-get install skopeo`")
    else {
        return;
    };
    let out = tempfile::tempdir().expect("temp dir");
    let policy = out.path().join("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).expect("policy");
    let pulled = out.path().join("pulled");

    let mut command = Command::new(skopeo);
    command.arg("--policy").arg(&policy).args(["copy", "--src-tls-verify=false"]);
    if let Some(creds) = creds {
        command.args(["--src-creds", creds]);
    }
    command.arg(format!("docker://{reference}")).arg(format!("oci:{}:v1", pulled.display()));
    let output = command.output().expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pulled.join("index.json")).expect("index"))
            .expect("json");
    assert_eq!(index["manifests"][0]["digest"], image.manifest_digest.as_str());
    for entry in std::fs::read_dir(image.dir.join("blobs/sha256")).expect("blobs") {
        let entry = entry.expect("entry");
        let original = std::fs::read(entry.path()).expect("original blob");
        let copy = std::fs::read(pulled.join("blobs/sha256").join(entry.file_name()))
            .unwrap_or_else(|e| panic!("pulled layout lacks {:?}: {e}", entry.file_name()));
        assert!(original == copy, "blob {:?} differs after the round trip", entry.file_name());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_anonymously_and_pulls_back_byte_identical() {
    init();
    let Some(server) = RegistryServer::start(Auth::Anonymous) else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let image = image(&work.path().join("image"), "one");
    let target = reference(server.port, "matrix/daemon");

    let client = Client::new(&target, small_chunks()).expect("client");
    let pushed = client.push_layout(&image.dir, None, &target).await.expect("push");

    assert_eq!(pushed.digest, image.manifest_digest);
    assert_eq!(
        pushed.reference.to_string(),
        format!("{}/matrix/daemon@{}", server.host(), image.manifest_digest)
    );
    let stats = client.stats();
    let blob_bytes: u64 = image.layers.iter().map(|(_, size)| size).sum::<u64>()
        + std::fs::metadata(image.dir.join("blobs/sha256").join(&image.config_digest[7..]))
            .expect("config")
            .len();
    assert_eq!(stats.blobs_uploaded, 4);
    assert_eq!(stats.bytes_uploaded, blob_bytes);
    assert_pulls_back_identical(&image, &target.to_string(), None);

    // Pushing again finds every blob in place and sends no blob byte.
    let again = client.push_layout(&image.dir, None, &target).await.expect("second push");
    assert!(again.blobs.iter().all(|(_, outcome)| *outcome == BlobOutcome::Present));
    assert_eq!(client.stats().bytes_uploaded, blob_bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn second_push_uploads_only_the_changed_top_layer() {
    init();
    let Some(server) = RegistryServer::start(Auth::Anonymous) else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let first = image(&work.path().join("first"), "release one");
    let second = image(&work.path().join("second"), "release two");
    let target = reference(server.port, "matrix/daemon");

    let client = Client::new(&target, small_chunks()).expect("client");
    client.push_layout(&first.dir, None, &target).await.expect("first push");
    let before = client.stats();
    let pushed = client.push_layout(&second.dir, None, &target).await.expect("second push");
    let after = client.stats();

    let (top_digest, top_size) = second.layers.last().expect("top layer").clone();
    let config_size =
        std::fs::metadata(second.dir.join("blobs/sha256").join(&second.config_digest[7..]))
            .expect("config")
            .len();
    assert_eq!(after.bytes_uploaded - before.bytes_uploaded, top_size + config_size);
    assert_eq!(after.blobs_skipped - before.blobs_skipped, 2);
    let uploaded: Vec<&str> = pushed
        .blobs
        .iter()
        .filter(|(_, outcome)| *outcome == BlobOutcome::Uploaded)
        .map(|(digest, _)| digest.as_str())
        .collect();
    assert_eq!(uploaded, vec![second.config_digest.as_str(), top_digest.as_str()]);
    assert_pulls_back_identical(&second, &target.to_string(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_pushes_with_credentials_and_names_the_refusal_without() {
    init();
    let auth = Auth::Htpasswd { user: "x".into(), password: "fly-token-123".into() };
    let Some(server) = RegistryServer::start(auth) else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let image = image(&work.path().join("image"), "basic");
    let target = reference(server.port, "matrix/daemon");

    // Without credentials: the error names the blob, the registry and its error code.
    let anonymous = Client::new(&target, small_chunks()).expect("client");
    let error =
        anonymous.push_layout(&image.dir, None, &target).await.expect_err("must be refused");
    let message = error.to_string();
    assert_eq!(error.registry_code(), Some("UNAUTHORIZED"), "{message}");
    assert!(message.contains(&server.host()), "{message}");
    assert!(message.contains("HTTP 401"), "{message}");

    // With them: pushed, and the password never shows in a Debug of the config.
    let config = ClientConfig {
        credentials: Credentials::Basic { user: "x".into(), password: "fly-token-123".into() },
        ..small_chunks()
    };
    assert!(!format!("{config:?}").contains("fly-token-123"));
    let client = Client::new(&target, config).expect("client");
    client.push_layout(&image.dir, None, &target).await.expect("push with credentials");
    assert_pulls_back_identical(&image, &target.to_string(), Some("x:fly-token-123"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_challenge_gets_a_token_and_reuses_it() {
    init();
    let work = tempfile::tempdir().expect("temp dir");
    let tokens = TokenServer::start(work.path(), "x", "fly-token-456").await;
    let auth = Auth::Token {
        realm: tokens.realm.clone(),
        service: SERVICE.into(),
        issuer: ISSUER.into(),
        cert: tokens.cert.clone(),
    };
    let Some(server) = RegistryServer::start(auth) else { return };
    let first = image(&work.path().join("first"), "bearer one");
    let second = image(&work.path().join("second"), "bearer two");
    let target = reference(server.port, "matrix/daemon");

    let config = ClientConfig {
        credentials: Credentials::Basic { user: "x".into(), password: "fly-token-456".into() },
        ..small_chunks()
    };
    let client = Client::new(&target, config).expect("client");
    client.push_layout(&first.dir, None, &target).await.expect("first push");
    client.push_layout(&second.dir, None, &target).await.expect("second push");

    // One token for the bare `/v2/` check, one for the repository: reused for every blob,
    // chunk and manifest of both pushes.
    assert_eq!(tokens.issued(), 2);
    assert_eq!(client.stats().tokens_fetched, 2);

    // Wrong credentials stop at the token endpoint, which the error names.
    let bad = ClientConfig {
        credentials: Credentials::Basic { user: "x".into(), password: "wrong".into() },
        ..small_chunks()
    };
    let error = Client::new(&target, bad)
        .expect("client")
        .push_layout(&first.dir, None, &target)
        .await
        .expect_err("bad password must fail");
    let message = error.to_string();
    assert!(message.contains(&tokens.realm) && message.contains("401"), "{message}");
    assert!(!message.contains("wrong"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mounts_blobs_from_another_repository() {
    init();
    let Some(server) = RegistryServer::start(Auth::Anonymous) else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let image = image(&work.path().join("image"), "mount");
    let source = reference(server.port, "apps/one");
    let target = reference(server.port, "apps/two");

    Client::new(&source, small_chunks())
        .expect("client")
        .push_layout(&image.dir, None, &source)
        .await
        .expect("push to the source repository");

    let config = ClientConfig { mount_from: Some("apps/one".into()), ..small_chunks() };
    let client = Client::new(&target, config).expect("client");
    let pushed = client.push_layout(&image.dir, None, &target).await.expect("push with mounts");
    assert!(pushed.blobs.iter().all(|(_, outcome)| *outcome == BlobOutcome::Mounted), "{pushed:?}");
    assert_eq!(client.stats().bytes_uploaded, 0);

    // A mount source that lacks the blobs falls back to uploading them.
    let fallback = ClientConfig { mount_from: Some("apps/none".into()), ..small_chunks() };
    let third = reference(server.port, "apps/three");
    let client = Client::new(&third, fallback).expect("client");
    let pushed = client.push_layout(&image.dir, None, &third).await.expect("push with fallback");
    assert!(
        pushed.blobs.iter().all(|(_, outcome)| *outcome == BlobOutcome::Uploaded),
        "{pushed:?}"
    );
    assert_pulls_back_identical(&image, &third.to_string(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_dropped_mid_upload_is_retried_to_success() {
    init();
    let Some(server) = RegistryServer::start(Auth::Anonymous) else { return };
    let proxy = CuttingProxy::start(server.port, 512 * 1024).await;
    let work = tempfile::tempdir().expect("temp dir");
    let image = image(&work.path().join("image"), "dropped");
    let through_proxy = reference(proxy.port, "matrix/daemon");

    let config = ClientConfig { concurrency: 1, ..small_chunks() };
    let client = Client::new(&through_proxy, config).expect("client");
    let pushed =
        client.push_layout(&image.dir, None, &through_proxy).await.expect("push despite the cut");

    assert_eq!(proxy.cuts(), 1);
    assert!(client.stats().upload_restarts >= 1, "{:?}", client.stats());
    assert_eq!(pushed.digest, image.manifest_digest);
    assert_pulls_back_identical(&image, &reference(server.port, "matrix/daemon").to_string(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_blob_fails_naming_the_blob_and_the_registry_code() {
    init();
    let Some(server) = RegistryServer::start(Auth::Anonymous) else { return };
    let work = tempfile::tempdir().expect("temp dir");
    let image = image(&work.path().join("image"), "corrupt");
    let (middle, _) = &image.layers[1];
    let path = image.dir.join("blobs/sha256").join(&middle[7..]);
    let mut bytes = std::fs::read(&path).expect("blob");
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).expect("corrupt blob");
    let target = reference(server.port, "matrix/daemon");

    let error = Client::new(&target, small_chunks())
        .expect("client")
        .push_layout(&image.dir, None, &target)
        .await
        .expect_err("a corrupt blob must not be accepted");
    let message = error.to_string();
    assert_eq!(error.registry_code(), Some("DIGEST_INVALID"), "{message}");
    assert!(message.contains(middle.as_str()), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn follows_relative_locations_and_retries_5xx() {
    init();
    let Some(server) = RegistryServer::start(Auth::Anonymous) else { return };
    let proxy = support::rewrite::RewritingProxy::start(server.port).await;
    let work = tempfile::tempdir().expect("temp dir");
    let image = image(&work.path().join("image"), "relative");
    let through_proxy = reference(proxy.port, "matrix/daemon");

    let client = Client::new(&through_proxy, small_chunks()).expect("client");
    let pushed = client.push_layout(&image.dir, None, &through_proxy).await.expect("push");

    assert_eq!(pushed.digest, image.manifest_digest);
    assert_eq!(proxy.injected_failures(), (1, 1));
    assert!(proxy.relative_locations() >= 4, "{}", proxy.relative_locations());
    assert!(client.stats().retries >= 2, "{:?}", client.stats());
    assert_pulls_back_identical(&image, &reference(server.port, "matrix/daemon").to_string(), None);
}
