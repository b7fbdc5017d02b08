//! Assembling a closure of about 1 GiB, against `tar | gzip -n | sha256sum` over the same
//! tree in the same run, with zstd too; then the Nix rebuild time after a change to the top
//! package only, with the base as a named layer group and without.
//!
//! Run: `cargo bench -p image-assembler --bench assemble` (needs Nix as for the tests;
//! about two minutes on 2 cores). Prints a Markdown table for docs/benchmarks.md.

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on an unexpected error")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use image_assembler::blob::{self, Compression};
use image_assembler::tarball::write_store_paths;

fn main() {
    let Some(nix_build) = harness::tools::find("nix-build") else {
        eprintln!("\n!!! SKIPPED: nix-build is not installed (apt-get install nix-bin)\n");
        return;
    };
    let assembler_dir = tempfile::tempdir().unwrap();
    let bin = assembler_dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_matrix-image-assembler"), bin.join("matrix-image-assembler"))
        .unwrap();
    let nix = Nix { nix_build, assembler_dir: assembler_dir.path().to_owned() };

    let base = nix.build("base", &[]);
    let base_str = base.to_str().unwrap().to_owned();
    let bytes = tree_size(&base);
    println!("tree: {base_str}, {:.2} GiB", bytes as f64 / (1u64 << 30) as f64);

    // Warm the page cache so that every contender reads from memory.
    sh(&format!("tar -C / -cf - {} > /dev/null", &base_str[1..]));

    let mut rows = Vec::new();
    let script = format!(
        "tar --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner -C / -cf - {} \
         | gzip -n | sha256sum",
        &base_str[1..]
    );
    rows.push(("`tar | gzip -n | sha256sum`", timed(|| sh(&script)).0, None));
    for compression in [Compression::Gzip, Compression::Zstd] {
        let out = tempfile::tempdir().unwrap();
        let paths = vec![base_str.clone()];
        let (elapsed, layer) = timed(|| {
            blob::write_layer(out.path(), "bench", compression, 1, |tar| {
                write_store_paths(tar, &paths)
            })
            .unwrap()
        });
        let name = match compression {
            Compression::Gzip => "assembler, gzip (level 6)",
            Compression::Zstd => "assembler, zstd (level 3)",
        };
        rows.push((name, elapsed, Some(layer.size)));
    }

    println!("\n| what | time | MiB/s | blob size |\n| --- | --- | --- | --- |");
    for (name, elapsed, size) in rows {
        let rate = bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
        let size =
            size.map_or("-".to_owned(), |s| format!("{:.0} MiB", s as f64 / (1 << 20) as f64));
        println!("| {name} | {:.1} s | {rate:.0} | {size} |", elapsed.as_secs_f64());
    }

    // A fresh revision every run, so nothing comes from an earlier run's store.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let rev = |r: u64| r.to_string();
    let (first, _) = timed(|| nix.build("image", &["--arg", "topRevision", &rev(now)]));
    let (grouped, _) = timed(|| nix.build("image", &["--arg", "topRevision", &rev(now + 1)]));
    let ungrouped_args = ["--arg", "topRevision", &rev(now + 1), "--arg", "grouped", "false"];
    let (ungrouped, _) = timed(|| nix.build("image", &ungrouped_args));

    println!("\n| nix-build of the image | time |\n| --- | --- |");
    println!(
        "| first build (base layer group built if not in the store yet) | {:.1} s |",
        first.as_secs_f64()
    );
    println!(
        "| rebuild after a change to the top package, base as a named group | {:.1} s |",
        grouped.as_secs_f64()
    );
    println!(
        "| the same change, base not in a group (re-tars everything) | {:.1} s |",
        ungrouped.as_secs_f64()
    );
}

struct Nix {
    nix_build: PathBuf,
    assembler_dir: PathBuf,
}

impl Nix {
    fn build(&self, attr: &str, args: &[&str]) -> PathBuf {
        let expression = harness::tools::workspace_root().join("nix/tests/bench.nix");
        let output = Command::new(&self.nix_build)
            .arg(expression)
            .args(["-A", attr, "--no-out-link"])
            .args(["--option", "build-users-group", "", "--option", "substituters", ""])
            .args(["--argstr", "assemblerDir"])
            .arg(&self.assembler_dir)
            .args(args)
            .env("NIX_REMOTE", "")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout).unwrap();
        PathBuf::from(stdout.lines().last().unwrap().trim())
    }
}

fn sh(script: &str) {
    let status =
        Command::new("sh").args(["-ec", script]).stdout(std::process::Stdio::null()).status();
    assert!(status.unwrap().success(), "{script}");
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let value = f();
    (start.elapsed(), value)
}

fn tree_size(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len())
        .sum()
}
