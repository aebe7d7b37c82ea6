//! A VLAN's packet capture read back as conversations, for the report:
//! who talked to whom, over what, how much and when. Reads the classic
//! pcap format the switches write (Ethernet frames) and understands ARP,
//! RARP, IPv4, IPv6 (past its option headers), TCP, UDP and ICMP;
//! anything else is counted by its EtherType. A capture cut short (the
//! run was killed) is read up to its last whole record.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// One end of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// An IP address, or a MAC address where there is none.
    pub address: String,
    /// The TCP or UDP port.
    pub port: Option<u16>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) if self.address.contains(':') => write!(f, "[{}]:{port}", self.address),
            Some(port) => write!(f, "{}:{port}", self.address),
            None => f.write_str(&self.address),
        }
    }
}

/// The traffic between two endpoints over one protocol, both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// "TCP", "UDP", "ICMP", "ICMPv6", "ARP", or the protocol's number.
    pub protocol: String,
    /// The endpoint that sent first.
    pub from: Endpoint,
    /// The other.
    pub to: Endpoint,
    /// Frames from `from` to `to`, and back.
    pub frames: (u64, u64),
    /// Bytes on the wire, both ways together.
    pub bytes: u64,
    /// When its first and last frames were captured, from the capture's
    /// first frame.
    pub first: Duration,
    /// See `first`.
    pub last: Duration,
}

/// Why a capture could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct NotPcap;

/// The conversations in `capture`, in the order they began.
pub fn conversations(capture: &[u8]) -> Result<Vec<Conversation>, NotPcap> {
    let (big_endian, nanos) = match capture.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1]) => (false, false),
        Some([0xa1, 0xb2, 0xc3, 0xd4]) => (true, false),
        Some([0x4d, 0x3c, 0xb2, 0xa1]) => (false, true),
        Some([0xa1, 0xb2, 0x3c, 0x4d]) => (true, true),
        _ => return Err(NotPcap),
    };
    let word = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = capture.get(at..at + 4)?.try_into().ok()?;
        Some(if big_endian { u32::from_be_bytes(bytes) } else { u32::from_le_bytes(bytes) })
    };
    // Ethernet only: the switches write nothing else.
    if word(20) != Some(1) {
        return Err(NotPcap);
    }
    let mut found: Vec<Conversation> = Vec::new();
    let mut index: BTreeMap<(String, Endpoint, Endpoint), usize> = BTreeMap::new();
    let mut offset = 24;
    let mut origin = None;
    while let (Some(seconds), Some(fraction), Some(captured), Some(length)) = (word(offset), word(offset + 4), word(offset + 8), word(offset + 12)) {
        let start = offset + 16;
        let Some(frame) = capture.get(start..start + captured as usize) else { break };
        offset = start + captured as usize;
        let at = Duration::new(u64::from(seconds), if nanos { fraction } else { fraction.saturating_mul(1000) }.min(999_999_999));
        let at = at.saturating_sub(*origin.get_or_insert(at));
        let Some((protocol, from, to)) = parties(frame) else { continue };
        let key = if from <= to { (protocol.clone(), from.clone(), to.clone()) } else { (protocol.clone(), to.clone(), from.clone()) };
        let slot = *index.entry(key).or_insert_with(|| {
            found.push(Conversation { protocol, from: from.clone(), to, frames: (0, 0), bytes: 0, first: at, last: at });
            found.len() - 1
        });
        let conversation = &mut found[slot];
        if conversation.from == from {
            conversation.frames.0 += 1;
        } else {
            conversation.frames.1 += 1;
        }
        conversation.bytes += u64::from(length);
        conversation.last = at;
    }
    Ok(found)
}

