//! Push an image of the daemon image's size class to a loopback `docker-registry`, side by
//! side with `skopeo copy` of the same OCI layout, cold and with only the top layer changed.
//!
//! Run with `cargo bench -p registry --bench push`. Each tool gets its own fresh registry so
//! that neither benefits from blobs the other uploaded. Bounded: one run of each case.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use registry::{Client, ClientConfig, Reference};
use support::images::{build_layout, BuiltImage, LayerSpec};
use support::server::{Auth, RegistryServer};

const MIB: usize = 1024 * 1024;

/// Layer sizes (bytes of incompressible content), bottom first: a few big runtime layers,
/// several mid-sized package layers, many small ones, and the top layer the deploy changes.
fn layers(top_seed: u64) -> Vec<LayerSpec> {
    let mut specs = vec![
        LayerSpec::noise("runtime.bin", 120 * MIB, 1),
        LayerSpec::noise("node.bin", 80 * MIB, 2),
        LayerSpec::noise("python.bin", 50 * MIB, 3),
    ];
    specs.extend((0..5).map(|i| LayerSpec::noise(&format!("pkg{i}.bin"), 8 * MIB, 10 + i)));
    specs.extend((0..10).map(|i| LayerSpec::noise(&format!("small{i}.bin"), MIB, 20 + i)));
    specs.push(LayerSpec::noise("matrixd", 12 * MIB, top_seed));
    specs
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(skopeo) =
        harness::tools::require("skopeo", "install it with `apt-get install skopeo`")
    else {
        return;
    };
    let work = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let first = build_layout(&work.path().join("first"), "v1", &layers(100));
    let second = build_layout(&work.path().join("second"), "v1", &layers(101));
    let size: u64 = first.layers.iter().map(|(_, s)| s).sum();
    eprintln!("built two layouts of {} MiB in {:.1?}", size / MIB as u64, started.elapsed());

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let Some(ours_registry) = RegistryServer::start(Auth::Anonymous) else { return };
    let Some(skopeo_registry) = RegistryServer::start(Auth::Anonymous) else { return };

    let ours_cold = runtime.block_on(push(&ours_registry, &first));
    let skopeo_cold = skopeo_copy(&skopeo, &skopeo_registry, &first);
    let ours_top = runtime.block_on(push(&ours_registry, &second));
    let skopeo_top = skopeo_copy(&skopeo, &skopeo_registry, &second);

    println!("image: {} layers, {} MiB compressed", first.layers.len(), size / MIB as u64);
    println!("| case | registry crate | skopeo copy |");
    println!("| --- | --- | --- |");
    println!("| cold | {:.2} s | {:.2} s |", ours_cold.as_secs_f64(), skopeo_cold.as_secs_f64());
    println!(
        "| top layer changed | {:.2} s | {:.2} s |",
        ours_top.as_secs_f64(),
        skopeo_top.as_secs_f64()
    );
}

async fn push(server: &RegistryServer, image: &BuiltImage) -> Duration {
    let target = Reference::parse(&format!("{}/bench/daemon:v1", server.host())).expect("ref");
    let client = Client::new(&target, ClientConfig::default()).expect("client");
    let started = Instant::now();
    client.push_layout(&image.dir, None, &target).await.expect("push");
    let elapsed = started.elapsed();
    eprintln!("registry crate: {:?} in {elapsed:.2?}", client.stats());
    elapsed
}

fn skopeo_copy(skopeo: &Path, server: &RegistryServer, image: &BuiltImage) -> Duration {
    let policy = image.dir.with_extension("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).expect("policy");
    let started = Instant::now();
    let output = Command::new(skopeo)
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", image.dir.display()))
        .arg(format!("docker://{}/bench/daemon:v1", server.host()))
        .output()
        .expect("run skopeo");
    let elapsed = started.elapsed();
    assert!(output.status.success(), "skopeo: {}", String::from_utf8_lossy(&output.stderr));
    eprintln!("skopeo copy in {elapsed:.2?}");
    elapsed
}
