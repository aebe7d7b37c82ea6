//! A container's root: the node's image, read-only and owned inside by
//! the container's root (an idmapped mount), under a writable layer kept
//! in the node's folder, assembled in a mount namespace of the container's
//! own: every mount goes when the container's last process ends, however
//! vmrig ends.
//!
//! The host prepares what needs no namespace ([`Root::prepare`]: a loop
//! device that detaches itself once unmounted, a user namespace that maps
//! the container's IDs, the folders); the child that becomes
//! `systemd-nspawn` makes the mounts between fork and exec
//! ([`Root::assemble_in_child`]), with system calls alone.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::libc;

/// How many user and group IDs a container gets, from its base.
pub const ID_RANGE: u32 = 65536;

/// `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE` and the flags of a loop device
/// that is read-only and detaches itself when its last user lets go.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `mount_setattr`'s and `open_tree`'s constants, which libc lacks.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// What a container's root is made of, ready to be mounted in its child.
pub struct Root {
    /// The loop device holding the image, open until the child has
    /// mounted it; it detaches once that mount is gone.
    _loop_device: File,
    loop_path: CString,
    /// A user namespace mapping the container's IDs, for the idmapped
    /// mount of the image.
    user_namespace: OwnedFd,
    lower: CString,
    fstype: CString,
    root: CString,
    overlay_options: CString,
    /// The folder `systemd-nspawn` is given.
    pub dir: PathBuf,
}

impl Root {
    /// Prepares the root of a container whose IDs start at `base`: `image`
    /// (a `fstype` filesystem) read-only under a writable layer in
    /// `folder`, which keeps it across the container's restarts.
    pub fn prepare(image: &Path, fstype: &str, folder: &Path, base: u32) -> io::Result<Self> {
        fs::create_dir_all(folder)?;
        if nix::sys::statfs::statfs(folder).map_err(io::Error::from)?.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC {
            // The kernel refuses it with EINVAL alone (inside Docker, say,
            // or a VM whose root is an overlay).
            return Err(io::Error::other(format!(
                "its writable layer would be in {}, on an overlayfs, which cannot be an overlay's upper layer: set TMPDIR (or VMRIG_STORE, with --keep-state) to a folder on another filesystem, such as a tmpfs",
                folder.display()
            )));
        }
        let (loop_device, loop_path) = attach_loop(image)?;
        let user_namespace = user_namespace(base)?;
        let [lower, upper, work, root] = ["lower", "upper", "work", "root"].map(|name| folder.join(name));
        for dir in [&lower, &upper, &work, &root] {
            fs::create_dir_all(dir)?;
        }
        // The layer belongs to the container's root, as the image's files
        // do through the idmapped mount.
        for dir in [&upper, &work] {
            std::os::unix::fs::chown(dir, Some(base), Some(base))?;
        }
        let overlay = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        Ok(Self {
            _loop_device: loop_device,
            loop_path,
            user_namespace,
            lower: c_path(&lower)?,
            fstype: CString::new(fstype).map_err(io::Error::other)?,
            root: c_path(&root)?,
            overlay_options: CString::new(overlay).map_err(io::Error::other)?,
            dir: root,
        })
    }

    /// Makes `command`'s child assemble the root in a mount namespace of
    /// its own before it runs.
    pub fn assemble_in_child(&self, command: &mut Command) {
        let (loop_path, lower, fstype, root, options) = (self.loop_path.clone(), self.lower.clone(), self.fstype.clone(), self.root.clone(), self.overlay_options.clone());
        let userns = self.user_namespace.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only makes
        // system calls, on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || assemble(&loop_path, &lower, &fstype, &root, &options, userns));
        }
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn check(result: libc::c_long) -> io::Result<libc::c_long> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(result) }
}

/// In the child: a private mount namespace, the image, its idmapped
/// clone over it, and the overlay.
fn assemble(loop_path: &CString, lower: &CString, fstype: &CString, root: &CString, options: &CString, userns: i32) -> io::Result<()> {
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: each call gets NUL-terminated strings and structures that
    // live through it; none keeps a pointer.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS).into())?;
        check(libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()).into())?;
        check(libc::mount(loop_path.as_ptr(), lower.as_ptr(), fstype.as_ptr(), libc::MS_RDONLY, std::ptr::null()).into())?;
        let tree = check(libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, lower.as_ptr(), OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint))? as i32;
        let attr = MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns as u64 };
        check(libc::syscall(libc::SYS_mount_setattr, tree, c"".as_ptr(), libc::AT_EMPTY_PATH, &attr, std::mem::size_of::<MountAttr>()))?;
        check(libc::syscall(libc::SYS_move_mount, tree, c"".as_ptr(), libc::AT_FDCWD, lower.as_ptr(), MOVE_MOUNT_F_EMPTY_PATH))?;
        libc::close(tree);
        check(libc::mount(c"overlay".as_ptr(), root.as_ptr(), c"overlay".as_ptr(), 0, options.as_ptr().cast()).into())?;
    }
    Ok(())
}

/// A free loop device made of `image`, read-only, detaching itself once
/// its last user lets go.
fn attach_loop(image: &Path) -> io::Result<(File, CString)> {
    let backing = File::open(image)?;
    let control = File::options().read(true).write(true).open("/dev/loop-control")?;
    loop {
        // SAFETY: an ioctl with no argument on a descriptor we own.
        let number = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) }.into())?;
        let path = format!("/dev/loop{number}");
        let device = File::options().read(true).open(&path)?;
        // SAFETY: zeroes are a valid value of these plain C structures.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = backing.as_raw_fd() as u32;
        config.info.flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads the structure, which lives through the call.
        match check(unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) }.into()) {
            Ok(_) => return Ok((device, CString::new(path).map_err(io::Error::other)?)),
            // Another process took it between the two calls.
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(error) => return Err(error),
        }
    }
}

/// A user namespace mapping IDs 0 to 65535 to `base` onwards: a process
/// made into a new user namespace, mapped, its namespace kept, and the
/// process ended.
fn user_namespace(base: u32) -> io::Result<OwnedFd> {
    let mut holder = Command::new("sleep");
    holder.arg("60");
    // SAFETY: unshare is a system call, safe between fork and exec.
    unsafe {
        holder.pre_exec(|| check(libc::unshare(libc::CLONE_NEWUSER).into()).map(drop));
    }
    let mut holder = holder.spawn()?;
    let pid = holder.id();
    let made = (|| {
        fs::write(format!("/proc/{pid}/uid_map"), format!("0 {base} {ID_RANGE}"))?;
        fs::write(format!("/proc/{pid}/gid_map"), format!("0 {base} {ID_RANGE}"))?;
        File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from)
    })();
    let _ = holder.kill();
    let _ = holder.wait();
    made
}