/// The protocol and the two ends of one Ethernet frame.
fn parties(frame: &[u8]) -> Option<(String, Endpoint, Endpoint)> {
    let mac = |at: usize| -> Option<Endpoint> {
        let bytes = frame.get(at..at + 6)?;
        let text: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Some(Endpoint { address: text.join(":"), port: None })
    };
    let (mut ethertype, mut payload) = (u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?), 14);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes(frame.get(16..18)?.try_into().ok()?);
        payload = 18;
    }
    let packet = &frame[payload..];
    match ethertype {
        0x0800 => {
            let header = usize::from(packet.first()? & 0x0f) * 4;
            let source = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
            let target = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?);
            Some(transport(*packet.get(9)?, packet.get(header..)?, source.into(), target.into()))
        }
        0x86dd => {
            let source = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?);
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(24..40)?).ok()?);
            // Past the hop-by-hop, routing and destination options headers
            // (MLD reports carry a hop-by-hop one).
            let (mut next, mut at) = (*packet.get(6)?, 40);
            while matches!(next, 0 | 43 | 60) {
                let header = packet.get(at..at + 2)?;
                next = header[0];
                at += (usize::from(header[1]) + 1) * 8;
            }
            Some(transport(next, packet.get(at..)?, source.into(), target.into()))
        }
        0x0806 => {
            // Sender and target protocol addresses of an IPv4 ARP packet.
            let sender = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(14..18)?).ok()?);
            let target = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(24..28)?).ok()?);
            let end = |address: Ipv4Addr| Endpoint { address: address.to_string(), port: None };
            Some(("ARP".into(), end(sender), end(target)))
        }
        // QEMU announces a restored NIC with RARP frames.
        0x8035 => Some(("RARP".into(), mac(6)?, mac(0)?)),
        other => Some((format!("EtherType 0x{other:04x}"), mac(6)?, mac(0)?)),
    }
}

/// The protocol and ends of an IP packet whose payload is `segment`.
fn transport(protocol: u8, segment: &[u8], source: IpAddr, target: IpAddr) -> (String, Endpoint, Endpoint) {
    let port = |at: usize| segment.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (name, ports) = match protocol {
        6 => ("TCP".to_string(), true),
        17 => ("UDP".to_string(), true),
        1 => ("ICMP".to_string(), false),
        58 => ("ICMPv6".to_string(), false),
        other => (format!("IP protocol {other}"), false),
    };
    let end = |address: IpAddr, port: Option<u16>| Endpoint { address: address.to_string(), port: if ports { port } else { None } };
    (name, end(source, port(0)), end(target, port(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(frames: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut pcap = Vec::new();
        for field in [0xa1b2_c3d4u32.to_le_bytes().as_slice(), &2u16.to_le_bytes(), &4u16.to_le_bytes(), &[0; 8], &65535u32.to_le_bytes(), &1u32.to_le_bytes()] {
            pcap.extend_from_slice(field);
        }
        for (micros, frame) in frames {
            let len = frame.len() as u32;
            for field in [100u32, *micros, len, len] {
                pcap.extend_from_slice(&field.to_le_bytes());
            }
            pcap.extend_from_slice(frame);
        }
        pcap
    }

    fn tcp_v4(source: [u8; 4], source_port: u16, target: [u8; 4], target_port: u16) -> Vec<u8> {
        let mut frame = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&source);
        ip.extend_from_slice(&target);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&source_port.to_be_bytes());
        frame.extend_from_slice(&target_port.to_be_bytes());
        frame.extend_from_slice(&[0; 16]);
        frame
    }

    #[test]
    fn both_directions_of_a_connection_are_one_conversation() {
        let client = [192, 168, 1, 2];
        let server = [192, 168, 1, 1];
        let frames = [(0, tcp_v4(client, 40000, server, 4000)), (500, tcp_v4(server, 4000, client, 40000)), (900, tcp_v4(client, 40000, server, 4000))];
        let found = conversations(&capture(&frames)).unwrap();
        assert_eq!(found.len(), 1);
        let conversation = &found[0];
        assert_eq!((conversation.protocol.as_str(), conversation.from.to_string(), conversation.to.to_string()), ("TCP", "192.168.1.2:40000".into(), "192.168.1.1:4000".into()));
        assert_eq!((conversation.frames, conversation.bytes), ((2, 1), 3 * 54));
        assert_eq!((conversation.first, conversation.last), (Duration::ZERO, Duration::from_micros(900)));
    }

    #[test]
    fn a_capture_cut_short_is_read_to_its_last_whole_frame_and_other_files_are_refused() {
        let mut pcap = capture(&[(0, tcp_v4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2)), (1, tcp_v4([10, 0, 0, 1], 3, [10, 0, 0, 2], 4))]);
        pcap.truncate(pcap.len() - 10);
        assert_eq!(conversations(&pcap).unwrap().len(), 1);
        assert_eq!(conversations(b"not a capture at all"), Err(NotPcap));
    }
}
