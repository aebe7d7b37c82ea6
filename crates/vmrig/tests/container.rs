//! Container nodes on real `systemd-nspawn` containers, from the node's
//! own image: the reference example with both nodes as containers, and
//! with each beside a VM on one VLAN; a container node's NIC, machine-id,
//! shared folder, copies, background children, firewall, memory and CPU limits,
//! power failure, reboot and cable; and what it cannot see or do of the host. Each run
//! must leave no container behind, nor a vmrig killed with SIGKILL.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use common::run;

/// The pids of the `systemd-nspawn` processes a run's log names.
fn nspawn_pids(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter_map(|line| line.split_once("systemd-nspawn running (pid ")?.1.split(')').next()?.parse().ok())
        .collect()
}

/// Held (shared) by the tests that check no cgroup of an ended run is
/// left, and alone by the one that leaves some on purpose (a vmrig killed
/// with SIGKILL) until `vmrig gc` removes them.
static CGROUPS: RwLock<()> = RwLock::new(());

/// Asserts that none of the containers a run started outlived it, nor
/// their cgroups (`vmrig-<vmrig's pid>-<node>`: those of a vmrig that
/// has ended; other tests' runs may be going on).
fn assert_nothing_left(output: &str) {
    let pids = nspawn_pids(output);
    assert!(!pids.is_empty(), "no container started:\n{output}");
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "systemd-nspawn {pid} outlived its run");
    }
    let cgroups: Vec<_> = ["/sys/fs/cgroup", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.strip_prefix("vmrig-").and_then(|rest| rest.split('-').next()).is_some_and(|pid| !Path::new("/proc").join(pid).exists()))
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

fn reference_example(kinds: [&str; 2]) -> tempfile::TempDir {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nix-is-cool");
    let test = tempfile::tempdir().unwrap();
    fs::copy(example.join("main.py"), test.path().join("main.py")).unwrap();
    let definition = fs::read_to_string(example.join("vmrig.toml")).unwrap();
    let definition = definition.replace("[nodes.server", &format!("[{}.server", kinds[0])).replace("[nodes.client", &format!("[{}.client", kinds[1]));
    fs::write(test.path().join("vmrig.toml"), definition).unwrap();
    test
}

#[test]
fn the_reference_example_passes_as_containers_and_each_beside_a_vm() {
    let _cgroups = CGROUPS.read().unwrap_or_else(|p| p.into_inner());
    for kinds in [["containers", "containers"], ["containers", "nodes"], ["nodes", "containers"]] {
        let test = reference_example(kinds);
        let (code, output) = run(test.path());
        assert_eq!(code, Some(0), "{kinds:?}:\n{output}");
        for (node, kind) in ["server", "client"].iter().zip(kinds) {
            assert_eq!(output.contains(&format!("{node}: a container (systemd-nspawn)")), kind == "containers", "{output}");
        }
        assert!(output.contains("\nTest was successful\n"), "{output}");
        // The report says which node was which.
        let report = fs::read_to_string(test.path().join("result/report.html")).unwrap();
        for (node, kind) in ["server", "client"].iter().zip(kinds) {
            let shown = format!("{node} ({})", if kind == "containers" { "container" } else { "VM" });
            assert!(report.contains(&shown), "the report does not say {shown}");
        }
        // The request crossed vmrig's switch, as between VMs.
        let capture = fs::read(test.path().join("result/vlan1.pcap")).unwrap();
        assert!(capture.windows(14).any(|w| w == b"GET / HTTP/1.1"), "the capture lacks the request");
        assert_nothing_left(&output);
    }
}

