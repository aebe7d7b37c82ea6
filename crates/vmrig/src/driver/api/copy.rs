//! `copy_from_host` and `copy_from_vm` (and `vmrig cp`): files and trees
//! between the host and a guest, with nothing the guest sends written
//! outside the folder it goes to.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use vmrig_proto::EntryKind;

use super::Failure;
use crate::guest::PathEntry;
use crate::machine::Machine;

/// `copy_from_host`: `source` on the host, a file or a tree, to `target`
/// in the guest, modes kept.
pub(in crate::driver) fn from_host(machine: &mut Machine, source: &Path, target: &str) -> Result<(), Failure> {
    let unreadable = |path: &Path, e: io::Error| Failure::Test(format!("cannot read {}: {e}", path.display()));
    let metadata = fs::metadata(source).map_err(|e| unreadable(source, e))?;
    let mode = metadata.permissions().mode() & 0o7777;
    if metadata.is_dir() {
        machine.make_dir(target, mode)?;
        let mut children: Vec<_> = fs::read_dir(source)
            .and_then(|d| d.collect::<io::Result<Vec<_>>>())
            .map_err(|e| unreadable(source, e))?;
        children.sort_by_key(|d| d.file_name());
        for child in children {
            let name = child.file_name().to_string_lossy().into_owned();
            from_host(machine, &child.path(), &format!("{}/{name}", target.trim_end_matches('/')))?;
        }
        Ok(())
    } else {
        let contents = fs::read(source).map_err(|e| unreadable(source, e))?;
        Ok(machine.write_file(target, mode, &contents)?)
    }
}

/// `relative` as a path that stays below its base: only plain components.
fn contained(relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| path.components().filter(|c| matches!(c, Component::Normal(_))).collect())
}

/// Receives guest `source` into `result/<target_dir>/<name of source>`.
pub(super) fn from_vm(machine: &mut Machine, result_dir: &Path, source: &str, target_dir: &str, log: &crate::runlog::RunLog) -> Result<(), Failure> {
    let base = contained(target_dir)
        .map(|dir| result_dir.join(dir))
        .ok_or_else(|| Failure::Test(format!("target_dir `{target_dir}` must be a relative path inside the result folder")))?;
    receive(machine, source, &base.join(source_name(source)?), log)
}

/// The last component of guest path `source`.
pub(in crate::driver) fn source_name(source: &str) -> Result<&std::ffi::OsStr, Failure> {
    Path::new(source).file_name().ok_or_else(|| Failure::Test(format!("`{source}` names no file")))
}

/// Receives guest `source` as host path `root` (a file, or a folder
/// holding the tree). Every path the guest names is checked to stay below
/// `root`, files are opened without following links, and links from the
/// guest are not recreated, so nothing the guest sends is written outside.
pub(in crate::driver) fn receive(machine: &mut Machine, source: &str, root: &Path, log: &crate::runlog::RunLog) -> Result<(), Failure> {
    let root = root.to_path_buf();
    let mut open: Option<(String, File)> = None;
    let mut store_entry = |entry: PathEntry<'_>| -> io::Result<()> {
        let relative = contained(entry.path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("the guest sent a path that leaves the result folder: `{}`", entry.path)))?;
        // Joining an empty path would add a trailing slash.
        let path = if relative.as_os_str().is_empty() { root.clone() } else { root.join(relative) };
        match entry.kind {
            EntryKind::Dir => fs::create_dir_all(&path),
            EntryKind::Symlink => {
                log.line(format!("not copying symbolic link {} (to {})", entry.path, String::from_utf8_lossy(entry.data)));
                Ok(())
            }
            EntryKind::File => {
                if open.as_ref().is_none_or(|(p, _)| p != entry.path) {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    let file = File::options()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(entry.mode & 0o777)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(&path)?;
                    open = Some((entry.path.to_string(), file));
                }
                let (_, file) = open.as_mut().expect("opened above");
                file.write_all(entry.data)?;
                if !entry.more {
                    open = None;
                }
                Ok(())
            }
        }
    };
    // After the first failure to store, the rest is received but not kept.
    let mut stored = Ok(());
    let received = machine.read_path(source, |entry| {
        if stored.is_ok() {
            stored = store_entry(entry);
        }
    });
    match received {
        Err(error) => Err(match error.agents_refusal() {
            Some(message) => Failure::Test(message.to_string()),
            None => error.into(),
        }),
        Ok(()) => stored.map_err(|error| Failure::Infra(format!("cannot store what {source} held: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_contained() {
        assert_eq!(contained("a/./b"), Some(PathBuf::from("a/b")));
        assert_eq!(contained(""), Some(PathBuf::new()));
        assert_eq!(contained("../x"), None);
        assert_eq!(contained("a/../../x"), None);
        assert_eq!(contained("/etc/passwd"), None);
    }
}
