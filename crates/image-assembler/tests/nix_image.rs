//! mkImage built for real with Nix: reproducibility, readers (skopeo, umoci), a chroot run
//! of the entrypoint, layer stability, and a sparse file over 8 GiB.
//!
//! Needs `nix-build`/`nix-store` (Debian `nix-bin`, single-user as root), `skopeo`,
//! `umoci` and `chroot`; without them each test skips loudly (fails under CI).

#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::tools::require;
use image_assembler::docker_archive::read_manifest;

const NIX_HINT: &str = "install Debian's nix-bin (apt-get install nix-bin)";
const TAG: &str = "test";

/// The test expression, the assembler imported into the store, and host files for a shell.
struct Fixture {
    expression: PathBuf,
    assembler_dir: tempfile::TempDir,
    shell: [(&'static str, PathBuf); 3],
}

impl Fixture {
    /// `None` (after a loud message) when Nix or another tool is missing.
    fn new(tools: &[(&str, &str)]) -> Option<Self> {
        require("nix-build", NIX_HINT)?;
        require("nix-store", NIX_HINT)?;
        for (tool, hint) in tools {
            require(tool, hint)?;
        }

        let assembler_dir = tempfile::tempdir().unwrap();
        let bin = assembler_dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::copy(env!("CARGO_BIN_EXE_matrix-image-assembler"), bin.join("matrix-image-assembler"))
            .unwrap();

        let expression = harness::tools::workspace_root().join("nix/tests/image.nix");
        Some(Self { expression, assembler_dir, shell: host_shell() })
    }

    /// `nix-build -A attr` with `args`; returns the output path.
    fn build(&self, attr: &str, args: &[&str]) -> PathBuf {
        let cwd = tempfile::tempdir().unwrap();
        self.build_in(attr, args, cwd.path(), cwd.path())
    }

    /// Like [`Fixture::build`], run from `cwd` with `tmpdir` as TMPDIR.
    fn build_in(&self, attr: &str, args: &[&str], cwd: &Path, tmpdir: &Path) -> PathBuf {
        let mut cmd = Command::new("nix-build");
        cmd.arg(&self.expression).args(["-A", attr, "--no-out-link", "-j", "4"]);
        cmd.args(["--option", "build-users-group", "", "--option", "substituters", ""]);
        cmd.args(["--argstr", "assemblerDir"]).arg(self.assembler_dir.path());
        for (name, path) in &self.shell {
            cmd.args(["--argstr", name]).arg(path);
        }
        cmd.args(args).env("NIX_REMOTE", "").env("TMPDIR", tmpdir).current_dir(cwd);
        let stdout = run(&mut cmd);
        let last = stdout.lines().last().expect("nix-build printed the output path");
        PathBuf::from(last.trim())
    }

    fn image(&self, args: &[&str]) -> PathBuf {
        self.build("image", args)
    }
}

/// Runs `cmd`, panics with its stderr when it fails, returns its stdout.
fn run(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `/bin/dash`, its ELF interpreter and libc, as `ldd` reports them.
fn host_shell() -> [(&'static str, PathBuf); 3] {
    let ldd = run(Command::new("ldd").arg("/bin/dash"));
    let libc = ldd
        .lines()
        .find_map(|l| l.split_once("libc.so.6 => ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("ldd names libc");
    let ldso = ldd
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('/'))
        .and_then(|l| l.split_whitespace().next())
        .expect("ldd names the interpreter");
    [("dash", "/bin/dash".into()), ("ldso", ldso.into()), ("libc", libc.into())]
}

fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

fn layer_digests(layout: &Path) -> Vec<String> {
    let manifest = read_manifest(layout, Some(TAG)).unwrap();
    manifest.layers.into_iter().map(|l| l.digest).collect()
}

fn nix_store(args: &[&str]) -> String {
    run(Command::new("nix-store").args(args).env("NIX_REMOTE", ""))
}

#[test]
fn rebuilds_are_bit_identical_after_optimise_and_from_elsewhere() {
    let Some(fx) = Fixture::new(&[]) else { return };
    let image = fx.image(&[]);
    let digest = manifest_digest(&image);

    // `--check` rebuilds the image and fails on any differing byte; run it from another
    // working directory and TMPDIR.
    let elsewhere = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rebuilt = fx.build_in("image", &["--check"], elsewhere.path(), tmp.path());
    assert_eq!(rebuilt, image);
    assert_eq!(manifest_digest(&rebuilt), digest);
    fx.build("image.layers", &["--check"]);

    // Once the store is optimised, the two equal fixture files share an inode; the image
    // must not notice.
    nix_store(&["--optimise"]);
    let fixtures = fx.build("fixtures", &[]);
    let a = fs::metadata(fixtures.join("data/dup-a")).unwrap();
    let b = fs::metadata(fixtures.join("data/dup-b")).unwrap();
    assert_eq!(a.ino(), b.ino(), "nix-store --optimise hard-linked the duplicate fixture files");
    fx.build("image", &["--check"]);
    fx.build("image.layers", &["--check"]);
    assert_eq!(manifest_digest(&image), digest);
}

#[test]
fn skopeo_and_umoci_read_the_image_with_every_fixture() {
    let tools = [
        ("skopeo", "apt-get install skopeo"),
        ("umoci", "apt-get install umoci"),
        ("chroot", "apt-get install coreutils"),
    ];
    let Some(fx) = Fixture::new(&tools) else { return };
    let image = fx.image(&[]);

    let reference = format!("oci:{}:{TAG}", image.display());
    let inspect: serde_json::Value =
        serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &reference]))).unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Created"], "1970-01-01T00:00:01Z");
    assert_eq!(inspect["Labels"]["org.opencontainers.image.title"], "mkImage fixture");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 100, "maxLayers is the default 100");

