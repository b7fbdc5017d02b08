//! The tree digest of an archive being unpacked, computed on a thread of its own from the
//! chunks the unpacker wrote.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use crate::layout::TreeHasher;

use super::UNPACK_CHUNK;

/// Messages in flight to the digest thread; bounds the memory they hold.
const QUEUE: usize = 8;

enum Entry {
    Dir(PathBuf),
    File(PathBuf, bool),
    Link(PathBuf, PathBuf),
    /// A chunk and how many of its bytes are content.
    Bytes(Vec<u8>, usize),
}

/// The unpacker's end: entries in archive order go in, spent chunks come back.
pub(super) struct Feed {
    entries: SyncSender<Entry>,
    spare: Receiver<Vec<u8>>,
}

/// Starts the digest thread; joining it gives the hex digest once the feed is dropped.
pub(super) fn start<'scope>(
    scope: &'scope Scope<'scope, '_>,
) -> (Feed, ScopedJoinHandle<'scope, String>) {
    let (entries, received) = sync_channel(QUEUE);
    let (returned, spare) = channel();
    let handle = scope.spawn(move || digest(received, returned));
    (Feed { entries, spare }, handle)
}

fn digest(entries: Receiver<Entry>, spare: Sender<Vec<u8>>) -> String {
    let mut digest = TreeHasher::new();
    for entry in entries {
        match entry {
            Entry::Dir(path) => digest.dir(&path),
            Entry::File(path, executable) => digest.begin_file(&path, executable),
            Entry::Link(path, target) => digest.symlink(&path, &target),
            Entry::Bytes(chunk, len) => {
                digest.update(&chunk[..len]);
                let _ = spare.send(chunk);
            }
        }
    }
    digest.finish()
}

// A send fails only when the digest thread is gone, which it never is before the feed:
// it ends when the feed is dropped.
impl Feed {
    pub fn dir(&self, path: &Path) {
        let _ = self.entries.send(Entry::Dir(path.to_owned()));
    }

    pub fn file(&self, path: &Path, executable: bool) {
        let _ = self.entries.send(Entry::File(path.to_owned(), executable));
    }

    pub fn symlink(&self, path: &Path, target: &Path) {
        let _ = self.entries.send(Entry::Link(path.to_owned(), target.to_owned()));
    }

    pub fn bytes(&self, chunk: Vec<u8>, len: usize) {
        let _ = self.entries.send(Entry::Bytes(chunk, len));
    }

    /// A chunk of [`UNPACK_CHUNK`] bytes: one the digest thread is done with, or a new one.
    pub fn spare_chunk(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_else(|_| vec![0; UNPACK_CHUNK])
    }
}
