//! Virtual Ethernet: addressing, and one switch per VLAN inside the driver.
//!
//! Each node's NIC on a VLAN is a QEMU `-netdev dgram` bound to its own Unix
//! datagram socket and sending to the VLAN's switch socket; one datagram is
//! one Ethernet frame. The switch learns which port each source MAC sits
//! behind, forwards unicast frames there and floods the others to every
//! other port. Nothing but the nodes is attached: no route leads to the
//! host or beyond.
//!
//! Addresses are deterministic: nodes are numbered from 1 in name order;
//! node `n` on VLAN `v` has MAC `52:54:00:12:v:n`, IPv4 `192.168.v.n/24`
//! and IPv6 `2001:db8:v::n/64`.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::spec::TestSpec;

/// Largest frame the switch carries (a jumbo frame with headers).
const MAX_FRAME: usize = 65_536;

/// A node's NIC on one VLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The VLAN.
    pub vlan: u8,
    /// The node's number (from 1, in name order).
    pub number: u8,
}

impl Nic {
    /// The NIC's MAC address.
    pub fn mac(&self) -> String {
        format!("52:54:00:12:{:02x}:{:02x}", self.vlan, self.number)
    }

    /// The NIC's IPv4 address.
    pub fn ipv4(&self) -> String {
        format!("192.168.{}.{}", self.vlan, self.number)
    }

    /// The NIC's IPv6 address.
    pub fn ipv6(&self) -> String {
        format!("2001:db8:{:x}::{:x}", self.vlan, self.number)
    }

    /// The socket QEMU binds for this NIC, in `dir`.
    pub fn node_socket(&self, dir: &Path) -> PathBuf {
        dir.join(format!("v{}-n{}.sock", self.vlan, self.number))
    }
}

/// The NICs of node `name` of `spec`, one per VLAN it joins.
pub fn nics(spec: &TestSpec, name: &str) -> Vec<Nic> {
    let number = spec.nodes.keys().position(|n| n == name).map_or(0, |i| i + 1);
    let number = u8::try_from(number).expect("a test has at most 254 nodes");
    spec.nodes[name].vlans.iter().map(|&vlan| Nic { vlan, number }).collect()
}

/// The socket of VLAN `vlan`'s switch, in `dir`.
pub fn switch_socket(dir: &Path, vlan: u8) -> PathBuf {
    dir.join(format!("v{vlan}-switch.sock"))
}

/// A running switch; dropping it stops it.
pub struct Switch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Switch {
    /// Starts the switch of `vlan` for the NICs `ports`, with its socket
    /// and theirs in `dir`.
    pub fn start(dir: &Path, vlan: u8, ports: Vec<Nic>) -> io::Result<Self> {
        let path = switch_socket(dir, vlan);
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        // Wakes the loop now and then to notice `stop`.
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let ports: Vec<PathBuf> = ports.iter().map(|nic| nic.node_socket(dir)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("switch-v{vlan}"))
                .spawn(move || forward(&socket, &ports, &stop))?
        };
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The switch's loop: learn, then forward or flood.
fn forward(socket: &UnixDatagram, ports: &[PathBuf], stop: &AtomicBool) {
    let mut learned: HashMap<[u8; 6], usize> = HashMap::new();
    let mut frame = vec![0u8; MAX_FRAME];
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut frame) {
            Ok(received) => received,
            Err(_) => continue,
        };
        // Frames from anything but a known port are dropped.
        let Some(source) = from.as_pathname().and_then(|p| ports.iter().position(|port| port == p)) else {
            continue;
        };
        if len < 14 {
            continue;
        }
        let destination: [u8; 6] = frame[0..6].try_into().expect("six bytes");
        let sender: [u8; 6] = frame[6..12].try_into().expect("six bytes");
        if sender[0] & 1 == 0 {
            learned.insert(sender, source);
        }
        let targets: Vec<usize> = match learned.get(&destination) {
            Some(&port) if destination[0] & 1 == 0 => vec![port],
            _ => (0..ports.len()).filter(|&port| port != source).collect(),
        };
        for port in targets {
            if port != source {
                // A node that is not running has no socket: its frames are lost,
                // as on a cable with nothing at the other end.
                let _ = socket.send_to(&frame[..len], &ports[port]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(destination: [u8; 6], source: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut frame = destination.to_vec();
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(payload);
        frame
    }

    fn receive(socket: &UnixDatagram) -> Option<Vec<u8>> {
        let mut buffer = vec![0; MAX_FRAME];
        socket.recv(&mut buffer).ok().map(|n| buffer[..n].to_vec())
    }

    #[test]
    fn addresses_follow_vlan_and_number() {
        let nic = Nic { vlan: 2, number: 11 };
        assert_eq!((nic.mac(), nic.ipv4(), nic.ipv6()), ("52:54:00:12:02:0b".into(), "192.168.2.11".into(), "2001:db8:2::b".into()));
    }

    #[test]
    fn floods_until_it_learns_then_forwards_to_one_port() {
        let dir = tempfile::tempdir().unwrap();
        let nics: Vec<Nic> = (1..=3).map(|number| Nic { vlan: 1, number }).collect();
        let sockets: Vec<UnixDatagram> = nics
            .iter()
            .map(|nic| {
                let s = UnixDatagram::bind(nic.node_socket(dir.path())).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                s
            })
            .collect();
        let _switch = Switch::start(dir.path(), 1, nics.clone()).unwrap();
        let switch = switch_socket(dir.path(), 1);
        let (a, b) = ([0x52, 0x54, 0, 0x12, 1, 1], [0x52, 0x54, 0, 0x12, 1, 2]);

        // a → b: b is unknown, so everyone but a hears it.
        sockets[0].send_to(&frame(b, a, b"hello"), &switch).unwrap();
        assert!(receive(&sockets[1]).is_some());
        assert!(receive(&sockets[2]).is_some());
        assert!(receive(&sockets[0]).is_none());

        // b → a: a was learned, so only a hears it.
        sockets[1].send_to(&frame(a, b, b"reply"), &switch).unwrap();
        assert_eq!(&receive(&sockets[0]).unwrap()[14..], b"reply");
        assert!(receive(&sockets[2]).is_none());

        // A stranger's frames go nowhere.
        let stranger = UnixDatagram::bind(dir.path().join("stranger")).unwrap();
        stranger.send_to(&frame([0xff; 6], [2, 0, 0, 0, 0, 9], b"x"), &switch).unwrap();
        assert!(receive(&sockets[0]).is_none());
    }
}
