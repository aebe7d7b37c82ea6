//! The guest's virtio-serial ports, which the host names: the agent's,
//! the tunnel's and the shared directory's.

use std::fs;
use std::path::{Path, PathBuf};

/// The device of the virtio-serial port `name`, found through sysfs since
/// no udev runs this early to make `/dev/virtio-ports/` links.
pub fn find(name: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/class/virtio-ports").into_iter().flatten().flatten().find_map(|dirent| {
        let port_name = fs::read_to_string(dirent.path().join("name")).unwrap_or_default();
        let device = Path::new("/dev").join(dirent.file_name());
        (port_name.trim() == name && device.exists()).then_some(device)
    })
}
