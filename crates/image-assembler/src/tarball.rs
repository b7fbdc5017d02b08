//! A tar writer whose output depends only on the files' names, contents, kinds and the
//! few mode bits an image cares about, never on the host that wrote it.
//!
//! Every header is POSIX ustar with uid/gid from the caller (0 unless an extra file names
//! another owner), empty owner names and one fixed mtime. A name or link target longer than
//! the ustar fields, or that is not UTF-8, and a size of 8 GiB or more go into a PAX
//! extended header written just before the entry (raw bytes kept, `hdrcharset=BINARY` for
//! non-UTF-8 names). Hard links are never written: a hard-linked file is a regular file.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tar::{EntryType, Header};
use walkdir::WalkDir;

use crate::closure::STORE_DIR;
use crate::error::{Error, IoContext, Result};

/// The largest size the 11 octal digits of a ustar header hold, plus one.
const USTAR_SIZE_LIMIT: u64 = 8 * 1024 * 1024 * 1024;
/// The width of the ustar name and link name fields.
const USTAR_NAME_LEN: usize = 100;
/// The fixed name of every PAX extended header entry (as GNU tar names them, minus the pid).
const PAX_HEADER_NAME: &[u8] = b"././@PaxHeader";

/// Modes of the store layers: what the Nix store itself holds, whatever the host reports.
const STORE_DIR_MODE: u32 = 0o555;
const STORE_EXEC_MODE: u32 = 0o555;
const STORE_FILE_MODE: u32 = 0o444;
/// `/nix` and `/nix/store` must be traversable by a non-root image user.
const NIX_DIR_MODE: u32 = 0o755;
const SYMLINK_MODE: u32 = 0o777;

/// The owner of an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: u64,
    pub gid: u64,
}

/// Writes deterministic tar entries into `W`.
pub struct TarWriter<W: Write> {
    builder: tar::Builder<W>,
    mtime: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(inner: W, mtime: u64) -> Self {
        Self { builder: tar::Builder::new(inner), mtime }
    }

    /// A directory; `name` has no trailing slash.
    pub fn dir(&mut self, name: &[u8], mode: u32, owner: Owner) -> io::Result<()> {
        let mut name = name.to_vec();
        name.push(b'/');
        self.entry(EntryType::Directory, &name, None, mode, owner, 0, io::empty())
    }

    pub fn symlink(&mut self, name: &[u8], target: &[u8], owner: Owner) -> io::Result<()> {
        self.entry(EntryType::Symlink, name, Some(target), SYMLINK_MODE, owner, 0, io::empty())
    }

    /// A regular file of exactly `size` bytes read from `data`.
    pub fn file(
        &mut self,
        name: &[u8],
        mode: u32,
        owner: Owner,
        size: u64,
        data: impl Read,
    ) -> io::Result<u64> {
        let mut counted = Counted { inner: data.take(size), count: 0 };
        self.entry(EntryType::Regular, name, None, mode, owner, size, &mut counted)?;
        Ok(counted.count)
    }

    /// Ends the archive and gives back the writer.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }

    #[allow(clippy::too_many_arguments)] // One private place that fills a header.
    fn entry(
        &mut self,
        kind: EntryType,
        name: &[u8],
        link: Option<&[u8]>,
        mode: u32,
        owner: Owner,
        size: u64,
        data: impl Read,
    ) -> io::Result<()> {
        let pax = pax_records(name, link, size);
        if !pax.is_empty() {
            let mut header =
                self.header(EntryType::XHeader, PAX_HEADER_NAME, 0o644, Owner::default());
            header.set_size(pax.len() as u64);
            header.set_cksum();
            self.builder.append(&header, pax.as_slice())?;
        }

        let mut header = self.header(kind, name, mode, owner);
        header.set_size(size);
        if let Some(link) = link {
            let field = &mut header.as_ustar_mut().expect("ustar header").linkname;
            copy_truncated(field, link);
        }
        header.set_cksum();
        self.builder.append(&header, data)
    }

    fn header(&self, kind: EntryType, name: &[u8], mode: u32, owner: Owner) -> Header {
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(owner.uid);
        header.set_gid(owner.gid);
        header.set_mtime(self.mtime);
        let ustar = header.as_ustar_mut().expect("ustar header");
        copy_truncated(&mut ustar.name, name);
        // Device numbers are written as octal zeros, as every tar writer does for files.
        ustar.dev_major.copy_from_slice(b"0000000\0");
        ustar.dev_minor.copy_from_slice(b"0000000\0");
        header
    }
}

/// Writes `/nix`, `/nix/store` and every file under `store_paths` (sorted, parents first).
pub fn write_store_paths<W: Write>(tar: &mut TarWriter<W>, store_paths: &[String]) -> Result<()> {
    let layer_name = |e: io::Error| Error::Write { path: "layer".into(), source: e };
    tar.dir(b"nix", NIX_DIR_MODE, Owner::default()).map_err(layer_name)?;
    tar.dir(b"nix/store", NIX_DIR_MODE, Owner::default()).map_err(layer_name)?;

    let mut sorted: Vec<&String> = store_paths.iter().collect();
    sorted.sort();
    for store_path in sorted {
        write_tree(tar, Path::new(store_path))?;
    }
    Ok(())
}

