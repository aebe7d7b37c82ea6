//! A container's NICs: one tap per VLAN, with the node's MAC, made on the
//! host and moved into the container's network namespace (which
//! `systemd-nspawn --private-network` makes, owned by the container's user
//! namespace, so that vmrig cannot make it beforehand); the container's
//! first process waits for them, then names and addresses them as a VM's
//! `/init` does. Each is bridged by a thread to its VLAN's switch as QEMU's
//! datagram NIC is. The container has no other network and no route to
//! the host's. `block()` takes the carrier of the first NIC away and drops
//! its frames both ways, as QEMU's `set_link` does.
//!
//! The taps live as long as the container's namespace and vmrig's
//! descriptors: when the container ends, or vmrig, the kernel removes
//! them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::net::{switch_socket, Nic};

/// `TUNSETIFF`, `TUNSETCARRIER` and the flags of a tap without packet
/// information.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETCARRIER: libc::c_ulong = 0x4004_54e2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// How often a bridge thread looks whether it should end.
const STOP_POLL_MS: u16 = 200;
/// The largest frame a NIC passes (no offloads: the MTU and its header).
const FRAME: usize = 65536;

#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    /// `ifr_flags`, or `ifr_hwaddr`'s family and bytes.
    data: [u8; 24],
}

/// A container's network namespace and NICs.
pub struct Network {
    nics: Vec<BridgedNic>,
}

struct BridgedNic {
    /// Its name on the host, before the container renames it.
    name: String,
    tap: Arc<File>,
    blocked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Network {
    /// A tap for each of `nics`, named after `prefix` and bridged to the
    /// switches whose sockets are in `dir`.
    pub fn make(nics: &[Nic], dir: &Path, prefix: &str) -> io::Result<Self> {
        let mut bridged = Vec::new();
        for (index, nic) in nics.iter().enumerate() {
            let name = format!("{prefix}{index}");
            let tap = make_tap(&name, &nic.mac())?;
            let socket = nic.node_socket(dir);
            let _ = std::fs::remove_file(&socket);
            let port = UnixDatagram::bind(&socket)?;
            let (tap, blocked, stop) = (Arc::new(tap), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
            let switch = switch_socket(dir, nic.vlan);
            let thread = {
                let (tap, blocked, stop) = (Arc::clone(&tap), Arc::clone(&blocked), Arc::clone(&stop));
                std::thread::spawn(move || bridge(&tap, &port, &switch, &blocked, &stop))
            };
            bridged.push(BridgedNic { name, tap, blocked, stop, thread: Some(thread) });
        }
        Ok(Self { nics: bridged })
    }

    /// Moves every tap into the network namespace of process `pid`.
    pub fn move_into(&self, pid: u32) -> io::Result<()> {
        for nic in &self.nics {
            let status = Command::new("ip").args(["link", "set", "dev", &nic.name, "netns", &pid.to_string()]).status()?;
            if !status.success() {
                return Err(io::Error::other(format!("`ip link set dev {} netns {pid}` failed ({status})", nic.name)));
            }
        }
        Ok(())
    }

    /// Plugs the first NIC's cable out or back in.
    pub fn set_first_link(&self, up: bool) -> io::Result<()> {
        let Some(nic) = self.nics.first() else { return Ok(()) };
        nic.blocked.store(!up, Ordering::SeqCst);
        let carrier: libc::c_int = up.into();
        // SAFETY: TUNSETCARRIER reads the int, which lives through the call.
        let result = unsafe { libc::ioctl(nic.tap.as_raw_fd(), TUNSETCARRIER, &carrier) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for nic in &mut self.nics {
            nic.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = nic.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Tap `name` in the calling thread's network namespace, with `mac`.
fn make_tap(name: &str, mac: &str) -> io::Result<File> {
    let tap = File::options().read(true).write(true).open("/dev/net/tun")?;
    let mut request = InterfaceRequest { name: [0; libc::IFNAMSIZ], data: [0; 24] };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    request.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes the request, which lives through the call.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut address = InterfaceRequest { name: request.name, data: [0; 24] };
    address.data[..2].copy_from_slice(&(libc::ARPHRD_ETHER).to_ne_bytes());
    for (index, byte) in mac.split(':').enumerate().take(6) {
        address.data[2 + index] = u8::from_str_radix(byte, 16).map_err(io::Error::other)?;
    }
    // Any datagram socket of the namespace takes the address ioctl.
    // SAFETY: socket returns a new descriptor or -1.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just made and own.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    // SAFETY: SIOCSIFHWADDR reads the request, which lives through the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFHWADDR, &address) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tap)
}

/// Carries frames between `tap` and the switch at `switch` until `stop`,
/// dropping them while `blocked`.
fn bridge(mut tap: &File, port: &UnixDatagram, switch: &Path, blocked: &AtomicBool, stop: &AtomicBool) {
    let mut frame = vec![0; FRAME];
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN), PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(STOP_POLL_MS)).is_err() {
            continue;
        }
        let [from_tap, from_switch] = fds.map(|fd| fd.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)));
        if from_tap {
            if let Ok(length) = tap.read(&mut frame) {
                if !blocked.load(Ordering::SeqCst) {
                    let _ = port.send_to(&frame[..length], switch);
                }
            }
        }
        if from_switch {
            if let Ok(length) = port.recv(&mut frame) {
                if !blocked.load(Ordering::SeqCst) {
                    let _ = tap.write(&frame[..length]);
                }
            }
        }
    }
}
