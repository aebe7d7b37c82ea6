//! The wire protocol between the vmrig driver (host) and `vmrig-agent` (guest).
//!
//! The agent's first job, before any protocol exists, is to be the guest's
//! `/init`; this crate holds what both sides must agree on about the guest's
//! layout, so that neither hard-codes it twice.

/// Kernel command-line key naming the block device that holds the read-only
/// root image, e.g. `vmrig.root=/dev/vda`.
pub const CMDLINE_ROOT: &str = "vmrig.root";

/// Kernel command-line key naming the filesystem type of the root image
/// (`erofs` or `squashfs`).
pub const CMDLINE_ROOT_FSTYPE: &str = "vmrig.rootfstype";

/// Where, inside the initramfs, the kernel modules that `/init` loads live.
pub const INITRAMFS_MODULE_DIR: &str = "lib/modules";

/// The file inside the initramfs listing the modules to load, one file name a
/// line, in dependency order.
pub const INITRAMFS_MODULE_ORDER: &str = "lib/modules/load-order";

/// The line `/init` prints on the console just before it hands the machine
/// to systemd; the driver and the tests use it to tell a working initramfs
/// from a kernel that never reached userspace.
pub const HANDOVER_BANNER: &str = "vmrig-init: starting systemd";
