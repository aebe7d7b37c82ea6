//! Connecting to sockets inside the guest: the driver's `Connect` probes
//! (`wait_for_open_port` and friends) and forwarded connections.
//!
//! Names are looked up in `/etc/hosts` here rather than through the C
//! library: the agent is a static binary, whose resolver cannot load the
//! guest's NSS modules, and a test node has no DNS anyway.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use vmrig_proto::{Reply, SocketTarget};

/// How long a connection attempt may take: a firewall that drops packets
/// never refuses.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Tries `target` and hangs up: `Ack` if it accepted.
pub fn probe(target: &SocketTarget) -> Reply {
    let connected = match target {
        SocketTarget::Tcp { host, port } => connect_tcp(host, *port).map(drop),
        SocketTarget::UnixStream { path } => UnixStream::connect(path).map(drop),
        SocketTarget::UnixDatagram { path } => UnixDatagram::unbound().and_then(|socket| socket.connect(path)),
    };
    match connected {
        Ok(()) => Reply::Ack,
        Err(error) => Reply::Error { message: error.to_string() },
    }
}

/// Connects to `port` of `host` (an address, `localhost`, or a name in
/// `/etc/hosts`), trying each of its addresses in turn.
pub fn connect_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    let addresses = addresses_of(host, &hosts);
    if addresses.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("unknown host {host}")));
    }
    let mut last_error = None;
    for address in addresses {
        match TcpStream::connect_timeout(&SocketAddr::new(address, port), CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.expect("at least one address was tried"))
}

/// The addresses `host` stands for, given the text of `/etc/hosts`.
fn addresses_of(host: &str, hosts_file: &str) -> Vec<IpAddr> {
    if let Ok(address) = host.trim_start_matches('[').trim_end_matches(']').parse() {
        return vec![address];
    }
    let mut addresses: Vec<IpAddr> = hosts_file
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?.parse().ok()?;
            fields.any(|name| name.eq_ignore_ascii_case(host)).then_some(address)
        })
        .collect();
    if addresses.is_empty() && host.eq_ignore_ascii_case("localhost") {
        addresses = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_in_the_hosts_file() {
        let hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n192.168.1.2 server\n# 10.0.0.1 server\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(addresses_of("server", hosts), [ip("192.168.1.2")]);
        assert_eq!(addresses_of("localhost", hosts), [ip("127.0.0.1"), ip("::1")]);
        assert_eq!(addresses_of("localhost", ""), [ip("127.0.0.1"), ip("::1")]);
        assert_eq!(addresses_of("10.1.2.3", ""), [ip("10.1.2.3")]);
        assert_eq!(addresses_of("[2001:db8::1]", ""), [ip("2001:db8::1")]);
        assert!(addresses_of("client", hosts).is_empty());
    }

    #[test]
    fn probes_tell_listening_sockets_from_absent_ones() {
        let dir = std::env::temp_dir().join(format!("vmrig-agent-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let stream_path = dir.join("stream");
        let datagram_path = dir.join("datagram");
        let _stream = std::os::unix::net::UnixListener::bind(&stream_path).unwrap();
        let _datagram = UnixDatagram::bind(&datagram_path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        assert_eq!(probe(&SocketTarget::Tcp { host: "127.0.0.1".into(), port }), Reply::Ack);
        assert_eq!(probe(&SocketTarget::UnixStream { path: path(&stream_path) }), Reply::Ack);
        assert_eq!(probe(&SocketTarget::UnixDatagram { path: path(&datagram_path) }), Reply::Ack);
        drop(tcp);
        assert!(matches!(probe(&SocketTarget::Tcp { host: "127.0.0.1".into(), port }), Reply::Error { .. }));
        assert!(matches!(probe(&SocketTarget::UnixStream { path: path(&dir.join("none")) }), Reply::Error { .. }));
        assert!(matches!(probe(&SocketTarget::UnixDatagram { path: path(&stream_path) }), Reply::Error { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }
}
