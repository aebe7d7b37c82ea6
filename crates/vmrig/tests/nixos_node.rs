//! A node as a NixOS test script sees it, on real VMs: interface names,
//! the shell commands run in, daemons started in the background, the
//! attributes of `Machine`, the service manager's settings, its packages'
//! documentation, sockets the node changes or adds, its hosts
//! file, the shell commands the calls make of their arguments, the shared
//! folder at `/tmp/shared`, and `block()` as an unplugged cable. Each check
//! is something a nixpkgs test relies on; the test runs with templates and
//! with cold boots (`scripts/test`).

mod common;

use std::fs;

use common::run;

#[test]
fn a_node_is_what_nixos_test_scripts_expect() {
    let test = tempfile::tempdir().unwrap();
    let definition = r#"
[defaults]
packages = ["busybox", "curl", "uuid-runtime", "systemd-journal-remote"]

[nodes.server]
firewall.allowed_tcp_port_ranges = [{ from = 7000, to = 7010 }]
# Another node's name mapped elsewhere, as a NixOS test's networking.hosts.
extra_hosts = { "fe00:aa:bb:cc::2" = ["web_client"] }
files."/etc/profile.d/vmrig-test.sh" = { text = "export FROM_PROFILE=profile-was-read\n" }
files."/srv/www/index.html" = { text = "served" }
users.alice = { password = "secret", group = "devs", groups = ["audio", "testers"], uid = 1500 }
drop_ins."dpkg-db-backup.service" = "[Service]\nEnvironment=FROM_DROP_IN=yes\n"
units."tick.timer" = { unit = "[Timer]\nOnActiveSec=1\n", wanted_by = ["timers.target"] }
# A packaged socket (enabled, listening before the node's files are there
# on a node restored from a template) moved elsewhere, and one Debian
# leaves disabled added to sockets.target by a drop-in.
drop_ins."uuidd.socket" = "[Socket]\nListenStream=\nListenStream=/run/uuidd/node-request\n"
drop_ins."sockets.target" = "[Unit]\nWants=systemd-journal-remote.socket\n"

[nodes.server.services.tick]
unit = "[Service]\nType=oneshot\nExecStart=/bin/touch /run/ticked\n"

[nodes.server.services.sleeper]
unit = "[Service]\nExecStart=/bin/sleep infinity\n"
wanted_by = ["multi-user.target"]

[nodes.web_client]
interfaces.lan = { vlan = 1 }

[test]
script = '''
import hashlib
import time

assert not server.booted and not server.connected and server.pid is None
start_all()

with subtest("the root shell of a NixOS test node"):
    shell = server.succeed('echo "$USER $HOME $PWD $DISPLAY [$PAGER] $FROM_PROFILE"')
    assert shell == "root /root /tmp :0.0 [] profile-was-read\n", shell
    server.succeed("echo relative > out")
    assert server.succeed("cat /tmp/out") == "relative\n"
    # Commands run under `set -euo pipefail`.
    server.fail("false; true")
    server.fail("false | true")
    server.fail("echo $NOT_SET_ANYWHERE")

with subtest("a daemon started with >&2 & keeps running and printing"):
    server.succeed("(sleep 1; echo daemon-said-hello >&2; exec busybox httpd -f -vv -p 7000 -h /srv/www) >&2 &")
    started = time.monotonic()
    server.wait_for_console_text("daemon-said-hello")
    web_client.wait_until_succeeds("curl -sf --max-time 5 http://server:7000/index.html")

with subtest("interfaces are named as on NixOS"):
    assert f"{server.ip}/24" in server.succeed("ip -4 -o address show dev eth1")
    server.succeed("ip link show eth1")
    server.fail("ip link show eth0")
    # A node may name its interfaces, as virtualisation.interfaces does.
    web_client.succeed("ip link show lan")
    web_client.fail("ip link show eth1")

with subtest("execute answers early when told not to wait"):
    assert server.execute("echo early; exec >&-; sleep 60", check_return=False) == (-1, "early\n")
    assert server.execute("sleep 60", check_output=False) == (-2, "")

with subtest("the Machine attributes of NixOS's driver"):
    for m in machines:
        assert m.booted and m.connected and m.pid > 0, m
        assert m.state_dir.is_dir() and m.out_dir.is_dir() and m.tmp_dir.is_dir() and m.shared_dir.is_dir(), m
        assert m.qmp_path.exists() and m.shell_path.exists(), m
        assert m.keep_machine_state is False and m.process is None and m.monitor_path is None
        assert m.callbacks == [] and isinstance(m.full_console_log, list)
        m.logger.info(f"{m.name} logs through its logger")

    def name_of(node: Machine) -> str:
        return node.name

    assert name_of(server) == "server" and repr(server) == "<Machine 'server'>"
    called = []
    web_client.callbacks.append(lambda: called.append(True))
    web_client.succeed("true")
    web_client.execute("true")
    assert called == [True, True]
    web_client.callbacks.clear()

with subtest("a test node's service manager and kernel settings"):
    assert server.succeed("systemctl show -p DefaultTimeoutStartUSec") == "DefaultTimeoutStartUSec=5min\n"
    assert server.succeed("systemctl show -p DefaultDeviceTimeoutUSec") == "DefaultDeviceTimeoutUSec=5min\n"
    assert server.succeed("cat /proc/sys/vm/panic_on_oom") == "2\n"
    assert server.succeed("cat /proc/sys/kernel/hung_task_timeout_secs") == "600\n"
    server.succeed("grep -q '^root::' /etc/shadow")
    server.fail("ip route show default | grep -q .")
    # Every file its packages install, documentation included.
    server.succeed("test -s /usr/share/doc/busybox/copyright && ls /usr/share/doc/nftables/examples/*.nft")
    server.succeed("test -f /usr/share/man/man1/curl.1.gz")

with subtest("users, units and drop-ins as the definition declares them"):
    assert server.succeed("id -u alice; id -gn alice") == "1500\ndevs\n"
    assert set(server.succeed("id -Gn alice").split()) == {"devs", "audio", "testers"}
    server.succeed("""hash=$(getent shadow alice | cut -d: -f2); test "$(perl -e 'print crypt($ARGV[0], $ARGV[1])' secret "$hash")" = "$hash" """)
    server.wait_for_unit("sleeper.service", timeout=60)
    server.wait_for_file("/run/ticked", timeout=60)
    assert "FROM_DROP_IN=yes" in server.succeed("systemctl show -p Environment dpkg-db-backup.service")
    # As systemd names it, and as its name resolves; its own machine-id,
    # booted cold or restored.
    assert web_client.succeed("hostname") == "webclient\n"
    assert server.succeed("cat /etc/machine-id") != web_client.succeed("cat /etc/machine-id")
    server.succeed("getent hosts web_client")
    # The node's own hosts lines come before the test's, as on NixOS: the
    # first address of the name is the node's own mapping.
    assert server.succeed("getent hosts web_client | head -n1").split()[0] == "fe00:aa:bb:cc::2"
    assert server.succeed("getent ahostsv4 web_client | head -n1").split()[0] == web_client.ip

with subtest("sockets the node changed or added listen as after a boot"):
    server.wait_for_open_unix_socket("/run/uuidd/node-request", timeout=60)
    connect = "perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Peer => shift) or die qq($!)' "
    server.fail(connect + "/run/uuidd/request")
    server.succeed(connect + "/run/uuidd/node-request")
    server.wait_for_unit("uuidd.service", timeout=60)
    server.wait_for_open_port(19532, timeout=60)

with subtest("wait_for_file takes a glob, as NixOS's runs test -e unquoted"):
    server.succeed("mkdir -p /var/spool/vmrig && touch /var/spool/vmrig/d00042-001")
    server.wait_for_file("/var/spool/vmrig/d*-001", timeout=30)

with subtest("block() unplugs the cable and unblock() plugs it back"):
    server.block()
    assert server.succeed("cat /sys/class/net/eth1/carrier") == "0\n"
    web_client.fail("curl -sf --max-time 3 http://server:7000/index.html")
    server.unblock()
    web_client.succeed("curl -sf --max-time 10 http://server:7000/index.html")
    assert server.succeed("cat /sys/class/net/eth1/carrier") == "1\n"

with subtest("every node sees the run's shared folder at /tmp/shared"):
    (server.shared_dir / "from-host").write_text("host wrote this")
    assert web_client.succeed("cat /tmp/shared/from-host") == "host wrote this"
    server.succeed("mountpoint -q /tmp/shared")
    server.succeed("mkdir -p /tmp/shared/backup && head -c 3000000 /dev/urandom > /tmp/shared/backup/base.tar")
    digest = server.succeed("cd /tmp/shared/backup && sha256sum base.tar")
    assert web_client.succeed("cd /tmp/shared/backup && sha256sum base.tar") == digest
    assert hashlib.sha256((server.shared_dir / "backup/base.tar").read_bytes()).hexdigest() == digest.split()[0]
    web_client.succeed("mv /tmp/shared/backup /tmp/shared/restored && echo appended >> /tmp/shared/from-host")
    assert server.succeed("ls /tmp/shared/restored && tail -c 9 /tmp/shared/from-host") == "base.tar\nappended\n"
    # Open to every user of the node, as NixOS's is.
    server.succeed("runuser -u alice -- sh -c 'echo mine > /tmp/shared/alice && cat /tmp/shared/alice'")
    server.succeed("rm -r /tmp/shared/restored /tmp/shared/alice")
    assert sorted(p.name for p in server.shared_dir.iterdir()) == ["from-host"]

with subtest("the daemon still answers a minute and many commands later"):
    time.sleep(max(0, 60 - (time.monotonic() - started)))
    assert web_client.succeed("curl -sf --max-time 5 http://server:7000/index.html") == "served"
'''
"#;
    fs::write(test.path().join("vmrig.toml"), definition).unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("server: unplugging the link to its first VLAN"), "{output}");
    // The daemon's request log, printed long after its command returned,
    // is in the node's console log.
    let console = fs::read_to_string(test.path().join("result/nodes/server/console.log")).unwrap();
    assert!(console.contains("daemon-said-hello"), "{console}");
    assert!(console.contains("url:/index.html"), "the daemon's later output is not on the console:\n{console}");
}
