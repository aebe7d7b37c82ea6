//! The shared directory at `/tmp/shared` (see `vmrig_proto::shared`): a
//! FUSE filesystem whose every operation is one request to the host.
//!
//! Nothing is cached in the guest (attributes and entries live for no
//! time, pages are dropped at each open), so what one node writes the next
//! command on another reads. The only state here is which inode number
//! stands for which path.
//!
//! It is mounted once `local-fs.target` is reached, so that a `/tmp` that
//! systemd mounts (a tmpfs, on newer Debian) does not hide it; commands
//! wait for the mount.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, SessionACL,
    TimeOrNow, WriteFlags,
};
use nix::mount::{mount, MsFlags};
use vmrig_proto::shared::{SharedAttr, SharedKind, SharedPath, SharedReply, SharedRequest, SHARED_MOUNT, SHARED_PORT};
use vmrig_proto::{read_frame, write_frame, Reply};

/// How long a command waits for the mount before it runs anyway.
const MOUNT_WAIT: Duration = Duration::from_secs(120);

/// Where the mount stands in this boot.
enum MountState {
    NotAsked,
    Mounting,
    Mounted,
    Failed,
}

/// The shared directory's mount, asked for by the driver once a boot.
pub struct SharedMount {
    state: Mutex<MountState>,
    changed: Condvar,
}

impl SharedMount {
    /// Not mounted.
    pub const fn new() -> Self {
        Self { state: Mutex::new(MountState::NotAsked), changed: Condvar::new() }
    }

    /// Starts mounting (unless asked before) and answers at once.
    pub fn serve(&'static self) -> Reply {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, MountState::NotAsked) {
            return Reply::Ack;
        }
        if !crate::ports::exists(SHARED_PORT) {
            return Reply::Error { message: format!("this machine has no port named {SHARED_PORT}") };
        }
        *state = MountState::Mounting;
        std::thread::spawn(move || {
            let ended = mount_and_serve(|| self.settle(MountState::Mounted));
            if let Err(error) = ended {
                eprintln!("vmrig-agent: the shared directory {SHARED_MOUNT}: {error}");
            }
            self.settle(MountState::Failed);
        });
        Reply::Ack
    }

    fn settle(&self, to: MountState) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, MountState::Mounting) {
            *state = to;
            self.changed.notify_all();
        }
    }

    /// Waits while the mount is under way (for [`MOUNT_WAIT`] at most).
    pub fn wait(&self) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let waited = self.changed.wait_timeout_while(state, MOUNT_WAIT, |state| matches!(state, MountState::Mounting));
        drop(waited);
    }
}

