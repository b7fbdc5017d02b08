//! Files outside the store that an image needs at its root: `/etc/passwd`, `/tmp`, a CA
//! bundle link, an entrypoint. They form one layer, the top one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tarball::{write_file, Owner, TarWriter};

const DEFAULT_DIR_MODE: u32 = 0o755;
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_EXEC_MODE: u32 = 0o755;

/// One extra file as `mkImage`'s `extraFiles` describes it: `path` and exactly one of
/// `text`, `source` (a file to copy), `symlink` (a target) or `directory = true`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFile {
    pub path: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub symlink: Option<String>,
    #[serde(default)]
    pub directory: bool,
    /// Octal, as a string: `"1777"`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub uid: u64,
    #[serde(default)]
    pub gid: u64,
}

enum Kind<'a> {
    Dir,
    Text(&'a str),
    Source(&'a Path),
    Symlink(&'a str),
}

struct Entry<'a> {
    kind: Kind<'a>,
    mode: u32,
    owner: Owner,
    /// A parent directory nobody listed: an explicit entry may replace it.
    implicit: bool,
}

/// Checks every extra file, so that bad input fails before any byte is written.
pub fn validate(files: &[ExtraFile]) -> Result<()> {
    plan(files).map(|_| ())
}

/// Writes the extra files, with their missing parent directories (0755, root), sorted.
pub fn write_extra_files<W: Write>(tar: &mut TarWriter<W>, files: &[ExtraFile]) -> Result<()> {
    for (name, entry) in plan(files)? {
        let written = |e| Error::Write { path: name.clone().into(), source: e };
        let bytes = name.as_bytes();
        match entry.kind {
            Kind::Dir => tar.dir(bytes, entry.mode, entry.owner).map_err(written)?,
            Kind::Symlink(target) => {
                tar.symlink(bytes, target.as_bytes(), entry.owner).map_err(written)?
            }
            Kind::Text(text) => {
                let size = text.len() as u64;
                tar.file(bytes, entry.mode, entry.owner, size, text.as_bytes()).map_err(written)?;
            }
            Kind::Source(source) => write_file(tar, source, bytes, entry.mode, entry.owner)?,
        }
    }
    Ok(())
}

/// Archive name (no leading `/`) -> entry, parents included; a `BTreeMap` sorts parents first.
fn plan(files: &[ExtraFile]) -> Result<BTreeMap<String, Entry<'_>>> {
    let mut entries: BTreeMap<String, Entry<'_>> = BTreeMap::new();
    for file in files {
        let bad =
            |reason: &str| Error::BadExtraFile { path: file.path.clone(), reason: reason.into() };
        let name = archive_name(&file.path).ok_or_else(|| {
            bad("the path must be absolute and normal (no `.`, `..` or trailing `/`), not `/` \
                and not under /nix")
        })?;

        let kind = match (&file.text, &file.source, &file.symlink, file.directory) {
            (Some(text), None, None, false) => Kind::Text(text),
            (None, Some(source), None, false) => Kind::Source(Path::new(source)),
            (None, None, Some(target), false) => Kind::Symlink(target),
            (None, None, None, true) => Kind::Dir,
            _ => {
                return Err(bad(
                    "give exactly one of `text`, `source`, `symlink` or `directory = true`",
                ))
            }
        };
        if let Kind::Source(source) = kind {
            if !source.is_file() {
                return Err(bad("`source` must be an existing regular file"));
            }
        }
        let mode = match &file.mode {
            Some(mode) => {
                parse_mode(mode).ok_or_else(|| bad("`mode` must be octal, at most 7777"))?
            }
            None => default_mode(&kind).map_err(|reason| bad(&reason))?,
        };

        let entry =
            Entry { kind, mode, owner: Owner { uid: file.uid, gid: file.gid }, implicit: false };
        match entries.get(&name) {
            Some(existing) if existing.implicit && matches!(entry.kind, Kind::Dir) => {}
            Some(existing) if existing.implicit => {
                return Err(bad("the path is a parent of another entry but not a directory"))
            }
            Some(_) => return Err(bad("the path is given twice")),
            None => {}
        }
        add_parents(&mut entries, &name)
            .map_err(|_| bad("a parent of the path is not a directory"))?;
        entries.insert(name, entry);
    }
    Ok(entries)
}

