//! The guest's first process: from the kernel's hand-over to systemd.
//!
//! 1. mount `/dev`, `/proc` and `/sys`;
//! 2. load the modules listed in the initramfs's load order;
//! 3. mount the read-only root image named by `vmrig.root=` and put a
//!    writable overlay on it, kept on the ext4 disk named by `vmrig.state=`
//!    (so that it survives a reboot) or else on a tmpfs;
//! 4. copy the node's own files and units over it;
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
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::{chdir, chroot, execv};
use nix::unistd::{fork, setsid, ForkResult};
use vmrig_proto::{
    CMDLINE_ROOT, CMDLINE_ROOT_FSTYPE, CMDLINE_STATE, HANDOVER_BANNER, INITRAMFS_MODULE_DIR, INITRAMFS_MODULE_ORDER,
    FIREWALL_RULES, INITRAMFS_NETWORK, INITRAMFS_OVERLAY_DIR, INITRAMFS_USERS,
};

/// How long to wait for the root disk to appear after its driver loads.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself.
const COMPRESSED_MODULE: u32 = 4;
/// Where systemd lives on a merged-/usr Debian root.
const SYSTEMD: &str = "/lib/systemd/systemd";

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

    // SAFETY: we are single-threaded here (PID 1 has started no thread), so
    // the child may run any code.
    if let ForkResult::Child = unsafe { fork() }.map_err(fail("cannot start the agent"))? {
        let _ = setsid();
        crate::server::serve();
    }
    let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    println!("{HANDOVER_BANNER} (kernel uptime {uptime} s)");
    let program = CString::new(SYSTEMD).expect("no NUL in a constant");
    execv(&program, &[&program]).map_err(fail(format!("cannot start {SYSTEMD}")))
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

/// Copies `from` (the node's files and units, laid out as they go) over
/// `to`, replacing what is there.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let Ok(entries) = fs::read_dir(from) else { return Ok(()) };
    for entry in entries.flatten() {
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(|e| format!("cannot inspect {}: {e}", source.display()))?;
        let copied = if kind.is_dir() {
            fs::create_dir_all(&target)
                .and_then(|()| fs::set_permissions(&target, fs::metadata(&source)?.permissions()))
                .map_err(|e| format!("cannot create {}: {e}", target.display()))
                .and_then(|()| copy_tree(&source, &target))
        } else if kind.is_symlink() {
            let _ = fs::remove_file(&target);
            fs::read_link(&source)
                .and_then(|link| std::os::unix::fs::symlink(link, &target))
                .map_err(|e| format!("cannot link {}: {e}", target.display()))
        } else {
            let _ = fs::remove_file(&target);
            fs::copy(&source, &target)
                .map(drop)
                .map_err(|e| format!("cannot write {}: {e}", target.display()))
        };
        copied?;
    }
    Ok(())
}

/// Creates the node's users that do not exist yet (the writable layer
/// keeps them across a reboot).
pub(crate) fn create_users(list: &str) -> Result<(), String> {
    let_root_in_without_password()?;
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in list.lines().filter(|l| !l.is_empty()) {
        let args: Vec<&str> = line.split('\t').collect();
        let Some(name) = args.last() else { continue };
        if passwd.lines().any(|entry| entry.split(':').next() == Some(name)) {
            continue;
        }
        for group in named_groups(&args) {
            let groups = fs::read_to_string("/etc/group").unwrap_or_default();
            if !groups.lines().any(|entry| entry.split(':').next() == Some(group)) {
                run_program("/usr/sbin/groupadd", &[group])?;
            }
        }
        run_program("/usr/sbin/useradd", &args)?;
    }
    Ok(())
}

/// The groups `useradd` arguments name (`--gid`, `--groups`), by name:
/// each is made first if it does not exist, as a user's definition says.
fn named_groups<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.windows(2)
        .filter(|pair| pair[0] == "--gid" || pair[0] == "--groups")
        .flat_map(|pair| pair[1].split(','))
        .filter(|group| !group.is_empty() && !group.bytes().all(|b| b.is_ascii_digit()))
        .collect()
}

/// Gives root an empty password, as a NixOS test node's root has: a person
/// (or a test typing on a console) logs in as `root` with no password.
fn let_root_in_without_password() -> Result<(), String> {
    let Ok(shadow) = fs::read_to_string("/etc/shadow") else { return Ok(()) };
    let opened: String = shadow
        .lines()
        .map(|entry| match entry.split_once(':') {
            Some(("root", rest)) => format!("root::{}\n", rest.split_once(':').map_or("", |(_, after)| after)),
            _ => format!("{entry}\n"),
        })
        .collect();
    if opened == shadow {
        return Ok(());
    }
    fs::write("/etc/shadow", opened).map_err(|e| format!("cannot write /etc/shadow: {e}"))
}

