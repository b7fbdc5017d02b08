//! Snapshot throughput against raw object transfers, on the same S3 server in the same run,
//! and `matrixd init` on an already-initialised volume.
//!
//! `cargo bench -p matrixd --bench snapshot [-- --mb 200 --rounds 3]`
//!
//! The workspace is half incompressible bytes and half text-like bytes. "Raw" is one
//! object holding the workspace's bytes, put with the same client (`put_object_stream`) and
//! read back to a file: the floor a snapshot's transfer cannot beat.

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on an unexpected error")]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::s3::S3Server;
use matrixd::config::Config;
use matrixd::layout::DataDir;
use matrixd::restore;
use matrixd::snapshot;
use matrixd::store::SnapshotStore;

const BUCKET: &str = "bench";
const USER: &str = "5a0e3c1d-7b2f-4e8a-9c6d-1f2e3d4c5b6a";
const FILE_MB: usize = 4;

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (megabytes, rounds) = (arg("--mb", 200), arg("--rounds", 3));

    let Some(server) = S3Server::start().unwrap() else { return };
    server.create_bucket(BUCKET).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(&server, megabytes, rounds));
}

async fn run(server: &S3Server, megabytes: usize, rounds: usize) {
    let scratch = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> =
        server.env(BUCKET).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    env.push(("MATRIX_USER_ID".into(), USER.into()));
    env.push(("MATRIX_SNAPSHOT_KEEP".into(), "2".into()));
    let config_for = |dir: &Path| {
        let mut vars = env.clone();
        vars.push(("MATRIX_DATA_DIR".into(), dir.display().to_string()));
        Config::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .unwrap()
    };

    // The volume and the same bytes as one file.
    let source = scratch.path().join("source");
    let config = config_for(&source);
    matrixd::init::init(&config).await.unwrap();
    let raw_file = scratch.path().join("raw.bin");
    write_workspace(&source.join("workspace"), &raw_file, megabytes);
    let size = std::fs::metadata(&raw_file).unwrap().len();
    let store = SnapshotStore::new(config.s3.as_ref().unwrap(), config.user_id).unwrap();
    let bucket = server.bucket(BUCKET).unwrap();
    let data = DataDir::new(&source);

    println!("server: {:?}, workspace: {} MiB, rounds: {rounds}", server.kind(), size >> 20);
    let (mut push, mut restore_times, mut put, mut get) = (vec![], vec![], vec![], vec![]);
    let (mut download, mut unpack) = (vec![], vec![]);
    for round in 0..rounds {
        // A change, so every push uploads.
        std::fs::write(source.join("workspace/round.txt"), round.to_string()).unwrap();
        let started = Instant::now();
        snapshot::push(&data, &store, config.snapshot_keep).await.unwrap();
        push.push(started.elapsed());

        let target = scratch.path().join(format!("restore-{round}"));
        let latest = store.latest().await.unwrap().unwrap();
        let started = Instant::now();
        restore::restore(&DataDir::new(&target), &store, &latest).await.unwrap();
        restore_times.push(started.elapsed());
        std::fs::remove_dir_all(&target).unwrap();

        // Restore's parts alone: the download with its sha256 check, then unpacking the
        // archive from a local file (decompress, tree digest, write, sync).
        let archive = scratch.path().join("archive.tar.zst");
        let started = Instant::now();
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let collect = tokio::spawn(async move {
            let mut bytes = Vec::new();
            while let Some(chunk) = receiver.recv().await {
                bytes.extend_from_slice(&chunk);
            }
            bytes
        });
        store.download(&latest, sender).await.unwrap();
        download.push(started.elapsed());
        std::fs::write(&archive, collect.await.unwrap()).unwrap();
        let unpacked = scratch.path().join("unpacked");
        let started = Instant::now();
        tokio::task::block_in_place(|| matrixd::archive::unpack(&archive, &unpacked)).unwrap();
        unpack.push(started.elapsed());
        std::fs::remove_dir_all(&unpacked).unwrap();

        let started = Instant::now();
        let mut file = tokio::fs::File::open(&raw_file).await.unwrap();
        bucket.put_object_stream(&mut file, "raw/object").await.unwrap();
        put.push(started.elapsed());

        let started = Instant::now();
        let mut out = tokio::fs::File::create(scratch.path().join("raw.out")).await.unwrap();
        bucket.get_object_to_writer("raw/object", &mut out).await.unwrap();
        tokio::io::AsyncWriteExt::flush(&mut out).await.unwrap();
        out.sync_all().await.unwrap();
        get.push(started.elapsed());
    }

    let mib = size as f64 / (1 << 20) as f64;
    let rate = |times: &[Duration]| mib / median(times).as_secs_f64();
    println!("{:<28}{:>12}{:>14}", "operation", "median", "MiB/s");
    for (name, times) in [
        ("snapshot push", &push),
        ("raw PUT (same bytes)", &put),
        ("snapshot restore", &restore_times),
        ("raw GET (same bytes)", &get),
        ("  restore: download alone", &download),
        ("  restore: unpack alone", &unpack),
    ] {
        println!("{name:<28}{:>10.2} s{:>14.1}", median(times).as_secs_f64(), rate(times));
    }
    println!("push / raw PUT:    {:.2}", rate(&push) / rate(&put));
    println!("restore / raw GET: {:.2}", rate(&restore_times) / rate(&get));

    // `matrixd init` as the entrypoint runs it: a whole process, on an initialised volume.
    for (label, with_s3) in [("init, no S3", false), ("init, S3 configured", true)] {
        let mut times = Vec::new();
        for _ in 0..10 {
            let mut command = Command::new(env!("CARGO_BIN_EXE_matrixd"));
            command.arg("init").env_clear().env("MATRIX_DATA_DIR", &source);
            command.env("MATRIX_USER_ID", USER).env("RUST_LOG", "error");
            if with_s3 {
                command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            }
            let started = Instant::now();
            let output = command.output().unwrap();
            times.push(started.elapsed());
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        }
        println!(
            "matrixd {label:<24}{:>8.1} ms (median of 10)",
            median(&times).as_secs_f64() * 1e3
        );
    }
}

/// Files of `FILE_MB` MiB, alternately pseudo-random and text-like, also appended to `raw`.
fn write_workspace(dir: &Path, raw: &Path, megabytes: usize) {
    let mut raw = std::io::BufWriter::new(std::fs::File::create(raw).unwrap());
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for index in 0..megabytes.div_ceil(FILE_MB) {
        let mut bytes = Vec::with_capacity(FILE_MB << 20);
        if index % 2 == 0 {
            while bytes.len() < FILE_MB << 20 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.extend_from_slice(&state.to_le_bytes());
            }
        } else {
            let mut line = 0u64;
            while bytes.len() < FILE_MB << 20 {
                line += 1;
                bytes.extend_from_slice(
                    format!("{index}:{line} the agent wrote a note\n").as_bytes(),
                );
            }
        }
        bytes.truncate(FILE_MB << 20);
        let sub = dir.join(format!("dir-{}", index % 8));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("file-{index}.bin")), &bytes).unwrap();
        raw.write_all(&bytes).unwrap();
    }
    raw.flush().unwrap();
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
