//! Warm nodes on real VMs: a node started from its template is saved once
//! it is up, and a later run with the same inputs for it (the script may
//! differ) restores it with its services running, its clock the host's and
//! its random pool fresh; a node whose inputs changed, or that talked to
//! another node while it started, is not restored from an old save.

mod common;

use std::fs;
use std::path::Path;

/// Runs the test in `dir` as a person would, with the default start mode
/// whatever the suite's environment asks of the other tests, and without
/// `--rebuild` (which never restores a saved node). Each run's script
/// differs, so no recorded pass answers it.
fn run_warm(dir: &Path) -> (Option<i32>, String) {
    common::run_command(common::vmrig_run_cached(dir).env_remove("VMRIG_BOOT"))
}

/// The `KEY value` lines the script printed.
fn printed(output: &str, key: &str) -> Vec<String> {
    output.lines().filter_map(|l| l.strip_prefix(&format!("{key} "))).map(str::to_string).collect()
}

/// A node with a service that takes seconds of CPU to start (under TCG)
/// and leaves its work in `/run`, which only the node's memory holds; the
/// script is `script`, and `/etc/slow.conf` holds `setting`.
fn slow_node(script: &str, setting: &str) -> String {
    format!(
        r#"
[nodes.machine]
files."/etc/slow.conf" = {{ text = "{setting}\n" }}

[nodes.machine.services.slow]
wanted_by = ["multi-user.target"]
exec_start = "/bin/sleep infinity"
# Active once its work is done: a first start's cost, as initdb's.
exec_start_post = ["/bin/bash -c 'head -c 150M /dev/zero | sha256sum > /run/slow-ready'"]

[test]
script = '''
import time
started = time.monotonic()
machine.wait_for_unit("slow.service")
print("READY_AFTER", time.monotonic() - started)
{script}
'''
"#
    )
}

/// What every run's script prints about the node.
const LOOK: &str = r#"
print("INVOCATION", machine.succeed("systemctl show -P InvocationID slow.service").strip())
print("BOOT", machine.succeed("cat /proc/sys/kernel/random/boot_id").strip())
print("RANDOM", machine.succeed("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"))
print("CLOCK", abs(float(machine.succeed("date +%s.%N")) - time.time()))
machine.succeed("test -s /run/slow-ready")
"#;

/// Something no earlier run of these tests had, for a node's file: the
/// store is shared, and a node saved by an earlier `cargo test` would be
/// restored from its first run on.
fn fresh() -> String {
    format!("{:?}", std::time::SystemTime::now())
}

fn one(output: &str, key: &str) -> String {
    let values = printed(output, key);
    assert_eq!(values.len(), 1, "{key}:\n{output}");
    values[0].clone()
}