#[test]
fn a_container_node_behaves_as_a_node_and_sees_nothing_of_the_host() {
    let _cgroups = CGROUPS.read().unwrap_or_else(|p| p.into_inner());
    let test = tempfile::tempdir().unwrap();
    let marker = test.path().join("host-only");
    fs::write(&marker, "the host's").unwrap();
    fs::write(
        test.path().join("vmrig.toml"),
        format!(
            r#"
[defaults]
packages = ["busybox", "curl"]

[containers.server]
memory = 192
cpus = 1
firewall.allowed_tcp_ports = [8000]
files."/srv/www/index.html" = {{ text = "served" }}

[containers.server.services.open]
wanted_by = ["multi-user.target"]
exec_start = "/bin/busybox httpd -f -p 8000 -h /srv/www"

[containers.server.services.closed]
wanted_by = ["multi-user.target"]
exec_start = "/bin/busybox httpd -f -p 8001 -h /srv/www"

[containers.client]

[test]
script = '''
start_all()
assert machines_nspawn == machines and machines_qemu == [], (machines_nspawn, machines_qemu)
server.wait_for_unit("open.service")
server.wait_for_unit("closed.service")
server.wait_for_console_text("Reached target")

# Its NIC, name and addresses, and no other network.
server.succeed("ip -o addr show eth1 | grep -F 192.168.1.2/24")
server.succeed("test \"$(ls /sys/class/net | tr '\\n' ' ')\" = 'eth1 lo '")
server.fail("ip route | grep default")
assert server.succeed("hostname").strip() == "server"
assert server.succeed("cat /etc/machine-id") != client.succeed("cat /etc/machine-id")
assert server.systemctl("is-system-running")[1].strip() == "running"

# The firewall admits the allowed port alone.
assert client.succeed("curl -s --max-time 5 http://server:8000/") == "served"
client.fail("curl -s --max-time 5 http://server:8001/")
server.succeed("curl -s --max-time 5 http://localhost:8001/")

# The shared folder, both ways.
server.succeed("echo from-server > /tmp/shared/note")
assert client.succeed("cat /tmp/shared/note").strip() == "from-server"

# Files in and out through the agent.
server.copy_from_host("{marker}", "/root/from-host")
assert server.succeed("cat /root/from-host") == "the host's"
server.copy_from_vm("/root/from-host", "")

# Its memory is a limit: more than it is fails, less passes.
server.succeed("dd if=/dev/zero of=/dev/null bs=64M count=1")
server.fail("dd if=/dev/zero of=/dev/null bs=400M count=1")

# Its CPUs are a limit: its cgroup (the root of the cgroups it sees) may
# use one CPU's time per period (cgroup v2's cpu.max, or v1's CFS quota).
quota = server.succeed("cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us")
assert quota.split()[0] == "100000", quota

# A background child outlives its command.
server.succeed("(sleep 1; echo later > /tmp/later) >&2 &")
server.wait_for_file("/tmp/later")

# The cable: unplugged, nothing passes; plugged back, it does.
server.block()
client.fail("curl -s --max-time 3 http://server:8000/")
server.unblock()
client.wait_until_succeeds("curl -s --max-time 3 http://server:8000/", timeout=30)

# A power failure, then a start: the writable layer is kept.
server.succeed("echo kept > /root/kept")
server.crash()
server.start()
server.wait_for_unit("open.service")
server.succeed("grep kept /root/kept")
machine_id = server.succeed("cat /etc/machine-id")
server.reboot()
server.wait_for_unit("open.service")
assert server.succeed("cat /etc/machine-id") == machine_id
client.wait_until_succeeds("curl -s --max-time 3 http://server:8000/", timeout=30)

# Root inside is not root outside; the host's files and devices are out
# of reach.
server.succeed("awk '$1 == 0 && $2 != 0 && $3 == 65536' /proc/self/uid_map | grep -q .")
server.fail("test -e {marker}")
server.fail("pgrep -f 'sleep 86399'")
assert int(server.succeed("ls -d /proc/[0-9]* | wc -l")) < 100
server.fail("mknod /root/disk b 8 0")
server.fail("test -e /dev/sda -o -e /dev/vda -o -e /dev/kvm")
client.shutdown()
print("container node ok")
'''
"#,
            marker = marker.display()
        ),
    )
    .unwrap();
    // A process of the host's, which the container must not see.
    let mut host_process = std::process::Command::new("sleep").arg("86399").spawn().unwrap();
    let (code, output) = run(test.path());
    let _ = host_process.kill();
    let _ = host_process.wait();
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("\ncontainer node ok\n"), "{output}");
    assert_eq!(fs::read_to_string(test.path().join("result/from-host")).unwrap(), "the host's");
    assert_nothing_left(&output);
}

