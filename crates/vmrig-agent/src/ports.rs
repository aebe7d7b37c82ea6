//! The agent's ports, which the host names: the agent's, the tunnel's and
//! the shared directory's. In a VM each is a virtio-serial port; in a
//! container each is a Unix socket the agent listens on, in the folder
//! the host bind-mounts at [`vmrig_proto::CONTAINER_PORTS`], and one
//! connection at a time is the port's host side.

use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// The container's listening sockets, by port name, once
/// [`listen_in_container`] made them.
static LISTENERS: OnceLock<Vec<(&'static str, UnixListener)>> = OnceLock::new();

/// Listens on a socket for each of `names` in `dir`, which the host
/// connects to as it connects to QEMU's; the ports of a container.
pub fn listen_in_container(dir: &Path, names: &[&'static str]) -> Result<(), String> {
    let mut listeners = Vec::new();
    for name in names {
        let path = dir.join(name);
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        listeners.push((*name, listener));
    }
    LISTENERS.set(listeners).map_err(|_| "the ports are made once".to_string())
}

/// Whether this guest has port `name`.
pub fn exists(name: &str) -> bool {
    match LISTENERS.get() {
        Some(listeners) => listeners.iter().any(|(port, _)| *port == name),
        None => virtio_port(name).is_some(),
    }
}

/// The host's sessions on one port, one after another: a virtio-serial
/// port kept open (its host side comes and goes under the same device),
/// or a container's socket, each connection a session.
pub enum Sessions {
    Device(File),
    Socket(&'static UnixListener),
}

impl Sessions {
    /// The next session: the device again, or the host's next connection.
    pub fn next(&self) -> io::Result<File> {
        match self {
            Self::Device(device) => device.try_clone(),
            Self::Socket(listener) => listener.accept().map(|(stream, _)| File::from(OwnedFd::from(stream))),
        }
    }
}

/// The sessions of port `name`, waiting for a virtio-serial port to
/// appear.
pub fn sessions(name: &str) -> io::Result<Sessions> {
    if let Some(listeners) = LISTENERS.get() {
        let (_, listener) = listeners.iter().find(|(port, _)| *port == name).ok_or_else(|| io::Error::other(format!("this machine has no port named {name}")))?;
        return Ok(Sessions::Socket(listener));
    }
    loop {
        if let Some(device) = virtio_port(name) {
            return File::options().read(true).write(true).open(device).map(Sessions::Device);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Port `name` for the host's next session on it.
pub fn open(name: &str) -> io::Result<File> {
    sessions(name)?.next()
}

/// The device of the virtio-serial port `name`, found through sysfs since
/// no udev runs this early to make `/dev/virtio-ports/` links.
fn virtio_port(name: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/class/virtio-ports").into_iter().flatten().flatten().find_map(|dirent| {
        let port_name = fs::read_to_string(dirent.path().join("name")).unwrap_or_default();
        let device = Path::new("/dev").join(dirent.file_name());
        (port_name.trim() == name && device.exists()).then_some(device)
    })
}
