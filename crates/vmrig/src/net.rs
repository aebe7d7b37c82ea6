//! Virtual Ethernet: addressing, and one switch per VLAN inside the driver.
//!
//! Each node's NIC on a VLAN is a QEMU `-netdev dgram` bound to its own Unix
//! datagram socket and sending to the VLAN's switch socket; one datagram is
//! one Ethernet frame. The switch learns which port each source MAC sits
//! behind, forwards unicast frames there and floods the others to every
//! other port. Nothing but the nodes is attached: no route leads to the
//! host or beyond.
//!
//! Faults between nodes are the switch's: a partition lets frames pass
//! only within a group, and an impaired VLAN delays or drops them. (A
//! blocked node is not: `block()` unplugs its NIC in QEMU, as NixOS's
//! does, so that the guest sees its carrier go.) Every frame that enters
//! a switch is written to its VLAN's pcap capture.
//!
//! The switches also note, per node, the first frame it exchanged with
//! another node that was more than address resolution ([`Contacts`]): a
//! node that talked to another while it started is not saved warm.
//!
//! Addresses are deterministic: nodes are numbered from 1 in name order;
//! node `n` on VLAN `v` has MAC `52:54:00:12:v:n`, IPv4 `192.168.v.n/24`
//! and IPv6 `2001:db8:v::n/64`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The number of node `name` of `spec`: its place in name order, from 1.
pub fn node_number(spec: &TestSpec, name: &str) -> Option<u8> {
    let index = spec.nodes.keys().position(|n| n == name)?;
    Some(u8::try_from(index + 1).expect("a test has at most 254 nodes"))
}

/// The NICs of node `name` of `spec`, one per VLAN it joins (none for a
/// node that is not in `spec`).
pub fn nics(spec: &TestSpec, name: &str) -> Vec<Nic> {
    let Some(number) = node_number(spec, name) else { return Vec::new() };
    spec.nodes[name].vlans.iter().map(|&vlan| Nic { vlan, number }).collect()
}

/// The socket of VLAN `vlan`'s switch, in `dir`.
pub fn switch_socket(dir: &Path, vlan: u8) -> PathBuf {
    dir.join(format!("v{vlan}-switch.sock"))
}

/// Which frames a switch lets through, by node number, and how it delays
/// them, by VLAN.
#[derive(Debug, Default, Clone)]
pub struct Rules {
    /// When partitioned, each node's group; nodes in different groups
    /// cannot reach each other.
    pub groups: Option<HashMap<u8, usize>>,
    /// Impairments of VLANs' links.
    pub impairments: HashMap<u8, Impairment>,
}

/// How a VLAN degrades the frames it carries, as a bad link would.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Added to every frame's trip.
    pub delay: Duration,
    /// A random amount up to this is added to or taken from the delay.
    pub jitter: Duration,
    /// The share of frames lost, from 0 to 1.
    pub loss: f64,
    /// The link's capacity in bits per second; frames queue behind it.
    pub rate_bps: Option<u64>,
}