/// Runs a program of the new root, failing if it fails.
pub(crate) fn run_program(program: &str, args: &[&str]) -> Result<(), String> {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {status}", args.join(" ")))
    }
}

/// Loads the node's nftables ruleset, where its layer has one.
pub(crate) fn load_firewall() -> Result<(), String> {
    if Path::new(FIREWALL_RULES).exists() {
        run_program("/usr/sbin/nft", &["-f", FIREWALL_RULES])?;
    }
    Ok(())
}

/// Names the machine from `/etc/hostname` now, as systemd would later, so
/// that commands the agent runs before systemd see the node's name; as
/// systemd does, without the characters a hostname may not hold (a node
/// named `web_client` is `webclient`, and its name still resolves through
/// `/etc/hosts`).
pub(crate) fn set_hostname() -> Result<(), String> {
    let name: String = fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(&name).map_err(|e| format!("cannot set the hostname to {name}: {e}"))
}

/// How the NICs a network list names are found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NicsAre {
    /// Booted with the node's own MACs.
    Named,
    /// Restored from a template: NIC number k still has the template's
    /// k-th MAC, and is given the node's.
    FromTemplate,
}

/// Brings up loopback and each NIC listed (`MAC IPV4/P IPV6/P`), found by
/// its MAC address, with its addresses; before systemd starts, so that
/// every unit sees the network as it will stay. The k-th NIC listed (the
/// node's k-th VLAN) is named `eth<k>`, counting from 1, as on a NixOS
/// test node, whose `eth0` is QEMU's user network. One `ip -batch` does it
/// all: each process started costs tens of milliseconds under TCG.
pub(crate) fn configure_network(list: &str, nics: NicsAre) -> Result<(), String> {
    let mut devices = Vec::new();
    for (index, line) in list.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [mac, ipv4, ipv6] = fields.as_slice() else { continue };
        let found_by = match nics {
            NicsAre::Named => mac.to_string(),
            NicsAre::FromTemplate => vmrig_proto::template_mac(index),
        };
        let device = fs::read_dir("/sys/class/net")
            .map_err(|e| format!("cannot list network devices: {e}"))?
            .flatten()
            .find(|d| fs::read_to_string(d.path().join("address")).is_ok_and(|a| a.trim() == found_by))
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .ok_or_else(|| format!("no network device has MAC {found_by}"))?;
        // Duplicate address detection only delays a link that is ours
        // alone. The setting stays with the device when it is renamed.
        let dad = format!("/proc/sys/net/ipv6/conf/{device}/accept_dad");
        fs::write(&dad, "0").map_err(|e| format!("cannot write {dad}: {e}"))?;
        devices.push((device, *mac, *ipv4, *ipv6));
    }
    let mut batch = String::from("link set dev lo up\n");
    // A name is taken only once every NIC has let go of its own: the
    // kernel's eth1 may be the one that is to become eth2.
    for (index, (device, ..)) in devices.iter().enumerate() {
        batch.push_str(&format!("link set dev {device} down\nlink set dev {device} name vmrig-nic{index}\n"));
    }
    for (index, (_, mac, ipv4, ipv6)) in devices.iter().enumerate() {
        let (temporary, name) = (format!("vmrig-nic{index}"), format!("eth{}", index + 1));
        batch.push_str(&format!("link set dev {temporary} name {name}\n"));
        if nics == NicsAre::FromTemplate {
            batch.push_str(&format!("link set dev {name} address {mac}\n"));
        }
        batch.push_str(&format!("address replace {ipv4} dev {name}\naddress replace {ipv6} dev {name}\nlink set dev {name} up\n"));
    }
    let mut ip = std::process::Command::new("/usr/sbin/ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let fed = ip.stdin.take().expect("stdin is piped").write_all(batch.as_bytes());
    let status = ip.wait().map_err(|e| format!("cannot run ip: {e}"))?;
    match fed {
        Ok(()) if status.success() => Ok(()),
        _ => Err(format!("configuring the network failed ({status}):\n{batch}")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_a_user_names_are_found_by_name() {
        let args = ["--create-home", "--gid", "devs", "--groups", "adm,wheel,100", "--uid", "1500", "alice"];
        assert_eq!(named_groups(&args), ["devs", "adm", "wheel"]);
    }
}