fn archive_name(path: &str) -> Option<String> {
    let p = Path::new(path);
    let normal = p.components().skip(1).all(|c| matches!(c, Component::Normal(_)));
    let ok =
        p.is_absolute() && normal && path != "/" && !path.ends_with('/') && !p.starts_with("/nix");
    ok.then(|| path[1..].to_owned())
}

fn parse_mode(mode: &str) -> Option<u32> {
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o7777)
}

fn default_mode(kind: &Kind<'_>) -> std::result::Result<u32, String> {
    use std::os::unix::fs::PermissionsExt;
    Ok(match kind {
        Kind::Dir => DEFAULT_DIR_MODE,
        Kind::Text(_) => DEFAULT_FILE_MODE,
        Kind::Symlink(_) => 0o777,
        Kind::Source(source) => {
            let meta = source.metadata().map_err(|e| format!("cannot read `source`: {e}"))?;
            if meta.permissions().mode() & 0o111 != 0 {
                DEFAULT_EXEC_MODE
            } else {
                DEFAULT_FILE_MODE
            }
        }
    })
}

/// Implicit parents are recorded with the default directory mode and root as owner.
fn add_parents(
    entries: &mut BTreeMap<String, Entry<'_>>,
    name: &str,
) -> std::result::Result<(), ()> {
    let mut parent = Path::new(name).parent();
    while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
        let key = dir.to_string_lossy().into_owned();
        match entries.get(&key) {
            Some(Entry { kind: Kind::Dir, .. }) => {}
            Some(_) => return Err(()),
            None => {
                let implicit = Entry {
                    kind: Kind::Dir,
                    mode: DEFAULT_DIR_MODE,
                    owner: Owner::default(),
                    implicit: true,
                };
                entries.insert(key, implicit);
            }
        }
        parent = dir.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> ExtraFile {
        ExtraFile {
            path: path.into(),
            text: Some("x".into()),
            source: None,
            symlink: None,
            directory: false,
            mode: None,
            uid: 0,
            gid: 0,
        }
    }

    fn listing(files: &[ExtraFile]) -> Vec<(String, u32)> {
        let mut tar = TarWriter::new(Vec::new(), 1);
        write_extra_files(&mut tar, files).unwrap();
        let bytes = tar.finish().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap())
            })
            .collect()
    }

    #[test]
    fn parents_come_first_and_explicit_modes_win() {
        let tmp =
            ExtraFile { directory: true, text: None, mode: Some("1777".into()), ..file("/tmp") };
        let got = listing(&[file("/etc/ssl/certs/ca.crt"), tmp, file("/etc/passwd")]);
        let expected = [
            ("etc/", 0o755),
            ("etc/passwd", 0o644),
            ("etc/ssl/", 0o755),
            ("etc/ssl/certs/", 0o755),
            ("etc/ssl/certs/ca.crt", 0o644),
            ("tmp/", 0o1777),
        ];
        let expected: Vec<_> = expected.iter().map(|(n, m)| (n.to_string(), *m)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn bad_extra_files_are_named() {
        let check = |f: ExtraFile, reason: &str| {
            let err = validate(&[f]).unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
        };
        check(file("etc/passwd"), "must be absolute");
        check(file("/nix/store/x"), "not under /nix");
        check(file("/a/../b"), "must be absolute");
        check(ExtraFile { symlink: Some("/x".into()), ..file("/a") }, "exactly one");
        check(ExtraFile { mode: Some("888".into()), ..file("/a") }, "octal");
        check(
            ExtraFile { text: None, source: Some("/nonexistent".into()), ..file("/a") },
            "existing",
        );
        let err = validate(&[file("/a"), file("/a/b")]).unwrap_err().to_string();
        assert!(err.contains("parent"), "{err}");
        let err = validate(&[file("/a"), file("/a")]).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
    }
}
