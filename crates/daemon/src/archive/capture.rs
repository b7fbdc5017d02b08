//! Reading one file as one state it had, while other writers may be changing it.
//!
//! A file is copied to a spool (memory for small files, an unnamed temporary file beside
//! the archive for large ones) between two `fstat`s of the same open file. When size, mtime
//! or ctime moved, a writer touched it during the copy and it is read again. Writes that
//! replace a file by renaming (as `matrixd` writes) never touch the open inode, and appends
//! always change the size, so both are caught exactly. A file that only grew while it was
//! read (a log being appended to) is taken as it was at the first `fstat`, once its first
//! bytes read the same a second time, so a busy log does not stop a push. An in-place
//! rewrite that keeps the size is caught by the timestamps; on kernels without fine-grained
//! timestamps (before Linux 6.13 on ext4, xfs, btrfs and tmpfs) a rewrite within the same
//! clock tick as the first `fstat` can go unseen.
//!
//! FIXME: a `write` in progress at both `fstat`s goes unseen (the kernel stamps mtime as a
//! write starts), so a file rewritten in place by a writer preempted mid-write can be
//! archived torn at a page boundary (seen on a loaded 2-core machine, Linux 6.18).

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::OFlag;

use super::{io_err, ArchiveError};

/// Bytes compared at a time when a grown file's first bytes are read again.
const CHUNK: usize = 1 << 20;
/// Files up to this size are spooled in memory.
const MEMORY_SPOOL_MAX: u64 = 16 << 20;
/// Reads of a file that keeps changing before the push gives up on it.
pub(super) const ATTEMPTS: u32 = 5;
/// Pause before the second read; doubled for each later one.
const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// One file's bytes, as they were between two identical `fstat`s.
pub(super) struct Captured<'a> {
    pub mode: u32,
    pub len: u64,
    pub bytes: Box<dyn Read + 'a>,
}

/// Reusable spools for [`Capture::read`].
pub(super) struct Capture {
    spool_dir: PathBuf,
    memory: Vec<u8>,
    file: Option<File>,
}

impl Capture {
    pub fn new(spool_dir: &Path) -> Self {
        Self { spool_dir: spool_dir.to_owned(), memory: Vec::new(), file: None }
    }

    /// The file at `path` as one state it had, or `None` when it is gone or no longer a
    /// regular file (the next snapshot sees what replaced it).
    pub fn read(&mut self, path: &Path) -> Result<Option<Captured<'_>>, ArchiveError> {
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            // O_NONBLOCK: a fifo put in the file's place must not block the push.
            let opened = OpenOptions::new()
                .read(true)
                .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
                .open(path);
            let mut file = match opened {
                Ok(file) => file,
                Err(e) if is_gone(&e) => return Ok(None),
                Err(e) => return Err(io_err("opening", path)(e)),
            };
            let before = file.metadata().map_err(io_err("reading", path))?;
            if !before.is_file() {
                return Ok(None);
            }

            let copied = self.copy(&mut file, before.len(), path)?;
            let after = file.metadata().map_err(io_err("reading", path))?;
            if copied == before.len() && unchanged(&before, &after) {
                return Ok(Some(self.captured(before.mode(), before.len(), path)?));
            }
            // Appended to while read (a log): the file as it was at the first fstat, if its
            // first bytes read the same again.
            let grew = after.len() > before.len() && copied >= before.len();
            if grew && self.prefix_unchanged(&mut file, before.len(), path)? {
                return Ok(Some(self.captured(before.mode(), before.len(), path)?));
            }

            tracing::debug!(path = %path.display(), attempt, "file changed while read; again");
            std::thread::sleep(pause);
            pause *= 2;
        }
        Err(ArchiveError::KeptChanging { path: path.to_owned(), attempts: ATTEMPTS })
    }

    /// Copies up to `len + 1` bytes (one more shows the file grew) into a spool.
    fn copy(&mut self, file: &mut File, len: u64, path: &Path) -> Result<u64, ArchiveError> {
        let mut limited = file.take(len + 1);
        if len <= MEMORY_SPOOL_MAX {
            self.memory.clear();
            return limited
                .read_to_end(&mut self.memory)
                .map(|n| n as u64)
                .map_err(io_err("reading", path));
        }
        let spool = self.spool_file()?;
        let copied = io::copy(&mut limited, spool).map_err(io_err("reading", path))?;
        spool.flush().map_err(io_err("spooling", path))?;
        Ok(copied)
    }

    fn captured(&mut self, mode: u32, len: u64, path: &Path) -> Result<Captured<'_>, ArchiveError> {
        let bytes: Box<dyn Read + '_> = if len <= MEMORY_SPOOL_MAX {
            Box::new(&self.memory[..len as usize])
        } else {
            let spool = self.file.as_mut().expect("a large file was spooled to the file");
            spool.rewind().map_err(io_err("spooling", path))?;
            Box::new(spool.take(len))
        };
        Ok(Captured { mode, len, bytes })
    }

    /// Whether the first `len` bytes of `file` are still those in the spool.
    fn prefix_unchanged(
        &mut self,
        file: &mut File,
        len: u64,
        path: &Path,
    ) -> Result<bool, ArchiveError> {
        let mut now = vec![0; CHUNK];
        let mut then = vec![0; CHUNK];
        file.rewind().map_err(io_err("reading", path))?;
        let mut now_reader = file.take(len);
        let mut then_reader: Box<dyn Read + '_> = if len <= MEMORY_SPOOL_MAX {
            Box::new(&self.memory[..len as usize])
        } else {
            let spool = self.file.as_mut().expect("a large file was spooled to the file");
            spool.rewind().map_err(io_err("spooling", path))?;
            Box::new(spool.take(len))
        };
        loop {
            let read = now_reader.read(&mut now).map_err(io_err("reading", path))?;
            if read == 0 {
                return Ok(true);
            }
            then_reader.read_exact(&mut then[..read]).map_err(io_err("spooling", path))?;
            if now[..read] != then[..read] {
                return Ok(false);
            }
        }
    }

    /// The large-file spool, emptied.
    fn spool_file(&mut self) -> Result<&mut File, ArchiveError> {
        if self.file.is_none() {
            let file = tempfile::tempfile_in(&self.spool_dir)
                .map_err(io_err("creating a spool file in", &self.spool_dir))?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("created above");
        file.set_len(0).map_err(io_err("emptying the spool in", &self.spool_dir))?;
        file.rewind().map_err(io_err("emptying the spool in", &self.spool_dir))?;
        Ok(file)
    }
}

fn unchanged(before: &Metadata, after: &Metadata) -> bool {
    before.len() == after.len()
        && (before.mtime(), before.mtime_nsec()) == (after.mtime(), after.mtime_nsec())
        && (before.ctime(), before.ctime_nsec()) == (after.ctime(), after.ctime_nsec())
}

/// Removed, or replaced by a link (`O_NOFOLLOW` gives `ELOOP`), since the walk listed it.
fn is_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound
        || error.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32)
}