    let bundle = tempfile::tempdir().unwrap();
    let bundle_dir = bundle.path().join("bundle");
    let image_ref = format!("{}:{TAG}", image.display());
    run(Command::new("umoci").args(["unpack", "--image", &image_ref]).arg(&bundle_dir));
    let root = bundle_dir.join("rootfs");

    check_store_fixtures(&root, &fx.build("fixtures", &[]), &fx.build("shared", &[]));
    check_extra_files(&root);
    let packages = fs::read_dir(root.join("nix/store"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("-pkg-"))
        .count();
    assert_eq!(packages, 300);

    // The entrypoint runs in a chroot of the unpacked root, with only what the image holds.
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle_dir.join("config.json")).unwrap()).unwrap();
    let args: Vec<&str> =
        config["process"]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let chroot = harness::tools::find("chroot").unwrap();
    let output = run(Command::new(chroot).arg(&root).args(&args).env_clear());
    assert_eq!(output, "hello from the image: read only\n");

    // The docker-archive export holds the same layers.
    let archive = fx.build("image.dockerArchive", &[]);
    let reference = format!("docker-archive:{}", archive.display());
    let inspect: serde_json::Value =
        serde_json::from_str(&run(Command::new("skopeo").args(["inspect", &reference]))).unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 100);
}

/// Every file, link and mode of the `fixtures` package, at its store path in `root`.
fn check_store_fixtures(root: &Path, fixtures: &Path, shared: &Path) {
    let in_root = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let data = in_root(fixtures).join("data");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let text = |p: &Path| fs::read_to_string(p).unwrap();

    assert_eq!(mode(&root.join("nix")), 0o755);
    assert_eq!(mode(&root.join("nix/store")), 0o755);
    assert_eq!(text(&data.join("0".repeat(150))), "a file with a 150-byte name\n");
    let non_utf8 = data.join(OsStr::from_bytes(b"caf\xe9"));
    assert_eq!(text(&non_utf8), "a file whose name is not UTF-8\n");
    assert_eq!(text(&data.join("dup-a")), "the same bytes twice\n");
    assert_eq!(text(&data.join("dup-b")), "the same bytes twice\n");
    assert_eq!(fs::read_dir(data.join("empty-dir")).unwrap().count(), 0);
    assert_eq!(mode(&data.join("empty-dir")), 0o555);
    assert_eq!(mode(&data.join("run.sh")), 0o555);
    assert_eq!(mode(&data.join("readonly.txt")), 0o444);
    assert_eq!(text(&data.join("readonly.txt")), "read only\n");

    let link = fs::read_link(data.join("link-to-shared")).unwrap();
    assert_eq!(link, shared.join("lib/shared.txt"));
    assert_eq!(text(&in_root(&link)), "shared by three hundred packages\n");
    assert_eq!(
        fs::read_link(data.join("sub/relative-link")).unwrap(),
        Path::new("../readonly.txt")
    );
    assert_eq!(text(&data.join("sub/relative-link")), "read only\n");
}

