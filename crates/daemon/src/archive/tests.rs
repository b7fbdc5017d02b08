#![allow(clippy::unwrap_used, reason = "a test fails loudly on an unexpected error")]

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::layout::tree_digest;

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("cortex/journal")).unwrap();
    std::fs::create_dir_all(root.join("workspace/src")).unwrap();
    std::fs::write(root.join("cortex/settings.json"), "{}").unwrap();
    std::fs::write(root.join("workspace/src/main.rs"), "fn main() {}").unwrap();
    std::fs::write(root.join("stray.txt"), "not archived").unwrap();
}

/// Links of every sort a workspace holds: relative, absolute, leaving the tree, dangling.
fn links(root: &Path) {
    let workspace = root.join("workspace");
    std::os::unix::fs::symlink("src/main.rs", workspace.join("main-link")).unwrap();
    std::os::unix::fs::symlink("src", workspace.join("src-link")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/env", workspace.join("src/env")).unwrap();
    std::os::unix::fs::symlink("../../outside", workspace.join("src/up")).unwrap();
    std::os::unix::fs::symlink("does-not-exist", workspace.join("dangling")).unwrap();
}

#[test]
fn the_same_tree_packs_to_the_same_bytes_and_round_trips() {
    let (a, b, out) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(a.path());
    tree(b.path());

    let first = pack(a.path(), &out.path().join("a.tar.zst")).unwrap();
    let second = pack(b.path(), &out.path().join("b.tar.zst")).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.tree_sha256, tree_digest(a.path()).unwrap(), "the digest of what was packed");

    let dest = out.path().join("unpacked");
    let unpacked = unpack(&out.path().join("a.tar.zst"), &dest).unwrap();
    assert_eq!(unpacked, tree_digest(&dest).unwrap());
    assert_eq!(unpacked, tree_digest(b.path()).unwrap());
    assert!(!dest.join("stray.txt").exists());
}

#[test]
fn links_round_trip_as_links_and_are_never_followed() {
    let (source, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(source.path());
    links(source.path());

    let packed = pack(source.path(), &out.path().join("a.tar.zst")).unwrap();
    let dest = out.path().join("unpacked");
    let unpacked = unpack(&out.path().join("a.tar.zst"), &dest).unwrap();

    assert_eq!(packed.skipped, 0);
    assert_eq!(unpacked, tree_digest(source.path()).unwrap());
    assert_eq!(unpacked, tree_digest(&dest).unwrap());
    for link in ["main-link", "src-link", "src/env", "src/up", "dangling"] {
        let (original, restored) =
            (source.path().join("workspace").join(link), dest.join("workspace").join(link));
        assert!(restored.symlink_metadata().unwrap().is_symlink(), "{link} is a link");
        assert_eq!(std::fs::read_link(restored).unwrap(), std::fs::read_link(original).unwrap());
    }
}

#[test]
fn a_changed_link_target_changes_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    links(dir.path());
    let before = tree_digest(dir.path()).unwrap();

    let link = dir.path().join("workspace/dangling");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("does-not-exist-either", &link).unwrap();

    assert_ne!(tree_digest(dir.path()).unwrap(), before);
}

