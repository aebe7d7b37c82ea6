//! `vmrig run` on real VMs: QEMU booting Debian images with systemd, driven
//! by test scripts. The tests share one store, so the base image is built
//! once for all of them.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{run, text, vmrig_run, vmrig_run_cached};

/// A test directory holding `toml` as its definition.
fn test_dir(toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("vmrig.toml"), toml).unwrap();
    dir
}

/// A test directory with one node, `machine`, running `script`.
fn machine_test(script: &str) -> tempfile::TempDir {
    test_dir(&format!("[nodes.machine]\n\n[test]\nscript = '''\n{script}'''\n"))
}

#[test]
fn a_file_written_before_a_reboot_is_there_after_it() {
    let test = machine_test(
        r#"
machine.succeed("echo persisted > /root/marker")
first_boot = machine.succeed("cat /proc/sys/kernel/random/boot_id")
machine.reboot()
assert machine.succeed("cat /proc/sys/kernel/random/boot_id") != first_boot, "the machine did not reboot"
assert machine.succeed("cat /root/marker") == "persisted\n"
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("machine: rebooting"), "{output}");
    let console = fs::read_to_string(test.path().join("result/nodes/machine/console.log")).unwrap();
    assert_eq!(console.matches("vmrig-init: starting systemd").count(), 2, "{console}");
}

#[test]
fn declared_services_and_files_reach_the_node_without_an_image_build() {
    let definition = |message: &str| {
        format!(
            r#"
[nodes.server]
files."/etc/greeting" = {{ text = "{message}" }}

[nodes.server.services.greeter]
wanted_by = ["multi-user.target"]
exec_start = "/bin/sh -c 'cp /etc/greeting /run/greeting; exec sleep infinity'"

[test]
script = '''
server.wait_for_unit("default.target")
server.wait_for_unit("greeter.service")
assert server.get_unit_info("greeter.service")["ActiveState"] == "active"
print("greeting:", server.succeed("cat /run/greeting"))
server.fail("systemctl is-active no-such.service")
'''
"#
        )
    };
    let test = test_dir(&definition("hello"));
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("greeting: hello"), "{output}");

    fs::write(test.path().join("vmrig.toml"), definition("changed")).unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("greeting: changed"), "{output}");
    assert!(!output.contains("building image"), "editing a file rebuilt the image:\n{output}");
}

#[test]
fn a_failing_command_fails_the_run_with_node_command_status_and_stderr() {
    let test = machine_test(
        r#"
machine.succeed("true")
machine.succeed("echo on-stdout; echo on-stderr >&2; exit 3")
print("unreachable")
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("machine: command `echo on-stdout; echo on-stderr >&2; exit 3` failed (exit status 3)"), "{output}");
    assert!(output.contains("stdout: on-stdout\nstderr: on-stderr"), "{output}");
    assert!(output.contains(&format!("File \"{}\", line 7, in <module>", test.path().join("vmrig.toml").display())), "{output}");
    assert!(!output.contains("\nunreachable"), "{output}");
    assert!(output.contains(": FAILED"), "{output}");
}