#[test]
fn a_node_up_is_saved_then_restored_warm_with_its_services_up_until_its_inputs_change() {
    let test = tempfile::tempdir().unwrap();
    let toml = |round: usize, setting: &str| slow_node(&format!("{LOOK}\nprint('ROUND', {round})"), setting);
    let (first_setting, second_setting) = (fresh(), fresh());

    // First run: started from its template, saved once up.
    fs::write(test.path().join("vmrig.toml"), toml(1, &first_setting)).unwrap();
    let (code, first) = run_warm(test.path());
    assert_eq!(code, Some(0), "{first}");
    assert!(first.contains("machine: restored from its template"), "{first}");
    assert!(first.contains("machine: saved warm once up"), "{first}");

    // Two later runs with other scripts: restored from the save.
    let mut restored = Vec::new();
    for round in [2, 3] {
        fs::write(test.path().join("vmrig.toml"), toml(round, &first_setting)).unwrap();
        let (code, output) = run_warm(test.path());
        assert_eq!(code, Some(0), "{output}");
        assert!(output.contains("machine: starting warm"), "round {round}:\n{output}");
        assert!(!output.contains("restored from its template"), "round {round}:\n{output}");
        // The same node: the service's start and the boot of the save.
        assert_eq!(one(&output, "INVOCATION"), one(&first, "INVOCATION"), "round {round}: the service started again");
        assert_eq!(one(&output, "BOOT"), one(&first, "BOOT"), "round {round}");
        let clock: f64 = one(&output, "CLOCK").parse().unwrap();
        assert!(clock < 1.0, "round {round}: the guest's clock is {clock} s off the host's");
        let ready: f64 = one(&output, "READY_AFTER").parse().unwrap();
        let first_ready: f64 = one(&first, "READY_AFTER").parse().unwrap();
        assert!(ready < first_ready, "round {round}: the service was up after {ready} s, in the first run after {first_ready} s");
        // The console and the journal say what happened.
        assert!(output.contains("[vmrig] restored from the save here"), "{output}");
        restored.push(output);
    }
    assert_ne!(one(&restored[0], "RANDOM"), one(&restored[1], "RANDOM"), "two restores drew the same random bytes");
    assert_ne!(one(&restored[0], "RANDOM"), one(&first, "RANDOM"));
    let journal = r#"print("JOURNAL", machine.succeed("journalctl -k -g 'restored from the save' -o cat | wc -l").strip())"#;
    fs::write(test.path().join("vmrig.toml"), slow_node(journal, &first_setting)).unwrap();
    let (code, output) = run_warm(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(one(&output, "JOURNAL"), "1", "{output}");

    // A file of the node changed: its old save is not its.
    fs::write(test.path().join("vmrig.toml"), toml(4, &second_setting)).unwrap();
    let (code, changed) = run_warm(test.path());
    assert_eq!(code, Some(0), "{changed}");
    assert!(!changed.contains("starting warm"), "a node whose file changed was restored from the old save:\n{changed}");
    assert!(changed.contains("machine: restored from its template"), "{changed}");
    assert_ne!(one(&changed, "INVOCATION"), one(&first, "INVOCATION"));

    // boot = "template" and VMRIG_BOOT=template never restore a save.
    fs::write(test.path().join("vmrig.toml"), toml(5, &second_setting)).unwrap();
    let (code, output) = common::run_command(common::vmrig_run_cached(test.path()).env("VMRIG_BOOT", "template"));
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("machine: restored from its template"), "{output}");
    assert!(!output.contains("starting warm") && !output.contains("saved warm"), "{output}");
    let (code, output) = common::run_command(common::vmrig_run_cached(test.path()).env("VMRIG_BOOT", "tepid"));
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("VMRIG_BOOT=tepid is no start mode: it is one of cold, template, warm"), "{output}");
}

#[test]
fn a_node_that_talks_to_another_while_it_starts_is_not_saved_and_says_why() {
    let test = tempfile::tempdir().unwrap();
    let setting = fresh();
    let toml = |round: usize| {
        format!(
            r#"
[nodes.caller]
files."/etc/caller.conf" = {{ text = "{setting}" }}
[nodes.caller.services.call]
wanted_by = ["multi-user.target"]
# A TCP connection to the other node as it starts, as a replica's to
# its primary; nothing listens there, and only its frames count.
exec_start = "/bin/bash -c '(echo > /dev/tcp/192.168.1.1/22) 2>/dev/null; exec sleep infinity'"

[nodes.callee]

[test]
script = '''
callee.start()
callee.wait_for_unit("default.target")
caller.wait_for_unit("default.target")
import time
time.sleep(15)
print("ROUND", {round})
'''
"#
        )
    };
    fs::write(test.path().join("vmrig.toml"), toml(1)).unwrap();
    let (code, output) = run_warm(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("caller: not saved warm: while it started it exchanged a frame with another node (IPv4 TCP from 192.168.1.2 to 192.168.1.1)"),
        "{output}"
    );
    fs::write(test.path().join("vmrig.toml"), toml(2)).unwrap();
    let (code, output) = run_warm(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.contains("caller: starting warm"), "{output}");
    assert!(output.contains("caller: restored from its template"), "{output}");
}