/// A time as `tc netem` writes it: a number and a unit (`200ms`, `1.5s`,
/// `500us`).
pub fn parse_time(text: &str) -> Option<Duration> {
    let (number, unit) = split_unit(text)?;
    let seconds = match unit {
        "s" | "sec" | "secs" => number,
        "ms" | "msec" | "msecs" => number / 1e3,
        "us" | "usec" | "usecs" => number / 1e6,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// A share as a percentage (`1%`, `0.5%`), from 0 to 1.
pub fn parse_percent(text: &str) -> Option<f64> {
    let (number, unit) = split_unit(text)?;
    (unit == "%" && (0.0..=100.0).contains(&number)).then_some(number / 100.0)
}

/// A rate as `tc` writes it, in bits per second: `bit`, `kbit`, `mbit`,
/// `gbit` (and `kibit`… for powers of 1024), or bytes per second with
/// `bps`, `kbps`, `mbps`, `gbps`.
pub fn parse_rate(text: &str) -> Option<u64> {
    let (number, unit) = split_unit(text)?;
    let unit = unit.to_ascii_lowercase();
    let (prefix, bits) = match (unit.strip_suffix("bit"), unit.strip_suffix("bps")) {
        (Some(prefix), _) => (prefix.to_string(), 1.0),
        (None, Some(prefix)) => (prefix.to_string(), 8.0),
        (None, None) => return None,
    };
    let scale = match prefix.as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let rate = number * scale * bits;
    (rate >= 1.0 && rate < u64::MAX as f64).then_some(rate.round() as u64)
}

/// `"1.5ms"` as `(1.5, "ms")`; `None` without a number or a unit.
fn split_unit(text: &str) -> Option<(f64, &str)> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    (number.is_finite() && number >= 0.0).then_some((number, unit.trim()))
}

impl Rules {
    fn passes(&self, from: u8, to: u8) -> bool {
        self.groups.as_ref().is_none_or(|groups| groups.get(&from) == groups.get(&to))
    }
}

/// The rules every switch of a run obeys, shared with them.
pub type SharedRules = Arc<Mutex<Rules>>;

/// Per node (by number), the first frame it sent to or received from
/// another node beyond address resolution (ARP, IPv6 neighbour and router
/// discovery, multicast membership), described; shared by a run's
/// switches.
#[derive(Debug, Default)]
pub struct Contacts {
    first: Mutex<HashMap<u8, String>>,
}

impl Contacts {
    fn note(&self, node: u8, frame: impl FnOnce() -> String) {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).entry(node).or_insert_with(frame);
    }

    /// The first frame node `number` exchanged with another, if any.
    pub fn first(&self, number: u8) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).get(&number).cloned()
    }
}

/// Whether Ethernet `frame` only resolves addresses or announces
/// membership: ARP, RARP, IGMP, ICMPv6 router, neighbour and multicast
/// listener messages (behind a hop-by-hop header too, as MLD is sent).
fn resolves_addresses(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0806 | 0x8035 => true,
        0x0800 => frame.get(23) == Some(&2),
        0x86dd => {
            let (mut next, mut at) = (frame.get(20).copied(), 54);
            if next == Some(0) {
                next = frame.get(at).copied();
                at += frame.get(at + 1).map_or(0, |length| (usize::from(*length) + 1) * 8);
            }
            next == Some(58) && frame.get(at).is_some_and(|kind| matches!(kind, 130..=137 | 143))
        }
        _ => false,
    }
}

/// What a frame is, for a person: its protocol and addresses.
fn describe(frame: &[u8]) -> String {
    let protocol = |number: u8| match number {
        1 => "ICMP".to_string(),
        6 => "TCP".to_string(),
        17 => "UDP".to_string(),
        58 => "ICMPv6".to_string(),
        other => format!("protocol {other}"),
    };
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 if frame.len() >= 34 => {
            let address = |at: usize| std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&frame[at..at + 4]).expect("four bytes"));
            format!("IPv4 {} from {} to {}", protocol(frame[23]), address(26), address(30))
        }
        0x86dd if frame.len() >= 54 => {
            let address = |at: usize| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).expect("sixteen bytes"));
            format!("IPv6 {} from {} to {}", protocol(frame[20]), address(22), address(38))
        }
        ethertype => format!("a frame of EtherType {ethertype:#06x}"),
    }
}

