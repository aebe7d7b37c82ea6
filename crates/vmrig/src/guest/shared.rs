//! The host's side of the shared directory (see `vmrig_proto::shared`):
//! for one QEMU process, a thread answering its guest's requests on the
//! port named `SHARED_PORT` with the run's shared folder.
//!
//! Every request names its file by a path checked to be plain names; no
//! symbolic link inside the folder is followed (the host's user may make
//! one, the guest cannot), so a guest reaches nothing outside it.

use std::fs::{self, DirBuilder, File, FileTimes, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use vmrig_proto::shared::{SharedAttr, SharedEntry, SharedKind, SharedPath, SharedReply, SharedRequest};
use vmrig_proto::{read_frame, write_frame, FrameError, MAX_DATA};

/// The thread serving one QEMU's guest; dropping it (QEMU is gone or about
/// to be) disconnects the port and waits for the thread.
pub struct SharedServer {
    port: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl SharedServer {
    /// Serves requests arriving on `port` with the folder `dir`.
    pub fn start(port: UnixStream, dir: PathBuf) -> io::Result<Self> {
        let (reader, writer) = (port.try_clone()?, port.try_clone()?);
        let thread = std::thread::Builder::new().name("shared-dir".into()).spawn(move || serve(reader, writer, &dir))?;
        Ok(Self { port, thread: Some(thread) })
    }
}

impl Drop for SharedServer {
    fn drop(&mut self) {
        let _ = self.port.shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers requests until the port closes.
fn serve(mut reader: UnixStream, mut writer: UnixStream, dir: &Path) {
    loop {
        let reply = match read_frame::<SharedRequest>(&mut reader) {
            Ok((request, data)) => answer(dir, request, &data),
            // A path that climbs out, or a request of a later agent.
            Err(FrameError::Malformed(_)) => Ok((SharedReply::Failed { errno: nix::libc::EINVAL }, Vec::new())),
            Err(_) => return,
        };
        let (reply, data) = reply.unwrap_or_else(|error| (SharedReply::Failed { errno: error.raw_os_error().unwrap_or(nix::libc::EIO) }, Vec::new()));
        if write_frame(&mut writer, &reply, &data).is_err() {
            return;
        }
    }
}

/// Carries out one request on the folder `dir`.
fn answer(dir: &Path, request: SharedRequest, data: &[u8]) -> io::Result<(SharedReply, Vec<u8>)> {
    let attr_of = |path: &Path| Ok((SharedReply::Attr { attr: attr(&fs::symlink_metadata(path)?) }, Vec::new()));
    match request {
        SharedRequest::Stat { path } => attr_of(&resolve(dir, &path)?),
        SharedRequest::List { path } => {
            let mut entries = Vec::new();
            for dirent in fs::read_dir(resolve(dir, &path)?)? {
                let dirent = dirent?;
                // A name the guest could not ask for again is not shown.
                let Ok(name) = dirent.file_name().into_string() else { continue };
                entries.push(SharedEntry { name, attr: attr(&dirent.metadata()?) });
            }
            Ok((SharedReply::Entries { entries }, Vec::new()))
        }
        SharedRequest::Read { path, offset, len } => {
            let file = open(&resolve(dir, &path)?, OpenOptions::new().read(true))?;
            let mut contents = vec![0; len.min(MAX_DATA) as usize];
            let mut filled = 0;
            while filled < contents.len() {
                match file.read_at(&mut contents[filled..], offset + filled as u64)? {
                    0 => break,
                    read => filled += read,
                }
            }
            contents.truncate(filled);
            Ok((SharedReply::Data, contents))
        }
        SharedRequest::Write { path, offset } => {
            let file = open(&resolve(dir, &path)?, OpenOptions::new().write(true))?;
            file.write_all_at(data, offset)?;
            Ok((SharedReply::Written { len: data.len() as u32 }, Vec::new()))
        }
        SharedRequest::Create { path, mode } => {
            let path = resolve(dir, &path)?;
            // The host's user keeps the right to read and remove what a
            // guest leaves.
            open(&path, OpenOptions::new().write(true).create_new(true).mode(mode | 0o600))?;
            attr_of(&path)
        }
        SharedRequest::MakeDir { path, mode } => {
            let path = resolve(dir, &path)?;
            DirBuilder::new().mode(mode | 0o700).create(&path)?;
            attr_of(&path)
        }
        SharedRequest::Remove { path } => {
            fs::remove_file(resolve(dir, &path)?)?;
            Ok((SharedReply::Done, Vec::new()))
        }
        SharedRequest::RemoveDir { path } => {
            fs::remove_dir(resolve(dir, &path)?)?;
            Ok((SharedReply::Done, Vec::new()))
        }
        SharedRequest::Rename { from, to } => {
            fs::rename(resolve(dir, &from)?, resolve(dir, &to)?)?;
            Ok((SharedReply::Done, Vec::new()))
        }
        SharedRequest::SetAttr { path, len, mode, accessed_ns, modified_ns } => {
            let path = resolve(dir, &path)?;
            let file = open(&path, OpenOptions::new().read(len.is_none()).write(len.is_some()))?;
            if let Some(len) = len {
                file.set_len(len)?;
            }
            if let Some(mode) = mode {
                file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
            }
            let mut times = FileTimes::new();
            if let Some(ns) = accessed_ns {
                times = times.set_accessed(system_time(ns));
            }
            if let Some(ns) = modified_ns {
                times = times.set_modified(system_time(ns));
            }
            file.set_times(times)?;
            attr_of(&path)
        }
    }
}

/// `path` inside `dir`, refusing it when a folder on the way is a
/// symbolic link (the last name is opened without following one).
fn resolve(dir: &Path, path: &SharedPath) -> io::Result<PathBuf> {
    let mut resolved = dir.to_path_buf();
    let mut names = path.names().peekable();
    while let Some(name) = names.next() {
        resolved.push(name);
        if names.peek().is_some() && fs::symlink_metadata(&resolved).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io::Error::from_raw_os_error(nix::libc::ELOOP));
        }
    }
    Ok(resolved)
}

/// Opens `path` with `options`, never through a symbolic link.
fn open(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    options.custom_flags(nix::libc::O_NOFOLLOW).open(path)
}

fn attr(metadata: &Metadata) -> SharedAttr {
    let kind = if metadata.file_type().is_symlink() {
        SharedKind::Other
    } else if metadata.is_dir() {
        SharedKind::Dir
    } else if metadata.is_file() {
        SharedKind::File
    } else {
        SharedKind::Other
    };
    let ns = |seconds: i64, nanos: i64| seconds.saturating_mul(1_000_000_000).saturating_add(nanos);
    SharedAttr {
        kind,
        len: metadata.len(),
        mode: metadata.mode() & 0o7777,
        accessed_ns: ns(metadata.atime(), metadata.atime_nsec()),
        modified_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
        changed_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
    }
}

fn system_time(ns: i64) -> std::time::SystemTime {
    let since = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + since
    } else {
        UNIX_EPOCH - since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> SharedPath {
        SharedPath::try_from(p.to_string()).unwrap()
    }

    fn ask(dir: &Path, request: SharedRequest, data: &[u8]) -> (SharedReply, Vec<u8>) {
        answer(dir, request, data).unwrap_or_else(|e| (SharedReply::Failed { errno: e.raw_os_error().unwrap() }, Vec::new()))
    }

    #[test]
    fn files_are_made_written_read_renamed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        assert!(matches!(ask(dir, SharedRequest::MakeDir { path: path("d"), mode: 0o755 }, &[]).0, SharedReply::Attr { .. }));
        assert!(matches!(ask(dir, SharedRequest::Create { path: path("d/f"), mode: 0o644 }, &[]).0, SharedReply::Attr { .. }));
        assert_eq!(ask(dir, SharedRequest::Create { path: path("d/f"), mode: 0o644 }, &[]).0, SharedReply::Failed { errno: nix::libc::EEXIST });
        assert_eq!(ask(dir, SharedRequest::Write { path: path("d/f"), offset: 3 }, b"lo").0, SharedReply::Written { len: 2 });
        assert_eq!(ask(dir, SharedRequest::Write { path: path("d/f"), offset: 0 }, b"hel").0, SharedReply::Written { len: 3 });
        assert_eq!(ask(dir, SharedRequest::Read { path: path("d/f"), offset: 1, len: 3 }, &[]), (SharedReply::Data, b"ell".to_vec()));
        assert_eq!(fs::read(dir.join("d/f")).unwrap(), b"hello");
        let set = SharedRequest::SetAttr { path: path("d/f"), len: Some(2), mode: Some(0o600), accessed_ns: None, modified_ns: Some(1_000_000_000) };
        let SharedReply::Attr { attr } = ask(dir, set, &[]).0 else { panic!("no attributes") };
        assert_eq!((attr.len, attr.mode, attr.modified_ns), (2, 0o600, 1_000_000_000));
        assert_eq!(ask(dir, SharedRequest::Rename { from: path("d"), to: path("e") }, &[]).0, SharedReply::Done);
        let SharedReply::Entries { entries } = ask(dir, SharedRequest::List { path: path("e") }, &[]).0 else { panic!("no entries") };
        assert_eq!(entries.iter().map(|e| (e.name.as_str(), e.attr.kind)).collect::<Vec<_>>(), [("f", SharedKind::File)]);
        assert_eq!(ask(dir, SharedRequest::RemoveDir { path: path("e") }, &[]).0, SharedReply::Failed { errno: nix::libc::ENOTEMPTY });
        assert_eq!(ask(dir, SharedRequest::Remove { path: path("e/f") }, &[]).0, SharedReply::Done);
        assert_eq!(ask(dir, SharedRequest::RemoveDir { path: path("e") }, &[]).0, SharedReply::Done);
        assert_eq!(ask(dir, SharedRequest::Stat { path: path("e") }, &[]).0, SharedReply::Failed { errno: nix::libc::ENOENT });
    }

    #[test]
    fn no_symbolic_link_leads_out() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "no").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("secret")).unwrap();
        let read = |p: &str| ask(dir.path(), SharedRequest::Read { path: path(p), offset: 0, len: 10 }, &[]).0;
        assert_eq!(read("out/secret"), SharedReply::Failed { errno: nix::libc::ELOOP });
        assert_eq!(read("secret"), SharedReply::Failed { errno: nix::libc::ELOOP });
        let write = ask(dir.path(), SharedRequest::Write { path: path("secret"), offset: 0 }, b"yes").0;
        assert_eq!(write, SharedReply::Failed { errno: nix::libc::ELOOP });
        let SharedReply::Attr { attr } = ask(dir.path(), SharedRequest::Stat { path: path("out") }, &[]).0 else { panic!("no attributes") };
        assert_eq!(attr.kind, SharedKind::Other);
        assert_eq!(fs::read_to_string(outside.path().join("secret")).unwrap(), "no");
    }

    #[test]
    fn a_request_over_the_port_is_answered_and_a_bad_path_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("note"), "shared").unwrap();
        let (host, mut guest) = UnixStream::pair().unwrap();
        let server = SharedServer::start(host, dir.path().to_path_buf()).unwrap();
        write_frame(&mut guest, &SharedRequest::Read { path: path("note"), offset: 0, len: 100 }, &[]).unwrap();
        assert_eq!(read_frame::<SharedReply>(&mut guest).unwrap(), (SharedReply::Data, b"shared".to_vec()));
        let climbing = br#"{"op":"stat","path":"../etc"}"#;
        let frame = [&(climbing.len() as u32).to_le_bytes()[..], &0u32.to_le_bytes(), climbing].concat();
        std::io::Write::write_all(&mut guest, &frame).unwrap();
        assert_eq!(read_frame::<SharedReply>(&mut guest).unwrap().0, SharedReply::Failed { errno: nix::libc::EINVAL });
        drop(server);
    }
}
