//! Fast start on real VMs: nodes restored from a template of their image
//! and shape must be told apart as cold-booted nodes are, and see their
//! own configuration from their first moment.

mod common;

use std::fs;

/// Runs the test in `dir` with its nodes restored from templates, whatever
/// the suite's environment asks of the other tests: the template start is
/// what these tests are about, so their nodes are never saved warm, and
/// the warm pass (`VMRIG_TEST_WARM`) starts them from templates again.
fn run_fast(dir: &std::path::Path) -> (Option<i32>, String) {
    common::run_command(common::vmrig_run(dir).env("VMRIG_BOOT", "template"))
}

/// A test directory holding `toml` as its definition.
fn test_dir(toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("vmrig.toml"), toml).unwrap();
    dir
}

/// The `KEY value` lines the script printed.
fn printed(output: &str, key: &str) -> Vec<String> {
    output.lines().filter_map(|l| l.strip_prefix(&format!("{key} "))).map(str::to_string).collect()
}

#[test]
fn nodes_from_one_template_are_told_apart_and_keep_the_hosts_time() {
    let test = test_dir(
        r#"
[nodes.one]
[nodes.two]

[test]
script = '''
import time
start_all()
for machine in machines:
    machine.wait_for_unit("default.target")
    identity = machine.succeed(
        "cat /etc/machine-id; hostname; cat /sys/class/net/eth1/address;"
        " ip -4 -br address show dev eth1 | tr -s ' ' | cut -d' ' -f3; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    ).split()
    print("IDENTITY", machine.name, " ".join(identity))
    guest_time = float(machine.succeed("date +%s.%N"))
    print("CLOCK", machine.name, abs(guest_time - time.time()))
'''
"#,
    );
    let mut draws = Vec::new();
    for round in 0..2 {
        let (code, output) = run_fast(test.path());
        assert_eq!(code, Some(0), "{output}");
        assert_eq!(output.matches("restored from its template").count(), 2, "both nodes should start from the template:\n{output}");
        let identities: Vec<Vec<String>> = printed(&output, "IDENTITY").iter().map(|l| l.split_whitespace().map(str::to_string).collect()).collect();
        assert_eq!(identities.len(), 2, "{output}");
        let (one, two) = (&identities[0], &identities[1]);
        assert_eq!((one[0].as_str(), two[0].as_str()), ("one", "two"), "{output}");
        for (what, index) in [("machine-id", 1), ("hostname", 2), ("MAC", 3), ("address", 4), ("/dev/urandom", 5)] {
            assert_ne!(one[index], two[index], "round {round}: both nodes have the same {what}:\n{output}");
        }
        assert_eq!(one[3], "52:54:00:12:01:01");
        assert_eq!(two[4], "192.168.1.2/24");
        for skew in printed(&output, "CLOCK") {
            let seconds: f64 = skew.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!(seconds < 1.0, "a node's clock is {seconds} s off the host's:\n{output}");
        }
        draws.push(one[5].clone());
    }
    assert_ne!(draws[0], draws[1], "node one drew the same random numbers in two runs");
}

#[test]
fn a_service_its_package_enables_answers_with_the_nodes_configuration_first() {
    let test = test_dir(
        r#"
[nodes.web]
packages = ["nginx-light", "curl"]
files."/etc/nginx/sites-enabled/default" = { text = "server { listen 80 default_server; return 200 'the node configured me'; }\n" }

[test]
script = '''
web.start()
web.wait_for_open_port(80)
first = web.succeed("curl --silent http://localhost/")
assert first == "the node configured me", repr(first)
'''
"#,
    );
    let (code, output) = run_fast(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("web: restored from its template"), "{output}");
}

#[test]
fn early_boot_configuration_is_replayed_or_the_node_boots_cold_saying_why() {
    let test = test_dir(
        r#"
[nodes.tuned]
files."/etc/sysctl.d/90-test.conf" = { text = "net.ipv4.ip_default_ttl = 99\n" }
files."/etc/tmpfiles.d/test.conf" = { text = "d /run/made-by-tmpfiles 0755 root root -\n" }

[nodes.mounts]
files."/etc/fstab" = { text = "tmpfs /mnt/scratch tmpfs defaults 0 0\n" }

[test]
script = '''
start_all()
tuned.wait_for_unit("default.target")
assert tuned.succeed("cat /proc/sys/net/ipv4/ip_default_ttl").strip() == "99"
tuned.succeed("test -d /run/made-by-tmpfiles")
mounts.wait_for_unit("default.target")
mounts.succeed("mountpoint /mnt/scratch")
'''
"#,
    );
    let (code, output) = run_fast(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("tuned: restored from its template"), "{output}");
    assert!(output.contains("mounts: booting cold: its file /etc/fstab changes /etc/fstab, which only early boot reads"), "{output}");
    assert!(!output.contains("mounts: restored from its template"), "{output}");
}

#[test]
fn a_restored_node_reboots_cold_from_its_own_layer_and_cold_boots_stay_available() {
    let test = test_dir(
        r#"
[nodes.machine]

[test]
script = '''
machine.succeed("echo kept > /root/marker")
first_boot = machine.succeed("cat /proc/sys/kernel/random/boot_id")
machine.reboot()
assert machine.succeed("cat /proc/sys/kernel/random/boot_id") != first_boot
assert machine.succeed("cat /root/marker") == "kept\n"
assert machine.succeed("hostname").strip() == "machine"
machine.crash()
assert machine.succeed("cat /root/marker") == "kept\n"
'''
"#,
    );
    let (code, output) = run_fast(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("machine: restored from its template"), "{output}");
    assert!(output.contains("rebooting (cold, from its own writable layer)"), "{output}");
    let console = fs::read_to_string(test.path().join("result/nodes/machine/console.log")).unwrap();
    assert!(console.starts_with("[vmrig] the boot messages of the template this node is restored from:"), "{console}");
    let template_part = console.split("[vmrig] restored from the template here").next().unwrap();
    assert!(template_part.contains(vmrig_proto::HANDOVER_BANNER), "the template's boot messages are missing:\n{console}");

    fs::write(test.path().join("vmrig.toml"), fs::read_to_string(test.path().join("vmrig.toml")).unwrap().replace("[nodes.machine]", "boot = \"cold\"\n[nodes.machine]")).unwrap();
    let (code, output) = common::run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.contains("restored from its template"), "boot = \"cold\" restored a template:\n{output}");
}