#[test]
fn special_files_and_cortex_links_are_skipped_and_counted() {
    let (source, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(source.path());
    let fifo = source.path().join("workspace/fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let socket = source.path().join("workspace/socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", source.path().join("cortex/link")).unwrap();

    // Would hang if the packer opened the fifo.
    let packed = pack(source.path(), &out.path().join("a.tar.zst")).unwrap();
    let dest = out.path().join("unpacked");
    unpack(&out.path().join("a.tar.zst"), &dest).unwrap();

    assert_eq!(packed.skipped, 3);
    for skipped in ["workspace/fifo", "workspace/socket", "cortex/link"] {
        assert!(dest.join(skipped).symlink_metadata().is_err(), "{skipped} is not restored");
    }
    assert!(dest.join("workspace/src/main.rs").is_file());
}

/// An archive with `entries` (path, kind, link target or contents), zstd-compressed.
fn hostile_archive(path: &Path, entries: &[(&str, EntryType, &str)]) {
    let encoder = zstd::Encoder::new(File::create(path).unwrap(), 3).unwrap();
    let mut builder = tar::Builder::new(encoder);
    for (name, kind, data) in entries {
        let mut header = Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_mode(0o755);
        if *kind == EntryType::Symlink {
            header.set_size(0);
            builder.append_link(&mut header, name, data).unwrap();
        } else {
            header.set_size(data.len() as u64);
            // `append_data` would refuse nothing, but checks the path; write the name raw.
            header.set_path(name).unwrap();
            header.set_cksum();
            builder.append(&header, data.as_bytes()).unwrap();
        }
    }
    builder.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn an_archive_cannot_write_through_a_link_out_of_the_tree() {
    let scratch = tempfile::tempdir().unwrap();
    let elsewhere = scratch.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let outside = elsewhere.to_str().unwrap();

    let cases: [&[(&str, EntryType, &str)]; 5] = [
        // A link out of the tree, then a file under it.
        &[
            ("workspace/escape", EntryType::Symlink, outside),
            ("workspace/escape/owned.txt", EntryType::Regular, "owned"),
        ],
        // The same through a directory entry first.
        &[
            ("workspace/escape", EntryType::Symlink, outside),
            ("workspace/escape/sub", EntryType::Directory, ""),
            ("workspace/escape/sub/owned.txt", EntryType::Regular, "owned"),
        ],
        // A file entry at the link's own path, to be written through it.
        &[
            ("workspace/owned.txt", EntryType::Symlink, &format!("{outside}/owned.txt")),
            ("workspace/owned.txt", EntryType::Regular, "owned"),
        ],
        // A link inside the tree that points out, used as a parent.
        &[
            ("workspace/a", EntryType::Directory, ""),
            ("workspace/a/b", EntryType::Symlink, "../../../elsewhere"),
            ("workspace/a/b/owned.txt", EntryType::Regular, "owned"),
        ],
        // A link under cortex/, which `matrixd` appends to.
        &[("cortex/transcript.jsonl", EntryType::Symlink, &format!("{outside}/owned.txt"))],
    ];
    for (n, entries) in cases.iter().enumerate() {
        let archive = scratch.path().join(format!("hostile-{n}.tar.zst"));
        hostile_archive(&archive, entries);
        let dest = scratch.path().join(format!("dest-{n}"));

        let error = unpack(&archive, &dest).unwrap_err();

        assert!(matches!(error, ArchiveError::UnsafeEntry { .. }), "case {n}: {error}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "case {n} wrote outside");
    }
}

/// The writers `matrixd` and the tools in a workspace use, each making files whose every
/// state is recognisable: one byte value repeated, the length a function of the value.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn length_of(value: u8) -> usize {
    (1 + usize::from(value) % 7) * 48 * 1024
}

/// Values written: never 0, so a zero-padded copy is never mistaken for a state.
fn value(round: usize) -> u8 {
    (round % 250) as u8 + 1
}

impl Writers {
    fn start(root: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let workspace = root.join("workspace");
        let mut threads = Vec::new();
        for name in ["renamed.bin", "rewritten.bin"] {
            std::fs::write(workspace.join(name), vec![value(0); length_of(value(0))]).unwrap();
        }
        std::fs::write(workspace.join("appended.txt"), "").unwrap();

        // Replaces its file by renaming a new one over it, as `matrixd` writes.
        let (dir, halt) = (workspace.clone(), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut round = 0;
            while !halt.load(Ordering::Relaxed) {
                let v = value(round);
                crate::layout::write_atomic(&dir.join("renamed.bin"), &vec![v; length_of(v)])
                    .unwrap();
                round += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }));

        // Rewrites its file in place: truncate, then write the new contents.
        let (dir, halt) = (workspace.clone(), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut round = 0;
            while !halt.load(Ordering::Relaxed) {
                let v = value(round);
                std::fs::write(dir.join("rewritten.bin"), vec![v; length_of(v)]).unwrap();
                round += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }));

        // Appends numbered lines, as the transcript grows.
        let (dir, halt) = (workspace, Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut file = OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.join("appended.txt"))
                .unwrap();
            let mut line = 0u64;
            while !halt.load(Ordering::Relaxed) {
                file.write_all(format!("{line:08}\n").as_bytes()).unwrap();
                line += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
        Self { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
    }
}

/// Fails unless `bytes` is a state a [`Writers`] file had.
fn assert_one_state(name: &str, bytes: &[u8], round: usize) {
    if name == "appended.txt" {
        let text = std::str::from_utf8(bytes).unwrap();
        for (n, line) in text.split_inclusive('\n').enumerate() {
            assert_eq!(line, format!("{n:08}\n"), "pack {round}: {name} line {n}");
        }
        return;
    }
    let Some(&first) = bytes.first() else { return }; // Just truncated: a state too.
    assert!(
        bytes.iter().all(|&b| b == first) && bytes.len() <= length_of(first),
        "pack {round}: {name} mixes states ({} bytes, first {first})",
        bytes.len()
    );
    if name == "renamed.bin" {
        assert_eq!(bytes.len(), length_of(first), "pack {round}: {name} is whole");
    }
}

#[test]
fn files_written_during_packing_are_archived_each_as_one_state() {
    let (source, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(source.path());
    let writers = Writers::start(source.path());

    for round in 0..40 {
        let archive = out.path().join(format!("{round}.tar.zst"));
        let packed = pack(source.path(), &archive).unwrap();
        let dest = out.path().join(format!("{round}"));
        let unpacked = unpack(&archive, &dest).unwrap();

        assert_eq!(unpacked, packed.tree_sha256, "pack {round}: the digest is of what was packed");
        for name in ["renamed.bin", "rewritten.bin", "appended.txt"] {
            let bytes = std::fs::read(dest.join("workspace").join(name)).unwrap();
            assert_one_state(name, &bytes, round);
        }
        std::fs::remove_dir_all(&dest).unwrap();
        std::fs::remove_file(&archive).unwrap();
    }
    writers.stop();
}

#[test]
fn a_file_larger_than_the_memory_spool_round_trips() {
    let (source, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(source.path());
    let big: Vec<u8> =
        (0..(17u32 << 20)).map(|n| (n.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    std::fs::write(source.path().join("workspace/big.bin"), &big).unwrap();

    let packed = pack(source.path(), &out.path().join("a.tar.zst")).unwrap();
    let dest = out.path().join("unpacked");
    let unpacked = unpack(&out.path().join("a.tar.zst"), &dest).unwrap();

    assert_eq!(unpacked, packed.tree_sha256);
    assert_eq!(std::fs::read(dest.join("workspace/big.bin")).unwrap(), big);
}

#[test]
fn entries_outside_the_snapshot_directories_are_refused() {
    for (path, kind) in [
        ("../etc/passwd", EntryType::Regular),
        ("/etc/passwd", EntryType::Regular),
        ("cortex/../../x", EntryType::Regular),
        ("other/x", EntryType::Regular),
        ("cortex/link", EntryType::Symlink),
        ("workspace/dev", EntryType::Char),
        ("workspace/fifo", EntryType::Fifo),
        ("workspace/hard", EntryType::Link),
    ] {
        assert!(check_entry(Path::new(path), kind).is_err(), "{path} should be refused");
    }
    assert!(check_entry(Path::new("workspace/a/b.txt"), EntryType::Regular).is_ok());
    assert!(check_entry(Path::new("workspace/a/link"), EntryType::Symlink).is_ok());
}

#[test]
fn a_log_appended_to_without_pause_is_archived_as_it_was_at_one_moment() {
    let (source, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(source.path());
    let log = source.path().join("workspace/busy.log");
    std::fs::write(&log, "").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let (log, stop) = (log.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut file = OpenOptions::new().append(true).open(log).unwrap();
            let mut line = 0u64;
            while !stop.load(Ordering::Relaxed) {
                file.write_all(format!("{line:08}\n").as_bytes()).unwrap();
                line += 1;
            }
        })
    };

    for round in 0..10 {
        let archive = out.path().join(format!("{round}.tar.zst"));
        pack(source.path(), &archive).unwrap();
        let dest = out.path().join(format!("{round}"));
        unpack(&archive, &dest).unwrap();
        let bytes = std::fs::read(dest.join("workspace/busy.log")).unwrap();
        assert_one_state("appended.txt", &bytes, round);
    }
    stop.store(true, Ordering::Relaxed);
    appender.join().unwrap();
}

#[test]
fn cortex_is_archived_as_it_was_at_one_moment() {
    let (source, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(source.path());
    let cortex = source.path().join("cortex");
    // Enough entries between the two counters that archiving them takes a while.
    for n in 0..300 {
        std::fs::write(cortex.join(format!("m-{n:04}.json")), "{}").unwrap();
    }
    let write = |name: &str, value: u64| {
        let temp = cortex.join(format!(".{name}.tmp"));
        std::fs::write(&temp, value.to_string()).unwrap();
        std::fs::rename(&temp, cortex.join(name)).unwrap();
    };
    write("a.json", 0);
    write("z.json", 0);

    // `a` then `z`, in bursts, as an intent records its steps: at every moment `z` is `a`
    // or one behind it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, cortex) = (Arc::clone(&stop), cortex.clone());
        std::thread::spawn(move || {
            let write = |name: &str, value: u64| {
                let temp = cortex.join(format!(".{name}.tmp"));
                std::fs::write(&temp, value.to_string()).unwrap();
                std::fs::rename(&temp, cortex.join(name)).unwrap();
            };
            let mut value = 0;
            while !stop.load(Ordering::Relaxed) {
                value += 1;
                write("a.json", value);
                write("z.json", value);
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };

    let (mut packed, mut gave_up) = (0, 0);
    for round in 0..20 {
        let archive = out.path().join(format!("{round}.tar.zst"));
        match pack(source.path(), &archive) {
            Ok(_) => packed += 1,
            Err(ArchiveError::KeptChanging { .. }) => {
                gave_up += 1;
                continue;
            }
            Err(e) => panic!("{e}"),
        }
        let dest = out.path().join(format!("{round}"));
        unpack(&archive, &dest).unwrap();
        let read = |name: &str| -> u64 {
            std::fs::read_to_string(dest.join("cortex").join(name)).unwrap().parse().unwrap()
        };
        let (a, z) = (read("a.json"), read("z.json"));
        assert!(z == a || z + 1 == a, "pack {round}: a = {a}, z = {z} never coexisted");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(packed > 0, "some packs found a quiet moment: {packed} packed, {gave_up} not");
}

#[test]
fn a_snapshot_directory_that_is_a_link_is_refused_naming_it() {
    for dir in SNAPSHOT_DIRS {
        let (root, outside, out) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        tree(root.path());
        std::fs::write(outside.path().join("secret.txt"), "not the volume's").unwrap();
        std::fs::rename(root.path().join(dir), root.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join(dir)).unwrap();

        let error = pack(root.path(), &out.path().join("a.tar.zst")).unwrap_err();

        let linked = root.path().join(dir).display().to_string();
        assert!(error.to_string().contains(&linked), "{dir}: {error}");
        assert!(error.to_string().contains("not a directory"), "{dir}: {error}");
    }
}

#[test]
fn an_archive_holding_a_linked_workspace_restores_it_as_a_directory() {
    // What pushes before the refusal made of a `workspace` link: the link, then what it
    // pointed to under it.
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("old.tar.zst");
    hostile_archive(
        &archive,
        &[
            ("cortex", EntryType::Directory, ""),
            ("cortex/settings.json", EntryType::Regular, "{}"),
            ("workspace", EntryType::Symlink, "/elsewhere"),
            ("workspace/secret.txt", EntryType::Regular, "kept"),
        ],
    );
    let dest = scratch.path().join("unpacked");

    let digest = unpack(&archive, &dest).unwrap();

    let workspace = dest.join("workspace").symlink_metadata().unwrap();
    assert!(workspace.is_dir(), "a real directory, not a link");
    assert_eq!(std::fs::read_to_string(dest.join("workspace/secret.txt")).unwrap(), "kept");
    assert_eq!(digest, tree_digest(&dest).unwrap());
}

/// Bytes per write of the busy writer below.
const BUSY_CHUNK: usize = 4 << 10;

#[test]
fn a_workspace_file_rewritten_without_pause_does_not_fail_the_push() {
    let (root, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(root.path());
    let busy = root.path().join("workspace/busy.bin");
    std::fs::write(&busy, vec![0u8; 4 << 20]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (path, halt) = (busy.clone(), Arc::clone(&stop));
    // Rewrites the file's head in place and grows it by a byte, as fast as it can: never
    // the same state twice, and never only appended to.
    let writer = std::thread::spawn(move || {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let mut round = 0u64;
        while !halt.load(Ordering::Relaxed) {
            round += 1;
            file.write_all_at(&round.to_le_bytes().repeat(BUSY_CHUNK / 8), 0).unwrap();
            let len = file.metadata().unwrap().len();
            file.write_all_at(&[0], len).unwrap();
        }
    });

    while std::fs::metadata(&busy).unwrap().len() < (4 << 20) + 100 {
        std::thread::sleep(Duration::from_millis(1)); // Until the writer is under way.
    }
    let packed = pack(root.path(), &out.path().join("a.tar.zst"));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    let packed = packed.expect("one busy workspace file does not stop the push");
    let dest = out.path().join("unpacked");
    unpack(&out.path().join("a.tar.zst"), &dest).unwrap();
    assert!(dest.join("workspace/src/main.rs").is_file(), "the rest is archived");
    match packed.unreadable {
        // Left out, and counted.
        1 => assert!(!dest.join("workspace/busy.bin").exists()),
        // Read while the writer was descheduled: archived.
        0 => assert!(dest.join("workspace/busy.bin").is_file()),
        n => panic!("{n} entries left out; only busy.bin could be"),
    }
}