/// This host's PID 1 is not systemd, and it has cgroup v1 beside the
/// unified hierarchy; a VM node's is systemd with cgroup v2 alone, as most
/// hosts have. vmrig runs there, inside the VM, a test whose node is a
/// container, from the image built here (the VM has no archive to build
/// from), and must leave no cgroup behind.
#[test]
fn a_container_node_runs_on_a_host_whose_pid_1_is_systemd() {
    let inner = tempfile::tempdir().unwrap();
    fs::write(
        inner.path().join("vmrig.toml"),
        r#"
[containers.c]
packages = ["busybox"]
firewall.allowed_tcp_ports = [8000]
files."/srv/www/index.html" = { text = "served on a systemd host" }

[containers.c.services.web]
wanted_by = ["multi-user.target"]
exec_start = "/bin/busybox httpd -f -p 8000 -h /srv/www"

[test]
script = '''
c.wait_for_unit("web.service")
assert c.succeed("busybox wget -qO- http://localhost:8000/") == "served on a systemd host"
print("the container ran")
'''
"#,
    )
    .unwrap();
    let built = common::vmrig().arg("build").arg(inner.path()).output().unwrap();
    let said = common::text(&built);
    assert!(built.status.success(), "{said}");
    let image = said.split_once("c: image ").and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or_else(|| panic!("{said}"));
    let key = Path::new(image).file_name().unwrap().to_str().unwrap();

    let outer = tempfile::tempdir().unwrap();
    let vmrig = Path::new(env!("CARGO_BIN_EXE_vmrig"));
    fs::write(
        outer.path().join("vmrig.toml"),
        format!(
            r#"
[nodes.host]
packages = ["systemd-container", "python3"]
memory = 1024
# Its own boot: what is tested is a host's PID 1, not a template's.
boot = "cold"

[test]
script = '''
host.wait_for_unit("multi-user.target")
assert host.succeed("readlink /proc/1/exe").strip().endswith("/systemd")
assert host.succeed("stat -fc %T /sys/fs/cgroup").strip() == "cgroup2fs"
host.succeed("mkdir -p /usr/local/bin /var/lib/vmrig/images /var/tmp/vmrig && mount -t tmpfs tmpfs /var/tmp/vmrig")
host.copy_from_host("{vmrig}", "/usr/local/bin/vmrig")
host.copy_from_host("{agent}", "/usr/local/bin/vmrig-agent")
host.succeed("chmod 755 /usr/local/bin/vmrig /usr/local/bin/vmrig-agent")
host.copy_from_host("{inner}/vmrig.toml", "/root/inner/vmrig.toml")
host.copy_from_host("{image}", "/var/lib/vmrig/images/{key}")
# The node's root is an overlay, which cannot hold a container's writable
# layer: the run's private folder goes to a tmpfs, as on most hosts.
status, output = host.execute("TMPDIR=/var/tmp/vmrig VMRIG_STORE=/var/lib/vmrig vmrig run /root/inner 2>&1", timeout=900)
print(output)
assert status == 0, status
assert "the container ran" in output
assert host.succeed("ls /sys/fs/cgroup | grep -c vmrig- || true").strip() == "0"
'''
"#,
            vmrig = vmrig.display(),
            agent = vmrig.with_file_name("vmrig-agent").display(),
            inner = inner.path().display(),
        ),
    )
    .unwrap();
    let (code, output) = run(outer.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("c: connected to the agent"), "{output}");
}