/// Waits for `local-fs.target`, mounts the filesystem, calls `mounted`
/// and serves it until the guest stops.
fn mount_and_serve(mounted: impl FnOnce()) -> Result<(), String> {
    wait_for_local_filesystems()?;
    let fuse = File::options().read(true).write(true).open("/dev/fuse").map_err(|e| format!("cannot open /dev/fuse: {e}"))?;
    std::fs::create_dir_all(SHARED_MOUNT).map_err(|e| format!("cannot make the mount point: {e}"))?;
    let options = format!("fd={},rootmode=40755,user_id=0,group_id=0,allow_other", fuse.as_raw_fd());
    mount(Some("vmrig-shared"), SHARED_MOUNT, Some("fuse.vmrig-shared"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
        .map_err(|e| format!("cannot mount: {e}"))?;
    let host = crate::ports::open(SHARED_PORT).map_err(|e| format!("cannot open the port {SHARED_PORT}: {e}"))?;
    let filesystem = SharedFs { host: Mutex::new(host), inodes: Mutex::new(Inodes::default()) };
    let session = Session::from_fd(filesystem, fuse.into(), SessionACL::All, Config::default()).map_err(|e| format!("FUSE handshake: {e}"))?;
    mounted();
    session.run().map_err(|e| format!("FUSE session ended: {e}"))
}

/// Waits until systemd has mounted the local filesystems (at once in a
/// restored node, whose boot is long past that).
fn wait_for_local_filesystems() -> Result<(), String> {
    crate::systemd::wait_for_target("local-fs.target", MOUNT_WAIT)
}

/// Which inode number stands for which path; the root is number 1.
struct Inodes {
    paths: HashMap<u64, SharedPath>,
    numbers: HashMap<SharedPath, u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        let root = SharedPath::root();
        Self { paths: HashMap::from([(1, root.clone())]), numbers: HashMap::from([(root, 1)]), next: 2 }
    }
}

impl Inodes {
    fn path(&self, ino: INodeNo) -> Result<SharedPath, Errno> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<SharedPath, Errno> {
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        self.path(parent)?.join(name).map_err(|_| Errno::EINVAL)
    }

    fn number(&mut self, path: &SharedPath) -> INodeNo {
        if let Some(&number) = self.numbers.get(path) {
            return INodeNo(number);
        }
        let number = self.next;
        self.next += 1;
        self.paths.insert(number, path.clone());
        self.numbers.insert(path.clone(), number);
        INodeNo(number)
    }

    /// Forgets `path` and what lies below it: it is gone.
    fn removed(&mut self, path: &SharedPath) {
        self.numbers.retain(|known, number| {
            let gone = known.is_within(path);
            if gone {
                self.paths.remove(number);
            }
            !gone
        });
    }

    fn renamed(&mut self, from: &SharedPath, to: &SharedPath) {
        self.removed(to);
        let moved: Vec<(SharedPath, SharedPath)> =
            self.numbers.keys().filter_map(|known| known.moved(from, to).map(|new| (known.clone(), new))).collect();
        for (old, new) in moved {
            let number = self.numbers.remove(&old).expect("listed above");
            self.paths.insert(number, new.clone());
            self.numbers.insert(new, number);
        }
    }
}

/// Nothing is cached: another node may change any entry at any time.
const NO_CACHE: Duration = Duration::ZERO;

struct SharedFs {
    /// The port to the host; one request and its reply at a time.
    host: Mutex<File>,
    inodes: Mutex<Inodes>,
}

impl SharedFs {
    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    // Each lookup takes the table's lock for itself alone: an answer's
    // attributes need it again.
    fn path(&self, ino: INodeNo) -> Result<SharedPath, Errno> {
        self.inodes().path(ino)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<SharedPath, Errno> {
        self.inodes().child(parent, name)
    }

    fn ask(&self, request: &SharedRequest, data: &[u8]) -> Result<(SharedReply, Vec<u8>), Errno> {
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        // The host may be away (a restore, a reconnection): the caller
        // gets EIO and the next request tries again.
        write_frame(&mut *host, request, data).map_err(|_| Errno::EIO)?;
        match read_frame(&mut *host) {
            Ok((SharedReply::Failed { errno }, _)) => Err(Errno::from_i32(errno)),
            Ok(reply) => Ok(reply),
            Err(_) => Err(Errno::EIO),
        }
    }

    /// Asks for something that answers with attributes, and gives them
    /// with the inode number of `path`.
    fn attr_of(&self, request: &SharedRequest, path: &SharedPath) -> Result<FileAttr, Errno> {
        match self.ask(request, &[])? {
            (SharedReply::Attr { attr }, _) => Ok(file_attr(self.inodes().number(path), &attr)),
            _ => Err(Errno::EIO),
        }
    }

    fn stat(&self, path: &SharedPath) -> Result<FileAttr, Errno> {
        self.attr_of(&SharedRequest::Stat { path: path.clone() }, path)
    }

    fn done(&self, request: &SharedRequest) -> Result<(), Errno> {
        self.ask(request, &[]).map(drop)
    }
}

fn time(ns: i64) -> SystemTime {
    let since = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + since
    } else {
        UNIX_EPOCH - since
    }
}

fn ns(time: TimeOrNow) -> i64 {
    let time = match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    };
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i64,
        Err(before) => -(before.duration().as_nanos() as i64),
    }
}

/// What the kernel is told an entry is: anything but a directory (which
/// the host never opens) is a file.
fn file_type(kind: SharedKind) -> FileType {
    match kind {
        SharedKind::Dir => FileType::Directory,
        SharedKind::File | SharedKind::Other => FileType::RegularFile,
    }
}

