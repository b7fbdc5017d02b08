//! Cheap change detection for periodic pushes: a fingerprint of the tree's metadata.
//!
//! The fingerprint covers, for every entry under `cortex/` and `workspace/`: its path,
//! kind, size, mtime and ctime (to the nanosecond), mode, inode and link target. It reads
//! no file contents, so checking an unchanged tree costs one `lstat` per entry.
//!
//! Caveat: a write that keeps a file's size, inode, mtime and ctime goes unseen. ctime
//! cannot be set from user space, so that takes an in-place rewrite within one tick of the
//! kernel's timestamp clock (Linux 6.13 and later stamp such writes finer on ext4, xfs,
//! btrfs and tmpfs). `matrixd`'s own writes are never of that kind: it replaces files by
//! renaming (a new inode) or appends (a new size). To bound the caveat for other writers,
//! every [`FULL_CHECK_EVERY`]th check reads the whole tree anyway.

pub use crate::layout::Fingerprint;

/// Quick checks between two full ones.
pub const FULL_CHECK_EVERY: u32 = 60;

/// What a periodic pusher remembers between checks.
#[derive(Debug, Default)]
pub struct ChangeCheck {
    settled: Option<(u64, Fingerprint)>,
    quick_checks: u32,
    full_reads: u64,
}

/// What [`ChangeCheck::assess`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assessment {
    /// The metadata is as it was when the tree matched `generation`: unchanged.
    Unchanged,
    /// The metadata moved: the tree most likely changed.
    Moved,
    /// Nothing to compare against, or time for a full check: digest the contents.
    Unknown,
}

impl ChangeCheck {
    /// Compares `current` with the fingerprint recorded when the tree last matched
    /// `generation`.
    pub fn assess(&mut self, generation: u64, current: &Fingerprint) -> Assessment {
        let Some((settled_generation, settled)) = &self.settled else {
            return Assessment::Unknown;
        };
        if *settled_generation != generation || self.quick_checks >= FULL_CHECK_EVERY {
            return Assessment::Unknown;
        }
        if settled != current {
            return Assessment::Moved;
        }
        self.quick_checks += 1;
        Assessment::Unchanged
    }

    /// Counts a read of the whole tree's contents.
    pub fn count_full_read(&mut self) {
        self.full_reads += 1;
    }

    /// How many times the whole tree's contents were read to tell whether it changed.
    pub fn full_reads(&self) -> u64 {
        self.full_reads
    }

    /// Records that the tree matched `generation` when its metadata was `fingerprint`.
    pub fn settle(&mut self, generation: u64, fingerprint: Fingerprint) {
        self.settled = Some((generation, fingerprint));
        self.quick_checks = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]
mod tests {
    use std::path::Path;

    use super::*;

    fn check(change: impl FnOnce(&Path)) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir_all(workspace.join("sub")).unwrap();
        std::fs::write(workspace.join("sub/file.txt"), "one").unwrap();
        std::os::unix::fs::symlink("sub/file.txt", workspace.join("link")).unwrap();
        let before = Fingerprint::of(dir.path()).unwrap();
        change(&workspace);
        Fingerprint::of(dir.path()).unwrap() != before
    }

    #[test]
    fn the_fingerprint_moves_with_every_kind_of_change() {
        assert!(!check(|_| {}), "nothing changed");
        assert!(check(|w| std::fs::write(w.join("sub/file.txt"), "two!").unwrap()), "content");
        assert!(check(|w| std::fs::write(w.join("new.txt"), "").unwrap()), "a new file");
        assert!(check(|w| std::fs::remove_file(w.join("sub/file.txt")).unwrap()), "removal");
        assert!(
            check(|w| {
                std::fs::remove_file(w.join("link")).unwrap();
                std::os::unix::fs::symlink("elsewhere", w.join("link")).unwrap();
            }),
            "a link's target"
        );
        assert!(
            check(|w| {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::Permissions::from_mode(0o755);
                std::fs::set_permissions(w.join("sub/file.txt"), mode).unwrap();
            }),
            "a mode"
        );
        assert!(
            check(|w| {
                // A rename over the file, as `matrixd` writes: same size, new inode.
                std::fs::write(w.join("tmp"), "one").unwrap();
                std::fs::rename(w.join("tmp"), w.join("sub/file.txt")).unwrap();
            }),
            "a replacement"
        );
    }

    #[test]
    fn a_full_check_comes_around_even_when_nothing_moves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("workspace")).unwrap();
        let fingerprint = Fingerprint::of(dir.path()).unwrap();
        let mut changes = ChangeCheck::default();

        assert_eq!(changes.assess(1, &fingerprint), Assessment::Unknown);
        changes.settle(1, fingerprint.clone());
        for _ in 0..FULL_CHECK_EVERY {
            assert_eq!(changes.assess(1, &fingerprint), Assessment::Unchanged);
        }
        assert_eq!(changes.assess(1, &fingerprint), Assessment::Unknown);
        assert_eq!(changes.assess(2, &fingerprint), Assessment::Unknown, "another generation");
    }
}
