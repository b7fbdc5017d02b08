//! Finding the external programs that the harnesses run.
//!
//! A test that needs a program it cannot find skips with a loud message on a developer's
//! machine, and fails under CI (`CI` set in the environment), where the test command
//! installs every program so that nothing is skipped.

use std::path::{Path, PathBuf};

/// Directories searched after `PATH`: Debian keeps the PostgreSQL server binaries out of it.
const EXTRA_DIRS: &[&str] = &["/usr/lib/postgresql/*/bin", "/usr/sbin", "/usr/local/sbin"];

/// The absolute path of `program`, from `PATH` or the extra directories above.
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let from_path = std::env::split_paths(&path).map(|dir| dir.join(program));
    from_path
        .chain(extra_dirs().into_iter().map(|dir| dir.join(program)))
        .find(|p| is_executable(p))
}

/// Like [`find`], but for a test: `None` means "skip", after saying so loudly.
///
/// Under CI a missing program is a failure, never a skip.
pub fn require(program: &str, install_hint: &str) -> Option<PathBuf> {
    if let Some(found) = find(program) {
        return Some(found);
    }
    let message = format!(
        "`{program}` is not installed; {install_hint} (or run `cargo xtask test`, which \
            installs it)"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{message}");
    }
    eprintln!("\n!!! SKIPPED: {message}\n");
    None
}

fn extra_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for pattern in EXTRA_DIRS {
        match pattern.split_once('*') {
            // Expand one `*` by listing the parent, newest version last so it wins ties.
            Some((head, tail)) => {
                let Ok(entries) = std::fs::read_dir(head) else { continue };
                let mut found: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path().join(tail.trim_start_matches('/')))
                    .filter(|p| p.is_dir())
                    .collect();
                found.sort();
                found.reverse();
                dirs.extend(found);
            }
            None => dirs.push(PathBuf::from(pattern)),
        }
    }
    dirs
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The workspace root, for tests that need the repository's files or built binaries.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// A binary of this workspace, built by cargo into the shared target directory.
///
/// Integration tests of one crate that need another crate's binary call this after
/// `cargo build --bins` (which `cargo xtask test` runs first); a missing binary is a
/// clear failure, never a skip.
pub fn workspace_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        is_executable(&path),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