#[test]
fn commands_return_though_a_background_child_holds_their_output() {
    let test = machine_test(
        r#"
import time
started = time.monotonic()
machine.succeed("sleep 100 &")
machine.succeed("(sleep 100; echo late) &")
assert machine.succeed("echo now; sleep 100 >/dev/null 2>&1 &") == "now\n"
assert time.monotonic() - started < 60
status, _ = machine.execute("sleep 100", timeout=2)
assert status != 0, "a command past its time limit must not succeed"
# Under `set -euo pipefail`, as in NixOS: a process may end while the loop reads.
machine.succeed("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null || true; echo; done | grep '^sleep 100'")
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
}

#[test]
fn files_copy_both_ways_and_the_guest_cannot_write_outside_the_report() {
    let test = machine_test(
        r#"
machine.copy_from_host("payload", "/tmp/payload")
machine.succeed("test -x /tmp/payload/bin/tool")
machine.succeed("cat /tmp/payload/data.bin | cmp - /tmp/payload/data.bin")
machine.succeed("mkdir -p /tmp/out/sub && echo guest > /tmp/out/sub/file && ln -s /etc/passwd /tmp/out/link")
machine.copy_from_vm("/tmp/out", "copied")
machine.copy_from_vm("/tmp/payload/data.bin")
try:
    machine.copy_from_vm("/tmp/out", "../escape")
except Exception as error:
    print("refused:", error)
else:
    raise AssertionError("a target_dir outside the report was accepted")
"#,
    );
    let payload = test.path().join("payload");
    fs::create_dir_all(payload.join("bin")).unwrap();
    fs::write(payload.join("bin/tool"), "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(payload.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(payload.join("data.bin"), &data).unwrap();

    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    let result = test.path().join("result");
    assert_eq!(fs::read_to_string(result.join("copied/out/sub/file")).unwrap(), "guest\n");
    assert!(fs::symlink_metadata(result.join("copied/out/link")).is_err(), "a guest symlink was recreated");
    assert_eq!(fs::read(result.join("data.bin")).unwrap(), data);
    assert!(output.contains("refused: target_dir `../escape` must be a relative path inside the result folder"), "{output}");
    assert!(!test.path().join("escape").exists());
}

#[test]
fn killing_vmrig_with_sigkill_leaves_no_qemu() {
    let test = machine_test(
        r#"
machine.succeed("true")
print("vm is up", flush=True)
import time
time.sleep(3600)
"#,
    );
    let mut child = vmrig_run(test.path()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut qemu_pid = None;
    let started = Instant::now();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        if let Some(pid) = line.strip_prefix("machine: QEMU running (pid ").and_then(|r| r.strip_suffix(')')) {
            qemu_pid = Some(pid.to_string());
        }
        if line == "vm is up" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the VM did not come up");
    }
    let qemu_pid = qemu_pid.expect("vmrig logged QEMU's pid");
    assert!(Path::new(&format!("/proc/{qemu_pid}")).exists());

    let killed = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{qemu_pid}")).exists() {
        let state = fs::read_to_string(format!("/proc/{qemu_pid}/stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            break; // dead, waiting for init to reap it
        }
        assert!(Instant::now() < deadline, "QEMU {qemu_pid} outlived vmrig");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The next run sweeps away the private files the killed one left.
    let leftovers = |pid: u32| {
        fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| fs::read_to_string(e.path().join("owner")).is_ok_and(|o| o == pid.to_string()))
            .count()
    };
    assert_eq!(leftovers(killed), 1);
    let (code, output) = run(machine_test("print('nothing to do')\n").path());
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(leftovers(killed), 0);
}

#[test]
fn crash_shutdown_and_restart_keep_the_writable_layer() {
    let test = machine_test(
        r#"
machine.succeed("echo kept > /root/marker && sync")
machine.crash()
assert machine.succeed("cat /root/marker") == "kept\n"
machine.shutdown()
assert machine.succeed("cat /root/marker") == "kept\n"
machine.shutdown()
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("machine: simulating a power failure"), "{output}");
    assert_eq!(output.matches("machine: starting vm").count(), 3, "{output}");
}

#[test]
fn keep_state_carries_the_writable_layer_to_the_next_run() {
    let test = machine_test(
        r#"
import os
if os.environ.get("VMRIG_TEST_WRITE"):
    machine.succeed("echo from-last-run > /root/marker && sync")
    machine.shutdown()
else:
    print("marker:", machine.execute("cat /root/marker")[1].strip() or "absent")
"#,
    );
    let with = |keep: bool, write: bool| {
        let mut command = vmrig_run(test.path());
        if keep {
            command.arg("--keep-state");
        }
        if write {
            command.env("VMRIG_TEST_WRITE", "1");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", text(&output));
        text(&output)
    };
    with(true, true);
    assert!(with(true, false).contains("marker: from-last-run"));
    assert!(with(false, false).contains("marker: absent"));
}

#[test]
fn waits_for_ports_sockets_files_units_and_console_text() {
    let test = test_dir(
        r#"
[nodes.machine.services.listener]
description = "TCP and stream listener"
exec_start = "/usr/bin/systemd-socket-activate --inetd -a -l 7000 -l /run/stream.sock /bin/cat"

[nodes.machine.services.datagram]
wanted_by = ["multi-user.target"]
exec_start = "/usr/bin/systemd-socket-activate --datagram -l /run/datagram.sock /bin/cat"

[test]
script = '''
serial_stdout_off()
machine.wait_for_console_text("starting systemd")
machine.wait_for_unit("multi-user.target")
machine.wait_for_closed_port(7000)
assert machine.start_job("listener.service")[0] == 0
machine.wait_for_open_port(7000)
machine.wait_for_open_port(7000, addr="machine")
machine.wait_for_open_unix_socket("/run/stream.sock")
machine.wait_for_open_unix_socket("/run/datagram.sock", is_datagram=True)
machine.require_unit_state("listener.service")
assert machine.get_unit_property("listener.service", "Description") == "TCP and stream listener"
assert machine.stop_job("listener.service")[0] == 0
machine.wait_for_closed_port(7000)
machine.require_unit_state("listener.service", "inactive")

def fails_with(text, action):
    try:
        action()
    except Exception as error:
        assert text in str(error), str(error)
        return
    raise AssertionError(f"expected a failure saying {text!r}")

fails_with("unit listener.service is inactive, expected active", lambda: machine.require_unit_state("listener.service"))
fails_with("TCP port 7001 on localhost was not open within 1 s", lambda: machine.wait_for_open_port(7001, timeout=1))

machine.succeed("(sleep 2; touch /run/late) >/dev/null 2>&1 &")
machine.wait_for_file("/run/late")

@polling_condition(seconds_interval=0)
def not_broken():
    machine.fail("test -e /run/broken")

with not_broken:
    machine.succeed("true")
machine.succeed("touch /run/broken")
def broken_block():
    with not_broken:
        machine.succeed("true")
fails_with("polling condition failed: not_broken", broken_block)

machine.succeed("echo marker-while-quiet > /dev/console")
machine.wait_for_console_text("marker-while-quiet")
fails_with("did not appear on the console within 1", lambda: machine.wait_for_console_text("marker-while-quiet", timeout=1))
assert "vmrig-init: starting systemd" in machine.get_console_log()
serial_stdout_on()
machine.execute("systemctl poweroff --no-block")
join_all()
'''
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.contains("machine # marker-while-quiet"), "serial_stdout_off() let a console line through:\n{output}");
    let log = fs::read_to_string(test.path().join("result/log.txt")).unwrap();
    assert!(log.contains("machine # marker-while-quiet"), "the log file lacks a console line:\n{log}");
}

/// Every file below `dir` (but the key naming the run), with its contents.
fn files_below(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if entry.file_name() != ".vmrig-key" {
                files.insert(path.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn a_pass_is_recorded_and_answered_from_the_store_until_an_input_changes() {
    // A fresh definition, so that no earlier `cargo test` recorded it.
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let test = test_dir(&format!(
        r#"# run {nonce}
[nodes.machine]

[test]
script = '''
with subtest("boots"):
    machine.succeed("true")
with subtest("reads its input"):
    machine.succeed("true")
    machine.copy_from_vm("/etc/hostname", "copied")
'''
"#
    ));
    let cached_run = |extra: &[&str]| {
        let output = vmrig_run_cached(test.path()).args(extra).output().unwrap();
        (output.status.code(), text(&output))
    };
    let (code, output) = cached_run(&[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("machine: starting vm"), "{output}");
    let junit = fs::read_to_string(test.path().join("result/junit.xml")).unwrap();
    assert!(junit.contains(r#"tests="2" failures="0""#), "{junit}");
    assert!(junit.contains(r#"name="reads its input""#), "{junit}");
    let report = files_below(&test.path().join("result"));
    for kept in ["log.txt", "junit.xml", "nodes/machine/console.log", "vlan1.pcap", "copied/hostname"] {
        assert!(report.contains_key(kept), "the run left no {kept}: {:?}", report.keys());
    }

    let (code, output) = cached_run(&[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains(": passed (cached from "), "{output}");
    assert!(!output.contains("starting vm"), "a recorded pass booted a VM:\n{output}");

    // The report comes back from the store when it is gone.
    fs::remove_dir_all(test.path().join("result")).unwrap();
    let (code, output) = cached_run(&[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("(cached from "), "{output}");
    assert_eq!(files_below(&test.path().join("result")), report, "the cached report is not the passing run's");

    // Any file of the test directory is an input.
    fs::write(test.path().join("input.txt"), "new").unwrap();
    let (code, output) = cached_run(&[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("machine: starting vm"), "an edited input was answered from the store:\n{output}");
    let (_, output) = cached_run(&["--rebuild"]);
    assert!(output.contains("machine: starting vm"), "--rebuild was answered from the store:\n{output}");
}

#[test]
fn a_failure_is_reported_in_its_subtest_and_never_recorded() {
    let test = test_dir(
        r#"
[nodes.machine]

[test]
script = '''
with subtest("passes"):
    machine.succeed("true")
with subtest("fails"):
    machine.succeed("echo broken >&2; false")
'''
"#,
    );
    let junit_copy = test.path().join("copy.xml");
    for _ in 0..2 {
        let output = vmrig_run_cached(test.path()).arg("--junit").arg(&junit_copy).output().unwrap();
        let output_text = text(&output);
        assert_eq!(output.status.code(), Some(1), "{output_text}");
        assert!(output_text.contains("machine: starting vm"), "a failure was answered from the store:\n{output_text}");
    }
    let junit = fs::read_to_string(&junit_copy).unwrap();
    assert_eq!(junit, fs::read_to_string(test.path().join("result/junit.xml")).unwrap());
    assert!(junit.contains(r#"tests="2" failures="1""#), "{junit}");
    let failing = junit.split(r#"name="fails""#).nth(1).expect("a case for the failing subtest");
    assert!(
        failing.contains("<failure message=\"vmrig.TestFailure: machine: command `echo broken &gt;&amp;2; false` failed (exit status 1)"),
        "{junit}"
    );
    assert!(failing.contains("stderr: broken"), "{junit}");
}

#[test]
fn the_global_timeout_cuts_a_command_short() {
    let test = machine_test("machine.succeed(\"sleep infinity\")\n");
    let mut child = vmrig_run(test.path()).args(["--timeout", "40"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Far more than the timeout, and far less than forever.
    let give_up = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > give_up {
            child.kill().unwrap();
            panic!("vmrig ran on past its --timeout");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().unwrap();
    let output_text = text(&output);
    assert_eq!(output.status.code(), Some(1), "{output_text}");
    assert!(output_text.contains("the test ran out of time (40 s)"), "{output_text}");
    let junit = fs::read_to_string(test.path().join("result/junit.xml")).unwrap();
    assert!(junit.contains("failures=\"1\""), "{junit}");
}

#[test]
fn an_interactive_session_drives_machines_typed_at_its_prompt() {
    let test = machine_test("print('the script ran on', machine.succeed('hostname').strip())\n");
    let mut session = interactive_session(test.path());
    let typed = "machine.succeed('echo typed > /tmp/typed')\ntest_script()\nmachine.shell_interact()\ncd /tmp\ncat typed\npwd\nfalse\n";
    std::io::Write::write_all(&mut session.stdin.take().unwrap(), typed.as_bytes()).unwrap();
    let output = session.wait_with_output().unwrap();
    let output_text = text(&output);
    assert_eq!(output.status.code(), Some(0), "{output_text}");
    assert!(output_text.contains("vmrig interactive: machines machine (not started)"), "{output_text}");
    assert!(output_text.contains("the script ran on machine"), "{output_text}");
    assert!(output_text.contains("machine:/tmp# typed\n"), "{output_text}");
    assert!(output_text.contains("machine:/tmp# /tmp\n"), "{output_text}");
    assert!(output_text.contains("(exit status 1)"), "{output_text}");
    assert!(!output_text.contains("__vmrig_status") && !output_text.contains("executing: cd"), "the shell's plumbing showed:\n{output_text}");
    assert!(["machine: killing its process", "machine: killing QEMU"].iter().any(|line| output_text.contains(line)), "the session left its machine running:\n{output_text}");
}

/// `vmrig interactive DIR` with the shared store, its streams piped.
fn interactive_session(dir: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .arg("interactive")
        .arg(dir)
        .env("VMRIG_STORE", common::store())
        .env_remove("VMRIG_MIRROR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The lines `stream` carries, as they come. A thread reads it to its end,
/// so that the writer never meets a closed pipe.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || BufReader::new(stream).lines().map_while(Result::ok).for_each(|line| drop(lines.send(line))));
    received
}

/// Waits (ten minutes at most) for a line holding `needle`; returns the
/// lines seen up to it.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let mut seen = String::new();
    loop {
        let line = lines.recv_timeout(Duration::from_secs(600)).unwrap_or_else(|_| panic!("no line with {needle:?} came:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            return seen;
        }
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent's pid is the second field after the command's `(name)`.
            stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)) == Some(pid.to_string().as_str())
        })
        .collect()
}

/// Whether process `pid` is gone (or dead, waiting to be reaped).
fn gone(pid: u32) -> bool {
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    state.is_empty() || state.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) == Some("Z")
}

#[test]
fn sigint_and_sigterm_to_vmrig_alone_stop_the_run_and_report_it_interrupted() {
    for (signal, name, status) in [(nix::sys::signal::Signal::SIGINT, "SIGINT", 130), (nix::sys::signal::Signal::SIGTERM, "SIGTERM", 143)] {
        let test = machine_test("machine.succeed('true')\nmachine.succeed('sleep 600')\n");
        let mut child = vmrig_run(test.path()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // Once this is logged, the command runs in the guest: mid-command.
        let seen = wait_for_line(&lines_of(child.stderr.take().unwrap()), "must succeed: sleep 600");
        std::thread::sleep(Duration::from_secs(1));
        let children = children_of(child.id());
        assert!(children.len() >= 2, "expected QEMU and python3 among {children:?}:\n{seen}");

        let signalled = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let exit = child.wait().unwrap();
        assert!(signalled.elapsed() < Duration::from_secs(60), "{name} took {:?} to end the run", signalled.elapsed());
        assert_eq!(exit.code(), Some(status), "{name}:\n{seen}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !children.iter().all(|&pid| gone(pid)) {
            assert!(Instant::now() < deadline, "{name}: children {children:?} outlived vmrig");
            std::thread::sleep(Duration::from_millis(50));
        }

        let log = fs::read_to_string(test.path().join("result/log.txt")).unwrap();
        assert!(log.contains(&format!("interrupted by {name}: stopping the script and every node")), "{log}");
        assert!(log.contains("(finished: cleanup"), "{log}");
        let junit = fs::read_to_string(test.path().join("result/junit.xml")).unwrap();
        assert!(junit.contains(&format!("the run was interrupted by {name}")), "{junit}");
    }
}

#[test]
fn nodes_behave_as_nixos_test_nodes_where_scripts_can_tell() {
    let test = test_dir(
        r#"
[nodes.one.services.chatty]
wanted_by = ["multi-user.target"]
exec_start = "/bin/sh -c 'echo chatty-service-says-hello; exec sleep infinity'"

[nodes.one.services.broken]
exec_start = "/bin/sh -c 'echo broken-because-of-reasons >&2; exit 7'"

# NixOS tests often give a node 2 GiB: with SeaBIOS as microvm's
# firmware, exactly 2048 MiB broke the node's first disk at boot.
[nodes.two]
memory = 2048

[test]
script = '''
import datetime, threading

one.start(allow_reboot=True)
start_all()
for machine in machines:
    machine.wait_for_unit("network.target")
    machine.wait_for_unit("network-online.target")
assert one.is_up() and two.is_up()

with subtest("a node has the memory it was given"):
    total_kib = int(two.succeed("awk '/^MemTotal:/ {print $2}' /proc/meminfo"))
    assert 1900 * 1024 < total_kib <= 2048 * 1024, total_kib

with subtest("a service's log line reaches the console"):
    one.wait_for_console_text("chatty-service-says-hello")

with subtest("a failed unit says why"):
    one.execute("systemctl start broken.service")
    try:
        one.wait_for_unit("broken.service", timeout=60)
        raise AssertionError("wait_for_unit passed on a failed unit")
    except Exception as error:
        failure = str(error)
    assert 'reached state "failed"' in failure, failure
    assert "status=7" in failure and "broken-because-of-reasons" in failure, failure
    print("the failure read:", failure)

with subtest("threads drive machines side by side, each with its own answers"):
    answers = {}
    def drive(machine):
        answers[machine.name] = [machine.succeed(f"echo {machine.name}-{i}").strip() for i in range(20)]
    threads = [threading.Thread(target=drive, args=(m,)) for m in machines]
    # One thread waits on one's console while another thread uses one.
    waiter = threading.Thread(target=lambda: one.wait_for_console_text("typed-on-the-console"))
    for thread in threads + [waiter]:
        thread.start()
    one.succeed("sleep 1; echo typed-on-the-console > /dev/ttyS0")
    for thread in threads + [waiter]:
        thread.join()
    for machine in machines:
        assert answers[machine.name] == [f"{machine.name}-{i}" for i in range(20)], answers

with subtest("the NixOS driver's other calls"):
    one.log("a line about one")
    with two.nested("a block about two"):
        two.succeed("true")
    assert driver.machines == machines and os.path.isdir(".")
    one.copy_from_host_via_shell("vmrig.toml", "/made/for/it/definition.toml")
    one.succeed("grep -q chatty /made/for/it/definition.toml")
    two.succeed("echo on-the-first-terminal > /dev/tty1")
    two.wait_until_tty_matches("1", "on-the-first-terminal")
    assert "on-the-first-terminal" in two.get_tty_text(1)
    two.dump_tty_contents(1)
    # Something on the guest reads its console: what is typed reaches it.
    two.succeed("(head -n 1 /dev/ttyS0 | sed 's/^/heard: /' > /dev/ttyS0) >/dev/null 2>&1 &")
    two.send_console("typed at the console\n")
    two.wait_for_console_text("heard: typed at the console", timeout=60)
    events = []
    listener = threading.Thread(target=lambda: events.append(two.wait_for_qmp_event(lambda e: e["event"] == "STOP", timeout=60)))
    listener.start()
    two.send_monitor_command("stop")
    two.send_monitor_command("cont")
    listener.join()
    assert events and events[0]["event"] == "STOP", events
    try:
        two.get_tty_text(99)
    except Exception as error:
        print("no tty 99:", error)

with subtest("link conditions as tc writes them"):
    vlan(1).impair(delay="20ms", jitter=datetime.timedelta(milliseconds=5), loss="1%", rate="10mbit")
    vlan(1).impair()
    try:
        vlan(1).impair(delay="200 parsecs")
        raise AssertionError("a nonsense delay was taken")
    except Exception as error:
        print("impair refused:", error)

with subtest("a guest's own reboot powers it off unless allowed"):
    two.execute("systemctl reboot")
    two.wait_for_shutdown()
    assert not two.is_up()
'''
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    let log = fs::read_to_string(test.path().join("result/log.txt")).unwrap();
    assert!(log.lines().any(|l| l.starts_with("one # ") && l.contains("chatty-service-says-hello")), "{log}");
    assert!(output.contains("one: a line about one"), "{output}");
    assert!(output.contains("(finished: a block about two, in "), "{output}");
    assert!(output.contains("tty 1 shows:"), "{output}");
    assert!(output.contains("no tty 99: argument `tty`: must be a virtual terminal's number (1 to 63), not 99"), "{output}");
    assert!(output.contains("impair refused: argument `delay`: cannot be \"200 parsecs\"; it takes seconds"), "{output}");
}

#[test]
fn console_interact_types_the_terminals_lines_on_the_console() {
    let test = machine_test("pass\n");
    let mut session = interactive_session(test.path());
    let mut typing = session.stdin.take().unwrap();
    let lines = lines_of(session.stderr.take().unwrap());
    let reader = "machine.succeed(\"(head -n 1 /dev/ttyS0 | sed 's/^/heard: /' > /dev/ttyS0) >/dev/null 2>&1 &\")\n";
    std::io::Write::write_all(&mut typing, format!("{reader}machine.console_interact()\ntyped-through-the-terminal\n").as_bytes()).unwrap();
    let seen = wait_for_line(&lines, "machine # heard: typed-through-the-terminal");
    drop(typing); // Ctrl-D: ends console_interact(), then the session
    let status = session.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{seen}");
}

#[test]
fn a_node_slow_to_reach_sysinit_is_waited_for_as_long_as_the_call_allows() {
    // Its sysinit.target comes 130 s into its boot, and the agent runs
    // commands and writes files only past it: longer than the 120 s a unit
    // query or a copy once waited for the agent's answer, well within
    // wait_for_unit's 900 s and a copy's.
    let test = test_dir(
        r#"
[nodes.machine]
boot = "cold"
services.slow-early-boot = { unit = "[Unit]\nDefaultDependencies=no\nBefore=sysinit.target\n[Service]\nType=oneshot\nExecStart=/bin/sleep 130\n", wanted_by = ["sysinit.target"] }

[test]
script = '''
import tempfile
with tempfile.NamedTemporaryFile("w", suffix=".txt") as early:
    early.write("copied in early boot")
    early.flush()
    machine.copy_from_host(early.name, "/root/early.txt")
machine.wait_for_unit("multi-user.target")
assert float(machine.succeed("cut -d' ' -f1 /proc/uptime")) >= 130
assert machine.succeed("cat /root/early.txt") == "copied in early boot"
'''
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
}
