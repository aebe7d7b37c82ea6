//! Networks on real VMs: nodes reach each other by name through the
//! driver's switch, the firewall admits only the allowed ports, blocks and
//! partitions cut links until lifted, every VLAN is captured, nothing
//! leads out of the test to the host, and forwarded ports lead in from the
//! host's loopback only.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::run;

#[test]
fn the_reference_example_passes_end_to_end() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nix-is-cool");
    let test = tempfile::tempdir().unwrap();
    for file in ["vmrig.toml", "main.py"] {
        fs::copy(example.join(file), test.path().join(file)).unwrap();
    }
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("client: must succeed: curl http://server:4000/"), "{output}");
    assert!(output.contains("\nTest was successful\n"), "{output}");
    let server_console = fs::read_to_string(test.path().join("result/nodes/server/console.log")).unwrap();
    assert!(server_console.contains("vmrig-init: starting systemd"));

    let capture = test.path().join("result/vlan1.pcap");
    let bytes = fs::read(&capture).unwrap();
    assert!(bytes.windows(14).any(|w| w == b"GET / HTTP/1.1"), "the capture lacks the request");
    let dump = Command::new("tcpdump").arg("-nr").arg(&capture).arg("tcp port 4000").output().unwrap();
    let dump_text = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    assert!(dump_text.contains("192.168.1.1.") && dump_text.contains("192.168.1.2.4000"), "{dump_text}");
}

const TWO_NODES: &str = r#"
[defaults]
packages = ["busybox", "curl"]

[nodes.server]
firewall.allowed_tcp_ports = [8000]
files."/srv/www/index.html" = { text = "served" }

[nodes.server.services.open]
wanted_by = ["multi-user.target"]
exec_start = "/bin/busybox httpd -f -p 8000 -h /srv/www"

[nodes.server.services.closed]
wanted_by = ["multi-user.target"]
exec_start = "/bin/busybox httpd -f -p 8001 -h /srv/www"

[nodes.client]
"#;

#[test]
fn the_firewall_admits_the_allowed_port_and_ping_only() {
    let test = tempfile::tempdir().unwrap();
    let script = r#"
[test]
script = '''
start_all()
server.wait_for_unit("open.service")
server.wait_for_unit("closed.service")
client.wait_for_unit("default.target")
assert client.succeed("curl -sf --max-time 5 http://server:8000/index.html") == "served"
client.fail("curl -sf --max-time 5 http://server:8001/index.html")
server.succeed("curl -sf --max-time 5 http://localhost:8001/index.html")
client.succeed("busybox ping -c 1 -W 5 server")
client.succeed("busybox ping -c 1 -W 5 2001:db8:1::2")
assert "192.168.1.2/24" in server.succeed("ip -4 -o address show")
'''
"#;
    fs::write(test.path().join("vmrig.toml"), format!("{TWO_NODES}{script}")).unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
}

#[test]
fn blocks_partitions_and_impairments_act_until_lifted() {
    let test = tempfile::tempdir().unwrap();
    let script = r#"
[test]
script = '''
start_all()
ping = "busybox ping -c 1 -W 3 server"
client.succeed(ping)
server.block()
client.fail(ping)
server.unblock()
client.succeed(ping)
partition([client], [server])
client.fail(ping)
heal()
client.succeed(ping)
assert server.ip == "192.168.1.2" and server.ipv6 == "2001:db8:1::2" and [v.nr for v in vlans] == [1]
vlan(1).impair(loss=1.0)
client.fail(ping)
vlan(1).impair(delay=0.4)
rtt = float(client.succeed(ping).split("round-trip min/avg/max = ")[1].split("/")[0])
assert rtt >= 800, f"a round trip took {rtt} ms through 0.4 s of delay each way"
vlan(1).impair()
client.succeed(ping)
'''
"#;
    fs::write(test.path().join("vmrig.toml"), format!("{TWO_NODES}{script}")).unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("server: unplugging the link to its first VLAN"), "{output}");
    assert!(output.contains("partitioning the network"), "{output}");
}

/// The host's own IPv4 addresses, loopback excepted.
fn host_addresses() -> Vec<String> {
    let addresses = Command::new("ip").args(["-4", "-o", "address", "show"]).output().unwrap();
    let host_ips: Vec<String> = String::from_utf8_lossy(&addresses.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .filter(|ip| !ip.starts_with("127."))
        .map(str::to_string)
        .collect();
    assert!(!host_ips.is_empty(), "the host has no address to try");
    host_ips
}

#[test]
fn a_guest_cannot_reach_the_host() {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_ips = host_addresses();
    let attempts: String = host_ips
        .iter()
        .map(|ip| format!("client.fail(\"curl -sf --max-time 3 http://{ip}:{port}/\")\n"))
        .collect();
    let test = tempfile::tempdir().unwrap();
    let script = format!(
        "[test]\nscript = '''\nserver.wait_for_unit(\"open.service\")\nassert client.succeed(\"ip route show default\") == \"\"\n{attempts}client.succeed(\"curl -sf --max-time 5 http://server:8000/index.html\")\n'''\n"
    );
    fs::write(test.path().join("vmrig.toml"), format!("{TWO_NODES}{script}")).unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(listener.accept().is_err(), "a guest connected to the host");
}

#[test]
fn forwarded_ports_reach_guest_ports_from_host_loopback_only() {
    // A port free now, asked for by number as NixOS scripts do.
    let fixed_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let test = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
[test]
script = '''
import hashlib, socket, urllib.request

def fetch(port, path):
    return urllib.request.urlopen(f"http://127.0.0.1:{{port}}/{{path}}", timeout=60).read()

# 8001 is closed by the firewall: a forward goes in through the guest's loopback.
assert server.forward_port({fixed_port}, 8001) == {fixed_port}
server.wait_for_unit("closed.service")
assert fetch({fixed_port}, "index.html") == b"served"

# Many times the tunnel's window, and checked byte for byte.
any_port = server.forward_port(0, 8000)
digest = server.succeed("head -c 3000000 /dev/urandom | tee /srv/www/big | sha256sum").split()[0]
assert hashlib.sha256(fetch(any_port, "big")).hexdigest() == digest

# Nothing listens on guest port 9: the connection is closed.
nothing = server.forward_port(0, 9)
with socket.create_connection(("127.0.0.1", nothing), timeout=30) as s:
    assert s.recv(1) == b""

# Loopback only.
for ip in {host_ips:?}:
    try:
        socket.create_connection((ip, {fixed_port}), timeout=5).close()
        raise AssertionError(f"the forward answered on {{ip}}")
    except ConnectionRefusedError:
        pass

# Forwards outlive a reboot.
server.reboot()
server.wait_for_unit("closed.service")
assert fetch({fixed_port}, "index.html") == b"served"
'''
"#,
        host_ips = host_addresses()
    );
    fs::write(test.path().join("vmrig.toml"), format!("{TWO_NODES}{script}")).unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains(&format!("server: forwarding 127.0.0.1:{fixed_port} to guest port 8001")), "{output}");
    assert!(output.contains("server: a connection through the tunnel failed: cannot connect to port 9: "), "{output}");
}
