//! The guest's first process: from the kernel's hand-over to systemd.
//!
//! 1. mount `/dev`, `/proc` and `/sys`;
//! 2. load the modules listed in the initramfs's load order;
//! 3. mount the read-only root image named by `vmrig.root=` and put a
//!    writable overlay on it, kept on the ext4 disk named by `vmrig.state=`
//!    (so that it survives a reboot) or else on a tmpfs;
//! 4. copy the node's own files and units over it, and give it a
//!    machine-id of its own on its first boot;
//! 5. move the kernel filesystems into the new root and make it `/`;
//! 6. create the node's users, set its hostname, give each NIC its
//!    addresses, load the firewall;
//! 7. fork the agent, and `exec` systemd, which stays PID 1.
//!
//! Any failure is printed on the console and the machine powers off: as
//! PID 1 we must not exit, and a powered-off node is what the driver reports.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::{chdir, chroot};
use vmrig_proto::{
    CMDLINE_ROOT, CMDLINE_ROOT_FSTYPE, CMDLINE_STATE, HANDOVER_BANNER, INITRAMFS_MODULE_DIR, INITRAMFS_MODULE_ORDER,
    INITRAMFS_NETWORK, INITRAMFS_OVERLAY_DIR, INITRAMFS_USERS,
};

use crate::layer::{configure_network, copy_tree, create_users, load_firewall, set_hostname, NicsAre};

/// How long to wait for the root disk to appear after its driver loads.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself.
const COMPRESSED_MODULE: u32 = 4;

/// Boots the guest; returns only by powering it off.
pub fn run() -> ! {
    let error = match boot() {
        Ok(never) => match never {},
        Err(error) => error,
    };
    eprintln!("vmrig-init: {error}");
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn fail(what: impl std::fmt::Display) -> impl FnOnce(nix::Error) -> String {
    move |errno| format!("{what}: {errno}")
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(fail(format!("cannot mount {fstype} on {target}")))
}

fn boot() -> Result<Infallible, String> {
    let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("proc", "/proc", "proc", quiet | MsFlags::MS_NODEV, None)?;
    mount_fs("sysfs", "/sys", "sysfs", quiet | MsFlags::MS_NODEV, None)?;

    load_modules()?;

    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let param = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|word| word.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let root = param(CMDLINE_ROOT).ok_or_else(|| format!("the kernel command line has no {CMDLINE_ROOT}="))?;
    let fstype = param(CMDLINE_ROOT_FSTYPE).unwrap_or_else(|| "erofs".into());
    wait_for(&root)?;

    mount_fs(&root, "/lower", &fstype, MsFlags::MS_RDONLY, None)?;
    match param(CMDLINE_STATE) {
        Some(state) => {
            wait_for(&state)?;
            mount_fs(&state, "/rw", "ext4", MsFlags::empty(), None)?;
        }
        None => mount_fs("tmpfs", "/rw", "tmpfs", MsFlags::empty(), Some("mode=0755"))?,
    }
    for dir in ["/rw/upper", "/rw/work"] {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    mount_root_overlay()?;

    copy_tree(Path::new("/").join(INITRAMFS_OVERLAY_DIR).as_path(), Path::new("/newroot"))?;
    give_a_machine_id()?;
    // Read now: the initramfs is out of reach once the new root is `/`.
    let users = fs::read_to_string(Path::new("/").join(INITRAMFS_USERS).as_path()).unwrap_or_default();
    let network = fs::read_to_string(Path::new("/").join(INITRAMFS_NETWORK).as_path()).unwrap_or_default();

    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{dir}");
        mount(Some(dir), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(fail(format!("cannot move {dir} into the new root")))?;
    }
    chdir("/newroot").map_err(fail("cannot enter the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(fail("cannot make the new root /"))?;
    chroot(".").map_err(fail("cannot chroot into the new root"))?;
    chdir("/").map_err(fail("cannot enter /"))?;
    create_users(&users)?;
    set_hostname()?;
    configure_network(&network, NicsAre::Named)?;
    load_firewall()?;

    let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    // SAFETY: PID 1 has started no thread.
    unsafe { crate::handover::start_agent_then_systemd(&format!("{HANDOVER_BANNER} (kernel uptime {uptime} s)")) }
}

/// Gives the node a machine-id of its own on its first boot (its
/// writable layer has none yet, unless the node's files set one), which
/// its layer keeps across reboots: the image's is every node's. A NixOS
/// test node's systemd makes one at its first boot.
fn give_a_machine_id() -> Result<(), String> {
    if Path::new("/rw/upper/etc/machine-id").exists() {
        return Ok(());
    }
    let id = vmrig_proto::random_machine_id().map_err(|e| format!("cannot read a random UUID: {e}"))?;
    fs::write("/newroot/etc/machine-id", format!("{id}\n")).map_err(|e| format!("cannot write /etc/machine-id: {e}"))
}

/// Puts the writable layer over the image at `/newroot`, able to hand out
/// file handles as a disk root would, so that the node can export its
/// directories over NFS (overlayfs needs an index of copied-up files for
/// that). A kernel or layer that cannot do it gets the plain overlay.
fn mount_root_overlay() -> Result<(), String> {
    const LAYERS: &str = "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work";
    let exportable = format!("{LAYERS},index=on,nfs_export=on");
    if mount_fs("overlay", "/newroot", "overlay", MsFlags::empty(), Some(&exportable)).is_ok() {
        return Ok(());
    }
    eprintln!("vmrig-init: the root cannot be exported over NFS here; mounting it without");
    mount_fs("overlay", "/newroot", "overlay", MsFlags::empty(), Some(LAYERS))
}

/// Loads every module of the initramfs's load order, which already puts each
/// after its dependencies.
fn load_modules() -> Result<(), String> {
    let order = fs::read_to_string(format!("/{INITRAMFS_MODULE_ORDER}")).map_err(|e| format!("cannot read the module list: {e}"))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/{INITRAMFS_MODULE_DIR}/{name}");
        let file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let flags = if name.ends_with(".ko") {
            ModuleInitFlags::empty()
        } else {
            ModuleInitFlags::from_bits_retain(COMPRESSED_MODULE)
        };
        match finit_module(&file, &CString::default(), flags) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(errno) => return Err(format!("cannot load module {name}: {errno}")),
        }
    }
    Ok(())
}

fn wait_for(device: &str) -> Result<(), String> {
    let started = Instant::now();
    while !Path::new(device).exists() {
        if started.elapsed() > DEVICE_TIMEOUT {
            return Err(format!("the root device {device} did not appear within {} s", DEVICE_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