/// A running switch; dropping it stops it.
pub struct Switch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Switch {
    /// Starts the switch of `vlan` for the NICs `ports`, with its socket
    /// and theirs in `dir`, obeying `rules`, noting `contacts` and
    /// capturing to `capture`.
    pub fn start(dir: &Path, vlan: u8, ports: Vec<Nic>, rules: SharedRules, contacts: Arc<Contacts>, capture: &Path) -> io::Result<Self> {
        let path = switch_socket(dir, vlan);
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        let mut pcap = BufWriter::new(File::create(capture)?);
        // The pcap global header: magic, version 2.4, no time zone offset or
        // accuracy, snapshot length, link type Ethernet.
        for field in [0xa1b2_c3d4u32.to_le_bytes().as_slice(), &2u16.to_le_bytes(), &4u16.to_le_bytes(), &[0; 8], &(MAX_FRAME as u32).to_le_bytes(), &1u32.to_le_bytes()] {
            pcap.write_all(field)?;
        }
        let port_paths: Vec<PathBuf> = ports.iter().map(|nic| nic.node_socket(dir)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("switch-v{vlan}"))
                .spawn(move || forward(&socket, vlan, &ports, &port_paths, &rules, &contacts, &mut pcap, &stop))?
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

fn record(pcap: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let len = frame.len() as u32;
    pcap.write_all(&(now.as_secs() as u32).to_le_bytes())?;
    pcap.write_all(&now.subsec_micros().to_le_bytes())?;
    pcap.write_all(&len.to_le_bytes())?;
    pcap.write_all(&len.to_le_bytes())?;
    pcap.write_all(frame)
}

/// How many frames a VLAN holds back at most, as netem's default queue
/// (1000 packets): past it, a frame is dropped, as from a full queue.
const HELD_LIMIT: usize = 1000;

/// A held frame: when it is due, its arrival number, its port, itself.
type Held = (Instant, u64, usize, Vec<u8>);

/// Frames held back by an impairment until they are due, in due order
/// (and in arrival order when due at once).
#[derive(Default)]
struct HeldFrames {
    frames: BinaryHeap<Reverse<Held>>,
    arrivals: u64,
}

impl HeldFrames {
    /// Whether `count` more frames fit.
    fn has_room_for(&self, count: usize) -> bool {
        self.frames.len() + count <= HELD_LIMIT
    }

    /// Holds `frame` for `port` until `due`.
    fn hold(&mut self, due: Instant, port: usize, frame: &[u8]) {
        self.arrivals += 1;
        self.frames.push(Reverse((due, self.arrivals, port, frame.to_vec())));
    }

    /// The next frame due by `now`, with its port.
    fn next_due(&mut self, now: Instant) -> Option<(usize, Vec<u8>)> {
        if self.frames.peek().is_some_and(|Reverse((due, ..))| *due <= now) {
            self.frames.pop().map(|Reverse((_, _, port, data))| (port, data))
        } else {
            None
        }
    }

    /// When the next frame is due.
    fn next_time(&self) -> Option<Instant> {
        self.frames.peek().map(|Reverse((due, ..))| *due)
    }
}

/// A small xorshift generator: loss and jitter need randomness, not
/// cryptography.
struct Random(u64);

impl Random {
    fn seeded() -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        Self((nanos as u64) | 1)
    }

    /// A number in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The switch's loop: capture, learn, then forward or flood within the
/// rules, holding frames back as the VLAN's impairment says, and noting
/// who talked to whom.
#[allow(clippy::too_many_arguments)]
fn forward(socket: &UnixDatagram, vlan: u8, nics: &[Nic], ports: &[PathBuf], rules: &Mutex<Rules>, contacts: &Contacts, pcap: &mut impl Write, stop: &AtomicBool) {
    let mut learned: HashMap<[u8; 6], usize> = HashMap::new();
    let mut frame = vec![0u8; MAX_FRAME];
    let mut held = HeldFrames::default();
    let mut random = Random::seeded();
    let mut link_free = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        while let Some((port, data)) = held.next_due(Instant::now()) {
            let _ = socket.send_to(&data, &ports[port]);
        }
        // Wake for the next held frame, and now and then to notice `stop`.
        let wait = held
            .next_time()
            .map_or(Duration::from_millis(200), |due| due.saturating_duration_since(Instant::now()))
            .clamp(Duration::from_millis(1), Duration::from_millis(200));
        let _ = socket.set_read_timeout(Some(wait));
        let (len, from) = match socket.recv_from(&mut frame) {
            Ok(received) => received,
            Err(_) => {
                // Idle: make the capture readable as it stands.
                let _ = pcap.flush();
                continue;
            }
        };
        // Frames from anything but a known port are dropped.
        let Some(source) = from.as_pathname().and_then(|p| ports.iter().position(|port| port == p)) else {
            continue;
        };
        if len < 14 {
            continue;
        }
        // The capture is a copy of the traffic; losing it must not stop the network.
        let _ = record(pcap, &frame[..len]);
        let destination: [u8; 6] = frame[0..6].try_into().expect("six bytes");
        let sender: [u8; 6] = frame[6..12].try_into().expect("six bytes");
        if sender[0] & 1 == 0 {
            learned.insert(sender, source);
        }
        let targets: Vec<usize> = match learned.get(&destination) {
            Some(&port) if destination[0] & 1 == 0 => vec![port],
            _ => (0..ports.len()).collect(),
        };
        let (targets, impairment) = {
            let rules = rules.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let allowed: Vec<usize> = targets
                .into_iter()
                .filter(|&port| port != source && rules.passes(nics[source].number, nics[port].number))
                .collect();
            (allowed, rules.impairments.get(&vlan).copied().unwrap_or_default())
        };
        if impairment.loss > 0.0 && random.next() < impairment.loss {
            continue;
        }
        let now = Instant::now();
        let mut due = now + impairment.delay;
        if !impairment.jitter.is_zero() {
            let swing = impairment.jitter.as_secs_f64() * (2.0 * random.next() - 1.0);
            due = if swing >= 0.0 { due + Duration::from_secs_f64(swing) } else { due - Duration::from_secs_f64(-swing) };
        }
        let mut link_free_after = link_free;
        if let Some(rate) = impairment.rate_bps.filter(|r| *r > 0) {
            link_free_after = link_free.max(now) + Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            due = due.max(link_free_after);
        }
        if due > now && !held.has_room_for(targets.len()) {
            continue;
        }
        link_free = link_free_after;
        let talks = !resolves_addresses(&frame[..len]);
        if talks {
            contacts.note(nics[source].number, || describe(&frame[..len]));
        }
        for port in targets {
            let delivered = if due <= now {
                // A node that is not running has no socket: its frames are
                // lost, as on a cable with nothing at the other end.
                socket.send_to(&frame[..len], &ports[port]).is_ok()
            } else {
                held.hold(due, port, &frame[..len]);
                true
            };
            if talks && delivered {
                contacts.note(nics[port].number, || describe(&frame[..len]));
            }
        }
    }
    let _ = pcap.flush();
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
    fn link_conditions_read_as_tc_writes_them() {
        assert_eq!(parse_time("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_time("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_time(" 500 us"), Some(Duration::from_micros(500)));
        assert_eq!(parse_time("200"), None, "a time needs its unit");
        assert_eq!(parse_time("200 fortnights"), None);
        assert_eq!(parse_time("-1s"), None);
        assert_eq!(parse_percent("1%"), Some(0.01));
        assert_eq!(parse_percent("0.5 %"), Some(0.005));
        assert_eq!(parse_percent("150%"), None);
        assert_eq!(parse_percent("0.1"), None);
        assert_eq!(parse_rate("10mbit"), Some(10_000_000));
        assert_eq!(parse_rate("1Gbit"), Some(1_000_000_000));
        assert_eq!(parse_rate("100kbit"), Some(100_000));
        assert_eq!(parse_rate("1kibit"), Some(1024));
        assert_eq!(parse_rate("1mbps"), Some(8_000_000), "bps is bytes per second, as in tc");
        assert_eq!(parse_rate("10 mbit"), Some(10_000_000));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("10"), None);
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
        let rules = SharedRules::default();
        let contacts = Arc::new(Contacts::default());
        let _switch = Switch::start(dir.path(), 1, nics.clone(), rules.clone(), contacts.clone(), &dir.path().join("v1.pcap")).unwrap();
        let switch = switch_socket(dir.path(), 1);
        let (a, b) = ([0x52, 0x54, 0, 0x12, 1, 1], [0x52, 0x54, 0, 0x12, 1, 2]);

        // Address resolution is no contact between nodes.
        let mut arp = frame([0xff; 6], a, &[0; 28]);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        sockets[0].send_to(&arp, &switch).unwrap();
        assert!(receive(&sockets[1]).is_some());
        assert!(receive(&sockets[2]).is_some());
        assert_eq!((contacts.first(1), contacts.first(2)), (None, None));

        // a → b: b is unknown, so everyone but a hears it.
        sockets[0].send_to(&frame(b, a, b"hello"), &switch).unwrap();
        assert!(receive(&sockets[1]).is_some());
        assert!(receive(&sockets[2]).is_some());
        assert!(receive(&sockets[0]).is_none());
        for node in [1, 2, 3] {
            assert!(contacts.first(node).is_some(), "node {node} is not noted");
        }

        // b → a: a was learned, so only a hears it.
        sockets[1].send_to(&frame(a, b, b"reply"), &switch).unwrap();
        assert_eq!(&receive(&sockets[0]).unwrap()[14..], b"reply");
        assert!(receive(&sockets[2]).is_none());

        // Partitioned away from a, b hears nothing.
        rules.lock().unwrap().groups = Some(HashMap::from([(1, 0), (2, 1), (3, 1)]));
        sockets[0].send_to(&frame(b, a, b"apart"), &switch).unwrap();
        assert!(receive(&sockets[1]).is_none());
        sockets[2].send_to(&frame(b, [0x52, 0x54, 0, 0x12, 1, 3], b"together"), &switch).unwrap();
        assert_eq!(&receive(&sockets[1]).unwrap()[14..], b"together");
        rules.lock().unwrap().groups = None;

        // A lossy VLAN drops; a slow one holds frames back for the delay.
        rules.lock().unwrap().impairments.insert(1, Impairment { loss: 1.0, ..Impairment::default() });
        sockets[1].send_to(&frame(a, b, b"lost"), &switch).unwrap();
        assert!(receive(&sockets[0]).is_none());
        rules.lock().unwrap().impairments.insert(1, Impairment { delay: Duration::from_millis(250), ..Impairment::default() });
        let sent = std::time::Instant::now();
        sockets[1].send_to(&frame(a, b, b"late"), &switch).unwrap();
        assert_eq!(&receive(&sockets[0]).unwrap()[14..], b"late");
        assert!(sent.elapsed() >= Duration::from_millis(250));
        rules.lock().unwrap().impairments.clear();

        // A stranger's frames go nowhere.
        let stranger = UnixDatagram::bind(dir.path().join("stranger")).unwrap();
        stranger.send_to(&frame([0xff; 6], [2, 0, 0, 0, 0, 9], b"x"), &switch).unwrap();
        assert!(receive(&sockets[0]).is_none());

        // Every frame that entered from a port is in the capture.
        drop(_switch);
        let pcap = std::fs::read(dir.path().join("v1.pcap")).unwrap();
        assert_eq!(&pcap[..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(pcap.windows(5).filter(|w| *w == b"hello").count(), 1);
        assert_eq!(pcap.windows(8).filter(|w| *w == b"together").count(), 1);
    }

    #[test]
    fn address_resolution_is_told_from_traffic() {
        let ipv6 = |next: u8, rest: &[u8]| {
            let mut packet = frame([0x33, 0x33, 0, 0, 0, 1], [2; 6], &[0; 40]);
            packet[12..14].copy_from_slice(&[0x86, 0xdd]);
            packet[20] = next;
            packet.extend_from_slice(rest);
            packet
        };
        let ipv4 = |protocol: u8| {
            let mut packet = frame([0xff; 6], [2; 6], &[0; 20]);
            packet[23] = protocol;
            packet
        };
        // Neighbour solicitation; MLDv2 report behind a hop-by-hop header.
        assert!(resolves_addresses(&ipv6(58, &[135, 0, 0, 0])));
        assert!(resolves_addresses(&ipv6(0, &[58, 0, 5, 2, 0, 0, 1, 0, 143, 0])));
        assert!(resolves_addresses(&ipv4(2)));
        // An echo request, TCP, UDP: traffic.
        assert!(!resolves_addresses(&ipv6(58, &[128, 0, 0, 0])));
        assert!(!resolves_addresses(&ipv6(6, &[0; 20])));
        assert!(!resolves_addresses(&ipv4(17)));
        let mut tcp = ipv4(6);
        tcp[26..34].copy_from_slice(&[192, 168, 1, 2, 192, 168, 1, 1]);
        assert_eq!(describe(&tcp), "IPv4 TCP from 192.168.1.2 to 192.168.1.1");
    }

    #[test]
    fn held_frames_leave_in_due_order_and_stop_at_netems_limit() {
        let mut held = HeldFrames::default();
        let now = Instant::now();
        held.hold(now + Duration::from_millis(20), 1, b"later");
        held.hold(now + Duration::from_millis(10), 2, b"sooner");
        held.hold(now + Duration::from_millis(10), 3, b"sooner too");
        assert_eq!(held.next_due(now), None);
        assert_eq!(held.next_time(), Some(now + Duration::from_millis(10)));
        let after = now + Duration::from_millis(30);
        assert_eq!(held.next_due(after), Some((2, b"sooner".to_vec())));
        assert_eq!(held.next_due(after), Some((3, b"sooner too".to_vec())));
        assert_eq!(held.next_due(after), Some((1, b"later".to_vec())));
        for _ in 0..HELD_LIMIT - 1 {
            held.hold(now, 0, b"x");
        }
        assert!(held.has_room_for(1));
        assert!(!held.has_room_for(2));
    }
}