/// Writes the tree at `root` under its own absolute name, children sorted by their bytes.
fn write_tree<W: Write>(tar: &mut TarWriter<W>, root: &Path) -> Result<()> {
    let walk = WalkDir::new(root).follow_links(false).sort_by_file_name();
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_owned();
            Error::Read { path, source: e.into() }
        })?;
        let path = entry.path();
        let name = archive_name(path);
        let meta =
            entry.metadata().map_err(|e| Error::Read { path: path.into(), source: e.into() })?;
        let written = |e| Error::Write { path: path.into(), source: e };

        let kind = meta.file_type();
        if kind.is_dir() {
            tar.dir(&name, STORE_DIR_MODE, Owner::default()).map_err(written)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(path).reading(path)?;
            tar.symlink(&name, target.as_os_str().as_bytes(), Owner::default()).map_err(written)?;
        } else if kind.is_file() {
            let executable = meta.permissions().mode() & 0o111 != 0;
            let mode = if executable { STORE_EXEC_MODE } else { STORE_FILE_MODE };
            write_file(tar, path, &name, mode, Owner::default())?;
        } else {
            return Err(Error::UnsupportedFileType {
                path: path.into(),
                kind: special_kind(&kind),
            });
        }
    }
    Ok(())
}

/// Copies the regular file at `source` into the archive as `name`.
pub(crate) fn write_file<W: Write>(
    tar: &mut TarWriter<W>,
    source: &Path,
    name: &[u8],
    mode: u32,
    owner: Owner,
) -> Result<()> {
    let file = File::open(source).reading(source)?;
    let size = file.metadata().reading(source)?.len();
    let reader = BufReader::with_capacity(256 * 1024, file);
    let read = tar.file(name, mode, owner, size, reader).writing(source)?;
    if read != size {
        return Err(Error::FileChanged { path: source.into(), expected: size, read });
    }
    Ok(())
}

/// The name of a store file inside the archive: its absolute path without the leading `/`.
fn archive_name(path: &Path) -> Vec<u8> {
    debug_assert!(path.starts_with(STORE_DIR));
    let bytes = path.as_os_str().as_bytes();
    bytes.strip_prefix(b"/").unwrap_or(bytes).to_vec()
}

fn special_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_block_device() || kind.is_char_device() {
        "device node"
    } else if kind.is_fifo() {
        "named pipe"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// The PAX records `name`, `link` and `size` need, or nothing when ustar holds them.
fn pax_records(name: &[u8], link: Option<&[u8]>, size: u64) -> Vec<u8> {
    let needs_pax =
        |bytes: &[u8]| bytes.len() > USTAR_NAME_LEN || std::str::from_utf8(bytes).is_err();
    let binary = |bytes: &[u8]| std::str::from_utf8(bytes).is_err();

    let mut records = Vec::new();
    let any_binary = binary(name) || link.is_some_and(binary);
    if any_binary {
        records.extend(pax_record("hdrcharset", b"BINARY"));
    }
    if needs_pax(name) {
        records.extend(pax_record("path", name));
    }
    if let Some(link) = link.filter(|l| needs_pax(l)) {
        records.extend(pax_record("linkpath", link));
    }
    if size >= USTAR_SIZE_LIMIT {
        records.extend(pax_record("size", size.to_string().as_bytes()));
    }
    records
}

/// One `"<len> <key>=<value>\n"` record, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

fn copy_truncated(field: &mut [u8], bytes: &[u8]) {
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
    field[n..].fill(0);
}

/// A reader that counts what went through it.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &[u8]) -> Vec<(Vec<u8>, EntryType, u32, u64)> {
        let mut reader = tar::Archive::new(archive);
        reader
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (e.path_bytes().into_owned(), h.entry_type(), h.mode().unwrap(), e.size())
            })
            .collect()
    }

    #[test]
    fn pax_record_length_counts_itself() {
        assert_eq!(pax_record("path", b"abc"), b"12 path=abc\n");
        // 3 + 1 + 4 + 1 + 92 + 1 = 102: the length grows a digit and stays consistent.
        let record = pax_record("path", &[b'a'; 92]);
        assert!(record.starts_with(b"102 path="), "{:?}", String::from_utf8_lossy(&record));
        assert_eq!(record.len(), 102);
    }

    #[test]
    fn long_and_non_utf8_names_keep_their_bytes() {
        let long = [b'x'; 150];
        let odd = b"caf\xe9".to_vec();
        let mut tar = TarWriter::new(Vec::new(), 1);
        tar.file(&long, 0o444, Owner::default(), 2, &b"hi"[..]).unwrap();
        tar.file(&odd, 0o444, Owner::default(), 0, io::empty()).unwrap();
        tar.symlink(b"link", &long, Owner::default()).unwrap();
        let archive = tar.finish().unwrap();

        let got = entries(&archive);
        assert_eq!(got[0].0, long.to_vec());
        assert_eq!(got[0].3, 2);
        assert_eq!(got[1].0, odd);
        let mut reader = tar::Archive::new(archive.as_slice());
        let link = reader.entries().unwrap().nth(2).unwrap().unwrap();
        assert_eq!(link.link_name_bytes().unwrap().as_ref(), &long[..]);
    }

    #[test]
    fn the_same_input_gives_the_same_bytes_and_no_host_data() {
        let write = || {
            let mut tar = TarWriter::new(Vec::new(), 1);
            tar.dir(b"nix", 0o755, Owner::default()).unwrap();
            tar.file(b"nix/a", 0o555, Owner { uid: 1000, gid: 100 }, 1, &b"a"[..]).unwrap();
            tar.finish().unwrap()
        };
        let archive = write();
        assert_eq!(archive, write());

        let mut reader = tar::Archive::new(archive.as_slice());
        for entry in reader.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(h.mtime().unwrap(), 1);
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
        }
        assert_eq!(entries(&archive)[0].0, b"nix/");
    }

    #[test]
    fn huge_sizes_go_into_a_pax_record() {
        let records = pax_records(b"big", None, USTAR_SIZE_LIMIT);
        assert_eq!(records, b"19 size=8589934592\n");
        assert!(pax_records(b"small", None, USTAR_SIZE_LIMIT - 1).is_empty());
    }
}