/// The attributes the kernel is given: everything belongs to root and is
/// open to every user, as on NixOS's shared directory (no permission is
/// checked here, and none by the kernel: no `default_permissions`).
fn file_attr(ino: INodeNo, attr: &SharedAttr) -> FileAttr {
    let kind = file_type(attr.kind);
    FileAttr {
        ino,
        size: attr.len,
        blocks: attr.len.div_ceil(512),
        atime: time(attr.accessed_ns),
        mtime: time(attr.modified_ns),
        ctime: time(attr.changed_ns),
        crtime: time(attr.modified_ns),
        kind,
        perm: (attr.mode & 0o7777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for SharedFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // A write comes whole in one frame.
        let _ = config.set_max_write(vmrig_proto::MAX_DATA);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|path| self.stat(&path)) {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|path| self.stat(&path)) {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // An owner cannot be kept (everything is root's): `chown` does
        // nothing and succeeds, as on a filesystem without owners.
        let set = self.path(ino).and_then(|path| {
            let request = SharedRequest::SetAttr {
                path: path.clone(),
                len: size,
                mode,
                accessed_ns: atime.map(ns),
                modified_ns: mtime.map(ns),
            };
            self.attr_of(&request, &path)
        });
        match set {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let made = self.child(parent, name).and_then(|path| self.attr_of(&SharedRequest::MakeDir { path: path.clone(), mode: mode & !umask }, &path));
        match made {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self.child(parent, name).and_then(|path| {
            self.done(&SharedRequest::Remove { path: path.clone() })?;
            self.inodes().removed(&path);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self.child(parent, name).and_then(|path| {
            self.done(&SharedRequest::RemoveDir { path: path.clone() })?;
            self.inodes().removed(&path);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // RENAME_NOREPLACE and RENAME_EXCHANGE cannot be done by path.
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let renamed = (|| {
            let (from, to) = {
                let inodes = self.inodes();
                (inodes.child(parent, name)?, inodes.child(newparent, newname)?)
            };
            self.done(&SharedRequest::Rename { from: from.clone(), to: to.clone() })?;
            self.inodes().renamed(&from, &to);
            Ok(())
        })();
        match renamed {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Without FOPEN_KEEP_CACHE the kernel drops the file's pages at
        // each open: another node may have written it since.
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = self.path(ino).and_then(|path| self.ask(&SharedRequest::Read { path, offset, len: size.min(vmrig_proto::MAX_DATA) }, &[]));
        match read {
            Ok((SharedReply::Data, data)) => reply.data(&data),
            Ok(_) => reply.error(Errno::EIO),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let written = self.path(ino).and_then(|path| self.ask(&SharedRequest::Write { path, offset }, data));
        match written {
            Ok((SharedReply::Written { len }, _)) => reply.written(len),
            Ok(_) => reply.error(Errno::EIO),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Every write reached the host when it was made.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let entries = match self.ask(&SharedRequest::List { path: path.clone() }, &[]) {
            Ok((SharedReply::Entries { entries }, _)) => entries,
            Ok(_) => return reply.error(Errno::EIO),
            Err(errno) => return reply.error(errno),
        };
        let mut inodes = self.inodes();
        let listed = [(ino, FileType::Directory, ".".to_string()), (ino, FileType::Directory, "..".to_string())].into_iter().chain(
            entries.into_iter().filter_map(|entry| {
                let child = path.join(&entry.name).ok()?;
                Some((inodes.number(&child), file_type(entry.attr.kind), entry.name))
            }),
        );
        // The offset a later call resumes from is the entry's place + 1.
        for (place, (number, kind, name)) in listed.enumerate().skip(offset as usize) {
            if reply.add(number, place as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        let made = self.child(parent, name).and_then(|path| self.attr_of(&SharedRequest::Create { path: path.clone(), mode: mode & !umask }, &path));
        match made {
            Ok(attr) => reply.created(&NO_CACHE, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }
}
