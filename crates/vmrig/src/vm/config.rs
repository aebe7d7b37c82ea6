//! What a machine is made of: its configuration, how its first start
//! goes, the files QEMU is given (the writable layer, the sockets it
//! serves) and the QEMU command line that puts them together.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmrig_proto::shared::SHARED_PORT;
use vmrig_proto::tunnel::TUNNEL_PORT;
use vmrig_proto::{AGENT_PORT, CMDLINE_ROOT, CMDLINE_ROOT_FSTYPE, CMDLINE_STATE};

use crate::error::{file_error, FileError};
use crate::host::QEMU;

/// The id of a node's RAM when it is a file, which QEMU also names its
/// RAM block by in a migration stream.
pub(super) const RAM_BLOCK: &str = "ram";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

/// Everything needed to boot one node.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The node's name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// The kernel.
    pub kernel: PathBuf,
    /// The node's initramfs (the image's, with the node's layer appended).
    pub initrd: PathBuf,
    /// The read-only root image.
    pub rootfs: PathBuf,
    /// Its filesystem type.
    pub rootfs_type: String,
    /// The node's writable layer, an ext4 image.
    pub state_disk: PathBuf,
    /// Extra kernel parameters.
    pub kernel_params: Vec<String>,
    /// The node's NICs, one per VLAN.
    pub nics: Vec<crate::net::Nic>,
    /// A short directory for the node's sockets (their paths are limited to
    /// 108 bytes).
    pub socket_dir: PathBuf,
    /// Where the console is recorded.
    pub console_log: PathBuf,
    /// The run's shared folder, which the node sees at `/tmp/shared`
    /// (none for a template: it has the port, and nothing behind it).
    pub shared_dir: Option<PathBuf>,
    /// Whether it has a display (virtio-gpu), a keyboard and a tablet.
    pub graphics: bool,
    /// How the machine's first start goes; every later start is a cold
    /// boot from its own writable layer.
    pub first_start: FirstStart,
}

/// How a machine starts the first time.
#[derive(Debug, Clone)]
pub enum FirstStart {
    /// A whole boot.
    Cold,
    /// A boot as a template: generic NICs on no network, to the template
    /// target, nothing of a node's own. Its RAM is the file `memory`
    /// (shared), so that the saved state need not hold it.
    AsTemplate {
        /// Where the guest's RAM lives.
        memory: PathBuf,
    },
    /// A saved state, restored: a template's, made this node, or this
    /// node's own, saved once it was up in an earlier run (warm).
    Restore(Restore),
}

/// What restoring a saved state needs.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The saved device state: a template's (its RAM is not in it), or a
    /// warm node's (with the pages of its RAM that differ from the
    /// template's).
    pub state: PathBuf,
    /// The template's RAM, mapped privately: nodes restored from one
    /// template share its pages until they write them.
    pub memory: PathBuf,
    /// The initramfs the template booted with (the restored machine must
    /// be built as the saved one was).
    pub initrd: PathBuf,
    /// The boot messages of the saved guest, shown first on the node's
    /// console.
    pub console_log: PathBuf,
    /// What the restored guest is then.
    pub then: Restored,
}

/// What a restored guest does once it runs.
#[derive(Debug, Clone)]
pub enum Restored {
    /// A template's guest becomes the node whose own layer this is.
    Become(Vec<u8>),
    /// A warm node's guest goes on as the node it was.
    Resume,
}

/// The Unix sockets QEMU serves for a node, in its socket folder.
#[derive(Debug, Clone, Copy)]
pub enum Socket {
    /// The agent's port.
    Agent,
    /// The port forwarded connections go through.
    Tunnel,
    /// The port the shared folder is served over.
    Shared,
    /// QMP, for commands.
    Qmp,
    /// A second QMP monitor, only for listening to events, so that waiting
    /// for one never holds up a command.
    Events,
}

impl MachineConfig {
    /// Where QEMU serves `socket` for this node.
    pub fn socket(&self, socket: Socket) -> PathBuf {
        let kind = match socket {
            Socket::Agent => "agent",
            Socket::Tunnel => "tunnel",
            Socket::Shared => "shared",
            Socket::Qmp => "qmp",
            Socket::Events => "events",
        };
        self.socket_dir.join(format!("{}.{kind}", self.name))
    }