/// `vmrig run` of a test of one container node, `lone`, whose script runs
/// `setup` on it, prints `container is up`, then runs `rest`; its log on
/// a pipe.
fn lone_container_run(setup: &str, rest: &str) -> (tempfile::TempDir, std::process::Child) {
    let test = tempfile::tempdir().unwrap();
    let script = format!("lone.succeed({setup:?})\nprint(\"container is up\", flush=True)\n{rest}\n");
    fs::write(test.path().join("vmrig.toml"), format!("[containers.lone]\n[test]\nscript = '''\n{script}'''\n")).unwrap();
    let child = common::vmrig_run(test.path()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    (test, child)
}

#[test]
fn killing_vmrig_with_sigkill_ends_its_containers_and_gc_removes_their_cgroups() {
    let _cgroups = CGROUPS.write().unwrap_or_else(|p| p.into_inner());
    let (_test, mut child) = lone_container_run("true", "import time\ntime.sleep(3600)");
    let mut nspawn = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        nspawn = nspawn.or_else(|| nspawn_pids(&line).first().copied());
        if line == "container is up" {
            break;
        }
    }
    let nspawn = nspawn.expect("vmrig logged systemd-nspawn's pid");
    let vmrig = child.id();
    let cgroup = fs::read_dir("/sys/fs/cgroup/unified")
        .or_else(|_| fs::read_dir("/sys/fs/cgroup"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().unwrap().to_string_lossy().starts_with(&format!("vmrig-{vmrig}-")))
        .expect("the container has a cgroup named after its run");
    let members = || -> Vec<String> {
        let mut pids = Vec::new();
        for entry in walk(&cgroup) {
            pids.extend(fs::read_to_string(entry.join("cgroup.procs")).unwrap_or_default().split_whitespace().map(str::to_string));
        }
        pids
    };
    assert!(!members().is_empty(), "no process in {}", cgroup.display());

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{nspawn}")).exists() || !members().is_empty() {
        assert!(Instant::now() < deadline, "the container outlived vmrig: {:?}", members());
        std::thread::sleep(Duration::from_millis(50));
    }
    // What it left, `vmrig gc` removes, and says so (unless a run of a
    // test beside this one, which does the same as it starts, came first).
    let left = cgroup.exists();
    let gc = common::vmrig().arg("gc").output().unwrap();
    let said = common::text(&gc);
    assert!(gc.status.success(), "{said}");
    assert!(!cgroup.exists(), "{} is left:\n{said}", cgroup.display());
    assert!(!left || said.contains("cgroup(s) that containers of a run that was killed left"), "{said}");
}

#[test]
fn vmrig_ps_shell_and_cp_reach_a_container_node_while_its_test_runs() {
    let _cgroups = CGROUPS.read().unwrap_or_else(|p| p.into_inner());
    let (test, mut child) = lone_container_run("echo from-the-node > /root/note", "lone.wait_for_file(\"/tmp/shell-was-here\", timeout=300)");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    let mut seen: Vec<String> = lines.by_ref().take_while(|line| line != "container is up").collect();
    let rest = std::thread::spawn(move || lines.collect::<Vec<_>>());

    let listed = common::text(&common::vmrig().arg("ps").output().unwrap());
    let name = test.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(listed.lines().any(|l| l.starts_with(&name) && l.contains("lone") && l.contains(&child.id().to_string())), "vmrig ps:\n{listed}");

    let host = tempfile::tempdir().unwrap();
    let copy = common::vmrig().arg("cp").arg(test.path()).arg("lone:/root/note").arg(host.path().join("note")).output().unwrap();
    assert!(copy.status.success(), "{}", common::text(&copy));
    assert_eq!(fs::read_to_string(host.path().join("note")).unwrap(), "from-the-node\n");

    let mut shell = common::vmrig().arg("shell").arg(test.path()).arg("lone").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    shell.stdin.take().unwrap().write_all(b"echo piped-$((40+2)); touch /tmp/shell-was-here\n").unwrap();
    let output = shell.wait_with_output().unwrap();
    assert!(output.status.success() && common::text(&output).contains("piped-42"), "{}", common::text(&output));

    let status = child.wait().unwrap();
    seen.extend(rest.join().unwrap());
    let seen = seen.join("\n");
    assert!(status.success(), "{seen}");
    assert!(seen.contains("lone: a root shell attached (vmrig shell)"), "{seen}");
    assert_nothing_left(&seen);
}

/// `dir` and every folder below it.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.extend(walk(&entry.path()));
        }
    }
    found
}
