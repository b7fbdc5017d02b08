//! The Nix code, checked on machines that cannot fetch nixpkgs.
//!
//! 1. every `.nix` file parses (`nix-instantiate --parse`);
//! 2. every `.nix` file is formatted as `alejandra` formats it (the Rust library,
//!    linked into xtask, so no extra program is installed);
//! 3. the parts of the Nix code that need no nixpkgs are evaluated for real: the wheel
//!    selection from `uv.lock` must give every locked Python package exactly one wheel, with
//!    the lock's own hash, on each system the flake builds for.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use xshell::{cmd, Shell};

/// Directories never searched for `.nix` files.
const SKIPPED_DIRS: &[&str] = &[".git", "target", "node_modules", ".venv", "result"];
/// The systems the flake builds for; the wheel selection is evaluated for each.
const SYSTEMS: &[&str] = &["x86_64-linux", "aarch64-linux"];
/// The Python the image runs (nixpkgs' `python3` at the pinned revision).
const IMAGE_PYTHON_TAG: &str = "cp313";
/// The function that picks the locked wheels, and the lock it reads.
const WHEELS_FUNCTION: &str = "nix/lib/uv-lock-wheels.nix";
const UV_LOCK: &str = "deploy/daemon/mcp/uv.lock";

pub fn run(sh: &Shell) -> Result<()> {
    let root = project_root();
    ensure!(
        harness::tools::find("nix-instantiate").is_some(),
        "`nix-instantiate` is not installed; apt-get install nix-bin"
    );

    let files = nix_files(&root)?;
    ensure!(!files.is_empty(), "no .nix files found under {}", root.display());

    check_parse(sh, &root, &files)?;
    println!("nix  parse       ok  {} files", files.len());

    // The wheel selection is checked even when formatting fails: both are reported.
    let unformatted = unformatted_files(&root, &files)?;
    match unformatted.as_slice() {
        [] => println!("nix  format      ok  {} files", files.len()),
        _ => println!("nix  format      FAILED  {}", unformatted.join(", ")),
    }

    for system in SYSTEMS {
        let count = check_wheel_selection(sh, &root, system)?;
        println!("nix  uv wheels   ok  {system}: {count} wheels, one per locked package");
    }

    ensure!(
        unformatted.is_empty(),
        "not formatted as alejandra formats them (run `nix fmt`, or `cargo xtask nix-fmt`): {}",
        unformatted.join(", ")
    );
    Ok(())
}

/// Rewrites every `.nix` file the way alejandra formats it.
pub fn format(_sh: &Shell) -> Result<()> {
    let root = project_root();
    for file in nix_files(&root)? {
        let path = root.join(&file);
        let before = std::fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
        match alejandra::format::in_memory(file.clone(), before) {
            (alejandra::format::Status::Error(err), _) => bail!("{file}: {err}"),
            (alejandra::format::Status::Changed(false), _) => {}
            (alejandra::format::Status::Changed(true), after) => {
                std::fs::write(&path, after).with_context(|| format!("writing {file}"))?;
                println!("formatted {file}");
            }
        }
    }
    Ok(())
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// Every `.nix` file of the repository, relative to the root, sorted.
fn nix_files(root: &Path) -> Result<Vec<String>> {
    let walker = walkdir::WalkDir::new(root).sort_by_file_name().into_iter().filter_entry(|e| {
        !(e.file_type().is_dir() && SKIPPED_DIRS.iter().any(|skip| e.file_name() == *skip))
    });
    let mut files = Vec::new();
    for entry in walker {
        let entry = entry.context("walking the repository for .nix files")?;
        let path = entry.path();
        if entry.file_type().is_file() && path.extension().is_some_and(|ext| ext == "nix") {
            let relative = path.strip_prefix(root).context("a path outside the root")?;
            files.push(relative.to_string_lossy().into_owned());
        }
    }
    Ok(files)
}

fn check_parse(sh: &Shell, root: &Path, files: &[String]) -> Result<()> {
    let _cd = sh.push_dir(root);
    for file in files {
        cmd!(sh, "nix-instantiate --parse {file}")
            .quiet()
            .ignore_stdout()
            .run()
            .with_context(|| format!("{file} does not parse"))?;
    }
    Ok(())
}

fn unformatted_files(root: &Path, files: &[String]) -> Result<Vec<String>> {
    let mut unformatted = Vec::new();
    for file in files {
        let before =
            std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
        match alejandra::format::in_memory(file.clone(), before) {
            (alejandra::format::Status::Error(err), _) => bail!("{file}: alejandra: {err}"),
            (alejandra::format::Status::Changed(true), _) => unformatted.push(file.clone()),
            (alejandra::format::Status::Changed(false), _) => {}
        }
    }
    Ok(unformatted)
}

/// One wheel as the Nix function picks it.
#[derive(Debug, Deserialize)]
struct PickedWheel {
    pname: String,
    url: String,
    sha256: String,
}

/// Evaluates the wheel selection for one system and checks it against the lock itself.
fn check_wheel_selection(sh: &Shell, root: &Path, system: &str) -> Result<usize> {
    let expr = format!(
        "import ./{WHEELS_FUNCTION} \
         {{ system = \"{system}\"; pythonTag = \"{IMAGE_PYTHON_TAG}\"; }} \
         (builtins.fromTOML (builtins.readFile ./{UV_LOCK}))"
    );
    let _cd = sh.push_dir(root);
    let json = cmd!(sh, "nix-instantiate --eval --strict --json --expr {expr}")
        .quiet()
        .read()
        .with_context(|| format!("evaluating {WHEELS_FUNCTION} for {system}"))?;
    let picked: Vec<PickedWheel> = serde_json::from_str(&json)
        .with_context(|| format!("reading the wheels picked for {system}"))?;

    let lock = std::fs::read_to_string(root.join(UV_LOCK)).context("reading uv.lock")?;
    let locked_hashes: BTreeSet<String> = lock
        .lines()
        .filter_map(|line| line.split_once("hash = \"sha256:"))
        .filter_map(|(_, rest)| rest.split_once('"'))
        .map(|(hash, _)| hash.to_owned())
        .collect();

    let mut names = BTreeSet::new();
    for wheel in &picked {
        ensure!(names.insert(wheel.pname.clone()), "{system}: two wheels for {}", wheel.pname);
        ensure!(
            locked_hashes.contains(&wheel.sha256),
            "{system}: the wheel {} has a hash that is not in uv.lock",
            wheel.url
        );
        let file = wheel.url.rsplit('/').next().unwrap_or_default();
        let arch = system.split('-').next().unwrap_or_default();
        ensure!(
            file.ends_with("-none-any.whl") || file.contains(arch),
            "{system}: picked {file}, which is not for {arch}"
        );
    }
    Ok(picked.len())
}