    /// The QEMU command line for this node, started as `how` says; a
    /// reboot the guest asks for resets it when `allow_reboot`, else QEMU
    /// exits.
    pub fn qemu_command(&self, how: &FirstStart, allow_reboot: bool) -> Command {
        let c = self;
        let mut command = Command::new(QEMU.program);
        let (accel, cpu) = match c.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut append = format!(
            "console=ttyS0 reboot=t panic=-1 pci=off {CMDLINE_ROOT}=/dev/vda {CMDLINE_ROOT_FSTYPE}={} {CMDLINE_STATE}=/dev/vdb",
            c.rootfs_type
        );
        if c.accel == Accel::Tcg {
            append.push(' ');
            append.push_str(&tcg_clock_params());
        }
        for param in &c.kernel_params {
            append.push(' ');
            append.push_str(param);
        }
        if matches!(how, FirstStart::AsTemplate { .. } | FirstStart::Restore(_)) {
            append.push_str(&format!(" systemd.unit={}", vmrig_proto::TEMPLATE_TARGET));
        }
        let initrd = match how {
            FirstStart::Restore(restore) => &restore.initrd,
            _ => &c.initrd,
        };
        let mut machine = "microvm,rtc=on".to_string();
        let memory_file = match how {
            FirstStart::Cold => None,
            FirstStart::AsTemplate { memory } => Some((memory, "on")),
            FirstStart::Restore(restore) => Some((&restore.memory, "off")),
        };
        if let Some((path, share)) = memory_file {
            machine.push_str(&format!(",memory-backend={RAM_BLOCK}"));
            command.arg("-object").arg(format!(
                "memory-backend-file,id={RAM_BLOCK},size={}M,mem-path={},share={share}",
                c.memory_mib,
                path.display()
            ));
        }
        command
            .args(["-machine", &machine, "-bios", FIRMWARE, "-accel", accel, "-cpu", cpu])
            .args(["-m", &c.memory_mib.to_string(), "-smp", &c.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&c.kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("id=root,file={},format=raw,if=none,readonly=on", c.rootfs.display()))
            .args(["-device", "virtio-blk-device,drive=root"])
            .arg("-drive")
            .arg(format!("id=state,file={},format=raw,if=none,discard=unmap", c.state_disk.display()))
            .args(["-device", "virtio-blk-device,drive=state"])
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!("socket,id=agent,path={},server=on,wait=off", self.socket(Socket::Agent).display()))
            .args(["-device", &format!("virtserialport,chardev=agent,name={AGENT_PORT}")])
            .arg("-chardev")
            .arg(format!("socket,id=tunnel,path={},server=on,wait=off", self.socket(Socket::Tunnel).display()))
            .args(["-device", &format!("virtserialport,chardev=tunnel,name={TUNNEL_PORT}")])
            .arg("-chardev")
            .arg(format!("socket,id=shared,path={},server=on,wait=off", self.socket(Socket::Shared).display()))
            .args(["-device", &format!("virtserialport,chardev=shared,name={SHARED_PORT}")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.socket(Socket::Qmp).display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.socket(Socket::Events).display()));
        if !allow_reboot {
            command.arg("-no-reboot");
        }
        if c.graphics {
            // On virtio-mmio like every other device: the screen the
            // virtual terminals (and X or Wayland) draw on, which
            // `screendump` reads, and the keyboard and tablet `send-key`
            // and pointer events reach. Their drivers take only virtio
            // 1.0 devices, and QEMU's virtio-mmio is legacy (0.9) unless
            // told otherwise.
            command.args(["-global", "virtio-mmio.force-legacy=false"]);
            for device in ["virtio-gpu-device", "virtio-keyboard-device", "virtio-tablet-device"] {
                command.args(["-device", device]);
            }
        }
        for (index, nic) in c.nics.iter().enumerate() {
            // A template's NICs are on no network; a node restored from it
            // keeps the template's MACs until its agent gives it its own.
            let netdev = match how {
                FirstStart::AsTemplate { .. } => format!("hubport,id=nic{index},hubid={index}"),
                _ => format!(
                    "dgram,id=nic{index},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    nic.node_socket(&c.socket_dir).display(),
                    crate::net::switch_socket(&c.socket_dir, nic.vlan).display()
                ),
            };
            let mac = match how {
                FirstStart::Cold => nic.mac(),
                FirstStart::AsTemplate { .. } | FirstStart::Restore(_) => vmrig_proto::template_mac(index),
            };
            command.arg("-netdev").arg(netdev).arg("-device").arg(format!("virtio-net-device,netdev=nic{index},mac={mac}"));
        }
        if matches!(how, FirstStart::Restore(_)) {
            command.args(["-incoming", "defer"]);
        }
        command
    }
}

/// Size of a node's writable layer. The file is sparse: only what the guest
/// writes takes room.
const STATE_DISK_BYTES: u64 = 8 << 30;

/// A fresh, sparse ext4 image for a node's writable layer.
pub fn make_state_disk(path: &Path) -> Result<(), FileError> {
    let file = File::create(path).map_err(file_error("create", path))?;
    file.set_len(STATE_DISK_BYTES).map_err(file_error("size", path))?;
    drop(file);
    let mkfs = crate::host::MKFS_EXT4.require().map_err(|e| FileError::new("format", path, io::Error::other(e.to_string())))?;
    let output = Command::new(mkfs)
        .args(["-q", "-F", "-L", "vmrig-state", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .output()
        .map_err(file_error("format", path))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(FileError::new("format", path, io::Error::other(stderr)));
    }
    Ok(())
}

/// The firmware a node boots with: qboot, which loads QEMU's ACPI tables
/// and the kernel and touches no device. With ACPI on, microvm's default
/// is SeaBIOS, which drives the virtio disks itself before the kernel
/// runs, and with exactly 2048 MiB of memory left the first one broken
/// (`Guest says index … is available`, QEMU 10.0: every node with
/// `memory = 2048` failed to boot, measured). Found in QEMU's data
/// folder (Debian's `qemu-system-data`).
const FIRMWARE: &str = "qboot.rom";

/// Kernel parameters that give a TCG guest a clock it can trust.
///
/// Under TCG the guest reads the host's TSC, but microvm offers no HPET or
/// ACPI PM timer to calibrate it against, only the PIT; on a busy host the
/// PIT calibration fails now and then, and the kernel then hangs early in
/// boot. Measuring the TSC here and passing its rate skips calibration.
fn tcg_clock_params() -> String {
    static PARAMS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PARAMS
        .get_or_init(|| {
            let measure = |pause: Duration| {
                let started = Instant::now();
                // SAFETY: RDTSC has no preconditions on x86_64.
                let first = unsafe { std::arch::x86_64::_rdtsc() };
                std::thread::sleep(pause);
                // SAFETY: as above.
                let last = unsafe { std::arch::x86_64::_rdtsc() };
                (last.wrapping_sub(first)) as f64 / started.elapsed().as_secs_f64() / 1000.0
            };
            let khz = measure(Duration::from_millis(50)).round() as u64;
            format!("tsc_early_khz={khz} tsc=reliable")
        })
        .clone()
}