/// The extra files of the test expression, with their modes and owners.
fn check_extra_files(root: &Path) {
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    let mode = |p: &str| meta(p).permissions().mode() & 0o7777;

    assert!(fs::read_to_string(root.join("etc/passwd")).unwrap().contains("app:x:1000:1000"));
    assert_eq!(mode("etc/passwd"), 0o644);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(
        (meta("home/app").uid(), meta("home/app").gid(), mode("home/app")),
        (1000, 1000, 0o700)
    );
    let ca = fs::read_link(root.join("etc/ssl/certs/ca-bundle.crt")).unwrap();
    assert!(ca.ends_with("data/ca.pem"), "{}", ca.display());
    assert_eq!(mode("entrypoint"), 0o755);
}

/// The entry names of one gzip layer of `layout`.
fn layer_entries(layout: &Path, digest: &str) -> Vec<String> {
    let blob = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(fs::File::open(blob).unwrap()));
    let entries = archive.entries().unwrap();
    entries.map(|e| e.unwrap().path().unwrap().display().to_string()).collect()
}

#[test]
fn changing_one_package_changes_only_its_layer() {
    let Some(fx) = Fixture::new(&[]) else { return };
    let image = fx.image(&[]);
    let before = layer_digests(&image);

    // The group is the bottom layer, the application is in the top store layer (just
    // below the extra files).
    let bottom = layer_entries(&image, &before[0]);
    assert!(bottom.iter().any(|e| e.ends_with("-shell-runtime/bin/dash")), "{bottom:?}");
    let top_store = layer_entries(&image, &before[before.len() - 2]);
    assert!(top_store.iter().any(|e| e.ends_with("-app/bin/app.sh")), "app not on top");

    // Package 42 ranks among the per-path layers, package 250 falls in the shared top one.
    for changed in ["42", "250"] {
        let after = layer_digests(&fx.image(&["--arg", "changed", changed]));
        assert_eq!(after.len(), before.len());
        let differing: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
        assert_eq!(differing.len(), 1, "changing package {changed} changed layers {differing:?}");
        let unchanged: BTreeSet<&String> = before.iter().filter(|d| after.contains(d)).collect();
        assert_eq!(unchanged.len(), before.len() - 1);
    }
}

#[test]
fn a_sparse_file_over_8_gib_keeps_its_size_through_a_pax_header() {
    let Some(fx) = Fixture::new(&[]) else { return };
    if !store_fs_keeps_sparse_files() {
        eprintln!("\n!!! SKIPPED: the file system of /nix cannot hold sparse files\n");
        return;
    }
    let sparse = fx.build("sparse", &[]);
    let huge = fs::metadata(sparse.join("huge")).unwrap();
    assert!(huge.blocks() * 512 < 1 << 20, "the 8 GiB fixture must stay sparse in the store");

    let image = fx.build("sparseImage", &[]);
    let manifest = read_manifest(&image, Some(TAG)).unwrap();
    let [layer] = manifest.layers.as_slice() else { panic!("one layer: {manifest:?}") };
    let blob = image.join("blobs/sha256").join(layer.digest.trim_start_matches("sha256:"));

    // Read the layer back with an independent tar reader, streaming: nothing lands on disk.
    let gz = flate2::read::GzDecoder::new(fs::File::open(blob).unwrap());
    let mut archive = tar::Archive::new(gz);
    let mut sizes = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        if name.ends_with("/huge") || name.ends_with("/after") {
            sizes.push((name.rsplit('/').next().unwrap().to_owned(), entry.size()));
        }
    }
    assert_eq!(sizes, [("after".to_owned(), 4), ("huge".to_owned(), 8 * (1 << 30) + 1)]);
}

/// Whether a sparse file made beside the store stays sparse.
fn store_fs_keeps_sparse_files() -> bool {
    let dir = tempfile::tempdir_in("/nix").unwrap();
    let file = fs::File::create(dir.path().join("probe")).unwrap();
    file.set_len(1 << 30).unwrap();
    file.metadata().unwrap().blocks() * 512 < 1 << 20
}
